// The hand-made autograd node every differentiable op records (TORCH_LIBRARY_IMPL(online_softmax,
// Autograd) in csrc/common/*_autograd.cpp), built the way ATen's generated nodes are rather than
// through torch::autograd::Function or torch.library.register_autograd:
// - torch.func transforms (grad, vjp, jacrev, hessian) accept it; they refuse Python autograd
//   functions registered on an op ("must override the setup_context staticmethod");
// - the op's forward-mode tangent is set on its outputs by the same kernel (a Python
//   registration silently dropped it);
// - compiled autograd traces it through one functional (grads, saved tensors and args) -> grads.
// The derivative is that functional, written over registered ops and ATen ops, which are
// differentiable in turn: second derivatives need nothing more.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace online_softmax {

// grads (one per differentiable output, undefined where unused) and packed = the saved tensors,
// then the op's other arguments -> one gradient per input (undefined where none).
using Derivative = torch::autograd::variable_list (*)(const torch::autograd::variable_list& grads,
                                                      const std::vector<c10::IValue>& packed);

// The same, given the incoming gradients themselves (moved out of the engine's buffer, so that a
// derivative may write its result over one it alone holds: common/reuse_gradient.h). Compiled
// autograd traces the plain Derivative instead.
using ReusingDerivative = torch::autograd::variable_list (*)(torch::autograd::variable_list& grads,
                                                             const std::vector<c10::IValue>& packed);

struct OpNode final : public torch::autograd::TraceableFunction {
  // name: a string literal (a node is built on every recorded call: no allocation for it).
  OpNode(const char* name, Derivative derivative, ReusingDerivative reusing = nullptr)
      : name_(name), derivative_(derivative), reusing_(reusing) {}

  std::string name() const override { return name_; }

  // Saved after the outputs have their history and tangents (forward over reverse differentiates
  // the backward through a saved output).
  void save(const at::Tensor& t, bool is_output) {
    saved_.emplace_back(t, is_output);
    saved_is_output_.push_back(is_output);
  }

  std::vector<c10::IValue> args;

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t outputs = num_outputs();
    bool any = false;
    for (const at::Tensor& g : grads) any = any || g.defined();
    if (!any) return torch::autograd::variable_list(outputs);
    std::vector<c10::IValue> packed;
    packed.reserve(saved_.size() + args.size());
    for (torch::autograd::SavedVariable& v : saved_) packed.emplace_back(v.unpack(getptr()));
    packed.insert(packed.end(), args.begin(), args.end());
    torch::autograd::variable_list result = reusing_ ? reusing_(grads, packed) : derivative_(grads, packed);
    result.resize(outputs);
    for (size_t i = 0; i < outputs; ++i)
      if (!task_should_compute_output(i)) result[i] = at::Tensor();
    return result;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (torch::autograd::SavedVariable& v : saved_) v.reset_data();
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& compiled) const override {
    compiled.collect(std::string(name_));  // one C++ type serves every op: the name tells their caches apart
    for (const c10::IValue& a : args) compiled.collect(a);
    for (size_t i = 0; i < saved_.size(); ++i) compiled.collect(saved_[i], saved_is_output_[i]);
  }

  torch::autograd::variable_list apply_with_saved(const torch::autograd::variable_list& grads,
                                                  torch::dynamo::autograd::SwapSavedVariables& swap) override {
    for (torch::autograd::SavedVariable& v : saved_) swap.before(v);
    std::vector<c10::IValue> packed;
    std::vector<at::TypePtr> schema;
    for (torch::autograd::SavedVariable& v : saved_) {
      packed.emplace_back(v.unpack(getptr()));
      schema.push_back(at::TensorType::get());
    }
    for (const c10::IValue& a : args) {
      schema.push_back(a.type());
      packed.push_back(a);
    }
    const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
    // Bound afresh on every cache miss, as custom functions are: the name gets a counter.
    const std::string fn = py->bind_function(swap.get_py_compiler(), name_, derivative_, schema,
                                             /*is_custom_function=*/true, /*is_traceable=*/true);
    const auto metadata = torch::dynamo::autograd::IValuePacker<std::vector<std::optional<
        torch::autograd::InputMetadata>>>::pack(torch::dynamo::autograd::get_input_metadata(next_edges()));
    torch::autograd::variable_list result =
        py->call_function(swap.get_py_compiler(), "apply_functional", fn, grads, packed, metadata);
    for (torch::autograd::SavedVariable& v : saved_) swap.after(v);
    return result;
  }

 private:
  const char* name_;
  Derivative derivative_;
  ReusingDerivative reusing_;
  std::vector<torch::autograd::SavedVariable> saved_;
  std::vector<bool> saved_is_output_;
};

// Whether a call has anything to record: grad mode on and an input that requires grad.
inline bool records(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

// A defined forward-mode tangent on any of the inputs.
inline bool has_tangent(std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* t : inputs)
    if (t->defined() && torch::autograd::isFwGradDefined(*t)) return true;
  return false;
}

// An input's tangent and primal at level 0 (the only level forward AD uses), undefined where it
// has none: tangents are computed from the primals, or they would carry tangents themselves.
inline at::Tensor tangent_of(const at::Tensor& t) {
  return t.defined() ? t._fw_grad(/*level=*/0) : at::Tensor();
}
inline at::Tensor primal_of(const at::Tensor& t) {
  return t.defined() ? t._fw_primal(/*level=*/0) : t;
}
inline void set_tangent(const at::Tensor& out, const at::Tensor& tangent) {
  if (tangent.defined()) out._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
}

// The accumulation dtype of a tensor: float64 for float64, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace online_softmax
