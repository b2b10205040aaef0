#!/usr/bin/env bash
# The GPU check of issue 20: the cuda tests, then benchmarks/bench_train.py --device cuda.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; about 3-5 minutes on an H200
#
# For a machine with a CUDA GPU and torch preinstalled, possibly without network, mlflow,
# dvc or optuna. What else it needs (pytest, pydantic, pyyaml;
# hypothesis, which tests/conftest.py imports) it installs from wheels in
# benchmarks/wheels/ (`pip download -d benchmarks/wheels pytest pydantic pyyaml hypothesis` on a
# machine with network, for the GPU machine's Python) when they are missing; without that
# folder it names the missing module and exits 1. Nothing is installed in editable mode:
# src/ goes on PYTHONPATH.
#
# Fashion-MNIST: the four .gz files in data/raw/fashion-mnist/ (params.yaml's data.root,
# about 30 MB, carried with the tree), else $FASHION_MNIST_DIR (linked there), else
# Debian's /usr/share/datasets/fashion-mnist. Exit status: 0 when the tests pass and every
# target is met, non-zero otherwise.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python}"
WHEELS="$REPO/benchmarks/wheels"
SECONDS=0

echo "== GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PYTHON" - <<'PY'
import sys

import torch

print(f"python {sys.version.split()[0]}; torch {torch.__version__}; CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch.cuda.is_available() is False: no CUDA GPU here")
print(f"device 0: {torch.cuda.get_device_name(0)}; {torch.cuda.device_count()} visible")
PY

echo "== Python modules"
missing=()
for module in pytest pydantic yaml hypothesis; do
    if ! "$PYTHON" -c "import $module" >/dev/null 2>&1; then
        missing+=("$module")
    fi
done
if ((${#missing[@]} > 0)); then
    if [[ -d "$WHEELS" ]]; then
        packages=()
        for module in "${missing[@]}"; do
            case "$module" in
                yaml) packages+=(pyyaml) ;;
                *) packages+=("$module") ;;
            esac
        done
        echo "installing ${packages[*]} from $WHEELS (no index)"
        "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${packages[@]}"
    else
        echo "gpu_check.sh: missing Python modules: ${missing[*]}; put their wheels in" \
            "$WHEELS (pip download -d benchmarks/wheels pytest pydantic pyyaml hypothesis)" >&2
        exit 1
    fi
fi
"$PYTHON" -c "import pytest, pydantic, yaml; print('pytest', pytest.__version__, \
'pydantic', pydantic.VERSION, 'pyyaml', yaml.__version__)"

echo "== Fashion-MNIST"
RAW="$REPO/data/raw/fashion-mnist"
if ! compgen -G "$RAW/train-images-idx3-ubyte*" >/dev/null; then
    source_dir="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
    if compgen -G "$source_dir/train-images-idx3-ubyte*" >/dev/null; then
        mkdir -p "$(dirname "$RAW")"
        ln -sfn "$source_dir" "$RAW"
    else
        echo "gpu_check.sh: no Fashion-MNIST: put the four .gz files in $RAW" \
            "or set FASHION_MNIST_DIR" >&2
        exit 1
    fi
fi
ls -l "$RAW/"

export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
# Deterministic cuBLAS (train.deterministic), set before CUDA initializes in the tests.
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"

echo "== cuda tests"
tests=0
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/cuda || tests=$?

echo "== benchmark (bench_train.py --device cuda)"
bench=0
"$PYTHON" benchmarks/bench_train.py --device cuda --epochs 3 || bench=$?

echo "== done in ${SECONDS} s: cuda tests exit ${tests}, benchmark exit ${bench}" \
    "(1: a target missed)"
if ((tests != 0)); then exit "$tests"; fi
exit "$bench"
