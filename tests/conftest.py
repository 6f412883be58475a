"""Shared test fixtures: tiny random models (GPT-2, LLaMA, Gemma-2 configs) with a byte-level tokenizer.

Nothing here downloads anything. The numbered stage scripts are not importable by name, so
`load_stage("02_train_dft")` loads one from its file.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load_stage(name):
    """Import a numbered script (e.g. '02_train_dft') as a module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_stage(script, *args):
    """One command-line run of a stage script: its completed process."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], text=True, cwd=REPO,
                          capture_output=True, timeout=300)


def run_main_in_process(main, argv, capsys):
    """A stage's main(argv) as its command line runs it (common.run_main: a UserError becomes one `error:` line
    and exit code 2), in this process, without the interpreter start-up and imports a subprocess pays: its
    exit code (0 if it returned) and what it wrote to stderr."""
    import common
    capsys.readouterr()
    try:
        common.run_main(lambda: main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences in four scripts: any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Below is an instruction that describes a task. Write a response that appropriately completes the request.",
              "### Instruction:\n### Response:\n", "The answer is 42. What is the capital of France? Paris.",
              "你好，世界。今天天气很好。", "Xin chào thế giới. Hôm nay trời đẹp.", "مرحبا بالعالم"] * 3
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


TINY_CONFIGS = {
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4, n_positions=512),
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=512, final_logit_softcapping=30.0,
                   sliding_window=16, query_pre_attn_scalar=8),
}


def make_tiny_model(arch, tokenizer, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                                  **TINY_CONFIGS[arch])
    kwargs = {"attn_implementation": "eager"} if arch == "gemma2" else {}
    return AutoModelForCausalLM.from_config(config, **kwargs).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is faster and steadier (restored afterwards).
    Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer):
    """{arch: folder} of saved tiny models (with the tokenizer), loadable by common.load_model_and_tokenizer."""
    dirs = {}
    for arch in TINY_CONFIGS:
        path = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
        make_tiny_model(arch, tokenizer).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


PAIRS_FIXTURE = os.path.join(REPO, "tests", "fixtures", "pairs_zh.jsonl")


def gloo_threads():
    """Names of this process's gloo threads (Linux: /proc); None where thread names cannot be read."""
    if not os.path.isdir("/proc/self/task"):
        return None
    names = []
    for t in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{t}/comm") as f:
            names.append(f.read().strip())
    return [n for n in names if "gloo" in n]


def fit_intervention(model_dir, out, method, *flags, pairs=PAIRS_FIXTURE):
    """An intervention folder of 02_train_dft.py --fit on a tiny model (in this process): its path."""
    train = load_stage("02_train_dft")
    train.main(["--fit", method, "--pairs", pairs, "--out", str(out), "--model", model_dir, "--batch-size", "8",
                *flags])
    return str(out)
