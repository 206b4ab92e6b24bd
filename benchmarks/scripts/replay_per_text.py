"""Specific retention per planted text (the X of round 1, 2, 3 ...) at chosen distances, and how long each text stayed
among the kept ones of a replay variant: which of a screen's facts a replay schedule actually replayed late
(benchmarks/retention.md, "Which kept texts to replay").

    python benchmarks/scripts/replay_per_text.py --distances 8,16,32 \
        "reservoir=benchmarks/retention_screen_shipped_replay_reservoir_d32_s0.json::VARIANT (mix 0.01, window 128)" ...

Each LABEL=FILE::VARIANT is one screened stream (retention_plot.py's form); the replay settings are the variant's
recorded config (replay, replay_mode, lora.seed). A fact planted in the X of round c is scored at distance d in round
c + d (records: round - distance = c).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from absorber.replay import Replay  # noqa: E402
from absorber.retention import specific_retention  # noqa: E402
from retention_plot import pooled  # noqa: E402


def kept_until(replay: int, mode: str, seed: int, rounds: int) -> dict[int, int]:
    """The last round after which each text is still kept (absent: never kept; the texts are the rounds' numbers)."""
    r, last = Replay(replay, mode, seed=seed), {}
    for t in range(1, rounds + 1):
        r.keep([t])
        for k in r.kept:
            last[k[0]] = t
    return last


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
        head, _, variant = spec.partition("::")
        label, _, path = head.rpartition("=")
        rec = pooled([spec])[label]["records"]
        cfg = json.loads(Path(path).read_text())["methods"][variant]["config"]
        last = (kept_until(cfg["replay"], cfg["replay_mode"], cfg["lora"]["seed"], max(x["round"] for x in rec))
                if cfg.get("replay") else {})
        for c in sorted({x["round"] - x["distance"] for x in rec}):
            cells = []
            for d in distances:
                sel = [x for x in rec if x["distance"] == d and x["round"] - d == c]
                cells.append(f"{specific_retention(sel):.2f}" if sel else "–")
            facts = len({x["fact"] for x in rec if x["round"] - x["distance"] == c})
            print(f"| {label} | {c} | {facts} | {last.get(c, '–')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
