"""Many forgetting-curve streams at once on one accelerator, under a time budget (benchmarks/retention.md).

The same measurement as `retention_screen.py` (absorber.retention.stream_facts: planted facts, window / method /
full NLLs, decoys, held-out damage), scheduled as (group, variant, speech) pieces over worker processes that
share one GPU (a 135M model leaves it mostly idle: several processes interleave well). Each piece is written as
JSON when it ends; at the budget the workers are stopped and what finished is kept. `--combine` pools the pieces
of each group into a retention_screen-format file (one per group), which retention_report.py and
retention_plot.py read.

    python benchmarks/scripts/retention_gpu.py --out /tmp/rg --device cuda --workers 12 --budget 480
    python benchmarks/scripts/retention_gpu.py --combine /tmp/rg --into benchmarks/retention_gpu
    python benchmarks/scripts/retention_gpu.py --out /tmp/rgs --model tiny --plan smoke --budget 60   # any machine

Speech j of a group is the j-th most recent spoken SOTU transcript with the seed retention_screen.py gives it
(same facts as the CPU screens); a group whose rounds outrun one speech streams it followed by the older ones.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))       # retention_screen's variant(), eval_gpu's pool

from eval_gpu import run_workers  # noqa: E402

# window groups: n, m, K, rounds the facts are planted over, distances scored
GROUPS = {
    "shipped": dict(n=512, m=256, k=16, plant_rounds=3, distances=(1, 2, 4, 8, 16, 32)),
    "screen": dict(n=128, m=64, k=8, plant_rounds=6, distances=(1, 2, 4, 8, 16, 32)),
    "tiny": dict(n=32, m=16, k=2, plant_rounds=2, distances=(1, 2, 4)),
}
SPEECHES = 3
# (group, variant label as retention_screen.py reads it), in priority order
PLANS = {
    "main": [
        ("shipped", "shipped"),
        ("screen", "ntp_weight=1/lr=0.0001"),
        ("screen", "ntp_weight=1/sparse=64/lr=0.003"),
        ("screen", "ntp_weight=1/sparse=16/lr=0.003"),
        ("screen", "ntp_weight=1/lr=0.0003"),
        ("screen", "ntp_weight=1/sparse=64/lr=0.001"),
        ("screen", "ntp_weight=1"),
        ("shipped", "ntp_weight=1/lr=0.0003"),
        ("screen", "ntp_weight=1/sparse=256/lr=0.001"),
        ("screen", "ntp_weight=1/sparse=16/lr=0.01"),
        ("screen", "ntp_weight=1/lr=0.001/targets=q_proj+k_proj+v_proj+o_proj"),
        ("screen", "ntp_weight=1/lr=0.001/targets=gate_proj+up_proj+down_proj"),
        ("screen", "ntp_weight=1/lr=0.001/decay=0.03"),
        ("shipped", "ntp_weight=1/sparse=64/lr=0.001"),
        ("screen", "ntp_weight=1/sparse=1024/lr=0.001"),
        ("screen", "ntp_weight=1/sparse=4/lr=0.01"),
    ],
    "smoke": [("tiny", "ntp_weight=1/sparse=4/lr=0.001"), ("tiny", "shipped")],
}


def texts_for(tok, group: dict, count: int) -> list[tuple[str, list[int]]]:
    """The `count` most recent spoken speeches, each long enough for the group's rounds (older ones appended)."""
    from absorber import data
    sp = data.speeches("spoken")[::-1]
    need = group["n"] + group["m"] + (group["plant_rounds"] + max(group["distances"])) * group["n"] + 64
    sep = tok.encode("\n\n", add_special_tokens=False)
    out = []
    for j in range(count):
        ids = tok.encode(sp[j].text(), add_special_tokens=False)
        names = [sp[j].fileid]
        nxt = j + 1
        while len(ids) < need and nxt < len(sp):
            ids += sep + tok.encode(sp[nxt].text(), add_special_tokens=False)
            names.append(sp[nxt].fileid)
            nxt += 1
        out.append(("+".join(names[:1] + ([f"{len(names) - 1} more"] if len(names) > 1 else [])), ids))
    return out


def worker(wid: int, args: dict, tasks, results) -> None:
    import torch
    from absorber import data, retention as RT
    from absorber.config import AbsorberConfig, override
    from absorber.evaluate import ModelPool
    from absorber.models import load
    from retention_screen import variant
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    model, tok = load(args["model"])
    model.to(args["device"])
    pool = ModelPool(model)
    held = next((s for s in data.speeches(None) if s.fileid.startswith("1961-Kennedy")), None)
    heldout = tok.encode(held.text(), add_special_tokens=False)[1000:] if held else []
    cache: dict[str, list] = {}
    out = Path(args["out"])
    while True:
        try:
            gname, label, ti = tasks.get_nowait()
        except queue.Empty:
            return
        g = GROUPS[gname]
        if gname not in cache:
            cache[gname] = texts_for(tok, g, SPEECHES)
        tname, ids = cache[gname][ti]
        base = override(AbsorberConfig(), n=g["n"], m=g["m"], k=g["k"], lr=1e-3, ntp_weight=0.0)
        method, cfg = variant(label, base)
        rs = RT.RetentionSettings(facts=args["facts"], plant_rounds=g["plant_rounds"], distances=g["distances"])
        path = out / f"{gname}__{label.replace('/', '~')}__{ti}.json"
        rec = {"group": gname, "variant": label, "text": tname, "text_index": ti, "method": method,
               "config": cfg.to_dict(), "settings": rs.to_dict(), "heldout": held.fileid if held else None,
               "worker": wid, "done": False}
        t0 = time.perf_counter()
        try:
            res = RT.stream_facts(pool, tok, ids, heldout, cfg, method, rs, seed=rs.seed + 1000 * ti)
            res.pop("baselines", None)
            rec.update(res, done=True)
        except Exception:   # keep going with the other pieces; the error is in the JSON
            rec["error"] = traceback.format_exc()[-2000:]
        rec["seconds"] = time.perf_counter() - t0
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, default=str))
        os.replace(tmp, path)
        results.put((f"{gname} {label} text {ti}", rec["done"], round(rec["seconds"], 1)))


def run(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    speeches = 1 if a.plan == "smoke" else SPEECHES
    pieces = [(g, v, ti) for g, v in PLANS[a.plan] for ti in range(speeches)]
    (out / "plan.json").write_text(json.dumps({"plan": a.plan, "pieces": pieces, "args": vars(a)}, indent=1))
    args = {"model": a.model, "device": a.device, "threads": a.threads, "out": str(out), "facts": a.facts}
    run_workers(worker, args, pieces, a.workers, a.budget)
    return 0


def combine(folder: Path, into: str) -> list[Path]:
    """One retention_screen-format JSON per group: every variant's finished pieces pooled (records per text)."""
    from absorber.retention import RetentionSettings, pooled_run
    pieces = [json.loads(p.read_text()) for p in sorted(folder.glob("*__*__*.json"))]
    written = []
    for gname in sorted({p["group"] for p in pieces}):
        mine = [p for p in pieces if p["group"] == gname and p["done"]]
        if not mine:
            continue
        rs = RetentionSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in mine[0]["settings"].items()})
        methods = {}
        texts: list[str] = []
        order = list(dict.fromkeys(v for g, v in PLANS["main"] + PLANS["smoke"] if g == gname))
        for label in sorted({p["variant"] for p in mine}, key=lambda v: order.index(v) if v in order else 99):
            ps = sorted((p for p in mine if p["variant"] == label), key=lambda p: p["text_index"])
            texts += [p["text"] for p in ps if p["text"] not in texts]
            methods[label] = dict(pooled_run(ps[0]["method"], ps[0]["config"], [(p["text"], p) for p in ps], rs),
                                  texts=[p["text"] for p in ps])
        g = GROUPS[gname]
        path = Path(f"{into}_{gname}.json")
        path.write_text(json.dumps({
            "command": "python benchmarks/scripts/retention_gpu.py (pieces pooled by --combine)",
            "window": {k: g[k] for k in ("n", "m", "k")}, "heldout": mine[0]["heldout"],
            "seconds": sum(p["seconds"] for p in mine), "texts": texts, "settings": rs.to_dict(),
            "partial": False, "methods": methods}, indent=1, default=str))
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for the pieces (run)")
    ap.add_argument("--combine", help="folder of pieces to pool (no run)")
    ap.add_argument("--into", default="benchmarks/retention_gpu", help="with --combine: file prefix")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--plan", default="main", choices=sorted(PLANS))
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--budget", type=float, default=480, help="seconds; then the workers are stopped")
    a = ap.parse_args(argv)
    if a.combine:
        for p in combine(Path(a.combine), a.into):
            print(p)
        return 0
    if not a.out:
        ap.error("--out or --combine is needed")
    return run(a)


if __name__ == "__main__":
    raise SystemExit(main())
