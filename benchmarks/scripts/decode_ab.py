"""Decode speed of several bundles against the length of the context, alternating in ONE process (benchmarks/decode.md):

    python benchmarks/scripts/decode_ab.py BUNDLE_A BUNDLE_B [--lengths 8,256,1024] [--reps 5] [--separate] --out F

Each bundle is opened once (the shipped way: one session over combined.onnx where the bundle has it; --separate,
or `BUNDLE@separate` for one of them: the two sessions); then for each context length L, `--reps` times in turn
for each bundle: Stream.generate_ids over the stream's initial adapters with a prompt of L token ids and 33
greedy tokens; the rate of one repetition is 1 / the median seconds between consecutive tokens after the first
(32 decoder calls, each with the Python around it). Alternating within one process puts the bundles on the same
machine state (this VM's speed drifts by 10-30 % between runs minutes apart). One JSON line per bundle and length.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--lengths", default="8,256,1024")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=32, help="tokens generated per repetition")
    ap.add_argument("--separate", action="store_true", help="two sessions instead of combined.onnx")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the bundles' hash check (the timing-only variants of decode_variants.py)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from absorber.devices.machine import cpu_info
    from absorber.devices.profiles import default_profile
    from absorber.runtime import Model, Stream
    profile = default_profile()      # what Model.open uses without one, named here for the record
    specs = [(b.removesuffix("@separate"), a.separate or b.endswith("@separate")) for b in a.bundles]
    models = [Model.open(b, combined=not sep, verify_hashes=not a.no_verify, profile=profile) for b, sep in specs]
    streams = [Stream(m) for m in models]
    with open(a.out, "a") as f:
        for L in (int(x) for x in a.lengths.split(",")):
            rates: dict[int, list[float]] = {i: [] for i in range(len(models))}
            for _ in range(a.reps):
                for i, s in enumerate(streams):
                    marks: list[float] = []          # after the prompt's call, then after each decoder call
                    s.generate_ids(list(range(1000, 1000 + L)), a.new + 1, stop_at_eos=False,
                                   on_token=lambda _t, marks=marks: marks.append(time.perf_counter()))
                    steps = [b - c for c, b in zip(marks, marks[1:])]
                    rates[i].append(round(1.0 / statistics.median(steps), 1))
            for i, (b, sep) in enumerate(specs):
                rec = {"bundle": b, "combined": not sep, "context": L, "new_tokens": a.new,
                       "decode_tok_s": statistics.median(rates[i]), "reps": rates[i],
                       "profile": profile.name, "threads": profile.threads, "isa": cpu_info()["isa"]}
                f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
