// The masked_forward op on the CPU: checks and the mask's broadcast strides (csrc/common/
// masked_forward_args.h), the output, then the kernel of the capability in use
// (csrc/cpu/kernels/masked_softmax.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/masked_forward_args.h"
#include "cpu/dispatch.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

at::Tensor masked_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& mask, bool causal,
                          int64_t causal_offset, bool log, double scale, int64_t dim,
                          std::optional<at::ScalarType> dtype) {
  const MaskedForwardArgs a = masked_forward_args(x_in, mask, causal, dim, scale, dtype);
  const at::Tensor& x = a.x;
  at::Tensor y = empty_output(x.sizes(), x.options().dtype(a.out_dtype));
  if (x.numel() > 0) {
    const int64_t n = x.dim() == 0 ? 1 : x.size(-1);
    MaskedForwardCall c{x.scalar_type(), a.out_dtype, x.const_data_ptr(), y.mutable_data_ptr(), x.numel() / n, n,
                        scale, log};
    MaskRows rows;
    if (a.mask.defined()) {
      c.mask_kind = a.mask.scalar_type() == at::kBool ? 1 : 2;
      c.mask = a.mask.const_data_ptr();
      rows = mask_rows(x, a.mask);
      c.row_sizes = rows.sizes.data();
      c.row_strides = rows.strides.data();
      c.row_dims = static_cast<int64_t>(rows.sizes.size());
      c.col_stride = rows.col_stride;
    }
    c.causal_rows = a.causal_rows;
    c.causal_offset = causal_offset;
    kernels().masked_forward(c);
  }
  return x_in.dim() == 0 ? y : y.movedim(-1, a.dim).contiguous();
}

}  // namespace online_softmax::cpu
