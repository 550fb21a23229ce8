// The launch plans of the CUDA kernels: which kernels run for a shape, with what grid, block and
// shared memory, and the global bytes each one moves (a model: every byte a kernel loads or stores,
// counted once). Plain C++17, no CUDA header: the launchers in csrc/kernels/*.cu run exactly these
// plans, and every build of the extension (CPU-only ones too) compiles this header for
// online_softmax.cuda_plan, so a plan can be read and tested on any machine.
//
// How a contiguous row of n elements is mapped onto the GPU, by its length in 16-byte granules:
//   registers  a sub-warp, warp or block per row, the row held in registers (1 read + 1 write)
//   shared     a block per row, the row cached in shared memory up to the opt-in limit
//   split      the row cut into chunks of whole granules, one block each: a partial-state kernel,
//              then a kernel that merges the row's partial states and writes its chunk. Used when
//              the row does not fit on chip, or when there are too few rows to fill the GPU.
// Rows whose softmax dim is not the last (stride `inner` > 1) go to the strided kernels, which are
// split the same way when outer * inner is too small to fill the GPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels/row_layout.h"

namespace online_softmax::kernels {

// What the launchers need to know about the GPU (the binding reads it once per device).
struct DeviceLimits {
  int num_sms = 1;
  int max_smem_per_block = 48 * 1024;  // the opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin)
  int64_t l2_bytes = 0;                // 0: unknown
  int cc = 0;                          // compute capability, major * 10 + minor (0: unknown)
  int device = 0;                      // the CUDA device index (per-device attributes)
};

// Element sizes of one call: the input, the output (forward's dtype=, backward's dx), and the
// accumulation type (float, or double for double), in which the row states are reported.
struct ElemBytes {
  int in = 4;
  int out = 4;
  int acc = 4;
  int vec() const { return 16 / in; }          // elements per 16-byte granule of the input
  int state() const { return 2 * acc; }        // one (m, d)
};

// Granules a row of n elements can touch, whatever its alignment (head < kVec elements).
inline int64_t row_granules(int64_t n, int vec) { return (n + vec - 1 + vec - 1) / vec; }

// The register-resident configurations: kGroup threads per row, kVecs granules per thread.
struct RegisterConfig {
  int group;
  int vecs;
  int block;
  constexpr int64_t capacity() const { return int64_t(group) * vecs; }  // granules per row
};

constexpr RegisterConfig kRegisterConfigs[] = {
    {1, 1, 128},  {2, 1, 128},  {4, 1, 128},   {8, 1, 128},   {16, 1, 128},
    {32, 1, 128}, {32, 2, 128}, {32, 4, 128},  {32, 8, 128},  {256, 2, 256},
    {256, 4, 256}, {512, 4, 512}, {512, 8, 512},
};
constexpr int kNumRegisterConfigs = sizeof(kRegisterConfigs) / sizeof(kRegisterConfigs[0]);
constexpr int64_t kMaxRegisterGranules = 512 * 8;
// The backward keeps two rows (dy and y) on chip: half the forward's register capacity.
constexpr int64_t kBackwardRegisterGranules = kMaxRegisterGranules / 2;
constexpr int kNumBackwardRegisterConfigs = kNumRegisterConfigs - 1;

// Static shared memory the shared-row kernels keep beside the row cache (merge scratch).
constexpr size_t kSharedRowReserve = 2048;
constexpr int kSharedRowThreads = 512;
constexpr int kSplitThreads = 256;

// The strided kernels: a thread keeps up to kStridedCache values of each of its columns in
// registers, so rows of up to blockDim.y * kStridedCache elements are read once.
constexpr int kStridedCache = 8;
constexpr int kStridedThreads = 256;

// The fused top-k: the block kernel's block, and the largest k its buffer holds (2048 elements a
// step, 1024 for double). The warp kernel keeps each lane's elements (at most 32) in registers.
constexpr int kTopKThreads = 256;
// distillation_forward's block (a power of two: its partials merge through a fixed tree).
constexpr int kDistillationThreads = 256;
inline int64_t topk_max_k_for(int in_bytes) { return in_bytes == 8 ? 1024 : 2048; }
constexpr int64_t kTopKWarpMaxK = 32;
constexpr int kTopKWarpMaxElems = 32;  // per lane: a 32-bit mask marks the taken ones
constexpr int kTopKBackwardThreads = 256;

// The sampling kernels: a block per row; sample_categorical keeps one (m, d) per chunk of
// kSampleChunk elements (8 per lane of a warp) in its workspace.
constexpr int kSampleThreads = 256;
constexpr int kSampleChunk = 256;

// rejection_sample: one (m, d) per kRejectionChunk elements of every target position (8 per lane of
// a warp), blocks of kRejectionThreads; its last kernel merges up to kRejectionGroup positions of a
// batch row at once (a warp each), then walks them in order.
constexpr int kRejectionThreads = 256;
constexpr int kRejectionChunk = 256;
constexpr int kRejectionGroup = 32;

enum class Path {
  kNothing,        // an empty tensor: no launch
  kRegisters,      // rows in registers
  kShared,         // a block per row, the row in shared memory
  kSplit,          // rows split over blocks: partial states, then merge + write
  kStrided,        // softmax dim not last
  kStridedSplit,   // softmax dim not last, each column split over blocks
  kTopKWarp,       // fused top-k, a (sub-)warp per row
  kTopKBlock,      // fused top-k, a block per row
  kTopKSplit,      // fused top-k, rows split over blocks, then a merge
  kTopKSort,       // k beyond the fused kernels: csrc/common sorts (ATen kernels, not modelled)
  kTopKBackward,   // top-k backward, rows split over kTopKBackwardThreads-blocks
  kSample,         // sample_categorical, a block per row
  kTopP,           // top_p_threshold, a block per row
  kTwoPass,        // masked forward beyond the register configurations: a block per row, read twice
  kRejection,      // rejection_sample: target rows' chunk states (split over blocks), then a block per batch row
  kTokenLogprobs,  // token_logprobs: a block per row
  kDistillation,   // distillation_forward: a block per row
};

inline const char* path_name(Path p) {
  switch (p) {
    case Path::kNothing: return "nothing";
    case Path::kRegisters: return "registers";
    case Path::kShared: return "shared";
    case Path::kSplit: return "split";
    case Path::kStrided: return "strided";
    case Path::kStridedSplit: return "strided_split";
    case Path::kTopKWarp: return "topk_warp";
    case Path::kTopKBlock: return "topk_block";
    case Path::kTopKSplit: return "topk_split";
    case Path::kTopKSort: return "topk_sort";
    case Path::kTopKBackward: return "topk_backward";
    case Path::kSample: return "sample";
    case Path::kTopP: return "top_p";
    case Path::kTwoPass: return "two_pass";
    case Path::kRejection: return "rejection";
    case Path::kTokenLogprobs: return "token_logprobs";
    case Path::kDistillation: return "distillation";
  }
  return "?";
}

// One kernel launch of a plan.
struct Launch {
  const char* kernel = "";     // the __global__ function
  int64_t grid = 0;            // blocks (1-D grids; kernels loop when the work exceeds the cap)
  int block_x = 1;
  int block_y = 1;
  size_t smem = 0;             // dynamic shared memory
  int64_t threads_per_row = 0; // threads that share one row (one softmax slice)
  int64_t rows_per_block = 0;  // rows a block works on at once (0: a row spans several blocks)
  int64_t bytes_read = 0;      // the model of its global traffic
  int64_t bytes_written = 0;
  int64_t bytes_reread = 0;    // of bytes_read, what an earlier launch of the plan read already
};

constexpr int kMaxLaunches = 3;

struct LaunchPlan {
  Path path = Path::kNothing;
  int count = 0;
  Launch launch[kMaxLaunches];
  size_t workspace_bytes = 0;
  // Path parameters the launchers read.
  int config = 0;              // kRegisters / kTopKWarp: index into kRegisterConfigs; kTokenLogprobs:
                               // 1 when the kernel selects the top-n itself
  int64_t chunks = 1;          // blocks per row (split paths) or per column (kStridedSplit);
                               // kSample, kRejection: chunk states per row
  int64_t chunk = 0;           // granules per chunk (row paths), elements along the dim (strided
                               // and kSample)
  int strided_cols = 1;        // strided: columns per thread (1, or a granule's worth)
  int64_t strided_tiles = 1;   // strided: blocks across inner, per outer index
  bool strided_cached = false; // strided: the whole column stays in registers (1 read)
  int64_t parts = 1;           // kRejection: blocks per target row in the state kernels
  int64_t part_chunks = 0;     // kRejection: the chunks each of those blocks covers

  Launch& add(const char* kernel) {
    Launch& l = launch[count++];
    l.kernel = kernel;
    return l;
  }
};

// Grids are capped (kernels loop over their work) so that huge row counts never exceed grid limits.
inline int64_t capped_grid(int64_t blocks, DeviceLimits limits) {
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(std::max(1, limits.num_sms)) * 64));
}

inline int first_register_config(int64_t granules, int configs = kNumRegisterConfigs) {
  for (int c = 0; c < configs; ++c) {
    if (kRegisterConfigs[c].capacity() >= granules) return c;
  }
  return -1;
}

// ---- contiguous rows (forward, stats, backward) ----

// `bytes_per_granule_on_chip` is what one granule costs in shared memory (16 for the forward, 32 for
// the backward, which keeps two rows); 0 disables the shared-memory kind. Sets path, config,
// chunks, chunk; the caller adds the launches.
inline LaunchPlan plan_rows(int64_t rows, int64_t n, int vec, DeviceLimits limits, int bytes_per_granule_on_chip,
                            int64_t max_register_granules) {
  LaunchPlan plan;
  const int64_t granules = row_granules(n, vec);
  const int64_t sms = std::max(1, limits.num_sms);
  // Few rows of real length: spread each row over several blocks so every SM has work.
  const bool few_rows = rows > 0 && rows < sms && granules >= 1024;
  if (!few_rows && granules <= max_register_granules) {
    plan.path = Path::kRegisters;
    plan.config = first_register_config(granules);
    return plan;
  }
  const size_t cache = size_t(granules) * bytes_per_granule_on_chip;
  if (!few_rows && bytes_per_granule_on_chip > 0 &&
      cache + kSharedRowReserve <= size_t(limits.max_smem_per_block)) {
    plan.path = Path::kShared;
    return plan;
  }
  plan.path = Path::kSplit;
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
  plan.chunk = chunk;
  plan.chunks = (granules + chunk - 1) / chunk;
  return plan;
}

// ---- softmax dim with stride inner > 1 ----

// A block is x neighbouring column groups (adjacent in memory, so loads coalesce; a group is
// strided_cols columns read as one 16-byte vector where inner allows) times y threads along the
// softmax dim. When outer * tiles blocks cannot fill the GPU, each column is split into chunks
// along the dim: partial states, then a merge + write kernel, as for long contiguous rows.
inline void plan_strided(LaunchPlan& plan, RowLayout layout, int vec, DeviceLimits limits) {
  plan.strided_cols = layout.inner % vec == 0 ? vec : 1;
  const int64_t groups = (layout.inner + plan.strided_cols - 1) / plan.strided_cols;
  int x = 1, y = 1;
  while (x < 32 && x < groups) x *= 2;
  while (x * y < kStridedThreads && y < layout.size) y *= 2;
  plan.strided_tiles = (groups + x - 1) / x;
  const int64_t sms = std::max(1, limits.num_sms);
  const int64_t blocks = layout.outer * plan.strided_tiles;
  // Split when the blocks would leave SMs idle and each chunk still gives its y threads >= 16
  // elements each.
  if (blocks < 2 * sms && layout.size >= int64_t(y) * 32) {
    const int64_t want = (4 * sms + blocks - 1) / blocks;
    int64_t chunk = std::max<int64_t>(int64_t(y) * 16, (layout.size + want - 1) / want);
    chunk = std::max(chunk, (layout.size + 1023) / 1024);
    plan.path = Path::kStridedSplit;
    plan.chunk = chunk;
    plan.chunks = (layout.size + chunk - 1) / chunk;
  } else {
    plan.path = Path::kStrided;
    plan.strided_cached = layout.size <= int64_t(y) * kStridedCache;
  }
  plan.launch[0].block_x = x;
  plan.launch[0].block_y = y;
}

// ---- the plans the launchers run ----

// forward / stats: `has_y` false for stats; `state_outputs` is how many of max/sumexp are written.
// The kernels of the rows that stay on chip, for forward and backward alike: a register
// configuration's rows per block, or one row per block in shared memory (`shared_bytes_per_granule`
// bytes of it per granule of the row: x, or dy and y). The split path has launches of its own.
struct OnChipRowKernels {
  const char* registers;
  const char* shared;
  int shared_bytes_per_granule;
};

inline void add_on_chip_row_launch(LaunchPlan& plan, int64_t rows, int64_t n, int vec, DeviceLimits limits,
                                   OnChipRowKernels kernels, int64_t bytes_read, int64_t bytes_written) {
  if (plan.path != Path::kRegisters && plan.path != Path::kShared) return;
  Launch& l = plan.add(plan.path == Path::kRegisters ? kernels.registers : kernels.shared);
  if (plan.path == Path::kRegisters) {
    const RegisterConfig cfg = kRegisterConfigs[plan.config];
    l.block_x = cfg.block;
    l.rows_per_block = cfg.block / cfg.group;
    l.threads_per_row = cfg.group;
  } else {
    l.block_x = kSharedRowThreads;
    l.smem = size_t(row_granules(n, vec)) * kernels.shared_bytes_per_granule;
    l.rows_per_block = 1;
    l.threads_per_row = kSharedRowThreads;
  }
  l.grid = capped_grid((rows + l.rows_per_block - 1) / l.rows_per_block, limits);
  l.bytes_read = bytes_read;
  l.bytes_written = bytes_written;
}

inline LaunchPlan plan_forward(RowLayout layout, ElemBytes e, bool has_y, int state_outputs, DeviceLimits limits) {
  const int64_t numel = layout.outer * layout.size * layout.inner;
  const int64_t x_bytes = numel * e.in;
  const int64_t y_bytes = has_y ? numel * e.out : 0;
  const int64_t slices = layout.outer * layout.inner;
  const int64_t state_bytes = slices * state_outputs * e.acc;
  if (numel == 0) return LaunchPlan{};
  LaunchPlan plan;
  if (layout.inner > 1) {
    plan_strided(plan, layout, e.vec(), limits);
    const int bx = plan.launch[0].block_x, by = plan.launch[0].block_y;
    if (plan.path == Path::kStrided) {
      Launch& l = plan.add("strided_kernel");
      l.block_x = bx;
      l.block_y = by;
      l.grid = capped_grid(layout.outer * plan.strided_tiles, limits);
      l.threads_per_row = by;
      l.rows_per_block = int64_t(bx) * plan.strided_cols;
      const bool reread = has_y && !plan.strided_cached;
      l.bytes_read = x_bytes * (reread ? 2 : 1);
      l.bytes_reread = reread ? x_bytes : 0;
      l.bytes_written = y_bytes + state_bytes;
    } else {
      const int64_t partial_bytes = slices * plan.chunks * e.state();
      plan.workspace_bytes = size_t(partial_bytes);
      Launch& p = plan.add("strided_partial_states_kernel");
      p.block_x = bx;
      p.block_y = by;
      p.grid = capped_grid(layout.outer * plan.strided_tiles * plan.chunks, limits);
      p.threads_per_row = by;
      p.bytes_read = x_bytes;
      p.bytes_written = partial_bytes;
      const int64_t blocks_per_column = has_y ? plan.chunks : 1;
      Launch& o = plan.add("strided_split_output_kernel");
      o.block_x = bx;
      o.block_y = by;
      o.grid = capped_grid(layout.outer * plan.strided_tiles * blocks_per_column, limits);
      o.threads_per_row = by;
      o.bytes_read = (has_y ? x_bytes : 0) + partial_bytes * blocks_per_column;
      o.bytes_reread = (has_y ? x_bytes : 0) + partial_bytes * blocks_per_column;
      o.bytes_written = y_bytes + state_bytes;
    }
    return plan;
  }
  const int64_t rows = layout.outer, n = layout.size;
  plan = plan_rows(rows, n, e.vec(), limits, 16, kMaxRegisterGranules);
  add_on_chip_row_launch(plan, rows, n, e.vec(), limits, {"register_rows_kernel", "shared_row_kernel", 16},
                         x_bytes, y_bytes + state_bytes);
  switch (plan.path) {
    case Path::kSplit: {
      const int64_t partial_bytes = rows * plan.chunks * e.state();
      plan.workspace_bytes = size_t(partial_bytes);
      Launch& p = plan.add("partial_states_kernel");
      p.block_x = kSplitThreads;
      p.grid = capped_grid(rows * plan.chunks, limits);
      p.threads_per_row = kSplitThreads * plan.chunks;
      p.bytes_read = x_bytes;
      p.bytes_written = partial_bytes;
      const int64_t blocks_per_row = has_y ? plan.chunks : 1;
      Launch& o = plan.add("split_output_kernel");
      o.block_x = kSplitThreads;
      o.grid = capped_grid(rows * blocks_per_row, limits);
      o.threads_per_row = kSplitThreads * blocks_per_row;
      o.bytes_read = (has_y ? x_bytes : 0) + partial_bytes * blocks_per_row;
      o.bytes_reread = o.bytes_read;
      o.bytes_written = y_bytes + state_bytes;
      break;
    }
    default: break;
  }
  return plan;
}

// backward: dy and y of e.in bytes, dx of e.out bytes.
inline LaunchPlan plan_backward(RowLayout layout, ElemBytes e, DeviceLimits limits) {
  const int64_t numel = layout.outer * layout.size * layout.inner;
  if (numel == 0) return LaunchPlan{};
  const int64_t in_bytes = 2 * numel * e.in;  // dy and y
  const int64_t dx_bytes = numel * e.out;
  const int64_t slices = layout.outer * layout.inner;
  LaunchPlan plan;
  if (layout.inner > 1) {
    plan_strided(plan, layout, e.vec(), limits);
    const int bx = plan.launch[0].block_x, by = plan.launch[0].block_y;
    if (plan.path == Path::kStrided) {
      // Two columns (dy, y) per thread: half the cache of the forward.
      plan.strided_cached = layout.size <= int64_t(by) * (kStridedCache / 2);
      Launch& l = plan.add("strided_backward_kernel");
      l.block_x = bx;
      l.block_y = by;
      l.grid = capped_grid(layout.outer * plan.strided_tiles, limits);
      l.threads_per_row = by;
      l.rows_per_block = int64_t(bx) * plan.strided_cols;
      l.bytes_read = in_bytes * (plan.strided_cached ? 1 : 2);
      l.bytes_reread = plan.strided_cached ? 0 : in_bytes;
      l.bytes_written = dx_bytes;
    } else {
      const int64_t partial_bytes = slices * plan.chunks * e.acc;
      plan.workspace_bytes = size_t(partial_bytes);
      Launch& p = plan.add("strided_partial_sums_kernel");
      p.block_x = bx;
      p.block_y = by;
      p.grid = capped_grid(layout.outer * plan.strided_tiles * plan.chunks, limits);
      p.threads_per_row = by;
      p.bytes_read = in_bytes;
      p.bytes_written = partial_bytes;
      Launch& o = plan.add("strided_split_backward_kernel");
      o.block_x = bx;
      o.block_y = by;
      o.grid = p.grid;
      o.threads_per_row = by;
      o.bytes_read = in_bytes + partial_bytes * plan.chunks;
      o.bytes_reread = o.bytes_read;
      o.bytes_written = dx_bytes;
    }
    return plan;
  }
  const int64_t rows = layout.outer, n = layout.size;
  plan = plan_rows(rows, n, e.vec(), limits, 32, kBackwardRegisterGranules);
  add_on_chip_row_launch(plan, rows, n, e.vec(), limits,
                         {"register_rows_backward_kernel", "shared_row_backward_kernel", 32}, in_bytes, dx_bytes);
  switch (plan.path) {
    case Path::kSplit: {
      const int64_t partial_bytes = rows * plan.chunks * e.acc;
      plan.workspace_bytes = size_t(partial_bytes);
      Launch& p = plan.add("partial_sums_kernel");
      p.block_x = kSplitThreads;
      p.grid = capped_grid(rows * plan.chunks, limits);
      p.threads_per_row = kSplitThreads * plan.chunks;
      p.bytes_read = in_bytes;
      p.bytes_written = partial_bytes;
      Launch& o = plan.add("split_backward_kernel");
      o.block_x = kSplitThreads;
      o.grid = p.grid;
      o.threads_per_row = p.threads_per_row;
      o.bytes_read = in_bytes + partial_bytes * plan.chunks;
      o.bytes_reread = o.bytes_read;
      o.bytes_written = dx_bytes;
      break;
    }
    default: break;
  }
  return plan;
}

// The warp top-k's configuration for rows of n elements: the first of <= 32 threads per row whose
// lanes hold at most kTopKWarpMaxElems elements each; -1 if none holds the row.
inline int topk_warp_config(int64_t n, int vec) {
  for (int c = 0; c < kNumRegisterConfigs && kRegisterConfigs[c].group <= 32; ++c) {
    const RegisterConfig cfg = kRegisterConfigs[c];
    if (cfg.vecs * vec <= kTopKWarpMaxElems && cfg.capacity() * vec >= n) return c;
  }
  return -1;
}

inline size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Fused top-k over rows of n contiguous elements: values (e.in bytes), int64 indices, row state.
inline LaunchPlan plan_topk(int64_t rows, int64_t n, int64_t k, ElemBytes e, DeviceLimits limits) {
  LaunchPlan plan;
  if (rows == 0 || n == 0) return plan;
  const int vec = e.vec();
  const int64_t x_bytes = rows * n * e.in;
  const int64_t out_bytes = rows * k * (e.in + 8) + rows * e.state();
  if (k > topk_max_k_for(e.in)) {
    plan.path = Path::kTopKSort;
    return plan;
  }
  // Short rows: a sub-warp or warp per row, each lane's elements in registers, no block barrier.
  // Lanes take elements by their index in the row (16-byte loads where the row is aligned), so a
  // configuration holds exactly group * vecs * vec elements.
  const int warp_config = topk_warp_config(n, vec);
  if (k <= kTopKWarpMaxK && warp_config >= 0) {
    const RegisterConfig cfg = kRegisterConfigs[warp_config];
    plan.path = Path::kTopKWarp;
    plan.config = warp_config;
    Launch& l = plan.add("topk_warp_kernel");
    l.block_x = cfg.block;
    l.rows_per_block = cfg.block / cfg.group;
    l.grid = capped_grid((rows + l.rows_per_block - 1) / l.rows_per_block, limits);
    l.threads_per_row = cfg.group;
    l.bytes_read = x_bytes;
    l.bytes_written = out_bytes;
    return plan;
  }
  // Candidates carry int32 refs within their chunk: no chunk may reach 2^30 elements.
  const int64_t max_chunk_granules = (int64_t(1) << 30) / vec;
  const int64_t granules_min = (n + vec - 1) / vec;  // the fewest granules any row has
  const int64_t sms = std::max(1, limits.num_sms);
  int64_t chunk = granules_min + 1;  // one chunk: the whole row
  if (rows < sms && granules_min >= 2048) {
    // Few rows: about 4 blocks per SM. Every chunk, also the first (which may start mid-granule)
    // and the last (which runs to the row's end), holds at least k elements.
    const int64_t min_chunk = std::max<int64_t>(256, (k + vec - 1) / vec + 1);
    const int64_t want = (4 * sms + rows - 1) / rows;
    chunk = std::max(min_chunk, (granules_min + want - 1) / want);
  }
  chunk = std::min(chunk, max_chunk_granules);
  plan.chunks = std::max<int64_t>(1, granules_min / chunk);
  plan.chunk = plan.chunks == 1 ? granules_min + 1 : chunk;
  if (plan.chunks == 1) {
    plan.path = Path::kTopKBlock;
    Launch& l = plan.add("topk_scan_kernel");
    l.block_x = kTopKThreads;
    l.grid = capped_grid(rows, limits);
    l.threads_per_row = kTopKThreads;
    l.rows_per_block = 1;
    l.bytes_read = x_bytes;
    l.bytes_written = out_bytes;
    return plan;
  }
  plan.path = Path::kTopKSplit;
  const int64_t blocks = rows * plan.chunks;
  const int64_t ws_state = blocks * e.state(), ws_values = blocks * k * e.acc, ws_index = blocks * k * 8;
  plan.workspace_bytes = align256(size_t(ws_state)) + align256(size_t(ws_values)) + size_t(ws_index);
  Launch& s = plan.add("topk_scan_kernel");
  s.block_x = kTopKThreads;
  s.grid = capped_grid(blocks, limits);
  s.threads_per_row = kTopKThreads * plan.chunks;
  s.bytes_read = x_bytes;
  s.bytes_written = ws_state + ws_values + ws_index;
  Launch& m = plan.add("topk_merge_kernel");
  m.block_x = kTopKThreads;
  m.grid = capped_grid(rows, limits);
  m.threads_per_row = kTopKThreads;
  m.rows_per_block = 1;
  m.bytes_read = ws_state + ws_values + k * 8 * rows;  // indices are read for the k winners only
  m.bytes_reread = m.bytes_read;
  m.bytes_written = out_bytes;
  return plan;
}

// Top-k backward: every block recomputes its row's two scalars from the k (index, gradient) pairs,
// writes dx for its chunk of the row, then the corrections at the indices inside that chunk.
inline LaunchPlan plan_topk_backward(int64_t rows, int64_t n, int64_t k, ElemBytes e, DeviceLimits limits) {
  LaunchPlan plan;
  if (rows == 0 || n == 0) return plan;
  plan.path = Path::kTopKBackward;
  // Few rows: chunks of whole granules, about 4 blocks per SM in all, each at least 1024 elements
  // and 8 k (every block re-reads the row's k pairs); the last chunk runs to the row's end (rows
  // differ by a granule in their count).
  const int vec = e.vec();
  const int64_t granules_min = (n + vec - 1) / vec;
  const int64_t sms = std::max(1, limits.num_sms);
  int64_t chunk = granules_min + 1;
  if (rows < 4 * sms && n > 8192) {
    const int64_t want = (4 * sms + rows - 1) / rows;
    chunk = std::max<int64_t>(std::max<int64_t>(1024, 8 * k) / vec, (granules_min + want - 1) / want);
  }
  plan.chunks = std::max<int64_t>(1, granules_min / chunk);
  plan.chunk = plan.chunks == 1 ? granules_min + 1 : chunk;
  Launch& l = plan.add("topk_backward_kernel");
  l.block_x = kTopKBackwardThreads;
  l.grid = capped_grid(rows * plan.chunks, limits);
  l.threads_per_row = kTopKBackwardThreads * plan.chunks;
  l.rows_per_block = plan.chunks == 1 ? 1 : 0;
  // Each block reads the row's k indices and gradients, and x at each of them.
  l.bytes_read = rows * n * e.in + rows * plan.chunks * k * (8 + 2 * e.in) + rows * e.state();
  l.bytes_reread = rows * (plan.chunks - 1) * k * (8 + 2 * e.in);
  l.bytes_written = rows * n * e.in;
  return plan;
}

// ---- sampling (sample.cu): a block per row of n contiguous elements ----

// sample_categorical's workspace: one (m, d) per chunk of every row, whatever the draws.
inline int64_t sample_state_bytes(int64_t rows, int64_t n, ElemBytes e) {
  return rows * ((n + kSampleChunk - 1) / kSampleChunk) * e.state();
}

// A block that owns whole rows and loops over them when the grid is capped.
inline Launch& add_row_block_launch(LaunchPlan& plan, const char* kernel, int64_t rows, DeviceLimits limits) {
  Launch& l = plan.add(kernel);
  l.block_x = kSampleThreads;
  l.grid = capped_grid(rows, limits);
  l.threads_per_row = kSampleThreads;
  l.rows_per_block = 1;
  return l;
}

// The bytes of num_edits sparse logit edits per row: an int64 id and an accumulation-type value each.
inline int64_t sample_edit_bytes(int64_t rows, int64_t num_edits, ElemBytes e) {
  return rows * num_edits * (8 + e.acc);
}

// sample_categorical with num_samples draws per row; `cut` when min_log_ratio is given (a max pass
// first, so x is read twice). A draw walks its row's chunk states to one chunk and scans that chunk
// of x: both are in cache and depend on the uniforms, so the model leaves them out. num_edits: the
// width of edit_ids (0 without edits), read with x on every pass.
inline LaunchPlan plan_sample(int64_t rows, int64_t n, int64_t num_samples, bool cut, ElemBytes e,
                              DeviceLimits limits, int64_t num_edits = 0) {
  LaunchPlan plan;
  if (rows == 0 || n == 0 || num_samples == 0) return plan;
  plan.path = Path::kSample;
  plan.chunk = kSampleChunk;
  plan.chunks = (n + kSampleChunk - 1) / kSampleChunk;
  const int64_t x_bytes = rows * n * e.in + sample_edit_bytes(rows, num_edits, e);
  const int64_t state_bytes = sample_state_bytes(rows, n, e);
  const int64_t draws = rows * num_samples;
  plan.workspace_bytes = size_t(state_bytes);
  Launch& l = add_row_block_launch(plan, "sample_kernel", rows, limits);
  // x (twice with a cut), temperature and min_log_ratio per row, a uniform per draw, and the chunk
  // states once more for the row's total.
  l.bytes_read = x_bytes * (cut ? 2 : 1) + rows * 8 * (cut ? 2 : 1) + draws * 8 + state_bytes;
  l.bytes_reread = (cut ? x_bytes : 0) + state_bytes;
  l.bytes_written = state_bytes + draws * (8 + e.acc);  // the chunk states, a token and log-prob per draw
  return plan;
}

// top_p_threshold: a max pass, then passes that each count 16 probes of a narrowing bracket. Only
// the first probe pass is modelled: how many follow (at most 23) depends on the data, and every one
// re-reads the row from cache. num_edits as plan_sample's.
inline LaunchPlan plan_top_p(int64_t rows, int64_t n, ElemBytes e, DeviceLimits limits, int64_t num_edits = 0) {
  LaunchPlan plan;
  if (rows == 0 || n == 0) return plan;
  plan.path = Path::kTopP;
  const int64_t x_bytes = rows * n * e.in + sample_edit_bytes(rows, num_edits, e);
  Launch& l = add_row_block_launch(plan, "top_p_kernel", rows, limits);
  l.bytes_read = 2 * x_bytes + rows * 16;  // x twice, temperature and top_p
  l.bytes_reread = x_bytes;
  l.bytes_written = rows * 16;             // log_ratio and status
  return plan;
}

// ---- rejection_sample (rejection_sample.cu) ----

// The plan of rejection_sample over target (batch, n + 1, vocab): `cut` when min_log_ratio is given,
// `draft_bytes` the element size of draft_probs (0 without them: one-hot drafts).
//
// Every target position 0..n of every batch row is a row of vocab elements cut into chunks of
// kRejectionChunk; a state kernel leaves one (max, mass) per chunk, with its blocks each covering
// part_chunks chunks of one row. Few rows (batch 1 of a speculative step: 9 rows of 128256) are cut
// into parts so that about 8 blocks run per SM; many rows take a block per row. A row has at most
// 1024 parts: with a cut, each state block merges its row's part maxima. The cut needs the row's
// max before any mass is summed, so with one a max kernel runs first and the state kernel reads
// the rows a second time (from L2 when they fit). The last kernel is a block per batch row: it merges
// each position's chunk states and walks the positions in order; only a rejection reads a row again
// (the target row and its draft row, for the residual's chunk masses).
//
// The model counts what a call reads and writes when every row verifies all n drafts and every row
// ends in a rejection (the most a call can read); positions past a row's num_draft_tokens are never
// read, and a row that accepts everything rescans one chunk for its bonus token instead. The chunk
// rescans of the draws and of the greedy arg-max depend on the data and hit the cache: left out.
inline LaunchPlan plan_rejection_sample(int64_t batch, int64_t n, int64_t vocab, bool cut, int draft_bytes,
                                        ElemBytes e, DeviceLimits limits) {
  LaunchPlan plan;
  if (batch == 0 || vocab == 0) return plan;
  plan.path = Path::kRejection;
  const int64_t rows = batch * (n + 1);
  const int64_t warps = kRejectionThreads / 32;
  plan.chunk = kRejectionChunk;
  plan.chunks = (vocab + kRejectionChunk - 1) / kRejectionChunk;
  const int64_t sms = std::max(1, limits.num_sms);
  const int64_t want_parts = std::max<int64_t>(1, (8 * sms + rows - 1) / rows);
  // Whole warps' worth of chunks per block: a block with fewer chunks than warps leaves warps idle.
  int64_t per = (plan.chunks + want_parts - 1) / want_parts;
  per = std::max<int64_t>(warps, (per + warps - 1) / warps * warps);
  per = std::max(per, (plan.chunks + 1023) / 1024);
  plan.part_chunks = per;
  plan.parts = (plan.chunks + per - 1) / per;

  const int64_t x_bytes = rows * vocab * e.in;
  const int64_t state_bytes = rows * plan.chunks * (e.acc + 8);  // m in the accumulation type, d in double
  const int64_t part_max_bytes = cut ? rows * plan.parts * e.acc : 0;
  const int64_t residual_bytes = batch * plan.chunks * 8;
  plan.workspace_bytes = align256(size_t(rows * plan.chunks * e.acc)) + align256(size_t(rows * plan.chunks * 8)) +
                         align256(size_t(part_max_bytes)) + size_t(residual_bytes);
  const int64_t params = batch * 16 + (cut ? rows * 8 : 0);  // temperature and num_drafts per row (and the cuts)
  auto state_launch = [&](const char* kernel) -> Launch& {
    Launch& l = plan.add(kernel);
    l.block_x = kRejectionThreads;
    l.grid = capped_grid(rows * plan.parts, limits);
    l.threads_per_row = int64_t(kRejectionThreads) * plan.parts;
    l.rows_per_block = plan.parts == 1 ? 1 : 0;
    return l;
  };
  if (cut) {
    Launch& mx = state_launch("rejection_max_kernel");
    mx.bytes_read = x_bytes + params;
    mx.bytes_written = part_max_bytes;
  }
  Launch& st = state_launch("rejection_states_kernel");
  // With a cut every block reads its row's part maxima.
  const int64_t part_max_reads = cut ? rows * plan.parts * plan.parts * e.acc : 0;
  st.bytes_read = x_bytes + params + part_max_reads;
  st.bytes_reread = (cut ? x_bytes + params : 0) + part_max_reads;
  st.bytes_written = state_bytes;
  Launch& v = plan.add("rejection_sample_kernel");
  v.block_x = kRejectionThreads;
  v.grid = capped_grid(batch, limits);
  v.threads_per_row = kRejectionThreads;
  v.rows_per_block = 1;
  // The chunk states; per position its uniform, and per draft its id, its target logit and q; at the
  // rejection the target row again and the draft row, and the residual's chunk masses written and
  // read back.
  const int64_t drafts = batch * n;
  const int64_t row_again = batch * vocab * e.in;
  v.bytes_read = state_bytes + params + rows * 8 + drafts * (8 + e.in + draft_bytes) + row_again +
                 batch * vocab * draft_bytes + residual_bytes;
  v.bytes_reread = state_bytes + params + row_again + residual_bytes;
  v.bytes_written = rows * (8 + e.acc) + batch * 8 + residual_bytes;  // token_ids, log_probs, num_accepted
  return plan;
}

// ---- token_logprobs (token_logprobs.cu) ----

// Whether token_logprobs' kernel selects the top-n in its pass: the candidate buffer of the fused
// top-k holds top_n <= topk_max_k_for(in_bytes), with int32 refs (rows below 2^30 elements).
// Otherwise (and for top_n = 0) it selects nothing, and the binding takes the top-n from
// softmax_topk (a second read of x, not modelled here: its own plan).
inline bool token_logprobs_selects(int64_t n, int64_t top_n, int in_bytes) {
  return top_n > 0 && top_n <= topk_max_k_for(in_bytes) && n < (int64_t(1) << 30);
}

// A block per row reads the row once: the state, the entropy accumulator, the rank count and the
// top-n candidates. `values`: token_values given (one accumulation-type value per row), else the
// token's own x is read (a re-read of one element of the row).
inline LaunchPlan plan_token_logprobs(int64_t rows, int64_t n, int64_t top_n, bool values, ElemBytes e,
                                      DeviceLimits limits) {
  LaunchPlan plan;
  if (rows == 0 || n == 0) return plan;
  plan.path = Path::kTokenLogprobs;
  plan.config = token_logprobs_selects(n, top_n, e.in) ? 1 : 0;
  Launch& l = plan.add("token_logprobs_kernel");
  l.block_x = kTopKThreads;
  l.grid = capped_grid(rows, limits);
  l.threads_per_row = kTopKThreads;
  l.rows_per_block = 1;
  const int64_t token_value = values ? e.acc : e.in;
  l.bytes_read = rows * n * e.in + rows * (8 + token_value);
  l.bytes_reread = values ? 0 : rows * e.in;
  // log_probs, rank, max, sumexp, entropy; the top-n ids and log-probabilities.
  l.bytes_written = rows * (4 * e.acc + 8) + (plan.config ? rows * top_n * (8 + e.acc) : 0);
  return plan;
}

// ---- the elementwise gradients (row_gradient.cuh): cross_entropy_backward, token_logprobs_backward ----

// Elementwise within a row (softmax from the saved (max, sumexp), no reduction), so nothing is kept on chip:
// the rows of plan_rows' register configurations are only the thread mapping (every thread's
// granules loaded before any is written), and its split path cuts long or few rows into chunks of a
// block each, with no merge to follow. row_bytes: the per-row arguments of all rows (each chunk's
// block reads its row's again); once_bytes: what every row reads again from L2 (counted once).
inline LaunchPlan plan_row_gradient(int64_t rows, int64_t n, ElemBytes e, int64_t row_bytes, int64_t once_bytes,
                                    const char* rows_kernel, const char* chunks_kernel, DeviceLimits limits) {
  if (rows == 0 || n == 0) return LaunchPlan{};
  const int vec = e.vec();
  LaunchPlan plan = plan_rows(rows, n, vec, limits, 0, kMaxRegisterGranules);
  const int64_t x_bytes = rows * n * e.in, out_bytes = rows * n * e.out;
  add_on_chip_row_launch(plan, rows, n, vec, limits, {rows_kernel, "", 0}, x_bytes + row_bytes + once_bytes,
                         out_bytes);
  if (plan.path == Path::kSplit) {
    Launch& l = plan.add(chunks_kernel);
    l.block_x = kSplitThreads;
    l.grid = capped_grid(rows * plan.chunks, limits);
    l.threads_per_row = kSplitThreads * plan.chunks;
    const int64_t reread = (plan.chunks - 1) * row_bytes;
    l.bytes_read = x_bytes + row_bytes + reread + once_bytes;
    l.bytes_reread = reread;
    l.bytes_written = out_bytes;
  }
  return plan;
}

// cross_entropy_backward (cross_entropy.cu): out = p_scale * softmax(x) - one-hot - smoothing.
// `smooth` / `weight`: whether the call passes smooth_scale, and weight with it (weight is read only
// with smooth_scale).
inline LaunchPlan plan_cross_entropy_backward(int64_t rows, int64_t n, ElemBytes e, bool smooth, bool weight,
                                              DeviceLimits limits) {
  // max, sumexp, p_scale, target_scale (and smooth_scale) per row, the int64 target; weight once.
  const int64_t row_bytes = rows * ((smooth ? 5 : 4) * e.acc + 8);
  const int64_t weight_bytes = smooth && weight ? n * e.acc : 0;
  return plan_row_gradient(rows, n, e, row_bytes, weight_bytes, "cross_entropy_backward_rows_kernel",
                           "cross_entropy_backward_chunks_kernel", limits);
}

// token_logprobs_backward (token_logprobs_backward.cu): the gradient of log p[token] and of the entropy.
// grad_entropy: whether the call passes it (and with it the entropy is read).
inline LaunchPlan plan_token_logprobs_backward(int64_t rows, int64_t n, ElemBytes e, bool grad_entropy,
                                               DeviceLimits limits) {
  // grad_log_probs, max, sumexp (with grad_entropy: it and entropy) per row, the int64 token id.
  const int64_t row_bytes = rows * ((grad_entropy ? 5 : 3) * e.acc + 8);
  return plan_row_gradient(rows, n, e, row_bytes, 0, "token_logprobs_backward_rows_kernel",
                           "token_logprobs_backward_chunks_kernel", limits);
}

// ---- masked_forward (masked_softmax.cu) ----

constexpr int kMaxMaskDims = 8;

// How the masked forward finds row r's mask: r's coordinates over sizes (x's shape without its
// last dim, at most kMaxMaskDims after merging) dotted with strides (0 where the mask broadcasts),
// then element j at + j * col_stride (0 or 1). kind 0: no mask; 1: bool, true takes part; 2:
// additive, in the accumulation type. causal_rows > 0: key j of query r % causal_rows takes part
// only where j <= that query + causal_offset.
struct MaskLayout {
  int kind = 0;
  const void* mask = nullptr;
  int dims = 0;
  int64_t sizes[kMaxMaskDims] = {};
  int64_t strides[kMaxMaskDims] = {};
  int64_t col_stride = 0;
  int64_t causal_rows = 0;
  int64_t causal_offset = 0;
};

// The bytes of mask the rows read (its own size, not x's): what the traffic model counts.
inline int64_t masked_mask_bytes(const MaskLayout& m, int64_t rows, int64_t n, int acc_bytes) {
  if (m.kind == 0 || rows == 0) return 0;
  int64_t count = m.col_stride != 0 ? n : 1;
  for (int k = 0; k < m.dims; ++k)
    if (m.strides[k] != 0) count *= m.sizes[k];
  return count * (m.kind == 1 ? 1 : acc_bytes);
}

inline LaunchPlan plan_masked_forward(int64_t rows, int64_t n, ElemBytes e, int64_t mask_bytes, DeviceLimits limits) {
  if (rows == 0 || n == 0) return LaunchPlan{};
  const int vec = e.vec();
  const int64_t x_bytes = rows * n * e.in, y_bytes = rows * n * e.out;
  LaunchPlan plan = plan_rows(rows, n, vec, limits, 0, kMaxRegisterGranules);
  if (plan.path == Path::kRegisters) {
    // The output pass reads the mask again, from L1/L2 (it is no larger than the rows).
    add_on_chip_row_launch(plan, rows, n, vec, limits, {"masked_rows_kernel", "", 0}, x_bytes + mask_bytes, y_bytes);
    return plan;
  }
  plan = LaunchPlan{};
  plan.path = Path::kTwoPass;
  Launch& l = plan.add("masked_two_pass_kernel");
  l.block_x = kSplitThreads;
  l.grid = capped_grid(rows, limits);
  l.threads_per_row = kSplitThreads;
  l.rows_per_block = 1;
  l.bytes_read = 2 * (x_bytes + mask_bytes);
  l.bytes_reread = x_bytes + mask_bytes;
  l.bytes_written = y_bytes;
  return plan;
}

// ---- distillation (distillation.cu) ----

// distillation_forward: a block per row reads the student and teacher rows once (jsd: twice, the
// second for log m, counted as a re-read), and the int64 target with one of its logits when given;
// writes the loss and the 7 stats. Rows of an empty vocabulary still take a block (their loss is
// NaN, or 0 where ignored).
inline LaunchPlan plan_distillation_forward(int64_t rows, int64_t n, ElemBytes e, bool target, bool jsd,
                                            DeviceLimits limits) {
  LaunchPlan plan;
  if (rows == 0) return plan;
  plan.path = Path::kDistillation;
  Launch& l = plan.add("distillation_forward_kernel");
  l.block_x = kDistillationThreads;
  l.grid = capped_grid(rows, limits);
  l.threads_per_row = kDistillationThreads;
  l.rows_per_block = 1;
  const int64_t both = 2 * rows * n * e.in;
  l.bytes_reread = (jsd ? both : 0) + (target ? rows * e.in : 0);
  l.bytes_read = both + (target ? rows * 8 : 0) + l.bytes_reread;
  l.bytes_written = rows * 8 * e.acc;
  return plan;
}

// distillation_backward: row_gradient.cuh's mapping over the student; each granule's teacher
// elements are read beside it (once, counted with the once-bytes: they do not grow with a split).
inline LaunchPlan plan_distillation_backward(int64_t rows, int64_t n, ElemBytes e, bool target, DeviceLimits limits) {
  // grad_loss and the 7 stats per row, the int64 target when given.
  const int64_t row_bytes = rows * (8 * e.acc + (target ? 8 : 0));
  return plan_row_gradient(rows, n, e, row_bytes, rows * n * e.in, "distillation_backward_rows_kernel",
                           "distillation_backward_chunks_kernel", limits);
}

}  // namespace online_softmax::kernels
