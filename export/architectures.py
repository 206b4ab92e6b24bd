"""Per-architecture facts the exporter needs, in one small registry (no torch import).

An entry says which transformers `model_type`s the exporter has been checked on, which leaf module names are
LoRA targets there, and how to read the model facts the manifest records. The exporter itself is
architecture-neutral (it traces `absorber.sync.SyncLoss` and the model's own forward); adding a family means
adding an entry here and a tiny-model test.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from absorber.config import ALL_LINEAR
from absorber.errors import AbsorberError


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    targets: tuple[str, ...]                 # leaf names of the linear layers a LoRA adapter may wrap
    tested: tuple[str, ...] = field(default_factory=tuple)   # checkpoints the exporter was checked on
    # pretrained with a BOS at position 0 of every sequence: `absorber export --bos auto` puts it in front of every
    # context (AbsorberConfig.bos). Gemma-3-270M's perplexity on held-out text is 115 without it and 29 with it;
    # SmolLM2's "BOS" is its chat token, and it reads text as well without it (benchmarks/bos_check.json)
    bos: bool = False
    # the run-time settings a bundle records when its answers mix (absorber export --mix, the default), where they
    # were measured on this family; the others stay AbsorberConfig's. Through the mixture, writing harder than lr 1e-4
    # keeps more of what was said, and a share of 0.01 keeps unrelated text within 2 %. SmolLM2 (llama): lr 3e-4
    # keeps 0.45 of the facts 8 rounds after eviction against 0.27 (benchmarks/retention.md, "A larger share"), and
    # 8 steps at lr 1e-3 keep 0.49 in half the round time, next-text R level ("Fewer steps at a higher lr");
    # Gemma-3-270M at lr 3e-4: 0.43 against 0.30 at 4 rounds ("Gemma-3-270M at lr 3e-4"; 8 steps at lr 6e-4 keep 0.38
    # against 0.44, "Gemma-3-270M in 8 steps").
    # At share 0.01 the weight forgets evidence older than ~100 tokens: learned from the last 128 tokens of an
    # answer's prompt, every planted fact's answer NLL moved by < 2e-5 nats, and the runtime skips the output head
    # over the rest of the prompt ("The mixture's weight from the prompt's last 128 tokens"). SmolLM2 replays its last
    # 8 absorbed chunks, 4 more steps a round: 0.64 of the facts at 8 rounds against 0.49, damage +0.3 % through the
    # mixture, next-text R 0.72 against 0.80 (paired -0.08 [-0.22, +0.02]) ("Experience replay"). Gemma-3-270M replays
    # the same: 0.56 of the facts at 8 rounds against 0.42 (paired +0.14 [+0.10, +0.17]), damage -0.2 %, next-text R
    # 0.30 against 0.34 (paired -0.04 [-0.10, +0.02]), key-token R +0.03 ("Experience replay on Gemma-3-270M")
    mixed: tuple[tuple[str, float | int], ...] = ()

    def facts(self, config) -> dict:
        """The model facts of the manifest, from a transformers config."""
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or hidden // heads

        def ids(v):
            if v is None:
                return None
            return [int(x) for x in v] if isinstance(v, (list, tuple)) else int(v)

        return {
            "architecture": self.family,
            "model_type": str(config.model_type),
            "num_layers": int(config.num_hidden_layers),
            "num_heads": heads,
            "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
            "head_dim": int(head_dim),
            "hidden": hidden,
            "intermediate": int(getattr(config, "intermediate_size", 0) or 0),
            "vocab": int(config.vocab_size),
            "max_positions": int(getattr(config, "max_position_embeddings", 2048)),
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "bos_token_id": ids(getattr(config, "bos_token_id", None)),
            "eos_token_id": ids(getattr(config, "eos_token_id", None)),
            "pad_token_id": ids(getattr(config, "pad_token_id", None)),
        }


LLAMA = Architecture(
    family="llama",
    model_types=("llama", "qwen2"),
    targets=ALL_LINEAR,
    tested=("SmolLM2-135M-Instruct (llama)", "tiny random LlamaConfig"),
    mixed=(("lr", 1e-3), ("k", 8), ("mix_share", 0.01), ("mix_window", 128), ("replay", 8), ("replay_steps", 4)),
)

GEMMA3 = Architecture(
    family="gemma3",
    model_types=("gemma3_text",),
    targets=ALL_LINEAR,
    tested=("Gemma-3-270M base (gemma3_text)", "tiny random Gemma3TextConfig (sliding-window layers, tied "
            "embeddings)"),
    bos=True,
    mixed=(("lr", 3e-4), ("mix_share", 0.01), ("mix_window", 128), ("replay", 8), ("replay_steps", 4)),
)

REGISTRY: tuple[Architecture, ...] = (LLAMA, GEMMA3)


def supported_model_types() -> list[str]:
    return sorted(t for a in REGISTRY for t in a.model_types)


def lookup(config) -> Architecture:
    """The registry entry of a transformers config, or one clear AbsorberError."""
    mt = getattr(config, "model_type", None)
    for a in REGISTRY:
        if mt in a.model_types:
            return a
    raise AbsorberError(f"architecture {mt!r} is not supported by the exporter "
                        f"(supported model types: {', '.join(supported_model_types())})")


def check_targets(arch: Architecture, targets) -> None:
    bad = [t for t in targets if t not in arch.targets]
    if bad:
        raise AbsorberError(f"LoRA target(s) {', '.join(bad)} do not exist in {arch.family} models "
                            f"(valid: {', '.join(arch.targets)})")
