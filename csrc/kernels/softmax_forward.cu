// CUDA forward (softmax / log-softmax) and stats. Every kernel computes the online state (m, d) of
// its piece of a row, merges it (warp butterfly, shared memory, or a workspace of partial states),
// then writes y from the values it still holds on chip. Which kernel runs is decided by
// plan_rows (row_plan.cuh); rows whose softmax dim is not the last go to the strided kernel.
#include <utility>

#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/row_plan.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace {

template <typename T>
using A_t = acc_t<T>;

// The row state as the op reports it (the max of x * s); either output may be null.
template <typename A>
__device__ __forceinline__ void store_state(A* max_out, A* sumexp_out, int64_t row, State<A> st, A s) {
  if (max_out != nullptr) max_out[row] = st.m * s;
  if (sumexp_out != nullptr) sumexp_out[row] = st.d;
}

// Granules each thread loads before it computes, so that several 16-byte loads are in flight.
constexpr int kUnroll = 4;

// ---- a row in registers: kGroup threads per row (a sub-warp, a warp, or the whole block) ----
template <typename T, typename O, int kGroup, int kVecs, int kBlock>
__global__ void __launch_bounds__(kBlock)
    register_rows_kernel(const T* __restrict__ x, O* __restrict__ y, A_t<T>* __restrict__ max_out,
                         A_t<T>* __restrict__ sumexp_out, int64_t rows, int64_t n, A_t<T> s, bool log) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  constexpr int kRowsPerBlock = kBlock / kGroup;
  static_assert(kGroup <= 32 || kGroup == kBlock, "a row is a sub-warp, a warp or the whole block");
  __shared__ State<A> scratch[32];
  const A s2 = Exp<A>::scale(s);
  const int t = threadIdx.x % kGroup;
  // Every thread of the block iterates the same number of times (the shuffles and barriers need
  // all of them); threads whose row is past the end carry empty states.
  for (int64_t base = int64_t(blockIdx.x) * kRowsPerBlock; base < rows;
       base += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + threadIdx.x / kGroup;
    const bool active = row < rows;
    const T* xr = x + (active ? row : 0) * n;
    const int head = row_head(xr);
    A v[kVecs][V];
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int64_t i0 = int64_t(k * kGroup + t) * V - head;
      if (active) {
        load_elems(xr, i0, n, v[k], -Limits<A>::inf());
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[k][j] = -Limits<A>::inf();
      }
    }
    A m = Limits<A>::lowest();
#pragma unroll
    for (int k = 0; k < kVecs; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) m = nan_max(m, v[k][j]);
    A d = 0;
#pragma unroll
    for (int k = 0; k < kVecs; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) d += Exp<A>::of((v[k][j] - m) * s2);
    State<A> st{m, d};
    if constexpr (kGroup <= 32) {
      st = warp_merge<kGroup>(st, s2);
    } else {
      st = block_merge(st, s2, scratch);
    }
    st = finalize(st);
    if (!active) continue;
    if (t == 0) store_state(max_out, sumexp_out, row, st, s);
    if (y == nullptr) continue;
    const Normalizer<A> nz(st, s);
    O* yr = y + row * n;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      A out[V];
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = nz.out(v[k][j], log);
      store_elems(yr, int64_t(k * kGroup + t) * V - head, n, out);
    }
  }
}

// State of the granules [g_begin, g_end) of a row, each thread taking every blockDim.x-th granule.
// `keep(g, v)` sees every granule's values (the shared-memory kernel caches them).
template <typename T, typename Keep>
__device__ __forceinline__ State<A_t<T>> scan_granules(const T* xr, int64_t n, int head, int64_t g_begin,
                                                       int64_t g_end, A_t<T> s2, Keep&& keep) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  State<A> st = State<A>::empty();
  int64_t g = g_begin + threadIdx.x;
  for (; g + int64_t(kUnroll - 1) * blockDim.x < g_end; g += int64_t(kUnroll) * blockDim.x) {
    A v[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_elems(xr, (g + int64_t(u) * blockDim.x) * V - head, n, v[u], -Limits<A>::inf());
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      update(st, v[u], s2);
      keep(g + int64_t(u) * blockDim.x, v[u]);
    }
  }
  for (; g < g_end; g += blockDim.x) {
    A v[V];
    load_elems(xr, g * V - head, n, v, -Limits<A>::inf());
    update(st, v, s2);
    keep(g, v);
  }
  return st;
}

// ---- a block per row, the row cached in dynamic shared memory as T ----
template <typename T, typename O>
__global__ void __launch_bounds__(512)
    shared_row_kernel(const T* __restrict__ x, O* __restrict__ y, A_t<T>* __restrict__ max_out,
                      A_t<T>* __restrict__ sumexp_out, int64_t rows, int64_t n, A_t<T> s, bool log) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  OSM_DYNAMIC_SHARED(cache_bytes);
  T* cache = reinterpret_cast<T*>(cache_bytes);
  __shared__ State<A> scratch[32];
  const A s2 = Exp<A>::scale(s);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    const int head = row_head(xr);
    const int64_t granules = granule_count<T>(head, n);
    State<A> st = scan_granules(xr, n, head, 0, granules, s2, [&](int64_t g, const A(&v)[V]) {
#pragma unroll
      for (int j = 0; j < V; ++j) cache[g * V + j] = from_acc<T>(v[j]);
    });
    st = finalize(block_merge(st, s2, scratch));  // its barriers also publish the cache
    if (threadIdx.x == 0) store_state(max_out, sumexp_out, row, st, s);
    if (y != nullptr) {
      const Normalizer<A> nz(st, s);
      O* yr = y + row * n;
      for (int64_t g = threadIdx.x; g < granules; g += blockDim.x) {
        A out[V];
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = nz.out(to_acc(cache[g * V + j]), log);
        store_elems(yr, g * V - head, n, out);
      }
    }
    __syncthreads();  // the next row overwrites the cache
  }
}

// ---- a row split over `chunks` blocks: partial states, then merge + write ----
template <typename T>
__global__ void __launch_bounds__(256)
    partial_states_kernel(const T* __restrict__ x, State<A_t<T>>* __restrict__ partial, int64_t rows,
                          int64_t n, int64_t chunks, int64_t chunk_granules, A_t<T> s) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  __shared__ State<A> scratch[32];
  const A s2 = Exp<A>::scale(s);
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks, c = b % chunks;
    const T* xr = x + row * n;
    const int head = row_head(xr);
    const int64_t granules = granule_count<T>(head, n);
    const int64_t g_end = imin(granules, (c + 1) * chunk_granules);
    const State<A> st = scan_granules(xr, n, head, c * chunk_granules, g_end, s2, [](int64_t, const A(&)[V]) {});
    const State<A> merged = block_merge(st, s2, scratch);
    if (threadIdx.x == 0) partial[b] = merged;
  }
}

// The row's state from its partial states (every thread of the block gets it).
template <typename A>
__device__ __forceinline__ State<A> merge_partials(const State<A>* partial, int64_t chunks, A s2,
                                                   State<A>* scratch) {
  State<A> st = State<A>::empty();
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) st = merge(st, partial[c], s2);
  return finalize(block_merge(st, s2, scratch));
}

// Blocks per row: `chunks` to write y (block c writes chunk c), or 1 for stats only.
template <typename T, typename O>
__global__ void __launch_bounds__(256)
    split_output_kernel(const T* __restrict__ x, O* __restrict__ y, A_t<T>* __restrict__ max_out,
                        A_t<T>* __restrict__ sumexp_out, const State<A_t<T>>* __restrict__ partial,
                        int64_t rows, int64_t n, int64_t chunks, int64_t chunk_granules,
                        int64_t blocks_per_row, A_t<T> s, bool log) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  __shared__ State<A> scratch[32];
  const A s2 = Exp<A>::scale(s);
  for (int64_t b = blockIdx.x; b < rows * blocks_per_row; b += gridDim.x) {
    const int64_t row = b / blocks_per_row, c = b % blocks_per_row;
    const State<A> st = merge_partials(partial + row * chunks, chunks, s2, scratch);
    if (c == 0 && threadIdx.x == 0) store_state(max_out, sumexp_out, row, st, s);
    if (y == nullptr) continue;
    const Normalizer<A> nz(st, s);
    const T* xr = x + row * n;
    O* yr = y + row * n;
    const int head = row_head(xr);
    const int64_t granules = granule_count<T>(head, n);
    const int64_t g_end = imin(granules, (c + 1) * chunk_granules);
    for (int64_t g = c * chunk_granules + threadIdx.x; g < g_end; g += blockDim.x) {
      A v[V];
      load_elems(xr, g * V - head, n, v, A(0));
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = nz.out(v[j], log);
      store_elems(yr, g * V - head, n, v);
    }
  }
}

// ---- softmax dim with stride inner > 1 ----
// A block is blockDim.x neighbouring rows (adjacent in memory at each position, so loads coalesce)
// times blockDim.y threads that split the softmax dim; the y-threads merge through shared memory.
template <typename T, typename O>
__global__ void __launch_bounds__(256)
    strided_kernel(const T* __restrict__ x, O* __restrict__ y, A_t<T>* __restrict__ max_out,
                   A_t<T>* __restrict__ sumexp_out, int64_t outer, int64_t size, int64_t inner, A_t<T> s,
                   bool log) {
  using A = A_t<T>;
  __shared__ State<A> states[256];
  const A s2 = Exp<A>::scale(s);
  const int64_t tiles = (inner + blockDim.x - 1) / blockDim.x;
  for (int64_t b = blockIdx.x; b < outer * tiles; b += gridDim.x) {
    const int64_t o = b / tiles;
    const int64_t i = (b % tiles) * blockDim.x + threadIdx.x;
    const bool active = i < inner;
    const T* xc = x + o * size * inner + (active ? i : 0);
    State<A> st = State<A>::empty();
    if (active) {
      for (int64_t j = threadIdx.y; j < size; j += blockDim.y) {
        const A v[1] = {to_acc(xc[j * inner])};
        update(st, v, s2);
      }
    }
    states[threadIdx.y * blockDim.x + threadIdx.x] = st;
    __syncthreads();
    if (threadIdx.y == 0) {
      for (int r = 1; r < blockDim.y; ++r) st = merge(st, states[r * blockDim.x + threadIdx.x], s2);
      states[threadIdx.x] = finalize(st);
    }
    __syncthreads();
    st = states[threadIdx.x];
    __syncthreads();  // states[] is rewritten by the next tile
    if (!active) continue;
    if (threadIdx.y == 0) store_state(max_out, sumexp_out, o * inner + i, st, s);
    if (y == nullptr) continue;
    const Normalizer<A> nz(st, s);
    O* yc = y + o * size * inner + i;
    for (int64_t j = threadIdx.y; j < size; j += blockDim.y) yc[j * inner] = from_acc<O>(nz.out(to_acc(xc[j * inner]), log));
  }
}

template <typename T, typename O, int C>
cudaError_t launch_register(const T* x, O* y, A_t<T>* mo, A_t<T>* so, int64_t rows, int64_t n, A_t<T> s,
                            bool log, DeviceLimits limits, cudaStream_t stream) {
  constexpr RegisterConfig cfg = kRegisterConfigs[C];
  const int64_t rows_per_block = cfg.block / cfg.group;
  const int64_t blocks = capped_grid((rows + rows_per_block - 1) / rows_per_block, limits);
  OSM_LAUNCH(blocks, cfg.block, 0, stream, register_rows_kernel<T, O, cfg.group, cfg.vecs, cfg.block>)(
      x, y, mo, so, rows, n, s, log);
  return cudaGetLastError();
}

template <typename T, typename O, int... Cs>
cudaError_t dispatch_register(int config, std::integer_sequence<int, Cs...>, const T* x, O* y, A_t<T>* mo,
                              A_t<T>* so, int64_t rows, int64_t n, A_t<T> s, bool log, DeviceLimits limits,
                              cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  ((config == Cs ? (err = launch_register<T, O, Cs>(x, y, mo, so, rows, n, s, log, limits, stream), 0) : 0), ...);
  return err;
}

}  // namespace

template <typename T>
size_t forward_workspace_bytes(RowLayout layout, DeviceLimits limits) {
  if (layout.inner != 1 || layout.size == 0) return 0;
  return plan_rows(layout.outer, layout.size, Granule<T>::kVec, limits, 16)
      .workspace_bytes(layout.outer, sizeof(State<A_t<T>>));
}

template <typename T, typename O>
cudaError_t softmax_forward(const T* x, O* y, A_t<T>* max_out, A_t<T>* sumexp_out, RowLayout layout,
                            double scale, bool log, void* workspace, DeviceLimits limits, cudaStream_t stream) {
  using A = A_t<T>;
  const A s = static_cast<A>(scale);
  if (layout.outer == 0 || layout.inner == 0 || layout.size == 0) return cudaSuccess;
  if (layout.inner > 1) {
    const StridedBlock blk = strided_block(layout);
    OSM_LAUNCH(capped_grid(layout.outer * blk.tiles, limits), dim3(blk.x, blk.y), 0, stream, strided_kernel<T, O>)(
        x, y, max_out, sumexp_out, layout.outer, layout.size, layout.inner, s, log);
    return cudaGetLastError();
  }
  const int64_t rows = layout.outer, n = layout.size;
  const RowPlan plan = plan_rows(rows, n, Granule<T>::kVec, limits, 16);
  switch (plan.kind) {
    case RowKind::kRegisters:
      return dispatch_register(plan.config, std::make_integer_sequence<int, kNumRegisterConfigs>{}, x, y,
                               max_out, sumexp_out, rows, n, s, log, limits, stream);
    case RowKind::kShared: {
      cudaError_t err = cudaFuncSetAttribute(shared_row_kernel<T, O>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(plan.smem_bytes));
      if (err != cudaSuccess) return err;
      OSM_LAUNCH(capped_grid(rows, limits), plan.threads, plan.smem_bytes, stream, shared_row_kernel<T, O>)(
          x, y, max_out, sumexp_out, rows, n, s, log);
      return cudaGetLastError();
    }
    case RowKind::kSplit: {
      auto* partial = static_cast<State<A>*>(workspace);
      if (partial == nullptr) return cudaErrorInvalidValue;
      OSM_LAUNCH(capped_grid(rows * plan.chunks, limits), plan.threads, 0, stream, partial_states_kernel<T>)(
          x, partial, rows, n, plan.chunks, plan.chunk_granules, s);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      const int64_t blocks_per_row = y != nullptr ? plan.chunks : 1;
      OSM_LAUNCH(capped_grid(rows * blocks_per_row, limits), plan.threads, 0, stream, split_output_kernel<T, O>)(
          x, y, max_out, sumexp_out, partial, rows, n, plan.chunks, plan.chunk_granules, blocks_per_row, s, log);
      return cudaGetLastError();
    }
  }
  return cudaErrorInvalidValue;
}

#define ONLINE_SOFTMAX_FORWARD(T, O)                                                                  \
  template cudaError_t softmax_forward<T, O>(const T*, O*, A_t<T>*, A_t<T>*, RowLayout, double, bool, \
                                             void*, DeviceLimits, cudaStream_t);
ONLINE_SOFTMAX_FORWARD(float, float)
ONLINE_SOFTMAX_FORWARD(double, double)
ONLINE_SOFTMAX_FORWARD(__half, __half)
ONLINE_SOFTMAX_FORWARD(__nv_bfloat16, __nv_bfloat16)
ONLINE_SOFTMAX_FORWARD(__half, float)
ONLINE_SOFTMAX_FORWARD(__nv_bfloat16, float)
#undef ONLINE_SOFTMAX_FORWARD

template size_t forward_workspace_bytes<float>(RowLayout, DeviceLimits);
template size_t forward_workspace_bytes<double>(RowLayout, DeviceLimits);
template size_t forward_workspace_bytes<__half>(RowLayout, DeviceLimits);
template size_t forward_workspace_bytes<__nv_bfloat16>(RowLayout, DeviceLimits);

}  // namespace online_softmax::kernels
