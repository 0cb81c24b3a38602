// CPU kernels with AVX2 + FMA, chosen at run time when the processor has them.
//
// Built without -mavx2 on the command line (one extension, any x86-64): the
// pragma enables the instructions for this file, and the feature macros
// (normally set by -mavx2 -mfma) make sleef.h declare its 256-bit functions,
// which libtorch_cpu exports.
//
// The standard library and the torch headers that do not depend on the
// instruction set are included first, outside the pragma: GCC 13's libstdc++
// marks std::allocator's members always_inline, and compiled under a target
// pragma they no longer inline into their callers ("inlining failed in call to
// 'always_inline' ... target specific option mismatch", GCC bug 109753).
// Only at::vec and the kernels are compiled under it.
#if defined(__x86_64__)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#pragma GCC target("avx,avx2,fma,f16c")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#define RGM_CPU_NS avx2
#define RGM_CPU_ISA "avx2"
#include "cpu_kernels.h"
#endif
