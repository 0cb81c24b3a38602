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
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "rgm_ops.h"
#if defined(CPU_CAPABILITY_AVX2)
#include "cpu_avx512.h"
#include "exp_poly.h"
#endif

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
// NaN in a propagates, like at::vec::minimum.
template <typename T> inline T v_min(T a, T b) { return b < a ? b : a; }
template <typename T> inline Vec<T> v_min(const Vec<T>& a, const Vec<T>& b) { return at::vec::minimum(a, b); }
// `m ? a : b` for a bool or a lane mask.
template <typename T> inline T select(bool m, T a, T b) { return m ? a : b; }
template <typename T> inline Vec<T> select(const Vec<T>& m, const Vec<T>& a, const Vec<T>& b) { return Vec<T>::blendv(b, a, m); }
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

// Geometric and product of logits: log(clamp(sigmoid(x), 1e-10)) = -log(f) with the factor
// f = min(1 + exp(-x), 1e10) in [1, 1e10]. The log is taken of a trajectory's product of factors,
// not of every factor: the running product m is renormalised into [1, 2) by moving its binary
// exponent into an integer count k (a multiplication by a power of two, exact), so
// sum(log f) = k log 2 + log(m) costs one log per trajectory. Three factors (<= 1e30) fit between
// renormalisations in float. A NaN factor keeps m NaN.
constexpr double kFactorCeil = 1e10;  // 1 / kProbFloor
constexpr double kLn2 = 0.693147180559945309417;

inline void renorm(float& m, int64_t& k) {
  uint32_t b;
  std::memcpy(&b, &m, sizeof b);
  const int32_t e = static_cast<int32_t>((b >> 23) & 0xff) - 127;
  const uint32_t s = static_cast<uint32_t>(127 - e) << 23;  // 2^-e
  float scale;
  std::memcpy(&scale, &s, sizeof s);
  k += e;
  m *= scale;
}

inline void renorm(double& m, int64_t& k) {
  uint64_t b;
  std::memcpy(&b, &m, sizeof b);
  const int64_t e = static_cast<int64_t>((b >> 52) & 0x7ff) - 1023;
  const uint64_t s = static_cast<uint64_t>(1023 - e) << 52;
  double scale;
  std::memcpy(&scale, &s, sizeof s);
  k += e;
  m *= scale;
}

// Multiplies the factors f[0, n) into (m, k, s): sum of their logs added = (k' - k) log 2 +
// log(m' / m) + (s' - s). m enters and leaves in [1, 2).
template <typename T>
inline void log_product(const T* f, int64_t n, T& m, int64_t& k, T& s) {
  constexpr int64_t W = Vec<T>::size();
  int64_t i = 0;
  if (n >= 2 * W) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      // Eight lane products, renormalised every three vectors; no log at all.
      __m256 pm = _mm256_set1_ps(1.f);
      __m256i ke = _mm256_setzero_si256();
      const __m256i bias = _mm256_set1_epi32(127);
      auto norm = [&] {
        const __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(pm), 23), bias);
        ke = _mm256_add_epi32(ke, e);
        pm = _mm256_mul_ps(pm, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(bias, e), 23)));
      };
      for (; i + 3 * W <= n; i += 3 * W) {
        const __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(f + i), _mm256_loadu_ps(f + i + W)),
                                       _mm256_loadu_ps(f + i + 2 * W));
        pm = _mm256_mul_ps(pm, t);
        norm();
      }
      for (; i + W <= n; i += W) pm = _mm256_mul_ps(pm, _mm256_loadu_ps(f + i));
      norm();
      alignas(32) float lm[W];
      alignas(32) int32_t lk[W];
      _mm256_store_ps(lm, pm);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lk), ke);
      for (int j = 0; j < W; ++j) {  // eight factors in [1, 2): no overflow
        m *= lm[j];
        k += lk[j];
      }
      renorm(m, k);
    } else
#endif
    {
      // One vector log per three vectors of factors.
      Vec<T> ls(T(0));
      for (; i + 3 * W <= n; i += 3 * W)
        ls = ls + (Vec<T>::loadu(f + i) * Vec<T>::loadu(f + i + W) * Vec<T>::loadu(f + i + 2 * W)).log();
      Vec<T> rest(T(1));
      for (; i + W <= n; i += W) rest = rest * Vec<T>::loadu(f + i);
      s += horizontal_sum(ls + rest.log());
    }
  }
  for (int c = 0; i < n; ++i) {
    m *= f[i];
    if (++c == 3) {
      renorm(m, k);
      c = 0;
    }
  }
  renorm(m, k);
}

// exp for the factors 1 + exp(-x): on AVX2 floats the Cody-Waite reduction and Cephes polynomial of
// exp_poly.h (max relative error 8.5e-8 over [-87, 88], as Sleef's u10), a quarter cheaper than
// Sleef. Arguments are clamped to [-87.34, 88] (results about 1e-38 .. 1.7e38 instead of 0 / inf:
// the factor is clamped at 1e10 and its derivative masked there); NaN stays NaN.
template <typename T> inline T v_exp_fast(T x) { return std::exp(x); }
template <typename T> inline Vec<T> v_exp_fast(const Vec<T>& x) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    // max/min with the constant first: a NaN x is what they return.
    const __m256 c = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-87.33654f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), c);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kExpPoly[0]);
    for (int j = 1; j < kExpPolyTerms; ++j) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[j]));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return Vec<T>(_mm256_mul_ps(y, _mm256_castsi256_ps(two_n)));
  }
#endif
  return x.exp();
}

// One step's term of a sum aggregate and, with d, its derivative for the backward:
//   factors (geometric / product of logits): f = min(1 + exp(-x), 1e10); d = sigmoid(-x), 0 where clamped;
//   logs (geometric / product of probabilities): log(max(p, 1e-10)); d = 1/p, 0 where clamped;
//   arithmetic: p; d = p (1 - p) for logits, 1 for probabilities.
template <typename V, typename T>
inline void agg_step(const V& x, int64_t i, int64_t lo, bool factors, bool logs, bool from_probs, T* terms, T* d) {
  if (factors) {
    const V e = v_exp_fast(V(0) - x), a = V(1) + e;
    store(terms, i - lo, v_min(a, V(static_cast<T>(kFactorCeil))));
    if (d) store(d, i, keep(x >= V(static_cast<T>(kLogitFloor)), e / a));
  } else if (logs) {
    store(terms, i - lo, v_log(v_max(x, V(static_cast<T>(kProbFloor)))));
    if (d) store(d, i, keep(x >= V(static_cast<T>(kProbFloor)), V(1) / x));
  } else if (from_probs) {
    store(terms, i - lo, x);
    if (d) store(d, i, V(1));
  } else {
    // sigmoid(x) and sigmoid(x) sigmoid(-x) from e = exp(-|x|) <= 1, which never overflows.
    const V e = v_exp(V(0) - v_abs(x)), r = V(1) / (V(1) + e);
    store(terms, i - lo, select(x >= V(0), r, e * r));
    if (d) store(d, i, e * r * r);
  }
}

// Threads pay off only for enough work: a task gets at least this many steps on average.
constexpr int64_t kStepsPerTask = 32768;

inline int64_t traj_grain(int64_t steps, int64_t num_traj) {
  return steps > 0 ? std::max<int64_t>(1, num_traj * kStepsPerTask / steps) : std::max<int64_t>(1, num_traj);
}

// The 512-bit factor kernels where they exist (float, AVX2 unit); never called otherwise.
template <typename T>
inline void wide_factors(const T* v, int64_t lo, int64_t hi, T* terms, T* d) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    avx512::factors(v, lo, hi, terms, d, static_cast<float>(kFactorCeil), static_cast<float>(kLogitFloor));
    return;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "no 512-bit kernels in this build");
}

template <typename T>
inline void wide_log_product(const T* f, int64_t n, T& m, int64_t& k) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    avx512::log_product(f, n, m, k);
    renorm(m, k);
    return;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "no 512-bit kernels in this build");
}

// o[t] = aggregate of trajectory t; with d (sum modes only), d[i] = d(term_i)/dx_i for the backward.
// Wide: the factors of float logits run in 512-bit vectors (cpu_avx512.h; AVX2 unit only).
template <bool Wide, typename T, typename index_t>
void segment_aggregate_impl(const T* v, const index_t* cu, int64_t num_traj, int64_t mode, bool from_probs, T* o,
                            T* d) {
  constexpr int64_t W = Vec<T>::size();
  constexpr bool wide = Wide && std::is_same_v<T, float>;
  const bool sums = mode == kGeometric || mode == kProduct || mode == kArithmetic;
  const bool logs = mode != kArithmetic;
  const bool factors = sums && logs && !from_probs;
  const int64_t S = num_traj > 0 ? static_cast<int64_t>(cu[num_traj]) : 0;
  at::parallel_for(0, num_traj, traj_grain(S, num_traj), [&](int64_t tb, int64_t te) {
    if (!sums) {
      for (int64_t t = tb; t < te; ++t) {
        const int64_t lo = cu[t], hi = cu[t + 1];
        if (hi <= lo) o[t] = T(0);
        else if (mode == kMin) o[t] = to_prob(*std::min_element(v + lo, v + hi), from_probs);  // p is monotone in x
        else o[t] = to_prob(v[hi - 1], from_probs);
      }
      return;
    }
    // Terms of a block into a buffer (vectorised across trajectories), then per-trajectory sums
    // (o[t]) or products (mant[t - tb], o[t] collecting log 2 counts and any logs taken).
    std::vector<T> mant(factors ? te - tb : 0, T(1));
    T terms[kBlock];
    for (int64_t t = tb; t < te; ++t) o[t] = T(0);
    int64_t t = tb;
    for (int64_t lo = cu[tb]; lo < static_cast<int64_t>(cu[te]); lo += kBlock) {
      const int64_t hi = std::min<int64_t>(cu[te], lo + kBlock);
      if (wide && factors) {
        wide_factors(v, lo, hi, terms, d);
      } else {
        int64_t i = lo;
        for (; i + W <= hi; i += W) agg_step<Vec<T>, T>(Vec<T>::loadu(v + i), i, lo, factors, logs, from_probs, terms, d);
        for (; i < hi; ++i) agg_step<T, T>(v[i], i, lo, factors, logs, from_probs, terms, d);
      }
      while (static_cast<int64_t>(cu[t + 1]) <= lo) ++t;
      for (int64_t u = t; u < te && static_cast<int64_t>(cu[u]) < hi; ++u) {
        const int64_t a = std::max<int64_t>(cu[u], lo), b = std::min<int64_t>(cu[u + 1], hi);
        if (factors) {
          int64_t k = 0;
          if (wide && b - a >= 32) wide_log_product(terms + (a - lo), b - a, mant[u - tb], k);
          else log_product(terms + (a - lo), b - a, mant[u - tb], k, o[u]);
          o[u] += static_cast<T>(k) * static_cast<T>(kLn2);
        } else if (b - a >= 2 * W) {
          o[u] += at::vec::reduce_all<T>([](Vec<T>& p, Vec<T>& q) { return p + q; }, terms + (a - lo), b - a);
        } else {
          for (int64_t j = a; j < b; ++j) o[u] += terms[j - lo];
        }
      }
    }
    // Finish in vectors over trajectories: sum of log p = -(o + log(mant)) for factors.
    for (int64_t t0 = tb; t0 < te; t0 += kBlock) {
      const int64_t t1 = std::min(te, t0 + kBlock);
      T* cnt = terms;
      for (int64_t u = t0; u < t1; ++u) cnt[u - t0] = static_cast<T>(cu[u + 1] - cu[u]);
      auto finish = [&](int64_t u, auto s, auto n, auto m) {
        using V = decltype(s);
        const V total = factors ? V(0) - (s + v_log(m)) : s;
        V r;
        if (mode == kProduct) r = v_exp(total);
        else if (mode == kGeometric) r = v_exp(total / v_max(n, V(1)));
        else r = total / v_max(n, V(1));
        store(o, u, keep(n > V(0), r));  // no steps: 0
      };
      const T* mp = factors ? mant.data() + (t0 - tb) : nullptr;
      int64_t u = t0;
      for (; u + W <= t1; u += W)
        finish(u, Vec<T>::loadu(o + u), Vec<T>::loadu(cnt + (u - t0)), mp ? Vec<T>::loadu(mp + (u - t0)) : Vec<T>(T(1)));
      for (; u < t1; ++u) finish(u, o[u], cnt[u - t0], mp ? mp[u - t0] : T(1));
    }
  });
}

// Backward from the forward's saved derivatives: g_i = c_t d_i with c_t = grad_out_t out_t / k_t
// (geometric) or grad_out_t / k_t (arithmetic). go has stride gs (the grad of a sum is an expanded 1).
template <typename T, typename index_t>
void segment_aggregate_backward_saved_impl(const T* go, int64_t gs, const T* d, const index_t* cu, const T* o,
                                           int64_t S, int64_t num_traj, int64_t mode, T* g) {
  const bool arithmetic = mode == kArithmetic;
  at::parallel_for(0, S, kStepsPerTask, [&](int64_t b, int64_t e) {
    for_pieces(cu, num_traj, b, e, [&](int64_t lo, int64_t hi, int64_t t) {
      const T c = go[t * gs] / T(cu[t + 1] - cu[t]) * (arithmetic ? T(1) : o[t]);
      const Vec<T> vc(c);
      int64_t i = lo;
      for (; i + Vec<T>::size() <= hi; i += Vec<T>::size()) (vc * Vec<T>::loadu(d + i)).store(g + i);
      for (; i < hi; ++i) g[i] = c * d[i];
    });
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

// out [T] and, when with_grad (geometric / arithmetic), the per-step derivatives the backward multiplies.
template <bool Wide>
std::vector<torch::Tensor> aggregate_cpu(const torch::Tensor& values, const torch::Tensor& cu_steps, int64_t mode,
                                         bool from_probs, bool with_grad) {
  auto v = widened(values);
  auto cu = cu_steps.contiguous();
  auto out = torch::empty({cu.numel() - 1}, v.options());
  torch::Tensor d;
  if (with_grad) d = torch::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "segment_aggregate", [&] {
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_aggregate_idx", [&] {
      segment_aggregate_impl<Wide, scalar_t, index_t>(v.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), cu.numel() - 1,
                                                      mode, from_probs, out.data_ptr<scalar_t>(),
                                                      with_grad ? d.data_ptr<scalar_t>() : nullptr);
    });
  });
  if (with_grad) return {out, d};
  return {out};
}

template <bool Wide>
torch::Tensor segment_aggregate_cpu(const torch::Tensor& values, const torch::Tensor& cu_steps, int64_t mode,
                                    bool from_probs) {
  return aggregate_cpu<Wide>(values, cu_steps, mode, from_probs, false)[0];
}

template <bool Wide>
std::vector<torch::Tensor> segment_aggregate_train_cpu(const torch::Tensor& values, const torch::Tensor& cu_steps,
                                                       int64_t mode, bool from_probs) {
  TORCH_CHECK(mode == kGeometric || mode == kArithmetic,
              "segment_aggregate backward is implemented for geometric and arithmetic only");
  return aggregate_cpu<Wide>(values, cu_steps, mode, from_probs, true);
}

torch::Tensor segment_aggregate_backward_saved_cpu(const torch::Tensor& grad_out, const torch::Tensor& derivs,
                                                   const torch::Tensor& cu_steps, const torch::Tensor& out,
                                                   int64_t mode) {
  TORCH_CHECK(mode == kGeometric || mode == kArithmetic,
              "segment_aggregate backward is implemented for geometric and arithmetic only");
  auto d = derivs.contiguous();
  auto cu = cu_steps.contiguous();
  auto o = out.to(d.scalar_type()).contiguous();
  auto go = grad_out.to(d.scalar_type());
  auto g = torch::empty_like(d);
  if (d.numel() == 0) return g;
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "segment_aggregate_bwd_saved", [&] {
    AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_aggregate_bwd_saved_idx", [&] {
      segment_aggregate_backward_saved_impl<scalar_t, index_t>(
          go.data_ptr<scalar_t>(), go.stride(0), d.data_ptr<scalar_t>(), cu.data_ptr<index_t>(),
          o.data_ptr<scalar_t>(), d.numel(), cu.numel() - 1, mode, g.data_ptr<scalar_t>());
    });
  });
  return g;
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

template <bool Wide>
CpuKernels make_kernels(const char* isa) {
  return CpuKernels{isa,
                    spr_stats_cpu,
                    spr_backward_cpu,
                    segment_aggregate_cpu<Wide>,
                    segment_aggregate_backward_cpu,
                    segment_aggregate_train_cpu<Wide>,
                    segment_aggregate_backward_saved_cpu};
}

}  // namespace

CpuKernels kernels() { return make_kernels<false>(RGM_CPU_ISA); }
#if defined(CPU_CAPABILITY_AVX2)
// The AVX2 kernels with the geometric / product of float logits in 512-bit vectors (AVX-512F).
CpuKernels kernels_avx512() { return make_kernels<true>("avx512"); }
#endif

}  // namespace RGM_CPU_NS
}  // namespace rgm
