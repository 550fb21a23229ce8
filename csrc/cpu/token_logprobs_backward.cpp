// The token_logprobs_backward op (and its in-place form) on the CPU: checks (shared with CUDA), the
// output, then the kernel of the capability in use (csrc/cpu/kernels/token_logprobs_backward.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/op_args.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

namespace {

void run_kernel(const TokenLogprobsBackwardArgs& a, void* out) {
  if (a.rows == 0 || a.n == 0) return;
  kernels().token_logprobs_backward(TokenLogprobsBackwardCall{
      a.x.scalar_type(), a.x.const_data_ptr(), a.rows, a.n, a.temperature, a.token_ids.const_data_ptr<int64_t>(),
      a.grad_log_probs.const_data_ptr(), a.grad_entropy ? a.grad_entropy->const_data_ptr() : nullptr,
      a.max.const_data_ptr(), a.sumexp.const_data_ptr(), a.entropy.const_data_ptr(), out});
}

}  // namespace

at::Tensor token_logprobs_backward(const at::Tensor& grad_log_probs, const std::optional<at::Tensor>& grad_entropy,
                                   const at::Tensor& x, const at::Tensor& token_ids, const at::Tensor& max,
                                   const at::Tensor& sumexp, const at::Tensor& entropy, double temperature) {
  const TokenLogprobsBackwardArgs a =
      token_logprobs_backward_args(grad_log_probs, grad_entropy, x, token_ids, max, sumexp, entropy, temperature);
  // Plain pages, as cross_entropy_backward's gradient (csrc/cpu/cross_entropy.cpp says why).
  at::Tensor out = at::empty(a.x.sizes(), a.x.options());
  run_kernel(a, out.mutable_data_ptr());
  return out;
}

void token_logprobs_backward_(const at::Tensor& x, const at::Tensor& grad_log_probs,
                              const std::optional<at::Tensor>& grad_entropy, const at::Tensor& token_ids,
                              const at::Tensor& max, const at::Tensor& sumexp, const at::Tensor& entropy,
                              double temperature) {
  const TokenLogprobsBackwardArgs a = token_logprobs_backward_args(grad_log_probs, grad_entropy, x, token_ids, max,
                                                                   sumexp, entropy, temperature, /*in_place=*/true);
  run_kernel(a, x.mutable_data_ptr());
}

}  // namespace online_softmax::cpu
