// beam_search_step on the CPU in one call: the per-ISA fused top-k reads each beam's logits once,
// skipping the tokens the processors edit (banned, or repetition-penalized) so k stays
// num_candidates; the edited tokens' log-probabilities come out of the same pass, get their edit,
// and join the beam's candidates; then each batch entry merges its beams. The composite (csrc/common/
// beam_search_step.cpp) widened k by the number of edits and ran about thirty ATen ops a step,
// several times the fused read itself at decoding sizes.
//
// float32 and float64 logits with beam scores of the same dtype take this path; other dtype mixes
// go to the composite, which computes the same thing in the promoted dtype.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "common/beam_search_step.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {
namespace {

using Tensor = at::Tensor;

// Each row's edited tokens, sorted and distinct (-1 pads the front of a row), and whether each is
// banned (a token both banned and penalized is banned).
struct EditedTokens {
  int64_t width = 0;
  std::vector<int64_t> ids;     // rows x width
  std::vector<uint8_t> banned;  // rows x width
};

// A token list, checked, as a contiguous CPU int64 tensor (or undefined when absent or empty).
Tensor checked_list(const std::optional<Tensor>& t, const char* name, const Tensor& logits) {
  const char* op = "beam_search_step";
  if (!t.has_value()) return Tensor();
  check_token_list_layout(*t, name, logits, op);
  if (t->numel() == 0) return Tensor();
  Tensor list = t->contiguous();
  const auto [lo, hi] = std::minmax_element(list.const_data_ptr<int64_t>(),
                                            list.const_data_ptr<int64_t>() + list.numel());
  check_token_range(*lo, *hi, logits.size(1), name, op);
  return list;
}

EditedTokens edited_tokens(const Tensor& banned, const Tensor& penalized, int64_t rows) {
  EditedTokens e;
  const int64_t nb = banned.defined() ? banned.size(1) : 0, np = penalized.defined() ? penalized.size(1) : 0;
  e.width = nb + np;
  if (e.width == 0) return e;
  e.ids.assign(rows * e.width, -1);
  e.banned.assign(rows * e.width, 0);
  std::vector<std::pair<int64_t, uint8_t>> row;
  for (int64_t r = 0; r < rows; ++r) {
    row.clear();
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t t = banned.const_data_ptr<int64_t>()[r * nb + j];
      if (t >= 0) row.emplace_back(t, 1);
    }
    for (int64_t j = 0; j < np; ++j) {
      const int64_t t = penalized.const_data_ptr<int64_t>()[r * np + j];
      if (t >= 0) row.emplace_back(t, 0);
    }
    // By id, banned first among equal ids, so the first of each id carries the ban.
    std::sort(row.begin(), row.end(), [](const auto& a, const auto& b) {
      return a.first < b.first || (a.first == b.first && a.second > b.second);
    });
    const auto last = std::unique(row.begin(), row.end(), [](const auto& a, const auto& b) { return a.first == b.first; });
    const int64_t count = last - row.begin(), pad = e.width - count;
    for (int64_t j = 0; j < count; ++j) {
      e.ids[r * e.width + pad + j] = row[j].first;
      e.banned[r * e.width + pad + j] = row[j].second;
    }
  }
  return e;
}

// The library's top-k order on (score, flat index): larger first, NaN above every number, ties to
// the lower index.
template <typename T>
bool ranks_before(T a, int64_t ia, T b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

template <typename T>
struct Candidate {
  T score;
  int64_t index;  // token within a row, then beam * vocab + token within a batch entry
};

template <typename T>
void keep_best(std::vector<Candidate<T>>& c, int64_t n) {
  const auto before = [](const Candidate<T>& a, const Candidate<T>& b) {
    return ranks_before(a.score, a.index, b.score, b.index);
  };
  n = std::min<int64_t>(n, static_cast<int64_t>(c.size()));
  std::partial_sort(c.begin(), c.begin() + n, c.end(), before);
  c.resize(n);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> fused_step(const Tensor& logits, const Tensor& beam_scores, int64_t num_beams,
                                              int64_t num_candidates, double temperature, const EditedTokens& edits,
                                              double repetition_penalty) {
  const int64_t rows = logits.size(0), vocab = logits.size(1), batch = rows / num_beams;
  const int64_t k = std::min(num_candidates, vocab);
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::vector<T> values(rows * k), edited_values(rows * edits.width);
  std::vector<int64_t> tokens(rows * k);
  std::vector<A> m(rows), d(rows);
  kernels().softmax_topk(TopKCall{logits.scalar_type(), logits.const_data_ptr(), rows, vocab, k, temperature,
                                  /*log=*/true, values.data(), tokens.data(), m.data(), d.data(),
                                  edits.width > 0 ? edits.ids.data() : nullptr, edits.width, edited_values.data()});

  const auto opts = logits.options();
  Tensor out_scores = at::empty({batch, num_candidates}, opts);
  Tensor out_tokens = at::empty({batch, num_candidates}, opts.dtype(at::kLong));
  Tensor out_beams = at::empty({batch, num_candidates}, opts.dtype(at::kLong));
  const Tensor scores_in = beam_scores.contiguous();
  const T* bs = scores_in.const_data_ptr<T>();
  const T penalty = static_cast<T>(repetition_penalty);
  T* scores_out = out_scores.mutable_data_ptr<T>();
  int64_t* tokens_out = out_tokens.mutable_data_ptr<int64_t>();
  int64_t* beams_out = out_beams.mutable_data_ptr<int64_t>();
  std::vector<Candidate<T>> row, entry;
  for (int64_t b = 0; b < batch; ++b) {
    entry.clear();
    for (int64_t beam = 0; beam < num_beams; ++beam) {
      const int64_t r = b * num_beams + beam;
      row.clear();
      for (int64_t j = 0; j < k; ++j) {
        if (tokens[r * k + j] >= 0) row.push_back({values[r * k + j], tokens[r * k + j]});
      }
      // Transformers' order: the penalty first, then the bans.
      for (int64_t j = 0; j < edits.width; ++j) {
        const int64_t t = edits.ids[r * edits.width + j];
        if (t < 0) continue;
        const T lp = edited_values[r * edits.width + j];
        const T edited = edits.banned[r * edits.width + j] ? -std::numeric_limits<T>::infinity()
                         : lp < 0                          ? lp * penalty
                                                           : lp / penalty;
        row.push_back({edited, t});
      }
      // The beam's own best k after the edits; then the beam score joins them.
      keep_best(row, k);
      for (const auto& c : row) entry.push_back({c.score + bs[b * num_beams + beam], beam * vocab + c.index});
    }
    keep_best(entry, num_candidates);
    // num_candidates <= num_beams * vocab and every row lists its best min(k, vocab) tokens.
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(entry.size()) == num_candidates);
    for (int64_t j = 0; j < num_candidates; ++j) {
      scores_out[b * num_candidates + j] = entry[j].score;
      tokens_out[b * num_candidates + j] = entry[j].index % vocab;
      beams_out[b * num_candidates + j] = entry[j].index / vocab;
    }
  }
  return {out_scores, out_tokens, out_beams};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> beam_search_step(const Tensor& logits, const Tensor& beam_scores, int64_t num_beams,
                                                    int64_t num_candidates, double temperature,
                                                    const std::optional<Tensor>& banned_tokens,
                                                    const std::optional<Tensor>& penalized_tokens,
                                                    double repetition_penalty) {
  const at::ScalarType dtype = logits.scalar_type();
  const bool fused = (dtype == at::kFloat || dtype == at::kDouble) && beam_scores.scalar_type() == dtype &&
                     logits.device().is_cpu() && beam_scores.device().is_cpu();
  if (!fused) {
    return beam_search_step_composite(logits, beam_scores, num_beams, num_candidates, temperature, banned_tokens,
                                      penalized_tokens, repetition_penalty);
  }
  check_beam_search_step(logits, beam_scores, num_beams, num_candidates, temperature, repetition_penalty);
  const Tensor banned = checked_list(banned_tokens, "banned_tokens", logits);
  const Tensor penalized = checked_list(penalized_tokens, "penalized_tokens", logits);
  const int64_t batch = beam_scores.size(0);
  if (batch == 0) {
    return {at::empty({0, num_candidates}, logits.options()), at::empty({0, num_candidates}, logits.options().dtype(at::kLong)),
            at::empty({0, num_candidates}, logits.options().dtype(at::kLong))};
  }
  const EditedTokens edits = edited_tokens(banned, repetition_penalty != 1.0 ? penalized : Tensor(), logits.size(0));
  const Tensor x = logits.contiguous();
  if (dtype == at::kDouble) {
    return fused_step<double>(x, beam_scores, num_beams, num_candidates, temperature, edits, repetition_penalty);
  }
  return fused_step<float>(x, beam_scores, num_beams, num_candidates, temperature, edits, repetition_penalty);
}

}  // namespace online_softmax::cpu
