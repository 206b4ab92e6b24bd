"""`absorber absorb`: stream text into a PyTorch model with the reference Absorber, then answer questions."""
from __future__ import annotations

import argparse
import json
import sys
import time

from absorber.errors import AbsorberError
from absorber.mixture import HELP as MIX_HELP, SHARE, SHARE_HELP, WINDOW_HELP
from absorber.replay import REPLAY_HELP, REPLAY_MODE_HELP, REPLAY_MODES, REPLAY_STEPS_HELP

HELP = "absorb a text stream into LoRA adapters with the PyTorch reference, then answer"
DESCRIPTION = """\
Read text from a file or stdin as it arrives, keep a window of n+m tokens, and each time it is full absorb its
first n tokens into LoRA adapters by causal synchronization (the reference method; `--method ttt` trains the
same adapters with next-token loss, `window` only drops). At the end, answer each --ask from the remaining
window plus the absorbed adapters.

example:
  absorber absorb --input speech.txt --ask "What did the speaker promise on health care?"
  cat transcript.txt | absorber absorb --input - --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from absorber.config import AbsorberConfig
    d = AbsorberConfig()
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (built in), a .gguf file, a local folder or a hub id (default: %(default)s)")
    p.add_argument("--input", required=True, help="text file, or - for stdin (read line by line as it arrives)")
    p.add_argument("--method", default="absorber", choices=["absorber", "ttt", "window", "sink", "full"])
    p.add_argument("--ask", action="append", default=[], metavar="QUESTION", help="question to answer at the end")
    p.add_argument("--max-new-tokens", type=int, default=48)
    # flags default to None (not given): override() applies only what was given, over --paper or the defaults
    p.add_argument("--n", type=int, help=f"tokens absorbed per round (default {d.n})")
    p.add_argument("--m", type=int, help=f"tokens synchronized per round (default {d.m})")
    p.add_argument("--k", type=int, help=f"max optimizer steps per round (default {d.k})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d.lr:g})")
    p.add_argument("--eps", type=float, help="stop a round when the loss falls under this (default: off)")
    p.add_argument("--rank", type=int, help=f"LoRA rank (default {d.lora.rank}; alpha/rank stays fixed)")
    p.add_argument("--teacher", choices=("current", "base", "compose"),
                   help=f"teacher = base model (adapters off), the current adapters, or compose (default {d.teacher})")
    p.add_argument("--gamma", type=float, help="teacher=compose: weight of the adapters' own contribution (default 1)")
    p.add_argument("--probes", type=int, help="recall probes per round, synchronized before Y (default 0: off)")
    p.add_argument("--reset", choices=("none", "moments", "adapters"),
                   help=f"reset before each round (default {d.reset})")
    p.add_argument("--decay", type=float, help="scale B by (1 - decay) before each round (default 0)")
    p.add_argument("--sync-skip", type=int,
                   help=f"leading Y positions left out of the sync loss (default {d.sync_skip})")
    p.add_argument("--ntp-weight", type=float,
                   help=f"weight of the next-token loss on X beside the sync loss on Y (default {d.ntp_weight:g}; "
                        "0: the sync loss alone)")
    p.add_argument("--read-scale", type=float,
                   help="answers read the adapters' LoRA paths at this scale; training uses them whole (default 1)")
    p.add_argument("--mix", action=argparse.BooleanOptionalAction, default=None,
                   help=MIX_HELP)
    p.add_argument("--mix-share", type=float, metavar="S", help=SHARE_HELP + f" (default {SHARE:g})")
    p.add_argument("--mix-window", type=int, metavar="W", help=WINDOW_HELP + " (default 0)")
    p.add_argument("--replay", type=int, metavar="R", help=REPLAY_HELP + " (default 0)")
    p.add_argument("--replay-mode", choices=REPLAY_MODES, help=REPLAY_MODE_HELP + " (default recent)")
    p.add_argument("--replay-steps", type=int, metavar="J", help=REPLAY_STEPS_HELP + " (default 0)")
    p.add_argument("--bos", action="store_true",
                   help="keep the model's BOS token in front of every context (models pretrained with one, e.g. "
                        "gemma3-270m; default off)")
    p.add_argument("--paper", action="store_true", help="the paper's settings: n=1024 m=2048 r=64 lr=5e-4")
    p.add_argument("--fill", action="store_true", help="at end of input, fill Y by greedy generation and absorb")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--json", action="store_true", help="one JSON object per round and a summary, on stdout")


def config_from_args(args) -> "AbsorberConfig":
    from absorber.config import AbsorberConfig, override
    base = AbsorberConfig.paper() if args.paper else AbsorberConfig()
    return override(base, n=args.n, m=args.m, k=args.k, lr=args.lr, eps=args.eps, rank=args.rank,
                    teacher=args.teacher, gamma=args.gamma, probes=args.probes, reset=args.reset, decay=args.decay, sync_skip=args.sync_skip,
                    ntp_weight=args.ntp_weight, read_scale=args.read_scale, mix=args.mix,
                    mix_share=args.mix_share, mix_window=args.mix_window, replay=args.replay,
                    replay_mode=args.replay_mode, replay_steps=args.replay_steps, fill=True if args.fill else None,
                    bos=True if args.bos else None)


def read_lines(path: str):
    """Lines of a file or stdin, decoded leniently (bad bytes replaced), as they arrive."""
    if path == "-":
        stream = sys.stdin.buffer
    else:
        try:
            stream = open(path, "rb")
        except OSError as e:
            raise AbsorberError(f"cannot read {path}: {e.strerror}") from None
    with stream:
        for raw in stream:
            yield raw.decode("utf-8", errors="replace")


def main(args) -> int:
    cfg = config_from_args(args)
    cfg.validate()
    import torch
    from tqdm import tqdm

    from absorber import models
    from absorber.stream import StreamingAbsorber
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = models.load(args.model)
    s = StreamingAbsorber(model, tok, cfg, method=args.method)
    t0 = time.perf_counter()
    bar = tqdm(total=None, unit="tok", desc="absorbed", file=sys.stderr, disable=args.json or None,
               dynamic_ncols=True)

    def report(rounds):
        for r in rounds:
            if args.json:
                print(json.dumps({k: r.to_json()[k] for k in ("round", "tokens_absorbed", "loss_first", "loss_last",
                                                               "steps", "seconds")}), flush=True)
            else:
                bar.update(s.cfg.n)
                el = time.perf_counter() - t0
                bar.set_postfix_str(f"loss {r.loss_first or 0:.4f}->{r.loss_last or 0:.4f} "
                                    f"{s.tokens_absorbed / el:.1f} tok/s")

    nchars = 0
    for line in read_lines(args.input):
        nchars += len(line)
        report(s.feed(line))
    report(s.flush())
    bar.close()
    if nchars == 0:
        raise AbsorberError("empty input: nothing to absorb")
    answers = []
    for q in args.ask:
        t1 = time.perf_counter()
        a = s.generate(f"\n\nQuestion: {q}\nAnswer:", max_new_tokens=args.max_new_tokens).strip()
        answers.append({"question": q, "answer": a, "seconds": round(time.perf_counter() - t1, 3)})
        if not args.json:
            print(f"Q: {q}\nA: {a}\n")
    st = s.stats()
    summary = {**st, "seconds": round(time.perf_counter() - t0, 3), "answers": answers,
               "settings": {"n": cfg.n, "m": cfg.m, "k": cfg.k, "lr": cfg.lr, "rank": cfg.lora.rank}}
    if args.json:
        print(json.dumps({"summary": summary}), flush=True)
    else:
        print(f"{st['tokens_seen']} tokens seen, {st['tokens_absorbed']} absorbed in {st['rounds']} rounds, "
              f"window {st['window']} tokens, last loss {st['last_loss']}", file=sys.stderr)
    return 0
