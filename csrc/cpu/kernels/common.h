// What every per-ISA kernel file needs. Everything here lives in online_softmax::cpu::CPU_CAPABILITY
// (an inline namespace, as in ATen's vec headers), so the DEFAULT, AVX2 and AVX512 copies of the
// kernels never share a symbol.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <type_traits>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/online_state.h"
#include "cpu/row_split.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {

// Calls fn(T{}) for the element type T of `dtype` (the op layer has checked it already).
template <typename Fn>
void with_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kDouble: return fn(double{});
    case at::kHalf: return fn(at::Half{});
    case at::kBFloat16: return fn(at::BFloat16{});
    default: TORCH_CHECK(false, "online_softmax.", op, ": no CPU kernel for dtype ", dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
