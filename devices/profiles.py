"""Device profiles: named bundles of ONNX Runtime session settings and method defaults, shipped as data
(profiles.json next to this file). A profile may also be loaded from a user JSON file (one profile object, or
the same {"profiles": {...}} layout)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from absorber.bundle_format import QUANT_SCHEMES as QUANTS  # the bundle contract owns the scheme names
from absorber.errors import AbsorberError

OPT_LEVELS = ("disable", "basic", "extended", "all")
PROFILES_FILE = Path(__file__).with_name("profiles.json")


ACCURACY_KEYS = ("decoder", "train_step", "decoder:4", "decoder:8", "train_step:4", "train_step:8")


@dataclass
class Profile:
    name: str
    description: str = ""
    threads: int = 0                      # intra-op threads; 0 = ORT default (one per physical core)
    inter_threads: int = 1                # inter-op threads (the graphs run sequentially)
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = True       # ORT pre-plans one block per input shape (faster, more peak memory)
    graph_optimization_level: str = "all"  # disable|basic|extended|all
    session_config: dict = field(default_factory=dict)   # ORT session config entries, string values
    quant: str = "fp32"                   # preferred weight quantization of the bundle: fp32|int8|int4
    n: int = 512                          # tokens absorbed per round
    m: int = 256                          # tokens synchronized per round
    k: int = 16                           # optimizer steps per round
    memory_budget_mb: int | None = None   # peak RSS budget the planner fits the window into (None = no limit)
    device: str = "auto"                  # auto|cpu|cuda|tensorrt|dml|coreml|openvino|qnn (see providers.py)
    # MatMulNBits accuracy_level per graph of an int8/int4 bundle, optionally per weight bits ("decoder:8" before
    # "decoder"): 0/1 = float activations (exact), 4 = int8 activations (the integer kernels); a key left out =
    # what the bundle was exported with (1). Measured in benchmarks/quant_agreement.md
    matmul_accuracy: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise AbsorberError(f"profile {self.name!r}: {msg}")
        if self.graph_optimization_level not in OPT_LEVELS:
            bad(f"graph_optimization_level must be one of {', '.join(OPT_LEVELS)} "
                f"(got {self.graph_optimization_level!r})")
        if self.quant not in QUANTS:
            bad(f"quant must be one of {', '.join(QUANTS)} (got {self.quant!r})")
        for k in ("threads", "inter_threads"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(f"{k} must be an integer >= 0 (got {v!r})")
        for k in ("n", "m"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"{k} must be an integer >= 1 (got {v!r})")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            bad(f"k must be an integer >= 0 (got {self.k!r})")
        if self.memory_budget_mb is not None and (not isinstance(self.memory_budget_mb, (int, float))
                                                  or self.memory_budget_mb <= 0):
            bad(f"memory_budget_mb must be a positive number or null (got {self.memory_budget_mb!r})")
        if not isinstance(self.session_config, dict):
            bad("session_config must be an object of string entries")
        self.session_config = {str(k): str(v) for k, v in self.session_config.items()}
        if not isinstance(self.matmul_accuracy, dict) or any(
                k not in ACCURACY_KEYS or v not in (0, 1, 2, 3, 4) or isinstance(v, bool)
                for k, v in self.matmul_accuracy.items()):
            bad(f"matmul_accuracy must map {'/'.join(ACCURACY_KEYS)} to an accuracy level 0-4 "
                f"(got {self.matmul_accuracy!r})")
        for k in ("enable_cpu_mem_arena", "enable_mem_pattern"):
            if not isinstance(getattr(self, k), bool):
                bad(f"{k} must be true or false (got {getattr(self, k)!r})")
        from absorber.devices.providers import parse_device
        parse_device(self.device)

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else int(self.memory_budget_mb * 1024 * 1024)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "Profile":
        if not isinstance(d, dict):
            raise AbsorberError(f"profile {name!r}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AbsorberError(f"profile {name!r}: unknown key(s) {', '.join(unknown)}")
        d = {k: v for k, v in d.items() if k != "name"}
        return cls(name=name, **d)


def _load(path: Path) -> dict[str, Profile]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AbsorberError(f"cannot read profiles from {path}: {e}") from None
    if isinstance(data, dict) and "profiles" in data:
        items = data["profiles"]
    elif isinstance(data, dict):   # one profile object in a user file
        items = {data.get("name", path.stem): data}
    else:
        raise AbsorberError(f"{path}: expected a JSON object")
    return {n: Profile.from_dict(n, d) for n, d in items.items()}


_CACHE: dict[str, Profile] | None = None


def _shipped() -> dict[str, Profile]:
    global _CACHE
    if _CACHE is None:
        _CACHE = _load(PROFILES_FILE)
    return _CACHE


def list_profiles() -> list[Profile]:
    """The shipped profiles, in file order."""
    return [dataclasses.replace(p) for p in _shipped().values()]


def get_profile(name: str) -> Profile:
    """A shipped profile by name, or a profile read from a JSON file path. Unknown -> AbsorberError."""
    if isinstance(name, Profile):
        return name
    shipped = _shipped()
    if name in shipped:
        p = shipped[name]
        return dataclasses.replace(p, session_config=dict(p.session_config), matmul_accuracy=dict(p.matmul_accuracy))
    if name.endswith(".json") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise AbsorberError(f"profile file not found: {name}")
        profs = _load(path)
        if len(profs) != 1:
            raise AbsorberError(f"{name}: holds {len(profs)} profiles ({', '.join(profs)}); expected one")
        return next(iter(profs.values()))
    raise AbsorberError(f"unknown profile {name!r}: use one of {', '.join(shipped)} (or a path to a .json file)")


def pick_profile_name(total_bytes: int, logical_cores: int, machine: str, providers: list[str]) -> tuple[str, str]:
    """(profile name, why) for a machine's facts. Pure function: tests feed it fake machines."""
    gib = total_bytes / 2**30
    arm = machine.lower() in ("aarch64", "arm64", "armv7l", "armv8l") or machine.lower().startswith("arm")
    if "CUDAExecutionProvider" in providers:
        return "cuda", "onnxruntime has CUDAExecutionProvider"
    if gib < 2 or logical_cores <= 1:
        return "tiny", f"{gib:.1f} GiB of memory, {logical_cores} core(s)"
    if gib < 6 or (arm and gib < 12):
        return "edge-arm", f"{gib:.1f} GiB of memory on {machine}"
    return "laptop-cpu", f"{gib:.1f} GiB of memory, {logical_cores} logical core(s), {machine}"


def default_profile() -> Profile:
    """The profile picked for this machine (memory limit of the container counted, CUDA when ORT has it)."""
    import platform
    from absorber.devices.machine import memory_info, logical_cpus
    from absorber.devices.providers import available_providers
    mem = memory_info()
    name, _ = pick_profile_name(mem["limit_bytes"], logical_cpus(), platform.machine(), available_providers())
    return get_profile(name)
