#!/usr/bin/env bash
# The one GPU check of issue 39 (docs/SCALING.md, "GPU check"): what has never run on a GPU, in priority order,
# each step under its own time limit and tarred into $OUT as soon as it finishes (at most 8 files come back):
#   1. TINY=1 bash run_paper.sh on the GPU (TINY_DEVICE=cuda: every stage), then its test (test_paper -k tiny_outputs)
#   2. 03_evaluate.py on a random model of TinyLlama-1.1B's shape (vocab_size = len(tokenizer)): xnli zh (500 items)
#      and mgsm zh (64 items, 256 new tokens) at --batch-size auto and 16, --dtype auto: items/s, tokens/s, the batch
#      used, peak GPU memory; then mgsm in float32 at batch 16 beside Hugging Face's generate at the same batches
#      (random weights make bf16 ties, so texts are compared in float32)
#   3. bench_train.py on the same model, bf16, batch 8 x 512, i=2 j=11: tft, dft-logits (--lens-prefix recompute),
#      dft-logits-shared (--lens-prefix shared), dft-feature against the cost model; then the same with
#      --grad-checkpointing
#   4. where 02_train_dft.py has them: the tuned-lens readout (--fit-tuned-lens, one dft-logits-tuned step) and the
#      inference-time peers (--fit incline|diffmean, one xnli evaluation each); skipped when absent
# $OUT then holds gpu_check.log, summary.md, env.txt and step<N>_*.tar.gz.
#
# On a lent GPU machine (no network; torch 2.11 and transformers 5.17 seen there, while 03 is tested with the
# pinned transformers 5.23 and its DynamicLayer cache; env.txt says whether it is found), prepare once here, in the
# repository root:
#   echo /.devrun/ >> .git/info/exclude; mkdir -p .devrun
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .devrun transformers==5.23.0                       # 13.3 MB; tokenizers 0.23.2 there suffices
#   tar -cJf .devrun/tokenizer.tar.xz -C ~/.cache/dft-repro/models/HuggingFaceTB--SmolLM2-135M-Instruct \
#       tokenizer.json tokenizer_config.json                  # the default model's tokenizer (49,152 ids), 0.5 MB
# then one device call, carry [".devrun"], timeout_s 480 (about 6 minutes expected on an H100):
#   bash scripts/gpu_check.sh
# A rerun of some steps only: GPU_CHECK_STEPS="2 3" bash scripts/gpu_check.sh. The checkout (about 37 MiB) plus
# .devrun (14 MiB) stays under the machine's 64 MiB.
# Dry run on a CPU with tiny shapes and item counts (every step, the same commands):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY_SHAPE=1 OUT=runs/gpu_check_dry bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY_SHAPE=${GPU_CHECK_TINY_SHAPE:-0}
STEPS=${GPU_CHECK_STEPS:-1 2 3 4}
OUT=${OUT:-runs/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}   # big files (models, runs) stay here; $OUT gets the tarred results
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK" || exit 1
exec > >(tee "$OUT/gpu_check.log") 2>&1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_INDEX=1
if ls .devrun/*.whl > /dev/null 2>&1; then     # the carried wheels (the machine's own torch stays)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .devrun/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
SUMMARY=$OUT/summary.md
T0=$SECONDS STATUS=0

if [ "$TINY_SHAPE" = 1 ]; then   # the dry run: every step's commands on toy sizes
  SHAPE="hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2"
  XNLI_ITEMS=8 MGSM_ITEMS=4 NEW_TOKENS=8 BENCH_BATCH=2 BENCH_LENGTH=64 REPEATS=1 BENCH_DTYPE=float32 BENCH_PREC=no
else                             # TinyLlama-1.1B (hidden 2048, 22 blocks, 32 heads, 4 key-value heads)
  SHAPE="hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4"
  XNLI_ITEMS=500 MGSM_ITEMS=64 NEW_TOKENS=256 BENCH_BATCH=8 BENCH_LENGTH=512 REPEATS=5 BENCH_DTYPE=bfloat16 BENCH_PREC=bf16
fi
LC=2 ET=11
LIMIT=$([ "$TINY_SHAPE" = 1 ] && echo 1800 || echo 0)   # each step's time limit in s (the dry run: a slow CPU)
STEP1_S=${STEP1_S:-$((LIMIT ? LIMIT : 180))} STEP2_S=${STEP2_S:-$((LIMIT ? LIMIT : 180))}
STEP3_S=${STEP3_S:-$((LIMIT ? LIMIT : 200))} STEP4_S=${STEP4_S:-$((LIMIT ? LIMIT : 90))}
wants() { [[ " $STEPS " == *" $1 "* ]]; }
left() { echo $((STEP_END - SECONDS > 1 ? STEP_END - SECONDS : 1)); }   # seconds left to the running step
finish() {  # step folder name, exit status: tar it into $OUT and add a line to the summary
  tar -czf "$OUT/$1.tar.gz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude=tiny_models \
      --exclude=checkpoint -C "$WORK" "$1"
  local what=ok; [ "$2" = 0 ] || what="FAILED (exit $2$([ "$2" = 124 ] && echo ': its time limit'))"
  echo "- $1: $what after $((SECONDS - STEP_T0)) s" >> "$SUMMARY"
  [ "$2" = 0 ] || STATUS=1
  echo "== $1: exit $2 after $((SECONDS - STEP_T0)) s (total $((SECONDS - T0)) s)"
}
begin() { STEP_T0=$SECONDS STEP_END=$((SECONDS + $1)); mkdir -p "$WORK/$2"; echo; echo "== $2 (limit $1 s)"; }

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname): device $DEVICE, tiny shape $TINY_SHAPE, steps $STEPS"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers, accelerate, tokenizers; print('torch', torch.__version__, '| cuda', \
torch.version.cuda, torch.cuda.is_available(), '| transformers', transformers.__version__, '| tokenizers', \
tokenizers.__version__, '| accelerate', accelerate.__version__)"
  "$PY" -c "from transformers.cache_utils import DynamicLayer; print('DynamicLayer: present')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
{ echo "# gpu_check $(date -u +%FT%TZ)"; echo; sed 's/^/    /' "$OUT/env.txt"; echo; } > "$SUMMARY"
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
  echo "no GPU visible: nothing to do (GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY_SHAPE=1 is the dry run)"; exit 1
fi

# The model of steps 2-4: random weights of the real shape, vocab_size = len(tokenizer) (the default model's 49,152
# ids overflow TinyLlama's 32,000), saved once. Tokenizer: the carried .devrun/tokenizer.tar.xz, else the offline
# default model's, else the test suite's byte-level one.
MODEL=$WORK/random-model
if wants 2 || wants 3 || wants 4; then
  "$PY" - "$MODEL" "$DEVICE" "$SHAPE" <<'EOF' || { echo "could not build the random model"; exit 1; }
import os, sys, tarfile
sys.path[:0] = [".", "tests"]
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
import common
out, device, shape = sys.argv[1:]
if os.path.exists(".devrun/tokenizer.tar.xz"):
    with tarfile.open(".devrun/tokenizer.tar.xz") as t:
        t.extractall(out + ".tok", filter="data")
    tok = AutoTokenizer.from_pretrained(out + ".tok")
else:
    try:
        tok = AutoTokenizer.from_pretrained(common.resolve_model(common.DEFAULT_MODEL)[0])
    except Exception as e:
        from conftest import make_tokenizer
        print(f"default tokenizer unavailable ({type(e).__name__}): the test suite's", flush=True)
        tok = make_tokenizer()
eos = tok.eos_token_id
cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5,
                  bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else eos, eos_token_id=eos,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                  **{k.strip(): int(v) for k, v in (kv.split("=") for kv in shape.split(","))})
torch.manual_seed(0)
with torch.device(device):
    model = LlamaForCausalLM(cfg)
model.to(torch.bfloat16 if device.startswith("cuda") else torch.float32).save_pretrained(out)
tok.save_pretrained(out)
print(f"random model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, vocab {len(tok)}, "
      f"{cfg.num_hidden_layers} blocks -> {out}", flush=True)
EOF
fi

if wants 1; then
  begin "$STEP1_S" step1_tiny_run_paper
  TINY=1 TINY_DEVICE=$DEVICE PY=$PY OUT=$WORK/step1_tiny_run_paper/paper_tiny timeout -k 10 "$(left)" \
      bash run_paper.sh; rc=$?
  if [ $rc = 0 ]; then
    PAPER_TINY_OUT=$WORK/step1_tiny_run_paper/paper_tiny timeout -k 10 "$(left)" "$PY" -m pytest -q \
        -p no:cacheprovider tests/test_paper.py -k tiny_outputs; rc=$?
  fi
  grep -h '"device"' "$WORK"/step1_tiny_run_paper/paper_tiny/eval/*.json 2> /dev/null | sort | uniq -c
  finish step1_tiny_run_paper $rc
fi

if wants 2; then
  begin "$STEP2_S" step2_evaluate
  timeout -k 10 "$(left)" "$PY" - "$MODEL" "$DEVICE" "$WORK/step2_evaluate" "$XNLI_ITEMS" "$MGSM_ITEMS" \
      "$NEW_TOKENS" <<'EOF'; rc=$?
# 03 in this process (imported once), a cell per call: items/s, tokens/s, the batch it used, peak GPU memory.
import importlib.util, json, os, sys, time
import torch
model_dir, device, out, xnli_items, mgsm_items, new_tokens = sys.argv[1:]
spec = importlib.util.spec_from_file_location("evaluate", "03_evaluate.py")
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)
cuda = device.startswith("cuda")
report = []


def cell(task, limit, batch, dtype):
    run = f"{task}-{dtype}-bs{batch}"
    flags = ["--model", model_dir, "--run-name", run, "--tasks", task, "--langs", "zh", "--limit", limit,
             "--batch-size", batch, "--device", device, "--dtype", dtype, "--out", os.path.join(out, "eval")]
    if task == "mgsm":
        flags += ["--max-new-tokens", new_tokens]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ev.main(flags)
    entry = json.load(open(os.path.join(out, "eval", run + ".json")))["results"][task]["zh"]
    rows = ev.common.read_jsonl(os.path.join(out, "eval", entry["items_file"]))
    tokens = sum(sum(r["n_tokens"]) for r in rows) if task == "xnli" else sum(r["n_new_tokens"] for r in rows)
    s = entry["settings"]
    report.append(dict(task=task, items=entry["n"], batch_requested=batch, batch_used=s["batch_size"],
                       batch_halved_to=s["batch_halved_to"], dtype=s["dtype"], seconds=entry["seconds"],
                       items_per_s=entry["items_per_second"], tokens=tokens,
                       tokens_per_s=round(tokens / max(entry["seconds"], 1e-9), 1),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None))
    print("[gpu_check]", json.dumps(report[-1]), flush=True)
    json.dump(report, open(os.path.join(out, "evaluate.json"), "w"), indent=1)
    return entry, rows


for batch in ("auto", "16"):
    cell("xnli", xnli_items, batch, "auto")
    cell("mgsm", mgsm_items, batch, "auto")
# The reference: Hugging Face's greedy generate on 03's prompts and token ids, in 03's batches (longest first, left
# padded, batch 16), cut at the same stop strings; float32, since random weights make bf16 ties.
entry, rows = cell("mgsm", mgsm_items, "16", "float32")
model, tok = ev.common.load_model_and_tokenizer(model_dir, "float32", device, padding_side="left")
model.eval()
stops = entry["stops"] + ([tok.eos_token] if tok.eos_token and tok.eos_token not in entry["stops"] else [])
enc = [ev.tok_encode(tok, r["prompt"]) for r in rows]
order = sorted(range(len(rows)), key=lambda i: (-len(enc[i]), rows[i]["prompt"]))
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
texts, generated, t0 = [None] * len(rows), 0, time.time()
with torch.no_grad():
    for start in range(0, len(order), 16):
        idx = order[start:start + 16]
        T = max(len(enc[i]) for i in idx)
        ids = torch.tensor([[pad] * (T - len(enc[i])) + enc[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (T - len(enc[i])) + [1] * len(enc[i]) for i in idx], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(new_tokens), do_sample=False,
                             pad_token_id=pad)[:, T:]
        generated += gen.numel()
        for b, i in enumerate(idx):
            texts[i] = ev.truncate_at_stops(tok.decode(gen[b], skip_special_tokens=True), stops)
seconds = time.time() - t0
same = [i for i, r in enumerate(rows) if texts[i] == r["prediction"]]
ref = dict(reference="HF generate, float32, batch 16, 03's batches", items=len(rows), identical_texts=len(same),
           differing_ids=[rows[i]["id"] for i in range(len(rows)) if i not in same][:20], seconds=round(seconds, 2),
           tokens_generated_incl_after_stops=generated, tokens_per_s=round(generated / seconds, 1),
           ours_seconds=entry["seconds"], ours_tokens_per_s=report[-1]["tokens_per_s"])
print("[gpu_check]", json.dumps(ref), flush=True)
json.dump(dict(cells=report, hf_generate_reference=ref), open(os.path.join(out, "evaluate.json"), "w"), indent=1)
sys.exit(0 if len(same) == len(rows) else 3)
EOF
  "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); print('\n'.join(['', '| task | dtype | batch asked | used |\
 items | s | items/s | tokens/s | peak GiB |', '|---|---|---|---|---|---|---|---|---|'] + [f\"| {c['task']} | {c['dtype']} | \
{c['batch_requested']} | {c['batch_used']} | {c['items']} | {c['seconds']} | {c['items_per_s']} | {c['tokens_per_s']} | \
{c['peak_gib']} |\" for c in r['cells']] + ['', 'reference: ' + json.dumps(r['hf_generate_reference']), '']))" \
      "$WORK/step2_evaluate/evaluate.json" >> "$SUMMARY" 2> /dev/null
  finish step2_evaluate $rc
fi

if wants 3; then
  begin "$STEP3_S" step3_bench_train
  BENCH=(--model "$MODEL" --device "$DEVICE" --dtype "$BENCH_DTYPE" --precisions "$BENCH_PREC"
         --batch-size "$BENCH_BATCH" --max-length "$BENCH_LENGTH" --lc-layer $LC --et-layer $ET --repeats "$REPEATS"
         --methods tft,dft-logits,dft-logits-shared,dft-feature)
  timeout -k 10 "$(left)" "$PY" bench_train.py "${BENCH[@]}" --out "$WORK/step3_bench_train/plain"; rc=$?
  timeout -k 10 "$(left)" "$PY" bench_train.py "${BENCH[@]}" --grad-checkpointing \
      --out "$WORK/step3_bench_train/grad_checkpointing" || rc=$?
  for d in plain grad_checkpointing; do
    [ -f "$WORK/step3_bench_train/$d/bench_train.md" ] && { echo; echo "bench_train, $d:"; echo
                                                            cat "$WORK/step3_bench_train/$d/bench_train.md"; }
  done | tee -a "$SUMMARY"
  finish step3_bench_train $rc
fi

if wants 4; then
  begin "$STEP4_S" step4_readout_and_peers
  S4=$WORK/step4_readout_and_peers rc=0
  HELP=$("$PY" 02_train_dft.py --help 2>&1)
  PAIRS=tests/fixtures/pairs_zh.jsonl
  if grep -q -- "--fit-tuned-lens" <<< "$HELP"; then
    timeout -k 10 "$(left)" "$PY" 02_train_dft.py --fit-tuned-lens --model "$MODEL" --pairs $PAIRS \
        --fit-layers $LC,$ET --fit-tokens 2000 --out "$S4/lens" || rc=$?
    ACCELERATE_MIXED_PRECISION=$([ "$DEVICE" = cuda ] && echo bf16 || echo no) timeout -k 10 "$(left)" \
        "$PY" 02_train_dft.py --model "$MODEL" --pairs $PAIRS --method dft-logits-tuned --tuned-lens "$S4/lens" \
        --lc-layer $LC --et-layer $ET --max-steps 1 --batch-size "$BENCH_BATCH" --max-length "$BENCH_LENGTH" \
        --log-every 1 --out "$S4/dft-logits-tuned" || rc=$?
  else
    echo "   tuned-lens readout: absent from 02_train_dft.py (no --fit-tuned-lens), skipped" | tee -a "$SUMMARY"
  fi
  if grep -q -- "--fit " <<< "$HELP" || grep -q -- "--fit {" <<< "$HELP"; then
    for peer in incline diffmean; do
      timeout -k 10 "$(left)" "$PY" 02_train_dft.py --fit $peer --model "$MODEL" --pairs $PAIRS --out "$S4/$peer" \
          && timeout -k 10 "$(left)" "$PY" 03_evaluate.py --model "$S4/$peer" --run-name $peer --tasks xnli \
              --langs zh --limit "$MGSM_ITEMS" --device "$DEVICE" --out "$S4/eval" || rc=$?
    done
  else
    echo "   inference-time peers: absent from 02_train_dft.py (no --fit incline|diffmean), skipped" | tee -a "$SUMMARY"
  fi
  finish step4_readout_and_peers $rc
fi
echo; echo "== gpu_check $([ $STATUS = 0 ] && echo PASS || echo FAIL) after $((SECONDS - T0)) s; $OUT:"; ls -la "$OUT"
exit $STATUS
