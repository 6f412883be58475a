#!/usr/bin/env python
"""Does bf16 autocast train like float32? The same short run of each method twice, --mixed-precision no and bf16,
same data and seed; per step and per logged term (loss, loss_tft, loss_lc, loss_et and, where evaluated, the
held-out eval_loss), the relative difference |bf16 - float32| / |float32|.

    python scripts/precision_curves.py --pairs runs/pairs_zh.jsonl --out results/precision_curves --steps 30

Runs go to OUT/runs/METHOD-PRECISION (a finished run is skipped, so the script resumes; one trained with other
settings, by its train_config.json and the flags after `--` in METHOD-PRECISION.extra, is refused); the comparison
goes to OUT/precision_curves.json and OUT/precision_curves.md. Extra training flags after `--`.
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

TERMS = ("loss", "loss_tft", "loss_lc", "loss_et", "eval_loss")
TRAIN = os.path.join(common.REPO_DIR, "02_train_dft.py")


def finished(out):
    return os.path.exists(os.path.join(out, "model.safetensors"))


def train(method, precision, args, extra, pairs_sha256):
    out = os.path.join(args.out, "runs", f"{method}-{precision}")
    cmd = [sys.executable, TRAIN, "--pairs", args.pairs, "--out", out, "--model", args.model, "--method", method,
           "--max-steps", str(args.steps), "--mixed-precision", precision, "--lc-layer", str(args.lc_layer),
           "--et-layer", str(args.et_layer), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--lr", str(args.lr), "--seed", str(args.seed), "--log-every", "10", *extra]
    marker = out + ".extra"  # the flags after `--` it was trained with (train_config.json holds the others)
    if finished(out):
        differ = changed_settings(out, method, precision, args, pairs_sha256)
        if os.path.exists(marker) and open(marker).read() != " ".join(extra):
            differ.append(f"the flags after -- ({marker})")
        if differ:
            raise common.UserError(f"{out} was trained with another {', '.join(differ)}: give a new --out, or "
                                   f"delete {out} to train it again")
        return out
    if os.path.exists(out):
        raise common.UserError(f"{out} holds an unfinished run: delete it and rerun")
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise common.UserError(f"02_train_dft.py stopped on {method} with --mixed-precision {precision} (its "
                               "message is above); fix what it says and rerun: finished runs are kept")
    with common.atomic_open(marker) as f:
        f.write(" ".join(extra))
    return out


def changed_settings(out, method, precision, args, pairs_sha256):
    """This call's settings that the finished run in out was not trained with (its train_config.json)."""
    cfg = common.read_json(os.path.join(out, "train_config.json"))
    want = dict(method=method, mixed_precision=precision, max_steps=args.steps, batch_size=args.batch_size,
                max_length=args.max_length, lr=args.lr, seed=args.seed, lc_layer=str(args.lc_layer),
                et_layer=str(args.et_layer), pairs_sha256=pairs_sha256)
    flag = lambda key: "--pairs file" if key == "pairs_sha256" else "--" + key.replace("_", "-")  # noqa: E731
    differ = [f"{flag(k)} ({cfg.get(k)})" for k, v in want.items() if cfg.get(k) != v]
    model = str(cfg.get("model"))
    if model != args.model and not (os.path.isdir(model) and os.path.isdir(args.model)
                                    and os.path.samefile(model, args.model)):
        differ.append(f"--model ({model})")
    return differ


def compare(fp32_log, bf16_log):
    """{term: [relative difference per step]} over the steps both runs logged the term."""
    out = {}
    for term in TERMS:
        diffs = [abs(b[term] - a[term]) / abs(a[term]) for a, b in zip(fp32_log, bf16_log)
                 if a.get(term) is not None and b.get(term) is not None]
        if diffs:
            out[term] = diffs
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--methods", default="sft,tft,dft-logits,dft-feature")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lc-layer", type=int, default=6)
    p.add_argument("--et-layer", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.02, help="the target: every term within this per step")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if not os.path.isfile(args.pairs):
        raise common.UserError(f"--pairs {args.pairs}: file not found; build it with 01_build_pairs.py")
    rows, results, pairs_sha256 = [], {}, common.sha256_file(args.pairs)
    for method in common.parse_list(args.methods):
        logs = {mp: common.read_jsonl(os.path.join(train(method, mp, args, extra, pairs_sha256), "train_log.jsonl"))
                for mp in ("no", "bf16")}
        diffs = compare(logs["no"], logs["bf16"])
        seconds = {mp: sum(r["seconds"] for r in log) for mp, log in logs.items()}
        results[method] = dict(relative_difference=diffs, train_seconds=seconds)
        for term, d in diffs.items():
            worst = max(range(len(d)), key=d.__getitem__)
            rows.append(f"| {method} | {term} | {len(d)} | {100 * max(d):.2f}% (step {worst + 1}) | "
                        f"{100 * sum(d) / len(d):.2f}% | {'yes' if max(d) <= args.threshold else 'no'} |")
        rows.append(f"| {method} | step time float32 / bf16 | | {seconds['no']:.0f} s / {seconds['bf16']:.0f} s "
                    f"(bf16 takes {seconds['bf16'] / seconds['no']:.2f}x) | | |")
    header = (f"{args.model}, {args.steps} steps x batch {args.batch_size}, max length {args.max_length}, "
              f"lr {args.lr}, seed {args.seed}, i={args.lc_layer}, j={args.et_layer}; "
              f"pairs {os.path.basename(args.pairs)} "
              f"(sha256 {common.sha256_file(args.pairs)[:12]})")
    table = ("| method | term | steps | max relative difference bf16 vs float32 | mean | <= "
             f"{100 * args.threshold:.0f}% every step |\n|---|---|---|---|---|---|\n" + "\n".join(rows))
    common.write_json(os.path.join(args.out, "precision_curves.json"),
                      dict(settings=vars(args), extra_flags=extra, results=results, versions=common.versions()))
    with common.atomic_open(os.path.join(args.out, "precision_curves.md")) as f:
        f.write(header + "\n\n" + table + "\n")
    print(header + "\n\n" + table)


if __name__ == "__main__":
    common.run_main(main)
