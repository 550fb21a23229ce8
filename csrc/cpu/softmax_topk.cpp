// The fused softmax + top-k op and its backward on the CPU: checks, outputs, then the kernel of
// the capability in use (csrc/cpu/kernels/softmax_topk.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/op_args.h"
#include "cpu/dispatch.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_topk(
    const at::Tensor& x_in, int64_t k, int64_t dim, bool log, double temperature) {
  TopKArgs a = topk_args(x_in, k, dim, temperature);
  if (a.rows > 0) {
    kernels().softmax_topk(TopKCall{a.x.scalar_type(), a.x.const_data_ptr(), a.rows, a.n, k, temperature, log,
                                    a.values.mutable_data_ptr(), a.indices.mutable_data_ptr<int64_t>(),
                                    a.max.mutable_data_ptr(), a.sumexp.mutable_data_ptr()});
  }
  return topk_results(a, x_in);
}

at::Tensor softmax_topk_backward(const at::Tensor& grad_values, const at::Tensor& x_in,
                                 const at::Tensor& indices_in, const at::Tensor& max,
                                 const at::Tensor& sumexp, int64_t dim, bool log, double temperature) {
  const TopKBackwardArgs a = topk_backward_args(grad_values, x_in, indices_in, max, sumexp, dim, temperature);
  at::Tensor dx = empty_output(a.x.sizes(), a.x.options());
  if (a.rows > 0) {
    kernels().softmax_topk_backward(TopKBackwardCall{a.x.scalar_type(), a.g.const_data_ptr(), a.x.const_data_ptr(),
                                                     a.idx.const_data_ptr<int64_t>(), a.max.const_data_ptr(),
                                                     a.sumexp.const_data_ptr(), dx.mutable_data_ptr(), a.rows, a.n,
                                                     a.k, temperature, log});
  }
  return topk_backward_result(dx, x_in, a.dim);
}

}  // namespace online_softmax::cpu
