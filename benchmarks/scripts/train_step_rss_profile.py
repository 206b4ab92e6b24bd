"""RSS over time inside one train-step run, matched to ONNX Runtime's node profile (benchmarks/planner.md
section 000): where does the peak come from?

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 EXT=1 \
        python benchmarks/scripts/train_step_rss_profile.py BUNDLE N M [OUT_DIR]
    python benchmarks/scripts/train_step_liveness.py BUNDLE N [OUT_DIR]

Runs train_step.onnx twice on random inputs (X of N tokens, Y of M) in plain ONNX Runtime with the arena off
(the malloc settings make freed memory leave the RSS), samples VmRSS every 2 ms during the second run, and
writes OUT_DIR/rows_<bundle>_<N>.json (per executed node: start, duration, name, op, RSS before/after, output
bytes) and the optimized graph OUT_DIR/opt_<bundle>.onnx. EXT=1: graph optimizations at EXTENDED (the runtime
uses ALL; the peak measured the same; ~4 % of the profiled nodes are not in the saved graph either way, and
liveness leaves them out). ORDER=PRIORITY_BASED: ONNX Runtime's other execution order.
"""
import json, sys, threading, time, os, glob
import numpy as np, onnxruntime as ort
from safetensors.numpy import load_file
b, n, m = sys.argv[1].rstrip("/"), int(sys.argv[2]), int(sys.argv[3])
OUT = sys.argv[4] if len(sys.argv) > 4 else "rss_profile"
os.makedirs(OUT, exist_ok=True)
man = json.load(open(f"{b}/manifest.json"))
so = ort.SessionOptions(); so.enable_cpu_mem_arena = False; so.enable_profiling = True
so.profile_file_prefix = f"{OUT}/prof_{os.path.basename(b)}_{n}"
so.intra_op_num_threads = 2
if os.environ.get("ORDER"): so.execution_order = getattr(ort.ExecutionOrder, os.environ["ORDER"])
if os.environ.get("EXT"): so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
so.enable_mem_pattern = os.environ.get("PATTERN", "0") == "1"
so.optimized_model_filepath = f"{OUT}/opt_{os.path.basename(b)}.onnx"
so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"opt_{os.path.basename(b)}.bin")
so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 1024
sess = ort.InferenceSession(f"{b}/train_step.onnx", so, providers=["CPUExecutionProvider"])
ad = load_file(f"{b}/adapters.safetensors")
rng = np.random.default_rng(0)
H = man["model"]["hidden"]; S = len(man["loss"]["layers"])
feeds = {"input_ids": rng.integers(3, 40000, (1, m)).astype(np.int64), "position_ids": np.arange(m)[None].astype(np.int64),
         "teacher_hidden": rng.standard_normal((S, m, H)).astype(np.float32), **ad}
if "x_ids" in {i.name for i in sess.get_inputs()}:
    feeds["x_ids"] = rng.integers(3, 40000, (1, n)).astype(np.int64)
samples = []; stop = False
def sample():
    while not stop:
        samples.append((time.perf_counter_ns() // 1000, rss())); time.sleep(0.002)
base = rss(); print("after open", base)
sess.run(None, feeds)   # warm
t = threading.Thread(target=sample); t.start()
t0 = time.perf_counter_ns() // 1000
sess.run(None, feeds)
stop = True; t.join(); print("rss after run", rss())
prof = sess.end_profiling()
ev = [e for e in json.load(open(prof)) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
# profile ts are relative to profiler start; align by the last run: take events of the second run
runs = [e for e in json.load(open(prof)) if e.get("cat") == "Session" and e["name"] == "model_run"]
r2 = runs[-1]
ev = [e for e in ev if e["ts"] >= r2["ts"]]
off = t0 - r2["ts"]
peak = max(samples, key=lambda s: s[1])
print("peak rss", peak[1], "base", base, "samples", len(samples))
# rss at each node start: show top nodes by rss increase over their duration
def rss_at(ts):
    best = None
    for s in samples:
        if s[0] <= ts + off: best = s[1]
        else: break
    return best
rows = []
for e in ev:
    a, z = rss_at(e["ts"]), rss_at(e["ts"] + e["dur"])
    rows.append((e["ts"], e["dur"], e["name"][:-12], e["args"].get("op_name"), a, z, e["args"].get("output_size")))
json.dump(rows, open(f"{OUT}/rows_{os.path.basename(b)}_{n}.json", "w"))
# the running-max curve: where the RSS first crosses each 100 MB level
lvl = base
for r in rows:
    if r[5] and r[5] > lvl + 100:
        print(f"{r[5]:8.0f} MB  at {r[2]:60s} {r[3]}  dur {r[1]} us  out {r[6]}")
        lvl = r[5]
i = max(range(len(rows)), key=lambda i: rows[i][5] or 0)
print("node at peak:", rows[i][2:4], rows[i][5], "index", i, "of", len(rows))
