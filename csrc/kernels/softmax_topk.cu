// CUDA fused online softmax + top-k: x is read once. A block scans a row (or a chunk of one) with
// 16-byte loads, carrying the online state (m, d) and a shared-memory candidate buffer: an element
// enters the buffer only if it beats the current k-th best, which after the first few thousand
// elements is rare; when the buffer fills, a bitonic sort keeps the k best and their worst becomes
// the new threshold. Rows that are too few to fill the GPU are cut into chunks whose states and
// top-k lists a second kernel merges (the same buffer, fed with the chunks' candidates).
//
// The order is torch.topk's: larger first, NaN above every number, ties to the lower index.
#include <utility>

#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/row_plan.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace {

template <typename T>
using A_t = acc_t<T>;

constexpr int kThreads = 256;
constexpr int32_t kNoRef = 0x7fffffff;  // padding: worse than every real candidate

// Elements a block looks at per step: 2048 (1024 for double, so its buffer stays small).
template <typename T>
struct TopKTile {
  static constexpr int kVec = Granule<T>::kVec;
  static constexpr int kUnroll = sizeof(T) == 8 ? 2 : 2048 / (kThreads * kVec);
  static constexpr int kSize = kThreads * kVec * kUnroll;
  static constexpr int kCapacity = 2 * kSize;  // a full step always fits after a prune to k <= kSize
};

// A candidate is (value, ref); refs grow with the element index, so comparing refs breaks ties.
template <typename A>
__device__ __forceinline__ bool better(A a, int32_t ra, A b, int32_t rb) {
  const bool an = is_nan(a), bn = is_nan(b);
  if (an || bn) return an && (!bn || ra < rb);
  if (a != b) return a > b;
  return ra < rb;
}

// The block's k best candidates so far, in shared memory.
template <typename A, int kCapacity, int kStep>
struct CandidateBuffer {
  A value[kCapacity];
  int32_t ref[kCapacity];
  int count;
  A threshold;
  int32_t threshold_ref;
  bool has_threshold;

  __device__ void reset() {
    __syncthreads();  // the previous row's results have been read
    if (threadIdx.x == 0) {
      count = 0;
      has_threshold = false;
    }
    __syncthreads();
  }

  // Called by any thread for any element; thread-safe.
  __device__ __forceinline__ void offer(A v, int32_t r) {
    if (has_threshold && !better(v, r, threshold, threshold_ref)) return;
    const int slot = atomicAdd(&count, 1);
    value[slot] = v;
    ref[slot] = r;
  }

  // Sorts the first `count` entries descending (best first), padding to a power of two.
  __device__ void sort() {
    const int n = count;
    int length = 1;
    while (length < n) length *= 2;
    for (int i = n + threadIdx.x; i < length; i += blockDim.x) {
      value[i] = -Limits<A>::inf();
      ref[i] = kNoRef;
    }
    __syncthreads();
    for (int size = 2; size <= length; size *= 2) {
      for (int stride = size / 2; stride > 0; stride /= 2) {
        for (int i = threadIdx.x; i < length / 2; i += blockDim.x) {
          const int lo = 2 * i - (i & (stride - 1));
          const int hi = lo + stride;
          const bool descending = (lo & size) == 0;
          const bool swap = descending ? better(value[hi], ref[hi], value[lo], ref[lo])
                                       : better(value[lo], ref[lo], value[hi], ref[hi]);
          if (swap) {
            const A v = value[lo];
            value[lo] = value[hi];
            value[hi] = v;
            const int32_t r = ref[lo];
            ref[lo] = ref[hi];
            ref[hi] = r;
          }
        }
        __syncthreads();
      }
    }
  }

  // Collective, after every step: keeps the k best once the buffer could not take another step.
  // Every thread reads count between two barriers, so all of them take the same branch (a thread
  // that read it after a faster warp's next offers could otherwise prune alone).
  __device__ void end_step(int k) {
    __syncthreads();  // the step's offers are all in
    const int n = count;
    __syncthreads();  // everyone has read count before anyone offers again
    if (n > kCapacity - kStep || (!has_threshold && n >= kStep)) {
      sort();
      if (threadIdx.x == 0) {
        count = k;
        threshold = value[k - 1];
        threshold_ref = ref[k - 1];
        has_threshold = true;
      }
      __syncthreads();
    }
  }

  // Collective: the k best, sorted, in value[0..k) / ref[0..k). Needs count >= k.
  __device__ void finish() {
    __syncthreads();
    sort();
  }
};

// Chunk c of a row covers granules [c * chunk_granules, ...); the last chunk runs to the row's end
// so that no chunk holds fewer than k elements.
__device__ __forceinline__ int64_t chunk_end(int64_t c, int64_t chunks, int64_t chunk_granules, int64_t granules) {
  return c == chunks - 1 ? granules : (c + 1) * chunk_granules;
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
          if (g < g_end && i >= 0 && i < n) buf.offer(v[u][j], static_cast<int32_t>(i - base));
        }
      }
      buf.end_step(k);
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
// came from the forward), plus the offset M*s - max that makes it exact for any indices.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_backward_kernel(const T* __restrict__ grad_values, const T* __restrict__ x,
                         const int64_t* __restrict__ indices, const A_t<T>* __restrict__ max_in,
                         const A_t<T>* __restrict__ sumexp_in, T* __restrict__ dx, int64_t rows, int64_t n,
                         int64_t k, A_t<T> s, bool log) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  __shared__ A scratch[32];
  const A log2e = Exp<A>::scale(A(1));
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    T* dxr = dx + row * n;
    const int64_t* ir = indices + row * k;
    const T* gr = grad_values + row * k;
    A M = -Limits<A>::inf();
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) M = nan_max(M, to_acc(xr[ir[j]]));
    M = block_max(M, scratch);
    const A m_scaled = max_in[row];
    const A offset = (M * s == m_scaled) ? A(0) : M * s - m_scaled;
    const A d = sumexp_in[row];
    const bool finite = m_scaled > -Limits<A>::inf() && m_scaled < Limits<A>::inf();
    const A inv_d = finite ? A(1) / d : Limits<A>::nan();
    auto prob = [&](A xv) { return Exp<A>::of(((xv - M) * s + offset) * log2e) * inv_d; };
    A C = 0;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const A g = to_acc(gr[j]);
      C += log ? g : g * prob(to_acc(xr[ir[j]]));
    }
    C = block_sum(C, scratch);
    const int head = row_head(xr);
    const int64_t granules = granule_count<T>(head, n);
    for (int64_t g = threadIdx.x; g < granules; g += blockDim.x) {
      A v[V];
      load_elems(xr, g * V - head, n, v, A(0));
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = -s * prob(v[j]) * C;
      store_elems(dxr, g * V - head, n, v);
    }
    __syncthreads();  // the corrections below overwrite entries written by other threads
    // Indices are sorted: the first of each run of equal indices writes the run's summed gradient.
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      if (j > 0 && ir[j - 1] == ir[j]) continue;
      A G = 0;
      for (int64_t r = j; r < k && ir[r] == ir[j]; ++r) G += to_acc(gr[r]);
      const A p = prob(to_acc(xr[ir[j]]));
      dxr[ir[j]] = from_acc<T>(s * (G * (log ? A(1) : p) - p * C));
    }
    __syncthreads();
  }
}

struct TopKPlan {
  int64_t chunks = 1;
  int64_t chunk_granules = 0;
};

template <typename T>
TopKPlan plan_topk(int64_t rows, int64_t n, int64_t k, DeviceLimits limits) {
  constexpr int V = Granule<T>::kVec;
  // Candidates carry int32 refs within their chunk: no chunk may reach 2^30 elements.
  constexpr int64_t kMaxChunkGranules = (int64_t(1) << 30) / V;
  TopKPlan plan;
  const int64_t granules_min = (n + V - 1) / V;  // the fewest granules any row has
  const int64_t sms = std::max(1, limits.num_sms);
  int64_t chunk = granules_min + 1;  // one chunk: the whole row
  if (rows > 0 && rows < sms && granules_min >= 2048) {
    // Few rows: about 4 blocks per SM. Every chunk, also the first (which may start mid-granule)
    // and the last (which runs to the row's end), holds at least k elements.
    const int64_t min_chunk = std::max<int64_t>(512, (k + V - 1) / V + 1);
    const int64_t want = (4 * sms + rows - 1) / rows;
    chunk = std::max(min_chunk, (granules_min + want - 1) / want);
  }
  chunk = std::min(chunk, kMaxChunkGranules);
  plan.chunks = std::max<int64_t>(1, granules_min / chunk);
  plan.chunk_granules = plan.chunks == 1 ? granules_min + 1 : chunk;
  return plan;
}

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

template <typename T>
int64_t topk_max_k() {
  return TopKTile<T>::kSize;
}

template <typename T>
size_t topk_workspace_bytes(int64_t rows, int64_t n, int64_t k, DeviceLimits limits) {
  const TopKPlan plan = plan_topk<T>(rows, n, k, limits);
  if (plan.chunks == 1) return 0;
  const size_t blocks = size_t(rows * plan.chunks);
  return align256(blocks * sizeof(State<A_t<T>>)) + align256(blocks * k * sizeof(A_t<T>)) +
         blocks * k * sizeof(int64_t);
}

template <typename T>
cudaError_t softmax_topk(const T* x, T* values, int64_t* indices, A_t<T>* max_out, A_t<T>* sumexp_out,
                         int64_t rows, int64_t n, int64_t k, double scale, bool log, void* workspace,
                         DeviceLimits limits, cudaStream_t stream) {
  using A = A_t<T>;
  const A s = static_cast<A>(scale);
  if (rows == 0) return cudaSuccess;
  if (k < 1 || k > n || k > topk_max_k<T>()) return cudaErrorInvalidValue;
  const TopKPlan plan = plan_topk<T>(rows, n, k, limits);
  if (plan.chunks == 1) {
    OSM_LAUNCH(capped_grid(rows, limits), kThreads, 0, stream, topk_scan_kernel<T>)(
        x, values, indices, max_out, sumexp_out, nullptr, nullptr, nullptr, rows, n, static_cast<int>(k), 1,
        plan.chunk_granules, s, log);
    return cudaGetLastError();
  }
  if (workspace == nullptr) return cudaErrorInvalidValue;
  const size_t blocks = size_t(rows * plan.chunks);
  char* ws = static_cast<char*>(workspace);
  auto* ws_state = reinterpret_cast<State<A>*>(ws);
  ws += align256(blocks * sizeof(State<A>));
  auto* ws_value = reinterpret_cast<A*>(ws);
  ws += align256(blocks * k * sizeof(A));
  auto* ws_index = reinterpret_cast<int64_t*>(ws);
  OSM_LAUNCH(capped_grid(rows * plan.chunks, limits), kThreads, 0, stream, topk_scan_kernel<T>)(
      x, values, indices, max_out, sumexp_out, ws_state, ws_value, ws_index, rows, n, static_cast<int>(k),
      plan.chunks, plan.chunk_granules, s, log);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  OSM_LAUNCH(capped_grid(rows, limits), kThreads, 0, stream, topk_merge_kernel<T>)(
      values, indices, max_out, sumexp_out, ws_state, ws_value, ws_index, rows, static_cast<int>(k), plan.chunks,
      s, log);
  return cudaGetLastError();
}

template <typename T>
cudaError_t softmax_topk_backward(const T* grad_values, const T* x, const int64_t* indices, const A_t<T>* max_in,
                                  const A_t<T>* sumexp_in, T* dx, int64_t rows, int64_t n, int64_t k,
                                  double scale, bool log, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  OSM_LAUNCH(std::max<int64_t>(1, std::min<int64_t>(rows, 65536)), kThreads, 0, stream, topk_backward_kernel<T>)(
      grad_values, x, indices, max_in, sumexp_in, dx, rows, n, k, static_cast<A_t<T>>(scale), log);
  return cudaGetLastError();
}

#define ONLINE_SOFTMAX_TOPK(T)                                                                         \
  template int64_t topk_max_k<T>();                                                                    \
  template size_t topk_workspace_bytes<T>(int64_t, int64_t, int64_t, DeviceLimits);                    \
  template cudaError_t softmax_topk<T>(const T*, T*, int64_t*, A_t<T>*, A_t<T>*, int64_t, int64_t,     \
                                       int64_t, double, bool, void*, DeviceLimits, cudaStream_t);       \
  template cudaError_t softmax_topk_backward<T>(const T*, const T*, const int64_t*, const A_t<T>*,     \
                                                const A_t<T>*, T*, int64_t, int64_t, int64_t, double,  \
                                                bool, cudaStream_t);
ONLINE_SOFTMAX_TOPK(float)
ONLINE_SOFTMAX_TOPK(double)
ONLINE_SOFTMAX_TOPK(__half)
ONLINE_SOFTMAX_TOPK(__nv_bfloat16)
#undef ONLINE_SOFTMAX_TOPK

}  // namespace online_softmax::kernels
