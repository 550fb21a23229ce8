// Autograd of the forward and backward ops in C++ (TORCH_LIBRARY_IMPL(online_softmax, Autograd)):
// they are the library's most frequent calls, and the Python layer of
// torch.library.register_autograd cost more than the whole op on small tensors (a 4 x 8 softmax
// with requires_grad took about 2.7x torch.softmax's time) and tens of microseconds on large ones
// (the backward of 64 x 32768: 20-40 us, Python's garbage collector included). Every other op's
// autograd stays in Python (online_softmax/ops.py), as do all the fake kernels.
//
// Both record hand-made nodes, as ATen's generated SoftmaxBackward0 is, rather than going through
// torch::autograd::Function: Function::apply builds a context with a string-keyed map and wraps
// outputs for every case a custom function may have (views, dirty and non-differentiable outputs),
// about 0.8 us of a 4 x 8 call. Plain nodes also work under torch.func transforms (grad, vjp,
// hessian: Function::apply refuses them), carry forward-mode AD (Function::apply silently dropped
// the tangent) and give compiled autograd a traceable function. forward's derivative is the
// backward op, called through the dispatcher, so torch.compile traces the same two ops as before;
// the backward op's own derivatives (second derivatives of a softmax) are written in ATen ops,
// which are differentiable in turn.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <c10/core/WrapDimMinimal.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

namespace online_softmax {
namespace {

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

// Compiled autograd's view of the nodes: a function of (grads, saved tensors..., args) that it
// calls with proxies while tracing (the backward op has a fake kernel; the rest are ATen ops).
variable_list forward_gradient_functional(const variable_list& grads, const std::vector<c10::IValue>& packed) {
  if (!grads[0].defined()) return {at::Tensor()};
  return {forward_gradient(grads[0], packed[0].toTensor(), unpacked_args(packed, 1))};
}

variable_list backward_gradient_functional(const variable_list& grads, const std::vector<c10::IValue>& packed) {
  if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
  auto [dg, dy] = backward_gradients(grads[0], packed[0].toTensor(), packed[1].toTensor(), unpacked_args(packed, 2));
  return {dg, dy};
}

// A node made by hand, as ATen's generated ones are (see the top of the file): the op's arguments
// and saved tensors; `gradient` is its derivative, `functional` the same for compiled autograd.
template <size_t kSaved>
struct SoftmaxNode : public torch::autograd::TraceableFunction {
  Args args{};
  std::array<SavedVariable, kSaved> saved_;
  std::array<bool, kSaved> saved_is_output_{};

  virtual variable_list gradient(const variable_list& grads, const std::array<at::Tensor, kSaved>& saved) = 0;
  virtual torch::autograd::functional_apply_t functional() const = 0;

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t outputs = num_outputs();
    if (!grads[0].defined()) return variable_list(outputs);
    std::array<at::Tensor, kSaved> saved;
    for (size_t i = 0; i < kSaved; ++i) saved[i] = saved_[i].unpack(getptr());
    variable_list result = gradient(grads, saved);
    for (size_t i = 0; i < outputs; ++i)
      if (!task_should_compute_output(i)) result[i] = at::Tensor();
    return result;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable& v : saved_) v.reset_data();
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& compiled) const override {
    compiled.collect(args.dim);
    compiled.collect(args.log);
    compiled.collect(args.temperature);
    compiled.collect(static_cast<int64_t>(args.input_dtype));
    for (size_t i = 0; i < kSaved; ++i) compiled.collect(saved_[i], saved_is_output_[i]);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& swap) override {
    for (SavedVariable& v : saved_) swap.before(v);
    std::vector<c10::IValue> packed;
    std::vector<at::TypePtr> schema;
    for (SavedVariable& v : saved_) {
      packed.emplace_back(v.unpack(getptr()));
      schema.push_back(at::TensorType::get());
    }
    for (c10::IValue& v : packed_args(args)) {
      schema.push_back(v.type());
      packed.push_back(std::move(v));
    }
    const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
    // Bound afresh on every cache miss, as custom functions are: the name gets a counter.
    const std::string fn = py->bind_function(swap.get_py_compiler(), name(), functional(), schema,
                                             /*is_custom_function=*/true, /*is_traceable=*/true);
    const auto metadata = torch::dynamo::autograd::IValuePacker<std::vector<std::optional<
        torch::autograd::InputMetadata>>>::pack(torch::dynamo::autograd::get_input_metadata(next_edges()));
    variable_list result = py->call_function(swap.get_py_compiler(), "apply_functional", fn, grads, packed, metadata);
    for (SavedVariable& v : saved_) swap.after(v);
    return result;
  }
};

// forward's node: saves its output y.
struct ForwardBackward final : public SoftmaxNode<1> {
  std::string name() const override { return "OnlineSoftmaxForwardBackward"; }
  variable_list gradient(const variable_list& grads, const std::array<at::Tensor, 1>& saved) override {
    return {forward_gradient(grads[0], saved[0], args)};
  }
  torch::autograd::functional_apply_t functional() const override { return forward_gradient_functional; }
};

// backward's node (second derivatives): saves g and y.
struct BackwardBackward final : public SoftmaxNode<2> {
  std::string name() const override { return "OnlineSoftmaxBackwardBackward"; }
  variable_list gradient(const variable_list& grads, const std::array<at::Tensor, 2>& saved) override {
    auto [dg, dy] = backward_gradients(grads[0], saved[0], saved[1], args);
    return {dg, dy};
  }
  torch::autograd::functional_apply_t functional() const override { return backward_gradient_functional; }
};

// Nothing to record (no grad mode, or no input that requires grad): no node.
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
  const Args args{dim, log, temperature, x.scalar_type()};
  c10::intrusive_ptr<ForwardBackward> node;
  if (records({&x})) {
    node = c10::make_intrusive<ForwardBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x));
    node->args = args;
    torch::autograd::set_history(out, node);
  }
  if (tangent) {
    // Computed from the output alone, after it got its history, so that a tangent that requires
    // grad differentiates through it.
    out._set_fw_grad(forward_tangent(x._fw_grad(/*level=*/0), out, args), /*level=*/0, /*is_inplace_op=*/false);
  }
  if (node) {
    // Saved last, with its tangent: forward-over-reverse (hessians) differentiates the backward
    // through the saved y.
    node->saved_[0] = SavedVariable(out, /*is_output=*/true);
    node->saved_is_output_[0] = true;
  }
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
    const auto node = c10::make_intrusive<BackwardBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(grad_out, out));
    node->args = args;
    node->saved_[0] = SavedVariable(grad_out, /*is_output=*/false);
    node->saved_[1] = SavedVariable(out, /*is_output=*/false);
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
