"""Execution providers: a device name (auto|cpu|cuda|tensorrt|dml|coreml|openvino|qnn|xnnpack) -> an ordered
ONNX Runtime provider list that always ends with the CPU provider (ORT places any node an accelerator cannot run
on the CPU), plus per-provider options.

Only onnxruntime and the standard library are imported here (and onnxruntime only inside functions).
"""
from __future__ import annotations

from absorber.errors import AbsorberError

CPU = "CPUExecutionProvider"

# device alias -> providers tried in this order (the CPU fallback is appended by resolve_providers)
CHAINS: dict[str, tuple[str, ...]] = {
    "cpu": (),
    "cuda": ("CUDAExecutionProvider",),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
    "dml": ("DmlExecutionProvider",),
    "coreml": ("CoreMLExecutionProvider",),
    "openvino": ("OpenVINOExecutionProvider",),
    "qnn": ("QNNExecutionProvider",),
    "xnnpack": ("XnnpackExecutionProvider",),
    "rocm": ("ROCMExecutionProvider", "MIGraphXExecutionProvider"),
}

# `auto` only picks providers that run the whole decoder + train-step graphs (dynamic shapes, training ops)
# without an ahead-of-time compile per shape: CUDA, then DirectML, then the CPU. TensorRT, CoreML, OpenVINO,
# QNN compile per input shape or cover a subset of the ops: ask for them by name.
AUTO_ORDER: tuple[str, ...] = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")

# what to install to get a provider (shown when a requested device is missing)
INSTALL_HINT: dict[str, str] = {
    "cuda": "pip install onnxruntime-gpu (and a matching CUDA 12 + cuDNN 9)",
    "tensorrt": "pip install onnxruntime-gpu and the TensorRT libraries",
    "dml": "pip install onnxruntime-directml (Windows)",
    "coreml": "use the onnxruntime wheel for macOS (pip install onnxruntime on a Mac)",
    "openvino": "pip install onnxruntime-openvino",
    "qnn": "pip install onnxruntime-qnn (Windows on Snapdragon)",
    "xnnpack": "build onnxruntime with --use_xnnpack (or use the Android/iOS packages)",
    "rocm": "install the ROCm build of onnxruntime",
}


def parse_device(device: str | None) -> tuple[str, int | None]:
    """'cuda:1' -> ('cuda', 1); 'CUDAExecutionProvider' -> ('cuda', None); None/'' -> ('auto', None)."""
    d = (device or "auto").strip()
    for alias, chain in CHAINS.items():
        if chain and d == chain[0]:
            return alias, None
    if d == CPU:
        return "cpu", None
    name, _, idx = d.lower().partition(":")
    if name == "gpu":
        name = "cuda"
    if name not in CHAINS and name != "auto":
        raise AbsorberError(f"unknown device {device!r}: use one of auto, {', '.join(CHAINS)}")
    if idx:
        if not idx.isdigit():
            raise AbsorberError(f"bad device index in {device!r}: expected e.g. cuda:0")
        return name, int(idx)
    return name, None


def available_providers() -> list[str]:
    import onnxruntime as ort
    return list(ort.get_available_providers())


def _build_summary(available: list[str]) -> str:
    real = [p for p in available if p not in ("AzureExecutionProvider",)]
    if real == [CPU]:
        return "this onnxruntime build has CPUExecutionProvider only"
    return "this onnxruntime build has " + ", ".join(real)


def resolve_providers(device: str = "auto", available: list[str] | None = None) -> list[str]:
    """The ordered provider list for `device`, always ending with CPUExecutionProvider.

    auto: the best of CUDA / ROCm / DirectML that this build has, then CPU. A named device that this build
    lacks raises AbsorberError (one line: why, and what to install); it is never silently replaced by the CPU.
    """
    avail = list(available) if available is not None else available_providers()
    name, _ = parse_device(device)
    if name == "auto":
        chain = [p for p in AUTO_ORDER if p in avail]
    elif name == "cpu":
        chain = []
    else:
        wanted = CHAINS[name]
        if wanted[0] not in avail:
            raise AbsorberError(f"device {name!r} is not available: {_build_summary(avail)}; {INSTALL_HINT[name]}")
        chain = [p for p in wanted if p in avail]
    return chain + [CPU]


def provider_options(device: str = "auto", profile=None, available: list[str] | None = None,
                     providers: list[str] | None = None) -> list[dict]:
    """Options aligned with resolve_providers(device, available) (or with `providers` when given), for
    onnxruntime.InferenceSession(..., providers=..., provider_options=...). Values are strings as ORT wants."""
    provs = providers if providers is not None else resolve_providers(device, available)
    _, idx = parse_device(device)
    dev_id = str(idx or 0)
    budget = getattr(profile, "memory_budget_mb", None) if profile is not None else None
    out: list[dict] = []
    for p in provs:
        if p == "CUDAExecutionProvider":
            o = {"device_id": dev_id,
                 # grow the arena by what is requested, not by powers of two: keeps peak memory close to need
                 "arena_extend_strategy": "kSameAsRequested",
                 "cudnn_conv_algo_search": "HEURISTIC",
                 "do_copy_in_default_stream": "1"}
            if budget:
                o["gpu_mem_limit"] = str(int(budget) * 1024 * 1024)
            out.append(o)
        elif p == "TensorrtExecutionProvider":
            out.append({"device_id": dev_id, "trt_fp16_enable": "0", "trt_engine_cache_enable": "1"})
        elif p == "ROCMExecutionProvider":
            out.append({"device_id": dev_id, "arena_extend_strategy": "kSameAsRequested"})
        elif p == "DmlExecutionProvider":
            out.append({"device_id": dev_id})
        elif p == "CoreMLExecutionProvider":
            out.append({"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"})
        elif p == "QNNExecutionProvider":
            out.append({"backend_path": "QnnHtp.dll"})
        else:
            out.append({})
    return out
