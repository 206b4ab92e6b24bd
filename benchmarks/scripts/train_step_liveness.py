"""Which tensors are alive at the RSS peak of a train-step run (or at node index I): the optimized graph's
producers and last consumers in the executed order of train_step_rss_profile.py's rows (see its doc).

    python benchmarks/scripts/train_step_liveness.py BUNDLE N [OUT_DIR] [I]
"""
import json, sys, os, collections
import onnx
b, n = sys.argv[1].rstrip("/"), sys.argv[2]
OUT = sys.argv[3] if len(sys.argv) > 3 else "rss_profile"
name = os.path.basename(b)
opt = onnx.load(f"{OUT}/opt_{name}.onnx", load_external_data=False)
rows = json.load(open(f"{OUT}/rows_{name}_{n}.json"))
order = {r[2]: i for i, r in enumerate(rows)}
size = {r[2]: int(r[6] or 0) for r in rows}
nodes = {nd.name: nd for nd in opt.graph.node}
missing = [r[2] for r in rows if r[2] not in nodes]
print("profile nodes", len(rows), "graph nodes", len(nodes), "unmatched", len(missing), missing[:3])
prod, last = {}, collections.defaultdict(int)
for nm, nd in nodes.items():
    if nm not in order: continue
    for o in nd.output: prod[o] = nm
    for x in nd.input: last[x] = max(last[x], order[nm])
outs = {o.name for o in opt.graph.output}
live_at = int(sys.argv[4]) if len(sys.argv) > 4 else max(range(len(rows)), key=lambda i: rows[i][5] or 0)
tot = 0; items = []
for t, p in prod.items():
    s, e = order[p], (len(rows) if t in outs else last.get(t, order[p]))
    nd = nodes[p]
    sz = size[p] / max(1, len([o for o in nd.output if o]))
    if s <= live_at < e or (s <= live_at and t in outs):
        tot += sz; items.append((sz, t, p, nd.op_type, s, e))
print("at node", live_at, rows[live_at][2], "rss", rows[live_at][5], "live MB", tot / 2**20, "count", len(items))
by = collections.Counter(); cnt = collections.Counter()
for sz, t, p, op, s, e in items:
    by[(op, int(sz))] += sz; cnt[(op, int(sz))] += 1
for k, v in by.most_common(25):
    print(f"{v/2**20:8.1f} MB  {cnt[k]:4d} x {k[1]/2**20:7.2f} MB  {k[0]}")
items.sort(reverse=True)
for sz, t, p, op, s, e in items[:15]:
    print(f"{sz/2**20:7.2f} MB {op:18s} {p[:60]:60s} born {s} dies {e}")
