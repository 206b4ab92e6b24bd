"""Which planted facts a variant keeps, by the kind of fact (benchmarks/retention.md, "What the facts kept are").

Retention is a ratio of sums over facts, (sum NLL_window - sum NLL_method) / (sum NLL_window - sum NLL_full), so a
fact weighs by its window-to-full gap: a name that the window alone cannot guess (a gap of 20-40 nats) counts ten
times a two-digit number (2-7 nats). This splits the pooled retention of each variant by the facts' kinds
(absorber/facts.py: role, person, place, pet, date, year, number) and by two groups, names (role, person, place,
pet) and numbers (number, year, date), with each group's share of the gap, its retention, its decoy lift and its
specific retention, and a 95 % bootstrap interval over the group's facts. With --order, each group is split again
by where the answer stands in the planted statement: before the words the question asks by ("My friend X will serve
as our new ambassador": answer first, the direction a causal model's next-token term does not train, the reversal
curse) or after them ("chaired by Judge X": cue first).

    mapfile -t A < <(grep -v '^#' benchmarks/retention_replay_args.txt)
    python benchmarks/scripts/retention_by_kind.py --distances 1,8 "${A[@]}"

Arguments are retention_plot.py's: LABEL=FILE::VARIANT, the same LABEL pooled over files (speeches).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from absorber.retention import bootstrap_ci, decoy_lift, retention, specific_retention  # noqa: E402
from retention_plot import pooled  # noqa: E402

GROUPS = {"names": ("role", "person", "place", "pet"), "numbers": ("number", "year", "date")}
# absorber/facts.py's templates (by index) whose statement puts the answer before the cue the question asks by:
# 2 "exactly {n} new factories", 3 "{p} will serve as our new ambassador", 5 "hired {n} new park rangers",
# 6 "thank {p}, a teacher ... in {town}"; the other nine name the cue first
ANSWER_FIRST = frozenset({2, 3, 5, 6})


def with_templates(e: dict) -> list[dict]:
    """A pooled label's records with each fact's template index, the facts rebuilt as the screen drew them
    (retention_plot.pooled's fact_draws); checked against the records' kinds."""
    from absorber import facts as FX
    drawn = {t: FX.make_facts(count, seed=seed) for t, (count, seed) in e["fact_draws"].items()}
    out = []
    for r in e["records"]:
        f = drawn[r["text"]][r["fact"]]
        if f.kind != r["kind"]:
            raise SystemExit(f"fact {r['fact']} of {r['text']} is not the rebuilt one ({f.kind}, not {r['kind']})")
        out.append(dict(r, template=f.template))
    return out


def _gap(records: list[dict]) -> float:
    return sum(r["nll_window"] - r["nll_full"] for r in records)


def rows(records: list[dict], distance: int, draws: int, seed: int, order: bool = False) -> list[dict]:
    """One row per kind and per group at one distance: facts, share of the gap, retention, decoy lift, specific
    (order: per group and the answer's place in the statement instead of per kind)."""
    sub = [r for r in records if r["distance"] == distance]
    total = _gap(sub)
    kinds = sorted({r["kind"] for r in sub})
    parts = [(k, (k,), None) for k in kinds] if not order else \
        [(f"{g}, {o}", ks, o) for g, ks in GROUPS.items() for o in ("answer first", "cue first")]
    parts += [(g, ks, None) for g, ks in GROUPS.items()] + [("all", tuple(kinds), None)]
    out = []
    for name, ks, o in parts:
        rs = [r for r in sub if r["kind"] in ks
              and (o is None or (r["template"] in ANSWER_FIRST) == (o == "answer first"))]
        if not rs:
            continue
        ci = bootstrap_ci(rs, draws, seed, stat=specific_retention)
        out.append({"distance": distance, "group": name, "facts": len(rs), "gap_share": _gap(rs) / total,
                    "retention": retention(rs), "decoy_lift": decoy_lift(rs), "specific": specific_retention(rs),
                    "specific_ci95": ci})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="LABEL=FILE::VARIANT (same LABEL: pooled)")
    ap.add_argument("--distances", default="1,8")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", action="store_true", help="split each group by the answer's place in the statement")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args(argv)
    dists = [int(x) for x in a.distances.split(",")]
    result = {}
    for label, e in pooled(a.specs).items():
        recs = with_templates(e) if a.order else e["records"]
        result[label] = [row for d in dists for row in rows(recs, d, a.draws, a.seed, a.order)]
        n = len(set(e["texts"]))
        print(f"\n{label} ({n} speech{'es' if n > 1 else ''})\n")
        print("| d | kind | facts | share of the gap | retention | decoy lift | **specific** [95% CI] |")
        print("|---|---|---|---|---|---|---|")
        for r in result[label]:
            ci = r["specific_ci95"]
            ci_s = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            bold = "**" if r["group"] in (*GROUPS, "all") else ""
            print(f"| {r['distance']} | {bold}{r['group']}{bold} | {r['facts']} | {r['gap_share']:.2f} | "
                  f"{r['retention']:.2f} | {r['decoy_lift']:.2f} | {bold}{r['specific']:.2f}{bold}{ci_s} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"specs": a.specs, "rows": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
