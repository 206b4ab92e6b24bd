"""`absorber.export`: write a bundle (docs/bundle.md) from a PyTorch model — the only part that needs torch.

    from absorber.export import export_bundle
    path = export_bundle(model, tokenizer, "out/bundle", quant="fp32")   # fp32 | int8 | int4

Importing this package is cheap (no torch, no onnx): the functions import them when called.
"""
from __future__ import annotations

__all__ = ["export_bundle", "export_bundles", "is_bundle", "SCHEMES"]

from absorber.bundle_format import QUANT_SCHEMES as SCHEMES


def export_bundle(model, tokenizer, out_dir, quant: str = "fp32", lora_cfg=None, cfg=None, opset: int = 21,
                  max_len: int | None = None, progress=None):
    """Export `model` (+ `tokenizer`) as a bundle folder at `out_dir`; returns its Path.
    See absorber.export.bundle.export_bundle for the arguments."""
    from absorber.export.bundle import export_bundle as _export
    return _export(model, tokenizer, out_dir, quant=quant, lora_cfg=lora_cfg, cfg=cfg, opset=opset,
                   max_len=max_len, progress=progress)


def export_bundles(model, tokenizer, outs: dict, lora_cfg=None, cfg=None, opset: int = 21,
                   max_len: int | None = None, progress=None):
    """Trace once, write one bundle per scheme: outs = {"fp32": dir, "int8": dir, "int4": dir} -> {scheme: Path}."""
    from absorber.export.bundle import export_bundles as _export
    return _export(model, tokenizer, outs, lora_cfg=lora_cfg, cfg=cfg, opset=opset, max_len=max_len,
                   progress=progress)


def is_bundle(path) -> bool:
    from absorber.export.bundle import is_bundle as _is
    return _is(path)
