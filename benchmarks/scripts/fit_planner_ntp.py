"""Fit the planner's c_ntp2_* coefficients (bundles with `loss.head_chunks`) to calibration rows, and print the
table of benchmarks/planner.md section 000 with the planner's current coefficients:

    python benchmarks/scripts/fit_planner_ntp.py B benchmarks/planner_ntp2.json

B: the folder holding the int4/int8/fp32 bundles the rows were measured on (`absorber export smollm2-135m
--out B --quant fp32,int8,int4`); rows: `python -m absorber.bench.calibrate B/<bits> --json ...` with a `quant`
key added per row. Least squares; the fp32 row at n=1024 is held out. `c_ntp2_keep` and `c_ntp2_pieces` stay 1
(one boundary per layer per token, one piece's logits): left free, they trade off against each other and turn
negative, since both grow with n.

The fp32 refit of planner.md section 0000000 (rows of several bundles, some coefficients, relative error):

    python benchmarks/scripts/fit_planner_ntp.py --rows benchmarks/planner_rows_fp32.json \
        --set this_change=B/fp32 --set gemma_bench_k8=G/fp32 --free c_ntp2_saved,c_ntp2_tables_fp32 \
        --relative --hold 384

--rows: a dict of row lists; each --set KEY=BUNDLE fits KEY's rows on that bundle; --hold: windows (n) left out.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from absorber.bundle_format import read_manifest
from absorber.devices import planner

FREE = ("c_ntp2_scores", "c_ntp2_tables", "c_ntp2_tables_fp32", "c_ntp2_saved")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="?", help="folder of B/<quant> bundles (the rows' `quant` picks one)")
    ap.add_argument("rows", nargs="?", help="a list of calibration rows with a `quant` key")
    ap.add_argument("--rows", dest="row_sets", help="a dict of row lists, with --set")
    ap.add_argument("--set", action="append", default=[], help="KEY=BUNDLE: KEY's rows were measured on BUNDLE")
    ap.add_argument("--free", default=",".join(FREE), help="the coefficients to fit (default: all four)")
    ap.add_argument("--relative", action="store_true", help="least squares on relative error")
    ap.add_argument("--hold", default=None, help="windows n held out (default: the fp32 row at n=1024)")
    a = ap.parse_args()
    free = tuple(a.free.split(","))
    if a.row_sets:
        sets = json.load(open(a.row_sets))
        pairs = [(r, read_manifest(b)) for key, b in (x.split("=", 1) for x in a.set) for r in sets[key]]
    else:
        rows = json.load(open(a.rows))
        man = {q: read_manifest(f"{a.bundles}/{q}") for q in {r["quant"] for r in rows}}
        pairs = [(r, man[r["quant"]]) for r in rows]

    def pred(i, co=None):
        r, m = pairs[i]
        return planner.predict(m, r["n"], r["m"], r["k"], coeffs=co).peak_bytes

    hold = {int(x) for x in a.hold.split(",")} if a.hold else None
    held = {i for i, (r, _) in enumerate(pairs)
            if (r["n"] in hold if hold is not None else (r["quant"] == "fp32" and r["n"] == 1024))}
    fit = [i for i in range(len(pairs)) if i not in held]
    zero = {k: 0.0 for k in free}
    w = np.array([1.0 / pairs[i][0]["peak_bytes"] if a.relative else 1.0 for i in fit])
    X = np.array([[pred(i, dict(zero, **{k: 1.0})) - pred(i, zero) for k in free] for i in fit]) * w[:, None]
    y = np.array([pairs[i][0]["peak_bytes"] - pred(i, zero) for i in fit]) * w
    use = [j for j in range(len(free)) if np.abs(X[:, j]).max() > 0]
    sol, *_ = np.linalg.lstsq(X[:, use], y, rcond=None)
    print("fitted:", {free[j]: round(float(v), 2) for j, v in zip(use, sol)})
    print("current:", {k: planner.COEFFS[k] for k in free})
    print()
    print("| bundle | n | m | predicted | measured | error | after open | teacher s | step s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, (r, _) in enumerate(pairs):
        p = pred(i)
        opened = f"{r['rss_open'] / 2**20:.0f} MiB" if "rss_open" in r else "–"   # (a bench row has none)
        print(f"| {r['quant']} | {r['n']} | {r['m']} | {p / 2**20:.0f} MiB | {r['peak_bytes'] / 2**20:.0f} MiB | "
              f"{100 * (p / r['peak_bytes'] - 1):+.1f} % | {opened} | {r.get('t_teacher_s', '–')} | "
              f"{r.get('t_step_s', '–')} |" + (" (held out)" if i in held else ""))


if __name__ == "__main__":
    main()
