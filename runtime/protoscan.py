"""A tiny read-only protobuf walker for ONNX files, so that a device install with only onnxruntime can check a
graph before loading it (onnxruntime has no proto parser, and the `onnx` package is not a runtime dependency).

It reads the wire format directly and looks only at what the runtime must verify: every tensor stored as
external data (graph initializers, Constant/attribute tensors, sub-graphs, functions), with its name, element
type, dims and external_data entries (location, offset, length), plus the graph's input/output names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from absorber.errors import AbsorberError

# ONNX TensorProto.DataType -> numpy dtype name
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16", 21: "uint4", 22: "int4"}


class ProtoError(ValueError):
    pass


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ProtoError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 70:
            raise ProtoError("varint too long")


def fields(buf: memoryview):
    """Yield (field_number, wire_type, value) where value is an int (varint/fixed) or a memoryview (bytes)."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        fn, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            if i + 8 > n:
                raise ProtoError("truncated fixed64")
            v = int.from_bytes(buf[i:i + 8], "little"); i += 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            if i + ln > n:
                raise ProtoError("truncated length-delimited field")
            v = buf[i:i + ln]; i += ln
        elif wt == 5:
            if i + 4 > n:
                raise ProtoError("truncated fixed32")
            v = int.from_bytes(buf[i:i + 4], "little"); i += 4
        else:
            raise ProtoError(f"unsupported wire type {wt}")
        yield fn, wt, v


@dataclass
class ExternalTensor:
    name: str
    dtype: str
    dims: list[int]
    location: str
    offset: int = 0
    length: int | None = None


@dataclass
class GraphInfo:
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    initializers: list[str] = field(default_factory=list)
    external: list[ExternalTensor] = field(default_factory=list)


def _tensor(buf: memoryview, out: list[ExternalTensor]) -> str:
    name, dims, dtype, loc_ext, entries = "", [], 0, False, {}
    for fn, wt, v in fields(buf):
        if fn == 1:
            if wt == 2:   # packed dims
                j = 0
                while j < len(v):
                    d, j = _varint(v, j)
                    dims.append(d)
            else:
                dims.append(v)
        elif fn == 2:
            dtype = v
        elif fn == 8:
            name = bytes(v).decode("utf-8", "replace")
        elif fn == 13:
            k = val = ""
            for f2, _, v2 in fields(v):
                if f2 == 1:
                    k = bytes(v2).decode("utf-8", "replace")
                elif f2 == 2:
                    val = bytes(v2).decode("utf-8", "replace")
            entries[k] = val
        elif fn == 14:
            loc_ext = v == 1
    if loc_ext or entries:
        out.append(ExternalTensor(name, ONNX_DTYPES.get(dtype, f"onnx:{dtype}"), dims, entries.get("location", ""),
                                  int(entries.get("offset", 0) or 0),
                                  int(entries["length"]) if entries.get("length") else None))
    return name


def _attribute(buf: memoryview, out: list[ExternalTensor]) -> None:
    for fn, wt, v in fields(buf):
        if fn in (5, 10) and wt == 2:      # t, tensors
            _tensor(v, out)
        elif fn in (6, 11) and wt == 2:    # g, graphs
            _graph(v, out)


def _node(buf: memoryview, out: list[ExternalTensor]) -> None:
    for fn, wt, v in fields(buf):
        if fn == 5 and wt == 2:
            _attribute(v, out)


def _value_info_name(buf: memoryview) -> str:
    for fn, wt, v in fields(buf):
        if fn == 1 and wt == 2:
            return bytes(v).decode("utf-8", "replace")
    return ""


def _graph(buf: memoryview, out: list[ExternalTensor], info: GraphInfo | None = None) -> None:
    for fn, wt, v in fields(buf):
        if wt != 2:
            continue
        if fn == 1:
            _node(v, out)
        elif fn == 5:
            name = _tensor(v, out)
            if info is not None:
                info.initializers.append(name)
        elif fn == 11 and info is not None:
            info.inputs.append(_value_info_name(v))
        elif fn == 12 and info is not None:
            info.outputs.append(_value_info_name(v))


def scan_model(path: str) -> GraphInfo:
    """Walk an .onnx file: graph inputs/outputs, initializer names, every external-data tensor."""
    with open(path, "rb") as f:
        data = f.read()
    info = GraphInfo()
    try:
        found_graph = False
        for fn, wt, v in fields(memoryview(data)):
            if fn == 7 and wt == 2:          # ModelProto.graph
                _graph(v, info.external, info)
                found_graph = True
            elif fn == 25 and wt == 2:       # ModelProto.functions
                for f2, w2, v2 in fields(v):
                    if f2 == 7 and w2 == 2:  # FunctionProto.node
                        _node(v2, info.external)
        if not found_graph:
            raise ProtoError("no graph")
    except ProtoError as e:
        raise AbsorberError(f"{path}: not a valid ONNX model ({e})") from None
    return info


def _fields_at(buf: memoryview, base: int):
    """fields() with the absolute offset of each value in the file: (field, wire type, value, offset)."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        fn, wt = key >> 3, key & 7
        start = i
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = None, i + 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            start = i
            v, i = buf[i:i + ln], i + ln
        elif wt == 5:
            v, i = None, i + 4
        else:
            raise ProtoError(f"unsupported wire type {wt}")
        yield fn, wt, v, base + start


def _int_attributes(nd: memoryview, npos: int, op_type: str):
    """(op_type matches, its integer attributes {name: (offset, value)}, its graph-valued attributes)."""
    op, attrs = "", []
    for f3, w3, v3, p3 in _fields_at(nd, npos):
        if f3 == 4 and w3 == 2:
            op = bytes(v3).decode("utf-8", "replace")
        elif f3 == 5 and w3 == 2:
            attrs.append((v3, p3))
    found, graphs = {}, []
    for a, apos in attrs:
        name, site = "", None
        for f4, w4, v4, p4 in _fields_at(a, apos):
            if f4 == 1 and w4 == 2:
                name = bytes(v4).decode("utf-8", "replace")
            elif f4 == 3 and w4 == 0:
                site = (p4, v4)
            elif f4 == 6 and w4 == 2:            # AttributeProto.g: a sub-graph (If's branches)
                graphs.append((v4, p4))
        if name and site is not None:
            found[name] = site
    return op == op_type, found, graphs


def _graph_name(g: memoryview, gpos: int) -> str:
    for f, w, v, _ in _fields_at(g, gpos):
        if f == 2 and w == 2:
            return bytes(v).decode("utf-8", "replace")
    return ""


def node_int_attributes(data: bytes, op_type: str, graph: str | None = None) -> list[dict[str, tuple[int, int]]]:
    """For every top-level graph node of op_type, its integer attributes: name -> (file offset of the varint,
    value), so that a setting such as MatMulNBits' accuracy_level can be read, and changed in place when it is
    one byte (below 128: the file keeps its length), without the onnx package. graph: instead, the nodes of the
    sub-graph of that name held by a top-level node (a combined bundle graph's If branches: export/combined.py)."""
    nodes = []
    try:
        for fn, wt, g, gpos in _fields_at(memoryview(data), 0):
            if fn != 7 or wt != 2:
                continue
            for f2, w2, nd, npos in _fields_at(g, gpos):
                if f2 != 1 or w2 != 2:
                    continue
                match, found, subs = _int_attributes(nd, npos, op_type)
                if graph is None:
                    if match:
                        nodes.append(found)
                    continue
                for sg, spos in subs:
                    if _graph_name(sg, spos) != graph:
                        continue
                    for f5, w5, snd, snpos in _fields_at(sg, spos):
                        if f5 == 1 and w5 == 2:
                            m5, found5, _ = _int_attributes(snd, snpos, op_type)
                            if m5:
                                nodes.append(found5)
    except ProtoError as e:
        raise AbsorberError(f"not a valid ONNX model ({e})") from None
    return nodes
