"""--lora: only the adapters train (the lens readout stays frozen through peft), the adapter folder loads with
common.load_model_and_tokenizer from any working folder, and --merge-lora exports a plain model with the adapter's
logits."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import REPO, load_stage

train = load_stage("02_train_dft")
PAIRS = os.path.join(REPO, "tests", "fixtures", "pairs_zh.jsonl")
FLAGS = ["--pairs", PAIRS, "--method", "dft-logits", "--lc-layer", "1", "--et-layer", "3", "--max-steps", "5",
         "--lr", "1e-2", "--warmup-ratio", "0", "--batch-size", "4", "--lora", "--lora-r", "4"]


pytestmark = pytest.mark.usefixtures("one_thread")


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_model_dirs):
    """A private copy of the tiny LLaMA, so that the test can name it by a relative path."""
    folder = tmp_path_factory.mktemp("lora") / "base"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapter_dir(base_dir):
    """Trained with --model given relative to the working folder, as users often do."""
    parent, name = os.path.split(base_dir)
    cwd = os.getcwd()
    os.chdir(parent)
    try:
        train.main([*FLAGS, "--model", name, "--out", "adapter"])
    finally:
        os.chdir(cwd)
    return os.path.join(parent, "adapter")


@pytest.fixture(scope="module")
def inputs(adapter_dir):
    _, tokenizer = common.load_model_and_tokenizer(adapter_dir)
    rows = train.load_pairs(PAIRS)[:3]
    return tokenizer([common.build_prompt(r["x_tgt"]) + r["y_tgt"] for r in rows], return_tensors="pt", padding=True)


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def test_adapter_folder_records_the_base_and_loads_anywhere(adapter_dir, base_dir, tmp_path, monkeypatch):
    config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    assert config["base_model_name_or_path"] == base_dir  # absolute, though --model was relative
    assert not os.path.exists(os.path.join(adapter_dir, "model.safetensors"))  # the adapter only, not the base
    monkeypatch.chdir(tmp_path)
    model, _ = common.load_model_and_tokenizer(adapter_dir)
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert common.model_parts(model).num_layers == 4  # model_parts sees through peft


def test_only_adapters_train(adapter_dir, base_dir, inputs):
    log = read_log(adapter_dir)
    assert len(log) == 5 and log[-1]["loss"] < log[0]["loss"]
    model, _ = common.load_model_and_tokenizer(adapter_dir)
    base_weights = load_file(os.path.join(base_dir, "model.safetensors"))
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items()
             if "lora_" not in k}
    assert set(state) == set(base_weights)
    assert all(torch.equal(state[k], base_weights[k]) for k in base_weights)  # lm_head and final norm included
    lora_b = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values())  # trained (they start at zero)
    base, _ = common.load_model_and_tokenizer(base_dir)
    assert (logits(model, inputs) - logits(base, inputs)).abs().max() > 1e-3


def test_lens_term_reaches_only_adapters_up_to_its_block(base_dir):
    """L_LC at block 1 with a LoRA model: gradient on the adapters of block 1 only; the readout has none."""
    from peft import LoraConfig, get_peft_model
    model, tokenizer = common.load_model_and_tokenizer(base_dir)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                             init_lora_weights=False))  # non-zero B, so A gets a gradient too
    cfg = dict(train.DEFAULTS)
    cfg.update(train.METHODS["dft-logits"], method="dft-logits", et="none", tft_weight=0.0, lc_layer_used=1)
    examples, _ = train.encode_pairs(tokenizer, train.load_pairs(PAIRS)[:2], cfg)
    train.DFTObjective(model, cfg)(train.collate(examples, tokenizer.pad_token_id))["loss"].backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (".layers.0." in name), name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_merged_export_equals_adapter(adapter_dir, base_dir, inputs):
    merged_dir = os.path.join(os.path.dirname(adapter_dir), "merged")
    train.main([*FLAGS, "--model", base_dir, "--out", merged_dir, "--merge-lora"])
    assert [r["loss"] for r in read_log(merged_dir)] == [r["loss"] for r in read_log(adapter_dir)]  # same training
    assert not os.path.exists(os.path.join(merged_dir, "adapter_config.json"))
    merged, _ = common.load_model_and_tokenizer(merged_dir)
    assert type(merged).__name__ == "LlamaForCausalLM"  # a plain model folder
    adapter, _ = common.load_model_and_tokenizer(adapter_dir)
    torch.testing.assert_close(logits(merged, inputs), logits(adapter, inputs), atol=1e-5, rtol=1e-5)


def test_lora_with_grad_checkpointing_changes_nothing(base_dir, tmp_path):
    plain, ckpt = str(tmp_path / "plain"), str(tmp_path / "ckpt")
    # checkpointed blocks always recompute the lens prefix: the plain run must take the same path, or bf16
    # rounding of the shared path alone separates the two runs
    same_path = ["--lens-prefix", "recompute"]
    train.main([*FLAGS, *same_path, "--model", base_dir, "--out", plain, "--max-steps", "2"])
    train.main([*FLAGS, *same_path, "--model", base_dir, "--out", ckpt, "--max-steps", "2", "--grad-checkpointing"])
    for a, b in zip(read_log(plain), read_log(ckpt)):
        for k in ("loss", "loss_tft", "loss_lc", "loss_et", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k
    wa, wb = load_file(os.path.join(plain, "adapter_model.safetensors")), load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.slow
def test_lora_two_processes_equal_one_process(base_dir, tmp_path):
    """2 CPU processes x batch 2 == 1 process x batch 2 x accumulation 2, for the adapter too (no dropout: each
    rank would draw its own masks); the main process alone writes the adapter."""
    import subprocess
    import sys
    flags = [*FLAGS, "--model", base_dir, "--batch-size", "2", "--lora-dropout", "0", "--max-steps", "3"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(REPO, "02_train_dft.py"), *flags, "--out", two], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    train.main([*flags, "--out", one, "--grad-accum", "2"])
    for a, b in zip(read_log(two), read_log(one)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa = load_file(os.path.join(two, "adapter_model.safetensors"))
    wb = load_file(os.path.join(one, "adapter_model.safetensors"))
    assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    model, _ = common.load_model_and_tokenizer(two)
    assert type(model).__name__ == "PeftModelForCausalLM"
