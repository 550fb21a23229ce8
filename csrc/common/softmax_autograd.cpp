// Autograd of the forward and backward ops (TORCH_LIBRARY_IMPL(online_softmax, Autograd)): they are
// the library's most frequent calls, and the Python layer of torch.library.register_autograd cost
// more than the whole op on small tensors (a 4 x 8 softmax with requires_grad took about 2.7x
// torch.softmax's time) and tens of microseconds on large ones (the backward of 64 x 32768:
// 20-40 us, Python's garbage collector included).
//
// Both record the hand-made node of csrc/common/autograd_node.h, as ATen's generated
// SoftmaxBackward0 is: torch::autograd::Function::apply builds a context with a string-keyed map and
// wraps outputs for every case a custom function may have, about 0.8 us of a 4 x 8 call.
// forward's derivative is the backward op, called through the dispatcher, so torch.compile traces
// the same two ops as before; the backward op's own derivatives (second derivatives of a softmax)
// are written in ATen ops, which are differentiable in turn.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/core/WrapDimMinimal.h>

#include <optional>
#include <utility>
#include <vector>

#include "common/autograd_node.h"
#include "common/op_calls.h"
#include "common/reuse_gradient.h"

namespace online_softmax {
namespace {

using torch::autograd::variable_list;

// The op's arguments besides its tensors, as its derivatives need them.
struct Args {
  int64_t dim;
  bool log;
  double temperature;
  at::ScalarType input_dtype;  // forward: x's dtype (the gradient's); backward: its own argument
};

std::vector<c10::IValue> packed_args(const Args& a) {
  return {a.dim, a.log, a.temperature, static_cast<int64_t>(a.input_dtype)};
}

Args unpacked_args(const std::vector<c10::IValue>& packed, size_t first) {
  return {packed[first].toInt(), packed[first + 1].toBool(), packed[first + 2].toDouble(),
          static_cast<at::ScalarType>(packed[first + 3].toInt())};
}

// dx of forward for an incoming gradient g: the backward op.
at::Tensor forward_gradient(const at::Tensor& g, const at::Tensor& out, const Args& a) {
  return call_backward(g, out, a.dim, a.log, a.temperature, a.input_dtype);
}

// Softmax rows in the accumulation dtype, a 0-d tensor as one row of one element: what the
// ATen-op derivatives below work on.
struct AccRows {
  at::ScalarType acc;
  bool scalar;
  int64_t dim;
  at::Tensor operator()(const at::Tensor& t) const {
    const at::Tensor a = t.to(acc);
    return scalar ? a.reshape({1}) : a;
  }
  at::Tensor sum(const at::Tensor& t) const { return t.sum(dim, /*keepdim=*/true); }
  at::Tensor back(const at::Tensor& t, at::ScalarType dtype) const { return (scalar ? t.reshape({}) : t).to(dtype); }
};

AccRows acc_rows(const at::Tensor& out, int64_t dim) {
  const bool scalar = out.dim() == 0;
  return {out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat, scalar,
          scalar ? 0 : c10::maybe_wrap_dim(dim, out.dim())};
}

// The derivatives of the backward op dx(g, y), with s = 1 / temperature:
//   softmax: dx = s y (g - sum(g y))
//   log:     dx = s (g - e^y sum(g))
// Reverse mode, for the gradient h of dx:
//   softmax: dg = s y (h - sum(h y)),  dy = s (h (g - sum(g y)) - g sum(h y))
//   log:     dg = s (h - sum(h e^y)),  dy = -s h e^y sum(g)
std::pair<at::Tensor, at::Tensor> backward_gradients(const at::Tensor& h, const at::Tensor& g, const at::Tensor& y,
                                                     const Args& a) {
  const AccRows rows = acc_rows(y, a.dim);
  const at::Tensor ga = rows(g), ya = rows(y), ha = rows(h);
  const double s = 1.0 / a.temperature;
  at::Tensor dg, dy;
  if (a.log) {
    const at::Tensor e = ya.exp();
    dg = (ha - rows.sum(ha * e)) * s;
    dy = ha * e * rows.sum(ga) * (-s);
  } else {
    const at::Tensor hy = rows.sum(ha * ya);
    dg = ya * (ha - hy) * s;
    dy = (ha * (ga - rows.sum(ga * ya)) - ga * hy) * s;
  }
  return {rows.back(dg, g.scalar_type()), rows.back(dy, y.scalar_type())};
}

// Forward mode, for tangents tg of g and ty of y (an undefined one is zero):
//   softmax: s (ty (g - sum(g y)) + y (tg - sum(tg y + g ty)))
//   log:     s (tg - e^y (ty sum(g) + sum(tg)))
at::Tensor backward_tangent(const at::Tensor& tg, const at::Tensor& ty, const at::Tensor& g, const at::Tensor& y,
                            const Args& a, at::ScalarType dx_dtype) {
  const AccRows rows = acc_rows(y, a.dim);
  const at::Tensor ga = rows(g), ya = rows(y);
  const at::Tensor tga = tg.defined() ? rows(tg) : at::zeros_like(ga);
  const at::Tensor tya = ty.defined() ? rows(ty) : at::zeros_like(ya);
  const at::Tensor t = a.log ? tga - ya.exp() * (tya * rows.sum(ga) + rows.sum(tga))
                             : tya * (ga - rows.sum(ga * ya)) + ya * (tga - rows.sum(tga * ya + ga * tya));
  return rows.back(t * (1.0 / a.temperature), dx_dtype);
}

// The tangent of y = softmax(s x) for a tangent t of x: J t with J = s (diag(y) - y y^T), which is
// symmetric, so it is the backward op applied to t. For log_softmax, J = s (I - 1 e^y^T).
at::Tensor forward_tangent(const at::Tensor& t, const at::Tensor& out, const Args& a) {
  const at::Tensor tt = t.to(out.scalar_type());
  if (!a.log) return call_backward(tt, out, a.dim, false, a.temperature, out.scalar_type());
  const AccRows rows = acc_rows(out, a.dim);
  const at::Tensor ta = rows(tt);
  return rows.back((ta - rows.sum(ta * rows(out).exp())) * (1.0 / a.temperature), out.scalar_type());
}

// The nodes' derivatives: packed holds the saved tensors, then the op's other arguments.
variable_list forward_derivative(const variable_list& grads, const std::vector<c10::IValue>& packed) {
  return {forward_gradient(grads[0], packed[0].toTensor(), unpacked_args(packed, 1))};
}

// forward's derivative where the engine hands the gradient over: written over it where the node
// owns it.
variable_list forward_derivative_reusing(variable_list& grads, const std::vector<c10::IValue>& packed) {
  const Args a = unpacked_args(packed, 1);
  return {softmax_gradient(std::move(grads[0]), packed[0].toTensor(), a.dim, a.log, a.temperature, a.input_dtype)};
}

variable_list backward_derivative(const variable_list& grads, const std::vector<c10::IValue>& packed) {
  auto [dg, dy] = backward_gradients(grads[0], packed[0].toTensor(), packed[1].toTensor(), unpacked_args(packed, 2));
  return {dg, dy};
}

at::Tensor forward_autograd(const at::Tensor& x, int64_t dim, bool log, double temperature,
                            std::optional<at::ScalarType> dtype) {
  const bool tangent = torch::autograd::isFwGradDefined(x);
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = call_forward(x, dim, log, temperature, dtype);
  }
  const Args args{dim, log, temperature, x.scalar_type()};
  c10::intrusive_ptr<OpNode> node;
  if (records({&x})) {
    node = c10::make_intrusive<OpNode>("OnlineSoftmaxForwardBackward", forward_derivative, forward_derivative_reusing);
    node->set_next_edges(torch::autograd::collect_next_edges(x));
    node->args = packed_args(args);
    torch::autograd::set_history(out, node);
  }
  if (tangent) {
    // Computed from the output alone, after it got its history, so that a tangent that requires
    // grad differentiates through it.
    out._set_fw_grad(forward_tangent(x._fw_grad(/*level=*/0), out, args), /*level=*/0, /*is_inplace_op=*/false);
  }
  // Saved last, with its tangent: forward-over-reverse (hessians) differentiates the backward
  // through the saved y.
  if (node) node->save(out, /*is_output=*/true);
  return out;
}

at::Tensor backward_autograd(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log,
                             double temperature, std::optional<at::ScalarType> input_dtype) {
  const bool tangent = torch::autograd::isFwGradDefined(grad_out) || torch::autograd::isFwGradDefined(out);
  at::Tensor dx;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    dx = call_backward(grad_out, out, dim, log, temperature, input_dtype);
  }
  const Args args{dim, log, temperature, input_dtype.value_or(out.scalar_type())};
  if (records({&grad_out, &out})) {
    const auto node = c10::make_intrusive<OpNode>("OnlineSoftmaxBackwardBackward", backward_derivative);
    node->set_next_edges(torch::autograd::collect_next_edges(grad_out, out));
    node->args = packed_args(args);
    node->save(grad_out, /*is_output=*/false);
    node->save(out, /*is_output=*/false);
    torch::autograd::set_history(dx, node);
  }
  if (tangent) {
    // From the primals: a tangent computed from the dual tensors would carry a tangent itself.
    dx._set_fw_grad(backward_tangent(grad_out._fw_grad(/*level=*/0), out._fw_grad(/*level=*/0),
                                     grad_out._fw_primal(/*level=*/0), out._fw_primal(/*level=*/0), args,
                                     dx.scalar_type()),
                    /*level=*/0, /*is_inplace_op=*/false);
  }
  return dx;
}

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, Autograd, m) {
  m.impl("forward", &online_softmax::forward_autograd);
  m.impl("backward", &online_softmax::backward_autograd);
}
