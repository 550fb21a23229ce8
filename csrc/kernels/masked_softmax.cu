// CUDA masked_forward: softmax / log-softmax of x * scale over the last dim of contiguous rows, with
// a bool or additive mask read through its broadcast strides and a causal limit. Masked positions
// enter the online state as -inf; the output pass reads the mask again (from cache: it is at most
// the row's own size) to write 0 (log: -inf) there, also in rows that come out NaN: so a fully masked
// row is zeros, while one whose positions taking part are all -inf is NaN there (torch.softmax). Paths, from plan_masked_forward (launch_plan.h): the register
// configurations of the forward for rows that fit them, otherwise a block per row that reads the
// row twice (the second time from L2).
#include <utility>

#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace {

template <typename T>
using A_t = acc_t<T>;

template <typename T, typename O>
struct MaskedArgs {
  const T* x;
  O* y;
  int64_t rows, n;
  A_t<T> scale;
  bool log;
  MaskLayout mask;
};

// One row's view of the mask: where it starts, how many keys the causal limit leaves.
template <typename A>
struct RowMask {
  const MaskLayout* layout;
  int64_t at = 0;
  int64_t len;

  __device__ RowMask(const MaskLayout& l, int64_t row, int64_t n) : layout(&l), len(n) {
    if (l.causal_rows > 0) {
      const int64_t last = row % l.causal_rows + l.causal_offset;  // the last key query i sees
      len = last < 0 ? 0 : (last + 1 < n ? last + 1 : n);
    }
    int64_t r = row;
    for (int k = l.dims - 1; k >= 0 && r > 0; --k) {
      at += (r % l.sizes[k]) * l.strides[k];
      r /= l.sizes[k];
    }
  }

  __device__ __forceinline__ bool takes_part(int64_t i) const {
    if (i < 0 || i >= len) return false;
    const int64_t m = at + i * layout->col_stride;
    if (layout->kind == 1) return static_cast<const bool*>(layout->mask)[m];
    if (layout->kind == 2) return static_cast<const A*>(layout->mask)[m] != -Limits<A>::inf();
    return true;
  }

  // x * scale (+ the additive mask) where position i takes part, -inf elsewhere.
  template <int V>
  __device__ __forceinline__ void apply(int64_t i0, A scale, A (&v)[V]) const {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t i = i0 + j;
      if (takes_part(i)) {
        v[j] = v[j] * scale;
        if (layout->kind == 2) v[j] += static_cast<const A*>(layout->mask)[at + i * layout->col_stride];
      } else {
        v[j] = -Limits<A>::inf();
      }
    }
  }

  // The outputs of positions [i0, i0 + V) from their masked values.
  template <int V>
  __device__ __forceinline__ void outputs(int64_t i0, const Normalizer<A>& nz, bool log, const A (&v)[V],
                                          A (&out)[V]) const {
    const A off = log ? -Limits<A>::inf() : A(0);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = takes_part(i0 + j) ? nz.out(v[j], log) : off;
  }
};

// ---- kGroup threads per row (a sub-warp, a warp or the whole block), the row in registers ----
template <typename T, typename O, int kGroup, int kVecs, int kBlock>
__global__ void __launch_bounds__(kBlock) masked_rows_kernel(MaskedArgs<T, O> a) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  constexpr int kRowsPerBlock = kBlock / kGroup;
  static_assert(kGroup <= 32 || kGroup == kBlock, "a row is a sub-warp, a warp or the whole block");
  __shared__ State<A> scratch[32];
  const A s2 = Exp<A>::scale(A(1));
  const int t = threadIdx.x % kGroup;
  for (int64_t base = int64_t(blockIdx.x) * kRowsPerBlock; base < a.rows;
       base += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + threadIdx.x / kGroup;
    const bool active = row < a.rows;
    const T* xr = a.x + (active ? row : 0) * a.n;
    const int head = row_head(xr);
    const RowMask<A> rm(a.mask, active ? row : 0, a.n);
    A v[kVecs][V];
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int64_t i0 = int64_t(k * kGroup + t) * V - head;
      load_elems(xr, i0, a.n, v[k], -Limits<A>::inf());
      if (active) {
        rm.apply(i0, a.scale, v[k]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[k][j] = -Limits<A>::inf();
      }
    }
    State<A> st = State<A>::empty();
#pragma unroll
    for (int k = 0; k < kVecs; ++k) update(st, v[k], s2);
    if constexpr (kGroup <= 32) {
      st = warp_merge<kGroup>(st, s2);
    } else {
      st = block_merge(st, s2, scratch);
    }
    if (!active) continue;
    const Normalizer<A> nz(finalize(st), A(1));
    O* yr = a.y + row * a.n;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int64_t i0 = int64_t(k * kGroup + t) * V - head;
      A out[V];
      rm.outputs(i0, nz, a.log, v[k], out);
      store_elems(yr, i0, a.n, out);
    }
  }
}

// Loads granule g of row xr and applies the row's mask.
template <typename T, int V>
__device__ __forceinline__ int64_t masked_granule(const T* xr, int64_t g, int head, int64_t n, const RowMask<A_t<T>>& rm,
                                                  A_t<T> scale, A_t<T> (&v)[V]) {
  const int64_t i0 = g * V - head;
  load_elems(xr, i0, n, v, -Limits<A_t<T>>::inf());
  rm.apply(i0, scale, v);
  return i0;
}

// ---- a block per row, read twice: the state, then the outputs ----
template <typename T, typename O>
__global__ void __launch_bounds__(kSplitThreads) masked_two_pass_kernel(MaskedArgs<T, O> a) {
  using A = A_t<T>;
  constexpr int V = Granule<T>::kVec;
  __shared__ State<A> scratch[32];
  const A s2 = Exp<A>::scale(A(1));
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* xr = a.x + row * a.n;
    const int head = row_head(xr);
    const int64_t granules = granule_count<T>(head, a.n);
    const RowMask<A> rm(a.mask, row, a.n);
    State<A> st = State<A>::empty();
    for (int64_t g = threadIdx.x; g < granules; g += blockDim.x) {
      A v[V];
      masked_granule(xr, g, head, a.n, rm, a.scale, v);
      update(st, v, s2);
    }
    const Normalizer<A> nz(finalize(block_merge(st, s2, scratch)), A(1));
    O* yr = a.y + row * a.n;
    for (int64_t g = threadIdx.x; g < granules; g += blockDim.x) {
      A v[V], out[V];
      const int64_t i0 = masked_granule(xr, g, head, a.n, rm, a.scale, v);
      rm.outputs(i0, nz, a.log, v, out);
      store_elems(yr, i0, a.n, out);
    }
  }
}

template <typename T, typename O, int C>
cudaError_t launch_rows(const Launch& l, const MaskedArgs<T, O>& a, cudaStream_t stream) {
  constexpr RegisterConfig cfg = kRegisterConfigs[C];
  OSM_LAUNCH(l.grid, l.block_x, 0, stream, masked_rows_kernel<T, O, cfg.group, cfg.vecs, cfg.block>)(a);
  return cudaGetLastError();
}

template <typename T, typename O, int... Cs>
cudaError_t dispatch_rows(int config, std::integer_sequence<int, Cs...>, const Launch& l, const MaskedArgs<T, O>& a,
                          cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  ((config == Cs ? (err = launch_rows<T, O, Cs>(l, a, stream), 0) : 0), ...);
  return err;
}

}  // namespace

template <typename T, typename O>
cudaError_t masked_softmax_forward(const T* x, O* y, int64_t rows, int64_t n, double scale, bool log,
                                   const MaskLayout& mask, DeviceLimits limits, cudaStream_t stream) {
  if (mask.dims < 0 || mask.dims > kMaxMaskDims) return cudaErrorInvalidValue;
  const LaunchPlan plan = plan_masked_forward(rows, n, elem_bytes<T, O>(), masked_mask_bytes(mask, rows, n,
                                              sizeof(typename AccOf<T>::type)), limits);
  const MaskedArgs<T, O> a{x, y, rows, n, static_cast<A_t<T>>(scale), log, mask};
  const Launch& l = plan.launch[0];
  switch (plan.path) {
    case Path::kNothing:
      return cudaSuccess;
    case Path::kRegisters:
      return dispatch_rows(plan.config, std::make_integer_sequence<int, kNumRegisterConfigs>{}, l, a, stream);
    case Path::kTwoPass:
      OSM_LAUNCH(l.grid, l.block_x, 0, stream, masked_two_pass_kernel<T, O>)(a);
      return cudaGetLastError();
    default:
      return cudaErrorInvalidValue;
  }
}

#define ONLINE_SOFTMAX_MASKED(T, O)                                                                        \
  template cudaError_t masked_softmax_forward<T, O>(const T*, O*, int64_t, int64_t, double, bool,       \
                                                    const MaskLayout&, DeviceLimits, cudaStream_t);
ONLINE_SOFTMAX_MASKED(float, float)
ONLINE_SOFTMAX_MASKED(double, double)
ONLINE_SOFTMAX_MASKED(__half, __half)
ONLINE_SOFTMAX_MASKED(__nv_bfloat16, __nv_bfloat16)
ONLINE_SOFTMAX_MASKED(__half, float)
ONLINE_SOFTMAX_MASKED(__nv_bfloat16, float)
#undef ONLINE_SOFTMAX_MASKED

}  // namespace online_softmax::kernels
