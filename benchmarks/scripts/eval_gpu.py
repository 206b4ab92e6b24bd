"""Many `absorber eval` runs at once on one accelerator, under a time budget (the drift study of issue 6).

The torch reference is the same code as `absorber eval` (absorber.evaluate.stream_text / passkey_trial); this
script only schedules (job, text) pieces over worker processes that share one GPU (a 135M model leaves it
mostly idle, so several processes interleave well), checkpoints every record as JSON, and stops at the budget:
whatever finished is kept, per text and per round. `eval_gpu_report.py` turns the JSON into tables and plots.

    python benchmarks/scripts/eval_gpu.py --out /tmp/evalgpu --device cuda --workers 8 --budget 420
    python benchmarks/scripts/eval_gpu.py --out /tmp/smoke --model tiny --plan smoke --budget 60     # any machine

Texts: SHORT = the 12 most recent spoken State of the Union speeches, each streamed on its own (fresh
adapters per speech, its first 12 rounds scored); LONG = 16 earlier spoken speeches (1990-2011) joined into one
stream of ~130k tokens (one set of adapters for up to 200 rounds: drift over a long stream).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout (benchmarks/scripts/../..)

PASSKEY = {"passkey_lengths": [1024, 2048, 4096], "passkey_depths": [0.1, 0.5], "passkey_trials": 4}
COMBO = {"sync_skip": 1, "reset": "moments", "decay": 0.1}

# (name, kind, methods, text set, AbsorberConfig overrides), in priority order
PLANS = {
    "full": [
        ("base-short", "ppl", ["full", "window", "sink"], "short", {}),
        ("abs-default-short", "ppl", ["absorber"], "short", {}),
        ("abs-skip1-short", "ppl", ["absorber"], "short", {"sync_skip": 1}),
        ("abs-moments-short", "ppl", ["absorber"], "short", {"reset": "moments"}),
        ("abs-decay10-short", "ppl", ["absorber"], "short", {"decay": 0.1}),
        ("abs-tbase-short", "ppl", ["absorber"], "short", {"teacher": "base"}),
        ("abs-fresh-short", "ppl", ["absorber"], "short", {"reset": "adapters"}),
        ("abs-combo-short", "ppl", ["absorber"], "short", COMBO),
        ("base-long", "ppl", ["full", "window"], "long", {}),
        ("abs-default-long", "ppl", ["absorber"], "long", {}),
        ("abs-combo-long", "ppl", ["absorber"], "long", COMBO),
        ("ttt-default-short", "ppl", ["ttt"], "short", {}),
        ("passkey-base", "passkey", ["full", "window", "sink"], "short", {}),
        ("passkey-abs-default", "passkey", ["absorber"], "short", {}),
        ("passkey-abs-combo", "passkey", ["absorber"], "short", COMBO),
        ("abs-decay30-short", "ppl", ["absorber"], "short", {"decay": 0.3}),
        ("abs-fresh-long", "ppl", ["absorber"], "long", {"reset": "adapters"}),
        ("abs-lr2e3-combo-short", "ppl", ["absorber"], "short", {**COMBO, "lr": 2e-3}),
        ("passkey-ttt", "passkey", ["ttt"], "short", {}),
    ],
    # second pass (CPU, after the GPU pass showed teacher="base" as the only variant without drift)
    "cpu": [
        ("ttt-default-short", "ppl", ["ttt"], "short", {}),
        ("base-long", "ppl", ["full", "window"], "long", {}),
        ("base-long-window", "ppl", ["window"], "long", {}),   # full context at up to 8k tokens is slow on a CPU
        ("abs-tbase-long", "ppl", ["absorber"], "long", {"teacher": "base"}),
        ("abs-tbase-skip1-short", "ppl", ["absorber"], "short", {"teacher": "base", "sync_skip": 1}),
        ("passkey-abs-tbase", "passkey", ["absorber"], "short", {"teacher": "base"}),
        ("base-short", "ppl", ["full", "window", "sink"], "short", {}),
        ("abs-tbase-short", "ppl", ["absorber"], "short", {"teacher": "base"}),
        ("abs-default-long", "ppl", ["absorber"], "long", {}),
        # more speeches without the full-context reference (it costs ~40 min per speech on this CPU): Δ vs window
        ("base-short-window", "ppl", ["window", "sink"], "short", {}),
        ("abs-tbase-more", "ppl", ["absorber"], "short", {"teacher": "base"}),
    ],
    "smoke": [
        ("base-short", "ppl", ["full", "window", "sink"], "short", {}),
        ("abs-combo-short", "ppl", ["absorber"], "short", COMBO),
        ("abs-tbase-long", "ppl", ["absorber"], "long", {"teacher": "base"}),
        ("passkey-abs-default", "passkey", ["absorber"], "short", {}),
        ("ttt-default-short", "ppl", ["ttt"], "short", {}),
    ],
}


def text_sets(tok, smoke: bool) -> dict[str, list[tuple[str, list[int]]]]:
    from absorber import data
    sp = data.speeches("spoken")
    enc = lambda s: tok.encode(s.text(), add_special_tokens=False)
    recent = sp[::-1][:12]
    older = [s for s in sp if 1990 <= s.year <= 2011][:16]
    if smoke:
        recent, older = recent[:2], older[:2]
    short = [(s.fileid, enc(s)) for s in recent]
    joined: list[int] = []
    for s in older:
        joined += enc(s) + tok.encode("\n\n", add_special_tokens=False)
    return {"short": short, "long": [(f"long:{older[0].fileid}..{older[-1].fileid}", joined)]}


def settings_for(kind: str, smoke: bool, long: bool, long_rounds: int = 200, passkey_lengths=None):
    from absorber.evaluate import EvalSettings
    if kind == "passkey":
        pk = {"passkey_lengths": [256, 384], "passkey_depths": [0.1], "passkey_trials": 2} if smoke else PASSKEY
        if passkey_lengths:
            pk = {**pk, "passkey_lengths": passkey_lengths}
        return EvalSettings(passkey_lengths=tuple(pk["passkey_lengths"]), passkey_depths=tuple(pk["passkey_depths"]),
                            passkey_trials=pk["passkey_trials"], bootstrap=0)
    return EvalSettings(segments=(4 if smoke else long_rounds) if long else (3 if smoke else 12), bootstrap=0)


def worker(wid: int, args: dict, tasks, results) -> None:
    """Take (job, text index) pieces until the queue is empty; write one JSON per piece as records arrive."""
    import torch
    from absorber import evaluate as E
    from absorber.config import AbsorberConfig
    from absorber.models import load
    torch.set_num_threads(args["threads"])
    model, tok = load(args["model"])
    if args["model"] == "tiny":
        model.config.max_position_embeddings = 2048
    model.to(args["device"])
    pool = E.ModelPool(model)
    sets = text_sets(tok, args["smoke"])
    out = Path(args["out"])
    while True:
        try:
            job, ti = tasks.get_nowait()
        except queue.Empty:
            return
        name, kind, methods, tset, over = job
        cfg = AbsorberConfig()
        if args["model"] == "tiny":
            cfg.n, cfg.m, cfg.k = 64, 32, 4
        for k, v in over.items():
            cfg = E.apply_setting(cfg, k, v)
        cfg.validate()
        st = settings_for(kind, args["smoke"], tset == "long", args["long_rounds"], args["passkey_lengths"])
        tname, ids = sets[tset][ti]
        path = out / f"{name}__{ti:02d}.json"
        rec = {"job": name, "kind": kind, "text": tname, "config": cfg.to_dict(), "settings": st.to_dict(),
               "worker": wid, "records": {}, "passkey": {}, "done": False}
        t0 = time.perf_counter()

        def dump() -> None:
            rec["seconds"] = time.perf_counter() - t0
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, path)
        try:
            for mth in methods:
                if kind == "ppl":
                    def on_record(rs, mth=mth):
                        rec["records"][mth] = list(rs)
                        if len(rs) % 5 == 0:
                            dump()
                    rec["records"][mth] = E.stream_text(pool, tok, ids, cfg, mth, st, on_record=on_record)
                else:   # passkey: the trials whose haystack is this text
                    rec["passkey"][mth] = []
                    rng_keys = __import__("random").Random(1000 + ti)
                    for length in st.passkey_lengths:
                        for depth in st.passkey_depths:
                            key = str(rng_keys.randrange(10000, 100000))
                            if length > len(ids):
                                continue
                            t = E.passkey_trial(pool, tok, ids[:length], cfg, mth, st, key, depth)
                            rec["passkey"][mth].append(t | {"text": tname})
                            dump()
                dump()
            rec["done"] = True
        except Exception:   # keep going with the other pieces; the error is in the JSON
            rec["error"] = traceback.format_exc()[-2000:]
        dump()
        results.put((f"{name} text {ti}", rec["done"], round(time.perf_counter() - t0, 1)))


def run_workers(worker, args: dict, pieces: list, workers: int, budget: float) -> int:
    """Queue the pieces in order, start `workers` spawned processes of worker(wid, args, tasks, results), print
    each (label, ok, seconds) they report, and stop them at `budget` seconds; returns the pieces finished.
    Shared with retention_gpu.py."""
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for p in pieces:
        tasks.put(p)
    procs = [ctx.Process(target=worker, args=(w, args, tasks, results), daemon=True) for w in range(workers)]
    t0 = time.time()
    for p in procs:
        p.start()
    done = 0
    while any(p.is_alive() for p in procs) and time.time() - t0 < budget:
        try:
            label, ok, secs = results.get(timeout=2)
            done += 1
            print(f"[{time.time() - t0:6.0f}s] {label}: {'ok' if ok else 'ERROR'} {secs}s ({done}/{len(pieces)})",
                  flush=True)
        except queue.Empty:
            pass
    for p in procs:
        if p.is_alive():
            p.terminate()
    print(f"stopped after {time.time() - t0:.0f}s with {done}/{len(pieces)} pieces complete", flush=True)
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--plan", default="full", choices=sorted(PLANS))
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per worker")
    ap.add_argument("--budget", type=float, default=420, help="seconds; then the workers are stopped")
    ap.add_argument("--jobs", help="comma-separated job names of the plan to run (default: all)")
    ap.add_argument("--texts", help="short-text indices to run, e.g. 0-2 or 3,4,5 (default: all)")
    ap.add_argument("--long-rounds", type=int, default=200, help="rounds scored on the long stream")
    ap.add_argument("--passkey-lengths", help="haystack lengths, e.g. 1024,2048 (default 1024,2048,4096)")
    a = ap.parse_args()
    smoke = a.plan == "smoke"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = PLANS[a.plan]
    if a.jobs:
        want = a.jobs.split(",")
        jobs = [j for j in jobs if j[0] in want]
    texts = None
    if a.texts:
        texts = set()
        for part in a.texts.split(","):
            lo, _, hi = part.partition("-")
            texts |= set(range(int(lo), int(hi or lo) + 1))
    n_short = 2 if smoke else 12
    n_pass = 2 if smoke else PASSKEY["passkey_trials"]   # passkey: trial j uses short text j
    pieces = []
    for job in jobs:
        count = 1 if job[3] == "long" else (n_pass if job[1] == "passkey" else n_short)
        pieces += [(job, i) for i in range(count) if job[3] == "long" or texts is None or i in texts]
    # interleave so that every job gets its first texts early (a budget cut leaves each job partial, not absent)
    order = sorted(range(len(pieces)), key=lambda i: (pieces[i][1] // 3, i))
    (out / "plan.json").write_text(json.dumps({"plan": a.plan, "jobs": jobs, "pieces": len(pieces),
                                               "args": vars(a)}, indent=1))
    args = {"model": a.model, "device": a.device, "threads": a.threads, "out": str(out), "smoke": smoke,
            "long_rounds": a.long_rounds,
            "passkey_lengths": [int(x) for x in a.passkey_lengths.split(",")] if a.passkey_lengths else None}
    run_workers(worker, args, [pieces[i] for i in order], a.workers, a.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
