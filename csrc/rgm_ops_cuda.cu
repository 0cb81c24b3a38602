// CUDA kernels: segmented reductions over packed trajectories.
//
// SPR ops are elementwise over steps; each thread finds its trajectory by a
// binary search in cu_steps. Aggregation assigns one warp (short
// trajectories) or one block (long ones) per trajectory. Inputs may be
// fp32/bf16/fp16/fp64 (half types widened to fp32 on entry); accumulation is
// fp32 (fp64 for fp64 inputs).
#include "rgm_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace rgm {
namespace {

constexpr int kThreads = 256;

// Like the CPU kernels: half/bf16 inputs are widened to fp32 once on entry.
torch::Tensor widened(const torch::Tensor& t) {
  auto c = t.contiguous();
  return c.scalar_type() == torch::kFloat64 || c.scalar_type() == torch::kFloat32 ? c : c.to(torch::kFloat32);
}

template <typename acc_t>
__device__ __forceinline__ acc_t softplus_d(acc_t x) {
  return x > acc_t(0) ? x + log1p(exp(-x)) : log1p(exp(x));
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_d(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp(-x));
}

template <typename index_t>
__device__ __forceinline__ int64_t find_traj(const index_t* cu, int64_t num_traj, int64_t i) {
  int64_t lo = 0, hi = num_traj;  // answer in [0, num_traj)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(cu[mid]) <= i) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_min(acc_t v) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_down_sync(0xffffffff, v, o));
  return v;
}

template <typename scalar_t, typename index_t>
__global__ void spr_stats_kernel(const scalar_t* __restrict__ z, const index_t* __restrict__ cu,
                                 const bool* __restrict__ y, int64_t S, int64_t T, double* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t a[4] = {0, 0, 0, 0};
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < S; i += (int64_t)gridDim.x * blockDim.x) {
    const acc_t x = static_cast<acc_t>(z[i]);
    if (y[find_traj(cu, T, i)]) {
      if (x > acc_t(0)) { a[0] += 1; a[2] += softplus_d(-x); }
    } else if (x < acc_t(0)) {
      a[1] += 1; a[3] += softplus_d(x);
    }
  }
  __shared__ acc_t smem[4][kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const acc_t v = warp_sum(a[k]);
    if (lane == 0) smem[k][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      acc_t v = lane < (int)(blockDim.x >> 5) ? smem[k][lane] : acc_t(0);
      v = warp_sum(v);
      if (lane == 0) atomicAdd(out + k, static_cast<double>(v));
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void spr_backward_kernel(const scalar_t* __restrict__ z, const index_t* __restrict__ cu,
                                    const bool* __restrict__ y, int64_t S, int64_t T, double sp, double sn,
                                    scalar_t* __restrict__ g) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < S; i += (int64_t)gridDim.x * blockDim.x) {
    const acc_t x = static_cast<acc_t>(z[i]);
    acc_t v = 0;
    if (y[find_traj(cu, T, i)]) {
      if (x > acc_t(0)) v = static_cast<acc_t>(sp) * (sigmoid_d(x) - acc_t(1));
    } else if (x < acc_t(0)) {
      v = static_cast<acc_t>(sn) * sigmoid_d(x);
    }
    g[i] = static_cast<scalar_t>(v);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t log_prob_d(acc_t v, bool from_probs) {
  if (from_probs) return v >= acc_t(kProbFloor) ? log(v) : acc_t(kLogFloor);
  const acc_t l = -softplus_d(-v);
  return l > acc_t(kLogFloor) ? l : acc_t(kLogFloor);
}

template <typename acc_t>
__device__ __forceinline__ acc_t prob_d(acc_t v, bool from_probs) {
  return from_probs ? v : sigmoid_d(v);
}

// One group of GROUP threads (a warp, or the whole block) per trajectory.
template <int GROUP, typename scalar_t, typename index_t>
__global__ void segment_aggregate_kernel(const scalar_t* __restrict__ v, const index_t* __restrict__ cu, int64_t T,
                                         int64_t mode, bool from_probs, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kGroupsPerBlock = kThreads / GROUP;
  const int group = threadIdx.x / GROUP, lane = threadIdx.x % GROUP;
  const int64_t t = (int64_t)blockIdx.x * kGroupsPerBlock + group;
  const bool active = t < T;
  int64_t lo = 0, hi = 0;
  if (active) { lo = cu[t]; hi = cu[t + 1]; }
  const bool is_min = mode == kMin;
  acc_t r = is_min ? acc_t(INFINITY) : acc_t(0);
  if (mode != kLast) {
    for (int64_t i = lo + lane; i < hi; i += GROUP) {
      const acc_t x = static_cast<acc_t>(v[i]);
      if (mode == kGeometric || mode == kProduct) r += log_prob_d(x, from_probs);
      else if (mode == kArithmetic) r += prob_d(x, from_probs);
      else r = min(r, prob_d(x, from_probs));
    }
    r = is_min ? warp_min(r) : warp_sum(r);
    if (GROUP > 32) {
      __shared__ acc_t smem[kThreads / 32];
      const int w = threadIdx.x >> 5;
      if ((threadIdx.x & 31) == 0) smem[w] = r;
      __syncthreads();
      if (threadIdx.x < 32) {
        acc_t q = threadIdx.x < (kThreads / 32) ? smem[threadIdx.x] : (is_min ? acc_t(INFINITY) : acc_t(0));
        r = is_min ? warp_min(q) : warp_sum(q);
      }
    }
  }
  if (!active || lane != 0) return;
  const int64_t k = hi - lo;
  if (k <= 0) { out[t] = scalar_t(0); return; }
  acc_t res;
  switch (mode) {
    case kGeometric: res = exp(r / static_cast<acc_t>(k)); break;
    case kProduct: res = exp(r); break;
    case kArithmetic: res = r / static_cast<acc_t>(k); break;
    case kMin: res = r; break;
    default: res = prob_d(static_cast<acc_t>(v[hi - 1]), from_probs);
  }
  out[t] = static_cast<scalar_t>(res);
}

template <typename scalar_t, typename index_t>
__global__ void segment_aggregate_backward_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ v,
                                                  const index_t* __restrict__ cu, const scalar_t* __restrict__ o,
                                                  int64_t S, int64_t T, int64_t mode, bool from_probs,
                                                  scalar_t* __restrict__ g) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < S; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = find_traj(cu, T, i);
    const acc_t c = static_cast<acc_t>(go[t]) / static_cast<acc_t>(cu[t + 1] - cu[t]);
    const acc_t x = static_cast<acc_t>(v[i]);
    acc_t d;
    if (mode == kArithmetic) {
      d = from_probs ? acc_t(1) : sigmoid_d(x) * (acc_t(1) - sigmoid_d(x));
    } else if (from_probs) {
      d = x >= acc_t(kProbFloor) ? static_cast<acc_t>(o[t]) / x : acc_t(0);
    } else {
      d = x >= acc_t(kLogitFloor) ? static_cast<acc_t>(o[t]) * sigmoid_d(-x) : acc_t(0);
    }
    g[i] = static_cast<scalar_t>(c * d);
  }
}

int blocks_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 8)));
}

}  // namespace

torch::Tensor spr_stats_cuda(const torch::Tensor& logits, const torch::Tensor& cu_steps,
                             const torch::Tensor& correct) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto z = widened(logits);
  auto cu = cu_steps.contiguous();
  auto y = correct.to(logits.device(), torch::kBool).contiguous();
  auto out = torch::zeros({4}, z.options().dtype(torch::kFloat64));
  const int64_t S = z.numel(), T = cu.numel() - 1;
  if (S == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "spr_stats_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "spr_stats_cuda_idx", [&] {
      spr_stats_kernel<scalar_t, index_t><<<blocks_for(S), kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), y.data_ptr<bool>(), S, T, out.data_ptr<double>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor spr_backward_cuda(const torch::Tensor& logits, const torch::Tensor& cu_steps,
                                const torch::Tensor& correct, double scale, double w_pos, double w_neg) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto z = widened(logits);
  auto cu = cu_steps.contiguous();
  auto y = correct.to(logits.device(), torch::kBool).contiguous();
  auto g = torch::empty_like(z);
  const int64_t S = z.numel(), T = cu.numel() - 1;
  if (S == 0) return g.to(logits.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "spr_backward_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "spr_backward_cuda_idx", [&] {
      spr_backward_kernel<scalar_t, index_t><<<blocks_for(S), kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), y.data_ptr<bool>(), S, T, scale * w_pos,
          scale * w_neg, g.data_ptr<scalar_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g.to(logits.scalar_type());
}

torch::Tensor segment_aggregate_cuda(const torch::Tensor& values, const torch::Tensor& cu_steps, int64_t mode,
                                     bool from_probs) {
  const c10::cuda::CUDAGuard guard(values.device());
  auto v = widened(values);
  auto cu = cu_steps.contiguous();
  const int64_t S = v.numel(), T = cu.numel() - 1;
  auto out = torch::zeros({T}, v.options());
  if (T == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool long_segments = S / T > 1024;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "segment_aggregate_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_aggregate_cuda_idx", [&] {
      if (long_segments)
        segment_aggregate_kernel<kThreads, scalar_t, index_t><<<T, kThreads, 0, stream>>>(
            v.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), T, mode, from_probs, out.data_ptr<scalar_t>());
      else
        segment_aggregate_kernel<32, scalar_t, index_t><<<(T + 7) / 8, kThreads, 0, stream>>>(
            v.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), T, mode, from_probs, out.data_ptr<scalar_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor segment_aggregate_backward_cuda(const torch::Tensor& grad_out, const torch::Tensor& values,
                                              const torch::Tensor& cu_steps, const torch::Tensor& out, int64_t mode,
                                              bool from_probs) {
  TORCH_CHECK(mode == kGeometric || mode == kArithmetic,
              "segment_aggregate backward is implemented for geometric and arithmetic only");
  const c10::cuda::CUDAGuard guard(values.device());
  auto v = widened(values);
  auto cu = cu_steps.contiguous();
  auto o = out.to(v.scalar_type()).contiguous();
  auto go = grad_out.to(v.scalar_type()).contiguous();
  auto g = torch::zeros_like(v);
  const int64_t S = v.numel(), T = cu.numel() - 1;
  if (S == 0) return g.to(values.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "segment_aggregate_bwd_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_aggregate_bwd_cuda_idx", [&] {
      segment_aggregate_backward_kernel<scalar_t, index_t><<<blocks_for(S), kThreads, 0, stream>>>(
          go.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), o.data_ptr<scalar_t>(), S, T,
          mode, from_probs, g.data_ptr<scalar_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g.to(values.scalar_type());
}

}  // namespace rgm
