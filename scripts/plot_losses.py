#!/usr/bin/env python
"""Loss curves of the replication matrix: one panel per method, loss_tft / loss_lc / loss_et per step.

    python scripts/plot_losses.py runs/replication sft tft dft-logits dft-feature --out results/loss_curves.png

Reads RUN_DIR/METHOD/train_log.jsonl (02_train_dft.py writes one line per optimizer step) and prints the
final-step loss terms per method as a markdown table (also written next to the PNG as .md).
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

TERMS = ("loss_tft", "loss_lc", "loss_et")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("methods", nargs="+")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args()
    logs = {}
    for m in args.methods:
        p = os.path.join(args.run_dir, m, "train_log.jsonl")
        if os.path.exists(p):
            logs[m] = common.read_jsonl(p)
        else:
            print(f"missing {p}, skipped")
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
    lines = ["| method | steps | " + " | ".join(TERMS) + " | loss (weighted sum) | wall s |", "|---" * (len(TERMS) + 4) + "|"]
    for m, rows in logs.items():
        last = rows[-1]
        cells = [f"{last[t]:.4f}" if last.get(t) is not None else "–" for t in TERMS]
        lines.append(f"| {m} | {last['step']} | " + " | ".join(cells) + f" | {last['loss']:.4f} | {last.get('elapsed', 0):.0f} |")
    table = "\n".join(lines) + "\n"
    with common.atomic_open(os.path.splitext(args.out)[0] + ".md") as f:
        f.write("Final optimizer step, from train_log.jsonl\n\n" + table)
    print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
