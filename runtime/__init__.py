"""absorber.runtime: the torch-free streaming engine (ONNX Runtime + numpy + tokenizers).

Never imports torch, transformers or optimum. Entry points: `Model.open(bundle_dir, device, profile)` (once per
process) and `Stream(model, state_dir=...)` (one per text stream: feed / flush / ask / stats / save), or the
one-line `Stream.open(bundle_dir, ...)`; `open_bundle` (verify a bundle), `inputs.Reader` (txt / srt / vtt /
jsonl), CLI `absorber run`.
"""
from __future__ import annotations

from absorber.rounds import RoundResult
from absorber.runtime.bundle import Bundle, open_bundle
from absorber.runtime.model import Model
from absorber.runtime.stream import Stream

__all__ = ["Bundle", "Model", "RoundResult", "Stream", "open_bundle"]
