#!/usr/bin/env bash
# Launch megatron_rgm.pretrain with torchrun.
#
#   bash examples/pretrain_rgm.sh                      # tiny preset on this machine (CPU: 2 gloo ranks, TP=2)
#   PRESET=r1-distill-qwen-7b NPROC=8 bash examples/pretrain_rgm.sh --tensor-model-parallel-size 4
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=host0 bash examples/pretrain_rgm.sh ...   # one call per node
#
# Extra arguments are passed through to `python -m megatron_rgm.pretrain` and
# override the preset's defaults.
set -euo pipefail

PRESET=${PRESET:-tiny}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    NPROC=${NPROC:-$GPUS}
    # Megatron's TP/SP overlap relies on in-order kernel launches.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
else
    NPROC=${NPROC:-2}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

PRESET_FLAGS=(--preset "$PRESET")
case "$PRESET" in
    tiny)
        PRESET_FLAGS+=(--tensor-model-parallel-size 2 --micro-batch-size 4 --lr 1e-3 --train-iters 20)
        ;;
esac

echo "megatron-rgm: preset=$PRESET nnodes=$NNODES nproc_per_node=$NPROC"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_rgm.pretrain "${PRESET_FLAGS[@]}" "$@"
