r"""
Stage 3: evaluation that is exact, comparable and auditable (DESIGN §4).

Every score carries n, a standard error and the scorer's name; every item's prompt, output (or choice
log-likelihoods), gold answer and verdict is saved next to the score, so any number can be audited.
Prompt formats copy lm-evaluation-harness (v0.4.13 task YAMLs) where it has the task, so numbers are
comparable with published ones.

Examples
  # the paper's suite for two models (the base model and a DFT checkpoint); adds to runs/eval/results.md
  python 03_evaluate.py --model HuggingFaceTB/SmolLM2-135M-Instruct runs/dft-zh \
      --tasks xnli,xcopa,xstorycloze,mmlu,truthfulqa,xquad,mlqa,mkqa --langs zh,vi,ar --out runs/eval
  # math and translation, a quick look at 30 items each
  python 03_evaluate.py --model runs/dft-zh --tasks mgsm,mgsm_cot,msvamp,translation --langs zh --limit 30 \
      --out runs/eval
  # held-out NLL of the training format (pairs from 01_build_pairs.py); lower is better
  python 03_evaluate.py --model runs/dft-zh --tasks nll --pairs runs/pairs_zh.dev.jsonl --langs zh,en \
      --out runs/eval
  # paired bootstrap between two runs on the same items (B - A)
  python 03_evaluate.py --compare runs/eval/SmolLM2-135M-Instruct.json runs/eval/dft-zh.json --out runs/eval
  # the English-pivot picture: lens entropy, English vs Chinese token mass and en/zh cosine per layer
  python 03_evaluate.py --analysis layers --model HuggingFaceTB/SmolLM2-135M-Instruct runs/dft-zh --langs zh \
      --out runs/eval
  # an intervention folder of 02_train_dft.py --fit (INCLINE / DiffMean): its base model with the maps hooked in
  python 03_evaluate.py --model runs/incline --steer-alpha 0.5 --tasks nll --pairs runs/pairs_zh.dev.jsonl --langs zh \
      --out runs/eval
  # 8 processes, one GPU each (or accelerate launch --multi_gpu --num_processes 8): the files one process writes
  torchrun --nproc_per_node 8 03_evaluate.py --model runs/dft-zh --tasks all --langs zh --batch-size auto \
      --out runs/eval

Tasks, one row of TASKS each: harness task (`{l}` = language): prompt (context -> continuation); metric.
mc = the choice with the highest summed log-probability of its continuation tokens wins (lm-eval's `acc`);
gen = greedy decoding, cut at the stop strings.
  xnli         xnli_{l}: "" -> " {premise}, {right}? {Yes|Also|No}, {hypothesis}" (per-language words); acc
  xcopa        xcopa_{l} (en: copa): "{premise minus final char} {because|therefore}" -> " {choice, first char
               lower}"; acc
  xstorycloze  xstorycloze_{l}: "{4 sentences joined by ' '}" -> " {ending}"; acc
  mmlu         m_mmlu_{l} (Okapi): "{q}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:" -> " A|B|C|D"; acc
  truthfulqa   truthfulqa_{l}_mc1: "{6-shot QA prompt}\n\nQ: {q}\nA:" -> " {choice}"; acc (MC1), acc_strict
  xquad        xquad_{l}: "{Context}: {c}\n\n{Question}: {q}\n\n{Answer}:" (per-language words), stop \n;
               f1, exact_match (harness); f1_lang, exact_match_lang
  mlqa         mlqa_{l}_{l}: "Context: {c}\n\nQuestion: {q}\n\nAnswer:", stop \n; f1, exact_match (harness);
               f1_lang, exact_match_lang
  mkqa         (none; nq_open format): "Answer these questions:\n\nQ: {q}?\nA:", stop \n . ,; f1_lang,
               exact_match_lang
  mgsm         mgsm_direct_{l}: "{Question word} {q}\n{Answer word}", stop "{Question word}"; flexible_extract,
               strict_match
  mgsm_cot     mgsm_native_cot_{l}: "{Question word} {q}\n{Step-by-step answer word}", stop "{Question word}";
               flexible_extract, strict_match
  msvamp(_cot) (none; MGSM formats): as mgsm / mgsm_cot; last_number
  translation  (none): MT_PROMPT below, stop \n; en->xx and xx->en; BLEU, chrF
  nll          (none): common.build_prompt(x) -> y + EOS (the training format); NLL/token
Metrics named like the harness's (acc, f1, exact_match, strict_match, flexible_extract) are computed as the
harness computes them; ours carry their own names (acc_strict, f1_lang, exact_match_lang, last_number).
Few-shot math prompts follow the harness's sampler by default (--math-shots). Details and deviations: see the docs
(Evaluation) and the constants below.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import random
import re
import string
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.cache_utils import DynamicCache, DynamicLayer

import common
from common import UserError

# -----------------------------------------------------------------------------
# task formats (copied from lm-evaluation-harness 0.4.13 task files; file names in the comments)

# tasks/xnli/utils.py: question word, then the entailment / neutral / contradiction words
XNLI_WORDS = {
    "ar": ("صحيح", "نعم", "لذا", "رقم"), "bg": ("правилно", "да", "така", "не"),
    "de": ("richtig", "Ja", "Auch", "Nein"), "el": ("σωστός", "Ναί", "Έτσι", "όχι"),
    "en": ("right", "Yes", "Also", "No"), "es": ("correcto", "Sí", "Asi que", "No"),
    "fr": ("correct", "Oui", "Aussi", "Non"), "hi": ("सही", "हाँ", "इसलिए", "नहीं"),
    "ru": ("правильно", "Да", "Так", "Нет"), "sw": ("sahihi", "Ndiyo", "Hivyo", "Hapana"),
    "th": ("ถูกต้อง", "ใช่", "ดังนั้น", "ไม่"),
    "tr": ("doğru", "Evet", "Böylece", "Hayır"),
    "ur": ("صحیح", "جی ہاں", "اس لئے", "نہیں"), "vi": ("đúng", "Vâng", "Vì vậy", "Không"),
    "zh": ("正确", "是的", "所以", "不是的"),
}
XNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}

# tasks/xcopa/utils.py (en: tasks/super_glue/copa/utils.py): connector for "cause" and "effect"
XCOPA_CONNECTORS = {
    "et": ("sest", "seetõttu"), "ht": ("poukisa", "donk sa"), "it": ("perché", "quindi"),
    "id": ("karena", "maka"), "qu": ("imataq", "chaymi"), "sw": ("kwa sababu", "kwa hiyo"),
    "zh": ("因为", "所以"), "ta": ("காரணமாக", "எனவே"),
    "th": ("เพราะ", "ดังนั้น"),
    "tr": ("çünkü", "bu yüzden"), "vi": ("bởi vì", "vì vậy"), "en": ("because", "therefore"),
}

# tasks/okapi/truthfulqa_multilingual/utils.py: the 6-shot English QA prompt before every question
TRUTHFULQA_QA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)

# tasks/xquad/xquad_{l}.yaml: the words for "Context", "Question", "Answer"
XQUAD_WORDS = {
    "ar": ("سيا", "سؤال", "إجابة"), "de": ("Kontext", "Frage", "Antwort"),
    "el": ("Συμφραζόμενα", "Ερώτηση", "Απάντηση"), "en": ("Context", "Question", "Answer"),
    "es": ("Contexto", "Pregunta", "Respuesta"), "hi": ("प्रसंग", "सवाल", "उत्तर"),
    "ro": ("Context", "Întrebare", "Răspuns"), "ru": ("Контекст", "Вопрос", "Ответ"),
    "th": ("บริบท", "คำถาม", "คำตอบ"), "tr": ("Bağlam", "Soru", "Cevap"),
    "vi": ("Bối cảnh", "Câu hỏi", "Trả lời"), "zh": ("语境", "问题", "回答"),
}

# tasks/mgsm/{direct,native_cot}/*.yaml: question word (also the stop string), direct answer cue,
# step-by-step answer cue, and the native CoT "strict-match" regex (bn uses the English one, as there)
MGSM_WORDS = {
    "bn": ("প্রশ্ন:", "Answer:", "ধাপে ধাপে উত্তর:", r"The answer is (\-?[0-9\.\,]+)"),
    "de": ("Frage:", "Antwort:", "Schritt-für-Schritt-Antwort:", r"Die Antwort lautet (\-?[0-9\.\,]+)"),
    "en": ("Question:", "Answer:", "Step-by-Step Answer:", r"The answer is (\-?[0-9\.\,]+)"),
    "es": ("Pregunta:", "Respuesta:", "Respuesta paso a paso:", r"La respuesta es (\-?[0-9\.\,]+)"),
    "fr": ("Question :", "Réponse :", "Réponse étape par étape :", r"La réponse est (\-?[0-9\.\,]+)"),
    "ja": ("問題：", "Answer:", "ステップごとの答え:", r"答えは(\-?[0-9\.\,]+)です。"),
    "ru": ("Задача:", "Answer:", "Пошаговоерешение:", r"Ответ — (\-?[0-9\.\,]+)"),
    "sw": ("Swali:", "Answer:", "Jibu la Hatua kwa Hatua:", r"Jibu ni (\-?[0-9\.\,]+)"),
    "te": ("ప్రశ్న:", "Answer:", "దశలవారీగా సమాధానం:", r"సమాధానం (\-?[0-9\.\,]+)"),
    "th": ("โจทย์:", "Answer:", "คำตอบทีละขั้นตอน:", r"คำตอบคือ (\-?[0-9\.\,]+)"),
    "zh": ("问题：", "Answer:", "逐步解答:", r"答案是 (\-?[0-9\.\,]+)。"),
}
MGSM_EXTRA_STOPS = ["</s>", "<|im_end|>"]  # in every mgsm yaml's `until`, plus the tokenizer's EOS
FLEXIBLE_REGEX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"  # mgsm "flexible-extract": last match

# mkqa has no harness task: the harness's nq_open format (open-domain QA without a passage)
MKQA_DESCRIPTION = "Answer these questions:\n\n"
MKQA_STOPS = ["\n", ".", ","]

# translation has no harness task for NTREX/Tatoeba: our documented prompt (ours)
MT_PROMPT = "Translate the following {src} text into {tgt}.\n{src}: {text}\n{tgt}:"
NTREX_CODES = {"de": "deu", "es": "spa", "fr": "fra", "ru": "rus", "zh": "zho-CN", "ja": "jpn", "th": "tha",
               "sw": "swa", "bn": "ben", "te": "tel"}
TATOEBA_CODES = {"ar": "ara", "bg": "bul", "bn": "ben", "de": "deu", "el": "ell", "es": "spa", "fr": "fra",
                 "hi": "hin", "ja": "jpn", "ru": "rus", "sw": "swh", "te": "tel", "th": "tha", "tr": "tur",
                 "ur": "urd", "vi": "vie", "zh": "cmn"}
# sacrebleu tokenizer per target language (ja-mecab needs MeCab: character level instead; recorded)
BLEU_TOKENIZE = {"zh": "zh", "ja": "char", "th": "char"}

MGSM_LANGS = sorted(MGSM_WORDS)
MSVAMP_LANGS = [l for l in MGSM_LANGS if l != "te"]
PAPER_TASKS = "xnli,xcopa,xstorycloze,mmlu,truthfulqa,xquad,mlqa,mkqa"

# -----------------------------------------------------------------------------
# data: one loader per dataset, each (args, lang, split, hub) -> (items, data file); an item is a plain dict
# with an "id". hub is the row's (Hugging Face dataset, config) with --data-source hub, else None (local files).


def _tsv(path):
    with common.open_text(path) as f:
        return [line.rstrip("\n").rstrip("\r").split("\t") for line in f if line.strip()]


def _lines(path):
    with common.open_text(path) as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def _hub_rows(hub, lang, split):
    """Rows of the harness's own Hugging Face dataset (same fields as our local files after conversion)."""
    import datasets
    path, name = hub
    try:
        rows = list(datasets.load_dataset(path, name.format(l=lang), split=split))
    except Exception as e:
        raise UserError(f"cannot load {path} ({name.format(l=lang)}, {split}) from the hub ({type(e).__name__}); "
                        "use --data-source local") from None
    return rows, f"hub:{path}/{name.format(l=lang)}/{split}"


def load_xnli(args, lang, split, hub):
    if hub:
        rows, src = _hub_rows(hub, lang, split)
        rows = [(r["premise"], r["hypothesis"], r["label"]) for r in rows]
    else:
        src = os.path.join(args.data_dir, "xnli", f"{'dev' if split == 'validation' else 'test'}-{lang}.tsv")
        rows = [(p, h, XNLI_LABELS[y]) for p, h, y in _tsv(src)]
    q, *words = XNLI_WORDS[lang]
    items = []
    for i, (premise, hypothesis, label) in enumerate(rows):
        # empty context: each choice is the whole sentence (doc_to_text: ''), the harness prepends " "
        texts = [f"{premise}, {q}? {w}, {hypothesis}" for w in words]
        items.append(dict(id=i, context="", choices=texts, gold=label))
    return items, src


def load_xcopa(args, lang, split, hub):
    if hub:
        rows, src = _hub_rows(hub, lang, split)
    else:
        src = os.path.join(args.data_dir, "xcopa", f"{'val' if split == 'validation' else 'test'}.{lang}.jsonl")
        rows = common.read_jsonl(src)
    cause, effect = XCOPA_CONNECTORS[lang]
    lower_first = lambda s: s[0].lower() + s[1:]  # noqa: E731 (utils.convert_choice)
    items = []
    for i, r in enumerate(rows):
        conn = cause if r["question"] == "cause" else effect
        context = r["premise"].strip()[:-1] + f" {conn}"  # drops the final period, as the harness does
        items.append(dict(id=r.get("idx", i), context=context,
                          choices=[lower_first(r["choice1"]), lower_first(r["choice2"])], gold=int(r["label"])))
    return items, src


def load_xstorycloze(args, lang, split, hub):
    if hub:
        rows, src = _hub_rows(hub, lang, split)
    else:
        src = os.path.join(args.data_dir, "xstorycloze", f"{lang}_{split}.jsonl")
        rows = common.read_jsonl(src)
    items = []
    for i, r in enumerate(rows):
        context = " ".join(r[f"input_sentence_{k}"] for k in range(1, 5))
        items.append(dict(id=r.get("story_id", i), context=context,
                          choices=[r["sentence_quiz1"], r["sentence_quiz2"]], gold=int(r["answer_right_ending"]) - 1))
    return items, src


def mmlu_text(r):
    return (f"{r['instruction'].strip()}\nA. {r['option_a']}\nB. {r['option_b']}\nC. {r['option_c']}\n"
            f"D. {r['option_d']}\nAnswer:")


def load_mmlu(args, lang, split, hub):
    if hub:
        rows, src = _hub_rows(hub, lang, {"val": "validation", "dev": "train"}.get(split, split))
    else:
        src = os.path.join(args.data_dir, "okapi_mmlu", f"{lang}_{split}.json")
        rows = common.read_json(src)
    # few-shot: the first k dev items (the harness's `first_n` sampler on its train split = Okapi dev)
    k = args.num_fewshot
    shots = common.read_json(os.path.join(args.data_dir, "okapi_mmlu", f"{lang}_dev.json"))[:k] if k else []
    prefix = "".join(f"{mmlu_text(s)} {s['answer']}\n\n" for s in shots)
    items = []
    for i, r in enumerate(rows):
        items.append(dict(id=r.get("id", i), context=prefix + mmlu_text(r), choices=["A", "B", "C", "D"],
                          gold="ABCD".index(r["answer"])))
    return items, src


def _truthfulqa_clean(text):  # utils.preprocess
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def load_truthfulqa(args, lang, split, hub):
    if hub:
        rows, src = _hub_rows(hub, lang, "val")
    else:
        src = os.path.join(args.data_dir, "okapi_truthfulqa", f"{lang}_validation.json")
        rows = common.read_json(src)
    items = []
    for i, r in enumerate(rows):
        labels = r["mc1_targets_labels"]
        if labels.count(1) != 1:
            raise UserError(f"{src} item {i}: MC1 needs exactly one correct choice, labels are {labels}")
        # the gold index comes from the labels, never from the position (the correct choice is stored first)
        context = TRUTHFULQA_QA_PROMPT + "\n\nQ: " + _truthfulqa_clean(r["question"]) + "\nA:"
        items.append(dict(id=i, context=context, choices=list(r["mc1_targets_choices"]), gold=labels.index(1)))
    return items, src


def _squad_rows(obj):
    for article in obj["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                yield dict(id=qa["id"], context=para["context"], question=qa["question"],
                           answers=[a["text"] for a in qa["answers"]])


def _hub_squad_rows(hub, lang):
    rows, src = _hub_rows(hub, lang, "validation")
    return [dict(id=r["id"], context=r["context"], question=r["question"], answers=r["answers"]["text"])
            for r in rows], src


def load_xquad(args, lang, split, hub):
    if hub:
        rows, src = _hub_squad_rows(hub, lang)
    else:
        src = os.path.join(args.data_dir, "xquad", f"xquad.{lang}.json")
        rows = list(_squad_rows(common.read_json(src)))
    c, q, a = XQUAD_WORDS[lang]
    items = [dict(id=r["id"], prompt=f"{c}: {r['context']}\n\n{q}: {r['question']}\n\n{a}:", gold=r["answers"][:1])
             for r in rows]  # the harness scores xquad against the first answer only
    return items, src


def load_mlqa(args, lang, split, hub):
    if hub:
        rows, src = _hub_squad_rows(hub, lang)
    else:
        src = os.path.join(args.data_dir, "mlqa_dev", f"dev-context-{lang}-question-{lang}.json")
        rows = list(_squad_rows(common.read_json(src)))
    items = [dict(id=r["id"], prompt=f"Context: {r['context']}\n\nQuestion: {r['question']}\n\nAnswer:",
                  gold=r["answers"]) for r in rows]
    return items, src


def load_mkqa(args, lang, split, hub):
    src = os.path.join(args.data_dir, "mkqa_mia2022_dev", f"mkqa-{'zh_cn' if lang == 'zh' else lang}.jsonl")
    items = []
    for r in common.read_jsonl(src):
        q = r["question"].strip()
        q = q if q.endswith(("?", "？", "؟")) else q + "?"
        items.append(dict(id=r["id"], prompt=f"{MKQA_DESCRIPTION}Q: {q}\nA:", gold=[a.strip() for a in r["answers"]]))
    return items, src


# tasks/mgsm/native_cot/mgsm_native_cot_{l}.yaml: doc_to_target of an exemplar is answer[N:], N per language.
# N is meant to cut the step-by-step cue off the exemplar's answer but is one too many where the cue ends in
# a full-width colon without a space (zh: "逐步解答：5 个…"[6:] = " 个…", the first character of the answer
# is lost); the harness's prompts carry the quirk, so harness-style prompts here do too.
MGSM_COT_TARGET_SLICE = {"bn": 17, "de": 29, "en": 21, "es": 23, "fr": 26, "ja": 11, "ru": 18, "sw": 25, "te": 19,
                         "th": 18, "zh": 6}
HARNESS_FEWSHOT_SEED = 1234  # simple_evaluate's fewshot_random_seed (lm_eval.defaults.DEFAULT_OTHER_SEED)


def mgsm_exemplars(data_dir, lang, cot, k, n_items, style="harness"):
    """Few-shot prefixes for n_items math items from the 8 official MGSM exemplars (the train split of
    juletxara/mgsm; each stored question starts with its question word, each worked answer with its cue).

    style "harness" (default): what lm-evaluation-harness 0.4.13 builds for mgsm_direct_{l} /
    mgsm_native_cot_{l} with num_fewshot=k: its default ContextSampler, one random.Random(1234) for the
    task, drawing rnd.sample(exemplars, k) once per test item in item order (so item i's shots depend on
    i, and a --limit keeps each item's shots); each shot is doc_to_text + target_delimiter + doc_to_target
    + "\n\n". Direct: "{q}\n{answer cue}" + "" + "{answer_number}" (no space: "\nAnswer:8"). CoT:
    "{q}\n{step cue}" + " " + answer[N:] (MGSM_COT_TARGET_SLICE, quirk included).
    style "first-k": the first k exemplars for every item, formatted as the MGSM paper does: direct
    "{q}\n{answer cue} {number}", CoT "{q}\n{step cue}{delimiter}{worked answer without its own cue}"
    (delimiter "" for zh/ja, " " otherwise).
    Returns a list of n_items prefix strings.
    """
    if not k:
        return [""] * n_items
    rows = [r for r in common.read_jsonl(os.path.join(data_dir, "mgsm", "mgsm_exemplars.jsonl")) if r["lang"] == lang]
    if k > len(rows):
        raise UserError(f"--num-fewshot {k}: MGSM has {len(rows)} exemplars for {lang}")
    rows = sorted(rows, key=lambda r: r["id"])  # the order of the dataset's train split
    _, direct, step, _ = MGSM_WORDS[lang]

    def shot(r):
        if style == "first-k":
            if cot:
                answer = re.sub(r"^[^:：]*[:：]\s*", "", r["a"], count=1)  # drop the exemplar's own cue word
                return f"{r['q']}\n{step}{'' if lang in ('zh', 'ja') else ' '}{answer}"
            return f"{r['q']}\n{direct} {r['answer_number']}"
        if cot:
            return f"{r['q']}\n{step} {r['a'][MGSM_COT_TARGET_SLICE[lang]:]}"
        return f"{r['q']}\n{direct}{r['answer_number']}"

    if style == "first-k":
        return ["".join(shot(r) + "\n\n" for r in rows[:k])] * n_items
    rnd = random.Random(HARNESS_FEWSHOT_SEED)
    return ["".join(shot(r) + "\n\n" for r in rnd.sample(rows, k)) for _ in range(n_items)]


def _number_string(x):
    """Gold answers as the harness compares them: '8.0' -> '8' (integral floats), else as given."""
    x = str(x).strip()
    try:
        v = float(x.replace(",", ""))
    except ValueError:
        return x
    return str(int(v)) if v == int(v) else x


def load_math(args, lang, split, hub, dataset, cot):
    """MGSM or MSVAMP items, direct or chain-of-thought, with --num-fewshot exemplars (--math-shots style)."""
    question_word, direct, step, _ = MGSM_WORDS[lang]
    if dataset == "mgsm":
        if hub:
            rows, src = _hub_rows(hub, lang, "test")
            rows = [(r["question"], r["answer_number"]) for r in rows]
        else:
            src = os.path.join(args.data_dir, "mgsm", f"mgsm_{lang}.tsv")
            rows = [(q, a) for q, a in _tsv(src)]
    else:
        src = os.path.join(args.data_dir, "msvamp", f"msvamp_{lang}.jsonl")
        rows = [(r["m_query"], r["response"]) for r in common.read_jsonl(src)]
    prefixes = mgsm_exemplars(args.data_dir, lang, cot, args.num_fewshot, len(rows), args.math_shots)
    items = [dict(id=i, prompt=f"{prefix}{question_word} {q}\n{step if cot else direct}", gold=_number_string(a))
             for i, ((q, a), prefix) in enumerate(zip(rows, prefixes))]
    return items, src


def load_translation(data_dir, lang, direction, dataset):
    """(items, data file) for en->lang (direction 'en-xx') or lang->en ('xx-en')."""
    if dataset == "ntrex":
        code = NTREX_CODES[lang]
        en_file = os.path.join(data_dir, "ntrex128", "newstest2019-src.eng.txt")
        xx_file = os.path.join(data_dir, "ntrex128", f"newstest2019-ref.{code}.txt")
    else:
        code = TATOEBA_CODES[lang]
        en_file = os.path.join(data_dir, "tatoeba_laser", f"tatoeba.{code}-eng.eng")
        xx_file = os.path.join(data_dir, "tatoeba_laser", f"tatoeba.{code}-eng.{code}")
    en, xx = _lines(en_file), _lines(xx_file)
    if len(en) != len(xx):
        raise UserError(f"{en_file} and {xx_file} are not line-aligned ({len(en)} vs {len(xx)} lines)")
    src_lang, tgt_lang = ("en", lang) if direction == "en-xx" else (lang, "en")
    src_text, ref_text = (en, xx) if direction == "en-xx" else (xx, en)
    names = common.LANGUAGES
    items = [dict(id=i, prompt=MT_PROMPT.format(src=names[src_lang][0], tgt=names[tgt_lang][0], text=s.strip()),
                  gold=r.strip(), tgt_lang=tgt_lang) for i, (s, r) in enumerate(zip(src_text, ref_text))
             if s.strip() and r.strip()]
    return items, xx_file


def load_nll(args, lang, split, hub):
    """Training-format items: build_prompt(x) -> y. lang 'en' uses the English side (deduplicated)."""
    pairs_file = args.pairs
    if not pairs_file:
        raise UserError("task nll needs --pairs DEV.jsonl (the dev pairs written by 01_build_pairs.py)")
    items, seen, lines = [], set(), {}
    for i, r in enumerate(nll_rows(pairs_file)):
        item_id = r["id"]
        if lang == "en":
            if (r["x_en"], r["y_en"]) in seen:
                continue
            seen.add((r["x_en"], r["y_en"]))
            if json.dumps(item_id) in lines:  # dev files of several languages joined: ids are per language
                item_id = f"{item_id}@{r['lang']}"
            items.append(dict(id=item_id, x=r["x_en"], y=r["y_en"]))
        elif r["lang"] == lang:
            items.append(dict(id=item_id, x=r["x_tgt"], y=r["y_tgt"]))
        else:
            continue
        first = lines.setdefault(json.dumps(item_id), i + 1)
        if first != i + 1:  # a bootstrap pairs items by id: a repeated one would pair the wrong items
            raise UserError(f"{pairs_file} line {i + 1}: id {r['id']!r} of {r['lang']} appears again (first at "
                            f"line {first}); give every pair of a language its own id (01_build_pairs.py does)")
    return items, pairs_file


def nll_rows(pairs_file, fields=("x_en", "y_en", "x_tgt", "y_tgt", "lang", "id")):
    """The pairs of --pairs, each checked for the fields its reader reads (nll's by default)."""
    rows = common.read_jsonl(pairs_file)
    if not rows:
        raise UserError(f"{pairs_file} holds no pairs: pass the dev pairs 01_build_pairs.py wrote (OUT.dev.jsonl)")
    for i, r in enumerate(rows):
        missing = [k for k in fields if not isinstance(r.get(k), (str, int) if k == "id" else str)
                   or isinstance(r.get(k), bool)]
        if missing:
            raise UserError(f"{pairs_file} line {i + 1}: missing field(s) {missing} (01_build_pairs.py writes them)")
    return rows


def nll_langs(pairs_file):
    return sorted({r["lang"] for r in nll_rows(pairs_file)} | {"en"}) if pairs_file else []


# -----------------------------------------------------------------------------
# scorers: one function per metric family


def mean_stderr(values):
    """Mean and the standard error of the mean (sample std / sqrt(n), as lm-eval reports)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def choose(lls):
    """lm-eval's prediction: np.argmax, the first of equal maxima."""
    return max(range(len(lls)), key=lambda i: (lls[i], -i))


PUNCT = ({chr(i) for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P")}
         | set(string.punctuation))
# MLQA's official evaluation (tasks/mlqa/utils.py): article words removed per language
ARTICLES = {"en": r"\b(a|an|the)\b", "es": r"\b(un|una|unos|unas|el|la|los|las)\b",
            "vi": r"\b(của|là|cái|chiếc|những)\b",
            "de": r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b",
            "ar": r"(?:^|\s)ال"}
# zh/ja/th are scored over characters: every character of these scripts is a token, runs of other
# characters are split on whitespace (MLQA's "mixed segmentation" for zh, extended to ja and th)
CJK_CHARS = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
CHAR_LANGS = {"zh": CJK_CHARS, "ja": CJK_CHARS, "th": r"[\u0e00-\u0e7f]"}


def qa_tokens(text, lang):
    """SQuAD/MLQA normalisation: lower case, drop punctuation and articles, then tokens."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCT)
    if lang in ARTICLES:
        text = re.sub(ARTICLES[lang], " ", text)
    if lang in CHAR_LANGS:
        return [t for t in re.split(f"({CHAR_LANGS[lang]})|\\s+", text) if t and t.strip()]
    return text.split()


def token_f1(p, g):
    """SQuAD's bag-of-tokens F1 of predicted tokens p against gold tokens g."""
    common_count = sum((Counter(p) & Counter(g)).values())
    if common_count == 0:
        return 0.0
    precision, recall = common_count / len(p), common_count / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction, gold, lang):
    return token_f1(qa_tokens(prediction, lang), qa_tokens(gold, lang))


def qa_em(prediction, gold, lang):
    return float(qa_tokens(prediction, lang) == qa_tokens(gold, lang))


def squad_v1_tokens(text):
    """transformers' squad_metrics.normalize_answer (English rules), which the harness's xquad uses."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def squad_f1_harness(prediction, gold):
    """transformers' squad_metrics.compute_f1 (the harness's xquad f1): one empty side scores 1 only if both are."""
    p, g = squad_v1_tokens(prediction), squad_v1_tokens(gold)
    if not p or not g:
        return float(p == g)
    return token_f1(p, g)


def mlqa_tokens_harness(text, lang):
    """The harness's mlqa normalize_answer (MLQA's official script): no punctuation, per-language articles;
    zh by "mixed segmentation" (each character in U+4E00..U+9FA5 is a token), other languages by whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCT)
    if lang in ARTICLES:
        text = re.sub(ARTICLES[lang], " ", text)
    if lang == "zh":
        return [t for t in re.split(r"([\u4e00-\u9fa5])|\s+", text) if t and t.strip()]
    return text.split()


def mlqa_f1_harness(prediction, gold, lang):
    return token_f1(mlqa_tokens_harness(prediction, lang), mlqa_tokens_harness(gold, lang))


def score_qa(prediction, golds, lang, harness=None):
    """QA scores of one answer.

    f1 / exact_match: the harness's own scorer (harness "xquad" or "mlqa"), only for its tasks: xquad =
    transformers' SQuAD v1 metric
    (English normalisation, whitespace tokens) against the first gold answer; mlqa = MLQA's official script
    (max over gold answers). f1_lang / exact_match_lang: ours for every QA task, max over gold answers,
    language-aware (qa_tokens: per-language articles, Unicode punctuation, zh/ja/th over characters); for
    zh/ja/th the harness's whitespace tokens make xquad's f1 nearly all-or-nothing, so f1_lang is the more
    meaningful number there. mkqa has no harness task: only the _lang scores.
    """
    prediction = prediction.strip()
    out = {"f1_lang": max(qa_f1(prediction, g, lang) for g in golds),
           "exact_match_lang": max(qa_em(prediction, g, lang) for g in golds)}
    if harness == "xquad":
        out["f1"] = squad_f1_harness(prediction, golds[0])
        out["exact_match"] = float(squad_v1_tokens(prediction) == squad_v1_tokens(golds[0]))
    elif harness == "mlqa":
        out["f1"] = max(mlqa_f1_harness(prediction, g, lang) for g in golds)
        out["exact_match"] = max(float(mlqa_tokens_harness(prediction, lang) == mlqa_tokens_harness(g, lang))
                                 for g in golds)
    return out


def extract_regex(text, pattern, group_select=0, fallback="[invalid]"):
    """lm-eval's RegexFilter: findall, take match `group_select`, first non-empty group, strip."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    m = matches[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), fallback)
    return m.strip()


def extract_last_number(text):
    """The "last number in the output" rule (QAlign/MindMerger), with negatives and thousands commas."""
    text = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", text)
    while re.search(r"(\d),(\d{3})(?!\d)", text):
        text = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", text)
    nums = re.findall(r"-?\d+(?:\.\d+)?", text)
    return nums[-1] if nums else None


def harness_exact_match(prediction, gold):
    """lm-eval exact_match with ignore_case and ignore_punctuation (string.punctuation removed)."""
    table = str.maketrans("", "", string.punctuation)
    return float(prediction.lower().translate(table) == gold.lower().translate(table))


def numbers_equal(a, b):
    try:
        return abs(float(a) - float(b)) < 1e-6
    except (TypeError, ValueError):
        return False


def score_math(output, gold, lang, cot):
    """All three MGSM scorers; which one is primary is the task row's choice (TASKS)."""
    if cot:  # mgsm_native_cot "strict-match": the per-language "The answer is N" regex, first match
        strict = extract_regex(output, MGSM_WORDS[lang][3])
    else:  # mgsm_direct's first filter: the whole output with whitespace stripped must be the number
        strict = output.strip()
    flexible = extract_regex(output, FLEXIBLE_REGEX, group_select=-1)
    last = extract_last_number(output)
    return ({"strict_match": harness_exact_match(strict, gold), "flexible_extract": harness_exact_match(flexible, gold),
             "last_number": float(numbers_equal(last, gold))},
            {"strict_match": strict, "flexible_extract": flexible, "last_number": last})


def bleu_metrics(tgt_lang):
    from sacrebleu.metrics import BLEU, CHRF
    return BLEU(tokenize=BLEU_TOKENIZE.get(tgt_lang, "13a")), CHRF()


# -----------------------------------------------------------------------------
# inference-time peers: an intervention folder (02_train_dft.py --fit) applied with forward hooks (DESIGN §6)


def is_intervention(path):
    return os.path.isdir(path) and os.path.exists(os.path.join(path, common.INTERVENTION_CONFIG))


class Intervention:
    """The maps of an intervention folder on the output of their blocks, at the folder's positions, scaled by alpha:
    h + alpha * (h @ W) (incline) or h + alpha * v (diffmean); alpha = 0 is the model itself, item for item.

    Each forward of the steered model runs inside `steering(...)`, which says per row which tokens are context (the
    prompt of a generation, the context of a log-likelihood request): positions 'last' and 'prompt' touch only those,
    'all' every real token. A generated token is never context, so with 'last' / 'prompt' only the prefill is steered
    (as INCLINE's llama code) and the decoding steps read the steered prompt from the KV cache. The map applies to
    the live state, the output of the block as the steered forward computed it (INCLINE's code computes it from a
    clean forward of the prompt: ours, docs/EVALUATION.md)."""

    def __init__(self, folder, alpha=None, steer_base=None):
        from safetensors.torch import load_file
        self.folder = os.path.abspath(folder)
        cfg = common.read_json(os.path.join(folder, common.INTERVENTION_CONFIG))
        missing = [f for f in ("method", "alpha", "positions", "layers", "hookpoints", "base_model",
                               "base_weights_sha256", "model_type", "hidden_size", "num_layers", "maps_file")
                   if f not in cfg]
        if missing or cfg["method"] not in ("incline", "diffmean") or cfg["positions"] not in common.STEER_POSITIONS:
            raise UserError(f"{folder}/{common.INTERVENTION_CONFIG} is not an intervention config (missing {missing}, "
                            f"or an unknown method / positions); write it with 02_train_dft.py --fit")
        self.config, self.method, self.positions = cfg, cfg["method"], cfg["positions"]
        self.layers = [int(k) for k in cfg["layers"]]
        self.alpha = float(cfg["alpha"] if alpha is None else alpha)
        self.base, self.steer_base = steer_base or cfg["base_model"], steer_base
        self.maps = load_file(os.path.join(folder, cfg["maps_file"]))
        d = cfg["hidden_size"]
        shape = (d, d) if self.method == "incline" else (d,)
        bad = [k for k in self.layers if not 1 <= k <= cfg["num_layers"]
               or tuple(self.maps.get(cfg["hookpoints"][str(k)], torch.empty(0)).shape) != shape]
        if bad:
            raise UserError(f"{folder}: the maps of block(s) {bad} are missing, out of the base's 1..{cfg['num_layers']} "
                            f"blocks, or not of shape {shape}; refit with 02_train_dft.py --fit")
        self.mask = None
        self.base_sha256 = None

    def check_base(self):
        """(path, adapter, source) of the model the maps go on, after checking it: the folder's base must be the model
        it was fitted on (weights hash); --steer-base must have its architecture and shapes."""
        from transformers import AutoConfig
        path, adapter, source = common.resolve_model(self.base)
        config = AutoConfig.from_pretrained(path)
        cfg = self.config
        have = (config.model_type, config.hidden_size, config.num_hidden_layers)
        want = (cfg["model_type"], cfg["hidden_size"], cfg["num_layers"])
        if have != want:
            flag = "--steer-base" if self.steer_base else "its recorded base"
            raise UserError(f"{self.folder}: fitted on a {want[0]} model with hidden size {want[1]} and {want[2]} "
                            f"blocks; {flag} {self.base} is {have[0]}, {have[1]}, {have[2]}. Pass a --steer-base of "
                            "the same architecture and shapes, or refit on this model (02_train_dft.py --fit)")
        self.base_sha256 = common.weights_sha256(self.base)
        if not self.steer_base and self.base_sha256 != cfg["base_weights_sha256"]:
            raise UserError(f"{self.folder}: its base {self.base} has other weights now (sha256 "
                            f"{self.base_sha256[:12]} vs {cfg['base_weights_sha256'][:12]} when fitted); refit, or "
                            "pass --steer-base MODEL to apply the maps to another model on purpose")
        return path, adapter, f"intervention folder {self.folder} ({self.method}, alpha {self.alpha:g}) on {source}"

    def attach(self, model):
        """Register the hooks on `model` (the base as loaded) and make `intervention_of(model)` find them."""
        lm = common.unwrap(model)
        blocks = common.model_parts(lm).blocks
        for k in self.layers:
            name = self.config["hookpoints"][str(k)]
            if common.hookpoint(lm, k) != name:
                raise UserError(f"{self.folder}: block {k} is {common.hookpoint(lm, k)} in {self.base}, not {name}")
            value = self.maps[name].to(device=next(lm.parameters()).device, dtype=next(lm.parameters()).dtype)
            blocks[k - 1].register_forward_hook(self._hook(value))
        lm.intervention = self

    def _hook(self, value):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if self.mask is None or self.mask.shape != h.shape[:2]:
                raise RuntimeError("a forward of a steered model outside steering(...) or with positions of another "
                                   "shape: every forward must say which tokens are context")
            if not self.mask.any():
                return None
            picked = h[self.mask]
            change = picked @ value if self.method == "incline" else value.expand_as(picked)
            steered = h.clone()
            steered[self.mask] = picked + self.alpha * change
            return (steered, *output[1:]) if isinstance(output, tuple) else steered
        return hook

    def record(self):
        """What a run JSON says about the intervention."""
        cfg = self.config
        return dict(folder=self.folder, method=self.method, alpha=self.alpha, alpha_default=cfg["alpha"],
                    layers=self.layers, positions=self.positions, formula=cfg.get("formula"), pool=cfg.get("pool"),
                    base_model=cfg["base_model"], base_weights_sha256=cfg["base_weights_sha256"],
                    steer_base=self.steer_base, steer_base_sha256=self.base_sha256 if self.steer_base else None,
                    pairs_sha256=cfg.get("pairs_sha256"))


def intervention_of(model):
    return getattr(common.unwrap(model), "intervention", None)


@contextlib.contextmanager
def steering(intervention, positions, valid, context_len):
    """The forward(s) inside steer `intervention` (None: nothing) at its positions: positions [B, T] absolute token
    positions of the tokens fed, valid [B, T] real (not padding) tokens, context_len [B] context tokens of each row."""
    if intervention is None:
        yield
        return
    context_len = context_len.to(positions.device)[:, None]
    where = {"all": valid, "prompt": valid & (positions < context_len),
             "last": valid & (positions == context_len - 1)}
    intervention.mask = where[intervention.positions]
    try:
        yield
    finally:
        intervention.mask = None


def load_eval_model(model_path, intervention, dtype, device, padding_side):
    """The model and tokenizer of one --model: as it is, or an intervention folder's base with its hooks."""
    if intervention is None:
        return common.load_model_and_tokenizer(model_path, dtype, device, padding_side=padding_side)
    model, tokenizer = common.load_model_and_tokenizer(intervention.base, dtype, device, padding_side=padding_side)
    intervention.attach(model)
    return model, tokenizer


def resolve_eval_model(model_path, args):
    """(path, adapter, source, Intervention or None) of one --model, every check done before any model loads."""
    if not is_intervention(model_path):
        return (*common.resolve_model(model_path), None)
    intervention = Intervention(model_path, args.steer_alpha, args.steer_base)
    return (*intervention.check_base(), intervention)


# -----------------------------------------------------------------------------
# the model: batched log-likelihoods with shared prefixes, batched greedy generation with a KV cache


def tok_encode(tokenizer, text, add_special_tokens=None):
    """lm-eval's HFLM.tok_encode: the tokenizer's default special tokens, unless the text starts with BOS."""
    if add_special_tokens is None:
        bos = tokenizer.bos_token
        add_special_tokens = not (bos and text.startswith(bos))
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def prefix_token_id(tokenizer):
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_request(tokenizer, context, continuation):
    """(context ids, continuation ids) exactly as lm-eval splits a request.

    Empty context: condition on one BOS (or EOS) token. Otherwise trailing spaces of the context move to
    the continuation, context+continuation is encoded whole and split at the length of the encoded context.
    """
    if context == "":
        cont = tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def model_max_length(model):
    cfg = common.unwrap(model).config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048


def can_share_prefix(model):
    """Prefix sharing reuses a right-padded KV cache; sliding-window caches drop old entries, so not there."""
    cfg = common.unwrap(model).config
    if getattr(cfg, "use_sliding_window", None) is False:
        return True
    layer_types = getattr(cfg, "layer_types", None) or []
    return not getattr(cfg, "sliding_window", None) and "sliding_attention" not in layer_types


def _common_prefix(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


# Share an item's prefix only when it is at least this many times longer than its longest suffix. Measured
# on 2 CPU cores (SmolLM2-135M): two smaller forwards cost more than their tokens suggest, so XNLI (prefix
# ~40 tokens, suffixes ~25) ran 1.5x slower shared, TruthfulQA (~200 / ~15) 1.1-1.3x faster; MMLU's
# one-token answers (suffix 0) always share: one row per question instead of four, like lm-eval's logits cache.
SHARE_MIN_RATIO = 4


@torch.no_grad()
def loglikelihoods(model, groups, batch_size=16, share_prefix=True, progress=None, shard=None, on_oom=None):
    """Summed log-probabilities of continuations: groups[g] = [(ctx ids, cont ids), ...] -> [[(logprob, n)]].

    Each group (one item's choices) is split into the longest token prefix all its rows share and one
    suffix per row. When the prefix is long enough to pay off (SHARE_MIN_RATIO), it runs once (a batch of
    groups, right-padded) and the suffixes run on its KV cache, so e.g. TruthfulQA's 200-token prompt is
    computed once per question instead of once per choice. Only the positions that score continuation
    tokens go through the lm_head. Otherwise, with share_prefix=False, or for a sliding-window model,
    every row is its own group: lm-eval's layout, one forward per batch of rows sorted by length.
    shard = (rank, world): compute only batches b of this plan with b % world == rank; the other rows'
    log-probabilities are None (Ranks.sharded merges the ranks' results). on_oom: see halving_on_oom.
    """
    parts = common.model_parts(model)
    device = next(model.parameters()).device
    max_len = model_max_length(model)
    share = share_prefix and can_share_prefix(model)
    steer = intervention_of(model)
    # jobs: (group index, [(tokens, first scored index, row index)], prefix length P)
    jobs = []
    for g, group in enumerate(groups):
        rows = []
        for r, (ctx, cont) in enumerate(group):
            if not cont:
                raise UserError("empty continuation after tokenization (a choice with no tokens)")
            seq = (ctx + cont)[-(max_len + 1):]  # left truncation, as the harness does
            rows.append((seq, len(seq) - len(cont), r))
        # rows whose contexts end at different tokens cannot share a steered prefix (with truncation only)
        if share and len(rows) > 1 and (steer is None or steer.positions == "all" or len({s for _, s, _ in rows}) == 1):
            P = min(_common_prefix([s for s, _, _ in rows]), min(len(s) - 1 for s, _, _ in rows))
            if P >= 1 and P >= SHARE_MIN_RATIO * max(len(s) - 1 - P for s, _, _ in rows):
                jobs.append((g, rows, P))
                continue
        jobs.extend((g, [row], len(row[0]) - 1) for row in rows)
    jobs.sort(key=lambda j: (-max(len(s) for s, _, _ in j[1]), j[0]))  # longest first, as the harness orders
    results = [[None] * len(group) for group in groups]
    rank, world = shard or (0, 1)
    i, n_batches = 0, 0
    while i < len(jobs):
        batch, n_rows = [], 0  # consecutive jobs while the suffix batch stays within batch_size rows
        while i < len(jobs) and (not batch or n_rows + len(jobs[i][1]) <= batch_size):
            batch.append(jobs[i])
            n_rows += len(jobs[i][1])
            i += 1
        n_batches += 1
        if (n_batches - 1) % world != rank:  # another rank's batch: the plan is the same on every rank
            continue
        sums = halving_on_oom(partial(_loglik_batch, parts, device, steer), batch, on_oom, model,
                              rows=lambda half: sum(len(rows) for _, rows, _ in half))
        for (g, r), v in sums.items():
            results[g][r] = v
        if progress is not None:
            progress.update(n_rows)
    return [[(results[g][r], len(groups[g][r][1])) for r in range(len(groups[g]))] for g in range(len(groups))]


def _loglik_batch(parts, device, steer, batch, pad=0):
    """{(group, row): summed log-probability} of one batch of jobs (see loglikelihoods); steer: the model's
    Intervention or None (a job's rows share their context length, the index of their first scored token)."""
    need_suffix = any(len(s) - 1 > P for _, rows, P in batch for s, _, _ in rows)
    Pmax = max(P for _, _, P in batch)
    ids = torch.full((len(batch), Pmax), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), Pmax), dtype=torch.long)
    for b, (_, rows, P) in enumerate(batch):
        ids[b, :P] = torch.tensor(rows[0][0][:P])
        mask[b, :P] = 1
    context = torch.tensor([rows[0][1] for _, rows, _ in batch])
    with steering(steer, torch.arange(Pmax).expand(len(batch), Pmax).to(device), mask.bool().to(device), context):
        out = parts.backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=need_suffix)
    hidden = out.last_hidden_state
    # (batch row, position, target token, result slot) of every scored position inside the prefix
    picks = []
    for b, (g, rows, P) in enumerate(batch):
        for seq, start, r in rows:
            for pos in range(start - 1, min(P, len(seq) - 1)):
                picks.append((b, pos, seq[pos + 1], (g, r)))
    sums = _score_positions(parts, hidden, picks)
    if need_suffix:
        cache = out.past_key_values
        srows = [(b, P, seq, start, g, r) for b, (g, rows, P) in enumerate(batch) for seq, start, r in rows
                 if len(seq) - 1 > P]
        S = max(len(seq) - 1 - P for _, P, seq, _, _, _ in srows)
        sids = torch.full((len(srows), S), pad, dtype=torch.long)
        smask = torch.zeros((len(srows), Pmax + S), dtype=torch.long)
        spos = torch.zeros((len(srows), S), dtype=torch.long)
        for k, (b, P, seq, start, g, r) in enumerate(srows):
            tail = seq[P:len(seq) - 1]
            sids[k, :len(tail)] = torch.tensor(tail)
            smask[k, :P] = 1
            smask[k, Pmax:Pmax + len(tail)] = 1
            spos[k] = P + torch.arange(S)
        cache.batch_select_indices(torch.tensor([b for b, *_ in srows], device=device))
        context = torch.tensor([start for _, _, _, start, _, _ in srows])
        with steering(steer, spos.to(device), smask[:, Pmax:].bool().to(device), context):
            sout = parts.backbone(input_ids=sids.to(device), attention_mask=smask.to(device),
                                  position_ids=spos.to(device), past_key_values=cache, use_cache=True)
        spicks = []
        for k, (b, P, seq, start, g, r) in enumerate(srows):
            for pos in range(max(start - 1, P), len(seq) - 1):
                spicks.append((k, pos - P, seq[pos + 1], (g, r)))
        for key, v in _score_positions(parts, sout.last_hidden_state, spicks).items():
            sums[key] = sums.get(key, 0.0) + v
    return sums


def longest_request(model, groups):
    """Tokens in the longest row of a log-likelihood cell (what --batch-size auto probes with)."""
    return min(max(len(ctx) + len(cont) for group in groups for ctx, cont in group), model_max_length(model) + 1)


LSE_ROWS = 8  # rows per float32 logsumexp block in _score_positions


def _score_positions(parts, hidden, picks):
    """Sum of log p(target) over the picked (row, position) hidden states, per result slot.

    A position picked by several rows of one group (e.g. XNLI's three choices share the premise, which is
    scored, the context being empty) goes through the lm_head once: with a large vocabulary the lm_head is
    most of the scoring cost.
    """
    if not picks:
        return {}
    unique, which = {}, []
    for b, pos, _, _ in picks:
        which.append(unique.setdefault((b, pos), len(unique)))
    rows = torch.tensor([b for b, _ in unique], device=hidden.device)
    pos = torch.tensor([p for _, p in unique], device=hidden.device)
    which = torch.tensor(which, device=hidden.device)
    targets = torch.tensor([p[2] for p in picks], device=hidden.device)
    logits = common.lens_logits(parts, hidden[rows, pos], normed=True)  # lm_head (+ softcap) on these only
    # log p(target) = logit(target) - logsumexp(logits) in float32, a few rows at a time: the float32 copy of a
    # (rows x vocab) block stays in cache (with bf16 weights, one big copy and log-softmax cost a third of the time)
    picked = logits[which, targets].float()
    lse = torch.cat([torch.logsumexp(block.float(), dim=-1) for block in logits.split(LSE_ROWS)])[which]
    logp = (picked - lse).double().cpu().tolist()
    sums = {}
    for (_, _, _, key), v in zip(picks, logp):
        sums[key] = sums.get(key, 0.0) + v
    return sums


def eos_ids(model, tokenizer):
    ids = getattr(common.unwrap(model).generation_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def truncate_at_stops(text, stops):
    for s in stops:  # the harness splits at each stop string in turn: the earliest one wins
        if s:
            text = text.split(s)[0]
    return text


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in one buffer sized for the prompt plus the generation budget.

    DynamicLayer concatenates every new token onto the whole cache, copying it at each step and layer (the
    largest cost after the matrix products in a profile of MGSM decoding); here a step writes its token in
    place and the layer returns views of the filled part: the same values, so the same attention outputs.
    """

    def __init__(self, capacity):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h, _, d = key_states.shape
            self.key_buffer = key_states.new_empty((b, h, self.capacity, d))
            self.value_buffer = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"PreallocatedLayer: {end} positions do not fit its capacity {self.capacity}")
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices):
        if self.length:
            # index_select copies whole rows, several times faster than indexing with a tensor
            self.key_buffer = self.key_buffer.index_select(0, indices)
            self.value_buffer = self.value_buffer.index_select(0, indices)
            self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


def generation_cache(model, capacity):
    """The model's own DynamicCache with its full-attention layers preallocated for `capacity` positions."""
    cache = DynamicCache(config=common.unwrap(model).config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, max_new_tokens, stops, batch_size=16, progress=None,
                    skip_leading_space=False, shard=None, on_oom=None):
    """Greedy continuations of prompts, cut at the first stop string (lm-eval's generate_until).

    skip_leading_space: stop strings count only once the answer has begun, i.e. leading whitespace is
    dropped first (an instruction-tuned model often answers "### Response:\n" with one more "\n", which
    the harness's rule would turn into an empty answer). Used with --prompt-style alpaca only.

    Batches of prompts sorted by length, left-padded, one prefill and then one token per step on a KV
    cache preallocated for the prompt and the budget (generation_cache); a row leaves the batch (and its cache
    rows are dropped) as soon as it emits EOS or a stop string, so long rambling rows do not keep finished
    ones computing. Returns (texts, numbers of new tokens).
    shard = (rank, world): generate only batches b with b % world == rank; the other prompts get None.
    on_oom: see halving_on_oom.
    """
    device = next(model.parameters()).device
    max_ctx = model_max_length(model) - max_new_tokens
    stops = list(stops) + ([tokenizer.eos_token] if tokenizer.eos_token and tokenizer.eos_token not in stops else [])
    window = max((len(s.encode("utf-8")) for s in stops), default=0) + 2  # tokens that can hold a stop string
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    enc = [tok_encode(tokenizer, p)[-max_ctx:] for p in prompts]  # left truncation, as the harness
    order = sorted(range(len(prompts)), key=lambda i: (-len(enc[i]), prompts[i]))
    texts, counts = [None] * len(prompts), [None] * len(prompts)
    rank, world = shard or (0, 1)
    for start in range(0, len(order), batch_size):
        if (start // batch_size) % world != rank:  # another rank's batch
            continue
        idx = order[start:start + batch_size]
        done = halving_on_oom(partial(_generate_batch, model, tokenizer, enc, prompts, max_new_tokens, stops, window,
                                      eos, pad, skip_leading_space, device), idx, on_oom, model)
        for i, (text, count) in done.items():
            texts[i], counts[i] = text, count
        if progress is not None:
            progress.update(len(idx))
    return texts, counts


def _generate_batch(model, tokenizer, enc, prompts, max_new_tokens, stops, window, eos, pad, skip_leading_space,
                    device, idx):
    """{prompt index: (text, new tokens)} of one batch of prompts (see greedy_generate)."""
    T = max(len(enc[i]) for i in idx)
    ids = torch.full((len(idx), T), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), T), dtype=torch.long)
    for b, i in enumerate(idx):
        ids[b, T - len(enc[i]):] = torch.tensor(enc[i])
        mask[b, T - len(enc[i]):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF generate derives for left padding
    cache = generation_cache(model, T + max_new_tokens)
    steer = intervention_of(model)
    with steering(steer, pos, mask.bool(), mask.sum(1)):  # the prompt is the context
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    last_pos = pos[:, -1]
    alive = list(range(len(idx)))  # batch rows still generating
    generated = [[] for _ in idx]
    for step in range(max_new_tokens):
        next_tok = out.logits[:, -1].max(-1).indices  # argmax's first maximum, in a third of its time in bf16
        keep = []
        for k, (b, tok) in enumerate(zip(alive, next_tok.tolist())):
            generated[b].append(tok)
            if tok in eos:
                continue
            if skip_leading_space:
                tail = tokenizer.decode(generated[b]).lstrip()  # O(new tokens): small next to a forward
            else:
                tail = tokenizer.decode(generated[b][-window:])
            if stops and any(s in tail for s in stops):
                continue
            keep.append(k)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):  # drop finished rows from the batch and the cache
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, next_tok, last_pos = mask[sel], next_tok[sel], last_pos[sel]
            alive = [alive[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        last_pos = last_pos + 1
        with steering(steer, last_pos[:, None], torch.ones_like(next_tok[:, None], dtype=torch.bool),
                      torch.zeros_like(last_pos)):  # a generated token is never context
            out = model(input_ids=next_tok[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                        past_key_values=cache, use_cache=True)
    done = {}
    for b, i in enumerate(idx):
        toks = generated[b]
        toks = toks[:-1] if toks and toks[-1] in eos else toks
        text = tokenizer.decode(toks, skip_special_tokens=True)
        done[i] = (truncate_at_stops(text.lstrip() if skip_leading_space else text, stops), len(generated[b]))
    return done


# -----------------------------------------------------------------------------
# batch size: --batch-size N, or auto (on CUDA the largest batch that fits)

AUTO_BATCH_CPU = 16  # --batch-size auto on a CPU: the fixed default (no device memory to fill)
AUTO_BATCH_MAX = 64  # the largest batch the probe tries (the harness's max_batch_size)


def probes_memory(device):
    """Whether --batch-size auto probes this device's memory (CUDA) or takes AUTO_BATCH_CPU."""
    return torch.device(device).type == "cuda"


def free_device_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def memory_text(device):
    """The device's memory, for the error that says a batch of 1 does not fit."""
    if torch.device(device).type == "cuda":
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
    import psutil
    mem = psutil.virtual_memory()
    return f"{mem.available / 2**30:.1f} of {mem.total / 2**30:.1f} GiB free"


def no_fit_error(model, what):
    p = next(model.parameters())
    return UserError(f"--batch-size auto: {what} does not fit on {p.device} ({memory_text(p.device)}) with the model "
                     f"in {str(p.dtype).replace('torch.', '')}; pass --dtype bfloat16 (or float16) to halve the "
                     "weights' memory, a shorter --max-new-tokens, or use a device with more memory")


def probe_batch_size(model, n_tokens, kind):
    """The largest batch of n_tokens-token rows (<= AUTO_BATCH_MAX, halving) whose forward fits in memory:
    full logits for log-likelihoods (an upper bound on the positions scored), the last position and the KV
    cache for generation (n_tokens = the longest prompt + the generation budget)."""
    device = next(model.parameters()).device
    size = AUTO_BATCH_MAX
    while size >= 1:
        try:
            with torch.no_grad():
                ids = torch.zeros((size, n_tokens), dtype=torch.long, device=device)
                every = torch.ones_like(ids, dtype=torch.bool)
                with steering(intervention_of(model), every.cumsum(1) - 1, every, torch.full((size,), n_tokens)):
                    if kind == "generation":
                        model(input_ids=ids, use_cache=True, logits_to_keep=1)
                    else:
                        model(input_ids=ids, use_cache=False)
            return size
        except torch.OutOfMemoryError:
            free_device_memory(device)
            size //= 2
    raise no_fit_error(model, f"one sequence of {n_tokens} tokens")


def halving_on_oom(run, batch, on_oom, model, rows=len):
    """run(batch) -> {key: value}; on an out-of-memory error with on_oom set (--batch-size auto), each half of
    the batch runs on its own (halving again as needed) and on_oom(rows of the half) records it; without
    on_oom the error propagates. One job that does not fit alone is one clear error."""
    try:
        return run(batch)
    except torch.OutOfMemoryError:
        if on_oom is None:
            raise
    free_device_memory(next(model.parameters()).device)
    if len(batch) == 1:
        raise no_fit_error(model, f"a batch of {rows(batch)} sequence(s)")
    half = (len(batch) + 1) // 2
    on_oom(rows(batch[:half]))
    done = halving_on_oom(run, batch[:half], on_oom, model, rows)
    done.update(halving_on_oom(run, batch[half:], on_oom, model, rows))
    return done


class BatchSize:
    """--batch-size N, or auto: on CUDA the largest batch that fits, probed once per task kind and length
    (the cell's longest row; its other batches are no longer), agreed over the ranks (the smallest, so that
    every rank has the same batch plan); a batch that still runs out of memory is halved and retried, not
    the task. On a CPU auto is AUTO_BATCH_CPU. `used` is what the last cell used (for the run JSON)."""

    def __init__(self, requested):
        self.requested = requested
        self.probed = {}  # (kind, tokens) -> batch size, for the model being evaluated
        self.used = dict(batch_size=requested, batch_halved_to=None)

    def new_model(self):
        self.probed = {}

    def for_cell(self, model, kind, longest, ranks):
        """The batch size of one cell's plan; longest() = its longest row in tokens (computed only to probe)."""
        if self.requested != "auto":
            size = self.requested
        elif not probes_memory(next(model.parameters()).device):
            size = AUTO_BATCH_CPU
        else:
            key = (kind, longest())
            if key not in self.probed:
                self.probed[key] = min(ranks.gathered(lambda: probe_batch_size(model, key[1], kind)))
            size = self.probed[key]
        self.used = dict(batch_size=size, batch_halved_to=None)
        return size

    def on_oom(self):
        return self.halved if self.requested == "auto" else None

    def halved(self, rows):
        smallest = self.used["batch_halved_to"]
        self.used["batch_halved_to"] = rows if smallest is None else min(smallest, rows)


# -----------------------------------------------------------------------------
# data parallel: `torchrun --nproc_per_node N` / `accelerate launch --num_processes N` shard each cell's batches


class RankFailed(Exception):
    """Some rank raised: every rank leaves with exit code `code`; rank 0 prints `message` once."""

    def __init__(self, message, code):
        super().__init__(message)
        self.message, self.code = message, code


def merge_shards(parts):
    """Element-wise union of the ranks' partial results (nested lists / tuples, None where a rank did not
    compute the value): every value was computed by exactly one rank."""
    if isinstance(parts[0], (list, tuple)):
        return type(parts[0])(merge_shards(list(p)) for p in zip(*parts))
    return next((p for p in parts if p is not None), None)


class Ranks:
    """The processes of one command. The launcher sets RANK, WORLD_SIZE and LOCAL_RANK (none: one process).

    Every rank builds the same batch plan and computes its share of the batches (sharded); rank 0 alone
    summarises and writes (on_main). Each collective step also carries failures: a rank that raises sends
    its error instead of its results, so every rank stops together and rank 0 prints the error once.
    """

    def __init__(self, rank=0, world=1, local=0):
        self.rank, self.world, self.local = rank, world, local

    @classmethod
    def from_env(cls):
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def main(self):
        return self.rank == 0

    def start(self, device_type):
        """Join the process group (nccl on CUDA, each rank on cuda:LOCAL_RANK; gloo on CPU); one process: no-op."""
        if self.world == 1:
            return
        import datetime
        if device_type == "cuda":
            torch.cuda.set_device(self.local)
        common.before_process_group()
        # rank 0 alone runs --analysis / --compare / the writing while the others wait: no short timeout
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=12))

    def barrier(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def stop(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _run(self, fn):
        """("ok", fn()) or ("error", message, exit code); a RankFailed is already known to every rank."""
        import traceback
        try:
            return ("ok", fn())
        except RankFailed:
            raise
        except UserError as e:
            return ("error", f"error: {e}", 2)
        except Exception:
            return ("error", f"rank {self.rank} failed:\n{traceback.format_exc()}", 1)

    def _exchange(self, payload):
        payloads = [None] * self.world
        torch.distributed.all_gather_object(payloads, payload)
        failed = [p for p in payloads if p[0] == "error"]
        if failed:
            raise RankFailed(failed[0][1], failed[0][2])
        return payloads

    def checked(self, fn):
        """This rank's fn(); if fn raised on any rank, RankFailed on every rank (one process: fn() as is)."""
        if self.world == 1:
            return fn()
        payload = self._run(fn)
        self._exchange(("ok",) if payload[0] == "ok" else payload)  # only the status travels
        return payload[1]

    def gathered(self, fn):
        """[fn() of every rank] on every rank (or RankFailed)."""
        if self.world == 1:
            return [fn()]
        return [p[1] for p in self._exchange(self._run(fn))]

    def sharded(self, fn):
        """fn(shard=(rank, world)) on every rank, the partial results merged (merge_shards) on every rank."""
        if self.world == 1:
            return fn()
        return merge_shards(self.gathered(partial(fn, shard=(self.rank, self.world))))

    def on_main(self, fn):
        """fn() on rank 0 while the other ranks wait (its result on rank 0, None elsewhere)."""
        return self.checked(lambda: fn() if self.main else None)


SINGLE = Ranks()  # one process


# -----------------------------------------------------------------------------
# the tasks: one row of TASKS per task, a small class per kind that runs it


def generation_setup(task, lang, args):
    """(stop strings, max new tokens) for a generation task."""
    spec = TASKS[task]
    stops = spec.stops(lang)
    if args.prompt_style == "alpaca":
        stops.append("\n### ")  # the next turn of the Alpaca template
    return stops, args.max_new_tokens or spec.max_new_tokens


def wrap_prompt(prompt, args):
    """--prompt-style alpaca: the harness prompt becomes the instruction of common.build_prompt."""
    return common.build_prompt(prompt) if args.prompt_style == "alpaca" else prompt


def mean_metrics(rows):
    """{name: {score, stderr}} of every per-item score, mean and standard error over items."""
    metrics = {}
    for name in rows[0]["scores"]:
        score, se = mean_stderr([r["scores"][name] for r in rows])
        metrics[name] = dict(score=score, stderr=se)
    return metrics


@dataclass(kw_only=True)
class Task:
    """One task: where its items come from and what it reports. The subclass (its kind) scores it in two
    steps: score_items (the model's work, one row per item; items are independent, so any split of them
    into batches gives the same rows; with several ranks each computes its share of the batches and every
    rank gets all the rows) and summarise (the cell's scores from all its rows, on rank 0)."""
    loader: Callable  # (args, lang, split, hub) -> (items, data file)
    langs: list  # languages of the shipped data
    splits: tuple  # the first is the default (the harness's)
    metric: str  # the primary metric; the others are kept in the JSON
    scorer: str  # how the score is computed, recorded with it
    harness: str = None  # lm-evaluation-harness task name, {l} = language (None: the harness has no such task)
    hub: tuple = None  # (Hugging Face dataset, config) the harness reads, for --data-source hub
    fewshot: bool = False  # --num-fewshot applies
    nlu_average: bool = False  # part of the paper's NLU average in results.md
    in_all: bool = True  # included in --tasks all
    name: str = ""  # the key in TASKS (set below the table)
    directions = (None,)  # a translation task runs each language in two directions

    def languages(self, args):
        return self.langs

    def no_data_hint(self, args):
        return ""

    def result_key(self, args):
        return self.name

    @property
    def result_keys(self):
        return [self.name]

    def load(self, lang, direction, args):
        """Items (after --limit), the data file and the split of one cell; raises UserError on bad input."""
        split = args.split if args.split in self.splits else self.splits[0]
        if args.data_source == "hub" and not self.hub:
            raise UserError(f"task {self.name} has no Hugging Face dataset here; use --data-source local")
        items, src = self.loader(args, lang, split, self.hub if args.data_source == "hub" else None)
        if args.limit is not None:
            items = items[:args.limit]  # the first N items, as the harness's --limit
        if not items:
            raise UserError(f"{self.name} {lang}: no items in {src}")
        return items, src, split

    def settings(self, args):
        """The settings that apply to this kind only (None elsewhere)."""
        return dict(math_shots=None, mt_data=None, prompt_style=None)


@dataclass(kw_only=True)
class MultipleChoiceTask(Task):
    """Log-likelihood multiple choice: the choice with the highest summed log-probability wins (lm-eval acc)."""
    kind = "multiple-choice log-likelihood"
    acc_strict: bool = False  # also report acc_strict: a tie at the top counts as wrong

    def n_requests(self, items):
        return sum(len(it["choices"]) for it in items)

    def score_items(self, model, tokenizer, lang, items, args, progress=None, ranks=SINGLE):
        groups = [[encode_request(tokenizer, it["context"], " " + c) for c in it["choices"]] for it in items]
        batch_size = args.batch.for_cell(model, "loglikelihood", lambda: longest_request(model, groups), ranks)
        lls = ranks.sharded(partial(loglikelihoods, model, groups, batch_size, not args.no_share_prefix, progress,
                                    on_oom=args.batch.on_oom()))
        rows = []
        for it, ll in zip(items, lls):
            scores = [s for s, _ in ll]
            pred = choose(scores)
            row_scores = {"acc": float(pred == it["gold"])}
            if self.acc_strict:
                # acc is the harness's argmax (the first of tied maxima: TruthfulQA stores the correct choice
                # first, so a tie with it counts as right); acc_strict counts any tie at the top as wrong
                row_scores["acc_strict"] = float(pred == it["gold"] and scores.count(max(scores)) == 1)
            rows.append(dict(id=it["id"], context=it["context"], choices=it["choices"], loglikelihoods=scores,
                             n_tokens=[n for _, n in ll], pred=pred, gold=it["gold"], correct=bool(row_scores["acc"]),
                             scores=row_scores))
        return rows

    def summarise(self, rows, lang, args):
        metrics = mean_metrics(rows)
        ties = sum(r["loglikelihoods"].count(max(r["loglikelihoods"])) > 1 for r in rows)
        return dict(metric=self.metric, score=metrics[self.metric]["score"], stderr=metrics[self.metric]["stderr"],
                    scorer=self.scorer, aggregation="mean", ties=ties, metrics=metrics)


@dataclass(kw_only=True)
class GenerationTask(Task):
    """Greedy generation cut at the stop strings, scored item by item, the mean over items."""
    kind = "generation"
    stops: Callable = None  # lang -> stop strings
    score: Callable = None  # (prediction, gold, lang) -> (scores, extracted answers or None)
    correct: str = None  # the per-item score that makes an item `correct` (== 1)
    max_new_tokens: int = 256  # the harness's default max_gen_toks unless it sets one

    def n_requests(self, items):
        return len(items)

    def generate(self, model, tokenizer, lang, items, args, progress, ranks):
        stops, max_new = generation_setup(self.name, lang, args)
        prompts = [wrap_prompt(it["prompt"], args) for it in items]

        def longest():  # the longest prompt and its generation budget, in tokens
            return min(max(len(tok_encode(tokenizer, p)) for p in prompts) + max_new, model_max_length(model))

        batch_size = args.batch.for_cell(model, "generation", longest, ranks)
        outputs, n_new = ranks.sharded(partial(greedy_generate, model, tokenizer, prompts, max_new, stops, batch_size,
                                               progress, skip_leading_space=args.prompt_style == "alpaca",
                                               on_oom=args.batch.on_oom()))
        return [dict(id=it["id"], prompt=prompt, prediction=out, gold=it["gold"], n_new_tokens=n)
                for it, prompt, out, n in zip(items, prompts, outputs, n_new)]

    def score_items(self, model, tokenizer, lang, items, args, progress=None, ranks=SINGLE):
        rows = self.generate(model, tokenizer, lang, items, args, progress, ranks)
        for row in rows:
            row["scores"], extracted = self.score(row["prediction"], row["gold"], lang)
            if extracted is not None:
                row["extracted"] = extracted
            row["correct"] = bool(row["scores"][self.correct] == 1.0)
        return rows

    def summarise(self, rows, lang, args):
        stops, max_new = generation_setup(self.name, lang, args)
        metrics = mean_metrics(rows)
        return dict(stops=stops, max_new_tokens=max_new, prompt_style=args.prompt_style, metric=self.metric,
                    score=metrics[self.metric]["score"], stderr=metrics[self.metric]["stderr"], aggregation="mean",
                    metrics=metrics, scorer=self.scorer)

    def settings(self, args):
        return dict(math_shots=args.math_shots if self.fewshot and args.num_fewshot else None, mt_data=None,
                    prompt_style=args.prompt_style)


@dataclass(kw_only=True)
class TranslationTask(GenerationTask):
    """Corpus-level generation: en->xx and xx->en per language, corpus BLEU / chrF over all sentences."""
    kind = "corpus-level generation"
    directions = ("en-xx", "xx-en")

    def languages(self, args):
        return sorted(NTREX_CODES if args.mt_data == "ntrex" else TATOEBA_CODES)

    def no_data_hint(self, args):
        return f" (with --mt-data tatoeba: {', '.join(sorted(TATOEBA_CODES))})" if args.mt_data == "ntrex" else ""

    def result_key(self, args):
        return f"{self.name}_tatoeba" if args.mt_data == "tatoeba" else self.name

    @property
    def result_keys(self):
        return [self.name, f"{self.name}_tatoeba"]

    def load(self, lang, direction, args):
        # the sentences are the local test files whatever --split and --data-source say
        items, src = load_translation(args.data_dir, lang, direction, args.mt_data)
        items = items[:args.limit] if args.limit is not None else items
        if not items:
            raise UserError(f"{self.name} {lang}: no sentences in {src}")
        return items, src, self.splits[0]

    def score_items(self, model, tokenizer, lang, items, args, progress=None, ranks=SINGLE):
        rows = self.generate(model, tokenizer, lang, items, args, progress, ranks)
        for row, it in zip(rows, items):
            row["prediction"] = row["prediction"].strip()
            row["tgt_lang"] = it["tgt_lang"]
        return rows

    def summarise(self, rows, lang, args):
        stops, max_new = generation_setup(self.name, lang, args)
        bleu, chrf = bleu_metrics(rows[0]["tgt_lang"])
        hyps, refs = [r["prediction"] for r in rows], [r["gold"] for r in rows]
        metrics = {}
        for name, m in (("bleu", bleu), ("chrf", chrf)):
            metrics[name] = dict(score=m.corpus_score(hyps, [refs]).score,
                                 stderr=common.bootstrap_se(common.ItemCell(rows, name, corpus=m), 1000, args.seed),
                                 signature=str(m.get_signature()))
        return dict(stops=stops, max_new_tokens=max_new, prompt_style=args.prompt_style, metric=self.metric,
                    score=metrics[self.metric]["score"], stderr=metrics[self.metric]["stderr"],
                    aggregation="corpus", metrics=metrics, scorer=self.scorer)

    def settings(self, args):
        return dict(super().settings(args), mt_data=args.mt_data)


@dataclass(kw_only=True)
class NllTask(Task):
    """Held-out NLL of the training format (02_train_dft.py's layout), token-weighted; lower is better."""
    kind = "held-out NLL"

    def languages(self, args):
        if not args.pairs:
            raise UserError(f"task {self.name} needs --pairs DEV.jsonl (the dev pairs written by 01_build_pairs.py)")
        return nll_langs(args.pairs)

    def n_requests(self, items):
        return len(items)

    def score_items(self, model, tokenizer, lang, items, args, progress=None, ranks=SINGLE):
        groups = [[(common.encode_prompt(tokenizer, it["x"])[0], common.encode_response(tokenizer, it["y"]))]
                  for it in items]
        batch_size = args.batch.for_cell(model, "loglikelihood", lambda: longest_request(model, groups), ranks)
        lls = ranks.sharded(partial(loglikelihoods, model, groups, batch_size, False, progress,
                                    on_oom=args.batch.on_oom()))
        return [dict(id=it["id"], prompt=common.build_prompt(it["x"]), target=it["y"], nll_sum=-ll[0][0],
                     n_tokens=ll[0][1], scores={"nll": -ll[0][0] / ll[0][1]}) for it, ll in zip(items, lls)]

    def summarise(self, rows, lang, args):
        sums = torch.tensor([[r["nll_sum"]] for r in rows], dtype=torch.float64)
        (nll,), (se,) = common.mean_and_se_over_sentences(sums, torch.tensor([r["n_tokens"] for r in rows]))
        se = se if len(rows) > 1 else None
        return dict(metric=self.metric, score=nll, stderr=se, higher_is_better=False, aggregation="ratio",
                    scorer=self.scorer,
                    metrics={"nll": dict(score=nll, stderr=se), "perplexity": dict(score=math.exp(nll), stderr=None)})


def line_stops(lang):
    return ["\n"]


def mkqa_stops(lang):
    return list(MKQA_STOPS)


def math_stops(lang):
    return [MGSM_WORDS[lang][0]] + MGSM_EXTRA_STOPS


def qa_scorer(harness):
    """A QA row's per-item scorer; harness: which harness scorer gives f1 / exact_match (None: ours only)."""
    return lambda prediction, golds, lang: (score_qa(prediction, golds, lang, harness), None)


def math_scorer(cot):
    return lambda output, gold, lang: score_math(output, gold, lang, cot)


MC_SCORER = "argmax of summed continuation log-likelihood, first of tied maxima (lm-eval acc)"
QA_OURS = "f1_lang/exact_match_lang: ours (per-language articles, Unicode punctuation, zh/ja/th over characters)"
FLEXIBLE_SCORER = ("lm-eval mgsm flexible-extract: last match of (-?[$0-9.,]{2,})|(-?[0-9]+), exact match "
                   "ignoring case and punctuation")
LAST_NUMBER_SCORER = "last number in the output (commas removed) equals the gold number"
MT_LANGS = sorted(set(NTREX_CODES) | set(TATOEBA_CODES))

# The task table: adding a task is adding a row (and its loader). Primary metrics: the harness's where it has
# the task (mgsm: flexible-extract, comparable with its published numbers); msvamp has no harness task: the
# last-number rule of QAlign; QA: the harness's f1 for xquad / mlqa, ours (f1_lang) for mkqa.
TASKS = {
    "xnli": MultipleChoiceTask(
        loader=load_xnli, langs=sorted(XNLI_WORDS), splits=("validation", "test"), harness="xnli_{l}",
        hub=("facebook/xnli", "{l}"), metric="acc", scorer=MC_SCORER, nlu_average=True),
    "xcopa": MultipleChoiceTask(
        loader=load_xcopa, langs=sorted(XCOPA_CONNECTORS), splits=("test", "validation"), harness="xcopa_{l}",
        hub=("cambridgeltl/xcopa", "{l}"), metric="acc", scorer=MC_SCORER, nlu_average=True),
    "xstorycloze": MultipleChoiceTask(
        loader=load_xstorycloze, langs=["ar", "en", "zh"], splits=("eval",), harness="xstorycloze_{l}",
        hub=("juletxara/xstory_cloze", "{l}"), metric="acc", scorer=MC_SCORER, nlu_average=True),
    "mmlu": MultipleChoiceTask(
        loader=load_mmlu, langs=["ar", "en", "vi", "zh"], splits=("val", "dev"), harness="m_mmlu_{l}",
        hub=("alexandrainst/m_mmlu", "{l}"), metric="acc", scorer=MC_SCORER, fewshot=True, nlu_average=True),
    "truthfulqa": MultipleChoiceTask(
        loader=load_truthfulqa, langs=["ar", "vi", "zh"], splits=("validation",), harness="truthfulqa_{l}_mc1",
        hub=("alexandrainst/m_truthfulqa", "{l}"), metric="acc", acc_strict=True,
        scorer=MC_SCORER + "; acc_strict: a tie at the top counts as wrong"),
    "xquad": GenerationTask(
        loader=load_xquad, langs=["ar", "en", "vi", "zh"], splits=("validation",), harness="xquad_{l}",
        hub=("google/xquad", "xquad.{l}"), stops=line_stops, score=qa_scorer("xquad"), metric="f1",
        correct="exact_match",
        scorer="f1/exact_match: the harness's xquad scorer (transformers squad_metrics: English normalisation, "
               "whitespace tokens, first gold answer); " + QA_OURS),
    "mlqa": GenerationTask(
        loader=load_mlqa, langs=["ar", "en", "vi", "zh"], splits=("dev",), harness="mlqa_{l}_{l}",
        hub=("facebook/mlqa", "mlqa.{l}.{l}"), stops=line_stops, score=qa_scorer("mlqa"), metric="f1",
        correct="exact_match",
        scorer="f1/exact_match: the harness's mlqa scorer (MLQA's official script; zh mixed segmentation), max "
               "over gold answers; " + QA_OURS),
    "mkqa": GenerationTask(
        loader=load_mkqa, langs=["ar", "en", "es", "ru", "zh"], splits=("dev",), stops=mkqa_stops,
        score=qa_scorer(None), metric="f1_lang", correct="exact_match_lang",
        scorer="no harness task: f1_lang/exact_match_lang (ours: per-language articles, Unicode punctuation, "
               "zh/ja/th over characters), max over gold answers"),
    "mgsm": GenerationTask(
        loader=partial(load_math, dataset="mgsm", cot=False), langs=MGSM_LANGS, splits=("test",),
        harness="mgsm_direct_{l}", hub=("juletxara/mgsm", "{l}"), fewshot=True, stops=math_stops,
        score=math_scorer(cot=False), metric="flexible_extract", correct="flexible_extract", scorer=FLEXIBLE_SCORER),
    "mgsm_cot": GenerationTask(
        loader=partial(load_math, dataset="mgsm", cot=True), langs=MGSM_LANGS, splits=("test",),
        harness="mgsm_native_cot_{l}", hub=("juletxara/mgsm", "{l}"), fewshot=True, stops=math_stops,
        score=math_scorer(cot=True), metric="flexible_extract", correct="flexible_extract", scorer=FLEXIBLE_SCORER),
    "msvamp": GenerationTask(
        loader=partial(load_math, dataset="msvamp", cot=False), langs=MSVAMP_LANGS, splits=("test",),
        fewshot=True, stops=math_stops, score=math_scorer(cot=False), metric="last_number", correct="last_number",
        scorer=LAST_NUMBER_SCORER),
    "msvamp_cot": GenerationTask(
        loader=partial(load_math, dataset="msvamp", cot=True), langs=MSVAMP_LANGS, splits=("test",),
        fewshot=True, stops=math_stops, score=math_scorer(cot=True), metric="last_number", correct="last_number",
        scorer=LAST_NUMBER_SCORER),
    "translation": TranslationTask(
        loader=None, langs=MT_LANGS, splits=("test",), stops=line_stops, metric="bleu",  # load: load_translation
        scorer="sacrebleu corpus BLEU/chrF; stderr: bootstrap over sentences (1000 resamples)"),
    "nll": NllTask(
        loader=load_nll, langs=sorted(common.LANGUAGES), splits=("dev",), metric="nll", in_all=False,
        scorer="token-weighted mean NLL (nats/token) of y + EOS given build_prompt(x)"),
}
for _name, _task in TASKS.items():  # a row knows its own name (error messages, result keys)
    _task.name = _name


def shots_for(task, args):
    return args.num_fewshot if TASKS[task].fewshot else 0


def load_task(task, lang, args, direction=None):
    """Items (after --limit), the data file and the split of one task x language (x direction)."""
    try:
        return TASKS[task].load(lang, direction, args)
    except common.MissingFile as e:
        raise UserError(f"{e}: {task}'s data is read from --data-dir {args.data_dir} (a folder laid out like data/, "
                        "data/README.md)") from None


def evaluate(model, tokenizer, task, lang, items, args, direction=None, ranks=SINGLE):
    """Score items; returns (result entry without file fields, per-item rows); the entry is None on ranks
    other than 0 (the model's work is shared, the summary is rank 0's)."""
    spec = TASKS[task]
    t0 = time.time()
    with tqdm(total=spec.n_requests(items), desc=f"{task} {direction or lang}", leave=False,
              disable=not ranks.main) as bar:
        rows = spec.score_items(model, tokenizer, lang, items, args, bar, ranks)
    halved = [h for h in ranks.gathered(lambda: args.batch.used["batch_halved_to"]) if h is not None]
    args.batch.used["batch_halved_to"] = min(halved, default=None)  # on any rank
    if not ranks.main:
        return None, rows
    entry = spec.summarise(rows, lang, args)
    seconds = time.time() - t0
    entry.update(n=len(items), higher_is_better=entry.get("higher_is_better", True), seconds=round(seconds, 2),
                 items_per_second=round(len(items) / max(seconds, 1e-9), 3))
    top = top_prediction(rows, entry)
    if top is not None:
        entry["top_prediction"] = top
    if "tgt_lang" in rows[0]:  # a translation cell: --compare rebuilds its BLEU / chrF for this language
        entry["tgt_lang"] = rows[0]["tgt_lang"]
    return entry, rows


# results.md marks a cell where one answer covers at least this share of the items (a degenerate model)
TOP_SHARE_MARK = 0.9


def top_prediction(rows, entry):
    """The most frequent prediction and the share of items it covers, or None (NLL, translation).

    Multiple choice: the chosen index; math: the number the primary scorer extracted; QA: the answer text
    (stripped). A model that answers "A" to every MMLU item scores the share of gold "A"s; this says so.
    """
    if "pred" in rows[0]:
        preds = [r["pred"] for r in rows]
    elif "extracted" in rows[0]:
        preds = [str(r["extracted"][entry["metric"]]) for r in rows]
    elif entry.get("aggregation") == "mean" and "prediction" in rows[0]:
        preds = [r["prediction"].strip() for r in rows]
    else:
        return None
    value, count = Counter(preds).most_common(1)[0]
    return dict(value=value, share=count / len(preds))


# -----------------------------------------------------------------------------
# outputs: run JSON, per-item JSONL, results.md, compare


def run_name_for(model_path):
    name = os.path.basename(os.path.normpath(model_path)) or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def result_key(task, args):
    return TASKS[task].result_key(args)


def is_run_json(obj):
    return isinstance(obj, dict) and obj.get("format") == "dft-eval-run/1"


def same_model(recorded, given):
    """One model folder however it is spelt (runs/tft, runs/tft/, its absolute path); hub names as written."""
    if isinstance(recorded, str) and os.path.isdir(recorded) and os.path.isdir(given):
        return os.path.samefile(recorded, given)
    return isinstance(recorded, str) and os.path.normpath(recorded) == os.path.normpath(given)


def fmt_score(entry):
    """Percent for fractions (acc, F1, EM), as the paper prints them; BLEU/chrF and NLL as they are."""
    scale = 100.0 if entry["aggregation"] == "mean" else 1.0
    s = f"{entry['score'] * scale:.2f}"
    if entry.get("stderr") is not None:
        s += f" ± {entry['stderr'] * scale:.2f}"
    return s


def results_table(runs):
    """Markdown: rows = runs, columns = dtype, task/lang (score ± stderr) and the paper's NLU average.

    The only average is the paper's NLU average: the mean accuracy over the XNLI, XCOPA, XStoryCloze and
    M-MMLU cells of target languages (not English) among the columns; * = the run lacks some of those cells.
    Generation, math, translation, English and NLL cells are never averaged. A cell marked ⚠ is one where a
    single answer covers >= TOP_SHARE_MARK of the items (top_prediction in the run JSON).
    """
    order = [key for spec in TASKS.values() for key in spec.result_keys]
    rank = lambda t: (order.index(t) if t in order else len(order), t)  # noqa: E731 (the task table's order)
    cols = sorted({(t, l) for r in runs for t, langs in r["results"].items() for l in langs},
                  key=lambda c: (rank(c[0]), c[1]))
    nlu_tasks = [t for t, spec in TASKS.items() if spec.nlu_average]  # target languages only: English left out
    nlu_cols = [(t, l) for t, l in cols if t in nlu_tasks and l != "en"]
    header = ["run", "dtype"] + [f"{t} {l}" for t, l in cols] + (["NLU avg"] if nlu_cols else [])
    lines = common.table_header(*header)
    marked = False
    for r in runs:
        entries = [e for langs in r["results"].values() for e in langs.values()]
        dtypes = sorted({e.get("settings", {}).get("dtype") or "?" for e in entries})
        cells = [r["run"], ", ".join(dtypes)]
        for t, l in cols:
            e = r["results"].get(t, {}).get(l)
            top = (e or {}).get("top_prediction")
            mark = top is not None and top["share"] >= TOP_SHARE_MARK
            marked |= mark
            cells.append((fmt_score(e) + (" ⚠" if mark else "")) if e else "–")
        if nlu_cols:
            vals = [r["results"][t][l]["score"] * 100.0 for t, l in nlu_cols if l in r["results"].get(t, {})]
            star = "*" if len(vals) < len(nlu_cols) else ""
            cells.append(f"{sum(vals) / len(vals):.2f}{star}" if vals else "–")
        lines.append("| " + " | ".join(cells) + " |")
    notes = ("\nScores: primary metric per task (acc / F1 / EM in %, BLEU, NLL in nats/token, lower is better) ± "
             "standard error; n and every other scorer are in the run JSONs. dtype: the weights' dtype the run "
             "used (--dtype auto resolved).")
    if nlu_cols:
        notes += (" NLU avg: the paper's NLU average, mean accuracy over the XNLI, XCOPA, XStoryCloze and M-MMLU "
                  "columns of target languages (English left out); * = over fewer of those cells than the columns. "
                  "Nothing else is averaged.")
    if marked:
        notes += (f" ⚠ = one answer covers >= {TOP_SHARE_MARK:.0%} of the items (the score may be the share of "
                  "that answer among the golds; see top_prediction in the run JSON).")
    return "\n".join(lines) + "\n" + notes + "\n"


def write_results_md(out_dir):
    runs = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        try:
            obj = json.load(open(path, encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if is_run_json(obj) and obj.get("results"):
            runs.append(obj)
    table = "# Results\n\nEvery run JSON in this folder (one row per run; `03_evaluate.py --out` adds to it).\n\n"
    table += results_table(runs) if runs else "(no runs)\n"
    with common.atomic_open(os.path.join(out_dir, "results.md")) as f:
        f.write(table)
    return table


def item_cell(entry, rows, metric=None, percent=False):
    """The run's cell as common.ItemCell: its statistic on any draw of its items (fractions as the run JSON, or %
    with percent); metric: another of its per-item metrics (default the run JSON's; NLL for a ratio cell)."""
    metric = metric or ("nll" if entry["aggregation"] == "ratio" else entry["metric"])
    first = rows[0] if rows else {}
    scores = set(first.get("scores") or {})
    scores |= {new for new, old in common.OLD_METRIC_NAMES.items() if old in scores}
    offered = ({"chrf", "bleu"} if entry["aggregation"] == "corpus" else scores) | (
        {"nll"} if "nll_sum" in first else set())
    if rows and metric not in offered:
        raise UserError(f"{entry.get('items_file', 'a cell')}: its items have no {metric!r} score; a measure on this "
                        f"cell takes one of {', '.join(sorted(offered)) or '(none: its rows hold no score)'} as its "
                        "metric")
    if entry["aggregation"] != "corpus" or metric == "nll":
        return common.ItemCell(rows, metric, percent=percent, source=entry.get("items_file"))
    bleu, chrf = bleu_metrics(entry.get("tgt_lang"))
    return common.ItemCell(rows, metric, corpus=bleu if metric == "bleu" else chrf, source=entry.get("items_file"))



def load_items_file(json_path, entry):
    path = os.path.join(os.path.dirname(os.path.abspath(json_path)), entry["items_file"])
    return common.read_jsonl(path)




def cell_mismatches(ea, eb, ids_a, ids_b):
    """What makes two runs' cells not comparable: data file hash, split, item set, metric (names of fields)."""
    bad = []
    if ea.get("data_sha256") != eb.get("data_sha256") or (ea.get("data_sha256") is None
                                                         and ea.get("data_file") != eb.get("data_file")):
        bad.append(f"data file ({ea.get('data_file')} {str(ea.get('data_sha256'))[:12]} vs "
                   f"{eb.get('data_file')} {str(eb.get('data_sha256'))[:12]})")
    if ea.get("split") != eb.get("split"):
        bad.append(f"split ({ea.get('split')} vs {eb.get('split')})")
    if set(ids_a) != set(ids_b):
        bad.append(f"item set ({len(ids_a)} vs {len(ids_b)} items, {len(set(ids_a) & set(ids_b))} shared ids)")
    if ea.get("metric") != eb.get("metric"):
        bad.append(f"metric ({ea.get('metric')} vs {eb.get('metric')})")
    return bad


def compare_runs(path_a, path_b, out_dir, resamples, seed, allow_mismatch=False):
    """Paired bootstrap B - A per shared task x language, Holm-adjusted over the comparison's cells.

    Cells must be comparable: the same data file (sha256), split, item set and metric; otherwise a
    UserError lists every such cell, unless allow_mismatch (then the shared item ids are compared and
    the output says which cells differ and how).
    """
    a, b = (common.read_json(p) for p in (path_a, path_b))
    for p, obj in ((path_a, a), (path_b, b)):
        if not is_run_json(obj):
            raise UserError(f"{p} is not a run JSON written by 03_evaluate.py")
    cells, mismatched = [], []
    for task in sorted(set(a["results"]) & set(b["results"])):
        for lang in sorted(set(a["results"][task]) & set(b["results"][task])):
            ea, eb = a["results"][task][lang], b["results"][task][lang]
            ra, rb = load_items_file(path_a, ea), load_items_file(path_b, eb)
            ids_a, ids_b = [json.dumps(r["id"]) for r in ra], [json.dumps(r["id"]) for r in rb]
            bad = cell_mismatches(ea, eb, ids_a, ids_b)
            if bad:
                mismatched.append(f"{task} {lang}: " + "; ".join(bad))
            cells.append((task, lang, ea, eb, ra, rb, bad))
    if not cells:
        raise UserError(f"{path_a} and {path_b} share no task x language results")
    if mismatched and not allow_mismatch:
        raise UserError(f"{path_a} and {path_b} are not comparable in {len(mismatched)} cell(s):\n  "
                        + "\n  ".join(mismatched) + "\nevaluate both on the same data, split and items, or pass "
                        "--allow-mismatch to compare their shared item ids anyway")
    table = []
    for task, lang, ea, eb, ra, rb, bad in cells:
        cell_a, cell_b = item_cell(ea, ra), item_cell(eb, rb)
        n = common.align_cells([[cell_a], [cell_b]])[0]  # the shared item ids, in A's order
        if not n:
            print(f"[compare] {task} {lang}: no shared item ids, skipped")
            continue
        res = common.contrast_bootstrap([(-1.0, [cell_a]), (1.0, [cell_b])], resamples, seed, draws="indices")
        p = res["p"]
        table.append(dict(task=task, lang=lang, metric=ea["metric"], a=cell_a.value(), b=cell_b.value(),
                          delta=res["delta"], p=p, p_at_floor=common.p_at_floor(p, resamples), n=n, mismatch=bad,
                          scale=100.0 if ea["aggregation"] == "mean" else 1.0))
    if not table:
        raise UserError(f"{path_a} and {path_b} share no item ids in any task x language")
    for row, (p_holm, k) in zip(table, common.holm([r["p"] for r in table], [r["p_at_floor"] for r in table])):
        row.update(p_holm=p_holm, p_holm_is_bound=k is not None, p_holm_k=k)
    lines = [f"# {b['run']} vs {a['run']} (B - A)\n", f"A = {path_a}\nB = {path_b}\n",
             f"Paired bootstrap over items, B = {resamples} resamples, seed {seed}; p at the floor prints as "
             f"< 1/{resamples + 1}. p (Holm): adjusted over the {len(table)} cells of this comparison.\n"]
    one_sided = [f"{task} {lang} ({side} only)" for side, x, y in (("A", a, b), ("B", b, a))
                 for task in sorted(x["results"]) for lang in sorted(x["results"][task])
                 if lang not in y["results"].get(task, {})]
    if one_sided:
        lines.append("Not compared, evaluated in one run only: " + ", ".join(one_sided) + ".\n")
    if mismatched:
        lines.append("**--allow-mismatch**: these cells are not comparable and were compared on their shared item "
                     "ids anyway:\n" + "".join(f"- {m}\n" for m in mismatched))
    lines += ["| task | lang | metric | A | B | B - A | p | p (Holm) | n |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        sc = r.pop("scale")
        p_text = common.fmt_p(r["p"], resamples, 1 if r["p_at_floor"] else None)
        lines.append(f"| {r['task']} | {r['lang']}{' (mismatch)' if r['mismatch'] else ''} | {r['metric']} | "
                     f"{r['a'] * sc:.2f} | {r['b'] * sc:.2f} | {r['delta'] * sc:+.2f} | {p_text} | "
                     f"{common.fmt_p(r['p_holm'], resamples, r['p_holm_k'])} | {r['n']} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    stem = f"compare_{a['run']}_vs_{b['run']}"
    with common.atomic_open(os.path.join(out_dir, stem + ".md")) as f:
        f.write(text)
    common.write_json(os.path.join(out_dir, stem + ".json"), dict(a=path_a, b=path_b, resamples=resamples, seed=seed,
                                                                  allow_mismatch=allow_mismatch, mismatches=mismatched,
                                                                  one_sided=one_sided, rows=table))
    print(text)
    return table


# -----------------------------------------------------------------------------
# --analysis layers: the English-pivot picture per layer


def analysis_texts(lang, args, n):
    """n parallel (English, target) sentences: the --pairs file, else NTREX, else Tatoeba."""
    if args.pairs:
        pairs = [(r["x_en"], r["x_tgt"]) for r in nll_rows(args.pairs, ("x_en", "x_tgt", "lang")) if r["lang"] == lang]
        src = args.pairs
    elif lang in NTREX_CODES:
        src = os.path.join(args.data_dir, "ntrex128", f"newstest2019-ref.{NTREX_CODES[lang]}.txt")
        pairs = list(zip(_lines(os.path.join(args.data_dir, "ntrex128", "newstest2019-src.eng.txt")), _lines(src)))
    elif lang in TATOEBA_CODES:
        code = TATOEBA_CODES[lang]
        src = os.path.join(args.data_dir, "tatoeba_laser", f"tatoeba.{code}-eng.{code}")
        pairs = list(zip(_lines(os.path.join(args.data_dir, "tatoeba_laser", f"tatoeba.{code}-eng.eng")), _lines(src)))
    else:
        raise UserError(f"--analysis layers: no parallel text for {lang}; pass --pairs")
    pairs = [(e.strip(), t.strip()) for e, t in pairs if e.strip() and t.strip()][:n]
    if not pairs:
        raise UserError(f"--analysis layers: no {lang} sentences in {src}")
    return pairs, src


def vocab_classes(tokenizer, lang):
    """Boolean masks over the vocabulary: English tokens (Latin letters only) and target-script tokens."""
    en, tgt = [], []
    pattern = common.LANGUAGES[lang][1]
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        en.append(bool(re.fullmatch(r"\s*[A-Za-z]+\s*", s)))
        tgt.append(bool(pattern and re.search(pattern, s, flags=re.IGNORECASE)))
    return torch.tensor(en), torch.tensor(tgt)


LAYER_MEASURES = ("entropy", "mass_en", "mass_tgt", "top1_en", "top1_tgt", "cosine_en_tgt")
LENS_POSITIONS_PER_CHUNK = 256  # lens rows at a time: [256, vocab] float32 is 0.27 GB for Gemma's 262k tokens



@torch.no_grad()
def layer_analysis(model, tokenizer, lang, pairs, batch_size=8, max_length=128, lens=None):
    """Per block k = 1..L: lens entropy, English/target probability mass and top-1 share, en/tgt cosine.

    Each measure is kept per sentence (mean over its positions) so the curves carry standard errors
    over sentences and two runs on the same sentences can be compared pairwise. lens: a common.TunedLens; every
    lens measure is then also read through it, under the key "tuned" (same layout, DESIGN §6).
    """
    if tokenizer.padding_side != "right":  # left padding would shift the positions of every shorter sentence
        raise UserError("layer_analysis needs a right-padding tokenizer (load it with padding_side='right')")
    parts = common.model_parts(model)
    L = parts.num_layers
    device = next(model.parameters()).device
    en_mask, tgt_mask = (m.to(device) for m in vocab_classes(tokenizer, lang))
    lens_measures = LAYER_MEASURES[:-1]
    readouts = {"logit": None, **({"tuned": lens} if lens else {})}
    sums = {r: {m: [] for m in lens_measures} for r in readouts}  # per batch: [sentences, L] totals over positions
    positions, cosines = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="layer analysis", leave=False):
        chunk = pairs[start:start + batch_size]
        pooled = {}
        for side, texts in (("en", [e for e, _ in chunk]), ("tgt", [t for _, t in chunk])):
            enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(device)
            mask = enc.attention_mask.bool()
            token_positions = torch.arange(mask.shape[1], device=device).expand_as(mask)
            with common.capture_blocks(parts, range(1, L + 1)) as captured, \
                    steering(intervention_of(model), token_positions, mask, mask.sum(1)):  # the whole text is context
                parts.backbone(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
            m = mask[..., None].float()
            pooled[side] = [(captured[k] * m).sum(1) / m.sum(1) for k in range(1, L + 1)]  # mean over tokens
            if side == "tgt":
                sentence_of_position = mask.nonzero()[:, 0].cpu()
                for readout, tuned in readouts.items():
                    batch_sums = {name: torch.zeros(len(chunk), L, dtype=torch.float64) for name in lens_measures}
                    for k in range(1, L + 1):
                        states = captured[k][mask]
                        translator = tuned.translator(k) if tuned else None
                        for lo in range(0, len(states), LENS_POSITIONS_PER_CHUNK):
                            hi = lo + LENS_POSITIONS_PER_CHUNK
                            logits = common.lens_logits(parts, states[lo:hi], translator=translator)
                            logp = torch.log_softmax(logits.float(), dim=-1)
                            probs = logp.exp()
                            top = probs.argmax(-1)
                            values = dict(entropy=-(probs * logp).sum(-1), mass_en=probs @ en_mask.float(),
                                          mass_tgt=probs @ tgt_mask.float(), top1_en=en_mask[top].float(),
                                          top1_tgt=tgt_mask[top].float())
                            for name, v in values.items():
                                batch_sums[name][:, k - 1].index_add_(0, sentence_of_position[lo:hi],
                                                                      v.double().cpu())
                    for name in lens_measures:
                        sums[readout][name].append(batch_sums[name])
                positions.append(mask.sum(1).cpu())
        cosines.append(torch.stack([F.cosine_similarity(pooled["en"][k].float(), pooled["tgt"][k].float(), dim=-1)
                                    for k in range(L)], dim=1).double().cpu())
    counts = torch.cat(positions)
    latin_target = common.LANGUAGES[lang][1] is None

    def summary(per_sentence_sums):
        """{measure: mean curve}, with standard_errors and per_sentence, of the measures in per_sentence_sums."""
        out, standard_errors, per_sentence = {}, {}, dict(positions=counts.tolist())
        for name, totals in per_sentence_sums.items():
            if latin_target and name in ("mass_tgt", "top1_tgt"):
                out[name] = standard_errors[name] = per_sentence[name] = None
                continue
            weights = torch.ones_like(counts) if name == "cosine_en_tgt" else counts
            out[name], standard_errors[name] = common.mean_and_se_over_sentences(totals, weights)
            per_sentence[name] = [[round(x, 5) for x in row] for row in (totals / weights[:, None].double()).tolist()]
        return dict(out, standard_errors=standard_errors, per_sentence=per_sentence)

    res = dict(layers=list(range(1, L + 1)))
    res.update(summary({**{name: torch.cat(v) for name, v in sums["logit"].items()},
                        "cosine_en_tgt": torch.cat(cosines)}))
    if lens:  # additive: the logit-lens keys above are unchanged
        res["tuned"] = summary({name: torch.cat(v) for name, v in sums["tuned"].items()})
        res["tuned_lens"] = lens.record()
    res.update(
        n_sentences=len(counts), n_positions=int(counts.sum()),
        definitions=dict(
            entropy="logit-lens next-token entropy (nats), mean over target-language positions (every token of "
                    "the target text, BOS included where the tokenizer adds one)",
            mass_en="lens probability on tokens made of Latin letters only (English), mean over target positions",
            mass_tgt=f"lens probability on tokens containing {lang} script ({common.LANGUAGES[lang][1]}); "
                     "null for Latin-script languages",
            top1_en="share of target positions whose lens top-1 token is English", top1_tgt="... is target script",
            cosine_en_tgt="cosine of mean-pooled raw block outputs of parallel en/target sentences, mean over "
                          "sentences",
            standard_errors="per measure and block, over sentences (clustered: a sentence's positions are one unit)",
            per_sentence="per sentence and block: the measure averaged over that sentence's target positions "
                         "(positions = their number); same sentence order as the data file, for paired comparisons",
            **({"tuned": "the lens measures read through the tuned lens (tuned_lens: its folder, sha256, fitted "
                         "blocks, and whether this model's readout weights are the ones it was fitted on); an "
                         "unfitted block's translator is zero: the logit lens"} if lens else {})))
    return res


def plot_layers(curves, lang, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("entropy", None, "lens entropy (nats)"), ("mass_en", "mass_tgt", "lens probability mass"),
              ("top1_en", "top1_tgt", "top-1 token share"), ("cosine_en_tgt", None, "cosine(en, tgt) pooled")]
    for ax, (a, b, title) in zip(axes.flat, panels):
        for i, (run, c) in enumerate(curves.items()):
            color = f"C{i}"
            for key, style, suffix in ((a, "-", " English" if b else ""), (b, "--", f" {lang}")):
                if key is None or c.get(key) is None:
                    continue
                ax.plot(c["layers"], c[key], color=color, linestyle=style, label=run + suffix)
                se = (c.get("standard_errors") or {}).get(key)
                if se:  # 95% band over sentences (older result files have none)
                    ax.fill_between(c["layers"], [m - 1.96 * s for m, s in zip(c[key], se)],
                                    [m + 1.96 * s for m, s in zip(c[key], se)], color=color, alpha=0.15,
                                    linewidth=0)
                readout = c.get("tuned") or {}
                if readout.get(key) is None:
                    continue
                # only the fitted blocks: elsewhere the tuned lens is the logit lens, and a line through them would
                # draw a curve the lens never measured
                ks = [k for k, block in enumerate(c["layers"]) if block in c["tuned_lens"]["fitted_blocks"]]
                ax.errorbar([c["layers"][k] for k in ks], [readout[key][k] for k in ks],
                            yerr=[1.96 * readout["standard_errors"][key][k] for k in ks], color=color, linestyle="none",
                            marker="o" if style == "-" else "x", capsize=3, label=f"{run} tuned{suffix}")
        ax.set_title(title)
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    tuned = any(c.get("tuned") for c in curves.values())
    bands = any(c.get("standard_errors") for c in curves.values())  # older result files have none
    fig.suptitle(f"Logit lens on {lang} inputs (solid: English tokens, dashed: {lang} tokens"
                 + ("; bands: 95% over sentences)" if bands else ")")
                 + (f"\ntuned lens at its fitted blocks (o: English, x: {lang}; bars: 95% over sentences)" if tuned else ""))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model", nargs="+", default=[], help="model folders (02_train_dft.py --out), LoRA adapter "
                   "folders, intervention folders (02_train_dft.py --fit: the base with the maps hooked in) "
                   f"or hub names; several = one run each (default model: {common.DEFAULT_MODEL})")
    g.add_argument("--run-name", nargs="+", default=None, help="run names, one per --model (default: the folder "
                   "basename, sanitised)")
    g.add_argument("--tasks", default=PAPER_TASKS, help=f"comma-separated, from: {', '.join(TASKS)}; "
                   "'all' = every task but nll (default: the paper's suite)")
    g.add_argument("--langs", default="zh,vi,ar", help="comma-separated language codes; a combination without "
                   "data is skipped with a note, a task with none of them is an error (default: zh,vi,ar)")
    g.add_argument("--out", default=None, help="output folder (required except for --compare, which defaults to B's)")
    g = p.add_argument_group("inference-time peers (a --model that is an intervention folder of 02_train_dft.py --fit)")
    g.add_argument("--steer-alpha", type=float, default=None, help="the scale alpha of the intervention (default: the "
                   "folder's; 0 = the model itself)")
    g.add_argument("--steer-base", default=None, help="apply the folder's maps to this model instead of the one they "
                   "were fitted on (e.g. a tft run of that base): same architecture and shapes; its weights hash is "
                   "recorded")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=common.DATA_DIR, help="folder laid out like data/ (default: the shipped data)")
    g.add_argument("--data-source", choices=["local", "hub"], default="local",
                   help="hub = the harness's Hugging Face datasets by name (needs the hub; default: local files)")
    g.add_argument("--split", default="default", help="xnli: validation (2490, the harness's) or test (5010); "
                   "xcopa: test (harness) or validation; mmlu: val or dev (default: the harness's split)")
    g.add_argument("--limit", type=int, default=None,
                   help="first N items of each task x language (as lm-eval's --limit)")
    g.add_argument("--pairs", default=None, help="dev pairs JSONL from 01_build_pairs.py (task nll; --analysis layers)")
    g.add_argument("--mt-data", choices=["ntrex", "tatoeba"], default="ntrex",
                   help="translation sentences: NTREX-128 (news, 1997 lines) or Tatoeba (short sentences)")
    g = p.add_argument_group("prompting and decoding")
    g.add_argument("--num-fewshot", type=int, default=0, help="shots for mmlu (first Okapi dev items) and the math "
                   "tasks (official MGSM exemplars, up to 8); other tasks are zero-shot")
    g.add_argument("--math-shots", choices=["harness", "first-k"], default="harness", help="math few-shot "
                   "exemplars: harness = the harness's seeded sampler (seed 1234, drawn per item) and answer "
                   "formatting; first-k = the first k exemplars for every item, MGSM paper formatting "
                   "(see mgsm_exemplars)")
    g.add_argument("--prompt-style", choices=["harness", "alpaca"], default="harness", help="generation tasks: "
                   "harness prompt as is, or wrapped in common.build_prompt (how our checkpoints are trained)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default: per task, 256 as "
                   "the harness)")
    g = p.add_argument_group("compute")
    g.add_argument("--batch-size", type=batch_size_arg, default=16, help="sequences per forward pass, or auto: on "
                   "CUDA the largest batch that fits (probed per task kind and length; a batch that runs out of "
                   f"memory is halved and retried), on a CPU {AUTO_BATCH_CPU} (default: 16)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations; auto = bfloat16 where the device computes it natively (CUDA with "
                   "bf16 units, a CPU with AMX or AVX512-BF16), else float32 (default: auto; see resolve_dtype)")
    g.add_argument("--no-share-prefix", action="store_true", help="log-likelihood: one full row per choice "
                   "(lm-eval's layout) instead of computing each item's shared prefix once")
    g.add_argument("--seed", type=int, default=1234, help="bootstrap resampling seed")
    g = p.add_argument_group("comparison and analysis")
    g.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="paired bootstrap B - A per task x lang")
    g.add_argument("--bootstrap", type=int, default=10000, help="resamples for --compare")
    g.add_argument("--allow-mismatch", action="store_true", help="--compare cells whose data file, split, item "
                   "set or metric differ (refused by default) on their shared item ids; the output lists them")
    g.add_argument("--analysis", choices=["layers"], default=None, help="layers: per-layer lens entropy, English vs "
                   "target token mass and en/tgt cosine (JSON + PNG)")
    g.add_argument("--analysis-samples", type=int, default=64, help="parallel sentences for --analysis layers")
    g.add_argument("--tuned-lens", default=None, help="--analysis layers: also read every lens measure through this "
                   "tuned lens (folder of 02_train_dft.py --fit-tuned-lens or the tuned-lens package), beside the "
                   "logit lens; a lens of other shapes or another unembedding is refused")
    args = p.parse_args(argv)
    args.batch = BatchSize(args.batch_size)
    return args


def batch_size_arg(value):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of sequences or auto, got {value!r}") from None


def check_args(args):
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be a positive number of items, got {args.limit}")
    for name in ("batch_size", "bootstrap", "analysis_samples"):
        if getattr(args, name) != "auto" and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be positive")
    if args.num_fewshot < 0:
        raise UserError("--num-fewshot must be >= 0")
    if not args.compare and not args.out:
        raise UserError("pass --out DIR (where the run JSONs, per-item JSONL and results.md go)")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder (the run JSONs, per-item JSONL and results.md "
                        "go there)")
    if not args.compare and not args.model:
        args.model = [common.DEFAULT_MODEL]
    if args.run_name and len(args.run_name) != len(args.model):
        raise UserError(f"--run-name needs one name per --model ({len(args.model)}), got {len(args.run_name)}")
    names = args.run_name or [run_name_for(m) for m in args.model]
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", n) for n in names]
    if len(set(names)) != len(names):
        raise UserError(f"two models share the run name {names}; pass --run-name")
    args.run_names = names
    if args.pairs:
        common.resolve_path(args.pairs)
    if args.steer_alpha is not None and not math.isfinite(args.steer_alpha):
        raise UserError(f"--steer-alpha must be a finite number (0: the model itself), got {args.steer_alpha}")
    if (args.steer_alpha is not None or args.steer_base) and not any(is_intervention(m) for m in args.model):
        raise UserError("--steer-alpha / --steer-base apply to an intervention folder (02_train_dft.py --fit --out "
                        "DIR); none of --model is one")
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data-dir {args.data_dir} is not a folder")
    if args.tuned_lens and args.analysis != "layers":
        raise UserError("--tuned-lens is a readout of --analysis layers; pass --analysis layers")
    if args.tuned_lens and not os.path.isdir(args.tuned_lens):
        raise UserError(f"--tuned-lens {args.tuned_lens} is not a folder (02_train_dft.py --fit-tuned-lens writes one)")


def task_names(tasks):
    """--tasks as task names ('all' = every task but nll); an unknown name is an error."""
    names = common.parse_list(tasks)
    if names == ["all"]:
        names = [t for t, spec in TASKS.items() if spec.in_all]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; known tasks: {', '.join(TASKS)}")
    return names


def plan(args):
    """[(task, lang, direction or None)] after checking names and data availability; prints skipped combos."""
    tasks = task_names(args.tasks)
    langs = [common.check_lang(l) for l in common.parse_list(args.langs)]
    if not langs:
        raise UserError("--langs is empty")
    if args.split != "default":
        if not any(args.split in TASKS[t].splits for t in tasks):
            raise UserError(f"--split {args.split}: none of {', '.join(tasks)} has it "
                            f"({'; '.join(t + ': ' + ', '.join(TASKS[t].splits) for t in tasks)})")
        others = [t for t in tasks if args.split not in TASKS[t].splits]
        if others:
            print(f"[plan] --split {args.split} does not exist for {', '.join(others)}: their default split is used")
    if args.num_fewshot:
        few = [t for t in tasks if TASKS[t].fewshot]
        if not few:
            raise UserError(f"--num-fewshot is supported for {', '.join(t for t in TASKS if TASKS[t].fewshot)}; "
                            f"{', '.join(tasks)} are zero-shot (as in the paper)")
        if len(few) < len(tasks):
            print(f"[plan] --num-fewshot {args.num_fewshot} applies to {', '.join(few)}; the others stay zero-shot")
    combos, skipped = [], []
    for task in tasks:
        spec = TASKS[task]
        have = spec.languages(args)
        if not any(l in have for l in langs):
            raise UserError(f"task {task} has no data for {', '.join(langs)}; its languages: {', '.join(have)}"
                            + spec.no_data_hint(args))
        for l in langs:
            if l in have:
                combos.extend((task, l, direction) for direction in spec.directions)
            else:
                skipped.append(f"{task} {l}")
    if skipped:
        print(f"[plan] no data, skipped: {', '.join(skipped)}", flush=True)
    return combos, skipped


def load_all(combos, args):
    return {(task, lang, direction): load_task(task, lang, args, direction) for task, lang, direction in combos}


def data_label(src, data_dir):
    """The data file as recorded: relative to --data-dir when inside it (portable), else absolute."""
    if src.startswith("hub:"):
        return src
    src = os.path.abspath(common.resolve_path(src))  # the file actually read (x.tsv may be shipped as x.tsv.gz)
    src = src.removesuffix(".xz")  # x.xz is the repository's storage of x, whose hash common.sha256_file records
    rel = os.path.relpath(src, os.path.abspath(data_dir))
    return src if rel.startswith("..") else rel


def device_of(args, ranks=SINGLE):
    """The device of this rank: --device, or cuda when available; with several ranks, rank r's cuda:LOCAL_RANK."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if ranks.world > 1 and device.startswith("cuda"):
        if device != "cuda":
            raise UserError(f"--device {device} with {ranks.world} processes: each rank takes cuda:LOCAL_RANK; "
                            "pass --device cuda (or auto), or launch one process")
        device = f"cuda:{ranks.local}"
    return device


def resolve_dtype(dtype, device):
    """The dtype to load the model in: `auto` = bfloat16 where `device` computes bf16 natively, else float32.

    Why auto is the default (SmolLM2-135M on an AMX CPU, one thread, results/bench_evaluate): bf16 weights
    changed 2 of 500 XNLI-zh predictions (0.4%) and the held-out NLL by -0.0009 nats/token, and ran
    log-likelihood tasks 1.5-3.0x faster per CPU second (greedy generation: 0.92x, no gain). float16 on a
    CPU runs (emulated, slow, and with a smaller exponent range than bf16): one warning line, not an error.
    """
    if dtype == "auto":
        return "bfloat16" if common.native_bf16(device) else "float32"
    if dtype == "float16" and torch.device(device).type == "cpu":
        print("[warning] --dtype float16 on a CPU is emulated (slow) and overflows more easily than bfloat16; "
              "use --dtype auto (bfloat16 where native) or float32", flush=True)
    elif dtype == "bfloat16" and not common.native_bf16(device):
        print(f"[warning] --dtype bfloat16: {device} does not compute bf16 natively, so it is emulated and usually "
              "slower than float32", flush=True)
    return dtype


def run_eval(args, ranks=SINGLE):
    def prepare():  # every data file is read (and its errors raised) before any model loads
        combos, skipped = plan(args)
        return skipped, load_all(combos, args), [resolve_eval_model(m, args) for m in args.model]

    skipped, data, sources = ranks.checked(prepare)  # a folder without weights fails here
    hashes = {}
    device = device_of(args, ranks)
    dtype = resolve_dtype(args.dtype, device)
    if ranks.world > 1:
        print(f"[ranks] {ranks.world} processes, each on its own device ({device} on rank 0), share every "
              "task x language by whole batches; rank 0 writes", flush=True)
    for model_path, run, (_, _, source, intervention) in zip(args.model, args.run_names, sources):
        common.seed_everything(args.seed)
        model, tokenizer = ranks.checked(
            lambda: load_eval_model(model_path, intervention, dtype, device, padding_side="left"))
        model.eval()
        args.batch.new_model()
        json_path = os.path.join(args.out, f"{run}.json")

        def open_record():
            record = common.read_json(json_path) if os.path.exists(json_path) else None
            if record is not None and (not is_run_json(record) or not same_model(record.get("model"), model_path)):
                raise UserError(f"{json_path} holds results of another model ({record.get('model')}); "
                                "pass --run-name or another --out")
            steered = intervention.record() if intervention else None
            if record is not None and record.get("intervention") != steered and record["results"]:
                raise UserError(f"{json_path} holds results of {model_path} with another intervention setting "
                                f"({record.get('intervention')}); pass --run-name or another --out")
            record = record or dict(format="dft-eval-run/1", run=run, model=model_path, results={})
            if steered:
                record["intervention"] = steered
            record.update(model_source=source, versions=common.versions(),
                          updated=time.strftime("%Y-%m-%d %H:%M:%S"))
            record.setdefault("skipped", [])
            record["skipped"] = sorted(set(record["skipped"]) | set(skipped))
            os.makedirs(args.out, exist_ok=True)
            return record

        record = ranks.on_main(open_record)
        t_model = time.time()
        for (task, lang, direction), (items, src, split) in data.items():
            spec = TASKS[task]
            key = spec.result_key(args)
            cell = direction.replace("xx", lang) if direction else lang

            def write_cell(entry, rows):
                if src not in hashes:
                    hashes[src] = common.sha256_file(src) if not src.startswith("hub:") else None
                items_file = f"{run}.{key}.{cell}.jsonl"
                common.write_jsonl(os.path.join(args.out, items_file), rows)
                own = spec.settings(args)  # the settings of this task's kind (None where they do not apply)
                entry.update(
                    task=key, lang=cell, items_file=items_file, data_file=data_label(src, args.data_dir),
                    data_sha256=hashes[src], split=split,
                    harness_task=spec.harness.format(l=lang) if spec.harness else None,
                    settings=dict(limit=args.limit, num_fewshot=shots_for(task, args),
                                  batch_size=args.batch.used["batch_size"], batch_size_requested=args.batch_size,
                                  batch_halved_to=args.batch.used["batch_halved_to"], math_shots=own["math_shots"],
                                  dtype=dtype, dtype_requested=args.dtype,
                                  device=device, seed=args.seed, data_source=args.data_source,
                                  share_prefix=not args.no_share_prefix, mt_data=own["mt_data"],
                                  prompt_style=own["prompt_style"], prefix_token_id=prefix_token_id(tokenizer),
                                  data_dir=args.data_dir),
                    evaluated=time.strftime("%Y-%m-%d %H:%M:%S"))
                record["results"].setdefault(key, {})[cell] = entry
                common.write_json(json_path, record)  # after every cell: an interrupted run keeps what it has
                print(f"[{run}] {key} {cell}: {entry['metric']} {fmt_score(entry)} (n={entry['n']}, "
                      f"{entry['seconds']:.1f}s, {entry['items_per_second']:.2f} items/s)", flush=True)

            def score_cell():  # the model's work on every rank; the summary and the files on rank 0
                entry, rows = evaluate(model, tokenizer, task, lang, items, args, direction, ranks)
                if ranks.main:
                    write_cell(entry, rows)

            ranks.checked(score_cell)
        print(f"[{run}] done in {time.time() - t_model:.0f}s -> {json_path}", flush=True)
        del model
    table = ranks.on_main(lambda: write_results_md(args.out))
    print("\n" + (table or ""))


def run_analysis(args):
    langs = [common.check_lang(l) for l in common.parse_list(args.langs)]
    texts = {lang: analysis_texts(lang, args, args.analysis_samples) for lang in langs}
    sources = [resolve_eval_model(m, args) for m in args.model]
    curves = {lang: {} for lang in langs}
    dtype = resolve_dtype(args.dtype, device_of(args))
    for model_path, run, (_, _, source, intervention) in zip(args.model, args.run_names, sources):
        model, tokenizer = load_eval_model(model_path, intervention, dtype, device_of(args), padding_side="right")
        model.eval()
        lens = common.load_tuned_lens(args.tuned_lens, model) if args.tuned_lens else None
        if lens and not lens.weights_match:
            print(f"[{run}] note: --tuned-lens {lens.other_weights_note()} (recorded as tuned_lens.weights_match "
                  "false)", flush=True)
        for lang in langs:
            pairs, src = texts[lang]
            t0 = time.time()
            batch_size = 8 if args.batch_size == "auto" else min(args.batch_size, 8)
            res = layer_analysis(model, tokenizer, lang, pairs, batch_size=batch_size, lens=lens)
            res.update(run=run, model=model_path, model_source=source, lang=lang,
                       data_file=data_label(src, args.data_dir), data_sha256=common.sha256_file(src),
                       versions=common.versions(), seconds=round(time.time() - t0, 1),
                       dtype=dtype, dtype_requested=args.dtype, device=device_of(args))
            if intervention:
                res["intervention"] = intervention.record()
            common.write_json(os.path.join(args.out, f"{run}.layers.{lang}.json"), res)
            curves[lang][run] = res
            print(f"[{run}] layers {lang} ({dtype}): {len(pairs)} sentences in {res['seconds']}s; entropy by block "
                  + " ".join(f"{v:.2f}" for v in res["entropy"]), flush=True)
        del model
    for lang in langs:
        path = os.path.join(args.out, f"layers.{lang}.png")
        plot_layers(curves[lang], lang, path)
        print(f"[analysis] {path}")


def main(argv=None):
    args = parse_args(argv)
    ranks = Ranks.from_env()
    if not ranks.main:  # one copy of every line and progress bar: rank 0's (errors too, see RankFailed)
        sys.stdout = open(os.devnull, "w")
        import transformers
        transformers.utils.logging.disable_progress_bar()
    try:
        # join first, so that even a bad argument is said once by rank 0 before any rank exits
        cuda = torch.cuda.is_available() and (args.device == "auto" or args.device.startswith("cuda"))
        ranks.start("cuda" if cuda else "cpu")
        ranks.checked(lambda: (check_args(args), device_of(args, ranks)))
        if args.compare or args.analysis:
            if ranks.world > 1:
                print(f"[ranks] {'--compare' if args.compare else '--analysis layers'} runs on rank 0 alone; the "
                      f"other {ranks.world - 1} wait", flush=True)
            ranks.on_main(lambda: run_compare_or_analysis(args))
        else:
            run_eval(args, ranks)
    except RankFailed as e:
        if ranks.main:
            print(e.message, file=sys.stderr, flush=True)
        ranks.barrier()  # no rank exits (and gets the others killed by the launcher) before rank 0 has said it
        sys.exit(e.code)
    finally:
        ranks.stop()


def run_compare_or_analysis(args):
    if args.compare:
        out = args.out or os.path.dirname(os.path.abspath(args.compare[1]))
        compare_runs(args.compare[0], args.compare[1], out, args.bootstrap, args.seed, args.allow_mismatch)
    else:
        run_analysis(args)


if __name__ == "__main__":
    common.run_main(main)
