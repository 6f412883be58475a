"""The tuned lens (DESIGN §6, "Readout"): fitting, the package's folder layout both ways, the readout in training and
in --analysis layers, and its bad input."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import REPO, load_stage, make_tiny_model, run_main_in_process

train = load_stage("02_train_dft")
evaluate = load_stage("03_evaluate")
PAIRS = os.path.join(REPO, "tests", "fixtures", "pairs_zh.jsonl")
PACKAGE_LENS = os.path.join(REPO, "tests", "fixtures", "tuned_lens_package")
pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass
class TunedLensConfig:
    """The package's config (tuned_lens/nn/lenses.py), field for field: what its from_dict accepts."""
    base_model_name_or_path: str
    d_model: int
    num_hidden_layers: int
    bias: bool = True
    base_model_revision: str = None
    unembed_hash: str = None
    lens_type: str = "linear_tuned_lens"


def package_translators(folder, d_model, layers):
    """params.pt loaded as the package loads it: layer_translators.load_state_dict (strict) into nn.Linear(d, d)."""
    translators = torch.nn.ModuleList([torch.nn.Linear(d_model, d_model) for _ in range(layers)])
    translators.load_state_dict(torch.load(os.path.join(folder, "params.pt")))
    return translators


@pytest.fixture(scope="module")
def fitted_lens(tmp_path_factory, tiny_model_dirs):
    """A lens fitted on the tiny LLaMA from the zero start (the KL steps alone), blocks 1 and 3."""
    out = str(tmp_path_factory.mktemp("lens") / "lens")
    train.main(["--fit-tuned-lens", "--pairs", PAIRS, "--eval-pairs", PAIRS, "--out", out,
                "--model", tiny_model_dirs["llama"], "--fit-layers", "1,3", "--fit-init", "zero", "--fit-steps", "15",
                "--fit-lr", "1e-2", "--fit-tokens", "400", "--fit-batch", "128", "--fit-eval-tokens", "200"])
    return out


def test_fitting_lowers_the_heldout_kl_at_every_fitted_block(fitted_lens):
    provenance = json.load(open(os.path.join(fitted_lens, common.TUNED_LENS_PROVENANCE)))
    assert provenance["fitted_blocks"] == [1, 3]
    for k in ("1", "3"):
        kl = provenance["heldout_kl"][k]
        assert 0 <= kl["tuned"] < kl["logit"], k
    assert provenance["fit_kl_curve"][-1] < provenance["fit_kl_curve"][0]
    assert provenance["pairs_sha256"] == common.sha256_file(PAIRS) and provenance["seconds"]["fit"] > 0


def test_our_lens_loads_by_the_package_layout(fitted_lens, tiny_model_dirs):
    config = json.load(open(os.path.join(fitted_lens, "config.json")))
    assert list(config) == [f.name for f in dataclasses.fields(TunedLensConfig)]  # exactly its fields
    TunedLensConfig(**config)
    model, _ = common.load_model_and_tokenizer(tiny_model_dirs["llama"])
    parts = common.model_parts(model)
    weight = parts.lm_head.weight.detach().numpy()
    # the package's hash (tuned_lens/utils.py tensor_hash) of its Unembed's weight
    assert config["unembed_hash"] == __import__("hashlib").sha256(
        str.encode(np.array_str(weight, precision=1))).hexdigest()
    translators = package_translators(fitted_lens, 32, 4)
    lens = common.load_tuned_lens(fitted_lens, model)
    assert lens.fitted == [1, 3] and lens.weights_match
    for k in range(4):  # unfitted indices stay zero: the logit lens
        assert torch.equal(translators[k].weight, lens.translator(k)[0])
        assert (translators[k].weight.abs().sum() > 0) == (k in (1, 3))


def test_a_package_lens_reads_here_as_the_package_reads_it(tiny_model_dirs):
    model, _ = common.load_model_and_tokenizer(tiny_model_dirs["llama"])
    parts = common.model_parts(model)
    lens = common.load_tuned_lens(PACKAGE_LENS, model)
    translators = package_translators(PACKAGE_LENS, 32, 4)
    h = torch.randn(5, 32)
    with torch.no_grad():
        for k in range(4):  # TunedLens.forward: unembed(h + translator(h)); Unembed: lm_head(final_norm(h))
            expected = model.lm_head(model.model.norm(h + translators[k](h)))
            torch.testing.assert_close(common.lens_logits(parts, h, translator=lens.translator(k)), expected)
    assert lens.fitted == [0, 1, 2, 3] and not lens.weights_match  # no provenance: not known to be this model's


def test_a_zero_lens_is_the_logit_lens_in_the_analysis(tmp_path, tokenizer):
    model = make_tiny_model("llama", tokenizer)
    zero = common.TunedLens(None, {k: (torch.zeros(32, 32), torch.zeros(32)) for k in range(4)}, {}, None, None, True)
    pairs = [("Hello world.", "你好，世界。"), ("The answer is 42.", "今天天气很好。")]
    tokenizer.padding_side = "right"
    res = evaluate.layer_analysis(model, tokenizer, "zh", pairs, batch_size=2, lens=zero)
    for name in evaluate.LAYER_MEASURES[:-1]:
        assert res["tuned"][name] == res[name], name
        assert res["tuned"]["per_sentence"][name] == res["per_sentence"][name]
    plain = evaluate.layer_analysis(model, tokenizer, "zh", pairs, batch_size=2)
    assert {k: v for k, v in res.items() if k not in ("tuned", "tuned_lens", "definitions")} == \
        {k: v for k, v in plain.items() if k != "definitions"}  # additive keys only
    evaluate.plot_layers({"base": res}, "zh", str(tmp_path / "layers.zh.png"))
    assert os.path.getsize(tmp_path / "layers.zh.png") > 0


def test_training_with_the_tuned_readout_records_and_copies_the_lens(fitted_lens, tiny_model_dirs, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--pairs", PAIRS, "--out", out, "--model", tiny_model_dirs["llama"], "--method", "dft-logits-tuned",
                "--tuned-lens", fitted_lens, "--lc-layer", "1", "--et-layer", "3", "--max-steps", "2",
                "--batch-size", "2", "--save-every", "1", "--stop-after-steps", "1"])
    saved = json.load(open(os.path.join(out, "train_config.json")))
    assert saved["readout"] == "tuned" and saved["tuned_lens_sha256"] == common.sha256_file(
        os.path.join(fitted_lens, "params.pt"))
    assert saved["tuned_lens_record"]["fitted_blocks"] == [1, 3] and saved["tuned_lens_record"]["weights_match"]
    # --resume compares the readout
    with pytest.raises(common.UserError, match="readout: 'tuned' -> 'logit'"):
        train.main(["--pairs", PAIRS, "--out", out, "--model", tiny_model_dirs["llama"], "--method", "dft-logits",
                    "--lc-layer", "1", "--et-layer", "3", "--max-steps", "2", "--batch-size", "2", "--resume"])
    train.main(["--pairs", PAIRS, "--out", out, "--model", tiny_model_dirs["llama"], "--method", "dft-logits-tuned",
                "--tuned-lens", fitted_lens, "--lc-layer", "1", "--et-layer", "3", "--max-steps", "2",
                "--batch-size", "2", "--resume"])
    assert sorted(os.listdir(os.path.join(out, "tuned_lens"))) == ["config.json", "params.pt", "provenance.json"]
    assert not [k for k in load_file(os.path.join(out, "model.safetensors")) if "readout" in k or "weight_1" in k]
    common.load_tuned_lens(os.path.join(out, "tuned_lens"), common.load_model_and_tokenizer(out)[0])


def test_the_entropy_rule_reads_through_the_tuned_lens(fitted_lens, tiny_model_dirs, tokenizer):
    model, _ = common.load_model_and_tokenizer(tiny_model_dirs["llama"])
    lens = common.load_tuned_lens(fitted_lens, model)
    texts = [common.build_prompt(r["x_tgt"]) for r in train.load_pairs(PAIRS)[:4]]
    logit = common.lens_entropy_curve(model, tokenizer, texts)
    tuned = common.lens_entropy_curve(model, tokenizer, texts, lens=lens)
    assert tuned[1] == logit[1] and tuned[3] == logit[3]  # entry k - 1: block 2 unfitted, block 4 the output
    assert tuned[0] != logit[0] and tuned[2] != logit[2]


def test_least_squares_start_recovers_an_affine_map():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(500, 8, generator=generator)
    a, b = torch.randn(8, 8, generator=generator), torch.randn(8, generator=generator)
    weight, bias = train.least_squares_translator(h, h + h @ a.T + b, ridge=0.0)
    torch.testing.assert_close(weight, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bias, b, atol=1e-4, rtol=1e-4)


def test_bad_lens_input(fitted_lens, tiny_model_dirs, tmp_path, capsys):
    base = ["--pairs", PAIRS, "--model", tiny_model_dirs["llama"], "--lc-layer", "1", "--et-layer", "3",
            "--max-steps", "1"]
    cases = []
    code, err = run_main_in_process(train.main, base + ["--out", str(tmp_path / "a"), "--method", "dft-logits",
                                                        "--readout", "tuned"], capsys)
    cases.append((code, err, "needs --tuned-lens", "a"))
    other = make_tiny_model("llama", __import__("conftest").make_tokenizer(), seed=1)  # another unembedding
    other_dir = str(tmp_path / "other")
    other.save_pretrained(other_dir)
    shutil.copy(os.path.join(tiny_model_dirs["llama"], "tokenizer.json"), other_dir)
    shutil.copy(os.path.join(tiny_model_dirs["llama"], "tokenizer_config.json"), other_dir)
    code, err = run_main_in_process(train.main, base[:2] + ["--model", other_dir] + base[4:] + [
        "--out", str(tmp_path / "b"), "--method", "dft-logits-tuned", "--tuned-lens", fitted_lens], capsys)
    cases.append((code, err, "another unembedding", "b"))
    shapes = str(tmp_path / "shapes")
    shutil.copytree(fitted_lens, shapes)
    config = json.load(open(os.path.join(shapes, "config.json")))
    json.dump(dict(config, num_hidden_layers=5), open(os.path.join(shapes, "config.json"), "w"))
    code, err = run_main_in_process(train.main, base + ["--out", str(tmp_path / "c"), "--method", "dft-logits-tuned",
                                                        "--tuned-lens", shapes], capsys)
    cases.append((code, err, "5 layers", "c"))
    truncated = str(tmp_path / "truncated")
    shutil.copytree(fitted_lens, truncated)
    params = open(os.path.join(truncated, "params.pt"), "rb").read()
    open(os.path.join(truncated, "params.pt"), "wb").write(params[:len(params) // 2])
    code, err = run_main_in_process(train.main, base + ["--out", str(tmp_path / "d"), "--method", "dft-logits-tuned",
                                                        "--tuned-lens", truncated], capsys)
    cases.append((code, err, "damaged or truncated", "d"))
    code, err = run_main_in_process(evaluate.main, ["--analysis", "layers", "--model", other_dir, "--langs", "zh",
                                                    "--pairs", PAIRS, "--out", str(tmp_path / "e"),
                                                    "--tuned-lens", fitted_lens], capsys)
    cases.append((code, err, "another unembedding", "e"))
    for code, err, message, out in cases:
        assert code == 2 and message in err and err.count("error:") == 1, (message, err)
        assert not os.path.exists(tmp_path / out) or not os.listdir(tmp_path / out), out


def test_a_run_fine_tuned_from_the_lens_base_reads_through_it(fitted_lens, tiny_model_dirs, tmp_path, capsys):
    """The package's unembed_hash is a printed summary whose format fine-tuning can flip (Gemma-3-270M after 100 steps):
    a run whose train_config.json names the lens's base loads, recorded; one naming another base is refused."""
    import transformers
    base = tiny_model_dirs["llama"]
    tuned = str(tmp_path / "tuned")
    shutil.copytree(base, tuned)
    model = transformers.AutoModelForCausalLM.from_pretrained(tuned)
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] += 1.0  # the printed corner changes
    model.save_pretrained(tuned)
    common.write_json(os.path.join(tuned, "train_config.json"), dict(model=base))
    model = transformers.AutoModelForCausalLM.from_pretrained(tuned)
    assert common.unembed_hash(common.model_parts(model)) != json.load(open(os.path.join(fitted_lens, "config.json")))[
        "unembed_hash"]
    lens = common.load_tuned_lens(fitted_lens, model)
    assert lens.record()["unembed_hash_match"] is False and lens.record()["weights_match"] is False
    code, _ = run_main_in_process(evaluate.main, ["--analysis", "layers", "--model", tuned, "--langs", "zh", "--pairs",
                                                  PAIRS, "--out", str(tmp_path / "layers"), "--tuned-lens",
                                                  fitted_lens, "--analysis-samples", "4"], capsys)
    written = [json.load(open(os.path.join(tmp_path, "layers", f))) for f in os.listdir(tmp_path / "layers")
               if f.endswith(".json")]
    assert code == 0 and [w["tuned_lens"]["unembed_hash_match"] for w in written if "tuned_lens" in w] == [False]
    nameless = str(tmp_path / "nameless")  # a lens that names no base: only its hash can match
    shutil.copytree(fitted_lens, nameless)
    config = json.load(open(os.path.join(nameless, "config.json")))
    json.dump(dict(config, base_model_name_or_path=None), open(os.path.join(nameless, "config.json"), "w"))
    common.write_json(os.path.join(tuned, "train_config.json"), dict(model="another/base"))
    with pytest.raises(common.UserError, match="does not name the lens's base"):
        common.load_tuned_lens(fitted_lens, model)
    os.remove(os.path.join(tuned, "train_config.json"))  # no base on either side is no match
    with pytest.raises(common.UserError, match="does not name the lens's base"):
        common.load_tuned_lens(nameless, model)


def test_bad_fit_input(tiny_model_dirs, tmp_path, capsys):
    fit = ["--fit-tuned-lens", "--pairs", PAIRS, "--eval-pairs", PAIRS, "--fit-steps", "1", "--fit-tokens", "50"]
    code, err = run_main_in_process(train.main, fit + ["--model", tiny_model_dirs["llama"], "--out",
                                                       str(tmp_path / "a"), "--fit-layers", "2,4"], capsys)
    assert code == 2 and "--fit-layers [4] out of range" in err and not os.path.exists(tmp_path / "a")
    # a tokenizer whose BOS is the template's first token, and sequences of one token: nothing is left to fit on
    bos_dir = str(tmp_path / "bos")
    shutil.copytree(tiny_model_dirs["llama"], bos_dir)
    tok_config = json.load(open(os.path.join(bos_dir, "tokenizer_config.json")))
    json.dump(dict(tok_config, bos_token="Below"), open(os.path.join(bos_dir, "tokenizer_config.json"), "w"))
    code, err = run_main_in_process(train.main, fit + ["--model", bos_dir, "--out", str(tmp_path / "b"),
                                                       "--max-length", "1"], capsys)
    assert code == 2 and "no position left" in err and not os.path.exists(tmp_path / "b")
