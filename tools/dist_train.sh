#!/usr/bin/env bash
# Usage: tools/dist_train.sh CONFIG NUM_PROCESSES [train.py args...]
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT environment variables; PYTHON (default: .venv).
# Without CUDA the processes use gloo on the CPU (see tools/train.py).

CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
TOOLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The repository's .venv (tools/install.sh) unless PYTHON says otherwise.
VENV_PYTHON="$(dirname "$TOOLS_DIR")/.venv/bin/python"
[ -x "$VENV_PYTHON" ] || VENV_PYTHON=python
PYTHON=${PYTHON:-$VENV_PYTHON}

PYTHONPATH="$(dirname "$TOOLS_DIR")":$PYTHONPATH \
"$PYTHON" -m torch.distributed.run \
    --nnodes=$NNODES \
    --node_rank=$NODE_RANK \
    --master_addr=$MASTER_ADDR \
    --nproc_per_node=$GPUS \
    --master_port=$PORT \
    "$TOOLS_DIR/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
