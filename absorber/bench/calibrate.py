"""Calibrate the memory planner: measured vs predicted peak RSS of one absorption round of the real runtime.

    python -m absorber.bench.calibrate BUNDLE [--windows 128x64,256x128,512x256] [--k 2] [--profile laptop-cpu]
        [--json rows.json] [--md table.md]

Each window runs in a fresh process (so that its peak RSS is its own), which measures the engine itself, not a
copy of it: ``absorber.runtime.Stream.open(BUNDLE, profile=..., config_overrides={"n": n, "m": m, "k": k})``,
then ``stream.feed_tokens(ids)`` with n+m random token ids = exactly one round (teacher pass on X·Y, K train
steps with AdamW and the rollback backup, the final loss evaluation). It records VmRSS and VmHWM from
/proc/self/status (Linux) after the imports, after the open and after the round; the peak is the VmHWM after the
round. The parent compares it with ``absorber.devices.planner.predict`` on the same bundle and window and prints
a markdown table (and writes --json rows, --md the table with its command).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROG = "python -m absorber.bench.calibrate"


def proc_status(*keys: str) -> dict[str, int]:
    """The given /proc/self/status fields (kB values) in bytes; 0 where unknown (not Linux)."""
    out = {k: 0 for k in keys}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in out:
                    out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _mark() -> dict[str, int]:
    s = proc_status("VmRSS", "VmHWM")
    return {"rss": s["VmRSS"], "hwm": s["VmHWM"]}


def measure_round(bundle: str, n: int, m: int, k: int, profile: str | None, seed: int = 0) -> dict:
    """One round of the runtime in THIS process (call it in a fresh one): the memory marks and the round's times."""
    marks = {"start": _mark()}
    import numpy as np

    from absorber.runtime import Stream
    marks["import"] = _mark()
    t0 = time.perf_counter()
    st = Stream.open(bundle, profile=profile, config_overrides={"n": n, "m": m, "k": k}, verify_hashes=False)
    open_s = time.perf_counter() - t0
    marks["open"] = _mark()
    vocab = st.bundle.vocab
    ids = np.random.default_rng(seed).integers(10, vocab - 10, size=n + m).tolist()
    t0 = time.perf_counter()
    res = st.feed_tokens(ids)
    dt = time.perf_counter() - t0
    marks["round"] = _mark()
    if len(res) != 1:
        raise RuntimeError(f"expected one round from n+m = {n + m} tokens, got {len(res)}")
    r = res[0]
    return {"n": n, "m": m, "k": k, "profile": profile, "peak_bytes": marks["round"]["hwm"],
            "rss_import": marks["import"]["rss"], "rss_open": marks["open"]["rss"], "rss_round": marks["round"]["rss"],
            "hwm_open": marks["open"]["hwm"], "marks": marks, "steps": r.steps, "open_s": round(open_s, 2),
            "t_teacher_s": round(r.teacher_seconds, 2), "t_step_s": round(r.train_seconds / max(r.steps, 1), 2),
            "t_round_s": round(dt, 2)}


def measure_in_subprocess(bundle: str, n: int, m: int, k: int, profile: str | None, timeout: float = 3600) -> dict:
    """measure_round in a fresh interpreter (this checkout's absorber first on its path); raises on failure."""
    import absorber
    root = str(Path(absorber.__file__).resolve().parent.parent)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "absorber.bench.calibrate", str(bundle), "--windows", f"{n}x{m}", "--k", str(k),
           "--_one"] + (["--profile", profile] if profile else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout or "").strip().splitlines() if ln.strip()]
        raise RuntimeError(lines[-1].strip() if lines else f"exit status {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def weights_file_bytes(bundle) -> int | None:
    """What `absorber plan` passes to predict: None when the manifest lists every stored tensor (exact), else the
    bytes of the bundle's external weight files."""
    if bundle.stored_tensors:
        return None
    files = bundle.external_files or (["weights.bin"] if (bundle.path / "weights.bin").is_file() else [])
    total = sum((bundle.path / f).stat().st_size for f in files if (bundle.path / f).is_file())
    return total or None


def predicted(bundle, n: int, m: int, k: int, profile):
    """The planner's prediction for this bundle and window, with the profile's arena and mem-pattern settings."""
    from absorber.devices.planner import predict
    return predict(bundle, n, m, k, arena=profile.enable_cpu_mem_arena, mem_pattern=profile.enable_mem_pattern,
                   weights_file_bytes=weights_file_bytes(bundle))


def _windows(text: str) -> list[tuple[int, int]]:
    out = []
    for w in text.split(","):
        n, sep, m = w.strip().lower().partition("x")
        if not sep:
            raise SystemExit(f"{PROG}: error: window {w!r} is not NxM")
        out.append((int(n), int(m)))
    return out


def calibrate(bundle_dir: str, windows: list[tuple[int, int]], k: int, profile: str,
              say=print, timeout: float = 3600) -> tuple[list[dict], list[str]]:
    """Measure every window (one fresh process each) and set its prediction beside it: (rows, markdown lines)."""
    from absorber.devices import get_profile
    from absorber.devices.planner import format_size
    from absorber.runtime.bundle import open_bundle
    b = open_bundle(bundle_dir, verify_hashes=False)
    prof = get_profile(profile)
    quant = b.quant_scheme
    lines = [f"bundle {bundle_dir} quant={quant} profile={prof.name} "
             f"arena={'on' if prof.enable_cpu_mem_arena else 'off'} "
             f"mem_pattern={'on' if prof.enable_mem_pattern else 'off'} k={k} (one round of absorber.runtime.Stream)",
             "",
             "| n | m | predicted | measured | error | teacher s | step s | RSS after import | after open | "
             "after round |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ln in lines:
        say(ln)
    rows = []
    for n, m in windows:
        pred = predicted(b, n, m, k, prof)
        try:
            row = measure_in_subprocess(bundle_dir, n, m, k, profile, timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            ln = f"| {n} | {m} | {format_size(pred.peak_bytes)} | failed: {str(e)[:200]} |||||||"
            rows.append({"n": n, "m": m, "k": k, "profile": profile, "predicted_bytes": pred.peak_bytes,
                         "failed": str(e)[:300]})
            lines.append(ln)
            say(ln)
            continue
        row["quant"] = quant
        row["predicted_bytes"] = pred.peak_bytes
        row["terms"] = pred.terms
        # (predicted - measured) / measured; None without /proc (no measurement)
        row["error"] = (pred.peak_bytes - row["peak_bytes"]) / row["peak_bytes"] if row["peak_bytes"] else None
        rows.append(row)
        err = "–" if row["error"] is None else f"{row['error']:+.1%}"
        ln = (f"| {n} | {m} | {format_size(pred.peak_bytes)} | {format_size(row['peak_bytes'])} | {err} | "
              f"{row['t_teacher_s']} | {row['t_step_s']} | {format_size(row['rss_import'])} | "
              f"{format_size(row['rss_open'])} | {format_size(row['rss_round'])} |")
        lines.append(ln)
        say(ln)
    return rows, lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--windows", default="128x64,256x128,512x256", help="NxM,NxM,... (default %(default)s)")
    ap.add_argument("--k", type=int, default=2, help="optimizer steps of the round (default %(default)s)")
    ap.add_argument("--profile", default="laptop-cpu", help="device profile (default %(default)s)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--md", help="write the markdown table (with its command) here")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per window (default %(default)s)")
    ap.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._one:
        (n, m), = _windows(a.windows)
        print(json.dumps(measure_round(a.bundle, n, m, a.k, a.profile)))
        return 0
    rows, lines = calibrate(a.bundle, _windows(a.windows), a.k, a.profile, say=lambda s: print(s, flush=True),
                            timeout=a.timeout)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.md:
        args = sys.argv[1:] if argv is None else list(argv)
        Path(a.md).write_text("\n".join([f"Command: `{PROG} {' '.join(args)}`", "", *lines]) + "\n")
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
