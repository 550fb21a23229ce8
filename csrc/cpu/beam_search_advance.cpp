// beam_search_advance on the CPU: the gathers, the score terms and the stopping test as plain loops
// over a few hundred integers, in one call. The composite (csrc/common/beam_search_advance.cpp) is
// about twenty-five ATen ops a step; after a model's forward has evicted the caches each costs
// ~15 us, several times the fused beam step itself at decoding sizes. The two selections still go
// through at::topk, the function transformers calls, so that equal scores come out in its order.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/beam_search_advance.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {
namespace {

using Tensor = at::Tensor;

// x + (on ? -1e9 : -0.0), as `x + mask.float() * -1e9` rounds it (-0.0 keeps x's sign of zero).
template <typename scalar_t>
scalar_t plus_off(scalar_t x, bool on) {
  return x + static_cast<scalar_t>(on ? kBeamSlotOff : -0.0f);
}

// The row's minimum, NaN if it holds one (torch.min).
template <typename scalar_t>
scalar_t row_min(const scalar_t* v, int64_t n) {
  scalar_t m = v[0];
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(v[j])) return v[j];
    m = std::min(m, v[j]);
  }
  return m;
}

template <typename scalar_t>
void advance(const BeamSearchAdvanceArgs& a, const Tensor& running_idx_in, const Tensor& finished_in,
             const Tensor& finished_idx_in, const Tensor& candidates_in, const std::vector<Tensor>& out) {
  const int64_t batch = a.running.size(0), nb = a.running.size(1), len = a.running.size(2);
  const int64_t keep = a.candidates.size(1), gen = len - a.prompt_len, step = a.cur_len - a.prompt_len;
  const auto stop_when_full = static_cast<EarlyStopping>(a.early_stopping) == EarlyStopping::kTrue;
  const Tensor cand_scores_t = a.candidate_scores.contiguous(), beams_t = a.candidate_beams.contiguous();
  const Tensor stopped_t = a.stopped.contiguous(), finished_scores_t = a.finished_scores.contiguous();
  const Tensor is_finished_t = a.is_finished.contiguous(), improvable_t = a.improvable.contiguous();
  const scalar_t* cand_scores = cand_scores_t.const_data_ptr<scalar_t>();
  const int64_t* cand_beams = beams_t.const_data_ptr<int64_t>();
  const bool* stopped = stopped_t.const_data_ptr<bool>();
  const int64_t* cand = candidates_in.const_data_ptr<int64_t>();
  const int32_t* running_idx = running_idx_in.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < batch * keep; ++i)
    TORCH_CHECK_VALUE(cand_beams[i] >= 0 && cand_beams[i] < nb, "online_softmax.beam_search_advance: "
                      "candidate_beams must be in [0, num_beams = ", nb, "), got ", cand_beams[i]);

  // Each candidate's beam indices: its parent's, then the parent's flat index at this step.
  std::vector<int32_t> cand_idx(batch * keep * gen);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t k = 0; k < keep; ++k) {
      const int64_t parent = cand_beams[b * keep + k];
      int32_t* dst = cand_idx.data() + (b * keep + k) * gen;
      std::memcpy(dst, running_idx + (b * nb + parent) * gen, gen * sizeof(int32_t));
      dst[step] = static_cast<int32_t>(b * nb + parent);
    }

  // The best num_beams candidates that did not stop run on.
  Tensor open_t = at::empty({batch, keep}, a.candidate_scores.options());
  scalar_t* open = open_t.mutable_data_ptr<scalar_t>();
  for (int64_t i = 0; i < batch * keep; ++i) open[i] = plus_off(cand_scores[i], stopped[i]);
  const Tensor next_t = std::get<1>(at::topk(open_t, nb)).contiguous();
  const int64_t* next = next_t.const_data_ptr<int64_t>();
  int64_t* run_out = out[0].mutable_data_ptr<int64_t>();
  scalar_t* run_scores_out = out[1].mutable_data_ptr<scalar_t>();
  int32_t* run_idx_out = out[2].mutable_data_ptr<int32_t>();
  int64_t* beam_idx = out[8].mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t k = next[b * nb + j], row = b * nb + j;
      std::memcpy(run_out + row * len, cand + (b * keep + k) * len, len * sizeof(int64_t));
      run_scores_out[row] = open[b * keep + k];
      std::memcpy(run_idx_out + row * gen, cand_idx.data() + (b * keep + k) * gen, gen * sizeof(int32_t));
      beam_idx[row] = run_idx_out[row * gen + step];
    }

  // Those among the top num_beams that stopped join the finished hypotheses, scored by length.
  const scalar_t* fin_scores = finished_scores_t.const_data_ptr<scalar_t>();
  const bool* is_fin = is_finished_t.const_data_ptr<bool>();
  const bool* improvable = improvable_t.const_data_ptr<bool>();
  int64_t* fin_out = out[3].mutable_data_ptr<int64_t>();
  scalar_t* fin_scores_out = out[4].mutable_data_ptr<scalar_t>();
  int32_t* fin_idx_out = out[5].mutable_data_ptr<int32_t>();
  bool* is_fin_out = out[6].mutable_data_ptr<bool>();
  const int64_t* fin = finished_in.const_data_ptr<int64_t>();
  const int32_t* fin_idx = finished_idx_in.const_data_ptr<int32_t>();
  bool any_done = false;
  for (int64_t b = 0; b < batch && !any_done; ++b)
    for (int64_t k = 0; k < nb; ++k) any_done = any_done || stopped[b * keep + k];
  if (!any_done) {  // nothing finished: the merge would only reorder empty slots, which are never returned
    std::memcpy(fin_out, fin, batch * nb * len * sizeof(int64_t));
    std::memcpy(fin_scores_out, fin_scores, batch * nb * sizeof(scalar_t));
    std::memcpy(fin_idx_out, fin_idx, batch * nb * gen * sizeof(int32_t));
    std::memcpy(is_fin_out, is_fin, batch * nb * sizeof(bool));
  } else {
    // The finished slots, then the candidates, as one row of merged scores per entry.
    const auto divisor = static_cast<scalar_t>(std::pow(static_cast<double>(step + 1), a.length_penalty));
    Tensor merged_t = at::empty({batch, nb + keep}, a.candidate_scores.options());
    scalar_t* merged = merged_t.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      bool full = stop_when_full;
      for (int64_t j = 0; j < nb; ++j) full = full && is_fin[b * nb + j];
      std::memcpy(merged + b * (nb + keep), fin_scores + b * nb, nb * sizeof(scalar_t));
      for (int64_t k = 0; k < keep; ++k) {
        const bool done = k < nb && stopped[b * keep + k];
        scalar_t s = cand_scores[b * keep + k] / divisor;
        s = plus_off(plus_off(plus_off(s, full), !improvable[b]), !done);
        merged[b * (nb + keep) + nb + k] = s;
      }
    }
    const Tensor best_t = std::get<1>(at::topk(merged_t, nb)).contiguous();
    const int64_t* best = best_t.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t m = best[b * nb + j], row = b * nb + j;
        fin_scores_out[row] = merged[b * (nb + keep) + m];
        if (m < nb) {  // a finished slot keeps its place in the ranking
          std::memcpy(fin_out + row * len, fin + (b * nb + m) * len, len * sizeof(int64_t));
          std::memcpy(fin_idx_out + row * gen, fin_idx + (b * nb + m) * gen, gen * sizeof(int32_t));
          is_fin_out[row] = is_fin[b * nb + m];
        } else {
          const int64_t k = m - nb;
          std::memcpy(fin_out + row * len, cand + (b * keep + k) * len, len * sizeof(int64_t));
          std::memcpy(fin_idx_out + row * gen, cand_idx.data() + (b * keep + k) * gen, gen * sizeof(int32_t));
          is_fin_out[row] = k < nb && stopped[b * keep + k];
        }
      }
  }

  // Whether any entry can still change: a running beam that can beat the worst finished
  // hypothesis, at the new length or (early_stopping "never") at the longest possible one.
  const bool never = static_cast<EarlyStopping>(a.early_stopping) == EarlyStopping::kNever;
  const int64_t best_len = never && a.length_penalty > 0.0 ? gen : step + 1;
  const auto best_divisor = static_cast<scalar_t>(std::pow(static_cast<double>(best_len), a.length_penalty));
  bool* improvable_out = out[7].mutable_data_ptr<bool>();
  bool any_improvable = false, all_finished = true, all_stopped = true;
  for (int64_t b = 0; b < batch; ++b) {
    const scalar_t best_possible = run_scores_out[b * nb] / best_divisor;
    const scalar_t worst = row_min(fin_scores_out + b * nb, nb);
    bool beats = false;
    for (int64_t j = 0; j < nb; ++j) {
      beats = beats || best_possible > (is_fin_out[b * nb + j] ? worst : static_cast<scalar_t>(kBeamSlotOff));
      all_finished = all_finished && is_fin_out[b * nb + j];
    }
    improvable_out[b] = improvable[b] && beats;
    any_improvable = any_improvable || improvable_out[b];
  }
  for (int64_t i = 0; i < batch * keep; ++i) all_stopped = all_stopped && stopped[i];
  *out[9].mutable_data_ptr<bool>() = any_improvable && !(stop_when_full && all_finished) && !all_stopped;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> beam_search_advance(
    const Tensor& running, const Tensor& running_scores, const Tensor& running_beam_indices, const Tensor& finished,
    const Tensor& finished_scores, const Tensor& finished_beam_indices, const Tensor& is_finished,
    const Tensor& improvable, const Tensor& candidates, const Tensor& candidate_scores, const Tensor& candidate_beams,
    const Tensor& stopped, int64_t cur_len, int64_t prompt_len, double length_penalty, int64_t early_stopping) {
  const BeamSearchAdvanceArgs args{running, running_scores, running_beam_indices, finished, finished_scores,
                                   finished_beam_indices, is_finished, improvable, candidates, candidate_scores,
                                   candidate_beams, stopped, cur_len, prompt_len, length_penalty, early_stopping};
  check_beam_search_advance(args);
  std::vector<Tensor> out = {
      at::empty_like(running, at::MemoryFormat::Contiguous),
      at::empty_like(running_scores, at::MemoryFormat::Contiguous),
      at::empty_like(running_beam_indices, at::MemoryFormat::Contiguous),
      at::empty_like(finished, at::MemoryFormat::Contiguous),
      at::empty_like(finished_scores, at::MemoryFormat::Contiguous),
      at::empty_like(finished_beam_indices, at::MemoryFormat::Contiguous),
      at::empty_like(is_finished, at::MemoryFormat::Contiguous),
      at::empty_like(improvable, at::MemoryFormat::Contiguous),
      at::empty({running.size(0) * running.size(1)}, running.options()),
      at::empty({}, is_finished.options()),
  };
  AT_DISPATCH_FLOATING_TYPES(running_scores.scalar_type(), "beam_search_advance", [&] {
    advance<scalar_t>(args, running_beam_indices.contiguous(), finished.contiguous(),
                      finished_beam_indices.contiguous(), candidates.contiguous(), out);
  });
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8], out[9]};
}

}  // namespace online_softmax::cpu
