// The CPU backend: one TORCH_LIBRARY_IMPL block for every op.
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY_IMPL(online_softmax, CPU, m) {
  m.impl("forward", &online_softmax::cpu::forward);
  m.impl("masked_forward", &online_softmax::cpu::masked_forward);
  m.impl("stats", &online_softmax::cpu::stats);
  m.impl("backward", &online_softmax::cpu::backward);
  m.impl("backward_", &online_softmax::cpu::backward_);
  m.impl("softmax_topk", &online_softmax::cpu::softmax_topk);
  m.impl("softmax_topk_backward", &online_softmax::cpu::softmax_topk_backward);
  m.impl("sample_categorical", &online_softmax::cpu::sample_categorical);
  m.impl("top_p_threshold", &online_softmax::cpu::top_p_threshold);
  m.impl("rejection_sample", &online_softmax::cpu::rejection_sample);
  m.impl("token_logprobs", &online_softmax::cpu::token_logprobs);
  m.impl("cross_entropy_backward", &online_softmax::cpu::cross_entropy_backward);
  m.impl("cross_entropy_backward_", &online_softmax::cpu::cross_entropy_backward_);
  m.impl("token_logprobs_backward", &online_softmax::cpu::token_logprobs_backward);
  m.impl("token_logprobs_backward_", &online_softmax::cpu::token_logprobs_backward_);
  m.impl("distillation_forward", &online_softmax::cpu::distillation_forward);
  m.impl("distillation_backward", &online_softmax::cpu::distillation_backward);
  m.impl("distillation_backward_", &online_softmax::cpu::distillation_backward_);
  m.impl("beam_search_step", &online_softmax::cpu::beam_search_step);
  m.impl("ngram_banned_tokens", &online_softmax::cpu::ngram_banned_tokens);
  m.impl("beam_search_advance", &online_softmax::cpu::beam_search_advance);
}
