"""A protected subspace for the adapters (LoraConfig.protect): ordinary text should barely reach them.

The damage the retention screens measure (benchmarks/retention.md) is the adapters changing what an unrelated
text sees. AlphaEdit (arXiv 2410.02355) edits facts into a weight W by an update ΔW that is zero on the keys of
knowledge to preserve: it projects ΔW onto the null space of K0 K0^T, K0 = W's inputs on background text. Here
the same for every LoRA layer: the background's uncentered second moment C = Σ x x^T of the layer's inputs
(the frozen model, no adapters) gives its top principal directions U [in, k], k = protect × in, and the adapter
reads (x − x U U^T): y = base(x) + (x − x U U^T) A B × scaling (lora.LoraLinear). On inputs that lie in the
background's span the adapter is ~silent; what is new in a stream (names, numbers, its own topics) passes.

The background is the frozen model's own text, sampled from its beginning-of-text token (its prior over ordinary
text, not any evaluation text) plus the anchor text (absorber/anchor.txt). Reference only: the exporter refuses it.
Measured (benchmarks/retention.md, "Four more levers"): it slides along the retention-damage frontier — an unrelated
speech, the stream and the planted statements leave the same share of their inputs off the background's span, so
what it removes acts like a lower learning rate. `background_rows` also feeds AbsorberConfig.anchor_sampled (a KL
anchor on these samples) and calibrate.
"""
from __future__ import annotations

import torch
from torch import nn

from absorber import lora

SAMPLE_ROWS = 16      # background samples of protect_tokens / SAMPLE_ROWS tokens each


@torch.no_grad()
def background_rows(model: nn.Module, tok, tokens: int, seed: int = 0, anchor: bool = True,
                    row: int | None = None) -> list[list[int]]:
    """~`tokens` ids of background text: the anchor text (unless `anchor` is False), then the frozen model's own
    samples (top-p 0.95 from its BOS token, fixed seed, one batch; the global RNG is left as it was), SAMPLE_ROWS
    of them or, with `row`, as many as needed of `row` tokens each."""
    from absorber.config import anchor_text
    rows = [tok.encode(anchor_text(), add_special_tokens=False)] if anchor else []
    left = max(tokens - sum(map(len, rows)), 0)
    if left:
        n = -(-left // row) if row else min(SAMPLE_ROWS, max(1, left // 8))
        length = row or -(-left // n)
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        dev = next(model.parameters()).device
        ids = torch.full((n, 1), int(start), dtype=torch.long, device=dev)
        with torch.random.fork_rng(devices=[]), lora.disabled(model):
            torch.manual_seed(seed)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95,
                                 temperature=1.0, max_new_tokens=length, min_new_tokens=length,
                                 pad_token_id=int(start))
        rows += [r[1:].tolist() for r in out]
    return rows


@torch.no_grad()
def second_moments(model: nn.Module, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per LoRA layer, Σ x x^T [in, in] (float64) of its inputs over the rows, adapters off."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, lora.LoraLinear)}
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    dev = next(model.parameters()).device
    try:
        with lora.disabled(model):
            for r in rows:
                if len(r) >= 2:
                    model(input_ids=torch.tensor([r], device=dev), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return grams


def top_directions(gram: torch.Tensor, fraction: float) -> torch.Tensor:
    """The round(fraction × in) eigenvectors of the largest eigenvalues of a [in, in] second moment: [in, k]."""
    k = int(round(fraction * gram.shape[0]))
    _, vecs = torch.linalg.eigh(gram)          # ascending eigenvalues
    return vecs[:, gram.shape[0] - k:]


@torch.no_grad()
def protect(model: nn.Module, tok, fraction: float, tokens: int, seed: int = 0) -> dict[str, int]:
    """Set every LoRA layer's protected directions from background text; {layer: k}. fraction 0 clears them."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, lora.LoraLinear)}
    if fraction <= 0:
        for m in mods.values():
            m.protect_U = None
        return {n: 0 for n in mods}
    grams = second_moments(model, background_rows(model, tok, tokens, seed))
    out: dict[str, int] = {}
    for n, m in mods.items():
        u = top_directions(grams[n], fraction)
        m.protect_U = u.to(dtype=m.lora_A.dtype, device=m.lora_A.device)
        out[n] = u.shape[1]
    return out


def residual_energy(gram: torch.Tensor, u: torch.Tensor) -> float:
    """The share of Σ |x|^2 that is left off the directions u: 1 − tr(U^T C U) / tr(C)."""
    u = u.to(gram.dtype)
    return float(1.0 - torch.trace(u.T @ gram @ u) / torch.trace(gram))
