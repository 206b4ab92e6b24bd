"""Causal synchronization: the model *without* X must reproduce, on Y, the hidden states it had *with* X·Y.

teacher = the model on X·Y, hidden states of the chosen layers at Y's positions, computed once per round without
gradients: the base model (adapters off; AbsorberConfig.teacher="base", the default) or the current one (base +
current adapters, "current": the paper's W <- W*). student = the same model on Y alone (positions restart
at 0). loss = mean |student - teacher| over layers, positions and features (L1, the paper's choice; L2 and an
added KL term on next-token distributions are kept for ablation).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from absorber.bundle_format import HEAD_CHUNKS


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Logits and losses in float32 at least: a float64 model stays float64 (the reference the export tests check
    the graphs' gradients against, tests/test_export.py)."""
    return t if t.dtype == torch.float64 else t.float()


def num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def loss_layers(model: nn.Module, chosen: tuple[int, ...] | None = None) -> list[int]:
    """hidden_states indices matched by the loss. Default 1..L: h^0 (the token embedding) does not depend on
    context, so it adds a constant zero that would only dilute the mean."""
    L = num_layers(model)
    idx = list(chosen) if chosen is not None else list(range(1, L + 1))
    bad = [i for i in idx if not 0 <= i <= L]
    if bad:
        from absorber.errors import AbsorberError
        raise AbsorberError(f"loss layer(s) {bad} out of range 0..{L}")
    return idx


def positions(length: int, start: int = 0, device=None) -> torch.Tensor:
    return torch.arange(start, start + length, device=device).unsqueeze(0)


def forward_states(model: nn.Module, ids: torch.Tensor, layers: list[int], position_ids: torch.Tensor | None = None,
                   with_logits: bool = False, stacked: bool = True):
    """Run the model on ids [1, T]; return (hidden states of `layers` stacked as [len(layers), T, H], logits|None).
    stacked=False: the states as a list of [T, H], one per layer (what the traced train step uses)."""
    if position_ids is None:
        position_ids = positions(ids.shape[1], device=ids.device)
    out = model(input_ids=ids, position_ids=position_ids, attention_mask=torch.ones_like(ids),
                output_hidden_states=True, use_cache=False, logits_to_keep=0 if with_logits else 1)
    hs = [out.hidden_states[i][0] for i in layers]
    return (torch.stack(hs) if stacked else hs), (out.logits[0] if with_logits else None)


@dataclass
class Teacher:
    hidden: torch.Tensor                 # [len(layers), m, H]
    logprobs: torch.Tensor | None = None  # [m, V] when a KL term is used


@torch.no_grad()
def teacher(model: nn.Module, x_ids: torch.Tensor, y_ids: torch.Tensor, layers: list[int],
            with_logprobs: bool = False, base: bool = False, gamma: float | None = None,
            prefix_ids: torch.Tensor | None = None) -> Teacher:
    """The model with X in context: its states at Y's positions (X·Y at positions 0..n+m-1).
    base=True: the base model (adapters switched off) is the teacher instead of the current one.
    gamma (the compositional teacher): h_base(X·Y) + gamma * (h_current(Y) - h_base(Y)) at Y's positions, Y
    alone at positions 0..m-1: the base model with X in context plus what the adapters add on Y without X.
    prefix_ids (AbsorberConfig.prefix): fixed sink tokens in front of X·Y (and of Y for the student)."""
    from absorber import lora
    ids = torch.cat([x_ids, y_ids], dim=1) if prefix_ids is None else torch.cat([prefix_ids, x_ids, y_ids], dim=1)
    m = y_ids.shape[1]
    with lora.disabled(model) if (base or gamma is not None) else contextlib.nullcontext():
        hs, logits = forward_states(model, ids, layers, with_logits=with_logprobs)
    hs = hs[:, -m:]
    if gamma is not None:
        if prefix_ids is not None:
            raise ValueError("the compositional teacher does not take a prefix yet")
        hs = compose_target(hs, *own_contribution(model, y_ids, layers), gamma)
        if with_logprobs:
            raise ValueError("the compositional teacher has no logits target (kl_weight must be 0)")
    lp = F.log_softmax(_f32(logits[-m:]), -1) if with_logprobs else None
    return Teacher(hs.contiguous(), lp)


@torch.no_grad()
def own_contribution(model: nn.Module, y_ids: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_current(Y), h_base(Y)): Y alone at positions 0..m-1, with the adapters and without."""
    from absorber import lora
    cur, _ = forward_states(model, y_ids, layers)
    with lora.disabled(model):
        base, _ = forward_states(model, y_ids, layers)
    return cur, base


def compose_target(base_xy: torch.Tensor, cur_y: torch.Tensor, base_y: torch.Tensor, gamma: float) -> torch.Tensor:
    """T = h_base(X·Y) + gamma * (h_current(Y) - h_base(Y)), elementwise over [layers, m, H]."""
    return base_xy + gamma * (cur_y - base_y)


def sync_loss(student: torch.Tensor, target: torch.Tensor, kind: str = "l1",
              student_logits: torch.Tensor | None = None, teacher_logprobs: torch.Tensor | None = None,
              kl_weight: float = 0.0, skip: int = 0) -> torch.Tensor:
    """Mean L1 (or L2) distance of hidden states [layers, m, H] over Y's positions skip..m-1, plus
    kl_weight * KL(teacher || student) per token (over the same positions)."""
    if skip:
        student, target = student[:, skip:], target[:, skip:]
        if student_logits is not None and teacher_logprobs is not None:
            student_logits, teacher_logprobs = student_logits[skip:], teacher_logprobs[skip:]
    d = student - target
    if kind == "l1n":   # per layer: mean |d| / mean |target|, then the mean over layers
        loss = (d.abs().mean(dim=(1, 2)) / target.abs().mean(dim=(1, 2)).clamp_min(1e-6)).mean()
    else:
        loss = d.abs().mean() if kind == "l1" else (d * d).mean()
    if kl_weight and student_logits is not None and teacher_logprobs is not None:
        loss = loss + kl_weight * kl_base_student(teacher_logprobs, student_logits)
    return loss


def kl_base_student(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position [T, V], averaged over positions."""
    s_lp = F.log_softmax(_f32(student_logits), -1)
    return (teacher_logprobs.exp() * (teacher_logprobs - s_lp)).sum(-1).mean()


def sync_loss_per_layer(student: list[torch.Tensor], target: torch.Tensor, kind: str = "l1",
                        skip: int = 0) -> torch.Tensor:
    """sync_loss (no KL term) with the student's states as one [m, H] tensor per layer, never stacked: each
    layer's distance is taken where that layer is computed. The same value (summed in another order, float
    rounding), and in the traced train step no [layers, m, H] stack of the student's states exists, so the
    per-layer recomputation of export/recompute.py can leave each layer's part of the loss to that layer."""
    terms = []
    for j, h in enumerate(student):
        d = h[skip:] - target[j, skip:]
        if kind == "l1n":
            terms.append(d.abs().mean() / target[j, skip:].abs().mean().clamp_min(1e-6))
        else:
            terms.append(d.abs().sum() if kind == "l1" else (d * d).sum())
    total = torch.stack(terms).sum()
    if kind == "l1n":
        return total / len(student)
    return total / (len(student) * student[0][skip:].numel())


class SyncLoss(nn.Module):
    """The student side as one module: forward(Y ids, Y positions, teacher hidden[, X ids]) -> loss.
    This is what the exporter traces into the train-step graph, so runtime and reference share one definition.
    ntp_weight > 0 (AbsorberConfig.ntp_weight with ntp_top = 1): + ntp_weight x the next-token loss of the student
    on X alone (positions 0..n-1), as absorber.absorb.Absorption._loss adds it.
    prefix (AbsorberConfig.bos: 1): the ids start with that many fixed tokens (the BOS) outside the loss: the
    student reads prefix.Y, teacher_hidden covers Y alone, and the next-token term reads prefix.X and scores
    X[1:], each token with the prefix in context (as the reference's term with the prefix as its context)."""

    def __init__(self, model: nn.Module, layers: list[int], kind: str = "l1", skip: int = 0,
                 ntp_weight: float = 0.0, prefix: int = 0):
        super().__init__()
        self.model, self.layers, self.kind, self.skip = model, list(layers), kind, skip
        self.ntp_weight, self.prefix = float(ntp_weight), int(prefix)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, teacher_hidden: torch.Tensor,
                x_ids: torch.Tensor | None = None) -> torch.Tensor:
        hs, _ = forward_states(self.model, input_ids, self.layers, position_ids, stacked=False)
        if self.prefix:
            hs = [h[self.prefix:] for h in hs]
        loss = sync_loss_per_layer(hs, teacher_hidden, self.kind, self.skip)
        if self.ntp_weight > 0:
            if x_ids is None:
                raise ValueError("SyncLoss with ntp_weight > 0 needs x_ids")
            loss = loss + self.ntp_weight * lean_next_token_loss(self.model, x_ids, skip=self.prefix)
        return loss




def head_in_pieces(model: nn.Module) -> bool:
    """lean_next_token_loss computes this model's head gradient in pieces: a frozen, bias-free head without
    logit soft-capping (else it takes the plain cross-entropy)."""
    head = model.get_output_embeddings()
    return not (getattr(head, "bias", None) is not None or getattr(model.config, "final_logit_softcapping", None)
                or not isinstance(getattr(head, "weight", None), torch.Tensor)
                or any(p.requires_grad for p in head.parameters()))


def lean_next_token_loss(model: nn.Module, ids: torch.Tensor, chunks: int = HEAD_CHUNKS,
                         skip: int = 0) -> torch.Tensor:
    """next_token_loss(model, ids)[skip:] (mean over ids[1 + skip:]; skip: the leading prefix's predictions left
    out, SyncLoss.prefix), written for a traced backward that holds no [T, V] tensor.

    The head's gradient is computed in the forward, a piece of X's positions at a time, from the final hidden
    states h [T-1, H] with autograd off (h.detach()): per piece, logits = h W^T, lse = logsumexp(logits),
    G = (softmax(logits) W - W[target]) / (T-1), which is d loss / d h exactly. The returned value is
    loss + sum(h * G) - sum(h * G).detach(): the same number (x - x is 0 in float), whose gradient reaching h is G.
    So the traced graph's backward starts at h with one [T-1, H] tensor instead of differentiating through the
    head, and a piece's [T/chunks, V] logits are freed before the next piece (the fused linear + cross-entropy
    of Liger-Kernel, arXiv 2410.10989, written in plain tensor ops so that torch.export traces it; the recompute
    rewrite keeps G instead of recomputing the head, export/recompute.py). Measured on SmolLM2 int4 at
    n=512, m=256: the round's peak 2778 -> 2548 MiB by itself; most of the rest was the order ONNX Runtime ran
    the weight gradients in (export/recompute.py's gates, 2548 -> 1386 MiB).
    The head must be frozen (no adapter on it): G is all the backward takes from it.
    The target logit is h . W[target] with the rows gathered by the ids themselves (a [T, H] gather, which the
    quantized graphs run on the packed rows). Heads this does not cover (a bias, logit soft-capping, a trainable
    head) take next_token_loss."""
    if not head_in_pieces(model):
        return next_token_loss(model, ids, reduction="none")[skip:].mean() if skip else next_token_loss(model, ids)
    head = model.get_output_embeddings()
    out = model.model(input_ids=ids, position_ids=positions(ids.shape[1], device=ids.device),
                      attention_mask=torch.ones_like(ids), use_cache=False)
    h = out.last_hidden_state[0, skip:-1]                   # [T-1-skip, H]: position t predicts ids[t+1]
    w = head.weight.detach()
    rows = _f32(F.embedding(ids, w)[0, 1 + skip:])        # W[ids[t+1]]
    hd = _f32(h.detach())
    t1 = hd.shape[0]
    size = (t1 + chunks - 1) // chunks
    piece = torch.arange(size, device=ids.device)
    lses, pws = [], []
    for c in range(chunks):       # a piece's rows by index (clamped: the last piece repeats the last row)
        logits = _f32(F.linear(hd[(piece + c * size).clamp(max=t1 - 1)], w))    # [size, V]
        lse = torch.logsumexp(logits, dim=-1)
        lses.append(lse)
        pws.append(torch.exp(logits - lse[:, None]) @ w)    # softmax(logits) W: [size, H]
    keep = torch.arange(t1, device=ids.device)             # the repeated rows are dropped
    lse = torch.cat(lses)[keep]
    grad = (torch.cat(pws)[keep] - rows) / t1                # d loss / d h
    value = (lse - (hd * rows).sum(-1)).mean()
    hg = (_f32(h) * grad).sum()
    return value + (hg - hg.detach())


def next_token_loss(model: nn.Module, ids: torch.Tensor, context: torch.Tensor | None = None,
                    reduction: str = "mean") -> torch.Tensor:
    """Plain language-model loss on ids (the TTT baseline trains the same adapters with it). With `context`
    [1, c], the ids follow it in the input and only the ids' tokens are scored (Temp-LoRA's recipe: each chunk
    conditioned on the text before it). reduction="none": one loss per scored token."""
    c = 0 if context is None else context.shape[1]
    full = ids if context is None else torch.cat([context, ids], dim=1)
    out = model(input_ids=full, position_ids=positions(full.shape[1], device=ids.device),
                attention_mask=torch.ones_like(full), use_cache=False)
    start = max(c - 1, 0)                     # the logit at c-1 predicts ids[0]
    return F.cross_entropy(_f32(out.logits[0, start:-1]), full[0, start + 1:], reduction=reduction)


def surprising(nll: torch.Tensor, top: float) -> torch.Tensor:
    """A mask [T] of the ceil(top x T) largest per-token NLLs (at least one)."""
    keep = max(1, math.ceil(top * nll.numel()))
    mask = torch.zeros_like(nll, dtype=torch.bool)
    mask[torch.topk(nll, keep).indices] = True
    return mask
