"""The PyTorch reference on the runtime's 20k-token stream (k=2), for the drift comparison: python benchmarks/scripts/runtime_ref20k.py sotu_20k.txt"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout (benchmarks/scripts/../..)
import time, torch, json  # noqa: E402
from absorber.models import load
from absorber.config import AbsorberConfig
from absorber.stream import StreamingAbsorber
torch.set_num_threads(2)
model, tok = load('smollm2-135m')
cfg = AbsorberConfig(k=2)
sa = StreamingAbsorber(model, tok, cfg)
t0 = time.time()
for line in open(__import__('sys').argv[1], encoding='utf-8'):
    for r in sa.feed(line):
        print(json.dumps({"round": r.round, "loss_first": r.loss_first, "loss_last": r.loss_last, "s": round(r.seconds, 1)}), flush=True)
        if r.round in (10, 20, 30):
            print("ANSWER", r.round, repr(sa.generate("The main point of this speech was", 24)), flush=True)
print("ANSWER end", repr(sa.generate("The main point of this speech was", 24)), flush=True)
print("total", time.time() - t0)
