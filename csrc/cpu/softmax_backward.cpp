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

// Every kernel path reads an element of dy before it writes that element of dx, and reduces a
// whole row (split rows: every piece) before writing any of it, so dx may be dy.
void backward_(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log, double temperature) {
  const int64_t d = inplace_backward_args(grad_out, out, dim, temperature);
  if (out.numel() == 0) return;
  const at::ScalarType dtype = out.scalar_type();
  kernels().backward(BackwardCall{dtype, dtype, grad_out.const_data_ptr(), out.const_data_ptr(),
                                  grad_out.mutable_data_ptr(), row_layout(out, d), temperature, log});
}

}  // namespace online_softmax::cpu
