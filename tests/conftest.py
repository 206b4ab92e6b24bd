"""Shared fixtures: tiny random models built from a config (seconds, no files)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


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
    def make(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab, (n,), generator=g).tolist()
    return make
