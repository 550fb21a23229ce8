// CUDA backward binding: checks, device guard, current stream, dtype dispatch, then one call into
// csrc/kernels/softmax_backward.cu.
#include <ATen/Dispatch.h>

#include "common/op_args.h"
#include "cuda/binding.h"
#include "cuda/kernels.h"

namespace online_softmax::cuda {

at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log,
                    double temperature, std::optional<at::ScalarType> input_dtype) {
  const BackwardArgs a = backward_args(grad_out, out, dim, temperature, input_dtype);
  const at::ScalarType y_dtype = a.y.scalar_type();
  at::Tensor dx = at::empty(a.y.sizes(), a.y.options().dtype(a.dx_dtype));
  if (a.y.numel() > 0) {
    const c10::cuda::CUDAGuard guard(a.y.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const kernels::DeviceLimits limits = device_limits(a.y);
    const RowLayout layout = row_layout(a.y, a.dim);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_dtype, "online_softmax.backward", [&] {
      using Y = cuda_t<scalar_t>;
      at::Tensor ws = workspace(kernels::backward_workspace_bytes<Y>(layout, limits), a.y);
      const double scale = 1.0 / temperature;
      cudaError_t err = cudaErrorInvalidValue;
      if (a.dx_dtype == y_dtype) {
        err = kernels::softmax_backward<Y, Y>(cptr<scalar_t>(a.dy), cptr<scalar_t>(a.y), mptr<scalar_t>(dx),
                                              layout, scale, log, workspace_ptr(ws), limits, stream);
      } else if constexpr (std::is_same_v<scalar_t, float>) {  // float32 y, float16/bfloat16 x
        if (a.dx_dtype == at::kHalf) {
          err = kernels::softmax_backward<float, __half>(cptr<float>(a.dy), cptr<float>(a.y), mptr<at::Half>(dx),
                                                         layout, scale, log, workspace_ptr(ws), limits, stream);
        } else {
          err = kernels::softmax_backward<float, __nv_bfloat16>(cptr<float>(a.dy), cptr<float>(a.y),
                                                                mptr<at::BFloat16>(dx), layout, scale, log,
                                                                workspace_ptr(ws), limits, stream);
        }
      }
      check_launch(err, "backward");
    });
  }
  return a.dx_dtype == a.x_dtype ? dx : dx.to(a.x_dtype);
}

// The kernels take __restrict__ pointers (dx may not alias dy), and the autograd nodes write in
// place only on the CPU: here the op is backward's result copied over grad_out.
void backward_(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log, double temperature) {
  const int64_t d = inplace_backward_args(grad_out, out, dim, temperature);
  if (out.numel() == 0) return;
  grad_out.copy_(backward(grad_out, out, d, log, temperature, std::nullopt));
}

}  // namespace online_softmax::cuda
