#!/usr/bin/env python
"""The tables of a study (studies/README.md): RESULTS/tables.md, tables.json ([tables] file) and loss_curves.png.

    python scripts/study_tables.py studies/tiny.toml                 # into the study's results folder
    python scripts/study_tables.py studies/tiny.toml --out /tmp/t    # read the results there, write there

Reads only the results folder (and the folders of reused runs): 03's run JSONs and per-item files, 02's training
logs. Sections: scores ± item standard error per run and mean ± standard error over seeds per group (reference
numbers beside ours where the study carries them); every contrast per measure, bootstrapped over items with one
draw per resample shared by all its runs (common.contrast_bootstrap), 95% percentile interval, two-sided p;
each confirmatory family: Holm-adjusted p (a test not yet run counts as p = 1), its placebo, the claim rule, whether
the interval lies within ±|placebo Δ|; the seed-to-seed spread of each group; wall time per run; each fit's residual.
"""
import argparse
import copy
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_study import ROOT, load_stage, load_study  # noqa: E402  (it puts the repository root on sys.path)
import common  # noqa: E402
import plot_layers  # noqa: E402  (the logit lens per block: its tables)
import plot_losses  # noqa: E402  (the held-out and training loss curves)


class Results:
    """Where each run's files are (the results folder, or the folder a reused run lives in) and what they hold."""

    def __init__(self, study, results):
        self.study, self.cache, self.jsons = study, {}, {}
        self.where = {}
        for name, run in study.runs_expanded.items():
            folder = run_folder(run, results)
            self.where[name] = (os.path.join(folder, "eval"), run["stored_as"], os.path.join(folder, "train"))

    def run_json(self, run):
        folder, stored, _ = self.where[run]
        if folder not in self.jsons:
            self.jsons[folder] = common.load_runs(folder) if os.path.isdir(folder) else {}
        return self.jsons[folder].get(stored)

    def entry(self, run, cell):
        task, lang = cell.split()
        return ((self.run_json(run) or {}).get("results", {}).get(task) or {}).get(lang)

    def item_cell(self, run, cell, metric):
        """common.ItemCell of one run's cell (a fresh copy: aligning reorders it), or None while not evaluated."""
        key = (run, cell, metric)
        if key not in self.cache:
            entry, (folder, stored, _) = self.entry(run, cell), self.where[run]
            rows = common.read_items(folder, stored, *cell.split()) if entry else None
            stage3 = load_stage("03_evaluate")  # its cells as the statistics see them, here in %
            self.cache[key] = None if rows is None else stage3.item_cell(entry, rows, metric, percent=True)
        return copy.copy(self.cache[key])

    def cells(self, run, measure):
        m = self.study["measures"][measure]
        cells = [self.item_cell(run, c, m["metric"]) for c in m["cells"]]
        return None if any(c is None for c in cells) else cells

    def score(self, run, measure):
        """(value, item standard error or None) of a run on a measure, or None while it is not evaluated. A measure
        of several cells: the mean of the cells, its SE from the cells' (disjoint items): sqrt(sum se^2) / K."""
        m = self.study["measures"][measure]
        cells = self.cells(run, measure)
        if cells is None:
            return None
        ses = [cell_se(self.entry(run, c), m["metric"]) for c in m["cells"]]
        se = None if None in ses else math.sqrt(sum(s * s for s in ses)) / len(ses)
        return float(np.mean([c.value() for c in cells])), se


def run_folder(run, results_dir):
    """The results folder a run's files are in: the study's, or the one a reused run lives in."""
    return os.path.join(ROOT, run["reuse"]) if run["reuse"] else results_dir


def cell_se(entry, metric):
    """The run JSON's standard error of a cell, on the table's scale (per-item scores in %)."""
    metric = metric or ("nll" if entry["aggregation"] == "ratio" else entry["metric"])  # the task's own, if none
    m = entry.get("metrics", {}).get(metric) or (entry.get("metrics", {}).get("f1") if metric == "f1_lang" else None)
    se = m.get("stderr") if m else entry.get("stderr") if metric in (entry["metric"], "nll") else None
    return None if se is None else se * (100.0 if entry["aggregation"] == "mean" else 1.0)


def term_runs(study, name, seeds=None):
    runs = study.groups.get(name, [name])
    return [r for r in runs if seeds is None or name not in study.groups or study.runs_expanded[r]["seed"] in seeds]


def study_contrast(study, results, name, measure):
    """contrast() of contrast NAME on one measure (its groups' runs of its seeds, default all), wherever it is asked."""
    con = study["contrasts"][name]
    terms = [(t, coef, term_runs(study, t, con["seeds"])) for t, coef in con["terms"].items()]
    return contrast(results, terms, measure, study["resampling"])


def contrast(results, terms, measure, resampling):
    """terms {run or group: coefficient} -> the bootstrap of one measure (one shared draw per resample), with each
    term's value (its runs averaged) on the shared items; None while a run is not evaluated."""
    expanded = [(coef / len(runs), name, run) for name, coef, runs in terms for run in runs]
    cells = [results.cells(run, measure) for _, _, run in expanded]
    if not expanded or any(c is None for c in cells):
        return None
    common.align_cells(cells)
    res = common.contrast_bootstrap([(coef, c) for (coef, _, _), c in zip(expanded, cells)], resampling["B"],
                                    resampling["seed"], resampling["draws"])
    values = {}
    for name, _, runs in terms:  # cell by cell, the runs averaged (as the committed tables summed them)
        mine = [c for (_, n, _), c in zip(expanded, cells) if n == name]
        values[name] = float(sum(np.mean([c[k].value() for c in mine]) / len(mine[0]) for k in range(len(mine[0]))))
    res.pop("boot")
    return dict(res, values=values)


def fmt(x, measure_cells):
    """A score: NLL to 3 decimals, everything else (%, chrF) to 2 (differences are printed to 3)."""
    if x is None:
        return "–"
    return f"{x:.3f}" if all(c.split()[0] == "nll" for c in measure_cells) else f"{x:.2f}"


def build(study, results_dir):
    results, res = Results(study, results_dir), study["resampling"]
    measures = study["measures"]
    out = dict(study=study["study"]["name"], resampling=res, runs={}, groups={}, contrasts={}, families={},
               spread=[], wall={}, fits={}, references=study["references"])
    for run in study.runs_expanded:
        out["runs"][run] = {m: results.score(run, m) for m in measures}
    for group, runs in study.groups.items():
        if len(runs) > 1:
            row = {}
            for m in measures:
                vals = [out["runs"][r][m][0] for r in runs if out["runs"][r][m] is not None]
                row[m] = dict(mean=float(np.mean(vals)) if vals else None, k=len(vals),
                              se=float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else None)
            out["groups"][group] = row
    for name, con in study["contrasts"].items():
        out["contrasts"][name] = {m: study_contrast(study, results, name, m) for m in con["measures"]}
        for m, r in out["contrasts"][name].items():  # the reference's own contrast, where it has every term's cell
            refs = [study["references"]["values"].get(t, {}).get(m) for t in con["terms"]]
            if r is not None and None not in refs:  # "~N": a reading of a garbled cell, and so is the difference
                r["reference"] = sum(c * float(str(v).lstrip("~")) for c, v in zip(con["terms"].values(), refs))
                r["reference_approx"] = any(str(v).startswith("~") for v in refs)
    for name, fam in study["families"].items():
        tests = [(c, m) for c in fam["contrasts"] for m in fam["measures"] or study["contrasts"][c]["measures"]]
        got = [out["contrasts"][c].get(m) or study_contrast(study, results, c, m) for c, m in tests]
        ps = [g["p"] if g else 1.0 for g in got]  # a test not yet run counts as p = 1
        rows = []
        for (c, m), g, (p_holm, k) in zip(tests, got, common.holm(ps, [common.p_at_floor(p, res["B"]) for p in ps])):
            name_p = study["contrasts"][c]["placebo"] or fam["placebo"]  # a contrast's own placebo, else the family's
            placebo = (out["contrasts"][name_p].get(m) or study_contrast(study, results, name_p, m)) if name_p else None
            # a named placebo not yet run leaves the claim pending: the rule needs it
            claim = None if g is None or (name_p and placebo is None) else bool(
                p_holm < fam["alpha"] and (g["lo"] > 0 or g["hi"] < 0)
                and (placebo is None or abs(g["delta"]) > abs(placebo["delta"])))
            # the equivalence reading ("loses its penalty"): the whole interval within ±|placebo Δ|
            within = None if g is None or placebo is None else bool(
                -abs(placebo["delta"]) <= g["lo"] and g["hi"] <= abs(placebo["delta"]))
            rows.append(dict(contrast=c, measure=m, result=g, p_holm=p_holm, p_holm_bound=k is not None,
                             placebo=placebo, claim=claim, within_placebo=within))
        out["families"][name] = rows
    for group, runs in study.groups.items():
        for i, a in enumerate(runs):
            for b in runs[i + 1:]:
                for m in measures:
                    r = contrast(results, [(b, 1.0, [b]), (a, -1.0, [a])], m, res)
                    if r:
                        out["spread"].append(dict(group=group, a=a, b=b, measure=m, **r))
    for run in study.runs_expanded:
        rows, fit = train_file(results, run), train_file(results, run, common.INTERVENTION_CONFIG)
        if fit:  # 02 --fit: nothing trained; its fitting time and held-out residual per block
            out["fits"][run] = {k: fit.get(k) for k in ("method", "placebo", "layers", "positions", "fit_seconds",
                                                        "heldout_residual", "n_pairs_used", "n_eval_pairs")}
        entries = [e for t in (results.run_json(run) or {}).get("results", {}).values() for e in t.values()]
        out["wall"][run] = dict(train_s=plot_losses.busy_seconds(rows) if rows else None,
                                steps=rows[-1]["step"] if rows else None,
                                step_s=sum(r.get("seconds", 0) for r in rows) if rows else None,
                                heldout_s=sum(r.get("eval_seconds") or 0 for r in rows) if rows else None,
                                eval_s=sum(e.get("seconds", 0) for e in entries) if entries else None)
    out["curves"], out["item_checks"] = [], []
    for a, b in pairs_of(study, "curves", "-"):  # e.g. one run trained on two machines: held-out L_TFT side by side
        ca, cb = ({r["step"]: r["eval_loss_tft"] for r in train_file(results, x) or []
                   if r.get("eval_loss_tft") is not None} for x in (a, b))
        out["curves"].append(dict(a=a, b=b, rows=[dict(step=s, a=ca[s], b=cb[s], diff=ca[s] - cb[s])
                                                  for s in sorted(set(ca) & set(cb))]))
    for a, b in pairs_of(study, "item_checks", "="):  # e.g. base evaluated again: the same per-item files?
        out["item_checks"].append(dict(a=a, b=b, cells=item_check(results, a, b)))
    return out


def placebo_rule(study, fam):
    own = [c for c in fam["contrasts"] if study["contrasts"][c]["placebo"]]
    if fam["placebo"]:
        return f" and |Δ| > |placebo Δ| (placebo: {fam['placebo']}" + (", or the contrast's own" if own else "") + ")"
    return " and |Δ| > |placebo Δ| (each contrast's own placebo)" if own else ""


def train_file(results, run, name="train_log.jsonl"):
    """A file 02 wrote for a run (its training log's rows, a fit's intervention_config.json), or None without it."""
    _, stored, train_dir = results.where[run]
    path = common.existing_path(os.path.join(train_dir, stored, name))  # or its .gz
    if path is None:
        return None
    return common.read_jsonl(path) if name.endswith(".jsonl") else common.read_json(path)


def pairs_of(study, key, sep):
    """[tables] curves ("A - B") or item_checks ("A = B") as run pairs."""
    pairs = [[x.strip() for x in spec.split(f" {sep} ")] for spec in study["tables"][key]]
    for pair in pairs:
        if len(pair) != 2 or any(r not in study.runs_expanded for r in pair):
            raise common.UserError(f"[tables] {key}: '{(' ' + sep + ' ').join(pair)}' is not two runs of the study "
                                   f"as 'RUN {sep} RUN' (runs: {', '.join(study.runs_expanded)})")
    return pairs


def item_check(results, a, b):
    """Per cell both runs have (b's order): items, identical rows, same predictions and scores, the largest
    difference of any number in a row."""
    cells = []
    for task, langs in (results.run_json(b) or {}).get("results", {}).items():
        for lang in langs:
            if results.entry(a, f"{task} {lang}") is None:
                continue
            rows_a, rows_b = (common.read_items(results.where[r][0], results.where[r][1], task, lang) for r in (a, b))
            pred = lambda r: (r.get("pred", r.get("prediction")), r.get("scores"))  # noqa: E731
            cells.append(dict(cell=f"{task} {lang}", n_a=len(rows_a), n_b=len(rows_b),
                              identical=sum(x == y for x, y in zip(rows_a, rows_b)),
                              same_predictions=sum(pred(x) == pred(y) for x, y in zip(rows_a, rows_b)),
                              max_abs_diff=max((max_abs_diff(x, y) for x, y in zip(rows_a, rows_b)), default=0.0),
                              equal=rows_a == rows_b))
    return cells


def max_abs_diff(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b)
    if isinstance(a, dict) and isinstance(b, dict):
        return max((max_abs_diff(a[k], b[k]) for k in a if k in b), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0


def with_se(value, se, measure_cells):
    return fmt(value, measure_cells) + (f" ± {fmt(se, measure_cells)}" if se is not None else "")


def markdown(study, t, results_dir):
    measures, res = study["measures"], study["resampling"]
    label = lambda m: measures[m]["label"] or m  # noqa: E731
    refs = study["references"]["values"]
    s = study["study"]
    term_label = lambda term: (study["runs"].get(term) or study.runs_expanded[term])["label"] or term  # noqa: E731
    contrast_label = lambda name: study["contrasts"][name]["label"] or name  # noqa: E731
    interval = lambda r: f"[{r['lo']:+.3f}, {r['hi']:+.3f}]"  # noqa: E731
    yes_no = lambda flag: "–" if flag is None else "yes" if flag else "no"  # noqa: E731
    p_text = lambda p: common.fmt_p(p, res["B"], 1 if common.p_at_floor(p, res["B"]) else None)  # noqa: E731
    shown = lambda path: os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path  # noqa: E731
    command = f"scripts/study_tables.py {shown(s['path'])}" + (
        "" if os.path.normpath(os.path.join(ROOT, s["results"])) == results_dir else f" --out {shown(results_dir)}")
    lines = [f"# {study['tables']['title'] or s['name']}\n", f"Question: {s['question']}\n" if s["question"] else "",
             f"Pre-registration: {s['preregistration']}\n" if s["preregistration"] else "",
             (study["tables"]["notes"] or s["notes"]) + "\n" if study["tables"]["notes"] or s["notes"] else "",
             f"Written by `{command}`. NLL in nats/token "
             "(lower is better); accuracies and F1 in %; chrF / BLEU 0-100. Bootstrap: "
             f"{res['B']:,} resamples, seed {res['seed']}, {res['draws']} draws; one item draw per resample shared "
             "by every run of a contrast; 95% percentile intervals; two-sided p (common.bootstrap_p).\n"]
    ms = list(measures)  # and the runs: a fit's own row is empty (its hooked runs are scored; its time is in Fits)
    scored_runs = [r for r, row in t["runs"].items() if r not in t["fits"] or any(v is not None for v in row.values())]
    lines += ["## Scores (± item standard error)\n" + (f"\nIn brackets: {study['references']['source']}.\n"
                                                      if refs else ""),
              *common.table_header("run", *map(label, ms))]
    for run in scored_runs:
        row, group = t["runs"][run], study.runs_expanded[run]["group"]
        cells = []
        for m in ms:
            v = row[m]
            text = "–" if v is None else with_se(v[0], v[1], measures[m]["cells"])
            ref = refs.get(run, refs.get(group, {})).get(m)
            cells.append(text + (f" ({ref})" if ref is not None else ""))
        lines.append(f"| {study.runs_expanded[run]['label']} | " + " | ".join(cells) + " |")
    if t["groups"]:
        lines += ["\n## Seed groups (mean over seeds ± standard error over seeds, sd / sqrt(k))\n",
                  *common.table_header("group", *map(label, ms))]
        for group, row in t["groups"].items():
            cells = ["–" if row[m]["mean"] is None else with_se(row[m]["mean"], row[m]["se"], measures[m]["cells"])
                     + (f" (k = {row[m]['k']})" if row[m]["k"] < len(study.groups[group]) else "") for m in ms]
            lines.append(f"| {term_label(group)} | " + " | ".join(cells) + " |")
    holm = {(r["contrast"], r["measure"]): r for rows in t["families"].values() for r in rows}
    for name, rows in t["contrasts"].items():
        con = study["contrasts"][name]
        terms = " ".join(f"{'+' if c >= 0 else '−'} {abs(c):g} × {n}" for n, c in con["terms"].items()).lstrip("+ ")
        lines += [f"\n## Contrast {con['label'] or name}: {terms}"
                  + (f" (seeds {', '.join(map(str, con['seeds']))})" if con["seeds"] else "") + "\n",
                  *common.table_header("measure", *map(term_label, con["terms"]), "Δ", "95% interval", "p", "p (Holm)",
                                       "items")]
        for m, r in rows.items():
            h = holm.get((name, m))
            ph = "–" if h is None else ("≤ " if h["p_holm_bound"] else "") + f"{h['p_holm']:.4f}"
            if r is None:
                lines.append(f"| {label(m)} | " + " | ".join("–" for _ in con["terms"]) + " | not yet run | | | "
                             f"{ph} | |")
                continue
            vals = " | ".join(fmt(r["values"][n], measures[m]["cells"]) for n in con["terms"])
            ref = f" (reference {'~' * r['reference_approx']}{r['reference']:+.2f})" if "reference" in r else ""
            lines.append(f"| {label(m)} | {vals} | {r['delta']:+.3f}{ref} | {interval(r)} | {p_text(r['p'])} | "
                         f"{ph} | {'+'.join(map(str, r['n']))} |")
    for name, rows in t["families"].items():
        fam = study["families"][name]
        lines += [f"\n## Confirmatory family {name}: Holm over {len(rows)} tests (a test not yet run counts as p = 1)"
                  "\n", f"Claimed only if p (Holm) < {fam['alpha']}, the interval excludes 0"
                  + placebo_rule(study, fam) + ".\n",
                  *common.table_header("contrast", "measure", "Δ", "95% interval", "p", "p (Holm)",
                                       "placebo Δ [95%]", "claim", "interval within ±|placebo Δ|")]
        for r in rows:
            g, pl = r["result"], r["placebo"]
            place = "–" if pl is None else f"{pl['delta']:+.3f} {interval(pl)}"
            body = "not yet run | | " if g is None else f"{g['delta']:+.3f} | {interval(g)} | {p_text(g['p'])}"
            lines.append(f"| {contrast_label(r['contrast'])} | {label(r['measure'])} | {body} | "
                         f"{'≤ ' if r['p_holm_bound'] else ''}{r['p_holm']:.4f} | {place} | "
                         f"{yes_no(r['claim'])} | {yes_no(r['within_placebo'])} |")
    if t["spread"]:
        lines += ["\n## Seed-to-seed spread (the same bootstrap, one run each side: what seeds alone change)\n",
                  *common.table_header("A → B", "measure", "A", "B", "B − A", "95% interval", "p")]
        for r in t["spread"]:
            c, a, b = measures[r["measure"]]["cells"], r["a"], r["b"]
            lines.append(f"| {term_label(a)} → {term_label(b)} | {label(r['measure'])} | {fmt(r['values'][a], c)} | "
                         f"{fmt(r['values'][b], c)} | {r['delta']:+.3f} | {interval(r)} | {p_text(r['p'])} |")
    lines += ["\n## Wall time per run\n", "Training: the logged optimizer-step and held-out seconds (model loading, "
              "checkpoint saves and steps lost to a killed attempt excluded); evaluation: the run JSON's per-cell "
              "seconds.\n", *common.table_header("run", "steps", "training s", "of which held-out s", "evaluation s")]
    secs = lambda s: "–" if s is None else f"{s:.1f}"  # noqa: E731
    lines += [f"| {run} | {w['steps'] or '–'} | {secs(w['train_s'])} | {secs(w['heldout_s'])} | {secs(w['eval_s'])} |"
              for run, w in t["wall"].items() if run in scored_runs]
    if t["fits"]:
        lines += ["\n## Fits (02 --fit: nothing trained)\n", "Held-out residual per block: |f(h_tgt) − h_en|² / "
                  "|h_tgt − h_en|² over the dev pairs, f the fitted map (1: no closer than no map).\n",
                  *common.table_header("run", "method", "blocks", "positions", "fitting s", "held-out residual")]
        for run, f in t["fits"].items():
            blocks = ", ".join(map(str, f["layers"])) if len(f["layers"]) < 4 else f"{len(f['layers'])} blocks"
            ratios = ", ".join(f"{k}: {v['ratio']:.3f}" for k, v in (f["heldout_residual"] or {}).items())
            method = f["method"] + (f" (placebo: {f['placebo']})" if f.get("placebo") else "")
            lines.append(f"| {run} | {method} | {blocks} | {f['positions']} | {f['fit_seconds']:.0f} | {ratios} |")
    lines += plot_layers.layer_tables(study, {n: run_folder(r, results_dir) for n, r in study.runs_expanded.items()})
    for c in t["curves"]:
        lines += [f"\n## Held-out L_TFT (nats/token): {c['a']} beside {c['b']}\n",
                  *common.table_header("step", c["b"], c["a"], f"{c['a']} − {c['b']}")]
        lines += [f"| {r['step']} | {r['b']:.5f} | {r['a']:.5f} | {r['diff']:+.5f} |" for r in c["rows"]]
    for c in t["item_checks"]:
        lines += [f"\n## Per-item files of {c['a']} against {c['b']}\n", *common.table_header(
            "cell", "items", "identical rows", "same predictions", "max abs diff of numbers", "equal")]
        lines += [f"| {x['cell']} | {x['n_b']} / {x['n_a']} | {x['identical']} | {x['same_predictions']} | "
                  f"{x['max_abs_diff']:.3g} | {'yes' if x['equal'] else 'no'} |" for x in c["cells"]]
    return "\n".join(line for line in lines if line != "") + "\n"


def loss_curves(study, results_dir, path):
    """plot_losses' held-out / training curves of every trained run with a training log; False when none has one."""
    results = Results(study, results_dir)
    logs = {name: train_file(results, name) for name, run in study.runs_expanded.items() if run["train"]}
    logs = {name: rows for name, rows in logs.items() if rows is not None}
    if logs:
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):  # its table goes to loss_curves.md, not into tables.md's print
            plot_losses.heldout(logs, path)
    return bool(logs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="the study file, e.g. studies/tiny.toml")
    p.add_argument("--out", help="results folder to read and write (default: the study's study.results)")
    args = p.parse_args(argv)
    study = load_study(args.study, check_flags=False)
    out = os.path.abspath(args.out) if args.out else os.path.join(ROOT, study["study"]["results"])
    tables = build(study, out)
    if study["measures"] and all(v is None for row in tables["runs"].values() for v in row.values()):
        raise common.UserError(f"no run of {args.study} has results under {out}: run scripts/run_study.py "
                               f"{args.study} first, or pass --out where they are")
    text = markdown(study, tables, out)
    os.makedirs(out, exist_ok=True)
    if study["tables"]["loss_curves"] and loss_curves(study, out, os.path.join(out, "loss_curves.png")):
        text += "\nLoss curves: `loss_curves.png` (held-out and training L_TFT per run; `loss_curves.md`).\n"
    name = os.path.join(out, study["tables"]["file"])  # e.g. tables: tables.md and tables.json
    with common.atomic_open(name + ".md") as f:
        f.write(text)
    common.write_json(name + ".json", tables)
    print(text + f"\nwrote {name}.md and {name}.json")


if __name__ == "__main__":
    common.run_main(main)
