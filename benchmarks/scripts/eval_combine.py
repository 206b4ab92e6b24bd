"""Pool the defaults and the fresh-adapters runs over 4 speeches (12 segments): R, recall R, paired difference.
usage: python benchmarks/scripts/eval_combine.py (after eval_main.json, eval_more_texts*.json, eval_reset.json exist
in benchmarks/; read from there whatever the current directory)"""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout (benchmarks/scripts/../..)
from absorber import evaluate as E  # noqa: E402
RESULTS = Path(__file__).resolve().parents[1]   # benchmarks/
def load(p, m):
    r = json.load(open(RESULTS / Path(p).name)); return r["segments"].get(m, {})
base = {m: {**load("benchmarks/eval_main.json", m), **load("benchmarks/eval_more_texts.json", m)} for m in ("window", "full")}
default = {**load("benchmarks/eval_main.json", "absorber"), **load("benchmarks/eval_more_texts.json", "absorber")}
reset = {**load("benchmarks/eval_reset.json", "absorber"), **load("benchmarks/eval_more_texts_reset.json", "absorber")}
names = sorted(default)
flat = lambda d: [r for n in names for r in d[n]]
for label, d in [("default", default), ("reset", reset)]:
    s = E.summarize({"window": flat(base["window"]), "full": flat(base["full"]), "absorber": flat(d)}, {}, E.EvalSettings())
    a = s["absorber"]
    print(label, len(flat(d)), "window", round(s["window"]["ppl"], 3), "full", round(s["full"]["ppl"], 3), "ppl", round(a["ppl"], 3),
          "R", round(a["recovered_fraction"], 3), [round(x, 2) for x in a["recovered_fraction_ci95"]],
          "recallR", round(a["recall_recovered_fraction"], 3), [round(x, 2) for x in a["recall_recovered_fraction_ci95"]])
A, B = flat(default), flat(reset)
d = [(b["nll"] - a["nll"]) / a["count"] for a, b in zip(A, B)]
k = len(d); rng = random.Random(0); bs = sorted(sum(d[rng.randrange(k)] for _ in range(k)) / k for _ in range(2000))
print("reset-default", round(sum(d) / k, 4), round(bs[50], 4), round(bs[1949], 4), "better", sum(x < 0 for x in d), "of", k)
for n in names:
    print(n, [(round(E.ppl(w["nll"], w["count"]), 2), round(E.ppl(f["nll"], f["count"]), 2), round(E.ppl(x["nll"], x["count"]), 2), round(E.ppl(y["nll"], y["count"]), 2)) for w, f, x, y in zip(base["window"][n], base["full"][n], default[n], reset[n])])
