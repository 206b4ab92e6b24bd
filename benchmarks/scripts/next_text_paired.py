"""Two methods' next-text R (plain and on key tokens) on the same segments, and their paired difference with a 95 %
bootstrap interval over segments (the same resampled segments for both): is one setting's R lower than another's,
beyond the spread of the segments? (benchmarks/retention.md, "A larger share").

    python benchmarks/scripts/next_text_paired.py \
        "default=benchmarks/eval_shipped_read_scales.json::lr=0.0001::absorber" \
        "lr 3e-4, share 0.01=benchmarks/eval_shipped_lr3_mix001.json::lr=0.0003::absorber (as run: mixed, weight from the window on)"

Each argument is LABEL=FILE::RUN::METHOD: RUN as mixture_next_text.py names a run of an `absorber eval` JSON (lr=…
or a --sweep point), METHOD one of its methods as mixture_next_text.py lists them (e.g. "absorber", "absorber mixed
(share 0.01)": the mixture learned over the segment alone, rebuilt from per-token records). The window and full
records come from the first argument; the second's must be the same segments (checked).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load(spec: str, shares: list[float]) -> tuple[str, dict]:
    from mixture_next_text import mixed_rows, runs_of
    eq = spec.rindex("=", 0, spec.index("::"))       # the label may hold "=" itself ("K=8"); the file does not
    label, rest = spec[:eq], spec[eq + 1:]
    f, run, method = rest.split("::")
    for name, r in runs_of(json.loads(Path(f).read_text())):
        if name == run:
            segs = {m: [x for t in r["segments"][m].values() for x in t] for m in ("window", "full", "absorber")}
            rows = mixed_rows(segs, shares)
            if method not in rows:
                raise SystemExit(f"{spec}: no method {method!r} (have {sorted(rows)})")
            return label, {"window": rows["window"], "full": rows["full"], "method": rows[method]}
    raise SystemExit(f"{spec}: no run {run!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="LABEL=FILE::RUN::METHOD")
    p.add_argument("b", help="LABEL=FILE::RUN::METHOD (the same segments)")
    p.add_argument("--shares", default="0.001,0.01,0.03,0.1", help="shares to rebuild offline mixtures at")
    p.add_argument("--json", dest="json_out")
    a = p.parse_args(argv)
    from absorber.evaluate import EvalSettings, bootstrap, key_tokens, ppl, recovered_fraction, summarize
    shares = [float(x) for x in a.shares.split(",")]
    (la, A), (lb, B) = load(a.a, shares), load(a.b, shares)
    for k in ("window", "full"):
        if [r["count"] for r in A[k]] != [r["count"] for r in B[k]] or \
                max(abs(x["nll"] - y["nll"]) for x, y in zip(A[k], B[k])) > 1e-3 * max(1.0, abs(A[k][0]["nll"])):
            raise SystemExit(f"the two runs' {k} records differ: not the same segments")
    s = EvalSettings()
    segs = {"window": A["window"], "full": A["full"], "A": A["method"], "B": B["method"]}
    summ = summarize(segs, {}, s)
    r = lambda m: (lambda p: recovered_fraction(ppl(*p["window"]), ppl(*p[m]), ppl(*p["full"])))  # noqa: E731
    diff = lambda p: r("A")(p) - r("B")(p)                                                         # noqa: E731
    out = {"command": "python benchmarks/scripts/next_text_paired.py " + " ".join(argv or sys.argv[1:]),
           "a": la, "b": lb, "segments": len(A["method"])}
    keyed = key_tokens(segs, s)
    for kind, recs in (("plain", segs), ("key tokens", keyed)):
        ci = bootstrap(recs, diff, "nll", "count", s.bootstrap, s.seed)
        ka = "recovered_fraction" if kind == "plain" else "key_recovered_fraction"
        ra, rb = summ["A"][ka], summ["B"][ka]
        out[kind] = {"a": ra, "b": rb, "a_minus_b": ra - rb, "ci95": ci}
        print(f"{kind:>10}: R {la} {ra:.3f}, {lb} {rb:.3f}; {la} - {lb} = {ra - rb:+.3f} "
              f"[{ci[0]:+.3f}, {ci[1]:+.3f}] (paired bootstrap over {len(A['method'])} segments)")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
