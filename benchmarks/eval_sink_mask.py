"""Experiment: leave the first Y positions out of the sync loss (the student's attention sink).

Without X, Y's first token sits at position 0 and becomes the attention sink: its hidden states carry the
massive activations (mean |h_student - h_teacher| ~105 per feature in layers 11-28 at position 0, vs ~1 elsewhere,
measured on 2026-Trump-1). Matching them asks the adapters to undo the sink. This script patches
Absorption._loss to skip the first `skip` positions (a proposed option for absorber/sync.py) and runs the same
evaluation as `absorber eval --sotu 2 --segments 3 --methods absorber --passkey-lengths ''`.

usage: python benchmarks/eval_sink_mask.py SKIP OUT.json [key=value ...]   (e.g. lr=5e-4 k=16)
extra keys: segments=S (rounds per text, default 3); reset=1 (fresh adapters and optimizer before every round:
no accumulation across rounds, unlike the method's W <- W*); speeches=ID,ID (default: the 2 most recent)
"""
from __future__ import annotations

import json
import sys

import torch

from absorber import absorb, data, sync
from absorber import evaluate as E
from absorber.config import AbsorberConfig
from absorber.models import load


def patch(skip: int) -> None:
    orig = absorb.Absorption._loss

    def _loss(self, x, y, t):
        if self.method == "ttt" or skip == 0:
            return orig(self, x, y, t)
        hs, logits = sync.forward_states(self.model, y, self.layers, with_logits=self.cfg.kl_weight > 0)
        return sync.sync_loss(hs[:, skip:], t.hidden[:, skip:], self.cfg.loss,
                              logits[skip:] if logits is not None else None,
                              t.logprobs[skip:] if t.logprobs is not None else None, self.cfg.kl_weight)
    absorb.Absorption._loss = _loss


def patch_reset() -> None:
    """Before every absorption round, put the adapters back to their initial values and clear AdamW's state."""
    from absorber import lora
    orig = absorb.Absorption.round

    def round_(self, *a, **kw):
        if not hasattr(self, "_init"):
            self._init = lora.snapshot(self.model)
        lora.load_state(self.model, self._init)
        self.opt.state.clear()
        return orig(self, *a, **kw)
    absorb.Absorption.round = round_


def main() -> None:
    torch.set_num_threads(1)
    skip, out = int(sys.argv[1]), sys.argv[2]
    cfg = AbsorberConfig()
    segments, reset, fileids = 3, False, None
    for kv in sys.argv[3:]:
        k, v = kv.split("=", 1)
        if k == "segments":
            segments = int(v)
        elif k == "reset":
            reset = v == "1"
        elif k == "speeches":
            fileids = v.split(",")
        else:
            cfg = E.apply_setting(cfg, k, E._parse_value(k, v))
    patch(skip)
    if reset:
        patch_reset()
    model, tok = load("smollm2-135m")
    chosen = [data.speech(f) for f in fileids] if fileids else data.speeches("spoken")[-2:][::-1]
    texts = [(s.fileid, tok.encode(s.text(), add_special_tokens=False)) for s in chosen]
    settings = E.EvalSettings(methods=("absorber",), segments=segments, passkey_lengths=())
    log = lambda s: print(s, file=sys.stderr, flush=True)
    res = E.evaluate(model, tok, texts, cfg, settings, log=log)
    res["command"] = "python benchmarks/eval_sink_mask.py " + " ".join(sys.argv[1:])
    res["skip_positions"] = skip
    res["reset_each_round"] = reset
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
