"""Packaging: one `absorber` namespace over four top-level folders, a CLI, and a torch-free device layer."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A meta-path finder that makes torch & co. unimportable, as on a device install.
BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'optimum', 'accelerate'):
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, _Block())
"""


def run_py(code: str, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("cwd", [ROOT, Path("/")], ids=["checkout-root", "elsewhere"])
def test_subpackages_import_from_any_directory(cwd):
    r = run_py("import absorber.runtime, absorber.devices, absorber.export, absorber.cli; print('ok')", cwd=cwd)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_no_top_level_runtime_export_devices_modules_are_installed():
    r = run_py("import importlib.util as u; print([m for m in ('runtime', 'export', 'devices') if u.find_spec(m)])",
               cwd=Path("/"))
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_cli_help_lists_verbs_and_python_m_works():
    r = subprocess.run([sys.executable, "-m", "absorber", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for verb in ("absorb", "export", "run", "devices", "eval"):
        assert verb in r.stdout, verb


def test_device_layers_import_without_torch():
    code = BLOCK + """
import absorber, absorber.runtime, absorber.devices, absorber.cli
absorber.cli.build_parser()
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum')]
assert not bad, bad
print('ok')
"""
    r = run_py(code, cwd=Path("/"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_wheel_maps_the_four_folders_into_one_namespace(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PIP_NO_INPUT": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("absorber-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("absorber/__init__.py", "absorber/runtime/__init__.py", "absorber/export/__init__.py",
              "absorber/devices/__init__.py", "absorber/cli.py",
              "absorber/commands/absorb.py", "absorber/commands/bench.py", "absorber/devices/profiles.json",
              "absorber/bench/__init__.py", "absorber/bench/speed.py", "absorber/bench/calibrate.py"):
        assert f in names, f
    top = {n.split("/")[0] for n in names}
    assert top <= {"absorber"} | {n.split("/")[0] for n in names if ".dist-info" in n}, top


def test_only_the_bench_verb_imports_absorber_bench():
    """The dependency rule: the method (absorber/), export/, runtime/ and devices/ never import absorber.bench;
    only the CLI verb absorber/commands/bench.py (and benchmarks/scripts/, outside the package) may."""
    import re
    pat = re.compile(r"^\s*(from\s+absorber\.bench\b|import\s+absorber\.bench\b|from\s+absorber\s+import\s+.*\bbench\b)"
                     r"|[\"']absorber\.bench\b", re.M)   # imports, and module names in strings (importlib, -m)
    allowed = {ROOT / "absorber" / "commands" / "bench.py"}
    bad = []
    for folder in ("absorber", "export", "runtime", "devices"):
        for f in (ROOT / folder).rglob("*.py"):
            if f in allowed or (ROOT / "absorber" / "bench") in f.parents:
                continue
            if pat.search(f.read_text(encoding="utf-8")):
                bad.append(str(f.relative_to(ROOT)))
    assert not bad, bad
