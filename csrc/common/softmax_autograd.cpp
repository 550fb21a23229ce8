// Autograd of the forward and backward ops in C++ (TORCH_LIBRARY_IMPL(online_softmax, Autograd)):
// they are the library's most frequent calls, and the Python layer of
// torch.library.register_autograd cost more than the whole op on small tensors (a 4 x 8 softmax
// with requires_grad took about 2.7x torch.softmax's time) and tens of microseconds on large ones
// (the backward of 64 x 32768: 20-40 us, Python's garbage collector included). Every other op's
// autograd stays in Python (online_softmax/ops.py), as do all the fake kernels.
//
// forward's derivative is the backward op, called through the dispatcher, so torch.compile traces
// the same two ops as before; the backward op's own derivative (second derivatives of a softmax)
// is written in ATen ops, which are differentiable in turn.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <c10/core/WrapDimMinimal.h>

#include <optional>

namespace online_softmax {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& x, int64_t dim, bool log, double temperature,
                        std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::forward", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, bool, double, std::optional<at::ScalarType>)>();
  return op.call(x, dim, log, temperature, dtype);
}

at::Tensor call_backward(const at::Tensor& grad, const at::Tensor& out, int64_t dim, bool log, double temperature,
                         std::optional<at::ScalarType> input_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, double,
                                         std::optional<at::ScalarType>)>();
  return op.call(grad, out, dim, log, temperature, input_dtype);
}

class SoftmaxFunction : public torch::autograd::Function<SoftmaxFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t dim, bool log, double temperature,
                            std::optional<at::ScalarType> dtype) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = call_forward(x, dim, log, temperature, dtype);
    }
    ctx->save_for_backward({out});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["log"] = log;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["input_dtype"] = static_cast<int64_t>(x.scalar_type());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor out = ctx->get_saved_variables()[0];
    const auto input_dtype = static_cast<at::ScalarType>(ctx->saved_data["input_dtype"].toInt());
    at::Tensor dx = call_backward(grads[0], out, ctx->saved_data["dim"].toInt(), ctx->saved_data["log"].toBool(),
                                  ctx->saved_data["temperature"].toDouble(), input_dtype);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// With s = 1 / temperature, g = grad_out, y = out and h the gradient of dx:
//   softmax: dx = s y (g - sum(g y))  ->  dg = s y (h - sum(h y)),  dy = s (h (g - sum(g y)) - g sum(h y))
//   log:     dx = s (g - e^y sum(g))  ->  dg = s (h - sum(h e^y)),  dy = -s h e^y sum(g)
class SoftmaxBackwardFunction : public torch::autograd::Function<SoftmaxBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& out, int64_t dim,
                            bool log, double temperature, std::optional<at::ScalarType> input_dtype) {
    at::Tensor dx;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      dx = call_backward(grad_out, out, dim, log, temperature, input_dtype);
    }
    ctx->save_for_backward({grad_out, out});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["log"] = log;
    ctx->saved_data["temperature"] = temperature;
    return dx;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& g = saved[0];
    const at::Tensor& y = saved[1];
    const bool scalar = y.dim() == 0;
    const at::ScalarType acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto prepared = [&](const at::Tensor& t) {
      at::Tensor a = t.to(acc);
      return scalar ? a.reshape({1}) : a;
    };
    const at::Tensor ga = prepared(g), ya = prepared(y), ha = prepared(grads[0]);
    const int64_t d = scalar ? 0 : c10::maybe_wrap_dim(ctx->saved_data["dim"].toInt(), y.dim());
    const double s = 1.0 / ctx->saved_data["temperature"].toDouble();
    at::Tensor dg, dy;
    if (ctx->saved_data["log"].toBool()) {
      const at::Tensor e = ya.exp();
      dg = (ha - (ha * e).sum(d, /*keepdim=*/true)) * s;
      dy = ha * e * ga.sum(d, /*keepdim=*/true) * (-s);
    } else {
      const at::Tensor hy = (ha * ya).sum(d, /*keepdim=*/true);
      dg = ya * (ha - hy) * s;
      dy = (ha * (ga - (ga * ya).sum(d, /*keepdim=*/true)) - ga * hy) * s;
    }
    if (scalar) {
      dg = dg.reshape({});
      dy = dy.reshape({});
    }
    return {dg.to(g.scalar_type()), dy.to(y.scalar_type()), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Nothing to record (no grad mode, or no input that requires grad): straight to the kernel below
// autograd. Function::apply would build a node and a context first, about 1.5 us of a 4-us call.
bool records(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t->requires_grad()) return true;
  return false;
}

at::Tensor forward_autograd(const at::Tensor& x, int64_t dim, bool log, double temperature,
                            std::optional<at::ScalarType> dtype) {
  if (!records({&x})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return call_forward(x, dim, log, temperature, dtype);
  }
  return SoftmaxFunction::apply(x, dim, log, temperature, dtype);
}

at::Tensor backward_autograd(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log,
                             double temperature, std::optional<at::ScalarType> input_dtype) {
  if (!records({&grad_out, &out})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return call_backward(grad_out, out, dim, log, temperature, input_dtype);
  }
  return SoftmaxBackwardFunction::apply(grad_out, out, dim, log, temperature, input_dtype);
}

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, Autograd, m) {
  m.impl("forward", &online_softmax::forward_autograd);
  m.impl("backward", &online_softmax::backward_autograd);
}
