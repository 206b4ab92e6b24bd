"""Resident memory of one absorption round with MatMulNBits' inputs handed to ONNX Runtime from the runtime's one
map of weights.bin (NEW, the runtime since 2026-12-05) or loaded by ONNX Runtime itself (OLD: the runtime before,
rebuilt here by leaving those tensors out of the shared initializers and keeping the map's pages after open).
benchmarks/planner.md section 0000000000:

    python benchmarks/scripts/kernel_map_rss.py BUNDLE [--old] [--json FILE]     (appends one JSON line)

One fresh process per call: Stream.open(BUNDLE) at the bundle's window (SmolLM2: n=512, m=256, K=16), one round
of the default speech, then VmRSS / VmHWM (/proc/self/status) and Rss / Pss (/proc/self/smaps_rollup, Linux):
RSS counts a file page once per mapping, PSS once.
"""
import argparse
import contextlib
import json
import time

import absorber.runtime.sessions as S


@contextlib.contextmanager
def old_way():
    """Sessions opened inside the block leave the kernel tensors to ONNX Runtime and keep the map's pages."""
    orig, drop = S._shared_initializers, S._drop_pages

    def without_kernel_tensors(bundle, graph, maps, shared):
        out = orig(bundle, graph, maps, shared)
        return {n: v for n, v in out.items() if n not in bundle.kernel_tensors}
    S._shared_initializers, S._drop_pages = without_kernel_tensors, (lambda maps: None)
    try:
        yield
    finally:
        S._shared_initializers, S._drop_pages = orig, drop


def status() -> dict:
    with open("/proc/self/status") as f:
        st = {ln.split(":")[0]: round(int(ln.split()[1]) / 1024, 1) for ln in f if ln.startswith(("VmRSS", "VmHWM"))}
    with open("/proc/self/smaps_rollup") as f:
        st.update({ln.split(":")[0]: round(int(ln.split()[1]) / 1024, 1) for ln in f
                   if ln.split(":")[0] in ("Pss", "Pss_Anon", "Pss_File")})
    return st


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--old", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    from absorber.data import DEFAULT_SPEECH, speech
    from absorber.runtime import Stream
    with old_way() if a.old else contextlib.nullcontext():
        s = Stream.open(a.bundle)
    opened = status()
    ids = s.model.encode(speech(DEFAULT_SPEECH).text())[: s.cfg.n + s.cfg.m]
    t = time.perf_counter()
    r, = s.feed_tokens(ids)
    row = {"bundle": a.bundle, "way": "OLD" if a.old else "NEW", "n": s.cfg.n, "m": s.cfg.m, "k": s.cfg.k,
           "open_MiB": opened, "after_round_MiB": status(), "round_s": round(time.perf_counter() - t, 1),
           "loss_first": r.loss_first, "loss_last": r.loss_last}
    print(json.dumps(row))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
