"""The forgetting curve: do facts said long ago stay in the weights after they leave the window?

For one real transcript and one method (the reference's StreamingAbsorber):
  * `facts.make_facts` invents F facts; `facts.plant` spreads their statements over the first `plant_rounds`
    X chunks of the stream, after sentence ends;
  * the stream runs round by round; fact f leaves the window in round e(f) (the first round whose X holds its
    last token);
  * at every round c = e(f) + d, d in `distances` (1, 2, 4, 8, 16, 32), the answer to f's question (worded
    differently from the statement) is scored by teacher-forced NLL after the question prompt, three ways:
      window  the base model with the method's current window as context;
      method  the method's model (window + adapters);
      full    the base model with the passage that holds the fact (the X chunk it leaves the window with)
              placed before the window and the question: the fact in context.
  * retention(d) = (sum NLL_window - sum NLL_method) / (sum NLL_window - sum NLL_full) over the facts (and
    the texts) at that distance, with a percentile bootstrap interval over facts: 1 = the fact is as well
    known as with it in context, 0 = no better than the window, < 0 = worse than the window.
  * the control: each fact also has a decoy (`facts.decoys`: the same question, an answer of the same kind
    that was never said). decoy_lift(d) is how much the method lowers the decoys' NLL on the same scale, and
    specific(d) = retention(d) - decoy_lift(d) is what it keeps of the facts themselves rather than of the
    speech's register or the question format.
  * damage: the perplexity of a held-out speech (unrelated to the stream) under the method's model, with no
    stream context, against the base model's, at the same rounds. For reference, the same held-out text after
    the method's current window in context (base model): what having the stream in context, rather than in
    the weights, does to it.
No generation: a 135M model answers weakly, but its likelihoods are informative.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from absorber import facts as FX
from absorber import lora
from absorber.config import AbsorberConfig
from absorber.evaluate import (EvalSettings, ModelPool, make_streamer, method_nll, model_max_positions,
                               percentile_interval, score_nll, stream_rounds)

DISTANCES = (1, 2, 4, 8, 16, 32)


@dataclass
class RetentionSettings:
    facts: int = 20                     # facts planted per stream
    plant_rounds: int = 2               # X chunks (of n tokens) the facts are spread over
    distances: tuple[int, ...] = DISTANCES   # rounds since eviction at which facts are scored
    heldout_tokens: int = 256           # tokens of the held-out speech scored for damage (0: off)
    bootstrap: int = 2000
    seed: int = 0
    # each fact and the held-out text also scored with the LoRA paths read at these scales (lora.read_scaled;
    # absolute, not on top of AbsorberConfig.read_scale), on the same adapters: one trained stream gives a point
    # per scale (pooled as "<label> (read xS)")
    read_scales: tuple[float, ...] = ()
    # each fact and the held-out text also scored under the online mixture of the method's model and the base
    # model (absorber.mixture), one score per fixed share (pooled as "<label> (mix S)"): the weights learned
    # causally over the window + question, or over the held-out text itself
    mix_shares: tuple[float, ...] = ()
    # with mix_shares: each share also scored with the weight learned from only the last W tokens before the answer
    # (AbsorberConfig.mix_window), one score per window (pooled as "<label> (mix S, window W)"), same adapters;
    # CONTEXT_ONLY (-1): learned over the context, not the question ("<label> (mix S, context only)")
    mix_windows: tuple[int, ...] = ()
    # with mix_shares: each record also keeps the answer's per-token log-probabilities under the adapted and the
    # base model and the mixture's log-weights where the answer starts, per share and window ("mix_trace"), so that
    # other rules over the answer tokens are scored offline (benchmarks/scripts/mixture_answer_rules.py)
    mix_trace: bool = False
    # each record also keeps, per answer token, the NLLs of the fact asked by its own sentence's words (facts.cued)
    # and of its decoy under the same cue: window, full, the method's reading and the adapters alone ("cued").
    # Retention under the cue is what is stored; under the question, what is stored and extractable
    cued: bool = False
    # when > 0: the same for the question answered after a recitation of at most this many tokens that the
    # condition's own model writes first (reciter; "recited", with the recitations under "cues")
    recite: int = 0
    # when > 0: the same for the question answered after a lead-in of at most this many tokens that the condition's
    # own model writes first, the question restated as the start of its answer (restater; "restated")
    restate: int = 0
    # with restate: one lead-in per question, the base model's with the window (it has not seen the fact), asked
    # after it in every condition: a rewrite of the question, not the condition's own recall
    restate_shared: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def eviction_round(fact_end: int, n: int) -> int:
    """The round whose X holds stream index fact_end - 1 (round r absorbs X = stream[(r-1)n : rn])."""
    return (fact_end - 1) // n + 1


def prepare(tok, text_ids: Sequence[int], cfg: AbsorberConfig, rs: RetentionSettings, seed: int):
    """Plant the facts; returns (ids, facts, spans, eviction rounds, the passage holding each fact)."""
    fs = FX.make_facts(rs.facts, seed=seed)
    span = rs.plant_rounds * cfg.n
    ids, spans = FX.plant(tok, list(text_ids), fs, span - 48, FX.sentence_end_ids(tok), start=16)
    ev = [eviction_round(e, cfg.n) for _, e in spans]
    # the passage that holds fact j: the X chunk it is absorbed with (from that chunk's start to the fact's end,
    # at least one whole chunk), placed before the window for the `full` condition
    passages = [ids[(r - 1) * cfg.n:max(e, r * cfg.n)] for r, (_, e) in zip(ev, spans)]
    return ids, fs, spans, ev, passages


@torch.no_grad()
def _answer_nll(model: nn.Module, tok, context: list[int], fact: FX.Fact, max_len: int) -> float:
    q, a = FX.prompt_ids(tok, fact)
    nll, _ = score_nll(model, list(context) + q, a, max_len)
    return nll


def _after_context(model: nn.Module, tok, context: list[int], facts: Sequence[FX.Fact], context_logits: bool):
    """One forward over the shared context (its KV cache kept), then one short forward per question + answer on a
    copy of that cache. Returns the context's ids [1, T] and logits [T, V] (None unless context_logits), and yields
    per fact (question ids, answer ids, q + a ids [1, L], the predictions of those L tokens [L, V])."""
    import copy
    dev = next(model.parameters()).device
    ctx = torch.tensor([list(context)], device=dev)
    T = ctx.shape[1]
    out = model(input_ids=ctx, position_ids=torch.arange(T, device=dev)[None], attention_mask=torch.ones_like(ctx),
                use_cache=True, **({} if context_logits else {"logits_to_keep": 1}))
    past, logits = out.past_key_values, out.logits[0].float()
    last = logits[-1]

    def each():
        for f in facts:
            q, a = FX.prompt_ids(tok, f)
            ids = torch.tensor([q + a], device=dev)
            L = ids.shape[1]
            o = model(input_ids=ids, position_ids=torch.arange(T, T + L, device=dev)[None],
                      attention_mask=torch.ones(1, T + L, dtype=torch.long, device=dev),
                      past_key_values=copy.deepcopy(past), use_cache=True)
            yield q, a, ids, torch.cat([last[None], o.logits[0, :-1].float()], 0)
    return ctx, (logits if context_logits else None), each()


@torch.no_grad()
def answer_nlls(model: nn.Module, tok, context: list[int], facts: Sequence[FX.Fact]) -> list[float]:
    """Summed answer NLL of each fact after `context` + its question (_after_context: the shared context's
    forward runs once). Equal to `_answer_nll` per fact (tests), at a fraction of the cost when many facts
    share a context."""
    import torch.nn.functional as F
    _, _, per = _after_context(model, tok, context, facts, False)
    return [float(F.cross_entropy(pred[len(q):], ids[0, len(q):], reduction="sum")) for q, _, ids, pred in per]


@torch.no_grad()
def answer_token_nlls(model: nn.Module, tok, context: list[int], facts: Sequence[FX.Fact]) -> list[list[float]]:
    """answer_nlls per answer token (the same forwards; their sums equal answer_nlls to float rounding)."""
    import torch.nn.functional as F
    _, _, per = _after_context(model, tok, context, facts, False)
    return [F.cross_entropy(pred[len(q):], ids[0, len(q):], reduction="none").tolist() for q, _, ids, pred in per]


@torch.no_grad()
def token_logprobs(model: nn.Module, tok, context: list[int], facts: Sequence[FX.Fact]
                   ) -> tuple[list[float], list[list[float]]]:
    """log p of every context token after the first, and per fact of its question + answer tokens after the
    context (_after_context, as answer_nlls): the inputs of a mixture."""
    import torch.nn.functional as F
    ctx, logits, per = _after_context(model, tok, context, facts, True)
    lp_ctx = (-F.cross_entropy(logits[:-1], ctx[0, 1:], reduction="none")).tolist()
    return lp_ctx, [(-F.cross_entropy(pred, ids[0], reduction="none")).tolist() for _, _, ids, pred in per]


CONTEXT_ONLY = -1      # a mixture "window": the weight learned over the stream's context, not the question


def mixed_answer_nlls(model: nn.Module, base: nn.Module, tok, context: list[int], facts: Sequence[FX.Fact],
                      shares: Sequence[float], windows: Sequence[int] = (0,), trace: dict | None = None
                      ) -> dict[tuple[float, int], list[float]]:
    """Per fixed share and mixture window (AbsorberConfig.mix_window; 0: all), each fact's summed answer NLL under
    the online mixture of `model` and `base` (absorber.mixture), its weights learned over the context and the
    question (their last `window` tokens). Window -1: learned over the context alone, the question's tokens
    teach the weight nothing (CONTEXT_ONLY). `trace` (a dict) receives per fact the answer tokens' log-probabilities
    under each model ("answer": [(lp_a, lp_b)]) and per (share, window) the log-weights the answer starts from
    ([(la, lb)]): the inputs of any other rule over the answer (RetentionSettings.mix_trace)."""
    from absorber.mixture import Mixture, evidence_start
    ca, pa = token_logprobs(model, tok, context, facts)
    cb, pb = token_logprobs(base, tok, context, facts)
    nqs = [len(FX.prompt_ids(tok, f)[0]) for f in facts]      # each question's tokens before its answer
    out: dict[tuple[float, int], list[float]] = {}
    for s in shares:
        for w in windows:
            after: dict[int, tuple[float, float]] = {}   # the weight after the context from index i on, run once
            nlls = []
            for nq, a_, b_ in zip(nqs, pa, pb):
                # the question's tokens teach the weight too, except with CONTEXT_ONLY
                start, upto = (0, 0) if w == CONTEXT_ONLY else (evidence_start(len(ca) + nq, w), nq)
                i = min(start, len(ca))
                if i not in after:
                    m = Mixture(s)
                    m.run(ca[i:], cb[i:])
                    after[i] = (m.la, m.lb)
                m = Mixture(s, la=after[i][0], lb=after[i][1])
                q0 = max(0, start - len(ca))
                m.run(a_[q0:upto], b_[q0:upto])
                if trace is not None:
                    trace.setdefault((s, w), []).append((m.la, m.lb))
                nlls.append(-float(m.run(a_[nq:], b_[nq:]).sum()))
            out[(s, w)] = nlls
    if trace is not None:
        trace["answer"] = [(a_[nq:], b_[nq:]) for nq, a_, b_ in zip(nqs, pa, pb)]
    return out


def answer_and_decoy_nlls(model: nn.Module, tok, context: list[int], facts: Sequence[FX.Fact],
                          decoys: Sequence[FX.Fact]) -> tuple[list[float], list[float]]:
    """answer_nlls of the facts and of their decoys, in one call: the shared context's forward runs once."""
    nlls = answer_nlls(model, tok, context, list(facts) + list(decoys))
    return nlls[:len(facts)], nlls[len(facts):]


def stream_facts(pool: ModelPool, tok, text_ids: Sequence[int], heldout_ids: Sequence[int], cfg: AbsorberConfig,
                 method: str, rs: RetentionSettings, seed: int, log: Callable[[str], None] | None = None,
                 baselines: dict | None = None) -> dict:
    """One stream through one method; per (fact, distance) the three NLLs. `baselines`: window/full NLLs
    and the base held-out NLL from an earlier call on the same text and settings (they do not depend on the
    method), reused and returned."""
    ids, fs, spans, ev, passages = prepare(tok, text_ids, cfg, rs, seed)
    dec = FX.decoys(fs, seed)
    n, m = cfg.n, cfg.m
    last_round = max(ev) + max(rs.distances)
    need = n + m + (last_round - 1) * n
    if len(ids) < need:
        from absorber.errors import AbsorberError
        raise AbsorberError(f"text too short for the forgetting curve: {len(ids)} tokens, need {need} "
                            f"({last_round} rounds of n={n})")
    due: dict[int, list[tuple[int, int]]] = {}
    for j, e in enumerate(ev):
        for d in rs.distances:
            due.setdefault(e + d, []).append((j, d))
    settings = EvalSettings(methods=(method,))
    sa = make_streamer(pool, tok, cfg, method, settings)
    base_model = pool.base
    max_len = model_max_positions(base_model)
    baselines = baselines if baselines is not None else {}
    records: list[dict] = []
    damage: list[dict] = []
    rounds: list[dict] = []
    recite_cue = reciter(tok, rs.recite) if rs.recite else None
    restate_cue = restater(tok, rs.restate, rs.restate_shared) if rs.restate else None
    for r, _, done in stream_rounds(sa, ids, last_round):
        rounds += [{"round": r, "loss_first": x.loss_first, "loss_last": x.loss_last, "seconds": x.seconds}
                   for x in done if x.loss_first is not None]
        if r not in due:
            continue
        ctx = sa.context()
        lead = list(sa.sink_tokens)
        res = done[-1] if done else None
        todo = [(j, d) for j, d in due[r] if (j, d) not in baselines]
        if todo:
            win, win_dec = answer_and_decoy_nlls(base_model, tok, ctx, [fs[j] for j, _ in todo],
                                                 [dec[j] for j, _ in todo])
            by_passage: dict[tuple, list[int]] = {}
            for i, (j, _) in enumerate(todo):      # facts of the same chunk share their passage
                by_passage.setdefault((ev[j], len(passages[j])), []).append(i)
            full = [0.0] * len(todo)
            for i_s in by_passage.values():
                j0 = todo[i_s[0]][0]
                full_ctx = lead + passages[j0] + ctx[len(lead):]    # the fixed tokens stay at position 0
                for i, v in zip(i_s, answer_nlls(base_model, tok, full_ctx, [fs[todo[i][0]] for i in i_s])):
                    full[i] = v
            for i, key in enumerate(todo):
                baselines[key] = (win[i], full[i], win_dec[i])
        asked, asked_dec = [fs[j] for j, _ in due[r]], [dec[j] for j, _ in due[r]]
        with sa.reading():
            if method == "window":
                mine, mine_dec = None, None
            elif cfg.mix:             # the method reads through the online mixture with the base model
                s_, w_ = cfg.mix_share, cfg.mix_window
                both = mixed_answer_nlls(sa.model, base_model, tok, ctx, list(asked) + list(asked_dec), (s_,),
                                         (w_,))[(s_, w_)]
                mine, mine_dec = both[:len(asked)], both[len(asked):]
            else:
                mine, mine_dec = answer_and_decoy_nlls(sa.model, tok, ctx, asked, asked_dec)
        raw = raw_dec = None
        if sa.calibration is not None:       # the same adapters without the correction: a paired control
            with sa.calibration.off():
                raw, raw_dec = answer_and_decoy_nlls(sa.model, tok, ctx, asked, asked_dec)
        mixed, trace = {}, None
        if rs.mix_shares and method != "window":
            trace = {} if rs.mix_trace else None
            with sa.reading():
                per_share = mixed_answer_nlls(sa.model, base_model, tok, ctx, list(asked) + list(asked_dec),
                                              rs.mix_shares, (0,) + tuple(rs.mix_windows), trace)
            mixed = {sw: (v[:len(asked)], v[len(asked):]) for sw, v in per_share.items()}
        pas = [(fs[j], dec[j], passages[j]) for j, _ in due[r]]
        other = {key: _prompted_tokens(sa, base_model, tok, ctx, lead, cfg, rs, method, pas, cue_for)
                 for key, cue_for in (("cued", _cue_of if rs.cued else None), ("recited", recite_cue),
                                      ("restated", restate_cue)) if cue_for is not None}
        scaled = {}
        for sc in rs.read_scales if method != "window" else ():
            with lora.read_scaled(sa.model, sc):
                scaled[sc] = answer_and_decoy_nlls(sa.model, tok, ctx, asked, asked_dec)
        for i, (j, d) in enumerate(due[r]):
            w, f_, wd = baselines[(j, d)]
            mth = w if mine is None else mine[i]
            md = wd if mine_dec is None else mine_dec[i]
            records.append({"fact": j, "kind": fs[j].kind, "distance": d, "round": r, "nll_window": w,
                            "nll_method": mth, "nll_full": f_, "nll_window_decoy": wd, "nll_method_decoy": md})
            for key, got in other.items():
                records[-1][key] = {k: ({w: c[i] for w, c in v.items()} if k == "cues" else v[i])
                                    for k, v in got.items()}
            if raw is not None:
                records[-1].update(nll_method_uncalibrated=raw[i], nll_method_decoy_uncalibrated=raw_dec[i])
            for sc, (a_, ad_) in scaled.items():
                records[-1].update({f"nll_method_read{sc:g}": a_[i], f"nll_method_decoy_read{sc:g}": ad_[i]})
            for sw, (a_, ad_) in mixed.items():
                records[-1].update({f"nll_method{mix_suffix(*sw)}": a_[i], f"nll_method_decoy{mix_suffix(*sw)}": ad_[i]})
            if mixed and trace is not None:
                k_ = len(asked)
                records[-1]["mix_trace"] = {
                    "answer": [list(map(float, x)) for x in trace["answer"][i]],
                    "decoy": [list(map(float, x)) for x in trace["answer"][k_ + i]],
                    "start": {mix_suffix(*sw): [list(trace[sw][i]), list(trace[sw][k_ + i])] for sw in mixed}}
        if rs.heldout_tokens and heldout_ids:
            h = list(heldout_ids[:rs.heldout_tokens])
            bos = lead[:1] if cfg.bos else []       # no stream context, but the model's BOS (cfg.bos)
            if "heldout" not in baselines:
                baselines["heldout"] = score_nll(base_model, bos, h, max_len)
            bn, bc = baselines["heldout"]
            with sa.reading():
                hn, hc = (bn, bc) if method == "window" else method_nll(sa.model, bos, h, max_len,
                                                                          cfg.mix_share if cfg.mix else None,
                                                                          cfg.mix_window)
            if ("heldout_context", r) not in baselines:   # the reference: the stream in context, not in weights
                baselines[("heldout_context", r)] = score_nll(base_model, ctx + h[:1], h[1:], max_len)   # same tokens
            cn, cc = baselines[("heldout_context", r)]
            damage.append({"round": r, "nll_base": bn, "nll_method": hn, "count": hc,
                           "nll_context": cn, "count_context": cc})
            if sa.calibration is not None:
                with sa.calibration.off():
                    damage[-1]["nll_method_uncalibrated"] = score_nll(sa.model, bos, h, max_len)[0]
            for sc in scaled:
                with lora.read_scaled(sa.model, sc):
                    damage[-1][f"nll_method_read{sc:g}"] = score_nll(sa.model, bos, h, max_len)[0]
            if mixed:
                from absorber.evaluate import token_nll
                from absorber.mixture import mixture_nll
                with sa.reading():
                    ta = token_nll(sa.model, bos, h, max_len)
                tb = token_nll(base_model, bos, h, max_len)
                alone = {s_: mixture_nll((-ta).tolist(), (-tb).tolist(), s_) for s_, _ in mixed}
                for s_, w_ in mixed:        # no context before the held-out text: a window changes nothing
                    damage[-1][f"nll_method{mix_suffix(s_, w_)}"] = alone[s_]
                # a change of topic: the held-out text right after the stream's window, the mixture's weight
                # learned on the window first; against the base model and the adapters alone on the same tokens
                seq = ctx + h
                with sa.reading():
                    sa_ = token_nll(sa.model, [], seq, max_len)
                sb_ = token_nll(base_model, [], seq, max_len)
                k = len(h) - 1                          # h[1:], the tokens nll_context scores
                damage[-1].update(nll_switch_base=float(sb_[-k:].sum()), nll_switch_method=float(sa_[-k:].sum()),
                                  count_switch=k)
                for s_, w_ in mixed:
                    damage[-1][f"nll_switch{mix_suffix(s_, w_)}"] = mixture_nll(
                        (-sa_).tolist(), (-sb_).tolist(), s_, scored_from=len(seq) - 1 - k, window=max(w_, 0))
        if log:
            done_d = sorted({d for _, d in due[r]})
            sub = [x for x in records if x["round"] == r]
            ret = retention(sub)
            extra = f" loss {res.loss_first:.4f}->{res.loss_last:.4f}" if res is not None and res.loss_first else ""
            log(f"  {method} round {r:2d} distances {done_d}: retention {ret:.3f}{extra}")
    return {"facts": [f.to_dict() for f in fs], "spans": spans, "eviction_rounds": ev, "records": records,
            "damage": damage, "rounds": rounds, "baselines": baselines}


def _prompted_tokens(sa, base_model: nn.Module, tok, ctx: list[int], lead: list[int], cfg: AbsorberConfig,
                     rs: RetentionSettings, method: str, asked: Sequence[tuple[FX.Fact, FX.Fact, list[int]]],
                     cue_for: Callable[[str, nn.Module, list[int], FX.Fact], str]) -> dict[str, list]:
    """Per asked (fact, decoy, passage), the per-token answer NLLs of the fact and of its decoy after another
    prompt than the question: `cue_for(who, model, context, fact)` (who: "window", "full" or "method"; the model
    and context that condition reads with), the decoy asked the same way as its fact. Keys: "window" /
    "window_decoy" (base model, the window), "full" (base model, the passage before the window), and for a method
    "method" / "method_decoy" (its reading: the online mixture when cfg.mix, else the adapters alone), "alone" /
    "alone_decoy" (the adapters without the mixture) and "method<mix suffix>" / "…_decoy" per share and window of
    rs.mix_shares/mix_windows; "cues": the prompts per condition (the fact's order)."""
    from dataclasses import replace

    from absorber.mixture import Mixture
    k = len(asked)
    ask = lambda who, model, context: [replace(f, cue=cue_for(who, model, context, f)) for f, _, _ in asked]  # noqa: E731
    cw = ask("window", base_model, ctx)
    win = answer_token_nlls(base_model, tok, ctx, cw + [replace(d, cue=c.cue) for (_, d, _), c in zip(asked, cw)])
    out: dict[str, list] = {"window": win[:k], "window_decoy": win[k:], "full": [[] for _ in asked],
                            "cues": {"window": [c.cue for c in cw], "full": [""] * k}}
    by_passage: dict[tuple, list[int]] = {}        # facts of the same chunk share their passage
    for i, (_, _, p) in enumerate(asked):
        by_passage.setdefault(tuple(p), []).append(i)
    for p, i_s in by_passage.items():
        full_ctx = lead + list(p) + ctx[len(lead):]
        cf = [replace(asked[i][0], cue=cue_for("full", base_model, full_ctx, asked[i][0])) for i in i_s]
        for i, c, v in zip(i_s, cf, answer_token_nlls(base_model, tok, full_ctx, cf)):
            out["full"][i], out["cues"]["full"][i] = v, c.cue
    if method == "window":
        return out
    # the method's reading, and as the forgetting curve's extra rows the mixture at each (share, window) scored
    mixes = ([(cfg.mix_share, cfg.mix_window)] if cfg.mix else []) + [
        (s_, w_) for s_ in rs.mix_shares for w_ in (0,) + tuple(rs.mix_windows)]
    with sa.reading():
        cm = ask("method", sa.model, ctx)
        both = cm + [replace(d, cue=c.cue) for (_, d, _), c in zip(asked, cm)]
        if mixes:
            trace: dict = {}
            mixed_answer_nlls(sa.model, base_model, tok, ctx, both, sorted({s_ for s_, _ in mixes}),
                              sorted({w_ for _, w_ in mixes}), trace)
            alone = [[-float(x) for x in a_] for a_, _ in trace["answer"]]
        else:
            alone = answer_token_nlls(sa.model, tok, ctx, both)
    out["cues"]["method"] = [c.cue for c in cm]
    out.update(alone=alone[:k], alone_decoy=alone[k:])
    for s_, w_ in mixes:
        mixed = [(-Mixture(s_, la=la, lb=lb).run(a_, b_)).tolist()
                 for (la, lb), (a_, b_) in zip(trace[(s_, w_)], trace["answer"])]
        out[f"method{mix_suffix(s_, w_)}"], out[f"method{mix_suffix(s_, w_)}_decoy"] = mixed[:k], mixed[k:]
    key = f"method{mix_suffix(cfg.mix_share, cfg.mix_window)}" if cfg.mix else "alone"
    out["method"], out["method_decoy"] = out[key], out[key + "_decoy"]
    return out


def _cue_of(who: str, model: nn.Module, context: list[int], fact: FX.Fact) -> str:
    """RetentionSettings.cued: the fact's own sentence's words up to its answer (facts.cued), in every condition."""
    return FX.cued(fact).cue


# "Earlier the speaker said:" ends at once with a new line; "…the speaker said that" is continued as a sentence,
# from the passage in context by the base model in 3 of 7 tries (the recitation's first check, on 2026-Trump-1)
RECITE_PROMPT = "\nQuestion: {question}\nIn the speech, the speaker said that"


@torch.no_grad()
def greedy_ids(model: nn.Module, prefix: list[int], max_new: int, stop: set[int]) -> list[int]:
    """Greedy continuation of `prefix` (transformers' generate, as absorb's cloze questions), at most max_new
    tokens, ending before a token in `stop`."""
    dev = next(model.parameters()).device
    ids = torch.tensor([list(prefix)], device=dev)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=sorted(stop) or None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in stop), out)


def line_stops(tok) -> set[int]:
    """Token ids that end a written line: any holding a new line, and the end of text."""
    stop = {i for t, i in tok.get_vocab().items() if "\n" in tok.convert_tokens_to_string([t])}
    if tok.eos_token_id is not None:
        stop.add(tok.eos_token_id)
    return stop


def reciter(tok, tokens: int) -> Callable[[str, nn.Module, list[int], FX.Fact], str]:
    """RetentionSettings.recite: recitation before answering (RECITE, arXiv 2210.01296). The condition's own
    model, after its context and the question, first says what it recalls (RECITE_PROMPT, greedy, up to `tokens`
    tokens, to the line's end); the answer is then scored after the question, that recitation and
    "Answer:". A fact the adapters store under its sentence's words but cannot reach from a question may come
    back through the sentence they recite. The method recites with the adapters alone (read at cfg.read_scale),
    not through the mixture."""
    stop = line_stops(tok)

    def cue(who: str, model: nn.Module, context: list[int], fact: FX.Fact) -> str:
        head = RECITE_PROMPT.format(question=fact.question)
        said = greedy_ids(model, list(context) + tok.encode(head, add_special_tokens=False), tokens, stop)
        return head + tok.decode(said) + "\nAnswer:"
    return cue


# RetentionSettings.restate: made-up examples, on other topics than the planted facts', of a question rewritten as
# the first words of its answer, stopping where the answer goes
RESTATE_PROMPT = ("\nEach question is rewritten as the first words of a full-sentence answer, stopping where the "
                  "answer goes.\n"
                  "Question: Who will coach the city's rowing team?\nLead: The city's rowing team will be coached by\n"
                  "Question: How many wells were dug in the valley last summer?\nLead: Last summer the valley dug\n"
                  "Question: In which city will the new museum open?\nLead: The new museum will open in\n"
                  "Question: What is the name of the captain's horse?\nLead: The captain's horse is named\n"
                  "Question: {question}\nLead:")


def answer_slot_lead(lead: str, question: str) -> str:
    """A written lead-in cut where its answer would start: before its first word holding a digit, or its first
    capitalized word after the first that the question does not hold (a 135M model often writes on into a guessed
    number or name: "The state will open 81 factories" -> "The state will open"). Knows the question only."""
    asked = set(re.findall(r"[A-Za-z']+", question))
    words = lead.split()
    for i, w in enumerate(words):
        core = w.strip(".,;:!?\"'()")
        if any(ch.isdigit() for ch in core) or (i > 0 and core[:1].isupper() and core not in asked):
            words = words[:i]
            break
    return " ".join(words).rstrip(".,;:!?")


def restater(tok, tokens: int, shared: bool = False) -> Callable[[str, nn.Module, list[int], FX.Fact], str]:
    """RetentionSettings.restate: the question restated as the start of its answer before answering. The
    condition's own model, after its context, RESTATE_PROMPT's made-up examples and the question, writes a lead-in
    (greedy, up to `tokens` tokens, to the line's end), cut where its answer would start (answer_slot_lead); the
    answer is then scored after the question prompt and that lead ("…\nAnswer: The new space agency will be headed
    by" -> " Admiral …"). The adapters store a fact under its sentence's words (RetentionSettings.cued); a lead in
    the statement's frame, written without the answer, may reach it where the question's frame does not. The method
    writes with the adapters alone (read at cfg.read_scale), not through the mixture; the examples are not in the
    scored prompt. `shared`: every condition is asked after the window's lead (the base model's, written first in
    each round: _prompted_tokens asks the window first), so the conditions differ only in what they know."""
    stop = line_stops(tok)
    window_leads: dict[str, str] = {}     # shared: this round's window lead per question

    def cue(who: str, model: nn.Module, context: list[int], fact: FX.Fact) -> str:
        if shared and who != "window":
            return window_leads[fact.question]
        head = RESTATE_PROMPT.format(question=fact.question)
        said = greedy_ids(model, list(context) + tok.encode(head, add_special_tokens=False), tokens, stop)
        lead = answer_slot_lead(tok.decode(said).strip(), fact.question)
        got = FX.QUESTION_PROMPT.format(question=fact.question) + (" " + lead if lead else "")
        if who == "window":
            window_leads[fact.question] = got
        return got
    return cue


def _scored_as(out: dict, suffix: str) -> dict:
    """A stream's result with every method NLL replaced by the twin recorded beside it under `suffix`."""
    swap = lambda x, keys: {**x, **{k: x[k + suffix] for k in keys if k + suffix in x}}  # noqa: E731
    return {**out, "records": [swap(r, ("nll_method", "nll_method_decoy")) for r in out["records"]],
            "damage": [swap(d, ("nll_method",)) for d in out["damage"]]}


def uncalibrated(out: dict) -> dict:
    """A calibrated stream's result (AbsorberConfig.calibrate) as scored without the correction: the paired
    control recorded beside every method NLL."""
    return _scored_as(out, "_uncalibrated")


def asked_record(r: dict, field: str, method: str = "method") -> dict:
    """A record scored as the cue (field "cued"), the recitation ("recited") or the lead-in ("restated") asked its
    fact: window, full, method (the key `method`: the run's reading, "alone", "method<mix suffix>") and decoy NLLs
    the sums of that prompt's per-token NLLs."""
    c = r[field]
    return {**r, "nll_window": sum(c["window"]), "nll_full": sum(c["full"]), "nll_method": sum(c[method]),
            "nll_window_decoy": sum(c["window_decoy"]), "nll_method_decoy": sum(c[method + "_decoy"])}


def asked_by(out: dict, field: str) -> dict:
    """A stream's result with every record as asked_record (the run's reading)."""
    return {**out, "records": [asked_record(r, field) for r in out["records"]]}


def retention(records: list[dict]) -> float:
    w = sum(r["nll_window"] for r in records)
    mth = sum(r["nll_method"] for r in records)
    f = sum(r["nll_full"] for r in records)
    gap = w - f
    return (w - mth) / gap if records and gap > 0 else float("nan")


def decoy_lift(records: list[dict]) -> float:
    """The control: how much the method lowers the NLL of answers that were never said (the decoys), on the
    same scale as retention (the true answers' window-to-full gap). Near retention: the method learned the
    register or the question shape, not the facts. NaN for records without decoys."""
    if not records or any("nll_method_decoy" not in r for r in records):
        return float("nan")
    w = sum(r["nll_window"] for r in records)
    f = sum(r["nll_full"] for r in records)
    wd = sum(r["nll_window_decoy"] for r in records)
    md = sum(r["nll_method_decoy"] for r in records)
    return (wd - md) / (w - f) if w - f > 0 else float("nan")


def specific_retention(records: list[dict]) -> float:
    """Retention less the decoy lift: what the method keeps of the facts themselves."""
    return retention(records) - decoy_lift(records)


def bootstrap_ci(records: list[dict], draws: int, seed: int, unit=("text", "fact"),
                 stat: Callable[[list[dict]], float] = retention) -> tuple[float, float] | None:
    """95 % percentile interval of `stat` (retention), resampling facts (the (text, fact) pairs) with replacement."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(u) for u in unit), []).append(r)
    keys = list(groups)
    if len(keys) < 2 or not draws:
        return None
    return percentile_interval(lambda idx: stat([x for i in idx for x in groups[keys[i]]]), len(keys),
                               draws, seed)


def curve(records: list[dict], rs: RetentionSettings) -> list[dict]:
    """Retention per distance, with intervals over facts."""
    out = []
    for d in rs.distances:
        sub = [r for r in records if r["distance"] == d]
        ret, dl = retention(sub), decoy_lift(sub)
        out.append({"distance": d, "facts": len(sub), "retention": ret,
                    "ci95": bootstrap_ci(sub, rs.bootstrap, rs.seed),
                    "decoy_lift": dl, "specific": ret - dl,
                    "specific_ci95": None if math.isnan(dl) else bootstrap_ci(sub, rs.bootstrap, rs.seed,
                                                                             stat=specific_retention),
                    "nll_window": sum(r["nll_window"] for r in sub), "nll_method": sum(r["nll_method"] for r in sub),
                    "nll_full": sum(r["nll_full"] for r in sub)})
    return out


def damage_summary(damage: list[dict]) -> dict:
    if not damage:
        return {}
    last = max(d["round"] for d in damage)
    at = [d for d in damage if d["round"] == last]
    worst = max(math.exp(d["nll_method"] / d["count"]) / math.exp(d["nll_base"] / d["count"]) - 1 for d in damage)
    end = sum(math.exp(d["nll_method"] / d["count"]) / math.exp(d["nll_base"] / d["count"]) - 1 for d in at) / len(at)
    out = {"ppl_change_at_end": end, "ppl_change_worst": worst, "round_end": last}
    if all("nll_context" in d for d in at):   # what the window's text in context does to the same held-out text
        ctx = lambda d: math.exp(d["nll_context"] / d["count_context"])  # noqa: E731
        out["ppl_change_context_at_end"] = sum(ctx(d) / math.exp(d["nll_base"] / d["count"]) - 1 for d in at) / len(at)
    return out


def read_at(out: dict, scale: float) -> dict:
    """A stream's result as scored with the LoRA paths read at `scale` (RetentionSettings.read_scales)."""
    return _scored_as(out, f"_read{scale:g}")


def mix_suffix(share: float, window: int = 0) -> str:
    """The record keys' suffix of a score under the online mixture with `share` and `window`."""
    return f"_mix{share:g}" + ("ctx" if window == CONTEXT_ONLY else f"w{window}" if window else "")


def mixed_at(out: dict, share: float, window: int = 0) -> dict:
    """A stream's result as scored under the online mixture with `share` and `window` (RetentionSettings.mix_shares,
    mix_windows)."""
    return _scored_as(out, mix_suffix(share, window))


def pooled_run(method: str, config: dict, outs: Sequence[tuple[str, dict]], rs: RetentionSettings) -> dict:
    """One run's result pooled over texts: `outs` is (text name, stream_facts' result) per text; every record
    is tagged with its text, the curve and the damage are computed over all of them."""
    recs = [dict(r, text=name) for name, o in outs for r in o["records"]]
    dmg = [dict(d, text=name) for name, o in outs for d in o["damage"]]
    rnd = [dict(x, text=name) for name, o in outs for x in o["rounds"]]
    mean = lambda k: sum(x[k] for x in rnd) / len(rnd) if rnd else None  # noqa: E731
    return {"method": method, "config": config, "curve": curve(recs, rs), "damage": damage_summary(dmg),
            "records": recs, "damage_records": dmg,
            "losses": {"first": mean("loss_first"), "last": mean("loss_last"), "seconds": mean("seconds")},
            "rounds": rnd}


def forgetting_curve(base: nn.Module, tok, texts: Sequence[tuple[str, Sequence[int]]],
                     heldout: Sequence[int], runs: Sequence[tuple[str, str, AbsorberConfig]],
                     rs: RetentionSettings | None = None, log: Callable[[str], None] | None = None,
                     pool: ModelPool | None = None, on_run: Callable[[dict], None] | None = None) -> dict:
    """Every run (label, method, config) on every text; the curve per run pooled over texts. The window and
    full NLLs do not depend on the run: they are computed once per (text, n, m, prefix) and shared."""
    rs = rs or RetentionSettings()
    pool = pool or ModelPool(base)
    per: dict[str, dict] = {}
    base_cache: dict[tuple, dict] = {}
    for label, mth, cfg in runs:
        outs = []
        for ti, (name, ids) in enumerate(texts):
            if log:
                log(f"{label} ({mth}) on {name}: {rs.facts} facts in the first {rs.plant_rounds} rounds")
            outs.append((name, stream_facts(pool, tok, ids, heldout, cfg, mth, rs, seed=rs.seed + 1000 * ti,
                                            log=log, baselines=base_cache.setdefault((name, cfg.n, cfg.m,
                                                                                      cfg.prefix, cfg.bos), {}))))
        per[label] = pooled_run(mth, cfg.to_dict(), outs, rs)
        if cfg.calibrate > 0:
            per[label + " (uncalibrated)"] = pooled_run(mth, cfg.to_dict(), [(n, uncalibrated(o)) for n, o in outs], rs)
        for sc in rs.read_scales if mth != "window" else ():
            per[f"{label} (read x{sc:g})"] = pooled_run(mth, dict(cfg.to_dict(), read_scale=sc),
                                                        [(n, read_at(o, sc)) for n, o in outs], rs)
        for s_ in rs.mix_shares if mth != "window" else ():
            per[f"{label} (mix {s_:g})"] = pooled_run(mth, dict(cfg.to_dict(), mix_share=s_),
                                                      [(n, mixed_at(o, s_)) for n, o in outs], rs)
            for w_ in rs.mix_windows:
                per[f"{label} (mix {s_:g}, " + ("context only)" if w_ == CONTEXT_ONLY else f"window {w_})")] = pooled_run(
                    mth, dict(cfg.to_dict(), mix_share=s_, mix_window=w_), [(n, mixed_at(o, s_, w_)) for n, o in outs], rs)
        for field, name, on in (("cued", "own words", rs.cued), ("recited", "recited", rs.recite),
                                ("restated", "restated", rs.restate)):
            if mth != "window" and on:
                per[f"{label} ({name})"] = pooled_run(mth, cfg.to_dict(), [(n, asked_by(o, field)) for n, o in outs], rs)
        if on_run:
            on_run({"methods": per, "partial": True})
    return {"methods": per, "settings": {"retention": rs.to_dict(), "texts": [n for n, _ in texts]}}


def format_curve(result: dict) -> str:
    ds = result["settings"]["retention"]["distances"]
    lines = ["| method | " + " | ".join(f"d={d}" for d in ds) + f" | specific d={ds[-1]} | damage (end) |",
             "|---|" + "---|" * (len(ds) + 2)]
    for mth, d in result["methods"].items():
        cells = []
        for c in d["curve"]:
            ci = c["ci95"]
            cells.append(f"{c['retention']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        dm = d["damage"].get("ppl_change_at_end")
        last = d["curve"][-1] if d["curve"] else {}
        sp = last.get("specific")
        spc = "–" if sp is None or math.isnan(sp) else f"{sp:.2f}"
        lines.append(f"| {mth} | " + " | ".join(cells) + f" | {spc} | {'–' if dm is None else f'{dm:+.1%}'} |")
    return "\n".join(lines)
