// Headers the per-ISA kernel files use, included by avx2.cpp and avx512.cpp *before* their target
// pragma. Functions and templates declared here keep the baseline ISA even when a kernel compiled
// for AVX2 or AVX-512 instantiates them (GCC takes a function's target from where it is declared).
// So the out-of-line copies the linker keeps of, say, std::vector<float>'s constructor never carry
// AVX instructions into code that runs on a CPU without them. tests/ops/test_cpu_dispatch.py checks
// the built library for exactly that.
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <ostream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/dispatch.h"
// Shared with the CUDA kernels, so outside the per-capability namespaces: declared here, its
// functions keep the baseline ISA in every capability's file (one copy of each symbol).
#include "kernels/distillation_math.h"
