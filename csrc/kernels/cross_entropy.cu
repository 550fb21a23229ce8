// CUDA cross_entropy_backward: the gradient of a cross-entropy loss with respect to its logits,
//   out[i, c] = p_scale[i] * exp(x[i, c] - max[i]) / sumexp[i] - [c == target[i]] * target_scale[i]
//               - smooth_scale[i] * weight[c]          (weight 1 when null; no term without smooth_scale)
// from the row's online state (max, sumexp) the forward saved, never through a rounded lse (whose
// rounding would shift x - lse by up to an ulp of lse, 1e-3 at 1e4-scale float32 logits): no
// reduction, so one read of x and one write of out, each in 16-byte granules. The thread mapping is
// plan_cross_entropy_backward's (launch_plan.h), the kernels' bodies row_gradient.cuh's.
#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/row_gradient.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace {

template <typename T>
using A_t = acc_t<T>;

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

OSM_ROW_GRADIENT_KERNELS(cross_entropy_backward, CrossEntropyArgs, RowTerms)

}  // namespace

template <typename T>
cudaError_t cross_entropy_backward(const T* x, const A_t<T>* max, const A_t<T>* sumexp, const int64_t* target,
                                   const A_t<T>* p_scale, const A_t<T>* target_scale, const A_t<T>* smooth_scale,
                                   const A_t<T>* weight, T* out, int64_t rows, int64_t n, int* error,
                                   DeviceLimits limits, cudaStream_t stream) {
  const LaunchPlan plan = plan_cross_entropy_backward(rows, n, elem_bytes<T>(), smooth_scale != nullptr,
                                                      weight != nullptr, limits);
  const CrossEntropyArgs<T> a{x, max, sumexp, target, p_scale, target_scale, smooth_scale, weight, out, rows, n, error};
  return cross_entropy_backward_launch(plan, a, stream);
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
