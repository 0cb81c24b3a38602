// 512-bit kernels of the geometric / product aggregate of float logits, the hot path of Best-of-N
// scoring and of the geometric benchmark. Compiled inside the AVX2 translation unit with a
// function-level target (the extension has one translation unit per at::vec capability, and
// at::vec can hold only one per unit), and used only when the processor has AVX-512F
// (cpu_isa() == "avx512"). Same math as the AVX2 path in cpu_kernels.h: factors
// f = min(1 + exp(-x), 1e10), derivatives sigmoid(-x) (0 where the clamp is active), and the log
// of a product of factors kept in [1, 2) by moving binary exponents into an integer count.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "exp_poly.h"

#define RGM_AVX512 __attribute__((target("avx512f")))

namespace rgm {
namespace avx512 {

// exp(c) for c in [-100, 100] (clamped by the caller), as exp_poly.h; scalef for 2^n (overflow to inf,
// underflow to 0).
RGM_AVX512 inline __m512 exp16(__m512 c) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), c);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int j = 1; j < kExpPolyTerms; ++j) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[j]));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

// Steps [lo, hi): terms[i - lo] = min(1 + exp(-v[i]), 1e10); with d, d[i] = exp(-x) / (1 + exp(-x))
// where v[i] >= logit_floor, else 0. The last partial vector runs under a lane mask.
RGM_AVX512 __attribute__((noinline)) inline void factors(const float* v, int64_t lo, int64_t hi, float* terms,
                                                         float* d, float ceil, float logit_floor) {
  const __m512 vceil = _mm512_set1_ps(ceil), vfloor = _mm512_set1_ps(logit_floor), one = _mm512_set1_ps(1.f);
  const __m512 lo_c = _mm512_set1_ps(-100.f), hi_c = _mm512_set1_ps(100.f);
  for (int64_t i = lo; i < hi; i += 16) {
    const __mmask16 lanes = hi - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (hi - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(lanes, v + i);
    // max / min with the constant first return x when x is NaN, so NaN stays NaN.
    const __m512 c = _mm512_min_ps(hi_c, _mm512_max_ps(lo_c, _mm512_sub_ps(_mm512_setzero_ps(), x)));
    const __m512 e = exp16(c), a = _mm512_add_ps(one, e);
    _mm512_mask_storeu_ps(terms + (i - lo), lanes, _mm512_min_ps(vceil, a));
    if (d) {
      const __mmask16 live = _mm512_cmp_ps_mask(x, vfloor, _CMP_GE_OQ);
      _mm512_mask_storeu_ps(d + i, lanes, _mm512_maskz_div_ps(live, e, a));
    }
  }
}

// Multiplies the factors f[0, n) (each in [1, 1e10], or NaN) into m (in [1, 2)) and k:
// sum(log f) is added to k log 2 + log m (m leaves in [1, 2^16): the caller renormalises it).
// Sixteen lane products, renormalised every three vectors.
RGM_AVX512 inline void renorm16(__m512& pm, __m512& ke) {
  ke = _mm512_add_ps(ke, _mm512_getexp_ps(pm));                      // floor(log2 pm), exact
  pm = _mm512_getmant_ps(pm, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  // pm / 2^that, in [1, 2)
}

RGM_AVX512 __attribute__((noinline)) inline void log_product(const float* f, int64_t n, float& m, int64_t& k) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 pm = one, ke = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 48 <= n; i += 48) {
    const __m512 t = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(f + i), _mm512_loadu_ps(f + i + 16)),
                                   _mm512_loadu_ps(f + i + 32));
    pm = _mm512_mul_ps(pm, t);
    renorm16(pm, ke);
  }
  for (; i < n; i += 16) {  // at most three more vectors, the last under a lane mask (padding 1)
    const __mmask16 lanes = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    pm = _mm512_mul_ps(pm, _mm512_mask_loadu_ps(one, lanes, f + i));
  }
  renorm16(pm, ke);
  alignas(64) float lm[16];
  alignas(64) int32_t lk[16];
  _mm512_store_ps(lm, pm);
  _mm512_store_si512(lk, _mm512_cvtps_epi32(ke));  // exact integers (NaN lanes: m is NaN anyway)
  float mm = m;
  for (int j = 0; j < 16; ++j) {
    mm *= lm[j];  // sixteen factors in [1, 2): no overflow
    k += lk[j];
  }
  m = mm;
}

}  // namespace avx512
}  // namespace rgm
