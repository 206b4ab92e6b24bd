"""A stream's journal: every acknowledged segment, appended and fsynced BEFORE the acknowledgement.

One JSON object per line, `{"seq": 17, "text": " ...", "tokens": 12, "key": "9f0c..."|null}`, seq = 1, 2, 3, ...
with no gap, for the stream's whole life (it survives compaction: the next seq is one past the larger of the
journal's last seq and the seq saved in the stream's state). The stream's state (Stream.save, one atomic file)
records the last seq whose tokens it holds (`extra_meta["journal_seq"]`); on restart the entries after it are
replayed, so every acknowledged segment is counted exactly once.

A crash can leave a partial last line (a write that never finished, hence never acknowledged): it is cut off on
open. A bad line followed by good ones is corruption and is refused. Compaction rewrites the file with only
the entries after the saved seq (temp file, fsync, rename, fsync of the folder): a crash leaves the old or the
new journal, both consistent with the state.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from absorber.errors import AbsorberError
from absorber.files import fsync_dir, write_atomic

JOURNAL_FILE = "journal.jsonl"


@dataclass
class Entry:
    seq: int
    text: str
    tokens: int
    key: str | None
    line: bytes          # the line as written (with its newline): what compaction keeps


def encode_entry(seq: int, text: str, tokens: int, key: str | None) -> bytes:
    return (json.dumps({"seq": seq, "text": text, "tokens": tokens, "key": key}, ensure_ascii=False,
                       separators=(",", ":")) + "\n").encode("utf-8")


def _parse(line: bytes) -> Entry | None:
    try:
        d = json.loads(line)
        e = Entry(int(d["seq"]), d["text"], int(d["tokens"]), d.get("key"), line)
    except (ValueError, KeyError, TypeError):
        return None
    return e if isinstance(e.text, str) else None


def read_journal(path: Path) -> tuple[list[Entry], int]:
    """(entries, length of the valid prefix in bytes). A partial or unreadable LAST line is not an entry."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    entries: list[Entry] = []
    pos = good = 0
    bad_at = None
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:                       # no newline: a write cut short by a crash
            break
        line = data[pos:nl + 1]
        e = _parse(line)
        if e is None:
            if bad_at is None:
                bad_at = pos
        else:
            if bad_at is not None:
                raise AbsorberError(f"journal {path} is corrupt at byte {bad_at} (a bad line before good ones)")
            if entries and e.seq != entries[-1].seq + 1:
                raise AbsorberError(f"journal {path}: seq {e.seq} follows {entries[-1].seq}")
            entries.append(e)
            good = nl + 1
        pos = nl + 1
    return entries, good


class Journal:
    """Append-only, fsynced; not thread-safe by itself (the stream's lock guards it)."""

    def __init__(self, folder: str | os.PathLike, min_next_seq: int = 1):
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL_FILE
        entries, good = read_journal(self.path)
        if self.path.is_file() and self.path.stat().st_size != good:
            with open(self.path, "r+b") as f:      # drop the torn tail (it was never acknowledged)
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        self.entries_at_open = entries
        last = entries[-1].seq if entries else 0
        self.next_seq = max(last + 1, int(min_next_seq))
        self.size = good
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fsync_dir(self.folder)

    def append(self, items: list[tuple[str, int, str | None]]) -> list[Entry]:
        """Write (text, tokens, key) items as consecutive entries, ONE write and ONE fsync; return them."""
        if self._fd is None:
            raise AbsorberError(f"journal {self.path} is closed")
        out = []
        for text, tokens, key in items:
            seq = self.next_seq + len(out)
            out.append(Entry(seq, text, tokens, key, encode_entry(seq, text, tokens, key)))
        blob = b"".join(e.line for e in out)
        view = memoryview(blob)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError:
            try:                       # nothing of a failed append stays (it is not acknowledged)
                os.ftruncate(self._fd, self.size)
            except OSError:
                pass
            raise
        self.next_seq += len(out)
        self.size += len(blob)
        return out

    def rewrite(self, keep: list[Entry]) -> None:
        """Compaction: the journal becomes exactly `keep` (the entries after the saved seq), atomically."""
        write_atomic(self.path, lambda f: f.writelines(e.line for e in keep))
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = sum(len(e.line) for e in keep)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
