"""Both graphs of a bundle in one model, so that ONE ONNX Runtime session serves them.

Why: ONNX Runtime pre-packs the weights of its integer kernels (MatMulNBits) into each session's own layout, and
its Python API has no way to share those copies between two sessions (the C API's prepacked-weights container is
not exposed). Inside one session a weight is pre-packed once, whichever graph or sub-graph uses it (measured on
SmolLM2-135M int4: 548 -> 394 MB resident after opening, and one absorption round's peak 1385 -> 1286 MiB; the
same losses to the last digit). `session.run` executes every node of the main graph whatever outputs are asked
for, so a plain union of the two graphs would run both on every call.

Layout (`combine`, docs/bundle.md): the decoder IS the main graph, and the train step sits inside one `If` whose
then_branch it is (selector `graph_is_train_step`; the else_branch yields empty placeholders). A decoder call
(False) runs the decoder's nodes directly: an If branch costs every call 1.3-2.1 ms of sub-graph set-up, 10 % of
a token on SmolLM2-135M int4 (benchmarks/decode.md). A train-step call (True) also runs the decoder's nodes, on
empty inputs (0 tokens, 0 cached): ~2 ms against a step's seconds. So the two graphs share only the adapters
among their inputs: the train step's token inputs get the prefix "train_step/" (manifest `graphs.combined.renamed`).
The frozen weights (external data) are initializers of the main graph, read by the branch from the outer scope;
every other name inside the branch carries the prefix "train_step/", so the model stays in SSA form.

`combine_branches` writes the layout of the bundles of 2026-12-03..05 (both graphs as the two branches of one If,
selector `graph_is_decoder`); the runtime still reads those bundles, and the tests use it to prove it.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh

from absorber import bundle_format as F
from absorber.errors import AbsorberError

BRANCH_OF = {"decoder": F.COMBINED_MAIN, "train_step": "then_branch"}
BRANCH_OF_BRANCHES = {"decoder": "then_branch", "train_step": "else_branch"}     # combine_branches' layout
TRAIN_PREFIX = "train_step/"


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


def _opsets(graphs) -> list:
    opsets: dict[str, int] = {}
    for mp in graphs:
        for o in mp.opset_import:
            if opsets.setdefault(o.domain, o.version) != o.version:
                raise AbsorberError(f"the graphs import opset {o.domain or 'ai.onnx'} at different versions")
    return [oh.make_opsetid(d, v) for d, v in opsets.items()]


def combine(decoder: onnx.ModelProto, train_step: onnx.ModelProto, shared: set[str],
            shared_inputs: set[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The combined model (the module doc's layout) and the train step's renamed inputs {its name: the combined
    model's}. shared: names of the external (weights.bin) initializers, identical in both graphs
    (export.bundle._externalize checks it); they become the main graph's initializers. shared_inputs: the inputs
    both graphs read as one tensor (the adapters); every other input name the two graphs have in common is the
    train step's under the prefix "train_step/"."""
    dec_in = {i.name: i for i in decoder.graph.input}
    for n in (F.COMBINED_SELECTOR, F.COMBINED_SELECTOR_BRANCHES):
        if n in dec_in or any(i.name == n for i in train_step.graph.input):
            raise AbsorberError(f"a graph already has an input named {n}")
    renamed = {i.name: TRAIN_PREFIX + i.name for i in train_step.graph.input
               if i.name in dec_in and i.name not in shared_inputs}
    ins = dict(dec_in)
    tr = onnx.ModelProto()
    tr.CopyFrom(train_step)
    for i in tr.graph.input:
        if i.name in renamed:
            i.name = renamed[i.name]
        elif i.name in ins and _vi_key(ins[i.name]) != _vi_key(i):
            raise AbsorberError(f"input {i.name} differs between the decoder and the train step; "
                                "cannot combine them")
        ins.setdefault(i.name, i)
    for n in tr.graph.node:
        n.input[:] = [renamed.get(x, x) for x in n.input]
    dec_names = {o for n in decoder.graph.node for o in n.output} | {t.name for t in decoder.graph.initializer}
    touts = list(tr.graph.output)
    if any(o.name in dec_names or o.name in dec_in for o in touts) or \
            {o.name for o in touts} & {o.name for o in decoder.graph.output}:
        raise AbsorberError("the decoder and the train step share an output name; cannot combine them")
    inits = {t.name: t for t in decoder.graph.initializer}
    for t in tr.graph.initializer:
        if t.name in shared:
            inits.setdefault(t.name, t)
    outer = {t.name for t in tr.graph.initializer if t.name in shared}
    then = _branch(tr, "train_step", outer, touts)
    empty = [_placeholder(o, f"{TRAIN_PREFIX}empty/{o.name}") for o in touts]
    other = oh.make_graph(empty, "no_train_step", [],
                          [oh.make_tensor_value_info(e.output[0], o.type.tensor_type.elem_type, None)
                           for e, o in zip(empty, touts)])
    node = oh.make_node("If", [F.COMBINED_SELECTOR], [o.name for o in touts], name="absorber.train_step",
                        then_branch=then, else_branch=other)
    outputs = []
    for o in list(decoder.graph.output) + touts:
        v = onnx.ValueInfoProto()
        v.CopyFrom(o)
        outputs.append(v)
    inputs = [oh.make_tensor_value_info(F.COMBINED_SELECTOR, onnx.TensorProto.BOOL, [])] + list(ins.values())
    model = oh.make_model(oh.make_graph(list(decoder.graph.node) + [node], "absorber.combined", inputs, outputs,
                                        initializer=list(inits.values()), value_info=list(decoder.graph.value_info)),
                          opset_imports=_opsets((decoder, train_step)),
                          ir_version=max(mp.ir_version for mp in (decoder, train_step)))
    model.producer_name = "absorber.export"
    return model, renamed


def combine_branches(decoder: onnx.ModelProto, train_step: onnx.ModelProto, shared: set[str]) -> onnx.ModelProto:
    """The layout of the bundles of 2026-12-03..05: both graphs as the two branches of one If (selector
    `graph_is_decoder`). shared: as in `combine`; they become the outer graph's initializers."""
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
    if F.COMBINED_SELECTOR_BRANCHES in ins:
        raise AbsorberError(f"a graph already has an input named {F.COMBINED_SELECTOR_BRANCHES}")
    outer_inits: dict[str, onnx.TensorProto] = {}
    for mp in graphs.values():
        for t in mp.graph.initializer:
            if t.name in shared:
                outer_inits.setdefault(t.name, t)
    outer = set(outer_inits)
    branches = {BRANCH_OF_BRANCHES[g]: _branch(mp, g, outer, outs) for g, mp in graphs.items()}
    node = oh.make_node("If", [F.COMBINED_SELECTOR_BRANCHES], names, name="absorber.graph", **branches)
    inputs = [oh.make_tensor_value_info(F.COMBINED_SELECTOR_BRANCHES, onnx.TensorProto.BOOL, [])] + list(ins.values())
    outputs = []
    for o in outs:
        v = onnx.ValueInfoProto()
        v.CopyFrom(o)
        outputs.append(v)
    model = oh.make_model(oh.make_graph([node], "absorber.combined", inputs, outputs,
                                        initializer=list(outer_inits.values())),
                          opset_imports=_opsets(graphs.values()),
                          ir_version=max(mp.ir_version for mp in graphs.values()))
    model.producer_name = "absorber.export"
    return model
