"""RSS of one Model serving 1, 2 and 8 Streams (benchmarks/streams.md).

    python benchmarks/scripts/streams_rss.py BUNDLE [BUNDLE...] [--streams 1,2,8] [--n 128 --m 64 --k 1]
        [--md benchmarks/streams.md --json benchmarks/streams.json]

Each count runs in a fresh process: open the Model once, make N Streams on it, run one absorption round on each
(n+m token ids of real text), and read VmRSS / VmHWM (Linux /proc/self/status) after the model is open, after
the streams exist, and after every stream has run its round. The same with N separate `Stream.open` (a Model
each) shows what sharing saves.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(bundle: str, count: int, n: int, m: int, k: int, shared: bool) -> dict:
    from absorber import data
    from absorber.runtime import Model, Stream
    rec = {"bundle": bundle, "streams": count, "shared_model": shared, "n": n, "m": m, "k": k}
    overrides = {"n": n, "m": m, "k": k}
    if shared:
        model = Model.open(bundle)
        rec["rss_model_mb"] = _status("VmRSS")
        streams = [Stream(model, config_overrides=overrides) for _ in range(count)]
    else:
        streams = [Stream.open(bundle, config_overrides=overrides) for _ in range(count)]
        model = streams[0].model
        rec["rss_model_mb"] = None
    rec["rss_streams_mb"] = _status("VmRSS")
    text = data.speech(data.DEFAULT_SPEECH).text()
    ids = model.encode(text)
    for i, s in enumerate(streams):
        off = (i * 997) % max(len(ids) - (n + m), 1)
        (r,) = s.feed_tokens(ids[off:off + n + m])
        assert r.steps == k
    rec["rss_after_rounds_mb"] = _status("VmRSS")
    rec["peak_mb"] = _status("VmHWM")
    rec["adapter_mb_per_stream"] = streams[0].opt.params.nbytes / 2**20
    rec["quant"] = model.bundle.quant_scheme
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+")
    p.add_argument("--streams", default="1,2,8")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--separate", action="store_true", help="also N separate Stream.open (a Model each)")
    p.add_argument("--md")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._one:
        spec = json.loads(a._one)
        print(json.dumps(measure(**spec)))
        return 0
    rows = []
    for b in a.bundles:
        for c in [int(x) for x in a.streams.split(",")]:
            for shared in ([True, False] if a.separate else [True]):
                spec = {"bundle": b, "count": c, "n": a.n, "m": a.m, "k": a.k, "shared": shared}
                r = subprocess.run([sys.executable, __file__, b, "--_one", json.dumps(spec)], capture_output=True,
                                   text=True, check=True)
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(rows[-1], file=sys.stderr)
    cmd = "python benchmarks/scripts/streams_rss.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    if a.md:
        lines = ["# One Model, many Streams: resident memory", "", f"Command: `{cmd}`", "",
                 "Each row is a fresh process. `model` = RSS after `Model.open`; `streams` = after N `Stream`s exist; "
                 "`after rounds` = after one absorption round on every stream (n, m, K as below); "
                 "`per extra stream` = (after rounds at N − after rounds at 1) / (N − 1).", "",
                 "| bundle | quant | model | streams | RSS model MB | RSS streams MB | RSS after rounds MB | peak MB | "
                 "adapters MB/stream | per extra stream MB |", "|---|---|---|---|---|---|---|---|---|---|"]
        base = {(r["bundle"], r["shared_model"]): r["rss_after_rounds_mb"] for r in rows if r["streams"] == 1}
        for r in rows:
            b1 = base.get((r["bundle"], r["shared_model"]))
            extra = (r["rss_after_rounds_mb"] - b1) / (r["streams"] - 1) if r["streams"] > 1 and b1 else None
            f = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
            lines.append(f"| {Path(r['bundle']).name} | {r['quant']} | {'shared' if r['shared_model'] else 'one each'} "
                         f"| {r['streams']} | {f(r['rss_model_mb'])} | {f(r['rss_streams_mb'])} | "
                         f"{f(r['rss_after_rounds_mb'])} | {f(r['peak_mb'])} | {r['adapter_mb_per_stream']:.2f} | "
                         f"{f(extra)} |")
        lines.append(f"\nWindow n={a.n}, m={a.m}, K={a.k}.")
        Path(a.md).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
