#!/usr/bin/env bash
# The script behind results/gpu_smoke/zero3/, run from the repository root on a one-GPU machine without network:
# DeepSpeed ZeRO-3 (accelerate launch, configs/deepspeed_zero3.yaml, 1 process) against plain bf16, 5 steps of
# dft-logits and dft-feature on a random SmolLM2-shaped model. Wheels come in .whl/, DeepSpeed's own build in
# .devrun/dsl.tar.xz; files for results/ are written to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
mkdir -p /tmp/x && tar -xJf .devrun/dsl.tar.xz -C /tmp/x || exit 1
export PYTHONPATH=/tmp/site:/tmp/x/.dsl HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)" \
    2>&1 | tail -1
python3 - <<'PY'
import sys; sys.path[:0] = [".", "tests"]
from transformers import LlamaConfig, LlamaForCausalLM
from conftest import make_tokenizer
tok = make_tokenizer()
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                  tie_word_embeddings=True, rms_norm_eps=1e-5,
                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
LlamaForCausalLM(cfg).save_pretrained("/tmp/m"); tok.save_pretrained("/tmp/m"); print("model /tmp/m")
PY
F="--model /tmp/m --pairs tests/fixtures/pairs_zh.jsonl --lc-layer 2 --et-layer 15 --max-steps 5 --batch-size 4"
F="$F --max-length 256 --lr 1e-4 --warmup-ratio 0 --log-every 1"
for m in dft-logits dft-feature; do
  ACCELERATE_MIXED_PRECISION=bf16 python3 02_train_dft.py $F --method $m --out /tmp/plain-$m > /tmp/plain-$m.log 2>&1
  echo "plain $m rc $?"
  python3 -m accelerate.commands.launch --config_file configs/deepspeed_zero3.yaml --num_processes 1 \
      02_train_dft.py $F --method $m --out /tmp/z3-$m > /tmp/z3-$m.log 2>&1; echo "zero3 $m rc $?"
  grep -E "^global batch|^error|Error" /tmp/z3-$m.log | head -5
  cp /tmp/z3-$m.log "$OUT/z3-$m.log"
  cp /tmp/plain-$m/train_log.jsonl "$OUT/plain-$m.jsonl"; cp /tmp/z3-$m/train_log.jsonl "$OUT/z3-$m.jsonl"
done
python3 - <<'PY'
import json
for m in ("dft-logits", "dft-feature"):
    try:
        a = [json.loads(l) for l in open(f"/tmp/plain-{m}/train_log.jsonl")]
        b = [json.loads(l) for l in open(f"/tmp/z3-{m}/train_log.jsonl")]
        cfg = json.load(open(f"/tmp/z3-{m}/train_config.json"))
    except OSError as e:
        print(m, "missing", e); continue
    print(m, cfg["distributed_type"], cfg["mixed_precision"])
    for k in ("loss", "loss_tft", "loss_lc", "loss_et"):
        print(f"  {k:9s} plain {[round(r[k], 4) for r in a]}\n            zero3 {[round(r[k], 4) for r in b]}")
    print("  max rel loss diff", max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)),
          "peak GiB plain/zero3", max(r["peak_mem_gib"] or 0 for r in a), max(r["peak_mem_gib"] or 0 for r in b))
import os; print("z3 saved:", sorted(os.listdir("/tmp/z3-dft-logits"))[:8])
PY
