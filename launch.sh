#!/usr/bin/env bash
# Set up the environment when it is missing, then train/evaluate or run the tests.
#
#   bash launch.sh --config configs/quickstart.yaml [--eval] [--resume X] [--opts k=v ...]
#   bash launch.sh --test [pytest arguments]
#
# Environment: NPROC_PER_NODE (default: GPUs, else 2 CPU processes), PYTHON (python3.11),
# DETR_SPARSE_VENV (virtualenv folder, default .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")"

VENV="${DETR_SPARSE_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

ensure_env() {
    # the copy of requirements.txt inside the venv says what it was built from
    if [ -x "$VENV/bin/python" ] && cmp -s requirements.txt "$VENV/requirements.txt"; then
        return
    fi
    echo "launch.sh: creating the environment in $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r requirements.txt
    cp requirements.txt "$VENV/requirements.txt"
}

ensure_env
PY="$VENV/bin/python"

if [ "${1:-}" = "--test" ]; then
    shift
    exec "$PY" -m pytest tests "$@"
fi

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
CORES=$(nproc)
# one process per core slice: oversubscribed threads make CPU training slower, not faster
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1 ))}"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE" main.py "$@"
