"""Removing what the adapters add to every prediction whatever the context (AbsorberConfig.calibrate).

A hypothesis about the retention screens' damage (an unrelated speech's perplexity under the adapters): that it is
a context-free shift of the output distribution — after a stream of State of the Union text the adapters raise
" Americans", " President", " Congress", dashes, ... everywhere. The shift is measured on background text — the
frozen model's own samples, no context (absorber/protect.py: background_rows) — as delta[v] = mean over positions
of (log p_adapted(v) - log p_frozen(v)), and subtracted from the adapted logits wherever the model predicts
(answering, generation, scoring): contextual calibration (Zhao et al. 2021, arXiv 2102.09690) with the frozen
model as the reference. Training never sees it (the rounds, the teacher and the update run uncorrected); it is
re-measured after every round.

Measured (benchmarks/retention.md, "What the damage is made of"): it does not help. On the same adapters it
raises the held-out damage (+27.8 -> +41.8 %, +50.5 -> +62.1 % on two speeches at the shipped window) and keeps
retention where it was: the shift is largely register the unrelated speech shares. A reference option for the
record; the exporter refuses it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from absorber import lora


class Calibration:
    """Holds delta for one adapted model and subtracts it from its LM head's output while active."""

    def __init__(self, model: nn.Module, rows: list[list[int]]):
        if not rows:
            raise ValueError("calibration needs background rows")
        self.model, self.rows = model, [r for r in rows if len(r) >= 2]
        self.shift: torch.Tensor | None = None
        self._base_mean: torch.Tensor | None = None
        self._on = True
        old = getattr(model, "_absorber_calibration", None)
        if old is not None:             # a model reused for another stream (evaluate.ModelPool): one hook only
            old.detach()
        self._handle = model.get_output_embeddings().register_forward_hook(self._hook)
        model._absorber_calibration = self

    def _hook(self, mod, inp, out):
        if self._on and self.shift is not None:
            return out - self.shift.to(out.dtype)
        return out

    def detach(self) -> None:
        self._handle.remove()
        if getattr(self.model, "_absorber_calibration", None) is self:
            del self.model._absorber_calibration

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """The model uncorrected inside the block (training, the teacher, the measurement itself)."""
        was, self._on = self._on, False
        try:
            yield
        finally:
            self._on = was

    @torch.no_grad()
    def _mean_logprobs(self) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        total, count = None, 0
        for r in self.rows:
            ids = torch.tensor([r], device=dev)
            lp = torch.log_softmax(self.model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            s = lp.double().sum(0)
            total = s if total is None else total + s
            count += lp.shape[0]
        return (total / count).float()

    @torch.no_grad()
    def update(self) -> None:
        """Re-measure delta with the adapters as they are now (the frozen model's mean is measured once)."""
        with self.off():
            if self._base_mean is None:
                with lora.disabled(self.model):
                    self._base_mean = self._mean_logprobs()
            self.shift = self._mean_logprobs() - self._base_mean
