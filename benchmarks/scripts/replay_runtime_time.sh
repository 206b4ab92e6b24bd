#!/bin/bash
# The runtime's round time with and without experience replay on a real SmolLM2 int8 bundle (benchmarks/retention.md,
# "Replay out to 32 rounds", the runtime's cost), alternating replay / none / replay in fresh processes:
#   bash benchmarks/scripts/replay_runtime_time.sh BUNDLE OUT_DIR
# BUNDLE: an int8 export with this version's preset (replay 8, 4 steps), e.g. the demo's
# (ABSORBER_BUNDLE=BUNDLE bash scripts/demo.sh), or a Gemma-3-270M int4 export (`absorber export gemma3-270m --quant
# int4`, benchmarks/retention.md, "Gemma-3-270M's next-text R with replay"). Writes OUT_DIR/{replay,norep,replay2}.jsonl
# (`absorber run --json`: one line per round, then the summary) and .time (GNU time: seconds, peak RSS).
set -euo pipefail
B=$1; OUT=$2
mkdir -p "$OUT"
TEXT=$(mktemp)
trap 'rm -f "$TEXT"' EXIT
python3 -c "
import sys
from absorber import data
open(sys.argv[1], 'w').write(data.speech('2026-Trump-1').text()[:13000])" "$TEXT"     # 5 rounds at n=512, m=256
for tag in replay norep replay2; do
  case $tag in norep*) v="--replay 0";; *) v="";; esac
  /usr/bin/time -f "%e s, peak %M KB" absorber run "$B" --input "$TEXT" --json -q $v > "$OUT/$tag.jsonl" 2> "$OUT/$tag.time"
  echo "$tag $(tail -1 "$OUT/$tag.time")"
done
