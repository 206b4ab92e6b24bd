"""Facts about this machine that matter to ONNX Runtime: cores, the CPU's vector/matrix ISA, memory
(including a container's cgroup limit), and the execution providers of the installed onnxruntime."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

# /proc/cpuinfo flag -> what ORT's MLAS kernels use it for
X86_FLAGS = {
    "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C",
    "avx512f": "AVX-512F", "avx512bw": "AVX-512BW", "avx512vl": "AVX-512VL",
    "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16", "amx_tile": "AMX", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16",
}
ARM_FLAGS = {
    "asimd": "NEON", "asimddp": "dot-product (SDOT/UDOT)", "i8mm": "i8mm (SMMLA)", "asimdhp": "fp16 arithmetic",
    "bf16": "BF16", "sve": "SVE", "sve2": "SVE2", "sme": "SME",
}
# macOS sysctl names for the same features
DARWIN_ARM = {
    "hw.optional.neon": "NEON", "hw.optional.arm.FEAT_DotProd": "dot-product (SDOT/UDOT)",
    "hw.optional.arm.FEAT_I8MM": "i8mm (SMMLA)", "hw.optional.arm.FEAT_FP16": "fp16 arithmetic",
    "hw.optional.arm.FEAT_BF16": "BF16", "hw.optional.arm.FEAT_SME": "SME",
}


def logical_cpus() -> int:
    """CPUs this process may run on (affinity/cgroup aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int | None:
    try:
        import psutil
        return psutil.cpu_count(logical=False)
    except Exception:
        return None


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def parse_cpu_flags(cpuinfo: str, machine: str) -> tuple[str | None, list[str]]:
    """(CPU model name, ISA features ORT uses) from /proc/cpuinfo text. Pure: tests feed it samples."""
    model = None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None and val.strip():
            model = val.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(val.split())
    table = ARM_FLAGS if _is_arm(machine) else X86_FLAGS
    return model, [nice for flag, nice in table.items() if flag in flags]


def _is_arm(machine: str) -> bool:
    m = machine.lower()
    return m in ("aarch64", "arm64") or m.startswith("arm")


def _darwin_sysctl(name: str) -> str | None:
    try:
        r = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_info() -> dict:
    machine = platform.machine()
    system = platform.system()
    if system == "Linux":
        model, isa = parse_cpu_flags(_cpuinfo(), machine)
    elif system == "Darwin":
        model = _darwin_sysctl("machdep.cpu.brand_string")
        if _is_arm(machine):
            isa = [nice for key, nice in DARWIN_ARM.items() if _darwin_sysctl(key) == "1"]
        else:
            feats = ((_darwin_sysctl("machdep.cpu.features") or "") + " " +
                     (_darwin_sysctl("machdep.cpu.leaf7_features") or "")).lower().replace(".", "_").split()
            isa = [nice for flag, nice in X86_FLAGS.items() if flag in feats]
    else:
        model, isa = platform.processor() or None, []
    return {"machine": machine, "system": system, "model": model,
            "physical_cores": physical_cores(), "logical_cores": os.cpu_count(),
            "usable_cores": logical_cpus(), "isa": isa}


def cgroup_memory_limit() -> int | None:
    """The container's memory limit in bytes (cgroup v2 or v1), None when unlimited or unknown."""
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = Path(p).read_text().strip()
        except OSError:
            continue
        if v.isdigit() and int(v) < 2**60:
            return int(v)
    return None


def memory_info() -> dict:
    """total/available bytes (psutil), the cgroup limit, and limit_bytes = what a process can really use."""
    import psutil
    vm = psutil.virtual_memory()
    cg = cgroup_memory_limit()
    limit = min(vm.total, cg) if cg else vm.total
    return {"total_bytes": int(vm.total), "available_bytes": int(vm.available), "cgroup_limit_bytes": cg,
            "limit_bytes": int(limit)}


def gpu_info() -> list[dict]:
    """NVIDIA GPUs from nvidia-smi when it is installed (no CUDA library is loaded); [] otherwise."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        r = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.free,driver_version",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in r.stdout.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 5:
            idx, name, tot, free, drv = parts
            try:
                out.append({"index": int(idx), "name": name, "memory_total_bytes": int(float(tot)) * 2**20,
                            "memory_free_bytes": int(float(free)) * 2**20, "driver": drv})
            except ValueError:
                continue
    return out


def describe() -> dict:
    """Everything `absorber devices` shows, as a JSON-able dict."""
    import onnxruntime as ort

    from absorber.devices.profiles import pick_profile_name, get_profile
    from absorber.devices.providers import CHAINS, resolve_providers
    from absorber.errors import AbsorberError

    avail = list(ort.get_available_providers())
    devices = {}
    for name in ("auto", *CHAINS):
        try:
            devices[name] = {"available": True, "providers": resolve_providers(name, avail)}
        except AbsorberError as e:
            devices[name] = {"available": False, "why": str(e)}
    cpu = cpu_info()
    mem = memory_info()
    pname, why = pick_profile_name(mem["limit_bytes"], cpu["usable_cores"], cpu["machine"], avail)
    build = ort.get_build_info() if hasattr(ort, "get_build_info") else None
    return {
        "onnxruntime": {"version": ort.__version__, "device": ort.get_device(), "build": build,
                        "providers": avail},
        "devices": devices,
        "cpu": cpu,
        "memory": mem,
        "gpus": gpu_info(),
        "profile": {"name": pname, "why": why, **get_profile(pname).to_dict()},
    }
