#!/usr/bin/env bash
# Launch RGM training (GRPO + SPR on megatron-core).
#
#   bash examples/pretrain_rgm.sh                      # tiny preset end to end on this machine (CPU: 2 gloo ranks)
#   OUTDIR=runs/tiny-seed1 bash examples/pretrain_rgm.sh --seed 1
#   PRESET=r1-distill-qwen-7b NPROC=8 bash examples/pretrain_rgm.sh \
#       --tensor-model-parallel-size 4 --bf16 --pretrained-checkpoint ckpt/ --tokenizer ckpt/hf_assets \
#       --prompts data/train.jsonl --save runs/7b
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=host0 PRESET=qwq-32b bash examples/pretrain_rgm.sh ...   # one call per node
#
# PRESET=tiny runs the whole method in miniature (python -m megatron_rgm.tasks.pipeline): synthetic task and
# tokenizer, SFT warm start, GRPO + SPR at TP=2, Best-of-N, evaluation table; artefacts under OUTDIR; extra
# arguments go to the pipeline (see --help). Other presets launch torchrun -m megatron_rgm.pretrain with the
# reference hyper-parameters; extra arguments are passed through and override them.
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

if [ "$PRESET" = tiny ]; then
    OUTDIR=${OUTDIR:-runs/tiny-$(date +%Y%m%d-%H%M%S)}
    echo "megatron-rgm: tiny preset end to end, nproc=$NPROC, output under $OUTDIR"
    exec "$PYTHON" -m megatron_rgm.tasks.pipeline --output "$OUTDIR" --nproc "$NPROC" "$@"
fi

# The paper's hyper-parameters: policy lr 1e-6, head lr 1e-5, k=8 at T=0.6, clip 0.2, KL 0.001 (low-var),
# entropy 0.001; the preset sets the response length (8k tokens, 32k for the 32B and MoE policies) and, for
# gpt-oss-20b, T=1.0.
PRESET_FLAGS=(--preset "$PRESET" --lr 1e-6 --sprm-lr 1e-5 --grpo-group-size 8
              --rollout-top-p 0.95 --grpo-clip-low 0.2 --grpo-clip-high 0.2 --grpo-kl-coef 0.001
              --grpo-entropy-coef 0.001 --sprm-backbone-grad-scale 1e-4)

echo "megatron-rgm: preset=$PRESET nnodes=$NNODES nproc_per_node=$NPROC"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_rgm.pretrain "${PRESET_FLAGS[@]}" "$@"
