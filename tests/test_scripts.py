"""The analysis and benchmark scripts as users run them: they draw what they are given, and bad input is one
`error:` line with exit code 2 (common.run_main), not a traceback or a silent success."""
import os
import subprocess
import sys

from conftest import PAIRS_FIXTURE, REPO, run_main_in_process

sys.path.insert(0, os.path.join(REPO, "scripts"))
import plot_layers  # noqa: E402
import plot_losses  # noqa: E402


def script(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_plot_layers_draws_the_folder_given_and_refuses_what_it_cannot_draw(tmp_path, capsys):
    folder = os.path.join(REPO, "results", "layers_smollm2")
    out = tmp_path / "layers.png"
    assert run_main_in_process(plot_layers.main, [folder, "--out", str(out)], capsys)[0] == 0
    assert out.stat().st_size > 0 and not (tmp_path / "nope").exists()
    code, err = run_main_in_process(plot_layers.main, [str(tmp_path / "nope")], capsys)
    assert code == 2 and "is not a folder" in err and not (tmp_path / "nope").exists()
    code, err = run_main_in_process(plot_layers.main, [folder, "--lang", "vi", "--out", str(out)], capsys)
    assert code == 2 and "no vi layer files" in err and "it holds zh: pass --lang" in err


def test_plot_losses_names_the_runs_there_when_one_is_missing(tmp_path, capsys):
    out = tmp_path / "curves.png"
    runs = os.path.join(REPO, "results", "train")
    assert run_main_in_process(plot_losses.main, [runs, "sft", "tft", "--out", str(out)], capsys)[0] == 0
    assert out.exists() and (tmp_path / "curves.md").exists()
    code, err = run_main_in_process(plot_losses.main, [runs, "tfx", "--out", str(out)], capsys)
    assert code == 2 and "the runs in" in err and "tft" in err
    code, err = run_main_in_process(plot_losses.main, [runs, "tft", "--out", str(tmp_path / "curves")], capsys)
    assert code == 2 and "give a .png path" in err


def test_bench_train_refuses_an_unknown_method_before_loading_a_model():
    proc = script("bench_train.py", "--methods", "tft,foo", "--out", "/nonexistent/never")
    assert proc.returncode == 2 and "pick from tft" in proc.stderr and "Traceback" not in proc.stderr


def test_precision_curves_refuses_a_finished_run_trained_with_other_flags(tmp_path, tiny_model_dirs):
    base = ["scripts/precision_curves.py", "--pairs", PAIRS_FIXTURE, "--out", str(tmp_path), "--steps", "1",
            "--methods", "tft", "--batch-size", "2", "--max-length", "64", "--model", tiny_model_dirs["llama"],
            "--lc-layer", "1", "--et-layer", "2"]
    first = script(*base)
    assert first.returncode == 0, first.stderr[-2000:]
    assert script(*base).returncode == 0  # the same flags: both runs reused
    again = script(*base, "--lr", "1e-3")
    assert again.returncode == 2 and "was trained with another --lr (0.0001)" in again.stderr
    moved = script(*base[:2], os.path.relpath(PAIRS_FIXTURE, REPO), *base[3:])  # the same file, named otherwise
    assert moved.returncode == 0, moved.stderr[-2000:]
    extra = script(*base, "--", "--warmup-ratio", "0")
    assert extra.returncode == 2 and "the flags after --" in extra.stderr
    broken = script(*base[:3], "--out", str(tmp_path / "b"), *base[5:8], "foo", *base[9:])  # 02 refuses the method
    assert broken.returncode == 2 and "02_train_dft.py stopped on foo" in broken.stderr
    assert "Traceback" not in broken.stderr
