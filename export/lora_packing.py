"""The decoder's LoRA paths of stacked layers as two products (decoder only; numpy + onnx, no torch).

Where the decoder runs a layer's q/k/v (or gate/up) projections as one MatMulNBits over their stacked weights and a
Split (export/quant.py `Fused`), each member still had its own LoRA path, Add(base, Mul(MatMul(MatMul(x, A), B), s)):
four nodes per member, ~2.5 us each at one token (benchmarks/decode.md section 4). Here the members' paths become

    x @ A_pack @ B_pack, added to the stack's output before the Split,

with A_pack = the members' A side by side ([K, sum r]) and B_pack = each member's B times its scaling on a block
diagonal ([sum r, sum N]): the same sum, in one pass. A_pack and B_pack are new decoder inputs that replace the
members' own; the runtime builds them from the adapters (runtime/packing.py) when it calls the
decoder, so the train step, the optimizer and the saved state keep one tensor per adapter. The manifest records
how (graphs.decoder.packed_adapters).
"""
from __future__ import annotations

from onnx import TensorProto, helper

from absorber.errors import AbsorberError
from absorber.export.fusions import index_graph, scalar

PACKED = "packed"


def _chain(add, producer: dict, consts: dict, adapters: dict):
    """Add(base, Mul(MatMul(MatMul(x, A), B), s)) with A, B adapters and s a constant -> its parts, else None."""
    for side in (0, 1):
        mul = producer.get(add.input[side])
        if mul is None or mul.op_type != "Mul":
            continue
        b_mm = producer.get(mul.input[0])
        s = scalar(consts, mul.input[1])
        if b_mm is None or b_mm.op_type != "MatMul" or b_mm.input[1] not in adapters or s is None:
            continue
        a_mm = producer.get(b_mm.input[0])
        if a_mm is None or a_mm.op_type != "MatMul" or a_mm.input[1] not in adapters:
            continue
        return {"base": add.input[1 - side], "x": a_mm.input[0], "A": a_mm.input[1], "B": b_mm.input[1],
                "scale": s, "nodes": [a_mm, b_mm, mul, add]}
    return None


def pack_lora_paths(graph, adapters: dict[str, tuple[int, ...]]) -> dict:
    """Rewrite the decoder `graph` in place (see the module doc); adapters: {name: shape}. Returns the manifest's
    graphs.decoder.packed_adapters: {input name: {"kind": "columns" | "block_diagonal", "parts": [[adapter,
    scale], ...], "shape": [rows, cols]}}."""
    consts, producer, consumers, _ = index_graph(graph)
    packed: dict[str, dict] = {}
    drop: set[int] = set()
    put: dict[int, list] = {}
    for split in graph.node:
        if split.op_type != "Split" or ".fused" not in split.name:
            continue
        paths = []
        for o in split.output:
            users = consumers.get(o, [])
            ch = _chain(users[0], producer, consts, adapters) if len(users) == 1 and users[0].op_type == "Add" \
                else None
            if ch is None or ch["base"] != o or (paths and ch["x"] != paths[0]["x"]):
                break
            paths.append(ch)
        if len(paths) != len(split.output):
            continue
        k = len(packed) // 2
        a_name, b_name = f"{PACKED}.{k}.lora_A", f"{PACKED}.{k}.lora_B"
        rank = sum(adapters[p["A"]][1] for p in paths)
        width = sum(adapters[p["B"]][1] for p in paths)
        packed[a_name] = {"kind": "columns", "parts": [[p["A"], 1.0] for p in paths],
                          "shape": [adapters[paths[0]["A"]][0], rank]}
        packed[b_name] = {"kind": "block_diagonal", "parts": [[p["B"], p["scale"]] for p in paths],
                          "shape": [rank, width]}
        tag = f"{PACKED}.{k}"
        put[id(split)] = [
            helper.make_node("MatMul", [paths[0]["x"], a_name], [f"{tag}.u"], name=f"{tag}.xA"),
            helper.make_node("MatMul", [f"{tag}.u", b_name], [f"{tag}.v"], name=f"{tag}.xAB"),
            helper.make_node("Add", [split.input[0], f"{tag}.v"], [f"{tag}.sum"], name=f"{tag}.add"),
            helper.make_node("Split", [f"{tag}.sum"] + list(split.input[1:]), [p["nodes"][3].output[0] for p in paths],
                             name=split.name, **{a.name: helper.get_attribute_value(a) for a in split.attribute})]
        drop |= {id(n) for p in paths for n in p["nodes"]} | {id(split)}
    nodes = []
    for n in graph.node:
        if id(n) in put:
            nodes += put[id(n)]
        elif id(n) not in drop:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    members = {a for p in packed.values() for a, _ in p["parts"]}
    still = members & {i for n in nodes for i in n.input}
    if still:
        raise AbsorberError(f"decoder: adapters {sorted(still)[:3]} are read outside their LoRA paths; cannot pack")
    inputs = [i for i in graph.input if i.name not in members]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, p["shape"]) for n, p in packed.items()]
    del graph.input[:]
    graph.input.extend(inputs)
    return packed
