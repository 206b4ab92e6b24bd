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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (x @ self.lora_A @ self.lora_B) * self.scaling


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter is switched off inside the block."""
    mods = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def inject(model: nn.Module, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Wrap the target linear layers of `model` in place; return the adapters {name: parameter}.

    Everything else stays frozen. Raises AbsorberError when a target or layer matches nothing.
    """
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


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters of a model, by name, in a stable order."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


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


def describe(model: nn.Module, cfg: LoraConfig) -> list[dict]:
    """One record per adapter tensor: name, shape, dtype, target, layer (for manifests)."""
    return [{"name": n, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
             "target": n.rsplit(".", 2)[-2], "layer": _layer_index(n), "scaling": cfg.scaling}
            for n, p in adapters(model).items()]
