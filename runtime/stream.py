"""`Stream`: one endless text stream absorbed into its own LoRA adapters, on a shared `Model`.

    model = Model.open("bundle/")
    stream = Stream(model, state_dir="state/")     # resumes when state/ holds a state of this bundle
    stream.feed(text)                              # any size, any time; rounds run when the window is full
    stream.ask("Question?")                        # answered from the window + absorbed adapters
    stream.stats()
    Stream.open("bundle/", state_dir="state/")     # the one-line convenience: a Model of its own

A stream owns its adapters and AdamW moments (flat numpy buffers, fed to the sessions as graph inputs), its
window, its counters and its state folder. A round reproduces `absorber.absorb.Absorption.round` (and the
window logic of `absorber.stream`): teacher = decoder.onnx on X·Y (positions 0..n+m-1) -> hidden states at Y;
then up to K steps of train_step.onnx on Y (positions 0..m-1) -> loss + adapter gradients, clip_grad_norm_,
torch-identical AdamW in numpy (moments and step persist across rounds); a final loss evaluation after the last
step; early stop under eps; rollback of the last step on a non-finite loss, end of round on a non-finite
gradient. The hot loop (K train steps) runs on one I/O binding made once per round over the stream's buffers:
no allocation per step but ORT's own. Gradients, optimizer temporaries and the rollback backup live in the
Model's one Scratch: rounds of a model's streams take turns (scratch.lock), and a stream keeps only its
params and moments between rounds. A bos bundle puts its BOS (`sink`) in front of every context, as the reference's
cfg.bos: teacher BOS·X·Y, student BOS·Y (the BOS outside the loss), answers on BOS·window·prompt.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from absorber import bundle_format as F
from absorber.config import PROBE_PREFIX, probe_parts
from absorber.errors import AbsorberError
from absorber.replay import Replay
from absorber.rounds import RoundResult
from absorber.runtime import generate as G
from absorber.runtime.model import Model
from absorber.runtime.optim import FlatAdamW
from absorber.runtime.sessions import ort_errors
from absorber.runtime.state import load_state, save_state

HISTORY = 1000          # round records kept in memory (the state keeps the counters, not the records)


def rss_mb() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # noqa: BLE001
        return float("nan")


def split_text(text: str, size: int):
    """Pieces of at most `size` characters, cut after the last whitespace when there is one. Deterministic
    from any cut point on, so that re-feeding after a resume (which skips whole pieces) cuts the same way."""
    i, n = 0, len(text)
    while i < n:
        j = min(i + size, n)
        if j < n:
            k = max(text.rfind(" ", i, j), text.rfind("\n", i, j))
            if k > i + size // 2:
                j = k + 1
        yield text[i:j]
        i = j


class Stream:
    """An endless text stream absorbed into its own LoRA adapters, on a shared Model."""

    piece_chars = 1 << 16     # feed() tokenizes long texts in pieces of at most this many characters

    @classmethod
    def open(cls, bundle_dir: str | os.PathLike, device: str = "cpu", state_dir=None, profile=None,
             config_overrides: dict | None = None, share_weights: bool = True, verify_hashes: bool = True,
             save_every_round: bool = True, memory_budget: int | str | None = None) -> "Stream":
        """Open a bundle as a Model of its own and one stream on it (resumed from `state_dir` when it holds a
        state of this bundle; refused if saved for another). For several streams, open the Model once and
        make Streams on it. config_overrides: AbsorberConfig fields (n, m, k, eps, lr, clip, weight_decay,
        betas, adam_eps, reset, decay, teacher; sync_skip only with the bundle's value) over the bundle's
        defaults and the profile's n/m/k. memory_budget: bytes or "600MB"; the window is fitted to it by the
        planner (see Model.config)."""
        model = Model.open(bundle_dir, device=device, profile=profile, share_weights=share_weights,
                           verify_hashes=verify_hashes)
        stream = cls(model, state_dir=state_dir, config_overrides=config_overrides,
                     save_every_round=save_every_round, memory_budget=memory_budget)
        stream._owns_model = True
        return stream

    def __init__(self, model: Model, state_dir: str | os.PathLike | None = None,
                 config_overrides: dict | None = None, save_every_round: bool = True,
                 memory_budget: int | str | None = None):
        t0 = time.perf_counter()
        self.model = model
        self._owns_model = False
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.save_every_round = save_every_round
        self.cfg = model.config(config_overrides, memory_budget=memory_budget)
        self.prediction = model.predict_peak(self.cfg)     # the planner's peak RSS of a round at this window
        self.loss_kind = model.bundle.loss_kind
        self.loss_skip = model.bundle.loss_skip        # compiled into train_step.onnx
        self.ntp_weight = model.bundle.loss_ntp_weight  # idem: + ntp_weight x the next-token loss on X
        # adapters + optimizer (flat buffers; per-tensor views are what the sessions read/write)
        c = self.cfg
        self.opt = FlatAdamW([(s.name, s.shape) for s in model.adapter_specs], lr=c.lr, betas=c.betas,
                             eps=c.adam_eps, weight_decay=c.weight_decay, scratch=model.scratch)
        self.param_views = self.opt.views(self.opt.params)
        self.grad_views = self.opt.views(self.opt.grads)
        for n, v in self.param_views.items():
            v[...] = model.initial_adapters[n]
        self._b_views = [v for n, v in self.param_views.items() if n.endswith(".lora_B")]
        self._base_feeds = model.base_decoder_adapters(self.param_views)
        self._param_ov = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in self.param_views.items()}
        if model.grad_values is None:      # the gradients land in the model's shared scratch
            model.grad_values = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in self.grad_views.items()}
        self._grad_ov = model.grad_values
        self._loss_buf = np.zeros((), np.float32)
        self._loss_ov = ort.OrtValue.ortvalue_from_numpy(self._loss_buf)
        self._x_buf: np.ndarray | None = None      # the next-token term's ids (sink + X), see _bind_x
        self._x_ov = None
        # stream state
        self.window: list[int] = []
        self.pending: list[int] = []
        self.tokens_seen = 0
        self.tokens_absorbed = 0
        self.rounds = 0
        self.rollbacks = 0
        self.last_loss: float | None = None
        self.offset_chars = 0          # characters of text consumed by feed() over the stream's whole life
        self.input_bytes = 0           # bytes of input consumed (feed_reader counts them)
        self.invalid_bytes = 0         # undecodable input bytes replaced by U+FFFD
        self.history: list[RoundResult] = []
        self.last_answer_seconds = 0.0
        self.last_answer_tokens = 0
        self._replay = 0               # characters still to skip when the same input is fed again after a resume
        self.resumed = False
        self._probe_prefix: list[int] | None = None
        self.replay_buffer = Replay(c.replay, c.replay_mode, c.replay_tokens, c.lora.seed)   # cfg.replay
        # for a host (absorber serve): a JSON-able dict saved in the state with the stream (same atomic file),
        # restored on resume; and a callable run before each train step of a round (e.g. to yield to answers)
        self.extra_meta: dict = {}
        self.step_hook = None
        if self.state_dir is not None:
            self._resume()
        self.open_seconds = model.open_seconds + (time.perf_counter() - t0)

    # ------------------------------------------------------------------ the model's, for convenience
    @property
    def bundle(self):
        return self.model.bundle

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def providers(self) -> list[str]:
        return self.model.providers

    @property
    def dec(self):
        return self.model.decoder

    @property
    def train(self):
        return self.model.train_step

    @property
    def capacity(self) -> int:
        return self.cfg.n + self.cfg.m

    @property
    def sink(self) -> list[int]:
        """The fixed tokens in front of the window in every context (a bos bundle: [BOS]; else none): answers
        continue sink + window + prompt."""
        return self.model.sink_ids

    # ------------------------------------------------------------------ state
    def _meta(self) -> dict:
        return {"manifest_sha256": self.bundle.manifest_sha256, "bundle": str(self.bundle.path),
                "step": self.opt.step, "rounds": self.rounds, "tokens_seen": self.tokens_seen,
                "tokens_absorbed": self.tokens_absorbed, "offset_chars": self.offset_chars,
                "input_bytes": self.input_bytes, "invalid_bytes": self.invalid_bytes, "rollbacks": self.rollbacks,
                "last_loss": self.last_loss, "config": self.cfg.to_dict(), "names": self.opt.names,
                "extra": self.extra_meta, "replay": self.replay_buffer.counters, "saved_at": time.time()}

    def save(self, state_dir=None) -> Path:
        """Write the state atomically (adapters, AdamW moments + step, window, counters, stream offset)."""
        d = Path(state_dir) if state_dir is not None else self.state_dir
        if d is None:
            raise AbsorberError("no state folder: pass state_dir to Stream.open or save()")
        tensors = {"params": self.opt.params, "exp_avg": self.opt.exp_avg, "exp_avg_sq": self.opt.exp_avg_sq,
                   "window": np.asarray(self.window, np.int64), "pending": np.asarray(self.pending, np.int64)}
        if self.replay_buffer.kept:      # cfg.replay: the kept X, one after another, and their lengths
            flat, lengths = self.replay_buffer.to_state()
            tensors["replay_ids"] = np.asarray(flat, np.int64)
            tensors["replay_lengths"] = np.asarray(lengths, np.int64)
        return save_state(d, tensors, self._meta())

    def _resume(self) -> None:
        got = load_state(self.state_dir)
        if got is None:
            return
        tensors, meta = got
        if meta.get("manifest_sha256") != self.bundle.manifest_sha256:
            raise AbsorberError(f"state in {self.state_dir} was saved for another bundle "
                                f"({meta.get('bundle')}); use a new --state folder")
        if meta.get("names") != self.opt.names or tensors["params"].shape != self.opt.params.shape:
            raise AbsorberError(f"state in {self.state_dir} does not match this bundle's adapters")
        np.copyto(self.opt.params, tensors["params"])
        np.copyto(self.opt.exp_avg, tensors["exp_avg"])
        np.copyto(self.opt.exp_avg_sq, tensors["exp_avg_sq"])
        self.opt.step = int(meta["step"])
        self.window = [int(x) for x in tensors["window"]]
        self.pending = [int(x) for x in tensors["pending"]]
        for k in ("rounds", "tokens_seen", "tokens_absorbed", "offset_chars", "input_bytes", "invalid_bytes",
                  "rollbacks"):
            setattr(self, k, int(meta.get(k, 0)))
        self.last_loss = meta.get("last_loss")
        self.extra_meta = dict(meta.get("extra") or {})
        if "replay_ids" in tensors:
            self.replay_buffer.load_state(tensors["replay_ids"].tolist(), tensors["replay_lengths"].tolist(),
                                          meta.get("replay") or {})
        self._replay = self.offset_chars
        self.resumed = True
        # a save inside a round keeps the tokens that refill the window after it as `pending`; put them back in
        # the window now (no round), or a stream that gets no new text would report them pending forever
        self._drain_pending(max_rounds=0)

    # ------------------------------------------------------------------ feeding
    def skip_replayed(self, text: str) -> str:
        """After a resume, the first `offset_chars` characters fed again are the ones already consumed: drop them."""
        if self._replay <= 0:
            return text
        if len(text) <= self._replay:
            self._replay -= len(text)
            return ""
        text, self._replay = text[self._replay:], 0
        return text

    def feed(self, text: str | bytes, on_round=None) -> list[RoundResult]:
        """Append text (str, or bytes decoded as UTF-8 with invalid bytes replaced and counted); run a round
        each time the window is full. After a resume, input already consumed is skipped (same input re-fed)."""
        if isinstance(text, (bytes, bytearray)):
            from absorber.runtime.inputs import decode_bytes
            text, bad = decode_bytes(bytes(text))
            self.invalid_bytes += bad
        text = self.skip_replayed(text)
        done = self._drain_pending(on_round)
        for piece in split_text(text, self.piece_chars):
            ids = self.model.encode(piece)
            self.offset_chars += len(piece)    # a save during these rounds keeps the rest as `pending`
            done += self.feed_tokens(ids, on_round=on_round)
        return done

    def feed_reader(self, reader, on_round=None) -> list[RoundResult]:
        """Feed every piece of an `absorber.runtime.inputs.Reader` (a file or stdin as it arrives), counting
        its bytes and its invalid bytes into the stream's totals. Pieces consumed before a resume are skipped
        and not counted again."""
        done: list[RoundResult] = []
        counted = 0
        for piece in reader:
            if len(piece) > self._replay:          # not consumed before a resume: its invalid bytes are new
                self.invalid_bytes += reader.invalid_bytes - counted
            counted = reader.invalid_bytes
            self.input_bytes = max(self.input_bytes, reader.bytes_read)
            done += self.feed(piece, on_round=on_round)
        self.invalid_bytes += reader.invalid_bytes - counted
        return done

    def feed_tokens(self, ids, on_round=None, max_rounds: int | None = None) -> list[RoundResult]:
        """Append token ids; a round each time the window reaches n+m tokens (saved after each round).
        max_rounds: run at most this many rounds now (0: only fill the window); the rest stays pending."""
        self.pending.extend(int(i) for i in ids)
        return self._drain_pending(on_round, max_rounds)

    def _drain_pending(self, on_round=None, max_rounds: int | None = None) -> list[RoundResult]:
        done: list[RoundResult] = []
        cap = self.capacity
        while self.pending or len(self.window) >= cap:
            room = max(cap - len(self.window), 0)
            take = self.pending[:room]
            del self.pending[:room]
            self.window.extend(take)
            self.tokens_seen += len(take)
            if len(self.window) >= cap:
                if max_rounds is not None and len(done) >= max_rounds:
                    break
                with ort_errors("an absorption round"), self.model.scratch.lock:
                    res = self._round()
                done.append(res)
                if self.state_dir is not None and self.save_every_round:
                    self.save()
                if on_round is not None:
                    on_round(res)
        return done

    def flush(self, on_round=None) -> list[RoundResult]:
        """End of stream (or a pause): run what is pending; with cfg.fill, complete a short Y with greedy
        continuations and absorb (as absorber.stream.StreamingAbsorber.flush)."""
        done = self._drain_pending(on_round)
        n, m = self.cfg.n, self.cfg.m
        if self.cfg.fill and len(self.window) > n:
            need = n + m - len(self.window)
            self.window.extend(self.generate_ids(self.sink + self.window, need, stop_at_eos=False))
            with ort_errors("an absorption round"), self.model.scratch.lock:
                res = self._round()
            done.append(res)
            if on_round is not None:
                on_round(res)
        if self.state_dir is not None:
            self.save()
        return done

    # ------------------------------------------------------------------ one round
    def _train_binding(self, x: list[int], y: list[int], teacher: np.ndarray):
        io = self.train.io_binding()
        yy = self.sink + y          # a bos bundle's student reads BOS.Y; the train step scores Y alone
        io.bind_cpu_input(F.INPUT_IDS, np.asarray([yy], np.int64))
        io.bind_cpu_input(F.POSITION_IDS, np.arange(len(yy), dtype=np.int64)[None])
        io.bind_cpu_input(F.TEACHER_HIDDEN, teacher)
        if self.ntp_weight > 0:
            self._bind_x(io, x)
        for n, ov in self._param_ov.items():
            io.bind_ortvalue_input(n, ov)
        io.bind_ortvalue_output(F.LOSS, self._loss_ov)
        for n, ov in self._grad_ov.items():
            io.bind_ortvalue_output(F.grad_name(n), ov)
        return io

    def _bind_x(self, io, x: list[int]) -> None:
        """Bind sink + x as the next-token term's ids from one int64 buffer the stream keeps: each replay step
        writes its kept text into it in place instead of binding a new array (a new buffer only when the length
        changes, e.g. a kept text from before a resume with another n)."""
        p = len(self.sink)
        if self._x_buf is None or self._x_buf.shape[1] != p + len(x):
            self._x_buf = np.empty((1, p + len(x)), np.int64)
            self._x_ov = ort.OrtValue.ortvalue_from_numpy(self._x_buf)
        self._x_buf[0, :p] = self.sink
        self._x_buf[0, p:] = x
        io.bind_ortvalue_input(F.X_IDS, self._x_ov)

    def _eval_loss(self, x: list[int], y: list[int], teacher: np.ndarray) -> float:
        """The final loss evaluation (forward only): the decoder's hidden states vs the teacher's, plus the
        next-token term on X when the bundle's train step has one."""
        k = self.loss_skip
        ro = self.model.round_run_options
        feeds = self.model.decoder_adapters(self.param_views)     # packed once for both passes
        p = len(self.sink)
        d = G.hidden_states(self.model, self.sink + y, feeds, ro)[:, p + k:] - teacher[:, k:]
        if self.loss_kind == "l1":
            np.abs(d, out=d)
        else:
            np.multiply(d, d, out=d)
        loss = float(d.mean(dtype=np.float32))
        if self.ntp_weight > 0:
            loss += self.ntp_weight * G.next_token_loss(self.model, self.sink + x, feeds, ro, skip=p)
        return loss

    def _before_round(self) -> None:
        """AbsorberConfig's anti-drift options (reset, decay), as absorber.absorb.Absorption applies them."""
        cfg, opt = self.cfg, self.opt
        if cfg.reset == "adapters":
            for n, v in self.param_views.items():
                v[...] = self.model.initial_adapters[n]
        if cfg.reset in ("adapters", "moments"):   # torch: optimizer.state.clear() (moments and step)
            opt.exp_avg.fill(0.0)
            opt.exp_avg_sq.fill(0.0)
            opt.step = 0
        if cfg.decay > 0:
            for v in self._b_views:
                v *= np.float32(1.0 - cfg.decay)

    def _teacher(self, x: list[int], y: list[int]) -> np.ndarray:
        """The target at y's positions, as absorber.sync.teacher: the base (or current) model on x·y (BOS.x·y on
        a bos bundle), plus for teacher="compose" gamma x (h_current(y) - h_base(y)) on y alone."""
        cfg = self.cfg
        ro = self.model.round_run_options
        feeds = self.param_views if cfg.teacher == "current" else self._base_feeds
        teacher = G.hidden_states_after(self.model, self.sink + x, y, feeds, ro)
        if cfg.teacher == "compose":
            own = G.hidden_states(self.model, y, self.param_views, ro)
            own -= G.hidden_states(self.model, y, self._base_feeds, ro)
            own *= np.float32(cfg.gamma)
            teacher += own
        return teacher

    def _probes(self, x: list[int]) -> list[list[int]]:
        """The round's recall probes (cfg.probes): PROBE_PREFIX + each part of X (as absorber.absorb)."""
        if not self.cfg.probes:
            return []
        if self._probe_prefix is None:
            self._probe_prefix = self.model.encode(PROBE_PREFIX)
        return [self._probe_prefix + x[a:b] for a, b in probe_parts(len(x), self.cfg.probes)]

    def _steps(self, x: list[int], y: list[int], teacher: np.ndarray,
               extra: int = 0) -> tuple[list[float], int, bool, float]:
        """Up to K steps of train_step.onnx on one synchronized text y (x: the text being absorbed, for the
        next-token term), then `extra` steps with a kept X in its place (cfg.replay_steps, as
        absorber.absorb.Absorption): (losses, steps, rolled back, optimizer seconds)."""
        cfg, opt = self.cfg, self.opt
        total = cfg.k + (extra if self.replay_buffer.kept else 0)
        io = self._train_binding(x, y, teacher) if total > 0 else None
        losses: list[float] = []
        rolled_back = have_backup = False
        steps = 0
        t_opt = 0.0
        for step in range(total + 1):
            if self.step_hook is not None:
                self.step_hook()
            if step < total:       # the last step gives the arena back before the final loss evaluation
                if step >= cfg.k:  # a replay step: the next-token term on a kept X
                    self._bind_x(io, self.replay_buffer.next())
                self.train.run_with_iobinding(io, self.model.round_run_options if step == total - 1 else None)
                lv = float(self._loss_buf)
            else:
                lv = self._eval_loss(x, y, teacher)
            if not np.isfinite(lv):
                rolled_back = True
                if have_backup:
                    opt.restore_backup()   # undo the step that produced this loss
                    steps -= 1
                break
            losses.append(lv)
            if step == total or (cfg.eps > 0 and lv < cfg.eps and step < cfg.k):
                break
            ta = time.perf_counter()
            if not opt.grads_finite():
                rolled_back = True
                t_opt += time.perf_counter() - ta
                break
            if cfg.clip > 0:
                opt.clip(cfg.clip)
            opt.save_backup()
            have_backup = True
            opt.apply()
            steps += 1
            t_opt += time.perf_counter() - ta
        return losses, steps, rolled_back, t_opt

    def _round(self) -> RoundResult:
        cfg = self.cfg
        n, m = cfg.n, cfg.m
        x, y = self.window[:n], self.window[n:n + m]
        t0 = time.perf_counter()
        self._before_round()
        # every teacher before the round's first step (probes first, then Y), as absorber.absorb.Absorption
        targets = [(p, self._teacher(x, p)) for p in self._probes(x)] + [(y, self._teacher(x, y))]
        t1 = time.perf_counter()
        opt = self.opt
        opt.lr, opt.betas, opt.eps, opt.weight_decay = cfg.lr, tuple(cfg.betas), cfg.adam_eps, cfg.weight_decay
        losses: list[float] = []
        steps, rolled_back, t_opt = 0, False, 0.0
        for i, (yy, tt) in enumerate(targets):
            losses, s, rolled_back, to = self._steps(x, yy, tt, cfg.replay_steps if i == len(targets) - 1 else 0)
            steps += s
            t_opt += to
            if rolled_back:
                break
        if self.ntp_weight > 0:
            self.replay_buffer.keep(x)
        if rolled_back:
            self.rollbacks += 1
            warnings.warn(f"round {self.rounds}: non-finite loss or gradient; step rolled back, round ended",
                          RuntimeWarning, stacklevel=2)
        self.rounds += 1
        self.tokens_absorbed += n
        del self.window[:n]
        if losses:
            self.last_loss = losses[-1]
        t2 = time.perf_counter()
        res = RoundResult(round=self.rounds, tokens_absorbed=self.tokens_absorbed,
                          loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                          steps=steps, seconds=t2 - t0, rolled_back=rolled_back, teacher_seconds=t1 - t0,
                          train_seconds=t2 - t1, optimizer_seconds=t_opt)
        self.history.append(res)
        if len(self.history) > HISTORY:
            del self.history[:-HISTORY]
        return res

    # ------------------------------------------------------------------ answering
    def generate_ids(self, prefix: list[int], max_new: int, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, stop_at_eos: bool = True, on_token=None) -> list[int]:
        """Token ids continuing `prefix` with this stream's adapters (greedy by default). A prefix that starts
        with the stream's sink keeps it when a prompt too long for the model is trimmed."""
        keep = len(self.sink) if self.sink and prefix[:len(self.sink)] == self.sink else 0
        base = self._base_feeds if self.cfg.mix else None
        with ort_errors("an answer"):
            return G.generate(self.model, self._answer_adapters(), prefix, max_new, temperature, top_p, seed,
                              stop_at_eos, on_token, keep, base_values=base, share=self.cfg.mix_share,
                              window=self.cfg.mix_window)

    def ask(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None, on_token=None) -> str:
        """Continue from the current window (with the absorbed adapters) after `prompt`; greedy by default.
        on_token(token_id) is called as each token is picked (for streaming answers)."""
        self._drain_pending()
        ids = self.model.encode(prompt)
        t0 = time.perf_counter()
        out = self.generate_ids(self.sink + self.window + ids, max_new_tokens, temperature, top_p, seed,
                                on_token=on_token)
        self.last_answer_seconds = time.perf_counter() - t0
        self.last_answer_tokens = len(out)
        return self.model.decode(out)

    def logits(self, ids: list[int]) -> np.ndarray:
        """All-position logits [T, V] of ids at positions 0..T-1 with the current adapters, read as answers read
        them (cfg.read_scale)."""
        return G.all_logits(self.model, ids, self._scaled_views())

    def _scaled_views(self) -> dict[str, np.ndarray]:
        """The adapters as answers read them: every B times cfg.read_scale (a transient copy of the Bs; the
        stream's own adapters as they are at 1), as absorber.lora.read_scaled in the reference."""
        s = float(self.cfg.read_scale)
        if s == 1.0:
            return self.param_views
        return {n: (v * np.float32(s) if n.endswith(".lora_B") else v) for n, v in self.param_views.items()}

    def _answer_adapters(self) -> dict:
        """The decoder's adapter inputs for an answer: packed from the (read-scaled) adapters for bundles with
        packed inputs, else OrtValues (the stream's own, bound without a copy, at read_scale 1)."""
        views = self._scaled_views()
        if self.model.packed_adapters:
            return self.model.decoder_adapters(views)
        return self._param_ov if views is self.param_views else views

    # ------------------------------------------------------------------ reporting
    def adapters(self) -> dict[str, np.ndarray]:
        """Copies of the current adapter tensors, by name."""
        return {n: v.copy() for n, v in self.param_views.items()}

    def stats(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "tokens_absorbed": self.tokens_absorbed, "rounds": self.rounds,
                "last_loss": self.last_loss, "window": len(self.window), "pending": len(self.pending),
                "rollbacks": self.rollbacks, "invalid_bytes": self.invalid_bytes, "offset_chars": self.offset_chars,
                "input_bytes": self.input_bytes, "optimizer_step": self.opt.step, "rss_mb": round(rss_mb(), 1),
                "resumed": self.resumed, "n": self.cfg.n, "m": self.cfg.m, "k": self.cfg.k,
                "predicted_peak_mb": round(self.prediction.peak_bytes / 2**20, 1),
                "replay_kept": len(self.replay_buffer.kept)}

    def close(self) -> None:
        """Release this stream's buffers; the Model too when Stream.open made it for this stream alone
        (otherwise it stays open for its other streams)."""
        self._param_ov.clear()
        if self._owns_model:
            self.model.close()
