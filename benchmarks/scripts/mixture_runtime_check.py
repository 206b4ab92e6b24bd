"""The online mixture in the torch-free runtime on a real bundle (benchmarks/retention.md, "The online mixture"):
after R rounds of a spoken transcript, an unrelated text scored by the base model (every B at 0), the adapters
alone and the mixture (each text from its first token, no stream context; and right after the stream's window:
a change of topic), and the answer latency of 32 greedy tokens with and without the mixture (alternating,
median of N), the mixture also with its weight learned from the prompt's last W tokens only (--mix-windows). The runtime only (no torch): `Generator.score_pending` gives each prompt token's log-probability.

    python benchmarks/scripts/mixture_runtime_check.py BUNDLE --rounds 3 --json benchmarks/mixture_runtime_check.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path


def lp_of(stream, feeds: dict, ids: list[int]):
    from absorber.runtime import generate as G
    gen = G.Generator(stream.model, feeds, 1)
    gen.append(ids)
    return gen.score_pending()[0]


def time_answers(s, prompt: list[int], windows: list[int], reps: int) -> tuple[dict, dict, dict]:
    """32 greedy tokens after `prompt` with the adapters alone, the mixture, and the mixture learned over each
    window, alternating, `reps` times each: the median seconds, the answers, and whether each window's answer is
    the whole prompt's."""
    ways = [("mixture", True, 0), ("adapters", False, 0)] + [(f"mixture_window_{w}", True, w) for w in windows]
    times: dict[str, list[float]] = {w: [] for w, _, _ in ways}
    answers = {}
    for _ in range(reps):
        for way, mix, w in ways:
            s.cfg.mix, s.cfg.mix_window = mix, w
            t = time.perf_counter()
            answers[way] = s.generate_ids(prompt, 32, stop_at_eos=False)
            times[way].append(time.perf_counter() - t)
    secs = {way: statistics.median(v) for way, v in times.items()}
    secs["prompt_tokens"] = len(prompt)
    same = {way: answers[way] == answers["mixture"] for way in answers if way.startswith("mixture_window")}
    return secs, {way: s.model.decode(v) for way, v in answers.items()}, same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--speech", default="2026-Trump-1")
    ap.add_argument("--heldout", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--heldout-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--answers", type=int, default=5, help="answers timed per way (alternating)")
    ap.add_argument("--lr", type=float, help="the stream's lr (default: the bundle's)")
    ap.add_argument("--k", type=int, help="the stream's steps per round (default: the bundle's)")
    ap.add_argument("--mix-share", type=float, help="the mixture's share (default: the bundle's)")
    ap.add_argument("--mix-windows", default="", help="also the mixture with its weight learned from the last W "
                    "prompt tokens only (AbsorberConfig.mix_window; comma-separated): the change of topic and the "
                    "answer time, the answer's tokens against the whole prompt's")
    ap.add_argument("--extra", type=int, default=0, help="then feed up to this many more tokens (at most n - 1: no "
                    "round runs) and time the answers again over the fuller window")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args(argv)
    from absorber import data
    from absorber.mixture import mixture_nll
    from absorber.runtime import Stream
    windows = [int(x) for x in a.mix_windows.split(",") if x]
    s = Stream.open(a.bundle, config_overrides={"mix": True, "lr": a.lr, "k": a.k,
                                                     "mix_share": a.mix_share, "mix_window": 0})
    cfg = s.cfg
    share = cfg.mix_share
    ids = s.model.encode(data.speech(a.speech).text())
    need = cfg.n + cfg.m + (a.rounds - 1) * cfg.n
    t0 = time.perf_counter()
    s.feed_tokens(ids[:need])
    absorb_s = time.perf_counter() - t0
    held = s.model.encode(data.heldout_text(a.heldout)[1])[1000:1000 + a.heldout_tokens]
    own, base = s._answer_adapters(), s._base_feeds
    out = {"bundle": a.bundle, "speech": a.speech, "heldout": a.heldout, "rounds": s.rounds, "n": cfg.n, "m": cfg.m,
           "k": cfg.k, "lr": cfg.lr, "share": share, "absorb_seconds": absorb_s,
           "command": "python benchmarks/scripts/mixture_runtime_check.py " + " ".join(argv or sys.argv[1:])}
    for where, ctx in (("alone", s.sink), ("after the window", s.sink + s.window)):
        seq = ctx + held
        la, lb = lp_of(s, own, seq), lp_of(s, base, seq)
        k = len(held) - (0 if ctx else 1)              # the held-out tokens scored
        nb, na = -float(lb[-k:].sum()), -float(la[-k:].sum())
        nm = mixture_nll(la, lb, share, scored_from=len(la) - k)
        out[where] = {"tokens": k, "ppl_base": math.exp(nb / k), "ppl_adapters": math.exp(na / k),
                      "ppl_mixture": math.exp(nm / k), "change_adapters": math.exp((na - nb) / k) - 1,
                      "change_mixture": math.exp((nm - nb) / k) - 1}
        for w in windows if ctx else ():
            nw = mixture_nll(la, lb, share, scored_from=len(la) - k, window=w)
            out[where][f"change_mixture_window_{w}"] = math.exp((nw - nb) / k) - 1
    q = s.model.encode("Question: What did the speaker say at the start of the speech? Answer:")
    out["answer_seconds_32_tokens"], out["answers"], out["same_tokens_as_the_whole_prompt"] = \
        time_answers(s, s.sink + s.window + q, windows, a.answers)
    if a.extra:           # a fuller window (no round runs: at most n - 1 more tokens), the same question
        s.feed_tokens(ids[need:need + min(a.extra, cfg.n - 1)])
        out["fuller_window"] = dict(zip(("answer_seconds_32_tokens", "answers", "same_tokens_as_the_whole_prompt"),
                                        time_answers(s, s.sink + s.window + q, windows, a.answers)))
    print(json.dumps(out, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
