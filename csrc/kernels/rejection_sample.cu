// CUDA kernels of rejection_sample, speculative decoding's verification step (semantics: csrc/ops.cpp;
// the float64 oracle with the same roundings: online_softmax/reference/speculative.py; the plan:
// plan_rejection_sample in launch_plan.h).
//
// The work has two parts of very different shapes. Every target position 0..n_b of every batch row
// needs its state: the max m and the mass D over the tokens the cut keeps (for a greedy row, also
// the arg-max). That is a reduction over vocab-long rows, too few of them at batch 1 to fill the GPU
// with a block each, so rows are cut into parts:
//   rejection_max_kernel     (with min_log_ratio only) the max of each part: the cut's threshold
//                            needs the row's max before any mass can be summed.
//   rejection_states_kernel  one (m_c, d_c) per 256-element chunk, a warp per chunk, d_c summed in
//                            double since it decides tokens. With a cut, m_c is the row's max and
//                            d_c the kept mass: exactly the oracle's terms.
// The decisions are sequential per batch row and cheap, but for the one draw that ends a row:
//   rejection_sample_kernel  a block per batch row. Its warps merge the chunk states of up to 32
//                            positions at once (a warp each); then the block walks the positions in
//                            order, each accept test reading one logit and one q. The final draw
//                            walks chunk masses and rescans one chunk, as sample.cu does (here one
//                            warp, with scans); at a rejection the block first reads the target row
//                            and its draft row again for the residual's chunk masses.
// Every thread of the decision block computes the same decisions from the same loads, so branches on
// them are uniform and no broadcast is needed; thread 0 writes the tokens.
#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/sampling_cut.cuh"

namespace online_softmax::kernels {
namespace {

constexpr int kPerLane = kRejectionChunk / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kNoIndex = INT64_MAX;

template <typename T>
using A_t = acc_t<T>;

// 1 / temperature in the accumulation type; a greedy row (t == 0) works at scale 1.
template <typename A>
__device__ __forceinline__ A scale_of(double t) { return t == 0.0 ? A(1) : static_cast<A>(1.0 / t); }

// A greedy row has no cut, nor has a position whose log-ratio is -inf.
__device__ __forceinline__ bool has_cut(double t, const double* min_log_ratio, int64_t row) {
  return t != 0.0 && min_log_ratio != nullptr && min_log_ratio[row] > -1.0e308;
}

// exp((m_c - m) s) in double, exactly 1 for the chunks whose max is the row's (every chunk of a cut row).
template <typename A>
__device__ __forceinline__ double chunk_scale(A m_c, A m, A s) {
  return m_c == m ? 1.0 : exp(static_cast<double>((m_c - m) * s));
}

template <typename A>
__device__ __forceinline__ A warp_nan_max(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = nan_max(v, __shfl_xor_sync(kFull, v, offset));
  return v;
}

__device__ __forceinline__ int64_t warp_min_index(int64_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const int64_t o = __shfl_xor_sync(kFull, v, offset);
    v = o < v ? o : v;
  }
  return v;
}

__device__ __forceinline__ int64_t warp_max_index(int64_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const int64_t o = __shfl_xor_sync(kFull, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

__device__ __forceinline__ double warp_inclusive_scan(double v) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const double o = __shfl_up_sync(kFull, v, offset);
    if (lane >= offset) v += o;
  }
  return v;
}

// ---- the draw (one warp): inverse CDF over chunk masses, then within one chunk ----

// The sum of the chunk masses, in the order warp_find_chunk accumulates them, so that u * total
// falls inside that walk whenever u < 1.
template <typename Mass>
__device__ double warp_total(Mass mass, int64_t chunks) {
  const int lane = threadIdx.x % 32;
  double base = 0.0;
  for (int64_t c0 = 0; c0 < chunks; c0 += 32) {
    const double w = c0 + lane < chunks ? mass(c0 + lane) : 0.0;
    base += __shfl_sync(kFull, warp_inclusive_scan(w), 31);
  }
  return base;
}

// The first chunk whose cumulative mass exceeds target, and target's remainder within it. Past the
// end by rounding: the last chunk with mass, remainder +inf (its last token with weight).
template <typename Mass>
__device__ int64_t warp_find_chunk(Mass mass, int64_t chunks, double target, double& rem) {
  const int lane = threadIdx.x % 32;
  double base = 0.0;
  int64_t last = -1;
  for (int64_t c0 = 0; c0 < chunks; c0 += 32) {
    const double w = c0 + lane < chunks ? mass(c0 + lane) : 0.0;
    const double incl = warp_inclusive_scan(w);
    double excl = __shfl_up_sync(kFull, incl, 1);
    if (lane == 0) excl = 0.0;
    if (w > 0.0) last = c0 + lane;
    const unsigned hit = __ballot_sync(kFull, w > 0.0 && base + incl > target);
    if (hit != 0) {
      const int l = __ffs(int(hit)) - 1;
      rem = target - (base + __shfl_sync(kFull, excl, l));
      return c0 + l;
    }
    base += __shfl_sync(kFull, incl, 31);
  }
  rem = Limits<double>::inf();
  return warp_max_index(last);
}

// The token of chunk c at which the cumulative weight first exceeds rem (lane l holds elements
// [8 l, 8 l + 8) of the chunk, in order); past the chunk's sum by rounding, its last token with weight.
template <typename Weight>
__device__ int64_t warp_pick(Weight weight, int64_t c, int64_t vocab, double rem) {
  if (c < 0) return -1;
  const int lane = threadIdx.x % 32;
  const int64_t begin = c * kRejectionChunk + int64_t(lane) * kPerLane;
  double w[kPerLane];
  double sum = 0.0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    w[j] = begin + j < vocab ? weight(begin + j) : 0.0;
    sum += w[j];
  }
  const double incl = warp_inclusive_scan(sum);
  double acc = __shfl_up_sync(kFull, incl, 1);
  if (lane == 0) acc = 0.0;
  int64_t first = -1, last = -1;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    if (w[j] > 0.0) {
      acc += w[j];
      last = begin + j;
      if (first < 0 && acc > rem) first = begin + j;
    }
  }
  const unsigned hit = __ballot_sync(kFull, sum > 0.0 && incl > rem);
  if (hit != 0) return __shfl_sync(kFull, first >= 0 ? first : last, __ffs(int(hit)) - 1);
  return warp_max_index(last);
}

template <typename Mass, typename Weight>
__device__ int64_t warp_draw(Mass mass, Weight weight, int64_t chunks, int64_t vocab, double total, double u) {
  double rem = 0.0;
  const int64_t c = warp_find_chunk(mass, chunks, u * total, rem);
  return warp_pick(weight, c, vocab, rem);
}

// ---- the kernels ----

template <typename T>
__global__ void __launch_bounds__(kRejectionThreads)
    rejection_max_kernel(const T* __restrict__ target, int64_t batch, int64_t n, int64_t vocab,
                         const int64_t* __restrict__ num_drafts, const double* __restrict__ temperature,
                         const double* __restrict__ min_log_ratio, int64_t parts, int64_t part_chunks,
                         A_t<T>* __restrict__ part_max) {
  using A = A_t<T>;
  __shared__ A scratch[32];
  const int64_t n1 = n + 1, work = batch * n1 * parts;
  for (int64_t item = blockIdx.x; item < work; item += gridDim.x) {
    const int64_t row = item / parts, part = item % parts, b = row / n1;
    // Positions past the row's drafts are never read; rows without a cut need no max first.
    if (row % n1 > num_drafts[b] || !has_cut(temperature[b], min_log_ratio, row)) continue;
    const T* xr = target + row * vocab;
    const int64_t begin = part * part_chunks * kRejectionChunk;
    const int64_t end = imin(vocab, begin + part_chunks * kRejectionChunk);
    A m = Limits<A>::lowest();
    for (int64_t i0 = begin + threadIdx.x; i0 < end; i0 += int64_t(blockDim.x) * kPerLane) {
      A v[kPerLane];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t i = i0 + int64_t(j) * blockDim.x;
        v[j] = i < end ? to_acc(xr[i]) : Limits<A>::lowest();
      }
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) m = nan_max(m, v[j]);
    }
    m = block_max(m, scratch);
    if (threadIdx.x == 0) part_max[item] = m;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRejectionThreads)
    rejection_states_kernel(const T* __restrict__ target, int64_t batch, int64_t n, int64_t vocab,
                            const int64_t* __restrict__ num_drafts, const double* __restrict__ temperature,
                            const double* __restrict__ min_log_ratio, const A_t<T>* __restrict__ part_max,
                            int64_t chunks, int64_t parts, int64_t part_chunks, A_t<T>* __restrict__ chunk_m,
                            double* __restrict__ chunk_d) {
  using A = A_t<T>;
  __shared__ A scratch[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t n1 = n + 1, work = batch * n1 * parts;
  for (int64_t item = blockIdx.x; item < work; item += gridDim.x) {
    const int64_t row = item / parts, part = item % parts, b = row / n1;
    if (row % n1 > num_drafts[b]) continue;  // never reached by the row's walk: never read
    const double t = temperature[b];
    const A s = scale_of<A>(t);
    const bool cut = has_cut(t, min_log_ratio, row);
    A m = Limits<A>::lowest();
    A threshold = -Limits<A>::inf();
    if (cut) {
      for (int64_t p = threadIdx.x; p < parts; p += blockDim.x) m = nan_max(m, part_max[row * parts + p]);
      m = block_max(m, scratch);
      threshold = threshold_value(m, min_log_ratio[row], s);
    }
    const T* xr = target + row * vocab;
    A* cm = chunk_m + row * chunks;
    double* cd = chunk_d + row * chunks;
    const int64_t c_end = imin(chunks, (part + 1) * part_chunks);
    for (int64_t c = part * part_chunks + warp; c < c_end; c += warps) {
      A v[kPerLane];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t i = c * kRejectionChunk + j * 32 + lane;
        v[j] = i < vocab ? to_acc(xr[i]) : -Limits<A>::inf();
      }
      A cmax = m;
      if (!cut) {
        cmax = Limits<A>::lowest();
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) cmax = nan_max(cmax, v[j]);
        cmax = warp_nan_max(cmax);
      }
      double d = 0.0;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) d += v[j] >= threshold ? exp(static_cast<double>((v[j] - cmax) * s)) : 0.0;
      d = warp_sum<32>(d);
      if (lane == 0) {
        cm[c] = cmax;
        cd[c] = d;
      }
    }
  }
}

template <typename T, typename Q>
__global__ void __launch_bounds__(kRejectionThreads)
    rejection_sample_kernel(const T* __restrict__ target, int64_t batch, int64_t n, int64_t vocab,
                            const int64_t* __restrict__ draft_ids, const Q* __restrict__ draft_probs,
                            const int64_t* __restrict__ num_drafts, const double* __restrict__ temperature,
                            const double* __restrict__ min_log_ratio, const double* __restrict__ uniforms,
                            int64_t* __restrict__ token_ids, int64_t* __restrict__ num_accepted,
                            A_t<T>* __restrict__ log_probs, const A_t<T>* __restrict__ chunk_m,
                            const double* __restrict__ chunk_d, double* __restrict__ residual, int64_t chunks) {
  using A = A_t<T>;
  __shared__ A pos_m[kRejectionGroup];
  __shared__ double pos_d[kRejectionGroup];
  __shared__ int64_t pos_arg[kRejectionGroup];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t n1 = n + 1;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const int64_t nb = num_drafts[b];
    const double t = temperature[b];
    const bool greedy = t == 0.0;
    const A s = scale_of<A>(t);
    int64_t filled = 0, accepted = 0;  // positions [0, filled) hold tokens
    bool done = false;
    for (int64_t g = 0; !done; g += kRejectionGroup) {
      const int count = int(imin(nb + 1 - g, kRejectionGroup));
      // A warp per position: its max, its mass in double, and a greedy row's arg-max (the first
      // chunk holding the max, rescanned for the first index at it).
      for (int k = warp; k < count; k += warps) {
        const int64_t row = b * n1 + g + k;
        const A* cm = chunk_m + row * chunks;
        const double* cd = chunk_d + row * chunks;
        A m = Limits<A>::lowest();
        for (int64_t c = lane; c < chunks; c += 32) m = nan_max(m, cm[c]);
        m = warp_nan_max(m);
        double d = 0.0;
        for (int64_t c = lane; c < chunks; c += 32) d += cd[c] * chunk_scale(cm[c], m, s);
        d = warp_sum<32>(d);
        int64_t arg = -1;
        if (greedy && finite_value(static_cast<double>(m))) {
          int64_t first = kNoIndex;
          for (int64_t c = lane; c < chunks; c += 32) {
            if (cm[c] == m) {
              first = c;
              break;
            }
          }
          first = warp_min_index(first);
          const T* xr = target + row * vocab;
          int64_t at = kNoIndex;
          if (first < chunks) {
#pragma unroll
            for (int j = 0; j < kPerLane; ++j) {
              const int64_t i = first * kRejectionChunk + j * 32 + lane;
              if (i < vocab && at == kNoIndex && to_acc(xr[i]) == m) at = i;
            }
          }
          arg = warp_min_index(at);
        }
        if (lane == 0) {
          pos_m[k] = m;
          pos_d[k] = d;
          pos_arg[k] = arg;
        }
      }
      __syncthreads();  // every position's state is in shared memory
      for (int k = 0; k < count && !done; ++k) {
        const int64_t i = g + k, row = b * n1 + i;
        const T* xr = target + row * vocab;
        const A m = pos_m[k];
        const double d = pos_d[k];
        accepted = i;
        if (!(finite_value(static_cast<double>(m)) && d > 0.0 && finite_value(d))) {
          done = true;  // no distribution here: -1, NaN from this position on
          break;
        }
        const double log_d = log(d);
        const bool cut = has_cut(t, min_log_ratio, row);
        const A threshold = cut ? threshold_value(m, min_log_ratio[row], s) : -Limits<A>::inf();
        // The oracle's terms: exp of the scaled logit rounded to A, in double, 0 below the cut.
        auto p_weight = [&](int64_t j) -> double {
          const A x = to_acc(xr[j]);
          return x >= threshold ? exp(static_cast<double>((x - m) * s)) : 0.0;
        };
        auto p_mass = [&](int64_t c) -> double {
          return chunk_d[row * chunks + c] * chunk_scale(chunk_m[row * chunks + c], m, s);
        };
        const double u_last = uniforms[b * n1 + n];
        int64_t tok = -1;
        if (i == nb) {  // every draft accepted: the bonus token from this position
          if (greedy) {
            tok = pos_arg[k];
          } else if (warp == 0) {
            tok = warp_draw(p_mass, p_weight, chunks, vocab, warp_total(p_mass, chunks), u_last);
          }
          done = true;
        } else {
          const int64_t v = draft_ids[b * n + i];
          if (greedy) {
            tok = pos_arg[k];
            done = v != tok;
          } else {
            const Q* qr = draft_probs == nullptr ? nullptr : draft_probs + (b * n + i) * vocab;
            const double q_v = qr == nullptr ? 1.0 : static_cast<double>(to_acc(qr[v]));
            if (uniforms[b * n1 + i] * q_v < p_weight(v) / d) {
              tok = v;
            } else {
              // Rejected: the residual max(p - q, 0), its chunk masses from the target and draft rows.
              auto r_weight = [&](int64_t j) -> double {
                const double p = p_weight(j) / d;
                const double q = qr == nullptr ? (j == v ? 1.0 : 0.0) : static_cast<double>(to_acc(qr[j]));
                return p > q ? p - q : 0.0;
              };
              double* res = residual + b * chunks;
              for (int64_t c = warp; c < chunks; c += warps) {
                double sum = 0.0;
#pragma unroll
                for (int j = 0; j < kPerLane; ++j) {
                  const int64_t e = c * kRejectionChunk + j * 32 + lane;
                  if (e < vocab) sum += r_weight(e);
                }
                sum = warp_sum<32>(sum);
                if (lane == 0) res[c] = sum;
              }
              __syncthreads();  // every chunk's residual mass is in memory
              if (warp == 0) {
                auto r_mass = [&](int64_t c) -> double { return res[c]; };
                const double total = warp_total(r_mass, chunks);
                // p and q agree to rounding (the rejection was a rounding event itself): from p.
                tok = total > 0.0 ? warp_draw(r_mass, r_weight, chunks, vocab, total, u_last)
                                  : warp_draw(p_mass, p_weight, chunks, vocab, warp_total(p_mass, chunks), u_last);
              }
              done = true;
            }
          }
        }
        if (threadIdx.x == 0) {
          A lp = Limits<A>::nan();
          if (tok >= 0) {
            const A x = to_acc(xr[tok]);
            lp = x >= threshold ? static_cast<A>(static_cast<double>((x - m) * s) - log_d) : -Limits<A>::inf();
          }
          token_ids[row] = tok;
          log_probs[row] = lp;
        }
        filled = i + 1;
      }
      __syncthreads();  // the next group's states overwrite the shared ones
    }
    if (threadIdx.x == 0) num_accepted[b] = accepted;
    for (int64_t j = filled + threadIdx.x; j < n1; j += blockDim.x) {
      token_ids[b * n1 + j] = -1;
      log_probs[b * n1 + j] = Limits<A>::nan();
    }
  }
}

}  // namespace

template <typename T>
size_t rejection_workspace_bytes(int64_t batch, int64_t n, int64_t vocab, bool cut, DeviceLimits limits) {
  return plan_rejection_sample(batch, n, vocab, cut, 0, elem_bytes<T>(), limits).workspace_bytes;
}

template <typename T, typename Q>
cudaError_t rejection_sample(const T* target, int64_t batch, int64_t n, int64_t vocab, const int64_t* draft_ids,
                             const Q* draft_probs, const int64_t* num_drafts, const double* temperature,
                             const double* min_log_ratio, const double* uniforms, int64_t* token_ids,
                             int64_t* num_accepted, typename AccOf<T>::type* log_probs, void* workspace,
                             DeviceLimits limits, cudaStream_t stream) {
  using A = A_t<T>;
  if (batch <= 0) return cudaSuccess;
  if (n < 0 || vocab <= 0 || workspace == nullptr) return cudaErrorInvalidValue;
  const bool cut = min_log_ratio != nullptr;
  const LaunchPlan plan = plan_rejection_sample(batch, n, vocab, cut, draft_probs == nullptr ? 0 : int(sizeof(Q)),
                                                elem_bytes<T>(), limits);
  const int64_t rows = batch * (n + 1);
  char* ws = static_cast<char*>(workspace);
  auto* cm = reinterpret_cast<A*>(ws);
  ws += align256(size_t(rows * plan.chunks) * sizeof(A));
  auto* cd = reinterpret_cast<double*>(ws);
  ws += align256(size_t(rows * plan.chunks) * sizeof(double));
  auto* pm = reinterpret_cast<A*>(ws);
  ws += align256(cut ? size_t(rows * plan.parts) * sizeof(A) : 0);
  auto* res = reinterpret_cast<double*>(ws);
  int next = 0;
  if (cut) {
    const Launch& l = plan.launch[next++];
    OSM_LAUNCH(l.grid, l.block_x, 0, stream, rejection_max_kernel<T>)(
        target, batch, n, vocab, num_drafts, temperature, min_log_ratio, plan.parts, plan.part_chunks, pm);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const Launch& st = plan.launch[next++];
  OSM_LAUNCH(st.grid, st.block_x, 0, stream, rejection_states_kernel<T>)(
      target, batch, n, vocab, num_drafts, temperature, min_log_ratio, pm, plan.chunks, plan.parts, plan.part_chunks,
      cm, cd);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const Launch& l = plan.launch[next];
  OSM_LAUNCH(l.grid, l.block_x, 0, stream, rejection_sample_kernel<T, Q>)(
      target, batch, n, vocab, draft_ids, draft_probs, num_drafts, temperature, min_log_ratio, uniforms, token_ids,
      num_accepted, log_probs, cm, cd, res, plan.chunks);
  return cudaGetLastError();
}

// Drafts come in float32 or the target's own dtype.
#define OSM_INSTANTIATE_REJECTION(T, Q)                                                                        \
  template cudaError_t rejection_sample<T, Q>(const T*, int64_t, int64_t, int64_t, const int64_t*, const Q*,   \
                                              const int64_t*, const double*, const double*, const double*,     \
                                              int64_t*, int64_t*, typename AccOf<T>::type*, void*, DeviceLimits, \
                                              cudaStream_t);
template size_t rejection_workspace_bytes<float>(int64_t, int64_t, int64_t, bool, DeviceLimits);
template size_t rejection_workspace_bytes<double>(int64_t, int64_t, int64_t, bool, DeviceLimits);
template size_t rejection_workspace_bytes<__half>(int64_t, int64_t, int64_t, bool, DeviceLimits);
template size_t rejection_workspace_bytes<__nv_bfloat16>(int64_t, int64_t, int64_t, bool, DeviceLimits);
OSM_INSTANTIATE_REJECTION(float, float)
OSM_INSTANTIATE_REJECTION(double, float)
OSM_INSTANTIATE_REJECTION(double, double)
OSM_INSTANTIATE_REJECTION(__half, float)
OSM_INSTANTIATE_REJECTION(__half, __half)
OSM_INSTANTIATE_REJECTION(__nv_bfloat16, float)
OSM_INSTANTIATE_REJECTION(__nv_bfloat16, __nv_bfloat16)
#undef OSM_INSTANTIATE_REJECTION

}  // namespace online_softmax::kernels
