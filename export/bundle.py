"""Write a bundle (docs/bundle.md): two ONNX graphs sharing one external weights file, adapters, tokenizer, manifest.

The public entry point is `export_bundle`. Everything is written into a temporary folder next to the target and
renamed into place at the end, so a failure never leaves a half-written bundle behind.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from absorber.attention import use_grouped_attention
from absorber.errors import AbsorberError
from absorber.export import architectures, quant as Q
from absorber.export.combined import BRANCH_OF, combine
from absorber.export.fusions import powers_as_products, rms_norms_as_division, rotary_as_kernel
from absorber.export.lora_packing import pack_lora_paths
from absorber.export.recompute import recompute_layers
from absorber import bundle_format as F
from absorber.bundle_format import ALIGN, MANIFEST, SMALL_ALIGN, WEIGHTS_FILE

DEFAULT_OPSET = 21             # DequantizeLinear with int4 and block_size needs 21
MIN_OPSET = 18


def is_bundle(path: Path) -> bool:
    """A folder that an export wrote (of any format version): safe to replace."""
    return F.is_bundle_folder(path)


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise AbsorberError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not is_bundle(out):
            raise AbsorberError(f"--out {out} exists and is not a bundle (no {MANIFEST}); refusing to overwrite it")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise AbsorberError(f"cannot create --out {out}: {parent} is not a writable folder")


def _versions() -> dict:
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    import absorber
    return {"absorber": absorber.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def _raw(t: onnx.TensorProto):
    if t.raw_data:
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def _externalize(graphs: dict[str, onnx.ModelProto], weight_names: set[str], folder: Path,
                 store: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
                 kernel: set[str] | None = None) -> list[dict]:
    """Move the named initializers of all graphs into ONE weights.bin (one copy per name; the same bytes at
    the same offset for every graph that uses it). Values come from `store` (name -> array) when there, else from
    the initializer itself. aliases: {name: other}: name reinterprets other's bytes (same offset and length, no
    second copy); {name: (other, first byte, bytes)}: a span of them (a row piece, export/quant.py). kernel:
    tensors that ONNX Runtime pre-packs (MatMulNBits' inputs).
    Returns the tensor table of the manifest."""
    aliases = aliases or {}
    kernel = kernel or set()
    spans = {n: (a, 0, None) if isinstance(a, str) else a for n, a in aliases.items()}
    table: dict[str, dict] = {}
    order: list[str] = []
    first: dict[str, onnx.TensorProto] = {}
    for gname, mp in graphs.items():
        for t in mp.graph.initializer:
            if t.name not in weight_names:
                continue
            if t.name in first:
                f0 = first[t.name]
                if list(f0.dims) != list(t.dims) or f0.data_type != t.data_type or \
                        (t.name not in store and _raw(f0) != _raw(t)):
                    raise AbsorberError(f"initializer {t.name} differs between graphs; cannot share it")
                table[t.name]["graphs"].append(gname)
            else:
                first[t.name] = t
                order.append(t.name)
                table[t.name] = {"name": t.name, "dtype": onnx.helper.tensor_dtype_to_string(t.data_type)
                                 .replace("TensorProto.", "").lower(), "shape": [int(d) for d in t.dims],
                                 "graphs": [gname]}
    for n in order:
        if n in kernel:
            table[n]["kernel"] = True
        if n in spans:
            if spans[n][0] not in table or spans[n][0] in spans:
                raise AbsorberError(f"tensor {n} aliases {spans[n][0]}, which no graph uses as stored bytes")
            table[n]["alias_of"] = spans[n][0]
    offset = 0
    with open(folder / WEIGHTS_FILE, "wb") as f:
        for n in order:
            if n in aliases:
                continue
            raw = memoryview(np.ascontiguousarray(store[n])).cast("B") if n in store else _raw(first[n])
            pad = (-offset) % (ALIGN if len(raw) >= ALIGN else SMALL_ALIGN)
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            table[n].update(offset=offset, length=len(raw))
            offset += len(raw)
    for n in order:
        if n in spans:
            other, start, length = spans[n]
            whole = table[other]["length"]
            length = whole if length is None else length
            if start < 0 or start + length > whole:
                raise AbsorberError(f"tensor {n}: bytes {start}..{start + length} lie outside {other}")
            table[n].update(offset=table[other]["offset"] + start, length=length)
    for mp in graphs.values():
        for t in mp.graph.initializer:
            if t.name in table:
                t.ClearField("raw_data")
                for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                    t.ClearField(fld)
                del t.external_data[:]
                t.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(table[t.name]["offset"])),
                             ("length", str(table[t.name]["length"]))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
    return [table[n] for n in order]


def _tokenizer_files(tokenizer, folder: Path) -> dict | None:
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AbsorberError("the tokenizer has no fast backend (tokenizers library); cannot write tokenizer.json")
    (folder / F.TOKENIZER_FILE).write_text(backend.to_str())
    conf = {"tokenizer_class": type(tokenizer).__name__}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = getattr(tokenizer, k, None)
        conf[k] = str(v) if v is not None else None
        tid = getattr(tokenizer, k + "_id", None)
        conf[k + "_id"] = int(tid) if isinstance(tid, int) else None
    mml = getattr(tokenizer, "model_max_length", None)
    conf["model_max_length"] = int(mml) if isinstance(mml, int) and mml < 1 << 40 else None
    conf["chat_template"] = getattr(tokenizer, "chat_template", None) if isinstance(
        getattr(tokenizer, "chat_template", None), str) else None
    (folder / F.TOKENIZER_CONFIG_FILE).write_text(json.dumps(conf, indent=2))
    return {"file": F.TOKENIZER_FILE, "config": F.TOKENIZER_CONFIG_FILE}


def bos_id(tokenizer, facts: dict) -> int | None:
    """The BOS token id (cfg.bos): the tokenizer's, as the reference takes it (absorber.stream), else the model
    config's; None when neither has one."""
    tid = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if tid is None:
        tid = facts.get("bos_token_id")
        tid = tid[0] if isinstance(tid, list) and tid else tid
    return int(tid) if isinstance(tid, int) else None


def _io_shapes_ok(mp: onnx.ModelProto) -> None:
    for v in list(mp.graph.input) + list(mp.graph.output):
        if not v.type.tensor_type.HasField("elem_type"):
            raise AbsorberError(f"graph value {v.name} has no type")


@dataclasses.dataclass
class Traced:
    """Both graphs of a model in float32, before quantization and external data (reusable for several bundles)."""
    train: onnx.ModelProto
    decoder: onnx.ModelProto
    facts: dict
    layers: list[int]
    cfg: object
    slice: dict
    adapters: dict[str, np.ndarray]
    weight_names: set[str]
    store: dict[str, np.ndarray]      # frozen weights: views of the model's own tensors (one copy in memory)
    opset: int
    max_len: int
    seconds: dict
    head: tuple[str, ...] = ()        # the lm_head weight's names (tied: every alias of the one tensor)
    head_pieces: bool = True          # the next-token term's head gradient in pieces (absorber.sync.head_in_pieces)


def head_tensors(head: tuple[str, ...]) -> set[str]:
    """The lm_head's tensor names in a train step, float or quantized (recompute keeps their products)."""
    return set(head) | {v for n in head for b in Q.BITS.values() for v in F.quant_names(n, b).values()}


def _check_args(quant: str, opset: int) -> None:
    if quant not in Q.SCHEMES:
        raise AbsorberError(f"unknown quantization {quant!r} (choose from {', '.join(Q.SCHEMES)})")
    if opset < MIN_OPSET or (quant != "fp32" and opset < 21):
        raise AbsorberError(f"opset {opset} is too old (need >= {MIN_OPSET}, and >= 21 for int8/int4)")


def _strip_weights(mp: onnx.ModelProto, params: dict, store: dict) -> None:
    """The graphs carry their own copy of every weight; keep ONE: views of the model's tensors (checked equal)."""
    for t in mp.graph.initializer:
        if t.name not in params:
            continue
        arr = params[t.name].detach().numpy()
        if t.name not in store:
            if arr.dtype != np.float32 or list(arr.shape) != list(t.dims) or \
                    not np.array_equal(numpy_helper.to_array(t), arr):
                raise AbsorberError(f"exported initializer {t.name} does not equal the model's parameter")
            store[t.name] = arr
        t.ClearField("raw_data")
        t.ClearField("float_data")


def trace(model, lora_cfg=None, cfg=None, opset: int = DEFAULT_OPSET, max_len: int | None = None,
          progress=None) -> Traced:
    """Export both graphs of `model` to ONNX protos in memory. The model is left as it was."""
    import torch

    from absorber import lora as lora_mod, sync
    from absorber.config import AbsorberConfig
    from absorber.export import graphs

    say = progress or (lambda msg: None)
    cfg = cfg if cfg is not None else AbsorberConfig()
    if lora_cfg is not None:        # a convenience of the Python API: the slice given on its own
        cfg = dataclasses.replace(cfg, lora=lora_cfg)
    lora_cfg = cfg.lora
    cfg.validate()
    ref_only = [k for k in ("kl_weight", "anchor", "anchor_kl") if getattr(cfg, k)]
    if ref_only:       # loss terms of the PyTorch reference that the traced train step does not carry
        raise AbsorberError(f"{ref_only[0]} > 0 is not supported by the exported train step (sync loss on Y and "
                            "the next-token term on X only; it is a reference option)")
    if cfg.prefix:
        raise AbsorberError("prefix is not supported by the exporter (the stream's first tokens as a fixed prefix; "
                            "a reference option; bos is exported)")
    if cfg.bos and cfg.teacher == "compose":
        raise AbsorberError("bos with teacher='compose' is not supported (the compositional teacher takes no prefix)")
    if cfg.calibrate > 0:
        raise AbsorberError(f"calibrate={cfg.calibrate} is not supported by the exporter (it raises the damage it "
                            "was meant to remove: benchmarks/retention.md; a reference option)")
    if cfg.ntp_weight > 0 and cfg.ntp_context > 0:
        raise AbsorberError(f"ntp_context={cfg.ntp_context} is not supported by the exported train step (X is "
                            "scored alone; ntp_context is a reference option)")
    if cfg.replay > 0 and cfg.replay_steps == 0:
        raise AbsorberError(f"replay={cfg.replay} with replay_steps 0 (the term added to every step) is not "
                            "supported by the exported train step: set replay_steps > 0 (steps of their own)")
    if cfg.cloze > 0:
        raise AbsorberError(f"cloze={cfg.cloze} is not supported by the exporter (X's sentences asked back as "
                            "questions in the next-token term; a reference option: benchmarks/retention.md)")
    if cfg.ntp_weight > 0 and cfg.ntp_top < 1:
        raise AbsorberError(f"ntp_top={cfg.ntp_top} is not supported by the exported train step (it scores every "
                            "token of X; ntp_top < 1 is a reference option)")
    if lora_cfg.sparse > 0:
        raise AbsorberError("LoRA sparse > 0 (trained MLP values) is not supported by the exporter: its slice "
                            "is LoRA A/B pairs; sparse is a reference option")
    if lora_cfg.prefix_kv > 0:
        raise AbsorberError("LoRA prefix_kv > 0 (a trained KV prefix) is not supported by the exporter: its slice "
                            "is LoRA A/B pairs; prefix_kv is a reference option")
    if lora_cfg.protect > 0:
        raise AbsorberError("LoRA protect > 0 (a protected input subspace per layer) is not supported by the "
                            "exporter; it is a reference option")
    arch = architectures.lookup(model.config)
    architectures.check_targets(arch, lora_cfg.targets)
    facts = arch.facts(model.config)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise AbsorberError("the exporter needs a float32 model (load it with dtype='float32')")
    layers = sync.loss_layers(model, cfg.loss_layers)
    max_len = int(max_len or facts["max_positions"])

    # ---- the slice: inject (and undo afterwards) or use the model's own adapters
    injected: list[str] = []
    existing = lora_mod.adapters(model)
    if existing:
        first = next(iter(existing))
        r = existing[first].shape[1] if first.endswith("lora_A") else existing[first].shape[0]
        if r != lora_cfg.rank:
            raise AbsorberError(f"the model's adapters have rank {r} but lora_cfg.rank is {lora_cfg.rank}")
    else:
        before = {n for n, _ in model.named_modules()}
        lora_mod.inject(model, lora_cfg)
        injected = [n for n, m in model.named_modules() if isinstance(m, lora_mod.LoraLinear) and n in before]
    grad_state = {n: p.requires_grad for n, p in model.named_parameters()}
    attn = getattr(model.config, "_attn_implementation", None)
    try:
        model.eval()
        use_grouped_attention(model)   # no per-head copy of the KV cache in the graphs (absorber/attention.py)
        adapters = lora_mod.adapters(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n in adapters)
        names = list(adapters)
        frozen = {n for n, _ in model.named_parameters(remove_duplicate=False) if n not in adapters}
        params = {n: p for n, p in model.named_parameters(remove_duplicate=False) if n in frozen}
        store: dict[str, np.ndarray] = {}
        lm_head = "lm_head.weight"
        if facts["tie_word_embeddings"] or lm_head not in dict(model.named_parameters()):
            emb = model.get_input_embeddings().weight
            lm_head = next(n for n, p in model.named_parameters() if p is emb)
        head_param = dict(model.named_parameters(remove_duplicate=False))[lm_head]
        head = tuple(n for n, p in model.named_parameters(remove_duplicate=False) if p is head_param)
        head_pieces = sync.head_in_pieces(model)
        slice_desc = {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "scaling": lora_cfg.scaling,
                      "targets": list(lora_cfg.targets),
                      "layers": list(lora_cfg.layers) if lora_cfg.layers is not None else None,
                      "seed": lora_cfg.seed, "tensors": lora_mod.describe(model, lora_cfg)}
        init_adapters = {n: p.detach().float().numpy().copy() for n, p in adapters.items()}
        t0 = time.perf_counter()
        say("exporting train_step.onnx (forward + backward)")
        train = graphs.export_train_step(model, cfg, layers, names, frozen, opset, max_len)
        t_train = time.perf_counter() - t0
        _strip_weights(train, params, store)
        say(f"  {t_train:.1f} s")
        t0 = time.perf_counter()
        say("exporting decoder.onnx (KV cache, hidden states)")
        dec = graphs.export_decoder(model, layers, names, frozen, opset, max_len, facts, lm_head)
        t_dec = time.perf_counter() - t0
        _strip_weights(dec, params, store)
        say(f"  {t_dec:.1f} s")
    finally:
        for n, p in model.named_parameters():
            if n in grad_state:
                p.requires_grad_(grad_state[n])
        if attn is not None:
            model.config._attn_implementation = attn
        for name in injected:   # undo our injection: put the original linear layers back
            parent, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), leaf, model.get_submodule(name).base)
    for mp in (train, dec):
        _io_shapes_ok(mp)
        for o in mp.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < opset:
                o.version = opset
    weight_names = set(store)
    return Traced(train, dec, facts, layers, cfg, slice_desc, init_adapters, weight_names, store, opset, max_len,
                  {"train_step": round(t_train, 2), "decoder": round(t_dec, 2)}, head, head_pieces)


def write(traced: Traced, tokenizer, out_dir, quant: str = "fp32", progress=None,
          source: dict | None = None, accuracy: dict | None = None, recompute: bool | None = None) -> Path:
    """Quantize (optionally) and write a traced model as a bundle folder; atomic (temp folder + rename).

    source: {parameter name: QWeight} carried over from the model's file (absorber.export.gguf_source), used
    as they are where their bits fit the scheme (int4 takes 4- and 8-bit blocks, int8 only 8-bit ones); every
    other weight is requantized. accuracy: MatMulNBits accuracy_level per graph (default quant.ACCURACY).
    recompute: the train step recomputes each layer's forward in its backward instead of keeping the
    activations (export/recompute.py: the same gradients, ~12 % slower rounds, ~30 % less peak memory on
    SmolLM2-135M at n=512, m=256). None (auto): on for int8/int4, the bundles chosen for memory; off for fp32."""
    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    _check_args(quant, traced.opset)
    out = Path(os.path.abspath(out_dir))
    _check_out(out)
    train, dec = onnx.ModelProto(), onnx.ModelProto()
    train.CopyFrom(traced.train)
    dec.CopyFrom(traced.decoder)
    # decoder only (export/fusions.py): each RMS norm as x / sqrt(.), which ONNX Runtime fuses into one node at
    # load; each rotary embedding as one RotaryEmbedding node over tables of cos / sin by position
    norms = rms_norms_as_division(dec.graph)
    rotary = rotary_as_kernel(dec.graph, int(traced.facts["max_positions"]), F.POSITION_IDS)
    if rotary and not any(o.domain == "com.microsoft" for o in dec.opset_import):
        dec.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    weight_names = set(traced.weight_names)
    store = dict(traced.store)
    qweights: dict[str, Q.QWeight] = {}
    counts: dict[str, int] = {}
    accuracy = dict(accuracy or Q.ACCURACY)
    aliases: dict[str, str | tuple[str, int, int]] = {}
    row_aliases: dict[str, tuple[str, int, int]] = {}
    kernel: set[str] = set()
    fused: dict[str, Q.Fused] = {}
    packed: dict[str, dict] = {}
    if quant != "fp32":
        say(f"quantizing frozen weights ({quant})")
        seen = {}
        for mp in (train, dec):
            for t in mp.graph.initializer:
                if t.name in weight_names and Q.quantizable(t) and t.name not in seen:
                    seen[t.name] = t
        src = source or {}
        for n in seen:
            # the source is keyed by the model's own names; traced names of wrapped layers have ".base."
            qw = src.get(n, src.get(n.replace(".base.weight", ".weight")))
            if qw is not None:
                qw = dataclasses.replace(qw, name=n)
            if qw is not None and (quant == "int4" or qw.bits == Q.BITS[quant]):
                qweights[n] = qw
            else:
                qweights[n] = Q.quantize(n, traced.store[n], quant)
        # linear layers that read one input run as one MatMulNBits over their stacked weights (export/quant.py
        # Fused): the groups the decoder has, applied wherever a graph feeds a whole group one input
        fused = {f.qw.name: f for f in (Q.fuse(g, qweights) for g in Q.linear_groups(dec.graph, qweights))}
        for gname, mp in (("train_step", train), ("decoder", dec)):
            res = Q.apply(mp.graph, qweights, accuracy[gname], fused=fused)
            store.update(res["stored"])
            row_aliases.update(res["row_aliases"])
            for k, v in res["counts"].items():
                counts[f"{gname}.{k}"] = v
        # the decoder's LoRA paths of each stack as two products over packed adapter inputs (export/lora_packing.py)
        packed = pack_lora_paths(dec.graph, {n: tuple(a.shape) for n, a in traced.adapters.items()})
        weight_names = (weight_names - set(qweights)) | (set(store) - set(traced.store))
        aliases = {v: q for v, q in Q.aliases(qweights).items() if v in weight_names}
        aliases.update({v: a for v, a in row_aliases.items() if v in weight_names})
        # a fused member's tensors feed only DequantizeLinear (the backward), unless some graph still runs it alone
        members = {m for f in fused.values() for m in f.members}
        alone = {i for mp in (train, dec) for nd in mp.graph.node if nd.op_type == "MatMulNBits"
                 for i in nd.input[1:]}
        kernel = (Q.kernel_tensors({**{n: q for n, q in qweights.items() if n not in members},
                                    **{n: f.qw for n, f in fused.items()}}) | alone) & weight_names
    recomputed = None
    if recompute is None:
        recompute = quant != "fp32"
    if recompute:
        say("train step: recomputing activations per layer")
        head = head_tensors(traced.head)
        head |= {v for v, (parent, _, _) in row_aliases.items() if parent in head}
        recomputed = recompute_layers(train, head,
                                      order_after_grads=getattr(traced.cfg, "ntp_weight", 0) > 0)
        # the recomputing train step is written without its intermediate value_info: ONNX Runtime infers the
        # shapes itself, and with the exporter's (symbolic) ones the round peaks higher. Measured, one bundle after
        # the other (benchmarks/planner.md section 00000000): SmolLM2-135M int4 / int8 at 512x256 1061 -> 939 /
        # 1126 -> 1005 MiB, Gemma-3-270M int4 1668 -> 1624, ~25 MB less resident after opening, the same speed; not
        # for the plain fp32 train step (1940 -> 1968 MiB). Why: ORT's allocation planner hands a freed buffer to a
        # later tensor of the same shape, which keeps it allocated in between (with the shapes kept and
        # `enable_mem_reuse` off, the same round peaks at 959 MiB); where the recomputed layers free everything
        # between stages that pinning costs more than it saves. Without the shapes ORT also no longer fuses
        # MatMul+Add into Gemm, which moves the losses by float rounding.
        del train.graph.value_info[:]
    # the train step's small integer powers as products (export/fusions.py: ORT's Pow is std::pow per element)
    powers_as_products(train.graph)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        say(f"writing {WEIGHTS_FILE}")
        table = _externalize({"decoder": dec, "train_step": train}, weight_names, tmp, store, aliases, kernel)
        graph_files = F.GRAPH_FILES
        graphs_desc = {}
        from absorber.export import graphs
        for gname, mp in (("decoder", dec), ("train_step", train)):
            mp.producer_name = "absorber.export"
            onnx.save(mp, tmp / graph_files[gname])
            graphs_desc[gname] = {"file": graph_files[gname], **graphs.io_description(mp.graph),
                                  "opset": max(o.version for o in mp.opset_import if o.domain in ("", "ai.onnx")),
                                  "ir_version": int(mp.ir_version)}
        graphs_desc["decoder"]["norms_for_ort_fusion"] = norms
        graphs_desc["decoder"]["rotary_kernels"] = rotary
        if packed:
            graphs_desc["decoder"]["packed_adapters"] = packed
        if recomputed is not None:
            graphs_desc["train_step"]["recompute"] = recomputed
        if kernel:
            # integer kernels: one session over both graphs pre-packs their weights once (export/combined.py)
            comb, renamed = combine(dec, train, {t["name"] for t in table}, set(traced.adapters))
            onnx.save(comb, tmp / F.COMBINED_FILE)
            graphs_desc[F.COMBINED] = {"file": F.COMBINED_FILE, "selector": F.COMBINED_SELECTOR,
                                       "branches": dict(BRANCH_OF), "renamed": {"train_step": renamed},
                                       "opset": graphs_desc["decoder"]["opset"], "ir_version": int(comb.ir_version)}
            del comb
        from safetensors.numpy import save_file
        save_file(traced.adapters, str(tmp / F.ADAPTERS_FILE))
        tok = _tokenizer_files(tokenizer, tmp)
        manifest = {
            "format": F.FORMAT,
            "model": traced.facts,
            "slice": traced.slice,
            "adapters_file": F.ADAPTERS_FILE,
            "loss": F.loss_entry(traced.cfg, traced.layers, F.HEAD_CHUNKS if traced.head_pieces else 0,
                                 bos_id(tokenizer, traced.facts)),
            "quant": Q.describe(quant, qweights, counts, accuracy, fused),
            "session_config": dict(Q.SESSION_CONFIG),
            "defaults": F.defaults_entry(traced.cfg),
            "graphs": graphs_desc,
            "external_data": [{"file": WEIGHTS_FILE, "align": ALIGN, "tensors": table}],
            "shared_initializers": [t["name"] for t in table if len(t["graphs"]) > 1],
            "tokenizer": tok,
            "max_len": traced.max_len,
            "exporter": {**_versions(), "opset": traced.opset, "seconds": dict(traced.seconds)},
        }
        manifest["files"] = {p.name: F.sha256_file(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
        manifest["exporter"]["seconds"]["write"] = round(time.perf_counter() - t_start, 2)
        manifest = json.loads(json.dumps(manifest, default=_json_default))
        F.validate_manifest(manifest, "exported manifest")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            try:
                os.rename(out, trash / "old")
            except BaseException:
                os.rmdir(trash)
                raise
            try:
                os.rename(tmp, out)
            except BaseException:        # put the previous bundle back: a failed export leaves it as it was
                os.rename(trash / "old", out)
                os.rmdir(trash)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
        tmp = None
        say(f"bundle written to {out}")
        return out
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def export_bundle(model, tokenizer, out_dir, quant: str = "fp32", lora_cfg=None, cfg=None,
                  opset: int = DEFAULT_OPSET, max_len: int | None = None, progress=None,
                  source: dict | None = None, accuracy: dict | None = None,
                  recompute: bool | None = None) -> Path:
    """Export a float32 transformers causal LM (+ tokenizer) as a bundle folder; returns its path.

    model: a transformers CausalLM in float32, eval mode (e.g. `absorber.models.load(...)[0]` or `tiny_llama()`).
        If it has no LoRA adapters, they are injected per `lora_cfg` for the export and removed again afterwards
        (the model is left as it was); if it already has adapters, their current values become the bundle's initial
        adapters and `lora_cfg` must describe them (rank).
    tokenizer: a transformers fast tokenizer, or None (no tokenizer files).
    quant: fp32 | int8 | int4 (frozen base weights; adapters are always float32).
    lora_cfg: absorber.config.LoraConfig (default: cfg.lora). cfg: AbsorberConfig recorded as the bundle defaults
        (its loss kind and loss_layers are compiled into train_step.onnx).
    recompute: per-layer activation recomputation in the train step (see `write`; None: int8/int4 only).
    """
    return export_bundles(model, tokenizer, {quant: out_dir}, lora_cfg=lora_cfg, cfg=cfg, opset=opset,
                          max_len=max_len, progress=progress, source=source, accuracy=accuracy,
                          recompute=recompute)[quant]


def export_bundles(model, tokenizer, outs: dict, lora_cfg=None, cfg=None, opset: int = DEFAULT_OPSET,
                   max_len: int | None = None, progress=None, source: dict | None = None,
                   accuracy: dict | None = None, recompute: bool | None = None) -> dict[str, Path]:
    """Trace once, write one bundle per quantization scheme: outs = {"fp32": dir, "int8": dir, ...}."""
    for q, d in outs.items():
        _check_args(q, opset)
        _check_out(Path(os.path.abspath(d)))
    if cfg is not None and cfg.bos and bos_id(tokenizer, architectures.lookup(model.config).facts(model.config)) is None:
        raise AbsorberError("bos=True needs a tokenizer (or model config) with a BOS token")
    traced = trace(model, lora_cfg=lora_cfg, cfg=cfg, opset=opset, max_len=max_len, progress=progress)
    return {q: write(traced, tokenizer, d, q, progress=progress, source=source, accuracy=accuracy,
                     recompute=recompute) for q, d in outs.items()}


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
