// CUDA cross_entropy_backward (and its in-place form) binding: checks (common/op_args.h, shared with the CPU), device
// guard, current stream, dtype dispatch, then one call into csrc/kernels/cross_entropy.cu.
#include <ATen/Dispatch.h>

#include "common/op_args.h"
#include "cuda/binding.h"
#include "cuda/kernels.h"

namespace online_softmax::cuda {

namespace {

// Launches the kernel from a.x into out (which may be a.x itself: every element is read before
// it is written).
void run_kernel(const CrossEntropyBackwardArgs& a, void* out) {
  if (a.rows == 0 || a.n == 0) return;
  const c10::cuda::CUDAGuard guard(a.x.device());
  // A target outside [0, classes) is skipped by the kernel and flagged on the device; the check is
  // an asynchronous device-side assert, as torch's nll_loss, so the op never waits for the GPU and
  // can be captured in a CUDA graph.
  at::Tensor error = at::zeros({1}, a.x.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(a.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "online_softmax.cross_entropy_backward", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    auto optional_ptr = [](const std::optional<at::Tensor>& t) {
      return t.has_value() ? t->const_data_ptr<A>() : nullptr;
    };
    check_launch(kernels::cross_entropy_backward<T>(cptr<scalar_t>(a.x), a.max.const_data_ptr<A>(),
                                                    a.sumexp.const_data_ptr<A>(), a.target.const_data_ptr<int64_t>(),
                                                    a.p_scale.const_data_ptr<A>(),
                                                    a.target_scale.const_data_ptr<A>(), optional_ptr(a.smooth_scale),
                                                    optional_ptr(a.weight), static_cast<T*>(out), a.rows, a.n,
                                                    error.mutable_data_ptr<int>(), limits, stream),
                 "cross_entropy_backward");
  });
  at::_assert_async(error.eq(0), "online_softmax.cross_entropy_backward: target must lie in [0, classes)");
}

}  // namespace

at::Tensor cross_entropy_backward(const at::Tensor& x, const at::Tensor& max, const at::Tensor& sumexp,
                                  const at::Tensor& target,
                                  const at::Tensor& p_scale, const at::Tensor& target_scale,
                                  const std::optional<at::Tensor>& smooth_scale,
                                  const std::optional<at::Tensor>& weight) {
  const CrossEntropyBackwardArgs a =
      cross_entropy_backward_args(x, max, sumexp, target, p_scale, target_scale, smooth_scale, weight);
  at::Tensor out = at::empty(a.x.sizes(), a.x.options());
  run_kernel(a, out.mutable_data_ptr());
  return out;
}

void cross_entropy_backward_(const at::Tensor& x, const at::Tensor& max, const at::Tensor& sumexp,
                             const at::Tensor& target,
                             const at::Tensor& p_scale, const at::Tensor& target_scale,
                             const std::optional<at::Tensor>& smooth_scale, const std::optional<at::Tensor>& weight) {
  const CrossEntropyBackwardArgs a =
      cross_entropy_backward_args(x, max, sumexp, target, p_scale, target_scale, smooth_scale, weight,
                                  /*in_place=*/true);
  run_kernel(a, x.mutable_data_ptr());
}

}  // namespace online_softmax::cuda
