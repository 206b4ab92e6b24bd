"""Quantized execution (absorber/export/quant.py, export/gguf_source.py): every use of a quantized weight, the
GGUF carry-over, what the bundles' graphs hold, the ONNX checker, and the runtime's accuracy setting."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from absorber.export import quant as Q

RNG = np.random.default_rng(0)


def _run(nodes, inputs, out_shape, w, qw, feeds, accuracy=1):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(w, "w")])
    res = Q.apply(g, {"w": qw}, accuracy)
    assert "w" not in {t.name for t in g.initializer}
    mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0], res["counts"], g


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("use", ["linear", "linear2d", "gemm", "gather", "backward"])
def test_each_use_computes_with_the_dequantized_weight(scheme, use):
    """x @ W^T (MatMulNBits), the embedding gather and the backward's dY @ W reproduce the dequantized float
    weight; with float activations (accuracy 1) to float rounding."""
    N, K = 96, 64
    w = RNG.standard_normal((N, K)).astype(np.float32)
    qw = Q.quantize("w", w, scheme)
    deq = qw.dequantized()
    assert np.abs(deq - w).max() > 1e-3                  # really quantized
    if use in ("linear", "linear2d"):
        shape = [1, 5, K] if use == "linear" else [5, K]
        x = RNG.standard_normal(shape).astype(np.float32)
        nodes = [helper.make_node("FusedMatMul", ["X", "w"], ["Y"], domain="com.microsoft", transB=1)]
        got, counts, _ = _run(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              shape[:-1] + [N], w, qw, {"X": x})
        ref, kind = x @ deq.T, "matmul_nbits"
    elif use == "gemm":
        x = RNG.standard_normal((3, K)).astype(np.float32)
        nodes = [helper.make_node("Gemm", ["X", "w"], ["Y"], transB=1)]
        got, counts, _ = _run(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, K])], [3, N],
                              w, qw, {"X": x})
        ref, kind = x @ deq.T, "matmul_nbits"
    elif use == "gather":
        ids = np.array([[0, 3, N - 1, 7, 7]], np.int64)
        nodes = [helper.make_node("Gather", ["w", "input_ids"], ["Y"], axis=0)]
        got, counts, g = _run(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 5])],
                              [1, 5, K], w, qw, {"input_ids": ids})
        ref, kind = deq[ids], "gather"
        np.testing.assert_array_equal(got, ref)          # elementwise: bit-exact
    else:
        dy = RNG.standard_normal((5, N)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["X", "w"], ["Y"])]
        got, counts, _ = _run(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, N])], [5, K],
                              w, qw, {"X": dy})
        ref, kind = dy @ deq, "dequantize"
    assert counts[kind] == 1 and sum(counts.values()) == 1
    assert np.abs(got - ref).max() <= 2e-6 * np.abs(ref).max()


@pytest.mark.parametrize("bits,block", [(4, 32), (8, 32), (8, 16)])
def test_the_backward_dequantizes_exactly(bits, block):
    """Any use but x @ W^T and the gather reads W through GatherBlockQuantized over a uint8 view of the packed
    bytes: q * scale + minimum (4 bits), (q - 128) * scale (8 bits; Q6_K's blocks of 16 too), bit for bit."""
    N, K = 48, 64
    q = RNG.integers(0, 16 if bits == 4 else 256, (N, K)).astype(np.uint8)
    d = RNG.random((N, K // block)).astype(np.float32)
    m = RNG.standard_normal((N, K // block)).astype(np.float32) if bits == 4 else None
    qw = Q.QWeight("w", bits, block, q, d, m)
    nodes = [helper.make_node("Identity", ["w"], ["Y"])]
    got, counts, g = _run(nodes, [], [N, K], qw.dequantized(), qw, {})
    assert counts["dequantize"] == 1 and sum(counts.values()) == 1
    assert [nd.op_type for nd in g.node if nd.domain == Q.MS] == ["GatherBlockQuantized"]
    assert "DequantizeLinear" not in [nd.op_type for nd in g.node]
    np.testing.assert_array_equal(got, qw.dequantized())


def test_int8_activations_are_an_approximation():
    """accuracy_level 4 (int8 activations) is not the float product: the setting really reaches the kernel."""
    N, K = 64, 64
    w = RNG.standard_normal((N, K)).astype(np.float32)
    qw = Q.quantize("w", w, "int4")
    x = RNG.standard_normal((4, K)).astype(np.float32)
    nodes = [helper.make_node("FusedMatMul", ["X", "w"], ["Y"], domain="com.microsoft", transB=1)]
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, K])]
    exact, _, _ = _run(nodes, ins, [4, N], w, qw, {"X": x}, accuracy=1)
    approx, _, _ = _run(nodes, ins, [4, N], w, qw, {"X": x}, accuracy=4)
    ref = x @ qw.dequantized().T
    err1, err4 = np.abs(exact - ref).max(), np.abs(approx - ref).max()
    assert err4 > 10 * err1 and err4 < 0.05 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------- GGUF carry-over
def _gguf_bytes(kind: str, rows: int, cols: int) -> np.ndarray:
    """A GGUF tensor's bytes: quantized by gguf-py where it can, else random blocks with finite fp16 scales
    (every byte pattern of a K-quant block is a valid block)."""
    import gguf
    from gguf.quants import quantize
    t = getattr(gguf.GGMLQuantizationType, kind)
    w = (RNG.standard_normal((rows, cols)) * 0.1).astype(np.float32)
    try:
        return quantize(w, t)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[t]
        raw = RNG.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        fp16 = {"Q4_K": (0, 2), "Q6_K": (208,)}[kind]            # offsets of the fp16 super-block scales
        for o in fp16:
            raw[..., o:o + 2] = (RNG.standard_normal((rows, cols // block, 1)) * 1e-3).astype(np.float16) \
                .view(np.uint8).reshape(rows, cols // block, 2)
        return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0", "Q4_K", "Q8_0", "Q5_0", "Q6_K"])
def test_gguf_blocks_carry_over_exactly(kind):
    """A GGUF tensor of each carried type, parsed into the bundle's blocks, dequantizes to gguf's own values bit
    for bit, MatMulNBits' packed bytes hold those same codes, and MatMulNBits computes with them."""
    import gguf
    from gguf.quants import dequantize

    from absorber.export.gguf_source import _parse
    t = getattr(gguf.GGMLQuantizationType, kind)
    rows, cols = 12, 512                                         # two K-quant super-blocks per row
    raw = _gguf_bytes(kind, rows, cols)
    ref = dequantize(raw, t)
    assert np.isfinite(ref).all() and np.unique(ref).size > 16    # a real spread of values, not a trivial block
    q, d, m, bits, block = _parse(kind, raw, rows)
    qw = Q.QWeight("w", bits, block, q, d, m, source=f"gguf:{kind}")
    np.testing.assert_array_equal(qw.dequantized(), ref)
    packed = qw.packed()
    if bits == 4:
        unpacked = np.stack([packed & 15, packed >> 4], axis=-1).reshape(rows, cols)
    else:
        unpacked = packed.reshape(rows, cols)
    np.testing.assert_array_equal(unpacked, q)
    # the graph form (MatMulNBits + the minimum's block sums) against numpy on the same dequantized weight
    g = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, cols])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, rows])])
    g.node.extend([helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain=Q.MS, transB=1)])
    g.initializer.extend([numpy_helper.from_array(ref, "w")])
    Q.apply(g, {"w": qw}, accuracy_level=1)
    mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(Q.MS, 1)])
    x = RNG.standard_normal((3, cols)).astype(np.float32)
    y = ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x.astype(np.float64) @ ref.T.astype(np.float64)
    assert np.abs(y - want).max() <= 1e-4 * np.abs(want).max()


def test_carried_weights_from_a_gguf_file(tmp_path):
    """A GGUF file of a tiny Llama (Q4_1 layers with permuted q/k rows as llama.cpp writes them, a Q8_0
    embedding): every weight is carried over, the row order found from the values, exact."""
    import gguf
    import torch
    from gguf.quants import dequantize, quantize

    from absorber.export.gguf_source import carried_weights
    from absorber.models import tiny_llama
    model = tiny_llama(seed=1, vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    wr = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    perms = {}
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.dim() != 2:
            continue
        kind = gguf.GGMLQuantizationType.Q8_0 if "embed" in name else gguf.GGMLQuantizationType.Q4_1
        w = p.detach().numpy()
        if "q_proj" in name or "k_proj" in name:       # the file's row order differs from the model's
            perm = np.random.default_rng(len(name)).permutation(w.shape[0])
            perms[name] = perm
            w = w[perm]
        raw = quantize(w, kind)
        wr.add_tensor(tmap.get_name(name[: -len(".weight")]) + ".weight", raw, raw_shape=raw.shape, raw_dtype=kind)
        deq = dequantize(raw, kind)
        if name in perms:
            deq = deq[np.argsort(perms[name])]
        with torch.no_grad():
            p.copy_(torch.from_numpy(deq))            # what transformers holds after loading the file
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    weights, report = carried_weights(tmp_path / "m.gguf", model)
    two_d = [n for n, p in params.items() if p.dim() == 2]
    assert not report["left"], report["left"]
    assert sorted(weights) == sorted(two_d)
    assert weights["model.embed_tokens.weight"].bits == 8 and weights["lm_head.weight"].bits == 4
    for n in two_d:
        np.testing.assert_array_equal(weights[n].dequantized(), params[n].detach().numpy())
    # a tensor that does not match its file is left to requantization, with the reason
    with torch.no_grad():
        params["model.layers.0.mlp.up_proj.weight"].add_(1e-3)
    _, report = carried_weights(tmp_path / "m.gguf", model)
    assert list(report["left"]) == ["model.layers.0.mlp.up_proj.weight"]


# ------------------------------------------------------------------------------------------- the bundles
def _graphs(path):
    return {g: onnx.load(str(path / f"{g}.onnx"), load_external_data=False) for g in ("decoder", "train_step")}


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_every_graph_passes_the_onnx_checker(tiny_bundles, quant):
    files = ["decoder.onnx", "train_step.onnx"] + (["combined.onnx"] if quant != "fp32" else [])
    for f in files:
        onnx.checker.check_model(str(tiny_bundles[quant] / f))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_graphs_hold_no_float_copy_of_the_weights(tiny_bundles, quant):
    """No quantized weight exists as a float tensor in any graph: the only 2-D float initializers are the
    per-block scales and minima (32x smaller) and the block-sum selectors; the decoder dequantizes no matrix;
    every linear layer and the lm_head run MatMulNBits; only the backward dequantizes, one node at a time
    (GatherBlockQuantized over all rows, never DequantizeLinear, which ONNX Runtime runs 2.5x slower)."""
    from absorber.bundle_format import read_manifest
    b = read_manifest(tiny_bundles[quant])
    man = b.manifest["quant"]
    quantized = set(man["quantized"])
    stacks = man["fused"]                 # q/k/v and gate/up of each layer: one MatMulNBits each (test below)
    saved = sum(len(m) - 1 for m in stacks.values())
    assert stacks and saved == 3 * sum(1 for n in quantized if "down_proj" in n)
    small = {x for n in quantized | set(stacks) for x in (f"{n}.scale", f"{n}.min")}
    for gname, mp in _graphs(tiny_bundles[quant]).items():
        g = mp.graph
        floats = [t for t in g.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2]
        assert not quantized & {t.name for t in g.initializer}
        for t in floats:
            assert t.name.split(".rows")[0] in small or t.name.startswith(("blocksum.", "rotary.")), t.name
            if t.name in small:                     # [N, K/32] beside the packed [N, K/32, blob]
                base = max((n for n in quantized | set(stacks) if t.name.startswith(n + ".")), key=len)
                stack = next((k for k, ms in stacks.items() if base in ms), base)   # a member: rows of it
                bits = man["bits"][stacks[stack][0] if stack in stacks else stack]
                packed = next(s for s in b.stored_tensors if s.name == f"{stack}.q{bits}")
                assert t.dims[1] == packed.shape[1] and (t.dims[0] == packed.shape[0]) == (stack == base)
        ops = [nd.op_type for nd in g.node]
        layers = sum(1 for n in quantized if "embed" not in n and "lm_head" not in n)
        if gname == "decoder":                        # + the lm_head (the embedding's table when tied)
            assert not {"DequantizeLinear", "GatherBlockQuantized"} & set(ops)
            assert ops.count("MatMulNBits") == layers - saved + 1
        else:
            # the student on Y (the sync loss) and on X (the next-token term, with the lm_head): every linear
            # layer twice, the head once per piece of X; int8/int4 recompute the layers' forward in the
            # backward (clones), never the head
            from absorber.bundle_format import HEAD_CHUNKS
            from absorber.export.recompute import SUFFIX
            assert b.loss_ntp_weight > 0 and b.loss_head_chunks == HEAD_CHUNKS
            clones = sum(1 for nd in g.node if nd.op_type == "MatMulNBits" and SUFFIX in nd.name)
            assert b.recompute and 0 < clones <= 2 * layers
            assert ops.count("MatMulNBits") - clones == 2 * (layers - saved) + HEAD_CHUNKS
            # dX of the backward, and softmax @ W of each piece of X (the head in the other orientation), the
            # head in its 3 row pieces (test_large_contractions_dequantize_in_row_pieces)
            assert "DequantizeLinear" not in ops
            assert 0 < ops.count("GatherBlockQuantized") <= 2 * layers + 3 * HEAD_CHUNKS
            every_row = {t.name: numpy_helper.to_array(t) for t in g.initializer if t.name.startswith("q.rows.")}
            for nd in g.node:
                if nd.op_type == "GatherBlockQuantized":      # all rows of a uint8 view of the packed bytes
                    view = next(t for t in b.stored_tensors if t.name == nd.input[0])
                    assert view.dtype == "uint8" and view.alias_of
                    assert np.array_equal(every_row[nd.input[1]], np.arange(view.shape[0]))
    kinds = {t.name: t for t in b.stored_tensors}
    members = {m for ms in stacks.values() for m in ms}
    for n in (quantized - members) | set(stacks):
        q = kinds[f"{n}.q{man['bits'][stacks[n][0] if n in stacks else n]}"]
        assert q.kernel and q.dtype == "uint8"
    # the backward's [N, K] views reuse the packed bytes: no second copy in weights.bin (a fused member's: its
    # rows of the stack)
    views = [t for t in b.stored_tensors if t.alias_of and t.name.endswith(".view")]
    assert views
    for v in views:
        whole = kinds[v.alias_of]
        assert whole.offset <= v.offset and v.offset + v.length <= whole.offset + whole.length
        if v.name.rsplit(".q", 1)[0] in members:
            assert v.alias_of.rsplit(".q", 1)[0] in stacks
        else:
            assert whole.offset == v.offset
    # a member's own scale (and minimum) feed the backward's dequantization only: the runtime shares them
    assert all(not t.kernel for t in b.stored_tensors if t.alias_of and t.name.endswith(".scale"))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_linear_layers_that_share_an_input_run_as_one_kernel(scheme):
    """Three x @ W^T on one input become ONE MatMulNBits over the stacked weights and a Split, with the same
    numbers as three; the backward's dY @ W of a member dequantizes its rows of the stack (row aliases, no second
    copy of the bytes), also the same numbers."""
    K, Ns = 64, (96, 32, 32)
    ws = {f"w{i}": RNG.standard_normal((N, K)).astype(np.float32) for i, N in enumerate(Ns)}
    qws = {n: Q.quantize(n, w, scheme) for n, w in ws.items()}
    x = RNG.standard_normal((1, 5, K)).astype(np.float32)
    dy = RNG.standard_normal((5, Ns[1])).astype(np.float32)

    def graph():
        nodes = [helper.make_node("FusedMatMul", ["X", n], [f"Y{i}"], domain="com.microsoft", transB=1)
                 for i, n in enumerate(ws)]
        nodes.append(helper.make_node("MatMul", ["DY", "w1"], ["DX"]))
        outs = [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, None) for i in range(3)]
        outs.append(helper.make_tensor_value_info("DX", TensorProto.FLOAT, None))
        return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 5, K]),
                                              helper.make_tensor_value_info("DY", TensorProto.FLOAT, [5, Ns[1]])],
                                 outs, [numpy_helper.from_array(w, n) for n, w in ws.items()])

    def run(g):
        mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        return ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"X": x, "DY": dy})

    g0 = graph()
    plain = run(g0) if Q.apply(g0, qws, 1) else None
    assert Q.linear_groups(graph(), qws) == [("w0", "w1", "w2")]
    f = Q.fuse(("w0", "w1", "w2"), qws)
    g1 = graph()
    res = Q.apply(g1, qws, 1, fused={f.qw.name: f})
    fused = run(g1)
    ops = [nd.op_type for nd in g1.node]
    assert ops.count("MatMulNBits") == 1 and "Split" in ops and res["counts"]["matmul_nbits_fused"] == 1
    for a, b in zip(plain, fused):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(fused[3], dy @ qws["w1"].dequantized(), rtol=0, atol=2e-5)
    # w1's tensors are its rows of the stack, byte for byte
    own = qws["w1"].stored()
    for name, (parent, start, length) in res["row_aliases"].items():
        assert name.startswith("w1.") and parent.startswith(f.qw.name + ".")
        stack = res["stored"][parent]
        assert stack.tobytes()[start:start + length] == res["stored"][name].tobytes()
        if name in own:
            assert res["stored"][name].tobytes() == own[name].tobytes()
    assert not {n for n in res["stored"] if n.startswith(("w0.", "w2.")) and not n.startswith(f.qw.name)}


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_large_contractions_dequantize_in_row_pieces(tiny_bundles, quant):
    """softmax @ W_head (the next-token term's gradient at h, contracted over the head's rows) dequantizes the
    head one row piece at a time (quant.ROWS_BYTES; the tiny bundles are exported with 48 KB pieces, so the
    128 KB head takes 3): each piece's tensors alias a span of the stored bytes, the spans tile the whole, no
    dequantization reads the whole head, and weights.bin holds no second copy. The parity tests of the
    quantized bundles (test_runtime: rounds and the next-token term against torch) run through these pieces."""
    from absorber.bundle_format import read_manifest
    b = read_manifest(tiny_bundles[quant])
    man = b.manifest
    assert man["quant"]["uses"]["train_step.dequantize_rows"] == man["loss"]["head_chunks"]
    assert "decoder.dequantize_rows" not in man["quant"]["uses"]
    kinds = {t.name: t for t in b.stored_tensors}
    pieces = [t for t in b.stored_tensors if ".rows" in t.name]
    head = "lm_head.weight"
    bits = man["quant"]["bits"][head]
    parts = {"q": f"{head}.q{bits}", "scale": f"{head}.scale", ("zp" if bits == 8 else "min"):
             f"{head}.zp" if bits == 8 else f"{head}.min"}
    assert {t.alias_of for t in pieces} == set(parts.values())
    for parent in parts.values():
        mine = sorted((t for t in pieces if t.alias_of == parent), key=lambda t: t.offset)
        whole = kinds[parent]
        spans = [(t.offset, t.length) for t in mine]
        assert len(spans) == 3 and spans[0][0] == whole.offset
        assert all(a[0] + a[1] == c[0] for a, c in zip(spans, spans[1:]))
        assert spans[-1][0] + spans[-1][1] == whole.offset + whole.length
    g = _graphs(tiny_bundles[quant])["train_step"].graph
    whole_view = f"{head}.q{bits}.view"
    dq = [nd for nd in g.node if nd.op_type == "GatherBlockQuantized" and nd.input[0].startswith(head)]
    assert len(dq) == 3 * man["loss"]["head_chunks"] and not any(nd.input[0] == whole_view for nd in dq)


def test_runtime_shares_kernel_tensors_and_onnxruntime_still_prepacks_them(tiny_bundle_int4):
    """MatMulNBits' inputs come from the runtime's one map of weights.bin like every other stored tensor (the
    backward's dequantizations read the same bytes), with pre-packing on: the logits and a round's losses are
    those of sessions that load every tensor themselves, bit for bit, and the map's pages are out of the resident
    set after open (pre-packing read them; the decoder reads its packed copy)."""
    from absorber.runtime import Model, Stream
    m = Model.open(tiny_bundle_int4)
    kernel = m.bundle.kernel_tensors
    shared = {k.rsplit(":", 1)[-1] for k in m.sessions.shared}
    assert kernel and kernel <= shared
    assert any(n.endswith(".min") for n in shared)
    with pytest.raises(RuntimeError, match="disable_prepacking"):
        m.sessions.combined.get_session_options().get_session_config_entry("session.disable_prepacking")
    if Path("/proc/self/smaps").exists():
        weights = str(Path(tiny_bundle_int4).resolve() / "weights.bin")
        assert _resident_kb(weights) == 0
    own = Model.open(tiny_bundle_int4, share_weights=False)
    assert not own.sessions.shared
    ids = list(range(3, 40))
    a, b = Stream(m), Stream(own)
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    cfg = {"n": 32, "m": 16, "k": 3}
    ra = Stream(m, config_overrides=cfg).feed_tokens(list(range(3, 83)))
    rb = Stream(own, config_overrides=cfg).feed_tokens(list(range(3, 83)))
    assert ra and [(r.loss_first, r.loss_last) for r in ra] == [(r.loss_first, r.loss_last) for r in rb]


def _resident_kb(path: str) -> int:
    """Resident kB of this process's maps of `path` (Linux /proc/self/smaps)."""
    total, mine = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                mine = line.rstrip().endswith(path)
            elif mine and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_profile_sets_the_accuracy_level(tiny_bundle_int8, exact_profile):
    """matmul_accuracy in a device profile is patched into the graph at load: float activations reproduce the
    exact logits, int8 activations differ (slightly)."""
    from absorber.runtime import Stream
    fast = dataclasses.replace(exact_profile, matmul_accuracy={"decoder": 4, "train_step": 4})
    ids = list(range(3, 40))
    a = Stream.open(tiny_bundle_int8, profile=exact_profile).logits(ids)
    b = Stream.open(tiny_bundle_int8, profile=exact_profile).logits(ids)
    c = Stream.open(tiny_bundle_int8, profile=fast).logits(ids)
    np.testing.assert_array_equal(a, b)
    assert 0 < np.abs(c - a).max() < 0.1 * np.abs(a).max()


def test_bad_accuracy_in_a_profile_is_one_line():
    from absorber.devices.profiles import Profile
    from absorber.errors import AbsorberError
    with pytest.raises(AbsorberError, match="matmul_accuracy"):
        Profile("p", matmul_accuracy={"decoder": 7})


def test_accuracy_per_weight_bits(tiny_bundle_int4, exact_profile):
    """A "graph:bits" key reaches only the MatMulNBits nodes of that weight width: the tiny int4 bundle has no
    8-bit node, so "decoder:8" changes nothing and "decoder:4" changes the logits."""
    from absorber.runtime import Stream
    from absorber.runtime.sessions import accuracy_for
    ids = list(range(3, 40))
    exact = Stream.open(tiny_bundle_int4, profile=exact_profile).logits(ids)
    only8 = dataclasses.replace(exact_profile, matmul_accuracy={"decoder": 1, "decoder:8": 4})
    only4 = dataclasses.replace(exact_profile, matmul_accuracy={"decoder": 1, "decoder:4": 4})
    np.testing.assert_array_equal(Stream.open(tiny_bundle_int4, profile=only8).logits(ids), exact)
    assert np.abs(Stream.open(tiny_bundle_int4, profile=only4).logits(ids) - exact).max() > 0
    assert accuracy_for(only8, "decoder", 8) == 4 and accuracy_for(only8, "decoder", 4) == 1
    assert accuracy_for(only8, "train_step", 8) is None
    from absorber.devices.profiles import Profile
    from absorber.errors import AbsorberError
    with pytest.raises(AbsorberError, match="matmul_accuracy"):
        Profile("p", matmul_accuracy={"decoder:2": 4})



def test_a_quantized_bundle_says_which_onnxruntime_it_needs(tiny_bundle_int4, tiny_bundle):
    """int4/int8 bundles record the oldest onnxruntime that runs their graphs (GatherBlockQuantized with `bits`:
    1.23); an older one gets a one-line error before ONNX Runtime's graph error."""
    from absorber.errors import AbsorberError
    from absorber.runtime.bundle import open_bundle
    from absorber.runtime.sessions import check_onnxruntime
    b = open_bundle(tiny_bundle_int4)
    assert b.manifest["quant"]["onnxruntime"] == Q.ONNXRUNTIME == "1.23"
    check_onnxruntime(b)                                   # the installed one
    check_onnxruntime(b, installed="1.23.0")
    with pytest.raises(AbsorberError, match=r"needs onnxruntime >= 1\.23 \(installed: 1\.22\.1\)"):
        check_onnxruntime(b, installed="1.22.1")
    check_onnxruntime(open_bundle(tiny_bundle), installed="1.20.0")   # fp32: no requirement recorded
