#!/usr/bin/env bash
# One-shot accelerator suite: ours vs TRL on a random Qwen2.5-0.5B-shape model, 16 prompts x G=8 x 256
# fixed tokens, LoRA r16, beta 0.04; prints the step table, per-phase roofline and CUDA peak memory.
# Needs only torch/transformers/peft (no network). TRL runs when `import trl` works (carry it
# yourself); otherwise ours runs alone and the output says so.
#
#   bash benchmarks/device_suite.sh            # CUDA, full shape (< 8 minutes on one H100/H200 class GPU)
#   bash benchmarks/device_suite.sh --smoke    # CPU, tiny shape, seconds (tests/test_device_suite.py)
#   PYTHON=.venv/bin/python bash benchmarks/device_suite.sh
#
# Wheels in .whl/ (benchmarks/device_wheels.sh: TRL and what it needs beyond such a machine's
# packages) are installed into $OUT/site first and put on PYTHONPATH; carry .whl to the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-$(mktemp -d)}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$OUT/site" "$WHEELS"/*.whl
    export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "device_suite: installed $(compgen -G "$WHEELS/*.whl" | wc -l) carried wheels into $OUT/site"
fi
if [[ "${1:-}" == "--smoke" ]]; then
    shift
    SHAPE=tiny DEVICE=cpu ARGS=(--prompts 2 --group 2 --tokens 4 --steps 1 --warmup 0 --threads 1 --rate-seconds 0.05 --rate-shapes 1)
else
    SHAPE=qwen2.5-0.5b DEVICE=cuda ARGS=(--prompts 16 --group 8 --tokens 256 --steps 2 --warmup 1)
fi
SYSTEMS=ours
if "$PY" -c "import trl, datasets" 2>/dev/null; then
    SYSTEMS=ours,trl
else
    echo "device_suite: trl (or datasets) is not importable here: running ours alone, no ours/trl ratio"
fi
"$PY" -c "import torch; print('device_suite: torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
"$PY" benchmarks/random_model.py --shape "$SHAPE" --out "$OUT/model" >/dev/null
"$PY" benchmarks/step_throughput.py --model "$OUT/model" --device "$DEVICE" --systems "$SYSTEMS" \
    --out "$OUT/runs" --json "$OUT/steps.json" "${ARGS[@]}" "$@"
echo "device_suite: records in $OUT/steps.json"
