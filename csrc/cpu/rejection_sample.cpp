// The rejection_sample op on the CPU: checks and outputs (common/op_args.h), then the kernel of the
// capability in use (csrc/cpu/kernels/rejection_sample.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/op_args.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rejection_sample(
    const at::Tensor& target_logits, const at::Tensor& draft_token_ids, const std::optional<at::Tensor>& draft_probs,
    const at::Tensor& num_draft_tokens, const at::Tensor& temperature, const std::optional<at::Tensor>& min_log_ratio,
    const at::Tensor& uniforms) {
  RejectionArgs a = rejection_args(target_logits, draft_token_ids, draft_probs, num_draft_tokens, temperature,
                                   min_log_ratio, uniforms);
  if (a.batch > 0) {
    kernels().rejection_sample(RejectionCall{
        a.target.scalar_type(), a.target.const_data_ptr(), a.batch, a.n, a.vocab,
        a.draft_ids.const_data_ptr<int64_t>(),
        a.draft_probs.defined() ? a.draft_probs.scalar_type() : at::kFloat,
        a.draft_probs.defined() ? a.draft_probs.const_data_ptr() : nullptr, a.num_drafts.const_data_ptr<int64_t>(),
        a.temperature.const_data_ptr<double>(),
        a.min_log_ratio.defined() ? a.min_log_ratio.const_data_ptr<double>() : nullptr,
        a.uniforms.const_data_ptr<double>(), a.token_ids.mutable_data_ptr<int64_t>(),
        a.num_accepted.mutable_data_ptr<int64_t>(), a.log_probs.mutable_data_ptr()});
  }
  return {a.token_ids, a.num_accepted, a.log_probs};
}

}  // namespace online_softmax::cpu
