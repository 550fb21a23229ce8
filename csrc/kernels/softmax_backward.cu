// CUDA backward of forward, from its output y alone (s = 1 / temperature):
//   softmax:     dx = s * y * (dy - sum(dy * y))
//   log_softmax: dx = s * (dy - exp(y) * sum(dy))
// The same row mapping as the forward (row_plan.cuh): dy and y held in registers or shared memory
// between the reduction and the write (2 reads + 1 write), or split over blocks with a workspace of
// partial sums for long rows and few rows.
#include <utility>

#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/row_plan.cuh"
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

// Softmax dim with stride inner > 1: blockDim.x neighbouring rows x blockDim.y threads along the dim.
template <typename Y, typename X>
__global__ void __launch_bounds__(256)
    strided_backward_kernel(const Y* __restrict__ dy, const Y* __restrict__ y, X* __restrict__ dx,
                            int64_t outer, int64_t size, int64_t inner, A_t<Y> s, bool log) {
  using A = A_t<Y>;
  __shared__ A sums[256];
  const int64_t tiles = (inner + blockDim.x - 1) / blockDim.x;
  for (int64_t b = blockIdx.x; b < outer * tiles; b += gridDim.x) {
    const int64_t o = b / tiles;
    const int64_t i = (b % tiles) * blockDim.x + threadIdx.x;
    const bool active = i < inner;
    const int64_t base = o * size * inner + (active ? i : 0);
    A total = 0;
    if (active) {
      for (int64_t j = threadIdx.y; j < size; j += blockDim.y) {
        total += reduce_term(to_acc(dy[base + j * inner]), to_acc(y[base + j * inner]), log);
      }
    }
    sums[threadIdx.y * blockDim.x + threadIdx.x] = total;
    __syncthreads();
    if (threadIdx.y == 0) {
      for (int r = 1; r < blockDim.y; ++r) total += sums[r * blockDim.x + threadIdx.x];
      sums[threadIdx.x] = total;
    }
    __syncthreads();
    total = sums[threadIdx.x];
    __syncthreads();
    if (!active) continue;
    for (int64_t j = threadIdx.y; j < size; j += blockDim.y) {
      const int64_t at = base + j * inner;
      dx[at] = from_acc<X>(grad(to_acc(dy[at]), to_acc(y[at]), total, s, log));
    }
  }
}

template <typename Y, typename X, int C>
cudaError_t launch_register(const Y* dy, const Y* y, X* dx, int64_t rows, int64_t n, A_t<Y> s, bool log,
                            DeviceLimits limits, cudaStream_t stream) {
  constexpr RegisterConfig cfg = kRegisterConfigs[C];
  const int64_t rows_per_block = cfg.block / cfg.group;
  const int64_t blocks = capped_grid((rows + rows_per_block - 1) / rows_per_block, limits);
  OSM_LAUNCH(blocks, cfg.block, 0, stream, register_rows_backward_kernel<Y, X, cfg.group, cfg.vecs, cfg.block>)(
      dy, y, dx, rows, n, s, log);
  return cudaGetLastError();
}

template <typename Y, typename X, int... Cs>
cudaError_t dispatch_register(int config, std::integer_sequence<int, Cs...>, const Y* dy, const Y* y, X* dx,
                              int64_t rows, int64_t n, A_t<Y> s, bool log, DeviceLimits limits,
                              cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  ((config == Cs ? (err = launch_register<Y, X, Cs>(dy, y, dx, rows, n, s, log, limits, stream), 0) : 0), ...);
  return err;
}

// Two rows (dy and y) live on chip per row: registers hold half as many granules as the forward's.
constexpr int64_t kBackwardRegisterGranules = kMaxRegisterGranules / 2;

}  // namespace

template <typename Y>
size_t backward_workspace_bytes(RowLayout layout, DeviceLimits limits) {
  if (layout.inner != 1 || layout.size == 0) return 0;
  return plan_rows(layout.outer, layout.size, Granule<Y>::kVec, limits, 32, kBackwardRegisterGranules)
      .workspace_bytes(layout.outer, sizeof(A_t<Y>));
}

template <typename Y, typename X>
cudaError_t softmax_backward(const Y* dy, const Y* y, X* dx, RowLayout layout, double scale, bool log,
                             void* workspace, DeviceLimits limits, cudaStream_t stream) {
  using A = A_t<Y>;
  const A s = static_cast<A>(scale);
  if (layout.outer == 0 || layout.inner == 0 || layout.size == 0) return cudaSuccess;
  if (layout.inner > 1) {
    const StridedBlock blk = strided_block(layout);
    OSM_LAUNCH(capped_grid(layout.outer * blk.tiles, limits), dim3(blk.x, blk.y), 0, stream, strided_backward_kernel<Y, X>)(
        dy, y, dx, layout.outer, layout.size, layout.inner, s, log);
    return cudaGetLastError();
  }
  const int64_t rows = layout.outer, n = layout.size;
  const RowPlan plan = plan_rows(rows, n, Granule<Y>::kVec, limits, 32, kBackwardRegisterGranules);
  switch (plan.kind) {
    case RowKind::kRegisters:
      return dispatch_register(plan.config, std::make_integer_sequence<int, kNumRegisterConfigs - 1>{}, dy, y,
                               dx, rows, n, s, log, limits, stream);
    case RowKind::kShared: {
      cudaError_t err = cudaFuncSetAttribute(shared_row_backward_kernel<Y, X>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(plan.smem_bytes));
      if (err != cudaSuccess) return err;
      OSM_LAUNCH(capped_grid(rows, limits), plan.threads, plan.smem_bytes, stream, shared_row_backward_kernel<Y, X>)(
          dy, y, dx, rows, n, s, log);
      return cudaGetLastError();
    }
    case RowKind::kSplit: {
      auto* partial = static_cast<A*>(workspace);
      if (partial == nullptr) return cudaErrorInvalidValue;
      const int64_t blocks = capped_grid(rows * plan.chunks, limits);
      OSM_LAUNCH(blocks, plan.threads, 0, stream, partial_sums_kernel<Y>)(dy, y, partial, rows, n, plan.chunks,
                                                                  plan.chunk_granules, log);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      OSM_LAUNCH(blocks, plan.threads, 0, stream, split_backward_kernel<Y, X>)(dy, y, dx, partial, rows, n, plan.chunks,
                                                                       plan.chunk_granules, s, log);
      return cudaGetLastError();
    }
  }
  return cudaErrorInvalidValue;
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
