// CUDA token_logprobs: a block per row reads the row once with 16-byte loads and carries, per
// thread, the online state (m, d) with the entropy accumulator S = sum e (x - m) s beside d, the
// count of entries ranked ahead of the scored token, and (when asked) the fused top-k's candidate
// buffer (topk_select.cuh). The block then merges (m, d, S) and the counts and sorts the buffer.
// Semantics: token_logprobs in csrc/ops.cpp.
#include <type_traits>

#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/topk_select.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace {

using namespace topk_select;

// (m, d) and S over the same elements; S is rescaled with d when m moves.
template <typename A>
struct EntropyState {
  State<A> st;
  A S;
  __device__ static EntropyState empty() { return {State<A>::empty(), A(0)}; }
};

// S against the larger max m: e^{(m1 - m) s} (S + (m1 - m) s d). A state without mass (d = 0)
// adds nothing: (m1 - m) s may be -inf there, and 0 * -inf is NaN.
template <typename A>
__device__ __forceinline__ A shifted_entropy(const EntropyState<A>& e, A m, A s, A s2) {
  if (e.st.d == A(0)) return A(0);
  if (e.st.m == m) return e.S;
  return rescale(e.st.m, m, s2) * (e.S + (e.st.m - m) * s * e.st.d);
}

template <typename A>
__device__ __forceinline__ EntropyState<A> merge_entropy(const EntropyState<A>& a, const EntropyState<A>& b, A s,
                                                         A s2) {
  const State<A> st = merge(a.st, b.st, s2);
  return {st, shifted_entropy(a, st.m, s, s2) + shifted_entropy(b, st.m, s, s2)};
}

// Folds N values in registers into a running state: their own (m, d, S), then one merge.
template <typename A, int N>
__device__ __forceinline__ void update_entropy(EntropyState<A>& acc, const A (&v)[N], A s, A s2) {
  A m = Limits<A>::lowest();
#pragma unroll
  for (int i = 0; i < N; ++i) m = nan_max(m, v[i]);
  A d = 0, S = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const A e = Exp<A>::of((v[i] - m) * s2);
    d += e;
    if (e != A(0)) S += e * ((v[i] - m) * s);  // a -inf entry adds 0, not 0 * -inf
  }
  acc = merge_entropy(acc, EntropyState<A>{{m, d}, S}, s, s2);
}

// Every thread gets the block's state (scratch: one per warp; reusable on return).
template <typename A>
__device__ __forceinline__ EntropyState<A> block_merge_entropy(EntropyState<A> e, A s, A s2,
                                                               EntropyState<A>* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const EntropyState<A> other{shfl_xor(e.st, offset), __shfl_xor_sync(0xffffffffu, e.S, offset)};
    e = merge_entropy(e, other, s, s2);
  }
  if (lane == 0) scratch[warp] = e;
  __syncthreads();
  EntropyState<A> r = scratch[0];
  for (int w = 1; w < warps; ++w) r = merge_entropy(r, scratch[w], s, s2);
  __syncthreads();
  return r;
}

template <typename T, bool kSelect>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_kernel(const T* __restrict__ x, const int64_t* __restrict__ token_ids,
                          const A_t<T>* __restrict__ token_values, A_t<T>* __restrict__ log_probs,
                          int64_t* __restrict__ rank, int64_t* __restrict__ top_ids,
                          A_t<T>* __restrict__ top_log_probs, A_t<T>* __restrict__ max_out,
                          A_t<T>* __restrict__ sumexp_out, A_t<T>* __restrict__ entropy, int64_t rows, int64_t n,
                          int k, A_t<T> s) {
  using A = A_t<T>;
  using Tile = TopKTile<T>;
  constexpr int V = Tile::kVec;
  using Buffer = std::conditional_t<kSelect, CandidateBuffer<A, Tile::kCapacity, Tile::kSize>, char>;
  __shared__ Buffer buf;
  __shared__ EntropyState<A> scratch[32];
  __shared__ long long count_scratch[32];
  const A s2 = Exp<A>::scale(s);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    const int head = row_head(xr);
    const int64_t granules = granule_count<T>(head, n);
    const int64_t tok = token_ids[row];
    const A v = token_values != nullptr ? token_values[row] : to_acc(xr[tok]);
    Bar<A> bar{};
    if constexpr (kSelect) {
      buf.reset();
      bar = buf.bar();
    }
    EntropyState<A> st = EntropyState<A>::empty();
    long long ahead = 0;
    for (int64_t step = 0; step < granules; step += int64_t(kThreads) * Tile::kUnroll) {
      A vals[Tile::kUnroll][V];
#pragma unroll
      for (int u = 0; u < Tile::kUnroll; ++u) {
        const int64_t g = step + u * kThreads + threadIdx.x;
        if (g < granules) {
          load_elems(xr, g * V - head, n, vals[u], -Limits<A>::inf());
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) vals[u][j] = -Limits<A>::inf();
        }
      }
#pragma unroll
      for (int u = 0; u < Tile::kUnroll; ++u) {
        update_entropy(st, vals[u], s, s2);
        const int64_t g = step + u * kThreads + threadIdx.x;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int64_t i = g * V + j - head;
          const bool valid = g < granules && i >= 0 && i < n;
          // Ahead of the scored token: better in the top-k order; the token's own entry is skipped
          // (token_values may replace it).
          if (valid && i != tok && better(vals[u][j], i, v, tok)) ++ahead;
          if constexpr (kSelect) buf.offer_warp(valid, vals[u][j], static_cast<int32_t>(i), bar);
        }
      }
      if constexpr (kSelect) {
        buf.end_step(k);
        bar = buf.bar();
      }
    }
    const EntropyState<A> merged = block_merge_entropy(st, s, s2, scratch);
    ahead = block_sum(ahead, count_scratch);
    const State<A> fin = finalize(merged.st);
    const Normalizer<A> nz(fin, s);
    if constexpr (kSelect) {
      buf.finish();
      for (int j = threadIdx.x; j < k; j += blockDim.x) {
        top_ids[row * k + j] = buf.ref[j];
        top_log_probs[row * k + j] = nz.log_prob(buf.value[j]);
      }
    }
    if (threadIdx.x == 0) {
      log_probs[row] = nz.log_prob(v);
      rank[row] = 1 + ahead;
      max_out[row] = fin.m * s;
      sumexp_out[row] = fin.d;
      // H = log d - S / d; NaN for a row without a distribution (log_d is NaN there).
      entropy[row] = is_nan(nz.log_d) ? nz.log_d : nz.log_d - merged.S / fin.d;
    }
  }
}

}  // namespace

template <typename T>
cudaError_t token_logprobs(const T* x, int64_t rows, int64_t n, const int64_t* token_ids,
                           const A_t<T>* token_values, int64_t top_n, double scale, A_t<T>* log_probs,
                           int64_t* rank, int64_t* top_ids, A_t<T>* top_log_probs, A_t<T>* max_out,
                           A_t<T>* sumexp_out, A_t<T>* entropy, DeviceLimits limits, cudaStream_t stream) {
  using A = A_t<T>;
  const LaunchPlan plan =
      plan_token_logprobs(rows, n, top_n, token_values != nullptr, elem_bytes<T>(), limits);
  if (plan.path == Path::kNothing) return cudaSuccess;
  const Launch& l = plan.launch[0];
  const A s = static_cast<A>(scale);
  if (plan.config != 0) {
    OSM_LAUNCH(l.grid, l.block_x, 0, stream, token_logprobs_kernel<T, true>)(
        x, token_ids, token_values, log_probs, rank, top_ids, top_log_probs, max_out, sumexp_out, entropy, rows, n,
        static_cast<int>(top_n), s);
  } else {
    OSM_LAUNCH(l.grid, l.block_x, 0, stream, token_logprobs_kernel<T, false>)(
        x, token_ids, token_values, log_probs, rank, nullptr, nullptr, max_out, sumexp_out, entropy, rows, n, 0, s);
  }
  return cudaGetLastError();
}

#define ONLINE_SOFTMAX_TOKEN_LOGPROBS(T)                                                                   \
  template cudaError_t token_logprobs<T>(const T*, int64_t, int64_t, const int64_t*, const A_t<T>*, int64_t, \
                                         double, A_t<T>*, int64_t*, int64_t*, A_t<T>*, A_t<T>*, A_t<T>*,  \
                                         A_t<T>*, DeviceLimits, cudaStream_t);
ONLINE_SOFTMAX_TOKEN_LOGPROBS(float)
ONLINE_SOFTMAX_TOKEN_LOGPROBS(double)
ONLINE_SOFTMAX_TOKEN_LOGPROBS(__half)
ONLINE_SOFTMAX_TOKEN_LOGPROBS(__nv_bfloat16)
#undef ONLINE_SOFTMAX_TOKEN_LOGPROBS

}  // namespace online_softmax::kernels
