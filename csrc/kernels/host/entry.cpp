// C entry points over the launchers of launchers.h, for the host-executed kernel tests
// (tests/host_kernels.py loads them with ctypes). Test-only. Every pointer is a host buffer; dtype
// codes: 0 float32, 1 float64, 2 float16, 3 bfloat16. Each call returns the launcher's cudaError_t.
#include "kernels/launchers.h"

#include <cstdint>
#include <type_traits>

using namespace online_softmax::kernels;
using online_softmax::RowLayout;
namespace hr = online_softmax::host_runtime;

namespace {

enum Dtype { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

DeviceLimits limits_of(int num_sms, int max_smem_per_block) {
  DeviceLimits limits;
  limits.num_sms = num_sms;
  limits.max_smem_per_block = max_smem_per_block;
  return limits;
}

RowLayout layout_of(int64_t outer, int64_t size, int64_t inner) {
  RowLayout layout;
  layout.outer = outer;
  layout.size = size;
  layout.inner = inner;
  return layout;
}

// Calls fn(T{}) with T the element type of `dtype`; unknown codes are an invalid value.
template <typename Fn>
auto with_dtype(int dtype, Fn&& fn) -> decltype(fn(float{})) {
  switch (dtype) {
    case kFloat: return fn(float{});
    case kDouble: return fn(double{});
    case kHalf: return fn(__half{});
    case kBFloat16: return fn(__nv_bfloat16{});
  }
  return decltype(fn(float{}))(cudaErrorInvalidValue);
}

template <typename T>
using Acc = typename AccOf<T>::type;

}  // namespace

extern "C" {

size_t osm_host_forward_workspace_bytes(int dtype, int64_t outer, int64_t size, int64_t inner, int num_sms,
                                        int max_smem) {
  return with_dtype(dtype, [&](auto t) -> size_t {
    using T = decltype(t);
    return forward_workspace_bytes<T>(layout_of(outer, size, inner), limits_of(num_sms, max_smem));
  });
}

// out_dtype: the same as dtype, or float32 for float16/bfloat16 input (forward's dtype= cast).
int osm_host_forward(int dtype, int out_dtype, const void* x, void* y, void* max_out, void* sumexp_out,
                     int64_t outer, int64_t size, int64_t inner, double scale, int log, void* workspace,
                     int num_sms, int max_smem) {
  const RowLayout layout = layout_of(outer, size, inner);
  const DeviceLimits limits = limits_of(num_sms, max_smem);
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    auto* mo = static_cast<Acc<T>*>(max_out);
    auto* so = static_cast<Acc<T>*>(sumexp_out);
    if (out_dtype == dtype) {
      return softmax_forward<T, T>(static_cast<const T*>(x), static_cast<T*>(y), mo, so, layout, scale, log != 0,
                                   workspace, limits, nullptr);
    }
    if constexpr (sizeof(T) == 2) {
      if (out_dtype == kFloat) {
        return softmax_forward<T, float>(static_cast<const T*>(x), static_cast<float*>(y), mo, so, layout, scale,
                                         log != 0, workspace, limits, nullptr);
      }
    }
    return cudaErrorInvalidValue;
  });
}

size_t osm_host_backward_workspace_bytes(int dtype, int64_t outer, int64_t size, int64_t inner, int num_sms,
                                         int max_smem) {
  return with_dtype(dtype, [&](auto t) -> size_t {
    using T = decltype(t);
    return backward_workspace_bytes<T>(layout_of(outer, size, inner), limits_of(num_sms, max_smem));
  });
}

// y_dtype: of dy and y; dx_dtype: the same, or float16/bfloat16 for float32 y (backward of dtype=).
int osm_host_backward(int y_dtype, int dx_dtype, const void* dy, const void* y, void* dx, int64_t outer,
                      int64_t size, int64_t inner, double scale, int log, void* workspace, int num_sms,
                      int max_smem) {
  const RowLayout layout = layout_of(outer, size, inner);
  const DeviceLimits limits = limits_of(num_sms, max_smem);
  return with_dtype(y_dtype, [&](auto t) -> int {
    using Y = decltype(t);
    if (dx_dtype == y_dtype) {
      return softmax_backward<Y, Y>(static_cast<const Y*>(dy), static_cast<const Y*>(y), static_cast<Y*>(dx),
                                    layout, scale, log != 0, workspace, limits, nullptr);
    }
    if constexpr (sizeof(Y) == 4) {
      return with_dtype(dx_dtype, [&](auto u) -> int {
        using X = decltype(u);
        if constexpr (sizeof(X) == 2) {
          return softmax_backward<Y, X>(static_cast<const Y*>(dy), static_cast<const Y*>(y), static_cast<X*>(dx),
                                        layout, scale, log != 0, workspace, limits, nullptr);
        }
        return cudaErrorInvalidValue;
      });
    }
    return cudaErrorInvalidValue;
  });
}

int64_t osm_host_topk_max_k(int dtype) {
  return with_dtype(dtype, [&](auto t) -> int64_t { return topk_max_k<decltype(t)>(); });
}

size_t osm_host_topk_workspace_bytes(int dtype, int64_t rows, int64_t n, int64_t k, int num_sms, int max_smem) {
  return with_dtype(dtype, [&](auto t) -> size_t {
    return topk_workspace_bytes<decltype(t)>(rows, n, k, limits_of(num_sms, max_smem));
  });
}

int osm_host_topk(int dtype, const void* x, void* values, int64_t* indices, void* max_out, void* sumexp_out,
                  int64_t rows, int64_t n, int64_t k, double scale, int log, void* workspace, int num_sms,
                  int max_smem) {
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    return softmax_topk<T>(static_cast<const T*>(x), static_cast<T*>(values), indices,
                           static_cast<Acc<T>*>(max_out), static_cast<Acc<T>*>(sumexp_out), rows, n, k, scale,
                           log != 0, workspace, limits_of(num_sms, max_smem), nullptr);
  });
}

// error: an int the launcher sets to 1 on an index outside [0, n) (may be null).
int osm_host_topk_backward(int dtype, const void* grad_values, const void* x, const int64_t* indices,
                           const void* max_in, const void* sumexp_in, void* dx, int64_t rows, int64_t n, int64_t k,
                           double scale, int log, int* error, int num_sms, int max_smem) {
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    return softmax_topk_backward<T>(static_cast<const T*>(grad_values), static_cast<const T*>(x), indices,
                                    static_cast<const Acc<T>*>(max_in), static_cast<const Acc<T>*>(sumexp_in),
                                    static_cast<T*>(dx), rows, n, k, scale, log != 0, error,
                                    limits_of(num_sms, max_smem), nullptr);
  });
}

size_t osm_host_sample_workspace_bytes(int dtype, int64_t rows, int64_t n) {
  return with_dtype(dtype, [&](auto t) -> size_t { return sample_workspace_bytes<decltype(t)>(rows, n); });
}

// min_log_ratio may be null (no cut); edit_ids/edit_values null when num_edits is 0.
int osm_host_sample_categorical(int dtype, const void* x, int64_t rows, int64_t n, const double* temperature,
                                const double* min_log_ratio, const double* uniforms, int64_t num_samples,
                                int64_t* tokens, void* log_probs, void* workspace, int num_sms,
                                const int64_t* edit_ids, const void* edit_values, int64_t num_edits) {
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    return sample_categorical<T>(static_cast<const T*>(x), rows, n, temperature, min_log_ratio, uniforms,
                                 num_samples, tokens, static_cast<Acc<T>*>(log_probs), workspace,
                                 limits_of(num_sms, 48 * 1024), nullptr, edit_ids,
                                 static_cast<const Acc<T>*>(edit_values), num_edits);
  });
}

int osm_host_top_p_threshold(int dtype, const void* x, int64_t rows, int64_t n, const double* temperature,
                             const double* top_p, double* log_ratio, int64_t* status, int num_sms,
                             const int64_t* edit_ids, const void* edit_values, int64_t num_edits) {
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    return top_p_threshold<T>(static_cast<const T*>(x), rows, n, temperature, top_p, log_ratio, status,
                              limits_of(num_sms, 48 * 1024), nullptr, edit_ids,
                              static_cast<const Acc<T>*>(edit_values), num_edits);
  });
}

// token_values may be null; top_ids and top_log_probs are written only when the kernel selects.
int osm_host_token_logprobs(int dtype, const void* x, int64_t rows, int64_t n, const int64_t* token_ids,
                            const void* token_values, int64_t top_n, double scale, void* log_probs, int64_t* rank,
                            int64_t* top_ids, void* top_log_probs, void* max_out, void* sumexp_out, void* entropy,
                            int num_sms) {
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    using A = Acc<T>;
    return token_logprobs<T>(static_cast<const T*>(x), rows, n, token_ids, static_cast<const A*>(token_values), top_n,
                             scale, static_cast<A*>(log_probs), rank, top_ids, static_cast<A*>(top_log_probs),
                             static_cast<A*>(max_out), static_cast<A*>(sumexp_out), static_cast<A*>(entropy),
                             limits_of(num_sms, 48 * 1024), nullptr);
  });
}

size_t osm_host_rejection_workspace_bytes(int dtype, int64_t batch, int64_t n, int64_t vocab, int cut, int num_sms) {
  return with_dtype(dtype, [&](auto t) -> size_t {
    return rejection_workspace_bytes<decltype(t)>(batch, n, vocab, cut != 0, limits_of(num_sms, 48 * 1024));
  });
}

// draft_dtype: float32 or dtype (ignored when draft_probs is null); min_log_ratio may be null.
int osm_host_rejection_sample(int dtype, int draft_dtype, const void* target, int64_t batch, int64_t n, int64_t vocab,
                              const int64_t* draft_ids, const void* draft_probs, const int64_t* num_drafts,
                              const double* temperature, const double* min_log_ratio, const double* uniforms,
                              int64_t* token_ids, int64_t* num_accepted, void* log_probs, void* workspace,
                              int num_sms) {
  const DeviceLimits limits = limits_of(num_sms, 48 * 1024);
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    auto run = [&](auto q) -> int {
      using Q = decltype(q);
      return rejection_sample<T, Q>(static_cast<const T*>(target), batch, n, vocab, draft_ids,
                                    static_cast<const Q*>(draft_probs), num_drafts, temperature, min_log_ratio,
                                    uniforms, token_ids, num_accepted, static_cast<Acc<T>*>(log_probs), workspace,
                                    limits, nullptr);
    };
    if (draft_probs == nullptr || draft_dtype == kFloat) return run(float{});
    if (draft_dtype == dtype) return run(T{});
    return int(cudaErrorInvalidValue);
  });
}

// smooth_scale and weight may be null; error: an int the launcher sets to 1 on a target outside
// [0, n) (may be null).
int osm_host_cross_entropy_backward(int dtype, const void* x, const void* row_max, const void* sumexp,
                                    const int64_t* target, const void* p_scale, const void* target_scale,
                                    const void* smooth_scale, const void* weight, void* out, int64_t rows, int64_t n,
                                    int* error, int num_sms, int max_smem) {
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    using A = Acc<T>;
    return cross_entropy_backward<T>(static_cast<const T*>(x), static_cast<const A*>(row_max),
                                     static_cast<const A*>(sumexp), target,
                                     static_cast<const A*>(p_scale), static_cast<const A*>(target_scale),
                                     static_cast<const A*>(smooth_scale), static_cast<const A*>(weight),
                                     static_cast<T*>(out), rows, n, error, limits_of(num_sms, max_smem), nullptr);
  });
}

// grad_entropy may be null (entropy is then not read); error: an int the launcher sets to 1 on a
// token id outside [0, n) (may be null).
int osm_host_token_logprobs_backward(int dtype, const void* x, const int64_t* token_ids, const void* grad_log_probs,
                                     const void* grad_entropy, const void* row_max, const void* sumexp,
                                     const void* entropy, double temperature, void* out, int64_t rows, int64_t n,
                                     int* error, int num_sms, int max_smem) {
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    using A = Acc<T>;
    return token_logprobs_backward<T>(static_cast<const T*>(x), token_ids, static_cast<const A*>(grad_log_probs),
                                      static_cast<const A*>(grad_entropy), static_cast<const A*>(row_max),
                                      static_cast<const A*>(sumexp), static_cast<const A*>(entropy),
                                      1.0 / temperature, static_cast<T*>(out), rows, n, error,
                                      limits_of(num_sms, max_smem), nullptr);
  });
}

// distillation_forward / distillation_backward over contiguous rows (rows x n); target may be null;
// error: an int the launchers set to 1 on a target outside [0, n) that is not ignore_index (may be null).
int osm_host_distillation_forward(int dtype, const void* student, const void* teacher, const int64_t* target,
                                  int kind, double beta, double temperature, double hard_weight,
                                  int64_t ignore_index, void* loss, void* stats, int64_t rows, int64_t n, int* error,
                                  int num_sms, int max_smem) {
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    using A = Acc<T>;
    return distillation_forward<T>(static_cast<const T*>(student), static_cast<const T*>(teacher), target, kind, beta,
                                   temperature, hard_weight, ignore_index, static_cast<A*>(loss),
                                   static_cast<A*>(stats), rows, n, error, limits_of(num_sms, max_smem), nullptr);
  });
}

int osm_host_distillation_backward(int dtype, const void* student, const void* teacher, const int64_t* target,
                                   int kind, double beta, double temperature, double hard_weight,
                                   int64_t ignore_index, const void* grad_loss, const void* stats, void* out,
                                   int64_t rows, int64_t n, int* error, int num_sms, int max_smem) {
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    using A = Acc<T>;
    return distillation_backward<T>(static_cast<const T*>(student), static_cast<const T*>(teacher), target, kind,
                                    beta, temperature, hard_weight, ignore_index, static_cast<const A*>(grad_loss),
                                    static_cast<const A*>(stats), static_cast<T*>(out), rows, n, error,
                                    limits_of(num_sms, max_smem), nullptr);
  });
}

// masked_softmax_forward over contiguous rows (rows x n); out_dtype as osm_host_forward's. kind 0/1/2
// (none, bool, additive in the accumulation type); sizes/strides: dims entries each.
int osm_host_masked_forward(int dtype, int out_dtype, const void* x, void* y, int64_t rows, int64_t n, double scale,
                            int log, int kind, const void* mask, int dims, const int64_t* sizes,
                            const int64_t* strides, int64_t col_stride, int64_t causal_rows, int64_t causal_offset,
                            int num_sms, int max_smem) {
  if (dims < 0 || dims > kMaxMaskDims) return cudaErrorInvalidValue;
  MaskLayout m;
  m.kind = kind;
  m.mask = mask;
  m.dims = dims;
  for (int k = 0; k < dims; ++k) {
    m.sizes[k] = sizes[k];
    m.strides[k] = strides[k];
  }
  m.col_stride = col_stride;
  m.causal_rows = causal_rows;
  m.causal_offset = causal_offset;
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    if (out_dtype == dtype) {
      return masked_softmax_forward<T, T>(static_cast<const T*>(x), static_cast<T*>(y), rows, n, scale, log != 0, m,
                                          limits_of(num_sms, max_smem), nullptr);
    }
    if constexpr (!std::is_same_v<Acc<T>, double> && !std::is_same_v<T, float>) {
      if (out_dtype == kFloat) {
        return masked_softmax_forward<T, float>(static_cast<const T*>(x), static_cast<float*>(y), rows, n, scale,
                                                log != 0, m, limits_of(num_sms, max_smem), nullptr);
      }
    }
    return int(cudaErrorInvalidValue);
  });
}

// 0 in order, 1 reversed, 2 seeded random (runtime.h).
void osm_host_set_schedule(int schedule, uint64_t seed) { hr::set_schedule(hr::Schedule(schedule), seed); }
const char* osm_host_last_error() { return hr::last_error_message(); }
const char* osm_host_launch_log() { return hr::launch_log(); }
void osm_host_clear_launch_log() { hr::clear_launch_log(); }

}  // extern "C"
