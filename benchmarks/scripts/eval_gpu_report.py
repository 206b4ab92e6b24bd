"""Tables and a drift plot from the per-piece JSON that `eval_gpu.py` writes (or a .tar.gz of its folder).

    python benchmarks/scripts/eval_gpu_report.py RESULTS_DIR_OR_TAR --json benchmarks/eval_gpu.json \
        --md benchmarks/eval_gpu_tables.md --plot benchmarks/eval_drift.png

Only (text, round) segments present for window, full and the variant are compared (a budget cut leaves some
jobs with fewer texts). R and the recall R use absorber.evaluate's formulas and paired bootstrap; "Δ vs
default" is the paired mean difference in NLL/token against the `abs-default` job on the same segments.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout (benchmarks/scripts/../..)

from absorber.evaluate import bootstrap, ppl, recovered_fraction  # noqa: E402


LABELS = {   # job -> what it is (configs are in each piece's JSON)
    "sink": "sink (StreamingLLM: 4 sink tokens + window)",
    "abs-default-short": "teacher=current (the paper's W <- W*; old default)",
    "abs-skip1-short": "current + sync_skip=1",
    "abs-moments-short": "current + reset=moments",
    "abs-decay10-short": "current + decay=0.1",
    "abs-decay30-short": "current + decay=0.3",
    "abs-combo-short": "current + sync_skip=1 + reset=moments + decay=0.1",
    "abs-lr2e3-combo-short": "current + combo + lr 2e-3",
    "abs-fresh-short": "current + reset=adapters (fresh adapters every round)",
    "abs-tbase-short": "teacher=base",
    "abs-tbase-skip1-short": "**teacher=base + sync_skip=1 (the new defaults)**",
    "abs-tbase-long": "teacher=base, one stream of 16 speeches",
    "abs-tbase-more": "teacher=base, 3 more speeches (no full-context run)",
    "abs-default-long": "teacher=current, one stream of 16 speeches",
    "ttt-default-short": "ttt (next-token loss on X, same K/AdamW/slice)",
    "absorber": "absorber, defaults", "abs-default": "absorber, teacher=current",
    "abs-tbase": "absorber, teacher=base", "abs-combo": "absorber, current + combo",
    "full": "full context (≤ 8192)", "window": "window", "ttt": "ttt",
}


def ref_of(name: str) -> str:
    """The paired reference of a variant: the same teacher without the extra option."""
    return "abs-tbase-short" if "tbase" in name else "abs-default-short"


def load_pieces(src: str) -> list[dict]:
    if src.endswith((".tar.gz", ".tgz")):
        tmp = tempfile.mkdtemp()
        with tarfile.open(src) as t:
            t.extractall(tmp, filter="data")
        src = tmp
    files = glob.glob(os.path.join(src, "**", "*__*.json"), recursive=True)
    return [json.load(open(f)) for f in sorted(files)]


def segments(pieces: list[dict]) -> dict[str, dict[tuple[str, int], dict]]:
    """series name -> {(text, round): record}. Baseline jobs give one series per method (e.g. 'window'); a
    trained job gives one series named after the job."""
    out: dict[str, dict] = {}
    for p in pieces:
        for mth, recs in p.get("records", {}).items():
            name = mth if p["job"].startswith("base-") else p["job"]
            suffix = "-long" if p["text"].startswith("long:") and p["job"].startswith("base-") else ""
            for r in recs:
                out.setdefault(name + suffix, {})[(p["text"], r["round"])] = r
    return out


def paired_delta(a: list[dict], b: list[dict], draws: int = 2000, seed: int = 0):
    """Mean NLL/token difference a - b over paired segments and its 95 % bootstrap interval, and a count of
    segments where a is lower."""
    d = [x["nll"] / x["count"] - y["nll"] / y["count"] for x, y in zip(a, b)]
    if not d:
        return None
    rng = random.Random(seed)
    ms = sorted(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for _ in range(draws))
    return {"mean": sum(d) / len(d), "ci95": [ms[int(0.025 * draws)], ms[int(0.975 * draws)]],
            "better": sum(x < 0 for x in d), "n": len(d)}


def summarize(series: dict, name: str, base: str = "") -> dict | None:
    win, full, var = series.get("window" + base), series.get("full" + base), series.get(name)
    if not (win and var):
        return None
    keys = sorted(set(win) & set(var))
    if full and not name.endswith(("-long", "-more")):   # R on the segments that have the full-context run
        keys = [k for k in keys if k in full]
    if not keys:
        return None
    if not full or not set(keys) <= set(full):   # no full-context reference for every segment: no R
        full = {k: win[k] for k in keys}
    trio = {"window": [win[k] for k in keys], "full": [full[k] for k in keys], "v": [var[k] for k in keys]}
    pooled = {m: (sum(r["nll"] for r in rs), sum(r["count"] for r in rs)) for m, rs in trio.items()}
    pp = {m: ppl(*v) for m, v in pooled.items()}
    R = lambda p: recovered_fraction(ppl(*p["window"]), ppl(*p["v"]), ppl(*p["full"]))
    d = {"series": name, "segments": len(keys), "texts": len({k[0] for k in keys}), "ppl": pp["v"],
         "ppl_window": pp["window"], "ppl_full": pp["full"],
         "recovered_fraction": recovered_fraction(pp["window"], pp["v"], pp["full"]),
         "recovered_fraction_ci95": bootstrap(trio, R, "nll", "count", 2000, 0)}
    if all("recall_nll" in r for rs in trio.values() for r in rs):
        rp = {m: (sum(r["recall_nll"] for r in rs), sum(r["recall_count"] for r in rs)) for m, rs in trio.items()}
        d["recall_ppl"], d["recall_ppl_window"], d["recall_ppl_full"] = ppl(*rp["v"]), ppl(*rp["window"]), ppl(*rp["full"])
        d["recall_recovered_fraction"] = recovered_fraction(ppl(*rp["window"]), ppl(*rp["v"]), ppl(*rp["full"]))
        d["recall_recovered_fraction_ci95"] = bootstrap(trio, R, "recall_nll", "recall_count", 2000, 0)
    lf = [r.get("loss_first") for r in trio["v"] if r.get("loss_first") is not None]
    ll = [r.get("loss_last") for r in trio["v"] if r.get("loss_last") is not None]
    if lf:
        d["loss_first"], d["loss_last"] = sum(lf) / len(lf), sum(ll) / len(ll)
    d["vs_window"] = paired_delta(trio["v"], trio["window"])
    ref = ref_of(name)
    if ref in series and name != ref and name.startswith("abs-") and not name.endswith("-long"):
        d["ref"] = ref
        both = [k for k in keys if k in series[ref]]
        d["vs_default"] = paired_delta([var[k] for k in both], [series[ref][k] for k in both])
    # drift: per round index, mean NLL/token difference to the window
    by_round: dict[int, list[float]] = {}
    for k in keys:
        by_round.setdefault(k[1], []).append(var[k]["nll"] / var[k]["count"] - win[k]["nll"] / win[k]["count"])
    d["delta_vs_window_by_round"] = {r: sum(v) / len(v) for r, v in sorted(by_round.items())}
    return d


def passkey_table(pieces: list[dict]) -> dict:
    acc: dict[str, list[dict]] = {}
    for p in pieces:
        for mth, trials in p.get("passkey", {}).items():
            name = mth if p["job"] == "passkey-base" else p["job"].replace("passkey-", "")
            acc.setdefault(name, []).extend(trials)
    out = {}
    for name, ts in acc.items():
        ev = [t for t in ts if not t["in_window"]]
        out[name] = {"trials": len(ts), "correct": sum(t["correct"] for t in ts),
                     "evicted_trials": len(ev), "evicted_correct": sum(t["correct"] for t in ev),
                     "by_length": {str(L): f"{sum(t['correct'] for t in ts if t['length'] == L)}/"
                                           f"{sum(1 for t in ts if t['length'] == L)}"
                                   for L in sorted({t['length'] for t in ts})}}
    return out


def methods_json(rows: list[dict], pk: dict) -> dict:
    """The issue's eval shape {"methods": {"absorber": {ppl, recovered_fraction, recall_ppl, passkey_accuracy},
    ...}}: absorber = the shipped default (teacher=base), each over its own segments (see "segments")."""
    by = {d["series"]: d for d in rows}
    out = {}
    ref = by.get("abs-tbase-short")
    pick = {"absorber": "abs-tbase-short", "absorber_teacher_current": "abs-default-short", "ttt": "ttt-default-short",
            "sink": "sink"}
    if ref:
        out["window"] = {"ppl": ref["ppl_window"], "recovered_fraction": 0.0, "recall_ppl": ref.get("recall_ppl_window"),
                         "segments": ref["segments"]}
        out["full"] = {"ppl": ref["ppl_full"], "recovered_fraction": 1.0, "recall_ppl": ref.get("recall_ppl_full"),
                       "segments": ref["segments"]}
    for m, series in pick.items():
        d = by.get(series)
        if d:
            out[m] = {"ppl": d["ppl"], "recovered_fraction": d["recovered_fraction"],
                      "recovered_fraction_ci95": d["recovered_fraction_ci95"], "recall_ppl": d.get("recall_ppl"),
                      "recall_recovered_fraction": d.get("recall_recovered_fraction"),
                      "sync_loss_first": d.get("loss_first"), "sync_loss_last": d.get("loss_last"),
                      "segments": d["segments"], "job": series}
    for m, key in {"full": "full", "window": "window", "sink": "sink", "absorber": "abs-tbase",
                   "absorber_teacher_current": "abs-default", "ttt": "ttt"}.items():
        if m in out and key in pk:
            out[m]["passkey_accuracy"] = pk[key]["correct"] / pk[key]["trials"]
            out[m]["passkey_trials"] = pk[key]["trials"]
    for d in out.values():
        for k in ("ppl", "recovered_fraction", "recall_ppl", "passkey_accuracy"):
            d.setdefault(k, None)
    return out


def fmt_ci(ci) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def markdown(rows: list[dict], pk: dict) -> str:
    L = ["| variant | job | texts × rounds | PPL (window / full) | R [95% CI] | recall R [95% CI] | loss first → last "
         "| Δ NLL/token vs window (better) | Δ vs ref [95% CI] (better) |", "|---|---|---|---|---|---|---|---|---|"]
    for d in rows:
        vw, vd = d["vs_window"], d.get("vs_default")
        label = LABELS.get(d["series"], d["series"])
        rounds = d["segments"] // max(d["texts"], 1)
        ppls = f"{d['ppl']:.3f} ({d['ppl_window']:.3f} / {d['ppl_full']:.3f})"
        r = f"{d['recovered_fraction']:.2f}{fmt_ci(d['recovered_fraction_ci95'])}"
        rr = f"{d.get('recall_recovered_fraction', float('nan')):.2f}{fmt_ci(d.get('recall_recovered_fraction_ci95'))}"
        loss = f"{d['loss_first']:.3f} → {d['loss_last']:.3f}" if "loss_first" in d else "–"
        dw = f"{vw['mean']:+.4f} [{vw['ci95'][0]:+.4f}, {vw['ci95'][1]:+.4f}] ({vw['better']}/{vw['n']})"
        dr = (f"{vd['mean']:+.4f} [{vd['ci95'][0]:+.4f}, {vd['ci95'][1]:+.4f}] ({vd['better']}/{vd['n']}) "
              f"vs {d['ref']}") if vd else "–"
        L.append(f"| {label} | {d['series']} | {d['texts']} × {rounds} | {ppls} | {r} | {rr} | {loss} | {dw} | {dr} |")
    if pk:
        L += ["", "| passkey | correct / trials | needle evicted: correct / trials | by haystack length |",
              "|---|---|---|---|"]
        for name, d in pk.items():
            L.append(f"| {LABELS.get(name, name)} | {d['correct']}/{d['trials']} | {d['evicted_correct']}/{d['evicted_trials']} | "
                     + ", ".join(f"{k}: {v}" for k, v in d["by_length"].items()) + " |")
    return "\n".join(L)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for d in rows:
        xs = sorted(int(r) for r in d["delta_vs_window_by_round"])
        ax.plot(xs, [d["delta_vs_window_by_round"][r] for r in xs], marker="o", ms=3,
                label=f"{LABELS.get(d['series'], d['series']).strip('*')} ({d['texts']} text(s))",
                lw=2.5 if "tbase" in d["series"] else 1.2)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("round (512 tokens absorbed per round)")
    ax.set_ylabel("NLL/token of the next segment − window's")
    ax.set_title("Drift: absorber variants vs the plain window (below 0 = better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="+", help="result folders or .tar.gz files (merged)")
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--plot")
    a = ap.parse_args()
    pieces = [p for s in a.src for p in load_pieces(s)]
    series = segments(pieces)
    rows = []
    for name in sorted(series):
        if name in ("window", "full", "sink") or name.endswith("-long") and name.startswith(("window", "full")):
            continue
        d = summarize(series, name, "-long" if name.endswith("-long") else "")
        if d:
            rows.append(d)
    for b in ("sink",):
        d = summarize(series, b)
        if d:
            rows.insert(0, d)
    pk = passkey_table(pieces)
    md = markdown(rows, pk)
    print(md)
    if a.md:
        Path(a.md).write_text(md + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"methods": methods_json(rows, pk),
                                            "settings": {"absorber": pieces[0]["config"] if pieces else None,
                                                         "note": "absorber = teacher=base; per-piece configs in "
                                                                 "the raw results"},
                                            "variants": rows, "passkey": pk,
                                            "pieces": [{k: p[k] for k in ("job", "text", "done", "seconds")}
                                                       for p in pieces]}, indent=1, default=str))
    if a.plot:
        plot([d for d in rows if d["series"].startswith("abs-")], a.plot)   # ttt is off the scale (+2.4..3.6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
