// The backward op on the CPU: checks, output allocation, then the kernel of the capability in use
// (csrc/cpu/kernels/softmax_backward.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/op_args.h"
#include "cpu/dispatch.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log,
                    double temperature, std::optional<at::ScalarType> input_dtype) {
  const BackwardArgs a = backward_args(grad_out, out, dim, temperature, input_dtype);
  const at::ScalarType y_dtype = a.y.scalar_type();
  at::Tensor dx = empty_output(a.y.sizes(), a.y.options().dtype(a.dx_dtype));
  if (a.y.numel() > 0) {
    kernels().backward(BackwardCall{y_dtype, a.dx_dtype, a.dy.const_data_ptr(), a.y.const_data_ptr(),
                                    dx.mutable_data_ptr(), row_layout(a.y, a.dim), temperature, log});
  }
  return a.dx_dtype == a.x_dtype ? dx : dx.to(a.x_dtype);
}

}  // namespace online_softmax::cpu
