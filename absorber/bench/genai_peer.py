"""Decode speed of onnxruntime-genai (`og.Model` + `og.Generator`) next to this runtime, same model, same quantization.

Why a separate virtual environment: onnxruntime-genai's model builder needs torch, transformers, onnx and
onnx_ir, and the genai wheel requires its own onnxruntime (>=1.31 for 0.18). Installing that into the main
environment would let pip move the very onnxruntime / transformers / numpy this runtime is measured with (and
put a builder toolchain into a device install); in its own venv, by default ``~/.cache/absorber/genai-venv``,
created once and reused, the peer cannot touch them. Its torch is installed first as ``torch==2.13.0``, the CPU
wheel this machine has locally; any other torch request pulls a multi-GB CUDA build.

This file runs in two interpreters, like ``absorber.bench.optimum_peer`` (whose venv plumbing, HF folder,
protocol and our side it reuses):

* the main environment (``python -m absorber.bench.genai_peer`` or ``absorber bench --genai``): creates the venv,
  writes SmolLM2-135M-Instruct as a plain Hugging Face folder, measures this runtime's bundles, writes JSON + md;
* the venv (``VENV/bin/python THIS_FILE venv-build|venv-measure JSON``): builds genai models with
  ``python -m onnxruntime_genai.models.builder -i HF -o OUT -p fp32|int8|int4 -e cpu`` (int8/int4: MatMulNBits,
  block size and accuracy_level as given) and measures an explicit ``og.Generator`` step loop. Top-level imports
  are therefore stdlib only: the venv has no absorber.

Protocol: that of optimum_peer (``measure_protocol``): the same token ids (context + PROMPT, our tokenizer),
greedy, KV cache, TTFT = prefill + first token, decode tok/s = (produced-1) / (total - TTFT), one warm-up, the
median of ``repeats``, each engine in fresh processes, the intra-op thread count of this runtime's profile
(genai: ``model.decoder.session_options.intra_op_num_threads`` overlaid on genai_config.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

if __package__:                     # main env; in the venv this file is loaded by path and has no package
    from absorber.bench import optimum_peer as O
else:
    O = None  # type: ignore[assignment]

CACHE = Path(os.environ.get("ABSORBER_CACHE", Path.home() / ".cache" / "absorber"))
VENV = CACHE / "genai-venv"
BUILDER_CACHE = CACHE / "genai-builder-cache"
TORCH_SPEC = "torch==2.13.0"
# pip steps after torch: onnxruntime-genai 0.18 (else the newest 0.x) and what its model builder imports.
BUILDER_DEPS = ["transformers", "onnx", "onnx-ir", "onnxruntime", "numpy"]
GENAI_SPECS = [["onnxruntime-genai==0.18.*", *BUILDER_DEPS], ["onnxruntime-genai<1", *BUILDER_DEPS]]
VENV_PACKAGES = ["onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx", "onnx-ir", "numpy"]
PRECISIONS = ("fp32", "int8", "int4")
BLOCK_SIZE = 32                     # our bundles' MatMulNBits block (bundle_format.INT4_BLOCK)
BITS = {"int8": 8, "int4": 4}


def model_dir(precision: str, accuracy_level: int, block_size: int = BLOCK_SIZE) -> Path:
    """Where the builder's output for these settings is cached (one folder per setting)."""
    tail = "" if precision == "fp32" else f"-acc{accuracy_level}-b{block_size}"
    return CACHE / f"genai-smollm2-{precision}{tail}"


def builder_command(python: str, hf: str, out: str, precision: str, accuracy_level: int,
                    block_size: int = BLOCK_SIZE, cache_dir: str = str(BUILDER_CACHE)) -> list[str]:
    """The model builder's command line. int8/int4: weight-only MatMulNBits with our block size and accuracy
    level, RTN; int4 keeps the lm_head at 8 bits (``last_matmul:int8``) as our int4 bundle does (its lm_head is
    the GGUF's Q8_0 tensor). ``algo_config=rtn`` is needed for that: with the default algo, 0.18's mixed
    precision writes an invalid graph ("Node input 'lm_head.MatMul.weight_Q8G32' is not a graph input")."""
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, "-p", precision, "-e", "cpu",
           "-c", cache_dir]
    if precision != "fp32":
        extra = [f"accuracy_level={accuracy_level}", f"block_size={block_size}", "algo_config=rtn"]
        if precision == "int4":
            extra.append("matmul_mixed_precision=last_matmul:int8")
        cmd += ["--extra_options", *extra]
    return cmd


# ------------------------------------------------------------------------------------------------ venv side
def _kernels(onnx_path: Path) -> dict:
    """(venv) MatMulNBits nodes by bits / block / accuracy_level, and the attention op, read off the graph."""
    import onnx
    g = onnx.load(str(onnx_path), load_external_data=False).graph
    nbits: dict[str, int] = {}
    ops = {n.op_type for n in g.node}
    for n in g.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            key = f"{a.get('bits')}-bit b{a.get('block_size')} acc{a.get('accuracy_level', 0)}"
            nbits[key] = nbits.get(key, 0) + 1
    return {"matmul_nbits": nbits, "matmul": sum(n.op_type == "MatMul" for n in g.node),
            "attention": sorted(ops & {"GroupQueryAttention", "MultiHeadAttention", "Attention"})}


def venv_build(a: dict) -> dict:
    """(venv) Run the model builder once for one setting (skipped when its folder is complete), then inspect."""
    out = Path(a["out"])
    res: dict = {"dir": str(out), "command": builder_command("python", a["hf"], a["out"], a["precision"],
                                                             int(a["accuracy_level"]), int(a["block_size"]))[1:]}
    if not (out / "genai_config.json").is_file():
        cmd = builder_command(sys.executable, a["hf"], a["out"], a["precision"], int(a["accuracy_level"]),
                              int(a["block_size"]), a.get("cache_dir", str(BUILDER_CACHE)))
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(out.parent))
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
            raise RuntimeError(f"builder {a['precision']}: {lines[-1][:300] if lines else r.returncode}")
        res["build_s"] = time.perf_counter() - t0
    cfg = json.loads((out / "genai_config.json").read_text())
    onnx_file = out / cfg["model"]["decoder"]["filename"]
    res["kernels"] = _kernels(onnx_file)
    res["size_mb"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    return res


def venv_measure(a: dict) -> dict:
    """(venv) og.Generator on the given ids: greedy, explicit append_tokens / generate_next_token loop."""
    import numpy as np
    import onnxruntime_genai as og
    threads = int(a["threads"])
    t0 = time.perf_counter()
    cfg = og.Config(a["dir"])
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    open_s = time.perf_counter() - t0
    ids = np.asarray(a["ids"], dtype=np.int32)
    last: list[int] = []

    def gen(n: int) -> int:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n)
        g = og.Generator(model, params)
        g.append_tokens(ids)                 # the prefill pass
        out: list[int] = []
        while len(out) < n and not g.is_done():
            g.generate_next_token()          # picks a token from the last logits, then runs the next step
            out.append(int(g.get_next_tokens()[0]))
        last[:] = out
        return len(out)

    res = _measure_protocol(lambda: gen(1), lambda: gen(int(a["new_tokens"])), int(a["repeats"]), int(a["warmup"]))
    tok = og.Tokenizer(model)
    eos = set(tok.eos_token_ids) if hasattr(tok, "eos_token_ids") else set()
    text = tok.decode(np.asarray([t for t in last if t not in eos], dtype=np.int32))
    return res | {"open_s": open_s, "answer": text, "session_options": {"intra_op_num_threads": threads,
                                                                          "inter_op_num_threads": 1}}


def venv_versions(_: dict) -> dict:
    return _optimum_peer().package_versions(VENV_PACKAGES)


def _measure_protocol(first: Callable[[], int], full: Callable[[], int], repeats: int, warmup: int) -> dict:
    return _optimum_peer().measure_protocol(first, full, repeats, warmup)


def _optimum_peer():
    """optimum_peer, loaded by path (inside the venv there is no absorber package to import it from)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_optimum_peer", Path(__file__).with_name("optimum_peer.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)  # type: ignore[union-attr]
    return m


VENV_TASKS: dict[str, Callable[[dict], dict]] = {"venv-build": venv_build, "venv-measure": venv_measure,
                                                 "venv-versions": venv_versions}


# ------------------------------------------------------------------------------------------------ main side
def run_in_venv(task: str, a: dict, venv: Path = VENV, timeout: float = 1800) -> dict:
    """One venv task of this file, in the genai venv (optimum_peer.run_in_venv)."""
    return O.run_in_venv(task, a, venv, timeout, script=__file__, name="genai")


def ensure_venv(venv: Path = VENV, say: Callable[[str], None] = print) -> dict:
    """The genai venv: torch==2.13.0, then onnxruntime-genai 0.18 (else the newest 0.x) with the builder's
    imports."""
    return O.install_venv(venv, say, run_in_venv, "genai-peer", ("onnxruntime-genai", "transformers", "onnx",
                                                                  "onnx-ir"), GENAI_SPECS)


def runtime_accuracy(bundle: str) -> dict[int, int] | None:
    """The MatMulNBits accuracy_level this runtime's decoder runs an int bundle at, per weight bits ({4: 1, 8: 4}):
    the default profile's matmul_accuracy ("decoder:8" before "decoder"), else what the bundle was exported with
    (None for fp32)."""
    from absorber.devices.profiles import default_profile
    from absorber.runtime.bundle import open_bundle
    from absorber.runtime.sessions import accuracy_for
    b = open_bundle(bundle, verify_hashes=False)
    if b.quant_scheme == "fp32":
        return None
    q, prof = b.manifest["quant"], default_profile()
    exported = int(q.get("accuracy_level", {}).get("decoder", 0))
    out = {}
    for bits in sorted({int(v) for v in q.get("bits", {}).values()} or {BITS[b.quant_scheme]}):
        want = accuracy_for(prof, "decoder", bits)
        out[bits] = int(exported if want is None else want)
    return out


def body_accuracy(quant: str, by_bits: dict[int, int] | None) -> int | None:
    """The level of the bundle's main weight width (int8: 8-bit, int4: 4-bit nodes), the one genai is matched on."""
    return None if not by_bits else by_bits.get(BITS[quant], next(iter(by_bits.values())))


def kernels_text(k: dict) -> str:
    """One cell from venv_build's graph census, e.g. 'MatMulNBits 4-bit b32 acc1 ×210, … ; GroupQueryAttention'."""
    parts = [f"MatMulNBits {key} ×{n}" for key, n in sorted((k.get("matmul_nbits") or {}).items())]
    if k.get("matmul"):
        parts.append(f"fp32 MatMul ×{k['matmul']}")
    return ", ".join(parts) + (f"; {'/'.join(k['attention'])}" if k.get("attention") else "")


def build_plan(precisions: tuple[str, ...], levels: list[int]) -> list[tuple[str, int | None]]:
    """(precision, accuracy_level) of each genai build: fp32 once, each int precision at every level."""
    return [(p, None) for p in precisions if p == "fp32"] + [(p, a) for p in precisions if p != "fp32" for a in levels]


def run_genai(bundles: list[str], context: int = 256, new_tokens: int = 32, repeats: int = 3, warmup: int = 1,
              venv: Path = VENV, precisions: tuple[str, ...] = PRECISIONS, accuracy_levels: list[int] | None = None,
              block_size: int = BLOCK_SIZE, say: Callable[[str], None] = print, command: str = "",
              processes: int = 1) -> dict:
    """The whole comparison: venv, HF folder, genai builds, then per quant onnxruntime-genai and this runtime.
    accuracy_levels (genai int builds): default the level this runtime runs its int bundles at, and the
    builder's CPU default 4."""
    from importlib import metadata
    by_quant = {O._bundle_quant(b): b for b in bundles}
    if not by_quant:
        raise RuntimeError("no bundle given: pass --bundle (fp32, int8 and/or int4) for this runtime's side")
    ours = {q: runtime_accuracy(b) for q, b in by_quant.items()}
    if not accuracy_levels:
        accuracy_levels = sorted({body_accuracy(q, a) for q, a in ours.items() if a} | {4})
    res: dict = {"settings": {"context": context, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                              "processes": processes, "prompt": O.PROMPT, "decoding": "greedy, KV cache"},
                 "command": command, "engines": [], "builds": [], "load_start": O.loadavg()}
    res["main_versions"] = {p: O._version(metadata, p) for p in ("absorber", "onnxruntime", "transformers", "torch")}
    res["threads"] = O.runtime_threads()
    ids = O.context_ids(next(iter(by_quant.values())), context)
    res["input_tokens"] = len(ids["context"]) + len(ids["prompt"])
    common = {"new_tokens": new_tokens, "repeats": repeats, "warmup": warmup}
    try:
        say("genai-peer: venv …")
        res["genai_env"] = ensure_venv(venv, say)
        say("genai-peer: HF folder …")
        res["hf_folder"] = O.write_hf_folder()
        for p, acc in build_plan(precisions, accuracy_levels):
            say(f"genai-peer: model builder {p} accuracy_level {acc} …")
            b = run_in_venv("venv-build", {"hf": str(O.HF_DIR), "out": str(model_dir(p, acc or 0, block_size)),
                                           "precision": p, "accuracy_level": acc or 0, "block_size": block_size}, venv)
            res["builds"].append(b | {"precision": p, "execution_provider": "cpu", "accuracy_level": acc,
                                      "block_size": None if acc is None else block_size,
                                      "lm_head_bits": {"int4": 8, "int8": 8}.get(p),
                                      "algo": None if acc is None else "rtn"})
    except Exception as e:  # noqa: BLE001 - the peer's failure is a result, written in one line
        res["genai_error"] = O.one_line(e)
        say(f"genai-peer: {res['genai_error']}")
    for q in precisions:
        for b in (b for b in res["builds"] if b["precision"] == q):
            say(f"genai-peer: onnxruntime-genai {q} accuracy_level {b['accuracy_level']} …")
            a = {**common, "dir": b["dir"], "ids": ids["context"] + ids["prompt"], "threads": res["threads"]["threads"]}
            fn = lambda a=a: run_in_venv("venv-measure", a, venv)  # noqa: E731
            e = O._engine("onnxruntime-genai", q, fn, processes) | {"accuracy_level": b["accuracy_level"],
                                                                     "block_size": b["block_size"]}
            res["engines"].append(e if "error" in e else e | {"kernels": kernels_text(b["kernels"])})
        if q in by_quant:
            say(f"genai-peer: absorber runtime {q} ({by_quant[q]}) …")
            a = {**common, "bundle": by_quant[q], "context": ids["context"]}
            fn = lambda a=a: O.run_main_task("runtime-decode", a)  # noqa: E731
            res["engines"].append(O._engine("absorber", q, fn, processes) | {
                "bundle": by_quant[q], "accuracy_level": body_accuracy(q, ours[q]), "accuracy_by_bits": ours[q],
                "block_size": None if ours[q] is None else BLOCK_SIZE})
    res["load_end"] = O.loadavg()
    res["ratios"] = ratios(res)
    return res


def ratios(res: dict) -> dict:
    """absorber / onnxruntime-genai decode and TTFT per quant, against the genai build at our accuracy_level,
    and whether the greedy answers agree."""
    ok = [e for e in res.get("engines", []) if "error" not in e]
    out = {}
    for a in (e for e in ok if e["engine"] == "absorber"):
        g = next((e for e in ok if e["engine"] == "onnxruntime-genai" and e["quant"] == a["quant"]
                  and e.get("accuracy_level") == a.get("accuracy_level")), None)
        if g and g.get("decode_tok_s") and a.get("decode_tok_s"):
            out[a["quant"]] = {"accuracy_level": a.get("accuracy_level"), "absorber_accuracy_by_bits":
                               a.get("accuracy_by_bits"),
                               "decode_absorber_over_genai": a["decode_tok_s"] / g["decode_tok_s"],
                               "ttft_absorber_over_genai": a["ttft_s"] / g["ttft_s"],
                               "same_answer": a.get("answer", "").strip() == g.get("answer", "").strip()}
    return out


# ------------------------------------------------------------------------------------------------ report
def _versions(e: dict, res: dict) -> str:
    if e["engine"] != "onnxruntime-genai":
        v = res.get("main_versions", {})
        return f"absorber {v.get('absorber')}, onnxruntime {v.get('onnxruntime')}"
    v = (res.get("genai_env") or {}).get("versions", {})
    return f"onnxruntime-genai {v.get('onnxruntime-genai')}, onnxruntime {v.get('onnxruntime')}"


def _levels(by_bits: dict | None) -> str:
    """{4: 1, 8: 4} -> '4-bit 1, 8-bit 4' (JSON keys come back as strings)."""
    return ", ".join(f"{k}-bit {v}" for k, v in sorted((by_bits or {}).items(), key=lambda kv: int(kv[0])))


def _settings(e: dict, res: dict) -> str:
    if e.get("accuracy_level") is None:
        return "–"
    by = e.get("accuracy_by_bits") or {}
    acc = _levels(by) if len(set(by.values())) > 1 else e["accuracy_level"]
    return f"accuracy_level {acc}, block {e.get('block_size')}"


def _load(e: dict) -> str:
    return f"{O._f((e.get('load_before') or [None])[0])} → {O._f((e.get('load_after') or [None])[0])}"


COLUMNS: list[tuple[str, Callable[[dict, dict], str]]] = [
    ("engine", lambda e, r: e["engine"]), ("quant", lambda e, r: e["quant"]),
    ("kernels", lambda e, r: e.get("kernels", "")), ("settings", _settings), ("versions", _versions),
    ("TTFT s", lambda e, r: O._f(e.get("ttft_s"), 3)), ("decode tok/s", lambda e, r: O._f(e.get("decode_tok_s"), 1)),
    ("per process", lambda e, r: O._per_process(e)), ("tokens", lambda e, r: str(e.get("produced_tokens"))),
    ("load before → after", lambda e, r: _load(e))]


def table_rows(res: dict) -> list[str]:
    """The markdown table (header + one row per engine); also used by `absorber bench --genai`."""
    pad = "|" * (len(COLUMNS) - 2)
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    if res.get("genai_error"):
        lines.append(f"| onnxruntime-genai | | not measured: {res['genai_error']} {pad}")
    for e in res.get("engines", []):
        if "error" in e:
            lines.append(f"| {e['engine']} | {e['quant']} | failed: {e['error']} {pad}")
        else:
            lines.append("| " + " | ".join(fn(e, res) for _, fn in COLUMNS) + " |")
    return lines


def markdown(res: dict) -> str:
    s, th = res.get("settings", {}), res.get("threads", {})
    lines = ["# Decode speed: absorber runtime vs onnxruntime-genai `og.Generator` (SmolLM2-135M-Instruct)", "",
             f"Command: `{res.get('command') or 'python -m absorber.bench.genai_peer'}`", "",
             f"Input: {res.get('input_tokens')} token ids (the first {s.get('context')} tokens of spoken State of "
             f"the Union text + the bench prompt, the same ids for both engines); {s.get('new_tokens')} new tokens, "
             f"greedy, KV cache; {s.get('warmup')} warm-up run, then the median of {s.get('repeats')} runs; "
             f"{s.get('processes', 1)} fresh process per engine. Intra-op threads: {th.get('threads')} (this "
             f"runtime's profile `{th.get('profile')}`; genai: decoder session_options overlay). genai models: "
             "`onnxruntime_genai.models.builder -e cpu` from the same fp32 HF folder (dequantized GGUF); int4 keeps "
             "the lm_head at 8 bits like our int4 bundle. Load average (1 min) at start "
             f"{O._f((res.get('load_start') or [None])[0])}, at end {O._f((res.get('load_end') or [None])[0])}.", ""]
    lines += table_rows(res)
    ratio_lines = [f"- {q}: absorber / onnxruntime-genai"
                   + ("" if r["accuracy_level"] is None else f" (genai accuracy_level {r['accuracy_level']}; ours "
                      f"{_levels(r.get('absorber_accuracy_by_bits'))})") + " decode "
                   f"{r['decode_absorber_over_genai']:.2f}×, TTFT {r['ttft_absorber_over_genai']:.2f}×; same greedy "
                   f"answer: {'yes' if r['same_answer'] else 'no'}" for q, r in (res.get("ratios") or {}).items()]
    lines += ([""] + ratio_lines) if ratio_lines else []
    if res.get("note"):
        lines += ["", f"Note: {res['note']}"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = O.peer_parser("python -m absorber.bench.genai_peer", __doc__, "fp32, int8, int4", VENV, "genai_peer")
    p.add_argument("--precision", action="append", choices=PRECISIONS,
                   help="genai builds to measure (repeat; default: fp32, int8, int4)")
    p.add_argument("--accuracy-level", type=int, action="append", choices=range(5), metavar="0-4",
                   help="MatMulNBits accuracy_level of the genai int8/int4 builds (repeat; default: the level this "
                        "runtime runs its int bundles at, and 4, the builder's own CPU default)")
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="MatMulNBits block size (default %(default)s)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m absorber.bench.genai_peer") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in VENV_TASKS:          # venv side
        print(json.dumps(VENV_TASKS[argv[0]](json.loads(argv[1]))))
        return 0
    args = build_parser().parse_args(argv)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    res = run_genai(args.bundle, args.context, args.new_tokens, args.repeats, args.warmup, Path(args.venv),
                    tuple(args.precision or PRECISIONS), args.accuracy_level, args.block_size, say=say,
                    command=" ".join([prog, *argv]), processes=args.processes)
    O.write_results(res, markdown(res), args.json_out, args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
