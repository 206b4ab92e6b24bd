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

import os
import shutil
import tempfile
from pathlib import Path

from absorber.bench import decode_calls as D


def main() -> None:
    a = D.arguments(__doc__)

    import numpy as np
    import onnx
    import onnxruntime as ort
    from safetensors.numpy import load_file

    from absorber import bundle_format as F
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
        lines = []
        for cached in (int(x) for x in a.cached.split(",")):
            # the branches layout's selector is True for the decoder, the main layout's False
            pool = {**D.random_past(src, cached, rng), **adapters, F.COMBINED_SELECTOR_BRANCHES: np.asarray(True),
                    F.COMBINED_SELECTOR: np.asarray(False)}
            feeds = {name: D.one_token_feeds(s, pool, cached) for name, s in sessions.items()}
            ref = sessions["decoder"].run([F.LOGITS], feeds["decoder"])[0]
            for name, s in sessions.items():
                got = s.run([F.LOGITS], feeds[name])[0]
                if not np.array_equal(got, ref):
                    raise SystemExit(f"{name}: logits differ from decoder.onnx's by {np.abs(got - ref).max()}")
            times = D.alternate(sessions, feeds, a.reps, {n: out_names for n in sessions})
            lines += [{"bundle": a.bundle, "layout": name, "cached": cached, **D.rates(times[name])}
                      for name in sessions]
        D.append_lines(a.out, lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
