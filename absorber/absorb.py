"""One absorption round: AdamW on the adapters for at most K steps, early stop under eps, NaN rollback.

The optimizer (and its moments) persists across rounds (unless cfg.reset says otherwise): absorbed knowledge
accumulates in the adapters. The teacher is the base model with X in context (cfg.teacher="base", the default),
or the updated model (teacher="current", the paper's W <- W*, which drifts over rounds: benchmarks/eval.md).
"""
from __future__ import annotations

import time
import warnings
from contextlib import nullcontext as _nullcontext

import torch
from torch import nn

from absorber import lora, sync
from absorber.config import AbsorberConfig
from absorber.replay import Replay
from absorber.rounds import RoundResult


class Absorption:
    """Owns the adapters' optimizer; `round(x, y)` absorbs X using Y as the synchronized text."""

    def __init__(self, model: nn.Module, cfg: AbsorberConfig, method: str = "absorber"):
        if method not in ("absorber", "ttt"):
            raise ValueError(f"unknown training method {method!r}")
        self.model, self.cfg, self.method = model, cfg, method
        self.params = [p for p in lora.adapters(model).values() if p.requires_grad]   # (a sparse slice's
        # committed delta is frozen: only this round's values train)
        if not self.params:
            raise ValueError("the model has no LoRA adapters: call absorber.lora.inject first")
        self.layers = sync.loss_layers(model, cfg.loss_layers)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)
        self.rounds = 0
        self.rollbacks = 0
        self.initial = [p.detach().clone() for p in self.params] if cfg.reset == "adapters" else None
        # what `decay` scales: every lora_B, or a sparse slice's committed values
        self.b_params = [p for n, p in lora.adapters(model).items() if n.endswith((".lora_B", ".sparse_delta"))]
        self.probe_prefix: list[int] = []    # token ids of config.PROBE_PREFIX (set by the streaming loop)
        self.gen_prompts: list[list[int]] = []   # cfg.probe_gen: ids of config.GEN_PROBE_PROMPTS (idem)
        self.prefix: list[int] = []          # cfg.prefix: the stream's first tokens (set by the streaming loop)
        self.anchor_ids: list[int] = []      # cfg.anchor: the replay text's ids (set by the streaming loop)
        self.anchor_rows: list[list[int]] = []   # cfg.anchor_sampled: the frozen model's own samples, one per
        self._anchor_step = 0                    # step in turn (set by the streaming loop; replaces anchor_ids)
        self._anchor_targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ttt_context: torch.Tensor | None = None   # cfg.ttt_context / ntp_context: the end of the previous
                                                        # round's X
        self._ntp_keep: torch.Tensor | None = None      # cfg.ntp_top: the round's mask of X's scored tokens
        self.background_ids: list[int] = []  # cfg.lora.sparse: the selection's first background (set by the loop)
        self.replay = Replay(cfg.replay, cfg.replay_mode, cfg.replay_tokens, cfg.lora.seed)   # cfg.replay
        self.cloze_tokens: dict = {}         # cfg.cloze: absorber.cloze's token sets and frame ids (set by the loop)

    @torch.no_grad()
    def _before_round(self) -> None:
        """The anti-drift options of AbsorberConfig (reset, decay), applied before the teacher pass."""
        cfg = self.cfg
        if cfg.reset == "adapters":
            for p, v in zip(self.params, self.initial):
                p.copy_(v)
        if cfg.reset in ("adapters", "moments"):
            self.opt.state.clear()
        if cfg.decay > 0:
            for p in self.b_params:
                p.mul_(1.0 - cfg.decay)

    @torch.no_grad()
    def _down_proj_inputs(self, ids: torch.Tensor, base: bool) -> dict[str, torch.Tensor]:
        """Each sparse layer's neuron activations [T, I] on `ids` (no context)."""
        mods = lora.sparse_modules(self.model)
        acts: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: acts.__setitem__(name, inp[0][0].detach()))
                 for name, m in mods.items()]
        try:
            with lora.disabled(self.model) if base else _nullcontext():
                self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        return acts

    @torch.no_grad()
    def select_sparse(self, x: torch.Tensor) -> None:
        """cfg.lora.sparse: commit last round's values, then pick the neurons this X uses most against the
        background (tf-idf per layer; lora.tfidf_select), and count X into the background afterwards."""
        mods = lora.sparse_modules(self.model)
        if not mods:
            return
        if all(m.background_tokens == 0 for m in mods.values()) and self.background_ids:
            bg = torch.tensor([self.background_ids], device=x.device)
            for name, a in self._down_proj_inputs(bg, base=True).items():
                mods[name].access += lora.access_counts(a)
                mods[name].background_tokens += a.shape[0]
        for name, a in self._down_proj_inputs(x, base=False).items():
            m = mods[name]
            tf = lora.access_counts(a)
            m.commit(lora.tfidf_select(tf, m.access, m.background_tokens, m.sparse_V.shape[0]))
            m.access += tf
            m.background_tokens += a.shape[0]
        self.opt.state.clear()     # fresh moments: the values now belong to other neurons

    def _prefix_tensor(self, like: torch.Tensor) -> torch.Tensor | None:
        if not self.prefix:
            return None
        return torch.tensor([self.prefix], dtype=like.dtype, device=like.device)

    def anchor_target(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(anchor ids [1, A], the base model's hidden states [layers, A, H] and next-token log-probabilities
        [A, V] on them, no context): computed once per anchor text. With sampled rows, each call takes the
        next row."""
        row = 0
        if self.anchor_rows:
            row = self._anchor_step % len(self.anchor_rows)
            self._anchor_step += 1
        ids = torch.tensor([self.anchor_rows[row] if self.anchor_rows else self.anchor_ids], device=device)
        if row not in self._anchor_targets:
            with torch.no_grad(), lora.disabled(self.model):
                hs, logits = sync.forward_states(self.model, ids, self.layers, with_logits=True)
                self._anchor_targets[row] = (hs, torch.log_softmax(logits.float(), -1))
        return (ids, *self._anchor_targets[row])

    def _loss(self, x: torch.Tensor, y: torch.Tensor, t: sync.Teacher | None) -> torch.Tensor:
        cfg = self.cfg
        if self.method == "ttt":
            ctx = self._ttt_context
            return sync.next_token_loss(self.model, x, ctx if ctx is not None and ctx.shape[1] else None)
        pre = self._prefix_tensor(y)
        yy = y if pre is None else torch.cat([pre, y], dim=1)
        hs, logits = sync.forward_states(self.model, yy, self.layers, with_logits=cfg.kl_weight > 0)
        if pre is not None:   # the loss is over Y's positions only; the prefix is the student's sink
            m = y.shape[1]
            hs, logits = hs[:, -m:], (logits[-m:] if logits is not None else None)
        loss = sync.sync_loss(hs, t.hidden, cfg.loss, logits, t.logprobs, cfg.kl_weight, cfg.sync_skip)
        if (cfg.anchor > 0 or cfg.anchor_kl > 0) and (self.anchor_ids or self.anchor_rows):
            a_ids, a_t, a_lp = self.anchor_target(y.device)
            a_hs, a_logits = sync.forward_states(self.model, a_ids, self.layers, with_logits=cfg.anchor_kl > 0)
            if cfg.anchor > 0:
                loss = loss + cfg.anchor * sync.sync_loss(a_hs, a_t, cfg.loss, skip=cfg.sync_skip)
            if cfg.anchor_kl > 0:
                loss = loss + cfg.anchor_kl * sync.kl_base_student(a_lp, a_logits)
        if cfg.ntp_weight > 0:   # write X itself into the adapters (TTT's term) beside the sync on Y
            ctx = self._ttt_context if cfg.ntp_context > 0 else None
            ctx = ctx if ctx is not None and ctx.shape[1] else None
            skip = 0
            if ctx is None and self.prefix:       # X after the fixed prefix (cfg.bos, cfg.prefix) as in the window,
                ctx, skip = self._prefix_tensor(x), 1   # scoring the same tokens as without it: X[1:]
            per_token = sync.next_token_loss(self.model, x, ctx, reduction="none")[skip:]
            kept = per_token if self._ntp_keep is None else per_token[self._ntp_keep]
            loss = loss + cfg.ntp_weight * kept.mean()
            old = self._replay_slice(x) if cfg.replay_steps == 0 else None
            if old is not None:   # cfg.replay: the same term on an earlier X (after the prefix, as X above)
                ctx = self._prefix_tensor(old)
                per_token = sync.next_token_loss(self.model, old, ctx, reduction="none")[1 if ctx is not None else 0:]
                loss = loss + cfg.ntp_weight * per_token.mean()
        return loss

    def _replay_slice(self, like: torch.Tensor) -> torch.Tensor | None:
        """The next replayed text (cfg.replay; absorber.replay.Replay.next) as ids [1, T] (None: nothing kept)."""
        old = self.replay.next()
        return None if old is None else torch.tensor([old], dtype=like.dtype, device=like.device)

    @torch.no_grad()
    def _frozen_nll(self, x: torch.Tensor) -> torch.Tensor:
        """Each of X's tokens after the first: its NLL for the frozen model (adapters off), X before it in context."""
        with lora.disabled(self.model):
            return sync.next_token_loss(self.model, x, reduction="none")

    def _ntp_mask(self, x: torch.Tensor) -> torch.Tensor:
        """cfg.ntp_top: X's most surprising tokens for the frozen model (no context); once per round."""
        return sync.surprising(self._frozen_nll(x), self.cfg.ntp_top)

    @torch.no_grad()
    def cloze_text(self, x: torch.Tensor) -> torch.Tensor:
        """cfg.cloze: X followed by its cloze probes (absorber.cloze; each token's surprise for the frozen model
        with the X before it in context; cfg.cloze_gen: each question the frozen model's own), [1, n + probes'
        tokens]: the next-token term's text."""
        from absorber import cloze
        if not self.cloze_tokens:
            raise ValueError("cloze probes need the tokenizer's token sets (the streaming loop sets them)")
        ids, t = x[0].tolist(), self.cloze_tokens
        out = list(ids)
        for a, at, b in cloze.choose(ids, [0.0] + self._frozen_nll(x).tolist(), t["ends"], t["starts"], t["caps"],
                                     self.cfg.cloze):
            q = self._generated_question(ids[a:b], x) if self.cfg.cloze_gen > 0 else None
            out += cloze.probe(ids, a, at, b, t, q)
        return torch.tensor([out], dtype=x.dtype, device=x.device)

    @torch.no_grad()
    def _generated_question(self, sentence: list[int], like: torch.Tensor) -> list[int] | None:
        """cfg.cloze_gen: the question the frozen model writes about `sentence` (absorber.cloze.GEN_PROMPT),
        greedy, up to its first "?" (None: none written)."""
        from absorber import cloze
        t = self.cloze_tokens
        p = torch.tensor([list(t["gen_before"]) + sentence + list(t["gen_after"])], dtype=like.dtype,
                         device=like.device)
        with lora.disabled(self.model):
            out = self.model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=self.cfg.cloze_gen,
                                      do_sample=False, repetition_penalty=1.2, pad_token_id=0)
        return cloze.question_ids(out[0, p.shape[1]:].tolist(), t["qmarks"])

    def _save(self):
        return ([p.detach().clone() for p in self.params],
                {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                 for k, v in self.opt.state.items()})

    @torch.no_grad()
    def _restore(self, saved) -> None:
        values, state = saved
        for p, v in zip(self.params, values):
            p.copy_(v)
        self.opt.state.clear()
        for k, v in state.items():
            self.opt.state[k] = v

    def probe_ids(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The round's recall probes (cfg.probes): X cut into that many parts, each after the probe prefix; with
        cfg.probe_gen, each prompt followed by the base model's own greedy continuation with X in context."""
        from absorber.config import probe_parts
        if self.cfg.probe_gen > 0:
            return [self._generated_probe(x, prompt) for prompt in self.gen_prompts[:self.cfg.probes]]
        pre = torch.tensor([self.probe_prefix], dtype=x.dtype, device=x.device).reshape(1, -1)
        return [torch.cat([pre, x[:, a:b]], dim=1) for a, b in probe_parts(x.shape[1], self.cfg.probes)]

    @torch.no_grad()
    def _generated_probe(self, x: torch.Tensor, prompt: list[int]) -> torch.Tensor:
        """prompt + what the base model (adapters off) writes after (prefix)·X·prompt: [1, len(prompt) + G]."""
        p = torch.tensor([prompt], dtype=x.dtype, device=x.device)
        pre = self._prefix_tensor(x)
        ctx = torch.cat(([pre] if pre is not None else []) + [x, p], dim=1)
        with lora.disabled(self.model):
            out = self.model.generate(ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=self.cfg.probe_gen,
                                      min_new_tokens=self.cfg.probe_gen, do_sample=False, repetition_penalty=1.3,
                                      pad_token_id=0)
        return torch.cat([p, out[:, ctx.shape[1]:]], dim=1)

    def _teacher(self, x: torch.Tensor, y: torch.Tensor) -> sync.Teacher:
        cfg = self.cfg
        return sync.teacher(self.model, x, y, self.layers, with_logprobs=cfg.kl_weight > 0,
                            base=cfg.teacher == "base", gamma=cfg.gamma if cfg.teacher == "compose" else None,
                            prefix_ids=self._prefix_tensor(x))

    def _steps(self, x: torch.Tensor, y: torch.Tensor, teacher: sync.Teacher | None,
               extra: int = 0) -> tuple[list[float], int, bool]:
        """Up to K AdamW steps on one synchronized text, then `extra` steps whose next-token term is on a kept X
        (cfg.replay_steps); (losses, steps, rolled back)."""
        cfg = self.cfg
        losses: list[float] = []
        rolled_back = False
        last_good = None
        steps = 0
        total = cfg.k + (extra if self.replay.kept else 0)
        for step in range(total + 1):
            xx = x if step < cfg.k or step == total else self._replay_slice(x)
            with torch.set_grad_enabled(step < total):   # the last evaluation only reports the loss
                loss = self._loss(xx, y, teacher)
            lv = float(loss.detach())
            if not torch.isfinite(loss):
                rolled_back = True
                if last_good is not None:
                    self._restore(last_good)   # undo the step that produced this loss;
                    steps -= 1                 # losses[-1] was measured at the restored values
                break
            losses.append(lv)
            if step == total or (cfg.eps > 0 and lv < cfg.eps and step < cfg.k):
                break
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in self.params]
            if not all(torch.isfinite(g).all() for g in grads):
                rolled_back = True
                break
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
            last_good = self._save()
            self.opt.step()
            steps += 1
        self.opt.zero_grad(set_to_none=True)
        return losses, steps, rolled_back

    def round(self, x: torch.Tensor, y: torch.Tensor, tokens_absorbed: int = 0,
              teacher: sync.Teacher | None = None) -> RoundResult:
        """x: [1, n] ids to absorb; y: [1, m] ids that follow. Returns the round's record.

        With cfg.probes, the recall probes are synchronized first (each up to K steps; every teacher is
        computed before the round's first step), then Y; the record's losses are Y's."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self._before_round()
        self.select_sparse(x)
        self._ntp_keep = (self._ntp_mask(x) if self.method == "absorber" and cfg.ntp_weight > 0 and cfg.ntp_top < 1
                          else None)
        targets: list[tuple[torch.Tensor, sync.Teacher | None]] = []
        if self.method == "absorber":
            targets = [(p, self._teacher(x, p)) for p in self.probe_ids(x)]
            targets.append((y, teacher if teacher is not None else self._teacher(x, y)))
        else:
            targets = [(y, None)]
        # the next-token term's text: X, or X and its cloze probes (the teacher above saw X alone)
        xn = self.cloze_text(x) if self.method == "absorber" and cfg.ntp_weight > 0 and cfg.cloze > 0 else x
        t1 = time.perf_counter()
        steps, rolled_back, losses = 0, False, []
        for i, (yy, tt) in enumerate(targets):
            losses, s, rolled_back = self._steps(xn, yy, tt, cfg.replay_steps if i == len(targets) - 1 else 0)
            steps += s
            if rolled_back:
                break
        if self.method == "ttt" and cfg.ttt_context > 0:
            self._ttt_context = x[:, -cfg.ttt_context:].detach().clone()
        elif self.method == "absorber" and cfg.ntp_context > 0:   # the hybrid's next-token term, same recipe
            self._ttt_context = x[:, -cfg.ntp_context:].detach().clone()
        if self.method == "absorber" and cfg.ntp_weight > 0:
            self.replay.keep(xn[0].tolist())
        if rolled_back:
            self.rollbacks += 1
            warnings.warn(f"round {self.rounds}: non-finite loss or gradient; step rolled back, round ended",
                          RuntimeWarning, stacklevel=2)
        self.rounds += 1
        t2 = time.perf_counter()
        return RoundResult(round=self.rounds, tokens_absorbed=tokens_absorbed,
                           loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                           steps=steps, seconds=t2 - t0, rolled_back=rolled_back,
                           teacher_seconds=t1 - t0, train_seconds=t2 - t1)
