// CUDA distillation_forward and distillation_backward(_) bindings: checks (common/distillation_args.h,
// shared with the CPU), device guard, current stream, dtype dispatch, then one call into
// csrc/kernels/distillation.cu.
#include <ATen/Dispatch.h>

#include "common/distillation_args.h"
#include "cuda/binding.h"
#include "cuda/kernels.h"
#include "kernels/distillation_math.h"

namespace online_softmax::cuda {

namespace {

const int64_t* target_ptr(const DistillationArgs& a) {
  return a.target ? a.target->const_data_ptr<int64_t>() : nullptr;
}

// A target outside [0, vocab) (and not ignore_index) is flagged on the device; the check is an
// asynchronous device-side assert, as cross_entropy_backward's, so the op never waits for the GPU.
void assert_targets(const at::Tensor& error, const char* op) {
  at::_assert_async(error.eq(0), op);
}

void run_backward(const DistillationArgs& a, void* out) {
  if (a.rows == 0 || a.n == 0) return;
  const c10::cuda::CUDAGuard guard(a.student.device());
  at::Tensor error = at::zeros({1}, a.student.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(a.student);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.student.scalar_type(),
                                  "online_softmax.distillation_backward", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    check_launch(kernels::distillation_backward<T>(
                     cptr<scalar_t>(a.student), cptr<scalar_t>(a.teacher), target_ptr(a), a.kind, a.beta,
                     a.temperature, a.hard_weight, a.ignore_index, a.grad_loss->const_data_ptr<A>(),
                     a.stats->const_data_ptr<A>(), static_cast<T*>(out), a.rows, a.n,
                     error.mutable_data_ptr<int>(), limits, stream),
                 "distillation_backward");
  });
  assert_targets(error, "online_softmax.distillation_backward: target must lie in [0, vocab) or equal ignore_index");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> distillation_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                        const std::optional<at::Tensor>& target,
                                                        c10::string_view kind, double beta, double temperature,
                                                        double hard_weight, int64_t ignore_index) {
  const DistillationArgs a = distillation_args("distillation_forward", student, teacher, target, std::string(kind),
                                               beta, temperature, hard_weight, ignore_index);
  const auto options = a.student.options().dtype(state_dtype(a.student.scalar_type()));
  at::Tensor loss = at::empty({a.rows}, options);
  at::Tensor stats = at::empty({a.rows, distill::kStats}, options);
  if (a.rows == 0) return {loss, stats};
  const c10::cuda::CUDAGuard guard(a.student.device());
  at::Tensor error = at::zeros({1}, a.student.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::DeviceLimits limits = device_limits(a.student);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.student.scalar_type(),
                                  "online_softmax.distillation_forward", [&] {
    using T = cuda_t<scalar_t>;
    using A = typename kernels::AccOf<T>::type;
    check_launch(kernels::distillation_forward<T>(
                     cptr<scalar_t>(a.student), cptr<scalar_t>(a.teacher), target_ptr(a), a.kind, a.beta,
                     a.temperature, a.hard_weight, a.ignore_index, loss.mutable_data_ptr<A>(),
                     stats.mutable_data_ptr<A>(), a.rows, a.n, error.mutable_data_ptr<int>(), limits, stream),
                 "distillation_forward");
  });
  assert_targets(error, "online_softmax.distillation_forward: target must lie in [0, vocab) or equal ignore_index");
  return {loss, stats};
}

at::Tensor distillation_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& target, const at::Tensor& stats,
                                 c10::string_view kind, double beta, double temperature, double hard_weight,
                                 int64_t ignore_index) {
  const char* op = "distillation_backward";
  DistillationArgs a = distillation_args(op, student, teacher, target, std::string(kind), beta, temperature,
                                         hard_weight, ignore_index);
  distillation_backward_args(a, op, grad_loss, stats);
  at::Tensor out = at::empty(a.student.sizes(), a.student.options());
  run_backward(a, out.mutable_data_ptr());
  return out;
}

void distillation_backward_(const at::Tensor& student, const at::Tensor& grad_loss, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& target, const at::Tensor& stats, c10::string_view kind,
                            double beta, double temperature, double hard_weight, int64_t ignore_index) {
  const char* op = "distillation_backward_";
  DistillationArgs a = distillation_args(op, student, teacher, target, std::string(kind), beta, temperature,
                                         hard_weight, ignore_index, /*in_place=*/true);
  distillation_backward_args(a, op, grad_loss, stats);
  run_backward(a, student.mutable_data_ptr());
}

}  // namespace online_softmax::cuda
