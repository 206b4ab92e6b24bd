"""The frozen product of a per-layer train step (benchmarks/planner.md, section "A per-layer train step"), whose
graphs take each layer's weights as inputs instead of initializers: one [M, 576] x [576, 1536] product (SmolLM2's
gate/up projection) as MatMulNBits (4 bits, block 32) with B an initializer (pre-packed, as the bundles' graphs
today) or a graph input (not pre-packed), at accuracy levels 0 and 4, against ONNX Runtime's fp32 MatMul on a
dequantized weight given as an input (what GatherBlockQuantized + MatMul computes; the dequantization, ~0.3 ms for
this 4-bit weight per bench.md, not included). Random values; median of 20 runs after one.

    python benchmarks/scripts/matmulnbits_weight_input.py [--m 256,512] [--threads 2]
"""
import argparse
import time

import numpy as np
import onnx.helper as h
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import numpy_helper as nh

K, N = 576, 1536


def matmulnbits(M: int, as_input: bool, level: int, B, S, Z) -> bytes:
    node = h.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=K, N=N, bits=4,
                       block_size=32, accuracy_level=level)
    ins = [h.make_tensor_value_info("A", TP.FLOAT, [M, K])]
    inits = [nh.from_array(S, "S"), nh.from_array(Z, "Z")]
    if as_input:
        ins.append(h.make_tensor_value_info("B", TP.UINT8, list(B.shape)))
    else:
        inits.append(nh.from_array(B, "B"))
    g = h.make_graph([node], "g", ins, [h.make_tensor_value_info("Y", TP.FLOAT, [M, N])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)]).SerializeToString()


def fp32_matmul(M: int) -> bytes:
    g = h.make_graph([h.make_node("MatMul", ["A", "W"], ["Y"])], "g",
                     [h.make_tensor_value_info("A", TP.FLOAT, [M, K]), h.make_tensor_value_info("W", TP.FLOAT, [K, N])],
                     [h.make_tensor_value_info("Y", TP.FLOAT, [M, N])])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)]).SerializeToString()


def median_ms(s, feed) -> float:
    s.run(None, feed)
    ts = []
    for _ in range(20):
        t = time.perf_counter()
        s.run(None, feed)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="256,512")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    B = rng.integers(0, 256, (N, K // 32, 16), dtype=np.uint8)
    S = (rng.random(N * K // 32, dtype=np.float32) * 0.01).astype(np.float32)
    Z = rng.integers(0, 256, (N * ((K // 32 + 1) // 2),), dtype=np.uint8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    print("| M | kernel | B | accuracy level | ms | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for M in (int(x) for x in a.m.split(",")):
        A = rng.standard_normal((M, K), dtype=np.float32)
        for as_input in (False, True):
            for level in (0, 4):
                s = ort.InferenceSession(matmulnbits(M, as_input, level, B, S, Z), so, providers=["CPUExecutionProvider"])
                ms = median_ms(s, {"A": A} | ({"B": B} if as_input else {}))
                print(f"| {M} | MatMulNBits 4-bit | {'input' if as_input else 'initializer (pre-packed)'} | {level} | "
                      f"{ms:.2f} | {2 * M * K * N / ms / 1e6:.0f} |")
        s = ort.InferenceSession(fp32_matmul(M), so, providers=["CPUExecutionProvider"])
        ms = median_ms(s, {"A": A, "W": rng.standard_normal((K, N), dtype=np.float32)})
        print(f"| {M} | fp32 MatMul | input (dequantized) | – | {ms:.2f} | {2 * M * K * N / ms / 1e6:.0f} |")


if __name__ == "__main__":
    main()
