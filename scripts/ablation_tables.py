#!/usr/bin/env python
"""Tables and figures of the pre-registered ablations (results/README.md, "Why DFT hurts at 270M").

    python scripts/ablation_tables.py                                  # -> results/gemma3/ablations/tables.md, ...
    python scripts/ablation_tables.py --check-base runs/ablations/eval  # base re-evaluated today == the replication's?

Every number is a linear contrast of runs, e.g. question 1's
    delta = (f300_1 - t300_1 + f300_2 - t300_2) / 2 - (f100_1 - t100_1 + f100_2 - t100_2) / 2,
bootstrapped over items with ONE draw per resample shared by every run in the contrast (numpy, 10,000
resamples, seed 1234): each run's statistic on the drawn items (NLL: summed NLL / summed tokens; accuracy:
mean; the NLU average: items drawn within each of the four tasks, the task means averaged), then the
contrast. Two-sided p by common.paired_bootstrap's rule (null-centred, +1 correction); 95% percentile
interval. The 100-step runs are the replication's committed per-item files (results/gemma3/eval), the new
runs are in results/gemma3/ablations/eval. A contrast whose runs are not all evaluated yet is left out.
"""
import argparse
import gzip
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_seeds as cs  # noqa: E402  (per-item cells and the multinomial draws of the replication's tables)
import common  # noqa: E402  (compare_seeds put the repository root on sys.path)

REPO = cs.REPO
REPL = os.path.join(REPO, "results", "gemma3")
ABL = os.path.join(REPL, "ablations")
PRIMARY = [m for m in cs.MEASURES if m[0] in ("nll_zh", "nll_en", "nlu")]
CONFIRMATORY = ("nll_zh", "nlu")  # question 1's two tests (Holm over these two); NLL en is descriptive
BASE_CELLS = [("nll", "zh"), ("nll", "en"), ("xnli", "zh"), ("xcopa", "zh"), ("xstorycloze", "zh"), ("mmlu", "zh")]
# Base's committed NLL cells were scored before the NLL scoring change every trained run's NLL was scored after
# (float32 logsumexp in blocks, commit a86928b), and base enters no contrast: reported, not gated (Amendment 1).
NOT_GATED = {("nll", "zh"), ("nll", "en")}
NOT_GATED_WHY = """\
Why the NLL cells differ (checked 2026-12-01 21:27 UTC, before any ablation run was evaluated): base's NLL
cells were scored in the replication's second launch (2026-11-30, 01:57–02:17 UTC), before commit a86928b
(02:26: log p(target) as logit − logsumexp in float32 over blocks of 8 rows, instead of a bf16 log-softmax).
Re-running base's NLL zh with the code of commit 6be1013 (the last before a86928b; same settings: bf16,
batch 16, one thread, the same 194 dev pairs) reproduces the committed `base.nll.zh.jsonl.gz` exactly
(194/194 rows identical, max |Δ nll_sum| 0.0). Today's code differs from it by at most 0.0019 nats per item
sum (zh) and 0.0038 (en). Every trained run of the replication (tft, dft-*, mid-align) was evaluated after
a86928b (tft-s1's training ended at 03:10), so the 100-step comparison cells were scored by the same NLL code as
today's; the four log-likelihood cells are bit-identical."""
OLD, NEW, AMX = "old", "new", "amx"  # where a run's files are: the replication (100 steps), this study, or the
# AMX CPU's copies of what launch 10 re-ran on another CPU (Amendment 3)
# Trained and evaluated in launch 10 on a CPU with AVX512-BF16 but no AMX (the others: the AMX CPU); base
# re-evaluated there too. Their contrasts with the AMX-made cells carry the machine difference (Amendment 3).
OTHER_CPU = ("et-only-feature-s1", "dft-feature-j4-s1", "dft-feature-j14-s1")

QUESTION2 = [  # (label, run in this study or the replication, folder)
    ("L_LC only, logits (w 0.1)", "lc-only-logits-s1", NEW),
    ("L_ET only, logits (w 0.1)", "et-only-logits-s1", NEW),
    ("both, logits (w 0.1): dft-logits-wsmall", "dft-logits-wsmall-s1", OLD),
    ("L_LC only, feature (w 1)", "lc-only-feature-s1", NEW),
    ("L_ET only, feature (w 1)", "et-only-feature-s1", NEW),
    ("both, feature (w 1): dft-feature-w1", "dft-feature-w1-s1", OLD),
]
QUESTION3 = [(4, "dft-feature-j4-s1", NEW), (8, "dft-feature-w1-s1", OLD), (14, "dft-feature-j14-s1", NEW)]


def folder_of(where):
    return os.path.join({OLD: REPL, NEW: ABL, AMX: os.path.join(ABL, "amx")}[where], "eval")


def contrast(terms, measure, resamples=cs.B, seed=cs.SEED):
    """terms: [(where, run, coefficient)] -> dict(delta, lo, hi, p, n) or None while a run is missing."""
    _, _, cells, kind = measure
    loaded = []
    for where, run, coef in terms:
        rows = [cs.read_items(folder_of(where), run, task, lang) for task, lang in cells]
        if any(r is None for r in rows):
            return None
        loaded.append(([cs.Cell(r, kind) for r in rows], coef))
    rng = np.random.default_rng(seed)
    boot, full, ns = 0.0, 0.0, []
    for k in range(len(cells)):
        shared = set(loaded[0][0][k].ids)
        for run_cells, _ in loaded:
            shared &= set(run_cells[k].ids)
        ids = [i for i in loaded[0][0][k].ids if i in shared]
        for run_cells, _ in loaded:
            run_cells[k].reorder(ids)
        counts = cs.counts_matrix(rng, len(ids), resamples)
        ones = np.ones((1, len(ids)))
        boot = boot + sum(coef * run_cells[k].stat(counts) for run_cells, coef in loaded) / len(cells)
        full = full + sum(coef * run_cells[k].stat(ones)[0] for run_cells, coef in loaded) / len(cells)
        ns.append(len(ids))
    p = (np.sum(np.abs(boot - full) >= abs(full) - 1e-12) + 1) / (resamples + 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(delta=float(full), lo=float(lo), hi=float(hi), p=float(p), n=ns)


def penalty(steps, seeds):
    """dft-feature - tft, seeds averaged, as contrast terms."""
    name = (lambda g, s: f"{g}-300-s{s}") if steps == 300 else (lambda g, s: f"{g}-s{s}")
    where = NEW if steps == 300 else OLD
    feature = "dft-feature" if steps == 300 else "dft-feature-w1"
    w = 1 / len(seeds)
    return [t for s in seeds for t in ((where, name(feature, s), w), (where, name("tft", s), -w))]


def placebo():
    """The seed placebo: the dft-feature penalty at seed 2 minus at seed 1, both 100 steps (true change zero)."""
    return penalty(100, [2]) + scale(penalty(100, [1]), -1)


def scale(terms, c):
    return [(w, r, c * coef) for w, r, coef in terms]


def fmt(x, kind):
    return "–" if x is None else (f"{x:+.4f}" if kind == "ratio" else f"{x:+.2f}")


def score_text(x, kind):
    return f"{x:.4f}" if kind == "ratio" else f"{x:.2f}"


def held_out_curve(log):
    """{step: held-out L_TFT} of a train_log.jsonl ({} if it does not exist)."""
    if not common.existing_path(log):
        return {}
    rows = common.read_jsonl(log)
    return {r["step"]: r["eval_loss_tft"] for r in rows if r.get("eval_loss_tft") is not None}


def interval(r, kind):
    return f"[{fmt(r['lo'], kind)}, {fmt(r['hi'], kind)}]"


def question1(out):
    delta_terms = penalty(300, [1, 2]) + scale(penalty(100, [1, 2]), -1)
    rows = []
    for m in PRIMARY:
        key, label, _, kind = m
        rows.append(dict(measure=key, label=label, kind=kind, pen100=contrast(penalty(100, [1, 2]), m),
                         pen300=contrast(penalty(300, [1, 2]), m), delta=contrast(delta_terms, m),
                         placebo=contrast(placebo(), m)))
    tests = [r for r in rows if r["measure"] in CONFIRMATORY and r["delta"] is not None]
    for r, (p_holm, _) in zip(tests, common.holm([r["delta"]["p"] for r in tests])):
        r["p_holm"] = p_holm
    out.append("### Question 1: budget (dft-feature − tft at 300 vs at 100 steps, seeds 1 and 2 pooled)\n")
    out.append("Δ = penalty at 300 − penalty at 100 (penalty = dft-feature − tft, seeds averaged); one item draw "
               "per resample shared by all eight runs. Holm over NLL zh and NLU avg; NLL en descriptive. "
               "Claimed only if Holm p < 0.05, the interval excludes 0 and |Δ| > |placebo|. NLU avg: minimum "
               "detectable change ≈ 1.1–1.2 points.\n")
    out.append("| measure | penalty at 100 | penalty at 300 | Δ | 95% interval | p | p (Holm) | placebo Δ [95%] | "
               "claim |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k, d, pl = r["kind"], r["delta"], r["placebo"]
        if d is None:
            claim = "not yet run"
        elif r["measure"] not in CONFIRMATORY:
            claim = "descriptive"
        else:
            hit = r["p_holm"] < 0.05 and (d["lo"] > 0 or d["hi"] < 0) and abs(d["delta"]) > abs(pl["delta"])
            shrink = (d["delta"] < 0) == (r["pen100"]["delta"] > 0)
            claim = ("yes: the penalty " + ("shrinks" if shrink else "grows")) if hit else (
                "no change detected" + (" (below the minimum detectable change)" if k == "mean" else ""))
        pen300 = r["pen300"]["delta"] if r["pen300"] else None
        cells = [r["label"], fmt(r["pen100"]["delta"], k), fmt(pen300, k), fmt(d["delta"] if d else None, k),
                 interval(d, k) if d else "–", f"{d['p']:.4f}" if d else "–",
                 f"{r['p_holm']:.4f}" if "p_holm" in r else "–", f"{fmt(pl['delta'], k)} {interval(pl, k)}", claim]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    per_seed(out)
    return rows


def per_seed(out):
    """Each seed's Δ alone, and what the longer budget does to tft itself: descriptive (whether the seeds agree,
    a reading while seed 2 runs); the pre-registered test is the pooled row above."""
    out.append("Per seed (descriptive; not the pre-registered test, which pools the seeds):\n")
    out.append("| measure | seed | tft: 300 − 100 steps [95%] | penalty at 100 | penalty at 300 | Δ | 95% interval | p |")
    out.append("|---|---|---|---|---|---|---|---|")
    for m in PRIMARY:
        _, label, _, kind = m
        for seed in (1, 2):
            pen100, pen300 = contrast(penalty(100, [seed]), m), contrast(penalty(300, [seed]), m)
            d = contrast(penalty(300, [seed]) + scale(penalty(100, [seed]), -1), m)
            tft = contrast([(NEW, f"tft-300-s{seed}", 1.0), (OLD, f"tft-s{seed}", -1.0)], m)
            cells = [label, str(seed), f"{fmt(tft['delta'], kind)} {interval(tft, kind)}" if tft else "–",
                     fmt(pen100 and pen100["delta"], kind), fmt(pen300 and pen300["delta"], kind),
                     fmt(d["delta"], kind) if d else "not yet run", interval(d, kind) if d else "",
                     f"{d['p']:.4f}" if d else ""]
            out.append("| " + " | ".join(cells) + " |")
    out.append("")


def versus_tft(title, entries, spread, out):
    out.append(title + "\n")
    out.append("| run | measure | tft-s1 | run | run − tft-s1 | 95% interval | p | items |")
    out.append("|---|---|---|---|---|---|---|---|")
    rows = []
    for label, run, where in entries:
        label += " (other CPU)" if run in OTHER_CPU else ""
        for m in PRIMARY:
            key, mlabel, _, kind = m
            r = contrast([(where, run, 1.0), (OLD, "tft-s1", -1.0)], m)
            a, b = run_score(OLD, "tft-s1", m), run_score(where, run, m)
            rows.append(dict(run=run, label=label, measure=key, result=r, tft=a and a[0], score=b and b[0]))
            if r is None:
                out.append(f"| {label} | {mlabel} | – | – | not yet run | | | |")
                continue
            s = (lambda x: f"{x:.3f}") if kind == "ratio" else (lambda x: f"{x:.2f}")
            out.append(f"| {label} | {mlabel} | {s(a[0])} | {s(b[0])} | {fmt(r['delta'], kind)} | "
                       f"{interval(r, kind)} | {r['p']:.4f} | {'+'.join(map(str, r['n']))} |")
    out.append(f"Read against (100 steps, the replication's runs): {spread}.\n")
    return rows


def seed_spread():
    """What seeds alone move, per primary measure: the placebo and tft-s2 - tft-s1, as one line of text."""
    tft_terms = [(OLD, "tft-s2", 1.0), (OLD, "tft-s1", -1.0)]
    parts = []
    for m in PRIMARY:
        _, label, _, kind = m
        pl, tf = contrast(placebo(), m), contrast(tft_terms, m)
        parts.append(f"{label}: placebo {fmt(pl['delta'], kind)} {interval(pl, kind)}, "
                     f"tft-s2 − tft-s1 {fmt(tf['delta'], kind)} {interval(tf, kind)}")
    return "; ".join(parts)


def plot_curves(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for where, run, style in [(OLD, "tft-s1", "C0--"), (OLD, "tft-s2", "C0:"), (OLD, "dft-feature-w1-s1", "C1--"),
                              (OLD, "dft-feature-w1-s2", "C1:"), (NEW, "tft-300-s1", "C0-"),
                              (NEW, "tft-300-s2", "C0-."),
                              (NEW, "dft-feature-300-s1", "C1-"), (NEW, "dft-feature-300-s2", "C1-.")]:
        log = os.path.join(REPL if where == OLD else ABL, "train", run, "train_log.jsonl")
        pts = sorted(held_out_curve(log).items())
        if pts:
            ax.plot(*zip(*pts), style, marker="o", ms=3, lw=2 if where == NEW else 1.2,
                    label=run if where == NEW else f"{run} (100 steps)")
            drawn += 1
    ax.set_xlabel("optimizer step (batch 8)")
    ax.set_ylabel("held-out L_TFT (first 64 dev pairs, nats/token)")
    ax.set_title("Gemma-3-270M: 100-step vs 300-step runs")
    ax.legend(fontsize=8, ncol=2, handlelength=3.5)  # long enough to tell the dash patterns apart
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_layer_sweep(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    measures = [("nll_zh", "NLL zh penalty (nats/token)"), ("nlu", "NLU avg penalty (points)")]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, (key, label) in zip(axes, measures):
        pts = [(j, r["result"]) for j, run, _ in QUESTION3 for r in rows
               if r["run"] == run and r["measure"] == key and r["result"] is not None]
        if pts:
            js = [j for j, _ in pts]
            d = np.array([r["delta"] for _, r in pts])
            err = np.array([[r["delta"] - r["lo"] for _, r in pts], [r["hi"] - r["delta"] for _, r in pts]])
            ax.errorbar(js, d, yerr=err, fmt="o-", capsize=3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("ET block j (i = 2; 18 blocks)")
        ax.set_title(label, fontsize=9)
    fig.suptitle("dft-feature − tft-s1 against j (100 steps, seed 1; 95% intervals)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SCORED = [(OLD, "base"), (OLD, "tft-s1"), (OLD, "tft-s2"), (OLD, "dft-feature-w1-s1"), (OLD, "dft-feature-w1-s2"),
          (OLD, "dft-logits-wsmall-s1"), (NEW, "tft-300-s1"), (NEW, "tft-300-s2"), (NEW, "dft-feature-300-s1"),
          (NEW, "dft-feature-300-s2")] + [(NEW, run) for _, run, where in QUESTION2 + QUESTION3 if where == NEW]
SEED_GROUPS = [("tft, 100 steps", OLD, "tft"), ("dft-feature, 100 steps", OLD, "dft-feature-w1"),
               ("tft, 300 steps", NEW, "tft-300"), ("dft-feature, 300 steps", NEW, "dft-feature-300")]


def run_score(where, run, measure):
    """(score, item standard error) of one run on a primary measure, or None while it is not evaluated. NLU avg: the
    four task means averaged, its SE from the four tasks' item SEs (disjoint items: sqrt(sum se^2) / 4)."""
    _, _, cells, kind = measure
    path = os.path.join(folder_of(where), run + ".json")
    rows = [cs.read_items(folder_of(where), run, task, lang) for task, lang in cells]
    if not os.path.exists(path) or any(r is None for r in rows):
        return None
    results = json.load(open(path, encoding="utf-8"))["results"]
    ses = [results[task][lang]["stderr"] * (100.0 if kind == "mean" else 1.0) for task, lang in cells]
    value = np.mean([cs.Cell(r, kind).stat(np.ones((1, len(r))))[0] for r in rows])
    return float(value), float(np.sqrt(np.sum(np.square(ses))) / len(cells))


def scores(out):
    out.append("### Scores (primary measures; ± item standard error, seed groups ± standard error over seeds)\n")
    out.append("100-step runs: the replication's files (`results/gemma3/eval`); the rest: this study. A seed group's "
               "± is sd / sqrt(k) over its k = 2 seeds (with k = 2 that is half their difference).\n")
    out.append("| run | " + " | ".join(m[1] for m in PRIMARY) + " |")
    out.append("|---|" + "---|" * len(PRIMARY))
    for where, run in SCORED:
        got = [run_score(where, run, m) for m in PRIMARY]
        cells = ["–" if g is None else f"{score_text(g[0], m[3])} ± {score_text(g[1], m[3])}"
                 for g, m in zip(got, PRIMARY)]
        note = "" if where == NEW else " (no training)" if run == "base" else " (100 steps)"
        out.append(f"| {run}{note} | " + " | ".join(cells) + " |")
    for label, where, group in SEED_GROUPS:
        cells = []
        for m in PRIMARY:
            s = lambda x: score_text(x, m[3])  # noqa: E731
            got = [run_score(where, f"{group}-s{seed}", m) for seed in (1, 2)]
            vals = [g[0] for g in got if g is not None]
            cells.append("–" if len(vals) < 2 else f"{s(np.mean(vals))} ± {s(np.std(vals, ddof=1) / np.sqrt(2))}")
        out.append(f"| **{label}**, seeds 1 and 2 | " + " | ".join(cells) + " |")
    out.append("")


def additivity(out):
    """Do the two terms' effects add up? both − LC only − ET only + tft-s1 (0 if they add), paired bootstrap.
    Descriptive and not pre-registered (a reading of question 2's own runs)."""
    out.append("Additivity (descriptive, not pre-registered): interaction = both − L_LC only − L_ET only + tft-s1 "
               "(0 if the single-term effects add up; negative NLL / positive NLU: the pair costs less than the sum)."
               "\n")
    out.append("| signal | measure | interaction | 95% interval | p |")
    out.append("|---|---|---|---|---|")
    for signal, both in (("logits", "dft-logits-wsmall-s1"), ("feature", "dft-feature-w1-s1")):
        for m in PRIMARY:
            _, label, _, kind = m
            r = contrast([(OLD, both, 1.0), (NEW, f"lc-only-{signal}-s1", -1.0), (NEW, f"et-only-{signal}-s1", -1.0),
                          (OLD, "tft-s1", 1.0)], m)
            out.append(f"| {signal} | {label} | " + ("not yet run | | |" if r is None else
                       f"{fmt(r['delta'], kind)} | {interval(r, kind)} | {r['p']:.4f} |"))
    out.append("")


def machine_difference(out):
    """Amendment 3: what the other CPU alone changes. Base evaluated on both (no training), and et-only-feature-s1
    trained on both with the same command, data and seed (held-out L_TFT every 20 steps)."""
    if not os.path.isdir(os.path.join(ABL, "amx")):
        return
    out.append("### Machine difference (Amendment 3): the other CPU (AVX512-BF16, no AMX) − the AMX CPU\n")
    here, amx = (json.load(open(os.path.join(folder_of(w), "base.json"))) for w in (NEW, AMX))
    if here == amx:
        out.append("Base in `eval/` is still the AMX CPU's (not yet re-evaluated on the other CPU).\n")
    else:
        out.append("Base (no training), evaluated on both with the same command; paired bootstrap over items:\n")
        out.append("| measure | AMX CPU | other CPU | other − AMX | 95% interval | p |")
        out.append("|---|---|---|---|---|---|")
        for m in PRIMARY:
            _, label, _, kind = m
            r = contrast([(NEW, "base", 1.0), (AMX, "base", -1.0)], m)
            a, b = run_score(AMX, "base", m), run_score(NEW, "base", m)
            out.append(f"| {label} | {score_text(a[0], kind)} | {score_text(b[0], kind)} | {fmt(r['delta'], kind)} | {interval(r, kind)} | "
                       f"{r['p']:.4f} |")
        out.append("")
    curves = [held_out_curve(os.path.join(folder, "et-only-feature-s1", "train_log.jsonl"))
              for folder in (os.path.join(ABL, "amx", "train"), os.path.join(ABL, "train"))]
    if curves[0] != curves[1] and curves[1]:
        out.append("et-only-feature-s1 trained on both (held-out L_TFT, first 64 dev pairs, nats/token):\n")
        out.append("| step | AMX CPU | other CPU | other − AMX |")
        out.append("|---|---|---|---|")
        for step in sorted(set(curves[0]) & set(curves[1])):
            a, b = curves[0][step], curves[1][step]
            out.append(f"| {step} | {a:.5f} | {b:.5f} | {b - a:+.5f} |")
        out.append("")


def wall_times(out):
    out.append("### Wall time per run (this study)\n")
    out.append("| run | steps | training s (sum of step times) | held-out eval s | evaluation s (primary cells) |")
    out.append("|---|---|---|---|---|")
    train_dir = os.path.join(ABL, "train")
    for run in sorted(os.listdir(train_dir)) if os.path.isdir(train_dir) else []:
        log = common.read_jsonl(os.path.join(train_dir, run, "train_log.jsonl"))
        ev = os.path.join(ABL, "eval", run + ".json")
        ev_s = None
        if os.path.exists(ev):
            res = json.load(open(ev))["results"]
            ev_s = sum(res[t][lang]["seconds"] for t, lang in BASE_CELLS if lang in res.get(t, {}))
        where = " (other CPU)" if run in OTHER_CPU else ""
        out.append(f"| {run}{where} | {log[-1]['step']} | {sum(r['seconds'] for r in log):.0f} | "
                   f"{sum(r.get('eval_seconds') or 0 for r in log):.0f} | {'–' if ev_s is None else f'{ev_s:.0f}'} |")
    out.append("")


def check_base(new_dir, report):
    """Compare base's per-item files of today's evaluation with the replication's, field by field."""
    lines, ok = ["# Base re-evaluated with today's code vs the replication's files\n",
                 f"new: `{new_dir}`; old: `results/gemma3/eval/` (the primary cells)\n",
                 "| cell | items | identical rows | same predictions | max abs diff of numbers | equal |",
                 "|---|---|---|---|---|---|"], True
    for task, lang in BASE_CELLS:
        old = cs.read_items(os.path.join(REPL, "eval"), "base", task, lang)
        new = cs.read_items(new_dir, "base", task, lang)
        if new is None:
            lines.append(f"| {task} {lang} | – | missing | | | no |")
            ok = False
            continue
        same_rows = sum(a == b for a, b in zip(old, new))
        same_pred = sum(a.get("pred", a.get("prediction")) == b.get("pred", b.get("prediction")) and
                        a.get("scores") == b.get("scores") for a, b in zip(old, new))
        diff = max((max_abs_diff(a, b) for a, b in zip(old, new)), default=0.0)
        equal = len(old) == len(new) and same_rows == len(old)
        gated = (task, lang) not in NOT_GATED
        ok &= equal or not gated
        lines.append(f"| {task} {lang} | {len(old)} / {len(new)} | {same_rows} | {same_pred} | {diff:.3g} | "
                     f"{'yes' if equal else 'no'}{'' if gated else ' (not gated: Amendment 1)'} |")
    lines.append(f"\n**{'Equal' if ok else 'NOT equal'}** on the gated cells (the four log-likelihood tasks). "
                 "Base's committed NLL cells come from the code before commit a86928b (float32 logsumexp); "
                 "every trained run's NLL cell was scored after it (results/README.md, ablations, Amendment 1).")
    lines.append("\n" + NOT_GATED_WHY)
    os.makedirs(os.path.dirname(report) or ".", exist_ok=True)
    with open(report + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(report + ".tmp", report)
    print("\n".join(lines))
    return ok


def max_abs_diff(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b)
    if isinstance(a, dict) and isinstance(b, dict):
        return max((max_abs_diff(a[k], b[k]) for k in a if k in b), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check-base", metavar="EVAL_DIR",
                   help="compare base's per-item files there with the replication's")
    p.add_argument("--out", default=ABL, help="folder for tables.md, compare.json and the figures")
    args = p.parse_args()
    if args.check_base:
        sys.exit(0 if check_base(args.check_base, os.path.join(args.out, "base_check.md")) else 1)
    out = ["# Ablations: budget, which term, where (Gemma-3-270M; pre-registration in results/README.md)\n",
           "Written by `scripts/ablation_tables.py`. NLL in nats/token (lower is better, so a positive "
           "difference is worse); accuracies in points. 10,000 resamples, seed 1234.\n"]
    scores(out)
    q1 = question1(out)
    spread = seed_spread()  # computed once: both descriptive tables are read against it
    q2 = versus_tft("### Question 2: which term (100 steps, seed 1; descriptive)", QUESTION2, spread, out)
    additivity(out)
    q3 = versus_tft("### Question 3: where (dft-feature, i = 2, ET block j; 100 steps, seed 1; descriptive)",
                    [(f"j = {j}", run, where) for j, run, where in QUESTION3], spread, out)
    machine_difference(out)
    wall_times(out)
    os.makedirs(args.out, exist_ok=True)
    if plot_curves(os.path.join(args.out, "loss_curves.png")):
        out.append("Held-out L_TFT of the 300-step runs beside the 100-step ones: `loss_curves.png`; the penalty "
                   "against j: `layer_sweep.png`.\n")
    plot_layer_sweep(q3, os.path.join(args.out, "layer_sweep.png"))
    with open(os.path.join(args.out, "compare.json.tmp"), "w") as f:
        json.dump(dict(question1=q1, question2=q2, question3=q3), f, indent=1)
    os.replace(os.path.join(args.out, "compare.json.tmp"), os.path.join(args.out, "compare.json"))
    text = "\n".join(out) + "\n"
    with open(os.path.join(args.out, "tables.md.tmp"), "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(os.path.join(args.out, "tables.md.tmp"), os.path.join(args.out, "tables.md"))
    print(text)


if __name__ == "__main__":
    main()
