// The forward and stats ops on the CPU: checks, output allocation, then the kernel of the
// capability in use (csrc/cpu/kernels/softmax.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/op_args.h"
#include "cpu/dispatch.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

at::Tensor forward(const at::Tensor& x_in, int64_t dim, bool log, double temperature,
                   std::optional<at::ScalarType> dtype) {
  const ForwardArgs a = forward_args(x_in, dim, temperature, dtype);
  const at::Tensor& x = a.x;
  at::Tensor y = empty_output(x.sizes(), x.options().dtype(a.out_dtype));
  if (x.numel() == 0) return y;
  kernels().forward(ForwardCall{x.scalar_type(), a.out_dtype, x.const_data_ptr(), y.mutable_data_ptr(),
                                row_layout(x, a.dim), temperature, log});
  return y;
}

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& x_in, int64_t dim, double temperature) {
  const StatsArgs a = stats_args(x_in, dim, temperature);
  at::Tensor m = at::empty(a.shape, a.options);
  at::Tensor d = at::empty(a.shape, a.options);
  if (stats_without_kernel(m, d, a.x)) return {m, d};
  kernels().stats(StatsCall{a.x.scalar_type(), a.x.const_data_ptr(), m.mutable_data_ptr(), d.mutable_data_ptr(),
                            row_layout(a.x, a.dim), temperature});
  return {m, d};
}

}  // namespace online_softmax::cpu
