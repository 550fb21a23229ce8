// beam_search_advance's argument checks, shared by the CPU kernel and the composite, and the
// constants both apply exactly as transformers' vectorized beam search does.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace online_softmax {

// The score that takes a slot out of every selection (transformers' -1e9; exact in float32).
constexpr float kBeamSlotOff = -1.0e9f;

// early_stopping as an int in the schema: transformers' False, True and "never".
enum class EarlyStopping : int64_t { kFalse = 0, kTrue = 1, kNever = 2 };

struct BeamSearchAdvanceArgs {
  const at::Tensor& running;                 // (batch, num_beams, max_length) int64
  const at::Tensor& running_scores;          // (batch, num_beams) float32/float64
  const at::Tensor& running_beam_indices;    // (batch, num_beams, max_length - prompt_len) int32
  const at::Tensor& finished;                // as running
  const at::Tensor& finished_scores;         // as running_scores
  const at::Tensor& finished_beam_indices;   // as running_beam_indices
  const at::Tensor& is_finished;             // (batch, num_beams) bool
  const at::Tensor& improvable;              // (batch, 1) bool
  const at::Tensor& candidates;              // (batch, keep, max_length) int64
  const at::Tensor& candidate_scores;        // (batch, keep), running_scores' dtype
  const at::Tensor& candidate_beams;         // (batch, keep) int64 in [0, num_beams)
  const at::Tensor& stopped;                 // (batch, keep) bool
  int64_t cur_len, prompt_len;
  double length_penalty;
  int64_t early_stopping;
};

inline void check_beam_search_advance(const BeamSearchAdvanceArgs& a) {
  constexpr const char* op = "online_softmax.beam_search_advance: ";
  const at::Tensor& r = a.running;
  TORCH_CHECK_VALUE(r.dim() == 3, op, "running must be (batch, num_beams, max_length), got shape ", r.sizes());
  const int64_t batch = r.size(0), nb = r.size(1), max_length = r.size(2);
  TORCH_CHECK_VALUE(nb >= 1, op, "running must hold at least one beam per batch entry");
  TORCH_CHECK_VALUE(a.prompt_len >= 0 && a.prompt_len <= a.cur_len && a.cur_len < max_length, op,
                    "cur_len must be in [prompt_len, max_length) and prompt_len >= 0, got cur_len ", a.cur_len,
                    ", prompt_len ", a.prompt_len, ", max_length ", max_length);
  TORCH_CHECK_VALUE(a.early_stopping >= 0 && a.early_stopping <= 2, op,
                    "early_stopping must be 0 (False), 1 (True) or 2 ('never'), got ", a.early_stopping);
  const at::Tensor& c = a.candidates;
  TORCH_CHECK_VALUE(c.dim() == 3 && c.size(0) == batch && c.size(1) >= nb && c.size(2) == max_length, op,
                    "candidates must be (batch, keep >= num_beams, max_length) = (", batch, ", >= ", nb, ", ",
                    max_length, "), got shape ", c.sizes());
  const int64_t keep = c.size(1), generated = max_length - a.prompt_len;
  struct Expect {
    const at::Tensor& t;
    const char* name;
    std::vector<int64_t> shape;
  };
  const Expect expected[] = {
      {a.running_scores, "running_scores", {batch, nb}},
      {a.running_beam_indices, "running_beam_indices", {batch, nb, generated}},
      {a.finished, "finished", {batch, nb, max_length}},
      {a.finished_scores, "finished_scores", {batch, nb}},
      {a.finished_beam_indices, "finished_beam_indices", {batch, nb, generated}},
      {a.is_finished, "is_finished", {batch, nb}},
      {a.improvable, "improvable", {batch, 1}},
      {a.candidate_scores, "candidate_scores", {batch, keep}},
      {a.candidate_beams, "candidate_beams", {batch, keep}},
      {a.stopped, "stopped", {batch, keep}},
  };
  for (const Expect& e : expected) {
    TORCH_CHECK_VALUE(e.t.sizes() == at::IntArrayRef(e.shape), op, e.name, " must have shape ",
                      at::IntArrayRef(e.shape), ", got ", e.t.sizes());
    TORCH_CHECK_VALUE(e.t.device() == r.device(), op, e.name, " must be on running's device ", r.device(),
                      ", got ", e.t.device());
  }
  TORCH_CHECK_VALUE(c.device() == r.device(), op, "candidates must be on running's device");
  const at::ScalarType score = a.running_scores.scalar_type();
  TORCH_CHECK_TYPE(score == at::kFloat || score == at::kDouble, op,
                   "running_scores must be float32 or float64, got ", score);
  struct Typed {
    const at::Tensor& t;
    const char* name;
    at::ScalarType type;
  };
  const Typed typed[] = {
      {r, "running", at::kLong}, {a.finished, "finished", at::kLong}, {c, "candidates", at::kLong},
      {a.candidate_beams, "candidate_beams", at::kLong},
      {a.running_beam_indices, "running_beam_indices", at::kInt},
      {a.finished_beam_indices, "finished_beam_indices", at::kInt},
      {a.finished_scores, "finished_scores", score}, {a.candidate_scores, "candidate_scores", score},
      {a.is_finished, "is_finished", at::kBool}, {a.improvable, "improvable", at::kBool},
      {a.stopped, "stopped", at::kBool},
  };
  for (const Typed& t : typed)
    TORCH_CHECK_TYPE(t.t.scalar_type() == t.type, op, t.name, " must be ", t.type, ", got ", t.t.scalar_type());
}

}  // namespace online_softmax
