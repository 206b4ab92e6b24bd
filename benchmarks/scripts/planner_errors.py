"""The planner's error on measured rounds, with the coefficients in devices/planner.py now (what a refit is
checked with; benchmarks/planner.md section 000000):

    python benchmarks/scripts/planner_errors.py ROWS.json int4=BUNDLE int8=BUNDLE [--key KEY]

ROWS.json: rows written by `python -m absorber.bench.calibrate --json` (a list, or a dict of lists: --key picks
one); each row's measured peak against `absorber.devices.planner.predict` on the bundle of its quant.
"""
import argparse
import json

from absorber.devices.planner import predict
from absorber.runtime.bundle import open_bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows")
    p.add_argument("bundles", nargs="+", help="quant=BUNDLE")
    p.add_argument("--key", default=None)
    a = p.parse_args()
    rows = json.load(open(a.rows))
    if isinstance(rows, dict):
        rows = rows[a.key] if a.key else [r for v in rows.values() for r in v]
    bundles = {q: open_bundle(path, verify_hashes=False) for q, path in (b.split("=", 1) for b in a.bundles)}
    print("| quant | n | m | k | measured MiB | predicted MiB | error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pred = predict(bundles[r["quant"]], r["n"], r["m"], r["k"]).peak_bytes
        print(f"| {r['quant']} | {r['n']} | {r['m']} | {r['k']} | {r['peak_bytes'] / 2**20:.1f} | "
              f"{pred / 2**20:.1f} | {pred / r['peak_bytes'] - 1:+.1%} |")


if __name__ == "__main__":
    main()
