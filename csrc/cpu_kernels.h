// CPU kernels, compiled twice: once for the build's default instruction set
// (cpu_default.cpp) and once with AVX2+FMA (cpu_avx2.cpp); rgm_ops.cpp picks
// one at run time. The includer defines RGM_CPU_NS (and, for AVX2,
// CPU_CAPABILITY_AVX2 so at::vec::Vectorized uses 256-bit registers and Sleef).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
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

// Scalar twins of the Vectorized operations, so one generic lambda serves the
// vector body of a loop and its scalar tail.
template <typename T> inline T v_exp(T x) { return std::exp(x); }
template <typename T> inline Vec<T> v_exp(const Vec<T>& x) { return x.exp(); }
template <typename T> inline T v_log(T x) { return std::log(x); }
template <typename T> inline Vec<T> v_log(const Vec<T>& x) { return x.log(); }
template <typename T> inline T v_log1p(T x) { return std::log1p(x); }
template <typename T> inline Vec<T> v_log1p(const Vec<T>& x) { return x.log1p(); }
template <typename T> inline T v_abs(T x) { return std::abs(x); }
template <typename T> inline Vec<T> v_abs(const Vec<T>& x) { return x.abs(); }
template <typename T> inline T v_max(T a, T b) { return std::max(a, b); }
template <typename T> inline Vec<T> v_max(const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }
// `m ? v : 0` for a bool or a lane mask.
template <typename T> inline T keep(bool m, T v) { return m ? v : T(0); }
template <typename T> inline Vec<T> keep(const Vec<T>& m, const Vec<T>& v) { return m & v; }
template <typename T> inline void store(T* p, int64_t i, T v) { p[i] = v; }
template <typename T> inline void store(T* p, int64_t i, const Vec<T>& v) { v.store(p + i); }

// softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)).
template <typename V>
inline V softplus(const V& x) {
  return v_max(x, V(0)) + v_log1p(v_exp(V(0) - v_abs(x)));
}

template <typename V>
inline V sigmoid(const V& x) {
  return V(1) / (V(1) + v_exp(V(0) - x));
}

// f(i, x, w) over steps [lo, hi): x = a[i], w = b[i - lo]; Vec<T> on full vectors, T on the tail.
template <typename T, typename F>
inline void elementwise(const T* a, const T* b, int64_t lo, int64_t hi, F&& f) {
  int64_t i = lo;
  for (; i + Vec<T>::size() <= hi; i += Vec<T>::size())
    f(i, Vec<T>::loadu(a + i), Vec<T>::loadu(b + (i - lo)));
  for (; i < hi; ++i) f(i, a[i], b[i - lo]);
}

template <typename T>
inline T horizontal_sum(const Vec<T>& v) {
  T buf[Vec<T>::size()];
  v.store(buf);
  T r = 0;
  for (int j = 0; j < Vec<T>::size(); ++j) r += buf[j];
  return r;
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

// Steps are processed in blocks: per-trajectory values (label, coefficient) are
// first expanded into a per-step buffer, so the math runs in full vectors
// across trajectory boundaries (10^5 two-step trajectories vectorise as well
// as one long one).
constexpr int64_t kBlock = 2048;

// For each block [lo, hi) inside [begin, end): buf[k] = value(t) of step lo + k, then body(lo, hi, buf).
template <typename T, typename index_t, typename V, typename B>
inline void blocks(const index_t* cu, int64_t num_traj, int64_t begin, int64_t end, V&& value, B&& body) {
  T buf[kBlock];
  for (int64_t lo = begin; lo < end; lo += kBlock) {
    const int64_t hi = std::min(end, lo + kBlock);
    for_pieces(cu, num_traj, lo, hi, [&](int64_t a, int64_t b, int64_t t) {
      std::fill(buf + (a - lo), buf + (b - lo), value(t));
    });
    body(lo, hi, buf);
  }
}

// The SPR math runs on u = x for a wrong trajectory and u = -x for a correct one:
// a step is masked exactly when u < 0, its BCE term is softplus(u) = log1p(exp(u))
// (exp(u) <= 1 there), and dBCE/dx = sign * sigmoid(u). One transcendental pair a step.
template <typename T, typename index_t>
void spr_stats_impl(const T* z, const index_t* cu, const bool* y, int64_t S, int64_t num_traj, double* out) {
  const int nthreads = at::get_num_threads();
  std::vector<double> partial(4 * static_cast<size_t>(nthreads), 0.0);
  at::parallel_for(0, S, kBlock, [&](int64_t b, int64_t e) {
    // [count+, count-, bce+, bce-] in vector lanes and in scalars (tails).
    Vec<T> va[4] = {Vec<T>(T(0)), Vec<T>(T(0)), Vec<T>(T(0)), Vec<T>(T(0))};
    T sa[4] = {0, 0, 0, 0};
    blocks<T>(cu, num_traj, b, e, [&](int64_t t) { return y[t] ? T(-1) : T(1); },
              [&](int64_t lo, int64_t hi, const T* sign) {
      elementwise(z, sign, lo, hi, [&](int64_t, auto x, auto sg) {
        using V = decltype(x);
        auto* acc = [&] { if constexpr (std::is_same_v<V, T>) return sa; else return va; }();
        const V u = x * sg;
        const auto m = u < V(0);
        const auto correct = sg < V(0);
        const V cnt = keep(m, V(1)), bce = keep(m, v_log1p(v_exp(u)));
        const V cnt_pos = keep(correct, cnt), bce_pos = keep(correct, bce);
        acc[0] += cnt_pos;
        acc[1] += cnt - cnt_pos;
        acc[2] += bce_pos;
        acc[3] += bce - bce_pos;
      });
    });
    double* acc = partial.data() + 4 * at::get_thread_num();
    for (int k = 0; k < 4; ++k) acc[k] += horizontal_sum(va[k]) + sa[k];
  });
  for (int th = 0; th < nthreads; ++th)
    for (int k = 0; k < 4; ++k) out[k] += partial[4 * th + k];
}

template <typename T, typename index_t>
void spr_backward_impl(const T* z, const index_t* cu, const bool* y, int64_t S, int64_t num_traj, T sp, T sn,
                       T* g) {
  at::parallel_for(0, S, kBlock, [&](int64_t b, int64_t e) {
    blocks<T>(cu, num_traj, b, e, [&](int64_t t) { return y[t] ? T(-1) : T(1); },
              [&](int64_t lo, int64_t hi, const T* sign) {
      elementwise(z, sign, lo, hi, [&](int64_t i, auto x, auto sg) {
        using V = decltype(x);
        const V u = x * sg;
        // Correct: -sp * sigmoid(-x); wrong: sn * sigmoid(x); i.e. (sign < 0 ? -sp : sn) * sigmoid(u).
        const V coef = keep(sg < V(0), V(-sp)) + keep(sg > V(0), V(sn));
        store(g, i, keep(u < V(0), coef * sigmoid(u)));
      });
    });
  });
}

template <typename T>
inline T to_prob(T x, bool from_probs) {
  return from_probs ? x : sigmoid(x);
}

// Per-step term of the geometric/product (log) and arithmetic (p) aggregates.
template <typename V, typename T>
inline V agg_term(const V& x, bool logs, bool from_probs) {
  if (logs) {
    // log(sigmoid(x)) = -log(1 + exp(-x)); exp(-x) overflows to inf only far below the floor.
    return from_probs ? v_log(v_max(x, V(static_cast<T>(kProbFloor))))
                      : v_max(V(0) - v_log(V(1) + v_exp(V(0) - x)), V(static_cast<T>(kLogFloor)));
  }
  return from_probs ? x : sigmoid(x);
}

template <typename T, typename index_t>
void segment_aggregate_impl(const T* v, const index_t* cu, int64_t num_traj, int64_t mode, bool from_probs, T* o) {
  const bool sums = mode == kGeometric || mode == kProduct || mode == kArithmetic;
  const bool logs = mode != kArithmetic;
  at::parallel_for(0, num_traj, 16, [&](int64_t tb, int64_t te) {
    if (sums) {
      // Terms of a block into a buffer (vectorised across trajectories), then per-trajectory sums.
      T terms[kBlock];
      for (int64_t t = tb; t < te; ++t) o[t] = T(0);
      int64_t t = tb;
      for (int64_t lo = cu[tb]; lo < static_cast<int64_t>(cu[te]); lo += kBlock) {
        const int64_t hi = std::min<int64_t>(cu[te], lo + kBlock);
        int64_t i = lo;
        for (; i + Vec<T>::size() <= hi; i += Vec<T>::size())
          agg_term<Vec<T>, T>(Vec<T>::loadu(v + i), logs, from_probs).store(terms + (i - lo));
        for (; i < hi; ++i) terms[i - lo] = agg_term<T, T>(v[i], logs, from_probs);
        while (static_cast<int64_t>(cu[t + 1]) <= lo) ++t;
        for (int64_t u = t; u < te && static_cast<int64_t>(cu[u]) < hi; ++u) {
          const int64_t a = std::max<int64_t>(cu[u], lo), b = std::min<int64_t>(cu[u + 1], hi);
          if (b - a >= 2 * Vec<T>::size()) {
            o[u] += at::vec::reduce_all<T>([](Vec<T>& p, Vec<T>& q) { return p + q; }, terms + (a - lo), b - a);
          } else {
            for (int64_t k = a; k < b; ++k) o[u] += terms[k - lo];
          }
        }
      }
    }
    for (int64_t t = tb; t < te; ++t) {
      const int64_t lo = cu[t], hi = cu[t + 1], k = hi - lo;
      if (k <= 0) { o[t] = T(0); continue; }
      switch (mode) {
        case kGeometric: o[t] = std::exp(o[t] / T(k)); break;
        case kProduct: o[t] = std::exp(o[t]); break;
        case kArithmetic: o[t] = o[t] / T(k); break;
        case kMin: o[t] = to_prob(*std::min_element(v + lo, v + hi), from_probs); break;  // p is monotone in x
        default: o[t] = to_prob(v[hi - 1], from_probs);
      }
    }
  });
}

template <typename T, typename index_t>
void segment_aggregate_backward_impl(const T* go, const T* v, const index_t* cu, const T* o, int64_t S,
                                     int64_t num_traj, int64_t mode, bool from_probs, T* g) {
  // d out_t / d x_i times grad_out_t: c_t = grad_out_t / k_t (arithmetic) or c_t * out_t (geometric),
  // times the per-step derivative of the term.
  const bool arithmetic = mode == kArithmetic;
  at::parallel_for(0, S, kBlock, [&](int64_t b, int64_t e) {
    blocks<T>(cu, num_traj, b, e,
              [&](int64_t t) { return go[t] / T(cu[t + 1] - cu[t]) * (arithmetic ? T(1) : o[t]); },
              [&](int64_t lo, int64_t hi, const T* coef) {
      elementwise(v, coef, lo, hi, [&](int64_t i, auto x, auto c) {
        using V = decltype(x);
        V d;
        if (arithmetic) {
          d = from_probs ? c : c * sigmoid(x) * sigmoid(V(0) - x);
        } else if (from_probs) {
          d = keep(x >= V(static_cast<T>(kProbFloor)), c / x);
        } else {
          // d log(sigmoid(x))/dx = sigmoid(-x); zero where the clamp is active.
          d = keep(x >= V(static_cast<T>(kLogitFloor)), c * sigmoid(V(0) - x));
        }
        store(g, i, d);
      });
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
