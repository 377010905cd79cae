#!/usr/bin/env bash
# Fetch what benchmarks/device_suite.sh needs on a GPU machine that has torch, transformers, peft,
# accelerate, pyarrow and pandas but no network and no TRL: TRL and the parts of `datasets` it
# lacks, as wheels in .whl/ (ignored by git). Then name .whl in the device run's `carry`:
# device_suite.sh installs them into its output folder and puts that on PYTHONPATH.
#
#   bash benchmarks/device_wheels.sh                 # wheels for Python 3.12 (the lent H200's)
#   PYVER=3.11 bash benchmarks/device_wheels.sh      # for another Python (multiprocess is per version)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
WHEELS=${WHEELS:-.whl}
mkdir -p "$WHEELS"
# the versions this project's benchmarks ran TRL with (docs/benchmarks.md); --no-deps: the
# machine has the rest, and two versions of one package would stop the install
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
if [[ "$WHEELS" == .whl ]]; then
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi
ls -l "$WHEELS"
