// The sample_categorical op on the CPU: checks and outputs (common/op_args.h), then the kernel of the
// capability in use (csrc/cpu/kernels/sample.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/op_args.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

std::tuple<at::Tensor, at::Tensor> sample_categorical(const at::Tensor& x, const at::Tensor& temperature,
                                                      const std::optional<at::Tensor>& min_p,
                                                      const at::Tensor& uniforms) {
  SampleArgs a = sample_args(x, temperature, min_p, uniforms);
  if (a.rows > 0 && a.num_samples > 0) {
    kernels().sample_categorical(SampleCall{a.x.scalar_type(), a.x.const_data_ptr(), a.rows, a.n, a.num_samples,
                                            a.temperature.const_data_ptr<double>(),
                                            a.min_p.defined() ? a.min_p.const_data_ptr<double>() : nullptr,
                                            a.uniforms.const_data_ptr<double>(), a.tokens.mutable_data_ptr<int64_t>(),
                                            a.log_probs.mutable_data_ptr()});
  }
  return {a.tokens, a.log_probs};
}

}  // namespace online_softmax::cpu
