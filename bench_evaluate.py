r"""
Benchmark 03_evaluate.py in float32 and bf16 side by side, and against lm-evaluation-harness at each dtype.

One process loads the model in every --dtypes entry and runs each task in each dtype in turn (the same
items, interleaved per task so both see the same machine load); then the harness runs the same tasks on the
first items in its own virtual environment, with its `dtype=` model argument set to each dtype in turn.
Tasks, all zh: xnli (log-likelihood, 3 choices, empty context), mmlu (Okapi m_mmlu_zh: " A".." D" after the
question; our shared-prefix path with one-token suffixes), truthfulqa (Okapi truthfulqa_zh_mc1: ~200-token
6-shot prompt, 2-13 choices), mgsm_direct (greedy generation, the harness's stop strings and 256 tokens) and,
with --nll-pairs, the held-out NLL of the training format (ours only: the harness has no such task). A limit
of 0 skips a task.

Timing: process CPU seconds (not wall) with --threads torch threads (use 1 on a shared machine: CPU time then
measures the work, while wall time swings with the neighbours' load). Ours: data loading, tokenization,
model calls and scoring, not model loading; the harness: its `simple_evaluate` with the model loaded beforehand.
--repeats N runs ours and then the harness N times in turn (interleaved, so both sides see the same spells of
load); each speed is the median over the repeats and each ours/harness ratio the median of the per-repeat
ratios (every repeat's figures are in the JSON). Agreement is read from the first repeat.

Agreement reported: bf16 vs float32 (ours): items whose predicted choice differs, max |delta log-likelihood|,
identical generated texts, and the NLL difference in nats/token; ours vs the harness at the same dtype: the
same request strings and the same predicted choice (or identical generated text) item by item.

The harness reads the model as the local folder common.resolve_model returns (the hub is not needed) and the
data through task YAMLs that `include` its own xnli_zh.yaml, mgsm_direct_zh.yaml,
okapi/mmlu_multilingual/m_mmlu_zh.yaml and okapi/truthfulqa_multilingual/truthfulqa_zh_mc1.yaml and only swap
the dataset for local JSON-lines files made from data/ (MMLU: our val file as its test split, our dev file as
its few-shot split; TruthfulQA: the raw Okapi rows as its val split, through its own utils.process_docs).

Set-up of the harness: a separate venv, anywhere (never install it into .venv), then pass its python with
--lmeval-python or the LMEVAL_PYTHON environment variable:
  python3 -m venv ~/lmeval-venv && ~/lmeval-venv/bin/pip install torch==2.13.0 \
      && ~/lmeval-venv/bin/pip install lm-eval==0.4.13 transformers==5.23.0 accelerate==1.15.0
Run (about 20 CPU minutes on one thread of this project's CPU; results/bench_evaluate/README.md):
  LMEVAL_PYTHON=~/lmeval-venv/bin/python .venv/bin/python bench_evaluate.py --threads 1 --xnli-limit 500 \
      --mmlu-limit 40 --truthfulqa-limit 20 --mgsm-limit 12 --nll-pairs runs/pairs_zh.dev.jsonl --nll-limit 60 \
      --harness-max-items 40 --out results/bench_evaluate
"""
import argparse
import importlib.util
import json
import os
import subprocess
import tempfile
import time

import torch

import common

REPO = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("evaluate03", os.path.join(REPO, "03_evaluate.py"))
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)

HARNESS_DRIVER = r'''
import json, os, sys, time
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
cfg = json.load(open(sys.argv[1]))
torch.set_num_threads(cfg["threads"])
lms = {dtype: HFLM(pretrained=cfg["model"], dtype=dtype, batch_size=cfg["batch_size"], device="cpu")
       for dtype in cfg["dtypes"]}
tm = TaskManager(include_path=cfg["task_dir"])
out = {dtype: {} for dtype in cfg["dtypes"]}
for task, limit in cfg["tasks"]:
    for dtype, lm in lms.items():  # interleaved per task, as ours
        t0, c0 = time.time(), time.process_time()
        res = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=tm, log_samples=True,
                              bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
        seconds, cpu = time.time() - t0, time.process_time() - c0
        samples = [dict(doc_id=s["doc_id"], filter=s.get("filter"), arguments=s["arguments"], resps=s["resps"],
                        filtered=s["filtered_resps"], target=s["target"], acc=s.get("acc"),
                        exact_match=s.get("exact_match")) for s in res["samples"][task]]
        out[dtype][task] = dict(seconds=seconds, cpu_seconds=cpu, results=res["results"][task], samples=samples)
json.dump(out, open(cfg["out"], "w"), default=str)
'''


# our task -> (harness task made here, limit flag); the order the tasks run in
TASKS = (("xnli", "xnli_zh_local", "xnli_limit"), ("mmlu", "m_mmlu_zh_local", "mmlu_limit"),
         ("truthfulqa", "truthfulqa_zh_mc1_local", "truthfulqa_limit"), ("mgsm", "mgsm_direct_zh_local", "mgsm_limit"))
MC_TASKS = ("xnli", "mmlu", "truthfulqa")


def _local_yaml(folder, name, include, splits):
    """A task that includes the harness's own YAML and only swaps its dataset for local JSON-lines files."""
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(f"include: {include}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
                + "".join(f"{k}: {v}\n" for k, v in splits.get("keys", {}).items())
                + "dataset_kwargs:\n  data_files:\n"
                + "".join(f"    {split}: {path}\n" for split, path in splits["files"].items()))


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def okapi_task_files(folder, tasks_dir, data_dir=common.DATA_DIR):
    """Local-data copies of the harness's m_mmlu_zh and truthfulqa_zh_mc1; returns the TruthfulQA choice maps.

    m_mmlu_zh (okapi/mmlu_multilingual/_default_yaml) reads instruction, option_a..option_d and answer ("A".."D")
    from its test split, few-shot docs from its train split (first_n): our val file and our dev file, rows as
    stored. truthfulqa_zh_mc1 (okapi/truthfulqa_multilingual) reads its val split through utils.process_docs
    (question, mc1/mc2_targets_choices, mc2_targets_labels) and scores doc_to_target: 0, i.e. it takes the
    FIRST choice as correct. Our loader takes the gold from mc1_targets_labels, so here each row's MC1 choices
    are put in the order the harness needs (the labelled-correct one first, the others in stored order) and
    perm[i][k] = our index of the harness's choice k (the identity when the data stores the correct one first).
    """
    okapi = os.path.join(tasks_dir, "okapi")
    mmlu_test, mmlu_train = os.path.join(folder, "m_mmlu_zh_val.jsonl"), os.path.join(folder, "m_mmlu_zh_dev.jsonl")
    _write_jsonl(mmlu_test, common.read_json(os.path.join(data_dir, "okapi_mmlu", "zh_val.json")))
    _write_jsonl(mmlu_train, common.read_json(os.path.join(data_dir, "okapi_mmlu", "zh_dev.json")))
    _local_yaml(folder, "m_mmlu_zh_local", os.path.join(okapi, "mmlu_multilingual", "m_mmlu_zh.yaml"),
                dict(files=dict(test=mmlu_test, train=mmlu_train)))
    rows, perm = [], []
    for i, r in enumerate(common.read_json(os.path.join(data_dir, "okapi_truthfulqa", "zh_validation.json"))):
        labels = r["mc1_targets_labels"]
        if labels.count(1) != 1:
            raise common.UserError(f"truthfulqa zh item {i}: MC1 needs exactly one correct choice, labels are {labels}")
        order = [labels.index(1)] + [k for k in range(len(labels)) if labels[k] != 1]
        perm.append(order)
        choices = [r["mc1_targets_choices"][k] for k in order]
        rows.append(dict(question=r["question"], mc1_targets_choices=choices,
                         mc1_targets_labels=[1] + [0] * (len(choices) - 1),
                         mc2_targets_choices=r["mc2_targets_choices"], mc2_targets_labels=r["mc2_targets_labels"]))
    tqa = os.path.join(folder, "truthfulqa_zh_validation.jsonl")
    _write_jsonl(tqa, rows)
    _local_yaml(folder, "truthfulqa_zh_mc1_local",
                os.path.join(okapi, "truthfulqa_multilingual", "truthfulqa_zh_mc1.yaml"),
                dict(files=dict(val=tqa), keys=dict(validation_split="val", test_split="null", training_split="null")))
    return perm


def harness_task_files(folder, tasks_dir, xnli_rows, mgsm_rows):
    """Local-data copies of the harness's own xnli_zh and mgsm_direct_zh tasks."""
    xnli_data, mgsm_data = os.path.join(folder, "xnli_zh_dev.jsonl"), os.path.join(folder, "mgsm_zh_test.jsonl")
    _write_jsonl(xnli_data, [dict(premise=premise, hypothesis=hypothesis, label=ev.XNLI_LABELS[label])
                             for premise, hypothesis, label in xnli_rows])
    _write_jsonl(mgsm_data, [dict(question=question, answer=None, answer_number=int(answer.replace(",", "")),
                                  equation_solution=None) for question, answer in mgsm_rows])
    no_train = dict(training_split="null")
    _local_yaml(folder, "xnli_zh_local", os.path.join(tasks_dir, "xnli", "xnli_zh.yaml"),
                dict(files=dict(validation=xnli_data), keys=no_train))
    _local_yaml(folder, "mgsm_direct_zh_local", os.path.join(tasks_dir, "mgsm", "direct", "mgsm_direct_zh.yaml"),
                dict(files=dict(test=mgsm_data), keys=no_train))


def run_ours(models, args, share_prefix=True):
    """{task: {dtype: run}} for every task with a limit, each task run in every dtype in turn."""
    a = ev.parse_args(["--out", "x", "--batch-size", str(args.batch_size)]
                      + ([] if share_prefix else ["--no-share-prefix"]))
    a.pairs = args.nll_pairs
    out = {}
    for task, _, flag in TASKS + (("nll", None, "nll_limit"),):
        limit = getattr(args, flag)
        if not limit or (task == "nll" and not args.nll_pairs) or (task not in MC_TASKS and not share_prefix):
            continue  # limit 0: skipped; prefix sharing only concerns the multiple-choice log-likelihoods
        a.limit = limit
        out[task] = {}
        for dtype, (model, tokenizer) in models.items():
            t0, c0 = time.time(), time.process_time()
            items, _, _ = ev.load_task(task, "zh", a)
            entry, rows = ev.evaluate(model, tokenizer, task, "zh", items, a)
            out[task][dtype] = dict(seconds=time.time() - t0, cpu_seconds=time.process_time() - c0,
                                    entry=entry, rows=rows)
            print(f"[ours {dtype}] {task}: {len(rows)} items, {out[task][dtype]['cpu_seconds']:.1f} CPU s, "
                  f"{entry['metric']} {entry['score']:.4f}", flush=True)
    return out


def timing(run):
    n = len(run["rows"])
    out = dict(items=n, seconds=round(run["seconds"], 1), items_per_second=round(n / run["seconds"], 3),
               cpu_seconds=round(run["cpu_seconds"], 1), items_per_cpu_second=round(n / run["cpu_seconds"], 3))
    if "cpu_seconds_repeats" in run:
        out.update(cpu_seconds_repeats=[round(c, 1) for c in run["cpu_seconds_repeats"]],
                   rows_identical_across_repeats=run["rows_identical_across_repeats"])
    if n and "n_new_tokens" in run["rows"][0]:  # generation: the dtypes may stop after different numbers of tokens
        tokens = sum(r["n_new_tokens"] for r in run["rows"])
        out.update(new_tokens=tokens, new_tokens_per_cpu_second=round(tokens / run["cpu_seconds"], 2))
    return out


def compare_dtypes(task, ref, other):
    """Agreement of one dtype's run with the reference dtype's run (ours, same items)."""
    a, b = ref["rows"], other["rows"]
    out = dict(n=len(a), score_ref=ref["entry"]["score"], score=other["entry"]["score"])
    if task in MC_TASKS:
        diff = [x["id"] for x, y in zip(a, b) if x["pred"] != y["pred"]]
        out.update(different_prediction=len(diff), different_share=round(len(diff) / len(a), 4),
                   different_ids=diff[:20],
                   max_abs_loglik_diff=max(abs(u - v) for x, y in zip(a, b)
                                           for u, v in zip(x["loglikelihoods"], y["loglikelihoods"])))
    elif task == "nll":
        out.update(nll_diff_nats_per_token=other["entry"]["score"] - ref["entry"]["score"],
                   max_abs_item_nll_diff=max(abs(x["scores"]["nll"] - y["scores"]["nll"]) for x, y in zip(a, b)))
    else:
        out.update(identical_text=sum(x["prediction"] == y["prediction"] for x, y in zip(a, b)),
                   same_flexible_score=sum(x["scores"]["flexible_extract"] == y["scores"]["flexible_extract"]
                                           for x, y in zip(a, b)))
    return out


def compare_mc(ours, harness, perm=None):
    """Item by item: the same requests (context, continuation), the same predicted choice, |delta loglik|.

    perm[i][k]: our choice index of the harness's choice k for item i (None: the same order). The harness's
    prediction is its np.argmax (first of equal maxima) in its own order, mapped to ours.
    """
    docs = {s["doc_id"]: s for s in harness["samples"]}
    ours = dict(ours, rows=ours["rows"][:len(docs)])  # the harness may run on the first of our items only
    same_items = sorted(docs) == list(range(len(ours["rows"])))  # doc ids 0..N-1, as our first N items
    agree, same_prompt, same_correct, h_correct, max_diff, mism, bad_prompt = 0, 0, 0, 0, 0.0, [], []
    for i, row in enumerate(ours["rows"]):
        s = docs.get(i)
        if s is None:
            continue
        order = perm[i] if perm is not None else list(range(len(row["choices"])))
        h_lls = [float(r[0][0]) for r in s["resps"]]
        h_args = [tuple(a) for a in s["arguments"]]
        our_args = [(row["context"], " " + row["choices"][k]) for k in order]
        if h_args == our_args:
            same_prompt += 1
        else:
            bad_prompt.append(dict(id=i, ours=our_args[0], harness=h_args[0] if h_args else None))
        if len(h_lls) != len(order):
            bad_prompt.append(dict(id=i, ours=[f"{len(order)} choices"], harness=[f"{len(h_lls)} choices"]))
            continue
        max_diff = max(max_diff, max(abs(row["loglikelihoods"][k] - h) for k, h in zip(order, h_lls)))
        h_pred = order[max(range(len(h_lls)), key=lambda k: (h_lls[k], -k))]
        h_correct += float(s["acc"]) == 1.0
        same_correct += (float(s["acc"]) == 1.0) == bool(row["correct"])
        if h_pred == row["pred"]:
            agree += 1
        else:
            mism.append(dict(id=i, ours=row["loglikelihoods"],
                             harness_in_our_order=[h for _, h in sorted(zip(order, h_lls))],
                             ours_pred=row["pred"], harness_pred=h_pred, gold=row["gold"]))
    n = len(ours["rows"])
    return dict(n=n, harness_n=len(docs), same_items=same_items, same_requests=same_prompt, same_prediction=agree,
                same_correct=same_correct, max_abs_loglik_diff=max_diff,
                acc_ours=sum(bool(r["correct"]) for r in ours["rows"]) / n,
                acc_harness=h_correct / n, mismatches=mism[:5], request_mismatches=[
                    dict(d, ours=[x[:300] for x in d["ours"]], harness=[x[:300] for x in d["harness"] or []])
                    for d in bad_prompt[:3]])


def compare_mgsm(ours, harness):
    raw, flex = {}, {}
    for s in harness["samples"]:
        raw[s["doc_id"]] = s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0]
        if s["filter"] == "flexible-extract":
            flex[s["doc_id"]] = (s["filtered"], s["exact_match"])
    same_text, same_score, mism = 0, 0, []
    ours = dict(ours, rows=ours["rows"][:len(raw)])
    for i, row in enumerate(ours["rows"]):
        same_text += raw[i] == row["prediction"]
        h_score = float(flex[i][1]) if i in flex else None
        same_score += h_score == row["scores"]["flexible_extract"]
        if raw[i] != row["prediction"]:
            mism.append(dict(id=i, ours=row["prediction"][:200], harness=raw[i][:200]))
    return dict(n=len(ours["rows"]), same_text=same_text, same_flexible_score=same_score, mismatches=mism[:5])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    g = p.add_argument_group("items (the first N of each zh task; 0 skips the task)")
    g.add_argument("--xnli-limit", type=int, default=100, help="XNLI zh validation items")
    g.add_argument("--mmlu-limit", type=int, default=50, help="Okapi MMLU zh val items")
    g.add_argument("--truthfulqa-limit", type=int, default=30, help="Okapi TruthfulQA zh items")
    g.add_argument("--mgsm-limit", type=int, default=16, help="MGSM zh items (greedy generation)")
    g.add_argument("--nll-pairs", default=None, help="dev pairs JSONL from 01_build_pairs.py: held-out NLL of its zh "
                   "pairs (ours only; default: skipped)")
    g.add_argument("--nll-limit", type=int, default=100, help="dev pairs for the NLL task")
    g.add_argument("--harness-max-items", type=int, default=100, help="the harness runs each task on at most this "
                   "many of the same first items (it is the slower side)")
    g = p.add_argument_group("compute")
    g.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; the first is the reference")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--threads", type=int, default=1, help="torch threads on both sides (1: CPU time = work)")
    g.add_argument("--repeats", type=int, default=1, help="run ours then the harness this many times in turn; "
                   "speeds and ratios are medians over the repeats")
    g.add_argument("--share-prefix-check", action="store_true", help="also run our multiple-choice tasks with "
                   "--no-share-prefix (the harness's one-row-per-choice layout) in the reference dtype")
    g = p.add_argument_group("the harness")
    g.add_argument("--lmeval-python", default=os.environ.get("LMEVAL_PYTHON"), help="python of a venv with "
                   "lm-eval 0.4.13 (default: $LMEVAL_PYTHON; see the set-up above)")
    g.add_argument("--skip-harness", action="store_true", help="ours only")
    p.add_argument("--out", default="/tmp/bench_eval")
    args = p.parse_args()
    for flag in ("xnli_limit", "mmlu_limit", "truthfulqa_limit", "mgsm_limit", "nll_limit"):
        if getattr(args, flag) < 0:
            raise common.UserError(f"--{flag.replace('_', '-')} must be >= 0")
    for flag in ("repeats", "batch_size", "threads", "harness_max_items"):
        if getattr(args, flag) < 1:
            raise common.UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1")
    dtypes = common.parse_list(args.dtypes)
    if not dtypes or any(d not in ("float32", "bfloat16", "float16") for d in dtypes):
        raise common.UserError(f"--dtypes {args.dtypes}: use float32, bfloat16 or float16")
    if args.nll_pairs and not os.path.exists(args.nll_pairs):
        raise common.UserError(f"--nll-pairs {args.nll_pairs}: no such file")
    if not args.skip_harness and args.lmeval_python and not os.path.isfile(args.lmeval_python):
        raise common.UserError(f"--lmeval-python {args.lmeval_python}: not found; give the python of the venv with "
                               "lm-eval (see the set-up in `bench_evaluate.py --help`), or --skip-harness")
    if not args.skip_harness and not args.lmeval_python:
        raise common.UserError("no harness python: pass --lmeval-python PATH or set LMEVAL_PYTHON (see the set-up in "
                         "`bench_evaluate.py --help`), or --skip-harness")
    run = [(t, h, min(getattr(args, flag), args.harness_max_items)) for t, h, flag in TASKS if getattr(args, flag)]
    if not run and not args.nll_pairs:
        raise common.UserError("every task has limit 0: nothing to run")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model_dir, _, source = common.resolve_model(common.DEFAULT_MODEL)
    report = dict(model=model_dir, model_source=source, batch_size=args.batch_size, threads=args.threads, dtypes=dtypes,
                  native_bf16=common.native_bf16("cpu"), cpu=_cpu_name(),
                  limits=dict(xnli=args.xnli_limit, mmlu=args.mmlu_limit, truthfulqa=args.truthfulqa_limit,
                              mgsm=args.mgsm_limit, nll=args.nll_limit if args.nll_pairs else 0),
                  harness_limits={t: n for t, _, n in run}, repeats=args.repeats, versions=common.versions(),
                  nll_pairs=(dict(path=args.nll_pairs, sha256=common.sha256_file(args.nll_pairs))
                             if args.nll_pairs else None),
                  started=time.strftime("%Y-%m-%d %H:%M:%S"))

    harness_setup = None
    if not args.skip_harness and run:  # before loading the models: a harness python without lm_eval is refused
        harness_setup = prepare_harness(args, dtypes, run, model_dir)
    models = {}
    for dtype in dtypes:
        models[dtype] = common.load_model_and_tokenizer(model_dir, dtype, padding_side="left")
        models[dtype][0].eval()
    ours_repeats, harness_repeats = [], []
    for r in range(args.repeats):  # interleaved: ours, the harness, ours, ...
        if args.repeats > 1:
            print(f"[repeat {r + 1}/{args.repeats}]", flush=True)
        ours_repeats.append(run_ours(models, args))
        if harness_setup:
            harness_repeats.append(run_harness(args, harness_setup[0]))
    ours = median_runs(ours_repeats)
    ref = dtypes[0]
    report["ours"] = {t: {d: dict(timing(r), score=r["entry"]["score"], metrics=r["entry"]["metrics"])
                          for d, r in by_dtype.items()} for t, by_dtype in ours.items()}
    report["speedup_cpu_vs_" + ref] = {t: {d: round(by_dtype[ref]["cpu_seconds"] / r["cpu_seconds"], 2)
                                           for d, r in by_dtype.items() if d != ref} for t, by_dtype in ours.items()}
    report["agreement_vs_" + ref] = {t: {d: compare_dtypes(t, by_dtype[ref], r)
                                         for d, r in by_dtype.items() if d != ref}
                                     for t, by_dtype in ours.items()}
    if args.share_prefix_check:
        flat = run_ours({ref: models[ref]}, args, share_prefix=False)
        report["ours_no_share_prefix"] = {}
        for t, by_dtype in flat.items():
            o, x, y = by_dtype[ref], ours[t][ref]["rows"], by_dtype[ref]["rows"]
            report["ours_no_share_prefix"][t] = dict(
                timing(o), dtype=ref, same_prediction_as_shared=sum(u["pred"] == v["pred"] for u, v in zip(x, y)),
                max_abs_loglik_diff_vs_shared=max(abs(u - v) for a, b in zip(x, y)
                                                  for u, v in zip(a["loglikelihoods"], b["loglikelihoods"])))
    del models
    print(json.dumps({k: report[k] for k in report if k.startswith(("speedup", "agreement"))}, indent=1), flush=True)

    if harness_repeats:
        h = harness_repeats[0]
        tqa_perm = harness_setup[1]
        report["harness"], report["harness_agreement"], report["speedup_cpu_ours_vs_harness"] = {}, {}, {}
        report["speedup_cpu_ours_vs_harness_repeats"] = {}
        for t, name, limit in run:
            report["harness"][t], report["harness_agreement"][t], report["speedup_cpu_ours_vs_harness"][t] = {}, {}, {}
            report["speedup_cpu_ours_vs_harness_repeats"][t] = {}
            for dtype in dtypes:
                ht = h[dtype][name]
                n = len({s["doc_id"] for s in ht["samples"]})
                cpu = [hr[dtype][name]["cpu_seconds"] for hr in harness_repeats]
                wall = [hr[dtype][name]["seconds"] for hr in harness_repeats]
                report["harness"][t][dtype] = dict(items=n, seconds=round(median(wall), 1),
                                                   items_per_second=round(n / median(wall), 3),
                                                   cpu_seconds=round(median(cpu), 1),
                                                   items_per_cpu_second=round(n / median(cpu), 3),
                                                   cpu_seconds_repeats=[round(c, 1) for c in cpu],
                                                   results=ht["results"])
                mine = ours[t][dtype]
                report["harness_agreement"][t][dtype] = (compare_mgsm(mine, ht) if t == "mgsm" else
                                                         compare_mc(mine, ht, tqa_perm if t == "truthfulqa" else None))
                # per repeat: ours and the harness ran one after the other, so their ratio is the fair one
                ratios = [(len(o[t][dtype]["rows"]) / o[t][dtype]["cpu_seconds"]) / (n / hr[dtype][name]["cpu_seconds"])
                          for o, hr in zip(ours_repeats, harness_repeats)]
                report["speedup_cpu_ours_vs_harness"][t][dtype] = round(median(ratios), 2)
                report["speedup_cpu_ours_vs_harness_repeats"][t][dtype] = [round(x, 3) for x in ratios]
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    common.write_json(os.path.join(args.out, "bench_evaluate.json"), report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("versions", "ours", "harness")}, indent=1,
                     ensure_ascii=False))


def median(values):
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def median_runs(repeats):
    """One run per task and dtype: the first repeat's rows and scores, the median of the repeats' seconds."""
    out = {}
    for t, by_dtype in repeats[0].items():
        out[t] = {}
        for d, first in by_dtype.items():
            cpu, wall = [r[t][d]["cpu_seconds"] for r in repeats], [r[t][d]["seconds"] for r in repeats]
            same = all(r[t][d]["rows"] == first["rows"] for r in repeats[1:])
            out[t][d] = dict(first, cpu_seconds=median(cpu), seconds=median(wall), cpu_seconds_repeats=cpu,
                             rows_identical_across_repeats=same)
    return out


def prepare_harness(args, dtypes, run, model_dir):
    """The harness's task files and driver in a temp folder: (its command and environment, TruthfulQA's perm)."""
    found = subprocess.run([args.lmeval_python, "-c", "import lm_eval.tasks, os; "
                            "print(os.path.dirname(lm_eval.tasks.__file__))"], capture_output=True, text=True)
    if found.returncode != 0:
        why = (found.stderr.strip().splitlines() or ["no message"])[-1]
        raise common.UserError(f"--lmeval-python {args.lmeval_python} cannot import lm_eval ({why}): install lm-eval "
                               "0.4.13 in that venv (the set-up is in `bench_evaluate.py --help`), or --skip-harness")
    tasks_dir = found.stdout.strip()
    folder = tempfile.mkdtemp(prefix="bench_eval_tasks_")
    xnli_rows = ev._tsv(os.path.join(common.DATA_DIR, "xnli", "dev-zh.tsv"))
    mgsm_rows = ev._tsv(os.path.join(common.DATA_DIR, "mgsm", "mgsm_zh.tsv"))
    harness_task_files(folder, tasks_dir, xnli_rows, mgsm_rows)
    tqa_perm = okapi_task_files(folder, tasks_dir)
    # the harness's limit 0 would mean "all": skipped tasks are not sent at all
    cfg = dict(model=model_dir, batch_size=args.batch_size, threads=args.threads, task_dir=folder, dtypes=dtypes,
               tasks=[[h, limit] for _, h, limit in run], out=os.path.join(args.out, "harness_raw.json"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, "driver.py"), "w") as f:
        f.write(HARNESS_DRIVER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(args.threads))
    command = [args.lmeval_python, os.path.join(folder, "driver.py"), os.path.join(folder, "cfg.json")]
    return (command, env, cfg["out"]), tqa_perm


def run_harness(args, harness):
    """One harness run of every task in every dtype: {dtype: {harness task: run}}."""
    command, env, out = harness
    r = subprocess.run(command, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-4000:])
        raise common.UserError("the harness run failed (its stderr is above)")
    h = json.load(open(out))
    print("[harness] " + ", ".join(f"{d} {t}: {x['cpu_seconds']:.1f} CPU s"
                                   for d, by in h.items() for t, x in by.items()), flush=True)
    return h


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


if __name__ == "__main__":
    common.run_main(main)
