"""All the knobs of the method in one dataclass (no torch import: the runtime and bundles read it too)."""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

from absorber.mixture import SHARE
from absorber.replay import REPLAY_MODES, SPACED_BASES, spaced_distances

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROBE_PREFIX = "To recap what was said so far: "   # recall probes (AbsorberConfig.probes) start with this text
# generated probes (AbsorberConfig.probe_gen): prompt j is followed by what the base model says next with X in
# context. Worded to draw out the kind of content a user asks about later (who, what role, which numbers).
GEN_PROBE_PROMPTS = (
    "\n\nTo recap, the names, roles, places and numbers mentioned so far are:",
    "\n\nIn short, the speaker announced that",
    "\n\nThe key facts from the passage above are:",
    "\n\nQ: What did the speaker promise?\nA: The speaker promised",
)


def probe_parts(n: int, probes: int) -> list[tuple[int, int]]:
    """[start, end) of each recall probe's part of X (n tokens cut into `probes` near-equal parts). Shared by the
    reference and the runtime so that both cut X the same way."""
    if probes <= 0:
        return []
    bounds = [round(j * n / probes) for j in range(probes + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def anchor_text() -> str:
    """The fixed replay text of the anchor term (AbsorberConfig.anchor): plain, varied prose written for this
    project, unrelated to any stream."""
    from importlib.resources import files
    return files("absorber").joinpath("anchor.txt").read_text(encoding="utf-8")


@dataclass
class LoraConfig:
    """The trainable slice: LoRA adapters A:[in, r], B:[r, out] added to frozen linear layers."""
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ALL_LINEAR     # leaf module names (Llama family naming)
    layers: tuple[int, ...] | None = None     # decoder layer indices; None = all
    seed: int = 0                             # init of A (B starts at zero: the adapters start as identity)
    sparse: int = 0                           # > 0: instead of LoRA, train the value vectors (down_proj columns)
                                              # of this many MLP neurons per layer per round, those X uses most
                                              # against the background (anchor text + earlier X): tf-idf, as in
                                              # sparse memory finetuning (arXiv 2510.15103). Reference only. 0: LoRA
    protect: float = 0.0                      # > 0: each adapted layer reads its input with this fraction of its
                                              # dimensions removed: the top principal directions of that layer's
                                              # inputs on background text (the base model's own samples + the
                                              # anchor text), so ordinary text barely reaches the adapters (the
                                              # null-space constraint of AlphaEdit, arXiv 2410.02355;
                                              # absorber/protect.py). Reference only. 0: off
    protect_tokens: int = 2048                # background tokens sampled for `protect`
    prefix_kv: int = 0                        # > 0: instead of LoRA, a trained KV prefix of this many slots in
                                              # every layer's attention (Cartridges, arXiv 2506.06266): keys and
                                              # values every query may attend to, started from the frozen model's
                                              # KV of its own sample text, the first slot (its BOS) frozen as the
                                              # sink (absorber/prefix_kv.py). Reference only. 0: LoRA

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class AbsorberConfig:
    """Absorber LLM settings. Defaults are for a laptop CPU and a ~100M model; `paper()` gives the paper's."""
    n: int = 512                 # tokens absorbed per round (X)
    m: int = 256                 # tokens synchronized per round (Y)
    k: int = 16                  # at most K optimizer steps per round
    eps: float = 0.0             # stop early when the loss falls under eps (0: never; see docs on the scale)
    lr: float = 1e-4             # with the next-token term (ntp_weight 1); the sync loss alone shipped with 1e-3
    clip: float = 1.0            # gradient-norm clipping (0: off)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    loss: str = "l1"             # "l1" (paper), "l2", or "l1n": per-layer L1 divided by the teacher's mean |h| of
                                 # that layer (massive activations no longer dominate; Deep Context Distillation)
    loss_layers: tuple[int, ...] | None = None   # hidden_states indices matched; None = 1..L (h^0 is context-free)
    kl_weight: float = 0.0       # add KL(teacher || student) on next-token distributions (paper: worse; ablation)
    # --- against drift of the accumulated adapters over many rounds (benchmarks/eval.md measures each) ---
    sync_skip: int = 1           # leading Y positions left out of the sync loss: Y's first token is the
                                 # student's attention sink (its L1 is ~65x the median); matching it asks the
                                 # adapters to undo the sink. Better in all three studies of benchmarks/eval.md
                                 # (small). Compiled into a bundle's train step at export.
    reset: str = "none"          # before each round: "none" (paper: adapters and AdamW moments carry over),
                                 # "moments" (fresh AdamW moments), "adapters" (fresh adapters: a diagnosis)
    decay: float = 0.0           # before each round scale every lora_B (sparse: the committed values) by
                                 # (1 - decay): older text fades
    teacher: str = "base"        # "base": the frozen model with X in context (adapters off) is the target;
                                 # "current": base + current adapters (the paper's W <- W*). "current" drifts:
                                 # each round chases the previous rounds' errors (benchmarks/eval.md, drift);
                                 # "compose": h_base(X.Y) + gamma * (h_current(Y) - h_base(Y)) at Y: what the
                                 # adapters add on Y alone, on top of the base model with X in context (the
                                 # adapters never run with X in context)
    gamma: float = 1.0           # teacher="compose": 1 accumulates, < 1 fades older absorbed content
    probes: int = 0              # recall probes per round, synchronized before Y: X is cut into `probes` parts;
                                 # probe j = PROBE_PREFIX + part j; the teacher sees X then the probe, the student
                                 # the probe alone (a fact Y never uses is in the loss this way). 0: off
    probe_gen: int = 0           # > 0: generated probes instead of replayed parts of X: probe j is
                                 # GEN_PROBE_PROMPTS[j] followed by `probe_gen` tokens the base model writes
                                 # (greedy, repetition penalty 1.3) with X in context (Cartridges' self-study,
                                 # LIFT's auxiliary text): the student learns what the model says ABOUT X, in words
                                 # other than X's. Reference only. 0: off
    prefix: int = 0              # the stream's first `prefix` tokens stay in front of the window for good, in the
                                 # teacher (prefix.X.Y), the student (prefix.Y) and the answering passes, at
                                 # positions 0..prefix-1: Y's first token is no longer the student's attention
                                 # sink (the StreamingLLM / Cartridges sink address). 0: off
    bos: bool = False            # the model's BOS token stays at position 0 of every context: the window and the
                                 # baselines' contexts, the teacher (BOS.prefix.X.Y), the student (BOS.prefix.Y),
                                 # the next-token term on X (conditioned on it) and the answering passes. For models
                                 # pretrained with a BOS in front of every text (Gemma: without it, 4x the
                                 # perplexity, benchmarks/retention.md). Reference only. False: no BOS anywhere
    anchor: float = 0.0          # weight of an anchor term in every step: L1 of the student's hidden states on a
                                 # fixed replay text (absorber/anchor.txt, no context) against the base model's
                                 # on it: the adapters may not change ordinary text. 0: off
    anchor_tokens: int = 64      # tokens of the anchor text used
    anchor_kl: float = 0.0       # weight of KL(base || student) on the anchor text's next-token distributions
                                 # (no context), in every step: what held-out perplexity measures, without the
                                 # massive channels that dominate the hidden-state L1 of `anchor`. Reference
                                 # only (bundles: 0). 0: off
    anchor_sampled: int = 0      # > 0: the anchor text (anchor, anchor_kl) is this many tokens of the frozen
                                 # model's own samples (absorber/protect.py: background_rows, fixed seed), rows of
                                 # anchor_tokens, one row per step in turn, instead of absorber/anchor.txt:
                                 # the model's prior over ordinary text, not one paragraph. Reference only. 0: off
    ntp_weight: float = 1.0      # method "absorber": + ntp_weight x the next-token loss of the student on X
                                 # itself (no context) in every step: sync on Y plus TTT on X; the round's
                                 # reported losses include the term. The default since it won at the shipped
                                 # window (benchmarks/retention.md: forgetting curve 0.28 vs 0.03, next-text R
                                 # 0.86 vs 0.13, held-out damage +0.9 % vs +8.4 %); compiled into a bundle's
                                 # train step at export (absorber export --ntp-weight). 0: the sync loss alone
    ntp_top: float = 1.0         # with ntp_weight: the next-token term scores only this fraction of X's tokens,
                                 # those the frozen model (no context) finds most surprising (invented names,
                                 # numbers: where facts are), not the predictable ones that carry the register
    read_scale: float = 1.0      # answers (and every scoring of the method: the forgetting curve, next-text, the
                                 # damage check) read the LoRA paths at this scale; training, the teacher and the
                                 # round's own losses use them whole (lora.read_scaled; runtime: the decoder's B
                                 # inputs scaled when answering). Written at lr 1e-3 and read at 0.25 they kept
                                 # 0.37 of the facts at +4.9 % damage (screening window, 3 speeches), ~0.1 above
                                 # the lr frontier; at the shipped window less (benchmarks/retention.md). 1: as trained
    mix: bool = False            # answers (and every scoring of the method) come from the online mixture of the
                                 # adapted and the base model (absorber/mixture.py): the adapters' weight learned
                                 # causally from the context before each token (Bayes, fixed share
                                 # mix_share), so text the adapters do not help reads the base model: the same
                                 # facts and next-text R, off-genre damage +5.9 % -> +0.3 % (benchmarks/
                                 # retention.md). Two decoder passes per answer token; training never sees it. Off
                                 # here so that recorded reference commands keep their meaning; `absorber export`
                                 # records it on in a bundle's defaults (--no-mix: off)
    mix_share: float = SHARE     # with mix: the fixed share of weight passed between the two models after every token
                                 # (mixture.Mixture.share): larger follows a change of which model predicts better
                                 # sooner, at up to ~share nats per token against the better one
    mix_window: int = 0          # with mix: the weight learns from at most the last W tokens before the first scored
                                 # or generated one (mixture.Mixture.learn); the runtime runs the prompt's tokens
                                 # before them without the output head (a Gemma answer's prompt otherwise computes
                                 # the 262k-word head at every position, twice). 0: the whole context
    calibrate: int = 0           # > 0: after every round, measure the adapters' context-free shift of the next-token
                                 # log-probabilities on this many tokens of the frozen model's own samples (rows of
                                 # 128) and subtract it from the logits wherever the adapted model predicts
                                 # (absorber/calibrate.py; training never sees it). Raises the damage it was meant
                                 # to remove (benchmarks/retention.md). Reference only. 0: off
    ntp_context: int = 0         # with ntp_weight: the last c tokens of the previous round's X stay in front of X
                                 # in the next-token term (not scored), as ttt_context does for TTT: what the text
                                 # before X already predicts (its register) needs no writing. Reference only. 0: off
    ttt_context: int = 0         # method "ttt": the last c tokens of the previous round's X stay in front of X in
                                 # its next-token loss (not scored): Temp-LoRA's conditioned chunks. 0: X alone
    replay: int = 0              # with ntp_weight: keep this many absorbed X (token ids: 4 bytes a token) and train
                                 # the next-token term on them again, in turn (experience replay: a fact gets more
                                 # steps than its own round's K, spread over later rounds, against what they
                                 # overwrite): in replay_steps more steps a round (the runtime's way), or with
                                 # replay_steps 0 added to every step (reference only). 0: off
    replay_mode: str = "recent"  # with replay: "recent" keeps the last `replay` X; "reservoir" a uniform sample of
                                 # every X so far (Vitter's algorithm R, seeded by lora.seed): old text keeps a share;
                                 # "spaced" keeps the last `replay` X and replays each 1, 3, 9, 27, ... rounds after
                                 # it was absorbed; "spaced2" at 1, 2, 4, 8, ... (absorber/replay.py)
    replay_tokens: int = 0       # with replay: each step replays this many tokens of the kept X (the slices in
                                 # turn), not the whole X: a cheaper step. 0: the whole X
    replay_steps: int = 0        # with replay: instead of adding the term on a kept X to every step, the round runs
                                 # this many more steps after its K, each with the next-token term on a kept X (in
                                 # turn) in place of this round's X, the sync on Y the same: what the runtime's
                                 # train step runs as it is (one more step each, another x_ids). 0: every step
    cloze: int = 0               # with ntp_weight: the next-token term also writes this many cloze probes of X a
                                 # round (absorber/cloze.py): X's most surprising sentences asked back as questions,
                                 # cut before their most surprising word (the name it belongs to), appended to X in
                                 # the term (and kept with X for replay); the teacher and Y are unchanged. Reference
                                 # only. 0: off
    cloze_gen: int = 0           # with cloze: each probe's question is the frozen model's own, written about the
                                 # sentence in up to this many tokens (absorber/cloze.py GEN_PROMPT; greedy, to its
                                 # first "?"), then the sentence from its cut as the answer; without a "?" the cloze
                                 # frame. Reference only. 0: the cloze frame
    sink: int = 4                # sink tokens kept by the StreamingLLM baseline
    fill: bool = False           # at flush, fill a short Y with greedy continuations (the paper's Algorithm 2)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @classmethod
    def paper(cls) -> "AbsorberConfig":
        """The paper's settings (LLaMA-2-7B on a GPU): r=64, lr 5e-4, n=1024, m=2048, teacher = current model."""
        return cls(n=1024, m=2048, lr=5e-4, teacher="current", sync_skip=0, ntp_weight=0.0,
                   lora=LoraConfig(rank=64, alpha=128.0))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AbsorberConfig":
        d = dict(d)
        lora = LoraConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.pop("lora", {}).items()})
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(lora=lora, **d)

    def validate(self) -> None:
        from absorber.errors import AbsorberError
        if self.n < 1 or self.m < 1:
            raise AbsorberError(f"n and m must be positive (got n={self.n}, m={self.m})")
        if self.k < 0:
            raise AbsorberError(f"k must be >= 0 (got {self.k})")
        if self.loss not in ("l1", "l2", "l1n"):
            raise AbsorberError(f"loss must be l1, l2 or l1n (got {self.loss!r})")
        if (self.prefix < 0 or self.anchor < 0 or self.anchor_kl < 0 or self.anchor_tokens < 2
                or self.anchor_sampled < 0):
            raise AbsorberError(f"prefix, anchor, anchor_kl and anchor_sampled must be >= 0 and anchor_tokens >= 2 "
                                f"(got {self.prefix}, {self.anchor}, {self.anchor_kl}, {self.anchor_sampled}, "
                                f"{self.anchor_tokens})")
        if not 0 <= self.sync_skip < self.m:
            raise AbsorberError(f"sync_skip must be in 0..m-1 (got {self.sync_skip}, m={self.m})")
        if self.reset not in ("none", "moments", "adapters"):
            raise AbsorberError(f"reset must be none, moments or adapters (got {self.reset!r})")
        if not 0.0 <= self.decay < 1.0:
            raise AbsorberError(f"decay must be in [0, 1) (got {self.decay})")
        if self.teacher not in ("current", "base", "compose"):
            raise AbsorberError(f"teacher must be current, base or compose (got {self.teacher!r})")
        if not 0.0 <= self.gamma <= 1.0:
            raise AbsorberError(f"gamma must be in [0, 1] (got {self.gamma})")
        if self.probes < 0 or self.probes > self.n:
            raise AbsorberError(f"probes must be in 0..n (got {self.probes})")
        if self.probe_gen < 0 or (self.probe_gen and self.probes > len(GEN_PROBE_PROMPTS)):
            raise AbsorberError(f"probe_gen must be >= 0 and, with it, probes at most {len(GEN_PROBE_PROMPTS)} "
                                f"(got probe_gen={self.probe_gen}, probes={self.probes})")
        if not (0 < self.ntp_top <= 1):
            raise AbsorberError(f"ntp_top must be in (0, 1] (got {self.ntp_top})")
        if not (self.ntp_weight >= 0 and math.isfinite(self.ntp_weight)):
            raise AbsorberError(f"ntp_weight must be a finite number >= 0 (got {self.ntp_weight})")
        if not isinstance(self.mix, bool):
            raise AbsorberError(f"mix must be true or false (got {self.mix!r})")
        if isinstance(self.mix_share, bool) or not isinstance(self.mix_share, (int, float)) \
                or not 0.0 <= self.mix_share < 0.5:
            raise AbsorberError(f"mix_share must be a number in [0, 0.5) (got {self.mix_share!r})")
        if isinstance(self.mix_window, bool) or not isinstance(self.mix_window, int) or self.mix_window < 0:
            raise AbsorberError(f"mix_window must be a whole number of tokens >= 0 (got {self.mix_window!r})")
        if not (self.read_scale >= 0 and math.isfinite(self.read_scale)):
            raise AbsorberError(f"read_scale must be a finite number >= 0 (got {self.read_scale})")
        if self.calibrate < 0:
            raise AbsorberError(f"calibrate must be >= 0 background tokens (got {self.calibrate})")
        if self.replay < 0 or self.replay_tokens < 0 or self.replay_tokens == 1 or self.replay_steps < 0:
            raise AbsorberError(f"replay and replay_steps must be >= 0 and replay_tokens 0 (all) or >= 2 (got "
                                f"{self.replay}, {self.replay_steps}, {self.replay_tokens})")
        if self.replay_mode not in REPLAY_MODES:
            raise AbsorberError(f"replay_mode must be one of {', '.join(REPLAY_MODES)} (got {self.replay_mode!r})")
        if self.replay_mode in SPACED_BASES and self.replay_steps:
            due = len(spaced_distances(self.replay, SPACED_BASES[self.replay_mode]))
            if self.replay_steps < due:
                warnings.warn(f"replay_mode {self.replay_mode} with replay {self.replay} has {due} due texts a round "
                              f"at steady state and replay_steps {self.replay_steps}: the schedule falls behind, and "
                              f"replays come late or never (use replay_steps {due})", UserWarning, stacklevel=2)
        if self.replay and (self.ntp_weight == 0 or self.ntp_top < 1):
            raise AbsorberError("replay replays the next-token term on whole texts: it needs ntp_weight > 0 and "
                                "ntp_top 1")
        if self.cloze < 0 or self.cloze_gen < 0 or (self.cloze and (self.ntp_weight == 0 or self.ntp_top < 1)):
            raise AbsorberError(f"cloze and cloze_gen must be >= 0, and cloze needs ntp_weight > 0 and ntp_top 1 (got "
                                f"cloze {self.cloze}, cloze_gen {self.cloze_gen}, ntp_weight {self.ntp_weight}, "
                                f"ntp_top {self.ntp_top})")
        if self.ttt_context < 0 or self.ntp_context < 0:
            raise AbsorberError(f"ttt_context and ntp_context must be >= 0 (got {self.ttt_context}, "
                                f"{self.ntp_context})")
        if self.lora.rank < 1:
            raise AbsorberError(f"LoRA rank must be >= 1 (got {self.lora.rank})")
        if self.lora.sparse < 0:
            raise AbsorberError(f"LoRA sparse must be >= 0 neurons per layer (got {self.lora.sparse})")
        if self.lora.prefix_kv < 0 or self.lora.prefix_kv == 1:
            raise AbsorberError(f"LoRA prefix_kv must be 0 (off) or >= 2 slots (got {self.lora.prefix_kv})")
        if self.lora.prefix_kv and (self.lora.sparse or self.lora.protect):
            raise AbsorberError("LoRA prefix_kv replaces the LoRA slice: it does not combine with sparse or protect")
        if not 0.0 <= self.lora.protect < 1.0 or self.lora.protect_tokens < 2:
            raise AbsorberError(f"LoRA protect must be in [0, 1) and protect_tokens >= 2 (got "
                                f"{self.lora.protect}, {self.lora.protect_tokens})")


# ------------------------------------------------------------------------------------------------ flags -> config
LORA_KEYS = {"rank": "rank", "alpha": "alpha", "targets": "targets", "layers": "layers", "seed": "seed",
             "sparse": "sparse", "protect": "protect", "protect_tokens": "protect_tokens", "prefix_kv": "prefix_kv",
             "lora.prefix_kv": "prefix_kv", "lora.rank": "rank",
             "lora.alpha": "alpha", "lora.targets": "targets", "lora.layers": "layers", "lora.seed": "seed",
             "lora.sparse": "sparse", "lora.protect": "protect", "lora.protect_tokens": "protect_tokens"}
_INT_KEYS = ("n", "m", "k", "sink", "sync_skip", "prefix", "anchor_tokens", "anchor_sampled", "probes", "probe_gen",
             "ttt_context", "ntp_context", "calibrate", "replay", "replay_steps", "replay_tokens", "cloze",
             "cloze_gen", "lora.rank", "lora.seed", "lora.sparse", "lora.protect_tokens", "lora.prefix_kv")
_TUPLE_KEYS = ("loss_layers", "betas", "lora.targets", "lora.layers")


def override(cfg: AbsorberConfig, **flags) -> AbsorberConfig:
    """A new config: `cfg` with every flag that is not None applied. The one path from command-line flags (and
    sweep points, and run-time overrides) to an AbsorberConfig.

    Keys: any AbsorberConfig field; LoRA fields as rank, alpha, targets, layers, seed (or lora.rank, ...).
    The rank/alpha rule: when the rank changes and alpha is not given, alpha/rank (the adapters' scaling) stays
    what it was (16/32 -> 8/16). Lists become tuples. Unknown keys raise AbsorberError."""
    from absorber.errors import AbsorberError
    top: dict = {}
    lora: dict = {}
    for key, value in flags.items():
        if value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        if key in LORA_KEYS:
            lora[LORA_KEYS[key]] = value
        elif key == "lora" and isinstance(value, LoraConfig):
            top["lora"] = value
        elif key in AbsorberConfig.__dataclass_fields__ and key != "lora":
            top[key] = value
        else:
            raise AbsorberError(f"unknown setting {key!r}")
    out = dataclasses.replace(cfg, **top)
    if lora:
        lc = out.lora
        if "rank" in lora and "alpha" not in lora and lora["rank"] != lc.rank:
            lora["alpha"] = lc.alpha * lora["rank"] / lc.rank
        out = dataclasses.replace(out, lora=dataclasses.replace(lc, **lora))
    return out


def parse_value(key: str, text: str):
    """One setting's value from text: ints for counts, tuples for layer/target lists ('all'/'none' = None)."""
    from absorber.errors import AbsorberError
    import re
    key = {"rank": "lora.rank", "alpha": "lora.alpha", "targets": "lora.targets", "layers": "lora.layers",
           "seed": "lora.seed", "sparse": "lora.sparse", "protect": "lora.protect",
           "protect_tokens": "lora.protect_tokens", "prefix_kv": "lora.prefix_kv"}.get(key, key)
    v = text.strip()
    if key in _TUPLE_KEYS:
        if v in ("all", "none", ""):
            return tuple(LoraConfig().targets) if key == "lora.targets" else None
        parts = [p for p in re.split(r"[+:/ ,]", v) if p]
        try:
            return tuple(parts) if key == "lora.targets" else tuple(
                float(p) if key == "betas" else int(p) for p in parts)
        except ValueError:
            raise AbsorberError(f"bad value {text!r} for {key}") from None
    if key in ("loss", "reset", "teacher", "replay_mode"):
        return v
    if key in ("fill", "bos", "mix"):
        return v.lower() in ("1", "true", "yes", "on")
    try:
        x = float(v)
    except ValueError:
        raise AbsorberError(f"bad value {text!r} for {key}") from None
    return int(x) if x.is_integer() and key in _INT_KEYS else x


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every point of a parse_sweep grid, as override() flags, in itertools.product order."""
    import itertools
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def parse_sweep(specs) -> dict[str, list]:
    """["n=128,256", "lr=1e-3,2e-3", "loss_layers=all|15,30"] -> {"n": [128, 256], ...}: a grid of override()
    keys (lists separated by ',' or, when a value itself holds commas, by '|')."""
    from absorber.errors import AbsorberError
    grid: dict[str, list] = {}
    for spec in specs:
        if "=" not in spec:
            raise AbsorberError(f"sweep spec {spec!r} is not key=v1,v2")
        key, vals = spec.split("=", 1)
        key = {"rank": "lora.rank", "alpha": "lora.alpha", "targets": "lora.targets"}.get(key.strip(), key.strip())
        if key not in LORA_KEYS and key not in AbsorberConfig.__dataclass_fields__:
            raise AbsorberError(f"unknown setting {key!r} in sweep spec {spec!r}")
        sep = "|" if "|" in vals else ","
        grid[key] = [parse_value(key, v) for v in vals.split(sep)]
    return grid
