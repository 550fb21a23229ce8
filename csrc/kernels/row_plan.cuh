// How a contiguous row of n elements is mapped onto the GPU, by its length in 16-byte granules:
//   registers  a sub-warp, warp or block per row, the row held in registers (1 read + 1 write)
//   shared     a block per row, the row cached in shared memory up to the opt-in limit
//   split      the row cut into chunks of whole granules, one block each: a partial-state kernel,
//              then a kernel that merges the row's partial states and writes its chunk. Used when
//              the row does not fit on chip, or when there are too few rows to fill the GPU.
// Forward, stats, backward and top-k share it, so they split rows the same way.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/launchers.h"

namespace online_softmax::kernels {

// Granules a row of n elements can touch, whatever its alignment (head < kVec elements).
inline int64_t row_granules(int64_t n, int vec) { return (n + vec - 1 + vec - 1) / vec; }

// The register-resident configurations: kGroup threads per row, kVecs granules per thread.
struct RegisterConfig {
  int group;
  int vecs;
  int block;
  int64_t capacity() const { return int64_t(group) * vecs; }  // granules per row
};

constexpr RegisterConfig kRegisterConfigs[] = {
    {1, 1, 128},  {2, 1, 128},  {4, 1, 128},   {8, 1, 128},   {16, 1, 128},
    {32, 1, 128}, {32, 2, 128}, {32, 4, 128},  {32, 8, 128},  {256, 2, 256},
    {256, 4, 256}, {512, 4, 512}, {512, 8, 512},
};
constexpr int kNumRegisterConfigs = sizeof(kRegisterConfigs) / sizeof(kRegisterConfigs[0]);
constexpr int64_t kMaxRegisterGranules = 512 * 8;

enum class RowKind { kRegisters, kShared, kSplit };

struct RowPlan {
  RowKind kind = RowKind::kRegisters;
  int config = 0;            // index into kRegisterConfigs (kRegisters)
  int threads = 0;           // block size (kShared, kSplit)
  size_t smem_bytes = 0;     // dynamic shared memory (kShared)
  int64_t chunks = 1;        // blocks per row (kSplit)
  int64_t chunk_granules = 0;
  size_t workspace_bytes(int64_t rows, size_t state_bytes) const {
    return kind == RowKind::kSplit ? size_t(rows * chunks) * state_bytes : 0;
  }
};

// `bytes_per_granule_on_chip` is what one granule costs in shared memory (16 for the forward, 32 for
// the backward, which keeps two rows); 0 disables the shared-memory kind.
inline RowPlan plan_rows(int64_t rows, int64_t n, int vec, DeviceLimits limits,
                         int bytes_per_granule_on_chip, int64_t max_register_granules = kMaxRegisterGranules) {
  RowPlan plan;
  const int64_t granules = row_granules(n, vec);
  const int64_t sms = std::max(1, limits.num_sms);
  // Few rows of real length: spread each row over several blocks so every SM has work.
  const bool few_rows = rows > 0 && rows < sms && granules >= 1024;
  if (!few_rows && granules <= max_register_granules) {
    plan.kind = RowKind::kRegisters;
    for (int c = 0; c < kNumRegisterConfigs; ++c) {
      if (kRegisterConfigs[c].capacity() >= granules) {
        plan.config = c;
        break;
      }
    }
    return plan;
  }
  const size_t reserve = 2048;  // static shared memory of the kernel (merge scratch)
  const size_t cache = size_t(granules) * bytes_per_granule_on_chip;
  if (!few_rows && bytes_per_granule_on_chip > 0 && cache + reserve <= size_t(limits.max_smem_per_block)) {
    plan.kind = RowKind::kShared;
    plan.threads = 512;
    plan.smem_bytes = cache;
    return plan;
  }
  plan.kind = RowKind::kSplit;
  plan.threads = 256;
  // Chunks of 256..4096 granules (more for huge rows); few rows are cut finer, to about 4 blocks
  // per SM in total.
  int64_t chunk = 4096;
  if (few_rows) {
    const int64_t want_chunks = (4 * sms + rows - 1) / rows;
    chunk = std::clamp<int64_t>((granules + want_chunks - 1) / want_chunks, 256, 4096);
  }
  // At most 1024 chunks per row: every block of the second kernel merges all of its row's partial
  // states, so their number must stay small for rows of 2^31 elements too.
  chunk = std::max(chunk, (granules + 1023) / 1024);
  plan.chunk_granules = chunk;
  plan.chunks = (granules + chunk - 1) / chunk;
  return plan;
}

// Grids are capped (kernels loop over their work) so that huge row counts never exceed grid limits.
inline int64_t capped_grid(int64_t blocks, DeviceLimits limits) {
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(limits.num_sms) * 64));
}

// The strided kernels' block: up to 32 neighbouring rows (x) times threads along the dim (y), <= 256.
struct StridedBlock {
  int x = 1;
  int y = 1;
  int64_t tiles = 1;  // blocks per outer index
};

inline StridedBlock strided_block(RowLayout layout) {
  StridedBlock b;
  while (b.x < 32 && b.x < layout.inner) b.x *= 2;
  while (b.x * b.y < 256 && b.y < layout.size) b.y *= 2;
  b.tiles = (layout.inner + b.x - 1) / b.x;
  return b;
}

}  // namespace online_softmax::kernels
