r"""
Stage 2: Deep Supervision Fine-Tuning (DFT) with hand-written hidden-state supervision.

One plain PyTorch loop (accelerate for multi-device) trains one of these methods on the pairs
written by 01_build_pairs.py:
  sft          L_TFT on the English side only (x_en -> y_en)
  tft          L_TFT on the target side (x_tgt -> y_tgt), the paper's main baseline
  dft-logits   L_TFT + L_LC + L_ET, each a logit-lens cross-entropy against English tokens
  dft-feature  L_TFT + L_LC + L_ET, each a cosine distance to the parallel English hidden states
  mid-align    L_TFT + a contrastive (InfoNCE) term at the middle block, the closest peer (Liu & Niehues 2025)
  dft-logits-tuned  dft-logits read through a tuned lens (--tuned-lens DIR; ours, DESIGN §6)
(docs/DESIGN.md §2 defines every term; `--lc/--et` mix the signals freely: logits, feature, contrastive.)

Examples:
  # CPU, the offline default model (SmolLM2-135M-Instruct), a few hundred zh pairs
  python 02_train_dft.py --pairs out/pairs_zh.jsonl --out out/dft-logits --method dft-logits --max-steps 50
  # the paper's recipe for LLaMA-2-7B (i=2, j=15) on 8 GPUs
  accelerate launch --config_file configs/fsdp_8gpu.yaml 02_train_dft.py --preset llama2-7b \
      --pairs pairs_zh.jsonl --out runs/llama2-dft-logits --method dft-logits
  # layers chosen from the logit-lens entropy curve (written next to the model as JSON + PNG)
  python 02_train_dft.py --pairs p.jsonl --out o --method dft-feature --lc-layer auto --et-layer auto
  # no training: an inference-time peer (INCLINE's maps, or a DiffMean vector) as an intervention folder for 03
  python 02_train_dft.py --fit incline --pairs out/pairs_zh.jsonl --out out/incline

Outputs in --out: a Hugging Face model folder (or a LoRA adapter with --lora), the tokenizer,
train_config.json, train_log.jsonl (one line per optimizer step), layer_entropy.{json,png} when a
layer is 'auto', and checkpoint/ (every --save-every steps; --resume continues from it). With --fit: the
intervention folder (maps.safetensors, intervention_config.json, steered.pt for diffmean), no model weights.
"""
import argparse
import json
import math
import os
import shutil
import time
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# methods and recipes

METHODS = {  # which sequences the loss sees; DESIGN §2 "named presets"
    "sft": dict(tft_side="en", lc="none", et="none"),
    "tft": dict(tft_side="tgt", lc="none", et="none"),
    "dft-logits": dict(tft_side="tgt", lc="logits", et="logits"),
    "dft-feature": dict(tft_side="tgt", lc="feature", et="feature"),
    # the peer: InfoNCE of mean-pooled parallel prompts at block L // 2, both branches trained (as its code does)
    "mid-align": dict(tft_side="tgt", lc="none", et="contrastive", et_layer="mid", feature_grad="both"),
    # ours (DESIGN §6): dft-logits read through a tuned lens (--tuned-lens DIR) instead of the logit lens
    "dft-logits-tuned": dict(tft_side="tgt", lc="logits", et="logits", readout="tuned"),
}
SIGNAL_NAMES = ("none", "logits", "feature", "contrastive")  # --lc / --et; their classes: SIGNALS, by the objective

# the inference-time peers (DESIGN §6): fitted from the pairs on the frozen model, nothing trained. Defaults: INCLINE
# as its released code (every block, the last prompt token); DiffMean at the block DFT supervises for L_ET, every
# prompt token. alpha: the scale 03_evaluate.py applies unless --steer-alpha says otherwise.
FITS = {
    "incline": dict(layers="all", positions="last", alpha=1.0, formula="h + alpha * (h @ W)"),
    "diffmean": dict(layers="auto", positions="prompt", alpha=1.0, formula="h + alpha * v"),
}
POSITIONS = common.STEER_POSITIONS
PEER_FLAGS = ("fit_pool", "fit_positions", "ridge", "fit_placebo")  # --fit's own
TUNED_LENS_FLAGS = ("fit_tokens", "fit_steps", "fit_batch", "fit_init", "fit_lr", "fit_eval_tokens")  # its own
FIT_FLAGS = ("fit", "fit_tuned_lens", "fit_layers") + PEER_FLAGS + TUNED_LENS_FLAGS  # not settings of a training run

# The paper's recipe (stanford_alpaca defaults: batch 128, lr 2e-5, 3 epochs, max length 512, cosine,
# warmup 3%, no weight decay) and the layers: LLaMA-2-7B i=2, j=15 from the paper; the paper gives no
# layers for Gemma-2-2B and we have not run its analysis, so it uses the entropy rule (auto).
# SmolLM2-135M: i=6, j=16 from the entropy rule over 64 Chinese Alpaca prompts (README, "Layers").
PAPER_RECIPE = dict(global_batch_size=128, lr=2e-5, epochs=3, max_length=512, warmup_ratio=0.03, weight_decay=0.0)
PRESETS = {
    "llama2-7b": dict(PAPER_RECIPE, model="meta-llama/Llama-2-7b-hf", batch_size=4, lc_layer="2", et_layer="15",
                      dtype="bfloat16", grad_checkpointing=True),
    "gemma2-2b": dict(PAPER_RECIPE, model="google/gemma-2-2b", batch_size=8, lc_layer="auto", et_layer="auto",
                      dtype="bfloat16", grad_checkpointing=True),
    # CPU-sized: the same schedule, a small batch; layers from the entropy rule
    "smollm2-135m": dict(PAPER_RECIPE, model=common.DEFAULT_MODEL, global_batch_size=8, batch_size=8,
                         lc_layer="6", et_layer="16", dtype="float32"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's default after its help; flags without one (None) and switches
    (False) show none."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog="A flag left off the command line takes the --method's value (sft, tft, ...: "
                                       "the sequences; mid-align: its layer and gradient), else the --preset's, "
                                       "else its default.")
    g = p.add_argument_group("data and model")
    g.add_argument("--pairs", required=True, help="pairs JSONL from 01_build_pairs.py")
    g.add_argument("--out", required=True, help="output folder (model, logs, checkpoints)")
    g.add_argument("--model", default=common.DEFAULT_MODEL, help="HF hub name or local folder")
    g.add_argument("--preset", choices=sorted(PRESETS), help="the paper's recipe for a model (layers, batch, lr, ...)")
    g = p.add_argument_group("objective (DESIGN §2)")
    g.add_argument("--method", choices=sorted(METHODS), default="tft",
                   help="the objective: its sequences and signals (METHODS; docs/TRAINING.md's table)")
    g.add_argument("--lc", choices=SIGNAL_NAMES, help="language-conversion signal (default: the --method's)")
    g.add_argument("--et", choices=SIGNAL_NAMES, help="English-thinking signal (default: the --method's)")
    g.add_argument("--readout", choices=["logit", "tuned"], default="logit",
                   help="what the logits signal reads block k through: the frozen final norm and lm_head (logit, "
                        "the paper's) or a tuned lens before them (tuned: --tuned-lens; DESIGN §6)")
    g.add_argument("--tuned-lens", help="tuned-lens folder (config.json, params.pt: 02_train_dft.py --fit-tuned-lens "
                                        "or the tuned-lens package) for --readout tuned / --layer-rule-readout tuned")
    g.add_argument("--lc-layer", default="auto",
                   help="block i for L_LC, 1-based (HF hidden_states index), 'auto' (entropy rule) or 'mid' (L // 2)")
    g.add_argument("--et-layer", default="auto", help="block j for L_ET, 1-based, 'auto' or 'mid'")
    g.add_argument("--lc-weight", type=float, default=1.0, help="w_LC (paper: 1); 0 computes L_LC for the log only")
    g.add_argument("--et-weight", type=float, default=1.0, help="w_ET (paper: 1); 0 computes L_ET for the log only")
    g.add_argument("--tft-weight", type=float, default=1.0,
                   help="weight of L_TFT (0 trains the intermediate objectives alone)")
    g.add_argument("--pool", choices=["mean", "last"], default="mean", help="feature pooling over the tokens of x")
    g.add_argument("--feature-grad", choices=["target", "both"], default="target",
                   help="feature / contrastive terms: gradient into the target branch only or into the English "
                        "branch too (--method mid-align: both)")
    g.add_argument("--contrastive-temperature", type=float, default=0.1,
                   help="InfoNCE temperature on cosine similarities")
    g.add_argument("--contrastive-negatives", choices=["local", "global"], default="global",
                   help="negatives: the other pairs of this device's micro-batch (local) or of every device's "
                        "(global; gathered with gradient, so N devices x batch B equal one device x batch N*B)")
    g.add_argument("--alternate", action="store_true",
                   help="the peer's schedule: odd steps the task loss (L_TFT) only, even steps the intermediate "
                        "terms only")
    g.add_argument("--allow-layer-order", action="store_true", help="allow an LC layer >= the ET layer")
    g.add_argument("--layer-sample", type=int, default=64, help="target prompts used by the auto layer rule")
    g.add_argument("--layer-rule-readout", choices=["logit", "tuned"], default="logit",
                   help="the lens the entropy rule of 'auto' layers reads through (tuned: --tuned-lens)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=3, help="passes over the pairs")
    g.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per device per micro-batch")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1, or from "
                                                  "--global-batch-size)")
    g.add_argument("--global-batch-size", type=int, help="checked against batch-size x devices x grad-accum")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warm-up fraction, then cosine decay")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (as stanford_alpaca)")
    g.add_argument("--max-grad-norm", type=grad_norm_arg, default=1.0,
                   help="clip the global gradient norm to this; 0 or 'none': no clipping (the norm is still logged)")
    g.add_argument("--max-length", type=int, default=512,
                   help="tokens per sequence; longer ones are cut and counted")
    g.add_argument("--seed", type=int, default=42, help="data order and initialisation")
    g = p.add_argument_group("memory and speed")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype")
    g.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default="auto",
                   help="bf16 autocast on float32 master weights; auto: bf16 where the device computes bf16 "
                        "natively (CUDA Ampere+, a CPU with AMX / AVX512-BF16), else no. An accelerate config or "
                        "ACCELERATE_MIXED_PRECISION decides under auto and must agree with an explicit value")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward")
    g.add_argument("--lens-prefix", choices=["shared", "recompute"], default="shared",
                   help="the dft-logits lens sequences [P(x_tgt); x_en] and [P(x_tgt); y_en]: run only their x_en / "
                        "y_en tokens, attending to the prompt's keys and values from the L_TFT pass (shared), or run "
                        "the prompt again (recompute). Same losses and gradients; shared falls back to recompute "
                        "where it cannot be exact (docs/TRAINING.md)")
    g.add_argument("--ce-chunk", type=int, default=1024,
                   help="tokens per cross-entropy chunk; logits of one chunk live at a time (0: no chunking)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated module names")
    g.add_argument("--merge-lora", action="store_true", help="save the merged full model instead of the adapter")
    g = p.add_argument_group("held-out loss during training")
    g.add_argument("--eval-pairs", help="held-out pairs JSONL (e.g. X.dev.jsonl from 01_build_pairs.py): every term "
                                        "of the objective without gradient, as eval_* fields of train_log.jsonl")
    g.add_argument("--eval-every", type=int, help="evaluate every N optimizer steps (default with --eval-pairs: only "
                                                  "after the last step; the last step is always evaluated)")
    g.add_argument("--eval-limit", type=int, help="use the first N held-out pairs (default all)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N optimizer steps (0: only the final model)")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    g.add_argument("--log-every", type=int, default=1, help="print every N steps (train_log.jsonl gets every step)")
    g.add_argument("--stop-after-steps", type=int, help="stop after N steps as if interrupted (to test --resume)")
    g.add_argument("--report-to", choices=sorted(TRACKERS), default="none",
                   help="experiment tracker(s) through accelerate: every logged scalar at its step, the "
                        "configuration as hyper-parameters (tensorboard writes into --out)")
    g.add_argument("--run-name", help="the tracker's run name (default: the name of --out)")
    g = p.add_argument_group("fitting (no training: --fit-tuned-lens, --fit)")
    g.add_argument("--fit-tuned-lens", action="store_true",
                   help="fit a tuned lens (DESIGN §6) on the frozen --model and write it to --out in the tuned-lens "
                        "package's layout (config.json, params.pt) with provenance.json (held-out KL per block)")
    g.add_argument("--fit", choices=sorted(FITS),
                   help="fit an inference-time peer on the frozen --model from the --pairs and write an intervention "
                        "folder to --out (nothing is trained): incline = a least-squares map per block from target "
                        "to English states (INCLINE), diffmean = mean h_en - mean h_tgt at one block; "
                        "03_evaluate.py --model OUT applies it")
    g.add_argument("--fit-layers", type=fit_layers_arg,
                   help="blocks k (the output of block k = hidden-state index k): all, auto (the entropy rule's ET "
                        "block; --fit only) or K,... (default: the fit's own: --fit-tuned-lens every block 1..L-1, "
                        "--fit incline all, --fit diffmean auto)")
    g.add_argument("--fit-tokens", type=int, default=16384,
                   help="tuned lens: positions of the pairs' sequences to fit on (pad and BOS left out)")
    g.add_argument("--fit-steps", type=int, default=250,
                   help="tuned lens: KL optimizer steps (the package's default; 0: the --fit-init map alone)")
    g.add_argument("--fit-batch", type=int, default=256, help="tuned lens: positions per optimizer step")
    g.add_argument("--fit-init", choices=["lstsq", "zero"], default="lstsq",
                   help="tuned lens: start each translator at the least-squares map of block k to the last block's "
                        "residual (cheap; the KL steps refine it) or at zero (the logit lens)")
    g.add_argument("--fit-lr", type=float, default=1e-4, help="tuned lens: Adam learning rate (cosine decay to 0)")
    g.add_argument("--fit-eval-tokens", type=int, default=4096,
                   help="tuned lens: held-out positions, from --eval-pairs or else the .dev.jsonl beside --pairs")
    g.add_argument("--fit-pool", choices=["mean", "last"], default="mean",
                   help="--fit: one state per prompt: the mean over the tokens of x (as INCLINE's code pools) or "
                        "the last prompt token (where INCLINE applies its map)")
    g.add_argument("--fit-positions", choices=POSITIONS,
                   help="--fit: where 03 applies the intervention: last (the last prompt / context token), prompt "
                        "(every prompt / context token) or all (also the continuation and every generated token) "
                        "(default: incline last, as its code; diffmean prompt)")
    g.add_argument("--ridge", type=float, default=0.01,
                   help="--fit incline: ridge term, as a fraction of the mean diagonal of X^T X (ours: n ~ d here); "
                        "0 = INCLINE's plain least squares (minimum-norm lstsq)")
    g.add_argument("--fit-placebo", choices=["shuffle", "random"],
                   help="--fit, a placebo of the same form: shuffle = pair k's target prompt with pair k+1's English "
                        "(file order, the last with the first: the fit sees no translation; incline only, since a "
                        "mean difference does not depend on the pairing); random = each fitted map replaced by "
                        "Gaussian noise of the same Frobenius norm (--seed). The held-out residual uses true pairs")
    return p


def fit_layers_arg(value):
    """--fit-layers: 'all', 'auto' or comma-separated block numbers (checked against the model later)."""
    if value in ("all", "auto"):
        return value
    try:
        blocks = sorted({int(v) for v in common.parse_list(value)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', 'auto' or block numbers like 2,8, got {value!r}") from None
    if not blocks:
        raise argparse.ArgumentTypeError("expected 'all', 'auto' or block numbers like 2,8, got nothing")
    return blocks


def parse_args(argv=None):
    """Every flag at its value (defaults filled in), and args.given: the flags typed on the command line.

    A second parse starts from a namespace where every flag holds a marker: argparse fills in no default where a
    value is already present, so a flag still holding the marker was not typed, even one typed at its default."""
    parser = build_parser()
    args = parser.parse_args(argv)
    untyped = object()
    typed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), untyped)))
    args.given = {name for name, value in vars(typed).items() if value is not untyped}
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise common.UserError(f"--out {args.out} is a file; give a folder (the model, or a fit, is written there)")
    return args


def grad_norm_arg(value):
    """--max-grad-norm: a positive float, or 0 / 'none' for no clipping (as the HF Trainer and DeepSpeed read 0)."""
    if value.lower() in ("none", "0", "0.0", "inf"):
        return 0.0
    try:
        norm = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {value!r}") from None
    if not norm >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 or 'none': no clipping), got {value}")
    return norm if math.isfinite(norm) else 0.0


TRACKERS = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}

# every setting at its default, before --preset and --method (tests and bench_train.py build configurations on it)
DEFAULTS = {name: value for name, value in vars(build_parser().parse_args(["--pairs", "", "--out", ""])).items()
            if name not in ("pairs", "out", "preset") + FIT_FLAGS}

# bad numbers are refused before any work; the zeros that mean something stay allowed
AT_LEAST_ONE = ("max_steps", "batch_size", "grad_accum", "global_batch_size", "max_length", "eval_every", "eval_limit",
                "log_every", "layer_sample")
NOT_NEGATIVE = {"save_every": "0: only the final model", "ce_chunk": "0: no chunking",
                "lc_weight": "0: computed for the log only", "et_weight": "0: computed for the log only",
                "tft_weight": "0: the intermediate objectives alone", "lr": "", "warmup_ratio": "0: no warm-up"}


def check_trackers(report_to):
    """Fail before any work when a tracker's package is missing."""
    import importlib.util
    for name in TRACKERS[report_to]:
        found = importlib.util.find_spec(name) or (name == "tensorboard" and importlib.util.find_spec("tensorboardX"))
        if not found:
            raise common.UserError(f"--report-to {report_to} needs the {name} package: pip install {name}"
                                   + (" (offline runs: WANDB_MODE=offline)" if name == "wandb" else ""))


def check_numbers(cfg):
    """One clear error for a count below 1, a negative amount, or a non-positive --epochs."""
    flag = lambda name: "--" + name.replace("_", "-")
    if not (cfg["epochs"] > 0 and math.isfinite(cfg["epochs"])):  # also NaN
        raise common.UserError(f"--epochs must be a positive number, got {cfg['epochs']}")
    for name in AT_LEAST_ONE:
        if cfg[name] is not None and cfg[name] < 1:
            raise common.UserError(f"{flag(name)} must be >= 1, got {cfg[name]}")
    for name, zero in NOT_NEGATIVE.items():
        if not cfg[name] >= 0:  # also NaN
            raise common.UserError(f"{flag(name)} must be >= 0{f' ({zero})' if zero else ''}, got {cfg[name]}")


def resolve_config(args):
    """Typed flag > --method > --preset > default. Returns a plain dict: what train_config.json records.

    The method's own settings (its sequences; mid-align's layer and gradient) beat a preset's, which sets the recipe
    of a model; a flag typed on the command line beats both, even when typed at its default value."""
    check_fit_args(args)
    cfg = {name: value for name, value in vars(args).items() if name != "given" and name not in FIT_FLAGS}
    if cfg["preset"] is None:
        del cfg["preset"]
    layered = dict(PRESETS.get(args.preset, {}), **METHODS[args.method])
    cfg.update({name: value for name, value in layered.items() if name not in args.given})
    check_numbers(cfg)
    tuned = [flag for flag, key in (("--readout", "readout"), ("--layer-rule-readout", "layer_rule_readout"))
             if cfg[key] == "tuned"]
    if tuned and not cfg["tuned_lens"]:
        raise common.UserError(f"{' and '.join(tuned)} tuned (--method {cfg['method']}) needs --tuned-lens DIR: a "
                               "lens fitted for --model (02_train_dft.py --fit-tuned-lens --pairs P --out DIR)")
    if cfg["readout"] == "tuned" and not any(SIGNALS[cfg[name]].lens for name in ("lc", "et")):
        raise common.UserError("--readout tuned reads the logits signal; this objective has none (use --method "
                               "dft-logits-tuned or --lc/--et logits)")
    if cfg["method"] == "sft" and (cfg["lc"] != "none" or cfg["et"] != "none"):
        raise common.UserError("--method sft trains on English only; --lc/--et need target-language inputs "
                               "(use tft or dft-*)")
    for name in ("lc", "et"):  # the top of the range needs the model; the form, the bottom and the order do not
        if cfg[f"{name}_layer"] not in ("auto", "mid") and not str(cfg[f"{name}_layer"]).isdigit():
            raise common.UserError(f"--{name}-layer must be a block number, 'auto' or 'mid', got "
                                   f"{cfg[f'{name}_layer']!r}")
        if cfg[name] != "none" and str(cfg[f"{name}_layer"]).isdigit() and int(cfg[f"{name}_layer"]) < 1:
            raise common.UserError(f"--{name}-layer {cfg[f'{name}_layer']} is out of range: blocks are numbered "
                                   "from 1 (block k's output: docs/TRAINING.md, layer indexing)")
    typed = [int(cfg[f"{name}_layer"]) for name in ("lc", "et") if cfg[name] != "none"
             and str(cfg[f"{name}_layer"]).isdigit()]
    if len(typed) == 2 and typed[0] >= typed[1] and not cfg["allow_layer_order"]:
        raise common.UserError(LAYER_ORDER.format(*typed) + " (pass --allow-layer-order to train anyway)")
    if cfg["eval_every"] is not None and not cfg["eval_pairs"]:
        raise common.UserError("--eval-every needs --eval-pairs FILE (the held-out pairs, e.g. X.dev.jsonl from "
                               "01_build_pairs.py)")
    if not cfg["contrastive_temperature"] > 0:  # also NaN
        raise common.UserError(f"--contrastive-temperature must be > 0, got {cfg['contrastive_temperature']}")
    if cfg["alternate"] and not any(cfg[name] != "none" and cfg[f"{name}_weight"] != 0 for name in ("lc", "et")):
        raise common.UserError("--alternate alternates the task loss with the intermediate terms; this objective has "
                               "none with a nonzero weight (use --method mid-align, dft-* or --lc/--et, and "
                               "--lc/--et-weight > 0)")
    check_trackers(cfg["report_to"])
    return cfg


# -----------------------------------------------------------------------------
# data: pairs -> token sequences

REQUIRED_FIELDS = ("id", "x_en", "y_en", "x_tgt", "y_tgt")


def load_pairs(path):
    """The pairs of a JSONL file; a missing, non-string or empty field stops with the line and id (an empty x_en
    would give the feature terms nothing to pool, an empty y nothing to predict: 01_build_pairs.py drops them)."""
    rows = common.read_jsonl(path)
    if not rows:
        raise common.UserError(f"{path} holds no pairs; build them with 01_build_pairs.py")
    for n, row in enumerate(rows, 1):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(row.get(f), str)]
        if missing:
            raise common.UserError(f"{path} line {n}: missing or non-string field(s) {missing}; "
                                   f"each line needs {list(REQUIRED_FIELDS)} (01_build_pairs.py writes them)")
        empty = [f for f in REQUIRED_FIELDS if not row[f].strip()]
        if empty:
            raise common.UserError(f"{path} line {n} (id {row['id']!r}): empty or whitespace-only field(s) {empty}; "
                                   "remove such pairs (01_build_pairs.py drops them)")
    return rows


def encode_sequence(tokenizer, x, y, add_eos):
    """[P(x); y] with labels -100 on the prompt: the layout of every CE term (DESIGN §2)."""
    prompt_ids, x_mask = common.encode_prompt(tokenizer, x)
    y_ids = common.encode_response(tokenizer, y, add_eos)
    return dict(input_ids=prompt_ids + y_ids, labels=[-100] * len(prompt_ids) + y_ids,
                pool_mask=x_mask + [0] * len(y_ids))


def encode_pair(tokenizer, row, cfg):
    """All sequences one pair needs for the configured objective."""
    side = cfg["tft_side"]
    seqs = {"tft": encode_sequence(tokenizer, row[f"x_{side}"], row[f"y_{side}"], add_eos=True)}
    signals = [SIGNALS[cfg[name]] for name in ("lc", "et")]
    for name, signal in zip(("lc", "et"), signals):
        if signal.lens:
            seqs[name] = LensCE.sequence(tokenizer, row, name)
    if any(signal.english for signal in signals):
        ids, x_mask = common.encode_prompt(tokenizer, row["x_en"])
        seqs["en"] = dict(input_ids=ids, labels=[-100] * len(ids), pool_mask=x_mask)
    return seqs


def encode_pairs(tokenizer, rows, cfg):
    """Encode and cut to --max-length; a pair whose TFT prompt alone fills the budget is dropped (counted)."""
    examples, stats = [], Counter()
    for row in rows:
        seqs = encode_pair(tokenizer, row, cfg)
        if seqs["tft"]["labels"][:cfg["max_length"]].count(-100) == min(len(seqs["tft"]["labels"]), cfg["max_length"]):
            stats["dropped_prompt_too_long"] += 1
            continue
        for name, seq in seqs.items():
            if len(seq["input_ids"]) > cfg["max_length"]:
                stats[f"truncated_{name}"] += 1
                seqs[name] = {k: v[:cfg["max_length"]] for k, v in seq.items()}
        examples.append(dict(id=row["id"], seqs=seqs))
    if not examples:
        raise common.UserError(f"no pair fits --max-length {cfg['max_length']} (every prompt is longer); raise it")
    return examples, dict(stats)


def collate(examples, pad_id):
    """Right-padded tensors per sequence kind: {kind: {input_ids, attention_mask, labels, pool_mask}}."""
    batch = {"ids": [ex["id"] for ex in examples]}
    for kind in examples[0]["seqs"]:
        seqs = [ex["seqs"][kind] for ex in examples]
        width = max(len(s["input_ids"]) for s in seqs)
        pad = lambda v, fill: v + [fill] * (width - len(v))
        batch[kind] = dict(
            input_ids=torch.tensor([pad(s["input_ids"], pad_id) for s in seqs]),
            attention_mask=torch.tensor([pad([1] * len(s["input_ids"]), 0) for s in seqs]),
            labels=torch.tensor([pad(s["labels"], -100) for s in seqs]),
            pool_mask=torch.tensor([pad(s["pool_mask"], 0) for s in seqs]))
    return batch


def batch_to(batch, device):
    """A collated batch with every tensor on `device` (the pair ids stay a list)."""
    return {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in batch.items()}


def micro_batch_order(num_examples, batch_size, world_size, rank, seed, epoch, grad_accum=1):
    """Example indices of this rank's micro-batches in one epoch: a seeded shuffle, cut into global
    micro-batches of batch_size x world_size, rank r takes slice r. An incomplete last optimizer step
    (grad_accum global micro-batches) is dropped, so optimizer step s always sees the same examples,
    order[s*G:(s+1)*G] with G the global batch, whatever the split into devices and accumulation."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    global_size = batch_size * world_size
    usable = num_examples // (global_size * grad_accum) * global_size * grad_accum
    return [order[s + rank * batch_size: s + (rank + 1) * batch_size] for s in range(0, usable, global_size)]


# -----------------------------------------------------------------------------
# the objective: every loss inside one module's forward (FSDP/ZeRO-3 gather lm_head and norm there)


def chunk_count(rows, chunk_size, device):
    """Chunks for `rows` labelled tokens; across processes the largest count of any rank.

    Under DeepSpeed ZeRO-3 every lm_head call (the TFT head and the frozen lens readout) gathers the partitioned
    weight with a collective, so every rank must make the same number of calls in forward and in backward
    (checkpointed chunks recompute): ranks with fewer tokens run empty chunks, a rank with none runs only empty
    ones. One tiny all-reduce per CE term; gathering lm_head once per forward instead would keep a (vocab x d)
    copy alive for the whole step on every rank, the memory that ZeRO-3 was chosen to save."""
    n = math.ceil(rows / chunk_size) if chunk_size else int(rows > 0)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor([n], device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        n = int(count)
    return n


def chunked_cross_entropy(hidden, targets, logits_fn, chunk_size):
    """Summed CE of logits_fn(hidden) against targets, `chunk_size` rows at a time (the caller normalises).

    Each chunk is checkpointed, so its (chunk x vocab) logits are freed after the forward and
    recomputed in backward: at most one chunk of logits is alive at any time.
    """
    step = chunk_size or max(1, hidden.shape[0])

    def chunk_loss(h, t):
        return F.cross_entropy(logits_fn(h).float(), t, reduction="sum")

    total = hidden.sum() * 0.0  # keeps the graph connected when this micro-batch has no labelled token
    for c in range(chunk_count(hidden.shape[0], chunk_size, hidden.device)):
        h, t = hidden[c * step:(c + 1) * step], targets[c * step:(c + 1) * step]
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, h, t, use_reentrant=False)
        else:
            total = total + chunk_loss(h, t)
    return total


def shifted(hidden, labels):
    """Hidden states at the positions that predict a label (position t predicts token t+1), and those labels."""
    keep = labels[:, 1:] != -100
    return hidden[:, :-1][keep], labels[:, 1:][keep]


def pool(hidden, mask, how):
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    last = (mask.squeeze(-1) * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # last token of x
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def cosine_distance(a, b):
    """Summed over the pairs of the micro-batch (the caller normalises)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).sum()


def contrastive_loss(tgt, en, temperature, negatives="local"):
    """Symmetric InfoNCE of pooled target / English vectors, summed over this device's pairs (the caller normalises).

    Similarity = cosine / temperature; pair a's positive is its own translation, its negatives the other pairs of
    the micro-batch (local) or of every device's micro-batch (global). Both directions (target -> English, English
    -> target) count half. The global candidates are gathered with torch.distributed.nn.functional.all_gather,
    whose backward sends each device the gradient that the other devices' terms put on its vectors: with the
    split-invariant normalisation, N devices x batch B give exactly one device's gradient at batch N*B."""
    tgt, en = F.normalize(tgt.float(), dim=-1), F.normalize(en.float(), dim=-1)
    all_tgt, all_en, offset = tgt, en, 0
    if negatives == "global" and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather
        all_tgt, all_en = torch.cat(all_gather(tgt)), torch.cat(all_gather(en))
        offset = torch.distributed.get_rank() * tgt.shape[0]  # every rank holds the same number of pairs
    if all_tgt.shape[0] < 2:
        raise common.UserError("the contrastive term needs at least 2 pairs per micro-batch (the other pairs are its "
                               "negatives); raise --batch-size")
    positives = torch.arange(tgt.shape[0], device=tgt.device) + offset
    with torch.autocast(device_type=tgt.device.type, enabled=False):  # cosines in float32, also under bf16 autocast
        to_en = F.cross_entropy(tgt @ all_en.T / temperature, positives, reduction="sum")
        to_tgt = F.cross_entropy(en @ all_tgt.T / temperature, positives, reduction="sum")
    return (to_en + to_tgt) / 2


def labelled(labels):
    """Tokens that carry a CE label (position t predicts token t+1)."""
    return int((labels[:, 1:] != -100).sum())


def term_counts(batch):
    """What each term of a micro-batch is averaged over: labelled tokens for the CE terms (TFT, lens LC / ET),
    sequences (pairs) for the sequence-level terms (feature cosines)."""
    return dict(tft=labelled(batch["tft"]["labels"]),
                lc=labelled(batch["lc"]["labels"]) if "lc" in batch else 0,
                et=labelled(batch["et"]["labels"]) if "et" in batch else 0,
                seq=len(batch["ids"]))


# full attention in every block, or sliding windows whose limit the batch does not reach (the window check below)
SHARED_PREFIX_MODELS = ("gpt2", "llama", "gemma2", "gemma3_text")


def prompt_lengths(tft):
    """Tokens of each row's prompt P(x_tgt): the first labelled position of its TFT sequence (never the last)."""
    return (tft["labels"] != -100).int().argmax(1)


def window_reached(config, layer, longest_prompt, continuation):
    """Whether a sliding-window block among blocks 1..layer would cut the shared continuation's view.

    Masks are built in cache coordinates, where a continuation starts after the batch's longest prompt, not after
    its own, and a sliding layer's cache keeps only the last window - 1 tokens: both agree with the recomputed
    sequence only while the longest prompt plus the continuation fits in the window (then it cuts nothing)."""
    types = getattr(config, "layer_types", None) or []
    sliding = "sliding_attention" in types[:layer]
    return sliding and longest_prompt + continuation > config.sliding_window


def keys_values_recorder(config, layers):
    """A cache for the L_TFT pass that keeps the keys and values of its first `layers` blocks (with their graph) and
    hands every block's back unchanged, so the pass computes exactly what it computes without a cache.

    Returns (cache, {block index from 0: (keys, values)})."""
    from transformers import DynamicCache
    cache, kept = DynamicCache(config=config), {}

    def update(key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx < layers:
            kept[layer_idx] = (key_states, value_states)
        return key_states, value_states

    cache.update = update
    return cache, kept


def continue_prompt(parts, layer, prompt_kv, tft_hidden, tft, seq):
    """The lens sequence seq = [P(x_tgt); continuation] at block `layer`, running only the continuation's tokens.

    Each row's continuation attends to its own prompt's keys and values from the L_TFT pass (prompt_kv) and to
    itself, at positions that go on from its prompt's length; the mask hides the rest of the TFT row (its y_tgt and
    padding), which sits between a shorter prompt and the continuation in the cache (masks are built in cache
    coordinates: every continuation starts after the batch's longest prompt). A fresh cache per call: an update
    concatenates into its layer entry, so a shared one would let one continuation see the other's tokens.
    The last prompt position, which predicts the first continuation token, is read from the L_TFT pass's block
    `layer` output (tft_hidden). Some row has a continuation token (can_share_prefix checks it).
    Returns (hidden, labels) laid out as [last prompt position; continuation], for shifted()."""
    from transformers import DynamicCache
    prompt_len = prompt_lengths(tft)
    device, rows, width = prompt_len.device, *seq["input_ids"].shape
    lengths = seq["attention_mask"].sum(1) - prompt_len
    steps = torch.arange(int(lengths.max()), device=device)
    where = (prompt_len[:, None] + steps).clamp(max=width - 1)  # each token's place in seq; padding stays inside it
    present = steps < lengths[:, None]
    labels = torch.where(present, seq["labels"].gather(1, where), -100)
    last_prompt = tft_hidden[torch.arange(rows, device=device), prompt_len - 1][:, None]
    head_labels = torch.full((rows, 1), -100, device=device, dtype=labels.dtype)
    longest = int(prompt_len.max())
    cache = DynamicCache(config=parts.backbone.config)
    for k in range(layer):
        keys, values = prompt_kv[k]
        cache.update(keys[:, :, :longest], values[:, :, :longest], k)
    own_prompt = torch.arange(longest, device=device) < prompt_len[:, None]
    with common.capture_blocks(parts, [layer], stop_after=layer) as captured:
        try:
            parts.backbone(input_ids=seq["input_ids"].gather(1, where),
                           attention_mask=torch.cat([own_prompt, present], 1).long(),
                           position_ids=where, past_key_values=cache, use_cache=True)
        except common.StopForward:
            pass
    return torch.cat([last_prompt, captured[layer]], 1), torch.cat([head_labels, labels], 1)


class LogitReadout(nn.Module):
    """The paper's readout of block k: the frozen final norm and lm_head (and softcap)."""

    def logits(self, parts, hidden, layer):
        return common.lens_logits(parts, hidden)


class TunedReadout(nn.Module):
    """A tuned lens before the frozen head (DESIGN §6): its translators for `layers` as non-persistent buffers, so
    they follow the module to its device, stay out of every state dict (model.safetensors, checkpoints) and are
    neither trained nor sharded by FSDP1/2 or ZeRO-3; frozen and detached like the head."""

    def __init__(self, lens, layers):
        super().__init__()
        for k in sorted(set(layers)):
            weight, bias = lens.translator(k) or (torch.zeros(0), torch.zeros(0))  # the last block: none
            self.register_buffer(f"weight_{k}", weight.clone(), persistent=False)
            self.register_buffer(f"bias_{k}", bias.clone(), persistent=False)

    def logits(self, parts, hidden, layer):
        weight, bias = getattr(self, f"weight_{layer}"), getattr(self, f"bias_{layer}")
        return common.lens_logits(parts, hidden, translator=(weight, bias) if weight.numel() else None)


class Signal:
    """One intermediate term (L_LC or L_ET) at block k: what it reads and its summed loss (the caller divides by
    `count`'s denominator). A new signal is one subclass, one SIGNALS entry and its name in SIGNAL_NAMES.

    lens: runs its own sequence [P(x_tgt); English] up to block k (batch[name]); reads_prompt: reads block k of the
    target prompt from the L_TFT pass; english: needs the English prompt P(x_en)'s hidden states; min_pairs: pairs
    a micro-batch needs."""
    lens = reads_prompt = english = False
    min_pairs = 1

    def __init__(self, name, layer, cfg, readout=None):
        self.name, self.layer, self.cfg, self.readout = name, layer, cfg, readout

    @classmethod
    def count(cls, name):
        """The term_counts() key this term is averaged over: pairs, unless it counts tokens."""
        return "seq"

    def english_layers(self):
        """Blocks of P(x_en) this term reads (ET feature reads the model's last, normed, layer: english_last)."""
        return []

    english_last = False


class LensCE(Signal):
    """Lens cross-entropy of block k against the English tokens after the target prompt, read through the
    objective's readout (DESIGN §2; tuned: §6)."""
    lens = True

    @staticmethod
    def sequence(tokenizer, row, name):
        """lc: x_en after the target prompt (ours: this layout, DESIGN §2); et: y_en, a response, so it ends with EOS
        like every response."""
        english, eos = (row["x_en"], False) if name == "lc" else (row["y_en"], True)
        return encode_sequence(tokenizer, row["x_tgt"], english, add_eos=eos)

    @classmethod
    def count(cls, name):
        return name

    def loss(self, parts, batch, states):
        seq = batch[self.name]
        if states["shared"]:
            hidden, labels = continue_prompt(parts, self.layer, states["prompt_kv"], states["tgt"][self.layer],
                                             batch["tft"], seq)
        else:
            hidden = common.run_truncated(parts, self.layer, seq["input_ids"], seq["attention_mask"])
            labels = seq["labels"]
        h, y = shifted(hidden, labels)
        lens = lambda z: self.readout.logits(parts, z, self.layer)
        return chunked_cross_entropy(h, y, lens, self.cfg["ce_chunk"])


class FeatureCosine(Signal):
    """Cosine distance of the pooled target prompt at block k to the parallel English prompt: raw h_k for LC, the
    normed last layer h_L for ET (DESIGN §2)."""
    reads_prompt = english = True

    def english_layers(self):
        return [self.layer] if self.name == "lc" else []

    @property
    def english_last(self):
        return self.name == "et"

    def loss(self, parts, batch, states):
        cfg, tgt = self.cfg, states["tgt"][self.layer]
        if self.name == "et":  # h_L of HF is after the final norm: compare in that space (DESIGN §2)
            tgt = common.frozen_call(parts.final_norm, tgt)
        en = states["en"][self.layer] if self.name == "lc" else states["en_last"]
        return cosine_distance(pool(tgt, batch["tft"]["pool_mask"], cfg["pool"]),
                               pool(en, batch["en"]["pool_mask"], cfg["pool"]))


class Contrastive(Signal):
    """InfoNCE of block k on both sides, pooled as the feature signal pools (the peer, Liu & Niehues 2025)."""
    reads_prompt = english = True
    min_pairs = 2

    def english_layers(self):
        return [self.layer]

    def loss(self, parts, batch, states):
        cfg = self.cfg
        return contrastive_loss(pool(states["tgt"][self.layer], batch["tft"]["pool_mask"], cfg["pool"]),
                                pool(states["en"][self.layer], batch["en"]["pool_mask"], cfg["pool"]),
                                cfg["contrastive_temperature"], cfg["contrastive_negatives"])


class NoSignal(Signal):
    """--lc/--et none: no term (every attribute false, so callers read SIGNALS[name] without a check)."""


SIGNALS = {"none": NoSignal, "logits": LensCE, "feature": FeatureCosine, "contrastive": Contrastive}
assert tuple(SIGNALS) == SIGNAL_NAMES, "a signal's name goes in SIGNAL_NAMES (argparse's choices) and in SIGNALS"


def signals_of(cfg):
    """[(term name, Signal class)] of the configured intermediate terms, LC first."""
    return [(name, SIGNALS[cfg[name]]) for name in ("lc", "et") if cfg[name] != "none"]


class DFTObjective(nn.Module):
    """L = w_tft L_TFT + w_lc L_LC + w_et L_ET for one micro-batch (DESIGN §2).

    lens: the TunedLens of --readout tuned (its translators become the readout's buffers)."""

    def __init__(self, model, cfg, lens=None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        lens_layers = [cfg[f"{name}_layer_used"] for name, signal in signals_of(cfg) if signal.lens]
        self.readout = TunedReadout(lens, lens_layers) if cfg.get("readout") == "tuned" else LogitReadout()
        self.terms = [signal(name, cfg[f"{name}_layer_used"], cfg, self.readout) for name, signal in signals_of(cfg)]

    def forward(self, batch, denominators=None, phase="both"):
        """Each term is this micro-batch's sum divided by its denominator (DESIGN §2, normalisation).

        denominators: {"tft", "lc", "et", "seq"} -> what turns this micro-batch's sums into its share of the
        optimizer step's mean: the training loop passes the step's global counts (all devices, all accumulation
        micro-batches) divided by the number of devices, whose gradients DDP / FSDP / ZeRO then average.
        None: this micro-batch's own counts, i.e. plain means over the micro-batch.
        phase: "both" (every term), "task" (L_TFT only) or "align" (the intermediate terms only; the target prompt
        then runs only up to the highest block they read), for --alternate."""
        cfg, parts = self.cfg, common.model_parts(self.model)
        denominators = denominators or term_counts(batch)
        per = lambda key: max(denominators[key], 1e-12)  # a term with no token anywhere in the step sums to 0
        zero = torch.zeros((), device=batch["tft"]["input_ids"].device)
        terms = {"loss_lc": zero, "loss_et": zero, "loss_tft": zero}
        loss = zero

        # L_TFT: the last layer, lm_head trained; h_i / h_j of the target prompt are read from this pass
        # (causal attention: the prompt positions of [P(x_tgt); y_tgt] equal those of P(x_tgt) alone)
        pooled_layers = [term.layer for term in self.terms if term.reads_prompt]
        tft = batch["tft"]
        # --lens-prefix shared: the L_TFT pass also keeps the prompt's keys and values and h_i / h_j for the lens terms
        lens_layers = [term.layer for term in self.terms if term.lens]
        shared = bool(lens_layers) and phase == "both" and self.can_share_prefix(parts, batch)
        recomputed = bool(lens_layers) and cfg["lens_prefix"] == "shared" and phase != "task" and not shared
        terms["lens_recomputed"] = torch.tensor(float(recomputed))  # --lens-prefix shared fell back for this batch
        prompt_kv, recorder = {}, None
        if shared:
            recorder, prompt_kv = keys_values_recorder(parts.backbone.config, max(lens_layers))
        if phase != "align":
            with common.capture_blocks(parts, pooled_layers + (lens_layers if shared else [])) as tgt_states:
                out = parts.backbone(input_ids=tft["input_ids"], attention_mask=tft["attention_mask"],
                                     past_key_values=recorder, use_cache=bool(shared))
            h, y = shifted(out.last_hidden_state, tft["labels"])
            terms["loss_tft"] = chunked_cross_entropy(h, y, lambda z: self.head(parts, z), cfg["ce_chunk"]) / per("tft")
            loss = cfg["tft_weight"] * terms["loss_tft"]
        elif pooled_layers:
            tgt_states = common.run_truncated_states(parts, pooled_layers, tft["input_ids"], tft["attention_mask"])
        if phase == "task":
            terms["loss"], terms["tokens"] = loss, torch.tensor(labelled(tft["labels"]))
            return terms

        states = dict(shared=shared, prompt_kv=prompt_kv, tgt=tgt_states if pooled_layers or shared else {})
        if any(term.english for term in self.terms):
            states["en"], states["en_last"] = self.english_states(parts, batch["en"])
        for term in self.terms:
            weight = cfg[f"{term.name}_weight"]
            # weight 0: the term is only watched, so it must not touch the graph (bit-equal to a run without it)
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight != 0):
                value = term.loss(parts, batch, states) / per(term.count(term.name))
            terms[f"loss_{term.name}"] = value
            if weight != 0:
                loss = loss + weight * value
        terms["loss"] = loss
        terms["tokens"] = torch.tensor(labelled(tft["labels"]))
        return terms

    def can_share_prefix(self, parts, batch):
        """--lens-prefix shared where it is exact: GPT-2, LLaMA, Gemma-2/3 while no sliding window is reached, no
        activation checkpointing, and a continuation token in some row of every lens term.

        Checkpointing: transformers' checkpointed blocks drop past_key_values; a torch checkpoint_wrapper around
        the blocks (accelerate's fsdp_activation_checkpointing) keeps them, but its backward recompute updates
        the continuation's cache a second time, which then holds the continuation twice. No continuation token
        (max-length cut them all): the batch recomputes rather than skip the lens passes, because under FSDP
        and ZeRO-3 every rank must call the blocks as often as the others (each call gathers their weights)."""
        config = parts.backbone.config
        checkpointed = getattr(parts.backbone, "gradient_checkpointing", False) and parts.backbone.training
        wrapped = any(hasattr(module, "_checkpoint_wrapped_module") for module in parts.blocks[0].modules())
        if self.cfg["lens_prefix"] != "shared" or config.model_type not in SHARED_PREFIX_MODELS or checkpointed \
                or wrapped:
            return False
        prompt_len = prompt_lengths(batch["tft"])
        for term in self.terms:
            if not term.lens:
                continue
            continuation = int((batch[term.name]["attention_mask"].sum(1) - prompt_len).max())
            if continuation == 0 or window_reached(config, term.layer, int(prompt_len.max()), continuation):
                return False
        return True

    @staticmethod
    def head(parts, hidden):
        return common.softcapped(parts, parts.lm_head(hidden))  # lm_head trained, unlike the lens's

    def english_states(self, parts, en):
        """Hidden states of P(x_en): raw h_k for LC feature and for contrastive terms, the normed last layer h_L for
        ET feature. No gradient by default: the English representation is the fixed point the target language is
        pulled toward (--feature-grad both: both branches train, as the contrastive peer does)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg["feature_grad"] == "both"):
            layers = [k for term in self.terms for k in term.english_layers()]
            if any(term.english_last for term in self.terms):
                with common.capture_blocks(parts, layers) as states:
                    out = parts.backbone(input_ids=en["input_ids"], attention_mask=en["attention_mask"],
                                         use_cache=False)
                return states, out.last_hidden_state
            return common.run_truncated_states(parts, layers, en["input_ids"], en["attention_mask"]), None


# -----------------------------------------------------------------------------
# layers (DESIGN §3)


LAYER_GAP_DIVISOR = 8  # ours: the entropy rule's two drops lie >= max(2, L // this) blocks apart (pick_layers)


def pick_layers(entropy, min_gap=None):
    """The entropy rule: i, j = the blocks ending the two largest entropy drops.

    entropy[k-1] is the mean lens entropy after block k (k = 1..L). The drop of block k is
    entropy[k-2] - entropy[k-1]; candidates are blocks 2..L-1 (the last block is the output itself).
    The second drop must lie at least min_gap blocks from the first (default max(2, L // LAYER_GAP_DIVISOR)), so
    that one steep slope is not counted twice; of equal drops the lower block wins. Returns (i, j) with i < j.
    """
    L = len(entropy)
    if L < 4:
        raise common.UserError(f"the entropy rule needs at least 4 blocks, this model has {L}; "
                               "pass --lc-layer/--et-layer")
    min_gap = max(2, L // LAYER_GAP_DIVISOR) if min_gap is None else min_gap
    drops = {k: entropy[k - 2] - entropy[k - 1] for k in range(2, L)}
    first = max(drops, key=drops.get)
    rest = {k: d for k, d in drops.items() if abs(k - first) >= min_gap}
    if not rest:
        raise common.UserError(f"no two entropy drops {min_gap} blocks apart in {L} blocks; pass --lc-layer/--et-layer")
    second = max(rest, key=rest.get)
    return min(first, second), max(first, second)


def save_entropy_curve(out_dir, entropy, picked, model_name, num_prompts, readout="logit"):
    common.write_json(os.path.join(out_dir, "layer_entropy.json"),
                      dict(model=model_name, prompts=num_prompts, entropy_by_block=entropy, lc_layer=picked[0],
                           et_layer=picked[1], readout=readout,
                           rule=f"two largest drops, >= max(2, L//{LAYER_GAP_DIVISOR}) blocks apart"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    blocks = range(1, len(entropy) + 1)
    ax.plot(blocks, entropy, marker="o", ms=3)
    for k, label in zip(picked, ("LC (i)", "ET (j)")):
        ax.axvline(k, ls="--", c="gray")
        ax.text(k, max(entropy), f" {label}={k}", va="top")
    ax.set(xlabel="block", ylabel=f"{readout}-lens entropy (nats)",
           title=f"{os.path.basename(model_name)}: target-language prompts")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "layer_entropy.png"), dpi=120)
    plt.close(fig)


def load_readout_lens(cfg, model, accelerator):
    """The TunedLens of --tuned-lens (None without it), recorded in cfg (train_config.json: folder, sha256 of
    params.pt, fitted blocks, whether the readout weights are the lens's own)."""
    cfg["tuned_lens_sha256"] = None
    if not cfg["tuned_lens"]:
        return None
    lens = common.load_tuned_lens(cfg["tuned_lens"], model)
    cfg["tuned_lens_sha256"], cfg["tuned_lens_record"] = lens.sha256, lens.record()
    if not lens.weights_match and accelerator.is_main_process:
        print(f"note: --tuned-lens {cfg['tuned_lens']} {lens.other_weights_note()} (recorded: "
              "tuned_lens_record.weights_match false)", flush=True)
    return lens


def copy_lens(folder, dest):
    """The lens folder's files beside the model, written to a temporary folder and moved into place."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


LAYER_ORDER = "LC layer {} >= ET layer {}: DESIGN §3 expects i < j"


def resolve_layers(cfg, model, tokenizer, rows, accelerator, lens=None):
    """Fill cfg['lc_layer_used'] / ['et_layer_used'] and say why; validate the range and the order. Returns the
    entropy rule's (curve, picked blocks, prompts) for layer_entropy.json/.png, or None where it did not run.

    Typed blocks are checked first, so that a bad one stops the run before the rule. The entropy rule runs once, on
    the main process and its accelerator (minutes on a CPU for a 256k vocabulary), and its curve is broadcast: every
    rank trains the same layers even where two drops nearly tie. It reads through `lens` with --layer-rule-readout
    tuned."""
    L = common.model_parts(model).num_layers
    needed = {name: cfg[f"{name}_layer"] for name in ("lc", "et") if cfg[name] != "none"}
    why, curve = {}, None
    for name, value in needed.items():
        if value == "auto":
            continue
        if value == "mid":
            value = L // 2
            why[name] = f"mid: L // 2 of {L} blocks"
        k = int(value)  # its form was checked by resolve_config
        if not 1 <= k <= L:
            raise common.UserError(f"--{name}-layer {k} is out of range: this model has blocks 1..{L}")
        from_preset = PRESETS.get(cfg.get("preset"), {}).get(f"{name}_layer") == str(value)  # else typed
        why.setdefault(name, "preset" if from_preset else "flag")
        needed[name] = k
    if "auto" in needed.values():
        texts = [common.build_prompt(r["x_tgt"]) for r in rows[:cfg["layer_sample"]]]
        entropy = [None]
        if accelerator.is_main_process:
            print(f"[layers] the entropy rule: the {cfg['layer_rule_readout']} lens on {len(texts)} target prompts "
                  "(minutes on a CPU for a large vocabulary)", flush=True)
            home = next(model.parameters()).device
            model.eval().to(accelerator.device)
            with torch.no_grad():
                rule_lens = lens if cfg["layer_rule_readout"] == "tuned" else None
                entropy = [common.lens_entropy_curve(model, tokenizer, texts, max_length=cfg["max_length"],
                                                     lens=rule_lens)]
            model.to(home)  # prepare() places (and shards) the model itself
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            broadcast_object_list(entropy, from_process=0)
        entropy = entropy[0]
        picked = pick_layers(entropy)
        curve = (entropy, picked, len(texts))
        for name, k in zip(("lc", "et"), picked):
            if needed.get(name) == "auto":
                needed[name] = k
                why[name] = (f"auto: entropy rule over {len(texts)} target prompts, {cfg['layer_rule_readout']} "
                             "lens (layer_entropy.json)")
    cfg.update({f"{name}_layer_used": k for name, k in needed.items()})
    if len(needed) == 2 and cfg["lc_layer_used"] >= cfg["et_layer_used"]:
        msg = LAYER_ORDER.format(cfg["lc_layer_used"], cfg["et_layer_used"])
        if not cfg["allow_layer_order"]:
            raise common.UserError(msg + " (pass --allow-layer-order to train anyway)")
        print(f"warning: {msg}", flush=True)
    cfg["layers_why"] = why
    return curve


# -----------------------------------------------------------------------------
# fitting an inference-time peer (DESIGN §6): no training, an intervention folder for 03_evaluate.py


def check_fit_args(args):
    """The fitting flags, before any work: a fit flag without its fit, two fits at once, a negative or non-finite
    ridge."""
    flags = lambda names: [f"--{name.replace('_', '-')}" for name in names if name in args.given]
    if args.fit and args.fit_tuned_lens:
        raise common.UserError("--fit and --fit-tuned-lens are two fits: run them one at a time, each with its --out")
    if args.fit or args.fit_tuned_lens:
        training = [f"--{name}" for name in ("preset", "method", "resume") if name in args.given]
        if training:
            raise common.UserError(f"{', '.join(training)} belong to a training, not to a fit (it trains nothing and "
                                   "reads --model, --dtype, --batch-size, --max-length as given): leave them out")
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise common.UserError(f"--out {args.out} exists and is not empty; a fit writes a new folder (a model or "
                                   "another fit there would be overwritten): choose a new --out")
    for given, fit, add in ((flags(PEER_FLAGS), args.fit, "--fit incline|diffmean"),
                            (flags(TUNED_LENS_FLAGS), args.fit_tuned_lens, "--fit-tuned-lens"),
                            (flags(["fit_layers"]), args.fit or args.fit_tuned_lens, "--fit-tuned-lens or --fit")):
        if given and not fit:
            raise common.UserError(f"{', '.join(given)} only apply to a fit; add {add}")
    if args.fit == "diffmean" and args.fit_placebo == "shuffle":
        raise common.UserError("--fit-placebo shuffle leaves a mean difference unchanged (the means do not depend on "
                               "which English goes with which target): use --fit-placebo random for diffmean")
    if not (math.isfinite(args.ridge) and args.ridge >= 0):
        raise common.UserError(f"--ridge must be a finite number >= 0 (0: INCLINE's plain least squares), got "
                               f"{args.ridge}")


def dev_pairs_path(args):
    """The held-out pairs of a fit: --eval-pairs, else the X.dev.jsonl that 01_build_pairs.py writes next to X.jsonl."""
    if args.eval_pairs:
        return args.eval_pairs
    stem = args.pairs[:-len(".jsonl")] if args.pairs.endswith(".jsonl") else None
    return stem + ".dev.jsonl" if stem and os.path.exists(stem + ".dev.jsonl") else None


def fit_layers(args, model, tokenizer, rows):
    """(blocks, why, entropy curve or None): --fit-layers or the fit's default; auto = the entropy rule's ET block."""
    L = common.model_parts(model).num_layers
    value = args.fit_layers if args.fit_layers is not None else FITS[args.fit]["layers"]
    if value == "all":
        return list(range(1, L + 1)), f"all {L} blocks", None
    if value == "auto":
        texts = [common.build_prompt(r["x_tgt"]) for r in rows[:args.layer_sample]]
        entropy = common.lens_entropy_curve(model, tokenizer, texts, max_length=args.max_length)
        try:
            _, et = pick_layers(entropy)
        except common.UserError as e:
            raise common.UserError(f"--fit-layers auto: {e} (for a fit: --fit-layers K)") from None
        return [et], f"auto: the entropy rule's ET block over {len(texts)} target prompts (layer_entropy.json)", \
            entropy
    bad = [k for k in value if not 1 <= k <= L]
    if bad:
        raise common.UserError(f"--fit-layers {','.join(map(str, bad))} out of range: this model has blocks 1..{L}")
    return value, "flag", None


@torch.no_grad()
def pooled_block_states(model, tokenizer, rows, layers, how, max_length, batch_size, desc):
    """({side: {k: [n, d] float64}} for side en / tgt, the rows kept): each pair's prompt P(x) in both languages
    through blocks 1..max(layers) of the frozen model, the raw output of each block pooled over the tokens of x
    (mean) or taken at the last prompt token (last). A pair whose prompt is longer than max_length tokens on either
    side is dropped (INCLINE's code drops sentences over 500 tokens); none is cut."""
    parts = common.model_parts(model)
    device = next(model.parameters()).device
    encoded = [{side: common.encode_prompt(tokenizer, r[f"x_{side}"]) for side in ("en", "tgt")} for r in rows]
    kept = [i for i, e in enumerate(encoded) if all(len(ids) <= max_length for ids, _ in e.values())]
    if not kept:
        return None, kept
    # batches of similar lengths (little padding); the states are put back in the pairs' order at the end
    order = sorted(kept, key=lambda i: len(encoded[i]["tgt"][0]) + len(encoded[i]["en"][0]))
    states = {side: {k: [] for k in layers} for side in ("en", "tgt")}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        for side in ("en", "tgt"):
            T = max(len(e[side][0]) for e in chunk)
            ids = torch.full((len(chunk), T), tokenizer.pad_token_id, dtype=torch.long)
            attention, x_mask = torch.zeros_like(ids), torch.zeros_like(ids)
            for b, e in enumerate(chunk):
                n = len(e[side][0])
                ids[b, :n] = torch.tensor(e[side][0])
                x_mask[b, :n] = torch.tensor(e[side][1])
                attention[b, :n] = 1
            ids, attention, x_mask = ids.to(device), attention.to(device), x_mask.to(device)
            hidden = common.run_truncated_states(parts, layers, ids, attention)
            for k in layers:
                pooled = pool(hidden[k].float(), x_mask if how == "mean" else attention, how)
                states[side][k].append(pooled.double().cpu())
    back = torch.tensor([order.index(i) for i in kept])
    return {side: {k: torch.cat(v)[back] for k, v in by_k.items()} for side, by_k in states.items()}, kept


def least_squares_map(X, Y, ridge):
    """W minimising |XW - Y|^2 + ridge * s * |W|^2 with s the mean diagonal of X^T X (so ridge is scale-free).
    ridge 0: the minimum-norm least-squares solution, numpy.linalg.lstsq(X, Y, rcond=None) as INCLINE's code."""
    if ridge == 0:
        return torch.linalg.lstsq(X, Y, driver="gelsd").solution
    gram = X.T @ X
    return torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=X.dtype), X.T @ Y)


def mean_difference(en, tgt):
    """DiffMean's vector: the mean English state minus the mean target state."""
    return en.mean(0) - tgt.mean(0)


def apply_fitted(method, value, states):
    """What the fitted map makes of target states: h W (INCLINE's regression target is h_en) or h + v (DiffMean)."""
    return states @ value if method == "incline" else states + value


def heldout_residual(method, maps, dev):
    """Per block: the mean over held-out pairs of |f(h_tgt) - h_en|^2 with the fitted map and with none (f = id)."""
    out = {}
    for k, value in maps.items():
        en, tgt = dev["en"][k], dev["tgt"][k]
        fitted = (apply_fitted(method, value, tgt) - en).pow(2).sum(-1).mean().item()
        none = (tgt - en).pow(2).sum(-1).mean().item()
        out[str(k)] = dict(fitted=fitted, no_map=none, ratio=fitted / none if none > 0 else None)
    return out


def steered_file(model, maps, alpha):
    """DiffMean as lm-evaluation-harness's `steered` model reads a .pt file (lm_eval/models/hf_steered.py, 0.4.13):
    {hookpoint: {steering_vector, steering_coefficient, action, bias, head_index}}. That file adds the vector at every
    position of every forward: only positions=all says the same as this folder."""
    return {common.hookpoint(model, k): dict(steering_vector=v.float().contiguous(), steering_coefficient=float(alpha),
                                             action="add", bias=None, head_index=None) for k, v in maps.items()}


def fit_intervention(args):
    """--fit incline|diffmean: the intervention folder in --out (maps, intervention_config.json; no base weights)."""
    from safetensors.torch import save_file
    check_fit_args(args)
    check_numbers(vars(args))
    t0 = time.time()
    rows = load_pairs(args.pairs)
    if args.fit_placebo == "shuffle":  # every target prompt beside another pair's English
        rows = [dict(r, x_en=rows[(i + 1) % len(rows)]["x_en"], y_en=rows[(i + 1) % len(rows)]["y_en"])
                for i, r in enumerate(rows)]
    dev_path = dev_pairs_path(args)
    dev_rows = load_pairs(dev_path)[:args.eval_limit] if dev_path else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = common.load_model_and_tokenizer(args.model, args.dtype, device, padding_side="right")
    model.eval()
    parts = common.model_parts(model)
    layers, why, entropy = fit_layers(args, model, tokenizer, rows)
    states, kept = pooled_block_states(model, tokenizer, rows, layers, args.fit_pool, args.max_length,
                                       args.batch_size, f"fit {args.fit}")
    if not kept:
        raise common.UserError(f"{args.pairs}: every pair's prompt is longer than --max-length {args.max_length} "
                               "tokens in one language; pass a larger --max-length or shorter pairs")
    if args.fit == "incline":
        maps = {k: least_squares_map(states["tgt"][k], states["en"][k], args.ridge) for k in layers}
    else:
        maps = {k: mean_difference(states["en"][k], states["tgt"][k]) for k in layers}
    if args.fit_placebo == "random":  # a push of the same size in no fitted direction
        generator = torch.Generator().manual_seed(args.seed)
        noise = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in maps.items()}
        maps = {k: noise[k] * (v.norm() / noise[k].norm()) for k, v in maps.items()}
    residual, dev_kept = None, []
    if dev_rows:
        dev, dev_kept = pooled_block_states(model, tokenizer, dev_rows, layers, args.fit_pool, args.max_length,
                                            args.batch_size, "held-out")
        residual = heldout_residual(args.fit, maps, dev) if dev_kept else None
    seconds = time.time() - t0
    recipe = FITS[args.fit]
    lm = common.unwrap(model)
    hookpoints = {str(k): common.hookpoint(model, k) for k in layers}
    config = dict(
        format="dft-intervention/1", method=args.fit, formula=recipe["formula"], alpha=recipe["alpha"],
        positions=args.fit_positions or recipe["positions"], layers=layers, layers_why=why, hookpoints=hookpoints,
        pool=args.fit_pool, ridge=args.ridge if args.fit == "incline" else None, placebo=args.fit_placebo,
        base_model=args.model, base_weights_sha256=common.weights_sha256(args.model),
        model_type=lm.config.model_type, hidden_size=lm.get_input_embeddings().weight.shape[1],
        num_layers=parts.num_layers,
        maps_file="maps.safetensors", steered_file="steered.pt" if args.fit == "diffmean" else None,
        pairs_file=os.path.abspath(args.pairs), pairs_sha256=common.sha256_file(args.pairs), n_pairs=len(rows),
        n_pairs_used=len(kept), n_pairs_dropped_too_long=len(rows) - len(kept),
        eval_pairs_file=os.path.abspath(dev_path) if dev_path else None,
        eval_pairs_sha256=common.sha256_file(dev_path) if dev_path else None, n_eval_pairs=len(dev_kept),
        heldout_residual=residual,
        heldout_residual_definition="per block k: mean over held-out pairs of |f(h_tgt) - h_en|^2 (pooled as `pool`) "
                                    "with f = the fitted map (incline: h W; diffmean: h + v) and with f = identity "
                                    "(no_map); ratio = fitted / no_map",
        max_length=args.max_length, dtype=args.dtype, device=device, fit_seconds=round(seconds, 2),
        versions=common.versions(), created=time.strftime("%Y-%m-%d %H:%M:%S"))
    os.makedirs(args.out, exist_ok=True)
    tensors = {hookpoints[str(k)]: v.float().contiguous() for k, v in maps.items()}
    tmp = os.path.join(args.out, ".maps.safetensors.tmp")
    save_file(tensors, tmp, metadata={"method": args.fit})
    common.plain_mode(tmp)
    os.replace(tmp, os.path.join(args.out, config["maps_file"]))
    if args.fit == "diffmean":
        with common.atomic_open(os.path.join(args.out, config["steered_file"]), "wb") as f:
            torch.save(steered_file(model, maps, config["alpha"]), f)
    if entropy is not None:
        save_entropy_curve(args.out, entropy, pick_layers(entropy), args.model, min(len(rows), args.layer_sample))
    common.write_json(os.path.join(args.out, common.INTERVENTION_CONFIG), config)
    shown = "; ".join(f"{k}: {v['ratio']:.3f}" for k, v in (residual or {}).items() if v["ratio"] is not None)
    print(f"fitted {args.fit} on {len(kept)} pairs at blocks {layers} in {seconds:.1f}s -> {args.out}"
          + (f"\nheld-out residual / no map, per block: {shown}" if shown else ""), flush=True)


# -----------------------------------------------------------------------------
# training


def lr_at(step, total_steps, warmup_steps):
    """Linear warm-up, then cosine decay to 0 (stanford_alpaca's schedule); a multiplier of --lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_mixed_precision(flag, launcher, device_type):
    """(mode, why) for --mixed-precision `flag` given the launcher's setting (an accelerate config or
    ACCELERATE_MIXED_PRECISION; None for plain python) on a device of `device_type`."""
    if launcher and flag != "auto" and launcher != flag:
        raise common.UserError(f"--mixed-precision {flag} disagrees with the launcher's mixed precision {launcher} "
                               "(accelerate config or ACCELERATE_MIXED_PRECISION; `accelerate launch` sets 'no' "
                               "unless told otherwise): drop the flag, or launch with `accelerate launch "
                               f"--mixed_precision {flag}`")
    if launcher:
        return launcher, "launcher (accelerate config / ACCELERATE_MIXED_PRECISION)"
    if flag != "auto":
        return flag, "--mixed-precision"
    if common.native_bf16(device_type):
        return "bf16", f"auto: {device_type} computes bf16 natively"
    return "no", f"auto: {device_type} has no native bf16 (it would be emulated, slower than float32)"


def make_accelerator(cfg):
    """The Accelerator of this launch, with the mixed precision that --mixed-precision resolves to.

    Under torchrun / accelerate launch on a machine without GPUs, accelerate runs every process alone (each its own
    main process, all writing --out): cpu=True makes them one gloo process group instead.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # main() may run twice in one Python process (tests, notebooks) with other settings
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = not torch.accelerator.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    device_type = "cpu" if on_cpu else torch.accelerator.current_accelerator().type
    mixed, why = resolve_mixed_precision(cfg["mixed_precision"], os.environ.get("ACCELERATE_MIXED_PRECISION"),
                                         device_type)
    if on_cpu:  # accelerate imports DeepSpeed when unwrapping; its GPU probe would print a warning on every CPU run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate.utils import DistributedDataParallelKwargs
    # --alternate: the alignment steps never reach the blocks above the aligned one nor lm_head; DDP must expect that
    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(cfg["alternate"]))
    if launched > 1:
        common.before_process_group(deepspeed=True)
    accelerator = Accelerator(cpu=launched > 1 and not torch.accelerator.is_available(), mixed_precision=mixed,
                              log_with=TRACKERS[cfg["report_to"]] or None, project_dir=cfg["out"],
                              kwargs_handlers=[ddp])
    if launched > 1 and accelerator.num_processes == 1:
        raise common.UserError(f"launched as {launched} processes but accelerate formed no process group; "
                               "check the launcher (torchrun / accelerate launch) and the accelerate config")
    cfg["mixed_precision_used"], cfg["mixed_precision_why"] = accelerator.mixed_precision, why
    if accelerator.mixed_precision == "bf16" and not common.native_bf16(device_type) and accelerator.is_main_process:
        print(f"warning: bf16 on this {device_type} is emulated, not computed natively: expect it to be slower than "
              "--mixed-precision no", flush=True)
    return accelerator


def check_distributed(accelerator, cfg):
    """Refuse, before any work, the sharded set-ups that would silently train something else than asked."""
    from accelerate.utils import DistributedType
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        if not accelerator.state.fsdp_plugin.use_orig_params:
            raise common.UserError("FSDP version 1 needs fsdp_use_orig_params: true (the optimizer holds the original "
                                   "parameters); better, use fsdp_version: 2 as configs/fsdp_8gpu.yaml does")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        if any(cfg[name] != "none" and cfg[f"{name}_layer"] == "auto" for name in ("lc", "et")):
            raise common.UserError("--lc-layer/--et-layer auto reads the logit lens before training, which ZeRO-3's "
                                   "partitioned weights do not allow; pass the block numbers")


def configure_deepspeed(accelerator, cfg):
    """DeepSpeed takes batch, accumulation and clipping from its own config: make them this loop's, which accumulates
    by itself (loss / grad_accum) and marks the last micro-batch of a step (sync_gradients) for DeepSpeed to step."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds.update(train_micro_batch_size_per_gpu=cfg["batch_size"], gradient_accumulation_steps=1,
              train_batch_size=cfg["batch_size"] * accelerator.num_processes, gradient_clipping=cfg["max_grad_norm"])


def prepare_model(cfg, accelerator):
    from accelerate.utils import DistributedType
    model, tokenizer = common.load_model_and_tokenizer(cfg["model"], dtype=cfg["dtype"])
    if cfg["grad_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg["lora"]:
        from peft import LoraConfig, get_peft_model
        targets = common.parse_list(cfg["lora_targets"])
        model = get_peft_model(model, LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                                                 lora_dropout=cfg["lora_dropout"], target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    if accelerator.mixed_precision != "no":
        # bf16 compute (autocast) on fp32 master weights: FSDP (accelerate) and ZeRO (DeepSpeed) upcast by themselves
        if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            for p in model.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
    elif cfg["dtype"] != "float32" and not cfg["lora"] and accelerator.is_main_process:
        print(f"warning: training all weights in {cfg['dtype']} without fp32 master weights: AdamW updates of about "
              f"--lr are below {cfg['dtype']} resolution for most weights and are lost; launch with mixed_precision: "
              "bf16 (configs/*.yaml, fp32 master weights) or pass --dtype float32", flush=True)
    return model, tokenizer


def save_checkpoint(accelerator, out_dir, step, cfg):
    """accelerate's full state (model, optimizer, RNG; sharded under FSDP/ZeRO) + the step, swapped in atomically.

    checkpoint.tmp is written; step.json (written last) marks it complete; the old checkpoint steps aside as
    checkpoint.old, the new one takes its name, then the old is removed. A kill at any point leaves a complete
    checkpoint under one of the three names, and latest_checkpoint() finds the newest."""
    final, tmp, old = (os.path.join(out_dir, name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    if accelerator.is_main_process and os.path.isdir(tmp):
        if os.path.exists(os.path.join(tmp, "step.json")):  # first unmark it: a half-deleted folder is never "complete"
            os.remove(os.path.join(tmp, "step.json"))
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every rank has written its files (RNG states, shards) before the folder moves
    if accelerator.is_main_process:
        common.write_json(os.path.join(tmp, "step.json"), dict(step=step, method=cfg["method"]))
        if os.path.isdir(final):
            if os.path.isdir(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_checkpoint(out_dir):
    """(folder, step) of the newest complete checkpoint (one with step.json) in out_dir, or (None, 0)."""
    found = []
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
        marker = os.path.join(out_dir, name, "step.json")
        if os.path.isfile(marker):
            found.append((common.read_json(marker)["step"], os.path.join(out_dir, name)))
    if not found:
        return None, 0
    step, folder = max(found)
    return folder, step


# settings that change what a resumed run computes; --max-steps / --epochs may grow (total_steps is checked)
TRAJECTORY_KEYS = ("model", "method", "tft_side", "lc", "et", "lc_layer_used", "et_layer_used", "lc_weight",
                   "et_weight", "tft_weight", "pool", "feature_grad", "lr", "warmup_ratio", "weight_decay",
                   "max_grad_norm", "batch_size", "grad_accum", "world_size", "global_batch", "seed", "max_length",
                   "pairs_sha256", "dtype", "mixed_precision_used", "lora", "lora_r", "lora_alpha", "lora_dropout",
                   "lora_targets", "contrastive_temperature", "contrastive_negatives", "alternate", "lens_prefix",
                   "readout", "tuned_lens_sha256")
# what a setting added later reads as in a checkpoint written before it existed
RESUME_DEFAULTS = {"lens_prefix": "recompute", "readout": "logit", "tuned_lens_sha256": None}


def check_resume(saved, now, start_step):
    """Refuse a resume whose configuration differs from the first segment's in anything that changes the trajectory."""
    saved = dict(RESUME_DEFAULTS, **saved)
    # without a lens term --lens-prefix changes nothing (a tft run from before the flag resumes at its default)
    keys = [k for k in TRAJECTORY_KEYS if k != "lens_prefix" or any(signal.lens for _, signal in signals_of(now))]
    differ = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if now["total_steps"] <= start_step:
        differ.append(f"total_steps: {now['total_steps']} leaves nothing to train after the checkpoint's step "
                      f"{start_step}")
    elif now["total_steps"] < saved["total_steps"]:
        differ.append(f"total_steps: {saved['total_steps']} -> {now['total_steps']} "
                      "(--max-steps/--epochs may only grow)")
    if differ:
        raise common.UserError("--resume with a configuration that differs from the run's (train_config.json): "
                               + "; ".join(differ) + ". Resume with the original flags (only --max-steps/--epochs may "
                               "grow) or start a new --out")


def save_final(accelerator, objective, tokenizer, out_dir, cfg):
    """A normal HF folder (full state even under FSDP), or a LoRA adapter; written to a temp folder, then moved."""
    state = accelerator.get_state_dict(objective)  # gathers full weights from every shard
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(objective).model
    tmp = os.path.join(out_dir, ".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if cfg["lora"]:
        # the adapter from the gathered state (under FSDP / ZeRO-3 the model's own tensors are shards), recorded on
        # the base --model named (a folder as an absolute path), so common.load_model_and_tokenizer(out) finds it
        model.peft_config["default"].base_model_name_or_path = (
            os.path.abspath(cfg["model"]) if os.path.isdir(cfg["model"]) else cfg["model"])
        model.save_pretrained(tmp, state_dict=state)  # adapter_config.json + adapter weights
        tokenizer.save_pretrained(tmp)
        if cfg["merge_lora"]:  # base + adapter merged on the CPU: the same path whether or not training was sharded
            merged, _ = common.load_model_and_tokenizer(tmp, dtype=cfg["dtype"])
            shutil.rmtree(tmp)
            merged.merge_and_unload().save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):
        if os.path.isfile(os.path.join(tmp, name)):
            common.plain_mode(os.path.join(tmp, name))  # safetensors writes its weights private
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def eval_batches(num_examples, world, size, min_size=1):
    """Per rank, the (start, end) slices of its shard (examples rank, rank + world, ...) in batches of `size`; a last
    batch smaller than min_size joins the one before it (a contrastive term needs 2 pairs)."""
    plans = []
    for rank in range(world):
        n = len(range(rank, num_examples, world))
        cuts = [(s, min(s + size, n)) for s in range(0, n, size)]
        if len(cuts) > 1 and cuts[-1][1] - cuts[-1][0] < min_size:
            cuts[-2:] = [(cuts[-2][0], cuts[-1][1])]
        plans.append(cuts)
    return plans


def heldout_losses(objective, accelerator, examples, cfg, pad_id, show_bar):
    """Every term of the objective on held-out examples, no gradient: global means over all ranks' shards.

    Rank r takes examples r, r+world, ...; every rank runs the same number of batches (a rank that runs out runs,
    with weight 0, a batch of its first examples, or of all examples if its shard is empty), so sharded launchers
    see the same collectives on every rank.
    A contrastive term contrasts each held-out batch's own pairs (batches differ in size across ranks, so
    nothing is gathered)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    min_pairs = max([signal.min_pairs for _, signal in signals_of(cfg)], default=1)  # a contrastive batch: 2
    size = max(min_pairs, cfg["batch_size"])
    plans = eval_batches(len(examples), world, size, min_size=min_pairs)
    shard = examples[rank::world]
    keys = ("loss_tft", "loss_lc", "loss_et")
    count_of = {"loss_tft": "tft", **{f"loss_{name}": SIGNALS[cfg[name]].count(name) for name in ("lc", "et")}}
    totals = torch.zeros(2 * len(keys), dtype=torch.float64, device=accelerator.device)
    ones = dict(tft=1, lc=1, et=1, seq=1)  # denominators 1: the objective returns plain sums
    was_training, negatives = objective.training, cfg["contrastive_negatives"]
    objective.eval()
    cfg["contrastive_negatives"] = "local"  # the objective reads this same dict
    try:
        with torch.no_grad():
            for b in tqdm(range(max(len(plan) for plan in plans)), desc="held-out", disable=not show_bar, leave=False):
                if b < len(plans[rank]):
                    chunk, weight = shard[slice(*plans[rank][b])], 1.0
                else:  # this rank ran out: the same forward as the others, counted 0 times
                    chunk, weight = (shard or examples)[:max(2, cfg["batch_size"])], 0.0
                batch = collate(chunk, pad_id)
                counts = term_counts(batch)
                terms = objective(batch_to(batch, accelerator.device), ones)
                for i, key in enumerate(keys):
                    totals[i] += weight * float(terms[key])
                    totals[len(keys) + i] += weight * counts[count_of[key]]
    finally:
        cfg["contrastive_negatives"] = negatives
        objective.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    means = {key: float(totals[i] / totals[len(keys) + i]) if totals[len(keys) + i] > 0 else None
             for i, key in enumerate(keys)}
    out = {"eval_loss_tft": means["loss_tft"],
           "eval_loss_lc": means["loss_lc"] if cfg["lc"] != "none" else None,
           "eval_loss_et": means["loss_et"] if cfg["et"] != "none" else None}
    out["eval_loss"] = cfg["tft_weight"] * out["eval_loss_tft"] + sum(
        cfg[f"{name}_weight"] * out[f"eval_loss_{name}"] for name in ("lc", "et")
        if cfg[name] != "none" and cfg[f"{name}_weight"] != 0)
    return out


def tracker_config(run_info):
    """The configuration as hyper-parameters: trackers take scalars and strings only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in run_info.items()
            if k not in ("versions", "segments", "length_stats")}


def resume_point(cfg):
    """(checkpoint folder, its step), or (None, 0) for a new run; refuses to overwrite a run or resume nothing."""
    out_dir = cfg["out"]
    if os.path.exists(os.path.join(out_dir, "train_log.jsonl")) and not cfg["resume"]:
        if latest_checkpoint(out_dir)[0] is None:
            raise common.UserError(f"{out_dir} already holds a training run without a checkpoint to continue from "
                                   "(trained without --save-every, or its checkpoint removed): choose a new --out")
        raise common.UserError(f"{out_dir} already holds a training run; pass --resume to continue it or choose a "
                               "new --out")
    if not cfg["resume"]:
        return None, 0
    ckpt, start_step = latest_checkpoint(out_dir)
    if ckpt is None:
        raise common.UserError(f"--resume: no complete checkpoint in {out_dir} (train with --save-every N first)")
    return ckpt, start_step


def batch_plan(cfg, world, num_examples, num_eval_examples):
    """The batch arithmetic (global = per-device x devices x accumulation) and its checks; fills cfg['grad_accum'].

    Returns global_batch, total_steps and warmup_steps."""
    if cfg["grad_accum"] is None:
        if cfg["global_batch_size"]:
            if cfg["global_batch_size"] % (cfg["batch_size"] * world):
                raise common.UserError(f"--global-batch-size {cfg['global_batch_size']} is not a multiple of "
                                       f"--batch-size {cfg['batch_size']} x {world} devices")
            cfg["grad_accum"] = cfg["global_batch_size"] // (cfg["batch_size"] * world)
        else:
            cfg["grad_accum"] = 1
    global_batch = cfg["batch_size"] * world * cfg["grad_accum"]
    if cfg["global_batch_size"] and cfg["global_batch_size"] != global_batch:
        raise common.UserError(f"global batch {cfg['batch_size']} x {world} devices x {cfg['grad_accum']} "
                               f"accumulation = {global_batch}, but --global-batch-size is {cfg['global_batch_size']}")
    micro_per_epoch = num_examples // (cfg["batch_size"] * world)
    if micro_per_epoch < cfg["grad_accum"]:
        raise common.UserError(f"{num_examples} pairs make fewer than one optimizer step of {global_batch} sequences; "
                               "lower --batch-size/--grad-accum or add pairs")
    if any(signal.min_pairs > 1 for _, signal in signals_of(cfg)):
        devices = world if cfg["contrastive_negatives"] == "global" else 1
        if cfg["batch_size"] * devices < 2:
            raise common.UserError(f"the contrastive term compares each pair with the other pairs of its micro-batch, "
                                   f"and --batch-size {cfg['batch_size']} x {devices} device(s) leaves none: raise "
                                   "--batch-size to at least 2")
        if num_eval_examples and num_eval_examples < 2 * world:
            raise common.UserError(f"the held-out contrastive term contrasts each device's held-out pairs: "
                                   f"{num_eval_examples} pairs over {world} device(s) leave a device fewer than 2; "
                                   "give more --eval-pairs (or a larger --eval-limit)")
    total_steps = cfg["max_steps"] or max(1, int(cfg["epochs"] * (micro_per_epoch // cfg["grad_accum"])))
    warmup_steps = max(1, int(cfg["warmup_ratio"] * total_steps)) if cfg["warmup_ratio"] > 0 else 0
    return dict(global_batch=global_batch, total_steps=total_steps, warmup_steps=warmup_steps)


def make_run_info(cfg, plan, accelerator, model, data, start_step):
    """What train_config.json records: the configuration, the data, the batch plan, versions and this segment.

    A resumed run keeps its first segment's configuration (checked against this one) and appends a segment."""
    rows, examples, eval_examples, length_stats = data
    world = accelerator.num_processes
    run_info = dict(cfg, pairs_sha256=common.sha256_file(cfg["pairs"]), num_pairs=len(rows),
                    num_examples=len(examples),
                    eval_pairs_sha256=common.sha256_file(cfg["eval_pairs"]) if cfg["eval_pairs"] else None,
                    num_eval_examples=len(eval_examples) if eval_examples else 0,
                    length_stats=length_stats, world_size=world, **plan,
                    num_layers=common.model_parts(model).num_layers,
                    versions=common.versions(), device=str(accelerator.device),
                    distributed_type=accelerator.distributed_type.value, mixed_precision=accelerator.mixed_precision,
                    normalisation="split-invariant: token terms / the step's global labelled tokens, "
                                  "sequence terms / the step's global pairs")
    total_steps = plan["total_steps"]
    segment = dict(start_step=start_step, total_steps=total_steps, max_steps=cfg["max_steps"], epochs=cfg["epochs"],
                   started=time.strftime("%Y-%m-%dT%H:%M:%S"), git_commit=run_info["versions"].get("git_commit"),
                   git_dirty=run_info["versions"].get("git_dirty"), world_size=world, device=run_info["device"])
    if not cfg["resume"]:
        return dict(run_info, segments=[segment])
    saved = common.read_json(os.path.join(cfg["out"], "train_config.json"))
    check_resume(saved, run_info, start_step)
    if saved["total_steps"] != total_steps and accelerator.is_main_process:
        print(f"note: --resume grows the run from {saved['total_steps']} to {total_steps} steps; the cosine schedule "
              f"is recomputed over {total_steps} steps, so the lr after step {start_step} differs from the first "
              "segment's plan", flush=True)
    log = os.path.join(cfg["out"], "train_log.jsonl")
    logged = [json.loads(line)["step"] for line in open(log)] if os.path.exists(log) else []
    if logged and logged[-1] > start_step and accelerator.is_main_process:
        finished = logged[-1] >= saved["total_steps"]  # else a kill between checkpoints: the usual resume
        print(f"note: the newest checkpoint is from step {start_step} and the log reaches step {logged[-1]}: steps "
              f"{start_step + 1}-{logged[-1]} are trained again, their log lines replaced"
              + (" (a finished run keeps no checkpoint of its last step)" if finished else ""), flush=True)
    return dict(saved, total_steps=total_steps, warmup_steps=plan["warmup_steps"],
                segments=saved.get("segments", []) + [segment])


def make_optimizer(objective, cfg):
    """AdamW; no weight decay on vectors (norms, biases), as stanford_alpaca's Trainer."""
    decay = [p for n, p in objective.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in objective.named_parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"])


def shares_lens_prefix(cfg):
    """--lens-prefix shared with a lens term to share it (dft-logits on LC or ET)."""
    return cfg["lens_prefix"] == "shared" and any(signal.lens for _, signal in signals_of(cfg))


def start_run(accelerator, cfg, run_info, start_step):
    """Trackers first (one that fails to start leaves no files), then train_config.json, the log kept up to the
    checkpoint (a resumed run rewrites the steps after it), and the configuration printed."""
    if cfg["report_to"] != "none":
        accelerator.init_trackers(cfg["run_name"] or os.path.basename(os.path.normpath(cfg["out"])),
                                  config=tracker_config(run_info))
    if not accelerator.is_main_process:
        return
    common.write_json(os.path.join(cfg["out"], "train_config.json"), run_info)
    log_path = os.path.join(cfg["out"], "train_log.jsonl")
    kept = [line for line in open(log_path)] if cfg["resume"] and os.path.exists(log_path) else []
    with common.atomic_open(log_path) as f:
        f.writelines(line for line in kept if json.loads(line)["step"] <= start_step)
    title = "configuration (the first segment's: train_config.json)" if cfg["resume"] else "configuration"
    print(f"{title}:\n" + "\n".join(f"  {k}: {v}" for k, v in run_info.items()
                                         if k not in ("versions", "segments")), flush=True)
    print(f"global batch {run_info['global_batch']} = {cfg['batch_size']} per device x {accelerator.num_processes} "
          f"devices x {cfg['grad_accum']} accumulation ({accelerator.distributed_type.value}, mixed precision "
          f"{accelerator.mixed_precision})", flush=True)
    if run_info["length_stats"]:
        print(f"max-length {cfg['max_length']}: {run_info['length_stats']}", flush=True)
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    if shares_lens_prefix(cfg) and (cfg["grad_checkpointing"] or getattr(fsdp, "activation_checkpointing", False)):
        print("note: --lens-prefix shared falls back to recompute under --grad-checkpointing and FSDP activation "
              "checkpointing (transformers' checkpointed blocks drop past_key_values; torch's checkpoint wrapper "
              "would update the lens caches twice); lens_recomputed in train_log.jsonl counts it", flush=True)


def micro_batches(examples, cfg, accelerator, pad_id, start_step):
    """This rank's micro-batch stream, deterministic in (seed, epoch): --resume skips what was consumed."""
    skip, epoch = start_step * cfg["grad_accum"], 0
    while True:
        for idx in micro_batch_order(len(examples), cfg["batch_size"], accelerator.num_processes,
                                     accelerator.process_index, cfg["seed"], epoch, cfg["grad_accum"]):
            if skip:
                skip -= 1
                continue
            yield collate([examples[i] for i in idx], pad_id)
        epoch += 1


LOGGED = ("loss", "loss_tft", "loss_lc", "loss_et", "lens_recomputed")


def train_step(objective, optimizer, accelerator, batches, cfg, step, lr):
    """One optimizer step over its accumulation micro-batches; returns the step's line of train_log.jsonl.

    Split-invariant normalisation: every term is averaged over the whole optimizer step (all devices, all
    accumulation micro-batches), so 1 x batch 4 == 1 x 2 x accumulation 2 == 2 devices x 2 (DESIGN §2)."""
    from accelerate.utils import DistributedType
    t0, world, kind = time.time(), accelerator.num_processes, accelerator.distributed_type
    for group in optimizer.param_groups:  # set by hand each step: nothing to restore on resume
        group["lr"] = lr
    counts = Counter()
    for batch in batches:
        counts.update(term_counts(batch))
    keys = ("tft", "lc", "et", "seq")
    step_counts = accelerator.reduce(torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64,
                                                  device=accelerator.device), reduction="sum").tolist()
    denominators = {k: n / world for k, n in zip(keys, step_counts)}  # the launchers average gradients over devices
    phase = ("task" if step % 2 == 0 else "align") if cfg["alternate"] else "both"  # step 1, 3, ...: task
    sums = Counter()
    for micro, batch in enumerate(batches):
        batch = batch_to(batch, accelerator.device)
        sync = micro == len(batches) - 1
        if kind == DistributedType.DEEPSPEED:  # DeepSpeed clips and steps inside backward
            accelerator.gradient_state._set_sync_gradients(sync)
        # no_sync for DDP only: under FSDP it would hold a full unsharded gradient per device; DeepSpeed
        # accumulates by itself
        skip_sync = not sync and world > 1 and kind not in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        with (accelerator.no_sync(objective) if skip_sync else torch.enable_grad()):
            terms = objective(batch, denominators, phase)
            finite = torch.isfinite(terms["loss"].detach())
            if world > 1:  # all ranks stop at the same micro-batch: none is left waiting in a collective
                finite = accelerator.reduce(finite.float(), reduction="sum") == world
            if not finite:
                raise common.UserError(f"non-finite loss at step {step + 1} (micro-batch {micro}, pair ids "
                                       f"{batch['ids']}): { {k: float(v) for k, v in terms.items()} }; the last good "
                                       "checkpoint is kept in --out/checkpoint; lower --lr or check those pairs")
            accelerator.backward(terms["loss"])
        for k in LOGGED:
            sums[k] += float(terms[k].detach())
    clip = cfg["max_grad_norm"] or float("inf")  # inf: nothing is clipped, the norm is still measured
    grad_norm = accelerator.clip_grad_norm_(objective.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    reduced = accelerator.reduce(torch.tensor([sums[k] for k in LOGGED], device=accelerator.device), reduction="sum")
    loss, loss_tft, loss_lc, loss_et = (reduced[:4] / world).tolist()  # the step's global means
    # --lens-prefix shared: micro-batches of the step (all devices) whose lens terms ran the recompute path
    fallbacks = {"lens_recomputed": int(reduced[4])} if shares_lens_prefix(cfg) else {}
    task, align = phase != "align", phase != "task"
    return dict(step=step + 1, loss=loss, loss_tft=loss_tft if task else None,
                loss_lc=loss_lc if cfg["lc"] != "none" and align else None,
                loss_et=loss_et if cfg["et"] != "none" and align else None, lr=lr,
                grad_norm=None if grad_norm is None else float(grad_norm),
                tokens=int(step_counts[0]) if task else 0, pairs=int(step_counts[3]),
                **({"phase": phase} if cfg["alternate"] else {}), **fallbacks, seconds=round(time.time() - t0, 4))


def write_record(record, accelerator, cfg, bar, step):
    """The step's line of train_log.jsonl, the progress bar, the printed line every --log-every steps, trackers."""
    if accelerator.is_main_process:
        with open(os.path.join(cfg["out"], "train_log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if (step + 1) % cfg["log_every"] == 0 or "eval_loss" in record:
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if cfg["report_to"] != "none":
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        accelerator.log(scalars, step=step + 1)


def finish_run(accelerator, run_info, cfg, seconds):
    """train_config.json gains the held-out summary (the last evaluation and the best one, from the whole log)."""
    if not accelerator.is_main_process:
        return
    log_path = os.path.join(cfg["out"], "train_log.jsonl")
    evals = [r for r in map(json.loads, open(log_path)) if r.get("eval_loss") is not None] if cfg["eval_pairs"] else []
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        final = {k: v for k, v in evals[-1].items() if k.startswith("eval_") or k == "step"}
        run_info["eval_summary"] = dict(final=final, best=dict(step=best["step"], eval_loss=best["eval_loss"]))
        common.write_json(os.path.join(cfg["out"], "train_config.json"), run_info)
    print(f"saved {cfg['method']} model to {cfg['out']} ({run_info['total_steps']} steps, {seconds:.0f}s)",
          flush=True)


# -----------------------------------------------------------------------------
# fitting a tuned lens (DESIGN §6, "Readout"): no training of the model


def lens_fit_sequences(tokenizer, row, max_length):
    """The sequences a readout reads in training ([P(x_tgt); x_en], [P(x_tgt); y_en]) and both languages' own
    ([P(x_tgt); y_tgt], [P(x_en); y_en]), each cut to max_length."""
    seqs = [encode_sequence(tokenizer, row["x_tgt"], row["x_en"], add_eos=False),
            encode_sequence(tokenizer, row["x_tgt"], row["y_en"], add_eos=True),
            encode_sequence(tokenizer, row["x_tgt"], row["y_tgt"], add_eos=True),
            encode_sequence(tokenizer, row["x_en"], row["y_en"], add_eos=True)]
    return [seq["input_ids"][:max_length] for seq in seqs]


@torch.no_grad()
def lens_fit_states(model, tokenizer, rows, layers, budget, cfg, desc):
    """({k: raw block-k states, L: the last block's raw output}, final normed states) at up to `budget` positions of the rows' sequences, taken in a
    seeded order of the rows; padding and BOS are left out (BOS starts every text alike and tells nothing of it)."""
    parts = common.model_parts(model)
    device = next(model.parameters()).device
    layers = sorted(set(layers) | {parts.num_layers})
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg["seed"])).tolist()
    seqs = [ids for i in order for ids in lens_fit_sequences(tokenizer, rows[i], cfg["max_length"])]
    states, finals, kept = {k: [] for k in layers}, [], 0
    bar = tqdm(total=budget, desc=desc, leave=False)
    for start in range(0, len(seqs), cfg["batch_size"]):
        if kept >= budget:
            break
        chunk = seqs[start:start + cfg["batch_size"]]
        width = max(len(ids) for ids in chunk)
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in chunk], device=device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        mask = attention.bool()
        if tokenizer.bos_token_id is not None:
            mask &= ids != tokenizer.bos_token_id
        with common.capture_blocks(parts, layers) as captured:
            out = parts.backbone(input_ids=ids, attention_mask=attention, use_cache=False)
        take = min(int(mask.sum()), budget - kept)
        for k in layers:
            states[k].append(captured[k][mask][:take].float().cpu())
        finals.append(out.last_hidden_state[mask][:take].float().cpu())
        kept += take
        bar.update(take)
    bar.close()
    if not kept:
        return None, None
    return {k: torch.cat(v) for k, v in states.items()}, torch.cat(finals)


def lens_kl(parts, hidden, final, translator, chunk):
    """Summed KL(final-layer distribution || lens of `hidden`) over the rows, `chunk` rows at a time; the caller
    divides. With gradient, each chunk's backward runs at once, so one chunk of (rows x vocab) logits lives at a
    time (the returned sum is detached)."""
    step = chunk or max(1, hidden.shape[0])
    total = 0.0
    for c in range(0, hidden.shape[0], step):
        with torch.no_grad():
            target = torch.log_softmax(common.lens_logits(parts, final[c:c + step], normed=True).float(), dim=-1)
        logq = torch.log_softmax(common.lens_logits(parts, hidden[c:c + step], translator=translator).float(), dim=-1)
        kl = F.kl_div(logq, target, log_target=True, reduction="sum")
        if kl.requires_grad:
            kl.backward()
        total += float(kl.detach())
    return total


def least_squares_translator(hidden, target, ridge=1e-6):
    """(A, b) minimising |h + A h + b - target|^2 over the rows (a ridge of `ridge` x the mean diagonal keeps the
    float64 normal equations solvable): the residual-space map whose KL the fit then lowers."""
    x = torch.cat([hidden.double(), torch.ones(len(hidden), 1, dtype=torch.float64)], 1)
    solution = least_squares_map(x, target.double() - hidden.double(), ridge)  # (d + 1) x d
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def fit_tuned_lens(args):
    """--fit-tuned-lens: translators h + A_k h + b_k for the chosen blocks (started by --fit-init: least squares, or
    zero = the logit lens), fitted with Adam on the frozen model by KL(final-layer distribution || lens_k) and read
    through the model's own final norm and lm_head (and softcap); held-out KL of both readouts on the dev pairs; one
    folder."""
    check_fit_args(args)
    cfg = {name: value for name, value in vars(args).items() if name != "given"}
    for name in ("fit_tokens", "fit_batch", "fit_eval_tokens", "batch_size", "max_length"):
        if cfg[name] < 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be >= 1, got {cfg[name]}")
    if cfg["fit_steps"] < 0:
        raise common.UserError(f"--fit-steps must be >= 0 (0: the --fit-init map alone), got {cfg['fit_steps']}")
    if not cfg["fit_lr"] > 0:
        raise common.UserError(f"--fit-lr must be > 0, got {cfg['fit_lr']}")
    out = cfg["out"]
    dev_path = dev_pairs_path(args)
    if not dev_path or not os.path.isfile(dev_path):
        raise common.UserError(f"--fit-tuned-lens reports the held-out KL on dev pairs: no "
                               f"{dev_path or 'X.dev.jsonl beside --pairs'}; pass --eval-pairs FILE (01_build_pairs.py "
                               "writes X.dev.jsonl beside X.jsonl)")
    if cfg["fit_layers"] == "auto":
        raise common.UserError("--fit-layers auto is --fit's rule; the tuned lens takes 'all' or block numbers")
    rows, dev_rows = load_pairs(cfg["pairs"]), load_pairs(dev_path)[:cfg["eval_limit"]]
    t0 = time.time()
    model, tokenizer = common.load_model_and_tokenizer(cfg["model"], dtype=cfg["dtype"])
    model.eval().requires_grad_(False)
    parts = common.model_parts(model)
    L = parts.num_layers
    layers = list(range(1, L)) if cfg["fit_layers"] in (None, "all") else cfg["fit_layers"]
    bad = [k for k in layers if not 1 <= k <= L - 1]
    if bad:
        raise common.UserError(f"--fit-layers {bad} out of range: a tuned lens translates blocks 1..{L - 1} of this "
                               f"model (block {L} is the output itself)")
    common.seed_everything(cfg["seed"])
    train_states, train_final = lens_fit_states(model, tokenizer, rows, layers, cfg["fit_tokens"], cfg, "fit states")
    dev_states, dev_final = lens_fit_states(model, tokenizer, dev_rows, layers, cfg["fit_eval_tokens"], cfg,
                                            "held-out states")
    if train_final is None or dev_final is None:
        raise common.UserError(f"--fit-tuned-lens: no position left to fit on or to hold out after leaving out pad "
                               f"and BOS ({cfg['pairs']}, {dev_path}); give pairs with text")
    seconds_states = time.time() - t0

    d = train_final.shape[1]
    if cfg["fit_init"] == "lstsq":
        start = {k: least_squares_translator(train_states[k], train_states[L]) for k in layers}
    else:
        start = {k: (torch.zeros(d, d), torch.zeros(d)) for k in layers}
    translators = {k: (a.clone().requires_grad_(), b.clone().requires_grad_()) for k, (a, b) in start.items()}
    optimizer = torch.optim.Adam([t for pair in translators.values() for t in pair], lr=cfg["fit_lr"])
    n, generator = train_final.shape[0], torch.Generator().manual_seed(cfg["seed"])
    t_fit, curve = time.time(), []
    bar = tqdm(range(cfg["fit_steps"]), desc="tuned lens")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg["fit_lr"] * lr_at(step, cfg["fit_steps"], 0)
        rows_of_step = torch.randperm(n, generator=generator)[:cfg["fit_batch"]]
        batch_size = len(rows_of_step)
        kl = 0.0
        for k, translator in translators.items():  # each block's translator sees only its own loss
            kl += lens_kl(parts, train_states[k][rows_of_step], train_final[rows_of_step], translator,
                          cfg["ce_chunk"]) / batch_size
        for weight, bias in translators.values():
            weight.grad /= batch_size
            bias.grad /= batch_size
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(round(kl / len(layers), 5))
        bar.set_postfix(kl=f"{curve[-1]:.4f}")
    seconds_fit = time.time() - t_fit

    heldout = {}
    with torch.no_grad():
        for k in layers:
            kl = lambda translator: round(lens_kl(parts, dev_states[k], dev_final, translator, cfg["ce_chunk"])
                                          / dev_final.shape[0], 5)
            heldout[str(k)] = dict(logit=kl(None), tuned=kl(translators[k]))
            if cfg["fit_init"] == "lstsq" and cfg["fit_steps"]:
                heldout[str(k)]["lstsq_start"] = kl(start[k])
            print(f"block {k}: held-out KL(final || lens) " + ", ".join(f"{name} {value:.4f}" for name, value in
                                                                       heldout[str(k)].items()) + " nats/position",
                  flush=True)
    provenance = dict(
        what="tuned lens (DESIGN §6): lens_k(h) = head(final_norm(h + A_k h + b_k)), fitted by KL(final || lens_k)",
        model=cfg["model"], model_source=common.resolve_model(cfg["model"])[2], dtype=cfg["dtype"],
        fitted_blocks=layers, pairs=cfg["pairs"], pairs_sha256=common.sha256_file(cfg["pairs"]),
        eval_pairs=dev_path, eval_pairs_sha256=common.sha256_file(dev_path),
        sequences="[P(x_tgt); x_en], [P(x_tgt); y_en], [P(x_tgt); y_tgt], [P(x_en); y_en]; pad and BOS left out",
        fit_positions=n, heldout_positions=int(dev_final.shape[0]),
        settings={name: cfg[name] for name in ("fit_tokens", "fit_init", "fit_steps", "fit_batch", "fit_lr",
                                               "fit_eval_tokens",
                                               "seed", "max_length", "batch_size", "eval_limit")},
        optimizer="start: --fit-init (lstsq: least squares of block k to the last block's raw output over the fit "
                  "positions); then Adam, cosine decay to 0, no weight decay, on each block's own KL",
        heldout_kl=heldout, heldout_kl_unit="nats per position, mean over held-out positions",
        fit_kl_curve=curve, seconds=dict(states=round(seconds_states, 3), fit=round(seconds_fit, 3),
                                         total=round(time.time() - t0, 1)),
        versions=common.versions())
    fitted = {k: (weight.detach(), bias.detach()) for k, (weight, bias) in translators.items()}
    common.write_tuned_lens(out, fitted, parts, cfg["model"], provenance)
    print(f"saved a tuned lens for blocks {layers} to {out} (fit {seconds_fit:.0f}s, total {time.time() - t0:.0f}s)",
          flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.fit_tuned_lens:
        return fit_tuned_lens(args)
    if args.fit:
        return fit_intervention(args)
    cfg = resolve_config(args)
    from accelerate.utils import DistributedType
    accelerator = make_accelerator(cfg)
    check_distributed(accelerator, cfg)
    common.seed_everything(cfg["seed"])
    ckpt, start_step = resume_point(cfg)

    rows = load_pairs(cfg["pairs"])
    eval_rows = load_pairs(cfg["eval_pairs"])[:cfg["eval_limit"]] if cfg["eval_pairs"] else None
    if cfg["resume"]:  # 'auto' is the blocks the entropy rule picked when the run started: not minutes again
        saved = common.read_json(os.path.join(cfg["out"], "train_config.json"))
        cfg.update({f"{name}_layer": str(saved[f"{name}_layer_used"]) for name in ("lc", "et")
                    if cfg[f"{name}_layer"] == "auto" and saved.get(f"{name}_layer_used") is not None})
    model, tokenizer = prepare_model(cfg, accelerator)
    lens = load_readout_lens(cfg, model, accelerator)
    entropy_curve = resolve_layers(cfg, model, tokenizer, rows, accelerator, lens)
    unfitted = [cfg[f"{name}_layer_used"] for name, signal in signals_of(cfg) if signal.lens]
    unfitted = [k for k in unfitted if lens and cfg["readout"] == "tuned" and k not in lens.fitted]
    if unfitted and accelerator.is_main_process:
        print(f"warning: --tuned-lens {cfg['tuned_lens']} has a zero translator at block(s) {unfitted}: they read as "
              "the logit lens (fit them with --fit-tuned-lens --fit-layers)", flush=True)
    examples, length_stats = encode_pairs(tokenizer, rows, cfg)
    eval_examples = encode_pairs(tokenizer, eval_rows, cfg)[0] if eval_rows else None
    plan = batch_plan(cfg, accelerator.num_processes, len(examples), len(eval_examples) if eval_examples else 0)
    run_info = make_run_info(cfg, plan, accelerator, model, (rows, examples, eval_examples, length_stats), start_step)
    total_steps = plan["total_steps"]

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg)
    objective = DFTObjective(model, cfg, lens)
    objective.train()
    objective, optimizer = accelerator.prepare(objective, make_optimizer(objective, cfg))
    if ckpt:
        accelerator.load_state(ckpt)
    os.makedirs(cfg["out"], exist_ok=True)  # only now: a run stopped by bad input above leaves no folder
    if entropy_curve and accelerator.is_main_process and not cfg["resume"]:  # a resumed run keeps its first files
        entropy, picked, prompts = entropy_curve
        save_entropy_curve(cfg["out"], entropy, picked, cfg["model"], prompts, cfg["layer_rule_readout"])
    start_run(accelerator, cfg, run_info, start_step)

    stream = micro_batches(examples, cfg, accelerator, tokenizer.pad_token_id, start_step)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
               disable=not accelerator.is_main_process, desc=cfg["method"])
    t_start = time.time()
    for step in bar:
        lr = cfg["lr"] * lr_at(step, total_steps, plan["warmup_steps"])
        batches = [next(stream) for _ in range(cfg["grad_accum"])]
        record = train_step(objective, optimizer, accelerator, batches, cfg, step, lr)
        record.update(elapsed=round(time.time() - t_start, 2), peak_mem_gib=round(
            torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None)
        last = step + 1 == total_steps
        if eval_examples and ((cfg["eval_every"] and (step + 1) % cfg["eval_every"] == 0) or last):
            t_eval = time.time()
            record.update(heldout_losses(objective, accelerator, eval_examples, cfg, tokenizer.pad_token_id,
                                         accelerator.is_main_process))
            record["eval_seconds"] = round(time.time() - t_eval, 2)
        write_record(record, accelerator, cfg, bar, step)
        if cfg["save_every"] and (step + 1) % cfg["save_every"] == 0 and not last:
            save_checkpoint(accelerator, cfg["out"], step + 1, cfg)
        if cfg["stop_after_steps"] and step + 1 >= cfg["stop_after_steps"] and not last:
            if accelerator.is_main_process:
                print(f"stopping after step {step + 1} as asked (--stop-after-steps); continue with --resume",
                      flush=True)
            break
    else:  # every step ran
        save_final(accelerator, objective, tokenizer, cfg["out"], cfg)
        if lens and accelerator.is_main_process:  # the small lens travels with the model it trained (never inside it)
            copy_lens(lens.folder, os.path.join(cfg["out"], "tuned_lens"))
        accelerator.wait_for_everyone()
        finish_run(accelerator, run_info, cfg, time.time() - t_start)
    # The prepared model goes before the process group: DDP's reducer holds the group in C++ and, freed last (as
    # main returns), destroys it with the GIL held, which hangs the process when a gloo thread is still dropping the
    # last collective's tensors and waits for the GIL (docs/LOG.md, session 21). The group's own Python object,
    # freed by end_training, releases the GIL first.
    del objective, optimizer
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    common.run_main(main)
