"""The torch-free streaming engine: Absorber LLM rounds and answers on ONNX Runtime + numpy.

    stream = Stream.open("bundle/", state_dir="state/")   # resumes when state/ holds a state of this bundle
    stream.feed(text)                                      # any size, any time; rounds run when the window is full
    stream.ask("Question?")                                # answered from the window + absorbed adapters
    stream.stats()

A round reproduces `absorber.absorb.Absorption.round` (and the window logic of `absorber.stream`):
teacher = decoder.onnx on X·Y (positions 0..n+m-1) -> hidden states at Y; then up to K steps of
train_step.onnx on Y (positions 0..m-1) -> loss + adapter gradients, clip_grad_norm_, torch-identical AdamW
in numpy (moments and step persist across rounds); a final loss evaluation after the last step; early stop
under eps; rollback of the last step on a non-finite loss, end of round on a non-finite gradient.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from absorber.config import AbsorberConfig
from absorber.errors import AbsorberError
from absorber.runtime.bundle import Bundle, check_session_io, open_bundle
from absorber.runtime.optim import FlatAdamW
from absorber.rounds import RoundResult
from absorber.runtime.state import load_state, save_state

NP_OF = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8, "int32": np.int32,
         "int64": np.int64, "float64": np.float64, "int16": np.int16, "uint16": np.uint16}


def rss_mb() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # noqa: BLE001
        return float("nan")


def _profile(profile):
    if profile is None or not isinstance(profile, str):
        return profile
    try:
        from absorber.devices import get_profile
    except ImportError:
        raise AbsorberError(f"profile {profile!r} needs absorber.devices, which is not installed") from None
    return get_profile(profile)


def _providers(device: str) -> list[str]:
    try:
        from absorber.devices import resolve_providers
    except ImportError:
        resolve_providers = None
    if resolve_providers is not None:
        return resolve_providers(device)
    if device not in ("cpu", "auto", None, "CPUExecutionProvider"):
        raise AbsorberError(f"device {device!r} needs absorber.devices (not installed); use --device cpu")
    return ["CPUExecutionProvider"]


def _session_kwargs(profile, device: str, extra: dict) -> dict:
    """sess_options / providers / provider_options from absorber.devices (a plain CPU session without it)."""
    try:
        from absorber.devices import session_kwargs
    except ImportError:
        session_kwargs = None
    if session_kwargs is not None:
        return session_kwargs(profile, device, extra)
    return {"sess_options": _session_options(profile, extra), "providers": _providers(device)}


def _session_options(profile, extra: dict) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.inter_op_num_threads = 1
    for k, v in extra.items():
        so.add_session_config_entry(k, str(v))
    return so


@contextlib.contextmanager
def _ort_errors(what: str):
    """ONNX Runtime failures at run time (out of memory, a bad graph) -> one AbsorberError line."""
    try:
        yield
    except AbsorberError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT's exception classes do not share a public base
        if type(e).__module__.startswith("onnxruntime") or isinstance(e, MemoryError) or (
                isinstance(e, RuntimeError) and ("onnxruntime" in str(e) or "Error in execution" in str(e))):
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AbsorberError(f"ONNX Runtime failed during {what}: {msg[:300]}") from None
        raise


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
    """An endless text stream absorbed into the bundle's LoRA adapters, on ONNX Runtime alone."""

    piece_chars = 1 << 16     # feed() tokenizes long texts in pieces of at most this many characters

    # ---------------------------------------------------------------------------------------------- open
    @classmethod
    def open(cls, bundle_dir, device: str = "cpu", state_dir=None, profile=None, config_overrides: dict | None = None,
             share_weights: bool = True, verify_hashes: bool = True, save_every_round: bool = True) -> "Stream":
        """Load a bundle (verified), optionally resume from `state_dir` (refused if saved for another bundle).

        config_overrides: AbsorberConfig fields (n, m, k, eps, lr, clip, weight_decay, betas, adam_eps, reset, decay,
            teacher; sync_skip only with the value the bundle was exported with) over the
        bundle's defaults (and the profile's n/m/k). share_weights: both graphs read the frozen weights from ONE
        memory map of weights.bin (add_initializer + no pre-packing) instead of each session loading its own.
        """
        bundle = open_bundle(bundle_dir, verify_hashes=verify_hashes)
        return cls(bundle, device=device, state_dir=state_dir, profile=_profile(profile),
                   config_overrides=config_overrides, share_weights=share_weights, save_every_round=save_every_round)

    def __init__(self, bundle: Bundle, device: str = "cpu", state_dir=None, profile=None,
                 config_overrides: dict | None = None, share_weights: bool = True, save_every_round: bool = True):
        t0 = time.perf_counter()
        self.bundle = bundle
        self.profile = profile
        self.device = device
        self.share_weights = share_weights
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.save_every_round = save_every_round
        loss = bundle.manifest.get("loss") or {}
        self.loss_skip = int(loss.get("skip", 0))   # compiled into train_step.onnx
        self.cfg = self._config(config_overrides)
        self.loss_kind = loss.get("kind", self.cfg.loss)
        if self.cfg.kl_weight:
            raise AbsorberError("kl_weight > 0 is not supported by the runtime (hidden-state loss only)")
        # tokenizer
        try:
            from tokenizers import Tokenizer
            self.tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
        except Exception as e:  # noqa: BLE001
            raise AbsorberError(f"bundle {bundle.path}: cannot read tokenizer.json ({type(e).__name__})") from None
        # adapters + optimizer (flat buffers; per-tensor views are what the sessions read/write)
        self.opt = FlatAdamW([(s.name, s.shape) for s in bundle.adapters], lr=self.cfg.lr, betas=self.cfg.betas,
                             eps=self.cfg.adam_eps, weight_decay=self.cfg.weight_decay)
        self.param_views = self.opt.views(self.opt.params)
        self.grad_views = self.opt.views(self.opt.grads)
        self._load_initial_adapters()
        self._initial = self.opt.params.copy() if self.cfg.reset == "adapters" else None
        self._b_views = [v for n, v in self.param_views.items() if n.endswith(".lora_B")]
        # teacher="base": the decoder with every B at zero is the base model. The zero Bs are views of ONE buffer
        # the size of the largest B (the sessions only read inputs), not a second copy of the adapters.
        self._base_feeds = self._zero_b_feeds() if self.cfg.teacher == "base" else None
        # sessions
        self.providers: list[str] = []
        self._weights_maps: list[np.memmap] = []
        self._shared_values: dict[str, ort.OrtValue] = {}
        self.dec = self._session("decoder")
        self.train = self._session("train_step")
        self._param_ov = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in self.param_views.items()}
        self._grad_ov = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in self.grad_views.items()}
        self._loss_buf = np.zeros((), np.float32)
        self._loss_ov = ort.OrtValue.ortvalue_from_numpy(self._loss_buf)
        L, kv, hd = bundle.num_layers, bundle.num_kv_heads, bundle.head_dim
        self._empty_past = np.zeros((1, kv, 0, hd), np.float32)
        self._past_names = [f"past_{w}.{i}" for i in range(L) for w in ("key", "value")]
        self._present_names = [f"present_{w}.{i}" for i in range(L) for w in ("key", "value")]
        self._eos = bundle.eos_ids
        # stream state
        self.window: list[int] = []
        self.pending: list[int] = []
        self.tokens_seen = 0
        self.tokens_absorbed = 0
        self.rounds = 0
        self.rollbacks = 0
        self.last_loss: float | None = None
        self.offset_chars = 0          # characters of text consumed by feed() over the stream's whole life
        self.input_bytes = 0           # bytes of input consumed (set by readers that know it)
        self.invalid_bytes = 0         # undecodable input bytes replaced by U+FFFD
        self.history: list[RoundResult] = []
        self._replay = 0               # characters still to skip when the same input is fed again after a resume
        self._replay_bytes = 0
        self.resumed = False
        if self.state_dir is not None:
            self._resume()
        self.open_seconds = time.perf_counter() - t0

    def _config(self, overrides: dict | None) -> AbsorberConfig:
        cfg = self.bundle.defaults()
        if self.profile is not None:
            for k in ("n", "m", "k"):
                v = getattr(self.profile, k, None)
                if v is not None:
                    setattr(cfg, k, v)
        for k, v in (overrides or {}).items():
            if v is None:
                continue
            if k not in AbsorberConfig.__dataclass_fields__ or k in ("lora", "loss_layers", "loss"):
                raise AbsorberError(f"cannot override {k!r} at run time (it is fixed by the bundle or unknown)")
            setattr(cfg, k, tuple(v) if isinstance(v, list) else v)
        want = (overrides or {}).get("sync_skip")
        if want is not None and want != self.loss_skip:
            raise AbsorberError(f"sync_skip={want} but this bundle's train step leaves {self.loss_skip} "
                                f"position(s) out of the loss (fixed at export: absorber export --sync-skip)")
        cfg.sync_skip = self.loss_skip
        cfg.validate()
        if cfg.n + cfg.m > self.bundle.max_positions:
            raise AbsorberError(f"n+m = {cfg.n + cfg.m} exceeds the model's {self.bundle.max_positions} positions")
        return cfg

    def _load_initial_adapters(self) -> None:
        from safetensors.numpy import load_file
        try:
            init = load_file(str(self.bundle.adapters_path))
        except Exception as e:  # noqa: BLE001
            raise AbsorberError(f"bundle {self.bundle.path}: cannot read adapters.safetensors ({type(e).__name__})") from None
        for n, v in self.param_views.items():
            if n not in init or tuple(init[n].shape) != v.shape:
                raise AbsorberError(f"bundle {self.bundle.path}: adapters.safetensors lacks {n} {v.shape}")
            v[...] = init[n]

    def _shared_initializers(self, graph: str) -> dict[str, ort.OrtValue]:
        """OrtValues over ONE read-only memory map per external file, shared by both sessions."""
        out = {}
        for t in self.bundle.graph_info[graph].external:
            dt = NP_OF.get(t.dtype)
            if dt is None:     # int4/bfloat16...: numpy cannot view them; ORT loads (and maps) those itself
                continue
            key = f"{t.location}:{t.offset}:{t.name}"
            if key not in self._shared_values:
                mm = next((m for m in self._weights_maps if m.filename and Path(m.filename).name == t.location), None)
                if mm is None:
                    mm = np.memmap(self.bundle.path / t.location, dtype=np.uint8, mode="r")
                    self._weights_maps.append(mm)
                count = int(np.prod(t.dims)) if t.dims else 1
                arr = np.frombuffer(mm, dtype=dt, count=count, offset=t.offset).reshape(t.dims)
                self._shared_values[key] = ort.OrtValue.ortvalue_from_numpy(arr)
            out[t.name] = self._shared_values[key]
        return out

    def _session(self, graph: str) -> ort.InferenceSession:
        extra = dict(self.bundle.manifest.get("session_config") or {})
        shared = self._shared_initializers(graph) if self.share_weights else {}
        if shared:
            # pre-packing would copy every shared weight into each session's own layout
            extra["session.disable_prepacking"] = "1"
        kw = _session_kwargs(self.profile, self.device, extra)
        so = kw["sess_options"]
        so.log_severity_level = max(so.log_severity_level, 3)   # no warnings about unused initializers
        for name, ov in shared.items():
            so.add_initializer(name, ov)
        self.providers = kw["providers"]
        try:
            sess = ort.InferenceSession(str(self.bundle.graph_file(graph)), **kw)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AbsorberError(f"bundle {self.bundle.path}: ONNX Runtime cannot load {graph}: {msg[:300]}") from None
        check_session_io(self.bundle, graph, sess)
        return sess

    # ---------------------------------------------------------------------------------------------- state
    def _meta(self) -> dict:
        return {"manifest_sha256": self.bundle.manifest_sha256, "bundle": str(self.bundle.path),
                "step": self.opt.step, "rounds": self.rounds, "tokens_seen": self.tokens_seen,
                "tokens_absorbed": self.tokens_absorbed, "offset_chars": self.offset_chars,
                "input_bytes": self.input_bytes, "invalid_bytes": self.invalid_bytes, "rollbacks": self.rollbacks,
                "last_loss": self.last_loss, "config": self.cfg.to_dict(), "names": self.opt.names,
                "saved_at": time.time()}

    def save(self, state_dir=None) -> Path:
        """Write the state atomically (adapters, AdamW moments + step, window, counters, stream offset)."""
        d = Path(state_dir) if state_dir is not None else self.state_dir
        if d is None:
            raise AbsorberError("no state folder: pass state_dir to Stream.open or save()")
        tensors = {"params": self.opt.params, "exp_avg": self.opt.exp_avg, "exp_avg_sq": self.opt.exp_avg_sq,
                   "window": np.asarray(self.window, np.int64), "pending": np.asarray(self.pending, np.int64)}
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
        self._replay = self.offset_chars
        self._replay_bytes = self.input_bytes
        self.resumed = True

    # ---------------------------------------------------------------------------------------------- feeding
    @property
    def capacity(self) -> int:
        return self.cfg.n + self.cfg.m

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
            ids = self.tokenizer.encode(piece, add_special_tokens=False).ids
            self.offset_chars += len(piece)    # a save during these rounds keeps the rest as `pending`
            done += self.feed_tokens(ids, on_round=on_round)
        return done

    def feed_tokens(self, ids, on_round=None) -> list[RoundResult]:
        """Append token ids; a round each time the window reaches n+m tokens (saved after each round)."""
        self.pending.extend(int(i) for i in ids)
        return self._drain_pending(on_round)

    def _drain_pending(self, on_round=None) -> list[RoundResult]:
        done: list[RoundResult] = []
        cap = self.capacity
        while self.pending:
            room = max(cap - len(self.window), 0)
            take = self.pending[:room]
            del self.pending[:room]
            self.window.extend(take)
            self.tokens_seen += len(take)
            if len(self.window) >= cap:
                with _ort_errors("an absorption round"):
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
            self.window.extend(self._generate(list(self.window), need, stop_at_eos=False))
            res = self._round()
            done.append(res)
            if on_round is not None:
                on_round(res)
        if self.state_dir is not None:
            self.save()
        return done

    # ---------------------------------------------------------------------------------------------- one round
    def _zero_b_feeds(self) -> dict:
        zero = np.zeros(max(v.size for v in self._b_views), np.float32)
        return {n: (zero[:v.size].reshape(v.shape) if n.endswith(".lora_B") else v) for n, v in self.param_views.items()}

    def _adapter_feeds(self, base: bool = False) -> dict:
        return dict(self._base_feeds if base else self.param_views)

    def _prefill_feeds(self, ids: list[int], logits_to_keep: int, base: bool = False) -> dict:
        """decoder.onnx inputs for ids at positions 0..T-1 from an empty past, with the current adapters (or,
        base=True, with every adapter at zero: the base model)."""
        T = len(ids)
        feeds = {"input_ids": np.asarray([ids], np.int64), "position_ids": np.arange(T, dtype=np.int64)[None],
                 "logits_to_keep": np.asarray(logits_to_keep, np.int64)}
        for n in self._past_names:
            feeds[n] = self._empty_past
        feeds.update(self._adapter_feeds(base))
        return feeds

    def _hidden(self, ids: list[int], base: bool = False) -> np.ndarray:
        """decoder.onnx on ids at positions 0..T-1, empty past: hidden_states [S, T, H]."""
        return self.dec.run(["hidden_states"], self._prefill_feeds(ids, 1, base))[0]

    def _train_binding(self, y: list[int], teacher: np.ndarray):
        io = self.train.io_binding()
        io.bind_cpu_input("input_ids", np.asarray([y], np.int64))
        io.bind_cpu_input("position_ids", np.arange(len(y), dtype=np.int64)[None])
        io.bind_cpu_input("teacher_hidden", teacher)
        for n, ov in self._param_ov.items():
            io.bind_ortvalue_input(n, ov)
        io.bind_ortvalue_output("loss", self._loss_ov)
        for n, ov in self._grad_ov.items():
            io.bind_ortvalue_output(f"grad.{n}", ov)
        return io

    def _eval_loss(self, y: list[int], teacher: np.ndarray) -> float:
        """The final loss evaluation (forward only): the decoder's hidden states vs the teacher's."""
        k = self.loss_skip
        d = self._hidden(y)[:, k:] - teacher[:, k:]
        if self.loss_kind == "l1":
            np.abs(d, out=d)
        else:
            np.multiply(d, d, out=d)
        return float(d.mean(dtype=np.float32))

    def _before_round(self) -> None:
        """AbsorberConfig's anti-drift options (reset, decay), as absorber.absorb.Absorption applies them."""
        cfg, opt = self.cfg, self.opt
        if cfg.reset == "adapters":
            np.copyto(opt.params, self._initial)
        if cfg.reset in ("adapters", "moments"):   # torch: optimizer.state.clear() (moments and step)
            opt.exp_avg.fill(0.0)
            opt.exp_avg_sq.fill(0.0)
            opt.step = 0
        if cfg.decay > 0:
            for v in self._b_views:
                v *= np.float32(1.0 - cfg.decay)

    def _round(self) -> RoundResult:
        cfg = self.cfg
        n, m = cfg.n, cfg.m
        x, y = self.window[:n], self.window[n:n + m]
        t0 = time.perf_counter()
        self._before_round()
        teacher = np.ascontiguousarray(self._hidden(x + y, base=cfg.teacher == "base")[:, n:n + m])
        t1 = time.perf_counter()
        opt = self.opt
        opt.lr, opt.betas, opt.eps, opt.weight_decay = cfg.lr, tuple(cfg.betas), cfg.adam_eps, cfg.weight_decay
        io = self._train_binding(y, teacher) if cfg.k > 0 else None
        losses: list[float] = []
        rolled_back = have_backup = False
        steps = 0
        t_opt = 0.0
        for step in range(cfg.k + 1):
            if step < cfg.k:
                self.train.run_with_iobinding(io)
                lv = float(self._loss_buf)
            else:
                lv = self._eval_loss(y, teacher)
            if not np.isfinite(lv):
                rolled_back = True
                if have_backup:
                    opt.restore_backup()   # undo the step that produced this loss
                    steps -= 1
                break
            losses.append(lv)
            if step == cfg.k or (cfg.eps > 0 and lv < cfg.eps):
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
        if rolled_back:
            self.rollbacks += 1
            warnings.warn(f"round {self.rounds}: non-finite loss or gradient; step rolled back, round ended",
                          RuntimeWarning, stacklevel=2)
        self.rounds += 1
        self.tokens_absorbed += n
        self.window = self.window[n:]
        if losses:
            self.last_loss = losses[-1]
        t2 = time.perf_counter()
        res = RoundResult(round=self.rounds, tokens_absorbed=self.tokens_absorbed,
                          loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                          steps=steps, seconds=t2 - t0, rolled_back=rolled_back, teacher_seconds=t1 - t0,
                          train_seconds=t2 - t1, optimizer_seconds=t_opt)
        self.history.append(res)
        if len(self.history) > 1000:
            del self.history[:-1000]
        return res

    # ---------------------------------------------------------------------------------------------- answering
    def _decode_binding(self):
        io = self.dec.io_binding()
        for n, ov in self._param_ov.items():
            io.bind_ortvalue_input(n, ov)
        return io

    def _generate(self, prefix: list[int], max_new: int, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, stop_at_eos: bool = True) -> list[int]:
        if max_new <= 0 or not prefix:
            return []
        limit = self.bundle.max_positions
        prefix = prefix[-max(limit - max_new, 1):]
        rng = np.random.default_rng(seed)
        io = self._decode_binding()
        ids = np.asarray([prefix], np.int64)
        past = {n: ort.OrtValue.ortvalue_from_numpy(self._empty_past) for n in self._past_names}
        pos, out = 0, []
        keep = ort.OrtValue.ortvalue_from_numpy(np.asarray(1, np.int64))
        while True:
            T = ids.shape[1]
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("position_ids", np.arange(pos, pos + T, dtype=np.int64)[None])
            io.bind_ortvalue_input("logits_to_keep", keep)
            for n, ov in past.items():
                io.bind_ortvalue_input(n, ov)
            for n in self.dec_output_names:   # ORT allocates outputs of this step's shape
                io.bind_output(n, "cpu")
            self.dec.run_with_iobinding(io)
            outs = dict(zip(self.dec_output_names, io.get_outputs()))
            logits = outs["logits"].numpy()[0, -1].astype(np.float64)
            tok = self._pick(logits, temperature, top_p, rng)
            out.append(tok)
            pos += T
            if (stop_at_eos and tok in self._eos) or len(out) >= max_new or pos >= limit:
                break
            past = {pn: outs[qn] for pn, qn in zip(self._past_names, self._present_names)}
            ids = np.asarray([[tok]], np.int64)
        return out

    @property
    def dec_output_names(self) -> list[str]:
        if not hasattr(self, "_dec_out_names"):
            self._dec_out_names = ["logits", "hidden_states"] + self._present_names
        return self._dec_out_names

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits / temperature
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

    def ask(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None) -> str:
        """Continue from the current window (with the absorbed adapters) after `prompt`; greedy by default."""
        self._drain_pending()
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        t0 = time.perf_counter()
        with _ort_errors("an answer"):
            out = self._generate(self.window + ids, max_new_tokens, temperature, top_p, seed)
        self.last_answer_seconds = time.perf_counter() - t0
        self.last_answer_tokens = len(out)
        return self.tokenizer.decode([t for t in out if t not in self._eos], skip_special_tokens=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """All-position logits [T, V] of ids at positions 0..T-1 with the current adapters (for checks)."""
        return self.dec.run(["logits"], self._prefill_feeds(ids, 0))[0][0]

    # ---------------------------------------------------------------------------------------------- reporting
    def adapters(self) -> dict[str, np.ndarray]:
        """Copies of the current adapter tensors, by name."""
        return {n: v.copy() for n, v in self.param_views.items()}

    def stats(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "tokens_absorbed": self.tokens_absorbed, "rounds": self.rounds,
                "last_loss": self.last_loss, "window": len(self.window), "pending": len(self.pending),
                "rollbacks": self.rollbacks, "invalid_bytes": self.invalid_bytes, "offset_chars": self.offset_chars,
                "optimizer_step": self.opt.step, "rss_mb": round(rss_mb(), 1), "resumed": self.resumed}

    def close(self) -> None:
        self.dec = self.train = None
        self._shared_values.clear()
        self._weights_maps.clear()
