"""The combined graph of quantized bundles (export/combined.py): both graphs as the branches of one If, served
by ONE ONNX Runtime session, so that the integer kernels' pre-packed weights are resident once."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from absorber import bundle_format as F
from absorber.runtime import Model, Stream
from absorber.runtime.bundle import open_bundle
from absorber.runtime.protoscan import node_int_attributes


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_bundles_combine_their_graphs_and_fp32_does_not(tiny_bundles, quant):
    b = open_bundle(tiny_bundles[quant])
    assert b.combined_file is not None and b.combined_file.name == F.COMBINED_FILE
    m = onnx.load(str(b.combined_file), load_external_data=False)
    (node,) = m.graph.node
    assert node.op_type == "If" and list(node.input) == [F.COMBINED_SELECTOR]
    branches = {a.name: a.g for a in node.attribute}
    assert {branches["then_branch"].name, branches["else_branch"].name} == {"decoder", "train_step"}
    # the frozen weights are the outer graph's, shared by both branches; nothing of them inside a branch
    outer = {t.name for t in m.graph.initializer}
    stored = {t.name for t in b.stored_tensors}
    assert outer == stored
    for g in branches.values():
        assert not {t.name for t in g.initializer} & stored
    # one node per original node of each graph, plus a placeholder per output of the other graph
    for gname, g in (("decoder", branches["then_branch"]), ("train_step", branches["else_branch"])):
        src = onnx.load(str(b.graph_file(gname)), load_external_data=False)
        other = "train_step" if gname == "decoder" else "decoder"
        assert len(g.node) == len(src.graph.node) + len(b.graph_io(other, "outputs"))
        assert [o.name for o in m.graph.output] == [o["name"] for o in b.graph_io("decoder", "outputs")] + \
            [o["name"] for o in b.graph_io("train_step", "outputs")]
    assert open_bundle(tiny_bundles["fp32"]).combined_file is None


def test_one_session_serves_both_graphs_with_the_same_results(tiny_bundle_int4, rng_ids):
    """Decoder logits, a whole round's losses and adapters: the combined session = two separate sessions."""
    one = Model.open(tiny_bundle_int4)
    two = Model.open(tiny_bundle_int4, combined=False)
    assert one.sessions.combined is not None and two.sessions.combined is None
    assert one.decoder._session is one.train_step._session is one.sessions.combined
    ids = rng_ids(24)
    np.testing.assert_array_equal(Stream(one).logits(ids), Stream(two).logits(ids))
    toks = rng_ids(32 * 2 + 16, seed=3)
    runs = []
    for model in (one, two):
        s = Stream(model)
        res = list(s.feed_tokens(toks))
        runs.append((res, s.adapters()))
    (r1, a1), (r2, a2) = runs
    assert [r.loss_first for r in r1] == [r.loss_first for r in r2] and len(r1) >= 1
    assert [r.loss_last for r in r1] == [r.loss_last for r in r2]
    for n in a1:
        np.testing.assert_array_equal(a1[n], a2[n])


def test_the_profile_sets_accuracy_per_branch(tiny_bundle_int4):
    """A profile's MatMulNBits accuracy_level reaches each branch of the combined graph by its graph's key."""
    from absorber.devices.profiles import default_profile
    from absorber.runtime.sessions import _with_accuracy
    import dataclasses
    import onnxruntime as ort

    b = open_bundle(tiny_bundle_int4)
    prof = dataclasses.replace(default_profile(), matmul_accuracy={"decoder": 0, "train_step": 2})
    data = _with_accuracy(b, F.COMBINED, prof, ort.SessionOptions())
    assert isinstance(data, bytes)
    for g, want in (("decoder", 0), ("train_step", 2)):
        levels = {n["accuracy_level"][1] for n in node_int_attributes(data, "MatMulNBits", g)}
        assert levels == {want}, (g, levels)
    assert node_int_attributes(data, "MatMulNBits") == []     # none at the top level: all in the branches
