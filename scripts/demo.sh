#!/usr/bin/env bash
# The main job, on the embedded default model (SmolLM2-135M-Instruct) and a real spoken transcript:
#  1. export the int8 bundle once (cached in $ABSORBER_BUNDLE, default ~/.cache/absorber/smollm2-135m-int8);
#  2. stream Clinton's 1994 State of the Union line by line, as a live transcript, through the torch-free
#     runtime (`absorber run`): every time the window is full its oldest tokens are absorbed into LoRA weights;
#  3. ask about the speech's opening, which left the window long before the end (answers read through the online
#     mixture of the adapted and the base model, `--mix`: also for a bundle cached before it was the default).
# It prints the elapsed time of each phase (export, streaming + answers) and the export's peak RSS: the timings
# quoted in README.md come from these lines.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${ABSORBER_BUNDLE:-$HOME/.cache/absorber/smollm2-135m-int8}
LINES=${ABSORBER_DEMO_LINES:-40}        # lines of the speech streamed (the whole speech: 0)
elapsed() { printf '%d min %d s' $(($1 / 60)) $(($1 % 60)); }
# a bundle of an older format (or a broken one), one whose train step lacks the default next-token term
# (exported before it shipped), or one with the term's first, 2x heavier train step (no loss.head_chunks),
# is exported anew
if [ -f "$BUNDLE/manifest.json" ] && ! python3 -c "
import sys
from absorber.bundle_format import read_manifest
from absorber.config import AbsorberConfig
b = read_manifest(sys.argv[1])
sys.exit(b.loss_ntp_weight != AbsorberConfig().ntp_weight or (b.loss_ntp_weight > 0 and not b.loss_head_chunks))" "$BUNDLE" 2>/dev/null; then
  echo "== $BUNDLE is not a bundle of this version's defaults: exporting it again" >&2
  rm -rf "$BUNDLE"
fi
if [ ! -f "$BUNDLE/manifest.json" ]; then
  echo "== exporting the default model as an int8 bundle into $BUNDLE (once)" >&2
  mkdir -p "$(dirname "$BUNDLE")"
  SECONDS=0
  if [ -x /usr/bin/time ]; then   # GNU time: the export's peak RSS too
    /usr/bin/time -f "== export peak RSS: %M kB" absorber export smollm2-135m --out "$BUNDLE" --quant int8
  else
    absorber export smollm2-135m --out "$BUNDLE" --quant int8
  fi
  echo "== export took $(elapsed $SECONDS)" >&2
else
  echo "== export: skipped, $BUNDLE is already there" >&2
fi
STATE=$(mktemp -d)
trap 'rm -rf "$STATE"' EXIT
echo "== streaming a spoken State of the Union transcript into $BUNDLE (live, line by line)" >&2
SECONDS=0
python3 - "$LINES" <<'PY' | absorber run "$BUNDLE" --input - --format txt --state "$STATE" --mix \
    --max-new-tokens 24 --ask "Tip O'Neill liked to call himself" \
    --ask "Question: Whose memory did the President ask Congress to recall at the start of the speech? Answer:"
import sys, time
from absorber import data
n = int(sys.argv[1])
lines = data.speech("1994-Clinton-1").text().splitlines(keepends=True)
for line in lines[:n] if n else lines:
    sys.stdout.write(line)
    sys.stdout.flush()
    time.sleep(0.05)          # a speech recognizer emits lines as they are spoken
PY
echo "== streaming and answers took $(elapsed $SECONDS)" >&2
