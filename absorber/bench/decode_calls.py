"""One-token decoder calls timed in raw ONNX Runtime, several sessions alternating in one process (the
benchmarks/scripts that compare decoder graphs: combined_layouts.py, decode_lora_packing.py).

This VM's speed drifts by 10-30 % between runs minutes apart, so graphs are only compared side by side: each
repetition runs `calls` one-token calls of every session in turn; a session's rate is 1 / the median call."""
from __future__ import annotations

import argparse
import json
import statistics
import time


def arguments(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--cached", default="8,256", help="tokens in the KV cache before the timed token")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", required=True, help="JSON lines are appended here")
    return ap.parse_args()


def random_past(bundle, cached: int, rng) -> dict:
    """past_key.i / past_value.i [1, kv heads, cached, head_dim] of standard-normal values."""
    import numpy as np
    return {f"past_{w}.{i}": rng.standard_normal((1, bundle.num_kv_heads, cached, bundle.head_dim)).astype(np.float32)
            for i in range(bundle.num_layers) for w in ("key", "value")}


def one_token_feeds(session, pool: dict, cached: int) -> dict:
    """Feeds for one token at position `cached`: the session's inputs from `pool` (past KV, adapters, …), empty
    placeholders for any other input, and the token, its position and logits_to_keep = 1."""
    import numpy as np

    from absorber import bundle_format as F
    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}
    feeds = {}
    for i in session.get_inputs():
        if i.name in pool:
            feeds[i.name] = pool[i.name]
        else:
            feeds[i.name] = np.zeros([d if isinstance(d, int) else 0 for d in (i.shape or [])], types[i.type])
    feeds.update({F.INPUT_IDS: np.array([[42]], np.int64), F.POSITION_IDS: np.array([[cached]], np.int64),
                  F.LOGITS_TO_KEEP: np.asarray(1, np.int64)})
    return feeds


def alternate(sessions: dict, feeds: dict, reps: int, outputs: dict | None = None, calls: int = 20) -> dict:
    """{name: [median seconds of one call, per repetition]}, the sessions taking turns."""
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(reps):
        for name, s in sessions.items():
            out = (outputs or {}).get(name)
            ts = []
            for _ in range(calls):
                t = time.perf_counter()
                s.run(out, feeds[name])
                ts.append(time.perf_counter() - t)
            times[name].append(statistics.median(ts))
    return times


def rates(times: list[float]) -> dict:
    return {"tok_s": round(1 / statistics.median(times), 1), "reps": [round(1 / t, 1) for t in times]}


def append_lines(path: str, lines: list[dict]) -> None:
    """Each line with the CPU's ISA flags, appended to `path` and printed."""
    from absorber.devices.machine import cpu_info
    isa = cpu_info()["isa"]
    with open(path, "a") as f:
        for ln in lines:
            f.write(json.dumps({**ln, "isa": isa}) + "\n")
            print(json.dumps(ln))
