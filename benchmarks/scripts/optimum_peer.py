"""Decode speed vs optimum-onnx's ORTModelForCausalLM: a thin wrapper around `absorber.optimum_peer`.

The logic lives in the package (`python -m absorber.optimum_peer`, `absorber bench --optimum`) so that an
installed absorber can run it too. optimum-onnx pins transformers<4.58 and this project needs transformers 5,
so the peer runs in its own venv (~/.cache/absorber/optimum-venv), created on the first run.

    python benchmarks/optimum_peer.py --bundle /tmp/bench/b/fp32 --bundle ~/.cache/absorber/smollm2-135m-int8
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the checkout, when run as a script

from absorber.optimum_peer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/optimum_peer.py"))
