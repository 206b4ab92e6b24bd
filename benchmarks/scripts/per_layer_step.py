"""Feasibility of a per-layer train step (issue 12, the <= 600 MB goal; benchmarks/planner.md, section
"A per-layer train step"): one decoder layer's forward and one layer's backward as two small ONNX graphs that
take the layer's weights and adapters as inputs, run once per layer by a numpy loop, instead of one unrolled graph
of every layer (SmolLM2-135M's recomputing train step: 32.9k nodes, ~145 MiB of ONNX Runtime's bookkeeping).

    python benchmarks/scripts/per_layer_step.py [--t 257,512] [--layers 30] [--repeats 3] [--json FILE]
    python benchmarks/scripts/per_layer_step.py --bundle BUNDLE [--json FILE]   (the product's step, same machine)

The backward graph is a VJP: torch.func.vjp of the layer (frozen weights and LoRA factors as inputs, the L1 sync
loss against that layer's teacher inside), traced by make_fx with symbolic shapes and exported through
torch.export + torch.onnx (torch.export alone cannot trace torch.func.vjp). Shapes: SmolLM2-135M (hidden 576,
9 heads, 3 KV heads, MLP 1536, LoRA r=16 on all seven linears), random fp32 weights, or with --int4 their 4-bit
stored bytes dequantized inside each graph; a prototype for memory and time, not the product: no next-token term,
no embedding or head. Checked against torch on the same inputs (one layer, the largest |difference| printed;
--int4: torch on the dequantized values). Measured per T: the graphs' nodes and the RSS that
opening both sessions adds; one step (forward over every layer keeping each layer's input, then the backward from
the last layer down, each layer's L1 loss inside its backward) repeated, the RSS peak above the level before the
step (VmHWM reset through /proc/self/clear_refs), and the seconds per step (median).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def rss(key: str = "VmRSS") -> float:
    """MiB (absorber.bench.calibrate.proc_status: /proc/self/status)."""
    from absorber.bench.calibrate import proc_status
    return proc_status(key)[key] / 2**20


def _trim() -> None:
    """glibc's malloc_trim(0): give the heap's free pages back, so that the step's allocations cannot reuse
    resident pages that earlier frees left (ctypes: one libc call, no package wraps it)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(layers: int):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, num_hidden_layers=layers, vocab_size=49152, rope_theta=100000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=8192)
    cfg._attn_implementation = "eager"
    return cfg, LlamaDecoderLayer(cfg, 0).eval(), LlamaRotaryEmbedding(cfg)


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def export_graphs(layer, rot, rank: int):
    """(forward ModelProto, backward ModelProto, weight names, lora shapes, reference fn) for one layer."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functional_call

    wnames = [n for n, _ in layer.named_parameters()]
    lnames = [n for n in wnames if n.rsplit(".", 2)[-2] in TARGETS]
    shapes = {n: p.shape for n, p in layer.named_parameters()}

    def run_layer(h, cos, sin, mask, weights, loras):
        handles = []
        for n in lnames:
            mod = layer.get_submodule(n.rsplit(".", 1)[0])
            a, b = loras[n]
            handles.append(mod.register_forward_hook(lambda m, i, o, a=a, b=b: o + (i[0] @ a) @ b))
        try:
            out = functional_call(layer, weights, (h,), {"attention_mask": mask, "position_embeddings": (cos, sin)})
        finally:
            for hd in handles:
                hd.remove()
        return out[0] if isinstance(out, tuple) else out

    def unpack(flat):
        weights = dict(zip(wnames, flat[:len(wnames)]))
        la = flat[len(wnames):]
        return weights, {n: (la[2 * i], la[2 * i + 1]) for i, n in enumerate(lnames)}

    def fwd(h, cos, sin, mask, *flat):
        w, lo = unpack(flat)
        return run_layer(h, cos, sin, mask, w, lo)

    def bwd(h, g_out, teacher, cos, sin, mask, *flat):
        w, lo = unpack(flat)
        lflat = [t for n in lnames for t in lo[n]]

        def f(h, *lf):
            loras = {n: (lf[2 * i], lf[2 * i + 1]) for i, n in enumerate(lnames)}
            out = run_layer(h, cos, sin, mask, w, loras)
            return out, (out - teacher).abs().mean()
        (_, loss), vjp = torch.func.vjp(f, h, *lflat)
        return (loss,) + tuple(vjp((g_out, torch.ones_like(loss))))

    T, H = 8, 576
    h = torch.randn(1, T, H)
    pos = torch.arange(T)[None]
    cos, sin = rot(h, pos)
    mask = torch.triu(torch.full((T, T), -1e9), 1)[None, None]
    W = [p.detach() for p in layer.parameters()]
    L = []
    for n in lnames:
        o, i = shapes[n]
        L += [torch.randn(i, rank) * 0.02, torch.randn(rank, o) * 0.02]
    Td = torch.export.Dim("T", min=2, max=4096)
    wdyn = (None,) * (len(W) + len(L))

    def to_onnx(fn, args, dyn):
        gm = make_fx(fn, tracing_mode="symbolic")(*args)

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.gm = gm

            def forward(self, *a):
                return self.gm(*a)
        ep = torch.export.export(M(), tuple(args), dynamic_shapes=(dyn,), strict=False)
        return torch.onnx.export(ep, tuple(args), None, dynamo=True, opset_version=21, verbose=False).model_proto
    fargs = (h, cos, sin, mask, *W, *L)
    fdyn = ({1: Td}, {1: Td}, {1: Td}, {2: Td, 3: Td}) + wdyn
    g, te = torch.randn(1, T, H), torch.randn(1, T, H)
    bargs = (h, g, te, cos, sin, mask, *W, *L)
    bdyn = ({1: Td}, {1: Td}, {1: Td}, {1: Td}, {1: Td}, {2: Td, 3: Td}) + wdyn
    return to_onnx(fwd, fargs, fdyn), to_onnx(bwd, bargs, bdyn), wnames, [(n, shapes[n]) for n in lnames], fwd, bwd


def quantize_inputs(mp, offset: int, wnames: list[str], qweights: dict) -> None:
    """--int4: each linear weight input W [N, K] of `mp` (at input offset + its index in wnames; qweights: name ->
    export.quant.QWeight, for the names and shapes) becomes the three stored inputs the bundles keep (the packed bytes
    as a uint8 [N, K/2] view, scales and minima [N, K/32]), dequantized inside the graph by the exporter's own
    rewrite (export/quant.py _Rewriter.dequantize: GatherBlockQuantized of every row, then + minimum), once per graph
    run and read by every product with W in it (in place)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from absorber.export.quant import _Rewriter
    rw = _Rewriter(accuracy_level=0)
    g = mp.graph
    new_inputs, nodes = [], []
    for j, v in enumerate(g.input):
        k = j - offset
        qw = qweights.get(wnames[k]) if 0 <= k < len(wnames) else None
        if qw is None:
            new_inputs.append(v)
            continue
        n, (N, K) = qw.names, qw.shape
        new_inputs += [helper.make_tensor_value_info(n["view"], TensorProto.UINT8, [N, K * qw.bits // 8]),
                       helper.make_tensor_value_info(n["scale"], TensorProto.FLOAT, [N, K // qw.block]),
                       helper.make_tensor_value_info(n["min"], TensorProto.FLOAT, [N, K // qw.block])]
        nodes += rw.dequantize(qw, v.name)
    g.initializer.extend(numpy_helper.from_array(np.asarray(c), name) for name, c in rw.consts.items())
    del g.input[:]
    g.input.extend(new_inputs)
    rest = list(g.node)
    del g.node[:]
    g.node.extend(nodes + rest)
    if not any(o.domain == "com.microsoft" for o in mp.opset_import):
        mp.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def stored_feeds(qw) -> list[np.ndarray]:
    """The inputs quantize_inputs gives a weight, in its order: the view of the packed bytes, scales, minima."""
    N, K = qw.shape
    return [qw.packed().reshape(N, K * qw.bits // 8), qw.scale, qw.minimum]


def profile_backward(bbytes: bytes, threads: int, feed: dict) -> dict:
    """Milliseconds per run of one layer's backward (5 runs, the first included) and each op type's share of
    the kernel time."""
    import collections
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = "/tmp/per_layer_backward"
    s = ort.InferenceSession(bbytes, so, providers=["CPUExecutionProvider"])
    runs = 4
    for _ in range(runs + 1):
        s.run(None, feed)
    path = s.end_profiling()
    with open(path) as f:
        events = json.load(f)
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    import os
    os.remove(path)
    return {"ms_per_run": round(total / (runs + 1) / 1000, 1),
            "share": {k: round(v / total, 3) for k, v in by_op.most_common(10)}}


def product_step(bundle: str, repeats: int) -> dict:
    """Seconds per run of a bundle's unrolled train step at its window on the default speech (the torch-free
    runtime's session and binding, as a round runs it): the same machine's baseline for the loop above."""
    from absorber.data import DEFAULT_SPEECH, speech
    from absorber.runtime import Stream
    s = Stream.open(bundle)
    ids = s.model.encode(speech(DEFAULT_SPEECH).text())[: s.cfg.n + s.cfg.m]
    x, y = ids[:s.cfg.n], ids[s.cfg.n:]
    io = s._train_binding(x, y, s._teacher(x, y))
    s.train.run_with_iobinding(io)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.train.run_with_iobinding(io)
        times.append(time.perf_counter() - t)
    return {"bundle": bundle, "n": s.cfg.n, "m": s.cfg.m, "s_per_step": round(float(np.median(times)), 3),
            "runs_s": [round(v, 3) for v in times], "loss": float(s._loss_buf)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", default="257,512", help="sequence lengths, comma-separated")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--bundle", help="time this bundle's unrolled train step instead (one process each)")
    p.add_argument("--int4", action="store_true",
                   help="the linear weights as 4-bit stored bytes (Q4_1-style: scale and minimum per 32), dequantized "
                        "inside each graph by GatherBlockQuantized, as the int4 bundles' backward reads them")
    p.add_argument("--powers", action="store_true",
                   help="the graphs' Pow(x, 1) / Pow(x, 2) as Identity / Mul (the product's rewrite, export/fusions.py)")
    p.add_argument("--profile", action="store_true",
                   help="also: ONNX Runtime's time by op type in one layer's backward at each T (4 runs)")
    a = p.parse_args()
    if a.bundle:
        row = product_step(a.bundle, a.repeats)
        print(json.dumps(row))
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        return
    import onnxruntime as ort
    import torch
    torch.manual_seed(0)
    cfg, layer, rot = build(a.layers)
    t0 = time.perf_counter()
    fmp, bmp, wnames, lshapes, fwd_ref, bwd_ref = export_graphs(layer, rot, a.rank)
    export_s = time.perf_counter() - t0
    if a.powers:
        from absorber.export.fusions import powers_as_products
        powers = powers_as_products(fmp.graph) + powers_as_products(bmp.graph)
    linears = {n for n, _ in lshapes}
    rng = np.random.default_rng(0)
    # every layer's frozen weights and adapters (random; the values do not change memory or time)
    base = {n: p.detach().numpy() for n, p in layer.named_parameters()}
    weights = [[(base[n] + rng.standard_normal(base[n].shape, dtype=np.float32) * 0.01) for n in wnames]
               for _ in range(a.layers)]
    feeds = weights                        # what each layer's graphs take for its weights
    if a.int4:                             # the stored bytes; torch checks against the dequantized values
        from absorber.export.quant import quantize
        qws = [{n: quantize(n, w, "int4") for n, w in zip(wnames, ws) if n in linears} for ws in weights]
        feeds = [[x for n, w in zip(wnames, ws) for x in (stored_feeds(q[n]) if n in q else [w])]
                 for ws, q in zip(weights, qws)]
        weights = [[q[n].dequantized() if n in q else w for n, w in zip(wnames, ws)] for ws, q in zip(weights, qws)]
        quantize_inputs(fmp, 4, wnames, qws[0])
        quantize_inputs(bmp, 6, wnames, qws[0])
        del qws
    fbytes, bbytes = fmp.SerializeToString(), bmp.SerializeToString()
    nodes = {"forward": len(fmp.graph.node), "backward": len(bmp.graph.node)}
    del fmp, bmp
    loras = [[x for n, (o, i) in lshapes for x in (rng.standard_normal((i, a.rank), dtype=np.float32) * 0.02,
                                                    rng.standard_normal((a.rank, o), dtype=np.float32) * 0.02)]
             for _ in range(a.layers)]
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.enable_mem_pattern = False
    from absorber.runtime.sessions import _fixed_mmap_threshold, _use_shared_arena
    _use_shared_arena(so, "cpu")       # the runtime's arena: one per process, grown by what is asked
    _fixed_mmap_threshold()
    before = rss()
    fs = ort.InferenceSession(fbytes, so, providers=["CPUExecutionProvider"])
    bs = ort.InferenceSession(bbytes, so, providers=["CPUExecutionProvider"])
    sessions_mib = rss() - before
    fin, bin_ = [i.name for i in fs.get_inputs()], [i.name for i in bs.get_inputs()]
    rows = []
    for T in [int(x) for x in a.t.split(",")]:
        H = 576
        h0 = rng.standard_normal((1, T, H), dtype=np.float32)
        pos = torch.arange(T)[None]
        cos, sin = (x.numpy() for x in rot(torch.from_numpy(h0), pos))
        mask = np.triu(np.full((T, T), -1e9, np.float32), 1)[None, None]
        teachers = rng.standard_normal((a.layers, 1, T, H), dtype=np.float32)

        def step():
            hs = [h0]
            for i in range(a.layers):
                feed = dict(zip(fin, [hs[-1], cos, sin, mask, *feeds[i], *loras[i]]))
                hs.append(fs.run(None, feed)[0])
            g = np.zeros_like(h0)
            loss, grads = 0.0, [None] * a.layers
            for i in reversed(range(a.layers)):
                feed = dict(zip(bin_, [hs[i], g, teachers[i], cos, sin, mask, *feeds[i], *loras[i]]))
                out = bs.run(None, feed)
                loss += float(out[0])
                g, grads[i] = out[1], out[2:]
            return loss, g, grads
        _trim()                                    # freed heap pages (the weights' temporaries) would hide growth
        level = rss()                              # before this T's first step: the arena's growth counts
        reset_peak()
        step()                                     # warm: the arena's first growth and ORT's kernel setup
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            loss, g, grads = step()
            times.append(time.perf_counter() - t)
        peak = rss("VmHWM") - level
        # one layer against torch on the same inputs
        i = 0
        args = [torch.from_numpy(x) for x in (h0, np.ones_like(h0), teachers[0], cos, sin, mask)] + \
            [torch.from_numpy(x) for x in weights[i] + loras[i]]
        ref = bwd_ref(*args)
        sess_feed = dict(zip(bin_, [x.numpy() for x in args[:6]] + feeds[i] + loras[i]))
        got = bs.run(None, sess_feed)
        diff = max(float(np.abs(np.asarray(o) - r.detach().numpy()).max()) for o, r in zip(got, ref))
        # the frozen products: the forward, the backward's recomputed forward and dX = dY W (no dW: frozen);
        # attention and the adapters' products left out
        flops = 3 * 2 * T * a.layers * sum(o * i for _, (o, i) in lshapes)
        row = {"T": T, "layers": a.layers, "nodes": nodes, "sessions_MiB": round(sessions_mib, 1),
               "step_peak_above_level_MiB": round(peak, 1), "level_MiB": round(level, 1),
               "s_per_step": round(float(np.median(times)), 3), "linear_GFLOP_per_s": round(flops / np.median(times) / 1e9, 1),
               "max_abs_diff_vs_torch": diff, "export_s": round(export_s, 1), "threads": a.threads,
               "boundaries_MiB": round((a.layers + 1) * T * H * 4 / 2**20, 1), "powers_rewritten": powers if a.powers else 0,
               "weights": "int4 stored bytes" if a.int4 else "fp32"}
        if a.profile:
            row["backward_profile"] = profile_backward(bbytes, a.threads, sess_feed)
        print(json.dumps(row))
        rows.append(row)
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
