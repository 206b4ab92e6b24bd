"""Two variants' specific retention of the same planted facts, and their paired difference with a 95 % bootstrap
interval over facts (the same resampled facts for both): is one setting's retention lower than another's beyond
the spread of the facts? (benchmarks/retention.md, "Fewer steps").

    mapfile -t A < <(grep -v '^#' benchmarks/retention_k8_args.txt)
    python benchmarks/scripts/retention_paired.py --distances 1,2,4,8 \
        --a "lr 1e-3 K 8, share 0.01" --b "lr 3e-4 K 16, share 0.01 (the bundles' default)" "${A[@]}"

The arguments are retention_plot.py's: LABEL=FILE::VARIANT, the same LABEL pooled over files (speeches); --a and
--b name two of the labels (default: the first two). Records pair by (speech, fact, distance); a fact that one side
lacks at a distance is left out there (a shorter screen), and the pairs used are counted. With --first-speech a
concatenated stream (retention_screen.py --concat: "A+B") pairs with a screen of its first speech A alone: until A
ends the two streams are the same tokens, and a screen of A alone has no records past its end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from absorber.evaluate import percentile_interval  # noqa: E402
from absorber.retention import specific_retention  # noqa: E402
from retention_plot import pooled  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="LABEL=FILE::VARIANT (same LABEL: pooled)")
    ap.add_argument("--a", help="the first label (default: the first given)")
    ap.add_argument("--b", help="the second label (default: the second given)")
    ap.add_argument("--distances", default="1,2,4,8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--first-speech", action="store_true",
                    help="pair records by the first speech of a concatenated stream (A+B as A)")
    a = ap.parse_args(argv)
    pools = pooled(a.specs)
    labels = list(pools)
    la, lb = a.a or labels[0], a.b or (labels[1] if len(labels) > 1 else None)
    if la not in pools or lb not in pools:
        raise SystemExit(f"--a / --b must name two of the labels: {labels}")
    text = (lambda t: t.split("+")[0]) if a.first_speech else (lambda t: t)
    ra, rb = ({(text(r["text"]), r["fact"], r["distance"]): r for r in pools[x]["records"]} for x in (la, lb))
    draws = pools[la]["bootstrap"]
    rows = []
    print(f"| distance | facts | {la} | {lb} | {la} − {lb} [95% CI, paired over facts] |\n|---|---|---|---|---|")
    for d in (int(x) for x in a.distances.split(",")):
        keys = sorted(k for k in ra if k[2] == d and k in rb)
        if len(keys) < 2:
            print(f"| {d} | {len(keys)} | – | – | – |")
            continue

        def diff(idx, keys=keys):
            return (specific_retention([ra[keys[i]] for i in idx])
                    - specific_retention([rb[keys[i]] for i in idx]))
        sa = specific_retention([ra[k] for k in keys])
        sb = specific_retention([rb[k] for k in keys])
        ci = percentile_interval(diff, len(keys), draws, a.seed)
        rows.append({"distance": d, "facts": len(keys), "a": sa, "b": sb, "diff": sa - sb, "ci95": ci})
        ci_s = f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "–"
        print(f"| {d} | {len(keys)} | {sa:.2f} | {sb:.2f} | **{sa - sb:+.2f}** {ci_s} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"a": la, "b": lb, "specs": a.specs, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
