"""Specific retention per planted text (the X of round 1, 2, 3 ...) at chosen distances, and how long each text stayed
among the kept ones of a replay variant: which of a screen's facts a replay schedule actually replayed late
(benchmarks/retention.md, "Which kept texts to replay").

    python benchmarks/scripts/replay_per_text.py --distances 8,16,32 \
        "reservoir=benchmarks/retention_screen_shipped_replay_reservoir_d32_s0.json::VARIANT (mix 0.01, window 128)" ...

Each LABEL=FILE::VARIANT is one screened stream (retention_plot.py's form, not pooled); the replay settings are read
from the variant's name (replay=R, replay_mode=...; the seed is lora.seed, 0 in the screens). A fact planted in the X
of round c is scored at distance d in round c + d (records: round - distance = c).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absorber.replay import Replay  # noqa: E402


def settings(variant: str) -> dict:
    keys = dict(kv.split("=", 1) for kv in variant.split(" (")[0].split("/") if "=" in kv)
    return {"replay": int(keys.get("replay", 0)), "mode": keys.get("replay_mode", "recent")}


def kept_until(replay: int, mode: str, rounds: int) -> dict[int, int | None]:
    """The last round after which each text is still kept (None: never kept; the texts are the rounds' numbers)."""
    r, last = Replay(replay, mode), {}
    for t in range(1, rounds + 1):
        r.keep([t])
        for k in r.kept:
            last[k[0]] = t
    return last


def specific(records: list[dict], key: str) -> float:
    w = sum(x["nll_window"] for x in records)
    f = sum(x["nll_full"] for x in records)
    m = sum(x[key] for x in records)
    lift = sum(x["nll_window_decoy"] - x[key.replace("nll_method", "nll_method_decoy")] for x in records)
    return (w - m - lift) / (w - f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="LABEL=FILE::VARIANT")
    ap.add_argument("--distances", default="8,16,32")
    a = ap.parse_args(argv)
    distances = [int(x) for x in a.distances.split(",")]
    print("| variant | planted text (round) | facts | kept through round | "
          + " | ".join(f"specific d={d}" for d in distances) + " |")
    print("|---|---|---|---|" + "---|" * len(distances))
    for spec in a.specs:
        label, rest = spec.split("=", 1)
        path, variant = rest.split("::", 1)
        run = json.loads(Path(path).read_text())["methods"][variant]
        suffix = variant.split(" (", 1)[1].rstrip(")") if " (" in variant else ""
        key = "nll_method" + ("_" + suffix.replace("mix ", "mix").replace(", window ", "w") if suffix else "")
        rec = run["records"]
        st = settings(variant)
        last = kept_until(st["replay"], st["mode"], max(x["round"] for x in rec)) if st["replay"] else {}
        for c in sorted({x["round"] - x["distance"] for x in rec}):
            cells = []
            for d in distances:
                sel = [x for x in rec if x["distance"] == d and x["round"] - d == c]
                cells.append(f"{specific(sel, key):.2f}" if sel else "–")
            facts = len({x["fact"] for x in rec if x["round"] - x["distance"] == c})
            print(f"| {label} | {c} | {facts} | {last.get(c, '–')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
