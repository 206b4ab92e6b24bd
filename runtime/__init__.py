"""absorber.runtime: the torch-free streaming engine (ONNX Runtime + numpy + tokenizers).

Never imports torch, transformers or optimum. Entry points: `Stream.open(bundle_dir, ...)` (feed / flush / ask /
stats / save), `open_bundle` (verify a bundle), `inputs.Reader` (txt / srt / vtt / jsonl), CLI `absorber run`.
"""
from __future__ import annotations

from absorber.runtime.bundle import Bundle, open_bundle
from absorber.runtime.engine import RoundResult, Stream

__all__ = ["Bundle", "RoundResult", "Stream", "open_bundle"]
