"""Cloze probes (AbsorberConfig.cloze): X's own sentences asked back as questions, written into the adapters with
the next-token term beside X.

What the adapters keep of a planted fact after the shipped write is the answer's continuation, not its start:
given the answer's first token they complete the name (0.0-0.2 nats a token), but they do not produce that first token
from a question any better than the base model (benchmarks/retention.md, "Where a kept name is lost"). The
next-token term trains "… will be run by" → "Thaddeus" inside the statement, and a question asks in other words
and another frame. A cloze probe puts X's own sentence in a question frame, cut before its most surprising word or
the name that word ends (for the frozen model, X before it in context: where names and numbers are, found without
knowing what the facts are):

    "\\nQ: The budget office will be run by …?\\nA: Thaddeus Kettleborough, who balanced three budgets before."

so that the term also trains the answer's start after a question. The frame is not the forgetting curve's
("\\nQuestion: … \\nAnswer:", absorber/facts.py), and the question is the statement's own words, not the curve's
reworded question. Measured on one speech: neither form moves retention eight rounds after eviction
(benchmarks/retention.md); a reference option. Torch-free: token ids in, token ids out.
"""
from __future__ import annotations

from collections.abc import Sequence

CLOZE_OPEN = "\nQ:"           # before the sentence's words up to the cut
CLOZE_ASK = " …?\nA:"         # after them, before the rest of the sentence


def word_start_ids(tok) -> tuple[set[int], set[int]]:
    """(ids of tokens that begin a word: their text is a space then a non-space, or a bare space, which begins a
    number in tokenizers that split digits; the subset of those whose word is capitalized)."""
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    starts, caps = set(), set()
    for piece, i in vocab.items():
        s = tok.convert_tokens_to_string([piece]) if hasattr(tok, "convert_tokens_to_string") else piece
        if s == " " or (s[:1] == " " and s[1:2].strip()):
            starts.add(i)
            if s[1:2].isupper():
                caps.add(i)
    return starts, caps


def sentences(ids: Sequence[int], ends: set[int]) -> list[tuple[int, int]]:
    """[start, end) of each complete sentence of ids (the text up to a sentence end; an unfinished tail is left)."""
    out, start = [], 0
    for i, t in enumerate(ids):
        if t in ends:
            out.append((start, i + 1))
            start = i + 1
    return out


def cut(ids: Sequence[int], surprise: Sequence[float], a: int, b: int, starts: set[int], caps: set[int],
        min_words: int = 3) -> tuple[float, int] | None:
    """Where the sentence ids[a:b] is cut, and that word's surprise: its most surprising word (the summed NLL of
    the word's tokens for the frozen model; surprise[i] is token i's) after its first `min_words` tokens, moved
    back to the start of the run of capitalized words it ends (a name: "Judge Ottilie Penhallow" is cut before
    "Judge", not inside). None: no word to cut at."""
    words = [i for i in range(a + min_words, b - 1) if ids[i] in starts]
    if not words:
        return None
    bounds = words[1:] + [b - 1]
    score, at = max((sum(surprise[w:e]), w) for w, e in zip(words, bounds))
    k = words.index(at)
    while k > 0 and ids[at] in caps and ids[words[k - 1]] in caps:
        k -= 1
        at = words[k]
    return score, at


def choose(ids: Sequence[int], surprise: Sequence[float], ends: set[int], starts: set[int], caps: set[int],
           count: int, min_words: int = 3) -> list[tuple[int, int, int]]:
    """Up to `count` sentences of X to ask back, as (start, cut, end), in X's order: the sentences whose cut word
    (cut()) is most surprising."""
    if count <= 0:
        return []
    cands = []
    for a, b in sentences(ids, ends):
        c = cut(ids, surprise, a, b, starts, caps, min_words)
        if c is not None:
            cands.append((c[0], a, c[1], b))
    return [(a, at, b) for _, a, at, b in sorted(sorted(cands, key=lambda c: -c[0])[:count], key=lambda c: c[1])]


def probe(ids: Sequence[int], a: int, at: int, b: int, sets: dict, question: Sequence[int] | None = None
          ) -> list[int]:
    """The probe of sentence ids[a:b] cut at `at` (choose()): the cloze frame, open + the words before the cut + ask
    + the rest; with `question` (the frozen model's own, cloze_gen), q_open + question + q_answer + the rest.
    `sets`: token_sets()' frame ids."""
    if question is None:
        return list(sets["open"]) + list(ids[a:at]) + list(sets["ask"]) + list(ids[at:b])
    return list(sets["q_open"]) + list(question) + list(sets["q_answer"]) + list(ids[at:b])


# AbsorberConfig.cloze_gen: the question is the frozen model's own, written after this prompt around the sentence
# (greedy, up to cloze_gen tokens, ended at its first "?"): a question in other words than the statement's, as a
# user's is. Three made-up examples (who, where, how many) show a 135M model what to write; without them it
# writes questions about anything ("What is the purpose of a judge?"); with them still poor ones at times ("What is
# Thaddabackworth's role within the school management team?"). The probe is then QUESTION_OPEN + the question +
# QUESTION_ANSWER + the sentence from its cut on.
GEN_PROMPT = ("Statement: The library will be looked after by Clara Mendes.\nQuestion: Who will look after the "
              "library?\n\nStatement: Our festival takes place every summer in the old port of Lisbon.\nQuestion: "
              "Where does the festival take place?\n\nStatement: The school now has 45 teachers.\nQuestion: How "
              "many teachers does the school have?\n\nStatement:", "\nQuestion:")
QUESTION_OPEN, QUESTION_ANSWER = "\nQ:", "\nA:"


def question_ids(generated: Sequence[int], qmarks: set[int]) -> list[int] | None:
    """The generated tokens up to and with the first that holds a "?" (None: no question was written)."""
    for i, t in enumerate(generated):
        if t in qmarks:
            return list(generated[:i + 1])
    return None


def question_mark_ids(tok) -> set[int]:
    """Token ids whose text holds a "?"."""
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    out = set()
    for piece, i in vocab.items():
        s = tok.convert_tokens_to_string([piece]) if hasattr(tok, "convert_tokens_to_string") else piece
        if "?" in s:
            out.add(i)
    return out


def token_sets(tok) -> dict:
    """What cloze probes need of a tokenizer, computed once per stream: sentence ends, word starts, capitalized
    word starts, question marks, and the ids of both frames and of the question prompt."""
    from absorber.facts import sentence_end_ids
    starts, caps = word_start_ids(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return {"ends": sentence_end_ids(tok), "starts": starts, "caps": caps, "qmarks": question_mark_ids(tok),
            "open": enc(CLOZE_OPEN), "ask": enc(CLOZE_ASK), "gen_before": enc(GEN_PROMPT[0]),
            "gen_after": enc(GEN_PROMPT[1]), "q_open": enc(QUESTION_OPEN), "q_answer": enc(QUESTION_ANSWER)}
