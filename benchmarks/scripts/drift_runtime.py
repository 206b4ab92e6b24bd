"""Drift over a long stream, in the torch-free runtime: after every round, the NLL of the next `--score` tokens
given the window (Y, m tokens) with the stream's adapters against the same window without them (the plain
window; adapters off). Delta NLL per token < 0: absorption helps the next text; a trend up over the rounds: drift.

The stream is several spoken State of the Union speeches back to back (a long meeting), newest first, until
`--rounds` rounds have run. One JSON record per round (and the bundle's settings) goes to --out.

    python benchmarks/scripts/drift_runtime.py BUNDLE --rounds 64 [--n 256 --m 128] --out benchmarks/drift_runtime_ntp.json
    python benchmarks/scripts/drift_runtime.py --report benchmarks/drift_runtime_ntp.json [more.json ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout (benchmarks/scripts/../..)


def run(args) -> None:
    from absorber.data import speeches
    from absorber.runtime import Stream
    from absorber.mixture import mixture_nll
    from absorber.runtime import generate as G

    over = {"n": args.n, "m": args.m, "k": args.k, "lr": args.lr}
    s = Stream.open(args.bundle, profile="laptop-cpu",
                    config_overrides={k: v for k, v in over.items() if v is not None})
    n, m = s.cfg.n, s.cfg.m
    texts = [sp for sp in reversed(speeches("spoken"))][: args.speeches]
    ids: list[int] = []
    for sp in texts:
        ids += s.model.encode(sp.text() + "\n\n")
        if len(ids) >= (args.rounds + 1) * n + m + args.score:
            break
    need = args.rounds * n + m + args.score
    if len(ids) < need:
        raise SystemExit(f"the speeches hold {len(ids)} tokens, {need} needed")
    records = []
    pos = 0
    t_start = time.perf_counter()
    s.feed_tokens(ids[: n + m - 1])      # the window, one token short of the first round
    pos = n + m - 1
    while s.rounds < args.rounds:
        res = s.feed_tokens(ids[pos:pos + 1])
        pos += 1
        if not res:
            continue
        r = res[-1]
        window = list(s.window)                # Y of the round just run (m tokens)
        target = ids[pos:pos + args.score]     # the text that follows the window
        seq = window + target
        lp_a = G.token_logprobs(G.all_logits(s.model, seq, s.param_views)[:-1], seq[1:])
        lp_b = G.token_logprobs(G.all_logits(s.model, seq, s._base_feeds)[:-1], seq[1:])
        k = len(target)
        rec = {"round": s.rounds, "nll_adapters": -float(lp_a[-k:].sum()), "nll_window": -float(lp_b[-k:].sum()),
               # the online mixture of the two (absorber.mixture) at the stream's share and window, its weight
               # learned over Y first: what a bundle that mixes reads
               "nll_mixture": mixture_nll(lp_a, lp_b, s.cfg.mix_share, scored_from=len(lp_a) - k,
                                          window=s.cfg.mix_window),
               "tokens": len(target), "loss_first": r.loss_first, "loss_last": r.loss_last, "steps": r.steps,
               "seconds": round(r.seconds, 2), "train_seconds": round(r.train_seconds, 2),
               "teacher_seconds": round(r.teacher_seconds, 2), "rss_mb": round(s.stats()["rss_mb"], 1)}
        rec["delta_per_token"] = (rec["nll_adapters"] - rec["nll_window"]) / rec["tokens"]
        rec["delta_mixture_per_token"] = (rec["nll_mixture"] - rec["nll_window"]) / rec["tokens"]
        records.append(rec)
        print(json.dumps(rec), flush=True)
    out = {"bundle": str(args.bundle), "config": s.cfg.to_dict(), "ntp_weight": s.ntp_weight,
           "quant": s.bundle.quant_scheme, "speeches": [sp.fileid for sp in texts], "score": args.score,
           "seconds": round(time.perf_counter() - t_start, 1), "records": records}
    Path(args.out).write_text(json.dumps(out, indent=1))


def report(paths: list[str], draws: int = 2000) -> None:
    """Per file: mean Delta NLL per token over blocks of rounds with a bootstrap interval over rounds, and the
    slope of Delta per round (a drift shows as a positive slope)."""
    rng = np.random.default_rng(0)
    print("| bundle | ntp_weight | lr | rounds | Δ NLL/token rounds 1-16 | 17-32 | 33-48 | 49-64 | all [95 % CI] | "
          "slope per 10 rounds | s/round |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        d = json.loads(Path(p).read_text())
        rec = d["records"]
        _row(d, rec, "delta_per_token", "", rng, draws)
        if "delta_mixture_per_token" in rec[0]:
            _row(d, rec, "delta_mixture_per_token", f", through the mixture (share {d['config']['mix_share']:g})",
                 rng, draws)


def _row(d: dict, rec: list[dict], key: str, what: str, rng, draws: int) -> None:
    """One table row: the mean of `key` over blocks of 16 rounds, its interval over rounds, its slope."""
    delta = np.array([r[key] for r in rec])
    w = np.array([r["tokens"] for r in rec], float)

    def mean(idx):
        return float((delta[idx] * w[idx]).sum() / w[idx].sum()) if len(idx) else float("nan")
    blocks = [mean(np.arange(a, min(a + 16, len(rec)))) for a in (0, 16, 32, 48)]
    boots = [mean(rng.integers(0, len(rec), len(rec))) for _ in range(draws)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    slope = float(np.polyfit(np.arange(len(rec)), delta, 1)[0]) * 10
    secs = float(np.mean([r["seconds"] for r in rec]))
    print(f"| {Path(d['bundle']).name}{what} | {d['ntp_weight']:g} | {d['config']['lr']:g} | {len(rec)} | "
          + " | ".join(f"{b:+.3f}" for b in blocks)
          + f" | {mean(np.arange(len(rec))):+.3f} [{lo:+.3f}, {hi:+.3f}] | {slope:+.4f} | {secs:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--rounds", type=int, default=64)
    ap.add_argument("--n", type=int, default=None, help="tokens absorbed per round (default: the bundle's)")
    ap.add_argument("--m", type=int, default=None, help="tokens synchronized per round (default: the bundle's)")
    ap.add_argument("--k", type=int, default=None, help="steps per round (default: the bundle's)")
    ap.add_argument("--lr", type=float, default=None, help="the stream's lr (default: the bundle's)")
    ap.add_argument("--score", type=int, default=256, help="tokens scored after each round")
    ap.add_argument("--speeches", type=int, default=20)
    ap.add_argument("--out")
    ap.add_argument("--report", nargs="+", metavar="JSON")
    a = ap.parse_args()
    if a.report:
        report(a.report)
    else:
        if not (a.bundle and a.out):
            ap.error("BUNDLE and --out are needed (or --report)")
        run(a)


if __name__ == "__main__":
    main()
