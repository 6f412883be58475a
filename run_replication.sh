#!/usr/bin/env bash
# The replication studies, DFT vs TFT on 2 CPU cores (results/README.md): one study file per preset, run by
# scripts/run_study.py (pairs, trainings, evaluations; a rerun skips every finished part), then its tables.
#
#   bash run_replication.sh                    # Gemma-3-270M, the main replication: studies/gemma3.toml
#   PRESET=smollm2 bash run_replication.sh     # SmolLM2-135M-Instruct, one seed: studies/smollm2.toml
#   PRESET=gemma3_ablations bash run_replication.sh   # the ablations: studies/gemma3_ablations.toml
#   bash run_replication.sh --dry-run          # the plan only, as DRY_RUN=1 (run_study.py's flags pass through)
#
# Sizes, flags and seeds are the study file's; its results folder already holds every finished run.
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${PRESET:-gemma3}
case "$PRESET" in gemma3|smollm2|gemma3_ablations) ;;
  *) echo "PRESET must be gemma3, smollm2 or gemma3_ablations, not $PRESET" >&2; exit 2;; esac
PY=${PY:-.venv/bin/python}
case "${DRY_RUN:-0}" in 1|true|yes) set -- "$@" --dry-run;; 0|false|no|"") ;;  # as run_paper.sh's DRY_RUN=1
  *) echo "DRY_RUN=$DRY_RUN: set DRY_RUN=1 for the plan only, or leave it unset" >&2; exit 2;; esac
"$PY" scripts/run_study.py "studies/$PRESET.toml" "$@"
case " $* " in *" --dry-run "*) exit 0;; esac
"$PY" scripts/study_tables.py "studies/$PRESET.toml" | tail -n 1   # wrote RESULTS/FILE.md and .json
