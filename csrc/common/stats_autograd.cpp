// Autograd of stats: (m, d) of x / t along dim. With p = softmax(x / t) and a the row's argmax
// (m is a max: its derivative is the one-hot of a, the first of tied maxima),
//   dm/dx = e_a / t,   dd/dx = d (p - e_a) / t,
// so the gradient of m + log d (the logsumexp) is p / t. Written over the forward op and ATen
// ops, which are differentiable in turn.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/autograd_node.h"
#include "common/op_calls.h"

namespace online_softmax {
namespace {

using torch::autograd::variable_list;

// What the derivative and the tangent share: the row's p, the one-hot of its argmax and d, each
// with dim kept, in the accumulation dtype.
struct StatsParts {
  at::Tensor p, onehot, d;
};

StatsParts stats_parts(const at::Tensor& x, const at::Tensor& d, int64_t dim, double temperature) {
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor p = call_forward(x, dim, false, temperature, acc);
  const at::Tensor onehot = at::zeros_like(p).scatter(dim, x.argmax(dim, /*keepdim=*/true), 1.0);
  return {p, onehot, d.unsqueeze(dim)};
}

// packed: x, m, d, then dim, temperature.
variable_list stats_derivative(const variable_list& grads, const std::vector<c10::IValue>& packed) {
  const at::Tensor x = packed[0].toTensor(), m = packed[1].toTensor(), d = packed[2].toTensor();
  const double t = packed[4].toDouble();
  const at::Tensor gm = grads[0].defined() ? grads[0] : at::zeros_like(m);
  const at::Tensor gd = grads[1].defined() ? grads[1] : at::zeros_like(d);
  if (x.dim() == 0) return {(gm / t).to(x.scalar_type())};  // m = x / t, d = 1
  const int64_t dim = c10::maybe_wrap_dim(packed[3].toInt(), x.dim());
  if (x.size(dim) == 0) return {at::zeros_like(x)};
  const StatsParts s = stats_parts(x, d, dim, t);
  const at::Tensor dx = (gm.unsqueeze(dim) * s.onehot + gd.unsqueeze(dim) * s.d * (s.p - s.onehot)) / t;
  return {dx.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> stats_tangents(const at::Tensor& tx, const at::Tensor& x, const at::Tensor& d,
                                                  int64_t dim, double t) {
  const at::ScalarType acc = d.scalar_type();
  if (x.dim() == 0) return {tx.to(acc) / t, at::zeros_like(d)};
  const int64_t w = c10::maybe_wrap_dim(dim, x.dim());
  if (x.size(w) == 0) return {at::zeros_like(d), at::zeros_like(d)};
  const StatsParts s = stats_parts(x, d, w, t);
  const at::Tensor ta = tx.to(acc);
  const at::Tensor tm = (ta * s.onehot).sum(w) / t;
  const at::Tensor td = d * ((ta * s.p).sum(w) / t - tm);
  return {tm, td};
}

std::tuple<at::Tensor, at::Tensor> stats_autograd(const at::Tensor& x, int64_t dim, double temperature) {
  const bool tangent = has_tangent({&x});
  at::Tensor m, d;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(m, d) = call_stats(x, dim, temperature);
  }
  c10::intrusive_ptr<OpNode> node;
  if (records({&x})) {
    node = c10::make_intrusive<OpNode>("OnlineSoftmaxStatsBackward", stats_derivative);
    node->set_next_edges(torch::autograd::collect_next_edges(x));
    node->args = {dim, temperature};
    torch::autograd::set_history({m, d}, node);
  }
  if (tangent) {
    auto [tm, td] = stats_tangents(tangent_of(x), primal_of(x), d, dim, temperature);
    set_tangent(m, tm);
    set_tangent(d, td);
  }
  if (node) {
    node->save(x, /*is_output=*/false);
    node->save(m, /*is_output=*/true);
    node->save(d, /*is_output=*/true);
  }
  return {m, d};
}

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, Autograd, m) {
  m.impl("stats", &online_softmax::stats_autograd);
}
