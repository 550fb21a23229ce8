// CUDA binding of rejection_sample: checks (common/op_args.h, shared with the CPU), device guard,
// current stream, dispatch over the target's dtype and draft_probs' (float32 or the target's), the
// workspace, then one call into csrc/kernels/rejection_sample.cu.
#include <ATen/Dispatch.h>

#include "common/op_args.h"
#include "cuda/binding.h"
#include "cuda/kernels.h"

namespace online_softmax::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rejection_sample(
    const at::Tensor& target_logits, const at::Tensor& draft_token_ids, const std::optional<at::Tensor>& draft_probs,
    const at::Tensor& num_draft_tokens, const at::Tensor& temperature, const std::optional<at::Tensor>& min_log_ratio,
    const at::Tensor& uniforms) {
  RejectionArgs a = rejection_args(target_logits, draft_token_ids, draft_probs, num_draft_tokens, temperature,
                                   min_log_ratio, uniforms);
  if (a.batch == 0) return {a.token_ids, a.num_accepted, a.log_probs};
  const c10::cuda::CUDAGuard guard(a.target.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(a.target);
  const bool has_q = a.draft_probs.defined();
  const bool q_float = !has_q || a.draft_probs.scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.target.scalar_type(), "online_softmax.rejection_sample", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    at::Tensor ws = workspace(
        kernels::rejection_workspace_bytes<T>(a.batch, a.n, a.vocab, a.min_log_ratio.defined(), limits), a.target);
    auto run = [&](auto* q) {
      using Q = std::remove_const_t<std::remove_pointer_t<decltype(q)>>;
      check_launch(kernels::rejection_sample<T, Q>(
                       cptr<scalar_t>(a.target), a.batch, a.n, a.vocab, a.draft_ids.const_data_ptr<int64_t>(), q,
                       a.num_drafts.const_data_ptr<int64_t>(), a.temperature.const_data_ptr<double>(),
                       a.min_log_ratio.defined() ? a.min_log_ratio.const_data_ptr<double>() : nullptr,
                       a.uniforms.const_data_ptr<double>(), a.token_ids.mutable_data_ptr<int64_t>(),
                       a.num_accepted.mutable_data_ptr<int64_t>(), a.log_probs.mutable_data_ptr<A>(),
                       workspace_ptr(ws), limits, stream),
                   "rejection_sample");
    };
    // Without draft_probs the float32 instantiation runs with a null q (one-hot drafts).
    if (q_float) {
      run(has_q ? a.draft_probs.const_data_ptr<float>() : static_cast<const float*>(nullptr));
    } else {
      run(cptr<scalar_t>(a.draft_probs));
    }
  });
  return {a.token_ids, a.num_accepted, a.log_probs};
}

}  // namespace online_softmax::cuda
