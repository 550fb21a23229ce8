// The CUDA backend: one TORCH_LIBRARY_IMPL block for every op.
#include <torch/library.h>

#include "cuda/kernels.h"

TORCH_LIBRARY_IMPL(online_softmax, CUDA, m) {
  m.impl("forward", &online_softmax::cuda::forward);
  m.impl("masked_forward", &online_softmax::cuda::masked_forward);
  m.impl("stats", &online_softmax::cuda::stats);
  m.impl("backward", &online_softmax::cuda::backward);
  m.impl("backward_", &online_softmax::cuda::backward_);
  m.impl("softmax_topk", &online_softmax::cuda::softmax_topk);
  m.impl("softmax_topk_backward", &online_softmax::cuda::softmax_topk_backward);
  m.impl("sample_categorical", &online_softmax::cuda::sample_categorical);
  m.impl("top_p_threshold", &online_softmax::cuda::top_p_threshold);
  m.impl("rejection_sample", &online_softmax::cuda::rejection_sample);
  m.impl("token_logprobs", &online_softmax::cuda::token_logprobs);
  m.impl("cross_entropy_backward", &online_softmax::cuda::cross_entropy_backward);
  m.impl("cross_entropy_backward_", &online_softmax::cuda::cross_entropy_backward_);
  m.impl("token_logprobs_backward", &online_softmax::cuda::token_logprobs_backward);
  m.impl("token_logprobs_backward_", &online_softmax::cuda::token_logprobs_backward_);
  m.impl("distillation_forward", &online_softmax::cuda::distillation_forward);
  m.impl("distillation_backward", &online_softmax::cuda::distillation_backward);
  m.impl("distillation_backward_", &online_softmax::cuda::distillation_backward_);
}
