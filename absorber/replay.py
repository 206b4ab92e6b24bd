"""Experience replay of absorbed text (AbsorberConfig.replay): the absorber keeps a few earlier X as token ids
(4 bytes a token) and trains the next-token term on them again in later rounds, so that a fact gets more steps
than its own round's K, spread over the rounds that would overwrite it. Torch-free: the reference
(absorber.absorb) and the runtime (absorber.runtime.stream) keep, draw and save the same texts."""
from __future__ import annotations

import random
from dataclasses import dataclass, field


REPLAY_HELP = ("keep the last R absorbed texts (X, as token ids) and train the next-token term on them again in "
               "later rounds (experience replay: more of what was said survives; 0: off)")
REPLAY_MODES = ("recent", "reservoir", "spaced", "spaced2")
REPLAY_MODE_HELP = ("with --replay: which kept texts are replayed: recent (the last R in turn; the most facts 8 "
                    "rounds after eviction), spaced (the last R, each replayed 1, 3, 9, 27 rounds after it was absorbed, "
                    "up to R: R 32; more facts 32 rounds after eviction, fewer at 8), spaced2 (the same at 1, 2, 4, 8, "
                    "16, 32 rounds: 6 due texts a round, so --replay-steps 6) or reservoir (a random sample of all so "
                    "far)")
REPLAY_STEPS_HELP = ("with --replay: each round runs J more steps after its K, each on a kept text in turn in place "
                     "of the round's X (0, the reference only: the kept text's term added to every step)")


# replay_mode "spaced": a kept X is replayed 1, 3, 9, 27, ... rounds after it was absorbed (powers of 3: spaced
# repetition, each replay later than the one before, as forgetting slows). At steady state that is one due text
# per power below the capacity each round: 4 for a capacity of 27 to 80, as many as the shipped 4 replay steps.
# "spaced2" replays at the powers of 2 (1, 2, 4, 8, 16, 32): 4 times in the first 8 rounds, as "recent" (R 8, 4
# steps) does on average, and still at 16 and 32: 6 due texts a round at a capacity of 32 (replay_steps 6; with
# fewer steps a round the schedule falls behind: at 4, every replay comes 18-25 rounds after absorption).
SPACED_BASES = {"spaced": 3, "spaced2": 2}


def spaced_distances(capacity: int, base: int = 3) -> list[int]:
    """The distances (rounds since a text was absorbed) at which a spaced mode replays it: the powers of `base`
    (SPACED_BASES) up to `capacity` (a text is kept for `capacity` rounds)."""
    out, d = [], 1
    while d <= capacity:
        out.append(d)
        d *= base
    return out


def reservoir_slot(seed: int, seen: int) -> int:
    """Vitter's algorithm R: the slot in 0..seen-1 that the seen-th text draws (kept when under the capacity).
    Stateless (a generator seeded per draw): a resumed stream draws what it would have drawn."""
    return random.Random(seed * 1_000_003 + seen).randrange(seen)


@dataclass
class Replay:
    """The kept texts and the turn. capacity: how many X are kept; mode "recent" (the last ones, in turn),
    "reservoir" (a uniform sample of every X so far, in turn) or "spaced" (the last ones, each replayed when it is
    1, 3, 9, 27, ... rounds old: spaced_distances; "spaced2": 1, 2, 4, 8, ...); tokens: each turn takes a slice of
    this many tokens (0: the whole X)."""
    capacity: int
    mode: str = "recent"
    tokens: int = 0
    seed: int = 0
    kept: list[list[int]] = field(default_factory=list)   # oldest first ("recent")
    seen: int = 0                                          # texts offered so far
    turn: int = 0                                          # texts handed out so far
    served: int = 0                                        # "spaced": due replays handed out (or skipped) so far

    def keep(self, ids: list[int]) -> None:
        """Offer one absorbed X."""
        if self.capacity <= 0:
            return
        ids = [int(t) for t in ids]
        self.seen += 1
        if len(self.kept) < self.capacity:
            self.kept.append(ids)
        elif self.mode != "reservoir":
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
        old = self._spaced() if self.mode in SPACED_BASES else self.kept[turn % len(self.kept)]
        size = self.tokens
        if size <= 0 or size >= len(old):
            return old
        slices = -(-len(old) // size)
        start = min((turn // len(self.kept)) % slices * size, len(old) - size)
        return old[start:start + size]

    def _spaced(self) -> list[int]:
        """The next due replay of "spaced": the replays due by the round being trained, in the order (due round,
        older text first), the `served`-th of them that is still kept; with none due, the newest text (a round's
        spare replay steps strengthen the newest write). The order never changes as rounds go on (later rounds
        only add later due rounds), so one counter says where the schedule is, across a saved and resumed state.
        Found by counting, not by walking the schedule: a few dozen operations a call however long the stream."""
        t = self.seen + 1                       # the round being trained; text c (kept in round c) is t - c old
        first = self.seen - len(self.kept) + 1  # the round whose X is kept[0]
        distances = spaced_distances(self.capacity, SPACED_BASES[self.mode])

        def due_by(u: int) -> int:              # replays due in rounds 2..u: text c at distance d is due in c + d
            return sum(max(0, u - d) for d in distances)

        while self.served < due_by(t):
            lo, hi = 2, t                       # the round in which the served-th replay is due
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if due_by(mid) > self.served else (mid + 1, hi)
            d = sorted((d for d in distances if d < lo), reverse=True)[self.served - due_by(lo - 1)]
            self.served += 1
            if lo - d >= first:                 # else that text has left the kept ones: skip it
                return self.kept[lo - d - first]
        return self.kept[-1]

    @property
    def counters(self) -> dict:
        """{seen, turn, served}: the state file's metadata for these texts."""
        return {"seen": self.seen, "turn": self.turn, "served": self.served}

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
        self.served = int(counters.get("served", 0))
