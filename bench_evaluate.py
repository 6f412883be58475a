"""
Benchmark 03_evaluate.py against lm-evaluation-harness on the same model, items and batch size.

Two tasks: xnli zh (log-likelihood, 3 choices per item) and mgsm_direct zh (greedy generation, the harness's
stop strings and 256-token budget). We time our functions in this process (data loading, tokenization,
model calls, scoring; not model loading) and the harness's `simple_evaluate` in its own virtual environment
(the same steps, model loaded beforehand), then compare the answers item by item.

The harness cannot reach the hub here, so it gets the model as the local folder common.resolve_model
returns and the data through task YAMLs that `include` the harness's own xnli_zh.yaml / mgsm_direct_zh.yaml
and only swap the dataset for a local JSON file made from data/.

Set-up of the harness (a separate venv; never install it into .venv):
  python3 -m venv /work/lmeval-venv && /work/lmeval-venv/bin/pip install torch==2.13.0 \
      && /work/lmeval-venv/bin/pip install lm-eval==0.4.13 transformers==5.23.0 accelerate==1.15.0
Run:
  .venv/bin/python bench_evaluate.py --xnli-limit 100 --mgsm-limit 16 --out /tmp/bench_eval
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
    samples = [dict(doc_id=s["doc_id"], filter=s.get("filter"), resps=s["resps"], filtered=s["filtered_resps"],
                    target=s["target"], acc=s.get("acc"), exact_match=s.get("exact_match"))
               for s in res["samples"][task]]
    out[task] = dict(seconds=seconds, cpu_seconds=cpu, results=res["results"][task], samples=samples)
json.dump(out, open(cfg["out"], "w"), default=str)
'''


def harness_task_files(folder, tasks_dir, xnli_rows, mgsm_rows):
    """Local-data copies of the harness's own xnli_zh and mgsm_direct_zh tasks."""
    xnli_data = os.path.join(folder, "xnli_zh_dev.jsonl")
    with open(xnli_data, "w", encoding="utf-8") as f:
        for premise, hypothesis, label in xnli_rows:
            f.write(json.dumps(dict(premise=premise, hypothesis=hypothesis, label=ev.XNLI_LABELS[label]),
                               ensure_ascii=False) + "\n")
    mgsm_data = os.path.join(folder, "mgsm_zh_test.jsonl")
    with open(mgsm_data, "w", encoding="utf-8") as f:
        for question, answer in mgsm_rows:
            f.write(json.dumps(dict(question=question, answer=None, answer_number=int(answer.replace(",", "")),
                                    equation_solution=None), ensure_ascii=False) + "\n")
    with open(os.path.join(folder, "xnli_zh_local.yaml"), "w") as f:
        f.write(f"include: {os.path.join(tasks_dir, 'xnli', 'xnli_zh.yaml')}\ntask: xnli_zh_local\ntag: []\n"
                f"dataset_path: json\ndataset_name: null\ntraining_split: null\n"
                f"dataset_kwargs:\n  data_files:\n    validation: {xnli_data}\n")
    with open(os.path.join(folder, "mgsm_direct_zh_local.yaml"), "w") as f:
        f.write(f"include: {os.path.join(tasks_dir, 'mgsm', 'direct', 'mgsm_direct_zh.yaml')}\n"
                f"task: mgsm_direct_zh_local\ntag: []\ndataset_path: json\ndataset_name: null\ntraining_split: null\n"
                f"dataset_kwargs:\n  data_files:\n    test: {mgsm_data}\n")


def run_ours(model, tokenizer, args, share_prefix=True):
    a = ev.parse_args(["--out", "x", "--batch-size", str(args.batch_size)] + ([] if share_prefix else ["--no-share-prefix"]))
    out = {}
    for task, limit in (("xnli", args.xnli_limit), ("mgsm", args.mgsm_limit)):
        if task == "mgsm" and not share_prefix:
            continue  # prefix sharing only concerns log-likelihoods
        a.limit = limit
        t0, c0 = time.time(), time.process_time()
        items, _, _ = ev.load_task(task, "zh", a)
        entry, rows = ev.evaluate(model, tokenizer, task, "zh", items, a)
        out[task] = dict(seconds=time.time() - t0, cpu_seconds=time.process_time() - c0, entry=entry, rows=rows)
    return out


def compare_xnli(ours, harness):
    docs = {}
    for s in harness["samples"]:
        docs[s["doc_id"]] = s
    agree, max_diff, mism = 0, 0.0, []
    for i, row in enumerate(ours["rows"]):
        s = docs[i]
        h_lls = [float(r[0][0]) for r in s["resps"]]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(row["loglikelihoods"], h_lls)))
        h_pred = max(range(3), key=lambda k: (h_lls[k], -k))
        if h_pred == row["pred"]:
            agree += 1
        else:
            mism.append(dict(id=i, ours=row["loglikelihoods"], harness=h_lls))
    return dict(n=len(ours["rows"]), same_prediction=agree, max_abs_loglik_diff=max_diff, mismatches=mism[:5])


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
    p.add_argument("--xnli-limit", type=int, default=100)
    p.add_argument("--mgsm-limit", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--lmeval-python", default="/work/lmeval-venv/bin/python")
    p.add_argument("--skip-harness", action="store_true")
    p.add_argument("--out", default="/tmp/bench_eval")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model_dir, _, source = common.resolve_model(common.DEFAULT_MODEL)
    report = dict(model=model_dir, model_source=source, batch_size=args.batch_size, threads=args.threads,
                  xnli_limit=args.xnli_limit, mgsm_limit=args.mgsm_limit, versions=common.versions())

    model, tokenizer = common.load_model_and_tokenizer(model_dir, padding_side="left")
    model.eval()
    ours = run_ours(model, tokenizer, args, share_prefix=True)
    flat = run_ours(model, tokenizer, args, share_prefix=False)
    del model
    report["ours"] = {t: dict(seconds=round(o["seconds"], 1), items_per_second=round(len(o["rows"]) / o["seconds"], 3),
                              cpu_seconds=round(o["cpu_seconds"], 1), items_per_cpu_second=round(len(o["rows"]) / o["cpu_seconds"], 3),
                              score=o["entry"]["score"], metrics=o["entry"]["metrics"]) for t, o in ours.items()}
    report["ours_no_share_prefix"] = {t: dict(seconds=round(o["seconds"], 1), score=o["entry"]["score"],
                                              cpu_seconds=round(o["cpu_seconds"], 1),
                                              items_per_second=round(len(o["rows"]) / o["seconds"], 3))
                                      for t, o in flat.items()}
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
        cfg = dict(model=model_dir, batch_size=args.batch_size, threads=args.threads, task_dir=folder,
                   tasks=[["xnli_zh_local", args.xnli_limit], ["mgsm_direct_zh_local", args.mgsm_limit]],
                   out=os.path.join(args.out, "harness_raw.json"))
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
        hx, hm = h["xnli_zh_local"], h["mgsm_direct_zh_local"]
        report["harness"] = {
            "xnli": dict(seconds=round(hx["seconds"], 1), items_per_second=round(args.xnli_limit / hx["seconds"], 3),
                         cpu_seconds=round(hx["cpu_seconds"], 1),
                         items_per_cpu_second=round(args.xnli_limit / hx["cpu_seconds"], 3), results=hx["results"]),
            "mgsm": dict(seconds=round(hm["seconds"], 1), items_per_second=round(args.mgsm_limit / hm["seconds"], 3),
                         cpu_seconds=round(hm["cpu_seconds"], 1),
                         items_per_cpu_second=round(args.mgsm_limit / hm["cpu_seconds"], 3), results=hm["results"])}
        report["agreement"] = dict(xnli=compare_xnli(ours["xnli"], hx), mgsm=compare_mgsm(ours["mgsm"], hm))
        # wall time swings several-fold on a shared CPU; process CPU time (all threads) is the steadier measure
        report["speedup_wall"] = {t: round(report["ours"][t]["items_per_second"] / report["harness"][t]["items_per_second"], 2)
                                  for t in ("xnli", "mgsm")}
        report["speedup_cpu"] = {t: round(report["harness"][t]["cpu_seconds"] / report["ours"][t]["cpu_seconds"], 2)
                                 for t in ("xnli", "mgsm")}
    common.write_json(os.path.join(args.out, "bench_evaluate.json"), report)
    print(json.dumps({k: v for k, v in report.items() if k != "versions"}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
