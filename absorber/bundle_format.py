"""The bundle contract (docs/bundle.md): the one owner of the format shared by the exporter and the runtime.

Everything both sides must agree on lives here and nowhere else: the format version, the file names, the graph
input/output names, the quantization scheme names, file hashing, the manifest's JSON schema and its validation,
and `Bundle`, the one reader of a manifest. The exporter writes through these names; `absorber.runtime.bundle
.open_bundle` validates with `validate_manifest` and returns a `Bundle`; the devices planner, the benchmarks and
the peers read manifests only through `Bundle`.

Importable without torch, onnx or onnxruntime (standard library only), so the device install can use it.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from absorber.config import AbsorberConfig
from absorber.errors import AbsorberError

# ------------------------------------------------------------------------------------------------ version, files
FORMAT = 2                      # 2: the loss settings are recorded once (manifest `loss`), not in `defaults` too
MANIFEST = "manifest.json"
WEIGHTS_FILE = "weights.bin"
ADAPTERS_FILE = "adapters.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GRAPHS = ("decoder", "train_step")
GRAPH_FILES = {"decoder": "decoder.onnx", "train_step": "train_step.onnx"}
# quantized bundles also hold both graphs in one model (export/combined.py), so that ONE ONNX Runtime session
# pre-packs the integer kernels' weights once instead of once per graph: the decoder as the main graph and the
# train step inside an If (bundles of 2026-12-03..05: both graphs as the two branches of one If)
COMBINED = "combined"
COMBINED_FILE = "combined.onnx"
COMBINED_SELECTOR = "graph_is_train_step"   # bool scalar input: True also runs the train step (the If's then_branch)
COMBINED_SELECTOR_BRANCHES = "graph_is_decoder"   # the earlier layout's: True runs the decoder branch, False the train step
COMBINED_MAIN = "main"                      # `branches` value of the graph that is the combined model's main graph
ALIGN = 4096                    # a tensor of a page or more in weights.bin starts on a page boundary (mmap)
SMALL_ALIGN = 64                # a smaller one (per-block scales, zero points) on a cache line: page-aligning
                                # the four small tensors of every quantized weight would pad more than they hold

QUANT_SCHEMES = ("fp32", "int8", "int4")
INT4_BLOCK = 32

# config fields that the manifest's `loss` section records (compiled into train_step.onnx) and that
# `defaults` therefore leaves out
LOSS_FIELDS = ("loss", "loss_layers", "sync_skip", "ntp_weight", "bos")

# ------------------------------------------------------------------------------------------------ graph I/O names
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
LOGITS_TO_KEEP = "logits_to_keep"
TEACHER_HIDDEN = "teacher_hidden"
# the next-token term's head gradient is computed in this many pieces of X (absorber.sync.lean_next_token_loss;
# a fixed count, as X's length is dynamic in the traced graph; the trace needs pieces of >= 2 rows, so it is
# traced with X >= HEAD_CHUNKS + 2 tokens; the graph runs any X of >= 2)
HEAD_CHUNKS = 8
X_IDS = "x_ids"                 # train step with a next-token term (loss.ntp_weight > 0): the absorbed X
LOGITS = "logits"
HIDDEN_STATES = "hidden_states"
LOSS = "loss"


def past_names(num_layers: int) -> list[str]:
    """KV-cache inputs of decoder.onnx, in graph order: past_key.0, past_value.0, past_key.1, ..."""
    return [f"past_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """KV-cache outputs of decoder.onnx, in the order of past_names."""
    return [f"present_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]


def grad_name(adapter: str) -> str:
    """The train step's gradient output for one adapter tensor."""
    return f"grad.{adapter}"


def quant_names(name: str, bits: int) -> dict[str, str]:
    """Stored tensors of a quantized frozen weight (absorber/export/quant.py): q = MatMulNBits' packed blocks,
    view = the same bytes as uint8 [N, K * bits / 8] for the backward's GatherBlockQuantized (bundles before
    2026-12-05: [N, K] uint4 / uint8 for DequantizeLinear), scale, zero (MatMulNBits' zero points), zero8 (the
    8-bit zero points of that dequantization), min (the 4-bit per-block minimum)."""
    return {"q": f"{name}.q{bits}", "view": f"{name}.q{bits}.view", "scale": f"{name}.scale",
            "zero": f"{name}.zp", "zero8": f"{name}.zp8", "min": f"{name}.min"}


def rows_name(stored: str, start: int, stop: int) -> str:
    """A stored tensor's rows start..stop-1 as a tensor of their own (an alias of those bytes: export/quant.py
    dequantizes a large weight in row pieces where a product contracts over its rows)."""
    return f"{stored}.rows{start}-{stop}"


def is_view_rows(name: str) -> bool:
    """name is a row piece (rows_name) of a quantized weight's [N, K] view (quant_names "view")."""
    return re.search(r"\.view\.rows\d+-\d+$", name) is not None


def required_io(graph: str, num_layers: int, adapters: list[str], ntp: bool = False,
                packed: dict | None = None) -> tuple[set[str], set[str]]:
    """(inputs, outputs) that the runtime needs from a graph, whatever the manifest says. ntp: the train step
    carries the next-token term on X (manifest loss.ntp_weight > 0) and so takes X's ids. packed: the decoder's
    packed adapter inputs (manifest graphs.decoder.packed_adapters), which replace the adapters they pack."""
    ins = {INPUT_IDS, POSITION_IDS} | set(adapters)
    if graph == "decoder":
        packed = packed or {}
        ins = (ins - {a for p in packed.values() for a, _ in p["parts"]}) | set(packed)
        return (ins | {LOGITS_TO_KEEP} | set(past_names(num_layers)),
                {LOGITS, HIDDEN_STATES} | set(present_names(num_layers)))
    return ins | {TEACHER_HIDDEN} | ({X_IDS} if ntp else set()), {LOSS} | {grad_name(a) for a in adapters}


# ------------------------------------------------------------------------------------------------ files
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plain_name(loc: str) -> bool:
    """A plain relative file name inside the bundle folder: no folders, no parent, not absolute, no drive."""
    if not loc or loc in (".", "..") or "\x00" in loc:
        return False
    if "/" in loc or "\\" in loc or ":" in loc:
        return False
    return not os.path.isabs(loc)


def safe_rel(rel: str) -> bool:
    """A relative path (sub-folders allowed) that stays inside the bundle."""
    if not rel or os.path.isabs(rel) or "\\" in rel or ":" in rel or "\x00" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


# ------------------------------------------------------------------------------------------------ schema
_int = {"type": "integer"}
_str = {"type": "string"}
_ids = {"anyOf": [{"type": "null"}, _int, {"type": "array", "items": _int}]}
_dim = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}
_plain_file = {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"}   # a file name inside the bundle
_io = {"type": "array", "items": {"type": "object", "required": ["name", "dtype", "shape"],
                                  "properties": {"name": _str, "dtype": _str,
                                                 "shape": {"type": "array", "items": _dim}}}}
_graph = {"type": "object", "required": ["file", "inputs", "outputs", "opset"],
          "properties": {"file": _plain_file, "inputs": _io, "outputs": _io, "opset": _int, "ir_version": _int,
                         # train step only: per-layer activation recomputation (export/recompute.py) and its counts
                         "recompute": {"type": "object", "additionalProperties": _int}}}

_combined = {"type": "object", "required": ["file", "selector", "branches"],
             "properties": {"file": _plain_file, "selector": _str, "opset": _int, "ir_version": _int,
                            "branches": {"type": "object", "required": list(GRAPHS),
                                         "properties": {g: {"enum": [COMBINED_MAIN, "then_branch", "else_branch"]}
                                                        for g in GRAPHS}},
                            # graph -> {its input name: the combined model's input name} where they differ
                            "renamed": {"type": "object", "properties": {
                                g: {"type": "object", "additionalProperties": _str} for g in GRAPHS},
                                "additionalProperties": False}}}

MANIFEST_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "absorber bundle manifest",
    "type": "object",
    "required": ["format", "model", "slice", "adapters_file", "loss", "quant", "session_config",
                 "defaults", "graphs", "external_data", "shared_initializers", "tokenizer", "exporter", "files"],
    "properties": {
        "format": {"enum": [FORMAT]},
        "model": {"type": "object",
                  "required": ["architecture", "model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                               "hidden", "intermediate", "vocab", "max_positions", "tie_word_embeddings",
                               "bos_token_id", "eos_token_id", "pad_token_id"],
                  "properties": {"architecture": _str, "model_type": _str,
                                 "num_layers": {"type": "integer", "minimum": 1},
                                 "num_heads": {"type": "integer", "minimum": 1},
                                 "num_kv_heads": {"type": "integer", "minimum": 1},
                                 "head_dim": {"type": "integer", "minimum": 1},
                                 "hidden": {"type": "integer", "minimum": 1},
                                 "intermediate": {"type": "integer", "minimum": 0},
                                 "vocab": {"type": "integer", "minimum": 1},
                                 "max_positions": {"type": "integer", "minimum": 1},
                                 "tie_word_embeddings": {"type": "boolean"},
                                 "bos_token_id": _ids, "eos_token_id": _ids, "pad_token_id": _ids}},
        "slice": {"type": "object", "required": ["rank", "alpha", "scaling", "targets", "layers", "tensors"],
                  "properties": {
                      "rank": {"type": "integer", "minimum": 1}, "alpha": {"type": "number"},
                      "scaling": {"type": "number"}, "targets": {"type": "array", "items": _str, "minItems": 1},
                      "layers": {"anyOf": [{"type": "null"}, {"type": "array", "items": _int}]},
                      "seed": _int,
                      "tensors": {"type": "array", "minItems": 1, "items": {
                          "type": "object", "required": ["name", "shape", "dtype", "target", "layer"],
                          "properties": {"name": {"type": "string", "pattern": r"\.lora_[AB]$"},
                                         "shape": {"type": "array", "items": _int, "minItems": 2},
                                         "dtype": {"enum": ["float32"]}, "target": _str,
                                         "layer": {"anyOf": [_int, {"type": "null"}]}, "scaling": {"type": "number"}}}}}},
        "adapters_file": _plain_file,
        "loss": {"type": "object", "required": ["kind", "layers", "skip"],
                 "properties": {"kind": {"enum": ["l1", "l2"]},
                                "layers": {"type": "array", "items": _int, "minItems": 1},
                                "skip": {"type": "integer", "minimum": 0},
                                "ntp_weight": {"type": "number", "minimum": 0},
                                "head_chunks": {"type": "integer", "minimum": 1},
                                "bos": {"type": "integer", "minimum": 0}}},
        "quant": {"type": "object", "required": ["scheme"],
                  "properties": {"scheme": {"enum": list(QUANT_SCHEMES)},
                                 "block_size": _int,
                                 "quantized": {"type": "array", "items": _str},
                                 "onnxruntime": _str,
                                 "session_config": {"type": "object"}}},
        "session_config": {"type": "object", "additionalProperties": _str},
        "defaults": {"type": "object", "required": ["n", "m", "k", "lr", "lora"]},
        "graphs": {"type": "object", "required": list(GRAPHS),
                   "properties": {**{g: _graph for g in GRAPHS}, COMBINED: _combined}},
        "external_data": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["file", "tensors"],
            "properties": {"file": _plain_file, "align": _int, "tensors": {"type": "array", "items": {
                "type": "object", "required": ["name", "dtype", "shape", "offset", "length", "graphs"],
                "properties": {"name": _str, "dtype": _str, "shape": {"type": "array", "items": _int},
                               "kernel": {"type": "boolean"}, "alias_of": _str,
                               "offset": {"type": "integer", "minimum": 0}, "length": {"type": "integer", "minimum": 0},
                               "graphs": {"type": "array", "minItems": 1, "items": {"enum": list(GRAPHS)}}}}}}}},
        "shared_initializers": {"type": "array", "items": _str},
        "tokenizer": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["file"],
                                                   "properties": {"file": _plain_file, "config": _plain_file}}]},
        "max_len": _int,
        "exporter": {"type": "object", "required": ["absorber", "torch", "transformers", "onnx", "onnxscript",
                                                    "onnxruntime", "opset"]},
        "files": {"type": "object", "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(v, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, _TYPES[t])


def schema_errors(value, schema: dict = MANIFEST_SCHEMA, path: str = "$") -> list[str]:
    """All violations of `schema` by `value`.

    A small validator for the subset of JSON Schema the manifest uses (type, properties, required,
    additionalProperties, items, enum, minimum, pattern, minItems, anyOf), written here rather than taken from
    `jsonschema` so that the device install (onnxruntime + numpy + tokenizers) gains no dependency tree for it.
    """
    out: list[str] = []
    if "anyOf" in schema:
        if all(schema_errors(value, s, path) for s in schema["anyOf"]):
            out.append(f"{path}: matches none of the allowed forms")
        return out
    t = schema.get("type")
    if t and not _is_type(value, t):
        return [f"{path}: expected {t}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} not one of {schema['enum']}")
    if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
        out.append(f"{path}: {value} < {schema['minimum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        out.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        for k in schema.get("required", []):
            if k not in value:
                out.append(f"{path}: missing key {k!r}")
        props = schema.get("properties", {})
        for k, v in value.items():
            if k in props:
                out += schema_errors(v, props[k], f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += schema_errors(v, schema["additionalProperties"], f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{path}: unexpected key {k!r}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            out.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, v in enumerate(value):
                out += schema_errors(v, schema["items"], f"{path}[{i}]")
    return out


def validate_manifest(manifest, where: str = "bundle manifest") -> None:
    """Raise AbsorberError (one line: the first problem's JSON path) unless `manifest` follows the schema."""
    if isinstance(manifest, dict) and "format" in manifest and manifest["format"] != FORMAT:
        raise AbsorberError(f"{where}: unsupported bundle format {manifest['format']!r} (this version reads "
                            f"format {FORMAT}; re-export the bundle with `absorber export`)")
    errs = schema_errors(manifest)
    if errs:
        raise AbsorberError(f"{where} is invalid: {errs[0]}" + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""))


def defaults_entry(cfg: AbsorberConfig) -> dict:
    """The manifest's `defaults`: the config without the loss settings (recorded once, in `loss`)."""
    d = cfg.to_dict()
    for k in LOSS_FIELDS:
        d.pop(k, None)
    return d


def loss_entry(cfg: AbsorberConfig, layers: list[int], head_chunks: int = 0, bos_id: int | None = None) -> dict:
    """The manifest's `loss`: what train_step.onnx computes (kind, hidden_states indices, skipped positions, and
    the weight of the next-token term on X; 0 and absent in bundles without it; with it, head_chunks: the pieces
    of X its head gradient is computed in, absent where the traced term is the plain cross-entropy; with cfg.bos,
    `bos`: the BOS token id that starts every context, whose position the train step leaves out of the loss)."""
    d = {"kind": cfg.loss, "layers": [int(i) for i in layers], "skip": int(cfg.sync_skip)}
    if cfg.ntp_weight > 0:
        d["ntp_weight"] = float(cfg.ntp_weight)
        if head_chunks:
            d["head_chunks"] = int(head_chunks)
    if cfg.bos:
        if bos_id is None:
            raise AbsorberError("bos=True needs a tokenizer with a BOS token")
        d["bos"] = int(bos_id)
    return d


def is_bundle_folder(path: str | os.PathLike) -> bool:
    """A folder holding a manifest.json that is a JSON object with a `format` key (any version): a bundle
    that an export wrote, which a new export may replace."""
    import json
    m = Path(path) / MANIFEST
    if not m.is_file():
        return False
    try:
        d = json.loads(m.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "format" in d


def read_manifest(folder: str | os.PathLike) -> "Bundle":
    """manifest.json of a bundle folder (or the file itself), parsed and validated against the schema, as a
    Bundle. Checks no other file: `absorber.runtime.bundle.open_bundle` adds the hashes and the graphs."""
    import json

    p = Path(folder)
    mpath = p / MANIFEST if p.is_dir() else p
    root = mpath.parent
    if not p.exists():
        raise AbsorberError(f"bundle folder not found: {p}")
    if not mpath.is_file():
        raise AbsorberError(f"bundle {root}: {MANIFEST} is missing (not a bundle written by `absorber export`?)")
    raw = mpath.read_bytes()
    try:
        man = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AbsorberError(f"bundle {root}: {MANIFEST} is corrupt ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from None
    if not isinstance(man, dict):
        raise AbsorberError(f"bundle {root}: {MANIFEST} is corrupt (not a JSON object)")
    validate_manifest(man, f"bundle {root}: {MANIFEST}")
    return Bundle(root, man, sha256_bytes(raw))


# ------------------------------------------------------------------------------------------------ the reader
@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class StoredTensor:
    """One tensor of an external-data file (weights.bin), as the manifest lists it."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int
    graphs: tuple[str, ...]
    file: str
    kernel: bool = False            # ONNX Runtime pre-packs it (an input of MatMulNBits)
    alias_of: str | None = None     # the same bytes as another stored tensor, reinterpreted


@dataclass
class Bundle:
    """A bundle's manifest, read through typed accessors: the only reader of manifest.json in the project.

    `absorber.runtime.bundle.open_bundle(path)` builds one from a folder after verifying it;
    `Bundle.from_manifest(d)` wraps a manifest dict (validated) with no files, for planning and tests."""
    path: Path | None
    manifest: dict
    manifest_sha256: str = ""
    graph_info: dict = field(default_factory=dict)     # graph -> absorber.runtime.protoscan.GraphInfo

    @classmethod
    def from_manifest(cls, manifest: dict, path: str | os.PathLike | None = None,
                      validate: bool = True) -> "Bundle":
        if validate:
            validate_manifest(manifest)
        return cls(Path(path) if path is not None else None, manifest)

    # ------------------------------------------------------------------ model facts
    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.model["num_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.model["num_kv_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.model["head_dim"])

    @property
    def hidden(self) -> int:
        return int(self.model["hidden"])

    @property
    def intermediate(self) -> int:
        return int(self.model["intermediate"])

    @property
    def vocab(self) -> int:
        return int(self.model["vocab"])

    @property
    def max_positions(self) -> int:
        return int(self.model["max_positions"])

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.model["tie_word_embeddings"])

    @property
    def eos_ids(self) -> set[int]:
        e = self.model.get("eos_token_id")
        if e is None:
            return set()
        return {int(x) for x in e} if isinstance(e, list) else {int(e)}

    # ------------------------------------------------------------------ slice, loss, quantization
    @property
    def adapters(self) -> list[TensorSpec]:
        return [TensorSpec(t["name"], tuple(int(d) for d in t["shape"]), t.get("dtype", "float32"))
                for t in self.manifest["slice"]["tensors"]]

    @property
    def adapter_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["slice"]["tensors"]]

    @property
    def packed_adapters(self) -> dict:
        """{decoder input: {"kind", "parts": [[adapter, scale], ...], "shape"}}: adapters the decoder takes packed
        (runtime/packing.py); empty for bundles without."""
        return dict(self.manifest["graphs"]["decoder"].get("packed_adapters") or {})

    @property
    def slice_tensors(self) -> list[dict]:
        return list(self.manifest["slice"]["tensors"])

    @property
    def loss_kind(self) -> str:
        return str(self.manifest["loss"]["kind"])

    @property
    def loss_layers(self) -> list[int]:
        return [int(i) for i in self.manifest["loss"]["layers"]]

    @property
    def loss_skip(self) -> int:
        return int(self.manifest["loss"]["skip"])

    @property
    def loss_ntp_weight(self) -> float:
        """Weight of the next-token term on X compiled into the train step (0: the sync loss alone)."""
        return float(self.manifest["loss"].get("ntp_weight", 0.0))

    @property
    def bos_id(self) -> int | None:
        """The BOS token id at position 0 of every context (window, teacher, student, answers), outside the
        train step's loss (AbsorberConfig.bos); None: bundles without (every bundle before 2026-12-06)."""
        b = self.manifest["loss"].get("bos")
        return None if b is None else int(b)

    @property
    def loss_head_chunks(self) -> int:
        """The pieces of X in which the train step computes the next-token term's head gradient in its forward
        (absorber.sync.lean_next_token_loss); 0: bundles before it, which differentiate the head as a whole."""
        return int(self.manifest["loss"].get("head_chunks", 0))

    @property
    def recompute(self) -> bool:
        """The train step recomputes each layer's forward in its backward (bundles before it: False)."""
        return "recompute" in self.manifest["graphs"]["train_step"]

    @property
    def recompute_sinks_norms(self) -> bool:
        """The recomputing train step keeps only the residual stream per layer (each norm's x * rsqrt moved into
        the norm's stage, export/recompute.py `_sink_weight_free`; bundles before 2026-12-05: False)."""
        return self.manifest["graphs"]["train_step"].get("recompute", {}).get("sunk", 0) > 0

    @property
    def quant_scheme(self) -> str:
        return str(self.manifest["quant"]["scheme"])

    @property
    def quant_block_size(self) -> int:
        q = self.manifest["quant"]
        return int(q.get("block_size") or (INT4_BLOCK if q["scheme"] == "int4" else 0))

    @property
    def quantized_tensors(self) -> list[str] | None:
        q = self.manifest["quant"].get("quantized")
        return list(q) if isinstance(q, list) else None

    @property
    def session_config(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in (self.manifest.get("session_config") or {}).items()}

    def defaults(self) -> AbsorberConfig:
        """The bundle's AbsorberConfig: `defaults` plus the loss settings compiled into the train step."""
        d = dict(self.manifest["defaults"])
        d["loss"], d["loss_layers"], d["sync_skip"] = self.loss_kind, tuple(self.loss_layers), self.loss_skip
        d["ntp_weight"] = self.loss_ntp_weight
        d["bos"] = self.bos_id is not None
        try:
            return AbsorberConfig.from_dict(d)
        except TypeError as e:
            raise AbsorberError(f"bundle {self.path}: manifest defaults are not an AbsorberConfig ({e})") from None

    # ------------------------------------------------------------------ files
    def _at(self, rel: str) -> Path:
        if self.path is None:
            raise AbsorberError("this Bundle has no folder (made from a manifest alone)")
        return self.path / rel

    def graph_file(self, graph: str) -> Path:
        return self._at(self.manifest["graphs"][graph]["file"])

    @property
    def has_combined(self) -> bool:
        return COMBINED in self.manifest["graphs"]

    @property
    def combined_file(self) -> Path | None:
        """Both graphs in one model (quantized bundles since the sixth session; export/combined.py), or None."""
        c = self.manifest["graphs"].get(COMBINED)
        return self._at(c["file"]) if c else None

    @property
    def combined_selector(self) -> str:
        return str(self.manifest["graphs"][COMBINED]["selector"])

    def combined_branch(self, graph: str) -> str:
        """Where `graph` sits in combined.onnx: "main" (the main graph), "then_branch" or "else_branch" (If)."""
        return str(self.manifest["graphs"][COMBINED]["branches"][graph])

    def combined_renamed(self, graph: str) -> dict[str, str]:
        """`graph`'s input names that combined.onnx gives another name: {graph's name: combined name}."""
        return dict(self.manifest["graphs"][COMBINED].get("renamed", {}).get(graph, {}))

    def graph_io(self, graph: str, kind: str) -> list[dict]:
        return list(self.manifest["graphs"][graph].get(kind, []))

    @property
    def tokenizer_path(self) -> Path:
        tok = self.manifest.get("tokenizer") or {}
        return self._at(tok.get("file", TOKENIZER_FILE))

    @property
    def adapters_path(self) -> Path:
        return self._at(self.manifest.get("adapters_file", ADAPTERS_FILE))

    @property
    def external_files(self) -> list[str]:
        return [e["file"] for e in self.manifest["external_data"]]

    @property
    def stored_tensors(self) -> list[StoredTensor]:
        return [StoredTensor(t["name"], str(t["dtype"]), tuple(int(d) for d in t["shape"]), int(t["offset"]),
                             int(t["length"]), tuple(t["graphs"]), e["file"], bool(t.get("kernel", False)),
                             t.get("alias_of"))
                for e in self.manifest["external_data"] for t in e["tensors"]]

    @property
    def kernel_tensors(self) -> set[str]:
        """Stored tensors that ONNX Runtime pre-packs (MatMulNBits' inputs): sessions that read them keep pre-packing on."""
        return {t.name for t in self.stored_tensors if t.kernel}

    @property
    def stored_bytes(self) -> int:
        """Bytes of the frozen weights as stored (sum of the external tensors, no padding; an alias once)."""
        return sum(t.length for t in self.stored_tensors if not t.alias_of)

    @property
    def files(self) -> dict[str, str]:
        return dict(self.manifest["files"])
