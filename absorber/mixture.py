"""Reading the absorbed memory as much as it has earned: an online mixture of the adapted and the base model.

The adapters keep the stream's facts, and they also move the model on text that has nothing to do with the
stream (benchmarks/retention.md: +6 % perplexity on an unrelated text for the default, more for stronger
writes). A fixed read scale trades one against the other. The mixture chooses per context instead, causally:

    p_mix(x_t) = w_t p_adapted(x_t | x_<t) + (1 - w_t) p_base(x_t | x_<t)

with w_0 = `prior` and w_t the posterior weight of the adapted model given the tokens before t (Bayes), then
with `share` of each expert's weight passed to the other after every token (fixed share, Herbster & Warmuth
1998: the mixture can switch back within ~log(1/share) nats of evidence after a change of topic). On a context
where the adapters helped (the stream they absorbed) w_t goes to 1 and answers read the adapters in full; on
unrelated text it goes to 0. The price is bounded: the mixture's summed NLL is at most the better expert's
plus log(1/prior) nats (share 0), or plus ~share nats per token and log(1/share) per switch — and two forward
passes instead of one.

Torch-free (numpy only): the reference's retention and evaluation and the runtime's answers share it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# the fixed share of AbsorberConfig.mix: ~0.1 % of the better expert's perplexity per token, and a change of
# topic undone within ~log(1/SHARE) = 6.9 nats of evidence (benchmarks/retention.md, "the online mixture")
SHARE = 0.001

# the --mix flag's help, one text for `absorber run`, `absorb` and `eval`
HELP = ("answers (and every scoring of the method) from the online mixture of the adapted and the base model, the "
        "adapters weighted by how well they predicted the context (two decoder passes per answer token)")
WINDOW_HELP = ("with --mix: the mixture's weight learns from at most the last W prompt tokens (0: the whole prompt); "
               "the tokens before run without the output head, so a long prompt's answer starts sooner")
SHARE_HELP = ("with --mix: the fixed share of weight passed between the adapted and the base model after every "
              "token; larger follows a change of which one predicts better sooner, at up to ~share nats per token "
              "against the better one")


@dataclass
class Mixture:
    """The running log-weights of the adapted (a) and the base (b) model over one context."""
    share: float = 0.0
    prior: float = 0.5
    la: float = math.nan
    lb: float = math.nan

    def __post_init__(self) -> None:
        if not 0.0 < self.prior < 1.0:
            raise ValueError(f"mixture prior must be in (0, 1), got {self.prior}")
        if not 0.0 <= self.share < 0.5:
            raise ValueError(f"mixture share must be in [0, 0.5), got {self.share}")
        if math.isnan(self.la):
            self.la, self.lb = math.log(self.prior), math.log1p(-self.prior)

    @property
    def weight(self) -> float:
        """w: the adapted model's weight for the next token."""
        return math.exp(self.la)

    def update(self, lp_a: float, lp_b: float) -> float:
        """Observe one token with log-probabilities lp_a (adapted) and lp_b (base) under the two models;
        return its log-probability under the mixture."""
        xa, xb = self.la + lp_a, self.lb + lp_b
        lm = float(np.logaddexp(xa, xb))
        la, lb = xa - lm, xb - lm
        if self.share:
            keep, give = math.log1p(-self.share), math.log(self.share)
            la, lb = float(np.logaddexp(keep + la, give + lb)), float(np.logaddexp(keep + lb, give + la))
        self.la, self.lb = la, lb
        return lm

    def run(self, lp_a: Sequence[float], lp_b: Sequence[float]) -> np.ndarray:
        """update() over a sequence of tokens: their log-probabilities under the mixture."""
        if len(lp_a) != len(lp_b):
            raise ValueError(f"{len(lp_a)} adapted log-probabilities against {len(lp_b)} base ones")
        return np.array([self.update(float(a), float(b)) for a, b in zip(lp_a, lp_b)], np.float64)

    def learn(self, lp_a: Sequence[float], lp_b: Sequence[float], window: int = 0) -> None:
        """run() over the evidence before the scored tokens, only its last `window` entries (0: all): the weight
        starts from the prior `window` tokens before the first scored one (AbsorberConfig.mix_window)."""
        start = evidence_start(len(lp_a), window)
        self.run(lp_a[start:], lp_b[start:])

    def mix(self, logp_a: np.ndarray, logp_b: np.ndarray) -> np.ndarray:
        """The mixture's next-token log-distribution from the two models' (float64, same shape)."""
        return np.logaddexp(self.la + np.asarray(logp_a, np.float64), self.lb + np.asarray(logp_b, np.float64))


def evidence_start(before: int, window: int = 0) -> int:
    """Of `before` tokens of evidence ahead of the scored ones, the index of the first the weight learns from:
    the last `window` of them (0: all)."""
    return max(0, before - window) if window else 0


def mixture_nll(lp_a: Sequence[float], lp_b: Sequence[float], share: float = 0.0, prior: float = 0.5,
                scored_from: int = 0, window: int = 0) -> float:
    """Summed NLL under the mixture of tokens[scored_from:], the weights learned from the tokens before (the
    last `window` of them; 0: all)."""
    start = evidence_start(scored_from, window)
    return -float(Mixture(share, prior).run(lp_a[start:], lp_b[start:])[scored_from - start:].sum())
