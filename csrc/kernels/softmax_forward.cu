// CUDA forward (softmax / log-softmax) and stats. Every kernel computes the online state (m, d) of
// its piece of a row, merges it (warp butterfly, shared memory, or a workspace of partial states),
// then writes y from the values it still holds on chip. Which kernel runs is decided by
// plan_forward (launch_plan.h); rows whose softmax dim is not the last go to the strided kernels.
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
// A block is blockDim.x neighbouring column groups (adjacent in memory at each position along the
// dim, so loads coalesce; a group is kCols columns, one 16-byte load when inner allows) times
// blockDim.y threads that split the dim and merge their states through shared memory.

// The states of this thread's columns over positions j_begin + threadIdx.y + r * blockDim.y of
// [j_begin, j_end), kStridedCache positions per group so that each group costs one rescale. With
// kKeep the caller guarantees one group covers the range, and its values stay in `cache`.
template <bool kKeep, int kCols, typename T, typename A>
__device__ __forceinline__ void scan_columns(const T* xc, int64_t inner, int count, int64_t j_begin, int64_t j_end,
                                             A s2, State<A> (&st)[kCols], A (&cache)[kStridedCache][kCols]) {
#pragma unroll
  for (int c = 0; c < kCols; ++c) st[c] = State<A>::empty();
  const int64_t step = blockDim.y;
  for (int64_t j0 = j_begin + threadIdx.y; j0 < j_end; j0 += step * kStridedCache) {
    A v[kStridedCache][kCols];
#pragma unroll
    for (int r = 0; r < kStridedCache; ++r) {
      const int64_t j = j0 + r * step;
      load_columns<kCols>(xc + (j < j_end ? j : j_begin) * inner, j < j_end ? count : 0, v[r], -Limits<A>::inf());
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      A col[kStridedCache];
#pragma unroll
      for (int r = 0; r < kStridedCache; ++r) col[r] = v[r][c];
      update(st[c], col, s2);
    }
    if constexpr (kKeep) {
#pragma unroll
      for (int r = 0; r < kStridedCache; ++r)
#pragma unroll
        for (int c = 0; c < kCols; ++c) cache[r][c] = v[r][c];
    }
  }
}

// Merges the states of the blockDim.y threads of each column group; every thread gets its
// group's states. `states` holds blockDim.x * blockDim.y * kCols states.
template <int kCols, typename A>
__device__ __forceinline__ void merge_over_y(State<A> (&st)[kCols], A s2, State<A>* states) {
  State<A>* mine = states + (threadIdx.y * blockDim.x + threadIdx.x) * kCols;
#pragma unroll
  for (int c = 0; c < kCols; ++c) mine[c] = st[c];
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int r = 1; r < blockDim.y; ++r) {
      const State<A>* other = states + (r * blockDim.x + threadIdx.x) * kCols;
#pragma unroll
      for (int c = 0; c < kCols; ++c) st[c] = merge(st[c], other[c], s2);
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) mine[c] = st[c];
  }
  __syncthreads();
  const State<A>* merged = states + threadIdx.x * kCols;
#pragma unroll
  for (int c = 0; c < kCols; ++c) st[c] = merged[c];
  __syncthreads();  // states[] is rewritten by the next tile
}

// y for positions j_begin + threadIdx.y + r * blockDim.y of [j_begin, j_end) of this thread's
// columns, from `cache` (kKept: one group) or re-read from x.
template <bool kKept, int kCols, typename T, typename O, typename A>
__device__ __forceinline__ void write_columns(const T* xc, O* yc, int64_t inner, int count, int64_t j_begin,
                                              int64_t j_end, const Normalizer<A> (&nz)[kCols], bool log,
                                              const A (&cache)[kStridedCache][kCols]) {
  if constexpr (kKept) {
#pragma unroll
    for (int r = 0; r < kStridedCache; ++r) {
      const int64_t j = j_begin + threadIdx.y + r * int64_t(blockDim.y);
      if (j >= j_end) break;
      A v[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) v[c] = nz[c].out(cache[r][c], log);
      store_columns<kCols>(yc + j * inner, count, v);
    }
  } else {
    for (int64_t j = j_begin + threadIdx.y; j < j_end; j += blockDim.y) {
      A v[kCols];
      load_columns<kCols>(xc + j * inner, count, v, A(0));
#pragma unroll
      for (int c = 0; c < kCols; ++c) v[c] = nz[c].out(v[c], log);
      store_columns<kCols>(yc + j * inner, count, v);
    }
  }
}

template <int kCols, typename A>
__device__ __forceinline__ void store_column_states(A* max_out, A* sumexp_out, int64_t slice,
                                                    const State<A> (&st)[kCols], int count, A s) {
#pragma unroll
  for (int c = 0; c < kCols; ++c)
    if (c < count) store_state(max_out, sumexp_out, slice + c, st[c], s);
}

template <int kCols, typename A>
__device__ __forceinline__ void finalize_columns(State<A> (&st)[kCols]) {
#pragma unroll
  for (int c = 0; c < kCols; ++c) st[c] = finalize(st[c]);
}

// One block per (outer index, tile of column groups): the whole column. kCached: the column fits
// one group per thread, so x is read once.
template <typename T, typename O, int kCols, bool kCached>
__global__ void __launch_bounds__(kStridedThreads)
    strided_kernel(const T* __restrict__ x, O* __restrict__ y, A_t<T>* __restrict__ max_out,
                   A_t<T>* __restrict__ sumexp_out, int64_t outer, int64_t size, int64_t inner, int64_t tiles,
                   A_t<T> s, bool log) {
  using A = A_t<T>;
  __shared__ State<A> states[kStridedThreads * kCols];
  const A s2 = Exp<A>::scale(s);
  for (int64_t b = blockIdx.x; b < outer * tiles; b += gridDim.x) {
    const StridedColumns g = strided_columns<kCols>(b, tiles, inner);
    const int64_t base = g.o * size * inner + (g.count > 0 ? g.col : 0);
    A cache[kStridedCache][kCols];
    State<A> st[kCols];
    scan_columns<kCached, kCols>(x + base, inner, g.count, 0, size, s2, st, cache);
    merge_over_y<kCols>(st, s2, states);
    finalize_columns<kCols>(st);
    if (g.count == 0) continue;
    if (threadIdx.y == 0) store_column_states<kCols>(max_out, sumexp_out, g.o * inner + g.col, st, g.count, s);
    if (y == nullptr) continue;
    Normalizer<A> nz[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) nz[c] = Normalizer<A>(st[c], s);
    write_columns<kCached, kCols>(x + base, y + base, inner, g.count, 0, size, nz, log, cache);
  }
}

// Columns split into `chunks` pieces of `chunk` positions along the dim: block (o, tile, c) writes
// the states of piece c to partial[(slice * chunks) + c].
template <typename T, int kCols>
__global__ void __launch_bounds__(kStridedThreads)
    strided_partial_states_kernel(const T* __restrict__ x, State<A_t<T>>* __restrict__ partial, int64_t outer,
                                  int64_t size, int64_t inner, int64_t tiles, int64_t chunks, int64_t chunk,
                                  A_t<T> s) {
  using A = A_t<T>;
  __shared__ State<A> states[kStridedThreads * kCols];
  const A s2 = Exp<A>::scale(s);
  for (int64_t b = blockIdx.x; b < outer * tiles * chunks; b += gridDim.x) {
    const int64_t c = b % chunks;
    const StridedColumns g = strided_columns<kCols>(b / chunks, tiles, inner);
    const int64_t base = g.o * size * inner + (g.count > 0 ? g.col : 0);
    State<A> st[kCols];
    A unused[kStridedCache][kCols];
    scan_columns<false, kCols>(x + base, inner, g.count, c * chunk, imin(size, (c + 1) * chunk), s2, st, unused);
    merge_over_y<kCols>(st, s2, states);
    if (threadIdx.y != 0) continue;
#pragma unroll
    for (int k = 0; k < kCols; ++k)
      if (k < g.count) partial[(g.o * inner + g.col + k) * chunks + c] = st[k];
  }
}

// Block (o, tile, c) merges its columns' partial states and writes piece c of y (c = 0 only, for
// stats: blocks_per_column = 1).
template <typename T, typename O, int kCols>
__global__ void __launch_bounds__(kStridedThreads)
    strided_split_output_kernel(const T* __restrict__ x, O* __restrict__ y, A_t<T>* __restrict__ max_out,
                                A_t<T>* __restrict__ sumexp_out, const State<A_t<T>>* __restrict__ partial,
                                int64_t outer, int64_t size, int64_t inner, int64_t tiles, int64_t chunks,
                                int64_t chunk, int64_t blocks_per_column, A_t<T> s, bool log) {
  using A = A_t<T>;
  __shared__ State<A> states[kStridedThreads * kCols];
  const A s2 = Exp<A>::scale(s);
  for (int64_t b = blockIdx.x; b < outer * tiles * blocks_per_column; b += gridDim.x) {
    const int64_t c = b % blocks_per_column;
    const StridedColumns g = strided_columns<kCols>(b / blocks_per_column, tiles, inner);
    State<A> st[kCols];
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      st[k] = State<A>::empty();
      if (k < g.count) {
        const State<A>* p = partial + (g.o * inner + g.col + k) * chunks;
        for (int64_t q = threadIdx.y; q < chunks; q += blockDim.y) st[k] = merge(st[k], p[q], s2);
      }
    }
    merge_over_y<kCols>(st, s2, states);
    finalize_columns<kCols>(st);
    if (g.count == 0) continue;
    if (c == 0 && threadIdx.y == 0) store_column_states<kCols>(max_out, sumexp_out, g.o * inner + g.col, st, g.count, s);
    if (y == nullptr) continue;
    Normalizer<A> nz[kCols];
#pragma unroll
    for (int k = 0; k < kCols; ++k) nz[k] = Normalizer<A>(st[k], s);
    const int64_t base = g.o * size * inner + g.col;
    const A unused[kStridedCache][kCols] = {};
    write_columns<false, kCols>(x + base, y + base, inner, g.count, c * chunk, imin(size, (c + 1) * chunk), nz, log,
                                unused);
  }
}

template <typename T, typename O, int C>
cudaError_t launch_register(const Launch& l, const T* x, O* y, A_t<T>* mo, A_t<T>* so, int64_t rows, int64_t n,
                            A_t<T> s, bool log, cudaStream_t stream) {
  constexpr RegisterConfig cfg = kRegisterConfigs[C];
  OSM_LAUNCH(l.grid, l.block_x, 0, stream, register_rows_kernel<T, O, cfg.group, cfg.vecs, cfg.block>)(
      x, y, mo, so, rows, n, s, log);
  return cudaGetLastError();
}

template <typename T, typename O, int... Cs>
cudaError_t dispatch_register(int config, std::integer_sequence<int, Cs...>, const Launch& l, const T* x, O* y,
                              A_t<T>* mo, A_t<T>* so, int64_t rows, int64_t n, A_t<T> s, bool log,
                              cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  ((config == Cs ? (err = launch_register<T, O, Cs>(l, x, y, mo, so, rows, n, s, log, stream), 0) : 0), ...);
  return err;
}

template <typename T, typename O, int kCols>
cudaError_t launch_strided(const LaunchPlan& plan, const T* x, O* y, A_t<T>* mo, A_t<T>* so, RowLayout layout,
                           A_t<T> s, bool log, void* workspace, cudaStream_t stream) {
  const Launch& l0 = plan.launch[0];
  const dim3 block(l0.block_x, l0.block_y);
  if (plan.path == Path::kStrided) {
    if (plan.strided_cached) {
      OSM_LAUNCH(l0.grid, block, 0, stream, strided_kernel<T, O, kCols, true>)(
          x, y, mo, so, layout.outer, layout.size, layout.inner, plan.strided_tiles, s, log);
    } else {
      OSM_LAUNCH(l0.grid, block, 0, stream, strided_kernel<T, O, kCols, false>)(
          x, y, mo, so, layout.outer, layout.size, layout.inner, plan.strided_tiles, s, log);
    }
    return cudaGetLastError();
  }
  auto* partial = static_cast<State<A_t<T>>*>(workspace);
  if (partial == nullptr) return cudaErrorInvalidValue;
  OSM_LAUNCH(l0.grid, block, 0, stream, strided_partial_states_kernel<T, kCols>)(
      x, partial, layout.outer, layout.size, layout.inner, plan.strided_tiles, plan.chunks, plan.chunk, s);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const Launch& l1 = plan.launch[1];
  OSM_LAUNCH(l1.grid, block, 0, stream, strided_split_output_kernel<T, O, kCols>)(
      x, y, mo, so, partial, layout.outer, layout.size, layout.inner, plan.strided_tiles, plan.chunks, plan.chunk,
      y != nullptr ? plan.chunks : 1, s, log);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
size_t forward_workspace_bytes(RowLayout layout, DeviceLimits limits) {
  return plan_forward(layout, elem_bytes<T>(), true, 0, limits).workspace_bytes;
}

template <typename T, typename O>
cudaError_t softmax_forward(const T* x, O* y, A_t<T>* max_out, A_t<T>* sumexp_out, RowLayout layout,
                            double scale, bool log, void* workspace, DeviceLimits limits, cudaStream_t stream) {
  using A = A_t<T>;
  const A s = static_cast<A>(scale);
  const int state_outputs = (max_out != nullptr) + (sumexp_out != nullptr);
  const LaunchPlan plan = plan_forward(layout, elem_bytes<T, O>(), y != nullptr, state_outputs, limits);
  const int64_t rows = layout.outer, n = layout.size;
  switch (plan.path) {
    case Path::kNothing:
      return cudaSuccess;
    case Path::kStrided:
    case Path::kStridedSplit:
      return plan.strided_cols == 1
                 ? launch_strided<T, O, 1>(plan, x, y, max_out, sumexp_out, layout, s, log, workspace, stream)
                 : launch_strided<T, O, Granule<T>::kVec>(plan, x, y, max_out, sumexp_out, layout, s, log, workspace,
                                                          stream);
    case Path::kRegisters:
      return dispatch_register(plan.config, std::make_integer_sequence<int, kNumRegisterConfigs>{}, plan.launch[0],
                               x, y, max_out, sumexp_out, rows, n, s, log, stream);
    case Path::kShared: {
      const cudaError_t err = opt_in_max_dynamic_smem<shared_row_kernel<T, O>>(limits);
      if (err != cudaSuccess) return err;
      const Launch& l = plan.launch[0];
      OSM_LAUNCH(l.grid, l.block_x, l.smem, stream, shared_row_kernel<T, O>)(x, y, max_out, sumexp_out, rows, n, s,
                                                                             log);
      return cudaGetLastError();
    }
    case Path::kSplit: {
      auto* partial = static_cast<State<A>*>(workspace);
      if (partial == nullptr) return cudaErrorInvalidValue;
      const Launch& l0 = plan.launch[0];
      OSM_LAUNCH(l0.grid, l0.block_x, 0, stream, partial_states_kernel<T>)(x, partial, rows, n, plan.chunks,
                                                                          plan.chunk, s);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      const int64_t blocks_per_row = y != nullptr ? plan.chunks : 1;
      const Launch& l1 = plan.launch[1];
      OSM_LAUNCH(l1.grid, l1.block_x, 0, stream, split_output_kernel<T, O>)(
          x, y, max_out, sumexp_out, partial, rows, n, plan.chunks, plan.chunk, blocks_per_row, s, log);
      return cudaGetLastError();
    }
    default:
      return cudaErrorInvalidValue;
  }
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
