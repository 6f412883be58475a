#!/usr/bin/env bash
# The pre-registered ablations of results/README.md ("Why DFT hurts at 270M"): Gemma-3-270M with the
# replication's recipe; 300-step tft / dft-feature (seeds 1, 2), single-term runs, ET-layer sweep.
#
#   nohup bash scripts/run_ablations.sh >> runs/ablations/driver.log 2>&1 &     # start or resume
#
# One torch thread per process: $LANES training lane(s), each taking the next unclaimed run in priority order,
# and $EVAL_QUEUES evaluation queue(s): the first re-evaluates base and checks it against the replication's per-item
# files, then scores the primary measures of whichever run finished training first (priority order among
# them). Every finished part leaves a marker in $OUT and is skipped when rerun; a stopped training resumes
# from its last checkpoint; each part's small outputs are copied to $RES and committed (scripts/unattended.sh).
# Models stay in $OUT. One driver at a time (a lock in $OUT).
# CODE: where 01/02/03 are run from (e.g. a git worktree pinned to one commit, so that a long study keeps
# one version of the code while the checkout moves on); each run's JSON records that commit.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/unattended.sh
PY=${PY:-.venv/bin/python}
CODE=${CODE:-.}
BASE=google/gemma-3-270m
OUT=${OUT:-runs/ablations}
RES=${RES:-results/gemma3/ablations}
REPL_SHA=results/gemma3/pairs.sha256           # the replication's train (1,006) and dev (194) files
EVAL_DTYPE=bfloat16                            # the replication's evaluation settings: bf16, batch 16, 1 process
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# glibc hands blocks over 4 MB back to the system when freed (its adaptive threshold kept freed activations):
# a tft training's resident memory 7.9 GB instead of 11.2 GB; the numbers computed do not change
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4194304}
# The recipe is bf16 autocast (every run so far: AMX). Under `--mixed-precision auto` 02 trains in float32 on a
# device without native bf16, off the recipe (seen 2026-12-02 on an AMD EPYC without AVX512: ~45 s per step with two
# lanes). So the runner asks for bf16 by name and stops on such a device unless ALLOW_EMULATED_BF16=1 (there,
# emulated: 834 s for the first step instead of 15, its loss 4.02376 instead of the AMX run's 4.02430).
MIXED=(--mixed-precision bf16)
# Native bf16 on another CPU (AVX512-BF16 without AMX) computes other roundings: base's per-item files then differ
# from the replication's. stop: evaluate nothing (the default); continue: evaluate the runs and read them with the
# machine's difference measured on base (results/README.md, ablations, Amendment 3).
BASE_MISMATCH=${BASE_MISMATCH:-stop}
[[ $BASE_MISMATCH == stop || $BASE_MISMATCH == continue ]] ||
    { echo "BASE_MISMATCH must be stop or continue, not '$BASE_MISMATCH'" >&2; exit 1; }
NATIVE=$($PY -c "import sys, torch; sys.path.insert(0, '$CODE'); import common
print(common.native_bf16('cuda' if torch.cuda.is_available() else 'cpu'))") ||
    { echo "could not import $CODE/common.py with $PY: run bash setup.sh, or set PY and CODE" >&2; exit 1; }
if [ "$NATIVE" != True ] && [ "${ALLOW_EMULATED_BF16:-0}" != 1 ]; then
    echo "this machine does not compute bf16 natively (no AMX / AVX512-BF16 CPU, no CUDA Ampere+): the study's" \
        "bf16 recipe would be emulated; run it where bf16 is native, or set ALLOW_EMULATED_BF16=1" >&2
    exit 1
fi
mkdir -p "$OUT/eval" "$RES/eval" "$RES/train"
PAIRS_BIG="$OUT/pairs_zh.jsonl" PAIRS_OLD="$OUT/pairs_zh_1006.jsonl" DEV="$OUT/pairs_zh.dev.jsonl"

# Runs in priority order: name, steps, pairs file, method flags (i = 2, j = 8 unless varied).
RUNS=(
    "tft-300-s1          300 big --method tft"
    "dft-feature-300-s1  300 big --method dft-feature --lc-layer 2 --et-layer 8"
    "tft-300-s2          300 big --method tft"
    "dft-feature-300-s2  300 big --method dft-feature --lc-layer 2 --et-layer 8"
    "lc-only-logits-s1   100 old --method dft-logits --et none --lc-layer 2 --lc-weight 0.1"
    "et-only-logits-s1   100 old --method dft-logits --lc none --et-layer 8 --et-weight 0.1"
    "lc-only-feature-s1  100 old --method dft-feature --et none --lc-layer 2"
    "et-only-feature-s1  100 old --method dft-feature --lc none --et-layer 8"
    "dft-feature-j4-s1   100 old --method dft-feature --lc-layer 2 --et-layer 4"
    "dft-feature-j14-s1  100 old --method dft-feature --lc-layer 2 --et-layer 14"
)
# The replication's runs recomputed the lens prompt; keep that path where 02 offers the choice (the shared one
# gives the same losses and gradients up to float rounding, and train_config.json records which ran).
LENS=()
[[ $($PY "$CODE/02_train_dft.py" --help) == *--lens-prefix* ]] && LENS=(--lens-prefix recompute)
ONLY=${ONLY:-}   # e.g. ONLY="tft-300-s1 dft-feature-300-s1": train just these (the queue still evaluates them)
# Training lanes. On 2 cores and 24 GB, with the mmap threshold above (without it two trainings beside an
# evaluation were OOM-killed; a Gemma-3-270M training holds 8-10 GB): one training 12-20 s per step; two
# 18-22 s each; two beside an evaluation ~40 s each. So with LANES=2 at most two processes run: a lane takes a
# new run only while no evaluation is pending, or (the first lane) while no other lane trains. Two dft-logits
# trainings (10.6 and 12.5 GB, the lens over Gemma's 262k vocabulary) were OOM-killed together: train those
# with LANES=1 (or ONLY) on 24 GB.
LANES=${LANES:-1}
# Evaluation queues: one by default. Where evaluations take longer than the trainings (a CPU slower at bf16 than
# the AMX one: trained runs waiting on one queue while a core idles), EVAL_QUEUES=2 keeps both cores busy.
EVAL_QUEUES=${EVAL_QUEUES:-1}
exec 8> "$OUT/.driver.lock"
flock -n 8 || { echo "another scripts/run_ablations.sh, or a process it started (a training, a 30 s sleep)," \
    "holds $OUT/.driver.lock: fuser -v $OUT/.driver.lock lists them" >&2; exit 1; }
rm -rf "$OUT"/*.claimed "$OUT"/eval/*.claimed   # claims of a driver that was killed
# A fresh checkout (no $OUT) resumes from what is committed: a run whose evaluation is committed counts as trained
# and evaluated; a run trained but not evaluated is trained again (models are not committed). Base is evaluated
# and checked again, which also catches a machine whose kernels give other numbers.
for line in "${RUNS[@]}"; do
    name=${line%% *}
    if [ -f "$RES/eval/$name.json" ] && [ ! -f "$OUT/eval/$name.published" ]; then
        touch "$OUT/$name.trained" "$OUT/eval/$name.published"; stamp "$name: evaluated in $RES/eval"
    fi
done

stamp "== ablations: code from $CODE ($(git -C "$CODE" rev-parse --short HEAD)), results to $RES"

# 1. Pairs: the replication's file, rebuilt (--limit 1200) and checked by hash, for the 100-step runs; a larger
# file with the same filters for the 300-step runs. Dev ids are fixed before filtering and train pairs fill
# up in one seeded order, so the larger file has the same dev set and holds every pair of the smaller one.
if [ ! -f "$OUT/pairs.done" ]; then
    for spec in "1200 $PAIRS_OLD" "2600 $PAIRS_BIG"; do
        read -r limit file <<< "$spec"
        $PY "$CODE/01_build_pairs.py" --source alpaca --lang zh --limit "$limit" --dev-size 200 --max-tokens 256 \
            --tokenizer "$BASE" --out "$file" >> "$OUT/pairs.log" 2>&1
    done
    want_train=$(awk '$2 == "pairs_zh.jsonl" {print $1}' "$REPL_SHA")
    want_dev=$(awk '$2 == "pairs_zh.dev.jsonl" {print $1}' "$REPL_SHA")
    got_old=$(sha256sum < "$PAIRS_OLD" | cut -c1-64)
    for dev in "$DEV" "${PAIRS_OLD%.jsonl}.dev.jsonl"; do
        [ "$(sha256sum < "$dev" | cut -c1-64)" = "$want_dev" ] ||
            { stamp "$dev is not the replication's dev set: stop"; exit 1; }
    done
    [ "$got_old" = "$want_train" ] || { stamp "$PAIRS_OLD is not the replication's train file: stop"; exit 1; }
    missing=$(comm -23 <(cut -d, -f1 "$PAIRS_OLD" | sort) <(cut -d, -f1 "$PAIRS_BIG" | sort) | wc -l)
    [ "$missing" = 0 ] || { stamp "$missing pairs of $PAIRS_OLD are not in $PAIRS_BIG: stop"; exit 1; }
    cp "$OUT/pairs_zh.stats.json" "$OUT/pairs.log" "$RES/"
    sha256sum "$PAIRS_BIG" "$DEV" "$PAIRS_OLD" | sed "s|$OUT/||" > "$RES/pairs.sha256"
    touch "$OUT/pairs.done"
    commit_paths "results/gemma3/ablations: pairs (2,406 train holding the replication's 1,006; its dev set)" \
        "$RES/pairs_zh.stats.json" "$RES/pairs.log" "$RES/pairs.sha256"
fi

refresh_tables() {  # tables and figures from what has finished (one writer at a time)
    ( flock 9
      $PY scripts/ablation_tables.py --out "$RES" > /dev/null 2> "$OUT/tables.err" ||
          stamp "tables failed (see $OUT/tables.err)"
    ) 9> "$OUT/.tables.lock"
}

evaluate() {  # evaluate NAME MODEL: the primary measures, one 03 call per task, each skipped once done
    local name=$1 model=$2 part
    for part in "nll --langs zh,en --pairs $DEV --limit 200" "xnli --langs zh --limit 1000" \
                "xcopa --langs zh --limit 500" "xstorycloze --langs zh --limit 1000" "mmlu --langs zh --limit 1000"; do
        local task=${part%% *}
        [ -f "$OUT/eval/$name.$task.done" ] && continue
        stamp "eval $name: $task"
        # shellcheck disable=SC2086  # $part holds the task's flags
        retry 3 $PY "$CODE/03_evaluate.py" --model "$model" --run-name "$name" --out "$OUT/eval" \
            --dtype "$EVAL_DTYPE" --batch-size 16 --tasks $part >> "$OUT/eval/$name.log" 2>&1 || return 1
        touch "$OUT/eval/$name.$task.done"
    done
}

publish_eval() {  # run JSON + gzipped per-item files into $RES/eval, tables, commit
    local name=$1 f
    cp "$OUT/eval/$name.json" "$RES/eval/"
    for f in "$OUT/eval/$name".*.jsonl; do gzip -nc "$f" > "$RES/eval/$(basename "$f").gz"; done
    tr '\r' '\n' < "$OUT/eval/$name.log" | grep -v "it/s\]\|s/it\]\|^\s*$" > "$RES/eval/$name.log" || true
    refresh_tables
    commit_paths "results/gemma3/ablations: evaluation of $name (primary measures)" "$RES"
}

next_to_evaluate() {  # the first trained run in priority order whose evaluation has not finished (or failed);
    # `next_to_evaluate claim`: the first such run no other queue has claimed, claimed for this one (mkdir is atomic)
    local claim=${1:-} line name
    for line in "${RUNS[@]}"; do
        name=${line%% *}
        [ -f "$OUT/eval/$name.published" ] || [ -f "$OUT/eval/$name.evalfailed" ] && continue
        [ -f "$OUT/$name.trained" ] || continue
        [ -z "$claim" ] || mkdir "$OUT/eval/$name.claimed" 2> /dev/null || continue
        echo "$name"; return 0
    done
    return 0  # none: empty output (set -e must not stop the caller)
}

eval_queue() {  # eval_queue K: queue 0 evaluates and checks base first; the others wait for its check (stop)
    local k=$1
    if (( k > 0 )); then
        while [ "$BASE_MISMATCH" = stop ] && [ ! -f "$OUT/eval/base.checked" ]; do
            kill -0 "${QUEUES[0]}" 2> /dev/null || return 0   # base failed or differs (stop): evaluate nothing
            sleep 30
        done
    elif [ ! -f "$OUT/eval/base.checked" ]; then
        evaluate base "$BASE" || { stamp "eval base FAILED (see $OUT/eval/base.log)"; return 1; }
        for f in "$OUT/eval/base".*.jsonl; do gzip -nc "$f" > "$RES/eval/$(basename "$f").gz"; done
        cp "$OUT/eval/base.json" "$RES/eval/"
        if $PY scripts/ablation_tables.py --check-base "$OUT/eval" --out "$RES" > "$OUT/base_check.log" 2>&1; then
            touch "$OUT/eval/base.checked"
            commit_paths "results/gemma3/ablations: base re-evaluated, equal to the replication's per-item files" "$RES"
        elif [ "$BASE_MISMATCH" = continue ]; then
            touch "$OUT/eval/base.checked"   # under continue, base is read beside the runs, not before them
            commit_paths "results/gemma3/ablations: base re-evaluated on another CPU, NOT equal to the replication's files" "$RES"
            stamp "base differs from the replication's files ($RES/base_check.md); BASE_MISMATCH=continue: runs are evaluated"
        else
            commit_paths "results/gemma3/ablations: base re-evaluated, NOT equal to the replication's files" "$RES"
            stamp "base differs from the replication's files ($RES/base_check.md): no run is evaluated" \
                "(BASE_MISMATCH=continue evaluates them anyway; results/README.md, ablations, Amendment 3)"; return 1
        fi
    fi
    local next
    while :; do   # stop when nothing more can come
        next=$(next_to_evaluate claim)
        if [ -z "$next" ]; then
            [ -f "$OUT/training.finished" ] && [ -z "$(next_to_evaluate)" ] && break
            sleep 30; continue
        fi
        if evaluate "$next" "$OUT/$next"; then
            publish_eval "$next" && touch "$OUT/eval/$next.published"
        else
            touch "$OUT/eval/$next.evalfailed"; stamp "eval $next FAILED (see $OUT/eval/$next.log)"
        fi
    done
    stamp "evaluation queue $k: done"
}

train() {  # train NAME STEPS big|old FLAGS...: resumes from the last checkpoint after a kill (3 attempts)
    local name=$1 steps=$2 which=$3 seed=${1##*-s}; shift 3
    local pairs; pairs=$([ "$which" = big ] && echo "$PAIRS_BIG" || echo "$PAIRS_OLD")
    [ -f "$OUT/$name.trained" ] && return 0
    one_try() {
        local resume=""
        if [ -d "$OUT/$name/checkpoint" ]; then resume=--resume
        elif [ -d "$OUT/$name" ]; then rm -rf "${OUT:?}/$name"; fi   # killed before its first checkpoint
        stamp "train $name: start${resume:+ (resume from checkpoint)}"
        $PY "$CODE/02_train_dft.py" --pairs "$pairs" --out "$OUT/$name" --model "$BASE" "$@" \
            --max-steps "$steps" --batch-size 8 --max-length 256 --lr 2e-5 --seed "$seed" \
            --eval-pairs "$DEV" --eval-every 20 --eval-limit 64 --ce-chunk 256 --save-every 20 --log-every 10 \
            "${MIXED[@]}" "${LENS[@]}" $resume >> "$OUT/$name.train.log" 2>&1
    }
    if retry 3 one_try "$@"; then
        rm -rf "${OUT:?}/$name/checkpoint"
        mkdir -p "$RES/train/$name"
        cp "$OUT/$name/train_config.json" "$RES/train/$name/"
        gzip -nc "$OUT/$name/train_log.jsonl" > "$RES/train/$name/train_log.jsonl.gz"  # results/ keeps .jsonl gzipped
        touch "$OUT/$name.trained"
        stamp "train $name: done ($(tail -1 "$OUT/$name/train_log.jsonl" | cut -c1-160))"
        refresh_tables
        commit_paths "results/gemma3/ablations: training log of $name" "$RES"
    else
        touch "$OUT/$name.failed"; stamp "train $name: FAILED (see $OUT/$name.train.log)"
    fi
}

training_now() {  # a run claimed by a lane of this driver and neither trained nor failed
    local line name
    for line in "${RUNS[@]}"; do
        name=${line%% *}
        [ -d "$OUT/$name.claimed" ] && [ ! -f "$OUT/$name.trained" ] && [ ! -f "$OUT/$name.failed" ] && return 0
    done
    return 1
}

queues_alive() {
    local q
    for q in "${QUEUES[@]}"; do kill -0 "$q" 2> /dev/null && return 0; done
    return 1
}

lane() {  # lane K: claim runs in priority order (mkdir is atomic) until none is left
    local k=$1 line name steps which flags
    for line in "${RUNS[@]}"; do
        read -r name steps which flags <<< "$line"
        [ -z "$ONLY" ] || [[ " $ONLY " == *" $name "* ]] || continue
        [ -f "$OUT/$name.trained" ] || [ -d "$OUT/$name.claimed" ] && continue
        # (not once the evaluation queues have stopped, e.g. on a failed base check: nothing would clear the wait)
        while queues_alive && [ -n "$(next_to_evaluate)" ] && { (( k > 0 )) || training_now; }; do
            sleep 30
        done
        mkdir "$OUT/$name.claimed" 2> /dev/null || continue
        # shellcheck disable=SC2086
        train "$name" "$steps" "$which" $flags
    done
}

stamp "== $LANES training lane(s) and $EVAL_QUEUES evaluation queue(s)"
rm -f "$OUT"/*.failed "$OUT"/eval/*.evalfailed "$OUT/training.finished"   # a rerun tries failed parts again
QUEUES=()
for (( k = 0; k < EVAL_QUEUES; k++ )); do eval_queue "$k" & QUEUES+=($!); done
LANE_PIDS=()
for (( k = 0; k < LANES; k++ )); do lane "$k" & LANE_PIDS+=($!); sleep 5; done
wait "${LANE_PIDS[@]}" || true
touch "$OUT/training.finished"
stamp "trainings: done; waiting for the evaluation queue"
wait "${QUEUES[@]}" || true
refresh_tables
commit_paths "results/gemma3/ablations: tables and figures" "$RES"
stamp "done: $RES/tables.md"
