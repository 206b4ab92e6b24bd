"""Grouped-query attention without copying the keys and values per query head.

transformers' eager attention expands K and V of a GQA model to one copy per query head (`repeat_kv`: SmolLM2-135M
has 9 query heads over 3 KV heads, Gemma-3-270M 4 over 1) before the two products. Traced into ONNX that is an
Expand of the whole KV cache in every layer and every decoder call: at 1024 cached tokens SmolLM2 moves ~140 MB
per generated token for it, and decoding slows with the length of the context (benchmarks/decode.md).

Here the query heads that share a KV head are stacked along the rows instead, [B, Hkv, g*T, D], so each product
reads K and V once, as they are:

    scores = (q grouped) @ K^T * scaling -> [B, Hq, T, L] (+ softcap, + mask) -> softmax -> grouped @ V

Head h = kv * g + j, as in repeat_kv. Every score and output is the same dot product as eager attention's (only
the GEMM's row blocking differs), so the reference and the exported graphs use this one function
(`IMPLEMENTATION`, registered in transformers' AttentionInterface with eager's mask).
"""
from __future__ import annotations

IMPLEMENTATION = "absorber_grouped"


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                      softcap: float | None = None, **kwargs):
    """Eager attention (softmax in float32, optional softcap and additive mask) over query [B, Hq, T, D] and
    key/value [B, Hkv, L, D]; returns ([B, T, Hq, D], probabilities [B, Hq, T, L])."""
    import torch
    from torch import nn
    from absorber.prefix_kv import prepend
    key, value, attention_mask = prepend(module, key, value, attention_mask)   # LoraConfig.prefix_kv (reference)
    B, Hq, T, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    g = Hq // Hkv
    if scaling is None:
        scaling = module.head_dim ** -0.5
    # bmm on 3-D views; every view splits a dimension or merges those of a tensor just made contiguous, and the
    # mask is repeated per group of rows instead of broadcast over a view of the scores: torch.export then needs
    # no guard on the symbolic lengths (views of torch.matmul's 4-D output or of a broadcast sum do).
    q = query.contiguous().view(B * Hkv, g * T, D)                    # row j*T + t: head kv*g + j, token t
    k = key.contiguous().view(B * Hkv, L, D)
    scores = (torch.bmm(q, k.transpose(1, 2)) * scaling).view(B, Hkv, g * T, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        m = attention_mask
        scores = scores + (torch.cat([m] * g, dim=2) if m.shape[1] == 1 else m.reshape(B, Hkv, g * T, L))
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.bmm(probs.view(B * Hkv, g * T, L), value.contiguous().view(B * Hkv, L, D))
    out = out.view(B, Hkv, g, T, D).permute(0, 3, 1, 2, 4).contiguous().view(B, T, Hq, D)
    return out, probs.view(B, Hkv, g, T, L).flatten(1, 2)


def use_grouped_attention(model_or_config) -> None:
    """Register the function (once) and select it on a transformers model or config."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, grouped_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg._attn_implementation = IMPLEMENTATION
