"""Resident memory ONNX Runtime spends per graph node after opening a session, on a synthetic chain of N
elementwise nodes ([T, 576] Add/Mul with one scalar constant; nothing else in the graph):

    python benchmarks/scripts/ort_node_cost.py 10000 all       (optimization level: none | basic | all)

Prints the RSS growth of InferenceSession() and after one run, in MB and KiB per node (the planner's lever
"fewer train-step nodes": SmolLM2-135M's recomputing train step has ~35k nodes).
"""
import gc
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


def main() -> None:
    n, level = int(sys.argv[1]), sys.argv[2]
    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(helper.make_node("Mul" if i % 2 else "Add", [prev, "c"], [f"t{i}"], name=f"n{i}"))
        prev = f"t{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 576])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["T", 576])],
                          [helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0])])
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    del g, nodes
    gc.collect()
    before = rss_mb()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    opened = rss_mb()
    s.run(None, {"x": np.ones((4, 576), np.float32)})
    print(f"{n} nodes, level {level}: open +{opened - before:.1f} MB ({(opened - before) * 1024 / n:.2f} KiB/node), "
          f"after a run +{rss_mb() - before:.1f} MB")


if __name__ == "__main__":
    main()
