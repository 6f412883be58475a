"""Tests for 03_evaluate.py: scorers, exact log-likelihoods, batched generation, bootstrap, CLI errors, end to end.

All on the tiny random models of conftest.py (seconds on 2 cores); one @slow test runs the real default model.
"""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import REPO, load_stage, make_tiny_model

ev = load_stage("03_evaluate")


# ----------------------------------------------------------------------------- scorers

def test_qa_f1_normalisation_and_chinese_characters():
    assert ev.qa_f1("The Eiffel Tower!", "eiffel tower", "en") == 1.0  # case, punctuation, article
    assert ev.qa_em("  Paris. ", "paris", "en") == 1.0
    assert ev.qa_f1("Paris France", "Paris", "en") == pytest.approx(2 / 3)
    # zh is scored over characters: 2 of 3 predicted characters are right, 2 of 2 gold characters found
    assert ev.qa_tokens("北京市", "zh") == ["北", "京", "市"]
    assert ev.qa_f1("北京市", "北京", "zh") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert ev.qa_f1("在北京。", "北京", "zh") == pytest.approx(0.8)  # "。" is punctuation, "在" is not gold
    assert ev.qa_tokens("2008年 Olympic", "zh") == ["2008", "年", "olympic"]  # Latin/digit runs stay words
    assert ev.qa_f1("", "北京", "zh") == 0.0
    # MKQA: max over the gold answers; xquad also keeps the harness's own English-rule scorer
    scores = ev.score_qa("戴维·埃德蒙兹", ["大卫", "戴维·埃德蒙兹 "], "zh", "xquad")
    assert scores["f1"] == 1.0 and scores["exact_match"] == 1.0 and "f1_harness" in scores
    assert ev.score_qa("北京市", ["北京"], "zh", "xquad")["f1_harness"] == 0.0  # whole-string tokens there


@pytest.mark.parametrize("text,number", [
    ("The answer is 1,234.", "1234"), ("so she has -5 apples", "-5"), ("It costs 3.5 dollars", "3.5"),
    ("5 + 7 = 12. The answer is 12", "12"), ("答案是 12。", "12"), ("La respuesta es 12", "12"),
    ("1,000,000 people", "1000000"), ("nothing here", None), ("Ответ — 7", "7"), ("答えは18です。", "18"),
])
def test_last_number(text, number):
    assert ev.extract_last_number(text) == number


def test_mgsm_scorers_strict_flexible_last():
    # native CoT strict-match uses each language's own "The answer is" regex (first match)
    s, x = ev.score_math("罗杰有 5 个。答案是 11。", "11", "zh", cot=True)
    assert s == {"strict_match": 1.0, "flexible_extract": 1.0, "last_number": 1.0} and x["strict_match"] == "11"
    s, _ = ev.score_math("La respuesta es 1,234 y luego 5", "1234", "es", cot=True)
    assert s["strict_match"] == 1.0 and s["flexible_extract"] == 0.0 and s["last_number"] == 0.0
    s, _ = ev.score_math("The answer is 12", "12", "en", cot=True)
    assert s["strict_match"] == 1.0
    s, _ = ev.score_math("答案是12", "12", "zh", cot=True)  # the zh regex wants "答案是 N。"
    assert s["strict_match"] == 0.0 and s["last_number"] == 1.0
    # direct: strict = the whole output is the number; flexible ignores "$" and "," like the harness
    s, _ = ev.score_math(" 18", "18", "en", cot=False)
    assert s["strict_match"] == 1.0
    s, _ = ev.score_math(" $1,800 in total", "1800", "en", cot=False)
    assert s["strict_match"] == 0.0 and s["flexible_extract"] == 1.0 and s["last_number"] == 1.0
    s, _ = ev.score_math("It is -3.5 degrees", "-3.5", "en", cot=False)
    assert s["last_number"] == 1.0 and s["flexible_extract"] == 1.0
    assert ev.extract_regex("no digits", ev.FLEXIBLE_REGEX, -1) == "[invalid]"
    assert ev._number_string("8.0") == "8" and ev._number_string("2.5") == "2.5"


def test_mean_and_ratio_stderr():
    mean, se = ev.mean_stderr([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx((1 / 3) ** 0.5 / 2)
    r, se = ev.ratio_stderr([2.0, 4.0], [1, 2])
    assert r == 2.0 and se == 0.0


def test_formats_match_the_harness():
    items, _, _ = ev.load_task("xnli", "zh", _Args(limit=1))
    it = items[0]
    assert it["context"] == "" and it["choices"][0] == "他说，妈妈，我回来了。, 正确? 是的, 校车把他放下后，他立即给他妈妈打了电话。"
    items, _, _ = ev.load_task("xcopa", "zh", _Args(limit=1, split="validation"))
    assert items[0]["context"] == "那人打开水龙头 所以"
    items, _, _ = ev.load_task("mgsm", "zh", _Args(limit=1))
    assert items[0]["prompt"].startswith("问题： 珍妮特") and items[0]["prompt"].endswith("\nAnswer:")
    items, _, _ = ev.load_task("mgsm_cot", "zh", _Args(limit=1, num_fewshot=2))
    assert items[0]["prompt"].count("逐步解答:") == 3 and "答案是 11。" in items[0]["prompt"]
    items, _, _ = ev.load_task("truthfulqa", "zh", _Args(limit=3))
    assert all(it["gold"] == 0 for it in items) and items[0]["context"].endswith("\nA:")


class _Args:
    def __init__(self, **kw):
        self.data_dir, self.split, self.limit, self.num_fewshot = ev.common.DATA_DIR, "default", None, 0
        self.data_source, self.pairs, self.mt_data = "local", None, "ntrex"
        self.__dict__.update(kw)


# ----------------------------------------------------------------------------- the model


def brute_force_loglik(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][len(ctx) - 1:].sum().item()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_batched_loglik_equals_brute_force(arch, tokenizer):
    model = make_tiny_model(arch, tokenizer)
    requests = [("The answer is", [" 42.", " Paris. The", " 你好"]), ("", ["你好，世界。今天", "你好，世界。天气很好"]),
                ("Xin chào thế giới. ", ["Hôm nay", "trời đẹp."]), ("مرحبا", [" بالعالم"]),
                ("What is the capital of France?", [" A", " B", " C", " D"]),
                ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request. What is the capital of France? The answer is", [" 42.", " Paris.", " 你好"])]
    groups = [[ev.encode_request(tokenizer, c, x) for x in conts] for c, conts in requests]
    assert groups[1][0][0] == [tokenizer.eos_token_id]  # empty context: one BOS/EOS prefix token
    assert groups[2][0][1][:1] == tokenizer.encode(" Hôm nay")[:1]  # trailing space moves to the continuation
    if arch != "gemma2":  # the last group takes the shared-prefix path with non-empty suffixes
        seqs = [c + x for c, x in groups[-1]]
        P = ev._common_prefix(seqs)
        assert P >= ev.SHARE_MIN_RATIO * max(len(s) - 1 - P for s in seqs)
    for share in (True, False):
        got = ev.loglikelihoods(model, groups, batch_size=3, share_prefix=share)
        for g_out, group in zip(got, groups):
            for (lp, n), (ctx, cont) in zip(g_out, group):
                assert n == len(cont)
                assert lp == pytest.approx(brute_force_loglik(model, ctx, cont), abs=1e-4)


def test_encode_request_splits_like_lm_eval(tokenizer):
    ctx, cont = ev.encode_request(tokenizer, "The answer is ", "42")
    assert ctx == tokenizer.encode("The answer is") and ctx + cont == tokenizer.encode("The answer is 42")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_left_padded_batched_generation_equals_unbatched(arch, tokenizer):
    model = make_tiny_model(arch, tokenizer)
    prompts = ["The answer is", "你好，世界。今天天气", "Xin chào", "What is the capital of France? Paris. The answer"]
    batched, counts = ev.greedy_generate(model, tokenizer, prompts, 10, ["\n", "。"], batch_size=4)
    single = [ev.greedy_generate(model, tokenizer, [p], 10, ["\n", "。"], batch_size=1)[0][0] for p in prompts]
    assert batched == single and all(1 <= c <= 10 for c in counts)
    # and both equal Hugging Face's own greedy generate, cut at the same stop strings
    for p, text in zip(prompts, batched):
        ids = tokenizer(p, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        ref = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert ev.truncate_at_stops(ref, ["\n", "。"]) == text


def test_generation_stops_at_stop_strings(tokenizer):
    model = make_tiny_model("llama", tokenizer)
    free, _ = ev.greedy_generate(model, tokenizer, ["The answer is"], 20, [], batch_size=1)
    assert len(free[0]) > 2
    stop = free[0][1:3]  # a string the model is known to produce early
    cut, n = ev.greedy_generate(model, tokenizer, ["The answer is"], 20, [stop], batch_size=1)
    assert cut[0] == free[0].split(stop)[0] and n[0] < 20


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token sequence, one token per forward, whatever the input (for stop-string logic)."""

    def __init__(self, script, vocab_size):
        super().__init__()
        from transformers import GenerationConfig, LlamaConfig
        self.script, self.vocab_size, self.step = script, vocab_size, 0
        self.config, self.generation_config = LlamaConfig(max_position_embeddings=512), GenerationConfig()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, **kwargs):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab_size)
        logits[:, :, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        cache = past_key_values or types.SimpleNamespace(batch_select_indices=lambda sel: None)
        return types.SimpleNamespace(logits=logits, past_key_values=cache)


def test_alpaca_style_stops_only_after_the_answer_begins(tokenizer):
    script = tokenizer.encode("\n\nParis\nLondon", add_special_tokens=False)
    harness, _ = ev.greedy_generate(ScriptedLM(script, len(tokenizer)), tokenizer, ["Q"], 20, ["\n"])
    assert harness == [""]  # the harness's rule: the leading newline ends the answer
    alpaca, n = ev.greedy_generate(ScriptedLM(script, len(tokenizer)), tokenizer, ["Q"], 20, ["\n"],
                                   skip_leading_space=True)
    assert alpaca == ["Paris"] and n[0] == len(tokenizer.encode("\n\nParis\n", add_special_tokens=False))


# ----------------------------------------------------------------------------- bootstrap


def test_paired_bootstrap_known_cases():
    import numpy as np
    a = np.array([1.0, 0.0] * 50)
    stat_a = lambda idx: float(a[idx].mean())  # noqa: E731
    delta, p = ev.paired_bootstrap(stat_a, stat_a, len(a), resamples=500, seed=1)
    assert delta == 0.0 and p == pytest.approx(1.0)
    b = np.ones(100)
    delta, p = ev.paired_bootstrap(stat_a, lambda idx: float(b[idx].mean()), 100, resamples=500, seed=1)
    assert delta == pytest.approx(0.5) and p < 0.01
    small = a.copy()
    small[1] = 1.0  # one item differs: no evidence
    delta, p = ev.paired_bootstrap(stat_a, lambda idx: float(small[idx].mean()), 100, resamples=500, seed=1)
    assert delta == pytest.approx(0.01) and p > 0.2


# ----------------------------------------------------------------------------- CLI


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "03_evaluate.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--tasks", "xnli,nope", "--langs", "zh"], "unknown task"),
    (["--tasks", "xnli", "--langs", "klingon"], "unknown language"),
    (["--tasks", "xcopa", "--langs", "ar"], "xcopa has no data for ar; its languages"),
    (["--tasks", "xnli", "--langs", "zh", "--data-dir", "{empty}"], "file not found"),
    (["--tasks", "xnli", "--langs", "zh", "--limit", "0"], "--limit"),
    (["--tasks", "xnli", "--langs", "zh", "--model", "{noweights}"], "not a model folder"),
    (["--tasks", "nll", "--langs", "zh"], "--pairs"),
    (["--tasks", "xnli", "--langs", "zh", "--num-fewshot", "2"], "--num-fewshot"),
])
def test_cli_errors(args, message, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    out = tmp_path / "out"
    args = [a.format(empty=tmp_path / "empty", noweights=tmp_path / "noweights") for a in args]
    r = run_cli(*args, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not os.listdir(out)


def test_cli_end_to_end_and_compare(tiny_model_dirs, tmp_path):
    out = tmp_path / "eval"
    model = tiny_model_dirs["llama"]
    r = run_cli("--model", model, "--run-name", "tiny", "--tasks", "xnli,mgsm,xquad", "--langs", "zh,vi",
                "--limit", "4", "--max-new-tokens", "6", "--batch-size", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "skipped: mgsm vi" in r.stdout
    run = json.load(open(out / "tiny.json"))
    assert run["model"] == model and "torch" in run["versions"]
    for task, lang in [("xnli", "zh"), ("xnli", "vi"), ("mgsm", "zh"), ("xquad", "zh"), ("xquad", "vi")]:
        e = run["results"][task][lang]
        assert e["n"] == 4 and e["stderr"] is not None and e["metric"] and e["scorer"]
        assert len(e["data_sha256"]) == 64 and e["settings"]["limit"] == 4
        rows = [json.loads(line) for line in open(out / e["items_file"])]
        assert len(rows) == 4 and all("gold" in row and "correct" in row for row in rows)
    assert run["results"]["mgsm"]["zh"]["metric"] == "flexible_extract"
    assert set(run["results"]["mgsm"]["zh"]["metrics"]) == {"strict_match", "flexible_extract", "last_number"}
    assert run["results"]["xnli"]["zh"]["harness_task"] == "xnli_zh"
    row = json.loads(open(out / "tiny.xnli.zh.jsonl").readline())
    assert len(row["loglikelihoods"]) == 3 and row["pred"] in (0, 1, 2)
    md = open(out / "results.md").read()
    assert "| tiny |" in md and "xnli zh" in md and "±" in md
    # a second model adds a row; comparing a run with itself gives p = 1
    r = run_cli("--model", model, "--run-name", "tiny2", "--tasks", "xnli", "--langs", "zh", "--limit", "4",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "| tiny2 |" in open(out / "results.md").read() and "| tiny |" in open(out / "results.md").read()
    r = run_cli("--compare", str(out / "tiny.json"), str(out / "tiny2.json"), "--bootstrap", "200")
    assert r.returncode == 0, r.stderr
    comp = json.load(open(out / "compare_tiny_vs_tiny2.json"))
    assert comp["rows"][0]["delta"] == 0.0 and comp["rows"][0]["p"] == pytest.approx(1.0)


def test_nll_and_translation_tasks(tiny_model_dirs, tokenizer, tmp_path):
    pairs = tmp_path / "dev.jsonl"
    rows = [dict(id=i, lang="zh", source="t", x_en=f"Say {i}", y_en=f"{i}", x_tgt=f"说 {i}", y_tgt=f"{i}。")
            for i in range(3)]
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "eval"
    r = run_cli("--model", tiny_model_dirs["gpt2"], "--tasks", "nll,translation", "--langs", "zh,en",
                "--pairs", str(pairs), "--limit", "3", "--max-new-tokens", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    name = os.path.basename(tiny_model_dirs["gpt2"])
    run = json.load(open(out / f"{name}.json"))
    nll = run["results"]["nll"]["zh"]
    assert nll["higher_is_better"] is False and nll["score"] > 0 and nll["n"] == 3
    # the nll task scores exactly the training layout: each item's NLL equals 02's TFT loss for that pair
    from transformers import AutoModelForCausalLM
    train = load_stage("02_train_dft")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])
    items = {item["id"]: item for item in map(json.loads, open(out / f"{name}.nll.zh.jsonl"))}
    for row in rows:
        seq = train.encode_sequence(tokenizer, row["x_tgt"], row["y_tgt"], add_eos=True)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([seq["input_ids"]]), labels=torch.tensor([seq["labels"]])).loss
        assert items[row["id"]]["scores"]["nll"] == pytest.approx(loss.item(), rel=1e-5)
    assert set(run["results"]["translation"]) == {"en-zh", "zh-en"}
    assert "zh" in run["results"]["translation"]["en-zh"]["metrics"]["bleu"]["signature"]
    # the paired bootstrap also handles the ratio (NLL) and corpus (BLEU) statistics
    r = run_cli("--compare", str(out / f"{name}.json"), str(out / f"{name}.json"), "--bootstrap", "100")
    assert r.returncode == 0, r.stderr
    comp = json.load(open(out / f"compare_{name}_vs_{name}.json"))
    assert {(row["task"], row["lang"]) for row in comp["rows"]} == {("nll", "zh"), ("nll", "en"),
                                                                    ("translation", "en-zh"), ("translation", "zh-en")}
    assert all(row["delta"] == 0.0 and row["p"] == pytest.approx(1.0) for row in comp["rows"])


def test_alpaca_prompt_style():
    args = ev.parse_args(["--out", "x", "--prompt-style", "alpaca"])
    assert ev.wrap_prompt("问题： 1+1?\nAnswer:", args) == ev.common.build_prompt("问题： 1+1?\nAnswer:")
    stops, max_new = ev.generation_setup("mgsm", "zh", args)
    assert stops[0] == "问题：" and "\n### " in stops and max_new == 256


@pytest.mark.slow
def test_real_default_model_few_items(tmp_path):
    r = run_cli("--tasks", "xnli,mgsm", "--langs", "zh", "--limit", "3", "--max-new-tokens", "16",
                "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    run = json.load(open(tmp_path / "SmolLM2-135M-Instruct.json"))
    assert run["results"]["xnli"]["zh"]["n"] == 3


def test_analysis_layers_json_and_png(tiny_model_dirs, tmp_path):
    out = tmp_path / "an"
    r = run_cli("--analysis", "layers", "--model", tiny_model_dirs["llama"], tiny_model_dirs["gpt2"],
                "--run-name", "before", "after", "--langs", "zh", "--analysis-samples", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.load(open(out / "before.layers.zh.json"))
    L = 4
    for key in ("entropy", "mass_en", "mass_tgt", "top1_en", "top1_tgt", "cosine_en_tgt"):
        assert len(res[key]) == L, key
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in res["mass_en"] + res["mass_tgt"])
    assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in res["cosine_en_tgt"])
    assert res["n_sentences"] == 4 and len(res["data_sha256"]) == 64
    assert (out / "after.layers.zh.json").exists() and (out / "layers.zh.png").stat().st_size > 1000
