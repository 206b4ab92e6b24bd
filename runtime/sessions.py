"""The two ONNX Runtime sessions of a bundle over ONE memory map of its frozen weights.

Both graphs (decoder.onnx, train_step.onnx) name the same frozen tensors in weights.bin. Left alone, each
InferenceSession would load its own copy. Instead the file is mapped once, read-only, every tensor numpy can view
becomes one OrtValue over the map, and both sessions get those OrtValues through `SessionOptions.add_initializer`:
the stored weights are resident once, shared by the sessions and by every Stream of a Model. int4 / bfloat16
tensors (no numpy view) are left to ONNX Runtime. The inputs of the integer kernels (MatMulNBits,
`Bundle.kernel_tensors`) are shared the same way and ONNX Runtime still pre-packs them into its kernel layout
(without pre-packing the kernel dequantizes its whole matrix on every call); the backward's dequantizations read
the same stored bytes through the map, so nothing is mapped twice. Pre-packing reads every kernel tensor once at
open; those pages are then dropped from the process (`_drop_pages`) until the train step reads them.
With the CPU arena on, both sessions allocate their activations from one process-wide arena (`_use_shared_arena`).
A bundle with integer kernels also holds both graphs in one model (`combined.onnx`, export/combined.py: the
decoder as the main graph, the train step inside an If): then ONE session serves both, so those pre-packed weights
are resident once, not once per graph; `Branch` presents each graph of it as a session of its own.
"""
from __future__ import annotations

import contextlib
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from absorber import bundle_format as F
from absorber.bundle_format import Bundle
from absorber.devices import get_profile, session_kwargs
from absorber.errors import AbsorberError
from absorber.runtime.bundle import check_session_io
from absorber.runtime.protoscan import node_int_attributes

NP_OF = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8, "int32": np.int32,
         "int64": np.int64, "float64": np.float64, "int16": np.int16, "uint16": np.uint16}


@contextlib.contextmanager
def ort_errors(what: str):
    """ONNX Runtime failures at run time (out of memory, a bad graph) -> one AbsorberError line."""
    try:
        yield
    except AbsorberError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT's exception classes do not share a public base
        if type(e).__module__.startswith("onnxruntime") or isinstance(e, MemoryError) or (
                isinstance(e, RuntimeError) and ("onnxruntime" in str(e) or "Error in execution" in str(e))):
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AbsorberError(f"ONNX Runtime failed during {what}: {msg[:300]}") from None
        raise


def resolve_profile(profile):
    """A device profile given by name (or JSON path) -> Profile; a Profile or None is returned as it is."""
    return get_profile(profile) if isinstance(profile, str) else profile


ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(bool)": np.bool_, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
             "tensor(int8)": np.int8}


class _Input:
    """A combined session's input under the name its own graph gives it (Branch.get_inputs)."""

    def __init__(self, name: str, arg):
        self.name, self.type, self.shape = name, arg.type, arg.shape


class _Binding:
    """An IOBinding of a combined session that takes the graph's own input names (Branch.io_binding)."""

    def __init__(self, io: ort.IOBinding, renamed: dict[str, str]):
        self._io, self._renamed = io, renamed

    def bind_cpu_input(self, name, arr):
        return self._io.bind_cpu_input(self._renamed.get(name, name), arr)

    def bind_ortvalue_input(self, name, ov):
        return self._io.bind_ortvalue_input(self._renamed.get(name, name), ov)

    def bind_input(self, name, *a, **k):
        return self._io.bind_input(self._renamed.get(name, name), *a, **k)

    def __getattr__(self, name):
        return getattr(self._io, name)


class Branch:
    """One graph of a combined bundle (export/combined.py) presented as a session of its own: every call also
    gets the selector and an empty placeholder for each input of the other graph (made once), inputs go by the
    graph's own names (the manifest's `renamed` maps them), and only this graph's inputs and outputs are listed.
    Anything else is the shared InferenceSession's. In the layout with the decoder as the main graph, a
    train-step call also runs the decoder on those placeholders: 0 tokens, 0 cached (~2 ms)."""

    def __init__(self, session: ort.InferenceSession, bundle: Bundle, graph: str):
        self._session = session
        self.graph = graph
        self._renamed = bundle.combined_renamed(graph)
        own_in = [i["name"] for i in bundle.graph_io(graph, "inputs")]
        own_out = [o["name"] for o in bundle.graph_io(graph, "outputs")]
        ins = {i.name: i for i in session.get_inputs()}
        outs = {o.name: o for o in session.get_outputs()}
        mine = {self._renamed.get(n, n): n for n in own_in}
        self._inputs = [_Input(n, ins[c]) for c, n in mine.items() if c in ins]
        self._outputs = [outs[n] for n in own_out if n in outs]
        sel = bundle.combined_selector
        # the selector is True for the If's then_branch (the train step; the earlier layout: the decoder)
        self._feeds: dict[str, np.ndarray] = {sel: np.asarray(bundle.combined_branch(graph) == "then_branch")}
        shapes = {}
        for n, i in ins.items():
            if n == sel or n in mine:
                continue
            if i.type not in ORT_TYPES:
                raise AbsorberError(f"bundle {bundle.path}: combined graph input {n!r} has type {i.type}")
            shapes[n] = ([d if isinstance(d, int) else 0 for d in (i.shape or [])], ORT_TYPES[i.type])
        # the other graph's static inputs (the train step's adapters, the decoder's packed ones: MBs) are views of
        # ONE zero buffer, which nothing writes or reads through (the other graph does not run): never resident
        sizes = [int(np.prod(sh)) for sh, t in shapes.values() if t == np.float32]
        zero = np.zeros(max(sizes, default=0), np.float32)
        zero.flags.writeable = False
        for n, (sh, t) in shapes.items():
            self._feeds[n] = zero[:int(np.prod(sh))].reshape(sh) if t == np.float32 else np.zeros(sh, t)
        self._values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self._feeds.items()}

    def __getattr__(self, name):
        return getattr(self._session, name)

    def get_inputs(self):
        return list(self._inputs)

    def get_outputs(self):
        return list(self._outputs)

    def run(self, output_names, input_feed, run_options=None):
        names = output_names or [o.name for o in self._outputs]
        if self._renamed:      # only the train step of the current layout has renamed inputs
            input_feed = {self._renamed.get(n, n): v for n, v in input_feed.items()}
        return self._session.run(names, {**self._feeds, **input_feed}, run_options)

    def io_binding(self):
        io = self._session.io_binding()
        for n, ov in self._values.items():
            io.bind_ortvalue_input(n, ov)
        return _Binding(io, self._renamed) if self._renamed else io

    def run_with_iobinding(self, iobinding, run_options=None):
        io = iobinding._io if isinstance(iobinding, _Binding) else iobinding
        return self._session.run_with_iobinding(io, run_options)


@dataclass
class Sessions:
    """decoder + train_step sessions of one bundle, sharing one read-only map of the weights (or the two
    branches of one combined session: `combined`)."""
    decoder: ort.InferenceSession | Branch
    train_step: ort.InferenceSession | Branch
    providers: list[str]
    maps: list[FileMap] = field(default_factory=list)
    shared: dict[str, ort.OrtValue] = field(default_factory=dict)
    combined: ort.InferenceSession | None = None

    def close(self) -> None:
        self.decoder = self.train_step = self.combined = None
        self.shared.clear()
        self.maps.clear()


@dataclass
class FileMap:
    """One read-only map of a bundle's external data file: `data` is a uint8 array over the whole of it."""
    name: str
    map: mmap.mmap
    data: np.ndarray

    @classmethod
    def open(cls, path: Path) -> "FileMap":
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return cls(path.name, mm, np.frombuffer(mm, dtype=np.uint8))

    def drop_pages(self) -> None:
        """Take the map's pages out of this process's resident set (Linux MADV_DONTNEED on a read-only file map:
        nothing is lost, the next read pages them in again from the page cache). A no-op where the platform has
        no madvise."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is not None and hasattr(self.map, "madvise"):
            self.map.madvise(advice)


def _drop_pages(maps: list[FileMap]) -> None:
    """After the sessions are open: ONNX Runtime's pre-packing has read every kernel tensor through the map, and
    from then on the decoder reads its packed copy, so those pages would stay resident for nothing until the train
    step's backward reads the stored bytes (SmolLM2-135M int4: 102 MB of the map resident after open without this,
    none with it; benchmarks/planner.md section 0000000000)."""
    for m in maps:
        m.drop_pages()


def _shared_initializers(bundle: Bundle, graph: str, maps: list[FileMap],
                         shared: dict[str, ort.OrtValue]) -> dict[str, ort.OrtValue]:
    """OrtValues over ONE read-only memory map per external file, the same objects for both sessions."""
    out = {}
    for t in bundle.graph_info[graph].external:
        dt = NP_OF.get(t.dtype)
        if dt is None:     # int4/bfloat16...: numpy cannot view them; ORT loads (and maps) those itself
            continue
        # MatMulNBits' inputs too: ONNX Runtime pre-packs an added initializer as it does one it loaded. Left to
        # it, it kept its own maps of them beside this one (the backward reads the same bytes here): SmolLM2-135M
        # int4 at n=512 m=256, peak RSS 958 -> 910 MiB with the same losses, mostly file pages RSS counted twice
        # (PSS -5 MiB); after open -52 MiB in RSS and PSS (benchmarks/planner.md section 0000000000)
        key = f"{t.location}:{t.offset}:{t.name}"
        if key not in shared:
            fm = next((m for m in maps if m.name == t.location), None)
            if fm is None:
                fm = FileMap.open(bundle.path / t.location)
                maps.append(fm)
            count = int(np.prod(t.dims)) if t.dims else 1
            arr = np.frombuffer(fm.data, dtype=dt, count=count, offset=t.offset).reshape(t.dims)
            shared[key] = ort.OrtValue.ortvalue_from_numpy(arr)
        out[t.name] = shared[key]
    return out


_ENV_ARENA: list[bool] = []


def _use_shared_arena(so, device: str) -> None:
    """Both sessions (and every Model of the process) allocate from ONE CPU arena instead of one each.

    Each session's own arena keeps its high-water mark for good, so a round's peak was the teacher's arena PLUS
    the train step's; from one arena the train step reuses what the teacher pass freed (SmolLM2-135M int4,
    n=512 m=256: benchmarks/planner.md section 0). It grows by what is asked (kSameAsRequested), not to the next
    power of two. The allocator is registered once per process with onnxruntime's environment."""
    if device != "cpu" or not so.enable_cpu_mem_arena:
        return
    if not _ENV_ARENA:
        mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # OrtArenaCfg(max_mem=0: no cap, arena_extend_strategy=1: kSameAsRequested, -1: defaults)
        ort.create_and_register_allocator(mem, ort.OrtArenaCfg(0, 1, -1, -1))
        _ENV_ARENA.append(True)
    so.add_session_config_entry("session.use_env_allocators", "1")


_MMAP_THRESHOLD = 1 << 20
_MMAP_FIXED: list[bool] = []


def _fixed_mmap_threshold() -> None:
    """glibc: blocks of 1 MiB and more come from mmap and go back to the system when freed. By default glibc
    raises that threshold to the size of each mmap'd block freed (up to 32 MiB), so once the arena gives regions
    back, the next ones come from the heap, which cannot shrink past a live block (measured: +32 MB of RSS per
    stream over 20 rounds, tests/test_runtime.py::test_ten_megabyte_line_is_absorbed_whole). Setting it fixes
    it. Process-wide, once; nothing on other C libraries. ctypes, not a package: no maintained Python binding
    of mallopt exists, and this is one call."""
    if _MMAP_FIXED:
        return
    _MMAP_FIXED.append(True)
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(_MMAP_THRESHOLD))     # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):     # no glibc (macOS: no mallopt; Windows: no CDLL(None))
        pass


def shrink_options(profile, device: str) -> ort.RunOptions | None:
    """RunOptions that release the CPU arena's free regions when the run ends (None without an arena).

    The absorption round's decoder passes (the teacher, the final loss evaluation) and its last train step run
    with them: the arena then gives back what each phase freed before the next one allocates, instead of keeping
    every phase's high-water mark and the holes between them (SmolLM2-135M int4, n=512, m=256: benchmarks/
    planner.md section 00000). The train step's first K-1 runs keep their arena (releasing it every step would
    page it in again K times); answering keeps it too (one run per token)."""
    if device != "cpu" or not getattr(profile, "enable_cpu_mem_arena", True):
        return None
    _fixed_mmap_threshold()
    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


def _session(bundle: Bundle, graph: str, profile, device: str, share: bool, maps, shared):
    extra = bundle.session_config
    inits = _shared_initializers(bundle, graph, maps, shared) if share else {}
    if inits and not bundle.kernel_tensors:
        # pre-packing would copy every shared weight into each session's own layout. A bundle with integer
        # kernels needs it: MatMulNBits without pre-packing dequantizes its whole matrix on every call
        extra["session.disable_prepacking"] = "1"
    kw = session_kwargs(profile, device, extra)
    so = kw["sess_options"]
    so.log_severity_level = max(so.log_severity_level, 3)   # no warnings about unused initializers
    _use_shared_arena(so, device)
    for name, ov in inits.items():
        so.add_initializer(name, ov)
    model = _with_accuracy(bundle, graph, profile, so)
    try:
        sess = ort.InferenceSession(model, **kw)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AbsorberError(f"bundle {bundle.path}: ONNX Runtime cannot load {graph}: {msg[:300]}") from None
    if graph != F.COMBINED:
        check_session_io(bundle, graph, sess)
    return sess, kw["providers"]


def accuracy_for(profile, graph: str, bits: int) -> int | None:
    """The profile's MatMulNBits accuracy_level for a node of `graph` with `bits`-bit weights: the key
    "graph:bits" first, then "graph"; None = keep what the bundle was exported with."""
    acc = getattr(profile, "matmul_accuracy", None) or {}
    return acc.get(f"{graph}:{bits}", acc.get(graph))


def _with_accuracy(bundle: Bundle, graph: str, profile, so) -> str | bytes:
    """The graph file, or its bytes with the profile's MatMulNBits accuracy_level patched in (one byte per node,
    no onnx package; external data then resolves against the bundle folder)."""
    path = bundle.graph_file(graph)
    if not bundle.kernel_tensors:
        return str(path)
    if profile is None:
        from absorber.devices.profiles import default_profile
        profile = default_profile()
    if not getattr(profile, "matmul_accuracy", None):
        return str(path)
    data = path.read_bytes()
    patch = []
    # a combined graph: each graph gets its levels, in the main graph or in a sub-graph named after it
    parts = [(g, None if bundle.combined_branch(g) == F.COMBINED_MAIN else g) for g in F.GRAPHS] \
        if graph == F.COMBINED else [(graph, None)]
    for g, sub in parts:
        for node in node_int_attributes(data, "MatMulNBits", sub):
            if "accuracy_level" not in node:
                raise AbsorberError(f"bundle {bundle.path}: a MatMulNBits node of {g} has no accuracy_level "
                                    "(re-export the bundle)")
            off, now = node["accuracy_level"]
            want = accuracy_for(profile, g, node.get("bits", (0, 4))[1])
            if want is not None and want != now:
                if now >= 128:
                    raise AbsorberError(f"bundle {bundle.path}: accuracy_level={now} in {g} is not one byte")
                patch.append((off, want))
    if not patch:
        return str(path)
    buf = bytearray(data)
    for off, want in patch:
        buf[off] = int(want)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle.path))
    return bytes(buf)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def check_onnxruntime(bundle: Bundle, installed: str | None = None) -> None:
    """One line instead of ONNX Runtime's graph error when the bundle needs a newer release than the installed
    one (manifest quant.onnxruntime: int8/int4 bundles since 2026-12-05 need 1.23)."""
    need = bundle.manifest["quant"].get("onnxruntime")
    have = installed or ort.__version__
    if need and _release(have) < _release(need):
        raise AbsorberError(f"bundle {bundle.path} needs onnxruntime >= {need} (installed: {have}); "
                            "upgrade it: pip install -U onnxruntime")


def open_sessions(bundle: Bundle, device: str = "cpu", profile=None, share_weights: bool = True,
                  combined: bool = True) -> Sessions:
    """Both sessions of a verified bundle (open_bundle), on `device` with the profile's session options: one
    combined session when the bundle has combined.onnx (combined=False: the two sessions of bundles without it;
    share_weights=False: two sessions, each with its own copy of the weights)."""
    profile = resolve_profile(profile)
    check_onnxruntime(bundle)
    maps: list[FileMap] = []
    shared: dict[str, ort.OrtValue] = {}
    if combined and share_weights and bundle.combined_file is not None:
        sess, providers = _session(bundle, F.COMBINED, profile, device, True, maps, shared)
        dec, train = Branch(sess, bundle, "decoder"), Branch(sess, bundle, "train_step")
        check_session_io(bundle, "decoder", dec)
        check_session_io(bundle, "train_step", train)
        _drop_pages(maps)
        return Sessions(dec, train, providers, maps, shared, combined=sess)
    dec, providers = _session(bundle, "decoder", profile, device, share_weights, maps, shared)
    train, _ = _session(bundle, "train_step", profile, device, share_weights, maps, shared)
    _drop_pages(maps)
    return Sessions(dec, train, providers, maps, shared)
