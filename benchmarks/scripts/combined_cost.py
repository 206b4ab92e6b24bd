"""One session over both graphs (combined.onnx, export/combined.py) against the two sessions of older bundles, on
one int8/int4 bundle, each way in a fresh process, alternating (benchmarks/planner.md section 0000):

    python benchmarks/scripts/combined_cost.py BUNDLE [--repeats 2] [--rounds 2] --out FILE.jsonl

`--ways combined,combined-noarena`: the combined session with the profile's CPU arena, then without it (ONNX
Runtime then allocates with malloc; planner.md section 00000). Several bundles: one after the other per repeat.

Per process (one JSON line): resident memory right after opening the Model (VmRSS, RssAnon), opening seconds,
greedy decode tokens/s (64 new tokens after a 256-token prompt, median of 3), then `--rounds` absorption rounds
of 1994-Clinton-1 at the bundle's window (seconds, first/last loss of each), and the process's peak RSS (VmHWM).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _status() -> dict:
    with open("/proc/self/status") as f:
        return {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith(("VmRSS", "RssAnon", "VmHWM"))}


def one(bundle: str, combined: bool, rounds: int, arena: bool = True) -> dict:
    import dataclasses

    from absorber.data import DEFAULT_SPEECH, speech
    from absorber.devices.profiles import default_profile
    from absorber.runtime import Model, Stream
    profile = default_profile()
    profile = profile if arena else dataclasses.replace(profile, enable_cpu_mem_arena=False)
    t0 = time.perf_counter()
    model = Model.open(bundle, combined=combined, profile=profile)
    opened = time.perf_counter() - t0
    after_open = _status()
    s = Stream(model)
    ids = model.encode(speech(DEFAULT_SPEECH).text())
    prompt = ids[:256]
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        out = s.generate_ids(prompt, 64, stop_at_eos=False)
        rates.append(len(out) / (time.perf_counter() - t))
    rec = {"bundle": bundle, "combined": model.sessions.combined is not None, "arena": arena,
           "profile": profile.name, "open_s": round(opened, 2),
           "rss_after_open_kb": after_open["VmRSS"], "anon_after_open_kb": after_open["RssAnon"],
           "decode_tok_s": round(statistics.median(rates), 1), "n": s.cfg.n, "m": s.cfg.m, "k": s.cfg.k,
           "rounds": []}
    feed = ids[: s.cfg.n * rounds + s.cfg.m]
    for r in s.feed_tokens(feed):
        rec["rounds"].append({"round_s": round(r.seconds, 2), "loss_first": r.loss_first, "loss_last": r.loss_last})
    rec["vmhwm_kb"] = _status()["VmHWM"]
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="+")
    ap.add_argument("--ways", default="combined,separate",
                    help="comma-separated: combined, separate, combined-noarena")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", choices=["combined", "separate", "combined-noarena"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.bundle[0], a.child != "separate", a.rounds, arena=a.child != "combined-noarena")),
              flush=True)
        return
    with open(a.out, "a") as f:
        for _ in range(a.repeats):
            for bundle in a.bundle:
                for mode in a.ways.split(","):
                    r = subprocess.run([sys.executable, __file__, bundle, "--rounds", str(a.rounds), "--out", a.out,
                                        "--child", mode], capture_output=True, text=True, check=True)
                    line = r.stdout.strip().splitlines()[-1]
                    print(line, flush=True)
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
