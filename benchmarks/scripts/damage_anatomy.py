"""Where the held-out damage sits, and how much of it (and of retention) is a context-free shift of the output
distribution (benchmarks/retention.md, "Anatomy of the damage").

Streams one spoken speech with planted facts through one variant (the PyTorch reference, screening window by
default), then, with the adapters it ends with:
- the held-out speech's per-token NLL change against the frozen model (no context): how concentrated it is, and
  the tokens it grows most on;
- the adapters' mean log-probability shift over background text (the frozen model's own samples, no context:
  `absorber.protect.background_rows`): delta[v] = mean_t (log p_adapted(v | t) - log p_base(v | t)). Subtracting
  delta from the adapted logits removes what the adapters add whatever the context (contextual calibration,
  Zhao et al. 2021, arXiv 2102.09690);
- damage and specific retention of every planted fact (all evicted by then), with and without that correction
  (four estimators of it; the frozen model uncorrected is every condition's reference).

    python benchmarks/scripts/damage_anatomy.py --variant ntp_weight=1 --rounds 14 --json benchmarks/damage_anatomy.json

The variant string is retention_screen.py's (on top of its `base`: sync loss alone, lr 1e-3).
`--report FILE...` prints the table of benchmarks/retention.md from such JSON files.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def report(files: list[str]) -> str:
    """One markdown row per (file, condition): damage, its concentration, specific retention, next-text R."""
    rows = ["| variant | window n/m/K | rounds | condition | held-out PPL change | NLL increase in the worst 10 % of "
            "tokens | specific retention [95% CI] | decoy lift | next-text R (one segment) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        d = json.loads(Path(f).read_text())
        cmd = d["command"].split()
        arg = lambda k, dflt: cmd[cmd.index(k) + 1] if k in cmd else dflt  # noqa: E731
        win = d.get("window") or f"{arg('--n', 128)}/{arg('--m', 64)}/{arg('--k', 8)}"
        for name, c in d["conditions"].items():
            ci = c.get("specific_ci95")
            ci_s = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            top = c.get("share_of_nll_change_in_top_decile")
            r = c.get("next_text_R")
            rows.append(f"| {d['variant']} | {win} | {d['rounds']} | {name} | {c['ppl_change']:+.1%} | "
                        f"{'–' if top is None or c['ppl_change'] < 0.05 else f'{top:.0%}'} | "
                        f"{c['specific']:.2f}{ci_s} | {c['decoy_lift']:.2f} | {'–' if r is None else f'{r:.2f}'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--report":
        print(report(argv[1:]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variant", default="ntp_weight=1")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rounds", type=int, default=14, help="rounds streamed before the checks")
    p.add_argument("--skip", type=int, default=0)
    p.add_argument("--fact-seed", type=int, default=0)
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--plant-rounds", type=int, default=6)
    p.add_argument("--heldout", default="1961-Kennedy")
    p.add_argument("--heldout-tokens", type=int, default=256)
    p.add_argument("--background", type=int, default=2048, help="tokens of the frozen model's own samples")
    p.add_argument("--next-tokens", type=int, default=256, help="tokens of the stream after the window scored "
                   "for next-text R")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--save", metavar="FILE", help="also write the adapters it ends with (safetensors)")
    p.add_argument("--load", metavar="FILE", help="skip the rounds: the adapters --save wrote for these settings")
    p.add_argument("--json", dest="json_out", required=True)
    a = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from absorber import data, facts as FX, lora, retention as RT
    from absorber.config import AbsorberConfig, override
    from absorber.evaluate import ModelPool, make_streamer, EvalSettings, stream_rounds, model_max_positions
    from absorber.models import load
    from absorber.calibrate import Calibration
    from absorber.protect import background_rows
    from absorber.stream import CALIBRATION_ROW
    from retention_screen import variant
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load(a.model)
    spoken = data.speeches("spoken")
    sp = spoken[::-1][a.skip]
    text = tok.encode(sp.text(), add_special_tokens=False)
    held = next(s for s in data.speeches(None) if s.fileid.startswith(a.heldout))
    h = tok.encode(held.text(), add_special_tokens=False)[1000:1000 + a.heldout_tokens]
    base_cfg = override(AbsorberConfig(), n=a.n, m=a.m, k=a.k, lr=1e-3, ntp_weight=0.0)
    method, cfg = variant(a.variant, base_cfg)
    rs = RT.RetentionSettings(facts=a.facts, plant_rounds=a.plant_rounds, seed=a.fact_seed)
    ids, fs, spans, ev, passages = RT.prepare(tok, text, cfg, rs, a.fact_seed)
    dec = FX.decoys(fs, a.fact_seed)
    if max(ev) >= a.rounds:
        raise SystemExit(f"--rounds {a.rounds} does not evict every fact (last eviction round {max(ev)})")
    pool = ModelPool(model)
    sa = make_streamer(pool, tok, cfg, method, EvalSettings(methods=(method,)))
    if a.load:     # adapters a run with the same settings saved (--save): its window after --rounds rounds
        from safetensors.torch import load_file
        lora.load_state(sa.model, load_file(a.load))
        fed = a.rounds * cfg.n + cfg.m
        ctx = ids[a.rounds * cfg.n:fed]
    else:
        fed = 0
        for r, fed, _ in stream_rounds(sa, ids, a.rounds):
            print(f"round {r}", file=sys.stderr, flush=True)
        ctx = sa.context()
    nxt = ids[fed:fed + a.next_tokens]
    work, max_len = sa.model, model_max_positions(model)
    dev = next(model.parameters()).device

    @torch.no_grad()
    def token_nlls(m, seq):
        x = torch.tensor([seq], device=dev)
        lg = m(input_ids=x, use_cache=False).logits[0, :-1].float()
        return F.cross_entropy(lg, x[0, 1:], reduction="none"), torch.log_softmax(lg, -1)

    if a.save:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in lora.snapshot(work).items()}, a.save)
    with lora.disabled(work):      # the frozen model as it is: the reference of every condition
        nb, _ = token_nlls(work, h)
    # the adapters' context-free shift over background text: absorber.calibrate's mean log-ratio (and its hook,
    # which every condition below sets to one estimator), plus the log-ratio of the two mean distributions
    cal = Calibration(work, background_rows(model, tok, a.background, 0, anchor=False, row=CALIBRATION_ROW))
    cal.update()
    shift = cal.shift
    marg_a = marg_b = 0
    with cal.off():
        for row in cal.rows:
            marg_a = marg_a + token_nlls(work, row)[1].double().exp().sum(0)
            with lora.disabled(work):
                marg_b = marg_b + token_nlls(work, row)[1].double().exp().sum(0)
    marginal = (marg_a.log() - marg_b.log()).float()
    estimators = {"adapters, context-free shift removed": shift,        # the mean log-ratio (absorber/calibrate.py)
                  "mean log-ratio, positive part removed": shift.clamp(min=0),
                  "marginal log-ratio removed": marginal,
                  "marginal log-ratio, positive part removed": marginal.clamp(min=0)}

    def run(estimate) -> dict:
        cal.shift = estimate       # None: the adapters uncorrected
        na, _ = token_nlls(work, h)
        mine = RT.answer_nlls(work, tok, ctx, list(fs) + list(dec))
        nt, _ = RT.score_nll(work, ctx, nxt, max_len)
        return {"heldout_base": nb, "heldout_method": na, "facts": mine[:len(fs)], "decoys": mine[len(fs):],
                "next": nt}

    results = [("adapters", run(None))] + [(name, run(e)) for name, e in estimators.items()]
    cal.detach()
    win = RT.answer_nlls(model, tok, ctx, list(fs) + list(dec))
    full = [RT.answer_nlls(model, tok, passages[j] + ctx, [fs[j]])[0] for j in range(len(fs))]
    next_window, _ = RT.score_nll(model, ctx, nxt, max_len)
    next_full, _ = RT.score_nll(model, ids[:fed], nxt, max_len)     # the whole stream so far in context
    out = {"command": "python benchmarks/scripts/damage_anatomy.py " + " ".join(argv),
           "speech": sp.fileid, "heldout": held.fileid, "variant": a.variant, "rounds": a.rounds,
           "window": f"{a.n}/{a.m}/{a.k}",
           "eviction_rounds": ev, "background_tokens": sum(len(r) - 1 for r in cal.rows), "seconds": None, "conditions": {}}
    for name, res in results:
        nb, na = res["heldout_base"], res["heldout_method"]
        diff = (na - nb)
        order = torch.argsort(diff, descending=True)
        total = float(diff.sum())
        top = int(math.ceil(0.1 * diff.numel()))
        worst = [{"token": tok.decode([h[1 + int(i)]]), "nll_change": float(diff[i])} for i in order[:12]]
        recs = [{"fact": j, "nll_window": win[j], "nll_method": res["facts"][j], "nll_full": full[j],
                 "nll_window_decoy": win[len(fs) + j], "nll_method_decoy": res["decoys"][j]} for j in range(len(fs))]
        ret, lift = RT.retention(recs), RT.decoy_lift(recs)
        ci = RT.bootstrap_ci(recs, 2000, 0, unit=("fact",), stat=RT.specific_retention)
        out["conditions"][name] = {
            "ppl_change": math.exp(float(na.mean()) - float(nb.mean())) - 1,
            "nll_change_sum": total, "share_of_nll_change_in_top_decile": float(diff[order[:top]].sum()) / total
            if total > 0 else None,
            "tokens_worse": int((diff > 0).sum()), "tokens": int(diff.numel()), "worst_tokens": worst,
            "retention": ret, "decoy_lift": lift, "specific": ret - lift, "specific_ci95": ci, "records": recs,
            "next_nll": res["next"], "next_nll_window": next_window, "next_nll_full": next_full,
            "next_text_R": (next_window - res["next"]) / (next_window - next_full)
            if next_window > next_full else None}
        c = out["conditions"][name]
        print(f"{name}: held-out PPL {c['ppl_change']:+.1%}, top decile carries "
              f"{c['share_of_nll_change_in_top_decile'] or float('nan'):.0%} of the NLL increase, "
              f"{c['tokens_worse']}/{c['tokens']} tokens worse; retention {ret:.2f}, decoy lift {lift:.2f}, "
              f"specific {ret - lift:.2f} {ci}; next-text R {c['next_text_R']}")
        print("   worst tokens: " + ", ".join(f"{w['token']!r} {w['nll_change']:+.2f}" for w in worst[:8]))
    top_shift = torch.topk(shift, 15)
    out["shift_top"] = [{"token": tok.decode([int(i)]), "logprob_shift": float(v)}
                        for v, i in zip(top_shift.values, top_shift.indices)]
    print("largest context-free shifts: " + ", ".join(f"{s['token']!r} {s['logprob_shift']:+.2f}" for s in out["shift_top"]))
    out["seconds"] = time.perf_counter() - t0
    Path(a.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
