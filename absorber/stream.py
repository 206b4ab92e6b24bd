"""The streaming loop (the paper's Algorithm 2) and its baselines, at equal compute.

A window Z of at most n+m tokens. When it is full: X = Z[:n], Y = Z[n:n+m]; absorb X (method `absorber`:
causal synchronization; `ttt`: next-token loss on X; `window`: nothing); Z <- Z[n:]. Position ids restart at 0
inside the window every round, so an endless stream never walks past the model's trained positions. `sink`
keeps the first `cfg.sink` tokens of the stream in front of the window (StreamingLLM); `full` never evicts
until the model's context is full. Memory does not grow with stream length: the window is bounded and the
adapters have a fixed size.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from absorber import lora
from absorber.absorb import Absorption, RoundResult
from absorber.config import AbsorberConfig
from absorber.errors import AbsorberError

METHODS = ("absorber", "ttt", "window", "sink", "full")
CALIBRATION_ROW = 128      # tokens per background sample of cfg.calibrate


class StreamingAbsorber:
    """Feed tokens or text as they arrive; rounds run whenever the window overflows; ask at any time."""

    def __init__(self, model: nn.Module, tokenizer, cfg: AbsorberConfig | None = None, method: str = "absorber"):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        self.cfg = cfg or AbsorberConfig()
        self.cfg.validate()
        self.model, self.tokenizer, self.method = model, tokenizer, method
        old = getattr(model, "_absorber_calibration", None)
        if old is not None:                # a reused model (evaluate.ModelPool) calibrated by an earlier stream
            old.detach()
        self.calibration = None            # cfg.calibrate: absorber.calibrate.Calibration
        if method in ("absorber", "ttt"):
            if not lora.adapters(model):
                lora.inject(model, self.cfg.lora)
            if self.cfg.lora.prefix_kv > 0:
                if tokenizer is None:
                    raise AbsorberError("prefix_kv needs the tokenizer (its slots start from the model's own sample)")
                from absorber.prefix_kv import fill_from_samples
                fill_from_samples(model, tokenizer, self.cfg.lora.seed)
            # (filled before the Absorption exists: reset="adapters" restores the values it finds)
            self.absorption: Absorption | None = Absorption(model, self.cfg, method)
            if tokenizer is not None and self.cfg.probes:
                from absorber.config import PROBE_PREFIX
                self.absorption.probe_prefix = tokenizer.encode(PROBE_PREFIX, add_special_tokens=False)
            if tokenizer is not None and self.cfg.cloze:
                from absorber.cloze import token_sets
                self.absorption.cloze_tokens = token_sets(tokenizer)
            if tokenizer is not None and self.cfg.probe_gen:
                from absorber.config import GEN_PROBE_PROMPTS
                self.absorption.gen_prompts = [tokenizer.encode(t, add_special_tokens=False)
                                               for t in GEN_PROBE_PROMPTS]
            if tokenizer is not None and (self.cfg.anchor > 0 or self.cfg.anchor_kl > 0):
                from absorber.config import anchor_text
                ids = tokenizer.encode(anchor_text(), add_special_tokens=False)
                self.absorption.anchor_ids = ids[:self.cfg.anchor_tokens]
                if self.cfg.anchor_sampled > 0:
                    from absorber.protect import background_rows
                    self.absorption.anchor_rows = background_rows(
                        model, tokenizer, self.cfg.anchor_sampled, self.cfg.lora.seed, anchor=False,
                        row=self.cfg.anchor_tokens)
            if tokenizer is not None and self.cfg.lora.protect > 0 and any(
                    m.protect_U is None for m in model.modules() if isinstance(m, lora.LoraLinear)):
                from absorber.protect import protect     # once per adapted model (evaluate.ModelPool keeps it)
                protect(model, tokenizer, self.cfg.lora.protect, self.cfg.lora.protect_tokens, self.cfg.lora.seed)
            if tokenizer is not None and self.cfg.calibrate > 0:
                from absorber.calibrate import Calibration
                from absorber.protect import background_rows
                self.calibration = Calibration(model, background_rows(
                    model, tokenizer, self.cfg.calibrate, self.cfg.lora.seed, anchor=False, row=CALIBRATION_ROW))
            if tokenizer is not None and self.cfg.lora.sparse > 0:
                from absorber.config import anchor_text
                self.absorption.background_ids = tokenizer.encode(anchor_text(), add_special_tokens=False)
        else:
            self.absorption = None
        self.window: list[int] = []
        self.sink_tokens: list[int] = []   # the fixed tokens in front of the window: cfg.bos, then sink / prefix
        if self.cfg.bos:
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is None:
                raise AbsorberError("bos=True needs a tokenizer with a BOS token")
            self.sink_tokens.append(int(bos))
            if self.absorption is not None:
                self.absorption.prefix = list(self.sink_tokens)
        self.tokens_seen = 0
        self.tokens_absorbed = 0   # tokens that have left the window (absorbed, or dropped by the baselines)
        self.rounds: list[RoundResult] = []
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048))
        self.device = next(model.parameters()).device

    # ---------------------------------------------------------------- capacity
    @property
    def capacity(self) -> int:
        """Tokens the window may hold before a round runs."""
        if self.method == "full":
            return self.max_positions
        # the sink baseline's sink tokens count against n+m; an absorber's fixed prefix comes on top of them
        return self.cfg.n + self.cfg.m + (len(self.sink_tokens) if self.method != "sink" else 0)

    def context(self) -> list[int]:
        """The tokens the model sees now (sink tokens first for `sink`, and for cfg.prefix)."""
        return self.sink_tokens + self.window

    # ---------------------------------------------------------------- feeding
    def feed_tokens(self, ids: Iterable[int]) -> list[RoundResult]:
        """Append tokens; run a round each time the window is full. Returns the rounds that ran."""
        done: list[RoundResult] = []
        ids = list(ids)
        i = 0
        while i < len(ids):
            room = self.capacity - len(self.context())
            take = ids[i:i + max(room, 0)]
            keep = int(self.cfg.bos) + (self.cfg.sink if self.method == "sink"
                                        else (self.cfg.prefix if self.absorption else 0))
            if len(self.sink_tokens) < keep:
                take = ids[i:i + keep - len(self.sink_tokens)]
                self.sink_tokens.extend(take)
                if self.absorption is not None:
                    self.absorption.prefix = list(self.sink_tokens)
            else:
                self.window.extend(take)
            i += len(take)
            self.tokens_seen += len(take)
            if len(self.context()) >= self.capacity:
                done.append(self._round())
        return done

    def feed(self, text: str) -> list[RoundResult]:
        return self.feed_tokens(self.tokenizer.encode(text, add_special_tokens=False))

    def flush(self) -> list[RoundResult]:
        """End of stream (or a pause). With cfg.fill, complete Y with greedy continuations and absorb, as the
        paper does; otherwise wait (nothing happens until more tokens arrive)."""
        if not self.cfg.fill or self.method in ("window", "sink", "full") or len(self.window) <= self.cfg.n:
            return []
        need = self.cfg.n + self.cfg.m - len(self.window)
        fill = self._greedy(self.window, need)
        self.window.extend(fill)   # generated text is not "seen" stream
        return [self._round()]

    # ---------------------------------------------------------------- one round
    def _round(self) -> RoundResult:
        n, m = self.cfg.n, self.cfg.m
        if self.method == "full":   # context is full: drop the oldest n tokens (no absorption possible)
            self.window = self.window[n:]
            self.tokens_absorbed += n
            res = RoundResult(len(self.rounds) + 1, self.tokens_absorbed, None, None, 0, 0.0)
        elif self.absorption is None:   # window / sink: evict without absorbing
            self.window = self.window[n:]
            self.tokens_absorbed += n
            res = RoundResult(len(self.rounds) + 1, self.tokens_absorbed, None, None, 0, 0.0)
        else:
            x = torch.tensor([self.window[:n]], device=self.device)
            y = torch.tensor([self.window[n:n + m]], device=self.device)
            self.tokens_absorbed += n
            with self.calibration.off() if self.calibration is not None else contextlib.nullcontext():
                res = self.absorption.round(x, y, self.tokens_absorbed)
            if self.calibration is not None:
                self.calibration.update()
            self.window = self.window[n:]
        self.rounds.append(res)
        return res

    # ---------------------------------------------------------------- answering
    def reading(self):
        """The block in which the model answers for the method: its LoRA paths read at cfg.read_scale
        (lora.read_scaled; a no-op at 1). Generation here and every scoring of the method (absorber.evaluate,
        absorber.retention) run inside it; training does not."""
        if self.cfg.read_scale == 1.0:
            return contextlib.nullcontext()
        return lora.read_scaled(self.model, self.cfg.read_scale)

    @torch.no_grad()
    def _greedy(self, prefix: list[int], max_new: int, eos: int | None = None) -> list[int]:
        ids = torch.tensor([prefix[-self.max_positions + max_new:]], device=self.device) if prefix else None
        if ids is None:
            return []
        if self.cfg.mix and self.absorption is not None:
            return self._greedy_mixed(ids, max_new, eos)
        with self.reading():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      do_sample=False, eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
        return out[0, ids.shape[1]:].tolist()

    @torch.no_grad()
    def _greedy_mixed(self, ids: torch.Tensor, max_new: int, eos: int | None) -> list[int]:
        """Greedy decoding from the online mixture of the adapted model (as read) and the base model (the LoRA
        paths at 0), each with its own KV cache; the prompt's tokens set the weight (absorber.mixture)."""
        import torch.nn.functional as F
        from absorber.mixture import Mixture
        experts = (self.reading, lambda: lora.read_scaled(self.model, 0.0))
        T = ids.shape[1]
        pos = torch.arange(T, device=self.device)[None]
        lp, last, past = [], [], []
        for ctx in experts:        # each prompt token's log p (no [T, V] log-softmax kept), the next token's
            with ctx():
                out = self.model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=True)
            lp.append((-F.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:], reduction="none")).tolist())
            last.append(F.log_softmax(out.logits[0, -1].double(), -1).cpu().numpy())
            past.append(out.past_key_values)
        mx = Mixture(self.cfg.mix_share)
        mx.learn(*lp, window=self.cfg.mix_window)
        la, lb = last
        out_ids: list[int] = []
        while len(out_ids) < max_new:
            tok = int(mx.mix(la, lb).argmax())
            mx.update(float(la[tok]), float(lb[tok]))
            out_ids.append(tok)
            if tok == eos or len(out_ids) == max_new:
                break
            nxt = torch.tensor([[tok]], device=self.device)
            p = torch.tensor([[T + len(out_ids) - 1]], device=self.device)
            new = []
            for i, ctx in enumerate(experts):
                with ctx():
                    o = self.model(input_ids=nxt, position_ids=p, past_key_values=past[i], use_cache=True,
                                   attention_mask=torch.ones(1, T + len(out_ids), dtype=torch.long, device=self.device))
                past[i] = o.past_key_values
                new.append(F.log_softmax(o.logits[0, -1].double(), -1).cpu().numpy())
            la, lb = new
        return out_ids

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64) -> list[int]:
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        return self._greedy(self.context() + list(prompt_ids), max_new_tokens, eos)

    def generate(self, prompt: str, max_new_tokens: int = 64) -> str:
        """Continue from the current window (with the absorbed adapters) after `prompt`; greedy."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return self.tokenizer.decode(self.generate_ids(ids, max_new_tokens), skip_special_tokens=True)

    def stats(self) -> dict:
        last = self.rounds[-1] if self.rounds else None
        return {"method": self.method, "tokens_seen": self.tokens_seen, "tokens_absorbed": self.tokens_absorbed,
                "rounds": len(self.rounds), "window": len(self.context()),
                "last_loss": last.loss_last if last else None,
                "rollbacks": self.absorption.rollbacks if self.absorption else 0}


def iter_chunks(ids: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]
