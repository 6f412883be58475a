#!/usr/bin/env python
"""One layer-analysis figure from several runs' <run>.layers.<lang>.json files (03_evaluate.py --analysis layers).

    python scripts/plot_layers.py results/gemma3/layers     # -> results/gemma3/layers/layers.zh.png

Each 03_evaluate.py --analysis layers call draws its own runs only; a matrix analysed one model at a time needs
one figure with every run, base first.
"""
import argparse
import glob
import os

from study_file import load_stage  # (it puts the repository root on sys.path: 03_evaluate.py imports common)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="folder holding <run>.layers.<lang>.json(.gz) files; the figure is written there")
    ap.add_argument("--lang", default="zh", help="target language of the analysis (default %(default)s)")
    args = ap.parse_args()
    # The figure must be the one 03_evaluate.py --analysis layers draws, so its own plot_layers is used.
    evaluate = load_stage("03_evaluate")
    pattern = os.path.join(args.folder, f"*.layers.{args.lang}.json")  # results/ keeps them gzipped
    files = sorted(glob.glob(pattern) + glob.glob(pattern + ".gz"),
                   key=lambda p: (not os.path.basename(p).startswith("base."), p))
    curves = {}
    for path in files:
        curve = evaluate.common.read_json(path)
        curves[curve["run"]] = curve
    evaluate.plot_layers(curves, args.lang, os.path.join(args.folder, f"layers.{args.lang}.png"))


if __name__ == "__main__":
    main()
