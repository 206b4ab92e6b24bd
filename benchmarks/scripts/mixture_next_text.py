"""Next-text R (plain and on key tokens) under the online mixture of the adapted and the base model, rebuilt
from `absorber eval` records that hold per-token NLLs (benchmarks/retention.md, "The online mixture").

    python benchmarks/scripts/mixture_next_text.py benchmarks/eval_shipped_read07.json \
        benchmarks/eval_shipped_read_scales.json --json benchmarks/mixture_next_text.json

The records score each segment after the window twice: the adapted model ("absorber", per-token NLLs) and the
base model on the same window ("window"). The "mixed" rows learn the mixture's weight over the scored segment
alone, from the prior 1/2 at its first token (absorber.mixture.Mixture, share absorber.mixture.SHARE or --shares): a lower
bound of what the runtime's mixture does, which learns it over the window before the segment too. A run with
`absorber eval --mix` holds that one as run ("as run") and the adapters alone beside it (`nll_unmixed`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def runs_of(doc: dict) -> list[tuple[str, dict]]:
    """(label, eval result) per run of an eval JSON (a plain run or a --sweep)."""
    if "sweep" in doc:
        return [("/".join(f"{k}={v:g}" for k, v in x["point"].items()), x) for x in doc["sweep"]]
    lr = doc["settings"]["absorber"]["lr"]
    return [(f"lr={lr:g}", doc)]


def mixed_rows(segments: dict, shares: list[float]) -> dict[str, list[dict]]:
    from absorber.evaluate import read_at
    from absorber.mixture import Mixture
    out = {"window": segments["window"], "full": segments["full"]}
    win = segments["window"]
    base_recs = segments["absorber"]
    if base_recs and "token_nll_unmixed" in base_recs[0]:    # a run with --mix: scored under the mixture, the
        out["absorber (as run: mixed, weight from the window on)"] = base_recs     # adapters alone beside it
        base_recs = [dict(r, nll=r["nll_unmixed"], token_nll=r["token_nll_unmixed"]) for r in base_recs]
    scales = sorted({k[len("token_nll_read"):] for r in base_recs for k in r if k.startswith("token_nll_read")})
    variants = [("", base_recs)] + [(f" (read x{s})", read_at(base_recs, float(s))) for s in scales if s != "1"]
    for tag, recs in variants:
        out["absorber" + tag] = recs
        for share in shares:
            mixed = []
            for r, w in zip(recs, win):
                lm = Mixture(share).run([-x for x in r["token_nll"]], [-x for x in w["token_nll"]])
                toks = [-float(v) for v in lm]
                mixed.append({"nll": sum(toks), "count": len(toks), "token_nll": toks})
            out["absorber" + tag + f" mixed (share {share:g})"] = mixed
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("evals", nargs="+", help="absorber eval JSON files with per-token NLLs")
    p.add_argument("--shares", default=None, help="the mixture's fixed shares, comma-separated (default: "
                                                  "absorber.mixture.SHARE)")
    p.add_argument("--json", dest="json_out")
    a = p.parse_args(argv)
    from absorber.evaluate import EvalSettings, summarize
    from absorber.mixture import SHARE
    settings = EvalSettings()
    shares = [float(x) for x in a.shares.split(",")] if a.shares else [SHARE]
    table = ["| eval | run | method | R [95% CI] | key-token R [95% CI] |", "|---|---|---|---|---|"]
    res = {"command": "python benchmarks/scripts/mixture_next_text.py " + " ".join(argv or sys.argv[1:]),
           "shares": shares, "runs": []}
    for f in a.evals:
        for label, run in runs_of(json.loads(Path(f).read_text())):
            segs = {m: [r for t in run["segments"][m].values() for r in t] for m in ("window", "full", "absorber")}
            summ = summarize(mixed_rows(segs, shares), {}, settings)
            for mth, d in summ.items():
                if not mth.startswith("absorber"):
                    continue
                ci, kci = d.get("recovered_fraction_ci95"), d.get("key_recovered_fraction_ci95")
                fmt = lambda v, c: f"{v:.2f}" + (f" [{c[0]:.2f}, {c[1]:.2f}]" if c else "")  # noqa: E731
                table.append(f"| {Path(f).name} | {label} | {mth} | {fmt(d['recovered_fraction'], ci)} | "
                             f"{fmt(d['key_recovered_fraction'], kci)} |")
                res["runs"].append({"eval": Path(f).name, "run": label, "method": mth,
                                    **{k: d.get(k) for k in ("recovered_fraction", "recovered_fraction_ci95",
                                                             "key_recovered_fraction", "key_recovered_fraction_ci95",
                                                             "ppl", "key_ppl", "segments", "tokens_scored")}})
    print("\n".join(table))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
