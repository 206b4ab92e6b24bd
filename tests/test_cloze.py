"""Cloze probes (AbsorberConfig.cloze, absorber/cloze.py): X's sentences asked back as questions, cut before their
most surprising word or the name it ends."""
import pytest

from absorber import cloze

END, OPEN, ASK = 99, [90, 91], [92, 93]
STARTS, CAPS = set(range(10, 20)), set(range(15, 20))     # word starts; the capitalized ones
SETS = {"open": OPEN, "ask": ASK, "q_open": [94], "q_answer": [95]}


def probes(ids, s, count):
    """The round's probes of X in the cloze frame (Absorption.cloze_text without cloze_gen)."""
    return [cloze.probe(ids, a, at, b, SETS) for a, at, b in cloze.choose(ids, s, {END}, STARTS, CAPS, count)]


def test_a_sentence_is_cut_before_its_most_surprising_word_moved_back_over_a_name():
    # words start at 10 (plain), 15 and 16 (capitalized, a name); 16's word (16, 6) is the most surprising
    ids = [1, 2, 3, 10, 4, 15, 5, 16, 6, END]
    s = [0, 1, 1, 1, 5, 0, 2, 2, 9, 0]
    assert cloze.cut(ids, s, 0, len(ids), STARTS, CAPS) == (11, 5)
    got = probes(ids, s, 4)
    assert got == [OPEN + [1, 2, 3, 10, 4] + ASK + [15, 5, 16, 6, END]]
    # with a generated question: the question frame, the answer the same rest of the sentence
    assert cloze.probe(ids, 0, 5, len(ids), SETS, [7, 8]) == [94, 7, 8, 95, 15, 5, 16, 6, END]
    # a plain word is not moved back: the same sentence with 16 not capitalized is cut before it
    assert cloze.cut(ids, s, 0, len(ids), STARTS, {15}) == (11, 7)
    # the first min_words tokens are never a cut, and a word in them does not count
    assert cloze.cut([10, 16, 6, 1, END], [9, 9, 9, 0, 0], 0, 5, STARTS, CAPS) is None


def test_the_most_surprising_sentences_win_in_x_order_and_an_unfinished_tail_is_left():
    a = [1, 2, 3, 10, 4, END]            # cut word (10, 4) surprise 3
    b = [1, 2, 3, 11, 4, END]            # 8
    c = [1, 2, 3, 12, 4, END]            # 5
    tail = [1, 2, 3, 13, 4]              # no sentence end: not a sentence
    ids = a + b + c + tail
    s = [1, 1, 1, 2, 1, 0] + [1, 1, 1, 6, 2, 0] + [1, 1, 1, 4, 1, 0] + [1, 1, 1, 50, 50]
    assert cloze.sentences(ids, {END}) == [(0, 6), (6, 12), (12, 18)]
    got = probes(ids, s, 2)
    assert got == [OPEN + [1, 2, 3] + ASK + [11, 4, END], OPEN + [1, 2, 3] + ASK + [12, 4, END]]
    assert probes(ids, s, 0) == []


def test_word_starts_and_question_marks_come_from_the_vocabulary(tiny_tok):
    starts, caps = cloze.word_start_ids(tiny_tok)
    # the byte-level tiny tokenizer: the bare space begins every word; no token is a capitalized word
    assert starts == {tiny_tok.encode(" ", add_special_tokens=False)[0]} and caps == set()
    q = tiny_tok.encode("?", add_special_tokens=False)[0]
    assert cloze.question_mark_ids(tiny_tok) == {q}
    # a generated question ends at its first "?"; without one there is none
    assert cloze.question_ids([5, 6, q, 7, q], {q}) == [5, 6, q]
    assert cloze.question_ids([5, 6, 7], {q}) is None


def test_a_round_writes_x_and_its_probes_and_replays_them(tiny_model, tiny_tok):
    torch = pytest.importorskip("torch")
    import copy

    from absorber import lora
    from absorber.absorb import Absorption
    from absorber.config import AbsorberConfig
    from absorber.errors import AbsorberError
    text = "The office will be run by Judge Tom Hale. We met on a cold day. The bridge opens in May. "
    ids = tiny_tok.encode(text * 3, add_special_tokens=False)
    x, y = torch.tensor([ids[:96]]), torch.tensor([ids[96:128]])
    sets = cloze.token_sets(tiny_tok)
    out = {}
    for n_probes in (0, 2):
        m = copy.deepcopy(tiny_model)
        cfg = AbsorberConfig(n=96, m=32, k=2, lr=1e-2, cloze=n_probes, replay=2, replay_steps=1)
        lora.inject(m, cfg.lora)
        ab = Absorption(m, cfg, "absorber")
        ab.cloze_tokens = sets
        r = ab.round(x, y)
        out[n_probes] = (r.loss_first, ab.replay.kept[0])
    # the kept text (what replay writes again) is X, then X's two probes, each in its frame
    kept = out[2][1]
    assert kept[:96] == ids[:96] and len(kept) > 96
    assert kept[96:96 + len(sets["open"])] == sets["open"]
    assert sum(1 for i in range(96, len(kept)) if kept[i:i + len(sets["ask"])] == sets["ask"]) == 2
    assert out[0][1] == ids[:96] and out[0][0] != out[2][0]
    with pytest.raises(AbsorberError, match="cloze"):
        AbsorberConfig(cloze=2, ntp_weight=0.0).validate()
    # a reference option: the exporter refuses it rather than write a bundle that drops it
    from absorber.export import export_bundle
    with pytest.raises(AbsorberError, match="cloze=2 is not supported by the exporter"):
        export_bundle(tiny_model, tiny_tok, "/nonexistent/never-written", cfg=AbsorberConfig(cloze=2))
