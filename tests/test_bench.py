"""`absorber bench` in smoke mode: a tiny bundle and a tiny model produce the table, the JSON and the plot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_smoke_produces_table_json_and_plot(tiny_bundle, tmp_path):
    out, png, md = tmp_path / "bench.json", tmp_path / "rss.png", tmp_path / "bench.md"
    r = subprocess.run([sys.executable, "-m", "absorber", "bench", "--bundle", str(tiny_bundle), "--model", "tiny",
                        "--tokens", "200", "--n", "64", "--m", "32", "--k", "2", "--rss-tokens", "300",
                        "--json", str(out), "--md", str(md), "--plot", str(png)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    engines = {e["engine"]: e for e in res["engines"]}
    assert set(engines) == {"torch", "runtime"}
    for e in engines.values():
        assert e["rounds"] >= 1 and e["absorbed_tok_s"] > 0 and e["peak_rss_mb"] > 0
        assert e["decode_tok_s"] > 0 and e["ttft_s"] > 0
    assert res["runtime_vs_torch_speedup"] > 0 and 0 < res["gemm_peak_fraction"] < 1.5
    assert res["gemm"]["peak_gflops"] > 0
    curves = {c["engine"]: c for c in res["rss_curves"]}
    assert curves["runtime"]["curve"][-1][0] == 300
    assert "| runtime |" in md.read_text() and png.stat().st_size > 1000


def test_bench_rejects_a_folder_that_is_not_a_bundle(tmp_path):
    r = subprocess.run([sys.executable, "-m", "absorber", "bench", "--bundle", str(tmp_path), "--no-torch"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a bundle" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------- --optimum (no network)
def _peer_result() -> dict:
    """What absorber.bench.optimum_peer.run_peer returns, trimmed to what the report reads."""
    load = {"load_before": [0.5, 0.4, 0.3], "load_after": [0.75, 0.5, 0.3]}
    return {"settings": {"context": 256, "new_tokens": 32, "repeats": 3, "warmup": 1}, "input_tokens": 269,
            "command": "python -m absorber.bench.optimum_peer --bundle b", "threads": {"threads": 2, "profile": "laptop-cpu"},
            "main_versions": {"absorber": "0.1.0", "onnxruntime": "1.32.0"},
            "optimum_env": {"versions": {"optimum-onnx": "0.1.0", "optimum": "2.1.0", "transformers": "4.57.6",
                                         "onnxruntime": "1.32.0"}},
            "load_start": [0.5, 0.4, 0.3], "load_end": [0.75, 0.5, 0.3],
            "engines": [{"engine": "optimum-onnx", "quant": "int8", "kernels": "dynamic int8", "ttft_s": 0.125,
                         "decode_tok_s": 45.43, "produced_tokens": 32, **load},
                        {"engine": "absorber", "quant": "int8", "kernels": "weight-only int8", "ttft_s": 0.25,
                         "decode_tok_s": 26.1, "produced_tokens": 32, **load,
                         "per_process": [{"decode_tok_s": 16.04}, {"decode_tok_s": 26.1}, {"decode_tok_s": 26.3}]},
                        {"engine": "absorber", "quant": "fp32", "error": "runtime-decode failed: boom"}],
            "ratios": {"int8": {"decode_absorber_over_optimum": 0.5745, "ttft_absorber_over_optimum": 2.0,
                                "same_answer": False}}}


def test_optimum_peer_markdown_rows_from_results():
    from absorber.commands.bench import markdown
    from absorber.bench.optimum_peer import markdown as peer_markdown
    from absorber.bench.optimum_peer import table_rows
    rows = table_rows(_peer_result())
    assert len(rows) == 2 + 3 and all(r.count("|") >= 9 or "failed" in r for r in rows[2:])
    assert rows[2] == ("| optimum-onnx | int8 | dynamic int8 | optimum-onnx 0.1.0, optimum 2.1.0, transformers 4.57.6, "
                       "onnxruntime 1.32.0 | 0.125 | 45.4 | – | 32 | 0.50 → 0.75 |")
    assert rows[3].startswith("| absorber | int8 | weight-only int8 | absorber 0.1.0, onnxruntime 1.32.0 | 0.250 | "
                              "26.1 | 16.0, 26.1, 26.3 | 32 |")
    assert "failed: runtime-decode failed: boom" in rows[4]
    md = peer_markdown(_peer_result())
    assert "`python -m absorber.bench.optimum_peer --bundle b`" in md and "269 tokens" in md and "threads: 2" in md
    assert "int8: absorber / optimum-onnx decode 0.57×, TTFT 2.00×; same greedy answer: no" in md
    bench = {"gemm": {"size": 8}, "engines": [], "optimum": _peer_result()}
    out = markdown(bench, "absorber bench --optimum")
    assert "Decode vs optimum-onnx" in out and rows[2] in out
    assert "optimum-onnx" not in markdown({"gemm": {"size": 8}, "engines": []}, "absorber bench")


def test_optimum_peer_not_installed_is_one_line(tiny_bundle, monkeypatch):
    """A failed install is a result (one line, in md and JSON); this runtime is still measured, for real."""
    from absorber.bench import optimum_peer as P

    def no_install(*a, **k):
        raise RuntimeError("optimum-onnx does not install: pip install optimum-onnx: ERROR: No matching distribution")
    monkeypatch.setattr(P, "ensure_venv", no_install)
    res = P.run_peer([str(tiny_bundle)], context=24, new_tokens=4, repeats=1, warmup=0, say=lambda s: None,
                     processes=2)
    assert res["optimum_error"] == ("optimum-onnx does not install: pip install optimum-onnx: "
                                    "ERROR: No matching distribution")
    [ours] = res["engines"]
    assert ours["engine"] == "absorber" and "error" not in ours, ours
    assert ours["ttft_s"] > 0 and ours["produced_tokens"] >= 1 and len(ours["load_before"]) == 3
    assert len(ours["per_process"]) == 2 and ours["ttft_s"] == pytest.approx(
        sum(p["ttft_s"] for p in ours["per_process"]) / 2)
    md = P.markdown(res)
    assert md.count("not measured:") == 1 and "| absorber | fp32 |" in md


def test_measure_protocol_warmup_median_and_rate(monkeypatch):
    from absorber.bench import optimum_peer as P
    clock = {"t": 0.0}
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock["t"])
    calls = []
    firsts, fulls = iter([0.2, 0.4, 0.3]), iter([9.0, 1.2, 1.4, 1.1])   # the first full() is the warm-up

    def first() -> int:
        clock["t"] += next(firsts); calls.append("first"); return 1

    def full() -> int:
        clock["t"] += next(fulls); calls.append("full"); return 32
    r = P.measure_protocol(first, full, repeats=3, warmup=1)
    assert calls == ["full", "first", "full", "first", "full", "first", "full"]
    assert r["ttft_s"] == pytest.approx(0.3) and r["total_s"] == pytest.approx(1.2)
    # per-run rates (32-1)/(total-ttft): 31/1.0, 31/1.0, 31/0.8; the median of the rates, not of the times
    assert r["runs"]["decode_tok_s"] == pytest.approx([31.0, 31.0, 38.75])
    assert r["decode_tok_s"] == pytest.approx(31.0)
    assert r["produced_tokens"] == 32


def test_fix_hf_folder_for_transformers4(tmp_path):
    """transformers 5 keeps the RoPE base in rope_parameters; 4.5x would silently use 10000 without rope_theta."""
    from absorber.bench.optimum_peer import fix_hf_folder_for_transformers4
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32",
                                                      "rope_parameters": {"rope_theta": 100000.0,
                                                                          "rope_type": "default"}}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend",
                                                                "backend": "tokenizers", "eos_token": "<e>"}))
    changed = fix_hf_folder_for_transformers4(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    t = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert c["rope_theta"] == 100000.0 and c["rope_scaling"] is None and c["torch_dtype"] == "float32"
    assert t == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<e>"} and len(changed) == 2


def test_bench_help_mentions_optimum_and_it_needs_a_bundle():
    r = subprocess.run([sys.executable, "-m", "absorber", "bench", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--optimum" in r.stdout and "optimum-onnx" in r.stdout
    r = subprocess.run([sys.executable, "-m", "absorber", "bench", "--optimum", "--no-torch"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--optimum" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------- planner calibration
def test_calibrate_measures_one_round_of_the_runtime(tiny_bundle, tmp_path):
    """`python -m absorber.bench.calibrate`: one window, one round of the real runtime in a fresh process, its
    peak RSS next to the planner's prediction for the same bundle, window and profile."""
    from absorber.bench.calibrate import predicted
    from absorber.devices import get_profile
    from absorber.runtime.bundle import open_bundle
    out, md = tmp_path / "cal.json", tmp_path / "cal.md"
    r = subprocess.run([sys.executable, "-m", "absorber.bench.calibrate", str(tiny_bundle), "--windows", "32x16",
                        "--k", "1", "--profile", "laptop-cpu", "--json", str(out), "--md", str(md)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    [row] = json.loads(out.read_text())
    assert (row["n"], row["m"], row["k"], row["steps"]) == (32, 16, 1, 1)
    assert row["peak_bytes"] > 0 and row["peak_bytes"] > row["rss_import"] > 0
    assert row["peak_bytes"] >= row["rss_round"] >= row["rss_open"] > row["rss_import"]
    want = predicted(open_bundle(tiny_bundle, verify_hashes=False), 32, 16, 1, get_profile("laptop-cpu"))
    assert row["predicted_bytes"] == want.peak_bytes > 0
    assert row["error"] == pytest.approx((want.peak_bytes - row["peak_bytes"]) / row["peak_bytes"])
    text = md.read_text()
    assert text.startswith("Command: `python -m absorber.bench.calibrate ") and "| 32 | 16 |" in text
    assert "| 32 | 16 |" in r.stdout
