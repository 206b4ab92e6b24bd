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
    """{quant: (plain bundle, recomputed bundle)} written from the session's trace of the tiny Llama."""
    from absorber.export.bundle import write
    from absorber.models import tiny_tokenizer
    from conftest import tiny_trace

    root = tmp_path_factory.mktemp("recompute")
    traced = tiny_trace()
    tok = tiny_tokenizer()
    out = {q: (write(traced, tok, root / f"{q}-plain", q, recompute=False),
               write(traced, tok, root / f"{q}-rc", q, recompute=True)) for q in ("fp32", "int4")}
    out["head"] = traced.head
    return out


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
    from absorber.export.bundle import head_tensors
    from absorber.export.recompute import recompute_layers

    plain, rc = pairs[quant]
    head = head_tensors(pairs["head"])
    before = onnx.load(str(plain / "train_step.onnx"), load_external_data=False)
    after = onnx.load(str(rc / "train_step.onnx"), load_external_data=False)

    def head_products(mp):     # nodes that multiply by the head (its dequantized view counts as the head)
        derived = set(head)
        for n in mp.graph.node:
            if n.op_type in ("DequantizeLinear", "GatherBlockQuantized") and n.input[0] in derived:
                derived.update(n.output)
        return sum(n.op_type in ("MatMul", "MatMulNBits", "Gemm", "FusedMatMul") and any(x in derived for x in n.input)
                   for n in mp.graph.node)
    assert head_products(after) == head_products(before) > 0     # the head is never recomputed
    first = recompute_layers(before, head)           # what the exporter did
    assert first["saved_recomputed"] > 0 and first["cloned_nodes"] > 0 and first["head_kept"] > 0
    again = recompute_layers(after, head)            # nothing left to recompute in the exported graph
    assert again["saved_recomputed"] == 0, again
    assert read_manifest(rc).recompute and not read_manifest(plain).recompute
    onnx.checker.check_model(str(rc / "train_step.onnx"))


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_each_layers_clones_wait_for_the_gradients_of_the_layer_above(pairs, quant):
    """ONNX Runtime runs a node as late as the first output that needs it: without this order the weight
    gradients of every layer ran last and kept every layer's clones alive to the end."""
    import re
    from collections import defaultdict

    _, rc = pairs[quant]
    g = onnx.load(str(rc / "train_step.onnx"), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}

    def ancestors(t):
        seen, stack = set(), [t]
        while stack:
            x = stack.pop()
            if x in seen or x not in producer:
                continue
            seen.add(x)
            stack.extend(producer[x].input)
        return seen

    waits = defaultdict(set)       # gate -> layers whose adapter gradients it waits for
    for n in g.node:
        if n.op_type == "Mul" and n.output[0].startswith("rc_zero"):
            for o in ancestors(n.output[0]) & outputs:
                waits[n.output[0]].add(int(re.search(r"layers\.(\d+)\.", o).group(1)))
    layers = {int(re.search(r"layers\.(\d+)\.", o).group(1)) for o in outputs if o.startswith("grad.")}
    assert len(layers) > 1
    assert set().union(*waits.values()) == layers - {min(layers)}     # every layer's gradients but the first


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


@pytest.mark.parametrize("length", [2, 3, 9, 10, 37])
def test_lean_next_token_loss_is_the_cross_entropy(length):
    """The traced next-token term (head gradient computed in the forward, in HEAD_CHUNKS pieces of X) has the
    reference cross-entropy's value and gradient, whatever X's length against the piece count."""
    import torch

    from absorber import sync
    from absorber.models import tiny_llama
    model = tiny_llama(seed=1, vocab=512)
    frozen = {id(model.get_output_embeddings().weight), id(model.get_input_embeddings().weight)}   # no adapters
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, 512, (1, length), generator=torch.Generator().manual_seed(length))
    a = sync.lean_next_token_loss(model, ids)
    ga = torch.autograd.grad(a, params)
    b = sync.next_token_loss(model, ids)
    gb = torch.autograd.grad(b, params)
    assert abs(float(a) - float(b)) <= 1e-5 * abs(float(b))
    for x, y in zip(ga, gb):
        assert float((x - y).abs().max()) <= 1e-5 * float(y.abs().max()) + 1e-12
    assert any(float(y.abs().max()) > 0 for y in gb)
    # a trainable head is not covered (G would drop its gradient): the plain cross-entropy is used
    w = model.get_output_embeddings().weight.requires_grad_(True)
    (gw,) = torch.autograd.grad(sync.lean_next_token_loss(model, ids), [w])
    (gw_ref,) = torch.autograd.grad(sync.next_token_loss(model, ids), [w])
    assert float(gw.abs().max()) > 0 and torch.allclose(gw, gw_ref, rtol=1e-5, atol=1e-8)


def test_head_chunks_recorded_only_where_the_head_is_in_pieces():
    """A head the pieces do not cover (soft-capped logits here) is traced as the plain cross-entropy: its
    manifest has no loss.head_chunks, so the planner takes the older terms for it."""
    from absorber import sync
    from absorber.bundle_format import HEAD_CHUNKS, loss_entry
    from absorber.config import AbsorberConfig
    from absorber.models import tiny_llama

    model = tiny_llama(seed=1, vocab=512)
    for p in model.parameters():
        p.requires_grad_(False)
    assert sync.head_in_pieces(model)
    model.config.final_logit_softcapping = 30.0
    assert not sync.head_in_pieces(model)
    cfg = AbsorberConfig()
    assert loss_entry(cfg, [1], HEAD_CHUNKS)["head_chunks"] == HEAD_CHUNKS
    assert "head_chunks" not in loss_entry(cfg, [1], 0)
    assert "head_chunks" not in loss_entry(AbsorberConfig(ntp_weight=0.0), [1], HEAD_CHUNKS)


def test_each_norm_input_is_recomputed_not_kept(pairs, monkeypatch):
    """The start of a layer's RMSNorm (x * rsqrt(mean(x^2) + eps)) reads no weight of the layer, so it fell in the
    stage below and its [T, H] output was kept for the whole backward beside the residual stream x; so did each
    loss layer's slice of the teacher_hidden input. Moved into the stage that reads them, neither is kept: one
    hidden vector per token fewer per layer and pass, and one per loss layer."""
    from absorber.export import recompute as R
    from absorber.export.bundle import head_tensors
    head = head_tensors(pairs["head"])
    plain, _ = pairs["int4"]
    manifest = json.loads((plain / "manifest.json").read_text())
    hidden, loss_layers = int(manifest["model"]["hidden"]), len(manifest["loss"]["layers"])
    graph = onnx.load(str(plain / "train_step.onnx"), load_external_data=False)
    a, b = onnx.ModelProto(), onnx.ModelProto()
    a.CopyFrom(graph)
    b.CopyFrom(graph)
    moved = R.recompute_layers(a, head)
    monkeypatch.setattr(R, "_sink_weight_free", lambda *args: 0)
    kept = R.recompute_layers(b, head)
    # both passes (X for the next-token term, Y) of every layer: one norm input each; Y: one teacher slice per
    # loss layer
    assert moved["sunk"] > 0 and kept["sunk"] == 0
    assert (kept["kept_floats_per_token"] - moved["kept_floats_per_token"]
            == hidden * (2 * moved["stages"] + loss_layers))


def test_the_recomputing_train_step_is_written_without_value_info(tiny_bundles):
    """export/bundle.py: the recomputing train step (int8/int4) carries no intermediate value_info, so ONNX Runtime
    infers the shapes itself (measured: a lower round peak, benchmarks/planner.md section 00000000); the plain
    fp32 one keeps the exporter's, and both keep their declared inputs and outputs."""
    from absorber.runtime.bundle import open_bundle
    for quant, recomputes in (("int4", True), ("int8", True), ("fp32", False)):
        b = open_bundle(tiny_bundles[quant])
        assert b.recompute is recomputes
        g = onnx.load(str(b.graph_file("train_step")), load_external_data=False).graph
        assert (len(g.value_info) == 0) is recomputes, quant
        assert [i.name for i in g.input] == [i["name"] for i in b.graph_io("train_step", "inputs")]
        assert all(o.type.tensor_type.HasField("shape") for o in g.output)
        if recomputes:
            then = next(a.g for a in onnx.load(str(b.combined_file), load_external_data=False).graph.node[-1].attribute
                        if a.name == "then_branch")
            assert len(then.value_info) == 0
