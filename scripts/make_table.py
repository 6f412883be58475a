#!/usr/bin/env python
"""The replication tables from the run JSONs in results/eval (or any 03_evaluate.py --out folder).

    python scripts/make_table.py results/eval > results/table.md

1. scores ± standard error, five models x the measures that matter here (NLL first: it can move at this
   scale), including chrF (03's --compare and results.md use BLEU, the primary translation metric);
2. paired-bootstrap p-values (two-sided, from 03_evaluate.py --compare: compare_*.json) for each DFT
   variant vs tft and each model vs base, plus the same bootstrap for chrF computed here from the
   per-item outputs (sacrebleu sentence statistics, 10000 resamples, seed 1234, 03's p rule).
"""
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402  (the repository root's shared module: paired bootstrap)

RUNS = ["base", "sft", "tft", "dft-logits", "dft-feature"]
COLS = [("nll", "zh", "nll"), ("nll", "en", "nll"), ("xnli", "zh", None), ("xcopa", "zh", None),
        ("xstorycloze", "zh", None), ("mmlu", "zh", None), ("truthfulqa", "zh", None), ("xquad", "zh", "f1_lang"),
        ("xquad", "en", "f1_lang"), ("mgsm", "zh", None), ("mgsm", "en", None),
        ("translation_tatoeba", "en-zh", "chrf"), ("translation_tatoeba", "zh-en", "chrf")]
PAIRS = [("tft", "dft-logits"), ("tft", "dft-feature"), ("base", "sft"), ("base", "tft"), ("base", "dft-logits"),
         ("base", "dft-feature")]


def cell(entry, metric):
    m = entry["metrics"].get(metric) if metric and "metrics" in entry else None
    if m is None and metric == "f1_lang":  # run JSONs from before f1_lang: their "f1" was ours (f1_lang)
        m = entry["metrics"].get("f1")
    score, se = (m["score"], m["stderr"]) if m else (entry["score"], entry["stderr"])
    scale = 100.0 if entry["aggregation"] == "mean" and entry["metric"] != "nll" else 1.0
    return f"{score * scale:.2f} ± {se * scale:.2f}" if se is not None else f"{score * scale:.2f}"


def chrf_p(folder, a, b, direction, resamples=10000, seed=1234):
    from sacrebleu.metrics import CHRF
    chrf = CHRF()
    rows = {}
    for run in (a, b):
        rows[run] = common.read_jsonl(os.path.join(folder, f"{run}.translation_tatoeba.{direction}.jsonl"))
    refs = [r["gold"] for r in rows[a]]
    assert refs == [r["gold"] for r in rows[b]], "not the same items"
    stats = {run: np.array(chrf._extract_corpus_statistics([r["prediction"] or "" for r in rows[run]], [refs]),
                           dtype=np.float64) for run in (a, b)}
    score = lambda run, idx: chrf._compute_score_from_stats(list(stats[run][idx].sum(0))).score  # noqa: E731
    n = len(refs)
    full = np.arange(n)
    delta, p = common.paired_bootstrap(lambda idx: score(a, idx), lambda idx: score(b, idx), n,
                                       resamples=resamples, seed=seed)
    return score(a, full), score(b, full), delta, p, n


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "results/eval"
    runs = {r: json.load(open(os.path.join(folder, f"{r}.json")))
            for r in RUNS if os.path.exists(os.path.join(folder, f"{r}.json"))}
    arrows = {"chrF en-zh": "chrF en→zh", "chrF zh-en": "chrF zh→en"}
    head = ["run"] + [arrows.get(name, name) for name in
                      (f"{t.replace('translation_tatoeba', 'chrF')} {l}" for t, l, _ in COLS)]
    print("### Scores ± standard error (NLL: nats/token, lower is better; acc/F1 in %; chrF 0-100)\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r, rec in runs.items():
        cells = [cell(rec["results"][t][l], m) if l in rec["results"].get(t, {}) else "–" for t, l, m in COLS]
        print(f"| {r} | " + " | ".join(cells) + " |")
    n = {f"{t} {l}": rec["results"][t][l]["n"]
         for rec in runs.values() for t, l, _ in COLS if l in rec["results"].get(t, {})}
    print("\nItems per cell: " + ", ".join(f"{k} {v}" for k, v in n.items()) + ".\n")
    print("### Paired bootstrap, B − A (two-sided p; 10000 resamples)\n")
    print("| A → B | " + " | ".join(f"{t.replace('translation_tatoeba', 'chrF')} {l}" for t, l, _ in COLS) + " |")
    print("|---|" + "---|" * len(COLS))
    for a, b in PAIRS:
        path = os.path.join(folder, f"compare_{a}_vs_{b}.json")
        if not os.path.exists(path):
            continue
        cmp = {(r["task"], r["lang"]): r for r in json.load(open(path))["rows"]}
        cells = []
        for t, l, m in COLS:
            if t == "translation_tatoeba":
                try:
                    _, _, d, p, _ = chrf_p(folder, a, b, l)
                    cells.append(f"{d:+.2f} (p={p:.4f})")
                except (OSError, KeyError, AssertionError):
                    cells.append("–")
                continue
            r = cmp.get((t, l))
            if r is None:
                cells.append("–")
                continue
            scale = 1.0 if r["metric"] == "nll" else 100.0
            cells.append(f"{r['delta'] * scale:+.2f} (p={r['p']:.4f})")
        print(f"| {a} → {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
