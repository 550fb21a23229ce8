// masked_forward for every backend without a kernel of its own (CompositeExplicitAutograd; the CPU
// has one, csrc/cpu/masked_softmax.cpp). It materializes the masked scores and a mask of x's size,
// the unfused sequence the kernels replace, so it is correct everywhere but not fast.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "common/masked_forward_args.h"

namespace online_softmax {
namespace {

at::Tensor masked_forward_composite(const at::Tensor& x_in, const std::optional<at::Tensor>& mask, bool causal,
                                    int64_t causal_offset, bool log, double scale, int64_t dim,
                                    std::optional<at::ScalarType> dtype) {
  const MaskedForwardArgs a = masked_forward_args(x_in, mask, causal, dim, scale, dtype);
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor v = a.x.to(state_dtype(a.x.scalar_type())) * scale;
  at::Tensor keep = at::ones_like(v, v.options().dtype(at::kBool));
  if (a.mask.defined()) {
    if (a.mask.scalar_type() == at::kBool) {
      keep = keep & a.mask;
    } else {
      keep = keep & a.mask.ne(-inf);
      v = v + a.mask;
    }
  }
  if (causal && v.dim() >= 2) {
    const int64_t queries = v.size(-2), keys = v.size(-1);
    const at::Tensor i = at::arange(queries, v.options().dtype(at::kLong)).unsqueeze(1);
    const at::Tensor j = at::arange(keys, v.options().dtype(at::kLong)).unsqueeze(0);
    keep = keep & j.le(i + causal_offset);
  }
  v = v.masked_fill(keep.logical_not(), -inf);
  at::Tensor y = v.dim() == 0 ? (log ? at::zeros_like(v) : at::ones_like(v)) : (log ? at::log_softmax(v, -1) : at::softmax(v, -1));
  y = at::where(keep, y, at::scalar_tensor(log ? -inf : 0.0, y.options()));
  y = y.to(a.out_dtype);
  return x_in.dim() == 0 ? y : y.movedim(-1, a.dim).contiguous();
}

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, CompositeExplicitAutograd, m) {
  m.impl("masked_forward", &online_softmax::masked_forward_composite);
}
