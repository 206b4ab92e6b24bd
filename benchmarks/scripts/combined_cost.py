"""One session over both graphs (combined.onnx, export/combined.py) against the two sessions of older bundles, on
one int8/int4 bundle, each way in a fresh process, alternating (benchmarks/planner.md section 0000):

    python benchmarks/scripts/combined_cost.py BUNDLE [--repeats 2] [--rounds 2] --out FILE.jsonl

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


def one(bundle: str, combined: bool, rounds: int) -> dict:
    from absorber.data import DEFAULT_SPEECH, speech
    from absorber.runtime import Model, Stream
    t0 = time.perf_counter()
    model = Model.open(bundle, combined=combined)
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
    rec = {"bundle": bundle, "combined": model.sessions.combined is not None, "open_s": round(opened, 2),
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
    ap.add_argument("bundle")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", choices=["combined", "separate"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.bundle, a.child == "combined", a.rounds)), flush=True)
        return
    with open(a.out, "a") as f:
        for _ in range(a.repeats):
            for mode in ("combined", "separate"):
                r = subprocess.run([sys.executable, __file__, a.bundle, "--rounds", str(a.rounds), "--out", a.out,
                                    "--child", mode], capture_output=True, text=True, check=True)
                line = r.stdout.strip().splitlines()[-1]
                print(line, flush=True)
                f.write(line + "\n")


if __name__ == "__main__":
    main()
