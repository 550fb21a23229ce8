// The sample_categorical and top_p_threshold ops on the CPU: checks and outputs (common/op_args.h), then the kernel of the
// capability in use (csrc/cpu/kernels/sample.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/op_args.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

std::tuple<at::Tensor, at::Tensor> sample_categorical(const at::Tensor& x, const at::Tensor& temperature,
                                                      const std::optional<at::Tensor>& min_log_ratio,
                                                      const at::Tensor& uniforms,
                                                      const std::optional<at::Tensor>& edit_ids,
                                                      const std::optional<at::Tensor>& edit_values) {
  SampleArgs a = sample_args(x, temperature, min_log_ratio, uniforms, edit_ids, edit_values);
  if (a.rows > 0 && a.num_samples > 0) {
    kernels().sample_categorical(SampleCall{a.x.scalar_type(), a.x.const_data_ptr(), a.rows, a.n, a.num_samples,
                                            a.temperature.const_data_ptr<double>(),
                                            a.min_log_ratio.defined() ? a.min_log_ratio.const_data_ptr<double>() : nullptr,
                                            a.uniforms.const_data_ptr<double>(), a.tokens.mutable_data_ptr<int64_t>(),
                                            a.log_probs.mutable_data_ptr(), a.edit_ids_data(), a.edit_values_data(),
                                            a.num_edits});
  }
  return {a.tokens, a.log_probs};
}

std::tuple<at::Tensor, at::Tensor> top_p_threshold(const at::Tensor& x, const at::Tensor& temperature,
                                                   const at::Tensor& top_p,
                                                   const std::optional<at::Tensor>& edit_ids,
                                                   const std::optional<at::Tensor>& edit_values) {
  TopPArgs a = top_p_args(x, temperature, top_p, edit_ids, edit_values);
  if (a.rows > 0) {
    kernels().top_p_threshold(TopPCall{a.x.scalar_type(), a.x.const_data_ptr(), a.rows, a.n,
                                       a.temperature.const_data_ptr<double>(), a.top_p.const_data_ptr<double>(),
                                       a.log_ratio.mutable_data_ptr<double>(), a.status.mutable_data_ptr<int64_t>(),
                                       a.edit_ids_data(), a.edit_values_data(), a.num_edits});
  }
  return {a.log_ratio, a.status};
}

}  // namespace online_softmax::cpu
