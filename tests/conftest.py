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
def tiny_bundle(tmp_path_factory):
    """One fp32 bundle of the tiny random Llama (default LoRA slice, n=32, m=16, K=4), exported once per test
    session and shared by the runtime and bench tests (a trace costs tens of seconds on 2 cores).
    ABSORBER_TEST_BUNDLE may name an existing one to skip the export while iterating."""
    import os
    from pathlib import Path

    pre = os.environ.get("ABSORBER_TEST_BUNDLE")
    if pre and (Path(pre) / "manifest.json").is_file():
        return Path(pre)
    from absorber.export import export_bundle
    from absorber.models import tiny_llama, tiny_tokenizer
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return Path(export_bundle(tiny_llama(seed=0, vocab=512), tiny_tokenizer(), out, cfg=TINY_BUNDLE_CFG))


def _tiny_bundle_cfg():
    from absorber.config import AbsorberConfig
    return AbsorberConfig(n=32, m=16, k=4)


TINY_BUNDLE_CFG = _tiny_bundle_cfg()
