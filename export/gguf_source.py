"""Carry a GGUF file's quantized blocks over into a bundle as they are (no requantization).

GGUF Q4_1 (blocks of 32: fp16 scale d, fp16 minimum m, 4-bit q; w = d*q + m) and Q8_0 (blocks of 32: fp16 scale
d, int8 q; w = d*q) are exactly the two forms of absorber.export.quant.QWeight (4 bits: scale*q + minimum;
8 bits: (q - 128)*scale). Each tensor is mapped to its transformers name with gguf's own name map, and checked
against the float tensor transformers made of it: the carried weight must dequantize to it bit for bit, up to a
row permutation (transformers reorders the rows of Llama's q/k projections), which is found from the values
themselves and applied to the blocks. A tensor of another type, or one that does not match, is left out (the
exporter requantizes it) and the report says which and why.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from absorber.export.quant import QWeight

BLOCK = 32


def _parse(kind: str, data: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(q uint8 [rows, K], scale f32 [rows, nb], minimum f32 [rows, nb] | None, bits) from a GGUF tensor's bytes."""
    if kind == "Q4_1":
        b = np.asarray(data, np.uint8).reshape(rows, -1, 20)
        d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = b[..., 4:20]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)           # elements 0..15 low nibbles, 16..31 high
        return q.reshape(rows, -1).astype(np.uint8), d, m, 4
    if kind == "Q8_0":
        b = np.asarray(data, np.uint8).reshape(rows, -1, 34)
        d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q.reshape(rows, -1), d, None, 8
    raise ValueError(kind)


def _row_permutation(have: np.ndarray, want: np.ndarray) -> np.ndarray | None:
    """perm with have[perm] == want (bitwise), or None."""
    index = {}
    for i, r in enumerate(have):
        index.setdefault(r.tobytes(), i)
    perm = [index.get(r.tobytes()) for r in want]
    if any(p is None for p in perm):
        return None
    return np.asarray(perm, np.int64)


def carried_weights(gguf_path: str | Path, model) -> tuple[dict[str, QWeight], dict]:
    """{transformers parameter name: QWeight carried over exactly} and a report
    {"carried": {name: "gguf:Q4_1"}, "left": {name: reason}}."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else "llama"
    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    n_layers = int(model.config.num_hidden_layers)
    tmap = gguf.get_tensor_name_map(arch_enum, n_layers) if arch_enum is not None else None
    by_name = {t.name: t for t in reader.tensors}
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: dict[int, str] = {}
    out: dict[str, QWeight] = {}
    report = {"file": Path(gguf_path).name, "carried": {}, "left": {}}
    for name, p in params.items():
        if p.dim() != 2 or not name.endswith(".weight"):
            continue
        if id(p) in seen:                       # a tied alias: the same tensor, under either name
            first = seen[id(p)]
            if first in out:
                out[name] = dataclasses.replace(out[first], name=name)
                report["carried"][name] = f"alias of {first}"
            continue
        seen[id(p)] = name
        gname = tmap.get_name(name[: -len(".weight")]) if tmap is not None else None
        t = by_name.get(f"{gname}.weight") if gname else None
        if t is None:
            report["left"][name] = "no GGUF tensor of that name"
            continue
        kind = t.tensor_type.name
        if kind not in ("Q4_1", "Q8_0"):
            report["left"][name] = f"GGUF type {kind} (only Q4_1 and Q8_0 are carried over)"
            continue
        want = p.detach().float().numpy()
        rows, cols = want.shape
        if cols % BLOCK:
            report["left"][name] = f"K={cols} is no multiple of {BLOCK}"
            continue
        q, d, m, bits = _parse(kind, t.data, rows)
        qw = QWeight(name, bits, BLOCK, q, d, m, source=f"gguf:{kind}")
        have = qw.dequantized()
        if have.shape != want.shape:
            report["left"][name] = f"shape {have.shape} != the model's {want.shape}"
            continue
        if not np.array_equal(have, want):
            perm = _row_permutation(have, want)
            if perm is None:
                report["left"][name] = "its dequantized values differ from the model's tensor"
                continue
            qw = QWeight(name, bits, BLOCK, q[perm], d[perm], None if m is None else m[perm], source=f"gguf:{kind}")
            if not np.array_equal(qw.dequantized(), want):
                report["left"][name] = "its dequantized values differ from the model's tensor"
                continue
        out[name] = qw
        report["carried"][name] = qw.source
    return out, report
