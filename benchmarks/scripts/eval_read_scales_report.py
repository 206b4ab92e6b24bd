"""Next-text R, key-token R and recall R per learning rate and read scale, from one `absorber eval --sweep` record.

    python benchmarks/scripts/eval_read_scales_report.py [benchmarks/eval_shipped_read_scales.json]
    python benchmarks/scripts/eval_read_scales_report.py benchmarks/eval_shipped_read_strong.json
        [--thresholds 2/2,1/3,0.5/100]

The record: `absorber eval --methods window,full,absorber --read-scales ... --sweep lr=...` (the command is in
it). Every number is the eval's own summary (absorber.evaluate.summarize): R = (PPL_window - PPL_method) /
(PPL_window - PPL_full) pooled over the scored segments, a bootstrap interval over segments; key-token R the same
on LongPPL's key tokens (full context gains > 2 nats on them and predicts them with NLL < 2); recall R on the
just-evicted passage repeated. Prints a markdown table, then key-token R at other thresholds (GAIN/FULL_NLL pairs,
recomputed from the records' per-token NLLs by absorber.evaluate.key_tokens) for the run's read scales.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from absorber import evaluate as E

HERE = Path(__file__).resolve().parents[1]


def _r(d: dict, key: str) -> str:
    v, ci = d.get(key), d.get(f"{key}_ci95")
    if v is None:
        return "–"
    return f"{v:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def thresholds(rec: dict, pairs: list[tuple[float, float]], scales=(0.5, 0.25)) -> None:
    """Key-token R per sweep point and read scale at each (gain, full NLL) threshold pair."""
    print("\n| key tokens: gain > G nats, full NLL < F | tokens | sweep point | " +
          " | ".join(["s = 1"] + [f"s = {sc:g}" for sc in scales]) + " |")
    print("|---|---:|---|" + "---|" * (1 + len(scales)))
    for gain, full in pairs:
        st = E.EvalSettings(key_gain=gain, key_full_nll=full, bootstrap=2000)
        for p in rec["sweep"]:
            segs = {m: [r for t in v.values() for r in t] for m, v in p["segments"].items()}
            names = ["absorber"] + [E.read_label("absorber", sc) for sc in scales]
            for sc, name in zip(scales, names[1:]):
                segs[name] = E.read_at(segs["absorber"], sc)
            ms = E.summarize(segs, {}, st)
            label = ", ".join(f"{k}={v}" for k, v in p["point"].items()) or "the run"
            print(f"| G={gain:g}, F={full:g} | {ms['window']['key_tokens']} | {label} | "
                  + " | ".join(_r(ms[n], "key_recovered_fraction") for n in names) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("record", nargs="?", default=str(HERE / "eval_shipped_read_scales.json"))
    ap.add_argument("--thresholds", default="2/2,1/3,0.5/100", help="GAIN/FULL_NLL pairs for key tokens")
    a = ap.parse_args(argv)
    rec = json.loads(Path(a.record).read_text())
    if "sweep" not in rec:      # one run without --sweep: one point
        rec["sweep"] = [{"point": {}, "methods": rec["methods"], "settings": rec["settings"],
                         "segments": rec["segments"]}]
    pts = rec["sweep"]
    s = pts[0]["settings"]
    texts = ", ".join(t["name"] for t in s["texts"])
    ms0 = pts[0]["methods"]
    print(f"`{rec.get('command')}`\n")
    print(f"n={s['absorber']['n']} m={s['absorber']['m']} K={s['absorber']['k']}; texts: {texts}; "
          f"{ms0['window']['segments']} segments, {ms0['window']['tokens_scored']} tokens scored, "
          f"{ms0['window'].get('key_tokens', '–')} of them key tokens\n")
    print("| method | PPL | next-text R [95% CI] | key-token R [95% CI] | recall R [95% CI] | s/round |")
    print("|---|---:|---|---|---|---:|")
    for name in ("window", "full"):
        print(f"| {name} | {ms0[name]['ppl']:.3f} | – | – | – | – |")
    for p in pts:
        label = ", ".join(f"{k}={v}" for k, v in p["point"].items()) or f"lr={p['settings']['absorber']['lr']:g}"
        for mth, d in p["methods"].items():
            if not mth.startswith("absorber"):
                continue
            sec = d.get("round_seconds")
            print(f"| {mth}, {label} | {d['ppl']:.3f} | {_r(d, 'recovered_fraction')} | "
                  f"{_r(d, 'key_recovered_fraction')} | {_r(d, 'recall_recovered_fraction')} | "
                  + (f"{sec:.0f} |" if sec else "– |"))
    ms = pts[0]["methods"]
    scales = tuple(float(m.split("(read x")[1].rstrip(")")) for m in ms if "(read x" in m)
    thresholds(rec, [tuple(float(x) for x in t.split("/")) for t in a.thresholds.split(",")],
               tuple(sc for sc in scales if sc != 1) or (0.5, 0.25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
