"""The study file (studies/README.md): its schema, and load_study(), which parses and validates one.

    from study_file import load_study        # scripts/run_study.py, study_tables.py and check_studies.py do
    study = load_study("studies/tiny.toml")   # a Study, or UserError("FILE:LINE: the problem; the fix")

Validation reads only: an unknown section or key, a wrong type, a placeholder where the runner does not fill it,
a run whose flags 02_train_dft.py refuses (its own parser and configuration check, nothing runs), pairs or
evaluation flags 01 / 03 refuse (an unknown task included), a contrast naming a run, measure or seed the study does
not define, a measure naming a task 03 does not have or a cell no evaluation part writes, a contrast (or a family's
test or placebo) on a cell no part evaluates for one of its runs, a comparative contrast whose coefficients do not
sum to zero: each is one error naming the line of the file and the fix.
"""
import argparse
import contextlib
import difflib
import importlib.util
import io
import os
import re
import string
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from common import UserError  # noqa: E402

# -----------------------------------------------------------------------------
# the study file: every section and key, its type and default (studies/README.md documents each)

STRS, INTS = "list of strings", "list of integers"
SCHEMA = {
    "study": {"name": (str, None), "question": (str, ""), "results": (str, None), "work": (str, None),
              "model": (str, common.DEFAULT_MODEL), "preregistration": (str, None), "notes": (str, "")},
    "setup": {"name": (str, None), "command": (STRS, None)},  # [[setup]]: an array of tables
    "pairs": {"flags": (STRS, None), "file": (str, None), "sha256": (str, None), "dev_sha256": (str, None)},
    "train": {"flags": (STRS, [])},
    "runs": {"flags": (STRS, []), "seeds": (INTS, None), "seed": (int, None), "pairs": (str, None),
             "model": (str, None), "train": (bool, True), "reuse": (str, None), "stored_as": (str, None),
             "label": (str, None), "after": (STRS, [])},
    "evaluation": {"flags": (STRS, []), "parts": (list, [])},
    "evaluation.parts": {"name": (str, None), "flags": (STRS, []), "runs": (STRS, None), "analysis": (bool, False)},
    "measures": {"label": (str, None), "cells": (STRS, None), "metric": (str, None)},
    "contrasts": {"terms": (dict, None), "measures": (STRS, None), "seeds": (INTS, None), "comparative": (bool, True),
                  "label": (str, None), "placebo": (str, None)},
    "families": {"contrasts": (STRS, None), "measures": (STRS, None), "placebo": (str, None), "alpha": (float, 0.05)},
    "resampling": {"B": (int, 10000), "seed": (int, 1234), "draws": (str, "multinomial")},
    "compute": {"lanes": (int, 1), "eval_queues": (int, 1), "precision": (str, "float32"), "save_every": (int, 0),
                "processes": (int, 1), "threads": (int, 1), "retries": (int, 3), "env": (dict, {}),
                "allow_emulated": (bool, False), "planner": (STRS, None), "tokens_per_s": (float, None),
                "launch_flags": (STRS, []), "keep_checkpoints": (bool, False)},
    "references": {"source": (str, ""), "values": (dict, {})},
    "tables": {"title": (str, None), "notes": (str, ""), "loss_curves": (bool, True), "layers_reference": (str, None),
               "curves": (STRS, []), "item_checks": (STRS, []), "file": (str, "tables")},
}
NAMED = ("pairs", "runs", "measures", "contrasts", "families")  # [section.NAME] tables
LISTED = ("setup", "evaluation.parts")  # [[section]] arrays of tables
PRECISIONS = {"float32": "no", "bf16": "bf16", "auto": "auto"}  # compute.precision -> 02's --mixed-precision
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*$")
PLACEHOLDERS = dict(work="W", results="R", pairs="P.jsonl", dev="P.dev.jsonl", model="M", run="r", seed=1)
# the placeholders run_study.py fills in each place of a study file (studies/README.md)
BASE, MODEL = ("work", "results"), ("work", "results", "run", "seed")
TRAINING, EVALUATION = ("work", "results", "pairs", "dev", "run", "seed"), tuple(PLACEHOLDERS)
NO_PATH = os.path.join(os.devnull, "out")  # an --out for the stages' parsers that no file can be


class Study(dict):
    """The parsed study: its sections with defaults filled in, plus `runs_expanded` (run name -> name, group,
    seed, flags, pairs, train, model, reuse, stored_as, label: seeds expanded) and `groups` (entry -> its runs)."""
    __getattr__ = dict.__getitem__


def key_line(text, section, key=None, nth=0):
    """The 1-based line of `key` in table `section` (dotted, e.g. 'runs.tft'; its nth occurrence for [[arrays]])
    of the TOML text, else the table's header line, else 0."""
    want, header, found, seen = section.split(".") if section else [], None, 0, -1
    for lineno, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$", line)
        if m:
            header = [n.strip().strip('"\'') for n in m.group(1).split(".")]
            seen += header == want
            if header == want and seen == nth:
                found = found or lineno
            continue
        if key and header == want and seen == nth and re.match(rf"""\s*["']?{re.escape(key)}["']?\s*=""", line):
            return lineno
    if found or key is not None:
        return found
    if len(want) > 1:
        return key_line(text, ".".join(want[:-1]), want[-1])
    return next((n for n, line in enumerate(text.splitlines(), 1)  # [section.NAME] of an unknown section
                 if re.match(rf"\s*\[\[?\s*{re.escape(section)}\s*[.\]]", line)), 0)


def type_ok(value, kind):
    if kind in (STRS, INTS):
        item = str if kind == STRS else int
        return isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


class Checker:
    """Raises the one error of a bad study file: `file:line: problem; fix`."""

    def __init__(self, path, text):
        self.path, self.text = path, text

    def need(self, ok, section, key, problem, fix, nth=0):
        if not ok:
            line = key_line(self.text, section, key, nth)
            raise UserError(f"{self.path}{f':{line}' if line else ''}: {problem}; {fix}")

    def table(self, section, table, nth=0):
        schema = SCHEMA[section.split(".")[0] if section.split(".")[0] in NAMED else section]
        self.need(isinstance(table, dict), section, None, f"[{section}] must be a table", f"write it as [{section}]")
        for key, value in table.items():
            self.need(key in schema, section, key, f"unknown key {key!r} in [{section}]",
                      f"use one of {', '.join(schema)} (studies/README.md)", nth)
            kind = schema[key][0]
            self.need(type_ok(value, kind), section, key, f"{section}.{key} must be a "
                      f"{kind if isinstance(kind, str) else kind.__name__}, not {value!r}", "fix its value", nth)
        return {key: table.get(key, default) for key, (_, default) in schema.items()}

    def names(self, names, section, key, known, what, nth=0):
        for name in names or []:
            self.need(name in known, section, key, f"{section} names {what} {name!r}, which the study does not "
                      "define", f"use one of {', '.join(known) or '(none defined)'}", nth)


def load_stage(name):
    """A numbered stage as a module (its file name is not an identifier)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, name + ".py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@contextlib.contextmanager
def argparse_raises():
    """argparse's error() raises ValueError instead of printing usage and exiting: a stage's parser judges flags."""
    def error(self, message):
        raise ValueError(message)
    original, argparse.ArgumentParser.error = argparse.ArgumentParser.error, error
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        argparse.ArgumentParser.error = original


def fill(flags, values):
    """The placeholders {work}, {results}, {pairs}, {dev}, {model}, {run}, {seed} in a list of flags."""
    return [f.format(**values) if "{" in f else f for f in flags]


# flags that do not change a stage's outputs (03's items are independent of their batching): not in a part's record
UNRECORDED = {"02_train_dft.py": {"--resume": 0, "--save-every": 1}, "03_evaluate.py": {"--batch-size": 1}}


def command_of(argv, folders=()):
    """A part's stage arguments after its script, less UNRECORDED, with each of `folders` (name, path) written as
    {name}: what the part's marker records, so that a study changed since the part ran is noticed (and a moved
    folder is not)."""
    at = next((i for i, a in enumerate(argv) if a.endswith(".py")), 0)
    skip, args, kept = UNRECORDED.get(os.path.basename(argv[at]), {}), argv[at + 1:], []
    while args:
        n = skip.get(args[0], -1) + 1
        kept, args = kept + args[:1] * (n == 0), args[max(n, 1):]
    text = " ".join(kept)
    for name, path in sorted(folders, key=lambda f: -len(f[1])):  # the longer first: one may hold the other
        text = re.sub(re.escape(os.path.normpath(path)) + r"(?=/|\s|$)", "{" + name + "}", text)
    return text


def command_change(old, new):
    """The first difference of two recorded commands, e.g. '--limit 4 -> --limit 3' (and how many more there are)."""
    a, b = old.split(), new.split()
    ops = [op for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if not ops:
        return "only spacing differs"
    _, i1, i2, j1, j2 = ops[0]  # i1 == j1: what comes before is the same
    k = int(i1 > 0 and not (a[i1:i2] + b[j1:j2])[0].startswith("-"))  # a value changed: its flag too
    more = f"; {len(ops) - 1} more difference(s)" if len(ops) > 1 else ""
    show = lambda words: " ".join(words[:6]) + (" ..." if len(words) > 6 else "") or "(nothing)"  # noqa: E731
    return f"{show(a[i1 - k:i2])} -> {show(b[j1 - k:j2])}{more}"


def placeholders(strings):
    """The placeholder names in strings ('{' for a lone brace, which str.format refuses)."""
    try:
        return {name for s in strings for _, name, _, _ in string.Formatter().parse(s) if name is not None}
    except ValueError:
        return {"{"}


def stage_refuses(stage, argv):
    """Why the stage's own parser (and 02's configuration check, 03's task names) refuses argv, or None; nothing
    runs."""
    module = load_stage(stage)
    try:
        with argparse_raises():
            args = module.parse_args(argv)
            if stage == "02_train_dft":
                module.resolve_config(args)
            if stage == "03_evaluate":
                module.task_names(args.tasks)
    except (ValueError, UserError) as e:
        return str(e)


def part_cells(stage3, args):
    """[(result key, cell)] an evaluation part writes into its run JSON: its tasks x languages that have data x
    directions (as 03_evaluate.plan, without reading a --pairs file that does not exist yet)."""
    cells = []
    for task in stage3.task_names(args.tasks):
        spec = stage3.TASKS[task]
        try:
            have = spec.languages(args)
        except (UserError, OSError):  # nll before its pairs are built: every language asked for
            have = None
        cells += [(spec.result_key(args), d.replace("xx", lang) if d else lang)
                  for lang in common.parse_list(args.langs) if have is None or lang in have for d in spec.directions]
    return cells


def expand_runs(study, check):
    """runs.NAME with seeds [1, 2] -> runs NAME-s1, NAME-s2; without -> one run NAME."""
    runs, groups, pair_sets = {}, {}, list(study["pairs"])
    for name, r in study["runs"].items():
        section = f"runs.{name}"
        check.need(NAME_RE.match(name), section, None, f"run name {name!r} cannot be a file name",
                   "use letters, digits, '.', '_' and '-'")
        check.need(r["seeds"] is None or r["seed"] is None, section, "seed", f"runs.{name} has both seed and seeds",
                   "keep one: seeds = [1, 2] names runs NAME-s1, NAME-s2; seed = 1 keeps the name NAME")
        pairs = r["pairs"] or (pair_sets[0] if len(pair_sets) == 1 else None)
        if r["train"] and not r["reuse"]:
            check.names([pairs], section, "pairs", pair_sets, "pairs")
        check.names(r["after"], section, "after", list(groups) + list(runs), "run defined above it")
        groups[name] = []
        trains_on_dev = "dev" in placeholders(study["train"]["flags"] + r["flags"])  # e.g. --eval-pairs {dev}
        for seed in r["seeds"] if r["seeds"] is not None else [r["seed"]]:
            run = name if r["seeds"] is None else f"{name}-s{seed}"
            check.need(run not in runs, section, None, f"run {run} is defined twice", "rename one of them")
            after = [d for a in r["after"] for d in (groups.get(a, [a])) if runs[d]["seed"] == seed or not any(
                runs[x]["seed"] == seed for x in groups.get(a, [a]))]  # a group: its run of this seed, else all
            runs[run] = dict(name=run, group=name, seed=seed, flags=r["flags"], pairs=pairs, train=r["train"], after=after,
                             model=r["model"] or study["study"]["model"], reuse=r["reuse"],
                             reads_dev=r["train"] and not r["reuse"] and trains_on_dev,
                             label=f"{r['label']}, seed {seed}" if r["label"] and r["seeds"] else r["label"] or run,
                             stored_as=(r["stored_as"] or run).format(seed=seed, run=run, name=name))
            groups[name].append(run)
    return runs, groups


def load_study(path, check_flags=True):
    """Parse and validate a study file (nothing is written): a Study, or a UserError naming the line and the fix."""
    if not os.path.isfile(path):
        raise UserError(f"study file not found: {path} (a TOML file; studies/README.md says how to write one)")
    text = open(path, encoding="utf-8").read()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}; fix that line (an unclosed value: where it starts, "
                        "above)") from None
    check, study = Checker(path, text), Study()
    for section in raw:
        check.need(section in SCHEMA and section not in LISTED[1:], section, None, f"unknown section [{section}]",
                   f"use one of {', '.join(s for s in SCHEMA if s not in LISTED[1:])} (studies/README.md)")
    for section in SCHEMA:
        if section in NAMED:
            study[section] = {n: check.table(f"{section}.{n}", t) for n, t in raw.get(section, {}).items()}
        elif section in LISTED:
            tables = raw.get("evaluation", {}).get("parts", []) if section == "evaluation.parts" else raw.get(section, [])
            study[section] = [check.table(section, t, nth) for nth, t in enumerate(tables)]
        else:
            study[section] = check.table(section, raw.get(section, {}))
    s = study["study"]
    s["name"] = s["name"] or os.path.splitext(os.path.basename(path))[0]
    s["results"], s["work"] = s["results"] or f"results/{s['name']}", s["work"] or f"runs/{s['name']}"
    s["path"] = os.path.abspath(path)
    for name, p in study["pairs"].items():
        check.need((p["flags"] is None) != (p["file"] is None), f"pairs.{name}", None, f"pairs.{name} needs "
                   "exactly one of flags and file", "flags = [01 flags] builds them; file = PATH uses a finished file")
    for nth, entry in enumerate(study["setup"]):
        check.need(entry["name"] and entry["command"], "setup", None, "a [[setup]] needs name and command",
                   'write name = "..." and command = ["script.py", "arg", ...]', nth)
    r, c = study["resampling"], study["compute"]
    check.need(r["draws"] in ("multinomial", "indices"), "resampling", "draws", f"resampling.draws is "
               f"{r['draws']!r}", "use multinomial or indices")
    check.need(r["B"] >= 1, "resampling", "B", "resampling.B must be >= 1", "e.g. B = 10000")
    check.need(c["precision"] in PRECISIONS, "compute", "precision", f"compute.precision is {c['precision']!r}",
               f"use one of {', '.join(PRECISIONS)}")
    for key in ("lanes", "eval_queues", "processes", "threads", "retries"):
        check.need(c[key] >= 1, "compute", key, f"compute.{key} must be >= 1", f"e.g. {key} = 1")
    study["runs_expanded"], study["groups"] = runs, groups = expand_runs(study, check)
    run_names = list(groups) + [r for r in runs if r not in groups]
    parts = study["evaluation.parts"]
    for nth, part in enumerate(parts):
        check.need(part["name"] and NAME_RE.match(part["name"]) and [p["name"] for p in parts].count(part["name"]) == 1,
                   "evaluation.parts", "name", f"evaluation part name {part['name']!r} is missing, not a file name, or "
                   "used twice", "give each [[evaluation.parts]] a unique name", nth)
        check.names(part["runs"], "evaluation.parts", "runs", run_names, "run", nth)
        covered = [r for r in runs.values() if part["runs"] is None or {r["name"], r["group"]} & set(part["runs"])]
        flags = study["evaluation"]["flags"] + part["flags"]
        for r in covered if any("{dev}" in f or "{pairs}" in f for f in flags) else []:
            r["reads_dev"] = r["reads_dev"] or "dev" in placeholders(flags)  # its .dev.jsonl must exist (run_study)
            check.need(r["pairs"], "evaluation.parts", "flags", f"part {part['name']} uses {{dev}} or {{pairs}}, but "
                       f"run {r['name']} has no pair set", f"set pairs = \"...\" in [runs.{r['group']}]", nth)
    keys = sorted({key for spec in load_stage("03_evaluate").TASKS.values() for key in spec.result_keys})
    for name, m in study["measures"].items():
        check.need(m["cells"], f"measures.{name}", "cells", f"measures.{name} has no cells",
                   'give cells = ["TASK LANG", ...], e.g. ["nll zh"]')
        for cell in m["cells"]:
            check.need(len(cell.split()) == 2, f"measures.{name}", "cells", f"cell {cell!r} is not 'TASK LANG'",
                       'write e.g. "xnli zh" or "translation_tatoeba en-zh"')
            check.need(cell.split()[0] in keys, f"measures.{name}", "cells", f"measure {name} names task "
                       f"{cell.split()[0]!r}, which 03_evaluate.py does not have", f"use one of {', '.join(keys)}")
    measures = list(study["measures"])
    for name, con in study["contrasts"].items():
        section = f"contrasts.{name}"
        check.need(con["terms"], section, "terms", f"contrasts.{name} has no terms", "give terms = { dft = 1, tft = -1 }")
        check.names(con["terms"], section, "terms", run_names, "run")
        check.need(all(type_ok(v, float) for v in con["terms"].values()), section, "terms", f"contrasts.{name}: a "
                   "coefficient is not a number", "write numbers, e.g. { dft = 1, tft = -1 }")
        total = sum(con["terms"].values())
        check.need(not con["comparative"] or abs(total) < 1e-9, section, "terms", f"contrast {name} is comparative but "
                   f"its coefficients sum to {total:g}, not 0", "make them sum to 0 (e.g. { dft = 1, tft = -1 }), or "
                   "set comparative = false for a level")
        check.names(con["measures"], section, "measures", measures, "measure")
        for term in con["terms"] if con["seeds"] else []:
            have = {runs[r]["seed"] for r in groups.get(term, [])}
            check.need(term not in groups or set(con["seeds"]) <= have, section, "seeds", f"contrasts.{name} takes "
                       f"seeds {con['seeds']}, but run group {term} has seeds {sorted(have, key=str)}",
                       "list only seeds every group of its terms has, or name single runs instead of the group")
        check.names([con["placebo"]] * bool(con["placebo"]), section, "placebo", list(study["contrasts"]), "contrast")
        con["measures"] = con["measures"] or measures
    for name, fam in study["families"].items():
        check.need(fam["contrasts"], f"families.{name}", "contrasts", f"family {name} has no contrasts",
                   "list its confirmatory contrasts: contrasts = [...]")
        check.names(fam["contrasts"], f"families.{name}", "contrasts", list(study["contrasts"]), "contrast")
        check.names([fam["placebo"]] * bool(fam["placebo"]), f"families.{name}", "placebo", list(study["contrasts"]),
                    "contrast")
        check.names(fam["measures"], f"families.{name}", "measures", measures, "measure")
    check.need(NAME_RE.match(study["tables"]["file"]), "tables", "file", f"tables.file {study['tables']['file']!r} "
               "cannot be a file name", "use letters, digits, '.', '_' and '-' (no extension)")
    check.names([study["tables"]["layers_reference"]] * bool(study["tables"]["layers_reference"]), "tables",
                "layers_reference", list(groups), "run group")
    for group, values in study["references"]["values"].items():
        check.names([group], f"references.values.{group}", None, run_names, "run")
        check.names(values, f"references.values.{group}", None, measures, "measure")
    places = [(f"pairs.{n}", "flags", (p["flags"] or []) + [p["file"] or ""], BASE, 0)
              for n, p in study["pairs"].items()]
    places += [("setup", "command", e["command"], BASE, nth) for nth, e in enumerate(study["setup"])]
    places += [("compute", "launch_flags", c["launch_flags"] + (c["planner"] or []), BASE, 0),
               ("study", "model", [s["model"]], MODEL, 0), ("train", "flags", study["train"]["flags"], TRAINING, 0),
               ("evaluation", "flags", study["evaluation"]["flags"], EVALUATION, 0)]
    places += [(f"runs.{g}", "flags", r["flags"], TRAINING, 0) for g, r in study["runs"].items()]
    places += [(f"runs.{g}", "model", [r["model"] or ""], MODEL, 0) for g, r in study["runs"].items()]
    places += [("evaluation.parts", "flags", p["flags"], EVALUATION, nth) for nth, p in enumerate(parts)]
    for section, key, strings, allowed, nth in places:
        unknown = sorted(placeholders(strings) - set(allowed))
        what = "a lone brace" if unknown == ["{"] else "{" + (unknown or [""])[0] + "}"
        check.need(not unknown, section, key, f"{section}.{key} holds {what}, which is not filled there",
                   f"use only {', '.join('{' + a + '}' for a in allowed)} (studies/README.md)", nth)
    for run in runs.values() if check_flags else []:
        if run["train"] and not run["reuse"]:
            why = stage_refuses("02_train_dft", ["--pairs", "P", "--out", NO_PATH] + fill(study["train"]["flags"]
                                                                                   + run["flags"], PLACEHOLDERS))
            check.need(why is None, f"runs.{run['group']}", "flags", f"02_train_dft.py refuses run {run['name']}'s "
                       f"flags: {why}", "fix them (python 02_train_dft.py --help lists every flag)")
    for name, p in study["pairs"].items() if check_flags else []:
        why = p["flags"] is not None and stage_refuses("01_build_pairs", fill(p["flags"], PLACEHOLDERS) + ["--out", "P"])
        check.need(not why, f"pairs.{name}", "flags", f"01_build_pairs.py refuses pairs {name}'s flags: {why}",
                   "fix them (python 01_build_pairs.py --help lists every flag)")
    part_argvs = [["--model", "M", "--out", NO_PATH] + fill(study["evaluation"]["flags"] + part["flags"], PLACEHOLDERS)
                  for part in parts]
    for nth, (part, argv) in enumerate(zip(parts, part_argvs) if check_flags else []):
        why = stage_refuses("03_evaluate", argv)
        check.need(why is None, "evaluation.parts", "flags", f"03_evaluate.py refuses part {part['name']}'s flags: "
                   f"{why}", "fix them (python 03_evaluate.py --help lists every flag)", nth)
    if check_flags and not any(r["reuse"] for r in runs.values()):  # a reused run's cells come from its own study
        stage3, written = load_stage("03_evaluate"), {run: set() for run in runs}  # the cells each run's parts write
        for part, argv in zip(parts, part_argvs):
            with argparse_raises():
                args = stage3.parse_args(argv)
            cells = set() if part["analysis"] or args.analysis else {f"{k} {c}" for k, c in part_cells(stage3, args)}
            for r in runs.values():
                if part["runs"] is None or {r["name"], r["group"]} & set(part["runs"]):
                    written[r["name"]] |= cells
        anywhere = set().union(*written.values())
        for name, m in study["measures"].items():
            for cell in m["cells"]:
                check.need(cell in anywhere, f"measures.{name}", "cells", f"measure {name} reads cell {cell!r}, which "
                           "no evaluation part writes", "add its task and language to a part's --tasks and --langs")
        tests = [(f"contrasts.{c}", c, con["measures"]) for c, con in study["contrasts"].items()]
        for f, fam in study["families"].items():  # each confirmatory contrast and its placebo on the family's measures
            for c in fam["contrasts"]:
                tests += [(f"families.{f}", name, fam["measures"] or study["contrasts"][c]["measures"])
                          for name in (c, study["contrasts"][c]["placebo"] or fam["placebo"]) if name]
        for section, name, measure_names in tests:  # a test its runs are never evaluated on could never run
            con = study["contrasts"][name]
            for run in (r for t in con["terms"] for r in groups.get(t, [t])
                        if t not in groups or not con["seeds"] or runs[r]["seed"] in con["seeds"]):
                for cell in (c for m in measure_names for c in study["measures"][m]["cells"]):
                    check.need(cell in written[run], section, "measures", f"contrast {name} reads cell {cell!r} of "
                               f"run {run}, which no evaluation part evaluates for it", "add the run to a part that "
                               "writes the cell (its runs = [...]), or list the contrast's measures = [...] without "
                               "it (no measures key: every measure)")
    return study
