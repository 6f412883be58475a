"""01_build_pairs.py on small fixtures cut from the shipped data: alignment, filters, splits, stats, errors."""
import gzip
import json
import os
import re

import pytest

import common
from common import UserError
from conftest import load_stage, make_tokenizer, run_stage

bp = load_stage("01_build_pairs")
KEYS = ["id", "lang", "source", "x_en", "y_en", "x_tgt", "y_tgt"]


def dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def dump_lines(path, lines, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open(path, "wt", encoding="utf-8") if gz else open(path, "w", encoding="utf-8")) as f:
        f.write("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder laid out like data/ with the first items of the real files (targets: ids < 300)."""
    d = str(tmp_path_factory.mktemp("data"))
    real = lambda p: os.path.join(common.DATA_DIR, p)
    en = common.read_json(real(bp.ALPACA_EN))[:400]
    dump(f"{d}/{bp.ALPACA_EN}", en)
    dump(f"{d}/alpaca/alpaca_data_zh_carbonz0_0-20437.json", common.read_json(real(bp.ALPACA_TGT["zh"][0]))[:300])
    vi = [r for r in common.read_json(real(bp.ALPACA_TGT["vi"][0])) if r["id"] < 300]
    dump(f"{d}/{bp.ALPACA_TGT['vi'][0]}", vi)
    dump(f"{d}/{bp.ALPACA_TGT['vi'][1]}", [])
    with common.open_text(real(bp.GSM8K_EN)) as f:
        dump_lines(f"{d}/{bp.GSM8K_EN}", [next(f).rstrip("\n") for _ in range(150)])
    for lang in ("zh", "fr"):
        with common.open_text(real(bp.GSM8K_TGT.format(lang=lang))) as f:
            lines = [line.rstrip("\n") for line in f if int(line.split("\t")[0]) < 120]
        dump_lines(f"{d}/{bp.GSM8K_TGT.format(lang=lang)}.gz", lines, gz=True)
    for ext in ("eng", "ara"):
        path = f"tatoeba_laser/tatoeba.ara-eng.{ext}"
        dump_lines(f"{d}/{path}", common.open_text(real(path)).read().splitlines()[:60])
    return d


def run(data, tmp_path, *argv, name="pairs.jsonl"):
    out = str(tmp_path / name)
    bp.main(["--data-dir", data, "--out", out, "--dev-size", "10", *argv])  # argv may override --dev-size
    read = lambda p: [json.loads(line) for line in open(p, encoding="utf-8")] if os.path.exists(p) else []
    return read(out), read(out[:-6] + ".dev.jsonl"), json.load(open(out[:-6] + ".stats.json"))


# ----------------------------------------------------------------------------- sources and alignment

def test_alpaca_zh_schema_join_and_stats(data, tmp_path):
    train, dev, stats = run(data, tmp_path, "--source", "alpaca", "--lang", "zh", "--dev-size", "20")
    assert all(list(r) == KEYS for r in train + dev)
    assert all(r["lang"] == "zh" and r["source"] == "alpaca" for r in train)
    en = common.read_json(f"{data}/{bp.ALPACA_EN}")
    row = next(r for r in train + dev if en[int(r["id"].split("-")[1])]["input"])
    e = en[int(row["id"].split("-")[1])]
    assert row["x_en"] == e["instruction"].strip() + "\n\n" + e["input"].strip()  # DESIGN §1 join
    c = stats["counts"]
    assert c["in"] == 300 and c["kept"] + sum(stats["drops"].values()) == 300
    assert (c["train"], c["dev"]) == (len(train), len(dev)) and c["dev_chosen"] == 20 and 15 <= len(dev) <= 20
    for reason, n in stats["drops"].items():  # three examples of each reason (fewer when fewer were dropped)
        assert len(stats["dropped_examples"].get(reason, [])) == min(n, 3)
    assert set(stats["drops"]) == set(bp.DROP_REASONS)
    assert stats["alignment"]["per_pair_failures"] == 0 and stats["alignment"]["min_window_agreement"] > 0.9
    assert set(stats["lengths_chars"]) == {"x_en", "y_en", "x_tgt", "y_tgt"}
    assert set(stats["lengths_chars"]["x_tgt"]) == {"p5", "p50", "p95", "max"}
    assert stats["examples"] and stats["inputs"][0]["sha256"]


def test_vi_prompt_is_kept_whole(data, tmp_path):
    train, dev, stats = run(data, tmp_path, "--source", "alpaca", "--lang", "vi", "--dev-size", "0")
    vi = {r["id"]: r for r in common.read_json(f"{data}/{bp.ALPACA_TGT['vi'][0]}")}
    row = train[5]
    assert row["x_tgt"] == vi[int(row["id"].split("-")[1])]["prompt"].strip()
    assert stats["counts"]["in"] == len(vi) and not dev
    anchors, _, s2 = run(data, tmp_path, "--source", "alpaca", "--lang", "vi", "--dev-size", "0", "--anchors-only")
    assert s2["drops"]["not_anchor"] == sum(r["align"] != "anchor" for r in vi.values())


def test_shifted_ids_are_an_error_that_says_where(data, tmp_path):
    zh = common.read_json(f"{data}/alpaca/alpaca_data_zh_carbonz0_0-20437.json")
    dump(str(tmp_path / "zh.json"), [{**r, "id": r["id"] + 1} for r in zh])
    with pytest.raises(UserError, match=r"fail the per-pair alignment check, first alpaca-\d+: input field empty"):
        run(data, tmp_path, "--source", "alpaca", "--lang", "zh", "--tgt-file", str(tmp_path / "zh.json"))
    # the Vietnamese prompt merges input, so only the number check can see the shift
    vi = common.read_json(f"{data}/{bp.ALPACA_TGT['vi'][0]}")
    dump(str(tmp_path / "vi.json"), [{**r, "id": r["id"] + 1} for r in vi])
    with pytest.raises(UserError, match=r"ids alpaca-\d+ \.\. alpaca-\d+ look shifted by one"):
        run(data, tmp_path, "--source", "alpaca", "--lang", "vi", "--tgt-file", str(tmp_path / "vi.json"))
    assert not os.path.exists(tmp_path / "pairs.jsonl")


def test_index_alignment_and_id_errors(data, tmp_path):
    en = common.read_json(f"{data}/{bp.ALPACA_EN}")
    no_ids = [{k: r[k] for k in ("instruction", "input", "output")} for r in en[:10]]
    with pytest.raises(UserError, match="has 10 items and no 'id' field, the English file has 400"):
        bp.load_alpaca(en, no_ids, "t.json")
    rows = bp.load_alpaca(en[:10], no_ids, "t.json")  # equal lengths: aligned by position
    assert [r["id"] for r in rows] == [f"alpaca-{i}" for i in range(10)]
    with pytest.raises(UserError, match="t.json item 1: id 0 appears twice"):
        bp.load_alpaca(en, [{"id": 0, **no_ids[0]}, {"id": 0, **no_ids[0]}], "t.json")
    with pytest.raises(UserError, match="id 400 is beyond the English file"):
        bp.load_alpaca(en, [{"id": 400, **no_ids[0]}], "t.json")


def test_gsm8k_answers_and_alignment(data, tmp_path):
    train, dev, stats = run(data, tmp_path, "--source", "gsm8k", "--lang", "zh", "--dev-size", "10")
    row = next(r for r in train if r["id"] == "gsm8k-0")
    assert row["y_en"].endswith("\nThe answer is 72.") and "<<" not in row["y_en"] and "####" not in row["y_en"]
    assert row["y_tgt"] == row["y_en"] and "娜塔莉" in row["x_tgt"]
    assert stats["y_tgt_is_english"] == len(train) + len(dev) and "English answer" in stats["note"]
    assert stats["alignment"]["min_window_agreement"] > 0.9
    # a translated answer with another final number fails the per-pair check
    lines = common.open_text(f"{data}/{bp.GSM8K_TGT.format(lang='zh')}").read().splitlines()
    ans = [json.loads(line)["answer"] for line in open(f"{data}/{bp.GSM8K_EN}")]
    bad = [f"{line}\t解答：{ans[int(line.split(chr(9))[0])]}".replace("\n", "\\n") for line in lines]
    bad[0] = bad[0].replace("#### 72", "#### 73")
    dump_lines(str(tmp_path / "one.tsv"), bad)
    _, _, s = run(data, tmp_path, "--source", "gsm8k", "--lang", "zh", "--tgt-file", str(tmp_path / "one.tsv"))
    assert s["drops"]["misaligned"] == 1 and s["y_tgt_is_english"] == 0 and s["dropped_examples"]["misaligned"][0]["id"] == "gsm8k-0"
    dump_lines(str(tmp_path / "many.tsv"), [re.sub(r"#### (\d+)", r"#### 1\1", b) for b in bad])
    with pytest.raises(UserError, match=r"first gsm8k-0: final answer 72 \(English\) != 173"):
        run(data, tmp_path, "--source", "gsm8k", "--lang", "zh", "--tgt-file", str(tmp_path / "many.tsv"))
    # shifted indices: questions no longer share their numbers
    dump_lines(str(tmp_path / "shift.tsv"), [f"{int(line.split(chr(9))[0]) + 1}\t{line.split(chr(9))[1]}" for line in lines])
    with pytest.raises(UserError, match=r"ids gsm8k-\d+ \.\. gsm8k-\d+ look shifted by one: .* the previous id"):
        run(data, tmp_path, "--source", "gsm8k", "--lang", "zh", "--tgt-file", str(tmp_path / "shift.tsv"))
    dump_lines(str(tmp_path / "broken.tsv"), lines[:2] + ["no tab here"])
    with pytest.raises(UserError, match="broken.tsv: line 3 is not"):
        run(data, tmp_path, "--source", "gsm8k", "--lang", "zh", "--tgt-file", str(tmp_path / "broken.tsv"))
    dump_lines(str(tmp_path / "range.tsv"), ["999\tquestion"])
    with pytest.raises(UserError, match=r"range.tsv line 1: index 999 is not a GSM8K train index \(0..149\)"):
        run(data, tmp_path, "--source", "gsm8k", "--lang", "zh", "--tgt-file", str(tmp_path / "range.tsv"))


def test_gsm8k_fr_untranslated_counted(data, tmp_path):
    _, _, stats = run(data, tmp_path, "--source", "gsm8k", "--lang", "fr", "--dev-size", "0")
    assert stats["drops"]["untranslated"] > 0  # the French file leaves some questions in English


def test_parallel_repeat_template_and_lengths(data, tmp_path):
    train, _, stats = run(data, tmp_path, "--source", "parallel", "--lang", "ar", "--dev-size", "5")
    row = train[0]
    assert row["x_en"] == bp.PARALLEL_TEMPLATE.format(sentence=row["y_en"]) and row["id"].startswith("tatoeba-")
    assert row["x_tgt"] == bp.PARALLEL_TEMPLATE.format(sentence=row["y_tgt"]) and common.has_script(row["y_tgt"], "ar")
    en = common.open_text(f"{data}/tatoeba_laser/tatoeba.ara-eng.eng").read().splitlines()
    with pytest.raises(UserError, match="differ in length: .* has 59 lines, .* has 60"):
        bp.load_parallel(en[:59], en, "a.eng", "a.ara", "tatoeba")


def test_hub_uses_the_same_code_path(data, tmp_path, monkeypatch):
    import datasets
    en = common.read_json(f"{data}/{bp.ALPACA_EN}")
    zh = common.read_json(f"{data}/alpaca/alpaca_data_zh_carbonz0_0-20437.json")
    hub = {"someone/alpaca-zh": [{"idx": r["id"], "q": r["instruction"], "i": r["input"], "a": r["output"]} for r in zh],
           "someone/parallel": [{"q_en": en[r["id"]]["instruction"], "a_en": en[r["id"]]["output"], "q_zh": r["instruction"],
                                 "a_zh": r["output"]} for r in zh]}
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config=None, split=None: datasets.Dataset.from_list(hub[name]))
    train, _, stats = run(data, tmp_path, "--source", "hub", "--hub-dataset", "someone/alpaca-zh", "--lang", "zh",
                          "--hub-layout", "alpaca", "--hub-fields", "id=idx,instruction=q,input=i,output=a")
    local, _, _ = run(data, tmp_path, "--source", "alpaca", "--lang", "zh", name="local.jsonl")
    assert [(r["id"], r["x_tgt"], r["y_tgt"]) for r in train] == [(r["id"], r["x_tgt"], r["y_tgt"]) for r in local]
    assert train[0]["source"] == "hub:someone/alpaca-zh" and stats["inputs"][-1] == {"path": "hub:someone/alpaca-zh"}
    cols, dev, stats = run(data, tmp_path, "--source", "hub", "--hub-dataset", "someone/parallel", "--lang", "zh",
                           "--dev-size", "0", "--hub-fields", "x_en=q_en,y_en=a_en,x_tgt=q_zh,y_tgt=a_zh", name="c.jsonl")
    assert stats["counts"]["in"] == 300 and cols[0]["id"] == "hub-0" and cols[0]["x_tgt"] == zh[0]["instruction"]
    with pytest.raises(UserError, match="--hub-fields must map x_en, y_en, x_tgt, y_tgt .*missing \\['y_tgt'\\]"):
        run(data, tmp_path, "--source", "hub", "--hub-dataset", "someone/parallel", "--lang", "zh",
            "--hub-fields", "x_en=q_en,y_en=a_en,x_tgt=q_zh")


def test_hub_unreachable_is_one_clear_error(data, tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"cannot load hub dataset 'x/y' .*ConnectionError"):
        run(data, tmp_path, "--source", "hub", "--hub-dataset", "x/y", "--lang", "ar", "--hub-fields",
            "x_en=a,y_en=b,x_tgt=c,y_tgt=d")


# ----------------------------------------------------------------------------- filters

def pair(i, x_en="Name the capital of France, please.", y_en="The capital of France is Paris, a large city.",
         x_tgt="请说出法国的首都。", y_tgt="法国的首都是巴黎，一个大城市。", **extra):
    return {"id": f"t-{i}", "source": "t", "x_en": x_en, "y_en": y_en, "x_tgt": x_tgt, "y_tgt": y_tgt, **extra}


def test_each_filter_is_counted():
    rows = [pair(0), pair(1, x_tgt="  "), pair(2, x_tgt="Name the capital of France, please."),
            pair(3, y_tgt="The capital of France is Paris, a large city."),
            pair(4, y_tgt="La capitale est Paris, une grande ville"),
            pair(5, y_tgt="巴"), pair(6, y_tgt="法国的首都是巴黎，一个大城市。" * 10), pair(7),
            pair(8, _misaligned="final answer 1 != 2"), pair(9, _align="interp"),
            pair(10, x_en="Name the capital of France, please. " * 5, x_tgt="请说出法国的首都。" * 5),  # 271 tokens
            # short language-neutral responses are not judged untranslated / wrong script
            pair(11, y_en="Erwin Schrödinger", y_tgt="Erwin Schrödinger"), pair(12, y_en="42", y_tgt="42"),
            pair(13, _numbers="English numbers 12 30 absent from the target side"),
            pair(14, y_en="SELECT name FROM authors;", y_tgt="从作者中选择姓名；")]
    kept, drops, examples = bp.filter_pairs(rows, "zh", 0.1, 2.0, make_tokenizer(), max_tokens=120, anchors_only=True)
    assert [r["id"] for r in kept] == ["t-0", "t-11", "t-12"]
    assert dict(drops) == {"misaligned": 1, "not_anchor": 1, "empty": 1, "numbers_absent": 1, "code_translated": 1,
                           "untranslated": 2, "wrong_script": 1, "length_ratio": 2, "duplicate": 1,
                           "over_token_budget": 1}
    assert [r["id"] for r in examples["untranslated"]] == ["t-2", "t-3"] and examples["over_token_budget"][0]["id"] == "t-10"
    assert all(r["_tokens"] <= 120 for r in kept)
    # a Latin-script language has no script test; the ratio bounds are checked only from RATIO_MIN_CHARS on
    kept, drops, _ = bp.filter_pairs([pair(0, x_tgt="Nenne die Hauptstadt.", y_tgt="x")], "de", 0.25, 4.0)
    assert len(kept) == 0 and drops["length_ratio"] == 1
    three = bp.filter_pairs([pair(i, y_tgt="巴") for i in range(5)], "zh", 0.1, 2.0)[2]
    assert [r["id"] for r in three["length_ratio"]] == ["t-0", "t-1", "t-2"]  # three examples per reason


def reason(lang, x_en, y_en, x_tgt, y_tgt):
    return bp.drop_reason(pair(0, x_en=x_en, y_en=y_en, x_tgt=x_tgt, y_tgt=y_tgt), lang,
                          *bp.LENGTH_RATIO_BOUNDS.get(lang, bp.DEFAULT_RATIO_BOUNDS))


SQL = "SELECT * FROM customers ORDER BY id LIMIT 5;"


def test_code_answers_intact_kept_translated_dropped():
    x_en, x_zh = "Write a query that returns the first five customers.", "编写一个返回前五个客户的查询。"
    assert reason("zh", x_en, SQL, x_zh, SQL) is None  # code left as it is: correct
    assert reason("zh", x_en, SQL, x_zh, "从客户中选择 *\n按编号订购\n限制 5；") == "code_translated"
    assert reason("zh", x_en, SQL, x_zh, "SELECT * FROM customers ORDER BY 编号 LIMIT 5;") == "code_translated"
    assert bp.broken_code(SQL, "从客户中选择 * 按编号订购") == ["BY", "FROM", "LIMIT", "ORDER", "SELECT", "customers", "id"]
    py = "def add(a, b):\n    # add the two numbers\n    return a + b  # 'sum'\nprint(add(1, 2))"
    py_zh = "def add(a, b):\n    # 把两个数相加\n    return a + b  # '和'\nprint(add(1, 2))"
    assert bp.broken_code(py, py_zh) == []  # comments and strings may be translated
    assert bp.broken_code(py, py_zh.replace("return", "返回")) == ["return"]
    assert bp.broken_code("The capital of France is Paris.", "法国的首都是巴黎。") == []  # prose is not code
    # English left as it is where it should be: URLs, e-mails, hashtags, names, ciphers
    for y in ["https://en.wikipedia.org/wiki/Lamborghini_Aventador", "jrosa@example.com, jharvey@example.com",
              "#VaccinesAreEssential #COVID19Vaccines #StoppingTheSpread", "Led Zeppelin, Pink Floyd, The Rolling Stones, "
              "Queen and The Beatles", "Wklw kh d vhfuhw phvvdjh lq wkh fdhvdu flskhu."]:
        assert reason("zh", "Give an example.", y, "举个例子。", y) is None, y
    # ... and dropped where it should have been translated
    y = "Apple Inc. was founded in 1976 by Steve Jobs and Steve Wozniak."
    assert reason("zh", "When was Apple founded?", y, "苹果公司是什么时候成立的？", y) == "untranslated"


def test_untranslated_compares_normalised_text():
    en = "Tom has 3 apples and buys 5 more. How many apples does he have now?"
    fr_copy = "Tom  has 3 apples and buys 5 more.  How many apples does he have now ?"  # whitespace only differs
    fr = "Tom a 3 pommes et en achète 5 de plus. Combien de pommes a-t-il maintenant ?"
    assert en != fr_copy and reason("fr", en, "8", fr_copy, "8") == "untranslated"
    assert reason("fr", en, "8", fr, "8") is None
    assert reason("fr", en, "8", fr + " How many apples does he have now?", "8") is None  # mostly French
    assert bp.normalised(en) == bp.normalised(fr_copy.upper())


def test_vietnamese_without_diacritics_is_kept():
    assert not bp.common.has_script("Chia 100 cho 7.", "vi")  # the old script test dropped it
    assert reason("vi", "Divide 100 by 7.", "100 divided by 7 is 14.29.", "Chia 100 cho 7.",
                  "100 chia cho 7 là 14,29.") is None
    # a long answer in another language than Vietnamese is still the wrong script
    assert reason("vi", "Name the capital of France.", "The capital of France is Paris, a large city.",
                  "Kể tên thủ đô của Pháp.", "La capitale de la France est Paris, une grande ville.") == "wrong_script"


def test_short_translation_with_extreme_length_ratio_is_kept():
    x_en, x_zh = "Name a disaster movie. Output the title of the movie.", "说出一部灾难片。输出电影的标题。"
    assert len("后天") / len("The Day After Tomorrow") < bp.LENGTH_RATIO_BOUNDS["zh"][0]
    assert reason("zh", x_en, "The Day After Tomorrow", x_zh, "后天") is None
    long_en = "The Day After Tomorrow is a 2004 disaster film about a sudden ice age."
    assert reason("zh", x_en, long_en, x_zh, "后天") == "length_ratio"  # a long text is still checked
    assert reason("zh", x_en, "Yes", x_zh, "是的，是的，是的，是的，是的，是的，是的，是的，是的") is None  # short: not judged


def test_numbers_per_pair_dropped_and_counted():
    rows = [pair(0, x_en="Tom has 12 apples and 30 pears.", x_tgt="汤姆有 12 个苹果和 30 个梨。"),
            pair(1, x_en="A pen costs 4.99 dollars, a book 1,250 yen.", x_tgt="一支笔 4,99 美元，一本书 1 250 日元。"),
            pair(2, x_en="About 20 million people and 15 cities.", x_tgt="大约 2000 万人和十五个城市。"),
            pair(3, x_en="Tom has 12 apples and 30 pears.", x_tgt="汤姆有 45 个苹果和 77 个梨。"),  # another item
            pair(4, x_en="Tom has 12 apples.", x_tgt="汤姆有十二个苹果。")]  # one number: too little evidence
    summary = bp.verify_alignment(rows, "zh", 0.45, 0.01)
    kept, drops, examples = bp.filter_pairs(rows, "zh", 0.1, 2.0)
    assert [r["id"] for r in kept] == ["t-0", "t-1", "t-2", "t-4"]
    assert drops["numbers_absent"] == 1 and examples["numbers_absent"][0]["id"] == "t-3"
    assert summary["numbers_absent"] == 1 and rows[3]["_numbers"].startswith("English numbers 3 12 absent")
    assert bp.numbers("4.99 and 1,250") == bp.numbers("4,99 and 1 250", "fr") == {"499", "125"}
    assert bp.numbers("douze et vingt", "fr") == {"12", "2"}


def synthetic_parallel(tmp_path, n=200, shift=None, by=1):
    """Line-aligned en/zh files whose every line carries two numbers; shift=(start, length): the target lines
    start..start+length-1 take the text of the line `by` after them (by=1: a line lost there, -1: one inserted)."""
    rng = __import__("random").Random(0)
    nums = [(rng.randint(10, 9999), rng.randint(10, 9999)) for _ in range(n + 1)]
    en = [f"Tom has {a} apples and {b} pears." for a, b in nums]
    zh = [f"汤姆有 {a} 个苹果和 {b} 个梨。" for a, b in nums]
    if shift:
        start, length = shift
        zh[start:start + length] = zh[start + by:start + length + by]
    dump_lines(str(tmp_path / "s.eng"), en[:n])
    dump_lines(str(tmp_path / "s.zh"), zh[:n])
    return ["--source", "parallel", "--lang", "zh", "--en-file", str(tmp_path / "s.eng"), "--tgt-file", str(tmp_path / "s.zh")]


def test_local_shift_of_30_rows_is_caught(data, tmp_path):
    train, dev, stats = run(data, tmp_path, *synthetic_parallel(tmp_path))
    assert len(train) + len(dev) == 200 and stats["alignment"]["numbers_absent"] == 0
    with pytest.raises(UserError, match=r"ids tatoeba-100 \.\. tatoeba-12\d look shifted by one: .* the next id"):
        run(data, tmp_path, *synthetic_parallel(tmp_path, shift=(100, 30)))
    with pytest.raises(UserError, match=r"ids tatoeba-1\d\d \.\. tatoeba-1\d\d look shifted by one: .* the previous id"):
        run(data, tmp_path, *synthetic_parallel(tmp_path, shift=(100, 30), by=-1))
    # --align-min-agreement 0 skips the region checks; each shifted pair is still dropped by the number check
    _, _, stats = run(data, tmp_path, *synthetic_parallel(tmp_path, shift=(100, 30)), "--align-min-agreement", "0")
    assert stats["drops"]["numbers_absent"] == 30


def test_html_entities_are_unescaped():
    rows = [pair(0, y_en="SELECT * FROM t WHERE a > 'b';", y_tgt="选择 * FROM t WHERE a &gt; &#39;b&#39;;"),
            pair(1, y_en="Use &amp; in HTML", y_tgt="在 HTML 中使用 &amp;")]
    assert bp.unescape_targets(rows) == 1
    assert rows[0]["y_tgt"] == "选择 * FROM t WHERE a > 'b';" and rows[1]["y_tgt"].endswith("&amp;")


def test_token_budget_from_the_command_line(data, tmp_path, tokenizer):
    tok_dir = str(tmp_path / "tok")
    tokenizer.save_pretrained(tok_dir)
    _, _, stats = run(data, tmp_path, "--source", "gsm8k", "--lang", "zh", "--dev-size", "0", "--max-tokens", "700",
                      "--tokenizer", tok_dir)
    assert stats["drops"]["over_token_budget"] > 0 and stats["lengths_tokens"]["longest_training_sequence"]["max"] <= 700


# ----------------------------------------------------------------------------- splits

def test_split_is_seeded_disjoint_and_stable():
    rows = [pair(i) for i in range(100)]
    dev_set = bp.dev_ids([r["id"] for r in rows], 10, seed=0)
    train, dev = bp.split_dev(rows, dev_set, seed=0)
    assert len(dev) == 10 and len(train) == 90 and not {r["id"] for r in train} & {r["id"] for r in dev}
    assert [r["id"] for r in train] == sorted((r["id"] for r in train), key=bp.id_key)
    assert bp.dev_ids([r["id"] for r in reversed(rows)], 10, seed=0) == dev_set  # input order does not matter
    assert bp.dev_ids([r["id"] for r in rows], 10, seed=1) != dev_set
    small_train, small_dev = bp.split_dev(rows, dev_set, seed=0, limit=30)  # --limit keeps the same dev ids
    assert len(small_train) + len(small_dev) == 30 and small_dev == dev
    kept = [r for r in rows if r["id"] not in sorted(dev_set)[:3]]  # filters dropped 3 dev ids: not replaced
    assert {r["id"] for r in bp.split_dev(kept, dev_set, seed=0)[1]} == dev_set - set(sorted(dev_set)[:3])
    with pytest.raises(UserError, match=r"dev split \(--dev-size: 30 ids here\) leaves no training pairs"):
        bp.split_dev(rows, bp.dev_ids([r["id"] for r in rows], 30, 0), seed=0, limit=30)


def test_dev_ids_do_not_move_when_filters_change(data, tmp_path, tokenizer):
    tok_dir = str(tmp_path / "tok")
    tokenizer.save_pretrained(tok_dir)
    a_train, a_dev, a = run(data, tmp_path, "--source", "alpaca", "--lang", "zh", "--dev-size", "40")
    b_train, b_dev, b = run(data, tmp_path, "--source", "alpaca", "--lang", "zh", "--dev-size", "40",
                            "--max-tokens", "160", "--tokenizer", tok_dir, name="b.jsonl")
    assert b["drops"]["over_token_budget"] > 20  # the budget filter removed many pairs...
    a_ids, b_ids = {r["id"] for r in a_dev}, {r["id"] for r in b_dev}
    assert b_ids < a_ids and len(b_ids) < len(a_ids)  # ...and the dev ids are the default's minus its drops
    b_all = {r["id"] for r in b_train + b_dev}
    assert a_ids - b_ids == a_ids - b_all  # every missing dev id was dropped, none moved to train
    assert not b_ids & {r["id"] for r in a_train} and not a_ids & {r["id"] for r in b_train}
    assert a["counts"]["dev_chosen"] == b["counts"]["dev_chosen"] == 40 and b["counts"]["dev"] == len(b_dev)
    _, c_dev, _ = run(data, tmp_path, "--source", "alpaca", "--lang", "zh", "--dev-size", "40", "--limit", "100",
                      name="c.jsonl")
    assert c_dev == a_dev


def test_same_seed_same_files(data, tmp_path):
    a = run(data, tmp_path, "--source", "alpaca", "--lang", "zh", "--dev-size", "30", "--limit", "100", "--seed", "3")
    b = run(data, tmp_path, "--source", "alpaca", "--lang", "zh", "--dev-size", "30", "--limit", "100", "--seed", "3",
            name="b.jsonl")
    assert a[0] == b[0] and a[1] == b[1] and len(a[0]) + len(a[1]) == 100 and 25 <= len(a[1]) <= 30
    assert a[2]["counts"]["over_limit"] == a[2]["counts"]["kept"] - 100


# ----------------------------------------------------------------------------- errors

def test_cli_error_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "p.jsonl"
    proc = run_stage("01_build_pairs.py", "--source", "alpaca", "--lang", "ar", "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no aligned Arabic Alpaca ships with the repo") and "--translate-model" in proc.stderr
    assert not os.listdir(tmp_path)


def test_bad_inputs_write_nothing(data, tmp_path):
    out = tmp_path / "o"
    cases = [
        (["--source", "alpaca", "--lang", "xx"], "unknown language code 'xx'"),
        (["--source", "gsm8k", "--lang", "bn"], "no GSM8K translation into Bengali ships"),
        (["--source", "alpaca", "--lang", "zh", "--tgt-file", str(tmp_path / "missing.json")], "file not found"),
        (["--source", "alpaca", "--lang", "zh", "--data-dir", str(tmp_path)], "read from --data-dir"),
        (["--source", "parallel", "--lang", "vi", "--corpus", "ntrex"], "no Vietnamese; try --corpus tatoeba"),
        (["--source", "alpaca", "--lang", "ja"], "no aligned Japanese Alpaca"),
        (["--source", "alpaca", "--lang", "ja", "--tgt-file", f"{data}/alpaca/alpaca_data_zh_carbonz0_0-20437.json",
          "--min-ratio", "50"], "0 pairs left after filtering: drops by reason {"),
        (["--source", "alpaca", "--lang", "ru", "--tgt-file", f"{data}/alpaca/alpaca_data_zh_carbonz0_0-20437.json"],
         "lack the Russian script: is --lang ru the language of the target file?"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace("{", r"\{").replace("?", r"\?")):
            bp.main(["--data-dir", data, "--out", str(out / "p.jsonl"), *argv])
    dump_lines(str(tmp_path / "bad.jsonl"), ['{"id": 0, "instruction": "a", "input": "", "output": "b"}', '{"id": 1,'])
    with pytest.raises(UserError, match="bad.jsonl: line 2 is not a JSON object"):
        bp.main(["--data-dir", data, "--out", str(out / "p.jsonl"), "--source", "alpaca", "--lang", "zh",
                 "--tgt-file", str(tmp_path / "bad.jsonl")])
    assert not out.exists() or not os.listdir(out)
    (out / "p.jsonl").mkdir(parents=True)
    with pytest.raises(UserError, match="is a folder; give a file name ending in .jsonl"):
        bp.main(["--data-dir", data, "--out", str(out / "p.jsonl"), "--source", "alpaca", "--lang", "zh"])


def test_pairs_without_numbers_are_built_with_a_warning(data, tmp_path, capsys):
    """Parallel text whose English side carries no numbers cannot be checked for alignment: said, not silent."""
    colours, animals = ("red", "green", "blue", "black", "white"), ("cat", "dog", "bird", "fish", "horse", "cow")
    dump_lines(str(tmp_path / "s.eng"), [f"The {c} {a} is in the garden." for c in colours for a in animals])
    dump_lines(str(tmp_path / "s.zh"), [f"{c}色的{a}在花园里。" for c in "红绿蓝黑白" for a in "猫狗鸟鱼马牛"])
    run(data, tmp_path, "--source", "parallel", "--lang", "zh", "--en-file", str(tmp_path / "s.eng"), "--tgt-file",
        str(tmp_path / "s.zh"), "--dev-size", "3")
    assert "warning: only 0 pairs carry >= 2 numbers on the English side, too few" in capsys.readouterr().out


# ----------------------------------------------------------------------------- machine translation

def test_translate_code_path_with_a_tiny_random_model(data, tmp_path, tokenizer):
    from transformers import AutoModelForSeq2SeqLM, MarianConfig
    eos = tokenizer.eos_token_id
    config = MarianConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                          max_position_embeddings=64, pad_token_id=eos, eos_token_id=eos, decoder_start_token_id=eos,
                          forced_eos_token_id=None)
    model_dir = str(tmp_path / "mt")
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train, dev, stats = run(data, tmp_path, "--source", "alpaca", "--lang", "de", "--translate-model", model_dir,
                            "--bt-model", model_dir, "--bt-sample", "4", "--limit", "6", "--dev-size", "0",
                            "--translate-max-length", "6", "--translate-batch-size", "4", "--min-ratio", "0",
                            "--max-ratio", "1e9", "--align-min-agreement", "0")
    t = stats["translation"]
    assert t["rows"] == 6 and t["bt_sample"] == 4 and isinstance(t["bt_chrf"], float)
    assert stats["counts"]["in"] == 6 and train and all(r["x_tgt"] and r["lang"] == "de" for r in train)
    # without a reverse model a one-direction model gets no back-translation, and says so
    _, _, s2 = run(data, tmp_path, "--source", "gsm8k", "--lang", "sw", "--translate-model", model_dir, "--limit", "3",
                   "--dev-size", "0", "--translate-max-length", "4", "--min-ratio", "0", "--max-ratio", "1e9",
                   name="g.jsonl")
    assert s2["translation"]["bt_chrf"] is None and "--bt-model" in s2["translation"]["bt_note"]
    assert s2["y_tgt_is_english"] == s2["counts"]["train"]


def test_nllb_and_m2m_language_tokens():
    class Nllb:
        vocab = {"eng_Latn": 1, "zho_Hans": 2, "arb_Arab": 3}
        get_vocab = lambda self: self.vocab
        convert_tokens_to_ids = lambda self, t: self.vocab[t]

    class M2M(Nllb):
        vocab = {"a": 0}
        get_lang_id = lambda self, lang: {"en": 7, "vi": 9}[lang]
    assert bp.lang_tokens(Nllb(), "en", "zh") == ("eng_Latn", 2)
    assert bp.lang_tokens(Nllb(), "ar", "en") == ("arb_Arab", 1)
    assert bp.lang_tokens(M2M(), "en", "vi") == ("en", 9)
    assert bp.lang_tokens(make_tokenizer(), "en", "vi") == (None, None)  # Marian-like: one direction, no codes
