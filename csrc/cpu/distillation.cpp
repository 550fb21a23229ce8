// The distillation_forward and distillation_backward(_) ops on the CPU: checks (shared with CUDA,
// common/op_args.h), the outputs, then the kernels of the capability in use
// (csrc/cpu/kernels/distillation.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/distillation_args.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "kernels/distillation_math.h"

namespace online_softmax::cpu {

namespace {

DistillationCall make_call(const DistillationArgs& a) {
  DistillationCall c{};
  c.x_dtype = a.student.scalar_type();
  c.student = a.student.const_data_ptr();
  c.teacher = a.teacher.const_data_ptr();
  c.rows = a.rows;
  c.n = a.n;
  c.target = a.target ? a.target->const_data_ptr<int64_t>() : nullptr;
  c.kind = a.kind;
  c.beta = a.beta;
  c.temperature = a.temperature;
  c.hard_weight = a.hard_weight;
  c.ignore_index = a.ignore_index;
  return c;
}

void run_backward(const DistillationArgs& a, void* out) {
  if (a.rows == 0 || a.n == 0) return;
  DistillationCall c = make_call(a);
  c.grad_loss = a.grad_loss->const_data_ptr();
  c.stats = const_cast<void*>(a.stats->const_data_ptr());
  c.out = out;
  kernels().distillation_backward(c);
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
  DistillationCall c = make_call(a);
  c.loss = loss.mutable_data_ptr();
  c.stats = stats.mutable_data_ptr();
  // An empty vocabulary is a row without a distribution (NaN), or an ignored row (0): the kernel
  // handles both with its blocks loop never entered.
  kernels().distillation_forward(c);
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
  // Plain pages, as cross_entropy_backward's gradient (csrc/cpu/cross_entropy.cpp says why).
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

}  // namespace online_softmax::cpu
