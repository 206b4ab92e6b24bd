"""Fit the planner's c_ntp2_* coefficients (bundles with `loss.head_chunks`) to calibration rows, and print the
table of benchmarks/planner.md section 000 with the planner's current coefficients:

    python benchmarks/scripts/fit_planner_ntp.py B benchmarks/planner_ntp2.json

B: the folder holding the int4/int8/fp32 bundles the rows were measured on (`absorber export smollm2-135m
--out B --quant fp32,int8,int4`); rows: `python -m absorber.bench.calibrate B/<bits> --json ...` with a `quant`
key added per row. Least squares; the fp32 row at n=1024 is held out. `c_ntp2_keep` and `c_ntp2_pieces` stay 1
(one boundary per layer per token, one piece's logits): left free, they trade off against each other and turn
negative, since both grow with n.
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
    ap.add_argument("bundles")
    ap.add_argument("rows")
    a = ap.parse_args()
    rows = json.load(open(a.rows))
    man = {q: read_manifest(f"{a.bundles}/{q}") for q in {r["quant"] for r in rows}}

    def pred(r, co=None):
        return planner.predict(man[r["quant"]], r["n"], r["m"], r["k"], coeffs=co).peak_bytes

    held = [r for r in rows if r["quant"] == "fp32" and r["n"] == 1024]
    fit = [r for r in rows if r not in held]
    zero = {k: 0.0 for k in FREE}
    X = np.array([[pred(r, dict(zero, **{k: 1.0})) - pred(r, zero) for k in FREE] for r in fit])
    y = np.array([r["peak_bytes"] - pred(r, zero) for r in fit])
    use = [j for j in range(len(FREE)) if np.abs(X[:, j]).max() > 0]
    sol, *_ = np.linalg.lstsq(X[:, use], y, rcond=None)
    print("fitted:", {FREE[j]: round(float(v), 2) for j, v in zip(use, sol)})
    print("current:", {k: planner.COEFFS[k] for k in FREE})
    print()
    print("| bundle | n | m | predicted | measured | error | after open | teacher s | step s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p = pred(r)
        print(f"| {r['quant']} | {r['n']} | {r['m']} | {p / 2**20:.0f} MiB | {r['peak_bytes'] / 2**20:.0f} MiB | "
              f"{100 * (p / r['peak_bytes'] - 1):+.1f} % | {r['rss_open'] / 2**20:.0f} MiB | {r['t_teacher_s']} | "
              f"{r['t_step_s']} |" + (" (held out)" if r in held else ""))


if __name__ == "__main__":
    main()
