"""RSS of two ONNX Runtime sessions over ONE synthetic MatMul weight (~200 MB), four ways of giving it to them.

The table "Weights held once" in benchmarks/runtime.md. Each mode runs in a fresh process, builds nothing itself
(the parent writes the model once: a [1, D] x [D, D] MatMul whose weight is external data in w.bin), opens two
sessions on the same .onnx file, runs each once, and reads /proc/self/smaps_rollup (Linux):

  default          ORT default: each session loads the external data itself, pre-packing on
  noprepack        the same with session.disable_prepacking=1 (ORT maps the file per session)
  external         SessionOptions.add_external_initializers with OrtValues over one memmap (ORT copies them)
  shared           add_initializer over ONE numpy.memmap of w.bin + pre-packing off (what absorber.runtime does)

    python benchmarks/scripts/runtime_share_synthetic.py [--dim 7168] [--modes default,noprepack,external,shared]
        [--json OUT.json]

Needs onnx (extra `export`) to write the model, onnxruntime and numpy to measure.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("default", "noprepack", "external", "shared")
LABELS = {
    "default": "ORT default (each session loads the external data itself, prepacking on)",
    "noprepack": "ORT default, prepacking off (ORT mmaps the file per session)",
    "external": "`add_external_initializers` / in-memory external files",
    "shared": "**`add_initializer` over one memmap + prepacking off (the runtime)**",
}


def write_model(folder: Path, d: int) -> int:
    """model.onnx + w.bin (a [d, d] float32 weight); returns d."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    w = np.random.default_rng(0).standard_normal((d, d), dtype=np.float32)
    w.tofile(folder / "w.bin")
    init = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[d, d])
    init.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", str(w.nbytes))):
        e = init.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["C"])], "mm",
                          [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, d])],
                          [helper.make_tensor_value_info("C", TensorProto.FLOAT, [1, d])], initializer=[init])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    return d


def mem() -> dict:
    """RSS, anonymous and file-backed PSS of this process in MiB (smaps_rollup)."""
    rows = dict(ln.split(":", 1) for ln in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    kb = lambda k: int(rows[k].split()[0]) / 1024   # noqa: E731
    return {"rss": round(kb("Rss")), "anon": round(kb("Pss_Anon")), "file_pss": round(kb("Pss_File"))}


def measure(folder: Path, mode: str) -> dict:
    """(child) two sessions on folder/model.onnx in `mode`, one run each; memory after."""
    import numpy as np
    import onnxruntime as ort
    d = int(np.sqrt((folder / "w.bin").stat().st_size / 4))
    before = mem()
    keep = []

    def options():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if mode != "default":
            so.add_session_config_entry("session.disable_prepacking", "1")
        return so
    if mode in ("shared", "external"):
        mm = np.memmap(folder / "w.bin", dtype=np.float32, mode="r", shape=(d, d))
        ov = ort.OrtValue.ortvalue_from_numpy(mm)
        keep += [mm, ov]
    sessions = []
    for _ in range(2):
        so = options()
        if mode == "shared":
            so.add_initializer("W", ov)
        elif mode == "external":
            so.add_external_initializers(["W"], [ov])
        sessions.append(ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"]))
    a = np.ones((1, d), np.float32)
    for s in sessions:
        s.run(None, {"A": a})
    return {"mode": mode, "weight_mib": round(d * d * 4 / 2**20), "before": before, "after": mem()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/scripts/runtime_share_synthetic.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=7168,
                    help="the weight is [dim, dim] float32 (default %(default)s: 205.5 MB = 196 MiB)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--_one", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._one:
        print(json.dumps(measure(Path(a._one[0]), a._one[1])))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = write_model(Path(tmp), a.dim)
        print(f"synthetic MatMul weight [{d}, {d}] float32 = {d * d * 4 / 2**20:.0f} MiB, two sessions, one run "
              "each; MiB from /proc/self/smaps_rollup after the runs\n")
        print("| how the two sessions get the weight | RSS | anonymous | file-backed (PSS) |")
        print("|---|---|---|---|")
        for mode in a.modes.split(","):
            r = subprocess.run([sys.executable, __file__, "--_one", tmp, mode], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"| {LABELS.get(mode, mode)} | failed: {(r.stderr.strip().splitlines() or ['?'])[-1]} |||")
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            m = row["after"]
            print(f"| {LABELS.get(mode, mode)} | {m['rss']} MiB | {m['anon']} MiB | {m['file_pss']} MiB |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if len(rows) == len(a.modes.split(",")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
