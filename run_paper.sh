#!/usr/bin/env bash
# The paper's tables in one command (docs/SCALING.md, "The paper's tables in one command"):
#   0. the plan: runs, tokens per run, GPU-hours, disk (scripts/paper_plan.py); bad input stops here, nothing written;
#      it writes the study file OUT/paper.toml (studies/README.md; studies/paper.toml is the default matrix's)
#   1-3. scripts/run_study.py OUT/paper.toml: pairs per language (zh / vi shipped, the others machine-translated),
#      sft once on English, tft and each DFT method once per language (accelerate launch, FSDP2 over NPROC GPUs),
#      base and every model on its own language's cells of the paper's suite (base and sft: every language's)
#   4. scripts/study_tables.py OUT/paper.toml: OUT/tables.md and OUT/tables.json, ours beside the paper's numbers
# Examples:
#   bash run_paper.sh                                   # LLaMA-2-7B, zh vi ar, sft tft dft-logits dft-feature
#   MODEL=google/gemma-2-2b LANGS="zh vi" NPROC=8 OUT=runs/paper_gemma bash run_paper.sh
#   DRY_RUN=1 bash run_paper.sh                         # the plan and what would block a real run; writes nothing
#   TINY=1 bash run_paper.sh                            # the whole matrix with tiny random models (minutes)
#   TINY=1 TINY_DEVICE=cpu bash run_paper.sh            # TINY_DEVICE: where TINY runs (default cuda if a GPU is seen)
# Re-running skips every finished part (OUT/done/<part>; one made with other settings stops it: use a new OUT) and
# resumes an interrupted training from its checkpoint; each part logs to OUT/logs/<part>.log. Settings are environment
# variables (below); under TINY=1 a typed LANGS or METHODS is honoured (TINY_LANGS / TINY_METHODS set TINY's defaults).
set -euo pipefail
cd "$(dirname "$0")"
TINY=${TINY:-0}
case "${DRY_RUN:-0}" in 1|true|yes) DRY_RUN=1;; 0|false|no|"") DRY_RUN=0;;
  *) echo "DRY_RUN=$DRY_RUN: set DRY_RUN=1 for the plan only, or leave it unset" >&2; exit 2;; esac
TYPED=$(for v in MODEL LC_LAYER ET_LAYER STEPS LIMIT PAIRS_LIMIT NPROC BOOTSTRAP SAVE_EVERY MT_MODEL; do
          [ -n "${!v:-}" ] && printf ' %s' "$v"; done || true)  # what TINY=1 replaces by its own sizes
if [ -z "${PY:-}" ]; then             # PY: a Python used as it is (no set-up), as scripts/gpu_smoke.sh takes it
  [ "$DRY_RUN" = 1 ] && [ -x .venv/bin/python ] || bash setup.sh  # a dry run needs no set-up when .venv exists
  PY=.venv/bin/python
fi
OUT=${OUT:-$([ "$TINY" = 1 ] && echo runs/paper_tiny || echo runs/paper)}
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}  # google/gemma-2-2b uses its preset; any other model needs LC_LAYER / ET_LAYER
LANGS=${LANGS:-$([ "$TINY" = 1 ] && echo "${TINY_LANGS:-zh ar}" || echo "zh vi ar")}
METHODS=${METHODS:-$([ "$TINY" = 1 ] && echo "${TINY_METHODS:-sft tft dft-logits dft-feature mid-align}" ||
                     echo "sft tft dft-logits dft-feature")}  # mid-align may be added
MT_MODEL=${MT_MODEL:-facebook/nllb-200-distilled-600M}  # for languages without shipped pairs (Arabic)
SAVE_EVERY=${SAVE_EVERY:-200}          # checkpoint every N optimizer steps, so an interrupted training resumes
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-0}  # 0: delete a run's checkpoint once its final model is saved (16 B/parameter)
BOOTSTRAP=${BOOTSTRAP:-2000}           # resamples per DFT - TFT interval
if [ "$TINY" = 1 ]; then               # every stage of the GPU path, in minutes (on TINY_DEVICE): sizes that only wire it
  MODEL=$OUT/tiny_models/lm MT_MODEL=$OUT/tiny_models/mt
  LC_LAYER=1 ET_LAYER=3 STEPS=2 LIMIT=2 PAIRS_LIMIT=24 NPROC=1 BOOTSTRAP=200 SAVE_EVERY=1
  TINY_DEVICE=${TINY_DEVICE:-$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
  [ -z "$TYPED" ] || echo "   TINY=1 uses its own sizes, not the typed$TYPED (it honours LANGS and METHODS)"
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
csv() { echo "$*" | tr ' ' ','; }

echo "== 0/4 the plan (bad input stops here, before anything is written)"
PLAN_ARGS=(--model "$MODEL" --langs "$(csv $LANGS)" --methods "$(csv $METHODS)" --out "$OUT" --mt-model "$MT_MODEL"
           --save-every "$SAVE_EVERY" --bootstrap "$BOOTSTRAP")
[ -n "${NPROC:-}" ] && PLAN_ARGS+=(--nproc "$NPROC")
[ -n "${LC_LAYER:-}" ] && PLAN_ARGS+=(--lc-layer "$LC_LAYER")
[ -n "${ET_LAYER:-}" ] && PLAN_ARGS+=(--et-layer "$ET_LAYER")
[ -n "${STEPS:-}" ] && PLAN_ARGS+=(--steps "$STEPS")
[ -n "${LIMIT:-}" ] && PLAN_ARGS+=(--limit "$LIMIT")
[ -n "${PAIRS_LIMIT:-}" ] && PLAN_ARGS+=(--pairs-limit "$PAIRS_LIMIT")
[ -n "${SFT_LANG:-}" ] && PLAN_ARGS+=(--sft-lang "$SFT_LANG")
[ -n "${TOKENS_PER_S:-}" ] && PLAN_ARGS+=(--tokens-per-s "$TOKENS_PER_S")
case "$KEEP_CHECKPOINTS" in 1|true|yes) PLAN_ARGS+=(--keep-checkpoints);; 0|false|no) ;;
  *) echo "KEEP_CHECKPOINTS=$KEEP_CHECKPOINTS: use 1 or 0" >&2; exit 2;; esac
[ "$TINY" = 1 ] && PLAN_ARGS+=(--tiny --tiny-device "$TINY_DEVICE") && echo "   TINY on $TINY_DEVICE"
for lang in zh vi ar; do            # PAIRS_<lang>=FILE: pairs built elsewhere (e.g. 01 --source hub) for that language
  var=PAIRS_$lang; [ -n "${!var:-}" ] && PLAN_ARGS+=(--pairs-file "$lang=${!var}")
done
if [ "$DRY_RUN" = 1 ]; then
  exec "$PY" scripts/paper_plan.py "${PLAN_ARGS[@]}" --dry-run
fi
"$PY" scripts/paper_plan.py "${PLAN_ARGS[@]}"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 0 ] && [ "$TINY" != 1 ] && [ -z "${TOKENS_PER_S:-}" ] && [ ! -e "$OUT/timing/bench_train.json" ]; then
  # the plan's throughput from 10 timed steps on the first GPU, instead of results/gpu_smoke's 1.1B figures
  mkdir -p "$OUT/logs"
  CUDA_VISIBLE_DEVICES=0 "$PY" bench_train.py --model "$MODEL" --device cuda --dtype bfloat16 --precisions bf16 \
      --batch-size 4 --max-length 512 --lc-layer "${LC_LAYER:-2}" --et-layer "${ET_LAYER:-15}" --repeats 10 \
      --methods tft,dft-logits,dft-feature --skip-memory --grad-checkpointing --out "$OUT/timing" > "$OUT/logs/timing.log"
  "$PY" scripts/paper_plan.py "${PLAN_ARGS[@]}" --timing "$OUT/timing/bench_train.json"
fi

echo "== 1-3/4 pairs, training, evaluation ($LANGS; scripts/run_study.py $OUT/paper.toml)"
"$PY" scripts/run_study.py "$OUT/paper.toml"
echo "== 4/4 the tables"
"$PY" scripts/study_tables.py "$OUT/paper.toml" > "$OUT/logs/tables.log"
echo "tables: $OUT/tables.md, $OUT/tables.json"
