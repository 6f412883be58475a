"""scripts/check_studies.py: the committed tables checked against themselves pass; one number changed in a copy is
reported (and only it); a fraction in a JSON reproduces a percentage. The full check (study_tables.py on each study
file, minutes) runs in .ci/run."""
import json
import os
import shutil
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import check_studies as cs  # noqa: E402

FILES = ["results/gemma3/ablations/tables.md", "results/gemma3/ablations/compare.json", "results/table.md"]


def test_committed_tables_reproduce_themselves(tmp_path):
    for rel in FILES:
        shutil.copy(os.path.join(REPO, rel), tmp_path / os.path.basename(rel))
    index = cs.regenerated(str(tmp_path))
    for rel in FILES:
        total, missing = cs.check_file(os.path.join(REPO, rel), index)
        assert total > 100 and missing == [], rel


def test_a_changed_number_is_reported_with_its_line(tmp_path):
    text = open(os.path.join(REPO, "results/gemma3/ablations/tables.md"), encoding="utf-8").read()
    assert text.count("[-0.0300, -0.0157]") == 1
    (tmp_path / "tables.md").write_text(text.replace("[-0.0300, -0.0157]", "[-0.0300, -0.0158]"), encoding="utf-8")
    total, missing = cs.check_file(os.path.join(REPO, "results/gemma3/ablations/tables.md"),
                                   cs.regenerated(str(tmp_path)))
    line = text[:text.index("[-0.0300, -0.0157]")].count("\n") + 1
    assert missing == [(line, "-0.0300 -0.0157")]


def test_fractions_in_json_reproduce_percent_cells(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "tables.json").write_text(json.dumps({"contrasts": [{"delta": 0.0175, "lo": -0.0013, "p": 0.25}]}))
    committed = tmp_path / "old.md"
    committed.write_text("| a | b | c |\n|---|---|---|\n| x | +1.75 [-0.13, ...] | 0.2500 |\n| y | 1.76 | 0.25 |\n")
    index = cs.regenerated(str(tmp_path / "new"))
    assert index.has_cell(["+1.75", "-0.13"]) and not index.has_cell(["+1.75", "-0.12"])
    assert cs.check_file(str(committed), index) == (4, [(4, "1.76")])
