"""`absorber eval`: streaming perplexity, recall after eviction and passkey accuracy per method, at equal compute."""
from __future__ import annotations

import argparse
import json
import math
import sys

from absorber.mixture import HELP as MIX_HELP, SHARE, SHARE_HELP, WINDOW_HELP
from absorber.replay import REPLAY_HELP, REPLAY_MODE_HELP, REPLAY_MODES, REPLAY_STEPS_HELP

HELP = "compare absorber, ttt, window, sink and full context on real text (perplexity, recall, passkey)"
DESCRIPTION = """\
Stream each text through each method with the same n, m, K and optimizer (fresh adapters per text). After
every round, the next segment of the stream is scored conditioned on the method's context; the summary pools
NLL over all segments of all texts, and reports PPL, the recovered fraction
R = (PPL_window - PPL_method) / (PPL_window - PPL_full) with a bootstrap interval over segments, the same R on
the key tokens alone (LongPPL: the tokens where full context helps by more than --key-gain nats), the PPL of a
just-evicted passage repeated (recall), passkey accuracy, and the sync loss before/after each round.

examples:
  absorber eval --sotu 4 --segments 8 --json out.json --plot out.png
  absorber eval --text talk.txt --methods window,absorber,full --k 16 --lr 1e-3
  absorber eval --sotu 4 --segments 6 --methods window,full,absorber --sweep lr=5e-4,1e-3 k=8,16
  absorber eval --sotu 2 --segments 6 --methods window,full,absorber --lr 1e-3 --read-scales 0.5,0.25
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("input")
    src.add_argument("--model", default="smollm2-135m", help="model spec (default: smollm2-135m)")
    src.add_argument("--text", nargs="+", metavar="FILE", help="text files to stream")
    src.add_argument("--sotu", type=int, metavar="N", help="use the N most recent spoken State of the Union speeches")
    src.add_argument("--speech", nargs="+", metavar="FILEID", help="specific SOTU speeches, e.g. 1994-Clinton-1")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--methods", default="full,window,sink,ttt,absorber",
                    help="comma-separated subset of full,window,sink,ttt,absorber")
    ev.add_argument("--segments", type=int, metavar="S", help="at most S rounds (scored segments) per text")
    ev.add_argument("--score-len", type=int, metavar="S", help="tokens scored after each round (default: n)")
    ev.add_argument("--recall-len", type=int, default=64, help="tokens of the just-evicted passage scored (0: off)")
    ev.add_argument("--max-context", type=int, help="cap of the full-context baseline (default: the model's)")
    ev.add_argument("--passkey-lengths", default="1024",
                    help="haystack lengths in tokens for the passkey test ('' : off)")
    ev.add_argument("--passkey-depths", default="0.1,0.3", help="needle depths, fractions of the haystack")
    ev.add_argument("--passkey-trials", type=int, default=1,
                    help="keys per (length, depth); trial j uses text j as haystack (default %(default)s)")
    ev.add_argument("--key-gain", type=float, default=2.0,
                    help="key tokens (LongPPL): full context lowers their NLL by more than this many nats against "
                         "the window (default %(default)s; with --key-full-nll, R on them alone; <0: off)")
    ev.add_argument("--key-full-nll", type=float, default=2.0,
                    help="key tokens: the full context's NLL on them is below this (default %(default)s)")
    ev.add_argument("--read-scales", default="", metavar="S1,S2",
                    help="also score the trained methods with their LoRA paths read at these scales, on the same "
                         "adapters: one row per scale, e.g. 'absorber (read x0.25)' (default: none)")
    ev.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (0: no intervals)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ev.add_argument("--device", default="cpu", help="torch device for the reference, e.g. cpu, cuda (default cpu)")
    mt = p.add_argument_group("method (defaults: absorber.config.AbsorberConfig)")
    mt.add_argument("--n", type=int, help="tokens absorbed per round (X)")
    mt.add_argument("--m", type=int, help="tokens synchronized per round (Y)")
    mt.add_argument("--k", type=int, help="optimizer steps per round")
    mt.add_argument("--lr", type=float)
    mt.add_argument("--clip", type=float, help="gradient-norm clipping (0: off)")
    mt.add_argument("--rank", type=int, help="LoRA rank (alpha scales with it: alpha/rank stays fixed)")
    mt.add_argument("--loss-layers", help="hidden-state indices matched, e.g. 10,20,30 (default: all 1..L)")
    mt.add_argument("--kl-weight", type=float)
    mt.add_argument("--sync-skip", type=int, help="leading Y positions left out of the sync loss (Y's sink)")
    mt.add_argument("--reset", choices=("none", "moments", "adapters"), help="reset before each round")
    mt.add_argument("--decay", type=float, help="scale the adapters' B by (1 - decay) before each round")
    mt.add_argument("--teacher", choices=("current", "base", "compose"),
                    help="teacher = current adapters, the base model, or compose (base with X + gamma x the "
                         "adapters' own contribution on Y)")
    mt.add_argument("--gamma", type=float, help="teacher=compose: weight of the adapters' contribution")
    mt.add_argument("--ntp-weight", type=float, help="weight of the next-token loss on X beside the sync loss "
                                                     "(default 1; 0: the sync loss alone)")
    mt.add_argument("--read-scale", type=float, help="answer and score with the LoRA paths read at this scale "
                                                      "(default 1; training uses them whole)")
    mt.add_argument("--mix", action=argparse.BooleanOptionalAction, default=None, help=MIX_HELP)
    mt.add_argument("--mix-share", type=float, metavar="S", help=SHARE_HELP + f" (default {SHARE:g})")
    mt.add_argument("--mix-window", type=int, metavar="W", help=WINDOW_HELP + " (default 0)")
    mt.add_argument("--replay", type=int, metavar="R", help=REPLAY_HELP + " (default 0)")
    mt.add_argument("--replay-mode", choices=REPLAY_MODES, help=REPLAY_MODE_HELP + " (default recent)")
    mt.add_argument("--replay-steps", type=int, metavar="J", help=REPLAY_STEPS_HELP + " (default 0)")
    mt.add_argument("--probes", type=int, help="recall probes per round: parts of X after a recap prefix, "
                                                "synchronized before Y (0: off)")
    mt.add_argument("--bos", action="store_true", default=None,
                    help="keep the model's BOS token at position 0 of every context, for every method (models "
                         "pretrained with one, e.g. gemma3-270m; default off)")
    fc = p.add_argument_group("forgetting curve of planted facts (absorber/retention.py)")
    fc.add_argument("--facts", type=int, default=0, metavar="F",
                    help="plant F invented facts per text and report retention against rounds since eviction "
                         "instead of the perplexity table (methods: window, ttt, absorber)")
    fc.add_argument("--plant-rounds", type=int, default=2, help="X chunks the facts are spread over (default 2)")
    fc.add_argument("--distances", default="1,2,4,8,16,32", help="rounds since eviction scored")
    fc.add_argument("--cued", action="store_true",
                    help="also ask every fact by its own sentence's words up to the answer: a row '<method> (own "
                         "words)' for what is stored, against the question's row for what a question can reach")
    fc.add_argument("--recite", type=int, default=0, metavar="T",
                    help="also answer every question after a recitation of at most T tokens that each condition's "
                         "model writes first (a row '<method> (recited)'; arXiv 2210.01296)")
    fc.add_argument("--restate", type=int, default=0, metavar="T",
                    help="also answer every question after a lead-in of at most T tokens that each condition's model "
                         "writes first, the question restated as the start of its answer (a row '<method> "
                         "(restated)')")
    fc.add_argument("--restate-shared", action="store_true",
                    help="with --restate: every condition asked after the window's lead (the base model's, which has "
                         "not seen the fact): a rewrite of the question rather than each condition's recall")
    fc.add_argument("--heldout", default="1961-Kennedy",
                    help="text whose perplexity measures damage: a speech's fileid prefix or a text file (its tokens "
                         "after the first 1000 are scored; default %(default)s)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="OUT", help="write the full result as JSON")
    out.add_argument("--plot", metavar="PNG", help="plot PPL vs stream position per method (not with --sweep)")
    out.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2",
                     help="grid over settings (n, m, k, lr, clip, loss_layers, kl_weight, rank, sparse, ...); "
                          "use | to separate tuple values, e.g. loss_layers=all|10,20,30; with --facts, one "
                          "forgetting curve per point")
    out.add_argument("--quiet", action="store_true", help="no per-round progress")


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def main(args: argparse.Namespace) -> int:
    import torch

    from absorber import evaluate as E
    from absorber.config import AbsorberConfig, grid_points, override, parse_sweep, parse_value
    from absorber.errors import AbsorberError

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if not (args.text or args.sotu or args.speech):
        raise AbsorberError("give --text FILE..., --sotu N or --speech FILEID...")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = set(methods) - set(E.METHODS)
    if bad:
        raise AbsorberError(f"unknown method(s) {', '.join(sorted(bad))}; choose from {', '.join(E.METHODS)}")

    cfg = override(AbsorberConfig(), **{key: getattr(args, key) for key in (
        "n", "m", "k", "lr", "clip", "kl_weight", "sync_skip", "reset", "decay", "teacher", "gamma", "probes", "rank",
        "ntp_weight", "read_scale", "mix", "mix_share", "mix_window", "bos", "replay", "replay_mode", "replay_steps")},
        loss_layers=parse_value("loss_layers", args.loss_layers) if args.loss_layers else None)
    cfg.validate()
    try:
        settings = E.EvalSettings(methods=methods, score_len=args.score_len, segments=args.segments,
                                  recall_len=args.recall_len, max_context=args.max_context,
                                  passkey_lengths=tuple(int(x) for x in _floats(args.passkey_lengths)),
                                  passkey_depths=_floats(args.passkey_depths),
                                  passkey_trials=args.passkey_trials, bootstrap=args.bootstrap,
                                  seed=args.seed, read_scales=_floats(args.read_scales),
                                  key_gain=None if args.key_gain < 0 else args.key_gain,
                                  key_full_nll=args.key_full_nll)
    except ValueError as e:
        raise AbsorberError(f"bad number: {e}") from None
    if any(not (x >= 0 and math.isfinite(x)) for x in settings.read_scales):
        raise AbsorberError(f"--read-scales must be finite numbers >= 0 (got {args.read_scales!r})")
    grid = parse_sweep(args.sweep) if args.sweep else None

    from absorber.models import load
    model, tok = load(args.model)
    try:
        model.to(args.device)
    except (RuntimeError, AssertionError) as e:
        raise AbsorberError(f"device {args.device!r} is not usable: {str(e).splitlines()[0]}") from None
    texts = []
    for path in args.text or []:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append((path, tok.encode(f.read(), add_special_tokens=False)))
        except OSError as e:
            raise AbsorberError(f"cannot read {path}: {e.strerror}") from None
    if args.sotu or args.speech:
        from absorber import data
        chosen = [data.speech(fid) for fid in args.speech or []]
        if args.sotu:
            chosen += data.speeches("spoken")[-args.sotu:][::-1]
        texts += [(s.fileid, tok.encode(s.text(), add_special_tokens=False)) for s in chosen]

    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    command = "absorber eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else None

    def checkpoint(partial: dict) -> None:   # long runs: keep what is done so far
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({**partial, "partial": True, "command": command}, f, indent=1, default=str)

    if args.facts:
        from absorber import data, retention as RT
        runs = [(m, m, cfg) for m in methods if m in ("window", "ttt", "absorber")]
        if grid:   # one run per grid point of each trained method, labelled by its settings
            runs = [r for r in runs if r[1] == "window"] + [
                (f"{m} " + " ".join(f"{k}={v}" for k, v in p.items()), m, override(cfg, **p))
                for _, m, _ in runs if m != "window" for p in grid_points(grid)]
        if not runs:
            raise AbsorberError("--facts needs at least one of the methods window, ttt, absorber")
        rs = RT.RetentionSettings(facts=args.facts, plant_rounds=args.plant_rounds,
                                  distances=tuple(int(x) for x in _floats(args.distances)),
                                  bootstrap=args.bootstrap, seed=args.seed,
                                  read_scales=settings.read_scales, cued=args.cued, recite=args.recite,
                                  restate=args.restate, restate_shared=args.restate_shared)
        held_ids = tok.encode(data.heldout_text(args.heldout)[1], add_special_tokens=False)
        if len(held_ids) < 1000 + rs.heldout_tokens:
            raise AbsorberError(f"--heldout {args.heldout}: {len(held_ids)} tokens; the damage check scores "
                                f"{rs.heldout_tokens} after the first 1000")
        heldout = held_ids[1000:]
        result = RT.forgetting_curve(model, tok, texts, heldout, runs, rs, log=log, on_run=checkpoint)
        print(RT.format_curve(result))
    elif grid:
        result = E.sweep(model, tok, texts, cfg, settings, grid, log=log, on_point=checkpoint)
        print("| point | " + " | ".join(f"{m} PPL" for m in methods) + " | R absorber [95% CI] | key-token R absorber "
              "| R ttt |")
        print("|---|" + "---|" * (len(methods) + 3))
        for p in result["sweep"]:
            ms = p["methods"]
            def r(m, key="recovered_fraction"):
                d = ms.get(m)
                if not d or d.get(key) is None:
                    return "–"
                ci = d.get(f"{key}_ci95")
                return f"{d[key]:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            print(f"| {p['point']} | " + " | ".join(f"{ms[m]['ppl']:.3f}" for m in methods)
                  + f" | {r('absorber')} | {r('absorber', 'key_recovered_fraction')} | {r('ttt')} |")
            for extra in [m for m in ms if m not in methods]:     # --read-scales rows
                print(f"| {p['point']} {extra} | " + " | ".join("" for _ in methods)
                      + f" | {r(extra)} | {r(extra, 'key_recovered_fraction')} | |")
    else:
        result = E.evaluate(model, tok, texts, cfg, settings, log=log, on_method=checkpoint)
        print(E.format_table(result["methods"]))
        if args.plot:
            E.plot(result, args.plot)
    result["command"] = command
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    return 0
