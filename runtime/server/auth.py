"""Who may talk to the server: a bearer token, required whenever the server listens beyond loopback.

`Authorization: Bearer TOKEN`, or `?token=TOKEN` for browser WebSockets (which cannot set headers). Compared in
constant time. GET /health stays open (liveness probes); everything else needs the token when one is set.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
from pathlib import Path
from urllib.parse import parse_qs

from absorber.errors import AbsorberError

OPEN_PATHS = ("/health",)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: str | os.PathLike) -> str:
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise AbsorberError(f"cannot read the token file {p} ({type(e).__name__})") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise AbsorberError(f"the token in {p} must be one word of at least 16 characters")
    return token


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (before anything is bound)."""
    if token is None and not is_loopback(host):
        raise AbsorberError(f"--host {host} is not loopback: refusing to serve without --token-file "
                            f"(every client would read and write every stream)")


def _presented(scope) -> str | None:
    for k, v in scope.get("headers", []):
        if k == b"authorization":
            s = v.decode("latin-1")
            if s[:7].lower() == "bearer ":
                return s[7:].strip()
            return None
    qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    vals = qs.get("token")
    return vals[0] if vals else None


def token_ok(scope, token: str) -> bool:
    got = _presented(scope)
    return got is not None and hmac.compare_digest(got.encode("utf-8", "replace"), token.encode("utf-8"))


class BearerAuth:
    """Pure ASGI middleware: 401 {"error": ...} (HTTP) or a refused WebSocket handshake without the token."""

    def __init__(self, app, token: str | None, on_refused=None):
        self.app = app
        self.token = token
        self.on_refused = on_refused

    async def __call__(self, scope, receive, send):
        if (self.token is None or scope["type"] not in ("http", "websocket")
                or scope.get("path") in OPEN_PATHS or token_ok(scope, self.token)):
            return await self.app(scope, receive, send)
        if self.on_refused is not None:
            self.on_refused()
        body = json.dumps({"error": "missing or bad bearer token"}).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await receive()                                   # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
