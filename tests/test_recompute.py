"""Per-layer activation recomputation in the train step (export/recompute.py): same loss and gradients as the
graph that keeps every activation, and after the rewrite the backward reads no layer-internal forward value."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{quant: (plain bundle, recomputed bundle)} written from ONE trace of the tiny Llama."""
    from absorber.export.bundle import trace, write
    from absorber.models import tiny_llama, tiny_tokenizer
    from conftest import TINY_BUNDLE_CFG

    root = tmp_path_factory.mktemp("recompute")
    traced = trace(tiny_llama(seed=0, vocab=512), cfg=TINY_BUNDLE_CFG)
    tok = tiny_tokenizer()
    return {q: (write(traced, tok, root / f"{q}-plain", q, recompute=False),
                write(traced, tok, root / f"{q}-rc", q, recompute=True)) for q in ("fp32", "int4")}


def _run(bundle, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(bundle / "train_step.onnx"), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {k: v for k, v in feeds.items()
                                          if k in {i.name for i in sess.get_inputs()}})))


def _feeds(bundle, length: int, seed: int):
    from safetensors.numpy import load_file
    m = json.loads((bundle / "manifest.json").read_text())
    rng = np.random.default_rng(seed)
    ad = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
          for k, v in load_file(str(bundle / "adapters.safetensors")).items()}
    hidden = int(m["model"]["hidden"])
    return {"input_ids": rng.integers(3, 512, (1, length)).astype(np.int64),
            "position_ids": np.arange(length, dtype=np.int64)[None],
            "teacher_hidden": rng.standard_normal((len(m["loss"]["layers"]), length, hidden)).astype(np.float32),
            "x_ids": rng.integers(3, 512, (1, length + 4)).astype(np.int64), **ad}


@pytest.mark.parametrize("quant", ["fp32", "int4"])
@pytest.mark.parametrize("length", [3, 29])
def test_recomputed_train_step_gives_the_same_loss_and_gradients(pairs, quant, length):
    plain, rc = pairs[quant]
    feeds = _feeds(plain, length, seed=length)
    a, b = _run(plain, feeds), _run(rc, feeds)
    assert a.keys() == b.keys() and len(a) > 1
    for k in a:
        assert np.isfinite(a[k]).all()
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-9, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if k.startswith("grad."))


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_the_backward_reads_only_layer_boundaries_after_the_rewrite(pairs, quant):
    from absorber.bundle_format import read_manifest
    from absorber.export.recompute import recompute_layers

    plain, rc = pairs[quant]
    before = onnx.load(str(plain / "train_step.onnx"), load_external_data=False)
    after = onnx.load(str(rc / "train_step.onnx"), load_external_data=False)
    first = recompute_layers(before)                 # what the exporter did
    assert first["saved_recomputed"] > 0 and first["cloned_nodes"] > 0
    again = recompute_layers(after)                  # nothing left to recompute in the exported graph
    assert again["saved_recomputed"] == 0, again
    assert read_manifest(rc).recompute and not read_manifest(plain).recompute
    onnx.checker.check_model(str(rc / "train_step.onnx"))


@pytest.mark.parametrize("kind", ["l1", "l2", "l1n"])
@pytest.mark.parametrize("skip", [0, 1])
def test_per_layer_sync_loss_is_the_stacked_loss(kind, skip):
    """The traced loss (one term per layer, no stack) = the reference's sync_loss on the stacked states, value and
    gradient."""
    import torch

    from absorber import sync
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 9, 8, generator=g, requires_grad=True)
    target = torch.randn(4, 9, 8, generator=g)
    a = sync.sync_loss(student, target, kind, skip=skip)
    (ga,) = torch.autograd.grad(a, student)
    b = sync.sync_loss_per_layer(list(student), target, kind, skip)
    (gb,) = torch.autograd.grad(b, student)
    assert torch.allclose(a, b, rtol=1e-6) and torch.allclose(ga, gb, rtol=1e-6, atol=1e-9)
