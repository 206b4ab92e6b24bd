"""Decode speed of optimum-onnx's `ORTModelForCausalLM` next to this runtime, same model, same quantization.

Why a separate virtual environment: optimum-onnx (the ONNX Runtime half of optimum, split off from optimum
2.0) pins ``transformers<4.58``, while this project needs transformers 5 (the GGUF loader and the exporter).
One interpreter cannot hold both, so the peer lives in its own venv, by default
``~/.cache/absorber/optimum-venv``, created once and reused. Its torch is installed first as ``torch==2.13.0``,
the CPU wheel this machine has locally; any other torch request pulls a multi-GB CUDA build.

This file runs in two interpreters:

* the main environment (``python -m absorber.bench.optimum_peer`` or ``absorber bench --optimum``): creates the venv,
  writes SmolLM2-135M-Instruct as a plain Hugging Face folder (safetensors + config + tokenizer), measures this
  runtime's bundles, writes the JSON and markdown;
* the venv (``VENV/bin/python THIS_FILE venv-export|venv-measure JSON``): exports with optimum-onnx, quantizes
  with ``ORTQuantizer`` (dynamic int8), measures ``ORTModelForCausalLM.generate``. Top-level imports are
  therefore stdlib only: the venv has no absorber.

Protocol (both engines, each in its own process, one after the other on the same machine): the input is the
first ``context`` tokens of spoken State of the Union text (``absorber.bench.speed.stream_text``) followed by the
prompt of ``absorber bench`` (``PROMPT``). Time to first token = one prefill call producing the first token;
decode tok/s = (produced-1) / (time for ``new_tokens`` greedy tokens - TTFT), KV cache on; one warm-up run,
then the median of ``repeats`` runs. Both use the intra-op thread count of this runtime's default profile.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

PROMPT = "\n\nQuestion: What was this speech about?\nAnswer:"
CACHE = Path(os.environ.get("ABSORBER_CACHE", Path.home() / ".cache" / "absorber"))
VENV = CACHE / "optimum-venv"
HF_DIR = CACHE / "smollm2-135m-hf"
OPT_DIRS = {"fp32": CACHE / "optimum-smollm2-fp32", "int8": CACHE / "optimum-smollm2-int8"}
OPT_FILES = {"fp32": "model.onnx", "int8": "model_quantized.onnx"}
# pip steps, in order: torch first and exactly this version (the local CPU wheel), then the peer itself.
TORCH_SPEC = "torch==2.13.0"
PEER_SPECS = [["optimum-onnx", "transformers<4.58", "onnxruntime", "accelerate"],
              ["optimum-onnx==0.0.3", "transformers<4.58", "onnxruntime", "accelerate"]]
VENV_PACKAGES = ["optimum-onnx", "optimum", "transformers", "torch", "onnxruntime", "onnx", "tokenizers", "numpy",
                 "accelerate"]
KERNELS = {
    ("absorber", "fp32"): "fp32 MatMul",
    ("absorber", "int8"): "com.microsoft.MatMulNBits 8-bit blocks of 32 (linear layers and lm_head), "
                          "the profile's accuracy_level",
    ("absorber", "int4"): "com.microsoft.MatMulNBits 4-bit blocks of 32 (linear layers; lm_head 8-bit, the GGUF's "
                          "Q8_0), the profile's accuracy_level",
    ("optimum-onnx", "fp32"): "fp32 MatMul",
    ("optimum-onnx", "int8"): "dynamic int8 (activations quantized per call; MatMulInteger)",
}


# ------------------------------------------------------------------------------------------------ shared
def one_line(e: BaseException | str) -> str:
    """The last non-empty line (a traceback ends with its error), at most 300 characters."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1].strip() if lines else type(e).__name__)[:300]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure_protocol(first: Callable[[], int], full: Callable[[], int], repeats: int = 3, warmup: int = 1) -> dict:
    """TTFT and decode tok/s by the bench protocol. `first()` produces one token, `full()` the N greedy tokens;
    each returns how many tokens it produced. Warm-up runs are not timed; the medians of `repeats` are kept."""
    for _ in range(warmup):
        full()
    ttfts, totals, rates, produced = [], [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter(); first(); ttft = time.perf_counter() - t0
        t0 = time.perf_counter(); produced = full(); total = time.perf_counter() - t0
        ttfts.append(ttft)
        totals.append(total)
        rates.append((produced - 1) / max(total - ttft, 1e-9) if produced > 1 else None)
    ok = [r for r in rates if r is not None]
    return {"ttft_s": statistics.median(ttfts), "total_s": statistics.median(totals),
            "decode_tok_s": statistics.median(ok) if ok else None, "produced_tokens": produced,
            "runs": {"ttft_s": ttfts, "total_s": totals, "decode_tok_s": rates}}


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ venv side
def venv_export(a: dict) -> dict:
    """(venv) optimum-onnx export (text-generation-with-past) of the HF folder, then dynamic int8."""
    from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from transformers import AutoTokenizer
    hf, fp32, int8 = Path(a["hf"]), Path(a["fp32"]), Path(a["int8"])
    out: dict = {}
    if not (fp32 / OPT_FILES["fp32"]).is_file():
        t0 = time.perf_counter()
        model = ORTModelForCausalLM.from_pretrained(hf, export=True, provider="CPUExecutionProvider")
        model.save_pretrained(fp32)
        AutoTokenizer.from_pretrained(hf).save_pretrained(fp32)
        out["export_s"] = time.perf_counter() - t0
        del model
    if not (int8 / OPT_FILES["int8"]).is_file():
        t0 = time.perf_counter()
        isa = a.get("isa", "avx2")
        make = getattr(AutoQuantizationConfig, isa)
        qcfg = make(is_static=False, per_channel=True)
        quantizer = ORTQuantizer.from_pretrained(fp32, file_name=OPT_FILES["fp32"])
        quantizer.quantize(save_dir=int8, quantization_config=qcfg)
        AutoTokenizer.from_pretrained(fp32).save_pretrained(int8)
        out["quantize_s"] = time.perf_counter() - t0
        out["quantization"] = f"AutoQuantizationConfig.{isa}(is_static=False, per_channel=True)"
    out["sizes_mb"] = {q: (d / OPT_FILES[q]).stat().st_size / 2**20 for q, d in (("fp32", fp32), ("int8", int8))}
    return out


def venv_measure(a: dict) -> dict:
    """(venv) ORTModelForCausalLM.generate on the given ids: greedy, KV cache on, the bench protocol."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(a["threads"])
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    torch.set_num_threads(int(a["threads"]))
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(a["dir"], file_name=a["file"], session_options=so,
                                                provider="CPUExecutionProvider", use_cache=True)
    open_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(a["dir"])
    ids = torch.tensor([a["ids"]], dtype=torch.long)
    mask = torch.ones_like(ids)
    n_new = int(a["new_tokens"])
    last: list = []

    def gen(n: int) -> int:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 2)
        last[:] = out[0, ids.shape[1]:].tolist()
        return len(last)

    res = measure_protocol(lambda: gen(1), lambda: gen(n_new), int(a["repeats"]), int(a["warmup"]))
    text = tok.decode([t for t in last if t != tok.eos_token_id], skip_special_tokens=True)
    return res | {"open_s": open_s, "answer": text, "providers": getattr(model, "providers", None)}


def package_versions(packages: list[str]) -> dict:
    """{package: version or None} of the running interpreter, with its Python version (run inside a venv)."""
    from importlib import metadata
    out = {"python": sys.version.split()[0]}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def venv_versions(_: dict) -> dict:
    return package_versions(VENV_PACKAGES)


VENV_TASKS: dict[str, Callable[[dict], dict]] = {"venv-export": venv_export, "venv-measure": venv_measure,
                                                 "venv-versions": venv_versions}


# ------------------------------------------------------------------------------------------------ main side
_VENV_BOOT = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('optimum_peer', sys.argv[1]); "
              "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); sys.exit(m.main(sys.argv[2:]))")


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def run_in_venv(task: str, a: dict, venv: Path = VENV, timeout: float = 1800, script: str = __file__,
                name: str = "optimum") -> dict:
    """Run one venv task of `script` (a peer module) in the venv; the last stdout line is its JSON. The script is
    loaded by path under another name, in isolated mode (-I), so that no module of this checkout (absorber/,
    absorber/bench/) can shadow a top-level module of the venv."""
    r = subprocess.run([str(venv_python(venv)), "-I", "-c", _VENV_BOOT, os.path.abspath(script), task, json.dumps(a)],
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"{task} in the {name} venv failed: {one_line(r.stderr or r.stdout or 'no output')}")
    return _last_json(r.stdout)


def _pip(venv: Path, specs: list[str], say: Callable[[str], None], name: str = "optimum-peer") -> None:
    say(f"{name}: pip install {' '.join(specs)}")
    r = subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "-q", *specs], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(specs)}: {one_line(r.stderr or r.stdout)}")


def install_venv(venv: Path, say: Callable[[str], None], run: Callable[[str, dict, Path], dict], name: str,
                 needed: tuple[str, ...], spec_sets: list[list[str]]) -> dict:
    """Create a peer's venv once: torch==2.13.0 first (the CPU wheel), then the first of `spec_sets` that
    installs, unless every package of `needed` is there already. `run` runs a venv task of the peer's module.
    Returns the installed versions and the pip steps that ran."""
    steps: list[str] = []
    if not venv_python(venv).is_file():
        say(f"{name}: creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    try:
        v = run("venv-versions", {}, venv)
    except RuntimeError:
        v = {}
    if not v.get("torch"):
        _pip(venv, [TORCH_SPEC], say, name)
        steps.append(f"pip install {TORCH_SPEC}")
    if not all(v.get(k) for k in needed):
        errors = []
        for specs in spec_sets:
            try:
                _pip(venv, specs, say, name)
                steps.append("pip install " + " ".join(f'"{s}"' if any(c in s for c in "<*") else s for s in specs))
                break
            except RuntimeError as e:
                errors.append(str(e))
        else:
            raise RuntimeError(f"{needed[0]} does not install: " + " | ".join(errors))
    return {"versions": run("venv-versions", {}, venv), "pip_steps": steps, "venv": str(venv)}


def ensure_venv(venv: Path = VENV, say: Callable[[str], None] = print) -> dict:
    """The optimum venv: torch==2.13.0, then optimum-onnx with transformers<4.58 (the newest optimum-onnx, else
    an older one)."""
    return install_venv(venv, say, run_in_venv, "optimum-peer", ("optimum-onnx", "transformers", "onnxruntime",
                                                                  "accelerate"), PEER_SPECS)


def fix_hf_folder_for_transformers4(d: Path) -> list[str]:
    """Make a folder written by transformers 5 readable by transformers 4.5x (what optimum-onnx pins).

    transformers 5 writes the RoPE base inside `rope_parameters`; 4.5x reads only `rope_theta` and would
    silently fall back to 10000 (wrong logits), so it is copied out. Its tokenizer_config names the class
    `TokenizersBackend`, unknown to 4.5x: `PreTrainedTokenizerFast` reads the same tokenizer.json. Returns
    what was changed."""
    changed = []
    cp = d / "config.json"
    c = json.loads(cp.read_text())
    rp = c.get("rope_parameters") or {}
    if "rope_theta" not in c and "rope_theta" in rp:
        c["rope_theta"] = rp["rope_theta"]
        changed.append("config.rope_theta from rope_parameters")
    if "rope_scaling" not in c and rp.get("rope_type", "default") == "default":
        c["rope_scaling"] = None
    if "torch_dtype" not in c and "dtype" in c:
        c["torch_dtype"] = c["dtype"]
    cp.write_text(json.dumps(c, indent=2))
    tp = d / "tokenizer_config.json"
    if tp.is_file():
        t = json.loads(tp.read_text())
        if t.get("tokenizer_class") in ("TokenizersBackend", None):
            t["tokenizer_class"] = "PreTrainedTokenizerFast"
            changed.append("tokenizer_class TokenizersBackend -> PreTrainedTokenizerFast")
        for k in ("backend", "is_local", "local_files_only"):
            t.pop(k, None)
        tp.write_text(json.dumps(t, indent=2))
    return changed


def write_hf_folder(spec: str = "smollm2-135m", dst: Path = HF_DIR) -> dict:
    """(main env) The model as a plain HF folder, once: fp32 weights dequantized from the embedded GGUF."""
    if (dst / "config.json").is_file() and (dst / "model.safetensors").is_file():
        return {"hf_dir": str(dst), "written": False}
    from absorber import models
    model, tok = models.load(spec)
    # transformers 5 refuses to save a model loaded from GGUF (its quantizer is "not serializable"); the
    # weights are already dequantized fp32 tensors, so dropping the GGUF marker saves them as they are.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    fixes = fix_hf_folder_for_transformers4(tmp)
    tmp.rename(dst)
    return {"hf_dir": str(dst), "written": True, "fixes": fixes}


def cpu_isa() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2"
    return "avx512_vnni" if "avx512_vnni" in flags else ("avx512" if "avx512f" in flags else "avx2")


def runtime_threads() -> dict:
    """The intra-op thread count this runtime's default profile gives ORT (0 = ORT's default, one per core)."""
    from absorber.devices.machine import logical_cpus
    from absorber.devices.profiles import default_profile
    p = default_profile()
    return {"profile": p.name, "profile_threads": p.threads, "threads": p.threads or logical_cpus()}


def context_ids(bundle: str, context: int) -> dict:
    """The first `context` tokens of the bench text and the prompt's tokens, with the bundle's tokenizer."""
    from absorber.bench.speed import stream_text
    from absorber.runtime import Stream
    tok = Stream.open(bundle).tokenizer
    ids = tok.encode(stream_text(context), add_special_tokens=False).ids[:context]
    return {"context": ids, "prompt": tok.encode(PROMPT, add_special_tokens=False).ids}


def task_runtime_decode(a: dict) -> dict:
    """(main env, own process) this runtime on a bundle: feed the context, then ask() as `absorber bench`."""
    from absorber.runtime import Stream
    t0 = time.perf_counter()
    s = Stream.open(a["bundle"])
    open_s = time.perf_counter() - t0
    s.feed_tokens(a["context"])      # fewer than n+m tokens: no round runs, the window holds the context
    last = {"text": ""}

    def ask(n: int) -> int:
        last["text"] = s.ask(PROMPT, max_new_tokens=n)
        return s.last_answer_tokens

    res = measure_protocol(lambda: ask(1), lambda: ask(int(a["new_tokens"])), int(a["repeats"]), int(a["warmup"]))
    return res | {"open_s": open_s, "answer": last["text"], "window": len(s.window),
                  "quant": s.bundle.quant_scheme}


def run_main_task(task: str, a: dict, timeout: float = 1800) -> dict:
    """A main-env task in a fresh interpreter (so each engine has the machine and its memory to itself)."""
    import absorber
    root = str(Path(absorber.__file__).resolve().parent.parent)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "absorber.bench.optimum_peer", task, json.dumps(a)], capture_output=True,
                       text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{task} failed: {one_line(r.stderr or r.stdout or 'no output')}")
    return _last_json(r.stdout)


def _bundle_quant(bundle: str) -> str:
    from absorber.runtime.bundle import open_bundle
    b = open_bundle(bundle, verify_hashes=False)
    return b.quant_scheme


def _engine(engine: str, quant: str, fn: Callable[[], dict], processes: int = 1) -> dict:
    """`fn` (one fresh process each) `processes` times; TTFT and decode are the medians over processes, each
    process's own numbers are kept (a process can land in a slow or a fast mode and stay there)."""
    before = loadavg()
    runs = []
    for _ in range(max(processes, 1)):
        try:
            runs.append(fn())
        except Exception as e:  # noqa: BLE001 - one failed engine is reported, the others still run
            return {"engine": engine, "quant": quant, "error": one_line(e), "load_before": before,
                    "load_after": loadavg()}
    rates = [r["decode_tok_s"] for r in runs if r.get("decode_tok_s")]
    out = {**runs[len(runs) // 2], "ttft_s": statistics.median(r["ttft_s"] for r in runs),
           "decode_tok_s": statistics.median(rates) if rates else None,
           "per_process": [{k: r.get(k) for k in ("ttft_s", "decode_tok_s", "runs")} for r in runs]}
    return {"engine": engine, "quant": quant, "kernels": KERNELS.get((engine, quant), ""), **out,
            "load_before": before, "load_after": loadavg()}


def run_peer(bundles: list[str], context: int = 256, new_tokens: int = 32, repeats: int = 3, warmup: int = 1,
             venv: Path = VENV, quants: tuple[str, ...] = ("fp32", "int8"), say: Callable[[str], None] = print,
             command: str = "", processes: int = 1) -> dict:
    """The whole comparison: venv, HF folder, optimum export, then per quant optimum-onnx and this runtime."""
    from importlib import metadata
    res: dict = {"settings": {"context": context, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                              "processes": processes, "prompt": PROMPT, "decoding": "greedy, KV cache"},
                 "command": command, "engines": [], "load_start": loadavg()}
    res["main_versions"] = {p: _version(metadata, p) for p in ("absorber", "onnxruntime", "transformers", "torch")}
    res["threads"] = runtime_threads()
    by_quant = {_bundle_quant(b): b for b in bundles}
    if not by_quant:
        raise RuntimeError("no bundle given: pass --bundle (fp32 and/or int8) for this runtime's side")
    ids = context_ids(next(iter(by_quant.values())), context)
    res["input_tokens"] = len(ids["context"]) + len(ids["prompt"])
    common = {"new_tokens": new_tokens, "repeats": repeats, "warmup": warmup}
    try:
        say("optimum-peer: venv …")
        res["optimum_env"] = ensure_venv(venv, say)
        say("optimum-peer: HF folder …")
        res["hf_folder"] = write_hf_folder()
        say("optimum-peer: optimum-onnx export + int8 quantization …")
        res["optimum_export"] = run_in_venv("venv-export", {"hf": str(HF_DIR), "fp32": str(OPT_DIRS["fp32"]),
                                                            "int8": str(OPT_DIRS["int8"]), "isa": cpu_isa()}, venv)
    except Exception as e:  # noqa: BLE001 - the peer's failure is a result, written in one line
        res["optimum_error"] = one_line(e)
        say(f"optimum-peer: {res['optimum_error']}")
    for q in quants:
        if "optimum_error" not in res:
            say(f"optimum-peer: optimum-onnx {q} …")
            a = {**common, "dir": str(OPT_DIRS[q]), "file": OPT_FILES[q], "ids": ids["context"] + ids["prompt"],
                 "threads": res["threads"]["threads"]}
            fn = lambda a=a: run_in_venv("venv-measure", a, venv)  # noqa: E731
            res["engines"].append(_engine("optimum-onnx", q, fn, processes))
        if q in by_quant:
            say(f"optimum-peer: absorber runtime {q} ({by_quant[q]}) …")
            a = {**common, "bundle": by_quant[q], "context": ids["context"]}
            fn = lambda a=a: run_main_task("runtime-decode", a)  # noqa: E731
            res["engines"].append(_engine("absorber", q, fn, processes) | {"bundle": by_quant[q]})
    res["load_end"] = loadavg()
    _compare(res)
    return res


def _version(metadata, p: str) -> str | None:
    try:
        return metadata.version(p)
    except metadata.PackageNotFoundError:
        return None


def _compare(res: dict) -> None:
    """ours / optimum decode ratio per quant, and whether the greedy answers agree."""
    by = {(e["engine"], e["quant"]): e for e in res["engines"] if "error" not in e}
    res["ratios"] = {}
    for q in ("fp32", "int8"):
        o, a = by.get(("optimum-onnx", q)), by.get(("absorber", q))
        if o and a and o.get("decode_tok_s") and a.get("decode_tok_s"):
            res["ratios"][q] = {"decode_absorber_over_optimum": a["decode_tok_s"] / o["decode_tok_s"],
                                "ttft_absorber_over_optimum": a["ttft_s"] / o["ttft_s"],
                                "same_answer": a.get("answer", "").strip() == o.get("answer", "").strip()}


# ------------------------------------------------------------------------------------------------ report
def _f(x, nd: int = 2) -> str:
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _versions_cell(e: dict, res: dict) -> str:
    if e["engine"] == "optimum-onnx":
        v = (res.get("optimum_env") or {}).get("versions", {})
        return (f"optimum-onnx {v.get('optimum-onnx')}, optimum {v.get('optimum')}, transformers "
                f"{v.get('transformers')}, onnxruntime {v.get('onnxruntime')}")
    v = res.get("main_versions", {})
    return f"absorber {v.get('absorber')}, onnxruntime {v.get('onnxruntime')}"


def _per_process(e: dict) -> str:
    pp = e.get("per_process") or []
    return ", ".join(_f(p.get("decode_tok_s"), 1) for p in pp) if len(pp) > 1 else "–"


def table_rows(res: dict) -> list[str]:
    """The markdown table (header + one row per engine); also used by `absorber bench --optimum`."""
    lines = ["| engine | quant | kernels | versions | TTFT s | decode tok/s | per process | tokens | "
             "load before → after |", "|---|---|---|---|---|---|---|---|---|"]
    if res.get("optimum_error"):
        lines.append(f"| optimum-onnx | | not measured: {res['optimum_error']} |||||||")
    for e in res.get("engines", []):
        if "error" in e:
            lines.append(f"| {e['engine']} | {e['quant']} | failed: {e['error']} |||||||")
            continue
        lb, la = e.get("load_before") or [None], e.get("load_after") or [None]
        lines.append(f"| {e['engine']} | {e['quant']} | {e.get('kernels', '')} | {_versions_cell(e, res)} | "
                     f"{_f(e.get('ttft_s'), 3)} | {_f(e.get('decode_tok_s'), 1)} | {_per_process(e)} | "
                     f"{e.get('produced_tokens')} | "
                     f"{_f(lb[0])} → {_f(la[0])} |")
    return lines


def markdown(res: dict) -> str:
    s = res.get("settings", {})
    th = res.get("threads", {})
    lines = ["# Decode speed: absorber runtime vs optimum-onnx `ORTModelForCausalLM` (SmolLM2-135M-Instruct)", "",
             f"Command: `{res.get('command') or 'python -m absorber.bench.optimum_peer'}`", "",
             f"Input: {res.get('input_tokens')} tokens (the first {s.get('context')} tokens of spoken State of the "
             f"Union text + the bench prompt); {s.get('new_tokens')} new tokens, greedy, KV cache; "
             f"{s.get('warmup')} warm-up run, then the median of {s.get('repeats')} runs; {s.get('processes', 1)} fresh "
             f"process per engine (medians over processes). Intra-op threads: {th.get('threads')} "
             f"(this runtime's profile `{th.get('profile')}`, for both engines). Load average (1 min) at start "
             f"{_f((res.get('load_start') or [None])[0])}, at end {_f((res.get('load_end') or [None])[0])}.", ""]
    lines += table_rows(res)
    if res.get("note"):
        lines += ["", f"Note: {res['note']}"]
    ratios = res.get("ratios") or {}
    if ratios:
        lines.append("")
        for q, r in ratios.items():
            lines.append(f"- {q}: absorber / optimum-onnx decode {r['decode_absorber_over_optimum']:.2f}×, "
                         f"TTFT {r['ttft_absorber_over_optimum']:.2f}×; same greedy answer: "
                         f"{'yes' if r['same_answer'] else 'no'}")
    return "\n".join(lines) + "\n"


def peer_parser(prog: str, doc: str, bundles: str, venv: Path, name: str) -> argparse.ArgumentParser:
    """The arguments every decode peer takes (this module's and absorber.bench.genai_peer's)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", action="append", default=[], help=f"this runtime's bundle (repeat: {bundles})")
    p.add_argument("--context", type=int, default=256, help="context tokens before the prompt (default: m=256)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--processes", type=int, default=1,
                   help="fresh processes per engine; TTFT and decode are medians over them (default %(default)s)")
    p.add_argument("--venv", default=str(venv), help="the peer's virtual environment (default %(default)s)")
    p.add_argument("--json", dest="json_out", default=f"benchmarks/{name}.json")
    p.add_argument("--md", default=f"benchmarks/{name}.md")
    return p


def write_results(res: dict, md: str, json_out: str | None, md_out: str | None) -> None:
    """Print the markdown; write the JSON and the markdown where asked."""
    print(md)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=1))
    if md_out:
        Path(md_out).write_text(md)


def build_parser() -> argparse.ArgumentParser:
    return peer_parser("python -m absorber.bench.optimum_peer", __doc__, "fp32, int8", VENV, "optimum_peer")


def main(argv: list[str] | None = None, prog: str = "python -m absorber.bench.optimum_peer") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in VENV_TASKS:          # venv side
        print(json.dumps(VENV_TASKS[argv[0]](json.loads(argv[1]))))
        return 0
    if argv and argv[0] in MAIN_TASKS:          # one engine in its own process
        print(json.dumps(MAIN_TASKS[argv[0]](json.loads(argv[1]))))
        return 0
    args = build_parser().parse_args(argv)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    res = run_peer(args.bundle, args.context, args.new_tokens, args.repeats, args.warmup, Path(args.venv), say=say,
                   command=" ".join([prog, *argv]), processes=args.processes)
    write_results(res, markdown(res), args.json_out, args.md)
    return 0


MAIN_TASKS: dict[str, Callable[[dict], dict]] = {"runtime-decode": task_runtime_decode}

if __name__ == "__main__":
    sys.exit(main())
