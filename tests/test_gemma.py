"""Gemma-3 through the exporter and the runtime, on a tiny random Gemma3TextConfig (absorber.models.tiny_gemma3):
sliding-window layers beside a global one, q/k norms, tied and scaled embeddings, two RoPE bases.

The window is chosen so that the teacher (X·Y, 48 tokens) runs past the sliding window (24) while the student
(Y, 16 tokens) does not. When the student too runs past it, a sliding layer's state at Y's later positions sees
no X at all, teacher and student agree there to float rounding, and the L1 gradient's sign at those positions
is rounding noise: runtime and reference then differ by design, not by a bug (measured while adding this
architecture: 0.79 relative on layer 0's lora_B at window 8, exact graphs otherwise).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

WINDOW, LAYERS = 24, 2


@pytest.fixture(scope="module")
def gemma_bundles(tmp_path_factory):
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.export import export_bundles
    from absorber.models import tiny_gemma3, tiny_tokenizer
    root = tmp_path_factory.mktemp("gemma")
    cfg = AbsorberConfig(n=32, m=16, k=2, lora=LoraConfig(rank=4, alpha=8))
    outs = export_bundles(tiny_gemma3(seed=0, layers=LAYERS, sliding_window=WINDOW), tiny_tokenizer(),
                          {"fp32": root / "fp32", "int4": root / "int4"}, cfg=cfg)
    return outs, cfg


def _profile(cfg):
    from absorber.devices.profiles import default_profile
    return dataclasses.replace(default_profile(), matmul_accuracy={"decoder": 1, "train_step": 1},
                               n=cfg.n, m=cfg.m, k=cfg.k)


def _ref(bundle, cfg):
    """The torch Gemma-3 with the bundle's initial adapters (quantized weights: their dequantized values)."""
    from safetensors.numpy import load_file

    from absorber import lora
    from absorber.bundle_format import read_manifest
    from absorber.export import quant as Q
    from absorber.models import tiny_gemma3
    man = read_manifest(bundle).manifest
    model = tiny_gemma3(seed=0, layers=LAYERS, sliding_window=WINDOW)
    lora.inject(model, cfg.lora)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for n in sorted(man["quant"].get("quantized", [])):
            params[n].copy_(torch.from_numpy(Q.quantize(n, params[n].numpy(), man["quant"]["scheme"]).dequantized()))
    lora.load_state(model, {k: torch.from_numpy(v) for k, v in load_file(str(bundle / "adapters.safetensors")).items()})
    return model, man


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=g).tolist()


def test_gemma3_is_a_registered_architecture(gemma_bundles):
    outs, _ = gemma_bundles
    from absorber.bundle_format import read_manifest
    man = read_manifest(outs["fp32"]).manifest
    assert man["model"]["architecture"] == "gemma3" and man["model"]["tie_word_embeddings"]


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_gemma3_logits_past_the_sliding_window_match_torch(gemma_bundles, quant):
    from absorber.runtime import Stream
    outs, cfg = gemma_bundles
    model, _ = _ref(outs[quant], cfg)
    ids = _ids(2 * WINDOW + 12)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    s = Stream.open(outs[quant], profile=_profile(cfg))
    got = s.logits(ids)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() < 1e-4 * scale
    # the sliding window matters at this length: the same weights without it give other logits
    model.config.sliding_window = 10 * WINDOW
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = 10 * WINDOW
    with torch.no_grad():
        unwindowed = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    assert np.abs(got - unwindowed).max() > 1e-2 * scale


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_gemma3_rounds_match_the_reference(gemma_bundles, quant):
    """Two rounds (teacher X·Y = 48 tokens > the sliding window of 24): losses and adapters as the reference."""
    from absorber import lora
    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    outs, cfg = gemma_bundles
    model, _ = _ref(outs[quant], cfg)
    ids = _ids(2 * cfg.n + cfg.m + 3, seed=1)
    rr = StreamingAbsorber(model, None, cfg).feed_tokens(ids)
    s = Stream.open(outs[quant], profile=_profile(cfg))
    ro = s.feed_tokens(ids)
    assert len(rr) == len(ro) == 2
    for a, b in zip(rr, ro):
        assert a.steps == b.steps == cfg.k
        assert b.loss_first == pytest.approx(a.loss_first, rel=1e-4)
        assert b.loss_last == pytest.approx(a.loss_last, rel=1e-4)
    snap = {n: t.numpy() for n, t in lora.snapshot(model).items()}
    got = s.adapters()
    flat = lambda d: np.concatenate([d[n].ravel() for n in sorted(got)])  # noqa: E731
    assert np.linalg.norm(flat(got) - flat(snap)) / np.linalg.norm(flat(snap)) < 1e-4


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_gemma3_decodes_past_the_sliding_window_as_torch(gemma_bundles, quant):
    """Greedy decoding with the KV cache, prompt and generated tokens running past the sliding window: the
    runtime's tokens are torch's (the decoder graph once failed there: its sliding cache layers were traced
    at a past shorter than the window)."""
    from absorber.runtime import Stream
    outs, cfg = gemma_bundles
    model, _ = _ref(outs[quant], cfg)
    prompt = _ids(WINDOW - 4)
    new = WINDOW + 8                      # prompt + generated = 2 x WINDOW + 4
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, len(prompt):].tolist()
    s = Stream.open(outs[quant], profile=_profile(cfg))
    got = s.generate_ids(list(prompt), new)
    assert list(got)[:new] == want
