"""absorber.bench.genai_peer without its venv or the network: builder command lines, build plan, the report."""
from __future__ import annotations

from absorber.bench import genai_peer as G


def _fake() -> dict:
    """What run_genai returns, trimmed to what the report reads."""
    k4 = {"matmul_nbits": {"4-bit b32 acc1": 150, "8-bit b32 acc1": 1}, "matmul": 0,
          "attention": ["GroupQueryAttention"]}
    return {"settings": {"context": 256, "new_tokens": 32, "repeats": 3, "warmup": 1, "processes": 1},
            "command": "python -m absorber.bench.genai_peer --bundle b", "input_tokens": 269,
            "threads": {"threads": 2, "profile": "laptop-cpu"}, "load_start": [0.5], "load_end": [1.0],
            "main_versions": {"absorber": "0.1.0", "onnxruntime": "1.32.0"},
            "genai_env": {"versions": {"onnxruntime-genai": "0.18.0", "onnxruntime": "1.32.0"}},
            "engines": [
                {"engine": "onnxruntime-genai", "quant": "int4", "kernels": G.kernels_text(k4), "accuracy_level": 1,
                 "block_size": 32, "ttft_s": 0.5, "decode_tok_s": 10.0, "produced_tokens": 32, "answer": " A",
                 "load_before": [0.5], "load_after": [0.75]},
                {"engine": "onnxruntime-genai", "quant": "int4", "kernels": "k", "accuracy_level": 4,
                 "block_size": 32, "ttft_s": 0.25, "decode_tok_s": 40.0, "produced_tokens": 32, "answer": " B"},
                {"engine": "absorber", "quant": "int4", "kernels": "MatMulNBits", "accuracy_level": 1,
                 "accuracy_by_bits": {"4": 1, "8": 4}, "block_size": 32, "ttft_s": 0.25, "decode_tok_s": 20.0,
                 "produced_tokens": 32, "answer": "A"},
                {"engine": "absorber", "quant": "fp32", "error": "boom"}]}


def test_builder_command_lines():
    fp32 = G.builder_command("py", "hf", "out", "fp32", 1, cache_dir="c")
    assert fp32 == ["py", "-m", "onnxruntime_genai.models.builder", "-i", "hf", "-o", "out", "-p", "fp32", "-e", "cpu",
                    "-c", "c"]
    int8 = G.builder_command("py", "hf", "out", "int8", 4, cache_dir="c")
    assert int8[-4:] == ["--extra_options", "accuracy_level=4", "block_size=32", "algo_config=rtn"]
    int4 = G.builder_command("py", "hf", "out", "int4", 1, block_size=64, cache_dir="c")
    assert int4[int4.index("-p") + 1] == "int4"
    assert int4[-5:] == ["--extra_options", "accuracy_level=1", "block_size=64", "algo_config=rtn",
                         "matmul_mixed_precision=last_matmul:int8"]


def test_build_plan_and_model_dirs():
    assert G.build_plan(("fp32", "int8", "int4"), [1, 4]) == [("fp32", None), ("int8", 1), ("int8", 4), ("int4", 1),
                                                             ("int4", 4)]
    assert G.model_dir("fp32", 0).name == "genai-smollm2-fp32"
    assert G.model_dir("int4", 4).name == "genai-smollm2-int4-acc4-b32"


def test_body_accuracy_is_the_main_weight_width():
    assert G.body_accuracy("int4", {4: 1, 8: 4}) == 1
    assert G.body_accuracy("int8", {8: 4}) == 4
    assert G.body_accuracy("fp32", None) is None


def test_table_rows_and_ratios_from_results():
    res = _fake()
    res["ratios"] = G.ratios(res)
    assert set(res["ratios"]) == {"int4"}                      # against the genai build at our accuracy level
    r = res["ratios"]["int4"]
    assert (r["accuracy_level"], r["decode_absorber_over_genai"], r["ttft_absorber_over_genai"]) == (1, 2.0, 0.5)
    assert r["same_answer"] is True
    rows = G.table_rows(res)
    assert rows[0].startswith("| engine | quant | kernels | settings | versions | TTFT s | decode tok/s |")
    assert rows[1] == "|" + "---|" * len(G.COLUMNS)
    assert rows[2] == ("| onnxruntime-genai | int4 | MatMulNBits 4-bit b32 acc1 ×150, MatMulNBits 8-bit b32 acc1 ×1; "
                       "GroupQueryAttention | accuracy_level 1, block 32 | onnxruntime-genai 0.18.0, onnxruntime "
                       "1.32.0 | 0.500 | 10.0 | – | 32 | 0.50 → 0.75 |")
    assert rows[4].startswith("| absorber | int4 | MatMulNBits | accuracy_level 4-bit 1, 8-bit 4, block 32 | "
                              "absorber 0.1.0, onnxruntime 1.32.0 | 0.250 | 20.0 |")
    assert rows[5].startswith("| absorber | fp32 | failed: boom |")
    assert all(row.count("|") == len(G.COLUMNS) + 1 for row in rows)
    md = G.markdown(res)
    assert ("- int4: absorber / onnxruntime-genai (genai accuracy_level 1; ours 4-bit 1, 8-bit 4) decode 2.00×, "
            "TTFT 0.50×") in md
    assert "Intra-op threads: 2" in md


def test_genai_error_row_and_bench_section():
    from absorber.commands.bench import genai_section
    res = {"genai_error": "pip install onnxruntime-genai: no matching distribution", "engines": []}
    rows = G.table_rows(res)
    assert rows[2].startswith("| onnxruntime-genai | | not measured: pip install onnxruntime-genai")
    assert rows[2].count("|") == len(G.COLUMNS) + 1
    sec = genai_section({**_fake(), "settings": {"context": 256, "new_tokens": 32, "repeats": 3, "warmup": 1}})
    assert sec[1].startswith("Decode vs onnxruntime-genai og.Generator (269 input tokens: 256 of context")
    assert sec[3].startswith("| engine | quant |")
