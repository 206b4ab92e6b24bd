"""The forgetting-curve measurement (planted facts) and the compositional teacher, on tiny models."""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from absorber import facts as FX  # noqa: E402
from absorber import retention as RT  # noqa: E402
from absorber.config import AbsorberConfig  # noqa: E402


# ------------------------------------------------------------------------------------------------ facts
def test_facts_are_distinct_and_questions_are_reworded():
    fs = FX.make_facts(30, seed=3)
    assert len(fs) == 30 and len({f.statement for f in fs}) == 30
    assert FX.make_facts(30, seed=3) == fs and FX.make_facts(30, seed=4) != fs      # seeded
    for f in fs:
        assert f.answer.strip() and f.answer.strip() in f.statement                 # the answer is said
        q_words = set(f.question.lower().replace("?", "").split())
        s_words = set(f.statement.lower().replace(".", "").replace(",", "").split())
        assert len(q_words & s_words) < len(q_words)                                # not a copy of the statement
        assert f.statement.lower() not in f.question.lower()


def test_plant_puts_every_statement_inside_the_span_after_a_sentence_end(tiny_tok):
    text = tiny_tok.encode("We met today. The weather was fine. " * 40, add_special_tokens=False)
    fs = FX.make_facts(5, seed=0)
    ends = FX.sentence_end_ids(tiny_tok)
    assert ends      # '.' is a token of the byte tokenizer
    ids, spans = FX.plant(tiny_tok, text, fs, span=600, sentence_end_ids=ends, start=10)
    assert len(ids) == len(text) + sum(len(tiny_tok.encode(f.statement, add_special_tokens=False)) for f in fs)
    for f, (a, b) in zip(fs, spans):
        assert tiny_tok.decode(ids[a:b]) == f.statement
        assert ids[a - 1] in ends          # right after a sentence end
    assert [a for a, _ in spans] == sorted(a for a, _ in spans)
    assert spans[-1][1] <= 600 + 10 + sum(b - a for a, b in spans)


def test_answer_nlls_with_a_shared_cache_equal_one_forward_each(tiny_model, tiny_tok):
    ctx = tiny_tok.encode("The council met on a cold morning and talked about roads. ", add_special_tokens=False)
    fs = FX.make_facts(3, seed=1)
    shared = RT.answer_nlls(tiny_model, tiny_tok, ctx, fs)
    one = [RT._answer_nll(tiny_model, tiny_tok, ctx, f, 2048) for f in fs]
    assert shared == pytest.approx(one, rel=1e-4) and len(set(round(x, 3) for x in one)) == 3


def test_eviction_round():
    # round r absorbs stream[(r-1)n : rn]; a fact ending at index e (exclusive) leaves in the round holding e-1
    assert RT.eviction_round(1, 32) == 1 and RT.eviction_round(32, 32) == 1 and RT.eviction_round(33, 32) == 2


def test_retention_arithmetic_and_interval():
    recs = [{"text": "a", "fact": j, "nll_window": 10.0, "nll_method": 10.0 - 4 * (j % 2), "nll_full": 2.0}
            for j in range(10)]
    # window 100, full 20, method 100 - 4*5 = 80: (100 - 80) / (100 - 20)
    assert RT.retention(recs) == pytest.approx(0.25)
    lo, hi = RT.bootstrap_ci(recs, 500, 0)
    assert lo < 0.25 < hi and lo >= 0.0 and hi <= 0.5
    assert math.isnan(RT.retention([]))
    same = [dict(r, nll_method=r["nll_window"]) for r in recs]
    assert RT.retention(same) == 0.0
    assert RT.retention([dict(r, nll_method=r["nll_full"]) for r in recs]) == pytest.approx(1.0)


def test_decoy_lift_takes_out_what_is_not_the_fact():
    # window 100, full 20 (gap 80); the method lowers true answers by 40 and decoys by 16: lift 0.2, specific 0.3
    recs = [{"text": "a", "fact": j, "nll_window": 10.0, "nll_method": 6.0, "nll_full": 2.0,
             "nll_window_decoy": 12.0, "nll_method_decoy": 10.4} for j in range(10)]
    assert RT.retention(recs) == pytest.approx(0.5)
    assert RT.decoy_lift(recs) == pytest.approx(0.2)
    assert RT.specific_retention(recs) == pytest.approx(0.3)
    lo, hi = RT.bootstrap_ci([dict(r, nll_method_decoy=r["nll_method_decoy"] + (j % 3) - 1)
                              for j, r in enumerate(recs)], 200, 0, stat=RT.specific_retention)
    assert lo < 0.3 + 1e-9 and hi > 0.3 - 1e-9
    assert math.isnan(RT.decoy_lift([{k: v for k, v in r.items() if "decoy" not in k} for r in recs]))


def test_decoys_ask_the_same_question_with_an_answer_never_said():
    from absorber import facts as FX
    fs = FX.make_facts(30, seed=3)
    ds = FX.decoys(fs, seed=3)
    said = " ".join(f.statement for f in fs)
    assert len(ds) == len(fs)
    for f, d in zip(fs, ds):
        assert d.question == f.question and d.kind == f.kind and d.template == f.template >= 0
        assert d.answer != f.answer and d.answer.strip() not in said
        assert d.answer.startswith(" ")
    assert FX.decoys(fs, seed=3) == ds        # seeded


# ------------------------------------------------------------------------------------------------ compose teacher
def test_compose_target_arithmetic():
    from absorber import sync
    g = torch.Generator().manual_seed(0)
    bxy, cy, by = (torch.randn(3, 4, 5, generator=g) for _ in range(3))
    assert torch.allclose(sync.compose_target(bxy, cy, by, 1.0), bxy + (cy - by), atol=0, rtol=0)
    assert torch.allclose(sync.compose_target(bxy, cy, by, 0.5), bxy + 0.5 * (cy - by))
    assert torch.equal(sync.compose_target(bxy, cy, by, 0.0), bxy)


def test_compose_teacher_equals_base_teacher_with_fresh_adapters(tiny_model, rng_ids):
    """B = 0: the adapters add nothing on Y, so the compositional target is the base teacher's; after a round
    they do, and the target moves by exactly gamma * (h_cur(Y) - h_base(Y))."""
    from absorber import lora, sync
    from absorber.stream import StreamingAbsorber
    cfg = AbsorberConfig(n=32, m=16, k=3, teacher="compose")
    sa = StreamingAbsorber(tiny_model, None, cfg)
    layers = sync.loss_layers(tiny_model)
    x, y = torch.tensor([rng_ids(32, seed=1)]), torch.tensor([rng_ids(16, seed=2)])
    t_base = sync.teacher(tiny_model, x, y, layers, base=True).hidden
    t_comp = sync.teacher(tiny_model, x, y, layers, gamma=1.0).hidden
    assert torch.allclose(t_base, t_comp, atol=1e-6)
    sa.feed_tokens(rng_ids(48, seed=3))                      # one round: B != 0 now
    assert any(float(p.detach().abs().max()) > 0 for n, p in lora.adapters(tiny_model).items() if n.endswith("lora_B"))
    t_base = sync.teacher(tiny_model, x, y, layers, base=True).hidden
    cur, base = sync.own_contribution(tiny_model, y, layers)
    for gamma in (1.0, 0.5):
        t = sync.teacher(tiny_model, x, y, layers, gamma=gamma).hidden
        assert torch.allclose(t, t_base + gamma * (cur - base), atol=1e-5)
    assert float((cur - base).abs().max()) > 1e-4          # the check above is not vacuous


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_runtime_compose_teacher_matches_reference(tiny_bundle, gamma):
    from safetensors.numpy import load_file

    from absorber import lora
    from absorber.bundle_format import read_manifest
    from absorber.models import tiny_llama
    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    cfg = dataclasses.replace(read_manifest(tiny_bundle).defaults(), teacher="compose", gamma=gamma)
    model = tiny_llama(seed=0, vocab=512)
    lora.inject(model, cfg.lora)
    lora.load_state(model, {k: torch.from_numpy(v) for k, v in load_file(str(tiny_bundle / "adapters.safetensors")).items()})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (cfg.n * 3 + cfg.m + 5,), generator=g).tolist()
    rr = StreamingAbsorber(model, None, cfg).feed_tokens(ids)
    s = Stream.open(tiny_bundle, config_overrides={"teacher": "compose", "gamma": gamma})
    ro = s.feed_tokens(ids)
    assert len(rr) == len(ro) == 3
    for a, b in zip(rr, ro):
        assert b.loss_first == pytest.approx(a.loss_first, rel=1e-4)
        assert b.loss_last == pytest.approx(a.loss_last, rel=1e-4)
    snap = lora.snapshot(model)
    flat = np.concatenate([snap[n].numpy().ravel() for n in s.opt.names])
    assert np.linalg.norm(s.opt.params - flat) / np.linalg.norm(flat) < 1e-4
    # and it is not the base teacher's trajectory (round 2+ targets differ)
    base = Stream.open(tiny_bundle, config_overrides={"teacher": "base"}).feed_tokens(ids)
    assert base[2].loss_first != pytest.approx(ro[2].loss_first, rel=1e-4)


def test_probe_parts_cut_x_into_near_equal_parts():
    from absorber.config import probe_parts
    assert probe_parts(10, 0) == [] and probe_parts(10, 1) == [(0, 10)]
    assert probe_parts(10, 3) == [(0, 3), (3, 7), (7, 10)]
    parts = probe_parts(512, 2)
    assert parts == [(0, 256), (256, 512)]


def _reference_on_bundle(tiny_bundle, over: dict):
    """The bundle's config with `over`, and the reference model with the bundle's initial adapters."""
    from safetensors.numpy import load_file

    from absorber import lora
    from absorber.bundle_format import read_manifest
    from absorber.models import tiny_llama
    cfg = dataclasses.replace(read_manifest(tiny_bundle).defaults(), **over)
    model = tiny_llama(seed=0, vocab=512)
    lora.inject(model, cfg.lora)
    lora.load_state(model, {k: torch.from_numpy(v) for k, v in load_file(str(tiny_bundle / "adapters.safetensors")).items()})
    return cfg, model


@pytest.mark.parametrize("teacher", ["base", "compose"])
def test_runtime_probes_match_reference(tiny_bundle, tiny_tok, teacher):
    """probes=2: two recall probes (the recap prefix + each half of X) are synchronized before Y, every teacher
    computed first; the runtime cuts, tokenizes and trains as the reference does."""
    from absorber import lora
    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    # K=2: the L1 loss's sign(student - teacher) and AdamW's first, sign-like steps amplify float32 noise
    # along the 3K steps of a round (each target's first loss agrees to ~1e-6; the adapters drift apart
    # ~1e-4 after 6 steps, ~1e-3 after 12): the same amplification as TOL's comment in test_runtime.py
    over = {"probes": 2, "teacher": teacher, "k": 2}
    cfg, model = _reference_on_bundle(tiny_bundle, over)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 259, (cfg.n * 2 + cfg.m + 3,), generator=g).tolist()
    ref = StreamingAbsorber(model, tiny_tok, cfg)
    x = torch.tensor([ids[:cfg.n]])
    probes = ref.absorption.probe_ids(x)
    assert len(probes) == 2 and probes[0].shape[1] == len(ref.absorption.probe_prefix) + cfg.n // 2
    assert tiny_tok.decode(probes[0][0, :len(ref.absorption.probe_prefix)].tolist()) == "To recap what was said so far: "
    rr = ref.feed_tokens(ids)
    s = Stream.open(tiny_bundle, config_overrides=over)
    ro = s.feed_tokens(ids)
    assert len(rr) == len(ro) == 2
    for a, b in zip(rr, ro):
        assert a.steps == b.steps == 3 * cfg.k                 # two probes and Y, K steps each
        assert b.loss_first == pytest.approx(a.loss_first, rel=2e-3)
        assert b.loss_last == pytest.approx(a.loss_last, rel=2e-3)
    snap = lora.snapshot(model)
    flat = np.concatenate([snap[n].numpy().ravel() for n in s.opt.names])
    assert np.linalg.norm(s.opt.params - flat) / np.linalg.norm(flat) < 2e-3
    plain = Stream.open(tiny_bundle, config_overrides={"teacher": teacher, "k": 2}).feed_tokens(ids)
    assert plain[1].loss_first != pytest.approx(ro[1].loss_first, rel=2e-3)   # the probes changed the adapters (~0.5 % at lr 1e-4)


def test_bad_gamma_and_teacher_are_one_line_errors():
    from absorber.errors import AbsorberError
    with pytest.raises(AbsorberError, match="gamma"):
        AbsorberConfig(teacher="compose", gamma=1.5).validate()
    with pytest.raises(AbsorberError, match="teacher must be"):
        AbsorberConfig(teacher="other").validate()


# ------------------------------------------------------------------------------------------------ the curve
def test_forgetting_curve_end_to_end_on_a_tiny_model(tiny_model, tiny_tok):
    text = tiny_tok.encode("The council met on a cold morning. Everyone spoke at length. " * 60,
                           add_special_tokens=False)
    held = tiny_tok.encode("An unrelated speech about farming and rivers. " * 10, add_special_tokens=False)
    cfg = AbsorberConfig(n=64, m=32, k=2)
    rs = RT.RetentionSettings(facts=3, plant_rounds=2, distances=(1, 2), heldout_tokens=64, bootstrap=50)
    runs = [("window", "window", cfg), ("absorber", "absorber", cfg)]
    res = RT.forgetting_curve(tiny_model, tiny_tok, [("t", text)], held, runs, rs)
    for label in ("window", "absorber"):
        c = res["methods"][label]["curve"]
        assert [x["distance"] for x in c] == [1, 2] and all(x["facts"] == 3 for x in c)
    # the window method is its own baseline (a random tiny model may have no window-full gap: NaN then)
    assert all(r["nll_method"] == r["nll_window"] for r in res["methods"]["window"]["records"])
    assert all(x["retention"] == 0.0 or math.isnan(x["retention"]) for x in res["methods"]["window"]["curve"])
    # the window and full NLLs are shared between runs (computed once per text): identical records
    w = {(r["fact"], r["distance"]): (r["nll_window"], r["nll_full"]) for r in res["methods"]["window"]["records"]}
    a = {(r["fact"], r["distance"]): (r["nll_window"], r["nll_full"]) for r in res["methods"]["absorber"]["records"]}
    assert w == a
    # the decoy control: zero lift for the window, computed for every record of the absorber
    assert all(r["nll_method_decoy"] == r["nll_window_decoy"] for r in res["methods"]["window"]["records"])
    assert all(x["decoy_lift"] == 0.0 or math.isnan(x["decoy_lift"]) for x in res["methods"]["window"]["curve"])
    assert any(r["nll_method_decoy"] != r["nll_window_decoy"] for r in res["methods"]["absorber"]["records"])
    # absorption changes the answers' NLL and the held-out text's
    assert any(r["nll_method"] != r["nll_window"] for r in res["methods"]["absorber"]["records"])
    assert res["methods"]["absorber"]["damage"]["ppl_change_at_end"] != 0.0
    # the in-context reference: the base model on the same held-out tokens after the window, the same for every run
    d = res["methods"]["absorber"]["damage_records"][-1]
    assert d["count_context"] == d["count"]
    assert [x["nll_context"] for x in res["methods"]["window"]["damage_records"]] == \
        [x["nll_context"] for x in res["methods"]["absorber"]["damage_records"]]
    assert d["nll_context"] != d["nll_base"]
    assert res["methods"]["window"]["damage"]["ppl_change_context_at_end"] == \
        res["methods"]["absorber"]["damage"]["ppl_change_context_at_end"] != 0.0
    assert "| absorber |" in RT.format_curve(res)


def test_a_calibrated_run_records_its_uncalibrated_twin_on_the_same_adapters(tiny_model, tiny_tok):
    """calibrate=T in the forgetting curve: every method NLL is also scored without the correction (same
    adapters, same round), and the run gets a second entry "<label> (uncalibrated)" built from those."""
    text = tiny_tok.encode("The council met on a cold morning. Everyone spoke at length. " * 60,
                           add_special_tokens=False)
    held = tiny_tok.encode("An unrelated speech about farming and rivers. " * 10, add_special_tokens=False)
    cfg = AbsorberConfig(n=64, m=32, k=2, lr=1e-2, calibrate=64)
    rs = RT.RetentionSettings(facts=3, plant_rounds=2, distances=(1, 2), heldout_tokens=64, bootstrap=50)
    res = RT.forgetting_curve(tiny_model, tiny_tok, [("t", text)], held, [("cal", "absorber", cfg)], rs)
    cal, raw = res["methods"]["cal"], res["methods"]["cal (uncalibrated)"]
    assert len(cal["records"]) == len(raw["records"]) == 6
    for c, r in zip(cal["records"], raw["records"]):
        assert r["nll_method"] == c["nll_method_uncalibrated"] and r["nll_window"] == c["nll_window"]
        assert r["nll_method_decoy"] == c["nll_method_decoy_uncalibrated"]
    assert any(c["nll_method"] != c["nll_method_uncalibrated"] for c in cal["records"])
    assert [d["nll_method"] for d in raw["damage_records"]] == \
        [d["nll_method_uncalibrated"] for d in cal["damage_records"]]
    assert cal["damage"]["ppl_change_at_end"] != raw["damage"]["ppl_change_at_end"]


def test_read_scales_score_the_same_adapters_weaker(tiny_model, tiny_tok):
    """read_scales: every method NLL and the held-out text are also scored with the LoRA paths read at each scale
    (the same adapters, the same round); scale 1 reproduces the run, scale 0 the window (the base model on the
    same context), and each scale gets its own entry "<label> (read xS)"."""
    text = tiny_tok.encode("The council met on a cold morning. Everyone spoke at length. " * 60,
                           add_special_tokens=False)
    held = tiny_tok.encode("An unrelated speech about farming and rivers. " * 10, add_special_tokens=False)
    cfg = AbsorberConfig(n=64, m=32, k=2, lr=1e-2)
    rs = RT.RetentionSettings(facts=3, plant_rounds=2, distances=(1, 2), heldout_tokens=64, bootstrap=50,
                              read_scales=(1.0, 0.5, 0.0))
    res = RT.forgetting_curve(tiny_model, tiny_tok, [("t", text)], held, [("hy", "absorber", cfg)], rs)
    run, one, half, zero = (res["methods"][k] for k in ("hy", "hy (read x1)", "hy (read x0.5)", "hy (read x0)"))
    assert len(run["records"]) == len(half["records"]) == 6
    assert [r["nll_method"] for r in one["records"]] == [r["nll_method"] for r in run["records"]]
    for z, r in zip(zero["records"], run["records"]):
        assert abs(z["nll_method"] - r["nll_window"]) < 1e-3 * max(1.0, abs(r["nll_window"]))
    assert any(h["nll_method"] != r["nll_method"] for h, r in zip(half["records"], run["records"]))
    assert [d["nll_method"] for d in one["damage_records"]] == [d["nll_method"] for d in run["damage_records"]]
    assert all(abs(d["nll_method"] - d["nll_base"]) < 1e-3 * abs(d["nll_base"]) for d in zero["damage_records"])
    assert half["config"]["read_scale"] == 0.5


def test_too_short_text_is_one_line_error(tiny_model, tiny_tok):
    from absorber.errors import AbsorberError
    text = tiny_tok.encode("Short. " * 30, add_special_tokens=False)
    rs = RT.RetentionSettings(facts=2, plant_rounds=1, distances=(1, 32))
    with pytest.raises(AbsorberError, match="too short"):
        RT.forgetting_curve(tiny_model, tiny_tok, [("t", text)], [], [("w", "window", AbsorberConfig(n=32, m=16))], rs)


def test_eval_cli_forgetting_curve(tmp_path, capsys):
    import json

    from absorber.cli import main
    f = tmp_path / "t.txt"
    f.write_text("The council met on a cold morning. Everyone spoke at length about roads. " * 30)
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", "tiny", "--text", str(f), "--facts", "2", "--plant-rounds", "1", "--distances",
               "1,2", "--methods", "window,absorber", "--n", "64", "--m", "32", "--k", "1", "--bootstrap", "20",
               "--quiet", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| window |" in table and "| absorber |" in table and "d=2" in table
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"window", "absorber"} and res["command"] is None or isinstance(res["command"], str)
    assert len(res["methods"]["absorber"]["records"]) == 2 * 2
    # --sweep with --facts: one curve per grid point (it was silently ignored)
    rc = main(["eval", "--model", "tiny", "--text", str(f), "--facts", "2", "--plant-rounds", "1", "--distances",
               "1", "--methods", "window,absorber", "--n", "64", "--m", "32", "--k", "1", "--bootstrap", "20",
               "--quiet", "--json", str(out), "--sweep", "sparse=4", "lr=1e-3,2e-3"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"window", "absorber sparse=4 lr=0.001", "absorber sparse=4 lr=0.002"}
    # --read-scales with --facts: the same adapters scored weaker, a curve per scale
    rc = main(["eval", "--model", "tiny", "--text", str(f), "--facts", "2", "--plant-rounds", "1", "--distances",
               "1", "--methods", "window,absorber", "--n", "64", "--m", "32", "--k", "1", "--bootstrap", "20",
               "--quiet", "--json", str(out), "--read-scales", "0.5"])
    assert rc == 0
    assert set(json.loads(out.read_text())["methods"]) == {"window", "absorber", "absorber (read x0.5)"}
    # --cued / --recite: rows for the same adapters asked by the facts' own words and after a recitation
    rc = main(["eval", "--model", "tiny", "--text", str(f), "--facts", "2", "--plant-rounds", "1", "--distances",
               "1", "--methods", "window,absorber", "--n", "64", "--m", "32", "--k", "1", "--bootstrap", "20",
               "--quiet", "--json", str(out), "--cued", "--recite", "2", "--restate", "2",
               "--restate-shared"])
    assert rc == 0
    assert "| absorber (own words) |" in capsys.readouterr().out
    got = json.loads(out.read_text())["methods"]
    assert set(got) == {"window", "absorber", "absorber (own words)", "absorber (recited)", "absorber (restated)"}
    c = got["absorber"]["records"][0]["restated"]["cues"]
    assert c["window"] == c["full"] == c["method"]        # --restate-shared: the window's lead for all
    for r, c in zip(got["absorber"]["records"], got["absorber (own words)"]["records"]):
        assert c["nll_method"] == sum(r["cued"]["method"]) and c["nll_full"] == sum(r["cued"]["full"])
        assert c["nll_window"] != r["nll_window"]
    assert res["methods"]["absorber sparse=4 lr=0.002"]["config"]["lora"]["sparse"] == 4
    assert res["methods"]["absorber sparse=4 lr=0.002"]["config"]["lr"] == 0.002


def test_heldout_text_is_a_file_or_a_speech(tmp_path):
    from absorber import data
    from absorber.errors import AbsorberError
    f = tmp_path / "manual.txt"
    f.write_text("Turn the valve a quarter turn before you start the pump.", encoding="utf-8")
    assert data.heldout_text(str(f)) == ("manual.txt", f.read_text(encoding="utf-8"))
    label, text = data.heldout_text("1961-Kennedy")
    assert label.startswith("1961-Kennedy") and text == data.speech(label).text()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(AbsorberError, match="not UTF-8"):
        data.heldout_text(str(bad))
    with pytest.raises(AbsorberError, match="no such file"):
        data.heldout_text(str(tmp_path / "missing.txt"))


def test_eval_cli_heldout_file_measures_damage_on_it(tmp_path, tiny_tok):
    import json

    from absorber.cli import main
    f = tmp_path / "t.txt"
    f.write_text("The council met on a cold morning. Everyone spoke at length about roads. " * 30)
    manual = tmp_path / "manual.txt"
    manual.write_text("Turn the valve a quarter turn, then check the gauge and start the pump. " * 150)
    out = tmp_path / "r.json"
    args = ["eval", "--model", "tiny", "--text", str(f), "--facts", "2", "--plant-rounds", "1", "--distances", "1",
            "--methods", "absorber", "--n", "64", "--m", "32", "--k", "1", "--bootstrap", "0", "--quiet",
            "--json", str(out)]
    assert main(args + ["--heldout", str(manual)]) == 0
    on_manual = json.loads(out.read_text())["methods"]["absorber"]["damage_records"]
    assert main(args) == 0     # the default held-out speech
    on_speech = json.loads(out.read_text())["methods"]["absorber"]["damage_records"]
    assert on_manual and on_speech and on_manual[0]["nll_base"] != on_speech[0]["nll_base"]
    # the manual's base NLL is its own 256 tokens after the first 1000, scored by the base model
    assert len(tiny_tok.encode(manual.read_text(), add_special_tokens=False)) > 1256
    short = tmp_path / "short.txt"
    short.write_text("Too short to score.")
    assert main(args + ["--heldout", str(short)]) == 2


# ------------------------------------------------------------------ the retention levers in the reference
def test_l1n_divides_each_layer_by_the_teacher_scale():
    import torch
    from absorber import sync
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 10, 8, generator=g), torch.randn(3, 10, 8, generator=g)
    t[1] *= 1000.0                                      # one layer with massive activations
    want = torch.stack([(s[i] - t[i]).abs().mean() / t[i].abs().mean() for i in range(3)]).mean()
    assert float(sync.sync_loss(s, t, "l1n")) == pytest.approx(float(want), rel=1e-6)
    # the raw L1 is all that one layer; the normalized one is not
    assert float(sync.sync_loss(s, t, "l1")) > 100 * float(sync.sync_loss(s, t, "l1n"))


def test_prefix_stays_in_front_of_teacher_student_and_window(tiny_tok, rng_ids, monkeypatch):
    """prefix=p: the stream's first p tokens never leave; the teacher sees prefix·X·Y, the student prefix·Y, the
    loss covers only Y; the answering context is prefix + window."""
    import torch
    from absorber import sync
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.models import tiny_llama
    from absorber.stream import StreamingAbsorber
    model = tiny_llama(seed=0, vocab=512)
    cfg = AbsorberConfig(n=16, m=8, k=1, prefix=3, sync_skip=0, lora=LoraConfig(rank=2, alpha=4))
    sa = StreamingAbsorber(model, tiny_tok, cfg)
    ids = rng_ids(3 + 16 + 8 + 16, seed=4)
    captured = {}
    orig = sync.teacher

    def spy(model_, x, y, layers, **kw):
        captured["prefix"] = kw.get("prefix_ids")
        return orig(model_, x, y, layers, **kw)
    monkeypatch.setattr(sync, "teacher", spy)
    sa.feed_tokens(ids[:3 + 16 + 8])
    monkeypatch.undo()
    assert len(sa.rounds) == 1
    assert captured["prefix"].tolist() == [ids[:3]]
    assert sa.context()[:3] == ids[:3] and sa.context()[3:] == ids[3 + 16:3 + 16 + 8]
    sa.feed_tokens(ids[3 + 16 + 8:])
    assert len(sa.rounds) == 2 and sa.context()[:3] == ids[:3]
    # teacher with a prefix = the model on prefix·X·Y, at Y's positions
    layers = sync.loss_layers(model)
    p, x, y = (torch.tensor([v]) for v in (ids[:3], ids[3:19], ids[19:27]))
    t = sync.teacher(model, x, y, layers, base=True, prefix_ids=p).hidden
    from absorber import lora
    with lora.disabled(model):
        full, _ = sync.forward_states(model, torch.cat([p, x, y], 1), layers)
    torch.testing.assert_close(t, full[:, -8:], rtol=0, atol=1e-6)


def _anchored(tiny_tok, rng_ids, **anchor):
    """(model, the Absorption with the anchor setting, a copy without anchor ids, x, y, teacher) on a tiny Llama,
    12 anchor tokens; then perturb() makes the adapters non-identity."""
    import torch
    from absorber import lora
    from absorber.absorb import Absorption
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.models import tiny_llama
    from absorber.stream import StreamingAbsorber
    model = tiny_llama(seed=0, vocab=512)
    cfg = AbsorberConfig(n=16, m=8, k=2, anchor_tokens=12, lora=LoraConfig(rank=2, alpha=4), **anchor)
    ab: Absorption = StreamingAbsorber(model, tiny_tok, cfg).absorption
    assert len(ab.anchor_ids) == 12
    x, y = torch.tensor([rng_ids(16, seed=1)]), torch.tensor([rng_ids(8, seed=2)])
    plain = Absorption.__new__(Absorption)
    plain.__dict__.update(ab.__dict__)
    plain.anchor_ids, plain.anchor_rows = [], []

    def perturb() -> None:
        with torch.no_grad():
            for name, p_ in lora.adapters(model).items():
                if name.endswith("lora_B"):
                    p_.normal_(0, 0.05)
    return model, ab, plain, x, y, ab._teacher(x, y), perturb


def test_anchor_term_pulls_ordinary_text_back_to_the_base_model(tiny_tok, rng_ids):
    """anchor=w: every step adds w x L1(student, base) on the fixed replay text; it is zero while the adapters
    are identity and grows with their effect on that text."""
    from absorber.config import AbsorberConfig, anchor_text
    assert len(anchor_text().split()) > 100
    _, ab, plain, x, y, t, perturb = _anchored(tiny_tok, rng_ids, anchor=1.0)
    assert float(ab._loss(x, y, t)) == pytest.approx(float(plain._loss(x, y, t)), abs=1e-7)   # B = 0
    perturb()
    extra = float(ab._loss(x, y, t)) - float(plain._loss(x, y, t))
    assert extra > 1e-4
    with pytest.raises(Exception, match="anchor"):
        AbsorberConfig(anchor=-1.0).validate()


def test_anchor_kl_is_the_base_to_student_kl_on_the_anchor_text(tiny_tok, rng_ids):
    """anchor_kl=w: every step adds w x KL(base || student) of the next-token distributions on the anchor text
    (no context): zero while the adapters are identity, equal to the KL computed by hand once they are not; the
    exporter refuses it (the traced train step does not carry it)."""
    import torch
    import torch.nn.functional as F
    from absorber import lora
    from absorber.config import AbsorberConfig
    from absorber.export import export_bundle
    from absorber.models import tiny_llama
    model, ab, plain, x, y, t, perturb = _anchored(tiny_tok, rng_ids, anchor_kl=2.0)
    assert float(ab._loss(x, y, t)) == pytest.approx(float(plain._loss(x, y, t)), abs=1e-6)   # B = 0
    perturb()
    a = torch.tensor([ab.anchor_ids])
    with torch.no_grad():
        student = F.log_softmax(model(input_ids=a).logits[0].float(), -1)
        with lora.disabled(model):
            base = F.log_softmax(model(input_ids=a).logits[0].float(), -1)
    by_hand = float((base.exp() * (base - student)).sum(-1).mean())
    assert by_hand > 1e-5
    extra = float(ab._loss(x, y, t)) - float(plain._loss(x, y, t))
    assert extra == pytest.approx(2.0 * by_hand, rel=1e-3)
    with pytest.raises(Exception, match="anchor"):
        AbsorberConfig(anchor_kl=-1.0).validate()
    with pytest.raises(Exception, match="anchor_kl > 0 is not supported by the exported train step"):
        export_bundle(tiny_llama(seed=0, vocab=512), tiny_tok, "/nonexistent/never-written", cfg=ab.cfg)


def test_a_sampled_anchor_takes_the_frozen_models_own_rows_in_turn(tiny_tok, rng_ids):
    """anchor_sampled=T: the anchor is T tokens of the frozen model's own samples cut into rows of anchor_tokens,
    one row per step in turn (the KL term then differs between rows); the same seed gives the same rows."""
    import torch
    from absorber import lora
    from absorber.protect import background_rows
    model, ab, plain, x, y, t, perturb = _anchored(tiny_tok, rng_ids, anchor_kl=1.0, anchor_sampled=48)
    assert len(ab.anchor_rows) == 4 and all(len(r) == 12 for r in ab.anchor_rows)
    again = background_rows(model, tiny_tok, 48, 0, anchor=False, row=12)
    assert again == ab.anchor_rows and ab.anchor_rows[0] != ab.anchor_ids
    perturb()
    seen = [ab.anchor_target(x.device)[0][0].tolist() for _ in range(len(ab.anchor_rows) + 1)]
    assert seen[:-1] == ab.anchor_rows and seen[-1] == ab.anchor_rows[0]
    extras = [float(ab._loss(x, y, t)) - float(plain._loss(x, y, t)) for _ in range(2)]
    assert min(extras) > 1e-6 and extras[0] != pytest.approx(extras[1], rel=1e-6)
    assert lora.adapters(model)


def test_generated_probes_are_the_base_models_own_continuation(tiny_tok, rng_ids):
    """probe_gen=G: probe j is GEN_PROBE_PROMPTS[j] + the G tokens the base model (adapters off, though they are
    not zero here) writes greedily after X·prompt; a round synchronizes both probes and Y; too many probes is a
    one-line error."""
    import torch
    from absorber import lora
    from absorber.config import GEN_PROBE_PROMPTS, AbsorberConfig, LoraConfig
    from absorber.errors import AbsorberError
    from absorber.models import tiny_llama
    from absorber.stream import StreamingAbsorber
    model = tiny_llama(seed=0, vocab=512)
    cfg = AbsorberConfig(n=16, m=8, k=1, probes=2, probe_gen=5, lora=LoraConfig(rank=2, alpha=4))
    sa = StreamingAbsorber(model, tiny_tok, cfg)
    ab = sa.absorption
    with torch.no_grad():                      # non-identity adapters: the probe must not depend on them
        for p in lora.adapters(model).values():
            p.normal_(0, 0.5)
    x = torch.tensor([rng_ids(16, seed=2)])
    probes = ab.probe_ids(x)
    assert len(probes) == 2
    for j, pr in enumerate(probes):
        prompt = tiny_tok.encode(GEN_PROBE_PROMPTS[j], add_special_tokens=False)
        assert pr.shape[1] == len(prompt) + 5 and pr[0, :len(prompt)].tolist() == prompt
        ctx = torch.cat([x, pr[:, :len(prompt)]], dim=1)
        with torch.no_grad(), lora.disabled(model):
            want = model.generate(ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=5, min_new_tokens=5,
                                  do_sample=False, repetition_penalty=1.3, pad_token_id=0)[:, ctx.shape[1]:]
        assert pr[0, len(prompt):].tolist() == want[0].tolist()
    sa.feed_tokens(rng_ids(16 + 8 + 1, seed=3))
    assert len(sa.rounds) == 1 and sa.rounds[0].steps == 3 * cfg.k          # two probes and Y
    with pytest.raises(AbsorberError, match="probe_gen"):
        AbsorberConfig(probes=5, probe_gen=8).validate()


def test_ttt_context_conditions_each_chunk_on_the_previous_one(tiny_tok, rng_ids):
    """ttt_context=c (Temp-LoRA): from the second round on, TTT's next-token loss scores X's tokens with the last c
    tokens of the previous X in front; the first round has no context; c=0 keeps X alone."""
    import torch
    import torch.nn.functional as F
    from absorber import sync
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.models import tiny_llama
    from absorber.stream import StreamingAbsorber
    ids = rng_ids(16 * 3 + 8, seed=5)
    cfg = AbsorberConfig(n=16, m=8, k=1, lr=0.0, ttt_context=6, lora=LoraConfig(rank=2, alpha=4))
    sa = StreamingAbsorber(tiny_llama(seed=0, vocab=512), tiny_tok, cfg, method="ttt")
    sa.feed_tokens(ids[:16 + 8])
    first = sa.rounds[-1].loss_first
    sa.feed_tokens(ids[16 + 8:16 * 2 + 8])
    second = sa.rounds[-1].loss_first
    model = sa.model
    with torch.no_grad():
        x1, x2 = torch.tensor([ids[:16]]), torch.tensor([ids[16:32]])
        assert first == pytest.approx(float(sync.next_token_loss(model, x1)), rel=1e-5)
        full = torch.cat([x1[:, -6:], x2], dim=1)
        logits = model(input_ids=full, use_cache=False).logits[0]
        want = F.cross_entropy(logits[5:-1].float(), full[0, 6:])       # the 16 tokens of X2, each predicted
        assert second == pytest.approx(float(want), rel=1e-5)
        assert second != pytest.approx(float(sync.next_token_loss(model, x2)), rel=1e-3)   # the context matters


def test_ntp_weight_adds_the_next_token_loss_on_x_to_the_sync_loss(tiny_tok, rng_ids):
    """ntp_weight=w: the absorber's step loss is the sync loss on Y plus w x TTT's next-token loss on X alone."""
    import torch
    from absorber import lora, sync
    from absorber.absorb import Absorption
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.errors import AbsorberError
    from absorber.models import tiny_llama
    ids = rng_ids(24, seed=7)
    x, y = torch.tensor([ids[:16]]), torch.tensor([ids[16:]])
    losses = {}
    for w in (0.0, 0.5):
        cfg = AbsorberConfig(n=16, m=8, k=1, lr=0.0, ntp_weight=w, lora=LoraConfig(rank=2, alpha=4))
        model = tiny_llama(seed=0, vocab=512)
        lora.inject(model, cfg.lora)
        ab = Absorption(model, cfg)
        losses[w] = ab.round(x, y).loss_first
        with torch.no_grad():
            ntp = float(sync.next_token_loss(ab.model, x))
    assert losses[0.5] == pytest.approx(losses[0.0] + 0.5 * ntp, rel=1e-5)
    with pytest.raises(AbsorberError, match="ntp_weight"):
        AbsorberConfig(ntp_weight=-1.0).validate()


def test_ntp_top_scores_only_the_most_surprising_tokens_of_x(tiny_tok, rng_ids):
    """ntp_top=q: the next-token term is the mean loss over the ceil(q x (n-1)) tokens of X with the largest NLL
    under the frozen model (no context); the mask is computed with the adapters off, once per X."""
    import torch
    from absorber import lora, sync
    from absorber.absorb import Absorption
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.errors import AbsorberError
    from absorber.models import tiny_llama
    ids = rng_ids(24, seed=7)
    x, y = torch.tensor([ids[:16]]), torch.tensor([ids[16:]])
    mask = sync.surprising(torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1]), 0.4)
    assert mask.tolist() == [False, True, False, True, False]
    assert sync.surprising(torch.tensor([0.5, 3.0]), 0.01).tolist() == [False, True]     # at least one
    losses = {}
    for top in (1.0, 0.25):
        cfg = AbsorberConfig(n=16, m=8, k=1, lr=0.0, ntp_weight=0.5, ntp_top=top, lora=LoraConfig(rank=2, alpha=4))
        model = tiny_llama(seed=0, vocab=512)
        lora.inject(model, cfg.lora)
        ab = Absorption(model, cfg)
        torch.manual_seed(1)                        # the same adapters for both settings
        with torch.no_grad():                       # adapters not identity: the mask must still be the base's
            for name, p_ in lora.adapters(model).items():
                if name.endswith("lora_B"):
                    p_.normal_(0, 0.05)
            per = sync.next_token_loss(model, x, reduction="none")
            with lora.disabled(model):
                base = sync.next_token_loss(model, x, reduction="none")
        losses[top] = ab.round(x, y).loss_first
        if top < 1:
            m = ab._ntp_mask(x)
            assert int(m.sum()) == 4 and torch.equal(m, sync.surprising(base, top))
    keep = sync.surprising(base, 0.25)
    assert losses[0.25] - losses[1.0] == pytest.approx(0.5 * (float(per[keep].mean()) - float(per.mean())), rel=1e-4)
    with pytest.raises(AbsorberError, match="ntp_top"):
        AbsorberConfig(ntp_top=0.0).validate()


def test_tfidf_selection_prefers_neurons_the_text_uses_and_the_background_does_not():
    """lora.sparse: access counts are top-k per row; tf-idf ranks a neuron used by X and rare in the background
    above one used as often by X but by every background token."""
    import torch
    from absorber import lora
    acts = torch.zeros(4, 6)
    acts[:, 1] = 5.0          # every row: neurons 1 and 4 are the two largest
    acts[:, 4] = 3.0
    acts[0, 2] = 9.0          # row 0 only: neuron 2 beats neuron 4
    assert lora.access_counts(acts, top=2).tolist() == [0, 4, 1, 0, 3, 0]
    tf = torch.tensor([0.0, 4.0, 0.0, 0.0, 4.0, 0.0], dtype=torch.float64)
    background = torch.tensor([0.0, 100.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)   # neuron 1: every token
    assert lora.tfidf_select(tf, background, 100, 1).tolist() == [4]


def test_sparse_values_train_only_the_selected_neurons_and_accumulate(tiny_tok, rng_ids):
    """lora.sparse=t: a round trains the values of t neurons per down_proj (the ones X uses against the
    background); the next round commits them into the frozen delta and moves on; the teacher (adapters off)
    is the base model; the export refuses it."""
    import torch
    from absorber import lora
    from absorber.absorb import Absorption
    from absorber.config import AbsorberConfig, LoraConfig, override
    from absorber.errors import AbsorberError
    from absorber.models import tiny_llama
    ids = rng_ids(72, seed=3)
    cfg = AbsorberConfig(n=24, m=12, k=3, lr=1e-2, lora=LoraConfig(sparse=4))
    model = tiny_llama(seed=0, vocab=512)
    base_logits = model(torch.tensor([ids[:20]])).logits
    params = lora.inject(model, cfg.lora)
    mods = lora.sparse_modules(model)
    assert mods and all(n.endswith("mlp.down_proj") for n in mods)
    assert {n.rsplit(".", 1)[-1] for n in params} == {"sparse_V", "sparse_delta"}
    ab = Absorption(model, cfg)
    ab.background_ids = ids[48:72]
    assert all(not p.requires_grad for n, p in params.items() if n.endswith("sparse_delta"))
    x1, y1 = torch.tensor([ids[:24]]), torch.tensor([ids[24:36]])
    r1 = ab.round(x1, y1)
    assert r1.steps == 3 and r1.loss_last < r1.loss_first
    m = next(iter(mods.values()))
    first_idx = m.idx.clone()
    assert m.background_tokens == 24 + 24 and float(m.access.sum()) == 48 * min(lora.ACCESS_TOP, m.access.numel())
    assert bool(m.sparse_V.any()) and not bool(m.sparse_delta.any())
    with lora.disabled(model):   # adapters off: the frozen model exactly
        assert torch.equal(model(torch.tensor([ids[:20]])).logits, base_logits)
    v1 = m.sparse_V.detach().clone()
    ab.round(torch.tensor([ids[12:36]]), torch.tensor([ids[36:48]]))
    rows = m.sparse_delta.detach().abs().sum(-1) > 0
    assert set(rows.nonzero().flatten().tolist()) == set(first_idx.tolist())   # only round 1's neurons committed
    assert torch.allclose(m.sparse_delta[first_idx], v1)
    lora.load_state(model, {n: torch.zeros_like(p) for n, p in lora.adapters(model).items()})   # a fresh stream
    assert not m.committed and m.background_tokens == 0
    with pytest.raises(AbsorberError, match="sparse"):
        override(cfg, sparse=-1).validate()
    from absorber.export.bundle import trace
    with pytest.raises(AbsorberError, match="sparse"):
        trace(tiny_llama(seed=0, vocab=512), cfg=cfg)


def test_protected_subspace_silences_the_adapters_on_background_directions(tiny_tok, rng_ids):
    """lora.protect: each LoRA layer's input loses the top principal directions of its background inputs; the
    adapter then gives nothing on an input inside them and the same as plain LoRA on one orthogonal to them;
    the streaming loop sets them once per adapted model; the export refuses it."""
    import torch
    from absorber import lora, protect
    from absorber.config import AbsorberConfig, LoraConfig, override
    from absorber.errors import AbsorberError
    from absorber.models import tiny_llama
    from absorber.stream import StreamingAbsorber
    g = torch.randn(8, 8, dtype=torch.float64)
    u = protect.top_directions(g @ g.T, 0.25)
    assert u.shape == (8, 2) and torch.allclose(u.T @ u, torch.eye(2, dtype=torch.float64), atol=1e-9)
    assert protect.residual_energy(torch.eye(8, dtype=torch.float64), u) == pytest.approx(0.75)
    lin = lora.LoraLinear(torch.nn.Linear(8, 5), rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lin.lora_B.normal_()
    lin.protect_U = u.float()
    inside, off = (u.float() @ torch.tensor([1.0, -2.0])), torch.randn(8)
    off = off - u.float() @ (u.float().T @ off)
    with torch.no_grad():
        assert torch.allclose(lin(inside), lin.base(inside), atol=1e-5)
        plain = lin.base(off) + (off @ lin.lora_A @ lin.lora_B) * lin.scaling
        assert torch.allclose(lin(off), plain, atol=1e-5)
    cfg = AbsorberConfig(n=24, m=12, k=2, lr=1e-2, lora=LoraConfig(protect=0.5, protect_tokens=64))
    model = tiny_llama(seed=0, vocab=512)
    sa = StreamingAbsorber(model, tiny_tok, cfg)
    mods = [m for m in model.modules() if isinstance(m, lora.LoraLinear)]
    assert mods and all(m.protect_U is not None and m.protect_U.shape[1] == round(0.5 * m.lora_A.shape[0])
                        for m in mods)
    first = mods[0].protect_U.clone()
    StreamingAbsorber(model, tiny_tok, cfg)        # the same adapted model: the directions are kept, not redrawn
    assert torch.equal(mods[0].protect_U, first)
    sa.feed_tokens(rng_ids(40, seed=4))
    assert len(sa.rounds) == 1 and sa.rounds[0].loss_last < sa.rounds[0].loss_first
    with pytest.raises(AbsorberError, match="protect"):
        override(cfg, protect=1.0).validate()
    from absorber.export.bundle import trace
    with pytest.raises(AbsorberError, match="protect"):
        trace(tiny_llama(seed=0, vocab=512), cfg=cfg)


def test_ntp_context_conditions_the_next_token_term_on_the_previous_x(tiny_tok, rng_ids):
    """ntp_context=c: from the second round on, the hybrid's next-token term scores X after the last c tokens
    of the previous round's X (not scored), exactly sync.next_token_loss with that context; the export refuses it."""
    import torch
    from absorber import sync
    from absorber.absorb import Absorption
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.errors import AbsorberError
    from absorber.models import tiny_llama
    ids = rng_ids(60, seed=5)
    cfg = AbsorberConfig(n=16, m=8, k=1, lr=1e-2, ntp_weight=1.0, ntp_context=6, lora=LoraConfig(rank=2, alpha=4))
    model = tiny_llama(seed=0, vocab=512)
    from absorber import lora
    lora.inject(model, cfg.lora)
    ab = Absorption(model, cfg)
    x1, y1 = torch.tensor([ids[:16]]), torch.tensor([ids[16:24]])
    ab.round(x1, y1)
    assert ab._ttt_context.tolist() == [ids[10:16]]
    x2, y2 = torch.tensor([ids[16:32]]), torch.tensor([ids[32:40]])
    t = ab._teacher(x2, y2)
    sync_only = Absorption.__new__(Absorption)
    sync_only.__dict__.update(ab.__dict__)
    sync_only.cfg = AbsorberConfig(n=16, m=8, k=1, ntp_weight=0.0, lora=cfg.lora)
    with torch.no_grad():
        extra = float(ab._loss(x2, y2, t)) - float(sync_only._loss(x2, y2, t))
        by_hand = float(sync.next_token_loss(model, x2, torch.tensor([ids[10:16]])))
        alone = float(sync.next_token_loss(model, x2))
    assert extra == pytest.approx(by_hand, rel=1e-4) and by_hand != pytest.approx(alone, rel=1e-4)
    with pytest.raises(AbsorberError, match="ntp_context"):
        AbsorberConfig(ntp_context=-1).validate()
    from absorber.export.bundle import trace
    with pytest.raises(AbsorberError, match="ntp_context"):
        trace(tiny_llama(seed=0, vocab=512), cfg=cfg)


def test_calibration_subtracts_the_adapters_context_free_shift_and_never_touches_training(tiny_tok, rng_ids):
    """calibrate=T: after each round the adapters' mean log-prob shift over the frozen model's own samples is
    measured and subtracted from the logits wherever the model predicts; rounds train exactly as without it;
    a model reused for another stream keeps one hook; the export refuses it."""
    import torch
    from absorber import lora
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.errors import AbsorberError
    from absorber.models import tiny_llama
    from absorber.stream import StreamingAbsorber
    ids = rng_ids(40, seed=6)
    cfg = AbsorberConfig(n=24, m=12, k=3, lr=3e-2, calibrate=48, lora=LoraConfig(rank=2, alpha=4))
    plain_cfg = AbsorberConfig(n=24, m=12, k=3, lr=3e-2, lora=LoraConfig(rank=2, alpha=4))
    runs = {}
    for name, c in (("calibrated", cfg), ("plain", plain_cfg)):
        model = tiny_llama(seed=0, vocab=512)
        sa = StreamingAbsorber(model, tiny_tok, c)
        sa.feed_tokens(ids)
        runs[name] = (model, sa)
    model, sa = runs["calibrated"]
    assert len(sa.rounds) == 1 and sa.calibration is not None and len(sa.calibration.rows) == 1
    for a, b in zip(lora.snapshot(model).values(), lora.snapshot(runs["plain"][0]).values()):
        assert torch.equal(a, b)                            # training saw no correction
    probe = torch.tensor([rng_ids(10, seed=7)])
    with torch.no_grad():
        corrected = model(input_ids=probe).logits
        with sa.calibration.off():
            raw = model(input_ids=probe).logits
        row = torch.tensor([sa.calibration.rows[0]])
        with sa.calibration.off():
            lp_a = torch.log_softmax(model(input_ids=row).logits[0, :-1], -1)
            with lora.disabled(model):
                lp_b = torch.log_softmax(model(input_ids=row).logits[0, :-1], -1)
    shift = (lp_a - lp_b).mean(0)
    assert float(shift.abs().max()) > 1e-4
    assert torch.allclose(sa.calibration.shift, shift, atol=1e-5)
    assert torch.allclose(corrected, raw - shift, atol=1e-5)
    StreamingAbsorber(model, tiny_tok, cfg)               # the same model for a new stream: the old hook goes
    assert len(model.get_output_embeddings()._forward_hooks) == 1
    StreamingAbsorber(model, tiny_tok, plain_cfg)
    assert len(model.get_output_embeddings()._forward_hooks) == 0
    with pytest.raises(AbsorberError, match="calibrate"):
        AbsorberConfig(calibrate=-1).validate()
    from absorber.export.bundle import trace
    with pytest.raises(AbsorberError, match="calibrate"):
        trace(tiny_llama(seed=0, vocab=512), cfg=cfg)


@pytest.mark.parametrize("mode", ["recent", "reservoir"])
def test_replay_adds_the_next_token_term_on_a_kept_x_in_turn(rng_ids, mode):
    """replay=R: the absorber keeps at most R earlier X (the last R, or a uniform reservoir sample) and every step
    adds the next-token term on one of them in turn (or on its slices of replay_tokens); the export refuses it."""
    import torch
    from absorber import lora, sync
    from absorber.absorb import Absorption
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.errors import AbsorberError
    from absorber.models import tiny_llama
    ids = rng_ids(16 * 6 + 8, seed=3)
    cfg = AbsorberConfig(n=16, m=8, k=2, lr=1e-2, ntp_weight=1.0, replay=2, replay_mode=mode,
                         lora=LoraConfig(rank=2, alpha=4))
    model = tiny_llama(seed=0, vocab=512)
    lora.inject(model, cfg.lora)
    ab = Absorption(model, cfg)
    xs = [torch.tensor([ids[16 * i:16 * (i + 1)]]) for i in range(6)]
    for i in range(5):
        ab.round(xs[i], xs[i + 1][:, :8])
    kept = ab.replay.kept
    assert len(kept) == 2 and all(k in [x[0].tolist() for x in xs[:5]] for k in kept)
    if mode == "recent":
        assert kept == [xs[3][0].tolist(), xs[4][0].tolist()]
    x, y = xs[5], torch.tensor([ids[96:104]])
    t = ab._teacher(x, y)
    plain = Absorption.__new__(Absorption)
    plain.__dict__.update(ab.__dict__)
    plain.replay = dataclasses.replace(ab.replay, kept=[])
    for _ in range(2):
        old = ab.replay.kept[ab.replay.turn % 2]
        with torch.no_grad():
            extra = float(ab._loss(x, y, t)) - float(plain._loss(x, y, t))
            by_hand = float(sync.next_token_loss(model, torch.tensor([old])))
        assert extra == pytest.approx(by_hand, rel=1e-4)
    ab.replay.tokens = 6
    turn = ab.replay.turn
    old = ab.replay.kept[turn % 2]
    start = min((turn // 2) % 3 * 6, 10)      # three slices of 6 in 16 tokens; the last one ends at X's end
    assert ab._replay_slice(x).tolist() == [old[start:start + 6]]
    for bad in (dict(replay=-1), dict(replay=2, replay_tokens=1), dict(replay=2, replay_mode="lru"),
                dict(replay=2, ntp_weight=0.0), dict(replay=2, replay_steps=-1), dict(replay=2, ntp_top=0.5)):
        with pytest.raises(AbsorberError, match="replay"):
            AbsorberConfig(**bad).validate()
    from absorber.export.bundle import trace
    with pytest.raises(AbsorberError, match="replay"):
        trace(tiny_llama(seed=0, vocab=512), cfg=cfg)


def test_replay_steps_run_after_k_with_a_kept_x_in_place_of_x(rng_ids):
    """replay_steps=J: once an X is kept, a round runs K steps on (Y, X) then J steps on (Y, a kept X in turn), no
    term added to the first K; the round's last reported loss is on (Y, X) again."""
    import torch
    from absorber import lora
    from absorber.absorb import Absorption
    from absorber.config import AbsorberConfig, LoraConfig
    from absorber.models import tiny_llama
    ids = rng_ids(16 * 4 + 8, seed=4)
    cfg = AbsorberConfig(n=16, m=8, k=2, lr=1e-2, ntp_weight=1.0, replay=2, replay_steps=3,
                         lora=LoraConfig(rank=2, alpha=4))
    model = tiny_llama(seed=0, vocab=512)
    lora.inject(model, cfg.lora)
    ab = Absorption(model, cfg)
    seen: list[list[int]] = []
    real = ab._loss
    ab._loss = lambda x, y, t: (seen.append(x[0].tolist()), real(x, y, t))[1]
    xs = [torch.tensor([ids[16 * i:16 * (i + 1)]]) for i in range(4)]
    steps = [ab.round(xs[i], xs[i + 1][:, :8]).steps for i in range(3)]
    assert steps == [2, 5, 5]
    x0, x1, x2 = (x[0].tolist() for x in xs[:3])
    # round 1 keeps nothing yet; round 2 replays x0 three times; round 3 goes on in turn (x1, x0, x1)
    assert seen == [x0] * 3 + [x1] * 2 + [x0] * 3 + [x1] + [x2] * 2 + [x1, x0, x1] + [x2]


def test_spaced_replay_schedule_and_resume():
    """replay_mode="spaced": each kept X is replayed 1, 3, 9, 27 rounds after it was absorbed (powers of 3 up to the
    capacity), older texts first in a round, spare steps on the newest text; a state saved and loaded mid-stream
    (after a round cut short, as a rollback does) goes on with the same texts as the uninterrupted one; "spaced2"
    at the powers of 2."""
    from absorber.replay import Replay, spaced_distances
    assert spaced_distances(27) == spaced_distances(80) == [1, 3, 9, 27] and spaced_distances(2) == [1]

    def run(r: Replay, rounds: range, calls=lambda t: 4) -> dict[int, list[int]]:
        got = {}
        for t in rounds:        # round t absorbs text t; before it, the replay steps take kept texts
            got[t] = [r.next()[0] for _ in range(calls(t))] if r.kept else []
            r.keep([t] * 5)
        return got

    whole = run(Replay(27, "spaced"), range(1, 41))
    assert whole[1] == [] and whole[2] == [1, 1, 1, 1]                       # only text 1 kept: due at 1, spare
    assert [5 - c for c in whole[5]] == [3, 1, 1, 1]                        # text 2 at 3, text 4 at 1, spare
    for t in range(28, 41):                                                  # steady state: one text per distance
        assert [t - c for c in whole[t]] == [27, 9, 3, 1]
    for c in range(1, 14):                                                   # every text at each distance, in time
        assert {d for d in (1, 3, 9, 27) if c in whole[c + d]} == {1, 3, 9, 27}
    a = Replay(27, "spaced")
    first = run(a, range(1, 17), calls=lambda t: 2 if t == 12 else 4)        # round 12 cut short after 2 steps
    flat, lengths = a.to_state()
    b = Replay(27, "spaced")
    b.load_state(flat, lengths, a.counters)
    assert b == a and b.counters["served"] > 0
    assert run(b, range(17, 41)) == run(a, range(17, 41))
    assert first[12] == whole[12][:2] and first[13] != whole[13]            # the skipped due texts come next
    # "spaced2": the powers of 2, six due texts a round at a capacity of 32, each text at every distance in time
    assert spaced_distances(32, 2) == [1, 2, 4, 8, 16, 32]
    from absorber.config import AbsorberConfig
    with pytest.warns(UserWarning, match="replay_steps 6"):                  # fewer steps than due texts: said
        AbsorberConfig(ntp_weight=1.0, replay=32, replay_steps=4, replay_mode="spaced2").validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AbsorberConfig(ntp_weight=1.0, replay=32, replay_steps=6, replay_mode="spaced2").validate()
        AbsorberConfig(ntp_weight=1.0, replay=32, replay_steps=4, replay_mode="spaced").validate()
    two = run(Replay(32, "spaced2"), range(1, 45), calls=lambda t: 6)
    assert [5 - c for c in two[5]] == [4, 2, 1, 1, 1, 1]
    for t in range(34, 45):
        assert [t - c for c in two[t]] == [32, 16, 8, 4, 2, 1]
    for c in range(1, 13):
        assert {d for d in (1, 2, 4, 8, 16, 32) if c in two[c + d]} == {1, 2, 4, 8, 16, 32}


def test_run_cli_replay_mode_reaches_the_stream(tiny_bundle, tmp_path):
    """`absorber run --replay-mode spaced` trains the stream with the spaced schedule: its saved replay counters
    have served due replays (the recent default never counts any)."""
    from absorber.cli import main
    from absorber.runtime import Stream
    inp = tmp_path / "in.txt"
    inp.write_text("the committee met on tuesday and agreed on the new budget for the coming year. " * 6)
    over = {"replay": 3, "replay_steps": 2}
    for mode in ("spaced", "recent"):
        st = tmp_path / mode
        flags = ["--replay-mode", mode] if mode == "spaced" else []
        assert main(["run", str(tiny_bundle), "--input", str(inp), "--state", str(st), "--replay", "3",
                     "--replay-steps", "2", *flags, "-q", "--max-new-tokens", "0"]) == 0
        s = Stream.open(tiny_bundle, state_dir=st, config_overrides=over)
        assert s.rounds >= 3 and len(s.replay_buffer.kept) == 3
        assert (s.replay_buffer.served > 0) == (mode == "spaced")


@pytest.mark.parametrize("mode", ["recent", "reservoir", "spaced"])
def test_runtime_replay_steps_match_reference_and_resume(tiny_bundle, tiny_tok, tmp_path, mode):
    """replay=2, replay_steps=2: the runtime keeps, draws and trains on the same earlier X as the reference (the
    same steps, losses and adapters over four rounds), and a stream saved after two rounds and resumed holds the
    same kept texts and goes on as the uninterrupted one; replay_steps 0 is refused at run time."""
    from absorber import lora
    from absorber.errors import AbsorberError
    from absorber.runtime import Stream
    from absorber.stream import StreamingAbsorber
    over = {"replay": 3 if mode == "spaced" else 2, "replay_steps": 2, "replay_mode": mode, "k": 2}
    cfg, model = _reference_on_bundle(tiny_bundle, over)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 259, (cfg.n * 4 + cfg.m + 3,), generator=g).tolist()
    ref = StreamingAbsorber(model, tiny_tok, cfg)
    rr = ref.feed_tokens(ids)
    s = Stream.open(tiny_bundle, config_overrides=over)
    ro = s.feed_tokens(ids)
    assert len(rr) == len(ro) == 4
    assert [r.steps for r in ro] == [r.steps for r in rr] == [2, 4, 4, 4]
    for a, b in zip(rr, ro):
        assert b.loss_first == pytest.approx(a.loss_first, rel=2e-3)
        assert b.loss_last == pytest.approx(a.loss_last, rel=2e-3)
    assert s.replay_buffer.kept == ref.absorption.replay.kept and s.replay_buffer.turn == ref.absorption.replay.turn
    snap = lora.snapshot(model)
    flat = np.concatenate([snap[n].numpy().ravel() for n in s.opt.names])
    assert np.linalg.norm(s.opt.params - flat) / np.linalg.norm(flat) < 2e-3
    cut = cfg.n * 2 + cfg.m
    a = Stream.open(tiny_bundle, state_dir=tmp_path / "st", config_overrides=over)
    a.feed_tokens(ids[:cut])
    a.save()
    b = Stream.open(tiny_bundle, state_dir=tmp_path / "st", config_overrides=over)
    assert b.replay_buffer == a.replay_buffer and len(b.replay_buffer.kept) == 2
    b.feed_tokens(ids[cut:])
    np.testing.assert_allclose(b.opt.params, s.opt.params, rtol=0, atol=1e-6)
    with pytest.raises(AbsorberError, match="replay_steps"):
        Stream.open(tiny_bundle, config_overrides={"replay": 2})


def test_cued_recall_asks_each_fact_by_its_own_words_on_the_same_adapters(tiny_model, tiny_tok):
    """RetentionSettings.cued: every record also keeps per-token NLLs of the fact asked by its sentence's words up
    to the answer (facts.cued) and of its decoy under the same cue: window and full from the base model, the
    adapters alone and the mixture (the method's reading) on the same adapters; the question's records unchanged."""
    f = FX.make_facts(13, seed=1)[0]
    c = FX.cued(f)
    assert c.cue.startswith("\n") and c.cue[1:] + f.answer in f.statement.lstrip() and c.answer == f.answer
    q, a = FX.prompt_ids(tiny_tok, c)
    assert tiny_tok.decode(q) == c.cue and tiny_tok.decode(a) == f.answer
    d = FX.decoys([f])[0]
    assert FX.cued(d, said=f).cue == c.cue and FX.cued(d, said=f).answer == d.answer
    with pytest.raises(ValueError, match="not in its statement"):
        FX.cued(d)                                   # a decoy's answer was never said
    for fact in FX.make_facts(26, seed=2):           # every template's answer is said in its sentence
        FX.cued(fact)

    text = tiny_tok.encode("The council met on a cold morning. Everyone spoke at length. " * 60,
                           add_special_tokens=False)
    held = tiny_tok.encode("An unrelated speech about farming and rivers. " * 10, add_special_tokens=False)
    cfg = AbsorberConfig(n=64, m=32, k=2, lr=1e-2, mix=True, mix_share=0.01, mix_window=8)
    plain = RT.RetentionSettings(facts=3, plant_rounds=2, distances=(1, 2), heldout_tokens=0, bootstrap=0)
    rs = dataclasses.replace(plain, cued=True, recite=3, restate=4, mix_shares=(0.0,))
    res = RT.forgetting_curve(tiny_model, tiny_tok, [("t", text)], held, [("mx", "absorber", cfg)], rs)
    ref = RT.forgetting_curve(tiny_model, tiny_tok, [("t", text)], held, [("mx", "absorber", cfg)], plain)
    recs = res["methods"]["mx"]["records"]
    assert len(recs) == 6
    for r, r0 in zip(recs, ref["methods"]["mx"]["records"]):
        assert {k: v for k, v in r.items() if k in r0} == r0        # the question's scores as without the cue
        cu = r["cued"]
        n_ans = len(FX.prompt_ids(tiny_tok, FX.make_facts(3, seed=0)[r["fact"]])[1])
        assert all(len(cu[k]) == n_ans for k in ("window", "full", "method", "alone", "method_mix0", "alone_decoy")
                   if "decoy" not in k)
        assert cu["method"] == cu["method_mix0.01w8"] and cu["method"] != cu["alone"]
        assert cu["window"] != cu["full"] and cu["window"] != cu["window_decoy"]
        # the recitation: each condition's own words after the question, then "Answer:"
        rc = r["recited"]
        q = FX.make_facts(3, seed=0)[r["fact"]].question
        for who in ("window", "full", "method"):
            c = rc["cues"][who]
            assert c.startswith(RT.RECITE_PROMPT.format(question=q)) and c.endswith("\nAnswer:")
            assert len(rc[who]) == n_ans
        assert rc["method"] == rc["method_mix0.01w8"] and len(rc["alone_decoy"]) == len(rc["window_decoy"])
        # the restatement: the question prompt, then each condition's own lead-in (the examples not scored)
        rs_ = r["restated"]
        for who in ("window", "full", "method"):
            c = rs_["cues"][who]
            assert c.startswith(FX.QUESTION_PROMPT.format(question=q)) and "Lead:" not in c
            assert len(rs_[who]) == n_ans
        assert rs_["method"] == rs_["method_mix0.01w8"]
    # the per-token sums equal answer_nlls on the cued facts after the same context
    fs = FX.make_facts(3, seed=0)
    ctx = tiny_tok.encode("Everyone spoke at length.", add_special_tokens=False)
    per = RT.answer_token_nlls(tiny_model, tiny_tok, ctx, [FX.cued(x) for x in fs])
    tot = RT.answer_nlls(tiny_model, tiny_tok, ctx, [FX.cued(x) for x in fs])
    assert np.allclose([sum(p) for p in per], tot, rtol=1e-5)


def test_answer_slot_lead_cuts_where_a_guessed_answer_starts():
    q = "Which teacher from Cedar Hollow did the speaker thank?"
    assert RT.answer_slot_lead("The speaker thanked the teacher from Cedar Hollow", q) == \
        "The speaker thanked the teacher from Cedar Hollow"          # the question's own names stay
    assert RT.answer_slot_lead("The state will open 81 factories.", "How many factories opened?") == \
        "The state will open"
    assert RT.answer_slot_lead("The bridge will open in the month of August.", "In which month?") == \
        "The bridge will open in the month of"
    assert RT.answer_slot_lead("The new space agency will be headed by", "Who heads it?") == \
        "The new space agency will be headed by"
    assert RT.answer_slot_lead("1999 was the year", "In what year?") == ""


def test_restater_shared_asks_every_condition_after_the_windows_lead(tiny_model, tiny_tok):
    f = FX.make_facts(1, seed=3)[0]
    ctx = tiny_tok.encode("Everyone spoke at length.", add_special_tokens=False)
    own = RT.restater(tiny_tok, 4)
    shared = RT.restater(tiny_tok, 4, shared=True)
    lead = shared("window", tiny_model, ctx, f)
    assert lead == own("window", tiny_model, ctx, f) and lead.startswith(FX.QUESTION_PROMPT.format(question=f.question))
    # the other conditions do not write: they are asked after the window's lead (no model needed)
    assert shared("full", None, ctx + ctx, f) == shared("method", None, ctx, f) == lead
    with pytest.raises(AttributeError):
        own("method", None, ctx, f)


def test_greedy_ids_follow_the_argmax_without_a_cache_and_stop(tiny_model, tiny_tok):
    prefix = tiny_tok.encode("The council met on a cold morning.", add_special_tokens=False)
    got = RT.greedy_ids(tiny_model, prefix, 6, set())
    ids = list(prefix)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(tiny_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prefix):]
    assert RT.greedy_ids(tiny_model, prefix, 6, {got[2]}) == got[:got.index(got[2])]
