"""Input readers for `absorber run`: text pieces as they arrive, from a file or stdin.

Formats: txt (lines as they arrive), srt (SubRip), vtt (WebVTT), jsonl (a `text` field per line), auto (by file
extension, else by sniffing the first bytes). Subtitle cue numbers, timestamps, the WEBVTT header and NOTE/STYLE/
REGION blocks are dropped; formatting tags are stripped; speakers are kept as text (`<v Alice>` -> "Alice: ",
"ALICE:" stays). Bytes that are not UTF-8 are replaced by U+FFFD and counted (never fatal). Lines are read in
bounded chunks, so a 10 MB line is cut (at a space when there is one) into pieces of at most CHUNK bytes.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from absorber.errors import AbsorberError

FORMATS = ("auto", "txt", "srt", "vtt", "jsonl")
CHUNK = 1 << 16            # bytes read at most per piece of a long line

_SURR = re.compile("[\udc80-\udcff]")


def decode_bytes(b: bytes) -> tuple[str, int]:
    """UTF-8 decode; each invalid byte becomes U+FFFD. Returns (text, number of invalid bytes)."""
    s = b.decode("utf-8", "surrogateescape")
    s, n = _SURR.subn("\ufffd", s)
    return s, n


class Reader:
    """Iterate the text pieces of one input; counts bytes read, invalid bytes and skipped records."""

    def __init__(self, path: str | os.PathLike, fmt: str = "auto", chunk: int = CHUNK):
        if fmt not in FORMATS:
            raise AbsorberError(f"unknown input format {fmt!r} (choose from {', '.join(FORMATS)})")
        self.path = str(path)
        self.fmt = fmt
        self.chunk = chunk
        self.bytes_read = 0
        self.invalid_bytes = 0
        self.skipped = 0          # JSONL lines without a usable text field
        self.pieces = 0
        self.chars = 0
        self._dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        if self.path == "-":
            self._f = sys.stdin.buffer
            self._close = False
        else:
            p = Path(self.path)
            if not p.exists():
                raise AbsorberError(f"input file not found: {p}")
            if p.is_dir():
                raise AbsorberError(f"input is a folder, not a file: {p}")
            try:
                self._f = open(p, "rb")
            except OSError as e:
                raise AbsorberError(f"cannot read input {p}: {e.strerror}") from None
            self._close = True
        if self.fmt == "auto":
            self.fmt = self._sniff()

    # ------------------------------------------------------------------ format detection
    def _sniff(self) -> str:
        ext = Path(self.path).suffix.lower() if self.path != "-" else ""
        by_ext = {".srt": "srt", ".vtt": "vtt", ".webvtt": "vtt", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".txt": "txt", ".text": "txt", ".md": "txt"}
        if ext in by_ext:
            return by_ext[ext]
        try:
            head = self._f.peek(4096)[:4096]
        except (AttributeError, OSError):
            return "txt"
        text = head.decode("utf-8", "replace").lstrip("\ufeff")
        lines = [ln.strip() for ln in text.splitlines()]
        if text.lstrip().startswith("WEBVTT"):
            return "vtt"
        nonempty = [ln for ln in lines if ln]
        if len(nonempty) >= 2 and nonempty[0].isdigit() and "-->" in nonempty[1]:
            return "srt"
        if nonempty and nonempty[0].startswith("{"):
            try:
                if isinstance(json.loads(nonempty[0]), dict):
                    return "jsonl"
            except ValueError:
                pass
        return "txt"

    # ------------------------------------------------------------------ raw lines
    def _decode(self, b: bytes, final: bool = False) -> str:
        s = self._dec.decode(b, final)
        s, n = _SURR.subn("\ufffd", s)
        self.invalid_bytes += n
        return s

    def lines(self) -> Iterator[str]:
        """Decoded lines (with their newline), long lines in pieces of at most `chunk` bytes cut at a space."""
        carry = ""
        f = self._f
        while True:
            b = f.readline(self.chunk)
            if not b:
                tail = carry + self._decode(b"", final=True)
                if tail:
                    yield tail
                return
            self.bytes_read += len(b)
            s = carry + self._decode(b)
            carry = ""
            if s.endswith("\n"):
                yield s
                continue
            # a piece of a long line (or the last line without a newline): cut after the last space
            cut = max(s.rfind(" "), s.rfind("\t"))
            if cut > 0 and len(s) - cut < self.chunk // 2:
                yield s[:cut + 1]
                carry = s[cut + 1:]
            else:
                yield s

    # ------------------------------------------------------------------ text pieces
    def __iter__(self) -> Iterator[str]:
        gen = {"txt": self._txt, "srt": self._srt, "vtt": self._vtt, "jsonl": self._jsonl}[self.fmt]()
        for piece in gen:
            if piece:
                self.pieces += 1
                self.chars += len(piece)
                yield piece

    def _txt(self) -> Iterator[str]:
        first = True
        for ln in self.lines():
            if first:
                ln = ln.lstrip("\ufeff")
                first = False
            yield ln

    def _jsonl(self) -> Iterator[str]:
        buf = ""
        for ln in self.lines():
            buf += ln
            if not buf.endswith("\n") and len(buf) < (64 << 20):
                continue   # a long JSON line arrives in pieces: parse it whole (up to 64 MB)
            line, buf = buf.strip().lstrip("\ufeff"), ""
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                self.skipped += 1
                continue
            t = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(t, str):
                self.skipped += 1
                continue
            yield t if t.endswith("\n") else t + "\n"
        if buf.strip():
            try:
                obj = json.loads(buf)
                t = obj.get("text") if isinstance(obj, dict) else None
                if isinstance(t, str):
                    yield t + "\n"
                else:
                    self.skipped += 1
            except ValueError:
                self.skipped += 1

    _TS = re.compile(r"^\s*(\d+:)?\d{1,2}:\d{2}[,.]\d{1,3}\s*-->\s*(\d+:)?\d{1,2}:\d{2}[,.]\d{1,3}")
    _TAG = re.compile(r"</?(?:i|b|u|c|ruby|rt|lang|font|span)(?:[.\s][^>]*)?>|<\d+:\d{2}(?::\d{2})?[.,]\d{3}>",
                      re.IGNORECASE)
    _VOICE = re.compile(r"<v(?:\.[\w.-]+)?\s+([^>]+)>", re.IGNORECASE)

    def _clean(self, s: str) -> str:
        s = self._VOICE.sub(lambda m: m.group(1).strip() + ": ", s)
        s = re.sub(r"</v>", "", s, flags=re.IGNORECASE)
        s = self._TAG.sub("", s)
        s = s.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&nbsp;", " ")
        return s.strip()

    def _cues(self, vtt: bool) -> Iterator[str]:
        """Shared SRT/WebVTT state machine: one text piece per cue (its lines joined by spaces)."""
        text: list[str] = []
        in_cue = skip_block = header = False
        prev: str | None = None   # a line seen before a timestamp (cue number / identifier)
        first = True
        for raw in self.lines():
            ln = raw.rstrip("\r\n")
            if first:
                ln = ln.lstrip("\ufeff")
                first = False
                if vtt and ln.startswith("WEBVTT"):
                    header = True
                    continue
            if not ln.strip():
                if text:
                    yield " ".join(text) + "\n"
                    text = []
                in_cue = skip_block = header = False
                prev = None
                continue
            if header or skip_block:
                continue
            if self._TS.match(ln):
                in_cue = True
                prev = None
                continue
            if not in_cue:
                if vtt and re.match(r"^(NOTE|STYLE|REGION)(\s|$)", ln):
                    skip_block = True
                    continue
                if prev is None:   # a cue number / id, or (srt without numbers) a text line
                    prev = ln
                    continue
                # two lines before any timestamp: it was text after all
                t = self._clean(prev)
                if t:
                    text.append(t)
                prev = ln
                in_cue = True
                continue
            t = self._clean(ln)
            if t:
                text.append(t)
        if text:
            yield " ".join(text) + "\n"
        self._decode(b"", final=True)

    def _srt(self) -> Iterator[str]:
        return self._cues(vtt=False)

    def _vtt(self) -> Iterator[str]:
        return self._cues(vtt=True)

    def close(self) -> None:
        if self._close:
            self._f.close()


def read_pieces(path: str, fmt: str = "auto") -> list[str]:
    """All text pieces of an input (for tests and small files)."""
    r = Reader(path, fmt)
    try:
        return list(r)
    finally:
        r.close()
