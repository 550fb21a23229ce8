// The cross_entropy_backward op (and its in-place form) on the CPU: checks (shared with CUDA), the output, then the
// kernel of the capability in use (csrc/cpu/kernels/cross_entropy.h, through dispatch.h).
#include <ATen/ATen.h>

#include "common/op_args.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

namespace {

void run_kernel(const CrossEntropyBackwardArgs& a, void* out) {
  if (a.rows == 0 || a.n == 0) return;
  kernels().cross_entropy_backward(CrossEntropyBackwardCall{
      a.x.scalar_type(), a.x.const_data_ptr(), a.rows, a.n, a.max.const_data_ptr(), a.sumexp.const_data_ptr(),
      a.target.const_data_ptr<int64_t>(), a.p_scale.const_data_ptr(), a.target_scale.const_data_ptr(),
      a.smooth_scale ? a.smooth_scale->const_data_ptr() : nullptr, a.weight ? a.weight->const_data_ptr() : nullptr,
      out});
}

}  // namespace

at::Tensor cross_entropy_backward(const at::Tensor& x, const at::Tensor& max, const at::Tensor& sumexp,
                                  const at::Tensor& target,
                                  const at::Tensor& p_scale, const at::Tensor& target_scale,
                                  const std::optional<at::Tensor>& smooth_scale,
                                  const std::optional<at::Tensor>& weight) {
  const CrossEntropyBackwardArgs a =
      cross_entropy_backward_args(x, max, sumexp, target, p_scale, target_scale, smooth_scale, weight);
  // Plain pages, not empty_output's huge-page advice: in a training step the gradient follows the
  // frees of other logits-sized buffers, and with THP defrag in "madvise" mode the advice then often
  // stalled in compaction. 4096 x 32000 float32 forward + backward, interleaved with torch eager and
  // torch.compile (2-core Zen 4): 556 ms median with the advice, 342 ms without; 16384 x 32000
  // bfloat16: 1400 ms and 968 ms.
  at::Tensor out = at::empty(a.x.sizes(), a.x.options());
  run_kernel(a, out.mutable_data_ptr());
  return out;
}

void cross_entropy_backward_(const at::Tensor& x, const at::Tensor& max, const at::Tensor& sumexp,
                             const at::Tensor& target,
                             const at::Tensor& p_scale, const at::Tensor& target_scale,
                             const std::optional<at::Tensor>& smooth_scale, const std::optional<at::Tensor>& weight) {
  const CrossEntropyBackwardArgs a =
      cross_entropy_backward_args(x, max, sumexp, target, p_scale, target_scale, smooth_scale, weight,
                                  /*in_place=*/true);
  run_kernel(a, x.mutable_data_ptr());
}

}  // namespace online_softmax::cpu
