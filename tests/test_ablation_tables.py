"""The ablations' study file read by scripts/study_tables.py on the committed per-item files: a contrast's point
estimate is the same linear combination of the runs' own scores, a run against itself is exactly zero, and a run's
score equals what 03_evaluate.py wrote into its run JSON."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import study_tables as st  # noqa: E402
from run_study import load_study  # noqa: E402

STUDY = load_study(os.path.join(REPO, "studies", "gemma3_ablations.toml"), check_flags=False)
RESULTS = st.Results(STUDY, os.path.join(REPO, STUDY["study"]["results"]))
RESAMPLING = dict(STUDY["resampling"], B=200)
NLU = [c.split() for c in STUDY["measures"]["nlu"]["cells"]]


def run_json(run):
    return json.load(open(os.path.join(REPO, "results", "gemma3", "eval", run + ".json"), encoding="utf-8"))["results"]


def terms(contrast):
    return [(t, coef, st.term_runs(STUDY, t)) for t, coef in STUDY["contrasts"][contrast]["terms"].items()]


@pytest.mark.parametrize("measure", ["nll_zh", "nlu"])
def test_contrast_is_the_linear_combination_of_run_scores(measure):
    scores = {run: RESULTS.score(run, measure)[0] for run in ("tft-s1", "tft-s2", "dft-feature-w1-s1",
                                                              "dft-feature-w1-s2")}
    got = st.contrast(RESULTS, terms("placebo"), measure, RESAMPLING)
    want = (scores["dft-feature-w1-s2"] - scores["tft-s2"]) - (scores["dft-feature-w1-s1"] - scores["tft-s1"])
    assert got["delta"] == pytest.approx(want, abs=1e-9) and got["lo"] <= got["hi"]
    same = st.contrast(RESULTS, [("tft-s1", 1.0, ["tft-s1"]), ("tft-s1", -1.0, ["tft-s1"])], measure, RESAMPLING)
    assert same["delta"] == 0 and same["lo"] == same["hi"] == 0 and same["p"] == 1


def test_run_score_matches_the_run_json():
    results = run_json("tft-s1")
    nll, nll_se = RESULTS.score("tft-s1", "nll_zh")
    assert nll == pytest.approx(results["nll"]["zh"]["score"], rel=1e-9) and nll_se == results["nll"]["zh"]["stderr"]
    nlu, nlu_se = RESULTS.score("tft-s1", "nlu")
    tasks = [results[task][lang] for task, lang in NLU]
    assert nlu == pytest.approx(100 * np.mean([t["score"] for t in tasks]), rel=1e-9)
    assert nlu_se == pytest.approx(100 * np.sqrt(sum(t["stderr"] ** 2 for t in tasks)) / 4, rel=1e-12)
    missing = st.Results(STUDY, os.path.join(REPO, "no-such-folder"))
    assert missing.score("tft-300-s1", "nlu") is None  # a run of this study not evaluated (there) yet
