r"""
Stage 1: build the parallel 4-tuples (x_en, y_en, x_tgt, y_tgt) that DFT trains on (DESIGN §1).

    # the paper's setting: Stanford Alpaca paired by id with its Chinese / Vietnamese translation
    python 01_build_pairs.py --source alpaca --lang zh --out out/pairs_zh.jsonl
    python 01_build_pairs.py --source alpaca --lang vi --out out/pairs_vi.jsonl
    # math track toward MGSM: GSM8K train + translated questions (de es fr ja ru sw zh)
    python 01_build_pairs.py --source gsm8k --lang sw --out out/gsm8k_sw.jsonl
    # line-aligned parallel sentences (Tatoeba by default; --corpus ntrex is 03_evaluate's test set)
    python 01_build_pairs.py --source parallel --lang ar --out out/tatoeba_ar.jsonl
    # Arabic Alpaca does not ship: machine-translate the English side (GPU advised), or load it from the hub
    python 01_build_pairs.py --source alpaca --lang ar --translate-model facebook/nllb-200-distilled-600M \
        --limit 5000 --out out/pairs_ar_mt.jsonl
    python 01_build_pairs.py --source hub --hub-dataset NAME --hub-layout columns \
        --hub-fields x_en=COL,y_en=COL,x_tgt=COL,y_tgt=COL --lang ar --out out/pairs_ar.jsonl
    # any source: drop pairs that would not fit the training length
    ... --max-tokens 512 --tokenizer HuggingFaceTB/SmolLM2-135M-Instruct

Writes OUT.jsonl (train), OUT.dev.jsonl (dev, about --dev-size rows) and OUT.stats.json (counts, drops by
reason, length percentiles, alignment check, examples), one row per line:
{"id", "lang", "source", "x_en", "y_en", "x_tgt", "y_tgt"}.

Alignment is verified, not assumed: ids must exist once on each side; where the data allows a strict
check it is made per pair (Alpaca: empty `input` on one side only; GSM8K: equal final answers); a pair
whose target carries none of its >= 2 English numbers is dropped (numbers_absent); a run of such pairs
whose targets carry their neighbour's numbers is a local shift and an error naming the ids (find_shift);
and a sliding window over the number-bearing pairs catches a file shifted from some id on (aligned files
score > 0.9, ids shifted by one < 0.35).
Filters judge content (docs/PAIRS.md): code with translated keywords is dropped (code_translated); English
left in the target is dropped only when it is running English prose (untranslated), not when it is code,
a URL, an e-mail, a hashtag, a name or a list; wrong script and length ratio leave short texts alone.

Our conventions (DESIGN **ours**), each a constant below:
- Alpaca: x = instruction + "\n\n" + input (input non-empty); the Vietnamese file merged instruction and
  input into one `prompt` before translation, so its x_tgt is that prompt while x_en keeps our join.
- GSM8K: y_en is the chain of thought with calculator annotations <<...>> removed and the final
  "#### N" line rewritten as GSM8K_ANSWER_TEMPLATE. No translated answers ship, so y_tgt = y_en
  (English) and the stats count it in `y_tgt_is_english`; target-side checks skip y there.
- Parallel sentences: a "repeat" task, PARALLEL_TEMPLATE with the English sentence on the English side
  and the target sentence on the target side. Each side then stays in one language, so x_en/x_tgt and
  y_en/y_tgt are translations of each other, as DFT's losses assume: the LC/ET lens losses become
  "read the English sentence out of the target sentence's hidden states". A translation instruction
  ("Translate into Chinese: <en>" -> <zh>) would put both languages on one side and break that.
  The TFT term alone is only copying on these pairs: mix them with instruction data.
- Splits: an id's place is sha256(seed:id); dev = the first --dev-size ids of that order over ALL input ids,
  chosen before filtering, minus the ones filters drop (not replaced), so builds with other filters share
  their dev ids; --limit keeps the surviving dev pairs and fills up with train pairs in hash order.
"""
import argparse
import hashlib
import html
import itertools
import math
import os
import re
import time
import unicodedata
from collections import Counter

import common
from common import UserError

# -----------------------------------------------------------------------------
# data layout and conventions

ALPACA_EN = "alpaca/alpaca_data_en.json"  # names without .gz: common.resolve_path finds either
ALPACA_TGT = {
    "zh": ["alpaca/alpaca_data_zh_carbonz0_0-20437.json"],
    "vi": ["alpaca/alpaca_vi_telexyz_aligned_0-20437.json", "alpaca/alpaca_vi_telexyz_aligned_20438-52001.json"],
}
GSM8K_EN = "gsm8k/train.jsonl"
GSM8K_TGT = "gsm8k_translated_qalign/train_{lang}.tsv"
GSM8K_LANGS = ("de", "es", "fr", "ja", "ru", "sw", "zh")
GSM8K_ANSWER_TEMPLATE = "The answer is {answer}."  # replaces the final "#### N" line (the MGSM scorers read it)
GSM8K_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: not natural text, removed
PARALLEL_TEMPLATE = "Repeat the following sentence:\n{sentence}"
PARALLEL = {  # corpus -> (English file, target file, our code -> the corpus's code)
    "tatoeba": ("tatoeba_laser/tatoeba.{code}-eng.eng", "tatoeba_laser/tatoeba.{code}-eng.{code}",
                dict(de="deu", es="spa", fr="fra", ru="rus", zh="cmn", ja="jpn", th="tha", sw="swh", bn="ben",
                     te="tel", ar="ara", bg="bul", el="ell", hi="hin", tr="tur", ur="urd", vi="vie")),
    "ntrex": ("ntrex128/newstest2019-src.eng.txt", "ntrex128/newstest2019-ref.{code}.txt",
              dict(de="deu", es="spa", fr="fra", ru="rus", zh="zho-CN", ja="jpn", th="tha", sw="swa", bn="ben",
                   te="tel")),
}

# chars(tgt) / chars(en) outside these bounds is a broken pair. Measured on the shipped data (0.1% / 99.9%
# quantiles): zh 0.16 / 1.45, ja 0.29 / 0.81, vi 0.33 / 2.5, de es fr ru sw 0.7 / 1.6; pairs with ids
# shifted by one reach 0.0 and 25. CJK writes a word in ~1-2 characters, hence its lower band.
LENGTH_RATIO_BOUNDS = {"zh": (0.1, 2.0), "ja": (0.1, 2.0), "ko": (0.15, 2.5)}
DEFAULT_RATIO_BOUNDS = (0.25, 4.0)
RATIO_MIN_CHARS = 10  # "Yes" -> "是" says nothing about alignment: the ratio is checked on longer texts only
# ... and the lower bound from this many English characters on: a short title may shrink to one word ("The Day
# After Tomorrow" -> "后天", 0.09, a correct translation), while a short text that grows 20-80 times (vi: 46 of
# the drops) is another item. Measured on the shipped data, texts from 30 chars: zh 0.16 / 1.0, vi 0.13 / 3.2,
# ja 0.29 / 0.80, de ru sw 0.70 / 1.53 (0.1% / 99.9% quantiles).
RATIO_MIN_CHARS_LOW = 30
# A short response is often the same in every language (a name, a formula, a URL, "12 cm"): the
# untranslated filter judges x and y from this many letters of prose on (an instruction copied unchanged: at any
# length); the wrong-script filter judges x and y from this many on ("Chia 100 cho 7." is Vietnamese without
# diacritics).
JUDGE_MIN_LETTERS = 20

NUMBERS_CHECKED = 2  # a pair is checked by its numbers when its English side carries at least this many (ours)
ALIGN_WINDOW = 50  # pairs (with >= NUMBERS_CHECKED numbers on the English side) per window of the alignment check
ALIGN_MIN_EVIDENCE = 8  # fewer such pairs than this: the window check has nothing to say
DROP_REASONS = ("misaligned", "not_anchor", "empty", "numbers_absent", "code_translated", "untranslated",
                "wrong_script", "length_ratio", "duplicate", "over_token_budget")
# untranslated / wrong script (functions `untranslated`, `english_prose`, `wrong_script`), measured on the shipped data
UNTRANSLATED_SHARE = 0.8  # a target whose prose letters are >= this share English words of the English side
ENGLISH_FUNCTION_SHARE = 0.15  # running English: function words ("the", "is", "of") make >= this share of words
CJK_WEIGHT = 3  # a CJK character weighs 3 letters in these shares (a 1-2 character word ~ a 5-letter word)
CJK_CHAR = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af]")
COPY_SHARE = 0.5  # a Latin-only target with this share of the English side's words is a copy, not another language

# target codes of the multilingual MT models (NLLB-200 uses these, M2M100 uses the bare ISO code)
NLLB_CODES = dict(en="eng_Latn", zh="zho_Hans", ja="jpn_Jpan", ko="kor_Hang", vi="vie_Latn", ar="arb_Arab",
                  ur="urd_Arab", ru="rus_Cyrl", bg="bul_Cyrl", el="ell_Grek", th="tha_Thai", hi="hin_Deva",
                  bn="ben_Beng", te="tel_Telu", ta="tam_Taml", de="deu_Latn", es="spa_Latn", fr="fra_Latn",
                  it="ita_Latn", pt="por_Latn", sw="swh_Latn", tr="tur_Latn", id="ind_Latn", et="est_Latn",
                  ht="hat_Latn", qu="quy_Latn")

# -----------------------------------------------------------------------------
# loading: each load_* returns rows {id, x_en, y_en, x_tgt, y_tgt} (+ private keys starting with "_")


def join_x(instruction, inp):
    instruction, inp = (instruction or "").strip(), (inp or "").strip()
    return instruction + "\n\n" + inp if inp else instruction


def as_index(value, where):
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return int(value)
    raise UserError(f"{where}: id {value!r} is not a non-negative integer index into the English file")


def load_alpaca(en_rows, tgt_rows, tgt_name, source="alpaca"):
    """Pair English Alpaca items (id = list position) with target items by their `id` (or by position when
    no target item has an id, which requires equal lengths)."""
    has_id = ["id" in r for r in tgt_rows]
    if any(has_id) and not all(has_id):
        raise UserError(f"{tgt_name}: item {has_id.index(False)} has no 'id' field while others do")
    if not any(has_id) and len(tgt_rows) != len(en_rows):
        raise UserError(f"{tgt_name} has {len(tgt_rows)} items and no 'id' field, the English file has "
                        f"{len(en_rows)}: index alignment needs equal lengths (add an 'id' = English index)")
    rows, seen = [], {}
    for pos, t in enumerate(tgt_rows):
        where = f"{tgt_name} item {pos}"
        i = as_index(t["id"], where) if any(has_id) else pos
        if i >= len(en_rows):
            raise UserError(f"{where}: id {i} is beyond the English file ({len(en_rows)} items): "
                            "wrong file or shifted ids")
        if i in seen:
            raise UserError(f"{where}: id {i} appears twice (first at item {seen[i]}): duplicated or shifted ids")
        seen[i] = pos
        e = en_rows[i]
        row = {"id": f"alpaca-{i}", "source": source, "x_en": join_x(e.get("instruction"), e.get("input")),
               "y_en": (e.get("output") or "").strip(), "_align": t.get("align")}
        if "instruction" in t:
            row.update(x_tgt=join_x(t["instruction"], t.get("input")), y_tgt=(t.get("output") or "").strip())
            # strict check: a translation keeps the input field empty exactly when the English one is
            if bool((e.get("input") or "").strip()) != bool((t.get("input") or "").strip()):
                row["_misaligned"] = "input field empty on one side only"
        elif "prompt" in t:
            row.update(x_tgt=(t["prompt"] or "").strip(), y_tgt=(t.get("response") or "").strip())
        else:
            raise UserError(f"{where}: expected fields instruction/input/output or prompt/response, got {sorted(t)}")
        rows.append(row)
    rows.sort(key=lambda r: int(r["id"].split("-")[1]))
    return rows


def gsm8k_answer(text):
    """GSM8K chain of thought -> our y (see module docstring) and its final number."""
    text = GSM8K_CALCULATOR.sub("", text.strip())
    m = re.search(r"\n?####\s*(.+?)\s*$", text)
    if m:
        number = m.group(1).replace(",", "")
        return text[:m.start()].rstrip() + "\n" + GSM8K_ANSWER_TEMPLATE.format(answer=number), number
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", unicodedata.normalize("NFKC", text))
    return text, numbers[-1].replace(",", "") if numbers else None


def same_number(a, b):
    try:
        return a is not None and b is not None and float(a) == float(b)
    except ValueError:
        return a == b


def load_gsm8k(en_rows, tgt_rows, source="gsm8k"):
    """tgt_rows: (where, gsm8k_train_index, question, answer or None). The English answer is copied to the
    target side when there is no translated one; the final numbers must agree either way."""
    bad = next((k for k, r in enumerate(en_rows) if not {"question", "answer"} <= set(r)), None)
    if bad is not None:
        raise UserError(f"English GSM8K item {bad} lacks 'question' or 'answer': pass GSM8K's train.jsonl")
    rows, seen = [], {}
    for where, i, question, answer in tgt_rows:
        i = as_index(i, where)
        if i >= len(en_rows):
            raise UserError(f"{where}: index {i} is not a GSM8K train index (0..{len(en_rows) - 1}): wrong file?")
        if i in seen:
            raise UserError(f"{where}: index {i} appears twice (first at {seen[i]})")
        seen[i] = where
        y_en, n_en = gsm8k_answer(en_rows[i]["answer"])
        row = {"id": f"gsm8k-{i}", "source": source, "x_en": en_rows[i]["question"].strip(), "y_en": y_en,
               "x_tgt": (question or "").strip(), "_y_english": not answer}
        row["y_tgt"], n_tgt = gsm8k_answer(answer) if answer else (y_en, n_en)
        if not same_number(n_en, n_tgt):
            row["_misaligned"] = f"final answer {n_en} (English) != {n_tgt} (target)"
        rows.append(row)
    rows.sort(key=lambda r: int(r["id"].split("-")[1]))
    return rows


def read_gsm8k_tsv(path):
    out = []
    with common.open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            cols = line.rstrip("\r\n").split("\t")
            if len(cols) not in (2, 3) or not cols[0].strip().isdigit():
                raise UserError(f"{path}: line {lineno} is not 'gsm8k_train_index<TAB>question[<TAB>answer]'")
            answer = cols[2].replace("\\n", "\n") if len(cols) == 3 else None  # one line per item: newlines as \n
            out.append((f"{path} line {lineno}", int(cols[0]), cols[1], answer))
    return out


def read_lines(path):
    with common.open_text(path) as f:
        return [line.rstrip("\r\n") for line in f]


def load_parallel(en_lines, tgt_lines, en_name, tgt_name, corpus):
    if len(en_lines) != len(tgt_lines):
        raise UserError(f"line-aligned files differ in length: {en_name} has {len(en_lines)} lines, {tgt_name} "
                        f"has {len(tgt_lines)} (line {min(len(en_lines), len(tgt_lines)) + 1} exists on one side only)")
    return [{"id": f"{corpus}-{i}", "source": corpus, "x_en": PARALLEL_TEMPLATE.format(sentence=en.strip()),
             "y_en": en.strip(), "x_tgt": PARALLEL_TEMPLATE.format(sentence=tgt.strip()), "y_tgt": tgt.strip()}
            for i, (en, tgt) in enumerate(zip(en_lines, tgt_lines))]


def parse_fields(spec, required, optional=()):
    fields = dict(item.split("=", 1) for item in common.parse_list(spec or "") if "=" in item)
    missing = [k for k in required if k not in fields]
    unknown = [k for k in fields if k not in required and k not in optional]
    if missing or unknown:
        raise UserError(f"--hub-fields must map {', '.join(required)} (optional: {', '.join(optional) or '-'}) to "
                        f"dataset columns, e.g. {','.join(k + '=COLUMN' for k in required)}"
                        + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    return fields


def load_hub_rows(name, config, split):
    import datasets
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # unreachable hub, unknown name or config, missing split
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"cannot load hub dataset {name!r} (config {config}, split {split}): "
                        f"{type(e).__name__}: {msg}; "
                        "check the name while the hub is reachable, or use local files (--source alpaca/gsm8k/parallel "
                        "with --en-file/--tgt-file)") from None
    return [dict(r) for r in ds]


def rename(rows, fields):
    return [{**r, **{key: r.get(col) for key, col in fields.items()}} for r in rows]


def load_rows(args, translate):
    """Rows for --source (target fields None when `translate`), and the input files for the stats."""
    data = lambda p: os.path.join(args.data_dir, p)
    lang = args.lang
    if args.source == "alpaca":
        en_path = args.en_file or data(ALPACA_EN)
        en_rows = read_json_list(en_path)
        if translate:
            return [{"id": f"alpaca-{i}", "source": "alpaca", "x_en": join_x(e.get("instruction"), e.get("input")),
                     "y_en": (e.get("output") or "").strip()} for i, e in enumerate(en_rows)], [en_path]
        tgt_paths = args.tgt_file or [data(p) for p in ALPACA_TGT[lang]]
        tgt_rows = [r for p in tgt_paths for r in read_json_list(p)]
        return load_alpaca(en_rows, tgt_rows, " + ".join(tgt_paths)), [en_path, *tgt_paths]
    if args.source == "gsm8k":
        en_path = args.en_file or data(GSM8K_EN)
        en_rows = common.read_jsonl(en_path)
        if translate:
            return load_gsm8k(en_rows, [(f"{en_path} line {i + 1}", i, None, None)
                                        for i in range(len(en_rows))]), [en_path]
        tgt_paths = args.tgt_file or [data(GSM8K_TGT.format(lang=lang))]
        return load_gsm8k(en_rows, [r for p in tgt_paths for r in read_gsm8k_tsv(p)]), [en_path, *tgt_paths]
    if args.source == "parallel":
        en_tpl, tgt_tpl, codes = PARALLEL[args.corpus]
        code = codes.get(lang, lang)
        en_path = args.en_file or data(en_tpl.format(code=code))
        tgt_path = (args.tgt_file or [data(tgt_tpl.format(code=code))])[0]
        if args.corpus == "ntrex":
            print("warning: NTREX is 03_evaluate's translation test set: do not evaluate translation on a model "
                  "trained on these pairs")
        return load_parallel(read_lines(en_path), read_lines(tgt_path), en_path, tgt_path, args.corpus), \
            [en_path, tgt_path]
    # hub: load, rename columns, then the same code path as the local files
    hub = load_hub_rows(args.hub_dataset, args.hub_config, args.hub_split)
    source = f"hub:{args.hub_dataset}"
    if args.hub_layout == "columns":
        req = ("x_en", "y_en") if translate else ("x_en", "y_en", "x_tgt", "y_tgt")
        fields = parse_fields(args.hub_fields, req, ("id",))
        rows = []
        for i, r in enumerate(rename(hub, fields)):
            rows.append({"id": f"hub-{r['id'] if 'id' in fields else i}", "source": source,
                         **{k: str(r[k] or "").strip() for k in req}})
        if len({r["id"] for r in rows}) != len(rows):
            dup = next(k for k, n in Counter(r["id"] for r in rows).items() if n > 1)
            raise UserError(f"hub dataset {args.hub_dataset}: id {dup!r} appears more than once")
        return rows, [source]
    if translate:
        raise UserError("--translate-model with --source hub needs --hub-layout columns (x_en=..,y_en=..)")
    en_path = args.en_file or data(ALPACA_EN if args.hub_layout == "alpaca" else GSM8K_EN)
    if args.hub_layout == "alpaca":
        hub = rename(hub, parse_fields(args.hub_fields, (),
                                       ("id", "instruction", "input", "output", "prompt", "response")))
        return load_alpaca(read_json_list(en_path), hub, source, source), [en_path, source]
    fields = parse_fields(args.hub_fields, ("id", "question"), ("answer",))
    hub = [(f"{source} row {k}", r["id"], r["question"], r.get("answer")) for k, r in enumerate(rename(hub, fields))]
    return load_gsm8k(common.read_jsonl(en_path), hub, source), [en_path, source]


def read_json_list(path):
    """A JSON list, or JSONL (one object per line) when the name ends in .jsonl."""
    rows = common.read_jsonl(path) if path.endswith((".jsonl", ".jsonl.gz")) else common.read_json(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: expected a JSON list of objects")
    return rows


# -----------------------------------------------------------------------------
# alignment check, filters, split, stats

NUMBER = re.compile(r"\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?![\d.,])|\d+(?:[.,]\d+)*")  # "21 122" (fr) is one number
LIST_MARKER = re.compile(r"(?m)^\s*[(\[]?\d{1,2}[.):\]]\s")  # "1. ", "(2) ": list numbering, not content
HTML_ENTITY = re.compile(r"&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);")
CJK_DIGITS = dict(zip("零〇一二两三四五六七八九", (0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9)))
CJK_UNITS = {"十": 10, "百": 100, "千": 1000}
CJK_NUMBER = re.compile(r"[零〇一二两三四五六七八九十百千]+")
# Number words 2..20 and the tens, read on the target side only (the English side counts digits), for the
# languages whose translations spell out digits of the English (GSM8K: "douze", "achtzig", "ishirini"); "one" is
# left out (an article in de/es/fr/vi). They can only add matches, so a missed compound costs nothing.
_TENS = (20, 30, 40, 50, 60, 70, 80, 90, 100)
NUMBER_WORDS = {
    "de": ("zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn siebzehn "
           "achtzehn neunzehn zwanzig", "zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig hundert"),
    "es": ("dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince dieciséis diecisiete "
           "dieciocho diecinueve veinte", "veinte treinta cuarenta cincuenta sesenta setenta ochenta noventa cien"),
    "fr": ("deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize dix-sept dix-huit "
           "dix-neuf vingt",
           "vingt trente quarante cinquante soixante soixante-dix quatre-vingts quatre-vingt-dix cent"),
    "ru": ("два три четыре пять шесть семь восемь девять десять одиннадцать двенадцать тринадцать четырнадцать "
           "пятнадцать шестнадцать семнадцать восемнадцать девятнадцать двадцать",
           "двадцать тридцать сорок пятьдесят шестьдесят семьдесят восемьдесят девяносто сто"),
    "sw": ("mbili tatu nne tano sita saba nane tisa kumi", "ishirini thelathini arobaini hamsini sitini sabini "
           "themanini tisini mia"),
}
NUMBER_WORDS = {lang: {**dict(zip(small.split(), range(2, 21))), **dict(zip(tens.split(), _TENS))}
                for lang, (small, tens) in NUMBER_WORDS.items()}
NUMBER_WORDS["ru"].update(dict(zip("двух трёх трех четырёх четырех пяти шести семи восьми девяти десяти".split(),
                                   (2, 3, 3, 4, 4, 5, 6, 7, 8, 9, 10))))  # genitive forms ("из двух")
WORD = re.compile(r"[^\W\d_]+(?:[-'’][^\W\d_]+)*")
NUMBER_WORDS["vi"] = dict(zip("hai ba bốn năm sáu bảy tám chín mười".split(), range(2, 11)))
SHIFT_MIN_RUN = 3  # consecutive pairs failing the number check before a run is tested as a shift
SHIFT_MIN_VOTES = 2 / 3  # share of such a run that its neighbour's English explains, for a shift


def unescape_targets(rows):
    """Undo HTML escaping that MT services leave behind (zh carbonz0: &quot; &lt; &gt; &#39; in 3% of the
    items, never in the English): code and quotes would otherwise be trained with entities. Returns the count."""
    n = 0
    for r in rows:
        for f in ("x", "y"):
            t = r.get(f + "_tgt")
            if t and HTML_ENTITY.search(t) and not HTML_ENTITY.search(r[f + "_en"]):
                r[f + "_tgt"] = html.unescape(t)
                n += 1
    return n


def cjk_number(run):
    """"二十五" -> 25, "一" -> 1: Chinese/Japanese translations write many of the English digits this way."""
    total, digit = 0, 0
    for c in run:
        if c in CJK_DIGITS:
            digit = CJK_DIGITS[c]
        else:
            total, digit = total + (digit or 1) * CJK_UNITS[c], 0
    return str(total + digit)


def numbers(text, lang="en"):
    """The numbers a text carries, as digit strings without separators and without leading or trailing zeros,
    so that 4.99 = 4,99, 21,122 = 21 122 and 20 (million) = 2000 (万) compare equal; list numbering is left
    out (it survives any shift); in a target language, CJK numerals and NUMBER_WORDS are read as digits."""
    text = LIST_MARKER.sub(" ", unicodedata.normalize("NFKC", text))
    if lang in ("zh", "ja"):
        text = CJK_NUMBER.sub(lambda m: f" {cjk_number(m.group())} " if m.group() != "一" else m.group(), text)
    found = [re.sub(r"[.,\s]", "", n) for n in NUMBER.findall(text)]
    words = NUMBER_WORDS.get(lang)  # none for "en"
    if words:
        found += [str(words[w]) for w in WORD.findall(text.casefold()) if w in words]
    return {n.strip("0") or "0" for n in found}


def pair_numbers(row, lang):
    """(English numbers, target numbers) of a pair; GSM8K's copied English answers are left out of both."""
    y_en, y_tgt = ("", "") if row.get("_y_english") else (row["y_en"], row["y_tgt"])
    return numbers(row["x_en"] + "\n" + y_en), numbers(row["x_tgt"] + "\n" + y_tgt, lang)


def carries(en, tgt):
    """The target carries the English numbers: at least half of them (a translation may spell one out)."""
    return bool(en) and len(en & tgt) >= len(en) / 2


def find_shift(rows, en_nums, tgt_nums):
    """The first local shift: a run of pairs that do not carry their own English numbers, where targets carry the
    numbers of the next (or previous) id's English in >= SHIFT_MIN_RUN pairs and as many as SHIFT_MIN_VOTES of
    the run's failures (each shifted number shows twice: a failure at its own id, a vote at its neighbour's).
    Only numbers of >= 2 digits count here ("24", "1867"): "1" and "2" are in every other text and would match
    by chance.
    A run ends at a pair that carries its own numbers and no neighbour's. Returns (first id, last id,
    direction, votes, pairs in the run) or None."""
    specific = lambda nums: {n for n in nums if len(n) >= 2}
    en, tgt = [specific(e) for e in en_nums], [specific(t) for t in tgt_nums]
    test = lambda i, j: carries(en[j], tgt[i]) if 0 <= j < len(rows) and en[j] else None
    run, votes, fails = [], Counter(), 0

    def verdict():
        direction, n = max(votes.items(), key=lambda kv: kv[1], default=("next", 0))
        if n >= SHIFT_MIN_RUN and n >= SHIFT_MIN_VOTES * fails:
            return rows[run[0]]["id"], rows[run[-1]]["id"], direction, n, fails
        return None

    for i in range(len(rows)):
        own, nxt, prev = test(i, i), test(i, i + 1), test(i, i - 1)
        if own and not (nxt or prev):  # aligned: the run (if any) ends here
            found = verdict() if run else None
            if found:
                return found
            run, votes, fails = [], Counter(), 0
        elif not own and (own is not None or nxt or prev):  # fails, or carries a neighbour's numbers
            run.append(i)
            fails += own is False
            votes.update(["next"] * bool(nxt) + ["previous"] * bool(prev))
    return verdict() if run else None


def verify_alignment(rows, lang, min_agreement, max_misaligned):
    """Raise a UserError naming where the pairs stop matching; mark single pairs whose target side lacks the
    English numbers (row["_numbers"], dropped by filter_pairs); return a summary for the stats.
    Three levels: strict per-pair checks of the source (_misaligned), the number check per pair and per local
    run (a shifted block is an error: its edges, pairs without numbers, cannot be told apart, so dropping the
    run would keep shifted pairs), and a sliding window over the whole file (a file shifted from some id on)."""
    bad = [r for r in rows if r.get("_misaligned")]
    if len(bad) > max_misaligned * len(rows):
        raise UserError(f"{len(bad)} of {len(rows)} pairs fail the per-pair alignment check, first {bad[0]['id']}: "
                        f"{bad[0]['_misaligned']} (also {', '.join(r['id'] for r in bad[1:4])}); the target side looks "
                        "shifted or mismatched: check the ids / files (--max-misaligned sets the tolerance)")
    en_nums, tgt_nums = zip(*(pair_numbers(r, lang) for r in rows)) if rows else ((), ())
    if min_agreement > 0:
        shift = find_shift(rows, en_nums, tgt_nums)
        if shift:
            first, last, direction, votes, n = shift
            raise UserError(f"ids {first} .. {last} look shifted by one: {n} pairs with numbers there in a row do not "
                            f"carry their own English numbers, and {votes} targets there carry those of the "
                            f"{direction} id's English; "
                            "a row was inserted or lost in the target file there: fix it "
                            "(--align-min-agreement 0 skips the alignment checks)")
    evidence = []  # (id, agrees) for pairs whose English side carries >= NUMBERS_CHECKED numbers
    for r, en, tgt in zip(rows, en_nums, tgt_nums):
        if len(en) >= NUMBERS_CHECKED:
            evidence.append((r["id"], carries(en, tgt)))
            if not en & tgt:
                r["_numbers"] = f"English numbers {' '.join(sorted(en, key=len)[:6])} absent from the target side"
    summary = {"per_pair_failures": len(bad), "number_pairs": len(evidence),
               "number_agreement": round(sum(a for _, a in evidence) / len(evidence), 4) if evidence else None,
               "numbers_absent": sum(bool(r.get("_numbers")) for r in rows),
               "window": min(ALIGN_WINDOW, len(evidence)), "min_window_agreement": None}
    if len(evidence) < ALIGN_MIN_EVIDENCE:
        return summary
    w = summary["window"]
    cum = [0, *itertools.accumulate(a for _, a in evidence)]
    scores = [(cum[k + w] - cum[k]) / w for k in range(len(evidence) - w + 1)]
    summary["min_window_agreement"] = round(min(scores), 4)
    if min_agreement > 0 and min(scores) < min_agreement:
        k = next(k for k, s in enumerate(scores) if s < min_agreement)
        raise UserError(f"alignment check failed at {evidence[k][0]} .. {evidence[k + w - 1][0]}: only "
                        f"{round(scores[k] * w)} of {w} pairs there share their numbers between the English and "
                        f"target side (aligned data: > 90%, needed {min_agreement:.0%}); the ids or lines look "
                        "shifted from there on (--align-min-agreement 0 skips this check)")
    return summary


# -----------------------------------------------------------------------------
# content: what may stay English, code, untranslated prose

# Spans that stay the same in every language, removed before a text is judged untranslated or in the wrong
# script: URLs, e-mail addresses, hashtags and @handles, file / domain / dotted names, tokens with code
# characters inside (snake_case, a/b, x=y, <tag>), and numbers.
_NS = r"[^\s\u2e80-\u9fff\uac00-\ud7af\uff00-\uffef]"  # a non-space that is not CJK (CJK runs have no spaces)
NEUTRAL = re.compile(rf"(?:https?://|www\.){_NS}+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+|[#@]\w+"
                     rf"|{_NS}*\w[._/\\<>{{}}=|^~`*]\w{_NS}*|</?\w[^>]*>|{_NS}*\d{_NS}*")
# English function words: prose has ~40% of them, lists of names, titles, code and tags have few
EN_FUNCTION = set("""a an the of to in on at by for with from into about over after before between through during
and or but nor so if then than as that this these those there here it its is are was were be been being am has
have had do does did will would shall should can could may might must not no you your we our they their them he
his she her him i my me which who whom what when where how why all any each some more most very also just only
such own same other too""".split())
# Code is recognised by lines of a code-bearing text: a text is code-bearing when one line carries an unmistakable
# sign (CODE_STRONG); its code lines are then those signs, the lines a program is made of (CODE_LINE), and
# lines indented under a code line. Measured on Alpaca zh: 449 answers with code, keywords translated in most.
SQL_HEAD = r"(?:SELECT|INSERT INTO|UPDATE|DELETE FROM|CREATE (?:TABLE|VIEW|INDEX|DATABASE)|ALTER TABLE|DROP TABLE)"
CODE_STRONG = re.compile(
    r"^\s*```|^\s*" + SQL_HEAD + r"\b|\b" + SQL_HEAD + r"\b.*(?:\bFROM\b|\bSET\b|\bVALUES\b|\bAS\b|\(|\*|;\s*$)"
    r"|^\s*(?:def|class)\s+\w+\s*[(:]|^\s*(?:import\s+\w+|from\s+[\w.]+\s+import\b|#include\b|using\s+namespace\b)"
    r"|^\s*(?:public|private|protected|static)\s+[\w<>\[\]]+\s+\w+|^\s*function\s+\w*\s*\("
    r"|^\s*(?:var|let|const)\s+\w+\s*=|^\s*for\s*\(.*;.*;|\bcout\s*<<|\b[a-z_]\w*\s*\+\+\s*[;)]"
    r"|\w\s*(?:==|!=|\+=|-=|=>|&&|\|\|)|\b(?:print|console\.log|printf|println|"
    r"System\.out\.println)\s*\(|^\s*</?(?:html|head|body|div|p|span|img|a|ul|ol|li|table|tr|td|h[1-6]|script|"
    r"style|form|input|button)\b[^>]*>", re.M)
CODE_LINE = re.compile(
    r"^\s*(?:[A-Za-z_][\w.\[\]'\"]*\s*[-+*/%]?=[^=]|[\w.]+\(.*\)\s*;?\s*$|(?:if|elif|for|while|with|except|else|"
    r"try|finally|switch|case)\b.*[:{]\s*$|(?:if|for|while|switch)\s*\(|(?:return|break|continue|pass|else|end)\b"
    r"|[{}]|(?:FROM|WHERE|ORDER BY|GROUP BY|HAVING|LIMIT|INNER JOIN|LEFT JOIN|RIGHT JOIN|JOIN|ON|AND|OR|VALUES|"
    r"SET|UNION)\b)")
CODE_COMMENT = re.compile(r"(?:^|\s)(?:#(?!include\b)|//|--).*$|/\*.*?\*/")
CODE_STRING = re.compile(r"\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|\"[^\"\n]*\"|'[^'\n]*'|‘[^’\n]*’|“[^”\n]*”|`[^`\n]*`")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def code_lines(text):
    """The lines of text that are code (see CODE_STRONG), [] for prose. Fenced blocks count whole."""
    if not CODE_STRONG.search(text):
        return []
    out, fence, prev_code = [], False, False
    for line in text.split("\n"):
        if line.strip().startswith("```"):
            fence, prev_code = not fence, False
            continue
        indented = prev_code and line[:1] in (" ", "\t") and line.strip()
        is_code = fence or indented or bool(CODE_STRONG.search(line) or CODE_LINE.match(line))
        if is_code:
            out.append(line)
        prev_code = is_code or (prev_code and not line.strip())
    return out


def code_identifiers(text):
    """Identifiers and keywords of the code in text: comments, string literals and the text between HTML
    tags are left out (they are natural language, translated correctly)."""
    text = re.sub(r"\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''", " ", text)  # docstrings
    found = Counter()
    for line in code_lines(text):
        sql = re.search(r"\b" + SQL_HEAD + r"\b", line)
        line = line[sql.start():] if sql else line  # "The query is: SELECT ...": the prose before it is not code
        line = CODE_STRING.sub(" ", CODE_COMMENT.sub("", line))
        if re.match(r"\s*<", line):
            line = " ".join(re.findall(r"<[^>]*>", line))
        found.update(IDENT.findall(line))
    return found  # a Counter: "FROM books" twice needs "books" twice


def broken_code(en, tgt):
    """Identifiers / keywords of the English code that the target lacks ("SELECT" -> "选择", "return" -> "返回"):
    such code no longer runs, and 02 would train the model to write it."""
    idents = code_identifiers(en)
    if not idents:
        return []
    have = Counter(IDENT.findall(tgt))
    return sorted(w for w, n in idents.items() if have[w] < n)


def normalised(text):
    """Case, whitespace and punctuation removed: "Tom  has 3 apples." == "tom has 3 apples"."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if c.isalnum())


def prose_words(text):
    """Words of the natural-language part of text: code lines and NEUTRAL spans removed."""
    code = set(code_lines(text))
    text = "\n".join(line for line in text.split("\n") if line not in code)
    return WORD.findall(NEUTRAL.sub(" ", text))


def english_prose(words):
    """Running English: >= 2 lower-case function words making >= 15% of the words ("Apple Inc. was founded in
    1976."), which lists of names and titles ("The Rolling Stones, Queen and The Beatles" has one), hashtags,
    ciphers and tags do not reach. One-letter tokens are left out (letter grids, notes "A G G", variables)."""
    words = [w for w in words if len(w) > 1]
    func = sum(w in EN_FUNCTION for w in words)
    return func >= 2 and func >= ENGLISH_FUNCTION_SHARE * len(words)


def weight(word):
    """Letters of a word, a CJK character counting CJK_WEIGHT: "后天" carries what "the day after tomorrow" does."""
    return len(word) + (CJK_WEIGHT - 1) * len(CJK_CHAR.findall(word))


def english_share(en, tgt):
    """(weighted letters of the target's prose words that are words of the English side, all its prose letters,
    the shared words): a copy of the English scores 1.0, a translation into another script ~0, into a Latin
    script 0.1-0.4 (names, cognates), a Chinese instruction quoting an English sentence ~0.5."""
    vocab = {w.casefold() for w in WORD.findall(en)}
    words = prose_words(tgt)
    shared = [w for w in words if w.casefold() in vocab]
    return sum(map(weight, shared)), sum(map(weight, words)), shared


def untranslated(en, tgt, min_letters, instruction=False, x_tgt=""):
    """The target is English prose left untranslated. Judged on the prose words (code and NEUTRAL spans
    removed): either the texts are equal once normalised, or >= UNTRANSLATED_SHARE of the target's prose letters
    are English words of the English side; and what is shared is running English (english_prose), so an answer
    that is a name, a list, a URL, code or a cipher may stay as it is."""
    shared_letters, all_letters, shared = english_share(en, tgt)
    if instruction and shared and normalised(en) == normalised(tgt):
        return True  # an instruction is always to be translated ("Divide 100 by 7."), unless it is all code / URLs
    if shared_letters < min_letters or not english_prose(shared):
        return False
    quoted = {w.casefold() for w in WORD.findall(x_tgt)}
    if sum(w.casefold() in quoted for w in shared) >= len(shared) / 2:
        return False  # the target instruction keeps the English text this answer works on (spell-check, edit)
    return normalised(en) == normalised(tgt) or shared_letters >= UNTRANSLATED_SHARE * all_letters


def wrong_script(en, tgt, lang, min_letters):
    """The target (>= min_letters letters of prose) lacks the language's script (common.LANGUAGES; Vietnamese:
    its diacritics) and is not a copy of the English side (copies are judged by `untranslated`)."""
    if sum(map(len, prose_words(tgt))) < min_letters or common.has_script(tgt, lang):
        return False
    shared_letters, all_letters, _ = english_share(en, tgt)
    return shared_letters < COPY_SHARE * all_letters and normalised(en) != normalised(tgt)


def token_lengths(rows, tokenizer):
    """Tokens of the longest sequence the trainer builds from each pair: prompt (with the tokenizer's special
    tokens, e.g. BOS) and continuation tokenized apart, as 02_train_dft.py encodes them, + EOS (counted on LC's too,
    which 02 ends without one: the budget errs one token long there)."""
    n = lambda texts, special: [len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]
    p_en = n([common.build_prompt(r["x_en"]) for r in rows], True)
    p_tgt = n([common.build_prompt(r["x_tgt"]) for r in rows], True)
    x_en, y_en, y_tgt = (n([r[k] for r in rows], False) for k in ("x_en", "y_en", "y_tgt"))
    # SFT [P(x_en); y_en], TFT [P(x_tgt); y_tgt], LC [P(x_tgt); x_en], ET [P(x_tgt); y_en]
    return [max(a + d, b + e, b + c, b + d) + 1 for a, b, c, d, e in zip(p_en, p_tgt, x_en, y_en, y_tgt)]


def drop_reason(row, lang, min_ratio, max_ratio, anchors_only=False):
    """The first reason (DROP_REASONS order) to drop a pair, or None to keep it."""
    if row.get("_misaligned"):
        return "misaligned"
    if anchors_only and row.get("_align") not in (None, "anchor"):
        return "not_anchor"
    if not all(row[k].strip() for k in ("x_en", "y_en", "x_tgt", "y_tgt")):
        return "empty"
    if row.get("_numbers"):
        return "numbers_absent"
    # (English, target, is the instruction): an instruction copied unchanged is untranslated at any length (an
    # instruction is always translated); otherwise from JUDGE_MIN_LETTERS letters of prose on (a short answer is
    # often the same in every language)
    sides = ([(row["x_en"], row["x_tgt"], True)]
             + ([] if row.get("_y_english") else [(row["y_en"], row["y_tgt"], False)]))
    if any(broken_code(en, tgt) for en, tgt, _ in sides):
        return "code_translated"
    if any(untranslated(en, tgt, JUDGE_MIN_LETTERS, instruction, "" if instruction else row["x_tgt"])
           for en, tgt, instruction in sides):
        return "untranslated"
    if any(wrong_script(en, tgt, lang, JUDGE_MIN_LETTERS) for en, tgt, _ in sides):
        return "wrong_script"
    for en, tgt, _ in sides:
        if (len(en) >= RATIO_MIN_CHARS and len(tgt) / len(en) > max_ratio) or \
                (len(en) >= RATIO_MIN_CHARS_LOW and len(tgt) / len(en) < min_ratio):
            return "length_ratio"
    return None


def filter_pairs(rows, lang, min_ratio, max_ratio, tokenizer=None, max_tokens=None, anchors_only=False,
                 n_examples=3):
    """Return (kept rows, Counter of drops by reason, {reason: the first n_examples dropped rows}); the first
    failing reason counts. With a tokenizer, kept rows get "_tokens" (their longest training sequence) for the
    budget and the stats."""
    drops, examples, kept, seen = Counter({r: 0 for r in DROP_REASONS}), {}, [], set()

    def drop(row, reason):
        drops[reason] += 1
        if len(examples.setdefault(reason, [])) < n_examples:
            examples[reason].append(row)

    for row in rows:
        reason = drop_reason(row, lang, min_ratio, max_ratio, anchors_only)
        if reason is None and (row["x_tgt"], row["y_tgt"]) in seen:
            reason = "duplicate"  # the target example TFT trains on would count twice
        if reason:
            drop(row, reason)
        else:
            seen.add((row["x_tgt"], row["y_tgt"]))
            kept.append(row)
    if tokenizer is not None:  # last: the only slow filter, run on the survivors only
        for row, n in zip(kept, token_lengths(kept, tokenizer)):
            row["_tokens"] = n
        if max_tokens:
            for row in kept:
                if row["_tokens"] > max_tokens:
                    drop(row, "over_token_budget")
            kept = [r for r in kept if r["_tokens"] <= max_tokens]
    return kept, drops, examples


def split_order(row_id, seed):
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def id_key(row_id):
    m = re.match(r"^(.*?)(\d+)$", row_id)
    return (m.group(1), int(m.group(2))) if m else (row_id, -1)


def dev_ids(all_ids, dev_size, seed):
    """The dev split, fixed before any filter runs: the first dev_size ids of the seeded hash order over ALL
    input ids. Filters then remove some of them (not replaced), so two builds with the same input and seed
    have the same dev ids minus their own drops: a dev item of one build is never a train item of another."""
    return set(sorted(all_ids, key=lambda i: split_order(i, seed))[:dev_size])


def split_dev(rows, dev, seed, limit=None):
    """(train, dev) from the kept rows: dev = kept rows whose id is in `dev` (dev_ids); --limit caps train + dev,
    train taken in hash order after them; both returned in id order."""
    order = sorted(rows, key=lambda r: split_order(r["id"], seed))
    held = [r for r in order if r["id"] in dev]
    train = [r for r in order if r["id"] not in dev]
    if limit:
        held = held[:limit]
        train = train[:limit - len(held)]
    if held and not train:
        raise UserError(f"the dev split (--dev-size: {len(dev)} ids here) leaves no training pairs ({len(rows)} pairs "
                        "after filtering"
                        f"{', --limit ' + str(limit) if limit else ''}, {len(held)} of them dev); lower --dev-size")
    return sorted(train, key=lambda r: id_key(r["id"])), sorted(held, key=lambda r: id_key(r["id"]))


def percentiles(values, ps=(5, 50, 95)):
    if not values:
        return None
    v = sorted(values)
    out = {f"p{p}": v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))] for p in ps}
    out["max"] = v[-1]
    return out


def public(row, lang):
    return {"id": row["id"], "lang": lang, "source": row["source"], "x_en": row["x_en"], "y_en": row["y_en"],
            "x_tgt": row["x_tgt"], "y_tgt": row["y_tgt"]}


def compute_stats(lang, source, n_in, drops, dropped, kept, train, dev, alignment, n_examples=3):
    out = train + dev
    short = lambda r: {k: (v[:300] + "...") if isinstance(v, str) and len(v) > 300 else v
                       for k, v in public(r, lang).items()}
    stats = {
        "lang": lang, "source": source,
        "counts": {"in": n_in, "kept": len(kept), "dropped": sum(drops.values()),
                   "over_limit": len(kept) - len(out), "train": len(train), "dev": len(dev)},
        "drops": dict(drops),
        "alignment": alignment,
        "y_tgt_is_english": sum(bool(r.get("_y_english")) for r in out),
        "lengths_chars": {k: percentiles([len(r[k]) for r in out]) for k in ("x_en", "y_en", "x_tgt", "y_tgt")},
        "examples": [short(r) for r in train[:n_examples]],
        "dropped_examples": {reason: [short(r) for r in rows[:n_examples]] for reason, rows in dropped.items()},
    }
    if stats["y_tgt_is_english"]:
        stats["note"] = "y_tgt is the English answer for y_tgt_is_english pairs (no translated answers exist)"
    if out and "_tokens" in out[0]:
        stats["lengths_tokens"] = {"longest_training_sequence": percentiles([r["_tokens"] for r in out])}
    return stats


# -----------------------------------------------------------------------------
# machine translation (NLLB, M2M100, Marian, or any transformers seq2seq model)


def load_translator(name, device):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSeq2SeqLM.from_pretrained(name)
    except Exception as e:  # unreachable hub, not a seq2seq model, no such folder
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"cannot load translation model {name!r}: {type(e).__name__}: {msg}; "
                        "pass a local folder or the hub name of a seq2seq model (NLLB, Marian, M2M100) "
                        "while the hub is reachable") from None
    return tok, model.to(device).eval()


def lang_tokens(tok, src, tgt):
    """(src_lang value, id of the forced first target token) for multilingual models; (None, None) otherwise."""
    if NLLB_CODES.get(tgt) in tok.get_vocab():
        return NLLB_CODES[src], tok.convert_tokens_to_ids(NLLB_CODES[tgt])
    if hasattr(tok, "get_lang_id"):  # M2M100: ISO codes
        return src, tok.get_lang_id(tgt)
    return None, None


def translate(texts, tok, model, src, tgt, batch_size=16, max_length=256, desc="translate"):
    """Translate line by line (these are sentence-level models; long outputs keep their layout),
    each distinct line once, batches of similar length."""
    import torch
    from tqdm import tqdm
    src_lang, bos = lang_tokens(tok, src, tgt)
    kwargs = {}
    if bos is not None:
        tok.src_lang = src_lang
        kwargs["forced_bos_token_id"] = bos
    segments = sorted({s.strip() for t in texts for s in t.split("\n") if s.strip()}, key=lambda s: (len(s), s))
    done = {}
    for i in tqdm(range(0, len(segments), batch_size), desc=desc, unit="batch"):
        batch = segments[i:i + batch_size]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_length, num_beams=1, do_sample=False, **kwargs)
        done.update(zip(batch, (s.strip() for s in tok.batch_decode(out, skip_special_tokens=True))))
    return ["\n".join(done[s.strip()] if s.strip() else s for s in t.split("\n")) for t in texts]


def machine_translate(rows, args, device):
    """Fill x_tgt / y_tgt by MT; back-translate a sample of x to English and report chrF against x_en."""
    import sacrebleu
    tok, model = load_translator(args.translate_model, device)
    xs = translate([r["x_en"] for r in rows], tok, model, "en", args.lang, args.translate_batch_size,
                   args.translate_max_length, "translate x")
    english_y = rows and rows[0].get("_y_english")  # GSM8K: answers stay English (module docstring)
    ys = [r["y_en"] for r in rows] if english_y else translate(
        [r["y_en"] for r in rows], tok, model, "en", args.lang, args.translate_batch_size,
        args.translate_max_length, "translate y")
    for r, x, y in zip(rows, xs, ys):
        r["x_tgt"], r["y_tgt"] = x, y
    info = {"model": args.translate_model, "device": device, "rows": len(rows), "bt_model": None,
            "bt_sample": 0, "bt_chrf": None}
    bt_name = args.bt_model or (args.translate_model if lang_tokens(tok, "en", args.lang)[1] is not None else None)
    if not bt_name or not args.bt_sample:
        info["bt_note"] = "no back-translation: a one-direction model needs --bt-model (target -> English)"
        print(f"[translate] {info['bt_note']}")
        return info
    if bt_name != args.translate_model:
        tok, model = load_translator(bt_name, device)
    sample = sorted(rows, key=lambda r: split_order(r["id"], args.seed))[:args.bt_sample]
    back = translate([r["x_tgt"] for r in sample], tok, model, args.lang, "en", args.translate_batch_size,
                     args.translate_max_length, "back-translate")
    chrf = sacrebleu.corpus_chrf(back, [[r["x_en"] for r in sample]]).score
    info.update(bt_model=bt_name, bt_sample=len(sample), bt_chrf=round(chrf, 2))
    print(f"[translate] back-translation chrF of {len(sample)} sampled x (target -> English vs x_en): {chrf:.1f}")
    return info


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--source", required=True, choices=["alpaca", "gsm8k", "parallel", "hub"])
    g.add_argument("--lang", required=True, help="target language code (common.LANGUAGES)")
    g.add_argument("--data-dir", default=common.DATA_DIR, help="folder laid out like data/ (default: the shipped data)")
    g.add_argument("--en-file", help="English file instead of the shipped one")
    g.add_argument("--tgt-file", nargs="+", help="target file(s) instead of the shipped ones (concatenated)")
    g.add_argument("--corpus", choices=sorted(PARALLEL), default="tatoeba",
                   help="--source parallel: which corpus (default %(default)s; ntrex is 03_evaluate's test set)")
    g.add_argument("--anchors-only", action="store_true",
                   help="Vietnamese Alpaca: keep only the pairs aligned by an anchor (README-alignment.md)")
    g = p.add_argument_group("hub (--source hub)")
    g.add_argument("--hub-dataset", help="datasets.load_dataset name")
    g.add_argument("--hub-config", default=None, help="dataset config (subset), if it has several")
    g.add_argument("--hub-split", default="train", help="default %(default)s")
    g.add_argument("--hub-layout", choices=["columns", "alpaca", "gsm8k"], default="columns",
                   help="columns: each row holds both sides (--hub-fields x_en=..,y_en=..,x_tgt=..,y_tgt=..[,id=..]); "
                        "alpaca / gsm8k: rows are the target side of the shipped English file, joined by id "
                        "(fields id,instruction,input,output or id,prompt,response; gsm8k: id,question[,answer])")
    g.add_argument("--hub-fields", help="KEY=COLUMN,... mapping our keys to the dataset's columns")
    g = p.add_argument_group("filters and checks")
    g.add_argument("--min-ratio", type=float,
                   help="min chars(tgt)/chars(en) (default per language, LENGTH_RATIO_BOUNDS)")
    g.add_argument("--max-ratio", type=float, help="max chars(tgt)/chars(en)")
    g.add_argument("--max-tokens", type=int, help="drop pairs whose longest training sequence exceeds this")
    g.add_argument("--tokenizer", help="tokenizer (model name or folder) for --max-tokens")
    g.add_argument("--align-min-agreement", type=float, default=0.45,
                   help="min share of number-bearing pairs per window that share their numbers "
                        "(default %(default)s; 0 disables this and the local shift check)")
    g.add_argument("--max-misaligned", type=float, default=0.01,
                   help="max fraction of pairs failing the per-pair check, dropped as misaligned; more is an "
                        "error (default %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="PAIRS.jsonl; also writes PAIRS.dev.jsonl and PAIRS.stats.json")
    g.add_argument("--dev-size", type=int, default=200,
                   help="ids held out to PAIRS.dev.jsonl, chosen before filtering (the ones filters drop are not "
                        "replaced, so about this many pairs; default %(default)s; 0: none)")
    g.add_argument("--limit", type=int, help="cap on train+dev pairs (surviving dev pairs, then train in seeded order)")
    g.add_argument("--seed", type=int, default=0, help="seeds the split and --limit (default %(default)s)")
    g = p.add_argument_group("machine translation of the English side")
    g.add_argument("--translate-model", help="transformers seq2seq model (e.g. facebook/nllb-200-distilled-600M)")
    g.add_argument("--bt-model", help="target->English model for the back-translation chrF (default: the same "
                                      "model when it is multilingual)")
    g.add_argument("--bt-sample", type=int, default=50,
                   help="items back-translated for the chrF estimate (default %(default)s)")
    g.add_argument("--translate-batch-size", type=int, default=16, help="default %(default)s")
    g.add_argument("--translate-max-length", type=int, default=256,
                   help="max tokens per translated line (default %(default)s)")
    g.add_argument("--device", default=None, help="default: cuda when available")
    return p.parse_args(argv)


def check_args(args):
    common.check_lang(args.lang)
    if args.lang == "en":
        raise UserError("--lang must be the non-English target language (the English side is always built)")
    if not args.out.endswith(".jsonl"):
        raise UserError(f"--out must end in .jsonl (got {args.out}); the dev split and stats are named after it")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; give a file name ending in .jsonl")
    if args.dev_size < 0 or (args.limit is not None and args.limit <= 0):
        raise UserError("--dev-size must be >= 0 and --limit > 0")
    if args.max_tokens and not args.tokenizer:
        raise UserError("--max-tokens needs --tokenizer (the model you will train, e.g. " + common.DEFAULT_MODEL + ")")
    name = common.LANGUAGES[args.lang][0]
    translate = bool(args.translate_model)
    if args.source == "alpaca" and not translate and not args.tgt_file and args.lang not in ALPACA_TGT:
        raise UserError(f"no aligned {name} Alpaca ships with the repo (only {', '.join(ALPACA_TGT)}); use --source "
                        "hub, --translate-model, or --tgt-file with an id-aligned translation")
    if args.source == "gsm8k" and not translate and not args.tgt_file and args.lang not in GSM8K_LANGS:
        raise UserError(f"no GSM8K translation into {name} ships (only {' '.join(GSM8K_LANGS)}); use --translate-model "
                        "or --tgt-file")
    if args.source == "parallel":
        if translate:
            raise UserError("--source parallel already has both sides; --translate-model is for alpaca, gsm8k or hub")
        if not args.tgt_file and args.lang not in PARALLEL[args.corpus][2]:
            others = [c for c in PARALLEL if args.lang in PARALLEL[c][2]]
            raise UserError(f"the {args.corpus} corpus here has no {name}"
                            + (f"; try --corpus {others[0]}" if others else "; pass --en-file and --tgt-file"))
    if args.source == "hub" and not args.hub_dataset:
        raise UserError("--source hub needs --hub-dataset NAME")


def load_tokenizer(name):
    from transformers import AutoTokenizer
    path = name if os.path.isdir(name) else common.resolve_model(name)[0]
    return AutoTokenizer.from_pretrained(path)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    common.seed_everything(args.seed)
    t0 = time.time()
    base = args.out[:-len(".jsonl")]
    dev_path, stats_path = base + ".dev.jsonl", base + ".stats.json"
    translate = bool(args.translate_model)
    try:
        rows, inputs = load_rows(args, translate)
    except common.MissingFile as e:
        raise UserError(f"{e}: the shipped files are read from --data-dir {args.data_dir} (laid out like data/); "
                        "--en-file / --tgt-file name your own") from None
    if not rows:
        raise UserError(f"no pairs in {', '.join(inputs)}: the target file(s) hold no items")
    translation = None
    if translate:
        if args.limit:  # translate only what can be kept; filtered rows are not replaced
            rows = sorted(sorted(rows, key=lambda r: split_order(r["id"], args.seed))[:args.limit],
                          key=lambda r: id_key(r["id"]))
        import torch
        translation = machine_translate(rows, args, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        alignment = {"note": "target side machine-translated from the English side"}
    else:
        alignment = verify_alignment(rows, args.lang, args.align_min_agreement, args.max_misaligned)
    unescaped = unescape_targets(rows)
    lo, hi = LENGTH_RATIO_BOUNDS.get(args.lang, DEFAULT_RATIO_BOUNDS)
    lo = lo if args.min_ratio is None else args.min_ratio
    hi = hi if args.max_ratio is None else args.max_ratio
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    dev_set = dev_ids([r["id"] for r in rows], args.dev_size, args.seed)  # before any filter: see dev_ids
    kept, drops, examples = filter_pairs(rows, args.lang, lo, hi, tokenizer, args.max_tokens, args.anchors_only)
    name = common.LANGUAGES[args.lang][0]
    if drops["wrong_script"] > len(rows) / 2:
        raise UserError(f"{drops['wrong_script']} of {len(rows)} target texts lack the {name} script: is --lang "
                        f"{args.lang} the language of the target file?")
    if not kept:
        raise UserError(f"0 pairs left after filtering: drops by reason {dict((k, v) for k, v in drops.items() if v)}")
    train, dev = split_dev(kept, dev_set, args.seed, args.limit)
    stats = compute_stats(args.lang, args.source, len(rows), drops, examples, kept, train, dev, alignment)
    stats["counts"]["dev_chosen"] = len(dev_set)  # dev ids fixed before filtering; "dev" of them survived
    stats["ratio_bounds"] = [lo, hi]
    stats["html_unescaped_fields"] = unescaped
    stats["translation"] = translation
    stats["inputs"] = [{"path": p} if p.startswith("hub:") else
                       {"path": common.resolve_path(p), "sha256": common.sha256_file(p)} for p in inputs]
    stats["args"] = vars(args)
    stats["outputs"] = {"train": args.out, "dev": dev_path if dev else None}
    stats["seconds"] = round(time.time() - t0, 1)
    # everything is computed before the first write; each file is written atomically
    common.write_jsonl(args.out, (public(r, args.lang) for r in train))
    if dev:
        common.write_jsonl(dev_path, (public(r, args.lang) for r in dev))
    elif os.path.exists(dev_path):
        os.remove(dev_path)  # a stale dev file from an earlier run could share ids with this train file
    common.write_json(stats_path, stats)
    print_summary(stats, args, dev_path, stats_path)


def print_summary(stats, args, dev_path, stats_path):
    c = stats["counts"]
    print(f"\n{args.source} -> {args.lang}: {c['in']} pairs in, {c['kept']} kept, "
          f"{c['train']} train + {c['dev']} dev ({stats['seconds']}s)")
    print(f"  {'drop reason':<18}{'pairs':>8}")
    for reason, n in stats["drops"].items():
        print(f"  {reason:<18}{n:>8}")
    if c["over_limit"]:
        print(f"  {'(over --limit)':<18}{c['over_limit']:>8}")
    print(f"  {'chars p50 / p95':<18}" + "   ".join(
        f"{k} {v['p50']}/{v['p95']}" for k, v in stats["lengths_chars"].items()))
    a = stats["alignment"]
    if a.get("number_pairs"):
        print(f"  alignment: {a['number_pairs']} pairs with numbers, {a['number_agreement']:.1%} agree "
              f"(worst window {a['min_window_agreement']}), {a['per_pair_failures']} per-pair failures")
    if "number_pairs" in a and a["number_pairs"] < ALIGN_MIN_EVIDENCE:
        print(f"  warning: only {a['number_pairs']} pairs carry >= {NUMBERS_CHECKED} numbers on the English side, "
              f"too few (< {ALIGN_MIN_EVIDENCE}) to check the alignment of the rest; make sure the two sides are "
              "aligned (e.g. read a few pairs of the output)")
    if stats["y_tgt_is_english"]:
        print(f"  y_tgt is the English answer in {stats['y_tgt_is_english']} pairs (no translated answers)")
    print(f"  wrote {args.out}" + (f", {dev_path}" if c["dev"] else "") + f", {stats_path}")


if __name__ == "__main__":
    common.run_main(main)
