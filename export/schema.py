"""The JSON schema of manifest.json (format 1) and a small validator for the subset of JSON Schema it uses.

No dependency: the validator understands type, properties, required, additionalProperties, items, enum, minimum,
pattern, minItems, anyOf. `validate_manifest` raises AbsorberError with the first problem's path. The runtime may
import this module (it needs neither torch nor onnx).
"""
from __future__ import annotations

import re

from absorber.errors import AbsorberError

FORMAT = 1

_int = {"type": "integer"}
_str = {"type": "string"}
_ids = {"anyOf": [{"type": "null"}, _int, {"type": "array", "items": _int}]}
_dim = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}
_plain_file = {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"}   # a file name inside the bundle
_io = {"type": "array", "items": {"type": "object", "required": ["name", "dtype", "shape"],
                                  "properties": {"name": _str, "dtype": _str,
                                                 "shape": {"type": "array", "items": _dim}}}}
_graph = {"type": "object", "required": ["file", "inputs", "outputs", "opset"],
          "properties": {"file": _plain_file, "inputs": _io, "outputs": _io, "opset": _int, "ir_version": _int}}

MANIFEST_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "absorber bundle manifest",
    "type": "object",
    "required": ["format", "model", "slice", "adapters_file", "loss", "loss_layers", "quant", "session_config",
                 "defaults", "graphs", "external_data", "shared_initializers", "tokenizer", "exporter", "files"],
    "properties": {
        "format": {"enum": [FORMAT]},
        "model": {"type": "object",
                  "required": ["architecture", "model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                               "hidden", "vocab", "max_positions", "tie_word_embeddings", "bos_token_id",
                               "eos_token_id", "pad_token_id"],
                  "properties": {"architecture": _str, "model_type": _str, "num_layers": {"type": "integer", "minimum": 1},
                                 "num_heads": _int, "num_kv_heads": _int, "head_dim": _int, "hidden": _int,
                                 "intermediate": _int, "vocab": _int, "max_positions": _int,
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
        "loss": {"type": "object", "required": ["kind", "layers"],
                 "properties": {"kind": {"enum": ["l1", "l2"]}, "layers": {"type": "array", "items": _int},
                                "skip": _int}},
        "loss_layers": {"type": "array", "items": _int, "minItems": 1},
        "quant": {"type": "object", "required": ["scheme"],
                  "properties": {"scheme": {"enum": ["fp32", "int8", "int4"]},
                                 "quantized": {"type": "array", "items": _str},
                                 "session_config": {"type": "object"}}},
        "session_config": {"type": "object", "additionalProperties": _str},
        "defaults": {"type": "object", "required": ["n", "m", "k", "lr", "loss", "lora"]},
        "graphs": {"type": "object", "required": ["decoder", "train_step"],
                   "properties": {"decoder": _graph, "train_step": _graph}},
        "external_data": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["file", "tensors"],
            "properties": {"file": _plain_file, "align": _int, "tensors": {"type": "array", "items": {
                "type": "object", "required": ["name", "dtype", "shape", "offset", "length", "graphs"],
                "properties": {"name": _str, "dtype": _str, "shape": {"type": "array", "items": _int},
                               "offset": {"type": "integer", "minimum": 0}, "length": {"type": "integer", "minimum": 0},
                               "graphs": {"type": "array", "minItems": 1,
                                          "items": {"enum": ["decoder", "train_step"]}}}}}}}},
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


def errors(value, schema: dict, path: str = "$") -> list[str]:
    """All violations of `schema` by `value` (the subset of JSON Schema described above)."""
    out: list[str] = []
    if "anyOf" in schema:
        if all(errors(value, s, path) for s in schema["anyOf"]):
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
                out += errors(v, props[k], f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += errors(v, schema["additionalProperties"], f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{path}: unexpected key {k!r}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            out.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, v in enumerate(value):
                out += errors(v, schema["items"], f"{path}[{i}]")
    return out


def validate_manifest(manifest: dict) -> None:
    errs = errors(manifest, MANIFEST_SCHEMA)
    if errs:
        raise AbsorberError(f"invalid bundle manifest: {errs[0]}" + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""))
