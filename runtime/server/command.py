"""`absorber serve BUNDLE`: many live transcripts in one process, over HTTP and WebSocket."""
from __future__ import annotations

from pathlib import Path

from absorber.errors import AbsorberError

HELP = "serve many live transcripts over HTTP/WebSocket: absorb segments, answer, never lose an acknowledged one"
DESCRIPTION = """Serve many live text streams (calls, meetings, channels) from one process and one copy of the model.

A transcription pipeline posts segments as they are finalized; anyone may ask about what was said at any time.
Each stream absorbs its old context into its own LoRA adapters (rounds run on a worker thread, streams taking
turns, one round each per turn); answers run between two train steps, never after a whole round.

endpoints (JSON errors {"error": "..."}):
  GET    /health                      503 while the model loads, then 200
  GET    /metrics                     Prometheus: streams, pending tokens, rounds, round/ask seconds, RSS
  POST   /v1/streams                  {"id": "call-42", "config": {"n": 512, "lr": 1e-3}} (both optional)
  GET    /v1/streams                  the streams, in brief
  GET    /v1/streams/ID               tokens seen / absorbed / window / pending, rounds, last loss, rollbacks
  DELETE /v1/streams/ID
  POST   /v1/streams/ID/segments      text/plain; {"text": ...}; a list of those; WhisperLive
                                      {"segments": [{"start","end","text","completed"}]} (completed ones,
                                      deduplicated); OpenAI realtime transcription ...completed events
                                      -> 202 {"accepted", "tokens", "seq", "pending", ...}
  POST   /v1/streams/ID/ask           {"prompt", "max_new_tokens", "temperature", "stream": true for SSE}
  WS     /v1/streams/ID/ws            the same shapes as messages; sends back acks, errors, round events

durability: a segment is appended to its stream's journal and fsynced BEFORE its 2xx. Each round saves the
stream's state atomically with the last journal seq it holds; a restart (even after kill -9) reopens every
stream under --state-root and replays its journal past that seq: every acknowledged segment is absorbed or
pending exactly once.

limits: past --max-pending-tokens a stream's segments get 429 + Retry-After; past --max-streams, 503; bodies,
WebSocket messages, segments and prompts are bounded (413).

security: listens on 127.0.0.1 by default. With --token-file every request but /health needs
"Authorization: Bearer TOKEN" (or ?token=TOKEN, for browser WebSockets). A --host that is not loopback is
refused without --token-file.

examples:
  absorber serve ~/.cache/absorber/smollm2-135m-int8 --state-root /var/lib/absorber
  curl -s -XPOST localhost:8750/v1/streams -d '{"id": "call-42"}' -H 'Content-Type: application/json'
  curl -s localhost:8750/v1/streams/call-42/segments -H 'Content-Type: text/plain' -d 'Hello everyone.'
  curl -sN localhost:8750/v1/streams/call-42/ask -H 'Content-Type: application/json' \\
       -d '{"prompt": "\\nQ: Who spoke first?\\nA:", "max_new_tokens": 32, "stream": true}'
"""


def add_arguments(p) -> None:
    from absorber.runtime.server.settings import ServeSettings, default_state_root
    d = ServeSettings(state_root=default_state_root())
    p.add_argument("bundle", help="bundle folder written by `absorber export`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; anything "
                                                        "but loopback needs --token-file)")
    p.add_argument("--port", type=int, default=8750, help="port (default 8750)")
    p.add_argument("--token-file", metavar="F", help="file holding the bearer token (one word, >= 16 characters)")
    p.add_argument("--state-root", metavar="DIR", default=str(default_state_root()),
                   help="one folder per stream: journal + state (default %(default)s)")
    p.add_argument("--max-streams", type=int, default=d.max_streams, help="streams held at most (default %(default)s)")
    p.add_argument("--max-pending-tokens", type=int, default=d.max_pending_tokens,
                   help="per stream: acknowledged tokens not yet in the window past which segments get 429 "
                        "(default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="largest request body or WebSocket message (default %(default)s)")
    p.add_argument("--max-segment-chars", type=int, default=d.max_segment_chars,
                   help="largest segment (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="largest max_new_tokens of an answer (default %(default)s)")
    p.add_argument("--max-asks", type=int, default=d.max_asks, help="answers running at once (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=512, help="open connections at most (default %(default)s)")
    p.add_argument("--journal-compact-bytes", type=int, default=d.journal_compact_bytes,
                   help="rewrite a journal without what the state holds past this size (default %(default)s)")
    p.add_argument("--device", default="cpu", help="auto|cpu|cuda[:i]|dml|... (default cpu)")
    p.add_argument("--profile", metavar="NAME", help="device profile (absorber devices) or a JSON file")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default warning; access logs are off: they would show ?token=)")


def main(args) -> int:
    from absorber.runtime.server.auth import check_exposure, read_token
    from absorber.runtime.server.settings import ServeSettings

    token = read_token(args.token_file) if args.token_file else None
    check_exposure(args.host, token)            # before anything is bound
    for name in ("max_streams", "max_pending_tokens", "max_body_bytes", "max_segment_chars", "max_asks",
                 "max_connections", "journal_compact_bytes"):
        if getattr(args, name) < 1:
            raise AbsorberError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_new_tokens < 0:
        raise AbsorberError("--max-new-tokens must be >= 0")
    if not (Path(args.bundle) / "manifest.json").is_file():
        raise AbsorberError(f"{args.bundle} is not a bundle (no manifest.json)")
    try:
        import uvicorn
        from absorber.runtime.server.app import create_app
        from absorber.runtime.server.service import Service
    except ImportError as e:
        raise AbsorberError(f"absorber serve needs the serve extra: pip install 'absorber[serve]' ({e.name} "
                            "is missing)") from None
    settings = ServeSettings(state_root=Path(args.state_root).expanduser(), max_streams=args.max_streams,
                             max_pending_tokens=args.max_pending_tokens, max_body_bytes=args.max_body_bytes,
                             max_segment_chars=args.max_segment_chars, max_new_tokens=args.max_new_tokens,
                             max_asks=args.max_asks, journal_compact_bytes=args.journal_compact_bytes)
    service = Service(args.bundle, settings, device=args.device, profile=args.profile)
    holder = {}

    def load_failed():
        srv = holder.get("server")
        if srv is not None:
            srv.should_exit = True

    app = create_app(service, token=token, on_load_failed=load_failed)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            lifespan="on", ws_max_size=settings.max_body_bytes,
                            limit_concurrency=args.max_connections, timeout_graceful_shutdown=10,
                            server_header=False)
    server = uvicorn.Server(config)
    holder["server"] = server
    where = f"http://{args.host}:{args.port}" if ":" not in args.host else f"http://[{args.host}]:{args.port}"
    print(f"absorber serve: listening on {where} (state in {settings.state_root}; "
          f"{'bearer token required' if token else 'no token: loopback only'}); loading the model...",
          file=__import__("sys").stderr, flush=True)
    server.run()
    if service.load_error is not None:
        raise AbsorberError(f"the model failed to load: {service.load_error}")
    return 0
