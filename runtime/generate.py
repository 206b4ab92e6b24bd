"""Decoder passes of a stream: prefill (hidden states, logits) and token generation with a KV cache.

The adapters are graph inputs: every function takes the stream's adapter feeds (numpy views or OrtValues over
its own buffers), so one Model's decoder session serves any number of streams.

    gen = Generator(model, adapter_values)       # explicit step loop, as onnxruntime-genai's Generator
    gen.append(prompt_ids)
    while not gen.done:
        gen.step()                               # one decoder call: the next token
    gen.tokens
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from absorber import bundle_format as F


def prefill_feeds(model, ids: list[int], adapters: dict, logits_to_keep: int, past: dict | None = None,
                  start: int = 0) -> dict:
    """decoder.onnx inputs for ids at positions start..start+T-1 after `past` (default: empty, start 0), with the
    given adapter feeds."""
    T = len(ids)
    feeds = {F.INPUT_IDS: np.asarray([ids], np.int64),
             F.POSITION_IDS: np.arange(start, start + T, dtype=np.int64)[None],
             F.LOGITS_TO_KEEP: np.asarray(logits_to_keep, np.int64)}
    feeds.update(past or {n: model.empty_past for n in model.past_names})
    feeds.update(model.decoder_adapters(adapters))
    return feeds


def hidden_states(model, ids: list[int], adapters: dict, run_options=None) -> np.ndarray:
    """decoder.onnx on ids at positions 0..T-1, empty past: hidden_states [S, T, H]."""
    return model.decoder.run([F.HIDDEN_STATES], prefill_feeds(model, ids, adapters, 1), run_options)[0]


def hidden_states_after(model, context: list[int], ids: list[int], adapters: dict,
                        run_options=None) -> np.ndarray:
    """hidden_states [S, len(ids), H] of ids read after context (positions 0..len(context)+len(ids)-1), the
    context passed through the KV cache first: the same values as hidden_states(context + ids)[:, len(context):]
    up to float rounding, without the context's states and its [T, T] attention at full length (the teacher
    pass's memory: a second decoder call instead of one over X.Y)."""
    if not context:
        return hidden_states(model, ids, adapters, run_options)
    adapters = model.decoder_adapters(adapters)        # packed once for both calls
    past = dict(zip(model.past_names,
                    model.decoder.run(model.present_names, prefill_feeds(model, context, adapters, 1),
                                      run_options)))
    feeds = prefill_feeds(model, ids, adapters, 1, past=past, start=len(context))
    return model.decoder.run([F.HIDDEN_STATES], feeds, run_options)[0]


def all_logits(model, ids: list[int], adapters: dict, run_options=None) -> np.ndarray:
    """Logits [T, V] at every position of ids (positions 0..T-1)."""
    return model.decoder.run([F.LOGITS], prefill_feeds(model, ids, adapters, 0), run_options)[0][0]


def token_logprobs(logits: np.ndarray, targets, rows: int = 64) -> np.ndarray:
    """log p of each target under logits [len(targets), V] (row t scores targets[t]; float64). The log-sum-exp
    runs over `rows` positions at a time (one [rows, V] temporary)."""
    target = np.asarray(targets, np.int64)
    out = np.empty(len(target), np.float64)
    for a in range(0, len(target), rows):
        z = logits[a:a + rows]
        mx = z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z - mx).sum(axis=1, dtype=np.float64)) + mx[:, 0]
        out[a:a + len(z)] = z[np.arange(len(z)), target[a:a + rows]] - lse
    return out


def summed_nll(logits: np.ndarray, targets, rows: int = 64) -> float:
    """Summed cross-entropy of targets under logits [len(targets), V] (row t scores targets[t])."""
    return -float(token_logprobs(logits, targets, rows).sum())


# the most fp32 bytes of logits one decoder call of next_token_loss returns: [rows, V] with rows = this / (4 V)
# (SmolLM2: 170 rows; Gemma-3-270M: 32 rows instead of X's 512 at once, 537 MB)
LOGITS_BYTES = 32 << 20
# the same for scoring an answer's prompt under the mixture (Generator.score_pending): both models' pieces, their
# KV caches and the decoder's own [rows, V] head output are live at once while a round's arena may still be held,
# so smaller pieces (SmolLM2: 85 rows) keep a mixed answer's peak near an unmixed one's (benchmarks/retention.md)
SCORE_LOGITS_BYTES = 16 << 20


def next_token_loss(model, ids: list[int], adapters: dict, run_options=None, rows: int | None = None,
                    skip: int = 0) -> float:
    """Mean next-token cross-entropy of ids alone (positions 0..T-1), as absorber.sync.next_token_loss: the
    logits at t score ids[t+1]; the first `skip` predictions are left out (a leading BOS: X[0] is not scored, as
    absorber.sync.lean_next_token_loss). The positions run in pieces of `rows` (default: LOGITS_BYTES of logits),
    each piece after the ones before it through the KV cache, so that no [T, V] logits exist at once (the same
    values up to float rounding)."""
    rows = rows or max(1, LOGITS_BYTES // (4 * model.bundle.vocab))
    adapters = model.decoder_adapters(adapters)        # packed once for every piece
    total, past = 0.0, None
    for a in range(0, len(ids) - 1, rows):       # logits at a..b-1 score ids[a+1..b]
        b = min(len(ids) - 1, a + rows)
        outs = model.decoder.run([F.LOGITS] + model.present_names,
                                 prefill_feeds(model, ids[a:b], adapters, 0, past=past, start=a), run_options)
        s = max(0, skip - a)
        total += summed_nll(outs[0][0][s:], ids[a + 1 + s:b + 1])
        past = dict(zip(model.past_names, outs[1:]))
    return total / (len(ids) - 1 - skip)


def pick(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    """Greedy at temperature 0, else a sample from the (top-p truncated) softmax."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        c = np.cumsum(p[order])
        cut = int(np.searchsorted(c, top_p)) + 1
        keep = order[:cut]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


class Generator:
    """Token-by-token decoding with the KV cache, over one stream's adapters (bound once)."""

    def __init__(self, model, adapter_values: dict[str, ort.OrtValue | np.ndarray], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True):
        self.model = model
        self.max_new = int(max_new_tokens)
        self.temperature, self.top_p, self.stop_at_eos = temperature, top_p, stop_at_eos
        self.rng = np.random.default_rng(seed)
        self.io = model.decoder.io_binding()
        # OrtValues, or numpy arrays (the decoder's packed adapters, Model.decoder_adapters) wrapped without a copy
        # and kept alive as long as the generator
        self._adapters = {n: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
                          for n, v in adapter_values.items()}
        for n, ov in self._adapters.items():
            self.io.bind_ortvalue_input(n, ov)
        self._keep = ort.OrtValue.ortvalue_from_numpy(np.asarray(1, np.int64))
        self._all: ort.OrtValue | None = None
        self._past = {n: ort.OrtValue.ortvalue_from_numpy(model.empty_past) for n in model.past_names}
        self._pending: np.ndarray | None = None
        self.pos = 0
        self.tokens: list[int] = []
        self.done = self.max_new <= 0

    def append(self, ids: list[int], keep: int = 0) -> None:
        """The prompt (or more context): consumed by the next step. A prompt longer than the model's positions
        (less max_new) loses its oldest tokens, except its first `keep` (a bos bundle's BOS)."""
        room = max(self.model.max_positions - self.max_new, 1)
        ids = list(ids)
        if len(ids) > room:
            keep = min(keep, room - 1)
            ids = ids[:keep] + ids[len(ids) - (room - keep):]
        self._pending = np.asarray([ids], np.int64)
        if not ids:
            self.done = True

    def _feed(self, ids: np.ndarray, keep: ort.OrtValue) -> np.ndarray:
        """One decoder call on ids [1, T] after the cache: the kept logits [k, V] (k = `keep`, 0: all T); the cache
        and the position move on."""
        m, io = self.model, self.io
        T = ids.shape[1]
        io.bind_cpu_input(F.INPUT_IDS, ids)
        io.bind_cpu_input(F.POSITION_IDS, np.arange(self.pos, self.pos + T, dtype=np.int64)[None])
        io.bind_ortvalue_input(F.LOGITS_TO_KEEP, keep)
        for n, ov in self._past.items():
            io.bind_ortvalue_input(n, ov)
        for n in m.decoder_outputs:   # ORT allocates outputs of this step's shape
            io.bind_output(n, "cpu")
        m.decoder.run_with_iobinding(io)
        outs = dict(zip(m.decoder_outputs, io.get_outputs()))
        self.pos += T
        self._past = {pn: outs[qn] for pn, qn in zip(m.past_names, m.present_names)}
        return outs[F.LOGITS].numpy()[0]

    def next_logits(self) -> np.ndarray:
        """Feed what is pending (the prompt, or the last token): the next token's logits [V]."""
        return self._feed(self._pending, self._keep)[-1]

    def score_pending(self, window: int = 0, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Feed the pending prompt in pieces of `rows` positions (default: SCORE_LOGITS_BYTES of logits at once):
        the log-probability of each prompt token after the first (float64, len T - 1; with `window`, only the
        last `window` of them: the tokens before run in one call that keeps one row of logits, no head at the
        others) and the next token's logits (a copy: the last piece is not kept alive by it)."""
        ids = self._pending[0]
        rows = rows or max(1, SCORE_LOGITS_BYTES // (4 * self.model.bundle.vocab))
        if self._all is None:
            self._all = ort.OrtValue.ortvalue_from_numpy(np.asarray(0, np.int64))
        head = len(ids) - window if window and window < len(ids) - 1 else 0   # tokens fed without the head
        if head:
            z = self._feed(ids[None, :head], self._keep)    # one row of logits, at head - 1: it scores ids[head]
            first = token_logprobs(z[-1:], ids[head:head + 1])
            lp, z = self._score(ids, head, rows)
            return np.concatenate([first, lp]), z
        return self._score(ids, 0, rows)

    def _score(self, ids: np.ndarray, start: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """score_pending's pieces over ids[start:] (the cache holding ids[:start]): log p of ids[start + 1:] and
        the next token's logits."""
        lp = np.empty(len(ids) - 1 - start, np.float64)
        for a in range(start, len(ids), rows):
            b = min(len(ids), a + rows)
            z = self._feed(ids[None, a:b], self._all)
            t = min(b, len(ids) - 1)                          # row i scores ids[a + i + 1]
            lp[a - start:t - start] = token_logprobs(z[:t - a], ids[a + 1:t + 1])
        return lp, z[-1].copy()

    def accept(self, tok: int) -> None:
        """The picked token: recorded, checked for the end, pending for the next call."""
        m = self.model
        self.tokens.append(tok)
        if (self.stop_at_eos and tok in m.eos_ids) or len(self.tokens) >= self.max_new or self.pos >= m.max_positions:
            self.done = True
        self._pending = np.asarray([[tok]], np.int64)

    def step(self) -> int:
        """One decoder call: feeds what is pending (the prompt, or the last token) and picks the next token."""
        tok = pick(self.next_logits(), self.temperature, self.top_p, self.rng)
        self.accept(tok)
        return tok


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64."""
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class MixedGenerator:
    """A Generator over the online mixture of a stream's adapted model and the base model (absorber.mixture):
    the two run side by side, each with its own KV cache; the prompt's tokens set the mixture's weight, every
    token is picked from the mixed distribution and moves the weight too. Two decoder calls per token."""

    def __init__(self, model, adapter_values: dict, base_values: dict, max_new_tokens: int, share: float,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                 window: int = 0):
        from absorber.mixture import Mixture
        self.a = Generator(model, adapter_values, max_new_tokens, stop_at_eos=stop_at_eos)
        self.b = Generator(model, base_values, max_new_tokens, stop_at_eos=stop_at_eos)
        self.mixture = Mixture(share)
        self.window = window        # the weight learns from the prompt's last `window` tokens (0: all of them)
        self.temperature, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)
        self.done = self.a.done
        self._prompt = False

    @property
    def tokens(self) -> list[int]:
        return self.a.tokens

    def append(self, ids: list[int], keep: int = 0) -> None:
        self.a.append(ids, keep)
        self.b.append(ids, keep)
        self.done = self.a.done
        self._prompt = True

    def step(self) -> int:
        if self._prompt:           # the prompt's own tokens teach the weight first
            lpa, za = self.a.score_pending(self.window)
            lpb, zb = self.b.score_pending(self.window)
            self.mixture.run(lpa, lpb)
            self._prompt = False
        else:
            za, zb = self.a.next_logits(), self.b.next_logits()
        la, lb = log_softmax(za), log_softmax(zb)
        tok = pick(self.mixture.mix(la, lb), self.temperature, self.top_p, self.rng)
        self.mixture.update(la[tok], lb[tok])
        self.a.accept(tok)
        self.b.accept(tok)
        self.done = self.a.done
        return tok


def generate(model, adapter_values: dict, prefix: list[int], max_new: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True, on_token=None,
             keep: int = 0, base_values: dict | None = None, share: float = 0.0, window: int = 0) -> list[int]:
    """Continue `prefix` by up to max_new tokens (greedy by default); on_token(tok) after each. keep: leading
    tokens of an over-long prefix that are never trimmed (Generator.append). base_values: the base model's
    adapter feeds; given, the tokens come from the online mixture of the two (MixedGenerator, fixed `share`, its
    weight learned from the prompt's last `window` tokens; 0: all)."""
    if max_new <= 0 or not prefix:
        return []
    if base_values is not None:
        gen = MixedGenerator(model, adapter_values, base_values, max_new, share, temperature, top_p, seed,
                             stop_at_eos, window)
    else:
        gen = Generator(model, adapter_values, max_new, temperature, top_p, seed, stop_at_eos)
    gen.append(prefix, keep)
    while not gen.done:
        tok = gen.step()
        if on_token is not None:
            on_token(tok)
    return gen.tokens
