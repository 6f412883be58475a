#!/usr/bin/env bash
# GPU smoke test of 02_train_dft.py under FSDP (one GPU, a few minutes). Run from anywhere:
#   bash scripts/gpu_smoke.sh                  # log: runs/gpu_smoke/gpu_smoke.log
#   MODEL=HuggingFaceTB/SmolLM2-135M-Instruct OUT=/tmp/smoke bash scripts/gpu_smoke.sh
# What it runs, 5 optimizer steps of dft-logits each (LC block 2, ET block 15, batch 4, fixture pairs):
#   A  one GPU, no FSDP, mixed precision bf16 (python 02_train_dft.py)
#   B  FSDP2 full shard with configs/fsdp_8gpu.yaml on 1 process (decoder blocks wrapped, root = the objective)
#   C  as B with --grad-checkpointing, interrupted after step 3 (checkpoint at step 2), then --resume
#   D  FSDP version 1 (use_orig_params) with the lens terms
#   E  as B with --lora: the adapter is gathered and saved by the main process and loads again
# and prints per run the losses, the peak GPU memory (train_log.jsonl: peak_mem_gib) and the time, then checks
# that A, B, C and D agree (bf16 tolerance). BENCH=1 then times one step of tft / dft-logits / dft-feature
# (bench_train.py, bf16, batch 8 x 256) on the same model. MODEL defaults to the offline SmolLM2-135M copy when
# it is already in the cache (or the hub is reachable), else to a random model of SmolLM2-135M's shape.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
OUT=${OUT:-runs/gpu_smoke}
rm -rf "$OUT" && mkdir -p "$OUT"
LOG="$OUT/gpu_smoke.log"
exec > >(tee "$LOG") 2>&1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no)

echo "== gpu_smoke $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || { echo "no GPU: nothing to do"; exit 1; }
"$PY" -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__); \
assert torch.cuda.is_available()" || exit 1

if [ -z "${MODEL:-}" ]; then
  MODEL=$("$PY" - "$OUT/random-smollm2" <<'EOF'
import os, sys
sys.path[:0] = [".", "tests"]
import common
try:  # the offline copy, if already converted (or the hub, if reachable)
    print(common.resolve_model(common.DEFAULT_MODEL)[0]); sys.exit(0)
except Exception as e:
    print(f"default model unavailable ({type(e).__name__}): a random model of its shape", file=sys.stderr)
from transformers import LlamaConfig, LlamaForCausalLM
from conftest import make_tokenizer
tok = make_tokenizer()
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                  tie_word_embeddings=True, rms_norm_eps=1e-5,
                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
print(sys.argv[1])
EOF
) || exit 1
  MODEL=$(tail -n 1 <<< "$MODEL")  # the folder: the last line (a failed offline-copy attempt may print before it)
fi
echo "model: $MODEL"
FLAGS=(--model "$MODEL" --pairs tests/fixtures/pairs_zh.jsonl --method dft-logits
       --lc-layer "${LC_LAYER:-2}" --et-layer "${ET_LAYER:-15}"
       --max-steps 5 --batch-size 4 --max-length 256 --lr 1e-4 --warmup-ratio 0 --log-every 1)
status=0
run() {  # name, then the command
  local name=$1; shift
  echo; echo "== $name: $*"
  local t0=$SECONDS
  "$@"; local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  return $rc
}

run A_single_gpu env ACCELERATE_MIXED_PRECISION=bf16 "$PY" 02_train_dft.py "${FLAGS[@]}" --out "$OUT/A" || status=1
run B_fsdp2 "${LAUNCH[@]}" --config_file configs/fsdp_8gpu.yaml 02_train_dft.py "${FLAGS[@]}" --out "$OUT/B" || status=1
run C_fsdp2_ckpt_cut "${LAUNCH[@]}" --config_file configs/fsdp_8gpu.yaml 02_train_dft.py "${FLAGS[@]}" --out "$OUT/C" \
    --grad-checkpointing --save-every 2 --stop-after-steps 3 || status=1
run C_fsdp2_ckpt_resume "${LAUNCH[@]}" --config_file configs/fsdp_8gpu.yaml 02_train_dft.py "${FLAGS[@]}" \
    --out "$OUT/C" --grad-checkpointing --save-every 2 --resume || status=1
run D_fsdp1 "${LAUNCH[@]}" --config_file configs/fsdp_8gpu.yaml --fsdp_version 1 --fsdp_use_orig_params true \
    02_train_dft.py "${FLAGS[@]}" --out "$OUT/D" || status=1
run E_fsdp2_lora "${LAUNCH[@]}" --config_file configs/fsdp_8gpu.yaml 02_train_dft.py "${FLAGS[@]}" --out "$OUT/E" \
    --lora --lr 1e-3 || status=1

echo; echo "== summary"
"$PY" - "$OUT" <<'EOF' || status=1
import json, os, sys
sys.path[:0] = ["."]
out = sys.argv[1]
logs = {}
for run in "ABCDE":
    path = os.path.join(out, run, "train_log.jsonl")
    if not os.path.exists(path):
        print(f"{run}: no train_log.jsonl"); continue
    logs[run] = [json.loads(l) for l in open(path)]
    cfg = json.load(open(os.path.join(out, run, "train_config.json")))
    print(f"{run}: {cfg['distributed_type']:10s} mixed precision {cfg['mixed_precision']}, "
          f"losses {[round(r['loss'], 4) for r in logs[run]]}, "
          f"peak {max(r['peak_mem_gib'] or 0 for r in logs[run]):.2f} GiB, "
          f"{sum(r['seconds'] for r in logs[run]):.1f} s for {len(logs[run])} steps")
ok = True
for a, b in (("A", "B"), ("B", "C"), ("A", "D")):
    if a in logs and b in logs:
        diff = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(logs[a], logs[b]))
        good = len(logs[a]) == len(logs[b]) == 5 and diff < 2e-2
        ok &= good
        print(f"{a} vs {b}: max relative loss difference {diff:.2e} ({'ok' if good else 'TOO LARGE'})")
for run in "BE":
    need = "adapter_config.json" if run == "E" else "model.safetensors"
    present = os.path.exists(os.path.join(out, run, need))
    ok &= present
    print(f"{run}: {need} {'saved' if present else 'MISSING'}")
if os.path.exists(os.path.join(out, "E", "adapter_config.json")):
    import common
    model, _ = common.load_model_and_tokenizer(os.path.join(out, "E"))
    print("E: adapter loads as", type(model).__name__)
sys.exit(0 if ok else 1)
EOF
if [ "${BENCH:-0}" = 1 ]; then
  run F_bench "$PY" bench_train.py --model "$MODEL" --device cuda --dtype bfloat16 --batch-size 8 --max-length 256 \
      --lc-layer "${LC_LAYER:-2}" --et-layer "${ET_LAYER:-15}" --repeats 5 --out "$OUT/bench" || status=1
  cat "$OUT"/bench/*.md 2>/dev/null
fi
echo; echo "== gpu_smoke: $([ $status -eq 0 ] && echo PASS || echo FAIL) (log: $LOG)"
exit $status
