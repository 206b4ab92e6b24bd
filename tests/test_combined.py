"""The combined graph of quantized bundles (export/combined.py): the decoder as the main graph and the train step
inside an If, served by ONE ONNX Runtime session, so that the integer kernels' pre-packed weights are resident
once; and the earlier layout (both graphs as the branches of one If), which bundles written before still have."""
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
    assert (b.combined_branch("decoder"), b.combined_branch("train_step")) == (F.COMBINED_MAIN, "then_branch")
    m = onnx.load(str(b.combined_file), load_external_data=False)
    dec = onnx.load(str(b.graph_file("decoder")), load_external_data=False)
    train = onnx.load(str(b.graph_file("train_step")), load_external_data=False)
    # the main graph: the decoder's nodes as they are, then one If that holds the train step
    *main, node = m.graph.node
    assert [n.name for n in main] == [n.name for n in dec.graph.node]
    assert node.op_type == "If" and list(node.input) == [F.COMBINED_SELECTOR]
    branches = {a.name: a.g for a in node.attribute}
    then, other = branches["then_branch"], branches["else_branch"]
    assert then.name == "train_step" and len(then.node) == len(train.graph.node)
    assert all(n.op_type == "Constant" for n in other.node) and len(other.node) == len(train.graph.output)
    # the frozen weights are the main graph's, read by the branch from the outer scope; none inside it
    stored = {t.name for t in b.stored_tensors}
    assert stored <= {t.name for t in m.graph.initializer}
    assert not {t.name for t in then.initializer} & stored
    # the graphs share the adapters and nothing else among their inputs: the train step's tokens are renamed
    renamed = b.combined_renamed("train_step")
    assert set(renamed) == {"input_ids", "position_ids"} and b.combined_renamed("decoder") == {}
    declared = {i["name"] for i in b.graph_io("decoder", "inputs")} | \
        {renamed.get(i["name"], i["name"]) for i in b.graph_io("train_step", "inputs")}
    assert {i.name for i in m.graph.input} == declared | {F.COMBINED_SELECTOR}
    assert [o.name for o in m.graph.output] == [o["name"] for o in b.graph_io("decoder", "outputs")] + \
        [o["name"] for o in b.graph_io("train_step", "outputs")]
    assert open_bundle(tiny_bundles["fp32"]).combined_file is None


@pytest.fixture(scope="module")
def branches_bundle(tiny_bundle_int4, tmp_path_factory):
    """The tiny int4 bundle with combined.onnx in the layout of the bundles of 2026-12-03..05 (both graphs as
    the two branches of one If, selector graph_is_decoder), as such a bundle's manifest describes it."""
    import json
    import shutil

    from absorber.export.combined import BRANCH_OF_BRANCHES, combine_branches

    out = tmp_path_factory.mktemp("branches") / "int4"
    shutil.copytree(tiny_bundle_int4, out)
    b = open_bundle(out)
    dec = onnx.load(str(b.graph_file("decoder")), load_external_data=False)
    train = onnx.load(str(b.graph_file("train_step")), load_external_data=False)
    onnx.save(combine_branches(dec, train, {t.name for t in b.stored_tensors}), str(b.combined_file))
    man = json.loads((out / "manifest.json").read_text())
    c = man["graphs"][F.COMBINED]
    c.pop("renamed")
    c.update(selector=F.COMBINED_SELECTOR_BRANCHES, branches=dict(BRANCH_OF_BRANCHES))
    man["files"][F.COMBINED_FILE] = F.sha256_file(b.combined_file)
    (out / "manifest.json").write_text(json.dumps(man, indent=1))
    return out


def test_bundles_in_the_earlier_layout_run_the_same(tiny_bundle_int4, branches_bundle, rng_ids):
    """A bundle whose combined.onnx has both graphs as If branches loads and gives this layout's numbers."""
    old, new = Model.open(branches_bundle), Model.open(tiny_bundle_int4)
    m = onnx.load(str(old.bundle.combined_file), load_external_data=False)
    assert [n.op_type for n in m.graph.node] == ["If"]
    ids = rng_ids(24)
    np.testing.assert_array_equal(Stream(old).logits(ids), Stream(new).logits(ids))
    toks = rng_ids(32 * 2 + 16, seed=3)
    runs = [list(Stream(model).feed_tokens(toks)) for model in (old, new)]
    assert [r.loss_last for r in runs[0]] == [r.loss_last for r in runs[1]] and len(runs[0]) >= 1


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


def test_the_profile_sets_accuracy_per_branch(tiny_bundle_int4, branches_bundle):
    """A profile's MatMulNBits accuracy_level reaches each branch of the combined graph by its graph's key."""
    from absorber.devices.profiles import default_profile
    from absorber.runtime.sessions import _with_accuracy
    import dataclasses
    import onnxruntime as ort

    prof = dataclasses.replace(default_profile(), matmul_accuracy={"decoder": 0, "train_step": 2})
    # this layout: the decoder's nodes in the main graph, the train step's in the If's branch named after it
    data = _with_accuracy(open_bundle(tiny_bundle_int4), F.COMBINED, prof, ort.SessionOptions())
    assert isinstance(data, bytes)
    for g, want in ((None, 0), ("train_step", 2)):
        levels = {n["accuracy_level"][1] for n in node_int_attributes(data, "MatMulNBits", g)}
        assert levels == {want}, (g, levels)
    assert node_int_attributes(data, "MatMulNBits", "decoder") == []
    # the earlier layout: both graphs in branches named after them, nothing at the top level
    data = _with_accuracy(open_bundle(branches_bundle), F.COMBINED, prof, ort.SessionOptions())
    for g, want in (("decoder", 0), ("train_step", 2)):
        levels = {n["accuracy_level"][1] for n in node_int_attributes(data, "MatMulNBits", g)}
        assert levels == {want}, (g, levels)
    assert node_int_attributes(data, "MatMulNBits") == []
