#!/usr/bin/env bash
# The exact commands behind benchmarks/eval.md (run from anywhere: bash benchmarks/scripts/eval_run.sh):
# SmolLM2-135M-Instruct (fp32 torch, CPU), the 2 most recent
# spoken SOTU speeches (2026-Trump-1, 2024-Biden-1), 3 rounds each = 6 scored segments of 512 tokens.
# They ran side by side, one thread each, on a shared 2-core machine (load ~10): s/round in the JSON reflect that.
set -euo pipefail
cd "$(dirname "$0")/../.."   # the checkout root (this script is benchmarks/scripts/eval_run.sh)
export OMP_NUM_THREADS=1
# the first study ran before `teacher` was an option, with the then-default teacher = current model
E="absorber eval --sotu 2 --segments 3 --threads 1 --teacher current"
A="$E --methods absorber --passkey-lengths ''"

# 1. the table of issue 2 at the defaults (n=512, m=256, K=16, lr 1e-3, clip 1, LoRA r=16 a=32 on all linear),
#    one method group per process, then merged (segments are deterministic and aligned across files)
# (absorber: this ran as `$E --methods absorber,ttt,window,full,sink --json benchmarks/eval_main.json`, stopped
#  for time after its absorber checkpoint, renamed to eval_main_absorber.json; --methods absorber is the same run)
$E --methods absorber --json benchmarks/eval_main_absorber.json          # + passkey (1024 tokens, depth .1/.3)
$E --methods ttt --passkey-lengths '' --json benchmarks/eval_main_ttt.json
$E --methods window,full,sink --json benchmarks/eval_main_baselines.json
python benchmarks/scripts/eval_report.py --merge benchmarks/eval_main.json benchmarks/eval_main.png \
  benchmarks/eval_main_absorber.json benchmarks/eval_main_ttt.json benchmarks/eval_main_baselines.json

# 2. learning rate (absorber only; window/full recomputed, identical to 1.)
$E --methods window,full,absorber --passkey-lengths '' --sweep lr=2e-3,5e-4 --json benchmarks/eval_sweep_lr.json

# 3. variants, absorber only, same texts/segments. (They ran as benchmarks/eval_sink_mask.py, a patch of
#    Absorption that the options --sync-skip and --reset adapters have replaced; same computation.)
$A --sync-skip 1 --json benchmarks/eval_sink_mask1.json                  # skip Y's sink position
$A --k 4 --json benchmarks/eval_k4.json                                  # K=4 instead of 16
$A --k 32 --json benchmarks/eval_k32.json                                # K=32
$A --reset adapters --json benchmarks/eval_reset.json                    # fresh adapters every round
$A --reset adapters --sync-skip 1 --json benchmarks/eval_reset_mask1.json  # both
absorber eval --speech 1994-Clinton-1 --segments 3 --threads 1 --teacher current --methods window,full,absorber \
  --passkey-lengths '' --json benchmarks/eval_clinton1994.json

# 4. all absorber variants against the same window/full
python benchmarks/scripts/eval_report.py --variants benchmarks/eval_main.json benchmarks/eval_main_ttt.json \
  benchmarks/eval_sweep_lr.json benchmarks/eval_sink_mask1.json benchmarks/eval_k4.json benchmarks/eval_k32.json \
  benchmarks/eval_reset.json benchmarks/eval_reset_mask1.json benchmarks/eval_clinton1994.json

# 5. two more speeches, defaults and fresh adapters every round, pooled with 1. over 4 speeches
absorber eval --speech 2023-Biden-1 2022-Biden-1 --segments 3 --threads 1 --teacher current \
  --methods window,full,absorber --passkey-lengths '' --json benchmarks/eval_more_texts.json
absorber eval --speech 2023-Biden-1 2022-Biden-1 --segments 3 --threads 1 --teacher current --reset adapters \
  --methods absorber --passkey-lengths '' --json benchmarks/eval_more_texts_reset.json
python benchmarks/scripts/eval_combine.py

# 6. the drift study (second study; the default became teacher=base). Pieces of (job, speech) over worker
#    processes; every record lands in OUT/*.json as it is computed, and the report reads them all.
#    a) one H100 (15 minutes lent): all variants of the "full" plan, 10 processes, stopped at 540 s
python benchmarks/scripts/eval_gpu.py --out /tmp/drift/gpu --device cuda --workers 10 --threads 1 --budget 540
#    b) this CPU: ttt (stopped after 5 rounds of 2 speeches), the long stream with the base teacher (20 rounds
#       done), its window, the sink-mask on top of the base teacher, passkey with the base teacher
python benchmarks/scripts/eval_gpu.py --out /tmp/drift/cpu-a --device cpu --plan cpu --workers 2 --threads 1 --texts 0-2 \
  --jobs ttt-default-short --budget 780
python benchmarks/scripts/eval_gpu.py --out /tmp/drift/cpu-b --device cpu --plan cpu --workers 2 --threads 1 --texts 0-2 \
  --long-rounds 24 --jobs base-long,abs-tbase-long --budget 1000
python benchmarks/scripts/eval_gpu.py --out /tmp/drift/cpu-c --device cpu --plan cpu --workers 2 --threads 1 --texts 0-2 \
  --long-rounds 24 --passkey-lengths 1024 --jobs base-long-window,passkey-abs-tbase,abs-tbase-skip1-short
#    c) three more speeches (texts 3-5) for the base teacher and the baselines
python benchmarks/scripts/eval_gpu.py --out /tmp/drift/cpu-d --device cpu --plan cpu --workers 2 --threads 1 --texts 3-5 \
  --jobs abs-tbase-short,base-short
#    the raw records of all of them are benchmarks/eval_drift_raw.tar.gz; the tables and the plot:
python benchmarks/scripts/eval_gpu_report.py benchmarks/eval_drift_raw.tar.gz --json benchmarks/eval_drift.json \
  --md benchmarks/eval_drift.md --plot benchmarks/eval_drift.png
