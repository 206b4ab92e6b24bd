"""Carry a GGUF file's quantized blocks over into a bundle as they are (no requantization).

Each GGUF block type below is rewritten into one of the two forms of absorber.export.quant.QWeight (4 bits:
scale*q + minimum; 8 bits: (q - 128)*scale) with the same values, bit for bit:

  Q4_1  blocks of 32: fp16 d, fp16 m, 4-bit q; w = d*q + m          -> 4 bits, block 32, scale d, minimum m
  Q4_0  blocks of 32: fp16 d, 4-bit q; w = d*(q - 8)                 -> 4 bits, block 32, scale d, minimum -8d
  Q4_K  super-blocks of 256 = 8 x 32: fp16 d, dmin, 6-bit sub-scales sc_j and sub-minima m_j;
        w = (d*sc_j)*q - (dmin*m_j)                                  -> 4 bits, block 32, scale d*sc_j, minimum
                                                                        -(dmin*m_j) (both exact in fp32)
  Q8_0  blocks of 32: fp16 d, int8 q; w = d*q                         -> 8 bits, block 32, q + 128
  Q5_0  blocks of 32: fp16 d, 5-bit q; w = d*(q - 16)                -> 8 bits, block 32, q + 112 (5 bits do not
                                                                        fit MatMulNBits' 4, so they take 8)
  Q6_K  super-blocks of 256 = 16 x 16: fp16 d, int8 sub-scales sc_j, 6-bit q; w = (d*sc_j)*(q - 32)
                                                                     -> 8 bits, block 16, q + 96, scale d*sc_j

Each tensor is mapped to its transformers name with gguf's own name map, and checked against the float tensor
transformers made of it: the carried weight must dequantize to it bit for bit, up to a row permutation
(transformers reorders the rows of Llama's q/k projections), which is found from the values themselves and applied
to the blocks. A tensor of another type, or one that does not match, is left out (the exporter requantizes it)
and the report says which and why.

Why hand-written unpacking: gguf-py (the well-kept library) only offers dequantization to floats; the bundle needs
the integer codes and per-block scales, so the byte layouts are unpacked here in the same order as gguf-py's own
`dequantize_blocks` (the tests compare against it bit for bit).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from absorber.export.quant import QWeight

BLOCK = 32


CARRIED = ("Q4_1", "Q4_0", "Q4_K", "Q8_0", "Q5_0", "Q6_K")
QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    """fp16 values stored in the last axis' 2 bytes -> float32 (one per leading index)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., g, b] bytes -> [..., g, 2b]: the b low nibbles, then the b high nibbles (ggml's element order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _parse(kind: str, data: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """(q uint8 [rows, K], scale f32 [rows, nb], minimum f32 [rows, nb] | None, bits, block) from a GGUF tensor's
    bytes, in the QWeight forms of the module docstring."""
    b = np.asarray(data, np.uint8).reshape(rows, -1)
    if kind == "Q4_1":
        b = b.reshape(rows, -1, 20)
        q = _nibbles(b[..., 4:20])
        return q.reshape(rows, -1).astype(np.uint8), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4, 32
    if kind == "Q4_0":
        b = b.reshape(rows, -1, 18)
        d = _f16(b[..., 0:2])
        return _nibbles(b[..., 2:18]).reshape(rows, -1), d, d * np.float32(-8), 4, 32
    if kind == "Q8_0":
        b = b.reshape(rows, -1, 34)
        q = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q.reshape(rows, -1), _f16(b[..., 0:2]), None, 8, 32
    if kind == "Q5_0":
        b = b.reshape(rows, -1, 22)
        qh = np.ascontiguousarray(b[..., 2:6]).view(np.uint32)            # [rows, nb, 1]: bit i = element i's 5th
        hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        q = _nibbles(b[..., 6:22]) | (hi << 4)                            # 0..31, w = d*(q - 16)
        return (q.astype(np.uint16) + 112).astype(np.uint8).reshape(rows, -1), _f16(b[..., 0:2]), None, 8, 32
    if kind == "Q4_K":
        b = b.reshape(rows, -1, 144)                                      # d, dmin, scales[12], qs[128]
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s = b[..., 4:16].reshape(rows, -1, 3, 4)
        lo, mi, hi = s[..., 0, :], s[..., 1, :], s[..., 2, :]
        sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1).astype(np.float32)
        mn = np.concatenate([mi & 0x3F, (hi >> 4) | ((mi >> 2) & 0x30)], axis=-1).astype(np.float32)
        q = _nibbles(b[..., 16:144].reshape(rows, -1, 4, 32))            # [rows, nsb, 4, 64]: sub-blocks 2j, 2j+1
        scale = (d[..., None] * sc).reshape(rows, -1)
        minimum = -(dmin[..., None] * mn).reshape(rows, -1)
        return q.reshape(rows, -1).astype(np.uint8), scale, minimum, 4, 32
    if kind == "Q6_K":
        b = b.reshape(rows, -1, 210)                                      # ql[128], qh[64], scales[16], d
        ql = _nibbles(b[..., 0:128].reshape(rows, -1, 2, 64))             # [rows, nsb, 2, 128]
        qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        q = ql | ((qh & 0x03).reshape(rows, -1, 2, 128) << 4)             # 0..63, w = d*sc*(q - 32)
        scale = (_f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8).astype(np.float32))
        return (q.astype(np.uint16) + 96).astype(np.uint8).reshape(rows, -1), scale.reshape(rows, -1), None, 8, 16
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
        if kind not in CARRIED:
            report["left"][name] = f"GGUF type {kind} (carried over: {', '.join(CARRIED)})"
            continue
        want = p.detach().float().numpy()
        rows, cols = want.shape
        if cols % BLOCK:
            report["left"][name] = f"K={cols} is no multiple of {BLOCK}"
            continue
        q, d, m, bits, block = _parse(kind, t.data, rows)
        qw = QWeight(name, bits, block, q, d, m, source=f"gguf:{kind}")
        have = qw.dequantized()
        if have.shape != want.shape:
            report["left"][name] = f"shape {have.shape} != the model's {want.shape}"
            continue
        if not np.array_equal(have, want):
            perm = _row_permutation(have, want)
            if perm is None:
                report["left"][name] = "its dequantized values differ from the model's tensor"
                continue
            qw = QWeight(name, bits, block, q[perm], d[perm], None if m is None else m[perm], source=f"gguf:{kind}")
            if not np.array_equal(qw.dequantized(), want):
                report["left"][name] = "its dequantized values differ from the model's tensor"
                continue
        out[name] = qw
        report["carried"][name] = qw.source
    return out, report
