#!/usr/bin/env bash
# The Gemma-3-270M replication (results/README.md, pre-registered there): DFT vs TFT on 2 CPU cores, two seeds.
#
#   nohup bash run_replication.sh >> runs/replication_gemma/driver.log 2>&1 &   # start or resume
#
#   1. Chinese Alpaca pairs within 256 Gemma tokens: 1000 train + 200 dev (held-out NLL)
#   2. per seed (SEEDS="1 2"): tft, dft-logits at w=1 (the paper), dft-logits at w=WSMALL, dft-feature at w=1,
#      then mid-align (MID_ALIGN=0 leaves it out); the same pairs, per-seed data order, steps (100 x batch 8),
#      lr and schedule for every method; layers i=2, j=8 (the paper's relative depth); held-out loss every 20
#      steps on the first 64 dev pairs; bf16 autocast (02's default where the CPU computes bf16)
#   3. evaluation of base and every model on the same items, bf16, in one background queue beside the training:
#      primary measures (held-out NLL zh/en on the dev pairs; XNLI, XCOPA, XStoryCloze, M-MMLU, zh), then the
#      secondary ones (TruthfulQA-zh MC1, XQuAD-zh, Tatoeba chrF en<->zh), then, for base and seed 1, the
#      layer analysis (logit lens)
#   4. scripts/compare_seeds.py: the seed-pooled paired bootstrap DFT vs tft and the tables; loss curves
# Resumable: every part leaves a marker in $OUT (pairs.done, <run>.trained, eval/<run>.<part>.done,
# layers/<run>.done holding the sample count) and is skipped when rerun; a stopped training continues from
# its last checkpoint (--save-every 20, --resume). Each finished part's small results (logs, JSON, gzipped
# per-item files, tables, figures) go to $RES and are committed (scripts/unattended.sh; COMMIT=0: no commits).
# Models stay in $OUT (runs/, git-ignored). One torch thread per process: the two lanes share 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/unattended.sh
PY=.venv/bin/python
BASE=${BASE:-google/gemma-3-270m}
OUT=${OUT:-runs/replication_gemma}
RES=${RES:-results/gemma3}
LIMIT_PAIRS=${LIMIT_PAIRS:-1200}   # pairs kept (train + dev)
DEV=${DEV:-200}                    # dev pairs (held-out NLL)
MAX_LEN=${MAX_LEN:-256}            # tokens per training sequence (pairs are filtered to fit it)
STEPS=${STEPS:-100}
BATCH=${BATCH:-8}
LR=${LR:-2e-5}                     # 1e-4 made tft worse than base: results/README.md, "Amendment 1"
SEEDS=${SEEDS:-"1 2"}
LC=${LC:-2}                        # block i (language conversion): results/README.md, "Layers"
ET=${ET:-8}                        # block j (English thinking)
WSMALL=${WSMALL:-0.1}              # the smaller dft-logits weight (both lens terms): results/README.md, "Weight"
HELD_EVERY=${HELD_EVERY:-20}       # held-out loss during training every N steps ...
HELD_LIMIT=${HELD_LIMIT:-64}       # ... on the first N dev pairs (03's NLL uses all of them)
SAVE_EVERY=${SAVE_EVERY:-20}       # checkpoints: a stopped training resumes from the last one
CE_CHUNK=${CE_CHUNK:-256}          # tokens per cross-entropy chunk: 256 x 262k logits at a time fit beside
                                   # other jobs (02's default of 1024 was killed by the host's OOM killer)
EVAL_DTYPE=${EVAL_DTYPE:-bfloat16}
N_NLL=${N_NLL:-200} N_XNLI=${N_XNLI:-1000} N_XCOPA=${N_XCOPA:-500} N_XSC=${N_XSC:-1000} N_MMLU=${N_MMLU:-1000}
N_TQA=${N_TQA:-200} N_XQUAD=${N_XQUAD:-150} N_MT=${N_MT:-150}   # secondary (0 = all); TruthfulQA: README, "Budget"
MAX_NEW=${MAX_NEW:-32}             # generation budget (XQuAD spans, Tatoeba sentences)
ANALYSIS_SAMPLES=${ANALYSIS_SAMPLES:-200}  # dev pairs in the layer analysis (all of them when fewer)
MID_ALIGN=${MID_ALIGN:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/eval" "$OUT/layers" "$RES/eval" "$RES/train" "$RES/layers"
PAIRS="$OUT/pairs_zh.jsonl"; DEVPAIRS="$OUT/pairs_zh.dev.jsonl"

# The matrix, in training order: seed 1 of every method first, so the first comparisons finish early.
RUNS=""
for s in $SEEDS; do RUNS="$RUNS tft-s$s dft-logits-w1-s$s dft-logits-wsmall-s$s dft-feature-w1-s$s"; done
[ "$MID_ALIGN" = 1 ] && for s in $SEEDS; do RUNS="$RUNS mid-align-s$s"; done
SEED1=${SEEDS%% *}   # the layer analysis covers base and this seed's runs
flags_of() {  # the method flags of a run name (tft and mid-align take no DFT layers)
    case $1 in
        tft-s*) echo "--method tft" ;;
        dft-logits-w1-s*) echo "--method dft-logits --lc-layer $LC --et-layer $ET" ;;
        dft-logits-wsmall-s*) echo "--method dft-logits --lc-layer $LC --et-layer $ET" \
                                   "--lc-weight $WSMALL --et-weight $WSMALL" ;;
        dft-feature-w1-s*) echo "--method dft-feature --lc-layer $LC --et-layer $ET" ;;
        mid-align-s*) echo "--method mid-align" ;;
    esac
}
model_of() { [ "$1" = base ] && echo "$BASE" || echo "$OUT/$1"; }
lim() { [ "$1" = 0 ] || echo "--limit $1"; }
curves() { [ -f "$RES/loss_curves.png" ] && echo "$RES/loss_curves.png" "$RES/loss_curves.md"; }

refresh_tables() {  # seed-pooled tables and loss curves from what has finished (both lanes call it: one at a time)
    ( flock 9
      $PY scripts/compare_seeds.py "$RES/eval" --train "$RES/train" --json "$RES/compare.json" \
          > "$RES/tables.md.tmp" 2> "$OUT/compare_seeds.err" && mv "$RES/tables.md.tmp" "$RES/tables.md" \
          || stamp "compare_seeds failed (see $OUT/compare_seeds.err)"
      runs=$(ls "$OUT" | sed -n 's/\.trained$//p' | tr '\n' ' ')
      # shellcheck disable=SC2086  # one argument per run
      [ -z "$runs" ] || $PY scripts/plot_losses.py "$OUT" $runs --heldout --out "$RES/loss_curves.png" \
          > /dev/null 2>> "$OUT/compare_seeds.err" || true
    ) 9> "$OUT/.tables.lock"
}

# ---- training lane ----
train_once() {  # one attempt: resume from the last checkpoint; a run killed before its first one starts again
    local name=$1 resume=""
    if [ -d "$OUT/$name/checkpoint" ]; then resume=--resume
    elif [ -d "$OUT/$name" ]; then rm -rf "${OUT:?}/$name"; fi
    stamp "train $name: start${resume:+ (resume from checkpoint)}"
    # shellcheck disable=SC2046  # flags_of gives one word per flag
    $PY 02_train_dft.py --pairs "$PAIRS" --out "$OUT/$name" --model "$BASE" $(flags_of "$name") \
        --max-steps "$STEPS" --batch-size "$BATCH" --max-length "$MAX_LEN" --lr "$LR" --seed "${name##*-s}" \
        --eval-pairs "$DEVPAIRS" --eval-every "$HELD_EVERY" --eval-limit "$HELD_LIMIT" --ce-chunk "$CE_CHUNK" \
        --save-every "$SAVE_EVERY" --log-every 10 $resume >> "$OUT/$name.train.log" 2>&1
}
train() {  # train NAME: up to 4 attempts (the host's OOM killer can take a training while other jobs run)
    local name=$1
    [ -f "$OUT/$name.trained" ] && return 0
    if ! retry 4 train_once "$name"; then
        touch "$OUT/$name.failed"; stamp "train $name: FAILED (see $OUT/$name.train.log)"; return 0
    fi
    rm -rf "${OUT:?}/$name/checkpoint"
    touch "$OUT/$name.trained"
    mkdir -p "$RES/train/$name"
    cp "$OUT/$name/train_config.json" "$RES/train/$name/"
    gzip -nc "$OUT/$name/train_log.jsonl" > "$RES/train/$name/train_log.jsonl.gz"  # results/ keeps .jsonl gzipped
    grep -v "it/s\]\|s/it\]" "$OUT/$name.train.log" | tail -40 > "$RES/train/$name/train_stdout_tail.txt" || true
    stamp "train $name: done ($(tail -1 "$OUT/$name/train_log.jsonl" | cut -c1-200))"
    refresh_tables
    # shellcheck disable=SC2046
    commit_paths "results/gemma3: training log of $name" "$RES/train/$name" $(curves)
}

# ---- evaluation lane ----
publish_eval() {  # publish_eval NAME WHAT: run JSON + gzipped per-item files into $RES/eval, tables, commit
    local name=$1 f
    cp "$OUT/eval/$name.json" "$RES/eval/"
    for f in "$OUT/eval/$name".*.jsonl; do [ -f "$f" ] && gzip -nc "$f" > "$RES/eval/$(basename "$f").gz"; done
    # the log without progress bars
    tr '\r' '\n' < "$OUT/eval/$name.log" | grep -v "it/s\]\|s/it\]\|^\s*$" > "$RES/eval/$name.log" || true
    refresh_tables
    # shellcheck disable=SC2046
    commit_paths "results/gemma3: evaluation of $name ($2)" "$RES/eval" "$RES/tables.md" "$RES/compare.json" $(curves)
}
ev() {  # ev NAME PART ARGS...: one 03_evaluate.py call, skipped when its marker exists
    local name=$1 part=$2; shift 2
    [ -f "$OUT/eval/$name.$part.done" ] && return 0
    stamp "eval $name: $part"
    $PY 03_evaluate.py --model "$(model_of "$name")" --run-name "$name" --out "$OUT/eval" --dtype "$EVAL_DTYPE" \
        "$@" >> "$OUT/eval/$name.log" 2>&1 && touch "$OUT/eval/$name.$part.done" && return 0
    stamp "eval $name: $part FAILED (see $OUT/eval/$name.log)"; return 1
}
# shellcheck disable=SC2046  # lim gives "--limit N" or nothing
primary() {  # held-out NLL and the four NLU tasks; published together
    [ -f "$OUT/eval/$1.primary.done" ] && return 0
    ev "$1" nll --tasks nll --langs zh,en --pairs "$DEVPAIRS" $(lim "$N_NLL") &&
    ev "$1" xnli --tasks xnli --langs zh $(lim "$N_XNLI") &&
    ev "$1" xcopa --tasks xcopa --langs zh $(lim "$N_XCOPA") &&
    ev "$1" xstorycloze --tasks xstorycloze --langs zh $(lim "$N_XSC") &&
    ev "$1" mmlu --tasks mmlu --langs zh $(lim "$N_MMLU") &&
    touch "$OUT/eval/$1.primary.done" && publish_eval "$1" "primary measures"
}
# Generation uses --prompt-style alpaca, the template every trained model learned (base gets the same prompt).
# shellcheck disable=SC2046
secondary() {  # each part published on its own; a part done before is skipped, not published again
    local part
    for part in truthfulqa xquad translation; do
        [ -f "$OUT/eval/$1.$part.done" ] && continue
        case $part in
            truthfulqa) ev "$1" truthfulqa --tasks truthfulqa --langs zh $(lim "$N_TQA") ;;
            xquad) ev "$1" xquad --tasks xquad --langs zh --prompt-style alpaca --max-new-tokens "$MAX_NEW" \
                $(lim "$N_XQUAD") ;;
            translation) ev "$1" translation --tasks translation --langs zh --mt-data tatoeba --prompt-style alpaca \
                --max-new-tokens "$MAX_NEW" $(lim "$N_MT") ;;
        esac && publish_eval "$1" "$part"
    done
    return 0
}
layers() {  # logit-lens analysis (English / zh mass, entropy, en-zh cosine per block) and the figure of all runs
    # the marker holds the sample count, so another ANALYSIS_SAMPLES redoes the analysis
    [ "$(cat "$OUT/layers/$1.done" 2>/dev/null)" = "$ANALYSIS_SAMPLES" ] && return 0
    stamp "layers $1"
    if ! $PY 03_evaluate.py --analysis layers --model "$(model_of "$1")" --run-name "$1" --langs zh \
            --dtype "$EVAL_DTYPE" --analysis-samples "$ANALYSIS_SAMPLES" --pairs "$DEVPAIRS" --out "$OUT/layers/$1" \
            >> "$OUT/layers/$1.log" 2>&1; then
        stamp "layers $1 FAILED (see $OUT/layers/$1.log)"; return 0
    fi
    echo "$ANALYSIS_SAMPLES" > "$OUT/layers/$1.done"
    gzip -nc "$OUT/layers/$1/$1.layers.zh.json" > "$RES/layers/$1.layers.zh.json.gz"
    $PY scripts/plot_layers.py "$RES/layers" --lang zh || true
    commit_paths "results/gemma3: layer analysis of $1" "$RES/layers"
}
eval_queue() {  # base, then each run once it is trained (a failed training is passed over)
    local n
    for n in base $RUNS; do
        until [ "$n" = base ] || [ -f "$OUT/$n.trained" ] || [ -f "$OUT/$n.failed" ]; do sleep 30; done
        [ "$n" = base ] || [ -f "$OUT/$n.trained" ] || continue
        # a failed part is logged and passed over (|| true): the next launch tries it again
        primary "$n" || true
        if [ -f "$OUT/eval/$n.primary.done" ]; then secondary "$n" || true; fi
        if [ "$n" = base ] || [ "${n##*-s}" = "$SEED1" ]; then layers "$n" || true; fi
    done
    stamp "evaluation queue: done"
}

stamp "== Gemma-3-270M replication: runs:$RUNS"
stamp "== 1/3 pairs: Chinese Alpaca, $LIMIT_PAIRS kept, $DEV dev, <= $MAX_LEN Gemma tokens"
if [ ! -f "$OUT/pairs.done" ]; then
    $PY 01_build_pairs.py --source alpaca --lang zh --limit "$LIMIT_PAIRS" --dev-size "$DEV" --max-tokens "$MAX_LEN" \
        --tokenizer "$BASE" --out "$PAIRS" > "$OUT/pairs.log" 2>&1
    touch "$OUT/pairs.done"
    cp "$OUT/pairs_zh.stats.json" "$OUT/pairs.log" "$RES/"
    sha256sum "$PAIRS" "$DEVPAIRS" | sed "s|$OUT/||" > "$RES/pairs.sha256"
    commit_paths "results/gemma3: pair statistics and hashes" "$RES/pairs_zh.stats.json" "$RES/pairs.log" \
        "$RES/pairs.sha256"
fi

stamp "== 2/3 training (foreground) and evaluation (one background queue)"
rm -f "$OUT"/*.failed   # a rerun tries failed trainings again
eval_queue & QUEUE=$!
for n in $RUNS; do train "$n"; done
stamp "training: done; waiting for the evaluation queue"
wait "$QUEUE"

stamp "== 3/3 tables and figures"
refresh_tables
# shellcheck disable=SC2046
commit_paths "results/gemma3: tables and figures" "$RES/tables.md" "$RES/compare.json" $(curves)
stamp "done: $RES/tables.md"
