"""Evaluation at equal compute: streaming perplexity, recall after eviction and a passkey test, per method.

Every text is streamed through every method with the same n, m, K and optimizer (`absorber.stream`), with
fresh adapters (and a fresh optimizer) per text. The loop for one text, with r = 1..S rounds:

    feed the first n+m tokens (round 1 runs: X = the first n tokens leave the window, Y stays)
    after each round r, the window holds Y (m tokens); then
      * score the NEXT s tokens of the stream (the ones about to enter the window), conditioned on the method's
        context: window (window, ttt, absorber: + the adapters), 4 sink tokens + window (sink), or the whole
        history up to the model's context (full);
      * recall probe: score the first `recall_len` tokens of the X that has just left the window, as if the
        stream repeated it now (nothing is fed: the probe does not change the stream);
    feed the next n tokens (round r+1 runs)

Summary per method: NLL summed over all segments of all texts before dividing (per-segment ratios are noise),
PPL = exp(mean NLL), recovered fraction R = (PPL_window - PPL_method) / (PPL_window - PPL_full), and a
percentile bootstrap interval over segments (paired: the same resampled segments for every method), and the
same R on the *key tokens* alone (LongPPL, arXiv 2410.23771: the tokens of the next segment where the full
context lowers the NLL by more than EvalSettings.key_gain nats against the window and predicts them well; plain
perplexity averages the long-range effect away over the tokens that need no context). With
EvalSettings.read_scales, each trained method also gets a row per scale, scored on the same adapters read weaker.

Passkey: "The pass key is 48213. Remember it." planted at a depth of a real text, the question asked at the end
after the whole haystack has been streamed; greedy decoding, exact digits.
"""
from __future__ import annotations

import copy
import itertools
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from absorber import lora
from absorber.config import AbsorberConfig, grid_points, override
from absorber.mixture import SHARE, Mixture, evidence_start
from absorber.stream import StreamingAbsorber

METHODS = ("full", "window", "sink", "ttt", "absorber")    # report order
TRAINED = ("ttt", "absorber")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
# the task statement of the classic passkey test (Mohtashami & Jaggi 2023) opens the stream; without it
# SmolLM2-135M answers from the speech even with the needle in context (measured: 2 of 3 vs 3 of 3 with it)
INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. " \
        "I will quiz you about the pass key.\n"
QUESTION = " What is the pass key? The pass key is"


@dataclass
class EvalSettings:
    """What to measure (the method's own knobs live in AbsorberConfig)."""
    methods: tuple[str, ...] = METHODS
    score_len: int | None = None          # tokens scored after each round (None: n, the tokens that enter next)
    segments: int | None = None           # at most this many rounds (= scored segments) per text; None: all
    recall_len: int = 64                  # tokens of the just-evicted X scored as a repeat (0: off)
    max_context: int | None = None        # cap of `full`'s context (None: the model's max positions)
    passkey_lengths: tuple[int, ...] = (1024,)        # haystack lengths in tokens (empty: no passkey test)
    passkey_depths: tuple[float, ...] = (0.1, 0.3)    # where the needle goes, as a fraction of the haystack
    passkey_trials: int = 1               # keys per (length, depth); trial j uses text j (mod the texts) as haystack
    bootstrap: int = 2000                 # bootstrap resamples for the intervals
    seed: int = 0
    # key tokens (LongPPL, arXiv 2410.23771): the next segment's tokens where long context matters, i.e. the full
    # context lowers their NLL by more than key_gain nats against the window (LongPPL's LSD > 2) and predicts
    # them with NLL below key_full_nll (its LCL > -2). R is also reported on them alone. None: off (the records
    # then carry no per-token NLLs).
    key_gain: float | None = 2.0
    key_full_nll: float = 2.0
    # the trained methods also scored with their LoRA paths read at these scales (lora.read_scaled; absolute,
    # not on top of AbsorberConfig.read_scale), on the same adapters: one trained stream gives a row per scale,
    # reported as the method "absorber (read x0.25)" and so on
    read_scales: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- scoring
def model_max_positions(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


@torch.no_grad()
def token_nll(model: nn.Module, context: Sequence[int], target: Sequence[int],
              max_len: int | None = None) -> torch.Tensor:
    """Per-token NLL (nats, float32, one per scored token) of `target` given `context`.

    One forward over context+target at positions 0..T-1 (the window's positions); the context is cut from the
    left to fit max_len. Without context the first target token has no prediction and is not scored."""
    max_len = max_len or model_max_positions(model)
    target = list(target)
    if len(target) > max_len:
        raise ValueError(f"target of {len(target)} tokens does not fit max_len={max_len}")
    context = list(context)[max(0, len(context) - (max_len - len(target))):]
    ids = torch.tensor([context + target], device=next(model.parameters()).device)
    keep = len(target) + (1 if context else 0)
    out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device).unsqueeze(0),
                attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=keep)
    logits = out.logits[0, :-1].float()             # predictions for the next `keep - 1` tokens
    tgt = ids[0, ids.shape[1] - logits.shape[0]:]
    return F.cross_entropy(logits, tgt, reduction="none").cpu()


def score_nll(model: nn.Module, context: Sequence[int], target: Sequence[int],
              max_len: int | None = None) -> tuple[float, int]:
    """Summed NLL (nats) of `target` given `context`, and the number of tokens scored (token_nll)."""
    t = token_nll(model, context, target, max_len)
    return float(t.sum()), int(t.numel())


def mixed_token_nll(model: nn.Module, context: Sequence[int], target: Sequence[int],
                    max_len: int | None = None, share: float = SHARE, window: int = 0) -> torch.Tensor:
    """token_nll of `target` under the online mixture (absorber.mixture) of `model` as it reads and the same model
    with its LoRA paths at 0 (the base model), the mixture's weight learned over the context first (its last
    `window` tokens; 0: all, AbsorberConfig.mix_window)."""
    max_len = max_len or model_max_positions(model)
    context = list(context)[max(0, len(context) - (max_len - len(target))):]
    seq = context + list(target)
    a = token_nll(model, [], seq, max_len)
    with lora.read_scaled(model, 0.0):
        b = token_nll(model, [], seq, max_len)
    scored = len(target) if context else len(target) - 1
    start = evidence_start(len(a) - scored, window)
    lm = Mixture(share).run((-a[start:]).tolist(), (-b[start:]).tolist())
    return torch.from_numpy(-lm[len(lm) - scored:]).float()


def method_nll(model: nn.Module, context: Sequence[int], target: Sequence[int], max_len: int | None = None,
               mix: float | None = None, mix_window: int = 0) -> tuple[float, int]:
    """score_nll as the method reads; `mix`: under the online mixture with the base model with this fixed share
    (AbsorberConfig.mix / mix_share / mix_window), None: the adapters alone."""
    return _scored(model, context, target, max_len, False, mix, mix_window)[:2]


def _scored(model, context, target, max_len, tokens: bool, mix: float | None = None,
            mix_window: int = 0) -> tuple[float, int, list[float] | None]:
    """score_nll, and with `tokens` the per-token NLLs too (rounded to 1e-5: the key-token summary's input); `mix`:
    under the online mixture with the base model with this share (mixed_token_nll), None: the adapters alone."""
    t = token_nll(model, context, target, max_len) if mix is None else mixed_token_nll(model, context, target,
                                                                                     max_len, mix, mix_window)
    return float(t.sum()), int(t.numel()), ([round(float(v), 5) for v in t] if tokens else None)


def ppl(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")


def recovered_fraction(ppl_window: float, ppl_method: float, ppl_full: float) -> float:
    """R = (PPL_window - PPL_method) / (PPL_window - PPL_full): 1 = the whole gap to full context recovered,
    0 = no better than the window, < 0 = worse than the window. NaN when there is no gap."""
    gap = ppl_window - ppl_full
    if not math.isfinite(gap) or gap == 0:
        return float("nan")
    return (ppl_window - ppl_method) / gap


# ------------------------------------------------------------------------------------------------- models
class ModelPool:
    """One loaded base model; per LoRA config one deep copy with adapters injected, reset per text/method.

    Re-creating adapters is a copy of the initial A/B values (B = 0: identity) and a fresh optimizer, instead
    of reloading or re-copying the model."""

    def __init__(self, base: nn.Module):
        self.base = base
        self._lora: dict[tuple, tuple[nn.Module, dict[str, torch.Tensor]]] = {}

    def fresh(self, method: str, cfg: AbsorberConfig) -> nn.Module:
        if method not in TRAINED:
            return self.base        # the baselines never change the weights
        key = repr(asdict(cfg.lora))
        if key not in self._lora:
            self._lora.clear()      # one adapted copy at a time (memory)
            work = copy.deepcopy(self.base)
            lora.inject(work, cfg.lora)
            self._lora[key] = (work, lora.snapshot(work))
        work, init = self._lora[key]
        lora.load_state(work, init)
        return work


def make_streamer(pool: ModelPool, tok, cfg: AbsorberConfig, method: str,
                  settings: EvalSettings) -> StreamingAbsorber:
    model = pool.fresh(method, cfg)
    sa = StreamingAbsorber(model, tok, copy.deepcopy(cfg), method)
    if method == "full" and settings.max_context:
        sa.max_positions = min(sa.max_positions, settings.max_context)
    return sa


# ------------------------------------------------------------------------------------------------- streaming
def needed_tokens(cfg: AbsorberConfig, settings: EvalSettings, rounds: int) -> int:
    s = settings.score_len or cfg.n
    return cfg.n + cfg.m + (rounds - 1) * cfg.n + s


def num_rounds(length: int, cfg: AbsorberConfig, settings: EvalSettings) -> int:
    s = settings.score_len or cfg.n
    r = (length - cfg.n - cfg.m - s) // cfg.n + 1 if length >= cfg.n + cfg.m + s else 0
    return min(r, settings.segments) if settings.segments else r


def stream_rounds(sa: StreamingAbsorber, ids: Sequence[int], rounds: int):
    """Feed a stream round by round: the first n+m tokens (round 1 runs), then n more per round. Yields
    (round, tokens fed so far, the RoundResults of that feed)."""
    n, m = sa.cfg.n, sa.cfg.m
    pos = 0
    for r in range(1, rounds + 1):
        chunk = ids[pos:n + m] if r == 1 else ids[pos:pos + n]
        done = sa.feed_tokens(chunk)
        pos += len(chunk)
        yield r, pos, done


def stream_text(pool: ModelPool, tok, ids: Sequence[int], cfg: AbsorberConfig, method: str,
                settings: EvalSettings, log: Callable[[str], None] | None = None,
                on_record: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Stream one text through one method; one record per round (= scored segment).
    on_record(records so far) runs after every round (checkpoints of long streams)."""
    ids = list(ids)
    n, m = cfg.n, cfg.m
    s = settings.score_len or n
    rounds = num_rounds(len(ids), cfg, settings)
    sa = make_streamer(pool, tok, cfg, method, settings)
    max_len = sa.max_positions if method == "full" else model_max_positions(sa.model)
    records: list[dict] = []
    keys = settings.key_gain is not None       # per-token NLLs for the key-token summary
    for r, pos, done in stream_rounds(sa, ids, rounds):
        ctx = sa.context()
        mix = sa.cfg.mix_share if sa.cfg.mix and method in TRAINED else None
        mw = sa.cfg.mix_window
        with sa.reading():
            nll, cnt, toks = _scored(sa.model, ctx, ids[pos:pos + s], max_len, keys, mix, mw)
        rec = {"round": r, "position": pos, "context": len(ctx), "nll": nll, "count": cnt}
        if keys:
            rec["token_nll"] = toks
        if mix is not None:                # the paired control: the adapters read alone, on the same round
            with sa.reading():
                rec["nll_unmixed"], _, t = _scored(sa.model, ctx, ids[pos:pos + s], max_len, keys)
            if keys:
                rec["token_nll_unmixed"] = t
        start = pos - m - n                # the X that has just left the window
        probe = ids[start:start + min(settings.recall_len, n)]
        if settings.recall_len:
            with sa.reading():
                rec["recall_nll"], rec["recall_count"] = method_nll(sa.model, ctx, probe, max_len, mix, mw)
        for sc in settings.read_scales if method in TRAINED else ():
            with lora.read_scaled(sa.model, sc):
                rec[f"nll{_read(sc)}"], _, t = _scored(sa.model, ctx, ids[pos:pos + s], max_len, keys, mix, mw)
                if keys:
                    rec[f"token_nll{_read(sc)}"] = t
                if settings.recall_len:
                    rec[f"recall_nll{_read(sc)}"], _ = method_nll(sa.model, ctx, probe, max_len, mix, mw)
        res = done[-1] if done else None
        if method in TRAINED and res is not None:
            rec.update(loss_first=res.loss_first, loss_last=res.loss_last, steps=res.steps,
                       seconds=res.seconds, rolled_back=res.rolled_back)
        records.append(rec)
        if on_record:
            on_record(records)
        if log:
            extra = f" loss {res.loss_first:.4f}->{res.loss_last:.4f} {res.seconds:.1f}s" \
                if method in TRAINED and res is not None and res.loss_first is not None else ""
            log(f"  {method:8s} round {r:2d} pos {pos:6d} ppl {ppl(nll, cnt):8.3f}{extra}")
    return records


# ------------------------------------------------------------------------------------------------- passkey
def plant_passkey(tok, haystack: Sequence[int], key: str, depth: float) -> tuple[list[int], int, int]:
    """Insert the needle sentence into `haystack` at `depth` (0..1 of its length), after the task statement.
    Returns (ids, start, end): ids[start:end] are the needle's tokens."""
    needle = tok.encode(NEEDLE.format(key=key), add_special_tokens=False)
    intro = tok.encode(INTRO, add_special_tokens=False)
    haystack = list(haystack)
    at = min(len(haystack), max(0, int(round(depth * len(haystack)))))
    start = len(intro) + at
    return intro + haystack[:at] + needle + haystack[at:], start, start + len(needle)


def passkey_trial(pool: ModelPool, tok, haystack: Sequence[int], cfg: AbsorberConfig, method: str,
                  settings: EvalSettings, key: str, depth: float) -> dict:
    ids, start, end = plant_passkey(tok, haystack, key, depth)
    sa = make_streamer(pool, tok, cfg, method, settings)
    sa.feed_tokens(ids)
    ctx_start = sa.tokens_seen - len(sa.window)      # stream index of the window's first token
    q = tok.encode(QUESTION, add_special_tokens=False)
    out = tok.decode(sa.generate_ids(q, max_new_tokens=8), skip_special_tokens=True)
    digits = re.findall(r"\d+", out)
    return {"length": len(haystack), "depth": depth, "key": key, "answer": out.strip(),
            "correct": bool(digits) and digits[0] == key, "in_window": start >= ctx_start,
            "evicted_tokens_ago": max(0, ctx_start - end)}


# ------------------------------------------------------------------------------------------------- summary
def _pooled(records: list[dict], nll_key="nll", cnt_key="count") -> tuple[float, int]:
    return sum(r[nll_key] for r in records), sum(r[cnt_key] for r in records)


def bootstrap(per_method: dict[str, list[dict]], stat: Callable[[dict[str, tuple[float, int]]], float],
              nll_key: str, cnt_key: str, draws: int, seed: int) -> tuple[float, float] | None:
    """95 % percentile interval of `stat` over segments resampled with replacement (paired across methods)."""
    lens = {len(v) for v in per_method.values()}
    if len(lens) != 1 or not draws:
        return None
    k = lens.pop()
    if k < 2:
        return None
    def one(idx):
        return stat({mth: (sum(recs[i][nll_key] for i in idx), sum(recs[i][cnt_key] for i in idx))
                     for mth, recs in per_method.items()})
    return percentile_interval(one, k, draws, seed)


def percentile_interval(stat_of: Callable[[list[int]], float], k: int, draws: int,
                        seed: int) -> tuple[float, float] | None:
    """95 % percentile bootstrap interval: stat_of(indices drawn with replacement from range(k)), `draws`
    times; None when fewer than half the draws give a finite value."""
    rng = random.Random(seed)
    vals = []
    for _ in range(draws):
        v = stat_of([rng.randrange(k) for _ in range(k)])
        if math.isfinite(v):
            vals.append(v)
    if len(vals) < draws // 2:
        return None
    vals.sort()
    return vals[int(0.025 * (len(vals) - 1))], vals[int(0.975 * (len(vals) - 1))]


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def key_tokens(segments: dict[str, list[dict]], settings: EvalSettings) -> dict[str, list[dict]] | None:
    """Per method and segment, the NLL summed over the segment's key tokens and their count ({"nll", "count"}
    records aligned with the segments). Key tokens come from the window's and full context's per-token NLLs
    (EvalSettings.key_gain, key_full_nll); None without both baselines or per-token NLLs."""
    if settings.key_gain is None or "window" not in segments or "full" not in segments:
        return None
    win, full = segments["window"], segments["full"]
    if not win or any("token_nll" not in r for r in win + full):
        return None
    masks = [[w - f > settings.key_gain and f < settings.key_full_nll for w, f in zip(a["token_nll"], b["token_nll"])]
             for a, b in zip(win, full)]
    out = {}
    for mth, recs in segments.items():
        if len(recs) != len(masks) or any("token_nll" not in r for r in recs):
            continue
        out[mth] = [{"nll": sum(v for v, k in zip(r["token_nll"], mk) if k), "count": sum(mk)}
                    for r, mk in zip(recs, masks)]
    return out


def summarize(segments: dict[str, list[dict]], passkey: dict[str, list[dict]], settings: EvalSettings) -> dict:
    """Per-method summary from the per-segment records (records aligned across methods, same order)."""
    out: dict[str, dict] = {}
    have_ref = "window" in segments and "full" in segments
    for mth, recs in segments.items():
        nll, cnt = _pooled(recs)
        d = {"ppl": ppl(nll, cnt), "nll_per_token": nll / cnt if cnt else None, "segments": len(recs),
             "tokens_scored": cnt}
        d["ppl_ci95"] = bootstrap({mth: recs}, lambda p: ppl(*p[mth]), "nll", "count",
                                  settings.bootstrap, settings.seed)
        if recs and "recall_nll" in recs[0]:
            rn, rc = _pooled(recs, "recall_nll", "recall_count")
            d["recall_ppl"] = ppl(rn, rc)
        trained = read_method(mth)             # a read-scale row reports its method's training
        if trained in TRAINED:
            firsts = [r.get("loss_first") for r in recs]
            lasts = [r.get("loss_last") for r in recs]
            pre = "sync_loss" if trained == "absorber" else "train_loss"
            d[f"{pre}_first"], d[f"{pre}_last"] = _mean(firsts), _mean(lasts)
            d["round_seconds"] = _mean([r.get("seconds") for r in recs])
            d["rollbacks"] = sum(bool(r.get("rolled_back")) for r in recs)
        out[mth] = d
    if have_ref:
        trio = lambda a, b, c: (lambda p: recovered_fraction(ppl(*p[a]), ppl(*p[b]), ppl(*p[c])))
        for mth, d in out.items():
            d["recovered_fraction"] = recovered_fraction(out["window"]["ppl"], d["ppl"], out["full"]["ppl"])
            sub = {k: segments[k] for k in {"window", "full", mth}}
            d["recovered_fraction_ci95"] = bootstrap(sub, trio("window", mth, "full"), "nll", "count",
                                                     settings.bootstrap, settings.seed)
            if "recall_ppl" in d:
                d["recall_recovered_fraction"] = recovered_fraction(out["window"]["recall_ppl"], d["recall_ppl"],
                                                                    out["full"]["recall_ppl"])
                d["recall_recovered_fraction_ci95"] = bootstrap(
                    sub, trio("window", mth, "full"), "recall_nll", "recall_count", settings.bootstrap,
                    settings.seed)
        keyed = key_tokens(segments, settings)
        for mth, d in out.items() if keyed else ():
            if mth not in keyed:
                continue
            nll, cnt = _pooled(keyed[mth])
            d["key_tokens"], d["key_ppl"] = cnt, ppl(nll, cnt) if cnt else None
            if cnt:
                d["key_recovered_fraction"] = recovered_fraction(ppl(*_pooled(keyed["window"])), d["key_ppl"],
                                                                 ppl(*_pooled(keyed["full"])))
                d["key_recovered_fraction_ci95"] = bootstrap(
                    {k: keyed[k] for k in {"window", "full", mth}}, trio("window", mth, "full"), "nll", "count",
                    settings.bootstrap, settings.seed)
    for mth, trials in passkey.items():
        if trials:
            out.setdefault(mth, {})["passkey_accuracy"] = sum(t["correct"] for t in trials) / len(trials)
            evicted = [t for t in trials if not t["in_window"]]
            out[mth]["passkey_accuracy_evicted"] = (sum(t["correct"] for t in evicted) / len(evicted)
                                                    if evicted else None)
    for d in out.values():   # the documented keys are always present
        for k in ("ppl", "recovered_fraction", "recall_ppl", "passkey_accuracy", "sync_loss_first",
                  "sync_loss_last", "key_recovered_fraction"):
            d.setdefault(k, None)
    return out


# ------------------------------------------------------------------------------------------------- the run
def evaluate(base: nn.Module, tok, texts: Sequence[tuple[str, Sequence[int]]], cfg: AbsorberConfig,
             settings: EvalSettings | None = None, pool: ModelPool | None = None,
             cached: dict[str, dict] | None = None, log: Callable[[str], None] | None = None,
             on_method: Callable[[dict], None] | None = None) -> dict:
    """Run every method on every text; return the JSON-ready result {"methods", "settings", "segments", ...}.

    texts: (name, token ids). `cached`: method -> {"segments": {text: records}, "passkey": [...]} from an
    earlier run with the same n, m, s (the baselines do not depend on the training knobs; sweeps reuse them).
    on_method(partial result) runs after each method (to checkpoint long runs)."""
    settings = settings or EvalSettings()
    cfg.validate()
    unknown = set(settings.methods) - set(METHODS)
    if unknown:
        from absorber.errors import AbsorberError
        raise AbsorberError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    pool = pool or ModelPool(base)
    cached = cached or {}
    usable = [(name, list(ids)) for name, ids in texts if num_rounds(len(ids), cfg, settings) > 0]
    if not usable:
        from absorber.errors import AbsorberError
        raise AbsorberError(f"no text is long enough: one round needs n+m+s = "
                            f"{needed_tokens(cfg, settings, 1)} tokens")
    per_text: dict[str, dict[str, list[dict]]] = {m: {} for m in settings.methods}
    passkey: dict[str, list[dict]] = {m: [] for m in settings.methods}
    t0 = time.perf_counter()
    for mth in settings.methods:
        if mth in cached:
            per_text[mth] = cached[mth]["segments"]
            passkey[mth] = cached[mth]["passkey"]
            continue
        for name, ids in usable:
            if log:
                log(f"{mth} on {name} ({len(ids)} tokens, {num_rounds(len(ids), cfg, settings)} rounds)")
            per_text[mth][name] = stream_text(pool, tok, ids, cfg, mth, settings, log)
        if tok is not None and settings.passkey_lengths and settings.passkey_depths:
            rng = random.Random(settings.seed)   # same keys for every method
            for j, length, depth in itertools.product(range(settings.passkey_trials), settings.passkey_lengths,
                                                      settings.passkey_depths):
                name, hay = usable[j % len(usable)]
                key = str(rng.randrange(10000, 100000))
                if length > len(hay):
                    continue
                trial = passkey_trial(pool, tok, hay[:length], cfg, mth, settings, key, depth) | {"text": name}
                passkey[mth].append(trial)
                if log:
                    log(f"  {mth:8s} passkey {name} len {length} depth {depth}: {trial['correct']} "
                        f"({trial['answer']!r})")
        if on_method:
            on_method(_result(usable, per_text, passkey, cfg, settings, t0, [m for m in settings.methods
                                                                            if m in per_text and per_text[m]]))
    return _result(usable, per_text, passkey, cfg, settings, t0, list(settings.methods))


def _read(scale: float) -> str:
    """The record-key suffix of a scoring at read scale `scale` (EvalSettings.read_scales)."""
    return f"_read{scale:g}"


def read_label(method: str, scale: float) -> str:
    """The summary's name for `method` scored with its LoRA paths read at `scale`."""
    return f"{method} (read x{scale:g})"


def read_method(label: str) -> str:
    """The method a summary row belongs to: `method` for read_label(method, scale), the label itself otherwise."""
    return label.split(" (read x")[0]


def read_at(records: list[dict], scale: float) -> list[dict]:
    """The records as scored at read scale `scale`: its NLLs in place of the method's own (same counts)."""
    out = []
    for r in records:
        d = dict(r)
        for key in ("nll", "recall_nll", "token_nll"):
            if f"{key}{_read(scale)}" in r:
                d[key] = r[f"{key}{_read(scale)}"]
        out.append(d)
    return out


def _result(usable, per_text, passkey, cfg, settings, t0, methods_done) -> dict:
    segments = {m: [r for name, _ in usable for r in per_text[m].get(name, [])] for m in methods_done}
    for mth in [m for m in methods_done if m in TRAINED]:
        for sc in settings.read_scales:
            segments[read_label(mth, sc)] = read_at(segments[mth], sc)
    methods = summarize(segments, {m: passkey[m] for m in methods_done}, settings)
    return {
        "methods": methods,
        "settings": {"absorber": cfg.to_dict(), "eval": settings.to_dict(),
                     "texts": [{"name": n, "tokens": len(i), "rounds": num_rounds(len(i), cfg, settings)}
                               for n, i in usable],
                     "score_len": settings.score_len or cfg.n, "seconds": time.perf_counter() - t0},
        "segments": {m: per_text[m] for m in methods_done},
        "passkey": {m: passkey[m] for m in methods_done},
    }


# ------------------------------------------------------------------------------------------------- sweep
def sweep(base: nn.Module, tok, texts, cfg: AbsorberConfig, settings: EvalSettings, grid: dict[str, list],
          log: Callable[[str], None] | None = None, on_point: Callable[[dict], None] | None = None) -> dict:
    """Evaluate every point of the grid; baselines (window/sink/full) are computed once per (n, m)."""
    pool = ModelPool(base)
    cache: dict[tuple, dict] = {}
    points = []
    for point in grid_points(grid):
        c = override(copy.deepcopy(cfg), **point)
        if log:
            log(f"== sweep point {point}")
        base_key = (c.n, c.m, c.sink, c.bos)
        cached = cache.get(base_key, {})
        res = evaluate(base, tok, texts, c, settings, pool=pool, cached=cached, log=log)
        cache[base_key] = {m: {"segments": res["segments"][m], "passkey": res["passkey"][m]}
                           for m in res["segments"] if m not in TRAINED}
        points.append({"point": {k: (list(v) if isinstance(v, tuple) else v) for k, v in point.items()},
                       "methods": res["methods"], "settings": res["settings"], "segments": res["segments"]})
        if on_point:
            on_point({"sweep": points, "partial": True})
    return {"sweep": points, "grid": {k: [list(v) if isinstance(v, tuple) else v for v in vs]
                                      for k, vs in grid.items()}}


# ------------------------------------------------------------------------------------------------- report
def format_table(methods: dict[str, dict]) -> str:
    """A markdown table of the summary."""
    def f(x, fmt="{:.3f}"):
        return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)

    def ci(x):
        return "" if not x else f" [{x[0]:.2f}, {x[1]:.2f}]"
    rows = ["| method | PPL next segment | R (recovered) [95% CI] | key-token R [95% CI] | recall PPL | recall R "
            "| passkey acc | loss first → last |",
            "|---|---|---|---|---|---|---|---|"]
    for mth in [m for m in METHODS if m in methods] + [m for m in methods if m not in METHODS]:
        d = methods[mth]
        lf = d.get("sync_loss_first", d.get("train_loss_first"))
        ll = d.get("sync_loss_last", d.get("train_loss_last"))
        if lf is None:
            lf, ll = d.get("train_loss_first"), d.get("train_loss_last")
        loss = f"{f(lf, '{:.4f}')} → {f(ll, '{:.4f}')}" if lf is not None else "–"
        rows.append(f"| {mth} | {f(d.get('ppl'))}{ci(d.get('ppl_ci95'))} | {f(d.get('recovered_fraction'), '{:.2f}')}"
                    f"{ci(d.get('recovered_fraction_ci95'))} | {f(d.get('key_recovered_fraction'), '{:.2f}')}"
                    f"{ci(d.get('key_recovered_fraction_ci95'))} | {f(d.get('recall_ppl'))} | "
                    f"{f(d.get('recall_recovered_fraction'), '{:.2f}')}{ci(d.get('recall_recovered_fraction_ci95'))}"
                    f" | {f(d.get('passkey_accuracy'), '{:.2f}')} | {loss} |")
    return "\n".join(rows)


def plot(result: dict, path: str, title: str | None = None) -> None:
    """PPL of the next segment vs stream position per method (segments pooled across texts by round)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mth in [m for m in METHODS if m in result["segments"]]:
        by_round: dict[int, list[dict]] = {}
        for recs in result["segments"][mth].values():
            for r in recs:
                by_round.setdefault(r["round"], []).append(r)
        xs, ys = [], []
        for rnd in sorted(by_round):
            recs = by_round[rnd]
            xs.append(sum(r["position"] for r in recs) / len(recs))
            ys.append(ppl(*_pooled(recs)))
        ax.plot(xs, ys, marker="o", ms=3, label=f"{mth} ({result['methods'][mth]['ppl']:.2f})")
    ax.set_xlabel("stream position (tokens seen when the next segment is scored)")
    ax.set_ylabel("PPL of the next segment (pooled over texts)")
    ax.set_title(title or "Streaming perplexity per method")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
