#!/usr/bin/env bash
# The inference-time peers on SmolLM2-135M-Instruct (exploratory; docs/TRAINING.md, "Inference-time peers"):
#   1. the default pipeline's pairs, built exactly as run_pipeline.sh builds them (431 train + 69 dev, zh)
#   2. INCLINE (every block, last prompt token) and DiffMean (the entropy rule's ET block, prompt tokens) fitted on
#      the 431 train pairs at their defaults; the held-out residual on the 69 dev pairs
#   3. held-out NLL zh / en on the dev pairs: the base and both folders at alpha 0, 0.5 and 1
#   4. results/peers_smollm2/peers.{json,md}
# Float32 throughout (this CPU emulates bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-runs/peers_smollm2}
RES=${RES:-results/peers_smollm2}
BASE=HuggingFaceTB/SmolLM2-135M-Instruct
PAIRS=$OUT/pairs_zh.jsonl
DEV=$OUT/pairs_zh.dev.jsonl

[ -f "$PAIRS" ] || $PY 01_build_pairs.py --source alpaca --lang zh --limit 500 --dev-size 100 \
    --max-tokens 256 --tokenizer "$BASE" --out "$PAIRS"
for method in incline diffmean; do
    $PY 02_train_dft.py --fit "$method" --pairs "$PAIRS" --out "$OUT/$method" --model "$BASE" --dtype float32 \
        --batch-size 16
done
EVAL=(--tasks nll --langs zh,en --pairs "$DEV" --dtype float32 --out "$OUT/eval")
$PY 03_evaluate.py --model "$BASE" --run-name base "${EVAL[@]}"
# alpha 0 is the base model item for item (tests/test_peers.py); it runs last, as a check on the full model
for alpha in 1 0.5 0; do
    for method in incline diffmean; do
        $PY 03_evaluate.py --model "$OUT/$method" --steer-alpha "$alpha" --run-name "$method-a$alpha" "${EVAL[@]}"
    done
done
$PY scripts/peers_table.py --runs "$OUT" --out "$RES"
