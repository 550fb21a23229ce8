// The CPU kernels for AVX2 (with FMA and F16C). A pragma rather than a command-line flag, so that
// one extension build compiles every capability. It follows the baseline headers (see
// baseline_headers.h) and precedes ATen's vec headers and the kernels; the macros -mavx2 would
// define are set by hand because the pragma does not set them in C++, and sleef.h (through ATen's
// vec headers) declares its AVX2 functions only under __AVX2__.
#include "cpu/isa/baseline_headers.h"

#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/kernels/table.h"
