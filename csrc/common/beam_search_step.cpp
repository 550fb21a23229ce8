// beam_search_step for every backend (CompositeExplicitAutograd): the fused top-k of each beam's
// log-softmax (the CPU or CUDA kernel, through the dispatcher) reads the logits once; then each
// batch entry merges its beams' num_beams * k candidates, which is tiny next to the logits.
//
// Why per-beam top-k suffices: a beam's score adds one constant to all of its tokens, so the
// batch's best num_candidates are among each beam's own best num_candidates.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"

namespace online_softmax {
namespace {

using Tensor = at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor> call_softmax_topk(const Tensor& x, int64_t k, bool log, double t) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("online_softmax::softmax_topk", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, int64_t, int64_t, bool, double)>();
  return op.call(x, k, -1, log, t);
}

std::tuple<Tensor, Tensor, Tensor> beam_search_step(const Tensor& logits, const Tensor& beam_scores, int64_t num_beams,
                                                    int64_t num_candidates, double temperature) {
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
  const at::ScalarType out_dtype = at::result_type(logits, beam_scores);
  const auto long_opts = logits.options().dtype(at::kLong);
  if (batch == 0) {
    return {at::empty({0, num_candidates}, logits.options().dtype(out_dtype)), at::empty({0, num_candidates}, long_opts),
            at::empty({0, num_candidates}, long_opts)};
  }
  const int64_t k = std::min(num_candidates, vocab);
  auto [values, tokens, m, d] = call_softmax_topk(logits, k, /*log=*/true, temperature);
  // Candidates of batch entry b: (beam score + log-prob, flat index beam * vocab + token).
  const Tensor scores = (values.to(out_dtype).view({batch, num_beams, k}) + beam_scores.to(out_dtype).unsqueeze(-1))
                            .view({batch, num_beams * k});
  const Tensor beam_base = at::arange(num_beams, long_opts).mul_(vocab).view({1, num_beams, 1});
  const Tensor flat = (tokens.view({batch, num_beams, k}) + beam_base).view({batch, num_beams * k});
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

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, CompositeExplicitAutograd, m) {
  m.impl("beam_search_step", &online_softmax::beam_search_step);
}
