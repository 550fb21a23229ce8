// The entry points of one capability's kernels, as dispatch.cpp finds them:
// online_softmax::cpu::<CPU_CAPABILITY>::kKernels. Included once, by csrc/cpu/isa/<capability>.cpp.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include "cpu/kernels/softmax.h"
#include "cpu/kernels/softmax_backward.h"
#include "cpu/kernels/softmax_topk.h"
#include "cpu/kernels/sample.h"
#include "cpu/kernels/cross_entropy.h"
#include "cpu/kernels/masked_softmax.h"
#include "cpu/kernels/rejection_sample.h"
#include "cpu/kernels/token_logprobs.h"
#include "cpu/kernels/token_logprobs_backward.h"
#include "cpu/kernels/distillation.h"

#define ONLINE_SOFTMAX_CPU_STR2(x) #x
#define ONLINE_SOFTMAX_CPU_STR(x) ONLINE_SOFTMAX_CPU_STR2(x)

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {

extern const KernelTable kKernels;
const KernelTable kKernels = {ONLINE_SOFTMAX_CPU_STR(CPU_CAPABILITY), &forward_entry, &stats_entry, &backward_entry,
                              &topk_entry, &topk_backward_entry, &sample_entry,
                              &top_p_entry, &cross_entropy_backward_entry,
                              &masked_forward_entry, &rejection_entry, &token_logprobs_entry,
                              &token_logprobs_backward_entry,
                              &distillation_forward_entry, &distillation_backward_entry};

}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
