"""Speed and memory of the ONNX runtime against the PyTorch reference, measured side by side.

Every measurement runs in its own subprocess (`python -m absorber.bench.speed TASK JSON`), so that each peak RSS
(ru_maxrss) belongs to one engine only. Tasks: `torch` / `runtime` (absorb a real text at the same n, m, K;
per-phase seconds; decode speed and time to first token), `rss-runtime` (RSS against tokens seen on a long
stream), `rss-full` (RSS of full-context transformers decoding until the model's context is full), `gemm`
(the machine's matmul peak, with ONNX Runtime and numpy). Imports torch only in the torch tasks.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def stream_text(min_tokens_hint: int = 0) -> str:
    """Spoken State of the Union transcripts, newest first, joined (enough for ~100k+ tokens)."""
    from absorber import data
    sp = list(reversed(data.speeches("spoken")))
    out, chars = [], 0
    for s in sp:
        t = s.text()
        out.append(t)
        chars += len(t)
        if min_tokens_hint and chars > 5 * min_tokens_hint:   # ~4.5 characters per token on this text
            break
    return "\n\n".join(out)


# ------------------------------------------------------------------------------------------------ tasks
def _ort_matmul_model(n: int) -> bytes:
    """A one-node ONNX MatMul model (built with the `onnx` package)."""
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
                          [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
                           helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def task_gemm(a: dict) -> dict:
    """Measured fp32 GEMM peak (FLOP/s) with ONNX Runtime's MatMul and with numpy; the max of both is the peak."""
    import numpy as np
    import onnxruntime as ort
    n = int(a.get("size", 1024))
    reps = int(a.get("reps", 10))
    A = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    B = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3
    res = {"size": n}
    t_np = []
    for _ in range(reps + 2):
        t0 = time.perf_counter(); A @ B; t_np.append(time.perf_counter() - t0)
    res["numpy_gflops"] = flops / min(t_np[2:]) / 1e9
    try:
        sess = ort.InferenceSession(_ort_matmul_model(n), providers=["CPUExecutionProvider"])
        t_ort = []
        for _ in range(reps + 2):
            t0 = time.perf_counter(); sess.run(None, {"A": A, "B": B}); t_ort.append(time.perf_counter() - t0)
        res["ort_gflops"] = flops / min(t_ort[2:]) / 1e9
    except ImportError:
        res["ort_gflops"] = None
    res["peak_gflops"] = max(v for v in (res["numpy_gflops"], res["ort_gflops"]) if v)
    return res


def _decode_numbers(ttft: float, t_total: float, n_new: int) -> dict:
    return {"ttft_s": ttft, "decode_tok_s": (n_new - 1) / max(t_total - ttft, 1e-9) if n_new > 1 else None}


def task_torch(a: dict) -> dict:
    import torch
    from absorber import models
    from absorber.config import AbsorberConfig
    from absorber.stream import StreamingAbsorber
    if a.get("threads"):
        torch.set_num_threads(int(a["threads"]))
    from absorber.export.architectures import lookup
    model, tok = models.load(a["model"])
    # the BOS in front of every context for models pretrained with one, as `absorber export --bos auto` writes them
    cfg = AbsorberConfig(n=a["n"], m=a["m"], k=a["k"], bos=lookup(model.config).bos)
    ids = tok.encode(stream_text(a["tokens"]), add_special_tokens=False)[: a["tokens"]]
    s = StreamingAbsorber(model, tok, cfg)
    t0 = time.perf_counter()
    rounds = s.feed_tokens(ids)
    wall = time.perf_counter() - t0
    # decode: prefill the window (+ prompt), then token by token with the KV cache
    prompt = s.context() + tok.encode("\n\nQuestion: What was this speech about?\nAnswer:", add_special_tokens=False)
    n_new = int(a.get("new_tokens", 32))
    with torch.no_grad():
        t1 = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        nxt = out.logits[0, -1].argmax()
        ttft = time.perf_counter() - t1
        past = out.past_key_values
        for i in range(n_new - 1):
            out = model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True,
                        position_ids=torch.tensor([[len(prompt) + i]]))
            past, nxt = out.past_key_values, out.logits[0, -1].argmax()
        t_total = time.perf_counter() - t1
    res = _summary("torch", rounds, wall, cfg) | _decode_numbers(ttft, t_total, n_new)
    return res | {"peak_rss_mb": peak_rss_mb(), "facts": model_facts(model)}


def _summary(engine: str, rounds, wall: float, cfg) -> dict:
    rs = [r.to_json() for r in rounds]
    absorbed = sum(cfg.n for _ in rs)
    busy = sum(r["seconds"] for r in rs)
    per = {k: sum(r.get(k, 0.0) for r in rs) / max(len(rs), 1)
           for k in ("seconds", "teacher_seconds", "train_seconds", "optimizer_seconds")}
    per["bookkeeping_seconds"] = max(per["seconds"] - per["teacher_seconds"] - per["train_seconds"], 0.0)
    steps = sum(r["steps"] for r in rs)
    return {"engine": engine, "window": {"n": cfg.n, "m": cfg.m, "k": cfg.k}, "rounds": len(rs), "tokens_absorbed": absorbed, "wall_s": wall,
            "absorbed_tok_s": absorbed / busy if busy else None, "per_round": per, "steps": steps,
            "train_step_s": (sum(r["train_seconds"] for r in rs) / (steps + len(rs))) if rs else None,
            "loss_first_mean": _mean([r["loss_first"] for r in rs]), "loss_last_mean": _mean([r["loss_last"] for r in rs])}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def task_runtime(a: dict) -> dict:
    from absorber.runtime import Stream
    s = Stream.open(a["bundle"], device=a.get("device", "cpu"), profile=a.get("profile"),
                    config_overrides={"n": a["n"], "m": a["m"], "k": a["k"]}, share_weights=a.get("share", True),
                    memory_budget=a.get("memory_budget"))
    tok = s.tokenizer
    ids = tok.encode(stream_text(a["tokens"]), add_special_tokens=False).ids[: a["tokens"]]
    t0 = time.perf_counter()
    rounds = s.feed_tokens(ids)
    wall = time.perf_counter() - t0
    n_new = int(a.get("new_tokens", 32))
    q = "\n\nQuestion: What was this speech about?\nAnswer:"
    t1 = time.perf_counter(); s.ask(q, max_new_tokens=1); ttft = time.perf_counter() - t1
    t1 = time.perf_counter(); s.ask(q, max_new_tokens=n_new); t_total = time.perf_counter() - t1
    produced = getattr(s, "last_answer_tokens", n_new)
    res = _summary("runtime", rounds, wall, s.cfg) | _decode_numbers(ttft, t_total, produced)
    res.update(peak_rss_mb=peak_rss_mb(), open_s=getattr(s, "open_seconds", None),
               quant=s.bundle.quant_scheme, predicted_peak_mb=s.prediction.peak_bytes / 2**20, memory_budget=a.get("memory_budget"))
    return res


def task_rss_runtime(a: dict) -> dict:
    from absorber.runtime import Stream
    s = Stream.open(a["bundle"], profile=a.get("profile"), config_overrides={"n": a["n"], "m": a["m"], "k": a["k"]},
                    memory_budget=a.get("memory_budget"))
    ids = s.tokenizer.encode(stream_text(a["tokens"]), add_special_tokens=False).ids[: a["tokens"]]
    curve = [(0, rss_mb())]
    t0 = time.perf_counter()
    for i in range(0, len(ids), s.cfg.n):
        s.feed_tokens(ids[i:i + s.cfg.n])
        curve.append((s.tokens_seen, rss_mb()))
    return {"engine": "runtime", "curve": curve, "tokens": len(ids), "seconds": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb()}


def task_rss_full(a: dict) -> dict:
    """Full-context decoding with transformers: the KV cache grows with every token until the context is full."""
    import torch
    from absorber import models
    model, tok = models.load(a["model"])
    ids = tok.encode(stream_text(a["tokens"]), add_special_tokens=False)[: a["tokens"]]
    limit = int(model.config.max_position_embeddings)
    curve, past, pos, stop = [(0, rss_mb())], None, 0, "end of text"
    chunk = int(a.get("chunk", 256))
    with torch.no_grad():
        for i in range(0, len(ids), chunk):
            if pos + chunk > limit:
                stop = f"model context ({limit} tokens) is full"
                break
            try:
                out = model(input_ids=torch.tensor([ids[i:i + chunk]]), past_key_values=past, use_cache=True,
                            logits_to_keep=1)
            except (RuntimeError, MemoryError) as e:
                stop = f"failed: {type(e).__name__}"
                break
            past, pos = out.past_key_values, pos + chunk
            curve.append((pos, rss_mb()))
    return {"engine": "transformers-full", "curve": curve, "stopped": stop, "peak_rss_mb": peak_rss_mb()}


TASKS = {"gemm": task_gemm, "torch": task_torch, "runtime": task_runtime, "rss-runtime": task_rss_runtime,
         "rss-full": task_rss_full}


def run_task(name: str, args: dict, timeout: float = 3600) -> dict:
    """Run one task in a fresh interpreter; its last stdout line is the JSON result."""
    r = subprocess.run([sys.executable, "-m", "absorber.bench.speed", name, json.dumps(args)], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"{name} failed: {tail}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def model_facts(model) -> dict:
    """What the FLOP count needs: decoder-layer matmul weights (no embeddings / LM head), layers, hidden, LoRA."""
    N = sum(p.numel() for n, p in model.named_parameters()
            if ".layers." in n and n.endswith(".weight") and p.dim() == 2)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return {"matmul_params": N, "lora_params": n_lora, "num_layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size}


def flops_forward(f: dict, T: int) -> float:
    """Decoder layers on T tokens: 2·N·T for the matmuls (+ LoRA 2·N_lora·T) + 4·L·T²·H for eager attention
    (full QKᵀ and AV matrices)."""
    return 2.0 * (f["matmul_params"] + f["lora_params"]) * T + 4.0 * f["num_layers"] * T * T * f["hidden"]


def flops_train_round(f: dict, m: int, k: int) -> float:
    """The train phase of a round: K steps of forward + backward, then one forward for the final loss. The
    backward costs about one forward (activation gradients; frozen weights need no weight gradient) plus the
    LoRA weight gradients (2·N_lora·T)."""
    step = 2.0 * flops_forward(f, m) + 2.0 * f["lora_params"] * m
    return k * step + flops_forward(f, m)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        print(f"usage: python -m absorber.bench.speed {{{','.join(TASKS)}}} [JSON]\n\n{__doc__}", file=sys.stderr)
        raise SystemExit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    name, args = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    print(json.dumps(TASKS[name](args)))
