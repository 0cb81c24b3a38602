// The constants of the float exp shared by the AVX2 and AVX-512 kernels (cpu_kernels.h v_exp_fast,
// cpu_avx512.h exp16): x = n ln2 + r with n = round(x log2 e) and ln 2 split in two parts (Cody-Waite),
// exp(r) ~ 1 + r + r^2 P(r) with Cephes' degree-5 P of expf (max relative error 8.5e-8), then 2^n.
// Each kernel evaluates P by Horner over kExpPoly in its own vector width.
#pragma once

namespace rgm {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr int kExpPolyTerms = 6;
constexpr float kExpPoly[kExpPolyTerms] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                           4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

}  // namespace rgm
