// CUDA sampling bindings: checks (common/op_args.h, shared with the CPU), device guard, current
// stream, dtype dispatch, then one call into csrc/kernels/sample.cu.
#include <ATen/Dispatch.h>

#include "common/op_args.h"
#include "cuda/binding.h"
#include "cuda/kernels.h"

namespace online_softmax::cuda {

std::tuple<at::Tensor, at::Tensor> sample_categorical(const at::Tensor& x, const at::Tensor& temperature,
                                                      const std::optional<at::Tensor>& min_log_ratio,
                                                      const at::Tensor& uniforms,
                                                      const std::optional<at::Tensor>& edit_ids,
                                                      const std::optional<at::Tensor>& edit_values) {
  SampleArgs a = sample_args(x, temperature, min_log_ratio, uniforms, edit_ids, edit_values);
  if (a.rows == 0 || a.num_samples == 0) return {a.tokens, a.log_probs};
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(a.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "online_softmax.sample_categorical", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    at::Tensor ws = workspace(kernels::sample_workspace_bytes<T>(a.rows, a.n), a.x);
    check_launch(kernels::sample_categorical<T>(
                     cptr<scalar_t>(a.x), a.rows, a.n, a.temperature.const_data_ptr<double>(),
                     a.min_log_ratio.defined() ? a.min_log_ratio.const_data_ptr<double>() : nullptr,
                     a.uniforms.const_data_ptr<double>(), a.num_samples, a.tokens.mutable_data_ptr<int64_t>(),
                     a.log_probs.mutable_data_ptr<A>(), workspace_ptr(ws), limits, stream, a.edit_ids_data(),
                     static_cast<const A*>(a.edit_values_data()), a.num_edits),
                 "sample_categorical");
  });
  return {a.tokens, a.log_probs};
}

std::tuple<at::Tensor, at::Tensor> top_p_threshold(const at::Tensor& x, const at::Tensor& temperature,
                                                   const at::Tensor& top_p,
                                                   const std::optional<at::Tensor>& edit_ids,
                                                   const std::optional<at::Tensor>& edit_values) {
  TopPArgs a = top_p_args(x, temperature, top_p, edit_ids, edit_values);
  if (a.rows == 0) return {a.log_ratio, a.status};
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(a.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "online_softmax.top_p_threshold", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    check_launch(kernels::top_p_threshold<T>(cptr<scalar_t>(a.x), a.rows, a.n, a.temperature.const_data_ptr<double>(),
                                             a.top_p.const_data_ptr<double>(), a.log_ratio.mutable_data_ptr<double>(),
                                             a.status.mutable_data_ptr<int64_t>(), limits, stream, a.edit_ids_data(),
                                             static_cast<const A*>(a.edit_values_data()), a.num_edits),
                 "top_p_threshold");
  });
  return {a.log_ratio, a.status};
}

}  // namespace online_softmax::cuda
