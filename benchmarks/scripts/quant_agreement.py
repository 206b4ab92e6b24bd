"""Top-1 agreement and KL of the quantized bundles against the fp32 bundle (the dequantized GGUF), on real text,
per MatMulNBits accuracy level: the decoder on fresh text, and the decoder after one absorption round (the
round's loss beside it). llama.cpp's check of a quantization: every position of every segment counts.

    python benchmarks/scripts/quant_agreement.py --bundles /tmp/q/real --segments 6 --tokens 512 \
        --json benchmarks/quant_agreement.json --md benchmarks/quant_agreement.md

--bundles holds fp32/, int8/, int4/ (absorber export of one model). Each segment is a slice of a different spoken
State of the Union transcript. The "after a round" rows feed n+m tokens of the segment's speech before it (one
round at n=256, m=128, K=4, teacher=base), then score the segment with the absorbed adapters; the fp32 stream
went through the same round on the fp32 bundle.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np

from absorber import bundle_format as F
from absorber.data import speeches
from absorber.devices import get_profile
from absorber.runtime import Model, Stream


def logits_of(stream: Stream, ids: list[int]) -> np.ndarray:
    """[T, V] logits of `ids` alone (no window) under the stream's current adapters."""
    m = stream.model
    feeds = {F.INPUT_IDS: np.asarray([ids], np.int64), F.POSITION_IDS: np.arange(len(ids), dtype=np.int64)[None],
             F.LOGITS_TO_KEEP: np.array(0, np.int64), **{n: m.empty_past for n in m.past_names},
             **m.decoder_adapters(stream.param_views)}
    return m.decoder.run([F.LOGITS], feeds)[0][0]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray, ids_next: np.ndarray) -> dict:
    lr, lg = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lr) * (lr - lg)).sum(-1)
    return {"agree": int((ref.argmax(-1) == got.argmax(-1)).sum()), "positions": int(ref.shape[0]),
            "kl_sum": float(kl.sum()), "kl_max": float(kl.max()),
            "nll_ref": float(-lr[np.arange(len(ids_next)), ids_next].sum()),
            "nll_got": float(-lg[np.arange(len(ids_next)), ids_next].sum())}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", required=True, help="folder with fp32/, int8/, int4/")
    ap.add_argument("--segments", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--levels", default="1,4,1+8:4",
                    help="MatMulNBits accuracy settings to measure: a level for every node, or L+8:L8 (level L, "
                         "L8 for the 8-bit nodes: the int4 bundle's Q8_0 embedding/lm_head)")
    ap.add_argument("--quants", default="int8,int4")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    root = Path(a.bundles)
    base = get_profile("laptop-cpu")
    over = {"n": 256, "m": 128, "k": 4, "teacher": "base"}
    texts = [s for s in speeches("spoken")][: a.segments]
    models: dict = {}

    def accuracy(spec: str) -> dict:
        lev, _, l8 = spec.partition("+8:")
        acc = {"decoder": int(lev), "train_step": int(lev)}
        if l8:
            acc.update({"decoder:8": int(l8), "train_step:8": int(l8)})
        return acc

    def model(q: str, level: str | None) -> Model:
        key = (q, level)
        if key not in models:
            prof = base if level is None else dataclasses.replace(base, matmul_accuracy=accuracy(level))
            models[key] = Model.open(root / q, profile=prof, verify_hashes=False)
        return models[key]

    ref_m = model("fp32", None)
    segs = []
    for sp in texts:
        ids = ref_m.encode(sp.text())
        need = over["n"] + over["m"] + a.tokens + 1
        if len(ids) < need:
            continue
        segs.append({"speech": sp.fileid, "round": ids[:over["n"] + over["m"]],
                     "seg": ids[over["n"] + over["m"]:need]})
    ref = []
    for s in segs:
        st = Stream(ref_m, config_overrides=over)
        fresh = logits_of(st, s["seg"][:-1])
        rr = st.feed_tokens(s["round"])
        ref.append({"fresh": fresh, "after": logits_of(st, s["seg"][:-1]), "loss": [r.loss_first for r in rr]
                    + [r.loss_last for r in rr]})
    rows = []
    for q in a.quants.split(","):
        if not (root / q).is_dir():
            continue
        for level in a.levels.split(","):
            if q == "int8" and "+8:" in level:
                continue                     # every node of the int8 bundle is 8-bit: the same as the plain level
            m = model(q, level)
            models.pop((q, level), None)     # one Model at a time besides the reference
            tot = {"fresh": [], "after": []}
            losses = []
            for s, r in zip(segs, ref):
                st = Stream(m, config_overrides=over)
                nxt = np.asarray(s["seg"][1:])
                tot["fresh"].append(compare(r["fresh"], logits_of(st, s["seg"][:-1]), nxt))
                rr = st.feed_tokens(s["round"])
                tot["after"].append(compare(r["after"], logits_of(st, s["seg"][:-1]), nxt))
                got = [x.loss_first for x in rr] + [x.loss_last for x in rr]
                losses.append(max(abs(g - e) / abs(e) for g, e in zip(got, r["loss"])))
            for phase, cs in tot.items():
                k, n = sum(c["agree"] for c in cs), sum(c["positions"] for c in cs)
                lo, hi = wilson(k, n)
                rows.append({"quant": q, "accuracy_level": level, "phase": phase, "top1": k / n, "top1_ci95": [lo, hi],
                             "positions": n, "kl_mean": sum(c["kl_sum"] for c in cs) / n,
                             "kl_max": max(c["kl_max"] for c in cs),
                             "ppl_ref": math.exp(sum(c["nll_ref"] for c in cs) / n),
                             "ppl": math.exp(sum(c["nll_got"] for c in cs) / n),
                             "round_loss_relerr_max": max(losses) if phase == "after" else None})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    res = {"rows": rows, "segments": [s["speech"] for s in segs], "tokens": a.tokens, "round": over,
           "machine": {"cpu": platform.processor() or platform.machine()},
           "command": "python benchmarks/scripts/quant_agreement.py " + " ".join(argv or sys.argv[1:])}
    md = [f"Command: `{res['command']}`", "",
          f"{len(segs)} segments of {a.tokens} tokens ({', '.join(res['segments'])}); reference: the fp32 bundle "
          "(the dequantized GGUF) through the same runtime. 'after a round': one round (n=256, m=128, K=4, "
          "teacher=base) on the preceding tokens, then the segment.", "",
          "| bundle | accuracy_level (+8: for 8-bit nodes) | phase | top-1 agreement (95 % CI) | mean KL | max KL | ppl fp32 → bundle | round loss rel. err |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['quant']} | {r['accuracy_level']} | {r['phase']} | {100 * r['top1']:.2f} % "
                  f"({100 * r['top1_ci95'][0]:.2f}–{100 * r['top1_ci95'][1]:.2f}) | {r['kl_mean']:.2e} | "
                  f"{r['kl_max']:.2e} | {r['ppl_ref']:.3f} → {r['ppl']:.3f} | "
                  + (f"{r['round_loss_relerr_max']:.2e}" if r["round_loss_relerr_max"] is not None else "–") + " |")
    text = "\n".join(md) + "\n"
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.md:
        Path(a.md).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
