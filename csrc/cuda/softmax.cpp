// CUDA forward and stats bindings: checks, device guard, current stream, dtype dispatch, then one
// call into csrc/kernels/softmax_forward.cu.
#include <ATen/Dispatch.h>

#include <limits>

#include "common/op_args.h"
#include "cuda/binding.h"
#include "cuda/kernels.h"

namespace online_softmax::cuda {

at::Tensor forward(const at::Tensor& x_in, int64_t dim, bool log, double temperature,
                   std::optional<at::ScalarType> dtype) {
  const ForwardArgs a = forward_args(x_in, dim, temperature, dtype);
  const at::Tensor& x = a.x;
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(a.out_dtype));
  if (x.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(x);
  const RowLayout layout = row_layout(x, a.dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "online_softmax.forward", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    at::Tensor ws = workspace(kernels::forward_workspace_bytes<T>(layout, limits), x);
    cudaError_t err;
    if (a.out_dtype == x.scalar_type()) {
      err = kernels::softmax_forward<T, T>(cptr<scalar_t>(x), mptr<scalar_t>(y), static_cast<A*>(nullptr),
                                           static_cast<A*>(nullptr), layout, 1.0 / temperature, log,
                                           workspace_ptr(ws), limits, stream);
    } else if constexpr (!std::is_same_v<A, T>) {  // float16/bfloat16 read into float32
      err = kernels::softmax_forward<T, float>(cptr<scalar_t>(x), y.mutable_data_ptr<float>(),
                                               static_cast<A*>(nullptr), static_cast<A*>(nullptr), layout,
                                               1.0 / temperature, log, workspace_ptr(ws), limits, stream);
    } else {
      err = cudaErrorInvalidValue;
    }
    check_launch(err, "forward");
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& x_in, int64_t dim, double temperature) {
  const StatsArgs a = stats_args(x_in, dim, temperature);
  at::Tensor m = at::empty(a.shape, a.options);
  at::Tensor d = at::empty(a.shape, a.options);
  if (stats_without_kernel(m, d, a.x)) return {m, d};
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(a.x);
  const RowLayout layout = row_layout(a.x, a.dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "online_softmax.stats", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    at::Tensor ws = workspace(kernels::forward_workspace_bytes<T>(layout, limits), a.x);
    check_launch(kernels::softmax_forward<T, T>(cptr<scalar_t>(a.x), static_cast<T*>(nullptr),
                                                m.mutable_data_ptr<A>(), d.mutable_data_ptr<A>(), layout,
                                                1.0 / temperature, false, workspace_ptr(ws), limits, stream),
                 "stats");
  });
  return {m, d};
}

}  // namespace online_softmax::cuda
