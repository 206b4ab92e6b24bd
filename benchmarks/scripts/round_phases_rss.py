"""Resident memory around each phase of the torch-free runtime's absorption rounds (benchmarks/planner.md section
00000): VmRSS before and after the teacher pass, the train steps and the final loss evaluation, and the process's
peak (VmHWM) after each round, two rounds of 1994-Clinton-1 at the bundle's window:

    python benchmarks/scripts/round_phases_rss.py BUNDLE [PROFILE]      (ARENA=0: the profile without its arena)

Raw lines of the Gemma-3-270M runs: benchmarks/gemma_head_pieces.json.
"""
import dataclasses
import os
import sys

from absorber.data import DEFAULT_SPEECH, speech
from absorber.devices.profiles import get_profile
from absorber.runtime import Stream


def status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith(key))


def main() -> None:
    bundle = sys.argv[1]
    profile = get_profile(sys.argv[2] if len(sys.argv) > 2 else "laptop-cpu")
    if os.environ.get("ARENA") == "0":
        profile = dataclasses.replace(profile, enable_cpu_mem_arena=False)
    print("start", status("VmRSS"))
    s = Stream.open(bundle, profile=profile)
    print("open", status("VmRSS"))
    ids = s.model.encode(speech(DEFAULT_SPEECH).text())[: s.cfg.n * 2 + s.cfg.m]

    def wrap(name: str) -> None:
        f = getattr(s, name)

        def g(*a, **k):
            r0 = status("VmRSS")
            out = f(*a, **k)
            print(f"  {name}: before {r0:.0f} peak so far {status('VmHWM'):.0f} after {status('VmRSS'):.0f}",
                  flush=True)
            return out
        setattr(s, name, g)
    for n in ("_teacher", "_steps", "_eval_loss"):
        wrap(n)
    for r in s.feed_tokens(ids):
        print("round", round(r.seconds, 1), r.loss_first, r.loss_last, "rss", status("VmRSS"), "hwm",
              status("VmHWM"), flush=True)


if __name__ == "__main__":
    main()
