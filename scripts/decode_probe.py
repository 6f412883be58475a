"""
Exploratory probe (not the benchmark): greedy decoding in float32 vs bf16, CPU time per generated token.

Used to ask whether a different decoding set-up (batch size, attention kernel) could lift MGSM's bf16
speed-up to 2x; results and the conditions they were taken under: results/bench_evaluate/README.md
(*Can decoding reach 2x?*).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/decode_probe.py --batch 16 --new-tokens 160
    OMP_NUM_THREADS=1 .venv/bin/python scripts/decode_probe.py --attn eager
    OMP_NUM_THREADS=1 .venv/bin/python scripts/decode_probe.py --new-tokens 64 --profile
"""
import argparse
import contextlib
import os
import time

import torch

from study_file import load_stage  # (it puts the repository root on sys.path)
import common  # noqa: E402

# The probe times 03's own greedy_generate (and reads MGSM with 03's _tsv), so it loads the stage by file path.
ev = load_stage("03_evaluate")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--batch", type=int, default=16, help="prompts (MGSM-zh questions) = rows per decoding step")
    p.add_argument("--new-tokens", type=int, default=160, help="tokens generated per prompt (no stop string)")
    p.add_argument("--attn", default=None, choices=["eager", "sdpa"], help="attention implementation (default: the "
                   "model's, sdpa)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    args = p.parse_args()
    if min(args.batch, args.new_tokens) < 1:
        raise common.UserError(f"--batch {args.batch} / --new-tokens {args.new_tokens}: give positive numbers")
    torch.set_num_threads(1)
    rows = ev._tsv(os.path.join(common.DATA_DIR, "mgsm", "mgsm_zh.tsv"))
    prompts = ["问题：" + question + "\n逐步解答：" for question, _ in rows[:args.batch]]
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = common.load_model_and_tokenizer(args.model, dtype=dtype)
        model.eval()
        if args.attn:
            model.set_attn_implementation(args.attn)
        never = ["@@@@"]  # a stop string that does not occur: every row generates --new-tokens
        with torch.no_grad():
            ev.greedy_generate(model, tokenizer, prompts[:2], 4, never, batch_size=args.batch)  # warm-up
            profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                        if args.profile else None)
            start = time.process_time()
            with profiler or contextlib.nullcontext():
                _, counts = ev.greedy_generate(model, tokenizer, prompts, args.new_tokens, never, batch_size=args.batch)
            seconds = time.process_time() - start
        print(f"{dtype} attn={model.config._attn_implementation} batch={args.batch} tokens={sum(counts)} "
              f"cpu_s={seconds:.2f} tokens_per_cpu_s={sum(counts) / seconds:.1f}", flush=True)
        if profiler:
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    common.run_main(main)
