"""cfg.bos: the model's BOS token at position 0 of every context (Gemma is pretrained with one)."""
from __future__ import annotations

import pytest
import torch

from absorber import evaluate as E
from absorber import retention as RT
from absorber import sync
from absorber.config import AbsorberConfig
from absorber.errors import AbsorberError
from absorber.stream import StreamingAbsorber


def _ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(5, 500, (n,), generator=g)]


@pytest.mark.parametrize("method", ["window", "full", "absorber"])
def test_every_context_starts_with_bos(tiny_model, tiny_tok, method):
    import copy
    cfg = AbsorberConfig(n=32, m=16, k=1, bos=True)
    sa = StreamingAbsorber(copy.deepcopy(tiny_model), tiny_tok, cfg, method)
    bos = tiny_tok.bos_token_id
    assert sa.context() == [bos]
    rounds = []
    for r, pos, done in E.stream_rounds(sa, _ids(200), 4):
        rounds += done
        ctx = sa.context()
        assert ctx[0] == bos and bos not in ctx[1:]
        # the same round cadence as without a BOS: the window holds m tokens after each round (full never evicts)
        assert len(ctx) == (1 + pos if method == "full" else 1 + cfg.m)
    if method == "absorber":
        assert sa.absorption.prefix == [bos] and len(rounds) == 4
    assert sa.capacity == (sa.max_positions if method == "full" else cfg.n + cfg.m + 1)


def test_bos_needs_a_bos_token(tiny_model, tiny_tok):
    class NoBos:
        bos_token_id = None
    with pytest.raises(AbsorberError, match="BOS"):
        StreamingAbsorber(tiny_model, NoBos(), AbsorberConfig(n=32, m=16, bos=True), "window")


def test_next_token_term_is_conditioned_on_bos_and_scores_the_same_tokens(tiny_model, tiny_tok):
    import copy
    model = copy.deepcopy(tiny_model)
    x = torch.tensor([_ids(32, 1)])
    y = torch.tensor([_ids(16, 2)])
    losses = {}
    for w in (0.0, 1.0):
        sa = StreamingAbsorber(model, tiny_tok, AbsorberConfig(n=32, m=16, k=1, bos=True, ntp_weight=w), "absorber")
        ab = sa.absorption
        with torch.no_grad():
            losses[w] = float(ab._loss(x, y, ab._teacher(x, y)))
    bos = torch.tensor([[tiny_tok.bos_token_id]])
    with torch.no_grad():
        want = float(sync.next_token_loss(model, x, bos, reduction="none")[1:].mean())
        plain = float(sync.next_token_loss(model, x))
    assert losses[1.0] - losses[0.0] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert abs(want - plain) > 1e-4          # the BOS changes what X's tokens are conditioned on


def test_retention_scores_damage_and_full_context_after_bos(tiny_model, tiny_tok):
    text = tiny_tok.encode("The council met on a cold morning. Everyone spoke at length about roads. " * 60,
                           add_special_tokens=False)
    held = _ids(80, 3)
    rs = RT.RetentionSettings(facts=2, plant_rounds=1, distances=(1,), heldout_tokens=64, bootstrap=0)
    pool = E.ModelPool(tiny_model)
    bos = tiny_tok.bos_token_id
    out = {}
    for flag in (False, True):
        cfg = AbsorberConfig(n=64, m=32, k=1, bos=flag)
        out[flag] = RT.stream_facts(pool, tiny_tok, text, held, cfg, "absorber", rs, seed=0)
    want = E.score_nll(tiny_model, [bos], held[:64])
    assert out[True]["damage"][0]["nll_base"] == pytest.approx(want[0], rel=1e-6)
    assert out[True]["damage"][0]["count"] == want[1] == 64
    assert out[False]["damage"][0]["count"] == 63          # no context: the first token is not scored
    # the window's answers differ with the BOS in front
    w = [r["nll_window"] for r in out[True]["records"]], [r["nll_window"] for r in out[False]["records"]]
    assert w[0] != w[1]


def test_eval_cli_bos(tmp_path):
    import json

    from absorber.cli import main
    f = tmp_path / "t.txt"
    f.write_text("The council met on a cold morning. Everyone spoke at length about roads. " * 40)
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", "tiny", "--text", str(f), "--methods", "window,full,absorber", "--n", "64",
               "--m", "32", "--k", "1", "--segments", "2", "--passkey-lengths", "", "--bootstrap", "0", "--bos",
               "--quiet", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    segs = res["segments"]
    assert [r["context"] for r in segs["window"][next(iter(segs["window"]))]] == [33, 33]   # BOS + the m tokens left after each round
    assert res["settings"]["absorber"]["bos"] is True
