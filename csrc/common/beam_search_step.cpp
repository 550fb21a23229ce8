// beam_search_step for every backend without a kernel of its own (CompositeExplicitAutograd; the
// CPU has one, csrc/cpu/beam_search_step.cpp): the fused top-k of each beam's
// log-softmax (the CPU or CUDA kernel, through the dispatcher) reads the logits once; then each
// batch entry merges its beams' num_beams * k candidates, which is tiny next to the logits.
//
// Why per-beam top-k suffices: a beam's score adds one constant to all of its tokens, so the
// batch's best num_candidates are among each beam's own best num_candidates.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "common/beam_search_step.h"
#include "common/checks.h"
#include "common/op_calls.h"

namespace online_softmax {
namespace {

using Tensor = at::Tensor;

// Checks a token list and returns the most real (non-padding) entries in one row; one host sync.
int64_t check_token_list(const c10::optional<Tensor>& t, const char* name, const Tensor& logits, const char* op) {
  if (!t.has_value()) return 0;
  const Tensor& x = *t;
  check_token_list_layout(x, name, logits, op);
  if (x.numel() == 0) return 0;
  const Tensor facts = at::stack({x.min(), x.max(), x.ge(0).sum(1).max()}).cpu();
  check_token_range(facts[0].item<int64_t>(), facts[1].item<int64_t>(), logits.size(1), name, op);
  return facts[2].item<int64_t>();
}

// Whether each entry of query (rows, q) occurs in the sorted rows of set (rows, s); -1 never does.
Tensor member_of(const Tensor& sorted_set, const Tensor& query) {
  if (sorted_set.size(1) == 0) return at::zeros_like(query, query.options().dtype(at::kBool));
  const Tensor pos = at::searchsorted(sorted_set, query).clamp_max_(sorted_set.size(1) - 1);
  return sorted_set.gather(1, pos).eq(query).logical_and_(query.ge(0));
}

// The post-normalization edits transformers' processors make to log-probabilities, in their order:
// the repetition penalty (lp * p where lp < 0, else lp / p), then bans (-inf).
struct RowEdits {
  Tensor banned;     // (rows, nb) sorted, -1 padding first
  Tensor penalized;  // (rows, np) sorted
  double penalty;
  Tensor apply(const Tensor& lp, const Tensor& tokens) const {
    Tensor out = lp;
    if (penalized.size(1) > 0 && penalty != 1.0) {
      const Tensor scaled = at::where(lp.lt(0), lp * penalty, lp / penalty);
      out = at::where(member_of(penalized, tokens), scaled, out);
    }
    if (banned.size(1) > 0) out = out.masked_fill(member_of(banned, tokens), -std::numeric_limits<double>::infinity());
    return out;
  }
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor> beam_search_step_composite(const Tensor& logits, const Tensor& beam_scores,
                                                              int64_t num_beams, int64_t num_candidates,
                                                              double temperature,
                                                              const c10::optional<Tensor>& banned_tokens,
                                                              const c10::optional<Tensor>& penalized_tokens,
                                                              double repetition_penalty) {
  const char* op = "beam_search_step";
  check_beam_search_step(logits, beam_scores, num_beams, num_candidates, temperature, repetition_penalty);
  const int64_t batch = beam_scores.size(0), vocab = logits.size(1);
  const int64_t most_banned = check_token_list(banned_tokens, "banned_tokens", logits, op);
  int64_t most_penalized = check_token_list(penalized_tokens, "penalized_tokens", logits, op);
  if (repetition_penalty == 1.0) most_penalized = 0;
  const at::ScalarType out_dtype = at::result_type(logits, beam_scores);
  const auto long_opts = logits.options().dtype(at::kLong);
  if (batch == 0) {
    return {at::empty({0, num_candidates}, logits.options().dtype(out_dtype)), at::empty({0, num_candidates}, long_opts),
            at::empty({0, num_candidates}, long_opts)};
  }
  const int64_t rows = logits.size(0);
  auto sorted_or_empty = [&](const c10::optional<Tensor>& t, int64_t real) {
    return real > 0 ? std::get<0>(t->sort(-1)) : at::empty({rows, 0}, long_opts);
  };
  const RowEdits edits{sorted_or_empty(banned_tokens, most_banned), sorted_or_empty(penalized_tokens, most_penalized),
                       repetition_penalty};
  const int64_t num_edits = most_banned + most_penalized;

  // Each row's best k after the edits are among its best k + num_edits before them (at least k of
  // those are unedited and outrank every unlisted unedited token), plus, when a penalty below 1 can
  // lift a token from outside, the edited tokens themselves. So the logits are still read once.
  const int64_t k = std::min(num_candidates, vocab);
  const int64_t listed = std::min(vocab, k + num_edits);
  auto [values, tokens, m, d] = call_softmax_topk(logits, listed, /*dim=*/-1, /*log=*/true, temperature);
  Tensor row_scores = values.to(out_dtype);
  Tensor row_tokens = tokens;
  if (num_edits > 0) row_scores = edits.apply(row_scores, tokens);
  if (most_penalized > 0 && repetition_penalty < 1.0 && listed < vocab) {
    // Penalized tokens the top list missed, once each, with log-probabilities from the row's state.
    const Tensor& all = edits.penalized;
    const int64_t n = all.size(1);
    const Tensor repeats = all.narrow(1, 1, n - 1).eq(all.narrow(1, 0, n - 1));
    const Tensor first = all.ge(0).logical_and_(
        at::cat({at::zeros({rows, 1}, repeats.options()), repeats}, 1).logical_not_());
    const Tensor missed = first.logical_and_(member_of(std::get<0>(tokens.sort(-1)), all).logical_not_());
    const Tensor lp = (logits.gather(1, all.clamp_min(0)).to(at::kDouble) / temperature -
                       m.to(at::kDouble).unsqueeze(1) - d.to(at::kDouble).log().unsqueeze(1)).to(out_dtype);
    const Tensor extra = edits.apply(lp, all).masked_fill(missed.logical_not(), -std::numeric_limits<double>::infinity());
    // A token id no flat index reaches sorts after every real candidate and is never selected:
    // each batch entry has num_beams * listed >= num_candidates real ones.
    row_scores = at::cat({row_scores, extra}, 1);
    row_tokens = at::cat({tokens, at::where(missed, all, at::full_like(all, num_beams * vocab))}, 1);
  }
  const int64_t c = row_scores.size(1);
  // Candidates of batch entry b: (beam score + log-prob, flat index beam * vocab + token).
  const Tensor scores = (row_scores.view({batch, num_beams, c}) + beam_scores.to(out_dtype).unsqueeze(-1))
                            .view({batch, num_beams * c});
  const Tensor beam_base = at::arange(num_beams, long_opts).mul_(vocab).view({1, num_beams, 1});
  const Tensor flat = (row_tokens.view({batch, num_beams, c}) + beam_base).view({batch, num_beams * c});
  // The library's top-k order: larger first, NaN first, ties to the lower flat index: order the
  // candidates by flat index, then sort by score with a stable sort.
  const Tensor by_index = flat.argsort(/*stable=*/true, /*dim=*/-1, /*descending=*/false);
  const Tensor s_sorted = scores.gather(-1, by_index);
  const Tensor f_sorted = flat.gather(-1, by_index);
  auto [best, order] = s_sorted.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true);
  const Tensor best_flat = f_sorted.gather(-1, order.narrow(-1, 0, num_candidates));
  return {best.narrow(-1, 0, num_candidates).contiguous(), best_flat.remainder(vocab),
          best_flat.div(vocab, "floor")};
}

}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, CompositeExplicitAutograd, m) {
  m.impl("beam_search_step", &online_softmax::beam_search_step_composite);
}
