// Argument checks of the distillation ops, shared by the CPU and CUDA bindings (as op_args.h's).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "common/checks.h"
#include "common/op_args.h"

namespace online_softmax {

// ---- distillation_forward, distillation_backward(_) ----

struct DistillationArgs {
  at::Tensor student, teacher;        // (rows, n), contiguous, one dtype
  std::optional<at::Tensor> target;   // (rows,) int64, contiguous
  std::optional<at::Tensor> grad_loss, stats;  // backward only: (rows,) and (rows, 7), accumulation dtype
  int kind;                           // 0 kl, 1 reverse_kl, 2 jsd (kernels/distillation_math.h)
  double beta, temperature, hard_weight;
  int64_t ignore_index, rows, n;
};

inline int distillation_kind(const std::string& kind, const char* op) {
  if (kind == "kl") return 0;
  if (kind == "reverse_kl") return 1;
  if (kind == "jsd") return 2;
  TORCH_CHECK_VALUE(false, "online_softmax.", op, ": kind must be one of 'kl', 'reverse_kl', 'jsd', got '", kind,
                    "'");
  return -1;
}

// The checks every distillation op shares. student_name: "student" (the in-place backward writes
// over it, so it must be contiguous already).
inline DistillationArgs distillation_args(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                          const std::optional<at::Tensor>& target, const std::string& kind,
                                          double beta, double temperature, double hard_weight,
                                          int64_t ignore_index, bool in_place = false) {
  DistillationArgs a;
  check_floating(student, "student", op);
  check_floating(teacher, "teacher", op);
  TORCH_CHECK_VALUE(student.dim() == 2, "online_softmax.", op, ": student must be 2-D (rows, vocab), got shape ",
                    student.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(), "online_softmax.", op,
                   ": teacher must have the dtype of student (", student.scalar_type(), "), got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "online_softmax.", op,
                    ": teacher must have the shape of student ", student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_VALUE(teacher.device() == student.device(), "online_softmax.", op, ": teacher is on ", teacher.device(),
                    " but student is on ", student.device());
  TORCH_CHECK_VALUE(!in_place || student.is_contiguous(), "online_softmax.", op,
                    ": student must be contiguous to receive its gradient in place");
  a.kind = distillation_kind(kind, op);
  TORCH_CHECK_VALUE(a.kind != 2 || (beta > 0.0 && beta < 1.0), "online_softmax.", op,
                    ": beta must satisfy 0 < beta < 1 for kind='jsd', got ", beta);
  check_temperature(temperature, op);
  TORCH_CHECK_VALUE(hard_weight >= 0.0 && hard_weight <= 1.0, "online_softmax.", op,
                    ": hard_weight must lie in [0, 1], got ", hard_weight);
  a.student = student.contiguous();
  a.teacher = teacher.contiguous();
  a.rows = student.size(0);
  a.n = student.size(1);
  if (target.has_value()) a.target = per_row_ids(*target, "target", op, student, a.rows);
  a.beta = beta;
  a.temperature = temperature;
  a.hard_weight = hard_weight;
  a.ignore_index = ignore_index;
  return a;
}

// The backward's own arguments: grad_loss (rows,) and the forward's stats (rows, 7).
inline void distillation_backward_args(DistillationArgs& a, const char* op, const at::Tensor& grad_loss,
                                       const at::Tensor& stats) {
  const at::ScalarType acc = state_dtype(a.student.scalar_type());
  a.grad_loss = per_row_arg(grad_loss, "grad_loss", op, a.student, acc, a.rows);
  TORCH_CHECK_TYPE(stats.scalar_type() == acc, "online_softmax.", op, ": stats must be ", acc,
                   " (the accumulation dtype of student), got ", stats.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == a.rows && stats.size(1) == 7, "online_softmax.", op,
                    ": stats must have shape [", a.rows, ", 7] (distillation_forward's), got ", stats.sizes());
  TORCH_CHECK_VALUE(stats.device() == a.student.device(), "online_softmax.", op, ": stats is on ", stats.device(),
                    " but student is on ", a.student.device());
  a.stats = stats.contiguous();
}

}  // namespace online_softmax
