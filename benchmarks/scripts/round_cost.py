"""Seconds, tokens absorbed per second and peak RSS of whole absorption rounds in the torch-free runtime, at a
bundle's own window (two rounds of 1994-Clinton-1, one JSON line per round, then VmHWM):

    python benchmarks/scripts/round_cost.py BUNDLE [--profile laptop-cpu]

Used for the cost of the next-token term (benchmarks/retention.md, last section): run it once per bundle, in one
session, one after the other.
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--profile", default="laptop-cpu")
    a = ap.parse_args()
    from absorber.data import DEFAULT_SPEECH, speech
    from absorber.runtime import Stream
    s = Stream.open(a.bundle, profile=a.profile)
    ids = s.model.encode(speech(DEFAULT_SPEECH).text())[: s.cfg.n * 2 + s.cfg.m]
    t0 = time.perf_counter()
    for r in s.feed_tokens(ids):
        print(json.dumps({"bundle": a.bundle, "ntp_weight": s.ntp_weight, "n": s.cfg.n, "m": s.cfg.m, "k": s.cfg.k,
                          "round_s": round(r.seconds, 2), "teacher_s": round(r.teacher_seconds, 2),
                          "train_s": round(r.train_seconds, 2), "loss_first": r.loss_first,
                          "loss_last": r.loss_last, "tok_per_s": round(s.cfg.n / r.seconds, 1)}), flush=True)
    with open("/proc/self/status") as f:
        hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM")), None)
    print(json.dumps({"bundle": a.bundle, "vmhwm_kb": hwm, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
