"""Planted facts for the forgetting curve: invented, spoken-style statements and differently worded questions.

Each fact is made by code from a template and a seeded random draw of invented names, numbers, places and
roles, so that no model can know it beforehand ("The commission will be chaired by Judge Imelda Farrow.").
Its question is worded differently from the planted sentence (copying the sentence's surface tokens is not
enough) and its answer is the short span the question asks for. The facts are spread over the first rounds of
a real transcript, each inserted after a sentence end, so that they read as part of the speech.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

FIRST = ["Imelda", "Torvald", "Marisol", "Ezekiel", "Odessa", "Lucan", "Perpetua", "Anselm", "Rosalind", "Casimir",
         "Henrietta", "Barnaby", "Ottilie", "Leopold", "Winifred", "Thaddeus", "Beatrix", "Cornelius", "Philippa",
         "Ignatius", "Georgina", "Ambrose", "Clementine", "Silvester"]
LAST = ["Farrow", "Quillfeather", "Brannigan", "Okonkwo-Lisle", "Vantongeren", "Halberd", "Marchetti", "Szabo",
        "Fennimore", "Dalrymple", "Ashgrove", "Kettleborough", "Ravensworth", "Penhallow", "Iverach", "Lindqvist",
        "Montague", "Castellanos", "Whitlock", "Abernethy", "Thistlewood", "Gallagher", "Oyelaran", "Prendergast"]
TOWNS = ["Millbrook Falls", "Port Anselm", "Cedar Hollow", "New Tillman", "Harrow Bay", "Ostrander", "Pine Bluff Ridge",
         "Lake Quimby", "Fort Delacroix", "Silverton Gap", "East Marlow", "Granite Springs", "Wexford Junction",
         "Bellhaven", "Copper Creek", "Ravenna Heights"]
THINGS = ["a network of rural clinics", "a high-speed rail line", "a national archive of oral histories",
          "a center for battery research", "a fleet of river ferries", "a coastal flood barrier",
          "a program of night schools", "a seed bank for farmers", "a registry of veterans' stories",
          "a chain of public libraries"]
ANIMALS = ["golden retriever", "gray parrot", "tabby cat", "box turtle", "border collie", "pot-bellied pig"]
PET_NAMES = ["Biscuit", "Admiral", "Pickles", "Juniper", "Captain Wiggles", "Marmalade", "Thunder", "Dumpling"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


@dataclass(frozen=True)
class Fact:
    statement: str     # the sentence planted in the stream (spoken style, leading space)
    question: str      # asked later, worded differently
    answer: str        # scored by teacher-forced NLL after the question prompt (leading space)
    kind: str
    template: int = -1  # which template it was drawn from (decoys are drawn from the same one)
    cue: str = ""       # when set, asked by these words instead of the question prompt (`cued`)

    def to_dict(self) -> dict:
        return asdict(self)


def _person(rng: random.Random, used: set) -> str:
    while True:
        p = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        if p not in used:
            used.add(p)
            return p


# each template: (kind, statement, question, answer); fields filled from a draw
def _templates(rng: random.Random, used: set) -> list[tuple[str, str, str, str]]:
    p1, p2, p3, p4, p5, p6 = (_person(rng, used) for _ in range(6))
    t1, t2, t3, t4 = rng.sample(TOWNS, 4)
    th1, th2 = rng.sample(THINGS, 2)
    n1 = rng.randint(13, 97)
    n2 = rng.randint(2, 9) * 1000 + rng.randint(1, 9) * 100
    n3 = rng.randint(1931, 1989)
    n4 = rng.randint(3, 40)
    pct = rng.randint(11, 89)
    mo = rng.choice(MONTHS)
    an, pet = rng.choice(ANIMALS), rng.choice(PET_NAMES)
    return [
        ("role", f" The new commission on fairness will be chaired by Judge {p1}.",
         "Who was named to lead the commission on fairness?", f" Judge {p1}"),
        ("place", f" We will build {th1} starting in the town of {t1}.",
         f"In which town will the work on {th1} begin?", f" {t1}"),
        ("number", f" Last year exactly {n1} new factories opened in our state alone.",
         "How many factories opened in the state last year?", f" {n1}"),
        ("role", f" My friend {p2} will serve as our new ambassador to the moon colony.",
         "Who is going to be the ambassador to the moon colony?", f" {p2}"),
        ("date", f" The new bridge in {t2} will open on the first of {mo}.",
         f"In which month is the bridge in {t2} going to open?", f" {mo}"),
        ("number", f" We have hired {n2} new park rangers this year.",
         "How many park rangers were hired this year?", f" {n2}"),
        ("person", f" I want to thank {p3}, a teacher who has taught for {n4} years in {t3}.",
         f"Which teacher from {t3} did the speaker thank?", f" {p3}"),
        ("pet", f" Our family's {an} is named {pet}, and he runs the house.",
         f"What is the name of the family's {an}?", f" {pet}"),
        ("year", f" My grandmother {p4} came to this country in {n3} with nothing.",
         f"In what year did {p4} arrive in the country?", f" {n3}"),
        ("number", f" Crime in our cities fell by {pct} percent since we started the program.",
         "By how many percent did crime in the cities fall?", f" {pct}"),
        ("role", f" The budget office will be run by {p5}, who balanced three budgets before.",
         "Who will be in charge of the budget office?", f" {p5}"),
        ("place", f" Next spring we will open {th2} in {t4}.",
         f"Where will {th2} be opened?", f" {t4}"),
        ("role", f" The head of the new space agency is Admiral {p6}.",
         "Who heads the new space agency?", f" Admiral {p6}"),
    ]


def make_facts(count: int, seed: int = 0) -> list[Fact]:
    """`count` facts, all distinct (names are never reused within a stream)."""
    rng = random.Random(seed)
    used: set = set()
    out: list[Fact] = []
    while len(out) < count:
        batch = list(enumerate(_templates(rng, used)))
        rng.shuffle(batch)
        for t, (kind, s, q, a) in batch:
            if len(out) < count:
                out.append(Fact(s, q, a, kind, t))
    return out


def decoys(facts: list[Fact], seed: int = 0) -> list[Fact]:
    """Per fact, the same question with an answer of the same kind that was never said: another draw of the
    same template ("Judge Imelda Farrow" -> "Judge Anselm Szabo"). The control of the forgetting curve: a
    method that only learns the speech's register, or that answers questions of this shape better in general,
    lowers the decoy's NLL as much as the true answer's; one that remembers the fact lowers only the latter."""
    rng = random.Random(seed + 7919)
    said = " ".join(f.statement for f in facts)
    used = {f.answer.strip() for f in facts}     # names drawn for the decoys avoid the true answers' names
    out = []
    for f in facts:
        for _ in range(200):
            a = _templates(rng, set(used))[f.template][3]
            if a != f.answer and a.strip() not in said:
                out.append(Fact(f.statement, f.question, a, f.kind, f.template))
                break
        else:
            raise ValueError(f"no decoy for the {f.kind} fact {f.answer!r}")
    return out


QUESTION_PROMPT = "\nQuestion: {question}\nAnswer:"


def cued(fact: Fact, said: Fact | None = None) -> Fact:
    """The fact asked by the planted sentence's own words up to its answer ("\nThe new commission on fairness
    will be chaired by" -> " Judge Imelda Farrow"): cued recall, the storage half of retention. A question worded
    differently needs the fact stored *and* extractable by other words; the sentence's own words need it stored.
    `said`: the fact whose sentence gives the cue (a decoy's true fact; default `fact` itself)."""
    said = said or fact
    at = said.statement.find(said.answer)
    if at < 0:
        raise ValueError(f"the answer {said.answer!r} is not in its statement {said.statement!r}")
    return replace(fact, cue="\n" + said.statement[:at].lstrip())


def prompt_ids(tok, fact: Fact) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) for teacher-forced scoring: the question prompt, or the fact's cue."""
    prompt = fact.cue or QUESTION_PROMPT.format(question=fact.question)
    q = tok.encode(prompt, add_special_tokens=False)
    a = tok.encode(fact.answer, add_special_tokens=False)
    return q, a


def plant(tok, text_ids: list[int], facts: list[Fact], span: int, sentence_end_ids: set[int] | None = None,
          start: int = 0) -> tuple[list[int], list[tuple[int, int]]]:
    """Insert the facts' statements into text_ids[start:start+span], evenly spread, each right after a
    sentence end. Returns (new ids, [(begin, end) of each fact in the new ids])."""
    sentence_end_ids = sentence_end_ids or set()
    text_ids = list(text_ids)
    spots = []
    for j in range(len(facts)):
        at = start + int((j + 0.5) * span / len(facts))
        k = at
        while k < start + span and sentence_end_ids and text_ids[k - 1] not in sentence_end_ids:
            k += 1
        spots.append(min(k if k < start + span else at, len(text_ids)))
    out: list[int] = []
    where: list[tuple[int, int]] = []
    prev = 0
    for f, at in zip(facts, spots):
        out += text_ids[prev:at]
        ids = tok.encode(f.statement, add_special_tokens=False)
        where.append((len(out), len(out) + len(ids)))
        out += ids
        prev = at
    out += text_ids[prev:]
    return out, where


def sentence_end_ids(tok) -> set[int]:
    """Token ids that end a sentence ('.', '?', '!' possibly with a closing quote), for plant()."""
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    ends = set()
    for piece, i in vocab.items():
        s = tok.convert_tokens_to_string([piece]) if hasattr(tok, "convert_tokens_to_string") else piece
        if s.strip() in (".", "?", "!", ".\"", "?\"", "!\""):
            ends.add(i)
    return ends
