"""`absorber export MODEL --out DIR`: write a bundle for the torch-free runtime (imports torch only in main)."""
from __future__ import annotations

import argparse

from absorber.replay import REPLAY_MODE_HELP, REPLAY_MODES

HELP = "export a model as a bundle (ONNX decoder + train step, shared weights, tokenizer, manifest)"
DESCRIPTION = """Export MODEL as a bundle folder (docs/bundle.md) for `absorber run`: decoder.onnx (KV cache, adapters
as inputs, hidden states out), train_step.onnx (sync loss + gradient of every adapter), weights.bin (the frozen
weights, one copy shared by both graphs), adapters.safetensors, tokenizer.json, manifest.json; int8/int4 also
combined.onnx (the decoder as the main graph and the train step inside an If: the runtime opens one session,
so the integer kernels' pre-packed weights are held once).

MODEL: smollm2-135m (built in), a .gguf file, a local folder or hub id, or `tiny` (a tiny random Llama, for demos).

examples:
  absorber export smollm2-135m --out bundles/smollm2-int8 --quant int8
  absorber export tiny --out /tmp/tiny --rank 4 --targets q_proj v_proj --layers 0 1
"""


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="smollm2-135m | path.gguf | folder | hub id | tiny")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="bundle folder to write (must not exist, be empty, or be a bundle to replace)")
    from absorber.bundle_format import QUANT_SCHEMES
    parser.add_argument("--quant", default="fp32", metavar="|".join(QUANT_SCHEMES),
                        help="frozen base weights: fp32, int8 or int4 in blocks of 32, run by MatMulNBits "
                             "(default fp32); a GGUF source's Q4_0/Q4_1/Q4_K/Q5_0/Q6_K/Q8_0 blocks are carried over "
                             "exactly. A comma list (fp32,int8,int4) traces once and writes OUT/<scheme> for each")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: AbsorberConfig's, 16)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="LoRA alpha (default: alpha/rank stays AbsorberConfig's, 32/16, so 2 x rank)")
    parser.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                        help="LoRA target modules (default: all linear layers of the attention and MLP)")
    parser.add_argument("--layers", nargs="+", type=int, default=None, metavar="I",
                        help="decoder layers that get adapters (default: all)")
    parser.add_argument("--loss-layers", nargs="+", type=int, default=None, metavar="I",
                        help="hidden_states indices matched by the loss (default: 1..L)")
    parser.add_argument("--sync-skip", type=int, default=None, metavar="S",
                        help="leading Y positions left out of the sync loss, compiled into train_step.onnx "
                             "(default: AbsorberConfig's)")
    parser.add_argument("--ntp-weight", type=float, default=None, metavar="W",
                        help="weight of the next-token loss of the student on X (the absorbed text) beside the "
                             "sync loss on Y, compiled into train_step.onnx (default: AbsorberConfig's, 1: keeps "
                             "far more of what was said, at ~3x the time and memory of a round); 0: the sync "
                             "loss alone, for small memory budgets and large vocabularies")
    parser.add_argument("--bos", choices=["auto", "on", "off"], default="auto",
                        help="the model's BOS token at position 0 of every context (window, teacher, student, "
                             "answers), outside the loss (default auto: on for models pretrained with one, "
                             "gemma3; off for llama/SmolLM2)")
    parser.add_argument("--mix", action=argparse.BooleanOptionalAction, default=True,
                        help="the bundle's answers read through the online mixture of the adapted and the base "
                             "model (the run-time default it records; `absorber run --no-mix` reads the adapters "
                             "alone). Default on, with the model family's measured lr, K and share (SmolLM2: 1e-3, 8, "
                             "0.01, and replay 8 with 4 steps, keeping 0.64 of planted facts 8 rounds after "
                             "eviction against 0.27 for lr 1e-4; "
                             "Gemma-3: 3e-4, 16, 0.01, 0.43 against 0.30 at 4; unrelated text within 1.1 %% of the "
                             "base model, the same next-text R; benchmarks/retention.md)")
    parser.add_argument("--mix-share", type=float, default=None, metavar="S",
                        help="the mixture's fixed share the bundle records (default: with --mix, the model "
                             "family's measured one, 0.01 for SmolLM2 and Gemma-3; else AbsorberConfig's, 0.001; "
                             "`absorber run --mix-share` changes it per stream)")
    parser.add_argument("--mix-window", type=int, default=None, metavar="W",
                        help="the mixture's weight learns from the last W prompt tokens (the bundle records it; "
                             "default: with --mix, 128 for SmolLM2 and Gemma-3, whose answers then skip the output "
                             "head over the rest of the prompt at the same answers; else 0, the whole prompt; "
                             "`absorber run --mix-window` changes it per stream)")
    parser.add_argument("--lr", type=float, default=None,
                        help="the learning rate the bundle records (default: with --mix, the model family's "
                             "measured one, 1e-3 for SmolLM2 (with K=8), 3e-4 for Gemma-3; else "
                             "AbsorberConfig's, 1e-4; `absorber run --lr` changes it per stream)")
    parser.add_argument("--k", type=int, default=None,
                        help="the AdamW steps per round the bundle records (default: with --mix, the model "
                             "family's measured K, 8 for SmolLM2 (with lr 1e-3: rounds twice as fast, a little more "
                             "retention and the same next-text R as 16 steps at 3e-4), 16 for Gemma-3; else "
                             "AbsorberConfig's, 16; `absorber run --k` changes it per stream)")
    parser.add_argument("--replay", type=int, default=None, metavar="R",
                        help="the bundle records: keep the last R absorbed texts as token ids and train the "
                             "next-token term on them again in later rounds (default: with --mix, the model "
                             "family's measured one; else 0; `absorber run --replay` changes it per stream)")
    parser.add_argument("--replay-mode", choices=REPLAY_MODES, default=None,
                        help=REPLAY_MODE_HELP + " (default recent; `absorber run --replay-mode` changes it)")
    parser.add_argument("--replay-steps", type=int, default=None, metavar="J",
                        help="with --replay: J more steps per round, each on a kept text in place of X (default: "
                             "with --mix, the model family's; `absorber run --replay-steps` changes it)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the adapters' initial A (default 0)")
    parser.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21; int8/int4 need 21)")
    parser.add_argument("--max-len", type=int, default=None, help="longest sequence the graphs accept "
                                                                   "(default: the model's max positions)")
    parser.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                        help="the train step recomputes each layer's forward in its backward instead of keeping "
                             "its activations: ~30%% less peak memory while absorbing, ~12%% slower rounds "
                             "(default auto: on for int8/int4, off for fp32)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the bundle path")


def _load(spec: str):
    if spec == "tiny":
        from absorber.models import tiny_llama, tiny_tokenizer
        return tiny_llama(), tiny_tokenizer()
    from absorber.models import load
    return load(spec)


def carried_source(spec: str, model, say=lambda m: None) -> dict | None:
    """The quantized blocks of the model's GGUF file, carried over as they are (None when the model is no GGUF)."""
    from pathlib import Path

    from absorber.export.gguf_source import carried_weights
    from absorber.models import resolve
    where, gguf_file = resolve(spec)
    if not gguf_file:
        return None
    weights, report = carried_weights(Path(where) / gguf_file, model)
    kinds: dict[str, int] = {}
    for v in report["carried"].values():
        kinds[v] = kinds.get(v, 0) + 1
    say(f"carried over from {gguf_file}: " + ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items()))
        + (f"; requantized: {len(report['left'])}" if report["left"] else ""))
    return weights


def main(args) -> int:
    import os
    import sys
    from pathlib import Path

    from absorber.config import AbsorberConfig, override
    from absorber.bundle_format import QUANT_SCHEMES
    from absorber.errors import AbsorberError
    from absorber.export.bundle import _check_args, _check_out, export_bundles

    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    bad = [q for q in quants if q not in QUANT_SCHEMES]
    if bad or not quants or len(set(quants)) != len(quants):
        raise AbsorberError(f"--quant: {args.quant!r} is not a list of distinct {', '.join(QUANT_SCHEMES)}")
    outs = {quants[0]: args.out} if len(quants) == 1 else {q: os.path.join(args.out, q) for q in quants}
    for q, d in outs.items():                    # fail fast, before loading a model
        _check_args(q, args.opset)
        _check_out(Path(os.path.abspath(d)))
    cfg = override(AbsorberConfig(), rank=args.rank, alpha=args.alpha, targets=args.targets, layers=args.layers,
                   seed=args.seed, loss_layers=args.loss_layers, sync_skip=args.sync_skip,
                   ntp_weight=args.ntp_weight, mix=args.mix,
                   mix_share=args.mix_share, mix_window=args.mix_window, lr=args.lr, k=args.k,
                   replay=args.replay, replay_mode=args.replay_mode, replay_steps=args.replay_steps)
    cfg.validate()
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    say(f"loading {args.model}")
    model, tok = _load(args.model)
    from absorber.export.architectures import lookup
    arch = lookup(model.config)
    if args.bos != "off":
        bos = args.bos == "on" or arch.bos
        cfg = override(cfg, bos=bos)
        if bos:
            say("every context starts with the model's BOS token (--bos off: without)")
    preset = {k: v for k, v in arch.mixed if getattr(args, k) is None} if cfg.mix else {}
    if preset:
        cfg = override(cfg, **preset)
        cfg.validate()
        say("answers mix; recorded for " + arch.family + ": " + ", ".join(f"{k} {v:g}" for k, v in preset.items())
            + " (--no-mix: AbsorberConfig's)")
    source = None
    if any(q != "fp32" for q in quants) and args.model != "tiny":
        source = carried_source(args.model, model, say)
    paths = export_bundles(model, tok, outs, cfg=cfg, opset=args.opset, max_len=args.max_len, progress=say,
                           source=source, recompute={"auto": None, "on": True, "off": False}[args.recompute])
    for q in quants:
        print(paths[q])
    return 0
