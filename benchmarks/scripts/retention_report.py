"""Rebuild the forgetting-curve table of benchmarks/retention.md from the raw records of a screen.

Screens run since the decoy control landed also get the specific retention per distance (retention less the
decoy lift: absorber/retention.py); those since 2026-12-04 also the in-context reference of the damage (the
held-out tokens after the method's window, base model).

    python benchmarks/scripts/retention_report.py benchmarks/retention_screen.json
    python benchmarks/scripts/retention_report.py --rounds A.json B.json …    (held-out PPL change per round)
"""
from __future__ import annotations

import json
import math
import sys


def by_round(paths: list[str]) -> int:
    """One row per round, one column per method of each file: the held-out perplexity change under the adapters
    against the frozen model (exp of the mean NLL difference, minus 1)."""
    cols, rows = [], {}
    for path in paths:
        for label, v in json.load(open(path))["methods"].items():
            cols.append(f"{label} ({path.rsplit('/', 1)[-1]})")
            for r in v.get("damage_records") or []:
                rows.setdefault(r["round"], {})[cols[-1]] = math.exp((r["nll_method"] - r["nll_base"]) / r["count"]) - 1
    print("| round | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for k in sorted(rows):
        print(f"| {k} | " + " | ".join(f"{rows[k][c]:+.1%}" if c in rows[k] else "–" for c in cols) + " |")
    return 0


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    if argv and argv[0] == "--rounds":
        return by_round(argv[1:])
    d = json.load(open(argv[0]))
    ds = d["settings"]["distances"]
    print(f"Texts: {', '.join(d['texts'])}; {d['settings']['facts']} facts per text in the first "
          f"{d['settings']['plant_rounds']} rounds; held-out speech for damage: {d['heldout']}"
          + (" (partial: a run was still going)" if d.get("partial") else ""))
    print()
    has_decoys = any("specific" in c for v in d["methods"].values() for c in v["curve"])
    print("| variant | " + " | ".join(f"retention d={x} [95% CI]" for x in ds)
          + " | sync loss first→last | s/round | held-out PPL change (end / worst) |"
          + (" " + " | ".join(f"specific d={x} [95% CI]" for x in ds) + " |" if has_decoys else ""))
    print("|---|" + "---|" * (len(ds) + 3 + (len(ds) if has_decoys else 0)))
    for label, v in d["methods"].items():
        cells = []
        for c in v["curve"]:
            ci = c["ci95"]
            r = c["retention"]
            cells.append("–" if r is None else f"{r:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        dm = v.get("damage") or {}
        end, worst = dm.get("ppl_change_at_end"), dm.get("ppl_change_worst")
        dmg = "–" if end is None else f"{end:+.1%} / {worst:+.1%}"
        if dm.get("ppl_change_context_at_end") is not None:   # the same tokens after the window, base model
            dmg += f" (window in context: {dm['ppl_change_context_at_end']:+.1%})"
        losses = v.get("losses") or {}
        lf, ll, sec = losses.get("first"), losses.get("last"), losses.get("seconds")
        lcell = "–" if lf is None else f"{lf:.3f}→{ll:.3f}"
        scell = "–" if sec is None else f"{sec:.1f}"
        spec = []
        for c in v["curve"]:
            sp, ci = c.get("specific"), c.get("specific_ci95")
            spec.append("–" if sp is None or sp != sp else f"{sp:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        print(f"| {label} | " + " | ".join(cells) + f" | {lcell} | {scell} | {dmg} |"
              + (" " + " | ".join(spec) + " |" if has_decoys else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
