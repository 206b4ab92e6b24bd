"""Weight-only quantization of the frozen base as DequantizeLinear initializers (numpy + onnx, no torch).

Every 2-D frozen weight W [rows, cols] (linear layers [out, in], the embedding / lm_head table [vocab, hidden]) is
stored quantized and dequantized in the graph by one `DequantizeLinear` whose output keeps W's name, so the rest of
both graphs is untouched and gradients flow through the float result:
  int8: symmetric, one scale per row (axis 0) -> per output channel of a linear layer, per token of a table.
  int4: symmetric, blocks of `block` consecutive columns (axis 1, opset-21 block_size) -> blocks along the
        reduction dimension of a linear layer; values in [-8, 7], scale = max|block| / 7.
Norm weights and other 1-D tensors stay float32. The dequantized values are exactly what the reference model must
hold to reproduce the graphs (`dequantized`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from absorber.bundle_format import INT4_BLOCK, QUANT_SCHEMES as SCHEMES, quantized_names

# ONNX Runtime fuses DequantizeLinear(int4) + MatMul into MatMulNBits with int8 activations by default (a few %
# error in the gradients); accuracy level 1 keeps float activations and matches the dequantized float model.
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


@dataclass
class QTensor:
    name: str                 # the float tensor's name (the DequantizeLinear output)
    q: np.ndarray             # int8 values (int4 values live in int8 here, packed on write)
    scale: np.ndarray         # float32
    axis: int
    block_size: int           # 0 = per-axis
    bits: int

    @property
    def q_name(self) -> str:
        return quantized_names(self.name, self.bits)[0]

    @property
    def scale_name(self) -> str:
        return quantized_names(self.name, self.bits)[1]

    def dequantized(self) -> np.ndarray:
        if self.block_size:
            s = np.repeat(self.scale, self.block_size, axis=1)[:, : self.q.shape[1]]
        else:
            s = self.scale[:, None]
        return (self.q.astype(np.float32) * s).astype(np.float32)

    def tensors(self) -> list[TensorProto]:
        if self.bits == 8:
            qt = numpy_helper.from_array(self.q.astype(np.int8), self.q_name)
        else:
            qt = TensorProto()
            qt.name = self.q_name
            qt.data_type = TensorProto.INT4
            qt.dims.extend(self.q.shape)
            qt.raw_data = pack_int4(self.q)
        return [qt, numpy_helper.from_array(self.scale.astype(np.float32), self.scale_name)]

    def node(self):
        kw = {"axis": self.axis}
        if self.block_size:
            kw["block_size"] = self.block_size
        return helper.make_node("DequantizeLinear", [self.q_name, self.scale_name], [self.name],
                                name=f"{self.name}.dequantize", **kw)


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 layout: two values per byte, element 2i in the low nibble."""
    flat = q.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    u = (flat.astype(np.uint8) & 0x0F)
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def _block(cols: int, block: int) -> int:
    for b in (block, 64, 32, 16, 8, 4, 2, 1):
        if b <= block and cols % b == 0:
            return b
    return 1


def quantize(name: str, w: np.ndarray, scheme: str, block: int = INT4_BLOCK) -> QTensor:
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"{name}: only 2-D weights are quantized (shape {w.shape})")
    if scheme == "int8":
        scale = (np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0).astype(np.float32)
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        return QTensor(name, q, scale, axis=0, block_size=0, bits=8)
    if scheme == "int4":
        rows, cols = w.shape
        b = _block(cols, block)
        wb = w.reshape(rows, cols // b, b)
        scale = (np.maximum(np.abs(wb).max(axis=2), 1e-12) / 7.0).astype(np.float32)   # [rows, cols/b]
        q = np.clip(np.rint(wb / scale[:, :, None]), -8, 7).astype(np.int8).reshape(rows, cols)
        return QTensor(name, q, scale, axis=1, block_size=b, bits=4)
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def quantizable(init: TensorProto) -> bool:
    return init.data_type == TensorProto.FLOAT and len(init.dims) == 2


def apply(graph, qtensors: dict[str, QTensor]) -> None:
    """Replace the initializers named in qtensors by quantized initializers + DequantizeLinear (in place)."""
    present = [t for t in graph.initializer if t.name in qtensors]
    if not present:
        return
    names = {t.name for t in present}
    keep = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    new_nodes = []
    for n in sorted(names):
        qt = qtensors[n]
        graph.initializer.extend(qt.tensors())
        new_nodes.append(qt.node())
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)


def describe(scheme: str, qtensors: dict[str, QTensor]) -> dict:
    d = {"scheme": scheme}
    if scheme == "fp32":
        d["weights"] = "float32"
        return d
    d.update({
        "weights": "int8 per-row (axis 0), symmetric" if scheme == "int8" else
                   f"int4 block-wise along axis 1 (block {INT4_BLOCK}), symmetric",
        "op": "DequantizeLinear (opset 21), output keeps the float weight's name",
        "quantized": sorted(qtensors),
        "block_size": INT4_BLOCK if scheme == "int4" else 0,
        "kept_float": "1-D tensors (norm weights) and non-weight constants",
        "session_config": dict(SESSION_CONFIG),
    })
    return d
