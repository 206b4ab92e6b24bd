"""Grouped-query attention without per-head copies of K and V (absorber/attention.py)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


class _Module:
    training = False
    head_dim = 8

    def __init__(self, groups: int):
        self.num_key_value_groups = groups


@pytest.mark.parametrize("hq,hkv,t,past,softcap", [(6, 2, 5, 4, None), (4, 1, 1, 9, None), (3, 3, 7, 0, None),
                                                    (6, 2, 5, 4, 20.0)])
def test_grouped_attention_equals_eager(hq, hkv, t, past, softcap):
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward as gemma_eager
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

    from absorber.attention import grouped_attention
    g = torch.Generator().manual_seed(hq * 100 + t)
    L = past + t
    q = torch.randn(1, hq, t, 8, generator=g) * 3
    k, v = torch.randn(1, hkv, L, 8, generator=g) * 3, torch.randn(1, hkv, L, 8, generator=g)
    mask = torch.where(torch.rand(1, 1, t, L, generator=g) < 0.3, -1e9, 0.0)
    mod = _Module(hq // hkv)
    if softcap is None:
        ref, ref_p = llama_eager(mod, q, k, v, mask, scaling=0.35)
    else:
        ref, ref_p = gemma_eager(mod, q, k, v, mask, scaling=0.35, softcap=softcap)
    out, p = grouped_attention(mod, q, k, v, mask, scaling=0.35, softcap=softcap)
    assert out.shape == ref.shape == (1, t, hq, 8) and p.shape == ref_p.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p, ref_p, atol=1e-6, rtol=1e-5)


def test_reference_models_use_it():
    from absorber.attention import IMPLEMENTATION
    from absorber.models import tiny_gemma3, tiny_llama
    assert tiny_llama().config._attn_implementation == IMPLEMENTATION
    assert tiny_gemma3().config._attn_implementation == IMPLEMENTATION


def test_decoder_does_not_copy_the_kv_cache_per_head(tiny_bundle):
    """No Expand in decoder.onnx reads the KV cache (eager attention's repeat_kv did, in every layer: a copy of the
    whole cache per call, growing with the context)."""
    import onnx
    g = onnx.load(str(tiny_bundle / "decoder.onnx"), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    cache = {i.name for i in g.input if i.name.startswith("past_")} | {o.name for o in g.output
                                                                        if o.name.startswith("present_")}

    def reaches_cache(name: str, depth: int = 0) -> bool:
        if name in cache:
            return True
        n = producer.get(name)
        if n is None or depth > 8 or n.op_type not in ("Unsqueeze", "Reshape", "Identity", "Transpose"):
            return False
        return reaches_cache(n.input[0], depth + 1)

    expands = [n for n in g.node if n.op_type == "Expand"]
    assert not [n.name for n in expands if reaches_cache(n.input[0])]
    # the products read the cache itself: each present key/value reaches a MatMul through views only
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)

    def feeds_matmul(name: str, depth: int = 0) -> bool:
        for c in consumers.get(name, []):
            if c.op_type == "MatMul" or (c.op_type in ("Reshape", "Transpose", "Identity") and depth < 4
                                         and feeds_matmul(c.output[0], depth + 1)):
                return True
        return False

    assert all(feeds_matmul(name) for name in cache if name.startswith("present_"))
