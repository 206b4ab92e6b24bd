"""The trainable slice: LoRA adapters on frozen linear layers, exposed as a plain dict of named tensors.

A small own module rather than `peft`: the exporter needs each adapter as two plain MatMul operands with a
stable name (``<module path>.lora_A`` [in, r] and ``.lora_B`` [r, out]) that it can lift into ONNX graph inputs;
peft's wrapper adds dropout/merging/multi-adapter indirection that torch.export traces into the graph and
that the runtime would have to reproduce. y = base(x) + (x @ A @ B) * alpha / r.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
from torch import nn

from absorber.config import LoraConfig
from absorber.errors import AbsorberError

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update. B starts at zero: the adapter is the identity."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        w = base.weight
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
        in_f, out_f = (w.shape[1], w.shape[0]) if isinstance(base, nn.Linear) else (w.shape[0], w.shape[1])
        a = torch.randn(in_f, rank, generator=generator, dtype=w.dtype) / math.sqrt(in_f)   # CPU generator:
        self.lora_A = nn.Parameter(a.to(w.device))                                          # same A on any device
        self.lora_B = nn.Parameter(torch.zeros(rank, out_f, dtype=w.dtype, device=w.device))
        self.scaling = alpha / rank
        self.enabled = True
        # LoraConfig.protect (absorber/protect.py): [in, k] orthonormal directions the adapter does not read
        self.register_buffer("protect_U", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        xa = x @ self.lora_A
        if self.protect_U is not None:     # (x - x U U^T) A: the adapter reads x off the protected subspace
            xa = xa - (x @ self.protect_U) @ (self.protect_U.T @ self.lora_A)
        return self.base(x) + (xa @ self.lora_B) * self.scaling


class SparseValues(nn.Module):
    """A frozen MLP down-projection plus trainable *value vectors* of a few of its neurons (LoraConfig.sparse):
    the FFN-as-key-value-memory view (Geva et al. 2021) of sparse memory finetuning (Lin et al. 2025,
    arXiv 2510.15103), where only the memory slots a new text uses more than background text are trained.

    y = base(x) + x @ delta + x[..., idx] @ sparse_V, with x the [.., I] neuron activations. `sparse_V` [t, out]
    is this round's trainable values of the t neurons `idx`; `sparse_delta` [I, out] (frozen, a parameter only so
    that snapshot/load_state carry it) holds what earlier rounds committed. `commit(idx)` adds V into delta at
    the old idx, zeroes V and moves it to the new neurons. `access` counts, per neuron, the background tokens
    (the anchor text, then every absorbed X) whose top-`ACCESS_TOP` activations included it: the idf of the
    selection (absorb.Absorption.select_sparse)."""

    def __init__(self, base: nn.Module, t: int):
        super().__init__()
        self.base = base
        w = base.weight
        out_f, in_f = w.shape
        if not 0 < t <= in_f:
            raise AbsorberError(f"LoRA sparse must be in 1..{in_f} neurons (got {t})")
        self.sparse_V = nn.Parameter(torch.zeros(t, out_f, dtype=w.dtype, device=w.device))
        self.sparse_delta = nn.Parameter(torch.zeros(in_f, out_f, dtype=w.dtype, device=w.device),
                                         requires_grad=False)
        self.register_buffer("idx", torch.arange(t, device=w.device), persistent=False)
        self.register_buffer("access", torch.zeros(in_f, dtype=torch.float64, device=w.device), persistent=False)
        self.background_tokens = 0
        self.committed = False     # delta is nonzero: the dense term runs
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        out = self.base(x) + x.index_select(-1, self.idx) @ self.sparse_V
        return out + x @ self.sparse_delta if self.committed else out

    @torch.no_grad()
    def commit(self, idx: torch.Tensor) -> None:
        """Fold this round's values into delta and train the neurons `idx` next (V starts at zero there)."""
        if bool(self.sparse_V.any()):
            self.sparse_delta.index_add_(0, self.idx, self.sparse_V)
            self.committed = True
        self.sparse_V.zero_()
        self.idx = idx.to(self.idx.device)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the frozen layer with no background counted (a fresh stream)."""
        self.sparse_V.zero_()
        self.sparse_delta.zero_()
        self.committed = False
        self.access.zero_()
        self.background_tokens = 0


ACCESS_TOP = 64    # a token "accesses" the neurons with its ACCESS_TOP largest |activations| (of 1536 in SmolLM2)


def access_counts(acts: torch.Tensor, top: int = ACCESS_TOP) -> torch.Tensor:
    """Per neuron, how many of the [T, I] activation rows have it among their `top` largest magnitudes."""
    k = min(top, acts.shape[-1])
    ids = acts.reshape(-1, acts.shape[-1]).abs().topk(k, dim=-1).indices.reshape(-1)
    return torch.bincount(ids, minlength=acts.shape[-1]).to(torch.float64)


def tfidf_select(tf: torch.Tensor, access: torch.Tensor, background_tokens: int, t: int) -> torch.Tensor:
    """The t neurons with the highest tf x idf: tf = this text's access counts, idf = log((B + 1) / (df + 1))
    with df the background's access counts over B tokens (a neuron every text uses scores ~0)."""
    idf = torch.log((background_tokens + 1.0) / (access + 1.0))
    return (tf * idf).topk(t).indices


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter is switched off inside the block."""
    from absorber.prefix_kv import PrefixKV
    mods = [m for m in model.modules() if isinstance(m, (LoraLinear, SparseValues, PrefixKV))]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


@contextlib.contextmanager
def read_scaled(model: nn.Module, scale: float) -> Iterator[None]:
    """Answer with every LoRA path's contribution times `scale` inside the block (the adapters as trained, read
    weaker or stronger: a scoring option of the retention study, absorber.retention; the weights are untouched)."""
    mods = [m for m in model.modules() if isinstance(m, LoraLinear)]
    was = [m.scaling for m in mods]
    for m in mods:
        m.scaling = m.scaling * scale
    try:
        yield
    finally:
        for m, s in zip(mods, was):
            m.scaling = s


def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def inject(model: nn.Module, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Wrap the target linear layers of `model` in place; return the adapters {name: parameter}.

    Everything else stays frozen. Raises AbsorberError when a target or layer matches nothing. With
    cfg.sparse > 0 the slice is SparseValues on the `down_proj` of the selected layers instead, with cfg.prefix_kv > 0
    a trained KV prefix in every attention layer (absorber/prefix_kv.py; both reference only).
    """
    if cfg.sparse > 0:
        return _inject_sparse(model, cfg)
    if cfg.prefix_kv > 0:
        from absorber import prefix_kv
        prefix_kv.inject(model, cfg.prefix_kv)
        return adapters(model)
    cfg_layers = set(cfg.layers) if cfg.layers is not None else None
    g = torch.Generator().manual_seed(cfg.seed)
    found: list[tuple[str, nn.Module]] = []
    seen_targets: set[str] = set()
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in cfg.targets or isinstance(mod, LoraLinear):
            continue
        if not (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"):
            continue
        li = _layer_index(name)
        if li is None or (cfg_layers is not None and li not in cfg_layers):
            continue
        found.append((name, mod))
        seen_targets.add(leaf)
    missing = set(cfg.targets) - seen_targets
    if missing:
        raise AbsorberError(f"LoRA target(s) not found in the model: {', '.join(sorted(missing))}")
    if not found:
        raise AbsorberError("LoRA selection matches no layer")
    for name, mod in found:
        parent_name, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), leaf, LoraLinear(mod, cfg.rank, cfg.alpha, g))
    return adapters(model)


def _inject_sparse(model: nn.Module, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    cfg_layers = set(cfg.layers) if cfg.layers is not None else None
    found = [(name, mod) for name, mod in model.named_modules()
             if name.rsplit(".", 1)[-1] == "down_proj" and isinstance(mod, nn.Linear)
             and (li := _layer_index(name)) is not None and (cfg_layers is None or li in cfg_layers)]
    if not found:
        raise AbsorberError("LoRA sparse needs MLP down_proj layers; the model (or the layer selection) has none")
    for name, mod in found:
        parent_name, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), leaf, SparseValues(mod, cfg.sparse))
    return adapters(model)


def sparse_modules(model: nn.Module) -> dict[str, SparseValues]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseValues)}


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters of a model, by name, in a stable order (with LoraConfig.sparse: each layer's
    trainable values and its frozen committed delta)."""
    return {n: p for n, p in model.named_parameters()
            if n.endswith((".lora_A", ".lora_B", ".sparse_V", ".sparse_delta", ".prefix_key", ".prefix_value"))}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the adapters (to save, compare, or roll back)."""
    return {n: p.detach().clone() for n, p in adapters(model).items()}


@torch.no_grad()
def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter values into the model (names and shapes must match)."""
    params = adapters(model)
    if set(params) != set(state):
        raise AbsorberError("adapter names do not match the model's LoRA slice")
    for n, p in params.items():
        if tuple(state[n].shape) != tuple(p.shape):
            raise AbsorberError(f"adapter {n}: shape {tuple(state[n].shape)} != {tuple(p.shape)}")
        p.copy_(state[n])
    for m in sparse_modules(model).values():   # a sparse slice's selection state follows its values
        m.committed = bool(m.sparse_delta.any())
        if not m.committed and not bool(m.sparse_V.any()):
            m.reset()
    from absorber.prefix_kv import mark_filled
    mark_filled(model)


def describe(model: nn.Module, cfg: LoraConfig) -> list[dict]:
    """One record per adapter tensor: name, shape, dtype, target, layer (for manifests)."""
    return [{"name": n, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
             "target": n.rsplit(".", 2)[-2], "layer": _layer_index(n), "scaling": cfg.scaling}
            for n, p in adapters(model).items()]
