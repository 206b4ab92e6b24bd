"""Where a decoded token's time goes: copies of an int4 bundle whose decoder.onnx lacks a part (TIMING ONLY: their
answers are wrong), for benchmarks/scripts/decode_ab.py (benchmarks/decode.md):

    python benchmarks/scripts/decode_variants.py BUNDLE OUT_DIR
    python benchmarks/scripts/decode_ab.py BUNDLE OUT_DIR/nolora OUT_DIR/nomin OUT_DIR/none --separate \
        --no-verify --out F

  nolora  every linear layer without its LoRA path ((x @ A) @ B * scale, and the Add)
  nomin   every 4-bit linear layer without its Q4_1 minimum term ((x summed per block) @ minimum^T, and the Add)
  none    neither

Each variant is a folder of hard links to the bundle's files with its own decoder.onnx (open it with
`--separate`: combined.onnx is the original's). Dead nodes are dropped; the adapters stay graph inputs.
"""
from __future__ import annotations

import argparse
import os

import onnx


def variant(model: onnx.ModelProto, drop_lora: bool, drop_min: bool) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}
    for n in g.node:
        if n.op_type != "Add":
            continue
        a, b = n.input
        pb = producer.get(b)
        lora = (pb is not None and pb.op_type == "Mul" and pb.input[0] in producer
                and any("lora_B" in x for x in producer[pb.input[0]].input))
        if (drop_lora and lora) or (drop_min and ".base.weight.nb" in n.name):   # quant.py's names
            rename[n.output[0]] = a

    def resolve(x: str) -> str:
        while x in rename:
            x = rename[x]
        return x

    for n in g.node:
        for i, x in enumerate(n.input):
            n.input[i] = resolve(x)
    live, keep = {o.name for o in g.output}, []
    for n in reversed(list(g.node)):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("out")
    a = ap.parse_args()
    base = onnx.load(os.path.join(a.bundle, "decoder.onnx"), load_external_data=False)
    for name, lora, mn in (("nolora", True, False), ("nomin", False, True), ("none", True, True)):
        d = os.path.join(a.out, name)
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(a.bundle):
            t = os.path.join(d, f)
            if f != "decoder.onnx" and not os.path.exists(t):
                os.link(os.path.join(a.bundle, f), t)
        m = variant(base, lora, mn)
        onnx.save(m, os.path.join(d, "decoder.onnx"))
        print(name, len(base.graph.node), "->", len(m.graph.node), "nodes")


if __name__ == "__main__":
    main()
