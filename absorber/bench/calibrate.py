"""Calibrate the memory planner: measured vs predicted peak RSS of one absorption round on a bundle.

    python -m absorber.devices.calibrate BUNDLE [--windows 128x64,256x128,512x256] [--k 2] [--profile laptop-cpu]

Each window runs in a fresh process (peak RSS = VmHWM from /proc/self/status, Linux) doing what the runtime does
in a round, with onnxruntime + numpy only: open the decoder and train-step sessions (session_kwargs of the
profile + the manifest's session config), the teacher pass on X.Y (n+m tokens, logits_to_keep=1, empty past),
keep the present KV and the teacher hidden states of Y, then K train steps on Y with a numpy AdamW (m, v) and a
rollback snapshot of the adapters. Prints a markdown table (and --json rows).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_round(bundle: str, n: int, m: int, k: int, profile: str) -> dict:
    """One round in this process; returns peak RSS and the RSS after each phase."""
    marks = {"start": _status("VmRSS")}
    import numpy as np
    import onnxruntime as ort
    import tokenizers  # noqa: F401  the runtime imports it: part of the baseline
    from safetensors.numpy import load_file

    from absorber.devices import get_profile, session_kwargs
    marks["imports"] = _status("VmRSS")
    root = Path(bundle)
    man = json.loads((root / "manifest.json").read_text())
    kw = session_kwargs(get_profile(profile), "cpu", extra_config=man.get("session_config"))
    dec = ort.InferenceSession(str(root / man["graphs"]["decoder"]["file"]), **kw)
    marks["decoder_session"] = _status("VmRSS")
    tr = ort.InferenceSession(str(root / man["graphs"]["train_step"]["file"]), **kw)
    marks["sessions"] = _status("VmRSS")
    hwm_sessions = _status("VmHWM")
    ad = load_file(str(root / man.get("adapters_file", "adapters.safetensors")))
    md = man["model"]
    L, kv, hd = md["num_layers"], md["num_kv_heads"], md["head_dim"]
    rng = np.random.default_rng(0)
    ids = rng.integers(10, md["vocab"] - 10, size=(1, n + m), dtype=np.int64)
    feeds = {"input_ids": ids, "position_ids": np.arange(n + m, dtype=np.int64)[None],
             "logits_to_keep": np.array(1, dtype=np.int64)}
    for i in range(L):
        feeds[f"past_key.{i}"] = np.zeros((1, kv, 0, hd), np.float32)
        feeds[f"past_value.{i}"] = np.zeros((1, kv, 0, hd), np.float32)
    feeds.update(ad)
    dec_in = {x.name for x in dec.get_inputs()}
    feeds = {a: v for a, v in feeds.items() if a in dec_in}
    t0 = time.perf_counter()
    outs = dict(zip([o.name for o in dec.get_outputs()], dec.run(None, feeds)))
    t_teacher = time.perf_counter() - t0
    hidden = np.ascontiguousarray(outs["hidden_states"][:, -m:])
    kv_cache = {a: v for a, v in outs.items() if a.startswith("present")}  # noqa: F841  kept, like the runtime
    del outs, feeds
    marks["teacher"] = _status("VmRSS")
    hwm_teacher = _status("VmHWM")
    names = [x.name for x in tr.get_inputs() if x.name in ad]
    p = {a: ad[a].copy() for a in names}
    snap = {a: v.copy() for a, v in p.items()}  # noqa: F841  the round's rollback snapshot
    mom = {a: np.zeros_like(v) for a, v in p.items()}
    vel = {a: np.zeros_like(v) for a, v in p.items()}
    base = {"input_ids": ids[:, n:], "position_ids": np.arange(m, dtype=np.int64)[None], "teacher_hidden": hidden}
    outn = [o.name for o in tr.get_outputs()]
    t0 = time.perf_counter()
    for _ in range(k):
        res = dict(zip(outn, tr.run(None, {**base, **p})))
        for a in names:
            g = res["grad." + a]
            mom[a] = 0.9 * mom[a] + 0.1 * g
            vel[a] = 0.999 * vel[a] + 0.001 * g * g
            p[a] = p[a] - 1e-3 * mom[a] / (np.sqrt(vel[a]) + 1e-8)
        del res
    t_step = (time.perf_counter() - t0) / max(k, 1)
    marks["train"] = _status("VmRSS")
    return {"n": n, "m": m, "k": k, "profile": profile, "peak_bytes": _status("VmHWM"),
            "peak_sessions": hwm_sessions, "peak_after_teacher": hwm_teacher, "rss_marks": marks,
            "t_teacher_s": round(t_teacher, 2), "t_step_s": round(t_step, 2)}


def measure_runtime_round(bundle: str, n: int, m: int, k: int, profile: str) -> dict:
    """One round through the real runtime (absorber.runtime.engine.Stream) in this process."""
    marks = {"start": _status("VmRSS")}
    import numpy as np

    from absorber.runtime.engine import Stream
    marks["imports"] = _status("VmRSS")
    st = Stream.open(bundle, device="cpu", profile=profile, config_overrides={"n": n, "m": m, "k": k},
                     verify_hashes=False)
    marks["sessions"] = _status("VmRSS")
    hwm_sessions = _status("VmHWM")
    vocab = int(st.bundle.manifest["model"]["vocab"])
    ids = np.random.default_rng(0).integers(10, vocab - 10, size=n + m).tolist()
    t0 = time.perf_counter()
    res = st.feed_tokens(ids)
    dt = time.perf_counter() - t0
    marks["round"] = _status("VmRSS")
    if len(res) != 1:
        raise RuntimeError(f"expected one round, got {len(res)}")
    r = res[0]
    return {"n": n, "m": m, "k": k, "profile": profile, "via": "runtime", "peak_bytes": _status("VmHWM"),
            "peak_sessions": hwm_sessions, "rss_marks": marks, "steps": r.steps,
            "t_teacher_s": round(r.teacher_seconds, 2), "t_step_s": round(r.train_seconds / max(r.steps, 1), 2),
            "t_round_s": round(dt, 2)}


def _windows(text: str) -> list[tuple[int, int]]:
    out = []
    for w in text.split(","):
        n, _, m = w.strip().partition("x")
        out.append((int(n), int(m)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m absorber.devices.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--windows", default="128x64,256x128,512x256", help="NxM,NxM,...")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--profile", default="laptop-cpu")
    ap.add_argument("--via", choices=("runtime", "ort"), default="runtime",
                    help="runtime: absorber.runtime's Stream (default); ort: the raw onnxruntime emulation here")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._one:
        (n, m), = _windows(a.windows)
        fn = measure_runtime_round if a.via == "runtime" else measure_round
        print(json.dumps(fn(a.bundle, n, m, a.k, a.profile)))
        return 0
    from absorber.devices import get_profile
    from absorber.devices.planner import format_size, load_manifest, predict
    manifest, wfile = load_manifest(a.bundle)
    prof = get_profile(a.profile)
    arena, pattern = prof.enable_cpu_mem_arena, prof.enable_mem_pattern
    rows = []
    print(f"bundle {a.bundle} quant={manifest.get('quant', {}).get('scheme')} profile={a.profile} "
          f"arena={'on' if arena else 'off'} k={a.k} via={a.via}")
    print("| n | m | predicted | measured | error | teacher s | step s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, m in _windows(a.windows):
        r = subprocess.run([sys.executable, "-m", "absorber.devices.calibrate", a.bundle, "--windows", f"{n}x{m}",
                            "--k", str(a.k), "--profile", a.profile, "--via", a.via, "--_one"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"| {n} | {m} | failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode} |")
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row.setdefault("via", a.via)
        pred = predict(manifest, n, m, a.k, arena=arena, mem_pattern=pattern, weights_file_bytes=wfile)
        row["predicted_bytes"] = pred.peak_bytes
        row["terms"] = pred.terms
        err = (pred.peak_bytes - row["peak_bytes"]) / row["peak_bytes"]
        row["error"] = err
        rows.append(row)
        print(f"| {n} | {m} | {format_size(pred.peak_bytes)} | {format_size(row['peak_bytes'])} | {err:+.1%} | "
              f"{row['t_teacher_s']} | {row['t_step_s']} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
