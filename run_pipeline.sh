#!/usr/bin/env bash
# The whole pipeline on the offline default model (SmolLM2-135M-Instruct), sized for a laptop CPU:
#   1. 500 Chinese Alpaca pairs (431 train + 69 dev: 31 of the 100 dev ids are over 256 tokens)
#   2. 30 steps of DFT (logit lens, auto layers; held-out loss on 32 dev pairs at steps 15 and 30)
#   3. the base and the trained model on a few benchmark items, side by side (answers cut at 32 tokens).
# Rerunning starts afresh: it deletes $OUT (default runs/pipeline), and only a folder it made itself (its
# .run_pipeline mark): any other existing OUT is refused. Sizes are environment variables.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=.venv/bin/python
OUT=${OUT:-runs/pipeline}
TGT=${TGT:-zh}              # alpaca ships zh and vi
METHOD=${METHOD:-dft-logits}
STEPS=${STEPS:-30}
LIMIT=${LIMIT:-50}          # items per task x language in the evaluation
# auto: bf16 where the CPU/GPU computes it natively (training autocast, evaluation weights); no: float32
PRECISION=${PRECISION:-auto}
BASE=HuggingFaceTB/SmolLM2-135M-Instruct
if [ -e "$OUT" ] && [ ! -e "$OUT/.run_pipeline" ]; then
    echo "error: OUT=$OUT exists and is not a folder run_pipeline.sh made (no $OUT/.run_pipeline): rerunning deletes" \
         "OUT, so pick a new OUT, or delete it yourself" >&2
    exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/.run_pipeline"

echo "== 1/3 parallel pairs"
$PY 01_build_pairs.py --source alpaca --lang "$TGT" --limit 500 --dev-size 100 \
    --max-tokens 256 --tokenizer "$BASE" --out "$OUT/pairs_$TGT.jsonl"

echo "== 2/3 DFT training ($METHOD, $STEPS steps)"
$PY 02_train_dft.py --pairs "$OUT/pairs_$TGT.jsonl" --out "$OUT/$METHOD" --model "$BASE" --method "$METHOD" \
    --max-steps "$STEPS" --batch-size 4 --max-length 256 --lr 1e-4 --log-every 10 --layer-sample 16 \
    --mixed-precision "$PRECISION" --eval-pairs "$OUT/pairs_$TGT.dev.jsonl" --eval-every 15 --eval-limit 32

echo "== 3/3 evaluation: base vs $METHOD"
$PY 03_evaluate.py --model "$BASE" "$OUT/$METHOD" --run-name base "$METHOD" \
    --tasks xnli,xcopa,xstorycloze,xquad,nll --langs "$TGT" --limit "$LIMIT" --max-new-tokens 32 \
    --pairs "$OUT/pairs_$TGT.dev.jsonl" --out "$OUT/eval" \
    --dtype "$([ "$PRECISION" = no ] && echo float32 || echo auto)"
echo "results: $OUT/eval/results.md"
