// The CUDA implementations of the online_softmax ops (schemas in csrc/ops.cpp), one file each:
//   forward, stats            csrc/cuda/softmax.cpp
//   backward(_)               csrc/cuda/softmax_backward.cpp
//   softmax_topk(_backward)   csrc/cuda/softmax_topk.cpp
//   sample_categorical,
//   top_p_threshold           csrc/cuda/sample.cpp
//   cross_entropy_backward(_) csrc/cuda/cross_entropy.cpp
//   token_logprobs_backward(_) csrc/cuda/token_logprobs_backward.cpp
//   distillation_forward,
//   distillation_backward(_)  csrc/cuda/distillation.cpp
//   masked_forward            csrc/cuda/masked_softmax.cpp
//   rejection_sample          csrc/cuda/rejection_sample.cpp
//   token_logprobs            csrc/cuda/token_logprobs.cpp
// Each checks its arguments (csrc/common/op_args.h, shared with the CPU backend), guards the device,
// dispatches the dtype and makes one call into the framework-free launchers of csrc/kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace online_softmax::cuda {

at::Tensor forward(const at::Tensor& x, int64_t dim, bool log, double temperature,
                   std::optional<at::ScalarType> dtype);

at::Tensor masked_forward(const at::Tensor& x, const std::optional<at::Tensor>& mask, bool causal,
                          int64_t causal_offset, bool log, double scale, int64_t dim,
                          std::optional<at::ScalarType> dtype);

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& x, int64_t dim, double temperature);

at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log,
                    double temperature, std::optional<at::ScalarType> input_dtype);

void backward_(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log, double temperature);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_topk(
    const at::Tensor& x, int64_t k, int64_t dim, bool log, double temperature);

at::Tensor softmax_topk_backward(const at::Tensor& grad_values, const at::Tensor& x,
                                 const at::Tensor& indices, const at::Tensor& max,
                                 const at::Tensor& sumexp, int64_t dim, bool log,
                                 double temperature);

std::tuple<at::Tensor, at::Tensor> sample_categorical(const at::Tensor& x, const at::Tensor& temperature,
                                                      const std::optional<at::Tensor>& min_log_ratio,
                                                      const at::Tensor& uniforms,
                                                      const std::optional<at::Tensor>& edit_ids,
                                                      const std::optional<at::Tensor>& edit_values);

std::tuple<at::Tensor, at::Tensor> top_p_threshold(const at::Tensor& x, const at::Tensor& temperature,
                                                   const at::Tensor& top_p,
                                                   const std::optional<at::Tensor>& edit_ids,
                                                   const std::optional<at::Tensor>& edit_values);

using TokenLogprobsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

TokenLogprobsResult token_logprobs(const at::Tensor& x, const at::Tensor& token_ids, int64_t top_n, double temperature,
                                   const std::optional<at::Tensor>& token_values);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rejection_sample(
    const at::Tensor& target_logits, const at::Tensor& draft_token_ids, const std::optional<at::Tensor>& draft_probs,
    const at::Tensor& num_draft_tokens, const at::Tensor& temperature, const std::optional<at::Tensor>& min_log_ratio,
    const at::Tensor& uniforms);

at::Tensor cross_entropy_backward(const at::Tensor& x, const at::Tensor& max, const at::Tensor& sumexp,
                                  const at::Tensor& target,
                                  const at::Tensor& p_scale, const at::Tensor& target_scale,
                                  const std::optional<at::Tensor>& smooth_scale,
                                  const std::optional<at::Tensor>& weight);

void cross_entropy_backward_(const at::Tensor& x, const at::Tensor& max, const at::Tensor& sumexp,
                             const at::Tensor& target,
                             const at::Tensor& p_scale, const at::Tensor& target_scale,
                             const std::optional<at::Tensor>& smooth_scale, const std::optional<at::Tensor>& weight);

at::Tensor token_logprobs_backward(const at::Tensor& grad_log_probs, const std::optional<at::Tensor>& grad_entropy,
                                   const at::Tensor& x, const at::Tensor& token_ids, const at::Tensor& max,
                                   const at::Tensor& sumexp, const at::Tensor& entropy, double temperature);

void token_logprobs_backward_(const at::Tensor& x, const at::Tensor& grad_log_probs,
                              const std::optional<at::Tensor>& grad_entropy, const at::Tensor& token_ids,
                              const at::Tensor& max, const at::Tensor& sumexp, const at::Tensor& entropy,
                              double temperature);

std::tuple<at::Tensor, at::Tensor> distillation_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                        const std::optional<at::Tensor>& target,
                                                        c10::string_view kind, double beta, double temperature,
                                                        double hard_weight, int64_t ignore_index);

at::Tensor distillation_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& target, const at::Tensor& stats,
                                 c10::string_view kind, double beta, double temperature, double hard_weight,
                                 int64_t ignore_index);

void distillation_backward_(const at::Tensor& student, const at::Tensor& grad_loss, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& target, const at::Tensor& stats, c10::string_view kind,
                            double beta, double temperature, double hard_weight, int64_t ignore_index);

}  // namespace online_softmax::cuda
