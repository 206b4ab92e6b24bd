"""The server's limits and paths, in one place (the command line fills them)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_state_root() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "absorber" / "serve"


@dataclass
class ServeSettings:
    state_root: Path
    max_streams: int = 64                 # POST /v1/streams past this: 503
    max_pending_tokens: int = 8192        # per stream: segments past this backlog get 429 + Retry-After
    max_body_bytes: int = 1 << 20         # any request body / WebSocket message: 413 past this
    max_segment_chars: int = 16384        # one segment's text: 413 past this
    max_batch: int = 1000                 # segments in one request
    max_prompt_chars: int = 16384
    max_new_tokens: int = 512             # ask: 400 past this
    max_asks: int = 4                     # answers in flight at once: 503 past this
    journal_compact_bytes: int = 1 << 20  # rewrite a journal (dropping what the state holds) past this size
    ws_queue: int = 256                   # round events buffered for one WebSocket (then dropped)
    max_yield_s: float = 5.0              # longest a round yields to answers (and answers to a round)
