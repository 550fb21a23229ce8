// CUDA token_logprobs binding: checks (common/op_args.h, shared with the CPU), device guard, current
// stream, dtype dispatch, then one call into csrc/kernels/token_logprobs.cu. A top_n beyond the
// fused selection (launch_plan.h: token_logprobs_selects) comes from softmax_topk of x in the
// accumulation dtype instead (a second read of x; the selection and the values are the same).
#include <ATen/Dispatch.h>

#include "common/op_args.h"
#include "cuda/binding.h"
#include "cuda/kernels.h"

namespace online_softmax::cuda {

TokenLogprobsResult token_logprobs(const at::Tensor& x, const at::Tensor& token_ids, int64_t top_n, double temperature,
                                   const std::optional<at::Tensor>& token_values) {
  TokenLogprobsArgs a = token_logprobs_args(x, token_ids, top_n, temperature, token_values);
  const TokenLogprobsResult out{a.log_probs, a.rank, a.top_ids, a.top_log_probs, a.max, a.sumexp, a.entropy};
  if (a.rows == 0) return out;
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(a.x);
  const bool selects = kernels::token_logprobs_selects(a.n, top_n, static_cast<int>(a.x.element_size()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "online_softmax.token_logprobs", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    check_launch(kernels::token_logprobs<T>(
                     cptr<scalar_t>(a.x), a.rows, a.n, a.token_ids.const_data_ptr<int64_t>(),
                     a.token_values.defined() ? a.token_values.const_data_ptr<A>() : nullptr, top_n,
                     1.0 / temperature, a.log_probs.mutable_data_ptr<A>(), a.rank.mutable_data_ptr<int64_t>(),
                     a.top_ids.mutable_data_ptr<int64_t>(), a.top_log_probs.mutable_data_ptr<A>(),
                     a.max.mutable_data_ptr<A>(), a.sumexp.mutable_data_ptr<A>(), a.entropy.mutable_data_ptr<A>(),
                     limits, stream),
                 "token_logprobs");
  });
  if (top_n > 0 && !selects) {
    const auto top = softmax_topk(a.x.to(a.log_probs.scalar_type()), top_n, -1, true, temperature);
    a.top_log_probs.copy_(std::get<0>(top));
    a.top_ids.copy_(std::get<1>(top));
  }
  return out;
}

}  // namespace online_softmax::cuda
