"""Decode speed vs optimum-onnx's ORTModelForCausalLM: a thin wrapper around `absorber.bench.optimum_peer`.

The logic lives in the package (`python -m absorber.bench.optimum_peer`, `absorber bench --optimum`) so that an
installed absorber can run it too. optimum-onnx pins transformers<4.58 and this project needs transformers 5,
so the peer runs in its own venv (~/.cache/absorber/optimum-venv), created on the first run.

    python benchmarks/scripts/optimum_peer.py --bundle /tmp/bench/b/fp32 --bundle ~/.cache/absorber/smollm2-135m-int8
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the checkout (benchmarks/scripts/../..)

from absorber.bench.optimum_peer import main  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1]   # benchmarks/: the results land there whatever the current directory

if __name__ == "__main__":
    argv = sys.argv[1:]
    for flag, name in (("--json", "optimum_peer.json"), ("--md", "optimum_peer.md")):
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv += [flag, str(RESULTS / name)]
    sys.exit(main(argv, prog="python benchmarks/scripts/optimum_peer.py"))
