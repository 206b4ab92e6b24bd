"""Absorber: absorb an endless text stream into a LoRA slice of the weights (Absorber LLM, arXiv 2604.20915).

Sub-packages: ``absorber`` (the method, PyTorch), ``absorber.export`` (ONNX bundles), ``absorber.runtime``
(torch-free engine on ONNX Runtime), ``absorber.devices`` (execution providers, profiles, memory planning).
This module imports nothing heavy: the runtime must work without torch.
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# In a source checkout the sub-packages live in sibling folders (export/, runtime/, devices/), mapped into
# `absorber.*` by pyproject's package-dir when installed. When Python finds *this* folder first (the
# checkout root leads sys.path: `python -c ...`, `python -m absorber`, a REPL), `absorber.runtime` would be
# looked up inside absorber/ only and fail. Adding the checkout root to __path__ makes those siblings
# importable as `absorber.runtime` etc. It is done only in a checkout (next to our pyproject.toml), never in
# an installed copy, where the sub-packages already sit inside absorber/.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "runtime")) and _os.path.isfile(_os.path.join(_root, "runtime", "__init__.py")) \
        and _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821
