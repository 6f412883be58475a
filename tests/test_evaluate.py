"""Tests for 03_evaluate.py: scorers, exact log-likelihoods, batched generation, bootstrap, CLI errors, end to end.

All on the tiny random models of conftest.py (seconds on 2 cores); one @slow test runs the real default model.
"""
import json
import os
import re
import types

import pytest
import torch

import common
from conftest import load_stage, make_tiny_model, run_main_in_process, run_stage

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
    # ours (f1_lang) takes the max over gold answers; xquad's f1 is the harness's (first answer, English rules)
    scores = ev.score_qa("戴维·埃德蒙兹", ["大卫", "戴维·埃德蒙兹 "], "zh", harness=None)
    assert scores == {"f1_lang": 1.0, "exact_match_lang": 1.0}  # mkqa has no harness task: ours only
    scores = ev.score_qa("北京市", ["北京"], "zh", "xquad")
    assert scores["f1"] == 0.0 and scores["f1_lang"] == pytest.approx(0.8)  # whole-string tokens there


# (language, prediction, gold answers, harness xquad f1/EM, harness mlqa f1/EM): values computed by
# lm-evaluation-harness 0.4.13's own xquad/utils.py (with transformers 4.x squad_metrics) and mlqa/utils.py
HARNESS_QA = [
    ("zh", " 北京市", ["北京"], (0.0, 0.0), (0.8, 0.0)),
    ("zh", "在北京。", ["北京", "中国北京"], (0.0, 0.0), (0.8, 0.0)),
    ("zh", "2008年 Olympic", ["2008年"], (2 / 3, 0.0), (0.8, 0.0)),
    ("zh", "戴维·埃德蒙兹", ["戴维·埃德蒙兹 "], (1.0, 1.0), (1.0, 1.0)),
    ("vi", "của 308", ["308"], (2 / 3, 0.0), (1.0, 1.0)),
    ("vi", "những con mèo", ["con mèo đen"], (2 / 3, 0.0), (0.8, 0.0)),
    ("ar", "القاهرة", ["في القاهرة"], (2 / 3, 0.0), (2 / 3, 0.0)),
    ("ar", "«مصر»", ["مصر"], (0.0, 0.0), (1.0, 1.0)),
    ("en", "The Eiffel Tower!", ["eiffel tower"], (1.0, 1.0), (1.0, 1.0)),
    ("en", "", ["Paris"], (0.0, 0.0), (0.0, 0.0)),
    ("en", "Paris France", ["Paris", "France"], (2 / 3, 0.0), (2 / 3, 0.0)),
]


@pytest.mark.parametrize("lang,pred,golds,xquad,mlqa", HARNESS_QA)
def test_qa_f1_exact_match_equal_the_harness(lang, pred, golds, xquad, mlqa):
    s = ev.score_qa(pred, golds[:1], lang, "xquad")  # xquad items carry the first answer only
    assert (s["f1"], s["exact_match"]) == pytest.approx(xquad)
    s = ev.score_qa(pred, golds, lang, "mlqa")
    assert (s["f1"], s["exact_match"]) == pytest.approx(mlqa)


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
    (r,), (se,) = common.mean_and_se_over_sentences(torch.tensor([[2.0], [4.0]]), torch.tensor([1, 2]))
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
        self.data_source, self.pairs, self.mt_data, self.math_shots = "local", None, "ntrex", "harness"
        self.__dict__.update(kw)


# Built by lm-evaluation-harness 0.4.13 itself (mgsm_direct_zh / mgsm_native_cot_zh / ..._en with the shipped
# exemplars as its train split, num_fewshot=2, fewshot seed 1234, TaskManager + build_all_requests): the
# exemplar ids its sampler drew for items 0, 1, 2, and two whole request strings.
HARNESS_MGSM_2SHOT_IDS = [[8, 1], [1, 8], [1, 6]]
HARNESS_MGSM_DIRECT_ZH_0 = (
    "问题：如果停车场里有 3 辆车，又来了 2 辆车，停车场里有多少辆车？\nAnswer:5\n\n"
    "问题：罗杰有 5 个网球。他又买了 2 罐网球。每罐有 3 个网球。他现在有多少个网球？\nAnswer:11\n\n"
    "问题： 珍妮特的鸭子每天下 16 颗蛋。她每天早上早餐时吃 3 颗，每天用 4 颗为自己的朋友做松饼。剩下的鸭蛋她每天拿去农贸市场卖，"
    "每颗新鲜鸭蛋卖 2 美元。她每天在农贸市场赚多少钱？\nAnswer:")
HARNESS_MGSM_COT_ZH_1 = (  # answer[6:] drops the answers' first character: "罗杰一开始" -> "杰一开始", "一开始" -> "开始"
    "问题：罗杰有 5 个网球。他又买了 2 罐网球。每罐有 3 个网球。他现在有多少个网球？\n"
    "逐步解答: 杰一开始有 5 个球。2 罐各 3 个网球就是 6 个网球。5 + 6 = 11。答案是 11。\n\n"
    "问题：如果停车场里有 3 辆车，又来了 2 辆车，停车场里有多少辆车？\n"
    "逐步解答: 开始有 3 辆车，又来了 2 辆，所以现在应该有 3 + 2 = 5 辆车。答案是 5。\n\n"
    "问题： 制作一件袍子需要 2 匹蓝色纤维布料和这个数量一半的白色纤维布料。它一共需要用掉多少匹布料？\n逐步解答:")
HARNESS_MGSM_COT_EN_0_SHOTS = (
    "Question: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?\n"
    "Step-by-Step Answer: There are 3 cars in the beginning, 2 more arrive, so now there should be 3 + 2 = 5 cars. "
    "The answer is 5.\n\nQuestion: Roger has 5 tennis balls. He buys 2 more cans of tennis balls. Each can has 3 "
    "tennis balls. How many tennis balls does he have now?\nStep-by-Step Answer: Roger started with 5 balls. 2 cans "
    "of 3 tennis balls each is 6 tennis balls. 5 + 6 = 11. The answer is 11.\n\n")


def test_mgsm_fewshot_prompts_equal_the_harness():
    items, _, _ = ev.load_task("mgsm", "zh", _Args(limit=3, num_fewshot=2))
    assert items[0]["prompt"] == HARNESS_MGSM_DIRECT_ZH_0
    items, _, _ = ev.load_task("mgsm_cot", "zh", _Args(limit=3, num_fewshot=2))
    assert items[1]["prompt"] == HARNESS_MGSM_COT_ZH_1
    items, _, _ = ev.load_task("mgsm_cot", "en", _Args(limit=3, num_fewshot=2))
    assert items[0]["prompt"].startswith(HARNESS_MGSM_COT_EN_0_SHOTS)
    # which exemplars each item gets: one seeded sampler for the task, drawn per item in order
    questions = {r["q"]: r["id"] for r in ev.common.read_jsonl(os.path.join(ev.common.DATA_DIR, "mgsm",
                                                                          "mgsm_exemplars.jsonl")) if r["lang"] == "en"}
    drawn = [[questions[shot.split("\n")[0]] for shot in it["prompt"].split("\n\n")[:-1]] for it in items]
    assert drawn == HARNESS_MGSM_2SHOT_IDS
    # a --limit does not change an item's shots (the harness draws for items in order either way)
    assert ev.load_task("mgsm_cot", "en", _Args(limit=1, num_fewshot=2))[0][0]["prompt"] == items[0]["prompt"]
    # --math-shots first-k: the first k exemplars for every item, "Answer: 11" with a space, the cue kept whole
    items, _, _ = ev.load_task("mgsm", "zh", _Args(limit=2, num_fewshot=2, math_shots="first-k"))
    assert items[0]["prompt"].startswith("问题：罗杰有 5 个网球。") and "\nAnswer: 11\n\n" in items[0]["prompt"]
    assert items[0]["prompt"].split("问题： ")[0] == items[1]["prompt"].split("问题： ")[0]
    items, _, _ = ev.load_task("mgsm_cot", "zh", _Args(limit=1, num_fewshot=1, math_shots="first-k"))
    assert items[0]["prompt"].startswith("问题：罗杰有 5 个网球。他又买了 2 罐网球。每罐有 3 个网球。他现在有多少个网球？\n逐步解答:罗杰")


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


def test_truthfulqa_ties_resolve_as_the_harness_argmax(monkeypatch, tokenizer):
    """acc: the first of tied maxima (np.argmax; the correct choice is stored first); acc_strict: a tie is wrong."""
    items = [dict(id=0, context="Q: x\nA:", choices=["a", "a"], gold=0),  # identical choices: tied for any model
             dict(id=1, context="Q: y\nA:", choices=["b", "c", "d"], gold=0),
             dict(id=2, context="Q: z\nA:", choices=["e", "f"], gold=0)]
    lls = [[(-1.0, 1), (-1.0, 1)], [(-3.0, 1), (-1.0, 1), (-2.0, 1)], [(-0.5, 1), (-2.0, 1)]]
    monkeypatch.setattr(ev, "loglikelihoods", lambda *a, **k: lls)
    args = ev.parse_args(["--out", "x"])
    entry, rows = ev.evaluate(None, tokenizer, "truthfulqa", "zh", items, args)
    assert [r["scores"]["acc"] for r in rows] == [1.0, 0.0, 1.0] and [r["pred"] for r in rows] == [0, 1, 0]
    assert [r["scores"]["acc_strict"] for r in rows] == [0.0, 0.0, 1.0]
    assert entry["metric"] == "acc" and entry["score"] == pytest.approx(2 / 3) and entry["ties"] == 1
    assert entry["metrics"]["acc_strict"]["score"] == pytest.approx(1 / 3)
    assert entry["top_prediction"] == {"value": 0, "share": pytest.approx(2 / 3)}
    entry, _ = ev.evaluate(None, tokenizer, "xnli", "zh", items, args)  # other tasks: acc only
    assert set(entry["metrics"]) == {"acc"}


def test_dtype_auto_resolves_by_native_bf16(monkeypatch, capsys):
    monkeypatch.setattr(ev.common, "native_bf16", lambda device: True)
    assert ev.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(ev.common, "native_bf16", lambda device: False)
    assert ev.resolve_dtype("auto", "cpu") == "float32" and ev.resolve_dtype("float32", "cpu") == "float32"
    assert capsys.readouterr().out == ""
    assert ev.resolve_dtype("bfloat16", "cpu") == "bfloat16" and "emulated" in capsys.readouterr().out
    assert ev.resolve_dtype("float16", "cpu") == "float16" and "float16 on a CPU" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bootstrap


def test_paired_bootstrap_known_cases():
    def cell(values):
        return common.ItemCell([dict(id=i, scores=dict(acc=v)) for i, v in enumerate(values)], "acc", percent=False)

    def compare(a, b):
        res = common.contrast_bootstrap([(-1.0, [cell(a)]), (1.0, [cell(b)])], 500, 1, draws="indices")
        return res["delta"], res["p"]
    a = [1.0, 0.0] * 50
    delta, p = compare(a, a)
    assert delta == 0.0 and p == pytest.approx(1.0)
    delta, p = compare(a, [1.0] * 100)
    assert delta == pytest.approx(0.5) and p < 0.01
    small = list(a)
    small[1] = 1.0  # one item differs: no evidence
    delta, p = compare(a, small)
    assert delta == pytest.approx(0.01) and p > 0.2


def test_holm_and_p_at_the_floor():
    adj = common.holm([0.01, 0.04, 0.03, 0.5])
    assert [p for p, _ in adj] == pytest.approx([0.04, 0.09, 0.09, 0.5]) and all(k is None for _, k in adj)
    floor = 1 / 10001
    adj = common.holm([floor, 0.2, floor], [True, False, True])
    assert adj[0] == (pytest.approx(3 * floor), 3) and adj[2] == (pytest.approx(3 * floor), 3)
    assert adj[1] == (pytest.approx(0.2), None)
    assert common.fmt_p(floor, 10000, 1) == "< 1/10001" and common.fmt_p(0.03, 10000) == "0.0300"


def _write_run(folder, name, cells):
    """A run JSON and its per-item files: cells = {(task, lang): (per-item 0/1 scores, split, sha)}."""
    results = {}
    for (task, lang), (values, split, sha) in cells.items():
        items_file = f"{name}.{task}.{lang}.jsonl"
        with open(os.path.join(folder, items_file), "w") as f:
            for i, v in enumerate(values):
                f.write(json.dumps(dict(id=i, pred=int(v), gold=1, scores={"acc": float(v)})) + "\n")
        results.setdefault(task, {})[lang] = dict(
            metric="acc", score=sum(values) / len(values), stderr=0.01, aggregation="mean", n=len(values),
            items_file=items_file, data_file=f"{task}/{split}-{lang}.tsv", data_sha256=sha, split=split,
            settings=dict(dtype="float32"), top_prediction=dict(value=1, share=sum(values) / len(values)))
    path = os.path.join(folder, f"{name}.json")
    ev.common.write_json(path, dict(format="dft-eval-run/1", run=name, model=name, results=results))
    return path


def test_compare_holm_floor_and_mismatch_refusal(tmp_path):
    vi = ("xnli", "vi")
    zh_cell = ("xnli", "zh")
    a = _write_run(tmp_path, "a", {zh_cell: ([0] * 60, "validation", "s1"), vi: ([0, 1] * 30, "validation", "s2")})
    b = _write_run(tmp_path, "b", {zh_cell: ([1] * 60, "validation", "s1"), vi: ([1, 0] * 30, "validation", "s2")})
    rows = ev.compare_runs(a, b, str(tmp_path), 200, 0)
    zh = next(r for r in rows if r["lang"] == "zh")
    assert zh["p_at_floor"] and zh["p_holm_is_bound"] and zh["p_holm"] == pytest.approx(2 / 201)
    md = open(tmp_path / "compare_a_vs_b.md").read()
    assert "| xnli | zh | acc | 0.00 | 100.00 | +100.00 | < 1/201 | < 2/201 | 60 |" in md
    # a cell on another split / data file / item set is refused, every such cell listed, unless overridden
    c = _write_run(tmp_path, "c", {("xnli", "zh"): ([1] * 50, "test", "s9"), vi: ([1, 0] * 30, "validation", "s2")})
    with pytest.raises(ev.UserError, match=r"1 cell\(s\):\n  xnli zh: data file .*split \(validation vs test\); "
                                           r"item set"):
        ev.compare_runs(a, c, str(tmp_path), 200, 0)
    rows = ev.compare_runs(a, c, str(tmp_path), 200, 0, allow_mismatch=True)
    assert next(r for r in rows if r["lang"] == "zh")["n"] == 50
    assert "**--allow-mismatch**" in open(tmp_path / "compare_a_vs_c.md").read()


def test_nll_ids_are_per_language(tmp_path):
    """Dev files of two languages joined (01 numbers some sources' ids per language, e.g. tatoeba-7 in each): every
    target cell keeps its ids; the English cell, whose texts come from both, tells a repeated id by its language."""
    rows = [dict(id=f"t-{i}", lang=lang, x_en=f"{lang} en {i}", y_en="y", x_tgt=f"{lang} {i}", y_tgt="z")
            for lang in ("de", "fr") for i in range(3)]
    pairs = tmp_path / "dev.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = types.SimpleNamespace(pairs=str(pairs))
    assert [i["id"] for i in ev.load_nll(args, "fr", "dev", False)[0]] == ["t-0", "t-1", "t-2"]
    assert [i["id"] for i in ev.load_nll(args, "en", "dev", False)[0]] == ["t-0", "t-1", "t-2", "t-0@fr", "t-1@fr",
                                                                           "t-2@fr"]


def test_compare_names_the_cells_of_one_run_only(tmp_path):
    a = _write_run(tmp_path, "a", {("xnli", "zh"): ([0, 1] * 5, "validation", "s1"), ("xnli", "vi"): ([1] * 4, "v", "s")})
    b = _write_run(tmp_path, "b", {("xnli", "zh"): ([1, 1] * 5, "validation", "s1"), ("xcopa", "zh"): ([1] * 4, "t", "s")})
    ev.compare_runs(a, b, str(tmp_path), 200, 0)
    assert "evaluated in one run only: xnli vi (A only), xcopa zh (B only)." in open(tmp_path / "compare_a_vs_b.md").read()
    assert json.load(open(tmp_path / "compare_a_vs_b.json"))["one_sided"] == ["xnli vi (A only)", "xcopa zh (B only)"]


def test_compare_refuses_a_cell_whose_items_repeat_an_id(tmp_path):
    """Items are paired by id: a repeated id (a hand-written pairs file) would pair the wrong items silently."""
    a = _write_run(tmp_path, "a", {("xnli", "zh"): ([0, 1, 1], "validation", "s1")})
    b = _write_run(tmp_path, "b", {("xnli", "zh"): ([1, 1, 0], "validation", "s1")})
    for run in ("a", "b"):  # both evaluated on one pairs file whose ids are 0, 1, 1
        rows = [json.loads(line) for line in open(tmp_path / f"{run}.xnli.zh.jsonl")]
        with open(tmp_path / f"{run}.xnli.zh.jsonl", "w") as f:
            f.writelines(json.dumps(dict(r, id=min(r["id"], 1))) + "\n" for r in rows)
    with pytest.raises(ev.UserError, match=r"item id 1 appears more than once in a\.xnli\.zh\.jsonl.s per-item rows"):
        ev.compare_runs(a, b, str(tmp_path), 200, 0)


def test_a_model_folder_is_the_same_model_however_it_is_spelt(tmp_path, monkeypatch):
    (tmp_path / "runs" / "tft").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert ev.same_model("runs/tft", "runs/tft/") and ev.same_model("runs/tft", str(tmp_path / "runs" / "tft"))
    assert ev.same_model("org/name", "org/name") and not ev.same_model("org/name", "org/other")
    assert not ev.same_model(None, "runs/tft") and not ev.same_model("runs/tft", "runs")


def test_results_table_nlu_average_and_degenerate_mark(tmp_path):
    runs = [dict(run="m", results={
        "xnli": {"zh": dict(score=0.4, stderr=0.01, aggregation="mean", settings=dict(dtype="bfloat16"),
                            top_prediction=dict(value=0, share=0.95)),
                 "en": dict(score=0.9, stderr=0.01, aggregation="mean", settings=dict(dtype="bfloat16"))},
        "mmlu": {"zh": dict(score=0.3, stderr=0.01, aggregation="mean", settings=dict(dtype="bfloat16"),
                            top_prediction=dict(value=0, share=0.5))},
        "xquad": {"zh": dict(score=0.1, stderr=0.01, aggregation="mean", settings=dict(dtype="bfloat16"))}})]
    table = ev.results_table(runs)
    header, _, row = table.splitlines()[:3]
    assert header == "| run | dtype | xnli en | xnli zh | mmlu zh | xquad zh | NLU avg |"
    # the NLU average leaves out English and the QA cell: (40 + 30) / 2; the degenerate xnli zh cell is marked
    assert row == "| m | bfloat16 | 90.00 ± 1.00 | 40.00 ± 1.00 ⚠ | 30.00 ± 1.00 | 10.00 ± 1.00 | 35.00 |"
    assert "paper's NLU average" in table and "avg" not in header.replace("NLU avg", "")


# ----------------------------------------------------------------------------- CLI


CLI_ERRORS = [
    (["--tasks", "xnli,nope", "--langs", "zh"], "unknown task"),
    (["--tasks", "xnli", "--langs", "klingon"], "unknown language"),
    (["--tasks", "xcopa", "--langs", "ar"], "xcopa has no data for ar; its languages"),
    (["--tasks", "xnli", "--langs", "zh", "--data-dir", "{empty}"], "xnli's data is read from --data-dir"),
    (["--tasks", "nll", "--langs", "zh", "--pairs", "{empty}"], "is a folder, not a file"),
    (["--tasks", "nll", "--langs", "zh", "--pairs", "{nolang}"], "missing field(s) ['lang']"),
    (["--tasks", "nll", "--langs", "zh", "--pairs", "{noid}"], "line 2: missing field(s) ['id']"),
    (["--tasks", "nll", "--langs", "zh", "--pairs", "{dupid}"], "line 2: id 'a' of zh appears again (first at line 1"),
    (["--analysis", "layers", "--langs", "zh", "--pairs", "{nolang}"], "line 1: missing field(s) ['lang']"),
    (["--tasks", "nll", "--langs", "zh", "--pairs", "{afile}"], "holds no pairs: pass the dev pairs"),
    (["--tasks", "xnli", "--langs", "zh", "--out", "{afile}"], "is a file; give a folder"),
    (["--tasks", "xnli", "--langs", "zh", "--limit", "0"], "--limit"),
    (["--tasks", "xnli", "--langs", "zh", "--model", "{noweights}"], "not a model folder"),
    (["--tasks", "nll", "--langs", "zh"], "--pairs"),
    (["--tasks", "xnli", "--langs", "zh", "--num-fewshot", "2"], "--num-fewshot"),
]


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    (tmp_path / "nolang.jsonl").write_text(json.dumps(dict(id=1, x_en="a", y_en="b", x_tgt="c", y_tgt="d")) + "\n")
    pair = dict(id="a", lang="zh", x_en="a", y_en="b", x_tgt="c", y_tgt="d")
    (tmp_path / "noid.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "id": None}) + "\n")
    (tmp_path / "dupid.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "x_tgt": "e"}) + "\n")
    (tmp_path / "afile").write_text("")
    out = tmp_path / "out"  # every case refuses before writing anything, so they share it (a case's own --out wins)
    names = dict(empty=tmp_path / "empty", noweights=tmp_path / "noweights", nolang=tmp_path / "nolang.jsonl",
                 afile=tmp_path / "afile", noid=tmp_path / "noid.jsonl", dupid=tmp_path / "dupid.jsonl")
    runs = [["--out", str(out)] + [a.format(**names) for a in args] for args, _ in CLI_ERRORS]
    r = run_stage("03_evaluate.py", *runs[0])  # the command line itself; the others through common.run_main here
    results = [(r.returncode, r.stderr)] + [run_main_in_process(ev.main, argv, capsys) for argv in runs[1:]]
    for (args, message), (code, stderr) in zip(CLI_ERRORS, results):
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in stderr, (args, stderr)
    assert not out.exists() or not os.listdir(out)


def test_model_folder_without_tokenizer_is_one_clear_error(tokenizer, tmp_path):
    folder = tmp_path / "weights-only"
    make_tiny_model("gpt2", tokenizer).save_pretrained(folder)  # config + weights, no tokenizer files
    out = tmp_path / "out"
    # before any model loads or anything is written (the exit code and message: common.run_main, test_cli_errors)
    with pytest.raises(common.UserError, match=f"{folder} has no tokenizer files .*tokenizer.json"):
        ev.main(["--model", str(folder), "--tasks", "xnli", "--langs", "zh", "--limit", "1", "--out", str(out)])
    assert not out.exists() or not os.listdir(out)
    with pytest.raises(common.UserError, match="has no tokenizer files"):
        common.load_model_and_tokenizer(str(folder))  # what every stage calls


# ----------------------------------------------------------------------------- every row of TASKS


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    return make_tiny_model("llama", tokenizer)


def test_help_lists_every_row_of_tasks():
    """03 --help's task list is written by hand (prompt formats): a row added to TASKS must be described there."""
    block = ev.__doc__.split("Tasks, one row of TASKS each")[1].split("Metrics named")[0]
    named = {name + cot for name, both in re.findall(r"^  (\w+)(\(_cot\))?", block, re.M)
             for cot in ("", "_cot")[:1 + bool(both)]}
    assert named == set(ev.TASKS)


@pytest.mark.parametrize("task", list(ev.TASKS))
def test_every_task_runs_every_language_of_its_data(task, tiny_llama, tokenizer, tmp_path, monkeypatch):
    """Two items of every language of the row (shipped data; nll: a small pairs file; translation: NTREX and
    Tatoeba, both directions) through the plan, the loader and the row's runner on a tiny model."""
    spec = ev.TASKS[task]
    bootstrap = common.bootstrap_se  # BLEU's 1000 resamples per cell would be most of this test's time
    monkeypatch.setattr(common, "bootstrap_se", lambda cell, resamples, seed: bootstrap(cell, 20, seed))
    every = sorted(common.LANGUAGES)
    pairs = tmp_path / "dev.jsonl"
    pairs.write_text("".join(json.dumps(dict(id=f"{l}{i}", lang=l, source="t", x_en=f"Say {i}", y_en=f"{i}.",
                                             x_tgt=f"{l} {i}", y_tgt=f"{i} {l}")) + "\n"
                             for l in every if l != "en" for i in range(2)))
    for mt_data in ("ntrex", "tatoeba") if isinstance(spec, ev.TranslationTask) else ("ntrex",):
        args = ev.parse_args(["--tasks", task, "--langs", ",".join(every), "--limit", "2", "--max-new-tokens", "3",
                              "--mt-data", mt_data, "--pairs", str(pairs), "--out", str(tmp_path)])
        ev.check_args(args)
        combos, _ = ev.plan(args)
        langs = spec.languages(args)
        assert langs and combos == [(task, l, d) for l in langs for d in spec.directions]
        for (_, lang, direction), (items, src, split) in ev.load_all(combos, args).items():
            assert len(items) == 2 and os.path.exists(common.resolve_path(src)) and split in spec.splits
            entry, rows = ev.evaluate(tiny_llama, tokenizer, task, lang, items, args, direction)
            assert [r["id"] for r in rows] == [it["id"] for it in items] and entry["n"] == 2
            assert entry["metric"] == spec.metric and entry["scorer"] == spec.scorer
            assert entry["score"] == entry["metrics"][spec.metric]["score"]
            for r in rows:
                if isinstance(spec, ev.MultipleChoiceTask):
                    assert r["pred"] == ev.choose(r["loglikelihoods"]) and r["correct"] == (r["pred"] == r["gold"])
                elif isinstance(spec, ev.NllTask):
                    assert r["scores"]["nll"] == pytest.approx(r["nll_sum"] / r["n_tokens"])
                else:
                    assert r["n_new_tokens"] <= 3 and entry["max_new_tokens"] == 3
                    if isinstance(spec, ev.TranslationTask):
                        assert r["tgt_lang"] == entry["tgt_lang"] == (lang if direction == "en-xx" else "en")
                    else:
                        assert r["correct"] == (r["scores"][spec.correct] == 1.0)


def test_cli_end_to_end_and_compare(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "eval"
    model = tiny_model_dirs["llama"]
    r = run_stage("03_evaluate.py", "--model", model, "--run-name", "tiny", "--tasks", "xnli,mgsm,xquad",
                  "--langs", "zh,vi", "--limit", "4", "--max-new-tokens", "6", "--batch-size", "4", "--out", str(out))
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
    native = ev.common.native_bf16("cpu")
    assert run["results"]["xnli"]["zh"]["settings"]["dtype"] == ("bfloat16" if native else "float32")
    assert run["results"]["xnli"]["zh"]["settings"]["dtype_requested"] == "auto"
    assert 0 < run["results"]["xnli"]["zh"]["top_prediction"]["share"] <= 1
    row = json.loads(open(out / "tiny.xnli.zh.jsonl").readline())
    assert len(row["loglikelihoods"]) == 3 and row["pred"] in (0, 1, 2)
    md = open(out / "results.md").read()
    assert "| tiny |" in md and "xnli zh" in md and "±" in md
    # a second model adds a row; the same items of XNLI's test split (own folder: results.md has one writer); these
    # go through common.run_main in this process, as the command line above does in its own
    test_out = tmp_path / "eval_test"
    for argv in (["--model", model, "--run-name", "tiny2", "--tasks", "xnli", "--langs", "zh", "--limit", "4", "--out", str(out)],
                 ["--model", model, "--run-name", "tiny_test", "--tasks", "xnli", "--langs", "zh", "--limit", "4",
                  "--split", "test", "--out", str(test_out)]):
        code, stderr = run_main_in_process(ev.main, argv, capsys)
        assert code == 0, stderr
    assert "| tiny2 |" in open(out / "results.md").read() and "| tiny |" in open(out / "results.md").read()
    # comparing a run with itself gives p = 1; --compare refuses the validation-vs-test pair
    code, stderr = run_main_in_process(ev.main, ["--compare", str(out / "tiny.json"), str(out / "tiny2.json"),
                                                 "--bootstrap", "200"], capsys)
    assert code == 0, stderr
    comp = json.load(open(out / "compare_tiny_vs_tiny2.json"))
    assert comp["rows"][0]["delta"] == 0.0 and comp["rows"][0]["p"] == pytest.approx(1.0)
    assert comp["rows"][0]["p_holm"] == pytest.approx(1.0) and comp["mismatches"] == []
    code, stderr = run_main_in_process(ev.main, ["--compare", str(out / "tiny2.json"), str(test_out / "tiny_test.json"),
                                                 "--bootstrap", "200"], capsys)
    assert code == 2 and "not comparable in 1 cell(s)" in stderr and "Traceback" not in stderr
    assert "xnli zh: data file (xnli/dev-zh.tsv" in stderr and "split (validation vs test)" in stderr
    assert not (test_out / "compare_tiny2_vs_tiny_test.json").exists()
    r = run_stage("03_evaluate.py", "--compare", str(out / "tiny2.json"), str(test_out / "tiny_test.json"),
                  "--bootstrap", "200", "--allow-mismatch")
    assert r.returncode == 0, r.stderr
    assert "--allow-mismatch" in r.stdout and "| xnli | zh (mismatch) |" in r.stdout
    comp = json.load(open(test_out / "compare_tiny2_vs_tiny_test.json"))
    assert comp["allow_mismatch"] and "split (validation vs test)" in comp["mismatches"][0]


def test_nll_and_translation_tasks(tiny_model_dirs, tokenizer, tmp_path, capsys):
    pairs = tmp_path / "dev.jsonl"
    rows = [dict(id=i, lang="zh", source="t", x_en=f"Say {i}", y_en=f"{i}", x_tgt=f"说 {i}", y_tgt=f"{i}。")
            for i in range(3)]
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "eval"
    r = run_stage("03_evaluate.py", "--model", tiny_model_dirs["gpt2"], "--tasks", "nll,translation", "--langs", "zh,en",
                  "--pairs", str(pairs), "--limit", "3", "--max-new-tokens", "4", "--dtype", "float32", "--out", str(out))
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
    code, stderr = run_main_in_process(ev.main, ["--compare", str(out / f"{name}.json"), str(out / f"{name}.json"),
                                                 "--bootstrap", "100"], capsys)
    assert code == 0, stderr
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
    r = run_stage("03_evaluate.py", "--tasks", "xnli,mgsm", "--langs", "zh", "--limit", "3", "--max-new-tokens", "16",
                  "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    run = json.load(open(tmp_path / "SmolLM2-135M-Instruct.json"))
    assert run["results"]["xnli"]["zh"]["n"] == 3


def test_mean_and_se_over_sentences_reference():
    # equal lengths: the plain mean and sd/sqrt(n) of the per-sentence means
    means = torch.tensor([[1.0, 0.2], [2.0, 0.4], [4.0, 0.9]])
    mean, se = common.mean_and_se_over_sentences(means * 5, torch.full((3,), 5.0))
    assert mean == pytest.approx(means.mean(0).tolist())
    assert se == pytest.approx((means.std(0) / 3 ** 0.5).tolist())
    # unequal lengths: every position weighs the same; the SE is the clustered ratio SE, written out
    sums, counts = torch.tensor([[3.0], [10.0], [1.0], [8.0]]), torch.tensor([2.0, 5.0, 1.0, 4.0])
    mean, se = common.mean_and_se_over_sentences(sums, counts)
    r = 22.0 / 12.0
    resid = [3 - 2 * r, 10 - 5 * r, 1 - r, 8 - 4 * r]
    assert mean[0] == pytest.approx(r)
    assert se[0] == pytest.approx((4 / 3 * sum(x * x for x in resid)) ** 0.5 / 12.0)


def test_layer_analysis_matches_references_and_is_per_sentence(monkeypatch):
    from conftest import make_tokenizer
    tok = make_tokenizer()
    model = make_tiny_model("llama", tok).eval()
    pairs = [("Hello world.", "你好，世界。今天天气很好。"), ("The answer is 42.", "答案"),
             ("What is the capital of France?", "今天天气很好。"), ("Paris.", "你好")]
    res = ev.layer_analysis(model, tok, "zh", pairs, batch_size=3)
    monkeypatch.setattr(ev, "LENS_POSITIONS_PER_CHUNK", 3)  # chunks that split sentences give the same numbers
    chunked = ev.layer_analysis(model, tok, "zh", pairs, batch_size=3)
    for name in ev.LAYER_MEASURES:
        assert chunked[name] == pytest.approx(res[name], abs=1e-6), name
    monkeypatch.setattr(tok, "padding_side", "left")
    with pytest.raises(ev.UserError, match="right-padding tokenizer"):
        ev.layer_analysis(model, tok, "zh", pairs)
    monkeypatch.setattr(tok, "padding_side", "right")
    # the lens entropy is the shared curve's (whose last block is the model's own output entropy)
    assert res["entropy"] == pytest.approx(ev.common.lens_entropy_curve(model, tok, [t for _, t in pairs]), rel=1e-5)
    ps = res["per_sentence"]
    assert res["n_sentences"] == 4 and sum(ps["positions"]) == res["n_positions"]
    # per-sentence values do not depend on batching or padding: each sentence alone gives the same numbers
    for i, pair in enumerate(pairs):
        alone = ev.layer_analysis(model, tok, "zh", [pair])
        for name in ev.LAYER_MEASURES:
            assert ps[name][i] == pytest.approx(alone[name], abs=2e-5), (name, i)
    # the curves are the position-weighted means of the per-sentence values (cosine: one per sentence)
    w = torch.tensor(ps["positions"], dtype=torch.float64)
    for name in ev.LAYER_MEASURES:
        weights = torch.ones(4, dtype=torch.float64) if name == "cosine_en_tgt" else w
        expected = (torch.tensor(ps[name], dtype=torch.float64) * weights[:, None]).sum(0) / weights.sum()
        assert res[name] == pytest.approx(expected.tolist(), abs=1e-4), name
        # the SEs are the clustered ones of these per-sentence values (cosine: one unit weight per sentence)
        sums = torch.tensor(ps[name], dtype=torch.float64) * weights[:, None]
        se = common.mean_and_se_over_sentences(sums, weights)[1]
        assert res["standard_errors"][name] == pytest.approx(se, abs=1e-4)
    assert all(s > 0 for s in res["standard_errors"]["entropy"] + res["standard_errors"]["cosine_en_tgt"])


def test_analysis_layers_json_and_png(tiny_model_dirs, tmp_path):
    out = tmp_path / "an"
    r = run_stage("03_evaluate.py", "--analysis", "layers", "--model", tiny_model_dirs["llama"], tiny_model_dirs["gpt2"],
                  "--run-name", "before", "after", "--langs", "zh", "--analysis-samples", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.load(open(out / "before.layers.zh.json"))
    L = 4
    for key in ("entropy", "mass_en", "mass_tgt", "top1_en", "top1_tgt", "cosine_en_tgt"):
        assert len(res[key]) == L, key
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in res["mass_en"] + res["mass_tgt"])
    assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in res["cosine_en_tgt"])
    assert res["n_sentences"] == 4 and len(res["data_sha256"]) == 64
    assert all(len(res["standard_errors"][k]) == L for k in ("entropy", "mass_en", "cosine_en_tgt"))
    assert len(res["per_sentence"]["mass_en"]) == 4 and len(res["per_sentence"]["positions"]) == 4
    assert res["dtype"] == ("bfloat16" if ev.common.native_bf16("cpu") else "float32")
    assert res["dtype_requested"] == "auto"
    assert (out / "after.layers.zh.json").exists() and (out / "layers.zh.png").stat().st_size > 1000
