"""Graph rewrites that let ONNX Runtime's own fusions and fast kernels find the traced graph's patterns.

At one token per call a decoder's time is mostly per-node overhead (~2.5 us a node on the 2-core EPYC of
benchmarks/decode.md), so fewer nodes is faster decoding. The norm and rotary rewrites touch only the decoder:
the train step's backward was traced through the forward as it is and reads its intermediate values. The powers
rewrite (below) is for the train step, and changes no value.

RMS norm. transformers' RMSNorm traces to Pow(x, 2) -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Reciprocal ->
Mul(x, .) -> Mul(weight, .): seven nodes, which ORT's SimplifiedLayerNormFusion does not match: it looks for
x / Sqrt(.). Written that way (Div instead of Reciprocal + Mul), ORT fuses each norm into its one
SimplifiedLayerNormalization node when the session is created, and the file keeps only standard ONNX ops (that
fused op lives in ORT's copy of the ONNX domain, which onnx.checker rejects). The same formula to float rounding.

Powers (train step). The traced train step squares each norm's input, Pow(x, 2) on [T, H], and its backward
multiplies by Pow(x, 1) = x. ONNX Runtime's CPU Pow is std::pow per element (2.9 ms for Pow(x, 1) on [768, 576]
against 0.04 ms for a copy; Pow(x, 2) 0.10 ms against Mul(x, x)'s 0.03 ms); `powers_as_products` writes them as
Identity and Mul(x, x), the same values bit for bit. (The backward's Pow(u, 3) stays: on [T, 1] it costs nothing,
and (u * u) * u can differ from std::pow's correctly rounded cube in the last bit.)
"""
from __future__ import annotations

from onnx import helper, numpy_helper


def index_graph(graph) -> tuple[dict, dict, dict, set]:
    """constants (initializers and Constant nodes) by name, each value's producer, its consumers, graph outputs."""
    consts = {t.name: t for t in graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute
                   and n.attribute[0].name == "value"})
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return consts, producer, consumers, {o.name for o in graph.output}


def _made_by(producer: dict, name: str, op: str):
    """The standard-domain node of type `op` that writes `name`, else None."""
    nd = producer.get(name)
    return nd if nd is not None and nd.op_type == op and nd.domain in ("", "ai.onnx") else None


def scalar(consts: dict, name: str) -> float | None:
    """The value of a one-element constant (index_graph's consts), else None."""
    t = consts.get(name)
    if t is None:
        return None
    v = numpy_helper.to_array(t)
    return float(v.reshape(-1)[0]) if v.size == 1 else None


def rms_norms_as_division(graph) -> int:
    """x * Reciprocal(Sqrt(mean(x^2) + eps)) -> x / Sqrt(mean(x^2) + eps) in every RMS norm of `graph` (in
    place); returns how many. Only where the Reciprocal and the Mul have no other consumer."""
    consts, producer, consumers, outputs = index_graph(graph)

    def made_by(name: str, op: str):
        return _made_by(producer, name, op)

    drop: set[int] = set()
    for rc in graph.node:
        if rc.op_type != "Reciprocal" or rc.domain not in ("", "ai.onnx"):
            continue
        users = consumers.get(rc.output[0], [])
        if len(users) != 1 or users[0].op_type != "Mul" or rc.output[0] in outputs:
            continue
        mul = users[0]
        sq = made_by(rc.input[0], "Sqrt")
        add = sq and made_by(sq.input[0], "Add")
        if add is None:
            continue
        mean = next((made_by(i, "ReduceMean") for i in add.input if made_by(i, "ReduceMean")), None)
        eps = [i for i in add.input if mean is None or i != mean.output[0]]
        pw = mean and made_by(mean.input[0], "Pow")
        if pw is None or len(eps) != 1 or scalar(consts, eps[0]) is None or scalar(consts, pw.input[1]) != 2.0:
            continue
        x = pw.input[0]
        if sorted(mul.input) != sorted([x, rc.output[0]]):
            continue
        mul.op_type = "Div"
        del mul.input[:]
        mul.input.extend([x, sq.output[0]])
        drop.add(id(rc))
    keep = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    return len(drop)


# ------------------------------------------------------------------------------------------------ rotary embedding
# The traced rotary embedding is, per layer and for q and for k, t * cos + cat(-t[..., h:], t[..., :h]) * sin:
# Mul, two Slices, Neg, Concat, Mul, Add. com.microsoft.RotaryEmbedding does it in one node from tables of cos and
# sin by position ([positions, head_dim / 2]), which are computed here by running the graph's own cos / sin nodes
# on positions 0..P-1 (the same kernels, so the same values). Skipped where the tables would exceed TABLE_BYTES
# (Gemma-3-270M: 32k positions x 128 x 4 B x cos/sin x two frequency bases, 64 MB).
TABLE_BYTES = 8 << 20


def _const_array(consts: dict, name: str):
    t = consts.get(name)
    return None if t is None else numpy_helper.to_array(t)


def _ancestors(graph, names: list[str], producer: dict) -> list:
    seen, order, stack = set(), [], list(names)
    while stack:
        n = producer.get(stack.pop())
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        order.append(n)
        stack.extend(n.input)
    keep = {id(n) for n in order}
    return [n for n in graph.node if id(n) in keep]       # graph order is topological


def _tables(graph, cos: str, sin: str, positions: int, position_ids: str, producer: dict):
    """[P, h] cos and sin tables from the graph's own nodes, or None when they read anything but position ids
    and constants, or their two halves differ."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    nodes = _ancestors(graph, [cos, sin], producer)
    made = {o for n in nodes for o in n.output}
    inits = {t.name for t in graph.initializer}
    reads = {i for n in nodes for i in n.input if i and i not in made}
    if reads - inits - {position_ids}:
        return None
    sub = helper.make_graph(nodes, "tables", [helper.make_tensor_value_info(position_ids, TensorProto.INT64,
                                                                              [1, positions])],
                            [helper.make_tensor_value_info(cos, TensorProto.FLOAT, None),
                             helper.make_tensor_value_info(sin, TensorProto.FLOAT, None)],
                            [t for t in graph.initializer if t.name in reads])
    mp = helper.make_model(sub, opset_imports=[helper.make_opsetid("", 18)])
    mp.ir_version = min(mp.ir_version, onnx.IR_VERSION)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        c, s = ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {position_ids: np.arange(positions, dtype=np.int64)[None]})
    except Exception:  # noqa: BLE001 - a sub-graph ORT cannot run alone: keep the traced nodes
        return None
    c, s = c.reshape(positions, -1), s.reshape(positions, -1)
    h = c.shape[1] // 2
    if c.shape[1] % 2 or not (np.array_equal(c[:, :h], c[:, h:]) and np.array_equal(s[:, :h], s[:, h:])):
        return None
    return np.ascontiguousarray(c[:, :h]), np.ascontiguousarray(s[:, :h])


def rotary_as_kernel(graph, positions: int, position_ids: str = "position_ids") -> int:
    """Rewrite each traced rotary embedding of `graph` as one com.microsoft.RotaryEmbedding (in place); returns
    how many. Nothing changes when the tables would exceed TABLE_BYTES or the pattern is not the plain one."""
    consts, producer, consumers, outputs = index_graph(graph)

    def made_by(name: str, op: str):
        return _made_by(producer, name, op)

    def half_slice(nd, t: str):
        """(start, end) of a Slice of t along the last axis with step 1, else None."""
        if nd is None or nd.input[0] != t or len(nd.input) < 4:
            return None
        st, en, ax = (_const_array(consts, nd.input[i]) for i in (1, 2, 3))
        step = _const_array(consts, nd.input[4]) if len(nd.input) > 4 and nd.input[4] else None
        if st is None or en is None or ax is None or st.size != 1 or int(ax.reshape(-1)[0]) not in (-1, 3) \
                or (step is not None and int(step.reshape(-1)[0]) != 1):
            return None
        return int(st.reshape(-1)[0]), int(en.reshape(-1)[0])

    found = []          # (add, t, cos, sin, nodes to drop)
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        muls = [made_by(i, "Mul") for i in add.input]
        if None in muls:
            continue
        for m_cos, m_sin in (muls, muls[::-1]):
            cat = next((made_by(i, "Concat") for i in m_sin.input if made_by(i, "Concat")), None)
            if cat is None or len(cat.input) != 2:
                continue
            neg = made_by(cat.input[0], "Neg")
            lo = made_by(cat.input[1], "Slice")
            hi = neg and made_by(neg.input[0], "Slice")
            if hi is None or lo is None:
                continue
            t = lo.input[0]
            if t not in m_cos.input:
                continue
            cos = m_cos.input[1] if m_cos.input[0] == t else m_cos.input[0]
            sin = m_sin.input[1] if m_sin.input[0] == cat.output[0] else m_sin.input[0]
            found.append((add, t, cos, sin, (half_slice(hi, t), half_slice(lo, t)),
                          [m_cos, m_sin, cat, neg, hi, lo, add]))
            break
    tables: dict[tuple[str, str], tuple[str, str] | None] = {}
    new_inits = []
    drop: set[int] = set()
    put: dict[int, object] = {}
    for add, t, cos, sin, (hi, lo), nodes in found:
        if (cos, sin) not in tables:
            tables[(cos, sin)] = None
            tb = _tables(graph, cos, sin, positions, position_ids, producer)
            if tb is not None and tb[0].nbytes + tb[1].nbytes <= TABLE_BYTES:
                k = len(new_inits) // 2
                names = (f"rotary.cos{k}", f"rotary.sin{k}")
                new_inits += [numpy_helper.from_array(tb[0], names[0]), numpy_helper.from_array(tb[1], names[1])]
                tables[(cos, sin)] = names + (tb[0].shape[1],)
        tb = tables[(cos, sin)]
        if tb is None or hi is None or lo is None or lo[0] != 0 or lo[1] != tb[2] or hi[0] != tb[2]:
            continue
        inner = [n for n in nodes if n is not add]
        if any(len(consumers.get(o, [])) != 1 for n in inner for o in n.output):
            continue
        for n in nodes:
            drop.add(id(n))
        put[id(add)] = helper.make_node("RotaryEmbedding", [t, position_ids, tb[0], tb[1]], [add.output[0]],
                                        domain="com.microsoft", interleaved=0,
                                        name=f"{add.name or add.output[0]}.rotary")
    if not put:
        return 0
    nodes = [put.get(id(n), n) for n in graph.node if id(n) not in drop or id(n) in put]
    # the cos / sin nodes no layer reads any more
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    return len(put)


# ------------------------------------------------------------------------------------------------ small powers
def powers_as_products(graph) -> int:
    """Pow(x, 1) -> Identity(x) and Pow(x, 2) -> Mul(x, x) in `graph` (in place, the node order kept); returns
    how many. The same values bit for bit: x^1 = x, and x^2 rounds once either way."""
    consts, _, _, _ = index_graph(graph)
    done = 0
    for nd in graph.node:
        e = scalar(consts, nd.input[1]) if nd.op_type == "Pow" and nd.domain in ("", "ai.onnx") else None
        if e not in (1.0, 2.0):
            continue
        x = nd.input[0]
        del nd.input[:]
        nd.op_type = "Identity" if e == 1.0 else "Mul"
        nd.input.extend([x] if e == 1.0 else [x, x])
        done += 1
    return done
