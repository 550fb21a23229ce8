// Runtime ISA dispatch of the CPU kernels, the way ATen dispatches its own: the kernel sources
// (csrc/cpu/kernels/) are compiled once per capability (csrc/cpu/isa/: DEFAULT, AVX2, AVX512 on
// x86-64; DEFAULT elsewhere), each into a namespace of its own, and one table of entry points is
// chosen at first use: the capability torch itself runs (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY), or the best compiled one below it. One build therefore runs on any x86-64
// CPU and matches torch's vector width on each.
//
// The op layer (csrc/cpu/*.cpp: checks, allocation, layout) is compiled once, without ISA flags,
// and calls the kernels only through this table, with raw pointers.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/row_layout.h"

namespace online_softmax::cpu {

struct ForwardCall {
  at::ScalarType x_dtype, y_dtype;  // y_dtype: x_dtype, or float32 for float16/bfloat16 x
  const void* x;
  void* y;
  RowLayout g;
  double temperature;
  bool log;
};

// softmax / log_softmax over the last dim of contiguous rows (rows x n) of x * scale, with an
// optional mask read per row through broadcast strides, and an optional causal limit.
struct MaskedForwardCall {
  at::ScalarType x_dtype, y_dtype;  // y_dtype: x_dtype, or float32 for float16/bfloat16 x
  const void* x;
  void* y;
  int64_t rows, n;
  double scale;
  bool log;
  // mask_kind 0: none; 1: bool, true takes part; 2: additive, in the accumulation type (float32,
  // float64 for float64 x). Row r's mask is at mask + sum_k idx_k(r) * row_strides[k], where
  // idx(r) are r's coordinates over row_sizes (x's shape without its last dim), and its element j
  // at + j * col_stride (0 or 1).
  int mask_kind = 0;
  const void* mask = nullptr;
  const int64_t* row_sizes = nullptr;
  const int64_t* row_strides = nullptr;
  int64_t row_dims = 0;
  int64_t col_stride = 0;
  // causal_rows > 0: key j of query i = r % causal_rows takes part only where j <= i + causal_offset.
  int64_t causal_rows = 0;
  int64_t causal_offset = 0;
};

struct StatsCall {
  at::ScalarType x_dtype;
  const void* x;
  void* max;     // accumulation type: float32, or float64 for float64 x
  void* sumexp;
  RowLayout g;
  double temperature;
};

struct BackwardCall {
  at::ScalarType y_dtype, dx_dtype;  // dx_dtype: y_dtype, or float16/bfloat16 for float32 y
  const void* dy;
  const void* y;
  void* dx;
  RowLayout g;
  double temperature;
  bool log;
};

struct TopKCall {  // rows contiguous (the op layer moves the dim last)
  at::ScalarType x_dtype;
  const void* x;
  int64_t rows, n, k;
  double temperature;
  bool log;
  void* values;
  int64_t* indices;
  void* max;
  void* sumexp;
  // Optional: per row, `excluded_width` token ids sorted ascending (-1 pads, first) that the
  // selection skips; their own values (same formula as the top-k's) go to excluded_values, x's
  // dtype, rows x excluded_width (padding entries untouched). A row with fewer than k tokens left
  // pads its top-k with index -1 and value -inf. The beam-search step uses it to edit a few tokens
  // after normalization without widening k.
  const int64_t* excluded = nullptr;
  int64_t excluded_width = 0;
  void* excluded_values = nullptr;
};

struct TopKBackwardCall {
  at::ScalarType x_dtype;
  const void* grad_values;
  const void* x;
  const int64_t* indices;
  const void* max;
  const void* sumexp;
  void* dx;
  int64_t rows, n, k;
  double temperature;
  bool log;
};

struct SampleCall {  // rows contiguous
  at::ScalarType x_dtype;
  const void* x;
  int64_t rows, n, num_samples;
  const double* temperature;  // (rows,)
  const double* min_log_ratio;  // (rows,) or nullptr: keep (x - max) / t >= it; -inf keeps every token
  const double* uniforms;     // (rows, num_samples) in [0, 1)
  int64_t* tokens;            // (rows, num_samples); -1 for a row with no distribution
  void* log_probs;            // (rows, num_samples), accumulation type
  const int64_t* edit_ids = nullptr;    // (rows, num_edits): ascending ids, then -1 padding
  const void* edit_values = nullptr;    // (rows, num_edits), accumulation type
  int64_t num_edits = 0;
};

struct TopPCall {  // rows contiguous
  at::ScalarType x_dtype;
  const void* x;
  int64_t rows, n;
  const double* temperature;  // (rows,)
  const double* top_p;        // (rows,)
  double* log_ratio;          // (rows,) the cut, as (x - max) / t of the smallest token kept
  int64_t* status;            // (rows,) 0 found, 1 tied at the cut, 2 no distribution
  const int64_t* edit_ids = nullptr;    // as SampleCall's
  const void* edit_values = nullptr;
  int64_t num_edits = 0;
};

struct RejectionCall {  // every array contiguous; semantics: rejection_sample in csrc/ops.cpp
  at::ScalarType x_dtype;
  const void* target;            // (batch, n + 1, vocab)
  int64_t batch, n, vocab;
  const int64_t* draft_ids;      // (batch, n) in [0, vocab)
  at::ScalarType draft_dtype;    // float32 or x_dtype
  const void* draft_probs;       // (batch, n, vocab) or nullptr: q one-hot at the draft token
  const int64_t* num_drafts;     // (batch,) in [0, n]
  const double* temperature;     // (batch,) 0 for greedy
  const double* min_log_ratio;   // (batch, n + 1) or nullptr
  const double* uniforms;        // (batch, n + 1) in [0, 1)
  int64_t* token_ids;            // (batch, n + 1)
  int64_t* num_accepted;         // (batch,)
  void* log_probs;               // (batch, n + 1), accumulation type
};

struct TokenLogprobsCall {  // rows contiguous; semantics: token_logprobs in csrc/ops.cpp
  at::ScalarType x_dtype;
  const void* x;               // (rows, n)
  int64_t rows, n, top_n;
  double temperature;
  const int64_t* token_ids;    // (rows,) in [0, n)
  const void* token_values;    // (rows,) accumulation type, or nullptr: x[r, token_ids[r]]
  void* log_probs;             // (rows,) accumulation type, as max, sumexp, entropy, top_log_probs
  int64_t* rank;               // (rows,)
  int64_t* top_ids;            // (rows, top_n)
  void* top_log_probs;         // (rows, top_n)
  void* max;
  void* sumexp;
  void* entropy;
};

struct CrossEntropyBackwardCall {  // rows contiguous
  at::ScalarType x_dtype;
  const void* x;
  int64_t rows, n;
  const void* max;           // (rows,) the row's online state (max, sumexp); accumulation type, as
  const void* sumexp;        // the per-row scales and weight
  const int64_t* target;     // (rows,) in [0, n)
  const void* p_scale;
  const void* target_scale;
  const void* smooth_scale;  // (rows,) or nullptr
  const void* weight;        // (n,) or nullptr
  void* out;                 // (rows, n), x's dtype
};

struct TokenLogprobsBackwardCall {  // rows contiguous
  at::ScalarType x_dtype;
  const void* x;
  int64_t rows, n;
  double temperature;
  const int64_t* token_ids;   // (rows,) in [0, n)
  const void* grad_log_probs; // (rows,) accumulation type, as the rest
  const void* grad_entropy;   // (rows,) or nullptr: no entropy term
  const void* max;            // the row's online state of x / temperature
  const void* sumexp;
  const void* entropy;        // the forward's entropy of softmax(x / temperature)
  void* out;                  // (rows, n), x's dtype; may be x
};

struct DistillationCall {  // rows contiguous; semantics: distillation_forward / _backward in csrc/ops.cpp
  at::ScalarType x_dtype;     // student's and teacher's
  const void* student;        // (rows, n)
  const void* teacher;        // (rows, n)
  int64_t rows, n;
  const int64_t* target;      // (rows,) or nullptr
  int kind;                   // kernels/distillation_math.h
  double beta, temperature, hard_weight;
  int64_t ignore_index;
  void* loss;                 // forward: (rows,) accumulation type
  void* stats;                // forward: written; backward: read. (rows, 7) accumulation type
  const void* grad_loss;      // backward: (rows,) accumulation type
  void* out;                  // backward: (rows, n), x's dtype; may be student
};

struct KernelTable {
  const char* capability;  // "DEFAULT", "AVX2", "AVX512"
  void (*forward)(const ForwardCall&);
  void (*stats)(const StatsCall&);
  void (*backward)(const BackwardCall&);
  void (*softmax_topk)(const TopKCall&);
  void (*softmax_topk_backward)(const TopKBackwardCall&);
  void (*sample_categorical)(const SampleCall&);
  void (*top_p_threshold)(const TopPCall&);
  void (*cross_entropy_backward)(const CrossEntropyBackwardCall&);
  void (*masked_forward)(const MaskedForwardCall&);
  void (*rejection_sample)(const RejectionCall&);
  void (*token_logprobs)(const TokenLogprobsCall&);
  void (*token_logprobs_backward)(const TokenLogprobsBackwardCall&);
  void (*distillation_forward)(const DistillationCall&);
  void (*distillation_backward)(const DistillationCall&);
};

// The table in use.
const KernelTable& kernels();

// The capabilities this build has kernels for, lowest first.
std::vector<std::string> compiled_capabilities();

// Test-only: run the kernels of `capability` (one of compiled_capabilities(), or "" for the
// automatic choice) from now on. Returns false, changing nothing, for a capability not compiled
// or one this CPU cannot run.
bool override_capability(const std::string& capability);

}  // namespace online_softmax::cpu
