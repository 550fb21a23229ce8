// The token_logprobs op on the CPU: checks and outputs (common/op_args.h), then the kernel of the
// capability in use (csrc/cpu/kernels/token_logprobs.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/op_args.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

TokenLogprobsResult token_logprobs(const at::Tensor& x, const at::Tensor& token_ids, int64_t top_n, double temperature,
                                   const std::optional<at::Tensor>& token_values) {
  TokenLogprobsArgs a = token_logprobs_args(x, token_ids, top_n, temperature, token_values);
  if (a.rows > 0) {
    kernels().token_logprobs(TokenLogprobsCall{
        a.x.scalar_type(), a.x.const_data_ptr(), a.rows, a.n, top_n, temperature, a.token_ids.const_data_ptr<int64_t>(),
        a.token_values.defined() ? a.token_values.const_data_ptr() : nullptr, a.log_probs.mutable_data_ptr(),
        a.rank.mutable_data_ptr<int64_t>(), a.top_ids.mutable_data_ptr<int64_t>(), a.top_log_probs.mutable_data_ptr(),
        a.max.mutable_data_ptr(), a.sumexp.mutable_data_ptr(), a.entropy.mutable_data_ptr()});
  }
  return {a.log_probs, a.rank, a.top_ids, a.top_log_probs, a.max, a.sumexp, a.entropy};
}

}  // namespace online_softmax::cpu
