#!/usr/bin/env bash
# The paper's tables in one command (docs/SCALING.md, "The paper's tables in one command"):
#   0. the plan: runs, tokens per run, GPU-hours, disk (scripts/paper_plan.py); bad input stops here, nothing written
#   1. pairs per language: zh / vi from the shipped Alpaca files, the others machine-translated (01 --translate-model)
#   2. training: sft once on English, tft and each DFT method once per language, through accelerate launch
#   3. evaluation: base and every model on its own language's cells of the paper's suite (base and sft: every
#      language's), translation en<->tgt, MGSM zh (ours)
#   4. the tables beside the paper's numbers: OUT/paper_tables.md and OUT/paper_tables.json (scripts/paper_tables.py)
# Examples:
#   bash run_paper.sh                                   # LLaMA-2-7B, zh vi ar, sft tft dft-logits dft-feature
#   MODEL=google/gemma-2-2b LANGS="zh vi" NPROC=8 OUT=runs/paper_gemma bash run_paper.sh
#   DRY_RUN=1 bash run_paper.sh                         # the plan and what would block a real run; writes nothing
#   TINY=1 bash run_paper.sh                            # the whole matrix on CPU with tiny random models (minutes)
#   TINY=1 TINY_DEVICE=cpu bash run_paper.sh            # TINY_DEVICE: where TINY runs (default cuda if a GPU is seen)
# Re-running skips every finished part (OUT/done/<part>) and resumes an interrupted training from its checkpoint;
# each part logs to OUT/logs/<part>.log. Settings are environment variables (below).
set -euo pipefail
cd "$(dirname "$0")"
TINY=${TINY:-0}
DRY_RUN=${DRY_RUN:-0}
if [ -z "${PY:-}" ]; then             # PY: a Python used as it is (no set-up), as scripts/gpu_smoke.sh takes it
  [ "$DRY_RUN" = 1 ] && [ -x .venv/bin/python ] || bash setup.sh  # a dry run needs no set-up when .venv exists
  PY=.venv/bin/python
fi
OUT=${OUT:-$([ "$TINY" = 1 ] && echo runs/paper_tiny || echo runs/paper)}
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}  # google/gemma-2-2b uses its preset; any other model needs LC_LAYER / ET_LAYER
LANGS=${LANGS:-zh vi ar}
METHODS=${METHODS:-sft tft dft-logits dft-feature}  # mid-align may be added
MT_MODEL=${MT_MODEL:-facebook/nllb-200-distilled-600M}  # for languages without shipped pairs (Arabic)
SAVE_EVERY=${SAVE_EVERY:-200}          # checkpoint every N optimizer steps, so an interrupted training resumes
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-0}  # 0: delete a run's checkpoint once its final model is saved (16 B/parameter)
BOOTSTRAP=${BOOTSTRAP:-2000}           # resamples per DFT - TFT interval
TRAIN_FLAGS=()                         # extra 02_train_dft.py flags
EVAL_FLAGS=()                          # extra 03_evaluate.py flags
PAIR_FLAGS=()                          # extra 01_build_pairs.py flags
MT_FLAGS=()                            # extra 01 flags of the machine-translation route
if [ "$TINY" = 1 ]; then               # every stage of the GPU path in minutes (CPU, or TINY_DEVICE): sizes that only wire it
  MODEL=$OUT/tiny_models/lm MT_MODEL=$OUT/tiny_models/mt
  LANGS=${TINY_LANGS:-zh ar} METHODS=${TINY_METHODS:-sft tft dft-logits dft-feature mid-align}
  LC_LAYER=1 ET_LAYER=3 STEPS=2 LIMIT=2 PAIRS_LIMIT=24 NPROC=1 BOOTSTRAP=200 SAVE_EVERY=1
  TRAIN_FLAGS=(--batch-size 2 --max-length 256 --lr 1e-2 --warmup-ratio 0 --log-every 1)
  EVAL_FLAGS=(--max-new-tokens 4 --batch-size 4 --dtype float32)  # --device TINY_DEVICE: below, once GPUS is known
  PAIR_FLAGS=(--dev-size 4)
  MT_FLAGS=(--translate-max-length 8 --min-ratio 0 --max-ratio 1e9 --align-min-agreement 0)
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
csv() { echo "$*" | tr ' ' ','; }

echo "== 0/4 the plan (bad input stops here, before anything is written)"
PLAN_ARGS=(--model "$MODEL" --langs "$(csv $LANGS)" --methods "$(csv $METHODS)" --out "$OUT" --mt-model "$MT_MODEL")
[ -n "${NPROC:-}" ] && PLAN_ARGS+=(--nproc "$NPROC")
[ -n "${LC_LAYER:-}" ] && PLAN_ARGS+=(--lc-layer "$LC_LAYER")
[ -n "${ET_LAYER:-}" ] && PLAN_ARGS+=(--et-layer "$ET_LAYER")
[ -n "${STEPS:-}" ] && PLAN_ARGS+=(--steps "$STEPS")
[ -n "${LIMIT:-}" ] && PLAN_ARGS+=(--limit "$LIMIT")
[ -n "${PAIRS_LIMIT:-}" ] && PLAN_ARGS+=(--pairs-limit "$PAIRS_LIMIT")
[ -n "${SFT_LANG:-}" ] && PLAN_ARGS+=(--sft-lang "$SFT_LANG")
[ -n "${TOKENS_PER_S:-}" ] && PLAN_ARGS+=(--tokens-per-s "$TOKENS_PER_S")
[ "$TINY" = 1 ] && PLAN_ARGS+=(--tiny)
for lang in zh vi ar; do            # PAIRS_<lang>=FILE: pairs built elsewhere (e.g. 01 --source hub) for that language
  var=PAIRS_$lang; [ -n "${!var:-}" ] && PLAN_ARGS+=(--pairs-file "$lang=${!var}")
done
if [ "$DRY_RUN" = 1 ]; then
  exec "$PY" scripts/paper_plan.py "${PLAN_ARGS[@]}" --dry-run
fi
"$PY" scripts/paper_plan.py "${PLAN_ARGS[@]}"
source "$OUT/plan.env"  # PLAN_PRESET, PLAN_NPROC, PLAN_FSDP_CONFIG, PLAN_SFT_LANG, PLAN_ROUTE_*, PLAN_PAIRS_*
mkdir -p "$OUT/logs" "$OUT/done"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$TINY" = 1 ]; then               # TINY_DEVICE (cpu or cuda) runs every stage: pairs' MT, training, evaluation
  TINY_DEVICE=${TINY_DEVICE:-$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)}
  EVAL_FLAGS+=(--device "$TINY_DEVICE") MT_FLAGS+=(--device "$TINY_DEVICE")
  [ "$TINY_DEVICE" = cpu ] && GPUS=0   # training launches on the CPU too
  echo "   TINY on $TINY_DEVICE"
fi

part() {  # name, then the command: skipped when OUT/done/<name> exists; its output goes to OUT/logs/<name>.log
  local name=$1; shift
  if [ -e "$OUT/done/$name" ]; then echo "   $name: finished before, skipped"; return 0; fi
  local t0=$SECONDS
  if "$@" > "$OUT/logs/$name.log" 2>&1; then
    touch "$OUT/done/$name"; echo "   $name: ok ($((SECONDS - t0)) s, log $OUT/logs/$name.log)"
  else
    echo "error: $name failed; the end of $OUT/logs/$name.log:" >&2; tail -n 20 "$OUT/logs/$name.log" >&2; return 1
  fi
}

if [ "$TINY" = 1 ]; then             # the stand-ins for the real model and NLLB: seeded, so a re-run finds the same
  part tiny_models "$PY" scripts/paper_tiny_models.py "$OUT/tiny_models"
fi
if [ "$GPUS" -gt 0 ] && [ "$TINY" != 1 ] && [ -z "${TOKENS_PER_S:-}" ]; then
  # the plan's throughput from 10 timed steps on the first GPU, instead of results/gpu_smoke's 1.1B figures
  part timing env CUDA_VISIBLE_DEVICES=0 "$PY" bench_train.py --model "$MODEL" --device cuda --dtype bfloat16 \
      --precisions bf16 --batch-size 4 --max-length 512 --lc-layer "${LC_LAYER:-2}" --et-layer "${ET_LAYER:-15}" \
      --repeats 10 --methods tft,dft-logits,dft-feature --skip-memory --grad-checkpointing --out "$OUT/timing"
  "$PY" scripts/paper_plan.py "${PLAN_ARGS[@]}" --timing "$OUT/timing/bench_train.json"
fi

echo "== 1/4 pairs ($LANGS)"
for lang in $LANGS; do
  route=PLAN_ROUTE_$lang; pairs=PLAN_PAIRS_$lang
  case ${!route} in
    shipped) part "pairs_$lang" "$PY" 01_build_pairs.py --source alpaca --lang "$lang" --out "${!pairs}" \
                 ${PAIRS_LIMIT:+--limit "$PAIRS_LIMIT"} "${PAIR_FLAGS[@]}" ;;
    mt)      part "pairs_$lang" "$PY" 01_build_pairs.py --source alpaca --lang "$lang" --out "${!pairs}" \
                 --translate-model "$MT_MODEL" ${PAIRS_LIMIT:+--limit "$PAIRS_LIMIT"} "${PAIR_FLAGS[@]}" \
                 "${MT_FLAGS[@]}" ;;
    file)    echo "   pairs_$lang: the given file ${!pairs}" ;;
  esac
done

echo "== 2/4 training (${PLAN_PRESET:-no preset}, $PLAN_NPROC process(es))"
if [ "$PLAN_NPROC" -gt 1 ]; then     # FSDP2 over the GPUs, wrapping the model's own decoder layer (plan: fsdp.yaml)
  LAUNCH=("$PY" -m accelerate.commands.launch --config_file "$PLAN_FSDP_CONFIG" --num_processes "$PLAN_NPROC")
elif [ "$GPUS" -gt 0 ]; then
  LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no
          --mixed_precision bf16)
else
  LAUNCH=("$PY" -m accelerate.commands.launch --cpu --num_processes 1 --num_machines 1 --dynamo_backend no
          --mixed_precision no)
fi
train() {  # run name, method, pairs file
  local run=$1 method=$2 pairs=$3 flags=()
  [ -n "$PLAN_PRESET" ] && flags+=(--preset "$PLAN_PRESET")
  case $method in dft-*) [ -n "${LC_LAYER:-}" ] && flags+=(--lc-layer "$LC_LAYER" --et-layer "$ET_LAYER") ;; esac
  [ -n "${STEPS:-}" ] && flags+=(--max-steps "$STEPS")
  [ -d "$OUT/train/$run/checkpoint" ] && [ ! -e "$OUT/done/train_$run" ] && flags+=(--resume)  # an interrupted run
  part "train_$run" "${LAUNCH[@]}" 02_train_dft.py --model "$MODEL" --pairs "$pairs" --out "$OUT/train/$run" \
      --method "$method" --save-every "$SAVE_EVERY" "${flags[@]}" "${TRAIN_FLAGS[@]}"
  [ "$KEEP_CHECKPOINTS" = 1 ] || rm -rf "$OUT/train/$run/checkpoint"
}
sft_pairs=PLAN_PAIRS_$PLAN_SFT_LANG
case " $METHODS " in *" sft "*) train sft sft "${!sft_pairs}" ;; esac  # SFT sees only English: one model for all
for lang in $LANGS; do
  pairs=PLAN_PAIRS_$lang
  for method in $METHODS; do [ "$method" = sft ] || train "$method-$lang" "$method" "${!pairs}"; done
done

# With several GPUs every 03 call is data-parallel (torchrun: the items of each cell sharded over the GPUs by whole
# batches, the same files as one process; docs/EVALUATION.md, "Several processes and the batch size").
if [ "$PLAN_NPROC" -gt 1 ]; then EVAL_PY=("$PY" -m torch.distributed.run --nproc_per_node "$PLAN_NPROC")
else EVAL_PY=("$PY"); fi
echo "== 3/4 evaluation (${LIMIT:+first $LIMIT items per cell, }$PLAN_NPROC process(es) per call)"
suite() {  # the paper's suite restricted to tasks with data in these languages (03 refuses a task with none)
  local tasks=xquad,mlqa,truthfulqa,xnli,mmlu
  case " $* " in *" zh "*|*" ar "*) tasks+=,mkqa ;; esac
  case " $* " in *" zh "*|*" vi "*) tasks+=,xcopa ;; esac
  case " $* " in *" zh "*|*" ar "*) tasks+=,xstorycloze ;; esac
  case " $* " in *" zh "*) tasks+=,mgsm ;; esac          # MGSM zh: ours, not the paper's
  echo "$tasks"
}
evaluate() {  # group, "run names", "models", "languages": the suite + translation (NTREX for zh, Tatoeba else)
  local runs=($2) models=($3) langs=$4 flags=(${LIMIT:+--limit "$LIMIT"} "${EVAL_FLAGS[@]}") tatoeba
  local name="$1_$(echo "${runs[*]}" | tr ' ' '+')"  # the part names its models: a model added later is evaluated
  local common=(--model "${models[@]}" --run-name "${runs[@]}" --out "$OUT/eval" "${flags[@]}")
  tatoeba=$(echo "$langs" | tr ' ' '\n' | grep -v '^zh$' | tr '\n' ' ' || true)
  if [[ " $langs " != *" zh "* ]]; then  # no zh: the suite and Tatoeba in one process
    part "eval_$name" "${EVAL_PY[@]}" 03_evaluate.py "${common[@]}" --tasks "$(suite $langs),translation" \
        --mt-data tatoeba --langs "$(csv $langs)"
  else  # NTREX's references are zh only among our languages: vi and ar then get Tatoeba in a second process
    part "eval_$name" "${EVAL_PY[@]}" 03_evaluate.py "${common[@]}" --tasks "$(suite $langs),translation" \
        --mt-data ntrex --langs "$(csv $langs)"
    [ -z "${tatoeba// }" ] || part "eval_${name}_tatoeba" "${EVAL_PY[@]}" 03_evaluate.py "${common[@]}" \
        --tasks translation --mt-data tatoeba --langs "$(csv $tatoeba)"
  fi
}
# base and sft on every language (one call: the data is read and checked once for both), the others on their own
shared_runs=base shared_models=$MODEL
case " $METHODS " in *" sft "*) shared_runs+=" sft" shared_models+=" $OUT/train/sft" ;; esac
evaluate all "$shared_runs" "$shared_models" "$LANGS"
for lang in $LANGS; do
  runs="" models=""
  for method in $METHODS; do
    [ "$method" = sft ] || { runs+=" $method-$lang"; models+=" $OUT/train/$method-$lang"; }
  done
  [ -z "$runs" ] || evaluate "$lang" "$runs" "$models" "$lang"
done

echo "== 4/4 the tables"
"$PY" scripts/paper_tables.py --out "$OUT" --bootstrap "$BOOTSTRAP" > "$OUT/logs/tables.log"
echo "tables: $OUT/paper_tables.md, $OUT/paper_tables.json"
