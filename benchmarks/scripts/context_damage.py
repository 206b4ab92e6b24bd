"""What the stream *in context* does to an unrelated held-out text: the reference for the damage check
(benchmarks/retention.md, "Damage against the in-context ideal").

The retention screens measure damage as the perplexity of a held-out speech (256 tokens of 1961-Kennedy-1, no
context) under the absorbed adapters, against the base model. The adapters stand in for the stream's text in
context; so this script scores the same 256 tokens with the base model after the first L tokens of each stream
(and a paragraph break), for several L, against no context. No training: forward passes of the frozen model.

    python benchmarks/scripts/context_damage.py --speeches 3 --lengths 256,512,1024,2048,4096 \
        --json benchmarks/context_damage.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--speeches", type=int, default=3)
    ap.add_argument("--lengths", default="256,512,1024,2048,4096")
    ap.add_argument("--heldout", default="1961-Kennedy")
    ap.add_argument("--tokens", type=int, default=256, help="held-out tokens scored (the screens' 256)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", dest="json_out", required=True)
    a = ap.parse_args(argv)
    import torch

    from absorber import data
    from absorber.evaluate import score_nll
    from absorber.models import load
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load(a.model)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    held = next(s for s in data.speeches(None) if s.fileid.startswith(a.heldout))
    h = enc(held.text())[1000:1000 + a.tokens]
    sep = enc("\n\n")
    base_nll, base_n = score_nll(model, [], h)
    rows = []
    with torch.no_grad():
        for s in data.speeches("spoken")[::-1][:a.speeches]:
            ids = enc(s.text())
            for L in (int(x) for x in a.lengths.split(",")):
                if L > len(ids):
                    continue
                nll, n = score_nll(model, ids[:L] + sep + h[:1], h[1:])   # the same tokens as without context
                change = math.exp(nll / n) / math.exp(base_nll / base_n) - 1
                rows.append({"text": s.fileid, "context_tokens": L, "nll": nll, "count": n, "ppl_change": change})
                print(f"{s.fileid} L={L}: held-out PPL {math.exp(nll / n):.3f} vs {math.exp(base_nll / base_n):.3f} "
                      f"without context ({change:+.1%})", flush=True)
    Path(a.json_out).write_text(json.dumps({"command": "python benchmarks/scripts/context_damage.py "
                                            + " ".join(argv if argv is not None else sys.argv[1:]),
                                            "heldout": held.fileid, "base_nll": base_nll, "base_count": base_n,
                                            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
