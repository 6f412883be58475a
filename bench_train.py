"""
Benchmark: the cost of one optimizer step of tft, dft-logits and dft-feature on the same batch,
next to the arithmetic cost model of DESIGN §2 (a DFT step should cost what its extra work costs).

  python bench_train.py                                  # default model, CPU, fixture pairs (tens of minutes)
  python bench_train.py --batch-size 2 --max-length 96 --repeats 1 --warmup 0 --skip-memory   # about a minute
  python bench_train.py --model meta-llama/Llama-2-7b-hf --device cuda --dtype bfloat16 --lc-layer 2 --et-layer 15

The methods are timed in one process, interleaved round by round (a busy machine slows them alike);
peak memory is measured for each method alone in a fresh process. The cost model counts
parameter FLOPs (2 x params x tokens per forward; attention's quadratic term is ignored):
  trained blocks: forward + backward = 3 x forward
  lm_head on the labelled tokens, chunks checkpointed (forward is recomputed in backward): 4 x forward
  frozen lens readout: forward + recompute + input gradient only = 3 x forward
  no-grad English pass (feature): 1 x forward of the English prompt; with gradient (mid-align trains both
  branches): 3 x forward
tft = 3 P_block L N_tft + 4 P_head n_tft; dft-logits adds 3 P_block (i N_lc + j N_et) + 3 P_head (n_lc + n_et);
dft-logits is 02's --lens-prefix recompute; dft-logits-tuned is dft-logits read through a tuned lens (--readout
tuned: one d x d translator per lens token before the head, 2 d^2 FLOPs next to the head's 2 d V: counted as
dft-logits); dft-logits-shared (02's default, --lens-prefix shared) counts in N_lc,
N_et only the padded x_en / y_en tokens after the prompt (the prompt's keys and values come from the tft pass);
dft-feature adds P_block L N_en (N: padded tokens through the blocks, n: labelled tokens through the head);
mid-align (InfoNCE at block k = L // 2, English branch trained) adds 3 P_block k N_en and a B x B similarity
matrix (B^2 d: nothing next to the blocks).
A naive implementation (full forwards with all hidden states for every sequence) costs ~2-3x tft.
Precision: float32 ("no") and bf16 autocast on float32 weights ("bf16", what 02_train_dft.py --mixed-precision
bf16 runs) are timed side by side in the same rounds (--precisions).
Results: JSON and a markdown table in --out.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import common

METHODS = ["tft", "dft-logits", "dft-logits-tuned", "dft-logits-shared", "dft-feature", "mid-align"]


def load_train_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_dft", os.path.join(common.REPO_DIR, "02_train_dft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_peak_memory(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak resident set (VmHWM)
            f.write("5")


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    if os.path.exists("/proc/self/status"):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(args, train, method, model, tokenizer):
    """The objective and batch of a method; NAME-shared is NAME with --lens-prefix shared."""
    shared = method.endswith("-shared")
    method = method[:-len("-shared")] if shared else method
    cfg = dict(train.DEFAULTS, **train.METHODS[method], method=method, max_length=args.max_length,
               lc_layer_used=args.lc_layer, et_layer_used=args.et_layer, ce_chunk=args.ce_chunk,
               lens_prefix="shared" if shared else "recompute")
    if cfg["et_layer"] == "mid":
        cfg["et_layer_used"] = common.model_parts(model).num_layers // 2
    rows = train.load_pairs(args.pairs)[:args.batch_size]
    examples, _ = train.encode_pairs(tokenizer, rows, cfg)
    batch = train.collate(examples, tokenizer.pad_token_id)
    batch = train.batch_to(batch, args.device)
    lens = None
    if cfg.get("readout") == "tuned":  # what a lens costs does not depend on its values: a random one, in memory
        d = common.model_parts(model).lm_head.weight.shape[1]
        lens = common.TunedLens(None, {k: (0.01 * torch.randn(d, d), 0.01 * torch.randn(d))
                                       for k in (args.lc_layer, args.et_layer)}, {}, None, None, True)
    return train.DFTObjective(model, cfg, lens).to(args.device).train(), batch


def load(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = common.load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def autocast(device, precision):
    """bf16 autocast as accelerate applies it for mixed_precision='bf16'; float32 otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def one_step(objective, batch, optimizer, device, precision):
    with autocast(device, precision):
        terms = objective(batch)
    terms["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_memory(args):
    """One method at one precision, alone in this process: peak memory of one optimizer step beyond the loaded model."""
    train = load_train_module()
    model, tokenizer = load(args)
    objective, batch = setup(args, train, args.method, model, tokenizer)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=0.0)
    reset_peak_memory(args.device)
    before = peak_memory_mb(args.device)
    for _ in range(2):  # the second step has AdamW's state allocated
        one_step(objective, batch, optimizer, args.device, args.precision)
    return dict(peak_mb=peak_memory_mb(args.device), before_mb=before)


def measure_times(args, methods, precisions):
    """All (precision, method) cells in one process, interleaved round by round, so a busy machine slows them alike.
    One optimizer step = forward + backward + AdamW (lr 0: the weights stay the same for every round)."""
    train = load_train_module()
    model, tokenizer = load(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    setups = {m: setup(args, train, m, model, tokenizer) for m in methods}
    cells = [(p, m) for p in precisions for m in methods]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {c: [] for c in cells}
    cpu_times = {c: [] for c in cells}
    for round_ in range(args.warmup + args.repeats):
        for precision, method in cells:
            objective, batch = setups[method]
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            one_step(objective, batch, optimizer, args.device, precision)
            sync()
            if round_ >= args.warmup:
                times[precision, method].append(time.perf_counter() - t0)
                cpu_times[precision, method].append(time.process_time() - c0)
    parts = common.model_parts(model)
    results = {}
    for precision, method in cells:
        objective, batch = setups[method]
        tokens = {k: dict(padded=int(v["input_ids"].numel()), labelled=int((v["labels"][:, 1:] != -100).sum()))
                  for k, v in batch.items() if isinstance(v, dict)}
        cfg, L = objective.cfg, parts.num_layers
        if cfg["lens_prefix"] == "shared":  # the lens passes run only the tokens after the prompt
            prompt = train.prompt_lengths(batch["tft"])
            for k in ("lc", "et"):
                if k in batch:
                    tokens[k]["continuation"] = len(prompt) * int((batch[k]["attention_mask"].sum(1) - prompt).max())
        read = [k for term in objective.terms for k in term.english_layers()]  # blocks of P(x_en) the terms read
        en_layers = L if any(term.english_last for term in objective.terms) else max(read, default=0)
        results[f"{precision}/{method}"] = dict(
            method=method, precision=precision, en_layers=en_layers,
            en_grad=cfg["feature_grad"] == "both", seconds=statistics.median(times[precision, method]),
            all_seconds=times[precision, method], cpu_seconds=statistics.median(cpu_times[precision, method]),
            all_cpu_seconds=cpu_times[precision, method], tokens=tokens, num_layers=parts.num_layers,
            block_params=sum(p.numel() for p in parts.blocks[0].parameters()), head_params=parts.lm_head.weight.numel())
    return results


def cost_model(result, lc_layer, et_layer):
    """Parameter-FLOPs of one step (arbitrary unit), as in the module docstring."""
    tok, P, H, L = result["tokens"], result["block_params"], result["head_params"], result["num_layers"]
    cost = 3 * P * L * tok["tft"]["padded"] + 4 * H * tok["tft"]["labelled"]
    if "lc" in tok:
        cost += 3 * P * lc_layer * tok["lc"].get("continuation", tok["lc"]["padded"]) + 3 * H * tok["lc"]["labelled"]
    if "et" in tok:
        cost += 3 * P * et_layer * tok["et"].get("continuation", tok["et"]["padded"]) + 3 * H * tok["et"]["labelled"]
    if "en" in tok:  # through block L (ET feature) or the highest pooled block; 3x with gradient
        cost += (3 if result["en_grad"] else 1) * P * result["en_layers"] * tok["en"]["padded"]
    return cost


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("workload")
    g.add_argument("--model", default=common.DEFAULT_MODEL)
    g.add_argument("--pairs", default=os.path.join(common.REPO_DIR, "tests", "fixtures", "pairs_zh.jsonl"))
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-length", type=int, default=256)
    g.add_argument("--lc-layer", type=int, default=4, help="block i (default 4)")
    g.add_argument("--et-layer", type=int, default=15, help="block j (default 15)")
    g.add_argument("--ce-chunk", type=int, default=1024)
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights (default float32)")
    g.add_argument("--precisions", default="no,bf16",
                   help="compute precisions timed side by side: no (float32), bf16 (autocast on the weights)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default); with 1 on a CPU the ratios use process time, "
                        "robust to other jobs")
    g.add_argument("--grad-checkpointing", action="store_true")
    g = p.add_argument_group("measurement")
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--repeats", type=int, default=5, help="timed rounds (each times every method once)")
    g.add_argument("--methods", default=",".join(METHODS))
    g.add_argument("--out", default="runs/bench_train")
    g.add_argument("--skip-memory", action="store_true", help="skip the peak-memory runs (one fresh process per cell)")
    g.add_argument("--method", help=argparse.SUPPRESS)  # internal: measure one method in this process
    g.add_argument("--precision", default="no", help=argparse.SUPPRESS)  # internal: with --method
    args = p.parse_args()

    if args.method:
        print("RESULT " + json.dumps(measure_memory(args)), flush=True)
        return
    methods = common.parse_list(args.methods)
    if "tft" not in methods or set(methods) - set(METHODS):
        raise common.UserError(f"--methods {args.methods}: pick from {', '.join(METHODS)}, tft among them (every "
                               "ratio is to tft)")
    if args.repeats < 1 or args.warmup < 0:
        raise common.UserError(f"--repeats {args.repeats} / --warmup {args.warmup}: time at least one round")
    if args.batch_size < 1 or args.threads < 0:
        raise common.UserError(f"--batch-size {args.batch_size} / --threads {args.threads}: give a batch of at least "
                               "1 and 0 threads (torch's default) or more")
    if not common.existing_path(args.pairs):
        raise common.UserError(f"--pairs {args.pairs}: file not found; build it with 01_build_pairs.py")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise common.UserError(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    precisions = common.parse_list(args.precisions)
    if not precisions or set(precisions) - {"no", "bf16"}:
        raise common.UserError(f"--precisions takes no and/or bf16, got {args.precisions!r}")
    results = measure_times(args, methods, precisions)
    for key, r in results.items():  # memory: each cell alone in a fresh process
        if args.skip_memory:
            r.update(peak_mb=float("nan"), before_mb=float("nan"))
            continue
        cmd = [sys.executable, __file__, *sys.argv[1:], "--method", r["method"], "--precision", r["precision"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            raise common.UserError(f"{key} failed:\n{proc.stderr[-2000:]}")
        r.update(json.loads(line[0][len("RESULT "):]))
        print(f"{key}: {r['seconds']:.3f}s/step, peak {r['peak_mb']:.0f} MB", flush=True)
    # on a CPU, process time of one thread counts the work even when other jobs share the cores
    clock = "cpu_seconds" if args.device == "cpu" and args.threads == 1 else "seconds"
    rows = []
    for key, r in results.items():
        base = results[f"{r['precision']}/tft"]
        measured = r[clock] / base[clock]
        model = cost_model(r, args.lc_layer, args.et_layer) / cost_model(base, args.lc_layer, args.et_layer)
        fp32 = results.get(f"no/{r['method']}")
        r.update(ratio_measured=measured, ratio_model=model, over_model=measured / model - 1,
                 vs_float32=r[clock] / fp32[clock] if fp32 else None)
        rows.append(f"| {r['method']} | {r['precision']} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | "
                    + (f"{r['vs_float32']:.2f}" if fp32 else "–")
                    + f" | {measured:.2f} | {model:.2f} | {100 * r['over_model']:+.0f}% | "
                    f"{r['peak_mb']:.0f} ({r['peak_mb'] - r['before_mb']:+.0f}) |")
    table = (f"| method | precision | wall s/step | CPU s/step | step / float32 step ({clock}) | measured / tft | "
             "cost model / tft | measured vs model | peak MB (step) |\n|---|---|---|---|---|---|---|---|---|\n"
             + "\n".join(rows))
    header = (f"model {args.model}, {args.device}, weights {args.dtype}, batch {args.batch_size}, max length "
              f"{args.max_length}, i={args.lc_layer}, j={args.et_layer}, "
              f"L={results[f'{precisions[0]}/tft']['num_layers']}, {args.threads or 'default'} thread(s), "
              f"median of {args.repeats} steps; precisions interleaved in each round")
    os.makedirs(args.out, exist_ok=True)
    common.write_json(os.path.join(args.out, "bench_train.json"), dict(settings=vars(args), results=results,
                                                                     versions=common.versions()))
    with common.atomic_open(os.path.join(args.out, "bench_train.md")) as f:
        f.write(header + "\n\n" + table + "\n")
    print("\n" + header + "\n\n" + table)


if __name__ == "__main__":
    common.run_main(main)
