#!/usr/bin/env python
r"""Which tokens the logit lens puts first at one block: the commonest lens top-1 tokens on zh dev sentences.

    python scripts/lens_top_tokens.py runs/replication_gemma/tft-s1 runs/replication_gemma/dft-logits-w1-s1 \
        --pairs runs/replication_gemma/pairs_zh.dev.jsonl --block 8 --n 40 > results/gemma3/layers/top_tokens_block8.md

Exploratory: it names the "neither English nor zh" tokens of the mechanism tables. Positions
are every token of x_tgt, as in 03_evaluate.py --analysis layers (same lens, same right padding).
"""
import argparse
import collections
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model folders (or hub names)")
    ap.add_argument("--pairs", required=True, help="pairs JSONL (x_tgt is read)")
    ap.add_argument("--block", type=int, default=8, help="block k (1-based, as in the layer analysis)")
    ap.add_argument("--n", type=int, default=40, help="first N sentences")
    ap.add_argument("--top", type=int, default=12, help="tokens listed per model")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    if min(args.n, args.top) < 1:
        raise common.UserError(f"--n {args.n} / --top {args.top}: give positive numbers")
    texts = [r["x_tgt"] for r in common.read_jsonl(args.pairs)][:args.n]
    rows = []  # printed once every model has run: a failure leaves no half table
    for path in args.models:
        with contextlib.redirect_stdout(sys.stderr):  # the loader's notes stay out of the table
            model, tok = common.load_model_and_tokenizer(path, args.dtype, "cpu", padding_side="right")
        parts = common.model_parts(model.eval())
        if not 1 <= args.block <= len(parts.blocks):
            raise common.UserError(f"--block {args.block}: {path} has blocks 1 to {len(parts.blocks)}")
        counts = collections.Counter()
        with torch.no_grad():
            for i in range(0, len(texts), 8):
                enc = tok(texts[i:i + 8], return_tensors="pt", padding=True, truncation=True, max_length=128)
                mask = enc.attention_mask.bool()
                with common.capture_blocks(parts, [args.block]) as captured:
                    parts.backbone(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
                counts.update(common.lens_logits(parts, captured[args.block][mask]).float().argmax(-1).tolist())
        n = sum(counts.values())
        listed = ", ".join(f"`{json.dumps(tok.decode([t]), ensure_ascii=False)}` {c / n:.3f}"
                           for t, c in counts.most_common(args.top))
        rows.append(f"| {os.path.basename(path.rstrip('/'))} | {n} | {listed} |")
    print(f"Lens top-1 tokens at block {args.block}, first {len(texts)} sentences of {args.pairs} ({args.dtype})\n")
    print("| model | positions | commonest top-1 tokens (share of positions) |\n|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    common.run_main(main)
