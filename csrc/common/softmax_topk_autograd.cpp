// Autograd of softmax_topk: the values v_j = p_{i_j} (or log p_{i_j}) of p = softmax(x / t) at the
// selected indices i_j; indices and the row state (max, sumexp) are not differentiable.
//   softmax: dx = (scatter(g v) - p sum(g v)) / t     log: dx = (scatter(g) - p sum(g)) / t
// A first derivative runs the softmax_topk_backward op (one read of x, from the saved state);
// where the gradient itself must be differentiable (create_graph, nested torch.func transforms)
// the same formula is written over the forward op and ATen ops, which are differentiable in turn.
// softmax_topk_backward itself has no derivative and says so when one is asked of it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/autograd_node.h"
#include "common/op_calls.h"

namespace online_softmax {
namespace {

using torch::autograd::variable_list;

// p = softmax(x / t) along dim in the accumulation dtype, and its entries at the indices.
std::tuple<at::Tensor, at::Tensor> selected_probabilities(const at::Tensor& x, const at::Tensor& indices, int64_t dim,
                                                          double t) {
  const at::Tensor p = call_forward(x, dim, false, t, acc_type(x.scalar_type()));
  return {p, p.gather(dim, indices)};
}

// packed: x, indices, max, sumexp, then dim, log, temperature.
variable_list softmax_topk_derivative(const variable_list& grads, const std::vector<c10::IValue>& packed) {
  const at::Tensor x = packed[0].toTensor(), indices = packed[1].toTensor();
  const int64_t dim = packed[4].toInt();
  const bool log = packed[5].toBool();
  const double t = packed[6].toDouble();
  if (!at::GradMode::is_enabled())
    return {call_softmax_topk_backward(grads[0], x, indices, packed[2].toTensor(), packed[3].toTensor(), dim, log,
                                       t)};
  const auto [p, pg] = selected_probabilities(x, indices, dim, t);
  const at::Tensor g = grads[0].to(p.scalar_type());
  const at::Tensor src = log ? g : g * pg;
  const at::Tensor dx = (at::zeros_like(p).scatter_add(dim, indices, src) - p * src.sum(dim, /*keepdim=*/true)) / t;
  return {dx.to(x.scalar_type())};
}

at::Tensor softmax_topk_tangent(const at::Tensor& tx, const at::Tensor& x, const at::Tensor& indices,
                                const at::Tensor& values, int64_t dim, bool log, double t) {
  const auto [p, pg] = selected_probabilities(x, indices, dim, t);
  const at::Tensor ta = tx.to(p.scalar_type());
  const at::Tensor centred = (ta.gather(dim, indices) - (ta * p).sum(dim, /*keepdim=*/true)) / t;
  return (log ? centred : pg * centred).to(values.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_topk_autograd(const at::Tensor& x, int64_t k,
                                                                                int64_t dim, bool log,
                                                                                double temperature) {
  const bool tangent = has_tangent({&x});
  at::Tensor values, indices, m, d;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(values, indices, m, d) = call_softmax_topk(x, k, dim, log, temperature);
  }
  if (records({&x})) {
    const auto node = c10::make_intrusive<OpNode>("OnlineSoftmaxTopkBackward", softmax_topk_derivative);
    node->set_next_edges(torch::autograd::collect_next_edges(x));
    node->args = {dim, log, temperature};
    torch::autograd::set_history(values, node);
    node->save(x, /*is_output=*/false);
    node->save(indices, /*is_output=*/true);
    node->save(m, /*is_output=*/true);
    node->save(d, /*is_output=*/true);
  }
  if (tangent) set_tangent(values, softmax_topk_tangent(tangent_of(x), primal_of(x), indices, values, dim, log,
                                                        temperature));
  return {values, indices, m, d};
}

constexpr const char* kNoSecondDerivative =
    "online_softmax.softmax_topk_backward has no derivative of its own: differentiate softmax_topk with "
    "create_graph=True (or through torch.func), whose gradient is then written in differentiable ops";

variable_list softmax_topk_backward_derivative(const variable_list&, const std::vector<c10::IValue>&) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, kNoSecondDerivative);
}

at::Tensor softmax_topk_backward_autograd(const at::Tensor& grad_values, const at::Tensor& x,
                                          const at::Tensor& indices, const at::Tensor& max, const at::Tensor& sumexp,
                                          int64_t dim, bool log, double temperature) {
  TORCH_CHECK_NOT_IMPLEMENTED(!has_tangent({&grad_values, &x}), kNoSecondDerivative, " (forward-mode AD)");
  at::Tensor dx;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    dx = call_softmax_topk_backward(grad_values, x, indices, max, sumexp, dim, log, temperature);
  }
  if (records({&grad_values, &x})) {
    // Recorded so that differentiating it raises, instead of autograd's silent zeros.
    const auto node = c10::make_intrusive<OpNode>("OnlineSoftmaxTopkBackwardBackward",
                                                  softmax_topk_backward_derivative);
    node->set_next_edges(torch::autograd::collect_next_edges(grad_values, x));
    torch::autograd::set_history(dx, node);
  }
  return dx;
}

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, Autograd, m) {
  m.impl("softmax_topk", &online_softmax::softmax_topk_autograd);
  m.impl("softmax_topk_backward", &online_softmax::softmax_topk_backward_autograd);
}
