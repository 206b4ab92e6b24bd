"""Print the markdown tables of benchmarks/eval.md from the JSON files written by `absorber eval`.

usage: python benchmarks/scripts/eval_report.py benchmarks/eval_main.json benchmarks/eval_sweep_*.json
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout (benchmarks/scripts/../..)

from absorber import evaluate as E  # noqa: E402


def per_text(result: dict) -> str:
    """PPL per text and method (pooled over that text's segments)."""
    segs = result["segments"]
    names = list(next(iter(segs.values())))
    methods = [m for m in E.METHODS if m in segs]
    rows = ["| text | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for name in names:
        vals = []
        for m in methods:
            recs = segs[m].get(name, [])
            vals.append(f"{E.ppl(sum(r['nll'] for r in recs), sum(r['count'] for r in recs)):.3f}")
        rows.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(rows)


def per_round(result: dict, method: str = "absorber") -> str:
    segs = result["segments"]
    rows = ["| text | round | window | full | " + method + " | loss first → last |", "|---|---|---|---|---|---|"]
    for name, recs in segs[method].items():
        for i, r in enumerate(recs):
            w, f = segs["window"][name][i], segs["full"][name][i]
            lf = r.get("loss_first")
            rows.append(f"| {name} | {r['round']} | {E.ppl(w['nll'], w['count']):.3f} | {E.ppl(f['nll'], f['count']):.3f}"
                        f" | {E.ppl(r['nll'], r['count']):.3f} | "
                        + (f"{lf:.4f} → {r['loss_last']:.4f}" if lf is not None else "–") + " |")
    return "\n".join(rows)


def sweep_table(result: dict) -> str:
    rows = ["| point | PPL window | PPL full | PPL absorber | R absorber [95% CI] | recall R | sync loss first → last "
            "| s/round |", "|---|---|---|---|---|---|---|---|"]
    for p in result["sweep"]:
        ms = p["methods"]
        a = ms["absorber"]
        ci = a.get("recovered_fraction_ci95")
        rci = a.get("recall_recovered_fraction_ci95")
        rows.append(f"| {p['point']} | {ms['window']['ppl']:.3f} | {ms['full']['ppl']:.3f} | {a['ppl']:.3f} | "
                    f"{a['recovered_fraction']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + " | "
                    + (f"{a['recall_recovered_fraction']:.2f}" + (f" [{rci[0]:.2f}, {rci[1]:.2f}]" if rci else "")
                       if a.get("recall_recovered_fraction") is not None else "–")
                    + f" | {a['sync_loss_first']:.4f} → {a['sync_loss_last']:.4f} | {a['round_seconds']:.0f} |")
    return "\n".join(rows)


def _flat(segs: dict) -> list[dict]:
    return [r for name in sorted(segs) for r in segs[name]]


def variants(paths: list[str]) -> str:
    """One row per absorber (or ttt) variant found in any file, R against the window/full of any file with the
    same texts (the baselines are deterministic and do not depend on the training knobs)."""
    base: dict[str, dict] = {}
    rows_in: list[tuple[str, dict, dict]] = []   # (label, segments by text, settings)
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        points = res["sweep"] if "sweep" in res else [dict(res, point=None)]
        for p in points:
            for m in ("window", "full"):
                for text, recs in p.get("segments", {}).get(m, {}).items():
                    base.setdefault(m, {}).setdefault(text, recs)
            for m in ("absorber", "ttt"):
                if m in p.get("segments", {}):
                    a = p["settings"]["absorber"]
                    label = f"{m} n={a['n']} m={a['m']} k={a['k']} lr={a['lr']} r={a['lora']['rank']}"
                    if p.get("point"):
                        label += f" {p['point']}"
                    if res.get("skip_positions"):
                        label += f" skip_positions={res['skip_positions']}"
                    if res.get("reset_each_round"):
                        label += " fresh adapters every round"
                    rows_in.append((label, p["segments"][m], a))
    if not {"window", "full"} <= set(base):
        return "(no window/full baseline yet)"
    out = ["| variant | segments | PPL | R [95% CI] | recall R [95% CI] | loss first → last |", "|---|---|---|---|---|---|"]
    settings = E.EvalSettings()
    for label, segs, _ in rows_in:
        names = sorted(segs)
        rounds = {k: {r["round"] for r in segs[k]} for k in names}   # baselines restricted to the same rounds
        pick = lambda m: _flat({k: [r for r in base[m][k] if r["round"] in rounds[k]] for k in names})
        sub = {"window": pick("window"), "full": pick("full"), "x": _flat(segs)}
        if len({len(v) for v in sub.values()}) != 1:
            continue
        summ = E.summarize({"window": sub["window"], "full": sub["full"], "x": sub["x"]}, {}, settings)
        d = summ["x"]
        lf = _mean(r.get("loss_first") for r in sub["x"])
        ll = _mean(r.get("loss_last") for r in sub["x"])
        ci, rci = d.get("recovered_fraction_ci95"), d.get("recall_recovered_fraction_ci95")
        out.append(f"| {label} | {len(sub['x'])} | {d['ppl']:.3f} | {d['recovered_fraction']:.2f}"
                   + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f" | {d['recall_recovered_fraction']:.2f}"
                   + (f" [{rci[0]:.2f}, {rci[1]:.2f}]" if rci else "") + " | "
                   + (f"{lf:.4f} → {ll:.4f}" if lf is not None else "–") + " |")
    w = E.summarize({"window": _flat(base["window"]), "full": _flat(base["full"])}, {}, settings)
    out.append(f"| (window / full) | {w['window']['segments']} | {w['window']['ppl']:.3f} / {w['full']['ppl']:.3f} "
               f"| 0 / 1 | | |")
    return "\n".join(out)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def merge(paths: list[str]) -> dict:
    """One result from several `absorber eval` JSON files run with the same texts and n/m/s (e.g. one method
    per process): segments and passkey trials side by side, the summary recomputed."""
    segs, pk, commands, settings = {}, {}, [], None
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        settings = settings or res["settings"]
        if res["settings"]["texts"] != settings["texts"] or res["settings"]["score_len"] != settings["score_len"]:
            raise SystemExit(f"{path}: other texts or score length than {paths[0]}")
        for m, v in res["segments"].items():
            segs.setdefault(m, v)
            pk.setdefault(m, res.get("passkey", {}).get(m, []))
        commands.append(res.get("command"))
    order = [m for m in E.METHODS if m in segs]
    flat = {m: _flat_in(segs[m], settings) for m in order}
    methods = E.summarize(flat, {m: pk[m] for m in order}, E.EvalSettings())
    return {"methods": methods, "settings": dict(settings, merged_from=paths, commands=commands),
            "segments": {m: segs[m] for m in order}, "passkey": {m: pk[m] for m in order}}


def _flat_in(segs: dict, settings: dict) -> list[dict]:
    return [r for t in settings["texts"] for r in segs.get(t["name"], [])]


def main(paths: list[str]) -> None:
    if paths and paths[0] == "--variants":
        print(variants(paths[1:]))
        return
    if paths and paths[0] == "--merge":   # --merge OUT.json PLOT.png IN.json...
        res = merge(paths[3:])
        with open(paths[1], "w") as f:
            json.dump(res, f, indent=1)
        E.plot(res, paths[2], "SmolLM2-135M, 2 spoken SOTU speeches, n=512 m=256 K=16 lr 1e-3")
        paths = [paths[1]]
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        print(f"### {path}\n")
        if res.get("command"):
            print(f"`{res['command']}`\n")
        if "sweep" in res:
            print(sweep_table(res))
        else:
            print(E.format_table(res["methods"]))
            print()
            print(per_text(res))
            if "absorber" in res["segments"] and "window" in res["segments"]:
                print()
                print(per_round(res))
            pk = res.get("passkey", {})
            if any(pk.values()):
                print()
                print("| method | passkey trials (length, depth, evicted tokens ago → answer) |\n|---|---|")
                for m, trials in pk.items():
                    print(f"| {m} | " + "; ".join(
                        f"{t['length']}@{t['depth']} ({'in window' if t['in_window'] else str(t['evicted_tokens_ago']) + ' ago'})"
                        f" → {'✓' if t['correct'] else '✗'} `{t['answer'][:20]}`" for t in trials) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
