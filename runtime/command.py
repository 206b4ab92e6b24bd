"""`absorber run BUNDLE`: stream text into a bundle's adapters on ONNX Runtime alone (no torch), and answer."""
from __future__ import annotations

import argparse
import json
import sys
import time

from absorber.errors import AbsorberError
from absorber.mixture import HELP as MIX_HELP, SHARE_HELP, WINDOW_HELP
from absorber.replay import REPLAY_HELP, REPLAY_MODE_HELP, REPLAY_MODES, REPLAY_STEPS_HELP

HELP = "stream text into a bundle on ONNX Runtime (no torch): absorb, resume, answer"
DESCRIPTION = """Stream text into an exported bundle on ONNX Runtime alone (no torch) and answer questions.

The input (a file or - for stdin; txt lines, SubRip .srt, WebVTT .vtt, JSONL with a "text" field) is read as
it arrives. Whenever the window of n+m tokens is full, the oldest n tokens are absorbed into the LoRA adapters
(causal synchronization, up to k AdamW steps) and leave the window. With --state DIR the state is saved after
every round; running again with the same DIR resumes, and re-reading the same input skips what was consumed.

examples:
  absorber run bundle/ --input talk.srt --state st/ --ask "What was the talk about?"
  tail -f live.txt | absorber run bundle/ --input - --state st/ --json
  absorber run bundle/ --state st/ --interactive
"""


def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle folder written by `absorber export`")
    p.add_argument("--input", "-i", metavar="PATH", help="text to absorb: a file, or - for stdin")
    p.add_argument("--format", default="auto", choices=("auto", "txt", "srt", "vtt", "jsonl"),
                   help="input format (auto: by extension, else by content)")
    p.add_argument("--state", metavar="DIR", help="state folder: saved after every round, resumed when present")
    p.add_argument("--ask", action="append", default=[], metavar="PROMPT",
                   help="answer this prompt after the input (repeatable)")
    p.add_argument("--interactive", action="store_true", help="then read prompts from the terminal")
    p.add_argument("--device", default="cpu", help="auto|cpu|cuda[:i]|dml|... (default cpu)")
    p.add_argument("--profile", metavar="NAME", help="device profile (absorber devices) or a JSON file")
    p.add_argument("--n", type=int, help="tokens absorbed per round (default: bundle)")
    p.add_argument("--m", type=int, help="tokens synchronized per round (default: bundle)")
    p.add_argument("--k", type=int, help="optimizer steps per round (default: bundle)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="peak RSS budget, e.g. 600MB, 1GiB: the window (n, m, or the defaults) shrinks until the "
                        "planner's prediction + 10 %% fits (absorber plan; default: the profile's budget)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: bundle)")
    p.add_argument("--eps", type=float, help="stop a round early when the loss is under eps")
    p.add_argument("--teacher", choices=("current", "base", "compose"),
                   help="teacher = base model (adapters off), current adapters, or compose: base with X + "
                        "gamma x the adapters' own contribution on Y (default: bundle)")
    p.add_argument("--gamma", type=float, help="teacher=compose: weight of the adapters' contribution (default 1)")
    p.add_argument("--probes", type=int, help="recall probes per round, synchronized before Y (default: bundle, 0)")
    p.add_argument("--reset", choices=("none", "moments", "adapters"), help="reset before each round (default: bundle)")
    p.add_argument("--decay", type=float, help="scale the adapters' B by (1 - decay) before each round")
    p.add_argument("--read-scale", type=float, help="answers read the adapters' LoRA paths at this scale; training "
                                                    "uses them whole (default: bundle, 1)")
    p.add_argument("--mix", action=argparse.BooleanOptionalAction, default=None,
                   help=MIX_HELP + " (default: the bundle's; on in bundles exported since 2026-12-06)")
    p.add_argument("--mix-share", type=float, metavar="S", help=SHARE_HELP + " (default: the bundle's)")
    p.add_argument("--mix-window", type=int, metavar="W", help=WINDOW_HELP + " (default: the bundle's)")
    p.add_argument("--replay", type=int, metavar="R", help=REPLAY_HELP + " (default: the bundle's)")
    p.add_argument("--replay-mode", choices=REPLAY_MODES, help=REPLAY_MODE_HELP + " (default: the bundle's)")
    p.add_argument("--replay-steps", type=int, metavar="J", help=REPLAY_STEPS_HELP.replace(
        "the reference only", "refused here") + " (default: the bundle's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--flush", action="store_true", help="at the end of input, absorb a partly filled window "
                                                          "(the bundle's `fill` rule)")
    p.add_argument("--no-share-weights", action="store_true",
                   help="let each ONNX Runtime session load its own copy of the frozen weights")
    p.add_argument("--json", action="store_true", help="one JSON object per round, a summary and the answers "
                                                       "on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")


def _progress(args):
    if args.quiet or args.json and not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=None, unit="tok", desc="absorbed", file=sys.stderr, dynamic_ncols=True, leave=True)


def main(args) -> int:
    from absorber.runtime.stream import Stream, rss_mb
    from absorber.runtime.inputs import Reader

    settings = ("n", "m", "k", "lr", "eps", "teacher", "gamma", "probes", "reset", "decay", "read_scale", "mix",
                "mix_share", "mix_window", "replay", "replay_mode", "replay_steps")
    overrides = {k: getattr(args, k) for k in settings if getattr(args, k) is not None}
    if args.max_new_tokens < 0:
        raise AbsorberError("--max-new-tokens must be >= 0")
    out = sys.stdout
    t_start = time.perf_counter()
    stream = Stream.open(args.bundle, device=args.device, state_dir=args.state, profile=args.profile,
                         config_overrides=overrides, share_weights=not args.no_share_weights,
                         memory_budget=args.memory_budget)
    if args.memory_budget and not args.json:
        from absorber.devices.planner import format_size
        print(f"memory budget {args.memory_budget}: window n={stream.cfg.n}, m={stream.cfg.m}, k={stream.cfg.k} "
              f"(predicted peak {format_size(stream.prediction.peak_bytes)})", file=sys.stderr)
    if stream.resumed and not args.json:
        print(f"resumed from {args.state}: {stream.rounds} rounds, {stream.tokens_absorbed} tokens absorbed, "
              f"{stream.offset_chars} characters of input already consumed", file=sys.stderr)
    bar = _progress(args)
    absorbed0 = stream.tokens_absorbed
    t_feed = time.perf_counter()

    def on_round(r):
        if args.json:
            rec = {"round": r.round, "tokens_absorbed": r.tokens_absorbed, "loss_first": r.loss_first,
                   "loss_last": r.loss_last, "steps": r.steps, "seconds": round(r.seconds, 4),
                   "rss_mb": round(rss_mb(), 1), "teacher_seconds": round(r.teacher_seconds, 4),
                   "train_seconds": round(r.train_seconds, 4), "optimizer_seconds": round(r.optimizer_seconds, 4),
                   "rolled_back": r.rolled_back}
            out.write(json.dumps(rec) + "\n")
            out.flush()
        if bar is not None:
            el = max(time.perf_counter() - t_feed, 1e-9)
            bar.update(r.tokens_absorbed - absorbed0 - bar.n)
            loss = f"{r.loss_last:.4f}" if r.loss_last is not None else "-"
            bar.set_postfix_str(f"{(r.tokens_absorbed - absorbed0) / el:.1f} tok/s, loss {loss}, "
                                f"RSS {rss_mb():.0f} MB", refresh=True)

    reader = None
    try:
        if args.input is not None:
            reader = Reader(args.input, args.format)
            stream.feed_reader(reader, on_round=on_round)
            if reader.pieces == 0:
                what = "stdin" if args.input == "-" else args.input
                print(f"absorber run: input {what} is empty (no text to absorb)", file=sys.stderr)
            if reader.invalid_bytes:
                print(f"absorber run: {reader.invalid_bytes} byte(s) of the input were not UTF-8 and were "
                      "replaced by U+FFFD", file=sys.stderr)
            if reader.skipped:
                print(f"absorber run: {reader.skipped} JSONL line(s) without a text field were skipped",
                      file=sys.stderr)
        if args.flush:
            for r in stream.flush():
                on_round(r)
        elif args.state:
            stream.save()
    finally:
        if reader is not None:
            reader.close()
        if bar is not None:
            bar.close()

    feed_seconds = time.perf_counter() - t_feed
    st = stream.stats()
    absorbed = stream.tokens_absorbed - absorbed0
    summary = {"summary": True, **st, "tokens_absorbed_this_run": absorbed,
               "seconds": round(feed_seconds, 3), "open_seconds": round(stream.open_seconds, 3),
               "tokens_absorbed_per_s": round(absorbed / feed_seconds, 2) if feed_seconds > 0 and absorbed else None,
               "providers": stream.providers}
    if reader is not None:
        summary.update(input_format=reader.fmt, input_pieces=reader.pieces, input_bytes=reader.bytes_read)
    if args.json:
        out.write(json.dumps(summary) + "\n")
    else:
        print(f"absorbed {absorbed} tokens in {stream.rounds} rounds total; window {st['window']} tokens; "
              f"last loss {st['last_loss'] if st['last_loss'] is None else round(st['last_loss'], 4)}; "
              f"RSS {st['rss_mb']:.0f} MB", file=sys.stderr)

    def answer(prompt: str) -> None:
        text = stream.ask(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p)
        if args.json:
            out.write(json.dumps({"ask": prompt, "answer": text, "seconds": round(stream.last_answer_seconds, 3),
                                  "new_tokens": stream.last_answer_tokens}) + "\n")
        else:
            out.write(f"Q: {prompt.strip()}\nA: {text.strip()}\n\n")
        out.flush()

    for q in args.ask:
        answer(q)
    if args.interactive:
        if args.input == "-":
            raise AbsorberError("--interactive needs the terminal, but stdin was the input")
        while True:
            try:
                q = input("> ")
            except EOFError:
                break
            if q.strip():
                answer(q)
    return 0
