// CUDA fused online softmax + top-k: x is read once. A block scans a row (or a chunk of one) with
// 16-byte loads, carrying the online state (m, d) and a shared-memory candidate buffer
// (topk_select.cuh): an element enters the buffer only if it beats the current k-th best, which
// after the first few thousand elements is rare; when the buffer fills, a bitonic sort keeps the k
// best and their worst becomes the new threshold. Rows that are too few to fill the GPU are cut
// into chunks whose states and top-k lists a second kernel merges (the same buffer, fed with the
// chunks' candidates).
//
// The order is torch.topk's: larger first, NaN above every number, ties to the lower index.
#include <utility>

#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/topk_select.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace {

using namespace topk_select;

// Chunk c of a row covers granules [c * chunk_granules, ...); the last chunk runs to the row's end
// so that no chunk holds fewer than k elements.
__device__ __forceinline__ int64_t chunk_end(int64_t c, int64_t chunks, int64_t chunk_granules, int64_t granules) {
  return c == chunks - 1 ? granules : (c + 1) * chunk_granules;
}

// ---- short rows: kGroup lanes (a sub-warp or a warp) per row ----
// Each lane holds its kVecs * V elements in registers (element i of the row is lane
// (i / V) % kGroup's), with a bit per element that is still a candidate. The k winners are picked
// one per round: every lane offers its best remaining element, a shuffle butterfly over the group
// finds the best of those, and the lane that held it takes the next one. No shared memory, no
// block barrier: the MoE-router and small-vocabulary case.
template <typename T, int kGroup, int kVecs, int kBlock>
__global__ void __launch_bounds__(kBlock)
    topk_warp_kernel(const T* __restrict__ x, T* __restrict__ values, int64_t* __restrict__ indices,
                     A_t<T>* __restrict__ max_out, A_t<T>* __restrict__ sumexp_out, int64_t rows, int64_t n, int k,
                     A_t<T> s, bool log) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  constexpr int kRowsPerBlock = kBlock / kGroup;
  static_assert(kGroup <= 32 && kVecs * V <= 32, "a lane's candidates are one 32-bit mask");
  const A s2 = Exp<A>::scale(s);
  const int t = threadIdx.x % kGroup;
  // Every lane iterates the same number of times and rounds (the shuffles need all 32).
  for (int64_t base = int64_t(blockIdx.x) * kRowsPerBlock; base < rows;
       base += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + threadIdx.x / kGroup;
    const bool active = row < rows;
    const T* xr = x + (active ? row : 0) * n;
    const int64_t len = active ? n : 0;
    A v[kVecs][V];
    uint32_t live = 0;
#pragma unroll
    for (int q = 0; q < kVecs; ++q) {
      const int64_t i0 = int64_t(q * kGroup + t) * V;
      load_elems(xr, i0, len, v[q], -Limits<A>::inf());
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (i0 + j < len) live |= 1u << (q * V + j);
    }
    State<A> st = State<A>::empty();
#pragma unroll
    for (int q = 0; q < kVecs; ++q) update(st, v[q], s2);
    st = finalize(warp_merge<kGroup>(st, s2));
    // This lane's best remaining element: value, row index, bit.
    A best = -Limits<A>::inf();
    int32_t best_ref = kNoRef;
    int best_bit = 0;
    auto take_best = [&] {
      best = -Limits<A>::inf();
      best_ref = kNoRef;
#pragma unroll
      for (int q = 0; q < kVecs; ++q)
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int bit = q * V + j;
          const int32_t ref = (q * kGroup + t) * V + j;
          if ((live >> bit & 1u) && better(v[q][j], ref, best, best_ref)) {
            best = v[q][j];
            best_ref = ref;
            best_bit = bit;
          }
        }
    };
    take_best();
    const Normalizer<A> nz(st, s);
    for (int r = 0; r < k; ++r) {
      A win = best;
      int32_t win_ref = best_ref;
#pragma unroll
      for (int offset = kGroup / 2; offset > 0; offset /= 2) {
        const A other = __shfl_xor_sync(0xffffffffu, win, offset);
        const int32_t other_ref = __shfl_xor_sync(0xffffffffu, win_ref, offset);
        if (better(other, other_ref, win, win_ref)) {
          win = other;
          win_ref = other_ref;
        }
      }
      if (active && t == 0) {
        values[row * k + r] = from_acc<T>(nz.out(win, log));
        indices[row * k + r] = win_ref;
      }
      if (win_ref != kNoRef && win_ref == best_ref) {
        live &= ~(1u << best_bit);
        take_best();
      }
    }
    if (active && t == 0) {
      max_out[row] = st.m * s;
      sumexp_out[row] = st.d;
    }
  }
}

// Stage 1: block (row, c) scans its chunk. With one chunk per row it writes the final results;
// otherwise its state and sorted top-k (value, global index) go to the workspace.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_scan_kernel(const T* __restrict__ x, T* __restrict__ values, int64_t* __restrict__ indices,
                     A_t<T>* __restrict__ max_out, A_t<T>* __restrict__ sumexp_out,
                     State<A_t<T>>* __restrict__ ws_state, A_t<T>* __restrict__ ws_value,
                     int64_t* __restrict__ ws_index, int64_t rows, int64_t n, int k, int64_t chunks,
                     int64_t chunk_granules, A_t<T> s, bool log) {
  using A = A_t<T>;
  using Tile = TopKTile<T>;
  constexpr int V = Tile::kVec;
  __shared__ CandidateBuffer<A, Tile::kCapacity, Tile::kSize> buf;
  __shared__ State<A> scratch[32];
  const A s2 = Exp<A>::scale(s);
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks, c = b % chunks;
    const T* xr = x + row * n;
    const int head = row_head(xr);
    const int64_t granules = granule_count<T>(head, n);
    const int64_t g_begin = c * chunk_granules, g_end = chunk_end(c, chunks, chunk_granules, granules);
    const int64_t base = g_begin * V - head;  // element index of ref 0
    buf.reset();
    State<A> st = State<A>::empty();
    Bar<A> bar = buf.bar();
    for (int64_t step = g_begin; step < g_end; step += int64_t(kThreads) * Tile::kUnroll) {
      A v[Tile::kUnroll][V];
#pragma unroll
      for (int u = 0; u < Tile::kUnroll; ++u) {
        const int64_t g = step + u * kThreads + threadIdx.x;
        if (g < g_end) {
          load_elems(xr, g * V - head, n, v[u], -Limits<A>::inf());
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) v[u][j] = -Limits<A>::inf();
        }
      }
#pragma unroll
      for (int u = 0; u < Tile::kUnroll; ++u) {
        update(st, v[u], s2);
        const int64_t g = step + u * kThreads + threadIdx.x;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int64_t i = g * V + j - head;
          buf.offer_warp(g < g_end && i >= 0 && i < n, v[u][j], static_cast<int32_t>(i - base), bar);
        }
      }
      buf.end_step(k);
      bar = buf.bar();
    }
    buf.finish();
    const State<A> merged = block_merge(st, s2, scratch);
    if (chunks == 1) {
      const State<A> fin = finalize(merged);
      const Normalizer<A> nz(fin, s);
      for (int j = threadIdx.x; j < k; j += blockDim.x) {
        values[row * k + j] = from_acc<T>(nz.out(buf.value[j], log));
        indices[row * k + j] = base + buf.ref[j];
      }
      if (threadIdx.x == 0) {
        max_out[row] = fin.m * s;
        sumexp_out[row] = fin.d;
      }
    } else {
      for (int j = threadIdx.x; j < k; j += blockDim.x) {
        ws_value[b * k + j] = buf.value[j];
        ws_index[b * k + j] = base + buf.ref[j];
      }
      if (threadIdx.x == 0) ws_state[b] = merged;
    }
  }
}

// Stage 2: one block per row merges the chunks' states and top-k lists (chunks * k candidates, in
// chunk order, so a candidate's position orders ties like its index does).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_merge_kernel(T* __restrict__ values, int64_t* __restrict__ indices, A_t<T>* __restrict__ max_out,
                      A_t<T>* __restrict__ sumexp_out, const State<A_t<T>>* __restrict__ ws_state,
                      const A_t<T>* __restrict__ ws_value, const int64_t* __restrict__ ws_index, int64_t rows,
                      int k, int64_t chunks, A_t<T> s, bool log) {
  using A = A_t<T>;
  using Tile = TopKTile<T>;
  __shared__ CandidateBuffer<A, Tile::kCapacity, Tile::kSize> buf;
  __shared__ State<A> scratch[32];
  const A s2 = Exp<A>::scale(s);
  const int64_t total = chunks * k;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    State<A> st = State<A>::empty();
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) st = merge(st, ws_state[row * chunks + c], s2);
    const State<A> fin = finalize(block_merge(st, s2, scratch));
    buf.reset();
    const A* cand = ws_value + row * total;
    for (int64_t step = 0; step < total; step += Tile::kSize) {
      for (int64_t p = step + threadIdx.x; p < imin(total, step + Tile::kSize); p += blockDim.x) {
        buf.offer(cand[p], static_cast<int32_t>(p));
      }
      buf.end_step(k);
    }
    buf.finish();
    const Normalizer<A> nz(fin, s);
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
      values[row * k + j] = from_acc<T>(nz.out(buf.value[j], log));
      indices[row * k + j] = ws_index[row * total + buf.ref[j]];
    }
    if (threadIdx.x == 0) {
      max_out[row] = fin.m * s;
      sumexp_out[row] = fin.d;
    }
  }
}

// dx = s * (G * w - p * C): p recomputed from x and the state, G the per-index sum of the value
// gradients g, and w = p, C = sum_j g_j p_{i_j} (softmax) or w = 1, C = sum_j g_j (log-softmax).
// The exponent is (x - M) * s with M the largest x among the top-k (the row max, when the indices
// came from the forward), plus the offset M*s - max that makes it exact for any indices; when every
// index points at a -inf entry, M is the row max itself (those p are 0, and dx is what the
// unfused gradient gives, not NaN).
//
// Block (row, c) writes chunk c of the row (whole granules; the last chunk runs to the row's end),
// then the corrections at the indices inside its chunk, so no two blocks write one element. Each
// block recomputes M and C from the row's k pairs. An index outside [0, n) is never read or
// written: it sets *error (when given) for the binding to raise.
template <typename T>
__global__ void __launch_bounds__(kTopKBackwardThreads)
    topk_backward_kernel(const T* __restrict__ grad_values, const T* __restrict__ x,
                         const int64_t* __restrict__ indices, const A_t<T>* __restrict__ max_in,
                         const A_t<T>* __restrict__ sumexp_in, T* __restrict__ dx, int64_t rows, int64_t n,
                         int64_t k, int64_t chunks, int64_t chunk_granules, A_t<T> s, bool log, int* error) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  __shared__ A scratch[32];
  const A log2e = Exp<A>::scale(A(1));
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks, c = b % chunks;
    const T* xr = x + row * n;
    T* dxr = dx + row * n;
    const int64_t* ir = indices + row * k;
    const T* gr = grad_values + row * k;
    auto valid = [&](int64_t i) { return i >= 0 && i < n; };
    A M = -Limits<A>::inf();
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      if (valid(ir[j])) {
        M = nan_max(M, to_acc(xr[ir[j]]));
      } else if (error != nullptr) {
        *error = 1;
      }
    }
    M = block_max(M, scratch);
    const A m_scaled = max_in[row];
    const A d = sumexp_in[row];
    const bool finite = m_scaled > -Limits<A>::inf() && m_scaled < Limits<A>::inf();
    if (M == -Limits<A>::inf() && finite) M = m_scaled / s;
    const A offset = (M * s == m_scaled) ? A(0) : M * s - m_scaled;
    const A inv_d = finite ? A(1) / d : Limits<A>::nan();
    auto prob = [&](A xv) { return Exp<A>::of(((xv - M) * s + offset) * log2e) * inv_d; };
    A C = 0;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      if (!valid(ir[j])) continue;
      const A g = to_acc(gr[j]);
      C += log ? g : g * prob(to_acc(xr[ir[j]]));
    }
    C = block_sum(C, scratch);
    const int head = row_head(xr);
    const int64_t granules = granule_count<T>(head, n);
    const int64_t g_begin = c * chunk_granules;
    const int64_t g_end = chunk_end(c, chunks, chunk_granules, granules);
    for (int64_t g = g_begin + threadIdx.x; g < g_end; g += blockDim.x) {
      A v[V];
      load_elems(xr, g * V - head, n, v, A(0));
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = -s * prob(v[j]) * C;
      store_elems(dxr, g * V - head, n, v);
    }
    __syncthreads();  // the corrections below overwrite entries written by other threads
    // Indices are sorted: the first of each run of equal indices writes the run's summed gradient.
    const int64_t lo = g_begin * V - head, hi = g_end * V - head;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const int64_t i = ir[j];
      if (!valid(i) || i < lo || i >= hi || (j > 0 && ir[j - 1] == i)) continue;
      A G = 0;
      for (int64_t r = j; r < k && ir[r] == i; ++r) G += to_acc(gr[r]);
      const A p = prob(to_acc(xr[i]));
      dxr[i] = from_acc<T>(s * (G * (log ? A(1) : p) - p * C));
    }
    __syncthreads();
  }
}

template <typename T, int C>
cudaError_t launch_topk_warp(const Launch& l, const T* x, T* values, int64_t* indices, A_t<T>* mo, A_t<T>* so,
                             int64_t rows, int64_t n, int k, A_t<T> s, bool log, cudaStream_t stream) {
  constexpr RegisterConfig cfg = kRegisterConfigs[C];
  if constexpr (cfg.group <= 32 && cfg.vecs * Granule<T>::kVec <= kTopKWarpMaxElems) {
    OSM_LAUNCH(l.grid, l.block_x, 0, stream, topk_warp_kernel<T, cfg.group, cfg.vecs, cfg.block>)(
        x, values, indices, mo, so, rows, n, k, s, log);
    return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

template <typename T, int... Cs>
cudaError_t dispatch_topk_warp(int config, std::integer_sequence<int, Cs...>, const Launch& l, const T* x,
                               T* values, int64_t* indices, A_t<T>* mo, A_t<T>* so, int64_t rows, int64_t n, int k,
                               A_t<T> s, bool log, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  ((config == Cs ? (err = launch_topk_warp<T, Cs>(l, x, values, indices, mo, so, rows, n, k, s, log, stream), 0)
                 : 0),
   ...);
  return err;
}

}  // namespace

template <typename T>
int64_t topk_max_k() {
  static_assert(TopKTile<T>::kSize == (sizeof(T) == 8 ? 1024 : 2048), "launch_plan.h: topk_max_k_for");
  return topk_max_k_for(sizeof(T));
}

template <typename T>
size_t topk_workspace_bytes(int64_t rows, int64_t n, int64_t k, DeviceLimits limits) {
  return plan_topk(rows, n, k, elem_bytes<T>(), limits).workspace_bytes;
}

template <typename T>
cudaError_t softmax_topk(const T* x, T* values, int64_t* indices, A_t<T>* max_out, A_t<T>* sumexp_out,
                         int64_t rows, int64_t n, int64_t k, double scale, bool log, void* workspace,
                         DeviceLimits limits, cudaStream_t stream) {
  using A = A_t<T>;
  const A s = static_cast<A>(scale);
  if (rows == 0) return cudaSuccess;
  if (k < 1 || k > n || k > topk_max_k<T>()) return cudaErrorInvalidValue;
  const LaunchPlan plan = plan_topk(rows, n, k, elem_bytes<T>(), limits);
  const int kk = static_cast<int>(k);
  switch (plan.path) {
    case Path::kTopKWarp:
      // Only the configurations of <= 32 threads per row are instantiated (the first 9).
      return dispatch_topk_warp(plan.config, std::make_integer_sequence<int, 9>{}, plan.launch[0], x, values,
                                indices, max_out, sumexp_out, rows, n, kk, s, log, stream);
    case Path::kTopKBlock:
      OSM_LAUNCH(plan.launch[0].grid, plan.launch[0].block_x, 0, stream, topk_scan_kernel<T>)(
          x, values, indices, max_out, sumexp_out, nullptr, nullptr, nullptr, rows, n, kk, 1, plan.chunk, s, log);
      return cudaGetLastError();
    case Path::kTopKSplit: {
      if (workspace == nullptr) return cudaErrorInvalidValue;
      const size_t blocks = size_t(rows * plan.chunks);
      char* ws = static_cast<char*>(workspace);
      auto* ws_state = reinterpret_cast<State<A>*>(ws);
      ws += align256(blocks * sizeof(State<A>));
      auto* ws_value = reinterpret_cast<A*>(ws);
      ws += align256(blocks * k * sizeof(A));
      auto* ws_index = reinterpret_cast<int64_t*>(ws);
      OSM_LAUNCH(plan.launch[0].grid, plan.launch[0].block_x, 0, stream, topk_scan_kernel<T>)(
          x, values, indices, max_out, sumexp_out, ws_state, ws_value, ws_index, rows, n, kk, plan.chunks,
          plan.chunk, s, log);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      OSM_LAUNCH(plan.launch[1].grid, plan.launch[1].block_x, 0, stream, topk_merge_kernel<T>)(
          values, indices, max_out, sumexp_out, ws_state, ws_value, ws_index, rows, kk, plan.chunks, s, log);
      return cudaGetLastError();
    }
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t softmax_topk_backward(const T* grad_values, const T* x, const int64_t* indices, const A_t<T>* max_in,
                                  const A_t<T>* sumexp_in, T* dx, int64_t rows, int64_t n, int64_t k,
                                  double scale, bool log, int* error, DeviceLimits limits, cudaStream_t stream) {
  const LaunchPlan plan = plan_topk_backward(rows, n, k, elem_bytes<T>(), limits);
  if (plan.path == Path::kNothing) return cudaSuccess;
  OSM_LAUNCH(plan.launch[0].grid, plan.launch[0].block_x, 0, stream, topk_backward_kernel<T>)(
      grad_values, x, indices, max_in, sumexp_in, dx, rows, n, k, plan.chunks, plan.chunk,
      static_cast<A_t<T>>(scale), log, error);
  return cudaGetLastError();
}

#define ONLINE_SOFTMAX_TOPK(T)                                                                         \
  template int64_t topk_max_k<T>();                                                                    \
  template size_t topk_workspace_bytes<T>(int64_t, int64_t, int64_t, DeviceLimits);                    \
  template cudaError_t softmax_topk<T>(const T*, T*, int64_t*, A_t<T>*, A_t<T>*, int64_t, int64_t,     \
                                       int64_t, double, bool, void*, DeviceLimits, cudaStream_t);       \
  template cudaError_t softmax_topk_backward<T>(const T*, const T*, const int64_t*, const A_t<T>*,     \
                                                const A_t<T>*, T*, int64_t, int64_t, int64_t, double,  \
                                                bool, int*, DeviceLimits, cudaStream_t);
ONLINE_SOFTMAX_TOPK(float)
ONLINE_SOFTMAX_TOPK(double)
ONLINE_SOFTMAX_TOPK(__half)
ONLINE_SOFTMAX_TOPK(__nv_bfloat16)
#undef ONLINE_SOFTMAX_TOPK

}  // namespace online_softmax::kernels
