#!/usr/bin/env python
"""Seed-pooled tables of a multi-seed replication, from 03_evaluate.py run JSONs and per-item files.

    python scripts/compare_seeds.py results/gemma3/eval --train results/gemma3/train > results/gemma3/tables.md

Runs are named GROUP-sSEED (tft-s1, dft-logits-w1-s2, ...) plus `base` (no training, one run). Tables:
1. mean over seeds ± standard error over seeds (sd / sqrt(k); k = seeds present) per measure and group; the
   base row (one run) gives the item standard error;
2. the pre-registered test: each DFT group vs tft, paired bootstrap over items with seeds pooled: every
   resample draws items with replacement (the same items for both groups and all seeds), each seed's
   statistic is computed on the drawn items (NLL: sum of NLL / sum of tokens; accuracy: mean; chrF:
   corpus chrF of the drawn sentences), the seeds are averaged, and the groups subtracted. Two-sided p by
   03_evaluate.paired_bootstrap's rule (null-centred, +1 correction); 95% percentile interval; Holm over
   the PRIMARY family (3 DFT groups x 3 primary measures = 9 tests; a test not yet run counts as p = 1),
   the other measures unadjusted;
   only the seeds both groups have are used, and only items every run of both groups has;
3. tft seed-to-seed spread: tft-sA vs tft-sB per measure (the same bootstrap, one seed each side);
4. wall time per run (training from train_log.jsonl, evaluation from the run JSON's per-cell seconds);
5. the mechanism: logit-lens measures per block (03_evaluate.py --analysis layers, seed 1) with standard errors
   over sentences, and each run minus tft paired over the same sentences.

The NLU average is the mean of the four accuracies XNLI, XCOPA, XStoryCloze, M-MMLU (zh); in the bootstrap
each task's items are resampled within the task (a stratified bootstrap) and the four means averaged.
Per-item files may be gzipped (<run>.<task>.<lang>.jsonl.gz: how results/ stores them).
"""
import argparse
import glob
import gzip
import json
import os
import re
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402  (paired bootstrap's p rule, Holm, standard errors over sentences)
B = 10000
SEED = 1234
NLU = [("xnli", "zh"), ("xcopa", "zh"), ("xstorycloze", "zh"), ("mmlu", "zh")]
# (key, label, cells, kind): kind ratio = NLL, mean = accuracy / F1 in %, chrf = corpus chrF
MEASURES = [
    ("nll_zh", "NLL zh ↓", [("nll", "zh")], "ratio"),
    ("nll_en", "NLL en ↓", [("nll", "en")], "ratio"),
    ("nlu", "NLU avg", NLU, "mean"),
    ("xnli", "XNLI", [("xnli", "zh")], "mean"),
    ("xcopa", "XCOPA", [("xcopa", "zh")], "mean"),
    ("xsc", "XSC", [("xstorycloze", "zh")], "mean"),
    ("mmlu", "M-MMLU", [("mmlu", "zh")], "mean"),
    ("tqa", "TQA-MC1", [("truthfulqa", "zh")], "mean"),
    ("xquad", "XQuAD F1", [("xquad", "zh")], "f1"),
    ("chrf_enzh", "chrF en→zh", [("translation_tatoeba", "en-zh")], "chrf"),
    ("chrf_zhen", "chrF zh→en", [("translation_tatoeba", "zh-en")], "chrf"),
]
PRIMARY = ["nll_zh", "nll_en", "nlu"]
DFT_GROUPS = ["dft-logits-w1", "dft-logits-wsmall", "dft-feature-w1", "mid-align"]



def read_items(folder, run, task, lang):
    for name in (f"{run}.{task}.{lang}.jsonl", f"{run}.{task}.{lang}.jsonl.gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
    return None


class Cell:
    """One run's items of one task x language, keyed by item id, as arrays for the bootstrap."""

    def __init__(self, rows, kind):
        self.ids = [json.dumps(r["id"]) for r in rows]
        self.kind = kind
        if kind == "ratio":
            self.num = np.array([r["nll_sum"] for r in rows], dtype=np.float64)
            self.den = np.array([r["n_tokens"] for r in rows], dtype=np.float64)
        elif kind == "mean":
            self.val = np.array([r["scores"]["acc"] for r in rows], dtype=np.float64)
        elif kind == "f1":  # XQuAD zh: character F1 (f1_lang in the current 03, f1 in older run files)
            self.val = np.array([r["scores"].get("f1_lang", r["scores"].get("f1")) for r in rows], dtype=np.float64)
        else:
            from sacrebleu.metrics import CHRF
            self.chrf = CHRF()
            refs = [r["gold"] for r in rows]
            predictions = [r.get("prediction") or "" for r in rows]
            self.stats = np.array(self.chrf._extract_corpus_statistics(predictions, [refs]), dtype=np.float64)

    def reorder(self, ids):
        pos = {i: k for k, i in enumerate(self.ids)}
        idx = np.array([pos[i] for i in ids])
        for name in ("num", "den", "val", "stats"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name)[idx])
        self.ids = list(ids)
        return self

    def stat(self, counts):
        """counts: (R, n) resample multiplicities (or one row of ones) -> (R,) statistic; % scale for accuracy."""
        if self.kind == "ratio":
            return counts @ self.num / (counts @ self.den)
        if self.kind in ("mean", "f1"):
            return 100.0 * (counts @ self.val) / counts.sum(1)
        agg = counts @ self.stats
        return np.array([self.chrf._compute_score_from_stats(list(row)).score for row in agg])


def load(folder):
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            obj = json.load(open(path, encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if obj.get("format", "").startswith("dft-eval-run") and obj.get("results"):
            runs[obj["run"]] = obj
    return runs


def group_of(run):
    m = re.fullmatch(r"(.+)-s(\d+)", run)
    return (m.group(1), int(m.group(2))) if m else (run, None)


def cells_for(folder, runs, run, measure):
    _, _, cells, kind = measure
    out = []
    for task, lang in cells:
        if lang not in runs[run]["results"].get(task, {}):
            return None
        rows = read_items(folder, run, task, lang)
        if rows is None:
            return None
        out.append(Cell(rows, kind))
    return out


def counts_matrix(rng, n, resamples):
    """(resamples, n) multiplicities of n items drawn with replacement (one row per resample)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def pooled_bootstrap(folder, runs, runs_a, runs_b, measure, resamples=B, seed=SEED):
    """delta (B - A, seeds averaged), 95% percentile interval, two-sided p, n items per cell; None if missing."""
    ca = [cells_for(folder, runs, r, measure) for r in runs_a]
    cb = [cells_for(folder, runs, r, measure) for r in runs_b]
    if any(c is None for c in ca + cb) or not ca or not cb:
        return None
    rng = np.random.default_rng(seed)
    ncell = len(measure[2])
    boot_a, boot_b, full_a, full_b, ns = 0.0, 0.0, 0.0, 0.0, []
    for k in range(ncell):
        shared = set(ca[0][k].ids)
        for c in ca + cb:
            shared &= set(c[k].ids)
        ids = [i for i in ca[0][k].ids if i in shared]
        for c in ca + cb:
            c[k].reorder(ids)
        n = len(ids)
        ns.append(n)
        counts = counts_matrix(rng, n, resamples)
        ones = np.ones((1, n))
        boot_a = boot_a + np.mean([c[k].stat(counts) for c in ca], axis=0) / ncell
        boot_b = boot_b + np.mean([c[k].stat(counts) for c in cb], axis=0) / ncell
        full_a = full_a + np.mean([c[k].stat(ones)[0] for c in ca]) / ncell
        full_b = full_b + np.mean([c[k].stat(ones)[0] for c in cb]) / ncell
    delta = full_b - full_a
    d = boot_b - boot_a
    p = (np.sum(np.abs(d - delta) >= abs(delta) - 1e-12) + 1) / (resamples + 1)
    lo, hi = np.percentile(d, [2.5, 97.5])
    return dict(a=full_a, b=full_b, delta=delta, lo=lo, hi=hi, p=float(p), n=ns)


def score(folder, runs, run, measure):
    cells = cells_for(folder, runs, run, measure)
    if cells is None:
        return None
    return float(np.mean([c.stat(np.ones((1, len(c.ids))))[0] for c in cells]))


def item_se(runs, run, measure):
    """The run JSON's item standard error (single cells only), on the table's scale."""
    _, _, cells, kind = measure
    if len(cells) != 1:
        return None
    task, lang = cells[0]
    e = runs[run]["results"][task][lang]
    if kind == "chrf":
        m = e.get("metrics", {}).get("chrf")
        return m["stderr"] if m else None
    if kind == "f1":
        m = e.get("metrics", {}).get("f1_lang") or e.get("metrics", {}).get("f1")
        return 100.0 * m["stderr"] if m and m.get("stderr") is not None else None
    return e["stderr"] * (100.0 if kind == "mean" else 1.0) if e.get("stderr") is not None else None


LAYER_MEASURES = [("mass_en", "English lens mass"), ("mass_tgt", "zh lens mass"), ("entropy", "lens entropy (nats)"),
                  ("cosine_en_tgt", "cosine(en, zh), mean-pooled")]


def supervised_blocks(train_dir, runs):
    """{block: {'i', 'j', 'm'}}: the LC / ET / contrastive layers the given runs trained with (train_config.json)."""
    marks = {}
    for run in runs:
        path = os.path.join(train_dir or "", run, "train_config.json")
        if not (train_dir and os.path.exists(path)):
            continue
        cfg = json.load(open(path))
        for signal, layer, name in (("lc", "lc_layer_used", "i"), ("et", "et_layer_used", "j")):
            if cfg.get(signal) not in (None, "none") and cfg.get(layer) is not None:
                marks.setdefault(cfg[layer], set()).add("m" if cfg[signal] == "contrastive" else name)
    return marks


def same_sentences(a, b):
    """Two layer analyses ran on the same sentences, tokenized alike (what a paired difference needs)."""
    return (a.get("data_sha256"), a["n_sentences"], a["per_sentence"]["positions"]) == \
        (b.get("data_sha256"), b["n_sentences"], b["per_sentence"]["positions"])


def layer_tables(layers_dir, train_dir):
    """Per block: base and tft ± SE over sentences, and each other run − the tft run of its seed, paired over
    the same sentences."""
    import torch
    mean_and_se = common.mean_and_se_over_sentences
    res = {}
    pattern = os.path.join(layers_dir, "*.layers.zh.json")
    for path in sorted(glob.glob(pattern) + glob.glob(pattern + ".gz")):
        obj = common.read_json(path)
        if obj.get("per_sentence"):  # older files (no per-sentence values, no SEs) are left out
            res[obj["run"]] = obj
    tfts = sorted((r for r in res if group_of(r)[0] == "tft"), key=lambda r: str(group_of(r)[1]))
    if not tfts:
        return
    ref = tfts[0]
    rank = lambda r: DFT_GROUPS.index(group_of(r)[0]) if group_of(r)[0] in DFT_GROUPS else len(DFT_GROUPS)
    pairs = []  # (run, the tft run of its seed)
    for r in sorted(res, key=lambda r: (rank(r), str(group_of(r)[1]))):
        if r == "base" or group_of(r)[0] == "tft":
            continue
        partner = f"tft-s{group_of(r)[1]}"
        if partner in res and same_sentences(res[r], res[partner]):
            pairs.append((r, partner))
        else:
            print(f"compare_seeds: layers of {r} left out (no {partner} layer analysis on the same sentences)",
                  file=sys.stderr)
    shown_runs = [r for r in ["base"] + tfts if r in res and same_sentences(res[r], res[ref])]
    positions = res[ref]["per_sentence"]["positions"]
    marks = supervised_blocks(train_dir, [r for r, _ in pairs])
    print(f"\n### Mechanism: logit lens per block on {len(positions)} held-out zh sentences (± SE over sentences)\n")
    print("Means weight every zh position equally (cosine: every sentence); ± is the standard error over sentences "
          "(03_evaluate.mean_and_se_over_sentences). The `run − tft` columns are paired with the tft run of the same "
          "seed: per-sentence differences on the same sentences and positions, with their SE over sentences. Blocks "
          "marked i / j are the DFT runs' LC / ET layers, m mid-align's contrastive layer. Within one seed: these "
          "are not seed-to-seed intervals.\n")
    for key, label in LAYER_MEASURES:
        shown = [r for r in shown_runs if res[r].get(key) is not None]
        diffs = [(r, t) for r, t in pairs if res[r].get(key) is not None]
        if not shown:
            continue
        weights = torch.ones(len(positions)) if key == "cosine_en_tgt" else torch.tensor(positions, dtype=torch.float64)
        nd = 5 if key == "cosine_en_tgt" else 3  # the cosines sit at 0.98-1.00, their differences at 1e-4
        per_sentence = lambda r: torch.tensor(res[r]["per_sentence"][key], dtype=torch.float64)  # [sentences, blocks]
        # every block at once: the per-sentence differences, weighted back to sums, and their clustered SE
        paired = [mean_and_se((per_sentence(r) - per_sentence(t)) * weights[:, None], weights) for r, t in diffs]
        print(f"**{label}**\n")
        print("| block | " + " | ".join(shown + [f"{r} − {t}" for r, t in diffs]) + " |")
        print("|---|" + "---|" * (len(shown) + len(diffs)))
        for k, block in enumerate(res[ref]["layers"]):
            row = [f"{res[r][key][k]:.{nd}f} ± {res[r]['standard_errors'][key][k]:.{nd}f}" for r in shown]
            row += [f"{d[k]:+.{nd}f} ± {se[k]:.{nd}f}" for d, se in paired]
            tag = f" ({'/'.join(sorted(marks[block]))})" if block in marks else ""
            print(f"| {block}{tag} | " + " | ".join(row) + " |")
        print()


def fmt(x, kind):
    return f"{x:.3f}" if kind == "ratio" else f"{x:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir")
    ap.add_argument("--train", help="folder with <run>/train_log.jsonl (wall time per run)")
    ap.add_argument("--resamples", type=int, default=B)
    ap.add_argument("--json", help="also write the comparison rows here")
    ap.add_argument("--layers", help="folder with <run>.layers.zh.json (03_evaluate.py --analysis layers) for the "
                    "mechanism tables (default: the eval folder's sibling `layers`, when it exists)")
    args = ap.parse_args()
    holm = common.holm
    runs = load(args.eval_dir)
    groups = {}
    for r in runs:
        g, s = group_of(r)
        groups.setdefault(g, {})[s] = r
    known_first = ["base", "tft"] + DFT_GROUPS
    order = [g for g in known_first if g in groups] + sorted(g for g in groups if g not in known_first)

    print("### Scores: mean over seeds ± standard error over seeds (base: one run, ± item standard error)\n")
    print("NLL in nats/token (lower is better); accuracies and F1 in %; chrF 0-100. `k` = seeds present; a cell "
          "averages the seeds that have it (its count in brackets when fewer than k).\n")
    print("| run | k | " + " | ".join(m[1] for m in MEASURES) + " |")
    print("|---|---|" + "---|" * len(MEASURES))
    for g in order:
        seeds = groups[g]
        cells = []
        for m in MEASURES:
            vals = [score(args.eval_dir, runs, seeds[s], m) for s in sorted(seeds, key=str)]
            vals = [v for v in vals if v is not None]
            if not vals:
                cells.append("–")
            elif len(vals) == 1:
                se = item_se(runs, seeds[sorted(seeds, key=str)[0]], m) if len(seeds) == 1 else None
                cells.append(fmt(vals[0], m[3]) + (f" ± {fmt(se, m[3])}" if se is not None else "")
                             + (" (1)" if len(seeds) > 1 else ""))
            else:
                se = np.std(vals, ddof=1) / np.sqrt(len(vals))
                missing = f" ({len(vals)})" if len(vals) < len(seeds) else ""
                cells.append(f"{fmt(np.mean(vals), m[3])} ± {fmt(se, m[3])}" + missing)
        print(f"| {g} | {len(seeds)} | " + " | ".join(cells) + " |")

    rows = []
    if "tft" in groups:
        for g in [g for g in order if g not in ("base", "tft")]:
            common_seeds = sorted(set(groups["tft"]) & set(groups[g]))
            if not common_seeds:
                continue
            for m in MEASURES:
                res = pooled_bootstrap(args.eval_dir, runs, [groups["tft"][s] for s in common_seeds],
                                       [groups[g][s] for s in common_seeds], m, args.resamples)
                if res:
                    rows.append(dict(group=g, measure=m[0], label=m[1], kind=m[3], seeds=common_seeds, **res))
    prim = [r for r in rows if r["measure"] in PRIMARY and r["group"] in DFT_GROUPS[:3]]
    family = len(PRIMARY) * 3  # the pre-registered family: 3 DFT runs x 3 primary measures
    # a test not yet run counts as p = 1
    pad = family - len(prim)
    adjusted = holm([r["p"] for r in prim] + [1.0] * pad,
                    [r["p"] <= 1.0 / (args.resamples + 1) + 1e-15 for r in prim] + [False] * pad)
    for r, (ph, k) in zip(prim, adjusted):
        r["p_holm"], r["p_holm_bound"] = ph, k is not None
    print(f"\n### DFT − tft: paired bootstrap over items, seeds pooled ({args.resamples} resamples, seed {SEED})\n")
    print("Two-sided p; 95% percentile interval. The primary tests (NLL zh, NLL en, NLU avg of the three "
          f"pre-registered DFT runs) carry a Holm-adjusted p over the family of {family} ({len(prim)} present; a "
          "missing one counts as p = 1 until it is run); all other p are unadjusted. NLL: negative = DFT better; "
          "accuracy/F1/chrF: positive = DFT better.\n")
    print("| DFT run | seeds | measure | tft | DFT | DFT − tft | 95% interval | p | p (Holm, primary) | items |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph = (("≤ " if r.get("p_holm_bound") else "") + f"{r['p_holm']:.4f}") if "p_holm" in r else "–"
        print(f"| {r['group']} | {','.join(map(str, r['seeds']))} | {r['label']} | {fmt(r['a'], r['kind'])} | "
              f"{fmt(r['b'], r['kind'])} | {r['delta']:+.3f} | [{r['lo']:+.3f}, {r['hi']:+.3f}] | "
              f"{r['p']:.4f} | {ph} | {'+'.join(map(str, r['n']))} |")

    tft = groups.get("tft", {})
    if len(tft) >= 2:
        seeds = sorted(tft)
        print("\n### tft seed-to-seed spread (the same bootstrap, one run each side; what seeds alone change)\n")
        print("| A → B | measure | A | B | B − A | 95% interval | p |")
        print("|---|---|---|---|---|---|---|")
        for i, sa in enumerate(seeds):
            for sb in seeds[i + 1:]:
                for m in MEASURES:
                    res = pooled_bootstrap(args.eval_dir, runs, [tft[sa]], [tft[sb]], m, args.resamples)
                    if res:
                        print(f"| tft-s{sa} → tft-s{sb} | {m[1]} | {fmt(res['a'], m[3])} | {fmt(res['b'], m[3])} | "
                              f"{res['delta']:+.3f} | [{res['lo']:+.3f}, {res['hi']:+.3f}] | {res['p']:.4f} |")

    print("\n### Wall time per run (minutes; the 2-core CPU was shared with other jobs)\n")
    print("Training: the sum of the logged optimizer-step and held-out-evaluation times (model loading, checkpoint "
          "saves and steps lost to a killed attempt excluded); evaluation: the sum of the run JSON's per-cell "
          "seconds.\n")
    print("| run | training | evaluation (sum of cells) |")
    print("|---|---|---|")
    trained = []
    if args.train and os.path.isdir(args.train):
        trained = [d for d in os.listdir(args.train) if os.path.isdir(os.path.join(args.train, d))]
    known = order + sorted({group_of(r)[0] for r in trained} - set(order))
    for run in sorted(set(runs) | set(trained), key=lambda r: (known.index(group_of(r)[0]), str(group_of(r)[1]))):
        ev = sum(e.get("seconds", 0) for t in runs[run]["results"].values() for e in t.values()) if run in runs else 0.0
        tr = "–"
        if args.train:
            p = common.existing_path(os.path.join(args.train, run, "train_log.jsonl"))
            if p:
                log = common.read_jsonl(p)
                # the per-step seconds survive --resume (elapsed restarts with each segment)
                busy = sum(r.get("seconds", 0) + r.get("eval_seconds", 0) for r in log)
                tr = f"{busy / 60:.1f} ({log[-1]['step']} steps)"
        print(f"| {run} | {tr} | {ev / 60:.1f} |")
    layers_dir = args.layers or os.path.join(os.path.dirname(os.path.abspath(args.eval_dir)), "layers")
    if os.path.isdir(layers_dir):
        layer_tables(layers_dir, args.train)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)


if __name__ == "__main__":
    main()
