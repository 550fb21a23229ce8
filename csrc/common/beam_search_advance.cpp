// beam_search_advance for every backend without a kernel of its own (CompositeExplicitAutograd;
// the CPU has one, csrc/cpu/beam_search_advance.cpp), in the tensor ops of transformers'
// vectorized beam search (5.x), term for term, so its selections (torch.topk) and its float
// arithmetic are the same.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "common/beam_search_advance.h"

namespace online_softmax {
namespace {

using Tensor = at::Tensor;
using Result = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// t[b, idx[b, j], ...] for every b and j.
Tensor gather_beams(const Tensor& t, const Tensor& idx) {
  Tensor i = idx;
  while (i.dim() < t.dim()) i = i.unsqueeze(-1);
  return at::take_along_dim(t, i, 1);
}

// 1.0 where a bool tensor is true, as the -1e9 terms' float factor.
Tensor as_float(const Tensor& mask) { return mask.to(at::kFloat); }

Result beam_search_advance_composite(
    const Tensor& running, const Tensor& running_scores, const Tensor& running_beam_indices, const Tensor& finished,
    const Tensor& finished_scores, const Tensor& finished_beam_indices, const Tensor& is_finished,
    const Tensor& improvable, const Tensor& candidates, const Tensor& candidate_scores, const Tensor& candidate_beams,
    const Tensor& stopped, int64_t cur_len, int64_t prompt_len, double length_penalty, int64_t early_stopping) {
  check_beam_search_advance({running, running_scores, running_beam_indices, finished, finished_scores,
                             finished_beam_indices, is_finished, improvable, candidates, candidate_scores,
                             candidate_beams, stopped, cur_len, prompt_len, length_penalty, early_stopping});
  const double off = kBeamSlotOff;
  const int64_t batch = running.size(0), nb = running.size(1), max_length = running.size(2);
  const int64_t keep = candidates.size(1), step = cur_len - prompt_len;
  const bool stop_when_full = early_stopping == static_cast<int64_t>(EarlyStopping::kTrue);

  // Each candidate's beam indices: its parent's, then the parent's flat index at this step.
  Tensor cand_idx = gather_beams(running_beam_indices, candidate_beams);
  const Tensor offsets = at::arange(batch, candidate_beams.options()).unsqueeze(1) * nb;
  cand_idx.select(2, step).copy_((candidate_beams + offsets).to(cand_idx.scalar_type()));

  // The best num_beams candidates that did not stop run on.
  const Tensor open = candidate_scores + as_float(stopped) * off;
  const Tensor next = std::get<1>(at::topk(open, nb));
  const Tensor new_running = gather_beams(candidates, next);
  const Tensor new_running_scores = gather_beams(open, next);
  const Tensor new_running_idx = gather_beams(cand_idx, next);
  const Tensor beam_idx = new_running_idx.select(2, step).reshape(-1).to(at::kLong);

  // Those among the top num_beams that stopped join the finished hypotheses, scored by length.
  const Tensor just_done = stopped & (at::arange(keep, stopped.options().dtype(at::kLong)) < nb).unsqueeze(0);
  Tensor new_finished, new_finished_scores, new_is_finished, new_finished_idx;
  if (just_done.any().item<bool>()) {
    const double gen_len = static_cast<double>(cur_len + 1 - prompt_len);
    const Tensor full = stop_when_full ? is_finished.all(-1, true) : at::zeros_like(improvable);
    const Tensor done = candidate_scores / std::pow(gen_len, length_penalty) + as_float(full) * off +
                        as_float(improvable.logical_not()) * off + as_float(just_done.logical_not()) * off;
    const Tensor best = std::get<1>(at::topk(at::cat({finished_scores, done}, 1), nb));
    new_finished = gather_beams(at::cat({finished, candidates}, 1), best);
    new_finished_scores = gather_beams(at::cat({finished_scores, done}, 1), best);
    new_is_finished = gather_beams(at::cat({is_finished, just_done}, 1), best);
    new_finished_idx = gather_beams(at::cat({finished_beam_indices, cand_idx}, 1), best);
  } else {  // nothing finished: the merge would only reorder empty slots, which are never returned
    new_finished = finished.clone();
    new_finished_scores = finished_scores.clone();
    new_is_finished = is_finished.clone();
    new_finished_idx = finished_beam_indices.clone();
  }

  // Whether any entry can still change: a running beam that can beat the worst finished
  // hypothesis, at the new length or (early_stopping "never") at the longest possible one.
  const int64_t best_len = early_stopping == static_cast<int64_t>(EarlyStopping::kNever) && length_penalty > 0.0
                               ? max_length - prompt_len
                               : cur_len + 1 - prompt_len;
  const Tensor best_possible =
      new_running_scores.narrow(1, 0, 1) / std::pow(static_cast<double>(best_len), length_penalty);
  const Tensor worst_done =
      at::where(new_is_finished, std::get<0>(new_finished_scores.min(1, true)), at::scalar_tensor(off,
                best_possible.options()));
  const Tensor new_improvable = improvable & (best_possible > worst_done).any(-1, true);
  Tensor all_full = new_is_finished.all();
  if (!stop_when_full) all_full = at::zeros_like(all_full);
  const Tensor keep_going = new_improvable.any() & all_full.logical_not() & stopped.all().logical_not();
  return {new_running, new_running_scores, new_running_idx, new_finished, new_finished_scores,
          new_finished_idx, new_is_finished, new_improvable, beam_idx, keep_going};
}

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, CompositeExplicitAutograd, m) {
  m.impl("beam_search_advance", &online_softmax::beam_search_advance_composite);
}
