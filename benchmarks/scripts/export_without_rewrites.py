"""`absorber export` with the decoder rewrites of 2026-12-05 switched off (benchmarks/decode.md section 4's OLD
bundles): no stacked linear layers (export/quant.py linear_groups), no norm or rotary rewrite
(export/fusions.py), hence no packed adapters (export/lora_packing.py needs the stacks). The same arguments as
`absorber export`:

    python benchmarks/scripts/export_without_rewrites.py export gemma3-270m --quant int4 --out OLD
"""
import sys

import absorber.export.bundle as B
import absorber.export.quant as Q
from absorber.cli import main

B.rms_norms_as_division = lambda graph: 0
B.rotary_as_kernel = lambda graph, positions, position_ids: 0
Q.linear_groups = lambda graph, qweights: []

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
