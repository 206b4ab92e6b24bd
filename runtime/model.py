"""`Model`: a verified bundle opened once per process — sessions, shared weights, tokenizer, I/O names.

    model = Model.open("bundle/", device="cpu", profile="laptop-cpu")
    a, b = Stream(model, state_dir="a/"), Stream(model, state_dir="b/")   # two streams, one copy of the weights

Everything here is read-only after open and shared by every `Stream` of the model (the onnxruntime-genai
shape: Model -> Generator). A stream owns only what is its own: adapters, AdamW moments, window, counters.
The adapters are graph inputs, so a second stream costs its adapters, moments and window, not another copy of
the weights or another session.
"""
from __future__ import annotations

import os
import time

import numpy as np

from absorber import bundle_format as F
from absorber.bundle_format import Bundle
from absorber.config import AbsorberConfig, override
from absorber.errors import AbsorberError
from absorber.devices import default_profile
from absorber.devices.planner import parse_size, plan, predict
from absorber.runtime.bundle import open_bundle
from absorber.runtime.packing import decoder_adapters
from absorber.runtime.optim import Scratch
from absorber.runtime.sessions import Sessions, open_sessions, resolve_profile, shrink_options

# settings a stream may change at run time; the others are compiled into the graphs or the slice
RUNTIME_SETTINGS = ("n", "m", "k", "eps", "lr", "clip", "weight_decay", "betas", "adam_eps", "reset", "decay",
                    "teacher", "gamma", "probes", "sink", "fill", "sync_skip", "ntp_weight", "read_scale", "mix",
                    "mix_share", "mix_window", "replay", "replay_mode", "replay_steps", "replay_tokens")
PLAN_MARGIN = 0.10      # safety margin on the planner's prediction (its calibration error, benchmarks/planner.md)


class Model:
    """One bundle, opened and verified: both ONNX Runtime sessions over one map of the weights, the tokenizer,
    the initial adapters and the graph I/O names."""

    def __init__(self, bundle: Bundle, sessions: Sessions, tokenizer, profile=None, device: str = "cpu",
                 open_seconds: float = 0.0):
        self.bundle = bundle
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.profile = profile
        self.device = device
        self.open_seconds = open_seconds
        L = bundle.num_layers
        self.past_names = F.past_names(L)
        self.present_names = F.present_names(L)
        self.decoder_outputs = [F.LOGITS, F.HIDDEN_STATES] + self.present_names
        self.eos_ids = bundle.eos_ids
        # the fixed tokens at position 0 of every context (bos bundles: the BOS), outside the train step's loss
        self.sink_ids: list[int] = [bundle.bos_id] if bundle.bos_id is not None else []
        self.adapter_specs = bundle.adapters
        self.adapter_names = [s.name for s in self.adapter_specs]
        self.empty_past = np.zeros((1, bundle.num_kv_heads, 0, bundle.head_dim), np.float32)
        self.initial_adapters = self._read_initial_adapters()
        # adapters the decoder takes packed (export/lora_packing.py): built from a stream's own when it calls it
        self.packed_adapters = bundle.packed_adapters
        # teacher="base": the decoder with every B at zero is the base model. The zero Bs are views of ONE
        # read-only buffer the size of the largest B (sessions only read inputs), shared by every stream.
        b_sizes = [int(np.prod(s.shape)) for s in self.adapter_specs if s.name.endswith(".lora_B")]
        b_sizes += [int(np.prod(p["shape"])) for p in bundle.packed_adapters.values()]
        self._zero_b = np.zeros(max(b_sizes, default=0), np.float32)
        self._zero_b.flags.writeable = False
        # gradients, optimizer temporaries and the rollback backup: needed only during a round, shared by every
        # stream of this model (rounds take turns under scratch.lock); a stream keeps params and moments
        self.scratch = Scratch(sum(int(np.prod(s.shape)) for s in self.adapter_specs))
        self.grad_values = None    # OrtValues over scratch.grads, made on first use
        # the round's decoder passes give the arena's free regions back when they end (sessions.shrink_options)
        self.round_run_options = shrink_options(profile, device)

    def decoder_adapters(self, adapters: dict) -> dict:
        """The decoder's adapter inputs from one numpy array per adapter: the same dict for bundles without packed
        adapters; else the packed inputs in one new buffer (one pass over the adapters, transient: a final loss
        evaluation or one answer) and the given arrays for the rest (runtime/packing.py)."""
        return decoder_adapters(self.packed_adapters, adapters)

    def base_decoder_adapters(self, adapters: dict) -> dict:
        """The decoder's inputs for the base model (every B at zero, teacher="base"): `adapters` with each B a
        view of the shared zero buffer, and every packed input too (zero A and B give the same zero path)."""
        base = {n: (self.zero_b(v.shape) if n.endswith(".lora_B") else v) for n, v in adapters.items()}
        base.update({n: self.zero_b(tuple(p["shape"])) for n, p in self.packed_adapters.items()})
        return decoder_adapters(self.packed_adapters, base)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, bundle_dir: str | os.PathLike, device: str = "cpu", profile=None, share_weights: bool = True,
             verify_hashes: bool = True, combined: bool = True) -> "Model":
        """Verify a bundle (hashes, external data inside it, graph I/O) and open its sessions on `device`.

        profile: a device profile name or JSON file (`absorber devices`), or a Profile. share_weights: both
        graphs read the frozen weights from ONE memory map of weights.bin instead of each session its own.
        combined: a bundle with combined.onnx (int8/int4) runs both graphs in ONE session, so the integer
        kernels' pre-packed weights are held once (False: two sessions, as for older bundles; for comparisons)."""
        t0 = time.perf_counter()
        bundle = open_bundle(bundle_dir, verify_hashes=verify_hashes)
        profile = resolve_profile(profile)
        tokenizer = _load_tokenizer(bundle)
        sessions = open_sessions(bundle, device=device, profile=profile, share_weights=share_weights,
                                 combined=combined)
        return cls(bundle, sessions, tokenizer, profile=profile, device=device,
                   open_seconds=time.perf_counter() - t0)

    def _read_initial_adapters(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file
        b = self.bundle
        try:
            init = load_file(str(b.adapters_path))
        except Exception as e:  # noqa: BLE001
            raise AbsorberError(f"bundle {b.path}: cannot read {b.adapters_path.name} ({type(e).__name__})") from None
        for s in self.adapter_specs:
            if s.name not in init or tuple(init[s.name].shape) != s.shape:
                raise AbsorberError(f"bundle {b.path}: {b.adapters_path.name} lacks {s.name} {s.shape}")
            init[s.name].flags.writeable = False
        return {s.name: init[s.name] for s in self.adapter_specs}

    # ------------------------------------------------------------------ facts shared by streams
    @property
    def decoder(self):
        return self.sessions.decoder

    @property
    def train_step(self):
        return self.sessions.train_step

    @property
    def providers(self) -> list[str]:
        return self.sessions.providers

    @property
    def max_positions(self) -> int:
        return self.bundle.max_positions

    def config(self, overrides: dict | None = None, memory_budget: int | str | None = None) -> AbsorberConfig:
        """A stream's settings: the bundle's defaults, then the profile's n/m/k, then `overrides` (None values
        are ignored). The loss (kind, layers, sync_skip) and the slice are fixed by the bundle.

        memory_budget (bytes or a size such as "600MB"; default: the profile's memory_budget_mb unless n or m is
        given): the planner's predicted peak RSS of a round (absorber plan) plus a 10 % margin must fit it. The
        window above is an upper bound that shrinks (n/m ratio kept, m a multiple of 16) until it does; one clear
        error when even the smallest window does not fit."""
        cfg = self.bundle.defaults()
        if self.profile is not None:
            cfg = override(cfg, **{k: getattr(self.profile, k, None) for k in ("n", "m", "k")})
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        bad = [k for k in overrides if k not in RUNTIME_SETTINGS]
        if bad:
            raise AbsorberError(f"cannot override {bad[0]!r} at run time (it is fixed by the bundle or unknown)")
        skip = self.bundle.loss_skip
        if overrides.get("sync_skip", skip) != skip:
            raise AbsorberError(f"sync_skip={overrides['sync_skip']} but this bundle's train step leaves {skip} "
                                f"position(s) out of the loss (fixed at export: absorber export --sync-skip)")
        w = self.bundle.loss_ntp_weight
        if float(overrides.get("ntp_weight", w)) != w:
            raise AbsorberError(f"ntp_weight={overrides['ntp_weight']} but this bundle's train step has {w:g} "
                                f"(fixed at export: absorber export --ntp-weight)")
        cfg = override(cfg, **overrides)
        cfg.validate()
        if cfg.replay > 0 and cfg.replay_steps == 0:
            raise AbsorberError("replay needs replay_steps > 0 here: the train step replays a kept X in steps of "
                                "its own (replay_steps 0, a term added to every step, is a reference option)")
        if cfg.bos and cfg.teacher == "compose":
            raise AbsorberError("teacher='compose' is not supported on a bos bundle (the compositional teacher "
                                "takes no prefix)")
        if cfg.kl_weight:
            raise AbsorberError("kl_weight > 0 is not supported by the runtime (hidden-state loss only)")
        if cfg.n + cfg.m > self.max_positions:
            raise AbsorberError(f"n+m = {cfg.n + cfg.m} exceeds the model's {self.max_positions} positions")
        budget = memory_budget
        if budget is None and self.profile is not None and not ({"n", "m"} & set(overrides)):
            budget = self.profile.memory_budget_bytes     # a profile's budget is a default: an explicit n/m wins
        if budget is not None:
            cfg = self._fit_budget(cfg, parse_size(budget))
        return cfg

    def _fit_budget(self, cfg: AbsorberConfig, budget: int) -> AbsorberConfig:
        """cfg with the largest window no larger than cfg's (n/m ratio kept) whose predicted peak (devices.planner,
        with this model's session settings) plus PLAN_MARGIN fits the budget; one clear error when none does."""
        kw = self.planner_settings()
        if predict(self.bundle, cfg.n, cfg.m, cfg.k, **kw).peak_bytes * (1 + PLAN_MARGIN) <= budget:
            return cfg
        p = plan(self.bundle, budget, cfg.k, ratio=cfg.n / cfg.m, max_m=cfg.m, margin=PLAN_MARGIN, **kw)
        return override(cfg, n=p.n, m=p.m)

    def predict_peak(self, cfg: AbsorberConfig):
        """The planner's Prediction (devices.planner) of a round's peak RSS at cfg's window on this model."""
        return predict(self.bundle, cfg.n, cfg.m, cfg.k, **self.planner_settings())

    def planner_settings(self) -> dict:
        """The session settings the planner's prediction depends on (arena, memory pattern)."""
        pr = self.profile if self.profile is not None else default_profile()   # what the sessions were opened with
        return {"arena": bool(pr.enable_cpu_mem_arena), "mem_pattern": bool(pr.enable_mem_pattern)}

    def zero_b(self, shape: tuple[int, ...]) -> np.ndarray:
        """A read-only zero array of `shape` (a view of the shared zero-B buffer)."""
        return self._zero_b[:int(np.prod(shape))].reshape(shape)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True)

    def close(self) -> None:
        self.sessions.close()


def _load_tokenizer(bundle: Bundle):
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(bundle.tokenizer_path))
    except Exception as e:  # noqa: BLE001
        raise AbsorberError(f"bundle {bundle.path}: cannot read {bundle.tokenizer_path.name} "
                            f"({type(e).__name__})") from None
