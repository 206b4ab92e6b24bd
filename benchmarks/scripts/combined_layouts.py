"""Decode cost of the ways to put both graphs in one ONNX Runtime session (benchmarks/decode.md section 3):

    python benchmarks/scripts/combined_layouts.py BUNDLE [--cached 8,256] [--reps 7] --out F

BUNDLE: an int8/int4 bundle. From its decoder.onnx and train_step.onnx, written next to them in a scratch copy of
the bundle (hard links): `branches` (export/combined.py `combine_branches`: both graphs as the branches of one If,
the layout of 2026-12-03..05), `main` (`combine`: the decoder as the main graph, the train step inside an If, the
shipped layout) and `decoder` (decoder.onnx alone: what a separate decoder session costs). Each is opened once with
the runtime's session options and the profile's MatMulNBits accuracy levels (the default profile), in this
process; then, for each number of cached tokens, `--reps` times in turn: 20 decoder calls of one token
(`session.run`, every decoder output; the logits checked equal across layouts first), tokens/s = 1 / the median
call time. One JSON line per layout and length. Raw ONNX Runtime, without the Stream around it: what the layout
itself costs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--cached", default="8,256")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import numpy as np
    import onnx
    import onnxruntime as ort
    from safetensors.numpy import load_file

    from absorber import bundle_format as F
    from absorber.devices.machine import cpu_info
    from absorber.devices.profiles import default_profile
    from absorber.devices.session import session_kwargs
    from absorber.export.combined import combine, combine_branches
    from absorber.runtime.bundle import open_bundle
    from absorber.runtime.sessions import _with_accuracy

    src = open_bundle(a.bundle)
    work = Path(tempfile.mkdtemp(prefix="layouts-"))
    try:
        for p in Path(a.bundle).iterdir():
            os.link(p, work / p.name)
        b = open_bundle(work, verify_hashes=False)
        dec = onnx.load(str(b.graph_file("decoder")), load_external_data=False)
        train = onnx.load(str(b.graph_file("train_step")), load_external_data=False)
        stored = {t.name for t in src.stored_tensors}
        models = {"branches": combine_branches(dec, train, stored),
                  "main": combine(dec, train, stored, set(src.adapter_names))[0]}
        files = {"decoder": b.graph_file("decoder")}
        for name, mp in models.items():
            files[name] = work / f"layout_{name}.onnx"
            onnx.save(mp, str(files[name]))
        del models, dec, train
        profile = default_profile()
        adapters = load_file(str(b.adapters_path))
        sessions = {}
        for name, path in files.items():
            kw = session_kwargs(profile, "cpu", {})
            kw["sess_options"].log_severity_level = 3
            # the profile's accuracy levels, patched as the runtime does (the decoder's nodes: by graph key)
            b.manifest["graphs"]["decoder"]["file"] = path.name
            if name != "decoder":
                b.manifest["graphs"][F.COMBINED] = dict(b.manifest["graphs"][F.COMBINED], file=path.name,
                                                        branches={"branches": {"decoder": "then_branch",
                                                                               "train_step": "else_branch"},
                                                                  "main": {"decoder": F.COMBINED_MAIN,
                                                                           "train_step": "then_branch"}}[name])
            model = _with_accuracy(b, "decoder" if name == "decoder" else F.COMBINED, profile, kw["sess_options"])
            sessions[name] = ort.InferenceSession(model, **kw)
        out_names = [o["name"] for o in src.graph_io("decoder", "outputs")]
        rng = np.random.default_rng(0)
        kv, hd = src.num_kv_heads, src.head_dim
        lines = []
        for cached in (int(x) for x in a.cached.split(",")):
            past = {f"past_{w}.{i}": rng.standard_normal((1, kv, cached, hd)).astype(np.float32)
                    for i in range(src.num_layers) for w in ("key", "value")}
            feeds = {}
            for name, s in sessions.items():
                f = {}
                for i in s.get_inputs():
                    if i.name in past:
                        f[i.name] = past[i.name]
                    elif i.name in adapters:
                        f[i.name] = adapters[i.name]
                    elif i.name == F.COMBINED_SELECTOR_BRANCHES:
                        f[i.name] = np.asarray(True)
                    elif i.name == F.COMBINED_SELECTOR:
                        f[i.name] = np.asarray(False)
                    else:
                        shape = [d if isinstance(d, int) else 0 for d in i.shape]
                        f[i.name] = np.zeros(shape, {"tensor(float)": np.float32, "tensor(int64)": np.int64}[i.type])
                f[F.INPUT_IDS] = np.array([[42]], np.int64)
                f[F.POSITION_IDS] = np.array([[cached]], np.int64)
                f[F.LOGITS_TO_KEEP] = np.asarray(1, np.int64)
                feeds[name] = f
            ref = sessions["decoder"].run([F.LOGITS], feeds["decoder"])[0]
            times = {n: [] for n in sessions}
            for name, s in sessions.items():
                got = s.run([F.LOGITS], feeds[name])[0]
                if not np.array_equal(got, ref):
                    raise SystemExit(f"{name}: logits differ from decoder.onnx's by {np.abs(got - ref).max()}")
            for _ in range(a.reps):
                for name, s in sessions.items():
                    calls = []
                    for _ in range(20):
                        t = time.perf_counter()
                        s.run(out_names, feeds[name])
                        calls.append(time.perf_counter() - t)
                    times[name].append(statistics.median(calls))
            for name in sessions:
                lines.append({"bundle": a.bundle, "layout": name, "cached": cached,
                              "tok_s": round(1 / statistics.median(times[name]), 1),
                              "reps": [round(1 / t, 1) for t in times[name]]})
        isa = cpu_info()["isa"]
        with open(a.out, "a") as f:
            for ln in lines:
                f.write(json.dumps({**ln, "isa": isa}) + "\n")
                print(json.dumps(ln))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
