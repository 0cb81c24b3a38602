#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (the device tool's H200 among them):
# builds megatron_rgm._C with CUDA kernels in place, runs the op tests (CUDA ones
# included) and the op benchmark, and writes logs under $OUT (default ./gpu_check_out).
# Needs torch with CUDA, ninja, pybind11, pytest; not megatron-core. Ends well under 8 minutes.
#
#   OUT=/tmp/out bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MEGATRON_RGM_REQUIRE_EXT=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
status=0

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$OUT/env.txt"

echo "== build" | tee "$OUT/build.log"
start=$(date +%s)
timeout 300 "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { echo "build failed" | tee -a "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
"$PY" -c "import torch; from megatron_rgm import _C; assert _C.cuda_compiled(); print('cuda_compiled', _C.cuda_compiled(), 'cpu_isa', _C.cpu_isa())" 2>&1 | tee -a "$OUT/build.log" || status=1

echo "== tests"
MEGATRON_RGM_EXPECT_CUDA_BUILD=1 timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark"
timeout 180 "$PY" tools/bench_ops.py --device cuda --repeats 50 2>&1 | tee "$OUT/bench_cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
