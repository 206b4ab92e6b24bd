"""Both graphs of a bundle as the two branches of one `If`, so that ONE ONNX Runtime session serves them.

Why: ONNX Runtime pre-packs the weights of its integer kernels (MatMulNBits) into each session's own layout, and
its Python API has no way to share those copies between two sessions (the C API's prepacked-weights container is
not exposed). Inside one session a weight is pre-packed once, whichever branch uses it (measured on SmolLM2-135M
int4: 548 -> 394 MB resident after opening, and one absorption round's peak 1385 -> 1286 MiB; the same losses to
the last digit). `session.run` executes every node of a graph whatever outputs are asked for, so a plain union of
the two graphs would run both; the `If` runs one branch per call.

Layout (docs/bundle.md): inputs = the selector `graph_is_decoder` (bool scalar) + the union of both graphs'
inputs (the names they share -- input_ids, position_ids, the adapters -- must have the same types); outputs =
the decoder's outputs then the train step's. The then-branch is the decoder, the else-branch the train step;
each branch also produces empty placeholders for the other's outputs. The frozen weights (external data) stay
initializers of the outer graph, shared by both branches; every other name of a branch (its nodes' values, its
small constants) gets the prefix "decoder/" or "train_step/", so the model stays in SSA form.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh

from absorber import bundle_format as F
from absorber.errors import AbsorberError

BRANCH_OF = {"decoder": "then_branch", "train_step": "else_branch"}


def _vi_key(v: onnx.ValueInfoProto) -> tuple:
    tt = v.type.tensor_type
    return tt.elem_type, tuple(d.dim_param or d.dim_value for d in tt.shape.dim)


def _placeholder(v: onnx.ValueInfoProto, name: str) -> onnx.NodeProto:
    """An empty tensor (every dimension 0; a rank-0 output gets one zero) of v's element type and rank."""
    tt = v.type.tensor_type
    rank = len(tt.shape.dim)
    arr = np.zeros([0] * rank if rank else [], dtype=oh.tensor_dtype_to_np_dtype(tt.elem_type))
    return oh.make_node("Constant", [], [name], value=onh.from_array(arr, name + ".value"), name=name)


def _branch(mp: onnx.ModelProto, gname: str, outer: set[str], all_outputs: list[onnx.ValueInfoProto]) -> onnx.GraphProto:
    g = mp.graph
    keep = outer | {i.name for i in g.input}
    pre = f"{gname}/"

    def ren(n: str) -> str:
        return n if (not n or n in keep) else pre + n

    nodes = []
    for n in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise AbsorberError(f"{gname} graph: node {n.name or n.op_type} holds a sub-graph; "
                                "export/combined.py combines flat graphs only")
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.input[:] = [ren(i) for i in n.input]
        m.output[:] = [ren(o) for o in n.output]
        m.name = pre + (n.name or f"node{len(nodes)}")
        nodes.append(m)
    inits = []
    for t in g.initializer:
        if t.name in outer:
            continue
        u = onnx.TensorProto()
        u.CopyFrom(t)
        u.name = ren(t.name)
        inits.append(u)
    mine = {o.name for o in g.output}
    outs = []
    for o in all_outputs:
        if o.name in mine:
            name = ren(o.name)
        else:
            name = f"{pre}empty/{o.name}"
            nodes.append(_placeholder(o, name))
        outs.append(oh.make_tensor_value_info(name, o.type.tensor_type.elem_type, None))
    vis = []
    for v in g.value_info:
        w = onnx.ValueInfoProto()
        w.CopyFrom(v)
        w.name = ren(v.name)
        vis.append(w)
    return oh.make_graph(nodes, gname, [], outs, initializer=inits, value_info=vis)


def combine(decoder: onnx.ModelProto, train_step: onnx.ModelProto, shared: set[str]) -> onnx.ModelProto:
    """The combined model. shared: names of the external (weights.bin) initializers, identical in both graphs
    (export.bundle._externalize checks it); they become the outer graph's initializers."""
    graphs = {"decoder": decoder, "train_step": train_step}
    ins: dict[str, onnx.ValueInfoProto] = {}
    for gname, mp in graphs.items():
        for i in mp.graph.input:
            if i.name in ins and _vi_key(ins[i.name]) != _vi_key(i):
                raise AbsorberError(f"input {i.name} differs between the decoder and the train step; "
                                    "cannot combine them")
            ins.setdefault(i.name, i)
    outs = list(decoder.graph.output) + list(train_step.graph.output)
    names = [o.name for o in outs]
    if len(set(names)) != len(names):
        raise AbsorberError("the decoder and the train step share an output name; cannot combine them")
    if F.COMBINED_SELECTOR in ins:
        raise AbsorberError(f"a graph already has an input named {F.COMBINED_SELECTOR}")
    outer_inits: dict[str, onnx.TensorProto] = {}
    for mp in graphs.values():
        for t in mp.graph.initializer:
            if t.name in shared:
                outer_inits.setdefault(t.name, t)
    outer = set(outer_inits)
    branches = {BRANCH_OF[g]: _branch(mp, g, outer, outs) for g, mp in graphs.items()}
    node = oh.make_node("If", [F.COMBINED_SELECTOR], names, name="absorber.graph", **branches)
    inputs = [oh.make_tensor_value_info(F.COMBINED_SELECTOR, onnx.TensorProto.BOOL, [])] + list(ins.values())
    outputs = []
    for o in outs:
        v = onnx.ValueInfoProto()
        v.CopyFrom(o)
        outputs.append(v)
    opsets: dict[str, int] = {}
    for mp in graphs.values():
        for o in mp.opset_import:
            if opsets.setdefault(o.domain, o.version) != o.version:
                raise AbsorberError(f"the graphs import opset {o.domain or 'ai.onnx'} at different versions")
    model = oh.make_model(oh.make_graph([node], "absorber.combined", inputs, outputs,
                                        initializer=list(outer_inits.values())),
                          opset_imports=[oh.make_opsetid(d, v) for d, v in opsets.items()],
                          ir_version=max(mp.ir_version for mp in graphs.values()))
    model.producer_name = "absorber.export"
    return model
