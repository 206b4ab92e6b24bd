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
    """One fp32 bundle of a tiny random Llama, exported once per test session (shared by several test files)."""
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.export import export_bundle
    from absorber.models import tiny_llama, tiny_tokenizer
    cfg = AbsorberConfig(n=64, m=32, k=2, lora=LoraConfig(rank=4, alpha=8))
    return export_bundle(tiny_llama(), tiny_tokenizer(), tmp_path_factory.mktemp("bundles") / "tiny", cfg=cfg)
