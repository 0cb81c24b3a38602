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

#include <atomic>
#include <string>
#include <vector>

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

// cu_steps[-1] == S, the check megatron_rgm.ops makes for the other ops (ValueError in Python).
void check_end(const torch::Tensor& values, const torch::Tensor& cu_steps) {
  if (cu_steps.numel() < 2) return;
  int64_t end;
  if (cu_steps.is_cpu()) {
    const int64_t last = (cu_steps.numel() - 1) * cu_steps.stride(0);
    end = cu_steps.scalar_type() == torch::kInt32 ? cu_steps.data_ptr<int32_t>()[last]
                                                  : cu_steps.data_ptr<int64_t>()[last];
  } else {
    end = cu_steps[-1].item<int64_t>();
  }
  TORCH_CHECK_VALUE(end == values.numel(), "cu_steps ends at ", end, " but step_logits has ", values.numel(),
                    " steps: cu_steps[-1] must equal the number of packed steps");
}

// The kernels of every instruction set this processor runs, best first.
const std::vector<CpuKernels>& cpu_variants() {
  static const std::vector<CpuKernels> v = [] {
    std::vector<CpuKernels> r;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      if (__builtin_cpu_supports("avx512f")) r.push_back(avx2::kernels_avx512());
      r.push_back(avx2::kernels());
    }
#endif
    r.push_back(base::kernels());
    return r;
  }();
  return v;
}

std::atomic<const CpuKernels*> selected{nullptr};

const CpuKernels& cpu() {
  const CpuKernels* k = selected.load(std::memory_order_relaxed);
  if (k == nullptr) {
    k = &cpu_variants().front();
    selected.store(k, std::memory_order_relaxed);
  }
  return *k;
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
  check_end(values, cu_steps);
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

namespace {

// Geometric / arithmetic aggregate with its backward in C++ (no Python in the backward). On the CPU
// the forward also writes each step's derivative d_i, so the backward is one multiply per step; the
// CUDA path saves the inputs and recomputes in its backward kernel.
class SegmentAggregateFunction : public torch::autograd::Function<SegmentAggregateFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& values,
                               const torch::Tensor& cu_steps, int64_t mode, bool from_probs) {
    // One entry: mode, input dtype and from_probs packed into an int.
    ctx->saved_data["k"] = (mode * 256 + static_cast<int64_t>(values.scalar_type())) * 2 + from_probs;
#ifdef WITH_CUDA
    if (values.is_cuda()) {
      auto out = segment_aggregate_cuda(values, cu_steps, mode, from_probs);
      ctx->save_for_backward({values, cu_steps, out});
      return out;
    }
#endif
    TORCH_CHECK(values.is_cpu(), "megatron_rgm._C was built without CUDA kernels");
    auto r = cpu().segment_aggregate_train(values, cu_steps, mode, from_probs);
    ctx->save_for_backward({r[1], cu_steps, r[0]});
    return r[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t key = ctx->saved_data["k"].toInt();
    const int64_t mode = key / 512;
    [[maybe_unused]] const bool from_probs = key % 2;
    const auto dtype = static_cast<torch::ScalarType>(key / 2 % 256);
    torch::Tensor g;
#ifdef WITH_CUDA
    if (saved[0].is_cuda()) {
      g = segment_aggregate_backward_cuda(grads[0], saved[0], saved[1], saved[2], mode, from_probs);
    }
#endif
    if (!g.defined()) g = cpu().segment_aggregate_backward_saved(grads[0], saved[0], saved[1], saved[2], mode);
    if (g.scalar_type() != dtype) g = g.to(dtype);
    return {g, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor segment_aggregate_autograd(const torch::Tensor& values, const torch::Tensor& cu_steps, int64_t mode,
                                         bool from_probs) {
  check_inputs(values, cu_steps);
  check_end(values, cu_steps);
  TORCH_CHECK(mode == kGeometric || mode == kArithmetic,
              "segment_aggregate backward is implemented for geometric and arithmetic only");
  return SegmentAggregateFunction::apply(values, cu_steps, mode, from_probs);
}

std::string cpu_isa() { return cpu().isa; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> r;
  for (const auto& k : cpu_variants()) r.push_back(k.isa);
  return r;
}

// Tests: run the CPU kernels of another instruction set this processor has; returns the previous one.
std::string use_cpu_isa(const std::string& isa) {
  const std::string previous = cpu_isa();
  for (const auto& k : cpu_variants()) {
    if (isa == k.isa) {
      selected.store(&k, std::memory_order_relaxed);
      return previous;
    }
  }
  TORCH_CHECK_VALUE(false, "CPU kernels '", isa, "' are not available on this processor");
  return previous;
}

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
  m.def("segment_aggregate_autograd", &rgm::segment_aggregate_autograd,
        "geometric / arithmetic aggregate as a differentiable op (its backward runs in C++)");
  m.def("cuda_compiled", &rgm::cuda_compiled, "whether the CUDA kernels are in this build");
  m.def("cpu_isa", &rgm::cpu_isa, "instruction set of the CPU kernels in use: avx512, avx2 or default");
  m.def("cpu_isas", &rgm::cpu_isas, "instruction sets of the CPU kernels this processor can run, best first");
  m.def("_use_cpu_isa", &rgm::use_cpu_isa, "tests: switch the CPU kernels to another of cpu_isas(); returns the previous");
}
