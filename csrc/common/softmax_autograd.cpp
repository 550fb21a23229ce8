// Autograd of the forward and backward ops in C++ (TORCH_LIBRARY_IMPL(online_softmax, Autograd)):
// they are the library's most frequent calls, and the Python layer of
// torch.library.register_autograd cost more than the whole op on small tensors (a 4 x 8 softmax
// with requires_grad took about 2.7x torch.softmax's time) and tens of microseconds on large ones
// (the backward of 64 x 32768: 20-40 us, Python's garbage collector included). Every other op's
// autograd stays in Python (online_softmax/ops.py), as do all the fake kernels.
//
// forward records a hand-made node (ForwardBackward), as ATen's generated SoftmaxBackward0 is,
// rather than going through torch::autograd::Function: Function::apply builds a context with a
// string-keyed map and wraps outputs for every case a custom function may have (views, dirty and
// non-differentiable outputs), about 0.8 us of a 4 x 8 call. A plain node also works under
// torch.func transforms (Function::apply refuses them) and carries forward-mode AD (Function::apply
// silently dropped the tangent). Its derivative is the backward op, called through the dispatcher,
// so torch.compile traces the same two ops as before; the backward op's own derivative (second
// derivatives of a softmax) is written in ATen ops, which are differentiable in turn, and stays a
// torch::autograd::Function (rare, and not worth a node of its own).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <c10/core/WrapDimMinimal.h>

#include <optional>

namespace online_softmax {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::SavedVariable;
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

// The arguments a forward call hands its backward: everything but x, whose dtype is the gradient's.
struct ForwardArgs {
  int64_t dim;
  bool log;
  double temperature;
  at::ScalarType input_dtype;
};

at::Tensor forward_gradient(const at::Tensor& grad, const at::Tensor& out, const ForwardArgs& a) {
  return call_backward(grad, out, a.dim, a.log, a.temperature, a.input_dtype);
}

// Compiled autograd's view of the node: a function of (grads, out, dim, log, temperature,
// input_dtype) that it calls with proxies while tracing (the backward op has a fake kernel).
variable_list forward_gradient_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
  const ForwardArgs a{args[1].toInt(), args[2].toBool(), args[3].toDouble(),
                      static_cast<at::ScalarType>(args[4].toInt())};
  if (!grads[0].defined()) return {at::Tensor()};
  return {forward_gradient(grads[0], args[0].toTensor(), a)};
}

struct ForwardBackward : public torch::autograd::TraceableFunction {
  ForwardArgs args;
  SavedVariable out_;

  std::string name() const override { return "OnlineSoftmaxForwardBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined() || !task_should_compute_output(0)) return {at::Tensor()};
    return {forward_gradient(grads[0], out_.unpack(getptr()), args)};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    out_.reset_data();
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& compiled) const override {
    compiled.collect(args.dim);
    compiled.collect(args.log);
    compiled.collect(args.temperature);
    compiled.collect(static_cast<int64_t>(args.input_dtype));
    compiled.collect(out_, /*is_output=*/true);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(out_);
    const std::vector<c10::IValue> packed{out_.unpack(getptr()), args.dim, args.log, args.temperature,
                                          static_cast<int64_t>(args.input_dtype)};
    const std::vector<at::TypePtr> schema{at::TensorType::get(), c10::IntType::get(), c10::BoolType::get(),
                                          c10::FloatType::get(), c10::IntType::get()};
    const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
    // Bound afresh on every cache miss, as custom functions are: the name gets a counter.
    const std::string fn = py->bind_function(saved.get_py_compiler(), name(), forward_gradient_functional, schema,
                                             /*is_custom_function=*/true, /*is_traceable=*/true);
    const auto metadata = torch::dynamo::autograd::IValuePacker<std::vector<std::optional<
        torch::autograd::InputMetadata>>>::pack(torch::dynamo::autograd::get_input_metadata(next_edges()));
    variable_list result =
        py->call_function(saved.get_py_compiler(), "apply_functional", fn, grads, packed, metadata);
    saved.after(out_);
    return result;
  }
};

// The tangent of y = softmax(s x) for a tangent t of x: J t with J = s (diag(y) - y y^T), which is
// symmetric, so it is the backward op applied to t. For log_softmax, J = s (I - 1 e^y^T).
at::Tensor forward_tangent(const at::Tensor& t, const at::Tensor& out, const ForwardArgs& a) {
  const at::Tensor tt = t.to(out.scalar_type());
  if (!a.log) return call_backward(tt, out, a.dim, false, a.temperature, out.scalar_type());
  const bool scalar = out.dim() == 0;
  const at::ScalarType acc = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor ta = scalar ? tt.to(acc).reshape({1}) : tt.to(acc);
  const at::Tensor ya = scalar ? out.to(acc).reshape({1}) : out.to(acc);
  const int64_t d = scalar ? 0 : c10::maybe_wrap_dim(a.dim, out.dim());
  at::Tensor jt = (ta - (ta * ya.exp()).sum(d, /*keepdim=*/true)) * (1.0 / a.temperature);
  return (scalar ? jt.reshape({}) : jt).to(out.scalar_type());
}

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
  const bool tangent = torch::autograd::isFwGradDefined(x);
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = call_forward(x, dim, log, temperature, dtype);
  }
  const ForwardArgs args{dim, log, temperature, x.scalar_type()};
  if (records({&x})) {
    auto node = c10::make_intrusive<ForwardBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x));
    node->args = args;
    torch::autograd::set_history(out, node);
    node->out_ = SavedVariable(out, /*is_output=*/true);
  }
  if (tangent) {
    // Computed from the output alone, after it got its history, so that a tangent that requires
    // grad (forward-over-reverse) differentiates through it.
    out._set_fw_grad(forward_tangent(x._fw_grad(/*level=*/0), out, args), /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
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
