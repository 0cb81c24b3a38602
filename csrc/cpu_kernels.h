// CPU kernels, compiled twice: once for the build's default instruction set
// (cpu_default.cpp) and once with AVX2+FMA (cpu_avx2.cpp); rgm_ops.cpp picks
// one at run time. The includer defines RGM_CPU_NS (and, for AVX2,
// CPU_CAPABILITY_AVX2 so at::vec::Vectorized uses 256-bit registers and Sleef).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "rgm_ops.h"

namespace rgm {
namespace RGM_CPU_NS {
namespace {


// The kernels run on float (fp32 accumulation) or double; half/bf16 inputs are
// widened once on entry and gradients narrowed on exit.
torch::Tensor widened(const torch::Tensor& t) {
  auto c = t.contiguous();
  return c.scalar_type() == torch::kFloat64 || c.scalar_type() == torch::kFloat32 ? c : c.to(torch::kFloat32);
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

// softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)).
template <typename T>
inline Vec<T> vsoftplus(const Vec<T>& x) {
  return at::vec::maximum(x, Vec<T>(T(0))) + x.abs().neg().exp().log1p();
}

template <typename T>
inline T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  return Vec<T>(T(1)) / (Vec<T>(T(1)) + x.neg().exp());
}

// Call f(lo, hi, t) for each piece of a trajectory inside steps [begin, end).
template <typename index_t, typename F>
inline void for_pieces(const index_t* cu, int64_t num_traj, int64_t begin, int64_t end, F&& f) {
  int64_t t = std::upper_bound(cu, cu + num_traj + 1, static_cast<index_t>(begin)) - cu - 1;
  for (int64_t n = begin; n < end; ++t) {
    const int64_t hi = std::min<int64_t>(end, cu[t + 1]);
    if (hi > n) f(n, hi, t);
    n = std::max<int64_t>(n, hi);
  }
}

// Steps per parallel task: big enough to amortise a task, small enough to split 2 x 32k steps.
constexpr int64_t kGrain = 2048;

template <typename T, typename index_t>
void spr_stats_impl(const T* z, const index_t* cu, const bool* y, int64_t S, int64_t num_traj, double* out) {
  const int nthreads = at::get_num_threads();
  std::vector<double> partial(4 * static_cast<size_t>(nthreads), 0.0);
  at::parallel_for(0, S, kGrain, [&](int64_t b, int64_t e) {
    Vec<T> cnt_p(T(0)), cnt_n(T(0)), sum_p(T(0)), sum_n(T(0));
    const Vec<T> zero(T(0)), one(T(1));
    for_pieces(cu, num_traj, b, e, [&](int64_t lo, int64_t hi, int64_t t) {
      const bool pos = y[t];
      for (int64_t i = lo; i < hi; i += Vec<T>::size()) {
        const int64_t n = std::min<int64_t>(Vec<T>::size(), hi - i);
        const Vec<T> x = Vec<T>::loadu(z + i, n);  // zero-filled tail: neither > 0 nor < 0
        if (pos) {
          const Vec<T> m = x > zero;
          cnt_p += m & one;
          sum_p += m & vsoftplus(x.neg());
        } else {
          const Vec<T> m = x < zero;
          cnt_n += m & one;
          sum_n += m & vsoftplus(x);
        }
      }
    });
    double* acc = partial.data() + 4 * at::get_thread_num();
    const Vec<T>* parts[4] = {&cnt_p, &cnt_n, &sum_p, &sum_n};
    for (int k = 0; k < 4; ++k) {
      T buf[Vec<T>::size()];
      parts[k]->store(buf);
      for (int j = 0; j < Vec<T>::size(); ++j) acc[k] += buf[j];
    }
  });
  for (int th = 0; th < nthreads; ++th)
    for (int k = 0; k < 4; ++k) out[k] += partial[4 * th + k];
}

template <typename T, typename index_t>
void spr_backward_impl(const T* z, const index_t* cu, const bool* y, int64_t S, int64_t num_traj, T sp, T sn,
                       T* g) {
  at::parallel_for(0, S, kGrain, [&](int64_t b, int64_t e) {
    const Vec<T> zero(T(0));
    for_pieces(cu, num_traj, b, e, [&](int64_t lo, int64_t hi, int64_t t) {
      const bool pos = y[t];
      for (int64_t i = lo; i < hi; i += Vec<T>::size()) {
        const int64_t n = std::min<int64_t>(Vec<T>::size(), hi - i);
        const Vec<T> x = Vec<T>::loadu(z + i, n);
        // Positive: sp * (sigmoid(x) - 1) = -sp * sigmoid(-x); negative: sn * sigmoid(x).
        const Vec<T> v = pos ? ((x > zero) & (vsigmoid(x.neg()) * Vec<T>(-sp)))
                             : ((x < zero) & (vsigmoid(x) * Vec<T>(sn)));
        v.store(g + i, n);
      }
    });
  });
}

// Sum over [lo, hi) of log(clamp(p, 1e-10)) (p = sigmoid(x), or x itself with from_probs) or of p.
template <typename T>
inline T segment_sum(const T* v, int64_t lo, int64_t hi, bool logs, bool from_probs) {
  Vec<T> acc(T(0));
  const Vec<T> floor_log = Vec<T>(static_cast<T>(kLogFloor)), floor_p = Vec<T>(static_cast<T>(kProbFloor));
  for (int64_t i = lo; i < hi; i += Vec<T>::size()) {
    const int64_t n = std::min<int64_t>(Vec<T>::size(), hi - i);
    const Vec<T> x = Vec<T>::loadu(v + i, n);
    Vec<T> term;
    if (logs) {
      // log(sigmoid(x)) = -log(1 + exp(-x)); exp(-x) overflows to inf only far below the floor.
      term = from_probs ? at::vec::maximum(x, floor_p).log()
                        : at::vec::maximum((Vec<T>(T(1)) + x.neg().exp()).log().neg(), floor_log);
    } else {
      term = from_probs ? x : vsigmoid(x);
    }
    if (n < Vec<T>::size()) term = Vec<T>::set(Vec<T>(T(0)), term, n);  // drop the padded lanes
    acc += term;
  }
  T buf[Vec<T>::size()];
  acc.store(buf);
  T r = 0;
  for (int j = 0; j < Vec<T>::size(); ++j) r += buf[j];
  return r;
}

template <typename T>
inline T to_prob(T x, bool from_probs) {
  return from_probs ? x : T(1) / (T(1) + std::exp(-x));
}

template <typename T, typename index_t>
void segment_aggregate_impl(const T* v, const index_t* cu, int64_t num_traj, int64_t mode, bool from_probs, T* o) {
  at::parallel_for(0, num_traj, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t lo = cu[t], hi = cu[t + 1], k = hi - lo;
      if (k <= 0) { o[t] = T(0); continue; }
      switch (mode) {
        case kGeometric: o[t] = std::exp(segment_sum(v, lo, hi, true, from_probs) / T(k)); break;
        case kProduct: o[t] = std::exp(segment_sum(v, lo, hi, true, from_probs)); break;
        case kArithmetic: o[t] = segment_sum(v, lo, hi, false, from_probs) / T(k); break;
        case kMin: o[t] = to_prob(*std::min_element(v + lo, v + hi), from_probs); break;  // p is monotone in x
        default: o[t] = to_prob(v[hi - 1], from_probs);
      }
    }
  });
}

template <typename T, typename index_t>
void segment_aggregate_backward_impl(const T* go, const T* v, const index_t* cu, const T* o, int64_t S,
                                     int64_t num_traj, int64_t mode, bool from_probs, T* g) {
  at::parallel_for(0, S, kGrain, [&](int64_t b, int64_t e) {
    const Vec<T> one = Vec<T>(T(1)), floor_logit = Vec<T>(static_cast<T>(kLogitFloor)),
                 floor_p = Vec<T>(static_cast<T>(kProbFloor));
    for_pieces(cu, num_traj, b, e, [&](int64_t lo, int64_t hi, int64_t t) {
      const T c = go[t] / T(cu[t + 1] - cu[t]);
      const Vec<T> cv(c), co(c * o[t]);
      for (int64_t i = lo; i < hi; i += Vec<T>::size()) {
        const int64_t n = std::min<int64_t>(Vec<T>::size(), hi - i);
        const Vec<T> x = Vec<T>::loadu(v + i, n);
        Vec<T> d;
        if (mode == kArithmetic) {
          if (from_probs) {
            d = cv;
          } else {
            const Vec<T> p = vsigmoid(x);
            d = cv * p * (one - p);
          }
        } else if (from_probs) {
          d = (x >= floor_p) & (co / x);
        } else {
          // d log(sigmoid(x))/dx = 1 - sigmoid(x) = sigmoid(-x); zero where the clamp is active.
          d = (x >= floor_logit) & (co * vsigmoid(x.neg()));
        }
        d.store(g + i, n);
      }
    });
  });
}

torch::Tensor spr_stats_cpu(const torch::Tensor& logits, const torch::Tensor& cu_steps, const torch::Tensor& correct) {
  auto z = widened(logits);
  auto cu = cu_steps.contiguous();
  auto y = correct.to(torch::kBool).contiguous();
  auto out = torch::zeros({4}, logits.options().dtype(torch::kFloat64));
  if (z.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "spr_stats", [&] {
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "spr_stats_idx", [&] {
      spr_stats_impl<scalar_t, index_t>(z.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), y.data_ptr<bool>(),
                                        z.numel(), cu.numel() - 1, out.data_ptr<double>());
    });
  });
  return out;
}

torch::Tensor spr_backward_cpu(const torch::Tensor& logits, const torch::Tensor& cu_steps, const torch::Tensor& correct,
                               double scale, double w_pos, double w_neg) {
  auto z = widened(logits);
  auto cu = cu_steps.contiguous();
  auto y = correct.to(torch::kBool).contiguous();
  auto g = torch::empty_like(z);
  if (z.numel() == 0) return g.to(logits.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "spr_backward", [&] {
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "spr_backward_idx", [&] {
      spr_backward_impl<scalar_t, index_t>(z.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), y.data_ptr<bool>(),
                                           z.numel(), cu.numel() - 1, static_cast<scalar_t>(scale * w_pos),
                                           static_cast<scalar_t>(scale * w_neg), g.data_ptr<scalar_t>());
    });
  });
  return g.to(logits.scalar_type());
}

torch::Tensor segment_aggregate_cpu(const torch::Tensor& values, const torch::Tensor& cu_steps, int64_t mode,
                                    bool from_probs) {
  auto v = widened(values);
  auto cu = cu_steps.contiguous();
  auto out = torch::zeros({cu.numel() - 1}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "segment_aggregate", [&] {
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_aggregate_idx", [&] {
      segment_aggregate_impl<scalar_t, index_t>(v.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), cu.numel() - 1, mode,
                                                from_probs, out.data_ptr<scalar_t>());
    });
  });
  return out;
}

torch::Tensor segment_aggregate_backward_cpu(const torch::Tensor& grad_out, const torch::Tensor& values,
                                             const torch::Tensor& cu_steps, const torch::Tensor& out, int64_t mode,
                                             bool from_probs) {
  TORCH_CHECK(mode == kGeometric || mode == kArithmetic,
              "segment_aggregate backward is implemented for geometric and arithmetic only");
  auto v = widened(values);
  auto cu = cu_steps.contiguous();
  auto o = out.to(v.scalar_type()).contiguous();
  auto go = grad_out.to(v.scalar_type()).contiguous();
  auto g = torch::empty_like(v);
  if (v.numel() == 0) return g.to(values.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "segment_aggregate_bwd", [&] {
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_aggregate_bwd_idx", [&] {
      segment_aggregate_backward_impl<scalar_t, index_t>(
          go.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), o.data_ptr<scalar_t>(), v.numel(),
          cu.numel() - 1, mode, from_probs, g.data_ptr<scalar_t>());
    });
  });
  return g.to(values.scalar_type());
}

}  // namespace

CpuKernels kernels() {
  return CpuKernels{RGM_CPU_ISA, spr_stats_cpu, spr_backward_cpu, segment_aggregate_cpu, segment_aggregate_backward_cpu};
}

}  // namespace RGM_CPU_NS
}  // namespace rgm
