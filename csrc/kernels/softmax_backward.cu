// CUDA backward of forward, from its output y alone (s = 1 / temperature):
//   softmax:     dx = s * y * (dy - sum(dy * y))
//   log_softmax: dx = s * (dy - exp(y) * sum(dy))
// The same row mapping as the forward (launch_plan.h): dy and y held in registers or shared memory
// between the reduction and the write (2 reads + 1 write), or split over blocks with a workspace of
// partial sums for long rows and few rows.
#include <utility>

#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/smem_opt_in.cuh"
#include "kernels/strided_io.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace {

template <typename T>
using A_t = acc_t<T>;

constexpr int kUnroll = 4;

template <typename A>
__device__ __forceinline__ A accurate_exp(A v) { return exp(v); }

// The term a row sums, and the gradient given the row's sum.
template <typename A>
__device__ __forceinline__ A reduce_term(A g, A y, bool log) { return log ? g : g * y; }

template <typename A>
__device__ __forceinline__ A grad(A g, A y, A total, A s, bool log) {
  return log ? (g - accurate_exp(y) * total) * s : y * (g - total) * s;
}

template <typename Y, typename X, int kGroup, int kVecs, int kBlock>
__global__ void __launch_bounds__(kBlock)
    register_rows_backward_kernel(const Y* __restrict__ dy, const Y* __restrict__ y, X* __restrict__ dx,
                                  int64_t rows, int64_t n, A_t<Y> s, bool log) {
  using A = A_t<Y>;
  constexpr int V = Granule<Y>::kVec;
  constexpr int kRowsPerBlock = kBlock / kGroup;
  static_assert(kGroup <= 32 || kGroup == kBlock, "a row is a sub-warp, a warp or the whole block");
  __shared__ A scratch[32];
  const int t = threadIdx.x % kGroup;
  for (int64_t base = int64_t(blockIdx.x) * kRowsPerBlock; base < rows;
       base += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + threadIdx.x / kGroup;
    const bool active = row < rows;
    const Y* yr = y + (active ? row : 0) * n;
    const Y* gr = dy + (active ? row : 0) * n;
    const int head = row_head(yr);
    A vy[kVecs][V], vg[kVecs][V];
    A total = 0;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int64_t i0 = int64_t(k * kGroup + t) * V - head;
      load_elems(yr, i0, active ? n : 0, vy[k], A(0));
      load_elems(gr, i0, active ? n : 0, vg[k], A(0));
#pragma unroll
      for (int j = 0; j < V; ++j) total += reduce_term(vg[k][j], vy[k][j], log);
    }
    if constexpr (kGroup <= 32) {
      total = warp_sum<kGroup>(total);
    } else {
      total = block_sum(total, scratch);
    }
    if (!active) continue;
    X* xr = dx + row * n;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      A out[V];
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = grad(vg[k][j], vy[k][j], total, s, log);
      store_elems(xr, int64_t(k * kGroup + t) * V - head, n, out);
    }
  }
}

// Sum of the terms of granules [g_begin, g_end) by this thread (every blockDim.x-th granule);
// keep(g, vg, vy) sees every granule (the shared-memory kernel caches them).
template <typename Y, typename Keep>
__device__ __forceinline__ A_t<Y> sum_granules(const Y* gr, const Y* yr, int64_t n, int head, int64_t g_begin,
                                               int64_t g_end, bool log, Keep&& keep) {
  using A = A_t<Y>;
  constexpr int V = Granule<Y>::kVec;
  A total = 0;
  int64_t g = g_begin + threadIdx.x;
  for (; g + int64_t(kUnroll - 1) * blockDim.x < g_end; g += int64_t(kUnroll) * blockDim.x) {
    A vg[kUnroll][V], vy[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i0 = (g + int64_t(u) * blockDim.x) * V - head;
      load_elems(gr, i0, n, vg[u], A(0));
      load_elems(yr, i0, n, vy[u], A(0));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < V; ++j) total += reduce_term(vg[u][j], vy[u][j], log);
      keep(g + int64_t(u) * blockDim.x, vg[u], vy[u]);
    }
  }
  for (; g < g_end; g += blockDim.x) {
    A vg[V], vy[V];
    load_elems(gr, g * V - head, n, vg, A(0));
    load_elems(yr, g * V - head, n, vy, A(0));
#pragma unroll
    for (int j = 0; j < V; ++j) total += reduce_term(vg[j], vy[j], log);
    keep(g, vg, vy);
  }
  return total;
}

// A block per row; dy and y cached in dynamic shared memory as Y.
template <typename Y, typename X>
__global__ void __launch_bounds__(512)
    shared_row_backward_kernel(const Y* __restrict__ dy, const Y* __restrict__ y, X* __restrict__ dx,
                               int64_t rows, int64_t n, A_t<Y> s, bool log) {
  using A = A_t<Y>;
  constexpr int V = Granule<Y>::kVec;
  OSM_DYNAMIC_SHARED(cache_bytes);
  __shared__ A scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const Y* yr = y + row * n;
    const Y* gr = dy + row * n;
    const int head = row_head(yr);
    const int64_t granules = granule_count<Y>(head, n);
    Y* cache_y = reinterpret_cast<Y*>(cache_bytes);
    Y* cache_g = cache_y + granules * V;
    A total = sum_granules(gr, yr, n, head, 0, granules, log,
                           [&](int64_t g, const A(&vg)[V], const A(&vy)[V]) {
#pragma unroll
                             for (int j = 0; j < V; ++j) {
                               cache_g[g * V + j] = from_acc<Y>(vg[j]);
                               cache_y[g * V + j] = from_acc<Y>(vy[j]);
                             }
                           });
    total = block_sum(total, scratch);  // its barriers also publish the cache
    X* xr = dx + row * n;
    for (int64_t g = threadIdx.x; g < granules; g += blockDim.x) {
      A out[V];
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = grad(to_acc(cache_g[g * V + j]), to_acc(cache_y[g * V + j]), total, s, log);
      store_elems(xr, g * V - head, n, out);
    }
    __syncthreads();  // the next row overwrites the cache
  }
}

template <typename Y>
__global__ void __launch_bounds__(256)
    partial_sums_kernel(const Y* __restrict__ dy, const Y* __restrict__ y, A_t<Y>* __restrict__ partial,
                        int64_t rows, int64_t n, int64_t chunks, int64_t chunk_granules, bool log) {
  using A = A_t<Y>;
  constexpr int V = Granule<Y>::kVec;
  __shared__ A scratch[32];
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks, c = b % chunks;
    const Y* yr = y + row * n;
    const int head = row_head(yr);
    const int64_t granules = granule_count<Y>(head, n);
    const A total = sum_granules(dy + row * n, yr, n, head, c * chunk_granules,
                                 imin(granules, (c + 1) * chunk_granules), log,
                                 [](int64_t, const A(&)[V], const A(&)[V]) {});
    const A merged = block_sum(total, scratch);
    if (threadIdx.x == 0) partial[b] = merged;
  }
}

template <typename Y, typename X>
__global__ void __launch_bounds__(256)
    split_backward_kernel(const Y* __restrict__ dy, const Y* __restrict__ y, X* __restrict__ dx,
                          const A_t<Y>* __restrict__ partial, int64_t rows, int64_t n, int64_t chunks,
                          int64_t chunk_granules, A_t<Y> s, bool log) {
  using A = A_t<Y>;
  constexpr int V = Granule<Y>::kVec;
  __shared__ A scratch[32];
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks, c = b % chunks;
    A total = 0;
    for (int64_t p = threadIdx.x; p < chunks; p += blockDim.x) total += partial[row * chunks + p];
    total = block_sum(total, scratch);
    const Y* yr = y + row * n;
    const Y* gr = dy + row * n;
    X* xr = dx + row * n;
    const int head = row_head(yr);
    const int64_t granules = granule_count<Y>(head, n);
    const int64_t g_end = imin(granules, (c + 1) * chunk_granules);
    for (int64_t g = c * chunk_granules + threadIdx.x; g < g_end; g += blockDim.x) {
      A vg[V], vy[V];
      load_elems(gr, g * V - head, n, vg, A(0));
      load_elems(yr, g * V - head, n, vy, A(0));
#pragma unroll
      for (int j = 0; j < V; ++j) vg[j] = grad(vg[j], vy[j], total, s, log);
      store_elems(xr, g * V - head, n, vg);
    }
  }
}

// ---- softmax dim with stride inner > 1 (layout as in the forward: strided_io.cuh) ----

// dy and y per thread and column: half the forward's register cache.
constexpr int kStridedBackwardCache = kStridedCache / 2;

// This thread's column sums over positions j_begin + threadIdx.y + r * blockDim.y of
// [j_begin, j_end). With kKeep the caller guarantees one group covers the range, and dy and y stay
// in the caches.
template <bool kKeep, int kCols, typename Y, typename A>
__device__ __forceinline__ void sum_columns(const Y* gc, const Y* yc, int64_t inner, int count, int64_t j_begin,
                                            int64_t j_end, bool log, A (&total)[kCols],
                                            A (&cache_g)[kStridedBackwardCache][kCols],
                                            A (&cache_y)[kStridedBackwardCache][kCols]) {
#pragma unroll
  for (int c = 0; c < kCols; ++c) total[c] = 0;
  const int64_t step = blockDim.y;
  for (int64_t j0 = j_begin + threadIdx.y; j0 < j_end; j0 += step * kStridedBackwardCache) {
    A vg[kStridedBackwardCache][kCols], vy[kStridedBackwardCache][kCols];
#pragma unroll
    for (int r = 0; r < kStridedBackwardCache; ++r) {
      const int64_t j = j0 + r * step;
      const int64_t at = (j < j_end ? j : j_begin) * inner;
      load_columns<kCols>(gc + at, j < j_end ? count : 0, vg[r], A(0));
      load_columns<kCols>(yc + at, j < j_end ? count : 0, vy[r], A(0));
    }
#pragma unroll
    for (int r = 0; r < kStridedBackwardCache; ++r)
#pragma unroll
      for (int c = 0; c < kCols; ++c) total[c] += reduce_term(vg[r][c], vy[r][c], log);
    if constexpr (kKeep) {
#pragma unroll
      for (int r = 0; r < kStridedBackwardCache; ++r)
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          cache_g[r][c] = vg[r][c];
          cache_y[r][c] = vy[r][c];
        }
    }
  }
}

// Sums over the blockDim.y threads of each column group; every thread gets its group's sums.
template <int kCols, typename A>
__device__ __forceinline__ void sum_over_y(A (&total)[kCols], A* sums) {
  A* mine = sums + (threadIdx.y * blockDim.x + threadIdx.x) * kCols;
#pragma unroll
  for (int c = 0; c < kCols; ++c) mine[c] = total[c];
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int r = 1; r < blockDim.y; ++r) {
      const A* other = sums + (r * blockDim.x + threadIdx.x) * kCols;
#pragma unroll
      for (int c = 0; c < kCols; ++c) total[c] += other[c];
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) mine[c] = total[c];
  }
  __syncthreads();
  const A* merged = sums + threadIdx.x * kCols;
#pragma unroll
  for (int c = 0; c < kCols; ++c) total[c] = merged[c];
  __syncthreads();  // sums[] is rewritten by the next tile
}

template <bool kKept, int kCols, typename Y, typename X, typename A>
__device__ __forceinline__ void write_grad_columns(const Y* gc, const Y* yc, X* xc, int64_t inner, int count,
                                                   int64_t j_begin, int64_t j_end, const A (&total)[kCols], A s,
                                                   bool log, const A (&cache_g)[kStridedBackwardCache][kCols],
                                                   const A (&cache_y)[kStridedBackwardCache][kCols]) {
  if constexpr (kKept) {
#pragma unroll
    for (int r = 0; r < kStridedBackwardCache; ++r) {
      const int64_t j = j_begin + threadIdx.y + r * int64_t(blockDim.y);
      if (j >= j_end) break;
      A out[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) out[c] = grad(cache_g[r][c], cache_y[r][c], total[c], s, log);
      store_columns<kCols>(xc + j * inner, count, out);
    }
  } else {
    for (int64_t j = j_begin + threadIdx.y; j < j_end; j += blockDim.y) {
      A vg[kCols], vy[kCols];
      load_columns<kCols>(gc + j * inner, count, vg, A(0));
      load_columns<kCols>(yc + j * inner, count, vy, A(0));
#pragma unroll
      for (int c = 0; c < kCols; ++c) vg[c] = grad(vg[c], vy[c], total[c], s, log);
      store_columns<kCols>(xc + j * inner, count, vg);
    }
  }
}

template <typename Y, typename X, int kCols, bool kCached>
__global__ void __launch_bounds__(kStridedThreads)
    strided_backward_kernel(const Y* __restrict__ dy, const Y* __restrict__ y, X* __restrict__ dx, int64_t outer,
                            int64_t size, int64_t inner, int64_t tiles, A_t<Y> s, bool log) {
  using A = A_t<Y>;
  __shared__ A sums[kStridedThreads * kCols];
  for (int64_t b = blockIdx.x; b < outer * tiles; b += gridDim.x) {
    const StridedColumns g = strided_columns<kCols>(b, tiles, inner);
    const int64_t base = g.o * size * inner + (g.count > 0 ? g.col : 0);
    A cache_g[kStridedBackwardCache][kCols], cache_y[kStridedBackwardCache][kCols], total[kCols];
    sum_columns<kCached, kCols>(dy + base, y + base, inner, g.count, 0, size, log, total, cache_g, cache_y);
    sum_over_y<kCols>(total, sums);
    if (g.count == 0) continue;
    write_grad_columns<kCached, kCols>(dy + base, y + base, dx + base, inner, g.count, 0, size, total, s, log,
                                       cache_g, cache_y);
  }
}

// Block (o, tile, c) sums piece c (`chunk` positions) of its columns into partial[slice * chunks + c].
template <typename Y, int kCols>
__global__ void __launch_bounds__(kStridedThreads)
    strided_partial_sums_kernel(const Y* __restrict__ dy, const Y* __restrict__ y, A_t<Y>* __restrict__ partial,
                                int64_t outer, int64_t size, int64_t inner, int64_t tiles, int64_t chunks,
                                int64_t chunk, bool log) {
  using A = A_t<Y>;
  __shared__ A sums[kStridedThreads * kCols];
  for (int64_t b = blockIdx.x; b < outer * tiles * chunks; b += gridDim.x) {
    const int64_t c = b % chunks;
    const StridedColumns g = strided_columns<kCols>(b / chunks, tiles, inner);
    const int64_t base = g.o * size * inner + (g.count > 0 ? g.col : 0);
    A unused_g[kStridedBackwardCache][kCols], unused_y[kStridedBackwardCache][kCols], total[kCols];
    sum_columns<false, kCols>(dy + base, y + base, inner, g.count, c * chunk, imin(size, (c + 1) * chunk), log,
                              total, unused_g, unused_y);
    sum_over_y<kCols>(total, sums);
    if (threadIdx.y != 0) continue;
#pragma unroll
    for (int k = 0; k < kCols; ++k)
      if (k < g.count) partial[(g.o * inner + g.col + k) * chunks + c] = total[k];
  }
}

template <typename Y, typename X, int kCols>
__global__ void __launch_bounds__(kStridedThreads)
    strided_split_backward_kernel(const Y* __restrict__ dy, const Y* __restrict__ y, X* __restrict__ dx,
                                  const A_t<Y>* __restrict__ partial, int64_t outer, int64_t size, int64_t inner,
                                  int64_t tiles, int64_t chunks, int64_t chunk, A_t<Y> s, bool log) {
  using A = A_t<Y>;
  __shared__ A sums[kStridedThreads * kCols];
  for (int64_t b = blockIdx.x; b < outer * tiles * chunks; b += gridDim.x) {
    const int64_t c = b % chunks;
    const StridedColumns g = strided_columns<kCols>(b / chunks, tiles, inner);
    A total[kCols];
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      total[k] = 0;
      if (k < g.count) {
        const A* p = partial + (g.o * inner + g.col + k) * chunks;
        for (int64_t q = threadIdx.y; q < chunks; q += blockDim.y) total[k] += p[q];
      }
    }
    sum_over_y<kCols>(total, sums);
    if (g.count == 0) continue;
    const int64_t base = g.o * size * inner + g.col;
    const A unused[kStridedBackwardCache][kCols] = {};
    write_grad_columns<false, kCols>(dy + base, y + base, dx + base, inner, g.count, c * chunk,
                                     imin(size, (c + 1) * chunk), total, s, log, unused, unused);
  }
}

template <typename Y, typename X, int kCols>
cudaError_t launch_strided(const LaunchPlan& plan, const Y* dy, const Y* y, X* dx, RowLayout layout, A_t<Y> s,
                           bool log, void* workspace, cudaStream_t stream) {
  const Launch& l0 = plan.launch[0];
  const dim3 block(l0.block_x, l0.block_y);
  if (plan.path == Path::kStrided) {
    if (plan.strided_cached) {
      OSM_LAUNCH(l0.grid, block, 0, stream, strided_backward_kernel<Y, X, kCols, true>)(
          dy, y, dx, layout.outer, layout.size, layout.inner, plan.strided_tiles, s, log);
    } else {
      OSM_LAUNCH(l0.grid, block, 0, stream, strided_backward_kernel<Y, X, kCols, false>)(
          dy, y, dx, layout.outer, layout.size, layout.inner, plan.strided_tiles, s, log);
    }
    return cudaGetLastError();
  }
  auto* partial = static_cast<A_t<Y>*>(workspace);
  if (partial == nullptr) return cudaErrorInvalidValue;
  OSM_LAUNCH(l0.grid, block, 0, stream, strided_partial_sums_kernel<Y, kCols>)(
      dy, y, partial, layout.outer, layout.size, layout.inner, plan.strided_tiles, plan.chunks, plan.chunk, log);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  OSM_LAUNCH(plan.launch[1].grid, block, 0, stream, strided_split_backward_kernel<Y, X, kCols>)(
      dy, y, dx, partial, layout.outer, layout.size, layout.inner, plan.strided_tiles, plan.chunks, plan.chunk, s,
      log);
  return cudaGetLastError();
}

template <typename Y, typename X, int C>
cudaError_t launch_register(const Launch& l, const Y* dy, const Y* y, X* dx, int64_t rows, int64_t n, A_t<Y> s,
                            bool log, cudaStream_t stream) {
  constexpr RegisterConfig cfg = kRegisterConfigs[C];
  OSM_LAUNCH(l.grid, l.block_x, 0, stream, register_rows_backward_kernel<Y, X, cfg.group, cfg.vecs, cfg.block>)(
      dy, y, dx, rows, n, s, log);
  return cudaGetLastError();
}

template <typename Y, typename X, int... Cs>
cudaError_t dispatch_register(int config, std::integer_sequence<int, Cs...>, const Launch& l, const Y* dy,
                              const Y* y, X* dx, int64_t rows, int64_t n, A_t<Y> s, bool log, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  ((config == Cs ? (err = launch_register<Y, X, Cs>(l, dy, y, dx, rows, n, s, log, stream), 0) : 0), ...);
  return err;
}

}  // namespace

template <typename Y>
size_t backward_workspace_bytes(RowLayout layout, DeviceLimits limits) {
  return plan_backward(layout, elem_bytes<Y>(), limits).workspace_bytes;
}

template <typename Y, typename X>
cudaError_t softmax_backward(const Y* dy, const Y* y, X* dx, RowLayout layout, double scale, bool log,
                             void* workspace, DeviceLimits limits, cudaStream_t stream) {
  using A = A_t<Y>;
  const A s = static_cast<A>(scale);
  const LaunchPlan plan = plan_backward(layout, elem_bytes<Y, X>(), limits);
  const int64_t rows = layout.outer, n = layout.size;
  switch (plan.path) {
    case Path::kNothing:
      return cudaSuccess;
    case Path::kStrided:
    case Path::kStridedSplit:
      return plan.strided_cols == 1
                 ? launch_strided<Y, X, 1>(plan, dy, y, dx, layout, s, log, workspace, stream)
                 : launch_strided<Y, X, Granule<Y>::kVec>(plan, dy, y, dx, layout, s, log, workspace, stream);
    case Path::kRegisters:
      return dispatch_register(plan.config, std::make_integer_sequence<int, kNumBackwardRegisterConfigs>{},
                               plan.launch[0], dy, y, dx, rows, n, s, log, stream);
    case Path::kShared: {
      const cudaError_t err = opt_in_max_dynamic_smem<shared_row_backward_kernel<Y, X>>(limits);
      if (err != cudaSuccess) return err;
      const Launch& l = plan.launch[0];
      OSM_LAUNCH(l.grid, l.block_x, l.smem, stream, shared_row_backward_kernel<Y, X>)(dy, y, dx, rows, n, s, log);
      return cudaGetLastError();
    }
    case Path::kSplit: {
      auto* partial = static_cast<A*>(workspace);
      if (partial == nullptr) return cudaErrorInvalidValue;
      const Launch& l0 = plan.launch[0];
      OSM_LAUNCH(l0.grid, l0.block_x, 0, stream, partial_sums_kernel<Y>)(dy, y, partial, rows, n, plan.chunks,
                                                                        plan.chunk, log);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      OSM_LAUNCH(plan.launch[1].grid, plan.launch[1].block_x, 0, stream, split_backward_kernel<Y, X>)(
          dy, y, dx, partial, rows, n, plan.chunks, plan.chunk, s, log);
      return cudaGetLastError();
    }
    default:
      return cudaErrorInvalidValue;
  }
}

#define ONLINE_SOFTMAX_BACKWARD(Y, X)                                                                 \
  template cudaError_t softmax_backward<Y, X>(const Y*, const Y*, X*, RowLayout, double, bool, void*, \
                                              DeviceLimits, cudaStream_t);
ONLINE_SOFTMAX_BACKWARD(float, float)
ONLINE_SOFTMAX_BACKWARD(double, double)
ONLINE_SOFTMAX_BACKWARD(__half, __half)
ONLINE_SOFTMAX_BACKWARD(__nv_bfloat16, __nv_bfloat16)
ONLINE_SOFTMAX_BACKWARD(float, __half)
ONLINE_SOFTMAX_BACKWARD(float, __nv_bfloat16)
#undef ONLINE_SOFTMAX_BACKWARD

template size_t backward_workspace_bytes<float>(RowLayout, DeviceLimits);
template size_t backward_workspace_bytes<double>(RowLayout, DeviceLimits);
template size_t backward_workspace_bytes<__half>(RowLayout, DeviceLimits);
template size_t backward_workspace_bytes<__nv_bfloat16>(RowLayout, DeviceLimits);

}  // namespace online_softmax::kernels
