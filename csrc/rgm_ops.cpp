// CPU kernels and the Python module megatron_rgm._C.
//
// SPR loss in two phases so the class counts can be summed over data-parallel
// ranks in between:
//   spr_stats    -> [P, N, Bp, Bn] (float64): masked positive / negative step
//                   counts and the sums of their BCE terms, in one pass;
//   (all-reduce P, N; weights w_pos = pw * N/(P+N), w_neg = P/(P+N))
//   loss         =  (w_pos*Bp + w_neg*Bn) / (w_pos*P_local + w_neg*N_local + eps)
//   spr_backward -> dloss/dz = scale * m * w * (sigmoid(z) - y).
#include "rgm_ops.h"

#include <string>

namespace rgm {
namespace {

void check_inputs(const torch::Tensor& values, const torch::Tensor& cu_steps) {
  TORCH_CHECK(values.dim() == 1, "step values must be 1-D [S], got ", values.sizes());
  TORCH_CHECK(cu_steps.dim() == 1 && cu_steps.numel() >= 1, "cu_steps must be 1-D [T+1], got ",
              cu_steps.sizes());
  TORCH_CHECK(cu_steps.scalar_type() == torch::kInt32 || cu_steps.scalar_type() == torch::kInt64,
              "cu_steps must be int32 or int64");
  TORCH_CHECK(values.device() == cu_steps.device(), "step values and cu_steps are on different devices");
}

const CpuKernels& cpu() {
  static const CpuKernels k = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2::kernels();
#endif
    return base::kernels();
  }();
  return k;
}

}  // namespace

torch::Tensor spr_stats(const torch::Tensor& logits, const torch::Tensor& cu_steps, const torch::Tensor& correct) {
  check_inputs(logits, cu_steps);
  TORCH_CHECK(correct.numel() == cu_steps.numel() - 1, "correct has ", correct.numel(),
              " entries but cu_steps describes ", cu_steps.numel() - 1, " trajectories");
#ifdef WITH_CUDA
  if (logits.is_cuda()) return spr_stats_cuda(logits, cu_steps, correct);
#endif
  TORCH_CHECK(logits.is_cpu(), "megatron_rgm._C was built without CUDA kernels");
  return cpu().spr_stats(logits, cu_steps, correct);
}

torch::Tensor spr_backward(const torch::Tensor& logits, const torch::Tensor& cu_steps, const torch::Tensor& correct,
                           double scale, double w_pos, double w_neg) {
  check_inputs(logits, cu_steps);
#ifdef WITH_CUDA
  if (logits.is_cuda()) return spr_backward_cuda(logits, cu_steps, correct, scale, w_pos, w_neg);
#endif
  TORCH_CHECK(logits.is_cpu(), "megatron_rgm._C was built without CUDA kernels");
  return cpu().spr_backward(logits, cu_steps, correct, scale, w_pos, w_neg);
}

torch::Tensor segment_aggregate(const torch::Tensor& values, const torch::Tensor& cu_steps, int64_t mode,
                                bool from_probs) {
  check_inputs(values, cu_steps);
  TORCH_CHECK(mode >= kGeometric && mode <= kLast, "unknown aggregation mode ", mode);
#ifdef WITH_CUDA
  if (values.is_cuda()) return segment_aggregate_cuda(values, cu_steps, mode, from_probs);
#endif
  TORCH_CHECK(values.is_cpu(), "megatron_rgm._C was built without CUDA kernels");
  return cpu().segment_aggregate(values, cu_steps, mode, from_probs);
}

torch::Tensor segment_aggregate_backward(const torch::Tensor& grad_out, const torch::Tensor& values,
                                         const torch::Tensor& cu_steps, const torch::Tensor& out, int64_t mode,
                                         bool from_probs) {
  check_inputs(values, cu_steps);
#ifdef WITH_CUDA
  if (values.is_cuda()) return segment_aggregate_backward_cuda(grad_out, values, cu_steps, out, mode, from_probs);
#endif
  TORCH_CHECK(values.is_cpu(), "megatron_rgm._C was built without CUDA kernels");
  return cpu().segment_aggregate_backward(grad_out, values, cu_steps, out, mode, from_probs);
}

std::string cpu_isa() { return cpu().isa; }

bool cuda_compiled() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace rgm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-rgm kernels: SPR loss and segment aggregation (CPU, and CUDA when compiled)";
  m.def("spr_stats", &rgm::spr_stats, "[P, N, Bp, Bn] of the SPR loss (float64)");
  m.def("spr_backward", &rgm::spr_backward, "gradient of the SPR loss w.r.t. the step logits");
  m.def("segment_aggregate", &rgm::segment_aggregate, "per-trajectory aggregate of step probabilities");
  m.def("segment_aggregate_backward", &rgm::segment_aggregate_backward,
        "gradient of the geometric / arithmetic aggregate");
  m.def("cuda_compiled", &rgm::cuda_compiled, "whether the CUDA kernels are in this build");
  m.def("cpu_isa", &rgm::cpu_isa, "instruction set of the CPU kernels in use: avx2 or default");
}
