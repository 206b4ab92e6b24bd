"""The torch-free runtime (absorber.runtime) against the PyTorch reference, on a tiny exported bundle.

The bundle is exported once per test session (a few minutes on 2 busy cores; set ABSORBER_TEST_BUNDLE to an
existing tiny bundle folder exported with the same settings to skip that while iterating).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from absorber.config import AbsorberConfig  # noqa: E402
from absorber.errors import AbsorberError  # noqa: E402

CFG = AbsorberConfig(n=32, m=16, k=4)
# the bundles a module exports beside the session's (bpe here, bos in test_bos_runtime) trace a 2-layer tiny Llama:
# a trace's cost grows with the layers (45-90 s on 2 cores at 4), and what they test is not per layer;
# _ref_model rebuilds the reference at a bundle's own depth
EXTRA_LAYERS = 2
ROOT = Path(__file__).resolve().parents[1]
# Relative Frobenius error of ALL adapters (one flat vector) after whole rounds vs torch. Typical data gives
# ~1e-7; the L1 loss's sign(student - teacher) and Adam's normalization can amplify float32 noise when an
# element of the difference sits at zero (one of 5 random id sequences tried gave 1.4e-4 after one round).
TOL = 1e-4


@pytest.fixture(scope="session")
def bundle(tiny_bundle) -> Path:
    """The session's tiny bundle (tests/conftest.py), exported with CFG."""
    return tiny_bundle


@pytest.fixture(params=["fp32", "int8", "int4"])
def any_bundle(request) -> Path:
    """The session's tiny bundle as fp32, int8 and int4 (the same trace; tests/conftest.py)."""
    return request.getfixturevalue({"fp32": "tiny_bundle", "int8": "tiny_bundle_int8",
                                    "int4": "tiny_bundle_int4"}[request.param])


WORDS = "the quick brown fox jumps over a lazy dog while Alice and Bob argue about the budget".split()
X_RUN = 1024     # the BPE tokenizer below has one token for 1024 x's


def _bpe_tokenizer():
    """A byte-level BPE tokenizer WITH merges, as the transformers fast tokenizer the exporter takes: trained on
    lines of WORDS (every word becomes one token, with its leading space), plus merges that double runs of "x" up
    to X_RUN characters (so that a 10 MiB line is ~10k tokens, not 10M). ids 0-2 specials, then the 256 bytes."""
    import json as _json
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>"]
    rnd = random.Random(1)
    corpus = [" ".join(rnd.choice(WORDS) for _ in range(10)) for _ in range(300)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    d = _json.loads(tk.to_str())
    vocab, merges = d["model"]["vocab"], d["model"]["merges"]
    run = 1
    while run < X_RUN:
        assert "x" * 2 * run not in vocab
        merges.append(["x" * run, "x" * run])
        run *= 2
        vocab["x" * run] = len(vocab)
    tk = Tokenizer.from_str(_json.dumps(d))
    assert tk.get_vocab_size() <= 512 and len(merges) > 50
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def bpe_bundle(tmp_path_factory) -> Path:
    """The tiny Llama of the session's bundle (EXTRA_LAYERS deep) with _bpe_tokenizer() (merges), exported with sync_skip=0 and
    without the next-token term (ntp_weight 0, the sync loss alone; not the defaults: the session bundle has 1
    and 1). One export serves the sync_skip=0 / sync-only parity, the resume with a cut inside a word, and the
    10 MiB line. ABSORBER_TEST_BPE_BUNDLE may name an existing one while iterating."""
    pre = os.environ.get("ABSORBER_TEST_BPE_BUNDLE")
    if pre and (Path(pre) / "manifest.json").is_file():
        return Path(pre)
    from absorber.export import export_bundle
    from absorber.models import tiny_llama
    cfg = AbsorberConfig(n=32, m=16, k=4, sync_skip=0, ntp_weight=0.0, lr=1e-3)
    out = tmp_path_factory.mktemp("bpe") / "tiny-bpe"
    return Path(export_bundle(tiny_llama(seed=0, vocab=512, layers=EXTRA_LAYERS), _bpe_tokenizer(), out, cfg=cfg))


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _ref_model(bundle: Path, dequantize: bool = True):
    """The torch reference with the bundle's initial adapters. For a quantized bundle the frozen weights that its
    manifest lists as quantized hold their dequantized values (absorber.export.quant: what the graphs'
    DequantizeLinear computes); dequantize=False keeps the float weights (to show that this matters)."""
    from safetensors.numpy import load_file

    from absorber import lora
    from absorber.export import quant as Q
    from absorber.models import tiny_llama
    from absorber.bundle_format import read_manifest
    b = read_manifest(bundle)
    man, cfg = b.manifest, b.defaults()
    model = tiny_llama(seed=0, vocab=512, layers=int(man["model"]["num_layers"]))
    lora.inject(model, cfg.lora)
    quantized = set(man["quant"].get("quantized", []))
    assert (man["quant"]["scheme"] == "fp32") == (not quantized)
    if quantized and dequantize:
        params = dict(model.named_parameters())
        assert quantized <= set(params), quantized - set(params)
        with torch.no_grad():
            for n in sorted(quantized):
                p = params[n]
                p.copy_(torch.from_numpy(Q.quantize(n, p.numpy(), man["quant"]["scheme"]).dequantized()))
    lora.load_state(model, {k: torch.from_numpy(v) for k, v in load_file(str(bundle / "adapters.safetensors")).items()})
    return model, cfg


def _scheme(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["quant"]["scheme"]


def _ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=g).tolist()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _flat(tensors: dict, names) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[n], np.float32).ravel() for n in names])


def _assert_same_adapters(model, stream, tol: float = TOL) -> None:
    """stream.adapters() == the reference model's adapters: all of them as one flat vector, relative error < tol."""
    from absorber import lora
    snap = {n: t.numpy() for n, t in lora.snapshot(model).items()}
    got = stream.adapters()
    assert sorted(got) == sorted(snap)
    assert _rel(_flat(got, sorted(got)), _flat(snap, sorted(got))) < tol


def _assert_same_rounds(ref_rounds, rt_rounds, model, stream) -> None:
    """Reference and runtime rounds report the same losses and end with the same adapters (TOL)."""
    assert len(ref_rounds) == len(rt_rounds) > 0
    for a, b in zip(ref_rounds, rt_rounds):
        assert b.steps == a.steps
        assert b.loss_first == pytest.approx(a.loss_first, rel=1e-4)
        assert b.loss_last == pytest.approx(a.loss_last, rel=1e-4)
    _assert_same_adapters(model, stream)


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "absorber", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, **kw)


# ----------------------------------------------------------------------------------------------- optimizer
def test_numpy_adamw_and_clip_match_torch():
    from absorber.runtime.optim import FlatAdamW
    rng = np.random.default_rng(0)
    shapes = [("a", (7, 3)), ("b", (3, 5)), ("c", (11,))]
    opt = FlatAdamW(shapes, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt.params[:] = rng.standard_normal(opt.size).astype(np.float32)
    tp = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in opt.views(opt.params).values()]
    topt = torch.optim.AdamW(tp, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(30):
        g = (rng.standard_normal(opt.size) * (5 if step % 3 else 0.01)).astype(np.float32)
        opt.grads[:] = g
        for p, v in zip(tp, opt.views(g).values()):
            p.grad = torch.from_numpy(v.copy())
        tn = torch.nn.utils.clip_grad_norm_(tp, 1.0)
        n = opt.clip(1.0)
        assert abs(n - float(tn)) <= 1e-5 * float(tn)
        topt.step()
        opt.apply()
    for p, v in zip(tp, opt.views(opt.params).values()):
        np.testing.assert_allclose(v, p.detach().numpy(), rtol=1e-5, atol=1e-6)
    st = topt.state[tp[0]]
    np.testing.assert_allclose(opt.views(opt.exp_avg_sq)["a"], st["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9)
    assert opt.step == int(st["step"])


# ----------------------------------------------------------------------------------------------- vs torch
def test_logits_match_torch(any_bundle, exact_profile):
    """Open a bundle (fp32, int8, int4) and compare its logits with the reference (dequantized weights for
    int8/int4: MatMulNBits with float activations, the quantized embedding gather, the quantized lm_head)."""
    from absorber.runtime import Stream
    model, _ = _ref_model(any_bundle)
    ids = _ids(40)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    s = Stream.open(any_bundle, profile=exact_profile)
    assert s.rounds == 0 and not s.resumed and s.cfg.n == CFG.n
    got = s.logits(ids)
    assert got.shape == ref.shape
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(got - ref).max() < 1e-4 * scale
    if _scheme(any_bundle) != "fp32":
        # the quantized graphs really run quantized weights: the float model is far off
        with torch.no_grad():
            plain = _ref_model(any_bundle, dequantize=False)[0](input_ids=torch.tensor([ids])).logits[0].numpy()
        assert np.abs(got - plain).max() > 1e-2 * scale


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_packed_adapters_answer_as_torch(tiny_bundles, exact_profile, quant):
    """The quantized decoders take each stack's adapters packed (export/lora_packing.py: A side by side, B on a
    block diagonal, built by the runtime from the stream's own): with nonzero adapters the logits and a greedy
    answer equal the torch reference holding the same adapters."""
    from absorber import lora
    from absorber.runtime import Stream
    bundle = tiny_bundles[quant]
    s = Stream.open(bundle, profile=exact_profile)
    packed = s.model.packed_adapters
    layers = s.model.bundle.num_layers
    assert len(packed) == 4 * layers            # q/k/v and gate/up of every layer: an A and a B each
    members = {a for p in packed.values() for a, _ in p["parts"]}
    dec_inputs = {i.name for i in s.model.decoder.get_inputs()}
    assert set(packed) <= dec_inputs and not members & dec_inputs
    rng = np.random.default_rng(7)
    for n, v in s.param_views.items():
        v[...] = rng.standard_normal(v.shape).astype(np.float32) * 0.05
    model, _ = _ref_model(bundle)
    lora.load_state(model, {n: torch.from_numpy(v.copy()) for n, v in s.param_views.items()})
    ids = _ids(30, seed=3)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, 30, dtype=torch.long),
                             max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    plain = s.logits(ids)
    assert np.abs(plain - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    with torch.no_grad():        # the adapters matter: without them the logits are far off
        lora.load_state(model, {n: torch.zeros_like(torch.from_numpy(v)) if n.endswith("lora_B") else
                                torch.from_numpy(v.copy()) for n, v in s.param_views.items()})
        base = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    assert np.abs(plain - base).max() > 1e-2 * max(1.0, np.abs(ref).max())
    assert s.generate_ids(ids, 6, stop_at_eos=False) == out[0, 30:].tolist()


def test_teacher_through_the_kv_cache_equals_one_pass(any_bundle, exact_profile):
    """The teacher pass reads X into the KV cache and then Y (hidden_states_after): Y's states equal those of
    one pass over X.Y, to float rounding."""
    from absorber.runtime import Stream
    from absorber.runtime import generate as G
    s = Stream.open(any_bundle, profile=exact_profile)
    x, y = _ids(23), _ids(11)[::-1]
    one = G.hidden_states(s.model, x + y, s.param_views)[:, len(x):]
    two = G.hidden_states_after(s.model, x, y, s.param_views)
    assert two.shape == one.shape and np.abs(one).max() > 0
    assert np.abs(two - one).max() <= 1e-5 * np.abs(one).max()
    assert np.array_equal(G.hidden_states_after(s.model, [], y, s.param_views),
                          G.hidden_states(s.model, y, s.param_views))


@pytest.mark.parametrize("rounds", [1, 3])
def test_rounds_match_reference(any_bundle, rounds, exact_profile):
    """Rounds on fp32/int8/int4 bundles: the reference's losses and adapters (quantized: on the dequantized
    weights; the backward's dX = dY @ W dequantizes each weight for its own node)."""
    from absorber import lora
    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    model, cfg = _ref_model(any_bundle)
    ids = _ids(cfg.n * rounds + cfg.m + 5, seed=0)
    ref = StreamingAbsorber(model, None, cfg)
    rr = ref.feed_tokens(ids)
    s = Stream.open(any_bundle, profile=exact_profile)
    ro = s.feed_tokens(ids)
    assert len(rr) == len(ro) == rounds == s.rounds
    for a, b in zip(rr, ro):
        assert a.steps == b.steps == cfg.k
        assert b.loss_first == pytest.approx(a.loss_first, rel=1e-4)
        assert b.loss_last == pytest.approx(a.loss_last, rel=1e-4)
        assert b.tokens_absorbed == a.tokens_absorbed
    _assert_same_adapters(model, s)                        # measured ~2e-7 (1 and 3 rounds)
    snap = lora.snapshot(model)
    worst = max(_rel(v, snap[n].numpy()) for n, v in s.adapters().items())
    assert worst < 10 * TOL, worst                         # measured ~2e-5 (smallest tensors)
    assert s.window == ref.window and s.tokens_seen == ref.tokens_seen
    # the optimizer state persists across rounds like torch's
    assert s.stats()["optimizer_step"] == rounds * cfg.k


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_read_scale_answers_as_the_reference(tiny_bundles, exact_profile, quant):
    """read_scale: after the same rounds, the runtime's logits and greedy answer read the adapters at the scale as
    the reference does (absorber.lora.read_scaled in StreamingAbsorber.reading), training is untouched (the same
    losses), and 0 reads the base model."""
    import dataclasses

    from absorber import lora
    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    bundle = tiny_bundles[quant]
    model, cfg = _ref_model(bundle)
    cfg = dataclasses.replace(cfg, read_scale=0.5, lr=1e-2)
    ids = _ids(cfg.n * 2 + cfg.m + 5, seed=0)
    ref = StreamingAbsorber(model, None, cfg)
    rr = ref.feed_tokens(ids)
    s = Stream.open(bundle, profile=exact_profile, config_overrides={"read_scale": 0.5, "lr": 1e-2})
    ro = s.feed_tokens(ids)
    assert [r.loss_last for r in ro] == pytest.approx([r.loss_last for r in rr], rel=1e-4)
    # the reading is what is compared: the reference holds the runtime's adapters (training parity: above)
    lora.load_state(model, {n: torch.from_numpy(v) for n, v in s.adapters().items()})
    q = _ids(20, seed=4)
    with torch.no_grad(), ref.reading():
        want = model(input_ids=torch.tensor([q]), use_cache=False).logits[0].numpy()
    with torch.no_grad():
        whole = model(input_ids=torch.tensor([q]), use_cache=False).logits[0].numpy()
    got = s.logits(q)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(got - whole).max() > 1e-3 * max(1.0, np.abs(whole).max())    # the scale matters here
    assert s.generate_ids(q, 6, stop_at_eos=False) == ref._greedy(q, 6)
    s.cfg.read_scale = 0.0
    with torch.no_grad(), lora.disabled(model):
        base = model(input_ids=torch.tensor([q]), use_cache=False).logits[0].numpy()
    assert np.abs(s.logits(q) - base).max() < 1e-4 * max(1.0, np.abs(base).max())


@pytest.mark.parametrize("over", [{"teacher": "current"}, {"reset": "moments", "decay": 0.2}, {"reset": "adapters"}])
def test_anti_drift_options_match_reference(bundle, over):
    """teacher, reset and decay are run-time options: the runtime applies them as absorber.absorb does.
    teacher="base" is the bundle's default (test_rounds_match_reference); "current" is the override here."""
    import dataclasses

    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    model, cfg = _ref_model(bundle)
    cfg = dataclasses.replace(cfg, **over)
    ids = _ids(cfg.n * 3 + cfg.m + 5, seed=0)   # seed 3 shows the L1 sign amplification of TOL's comment
    ref = StreamingAbsorber(model, None, cfg)
    rr = ref.feed_tokens(ids)
    s = Stream.open(bundle, config_overrides=over)
    assert CFG.teacher == "base" and s.cfg.teacher == over.get("teacher", "base")
    ro = s.feed_tokens(ids)
    _assert_same_rounds(rr, ro, model, s)
    assert s.stats()["optimizer_step"] == (3 * cfg.k if over.get("reset", "none") == "none" else cfg.k)


def test_sync_skip_is_fixed_by_the_bundle(bundle, bpe_bundle):
    from absorber.runtime import Stream
    exported = json.loads((bundle / "manifest.json").read_text())["loss"]["skip"]
    assert exported == CFG.sync_skip == 1                       # the default, compiled into train_step.onnx
    with pytest.raises(AbsorberError, match="sync_skip"):
        Stream.open(bundle, config_overrides={"sync_skip": 0})
    assert Stream.open(bundle).cfg.sync_skip == exported
    assert json.loads((bpe_bundle / "manifest.json").read_text())["loss"]["skip"] == 0
    with pytest.raises(AbsorberError, match="sync_skip"):
        Stream.open(bpe_bundle, config_overrides={"sync_skip": 1})
    assert Stream.open(bpe_bundle).cfg.sync_skip == 0


def test_exported_sync_skip0_matches_reference(bpe_bundle):
    """A bundle exported with sync_skip=0 (not the default) computes the reference loss over all of Y."""
    import dataclasses

    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    model, bcfg = _ref_model(bpe_bundle)
    assert bcfg.sync_skip == 0
    ids = _ids(bcfg.n * 2 + bcfg.m + 1, seed=4)
    rr = StreamingAbsorber(model, None, bcfg).feed_tokens(ids)
    s = Stream.open(bpe_bundle)
    ro = s.feed_tokens(ids)
    assert len(ro) == 2
    _assert_same_rounds(rr, ro, model, s)
    # and it differs from the default loss without Y's first position (the option is not a no-op)
    skip1 = StreamingAbsorber(_ref_model(bpe_bundle)[0], None, dataclasses.replace(bcfg, sync_skip=1))
    assert skip1.feed_tokens(ids)[0].loss_first != pytest.approx(rr[0].loss_first, rel=1e-3)


def test_next_token_term_is_compiled_into_the_train_step(bundle, bpe_bundle):
    """The default bundle's train step carries ntp_weight x the next-token loss of the student on X (manifest
    loss.ntp_weight, input x_ids); the runtime round equals the reference's with the term (test_rounds_match_
    reference), the term is no no-op, and ntp_weight is fixed by the bundle like sync_skip."""
    import dataclasses

    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["loss"]["ntp_weight"] == CFG.ntp_weight == 1.0
    assert "x_ids" in {i["name"] for i in man["graphs"]["train_step"]["inputs"]}
    assert "ntp_weight" not in json.loads((bpe_bundle / "manifest.json").read_text())["loss"]
    assert "x_ids" not in {i.name for i in Stream.open(bpe_bundle).train.get_inputs()}
    with pytest.raises(AbsorberError, match="ntp_weight"):
        Stream.open(bundle, config_overrides={"ntp_weight": 0.0})
    with pytest.raises(AbsorberError, match="ntp_weight"):
        Stream.open(bpe_bundle, config_overrides={"ntp_weight": 1.0})
    assert Stream.open(bundle, config_overrides={"ntp_weight": 1.0}).cfg.ntp_weight == 1.0
    model, cfg = _ref_model(bundle)
    ids = _ids(cfg.n * 2 + cfg.m + 3, seed=5)
    s = Stream.open(bundle)
    ro = s.feed_tokens(ids)
    rr = StreamingAbsorber(model, None, cfg).feed_tokens(ids)
    _assert_same_rounds(rr, ro, model, s)
    # the reported loss includes the term: without it (same adapters, same text) the loss is the sync part alone
    sync_only = StreamingAbsorber(_ref_model(bundle)[0], None, dataclasses.replace(cfg, ntp_weight=0.0))
    r0 = sync_only.feed_tokens(ids)
    assert ro[0].loss_first - r0[0].loss_first > 1.0      # ~ln(vocab) of a random model


def test_next_token_term_needs_every_token_of_x(tiny_tok):
    """ntp_top < 1 (score only X's most surprising tokens) stays a reference option: the export refuses it."""
    from absorber.export import export_bundle
    from absorber.models import tiny_llama
    with pytest.raises(AbsorberError, match="ntp_top"):
        export_bundle(tiny_llama(seed=0, vocab=512), tiny_tok, "/nonexistent/never-written",
                      cfg=AbsorberConfig(n=32, m=16, k=4, ntp_top=0.5))


def test_answer_is_greedy_continuation(bundle):
    from absorber.runtime import Stream
    model, cfg = _ref_model(bundle)
    s = Stream.open(bundle)
    ids = _ids(20, seed=5)
    s.feed_tokens(ids)
    got = s.generate_ids(s.window, 6, stop_at_eos=False)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, 20, dtype=torch.long),
                             max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == out[0, 20:].tolist()
    assert isinstance(s.ask("hello", max_new_tokens=4), str)
    assert isinstance(s.ask("hello", max_new_tokens=4, temperature=0.8, top_p=0.9, seed=1), str)


def test_nan_rollback(bundle):
    """A non-finite loss undoes the last step and ends the round (Absorption.round semantics)."""
    from absorber.runtime import Stream
    s = Stream.open(bundle, config_overrides={"k": 4})
    real = s.train.run_with_iobinding
    calls = {"n": 0}
    before = {}

    def poisoned(io, *run_options):
        calls["n"] += 1
        real(io, *run_options)
        if calls["n"] == 2:
            before.update(params=s.opt.params.copy(), step=s.opt.step)
        if calls["n"] == 3:
            s._loss_buf[...] = np.nan
    s.train.run_with_iobinding = poisoned
    with pytest.warns(RuntimeWarning, match="rolled back"):
        (r,) = s.feed_tokens(_ids(CFG.n + CFG.m))
    assert r.rolled_back and r.steps == 1 and s.rollbacks == 1
    # params/moments are those before step 2 (the step that produced the NaN loss)
    np.testing.assert_array_equal(s.opt.params, before["params"])
    assert s.opt.step == before["step"] == 1


# ----------------------------------------------------------------------------------------------- no torch
def test_runtime_never_imports_torch(any_bundle, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        BLOCK = ("torch", "transformers", "optimum", "onnx", "onnxscript")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCK:
                    raise ImportError("blocked: " + name)
                return None
        sys.meta_path.insert(0, Block())
        import absorber.runtime
        from absorber.runtime import Stream
        s = Stream.open({str(any_bundle)!r}, state_dir={str(tmp_path / 'st')!r})
        s.feed("hello world, " * 30)
        print(repr(s.ask("hello", max_new_tokens=4)))
        s.save()
        bad = [m for m in sys.modules if m.split(".")[0] in BLOCK]
        assert not bad, bad
        print("OK", s.stats()["rounds"])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK" in r.stdout and int(r.stdout.split("OK")[1]) >= 1


# ----------------------------------------------------------------------------------------------- state
def _text(lines: int = 120) -> str:
    import random
    rnd = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while Alice and Bob argue about the budget".split()
    return "".join(" ".join(rnd.choice(words) for _ in range(10)) + "\n" for _ in range(lines))


def _cut_inside_a_word(text: str, enc) -> int:
    """A cut near the middle, inside a word, where the first part leaves tokens pending after its last round
    (so that the state must carry them)."""
    cut = len(text) // 2
    while not (text[cut - 1].isalpha() and text[cut].isalpha() and text[cut + 1].isalpha()
               and (len(enc(text[:cut])) - CFG.m) % CFG.n):
        cut += 1
    return cut


def _assert_same_adapters_exactly(a, b) -> None:
    x, y = a.adapters(), b.adapters()
    assert sorted(x) == sorted(y)
    for n in x:
        np.testing.assert_array_equal(x[n], y[n], err_msg=n)


@pytest.mark.parametrize("which", ["fp32", "int8", "bpe"])
def test_save_resume_equals_uninterrupted(which, request, tmp_path):
    """Feed part of a text (cut inside a word), reopen the state, feed the whole text again: the resumed stream
    skips what was consumed and ends like a stream fed the same two parts without a restart (rounds, window,
    losses, adapters; and one more round, equal only if the AdamW moments and step came back too). With the BPE
    bundle (merges) the cut changes the tokens, so re-tokenizing from anywhere but the cut would show."""
    from absorber.runtime import Stream
    bundle = request.getfixturevalue({"fp32": "tiny_bundle", "int8": "tiny_bundle_int8", "bpe": "bpe_bundle"}[which])
    text = _text(20)
    a = Stream.open(bundle, state_dir=tmp_path / "a")
    enc = lambda t: a.tokenizer.encode(t, add_special_tokens=False).ids  # noqa: E731
    cut = _cut_inside_a_word(text, enc)
    two_parts = enc(text[:cut]) + enc(text[cut:])
    if which == "bpe":
        assert two_parts != enc(text) and len(enc(text)) < len(text) // 3     # merges, and the cut matters
    ra = a.feed(text[:cut]) + a.feed(text[cut:])
    assert a.tokens_seen == len(two_parts) and a.rounds == len(ra) >= 3
    b = Stream.open(bundle, state_dir=tmp_path / "b")
    done = len(b.feed(text[:cut]))
    assert 1 <= done < a.rounds
    b2 = Stream.open(bundle, state_dir=tmp_path / "b")   # resume from the last completed round
    assert b2.resumed and b2.stats()["resumed"] and b2.rounds == done and b2.offset_chars == cut
    from absorber.runtime.state import load_state
    past = (len(enc(text[:cut])) - CFG.m) % CFG.n
    assert len(load_state(tmp_path / "b")[0]["pending"]) == past > 0    # tokens saved past the round...
    assert b2.stats()["pending"] == 0 and len(b2.window) == CFG.m + past  # ...are back in the window on resume
    rb = b2.feed(text)        # the same input again: what was consumed is skipped
    assert [r.round for r in rb] == list(range(done + 1, a.rounds + 1))      # the round counter continues
    assert b2.rounds == a.rounds and b2.window == a.window and b2.tokens_seen == a.tokens_seen
    assert b2.tokens_absorbed == a.tokens_absorbed and b2.offset_chars == a.offset_chars == len(text)
    assert [(r.loss_first, r.loss_last) for r in rb] == [(r.loss_first, r.loss_last) for r in ra[done:]]
    _assert_same_adapters_exactly(a, b2)
    assert b2.stats()["optimizer_step"] == a.stats()["optimizer_step"]
    more = _ids(CFG.n, seed=9)
    assert len(a.feed_tokens(more)) == len(b2.feed_tokens(more)) == 1
    _assert_same_adapters_exactly(a, b2)


def test_crash_resume_sigkill(bundle, tmp_path):
    """`absorber run` killed with SIGKILL mid-stream, restarted with the same state: same adapters as a run
    that was never interrupted."""
    from absorber.runtime.state import load_state
    inp = tmp_path / "talk.txt"
    inp.write_text(_text(90))
    full = _run(["run", str(bundle), "--input", str(inp), "--state", str(tmp_path / "full"), "--json", "-q"])
    assert full.returncode == 0, full.stderr
    recs = [json.loads(x) for x in full.stdout.strip().splitlines()]
    assert {"round", "tokens_absorbed", "loss_first", "loss_last", "steps", "seconds", "rss_mb", "teacher_seconds",
            "train_seconds", "optimizer_seconds"} <= set(recs[0])
    total_rounds = recs[-1]["rounds"]
    assert recs[-1]["summary"] and total_rounds == len(recs) - 1 and recs[-1]["resumed"] is False
    st = tmp_path / "crash"
    p = subprocess.Popen([sys.executable, "-m", "absorber", "run", str(bundle), "--input", str(inp), "--state",
                          str(st), "--json", "-q"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         cwd=ROOT)
    seen = 0
    for line in p.stdout:
        if '"round"' in line:
            seen += 1
        if seen >= total_rounds // 3:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    _, meta = load_state(st)
    assert 0 < meta["rounds"] < total_rounds
    done = meta["rounds"]
    again = _run(["run", str(bundle), "--input", str(inp), "--state", str(st), "--json", "-q"])
    assert again.returncode == 0, again.stderr
    recs2 = [json.loads(x) for x in again.stdout.strip().splitlines()]
    summary = recs2[-1]
    assert summary["summary"] and summary["resumed"] is True
    # only the rounds that were left ran, numbered on from the state's count
    assert [r["round"] for r in recs2[:-1]] == list(range(done + 1, total_rounds + 1))
    assert summary["rounds"] == total_rounds and summary["tokens_absorbed"] == recs[-1]["tokens_absorbed"]
    assert summary["tokens_absorbed_this_run"] == (total_rounds - done) * CFG.n
    assert [r["loss_last"] for r in recs2[:-1]] == pytest.approx([r["loss_last"] for r in recs[done:-1]], rel=1e-5)
    # a third run on the finished state says it resumed, and finds nothing left to absorb
    third = _run(["run", str(bundle), "--input", str(inp), "--state", str(st), "-q"])
    assert third.returncode == 0, third.stderr
    assert f"resumed from {st}: {total_rounds} rounds" in third.stderr
    assert f"absorbed 0 tokens in {total_rounds} rounds total" in third.stderr
    ta, ma = load_state(tmp_path / "full")
    tb, mb = load_state(st)
    assert mb["rounds"] == ma["rounds"] == total_rounds
    assert mb["offset_chars"] == ma["offset_chars"] and mb["step"] == ma["step"]
    np.testing.assert_array_equal(ta["window"], tb["window"])
    np.testing.assert_allclose(tb["params"], ta["params"], rtol=0, atol=1e-6)


def test_state_of_another_bundle_is_refused(bundle_copy, bundle, tmp_path):
    from absorber.runtime import Stream
    s = Stream.open(bundle, state_dir=tmp_path / "st")
    s.feed(_text(10))
    s.save()
    man = json.loads((bundle_copy / "manifest.json").read_text())
    man["exporter"]["note"] = "another export"
    (bundle_copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(AbsorberError, match="another bundle"):
        Stream.open(bundle_copy, state_dir=tmp_path / "st")
    r = _run(["run", str(bundle_copy), "--state", str(tmp_path / "st")])
    assert r.returncode == 2 and "another bundle" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(AbsorberError, match="corrupt"):
        Stream.open(bundle, state_dir=tmp_path / "bad")


# ----------------------------------------------------------------------------------------------- bad bundles
def test_missing_bundle_folder(tmp_path):
    from absorber.runtime import open_bundle
    with pytest.raises(AbsorberError, match="not found"):
        open_bundle(tmp_path / "nope")
    r = _run(["run", str(tmp_path / "nope")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not found" in r.stderr


@pytest.mark.parametrize("content,match", [(None, "missing"), (b"{not json", "corrupt"), (b"[1, 2]", "corrupt"),
                                           (b'{"format": 99}', "format")])
def test_missing_or_corrupt_manifest(bundle_copy, content, match):
    from absorber.runtime import open_bundle
    m = bundle_copy / "manifest.json"
    if content is None:
        m.unlink()
    else:
        m.write_bytes(content)
    with pytest.raises(AbsorberError, match=match):
        open_bundle(bundle_copy)


def test_hash_mismatch(bundle_copy):
    from absorber.runtime import open_bundle
    w = bundle_copy / "weights.bin"
    data = bytearray(w.read_bytes())
    data[100] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(AbsorberError, match="weights.bin does not match its sha256"):
        open_bundle(bundle_copy)
    (bundle_copy / "adapters.safetensors").unlink()
    with pytest.raises(AbsorberError, match="missing"):
        open_bundle(bundle_copy)


def test_graph_manifest_mismatch(bundle_copy):
    from absorber.runtime import Stream
    mp = bundle_copy / "manifest.json"
    man = json.loads(mp.read_text())
    man["graphs"]["train_step"]["inputs"][0]["name"] = "token_ids"
    mp.write_text(json.dumps(man))
    with pytest.raises(AbsorberError, match="train_step graph inputs do not match the manifest"):
        Stream.open(bundle_copy)


@pytest.mark.parametrize("location", ["../weights.bin", "/etc/passwd", "sub/weights.bin", "other.bin"])
def test_external_data_outside_bundle(bundle_copy, location):
    onnx = pytest.importorskip("onnx")
    from absorber.runtime import open_bundle
    from absorber.bundle_format import sha256_file
    g = bundle_copy / "decoder.onnx"
    mp = onnx.load(str(g), load_external_data=False)
    for t in mp.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
        if t.external_data:
            break
    g.write_bytes(mp.SerializeToString())
    man = json.loads((bundle_copy / "manifest.json").read_text())
    man["files"]["decoder.onnx"] = sha256_file(g)      # a consistent manifest: only the location is bad
    (bundle_copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(AbsorberError, match="outside the bundle|does not declare"):
        open_bundle(bundle_copy)


def test_protoscan_agrees_with_onnx(bundle):
    onnx = pytest.importorskip("onnx")
    from absorber.runtime.protoscan import scan_model
    for f in ("decoder.onnx", "train_step.onnx"):
        mp = onnx.load(str(bundle / f), load_external_data=False)
        info = scan_model(str(bundle / f))
        assert info.inputs == [i.name for i in mp.graph.input]
        assert info.outputs == [o.name for o in mp.graph.output]
        ext = {t.name: {e.key: e.value for e in t.external_data} for t in mp.graph.initializer if t.external_data}
        assert {t.name: (t.location, t.offset, t.length) for t in info.external} == \
            {n: (e["location"], int(e.get("offset", 0)), int(e["length"])) for n, e in ext.items()}


# ----------------------------------------------------------------------------------------------- inputs
def test_srt_vtt_jsonl_txt(tmp_path):
    from absorber.runtime.inputs import Reader, read_pieces
    srt = tmp_path / "a.srt"
    srt.write_text("1\n00:00:01,000 --> 00:00:02,500\nALICE: Hello there.\n<i>How are you?</i>\n\n"
                   "2\n00:00:03,000 --> 00:00:04,000\nBob: Fine.\n\n")
    assert read_pieces(str(srt)) == ["ALICE: Hello there. How are you?\n", "Bob: Fine.\n"]
    vtt = tmp_path / "a.vtt"
    vtt.write_text("WEBVTT - talk\nKind: captions\n\nNOTE this is a comment\nspanning lines\n\n"
                   "STYLE\n::cue { color: red }\n\nintro\n00:00.000 --> 00:02.000 align:start\n"
                   "<v Alice>Welcome <b>all</b></v>\n\n00:02.000 --> 00:03.000\n<c.yellow>Second</c> cue\n\n")
    assert read_pieces(str(vtt)) == ["Alice: Welcome all\n", "Second cue\n"]
    js = tmp_path / "a.jsonl"
    js.write_text('{"text": "one"}\n{"nope": 1}\nnot json\n{"text": "two\\n"}\n')
    r = Reader(str(js))
    assert list(r) == ["one\n", "two\n"] and r.skipped == 2
    # sniffing without a telling extension
    for src, fmt in ((srt, "srt"), (vtt, "vtt"), (js, "jsonl")):
        other = tmp_path / f"x_{fmt}.data"
        other.write_bytes(src.read_bytes())
        assert Reader(str(other)).fmt == fmt
    txt = tmp_path / "a.data"
    txt.write_text("plain line\nsecond\n")
    assert read_pieces(str(txt)) == ["plain line\n", "second\n"]


def test_non_utf8_bytes_are_counted(tmp_path, bundle):
    from absorber.runtime import Stream
    from absorber.runtime.inputs import Reader
    p = tmp_path / "bad.txt"
    p.write_bytes(b"caf\xe9 ok\n\xff\xfe tail \xc3\n")
    r = Reader(str(p))
    pieces = list(r)
    assert r.invalid_bytes == 4 and "\ufffd" in "".join(pieces)
    out = _run(["run", str(bundle), "--input", str(p), "--json", "-q"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["invalid_bytes"] == 4
    assert "not UTF-8" in out.stderr
    s = Stream.open(bundle)
    s.feed(b"x\xff")
    assert s.stats()["invalid_bytes"] == 1


def test_empty_input(tmp_path, bundle):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    r = _run(["run", str(bundle), "--input", str(p), "-q"])
    assert r.returncode == 0 and "is empty" in r.stderr and "Traceback" not in r.stderr
    r = _run(["run", str(bundle), "--input", "-", "-q"], input="")
    assert "stdin is empty" in r.stderr


def test_ten_megabyte_line(tmp_path):
    from absorber.runtime.inputs import CHUNK, Reader
    p = tmp_path / "long.txt"
    word = b"absorb "
    p.write_bytes(word * (10_000_000 // len(word)) + b"end\nnext\n")
    r = Reader(str(p))
    n = total = 0
    for piece in r:
        n += 1
        total += len(piece)
        assert len(piece.encode()) <= CHUNK + 8
    assert total == p.stat().st_size and n > 100 and r.bytes_read == p.stat().st_size


TEN_MB_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import psutil
    from absorber.runtime import Stream
    from absorber.runtime.inputs import Reader
    bundle, path, n, m = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    line = "x" * (10 << 20)            # the same 10 MiB line as the file (without its newline), made up front
    s = Stream.open(bundle, config_overrides={"k": 0, "n": n, "m": m})
    s.feed("x" * (2 << 20))            # warm-up: ONNX Runtime's arenas grow in the first rounds (~130 MB)
    proc = psutil.Process()
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    rss0, peak0 = proc.memory_info().rss, peak()
    out = {"warm": s.stats(), "max_piece": 0, "max_window": 0, "max_pending": 0}
    r = Reader(path)                   # the file as `absorber run --input` reads it: bounded pieces of the line
    for piece in r:
        out["max_piece"] = max(out["max_piece"], len(piece.encode()))
        s.feed(piece)
        st = s.stats()
        out["max_window"] = max(out["max_window"], st["window"])
        out["max_pending"] = max(out["max_pending"], st["pending"])
    out["pieces"] = r.pieces
    out["file"] = s.stats()
    s.feed(line)                       # the API takes the 10 MiB string itself
    out["api"] = s.stats()
    out["rss_growth_mb"] = (proc.memory_info().rss - rss0) / 2**20
    out["peak_growth_mb"] = (peak() - peak0) / 2**20
    print(json.dumps(out))
""")


def test_ten_megabyte_line_is_absorbed_whole(tmp_path, bpe_bundle):
    """A 10 MiB line (no space, no newline until its end) read as `absorber run` reads it, then the same line as
    ONE string through the API: all of it is consumed and tokenized (the BPE has one token per 1024 x's, so the
    line is 10240 tokens and 9 rounds at n=1024, m=512; k=0 keeps the rounds cheap), the window stays bounded,
    and memory does not grow with the line (RSS and peak RSS, in a fresh process, after a warm-up)."""
    from tokenizers import Tokenizer

    from absorber.runtime.inputs import CHUNK
    n, m = 1024, 512
    tk = Tokenizer.from_file(str(bpe_bundle / "tokenizer.json"))
    x_run = tk.encode("x" * X_RUN, add_special_tokens=False).ids
    assert len(x_run) == 1 and tk.encode("x" * 3 * X_RUN, add_special_tokens=False).ids == x_run * 3
    assert len(tk.encode("\n", add_special_tokens=False).ids) == 1
    size = 10 << 20
    p = tmp_path / "long.txt"
    p.write_bytes(b"x" * size + b"\n")
    r = subprocess.run([sys.executable, "-c", TEN_MB_SCRIPT, str(bpe_bundle), str(p), str(n), str(m)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    warm, file, api = out["warm"], out["file"], out["api"]
    assert warm["tokens_seen"] == (2 << 20) // X_RUN and warm["rounds"] == 1
    # the file: every character consumed, in pieces of at most CHUNK bytes
    assert out["max_piece"] <= CHUNK and out["pieces"] >= size // CHUNK
    assert file["offset_chars"] - warm["offset_chars"] == size + 1
    assert file["tokens_seen"] - warm["tokens_seen"] == size // X_RUN + 1
    # the string: the same again
    assert api["offset_chars"] - file["offset_chars"] == size
    assert api["tokens_seen"] - file["tokens_seen"] == size // X_RUN
    assert api["rounds"] == (api["tokens_seen"] - m) // n and api["tokens_absorbed"] == api["rounds"] * n
    assert api["rounds"] - warm["rounds"] == 2 * size // X_RUN // n
    assert api["window"] == api["tokens_seen"] - api["tokens_absorbed"] < n + m and api["pending"] == 0
    assert out["max_window"] < n + m and out["max_pending"] == 0
    # memory: measured +5 MB RSS and peak over the 20 MiB; tokenizing the whole string at once peaks ~+570 MB,
    # keeping the text costs 10 MB per copy
    assert out["rss_growth_mb"] < 12 and out["peak_growth_mb"] < 64, out


def test_cli_bad_format_and_missing_input(bundle, tmp_path):
    r = _run(["run", str(bundle), "--input", str(tmp_path / "nope.txt")])
    assert r.returncode == 2 and "input file not found" in r.stderr and "Traceback" not in r.stderr


def test_split_text_is_deterministic_from_any_cut():
    from absorber.runtime.stream import split_text
    text = ("word " * 50 + "\n") * 40 + "x" * 700
    pieces = list(split_text(text, 128))
    assert "".join(pieces) == text and all(len(p) <= 128 for p in pieces)
    # re-splitting from any piece boundary (what a resume does) gives the same pieces
    off = 0
    for i, p in enumerate(pieces):
        assert list(split_text(text[off:], 128)) == pieces[i:]
        off += len(p)


def test_flush_and_stats(bundle, tmp_path):
    from absorber.runtime import Stream
    s = Stream.open(bundle, state_dir=tmp_path / "st")
    assert s.flush() == [] and (tmp_path / "st" / "state.safetensors").is_file()
    s.feed("short text")
    st = s.stats()
    for k in ("tokens_seen", "tokens_absorbed", "rounds", "last_loss", "window", "rollbacks", "invalid_bytes",
              "rss_mb"):
        assert k in st
    assert st["window"] == st["tokens_seen"] == len("short text") and st["rounds"] == 0
    with pytest.raises(AbsorberError, match="cannot override"):
        Stream.open(bundle, config_overrides={"loss": "l2"})


# ----------------------------------------------------------------------------------------------- bounds
def test_window_history_and_rss_stay_bounded(bundle):
    """1200 rounds (k=0: the teacher pass and the loss only, a few ms each): the window stays under n+m, the
    history keeps the last 1000 rounds (the engine's cap), and RSS stays flat after a warm-up of 200 rounds."""
    import psutil

    from absorber.runtime import Stream
    n, m, rounds, cap = 16, 16, 1200, 1000
    s = Stream.open(bundle, config_overrides={"k": 0, "n": n, "m": m})
    ids = _ids(n * rounds + m, seed=3)
    proc = psutil.Process()
    warm = None
    for i in range(0, len(ids), 40):
        s.feed_tokens(ids[i:i + 40])
        assert len(s.window) < n + m and s.stats()["pending"] == 0
        assert len(s.history) <= cap
        if warm is None and s.rounds >= 200:
            warm = proc.memory_info().rss
    assert s.rounds == rounds and s.tokens_absorbed == rounds * n and s.tokens_seen == len(ids)
    assert len(s.history) == cap and [r.round for r in s.history] == list(range(rounds - cap + 1, rounds + 1))
    assert s.history[-1].tokens_absorbed == s.tokens_absorbed and s.history[-1].steps == 0
    growth = (proc.memory_info().rss - warm) / 2**20
    assert growth < 8, f"RSS grew {growth:.1f} MB over {rounds - 200} rounds"   # measured ~0.5 MB


def test_memory_budget_fits_the_window(tiny_bundle):
    """--memory-budget: the window (here n=128, m=64) shrinks, ratio kept, until the planner's prediction + 10 %
    fits; a roomy budget leaves it; one too small for any window is one clear error."""
    from absorber.runtime import Model, Stream
    from absorber.runtime.model import PLAN_MARGIN
    model = Model.open(tiny_bundle, verify_hashes=False)
    try:
        big = {"n": 128, "m": 64}
        cfg = model.config(big)
        full = model.predict_peak(cfg).peak_bytes
        half = model.predict_peak(model.config({"n": 64, "m": 32})).peak_bytes
        assert half < full
        roomy = model.config(big, memory_budget=int(full * (1 + PLAN_MARGIN)) + 1)
        assert (roomy.n, roomy.m) == (128, 64)
        budget = int(half * (1 + PLAN_MARGIN)) + 1                  # fits 64/32, not 96/48 (m in steps of 16)
        tight = model.config(big, memory_budget=budget)
        assert (tight.n, tight.m) == (64, 32)
        assert model.predict_peak(tight).peak_bytes * (1 + PLAN_MARGIN) <= budget
        s = Stream(model, config_overrides=big, memory_budget=f"{budget}B")
        st = s.stats()
        assert (st["n"], st["m"]) == (tight.n, tight.m)
        assert st["predicted_peak_mb"] == round(model.predict_peak(tight).peak_bytes / 2**20, 1)
        s.close()
        with pytest.raises(AbsorberError, match="too small") as e:
            model.config(big, memory_budget="1MB")
        assert "\n" not in str(e.value)
        with pytest.raises(AbsorberError, match="bad memory size"):
            model.config(big, memory_budget="lots")
    finally:
        model.close()


def test_run_cli_memory_budget(tiny_bundle, tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    r = _run(["run", str(tiny_bundle), "--input", str(text), "--n", "64", "--m", "32", "--memory-budget", "1KB", "-q"])
    assert r.returncode != 0 and "too small" in r.stderr and "Traceback" not in r.stderr
    r = _run(["run", str(tiny_bundle), "--input", str(text), "--n", "64", "--m", "32", "--memory-budget", "64GB",
              "--json"])
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (summary["n"], summary["m"]) == (64, 32) and summary["predicted_peak_mb"] > 0


def test_both_sessions_allocate_from_one_shared_arena(bundle):
    """With the CPU arena on, the decoder and the train step use the process-wide arena (the train step reuses
    what the teacher pass freed); with it off, neither does."""
    import dataclasses

    from absorber.devices.profiles import get_profile
    from absorber.runtime import Stream
    win = {"n": CFG.n, "m": CFG.m, "k": 2}
    on = Stream.open(bundle, profile="laptop-cpu", config_overrides=win)
    for sess in (on.model.decoder, on.model.train_step):
        assert sess.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    off = Stream.open(bundle, profile=dataclasses.replace(get_profile("laptop-cpu"), enable_cpu_mem_arena=False),
                      config_overrides=win)
    for sess in (off.model.decoder, off.model.train_step):
        with pytest.raises(RuntimeError, match="use_env_allocators"):    # the entry is not set at all
            sess.get_session_options().get_session_config_entry("session.use_env_allocators")
    assert on.feed_tokens(_ids(CFG.n + CFG.m)) and off.feed_tokens(_ids(CFG.n + CFG.m))


def test_round_gives_the_arena_back_between_its_phases(bundle):
    """With the CPU arena on, the round's decoder passes (teacher, final loss evaluation) and its LAST train step
    run with the arena-shrinkage run option (sessions.shrink_options), the other steps and answering without it;
    with the arena off there is nothing to shrink. The round's numbers do not depend on it."""
    import dataclasses

    from absorber.devices.profiles import get_profile
    from absorber.runtime import Stream
    win = {"n": CFG.n, "m": CFG.m, "k": 3}
    on = Stream.open(bundle, profile="laptop-cpu", config_overrides=win)
    ro = on.model.round_run_options
    assert ro is not None and ro.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    seen = {"train": [], "decoder": []}
    real_train, real_dec, real_dec_io = on.train.run_with_iobinding, on.model.decoder.run, \
        on.model.decoder.run_with_iobinding

    def train(io, run_options=None):
        seen["train"].append(run_options)
        return real_train(io, run_options)

    def dec(names, feeds, run_options=None):
        seen["decoder"].append(run_options)
        return real_dec(names, feeds, run_options)

    def dec_io(io, run_options=None):
        seen["decoder"].append(run_options)
        return real_dec_io(io, run_options)
    on.train.run_with_iobinding, on.model.decoder.run, on.model.decoder.run_with_iobinding = train, dec, dec_io
    (r_on,) = on.feed_tokens(_ids(CFG.n + CFG.m))
    assert seen["train"] == [None, None, ro]
    assert seen["decoder"] and all(o is ro for o in seen["decoder"])
    seen["decoder"].clear()
    on.ask("a question", max_new_tokens=2)
    assert seen["decoder"] and not any(seen["decoder"])
    off = Stream.open(bundle, profile=dataclasses.replace(get_profile("laptop-cpu"), enable_cpu_mem_arena=False),
                      config_overrides=win)
    assert off.model.round_run_options is None
    (r_off,) = off.feed_tokens(_ids(CFG.n + CFG.m))
    assert (r_on.loss_first, r_on.loss_last) == (r_off.loss_first, r_off.loss_last)


def test_next_token_loss_in_pieces_equals_one_pass(bundle):
    """The final loss evaluation's next-token term runs X in pieces through the KV cache (generate.LOGITS_BYTES:
    no [n, V] logits at once); uneven pieces give the value of one pass over all the logits."""
    from absorber.runtime import Stream
    from absorber.runtime import generate as G
    s = Stream.open(bundle)
    ids = _ids(37, seed=3)
    whole = G.summed_nll(G.all_logits(s.model, ids, s.param_views)[:-1], ids[1:]) / (len(ids) - 1)
    for rows in (5, 12, 36, 64):
        assert G.next_token_loss(s.model, ids, s.param_views, rows=rows) == pytest.approx(whole, rel=1e-5)
    assert G.next_token_loss(s.model, ids, s.param_views) == pytest.approx(whole, rel=1e-5)
