"""The trained KV prefix (LoraConfig.prefix_kv, Cartridges' slice; reference only), on tiny models."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from absorber import lora, prefix_kv  # noqa: E402
from absorber.config import AbsorberConfig, LoraConfig, override, parse_value  # noqa: E402
from absorber.errors import AbsorberError  # noqa: E402


def _logits(model, ids: list[int], start: int = 0) -> torch.Tensor:
    t = torch.tensor([ids])
    pos = torch.arange(start, start + len(ids))[None]
    with torch.no_grad():
        return model(input_ids=t, position_ids=pos, attention_mask=torch.ones_like(t), use_cache=False).logits[0]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_filled_prefix_answers_as_its_tokens_in_context(arch, rng_ids):
    from absorber.models import tiny_gemma3, tiny_llama
    model = (tiny_llama if arch == "llama" else tiny_gemma3)(seed=0, vocab=512)
    pre, text = rng_ids(6, seed=1), rng_ids(9, seed=2)
    lora.inject(model, LoraConfig(prefix_kv=6))
    assert set(lora.adapters(model)) == {f"model.layers.{i}.self_attn.absorber_prefix.prefix_{w}"
                                         for i in range(model.config.num_hidden_layers) for w in ("key", "value")}
    base = _logits(model, text)
    with lora.disabled(model):
        in_context = _logits(model, pre + text)[len(pre):]
    assert not torch.allclose(base, in_context, atol=1e-3)
    prefix_kv.fill(model, pre)
    with_prefix = _logits(model, text)
    torch.testing.assert_close(with_prefix, in_context, atol=2e-5, rtol=1e-4)
    with lora.disabled(model):   # the base model again
        torch.testing.assert_close(_logits(model, text), base)
    # a KV cache on top of the prefix (generation): the last token through the cache = one forward
    t = torch.tensor([text])
    with torch.no_grad():
        out = model(input_ids=t[:, :-1], attention_mask=torch.ones_like(t[:, :-1]), use_cache=True)
        last = model(input_ids=t[:, -1:], past_key_values=out.past_key_values, attention_mask=torch.ones_like(t),
                     use_cache=True).logits[0, -1]
    torch.testing.assert_close(last, with_prefix[-1], atol=2e-5, rtol=1e-4)


def test_only_the_prefix_trains_and_the_sink_slot_stays(tiny_tok, rng_ids):
    from absorber.models import tiny_llama
    from absorber.stream import StreamingAbsorber
    model = tiny_llama(seed=0, vocab=512)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = override(AbsorberConfig(n=32, m=16, k=2, lr=1e-2, ntp_weight=1.0), **{"lora.prefix_kv": 4})
    sa = StreamingAbsorber(model, tiny_tok, cfg)
    pks = prefix_kv.modules(model)
    assert len(pks) == model.config.num_hidden_layers and all(pk.filled for pk in pks)
    sink = [pk.sink_key.clone() for pk in pks]
    start = {n: p.detach().clone() for n, p in lora.adapters(model).items()}
    sa.feed_tokens(rng_ids(32 + 16 + 32, seed=3))
    assert sa.rounds and all(r.steps == 2 and not r.rolled_back for r in sa.rounds)
    for n, p in model.named_parameters():
        if n in start:
            assert not torch.equal(p, start[n]), n
        else:
            assert torch.equal(p, frozen[n]), n
    assert all(torch.equal(pk.sink_key, s) for pk, s in zip(pks, sink))
    # a restored fresh state counts as unfilled, and the next stream fills it again (evaluate.ModelPool)
    lora.load_state(model, {n: torch.zeros_like(p) for n, p in lora.adapters(model).items()})
    assert not any(pk.filled for pk in pks)
    StreamingAbsorber(model, tiny_tok, cfg)
    assert all(pk.filled for pk in pks)
    assert all(torch.equal(p, start[n]) for n, p in lora.adapters(model).items())   # the same sample (seed)
    # reset="adapters" goes back to the filled slots, not to the zeros before filling
    sa = StreamingAbsorber(model, tiny_tok, override(cfg, reset="adapters"))
    assert all(torch.equal(v, start[n]) for n, v in zip(lora.adapters(model), sa.absorption.initial))


def test_prefix_kv_settings_and_refusals(tiny_tok):
    assert parse_value("prefix_kv", "64") == 64
    assert override(AbsorberConfig(), prefix_kv=8).lora.prefix_kv == 8
    with pytest.raises(AbsorberError, match="prefix_kv"):
        override(AbsorberConfig(), prefix_kv=1).validate()
    with pytest.raises(AbsorberError, match="prefix_kv"):
        override(AbsorberConfig(), prefix_kv=4, sparse=2).validate()
    from absorber.models import tiny_llama
    model = tiny_llama(seed=0, vocab=512)
    model.config._attn_implementation = "eager"
    with pytest.raises(AbsorberError, match="grouped attention"):
        lora.inject(model, LoraConfig(prefix_kv=4))
    from absorber.stream import StreamingAbsorber
    with pytest.raises(AbsorberError, match="tokenizer"):
        StreamingAbsorber(tiny_llama(seed=0, vocab=512), None, override(AbsorberConfig(n=32, m=16), prefix_kv=4))


def test_the_exporter_refuses_a_prefix_slice():
    from absorber.export.bundle import trace
    from absorber.models import tiny_llama
    with pytest.raises(AbsorberError, match="prefix_kv"):
        trace(tiny_llama(seed=0, vocab=512), LoraConfig(prefix_kv=4), AbsorberConfig(n=32, m=16))
