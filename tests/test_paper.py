"""run_paper.sh and its helpers: the paper study's tables (scripts/paper_plan.py's study file read by
scripts/study_tables.py) against hand-computed cells and differences, the plan's checks of bad input (one error,
nothing written), the FSDP2 config it derives, the offline dry run, and (after `TINY=1 bash run_paper.sh`, as
.ci/run does) that every stage of the TINY run left its outputs and the tables have every cell:
`PAPER_TINY_OUT=runs/paper_tiny python -m pytest tests/test_paper.py -k tiny_outputs`."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, make_tiny_model

sys.path.insert(0, os.path.join(REPO, "scripts"))
import paper_plan  # noqa: E402
import study_tables  # noqa: E402
from common import UserError  # noqa: E402
from run_study import load_study  # noqa: E402

NUMBERS = json.load(open(os.path.join(REPO, "scripts", "paper_numbers.json")))["models"]["meta-llama/Llama-2-7b-hf"]


# ----------------------------------------------------------------------------- the tables


def write_run(folder, run, cells):
    """A run JSON as 03_evaluate.py writes it: cells {(key, lang): (aggregation, metric, items)}."""
    results = {}
    for (key, lang), (agg, metric, items) in cells.items():
        items_file = f"{run}.{key}.{lang}.jsonl"
        with open(os.path.join(folder, items_file), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in items))
        if agg == "mean":
            v = [r["scores"][metric] for r in items]
            score, se = sum(v) / len(v), 0.01
        else:
            from sacrebleu.metrics import CHRF
            score = CHRF().corpus_score([r["prediction"] for r in items], [[r["gold"] for r in items]]).score
            se = 0.5
        entry = dict(metric="f1" if metric == "f1_lang" else metric, score=score, stderr=se, aggregation=agg,
                     n=len(items), metrics={metric: dict(score=score, stderr=se)}, items_file=items_file, task=key,
                     lang=lang, tgt_lang="zh")
        results.setdefault(key, {})[lang] = entry
    with open(os.path.join(folder, f"{run}.json"), "w") as f:
        json.dump(dict(format="dft-eval-run/1", run=run, model=run, results=results), f)


def synthetic_out(tmp_path, shift=0.1):
    """OUT of a zh-only run (base, sft, tft, dft-logits) and its study file: every cell has 10 items; dft-logits
    scores every item of every mean cell `shift` above tft, and its translations are tft's with one word more right."""
    out = tmp_path / "out"
    (out / "eval").mkdir(parents=True)
    runs = [dict(run="sft", method="sft", lang="zh")] + [dict(run=f"{m}-zh", method=m, lang="zh")
                                                       for m in ("tft", "dft-logits")]
    plan = dict(model="meta-llama/Llama-2-7b-hf", paper_model="meta-llama/Llama-2-7b-hf", tiny=False, out=str(out),
                langs=["zh"], methods=["sft", "tft", "dft-logits"], limit=10, steps=None, pairs_limit=None,
                preset="llama2-7b", lc_layer=None, et_layer=None, nproc=1, gpus=0, fsdp=False, save_every=200,
                keep_checkpoints=False, bootstrap=300, mt_model="m", runs=runs,
                data=[dict(lang="zh", route="shipped", file=str(out / "pairs_zh.jsonl"))])
    (out / "paper.toml").write_text(paper_plan.study_file(plan))
    base = [0.0, 0.2, 0.4, 0.5, 0.1, 0.3, 0.2, 0.0, 0.4, 0.3]
    golds = ["the cat sat on the mat", "a dog runs", "rain falls today", "he reads books", "we eat rice"] * 2
    preds_tft = ["the cat", "a cat runs", "rain", "he books", "we rice"] * 2
    preds_dft = ["the cat sat", "a dog runs", "rain falls", "he reads books", "we eat"] * 2
    for run, bump, preds in (("base", 0, preds_tft), ("sft", 0, preds_tft), ("tft-zh", 0, preds_tft),
                             ("dft-logits-zh", shift, preds_dft)):
        cells = {}
        for task, _, metric, langs in paper_plan.QA + paper_plan.NLU:
            if "zh" in langs:
                cells[(task, "zh")] = ("mean", metric, [dict(id=i, scores={metric: v + bump})
                                                        for i, v in enumerate(base)])
        cells[("mgsm", "zh")] = ("mean", "flexible_extract",
                                 [dict(id=i, scores={"flexible_extract": v + bump}) for i, v in enumerate(base)])
        for direction in ("en-zh", "zh-en"):
            cells[("translation", direction)] = ("corpus", "chrf", [dict(id=i, prediction=p, gold=g)
                                                                    for i, (p, g) in enumerate(zip(preds, golds))])
        write_run(out / "eval", run, cells)
    return out


def test_tables_cells_paper_numbers_and_differences(tmp_path):
    out = synthetic_out(tmp_path)
    study = load_study(str(out / "paper.toml"), check_flags=False)
    result = study_tables.build(study, str(out))
    text = study_tables.markdown(study, result, str(out))
    # every measure of every row: 4 QA + 4 NLU + the NLU average + 2 translation + MGSM, times 4 rows
    assert len(study["measures"]) == 12 and all(v is not None for row in result["runs"].values() for v in row.values())
    mean = sum([0.0, 0.2, 0.4, 0.5, 0.1, 0.3, 0.2, 0.0, 0.4, 0.3]) / 10 * 100
    assert result["runs"]["tft-zh"]["xquad_zh"] == (pytest.approx(mean), pytest.approx(1.0))
    refs = study["references"]["values"]
    assert refs["tft-zh"]["xquad_zh"] == NUMBERS["qa"]["tft"]["xquad"]["zh"] == 23.41 and f"{mean:.2f} ± 1.00 (23.41)" in text
    assert "xquad_zh" not in refs["sft"]  # a `?` cell stays empty, never guessed
    assert refs["sft"]["truthfulqa_zh"] == "~33.16" and "(~33.16)" in text  # a reading of a garbled cell
    assert "base" not in refs  # the paper has no base row
    assert refs["tft-zh"]["chrf_en-zh"] == 68.37 and "chrf_en-zh" not in refs.get("dft-logits-zh", {})  # Table 4
    assert result["runs"]["dft-logits-zh"]["nlu_zh"][0] == pytest.approx(mean + 10)
    diffs = result["contrasts"]["dft-logits-zh"]
    assert set(result["contrasts"]) == {"dft-logits-zh"}
    # every item +0.1: the difference is +10 points and every resample agrees, so the interval is the point
    for m in ("xquad_zh", "xnli_zh", "mgsm_zh", "nlu_zh"):
        assert diffs[m]["delta"] == pytest.approx(10) and diffs[m]["lo"] == pytest.approx(10) == diffs[m]["hi"]
    assert diffs["xnli_zh"]["reference"] == pytest.approx(36.94 - 36.87)  # the paper's own difference beside ours
    # chrF: against sacrebleu's corpus score of the two runs' outputs; the interval brackets it
    from sacrebleu.metrics import CHRF
    golds = [r["gold"] for r in map(json.loads, open(out / "eval" / "tft-zh.translation.en-zh.jsonl"))]
    preds = {run: [r["prediction"] for r in map(json.loads, open(out / "eval" / f"{run}-zh.translation.en-zh.jsonl"))]
             for run in ("tft", "dft-logits")}
    ref = CHRF().corpus_score(preds["dft-logits"], [golds]).score - CHRF().corpus_score(preds["tft"], [golds]).score
    d = diffs["chrf_en-zh"]
    assert ref > 0 and d["delta"] == pytest.approx(ref) and d["lo"] <= ref <= d["hi"] and d["p"] < 0.05
    assert "In brackets: the paper, meta-llama/Llama-2-7b-hf: Tables 1, 2, 4" in text


def test_tables_of_a_run_not_evaluated_yet_say_so(tmp_path):
    out = synthetic_out(tmp_path)
    os.remove(out / "eval" / "dft-logits-zh.json")
    study = load_study(str(out / "paper.toml"), check_flags=False)
    result = study_tables.build(study, str(out))
    assert all(v is None for v in result["runs"]["dft-logits-zh"].values())
    assert all(r is None for r in result["contrasts"]["dft-logits-zh"].values())
    assert "not yet run" in study_tables.markdown(study, result, str(out))


# ----------------------------------------------------------------------------- the plan: bad input, FSDP config


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory, tokenizer):
    path = str(tmp_path_factory.mktemp("paper-gemma2"))
    make_tiny_model("gemma2", tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("argv, message", [
    (["--langs", "zh,xx"], "unknown language 'xx' in LANGS"),
    (["--methods", "tft,dft-magic"], "unknown method 'dft-magic' in METHODS"),
    (["--nproc", "4", "--visible-gpus", "1"], "NPROC=4 but 1 GPU"),
    (["--nproc", "2", "--visible-gpus", "0"], "NPROC=2 but 0 GPU"),
    (["--model", "someone/unknown-7b"], "model 'someone/unknown-7b' cannot be read"),
    (["MODEL", "--lc-layer", "abc"], "LC_LAYER=abc: give a block number from 1 to 4"),
    (["MODEL", "--et-layer", "9"], "ET_LAYER=9: give a block number from 1 to 4"),
    (["MODEL", "--lc-layer", "3", "--et-layer", "2"], "LC_LAYER=3 is not below ET_LAYER=2"),
    (["--nproc", "0"], "NPROC=0: a training needs at least one process"),
    (["--steps", "0"], "STEPS=0: give a positive number"),
    (["--pairs-limit", "24"], "PAIRS_LIMIT=24 leaves no training pairs"),
    (["--langs", "zh", "--pairs-file", "ar=x.jsonl"], "PAIRS_ar is given but ar is not in LANGS"),
    (["--langs", "ar", "--pairs-file", f"ar={os.path.join(REPO, 'tests', 'fixtures', 'pairs_zh.jsonl')}"],
     "holds rows whose lang is zh, not ar"),
    (["MODEL", "--langs", "ar", "--mt-model", "/nonexistent/nllb"], "Arabic has no shipped pairs and MT_MODEL"),
])
def test_plan_bad_input_is_one_error_and_writes_nothing(tmp_path, tiny_gemma, argv, message):
    out = tmp_path / "out"
    if argv[0] == "MODEL":  # a model without a preset: typed blocks (the case's own come last and win)
        argv = ["--model", tiny_gemma, "--lc-layer", "1", "--et-layer", "3"] + argv[1:]
    if "--visible-gpus" not in argv:
        argv = argv + ["--visible-gpus", "0"]
    with pytest.raises(UserError, match=message):
        paper_plan.main(argv + ["--out", str(out)])
    assert not out.exists()


def test_a_dry_run_previews_another_machine_and_a_typed_block_joins_the_preset(tmp_path):
    """NPROC above the visible GPUs is a blocker of a dry run (the plan of the 8-GPU machine, made on a laptop); one
    typed block with a preset model goes to its runs alone (the preset gives the other)."""
    argv = ["--langs", "zh", "--methods", "tft,dft-logits", "--lc-layer", "5", "--visible-gpus", "0", "--dry-run",
            "--nproc", "8", "--keep-checkpoints", "--out", str(tmp_path / "out")]
    p = paper_plan.plan(paper_plan.parse_args(argv))
    assert p["nproc"] == 8 and any(b.startswith("NPROC=8 but 0 GPU(s) visible") for b in p["blockers"])
    assert "preset llama2-7b; layers i=5)" in paper_plan.describe(p)
    assert p["disk_gb"] == pytest.approx(2 * p["model_gb"] + 2 * 4 * p["model_gb"])  # both checkpoints kept
    text = paper_plan.study_file(p)
    assert '"--method", "dft-logits", "--lc-layer", "5"]' in text and "--et-layer" not in text
    assert not (tmp_path / "out").exists()


def test_an_out_with_parts_made_with_other_settings_is_refused_before_it_is_rewritten(tmp_path):
    out = tmp_path / "out"
    (out / "done").mkdir(parents=True)
    argv = ["--tiny", "--langs", "zh", "--methods", "tft", "--visible-gpus", "0", "--out", str(out)]
    (out / "done" / "train_tft-zh").write_text("")  # a marker from before markers kept their command: no verdict
    paper_plan.main(argv)
    study = (out / "paper.toml").read_text()
    (out / "done" / "train_tft-zh").write_text("--pairs elsewhere --method tft")
    changed = r"other settings \(train_tft-zh \(--pairs elsewhere -> --pairs \{work\}/pairs_zh.jsonl --out .* \.\.\.\)\)"
    with pytest.raises(UserError, match=changed + ": use a new OUT"):
        paper_plan.main(argv)
    assert (out / "paper.toml").read_text() == study
    p = paper_plan.plan(paper_plan.parse_args(argv + ["--dry-run"]))  # a dry run lists it among the blockers
    assert paper_plan.changed_in_out(paper_plan.study_file(p), str(out)).startswith(f"OUT={out} holds parts")


def test_plan_writes_fsdp_config_with_the_models_decoder_layer(tmp_path, tiny_gemma):
    import yaml
    out = tmp_path / "out"
    paper_plan.main(["--model", tiny_gemma, "--lc-layer", "1", "--et-layer", "3", "--langs", "zh", "--nproc", "2",
                     "--visible-gpus", "2", "--out", str(out)])
    derived = yaml.safe_load(open(out / "fsdp.yaml"))
    template = yaml.safe_load(open(os.path.join(REPO, "configs", "fsdp_8gpu.yaml")))
    assert derived["fsdp_config"].pop("fsdp_transformer_layer_cls_to_wrap") == "Gemma2DecoderLayer"
    assert template["fsdp_config"].pop("fsdp_transformer_layer_cls_to_wrap") == paper_plan.decoder_layer_class("llama")
    assert derived.pop("num_processes") == 2 and template.pop("num_processes") == 8
    assert derived == template  # everything else as the tested 8-GPU config
    plan = json.load(open(out / "plan.json"))
    assert [r["run"] for r in plan["runs"]] == ["sft", "tft-zh", "dft-logits-zh", "dft-feature-zh"]
    assert plan["evals"] == ["base", "sft", "tft-zh", "dft-logits-zh", "dft-feature-zh"]
    study = load_study(str(out / "paper.toml"), check_flags=False)  # what run_paper.sh hands to run_study.py
    assert study["pairs"]["zh"]["flags"][:4] == ["--source", "alpaca", "--lang", "zh"]  # the shipped route
    assert study["compute"]["launch_flags"] == ["--config_file", f"{out}/fsdp.yaml"] and study["compute"]["processes"] == 2


def test_plan_throughput_from_a_gpu_timing(tmp_path):
    """A bench_train.py JSON ("precision/method" cells) sets the tokens/s and the step costs; the user's figure wins."""
    cell = lambda m, s, ratio: dict(method=m, precision="bf16", seconds=s, ratio_measured=ratio,  # noqa: E731
                                    tokens={"tft": {"padded": 2048, "labelled": 700}})
    timing = tmp_path / "bench_train.json"
    timing.write_text(json.dumps(dict(results={"bf16/tft": cell("tft", 0.5, 1.0), "bf16/dft-logits": cell(
        "dft-logits", 0.8, 1.6), "bf16/dft-feature": cell("dft-feature", 0.6, 1.2)})))
    base = ["--tiny", "--langs", "zh", "--lc-layer", "1", "--et-layer", "3", "--visible-gpus", "0", "--steps", "10"]
    p = paper_plan.plan(paper_plan.parse_args(base + ["--timing", str(timing)]))
    assert p["tokens_per_s"] == 2048 / 0.5 and p["cost_factors"]["dft-logits"] == 1.6 and p["grad_ckpt_factor"] == 1
    run = next(r for r in p["runs"] if r["run"] == "dft-logits-zh")
    assert run["gpu_hours"] == pytest.approx(run["tokens"] * 1.6 / 4096 / 3600)
    p = paper_plan.plan(paper_plan.parse_args(base + ["--timing", str(timing), "--tokens-per-s", "1000"]))
    assert p["tokens_per_s"] == 1000 and p["tokens_per_s_source"] == "TOKENS_PER_S given by the user"
    assert "== throughput 1,000 TFT tokens/s per GPU" in paper_plan.describe(p)
    # without a timing TINY's tiny model is not planned from the 1.1B GPU figure (millions of tokens/s)
    text = paper_plan.describe(paper_plan.plan(paper_plan.parse_args(base)))
    assert "== throughput: not planned" in text and "== total GPU-hours not estimated (TINY); disk" in text


def run_paper(tmp_path, **env):
    full = dict(os.environ, PY=sys.executable, OUT=str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(["bash", os.path.join(REPO, "run_paper.sh")], capture_output=True, text=True, env=full,
                          timeout=300)


def test_run_paper_bad_input_stops_before_anything_is_written(tmp_path):
    proc = run_paper(tmp_path, LANGS="zh fr")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown language 'fr' in LANGS")
    proc = run_paper(tmp_path, NPROC="2")
    assert proc.returncode == 2 and "error: NPROC=2 but 0 GPU(s) visible" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_values_and_run_replication_takes_dry_run_too(tmp_path):
    """DRY_RUN=1 is run_paper.sh's dry run; run_replication.sh took only --dry-run and ran the real study on it."""
    proc = run_paper(tmp_path, DRY_RUN="maybe")
    assert proc.returncode == 2 and "DRY_RUN=maybe" in proc.stderr and not (tmp_path / "out").exists()
    proc = run_paper(tmp_path, DRY_RUN="yes", TINY="1", STEPS="9")
    assert proc.returncode == 0 and "TINY=1 uses its own sizes, not the typed STEPS" in proc.stdout
    assert not (tmp_path / "out").exists()
    env = dict(os.environ, PY=sys.executable, DRY_RUN="1", PRESET="smollm2")
    proc = subprocess.run(["bash", os.path.join(REPO, "run_replication.sh"), "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "== to train: nothing (no optimizer steps left)" in proc.stdout, proc.stderr
    assert not (tmp_path / "w").exists() and "tables:" not in proc.stdout


def test_dry_run_with_the_defaults_prints_the_plan_offline(tmp_path):
    proc = run_paper(tmp_path, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "meta-llama/Llama-2-7b-hf (6.74B parameters, 32 blocks; preset llama2-7b)" in text
    assert "== 10 trainings (3 epochs); sft on the English side of the ar pairs" in text
    assert "== 11 evaluations" in text and "GPU-hours" in text and "disk about" in text
    assert "one process, no sharding (it holds 108 GB of weights, gradients and AdamW moments" in text
    for run in ("sft", "tft-zh", "dft-logits-vi", "dft-feature-ar"):
        assert f"   {run} " in text
    if not paper_plan.hub_reachable():
        assert "the offline HuggingFaceTB/SmolLM2-135M-Instruct tokenizer" in text
        assert "what would block a real run" in text and "Arabic has no shipped pairs" in text
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- after TINY=1 bash run_paper.sh


def test_tiny_outputs():
    out = os.environ.get("PAPER_TINY_OUT")
    if not out:
        pytest.skip("runs after `TINY=1 bash run_paper.sh`: set PAPER_TINY_OUT to its OUT (.ci/run does)")
    plan = json.load(open(os.path.join(out, "plan.json")))
    assert plan["tiny"] and set(plan["methods"]) >= {"sft", "tft", "dft-logits", "dft-feature"}
    assert {d["route"] for d in plan["data"]} == {"shipped", "mt"}  # zh shipped, ar through the MT route
    for name in ("lm/config.json", "mt/config.json"):
        assert os.path.exists(os.path.join(out, "tiny_models", name))
    for d in plan["data"]:
        for suffix in (".jsonl", ".dev.jsonl", ".stats.json"):
            assert os.path.getsize(d["file"][: -len(".jsonl")] + suffix) > 0
    for r in plan["runs"]:
        folder = os.path.join(out, "train", r["run"])
        for name in ("config.json", "train_config.json", "train_log.jsonl"):
            assert os.path.exists(os.path.join(folder, name)), f"{folder}/{name}"
        assert json.load(open(os.path.join(folder, "train_config.json")))["method"] == r["method"]
    for run in plan["evals"]:
        assert os.path.exists(os.path.join(out, "eval", f"{run}.json")), run
    study = load_study(os.path.join(out, "paper.toml"), check_flags=False)
    result = json.load(open(os.path.join(out, "tables.json")))
    langs_of = lambda run: plan["langs"] if run in ("base", "sft") else [run.rsplit("-", 1)[1]]  # noqa: E731
    for run in plan["evals"]:  # every run has every measure of its language(s): the paper's cells, translation, MGSM
        cells = [m for m, v in study["measures"].items() if v["cells"][0].split()[1].split("-")[-1] in langs_of(run)
                 or v["cells"][0].split()[1].split("-")[0] in langs_of(run)]
        assert cells and all(result["runs"][run][m] is not None for m in cells), run
    for method in (m for m in plan["methods"] if m.startswith("dft")):  # every cell against tft + the NLU average
        for lang in plan["langs"]:
            diffs = result["contrasts"][f"{method}-{lang}"]
            assert f"nlu_{lang}" in diffs and all(d is not None for d in diffs.values())
    text = open(os.path.join(out, "tables.md")).read()
    for title in ("## Scores", "In brackets: the paper", "## Contrast dft-logits-zh"):
        assert title in text
