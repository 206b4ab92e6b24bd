"""Two variants' specific retention of the same planted facts, and their paired difference with a 95 % bootstrap
interval over facts (the same resampled facts for both): is one setting's retention lower than another's beyond
the spread of the facts? (benchmarks/retention.md, "Fewer steps").

    python benchmarks/scripts/retention_paired.py --distances 1,2,4,8 \
        "lr 6e-4 K=8=benchmarks/retention_screen_shipped_k8_s0.json::ntp_weight=1/lr=0.0006/k=8 (mix 0.01)" \
        "lr 3e-4 K=16=benchmarks/retention_screen_shipped_mix_d16_s0.json::ntp_weight=1/lr=0.0003 (mix 0.01)"

Each argument is LABEL=FILE::VARIANT[;FILE::VARIANT...] (several files: pooled over their speeches, as
retention_plot.py pools a label). Records pair by (speech, fact, distance); a fact that one side lacks at a
distance is left out there (a shorter screen), and the pairs used are counted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absorber.evaluate import percentile_interval  # noqa: E402
from absorber.retention import specific_retention  # noqa: E402


def records(spec: str) -> tuple[str, dict[tuple, dict]]:
    eq = spec.rindex("=", 0, spec.index("::"))       # the label may hold "=" itself ("K=8"); the file does not
    label, rest = spec[:eq], spec[eq + 1:]
    out: dict[tuple, dict] = {}
    for part in rest.split(";"):
        path, _, variant = part.partition("::")
        data = json.loads(Path(path).read_text())
        if variant not in data["methods"]:
            raise SystemExit(f"{path}: no variant {variant!r} (has: {', '.join(data['methods'])})")
        for r in data["methods"][variant]["records"]:
            out[(r["text"], r["fact"], r["distance"])] = r
    return label, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="LABEL=FILE::VARIANT[;FILE::VARIANT...]")
    ap.add_argument("b", help="LABEL=FILE::VARIANT[;FILE::VARIANT...] (the same facts)")
    ap.add_argument("--distances", default="1,2,4,8")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args(argv)
    (la, ra), (lb, rb) = records(a.a), records(a.b)
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
        ci = percentile_interval(diff, len(keys), a.bootstrap, a.seed)
        rows.append({"distance": d, "facts": len(keys), "a": sa, "b": sb, "diff": sa - sb, "ci95": ci})
        ci_s = f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "–"
        print(f"| {d} | {len(keys)} | {sa:.2f} | {sb:.2f} | **{sa - sb:+.2f}** {ci_s} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"a": a.a, "b": a.b, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
