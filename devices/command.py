"""`absorber devices`: what this machine offers ONNX Runtime, and the profile the runtime would pick."""
from __future__ import annotations

import json

HELP = "show execution providers, CPU/ISA, memory and the device profile this machine gets"
DESCRIPTION = """Show what this machine offers the torch-free runtime:
  - the execution providers of the installed onnxruntime, and what each --device resolves to
  - the CPU (cores, the ISA features ONNX Runtime's kernels use: AVX2/AVX-512/VNNI/AMX, NEON/dot-product/i8mm)
  - total and available memory (and a container's memory limit)
  - the shipped device profiles and the one picked for this machine"""


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _mb(b) -> str:
    from absorber.devices.planner import format_size
    return "-" if b is None else format_size(b)


def main(args) -> int:
    from absorber.devices.machine import describe
    from absorber.devices.profiles import list_profiles
    info = describe()
    info["profiles"] = [p.to_dict() for p in list_profiles()]
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2))
        return 0
    ort, cpu, mem, prof = info["onnxruntime"], info["cpu"], info["memory"], info["profile"]
    print(f"onnxruntime {ort['version']} ({ort['device']})")
    print(f"  providers: {', '.join(ort['providers'])}")
    print("devices:")
    for name, d in info["devices"].items():
        if d["available"]:
            print(f"  {name:<9} -> {' > '.join(d['providers'])}")
        else:
            print(f"  {name:<9} unavailable: {d['why'].split(': ', 1)[-1]}")
    phys = cpu["physical_cores"] if cpu["physical_cores"] is not None else "?"
    print(f"cpu: {cpu['model'] or cpu['machine']} ({cpu['machine']}, {cpu['system']})")
    print(f"  cores: {phys} physical, {cpu['logical_cores']} logical, {cpu['usable_cores']} usable by this process")
    print(f"  isa: {', '.join(cpu['isa']) or '(unknown)'}")
    lim = f", container limit {_mb(mem['cgroup_limit_bytes'])}" if mem["cgroup_limit_bytes"] else ""
    print(f"memory: {_mb(mem['total_bytes'])} total, {_mb(mem['available_bytes'])} available{lim}")
    for g in info["gpus"]:
        print(f"gpu {g['index']}: {g['name']}, {_mb(g['memory_total_bytes'])} ({_mb(g['memory_free_bytes'])} free), "
              f"driver {g['driver']}")
    print(f"profile: {prof['name']} ({prof['why']})")
    print(f"  device={prof['device']} threads={prof['threads'] or 'ORT default'} quant={prof['quant']} "
          f"n={prof['n']} m={prof['m']} k={prof['k']} budget={_mb(prof['memory_budget_mb'] and prof['memory_budget_mb'] * 2**20)}")
    print("shipped profiles: " + ", ".join(p["name"] for p in info["profiles"]))
    return 0
