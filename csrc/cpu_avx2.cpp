// CPU kernels with AVX2 + FMA, chosen at run time when the processor has them.
//
// Built without -mavx2 on the command line (one extension, any x86-64): the
// pragma enables the instructions for this file, and the feature macros
// (normally set by -mavx2 -mfma) make sleef.h declare its 256-bit functions,
// which libtorch_cpu exports.
#if defined(__x86_64__)
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
