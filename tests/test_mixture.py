"""The online mixture of the adapted and the base model (absorber.mixture): its arithmetic, its regret bound,
and its use in the forgetting curve (tiny model)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from absorber.mixture import Mixture, mixture_nll


def test_one_token_is_the_prior_weighted_average_and_the_weight_is_bayes():
    mx = Mixture(prior=0.5)
    lm = mx.update(math.log(0.8), math.log(0.2))
    assert lm == pytest.approx(math.log(0.5 * 0.8 + 0.5 * 0.2))
    assert mx.weight == pytest.approx(0.8 / (0.8 + 0.2))          # the posterior of the adapted model
    mx.update(math.log(0.8), math.log(0.2))
    assert mx.weight == pytest.approx(0.64 / 0.68)


def test_identical_experts_give_their_own_nll_whatever_the_share():
    lp = np.log(np.random.default_rng(0).uniform(0.01, 1.0, 50))
    for share in (0.0, 0.01):
        assert mixture_nll(lp, lp, share) == pytest.approx(-lp.sum(), rel=1e-12)


def test_the_mixture_costs_at_most_log_of_the_prior_against_the_better_expert():
    rng = np.random.default_rng(1)
    a = np.log(rng.uniform(0.01, 0.5, 300))
    b = a + rng.normal(0.3, 0.5, 300)                 # the base model better on average
    b = np.minimum(b, 0.0)
    best = min(-a.sum(), -b.sum())
    m = mixture_nll(a, b, 0.0, prior=0.5)
    assert m <= best + math.log(2) + 1e-9
    assert mixture_nll(a, b, 0.0, prior=0.9) <= -b.sum() + math.log(10) + 1e-9


def test_a_share_lets_the_weight_come_back_after_a_change_of_topic():
    good, bad = math.log(0.5), math.log(0.05)
    stay, back = Mixture(0.0), Mixture(0.01)
    for _ in range(200):          # the adapters help for 200 tokens ...
        stay.update(good, bad)
        back.update(good, bad)
    for _ in range(20):           # ... then the topic changes
        stay.update(bad, good)
        back.update(bad, good)
    assert back.weight < 0.05 and stay.weight > 0.99     # the share is the weight's floor (~0.01)


def test_scored_from_scores_only_the_tail_with_weights_learned_before():
    a, b = [math.log(0.9)] * 10 + [math.log(0.1)], [math.log(0.1)] * 10 + [math.log(0.9)]
    tail = mixture_nll(a, b, scored_from=10)
    w = 0.9 ** 10 / (0.9 ** 10 + 0.1 ** 10)
    assert tail == pytest.approx(-math.log(w * 0.1 + (1 - w) * 0.9))


def test_a_window_learns_the_weight_from_the_last_tokens_before_the_scored_ones_only():
    rng = np.random.default_rng(2)
    a, b = np.log(rng.uniform(0.01, 1.0, 40)), np.log(rng.uniform(0.01, 1.0, 40))
    a[:25] -= 3.0                                  # the adapted model far worse early on
    assert mixture_nll(a, b, 0.01, scored_from=30, window=5) == pytest.approx(mixture_nll(a[25:], b[25:], 0.01,
                                                                                         scored_from=5))
    assert mixture_nll(a, b, 0.01, scored_from=30, window=5) != pytest.approx(mixture_nll(a, b, 0.01, scored_from=30))
    for w in (0, 30, 31, 100):                     # 0, or at least the evidence there is: all of it
        assert mixture_nll(a, b, 0.01, scored_from=30, window=w) == mixture_nll(a, b, 0.01, scored_from=30)
    m = Mixture(0.01)
    m.learn(a[:30], b[:30], 5)
    assert m.weight == pytest.approx(_weight(a[25:30], b[25:30])) != pytest.approx(_weight(a[:30], b[:30]))


def _weight(a, b) -> float:
    m = Mixture(0.01)
    m.run(a, b)
    return m.weight


def test_mix_window_is_a_whole_number_and_a_run_time_setting():
    from absorber.config import AbsorberConfig, override
    from absorber.errors import AbsorberError
    from absorber.runtime.model import RUNTIME_SETTINGS
    assert AbsorberConfig().mix_window == 0 and "mix_window" in RUNTIME_SETTINGS
    for bad in (-1, 1.5, "64", True):
        with pytest.raises(AbsorberError, match="mix_window must be a whole number"):
            override(AbsorberConfig(), mix_window=bad).validate()


def test_mix_is_the_next_token_distribution_and_bad_settings_are_refused():
    mx = Mixture(prior=0.25)
    pa, pb = np.log([0.7, 0.2, 0.1]), np.log([0.1, 0.1, 0.8])
    assert np.exp(mx.mix(pa, pb)) == pytest.approx([0.25 * 0.7 + 0.75 * 0.1, 0.25 * 0.2 + 0.75 * 0.1,
                                                    0.25 * 0.1 + 0.75 * 0.8])
    with pytest.raises(ValueError, match="prior"):
        Mixture(prior=1.0)
    with pytest.raises(ValueError, match="share"):
        Mixture(share=0.5)
    with pytest.raises(ValueError, match="against"):
        Mixture().run([0.0], [0.0, 0.0])


def test_forgetting_curve_scores_the_mixture_on_the_same_adapters(tiny_model, tiny_tok):
    """mix_shares: every fact and the held-out text also scored under the mixture of the method's model and the
    base model (same adapters, same round); an entry "<label> (mix S)" per share; its damage is within the
    mixture's bound of the better model's."""
    torch = pytest.importorskip("torch")
    import copy

    from absorber import facts as FX
    from absorber import retention as RT
    from absorber.config import AbsorberConfig
    text = tiny_tok.encode("The council met on a cold morning. Everyone spoke at length. " * 60,
                           add_special_tokens=False)
    held = tiny_tok.encode("An unrelated speech about farming and rivers. " * 10, add_special_tokens=False)
    cfg = AbsorberConfig(n=64, m=32, k=2, lr=1e-2)
    rs = RT.RetentionSettings(facts=3, plant_rounds=2, distances=(1, 2), heldout_tokens=64, bootstrap=50,
                              mix_shares=(0.0, 0.001), mix_windows=(8, 100000, -1), mix_trace=True)
    res = RT.forgetting_curve(tiny_model, tiny_tok, [("t", text)], held, [("hy", "absorber", cfg)], rs)
    run, m0 = res["methods"]["hy"], res["methods"]["hy (mix 0)"]
    assert "hy (mix 0.001)" in res["methods"] and m0["config"]["mix_share"] == 0.0
    assert len(m0["records"]) == len(run["records"]) == 6
    # mix_trace: each record's answer and decoy rebuilt under every share and window from its trace
    for rec in run["records"]:
        tr = rec["mix_trace"]
        for suffix, starts in tr["start"].items():
            s_ = float(suffix[4:].split("w")[0].split("ctx")[0])
            for (la, lb), toks, key in zip(starts, (tr["answer"], tr["decoy"]), ("nll_method", "nll_method_decoy")):
                got_ = -float(Mixture(s_, la=la, lb=lb).run(*toks).sum())
                assert got_ == pytest.approx(rec[key + suffix], rel=1e-9)
    assert any(a["nll_method"] != r["nll_method"] for a, r in zip(m0["records"], run["records"]))
    for d, r in zip(m0["damage_records"], run["damage_records"]):
        assert d["nll_method"] <= min(r["nll_method"], r["nll_base"]) + math.log(2) + 1e-3
        # a change of topic: the held-out text after the window, the base model's NLL there is nll_context
        assert r["count_switch"] == r["count_context"] and r["nll_switch_base"] == pytest.approx(r["nll_context"],
                                                                                                rel=1e-5)
        assert math.isfinite(r["nll_switch_mix0.001"]) and r["nll_switch_method"] != r["nll_switch_base"]
    # windows: the same adapters scored with the weight learned from the last W tokens only; a window longer than
    # any context is the whole context; a short one changes the scores, not the records' count
    for s_ in ("0", "0.001"):
        whole, short = res["methods"][f"hy (mix {s_}, window 100000)"], res["methods"][f"hy (mix {s_}, window 8)"]
        mixed = res["methods"][f"hy (mix {s_})"]
        assert whole["config"]["mix_window"] == 100000 and short["config"]["mix_window"] == 8
        assert [r["nll_method"] for r in whole["records"]] == [r["nll_method"] for r in mixed["records"]]
        assert len(short["records"]) == 6
        assert any(a["nll_method"] != r["nll_method"] for a, r in zip(short["records"], mixed["records"]))
        # the context only: the question's tokens do not move the weight; a switch of topic has no question
        ctx_only = res["methods"][f"hy (mix {s_}, context only)"]
        assert any(a["nll_method"] != r["nll_method"] for a, r in zip(ctx_only["records"], mixed["records"]))
        assert [d["nll_switch_mix" + s_ + "ctx"] for d in run["damage_records"]] == \
            [d["nll_switch_mix" + s_] for d in run["damage_records"]]
    # the mixture of a model with itself is that model: mixed_answer_nlls = answer_nlls
    ctx = tiny_tok.encode("The council met on a cold morning and talked about roads. ", add_special_tokens=False)
    fs = FX.make_facts(3, seed=1)
    same = RT.mixed_answer_nlls(tiny_model, tiny_model, tiny_tok, ctx, fs, (0.0,))[(0.0, 0)]
    assert same == pytest.approx(RT.answer_nlls(tiny_model, tiny_tok, ctx, fs), rel=1e-4)
    # each window (shorter than a question too) as its definition: the weight learned over the last W tokens of
    # context + question; CONTEXT_ONLY: over the context, the question's tokens not at all
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p_ in other.parameters():
            p_.add_(0.05 * torch.randn_like(p_))
    trace: dict = {}
    got = RT.mixed_answer_nlls(other, tiny_model, tiny_tok, ctx, fs, (0.01,), (0, 3, 8, RT.CONTEXT_ONLY), trace)
    ca, pa = RT.token_logprobs(other, tiny_tok, ctx, fs)
    cb, pb = RT.token_logprobs(tiny_model, tiny_tok, ctx, fs)
    for w in (0, 3, 8, RT.CONTEXT_ONLY):
        want = []
        for f, a_, b_ in zip(fs, pa, pb):
            nq = len(FX.prompt_ids(tiny_tok, f)[0])
            m = Mixture(0.01)
            if w == RT.CONTEXT_ONLY:
                m.run(ca, cb)
            else:
                m.learn(ca + a_[:nq], cb + b_[:nq], w)
            want.append(-float(m.run(a_[nq:], b_[nq:]).sum()))
        assert got[(0.01, w)] == pytest.approx(want, rel=1e-12)
        # the trace (RetentionSettings.mix_trace): the answer's scores rebuilt from its log-weights and tokens
        again = [-float(Mixture(0.01, la=la, lb=lb).run(a_, b_).sum())
                 for (la, lb), (a_, b_) in zip(trace[(0.01, w)], trace["answer"])]
        assert again == pytest.approx(got[(0.01, w)], rel=1e-12)
    assert got[(0.01, 3)] != pytest.approx(got[(0.01, 0)])


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_runtime_mixed_answers_are_the_references(tiny_bundles, exact_profile, quant):
    """mix=True: after the same rounds the runtime answers from the online mixture as the reference does (the
    same greedy tokens; the prompt's per-token log-probabilities scored in pieces equal one pass); the mixture of a
    model with itself is that model."""
    torch = pytest.importorskip("torch")
    import dataclasses

    from absorber import lora
    from absorber.runtime import Stream
    from absorber.runtime import generate as G
    from absorber.stream import StreamingAbsorber
    from tests.test_runtime import _ids, _ref_model
    bundle = tiny_bundles[quant]
    model, cfg = _ref_model(bundle)
    cfg = dataclasses.replace(cfg, mix=True, lr=3e-2)
    ids = _ids(cfg.n * 2 + cfg.m + 5, seed=0)
    ref = StreamingAbsorber(model, None, cfg)
    ref.feed_tokens(ids)
    s = Stream.open(bundle, profile=exact_profile, config_overrides={"mix": True, "lr": 3e-2})
    s.feed_tokens(ids)
    lora.load_state(model, {n: torch.from_numpy(v) for n, v in s.adapters().items()})   # compare the reading
    q = _ids(40, seed=4)
    assert s.generate_ids(q, 12, stop_at_eos=False) == ref._greedy(q, 12)
    # on text the base model wrote (its own greedy continuation) the adapters lose their weight: the mixture
    # answers as the base model, not as the adapters (collapsed at this lr), and as the reference
    own, base = s._answer_adapters(), s._base_feeds
    q = q[:8] + G.generate(s.model, base, q[:8], 40, stop_at_eos=False)
    got = s.generate_ids(q, 12, stop_at_eos=False)
    assert got == ref._greedy(q, 12)
    assert got == G.generate(s.model, base, q, 12, stop_at_eos=False) != G.generate(s.model, own, q, 12,
                                                                                    stop_at_eos=False)
    # another share (mix_share, a run-time setting): the same as the reference at that share
    s.cfg = dataclasses.replace(s.cfg, mix_share=0.2)
    ref.cfg = dataclasses.replace(ref.cfg, mix_share=0.2)
    assert s.generate_ids(q, 12, stop_at_eos=False) == ref._greedy(q, 12)
    # a window (mix_window, a run-time setting): the weight learned from the prompt's last 6 tokens, as the reference
    s.cfg = dataclasses.replace(s.cfg, mix_window=6)
    ref.cfg = dataclasses.replace(ref.cfg, mix_window=6)
    assert s.generate_ids(q, 12, stop_at_eos=False) == ref._greedy(q, 12)
    s.cfg = dataclasses.replace(s.cfg, mix_share=0.001, mix_window=0)
    # the mixture of the adapted model with itself is the adapted model
    assert G.generate(s.model, own, q, 12, stop_at_eos=False, base_values=own, share=0.001) == \
        G.generate(s.model, own, q, 12, stop_at_eos=False)
    # the prompt's log-probabilities in pieces of 7 rows = one pass
    gen = G.Generator(s.model, s._answer_adapters(), 4)
    gen.append(q)
    lp, last = gen.score_pending(rows=7)
    z = s.logits(q)
    want = G.log_softmax(z[:-1])[np.arange(len(q) - 1), q[1:]]
    assert np.abs(lp - want).max() < 1e-4 and np.abs(last - z[-1]).max() < 1e-4
    # with a window of 9: the last 9 of them (the tokens before fed at once, one row of logits kept), same last row
    for w in (9, len(q) - 1, len(q) + 5):
        gen = G.Generator(s.model, s._answer_adapters(), 4)
        gen.append(q)
        lpw, lastw = gen.score_pending(window=w, rows=7)
        assert len(lpw) == min(w, len(q) - 1) and gen.pos == len(q)
        assert np.abs(lpw - want[-len(lpw):]).max() < 1e-4 and np.abs(lastw - z[-1]).max() < 1e-4


def test_a_mix_run_reads_every_score_through_the_mixture(tiny_model, tiny_tok):
    """cfg.mix: the method's own answer NLLs and held-out NLL are the mixture's (equal to the mix_shares twin of
    the same run at mixture.SHARE); next-text scoring under the mixture of a model with zero adapters is the
    model's own."""
    pytest.importorskip("torch")
    import copy

    from absorber import lora
    from absorber import retention as RT
    from absorber.config import AbsorberConfig
    from absorber.evaluate import mixed_token_nll, token_nll
    from absorber.mixture import SHARE
    text = tiny_tok.encode("The council met on a cold morning. Everyone spoke at length. " * 60,
                           add_special_tokens=False)
    held = tiny_tok.encode("An unrelated speech about farming and rivers. " * 10, add_special_tokens=False)
    cfg = AbsorberConfig(n=64, m=32, k=2, lr=1e-2, mix=True)
    rs = RT.RetentionSettings(facts=3, plant_rounds=2, distances=(1, 2), heldout_tokens=64, bootstrap=50,
                              mix_shares=(SHARE,))
    res = RT.forgetting_curve(tiny_model, tiny_tok, [("t", text)], held, [("mx", "absorber", cfg)], rs)
    run, twin = res["methods"]["mx"], res["methods"][f"mx (mix {SHARE:g})"]
    assert [r["nll_method"] for r in run["records"]] == pytest.approx([r["nll_method"] for r in twin["records"]],
                                                                      rel=1e-6)
    assert [d["nll_method"] for d in run["damage_records"]] == \
        pytest.approx([d["nll_method"] for d in twin["damage_records"]], rel=1e-5)
    model = copy.deepcopy(tiny_model)
    lora.inject(model, cfg.lora)                # fresh adapters: B = 0, the base model exactly
    ctx, tgt = text[:40], text[40:72]
    assert mixed_token_nll(model, ctx, tgt).numpy() == pytest.approx(token_nll(model, ctx, tgt).numpy(), rel=1e-5)
    assert len(mixed_token_nll(model, [], tgt)) == len(tgt) - 1


def test_mix_must_be_a_boolean_and_a_bad_value_is_one_line_error():
    from absorber.config import AbsorberConfig, override
    from absorber.errors import AbsorberError
    with pytest.raises(AbsorberError, match="mix must be true or false"):
        override(AbsorberConfig(), mix="yes").validate()
    override(AbsorberConfig(), mix=True).validate()


def test_mix_share_is_a_number_in_range_and_a_run_time_setting(tiny_bundles, exact_profile):
    """mix_share: validated (a bad value is a one-line error), the default is mixture.SHARE, a stream may set it
    (RUNTIME_SETTINGS), and the CLIs pass it through."""
    from absorber.config import AbsorberConfig, override
    from absorber.errors import AbsorberError
    from absorber.mixture import SHARE
    from absorber.runtime import Model
    assert AbsorberConfig().mix_share == SHARE
    for bad in (0.5, -0.1, "0.1", True, float("nan")):
        with pytest.raises(AbsorberError, match="mix_share must be a number in"):
            override(AbsorberConfig(), mix_share=bad).validate()
    model = Model.open(tiny_bundles["fp32"], profile=exact_profile)
    assert model.config({"mix": True, "mix_share": 0.03}).mix_share == 0.03
    with pytest.raises(AbsorberError, match="mix_share must be a number in"):
        model.config({"mix_share": 0.9})
    import argparse

    from absorber.commands import absorb as A
    from absorber.runtime import command as RC
    p = argparse.ArgumentParser()
    A.add_arguments(p)
    assert A.config_from_args(p.parse_args(["--input", "-", "--mix", "--mix-share", "0.03"])).mix_share == 0.03
    p = argparse.ArgumentParser()
    RC.add_arguments(p)
    assert p.parse_args([str(tiny_bundles["fp32"]), "--mix-share", "0.03"]).mix_share == 0.03
