"""A bos bundle (`absorber export --bos`): the BOS at position 0 of every context in the exporter and the runtime,
against the reference's cfg.bos (tests/test_bos.py), on tiny models."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from absorber.config import AbsorberConfig
from absorber.errors import AbsorberError
from test_runtime import EXTRA_LAYERS, _assert_same_rounds, _ids, _ref_model    # the runtime tests' helpers

CFG = AbsorberConfig(n=32, m=16, k=4, bos=True)


@pytest.fixture(scope="module")
def bos_bundles(tmp_path_factory) -> dict:
    """fp32 and int4 bundles of the tiny Llama (EXTRA_LAYERS deep) exported with bos=True (one trace)."""
    from absorber.export import export_bundles
    from absorber.models import tiny_llama, tiny_tokenizer
    root = tmp_path_factory.mktemp("bos")
    outs = export_bundles(tiny_llama(seed=0, vocab=512, layers=EXTRA_LAYERS), tiny_tokenizer(), {"fp32": root / "fp32",
                                                                           "int4": root / "int4"}, cfg=CFG)
    return {q: Path(p) for q, p in outs.items()}


def test_manifest_and_graph_of_a_bos_bundle(bos_bundles, tiny_tok):
    import onnx

    from absorber.bundle_format import read_manifest
    b = read_manifest(bos_bundles["fp32"])
    assert b.manifest["loss"]["bos"] == b.bos_id == tiny_tok.bos_token_id
    assert "bos" not in b.manifest["defaults"] and b.defaults().bos is True
    g = onnx.load(str(b.graph_file("train_step")), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims["input_ids"] == [1, "T"] and dims["teacher_hidden"][1] == "M"   # Y alone: T less the BOS


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_bos_rounds_match_ref_model(bos_bundles, tiny_tok, exact_profile, quant):
    """Teacher BOS.X.Y, student BOS.Y with the BOS outside the loss, the next-token term on BOS.X scoring X[1:]:
    the runtime's losses and adapters equal the reference's with cfg.bos (quantized: on the dequantized
    weights), and the context an answer continues is the reference's."""
    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    model, cfg = _ref_model(bos_bundles[quant])
    assert cfg.bos and cfg.ntp_weight > 0 and cfg.sync_skip == 1
    ids = _ids(cfg.n * 2 + cfg.m + 3, seed=7)
    ref = StreamingAbsorber(model, tiny_tok, cfg)
    rr = ref.feed_tokens(ids)
    s = Stream.open(bos_bundles[quant], profile=exact_profile)
    ro = s.feed_tokens(ids)
    assert len(ro) == 2
    _assert_same_rounds(rr, ro, model, s)
    assert s.sink == [tiny_tok.bos_token_id]
    assert s.sink + s.window == ref.context()
    # the same text without the BOS gives other losses (the option is not a no-op)
    plain, _ = _ref_model(bos_bundles[quant])
    r0 = StreamingAbsorber(plain, tiny_tok, dataclasses.replace(cfg, bos=False)).feed_tokens(ids)
    assert r0[0].loss_first != pytest.approx(rr[0].loss_first, rel=1e-3)


def test_bos_replay_steps_match_ref_model(bos_bundles, tiny_tok, exact_profile):
    """Replay on a bos bundle (Gemma-3's preset: BOS and replay 8 x 4 steps): each replay step's x_ids is the BOS
    then a kept X, as in the reference; the same steps, losses, adapters and kept texts (no BOS kept) over two rounds."""
    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    over = {"replay": 2, "replay_steps": 2}
    model, cfg = _ref_model(bos_bundles["fp32"])
    cfg = dataclasses.replace(cfg, **over)
    ids = _ids(cfg.n * 2 + cfg.m + 3, seed=11)
    ref = StreamingAbsorber(model, tiny_tok, cfg)
    rr = ref.feed_tokens(ids)
    s = Stream.open(bos_bundles["fp32"], profile=exact_profile, config_overrides=over)
    ro = s.feed_tokens(ids)
    assert [r.steps for r in ro] == [cfg.k, cfg.k + 2]
    _assert_same_rounds(rr, ro, model, s)
    kept = s.replay_buffer.kept
    assert kept == ref.absorption.replay.kept and len(kept) == 2
    assert sorted(kept) == sorted([ids[:cfg.n], ids[cfg.n:2 * cfg.n]])   # the two X absorbed, no BOS


def test_answers_read_the_bos(bos_bundles, tiny_tok, exact_profile):
    """ask() continues BOS + window + prompt: its greedy answer is the reference model's on those ids."""
    from absorber.runtime import Stream
    s = Stream.open(bos_bundles["fp32"], profile=exact_profile)
    s.feed_tokens(_ids(20, seed=3))          # no round: the window alone
    prompt = "Question?"
    out: list[int] = []
    s.ask(prompt, max_new_tokens=4, on_token=out.append)
    model, _ = _ref_model(bos_bundles["fp32"])
    ctx = [tiny_tok.bos_token_id] + s.window + s.model.encode(prompt)
    with torch.no_grad():
        want = model.generate(torch.tensor([ctx]), attention_mask=torch.ones(1, len(ctx), dtype=torch.long),
                              max_new_tokens=4, do_sample=False, pad_token_id=0)[0, len(ctx):].tolist()
    assert out == want[:len(out)] and len(out) >= 1
    logits = s.logits(ctx)
    without = s.logits(ctx[1:])
    assert np.abs(logits[-1] - without[-1]).max() > 1e-4     # the BOS changes the answer's distribution


def test_bos_is_fixed_by_the_bundle(bos_bundles, tiny_bundle):
    from absorber.runtime import Stream
    with pytest.raises(AbsorberError, match="cannot override 'bos'"):
        Stream.open(bos_bundles["fp32"], config_overrides={"bos": False})
    with pytest.raises(AbsorberError, match="compose"):
        Stream.open(bos_bundles["fp32"], config_overrides={"teacher": "compose"})
    s = Stream.open(tiny_bundle)
    assert s.sink == [] and s.cfg.bos is False and "bos" not in json.loads(
        (tiny_bundle / "manifest.json").read_text())["loss"]


def test_the_exporter_refuses_prefix_and_bos_with_compose(tiny_model, tiny_tok):
    from absorber.export import export_bundle
    with pytest.raises(AbsorberError, match="prefix is not supported by the exporter"):
        export_bundle(tiny_model, tiny_tok, "/nonexistent/never-written", cfg=AbsorberConfig(prefix=4))
    with pytest.raises(AbsorberError, match="compose"):
        export_bundle(tiny_model, tiny_tok, "/nonexistent/never-written",
                      cfg=AbsorberConfig(bos=True, teacher="compose"))

    class NoBos:
        bos_token_id = None
    tiny_model.config.bos_token_id = None
    with pytest.raises(AbsorberError, match="BOS"):
        export_bundle(tiny_model, NoBos(), "/nonexistent/never-written", cfg=AbsorberConfig(bos=True))


def test_server_answers_read_the_bos(bos_bundles, tmp_path):
    """`absorber serve` on a bos bundle: an answer's context is the BOS and the window (one token more than what
    the stream was fed, before its first round)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    from test_serve import Server, seg_tokens
    srv = Server(bos_bundles["fp32"], tmp_path / "state").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/v1/streams", json={"id": "s"}).status_code in (200, 201)
            text = "Alice reports that the launch moved to May."
            assert c.post("/v1/streams/s/segments", json={"text": text}).status_code == 202      # accepted, queued
            a = c.post("/v1/streams/s/ask", json={"prompt": " Q:", "max_new_tokens": 2}).json()
            assert a["context_tokens"] == seg_tokens(bos_bundles["fp32"])(text) + 1
    finally:
        srv.kill9()


def test_a_trimmed_prompt_keeps_its_bos(bos_bundles):
    """A prompt longer than the model's positions loses its oldest tokens but not the BOS in front."""
    from absorber.runtime import Stream
    from absorber.runtime import generate as G
    s = Stream.open(bos_bundles["fp32"])
    limit = s.model.max_positions
    long = s.sink + _ids(limit + 10, seed=9)
    gen = G.Generator(s.model, s.param_views, 4)
    gen.append(long, keep=1)
    fed = gen._pending[0].tolist()
    assert len(fed) == limit - 4 and fed[0] == s.sink[0] and fed[1:] == long[len(long) - (limit - 5):]
    gen.append(long)                           # without keep: the oldest tokens go, the BOS with them
    assert gen._pending[0, 0] != s.sink[0] and len(gen._pending[0]) == limit - 4
    assert len(s.generate_ids(long, 2, stop_at_eos=False)) == 2
