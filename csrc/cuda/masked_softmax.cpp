// CUDA masked_forward binding: checks and the mask's broadcast strides (common/masked_forward_args.h,
// shared with the CPU), device guard, current stream, dtype dispatch, then one call into
// csrc/kernels/masked_softmax.cu.
#include <ATen/Dispatch.h>

#include "common/masked_forward_args.h"
#include "cuda/binding.h"
#include "cuda/kernels.h"

namespace online_softmax::cuda {

at::Tensor masked_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& mask, bool causal,
                          int64_t causal_offset, bool log, double scale, int64_t dim,
                          std::optional<at::ScalarType> dtype) {
  const MaskedForwardArgs a = masked_forward_args(x_in, mask, causal, dim, scale, dtype);
  const at::Tensor& x = a.x;
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(a.out_dtype));
  if (x.numel() > 0) {
    const int64_t n = x.dim() == 0 ? 1 : x.size(-1);
    kernels::MaskLayout layout;
    if (a.mask.defined()) {
      const MaskRows rows = mask_rows(x, a.mask);
      TORCH_CHECK_VALUE(static_cast<int>(rows.sizes.size()) <= kernels::kMaxMaskDims,
                        "online_softmax.masked_forward: the CUDA kernel addresses a mask over at most ",
                        kernels::kMaxMaskDims, " dims of rows, got ", rows.sizes.size(), " (x of shape ", x_in.sizes(),
                        ", mask of shape ", mask->sizes(), ")");
      layout.kind = a.mask.scalar_type() == at::kBool ? 1 : 2;
      layout.mask = a.mask.const_data_ptr();
      layout.dims = static_cast<int>(rows.sizes.size());
      for (int k = 0; k < layout.dims; ++k) {
        layout.sizes[k] = rows.sizes[k];
        layout.strides[k] = rows.strides[k];
      }
      layout.col_stride = rows.col_stride;
    }
    layout.causal_rows = a.causal_rows;
    layout.causal_offset = causal_offset;
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const kernels::DeviceLimits limits = device_limits(x);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "online_softmax.masked_forward", [&] {
      using T = cuda_t<scalar_t>;
      if (a.out_dtype == x.scalar_type()) {
        check_launch(kernels::masked_softmax_forward<T, T>(cptr<scalar_t>(x), mptr<scalar_t>(y), x.numel() / n, n,
                                                           scale, log, layout, limits, stream),
                     "masked_forward");
      } else if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
        check_launch(kernels::masked_softmax_forward<T, float>(cptr<scalar_t>(x), y.mutable_data_ptr<float>(),
                                                               x.numel() / n, n, scale, log, layout, limits, stream),
                     "masked_forward");
      }
    });
  }
  return x_in.dim() == 0 ? y : y.movedim(-1, a.dim).contiguous();
}

}  // namespace online_softmax::cuda
