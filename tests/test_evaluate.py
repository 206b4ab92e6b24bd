"""absorber.evaluate and `absorber eval` on a tiny random model (seconds)."""
from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from absorber import evaluate as E  # noqa: E402
from absorber.config import AbsorberConfig, LoraConfig, override, parse_sweep  # noqa: E402


def small_cfg(**kw) -> AbsorberConfig:
    d = dict(n=32, m=16, k=2, lr=1e-3, lora=LoraConfig(rank=4, alpha=8.0))
    d.update(kw)
    return AbsorberConfig(**d)


def quick(**kw) -> E.EvalSettings:
    d = dict(recall_len=8, passkey_lengths=(), bootstrap=50)
    d.update(kw)
    return E.EvalSettings(**d)


def test_every_method_gives_finite_ppl(tiny_model, tiny_tok, rng_ids):
    texts = [("a", rng_ids(32 + 16 + 3 * 32, seed=1)), ("b", rng_ids(32 + 16 + 2 * 32, seed=2))]
    seen = []
    res = E.evaluate(tiny_model, tiny_tok, texts, small_cfg(), quick(), on_method=lambda p: seen.append(list(p["methods"])))
    assert set(res["methods"]) == set(E.METHODS)
    assert seen[0] == [E.METHODS[0]] and seen[-1] == list(E.METHODS)   # checkpoints grow method by method
    for mth, d in res["methods"].items():
        assert math.isfinite(d["ppl"]) and d["ppl"] > 1, mth
        assert math.isfinite(d["recall_ppl"]), mth
        assert d["segments"] == 3 + 2           # rounds per text: (len - n - m - s) // n + 1
    assert res["methods"]["absorber"]["sync_loss_first"] > 0
    assert res["methods"]["absorber"]["sync_loss_last"] is not None
    assert res["methods"]["ttt"]["train_loss_first"] > 0
    # the baselines never change the base model's weights, and trained methods use a separate copy
    assert not any(".lora_" in n for n, _ in tiny_model.named_parameters())


def test_window_equals_full_when_the_text_fits_one_window(tiny_model, tiny_tok, rng_ids):
    # before any eviction, window and full hold the same tokens and score identically
    cfg = small_cfg(n=32, m=16)
    ids = rng_ids(32 + 16 + 32, seed=3)
    s = E.EvalSettings(methods=("window", "full"), recall_len=0, passkey_lengths=(), bootstrap=0)
    pool = E.ModelPool(tiny_model)
    a = E.make_streamer(pool, tiny_tok, cfg, "window", s)
    b = E.make_streamer(pool, tiny_tok, cfg, "full", s)
    a.feed_tokens(ids[:40]); b.feed_tokens(ids[:40])
    assert a.context() == b.context()
    assert E.score_nll(a.model, a.context(), ids[40:72]) == E.score_nll(b.model, b.context(), ids[40:72])
    # and through the whole evaluation: with a full context as short as the window, full == window
    res = E.evaluate(tiny_model, tiny_tok, [("t", ids)], cfg,
                     E.EvalSettings(methods=("window", "full"), recall_len=8, passkey_lengths=(), bootstrap=0,
                                    max_context=cfg.n + cfg.m))
    assert res["methods"]["window"]["ppl"] == pytest.approx(res["methods"]["full"]["ppl"], rel=1e-6)


def test_full_sees_more_than_window(tiny_model, tiny_tok, rng_ids):
    ids = rng_ids(32 + 16 + 2 * 32, seed=4)
    res = E.evaluate(tiny_model, tiny_tok, [("t", ids)], small_cfg(), quick(methods=("window", "full")))
    seg = res["segments"]
    assert [r["context"] for r in seg["window"]["t"]] == [16, 16]
    assert [r["context"] for r in seg["full"]["t"]] == [48, 80]


def test_recovered_fraction_formula():
    assert E.recovered_fraction(20.0, 20.0, 18.0) == 0.0
    assert E.recovered_fraction(20.0, 18.0, 18.0) == 1.0
    assert E.recovered_fraction(20.0, 19.5, 18.0) == pytest.approx(0.25)
    assert E.recovered_fraction(20.0, 21.0, 18.0) == pytest.approx(-0.5)
    assert math.isnan(E.recovered_fraction(20.0, 19.0, 20.0))


def test_score_nll_matches_a_plain_forward(tiny_model, rng_ids):
    ids = rng_ids(24, seed=5)
    nll, cnt = E.score_nll(tiny_model, ids[:16], ids[16:])
    logits = tiny_model(input_ids=torch.tensor([ids])).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[15:-1], torch.tensor(ids[16:]), reduction="sum")
    assert cnt == 8 and nll == pytest.approx(float(ref), rel=1e-4)
    assert E.score_nll(tiny_model, [], ids[:8])[1] == 7


def test_passkey_planting(tiny_tok):
    hay = tiny_tok.encode("lorem ipsum dolor sit amet " * 40, add_special_tokens=False)
    for depth in (0.0, 0.25, 0.5, 1.0):
        ids, start, end = E.plant_passkey(tiny_tok, hay, "48213", depth)
        intro = len(tiny_tok.encode(E.INTRO, add_special_tokens=False))
        at = start - intro
        assert at == round(depth * len(hay))
        assert "The pass key is 48213." in tiny_tok.decode(ids[start:end])
        assert ids[intro:start] == hay[:at] and ids[end:] == hay[at:]
        assert tiny_tok.decode(ids[:intro]) == E.INTRO


def test_passkey_trial_runs(tiny_model, tiny_tok):
    hay = tiny_tok.encode("the quick brown fox jumps over the lazy dog. " * 4, add_special_tokens=False)
    cfg = small_cfg()
    s = quick(passkey_lengths=(len(hay),), passkey_depths=(0.1,))
    t = E.passkey_trial(E.ModelPool(tiny_model), tiny_tok, hay, cfg, "absorber", s, "12345", 0.1)
    assert set(t) >= {"correct", "answer", "in_window", "depth", "length"}
    assert t["correct"] in (True, False) and not t["in_window"]


def test_json_shape_and_plot(tiny_model, tiny_tok, rng_ids, tmp_path):
    texts = [("a", rng_ids(32 + 16 + 2 * 32, seed=6))]
    hay_text = "the quick brown fox jumps over the lazy dog. " * 3
    texts.append(("b", tiny_tok.encode(hay_text, add_special_tokens=False)))
    res = E.evaluate(tiny_model, tiny_tok, texts, small_cfg(), quick(passkey_lengths=(64,), passkey_depths=(0.5,)))
    blob = json.loads(json.dumps(res))
    assert set(blob) >= {"methods", "settings"}
    for mth in E.METHODS:
        d = blob["methods"][mth]
        for key in ("ppl", "recovered_fraction", "recall_ppl", "passkey_accuracy", "sync_loss_first",
                    "sync_loss_last"):
            assert key in d, (mth, key)
        assert 0.0 <= d["passkey_accuracy"] <= 1.0
    assert blob["methods"]["window"]["recovered_fraction"] == 0.0
    assert blob["methods"]["full"]["recovered_fraction"] == 1.0
    assert blob["settings"]["absorber"]["n"] == 32
    E.plot(res, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "| absorber |" in E.format_table(res["methods"])


def test_sweep_reuses_baselines(tiny_model, tiny_tok, rng_ids):
    texts = [("a", rng_ids(32 + 16 + 2 * 32, seed=7))]
    grid = parse_sweep(["lr=1e-3,2e-3", "loss_layers=all|2,4", "rank=2"])
    assert grid == {"lr": [1e-3, 2e-3], "loss_layers": [None, (2, 4)], "lora.rank": [2]}
    out = E.sweep(tiny_model, tiny_tok, texts, small_cfg(),
                  quick(methods=("window", "full", "absorber"), read_scales=(0.5,)), grid)
    assert len(out["sweep"]) == 4
    w = [p["methods"]["window"]["ppl"] for p in out["sweep"]]
    assert len(set(w)) == 1
    assert all("absorber (read x0.5)" in p["methods"] for p in out["sweep"])
    assert out["sweep"][0]["settings"]["absorber"]["lora"]["rank"] == 2
    assert out["sweep"][0]["settings"]["absorber"]["lora"]["alpha"] == pytest.approx(4.0)


def test_too_short_text_is_a_user_error(tiny_model, tiny_tok, rng_ids):
    from absorber.errors import AbsorberError
    with pytest.raises(AbsorberError, match="long enough"):
        E.evaluate(tiny_model, tiny_tok, [("a", rng_ids(20))], small_cfg(), quick())


def test_cli_help(capsys):
    from absorber.cli import main
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--sotu" in out and "--sweep" in out and "recovered" in out


def test_cli_needs_input():
    from absorber.cli import main
    assert main(["eval"]) == 2


def test_cli_unusable_device_is_a_one_line_error(tmp_path, capsys):
    from absorber.cli import main
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert main(["eval", "--model", "tiny", "--text", str(f), "--device", "nodevice", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nodevice" in err[0]


def test_sweep_over_the_anti_drift_options(tiny_model, tiny_tok, rng_ids):
    texts = [("a", rng_ids(32 + 16 + 3 * 32, seed=8))]
    grid = parse_sweep(["teacher=current,base", "reset=none|moments", "sync_skip=1", "decay=0.1"])
    assert grid == {"teacher": ["current", "base"], "reset": ["none", "moments"], "sync_skip": [1], "decay": [0.1]}
    out = E.sweep(tiny_model, tiny_tok, texts, small_cfg(), quick(methods=("window", "full", "absorber")), grid)
    ppls = {(p["point"]["teacher"], p["point"]["reset"]): p["methods"]["absorber"]["ppl"] for p in out["sweep"]}
    assert len(ppls) == 4 and all(math.isfinite(v) for v in ppls.values())
    assert ppls[("current", "none")] != ppls[("base", "none")]      # round 2+ teachers differ
    assert out["sweep"][1]["settings"]["absorber"]["teacher"] == "current"


def test_read_scales_add_a_row_per_scale_on_the_same_adapters(tiny_model, tiny_tok, rng_ids):
    """EvalSettings.read_scales: the trained method's next segment and recall probe also scored with its LoRA
    paths read at each scale. Scale 1 reproduces the method's own row, scale 0 the window's (the base model on the
    same context), and a scale in between differs; the row reports the same training."""
    texts = [("a", rng_ids(32 + 16 + 3 * 32, seed=11))]
    res = E.evaluate(tiny_model, tiny_tok, texts, small_cfg(lr=1e-2),
                     quick(methods=("window", "full", "absorber"), read_scales=(1.0, 0.5, 0.0)))
    ms = res["methods"]
    run, one, half, zero = (ms[k] for k in ("absorber", "absorber (read x1)", "absorber (read x0.5)",
                                            "absorber (read x0)"))
    assert one["ppl"] == run["ppl"] and one["recall_ppl"] == run["recall_ppl"]
    assert one["recovered_fraction"] == run["recovered_fraction"]
    assert zero["ppl"] == pytest.approx(ms["window"]["ppl"], rel=1e-5)
    assert zero["recall_ppl"] == pytest.approx(ms["window"]["recall_ppl"], rel=1e-5)
    assert half["ppl"] != run["ppl"] and half["recall_ppl"] != run["recall_ppl"]
    assert half["sync_loss_first"] == run["sync_loss_first"] and half["segments"] == run["segments"] == 3
    assert "absorber (read x0.5)" in E.format_table(ms)
    assert "window (read x0.5)" not in ms        # the baselines have no adapters to read


def test_cli_rejects_a_negative_read_scale(tmp_path, capsys):
    from absorber.cli import main
    f = tmp_path / "t.txt"
    f.write_text("Words of a speech. " * 50)
    assert main(["eval", "--model", "tiny", "--text", str(f), "--read-scales", "0.5,-1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--read-scales" in err[0]


def test_key_tokens_are_where_full_context_helps():
    """LongPPL's key tokens: full context lowers the NLL by more than key_gain and predicts the token with NLL below
    key_full_nll; each method's NLL is summed over those tokens only, per segment."""
    segs = {"window": [{"token_nll": [5.0, 5.0, 1.0, 6.0]}, {"token_nll": [4.0]}],
            "full": [{"token_nll": [1.0, 4.5, 0.5, 3.0]}, {"token_nll": [1.5]}],
            "absorber": [{"token_nll": [3.0, 0.0, 0.0, 9.0]}, {"token_nll": [2.0]}]}
    keyed = E.key_tokens(segs, E.EvalSettings(key_gain=2.0, key_full_nll=2.0))
    # segment 0: token 0 only (token 1 gains 0.5, token 2 gains 0.5, token 3 is predicted at 3.0 by full)
    assert keyed["absorber"] == [{"nll": 3.0, "count": 1}, {"nll": 2.0, "count": 1}]
    assert keyed["window"] == [{"nll": 5.0, "count": 1}, {"nll": 4.0, "count": 1}]
    assert E.key_tokens(segs, E.EvalSettings(key_gain=None)) is None
    assert E.key_tokens({"window": segs["window"]}, E.EvalSettings()) is None


def test_key_token_r_in_the_summary(tiny_model, tiny_tok, rng_ids):
    """With a gain threshold of 0, the tokens full context helps at all: the window's key-token R is 0 and full's 1,
    a read-scale row has one too, and the per-token NLLs sum to the segment's NLL."""
    texts = [("a", rng_ids(32 + 16 + 3 * 32, seed=12))]
    res = E.evaluate(tiny_model, tiny_tok, texts, small_cfg(lr=1e-2),
                     quick(methods=("window", "full", "absorber"), key_gain=0.0, key_full_nll=100.0,
                           read_scales=(0.5,)))
    ms = res["methods"]
    assert ms["window"]["key_recovered_fraction"] == 0 and ms["full"]["key_recovered_fraction"] == 1
    assert 0 < ms["absorber"]["key_tokens"] < ms["absorber"]["tokens_scored"]
    assert math.isfinite(ms["absorber (read x0.5)"]["key_recovered_fraction"])
    for rec in res["segments"]["absorber"]["a"]:
        assert sum(rec["token_nll"]) == pytest.approx(rec["nll"], rel=1e-4)
        assert len(rec["token_nll"]) == rec["count"]


def test_mix_scores_the_method_under_the_mixture_with_its_unmixed_twin(tiny_model, tiny_tok, rng_ids):
    """cfg.mix: the method's next segment is scored under the online mixture with the base model (its weight
    learned over the window first) and also unmixed (the adapters alone: the run without mix, same training);
    the mixture's per-token NLLs sum to its segment NLL."""
    import dataclasses
    texts = [("a", rng_ids(32 + 16 + 3 * 32, seed=11))]
    cfg = small_cfg(lr=1e-2)
    plain = E.evaluate(tiny_model, tiny_tok, texts, cfg, quick(methods=("window", "absorber")))
    mixed = E.evaluate(tiny_model, tiny_tok, texts, dataclasses.replace(cfg, mix=True),
                       quick(methods=("window", "absorber")))
    p, m = plain["segments"]["absorber"]["a"], mixed["segments"]["absorber"]["a"]
    assert [r["nll_unmixed"] for r in m] == pytest.approx([r["nll"] for r in p], rel=1e-5)
    assert any(abs(a["nll"] - b["nll"]) > 1e-3 for a, b in zip(m, p))
    for r in m:
        assert sum(r["token_nll"]) == pytest.approx(r["nll"], rel=1e-4) and len(r["token_nll"]) == r["count"]
    assert [r["nll"] for r in mixed["segments"]["window"]["a"]] == [r["nll"] for r in plain["segments"]["window"]["a"]]
