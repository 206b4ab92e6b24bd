"""Export benchmark on a real model: sizes, logit error and top-1 agreement vs torch, first-step gradient error,
export time and peak RSS, for fp32 / int8 / int4 bundles.

    nice python -m absorber.bench.export_quality --model smollm2-135m --out /tmp/bench-bundles --md benchmarks/export.md

Phase 1 (a child process, so that its peak RSS is the export's alone): load the model and write the three bundles
from one trace. Phase 2 (this process): compare every bundle with PyTorch on `--tokens` tokens of a real speech.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from absorber import bundle_format as F

SCHEMES = F.QUANT_SCHEMES


def _export_child(model_spec: str, out: Path, rank: int) -> dict:
    code = f"""
import json, resource, time, sys
t0 = time.perf_counter()
from absorber.models import load
from absorber.config import AbsorberConfig, LoraConfig
model, tok = load({model_spec!r})
t_load = time.perf_counter() - t0
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from absorber.export import export_bundles
from pathlib import Path
lc = LoraConfig(rank={rank}, alpha={2.0 * rank})
t1 = time.perf_counter()
outs = export_bundles(model, tok, {{q: Path({str(out)!r}) / q for q in {SCHEMES!r}}}, lora_cfg=lc,
                      cfg=AbsorberConfig(lora=lc), progress=lambda m: print(m, file=sys.stderr, flush=True))
print(json.dumps({{"load_s": t_load, "export_s": time.perf_counter() - t1, "rss_after_load_mb": rss_load,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _bundle(path: Path):
    from absorber.runtime.bundle import open_bundle
    return open_bundle(path, verify_hashes=False)


def _decoder_adapters(packed: dict, adapters: dict) -> dict:
    from absorber.runtime.packing import decoder_adapters
    return decoder_adapters(packed, adapters)


def _session(path: Path, graph: str):
    """A plain session (no weight sharing) on one graph of the bundle, with the manifest's session config."""
    import onnxruntime as ort
    b = _bundle(path)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in b.session_config.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(b.graph_file(graph)), so, providers=["CPUExecutionProvider"])


def _relerr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _normerr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _global(ga: dict, gb: dict) -> float:
    num = sum(float(np.sum((np.asarray(ga[n], np.float64) - np.asarray(gb[n], np.float64)) ** 2)) for n in gb)
    den = sum(float(np.sum(np.asarray(gb[n], np.float64) ** 2)) for n in gb)
    return float(np.sqrt(num / max(den, 1e-300)))


def evaluate(model_spec: str, out: Path, tokens: int, y_len: int, speech: str) -> dict:
    import torch

    from absorber import lora, sync
    from absorber.data import speech as get_speech
    from absorber.export import quant as Q
    from absorber.models import load
    from safetensors.numpy import load_file

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(model_spec)
    b32 = _bundle(out / "fp32")
    man = b32.manifest
    sl = man["slice"]
    from absorber.config import LoraConfig
    lora.inject(model, LoraConfig(rank=sl["rank"], alpha=sl["alpha"], targets=tuple(sl["targets"]),
                                  layers=tuple(sl["layers"]) if sl["layers"] else None, seed=sl["seed"]))
    init = load_file(str(b32.adapters_path))
    lora.load_state(model, {k: torch.from_numpy(v) for k, v in init.items()})
    ids = tok.encode(get_speech(speech).text(), add_special_tokens=False)[: tokens + y_len]
    seq = torch.tensor([ids[:tokens]])
    x, y = torch.tensor([ids[:tokens]]), torch.tensor([ids[tokens:tokens + y_len]])
    layers = b32.loss_layers
    skip = b32.loss_skip   # the train step leaves these leading Y positions out of the loss
    ntp = b32.loss_ntp_weight   # and adds ntp x the next-token loss on X when > 0
    L, kv, hd = b32.num_layers, b32.num_kv_heads, b32.head_dim
    # a non-trivial first step: B = 0 at init makes every grad of A exactly zero, so compare at perturbed
    # adapters too (A as exported, B small random), which exercises both halves of every adapter
    g = np.random.default_rng(0)
    pert = {k: (v if k.endswith("lora_A") else (0.01 * g.standard_normal(v.shape)).astype(np.float32))
            for k, v in init.items()}
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()
            if p.dim() == 2 and not n.endswith((".lora_A", ".lora_B"))}

    def torch_side(adapters):
        lora.load_state(model, {k: torch.from_numpy(v) for k, v in adapters.items()})
        with torch.no_grad():
            logits = model(input_ids=seq, use_cache=False).logits[0].numpy()
        th = sync.teacher(model, x, y, layers).hidden
        params = lora.adapters(model)
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        loss = sync.SyncLoss(model, layers, skip=skip, ntp_weight=ntp)(y, sync.positions(y.shape[1]), th, x)
        loss.backward()
        grads = {n: p.grad.numpy().copy() for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(False)
        return logits, th, float(loss.detach()), grads

    ref = {"init": torch_side(init), "pert": torch_side(pert)}
    rows = []
    for q in SCHEMES:
        path = out / q
        row = {"quant": q, "sizes_mb": {f.name: f.stat().st_size / 2**20 for f in sorted(path.iterdir())}}
        row["bundle_mb"] = sum(row["sizes_mb"].values())
        deq = None
        if q != "fp32":   # the torch model with the bundle's dequantized weights (exactness of the graphs)
            with torch.no_grad():
                for n, w in fp32.items():
                    model.get_parameter(n).copy_(torch.from_numpy(Q.quantize(n, w.numpy(), q).dequantized()))
            deq = {"init": torch_side(init), "pert": torch_side(pert)}
            with torch.no_grad():
                for n, w in fp32.items():
                    model.get_parameter(n).copy_(w)
        dec = _session(path, "decoder")
        past = {n: np.zeros((1, kv, 0, hd), np.float32) for n in F.past_names(L)}
        feeds = {F.INPUT_IDS: seq.numpy(), F.POSITION_IDS: np.arange(tokens)[None],
                 F.LOGITS_TO_KEEP: np.array(0, np.int64), **past,
                 **_decoder_adapters(_bundle(path).packed_adapters, init)}
        dec.run([F.LOGITS], feeds)
        t0 = time.perf_counter()
        logits = dec.run([F.LOGITS], feeds)[0][0]
        row["prefill_ms"] = (time.perf_counter() - t0) * 1000
        row["logit_relerr_vs_torch_fp32"] = _relerr(logits, ref["init"][0])
        row["top1_vs_torch_fp32"] = float((logits.argmax(-1) == ref["init"][0].argmax(-1)).mean())
        if deq:
            row["logit_relerr_vs_torch_dequant"] = _relerr(logits, deq["init"][0])
        del dec
        tr = _session(path, "train_step")
        names = [o.name for o in tr.get_outputs()]
        for which in ("init", "pert"):
            # the bundle's pipeline: teacher AND student from the bundle's own weights (for int8/int4 the teacher of
            # the torch model with the dequantized weights = what the bundle's decoder gives, to ~2e-6)
            _, th, loss_t, grads_t = ref[which]
            th_b = deq[which][1] if deq else th
            ad = init if which == "init" else pert
            f = {F.INPUT_IDS: y.numpy(), F.POSITION_IDS: np.arange(y_len)[None], F.TEACHER_HIDDEN: th_b.numpy(), **ad}
            if ntp > 0:
                f[F.X_IDS] = x.numpy()
            t0 = time.perf_counter()
            r = dict(zip(names, tr.run(None, f)))
            if which == "pert":
                row["train_step_ms"] = (time.perf_counter() - t0) * 1000
            nz = [n for n in grads_t if np.abs(grads_t[n]).max() > 0]
            row[f"grad_relerr_vs_torch_fp32_{which}"] = max(_normerr(r[F.grad_name(n)], grads_t[n]) for n in nz)
            row[f"grad_relerr_global_vs_torch_fp32_{which}"] = _global({n: r[F.grad_name(n)] for n in nz},
                                                                      {n: grads_t[n] for n in nz})
            row[f"loss_relerr_vs_torch_fp32_{which}"] = abs(float(r[F.LOSS]) - loss_t) / abs(loss_t)
            if deq:
                _, _, loss_d, grads_d = deq[which]
                row[f"grad_relerr_vs_torch_dequant_{which}"] = max(_normerr(r[F.grad_name(n)], grads_d[n]) for n in nz)
                row[f"grad_relerr_global_vs_torch_dequant_{which}"] = _global({n: r[F.grad_name(n)] for n in nz},
                                                                             {n: grads_d[n] for n in nz})
                row[f"loss_relerr_vs_torch_dequant_{which}"] = abs(float(r[F.LOSS]) - loss_d) / abs(loss_d)
            row[f"zero_grads_{which}"] = len(grads_t) - len(nz)
        del tr
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    # the noise floor: torch float32 against torch float64 on the same inputs and teacher (perturbed adapters)
    import copy
    _, th32, _, g32 = ref["pert"]
    m64 = copy.deepcopy(model)       # transformers refuses .float() on a GGUF-loaded model: cast tensors directly
    for p in m64.parameters():
        p.data = p.data.double()
    for b in m64.buffers():
        if b.is_floating_point():
            b.data = b.data.double()
    lora.load_state(m64, {k: torch.from_numpy(v).double() for k, v in pert.items()})
    params = lora.adapters(m64)
    for p in params.values():
        p.requires_grad_(True)
    sync.SyncLoss(m64, layers, skip=skip, ntp_weight=ntp)(y, sync.positions(y.shape[1]), th32.double(), x).backward()
    g64 = {n: p.grad.numpy().copy() for n, p in params.items()}
    del m64
    noise = {"grad_relerr_max_tensor": max(_normerr(g32[n], g64[n]) for n in g64),
             "grad_relerr_global": _global(g32, g64)}
    print(json.dumps({"torch_fp32_vs_fp64": noise}), file=sys.stderr, flush=True)
    return {"rows": rows, "noise": noise, "tokens": tokens, "y_len": y_len, "speech": speech, "manifest_exporter": man["exporter"],
            "slice": {k: sl[k] for k in ("rank", "alpha", "targets", "layers")}, "n_adapters": len(sl["tensors"])}


def to_markdown(exp: dict, ev: dict, cmd: str) -> str:
    e = ev["manifest_exporter"]
    lines = [
        "# Export benchmark (SmolLM2-135M-Instruct)",
        "",
        f"Produced by `{cmd}` (script: `absorber/bench/export_quality.py`).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (timings are indicative); "
        f"torch {e['torch']}, transformers {e['transformers']}, onnx {e['onnx']}, onnxscript {e['onnxscript']}, "
        f"onnxruntime {e['onnxruntime']}, opset {e['opset']}.",
        f"Slice: LoRA rank {ev['slice']['rank']} alpha {ev['slice']['alpha']} on {', '.join(ev['slice']['targets'])}, "
        f"all layers ({ev['n_adapters']} adapter tensors). Loss layers 1..L (L1).",
        f"Text: the first {ev['tokens']} tokens of speech `{ev['speech']}` for logits (one prefill call from an empty "
        f"past, `logits_to_keep=0`); gradients on Y = the next {ev['y_len']} tokens with the torch teacher's hidden states "
        "of X = those first tokens.",
        "",
        f"Export (one trace, three bundles written from it, in a child process): load {exp['load_s']:.1f} s, "
        f"export {exp['export_s']:.1f} s (train step {e['seconds']['train_step']:.1f} s, decoder "
        f"{e['seconds']['decoder']:.1f} s, the rest is quantizing and writing 3 bundles), peak RSS "
        f"{exp['peak_rss_mb']:.0f} MB (after loading the model: {exp['rss_after_load_mb']:.0f} MB).",
        "",
        "| quant | bundle MB | weights.bin MB | decoder / train_step .onnx MB | logit err vs torch fp32 | top-1 agree "
        "vs torch fp32 | logit err vs torch dequant. | grad err vs torch fp32: worst tensor / global (init; perturbed) "
        "| grad err vs torch dequant.: worst / global (init; perturbed) | loss err vs torch (dequant.) | "
        "prefill 256 ms | train step ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda r, k: f"{r[k]:.1e}" if k in r else "—"   # noqa: E731
    for r in ev["rows"]:
        s = r["sizes_mb"]
        ref = "dequant" if r["quant"] != "fp32" else "fp32"
        lines.append(
            f"| {r['quant']} | {r['bundle_mb']:.1f} | {s['weights.bin']:.1f} | {s['decoder.onnx']:.2f} / "
            f"{s['train_step.onnx']:.2f} | {f(r, 'logit_relerr_vs_torch_fp32')} | {100 * r['top1_vs_torch_fp32']:.1f} % | "
            f"{f(r, 'logit_relerr_vs_torch_dequant')} | "
            f"{f(r, 'grad_relerr_vs_torch_fp32_init')} / {f(r, 'grad_relerr_global_vs_torch_fp32_init')}; "
            f"{f(r, 'grad_relerr_vs_torch_fp32_pert')} / {f(r, 'grad_relerr_global_vs_torch_fp32_pert')} | "
            f"{f(r, 'grad_relerr_vs_torch_dequant_init')} / {f(r, 'grad_relerr_global_vs_torch_dequant_init')}; "
            f"{f(r, 'grad_relerr_vs_torch_dequant_pert')} / {f(r, 'grad_relerr_global_vs_torch_dequant_pert')} | "
            f"{f(r, f'loss_relerr_vs_torch_{ref}_pert')} | {r['prefill_ms']:.0f} | {r['train_step_ms']:.0f} |")
    nz = ev.get("noise")
    if nz:
        lines += ["", f"Float32 noise floor (same inputs and teacher, perturbed adapters): torch float32 vs torch float64 "
                      f"gradients differ by {nz['grad_relerr_max_tensor']:.1e} (worst tensor) / "
                      f"{nz['grad_relerr_global']:.1e} (global)."]
    lines += [
        "",
        "Definitions: logit error = max |bundle − torch| / max |torch| over all positions and the vocabulary; "
        "gradient error: worst = max over adapter tensors of ‖g_bundle − g_torch‖ / ‖g_torch‖, global = the same over "
        "all adapter gradients concatenated (tensors whose torch gradient is "
        "exactly zero are skipped: at the exported init B = 0, so every gradient of A is zero — `init` is the real "
        "first step, `perturbed` uses B ~ 0.01·N(0,1) so that both halves are checked). `torch dequant.` = the torch "
        "model holding the bundle's dequantized weights (what the graphs must reproduce exactly); `torch fp32` = the "
        "float model (the quantization's own error: the quantized pipeline — teacher and student both from the "
        "quantized weights, as in a real round — against the float pipeline). Sessions use the manifest's `session_config` "
        "(`session.qdq_matmulnbits_accuracy_level=1`). Times: one call, plain sessions (no weight sharing), "
        "2 busy cores.",
        "",
        "Raw numbers:",
        "",
        "```json",
        json.dumps({"export": exp, "noise": ev.get("noise"), "rows": ev["rows"]}, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m absorber.bench.export_quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="/tmp/absorber-export-bench")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--y-len", type=int, default=128)
    ap.add_argument("--speech", default="1994-Clinton-1")
    ap.add_argument("--md", default=None, help="write the markdown report here")
    ap.add_argument("--skip-export", action="store_true", help="reuse the bundles in --out")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    exp_file = out / "export.json"
    if a.skip_export and exp_file.exists():
        exp = json.loads(exp_file.read_text())
    else:
        exp = _export_child(a.model, out, a.rank)
        exp_file.write_text(json.dumps(exp))
    print(json.dumps(exp), file=sys.stderr, flush=True)
    ev = evaluate(a.model, out, a.tokens, a.y_len, a.speech)
    cmd = "nice python -m absorber.bench.export_quality " + " ".join(argv if argv is not None else sys.argv[1:])
    md = to_markdown(exp, ev, cmd.strip())
    if a.md:
        Path(a.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
