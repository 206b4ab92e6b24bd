"""Activation recomputation (gradient checkpointing per decoder layer) in the traced train step, as an ONNX rewrite.

The joint forward-backward graph keeps every forward activation that the backward reads alive from the forward
pass until its gradient node runs: for SmolLM2-135M at m = 256 that is ~600 MiB, most of a round's peak memory.
This rewrite keeps only the tensors that cross from one layer to the next (the residual stream and the other
layer-boundary values) and gives the backward of each layer its own copy of that layer's forward, computed
right before it is needed (one extra forward pass per step; the classic trade of Chen et al. 2016,
arXiv 1604.06174, as torch.utils.checkpoint does it per layer).

Why a graph rewrite and not torch.utils.checkpoint in the traced module: the train step is traced through
torch.export's joint forward-backward (export/graphs.py), which inlines a checkpointed region back into one
forward, and ONNX Runtime's common-subexpression elimination would merge a naive copy with the original.

How:
  forward nodes  = the ancestors of the `loss` output; every other node is backward.
  stage(node)    = the largest decoder-layer index among the weights/adapters it reads (`layers.<i>.` in the
                   name), or among its forward producers (-1: embedding, rotary tables, masks), and the pass it
                   belongs to: which data inputs it depends on (x_ids: the student on X for the next-token
                   term; the other inputs: the student on Y). The two passes' backward chains are independent
                   until the loss, and ONNX Runtime may run one whole chain first: one gate per layer for both
                   passes could release the other pass's clones long before their backward. So each pass's
                   layer is a stage of its own, with its own gate. (Measured on SmolLM2 int4, n=128..512: the
                   same peak RSS as one stage per layer within 2 %; the next-token term's extra memory is
                   elsewhere, benchmarks/planner.md section 00.)
  boundary       = a forward tensor read by a forward node of a later stage (the residual stream h_i, the
                   rotary tables, the mask) or by the loss' final stage: kept, as before. A node that reads no
                   weight of a layer moves into its consumers' later stage where that shrinks what crosses
                   (`_sink_weight_free`: each norm's x * rsqrt, whose [T, H] output was kept beside x, and
                   each loss layer's slice of the teacher_hidden input).
  saved          = a forward tensor of stage s read by the backward and not a boundary: its producer and the
                   producer's in-stage ancestors are cloned (memoized per stage) and the backward reads the clone.
  order          = the clones of stage s read their float boundary inputs through `x + 0 * sum(Shape(g))`,
                   where g is the gradient reaching the first backward node that needs a stage-s clone (a value
                   with a length-dependent shape, so the Shape is never constant-folded): the clones of a layer
                   cannot run before the backward has reached that layer, whatever topological order ONNX Runtime
                   picks, and are not the same expression as the forward (no CSE merge). The gate depends on
                   g's shape only, never on its values (a NaN gradient does not spread into the clones).
                   With the next-token term (`order_after_grads`) it also waits for every adapter gradient of
                   layer s + 1, through a sum over none of its elements (0.0 whatever the values): ONNX Runtime's
                   default order runs a node as late as the first graph output that needs it, so the weight
                   gradients of every layer, which feed only their own outputs, ran at the very end and kept every
                   layer's gradient signals and recomputed inputs alive to it (SmolLM2 int4 at 512x256: ~1.1 GB
                   at the peak; the round's peak 2548 -> 1386 MiB; benchmarks/planner.md section 000). On the
                   sync loss alone the same gates measured +45 MiB (780 -> 822 MiB at 128x64, 936 -> 981 at
                   512x256), so they are left out there.
                   x + 0.0 is x exactly (a -0.0 would become +0.0; nothing downstream tells them apart), so the
                   gradients equal the plain graph's (bit-identical on SmolLM2; tests/test_recompute.py).
  head           = tensors computed (within their stage) from a product with the lm_head (`keep_reading`) are
                   kept like boundaries. The next-token term (absorber.sync.lean_next_token_loss) computes its
                   gradient at h in the forward, piece by piece, and the backward reads only that [T, H]
                   result: recomputing it would repeat the step's largest product (T x V x H) for nothing.
Values that do not depend on the step's data (weights, adapters, their transposes, dequantized copies) are
never cloned: cloning a constant-foldable node would give ONNX Runtime a second folded copy of a weight.
"""
from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict

import onnx
from onnx import TensorProto, helper

from absorber.bundle_format import LOSS, INPUT_IDS, POSITION_IDS, TEACHER_HIDDEN, X_IDS, grad_name
from absorber.errors import AbsorberError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
GRAD_PREFIX = grad_name("")
DATA_INPUTS = (INPUT_IDS, POSITION_IDS, TEACHER_HIDDEN, X_IDS)
SUFFIX = "__rc"


def _layer_of(name: str) -> int:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else -1


def recompute_layers(mp: onnx.ModelProto, keep_reading: frozenset[str] | set[str] = frozenset(),
                     order_after_grads: bool = True) -> dict:
    """Rewrite the train step `mp` in place (see the module doc); returns counts for the manifest.
    keep_reading: initializers (the lm_head's, float or quantized) whose products are never recomputed.
    order_after_grads: each layer's clones also wait for the adapter gradients of the layer above (the
    exporter sets it for train steps with the next-token term, where it halves the peak; see the module doc)."""
    g = mp.graph
    nodes = list(g.node)
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producer[o] = i
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        for x in n.input:
            if x:
                consumers[x].append(i)
    if LOSS not in producer:
        raise AbsorberError("recompute: the graph has no loss output")
    # forward = ancestors of the loss
    forward = set()
    stack = [producer[LOSS]]
    while stack:
        i = stack.pop()
        if i in forward:
            continue
        forward.add(i)
        stack.extend(producer[x] for x in nodes[i].input if x in producer)
    # data dependence and stages (layer, pass), in the (topological) node order of the ONNX graph
    data = set(DATA_INPUTS)
    passes: dict[str, str] = {x: ("x" if x == X_IDS else "y") for x in DATA_INPUTS}   # tensor -> pass letters
    stage: dict[int, tuple[int, str]] = {}
    for i, n in enumerate(nodes):
        if any(x in data for x in n.input):
            data.update(o for o in n.output if o)
            p = "".join(sorted(set("".join(passes.get(x, "") for x in n.input))))
            passes.update({o: p for o in n.output if o})
        if i in forward:
            s = max([_layer_of(x) for x in n.input if x and x not in producer] + [-1])
            s = max([s] + [stage[producer[x]][0] for x in n.input if x in producer and producer[x] in stage])
            stage[i] = (s, passes.get(n.output[0], "") if n.output else "")
    infos = list(g.value_info) + list(g.input) + list(g.output)
    elem = {v.name: v.type.tensor_type.elem_type for v in infos}
    symbolic = {v.name for v in infos if any(d.dim_param for d in v.type.tensor_type.shape.dim)}
    dims = _dims(infos)
    sunk = _sink_weight_free(nodes, forward, stage, producer, consumers, data, elem, dims)
    top = max(s for s, _ in stage.values())

    def tensor_stage(t: str) -> tuple[int, str]:
        return stage.get(producer.get(t, -1), (-1, ""))

    boundary = set()
    for i in forward:
        for x in nodes[i].input:
            if x in producer and producer[x] in forward and tensor_stage(x) != stage[i]:
                boundary.add(x)
    # the head's products and what is computed from them within their stage are kept, never cloned
    from_head = set(keep_reading)
    for n in nodes:                      # constants derived from the head's tensors (dequantized views)
        if not any(x in data for x in n.input) and any(x in from_head for x in n.input):
            from_head.update(o for o in n.output if o)
    after_head: set[str] = set()
    for i in sorted(forward):
        n = nodes[i]
        reads_head = any(x in from_head for x in n.input) and any(x in data for x in n.input)
        if reads_head or any(x in after_head and tensor_stage(x) == stage[i] for x in n.input):
            after_head.update(o for o in n.output if o)
    # floats per token of the length-dependent tensors kept across stages (the residual stream: H per layer and pass)
    kept_per_token = sum(_per_token(dims, t) for t in boundary if elem.get(t) == TensorProto.FLOAT)
    boundary |= after_head
    # saved activations: forward, data-dependent, read by a backward node
    saved: dict[str, list[int]] = {}
    for t, cons in consumers.items():
        if t in producer and producer[t] in forward and t in data and t not in boundary \
                and tensor_stage(t)[0] >= 0:
            back = [c for c in cons if c not in forward]
            if back:
                saved[t] = back
    by_stage: dict[tuple[int, str], list[str]] = defaultdict(list)
    for t in saved:
        by_stage[tensor_stage(t)].append(t)
    clone_name: dict[str, str] = {}           # forward tensor -> its recomputed copy
    new_nodes: dict[int, list[onnx.NodeProto]] = defaultdict(list)   # insert before original node index
    barrier_count = 0
    uid = itertools.count(1)

    used = set(producer) | {x.name for x in g.input} | {t.name for t in g.initializer} | {n.name for n in nodes}

    def fresh(base: str) -> str:
        while True:
            name = f"{base}{SUFFIX}{next(uid)}"
            if name not in used:
                used.add(name)
                return name

    def dynamic(x: str) -> bool:
        """a value whose shape depends on the input length: its Shape is never constant-folded"""
        return x in symbolic
    readers = {s: sorted({i for t in ts for i in saved[t]}) for s, ts in by_stage.items()}
    grads_by_layer: dict[int, list[str]] = defaultdict(list)     # adapter gradients (outputs) by layer
    for o in (g.output if order_after_grads else []):
        if o.name.startswith(GRAD_PREFIX) and _layer_of(o.name) >= 0:
            grads_by_layer[_layer_of(o.name)].append(o.name)
    ordered_after_grads = 0
    done_of: dict[int, str | None] = {}

    def layer_done(layer: int, emitted: list) -> str | None:
        """0.0 that exists once every adapter gradient of `layer` does (the sum over none of their elements:
        0.0 whatever the values); built once per layer, into the first stage's nodes that needs it."""
        if layer not in done_of:
            parts = []
            for gname in grads_by_layer.get(layer, []):
                flat, empty, z = fresh("rc_flat"), fresh("rc_empty"), fresh("rc_done")
                emitted.extend([
                    helper.make_node("Reshape", [gname, _const_i64(g, "rc_minus1", [-1])], [flat], name=flat),
                    helper.make_node("Slice", [flat, _const_i64(g, "rc_i0", [0]), _const_i64(g, "rc_i0", [0])],
                                     [empty], name=empty),
                    helper.make_node("ReduceSum", [empty], [z], name=z, keepdims=0),
                ])
                parts.append(z)
            done_of[layer] = None
            if parts:
                done_of[layer] = fresh("rc_layer_done")
                emitted.append(helper.make_node("Sum", parts, [done_of[layer]], name=done_of[layer]))
        return done_of[layer]

    for s in sorted(by_stage, reverse=True):
        # the gradient that reaches the first backward node needing this stage's activations
        # (or, where that node reads none, the last backward value before it): computed before any of them,
        # so it cannot depend on them
        first = readers[s][0]
        trig = next((x for x in nodes[first].input if x in producer and producer[x] not in forward
                     and dynamic(x)), None)
        if trig is None:
            trig = next((o for i in range(first - 1, -1, -1) if i not in forward for o in nodes[i].output
                         if o and dynamic(o)), None)
        barrier: dict[str, str] = {}
        emitted: list[onnx.NodeProto] = []
        zero = None

        def gate(x: str) -> str:
            nonlocal zero, barrier_count, ordered_after_grads
            if trig is None or x not in data or elem.get(x) != TensorProto.FLOAT:
                return x
            if x not in barrier:
                if zero is None:   # 0.0 (a scalar) that exists only once `trig` does
                    zero = fresh("rc_zero")
                    shp, total, as_float = fresh("rc_shape"), fresh("rc_sum"), fresh("rc_float")
                    emitted.extend([
                        helper.make_node("Shape", [trig], [shp], name=shp),
                        helper.make_node("ReduceSum", [shp], [total], name=total, keepdims=0),
                        helper.make_node("Cast", [total], [as_float], name=as_float, to=TensorProto.FLOAT),
                    ])
                    # ... and once every gradient of the layer above is done (both passes' gates share it)
                    done = layer_done(s[0] + 1, emitted)
                    both = as_float
                    if done is not None:
                        both = fresh("rc_after")
                        emitted.append(helper.make_node("Add", [as_float, done], [both], name=both))
                        ordered_after_grads += 1
                    emitted.append(helper.make_node("Mul", [both, _const(g, "rc_f0", 0.0)], [zero], name=zero))
                out = fresh(x)
                barrier[x] = out
                emitted.append(helper.make_node("Add", [x, zero], [out], name=out))
                barrier_count += 1
            return barrier[x]

        def clone(t: str) -> str:
            """the recomputed copy of forward tensor t of stage s (t itself where it need not be recomputed)."""
            if t not in producer or t not in data:
                return t
            if t in boundary or tensor_stage(t) != s:
                return gate(t)
            if t in clone_name:
                return clone_name[t]
            n = nodes[producer[t]]
            ins = [clone(x) if x else x for x in n.input]
            outs = [fresh(o) if o else o for o in n.output]
            for o, c in zip(n.output, outs):
                if o:
                    clone_name[o] = c
                    if o in elem:
                        elem[c] = elem[o]
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = fresh(n.name or n.op_type)
            del c.input[:]
            c.input.extend(ins)
            del c.output[:]
            c.output.extend(outs)
            emitted.append(c)
            return clone_name[t]

        for t in by_stage[s]:
            clone(t)
        new_nodes[readers[s][0]].extend(emitted)
    # the backward reads the clones
    rewired = 0
    for t, back in saved.items():
        for i in back:
            n = nodes[i]
            for j, x in enumerate(n.input):
                if x == t:
                    n.input[j] = clone_name[t]
                    rewired += 1
    order = []
    for i, n in enumerate(nodes):
        order.extend(new_nodes.get(i, []))
        order.append(n)
    del g.node[:]
    g.node.extend(_topological(order, {x.name for x in g.input} | {t.name for t in g.initializer}))
    return {"stages": top + 1, "saved_recomputed": len(saved), "cloned_nodes": sum(len(v) for v in new_nodes.values()),
            "boundary_kept": len(boundary), "head_kept": len(after_head), "sunk": sunk,
            "kept_floats_per_token": kept_per_token,
            "gates_after_grads": ordered_after_grads, "gates": barrier_count, "rewired": rewired}


_SEQ = 1 << 10      # a length-dependent dimension, in _sink_weight_free's size comparison


def _dims(infos: list) -> dict[str, list[int | None]]:
    """Each value's dimensions (None: a symbolic one, the step's length)."""
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in infos if v.type.tensor_type.HasField("shape")}


def _per_token(dims: dict, t: str) -> int:
    """Elements of t per unit of its symbolic dimension (0: t has none, or no known shape)."""
    d = dims.get(t)
    if not d or None not in d:
        return 0
    return math.prod(x for x in d if x is not None)


def _sink_weight_free(nodes: list, forward: set[int], stage: dict, producer: dict[str, int],
                      consumers: dict[str, list[int]], data: set[str], elem: dict, dims: dict) -> int:
    """Move forward nodes that read no layer weight into their consumers' stage where that shrinks what is kept.

    A node's stage is the largest layer among what it reads, so the start of each RMSNorm, x * rsqrt(mean(x^2) +
    eps), falls in the stage of the layer BELOW the norm's weight: its [T, H] output crossed into the next stage
    and was kept for the whole backward beside the residual stream it was computed from (every layer's normed
    input, for X and for Y); so did each loss layer's slice of the teacher_hidden input (stage -1). Here, in
    reverse topological order, a node without a layer weight whose forward consumers are all in one later stage
    s (same pass) moves into s together with the producers in its stage that feed only it (the norm's Pow ->
    ReduceMean -> Add -> Sqrt -> Reciprocal behind its Mul, the Gather behind a Slice of an input) when the data
    they then read across stages (inputs not already read in s or later) is smaller than what the node writes:
    the norm reads x, which the residual add reads in s anyway, and the slice reads a graph input. A residual
    add stays (two [T, H] inputs for one output). Only what is kept or cloned changes, never a value. Returns how
    many nodes moved."""
    def size(t: str) -> int | None:
        return math.prod(_SEQ if d is None else d for d in dims[t]) if t in dims else None

    def movable(i: int) -> bool:
        """a forward, data-dependent node that reads no layer weight and writes float activations"""
        n = nodes[i]
        return (i in forward and any(x in data for x in n.input)
                and not any(_layer_of(x) >= 0 for x in n.input if x and x not in producer)
                and all(elem.get(o) == TensorProto.FLOAT for o in n.output if o))

    moved = 0
    for i in sorted(forward, reverse=True):
        if not movable(i):
            continue
        s, p = stage[i]
        outs = [o for o in nodes[i].output if o]
        fc = [c for o in outs for c in consumers.get(o, []) if c in forward]
        if not fc or any(stage[c][1] != p for c in fc):
            continue
        t = min(stage[c][0] for c in fc)
        if t <= s:
            continue
        # the node and the movable producers in its stage that feed only it (transitively): the norm's
        # Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal behind its Mul, the Gather behind a Slice of an input
        chain, todo = {i}, [i]
        while todo:
            for x in nodes[todo.pop()].input:
                q = producer.get(x)
                if q is None or q in chain or not movable(q) or stage[q] != (s, p):
                    continue
                if all(c in chain for o in nodes[q].output if o for c in consumers.get(o, []) if c in forward):
                    chain.add(q)
                    todo.append(q)
        removed = [size(o) for o in outs]
        added = []
        for x in dict.fromkeys(x for j in chain for x in nodes[j].input):
            q = producer.get(x)
            if x not in data or q is None or q not in forward or q in chain:
                continue
            if stage[q][0] < t and not any(c not in chain and c in forward and stage[c][0] >= t
                                           for c in consumers.get(x, [])):
                added.append(size(x))
        if None in removed or None in added or sum(added) >= sum(removed):
            continue
        for j in chain:
            stage[j] = (t, p)
        moved += len(chain)
    return moved


def _topological(order: list[onnx.NodeProto], given: set[str]) -> list[onnx.NodeProto]:
    """The nodes in a topological order that keeps `order` wherever it is one (Kahn, earliest position first):
    a gated clone placed before its trigger moves to just after it."""
    import heapq
    producer = {o: i for i, n in enumerate(order) for o in n.output if o}
    waiting = [0] * len(order)
    readers: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(order):
        deps = {producer[x] for x in n.input if x and x in producer and x not in given}
        waiting[i] = len(deps)
        for d in deps:
            readers[d].append(i)
    ready = [i for i in range(len(order)) if waiting[i] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        i = heapq.heappop(ready)
        out.append(order[i])
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(out) != len(order):
        raise AbsorberError(f"recompute: the rewritten train step has a cycle ({len(order) - len(out)} nodes)")
    return out


def _const_i64(g: onnx.GraphProto, name: str, value: list[int]) -> str:
    if not any(t.name == name for t in g.initializer):
        g.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(value)], value))
    return name


def _const(g: onnx.GraphProto, name: str, value: float) -> str:
    if not any(t.name == name for t in g.initializer):
        g.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
    return name
