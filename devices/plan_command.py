"""`absorber plan BUNDLE --memory-budget 1GB`: predicted peak memory, term by term, and the largest window that
fits the budget."""
from __future__ import annotations

import json

HELP = "predict peak memory of a bundle term by term and pick the largest window for a memory budget"
DESCRIPTION = """Predict the peak resident memory (RSS) of `absorber run` on a bundle, term by term: frozen weights
(by quantization), adapters + gradients + AdamW state, the KV cache of the window, the teacher pass and the
train step's saved activations, and the runtime's fixed overhead.

With --memory-budget, choose the largest window (n = ratio * m) whose prediction fits; with --n/--m, predict
that window (and check it against the budget when one is given).
Sizes: 1.5GB and 800MB are decimal, 1GiB and 512MiB (or 512M) binary.
The model's coefficients and their calibration are in benchmarks/planner.md."""


def add_arguments(parser) -> None:
    parser.add_argument("bundle", help="bundle folder (or its manifest.json)")
    parser.add_argument("--memory-budget", metavar="SIZE", help="peak RSS budget, e.g. 1GB, 800MB, 1.5GiB")
    parser.add_argument("--n", type=int, help="tokens absorbed per round (default: planned, or the bundle's)")
    parser.add_argument("--m", type=int, help="tokens synchronized per round")
    parser.add_argument("--k", type=int, help="optimizer steps per round (time, not memory)")
    parser.add_argument("--ratio", type=float, help="n/m when planning (default: the bundle defaults' n/m)")
    parser.add_argument("--profile", help="device profile (its arena setting and budget are used)")
    parser.add_argument("--margin", type=float, default=10.0,
                        help="safety margin in %% over the prediction when planning (default 10)")
    parser.add_argument("--no-arena", action="store_true", help="plan for enable_cpu_mem_arena=false")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args) -> int:
    from absorber.devices.planner import format_size, load_bundle, parse_size, plan, predict
    from absorber.devices.profiles import get_profile
    from absorber.errors import AbsorberError

    bundle = load_bundle(args.bundle)
    prof = get_profile(args.profile) if args.profile else None
    budget = parse_size(args.memory_budget) if args.memory_budget else (prof.memory_budget_bytes if prof else None)
    arena = (prof.enable_cpu_mem_arena if prof else True) and not args.no_arena
    defaults = bundle.defaults()
    k = args.k if args.k is not None else defaults.k
    pattern = prof.enable_mem_pattern if prof else False
    kw = {"arena": arena, "mem_pattern": pattern}
    if (args.n is None) != (args.m is None) and budget is None:
        raise AbsorberError("give both --n and --m, or a --memory-budget to plan the window")
    if args.n is not None and args.m is not None:
        pred = predict(bundle, args.n, args.m, k, **kw)
        mode = "given"
    elif budget is not None:
        pred = plan(bundle, budget, k, ratio=args.ratio, margin=args.margin / 100, **kw)
        mode = "planned"
    else:
        pred = predict(bundle, defaults.n, defaults.m, k, **kw)
        mode = "bundle defaults"
    fits = None if budget is None else pred.peak_bytes * (1 + args.margin / 100) <= budget
    if args.json:
        out = pred.to_dict()
        out.update({"mode": mode, "budget_bytes": budget, "margin": args.margin / 100, "fits": fits})
        print(json.dumps(out, indent=2))
        return 0 if fits is not False else 1
    print(f"window ({mode}): n={pred.n} m={pred.m} k={pred.k}   arena={'on' if arena else 'off'} "
          f"(teacher and train step {'added' if pred.combine == 'sum' else 'not added: the larger counts'})")
    for name, v in pred.terms.items():
        print(f"  {name:<12} {format_size(v):>12}")
        for dk, dv in pred.detail.items():
            if dk.startswith(name + ".") and dv:
                print(f"    {dk.split('.', 1)[1]:<28} {format_size(dv):>12}")
    print(f"  {'peak':<12} {format_size(pred.peak_bytes):>12}" +
          ("" if budget is None else f"   + {args.margin:g}% margin vs budget {format_size(budget)}: "
                                     f"{'fits' if fits else 'DOES NOT FIT'}"))
    for note in pred.notes:
        print(f"  note: {note}")
    return 0 if fits is not False else 1
