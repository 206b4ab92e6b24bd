"""Prometheus metrics of the server (one registry per server): GET /metrics."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ASK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _rss_bytes() -> float:
    try:
        import psutil
        return float(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001
        return float("nan")


class Metrics:
    def __init__(self, streams_fn, pending_fn):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.streams = Gauge("absorber_streams", "live streams", registry=r)
        self.streams.set_function(streams_fn)
        self.pending = Gauge("absorber_pending_tokens", "acknowledged tokens not yet in a window, all streams",
                             registry=r)
        self.pending.set_function(pending_fn)
        self.rss = Gauge("absorber_rss_bytes", "resident set size of the server process", registry=r)
        self.rss.set_function(_rss_bytes)
        self.rounds = Counter("absorber_rounds", "absorption rounds run", registry=r)
        self.round_seconds = Histogram("absorber_round_seconds", "seconds per absorption round",
                                       buckets=ROUND_BUCKETS, registry=r)
        self.ask_seconds = Histogram("absorber_ask_seconds", "seconds per answer (request to last token)",
                                     buckets=ASK_BUCKETS, registry=r)
        self.segments = Counter("absorber_segments", "segments acknowledged (journaled)", registry=r)
        self.tokens = Counter("absorber_tokens", "tokens acknowledged (journaled)", registry=r)
        self.duplicates = Counter("absorber_duplicate_segments", "re-sent segments dropped by deduplication",
                                  registry=r)
        self.rejected = Counter("absorber_rejected_requests", "requests refused, by reason", ["reason"],
                                registry=r)
        self.ws_dropped = Counter("absorber_ws_events_dropped", "round events not sent to a slow WebSocket",
                                  registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
