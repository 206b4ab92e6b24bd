"""Decode tok/s with MatMulNBits' inputs loaded by ONNX Runtime itself (OLD) or handed over from the runtime's map
(NEW; benchmarks/scripts/kernel_map_rss.py), two Models in one process, alternating: 32 greedy tokens after 256
tokens of the default speech, median of 6 after one warm-up (benchmarks/planner.md section 0000000000):

    python benchmarks/scripts/kernel_map_decode_ab.py BUNDLE
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_map_rss import old_way  # noqa: E402

from absorber.data import DEFAULT_SPEECH, speech  # noqa: E402
from absorber.runtime.generate import Generator  # noqa: E402
from absorber.runtime.model import Model  # noqa: E402

bundle = sys.argv[1]
with old_way():
    models = {"OLD": Model.open(bundle)}
models["NEW"] = Model.open(bundle)
ids = models["NEW"].encode(speech(DEFAULT_SPEECH).text())[:256]
res = {n: [] for n in models}; toks = {}
for rep in range(7):
    for n, m in models.items():
        g = Generator(m, m.decoder_adapters(m.initial_adapters), 32, stop_at_eos=False)
        g.append(ids); g.step(); t1 = time.perf_counter()
        while not g.done: g.step()
        if rep: res[n].append(31 / (time.perf_counter() - t1))
        toks[n] = g.tokens
for n in models:
    print(n, "decode tok/s median", round(statistics.median(res[n]), 1), [round(x, 1) for x in res[n]])
print("same tokens:", toks["OLD"] == toks["NEW"])
