"""Does the model need its BOS token? Base-model perplexity of held-out texts with and without it.

    python benchmarks/scripts/bos_check.py --models smollm2-135m,gemma3-270m \
        --texts /usr/share/common-licenses/GPL-3,1961-Kennedy --json benchmarks/bos_check.json

Every text: its tokens 1000..1255 (as the retention screen's damage check takes them), scored with no context
(the first token unscored) and after the model's BOS token; then the last 128 of them after the first 128, with
and without the BOS in front: whether a BOS still matters once some text is in context. Every evaluation in
absorber ran without a BOS until `AbsorberConfig.bos` (`absorber eval --bos`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--texts", default="/usr/share/common-licenses/GPL-3,1961-Kennedy",
                    help="text files or speech fileid prefixes (absorber.data.heldout_text)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args(argv)
    import torch

    from absorber import data, evaluate as E
    from absorber.models import load
    torch.set_num_threads(a.threads)
    rows = []
    print("| model | text | PPL, no context | PPL after BOS | last 128 after the first 128 | the same after BOS |")
    print("|---|---|---:|---:|---:|---:|")
    for name in a.models.split(","):
        model, tok = load(name)
        bos = tok.bos_token_id
        for spec in a.texts.split(","):
            label, text = data.heldout_text(spec)
            ids = tok.encode(text, add_special_tokens=False)[1000:1256]
            ppl = lambda ctx, tgt: E.ppl(*E.score_nll(model, ctx, tgt)[:2])  # noqa: E731
            row = {"model": name, "text": label, "bos_token": tok.bos_token, "bos_id": bos,
                   "ppl_no_context": ppl([], ids), "ppl_after_bos": ppl([bos], ids),
                   "ppl_last128": ppl(ids[:128], ids[128:]), "ppl_last128_bos": ppl([bos] + ids[:128], ids[128:])}
            rows.append(row)
            print(f"| {name} ({tok.bos_token}) | {label} | {row['ppl_no_context']:.2f} | {row['ppl_after_bos']:.2f} | "
                  f"{row['ppl_last128']:.2f} | {row['ppl_last128_bos']:.2f} |")
    if a.json_out:
        cmd = "python benchmarks/scripts/bos_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(a.json_out).write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
