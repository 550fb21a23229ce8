// What the sampling kernels (sample.cu, rejection_sample.cu) share about a row's cut: the raw value
// a log-ratio cut becomes, rounded the way the CPU kernels (csrc/cpu/kernels/sample.h) and the
// float64 oracle round it, so that every implementation keeps the same tokens.
#pragma once

namespace online_softmax::kernels {

// The raw value at or above which (x - m) s >= log_ratio.
template <typename A>
__device__ __forceinline__ A threshold_value(A m, double log_ratio, A s) {
  return static_cast<A>(static_cast<double>(m) + log_ratio / static_cast<double>(s));
}

// Finite, for a double that may be NaN or +-inf (fast-math safe: no isfinite).
__device__ __forceinline__ bool finite_value(double v) { return v == v && v < 1.0e308 && v > -1.0e308; }

}  // namespace online_softmax::kernels
