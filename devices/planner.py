"""Memory planner: predict the peak RSS of one absorption round of the on-device runtime for a bundle and a
window (n, m, K), term by term, and choose the largest window that fits a budget.

All sizes are bytes. Activations are float32 (4 B). Notation: L layers, H hidden, I MLP width, nh heads,
kv KV heads, hd head dim, V vocab, S = number of loss layers, T = n + m (teacher pass), m (train step).

Terms (resident at the peak; coefficients in COEFFS, calibrated in benchmarks/planner.md):
  baseline    Python + numpy + onnxruntime + tokenizers + the two sessions' graphs + tokenizer (constant)
  weights     frozen weights as stored (the manifest's external-data table; else counted from the model facts:
              fp32 4 B/param, int8 1 B + a fp32 scale per row, int4 0.5 B + a fp32 scale per 32-block; the
              vocabulary table once when tied). The runtime maps weights.bin once and shares it between both
              sessions (`weight_copies` = 1); the MatMulNBits inputs of int8/int4 bundles (`kernel` in the tensor
              table) are mapped once too, and each session pre-packs its own copy of those it uses (`kernel_copies`
              x their bytes per graph, the map included); a bundle with combined.onnx (one session for both
              graphs): `kernel_copies_combined` x their bytes once
  adapters    LoRA A/B, gradients, AdamW m and v, the rollback backup and the update's numpy temporaries
              (`adapter_copies` x the adapters' fp32 bytes)
  kv_cache    2 * L * kv * hd * T * 4: the present K/V the teacher pass over X.Y produces
  teacher     two decoder passes, X into the KV cache, then Y (the larger counts, B = max(n, m)): hidden states
              out S*B*H*4 (x `c_out_copies`: ORT buffer + numpy copy), kept logits *V*4, attention scores
              nh*max(n^2, m*T)*4 (x `c_scores`), per-token working set c_tok*B*(H+I)*4, and for legacy
              int8/int4 bundles (DequantizeLinear everywhere) the [V, H] tables dequantized whole as fp32
  train_step  saved-for-backward activations of the student on Y: L*(c_saved_h*m*H + c_saved_i*m*I +
              c_saved_scores*nh*m^2)*4 (a recomputing train step, manifest graphs.train_step.recompute:
              L*c_rc_keep*m*H*4 + c_rc_layers layers' worth of the same), the teacher_hidden input S*m*H*4,
              the backward's dequantized [N, K] weights (MatMulNBits bundles, `c_dq_backward` x the largest); with enable_mem_pattern and K >= 2 one
              more copy of the saved activations; with the next-token term on X (loss.ntp_weight) X's
              activations (n tokens), [n, V] logits' and [V, H] tables' worth (fitted `c_ntp_*`)
The teacher pass and the train step do not run at the same time. With the arena on, the runtime's two sessions
share one arena (runtime/sessions.py), which reuses only part of what the teacher freed: the model adds the two
phases, with coefficients fitted that way (benchmarks/planner.md section 0); with it off the larger phase counts
(plus, for quantized bundles, one dequantized table landing on the heap the train step left fragmented).
K (optimizer steps per round) adds time, not memory (except through enable_mem_pattern, see above).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from absorber.bundle_format import Bundle, is_view_rows, read_manifest
from absorber.errors import AbsorberError

F32 = 4

# Named coefficients of the model. Defaults are calibrated in benchmarks/planner.md (see there for how).
COEFFS: dict[str, float] = {
    "baseline_bytes": 110 * 2**20,    # python + numpy + onnxruntime + tokenizers + runtime (fitted, planner.md section 0)
    "baseline_per_layer": 2.4 * 2**20,  # both sessions' graphs, per decoder layer (measured: 4 vs 30 layers)
    "weight_copies": 1.0,             # resident copies of the frozen weights (see module doc)
    "adapter_copies": 7.0,            # params, grads, AdamW m and v, the rollback backup of all three (the
                                      # update's temporaries are 4 MB pieces)
    "c_out_copies": 2.0,              # graph outputs: the ORT buffer and the numpy array handed to Python
    "c_scores": 1.1,                  # attention scores + softmax probabilities of one layer live at once
    "c_tok": 4.0,                     # per-token working set of one layer, in units of (H + I) floats
    "c_saved_h": 15.0,                # saved-for-backward per layer per token, in H floats
    "c_saved_i": 6.0,                 # ... in I floats (gate, up, act, product)
    "c_saved_scores": 1.1,            # ... attention probabilities (and the pre-softmax scores) per layer
    "c_dq": 1.0,                      # fp32 copies of a dequantized [V, H] table live during a run
    "c_dq_int4_decoder": 0.33,        # int4: share of the linear layers' fp32 size live in the decoder run
    "c_dq_int4_train": 0.21,          # ... in the train step (measured at a 32x16 window, benchmarks/planner.md)
    "c_noarena_int4": 0.35,           # int4 without the arena: heap slack, x the linear layers' fp32 size
    "kernel_copies": 2.0,             # resident bytes per session per stored byte of a MatMulNBits input: the loaded
                                      # initializer and its pre-packed copy (fitted, benchmarks/planner.md section 3,
                                      # when each session loaded its own; bundles without combined.onnx only, now
                                      # on the safe side: the map is shared)
    "kernel_copies_combined": 2.7,    # the same for ONE session over both graphs (combined.onnx), per stored byte
                                      # counted once: the map and the pre-packed copy (refitted when the kernel
                                      # tensors came into the runtime's one map: SmolLM2 int4/int8 and Gemma-3-270M
                                      # int4 at three windows within -1.2..+10.7 %; planner.md section 0000000000)
    "c_rc_keep": 1.0,                 # recomputing bundles: kept per layer per token, in H floats (the residual;
                                      # bundles before 2026-12-05 also kept the normed input: fitted terms absorb it)
    "c_rc_layers": 1.0,               # ... layers' activations live at once in the backward
    "c_dq_backward": 1.0,             # fp32 [N, K] weights the backward dequantizes live at once, x the largest one
    "c_ntp_logits": 0.0,              # next-token term on X (loss.ntp_weight), fitted in planner.md section 00:
    "c_ntp_logits_rc": 10.9,          # ... [n, V] fp32 copies live: plain train step / recomputing one
    "c_ntp_scores_rc": 1.06,          # ... recomputing: x L layers' [nh, n, n] attention scores on X
    "c_ntp_saved": 0.64,              # ... plain train step: share of X's saved activations at the peak
    "c_ntp_tables": 3.97,             # ... [V, H] fp32 tables' worth: quantized bundles / fp32 ones
    "c_ntp_tables_fp32": 0.8,
    "c_ntp2_keep": 1.0,               # bundles with loss.head_chunks (planner.md section 000): recomputing: X's
                                      # kept boundary tensors per layer per token, in H floats (set, as c_rc_keep)
    "c_ntp2_scores": 0.69,            # ... recomputing: x L layers' [nh, n, n] attention scores on X (fitted)
    "c_ntp2_pieces": 1.0,             # ... one piece's [n/head_chunks, V] fp32 logits (set)
    "c_ntp2_tables": 1.87,            # ... [V, H] fp32 tables: quantized bundles / fp32 ones (fitted)
    "c_ntp2_tables_fp32": 0.54,       # (fp32: refitted with c_ntp2_saved on 2026-12-05, planner.md 0000000)
    "c_ntp2_rows_fixed": 73 * 2**20,  # ... the head in row pieces (bundles of 2026-12-04 on): a constant instead
                                      # of the whole tables (what c_ntp2_tables held besides them; fitted on 6
                                      # rows, int4/int8 x 128x64..512x256, planner.md section 00000)
    "c_ntp2_scores_sunk": 0.0,        # bundles that keep only the residual per layer (recompute `sunk`, 2026-12-05
    "c_ntp2_rows_fixed_sunk": 102 * 2**20,  # on): c_ntp2_scores and c_ntp2_rows_fixed refitted on 6 rows
                                      # (int4/int8 x 128x64..512x256, planner.md section 000000)
    "c_ntp2_saved": 0.28,             # ... plain (fp32) train step: share of X's saved activations (fitted; was
                                      # 0.44 with 1.04 tables, over by 10-16 % since the arena is given back
                                      # between phases and K/V are no longer copied per head: planner.md 0000000)
    "c_overlap": 0.7,                 # part of a dequantized table's memory the same run's activations reuse
    "c_noarena": 1.0,                 # without the arena: one more dequantized table on the fragmented heap
}

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.I)


def parse_size(text) -> int:
    """'1.5GB' -> 1_500_000_000, '800MB' -> 800_000_000, '1GiB' -> 2**30, '512M' -> 512 MiB, '1000' -> bytes.
    GB/MB/KB are decimal (SI), GiB/MiB/KiB and the one-letter G/M/K are binary."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise AbsorberError(f"memory size must be positive (got {text})")
        return int(text)
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise AbsorberError(f"bad memory size {text!r}: use e.g. 1.5GB, 800MB, 1GiB, 512MiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise AbsorberError(f"memory size must be positive (got {text!r})")
    return value


def format_size(b: float) -> str:
    b = float(b)
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= f:
            return f"{b / f:.2f} {unit}" if unit == "GiB" else f"{b / f:.1f} {unit}"
    return f"{int(b)} B"


# ---------------------------------------------------------------------------------------------------- model facts
@dataclass
class ModelFacts:
    L: int
    H: int
    I: int
    nh: int
    kv: int
    hd: int
    V: int
    S: int
    tied: bool
    adapter_params: int
    scheme: str
    block_size: int
    zero_point: bool
    quantize_lm_head: bool
    quantize_embeddings: bool
    notes: list[str] = field(default_factory=list)


def as_bundle(bundle: Bundle | dict) -> Bundle:
    """The planner reads a manifest only through Bundle: a dict is validated against the schema first."""
    return bundle if isinstance(bundle, Bundle) else Bundle.from_manifest(bundle)


def model_facts(bundle: Bundle | dict) -> ModelFacts:
    """The numbers the planner needs, from a bundle's manifest (docs/bundle.md). An MLP width of 0 (a config
    without intermediate_size) is derived from the adapters' shapes, or assumed 4*hidden, with a note."""
    b = as_bundle(bundle)
    notes: list[str] = []
    L, H, nh, V = b.num_layers, b.hidden, b.num_heads, b.vocab
    tensors = b.slice_tensors
    I = b.intermediate
    if not I:
        for t in tensors:
            name, shape, target = t["name"], t["shape"], t.get("target")
            if target in ("gate_proj", "up_proj") and name.endswith("lora_B"):
                I = shape[1]
                break
            if target == "down_proj" and name.endswith("lora_A"):
                I = shape[0]
                break
    if not I:
        I = 4 * H
        notes.append(f"MLP width not in the manifest: assumed 4*hidden = {I}")
    tied = b.tied_embeddings
    adapter_params = sum(int(np.prod(t.shape)) for t in b.adapters)
    scheme = b.quant_scheme
    # the exporter: int8 per row (no blocks), int4 in blocks of 32; symmetric (no zero point)
    block = b.quant_block_size
    qnames = b.quantized_tensors
    if qnames is not None:            # the exporter lists every quantized tensor
        q_emb = any("embed" in x for x in qnames)
        q_head = any("lm_head" in x for x in qnames)
        if tied:                      # one table under either name
            q_emb = q_head = q_emb or q_head
    else:                             # every 2-D frozen weight, tables included (the exporter's rule)
        q_emb = q_head = scheme != "fp32"
    return ModelFacts(L=L, H=H, I=int(I), nh=nh, kv=b.num_kv_heads, hd=b.head_dim, V=V, S=len(b.loss_layers),
                      tied=tied, adapter_params=adapter_params, scheme=scheme, block_size=block, zero_point=False,
                      quantize_lm_head=q_head, quantize_embeddings=q_emb, notes=notes)


def linear_shapes(f: ModelFacts) -> list[tuple[int, int]]:
    """[rows=out, cols=in] of the linear weights of one decoder layer (Llama layout: q, k, v, o, gate, up, down)."""
    q, kvd = f.nh * f.hd, f.kv * f.hd
    return [(q, f.H), (kvd, f.H), (kvd, f.H), (f.H, q), (f.I, f.H), (f.I, f.H), (f.H, f.I)]


def tensor_bytes(rows: int, cols: int, scheme: str, block: int = 32, zero_point: bool = False) -> float:
    """Bytes of one 2-D weight [rows, cols] as the exporter stores it (absorber/export/quant.py):
    fp32 4 B/param; int8 symmetric per row: 1 B/param + one fp32 scale per row; int4 symmetric in blocks of
    `block` along the columns: 0.5 B/param + one fp32 scale per block (+ a 4-bit zero point when asymmetric)."""
    p = rows * cols
    if scheme == "fp32":
        return p * F32
    if scheme == "int8":
        if block:
            nb = rows * -(-cols // block)
            return p + nb * (F32 + (1 if zero_point else 0))
        return p + rows * (F32 + (1 if zero_point else 0))
    block = block or 32
    nb = rows * -(-cols // block)
    return p / 2 + nb * (F32 + (0.5 if zero_point else 0))


def weight_bytes(f: ModelFacts) -> dict[str, float]:
    """Frozen weights by part, one copy, as stored in the bundle (what ORT holds once loaded)."""
    qs = f.scheme
    layers = f.L * sum(tensor_bytes(r, c, qs, f.block_size, f.zero_point) for r, c in linear_shapes(f))
    norms = (2 * f.L + 1) * f.H * F32
    emb = tensor_bytes(f.V, f.H, qs if f.quantize_embeddings else "fp32", f.block_size, f.zero_point)
    if f.tied:
        head = 0.0          # one table serves both (the exporter quantizes it once when tied)
    else:
        head = tensor_bytes(f.V, f.H, qs if f.quantize_lm_head else "fp32", f.block_size, f.zero_point)
    return {"layers": layers, "embedding": emb, "lm_head": head, "norms": norms}


# ---------------------------------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    n: int
    m: int
    k: int
    terms: dict[str, float]            # bytes, resident at the peak
    detail: dict[str, float]           # sub-terms (bytes), for the term-by-term printout
    peak_bytes: int
    combine: str                       # "sum" (arena on: both sessions keep their high-water mark) or "max"
    notes: list[str]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["peak"] = format_size(self.peak_bytes)
        return d


def kernel_bytes(bundle: Bundle) -> dict[str, float]:
    """Bytes of the stored tensors ONNX Runtime pre-packs (MatMulNBits' inputs, `kernel` in the manifest), per
    graph: each session holds its own pre-packed copy of what it uses."""
    out = {"decoder": 0.0, "train_step": 0.0}
    for t in bundle.stored_tensors:
        if t.kernel:
            for g in t.graphs:
                if g in out:
                    out[g] += t.length
    return out


def backward_dequantized(bundle: Bundle, f: ModelFacts) -> float:
    """fp32 bytes of the largest frozen linear weight: the train step's backward dequantizes each weight it needs
    (dY @ W) per node, one [N, K] fp32 tensor at a time (export/quant.py), never a vocabulary table."""
    if f.scheme == "fp32" or not bundle.kernel_tensors:
        return 0.0
    return float(max(r * c for r, c in linear_shapes(f)) * F32)


def dequantized_tables(bundle: Bundle, f: ModelFacts) -> dict[str, float]:
    """Legacy bundles (quantized before MatMulNBits: no `kernel` tensors): float32 bytes of the quantized
    vocabulary tables (embedding, lm_head) each graph dequantizes in full per run: a DequantizeLinear of a [V, H]
    table is one fp32 [V, H] tensor live during the run. The linear layers' dequantized weights are short-lived
    (one at a time) and stay inside the working-set coefficients. Bundles with kernel tensors: none."""
    table = float(f.V * f.H * F32)
    if f.scheme == "fp32" or bundle.kernel_tensors:
        return {"decoder": 0.0, "train_step": 0.0}
    ts = bundle.stored_tensors
    if ts:
        dec = tr = 0.0
        for t in ts:
            if len(t.shape) == 2 and t.shape[0] == f.V and t.dtype.lower() not in ("float", "float32"):
                dec += table if "decoder" in t.graphs else 0.0
                tr += table if "train_step" in t.graphs else 0.0
        return {"decoder": dec, "train_step": tr}
    # no table: the embedding (decoder) and the lm_head (both graphs; the same tensor when tied)
    dec = (table if f.quantize_embeddings else 0.0) + (table if f.quantize_lm_head and not f.tied else 0.0)
    tr = table if (f.quantize_lm_head if not f.tied else f.quantize_embeddings) else 0.0
    return {"decoder": dec, "train_step": tr}


def head_table_bytes(bundle: Bundle, f: ModelFacts) -> float:
    """fp32 bytes of the head dequantized at once for the next-token term's softmax @ W: the whole [V, H] table,
    or the largest row piece where the exporter dequantizes it in pieces (export/quant.py, ROWS_BYTES: the
    pieces of the view are stored tensors `<view>.rows<a>-<b>`, aliases of the packed bytes)."""
    rows = [t.shape[0] for t in bundle.stored_tensors if is_view_rows(t.name) and len(t.shape) == 2]
    return float((max(rows) if rows else f.V) * f.H * F32)


def _x_pass_bytes(c: dict, f, n: int, recompute: bool, keep: float, saved_share: float) -> float:
    """The student's own pass on X (the next-token term) in the train step: every layer's kept boundary
    tensors (`keep` H floats per token) and one layer's activations when it recomputes, else `saved_share` of
    every layer's saved activations (ONNX Runtime frees part of them before Y's backward)."""
    if recompute:
        return (f.L * keep * n * f.H + c["c_rc_layers"] * (c["c_saved_h"] * n * f.H + c["c_saved_i"] * n * f.I)) * F32
    return saved_share * f.L * (c["c_saved_h"] * n * f.H + c["c_saved_i"] * n * f.I
                                + c["c_saved_scores"] * f.nh * n * n) * F32


def predict(bundle: Bundle | dict, n: int, m: int, k: int = 16, *, arena: bool = True, mem_pattern: bool = False,
            logits_kept: int = 1, weights_file_bytes: int | None = None, coeffs: dict | None = None) -> Prediction:
    """Peak RSS of one absorption round (teacher pass on X.Y, K train steps on Y, the final loss evaluation)
    of the runtime, term by term.

    arena: the sessions' enable_cpu_mem_arena (on: the teacher and train-step phases add up, each session's
    arena keeps its high-water mark; off: the larger phase counts). mem_pattern: enable_mem_pattern (on: from
    the second train step ORT allocates the planned block anew while the arena still holds the first run's
    chunks, one more copy of the train activations). weights_file_bytes: bytes of the stored weights when known
    (the manifest's external-data table, or the file sizes); otherwise counted from the model facts.
    logits_kept: logits rows the teacher pass asks for (the runtime asks for 1)."""
    if n < 0 or m < 1:
        raise AbsorberError(f"window must have n >= 0 and m >= 1 (got n={n}, m={m})")
    c = dict(COEFFS)
    c.update(coeffs or {})
    b = as_bundle(bundle)
    f = model_facts(b)
    notes = list(f.notes)
    T = n + m
    wb = weight_bytes(f)
    w_facts = sum(wb.values())
    table = float(b.stored_bytes)
    if weights_file_bytes:
        w_one = float(weights_file_bytes)
        src = "the bundle's weight files"
    elif table:
        w_one, src = table, "the manifest's external-data table"
    else:
        w_one, src = w_facts, ""
    if src and abs(w_one - w_facts) > 0.02 * w_facts:
        # a second copy of a tied table is the one excess worth naming: only when the excess is about its size
        # (a GGUF carried over has its own block formats, e.g. Q4_1's minimum and a Q8_0 table: a larger excess)
        twice = f.tied and abs(w_one - w_facts - wb["embedding"]) < 0.1 * wb["embedding"]
        notes.append(f"weights from {src}: {format_size(w_one)} (the model facts give {format_size(w_facts)}"
                     + ("; a tied table stored twice?)" if twice else "; the bundle's block formats differ)"
                        if w_one > w_facts else ")"))
    dq = dequantized_tables(b, f)
    kern = kernel_bytes(b)
    k_unique = float(sum(t.length for t in b.stored_tensors if t.kernel and not t.alias_of))
    if k_unique and b.has_combined:
        # one session over both graphs (combined.onnx): each MatMulNBits input loaded and pre-packed once
        w_one = w_one - k_unique + c["kernel_copies_combined"] * k_unique
    elif k_unique:
        # the memory-mapped part once, plus each session's own pre-packed copy of the MatMulNBits inputs it uses
        w_one = w_one - k_unique + c["kernel_copies"] * (kern["decoder"] + kern["train_step"])
    # legacy int4 (block-wise DequantizeLinear, not fused by ORT): part of the linear layers' fp32 copies stay live
    legacy4 = f.scheme == "int4" and not k_unique
    lin_fp32 = f.L * sum(r * cc for r, cc in linear_shapes(f)) * F32 if legacy4 else 0.0
    ad = f.adapter_params * F32
    kv = 2 * f.L * f.kv * f.hd * T * F32
    # the teacher reads X into the KV cache, then Y (runtime.generate.hidden_states_after): the larger pass counts
    big = max(n, m)
    t_hidden = f.S * big * f.H * F32 * c["c_out_copies"]
    t_logits = (T if logits_kept <= 0 else min(logits_kept, T)) * f.V * F32 * c["c_out_copies"]
    t_scores = c["c_scores"] * f.nh * max(n * n, m * T) * F32
    t_tok = c["c_tok"] * big * (f.H + f.I) * F32
    t_dq = c["c_dq"] * dq["decoder"] + c["c_dq_int4_decoder"] * lin_fp32
    s_saved = f.L * (c["c_saved_h"] * m * f.H + c["c_saved_i"] * m * f.I) * F32
    s_scores = f.L * c["c_saved_scores"] * f.nh * m * m * F32
    if b.recompute:
        # per-layer recomputation: the layer-boundary tensors of every layer, one (or so) layer's activations
        s_saved = (f.L * c["c_rc_keep"] * m * f.H
                   + c["c_rc_layers"] * (c["c_saved_h"] * m * f.H + c["c_saved_i"] * m * f.I)) * F32
        s_scores = c["c_rc_layers"] * c["c_saved_scores"] * f.nh * m * m * F32
    s_in = f.S * m * f.H * F32
    # a train step with the next-token term on X (manifest loss.ntp_weight): the student also runs on X alone (n
    # tokens) and through the LM head. Fitted, not derived (benchmarks/planner.md section 00): a recomputing
    # (int8/int4) train step holds `c_ntp_logits_rc` x [n, V] fp32, `c_ntp_scores_rc` x every layer's [nh, n, n]
    # scores and `c_ntp_tables` [V, H] fp32 tables' worth (the head's dequantized weight for dh = dlogits @ W,
    # kernel workspaces, ...) on top of X's kept boundary tensors; a plain (fp32) one `c_ntp_saved` x X's saved
    # activations (ORT frees part of them before Y's backward) and `c_ntp_tables_fp32` tables. Those bundles'
    # ~11 live [n, V] copies and whole X pass were every layer's weight gradients running last in ONNX Runtime's
    # order, and the head's backward (planner.md section 000); bundles with loss.head_chunks take the terms below.
    s_ntp = 0.0
    if b.loss_ntp_weight > 0 and n > 1 and b.loss_head_chunks:
        # bundles whose train step computes the head's gradient in the forward, in pieces of X
        # (absorber.sync.lean_next_token_loss), and (int8/int4) orders each layer's clones after the layer
        # above's weight gradients (export/recompute.py): X's own pass like Y's (boundaries of every layer, one
        # layer's activations), `c_ntp2_pieces` x one piece's [n / head_chunks, V] logits, `c_ntp2_tables` [V, H]
        # fp32 tables (the head dequantized for softmax @ W); a plain (fp32) train step keeps `c_ntp2_saved` x X's
        # saved activations. Fitted in benchmarks/planner.md section 000.
        piece = math.ceil((n - 1) / b.loss_head_chunks) * f.V * F32
        table = head_table_bytes(b, f)        # [V, H], or one row piece of it (bundles of 2026-12-04 on)
        pieces = table < f.V * f.H * F32
        s_ntp = _x_pass_bytes(c, f, n, b.recompute, c["c_ntp2_keep"], c["c_ntp2_saved"])
        sunk = b.recompute_sinks_norms       # only the residual kept per layer: refitted constants
        if b.recompute:
            s_ntp += c["c_ntp2_scores_sunk" if sunk else "c_ntp2_scores"] * f.L * f.nh * n * n * F32
        s_ntp += c["c_ntp2_pieces"] * piece
        quantized = f.scheme != "fp32" and b.kernel_tensors
        s_ntp += (c["c_ntp2_tables"] if quantized else c["c_ntp2_tables_fp32"]) * table
        s_ntp += c["c_ntp2_rows_fixed_sunk" if sunk else "c_ntp2_rows_fixed"] if pieces else 0.0
    elif b.loss_ntp_weight > 0 and n > 1:
        # bundles of 2026-12-03 (fourth session): the head differentiated whole, weight gradients run last
        logits = (n - 1) * f.V * F32
        table = f.V * f.H * F32
        s_ntp = _x_pass_bytes(c, f, n, b.recompute, c["c_rc_keep"], c["c_ntp_saved"])
        if b.recompute:
            s_ntp += c["c_rc_layers"] * c["c_saved_scores"] * f.nh * n * n * F32
            s_ntp += c["c_ntp_logits_rc"] * logits + c["c_ntp_scores_rc"] * f.L * f.nh * n * n * F32
        else:
            s_ntp += c["c_ntp_logits"] * logits
        quantized = f.scheme != "fp32" and b.kernel_tensors
        s_ntp += (c["c_ntp_tables"] if quantized else c["c_ntp_tables_fp32"]) * table
    s_dq = (c["c_dq"] * dq["train_step"] + c["c_dq_int4_train"] * lin_fp32
            + c["c_dq_backward"] * backward_dequantized(b, f))
    s_pattern = (s_saved + s_scores) if (mem_pattern and k >= 2) else 0.0
    # a dequantized table is freed after its op; later activations of the same run reuse part of its memory
    t_ov = c["c_overlap"] * min(t_dq, t_hidden + t_scores + t_tok)
    s_ov = c["c_overlap"] * min(s_dq, s_saved + s_scores)
    teacher = t_hidden + t_logits + t_scores + t_tok + t_dq - t_ov
    train = s_saved + s_scores + s_in + s_dq - s_ov + s_pattern + s_ntp
    combine = "sum" if arena else "max"
    terms = {
        "baseline": float(c["baseline_bytes"] + c["baseline_per_layer"] * f.L),
        "weights": w_one * c["weight_copies"],
        "adapters": ad * c["adapter_copies"],
        "kv_cache": float(kv),
        "teacher": float(teacher),
        "train_step": float(train),
    }
    fixed = terms["baseline"] + terms["weights"] + terms["adapters"]
    detail_slack = 0.0
    if arena:
        peak = fixed + kv + teacher + train
    else:
        # freed buffers go back to malloc, but the heap the train step leaves fragmented does not shrink: the
        # final loss evaluation's dequantized table then lands on top (measured, benchmarks/planner.md)
        slack = c["c_noarena"] * (f.V * f.H * F32 if dq["decoder"] else 0.0)
        teacher += slack
        terms["teacher"] = float(teacher)
        detail_slack = slack
        # int4 without the arena: its per-layer dequantized fp32 weights fragment the heap further (measured)
        slack4 = c["c_noarena_int4"] * lin_fp32
        if slack4:
            terms["heap_slack"] = float(slack4)
        peak = fixed + max(kv + teacher, train) + slack4
    detail = {
        "weights.layers": wb["layers"], "weights.embedding": wb["embedding"], "weights.lm_head": wb["lm_head"],
        "weights.norms": wb["norms"], "weights.stored": w_one,
        "weights.kernel_decoder": kern["decoder"], "weights.kernel_train_step": kern["train_step"],
        "adapters.one_copy": float(ad),
        "teacher.hidden_states": t_hidden, "teacher.logits": t_logits, "teacher.attn_scores": t_scores,
        "teacher.working_set": t_tok, "teacher.dequantized": t_dq, "teacher.malloc_slack": detail_slack,
        "train_step.saved_activations": s_saved, "train_step.saved_attn": s_scores,
        "train_step.teacher_hidden_in": s_in, "train_step.dequantized": s_dq,
        "train_step.mem_pattern_copy": s_pattern, "train_step.next_token_on_x": s_ntp,
        "teacher.reuse_of_dequantized": -t_ov, "train_step.reuse_of_dequantized": -s_ov,
    }
    return Prediction(n=n, m=m, k=k, terms=terms, detail=detail, peak_bytes=int(peak), combine=combine,
                      notes=notes)


# ---------------------------------------------------------------------------------------------------- planning
def plan(bundle: Bundle | dict, budget_bytes: int, k: int = 16, *, ratio: float | None = None, step: int = 16,
         max_m: int | None = None, margin: float = 0.10, **kw) -> Prediction:
    """The largest window (n = ratio * m, m a multiple of `step`) whose predicted peak, plus a safety `margin`
    (10 %: the calibration's largest error is ~7 %), fits budget_bytes. ratio defaults to the manifest defaults'
    n/m (2 when absent); m is capped so that n + m <= max_positions. Keyword arguments go to predict().
    Raises AbsorberError when even the smallest window does not fit (the line says what the floor is)."""
    budget = int(budget_bytes)
    bd = as_bundle(bundle)
    d = bd.defaults()
    r = d.n / d.m if ratio is None else float(ratio)
    if r < 0:
        raise AbsorberError(f"n/m ratio must be >= 0 (got {r})")
    max_pos = bd.max_positions
    cap = max_m or (int(max_pos / (1 + r)) if max_pos else 1 << 16)
    cap = max(step, cap - cap % step)

    def at(mm: int) -> Prediction:
        return predict(bd, int(round(r * mm)), mm, k, **kw)

    def fits(p: Prediction) -> bool:
        return p.peak_bytes * (1 + margin) <= budget

    lo = at(step)
    if not fits(lo):
        floor = lo.terms["baseline"] + lo.terms["weights"] + lo.terms["adapters"]
        raise AbsorberError(f"memory budget {format_size(budget)} is too small: the smallest window "
                            f"(n={lo.n}, m={lo.m}) needs {format_size(lo.peak_bytes)} + {margin:.0%} margin "
                            f"(weights + adapters + runtime alone: {format_size(floor)})"
                            + ("; the next-token term of this bundle's train step costs "
                               f"{format_size(lo.detail['train_step.next_token_on_x'])} of it: a bundle exported "
                               "with --ntp-weight 0 needs less, and keeps less of what was said"
                               if bd.loss_ntp_weight > 0 else ""))
    # the peak grows with m: binary search over multiples of step
    a, b = 1, cap // step
    top = at(b * step)
    if fits(top):
        return top
    while b - a > 1:
        mid = (a + b) // 2
        if fits(at(mid * step)):
            a = mid
        else:
            b = mid
    return at(a * step)


def choose_window(bundle: Bundle | dict, budget_bytes: int, k: int = 16, **kw) -> tuple[int, int]:
    """(n, m) of plan(): the largest window that fits the budget. For `--memory-budget` in run/bench."""
    p = plan(bundle, budget_bytes, k, **kw)
    return p.n, p.m


def load_bundle(bundle: str | os.PathLike) -> Bundle:
    """A bundle folder's (or manifest.json's) manifest, validated, as a Bundle; no other file is read."""
    return read_manifest(bundle)
