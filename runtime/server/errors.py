"""The one error a request can end with: an HTTP status and a one-line message, sent as {"error": "..."}."""
from __future__ import annotations


class ApiError(Exception):
    """A refused request: nothing was changed. `headers` (e.g. Retry-After) go with the response."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": self.message}
