// Autograd of token_logprobs: with s = 1 / t, p = softmax(x s), log p = log_softmax(x s) and v the
// token's value (x[r, tok], or token_values[r] when given),
//   log_probs = v s - lse(x s):      dx = s (g [j == tok] - g p)  (the one-hot goes to token_values
//                                     instead when they are given: d/dv = s g)
//   entropy H = -sum p log p:        dx = -s g_H p (log p + H)
//   top_log_probs = log p[top_ids]:  softmax_topk's log-values gradient, s (scatter(g) - p sum(g))
// rank, top_ids, max and sumexp are not differentiable. A first derivative runs the
// token_logprobs_backward op for log_probs and entropy (one read of x, from the saved state) and
// softmax_topk_backward for top_log_probs, added; where the gradient itself must be differentiable
// (create_graph, nested torch.func transforms) the same formulas are written over the forward op
// and ATen ops, which are differentiable in turn. token_logprobs_backward itself has no derivative
// and says so when one is asked of it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/autograd_node.h"
#include "common/op_calls.h"

namespace online_softmax {
namespace {

using torch::autograd::variable_list;

// p and log p of softmax(x / t) along the last dim, in the accumulation dtype, through the
// differentiable forward op; p log p is 0 where p is (x = -inf: not 0 * -inf).
struct Probabilities {
  at::Tensor p, log_p, p_log_p;
};

Probabilities probabilities(const at::Tensor& x, double t) {
  const at::Tensor log_p = call_forward(x, -1, true, t, acc_type(x.scalar_type()));
  const at::Tensor p = log_p.exp();
  const at::Tensor p_log_p = at::where(p > 0, p * log_p, at::zeros_like(p));
  return {p, log_p, p_log_p};
}

// The gradient with respect to x (and token_values) written in differentiable ops.
variable_list differentiable_gradient(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& token_values,
                                      const at::Tensor& top_ids, const at::Tensor& g_lp, const at::Tensor& g_top,
                                      const at::Tensor& g_h, double t) {
  const double s = 1.0 / t;
  const Probabilities pr = probabilities(x, t);
  const at::Tensor col = ids.unsqueeze(-1);
  at::Tensor dx = at::zeros_like(pr.p);
  at::Tensor d_values;
  if (g_lp.defined()) {
    const at::Tensor g = g_lp.to(pr.p.scalar_type()).unsqueeze(-1);
    dx = dx - g * pr.p;
    if (token_values.defined()) {
      d_values = (g_lp * s).to(token_values.scalar_type());
    } else {
      dx = dx.scatter_add(-1, col, g);
    }
  }
  if (g_h.defined()) {
    const at::Tensor entropy = -pr.p_log_p.sum(-1, /*keepdim=*/true);
    const at::Tensor term = at::where(pr.p > 0, pr.p * (pr.log_p + entropy), at::zeros_like(pr.p));
    dx = dx - g_h.to(pr.p.scalar_type()).unsqueeze(-1) * term;
  }
  if (g_top.defined() && top_ids.size(-1) > 0) {
    const at::Tensor g = g_top.to(pr.p.scalar_type());
    dx = dx + at::zeros_like(pr.p).scatter_add(-1, top_ids, g) - pr.p * g.sum(-1, /*keepdim=*/true);
  }
  return {(dx * s).to(x.scalar_type()), d_values};
}

// packed: x, token_ids, token_values (undefined when absent), top_ids, max, sumexp, entropy, then
// top_n, temperature. grads: log_probs, top_log_probs, entropy.
variable_list token_logprobs_derivative(const variable_list& grads, const std::vector<c10::IValue>& packed) {
  const at::Tensor x = packed[0].toTensor(), ids = packed[1].toTensor(), token_values = packed[2].toTensor();
  const at::Tensor top_ids = packed[3].toTensor();
  const double t = packed[8].toDouble();
  const at::Tensor &g_lp = grads[0], &g_top = grads[1], &g_h = grads[2];
  if (at::GradMode::is_enabled())
    return differentiable_gradient(x, ids, token_values, top_ids, g_lp, g_top, g_h, t);
  at::Tensor dx, d_values;
  if (g_lp.defined() || g_h.defined()) {
    const at::Tensor m = packed[4].toTensor(), d = packed[5].toTensor(), entropy = packed[6].toTensor();
    const at::Tensor g = g_lp.defined() ? g_lp.to(m.scalar_type()) : at::zeros_like(m);
    dx = call_token_logprobs_backward(g, g_h.defined() ? std::optional<at::Tensor>(g_h.to(m.scalar_type()))
                                                       : std::nullopt,
                                      x, ids, m, d, entropy, t);
    if (token_values.defined() && g_lp.defined()) {
      // The op's one-hot belongs to token_values here: x's entry at the token is not v.
      const at::Tensor one_hot = (g * (1.0 / t)).unsqueeze(-1);
      dx = dx.scatter_add(-1, ids.unsqueeze(-1), (-one_hot).to(dx.scalar_type()));
      d_values = (g * (1.0 / t)).to(token_values.scalar_type());
    }
  }
  if (g_top.defined() && top_ids.size(-1) > 0) {
    const at::Tensor dtop = call_softmax_topk_backward(g_top, x, top_ids, packed[4].toTensor(), packed[5].toTensor(),
                                                       -1, /*log=*/true, t);
    dx = dx.defined() ? dx.add_(dtop) : dtop;
  }
  return {dx, d_values};
}

// Forward-mode: with dz = s tx (and the token's dz from token_values' tangent when given),
//   d log_probs = dz_tok - E[dz],  d top = dz[top_ids] - E[dz],  dH = -(E[dz log p] + E[dz] H).
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_tangents(const at::Tensor& tx, const at::Tensor& tv,
                                                                       const at::Tensor& x, const at::Tensor& ids,
                                                                       bool has_values, const at::Tensor& top_ids,
                                                                       const at::Tensor& entropy, double t) {
  const Probabilities pr = probabilities(x, t);
  const at::ScalarType acc = pr.p.scalar_type();
  const at::Tensor dz = tx.defined() ? tx.to(acc) * (1.0 / t) : at::zeros_like(pr.p);
  const at::Tensor mean = (pr.p * dz).sum(-1);
  at::Tensor tok;
  if (has_values) {
    tok = tv.defined() ? tv.to(acc) * (1.0 / t) : at::zeros_like(mean);
  } else {
    tok = dz.gather(-1, ids.unsqueeze(-1)).squeeze(-1);
  }
  const at::Tensor d_top = dz.gather(-1, top_ids) - mean.unsqueeze(-1);
  const at::Tensor d_h = -(at::where(pr.p > 0, pr.p_log_p * dz, at::zeros_like(pr.p)).sum(-1) + mean * entropy);
  return {tok - mean, d_top, d_h};
}

TokenLogprobsResult token_logprobs_autograd(const at::Tensor& x, const at::Tensor& token_ids, int64_t top_n,
                                            double temperature, const std::optional<at::Tensor>& token_values) {
  const at::Tensor values = token_values.has_value() ? *token_values : at::Tensor();
  const bool tangent = has_tangent({&x, &values});
  at::Tensor lp, rank, top_ids, top_lp, m, d, entropy;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(lp, rank, top_ids, top_lp, m, d, entropy) =
        call_token_logprobs(x, token_ids, top_n, temperature, token_values);
  }
  c10::intrusive_ptr<OpNode> node;
  if (records({&x, &values})) {
    node = c10::make_intrusive<OpNode>("OnlineSoftmaxTokenLogprobsBackward", token_logprobs_derivative);
    node->set_next_edges(torch::autograd::collect_next_edges(x, values));
    node->args = {top_n, temperature};
    torch::autograd::set_history({lp, top_lp, entropy}, node);
  }
  if (tangent) {
    auto [t_lp, t_top, t_h] = token_logprobs_tangents(tangent_of(x), tangent_of(values), primal_of(x), token_ids,
                                                      values.defined(), top_ids, entropy, temperature);
    set_tangent(lp, t_lp);
    set_tangent(top_lp, t_top);
    set_tangent(entropy, t_h);
  }
  if (node) {
    node->save(x, /*is_output=*/false);
    node->save(token_ids, /*is_output=*/false);
    node->save(values, /*is_output=*/false);
    node->save(top_ids, /*is_output=*/true);
    node->save(m, /*is_output=*/true);
    node->save(d, /*is_output=*/true);
    node->save(entropy, /*is_output=*/true);
  }
  return {lp, rank, top_ids, top_lp, m, d, entropy};
}

constexpr const char* kNoSecondDerivative =
    "online_softmax.token_logprobs_backward has no derivative of its own: differentiate token_logprobs with "
    "create_graph=True (or through torch.func), whose gradient is then written in differentiable ops";

variable_list token_logprobs_backward_derivative(const variable_list&, const std::vector<c10::IValue>&) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, kNoSecondDerivative);
}

at::Tensor token_logprobs_backward_autograd(const at::Tensor& grad_log_probs,
                                            const std::optional<at::Tensor>& grad_entropy, const at::Tensor& x,
                                            const at::Tensor& token_ids, const at::Tensor& max,
                                            const at::Tensor& sumexp, const at::Tensor& entropy,
                                            double temperature) {
  const at::Tensor g_h = grad_entropy.has_value() ? *grad_entropy : at::Tensor();
  TORCH_CHECK_NOT_IMPLEMENTED(!has_tangent({&grad_log_probs, &g_h, &x}), kNoSecondDerivative,
                              " (forward-mode AD)");
  at::Tensor dx;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    dx = call_token_logprobs_backward(grad_log_probs, grad_entropy, x, token_ids, max, sumexp, entropy, temperature);
  }
  if (records({&grad_log_probs, &g_h, &x})) {
    // Recorded so that differentiating it raises, instead of autograd's silent zeros.
    const auto node = c10::make_intrusive<OpNode>("OnlineSoftmaxTokenLogprobsBackwardBackward",
                                                  token_logprobs_backward_derivative);
    node->set_next_edges(torch::autograd::collect_next_edges(grad_log_probs, g_h, x));
    torch::autograd::set_history(dx, node);
  }
  return dx;
}

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, Autograd, m) {
  m.impl("token_logprobs", &online_softmax::token_logprobs_autograd);
  m.impl("token_logprobs_backward", &online_softmax::token_logprobs_backward_autograd);
}
