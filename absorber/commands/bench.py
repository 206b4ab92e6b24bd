"""`absorber bench`: speed and memory of the ONNX runtime vs the PyTorch reference, side by side.

The CLI verb over `absorber.bench` (speed, plot, optimum_peer, genai_peer): the only module outside absorber/bench/ and
benchmarks/scripts/ that may import it."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from absorber.errors import AbsorberError

HELP = "measure absorption speed, decode speed and memory: ONNX runtime bundles vs the PyTorch reference"
DESCRIPTION = """\
Runs, each in its own process so that every peak RSS is its own: the machine's fp32 GEMM peak (ONNX Runtime
and numpy); the PyTorch reference absorbing --tokens tokens of spoken State of the Union transcripts at the
given n, m, K; each --bundle on the same tokens (absorbed tokens/s, seconds per round split into teacher pass /
train steps / optimizer / bookkeeping, decode tokens/s, time to first token, peak RSS); and RSS against tokens
seen on a long stream (--rss-tokens) for the runtime vs full-context transformers decoding, which grows until
the model's context is full. Writes a JSON, a markdown table and a PNG plot.

--optimum adds decode speed against optimum-onnx's ORTModelForCausalLM on the same model (fp32 and dynamic
int8), next to each fp32/int8 --bundle, with the first --m tokens of the text as context. optimum-onnx pins
transformers<4.58, so it runs in its own venv (~/.cache/absorber/optimum-venv), which the first such run
creates and fills with pip (torch==2.13.0 first): minutes, and packages installed. Off by default. The same
measurement alone: python -m absorber.bench.optimum_peer --bundle DIR…

--genai adds decode speed against onnxruntime-genai (og.Model + og.Generator, explicit step loop) on the same
model, built by its model builder (fp32, and int8/int4 MatMulNBits blocks of 32 at this runtime's accuracy_level
and at the builder's default 4), next to each --bundle. Its builder needs torch, transformers, onnx and onnx_ir,
so it runs in its own venv (~/.cache/absorber/genai-venv), which the first such run creates and fills with pip
(torch==2.13.0 first): minutes, and packages installed. Off by default. The same measurement alone:
python -m absorber.bench.genai_peer --bundle DIR…

example:
  absorber bench --bundle bundles/smollm2-int8 --bundle bundles/smollm2-fp32 --json benchmarks/bench.json \\
      --md benchmarks/bench.md --plot benchmarks/bench_rss.png
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", action="append", default=[], help="bundle folder (repeat for fp32/int8/int4)")
    p.add_argument("--model", default="smollm2-135m", help="model spec for the PyTorch reference (default %(default)s)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens streamed for the speed runs")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="peak RSS budget for the runtime bundles (e.g. 600MB): the window --n/--m shrinks until the "
                        "planner's prediction + 10 %% fits; the table shows the window, the prediction and the peak")
    p.add_argument("--profile", metavar="NAME", help="device profile for the runtime bundles (absorber devices)")
    p.add_argument("--rss-tokens", type=int, default=0, help="tokens for the RSS-vs-stream curve (0: skip)")
    p.add_argument("--rss-k", type=int, default=1, help="K for the RSS curve (memory does not depend on K)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--json", dest="json_out", help="write the results as JSON here")
    p.add_argument("--md", help="write a markdown table here")
    p.add_argument("--plot", help="write the RSS-vs-tokens plot (PNG) here")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement process")
    p.add_argument("--optimum", action="store_true",
                   help="also measure decode speed of optimum-onnx's ORTModelForCausalLM (fp32, int8) next to the "
                        "fp32/int8 bundles; creates a venv with pip on first use (minutes; off by default)")
    p.add_argument("--genai", action="store_true",
                   help="also measure decode speed of onnxruntime-genai (og.Generator; fp32, int8, int4 builds of its "
                        "model builder) next to the bundles; creates a venv with pip on first use (minutes; off by "
                        "default)")


def _fmt(x, nd=2):
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def machine() -> dict:
    """CPU model, logical CPUs and the SIMD flags that decide which kernels run (printed with every table)."""
    import os
    import platform
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd")
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": " ".join(f for f in wanted if f in flags) or "unknown"}


def _window(r: dict) -> str:
    w = r.get("window") or {}
    return f"{w['n']}/{w['m']}" if "n" in w and "m" in w else "–"


def markdown(res: dict, command: str) -> str:
    m = res.get("machine") or {}
    lines = [f"Command: `{command}`", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} logical CPUs; ISA flags: {m.get('isa', '?')}", "",
             f"GEMM peak (fp32, {res['gemm'].get('size')}³): ONNX Runtime {_fmt(res['gemm'].get('ort_gflops'), 1)} "
             f"GFLOP/s, numpy {_fmt(res['gemm'].get('numpy_gflops'), 1)} GFLOP/s", "",
             "| engine | quant | absorbed tok/s | s/round | teacher s | train s | optimizer s | bookkeeping s | "
             "train GFLOP/s | % of GEMM peak | decode tok/s | TTFT s | window n/m | predicted MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["engines"]:
        if "error" in r:
            lines.append(f"| {r.get('label', '?')} | | {r['error']} |||||||||||||")
            continue
        pr = r["per_round"]
        lines.append(f"| {r['engine']} | {r.get('quant') or 'fp32'} | {_fmt(r['absorbed_tok_s'], 1)} | "
                     f"{_fmt(pr['seconds'])} | {_fmt(pr['teacher_seconds'])} | {_fmt(pr['train_seconds'])} | "
                     f"{_fmt(pr.get('optimizer_seconds'), 3)} | {_fmt(pr['bookkeeping_seconds'], 3)} | "
                     f"{_fmt(r.get('train_gflops'), 1)} | {_fmt(r.get('gemm_peak_fraction_pct'), 1)} | "
                     f"{_fmt(r.get('decode_tok_s'), 1)} | {_fmt(r.get('ttft_s'), 3)} | {_window(r)} | "
                     f"{_fmt(r.get('predicted_peak_mb'), 0)} | {_fmt(r['peak_rss_mb'], 0)} |")
    lines += ["", f"runtime_vs_torch_speedup: {_fmt(res.get('runtime_vs_torch_speedup'))}; "
                  f"runtime_vs_torch_peak_rss: {_fmt(res.get('runtime_vs_torch_peak_rss'))}; "
                  f"gemm_peak_fraction: {_fmt(res.get('gemm_peak_fraction'), 3)}"]
    for c in res.get("rss_curves", []):
        if "curve" in c:
            pts = c["curve"]
            lines.append(f"- RSS {c['engine']}: {pts[1][1] if len(pts) > 1 else pts[0][1]:.0f} MB after "
                         f"{pts[1][0] if len(pts) > 1 else 0} tokens → {pts[-1][1]:.0f} MB after {pts[-1][0]} tokens"
                         + (f" ({c['stopped']})" if c.get("stopped") else ""))
        else:
            lines.append(f"- RSS curve: {c.get('error')}")
    if res.get("optimum"):
        lines += optimum_section(res["optimum"])
    if res.get("genai"):
        lines += genai_section(res["genai"])
    return "\n".join(lines) + "\n"


def optimum_section(peer: dict) -> list[str]:
    """The `--optimum` rows: one per engine and quant (see absorber.bench.optimum_peer)."""
    from absorber.bench.optimum_peer import table_rows
    s = peer.get("settings", {})
    return ["", f"Decode vs optimum-onnx ORTModelForCausalLM ({peer.get('input_tokens')} input tokens: "
                f"{s.get('context')} of context + the prompt; {s.get('new_tokens')} greedy tokens; median of "
                f"{s.get('repeats')} after {s.get('warmup')} warm-up):", "", *table_rows(peer)]


def genai_section(peer: dict) -> list[str]:
    """The `--genai` rows: one per engine, quant and accuracy level (see absorber.bench.genai_peer)."""
    from absorber.bench.genai_peer import table_rows
    s = peer.get("settings", {})
    return ["", f"Decode vs onnxruntime-genai og.Generator ({peer.get('input_tokens')} input tokens: "
                f"{s.get('context')} of context + the prompt; {s.get('new_tokens')} greedy tokens; median of "
                f"{s.get('repeats')} after {s.get('warmup')} warm-up):", "", *table_rows(peer)]


def main(args) -> int:
    from absorber.bench import speed as B
    for b in args.bundle:
        if not (Path(b) / "manifest.json").is_file():
            raise AbsorberError(f"not a bundle (no manifest.json): {b}")
    common = {"n": args.n, "m": args.m, "k": args.k, "tokens": args.tokens}
    if args.tokens < args.n + args.m:
        raise AbsorberError(f"--tokens {args.tokens} is less than one window (n+m = {args.n + args.m})")
    if args.optimum and not args.bundle:
        raise AbsorberError("--optimum compares against this runtime's bundles: pass --bundle (fp32 and/or int8)")
    if args.genai and not args.bundle:
        raise AbsorberError("--genai compares against this runtime's bundles: pass --bundle (fp32, int8 and/or int4)")
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    res: dict = {"settings": {**common, "model": args.model}, "engines": [], "machine": machine()}
    say("bench: GEMM peak …")
    res["gemm"] = B.run_task("gemm", {"size": 1024}, args.timeout)
    peak = res["gemm"].get("peak_gflops")
    facts = None
    torch_res = None
    if not args.no_torch:
        say("bench: PyTorch reference …")
        torch_res = B.run_task("torch", {**common, "model": args.model}, args.timeout)
        torch_res["label"] = "torch"
        facts = torch_res.get("facts")
        res["engines"].append(torch_res)
    for b in args.bundle:
        say(f"bench: runtime {b} …")
        r = B.run_task("runtime", {**common, "bundle": b, "memory_budget": args.memory_budget,
                                   "profile": args.profile}, args.timeout)
        r["label"] = f"runtime {Path(b).name}"
        res["engines"].append(r)
    for r in res["engines"]:
        if "error" in r or not facts or not r.get("rounds"):
            continue
        per = r["per_round"]
        fl = B.flops_train_round(facts, args.m, args.k) * r["rounds"] / max(per["train_seconds"] * r["rounds"], 1e-9)
        r["train_gflops"] = fl / 1e9
        if peak:
            r["gemm_peak_fraction_pct"] = 100.0 * r["train_gflops"] / peak
    rt = [r for r in res["engines"] if r.get("engine") == "runtime" and "error" not in r]
    if torch_res and "error" not in torch_res and rt:
        best = max(rt, key=lambda r: r["absorbed_tok_s"] or 0)
        res["runtime_vs_torch_speedup"] = best["absorbed_tok_s"] / torch_res["absorbed_tok_s"]
        res["runtime_vs_torch_peak_rss"] = best["peak_rss_mb"] / torch_res["peak_rss_mb"]
        res["best_runtime"] = best["label"]
    fr = [r["gemm_peak_fraction_pct"] / 100 for r in rt if r.get("gemm_peak_fraction_pct")]
    res["gemm_peak_fraction"] = max(fr) if fr else None
    if args.rss_tokens:
        res["rss_curves"] = []
        if args.bundle:
            say(f"bench: runtime RSS over {args.rss_tokens} tokens …")
            c = B.run_task("rss-runtime", {"bundle": args.bundle[0], "n": args.n, "m": args.m, "k": args.rss_k,
                                           "tokens": args.rss_tokens, "memory_budget": args.memory_budget,
                                           "profile": args.profile}, args.timeout)
            c["label"] = f"runtime {Path(args.bundle[0]).name} (window {args.n + args.m})"
            res["rss_curves"].append(c)
        if not args.no_torch:
            say("bench: full-context transformers RSS …")
            c = B.run_task("rss-full", {"model": args.model, "tokens": args.rss_tokens}, args.timeout)
            c["label"] = "transformers, full context"
            res["rss_curves"].append(c)
    if args.optimum:
        from absorber.bench.optimum_peer import run_peer
        say("bench: decode vs optimum-onnx …")
        res["optimum"] = run_peer(args.bundle, context=args.m, say=say, command="absorber bench --optimum")
    if args.genai:
        from absorber.bench.genai_peer import run_genai
        say("bench: decode vs onnxruntime-genai …")
        res["genai"] = run_genai(args.bundle, context=args.m, say=say, command="absorber bench --genai")
    command = "absorber bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "bench" else "absorber bench"
    res["command"] = command
    md = markdown(res, command)
    print(md)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    if args.md:
        Path(args.md).write_text(md)
    if args.plot and res.get("rss_curves"):
        from absorber.bench.plot import plot
        plot(res, args.plot)
    return 0
