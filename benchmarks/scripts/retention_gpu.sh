#!/usr/bin/env bash
# The device side of retention_gpu.py on a lent GPU machine with no network (benchmarks/retention.md).
# The GGUF (94 MiB) and the wheels the image lacks do not fit one transfer (64 MiB), so two calls on the same warm
# machine: `smoke` (carries .whl/ and .gpu/a, the GGUF's first 37 MiB; runs the tiny-model smoke plan on the GPU),
# then `run` (carries .gpub/b, the rest; joins the file, checks its sha256, runs the main plan under a budget).
set -euo pipefail
mode=${1:?smoke|run}
site=/tmp/site
if [ ! -d $site/transformers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl
fi
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ "$mode" = smoke ]; then
  cp .gpu/a /tmp/gguf.a
  nvidia-smi -L; nproc
  python3 -c "import torch, transformers, gguf; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
  python3 benchmarks/scripts/retention_gpu.py --out /tmp/rgs --model tiny --plan smoke --budget 90 --workers 2
  python3 benchmarks/scripts/retention_gpu.py --combine /tmp/rgs --into "$OUT/smoke"
else
  cat "$( [ -f /tmp/gguf.a ] && echo /tmp/gguf.a || echo .gpu/a )" .gpub/b > /tmp/smollm2.gguf
  echo "${GGUF_SHA256:?}  /tmp/smollm2.gguf" | sha256sum -c -
  python3 benchmarks/scripts/retention_gpu.py --out /tmp/rg --model /tmp/smollm2.gguf --plan main \
      --workers "${WORKERS:-12}" --budget "${BUDGET:-420}" 2>&1 | grep -v -i "deprecat\|forward_call" | tee "$OUT/log.txt"
  python3 benchmarks/scripts/retention_gpu.py --combine /tmp/rg --into "$OUT/rg"
  tar czf "$OUT/pieces.tgz" -C /tmp rg
  nvidia-smi --query-gpu=name,memory.used --format=csv
fi
