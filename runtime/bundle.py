"""Open and verify a bundle (docs/bundle.md) before anything is loaded into ONNX Runtime.

Refused with one line (AbsorberError): a missing folder, a missing or corrupt manifest, a listed file that is
missing or whose sha256 differs, an external-data location that is not a plain file name inside the bundle
(checked by walking the .onnx protobuf bytes, no `onnx` package needed), external data past the end of its
file, and (once sessions exist) graphs whose inputs/outputs differ from the manifest.
"""
from __future__ import annotations

import os
from pathlib import Path

from absorber import bundle_format as F
from absorber.bundle_format import Bundle, TensorSpec  # noqa: F401  (re-exported: the runtime's view of a bundle)
from absorber.errors import AbsorberError
from absorber.runtime.protoscan import scan_model

GRAPHS = F.GRAPHS
NP_DTYPES = {"float32": "float32", "float": "float32", "int64": "int64", "float16": "float16", "int32": "int32",
             "tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
             "tensor(int32)": "int32"}


def _bad(path: Path, msg: str) -> AbsorberError:
    return AbsorberError(f"bundle {path}: {msg}")


def open_bundle(path: str | os.PathLike, verify_hashes: bool = True) -> Bundle:
    """Read and verify a bundle folder (manifest, hashes, external-data locations). Loads no graph."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise AbsorberError(f"not a bundle folder (a file): {p}")
    b = F.read_manifest(p)
    man = b.manifest

    # every listed file: inside the bundle, present, sha256 as declared
    files: dict = man["files"]
    for rel, digest in files.items():
        if not F.safe_rel(rel):
            raise _bad(p, f"manifest lists a file outside the bundle: {rel!r}")
        fp = p / rel
        if not fp.is_file():
            raise _bad(p, f"file {rel} is missing")
        if verify_hashes and F.sha256_file(fp) != str(digest).lower():
            raise _bad(p, f"file {rel} does not match its sha256 in the manifest (corrupt or modified)")
    graphs = list(GRAPHS) + ([F.COMBINED] if F.COMBINED in man["graphs"] else [])
    needed = [man["graphs"][g]["file"] for g in graphs] + [b.tokenizer_path.name, b.adapters_path.name]
    ext = b.external_files
    for rel in needed + ext:
        if rel not in files:
            raise _bad(p, f"manifest has no sha256 for {rel}")
    for rel in ext:
        if not F.plain_name(rel):
            raise _bad(p, f"external data file {rel!r} is not a plain file name inside the bundle")

    # external data of every graph: plain names inside the bundle, declared in the manifest, within the file
    for g in graphs:
        gfile = b.graph_file(g)
        info = scan_model(str(gfile))
        for t in info.external:
            if not F.plain_name(t.location):
                raise _bad(p, f"{gfile.name}: tensor {t.name!r} has external data at {t.location!r}, "
                              "outside the bundle (only plain file names inside it are allowed)")
            if t.location not in ext:
                raise _bad(p, f"{gfile.name}: tensor {t.name!r} uses external data file {t.location!r} "
                              "that the manifest does not declare")
            size = (p / t.location).stat().st_size
            if t.offset < 0 or (t.length is not None and t.offset + t.length > size):
                raise _bad(p, f"{gfile.name}: tensor {t.name!r} external data runs past the end of {t.location}")
        b.graph_info[g] = info
    if F.COMBINED in graphs:
        sel = b.combined_selector
        declared = {b.combined_renamed(g).get(i["name"], i["name"]) for g in GRAPHS
                    for i in b.graph_io(g, "inputs")} | {sel}
        if set(b.graph_info[F.COMBINED].inputs) != declared:
            raise _bad(p, f"{b.combined_file.name}: its inputs are not the selector {sel!r} and the two graphs' "
                          "inputs (re-export the bundle)")
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
    need_in, need_out = F.required_io(graph, b.num_layers, b.adapter_names, ntp=b.loss_ntp_weight > 0,
                                      packed=b.packed_adapters)
    miss = sorted((need_in - set(actual_in)) | (need_out - set(actual_out)))
    if miss:
        raise _bad(b.path, f"{graph} graph lacks {', '.join(miss[:3])}{' ...' if len(miss) > 3 else ''}")
