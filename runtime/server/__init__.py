"""absorber.runtime.server: `absorber serve`, many live transcripts in one process over HTTP and WebSocket.

One Model serves every stream; a worker thread runs the absorption rounds, streams taking turns; answers run
between train steps. Every segment is journaled (append + fsync) before it is acknowledged, and a restart
replays each journal past the seq its stream's state holds, so nothing acknowledged is lost or doubled.

Modules, one job each: `app` (Starlette routes), `service` (the engine the routes call), `scheduler` (the
worker), `gate` (answers before rounds), `streams` (stream folders, accounting), `journal`, `shapes` (input
shapes), `auth` (bearer token), `metrics` (Prometheus), `settings` (limits), `command` (the CLI verb).
Needs the `serve` extra (starlette, uvicorn, prometheus-client); never imports torch.
"""
