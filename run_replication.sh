#!/usr/bin/env bash
# The replication matrix, DFT vs TFT on 2 CPU cores (results/README.md): one linear script per preset.
#
#   bash run_replication.sh                    # Gemma-3-270M, the main replication: scripts/replication_gemma3.sh
#   PRESET=smollm2 bash run_replication.sh     # SmolLM2-135M-Instruct, one seed: scripts/replication_smollm2.sh
#
# Both resume: rerun the same command and every finished part is skipped. Sizes are environment variables
# (see each script's head).
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${PRESET:-gemma3}
case "$PRESET" in gemma3|smollm2) ;; *) echo "PRESET must be gemma3 or smollm2, not $PRESET" >&2; exit 2;; esac
exec bash "scripts/replication_$PRESET.sh"
