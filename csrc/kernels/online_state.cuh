// The online softmax state (m, d) on the GPU and the one merge every kernel uses: inside a thread,
// across a warp (shuffle butterfly), across a block (shared memory) and across blocks (a workspace
// of partial states merged by a second kernel). Framework-free: CUDA runtime and fp16/bf16 headers.
//
// Conventions (the same as the CPU kernels, csrc/cpu/online_state.h):
//  * s = 1 / temperature. A state over raw values x holds m = max(x) and d = sum(exp((x - m) * s)),
//    so softmax(x / t) = exp((x - m) * s) / d. Subtracting before scaling keeps (x - m) exact for
//    1e4-scale logits.
//  * While scanning, m starts at the lowest finite value instead of -inf, so a -inf element adds
//    exp(-inf) = 0 instead of exp(-inf - -inf) = NaN with no per-element guard. `finalize` maps a
//    state that saw nothing finite (d == 0) back to m = -inf, the merge identity, and marks rows
//    whose max is +inf or NaN with d = NaN: torch.softmax returns NaN for the whole row then.
//  * The max propagates NaN (fmaxf would drop it): a NaN anywhere makes the row NaN, as in torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "kernels/launchers.h"
#include "kernels/seam.cuh"

namespace online_softmax::kernels {

// float accumulation for float32/float16/bfloat16, double for float64 (AccOf: launchers.h).
template <typename T> using acc_t = typename AccOf<T>::type;

template <typename A> struct Limits;
template <> struct Limits<float> {
  __device__ static float lowest() { return -FLT_MAX; }
  __device__ static float inf() { return __int_as_float(0x7f800000); }
  __device__ static float nan() { return __int_as_float(0x7fffffff); }
};
template <> struct Limits<double> {
  __device__ static double lowest() { return -DBL_MAX; }
  __device__ static double inf() { return __longlong_as_double(0x7ff0000000000000LL); }
  __device__ static double nan() { return __longlong_as_double(0x7fffffffffffffffLL); }
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename O> __device__ __forceinline__ O from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename O> __device__ __forceinline__ O from_acc(double v) { return v; }

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename A>
__device__ __forceinline__ bool is_nan(A v) { return v != v; }

// max that keeps NaN: once m is NaN it stays NaN.
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) { return (b > a || is_nan(b)) ? b : a; }

// exp(z * s) for the pre-scaled exponent the kernels carry: float uses exp2f with s * log2(e)
// folded into one multiply (the SFU's ex2); double keeps the accurate exp.
template <typename A> struct Exp;
template <> struct Exp<float> {
  static constexpr float kLog2e = 1.4426950408889634f;
  // s2 with exp((x-m)*s) = exp2((x-m)*s2). Clamped: for 1/t above 2.36e38 the product would be
  // +inf and 0 * inf = NaN at the row max; any finite huge s2 gives the same exp2 results.
  __device__ static float scale(float s) { return fminf(s * kLog2e, FLT_MAX); }
  __device__ static float of(float z2) { return exp2f(z2); }
};
template <> struct Exp<double> {
  __device__ static double scale(double s) { return s; }
  __device__ static double of(double z) { return exp(z); }
};

template <typename A>
struct State {
  A m;
  A d;
  __device__ static State empty() { return {Limits<A>::lowest(), A(0)}; }
};

// exp((m_old - m_new) * s), exactly 1 when the maxima agree (also for two empty states).
template <typename A>
__device__ __forceinline__ A rescale(A m_old, A m_new, A s2) {
  return m_old == m_new ? A(1) : Exp<A>::of((m_old - m_new) * s2);
}

// The one merge: m = max(m1, m2), d = d1 exp((m1 - m) s) + d2 exp((m2 - m) s).
template <typename A>
__device__ __forceinline__ State<A> merge(State<A> a, State<A> b, A s2) {
  const A m = nan_max(a.m, b.m);
  return {m, a.d * rescale(a.m, m, s2) + b.d * rescale(b.m, m, s2)};
}

// The state of `count` values already in registers: max first, then one exp per value.
template <typename A, int N>
__device__ __forceinline__ State<A> state_of(const A (&v)[N], A s2) {
  A m = Limits<A>::lowest();
#pragma unroll
  for (int i = 0; i < N; ++i) m = nan_max(m, v[i]);
  A d = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) d += Exp<A>::of((v[i] - m) * s2);
  return {m, d};
}

// Folds N more values into a running state: one rescale per group, not per element.
template <typename A, int N>
__device__ __forceinline__ void update(State<A>& st, const A (&v)[N], A s2) {
  st = merge(st, state_of(v, s2), s2);
}

template <typename A>
__device__ __forceinline__ State<A> finalize(State<A> st) {
  if (st.d == A(0)) st.m = -Limits<A>::inf();
  if (is_nan(st.m) || st.m == Limits<A>::inf()) st.d = Limits<A>::nan();
  return st;
}

// What an output pass needs from a finalized state. A row without a finite max (all -inf, or with
// +inf/NaN) gets NaN factors, so every output of that row is NaN, as in torch.
template <typename A>
struct Normalizer {
  A m;      // subtracted before scaling
  A s;      // 1 / temperature (log-softmax)
  A s2;     // the exp scale (see Exp)
  A inv_d;  // softmax factor
  A log_d;  // log-softmax offset
  Normalizer() = default;
  __device__ Normalizer(State<A> st, A s_) : s(s_), s2(Exp<A>::scale(s_)) {
    const bool finite = st.m > -Limits<A>::inf() && st.m < Limits<A>::inf();
    m = finite ? st.m : A(0);
    inv_d = finite ? A(1) / st.d : Limits<A>::nan();
    log_d = finite ? log(st.d) : Limits<A>::nan();
  }
  __device__ __forceinline__ A prob(A x) const { return Exp<A>::of((x - m) * s2) * inv_d; }
  __device__ __forceinline__ A log_prob(A x) const { return (x - m) * s - log_d; }
  __device__ __forceinline__ A out(A x, bool log) const { return log ? log_prob(x) : prob(x); }
};

// ---- cross-thread merges ----

template <typename A>
__device__ __forceinline__ State<A> shfl_xor(State<A> st, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, st.m, lane_mask), __shfl_xor_sync(0xffffffffu, st.d, lane_mask)};
}

// Butterfly over groups of kWidth consecutive lanes (a power of two <= 32): every lane of a group
// ends with the group's state. All 32 lanes of the warp must call it.
template <int kWidth, typename A>
__device__ __forceinline__ State<A> warp_merge(State<A> st, A s2) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) st = merge(st, shfl_xor(st, offset), s2);
  return st;
}

template <int kWidth, typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Every thread of the block gets the block's state. `scratch` holds one state per warp; the
// trailing barrier lets the caller reuse it at once.
template <typename A>
__device__ __forceinline__ State<A> block_merge(State<A> st, A s2, State<A>* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  st = warp_merge<32>(st, s2);
  if (lane == 0) scratch[warp] = st;
  __syncthreads();
  State<A> r = scratch[0];
  for (int w = 1; w < warps; ++w) r = merge(r, scratch[w], s2);
  __syncthreads();
  return r;
}

template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = warp_sum<32>(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A r = 0;
  for (int w = 0; w < warps; ++w) r += scratch[w];
  __syncthreads();
  return r;
}

template <typename A>
__device__ __forceinline__ A block_max(A v, A* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A r = scratch[0];
  for (int w = 1; w < warps; ++w) r = nan_max(r, scratch[w]);
  __syncthreads();
  return r;
}

}  // namespace online_softmax::kernels
