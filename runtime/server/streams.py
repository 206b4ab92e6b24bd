"""The live streams of a server: each a runtime `Stream` + its journal + the acknowledged segments not yet fed.

On disk, one folder per stream under the state root, named by the stream id:

    <root>/<id>/stream.json          id, config overrides, creation time (written once, atomically)
    <root>/<id>/journal.jsonl        every acknowledged segment (journal.py)
    <root>/<id>/state.safetensors    the Stream's state (Stream.save, atomic), with extra_meta:
                                     journal_seq = the last seq whose tokens the state holds,
                                     dedupe = the last dedupe keys of segments it holds

Accounting, per stream: tokens_seen (every acknowledged token) = tokens_absorbed + window + pending, where
pending = tokens acknowledged but not yet in the window (the Stream's own `pending` + the queue of journaled
segments the worker has not fed yet). The worker is the only one that mutates a Stream (under the gate's
write side); requests only append to the journal and the queue (under the stream's lock).

A segment's text is fed as " " + text.strip() (segments are joined by one space), tokenized alone: the
tokens of an acknowledged segment are a fact of the journal, the same on replay.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from absorber.errors import AbsorberError
from absorber.runtime.server.errors import ApiError
from absorber.runtime.server.journal import Entry, Journal
from absorber.files import fsync_dir, write_atomic
from absorber.runtime.stream import Stream

STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
META_FILE = "stream.json"
DEDUPE_KEEP = 1024           # dedupe keys remembered per stream (WhisperLive re-sends only recent segments)
SHOWN_SETTINGS = ("n", "m", "k", "lr", "eps", "clip", "weight_decay", "reset", "decay", "teacher")


def check_id(sid: str) -> str:
    if not isinstance(sid, str) or not STREAM_ID.match(sid):
        raise ApiError(400, "bad stream id: 1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or "
                            "digit")
    return sid


def segment_text(text: str) -> str:
    return " " + text.strip()


@dataclass
class Queued:
    entry: Entry
    ids: list[int]


class LiveStream:
    def __init__(self, sid: str, folder: Path, stream: Stream, journal: Journal, meta: dict):
        self.id = sid
        self.folder = folder
        self.stream = stream
        self.journal = journal
        self.meta = meta
        self.lock = threading.Lock()           # journal, queue, dedupe, subscribers
        self.queue: deque[Queued] = deque()
        self.queued_tokens = 0
        self.saved_seq = int(stream.extra_meta.get("journal_seq", 0))
        self.replayed = 0
        self.duplicates = 0
        self.closed = False
        self.error: str | None = None
        self._keys: set[str] = set()
        self._key_order: deque[str] = deque()
        self._subscribers: set = set()
        for k in stream.extra_meta.get("dedupe", []):
            self._remember(k)

    # ------------------------------------------------------------------ accounting
    @property
    def capacity(self) -> int:
        return self.stream.capacity

    def pending_tokens(self) -> int:
        return self.queued_tokens + len(self.stream.pending)

    def has_work(self) -> bool:
        st = self.stream
        return bool(self.queue) or len(st.window) + len(st.pending) >= st.capacity

    def stats(self) -> dict:
        """Call under the gate's read side (the worker is not mid-update)."""
        st = self.stream
        with self.lock:
            queued, segments = self.queued_tokens, self.journal.next_seq - 1
            fed_seq = int(st.extra_meta.get("journal_seq", 0))
        pending = queued + len(st.pending)
        return {"id": self.id, "created_at": self.meta.get("created_at"),
                "config": {k: getattr(st.cfg, k) for k in SHOWN_SETTINGS},
                "tokens_seen": st.tokens_seen + pending, "tokens_absorbed": st.tokens_absorbed,
                "tokens_window": len(st.window), "tokens_pending": pending, "segments": segments,
                "duplicates": self.duplicates, "rounds": st.rounds, "last_loss": st.last_loss,
                "rollbacks": st.rollbacks, "last_round_seconds": st.history[-1].seconds if st.history else None,
                "resumed": st.resumed, "replayed_segments": self.replayed,
                "journal_seq": segments, "fed_seq": fed_seq, "saved_seq": self.saved_seq,
                "journal_bytes": self.journal.size, "error": self.error}

    # ------------------------------------------------------------------ requests: journal, then queue
    def _remember(self, key: str) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        self._key_order.append(key)
        while len(self._key_order) > DEDUPE_KEEP:
            self._keys.discard(self._key_order.popleft())

    def ingest(self, items: list[tuple[str, list[int], str | None]], max_pending: int, retry_after) -> dict:
        """Journal (append + fsync) the (text, ids, key) items, then queue them; return the acknowledgement.
        Refused as a whole (nothing journaled) past the pending limit."""
        with self.lock:
            if self.closed:
                raise ApiError(404, f"no stream {self.id!r}")
            if self.error:
                raise ApiError(503, f"stream {self.id!r} is stopped: {self.error}")
            pending = self.pending_tokens()
            if pending >= max_pending:
                raise ApiError(429, f"stream {self.id!r} has {pending} tokens pending (limit {max_pending}); "
                                    "retry later", {"Retry-After": str(retry_after(self, pending))})
            fresh, dup, batch_keys = [], 0, set()
            for text, ids, key in items:
                if key is not None and (key in self._keys or key in batch_keys):
                    dup += 1
                    continue
                if key is not None:
                    batch_keys.add(key)
                fresh.append((text, ids, key))
            entries = self.journal.append([(t, len(ids), k) for t, ids, k in fresh]) if fresh else []
            tokens = 0
            for e, (_, ids, key) in zip(entries, fresh):
                self.queue.append(Queued(e, ids))
                self.queued_tokens += len(ids)
                tokens += len(ids)
                if key is not None:
                    self._remember(key)
            self.duplicates += dup
            return {"accepted": len(entries), "duplicates": dup, "tokens": tokens,
                    "seq": entries[-1].seq if entries else self.journal.next_seq - 1,
                    "pending": self.queued_tokens + len(self.stream.pending)}

    def context_ids(self) -> list[int]:
        """What an answer continues: the stream's sink (a bos bundle's BOS) and the window as the worker will
        have it once it feeds what is queued (under the gate's read side)."""
        st = self.stream
        cap = st.capacity
        ctx = list(st.window[:cap])
        if len(ctx) < cap:
            ctx += st.pending[:cap - len(ctx)]
        with self.lock:
            for q in self.queue:
                if len(ctx) >= cap:
                    break
                ctx += q.ids[:cap - len(ctx)]
        return st.sink + ctx

    # ------------------------------------------------------------------ the worker (under the gate's write side)
    def turn(self, on_round, compact_bytes: int):
        """Feed every queued segment into the Stream, then run at most one round (saved with the seq it
        holds). Returns the RoundResult or None."""
        st = self.stream
        with self.lock:
            keys = st.extra_meta.setdefault("dedupe", [])
            while self.queue:
                q = self.queue.popleft()
                self.queued_tokens -= len(q.ids)
                st.extra_meta["journal_seq"] = q.entry.seq
                if q.entry.key is not None:
                    keys.append(q.entry.key)
                st.feed_tokens(q.ids, max_rounds=0)
            if len(keys) > DEDUPE_KEEP:
                del keys[:-DEDUPE_KEEP]
        if len(st.window) + len(st.pending) < st.capacity:
            return None
        # fills the window from pending, one round (Stream saves right after it), refills the window
        done = st.feed_tokens([], on_round=on_round, max_rounds=1)
        if done:
            self.saved_seq = int(st.extra_meta.get("journal_seq", 0))
            if self.journal.size > compact_bytes:
                with self.lock:     # the queue holds exactly the entries after the saved seq
                    self.journal.rewrite([q.entry for q in self.queue])
        return done[0] if done else None

    def save(self) -> None:
        self.stream.save()
        self.saved_seq = int(self.stream.extra_meta.get("journal_seq", 0))

    # ------------------------------------------------------------------ round events
    def subscribe(self, sink) -> None:
        with self.lock:
            self._subscribers.add(sink)

    def unsubscribe(self, sink) -> None:
        with self.lock:
            self._subscribers.discard(sink)

    def publish(self, event: dict) -> None:
        with self.lock:
            sinks = list(self._subscribers)
        for s in sinks:
            s(event)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.journal.close()
            self._subscribers.clear()
        self.stream.close()


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj).encode("utf-8"))


class Registry:
    """Every live stream of the server, in creation order (the worker's round-robin order)."""

    def __init__(self, model, root: Path, settings, log=print):
        self.model = model
        self.root = Path(root)
        self.settings = settings
        self.log = log
        self.streams: dict[str, LiveStream] = {}
        self.broken: dict[str, str] = {}
        self.lock = threading.Lock()
        self.work = threading.Event()
        self.step_hook = None

    # ------------------------------------------------------------------ paths
    def folder_of(self, sid: str) -> Path:
        check_id(sid)
        f = (self.root / sid)
        if f.resolve().parent != self.root.resolve():
            raise ApiError(400, "bad stream id")
        return f

    # ------------------------------------------------------------------ open
    def load_all(self) -> int:
        """Reopen every stream folder of the root (state resumed, journal replayed past the saved seq)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for f in sorted(self.root.iterdir()):
            if f.name.startswith((".deleted-", ".new-")) and f.is_dir() and not f.is_symlink():
                shutil.rmtree(f, ignore_errors=True)      # a delete or a create cut short by a crash
                continue
            if not STREAM_ID.match(f.name) or f.is_symlink() or not (f / META_FILE).is_file():
                continue
            try:
                live = self._open(f.name, f)
            except (AbsorberError, OSError, ValueError, KeyError) as e:
                self.broken[f.name] = str(e)
                self.log(f"absorber serve: stream {f.name} not opened: {e}")
                continue
            self.streams[f.name] = live
        return len(self.streams)

    def _open(self, sid: str, folder: Path) -> LiveStream:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        st = Stream(self.model, state_dir=folder, config_overrides=meta.get("config") or None)
        st.step_hook = self.step_hook
        saved = int(st.extra_meta.get("journal_seq", 0))
        journal = Journal(folder, min_next_seq=saved + 1)
        live = LiveStream(sid, folder, st, journal, meta)
        for e in journal.entries_at_open:
            if e.seq > saved:
                ids = self.model.encode(e.text)
                live.queue.append(Queued(e, ids))
                live.queued_tokens += len(ids)
                live.replayed += 1
                if e.key is not None:
                    live._remember(e.key)
        journal.entries_at_open = []
        if live.queue:
            self.work.set()
        return live

    def create(self, sid: str | None, overrides: dict | None) -> LiveStream:
        if overrides is not None and not isinstance(overrides, dict):
            raise ApiError(400, "config must be an object of settings (n, m, k, lr, ...)")
        try:
            self.model.config(overrides)       # refuse bad settings before anything is written
        except Exception as e:  # noqa: BLE001 - any refusal of the settings is the client's bad config
            raise ApiError(400, f"bad config: {e}") from None
        with self.lock:
            if sid is None:
                sid = f"s-{uuid.uuid4().hex[:12]}"
            folder = self.folder_of(sid)
            if sid in self.streams or sid in self.broken or folder.exists():
                raise ApiError(409, f"stream {sid!r} exists")
            if len(self.streams) >= self.settings.max_streams:
                raise ApiError(503, f"the server holds its maximum of {self.settings.max_streams} streams",
                               {"Retry-After": "60"})
            tmp = self.root / f".new-{sid}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            meta = {"id": sid, "config": overrides or {}, "created_at": time.time()}
            _write_json_atomic(tmp / META_FILE, meta)
            os.rename(tmp, folder)
            fsync_dir(self.root)
            live = self._open(sid, folder)
            self.streams[sid] = live
            return live

    # ------------------------------------------------------------------ look-ups
    def get(self, sid: str) -> LiveStream:
        check_id(sid)
        live = self.streams.get(sid)
        if live is None:
            if sid in self.broken:
                raise ApiError(503, f"stream {sid!r} could not be reopened: {self.broken[sid]}")
            raise ApiError(404, f"no stream {sid!r}")
        return live

    def snapshot(self) -> list[LiveStream]:
        with self.lock:
            return list(self.streams.values())

    def pending_total(self) -> int:
        return sum(s.pending_tokens() for s in self.snapshot())

    def delete(self, sid: str) -> None:
        """Under the gate's write side: close the stream, move its folder out of the root's namespace
        (atomically), then remove it."""
        with self.lock:
            live = self.get(sid)
            del self.streams[sid]
            live.close()
            trash = self.root / f".deleted-{sid}-{uuid.uuid4().hex[:8]}"
            os.rename(live.folder, trash)
            fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def retry_after(self, live: LiveStream, pending: int) -> int:
        """Seconds until about half the limit is absorbed, at the recent round time and with the active
        streams taking turns."""
        st = live.stream
        recent = st.history[-8:]
        per_round = sum(r.seconds for r in recent) / len(recent) if recent else 0.5
        active = max(1, sum(1 for s in list(self.streams.values()) if s.has_work()))   # no lock: called under live.lock
        rounds = max(pending - self.settings.max_pending_tokens // 2, st.cfg.n) / max(st.cfg.n, 1)
        return int(min(60, max(1, math.ceil(rounds * per_round * active))))
