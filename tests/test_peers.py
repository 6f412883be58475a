"""The inference-time peers (DESIGN §6): fitting (02_train_dft.py --fit) and applying (03_evaluate.py --model DIR).

INCLINE's least squares recovers a known linear map; DiffMean's vector is the brute-force mean over the pairs' hidden
states; the hooks change no block before the first hooked one and no position outside the named ones; alpha = 0 gives
the base model's per-item files byte for byte; the `steered` file has lm-evaluation-harness's schema and, applied as
the harness applies it, equals our hooks at every position; bad input is one error and writes nothing.
"""
import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import PAIRS_FIXTURE, fit_intervention, load_stage, run_main_in_process  # noqa: E402

import common  # noqa: E402

train = load_stage("02_train_dft")
ev = load_stage("03_evaluate")

pytestmark = pytest.mark.usefixtures("one_thread")

# lm-evaluation-harness 0.4.13, lm_eval/models/hf_steered.py (SteeredModel's docstring): one entry per hookpoint
HARNESS_STEER_KEYS = {"steering_vector", "steering_coefficient", "action", "bias", "head_index"}


@pytest.fixture(scope="module")
def folders(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    llama = tiny_model_dirs["llama"]
    return dict(incline=fit_intervention(llama, root / "incline", "incline"),
                diffmean=fit_intervention(llama, root / "diffmean", "diffmean", "--fit-layers", "2"),
                diffmean_all=fit_intervention(llama, root / "diffmean_all", "diffmean", "--fit-layers", "2",
                                              "--fit-positions", "all"))


def test_least_squares_recovers_a_known_map():
    torch.manual_seed(0)
    X = torch.randn(64, 16, dtype=torch.float64)
    W = torch.randn(16, 16, dtype=torch.float64)
    assert torch.allclose(train.least_squares_map(X, X @ W, ridge=0), W, atol=1e-10)
    # fewer pairs than dimensions (as 400 pairs at d = 576): ridge 0 is numpy's minimum-norm solution, which fits
    few = X[:10]
    fitted = train.least_squares_map(few, few @ W, ridge=0)
    assert torch.allclose(few @ fitted, few @ W, atol=1e-10)
    assert torch.allclose(fitted, torch.linalg.pinv(few) @ (few @ W), atol=1e-10)
    assert not torch.allclose(train.least_squares_map(X, X @ W, ridge=0.1), W, atol=1e-3)  # the ridge shrinks


def brute_force_states(model, tokenizer, text, k):
    """The output of block k (hidden_states[k], k < L) of one prompt alone, mean over the tokens of x."""
    ids, x_mask = common.encode_prompt(tokenizer, text)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[k][0]
    return hidden[torch.tensor(x_mask).bool()].double().mean(0)


def test_diffmean_is_the_brute_force_mean_and_the_folder_says_what_it_holds(folders, tiny_model_dirs, tokenizer):
    from safetensors.torch import load_file
    model, tokenizer = common.load_model_and_tokenizer(tiny_model_dirs["llama"])
    rows = train.load_pairs(PAIRS_FIXTURE)
    expected = (torch.stack([brute_force_states(model, tokenizer, r["x_en"], 2) for r in rows]).mean(0)
                - torch.stack([brute_force_states(model, tokenizer, r["x_tgt"], 2) for r in rows]).mean(0))
    vector = load_file(os.path.join(folders["diffmean"], "maps.safetensors"))["layers.1"]
    assert torch.allclose(vector.double(), expected, atol=1e-5)
    cfg = json.load(open(os.path.join(folders["diffmean"], common.INTERVENTION_CONFIG)))
    assert cfg["layers"] == [2] and cfg["hookpoints"] == {"2": "layers.1"} and cfg["positions"] == "prompt"
    assert cfg["base_weights_sha256"] == common.weights_sha256(tiny_model_dirs["llama"])
    assert cfg["pairs_sha256"] == common.sha256_file(PAIRS_FIXTURE) and cfg["n_pairs_used"] == len(rows)
    assert sorted(os.listdir(folders["diffmean"])) == [common.INTERVENTION_CONFIG, "maps.safetensors",
                                                        "steered.pt"]  # no base weights
    incline = json.load(open(os.path.join(folders["incline"], common.INTERVENTION_CONFIG)))
    assert incline["layers"] == [1, 2, 3, 4] and incline["positions"] == "last" and incline["ridge"] == 0.01
    assert incline["heldout_residual"] is None  # the fixture has no .dev.jsonl beside it


def test_placebos_keep_the_form_and_lose_the_pairing(folders, tiny_model_dirs, tmp_path):
    """shuffle: INCLINE fitted on pair k's target beside pair k+1's English (its map changes; the folder says so);
    random: each map replaced by noise of the fitted map's Frobenius norm, the same noise for the same --seed."""
    from safetensors.torch import load_file
    llama, maps = tiny_model_dirs["llama"], lambda folder: load_file(os.path.join(folder, "maps.safetensors"))
    shuffled = fit_intervention(llama, tmp_path / "shuffled", "incline", "--fit-placebo", "shuffle")
    real, fake = maps(folders["incline"]), maps(shuffled)
    assert real.keys() == fake.keys() and not any(torch.equal(real[k], fake[k]) for k in real)
    rows = train.load_pairs(PAIRS_FIXTURE)
    rotated = [dict(r, x_en=rows[(i + 1) % len(rows)]["x_en"], y_en=rows[(i + 1) % len(rows)]["y_en"])
               for i, r in enumerate(rows)]
    rotated_pairs = tmp_path / "rotated.jsonl"
    rotated_pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rotated), encoding="utf-8")
    by_hand = maps(fit_intervention(llama, tmp_path / "by_hand", "incline", pairs=str(rotated_pairs)))
    assert all(torch.equal(fake[k], by_hand[k]) for k in fake)
    assert json.load(open(os.path.join(shuffled, common.INTERVENTION_CONFIG)))["placebo"] == "shuffle"
    noise = [maps(fit_intervention(llama, tmp_path / f"random{i}", "diffmean", "--fit-layers", "2", "--fit-placebo",
                                   "random", "--seed", "3")) for i in range(2)]
    vector = maps(folders["diffmean"])["layers.1"]
    assert torch.equal(noise[0]["layers.1"], noise[1]["layers.1"]) and not torch.equal(noise[0]["layers.1"], vector)
    assert torch.allclose(noise[0]["layers.1"].norm(), vector.norm(), rtol=1e-5)


def test_the_steered_file_is_the_harness_schema_and_acts_as_the_harness_applies_it(folders, tiny_model_dirs,
                                                                                       tokenizer):
    """The harness adds steering_coefficient * steering_vector to the output of `hookpoint` (a module name under
    model.base_model) at every position: done here by hand, it equals our hooks with positions=all."""
    path = os.path.join(folders["diffmean_all"], "steered.pt")
    steer = torch.load(path, weights_only=True)
    assert list(steer) == ["layers.1"] and set(steer["layers.1"]) == HARNESS_STEER_KEYS
    entry = steer["layers.1"]
    assert entry["action"] == "add" and entry["bias"] is None and entry["head_index"] is None
    assert entry["steering_coefficient"] == 1.0 and entry["steering_vector"].shape == (32,)
    groups = [[ev.encode_request(tokenizer, "你好，世界。", " " + c) for c in ("Paris.", "今天天气很好")]]
    plain, _ = common.load_model_and_tokenizer(tiny_model_dirs["llama"])
    module = dict(plain.base_model.named_modules())["layers.1"]

    def harness_add(mod, args, output):
        acts = output[0] if isinstance(output, tuple) else output
        acts = acts + entry["steering_coefficient"] * entry["steering_vector"]
        return (acts, *output[1:]) if isinstance(output, tuple) else acts
    handle = module.register_forward_hook(harness_add)
    by_harness = ev.loglikelihoods(plain, groups)
    handle.remove()
    iv = ev.Intervention(folders["diffmean_all"])
    iv.check_base()
    ours, _ = ev.load_eval_model(folders["diffmean_all"], iv, "float32", "cpu", "left")
    scores = lambda model: [s for s, _ in ev.loglikelihoods(model, groups)[0]]
    assert scores(ours) == pytest.approx([s for s, _ in by_harness[0]], abs=1e-9)
    assert scores(plain) != pytest.approx([s for s, _ in by_harness[0]], abs=1e-6)


@pytest.mark.parametrize("positions", ["last", "prompt", "all"])
def test_hooks_change_nothing_before_the_first_hooked_block_nor_outside_the_named_positions(
        positions, folders, tiny_model_dirs):
    iv = ev.Intervention(folders["diffmean"], alpha=2.0)
    iv.check_base()
    iv.positions = positions
    model, _ = ev.load_eval_model(folders["diffmean"], iv, "float32", "cpu", "right")
    parts = common.model_parts(model)
    ids = torch.randint(1, 300, (2, 7))
    valid = torch.tensor([[1] * 7, [1] * 5 + [0] * 2]).bool()  # right padding
    context = torch.tensor([4, 3])
    pos = torch.arange(7).expand(2, 7)
    with common.capture_blocks(parts, [1, 2]) as clean, ev.steering(iv, pos, valid, context):
        iv.alpha_saved, iv.alpha = iv.alpha, 0.0
        parts.backbone(input_ids=ids, attention_mask=valid.long(), use_cache=False)
    iv.alpha = iv.alpha_saved
    with common.capture_blocks(parts, [1, 2]) as steered, ev.steering(iv, pos, valid, context):
        parts.backbone(input_ids=ids, attention_mask=valid.long(), use_cache=False)
    named = {"last": pos == context[:, None] - 1, "prompt": pos < context[:, None], "all": pos >= 0}[positions] & valid
    assert torch.equal(clean[1], steered[1])  # block 1: not hooked
    assert torch.equal(clean[2][~named], steered[2][~named])
    assert torch.allclose(steered[2][named], clean[2][named] + 2.0 * iv.maps["layers.1"], atol=1e-6)
    # generation: left-padded prefill (the prompt is the context), then decoding steps (never context)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with ev.steering(iv, (left.cumsum(-1) - 1).clamp(min=0), left.bool(), left.sum(1)):
        prefill = iv.mask.clone()
    with ev.steering(iv, torch.tensor([[2], [4]]), torch.ones(2, 1, dtype=torch.bool), torch.zeros(2)):
        step = iv.mask.clone()
    assert torch.equal(prefill, {"last": torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1]]).bool(), "prompt": left.bool(),
                                 "all": left.bool()}[positions])
    assert step.all().item() == (positions == "all") and step.any().item() == (positions == "all")


def evaluate_files(model, out, *flags):
    ev.main(["--model", model, "--run-name", "m", "--tasks", "xnli,mgsm,nll", "--langs", "zh", "--limit", "3",
             "--pairs", PAIRS_FIXTURE, "--batch-size", "2", "--max-new-tokens", "4", "--dtype", "float32",
             "--out", str(out), *flags])
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".jsonl")}


def test_alpha_zero_gives_the_base_models_per_item_files(folders, tiny_model_dirs, tmp_path):
    base = evaluate_files(tiny_model_dirs["llama"], tmp_path / "base")
    for name in ("incline", "diffmean_all"):
        assert evaluate_files(folders[name], tmp_path / name, "--steer-alpha", "0") == base, name
    steered = evaluate_files(folders["incline"], tmp_path / "steered")  # the folder's alpha, 1
    assert steered.keys() == base.keys() and steered != base
    run = json.load(open(tmp_path / "steered" / "m.json"))["intervention"]
    assert (run["method"], run["alpha"], run["layers"], run["positions"]) == ("incline", 1.0, [1, 2, 3, 4], "last")


def test_bad_input_is_one_error_and_writes_nothing(folders, tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [(["--fit", "incline", "--fit-layers", "5"], "--fit-layers 5 out of range: this model has blocks 1..4"),
             (["--fit", "diffmean", "--fit-layers", "2", "--max-length", "8"], "every pair's prompt is longer than --max-length 8"),
             (["--fit-pool", "last"], "--fit-pool only apply to a fit; add --fit incline|diffmean"),
             (["--fit", "incline", "--ridge", "nan"], "--ridge must be a finite number >= 0"),
             (["--fit", "diffmean", "--fit-placebo", "shuffle"], "--fit-placebo shuffle leaves a mean difference"),
             (["--fit-tuned-lens", "--fit", "incline"], "--fit and --fit-tuned-lens are two fits"),
             (["--fit", "incline", "--preset", "llama2-7b"], "--preset belong to a training, not to a fit")]
    for flags, message in cases:
        code, err = run_main_in_process(train.main, ["--pairs", PAIRS_FIXTURE, "--out", str(out), "--model",
                                                     tiny_model_dirs["llama"], *flags], capsys)
        assert code == 2 and message in err, (flags, err)
        assert not out.exists()
    for fit in (["--fit", "incline"], ["--fit-tuned-lens"]):  # a fit never writes into (or deletes) a used folder
        code, err = run_main_in_process(train.main, ["--pairs", PAIRS_FIXTURE, "--out", folders["diffmean"], "--model",
                                                     tiny_model_dirs["llama"], *fit], capsys)
        assert code == 2 and "exists and is not empty" in err, (fit, err)
        assert sorted(os.listdir(folders["diffmean"])) == [common.INTERVENTION_CONFIG, "maps.safetensors",
                                                            "steered.pt"]
    moved = tmp_path / "changed"  # a folder whose base has other weights now
    shutil.copytree(folders["diffmean"], moved)
    config = json.load(open(moved / common.INTERVENTION_CONFIG))
    config["base_weights_sha256"] = "0" * 64
    (moved / common.INTERVENTION_CONFIG).write_text(json.dumps(config))
    evaluate = ["--tasks", "nll", "--pairs", PAIRS_FIXTURE, "--langs", "zh", "--out", str(out)]
    cases = [(["--model", str(moved)], "has other weights now (sha256"),
             (["--model", folders["diffmean"], "--steer-base", tiny_model_dirs["gpt2"]],
              "fitted on a llama model with hidden size 32 and 4 blocks; --steer-base"),
             (["--model", folders["diffmean"], "--steer-alpha", "inf"], "--steer-alpha must be a finite number"),
             (["--model", tiny_model_dirs["llama"], "--steer-alpha", "1"], "none of --model is one")]
    for flags, message in cases:
        code, err = run_main_in_process(ev.main, evaluate + flags, capsys)
        assert code == 2 and message in err, (flags, err)
        assert not out.exists()


def test_analysis_layers_with_an_intervention(folders, tiny_model_dirs, tmp_path):
    """--analysis layers: alpha 0 draws the base's curves; the folder's alpha changes nothing before its block."""
    def curves(model, out, *flags):
        ev.main(["--analysis", "layers", "--model", model, "--run-name", "m", "--langs", "zh", "--pairs",
                 PAIRS_FIXTURE, "--analysis-samples", "4", "--dtype", "float32", "--out", str(out), *flags])
        return json.load(open(out / "m.layers.zh.json"))
    base = curves(tiny_model_dirs["llama"], tmp_path / "base")
    zero = curves(folders["diffmean"], tmp_path / "zero", "--steer-alpha", "0")
    steered = curves(folders["diffmean"], tmp_path / "steered", "--steer-alpha", "4")
    assert zero["entropy"] == base["entropy"] and zero["intervention"]["alpha"] == 0.0 and "intervention" not in base
    assert steered["entropy"][0] == base["entropy"][0] and steered["entropy"][1:] != base["entropy"][1:]
