"""The server's engine, without HTTP: one Model for every stream, the registry, the gate, the worker, and the
operations the routes call (all blocking: routes run them on worker threads)."""
from __future__ import annotations

import sys
import threading
import time

from absorber.errors import AbsorberError
from absorber.runtime.server.errors import ApiError
from absorber.runtime.server.gate import Gate
from absorber.runtime.server.metrics import Metrics
from absorber.runtime.server.scheduler import Scheduler
from absorber.runtime.server.settings import ServeSettings
from absorber.runtime.server.shapes import Parsed
from absorber.runtime.server.streams import Registry, segment_text


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Cancelled(Exception):
    """The client of a streamed answer went away."""


class Service:
    def __init__(self, bundle: str, settings: ServeSettings, device: str = "cpu", profile=None,
                 verify_hashes: bool = True):
        self.bundle = bundle
        self.settings = settings
        self.device = device
        self.profile = profile
        self.verify_hashes = verify_hashes
        self.model = None
        self.registry: Registry | None = None
        self.scheduler: Scheduler | None = None
        self.gate = Gate(settings.max_yield_s)
        self.metrics = Metrics(lambda: len(self.registry.streams) if self.registry else 0,
                               lambda: self.registry.pending_total() if self.registry else 0)
        self.asks = threading.BoundedSemaphore(settings.max_asks)
        self.ready = False
        self.load_error: str | None = None
        self.load_seconds: float | None = None

    # ------------------------------------------------------------------ life
    def load(self) -> None:
        """Open the model, reopen every stream of the state root (journals replayed), start the worker."""
        from absorber.runtime.model import Model
        t0 = time.perf_counter()
        try:
            self.model = Model.open(self.bundle, device=self.device, profile=self.profile,
                                    verify_hashes=self.verify_hashes)
            reg = Registry(self.model, self.settings.state_root, self.settings, log=log)
            reg.step_hook = self.gate.yield_to_readers
            n = reg.load_all()
        except (AbsorberError, OSError) as e:
            self.load_error = str(e)
            raise
        self.registry = reg
        self.scheduler = Scheduler(reg, self.gate, self.metrics, self.settings.journal_compact_bytes, log=log)
        self.scheduler.start()
        self.load_seconds = time.perf_counter() - t0
        replayed = sum(s.replayed for s in reg.streams.values())
        log(f"absorber serve: model {self.model.bundle.path.name} open in {self.load_seconds:.1f} s; "
            f"{n} stream(s) reopened from {self.settings.state_root} ({replayed} journaled segment(s) to replay)"
            + (f"; {len(reg.broken)} not opened" if reg.broken else ""))
        self.ready = True

    def shutdown(self) -> None:
        """Stop the worker after its current round, then save every stream (its journal stays the truth)."""
        self.ready = False
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.registry is None:
            return
        saved = 0
        with self.gate.write():
            for live in self.registry.snapshot():
                if not live.closed and not live.error:
                    try:
                        live.save()
                        saved += 1
                    except (AbsorberError, OSError) as e:
                        log(f"absorber serve: could not save stream {live.id}: {e}")
                if not live.closed:
                    live.close()
        log(f"absorber serve: stopped; {saved} stream(s) saved")

    def require_ready(self) -> Registry:
        if not self.ready:
            raise ApiError(503, "the model is still loading" if self.load_error is None
                           else f"the model failed to load: {self.load_error}", {"Retry-After": "2"})
        return self.registry

    # ------------------------------------------------------------------ streams
    def create(self, sid, overrides) -> dict:
        live = self.require_ready().create(sid, overrides)
        return self.stats(live.id)

    def stats(self, sid: str) -> dict:
        live = self.require_ready().get(sid)
        with self.gate.read():
            return live.stats()

    def list(self) -> dict:
        reg = self.require_ready()
        out = []
        with self.gate.read():
            for live in reg.snapshot():
                s = live.stats()
                out.append({k: s[k] for k in ("id", "tokens_seen", "tokens_absorbed", "tokens_pending", "rounds",
                                              "last_loss", "error")})
        return {"streams": out, "broken": reg.broken}

    def delete(self, sid: str) -> dict:
        reg = self.require_ready()
        reg.get(sid)
        with self.gate.write():
            reg.delete(sid)
        return {"deleted": sid}

    # ------------------------------------------------------------------ text in
    def ingest(self, sid: str, parsed: Parsed) -> dict:
        reg = self.require_ready()
        live = reg.get(sid)
        items = []
        for seg in parsed.segments:
            text = segment_text(seg.text)
            items.append((text, self.model.encode(text), seg.key))
        try:
            ack = live.ingest(items, self.settings.max_pending_tokens, reg.retry_after)
        except ApiError as e:
            self.metrics.rejected.labels(reason=str(e.status)).inc()
            raise
        except OSError as e:
            raise ApiError(507, f"could not journal the segment(s): {e.strerror or e}") from None
        ack["ignored"] = parsed.ignored
        if ack["accepted"]:
            self.metrics.segments.inc(ack["accepted"])
            self.metrics.tokens.inc(ack["tokens"])
            reg.work.set()
        if ack["duplicates"]:
            self.metrics.duplicates.inc(ack["duplicates"])
        return ack

    # ------------------------------------------------------------------ answers
    def acquire_ask(self) -> None:
        """Take one of the --max-asks answer slots, or refuse with 503."""
        self.require_ready()
        if not self.asks.acquire(blocking=False):
            self.metrics.rejected.labels(reason="503").inc()
            raise ApiError(503, f"{self.settings.max_asks} answers are already running; retry shortly",
                           {"Retry-After": "1"})

    def release_ask(self) -> None:
        self.asks.release()

    def answer_once(self, sid: str, prompt: str, **kw) -> dict:
        self.acquire_ask()
        try:
            return self.answer(sid, prompt, **kw)
        finally:
            self.release_ask()

    def answer(self, sid: str, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, on_piece=None, cancel: threading.Event | None = None) -> dict:
        """Continue the stream's window (+ queued text) after `prompt` with its adapters (the caller holds an
        answer slot). Runs between two train steps of the worker (the gate's read side), never after a whole
        round. on_piece(text) gets the answer as it grows (decoded text, whole characters only)."""
        live = self.require_ready().get(sid)
        t0 = time.perf_counter()
        model = self.model
        pids = model.encode(prompt)
        out: list[int] = []
        state = {"sent": ""}

        def on_token(tok: int) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            out.append(tok)
            if on_piece is not None:
                text = model.decode(out)
                if text.startswith(state["sent"]) and not text.endswith("\ufffd") and text != state["sent"]:
                    on_piece(text[len(state["sent"]):])
                    state["sent"] = text

        with self.gate.read():
            if live.closed:
                raise ApiError(404, f"no stream {sid!r}")
            ctx = live.context_ids()
            t_ctx = time.perf_counter()
            live.stream.generate_ids(ctx + pids, max_new_tokens, temperature, top_p, seed, on_token=on_token)
        text = model.decode(out)
        if on_piece is not None and text != state["sent"] and text.startswith(state["sent"]):
            on_piece(text[len(state["sent"]):])
        seconds = time.perf_counter() - t0
        self.metrics.ask_seconds.observe(seconds)
        return {"answer": text, "tokens": len(out), "context_tokens": len(ctx), "seconds": round(seconds, 4),
                "waited_seconds": round(t_ctx - t0, 4)}
