#!/usr/bin/env python
r"""Loss curves of the replication matrix: one panel per method, loss_tft / loss_lc / loss_et per step.

    python scripts/plot_losses.py runs/replication sft tft dft-logits dft-feature --out results/loss_curves.png

Reads RUN_DIR/METHOD/train_log.jsonl (02_train_dft.py writes one line per optimizer step) and prints the
final-step loss terms per method as a markdown table (also written next to the PNG as .md).

    python scripts/plot_losses.py runs/replication_gemma tft-s1 dft-logits-w1-s1 ... --heldout \
        --out results/gemma3/loss_curves.png

--heldout: the held-out curves instead (02_train_dft.py --eval-pairs: eval_loss_tft per evaluated step), all
runs in one panel, one colour per run group (name without its -sSEED suffix), one line style per seed; a
second panel gives the training loss_tft (a 10-step moving mean). The table then lists the last held-out terms.
"""
import re
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

TERMS = ("loss_tft", "loss_lc", "loss_et")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="folder holding one folder per run (02_train_dft.py --out)")
    ap.add_argument("methods", nargs="+", help="the runs' folder names in RUN_DIR")
    ap.add_argument("--out", required=True, help="PNG path (its table goes beside it as .md)")
    ap.add_argument("--heldout", action="store_true", help="held-out curves of every run in one figure")
    args = ap.parse_args(argv)
    if not args.out.endswith(".png"):
        raise common.UserError(f"--out {args.out}: give a .png path (the table is written beside it as .md)")
    logs = {}
    for m in args.methods:
        p = os.path.join(args.run_dir, m, "train_log.jsonl")
        if not common.existing_path(p):  # results/ keeps it gzipped
            if not os.path.isdir(args.run_dir):
                raise common.UserError(f"no training log {p}(.gz): {args.run_dir} does not exist")
            runs = sorted(d for d in os.listdir(args.run_dir)
                          if common.existing_path(os.path.join(args.run_dir, d, "train_log.jsonl")))
            raise common.UserError(f"no training log {p}(.gz): " + (f"the runs in {args.run_dir} are {', '.join(runs)}"
                                   if runs else f"{args.run_dir} holds no run of 02_train_dft.py"))
        logs[m] = common.read_jsonl(p)
        if not logs[m]:
            raise common.UserError(f"{p} is empty: the run logged no optimizer step yet")
    if args.heldout:
        return heldout(logs, args.out)
    fig, axes = plt.subplots(1, len(logs), figsize=(4.2 * len(logs), 3.4), squeeze=False)
    for ax, (m, rows) in zip(axes[0], logs.items()):
        for t in TERMS:
            pts = [(r["step"], r[t]) for r in rows if r.get(t) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=t)
        ax.set_title(m)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss (nats/token; feature: 1 - cos)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    lines = ["| method | steps | " + " | ".join(TERMS) + " | loss (weighted sum) | training s |",
             "|---" * (len(TERMS) + 4) + "|"]
    for m, rows in logs.items():
        last = rows[-1]
        cells = [f"{last[t]:.4f}" if last.get(t) is not None else "–" for t in TERMS]
        lines.append(f"| {m} | {last['step']} | " + " | ".join(cells)
                     + f" | {last['loss']:.4f} | {busy_seconds(rows):.0f} |")
    table = "\n".join(lines) + "\n"
    with common.atomic_open(os.path.splitext(args.out)[0] + ".md") as f:
        f.write("Final optimizer step, from train_log.jsonl; training s: the logged optimizer-step and held-out "
                "seconds\n\n" + table)
    print(table)
    print(f"wrote {args.out}")


def busy_seconds(rows):
    """Logged optimizer-step plus held-out-evaluation seconds: unlike `elapsed`, it survives --resume (which
    restarts the clock); model loading and checkpoint saves are not in it."""
    return sum(r.get("seconds", 0) + (r.get("eval_seconds") or 0) for r in rows)


def heldout(logs, out):
    groups = list(dict.fromkeys(re.sub(r"-s\d+$", "", m) for m in logs))  # run names without -sSEED, in order
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, rows in logs.items():
        g = re.sub(r"-s\d+$", "", m)
        seed = re.search(r"-s(\d+)$", m)
        color, ls = f"C{groups.index(g)}", styles[(int(seed.group(1)) - 1) % 4 if seed else 0]
        pts = [(r["step"], r["eval_loss_tft"]) for r in rows if r.get("eval_loss_tft") is not None]
        if pts:
            axes[0].plot(*zip(*pts), color=color, ls=ls, marker="o", ms=3, label=m)
        tr = [r["loss_tft"] for r in rows]
        smooth = [sum(tr[max(0, i - 9):i + 1]) / len(tr[max(0, i - 9):i + 1]) for i in range(len(tr))]
        axes[1].plot([r["step"] for r in rows], smooth, color=color, ls=ls, label=m)
    axes[0].set(title="held-out L_TFT (dev pairs, no gradient)", xlabel="optimizer step", ylabel="nats/token")
    axes[1].set(title="training L_TFT (10-step moving mean)", xlabel="optimizer step")
    if not axes[0].lines:  # no run was trained with --eval-pairs
        axes[0].text(0.5, 0.5, "no held-out evaluation\n(02_train_dft.py --eval-pairs)", ha="center", va="center",
                     transform=axes[0].transAxes)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    keys = ("eval_loss_tft", "eval_loss_lc", "eval_loss_et")
    lines = ["| run | steps | last held-out step | " + " | ".join(keys) + " | training s |",
             "|---" * (len(keys) + 4) + "|"]
    for m, rows in logs.items():
        ev = [r for r in rows if r.get("eval_loss_tft") is not None]
        last = ev[-1] if ev else {}
        cells = [f"{last[k]:.4f}" if last.get(k) is not None else "–" for k in keys]
        lines.append(f"| {m} | {rows[-1]['step']} | {last.get('step', '–')} | " + " | ".join(cells)
                     + f" | {busy_seconds(rows):.0f} |")
    table = "\n".join(lines) + "\n"
    with common.atomic_open(os.path.splitext(out)[0] + ".md") as f:
        f.write("Held-out terms at the last evaluated step, from train_log.jsonl; training s: the logged "
                "optimizer-step and held-out seconds (model loading and checkpoint saves excluded)\n\n" + table)
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run_main(main)
