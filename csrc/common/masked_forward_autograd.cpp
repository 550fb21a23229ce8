// Autograd of masked_forward: y = softmax (or log_softmax) of v = x * scale (+ an additive mask),
// masked positions out. The gradient needs only y (masked positions have probability 0), through
// the backward op; an additive mask that requires grad gets dv summed to its broadcast shape.
// Under log, masked positions are a constant -inf: their incoming gradient is dropped, and their
// tangent is 0, so that forward and reverse mode are the two products of one Jacobian.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "common/autograd_node.h"
#include "common/op_calls.h"
#include "common/reuse_gradient.h"

namespace online_softmax {
namespace {

using torch::autograd::variable_list;

// packed: y, then dim, log, scale, x's dtype, the mask's shape and dtype (an empty shape and -1
// when the mask takes no gradient).
variable_list masked_forward_derivative_reusing(variable_list& grads, const std::vector<c10::IValue>& packed);

variable_list masked_forward_derivative(const variable_list& grads, const std::vector<c10::IValue>& packed) {
  variable_list own = grads;  // a second reference: never written over
  return masked_forward_derivative_reusing(own, packed);
}

// Where the engine hands the gradient over, the backward is written over it (or over the copy
// that masked_fill makes for log_softmax) where the node owns it.
variable_list masked_forward_derivative_reusing(variable_list& grads, const std::vector<c10::IValue>& packed) {
  const at::Tensor y = packed[0].toTensor();
  const int64_t dim = packed[1].toInt();
  const bool log = packed[2].toBool();
  const double scale = packed[3].toDouble();
  const auto x_dtype = static_cast<at::ScalarType>(packed[4].toInt());
  const std::vector<int64_t> mask_shape = packed[5].toIntVector();
  const int64_t mask_dtype = packed[6].toInt();
  at::Tensor g = std::move(grads[0]);
  if (log) g = g.masked_fill(y.eq(-std::numeric_limits<double>::infinity()), 0);
  const bool mask_grad = mask_dtype >= 0;
  // dx = scale * dv: the backward op with temperature 1 / scale where that is a temperature the
  // op takes (and x's dtype as the gradient's), else dv times scale.
  if (!mask_grad && scale > 1e-30 && scale < 1e30) {
    return {softmax_gradient(std::move(g), y, dim, log, 1.0 / scale, x_dtype), at::Tensor()};
  }
  const at::Tensor dv = call_backward(g, y, dim, log, 1.0, std::nullopt);
  at::Tensor dmask;
  if (mask_grad) dmask = dv.sum_to_size(mask_shape).to(static_cast<at::ScalarType>(mask_dtype));
  return {(dv * scale).to(x_dtype), dmask};
}

// The tangent of y for the tangent tv of v: J tv, J symmetric for softmax (the backward op
// applied to tv); for log_softmax tv - sum(e^y tv), 0 where y is a masked -inf.
at::Tensor masked_forward_tangent(const at::Tensor& tv, const at::Tensor& y, int64_t dim, bool log) {
  if (!log) return call_backward(tv.to(y.scalar_type()), y, dim, false, 1.0, y.scalar_type());
  const at::ScalarType acc = acc_type(y.scalar_type());
  const at::Tensor ya = y.to(acc), ta = tv.to(acc);
  const int64_t d = y.dim() == 0 ? 0 : c10::maybe_wrap_dim(dim, y.dim());
  const at::Tensor t = ta - (ta * ya.exp()).sum(d, /*keepdim=*/true);
  return t.masked_fill(ya.eq(-std::numeric_limits<double>::infinity()), 0).to(y.scalar_type());
}

at::Tensor masked_forward_autograd(const at::Tensor& x, const std::optional<at::Tensor>& mask, bool causal,
                                   c10::SymInt causal_offset, bool log, double scale, int64_t dim,
                                   std::optional<at::ScalarType> dtype) {
  const at::Tensor m = mask.has_value() ? *mask : at::Tensor();
  const bool tangent = has_tangent({&x, &m});
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    y = call_masked_forward(x, mask, causal, std::move(causal_offset), log, scale, dim, dtype);
  }
  c10::intrusive_ptr<OpNode> node;
  if (records({&x, &m})) {
    const bool mask_grad = m.defined() && m.requires_grad();
    node = c10::make_intrusive<OpNode>("OnlineSoftmaxMaskedForwardBackward", masked_forward_derivative,
                                       masked_forward_derivative_reusing);
    node->set_next_edges(torch::autograd::collect_next_edges(x, m));
    node->args = {dim, log, scale, static_cast<int64_t>(x.scalar_type()),
                  mask_grad ? m.sizes().vec() : std::vector<int64_t>{},
                  mask_grad ? static_cast<int64_t>(m.scalar_type()) : int64_t{-1}};
    torch::autograd::set_history(y, node);
  }
  if (tangent) {
    const at::Tensor tx = tangent_of(x);
    const at::Tensor tm = m.defined() && m.is_floating_point() ? tangent_of(m) : at::Tensor();
    at::Tensor tv = tx.defined() ? tx * scale : at::zeros_like(y);
    if (tm.defined()) tv = tv + tm;
    set_tangent(y, masked_forward_tangent(tv, y, dim, log));
  }
  if (node) node->save(y, /*is_output=*/true);
  return y;
}

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, Autograd, m) {
  m.impl("masked_forward", &online_softmax::masked_forward_autograd);
}
