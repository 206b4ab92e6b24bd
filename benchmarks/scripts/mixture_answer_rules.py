"""How the online mixture reads an answer, and where an answer's NLL is, scored offline from a retention screen's
traces (benchmarks/retention.md, "Where a kept name is lost").

The mixture (absorber/mixture.py) learns the adapted model's weight w over the prompt with a fixed share s passed
between the two models after every token, and goes on the same way over the answer's tokens. This rebuilds every
record's answer and decoy NLL under other rules over the answer (another share over its tokens only, none, the
adapters alone), from the log-weights the answer starts from and its tokens' log-probabilities under both models (a
screen run with --mix-trace), and reports retention, decoy lift and specific retention per distance with 95 %
bootstrap intervals over facts, each rule paired against the rule the screen ran. With --first-token, where the
answers' NLL is: their first token against the rest, for names and for numbers:

    python benchmarks/scripts/mixture_answer_rules.py --distances 1,2,4,8 \\
        "lr 2e-3=benchmarks/retention_trace_lr2e3_replay_s0.json::ntp_weight=1/lr=0.002/k=8/replay=8/replay_steps=4"

Arguments: LABEL=FILE::VARIANT (the screen's variant name, unscored: the traces sit on its own records); the same
LABEL over several files pools them (speeches). Rules: "share S" (the share over the answer, the start as run),
"alone" (the adapters alone), "base" (the base model alone: the window).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from absorber.mixture import Mixture  # noqa: E402
from absorber.retention import bootstrap_ci, decoy_lift, retention, specific_retention  # noqa: E402
from retention_plot import pooled  # noqa: E402


def load(specs: list[str], suffix: str) -> dict[str, list[dict]]:
    """Per label the pooled records (retention_plot.pooled), each checked for a trace of the mixture `suffix`."""
    out = {}
    for label, e in pooled(specs).items():
        for rec in e["records"]:
            starts = rec.get("mix_trace", {}).get("start", {})
            if suffix not in starts:
                raise SystemExit(f"{label}: a record has no trace for {suffix} (has {sorted(starts) or 'none'}: run "
                                 f"the screen with --mix-trace and that share and window)")
        out[label] = e["records"]
    return out


def scored(rec: dict, rule: str, suffix: str) -> dict:
    """The record with its method NLLs (answer and decoy) rebuilt under `rule`."""
    tr = rec["mix_trace"]
    (la, lb), (lda, ldb) = tr["start"][suffix]
    nll = []
    for (l_a, l_b), toks in (((la, lb), tr["answer"]), ((lda, ldb), tr["decoy"])):
        a, b = toks
        if rule == "alone":
            nll.append(-sum(a))
        elif rule == "base":
            nll.append(-sum(b))
        else:
            share = float(rule.split()[1])
            nll.append(-float(Mixture(share, la=l_a, lb=l_b).run(a, b).sum()))
    return dict(rec, nll_method=nll[0], nll_method_decoy=nll[1])


NAMES = ("role", "person", "place", "pet")


def first_token_rows(label: str, recs: list[dict], d: int, suffix: str, share: float) -> list[dict]:
    """Where the answers' NLL is, per group (names, numbers): summed over the group's facts at distance d, the
    first answer token's NLL and the rest's, under the base model (the window), the adapters alone and the
    mixture as run (`suffix`, `share`: its per-token NLLs rebuilt from the trace)."""
    out = []
    for group in ("names", "numbers"):
        sub = [r for r in recs if r["distance"] == d and (r["kind"] in NAMES) == (group == "names")]
        if not sub:
            continue
        row = {"run": label, "distance": d, "group": group, "facts": len(sub),
               "full": sum(r["nll_full"] for r in sub)}
        for who in ("base", "alone", "mixture"):
            first = rest = 0.0
            for r in sub:
                a, b = r["mix_trace"]["answer"]
                if who == "mixture":
                    la, lb = r["mix_trace"]["start"][suffix][0]
                    per = [-x for x in Mixture(share, la=la, lb=lb).run(a, b)]
                else:
                    per = [-x for x in (b if who == "base" else a)]
                first, rest = first + per[0], rest + sum(per[1:])
            row[who] = {"first": first, "rest": rest}
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=FILE::VARIANT")
    p.add_argument("--suffix", default="_mix0.01w128", help="the mixture the traces start from (as run)")
    p.add_argument("--rules", default="share 0.01,share 0,share 0.001,alone,base")
    p.add_argument("--distances", default="1,2,4,8")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--first-token", action="store_true", help="also where the answers' NLL is: the first answer "
                   "token against the rest, names and numbers (first_token_rows)")
    p.add_argument("--json", dest="json_out")
    a = p.parse_args(argv)
    rules = [r.strip() for r in a.rules.split(",")]
    asrun = f"share {float(a.suffix[4:].split('w')[0].split('ctx')[0]):g}"
    rows = []
    print("| run | rule | d | retention | decoy lift | specific [95% CI] | paired with the rule as run [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for label, recs in load(a.runs, a.suffix).items():
        for d in (int(x) for x in a.distances.split(",")):
            sub = [r for r in recs if r["distance"] == d]
            base_recs = [scored(r, asrun, a.suffix) for r in sub]
            for rule in rules:
                got = [scored(r, rule, a.suffix) for r in sub]
                ci = bootstrap_ci(got, a.bootstrap, 0, stat=specific_retention)
                pair = [dict(g, nll_method=g["nll_method"] - b["nll_method"] + b["nll_window"],
                             nll_method_decoy=g["nll_method_decoy"] - b["nll_method_decoy"] + b["nll_window_decoy"])
                        for g, b in zip(got, base_recs)]
                pci = bootstrap_ci(pair, a.bootstrap, 0, stat=specific_retention)
                row = {"run": label, "rule": rule, "distance": d, "facts": len(got), "retention": retention(got),
                       "decoy_lift": decoy_lift(got), "specific": specific_retention(got), "specific_ci95": ci,
                       "paired": specific_retention(pair), "paired_ci95": pci}
                rows.append(row)
                print(f"| {label} | {rule} | {d} | {row['retention']:.2f} | {row['decoy_lift']:+.2f} | "
                      f"{row['specific']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
                      f"{row['paired']:+.2f} [{pci[0]:+.2f}, {pci[1]:+.2f}] |")
    first = []
    if a.first_token:
        share = float(asrun.split()[1])
        print("\n| run | d | group | facts | full (summed) | base: first / rest | adapters alone: first / rest | "
              "mixture: first / rest |")
        print("|---|---|---|---|---|---|---|---|")
        for label, recs in load(a.runs, a.suffix).items():
            for d in (int(x) for x in a.distances.split(",")):
                for row in first_token_rows(label, recs, d, a.suffix, share):
                    first.append(row)
                    print(f"| {label} | {d} | {row['group']} | {row['facts']} | {row['full']:.1f} | "
                          + " | ".join(f"{row[w]['first']:.1f} / {row[w]['rest']:.1f}"
                                       for w in ("base", "alone", "mixture")) + " |")
    if a.json_out:
        args = argv if argv is not None else sys.argv[1:]     # quoted: the labels hold spaces
        Path(a.json_out).write_text(json.dumps({"command": shlex.join(["python", "benchmarks/scripts/"
                                                                       "mixture_answer_rules.py", *args]),
                                                "rows": rows, "first_token": first}, indent=1))


if __name__ == "__main__":
    main()
