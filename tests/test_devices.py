"""absorber.devices: providers, profiles, session options, size parsing, the memory planner, the CLI.
Fast and torch-free (the device install has no torch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from absorber.devices import (CPU, Profile, choose_window, get_profile, list_profiles, parse_size, plan,
                              predict, provider_options, resolve_providers, session_kwargs, session_options)
from absorber.devices.machine import parse_cpu_flags
from absorber.devices.profiles import pick_profile_name
from absorber.errors import AbsorberError

CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
DML = "DmlExecutionProvider"
GPU_BUILD = [TRT, CUDA, CPU]


# ------------------------------------------------------------------------------------------------- providers
def test_cpu_only_build():
    assert resolve_providers("auto", [CPU]) == [CPU]
    assert resolve_providers("cpu", [CPU]) == [CPU]
    assert resolve_providers("cpu", GPU_BUILD) == [CPU]


def test_auto_prefers_cuda_not_tensorrt():
    assert resolve_providers("auto", GPU_BUILD) == [CUDA, CPU]
    assert resolve_providers("auto", ["AzureExecutionProvider", DML, CPU]) == [DML, CPU]
    assert resolve_providers("auto", ["CoreMLExecutionProvider", CPU]) == [CPU]   # coreml only by name


def test_named_devices_order_and_cpu_fallback():
    assert resolve_providers("cuda", GPU_BUILD) == [CUDA, CPU]
    assert resolve_providers("cuda:1", GPU_BUILD) == [CUDA, CPU]
    assert resolve_providers(CUDA, GPU_BUILD) == [CUDA, CPU]
    assert resolve_providers("tensorrt", GPU_BUILD) == [TRT, CUDA, CPU]
    assert resolve_providers("tensorrt", [TRT, CPU]) == [TRT, CPU]
    assert resolve_providers("coreml", ["CoreMLExecutionProvider", CPU]) == ["CoreMLExecutionProvider", CPU]
    for dev in ("cuda", "tensorrt", "dml", "coreml", "openvino", "qnn"):
        provs = resolve_providers(dev, [p for p in (TRT, CUDA, DML, "CoreMLExecutionProvider",
                                                    "OpenVINOExecutionProvider", "QNNExecutionProvider", CPU)])
        assert provs[-1] == CPU and len(provs) == len(set(provs))


@pytest.mark.parametrize("dev", ["cuda", "tensorrt", "dml", "coreml", "openvino", "qnn"])
def test_unavailable_device_is_one_clear_line(dev):
    with pytest.raises(AbsorberError) as e:
        resolve_providers(dev, [CPU])
    msg = str(e.value)
    assert "\n" not in msg
    assert f"device {dev!r} is not available" in msg and "CPUExecutionProvider only" in msg


def test_cuda_message_says_what_to_install():
    with pytest.raises(AbsorberError, match="pip install onnxruntime-gpu"):
        resolve_providers("cuda", [CPU])


def test_unknown_device():
    with pytest.raises(AbsorberError, match="unknown device 'tpu'"):
        resolve_providers("tpu", [CPU])
    with pytest.raises(AbsorberError, match="bad device index"):
        resolve_providers("cuda:x", GPU_BUILD)


def test_provider_options_aligned_with_providers():
    prof = get_profile("cuda")
    prof.memory_budget_mb = 1024
    opts = provider_options("cuda:1", prof, available=GPU_BUILD)
    assert len(opts) == 2 and opts[1] == {}
    assert opts[0]["device_id"] == "1" and opts[0]["gpu_mem_limit"] == str(1024 * 2**20)
    assert all(isinstance(v, str) for v in opts[0].values())
    kw = session_kwargs("cuda", available=GPU_BUILD)
    assert kw["providers"] == [CUDA, CPU] and len(kw["provider_options"]) == 2


# ------------------------------------------------------------------------------------------------- profiles
def test_shipped_profiles_load():
    names = [p.name for p in list_profiles()]
    for required in ("laptop-cpu", "edge-arm", "tiny", "cuda"):
        assert required in names
        p = get_profile(required)
        assert isinstance(p, Profile) and p.name == required
        assert p.n >= 1 and p.m >= 1 and p.quant in ("fp32", "int8", "int4")
    assert get_profile("edge-arm").threads == 4 and get_profile("tiny").memory_budget_mb <= 1024
    assert get_profile("cuda").device == "cuda"


def test_get_profile_returns_a_copy():
    p = get_profile("tiny")
    p.session_config["x"] = "1"
    assert "x" not in get_profile("tiny").session_config


def test_unknown_profile_lists_names():
    with pytest.raises(AbsorberError) as e:
        get_profile("toaster")
    msg = str(e.value)
    assert "\n" not in msg and "laptop-cpu" in msg and "edge-arm" in msg and "tiny" in msg


def test_profile_from_user_file(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"name": "mine", "threads": 3, "quant": "int8", "n": 64, "m": 32}))
    p = get_profile(str(f))
    assert (p.name, p.threads, p.quant, p.n) == ("mine", 3, "int8", 64)
    f.write_text(json.dumps({"threads": 3, "turbo": True}))
    with pytest.raises(AbsorberError, match="unknown key"):
        get_profile(str(f))


def test_bad_profile_values():
    with pytest.raises(AbsorberError, match="graph_optimization_level"):
        Profile(name="x", graph_optimization_level="max")
    with pytest.raises(AbsorberError, match="quant"):
        Profile(name="x", quant="fp8")
    with pytest.raises(AbsorberError, match="threads"):
        Profile(name="x", threads=-1)


def test_pick_profile_name():
    G = 2**30
    assert pick_profile_name(64 * G, 16, "x86_64", [CUDA, CPU])[0] == "cuda"
    assert pick_profile_name(16 * G, 8, "x86_64", [CPU])[0] == "laptop-cpu"
    assert pick_profile_name(4 * G, 4, "aarch64", [CPU])[0] == "edge-arm"
    assert pick_profile_name(1 * G, 2, "aarch64", [CPU])[0] == "tiny"


def test_session_options_from_profile():
    import onnxruntime as ort
    so = session_options(get_profile("tiny"), extra_config={"session.intra_op.allow_spinning": "1",
                                                            "session.custom": 7})
    assert so.intra_op_num_threads == min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                          else os.cpu_count())
    assert so.enable_cpu_mem_arena is True          # every CPU profile keeps the (one shared) arena
    import dataclasses
    assert session_options(dataclasses.replace(get_profile("tiny"), enable_cpu_mem_arena=False)) \
        .enable_cpu_mem_arena is False
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"   # manifest overrides profile
    so3 = session_options(get_profile("tiny"), extra_config={"session.qdq_matmulnbits_accuracy_level": "1"})
    assert so3.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "1"
    assert so3.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.custom") == "7"
    assert session_options(get_profile("laptop-cpu")).enable_mem_pattern is False
    assert session_options(get_profile("cuda")).enable_mem_pattern is True
    assert session_options(get_profile("cuda"), providers=[DML, CPU]).enable_mem_pattern is False  # DirectML
    so2 = session_options(Profile(name="x", graph_optimization_level="disable"))
    assert so2.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert so2.intra_op_num_threads == 0


# ------------------------------------------------------------------------------------------------- machine
def test_parse_cpu_flags_x86_and_arm():
    x86 = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse avx avx2 fma avx512f avx512_vnni amx_tile\n"
    model, isa = parse_cpu_flags(x86, "x86_64")
    assert model == "Some Xeon" and {"AVX2", "AVX-512F", "AVX-512 VNNI", "AMX"} <= set(isa)
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp i8mm\nCPU part\t: 0xd0b\n"
    _, isa = parse_cpu_flags(arm, "aarch64")
    assert isa == ["NEON", "dot-product (SDOT/UDOT)", "i8mm (SMMLA)"]


# ------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("text,value", [
    ("1.5GB", 1_500_000_000), ("800MB", 800_000_000), ("1GiB", 2**30), ("512MiB", 512 * 2**20),
    ("512M", 512 * 2**20), ("2g", 2 * 2**30), ("1000", 1000), ("64 KiB", 65536), (" 1gb ", 10**9), (4096, 4096),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "1.5 parsecs", "-1GB", "0MB", "1,5GB", "one GB"])
def test_parse_size_errors(text):
    with pytest.raises(AbsorberError, match="memory size"):
        parse_size(text)


# ------------------------------------------------------------------------------------------------- planner
def _tensor(name, shape, target="q_proj", layer=0):
    return {"name": name, "shape": shape, "dtype": "float32", "target": target, "layer": layer}


_GRAPH = {"file": "g.onnx", "inputs": [], "outputs": [], "opset": 21}
# a schema-valid manifest of a tiny model (the planner reads it through absorber.bundle_format.Bundle)
TINY = {
    "format": 2,
    "model": {"architecture": "llama", "model_type": "llama", "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "head_dim": 4, "hidden": 8, "intermediate": 16, "vocab": 32, "max_positions": 4096,
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None},
    "slice": {"rank": 2, "alpha": 4.0, "scaling": 2.0, "targets": ["q_proj"], "layers": None,
              "tensors": [_tensor("model.layers.0.self_attn.q_proj.lora_A", [8, 2]),
                          _tensor("model.layers.0.self_attn.q_proj.lora_B", [2, 8])]},
    "adapters_file": "adapters.safetensors",
    "loss": {"kind": "l1", "layers": [1, 2], "skip": 1},
    "quant": {"scheme": "fp32"},
    "session_config": {},
    "defaults": {"n": 4, "m": 2, "k": 3, "lr": 1e-3, "lora": {"rank": 2, "alpha": 4.0}},
    "graphs": {"decoder": _GRAPH, "train_step": _GRAPH},
    "external_data": [{"file": "weights.bin", "tensors": []}],
    "shared_initializers": [],
    "tokenizer": None,
    "exporter": {k: "test" for k in ("absorber", "torch", "transformers", "onnx", "onnxscript", "onnxruntime")}
    | {"opset": 21},
    "files": {},
}
UNIT = {"baseline_bytes": 1000, "baseline_per_layer": 0, "weight_copies": 1, "adapter_copies": 4, "c_out_copies": 1, "c_scores": 1,
        "c_tok": 1, "c_saved_h": 1, "c_saved_i": 1, "c_saved_scores": 1, "c_dq": 1, "c_noarena": 1}


def test_planner_arithmetic_by_hand():
    p = predict(TINY, n=4, m=2, k=3, coeffs=UNIT)
    # weights: per layer q 8*2*4 + k,v 2*8*1*4 + o 2*4*8 + mlp 3*8*16 = 64+64+64+384 = 576 params; x2 layers
    #          = 1152 * 4 B = 4608; norms (2*2+1)*8*4 = 160; embedding 32*8*4 = 1024; tied lm_head 0
    assert p.detail["weights.layers"] == 4608 and p.detail["weights.norms"] == 160
    assert p.detail["weights.embedding"] == 1024 and p.detail["weights.lm_head"] == 0
    assert p.terms["weights"] == 5792
    assert p.terms["adapters"] == 32 * 4 * 4                       # 32 params, 4 B, 4 copies = 512
    assert p.terms["kv_cache"] == 2 * 2 * 1 * 4 * 6 * 4            # 2 L kv hd T 4B = 384
    # teacher, X (n=4) into the KV cache then Y (m=2), the larger pass B = 4 counts: hidden S*B*H*4 = 256,
    # logits 1*V*4 = 128, scores nh*max(n^2, m*T)*4 = 128, working B*(H+I)*4 = 384
    assert p.terms["teacher"] == 256 + 128 + 128 + 384
    # train, m=2: saved L*(m*H + m*I)*4 = 384, scores L*nh*m^2*4 = 64, teacher_hidden in S*m*H*4 = 128
    assert p.terms["train_step"] == 384 + 64 + 128
    # arena on: both phases' high-water marks stay
    assert p.peak_bytes == 1000 + 5792 + 512 + 384 + 896 + 576 == 9160
    q = predict(TINY, n=4, m=2, k=3, coeffs=UNIT, arena=False)     # no arena: the larger phase only
    assert q.peak_bytes == 1000 + 5792 + 512 + max(384 + 896, 576) and q.combine == "max"
    # mem pattern on, K >= 2: one more copy of the train activations (saved + attention)
    r = predict(TINY, n=4, m=2, k=3, coeffs=UNIT, mem_pattern=True)
    assert r.peak_bytes == 9160 + 384 + 64
    assert predict(TINY, n=4, m=2, k=1, coeffs=UNIT, mem_pattern=True).peak_bytes == 9160


def test_planner_recomputing_train_step():
    """A bundle whose train step recomputes each layer (manifest graphs.train_step.recompute): the boundary
    tensors of every layer plus c_rc_layers layers' activations, instead of every layer's."""
    rc = dict(TINY, graphs={"decoder": _GRAPH, "train_step": dict(_GRAPH, recompute={"stages": 2})})
    co = dict(UNIT, c_rc_keep=1, c_rc_layers=1)
    p = predict(rc, n=4, m=2, k=3, coeffs=co)
    # kept L*keep*m*H*4 = 128, one layer (m*H + m*I)*4 = 192, its scores nh*m^2*4 = 32, teacher_hidden in 128
    assert p.terms["train_step"] == 128 + 192 + 32 + 128
    assert p.terms["train_step"] < predict(TINY, n=4, m=2, k=3, coeffs=co).terms["train_step"]


def test_planner_next_token_term():
    """A train step with the next-token term on X (manifest loss.ntp_weight): the student's saved activations
    on X (n tokens) and c_ntp_logits x its [n-1, V] logits; nothing without the term or without an X."""
    ntp = dict(TINY, loss=dict(TINY["loss"], ntp_weight=1.0))
    co = dict(UNIT, c_ntp_logits=3, c_ntp_saved=1, c_ntp_tables_fp32=0)
    p, q = predict(ntp, n=4, m=2, k=3, coeffs=co), predict(TINY, n=4, m=2, k=3, coeffs=co)
    # L*(n*H + n*I + nh*n^2)*4 = 2*(32 + 64 + 32)*4 = 1024, logits 3*(n-1)*V*4 = 1152
    assert p.detail["train_step.next_token_on_x"] == 1024 + 1152
    assert p.terms["train_step"] - q.terms["train_step"] == 1024 + 1152
    assert q.detail["train_step.next_token_on_x"] == 0
    assert predict(ntp, n=1, m=2, k=3, coeffs=co).detail["train_step.next_token_on_x"] == 0
    # + tables' worth: c_ntp_tables_fp32 x V*H*4 = 2 * 32*8*4
    assert predict(ntp, n=4, m=2, k=3, coeffs=dict(co, c_ntp_tables_fp32=2)).detail[
        "train_step.next_token_on_x"] == 1024 + 1152 + 2048
    # a recomputing train step: X's kept boundary tensors + one layer's, and c_ntp_logits_rc x [n-1, V]
    rc = dict(ntp, graphs={"decoder": _GRAPH, "train_step": dict(_GRAPH, recompute={"stages": 2})})
    co_rc = dict(co, c_rc_keep=1, c_rc_layers=1, c_ntp_logits_rc=2, c_ntp_scores_rc=0)
    r = predict(rc, n=4, m=2, k=3, coeffs=co_rc)
    # L*n*H*4 = 256, (n*H + n*I)*4 = 384, nh*n^2*4 = 128, 2*(n-1)*V*4 = 768
    assert r.detail["train_step.next_token_on_x"] == 256 + 384 + 128 + 768
    # + every layer's scores on X: L*nh*n^2*4 = 256
    assert predict(rc, n=4, m=2, k=3, coeffs=dict(co_rc, c_ntp_scores_rc=1)).detail[
        "train_step.next_token_on_x"] == 256 + 384 + 128 + 768 + 256


def test_planner_next_token_term_in_pieces():
    """Bundles with loss.head_chunks (the head's gradient in pieces of X, ordered weight gradients): X's own
    pass as Y's, c_ntp2_scores x every layer's scores on X, one piece's logits, c_ntp2_tables tables."""
    ntp = dict(TINY, loss=dict(TINY["loss"], ntp_weight=1.0, head_chunks=2))
    co = dict(UNIT, c_saved_h=1, c_saved_i=1, c_saved_scores=1, c_ntp2_saved=1, c_ntp2_pieces=1,
              c_ntp2_tables_fp32=0, c_ntp2_keep=1, c_ntp2_scores=0, c_rc_layers=1,
              c_ntp_logits=100, c_ntp_saved=100)                # the older bundles' terms must not count
    # plain: L*(n*H + n*I + nh*n^2)*4 = 2*(40 + 80 + 50)*4 = 1360, one piece ceil((n-1)/2)*V*4 = 2*32*4 = 256
    assert predict(ntp, n=5, m=2, k=3, coeffs=co).detail["train_step.next_token_on_x"] == 1360 + 256
    assert predict(ntp, n=5, m=2, k=3, coeffs=dict(co, c_ntp2_tables_fp32=2)).detail[
        "train_step.next_token_on_x"] == 1360 + 256 + 2 * 32 * 8 * 4
    # recomputing: L*keep*n*H*4 = 320, one layer (n*H + n*I)*4 = 480, + c_ntp2_scores x L*nh*n^2*4 = 400
    rc = dict(ntp, graphs={"decoder": _GRAPH, "train_step": dict(_GRAPH, recompute={"stages": 2})})
    assert predict(rc, n=5, m=2, k=3, coeffs=co).detail["train_step.next_token_on_x"] == 320 + 480 + 256
    assert predict(rc, n=5, m=2, k=3, coeffs=dict(co, c_ntp2_scores=1)).detail[
        "train_step.next_token_on_x"] == 320 + 480 + 400 + 256
    assert predict(rc, n=1, m=2, k=3, coeffs=co).detail["train_step.next_token_on_x"] == 0


def test_planner_names_a_second_tied_table_only_when_the_excess_is_one():
    """The note on a stored size that differs from the model facts guesses "a tied table stored twice?" only when
    the excess is about one table; a larger one (a GGUF's own block formats) is said to be that."""
    from absorber.devices.planner import as_bundle, model_facts, weight_bytes
    man = dict(TINY, quant={"scheme": "int8"})
    wb = weight_bytes(model_facts(as_bundle(man)))
    facts = sum(wb.values())

    def note(total: float) -> str:
        tab = [{"name": "w", "dtype": "int8", "shape": [int(total)], "graphs": ["decoder"], "length": int(total),
                "offset": 0}]
        p = predict(dict(man, external_data=[{"file": "weights.bin", "tensors": tab}]), 4, 2, coeffs=UNIT)
        return next(n for n in p.notes if n.startswith("weights from"))
    assert "stored twice" in note(facts + wb["embedding"])
    assert "block formats differ" in note(facts + 3 * wb["embedding"]) and "twice" not in note(facts * 3)


def test_planner_dequantized_tables_from_external_table():
    # an int8 bundle that stores the tied table twice (lm_head for both graphs, embedding for the decoder)
    tab = [{"name": "lm_head.weight.q8", "dtype": "int8", "shape": [32, 8], "graphs": ["decoder", "train_step"],
            "length": 256, "offset": 0},
           {"name": "lm_head.weight.scale", "dtype": "float", "shape": [32], "graphs": ["decoder", "train_step"],
            "length": 128, "offset": 4096},
           {"name": "model.embed_tokens.weight.q8", "dtype": "int8", "shape": [32, 8], "graphs": ["decoder"],
            "length": 256, "offset": 8192},
           {"name": "model.layers.0.mlp.up_proj.base.weight.q8", "dtype": "int8", "shape": [16, 8],
            "graphs": ["decoder", "train_step"], "length": 128, "offset": 12288}]
    man = dict(TINY, quant={"scheme": "int8"}, external_data=[{"file": "weights.bin", "tensors": tab}])
    p = predict(man, 4, 2, coeffs=UNIT)
    assert p.detail["weights.stored"] == 256 + 128 + 256 + 128     # the table's lengths, not the model facts
    assert p.detail["teacher.dequantized"] == 2 * 32 * 8 * 4  # two [V, H] tables dequantized to fp32
    assert p.detail["train_step.dequantized"] == 32 * 8 * 4
    q = predict(man, 4, 2, coeffs=UNIT, arena=False)
    assert q.detail["teacher.malloc_slack"] == 32 * 8 * 4


def test_planner_kernel_tensors_per_session():
    """MatMulNBits bundles: the shared part of weights.bin once, each session's pre-packed copy of the kernel
    tensors it uses, no dequantized table, and the backward's one fp32 [N, K] weight at a time."""
    tab = [{"name": "model.layers.0.mlp.up_proj.base.weight.q4", "dtype": "uint8", "shape": [16, 1, 16],
            "graphs": ["decoder", "train_step"], "length": 256, "offset": 0, "kernel": True},
           {"name": "model.layers.0.mlp.up_proj.base.weight.view", "dtype": "uint4", "shape": [16, 32],
            "graphs": ["train_step"], "length": 256, "offset": 0, "alias_of": "model.layers.0.mlp.up_proj.base.weight.q4"},
           {"name": "lm_head.weight.q4", "dtype": "uint8", "shape": [32, 1, 4], "graphs": ["decoder"],
            "length": 128, "offset": 256, "kernel": True},
           {"name": "model.norm.weight", "dtype": "float", "shape": [8], "graphs": ["decoder", "train_step"],
            "length": 32, "offset": 384}]
    man = dict(TINY, quant={"scheme": "int4"}, external_data=[{"file": "weights.bin", "tensors": tab}])
    c = dict(UNIT, kernel_copies=1.5, c_dq_backward=2.0)
    p = predict(man, 4, 2, coeffs=c)
    assert p.detail["weights.kernel_decoder"] == 256 + 128 and p.detail["weights.kernel_train_step"] == 256
    assert p.terms["weights"] == 32 + 1.5 * (384 + 256)     # mapped once + a pre-packed copy per session
    assert p.detail["teacher.dequantized"] == 0                # a gather of quantized rows, MatMulNBits lm_head
    assert p.detail["train_step.dequantized"] == 2.0 * 16 * 8 * 4   # the largest [N, K] = gate/up 16 x 8
    q = predict(man, 4, 2, coeffs=c, arena=False)
    assert q.detail["teacher.malloc_slack"] == 0 and "heap_slack" not in q.terms
    # combined.onnx: one session over both graphs pre-packs each kernel tensor once
    comb = {"file": "combined.onnx", "selector": "graph_is_decoder",
            "branches": {"decoder": "then_branch", "train_step": "else_branch"}}
    one = predict(dict(man, graphs=dict(man["graphs"], combined=comb)), 4, 2,
                  coeffs=dict(c, kernel_copies_combined=2.5))
    assert one.terms["weights"] == 32 + 2.5 * (256 + 128)


def test_planner_quant_schemes_and_untied_head():
    m8 = dict(TINY, quant={"scheme": "int8"})
    m4 = dict(TINY, quant={"scheme": "int4"})
    # int8 per row (absorber.export): 1 B/param + a 4 B scale per row;
    # rows per layer: q 8 + k 4 + v 4 + o 8 + gate 16 + up 16 + down 8 = 64
    p8 = predict(m8, 4, 2, coeffs=UNIT)
    assert p8.detail["weights.layers"] == 2 * (576 + 64 * 4)
    assert p8.detail["weights.embedding"] == 32 * 8 + 32 * 4          # the table is quantized too
    # int4, blocks of 32 columns: 0.5 B/param + a 4 B scale per block (every row here has one block)
    p4 = predict(m4, 4, 2, coeffs=UNIT)
    assert p4.detail["weights.layers"] == 2 * (576 / 2 + 64 * 4)
    assert p4.detail["weights.embedding"] == 32 * 8 / 2 + 32 * 4 and p4.detail["weights.lm_head"] == 0
    # a manifest that lists what was quantized: the table stayed float
    m4l = dict(TINY, quant={"scheme": "int4", "quantized": ["model.layers.0.mlp.up_proj.weight"]})
    assert predict(m4l, 4, 2, coeffs=UNIT).detail["weights.embedding"] == 1024
    # int4: the dequantized table (tied: one, in both graphs) + shares of the linear layers' fp32 size (4608 B)
    c4 = dict(UNIT, c_dq_int4_decoder=0.5, c_dq_int4_train=0.25, c_noarena_int4=1.0, c_overlap=0.0)
    assert predict(m4, 4, 2, coeffs=c4).detail["teacher.dequantized"] == 1024 + 0.5 * 4608
    assert predict(m4, 4, 2, coeffs=c4).detail["train_step.dequantized"] == 1024 + 0.25 * 4608
    assert predict(m4, 4, 2, coeffs=c4, arena=False).terms["heap_slack"] == 4608
    assert "heap_slack" not in predict(m8, 4, 2, coeffs=c4, arena=False).terms
    untied = dict(TINY, model=dict(TINY["model"], tie_word_embeddings=False))
    assert predict(untied, 4, 2, coeffs=UNIT).detail["weights.lm_head"] == 1024
    assert predict(dict(untied, quant={"scheme": "int8"}), 4, 2, coeffs=UNIT).detail["weights.lm_head"] == 384


def test_planner_weights_file_and_derived_mlp_width():
    man = dict(TINY, model=dict(TINY["model"], intermediate=0),      # a config without intermediate_size
               slice=dict(TINY["slice"], tensors=[_tensor("model.layers.0.mlp.up_proj.lora_B", [2, 16], "up_proj")]))
    p = predict(man, 4, 2, coeffs=UNIT)
    assert p.detail["weights.layers"] == 4608                      # I = 16 read from the adapter's shape
    assert predict(TINY, 4, 2, coeffs=UNIT, weights_file_bytes=10_000).terms["weights"] == 10_000
    assert predict(TINY, 4, 2, coeffs=UNIT).detail["teacher.dequantized"] == 0    # fp32: nothing


def test_plan_picks_largest_fitting_window():
    big = dict(TINY, model=dict(TINY["model"], max_positions=10**6))
    budget = predict(big, 2 * 160, 160, coeffs=UNIT).peak_bytes + 1
    p = plan(big, budget, coeffs=UNIT, margin=0)
    assert (p.n, p.m) == (320, 160) and p.peak_bytes <= budget
    assert predict(big, 2 * 176, 176, coeffs=UNIT).peak_bytes > budget
    assert choose_window(big, budget, 3, coeffs=UNIT, margin=0) == (320, 160)
    assert choose_window(big, budget * 1.1, 3, coeffs=UNIT) == (320, 160)      # the default 10 % margin
    assert plan(big, budget, coeffs=UNIT).peak_bytes * 1.1 <= budget
    n1, m1 = choose_window(big, budget, 3, coeffs=UNIT, ratio=1.0)
    assert n1 == m1
    assert plan(TINY, 10**12, coeffs=UNIT).m <= 4096 / 3                  # capped by max_positions


def test_plan_budget_too_small_says_the_floor():
    with pytest.raises(AbsorberError, match="too small") as e:
        plan(TINY, 100, coeffs=UNIT)
    assert "\n" not in str(e.value) and "ntp-weight" not in str(e.value)
    # a bundle with the next-token term: the line says what the term costs and what needs less
    ntp = dict(TINY, loss=dict(TINY["loss"], ntp_weight=1.0))
    with pytest.raises(AbsorberError, match="too small.*next-token term.*--ntp-weight 0") as e:
        plan(ntp, 100, coeffs=UNIT)
    assert "\n" not in str(e.value)


def test_bad_manifest():
    with pytest.raises(AbsorberError, match="missing key 'format'"):
        predict({}, 4, 2)
    with pytest.raises(AbsorberError, match=r"\$\.quant\.scheme: 'fp8' not one of"):
        predict(dict(TINY, quant={"scheme": "fp8"}), 4, 2)
    with pytest.raises(AbsorberError, match="unsupported bundle format 1"):
        predict(dict(TINY, format=1), 4, 2)


# ------------------------------------------------------------------------------------------------- CLI
def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "absorber", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_devices_json_cli():
    r = _run("devices", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert CPU in info["onnxruntime"]["providers"]
    assert info["devices"]["cpu"]["providers"] == [CPU]
    assert info["memory"]["total_bytes"] > 0 and info["cpu"]["logical_cores"] >= 1
    assert info["profile"]["name"] in {p["name"] for p in info["profiles"]}


def test_plan_cli(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(TINY))
    r = _run("plan", str(tmp_path), "--memory-budget", "200MB", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] is True and out["peak_bytes"] <= 200_000_000 and out["n"] == 2 * out["m"]
    r = _run("plan", str(tmp_path), "--n", "4", "--m", "2")
    assert r.returncode == 0 and "kv_cache" in r.stdout and "peak" in r.stdout
    r = _run("plan", str(tmp_path), "--memory-budget", "lots")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad memory size" in r.stderr


def test_import_does_not_pull_torch():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'optimum'):
                    raise ImportError('blocked: ' + name)
                return None
        sys.meta_path.insert(0, Block())
        import absorber.devices, absorber.devices.command, absorber.devices.plan_command
        from absorber.devices import describe, session_options, get_profile
        describe(); session_options(get_profile('tiny'))
        bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum')]
        assert not bad, bad
        print('ok')
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
