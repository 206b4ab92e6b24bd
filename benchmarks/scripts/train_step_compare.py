"""One train step of two bundles of the same model on the same random inputs (n=128, m=64, random B): the loss of
each and the largest gradient difference relative to each tensor's largest entry (benchmarks/planner.md section
00000: Gemma-3-270M with the head dequantized whole against in row pieces).

    python benchmarks/scripts/train_step_compare.py BUNDLE_A BUNDLE_B
"""
import json
import sys

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

n, m = 128, 64
outs = {}
for b in sys.argv[1:3]:
    man = json.load(open(f"{b}/manifest.json"))
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    s = ort.InferenceSession(f"{b}/train_step.onnx", so)
    ad = load_file(f"{b}/adapters.safetensors")
    rng = np.random.default_rng(0)
    for k in ad:
        if k.endswith("lora_B"): ad[k] = (rng.standard_normal(ad[k].shape) * 0.01).astype(np.float32)
    H = man["model"]["hidden"]; S = len(man["loss"]["layers"])
    feeds = {"input_ids": rng.integers(0, 5000, (1, m)).astype(np.int64),
             "position_ids": np.arange(m)[None].astype(np.int64),
             "teacher_hidden": rng.standard_normal((S, m, H)).astype(np.float32),
             "x_ids": rng.integers(0, 5000, (1, n)).astype(np.int64)}
    feeds.update(ad)
    names = [o.name for o in s.get_outputs()]
    outs[b] = dict(zip(names, s.run(None, feeds)))
a, b = outs[sys.argv[1]], outs[sys.argv[2]]
print("loss", a["loss"], b["loss"])
worst = max((np.abs(a[k] - b[k]).max() / (np.abs(a[k]).max() + 1e-30), k) for k in a if k.startswith("grad."))
print("worst rel grad diff", worst)
