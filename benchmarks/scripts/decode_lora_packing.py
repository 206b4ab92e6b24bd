"""What packing the adapters gains the decoder, in raw ONNX Runtime (benchmarks/decode.md section 4):

    python benchmarks/scripts/decode_lora_packing.py BUNDLE [--cached 8,256] [--reps 7] --out F

BUNDLE: an int8/int4 bundle exported before the packing (its decoder runs each layer's q/k/v and gate/up as one
MatMulNBits, export/quant.py Fused, with one LoRA path per layer). The variant is its decoder.onnx rewritten by
export/lora_packing.py (each stack's LoRA paths as x @ A_pack @ B_pack before the Split), fed with
runtime/packing.py. Both decoders are opened alone (a decoder session each, the profile's accuracy
levels), the logits compared, then timed as combined_layouts.py does: --reps times in turn, 20 one-token calls
each, tokens/s = 1 / the median call.
"""
from __future__ import annotations

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
    from absorber.export.lora_packing import pack_lora_paths
    from absorber.runtime.bundle import open_bundle
    from absorber.runtime.packing import decoder_adapters
    from absorber.runtime.sessions import accuracy_for

    b = open_bundle(a.bundle)
    profile = default_profile()
    work = Path(tempfile.mkdtemp(prefix="lora-packing-"))
    try:
        files, recipe = {}, {}
        for name in ("bundle", "packed"):
            mp = onnx.load(str(b.graph_file("decoder")))
            for nd in mp.graph.node:       # the profile's accuracy levels, as the runtime patches them
                if nd.op_type == "MatMulNBits":
                    at = {x.name: x for x in nd.attribute}
                    want = accuracy_for(profile, "decoder", at["bits"].i)
                    if want is not None:
                        at["accuracy_level"].i = want
            if name == "packed":
                if b.packed_adapters:
                    raise SystemExit(f"{a.bundle}: its decoder already takes packed adapters")
                recipe = pack_lora_paths(mp.graph, {t.name: t.shape for t in b.adapters})
            files[name] = work / f"{name}.onnx"
            onnx.save(mp, str(files[name]), save_as_external_data=True, location=f"{name}.bin",
                      all_tensors_to_one_file=True)
            del mp
        sessions = {}
        for name, p in files.items():
            kw = session_kwargs(profile, "cpu", {})
            kw["sess_options"].log_severity_level = 3
            sessions[name] = ort.InferenceSession(str(p), **kw)
        rng = np.random.default_rng(0)
        adapters = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)  # nonzero B: a real path
                    for k, v in load_file(str(b.adapters_path)).items()}
        lines = []
        for cached in (int(x) for x in a.cached.split(",")):
            pool = {**D.random_past(b, cached, rng), **adapters, **decoder_adapters(recipe, adapters)}
            feeds = {name: D.one_token_feeds(s, pool, cached) for name, s in sessions.items()}
            ref, got = (sessions[n].run([F.LOGITS], feeds[n])[0] for n in ("bundle", "packed"))
            times = D.alternate(sessions, feeds, a.reps)
            lines += [{"bundle": a.bundle, "decoder": name, "cached": cached,
                       "max_abs_logit_diff": float(np.abs(ref - got).max()), "nodes_packed": len(recipe),
                       **D.rates(times[name])} for name in sessions]
        D.append_lines(a.out, lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
