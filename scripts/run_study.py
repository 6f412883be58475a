#!/usr/bin/env python
"""Run a study: one TOML file (studies/README.md) -> pairs, trainings, evaluations, in its results folder.

    python scripts/run_study.py studies/tiny.toml --dry-run      # the plan: parts, tokens, a time estimate
    python scripts/run_study.py studies/tiny.toml                # run it; a rerun skips every finished part
    python scripts/run_study.py studies/tiny.toml --only tft     # just these runs (a group name means its seeds)

The stages stay what users run by hand: every part is one subprocess of 01_build_pairs.py, 02_train_dft.py or
03_evaluate.py, logged to WORK/logs/<part>.log; the driver logs to WORK/logs/driver.log. A finished part leaves a
marker in WORK/done/ and its small outputs (run JSONs, gzipped per-item files, training logs) in the results
folder; a part is also finished when the results folder already holds its outputs (a fresh checkout). A stopped
training resumes from its checkpoint; a killed part is tried again (compute.retries). Never commits to git.
"""
import argparse
import contextlib
import importlib.util
import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from common import UserError  # noqa: E402

# -----------------------------------------------------------------------------
# the study file: every section and key, its type and default (studies/README.md documents each)

STR, INT, FLOAT, BOOL, STRS, INTS, TABLE = str, int, float, bool, "list of strings", "list of integers", dict
NUMBER = (int, float)
SCHEMA = {
    "study": {"name": (STR, None), "question": (STR, ""), "results": (STR, None), "work": (STR, None),
              "model": (STR, common.DEFAULT_MODEL), "preregistration": (STR, None), "notes": (STR, "")},
    "setup": {"name": (STR, None), "command": (STRS, None)},  # [[setup]]: an array of tables
    "pairs": {"flags": (STRS, None), "file": (STR, None), "sha256": (STR, None), "dev_sha256": (STR, None)},
    "train": {"flags": (STRS, [])},
    "runs": {"flags": (STRS, []), "seeds": (INTS, None), "seed": (INT, None), "pairs": (STR, None),
             "model": (STR, None), "train": (BOOL, True), "reuse": (STR, None), "stored_as": (STR, None),
             "label": (STR, None)},
    "evaluation": {"flags": (STRS, []), "parts": (list, [])},
    "parts": {"name": (STR, None), "flags": (STRS, []), "runs": (STRS, None), "analysis": (BOOL, False)},
    "measures": {"label": (STR, None), "cells": (STRS, None), "metric": (STR, None)},
    "contrasts": {"terms": (TABLE, None), "measures": (STRS, None), "seeds": (INTS, None), "comparative": (BOOL, True),
                  "label": (STR, None)},
    "families": {"contrasts": (STRS, None), "measures": (STRS, None), "placebo": (STR, None), "alpha": (FLOAT, 0.05)},
    "resampling": {"B": (INT, 10000), "seed": (INT, 1234), "draws": (STR, "multinomial")},
    "compute": {"lanes": (INT, 1), "eval_queues": (INT, 1), "precision": (STR, "float32"), "save_every": (INT, 0),
                "processes": (INT, 1), "threads": (INT, 1), "retries": (INT, 3), "env": (TABLE, {}),
                "allow_emulated": (BOOL, False), "planner": (STRS, None), "tokens_per_s": (FLOAT, None)},
    "references": {"source": (STR, ""), "values": (TABLE, {})},
    "tables": {"title": (STR, None), "notes": (STR, ""), "loss_curves": (BOOL, True)},
}
NAMED = ("pairs", "runs", "measures", "contrasts", "families")  # [section.NAME] tables
PRECISIONS = {"float32": "no", "bf16": "bf16", "auto": "auto"}  # compute.precision -> 02's --mixed-precision
DRAWS = ("multinomial", "indices")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*$")


class Study(dict):
    """The parsed study: plain dicts with defaults filled in, plus `runs_expanded` (one entry per trained or
    evaluated run, seeds expanded) and `groups` (a run entry's name -> its runs)."""
    __getattr__ = dict.__getitem__


def key_line(text, section, key=None):
    """The 1-based line of `key` inside table `section` (dotted, e.g. 'runs.tft') of the TOML text; else the
    section's header line; else 0."""
    header, found = None, 0
    parts = section.split(".") if section else []
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$", s)
        if m:
            names = [n.strip().strip('"\'') for n in re.split(r"\.(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", m.group(1))]
            header = names
            if names == parts and not found:
                found = lineno
                if key is None:
                    return lineno
            continue
        if key is not None and header == parts and re.match(rf"""\s*["']?{re.escape(key)}["']?\s*=""", line):
            return lineno
    if key is not None and parts and not found:  # a dotted key at the top, or an inline table
        return key_line(text, ".".join(parts[:-1]), parts[-1]) if len(parts) > 1 else 0
    return found


class StudyError(UserError):
    pass


def study_error(path, text, section, key, problem, fix):
    line = key_line(text, section, key)
    where = f"{path}:{line}" if line else path
    return StudyError(f"{where}: {problem}; {fix}")


def type_ok(value, kind):
    if kind is STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind is INTS:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if kind is FLOAT:
        return isinstance(value, NUMBER) and not isinstance(value, bool)
    if kind is INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_table(path, text, section, table, schema):
    """Unknown keys and wrong types: one error naming the line; returns the table with defaults filled in."""
    if not isinstance(table, dict):
        raise study_error(path, text, section, None, f"[{section}] must be a table", "write it as [" + section + "]")
    out = {}
    for key, value in table.items():
        if key not in schema:
            raise study_error(path, text, section, key, f"unknown key {key!r} in [{section}]",
                              f"use one of {', '.join(schema)} (studies/README.md)")
        kind = schema[key][0]
        if not type_ok(value, kind):
            name = kind if isinstance(kind, str) else kind.__name__
            raise study_error(path, text, section, key, f"{section}.{key} must be a {name}, not {value!r}",
                              "fix its value (studies/README.md lists every key's type)")
    for key, (_, default) in schema.items():
        value = table.get(key, default)
        out[key] = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value
    return out


def load_stage(name):
    """A numbered stage as a module (its file name is not an identifier)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def argparse_raises():
    """argparse's error() raises instead of printing usage and exiting, so a stage's parser can judge flags."""
    original = argparse.ArgumentParser.error

    def error(self, message):
        raise ValueError(message)
    argparse.ArgumentParser.error = error
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            yield
    finally:
        argparse.ArgumentParser.error = original


def fill(flags, values):
    """Placeholders {work}, {results}, {pairs}, {dev}, {model}, {run}, {seed} in flags."""
    return [f.format(**values) if "{" in f else f for f in flags]


def check_stage_flags(path, text, section, stage, argv, why):
    """Ask the stage's own parser (and 02's configuration check) whether it accepts argv; nothing runs."""
    module = load_stage(stage)
    try:
        with argparse_raises():
            args = module.parse_args(argv)
            if stage == "02_train_dft":
                module.resolve_config(args)
    except (ValueError, UserError) as e:
        raise study_error(path, text, section, "flags", f"{stage}.py refuses {why}: {e}",
                          f"fix the flags (python {stage}.py --help lists them)") from None


def expand_runs(study, path, text):
    """runs.NAME with seeds [1, 2] -> NAME-s1, NAME-s2; without -> NAME. Each: flags, seed, pairs, model, reuse."""
    runs, groups = {}, {}
    pair_names = list(study["pairs"])
    for name, r in study["runs"].items():
        section = f"runs.{name}"
        if not NAME_RE.match(name):
            raise study_error(path, text, section, None, f"run name {name!r} has characters a file name cannot",
                              "use letters, digits, '.', '_' and '-'")
        if r["seeds"] is not None and r["seed"] is not None:
            raise study_error(path, text, section, "seed", f"runs.{name} has both seed and seeds",
                              "keep one: seeds = [1, 2] names runs NAME-s1, NAME-s2; seed = 1 keeps the name")
        pairs = r["pairs"] or (pair_names[0] if len(pair_names) == 1 else None)
        if r["train"] and not r["reuse"] and pairs not in study["pairs"]:
            raise study_error(path, text, section, "pairs", f"runs.{name} trains on pairs {r['pairs']!r}, which "
                              "the study does not define", f"name one of [pairs.*]: {', '.join(pair_names) or 'none'}")
        seeds = r["seeds"] if r["seeds"] is not None else [r["seed"]]
        groups[name] = []
        for seed in seeds:
            run = name if r["seeds"] is None else f"{name}-s{seed}"
            if run in runs:
                raise study_error(path, text, section, None, f"run {run} is defined twice", "rename one of them")
            stored = (r["stored_as"] or run).format(seed=seed, run=run, name=name)
            runs[run] = dict(name=run, group=name, seed=seed, flags=r["flags"], pairs=pairs, train=r["train"],
                             model=r["model"] or study["study"]["model"], reuse=r["reuse"], stored_as=stored,
                             label=r["label"] or run)
            groups[name].append(run)
    return runs, groups


def check_measures(study, path, text, tasks):
    keys = {key for spec in tasks.values() for key in spec.result_keys}
    for name, m in study["measures"].items():
        section = f"measures.{name}"
        if not m["cells"]:
            raise study_error(path, text, section, "cells", f"measures.{name} has no cells",
                              'give cells = ["TASK LANG", ...], e.g. ["nll zh"]')
        for cell in m["cells"]:
            parts = cell.split()
            if len(parts) != 2:
                raise study_error(path, text, section, "cells", f"cell {cell!r} is not 'TASK LANG'",
                                  'write e.g. "xnli zh" or "translation_tatoeba en-zh"')
            if parts[0] not in keys:
                raise study_error(path, text, section, "cells", f"measure {name} names task {parts[0]!r}, which "
                                  "03_evaluate.py does not have", f"use one of {', '.join(sorted(keys))}")


def check_contrasts(study, path, text):
    runs, groups = study.runs_expanded, study.groups
    for name, c in study["contrasts"].items():
        section = f"contrasts.{name}"
        if not c["terms"]:
            raise study_error(path, text, section, "terms", f"contrasts.{name} has no terms",
                              'give terms = { dft = 1, tft = -1 } (runs or run groups -> coefficients)')
        for term, coef in c["terms"].items():
            if term not in runs and term not in groups:
                raise study_error(path, text, section, "terms", f"contrast {name} names run {term!r}, which the "
                                  "study does not define", f"use a run or group: {', '.join(list(groups) + [r for r in runs if r not in groups])}")
            if not type_ok(coef, FLOAT):
                raise study_error(path, text, section, "terms", f"contrast {name}: coefficient of {term} is "
                                  f"{coef!r}, not a number", "write a number, e.g. -1 or 0.5")
        if c["comparative"] and abs(sum(c["terms"].values())) > 1e-9:
            raise study_error(path, text, section, "terms", f"contrast {name} is comparative but its coefficients "
                              f"sum to {sum(c['terms'].values()):g}, not 0",
                              "make them sum to 0 (e.g. { dft = 1, tft = -1 }), or set comparative = false for a level")
        for m in c["measures"] or []:
            if m not in study["measures"]:
                raise study_error(path, text, section, "measures", f"contrast {name} names measure {m!r}, which "
                                  "the study does not define", f"use one of {', '.join(study['measures'])}")
        c["measures"] = c["measures"] or list(study["measures"])
    for name, f in study["families"].items():
        section = f"families.{name}"
        for c in (f["contrasts"] or []) + ([f["placebo"]] if f["placebo"] else []):
            if c not in study["contrasts"]:
                raise study_error(path, text, section, "contrasts", f"family {name} names contrast {c!r}, which "
                                  "the study does not define", f"use one of {', '.join(study['contrasts'])}")
        for m in f["measures"] or []:
            if m not in study["measures"]:
                raise study_error(path, text, section, "measures", f"family {name} names measure {m!r}, which the "
                                  "study does not define", f"use one of {', '.join(study['measures'])}")
        if not f["contrasts"]:
            raise study_error(path, text, section, "contrasts", f"family {name} has no contrasts",
                              "list the confirmatory contrasts: contrasts = [...]")


def load_study(path, check_flags=True):
    """Parse and validate a study file; raises UserError (one line: file:line, the problem, the fix). Reads only."""
    if not os.path.exists(path):
        raise UserError(f"study file not found: {path} (studies/ holds the study files; studies/README.md says how "
                        "to write one)")
    text = open(path, encoding="utf-8").read()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}; fix that line") from None
    for section in raw:
        if section not in SCHEMA or section in ("parts",):
            raise study_error(path, text, section, None, f"unknown section [{section}]",
                              f"use {', '.join(s for s in SCHEMA if s != 'parts')} (studies/README.md)")
    study = Study()
    for section, schema in SCHEMA.items():
        if section == "parts":
            continue
        if section in NAMED:
            study[section] = {name: check_table(path, text, f"{section}.{name}", t, schema)
                              for name, t in raw.get(section, {}).items()}
        elif section == "setup":
            study[section] = [check_table(path, text, "setup", t, schema) for t in raw.get(section, [])]
        else:
            study[section] = check_table(path, text, section, raw.get(section, {}), schema)
    study["evaluation"]["parts"] = [check_table(path, text, "evaluation.parts", t, SCHEMA["parts"])
                                    for t in study["evaluation"]["parts"]]
    s = study["study"]
    s["name"] = s["name"] or os.path.splitext(os.path.basename(path))[0]
    s["results"] = s["results"] or os.path.join("results", s["name"])
    s["work"] = s["work"] or os.path.join("runs", s["name"])
    s["path"] = path
    for name, p in study["pairs"].items():
        if (p["flags"] is None) == (p["file"] is None):
            raise study_error(path, text, f"pairs.{name}", None, f"pairs.{name} needs exactly one of flags and file",
                              "flags = [01_build_pairs.py flags] builds them; file = PATH uses a finished file")
    for setup in study["setup"]:
        if not setup["name"] or not setup["command"]:
            raise study_error(path, text, "setup", None, "a [[setup]] entry needs name and command",
                              'write name = "..." and command = ["script.py", "arg", ...]')
    r = study["resampling"]
    if r["draws"] not in DRAWS:
        raise study_error(path, text, "resampling", "draws", f"resampling.draws is {r['draws']!r}",
                          f"use one of {', '.join(DRAWS)}")
    if r["B"] < 1:
        raise study_error(path, text, "resampling", "B", "resampling.B must be >= 1", "e.g. B = 10000")
    c = study["compute"]
    if c["precision"] not in PRECISIONS:
        raise study_error(path, text, "compute", "precision", f"compute.precision is {c['precision']!r}",
                          f"use one of {', '.join(PRECISIONS)}")
    for key in ("lanes", "eval_queues", "processes", "threads", "retries"):
        if c[key] < 1:
            raise study_error(path, text, "compute", key, f"compute.{key} must be >= 1", f"e.g. {key} = 1")
    study["runs_expanded"], study["groups"] = expand_runs(study, path, text)
    part_names = set()
    for part in study["evaluation"]["parts"]:
        if not part["name"] or not NAME_RE.match(part["name"]) or part["name"] in part_names:
            raise study_error(path, text, "evaluation.parts", "name", f"evaluation part name {part['name']!r} is "
                              "missing, not a file name, or used twice", "give each [[evaluation.parts]] a unique name")
        part_names.add(part["name"])
        for run in part["runs"] or []:
            if run not in study.runs_expanded and run not in study.groups:
                raise study_error(path, text, "evaluation.parts", "runs", f"evaluation part {part['name']} names "
                                  f"run {run!r}, which the study does not define", "use a run or group name")
    stage3 = load_stage("03_evaluate")
    check_measures(study, path, text, stage3.TASKS)
    check_contrasts(study, path, text)
    for group, values in study["references"]["values"].items():
        if group not in study.groups and group not in study.runs_expanded:
            raise study_error(path, text, f"references.values.{group}", None, f"references name run {group!r}, "
                              "which the study does not define", "use a run or group name")
        for m in values:
            if m not in study["measures"]:
                raise study_error(path, text, f"references.values.{group}", m, f"references name measure {m!r}, "
                                  "which the study does not define", f"use one of {', '.join(study['measures'])}")
    if check_flags:
        placeholders = dict(work="W", results="R", pairs="P.jsonl", dev="P.dev.jsonl", model="M", run="r", seed=1)
        for run in study.runs_expanded.values():
            if run["train"] and not run["reuse"]:
                argv = ["--pairs", "P.jsonl", "--out", "O"] + fill(study["train"]["flags"] + run["flags"], placeholders)
                check_stage_flags(path, text, f"runs.{run['group']}", "02_train_dft", argv, f"run {run['name']}'s flags")
        for name, p in study["pairs"].items():
            if p["flags"] is not None:
                check_stage_flags(path, text, f"pairs.{name}", "01_build_pairs",
                                  fill(p["flags"], placeholders) + ["--out", "P.jsonl"], f"pairs {name}'s flags")
        for part in study["evaluation"]["parts"]:
            argv = ["--model", "M", "--out", "O"] + fill(study["evaluation"]["flags"] + part["flags"], placeholders)
            check_stage_flags(path, text, "evaluation.parts", "03_evaluate", argv, f"part {part['name']}'s flags")
    return study
