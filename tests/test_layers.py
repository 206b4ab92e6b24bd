"""The layers' import directions (ARCHITECTURE.md), checked on the source.

method (absorber/) -> export (export/) -> runtime (runtime/) <- devices (devices/); bench (absorber/bench/) above
all. Rules:
- runtime/ and devices/ never import torch, transformers, onnx, onnxscript, optimum (the device install);
- runtime/ never imports absorber.export or the method's torch modules (only the torch-free shared ones);
- devices/ never imports absorber.runtime or absorber.export (the runtime uses devices, not the reverse);
- nothing below bench imports absorber.bench (only the `absorber bench` verb and benchmarks/scripts may);
- the torch-free shared modules (config, errors, rounds, bundle_format, files, replay) import nothing heavy; mixture
  (the online mixture of answers) numpy only.
Imports are read with `ast` (every `import` / `from ... import`, at any depth, including inside functions), so a
lazy import inside a function counts too. A static tool that resolves imports by path would not see that the
folder export/ is `absorber.export`: this test maps folders to import names itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"method": ROOT / "absorber", "export": ROOT / "export", "runtime": ROOT / "runtime",
          "devices": ROOT / "devices"}
HEAVY = {"torch", "transformers", "onnx", "onnxscript", "onnx_ir", "optimum", "accelerate", "gguf"}
# the method's modules that need no torch: the runtime and devices may use them
SHARED = {"absorber", "absorber.config", "absorber.errors", "absorber.rounds", "absorber.bundle_format",
          "absorber.files", "absorber.mixture", "absorber.replay"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            # `from absorber import lora` imports the module absorber.lora
            out |= {f"{node.module}.{a.name}" for a in node.names if node.module == "absorber"}
    return out


def files(layer: str, exclude_bench: bool = True) -> list[Path]:
    fs = sorted(LAYERS[layer].rglob("*.py"))
    if exclude_bench:
        fs = [f for f in fs if "bench" not in f.relative_to(ROOT).parts[1:2]]
    return fs


def _top(name: str) -> str:
    return name.split(".")[0]


def _is_method_module(name: str) -> bool:
    return name.startswith("absorber.") and not name.startswith(
        ("absorber.export", "absorber.runtime", "absorber.devices", "absorber.bench"))


def violations(layer: str, rule) -> list[str]:
    bad = []
    for f in files(layer):
        for name in sorted(imports_of(f)):
            why = rule(name)
            if why:
                bad.append(f"{f.relative_to(ROOT)} imports {name} ({why})")
    return bad


def test_imports_are_read_from_every_layer():
    # the checker itself: it sees lazy imports inside functions, and every layer has files
    assert all(files(layer) for layer in LAYERS)
    assert "torch" in imports_of(ROOT / "export" / "bundle.py")          # imported inside trace()
    assert "absorber.devices" in {n[:16] for n in imports_of(ROOT / "runtime" / "sessions.py")}


@pytest.mark.parametrize("layer", ["runtime", "devices"])
def test_device_layers_import_nothing_heavy(layer):
    assert violations(layer, lambda n: "heavy" if _top(n) in HEAVY else None) == []


def test_runtime_never_imports_export_or_the_method_torch_modules():
    def rule(n):
        if n.startswith("absorber.export"):
            return "the exporter"
        if _is_method_module(n) and n not in SHARED:
            return "a method module (torch)"
        return None
    assert violations("runtime", rule) == []


def test_devices_never_import_runtime_export_or_method():
    def rule(n):
        if n.startswith(("absorber.runtime", "absorber.export")):
            return "a layer above devices"
        if _is_method_module(n) and n not in SHARED:
            return "a method module"
        return None
    assert violations("devices", rule) == []


@pytest.mark.parametrize("layer", list(LAYERS))
def test_nothing_below_bench_imports_bench(layer):
    def rule(n):
        return "bench sits above all layers" if n.startswith("absorber.bench") else None
    bad = [v for v in violations(layer, rule) if not v.startswith("absorber/commands/bench.py")]
    assert bad == []


def test_method_does_not_import_the_runtime():
    # the reference is what the runtime is checked against: it must not lean on it
    bad = violations("method", lambda n: "runtime" if n.startswith("absorber.runtime") else None)
    bad = [v for v in bad if not v.startswith(("absorber/commands/", "absorber/cli.py"))]
    assert bad == []


def test_shared_modules_are_torch_free():
    for mod in ("config", "errors", "rounds", "bundle_format", "files", "replay"):
        heavy = {n for n in imports_of(ROOT / "absorber" / f"{mod}.py") if _top(n) in HEAVY | {"onnxruntime", "numpy"}}
        assert heavy == set(), (mod, heavy)
    # the online mixture of answers: numpy, which the runtime has anyway, and nothing heavier
    heavy = {n for n in imports_of(ROOT / "absorber" / "mixture.py") if _top(n) in HEAVY | {"onnxruntime"}}
    assert heavy == set(), heavy
