"""Experience replay of absorbed text (AbsorberConfig.replay): the absorber keeps a few earlier X as token ids
(4 bytes a token) and trains the next-token term on them again in later rounds, so that a fact gets more steps
than its own round's K, spread over the rounds that would overwrite it. Torch-free: the reference
(absorber.absorb) and the runtime (absorber.runtime.stream) keep, draw and save the same texts."""
from __future__ import annotations

import random
from dataclasses import dataclass, field


REPLAY_HELP = ("keep the last R absorbed texts (X, as token ids) and train the next-token term on them again in "
               "later rounds (experience replay: more of what was said survives; 0: off)")
REPLAY_STEPS_HELP = ("with --replay: each round runs J more steps after its K, each on a kept text in turn in place "
                     "of the round's X (0, the reference only: the kept text's term added to every step)")


def reservoir_slot(seed: int, seen: int) -> int:
    """Vitter's algorithm R: the slot in 0..seen-1 that the seen-th text draws (kept when under the capacity).
    Stateless (a generator seeded per draw): a resumed stream draws what it would have drawn."""
    return random.Random(seed * 1_000_003 + seen).randrange(seen)


@dataclass
class Replay:
    """The kept texts and the turn. capacity: how many X are kept; mode "recent" (the last ones) or "reservoir"
    (a uniform sample of every X so far); tokens: each turn takes a slice of this many tokens (0: the whole X)."""
    capacity: int
    mode: str = "recent"
    tokens: int = 0
    seed: int = 0
    kept: list[list[int]] = field(default_factory=list)   # oldest first ("recent")
    seen: int = 0                                          # texts offered so far
    turn: int = 0                                          # texts handed out so far

    def keep(self, ids: list[int]) -> None:
        """Offer one absorbed X."""
        if self.capacity <= 0:
            return
        ids = [int(t) for t in ids]
        self.seen += 1
        if len(self.kept) < self.capacity:
            self.kept.append(ids)
        elif self.mode == "recent":
            self.kept = self.kept[1:] + [ids]
        else:
            j = reservoir_slot(self.seed, self.seen)
            if j < self.capacity:
                self.kept[j] = ids

    def next(self) -> list[int] | None:
        """The next text to replay (None while nothing is kept): the kept X in turn; with `tokens`, their slices of
        that length in turn (the last one ends at X's end)."""
        if not self.kept:
            return None
        turn = self.turn
        self.turn += 1
        old = self.kept[turn % len(self.kept)]
        size = self.tokens
        if size <= 0 or size >= len(old):
            return old
        slices = -(-len(old) // size)
        start = min((turn // len(self.kept)) % slices * size, len(old) - size)
        return old[start:start + size]

    @property
    def counters(self) -> dict:
        """{seen, turn}: the state file's metadata for these texts."""
        return {"seen": self.seen, "turn": self.turn}

    def to_state(self) -> tuple[list[int], list[int]]:
        """(every kept id in one list, the kept lengths) for a stream's state file."""
        return [t for k in self.kept for t in k], [len(k) for k in self.kept]

    def load_state(self, flat: list[int], lengths: list[int], counters: dict) -> None:
        """The texts of `to_state` and `counters` back; a smaller capacity than they were saved with keeps the
        newest."""
        self.kept, at = [], 0
        for n in lengths:
            self.kept.append([int(t) for t in flat[at:at + n]])
            at += n
        del self.kept[:max(0, len(self.kept) - self.capacity)]
        self.seen, self.turn = int(counters.get("seen", len(self.kept))), int(counters.get("turn", 0))
