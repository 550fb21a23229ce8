// The softmax backward written over the incoming gradient where the autograd node owns it: no
// gradient-sized allocation, none of its first-touch page faults, one write-allocate stream fewer.
// Where the gradient is shared, or the backward must itself be differentiable, out of place.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/CPUAllocator.h>

#include <optional>
#include <typeinfo>
#include <utility>

#include "common/op_calls.h"

namespace online_softmax {

// Whether an incoming gradient g, moved out of the engine's buffer into a node's apply, is
// referenced by nothing else: no other tensor object (the user's own, as in y.backward(g), a
// retained or hooked gradient, another branch's), no view of its storage; and a plain dense CPU
// tensor (no torch.func wrapper, fake or Python subclass) in memory from torch's CPU allocator
// (not borrowed: numpy, from_blob), outside create_graph, whose backward must itself be
// differentiable. Autograd's AccumulateGrad steals gradients on the same counts.
inline bool owns_gradient(const at::Tensor& g) {
  if (!g.defined() || at::GradMode::is_enabled() || g.use_count() != 1) return false;
  const c10::TensorImpl* impl = g.unsafeGetTensorImpl();
  if (typeid(*impl) != typeid(c10::TensorImpl) || impl->key_set().has(c10::DispatchKey::Python)) return false;
  return g.device().is_cpu() && g.layout() == at::kStrided && !g.is_view() && !g.requires_grad() &&
         !g.is_neg() && !g.is_conj() && !g._is_zerotensor() && g.storage().use_count() == 1 &&
         g.storage().data_ptr().get_deleter() == c10::GetCPUAllocator()->raw_deleter();
}

// dx of a softmax (log_softmax) whose output is y, for the incoming gradient g: over g where the
// node owns it and the result has its dtype and layout (x_dtype: forward's input dtype), else the
// backward op.
inline at::Tensor softmax_gradient(at::Tensor g, const at::Tensor& y, int64_t dim, bool log, double temperature,
                                   at::ScalarType x_dtype) {
  if (owns_gradient(g) && g.scalar_type() == y.scalar_type() && x_dtype == y.scalar_type() &&
      g.sizes() == y.sizes() && g.is_contiguous() && y.is_contiguous() && y.device() == g.device()) {
    at::AutoDispatchBelowADInplaceOrView below;  // g is not a graph's tensor: nothing to record
    call_backward_inplace(g, y, dim, log, temperature);
    return g;
  }
  const std::optional<at::ScalarType> input_dtype =
      x_dtype == y.scalar_type() ? std::nullopt : std::optional<at::ScalarType>(x_dtype);
  return call_backward(g, y, dim, log, temperature, input_dtype);
}

}  // namespace online_softmax
