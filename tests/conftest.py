"""Shared fixtures: tiny random models built from a config (seconds, no files)."""
from __future__ import annotations

import pytest


@pytest.fixture
def tiny_model():
    from absorber.models import tiny_llama
    return tiny_llama(seed=0, vocab=512)


@pytest.fixture(scope="session")
def tiny_tok():
    from absorber.models import tiny_tokenizer
    return tiny_tokenizer()


@pytest.fixture
def rng_ids():
    torch = pytest.importorskip("torch")

    def make(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab, (n,), generator=g).tolist()
    return make


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory) -> dict:
    """{"fp32": path, "int8": path, "int4": path}: bundles of the tiny random Llama (default LoRA slice, n=32, m=16, K=4)
    written from ONE trace per test session (the trace costs tens of seconds on 2 cores; an extra write, ~1 s) and
    shared by the runtime and bench tests. ABSORBER_TEST_BUNDLE / ABSORBER_TEST_BUNDLE_INT8 may name existing
    ones (exported with the same settings) to skip the export while iterating."""
    import os
    from pathlib import Path

    found, missing = {}, {}
    root = None
    for quant, env in (("fp32", "ABSORBER_TEST_BUNDLE"), ("int8", "ABSORBER_TEST_BUNDLE_INT8"),
                       ("int4", "ABSORBER_TEST_BUNDLE_INT4")):
        pre = os.environ.get(env)
        if pre and (Path(pre) / "manifest.json").is_file():
            found[quant] = Path(pre)
        else:
            root = root or tmp_path_factory.mktemp("bundles")
            missing[quant] = root / ("tiny" if quant == "fp32" else f"tiny-{quant}")
    if missing:
        from absorber.export import quant as Q
        from absorber.export.bundle import write
        from absorber.models import tiny_tokenizer
        traced = tiny_trace()
        # the tiny head [512, 64] is 128 KB in fp32: pieces of 48 KB make the next-token term's softmax @ W_head
        # run in 3 uneven row pieces (171/171/170 rows) as a real head does (SmolLM2's: 8 of 16 MiB), so every
        # parity test of the quantized bundles covers the row-piece rewrite
        rows_bytes, Q.ROWS_BYTES = Q.ROWS_BYTES, 48 << 10
        try:
            found.update({q: Path(write(traced, tiny_tokenizer(), d, q)) for q, d in missing.items()})
        finally:
            Q.ROWS_BYTES = rows_bytes
    return found


_TRACE: list = []


def tiny_trace():
    """The session's ONE trace of the tiny random Llama (seed 0, vocab 512) with TINY_BUNDLE_CFG: both graphs as
    ONNX protos in memory (absorber.export.bundle.trace), from which tiny_bundles and the recompute tests write
    their bundles (a trace costs 45-90 s on 2 cores, a write ~1 s). Traced on first use only."""
    if not _TRACE:
        from absorber import lora
        from absorber.export.bundle import trace
        from absorber.models import tiny_llama
        model = tiny_llama(seed=0, vocab=512)
        _TRACE.append(trace(model, cfg=TINY_BUNDLE_CFG))
        assert not lora.adapters(model), "export must leave the model as it was"
    return _TRACE[0]


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundles):
    """The fp32 tiny bundle (see tiny_bundles)."""
    return tiny_bundles["fp32"]


@pytest.fixture(scope="session")
def tiny_bundle_int8(tiny_bundles):
    """The int8 tiny bundle: the same trace, frozen 2-D weights in 8-bit blocks run by MatMulNBits."""
    return tiny_bundles["int8"]


@pytest.fixture(scope="session")
def tiny_bundle_int4(tiny_bundles):
    """The int4 tiny bundle: the same trace, frozen 2-D weights in 4-bit blocks (scale and minimum)."""
    return tiny_bundles["int4"]


@pytest.fixture(scope="session")
def exact_profile():
    """The default profile with float activations in every MatMulNBits (accuracy_level 1): the quantized
    bundles then reproduce the torch model on their dequantized weights to float rounding."""
    import dataclasses

    from absorber.devices.profiles import default_profile
    c = TINY_BUNDLE_CFG      # a profile's window applies over the bundle's: keep the tiny bundles' own
    return dataclasses.replace(default_profile(), matmul_accuracy={"decoder": 1, "train_step": 1},
                               n=c.n, m=c.m, k=c.k)


def _tiny_bundle_cfg():
    from absorber.config import AbsorberConfig
    return AbsorberConfig(n=32, m=16, k=4)


TINY_BUNDLE_CFG = _tiny_bundle_cfg()
