"""The paper's tables from run_paper.sh's evaluations: ours ± standard error beside the paper's number, per cell.

    python scripts/paper_tables.py --out runs/paper                  # what run_paper.sh runs last
    python scripts/paper_tables.py --out runs/paper --bootstrap 10000

Reads OUT/plan.json (written by scripts/paper_plan.py: model, languages, methods, data, settings), every run
JSON in OUT/eval/ (03_evaluate.py) and scripts/paper_numbers.json (the paper's Tables
1, 2 and 4 as docs/DESIGN.md section 5 reads them; `?` cells are null and stay empty). Writes
OUT/paper_tables.md and OUT/paper_tables.json: for every cell ours, its standard error, n, the paper's value;
the NLU average; DFT - TFT (and mid-align - TFT) per cell with a paired-bootstrap 95% interval and p-value on the
items both runs share; and every deviation from the paper's set-up under its table.
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import UserError  # noqa: E402

NUMBERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_numbers.json")
PAPER_LANGS = ("vi", "ar", "zh")  # the paper's column order
# (task, title, metric, the paper's languages); QA F1 is f1_lang: per-language normalisation, zh over characters
QA = [("xquad", "XQuAD", "f1_lang", PAPER_LANGS), ("mlqa", "MLQA", "f1_lang", PAPER_LANGS),
      ("truthfulqa", "TruthfulQA MC1", "acc", PAPER_LANGS), ("mkqa", "MKQA", "f1_lang", PAPER_LANGS)]
NLU = [("xnli", "XNLI", "acc", PAPER_LANGS), ("xcopa", "XCOPA", "acc", ("vi", "zh")),
       ("xstorycloze", "XStoryCloze", "acc", ("ar", "zh")), ("mmlu", "M-MMLU", "acc", PAPER_LANGS)]
NO_DATA = {("mkqa", "vi"): "no Vietnamese MKQA ships (the MIA 2022 release has none)"}
MT_KEY = {"zh": "translation"}  # NTREX-128 for zh; Tatoeba (run key translation_tatoeba) for the others
ROW_ORDER = ["base", "sft", "tft", "dft-logits", "dft-feature", "mid-align"]
ROW_TITLE = {"base": "base (no fine-tuning)", "sft": "SFT (English)", "tft": "TFT", "dft-logits": "DFT-logits",
             "dft-feature": "DFT-feature", "mid-align": "mid-align (ours, not in the paper)"}
DEVIATIONS = {
    "qa": ["MLQA: the shipped dev split (vi 511, zh 504, ar 517 questions); the test split was not obtainable.",
           "MKQA: the MIA 2022 shared task's dev subset (1,758 questions per language), which has no Vietnamese.",
           "TruthfulQA: the Okapi translation, MC1 accuracy, lm-eval's 6-shot QA prompt.",
           "XQuAD / MLQA / MKQA F1: `f1_lang` (per-language normalisation, zh over characters); the paper does "
           "not say which normalisation it used."],
    "nlu": ["M-MMLU: the Okapi val split (the harness uses test, not obtainable here), zero-shot.",
            "XNLI: the validation split (2,490 items, lm-eval's default); XCOPA and XStoryCloze as lm-eval."],
    "translation": ["The paper: COMET on FLORES-200, en<->zh only. Ours: chrF (and BLEU in the JSON) on NTREX-128 "
                    "for zh and on Tatoeba for vi and ar: not comparable cell by cell; compare directions only.",
                    "Table 4 has no full DFT rows (only +LC / +ET ablations): those cells stay empty."],
    "mgsm": ["MGSM is ours, not the paper's: zero-shot direct answers, lm-eval's flexible-extract accuracy."],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input and output")
    g.add_argument("--out", required=True, help="run_paper.sh's OUT folder (plan.json, eval/); the tables go here")
    g.add_argument("--numbers", default=NUMBERS, help="the paper's numbers (default scripts/paper_numbers.json)")
    g = p.add_argument_group("statistics")
    g.add_argument("--bootstrap", type=int, default=2000,
                   help="paired-bootstrap resamples per difference (default 2000)")
    g.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return p.parse_args(argv)


def paper_value(raw):
    """(value, is_reading) of a paper cell: null stays None; '~N' is our reading of a garbled cell."""
    if raw is None:
        return None, False
    if isinstance(raw, str):
        return float(raw.lstrip("~")), raw.startswith("~")
    return float(raw), False


def load_runs(out):
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "eval", "*.json"))):
        obj = common.read_json(path)
        if isinstance(obj, dict) and obj.get("format", "").startswith("dft-eval-run"):
            runs[obj["run"]] = (path, obj)
    return runs


def run_name(row, lang):
    return row if row in ("base", "sft") else f"{row}-{lang}"


def cell_value(entry, metric):
    """(score on the table's scale, stderr, the metric actually read) of one run JSON entry."""
    m = entry.get("metrics", {}).get(metric)
    if m is None:
        m, metric = {"score": entry["score"], "stderr": entry["stderr"]}, entry["metric"]
    scale = 100.0 if entry["aggregation"] == "mean" else 1.0
    se = m.get("stderr")
    return m["score"] * scale, None if se is None else se * scale, metric


def item_stat(json_path, entry, metric):
    """{item id: row} and a function (rows in a fixed order, item indices) -> the statistic on those items."""
    import numpy as np
    rows = common.read_jsonl(os.path.join(os.path.dirname(json_path), entry["items_file"]))
    by_id = {json.dumps(r["id"]): r for r in rows}
    if entry["aggregation"] == "mean":
        def make(order):
            v = np.array([by_id[i]["scores"][metric] for i in order], dtype=np.float64) * 100.0
            return lambda idx: float(v[idx].mean())
    elif entry["aggregation"] == "corpus":
        from sacrebleu.metrics import CHRF
        chrf = CHRF()

        def make(order):
            stats = np.array(chrf._extract_corpus_statistics([by_id[i]["prediction"] for i in order],
                                                             [[by_id[i]["gold"] for i in order]]), dtype=np.float64)
            return lambda idx: chrf._compute_score_from_stats(list(stats[idx].sum(0))).score
    else:
        raise UserError(f"{json_path}: {entry['task']} {entry['lang']} has aggregation {entry['aggregation']!r}, "
                        "which the paper's tables do not use")
    return by_id, make


def differences(pairs, resamples, seed):
    """Mean over cells of (B - A), its 95% paired-bootstrap interval (items resampled within each cell) and, for one
    cell, common.paired_bootstrap's p-value. pairs: [(stat_a, stat_b, n)]."""
    import numpy as np
    rng = np.random.default_rng(seed)
    every = [np.arange(n) for _, _, n in pairs]
    delta = float(np.mean([b(e) - a(e) for (a, b, _), e in zip(pairs, every)]))
    draws = []
    for _ in range(resamples):
        idx = [rng.integers(0, n, n) for _, _, n in pairs]
        draws.append(np.mean([b(i) - a(i) for (a, b, _), i in zip(pairs, idx)]))
    low, high = (float(x) for x in np.percentile(draws, [2.5, 97.5]))
    p = common.paired_bootstrap(pairs[0][0], pairs[0][1], pairs[0][2], resamples, seed)[1] if len(pairs) == 1 else None
    return dict(delta=delta, low=low, high=high, p=p)


def build(out, numbers_path=NUMBERS, resamples=2000, seed=0):
    plan_path = os.path.join(out, "plan.json")
    if not os.path.exists(plan_path):
        raise UserError(f"{plan_path} not found: run run_paper.sh (it writes the plan first) or pass its OUT")
    plan = common.read_json(plan_path)
    paper = common.read_json(numbers_path)["models"].get(plan["paper_model"], {}) if plan["paper_model"] else {}
    runs = load_runs(out)
    langs = [l for l in PAPER_LANGS if l in plan["langs"]]
    rows = ["base"] + [m for m in ROW_ORDER if m in plan["methods"]]
    cells, missing = [], []

    def add(table, row, task, lang, metric, key=None, paper_raw=None, model_lang=None):
        key = key or task
        run = run_name(row, model_lang or lang)
        value, reading = paper_value(paper_raw)
        cell = dict(table=table, row=row, task=key, lang=lang, run=run, metric=metric, ours=None, stderr=None, n=None,
                    paper=value, paper_reading=reading, note=NO_DATA.get((task, lang)))
        entry = runs.get(run, (None, {}))[1].get("results", {}).get(key, {}).get(lang)
        if entry is not None:
            cell["ours"], cell["stderr"], cell["metric"] = cell_value(entry, metric)
            cell["n"] = entry["n"]
        elif cell["note"] is None:
            missing.append(f"{run} {key} {lang}")
        cells.append(cell)

    for table, spec in (("qa", QA), ("nlu", NLU)):
        for row in rows:
            for task, _, metric, task_langs in spec:
                for lang in (l for l in langs if l in task_langs):
                    raw = paper.get(table, {}).get(row, {}).get(task, {}).get(lang)
                    add(table, row, task, lang, metric, paper_raw=raw)
    for row in rows:
        for lang in langs:
            key = MT_KEY.get(lang, "translation_tatoeba")
            for direction in (f"en-{lang}", f"{lang}-en"):
                add("translation", row, key, direction, "chrf", model_lang=lang,
                    paper_raw=paper.get("translation", {}).get(row, {}).get(direction) if lang == "zh" else None)
        if "zh" in langs:
            add("mgsm", row, "mgsm", "zh", "flexible_extract")
    if missing:
        raise UserError(f"{len(missing)} cell(s) have no result in {out}/eval: {', '.join(missing[:8])}"
                        f"{' ...' if len(missing) > 8 else ''}; finish run_paper.sh (it skips what is done)")

    nlu_avg = {}
    for row in rows:
        ours = [c["ours"] for c in cells if c["table"] == "nlu" and c["row"] == row]
        nlu_avg[row] = dict(ours=sum(ours) / len(ours), cells=len(ours), complete=len(ours) == 10,
                            paper=paper.get("nlu", {}).get(row, {}).get("avg"))

    diffs = []
    for row in (r for r in rows if r not in ("base", "sft", "tft") and "tft" in rows):
        for table in ("qa", "nlu", "translation", "mgsm"):
            stats = []
            for c in (c for c in cells if c["table"] == table and c["row"] == row and c["ours"] is not None):
                t = next(x for x in cells if x["table"] == table and x["row"] == "tft" and x["task"] == c["task"]
                         and x["lang"] == c["lang"])
                (pa, ra), (pb, rb) = runs[t["run"]], runs[c["run"]]
                ea, eb = ra["results"][t["task"]][t["lang"]], rb["results"][c["task"]][c["lang"]]
                ids_a, make_a = item_stat(pa, ea, t["metric"])
                ids_b, make_b = item_stat(pb, eb, c["metric"])
                order = [i for i in ids_a if i in ids_b]
                if not order:
                    raise UserError(f"{t['run']} and {c['run']} share no items in {c['task']} {c['lang']}")
                pair = (make_a(order), make_b(order), len(order))
                stats.append(pair)
                pa_val, pb_val = t["paper"], c["paper"]
                diffs.append(dict(table=table, row=row, task=c["task"], lang=c["lang"], metric=c["metric"],
                                  n=len(order), **differences([pair], resamples, seed),
                                  paper=None if pa_val is None or pb_val is None else pb_val - pa_val))
            if table == "nlu" and stats:
                avg = nlu_avg
                paper_d = (None if avg[row]["paper"] is None or avg["tft"]["paper"] is None
                           else avg[row]["paper"] - avg["tft"]["paper"])
                diffs.append(dict(table=table, row=row, task="avg", lang="", metric="acc", n=sum(s[2] for s in stats),
                                  **differences(stats, resamples, seed), paper=paper_d))
    data = [dict(d, **data_used(d["file"])) for d in plan["data"]]
    notes = {k[:-len("_note")]: v for k, v in paper.items() if k.endswith("_note")}  # e.g. Gemma's unusable Table 1
    notes["translation"] = paper.get("translation", {}).get("note")
    return dict(plan=plan, data=data, cells=cells, nlu_avg=nlu_avg, differences=diffs, resamples=resamples, seed=seed,
                deviations=DEVIATIONS, paper_notes=notes)


def data_used(path):
    """What a language's runs trained on: train / dev pair counts and the train file's sha256."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: the pairs this run trained on are gone; rebuild them with run_paper.sh")
    dev = path[:-len(".jsonl")] + ".dev.jsonl" if path.endswith(".jsonl") else None
    return dict(train=len(common.read_jsonl(path)), sha256=common.sha256_file(path),
                dev=len(common.read_jsonl(dev)) if dev and os.path.exists(dev) else None)


def fmt_cell(c):
    se = "" if c["stderr"] is None else f" ± {c['stderr']:.2f}"
    ours = "—" if c["ours"] is None else f"{c['ours']:.2f}{se}"
    if c["note"]:
        ours = "no data"
    paper = "" if c["paper"] is None else f" ({'~' if c['paper_reading'] else ''}{c['paper']:.2f})"
    return ours + paper


def fmt_diff(d):
    paper = "" if d["paper"] is None else f"; paper {d['paper']:+.2f}"
    p = "" if d["p"] is None else f", p {d['p']:.4f}"
    return f"{d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]{p}{paper}"


def markdown(result):
    plan, cells = result["plan"], result["cells"]
    langs = [l for l in PAPER_LANGS if l in plan["langs"]]
    rows = ["base"] + [m for m in ROW_ORDER if m in plan["methods"]]
    lines = [f"# The paper's tables: {plan['model']}\n",
             f"Model `{plan['model']}`{' (TINY: a tiny random model, its numbers mean nothing)' * plan['tiny']}; "
             f"methods {', '.join(plan['methods'])}; languages {', '.join(plan['langs'])}; "
             f"{'first ' + str(plan['limit']) + ' items per cell' if plan['limit'] else 'every item of each cell'}; "
             f"{str(plan['steps']) + ' optimizer steps per run' if plan['steps'] else 'the preset recipe'}.",
             "Each cell: ours ± standard error (the paper's number in brackets; `~` = a reading of a garbled cell; "
             "empty = `?` in the paper or not reported). Scores in %, chrF 0-100.\n", "Data actually used:\n",
             "| language | pairs | source | train | dev | sha256 (train file) |", "|---|---|---|---|---|---|"]
    for d in result["data"]:
        lines.append(f"| {d['lang']} | `{d['file']}` | {d['source']} | {d['train']:,} | {d['dev'] or 0:,} | "
                     f"`{d['sha256']}` |")
    lines.append(f"\nSFT is trained once, on the English side of the {plan['sft_lang']} pairs; base and SFT fill "
                 "every language's columns, TFT / DFT rows use the model of the column's language.\n")

    def grid(table, spec, title):
        cols = [(t, name, l) for t, name, _, tl in spec for l in langs if l in tl]
        out = [f"## {title}\n", "| method | " + " | ".join(f"{name} {l}" for _, name, l in cols)
               + (" | NLU avg |" if table == "nlu" else " |"), "|---" * (len(cols) + 1 + (table == "nlu")) + "|"]
        for row in rows:
            by = {(c["task"], c["lang"]): c for c in cells if c["table"] == table and c["row"] == row}
            line = f"| {ROW_TITLE[row]} | " + " | ".join(fmt_cell(by[(t, l)]) for t, _, l in cols)
            if table == "nlu":
                a = result["nlu_avg"][row]
                line += f" | {a['ours']:.2f}{'' if a['complete'] else '*'}" + (
                    "" if a["paper"] is None else f" ({a['paper']:.2f})")
            out.append(line + " |")
        return out

    def diff_lines(table):
        ds = [d for d in result["differences"] if d["table"] == table]
        if not ds:
            return []
        out = [f"\nDifferences to TFT (same items; 95% paired-bootstrap interval, {result['resamples']} resamples"
               f"{'; p for single cells' if ds else ''}; the paper's difference where both of its cells are known):\n",
               "| method | task | lang | metric | n | ours − TFT |", "|---|---|---|---|---|---|"]
        for d in ds:
            out.append(f"| {d['row']} | {d['task']} | {d['lang']} | {d['metric']} | {d['n']} | {fmt_diff(d)} |")
        return out

    def deviations(key):
        extra = [result["paper_notes"][key]] if result["paper_notes"].get(key) else []
        return ["\nDeviations from the paper's set-up:\n"] + [f"- {x}" for x in result["deviations"][key] + extra
                                                           + common_deviations(plan)]

    lines += grid("qa", QA, "Table 1: QA (F1; TruthfulQA MC1 accuracy)") + diff_lines("qa") + deviations("qa")
    lines += [""] + grid("nlu", NLU, "Table 2: NLU (accuracy)") + diff_lines("nlu") + deviations("nlu")
    lines.append("\nNLU avg: mean of the ten cells (`*`: fewer cells, because LANGS leaves languages out).")
    lines += [""] + translation_grid(result, rows, langs) + diff_lines("translation") + deviations("translation")
    if "zh" in langs:
        lines += ["", "## MGSM zh (ours, not in the paper)\n", "| method | MGSM zh |", "|---|---|"]
        for row in rows:
            c = next(c for c in cells if c["table"] == "mgsm" and c["row"] == row)
            lines.append(f"| {ROW_TITLE[row]} | {fmt_cell(c)} |")
        lines += diff_lines("mgsm") + ["\n- " + result["deviations"]["mgsm"][0]]
    return "\n".join(lines) + "\n"


def translation_grid(result, rows, langs):
    cols = [(l, d) for l in langs for d in (f"en-{l}", f"{l}-en")]
    out = ["## Table 4: translation (ours chrF; the paper COMET, zh only)\n",
           "| method | " + " | ".join(f"{d.replace('-', '→')} ({'NTREX' if lang == 'zh' else 'Tatoeba'})"
                                      for lang, d in cols)
           + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        by = {c["lang"]: c for c in result["cells"] if c["table"] == "translation" and c["row"] == row}
        out.append(f"| {ROW_TITLE[row]} | " + " | ".join(fmt_cell(by[d]) for _, d in cols) + " |")
    return out


def common_deviations(plan):
    out = [f"{d['lang']} pairs: {d['deviation']}" for d in plan["data"] if d.get("deviation")]
    if plan["limit"]:
        out.append(f"Only the first {plan['limit']} items of each cell (LIMIT).")
    if plan["steps"]:
        out.append(f"{plan['steps']} optimizer steps per run (STEPS) instead of the recipe's 3 epochs.")
    if plan["paper_model"] is None:
        out.append("The model is not one of the paper's (LLaMA-2-7B, Gemma-2-2B): no paper numbers are shown.")
    elif plan["paper_model"] != plan["model"]:
        out.append(f"The paper's numbers shown are those of {plan['paper_model']}, not of the model trained here.")
    return out


def main(argv=None):
    args = parse_args(argv)
    result = build(args.out, args.numbers, args.bootstrap, args.seed)
    text = markdown(result)
    with common.atomic_open(os.path.join(args.out, "paper_tables.md")) as f:
        f.write(text)
    common.write_json(os.path.join(args.out, "paper_tables.json"), result)
    print(text)


if __name__ == "__main__":
    common.run_main(main)
