"""
Benchmark 03_evaluate.py against lm-evaluation-harness on the same model, items and batch size.

Four tasks, all zh: xnli (log-likelihood, 3 choices, empty context), mmlu (Okapi m_mmlu_zh: log-likelihood of
" A".." D" after the question, our shared-prefix path with one-token suffixes), truthfulqa (Okapi
truthfulqa_zh_mc1: 6-shot QA prompt of ~200 tokens, 2-13 choices; the shared-prefix path with real suffixes) and
mgsm_direct (greedy generation, the harness's stop strings and 256-token budget). A limit of 0 skips a task.
We time our functions in this process (data loading, tokenization, model calls, scoring; not model loading)
and the harness's `simple_evaluate` in its own virtual environment (the same steps, model loaded beforehand),
then compare the answers item by item.

The harness cannot reach the hub here, so it gets the model as the local folder common.resolve_model
returns and the data through task YAMLs that `include` the harness's own xnli_zh.yaml, mgsm_direct_zh.yaml,
okapi/mmlu_multilingual/m_mmlu_zh.yaml and okapi/truthfulqa_multilingual/truthfulqa_zh_mc1.yaml and only swap
the dataset for a local JSON file made from data/ (MMLU: our val file as the harness's test split, our dev
file as its train/few-shot split; TruthfulQA: the raw Okapi rows as its val split, run through its own
utils.process_docs). Both sides score the first N items in file order; every harness request's
(context, continuation) is checked against ours, so the items and prompts are the same string for string.

Set-up of the harness (a separate venv; never install it into .venv):
  python3 -m venv /work/lmeval-venv && /work/lmeval-venv/bin/pip install torch==2.13.0 \
      && /work/lmeval-venv/bin/pip install lm-eval==0.4.13 transformers==5.23.0 accelerate==1.15.0
Run:
  .venv/bin/python bench_evaluate.py --xnli-limit 100 --mgsm-limit 16 --mmlu-limit 50 --truthfulqa-limit 30 \
      --out /tmp/bench_eval
Timing: wall seconds and process CPU seconds (all threads) of each side; on a shared machine wall time
swings several-fold with the neighbours' load, so compare CPU seconds (speedup_cpu) first.
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
lm = HFLM(pretrained=cfg["model"], dtype="float32", batch_size=cfg["batch_size"], device="cpu")
tm = TaskManager(include_path=cfg["task_dir"])
out = {}
for task, limit in cfg["tasks"]:
    t0, c0 = time.time(), time.process_time()
    res = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=tm, log_samples=True,
                          bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    seconds, cpu = time.time() - t0, time.process_time() - c0
    samples = [dict(doc_id=s["doc_id"], filter=s.get("filter"), arguments=s["arguments"], resps=s["resps"],
                    filtered=s["filtered_resps"], target=s["target"], acc=s.get("acc"), exact_match=s.get("exact_match"))
               for s in res["samples"][task]]
    out[task] = dict(seconds=seconds, cpu_seconds=cpu, results=res["results"][task], samples=samples)
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
            raise SystemExit(f"truthfulqa zh item {i}: MC1 needs exactly one correct choice, labels are {labels}")
        order = [labels.index(1)] + [k for k in range(len(labels)) if labels[k] != 1]
        perm.append(order)
        choices = [r["mc1_targets_choices"][k] for k in order]
        rows.append(dict(question=r["question"], mc1_targets_choices=choices,
                         mc1_targets_labels=[1] + [0] * (len(choices) - 1),
                         mc2_targets_choices=r["mc2_targets_choices"], mc2_targets_labels=r["mc2_targets_labels"]))
    tqa = os.path.join(folder, "truthfulqa_zh_validation.jsonl")
    _write_jsonl(tqa, rows)
    _local_yaml(folder, "truthfulqa_zh_mc1_local", os.path.join(okapi, "truthfulqa_multilingual", "truthfulqa_zh_mc1.yaml"),
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


def run_ours(model, tokenizer, args, share_prefix=True):
    a = ev.parse_args(["--out", "x", "--batch-size", str(args.batch_size)] + ([] if share_prefix else ["--no-share-prefix"]))
    out = {}
    for task, _, flag in TASKS:
        limit = getattr(args, flag)
        if not limit or (task not in MC_TASKS and not share_prefix):
            continue  # limit 0: skipped; prefix sharing only concerns log-likelihoods
        a.limit = limit
        t0, c0 = time.time(), time.process_time()
        items, _, _ = ev.load_task(task, "zh", a)
        entry, rows = ev.evaluate(model, tokenizer, task, "zh", items, a)
        out[task] = dict(seconds=time.time() - t0, cpu_seconds=time.process_time() - c0, entry=entry, rows=rows)
    return out


def compare_mc(ours, harness, perm=None):
    """Item by item: the same requests (context, continuation), the same predicted choice, |delta loglik|.

    perm[i][k]: our choice index of the harness's choice k for item i (None: the same order). The harness's
    prediction is its np.argmax (first of equal maxima) in its own order, mapped to ours.
    """
    docs = {s["doc_id"]: s for s in harness["samples"]}
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
            mism.append(dict(id=i, ours=row["loglikelihoods"], harness_in_our_order=[h for _, h in sorted(zip(order, h_lls))],
                             ours_pred=row["pred"], harness_pred=h_pred, gold=row["gold"]))
    n = len(ours["rows"])
    return dict(n=n, harness_n=len(docs), same_items=same_items, same_requests=same_prompt, same_prediction=agree,
                same_correct=same_correct, max_abs_loglik_diff=max_diff, acc_ours=sum(bool(r["correct"]) for r in ours["rows"]) / n,
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
    for i, row in enumerate(ours["rows"]):
        same_text += raw[i] == row["prediction"]
        h_score = float(flex[i][1]) if i in flex else None
        same_score += h_score == row["scores"]["flexible_extract"]
        if raw[i] != row["prediction"]:
            mism.append(dict(id=i, ours=row["prediction"][:200], harness=raw[i][:200]))
    return dict(n=len(ours["rows"]), same_text=same_text, same_flexible_score=same_score, mismatches=mism[:5])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--xnli-limit", type=int, default=100, help="first N XNLI zh validation items (0: skip)")
    p.add_argument("--mgsm-limit", type=int, default=24, help="first N MGSM zh items (0: skip)")
    p.add_argument("--mmlu-limit", type=int, default=50, help="first N Okapi MMLU zh val items (0: skip)")
    p.add_argument("--truthfulqa-limit", type=int, default=30, help="first N Okapi TruthfulQA zh items (0: skip)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--lmeval-python", default="/work/lmeval-venv/bin/python")
    p.add_argument("--skip-harness", action="store_true")
    p.add_argument("--out", default="/tmp/bench_eval")
    args = p.parse_args()
    for _, _, flag in TASKS:
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0")
    run = [(t, h, getattr(args, flag)) for t, h, flag in TASKS if getattr(args, flag)]
    if not run:
        raise SystemExit("every task has limit 0: nothing to run")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model_dir, _, source = common.resolve_model(common.DEFAULT_MODEL)
    report = dict(model=model_dir, model_source=source, batch_size=args.batch_size, threads=args.threads,
                  xnli_limit=args.xnli_limit, mgsm_limit=args.mgsm_limit, mmlu_limit=args.mmlu_limit,
                  truthfulqa_limit=args.truthfulqa_limit, versions=common.versions())

    model, tokenizer = common.load_model_and_tokenizer(model_dir, padding_side="left")
    model.eval()
    ours = run_ours(model, tokenizer, args, share_prefix=True)
    flat = run_ours(model, tokenizer, args, share_prefix=False)
    del model
    report["ours"] = {t: dict(items=len(o["rows"]), seconds=round(o["seconds"], 1), items_per_second=round(len(o["rows"]) / o["seconds"], 3),
                              cpu_seconds=round(o["cpu_seconds"], 1), items_per_cpu_second=round(len(o["rows"]) / o["cpu_seconds"], 3),
                              score=o["entry"]["score"], metrics=o["entry"]["metrics"]) for t, o in ours.items()}
    report["ours_no_share_prefix"] = {}
    for t, o in flat.items():
        a, b = ours[t]["rows"], o["rows"]
        report["ours_no_share_prefix"][t] = dict(
            seconds=round(o["seconds"], 1), score=o["entry"]["score"], cpu_seconds=round(o["cpu_seconds"], 1),
            items_per_second=round(len(b) / o["seconds"], 3), items_per_cpu_second=round(len(b) / o["cpu_seconds"], 3),
            same_prediction_as_shared=sum(x["pred"] == y["pred"] for x, y in zip(a, b)),
            max_abs_loglik_diff_vs_shared=max(abs(u - v) for x, y in zip(a, b)
                                              for u, v in zip(x["loglikelihoods"], y["loglikelihoods"])))
    print(json.dumps(report["ours"], indent=1), flush=True)

    if not args.skip_harness:
        if not os.path.exists(args.lmeval_python):
            raise SystemExit(f"no harness python at {args.lmeval_python}; see the set-up in this file's docstring")
        tasks_dir = subprocess.run([args.lmeval_python, "-c", "import lm_eval.tasks, os; "
                                    "print(os.path.dirname(lm_eval.tasks.__file__))"],
                                   capture_output=True, text=True, check=True).stdout.strip()
        folder = tempfile.mkdtemp(prefix="bench_eval_tasks_")
        xnli_rows = ev._tsv(os.path.join(common.DATA_DIR, "xnli", "dev-zh.tsv"))
        mgsm_rows = ev._tsv(os.path.join(common.DATA_DIR, "mgsm", "mgsm_zh.tsv"))
        harness_task_files(folder, tasks_dir, xnli_rows, mgsm_rows)
        tqa_perm = okapi_task_files(folder, tasks_dir)
        # the harness's limit 0 would mean "all": skipped tasks are not sent at all
        cfg = dict(model=model_dir, batch_size=args.batch_size, threads=args.threads, task_dir=folder,
                   tasks=[[h, limit] for _, h, limit in run], out=os.path.join(args.out, "harness_raw.json"))
        with open(os.path.join(folder, "cfg.json"), "w") as f:
            json.dump(cfg, f)
        with open(os.path.join(folder, "driver.py"), "w") as f:
            f.write(HARNESS_DRIVER)
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        r = subprocess.run([args.lmeval_python, os.path.join(folder, "driver.py"), os.path.join(folder, "cfg.json")],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-4000:])
            raise SystemExit("the harness run failed (its stderr is above)")
        h = json.load(open(cfg["out"]))
        report["harness"], report["agreement"] = {}, {}
        for t, name, limit in run:
            ht = h[name]
            n = len({s["doc_id"] for s in ht["samples"]})
            report["harness"][t] = dict(items=n, seconds=round(ht["seconds"], 1), items_per_second=round(n / ht["seconds"], 3),
                                        cpu_seconds=round(ht["cpu_seconds"], 1),
                                        items_per_cpu_second=round(n / ht["cpu_seconds"], 3), results=ht["results"])
            if t == "mgsm":
                report["agreement"][t] = compare_mgsm(ours[t], ht)
            else:
                report["agreement"][t] = compare_mc(ours[t], ht, tqa_perm if t == "truthfulqa" else None)
        # wall time swings several-fold on a shared CPU; process CPU time (all threads) is the steadier measure
        report["speedup_wall"] = {t: round(report["ours"][t]["items_per_second"] / report["harness"][t]["items_per_second"], 2)
                                  for t, _, _ in run}
        report["speedup_cpu"] = {t: round(report["harness"][t]["cpu_seconds"] / report["ours"][t]["cpu_seconds"], 2)
                                 for t, _, _ in run}
    common.write_json(os.path.join(args.out, "bench_evaluate.json"), report)
    print(json.dumps({k: v for k, v in report.items() if k != "versions"}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
