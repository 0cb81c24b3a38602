#!/usr/bin/env bash
# GPU check: one prepared script for a machine with one NVIDIA GPU (the device tool's H200), under 9 minutes on a
# bare machine. Sections, each under its own time limit, each with its log under $OUT (default ./gpu_check_out):
#
#   build      megatron_rgm._C with its CUDA kernels, in place (TORCH_CUDA_ARCH_LIST, default 9.0a)
#   tests      tests/test_ops.py, CUDA tests included (kernels against their pure-torch references), and the
#              reference model's offload to host memory
#   train      a GRPO + SPR training step of the deepscaler-1.5b geometry (random weights), bf16: tokens/s, MFU
#   reference  the same step with the KL reference's weights on the GPU vs offloaded to host memory: peak, time
#   packing    the same geometry on a batch of mixed lengths: padded micro-batches vs the token budget, padded
#              and packed (--max-tokens-per-microbatch, --pack-sequences): tokens/s and the ratios
#   generate   the native sampler at that size, 8 prompts x k=8, batched vs one prompt at a time: tokens/s
#   bench_ops  the op benchmark, GB/s against a device-to-device copy of the same bytes
#   logprobs   chunked vs whole-vocabulary log-probs and entropy at [4, 8192] x vocab 152064: peak memory, time
#   cp         context parallelism on CUDA: a training step at CP = 2 (two ranks on the one GPU, over gloo: NCCL
#              takes one rank per GPU) against CP = 1, per parameter (tests/test_context_parallel.py)
#
# Needs torch with CUDA, ninja, pybind11, pytest, transformers, sentencepiece; megatron-core and the other
# wheels the device image lacks travel in .whl/ (see docs/PERFORMANCE.md, "GPU") and are installed under
# /tmp/site first. Transformer Engine is not needed (--transformer-impl local).
#
# Without a GPU the same script is a rehearsal: the CPU extension, the op tests, and the training, sampling and
# log-prob benchmarks at a shrunken size (2 layers, short sequences), so every line of it runs before a device
# is lent. A section that fails is reported in the summary and the script exits 1; the rest still runs.
#
#   OUT=/tmp/out bash tools/gpu_check.sh                      # here: PYTHON=.venv/bin/python
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
summary="$OUT/summary.txt"
: >"$summary"
status=0

if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the device image lacks, carried beside the tree
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >"$OUT/env.txt" 2>&1
    export PYTHONPATH=/tmp/site
fi
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.is_available())"
    "$PY" -c "import megatron.core; print('megatron-core', megatron.core.__version__)" 2>&1 | tail -1
} 2>&1 | tee -a "$OUT/env.txt"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    GPU=1
    export MEGATRON_RGM_REQUIRE_EXT=1 MEGATRON_RGM_EXPECT_CUDA_BUILD=1
    TRAIN=(--preset deepscaler-1.5b --bf16 --tokens 2048 --prompt 256 --step-every 64 --k 8 --groups 1
           --micro-batch-size 2 --repeats "${GPU_CHECK_REPEATS:-2}")
    MIXED=(--preset deepscaler-1.5b --bf16 --tokens 2048 --prompt 128 --step-every 64 --k 8 --groups 2
           --micro-batch-size 2 --repeats "${GPU_CHECK_REPEATS:-2}" --mixed 1)
    OFFLOAD=("${TRAIN[@]}" --offload)
    GEN=(--preset deepscaler-1.5b --bf16 --prompts 8 --prompt 128 --k 8 --new 64 --repeats 1)
    OPS=(--device cuda --repeats 30)
    LOGP=(--device cuda --batch=4 --tokens 8192 --vocab 152064 --repeats 2)
else
    GPU=0
    echo "no GPU: a rehearsal at a shrunken size" | tee -a "$summary"
    export MEGATRON_RGM_NO_CUDA=1  # the CPU kernels only: this machine may have nvcc but no GPU to run them
    TRAIN=(--preset deepscaler-1.5b --layers 2 --bf16 --tokens 96 --prompt 32 --step-every 16 --k 2 --groups 1
           --micro-batch-size 1 --repeats 1)
    MIXED=(--preset deepscaler-1.5b --layers 2 --bf16 --tokens 128 --prompt 16 --step-every 16 --k 4 --groups 1
           --micro-batch-size 2 --repeats 1 --mixed 1)
    OFFLOAD=("${TRAIN[@]}" --offload)
    GEN=(--preset deepscaler-1.5b --layers 2 --bf16 --prompts 2 --prompt 16 --k 2 --new 4 --repeats 1)
    OPS=(--repeats 3)
    LOGP=(--batch=4 --tokens 64 --vocab 32000 --repeats 1)
fi

# section NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in $OUT/NAME.log, a summary line.
section() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 12 "$OUT/$name.log"
    if [ $rc -eq 0 ]; then
        echo "$name: ok, $(($(date +%s) - start)) s" | tee -a "$summary"
    else
        echo "$name: FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit')), $(($(date +%s) - start)) s" \
            | tee -a "$summary"
        status=1
    fi
    return $rc
}

# GPU_CHECK_REPEATS (default 2): timed rounds of the training benchmarks.
# GPU_CHECK_SECTIONS picks sections (a device lease is short: a rerun can leave out what already ran); without
# build, the ops run their pure-torch references and the tests and op benchmark are left out.
SECTIONS=" ${GPU_CHECK_SECTIONS:-build tests train reference packing generate bench_ops logprobs cp} "
want() { [[ $SECTIONS == *" $1 "* ]]; }
built=0
if want build; then
    if section build 200 "$PY" setup.py build_ext --inplace; then
        built=1
        [ $GPU -eq 1 ] && "$PY" -c "import torch; from megatron_rgm import _C; print('cuda_compiled', \
_C.cuda_compiled(), 'cpu_isa', _C.cpu_isa())" 2>&1 | tee -a "$summary"
    fi
else
    unset MEGATRON_RGM_REQUIRE_EXT MEGATRON_RGM_EXPECT_CUDA_BUILD
    echo "build: left out (ops on their pure-torch references)" | tee -a "$summary"
fi
[ $built -eq 1 ] && want tests && section tests 70 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py \
    tests/test_reference_offload.py
want train && section train 130 "$PY" tools/bench_train.py "${TRAIN[@]}"
want reference && section reference 120 "$PY" tools/bench_train.py "${OFFLOAD[@]}"
want packing && section packing 150 "$PY" tools/bench_train.py "${MIXED[@]}"
want generate && section generate 90 "$PY" tools/bench_generate.py "${GEN[@]}"
[ $built -eq 1 ] && want bench_ops && section bench_ops 35 "$PY" tools/bench_ops.py "${OPS[@]}"
# The whole-vocabulary path at the first size may not fit on the device (it then says so); the second fits both.
want logprobs && section logprobs 60 bash -c '"$0" tools/bench_logprobs.py "$@" && "$0" tools/bench_logprobs.py \
"${@/--batch=4/--batch=2}"' "$PY" "${LOGP[@]}"
want cp && section cp 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_context_parallel.py -m multirank \
    -k "training_step and (cp2-spr or cp2-bce)"
echo "== summary"
cat "$summary"
exit $status
