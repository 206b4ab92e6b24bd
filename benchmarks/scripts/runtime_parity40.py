"""The runtime against the PyTorch reference over many rounds on the tiny random Llama (benchmarks/runtime.md,
"Exactness vs the PyTorch reference": 40 rounds at k=2, n=32, m=16).

    python benchmarks/scripts/runtime_parity40.py [--rounds 40] [--k 2] [--bundle TINY_BUNDLE] [--json OUT.json]

Without --bundle it exports the tiny Llama of the tests (tiny_llama(seed=0, vocab=512), byte tokenizer, n=32,
m=16) into a temporary folder first (tens of seconds). Both engines get the same random token ids
(torch.randint(3, 259), seed 0) and run --rounds rounds at --k steps; printed: the relative error of all adapters
(one flat vector) after the last round, the worst single adapter tensor, and the worst relative difference of
loss_first / loss_last over the rounds. Needs torch (extra `export`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout (benchmarks/scripts/../..)


def _rel(a, b) -> float:
    import numpy as np
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def export_tiny(out: Path) -> Path:
    from absorber.config import AbsorberConfig
    from absorber.export import export_bundle
    from absorber.models import tiny_llama, tiny_tokenizer
    return Path(export_bundle(tiny_llama(seed=0, vocab=512), tiny_tokenizer(), out, cfg=AbsorberConfig(n=32, m=16, k=4)))


def parity(bundle: Path, rounds: int, k: int) -> dict:
    import dataclasses

    import numpy as np
    import torch
    from safetensors.numpy import load_file

    from absorber import lora
    from absorber.models import tiny_llama
    from absorber.runtime import Stream
    from absorber.runtime.bundle import open_bundle
    from absorber.stream import StreamingAbsorber

    b = open_bundle(bundle, verify_hashes=False)
    cfg = dataclasses.replace(b.defaults(), k=k)
    model = tiny_llama(seed=0, vocab=512)
    lora.inject(model, cfg.lora)
    lora.load_state(model, {n: torch.from_numpy(v) for n, v in load_file(str(b.adapters_path)).items()})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (cfg.n * rounds + cfg.m + 5,), generator=g).tolist()
    t0 = time.perf_counter()
    ref = StreamingAbsorber(model, None, cfg).feed_tokens(ids)
    t_ref = time.perf_counter() - t0
    s = Stream.open(bundle, config_overrides={"k": k})
    t0 = time.perf_counter()
    got = s.feed_tokens(ids)
    t_rt = time.perf_counter() - t0
    if len(ref) != len(got) or len(got) != rounds:
        raise SystemExit(f"round counts differ: reference {len(ref)}, runtime {len(got)} (asked {rounds})")
    rel = lambda x, y: abs(x - y) / max(abs(y), 1e-12)   # noqa: E731
    snap = lora.snapshot(model)
    flat = np.concatenate([snap[n].numpy().ravel() for n in s.opt.names])
    return {"rounds": rounds, "k": k, "n": cfg.n, "m": cfg.m,
            "adapters_rel_error": _rel(s.opt.params, flat),
            "worst_tensor_rel_error": max(_rel(v, snap[n].numpy()) for n, v in s.param_views.items()),
            "loss_first_max_rel_diff": max(rel(b_.loss_first, a.loss_first) for a, b_ in zip(ref, got)),
            "loss_last_max_rel_diff": max(rel(b_.loss_last, a.loss_last) for a, b_ in zip(ref, got)),
            "seconds": {"reference": round(t_ref, 1), "runtime": round(t_rt, 1)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/scripts/runtime_parity40.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--bundle", help="an existing tiny bundle (tiny_llama(seed=0, vocab=512), n=32, m=16)")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(a.bundle) if a.bundle else export_tiny(Path(tmp) / "tiny")
        res = parity(bundle, a.rounds, a.k)
    print(f"{res['rounds']} rounds at k={res['k']} (n={res['n']}, m={res['m']}): all adapters "
          f"{res['adapters_rel_error']:.1e} relative (worst tensor {res['worst_tensor_rel_error']:.1e}); "
          f"loss_first within {res['loss_first_max_rel_diff']:.1e}, loss_last within "
          f"{res['loss_last_max_rel_diff']:.1e} relative on every round")
    print(json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
