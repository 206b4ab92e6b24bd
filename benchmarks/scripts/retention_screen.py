"""Forgetting curve of planted facts, per variant, on real spoken transcripts (benchmarks/retention.md).

    nice python benchmarks/scripts/retention_screen.py --n 128 --m 64 --k 8 --speeches 3 --facts 20 \
        --plant-rounds 6 --variants window,base,compose,current --json benchmarks/retention_screen.json

Variants: window (no absorption), base (the base-model teacher with the sync loss alone, lr 1e-3: the shipped
default until 2026-12-03, which every table of retention.md calls "base"), shipped (AbsorberConfig's defaults
now: the sync + next-token hybrid, lr 1e-4), compose (compositional teacher, gamma=1), compose0.5, current (the
paper's teacher), ttt, or any `key=value/key=value` list of AbsorberConfig settings on top of `base`
(e.g. `probes=2/anchor=1/prefix=4/sync_skip=0`, `ntp_weight=1/lr=0.0001`), optionally after a method
(`ttt/lr=0.0001/ttt_context=64`: TTT with Temp-LoRA's conditioned chunks). Each variant streams every speech
with fresh adapters.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

VARIANTS = {
    "window": ("window", {}),
    "base": ("absorber", {"teacher": "base"}),
    "shipped": ("absorber", "defaults"),
    "compose": ("absorber", {"teacher": "compose", "gamma": 1.0}),
    "compose0.5": ("absorber", {"teacher": "compose", "gamma": 0.5}),
    "current": ("absorber", {"teacher": "current"}),
    "probes": ("absorber", {"probes": 2}),
    "compose+probes": ("absorber", {"teacher": "compose", "probes": 2}),
    "ttt": ("ttt", {}),
}


def variant(label: str, base):
    """(method, config) of a named variant or of a `key=value/key=value` list of settings."""
    from absorber.config import override, parse_value
    if label in VARIANTS:
        method, flags = VARIANTS[label]
        if flags == "defaults":                   # AbsorberConfig's own settings at the screen's window
            from absorber.config import AbsorberConfig
            return method, override(AbsorberConfig(), n=base.n, m=base.m, k=base.k)
        return method, override(base, **flags)
    flags = {}
    method, parts = "absorber", label.split("/")
    if parts[0] in ("ttt", "absorber"):          # a method first: `ttt/lr=0.0001/ttt_context=64`
        method, parts = parts[0], parts[1:]
    for part in parts:
        key, _, val = part.partition("=")
        flags[key] = parse_value(key, val)
    return method, override(base, **flags)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--speeches", type=int, default=3, help="the N most recent spoken SOTU speeches")
    p.add_argument("--skip", type=int, default=0, help="skip the S most recent speeches first")
    p.add_argument("--concat", type=int, default=0,
                   help="continue each stream with the C speeches that follow it in the list (older ones), for "
                        "distances that one speech is too short for; the facts are planted in the first")
    p.add_argument("--heldout", default="1961-Kennedy", help="the damage check's text: a speech fileid prefix or a text file")
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--plant-rounds", type=int, default=6)
    p.add_argument("--distances", default="1,2,4,8,16,32")
    p.add_argument("--variants", default="window,base,compose,current")
    p.add_argument("--fact-seed", type=int, default=0,
                   help="seed of the first text's facts (text i gets seed + 1000 i): --skip S --fact-seed 1000S "
                        "plants the same facts in a speech as a run of all the speeches from the first")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--read-scales", default="", help="also score every fact and the held-out text with the LoRA "
                   "paths read at these scales (comma-separated; one row per scale, the same trained adapters)")
    p.add_argument("--mix-shares", default="", help="also score every fact and the held-out text under the online "
                   "mixture of the adapted and the base model (absorber.mixture), one row per fixed share (e.g. 0,0.001)")
    p.add_argument("--mix-windows", default="", help="with --mix-shares: also score each share with the mixture's "
                   "weight learned from only the last W tokens before the answer (comma-separated; one row per "
                   "share and window, the same trained adapters; ctx: learned over the context, not the question)")
    p.add_argument("--mix-trace", action="store_true", help="with --mix-shares: each record keeps the answer's "
                   "per-token log-probabilities under both models and the mixture's log-weights where it starts, to "
                   "score other rules over the answer offline (benchmarks/scripts/mixture_answer_rules.py)")
    p.add_argument("--cued", action="store_true", help="each record also keeps the per-token NLLs of the fact asked "
                   "by its own sentence's words up to the answer, and of its decoy (RetentionSettings.cued): what is "
                   "stored, against what a differently worded question can extract (benchmarks/scripts/cued_recall.py)")
    p.add_argument("--recite", type=int, default=0, help="each record also keeps the per-token NLLs of the answer "
                   "and its decoy after a recitation of at most this many tokens that each condition's model writes "
                   "after the question first (RetentionSettings.recite, retention.reciter)")
    p.add_argument("--restate", type=int, default=0, help="each record also keeps the per-token NLLs of the answer "
                   "and its decoy after the question and a lead-in of at most this many tokens that each "
                   "condition's model writes first, the question restated as the start of its answer "
                   "(RetentionSettings.restate, retention.restater)")
    p.add_argument("--restate-shared", action="store_true", help="with --restate: every condition asked after the "
                   "window's lead (the base model's, without the fact): a rewrite of the question, not recall")
    p.add_argument("--json", dest="json_out", required=True)
    a = p.parse_args(argv)
    import torch

    from absorber import data, retention as RT
    from absorber.config import AbsorberConfig, override
    from absorber.models import load
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load(a.model)
    spoken = data.speeches("spoken")
    order = spoken[::-1]
    texts = []
    for i in range(a.skip, a.skip + a.speeches):
        run = order[i:i + 1 + a.concat]
        texts.append(("+".join(s.fileid for s in run),
                      tok.encode("\n\n".join(s.text() for s in run), add_special_tokens=False)))
    held_label, held_text = data.heldout_text(a.heldout)
    heldout = tok.encode(held_text, add_special_tokens=False)[1000:]
    # the tables' "base": the sync loss alone at lr 1e-3 (AbsorberConfig's defaults before 2026-12-03)
    base = override(AbsorberConfig(), n=a.n, m=a.m, k=a.k, lr=a.lr if a.lr is not None else 1e-3, ntp_weight=0.0)
    runs = [(v, *variant(v, base)) for v in a.variants.split(",")]
    rs = RT.RetentionSettings(facts=a.facts, plant_rounds=a.plant_rounds, seed=a.fact_seed,
                              distances=tuple(int(x) for x in a.distances.split(",")),
                              read_scales=tuple(float(x) for x in a.read_scales.split(",") if x),
                              mix_shares=tuple(float(x) for x in a.mix_shares.split(",") if x),
                              mix_windows=tuple(RT.CONTEXT_ONLY if x == "ctx" else int(x)
                                                for x in a.mix_windows.split(",") if x),
                              mix_trace=a.mix_trace, cued=a.cued,
                              recite=a.recite, restate=a.restate,
                              restate_shared=a.restate_shared)
    cmd = "python benchmarks/scripts/retention_screen.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()

    def save(res: dict) -> None:
        slim = {k: {kk: vv for kk, vv in v.items()} for k, v in res["methods"].items()}
        Path(a.json_out).write_text(json.dumps({"command": cmd, "heldout": held_label, "seconds": time.perf_counter() - t0,
                                                "texts": [n for n, _ in texts], "settings": rs.to_dict(),
                                                "partial": res.get("partial", False), "methods": slim},
                                               indent=1, default=str))

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    res = RT.forgetting_curve(model, tok, texts, heldout, runs, rs, log=log, on_run=save)
    save(res)
    print(RT.format_curve(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
