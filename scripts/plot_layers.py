#!/usr/bin/env python
"""The layer analysis across runs (03_evaluate.py --analysis layers): one figure from several runs'
<run>.layers.<lang>.json files, and layer_tables(), the per-block tables of a study (scripts/study_tables.py).

    python scripts/plot_layers.py results/gemma3/layers     # -> results/gemma3/layers/layers.zh.png
    python scripts/plot_layers.py results/layers_smollm2 --out /tmp/layers.png   # elsewhere

Each 03_evaluate.py --analysis layers call draws its own runs only; a matrix analysed one model at a time needs
one figure with every run, base first.
"""
import argparse
import glob
import os

from study_file import load_stage  # (it puts the repository root on sys.path: 03_evaluate.py imports common)
import common  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="folder holding <run>.layers.<lang>.json(.gz) files")
    ap.add_argument("--lang", default="zh", help="target language of the analysis (default %(default)s)")
    ap.add_argument("--out", help="the figure (default FOLDER/layers.LANG.png)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.folder):
        raise common.UserError(f"{args.folder} is not a folder: pass the folder of 03_evaluate.py --analysis layers "
                               "(its <run>.layers.<lang>.json files)")
    # The figure must be the one 03_evaluate.py --analysis layers draws, so its own plot_layers is used.
    evaluate = load_stage("03_evaluate")
    pattern = os.path.join(args.folder, f"*.layers.{args.lang}.json")  # results/ keeps them gzipped
    files = sorted(glob.glob(pattern) + glob.glob(pattern + ".gz"),
                   key=lambda p: (not os.path.basename(p).startswith("base."), p))
    if not files:
        names = glob.glob(os.path.join(args.folder, "*.layers.*"))
        found = sorted({p.split(".layers.")[-1].split(".")[0] for p in names})
        raise common.UserError(f"no {args.lang} layer files (*.layers.{args.lang}.json) in {args.folder}"
                               + (f"; it holds {', '.join(found)}: pass --lang" if found else
                                  ": run 03_evaluate.py --analysis layers --out there first"))
    curves = {}
    for path in files:
        curve = common.read_json(path)
        curves[curve["run"]] = curve
    out = args.out or os.path.join(args.folder, f"layers.{args.lang}.png")
    if os.path.isdir(out):
        raise common.UserError(f"--out {out} is a folder: give the figure's file name, e.g. {out}/layers.png")
    evaluate.plot_layers(curves, args.lang, out)
    print(f"wrote {out} ({', '.join(curves)})")


LAYER_MEASURES = [("mass_en", "English lens mass"), ("mass_tgt", "{lang} lens mass"),
                  ("entropy", "lens entropy (nats)"), ("cosine_en_tgt", "cosine(en, {lang}), mean-pooled")]


def same_sentences(a, b):
    """Two layer analyses ran on the same sentences, tokenized alike (what a paired difference needs)."""
    return (a.get("data_sha256"), a["n_sentences"], a["per_sentence"]["positions"]) == \
        (b.get("data_sha256"), b["n_sentences"], b["per_sentence"]["positions"])


def layer_tables(study, folders):
    """Markdown of the logit lens per block (03 --analysis layers): the runs without training and the reference
    group's ± SE over sentences, every other run minus the reference run of its seed (paired, same sentences).
    folders: run name -> the results folder holding its layers/ and train/ (scripts/study_tables.py's)."""
    import torch
    ref_group = study["tables"]["layers_reference"]
    if not ref_group:
        return []
    res = {}
    for name, run in study.runs_expanded.items():
        pattern = os.path.join(folders[name], "layers", f"{run['stored_as']}.layers.*.json")
        for path in sorted(glob.glob(pattern) + glob.glob(pattern + ".gz")):  # results/ keeps them gzipped
            obj = common.read_json(path)
            if obj.get("per_sentence"):  # older files (no per-sentence values, no SEs) are left out
                res[name], lang = obj, path.removesuffix(".gz").split(".")[-2]
    refs = [r for r in study.groups[ref_group] if r in res]
    if not refs:
        return []
    seed_of = {n: r["seed"] for n, r in study.runs_expanded.items()}
    ref_of_seed = {seed_of[r]: r for r in refs}
    shown = [r for r in res if not study.runs_expanded[r]["train"] or r == refs[0]]
    shown = [r for r in shown if same_sentences(res[r], res[refs[0]])]
    pairs = [(r, ref_of_seed[seed_of[r]]) for r in res if r not in shown and r not in refs
             and seed_of[r] in ref_of_seed and same_sentences(res[r], res[ref_of_seed[seed_of[r]]])]
    marks = {}  # the blocks the paired runs supervised: i (LC), j (ET), m (contrastive)
    for r, _ in pairs:
        run = study.runs_expanded[r]
        path = os.path.join(folders[r], "train", run["stored_as"], "train_config.json")
        cfg = common.read_json(path) if os.path.exists(path) else {}
        for signal, layer, mark in (("lc", "lc_layer_used", "i"), ("et", "et_layer_used", "j")):
            if cfg.get(signal) not in (None, "none") and cfg.get(layer) is not None:
                marks.setdefault(cfg[layer], set()).add("m" if cfg[signal] == "contrastive" else mark)
    positions = res[refs[0]]["per_sentence"]["positions"]
    lines = [f"\n## Mechanism: logit lens per block on {len(positions)} held-out {lang} sentences (± SE over "
             "sentences)\n", f"Means weight every {lang} position equally (cosine: every sentence); ± is the standard "
             "error over sentences (common.mean_and_se_over_sentences). The `run − reference` columns are paired "
             f"with the {ref_group} run of the same seed: per-sentence differences on the same sentences and "
             "positions, with their SE over sentences. Blocks marked i / j are the paired runs' LC / ET layers, m a "
             "contrastive layer. Within one seed: these are not seed-to-seed intervals.\n"]
    for key, title in LAYER_MEASURES:
        cols = [r for r in shown if res[r].get(key) is not None]
        diffs = [(r, t) for r, t in pairs if res[r].get(key) is not None]
        if not cols:
            continue
        weights = (torch.ones(len(positions)) if key == "cosine_en_tgt"
                   else torch.tensor(positions, dtype=torch.float64))
        nd = 5 if key == "cosine_en_tgt" else 3  # the cosines sit at 0.98-1.00, their differences at 1e-4
        per = lambda r: torch.tensor(res[r]["per_sentence"][key], dtype=torch.float64)  # noqa: E731
        paired = [common.mean_and_se_over_sentences((per(r) - per(t)) * weights[:, None], weights) for r, t in diffs]
        lines += [f"**{title.format(lang=lang)}**\n",
                  *common.table_header("block", *cols, *[f"{r} − {t}" for r, t in diffs])]
        for k, block in enumerate(res[refs[0]]["layers"]):
            row = [f"{res[r][key][k]:.{nd}f} ± {res[r]['standard_errors'][key][k]:.{nd}f}" for r in cols]
            row += [f"{d[k]:+.{nd}f} ± {se[k]:.{nd}f}" for d, se in paired]
            tag = f" ({'/'.join(sorted(marks[block]))})" if block in marks else ""
            lines.append(f"| {block}{tag} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


if __name__ == "__main__":
    common.run_main(main)
