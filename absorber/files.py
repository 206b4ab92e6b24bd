"""Durable file writes shared by every layer (standard library only): a file replaced atomically, a folder synced.

A kill -9 at any moment leaves either the old file or the new one, never a mix: write a temp file in the same
folder, fsync it, os.replace it onto the target, fsync the folder. Used for the stream state, the server's
journal compaction and stream metadata, and the assembled model files.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(d: str | os.PathLike) -> None:
    """Make a rename or a new file in folder `d` durable (fsync of the folder itself)."""
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:   # some filesystems (and Windows) cannot fsync a folder
        pass


def write_atomic(dest: str | os.PathLike, write: Callable[[BinaryIO], object] | bytes, mode: int | None = None) -> Path:
    """Replace `dest` by what `write(file)` writes (or by the given bytes), atomically and durably; the temp
    file never survives a failure. mode: permission bits of the new file (default: mkstemp's 0o600)."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(dest.parent)
    return dest
