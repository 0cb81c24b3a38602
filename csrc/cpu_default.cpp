// CPU kernels for the build's default instruction set.
#define RGM_CPU_NS base
#define RGM_CPU_ISA "default"
#include "cpu_kernels.h"
