// beam_search_step's argument checks, shared by the composite (every backend) and the CPU kernel,
// so one mistake raises the same exception on both.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>

#include "common/checks.h"

namespace online_softmax {

inline void check_beam_search_step(const at::Tensor& logits, const at::Tensor& beam_scores, int64_t num_beams,
                                   int64_t num_candidates, double temperature, double repetition_penalty) {
  const char* op = "beam_search_step";
  check_floating(logits, "logits", op);
  check_floating(beam_scores, "beam_scores", op);
  check_temperature(temperature, op);
  TORCH_CHECK_VALUE(logits.dim() == 2, "online_softmax.", op, ": logits must be 2-D (batch * num_beams, vocab), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(beam_scores.dim() == 2, "online_softmax.", op, ": beam_scores must be 2-D (batch, num_beams), got shape ",
                    beam_scores.sizes());
  TORCH_CHECK_VALUE(num_beams >= 1, "online_softmax.", op, ": num_beams must be >= 1, got ", num_beams);
  TORCH_CHECK_VALUE(beam_scores.size(1) == num_beams, "online_softmax.", op, ": beam_scores has ", beam_scores.size(1),
                    " columns but num_beams is ", num_beams);
  const int64_t batch = beam_scores.size(0), vocab = logits.size(1);
  TORCH_CHECK_VALUE(logits.size(0) == batch * num_beams, "online_softmax.", op, ": logits has ", logits.size(0),
                    " rows but batch * num_beams is ", batch, " * ", num_beams);
  TORCH_CHECK_VALUE(logits.device() == beam_scores.device(), "online_softmax.", op, ": logits is on ", logits.device(),
                    " but beam_scores is on ", beam_scores.device());
  TORCH_CHECK_VALUE(num_candidates >= 1 && num_candidates <= num_beams * vocab, "online_softmax.", op,
                    ": num_candidates must satisfy 1 <= num_candidates <= num_beams * vocab = ", num_beams * vocab,
                    ", got ", num_candidates);
  TORCH_CHECK_VALUE(std::isfinite(repetition_penalty) && repetition_penalty > 0.0, "online_softmax.", op,
                    ": repetition_penalty must be a finite number > 0, got ", repetition_penalty);
}

// banned_tokens / penalized_tokens: (rows, n) int64 on the logits' device.
inline void check_token_list_layout(const at::Tensor& x, const char* name, const at::Tensor& logits, const char* op) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kLong, "online_softmax.", op, ": ", name, " must be an int64 tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == logits.size(0), "online_softmax.", op, ": ", name,
                    " must be 2-D with one row per logits row (", logits.size(0), ", n), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == logits.device(), "online_softmax.", op, ": ", name, " is on ", x.device(),
                    " but logits is on ", logits.device());
}

// A token outside the vocabulary would be read out of bounds: refuse it, by name. lo and hi are
// the list's smallest and largest entries.
inline void check_token_range(int64_t lo, int64_t hi, int64_t vocab, const char* name, const char* op) {
  TORCH_CHECK_VALUE(lo >= -1 && hi < vocab, "online_softmax.", op, ": ", name,
                    " entries must be token ids in [0, vocab = ", vocab, ") or -1 for padding, got values in [",
                    lo, ", ", hi, "]");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_search_step_composite(
    const at::Tensor& logits, const at::Tensor& beam_scores, int64_t num_beams, int64_t num_candidates,
    double temperature, const c10::optional<at::Tensor>& banned_tokens,
    const c10::optional<at::Tensor>& penalized_tokens, double repetition_penalty);

}  // namespace online_softmax
