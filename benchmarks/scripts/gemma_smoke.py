"""Gemma-3-270M int4 bundle smoke: open, top-1 vs torch on 256 tokens, 3 rounds at n512/m256/K4, RSS, one answer.

    absorber export gemma3-270m --out /tmp/g-int4 --quant int4
    python benchmarks/scripts/gemma_smoke.py /tmp/g-int4
"""
import sys
import time, json, numpy as np, torch
from absorber import data
from absorber.models import load
from absorber.runtime import Stream
from absorber.runtime.stream import rss_mb
t0 = time.perf_counter()
s = Stream.open(sys.argv[1], config_overrides={"k": 4})
print("open", round(time.perf_counter() - t0, 1), "s rss", round(rss_mb()), "MB", s.cfg.n, s.cfg.m, s.cfg.k)
sp = data.speeches("spoken")[-1]
text = sp.text()
ids = s.model.encode(text)[:256]
got = s.logits(ids)
model, tok = load("gemma3-270m")
with torch.no_grad():
    ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
print("top-1 agreement int4 runtime vs torch (dequantized GGUF), 256 tokens:", round(agree * 100, 2), "%")
del model
t0 = time.perf_counter()
rounds = s.feed_tokens(s.model.encode(text)[:512 * 3 + 256])
dt = time.perf_counter() - t0
print("rounds", len(rounds), "absorbed tok/s", round(512 * len(rounds) / dt, 1), "losses", [(round(r.loss_first, 4), round(r.loss_last, 4)) for r in rounds], "rss", round(rss_mb()), "MB")
t0 = time.perf_counter()
ans = s.ask("The speaker said", max_new_tokens=16)
print("answer", repr(ans), round(time.perf_counter() - t0, 2), "s")
