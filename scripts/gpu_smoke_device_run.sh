#!/usr/bin/env bash
# The script behind results/gpu_smoke/ (its README says how it ran), run from the repository root on a one-GPU
# machine without network: GPU smoke test A-E + step timings on the SmolLM2-shaped model (scripts/gpu_smoke.sh),
# then the step timings of a random 1.1B LLaMA (TinyLlama shape). Python packages come as wheels in .whl/;
# files for results/ are written to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
T0=$SECONDS
PY=python3 OUT=/tmp/smoke BENCH=1 bash scripts/gpu_smoke.sh; echo "smoke rc $? after $((SECONDS-T0)) s"
cp /tmp/smoke/gpu_smoke.log "$OUT/" ; cp /tmp/smoke/bench/*.json /tmp/smoke/bench/*.md "$OUT/" 2>/dev/null
for r in A B C D E; do cp /tmp/smoke/$r/train_log.jsonl "$OUT/train_log.$r.jsonl" 2>/dev/null; done
[ "${SKIP1B:-0}" = 1 ] || [ $((SECONDS-T0)) -gt 330 ] && { echo "no time left for the 1.1B bench"; exit 0; }
python3 - <<'PY'
import sys; sys.path[:0] = [".", "tests"]
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from conftest import make_tokenizer
tok = make_tokenizer()
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=False, rms_norm_eps=1e-5,
                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
torch.manual_seed(0)
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg)
m.to(torch.bfloat16).save_pretrained("/tmp/random-1b"); tok.save_pretrained("/tmp/random-1b")
print("saved random 1.1B")
PY
python3 bench_train.py --model /tmp/random-1b --device cuda --dtype bfloat16 --batch-size 8 --max-length 256 \
    --lc-layer 2 --et-layer 11 --repeats 5 --out /tmp/bench1b 2>&1 | grep -v "it/s"
for f in /tmp/bench1b/*.json /tmp/bench1b/*.md; do cp "$f" "$OUT/1b.$(basename $f)"; done
echo "all done after $((SECONDS-T0)) s"
