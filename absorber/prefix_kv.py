"""A trained KV prefix as the slice instead of LoRA (Cartridges, arXiv 2506.06266). Reference only.

Every decoder layer's attention gets p key/value slots [1, Hkv, p, D] in front of the real keys, which every query
may attend to (`absorber/attention.py` reads them; `LoraConfig.prefix_kv` = p). The slots hold post-rotary keys
at positions -p..-1, so the text keeps its positions 0.. and a prefix filled with the KV of tokens t answers exactly
as t in context before the text (tests/test_prefix_kv.py). As in Cartridges, the slots start from real text (the
frozen model's KV of its own sample, not random values) and the first slot, the sample's BOS, stays frozen as the
attention sink; the other p-1 slots train.

Why it is worth a screen (benchmarks/retention.md): LoRA changes how every token of every text is computed, so
what it learns from a stream (its register as much as its facts) reaches unrelated text too; a prefix is read
through attention only, so a query that does not attend to it is not changed by it.
"""
from __future__ import annotations

import torch
from torch import nn

from absorber.errors import AbsorberError

ATTRIBUTE = "absorber_prefix"     # the PrefixKV child of each attention module


class PrefixKV(nn.Module):
    """p key/value slots of one attention layer; slot 0 (the sink) is a buffer, slots 1..p-1 train."""

    def __init__(self, kv_heads: int, slots: int, head_dim: int):
        super().__init__()
        shape = (1, kv_heads, slots - 1, head_dim)
        self.register_buffer("sink_key", torch.zeros(1, kv_heads, 1, head_dim))
        self.register_buffer("sink_value", torch.zeros(1, kv_heads, 1, head_dim))
        self.prefix_key = nn.Parameter(torch.zeros(shape))
        self.prefix_value = nn.Parameter(torch.zeros(shape))
        self.enabled = True      # lora.disabled switches it off (the base model)
        self.filled = False      # until `fill`, attention ignores the slots

    @property
    def slots(self) -> int:
        return self.prefix_key.shape[2] + 1

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.sink_key, self.prefix_key], dim=2),
                torch.cat([self.sink_value, self.prefix_value], dim=2))

    def active(self) -> bool:
        return self.enabled and self.filled


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder layers' self-attention modules (those with a layer_idx), in layer order."""
    mods = [m for n, m in model.named_modules() if n.endswith("self_attn") and hasattr(m, "layer_idx")]
    return sorted(mods, key=lambda m: m.layer_idx)


def inject(model: nn.Module, slots: int) -> None:
    """Give every attention layer its PrefixKV (unfilled). The model must use absorber's grouped attention."""
    from absorber.attention import IMPLEMENTATION
    if getattr(model.config, "_attn_implementation", None) != IMPLEMENTATION:
        raise AbsorberError("prefix_kv needs the model's attention to be absorber's grouped attention "
                            "(absorber.attention.use_grouped_attention)")
    mods = attention_modules(model)
    if not mods:
        raise AbsorberError("prefix_kv: the model has no self-attention layers it recognizes")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dev = next(model.parameters()).device
    for m in mods:
        setattr(m, ATTRIBUTE, PrefixKV(cfg.num_key_value_heads, slots, head_dim).to(dev))


def modules(model: nn.Module) -> list[PrefixKV]:
    return [m for m in model.modules() if isinstance(m, PrefixKV)]


@torch.no_grad()
def fill(model: nn.Module, ids: list[int]) -> None:
    """Set every layer's slots to the frozen model's post-rotary KV of `ids` (len = slots) at positions -p..-1."""
    mods = attention_modules(model)
    pres = [getattr(m, ATTRIBUTE) for m in mods]
    p = pres[0].slots
    if len(ids) != p:
        raise AbsorberError(f"prefix_kv: {len(ids)} ids to fill {p} slots")
    for pk in pres:
        pk.enabled = False
    try:
        dev = pres[0].prefix_key.device
        t = torch.tensor([ids], device=dev)
        out = model(input_ids=t, position_ids=torch.arange(-p, 0, device=dev)[None], attention_mask=torch.ones_like(t),
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        for m, pk in zip(mods, pres):
            k, v = cache.layers[m.layer_idx].keys, cache.layers[m.layer_idx].values
            if k.shape[2] != p:     # a sliding-window layer keeps only its window
                raise AbsorberError(f"prefix_kv: {p} slots exceed layer {m.layer_idx}'s attention window "
                                    f"({k.shape[2]} tokens)")
            pk.sink_key.copy_(k[:, :, :1])
            pk.sink_value.copy_(v[:, :, :1])
            pk.prefix_key.copy_(k[:, :, 1:])
            pk.prefix_value.copy_(v[:, :, 1:])
            pk.filled = True
    finally:
        for pk in pres:
            pk.enabled = True


def fill_from_samples(model: nn.Module, tokenizer, seed: int = 0) -> None:
    """Fill the slots (once) from the frozen model's own sample: its start token, then p-1 sampled tokens."""
    pres = modules(model)
    if not pres or all(pk.filled for pk in pres):
        return
    from absorber.protect import background_rows
    p = pres[0].slots
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    row = background_rows(model, tokenizer, p - 1, seed, anchor=False, row=p - 1)[0][:p - 1]
    fill(model, [int(start)] + row)


def mark_filled(model: nn.Module) -> None:
    """After loading values (lora.load_state): a prefix counts as filled when its trained slots hold values (all
    zero: the state of a fresh inject, which `fill_from_samples` fills again)."""
    for pk in modules(model):
        pk.filled = bool(pk.prefix_key.any())


def prepend(module: nn.Module, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None):
    """(key, value, mask) with the module's prefix slots in front, when it has an active prefix."""
    pk = getattr(module, ATTRIBUTE, None)
    if pk is None or not pk.active():
        return key, value, attention_mask
    B = key.shape[0]
    pkey, pval = pk.key_value()
    key = torch.cat([pkey.to(key.dtype).expand(B, -1, -1, -1), key], dim=2)
    value = torch.cat([pval.to(value.dtype).expand(B, -1, -1, -1), value], dim=2)
    if attention_mask is not None:
        shape = (*attention_mask.shape[:-1], pk.slots)
        front = (torch.ones(shape, dtype=torch.bool, device=attention_mask.device) if attention_mask.dtype == torch.bool
                 else torch.zeros(shape, dtype=attention_mask.dtype, device=attention_mask.device))
        attention_mask = torch.cat([front, attention_mask], dim=-1)
    return key, value, attention_mask
