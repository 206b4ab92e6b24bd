"""`absorber serve` under load (benchmarks/serve.md): capacity in live speakers, answer latency, RSS per stream.

    python benchmarks/scripts/serve_bench.py [BUNDLE] [--phases rss,capacity,live,defaults]
        [--n 128 --m 64 --k 2] [--live-seconds 150] [--json benchmarks/serve.json]

BUNDLE defaults to ~/.cache/absorber/smollm2-135m-int8. Each phase runs a fresh `absorber serve` process on
127.0.0.1 (a free port, a temporary state root) and talks to it over HTTP only (httpx), as a client would.

- rss: RSS of the server (its /metrics absorber_rss_bytes) with the model alone, then with 1, 8 and 32 streams,
  each having run one round (so that its adapters, AdamW moments and scratch buffers are all touched). The
  streams use n=64, m=32, k=1 to keep this phase short: a stream's buffers do not depend on n, m or k.
- capacity: 2 streams with a backlog of 2 rounds each at the serving config (--n/--m/--k); the worker's
  absorption rate R = tokens absorbed / wall time of those rounds (single worker: rounds are sequential), and
  R / 3 = the live speakers at ~3 tokens/s it keeps up with.
- live: floor(0.8 R / 3) speakers (or --speakers), each posting one ~12-token segment of a State of the Union transcript every
  ~4 s (about 3 tokens/s) for --live-seconds, windows pre-filled to staggered levels so that rounds start at
  once; an asker sends an SSE question every --ask-every s (16 new tokens) to a random stream: time to first token and to
  the last one. Keeping up = the backlog (tokens acknowledged but not yet in a window) does not grow.
- defaults: one round at the bundle's own n/m/k (what a stream gets without config), for its rate.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = Path("~/.cache/absorber/smollm2-135m-int8").expanduser()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: Path, *extra: str):
        self.tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                                         if os.environ.get("PYTHONPATH") else ""))
        self.log = open(Path(self.tmp.name) / "server.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "absorber", "serve", str(bundle), "--port",
                                      str(self.port), "--state-root", str(Path(self.tmp.name) / "state"),
                                      "--max-pending-tokens", "100000", *extra], env=env, stdout=self.log,
                                     stderr=self.log)
        t_end = time.monotonic() + 300
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {(Path(self.tmp.name) / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("server not healthy in 300 s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.tmp.cleanup()


def rss_mb(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("absorber_rss_bytes"):
            return float(line.split()[1]) / 2**20
    return float("nan")


def stats(c: httpx.Client, sid: str) -> dict:
    return c.get(f"/v1/streams/{sid}").json()


def corpus_words() -> list[str]:
    from absorber import data
    words: list[str] = []
    for sp in data.speeches()[:12]:
        words += sp.text().split()
    return words


SEG_WORDS = 10      # words per segment, set from the bundle's tokenizer so that a segment is ~12 tokens


def set_segment_words(bundle: Path, words: list[str]) -> float:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    sample = " ".join(words[:5000])
    per_word = len(tok.encode(sample, add_special_tokens=False).ids) / 5000
    global SEG_WORDS
    SEG_WORDS = max(1, round(12 / per_word))
    return per_word


def text_of(words: list[str], start: int, count: int | None = None) -> str:
    count = SEG_WORDS if count is None else count
    return " ".join(words[(start + i) % len(words)] for i in range(count))


def wait_rounds(c: httpx.Client, sids: list[str], rounds: int, timeout: float) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if all(stats(c, s)["rounds"] >= rounds for s in sids):
            return
        time.sleep(0.5)
    raise SystemExit(f"rounds not reached in {timeout} s")


def feed_tokens(c: httpx.Client, sid: str, words: list[str], start: int, tokens: int) -> int:
    """Post ~10-word segments until `tokens` tokens are acknowledged; returns the next word offset."""
    got = 0
    while got < tokens:
        r = c.post(f"/v1/streams/{sid}/segments", json={"text": text_of(words, start)})
        r.raise_for_status()
        got += r.json()["tokens"]
        start += SEG_WORDS
    return start


# ------------------------------------------------------------------------------------------------ phases
def phase_rss(bundle: Path, words: list[str], counts=(1, 8, 32)) -> dict:
    srv = Server(bundle, "--max-streams", str(max(counts)))
    out = {"config": {"n": 64, "m": 32, "k": 1}, "points": []}
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            out["rss_model_mb"] = rss_mb(c)
            made: list[str] = []
            for count in counts:
                new = [f"r{i:02d}" for i in range(len(made), count)]
                for sid in new:
                    c.post("/v1/streams", json={"id": sid, "config": out["config"]}).raise_for_status()
                    feed_tokens(c, sid, words, 997 * len(made), 100)
                    made.append(sid)
                wait_rounds(c, made, 1, 600)
                rss = rss_mb(c)
                out["points"].append({"streams": count, "rss_mb": round(rss, 1),
                                      "per_stream_mb": round((rss - out["rss_model_mb"]) / count, 1)})
                print(f"rss: {count} streams -> {rss:.0f} MB", file=sys.stderr)
    finally:
        srv.close()
    pts = out["points"]
    out["marginal_mb_per_stream"] = round((pts[-1]["rss_mb"] - pts[0]["rss_mb"]) / (pts[-1]["streams"] - pts[0]["streams"]), 1)
    return out


def phase_capacity(bundle: Path, words: list[str], cfg: dict | None, streams: int = 2, rounds: int = 2) -> dict:
    srv = Server(bundle)
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            sids = [f"c{i}" for i in range(streams)]
            for sid in sids:
                c.post("/v1/streams", json={"id": sid, "config": cfg or {}}).raise_for_status()
            st0 = stats(c, sids[0])["config"]
            n, m = st0["n"], st0["m"]
            t0 = time.monotonic()
            for i, sid in enumerate(sids):
                feed_tokens(c, sid, words, 5000 * i, n * rounds + m + 1)
            wait_rounds(c, sids, rounds, 3600)
            wall = time.monotonic() - t0
            absorbed = sum(stats(c, s)["tokens_absorbed"] for s in sids)
            metrics = c.get("/metrics").text
            rs = {x.split()[0]: float(x.split()[1]) for x in metrics.splitlines()
                  if x.startswith(("absorber_round_seconds_sum", "absorber_round_seconds_count"))}
            count = rs.get("absorber_round_seconds_count", 0.0)
            per_round = rs["absorber_round_seconds_sum"] / count if count else float("nan")
    finally:
        srv.close()
    rate = absorbed / wall
    out = {"config": st0, "streams": streams, "rounds": int(count), "tokens_absorbed": absorbed,
           "wall_seconds": round(wall, 1), "seconds_per_round": round(per_round, 2),
           "absorbed_tokens_per_s": round(rate, 1), "round_rate_tokens_per_s": round(n / per_round, 1),
           "speakers_at_3_tok_s": round(rate / 3, 1)}
    print(f"capacity {st0['n']}/{st0['m']}/{st0['k']}: {out}", file=sys.stderr)
    return out


async def _live(url: str, sids: list[str], words: list[str], seconds: float, samples: list, asks: list,
                ask_every: float) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    limits = httpx.Limits(max_connections=len(sids) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        async def speaker(i: int, sid: str) -> None:
            await asyncio.sleep(random.uniform(0, 4))
            pos = 20000 + 3000 * i
            while loop.time() - t0 < seconds:
                t = loop.time()
                r = await c.post(f"/v1/streams/{sid}/segments", json={"text": text_of(words, pos)})
                r.raise_for_status()
                pos += SEG_WORDS
                await asyncio.sleep(max(0.0, 4.0 - (loop.time() - t)))

        async def asker() -> None:
            await asyncio.sleep(2)
            while loop.time() - t0 < seconds:
                t = loop.time()
                first = None
                sid = random.choice(sids)
                async with c.stream("POST", f"/v1/streams/{sid}/ask",
                                    json={"prompt": "\nQuestion: What did the speaker just talk about?\nAnswer:",
                                          "max_new_tokens": 16, "stream": True}) as resp:
                    if resp.status_code != 200:
                        asks.append({"status": resp.status_code})
                    else:
                        async for line in resp.aiter_lines():
                            if line.startswith("event: ") and first is None:
                                first = loop.time() - t
                            if line.startswith("event: done"):
                                break
                        asks.append({"status": 200, "first_s": first, "total_s": loop.time() - t})
                await asyncio.sleep(max(0.0, ask_every - (loop.time() - t)))

        async def sampler() -> None:
            while loop.time() - t0 < seconds + 1:
                r = await c.get("/v1/streams")
                ss = r.json()["streams"]
                samples.append({"t": round(loop.time() - t0, 1), "pending": sum(s["tokens_pending"] for s in ss),
                                "absorbed": sum(s["tokens_absorbed"] for s in ss),
                                "seen": sum(s["tokens_seen"] for s in ss)})
                await asyncio.sleep(10)

        await asyncio.wait_for(asyncio.gather(*(speaker(i, s) for i, s in enumerate(sids)), asker(), sampler()),
                               timeout=seconds + 600)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def phase_live(bundle: Path, words: list[str], cfg: dict, speakers: int, seconds: float, ask_every: float) -> dict:
    srv = Server(bundle, "--max-streams", str(max(speakers, 1)))
    samples: list = []
    asks: list = []
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            sids = [f"spk{i:02d}" for i in range(speakers)]
            for i, sid in enumerate(sids):
                c.post("/v1/streams", json={"id": sid, "config": cfg}).raise_for_status()
                # staggered windows: rounds start at once but not all together
                feed_tokens(c, sid, words, 1000 * i, int(cfg["m"] + cfg["n"] * (i + 0.5) / speakers))
            wait_idle = time.monotonic() + 120
            while time.monotonic() < wait_idle and any(stats(c, s)["tokens_pending"] for s in sids):
                time.sleep(0.5)
            asyncio.run(_live(srv.url, sids, words, seconds, samples, asks, ask_every))
            rss = rss_mb(c)
            rounds = sum(stats(c, s)["rounds"] for s in sids)
    finally:
        srv.close()
    ok = [a for a in asks if a["status"] == 200]
    half = [s["pending"] for s in samples if s["t"] >= seconds / 2]
    out = {"config": cfg, "speakers": speakers, "seconds": seconds, "ask_every_s": ask_every, "rounds": rounds,
           "offered_tokens_per_s": round((samples[-1]["seen"] - samples[0]["seen"]) / max(samples[-1]["t"] - samples[0]["t"], 1e-9), 1),
           "absorbed_tokens_per_s": round((samples[-1]["absorbed"] - samples[0]["absorbed"]) / max(samples[-1]["t"] - samples[0]["t"], 1e-9), 1),
           "pending_samples": samples, "pending_end": samples[-1]["pending"],
           "backlog_bound": speakers * cfg["n"],
           "kept_up": bool(half) and max(half) <= speakers * cfg["n"],
           "asks": len(asks), "asks_ok": len(ok),
           "ask_first_token_p50_s": round(pct([a["first_s"] for a in ok if a["first_s"] is not None], 0.5), 2),
           "ask_first_token_p95_s": round(pct([a["first_s"] for a in ok if a["first_s"] is not None], 0.95), 2),
           "ask_total_p50_s": round(pct([a["total_s"] for a in ok], 0.5), 2),
           "ask_total_p95_s": round(pct([a["total_s"] for a in ok], 0.95), 2), "rss_mb": round(rss, 1)}
    print(f"live: {json.dumps({k: v for k, v in out.items() if k != 'pending_samples'})}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=str(DEFAULT_BUNDLE))
    p.add_argument("--phases", default="rss,capacity,live,defaults")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--live-seconds", type=float, default=150)
    p.add_argument("--speakers", type=int, help="live speakers (default: 0.8 x the measured capacity)")
    p.add_argument("--ask-every", type=float, default=15.0, help="seconds between two questions (default 15)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "serve.json"))
    args = p.parse_args(argv)
    bundle = Path(args.bundle).expanduser()
    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"{bundle} is not a bundle")
    phases = args.phases.split(",")
    words = corpus_words()
    per_word = set_segment_words(bundle, words)
    cfg = {"n": args.n, "m": args.m, "k": args.k}
    res: dict = {"bundle": str(bundle), "segment_words": SEG_WORDS, "tokens_per_word": round(per_word, 3),
                 "machine": {"cpus": os.cpu_count()},
                 "command": "python benchmarks/scripts/serve_bench.py " + " ".join(argv or sys.argv[1:])}
    t0 = time.monotonic()
    if "rss" in phases:
        res["rss"] = phase_rss(bundle, words)
    if "capacity" in phases:
        res["capacity"] = phase_capacity(bundle, words, cfg)
    if "live" in phases:
        speakers = args.speakers or max(1, int(0.8 * res.get("capacity", {}).get("speakers_at_3_tok_s", 5)))
        res["live_runs"] = [phase_live(bundle, words, cfg, speakers, args.live_seconds, args.ask_every)]
    if "defaults" in phases:
        res["defaults"] = phase_capacity(bundle, words, None, streams=1, rounds=1)
    res["seconds"] = round(time.monotonic() - t0, 1)
    old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    if old.get("bundle") == res["bundle"]:           # a run of some phases updates those phases only
        old.setdefault("commands", [old.pop("command")] if "command" in old else [])
        old["commands"].append(res.pop("command"))
        res["live_runs"] = old.get("live_runs", []) + res.get("live_runs", [])   # live runs add up
        res = {**old, **res}
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "live_runs"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
