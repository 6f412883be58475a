"""scripts/ablation_tables.py on the replication's committed per-item files: a contrast's point estimate is the
same linear combination of the runs' own scores, a run against itself is exactly zero, and a run's score equals
what 03_evaluate.py wrote into its run JSON."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import ablation_tables as at  # noqa: E402
MEASURES = {m[0]: m for m in at.PRIMARY}
RUNS = ["tft-s1", "tft-s2", "dft-feature-w1-s1", "dft-feature-w1-s2"]


def run_json(run):
    return json.load(open(os.path.join(at.REPL, "eval", run + ".json"), encoding="utf-8"))["results"]


@pytest.mark.parametrize("key", ["nll_zh", "nlu"])
def test_contrast_is_the_linear_combination_of_run_scores(key):
    scores = {run: at.run_score(at.OLD, run, MEASURES[key])[0] for run in RUNS}
    placebo = at.penalty(100, [2]) + at.scale(at.penalty(100, [1]), -1)
    got = at.contrast(placebo, MEASURES[key], resamples=200)
    want = (scores["dft-feature-w1-s2"] - scores["tft-s2"]) - (scores["dft-feature-w1-s1"] - scores["tft-s1"])
    assert got["delta"] == pytest.approx(want, abs=1e-9) and got["lo"] <= got["hi"]
    same = at.contrast([(at.OLD, "tft-s1", 1.0), (at.OLD, "tft-s1", -1.0)], MEASURES[key], resamples=200)
    assert same["delta"] == 0 and same["lo"] == same["hi"] == 0 and same["p"] == 1


def test_run_score_matches_the_run_json():
    results = run_json("tft-s1")
    nll, nll_se = at.run_score(at.OLD, "tft-s1", MEASURES["nll_zh"])
    assert nll == pytest.approx(results["nll"]["zh"]["score"], rel=1e-9) and nll_se == results["nll"]["zh"]["stderr"]
    nlu, nlu_se = at.run_score(at.OLD, "tft-s1", MEASURES["nlu"])
    tasks = [results[task][lang] for task, lang in at.cs.NLU]
    assert nlu == pytest.approx(100 * np.mean([t["score"] for t in tasks]), rel=1e-9)
    assert nlu_se == pytest.approx(100 * np.sqrt(sum(t["stderr"] ** 2 for t in tasks)) / 4, rel=1e-12)
    assert at.run_score(at.NEW, "no-such-run", MEASURES["nlu"]) is None
