"""A bos bundle on the real model: the runtime reads with the BOS as the reference does.

    absorber export gemma3-270m --out /tmp/g --quant fp32,int4          # --bos auto: on for gemma3
    python benchmarks/scripts/bos_runtime_check.py /tmp/g/fp32 /tmp/g/int4 --json benchmarks/bos_runtime_check.json

For each bundle: (1) perplexity of held-out texts (tokens 1000..1255 of the GPL-3 and of a speech) in the runtime with its sink
(the BOS) in front and without, against bos_check.json's torch figures; (2) `--rounds` rounds at n/m/K on a
spoken speech, runtime against the PyTorch reference with cfg.bos (round losses; fp32: the same weights; int4:
the GGUF's blocks carried over, which are the reference's weights); (3) one answer. Round seconds are as measured (not a benchmark: `absorber bench`).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def runtime_ppl(stream, ids: list[int], with_sink: bool) -> float:
    """Perplexity of ids (all but the first scored when nothing is in front) with the stream's adapters."""
    from absorber.evaluate import ppl
    from absorber.runtime.generate import summed_nll
    ctx = (stream.sink if with_sink else []) + ids
    logits = stream.logits(ctx)
    start = max(len(ctx) - len(ids) - 1, 0)      # the logit at p-1 predicts ids[0] (p: tokens in front)
    targets = ctx[start + 1:]
    return ppl(summed_nll(logits[start:len(ctx) - 1], targets), len(targets))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--model", default="gemma3-270m", help="the reference model the bundles were exported from")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from absorber import data
    from absorber.models import load
    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    torch.set_num_threads(args.threads)
    texts = dict(data.heldout_text(spec) for spec in ("/usr/share/common-licenses/GPL-3", "1961-Kennedy-1"))
    stream_text = data.speeches("spoken")[-1].text()
    out = {"command": " ".join(["python", "benchmarks/scripts/bos_runtime_check.py"] + sys.argv[1:]),
           "machine": platform.processor() or platform.machine(), "bundles": {}}
    ref_model = None
    for path in args.bundles:
        t0 = time.perf_counter()
        s = Stream.open(path, config_overrides={"n": args.n, "m": args.m, "k": args.k})
        rec: dict = {"sink": s.sink, "quant": s.bundle.quant_scheme, "open_s": round(time.perf_counter() - t0, 1)}
        rec["ppl"] = {}
        for name, text in texts.items():
            ids = s.model.encode(text)[1000:1256]      # as bos_check.py and the retention screen take them
            rec["ppl"][name] = {f"{'with' if w else 'without'}_bos": round(runtime_ppl(s, ids, w), 3)
                                for w in (True, False)}
            print(path, name, rec["ppl"][name], flush=True)
        ids = s.model.encode(stream_text)[:args.n * args.rounds + args.m]
        t0 = time.perf_counter()
        ro = s.feed_tokens(ids)
        rec["runtime_round_seconds"] = round((time.perf_counter() - t0) / max(len(ro), 1), 1)
        if ref_model is None:
            ref_model, tok = load(args.model)
        import copy
        ref = StreamingAbsorber(copy.deepcopy(ref_model), tok, s.cfg)
        t0 = time.perf_counter()
        rr = ref.feed_tokens(ids)
        rec["reference_round_seconds"] = round((time.perf_counter() - t0) / max(len(rr), 1), 1)
        rec["rounds"] = [{"runtime": [round(b.loss_first, 5), round(b.loss_last, 5)],
                          "reference": [round(a.loss_first, 5), round(a.loss_last, 5)],
                          "rel_diff_last": round(abs(b.loss_last - a.loss_last) / abs(a.loss_last), 6)}
                         for a, b in zip(rr, ro)]
        rec["context_equal"] = s.sink + s.window == ref.context()
        print(path, rec["rounds"], "context equal:", rec["context_equal"], flush=True)
        rec["answer"] = s.ask(" The speaker said that", max_new_tokens=24)
        print(path, "answer:", repr(rec["answer"]), flush=True)
        out["bundles"][path] = rec
        s.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
