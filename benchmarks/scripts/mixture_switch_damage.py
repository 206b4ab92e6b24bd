"""A change of topic: the held-out text read right after the stream's window (in context), by the adapters alone
and by the online mixture whose weight the window set first, against the base model on the same tokens
(benchmarks/retention.md, "The online mixture"). From retention_screen.py records run with --mix-shares (their
damage records hold nll_switch_*).

    python benchmarks/scripts/mixture_switch_damage.py --last 4 FILE...

Per file, variant and speech: the perplexity change of the held-out tokens against the base model, averaged over
the last N scored rounds (as retention_plot.py --damage-last), for the adapters alone and for each share.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def change(recs: list[dict], key: str) -> float:
    return sum(math.exp((r[key] - r["nll_switch_base"]) / r["count_switch"]) - 1 for r in recs) / len(recs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--last", type=int, default=4, help="average over each speech's last N damage records")
    a = ap.parse_args(argv)
    print("| file | variant | speech | adapters alone | " + "mixture | " * 1 + "\n|---|---|---|---|---|")
    for f in a.files:
        d = json.loads(Path(f).read_text())
        for label, v in d["methods"].items():
            if "(mix" in label or "(read" in label:
                continue
            by_text: dict[str, list] = {}
            for r in v.get("damage_records") or []:
                if "count_switch" in r:
                    by_text.setdefault(r.get("text", d["texts"][0]), []).append(r)
            for t, recs in by_text.items():
                recs = recs[-a.last:]
                shares = sorted(k[len("nll_switch_mix"):] for k in recs[0] if k.startswith("nll_switch_mix"))
                mixes = ", ".join(f"share {s}: {change(recs, 'nll_switch_mix' + s):+.1%}" for s in shares)
                print(f"| {Path(f).name} | {label} | {t} | {change(recs, 'nll_switch_method'):+.1%} | {mixes} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
