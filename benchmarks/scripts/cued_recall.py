"""Stored or not extractable? A fact asked by its own sentence's words against the question (benchmarks/retention.md,
"Stored but not asked for").

The forgetting curve asks each planted fact by a question worded differently from its sentence: retention there
needs the fact stored in the adapters *and* reachable from other words. A screen run with --cued
(RetentionSettings.cued) also scores every fact, at the same rounds and on the same adapters, after its own
sentence's words up to the answer ("\\nThe new commission on fairness will be chaired by" -> " Judge Imelda
Farrow"), with its decoy under the same cue, per answer token: window, full (the passage in context), the
adapters alone and the mixture; --recite and --restate record the question after a recitation or a lead-in the
model writes (fields "recited", "restated"). This reports retention, decoy lift and specific retention under every
recorded prompt per distance, with 95 % bootstrap intervals over facts, the difference to the question's paired over
facts, and with --first-token where the names' NLL is under each prompt: their first token against the rest.

    python benchmarks/scripts/cued_recall.py --distances 1,2,4,8 --first-token \\
        "shipped=benchmarks/retention_cued_shipped_replay_s0.json::ntp_weight=1/lr=0.001/k=8/replay=8/replay_steps=4"

Arguments: LABEL=FILE::VARIANT (the screen's variant, unscored); the same LABEL over several files pools them.
--reading: the mixture's record suffix the method reads through ("_mix0.01w128", the shipped reading), or "alone".
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from absorber.evaluate import percentile_interval  # noqa: E402
from absorber.retention import (asked_record, bootstrap_ci, decoy_lift, retention,  # noqa: E402
                                specific_retention)
from mixture_answer_rules import NAMES  # noqa: E402
from retention_plot import pooled  # noqa: E402


def as_question(rec: dict, reading: str) -> dict:
    """The record as the question scored it, the method read through `reading`."""
    if reading == "alone":
        a, b = rec["mix_trace"]["answer"][0], rec["mix_trace"]["decoy"][0]
        return dict(rec, nll_method=-sum(a), nll_method_decoy=-sum(b))
    return dict(rec, nll_method=rec["nll_method" + reading], nll_method_decoy=rec["nll_method_decoy" + reading])


# the other prompts a screen may record beside the question: (row label, record field)
FIELDS = (("cue", "cued"), ("recited", "recited"), ("restated", "restated"))


def as_cued(rec: dict, reading: str, field: str = "cued") -> dict:
    """The record as the cue (field "cued"), the recitation ("recited") or the lead-in ("restated") asked it, the
    method read through `reading` (retention.asked_record)."""
    return asked_record(rec, field, "alone" if reading == "alone" else "method" + reading)


def paired_ci(a: list[dict], b: list[dict], draws: int) -> tuple[float, float] | None:
    """95 % bootstrap interval of specific(a) - specific(b), the same facts (text, fact) drawn for both."""
    keys = sorted({(r.get("text"), r["fact"]) for r in a})
    ga = {k: [r for r in a if (r.get("text"), r["fact"]) == k] for k in keys}
    gb = {k: [r for r in b if (r.get("text"), r["fact"]) == k] for k in keys}
    return percentile_interval(lambda idx: specific_retention([x for i in idx for x in ga[keys[i]]])
                               - specific_retention([x for i in idx for x in gb[keys[i]]]), len(keys), draws, 0)


def first_token_row(recs: list[dict], reading: str, field: str = "cued") -> dict:
    """Names under the cue (or the recitation), summed: the first answer token's NLL and the rest's, per
    condition."""
    key = "alone" if reading == "alone" else "method" + reading
    row = {"facts": len(recs)}
    for who, k in (("window", "window"), ("full", "full"), ("method", key)):
        row[who] = {"first": sum(r[field][k][0] for r in recs), "rest": sum(sum(r[field][k][1:]) for r in recs)}
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=FILE::VARIANT")
    p.add_argument("--reading", default="_mix0.01w128", help="the method's reading: a mixture's record suffix, or "
                   "'alone' (the adapters without the mixture)")
    p.add_argument("--distances", default="1,2,4,8")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--first-token", action="store_true", help="also the names' first answer token against the rest, "
                   "under every recorded prompt but the question")
    p.add_argument("--json", dest="json_out")
    a = p.parse_args(argv)
    rows, first = [], []
    print("| run | prompt | d | facts | window / method / full (summed NLL) | retention | decoy lift | "
          "specific [95% CI] | names: specific | specific − the question's [95% CI] |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, e in pooled(a.runs).items():
        recs = e["records"]
        prompts = [("question", as_question)] + [
            (name, lambda r, rd, f=field: as_cued(r, rd, f)) for name, field in FIELDS
            if all(field in r for r in recs)]
        if len(prompts) == 1:
            raise SystemExit(f"{label}: records with no other prompt than the question: run the screen with --cued, "
                             "--recite or --restate")
        for d in (int(x) for x in a.distances.split(",")):
            sub = [r for r in recs if r["distance"] == d]
            asked = [as_question(r, a.reading) for r in sub]
            for prompt, conv in prompts:
                got = [conv(r, a.reading) for r in sub]
                names = [g for g in got if g["kind"] in NAMES]
                ci = bootstrap_ci(got, a.bootstrap, 0, stat=specific_retention)
                row = {"run": label, "prompt": prompt, "distance": d, "facts": len(got),
                       "nll": [sum(g[k] for g in got) for k in ("nll_window", "nll_method", "nll_full")],
                       "retention": retention(got), "decoy_lift": decoy_lift(got),
                       "specific": specific_retention(got), "specific_ci95": ci,
                       "names_specific": specific_retention(names) if names else None}
                if prompt != "question":
                    row["minus_question"] = row["specific"] - specific_retention(asked)
                    row["minus_question_ci95"] = paired_ci(got, asked, a.bootstrap)
                rows.append(row)
                ci_s = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
                ns = f"{row['names_specific']:.2f}" if names else "–"
                pq = ""
                if "minus_question" in row:
                    pc = row["minus_question_ci95"]
                    pq = f"{row['minus_question']:+.2f}" + (f" [{pc[0]:+.2f}, {pc[1]:+.2f}]" if pc else "")
                print(f"| {label} | {prompt} | {d} | {len(got)} | " + " / ".join(f"{x:.1f}" for x in row["nll"])
                      + f" | {row['retention']:.2f} | {row['decoy_lift']:+.2f} | {row['specific']:.2f}{ci_s} | {ns} "
                      f"| {pq} |")
            names = [r for r in sub if r["kind"] in NAMES]
            for prompt, field in FIELDS:
                if a.first_token and names and all(field in r for r in recs):
                    first.append({"run": label, "prompt": prompt, "distance": d,
                                  **first_token_row(names, a.reading, field)})
    if first:
        print("\n| run | prompt | d | names | window: first / rest | full: first / rest | method: first / rest |")
        print("|---|---|---|---|---|---|---|")
        for row in first:
            print(f"| {row['run']} | {row['prompt']} | {row['distance']} | {row['facts']} | " + " | ".join(
                f"{row[w]['first']:.1f} / {row[w]['rest']:.1f}" for w in ("window", "full", "method")) + " |")
    if a.json_out:
        args = argv if argv is not None else sys.argv[1:]     # quoted: the labels hold spaces
        Path(a.json_out).write_text(json.dumps({"command": shlex.join(["python", "benchmarks/scripts/cued_recall.py",
                                                                       *args]),
                                                "reading": a.reading, "rows": rows, "first_token": first}, indent=1))


if __name__ == "__main__":
    main()
