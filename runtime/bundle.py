"""Open and verify a bundle (docs/bundle.md) before anything is loaded into ONNX Runtime.

Refused with one line (AbsorberError): a missing folder, a missing or corrupt manifest, a listed file that is
missing or whose sha256 differs, an external-data location that is not a plain file name inside the bundle
(checked by walking the .onnx protobuf bytes, no `onnx` package needed), external data past the end of its
file, and (once sessions exist) graphs whose inputs/outputs differ from the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from absorber.config import AbsorberConfig
from absorber.errors import AbsorberError
from absorber.runtime.protoscan import GraphInfo, scan_model

FORMAT = 1
GRAPHS = ("decoder", "train_step")
NP_DTYPES = {"float32": "float32", "float": "float32", "int64": "int64", "float16": "float16", "int32": "int32",
             "tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
             "tensor(int32)": "int32"}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _plain_name(loc: str) -> bool:
    """A plain relative file name inside the bundle folder: no folders, no parent, not absolute, no drive."""
    if not loc or loc in (".", "..") or "\x00" in loc:
        return False
    if "/" in loc or "\\" in loc or ":" in loc:
        return False
    return not os.path.isabs(loc)


def _safe_rel(rel: str) -> bool:
    """A relative path (sub-folders allowed) that stays inside the bundle."""
    if not rel or os.path.isabs(rel) or "\\" in rel or ":" in rel or "\x00" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class Bundle:
    path: Path
    manifest: dict
    manifest_sha256: str
    adapters: list[TensorSpec]
    graph_info: dict[str, GraphInfo] = field(default_factory=dict)

    # ------------------------------------------------------------------ model facts
    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

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
    def max_positions(self) -> int:
        return int(self.model.get("max_positions") or 2048)

    @property
    def eos_ids(self) -> set[int]:
        e = self.model.get("eos_token_id", self.model.get("eos_id", self.model.get("eos")))
        if e is None:
            return set()
        return set(e) if isinstance(e, list) else {int(e)}

    @property
    def loss_layers(self) -> list[int]:
        ll = self.manifest.get("loss_layers")
        return list(ll) if ll else list(range(1, self.num_layers + 1))

    def graph_file(self, graph: str) -> Path:
        return self.path / self.manifest["graphs"][graph]["file"]

    def graph_io(self, graph: str, kind: str) -> list[dict]:
        return list(self.manifest["graphs"][graph].get(kind, []))

    def defaults(self) -> AbsorberConfig:
        d = self.manifest.get("defaults") or {}
        try:
            return AbsorberConfig.from_dict(d) if d else AbsorberConfig()
        except TypeError as e:
            raise AbsorberError(f"bundle {self.path}: manifest defaults are not an AbsorberConfig ({e})") from None

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def adapters_path(self) -> Path:
        return self.path / "adapters.safetensors"

    @property
    def external_files(self) -> list[str]:
        out = []
        for e in self.manifest.get("external_data") or []:
            out.append(e["file"] if isinstance(e, dict) else str(e))
        return out


def _bad(path: Path, msg: str) -> AbsorberError:
    return AbsorberError(f"bundle {path}: {msg}")


def open_bundle(path: str | os.PathLike, verify_hashes: bool = True) -> Bundle:
    """Read and verify a bundle folder (manifest, hashes, external-data locations). Loads no graph."""
    p = Path(path)
    if not p.exists():
        raise AbsorberError(f"bundle folder not found: {p}")
    if not p.is_dir():
        raise AbsorberError(f"not a bundle folder (a file): {p}")
    mpath = p / "manifest.json"
    if not mpath.is_file():
        raise _bad(p, "manifest.json is missing (not a bundle written by `absorber export`?)")
    raw = mpath.read_bytes()
    try:
        man = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(p, f"manifest.json is corrupt ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(man, dict):
        raise _bad(p, "manifest.json is corrupt (not a JSON object)")
    if man.get("format") != FORMAT:
        raise _bad(p, f"unsupported bundle format {man.get('format')!r} (this runtime reads format {FORMAT})")
    for key in ("model", "slice", "graphs", "files"):
        if not isinstance(man.get(key), dict):
            raise _bad(p, f"manifest.json lacks {key!r}")
    for g in GRAPHS:
        if not isinstance(man["graphs"].get(g), dict) or "file" not in man["graphs"][g]:
            raise _bad(p, f"manifest.json lacks graph {g!r}")
    for key in ("num_layers", "num_kv_heads", "head_dim", "hidden"):
        if key not in man["model"]:
            raise _bad(p, f"manifest.json model lacks {key!r}")
    tensors = man["slice"].get("tensors")
    if not tensors:
        raise _bad(p, "manifest.json slice lists no adapter tensors")
    adapters = [TensorSpec(t["name"], tuple(int(d) for d in t["shape"]), t.get("dtype", "float32")) for t in tensors]

    # every listed file: inside the bundle, present, sha256 as declared
    files: dict = man["files"]
    for rel, digest in files.items():
        if not _safe_rel(rel):
            raise _bad(p, f"manifest lists a file outside the bundle: {rel!r}")
        fp = p / rel
        if not fp.is_file():
            raise _bad(p, f"file {rel} is missing")
        if verify_hashes and sha256_file(fp) != str(digest).lower().removeprefix("sha256:"):
            raise _bad(p, f"file {rel} does not match its sha256 in the manifest (corrupt or modified)")
    needed = [man["graphs"][g]["file"] for g in GRAPHS] + ["tokenizer.json", "adapters.safetensors"]
    ext = [e["file"] if isinstance(e, dict) else str(e) for e in man.get("external_data") or []]
    for rel in needed + ext:
        if rel not in files:
            raise _bad(p, f"manifest has no sha256 for {rel}")
    for rel in ext:
        if not _plain_name(rel):
            raise _bad(p, f"external data file {rel!r} is not a plain file name inside the bundle")

    b = Bundle(p, man, hashlib.sha256(raw).hexdigest(), adapters)
    # external data of every graph: plain names inside the bundle, declared in the manifest, within the file
    for g in GRAPHS:
        gfile = b.graph_file(g)
        info = scan_model(str(gfile))
        for t in info.external:
            if not _plain_name(t.location):
                raise _bad(p, f"{gfile.name}: tensor {t.name!r} has external data at {t.location!r}, "
                              "outside the bundle (only plain file names inside it are allowed)")
            if t.location not in ext:
                raise _bad(p, f"{gfile.name}: tensor {t.name!r} uses external data file {t.location!r} "
                              "that the manifest does not declare")
            size = (p / t.location).stat().st_size
            if t.offset < 0 or (t.length is not None and t.offset + t.length > size):
                raise _bad(p, f"{gfile.name}: tensor {t.name!r} external data runs past the end of {t.location}")
        b.graph_info[g] = info
    return b


def check_session_io(b: Bundle, graph: str, session) -> None:
    """The graph's inputs/outputs (names, element types) must be those the manifest declares."""
    def norm(items):
        return {i["name"]: NP_DTYPES.get(str(i.get("dtype", "")), str(i.get("dtype", ""))) for i in items}

    declared_in, declared_out = norm(b.graph_io(graph, "inputs")), norm(b.graph_io(graph, "outputs"))
    actual_in = {i.name: NP_DTYPES.get(i.type, i.type) for i in session.get_inputs()}
    actual_out = {o.name: NP_DTYPES.get(o.type, o.type) for o in session.get_outputs()}
    for what, dec, act in (("inputs", declared_in, actual_in), ("outputs", declared_out, actual_out)):
        if set(dec) != set(act):
            missing, extra = sorted(set(dec) - set(act)), sorted(set(act) - set(dec))
            detail = "; ".join(x for x in (f"missing {', '.join(missing[:3])}" if missing else "",
                                             f"undeclared {', '.join(extra[:3])}" if extra else "") if x)
            raise _bad(b.path, f"{graph} graph {what} do not match the manifest ({detail})")
        for n, t in dec.items():
            if t and act[n] != t:
                raise _bad(b.path, f"{graph} graph {what[:-1]} {n!r} is {act[n]}, the manifest says {t}")
    # and what this runtime needs from each graph, whatever the manifest says
    names = {s.name for s in b.adapters}
    need_in = {"input_ids", "position_ids"} | names
    if graph == "decoder":
        need_in |= {"logits_to_keep"} | {f"past_{kv}.{i}" for kv in ("key", "value") for i in range(b.num_layers)}
        need_out = {"logits", "hidden_states"} | {f"present_{kv}.{i}" for kv in ("key", "value")
                                                  for i in range(b.num_layers)}
    else:
        need_in |= {"teacher_hidden"}
        need_out = {"loss"} | {f"grad.{n}" for n in names}
    miss = sorted((need_in - set(actual_in)) | (need_out - set(actual_out)))
    if miss:
        raise _bad(b.path, f"{graph} graph lacks {', '.join(miss[:3])}{' ...' if len(miss) > 3 else ''}")
