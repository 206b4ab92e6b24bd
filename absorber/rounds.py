"""The record of one absorption round, shared by the PyTorch reference and the ONNX runtime (no torch here)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RoundResult:
    round: int
    tokens_absorbed: int      # total so far, after this round
    loss_first: float | None
    loss_last: float | None
    steps: int
    seconds: float
    rolled_back: bool = False
    teacher_seconds: float = 0.0
    train_seconds: float = 0.0
    optimizer_seconds: float = 0.0   # the runtime's numpy AdamW share of train_seconds (torch's is inside it)

    def to_json(self) -> dict:
        return asdict(self)
