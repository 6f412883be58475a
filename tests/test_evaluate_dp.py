"""03_evaluate.py over several processes (gloo on the CPU): the files equal one process's, failures stop every rank.

This file is also a worker: `torchrun ... tests/test_evaluate_dp.py --worker MODE <03_evaluate.py arguments>` runs
03_evaluate.py's main; MODE user or crash makes rank 1 fail (user: bad input found on that rank only; crash: an
exception in the middle of a task); MODE threads prints, on every rank, the gloo threads left once main returns.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import REPO, fit_intervention, gloo_threads, load_stage  # noqa: E402

import common  # noqa: E402

ev = load_stage("03_evaluate")
SCRIPT = os.path.join(REPO, "03_evaluate.py")
TIMING = ("seconds", "items_per_second", "evaluated", "updated")  # the only fields that may differ

pytestmark = pytest.mark.usefixtures("one_thread")


def env():
    out = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        out.pop(key, None)
    return out


def one_process(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO, env=env(),
                          timeout=180)


def two_processes(*args, script=SCRIPT):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env(), timeout=180)


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING}
    return obj


def test_shards_of_the_batch_plan_merge_to_one_process(tokenizer):
    """Every batch is computed by exactly one shard and the merged results are the one-process results."""
    from conftest import make_tiny_model
    model = make_tiny_model("llama", tokenizer)
    texts = ["你好，世界。", "The answer is 42.", "Xin chào", "What is the capital of France?", "مرحبا"]
    groups = [[ev.encode_request(tokenizer, t, " " + c) for c in ("Paris.", "no", "今天天气很好")] for t in texts]
    whole = ev.loglikelihoods(model, groups, batch_size=4, share_prefix=False)
    parts = [ev.loglikelihoods(model, groups, batch_size=4, share_prefix=False, shard=(r, 3)) for r in range(3)]
    assert ev.merge_shards(parts) == whole
    assert all(sum(p[g][r][0] is not None for p in parts) == 1 for g in range(5) for r in range(3))
    gen = ev.greedy_generate(model, tokenizer, texts, 3, ["\n"], batch_size=2)
    assert ev.merge_shards([ev.greedy_generate(model, tokenizer, texts, 3, ["\n"], batch_size=2, shard=(r, 2))
                            for r in range(2)]) == gen


def test_an_explicit_cuda_device_with_several_ranks_is_an_error():
    args = ev.parse_args(["--out", "x", "--device", "cuda:1"])
    with pytest.raises(common.UserError, match="--device cuda:1 with 2 processes: each rank takes cuda:LOCAL_RANK"):
        ev.device_of(args, ev.Ranks(rank=1, world=2, local=1))
    assert ev.device_of(ev.parse_args(["--out", "x", "--device", "cuda"]), ev.Ranks(1, 2, 1)) == "cuda:1"
    assert ev.device_of(ev.parse_args(["--out", "x", "--device", "cpu"]), ev.Ranks(1, 2, 1)) == "cpu"


@pytest.mark.parametrize("steered", [False, True], ids=["models", "intervention"])
def test_two_ranks_write_what_one_process_writes(steered, tiny_model_dirs, tmp_path):
    """Log-likelihood (xnli), generation (mgsm), held-out NLL and translation for two models in one launch: the
    per-item files, results.md and the run JSONs (timing aside) equal one process's. Uneven shards: batches of 2
    rows over 2 ranks, and nll vi has one item (rank 1 computes none of it). steered: the first model is an
    intervention folder (INCLINE's maps on every block of the tiny LLaMA, at every prompt / context token)."""
    pairs = tmp_path / "dev.jsonl"
    rows = [dict(id=f"zh{i}", lang="zh", source="t", x_en=f"Say {i}", y_en=f"{i}.", x_tgt=f"说 {i}", y_tgt=f"{i}。")
            for i in range(5)] + [dict(id="vi0", lang="vi", source="t", x_en="Say 9", y_en="9.", x_tgt="Nói 9",
                                       y_tgt="9 ạ.")]
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    first = tiny_model_dirs["llama"]
    if steered:
        first = fit_intervention(first, tmp_path / "incline", "incline", "--fit-positions", "prompt")
    flags = ["--model", first, tiny_model_dirs["gpt2"], "--run-name", "llama", "gpt2",
             "--tasks", "xnli,mgsm,nll,translation", "--langs", "zh,vi", "--pairs", str(pairs), "--limit", "5",
             "--batch-size", "2", "--max-new-tokens", "4", "--dtype", "float32"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = one_process(*flags, "--out", str(one))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = two_processes(*flags, "--out", str(two))
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "[ranks] 2 processes" in r2.stdout and r2.stdout.count("[llama] xnli zh:") == 1  # rank 0 prints
    files = sorted(os.listdir(one))
    assert files == sorted(os.listdir(two)) and "results.md" in files
    cells = [f for f in files if f.endswith(".jsonl")]
    assert {"llama.xnli.zh.jsonl", "gpt2.mgsm.zh.jsonl", "llama.nll.vi.jsonl", "gpt2.translation.zh-en.jsonl"} \
        <= set(cells)
    for name in files:
        a, b = (open(folder / name, encoding="utf-8").read() for folder in (one, two))
        if name.endswith(".json"):
            a, b = without_timing(json.loads(a)), without_timing(json.loads(b))
        assert a == b, name
    run = json.load(open(two / "llama.json"))
    assert run["results"]["nll"]["vi"]["n"] == 1 and run["results"]["translation"]["zh-en"]["n"] == 5
    assert (run.get("intervention") or {}).get("positions") == ("prompt" if steered else None)


@pytest.mark.parametrize("mode,message,code", [
    ("user", "error: xnli zh data unreadable on rank 1", 2),
    ("crash", "RuntimeError: simulated failure in the middle of a task", 1),
])
def test_a_failing_rank_stops_every_rank_and_prints_once(mode, message, code, tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    r = two_processes("--worker", mode, "--model", tiny_model_dirs["llama"], "--tasks", "xnli",
                      "--langs", "zh", "--limit", "4", "--batch-size", "2", "--dtype", "float32", "--out", str(out),
                      script=__file__)
    text = r.stdout + r.stderr
    assert r.returncode != 0 and text.count(message) == 1, text[-4000:]
    assert f"exitcode  : {code}" in text  # torchrun's summary: the ranks' own exit codes
    assert not out.exists() or not os.listdir(out)


@pytest.mark.skipif(gloo_threads() is None, reason="reads thread names from Linux's /proc")
def test_every_rank_ends_with_its_process_group_freed(tiny_model_dirs, tmp_path):
    """destroy_process_group frees the group and joins gloo's threads although the model was loaded after the group
    was created (03 imports torch.distributed.nn first). Left running as Python shut down, they aborted rank 0
    (SIGABRT) after every file was written in 5 of 80 launches of the test above (docs/LOG.md, session 20)."""
    r = two_processes("--worker", "threads", "--model", tiny_model_dirs["llama"], "--tasks", "xnli", "--langs", "zh",
                      "--limit", "4", "--batch-size", "2", "--dtype", "float32", "--out", str(tmp_path / "out"),
                      script=__file__)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(line for line in r.stderr.splitlines() if "gloo threads left" in line) == [
        "rank 0: gloo threads left: []", "rank 1: gloo threads left: []"], r.stderr[-3000:]


def simulate_memory(monkeypatch, max_rows):
    """A device that holds at most max_rows sequences per forward (torch.OutOfMemoryError beyond), probed as CUDA."""
    from transformers.models.llama import modeling_llama
    forward = modeling_llama.LlamaModel.forward

    def limited(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[0] > max_rows:
            raise torch.OutOfMemoryError(f"simulated: {input_ids.shape[0]} rows > {max_rows}")
        return forward(self, input_ids=input_ids, **kwargs)
    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", limited)
    monkeypatch.setattr(ev, "probes_memory", lambda device: True)


def auto_run(model, out, *flags):
    ev.main(["--model", model, "--run-name", "m", "--tasks", "xnli,mgsm", "--langs", "zh", "--limit", "8",
             "--max-new-tokens", "3", "--dtype", "float32", "--out", str(out), *flags])
    run = json.load(open(out / "m.json"))
    items = {f: open(out / f).read() for f in sorted(os.listdir(out)) if f.endswith(".jsonl")}
    return {t: run["results"][t]["zh"]["settings"] for t in ("xnli", "mgsm")}, items


def test_batch_size_auto_probes_then_halves_on_out_of_memory(tiny_model_dirs, tmp_path, monkeypatch):
    model = tiny_model_dirs["llama"]
    assert ev.BatchSize("auto").for_cell(ev.common.load_model_and_tokenizer(model)[0], "generation", None,
                                          ev.SINGLE) == ev.AUTO_BATCH_CPU  # a CPU: today's default, no probe
    simulate_memory(monkeypatch, max_rows=4)
    settings, items = auto_run(model, tmp_path / "auto", "--batch-size", "auto")  # the probe: 64, 32, 16, 8, 4
    assert all(s["batch_size"] == 4 and s["batch_size_requested"] == "auto" and s["batch_halved_to"] is None
               for s in settings.values())
    assert auto_run(model, tmp_path / "four", "--batch-size", "4")[1] == items  # the same rows as batches of 4
    # the probe passed at 8 but the run's batches of 8 do not fit: each halves (8 -> 4 -> 2), the task goes on
    simulate_memory(monkeypatch, max_rows=2)
    monkeypatch.setattr(ev, "probe_batch_size", lambda model, n_tokens, kind: 8)
    settings, items = auto_run(model, tmp_path / "halved", "--batch-size", "auto")
    assert all(s["batch_size"] == 8 and s["batch_halved_to"] == 2 for s in settings.values())
    assert auto_run(model, tmp_path / "two", "--batch-size", "2")[1] == items


def test_batch_size_auto_when_one_sequence_does_not_fit(tiny_model_dirs, tmp_path, monkeypatch):
    simulate_memory(monkeypatch, max_rows=0)
    with pytest.raises(common.UserError, match=r"--batch-size auto: one sequence of \d+ tokens does not fit on cpu "
                       r"\(.* GiB free\) with the model in float32; pass --dtype bfloat16"):
        auto_run(tiny_model_dirs["llama"], tmp_path / "out", "--batch-size", "auto")
    assert not (tmp_path / "out" / "m.json").exists()


def worker(mode, argv):
    """03's main; user / crash: rank 1 fails and the others must stop too (the test's timeout catches a hang)."""
    if os.environ.get("RANK") == "1" and mode in ("user", "crash"):
        if mode == "user":
            def unreadable(*args, **kwargs):
                raise common.UserError("xnli zh data unreadable on rank 1")
            ev.TASKS["xnli"].loader = unreadable
        else:
            def crash(*args, **kwargs):
                raise RuntimeError("simulated failure in the middle of a task")
            ev._score_positions = crash
    common.run_main(lambda: ev.main(argv))
    if mode == "threads":
        print(f"rank {os.environ['RANK']}: gloo threads left: {gloo_threads()}", file=sys.stderr)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], sys.argv[3:])
