// CUDA fused top-k bindings: checks, device guard, current stream, dtype dispatch, then one call
// into csrc/kernels/softmax_topk.cu, or, for k beyond the fused kernel's buffer (topk_max_k: 1024
// to 2048), into the sort-based composite of csrc/common.
#include <ATen/Dispatch.h>

#include "common/op_args.h"
#include "common/softmax_topk_by_sort.h"
#include "cuda/binding.h"
#include "cuda/kernels.h"

namespace online_softmax::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_topk(
    const at::Tensor& x_in, int64_t k, int64_t dim, bool log, double temperature) {
  TopKArgs a = topk_args(x_in, k, dim, temperature);
  if (a.rows == 0) return topk_results(a, x_in);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(a.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "online_softmax.softmax_topk", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    if (k > kernels::topk_max_k<T>()) {
      softmax_topk_by_sort(a, k, log, temperature);
      return;
    }
    at::Tensor ws = workspace(kernels::topk_workspace_bytes<T>(a.rows, a.n, k, limits), a.x);
    check_launch(kernels::softmax_topk<T>(cptr<scalar_t>(a.x), mptr<scalar_t>(a.values),
                                          a.indices.mutable_data_ptr<int64_t>(), a.max.mutable_data_ptr<A>(),
                                          a.sumexp.mutable_data_ptr<A>(), a.rows, a.n, k, 1.0 / temperature, log,
                                          workspace_ptr(ws), limits, stream),
                 "softmax_topk");
  });
  return topk_results(a, x_in);
}

at::Tensor softmax_topk_backward(const at::Tensor& grad_values, const at::Tensor& x_in,
                                 const at::Tensor& indices_in, const at::Tensor& max,
                                 const at::Tensor& sumexp, int64_t dim, bool log, double temperature) {
  const TopKBackwardArgs a = topk_backward_args(grad_values, x_in, indices_in, max, sumexp, dim, temperature);
  at::Tensor dx = at::empty(a.x.sizes(), a.x.options());
  if (a.rows > 0 && a.k > 0) {
    const c10::cuda::CUDAGuard guard(a.x.device());
    // The kernel sums repeated indices as runs: sort each row's indices, carrying the gradients.
    const auto sorted = at::sort(a.idx, /*stable=*/true, /*dim=*/-1, /*descending=*/false);
    const at::Tensor idx = std::get<0>(sorted).contiguous();
    const at::Tensor g = a.g.gather(-1, std::get<1>(sorted)).contiguous();
    // A bad index is skipped by the kernel and flagged on the device; the check is an asynchronous
    // device-side assert, as torch.gather's, so the op never waits for the GPU and can be captured
    // in a CUDA graph.
    at::Tensor error = at::zeros({1}, a.x.options().dtype(at::kInt));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const kernels::DeviceLimits limits = device_limits(a.x);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "online_softmax.softmax_topk_backward", [&] {
      using T = cuda_t<scalar_t>;
      using A = typename kernels::AccOf<T>::type;
      check_launch(kernels::softmax_topk_backward<T>(cptr<scalar_t>(g), cptr<scalar_t>(a.x),
                                                     idx.const_data_ptr<int64_t>(), a.max.const_data_ptr<A>(),
                                                     a.sumexp.const_data_ptr<A>(), mptr<scalar_t>(dx), a.rows,
                                                     a.n, a.k, 1.0 / temperature, log,
                                                     error.mutable_data_ptr<int>(), limits, stream),
                   "softmax_topk_backward");
    });
    at::_assert_async(error.eq(0), "online_softmax.softmax_topk_backward: indices must lie in [0, n) along dim");
  } else if (a.rows > 0) {
    dx.zero_();
  }
  return topk_backward_result(dx, x_in, a.dim);
}

}  // namespace online_softmax::cuda
