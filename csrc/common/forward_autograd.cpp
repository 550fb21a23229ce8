// Autograd of the forward op in C++ (TORCH_LIBRARY_IMPL(online_softmax, Autograd)), over the
// backward op: a softmax call is the most frequent call of the library, and the Python autograd
// layer of torch.library.register_autograd cost more than the whole op on small tensors (a 4 x 8
// softmax with requires_grad took about 2.7x torch.softmax's time). Every other op's autograd stays
// in Python (online_softmax/ops.py), as do all the fake kernels.
//
// The backward calls the backward op through the dispatcher, so a double backward goes through
// that op's own autograd, and torch.compile traces the same two ops as before.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

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

at::Tensor forward_autograd(const at::Tensor& x, int64_t dim, bool log, double temperature,
                            std::optional<at::ScalarType> dtype) {
  return SoftmaxFunction::apply(x, dim, log, temperature, dtype);
}

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, Autograd, m) {
  m.impl("forward", &online_softmax::forward_autograd);
}
