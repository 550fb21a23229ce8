// CUDA cross_entropy_backward: the gradient of a cross-entropy loss with respect to its logits,
//   out[i, c] = p_scale[i] * exp(x[i, c] - max[i]) / sumexp[i] - [c == target[i]] * target_scale[i]
//               - smooth_scale[i] * weight[c]          (weight 1 when null; no term without smooth_scale)
// from the row's online state (max, sumexp) the forward saved, never through a rounded lse (whose
// rounding would shift x - lse by up to an ulp of lse, 1e-3 at 1e4-scale float32 logits): no
// reduction, so one read of x and one write of out, each in 16-byte granules. The thread mapping is
// plan_cross_entropy_backward's (launch_plan.h): the register configurations' groups of threads per
// row for rows that fit them, chunks of a block each for long rows and for too few rows to fill the
// GPU.
#include <utility>

#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace {

template <typename T>
using A_t = acc_t<T>;

// Granules each chunk thread loads before it computes, so that several 16-byte loads are in flight.
constexpr int kUnroll = 4;

template <typename T>
struct CrossEntropyArgs {
  const T* x;
  const A_t<T>* max;
  const A_t<T>* sumexp;
  const int64_t* target;
  const A_t<T>* p_scale;
  const A_t<T>* target_scale;
  const A_t<T>* smooth_scale;  // may be null
  const A_t<T>* weight;        // may be null; read only with smooth_scale
  T* out;
  int64_t rows;
  int64_t n;
  int* error;                  // may be null
};

// One row's scalars, read once per row (or chunk) and applied to every granule of it.
template <typename T>
struct RowTerms {
  using A = A_t<T>;
  A row_max, p_scale, target_scale, smooth;  // p_scale already divided by the row's sumexp
  int64_t target;  // -1 when out of range: no column matches, and *error is set
  bool smoothing;

  __device__ RowTerms(const CrossEntropyArgs<T>& a, int64_t row, bool report) {
    row_max = a.max[row];
    p_scale = a.p_scale[row] / a.sumexp[row];
    target_scale = a.target_scale[row];
    smoothing = a.smooth_scale != nullptr;
    smooth = smoothing ? a.smooth_scale[row] : A(0);
    target = a.target[row];
    if (target < 0 || target >= a.n) {
      // Never a write at the bad column: the binding turns the flag into a device-side assert.
      if (report && a.error != nullptr) *a.error = 1;
      target = -1;
    }
  }

  // Columns [i0, i0 + V) of the row: v holds x, and gets the gradient. exp(x - max) as exp2 of the
  // difference times log2(e) (float): subtracting first keeps 1e4-scale logits exact.
  template <int V>
  __device__ __forceinline__ void apply(const CrossEntropyArgs<T>& a, int64_t i0, A (&v)[V]) const {
    const A log2e = Exp<A>::scale(A(1));
    A w[V];
    if (smoothing && a.weight != nullptr) {
      load_elems(a.weight, i0, a.n, w, A(1));
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) w[j] = A(1);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      A g = p_scale * Exp<A>::of((v[j] - row_max) * log2e);
      g -= (i0 + j == target) ? target_scale : A(0);
      if (smoothing) g -= smooth * w[j];
      v[j] = g;
    }
  }
};

// kGroup threads per row (a sub-warp, a warp or the whole block), each with its kVecs granules
// loaded before any is computed. Threads never exchange data: no shuffle, no barrier.
template <typename T, int kGroup, int kVecs, int kBlock>
__global__ void __launch_bounds__(kBlock) cross_entropy_backward_rows_kernel(CrossEntropyArgs<T> a) {
  using A = A_t<T>;
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
    const RowTerms<T> terms(a, row, t == 0);
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
template <typename T>
__global__ void __launch_bounds__(kSplitThreads)
    cross_entropy_backward_chunks_kernel(CrossEntropyArgs<T> a, int64_t chunks, int64_t chunk_granules) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  for (int64_t b = blockIdx.x; b < a.rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks, c = b % chunks;
    const T* xr = a.x + row * a.n;
    T* outr = a.out + row * a.n;
    const int head = row_head(xr);
    const int64_t g_end = imin(granule_count<T>(head, a.n), (c + 1) * chunk_granules);
    const RowTerms<T> terms(a, row, c == 0 && threadIdx.x == 0);
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

template <typename T, int C>
cudaError_t launch_rows(const Launch& l, const CrossEntropyArgs<T>& a, cudaStream_t stream) {
  constexpr RegisterConfig cfg = kRegisterConfigs[C];
  OSM_LAUNCH(l.grid, l.block_x, 0, stream, cross_entropy_backward_rows_kernel<T, cfg.group, cfg.vecs, cfg.block>)(a);
  return cudaGetLastError();
}

template <typename T, int... Cs>
cudaError_t dispatch_rows(int config, std::integer_sequence<int, Cs...>, const Launch& l,
                          const CrossEntropyArgs<T>& a, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  ((config == Cs ? (err = launch_rows<T, Cs>(l, a, stream), 0) : 0), ...);
  return err;
}

}  // namespace

template <typename T>
cudaError_t cross_entropy_backward(const T* x, const A_t<T>* max, const A_t<T>* sumexp, const int64_t* target,
                                   const A_t<T>* p_scale, const A_t<T>* target_scale, const A_t<T>* smooth_scale,
                                   const A_t<T>* weight, T* out, int64_t rows, int64_t n, int* error,
                                   DeviceLimits limits, cudaStream_t stream) {
  const LaunchPlan plan = plan_cross_entropy_backward(rows, n, elem_bytes<T>(), smooth_scale != nullptr,
                                                      weight != nullptr, limits);
  const CrossEntropyArgs<T> a{x, max, sumexp, target, p_scale, target_scale, smooth_scale, weight, out, rows, n, error};
  const Launch& l = plan.launch[0];
  switch (plan.path) {
    case Path::kNothing:
      return cudaSuccess;
    case Path::kRegisters:
      return dispatch_rows(plan.config, std::make_integer_sequence<int, kNumRegisterConfigs>{}, l, a, stream);
    case Path::kSplit:
      OSM_LAUNCH(l.grid, l.block_x, 0, stream, cross_entropy_backward_chunks_kernel<T>)(a, plan.chunks, plan.chunk);
      return cudaGetLastError();
    default:
      return cudaErrorInvalidValue;
  }
}

#define ONLINE_SOFTMAX_CROSS_ENTROPY(T)                                                                       \
  template cudaError_t cross_entropy_backward<T>(const T*, const A_t<T>*, const A_t<T>*, const int64_t*,     \
                                                 const A_t<T>*, const A_t<T>*, const A_t<T>*, const A_t<T>*, T*, \
                                                 int64_t, int64_t, int*, DeviceLimits, cudaStream_t);
ONLINE_SOFTMAX_CROSS_ENTROPY(float)
ONLINE_SOFTMAX_CROSS_ENTROPY(double)
ONLINE_SOFTMAX_CROSS_ENTROPY(__half)
ONLINE_SOFTMAX_CROSS_ENTROPY(__nv_bfloat16)
#undef ONLINE_SOFTMAX_CROSS_ENTROPY

}  // namespace online_softmax::kernels
