"""RSS of Stream.open + one short round, with and without weight sharing (run each mode in a fresh process).

    python benchmarks/scripts/runtime_share_rss.py BUNDLE share|noshare [profile] [k]
"""
import sys, time, json, resource
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout (benchmarks/scripts/../..)
import psutil
from absorber.runtime import Stream
from absorber.data import speech
b, share = sys.argv[1], sys.argv[2] == "share"
P = psutil.Process()
def mem():
    sm = dict(l.split(":", 1) for l in open("/proc/self/smaps_rollup").read().splitlines()[1:])
    kb = lambda k: int(sm[k].split()[0]) / 1024
    return {"rss": round(P.memory_info().rss / 2**20), "pss_anon": round(kb("Pss_Anon")), "pss_file": round(kb("Pss_File"))}
r0 = mem()
t = time.perf_counter()
s = Stream.open(b, share_weights=share, profile=(sys.argv[3] or None if len(sys.argv) > 3 else None), config_overrides={"n": 512, "m": 256, "k": int(sys.argv[4]) if len(sys.argv) > 4 else 2})
t_open = time.perf_counter() - t
r1 = mem()
text = speech("1994-Clinton-1").text()[:6000]
rounds = s.feed(text)
r2 = mem()
t = time.perf_counter(); a = s.ask("The President said", max_new_tokens=16); t_ask = time.perf_counter() - t
print(json.dumps({"share": share, "open_s": round(t_open, 2), "before": r0, "after_open": r1, "after_round": r2,
                  "after_ask": mem(), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "round": rounds[0].to_json() if rounds else None, "ask_s": round(t_ask, 2), "answer": a}))
