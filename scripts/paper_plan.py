"""The plan of run_paper.sh: checks its inputs, counts tokens, estimates GPU-hours and disk, derives the FSDP2 config.

    python scripts/paper_plan.py --dry-run                 # the defaults: LLaMA-2-7B, zh vi ar, 4 methods
    python scripts/paper_plan.py --model google/gemma-2-2b --langs zh --nproc 8 --out runs/paper_gemma
    python scripts/paper_plan.py --tiny --langs zh,ar --lc-layer 1 --et-layer 3 --out runs/paper_tiny

Bad input is one error before anything is written: an unknown language or method, --nproc above the visible GPUs,
a language without pairs and no reachable MT model, a model without a preset and no layers for a DFT method.
Without --dry-run it writes OUT/plan.json, OUT/paper.toml (the paper study for scripts/run_study.py: pairs, runs,
evaluation parts, the paper's numbers as references; studies/README.md) and, for --nproc > 1, OUT/fsdp.yaml:
configs/fsdp_8gpu.yaml with the model's own decoder layer class (its `_no_split_modules`) and --nproc processes. With --dry-run it prints the plan, lists what
would block a real run (an unreachable model, a language without a source) and writes nothing.
Throughput, in this order: --tokens-per-s (the user's), --timing (a bench_train.py JSON of 10 steps on the first GPU),
else the figures in results/gpu_smoke/ (a random 1.1B model on one H200) scaled by parameter count.
"""
import argparse
import json
import os
import socket
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import common  # noqa: E402
from common import UserError  # noqa: E402
from study_file import load_stage  # noqa: E402

PAPER_LANGS = ("zh", "vi", "ar")
METHODS = ("sft", "tft", "dft-logits", "dft-feature", "mid-align")
LAYER_METHODS = ("dft-logits", "dft-feature")  # mid-align takes its block from the method (L // 2)
# the paper's models: 02_train_dft.py's preset (the recipe: epochs, batch, checkpointing), and the shape to plan
# with when the hub cannot be reached
PAPER_MODELS = {
    "meta-llama/Llama-2-7b-hf": dict(preset="llama2-7b", model_type="llama", params=6.74e9, layers=32),
    "google/gemma-2-2b": dict(preset="gemma2-2b", model_type="gemma2", params=2.61e9, layers=26),
}
MAX_LENGTH = 512  # the recipe's; 02 cuts longer sequences
SHIPPED = {  # Alpaca translations that ship in data/alpaca (docs/PAIRS.md)
    "zh": ("shipped Alpaca zh (carbonz0 machine translation, ids 0-20,437 only)",
           ["alpaca_data_zh_carbonz0_0-20437.json"]),
    "vi": ("shipped Alpaca vi (telexyz/GPT4VN, 40,464 rows aligned to Alpaca ids)",
           ["alpaca_vi_telexyz_aligned_0-20437.json", "alpaca_vi_telexyz_aligned_20438-52001.json"]),
}
ALPACA_EN = "alpaca_data_en.json"  # names without .xz: common.resolve_path finds either
SMOKE = os.path.join(ROOT, "results", "gpu_smoke", "bench_train_1b_run2.json")
MID_ALIGN_COST = 2.0  # assumed, not measured: both branches trained, a full English forward and backward
GRAD_CKPT_COST = 4 / 3  # one more forward per step: forward 1 + backward 2 -> 1 + 1 + 2
TOKEN_SAMPLE = 500  # pairs per source whose tokens are counted; the rest is extrapolated


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--model", default="meta-llama/Llama-2-7b-hf", help="hub name or folder (default LLaMA-2-7B)")
    g.add_argument("--langs", default="zh,vi,ar", help="target languages, from zh, vi, ar (default all three)")
    g.add_argument("--methods", default="sft,tft,dft-logits,dft-feature", help=f"from {', '.join(METHODS)}")
    g.add_argument("--lc-layer", help="block i for a model without a preset (the presets give theirs)")
    g.add_argument("--et-layer", help="block j for a model without a preset")
    g.add_argument("--steps", type=int, help="optimizer steps per run instead of the recipe's epochs")
    g.add_argument("--limit", type=int, help="items per evaluation cell (default every item)")
    g.add_argument("--tiny", action="store_true", help="TINY=1: a tiny random model and MT model made after this check")
    g.add_argument("--tiny-device", choices=["cpu", "cuda"], default="cpu",
                   help="TINY_DEVICE: where every TINY stage runs (MT, training, evaluation; default cpu)")
    g = p.add_argument_group("data")
    g.add_argument("--mt-model", default="facebook/nllb-200-distilled-600M",
                   help="seq2seq model for languages without shipped pairs (01_build_pairs.py --translate-model)")
    g.add_argument("--pairs-file", action="append", default=[], metavar="LANG=FILE",
                   help="pairs JSONL built elsewhere (e.g. 01 --source hub) for LANG instead of shipped files or MT")
    g.add_argument("--pairs-limit", type=int, help="cap on pairs per language (01_build_pairs.py --limit)")
    g.add_argument("--sft-lang", help="language whose pairs' English side SFT trains on (default: the largest source)")
    g = p.add_argument_group("machine")
    g.add_argument("--nproc", help="processes (GPUs) per training; default: the visible GPUs, 1 without one")
    g.add_argument("--visible-gpus", type=int, help="override the count torch sees (for tests)")
    g.add_argument("--tokens-per-s", type=float, help="TFT tokens per second per GPU, the user's figure")
    g.add_argument("--timing", help="bench_train.py JSON of a 10-step timing on the first GPU")
    g = p.add_argument_group("the study file (OUT/paper.toml, run by scripts/run_study.py)")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N optimizer steps (SAVE_EVERY)")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep a run's checkpoint after its final model")
    g.add_argument("--bootstrap", type=int, default=2000, help="resamples per DFT - TFT interval (BOOTSTRAP)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/paper", help="run_paper.sh's OUT")
    g.add_argument("--dry-run", action="store_true", help="print the plan and the blockers, write nothing")
    return p.parse_args(argv)


def hub_reachable():
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def model_config(name):
    """The model's config.json as a dict, or None when it cannot be read (a folder without one, the hub unreachable)."""
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        return json.load(open(path)) if os.path.exists(path) else None
    if name.startswith((".", "/", "~")) or not hub_reachable():
        return None
    from huggingface_hub import hf_hub_download
    try:
        return json.load(open(hf_hub_download(name, "config.json", etag_timeout=5)))
    except Exception:  # gated, missing or unreachable: a blocker, reported by the caller
        return None


def decoder_layer_class(model_type):
    """The class FSDP2 wraps: the causal-LM class's first `_no_split_modules` entry (e.g. LlamaDecoderLayer)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    return cls._no_split_modules[0]


def count_params(config):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**config) if isinstance(config, dict) else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters()), cfg.num_hidden_layers


def visible_gpus():
    import torch
    return torch.cuda.device_count()


def read_alpaca(name):
    rows = common.read_json(os.path.join(common.DATA_DIR, "alpaca", name))
    out = []
    for r in rows:
        if "prompt" in r:
            out.append((r["prompt"], r["response"]))
        else:
            out.append((r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""), r["output"]))
    return out


def sample(rows, k=TOKEN_SAMPLE):
    step = max(1, len(rows) // k)
    return rows[::step][:k]


def seq_tokens(tokenizer, x, y):
    return min(MAX_LENGTH, len(common.encode_prompt(tokenizer, x)[0]) + len(common.encode_response(tokenizer, y)))


def mean_tokens(tokenizer, pairs):
    return sum(seq_tokens(tokenizer, x, y) for x, y in pairs) / max(1, len(pairs))


def load_tokenizer(args, config):
    """(tokenizer, which one): the model's own, else the offline default model's (counts are then approximate)."""
    from transformers import AutoTokenizer
    if args.tiny:
        from conftest import make_tokenizer
        return make_tokenizer(), "the tiny test tokenizer"
    if config is not None:
        try:
            folder = args.model if os.path.isdir(args.model) else os.path.dirname(
                __import__("huggingface_hub").hf_hub_download(args.model, "tokenizer_config.json", etag_timeout=5))
            return AutoTokenizer.from_pretrained(folder), f"{args.model}'s tokenizer"
        except Exception:
            pass
    folder = common.resolve_model(common.DEFAULT_MODEL)[0]
    return (AutoTokenizer.from_pretrained(folder),
            f"the offline {common.DEFAULT_MODEL} tokenizer ({args.model}'s is unreachable: counts are approximate)")


def plan(args):
    blockers = []
    langs = common.parse_list(args.langs)
    for lang in langs:
        if lang not in PAPER_LANGS:
            raise UserError(f"unknown language {lang!r} in LANGS: run_paper.sh reproduces the paper's languages "
                            f"{' '.join(PAPER_LANGS)}; pick from those")
    methods = common.parse_list(args.methods)
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r} in METHODS; pick from {' '.join(METHODS)}")
    if not langs or not methods:
        raise UserError("LANGS and METHODS must each name at least one entry")
    langs, methods = list(dict.fromkeys(langs)), list(dict.fromkeys(methods))
    gpus = args.visible_gpus if args.visible_gpus is not None else visible_gpus()
    try:
        nproc = int(args.nproc) if args.nproc not in (None, "") else max(1, gpus)
    except ValueError:
        raise UserError(f"NPROC={args.nproc!r} is not a number of processes; set e.g. NPROC=8") from None
    if nproc < 1:
        raise UserError(f"NPROC={nproc}: a training needs at least one process; set e.g. NPROC=8")
    if nproc > 1 and nproc > gpus:
        too_many = (f"NPROC={nproc} but {gpus} GPU(s) visible; set NPROC to at most {max(1, gpus)} "
                    "(or check CUDA_VISIBLE_DEVICES)")
        if not args.dry_run:
            raise UserError(too_many)
        blockers.append(too_many)  # a dry run previews the plan of another machine
    for flag, value in (("STEPS", args.steps), ("LIMIT", args.limit), ("PAIRS_LIMIT", args.pairs_limit)):
        if value is not None and value < 1:
            raise UserError(f"{flag}={value}: give a positive number, or leave it unset")
    dev_size = 4 if args.tiny else load_stage("01_build_pairs").parse_args(
        ["--source", "alpaca", "--lang", "zh", "--out", "P"]).dev_size
    if args.pairs_limit is not None and args.pairs_limit <= dev_size:
        raise UserError(f"PAIRS_LIMIT={args.pairs_limit} leaves no training pairs: 01_build_pairs.py holds out "
                        f"{dev_size} ids as dev pairs first; give PAIRS_LIMIT above {dev_size}")
    if os.path.isfile(args.out):
        raise UserError(f"OUT={args.out} is a file; give a folder for the run's outputs")

    known = PAPER_MODELS.get(args.model)
    preset = known["preset"] if known else None
    layers = args.lc_layer is not None and args.et_layer is not None

    if args.tiny:
        from conftest import TINY_CONFIGS
        config, source = dict(model_type="llama", vocab_size=400, **TINY_CONFIGS["llama"]), "tiny random LLaMA"
    else:
        config = model_config(args.model)
        source = "reachable" if config else None
        if config is None:
            if not known:
                raise UserError(f"model {args.model!r} cannot be read (no local folder with config.json, and the hub "
                                "is unreachable or the name unknown); pass a model folder as MODEL")
            blockers.append(f"model {args.model} is unreachable (no network to the Hugging Face hub here, and it is "
                            "gated: accept its licence and `huggingface-cli login`, or pass a local folder as MODEL)")
    if config is not None:
        model_type = config["model_type"]
        params, num_layers = count_params(config)
    else:
        model_type, params, num_layers = known["model_type"], known["params"], known["layers"]
    if not preset and not layers and any(m in LAYER_METHODS for m in methods):
        raise UserError(f"{args.model} has no preset in 02_train_dft.py ({', '.join(PAPER_MODELS)} have): "
                        "give its layers, e.g. LC_LAYER=2 ET_LAYER=15 (see the entropy rule in docs/TRAINING.md)")
    for name, value in (("LC_LAYER", args.lc_layer), ("ET_LAYER", args.et_layer)):
        if value is not None and not (str(value).isdigit() and 1 <= int(value) <= num_layers):
            raise UserError(f"{name}={value}: give a block number from 1 to {num_layers} ({args.model}'s blocks)")
    if layers and int(args.lc_layer) >= int(args.et_layer):
        raise UserError(f"LC_LAYER={args.lc_layer} is not below ET_LAYER={args.et_layer}: language conversion is "
                        "supervised below English thinking (DESIGN §3)")
    layer_cls = decoder_layer_class(model_type)

    files = dict(f.split("=", 1) for f in args.pairs_file if "=" in f)
    bad = [f for f in args.pairs_file if "=" not in f]
    if bad:
        raise UserError(f"--pairs-file {bad[0]!r}: write LANG=FILE, e.g. PAIRS_ar=runs/pairs_ar_hub.jsonl")
    unused = [lang for lang in files if lang not in langs]
    if unused:
        raise UserError(f"PAIRS_{unused[0]} is given but {unused[0]} is not in LANGS ({' '.join(langs)}): add it to "
                        f"LANGS, or drop PAIRS_{unused[0]}")
    tokenizer, tok_source = load_tokenizer(args, config)
    en = read_alpaca(ALPACA_EN)
    en_tokens = mean_tokens(tokenizer, sample(en))
    data = []
    for lang in langs:
        if lang in files:
            if not os.path.exists(files[lang]):
                raise UserError(f"PAIRS_{lang}={files[lang]}: file not found; build it with 01_build_pairs.py")
            rows = common.read_jsonl(files[lang])
            other = sorted({str(r["lang"]) for r in rows if "lang" in r} - {lang})  # 02 does not need the field
            if other:
                raise UserError(f"PAIRS_{lang}={files[lang]} holds rows whose lang is {other[0]}, not {lang}: pass "
                                f"{common.LANGUAGES[lang][0]} pairs (01_build_pairs.py --lang {lang})")
            tgt = [(r["x_tgt"], r["y_tgt"]) for r in rows]
            d = dict(route="file", source=f"pairs file {files[lang]}", ids=len(rows), deviation=None)
        elif lang in SHIPPED:
            title, names = SHIPPED[lang]
            tgt = [p for n in names for p in read_alpaca(n)]
            d = dict(route="shipped", source=title, ids=len(tgt),
                     deviation=f"{title}: {len(tgt):,} of Alpaca's 52,002 ids (the paper: x-LLM's full translation)")
        else:
            mt_ok = args.tiny or model_config(args.mt_model) is not None
            d = dict(route="mt", source=f"machine translation of English Alpaca with {args.mt_model}", ids=len(en),
                     deviation=f"machine-translated with {args.mt_model} (the paper: x-LLM's translation)")
            tgt = None  # not translated yet: its tokens are estimated from the English side
            if not mt_ok:
                blockers.append(f"{common.LANGUAGES[lang][0]} has no shipped pairs and MT_MODEL={args.mt_model} is "
                                f"unreachable: pass PAIRS_{lang}=FILE (e.g. built by 01_build_pairs.py --source hub) "
                                "or a reachable MT_MODEL (a local folder)")
        if args.pairs_limit:
            d["ids"] = min(d["ids"], args.pairs_limit)
        d.update(lang=lang, file=files.get(lang, os.path.join(args.out, f"pairs_{lang}.jsonl")),
                 tgt_tokens=mean_tokens(tokenizer, sample(tgt)) if tgt else en_tokens,
                 tokens_note=None if tgt else "target tokens estimated by the English side's (not translated yet)")
        data.append(d)
    if blockers and not args.dry_run:
        raise UserError("cannot start: " + "; ".join(blockers))
    sft_lang = args.sft_lang or max(data, key=lambda d: d["ids"])["lang"]
    if sft_lang not in langs:
        raise UserError(f"SFT_LANG={sft_lang} is not in LANGS ({' '.join(langs)})")

    # throughput: padded TFT tokens per second per GPU; method cost factors relative to tft
    smoke = json.load(open(SMOKE))["results"]
    factors = {m: smoke[m]["ratio_measured"] for m in ("tft", "dft-logits", "dft-feature")}
    factors.update({"sft": 1.0, "mid-align": MID_ALIGN_COST})
    factor_src = "results/gpu_smoke"
    if args.tokens_per_s:
        tok_s, tok_src = args.tokens_per_s, "TOKENS_PER_S given by the user"
    elif args.timing:
        # bench_train.py keys its cells "precision/method" (one precision is timed here); older files "method"
        bench = {r["method"]: r for r in json.load(open(args.timing))["results"].values()}
        tok_s = bench["tft"]["tokens"]["tft"]["padded"] / bench["tft"]["seconds"]
        factors.update({m: r["ratio_measured"] for m, r in bench.items()})
        tok_src = f"measured: 10 timed steps on the first GPU ({args.timing})"
        factor_src = "the same timing, with gradient checkpointing"
    else:
        r = smoke["tft"]
        smoke_params = r["num_layers"] * r["block_params"] + 2 * r["head_params"]
        tok_s = r["tokens"]["tft"]["padded"] / r["seconds"] * smoke_params / params
        tok_src = (f"results/gpu_smoke/ (a random 1.1B LLaMA on one H200, bf16, batch 8 x 256: "
                   f"{r['tokens']['tft']['padded'] / r['seconds']:,.0f} tokens/s) scaled by parameter count; "
                   "no GPU timing")
    # the presets recompute blocks in backward; run_paper.sh's own timing already includes it
    recipe = load_stage("02_train_dft").PRESETS[preset] if preset else {}
    ckpt = GRAD_CKPT_COST if recipe.get("grad_checkpointing") and not args.timing else 1.0
    epochs = recipe.get("epochs", 3)
    global_batch = recipe.get("global_batch_size", 4 * nproc)

    runs = []
    by_lang = {d["lang"]: d for d in data}
    if "sft" in methods:
        d = by_lang[sft_lang]
        runs.append(dict(run="sft", method="sft", lang=sft_lang, pairs=d["ids"], seq_tokens=en_tokens))
    for d in data:
        runs += [dict(run=f"{m}-{d['lang']}", method=m, lang=d["lang"], pairs=d["ids"], seq_tokens=d["tgt_tokens"])
                 for m in methods if m != "sft"]
    for r in runs:
        r["tokens"] = (args.steps * global_batch if args.steps else r["pairs"] * epochs) * r["seq_tokens"]
        r["gpu_hours"] = r["tokens"] * factors[r["method"]] * ckpt / tok_s / 3600
    evals = ["base"] + (["sft"] if "sft" in methods else []) + [r["run"] for r in runs if r["method"] != "sft"]
    model_gb = 4 * params / 1e9  # float32 upper bound of a saved model (bf16 saves half)
    # TINY lays its cells beside LLaMA-2-7B's numbers so the whole layout is exercised (and says so)
    paper_model = args.model if known else ("meta-llama/Llama-2-7b-hf" if args.tiny else None)
    return dict(model=args.model, paper_model=paper_model, out=args.out, save_every=args.save_every,
                keep_checkpoints=args.keep_checkpoints, bootstrap=args.bootstrap, pairs_limit=args.pairs_limit,
                preset=preset, tiny=args.tiny, tiny_device=args.tiny_device, langs=langs, methods=methods, nproc=nproc,
                gpus=gpus, lc_layer=args.lc_layer, et_layer=args.et_layer, steps=args.steps, limit=args.limit,
                model_type=model_type, params=params, num_layers=num_layers, layer_cls=layer_cls,
                fsdp=nproc > 1, data=data, sft_lang=sft_lang, mt_model=args.mt_model, tokenizer=tok_source,
                tokens_per_s=tok_s, tokens_per_s_source=tok_src, cost_factors=factors, cost_factors_source=factor_src,
                tokens_per_s_scaled=not (args.tokens_per_s or args.timing), grad_ckpt_factor=ckpt,
                epochs=None if args.steps else epochs, global_batch=global_batch, runs=runs, evals=evals,
                gpu_hours=sum(r["gpu_hours"] for r in runs),
                disk_gb=len(runs) * model_gb + 4 * model_gb * (len(runs) if args.keep_checkpoints else 1),
                model_gb=model_gb, blockers=blockers, model_source=source)


def describe(p):
    typed = ", ".join(f"{k}={v}" for k, v in (("i", p["lc_layer"]), ("j", p["et_layer"])) if v is not None)
    lines = [f"== plan: {p['model']} ({p['params'] / 1e9:.2f}B parameters, {p['num_layers']} blocks; "
             + "; ".join([f"preset {p['preset']}"] * bool(p["preset"]) + [f"layers {typed}"] * bool(typed)
                         or ["no preset"]) + ")",
             f"   {p['nproc']} process(es) per training on {p['gpus']} visible GPU(s): "
             + (f"FSDP2 wrapping {p['layer_cls']} (OUT/fsdp.yaml)" if p["fsdp"] else "one process, no sharding"
                + (f" (it holds {16 * p['params'] / 1e9:.0f} GB of weights, gradients and AdamW moments: more than "
                   "an 80-GB card; NPROC > 1 shards them)" if 16 * p["params"] > 80e9 else "")),
             "== pairs"]
    for d in p["data"]:
        lines.append(f"   {d['lang']}: {d['source']}; {d['ids']:,} ids before filtering, "
                     f"{d['tgt_tokens']:.0f} tokens per training sequence"
                     + (f" ({d['tokens_note']})" if d["tokens_note"] else ""))
    lines.append(f"   tokens counted with {p['tokenizer']} on up to {TOKEN_SAMPLE} pairs per source, "
                 f"sequences cut at {MAX_LENGTH}")
    lines.append(f"== {len(p['runs'])} trainings ("
                 + (f"{p['steps']} steps x global batch {p['global_batch']}" if p["steps"] else f"{p['epochs']} epochs")
                 + ")" + (f"; sft on the English side of the {p['sft_lang']} pairs" if "sft" in p["methods"] else ""))
    unplanned = p["tiny"] and p["tokens_per_s_scaled"]  # the 1.1B GPU timing scaled to a tiny model means nothing
    lines.append("   run                 pairs    tokens   cost x   GPU-hours")
    for r in p["runs"]:
        cost = p["cost_factors"][r["method"]] * p["grad_ckpt_factor"]
        hours = "–" if unplanned else f"{r['gpu_hours']:.2f}"
        lines.append(f"   {r['run']:18s} {r['pairs']:7,d} {r['tokens'] / 1e6:8.1f}M {cost:7.2f} {hours:>10s}")
    lines.append(f"== {len(p['evals'])} evaluations: base and sft on every language's cells, each other model on its "
                 "own language's (not included in the GPU-hours)")
    lines.append(f"== throughput: not planned (TINY; cost x as {p['cost_factors_source']})" if unplanned else
                 f"== throughput {p['tokens_per_s']:,.0f} TFT tokens/s per GPU: {p['tokens_per_s_source']}; "
                 f"cost x = step cost vs tft ({p['cost_factors_source']}; mid-align {MID_ALIGN_COST} assumed)"
                 + (f" x {p['grad_ckpt_factor']:.2f} for gradient checkpointing" if p["grad_ckpt_factor"] > 1 else ""))
    lines.append("== total " + ("GPU-hours not estimated (TINY)" if unplanned else f"about {p['gpu_hours']:.1f} "
                 f"GPU-hours ({p['gpu_hours'] / p['nproc']:.1f} h wall on {p['nproc']} GPU(s), linear scaling assumed; "
                 f"padding not counted)") + f"; disk about {p['disk_gb']:.0f} GB "
                 f"({len(p['runs'])} models x {p['model_gb']:.1f} GB at float32 + "
                 + (f"{len(p['runs'])} kept 16 B/parameter checkpoints)" if p["keep_checkpoints"]
                    else "one 16 B/parameter checkpoint)"))
    if p["blockers"]:
        lines.append("== what would block a real run:")
        lines += [f"   - {b}" for b in p["blockers"]]
    return "\n".join(lines)


def changed_in_out(study, out):
    """Why OUT cannot take this plan, or "": parts there made with other settings (the runner's check of its markers,
    made before the study file is rewritten)."""
    if not os.path.isdir(os.path.join(out, "done")):
        return ""
    from run_study import Runner, load_study
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "paper.toml"), "w", encoding="utf-8") as f:
            f.write(study)
        folder = os.path.join(ROOT, out)  # as run_study.py resolves study.results and study.work
        changed = Runner(load_study(f.name), folder, folder).changed_parts()
    return changed and (f"OUT={out} holds parts made with other settings ({', '.join(changed[:4])}"
                        f"{', ...' * (len(changed) > 4)}): use a new OUT, or delete {out} to start again")


def write_outputs(p, out):
    study = study_file(p)
    changed = changed_in_out(study, out)
    if changed:
        raise UserError(changed)
    common.write_json(os.path.join(out, "plan.json"), p)
    if p["fsdp"]:
        template = open(os.path.join(ROOT, "configs", "fsdp_8gpu.yaml")).read()
        body = template[template.index("compute_environment"):]
        body = body.replace("num_processes: 8", f"num_processes: {p['nproc']}").replace(
            "fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer",
            f"fsdp_transformer_layer_cls_to_wrap: {p['layer_cls']}")
        with common.atomic_open(os.path.join(out, "fsdp.yaml")) as f:
            f.write(f"# configs/fsdp_8gpu.yaml for {p['model']}: {p['nproc']} processes, wrapping {p['layer_cls']} "
                    "(its _no_split_modules); written by scripts/paper_plan.py\n" + body)
    with common.atomic_open(os.path.join(out, "paper.toml")) as f:
        f.write(study)


# TINY: sizes that only wire every stage on a CPU in minutes
TINY_FLAGS = dict(train=["--batch-size", "2", "--max-length", "256", "--lr", "1e-2", "--warmup-ratio", "0",
                         "--log-every", "1"],
                  eval=["--max-new-tokens", "4", "--batch-size", "4", "--dtype", "float32"],
                  pairs=["--dev-size", "4"],
                  mt=["--translate-max-length", "8", "--min-ratio", "0", "--max-ratio", "1e9",
                      "--align-min-agreement", "0"])
QA = [("xquad", "XQuAD", "f1_lang", PAPER_LANGS), ("mlqa", "MLQA", "f1_lang", PAPER_LANGS),
      ("truthfulqa", "TruthfulQA MC1", "acc", PAPER_LANGS), ("mkqa", "MKQA", "f1_lang", ("ar", "zh"))]
NLU = [("xnli", "XNLI", "acc", PAPER_LANGS), ("xcopa", "XCOPA", "acc", ("vi", "zh")),
       ("xstorycloze", "XStoryCloze", "acc", ("ar", "zh")), ("mmlu", "M-MMLU", "acc", PAPER_LANGS)]


def suite(langs):
    """The paper's tasks that have data in these languages (03 refuses a task with none); MGSM zh is ours."""
    return ",".join([t for t, *_ in QA[:3]] + ["xnli", "mmlu"] + [t for t, langs_of in (
        ("mkqa", "zh ar"), ("xcopa", "zh vi"), ("xstorycloze", "zh ar"), ("mgsm", "zh")) if set(langs) & set(
        langs_of.split())])


def deviations(p):
    out = ["Deviations from the paper's set-up (docs/SCALING.md): MLQA dev and M-MMLU val splits, MKQA's MIA 2022 "
           "subset (no vi), chrF on NTREX / Tatoeba instead of COMET on FLORES, Table 4 without full-DFT rows."]
    out += [f"{d['lang']} pairs: {d['deviation']}." for d in p["data"] if d.get("deviation")]
    out += [f"Only the first {p['limit']} items of each cell (LIMIT)."] * bool(p["limit"])
    out += [f"{p['steps']} optimizer steps per run (STEPS) instead of the recipe's 3 epochs."] * bool(p["steps"])
    if p["paper_model"] != p["model"]:
        out.append(f"The paper's numbers shown are {p['paper_model']}'s, not the model trained here's."
                   if p["paper_model"] else "Not one of the paper's models: no paper numbers are shown.")
    return out


def toml(value):
    return json.dumps(value, ensure_ascii=False)  # a JSON string or list of strings is TOML too


def study_file(p):
    """The paper study of this plan (studies/README.md): what run_paper.sh hands to scripts/run_study.py."""
    tiny, out, langs = p["tiny"], p["out"], p["langs"]
    flags = TINY_FLAGS if tiny else dict(train=[], eval=[], pairs=[], mt=[])
    if tiny:  # TINY_DEVICE: 01's MT route and 03 by flag; training by hiding the GPUs from accelerate on cpu
        device = ["--device", p["tiny_device"]]
        flags = dict(flags, eval=flags["eval"] + device, mt=flags["mt"] + device)
    limit = ["--limit", str(p["pairs_limit"])] if p["pairs_limit"] else []
    lines = ["# The paper's matrix as run_paper.sh planned it (scripts/paper_plan.py); run by scripts/run_study.py",
             "[study]", f"question = {toml('Do the paper DFT gains over TFT reproduce on ' + p['model'] + '?')}",
             f"results = {toml(out)}", f"work = {toml(out)}", f"model = {toml(p['model'])}",
             f"notes = {toml(' '.join(deviations(p)))}"]
    if tiny:
        lines += ["[[setup]]", 'name = "tiny_models"', f"command = {toml(['scripts/paper_tiny_models.py', '{work}/tiny_models'])}"]
    for d in p["data"]:
        lines.append(f"[pairs.{d['lang']}]")
        if d["route"] == "file":
            lines.append(f"file = {toml(d['file'])}")
        else:
            mt = ["--translate-model", p["mt_model"]] + flags["mt"] if d["route"] == "mt" else []
            lines.append(f"flags = {toml(['--source', 'alpaca', '--lang', d['lang']] + limit + flags['pairs'] + mt)}")
    train = (["--preset", p["preset"]] if p["preset"] else []) + (["--max-steps", str(p["steps"])] if p["steps"]
                                                                   else []) + flags["train"]
    lines += ["[train]", f"flags = {toml(train)}", "[runs.base]", "train = false"]
    layers = [x for flag, value in (("--lc-layer", p["lc_layer"]), ("--et-layer", p["et_layer"])) if value is not None
              for x in (flag, str(value))]  # typed blocks; a preset gives the others
    for r in p["runs"]:
        extra = layers if r["method"] in LAYER_METHODS else []
        lines += [f"[runs.{r['run']}]", f"flags = {toml(['--method', r['method']] + extra)}", f"pairs = {toml(r['lang'])}"]
    lines += ["[evaluation]", f"flags = {toml((['--limit', str(p['limit'])] if p['limit'] else []) + flags['eval'])}"]
    groups = [("all", ["base"] + ["sft"] * ("sft" in p["methods"]), langs)]
    groups += [(lang, [r["run"] for r in p["runs"] if r["lang"] == lang and r["method"] != "sft"], [lang])
               for lang in langs]
    for name, runs, group_langs in groups:  # NTREX's references are zh only: the others through Tatoeba
        tatoeba = [lang for lang in group_langs if lang != "zh"]
        parts = [(name, suite(group_langs) + ",translation", "ntrex" if "zh" in group_langs else "tatoeba",
                  group_langs)] + [(name + "_tatoeba", "translation", "tatoeba", tatoeba)] * (
            "zh" in group_langs and bool(tatoeba))
        for part, tasks, mt_data, part_langs in parts:
            lines += ["[[evaluation.parts]]", f"name = {toml(part)}", f"runs = {toml(runs)}", "flags = " + toml(
                ["--tasks", tasks, "--mt-data", mt_data, "--langs", ",".join(part_langs)])]
    measures = {}
    for task, title, metric, task_langs in QA + NLU:
        measures.update({f"{task}_{lang}": (f"{title} {lang}", [f"{task} {lang}"], metric, lang)
                         for lang in langs if lang in task_langs})
    for lang in langs:
        measures[f"nlu_{lang}"] = (f"NLU avg {lang}", [f"{t} {lang}" for t, _, _, tl in NLU if lang in tl], "acc", lang)
        key = "translation" if lang == "zh" else "translation_tatoeba"
        for d in (f"en-{lang}", f"{lang}-en"):
            measures[f"chrf_{d}"] = (f"chrF {d}", [f"{key} {d}"], "chrf", lang)
    if "zh" in langs:
        measures["mgsm_zh"] = ("MGSM zh (ours)", ["mgsm zh"], "flexible_extract", "zh")
    for name, (label, cells, metric, _) in measures.items():
        lines += [f"[measures.{name}]", f"label = {toml(label)}", f"cells = {toml(cells)}", f"metric = {toml(metric)}"]
    for r in (r for r in p["runs"] if r["method"] not in ("sft", "tft") and "tft" in p["methods"]):
        lines += [f"[contrasts.{r['run']}]", f"terms = {{ {r['run']} = 1, tft-{r['lang']} = -1 }}",
                  f"measures = {toml([m for m, v in measures.items() if v[3] == r['lang']])}"]
    lines += ["[resampling]", f"B = {p['bootstrap']}", "seed = 0", 'draws = "indices"', "[compute]",
              f"processes = {p['nproc']}", f"precision = {toml('bf16' if p['gpus'] and not tiny else 'float32')}",
              f"save_every = {p['save_every']}", f"keep_checkpoints = {toml(p['keep_checkpoints'])}",
              f"launch_flags = {toml(['--config_file', os.path.join(out, 'fsdp.yaml')] if p['fsdp'] else [])}"]
    if tiny and p["tiny_device"] == "cpu":
        lines.append('env = { CUDA_VISIBLE_DEVICES = "" }')
    numbers = common.read_json(os.path.join(ROOT, "scripts", "paper_numbers.json"))["models"].get(p["paper_model"], {})
    refs = {}
    for table, spec in (("qa", QA), ("nlu", NLU)):
        for method, cells in numbers.get(table, {}).items():
            for task, _, _, task_langs in spec:
                for lang in (lang for lang in langs if lang in task_langs):
                    raw = cells.get(task, {}).get(lang)
                    run = method if method == "sft" else f"{method}-{lang}"
                    if raw is not None and method in p["methods"]:
                        refs.setdefault(run, {})[f"{task}_{lang}"] = raw
    for method, cells in numbers.get("translation", {}).items():  # Table 4: COMET, zh only
        if isinstance(cells, dict) and method in p["methods"] and "zh" in langs:
            refs.setdefault(f"{method}-zh", {}).update({f"chrf_{d}": v for d, v in cells.items()})
    source = f"the paper, {p['paper_model']}: Tables 1, 2, 4 (~N: a reading of a garbled cell; Table 4: COMET, not chrF)"
    lines += ["[references]", f"source = {toml(source)}"]
    for run, values in refs.items():
        lines += [f"[references.values.{run}]"] + [f"{k} = {toml(v)}" for k, v in values.items()]
    title = f"The paper's tables: {p['model']}" + (" (TINY: tiny random models, the numbers mean nothing)" if tiny else "")
    lines += ["[tables]", f"title = {toml(title)}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    p = plan(args)
    changed = changed_in_out(study_file(p), args.out) if args.dry_run else ""  # write_outputs refuses it otherwise
    if changed:
        p["blockers"].append(changed)
    print(describe(p), flush=True)
    if not args.dry_run:
        write_outputs(p, args.out)


if __name__ == "__main__":
    common.run_main(main)
