// CUDA token_logprobs_backward (and its in-place form) binding: checks (common/op_args.h, shared with the CPU),
// device guard, current stream, dtype dispatch, then one call into csrc/kernels/token_logprobs_backward.cu.
#include <ATen/Dispatch.h>

#include "common/op_args.h"
#include "cuda/binding.h"
#include "cuda/kernels.h"

namespace online_softmax::cuda {

namespace {

// Launches the kernel from a.x into out (which may be a.x itself: every element is read before
// it is written).
void run_kernel(const TokenLogprobsBackwardArgs& a, void* out) {
  if (a.rows == 0 || a.n == 0) return;
  const c10::cuda::CUDAGuard guard(a.x.device());
  // A token id outside [0, vocab) is skipped by the kernel and flagged on the device; the check is
  // an asynchronous device-side assert, as cross_entropy_backward's, so the op never waits for the GPU.
  at::Tensor error = at::zeros({1}, a.x.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(a.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "online_softmax.token_logprobs_backward", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    check_launch(kernels::token_logprobs_backward<T>(
                     cptr<scalar_t>(a.x), a.token_ids.const_data_ptr<int64_t>(), a.grad_log_probs.const_data_ptr<A>(),
                     a.grad_entropy.has_value() ? a.grad_entropy->const_data_ptr<A>() : nullptr,
                     a.max.const_data_ptr<A>(), a.sumexp.const_data_ptr<A>(), a.entropy.const_data_ptr<A>(),
                     1.0 / a.temperature, static_cast<T*>(out), a.rows, a.n, error.mutable_data_ptr<int>(), limits,
                     stream),
                 "token_logprobs_backward");
  });
  at::_assert_async(error.eq(0), "online_softmax.token_logprobs_backward: token_ids must lie in [0, vocab)");
}

}  // namespace

at::Tensor token_logprobs_backward(const at::Tensor& grad_log_probs, const std::optional<at::Tensor>& grad_entropy,
                                   const at::Tensor& x, const at::Tensor& token_ids, const at::Tensor& max,
                                   const at::Tensor& sumexp, const at::Tensor& entropy, double temperature) {
  const TokenLogprobsBackwardArgs a =
      token_logprobs_backward_args(grad_log_probs, grad_entropy, x, token_ids, max, sumexp, entropy, temperature);
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

}  // namespace online_softmax::cuda
