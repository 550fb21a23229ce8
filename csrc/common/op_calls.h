// The library's own ops called through the dispatcher from C++ (the autograd kernels' forwards and
// derivatives), so that autograd, torch.compile and torch.func see the registered op, not a kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <utility>
#include <tuple>

namespace online_softmax {

inline at::Tensor call_forward(const at::Tensor& x, int64_t dim, bool log, double temperature,
                               std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::forward", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, bool, double, std::optional<at::ScalarType>)>();
  return op.call(x, dim, log, temperature, dtype);
}

inline at::Tensor call_backward(const at::Tensor& grad, const at::Tensor& out, int64_t dim, bool log,
                                double temperature, std::optional<at::ScalarType> input_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, double,
                                         std::optional<at::ScalarType>)>();
  return op.call(grad, out, dim, log, temperature, input_dtype);
}

inline void call_backward_inplace(const at::Tensor& grad, const at::Tensor& out, int64_t dim, bool log,
                                  double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::backward_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, int64_t, bool, double)>();
  op.call(grad, out, dim, log, temperature);
}

inline at::Tensor call_masked_forward(const at::Tensor& x, const std::optional<at::Tensor>& mask, bool causal,
                                      c10::SymInt causal_offset, bool log, double scale, int64_t dim,
                                      std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::masked_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, bool, c10::SymInt, bool,
                                         double, int64_t, std::optional<at::ScalarType>)>();
  return op.call(x, mask, causal, std::move(causal_offset), log, scale, dim, dtype);
}

inline std::tuple<at::Tensor, at::Tensor> call_stats(const at::Tensor& x, int64_t dim, double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::stats", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, double)>();
  return op.call(x, dim, temperature);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_softmax_topk(const at::Tensor& x, int64_t k,
                                                                                    int64_t dim, bool log,
                                                                                    double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::softmax_topk", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                                        int64_t, bool, double)>();
  return op.call(x, k, dim, log, temperature);
}

inline at::Tensor call_softmax_topk_backward(const at::Tensor& grad_values, const at::Tensor& x,
                                             const at::Tensor& indices, const at::Tensor& max,
                                             const at::Tensor& sumexp, int64_t dim, bool log, double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::softmax_topk_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, bool, double)>();
  return op.call(grad_values, x, indices, max, sumexp, dim, log, temperature);
}

using TokenLogprobsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline TokenLogprobsResult call_token_logprobs(const at::Tensor& x, const at::Tensor& token_ids, int64_t top_n,
                                               double temperature, const std::optional<at::Tensor>& token_values) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::token_logprobs", "")
                       .typed<TokenLogprobsResult(const at::Tensor&, const at::Tensor&, int64_t, double,
                                                  const std::optional<at::Tensor>&)>();
  return op.call(x, token_ids, top_n, temperature, token_values);
}

inline at::Tensor call_token_logprobs_backward(const at::Tensor& grad_log_probs,
                                               const std::optional<at::Tensor>& grad_entropy, const at::Tensor& x,
                                               const at::Tensor& token_ids, const at::Tensor& max,
                                               const at::Tensor& sumexp, const at::Tensor& entropy,
                                               double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::token_logprobs_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double)>();
  return op.call(grad_log_probs, grad_entropy, x, token_ids, max, sumexp, entropy, temperature);
}

}  // namespace online_softmax
