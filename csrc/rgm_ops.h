// megatron_rgm._C: SPR loss and segment aggregation kernels.
//
// Packed layout: trajectory t owns steps [cu_steps[t], cu_steps[t+1]) of a
// flat [S] tensor of head logits (or probabilities).
#pragma once

#include <torch/extension.h>

namespace rgm {

// Aggregation modes, in the order of megatron_rgm.ops.reference.MODES.
enum Mode : int64_t { kGeometric = 0, kArithmetic = 1, kProduct = 2, kMin = 3, kLast = 4 };

// log(1e-10): probabilities are clamped at 1e-10 before the log.
constexpr double kLogFloor = -23.025850929940457;
constexpr double kProbFloor = 1e-10;
// logit(1e-10): sigmoid(x) >= 1e-10 exactly when x >= kLogitFloor.
constexpr double kLogitFloor = -23.025850929840457;

// The CPU kernels of one instruction set.
struct CpuKernels {
  const char* isa;
  torch::Tensor (*spr_stats)(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&);
  torch::Tensor (*spr_backward)(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, double, double,
                                double);
  torch::Tensor (*segment_aggregate)(const torch::Tensor&, const torch::Tensor&, int64_t, bool);
  torch::Tensor (*segment_aggregate_backward)(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                              const torch::Tensor&, int64_t, bool);
  // Geometric / arithmetic for training: {out [T], d [S]} with d_i = d(term_i)/dx_i (the backward's only
  // per-step factor: sigmoid(-x) or 1/p, zero where the 1e-10 clamp is active; p(1-p) or 1).
  std::vector<torch::Tensor> (*segment_aggregate_train)(const torch::Tensor&, const torch::Tensor&, int64_t, bool);
  // grad_i = grad_out_t * (out_t or 1) / k_t * d_i, from segment_aggregate_train's {out, d}.
  torch::Tensor (*segment_aggregate_backward_saved)(const torch::Tensor& grad_out, const torch::Tensor& d,
                                                    const torch::Tensor& cu_steps, const torch::Tensor& out,
                                                    int64_t mode);
};
namespace base { CpuKernels kernels(); }
namespace avx2 {
CpuKernels kernels();
CpuKernels kernels_avx512();  // AVX2 kernels, geometric / product of float logits in 512-bit vectors
}

#ifdef WITH_CUDA
torch::Tensor spr_stats_cuda(const torch::Tensor& logits, const torch::Tensor& cu_steps,
                             const torch::Tensor& correct);
torch::Tensor spr_backward_cuda(const torch::Tensor& logits, const torch::Tensor& cu_steps,
                                const torch::Tensor& correct, double scale, double w_pos, double w_neg);
torch::Tensor segment_aggregate_cuda(const torch::Tensor& values, const torch::Tensor& cu_steps,
                                     int64_t mode, bool from_probs);
torch::Tensor segment_aggregate_backward_cuda(const torch::Tensor& grad_out, const torch::Tensor& values,
                                              const torch::Tensor& cu_steps, const torch::Tensor& out,
                                              int64_t mode, bool from_probs);
#endif

}  // namespace rgm
