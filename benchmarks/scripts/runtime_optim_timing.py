"""Cost of the runtime's numpy optimizer per step (benchmarks/runtime.md, 5k-token table: "apply / backup copy /
clip / finite check" ms per step), on the adapters of a bundle or, without one, of SmolLM2-135M at LoRA r=16 on all
7 linear projections of all 30 layers (420 tensors, 4.88 M parameters).

    python benchmarks/scripts/runtime_optim_timing.py [--bundle BUNDLE] [--steps 50]

Times absorber.runtime.optim.FlatAdamW's apply(), save_backup(), clip(1.0) and grads_finite() on random
gradients; prints the median milliseconds of each over --steps steps. Needs numpy only (and the bundle's
manifest, read through absorber.runtime.bundle, when --bundle is given).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout (benchmarks/scripts/../..)


def smollm2_specs(rank: int = 16) -> list[tuple[str, tuple[int, ...]]]:
    H, I, KV = 576, 1536, 192   # hidden, MLP width, 3 KV heads x 64
    proj = {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    out = []
    for layer in range(30):
        for name, (fan_in, fan_out) in proj.items():
            out.append((f"layers.{layer}.{name}.lora_A", (rank, fan_in)))
            out.append((f"layers.{layer}.{name}.lora_B", (fan_out, rank)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/scripts/runtime_optim_timing.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="time the adapters of this bundle (default: SmolLM2-135M's shapes)")
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args(argv)
    import numpy as np

    from absorber.runtime.optim import FlatAdamW
    if a.bundle:
        from absorber.runtime.bundle import open_bundle
        specs = [(t.name, t.shape) for t in open_bundle(a.bundle, verify_hashes=False).adapters]
    else:
        specs = smollm2_specs()
    opt = FlatAdamW(specs, lr=1e-3)
    rng = np.random.default_rng(0)
    opt.params[:] = rng.standard_normal(opt.size, dtype=np.float32) * 0.01
    grads = rng.standard_normal(opt.size, dtype=np.float32)
    t = {"apply": [], "backup": [], "clip": [], "finite": []}
    for _ in range(a.steps + 2):
        np.copyto(opt.grads, grads)
        for key, fn in (("finite", opt.grads_finite), ("clip", lambda: opt.clip(1.0)),
                        ("backup", opt.save_backup), ("apply", opt.apply)):
            t0 = time.perf_counter()
            fn()
            t[key].append((time.perf_counter() - t0) * 1000)
    ms = {k: round(statistics.median(v[2:]), 2) for k, v in t.items()}   # the first 2 steps warm up
    ms["total"] = round(sum(ms.values()), 2)
    print(f"{len(specs)} adapter tensors, {opt.size / 1e6:.2f} M parameters; median ms per step over {a.steps} steps: "
          + ", ".join(f"{k} {v}" for k, v in ms.items()))
    print(json.dumps({"tensors": len(specs), "params": opt.size, "ms": ms}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
