"""What a client may send as text: the input shapes of POST /segments and of WebSocket messages -> segments.

- text/plain: the body is one segment;
- {"text": "..."} (other fields ignored), or a JSON string;
- a list of any of these shapes (a batch);
- WhisperLive: {"segments": [{"start", "end", "text", "completed"}, ...]}. WhisperLive re-sends the recent
  segments with every message: only completed ones are kept, deduplicated by (start, end, text) per stream;
- OpenAI realtime transcription: {"type": "conversation.item.input_audio_transcription.completed",
  "transcript": "...", "item_id": ...} (deduplicated by item_id and content_index); other event types
  (deltas, session events) are ignored.

Parsing only checks shapes and sizes; nothing is journaled here. Any bad shape is an ApiError(400 / 413) and
the whole request is refused (no partial batch).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from absorber.runtime.server.errors import ApiError

OPENAI_COMPLETED = "conversation.item.input_audio_transcription.completed"


@dataclass
class Segment:
    text: str
    key: str | None = None     # dedupe key (WhisperLive, OpenAI item) or None


@dataclass
class Parsed:
    segments: list[Segment]
    ignored: int = 0           # WhisperLive segments not completed, OpenAI events of other types, empty texts


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, default=str).encode()).hexdigest()[:24]


def decode_utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"body is not valid UTF-8 (byte {e.start})") from None


def load_json(body: bytes | str):
    text = decode_utf8(body) if isinstance(body, (bytes, bytearray)) else body
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


class ShapeParser:
    def __init__(self, max_segment_chars: int, max_batch: int):
        self.max_segment_chars = max_segment_chars
        self.max_batch = max_batch

    def _text(self, text, where: str) -> str:
        if not isinstance(text, str):
            raise ApiError(400, f"{where} must be a string, not {type(text).__name__}")
        if len(text) > self.max_segment_chars:
            raise ApiError(413, f"{where}: a segment of {len(text)} characters exceeds the limit of "
                                f"{self.max_segment_chars}")
        return text

    def plain(self, body: bytes) -> Parsed:
        return self._collect([Segment(self._text(decode_utf8(body), "text/plain body"))], 0)

    def json(self, obj) -> Parsed:
        segs: list[Segment] = []
        ignored = self._one(obj, segs, "body", top=True)
        return self._collect(segs, ignored)

    def _collect(self, segs: list[Segment], ignored: int) -> Parsed:
        kept = [s for s in segs if s.text.strip()]
        return Parsed(kept, ignored + len(segs) - len(kept))

    def _one(self, obj, segs: list[Segment], where: str, top: bool = False) -> int:
        if len(segs) > self.max_batch:
            raise ApiError(413, f"more than {self.max_batch} segments in one request")
        if isinstance(obj, str):
            segs.append(Segment(self._text(obj, where)))
            return 0
        if isinstance(obj, list):
            if not top:
                raise ApiError(400, f"{where}: nested lists are not a segment shape")
            if len(obj) > self.max_batch:
                raise ApiError(413, f"a batch of {len(obj)} items exceeds the limit of {self.max_batch}")
            return sum(self._one(x, segs, f"item {i}") for i, x in enumerate(obj))
        if not isinstance(obj, dict):
            raise ApiError(400, f"{where}: expected a string, an object or a list, not {type(obj).__name__}")
        if "type" in obj:                                    # an OpenAI realtime event
            if obj["type"] != OPENAI_COMPLETED:
                return 1
            if "transcript" not in obj:
                raise ApiError(400, f"{where}: {OPENAI_COMPLETED} event without a transcript")
            text = self._text(obj["transcript"], f"{where}.transcript")
            item = obj.get("item_id")
            key = _key("openai", item, obj.get("content_index", 0)) if item is not None else None
            segs.append(Segment(text, key))
            return 0
        if "segments" in obj:                                # WhisperLive
            lst = obj["segments"]
            if not isinstance(lst, list):
                raise ApiError(400, f"{where}.segments must be a list")
            if len(lst) > self.max_batch:
                raise ApiError(413, f"{len(lst)} segments exceed the limit of {self.max_batch}")
            ignored = 0
            for i, s in enumerate(lst):
                w = f"{where}.segments[{i}]"
                if not isinstance(s, dict) or "text" not in s:
                    raise ApiError(400, f"{w}: expected an object with start, end, text, completed")
                text = self._text(s["text"], f"{w}.text")
                if s.get("completed") is not True:
                    ignored += 1
                    continue
                segs.append(Segment(text, _key("whisper", str(s.get("start")), str(s.get("end")), text)))
            return ignored
        if "text" in obj:
            segs.append(Segment(self._text(obj["text"], f"{where}.text")))
            return 0
        raise ApiError(400, f"{where}: no text (send {{\"text\": ...}}, a list of those, WhisperLive "
                            f"{{\"segments\": [...]}} or an OpenAI transcription event)")
