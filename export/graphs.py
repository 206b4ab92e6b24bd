"""Torch -> ONNX: the two graphs of a bundle, before quantization and external data.

decoder:    torch.onnx.export(dynamo=True) of the model's own forward with a KV cache in/out, the hidden states of
            the loss layers out; logits are appended in ONNX (Slice on `logits_to_keep` + Gemm with the lm_head).
train_step: torch.export.export(absorber.sync.SyncLoss) -> torch.export.experimental._export_forward_backward
            (private API; torch is pinned in pyproject and tests/test_export.py pins the behaviour)
            -> aten.empty_permuted rewritten (no explicit run_decompositions: torch.onnx.export decomposes anyway,
            and a second pass doubled the export time) -> gradient outputs relabelled as user outputs
            -> torch.onnx.export(dynamo=True, optimize=False).
Both: parameters come out as initializers named by their PyTorch names; the adapters are lifted into graph inputs
and the frozen weights are kept out of constant folding (taken out, optimized, put back) BEFORE
onnxscript.optimizer runs. Folding with the adapters still initializers bakes stale transposed copies of them
into the graph (step 1 right, then a diverging trajectory), and folding a frozen weight would give the two graphs
different, duplicated initializers instead of one shared copy.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from absorber import bundle_format as F
from absorber.errors import AbsorberError

WRAP_PREFIX = "model."   # both torch wrappers hold the CausalLM as `self.model`


# ----------------------------------------------------------------------------------------------- ONNX helpers
def _rename_values(g: onnx.GraphProto, ren: dict[str, str]) -> None:
    if not ren:
        return
    for nd in g.node:
        for k, x in enumerate(nd.input):
            if x in ren:
                nd.input[k] = ren[x]
        for k, x in enumerate(nd.output):
            if x in ren:
                nd.output[k] = ren[x]
        for a in nd.attribute:
            if a.type == onnx.AttributeProto.GRAPH or a.graphs:
                raise AbsorberError("exported graph has control-flow subgraphs; the exporter does not handle them")
    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            if v.name in ren:
                v.name = ren[v.name]
    for t in g.initializer:
        if t.name in ren:
            t.name = ren[t.name]


def _used_names(g: onnx.GraphProto) -> set[str]:
    used = {x for nd in g.node for x in nd.input}
    used |= {o.name for o in g.output}
    return used


def _value_info(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def finish_graph(mp: onnx.ModelProto, adapters: list[str], frozen: set[str]) -> onnx.ModelProto:
    """Normalize names, lift adapters to inputs, optimize with frozen weights protected, put them back.

    adapters: reference names of the adapter tensors (become graph inputs, in this order, after the other inputs).
    frozen: reference names of the frozen parameters (stay initializers with exactly these names and values).
    """
    g = mp.graph
    # 1. initializer names: strip the wrapper's attribute prefix -> the model's own parameter names
    ren = {t.name: t.name[len(WRAP_PREFIX):] for t in g.initializer if t.name.startswith(WRAP_PREFIX)}
    _rename_values(g, ren)
    inits = {t.name: t for t in g.initializer}
    missing = [a for a in adapters if a not in inits]
    if missing:
        raise AbsorberError(f"adapter tensors missing from the exported graph: {missing[:3]}")
    # 2. adapters -> graph inputs (values are fed at run time); frozen -> set aside, temporarily graph inputs
    held: dict[str, TensorProto] = {}
    keep = []
    for t in g.initializer:
        if t.name in frozen or t.name in adapters:
            held[t.name] = t
        else:
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    for a in adapters:
        t = held.pop(a)
        g.input.append(_value_info(a, t.data_type, t.dims))
    tmp_inputs = []
    for n, t in held.items():
        g.input.append(_value_info(n, t.data_type, t.dims))
        tmp_inputs.append(n)
    # 3. optimize: folding can only touch true constants now
    mp = _optimize(mp)
    g = mp.graph
    # 4. frozen weights back as initializers (only those still used)
    used = _used_names(g)
    tmp = set(tmp_inputs)
    ins = [i for i in g.input if i.name not in tmp]
    del g.input[:]
    g.input.extend(ins)
    for n in tmp_inputs:
        if n in used:
            g.initializer.append(held[n])
    direct_weight_matmuls(g, {t.name for t in g.initializer if t.name in frozen})
    if not any(o.domain == "com.microsoft" for o in mp.opset_import):
        mp.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    bad = [t.name for t in g.initializer if any(t.name.endswith(s) or t.name.startswith(a)
                                                for a in adapters for s in (".lora_A", ".lora_B"))]
    if bad:
        raise AbsorberError(f"adapter values baked into the graph as constants: {bad[:3]}")
    return mp


def direct_weight_matmuls(g: onnx.GraphProto, weights: set[str]) -> int:
    """MatMul(x, Transpose(W)) -> FusedMatMul(x, W, transB=1); Transpose(Transpose(W)) -> W.

    Linear layers come out of the exporters as MatMul on a transposed weight. ONNX Runtime constant-folds
    Transpose(initializer) at session creation into a private transposed copy per session, which defeats sharing
    ONE memory copy of weights.bin between the two graphs (and, for quantized weights, would transpose the
    dequantized table on every call). With this rewrite every frozen weight is read in its stored layout.
    Returns the number of rewritten nodes.
    """
    cons: dict[str, list] = {}
    for nd in g.node:
        for x in nd.input:
            cons.setdefault(x, []).append(nd)
    graph_outputs = {o.name for o in g.output}
    drop, ren, n = set(), {}, 0

    def is_t(nd):
        perm = [a.ints for a in nd.attribute if a.name == "perm"]
        return nd.op_type == "Transpose" and nd.domain in ("", "ai.onnx") and (not perm or list(perm[0]) == [1, 0])

    for nd in list(g.node):
        if not (is_t(nd) and nd.input[0] in weights) or nd.output[0] in graph_outputs:
            continue
        w, t_out = nd.input[0], nd.output[0]
        remaining = 0
        for u in cons.get(t_out, []):
            if u.op_type == "MatMul" and u.domain in ("", "ai.onnx") and list(u.input).count(t_out) == 1:
                a, b = u.input
                new = (helper.make_node("FusedMatMul", [a, w], list(u.output), domain="com.microsoft", transB=1,
                                        name=u.name) if b == t_out else
                       helper.make_node("FusedMatMul", [w, b], list(u.output), domain="com.microsoft", transA=1,
                                        name=u.name))
                u.CopyFrom(new)
                n += 1
            elif is_t(u) and u.output[0] not in graph_outputs:
                ren[u.output[0]] = w
                drop.add(id(u))
                n += 1
            else:
                remaining += 1
        if not remaining:
            drop.add(id(nd))
    if drop:
        keep = [nd for nd in g.node if id(nd) not in drop]
        del g.node[:]
        g.node.extend(keep)
    for nd in g.node:
        for k, x in enumerate(nd.input):
            if x in ren:
                nd.input[k] = ren[x]
    return n


def _optimize(mp: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's optimizer minus its pattern rewriter (the rewriter costs minutes on a backward graph and
    its fusions are left to ONNX Runtime): inline, fold constants, drop dead nodes, CSE."""
    import onnx_ir as ir
    from onnx_ir.passes import common as cp
    from onnxscript.optimizer import _constant_folding as cf

    model = ir.from_proto(mp)
    passes = ir.passes.Sequential(
        cp.InlinePass(),
        ir.passes.PassManager([cf.FoldConstantsPass(shape_inference=True, input_size_limit=cf.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                                     output_size_limit=cf.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
                               cp.RemoveUnusedNodesPass()], steps=2, early_stop=True),
        cp.RemoveUnusedNodesPass(),
        cp.RemoveUnusedFunctionsPass(),
        cp.RemoveUnusedOpsetsPass(),
        cp.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        cp.DeduplicateInitializersPass(),
        cp.CommonSubexpressionEliminationPass(),
        cp.OutputFixPass(),
        cp.NameFixPass(),
    )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        passes(model)
    out = ir.to_proto(model)
    for nd in out.graph.node:   # the exporter's per-node stack traces and namespaces: megabytes of text
        del nd.metadata_props[:]
        nd.doc_string = ""
    return out


def set_io_shape(v: onnx.ValueInfoProto, shape) -> None:
    """Overwrite a graph input/output's declared shape with canonical dims (ints or symbol names)."""
    tt = v.type.tensor_type
    tt.ClearField("shape")
    tt.shape.SetInParent()          # a scalar has a shape with no dims (the ONNX checker wants the field)
    for d in shape:
        dim = tt.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = int(d)


def io_description(g: onnx.GraphProto) -> dict:
    def one(v):
        tt = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]}
    return {"inputs": [one(v) for v in g.input], "outputs": [one(v) for v in g.output]}


# ----------------------------------------------------------------------------------------------- torch side
def _quiet():
    """Silence the exporters' progress prints and warnings (they go to stdout)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    import logging
    lg = logging.getLogger("torch.onnx")
    old = lg.level
    lg.setLevel(logging.ERROR)
    stack.callback(lg.setLevel, old)
    return stack


def export_train_step(model, cfg, layers: list[int], adapters: list[str], frozen: set[str], opset: int,
                      max_len: int) -> onnx.ModelProto:
    """loss + gradient of every adapter: inputs input_ids, position_ids, teacher_hidden[, x_ids], adapters.
    cfg (AbsorberConfig): its loss kind, sync_skip (leading Y positions left out of the loss), ntp_weight (the
    next-token term on X; > 0 adds the input x_ids [1, N]) and bos (input_ids and x_ids start with the BOS,
    outside the loss; teacher_hidden covers Y alone) are compiled into the graph; layers = the
    hidden_states indices matched (absorber.sync.loss_layers of cfg.loss_layers)."""
    import torch
    import torch.utils._pytree as pytree
    from torch.export.experimental import _export_forward_backward
    from torch.export.graph_signature import OutputKind, OutputSpec

    from absorber.bundle_format import HEAD_CHUNKS
    from absorber.sync import SyncLoss

    kind, skip, hidden = cfg.loss, cfg.sync_skip, int(model.config.hidden_size)
    ntp = cfg.ntp_weight > 0
    prefix = int(bool(cfg.bos))      # the BOS in front of Y (and of X), outside the loss (SyncLoss.prefix)
    mod = SyncLoss(model, layers, kind, skip, cfg.ntp_weight, prefix)
    T, N = 8, 11
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, int(model.config.vocab_size), (1, prefix + T), generator=gen)
    pos = torch.arange(prefix + T).unsqueeze(0)
    th = torch.zeros(len(layers), T, hidden)
    Md = torch.export.Dim("M", min=skip + 2, max=max(max_len, T + 1) - prefix)   # Y longer than the skipped part
    Td = Md + prefix if prefix else Md                                            # the student's ids: prefix.Y
    args, dyn = (ids, pos, th), ({1: Td}, {1: Td}, {1: Md})
    if ntp:       # X: pieces of >= 2 positions in the trace (absorber.sync.HEAD_CHUNKS; the graph runs any n >= 2)
        N = max(N, HEAD_CHUNKS + 3 + prefix)
        args += (torch.randint(3, int(model.config.vocab_size), (1, N), generator=gen),)
        dyn += ({1: torch.export.Dim("N", min=HEAD_CHUNKS + 2 + prefix, max=max(max_len, N + 1))},)
    with _quiet():
        ep = torch.export.export(mod, args, dynamic_shapes=dyn, strict=False)
        jep = _export_forward_backward(ep, joint_loss_index=0)
    # aten.empty_permuted (from the backward) has no ONNX translation in torch 2.13; the values are overwritten
    for nd in jep.graph.nodes:
        if nd.target == torch.ops.aten.empty_permuted.default:
            nd.target = torch.ops.aten.empty.memory_format
            nd.args = (nd.args[0],)
    jep.graph_module.recompile()
    sig = jep.graph_signature
    kinds = [o.kind for o in sig.output_specs]
    grads = [o.target for o in sig.output_specs if o.kind == OutputKind.GRADIENT_TO_PARAMETER]
    if kinds[0] != OutputKind.LOSS_OUTPUT or len(grads) != len(kinds) - 1:
        raise AbsorberError(f"unexpected joint graph outputs {[k.name for k in kinds][:4]}... "
                            f"(torch {torch.__version__}; the exporter is pinned to torch 2.13)")
    grads = [g[len(WRAP_PREFIX):] for g in grads]
    if sorted(grads) != sorted(adapters):
        no_grad = sorted(set(adapters) - set(grads))
        raise AbsorberError(f"adapters without a gradient path to the loss (loss layers too early?): {no_grad[:3]}")
    # the ONNX exporter keeps only USER_OUTPUTs
    sig.output_specs[:] = [OutputSpec(kind=OutputKind.USER_OUTPUT, arg=o.arg, target=None) for o in sig.output_specs]
    jep._module_call_graph[0].signature.out_spec = pytree.tree_flatten(tuple(range(len(sig.output_specs))))[1]
    with _quiet():
        prog = torch.onnx.export(jep, args, None, dynamo=True, opset_version=opset, optimize=False,
                                 verbose=False)
    mp = prog.model_proto
    g = mp.graph
    if [i.name for i in g.input] != [F.INPUT_IDS, F.POSITION_IDS, F.TEACHER_HIDDEN] + ([F.X_IDS] if ntp else []):
        raise AbsorberError(f"unexpected train-step inputs {[i.name for i in g.input]}")
    _rename_values(g, {o.name: n for o, n in zip(g.output, [F.LOSS] + [F.grad_name(a) for a in grads])})
    mp = finish_graph(mp, adapters, frozen)
    # outputs in adapter order
    outs = {o.name: o for o in mp.graph.output}
    order = [outs[F.LOSS]] + [outs[F.grad_name(a)] for a in adapters]
    order = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in order]
    del mp.graph.output[:]
    mp.graph.output.extend(order)
    for v in mp.graph.input:
        if v.name in (F.INPUT_IDS, F.POSITION_IDS):
            set_io_shape(v, [1, "T"])
        elif v.name == F.TEACHER_HIDDEN:      # Y's positions: T less the prefix
            set_io_shape(v, [len(layers), "M" if prefix else "T", hidden])
        elif v.name == F.X_IDS:
            set_io_shape(v, [1, "N"])
    set_io_shape(mp.graph.output[0], [])
    return mp


def export_decoder(model, layers: list[int], adapters: list[str], frozen: set[str], opset: int, max_len: int,
                   facts: dict, lm_head_name: str) -> onnx.ModelProto:
    """KV-cache decoder: inputs input_ids, position_ids, logits_to_keep, past KV, adapters;
    outputs logits, present KV, hidden_states."""
    import torch
    from transformers.cache_utils import DynamicCache

    L = facts["num_layers"]

    class Decoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, input_ids, position_ids, past):
            # no config: every layer a full DynamicLayer. With the config, Gemma-3's sliding layers become
            # DynamicSlidingWindowLayer, whose cropping is a data-dependent branch the trace fixes at the example
            # (past + new < window): decode past the window then failed in an Expand. The sliding window is
            # applied by the attention mask (from the model config) either way; the runtime keeps full KV.
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(L)])
            out = self.model.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache,
                                   use_cache=True, output_hidden_states=True)
            hs = torch.stack([out.hidden_states[i][0] for i in layers])
            pres = []
            for lay in cache.layers:
                pres += [lay.keys, lay.values]
            return (out.last_hidden_state, hs, *pres)

    P0, T0 = 5, 7
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, facts["vocab"], (1, T0), generator=g)
    pos = torch.arange(P0, P0 + T0).unsqueeze(0)
    past = [torch.zeros(1, facts["num_kv_heads"], P0, facts["head_dim"]) for _ in range(2 * L)]
    past_names, pres_names = F.past_names(L), F.present_names(L)
    Td = torch.export.Dim("T", min=1, max=max_len)
    Pd = torch.export.Dim("P", min=0, max=max_len)
    dyn = ({1: Td}, {1: Td}, [{2: Pd} for _ in range(2 * L)])
    with _quiet():
        prog = torch.onnx.export(Decoder(model).eval(), (ids, pos, past), None, dynamo=True, opset_version=opset,
                                 input_names=[F.INPUT_IDS, F.POSITION_IDS, *past_names],
                                 output_names=["final_hidden", F.HIDDEN_STATES, *pres_names],
                                 dynamic_shapes=dyn, optimize=False, verbose=False)
    mp = prog.model_proto
    mp = finish_graph(mp, adapters, frozen)
    g = mp.graph
    # logits = Gemm(Slice(final_hidden, -k_eff:), W_lm, transB) with k_eff = T if logits_to_keep == 0 else k
    g.input.insert(2, _value_info(F.LOGITS_TO_KEEP, TensorProto.INT64, []))
    inits = {t.name for t in g.initializer}
    # tied embeddings: the exporter names the one tensor by either alias; reuse whichever is there
    aliases = [lm_head_name] + [n for n, p in model.named_parameters(remove_duplicate=False)
                                if n != lm_head_name and p is dict(model.named_parameters(remove_duplicate=False))[lm_head_name]]
    present = [a for a in aliases if a in inits]
    if present:
        lm_head_name = present[0]
    else:
        g.initializer.append(numpy_helper.from_array(_param(model, lm_head_name), lm_head_name))
    c = lambda n, v: g.initializer.append(numpy_helper.from_array(np.asarray(v, np.int64), n))  # noqa: E731
    c("lk.zero", 0)
    c("lk.one", [1])
    c("lk.axis1", [1])
    c("lk.axis0", [0])
    c("lk.end", [np.iinfo(np.int64).max])
    nodes = [
        helper.make_node("Shape", ["final_hidden"], ["lk.T"], start=1, end=2),
        helper.make_node("Equal", [F.LOGITS_TO_KEEP, "lk.zero"], ["lk.is0"]),
        helper.make_node("Reshape", [F.LOGITS_TO_KEEP, "lk.one"], ["lk.k1"]),
        helper.make_node("Where", ["lk.is0", "lk.T", "lk.k1"], ["lk.keff"]),
        helper.make_node("Neg", ["lk.keff"], ["lk.start"]),
        helper.make_node("Slice", ["final_hidden", "lk.start", "lk.end", "lk.axis1"], ["lk.h"]),
        helper.make_node("Squeeze", ["lk.h", "lk.axis0"], ["lk.h2"]),
        helper.make_node("Gemm", ["lk.h2", lm_head_name], ["lk.logits2"], transB=1),
        helper.make_node("Unsqueeze", ["lk.logits2", "lk.axis0"], [F.LOGITS]),
    ]
    g.node.extend(nodes)
    outs = {o.name: o for o in g.output}
    logits = _value_info(F.LOGITS, TensorProto.FLOAT, [1, "T_logits", facts["vocab"]])
    new_out = [logits] + [outs[n] for n in pres_names] + [outs[F.HIDDEN_STATES]]
    new_out = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in new_out]
    del g.output[:]
    g.output.extend(new_out)
    # input order: ids, positions, logits_to_keep, past KV, adapters (already so); canonical shapes
    kv, hd = facts["num_kv_heads"], facts["head_dim"]
    for v in g.input:
        if v.name in (F.INPUT_IDS, F.POSITION_IDS):
            set_io_shape(v, [1, "T"])
        elif v.name in past_names:
            set_io_shape(v, [1, kv, "P", hd])
    for v in g.output:
        if v.name in pres_names:
            set_io_shape(v, [1, kv, "P+T", hd])
        elif v.name == F.HIDDEN_STATES:
            set_io_shape(v, [len(layers), "T", facts["hidden"]])
    return mp


def _param(model, name: str) -> np.ndarray:
    return dict(model.named_parameters(remove_duplicate=False))[name].detach().float().numpy()
