"""The decoder's packed adapter inputs, built from one array per adapter (numpy only).

int8/int4 bundles run each stack of linear layers that share an input (q/k/v, gate/up) as one MatMulNBits, and
their LoRA paths as two products over packed adapters (export/lora_packing.py; manifest
graphs.decoder.packed_adapters). The train step, the optimizer and saved states keep one tensor per adapter; the
decoder's packed inputs are built from those when it is called.
"""
from __future__ import annotations

import numpy as np


def decoder_adapters(packed: dict, adapters: dict) -> dict:
    """The decoder's adapter inputs from one array per adapter (numpy; the train step's inputs): the adapters as
    they are, except those the decoder takes packed (manifest graphs.decoder.packed_adapters, export/lora_packing.py):
    "columns" = the parts side by side ([K, sum r]: the A of layers that share an input), "block_diagonal" = each
    part times its scale on the block diagonal ([sum r, sum N]: their B). The packed arrays are views of ONE new
    buffer (one allocation, given back whole when the caller drops it); packed inputs already in `adapters` are
    kept as they are."""
    if not packed:
        return adapters
    members = {a for p in packed.values() for a, _ in p["parts"]}
    out = {n: v for n, v in adapters.items() if n not in members}
    todo = [n for n in packed if n not in out]
    if not todo:
        return out
    flat = np.empty(sum(int(np.prod(packed[n]["shape"])) for n in todo), np.float32)
    at = 0
    for name in todo:
        p = packed[name]
        rows, cols = (int(d) for d in p["shape"])
        dst = flat[at:at + rows * cols].reshape(rows, cols)
        at += rows * cols
        parts = [(np.asarray(adapters[a]), np.float32(s)) for a, s in p["parts"]]
        if p["kind"] == "columns":
            np.concatenate([a for a, _ in parts], axis=1, out=dst)
        else:
            dst.fill(0.0)
            i = j = 0
            for a, s in parts:
                np.multiply(a, s, out=dst[i:i + a.shape[0], j:j + a.shape[1]])
                i, j = i + a.shape[0], j + a.shape[1]
        out[name] = dst
    return out
