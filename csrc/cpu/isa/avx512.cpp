// The CPU kernels for AVX-512 (F, BW, VL, DQ, as ATen's AVX512 kernels use). See avx2.cpp for why
// a pragma and hand-set macros.
#include "cpu/isa/baseline_headers.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/kernels/table.h"
