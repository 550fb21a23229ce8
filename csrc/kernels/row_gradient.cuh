// The bodies of the elementwise gradient kernels (cross_entropy_backward, token_logprobs_backward):
// each element of a row maps to one output element through per-row scalars alone (the softmax comes
// from the row's saved online state), so nothing is reduced or kept on chip. Two thread mappings, as
// their plans in launch_plan.h choose: groups of kGroup threads per row with every granule loaded
// before any is computed, and chunks of a block each for long rows and for too few rows to fill the
// GPU. Every element is read before it is written by the same thread, so out may be x (in place).
//
// Args has x, out, rows, n; Terms is built per row (or chunk) as Terms(args, row, report) (report:
// the one thread that flags a bad per-row index) and has apply<V>(args, i0, v), turning the loaded
// elements [i0, i0 + V) into their gradients. OSM_ROW_GRADIENT_KERNELS gives each op its own named
// kernels (the names its plan reports) and the launcher of its plan.
#pragma once

#include <utility>

#include "kernels/launch_plan.h"
#include "kernels/online_state.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {

// Granules each chunk thread loads before it computes, so that several 16-byte loads are in flight.
constexpr int kRowGradientUnroll = 4;

template <typename T, typename Terms, int kGroup, int kVecs, int kBlock, typename Args>
__device__ __forceinline__ void row_gradient_rows(const Args& a) {
  using A = acc_t<T>;
  constexpr int V = Granule<T>::kVec;
  constexpr int kRowsPerBlock = kBlock / kGroup;
  const int t = threadIdx.x % kGroup;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; row < a.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const T* xr = a.x + row * a.n;
    T* outr = a.out + row * a.n;
    const int head = row_head(xr);
    A v[kVecs][V];
#pragma unroll
    for (int k = 0; k < kVecs; ++k) load_elems(xr, int64_t(k * kGroup + t) * V - head, a.n, v[k], A(0));
    const Terms terms(a, row, t == 0);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int64_t i0 = int64_t(k * kGroup + t) * V - head;
      if (i0 >= a.n) break;  // granules go up with k: the rest lie past the row's end too
      terms.apply(a, i0, v[k]);
      store_elems(outr, i0, a.n, v[k]);
    }
  }
}

// Block b works on chunk b % chunks (chunk_granules granules) of row b / chunks; the grid loops.
template <typename T, typename Terms, typename Args>
__device__ __forceinline__ void row_gradient_chunks(const Args& a, int64_t chunks, int64_t chunk_granules) {
  using A = acc_t<T>;
  constexpr int V = Granule<T>::kVec;
  constexpr int kUnroll = kRowGradientUnroll;
  for (int64_t b = blockIdx.x; b < a.rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks, c = b % chunks;
    const T* xr = a.x + row * a.n;
    T* outr = a.out + row * a.n;
    const int head = row_head(xr);
    const int64_t g_end = imin(granule_count<T>(head, a.n), (c + 1) * chunk_granules);
    const Terms terms(a, row, c == 0 && threadIdx.x == 0);
    int64_t g = c * chunk_granules + threadIdx.x;
    for (; g + int64_t(kUnroll - 1) * blockDim.x < g_end; g += int64_t(kUnroll) * blockDim.x) {
      A v[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_elems(xr, (g + int64_t(u) * blockDim.x) * V - head, a.n, v[u], A(0));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i0 = (g + int64_t(u) * blockDim.x) * V - head;
        terms.apply(a, i0, v[u]);
        store_elems(outr, i0, a.n, v[u]);
      }
    }
    for (; g < g_end; g += blockDim.x) {
      A v[V];
      load_elems(xr, g * V - head, a.n, v, A(0));
      terms.apply(a, g * V - head, v);
      store_elems(outr, g * V - head, a.n, v);
    }
  }
}

}  // namespace online_softmax::kernels

// In the including file's (anonymous) namespace: name##_rows_kernel and name##_chunks_kernel over
// Args<T> and Terms<T>, and `cudaError_t name##_launch(const LaunchPlan&, const Args<T>&,
// cudaStream_t)`, which runs the plan's one launch (nothing for an empty plan).
#define OSM_ROW_GRADIENT_KERNELS(name, Args, Terms)                                                             \
  template <typename T, int kGroup, int kVecs, int kBlock>                                                      \
  __global__ void __launch_bounds__(kBlock) name##_rows_kernel(Args<T> a) {                                     \
    row_gradient_rows<T, Terms<T>, kGroup, kVecs, kBlock>(a);                                                   \
  }                                                                                                             \
  template <typename T>                                                                                         \
  __global__ void __launch_bounds__(kSplitThreads)                                                              \
      name##_chunks_kernel(Args<T> a, int64_t chunks, int64_t chunk_granules) {                                 \
    row_gradient_chunks<T, Terms<T>>(a, chunks, chunk_granules);                                                \
  }                                                                                                             \
  template <typename T, int C>                                                                                  \
  cudaError_t name##_launch_rows(const Launch& l, const Args<T>& a, cudaStream_t stream) {                      \
    constexpr RegisterConfig cfg = kRegisterConfigs[C];                                                         \
    OSM_LAUNCH(l.grid, l.block_x, 0, stream, name##_rows_kernel<T, cfg.group, cfg.vecs, cfg.block>)(a);         \
    return cudaGetLastError();                                                                                  \
  }                                                                                                             \
  template <typename T, int... Cs>                                                                              \
  cudaError_t name##_dispatch_rows(int config, std::integer_sequence<int, Cs...>, const Launch& l,              \
                                   const Args<T>& a, cudaStream_t stream) {                                     \
    cudaError_t err = cudaErrorInvalidValue;                                                                    \
    ((config == Cs ? (err = name##_launch_rows<T, Cs>(l, a, stream), 0) : 0), ...);                             \
    return err;                                                                                                 \
  }                                                                                                             \
  template <typename T>                                                                                         \
  cudaError_t name##_launch(const LaunchPlan& plan, const Args<T>& a, cudaStream_t stream) {                    \
    const Launch& l = plan.launch[0];                                                                           \
    switch (plan.path) {                                                                                        \
      case Path::kNothing:                                                                                      \
        return cudaSuccess;                                                                                     \
      case Path::kRegisters:                                                                                    \
        return name##_dispatch_rows(plan.config, std::make_integer_sequence<int, kNumRegisterConfigs>{}, l, a,  \
                                    stream);                                                                    \
      case Path::kSplit:                                                                                        \
        OSM_LAUNCH(l.grid, l.block_x, 0, stream, name##_chunks_kernel<T>)(a, plan.chunks, plan.chunk);          \
        return cudaGetLastError();                                                                              \
      default:                                                                                                  \
        return cudaErrorInvalidValue;                                                                           \
    }                                                                                                           \
  }
