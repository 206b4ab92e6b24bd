"""Decoder-only rewrites for ONNX Runtime's fused kernels (export/fusions.py): RMS norms written so that ORT fuses
them, rotary embeddings as one RotaryEmbedding node. The decoder parity tests (test_export, test_runtime,
test_gemma) check the rewritten decoders' logits against torch; these check the rewrites themselves."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from absorber.export import fusions


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_decoder_norms_are_fused_by_onnxruntime(tiny_bundles, quant, tmp_path):
    """Every RMS norm of the decoder reads x / sqrt(mean(x^2) + eps), so ONNX Runtime fuses each into one
    SimplifiedLayerNormalization node when the session opens; the file holds only standard ops (test_quant's
    checker test) and no Reciprocal."""
    from absorber.bundle_format import read_manifest
    b = read_manifest(tiny_bundles[quant])
    dec = onnx.load(str(tiny_bundles[quant] / "decoder.onnx"), load_external_data=False)
    norms = 2 * b.manifest["model"]["num_layers"] + 1
    assert b.manifest["graphs"]["decoder"]["norms_for_ort_fusion"] == norms
    ops = [nd.op_type for nd in dec.graph.node]
    assert "Reciprocal" not in ops and ops.count("Pow") == norms
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tiny_bundles[quant] / "decoder.onnx"), so, providers=["CPUExecutionProvider"])
    fused = [nd.op_type for nd in onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph.node]
    assert fused.count("SimplifiedLayerNormalization") == norms and "Pow" not in fused


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_decoder_rotary_is_one_kernel_per_use(tiny_bundles, quant):
    """q and k of every layer go through one com.microsoft.RotaryEmbedding over [positions, head_dim/2] tables;
    no rotate_half (Neg into Concat) and no Sin/Cos are left in the decoder."""
    from absorber.bundle_format import read_manifest
    b = read_manifest(tiny_bundles[quant])
    m = b.manifest["model"]
    dec = onnx.load(str(tiny_bundles[quant] / "decoder.onnx"), load_external_data=False)
    ops = [nd.op_type for nd in dec.graph.node]
    assert b.manifest["graphs"]["decoder"]["rotary_kernels"] == ops.count("RotaryEmbedding") == 2 * m["num_layers"]
    assert not {"Sin", "Cos"} & set(ops)
    negs = {nd.output[0] for nd in dec.graph.node if nd.op_type == "Neg"}      # rotate_half's: none left
    assert not any(negs & set(nd.input) for nd in dec.graph.node if nd.op_type == "Concat")
    tables = {t.name: t for t in dec.graph.initializer if t.name.startswith("rotary.")}
    assert {tuple(t.dims) for t in tables.values()} == {(m["max_positions"], m["head_dim"] // 2)}


def _rope_graph(H: int = 8, heads: int = 2):
    """t [1, heads, T, H] -> t * cos + rotate_half(t) * sin, cos/sin from position_ids as transformers traces it."""
    inv = (1.0 / (10000 ** (np.arange(0, H, 2) / H))).astype(np.float32)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    inits = [c("inv", inv[None, None, :]), c("ax1", np.array([1], np.int64)), c("ax2", np.array([2], np.int64)),
             c("axl", np.array([-1], np.int64)), c("z", np.array([0], np.int64)), c("h", np.array([H // 2], np.int64)),
             c("big", np.array([1 << 62], np.int64))]
    n = helper.make_node
    nodes = [n("Unsqueeze", ["position_ids", "ax2"], ["p3"]), n("Cast", ["p3"], ["pf"], to=TensorProto.FLOAT),
             n("Mul", ["pf", "inv"], ["fr"]), n("Concat", ["fr", "fr"], ["emb"], axis=-1),
             n("Cos", ["emb"], ["cos3"]), n("Sin", ["emb"], ["sin3"]),
             n("Unsqueeze", ["cos3", "ax1"], ["cos"]), n("Unsqueeze", ["sin3", "ax1"], ["sin"])]
    for q in ("q", "k"):
        nodes += [n("Mul", [q, "cos"], [f"{q}c"]),
                  n("Slice", [q, "z", "h", "axl"], [f"{q}lo"]), n("Slice", [q, "h", "big", "axl"], [f"{q}hi"]),
                  n("Neg", [f"{q}hi"], [f"{q}n"]), n("Concat", [f"{q}n", f"{q}lo"], [f"{q}r"], axis=-1),
                  n("Mul", [f"{q}r", "sin"], [f"{q}s"]), n("Add", [f"{q}c", f"{q}s"], [f"{q}_out"])]
    ins = [helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "T"])] + \
        [helper.make_tensor_value_info(q, TensorProto.FLOAT, [1, heads, "T", H]) for q in ("q", "k")]
    outs = [helper.make_tensor_value_info(f"{q}_out", TensorProto.FLOAT, None) for q in ("q", "k")]
    return helper.make_graph(nodes, "rope", ins, outs, inits)


def _run(g, feeds):
    mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_rotary_rewrite_keeps_the_values():
    g0, g1 = _rope_graph(), _rope_graph()
    assert fusions.rotary_as_kernel(g1, positions=64) == 2
    assert [nd.op_type for nd in g1.node] == ["RotaryEmbedding"] * 2
    rng = np.random.default_rng(0)
    for start, T in ((0, 5), (37, 1), (60, 4)):
        feeds = {"position_ids": np.arange(start, start + T, dtype=np.int64)[None],
                 "q": rng.standard_normal((1, 2, T, 8)).astype(np.float32),
                 "k": rng.standard_normal((1, 2, T, 8)).astype(np.float32)}
        for a, b in zip(_run(g0, feeds), _run(g1, feeds)):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def test_rotary_rewrite_skips_tables_over_the_limit(monkeypatch):
    monkeypatch.setattr(fusions, "TABLE_BYTES", 64 * 4 * 4 - 1)      # 64 positions x 4 x cos/sin x 4 B, minus 1
    g = _rope_graph()
    before = onnx.printer.to_text(g)
    assert fusions.rotary_as_kernel(g, positions=64) == 0
    assert onnx.printer.to_text(g) == before


def test_norm_rewrite_keeps_the_values():
    x = np.random.default_rng(1).standard_normal((1, 3, 16)).astype(np.float32)
    w = np.linspace(0.5, 1.5, 16, dtype=np.float32)
    model = torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w))
        ref = model(torch.from_numpy(x)).numpy()
    n = helper.make_node
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    nodes = [n("Pow", ["x", "two"], ["p"]), n("ReduceMean", ["p", "axl"], ["m"], keepdims=1),
             n("Add", ["m", "eps"], ["a"]), n("Sqrt", ["a"], ["s"]), n("Reciprocal", ["s"], ["r"]),
             n("Mul", ["x", "r"], ["xn"]), n("Mul", ["w", "xn"], ["y"])]
    g = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [c("two", 2.0), c("eps", 1e-5), c("w", w),
                           numpy_helper.from_array(np.array([-1], np.int64), "axl")])
    assert fusions.rms_norms_as_division(g) == 1 and "Reciprocal" not in [nd.op_type for nd in g.node]
    np.testing.assert_allclose(_run(g, {"x": x})[0], ref, rtol=1e-6, atol=1e-6)


def test_small_powers_become_products_with_the_same_bits():
    """Pow(x, 1 / 2) -> Identity / Mul: bit for bit what ONNX Runtime's Pow gives, on the [T, H] and [T, 1] shapes
    of the train step; other exponents and non-constant ones stay."""
    n = helper.make_node
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    for shape in ((1, 64, 1), (1, 96, 576)):
        x = np.abs(np.random.default_rng(2).standard_normal(shape) * 3).astype(np.float32)
        outs = ["y1", "y2", "y3", "yh", "yx"]
        nodes = [n("Pow", ["x", "one"], ["y1"]), n("Pow", ["x", "two"], ["y2"]), n("Pow", ["x", "three"], ["y3"]),
                 n("Pow", ["x", "half"], ["yh"]), n("Pow", ["x", "x"], ["yx"])]
        g = helper.make_graph(nodes, "powers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                              [c("one", 1.0), c("two", [2.0]), c("three", 3.0), c("half", 0.5)])
        before = _run(g, {"x": x})
        assert fusions.powers_as_products(g) == 2
        assert [nd.op_type for nd in g.node] == ["Identity", "Mul", "Pow", "Pow", "Pow"]
        after = _run(g, {"x": x})
        for a, b in zip(before, after):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_the_train_step_has_no_small_powers(tiny_bundles, quant):
    ts = onnx.load(str(tiny_bundles[quant] / "train_step.onnx"), load_external_data=False)
    consts, _, _, _ = fusions.index_graph(ts.graph)
    assert not [nd for nd in ts.graph.node if nd.op_type == "Pow" and fusions.scalar(consts, nd.input[1]) in (1, 2)]
