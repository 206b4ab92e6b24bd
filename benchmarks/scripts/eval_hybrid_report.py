"""Next-text R and recall R at the shipped window for the shipped absorber against the sync + next-token hybrid.

    python benchmarks/scripts/eval_hybrid_report.py [BASE.json HYBRID.json]

BASE: `absorber eval --methods window,full,absorber` (the shipped settings); HYBRID: the same texts and segments,
`--methods absorber --sweep ntp_weight=1 lr=0.0001` (one sweep point). R is taken on summed NLL over the scored
segments, R = (NLL_window - NLL_method) / (NLL_window - NLL_full), with a bootstrap interval over segments
(4000 resamples, seed 0); "recall" is the same on the just-evicted passage repeated. Prints a markdown table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]


def _rows(d: dict, method: str) -> list[dict]:
    return [r for t in sorted(d[method]) for r in d[method][t]]


def recovered(key: str, window: list[dict], full: list[dict], rows: list[dict], n_boot: int = 4000):
    w, f, x = (np.array([r[key] for r in rs]) for rs in (window, full, rows))
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, len(w), len(w))
        boot.append((w[i] - x[i]).sum() / (w[i] - f[i]).sum())
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float((w - x).sum() / (w - f).sum()), float(lo), float(hi)


def main(argv: list[str]) -> int:
    base_p = Path(argv[0]) if argv else HERE / "eval_shipped_base.json"
    hyb_p = Path(argv[1]) if len(argv) > 1 else HERE / "eval_shipped_hybrid.json"
    base, hyb = json.loads(base_p.read_text()), json.loads(hyb_p.read_text())
    point = hyb["sweep"][0]
    window, full = _rows(base["segments"], "window"), _rows(base["segments"], "full")
    methods = {"absorber, shipped (teacher=base, lr 1e-3)": _rows(base["segments"], "absorber"),
               f"absorber + next-token on X ({', '.join(f'{k}={v}' for k, v in point['point'].items())})":
                   _rows(point["segments"], "absorber")}
    for rows in methods.values():
        if [r["position"] for r in rows] != [r["position"] for r in window]:
            raise SystemExit("the two files do not score the same segments")
    s = base["settings"]["absorber"]
    print(f"n={s['n']} m={s['m']} K={s['k']}; texts: {', '.join(t['name'] for t in base['settings']['texts'])}; "
          f"{len(window)} segments of {window[0]['count']} tokens\n")
    print("| method | PPL | next-text R [95% CI] | recall R [95% CI] | s/round |")
    print("|---|---:|---|---|---:|")
    for name, rows in (("window", window), ("full context", full)):
        ppl = np.exp(sum(r["nll"] for r in rows) / sum(r["count"] for r in rows))
        print(f"| {name} | {ppl:.3f} | – | – | – |")
    for name, rows in methods.items():
        ppl = np.exp(sum(r["nll"] for r in rows) / sum(r["count"] for r in rows))
        r, lo, hi = recovered("nll", window, full, rows)
        rr, rlo, rhi = recovered("recall_nll", window, full, rows)
        sec = np.mean([x["seconds"] for x in rows])
        print(f"| {name} | {ppl:.3f} | {r:.2f} [{lo:.2f}, {hi:.2f}] | {rr:.2f} [{rlo:.2f}, {rhi:.2f}] | {sec:.0f} |")
    print("\nper segment, NLL per token below the window's (round 1..6 of each text):")
    for name, rows in methods.items():
        print(f"- {name}: " + ", ".join(f"{(w['nll'] - x['nll']) / w['count']:+.3f}" for w, x in zip(window, rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
