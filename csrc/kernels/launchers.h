// Host launchers of the CUDA kernels: raw pointers, sizes and a stream in, cudaError_t out. No torch
// header here or in any file of csrc/kernels, so the kernels compile (and their resource usage can
// be checked) with nvcc alone; csrc/cuda/ is the thin layer that calls these from the op bindings.
//
// Element types are the CUDA ones: float, double, __half, __nv_bfloat16. A is the accumulation type
// (float, or double for double) in which max/sumexp are reported.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/launch_plan.h"

namespace online_softmax::kernels {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// The element sizes launch_plan.h plans with: input T, output O, accumulation AccOf<T>.
template <typename T, typename O = T>
constexpr ElemBytes elem_bytes() {
  return {int(sizeof(T)), int(sizeof(O)), int(sizeof(typename AccOf<T>::type))};
}

// ---- forward and stats (softmax_forward.cu) ----

// Bytes of scratch `softmax_forward` needs for this shape (0 unless long rows are split across
// blocks); the caller allocates it on the same stream.
template <typename T>
size_t forward_workspace_bytes(RowLayout layout, DeviceLimits limits);

// y = softmax(x * scale) or log_softmax along the size dim (scale = 1 / temperature). Any of
// y, max_out and sumexp_out may be null; max_out/sumexp_out receive the per-row state (the max is of
// x * scale). Requires size >= 1.
template <typename T, typename O>
cudaError_t softmax_forward(const T* x, O* y, typename AccOf<T>::type* max_out,
                            typename AccOf<T>::type* sumexp_out, RowLayout layout, double scale,
                            bool log, void* workspace, DeviceLimits limits, cudaStream_t stream);

// ---- masked forward (masked_softmax.cu) ----

// y = softmax(x * scale + additive mask) or log_softmax over the last dim of contiguous rows (rows x
// n), positions off the mask or past the causal limit 0 (log: -inf), a row with none taking part
// all 0 (-inf). mask.dims <= kMaxMaskDims.
template <typename T, typename O>
cudaError_t masked_softmax_forward(const T* x, O* y, int64_t rows, int64_t n, double scale, bool log,
                                   const MaskLayout& mask, DeviceLimits limits, cudaStream_t stream);

// ---- backward (softmax_backward.cu) ----

template <typename Y>
size_t backward_workspace_bytes(RowLayout layout, DeviceLimits limits);

// softmax:     dx = scale * y * (dy - sum(dy * y))
// log_softmax: dx = scale * (dy - exp(y) * sum(dy))
template <typename Y, typename X>
cudaError_t softmax_backward(const Y* dy, const Y* y, X* dx, RowLayout layout, double scale, bool log,
                             void* workspace, DeviceLimits limits, cudaStream_t stream);

// ---- fused top-k (softmax_topk.cu) ----

// The largest k the fused kernel handles; larger k take the sort-based composite of csrc/common.
template <typename T>
int64_t topk_max_k();

template <typename T>
size_t topk_workspace_bytes(int64_t rows, int64_t n, int64_t k, DeviceLimits limits);

// Rows are contiguous (the binding moves the softmax dim last). Writes the k best softmax (or
// log-softmax) values per row sorted descending (NaN first, ties to the lower index), their int64
// indices, and the row state (max of x * scale, sumexp).
template <typename T>
cudaError_t softmax_topk(const T* x, T* values, int64_t* indices, typename AccOf<T>::type* max_out,
                         typename AccOf<T>::type* sumexp_out, int64_t rows, int64_t n, int64_t k,
                         double scale, bool log, void* workspace, DeviceLimits limits,
                         cudaStream_t stream);

// Gradient of softmax_topk's values. `indices` must be sorted ascending within each row (the binding
// sorts them, carrying grad_values along). An index outside [0, n) is skipped (never read or
// written) and sets *error to 1 when error is not null; the caller zeroes it and checks it.
template <typename T>
cudaError_t softmax_topk_backward(const T* grad_values, const T* x, const int64_t* indices,
                                  const typename AccOf<T>::type* max_in,
                                  const typename AccOf<T>::type* sumexp_in, T* dx, int64_t rows,
                                  int64_t n, int64_t k, double scale, bool log, int* error,
                                  DeviceLimits limits, cudaStream_t stream);

// ---- sampling (sample.cu) ----

// Bytes of scratch sample_categorical needs: one (m, d) per kSampleChunk elements of every row.
template <typename T>
size_t sample_workspace_bytes(int64_t rows, int64_t n);

// One draw per uniform from softmax(x * scale) of each contiguous row, scale = 1 / temperature[r],
// restricted to (x - max) / t >= min_log_ratio[r] when min_log_ratio is not null: the first token
// whose cumulative probability exceeds u. tokens/log_probs are (rows, num_samples); a row with NaN,
// +inf or only -inf draws -1 with log-probability NaN. Requires n >= 1. edit_ids/edit_values
// (rows, num_edits), null when num_edits is 0: each row's logit replacements, ids strictly ascending
// in [0, n) then -1 padding (checked by the caller), read instead of x.
template <typename T>
cudaError_t sample_categorical(const T* x, int64_t rows, int64_t n, const double* temperature,
                               const double* min_log_ratio, const double* uniforms, int64_t num_samples,
                               int64_t* tokens, typename AccOf<T>::type* log_probs, void* workspace,
                               DeviceLimits limits, cudaStream_t stream, const int64_t* edit_ids = nullptr,
                               const typename AccOf<T>::type* edit_values = nullptr, int64_t num_edits = 0);

// transformers' top-p cut per row, as the log-ratio (x - max) / t of the smallest token kept;
// status 0 found, 1 tied at the cut within float resolution, 2 no distribution. Edits as
// sample_categorical's.
template <typename T>
cudaError_t top_p_threshold(const T* x, int64_t rows, int64_t n, const double* temperature, const double* top_p,
                            double* log_ratio, int64_t* status, DeviceLimits limits, cudaStream_t stream,
                            const int64_t* edit_ids = nullptr, const typename AccOf<T>::type* edit_values = nullptr,
                            int64_t num_edits = 0);

// ---- rejection_sample (rejection_sample.cu) ----

// Bytes of scratch rejection_sample needs: every target position's chunk states (plan_rejection_sample),
// the part maxima with a cut, and one residual mass per chunk of every batch row.
template <typename T>
size_t rejection_workspace_bytes(int64_t batch, int64_t n, int64_t vocab, bool cut, DeviceLimits limits);

// Speculative decoding's verification (semantics: rejection_sample in csrc/ops.cpp), over contiguous
// arrays: target (batch, n + 1, vocab); draft_ids (batch, n) in [0, vocab); draft_probs (batch, n,
// vocab) of Q (float, or T) or null for one-hot drafts; num_drafts (batch,) in [0, n]; temperature
// (batch,) with 0 for a greedy row; min_log_ratio (batch, n + 1) or null; uniforms (batch, n + 1) in
// [0, 1). Writes token_ids (batch, n + 1) padded with -1, num_accepted (batch,), and log_probs (batch,
// n + 1) in the accumulation type, NaN-padded. The arguments' values are the caller's to check (the
// binding does, with rejection_args). Requires vocab >= 1.
template <typename T, typename Q>
cudaError_t rejection_sample(const T* target, int64_t batch, int64_t n, int64_t vocab, const int64_t* draft_ids,
                             const Q* draft_probs, const int64_t* num_drafts, const double* temperature,
                             const double* min_log_ratio, const double* uniforms, int64_t* token_ids,
                             int64_t* num_accepted, typename AccOf<T>::type* log_probs, void* workspace,
                             DeviceLimits limits, cudaStream_t stream);

// ---- token_logprobs (token_logprobs.cu) ----

// Semantics: token_logprobs in csrc/ops.cpp, over contiguous rows (rows, n), n >= 1: token_ids
// (rows,) in [0, n) (the caller checks them), token_values (rows,) or null. Writes log_probs, rank,
// max, sumexp, entropy (rows,) and, when token_logprobs_selects(n, top_n, sizeof(T)), top_ids and
// top_log_probs (rows, top_n); otherwise those are the caller's (softmax_topk).
template <typename T>
cudaError_t token_logprobs(const T* x, int64_t rows, int64_t n, const int64_t* token_ids,
                           const typename AccOf<T>::type* token_values, int64_t top_n, double scale,
                           typename AccOf<T>::type* log_probs, int64_t* rank, int64_t* top_ids,
                           typename AccOf<T>::type* top_log_probs, typename AccOf<T>::type* max_out,
                           typename AccOf<T>::type* sumexp_out, typename AccOf<T>::type* entropy,
                           DeviceLimits limits, cudaStream_t stream);

// ---- cross_entropy_backward (cross_entropy.cu) ----

// out[i, c] = p_scale[i] * exp(x[i, c] - max[i]) / sumexp[i] - [c == target[i]] * target_scale[i]
//             - smooth_scale[i] * (weight ? weight[c] : 1)   (the last term only with smooth_scale)
// over contiguous rows of n elements, computed in the accumulation type and rounded once into out
// (x's type). smooth_scale and weight may be null. A target outside [0, n) subtracts nothing (no
// column is written out of bounds) and sets *error to 1 when error is not null; the caller zeroes
// it and checks it.
template <typename T>
cudaError_t cross_entropy_backward(const T* x, const typename AccOf<T>::type* max,
                                   const typename AccOf<T>::type* sumexp, const int64_t* target,
                                   const typename AccOf<T>::type* p_scale,
                                   const typename AccOf<T>::type* target_scale,
                                   const typename AccOf<T>::type* smooth_scale,
                                   const typename AccOf<T>::type* weight, T* out, int64_t rows, int64_t n,
                                   int* error, DeviceLimits limits, cudaStream_t stream);

// ---- token_logprobs_backward (token_logprobs_backward.cu) ----

// dx[r, j] = s * (g_lp[r] * ([j == tok_r] - p_rj) - g_H[r] * p_rj * (log p_rj + H_r)), s = scale =
// 1 / temperature, p from the row's state (max of x * s, sumexp), over contiguous rows of n
// elements, computed in the accumulation type and rounded once into out (x's type; may be x).
// grad_entropy may be null (no entropy term; entropy is then not read). A token id outside [0, n)
// adds no one-hot (no column is written out of bounds) and sets *error to 1 when error is not null;
// the caller zeroes it and checks it.
template <typename T>
cudaError_t token_logprobs_backward(const T* x, const int64_t* token_ids,
                                    const typename AccOf<T>::type* grad_log_probs,
                                    const typename AccOf<T>::type* grad_entropy,
                                    const typename AccOf<T>::type* max, const typename AccOf<T>::type* sumexp,
                                    const typename AccOf<T>::type* entropy, double scale, T* out, int64_t rows,
                                    int64_t n, int* error, DeviceLimits limits, cudaStream_t stream);

// ---- distillation_forward, distillation_backward (distillation.cu) ----

// The per-row distillation loss of contiguous student and teacher rows of n elements (semantics:
// distillation_forward in csrc/ops.cpp; kind 0 kl, 1 reverse_kl, 2 jsd): loss (rows,) and stats
// (rows, 7), accumulation type. target may be null. A target outside [0, n) that is not
// ignore_index gives a NaN loss and sets *error to 1 when error is not null; the caller zeroes it
// and checks it.
template <typename T>
cudaError_t distillation_forward(const T* student, const T* teacher, const int64_t* target, int kind, double beta,
                                 double temperature, double hard_weight, int64_t ignore_index,
                                 typename AccOf<T>::type* loss, typename AccOf<T>::type* stats, int64_t rows,
                                 int64_t n, int* error, DeviceLimits limits, cudaStream_t stream);

// d(sum grad_loss * loss) / d student from the forward's stats, rounded once into out (student's
// type; may be student). A target outside [0, n) adds no one-hot and sets *error as above.
template <typename T>
cudaError_t distillation_backward(const T* student, const T* teacher, const int64_t* target, int kind, double beta,
                                  double temperature, double hard_weight, int64_t ignore_index,
                                  const typename AccOf<T>::type* grad_loss, const typename AccOf<T>::type* stats,
                                  T* out, int64_t rows, int64_t n, int* error, DeviceLimits limits,
                                  cudaStream_t stream);

}  // namespace online_softmax::kernels
