"""The forgetting curve: specific retention of planted facts against rounds since eviction, per variant, pooled
over the raw records of one or more screens (benchmarks/retention.md), with 95 % bootstrap intervals over facts.

    python benchmarks/scripts/retention_plot.py --out benchmarks/retention_curve.png \
        "shipped window, lr 1e-4=benchmarks/retention_screen_shipped.json::ntp_weight=1/lr=0.0001" \
        "shipped window, lr 1e-4=benchmarks/retention_screen_shipped_more.json::ntp_weight=1/lr=0.0001" ...

Each argument is LABEL=FILE::VARIANT; arguments with the same LABEL are pooled (their per-fact records put
together, so a label can span speeches run in separate screens). Prints the pooled table (markdown) too:
specific and raw retention per distance, the number of facts, and the held-out damage per speech at the end.
With `--damage-last N`, also the damage averaged over the last N records per speech (each record's change as the
screen's "end" would report it, had the stream stopped there) and the mean over speeches: a stream's damage
swings by several points from one round to the next.

With `--frontier D` the plot is the retention-damage frontier instead: each label's specific retention at D
rounds after eviction (95 % CI over facts) against its held-out damage at the end (mean over speeches, the bar
spanning them), the goal's corner, and with `--context FILE` (context_damage.py's records) the damage that the
stream's text *in context* does to the same held-out tokens:

    python benchmarks/scripts/retention_plot.py --frontier 8 --context benchmarks/context_damage.json \
        --out benchmarks/retention_frontier.png LABEL=FILE::VARIANT ...
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absorber.retention import RetentionSettings, curve, damage_summary  # noqa: E402


def mean_of_last(records: list[dict], last: int) -> float | None:
    """The held-out damage averaged over the last `last` records (damage_summary of each prefix: the change at
    that record against the base model)."""
    ends = [damage_summary(records[:i]).get("ppl_change_at_end") for i in range(max(1, len(records) - last + 1),
                                                                                len(records) + 1)]
    ends = [x for x in ends if x is not None]
    return sum(ends) / len(ends) if ends else None


def pooled(specs: list[str], damage_last: int = 0) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for spec in specs:
        head, _, variant = spec.partition("::")
        label, _, path = head.rpartition("=")      # the label may hold "=", the file name does not
        d = json.loads(Path(path).read_text())
        if variant not in d["methods"]:
            raise SystemExit(f"{path}: no variant {variant!r} (has: {', '.join(d['methods'])})")
        v = d["methods"][variant]
        texts = d["texts"]
        recs = v["records"]
        if recs and "text" not in recs[0]:     # single-text screens did not name the text per record
            recs = [dict(r, text=texts[0]) for r in recs]
        e = out.setdefault(label, {"records": [], "damage": [], "texts": [], "window": None, "distances": set()})
        e["records"] += recs
        e["texts"] += texts
        e["distances"] |= set(d["settings"]["distances"])
        s = d["settings"]
        for i, t in enumerate(texts):      # how each text's facts were drawn (retention_screen.py: seed + 1000 i)
            e.setdefault("fact_draws", {})[t] = (s.get("facts"), s.get("seed", 0) + 1000 * i)
        e["window"] = (v["config"].get("n"), v["config"].get("m"), v["config"].get("k"))
        by_text: dict[str, list] = {}
        for r in v.get("damage_records") or []:
            by_text.setdefault(r.get("text", texts[0]), []).append(r)
        for t, dr in by_text.items():
            e["damage"].append((t, damage_summary(dr).get("ppl_change_at_end")))
            if damage_last:
                e.setdefault("damage_mean", []).append((t, mean_of_last(dr, damage_last)))
        e.setdefault("bootstrap", s.get("bootstrap", 2000))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="LABEL=FILE::VARIANT (same LABEL: pooled)")
    ap.add_argument("--out", help="PNG to write (matplotlib); without it only the table is printed")
    ap.add_argument("--frontier", type=int, metavar="D", help="plot specific retention at distance D against damage")
    ap.add_argument("--context", help="with --frontier: context_damage.py's JSON (the in-context reference)")
    ap.add_argument("--damage-last", type=int, default=0, metavar="N",
                    help="also the damage averaged over each speech's last N records, and its mean over speeches")
    a = ap.parse_args(argv)
    data = pooled(a.specs, a.damage_last)
    rows = {}
    for label, e in data.items():
        rs = RetentionSettings(distances=tuple(sorted(e["distances"])), bootstrap=e["bootstrap"])
        rows[label] = curve(e["records"], rs)
    ds = sorted({c["distance"] for cs in rows.values() for c in cs})
    extra = f" damage, mean of the last {a.damage_last} records, per speech (mean) |" if a.damage_last else ""
    print("| variant | speeches | window n/m/K | " + " | ".join(f"specific d={d} [95% CI]" for d in ds)
          + " | raw at the last d | facts | held-out damage at the end, per speech |" + extra)
    print("|---|---|---|" + "---|" * len(ds) + "---|---|---|" + ("---|" if extra else ""))
    for label, cs in rows.items():
        e = data[label]
        by_d = {c["distance"]: c for c in cs}
        cells = []
        for d in ds:
            c = by_d.get(d)
            if c is None or c["facts"] == 0 or c["specific"] is None or math.isnan(c["specific"]):
                cells.append("–")
                continue
            ci = c["specific_ci95"]
            cells.append(f"{c['specific']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        last = max((c for c in cs if c["facts"]), key=lambda c: c["distance"])
        n, m, k = e["window"]
        dmg = ", ".join(f"{t} {x:+.1%}" for t, x in e["damage"] if x is not None) or "–"
        tail = ""
        if a.damage_last:
            ms = [x for _, x in e.get("damage_mean", []) if x is not None]
            tail = " " + ", ".join(f"{t} {x:+.1%}" for t, x in e.get("damage_mean", []) if x is not None) \
                + (f" ({sum(ms) / len(ms):+.1%})" if ms else "") + " |"
        print(f"| {label} | {len(set(e['texts']))} | {n}/{m}/{k} | " + " | ".join(cells)
              + f" | {last['retention']:.2f} | {last['facts']} | {dmg} |" + tail)
    if a.out and a.frontier:
        frontier_plot(rows, data, a.frontier, a.context, a.out)
    elif a.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 6))
        for i, (label, cs) in enumerate(rows.items()):
            cs = [c for c in cs if c["facts"] and c["specific"] is not None and not math.isnan(c["specific"])]
            xs = [c["distance"] * (1 + 0.03 * (i - len(rows) / 2)) for c in cs]   # small offsets: bars apart
            ys = [c["specific"] for c in cs]
            lo = [c["specific"] - (c["specific_ci95"] or (c["specific"],) * 2)[0] for c in cs]
            hi = [(c["specific_ci95"] or (c["specific"],) * 2)[1] - c["specific"] for c in cs]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.plot([8], [0.8], marker="*", color="black", ms=12, ls="none", label="goal (0.8 at 8, 0.5 at 32)")
        ax.plot([32], [0.5], marker="*", color="black", ms=12, ls="none")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ds)
        ax.set_xticklabels([str(d) for d in ds])
        ax.set_xlabel("rounds since the fact left the window")
        ax.set_ylabel("specific retention (1 = as with the fact in context)")
        ax.set_title("Forgetting curve of planted facts, SmolLM2-135M (95 % CI over facts)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
        fig.tight_layout()
        fig.savefig(a.out, dpi=110)
        print(f"wrote {a.out}")
    return 0


def frontier_plot(rows: dict, data: dict, dist: int, context: str | None, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 6))
    if context:
        ch = [r["ppl_change"] * 100 for r in json.loads(Path(context).read_text())["rows"]]
        ax.axvspan(min(ch), max(ch), color="orange", alpha=0.15,
                   label=f"the stream's text in context instead (base model): {min(ch):+.0f} to {max(ch):+.0f} %")
    ax.add_patch(plt.Rectangle((-100, 0.8), 102, 1.0, color="green", alpha=0.12, label="goal: >= 0.8 with <= 2 %"))
    colors = plt.get_cmap("tab20").colors
    for i, (label, cs) in enumerate(rows.items()):
        c = next((c for c in cs if c["distance"] == dist and c["facts"]), None)
        dm = [x * 100 for _, x in data[label]["damage"] if x is not None]
        if c is None or not dm or c["specific"] is None or math.isnan(c["specific"]):
            continue
        ci = c["specific_ci95"] or (c["specific"],) * 2
        x = sum(dm) / len(dm)
        ax.errorbar([x], [c["specific"]], yerr=[[c["specific"] - ci[0]], [ci[1] - c["specific"]]],
                    xerr=[[x - min(dm)], [max(dm) - x]], capsize=3,
                    marker="s" if "sparse" in label else "^" if "prefix" in label else "o",
                    color=colors[i % len(colors)], label=label)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(-10, 400)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("held-out perplexity change at the end, % (mean over speeches; bar: their range)")
    ax.set_ylabel(f"specific retention {dist} rounds after eviction (95 % CI over facts)")
    ax.set_title("Retention against damage, SmolLM2-135M")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
