"""Studies (studies/README.md): the tiny study end to end, rerun, resume, dry run, bad input, and the contrast
bootstrap of common.py against a brute-force loop over explicitly drawn items."""
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import common
from conftest import REPO, run_main_in_process

sys.path.insert(0, os.path.join(REPO, "scripts"))
import run_study  # noqa: E402
import study_tables  # noqa: E402

TINY = os.path.join(REPO, "studies", "tiny.toml")
RUNS = ["base", "tft-s1", "tft-s2", "dft-logits-s1", "dft-logits-s2"]


def runner(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "run_study.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny study run once: (results folder, work folder, the runner's completed process)."""
    root = tmp_path_factory.mktemp("tiny_study")
    results, work = str(root / "results"), str(root / "work")
    done = runner(TINY, "--out", results, "--work", work)
    assert done.returncode == 0, done.stdout + done.stderr
    return results, work, done


def test_tiny_study_end_to_end(tiny):
    results, work, done = tiny
    assert "every part finished" in done.stdout
    for run in RUNS:
        obj = common.read_json(os.path.join(results, "eval", run + ".json"))
        assert set(obj["results"]) == {"nll", "xcopa"}
        for cell in ("nll.zh", "xcopa.zh"):  # per-item files are published gzipped, without the benchmark's text
            full = common.read_jsonl(os.path.join(work, "eval", f"{run}.{cell}.jsonl"))
            published = common.read_jsonl(os.path.join(results, "eval", f"{run}.{cell}.jsonl.gz"))
            assert published == [{k: v for k, v in r.items() if k not in run_study.ITEM_TEXT} for r in full]
            assert {"prompt", "target"} <= set(full[0]) if cell == "nll.zh" else {"context", "choices"} <= set(full[0])
        assert os.path.exists(os.path.join(work, "logs", f"eval_{run}_primary.log"))
    for run in RUNS[1:]:
        assert common.read_jsonl(os.path.join(results, "train", run, "train_log.jsonl"))[-1]["step"] == 2
        assert not os.path.exists(os.path.join(work, "train", run, "checkpoint"))  # removed once the model is saved
    assert "train_tft-s1: done" in open(os.path.join(work, "logs", "driver.log")).read()
    assert study_tables.main([TINY, "--out", results]) is None
    tables = json.load(open(os.path.join(results, "tables.json")))
    family = tables["families"]["primary"]
    assert [(r["contrast"], r["measure"]) for r in family] == [("dft_vs_tft", "nll_zh"), ("dft_vs_tft", "xcopa")]
    assert all(r["result"] is not None and r["placebo"] is not None for r in family)
    for r in family:  # the equivalence reading: the interval inside ±|placebo Δ|
        bound = abs(r["placebo"]["delta"])
        assert r["within_placebo"] == (-bound <= r["result"]["lo"] and r["result"]["hi"] <= bound)
    # Holm over the family's two tests, and the seeds pooled: each group's value is the mean of its seeds
    ps = [r["result"]["p"] for r in family]
    assert [r["p_holm"] for r in family] == [h for h, _ in common.holm(ps, [p <= 1 / 201 + 1e-15 for p in ps])]
    nll = tables["contrasts"]["dft_vs_tft"]["nll_zh"]
    runs = tables["runs"]
    assert nll["values"]["tft"] == pytest.approx((runs["tft-s1"]["nll_zh"][0] + runs["tft-s2"]["nll_zh"][0]) / 2)
    assert nll["delta"] == pytest.approx(nll["values"]["dft-logits"] - nll["values"]["tft"])
    assert os.path.exists(os.path.join(results, "loss_curves.png"))
    assert "## Confirmatory family primary" in open(os.path.join(results, "tables.md")).read()


def test_rerun_skips_everything_also_on_a_fresh_work_folder(tiny, tmp_path):
    results, work, _ = tiny
    again = runner(TINY, "--out", results, "--work", work)
    assert again.returncode == 0 and ": start" not in again.stdout
    assert "finished before, skipped: " + ", ".join(RUNS) in again.stdout
    fresh = runner(TINY, "--out", results, "--work", str(tmp_path / "fresh"))  # a fresh checkout: no markers
    assert fresh.returncode == 0 and ": start" not in fresh.stdout, fresh.stdout


def test_resume_after_a_kill_mid_training(tiny):
    """tft-s1 killed after its first step (02 --stop-after-steps leaves what a kill leaves: a checkpoint and no
    model): the rerun resumes it from the checkpoint and ends where the uninterrupted run ended."""
    results, work, _ = tiny
    before = common.read_jsonl(os.path.join(results, "train", "tft-s1", "train_log.jsonl"))
    for path in [os.path.join(work, "train", "tft-s1"), os.path.join(results, "train", "tft-s1")]:
        shutil.rmtree(path)
    for name in os.listdir(os.path.join(results, "eval")):
        if name.startswith("tft-s1."):
            os.remove(os.path.join(results, "eval", name))
    for name in ("train_tft-s1", "eval_tft-s1_primary"):
        os.remove(os.path.join(work, "done", name))
    shutil.rmtree(os.path.join(work, "eval"))  # its run JSON there would say the cells are done
    argv = run_study.Runner(run_study.load_study(TINY), results, work).train_argv(
        run_study.load_study(TINY).runs_expanded["tft-s1"])
    killed = subprocess.run(argv + ["--stop-after-steps", "1"], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == 0 and run_study.has_checkpoint(os.path.join(work, "train", "tft-s1"))
    resumed = runner(TINY, "--out", results, "--work", work, "--only", "tft-s1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "train_tft-s1: resuming from its checkpoint" in resumed.stdout
    assert "--resume" in open(os.path.join(work, "logs", "train_tft-s1.log")).read()
    after = common.read_jsonl(os.path.join(results, "train", "tft-s1", "train_log.jsonl"))
    assert [r["step"] for r in after] == [r["step"] for r in before]
    assert after[-1]["loss"] == pytest.approx(before[-1]["loss"], rel=1e-5)
    assert os.path.exists(os.path.join(results, "eval", "tft-s1.nll.zh.jsonl.gz"))


def test_a_run_after_another_waits_for_its_model(tiny, tmp_path):
    """A run evaluated with another run's model (train = false, model = {work}/train/tft-s{seed}, after = tft): on a
    checkout where tft-s1 is evaluated but its model is gone, tft-s1 is trained again first, then the run is
    evaluated with it; its items are tft-s1's."""
    results, work, _ = tiny
    study = tmp_path / "after.toml"
    study.write_text(open(TINY, encoding="utf-8").read().replace("[evaluation]", """[runs.tft-again]
train = false
model = "{work}/train/tft-s{seed}"
seeds = [1]
after = ["tft"]

[evaluation]"""), encoding="utf-8")
    shutil.rmtree(os.path.join(work, "train", "tft-s1"))
    done = runner(str(study), "--out", results, "--work", work, "--only", "tft-again")
    assert done.returncode == 0, done.stdout + done.stderr
    log = done.stdout
    assert log.index("train_tft-s1: done") < log.index("eval_tft-again-s1_primary: start")
    assert "eval_tft-s1_primary" not in log and "train_tft-s2" not in log  # evaluated before; not asked for
    again, first = (common.read_items(os.path.join(results, "eval"), run, "nll", "zh") for run in ("tft-again-s1",
                                                                                                 "tft-s1"))
    assert [r["id"] for r in again] == [r["id"] for r in first]
    assert [r["nll_sum"] for r in again] == pytest.approx([r["nll_sum"] for r in first], rel=1e-5)


def test_a_failed_part_is_tried_again(tmp_path):
    study = run_study.load_study(TINY, check_flags=False)
    study["compute"]["retries"] = 2
    r = run_study.Runner(study, str(tmp_path / "results"), str(tmp_path / "work"))
    os.makedirs(tmp_path / "work" / "logs")
    os.makedirs(tmp_path / "work" / "done")
    flag = tmp_path / "first-attempt-ran"  # the first attempt dies as a killed process would
    script = f"import os, sys; p = {str(flag)!r}; ok = os.path.exists(p); open(p, 'w'); sys.exit(0 if ok else 137)"
    assert r.part("flaky", [sys.executable, "-c", script])
    log = open(tmp_path / "work" / "logs" / "driver.log").read()
    assert "flaky: FAILED with exit code 137" in log and "flaky: start (attempt 2)" in log
    assert os.path.exists(tmp_path / "work" / "done" / "flaky")


def test_a_lane_with_nothing_left_to_train_evaluates(tmp_path, monkeypatch):
    """lanes = 1, eval_queues = 1: once the trainings are done, two evaluations run at once (the parts are stubs
    that record how many evaluations overlap)."""
    study = run_study.load_study(TINY, check_flags=False)
    study["compute"].update(lanes=1, eval_queues=1)
    study["setup"] = []
    r = run_study.Runner(study, str(tmp_path / "results"), str(tmp_path / "work"))
    trained, evaluated, overlap = [], [], dict(now=0, most=0)

    def train(run):
        trained.append(run["name"])
        time.sleep(0.1)
        return True

    def evaluate(run):
        with r.cond:
            overlap["now"] += 1
            overlap["most"] = max(overlap["most"], overlap["now"])
        time.sleep(0.3)
        with r.cond:
            overlap["now"] -= 1
            evaluated.append(run["name"])
        return True

    monkeypatch.setattr(r, "needs_training", lambda run: run["name"] == "tft-s1")
    monkeypatch.setattr(r, "pending_evals", lambda run: [] if run["name"] in evaluated else ["primary"])
    monkeypatch.setattr(r, "build_pairs", lambda name: None)
    monkeypatch.setattr(r, "train", train)
    monkeypatch.setattr(r, "evaluate", evaluate)
    assert r.run()
    assert trained == ["tft-s1"] and sorted(evaluated) == sorted(RUNS)
    assert overlap["most"] == 2


def test_the_readme_example_is_the_tiny_study():
    """studies/README.md's example is studies/tiny.toml without its comments and labels."""
    import tomllib
    text = open(os.path.join(REPO, "studies", "README.md"), encoding="utf-8").read()
    example = tomllib.loads(text.split("## Example: the tiny study", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0])
    tiny = tomllib.loads(open(TINY, encoding="utf-8").read())
    for section in ("measures", "contrasts"):
        for entry in tiny[section].values():
            entry.pop("label", None)
    assert example == tiny


def test_dry_run_writes_nothing(tmp_path, capsys):
    results, work = tmp_path / "results", tmp_path / "work"
    code, err = run_main_in_process(run_study.main, [TINY, "--dry-run", "--out", str(results), "--work", str(work)],
                                    capsys)
    assert code == 0, err
    assert not results.exists() and not work.exists()


def test_dry_run_plan_lists_runs_and_tokens(tmp_path):
    out = runner(TINY, "--dry-run", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr
    for run in RUNS[1:]:
        assert f"{run}" in out.stdout and "train (2 steps, <= 512 tokens)" in out.stdout  # 2 x batch 2 x 128
    assert "to train: <= 2,048 tokens" in out.stdout and not (tmp_path / "r").exists()
    assert f"setup tiny_models        run: scripts/paper_tiny_models.py {tmp_path / 'w'}/tiny_models" in out.stdout


def test_dry_run_says_steps_are_unknown_before_the_pairs_are_built(tmp_path):
    """Trained by epochs, a run's steps depend on its pairs: a plan made before they exist claims no token bound."""
    study = tmp_path / "epochs.toml"
    study.write_text(open(TINY, encoding="utf-8").read().replace('"--max-steps", "2"', '"--epochs", "1"'))
    out = runner(str(study), "--dry-run", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr
    assert "train (? steps" in out.stdout and "== to train: ? (a run's steps are unknown" in out.stdout, out.stdout


@pytest.mark.parametrize("name", ["smollm2", "gemma3", "gemma3_ablations", "peers_smollm2"])
def test_the_committed_studies_plan_nothing(name, tmp_path):
    """Every part of the run studies is published under results/ (per-item, layer and log files gzipped): their
    study files on a fresh checkout train and evaluate nothing."""
    out = runner(os.path.join(REPO, "studies", f"{name}.toml"), "--dry-run", "--work", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr
    assert "to train: nothing (no optimizer steps left)" in out.stdout and "evaluate " not in out.stdout, out.stdout


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "studies", "*.toml"))), ids=os.path.basename)
def test_a_studys_tables_never_overwrite_committed_tables_made_otherwise(path):
    """What study_tables.py writes into a study's results folder (FILE.md, FILE.json, loss_curves.png/.md) is either
    absent or its own earlier output: never the tables of the time that scripts/check_studies.py reads."""
    study = run_study.load_study(path, check_flags=False)
    results = os.path.join(REPO, study["study"]["results"])
    tables = os.path.join(results, study["tables"]["file"] + ".md")
    text = open(tables, encoding="utf-8").read() if os.path.exists(tables) else None
    assert text is None or f"Written by `scripts/study_tables.py studies/{os.path.basename(path)}`" in text
    if study["tables"]["loss_curves"] and os.path.exists(os.path.join(results, "loss_curves.png")):
        assert text is not None and "Loss curves: `loss_curves.png`" in text


def test_a_log_published_on_another_machine_keeps_its_lines(tmp_path):
    """A run whose first cells were evaluated on another machine: when this machine adds a cell, the published
    RUN.log keeps the other machine's lines (the parts' logs here know only this machine's parts)."""
    study = run_study.load_study(TINY)
    results, work = tmp_path / "results", tmp_path / "work"
    for folder in (results / "eval", work / "eval", work / "logs"):
        folder.mkdir(parents=True)
    (results / "eval" / "base.json").write_text('{"results": {}}')
    (results / "eval" / "base.log").write_text("[base] nll zh: on the other machine\n")
    runner_here = run_study.Runner(study, str(results), str(work))
    runner_here.seed_work_eval("base", str(work / "eval"), str(results / "eval"))
    (work / "logs" / "eval_base_primary.log").write_text("[base] xcopa zh: here\n")
    runner_here.publish_eval(study.runs_expanded["base"], str(work / "eval"), str(results / "eval"))
    assert (results / "eval" / "base.log").read_text() == "[base] nll zh: on the other machine\n[base] xcopa zh: here\n"


def test_results_keep_item_outcomes_without_the_benchmark_text():
    """What results/ holds per item is the outcome, not the benchmark's text again (run_study.ITEM_TEXT): the checkout
    stays small enough for a GPU machine (docs/SCALING.md)."""
    files = [f for f in glob.glob(os.path.join(REPO, "results", "**", "*.jsonl.gz"), recursive=True)
             if not f.endswith("train_log.jsonl.gz")]
    assert len(files) > 400
    heavy = [os.path.relpath(f, REPO) for f in files
             if any(k in row for row in common.read_jsonl(f) for k in run_study.ITEM_TEXT)]
    assert not heavy, (f"{len(heavy)} per-item files under results/ carry benchmark text, e.g. {heavy[:3]}: rewrite "
                       "each with run_study.gzip_copy(its decompressed rows, itself, drop=run_study.ITEM_TEXT)")


BAD = {  # (old text, new text, what the error says)
    "unknown key": ('seeds = [1, 2]                           # runs', 'sedes = [1, 2]  # runs',
                    ":25: unknown key 'sedes' in [runs.tft]"),
    "02 refuses": ('"--method", "tft"]', '"--method", "tft", "--lr", "fast"]',
                   ":24: 02_train_dft.py refuses run tft-s1's flags: argument --lr: invalid float value"),
    "unknown run": ("terms = { dft-logits = 1, tft = -1 }", "terms = { dft-logit = 1, tft = -1 }",
                    ":48: contrasts.dft_vs_tft names run 'dft-logit', which the study does not define"),
    "unknown measure": ('measures = ["nll_zh", "xcopa"]\nplacebo', 'measures = ["nll_zh", "copa"]\nplacebo',
                        ":56: families.primary names measure 'copa'"),
    "unknown task": ('cells = ["xcopa zh"]', 'cells = ["copa zh"]',
                     ":44: measure xcopa names task 'copa', which 03_evaluate.py does not have"),
    "unknown placebo": ('label = "dft-logits − tft"', 'label = "dft-logits − tft"\nplacebo = "seed_placbo"',
                        ":48: contrasts.dft_vs_tft names contrast 'seed_placbo', which the study does not define"),
    "not comparative": ("terms = { dft-logits = 1, tft = -1 }", "terms = { dft-logits = 1, tft = -0.5 }",
                        ":48: contrast dft_vs_tft is comparative but its coefficients sum to 0.5, not 0"),
    "placeholder": ('"--log-every", "1"]', '"--log-every", "1", "--eval-pairs", "{model}"]',
                    ":17: train.flags holds {model}, which is not filled there"),
    "part's task": ('"--tasks", "nll,xcopa"', '"--tasks", "nll,copa"',
                    ":36: 03_evaluate.py refuses part primary's flags: unknown task(s) copa"),
    "cell no part writes": ('cells = ["nll zh"]', 'cells = ["nll vi"]',
                            ":40: measure nll_zh reads cell 'nll vi', which no evaluation part writes"),
    "seeds a group lacks": ('terms = { dft-logits = 1, tft = -1 }', 'terms = { dft-logits = 1, tft = -1 }\nseeds = [3]',
                            ":49: contrasts.dft_vs_tft takes seeds [3], but run group dft-logits has seeds [1, 2]"),
    "family's placebo": ('placebo = "seed_placebo"', 'placebo = "seed_placbo"',
                         ":57: families.primary names contrast 'seed_placbo'"),
    "unknown section": ("[contrasts.seed_placebo]", "[contrast.seed_placebo]", ":50: unknown section [contrast]"),
    "layer order": ('"--lc-layer", "1", "--et-layer", "3"]', '"--lc-layer", "3", "--et-layer", "1"]',
                    ":28: 02_train_dft.py refuses run dft-logits-s1's flags: LC layer 3 >= ET layer 1"),
    "runs a part skips": ('name = "primary"', 'name = "primary"\nruns = ["base", "tft"]',
                          ":47: contrast dft_vs_tft reads cell 'nll zh' of run dft-logits-s1, which no evaluation part "
                          "evaluates for it"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_study_files_are_refused_naming_the_line(case, tmp_path, capsys):
    old, new, message = BAD[case]
    text = open(TINY, encoding="utf-8").read()
    assert old in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(old, new), encoding="utf-8")
    out = tmp_path / "results"
    code, err = run_main_in_process(run_study.main, [str(bad), "--out", str(out), "--work", str(tmp_path / "w")],
                                    capsys)
    assert code == 2 and f"error: {bad}{message}" in err and "; " in err.split(message, 1)[1]  # and the fix
    assert not out.exists() and not (tmp_path / "w").exists()


def test_a_familys_placebo_on_a_cell_its_runs_lack_is_refused(tmp_path, capsys):
    """The family reads its placebo on the family's measures: tft-s2, evaluated on NLL only, has no XCOPA cell, so
    the claim rule could never be applied."""
    text = open(TINY, encoding="utf-8").read()
    for old, new in (('terms = { dft-logits = 1, tft = -1 }', 'terms = { dft-logits = 1, tft = -1 }\nseeds = [1]'),
                     ('terms = { tft-s2 = 1, tft-s1 = -1 }', 'terms = { tft-s2 = 1, tft-s1 = -1 }\nmeasures = ["nll_zh"]'),
                     ('name = "primary"', 'name = "primary"\nruns = ["base", "dft-logits", "tft-s1"]'),
                     ('[measures.nll_zh]', '[[evaluation.parts]]\nname = "nll_s2"\nruns = ["tft-s2"]\n'
                      'flags = ["--tasks", "nll", "--langs", "zh", "--pairs", "{dev}", "--limit", "4"]\n\n[measures.nll_zh]')):
        assert old in text
        text = text.replace(old, new)
    bad = tmp_path / "bad.toml"
    bad.write_text(text, encoding="utf-8")
    code, err = run_main_in_process(run_study.main, [str(bad), "--dry-run", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "contrast seed_placebo reads cell 'xcopa zh' of run tft-s2, which no evaluation part " \
        "evaluates for it" in err and f"{bad}:64:" in err, err  # the family's measures line


def test_a_file_that_is_not_toml_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(open(TINY, encoding="utf-8").read().replace("seeds = [1, 2]", "seeds = [1, 2", 1), encoding="utf-8")
    code, err = run_main_in_process(run_study.main, [str(bad), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.startswith(f"error: {bad}: not valid TOML: ") and "fix that line" in err, err
    assert not (tmp_path / "r").exists()


def test_a_part_is_published_only_with_every_cell_at_its_limit(tmp_path):
    """A run JSON counts a part as finished when it holds each of the part's task x language cells at the part's
    --limit: not when another part wrote the same task in another language, or the cells were made at another
    --limit (the study was edited). An analysis part runs 03 with --analysis layers."""
    study = run_study.load_study(TINY)
    results = tmp_path / "results"
    (results / "eval").mkdir(parents=True)
    here = run_study.Runner(study, str(results), str(tmp_path / "work"))
    run, part = study.runs_expanded["base"], study["evaluation.parts"][0]  # nll,xcopa zh at --limit 4
    cell = {"settings": {"limit": 4}}
    for cells, published in (({"nll": {"en": cell}, "xcopa": {"zh": cell}}, False),
                             ({"nll": {"zh": {"settings": {"limit": 8}}}, "xcopa": {"zh": cell}}, False),
                             ({"nll": {"zh": cell}, "xcopa": {"zh": cell}}, True)):
        (results / "eval" / "base.json").write_text(json.dumps({"results": cells}))
        assert here.part_published(run, part) is published, cells
    part = dict(part, analysis=True)
    assert here.eval_flags(run, part)[-2:] == ["--analysis", "layers"]
    part["flags"] = part["flags"] + ["--analysis", "layers"]
    assert here.eval_flags(run, part).count("--analysis") == 1


def test_tables_without_any_result_and_a_folder_for_a_study_are_refused(tmp_path, capsys):
    code, err = run_main_in_process(study_tables.main, [TINY, "--out", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no run of" in err and "run scripts/run_study.py" in err
    assert not (tmp_path / "empty").exists()
    code, err = run_main_in_process(run_study.main, [str(tmp_path), "--dry-run"], capsys)
    assert code == 2 and err.startswith("error: study file not found") and "Traceback" not in err


def test_a_missing_pairs_file_is_refused_before_anything_runs(tmp_path, capsys):
    text = open(TINY, encoding="utf-8").read().replace(
        'flags = ["--source", "alpaca", "--lang", "zh", "--limit", "24", "--dev-size", "4"]', 'file = "runs/no/pairs.jsonl"')
    bad = tmp_path / "bad.toml"
    bad.write_text(text, encoding="utf-8")
    for dry in ([], ["--dry-run"]):
        code, err = run_main_in_process(run_study.main, [str(bad), "--out", str(tmp_path / "r"), "--work",
                                                         str(tmp_path / "w"), *dry], capsys)
        assert code == 2 and f"no pairs file {os.path.join(REPO, 'runs', 'no', 'pairs.jsonl')}" in err, err
        assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()
    shutil.copy(os.path.join(REPO, "tests", "fixtures", "pairs_zh.jsonl"), tmp_path)  # not its .dev.jsonl: {dev} reads it
    bad.write_text(text.replace("runs/no/pairs.jsonl", str(tmp_path / "pairs_zh.jsonl")), encoding="utf-8")
    code, err = run_main_in_process(run_study.main, [str(bad), "--out", str(tmp_path / "r"), "--work",
                                                     str(tmp_path / "w")], capsys)
    assert code == 2 and f"no pairs file {tmp_path / 'pairs_zh.dev.jsonl'}" in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()
    bad.write_text(bad.read_text(encoding="utf-8").replace('"--pairs", "{dev}"', '"--pairs", "{pairs}"'), encoding="utf-8")
    code, err = run_main_in_process(run_study.main, [str(bad), "--dry-run", "--out", str(tmp_path / "r"), "--work",
                                                     str(tmp_path / "w")], capsys)
    assert code == 0, err  # no flag reads {dev}: its .dev.jsonl is not needed


def test_a_refused_part_is_not_tried_again(tmp_path):
    """Exit code 2 with an error line is a stage refusing its input (a UserError, a usage error): it would refuse
    again, so the driver says why and moves on (also under a launcher, which exits 1); a part stopped by Ctrl-C is not
    tried again either."""
    study = run_study.load_study(TINY, check_flags=False)
    r = run_study.Runner(study, str(tmp_path / "results"), str(tmp_path / "work"))
    os.makedirs(tmp_path / "work" / "logs")
    script = "import sys; print('error: --et-layer 45 is out of range', file=sys.stderr); sys.exit(2)"
    assert not r.part("refused", [sys.executable, "-c", script])
    assert open(tmp_path / "work" / "logs" / "refused.log").read().count("\n$ ") == 1
    driver = open(tmp_path / "work" / "logs" / "driver.log").read()
    assert "refused: REFUSED, not tried again: error: --et-layer 45 is out of range" in driver
    script = tmp_path / "refuses.py"  # under torchrun: the launcher exits 1 and names each process's exit code
    script.write_text("import sys\nprint('error: --lc-layer 0 is out of range', file=sys.stderr)\nsys.exit(2)\n")
    assert not r.part("launched", r.stage(str(script), processes=2))
    driver = open(tmp_path / "work" / "logs" / "driver.log").read()
    assert "launched: REFUSED, not tried again: error: --lc-layer 0" in driver
    script.write_text("import sys\nprint('RuntimeError: CUDA error: out of memory', file=sys.stderr)\nsys.exit(1)\n")
    assert not r.part("crashed", r.stage(str(script), processes=2))  # a crash is tried again
    assert open(tmp_path / "work" / "logs" / "crashed.log").read().count("\n$ ") == study["compute"]["retries"] > 1
    with open(tmp_path / "work" / "logs" / "again.log", "w") as f:  # an earlier attempt that refused...
        f.write("\n$ earlier\nerror: --lc-layer 0 is out of range\n  exitcode  : 2 (pid: 1)\n")
    assert not r.part("again", r.stage(str(script), processes=2))  # ...does not make this crash a refusal
    assert open(tmp_path / "work" / "logs" / "again.log").read().count("\n$ ") == 1 + study["compute"]["retries"]
    r.stopping.set()
    assert not r.part("stopped", [sys.executable, "-c", "import sys; sys.exit(1)"])
    assert not os.path.exists(tmp_path / "work" / "logs" / "stopped.log")  # no attempt starts once stopping


def test_a_part_run_with_other_flags_than_the_study_gives_now_is_refused(tiny, tmp_path, capsys):
    """Each marker records its part's command: a study edited since (a run's flags, an evaluation's --limit) is
    refused by name, also in a dry run, instead of reusing results the tables would describe with the new flags."""
    results, work, _ = tiny
    text = open(TINY, encoding="utf-8").read()
    for old, new, changed in (('"--limit", "4"]', '"--limit", "3"]',
                               "eval_base_primary (--limit 4 -> --limit 3), eval_tft-s1_primary (--limit 4 -> --limit 3)"),
                              ('flags = ["--method", "tft"]', 'flags = ["--method", "tft", "--lr", "5e-3"]',
                               "train_tft-s1 ((nothing) -> --lr 5e-3), train_tft-s2 ((nothing) -> --lr 5e-3) ran with "
                               "other flags")):
        edited = tmp_path / "edited.toml"
        edited.write_text(text.replace(old, new), encoding="utf-8")
        code, err = run_main_in_process(run_study.main, [str(edited), "--dry-run", "--out", results, "--work", work],
                                        capsys)
        assert code == 2 and changed in err and "give what changed a new name" in err, err
    assert run_study.command_change("a --x 1 --y 2", "a --x 3 --y 4") == "--x 1 -> --x 3; 1 more difference(s)"
    assert run_study.command_change("a --x 1\n", "a --x 1") == "only spacing differs"
    done = open(os.path.join(work, "done", "train_tft-s1"), encoding="utf-8").read()
    assert done.startswith("--pairs {work}/pairs_zh.jsonl --out {work}/train/tft-s1") and "--resume" not in done
    moved = tmp_path / "moved"  # paths are recorded as {work}, {results}: a moved work folder is not a change
    shutil.copytree(work, moved)
    code, err = run_main_in_process(run_study.main, [TINY, "--dry-run", "--out", results, "--work", str(moved)],
                                    capsys)
    assert code == 0, err


def test_labels_name_runs_seeds_and_contrasts_in_the_tables(tiny, tmp_path):
    text = open(TINY, encoding="utf-8").read().replace('seeds = [1, 2]                           # runs',
                                                       'label = "TFT"\nseeds = [1, 2]  # runs')
    study_path, out = tmp_path / "labelled.toml", tmp_path / "results"
    study_path.write_text(text + '\n[tables]\nfile = "labelled"\n', encoding="utf-8")
    shutil.copytree(tiny[0], out)
    before = (out / "tables.md").read_bytes() if (out / "tables.md").exists() else None
    assert study_tables.main([str(study_path), "--out", str(out)]) is None
    tables = (out / "labelled.md").read_text(encoding="utf-8")  # [tables] file: not over the tables.md there
    after = (out / "tables.md").read_bytes() if (out / "tables.md").exists() else None
    assert (out / "labelled.json").exists() and after == before
    assert f"Written by `scripts/study_tables.py {study_path} --out {out}`" in tables
    assert "| TFT, seed 1 |" in tables and "| TFT, seed 2 |" in tables  # the scores of each seed
    assert "| measure | dft-logits | TFT | Δ |" in tables  # a contrast's terms
    assert "| dft-logits − tft | NLL zh ↓ |" in tables  # the family names its contrast by the label
    assert "| TFT | " in tables.split("## Seed groups")[1] and "| TFT, seed 1 → TFT, seed 2 | " in tables


def test_a_family_reads_a_contrast_with_its_seeds_on_every_measure(tiny, tmp_path):
    """A contrast restricted to seed 1 stays restricted where its family reads it on a measure of the family's own."""
    text = open(TINY, encoding="utf-8").read().replace(
        'terms = { dft-logits = 1, tft = -1 }', 'terms = { dft-logits = 1, tft = -1 }\nseeds = [1]\nmeasures = ["nll_zh"]')
    study_path, out = tmp_path / "seed1.toml", tmp_path / "results"
    study_path.write_text(text, encoding="utf-8")
    shutil.copytree(tiny[0], out)
    assert study_tables.main([str(study_path), "--out", str(out)]) is None
    tables = json.loads((out / "tables.json").read_text(encoding="utf-8"))
    row = next(r for r in tables["families"]["primary"] if r["measure"] == "xcopa")
    assert row["result"]["values"]["tft"] == pytest.approx(tables["runs"]["tft-s1"]["xcopa"][0])


def test_a_run_publishes_only_its_own_per_item_files(tmp_path):
    """incline-a0's files are not incline-a0.5's, though a glob of incline-a0.* finds both."""
    for name in ("incline-a0.nll.zh.jsonl", "incline-a0.5.nll.zh.jsonl", "incline-a0.translation.en-zh.jsonl"):
        (tmp_path / name).write_text("{}\n")
    assert sorted(os.path.basename(f) for f in run_study.item_files(str(tmp_path), "incline-a0", ".jsonl")) == [
        "incline-a0.nll.zh.jsonl", "incline-a0.translation.en-zh.jsonl"]
    assert [os.path.basename(f) for f in run_study.item_files(str(tmp_path), "incline-a0.5", ".jsonl")] == [
        "incline-a0.5.nll.zh.jsonl"]


def test_a_fit_shows_its_time_and_held_out_residual(tmp_path):
    """The peers study's committed results: each fit (intervention_config.json) in the fits table, not as an empty
    row of the scores and wall-time tables, and alpha 0 item by item equal to base."""
    results = os.path.join(REPO, "results", "peers_smollm2")
    for name in ("eval", "train"):
        os.symlink(os.path.join(results, name), tmp_path / name)
    assert study_tables.main([os.path.join(REPO, "studies", "peers_smollm2.toml"), "--out", str(tmp_path)]) is None
    tables = (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert "| diffmean | diffmean | 16 | prompt | 3046 | 16: 0.285 |" in tables
    assert "| incline | incline | 30 blocks | last | 3186 | 1: 0.235, 2: 0.167, " in tables
    assert tables.count("| nll zh | 69 / 69 | 69 | 69 | 0 | yes |") == 2  # incline-a0 and diffmean-a0 against base
    assert "| incline | – |" not in tables and "| diffmean | – |" not in tables and "| incline-a1 | 4.056 " in tables


@pytest.mark.parametrize("metric", ["bogus", "acc"])
def test_a_metric_the_items_do_not_have_is_refused(metric, tmp_path, capsys):
    """A measure's metric that its cells' per-item rows lack (misspelt, or another task's) would be a column of NaN
    with p values beside it: one error naming the cell's file and the metrics it has."""
    text = open(os.path.join(REPO, "studies", "peers_smollm2.toml"), encoding="utf-8").read()
    study = tmp_path / "peers.toml"
    study.write_text(text.replace('cells = ["nll zh"]', f'cells = ["nll zh"]\nmetric = "{metric}"'), encoding="utf-8")
    for name in ("eval", "train"):
        os.symlink(os.path.join(REPO, "results", "peers_smollm2", name), tmp_path / name)
    code, err = run_main_in_process(study_tables.main, [str(study), "--out", str(tmp_path)], capsys)
    assert code == 2 and f"base.nll.zh.jsonl: its items have no '{metric}' score; a measure on this cell takes one of " \
        "nll as its metric" in err, err
    assert not (tmp_path / "tables.md").exists()


def test_a_pairs_file_is_found_from_the_repository_root(tmp_path, monkeypatch):
    study = run_study.load_study(TINY)
    study["pairs"]["zh"] = dict(study["pairs"]["zh"], flags=None, file="tests/fixtures/pairs_zh.jsonl")
    monkeypatch.chdir(tmp_path)  # the driver started elsewhere
    train, dev = run_study.Runner(study, str(tmp_path / "r"), str(tmp_path / "w")).pairs_files("zh")
    assert train == os.path.join(REPO, "tests", "fixtures", "pairs_zh.jsonl") and os.path.exists(train)
    assert dev == os.path.join(REPO, "tests", "fixtures", "pairs_zh.dev.jsonl")


# ----------------------------------------------------------------------------- the contrast bootstrap


def brute_force(runs, coefs, resamples, seed, draws, statistic):
    """The contrast, resample by resample, on explicitly drawn item lists (no sufficient statistics)."""
    rng = np.random.default_rng(seed)
    n = [len(cells) for cells in runs[0]]
    if draws == "multinomial":
        counts = [rng.multinomial(k, np.full(k, 1.0 / k), size=resamples) for k in n]
        picks = [[[i for i in range(n[c]) for _ in range(counts[c][r][i])] for c in range(len(n))]
                 for r in range(resamples)]
    else:
        picks = [[list(rng.integers(0, k, k)) for k in n] for _ in range(resamples)]
    return np.array([sum(sum(coef * statistic([run[c][i] for i in pick[c]]) for run, coef in zip(runs, coefs))
                         / len(n) for c in range(len(n))) for pick in picks])


@pytest.mark.parametrize("draws", ["multinomial", "indices"])
@pytest.mark.parametrize("kind", ["nll", "acc", "chrf"])
def test_contrast_bootstrap_equals_a_brute_force_loop(kind, draws):
    from sacrebleu.metrics import CHRF
    gen = np.random.default_rng(7)
    words = ["the cat", "a dog", "sat on", "the mat", "ran far", "we go", "it is", "red sun"]

    def rows(n, run):
        out = []
        for i in range(n):
            r = dict(id=i, nll_sum=float(gen.uniform(1, 30)), n_tokens=int(gen.integers(1, 12)),
                     scores=dict(acc=float(gen.integers(0, 2))), gold=words[i % 8] + " " + words[(i * 3) % 8])
            r["prediction"] = " ".join(words[j] for j in gen.integers(0, 8, 2)) if run else r["gold"]
            out.append(r)
        return out
    sizes = [7, 5]  # a two-cell measure: items drawn within each cell
    runs = [[rows(k, run) for k in sizes] for run in range(3)]
    coefs = [0.5, 0.5, -1.0]
    chrf = CHRF()
    statistic = {"nll": lambda rs: sum(r["nll_sum"] for r in rs) / sum(r["n_tokens"] for r in rs),
                 "acc": lambda rs: 100.0 * sum(r["scores"]["acc"] for r in rs) / len(rs),
                 "chrf": lambda rs: chrf.corpus_score([r["prediction"] for r in rs], [[r["gold"] for r in rs]]).score
                 }[kind]
    terms = [(c, [common.ItemCell(cell, kind, corpus=CHRF() if kind == "chrf" else None) for cell in run])
             for c, run in zip(coefs, runs)]
    got = common.contrast_bootstrap(terms, resamples=60, seed=3, draws=draws)
    want = brute_force(runs, coefs, 60, 3, draws, statistic)
    assert got["boot"] == pytest.approx(want, abs=1e-9)
    observed = sum(c * sum(statistic(cell) for cell in run) / 2 for c, run in zip(coefs, runs))
    assert got["delta"] == pytest.approx(observed, abs=1e-9)
    assert [got["lo"], got["hi"]] == pytest.approx(list(np.percentile(want, [2.5, 97.5])), abs=1e-9)
    assert got["p"] == (np.sum(np.abs(want - observed) >= abs(observed) - 1e-12) + 1) / 61


def test_a_bf16_study_is_refused_where_bf16_would_be_emulated(tmp_path, capsys, monkeypatch):
    study = tmp_path / "bf16.toml"
    study.write_text(open(TINY, encoding="utf-8").read().replace('precision = "float32"', 'precision = "bf16"'))
    monkeypatch.setattr(common, "native_bf16", lambda device: False)
    code, err = run_main_in_process(run_study.main, [str(study), "--out", str(tmp_path / "r"), "--work",
                                                     str(tmp_path / "w")], capsys)
    assert code == 2 and "does not compute bf16 natively" in err and "allow_emulated = true" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()
