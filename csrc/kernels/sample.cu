// CUDA kernels of sample_categorical and top_p_threshold (the CPU forms: csrc/cpu/kernels/sample.h).
//
// sample_categorical: one block per row. Each warp takes 256-element chunks of the row and leaves
// one state (m_c, d_c) per chunk in the workspace (with a cut: the kept mass, m_c = the row max);
// then each thread takes draws: it walks the chunk masses to the chunk holding u * D and scans that
// chunk alone for the token. The row is read once (twice with a cut), nothing of its size written.
//
// top_p_threshold: one block per row narrows a bracket [lo, hi) on the log-ratio (x - max) / t by
// 16 probes per pass over the row (from L2 after the first), as the CPU kernel does, with the same
// threshold rounding, so both classify every token alike.
//
// Sparse edits (each row's ascending (id, value) list in global memory) replace x wherever a thread
// reads it, without changing which thread reads which element or the order of any sum: a warp's
// chunk finds its edits by a binary search and patches its registers; a thread scanning a chunk for
// a draw or striding over the row for top-p walks a cursor along the list. So a row with edits gives
// the bits the dense edited copy (in the accumulation type) gives.
#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/sampling_cut.cuh"

namespace online_softmax::kernels {
namespace {

constexpr int kPerLane = kSampleChunk / 32;  // kSampleThreads and kSampleChunk: launch_plan.h
constexpr int kProbes = 16;

template <typename T>
using A_t = acc_t<T>;

// One row's edits: ids strictly ascending in [0, n), values in the accumulation type; count stops at
// the -1 padding.
template <typename A>
struct RowEdits {
  const int64_t* ids;
  const A* values;
  int64_t count;
};

// The first index k >= from with ids[k] >= i, or the end (count); ids[lo, hi) is ascending.
template <typename A>
__device__ __forceinline__ int64_t first_edit(const RowEdits<A>& e, int64_t i, int64_t from = 0) {
  int64_t lo = from, hi = e.count;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (e.ids[mid] < i) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename A>
__device__ RowEdits<A> row_edits(const int64_t* ids, const A* values, int64_t num_edits, int64_t row) {
  RowEdits<A> e{ids + row * num_edits, values + row * num_edits, 0};
  if (num_edits == 0) return e;
  int64_t lo = 0, hi = num_edits;  // the real ids come first: the first -1
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (e.ids[mid] >= 0) lo = mid + 1; else hi = mid;
  }
  e.count = lo;
  return e;
}

// The edited value at i for a thread whose reads of the row ascend: k is its cursor in the list.
template <typename A>
__device__ __forceinline__ A edited(A v, int64_t i, const RowEdits<A>& e, int64_t& k) {
  while (k < e.count && e.ids[k] < i) ++k;
  return k < e.count && e.ids[k] == i ? e.values[k] : v;
}

// A warp's chunk in registers, v[j] holding element base + j * 32 + lane: the chunk's edits applied.
template <int kPer, typename A>
__device__ __forceinline__ void patch_chunk(A (&v)[kPer], int64_t base, int lane, const RowEdits<A>& e) {
  if (e.count == 0) return;
  for (int64_t k = first_edit(e, base); k < e.count && e.ids[k] < base + kPer * 32; ++k) {
    const int64_t offset = e.ids[k] - base;
    if ((offset & 31) == lane) {
      const A value = e.values[k];
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        if ((offset >> 5) == j) v[j] = value;
      }
    }
  }
}

// The row's max (NaN if any). Without edits, strided over the block's threads; with them, a warp per
// chunk (the max is exact, so any split gives the same bits).
template <typename T>
__device__ A_t<T> row_max(const T* xr, int64_t n, const RowEdits<A_t<T>>& e, A_t<T>* scratch) {
  using A = A_t<T>;
  A m = Limits<A>::lowest();
  if (e.count == 0) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = nan_max(m, to_acc(xr[i]));
  } else {
    const int lane = threadIdx.x % 32;
    for (int64_t c = threadIdx.x / 32; c * kSampleChunk < n; c += blockDim.x / 32) {
      A v[kPerLane];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t i = c * kSampleChunk + j * 32 + lane;
        v[j] = i < n ? to_acc(xr[i]) : Limits<A>::lowest();
      }
      patch_chunk(v, c * kSampleChunk, lane, e);
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) m = nan_max(m, v[j]);
    }
  }
  return block_max(m, scratch);
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(const T* __restrict__ x, int64_t rows, int64_t n, const double* __restrict__ temperature,
                  const double* __restrict__ min_log_ratio, const double* __restrict__ uniforms, int64_t num_samples,
                  int64_t* __restrict__ tokens, A_t<T>* __restrict__ log_probs, A_t<T>* __restrict__ chunk_m,
                  A_t<T>* __restrict__ chunk_d, const int64_t* __restrict__ edit_ids,
                  const A_t<T>* __restrict__ edit_values, int64_t num_edits) {
  using A = A_t<T>;
  __shared__ A scratch[32];
  __shared__ double dscratch[32];
  const int64_t chunks = (n + kSampleChunk - 1) / kSampleChunk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    A* cm = chunk_m + row * chunks;
    A* cd = chunk_d + row * chunks;
    const A s = static_cast<A>(1.0 / temperature[row]);
    const A s2 = Exp<A>::scale(s);
    const bool cut = min_log_ratio != nullptr && min_log_ratio[row] > -1.0e308;
    const RowEdits<A> edits = row_edits(edit_ids, edit_values, num_edits, row);
    A m = Limits<A>::lowest();
    A threshold = -Limits<A>::inf();
    if (cut) {
      m = row_max(xr, n, edits, scratch);
      threshold = threshold_value(m, min_log_ratio[row], s);
    }
    // Chunk states, one warp per chunk.
    A wm = Limits<A>::lowest();
    for (int64_t c = warp; c < chunks; c += warps) {
      A v[kPerLane];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t i = c * kSampleChunk + j * 32 + lane;
        v[j] = i < n ? to_acc(xr[i]) : -Limits<A>::inf();
      }
      patch_chunk(v, c * kSampleChunk, lane, edits);
      A cmax = m;
      if (!cut) {
        cmax = Limits<A>::lowest();
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) cmax = nan_max(cmax, v[j]);
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) cmax = nan_max(cmax, __shfl_xor_sync(0xffffffffu, cmax, offset));
      }
      A d = 0;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) d += v[j] >= threshold ? Exp<A>::of((v[j] - cmax) * s2) : A(0);
      d = warp_sum<32>(d);
      if (lane == 0) {
        cm[c] = cmax;
        cd[c] = d;
      }
      wm = nan_max(wm, cmax);
    }
    if (!cut) m = block_max(wm, scratch);
    __syncthreads();  // the chunk states are in memory for every thread
    double total = 0.0;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      total += static_cast<double>(cd[c]) * exp((static_cast<double>(cm[c]) - static_cast<double>(m)) * s);
    }
    total = block_sum(total, dscratch);
    const bool defined = n > 0 && finite_value(static_cast<double>(m)) && total > 0.0 && finite_value(total);
    for (int64_t j = threadIdx.x; j < num_samples; j += blockDim.x) {
      int64_t* tok = tokens + row * num_samples + j;
      A* lp = log_probs + row * num_samples + j;
      if (!defined) {
        *tok = -1;
        *lp = Limits<A>::nan();
        continue;
      }
      double target = uniforms[row * num_samples + j] * total;
      int64_t c = 0, last = -1;
      double w = 0.0;
      for (; c < chunks; ++c) {
        w = static_cast<double>(cd[c]) * exp((static_cast<double>(cm[c]) - static_cast<double>(m)) * s);
        if (w > 0.0) last = c;
        if (w > 0.0 && target < w) break;
        target -= w;
      }
      if (c == chunks) {  // rounding put u * D past the sum: the last chunk with mass
        c = last;
        target = static_cast<double>(cd[c]) * exp((static_cast<double>(cm[c]) - static_cast<double>(m)) * s);
      }
      const int64_t begin = c * kSampleChunk, end = imin(n, begin + kSampleChunk);
      int64_t pick = -1, best = begin;
      A pick_v = 0, best_v = 0;
      double acc = 0.0;
      int64_t k = edits.count > 0 ? first_edit(edits, begin) : 0;
      for (int64_t i = begin; i < end; ++i) {
        const A v = edited(to_acc(xr[i]), i, edits, k);
        if (i == begin || v > best_v) {
          best = i;
          best_v = v;
        }
        if (!(v >= threshold)) continue;
        const double e = exp(static_cast<double>((v - m) * s));
        if (e > 0.0) {
          pick = i;
          pick_v = v;
          acc += e;
          if (acc > target) break;
        }
      }
      if (pick < 0) {
        pick = best;
        pick_v = best_v;
      }
      *tok = pick;
      *lp = static_cast<A>(static_cast<double>((pick_v - m) * s) - log(total));
    }
    __syncthreads();  // the next row reuses the shared scratch
  }
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads)
    top_p_kernel(const T* __restrict__ x, int64_t rows, int64_t n, const double* __restrict__ temperature,
                 const double* __restrict__ top_p, double* __restrict__ log_ratio, int64_t* __restrict__ status,
                 const int64_t* __restrict__ edit_ids, const A_t<T>* __restrict__ edit_values, int64_t num_edits) {
  using A = A_t<T>;
  __shared__ A scratch[32];
  __shared__ double part_mass[kProbes][32];
  __shared__ long long part_count[kProbes][32];
  __shared__ double probe_mass[kProbes];
  __shared__ long long probe_count[kProbes];
  __shared__ double bracket[2];   // lo, hi
  __shared__ int done;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    const A s = static_cast<A>(1.0 / temperature[row]);
    const A s2 = Exp<A>::scale(s);
    const double p = top_p[row];
    const RowEdits<A> edits = row_edits(edit_ids, edit_values, num_edits, row);
    const A m = row_max(xr, n, edits, scratch);
    if (!finite_value(static_cast<double>(m)) || p <= 0.0) {
      if (threadIdx.x == 0) {
        log_ratio[row] = p <= 0.0 && finite_value(static_cast<double>(m)) ? 0.0 : Limits<double>::nan();
        status[row] = p <= 0.0 && finite_value(static_cast<double>(m)) ? 0 : 2;
      }
      __syncthreads();
      continue;
    }
    if (threadIdx.x == 0) {
      bracket[0] = -104.0;  // exp((x - m) s) is 0 in float below: no probability there
      bracket[1] = 1.0;
      done = 0;
    }
    __syncthreads();
    double total = 0.0;
    long long c_lo = 0, c_hi = 0;
    for (int pass = 0; pass < 24 && !done; ++pass) {
      const double lo = bracket[0], hi = bracket[1];
      A thr[kProbes];
      double mass[kProbes];
      long long count[kProbes];
#pragma unroll
      for (int j = 0; j < kProbes; ++j) {
        thr[j] = threshold_value(m, lo + (hi - lo) * j / kProbes, s);
        mass[j] = 0.0;
        count[j] = 0;
      }
      int64_t k = 0;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const A v = edits.count > 0 ? edited(to_acc(xr[i]), i, edits, k) : to_acc(xr[i]);
        const A e = Exp<A>::of((v - m) * s2);
#pragma unroll
        for (int j = 0; j < kProbes; ++j) {
          if (v >= thr[j]) {
            mass[j] += e;
            count[j] += 1;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kProbes; ++j) {
        const double mj = warp_sum<32>(mass[j]);
        const long long cj = warp_sum<32>(count[j]);
        if (lane == 0) {
          part_mass[j][warp] = mj;
          part_count[j][warp] = cj;
        }
      }
      __syncthreads();
      if (threadIdx.x < kProbes) {
        double mj = 0.0;
        long long cj = 0;
        for (int w = 0; w < warps; ++w) {
          mj += part_mass[threadIdx.x][w];
          cj += part_count[threadIdx.x][w];
        }
        probe_mass[threadIdx.x] = mj;
        probe_count[threadIdx.x] = cj;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        if (pass == 0) total = probe_mass[0];
        if (!(total > 0.0) || !finite_value(total)) {
          log_ratio[row] = Limits<double>::nan();
          status[row] = 2;
          done = 1;
        } else {
          int j = 0;
          while (j + 1 < kProbes && probe_mass[j + 1] / total >= p) ++j;
          const double new_lo = lo + (hi - lo) * j / kProbes;
          c_lo = probe_count[j];
          double new_hi = hi;
          if (j + 1 < kProbes) {
            new_hi = lo + (hi - lo) * (j + 1) / kProbes;
            c_hi = probe_count[j + 1];
          }
          bracket[0] = new_lo;
          bracket[1] = new_hi;
          const bool tie = threshold_value(m, new_lo, s) == threshold_value(m, new_hi, s) || new_hi - new_lo < 1e-12;
          if (c_lo - c_hi <= 1 || tie) {
            log_ratio[row] = new_lo;
            status[row] = c_lo - c_hi <= 1 ? 0 : 1;
            done = 1;
          } else if (pass == 23) {
            log_ratio[row] = new_lo;
            status[row] = 1;
          }
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace

template <typename T>
size_t sample_workspace_bytes(int64_t rows, int64_t n) {
  return size_t(sample_state_bytes(rows, n, elem_bytes<T>()));
}

template <typename T>
cudaError_t sample_categorical(const T* x, int64_t rows, int64_t n, const double* temperature,
                               const double* min_log_ratio, const double* uniforms, int64_t num_samples,
                               int64_t* tokens, typename AccOf<T>::type* log_probs, void* workspace,
                               DeviceLimits limits, cudaStream_t stream, const int64_t* edit_ids,
                               const typename AccOf<T>::type* edit_values, int64_t num_edits) {
  if (rows <= 0 || num_samples <= 0) return cudaSuccess;
  if (n <= 0 || workspace == nullptr || (num_edits > 0 && (edit_ids == nullptr || edit_values == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const LaunchPlan plan =
      plan_sample(rows, n, num_samples, min_log_ratio != nullptr, elem_bytes<T>(), limits, num_edits > 0 ? num_edits : 0);
  const Launch& l = plan.launch[0];
  auto* cm = static_cast<A_t<T>*>(workspace);
  auto* cd = cm + rows * plan.chunks;
  OSM_LAUNCH(l.grid, l.block_x, 0, stream, sample_kernel<T>)(
      x, rows, n, temperature, min_log_ratio, uniforms, num_samples, tokens, log_probs, cm, cd, edit_ids, edit_values,
      num_edits > 0 ? num_edits : 0);
  return cudaGetLastError();
}

template <typename T>
cudaError_t top_p_threshold(const T* x, int64_t rows, int64_t n, const double* temperature, const double* top_p,
                            double* log_ratio, int64_t* status, DeviceLimits limits, cudaStream_t stream,
                            const int64_t* edit_ids, const typename AccOf<T>::type* edit_values, int64_t num_edits) {
  if (rows <= 0) return cudaSuccess;
  if (n <= 0 || (num_edits > 0 && (edit_ids == nullptr || edit_values == nullptr))) return cudaErrorInvalidValue;
  const Launch& l = plan_top_p(rows, n, elem_bytes<T>(), limits, num_edits > 0 ? num_edits : 0).launch[0];
  OSM_LAUNCH(l.grid, l.block_x, 0, stream, top_p_kernel<T>)(x, rows, n, temperature, top_p, log_ratio, status,
                                                           edit_ids, edit_values, num_edits > 0 ? num_edits : 0);
  return cudaGetLastError();
}

#define OSM_INSTANTIATE_SAMPLE(T)                                                                            \
  template size_t sample_workspace_bytes<T>(int64_t, int64_t);                                               \
  template cudaError_t sample_categorical<T>(const T*, int64_t, int64_t, const double*, const double*,       \
                                             const double*, int64_t, int64_t*, typename AccOf<T>::type*, void*, \
                                             DeviceLimits, cudaStream_t, const int64_t*,                     \
                                             const typename AccOf<T>::type*, int64_t);                       \
  template cudaError_t top_p_threshold<T>(const T*, int64_t, int64_t, const double*, const double*, double*, \
                                          int64_t*, DeviceLimits, cudaStream_t, const int64_t*,              \
                                          const typename AccOf<T>::type*, int64_t);
OSM_INSTANTIATE_SAMPLE(float)
OSM_INSTANTIATE_SAMPLE(double)
OSM_INSTANTIATE_SAMPLE(__half)
OSM_INSTANTIATE_SAMPLE(__nv_bfloat16)
#undef OSM_INSTANTIATE_SAMPLE

}  // namespace online_softmax::kernels
