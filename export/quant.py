"""Quantized frozen weights executed by integer kernels (numpy + onnx, no torch).

Every 2-D frozen weight W [N, K] (linear layers [out, in], the embedding / lm_head table [vocab, hidden]) whose
K is a multiple of the block (32) is stored in blocks of 32 consecutive columns (16 for weights carried over from
GGUF Q6_K), in the layout of ONNX Runtime's `com.microsoft.MatMulNBits` (B: uint8 [N, K/block, block*bits/8],
element 2i in the low nibble for 4 bits):

  4 bits:  W = scale * q + minimum,   q in 0..15, scale and minimum float32 per block (GGUF Q4_1's form,
           carried over exactly from Q4_1/Q4_0/Q4_K; a float source is requantized into it, min/max per block)
  8 bits:  W = (q - 128) * scale,     q in 0..255 (uint8 zero point 128), scale float32 per block
           (GGUF Q8_0's form; Q8_0/Q5_0/Q6_K are carried over exactly; a float source is requantized
           symmetrically per block)

How each USE of W is executed (a graph rewrite after tracing, `apply`):
  x @ W^T (FusedMatMul transB / Gemm transB: every linear layer, the lm_head)
        -> MatMulNBits(x, B, scale, zero_point)   [+ (x summed per block) @ minimum^T for 4 bits]
        MatMulNBits' fast kernels take only integer zero points, so the 4-bit minimum is a second, 32x smaller
        product instead of a float zero point (whose CPU kernel dequantizes the whole matrix on every call,
        20x slower, measured); the result is the same sum, exact up to fp32 rounding.
  Gather(W, ids) (the embedding)
        -> gather the quantized ROWS (B, scale, minimum / zero point) and dequantize only those: the fp32 table
           is never materialized (exact). For tied embeddings this is the same B as the lm_head's MatMulNBits.
  anything else (the backward's dX = dY @ W, which needs W in the other orientation)
        -> its own dequantization of a view of the same bytes [+ minimum] right before that node: one layer's
           fp32 weight exists while its gradient node runs and is freed after (exact: the forward's values). The
           dequantization is com.microsoft.GatherBlockQuantized over all rows of a uint8 view (MatMulNBits'
           layout): the same values as DequantizeLinear over a uint4 / uint8 view, which ONNX Runtime runs 2.5x
           slower (SmolLM2-135M int4: 470 per train step, 14 % of its time; benchmarks/bench.md).
  p @ W with W larger than ROWS_BYTES in fp32 (the next-token term's softmax @ W_head, [V, H]: 113 MB for
  SmolLM2, 671 MB for Gemma-3-270M)
        -> in row pieces: sum over pieces of p[:, rows] @ dequantized(those rows), each piece's quantized
           rows an alias of the stored bytes (`rows_name`, `row_aliases`): one piece of the fp32 table exists
           at a time instead of the whole (the same products, summed in a different order: fp32 rounding).
The integer kernels need ONNX Runtime's pre-packing (without it MatMulNBits dequantizes on every call): the
tensors that feed MatMulNBits (`kernel_tensors`; the manifest's tensor table marks them `kernel`) keep it on in
every session that reads them; the runtime hands them over from its one map of weights.bin like the rest.
Norm weights and other 1-D tensors stay float32. `QWeight.dequantized()` is what the reference model must hold
to reproduce the graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from absorber.bundle_format import INT4_BLOCK, QUANT_SCHEMES as SCHEMES, quant_names, rows_name

BITS = {"int8": 8, "int4": 4}
MS = "com.microsoft"
# MatMulNBits accuracy_level (the minimum precision of its activations): 0/1 = fp32 activations (exact),
# 4 = int8 activations (the fast integer kernels; ~0.5 % relative error per product). Measured on an AVX2 CPU
# (benchmarks/quant.md): at one token 4 is 4x (4-bit) to 70x (8-bit) faster than 1; at 256 rows 1 is as fast.
ACCURACY = {"decoder": 1, "train_step": 1}
# the most fp32 bytes of a weight dequantized at once where a product contracts over its rows (p @ W): larger
# weights are dequantized in row pieces of at most this size (SmolLM2's head, 113 MB: 7 pieces of 7022 rows)
ROWS_BYTES = 16 << 20
# the oldest onnxruntime that runs a quantized bundle: GatherBlockQuantized over uint8 data with `bits` (the
# backward's dequantization) is rejected by 1.20.1, 1.21.1 and 1.22.1 ("Unrecognized attribute: bits")
ONNXRUNTIME = "1.23"
SESSION_CONFIG: dict[str, str] = {}


@dataclass
class QWeight:
    name: str                      # the float weight's name
    bits: int                      # 4 | 8
    block: int
    q: np.ndarray                  # uint8 [N, K], values 0 .. 2**bits - 1
    scale: np.ndarray              # float32 [N, K / block]
    minimum: np.ndarray | None     # float32 [N, K / block] (4 bits), None for 8 bits
    source: str = "requantized"    # or "gguf:<type>" (carried over exactly, export/gguf_source.py)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def names(self) -> dict[str, str]:
        return quant_names(self.name, self.bits)

    def dequantized(self) -> np.ndarray:
        """float32 [N, K]: the values every graph computes with (GGUF's own formula and operation order)."""
        N, K = self.shape
        nb = K // self.block
        q = self.q.reshape(N, nb, self.block).astype(np.float32)
        if self.bits == 4:
            w = self.scale[:, :, None] * q + self.minimum[:, :, None]
        else:
            w = (q - np.float32(128)) * self.scale[:, :, None]
        return w.reshape(N, K).astype(np.float32)

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: uint8 [N, K/block, block*bits/8]."""
        N, K = self.shape
        nb = K // self.block
        if self.bits == 8:
            return np.ascontiguousarray(self.q.reshape(N, nb, self.block))
        flat = self.q.reshape(N, K)
        return np.ascontiguousarray((flat[:, 0::2] | (flat[:, 1::2] << 4)).astype(np.uint8).reshape(N, nb, self.block // 2))

    def zero_point(self) -> np.ndarray:
        """MatMulNBits' zero points: 4 bits: 0 (the minimum term carries the offset), two per byte; 8 bits: 128."""
        N, K = self.shape
        nb = K // self.block
        if self.bits == 8:
            return np.full((N, nb), 128, np.uint8)
        return np.zeros((N, (nb + 1) // 2), np.uint8)

    def stored(self) -> dict[str, np.ndarray]:
        """Every tensor this weight stores (name -> array); the view aliases the packed bytes (see `aliases`)."""
        n = self.names
        out = {n["q"]: self.packed(), n["scale"]: np.ascontiguousarray(self.scale, np.float32),
               n["zero"]: self.zero_point()}
        if self.bits == 8:
            out[n["zero8"]] = np.full(self.scale.shape, 128, np.uint8)
        if self.minimum is not None:
            out[n["min"]] = np.ascontiguousarray(self.minimum, np.float32)
        return out


def quantize(name: str, w: np.ndarray, scheme: str, block: int = INT4_BLOCK) -> QWeight:
    """Requantize a float32 [N, K] weight (K a multiple of `block`)."""
    w = np.asarray(w, np.float32)
    if scheme not in BITS:
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"{name}: only 2-D weights with K a multiple of {block} are quantized (shape {w.shape})")
    N, K = w.shape
    wb = w.reshape(N, K // block, block)
    if scheme == "int8":
        scale = (np.maximum(np.abs(wb).max(axis=2), 1e-30) / 127.0).astype(np.float32)
        q = (np.clip(np.rint(wb / scale[:, :, None]), -127, 127) + 128).astype(np.uint8)
        return QWeight(name, 8, block, q.reshape(N, K), scale, None)
    lo, hi = wb.min(axis=2), wb.max(axis=2)
    scale = np.maximum((hi - lo) / 15.0, 1e-30).astype(np.float32)
    q = np.clip(np.rint((wb - lo[:, :, None]) / scale[:, :, None]), 0, 15).astype(np.uint8)
    return QWeight(name, 4, block, q.reshape(N, K), scale, lo.astype(np.float32))


def quantizable(init: TensorProto, block: int = INT4_BLOCK) -> bool:
    return init.data_type == TensorProto.FLOAT and len(init.dims) == 2 and init.dims[1] % block == 0


# ------------------------------------------------------------------------------------------------ graph rewrite
class _Rewriter:
    def __init__(self, accuracy_level: int):
        self.acc = accuracy_level
        self.consts: dict[str, np.ndarray] = {}
        self.used: set[str] = set()           # stored tensor names referenced
        self.rows: dict[str, tuple[str, int, int]] = {}   # row-piece tensor -> (stored tensor, start, stop)
        self.n = 0

    def _const(self, name: str, value) -> str:
        if name not in self.consts:
            self.consts[name] = np.asarray(value)
        return name

    def _tmp(self, base: str) -> str:
        self.n += 1
        return f"{base}.nb{self.n}"

    def _use(self, *names: str) -> None:
        self.used.update(names)

    def matmul(self, qw: QWeight, a: str, out: str) -> list:
        """out = a @ W^T."""
        n, (N, K) = qw.names, qw.shape
        self._use(n["q"], n["scale"], n["zero"])
        if qw.minimum is None:
            return [helper.make_node("MatMulNBits", [a, n["q"], n["scale"], n["zero"]], [out], domain=MS,
                                     K=K, N=N, bits=qw.bits, block_size=qw.block, accuracy_level=self.acc,
                                     name=self._tmp(qw.name))]
        self._use(n["min"])
        nb = K // qw.block
        sel = self._const(f"blocksum.{K}x{qw.block}",
                          np.kron(np.eye(nb, dtype=np.float32), np.ones((qw.block, 1), np.float32)))
        y1, s, y2 = self._tmp(out), self._tmp(out), self._tmp(out)
        return [helper.make_node("MatMulNBits", [a, n["q"], n["scale"], n["zero"]], [y1], domain=MS, K=K, N=N,
                                 bits=qw.bits, block_size=qw.block, accuracy_level=self.acc, name=self._tmp(qw.name)),
                helper.make_node("MatMul", [a, sel], [s], name=self._tmp(qw.name)),
                helper.make_node("FusedMatMul", [s, n["min"]], [y2], domain=MS, transB=1, name=self._tmp(qw.name)),
                helper.make_node("Add", [y1, y2], [out], name=self._tmp(qw.name))]

    def gather(self, qw: QWeight, ids: str, out: str) -> list:
        """out = W[ids] for ids [1, T]: only the gathered rows are dequantized."""
        n, (N, K) = qw.names, qw.shape
        nb = K // qw.block
        t = lambda: self._tmp(out)  # noqa: E731
        rows, sc, sc1, qf, w3 = t(), t(), t(), t(), t()
        self._use(n["q"], n["scale"])
        ax = self._const("q.axis_last", np.array([-1], np.int64))
        nodes = [helper.make_node("Gather", [n["q"], ids], [rows], axis=0),
                 helper.make_node("Gather", [n["scale"], ids], [sc], axis=0),
                 helper.make_node("Unsqueeze", [sc, ax], [sc1])]
        if qw.bits == 4:
            lo, hi, lo1, hi1, both, q3 = t(), t(), t(), t(), t(), t()
            nodes += [helper.make_node("BitwiseAnd", [rows, self._const("q.mask4", np.array(15, np.uint8))], [lo]),
                      helper.make_node("BitShift", [rows, self._const("q.shift4", np.array(4, np.uint8))], [hi],
                                       direction="RIGHT"),
                      helper.make_node("Unsqueeze", [lo, ax], [lo1]), helper.make_node("Unsqueeze", [hi, ax], [hi1]),
                      helper.make_node("Concat", [lo1, hi1], [both], axis=-1),
                      helper.make_node("Reshape", [both, self._const(f"q.shape.00{nb}x{qw.block}",
                                                                     np.array([0, 0, nb, qw.block], np.int64))], [q3]),
                      helper.make_node("Cast", [q3], [qf], to=TensorProto.FLOAT)]
            mn, mn1, prod = t(), t(), t()
            self._use(n["min"])
            nodes += [helper.make_node("Mul", [sc1, qf], [prod]),
                      helper.make_node("Gather", [n["min"], ids], [mn], axis=0),
                      helper.make_node("Unsqueeze", [mn, ax], [mn1]),
                      helper.make_node("Add", [prod, mn1], [w3])]
        else:
            qc, shifted = t(), t()
            nodes += [helper.make_node("Cast", [rows], [qc], to=TensorProto.FLOAT),
                      helper.make_node("Sub", [qc, self._const("q.zero8f", np.array(128, np.float32))], [shifted]),
                      helper.make_node("Mul", [shifted, sc1], [w3])]
        nodes.append(helper.make_node("Reshape", [w3, self._const(f"q.shape.00{K}", np.array([0, 0, K], np.int64))],
                                      [out]))
        return nodes

    def _rows_of(self, qw: QWeight, rows: tuple[int, int] | None) -> dict[str, str]:
        """The stored names DequantizeLinear reads, or for rows (start, stop) their row-piece aliases. A piece of
        the view aliases the packed blocks (the same bytes); of the 8-bit zero points, MatMulNBits' own (the
        same values, 128): so that every piece aliases a tensor that some graph keeps."""
        n = dict(qw.names)
        if rows is None:
            return n
        parent = {"view": n["q"], "scale": n["scale"]}
        parent.update({"zero8": n["zero"]} if qw.bits == 8 else {"min": n["min"]})
        for k, p in parent.items():
            n[k] = rows_name(n[k], *rows)
            self.rows[n[k]] = (p, *rows)
            self._use(p)
        return n

    def contract_rows(self, qw: QWeight, a: str, out: str) -> list:
        """out = a @ W (a [..., N], W [N, K]: contracted over W's rows) in row pieces of at most ROWS_BYTES of
        fp32: sum over pieces of a[..., rows] @ W[rows] (each piece dequantized right before its product)."""
        N, K = qw.shape
        pieces = -(-N * K * 4 // ROWS_BYTES)
        step = -(-N // pieces)
        ax = self._const("q.axis_last", np.array([-1], np.int64))
        nodes, parts = [], []
        for start in range(0, N, step):
            stop = min(N, start + step)
            a_p, w_p, y_p = self._tmp(out), self._tmp(out), self._tmp(out)
            nodes.append(helper.make_node("Slice", [a, self._const(f"q.at{start}", np.array([start], np.int64)),
                                                    self._const(f"q.at{stop}", np.array([stop], np.int64)), ax],
                                          [a_p], name=self._tmp(qw.name)))
            nodes += self.dequantize(qw, w_p, rows=(start, stop))
            nodes.append(helper.make_node("MatMul", [a_p, w_p], [y_p], name=self._tmp(qw.name)))
            parts.append(y_p)
        nodes.append(helper.make_node("Sum", parts, [out], name=self._tmp(qw.name)))
        return nodes

    def dequantize(self, qw: QWeight, out: str, rows: tuple[int, int] | None = None) -> list:
        """out = W (float32 [N, K]) for one consumer: GatherBlockQuantized of every row of a uint8 view of the
        same bytes (rows (start, stop): only those rows, from their row-piece aliases). Its 4-bit zero points
        are explicit zeros (without them the op subtracts MatMulNBits' default 8), the 8-bit ones MatMulNBits'
        own (128); the minimum is added after, as in the forward: q * scale + minimum."""
        n, (N, K) = self._rows_of(qw, rows), qw.shape
        if rows is not None:
            N = rows[1] - rows[0]
        nb = K // qw.block
        every_row = self._const(f"q.rows.{N}", np.arange(N, dtype=np.int64))
        if qw.bits == 8:
            self._use(n["view"], n["scale"], n["zero8"])
            return [helper.make_node("GatherBlockQuantized", [n["view"], every_row, n["scale"], n["zero8"]], [out],
                                     domain=MS, gather_axis=0, quantize_axis=1, block_size=qw.block, bits=8,
                                     name=self._tmp(qw.name))]
        self._use(n["view"], n["scale"], n["min"])
        zero = self._const(f"q.zero4.{N}x{(nb + 1) // 2}", np.zeros((N, (nb + 1) // 2), np.uint8))
        d, d3, w3, m3 = self._tmp(out), self._tmp(out), self._tmp(out), self._tmp(out)
        return [helper.make_node("GatherBlockQuantized", [n["view"], every_row, n["scale"], zero], [d], domain=MS,
                                 gather_axis=0, quantize_axis=1, block_size=qw.block, bits=4, name=self._tmp(qw.name)),
                helper.make_node("Reshape", [d, self._const(f"q.shape.{N}x{nb}x{qw.block}",
                                                            np.array([N, nb, qw.block], np.int64))], [d3]),
                helper.make_node("Unsqueeze", [n["min"], self._const("q.axis_last", np.array([-1], np.int64))], [m3]),
                helper.make_node("Add", [d3, m3], [w3]),
                helper.make_node("Reshape", [w3, self._const(f"q.shape.{N}x{K}", np.array([N, K], np.int64))], [out])]


def _attrs(nd) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in nd.attribute}


def _is_linear(nd, w: str) -> str | None:
    """The activation input when nd computes x @ W^T with nothing else, else None."""
    a = _attrs(nd)
    if nd.op_type == "FusedMatMul" and nd.domain == MS and list(nd.input)[1:] == [w] and a.get("transB") == 1 \
            and not a.get("transA") and a.get("alpha", 1.0) == 1.0 and not a.get("transBatchA") \
            and not a.get("transBatchB"):
        return nd.input[0]
    if nd.op_type == "Gemm" and nd.domain in ("", "ai.onnx") and len(nd.input) == 2 and nd.input[1] == w \
            and a.get("transB") == 1 and not a.get("transA") and a.get("alpha", 1.0) == 1.0:
        return nd.input[0]
    return None


@dataclass
class Fused:
    """Linear layers that read the same input (a layer's q/k/v projections, its gate/up projections) as ONE
    MatMulNBits over their weights stacked along N, then a Split: one kernel call instead of one per layer, the
    same numbers (each output column is its own dot product over the same blocks). The stacked weight is what
    weights.bin stores; each member's tensors (for the backward's DequantizeLinear) are row aliases of it."""
    qw: QWeight                                # the members' blocks stacked along N
    members: tuple[str, ...]
    rows: dict[str, tuple[int, int]]           # member -> its rows of the stack


def fused_name(members: tuple[str, ...]) -> str:
    return f"{members[0]}.fused{len(members)}"


def linear_groups(graph, qweights: dict[str, QWeight]) -> list[tuple[str, ...]]:
    """The sets of quantized weights that some input feeds as x @ W^T in `graph` (two or more, each once, with
    the same K, bits, block and kind of zero point), in the graph's order."""
    by_input: dict[str, list[str]] = {}
    for nd in graph.node:
        ws = [x for x in nd.input if x in qweights]
        x = _is_linear(nd, ws[0]) if len(ws) == 1 else None
        if x is not None:
            by_input.setdefault(x, []).append(ws[0])
    groups, taken = [], set()
    for ws in by_input.values():
        if len(ws) < 2 or len(set(ws)) != len(ws) or taken & set(ws):
            continue
        q0 = qweights[ws[0]]
        if any((qweights[w].shape[1], qweights[w].bits, qweights[w].block, qweights[w].minimum is None)
               != (q0.shape[1], q0.bits, q0.block, q0.minimum is None) for w in ws):
            continue
        groups.append(tuple(ws))
        taken |= set(ws)
    return groups


def fuse(members: tuple[str, ...], qweights: dict[str, QWeight]) -> Fused:
    qs = [qweights[m] for m in members]
    rows, start = {}, 0
    for m, q in zip(members, qs):
        rows[m] = (start, start + q.shape[0])
        start += q.shape[0]
    sources = {q.source for q in qs}
    qw = QWeight(fused_name(members), qs[0].bits, qs[0].block, np.concatenate([q.q for q in qs]),
                 np.concatenate([q.scale for q in qs]),
                 None if qs[0].minimum is None else np.concatenate([q.minimum for q in qs]),
                 sources.pop() if len(sources) == 1 else "mixed")
    return Fused(qw, tuple(members), rows)


def _fusion_plan(graph, qweights: dict[str, QWeight], fused: dict[str, Fused]) -> tuple[dict, set]:
    """{index of a group's first linear node: (Fused, input, [member outputs])} and the indices of the other
    members' nodes, for every input that feeds ALL members of a group (each once) as x @ W^T."""
    member_of = {m: f for f in fused.values() for m in f.members}
    by_name = {f.qw.name: f for f in fused.values()}
    uses: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
    for i, nd in enumerate(graph.node):
        ws = [x for x in nd.input if x in qweights]
        x = _is_linear(nd, ws[0]) if len(ws) == 1 and ws[0] in member_of else None
        if x is not None:
            uses.setdefault((x, member_of[ws[0]].qw.name), []).append((i, ws[0], nd.output[0]))
    emit, skip = {}, set()
    for (x, fname), us in uses.items():
        f = by_name[fname]
        got = {w: (i, out) for i, w, out in us}
        if len(got) != len(us) or set(got) != set(f.members):
            continue
        first = min(i for i, _, _ in us)
        emit[first] = (f, x, [got[m][1] for m in f.members])
        skip |= {i for i, _, _ in us if i != first}
    return emit, skip


def apply(graph, qweights: dict[str, QWeight], accuracy_level: int,
          ids_names: tuple[str, ...] = ("input_ids", "x_ids"), fused: dict[str, Fused] | None = None) -> dict:
    """Rewrite every use of the named float initializers (in place). Returns {stored tensor name: array}
    of what the graph now references (quantized tensors, views, constants, row pieces), a count of each kind of
    use, and the row pieces' aliases {name: (stored tensor, first byte, bytes)} for the tensor table.
    fused: {name: Fused}: where an input feeds all of a group's members, one MatMulNBits over the stack and a
    Split; every member's stored tensors then alias rows of the stack's (`linear_groups`, `fuse`)."""
    rw = _Rewriter(accuracy_level)
    counts = {"matmul_nbits": 0, "gather": 0, "dequantize": 0}
    fused = fused or {}
    emit, skip = _fusion_plan(graph, qweights, fused)
    nodes = []
    for i, nd in enumerate(graph.node):
        if i in skip:
            continue
        if i in emit:
            f, x, outs = emit[i]
            y = rw._tmp(f.qw.name + ".y")
            sizes = [f.rows[m][1] - f.rows[m][0] for m in f.members]
            nodes += rw.matmul(f.qw, x, y)
            nodes.append(helper.make_node("Split", [y, rw._const("split." + "_".join(map(str, sizes)),
                                                                   np.array(sizes, np.int64))],
                                          outs, axis=-1, name=rw._tmp(f.qw.name)))
            counts["matmul_nbits"] += len(f.members)
            counts["matmul_nbits_fused"] = counts.get("matmul_nbits_fused", 0) + 1
            continue
        ws = [x for x in nd.input if x in qweights]
        if not ws:
            nodes.append(nd)
            continue
        w = ws[0]
        qw = qweights[w]
        x = _is_linear(nd, w) if len(ws) == 1 else None
        if x is not None:
            nodes += rw.matmul(qw, x, nd.output[0])
            counts["matmul_nbits"] += 1
            continue
        N, K = qw.shape
        if len(ws) == 1 and nd.op_type == "MatMul" and nd.domain in ("", "ai.onnx") and nd.input[1] == w \
                and nd.input[0] != w and N * K * 4 > ROWS_BYTES:
            nodes += rw.contract_rows(qw, nd.input[0], nd.output[0])
            counts["dequantize_rows"] = counts.get("dequantize_rows", 0) + 1
            continue
        if len(ws) == 1 and nd.op_type == "Gather" and nd.input[0] == w and _attrs(nd).get("axis", 0) == 0 \
                and nd.input[1] in ids_names:
            nodes += rw.gather(qw, nd.input[1], nd.output[0])
            counts["gather"] += 1
            continue
        ren = {}
        for wi in dict.fromkeys(ws):
            tmp = rw._tmp(wi + ".dq")
            nodes += rw.dequantize(qweights[wi], tmp)
            ren[wi] = tmp
            counts["dequantize"] += 1
        new = helper.make_node(nd.op_type, [ren.get(i, i) for i in nd.input], list(nd.output), name=nd.name,
                               domain=nd.domain)
        new.attribute.extend(nd.attribute)
        nodes.append(new)
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [t for t in graph.initializer if t.name not in qweights]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    stored: dict[str, np.ndarray] = {}
    for name, arr in rw.consts.items():
        graph.initializer.append(numpy_helper.from_array(arr, name))
    # where each stored tensor's bytes live: a member of a fused group keeps none of its own, its tensors are
    # rows of the stack's (the 8-bit DequantizeLinear zero points: MatMulNBits' own, the same values, 128)
    stack = {m: f for f in fused.values() for m in f.members}
    kind_in_stack = {"q": "q", "view": "q", "scale": "scale", "zero": "zero", "zero8": "zero", "min": "min"}

    def home(qw: QWeight, kind: str, start: int, stop: int) -> tuple[QWeight, str, int, int]:
        f = stack.get(qw.name)
        if f is None:
            return qw, ("q" if kind == "view" else kind), start, stop
        a = f.rows[qw.name][0]
        return f.qw, kind_in_stack[kind], a + start, a + stop

    whole_of: dict[str, dict[str, np.ndarray]] = {}      # each weight's stored tensors, packed once
    row_aliases: dict[str, tuple[str, int, int]] = {}

    def whole(qw: QWeight, kind: str) -> tuple[str, np.ndarray]:
        if qw.name not in whole_of:
            whole_of[qw.name] = qw.stored()
        name = qw.names[kind]
        return name, whole_of[qw.name][name]

    def put(name: str, qw: QWeight, kind: str, start: int, stop: int, alias: bool) -> None:
        """Store `name` = rows start..stop of qw's tensor of this kind (an alias of those bytes when `alias`)."""
        hq, hkind, a, b = home(qw, kind, start, stop)
        parent, arr = whole(hq, hkind)
        piece = arr if (a, b) == (0, hq.shape[0]) else np.ascontiguousarray(arr[a:b])
        stored[name] = piece
        if alias or hq is not qw:
            per_row = arr.nbytes // hq.shape[0]
            row_aliases[name] = (parent, a * per_row, (b - a) * per_row)
        # a view: the packed rows [rows, K/block, blob] as the uint8 [rows, K * bits / 8] GatherBlockQuantized reads
        graph.initializer.append(numpy_helper.from_array(piece.reshape(len(piece), -1) if kind == "view" else piece,
                                                         name))

    for qw in list(qweights.values()) + [f.qw for f in fused.values()]:
        for kind, name in qw.names.items():
            if name in rw.used and kind != "view":
                put(name, qw, kind, 0, qw.shape[0], alias=False)
        if qw.names["view"] in rw.used:     # [N, K] over the packed bytes (the exporter aliases them)
            put(qw.names["view"], qw, "view", 0, qw.shape[0], alias=qw.name in stack)
    parents = {k: (qw, kind) for qw in qweights.values() for kind, k in qw.names.items()}
    for name, (parent, start, stop) in rw.rows.items():
        qw, kind = parents[parent]
        put(name, qw, "view" if kind == "q" else kind, start, stop, alias=True)
    return {"stored": stored, "counts": counts, "row_aliases": row_aliases}


def kernel_tensors(qweights: dict[str, QWeight]) -> set[str]:
    """Stored tensors that MatMulNBits reads: ONNX Runtime pre-packs these into its kernel layout."""
    return {qw.names[k] for qw in qweights.values() for k in ("q", "scale", "zero")}


def aliases(qweights: dict[str, QWeight]) -> dict[str, str]:
    """view name -> the packed tensor whose bytes it reinterprets (uint8 [N, K * bits / 8] over [N, K/32, blob])."""
    return {qw.names["view"]: qw.names["q"] for qw in qweights.values()}


def describe(scheme: str, qweights: dict[str, QWeight], counts: dict | None = None,
             accuracy: dict | None = None, fused: dict[str, Fused] | None = None) -> dict:
    d = {"scheme": scheme}
    if scheme == "fp32":
        d["weights"] = "float32"
        return d
    by_bits: dict[str, int] = {}
    sources: dict[str, int] = {}
    for qw in qweights.values():
        by_bits[str(qw.bits)] = by_bits.get(str(qw.bits), 0) + 1
        sources[qw.source] = sources.get(qw.source, 0) + 1
    d.update({
        "weights": "blocks of 32 along K in MatMulNBits layout; 4 bits: scale*q + minimum (float scale and "
                   "minimum per block); 8 bits: (q - 128)*scale",
        "op": "com.microsoft.MatMulNBits for x @ W^T, a gather of quantized rows for the embedding, "
              "com.microsoft.GatherBlockQuantized of every row per use elsewhere (the backward)",
        "onnxruntime": ONNXRUNTIME,                      # the oldest release that runs these graphs
        "quantized": sorted(qweights),
        "bits": {n: qw.bits for n, qw in sorted(qweights.items())},
        "sources": sources,
        "block_size": INT4_BLOCK,                        # of every requantized weight; carried ones: `blocks`
        "blocks": {n: qw.block for n, qw in sorted(qweights.items()) if qw.block != INT4_BLOCK},
        "accuracy_level": dict(accuracy or ACCURACY),
        "uses": dict(counts or {}),
        "kept_float": "1-D tensors (norm weights) and non-weight constants",
        "fused": {n: list(f.members) for n, f in sorted((fused or {}).items())},
    })
    return d
