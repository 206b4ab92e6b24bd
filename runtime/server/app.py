"""The HTTP and WebSocket routes (Starlette). Every route that touches a stream runs its work on a thread
(`run_in_threadpool`): journaling fsyncs, answers run the decoder. Errors are {"error": "..."} with a 4xx/5xx
status, and a refused request changes nothing.

    GET    /health                      503 while the model loads, then 200
    GET    /metrics                     Prometheus text
    POST   /v1/streams                  {"id"?, "config"?} -> 201 the stream's stats
    GET    /v1/streams                  every stream, in brief
    GET    /v1/streams/{id}             stats: tokens seen / absorbed / window / pending, rounds, last loss, ...
    DELETE /v1/streams/{id}
    POST   /v1/streams/{id}/segments    text/plain or JSON shapes (shapes.py) -> 202 ack, after the fsync
    POST   /v1/streams/{id}/ask         {"prompt", "max_new_tokens", "temperature"?, "stream"?} -> JSON or SSE
    WS     /v1/streams/{id}/ws          the same shapes as messages -> acks, errors and round events
"""
from __future__ import annotations

import asyncio
import json
import threading
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from absorber.runtime.server.auth import BearerAuth
from absorber.runtime.server.errors import ApiError
from absorber.runtime.server.metrics import CONTENT_TYPE_LATEST
from absorber.runtime.server.service import Cancelled, Service, log
from absorber.runtime.server.shapes import ShapeParser, decode_utf8, load_json

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes: by Content-Length before reading, else while reading."""
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if n > limit:
            raise ApiError(413, f"request body of {n} bytes exceeds the limit of {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request, limit: int, empty_ok: bool = False) -> dict:
    body = await read_body(request, limit)
    if not body.strip() and empty_ok:
        return {}
    obj = load_json(body)
    if not isinstance(obj, dict):
        raise ApiError(400, "expected a JSON object")
    return obj


def _int(obj: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{key} must be an integer")
    if not lo <= v <= hi:
        raise ApiError(400, f"{key} must be between {lo} and {hi}")
    return v


def _float(obj: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise ApiError(400, f"{key} must be a number between {lo} and {hi}")
    return float(v)


def create_app(service: Service, token: str | None = None, on_load_failed=None) -> Starlette:
    s = service.settings
    parser = ShapeParser(s.max_segment_chars, s.max_batch)

    def parse_payload(content_type: str, body: bytes):
        ct = content_type.split(";")[0].strip().lower()
        if ct == "text/plain":
            return parser.plain(body)
        if ct == "application/json" or ct.endswith("+json"):
            return parser.json(load_json(body))
        raise ApiError(415, "send Content-Type: application/json or text/plain")

    def parse_message(text: str):
        """A WebSocket message: JSON when it starts with { or [ (then it must be valid), else plain text."""
        if text.lstrip()[:1] in ("{", "["):
            return parser.json(load_json(text))
        return parser.plain(text.encode("utf-8"))

    # ------------------------------------------------------------------ operations
    async def health(request: Request):
        if service.ready:
            return JSONResponse({"status": "ok", "streams": len(service.registry.streams),
                                 "broken": sorted(service.registry.broken),
                                 "bundle": str(service.model.bundle.path)})
        status = "loading" if service.load_error is None else "failed"
        return JSONResponse({"status": status, "error": service.load_error}, status_code=503,
                            headers={"Retry-After": "2"})

    async def metrics(request: Request):
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ streams
    async def create_stream(request: Request):
        service.require_ready()
        obj = await read_json_object(request, s.max_body_bytes, empty_ok=True)
        sid = obj.get("id")
        if sid is not None and not isinstance(sid, str):
            raise ApiError(400, "id must be a string")
        return JSONResponse(await run_in_threadpool(service.create, sid, obj.get("config")), status_code=201)

    async def list_streams(request: Request):
        return JSONResponse(await run_in_threadpool(service.list))

    async def get_stream(request: Request):
        return JSONResponse(await run_in_threadpool(service.stats, request.path_params["sid"]))

    async def delete_stream(request: Request):
        return JSONResponse(await run_in_threadpool(service.delete, request.path_params["sid"]))

    # ------------------------------------------------------------------ text in
    async def post_segments(request: Request):
        sid = request.path_params["sid"]
        service.require_ready().get(sid)                  # 404 before reading a body for nobody
        body = await read_body(request, s.max_body_bytes)
        parsed = parse_payload(request.headers.get("content-type", ""), body)
        return JSONResponse(await run_in_threadpool(service.ingest, sid, parsed), status_code=202)

    # ------------------------------------------------------------------ answers
    async def ask(request: Request):
        sid = request.path_params["sid"]
        service.require_ready().get(sid)
        obj = await read_json_object(request, s.max_body_bytes)
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string")
        if len(prompt) > s.max_prompt_chars:
            raise ApiError(413, f"a prompt of {len(prompt)} characters exceeds the limit of {s.max_prompt_chars}")
        kw = {"max_new_tokens": _int(obj, "max_new_tokens", 64, 0, s.max_new_tokens),
              "temperature": _float(obj, "temperature", 0.0, 0.0, 10.0),
              "top_p": _float(obj, "top_p", 1.0, 1e-6, 1.0)}
        seed = obj.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ApiError(400, "seed must be a non-negative integer")
        kw["seed"] = seed
        want_sse = obj.get("stream") is True or "text/event-stream" in request.headers.get("accept", "")
        if not want_sse:
            return JSONResponse(await run_in_threadpool(service.answer_once, sid, prompt, **kw))
        return await _sse_answer(sid, prompt, kw)

    async def _sse_answer(sid: str, prompt: str, kw: dict):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()     # at most max_new_tokens + 1 items
        cancel = threading.Event()

        def on_piece(text: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("token", {"text": text}))

        def work():
            try:
                res = service.answer(sid, prompt, on_piece=on_piece, cancel=cancel, **kw)
                loop.call_soon_threadsafe(events.put_nowait, ("done", res))
            except Cancelled:
                pass
            except ApiError as e:
                loop.call_soon_threadsafe(events.put_nowait, ("error", {**e.body(), "status": e.status}))
            except Exception as e:  # noqa: BLE001 - reported to the client, then the stream ends
                loop.call_soon_threadsafe(events.put_nowait, ("error", {"error": f"{type(e).__name__}: {e}",
                                                                        "status": 500}))
            finally:
                service.release_ask()

        service.acquire_ask()             # a clear 503 before the 200 when every answer slot is taken
        try:
            loop.run_in_executor(None, work)
        except BaseException:
            service.release_ask()
            raise

        async def gen():
            try:
                while True:
                    kind, data = await events.get()
                    yield f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
                    if kind in ("done", "error"):
                        break
            finally:
                cancel.set()              # a client gone mid-answer stops the decoder at the next token

        return StreamingResponse(gen(), media_type="text/event-stream", headers=SSE_HEADERS)

    # ------------------------------------------------------------------ WebSocket
    async def ws_endpoint(websocket: WebSocket):
        sid = websocket.path_params["sid"]
        try:
            service.require_ready().get(sid)
        except ApiError as e:
            await websocket.send_denial_response(_error(e)) if "websocket.http.response" in \
                websocket.scope.get("extensions", {}) else await websocket.close(code=1008, reason=e.message[:120])
            return
        await websocket.accept()
        loop = asyncio.get_running_loop()
        # (the stream is looked up again below: it may be deleted in between)
        events: asyncio.Queue = asyncio.Queue(maxsize=s.ws_queue)
        send_lock = asyncio.Lock()

        async def send(obj: dict) -> None:
            async with send_lock:
                await websocket.send_text(json.dumps(obj, ensure_ascii=False))

        def put(ev: dict) -> None:
            try:
                events.put_nowait(ev)
            except asyncio.QueueFull:
                service.metrics.ws_dropped.inc()

        def sink(ev: dict) -> None:            # called on the worker thread
            loop.call_soon_threadsafe(put, ev)

        async def pump():
            while True:
                await send(await events.get())

        pumper = None
        try:
            live = service.registry.get(sid)
        except ApiError as e:
            await websocket.close(code=1008, reason=e.message[:120])
            return
        live.subscribe(sink)
        pumper = asyncio.create_task(pump())
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                try:
                    text = msg.get("text")
                    if text is None:
                        text = decode_utf8(msg.get("bytes") or b"")
                    parsed = parse_message(text)
                    ack = await run_in_threadpool(service.ingest, sid, parsed)
                    await send({"type": "ack", **ack})
                except ApiError as e:
                    out = {"type": "error", "status": e.status, **e.body()}
                    if "Retry-After" in e.headers:
                        out["retry_after"] = int(e.headers["Retry-After"])
                    await send(out)
        except Exception:  # noqa: BLE001 - a broken connection ends this handler only
            pass
        finally:
            live.unsubscribe(sink)
            pumper.cancel()

    # ------------------------------------------------------------------ errors and life
    async def api_error(request, exc: ApiError):
        return _error(exc)

    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": exc.detail or "error"}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def internal_error(request, exc: Exception):
        log(f"absorber serve: internal error on {request.method} {request.url.path}: {type(exc).__name__}: {exc}")
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @asynccontextmanager
    async def lifespan(app):
        def load():
            try:
                service.load()
            except Exception as e:  # noqa: BLE001
                service.load_error = service.load_error or f"{type(e).__name__}: {e}"
                log(f"absorber serve: error: {service.load_error}")
                if on_load_failed is not None:
                    on_load_failed()
        loader = threading.Thread(target=load, name="absorber-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await run_in_threadpool(loader.join)
            await run_in_threadpool(service.shutdown)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/streams", create_stream, methods=["POST"]),
        Route("/v1/streams", list_streams, methods=["GET"]),
        Route("/v1/streams/{sid}", get_stream, methods=["GET"]),
        Route("/v1/streams/{sid}", delete_stream, methods=["DELETE"]),
        Route("/v1/streams/{sid}/segments", post_segments, methods=["POST"]),
        Route("/v1/streams/{sid}/ask", ask, methods=["POST"]),
        WebSocketRoute("/v1/streams/{sid}/ws", ws_endpoint),
    ]

    def refused():
        service.metrics.rejected.labels(reason="401").inc()

    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(BearerAuth, token=token, on_refused=refused)],
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error})
