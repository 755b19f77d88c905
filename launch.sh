#!/usr/bin/env bash
# Set up the environment when it is missing, then train/evaluate under torchrun, or run the tests.
#
#   bash launch.sh --config configs/quickstart.yaml [--eval] [--resume X] [--opts k=v ...]
#   bash launch.sh --test [pytest arguments]
#   bash launch.sh --setup            # only create the environment (once, before a multi-node job)
#
# Processes and nodes come from the environment:
#   NPROC_PER_NODE  processes on this node (default: its GPUs, else 2 CPU processes)
#   NNODES          nodes, or MIN:MAX for an elastic job (default 1: a standalone run)
#   NODE_RANK       this node's rank (optional with c10d rendezvous, which assigns ranks itself)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous (default MASTER_ADDR:MASTER_PORT)
#   RDZV_ID         job id shared by every node (default detr_sparse)
#   MAX_RESTARTS    times torchrun restarts the whole group after a worker fails (default 0)
# Under SLURM (one launch.sh task per node: `srun --ntasks-per-node 1 bash launch.sh ...`)
# they default to SLURM_NNODES, SLURM_NODEID, the first host of the allocation and
# SLURM_JOB_ID. `--max-restarts N` on the command line overrides MAX_RESTARTS.
# Also: PYTHON (python3.11), DETR_SPARSE_VENV (virtualenv folder, default .venv),
# DETECTRON2=1 (install detectron2 too: from the wheel DETECTRON2_WHEEL, else from source).
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

ensure_detectron2() {
    # optional: DETECTRON2=1 installs detectron2 into the environment when it is missing, from
    # DETECTRON2_WHEEL (a wheel file) when given, else from its source repository
    [ "${DETECTRON2:-0}" = 1 ] || return 0
    "$VENV/bin/python" -c "import detectron2" 2>/dev/null && return 0
    echo "launch.sh: installing detectron2 into $VENV" >&2
    # detectron2's model zoo imports pkg_resources, which setuptools 81 removed
    if [ -n "${DETECTRON2_WHEEL:-}" ]; then
        "$VENV/bin/python" -m pip install --quiet "$DETECTRON2_WHEEL" "setuptools<81"
    else
        "$VENV/bin/python" -m pip install --quiet "setuptools<81"
        "$VENV/bin/python" -m pip install --quiet --no-build-isolation \
            "git+https://github.com/facebookresearch/detectron2.git"
    fi
}

ensure_env
ensure_detectron2
PY="$VENV/bin/python"

if [ "${1:-}" = "--test" ]; then
    shift
    exec "$PY" -m pytest tests "$@"
fi

if [ "${1:-}" = "--setup" ]; then
    exit 0
fi

if [ "${1:-}" = "--max-restarts" ]; then
    MAX_RESTARTS="$2"
    shift 2
fi

if [ -n "${SLURM_JOB_ID:-}" ]; then
    NNODES="${NNODES:-${SLURM_NNODES:-1}}"
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
    RDZV_ID="${RDZV_ID:-$SLURM_JOB_ID}"
    if [ -z "${RDZV_ENDPOINT:-}" ] && [ -z "${MASTER_ADDR:-}" ]; then
        RDZV_ENDPOINT="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):${MASTER_PORT:-29500}"
    fi
fi
NNODES="${NNODES:-1}"
if [ -z "${RDZV_ENDPOINT:-}" ] && [ -n "${MASTER_ADDR:-}" ]; then
    RDZV_ENDPOINT="$MASTER_ADDR:${MASTER_PORT:-29500}"
fi

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
CORES=$(nproc)
# one process per core slice: oversubscribed threads make CPU training slower, not faster
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1 ))}"

# after a failure torchrun restarts the workers; with the rendezvous store shared with them
# (the default), the restarted workers read the dead ones' addresses and cannot connect
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

RUN=(--nproc-per-node "$NPROC_PER_NODE" --max-restarts "${MAX_RESTARTS:-0}")
if [ "$NNODES" = 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
    RUN+=(--standalone)
else
    if [ -z "${RDZV_ENDPOINT:-}" ]; then
        echo "launch.sh: NNODES=$NNODES needs RDZV_ENDPOINT (or MASTER_ADDR) naming the rendezvous host:port" >&2
        exit 2
    fi
    RUN+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
          --rdzv-id "${RDZV_ID:-detr_sparse}")
    if [ -n "${NODE_RANK:-}" ]; then
        RUN+=(--node-rank "$NODE_RANK")
    fi
fi
# torchrun runs as a child so that a run's error (a bad checkpoint, a config key, an output
# folder in use) can end the console output as one line after torchrun's failure report;
# signals to launch.sh go on to torchrun, which stops its workers
DETR_SPARSE_ERROR_FILE="$(mktemp "${TMPDIR:-/tmp}/detr_sparse_error.XXXXXX")"
export DETR_SPARSE_ERROR_FILE
"$PY" -m torch.distributed.run "${RUN[@]}" main.py "$@" &
AGENT=$!
trap 'kill -TERM "$AGENT" 2>/dev/null' TERM INT HUP
RC=0
while true; do
    wait "$AGENT" && RC=0 || RC=$?
    kill -0 "$AGENT" 2>/dev/null || break  # wait returned for a signal, not torchrun's end
done
if [ "$RC" != 0 ] && [ -s "$DETR_SPARSE_ERROR_FILE" ]; then
    awk '!seen[$0]++' "$DETR_SPARSE_ERROR_FILE" >&2  # every rank says it: once is enough
fi
rm -f "$DETR_SPARSE_ERROR_FILE"
exit "$RC"
