"""The stream's state on disk: ONE safetensors file (flat adapters, AdamW moments, window and pending tokens, and
with replay the kept X: `replay_ids`, `replay_lengths`) whose metadata holds the JSON record (step, rounds,
counters, stream offset, bundle manifest hash, the replay's counters). Written
atomically (temp file in the same folder, fsync, os.replace, fsync of the folder): a kill -9 at any moment
leaves either the previous round's state or the new one, never a mix."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from absorber.errors import AbsorberError
from absorber.files import write_atomic

STATE_FILE = "state.safetensors"
STATE_FORMAT = 1


def save_state(folder: str | os.PathLike, tensors: dict[str, np.ndarray], meta: dict) -> Path:
    from safetensors.numpy import save
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata={"absorber_state": json.dumps({"state_format": STATE_FORMAT, **meta})})
    return write_atomic(d / STATE_FILE, blob)


def load_state(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict] | None:
    """(tensors, meta) or None when the folder has no state yet. A corrupt file is refused with one line."""
    p = Path(folder) / STATE_FILE
    if not p.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["absorber_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user-facing problem
        raise AbsorberError(f"state file {p} is corrupt or not an absorber state ({type(e).__name__})") from None
    if meta.get("state_format") != STATE_FORMAT:
        raise AbsorberError(f"state file {p} has format {meta.get('state_format')!r}; this runtime reads {STATE_FORMAT}")
    return tensors, meta
