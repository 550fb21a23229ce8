// The host runtime behind runtime.h: fibers, the block scheduler, barriers, shuffles, shared memory
// and the few CUDA runtime calls the launchers make. Test-only.
//
// A block's threads are fibers on the calling OS thread. A fiber runs until it has to wait (a
// barrier or a shuffle) or ends; the scheduler then picks the next runnable fiber by the schedule:
// the lowest thread index, the highest, or a seeded random one. Picking greedily (not round-robin)
// lets one warp race as far ahead as the synchronization allows, which is what exposes a missing
// barrier. When no fiber can run and some are waiting, the launch fails with a description of who
// waits where, instead of hanging.
#include "kernels/host/runtime.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cxxabi.h>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <typeinfo>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define OSM_HOST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define OSM_HOST_ASAN 1
#endif
#endif
#if defined(OSM_HOST_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif


namespace online_softmax::host_runtime {
namespace {

// ---- context switching ----
#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save, and resumes the context whose stack pointer is `load`.
extern "C" void osm_host_switch(void** save, void* load);
asm(R"(
  .text
  .globl osm_host_switch
  .hidden osm_host_switch
  .type osm_host_switch, @function
osm_host_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size osm_host_switch, .-osm_host_switch
)");
#endif

constexpr int kMaxThreads = 1024;
constexpr size_t kPage = 4096;
#if defined(OSM_HOST_ASAN)
constexpr size_t kStackBytes = 512 * 1024;  // ASan's redzones make frames larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

enum class Wait { kRunnable, kBarrier, kShuffle, kDone };

struct Fiber {
  ThreadContext ctx;
  int warp = 0;
  int lane = 0;
  Wait wait = Wait::kRunnable;
  const char* file = nullptr;  // where it waits
  int line = 0;
  // a pending shuffle (its mask, kind and width are the PendingShuffle's)
  uint64_t bits = 0;
  int arg = 0;
  uint64_t result = 0;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  char* stack = nullptr;  // usable stack, above a guard page
#if defined(OSM_HOST_ASAN)
  void* fake_stack = nullptr;
#endif
};

// One exchange a warp is doing: the lanes of `mask`, at one call site.
struct PendingShuffle {
  unsigned mask = 0;
  unsigned arrived = 0;
  ShuffleKind kind = ShuffleKind::kXor;
  int width = 32;
  const char* file = nullptr;
  int line = 0;
};

struct TlsSegment {
  unsigned char* data = nullptr;
  size_t bytes = 0;
};

struct Runtime {
  std::mutex mutex;  // one launch at a time
  TlsSegment tls_segment;  // static shared memory (see static_shared_memory)
  pthread_t tls_owner{};
  // stacks: kMaxThreads of them, each kStackBytes above a guard page, mapped once
  char* stack_region = nullptr;
  std::vector<Fiber> fibers;
  int threads = 0;
  int warps = 0;
  Fiber* running = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_uc;
#endif
#if defined(OSM_HOST_ASAN)
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
  // the launch
  std::string name;  // the kernel as the launch spells it, and its parameter types
  dim3 grid, block;
  uint3 block_idx;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  std::string error;  // the first error of this launch
  // barrier
  int barrier_arrived = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  int exited = 0;
  std::vector<std::vector<PendingShuffle>> shuffles;  // per warp
  // dynamic shared memory: [dyn, dyn + dyn_bytes) ends at an inaccessible page
  unsigned char* dyn_region = nullptr;
  size_t dyn_region_bytes = 0;
  unsigned char* dyn = nullptr;
  size_t dyn_bytes = 0;
  std::unordered_map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute
  // schedule
  Schedule schedule = Schedule::kInOrder;
  std::mt19937_64 rng{0};
  unsigned char poison = 0xff;
  // results
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  std::string log;
  bool signals_installed = false;
};

Runtime& rt() {
  static Runtime* r = new Runtime();  // never destroyed: kernels may run during static teardown
  return *r;
}

std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> out(abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  return status == 0 && out ? std::string(out.get()) : std::string(mangled);
}

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

std::string where(const Fiber& f) {
  const Runtime& r = rt();
  return format("block (%u,%u,%u) thread (%u,%u,%u)", r.block_idx.x, r.block_idx.y, r.block_idx.z,
                f.ctx.thread_idx.x, f.ctx.thread_idx.y, f.ctx.thread_idx.z);
}

const char* short_file(const char* file) {
  if (file == nullptr) return "?";
  const char* k = std::strstr(file, "csrc/");
  return k != nullptr ? k : file;
}

// ---- fatal memory faults: name the kernel and thread, then let the previous handler run ----
struct sigaction previous_segv, previous_bus;
char alt_stack[64 * 1024];

void write_all(const char* s) {
  size_t n = std::strlen(s);
  while (n > 0) {
    const ssize_t w = ::write(2, s, n);
    if (w <= 0) return;
    s += w;
    n -= size_t(w);
  }
}

void on_fault(int sig, siginfo_t* info, void* uctx) {
  Runtime& r = rt();
  const auto* addr = static_cast<const unsigned char*>(info->si_addr);
  if (r.running != nullptr) {
    char msg[1536];
    const char* what = "memory fault";
    if (r.dyn != nullptr && addr >= r.dyn + r.dyn_bytes && addr < r.dyn_region + r.dyn_region_bytes) {
      what = "dynamic shared memory access beyond the launch's size";
    } else if (addr >= reinterpret_cast<const unsigned char*>(r.stack_region) &&
               addr < reinterpret_cast<const unsigned char*>(r.stack_region) + size_t(kMaxThreads) * (kStackBytes + kPage)) {
      what = "fiber stack overflow";
    }
    std::snprintf(msg, sizeof(msg),
                  "online_softmax host runtime: %s in kernel %s, %s, at address %p (dynamic shared memory: %zu bytes at %p)\n",
                  what, r.name.c_str(), where(*r.running).c_str(), info->si_addr, r.dyn_bytes,
                  static_cast<void*>(r.dyn));
    write_all(msg);
  }
  // Hand the fault to whoever handled it before (Python's faulthandler, or the default action).
  sigaction(sig, sig == SIGSEGV ? &previous_segv : &previous_bus, nullptr);
  (void)uctx;
}

void install_fault_handlers(Runtime& r) {
#if !defined(OSM_HOST_ASAN)  // ASan reports these faults itself
  if (r.signals_installed) return;
  stack_t ss{};
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof(alt_stack);
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &previous_segv);
  sigaction(SIGBUS, &sa, &previous_bus);
#endif
  r.signals_installed = true;
}

// ---- fibers ----
void fiber_main();

#if defined(__x86_64__)
void switch_to_fiber(Runtime& r, Fiber& f) {
#if defined(OSM_HOST_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  r.running = &f;
  osm_host_switch(&r.scheduler_sp, f.sp);
#if defined(OSM_HOST_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  r.running = nullptr;
}

void switch_to_scheduler(Runtime& r, Fiber& f) {
#if defined(OSM_HOST_ASAN)
  __sanitizer_start_switch_fiber(f.wait == Wait::kDone ? nullptr : &f.fake_stack, r.scheduler_stack_bottom,
                                 r.scheduler_stack_size);
#endif
  osm_host_switch(&f.sp, r.scheduler_sp);
#if defined(OSM_HOST_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, &r.scheduler_stack_bottom, &r.scheduler_stack_size);
#endif
}

void start_fiber(Fiber& f) {
#if defined(OSM_HOST_ASAN)
  __asan_unpoison_memory_region(f.stack, kStackBytes);  // frames of abandoned fibers left redzones
#endif
  // The frame osm_host_switch pops: MXCSR/x87 word, r15, r14, r13, r12, rbx, rbp, return address
  // (fiber_main), with the return-address slot 16-byte aligned as a call would leave it.
  auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);
  uint64_t* slot = top - 2;  // top[-1]: a null "return address" of fiber_main
  top[-1] = 0;
  slot[0] = reinterpret_cast<uint64_t>(&fiber_main);
  uint64_t* sp = slot - 7;
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 2);
  for (int i = 1; i < 7; ++i) sp[i] = 0;
  f.sp = sp;
}
#else
void switch_to_fiber(Runtime& r, Fiber& f) {
  r.running = &f;
  swapcontext(&r.scheduler_uc, &f.uc);
  r.running = nullptr;
}
void switch_to_scheduler(Runtime& r, Fiber& f) { swapcontext(&f.uc, &r.scheduler_uc); }
void start_fiber(Fiber& f) {
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_main, 0);
}
#endif

// Records the launch's first error; the failing fiber is abandoned (never resumed) and the
// scheduler ends the launch.
[[noreturn]] void fail_in_fiber(Runtime& r, Fiber& f, const std::string& what) {
  if (r.error.empty()) r.error = format("kernel %s, %s: %s", r.name.c_str(), where(f).c_str(), what.c_str());
  f.wait = Wait::kDone;
  switch_to_scheduler(r, f);
  std::abort();  // unreachable: an abandoned fiber is never resumed
}

void check_no_exited(Runtime& r, Fiber& f, const char* what, const char* file, int line) {
  if (r.exited == 0) return;
  for (const Fiber& g : r.fibers) {
    if (g.wait == Wait::kDone && &g != &f) {
      fail_in_fiber(r, f, format("reached %s at %s:%d after thread (%u,%u,%u) exited; every thread of the "
                                 "block must reach each barrier",
                                 what, short_file(file), line, g.ctx.thread_idx.x, g.ctx.thread_idx.y,
                                 g.ctx.thread_idx.z));
    }
  }
}

void fiber_main() {
  Runtime& r = rt();
  Fiber& f = *r.running;
#if defined(OSM_HOST_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack_bottom, &r.scheduler_stack_size);
#endif
  r.body(r.body_ctx);
  // The thread has returned from the kernel. Others must not be waiting for it.
  if (r.barrier_arrived > 0) {
    fail_in_fiber(r, f, format("exited while %d thread(s) wait at __syncthreads() at %s:%d", r.barrier_arrived,
                               short_file(r.barrier_file), r.barrier_line));
  }
  for (const PendingShuffle& p : r.shuffles[f.warp]) {
    if (p.mask >> f.lane & 1u) {
      fail_in_fiber(r, f, format("exited while lanes 0x%08x of its warp wait for it in a shuffle at %s:%d",
                                 p.arrived, short_file(p.file), p.line));
    }
  }
  f.wait = Wait::kDone;
  ++r.exited;
  switch_to_scheduler(r, f);
  std::abort();  // unreachable
}

// Blocks the running fiber until the scheduler resumes it.
void wait_here(Runtime& r, Fiber& f) {
  switch_to_scheduler(r, f);
}

Fiber& running_fiber() {
  Runtime& r = rt();
  if (r.running == nullptr) {
    std::fprintf(stderr, "online_softmax host runtime: a device function was called outside a kernel\n");
    std::abort();
  }
  return *r.running;
}

// ---- scheduling ----
int pick_runnable(Runtime& r) {
  int count = 0;
  int chosen = -1;
  const int n = r.threads;
  switch (r.schedule) {
    case Schedule::kInOrder:
      for (int i = 0; i < n; ++i)
        if (r.fibers[i].wait == Wait::kRunnable) return i;
      return -1;
    case Schedule::kReversed:
      for (int i = n - 1; i >= 0; --i)
        if (r.fibers[i].wait == Wait::kRunnable) return i;
      return -1;
    case Schedule::kRandom:
      for (int i = 0; i < n; ++i) {
        if (r.fibers[i].wait != Wait::kRunnable) continue;
        ++count;
        if (r.rng() % uint64_t(count) == 0) chosen = i;  // reservoir sampling: uniform over runnable
      }
      return chosen;
  }
  return -1;
}

std::string describe_deadlock(const Runtime& r) {
  std::string s = "deadlock: no thread can run;";
  int listed = 0;
  for (const Fiber& f : r.fibers) {
    if (f.wait == Wait::kDone || f.wait == Wait::kRunnable) continue;
    if (listed == 6) {
      s += " ...";
      break;
    }
    s += format(" thread (%u,%u,%u) waits at %s %s:%d;", f.ctx.thread_idx.x, f.ctx.thread_idx.y,
                f.ctx.thread_idx.z, f.wait == Wait::kBarrier ? "__syncthreads()" : "a shuffle", short_file(f.file),
                f.line);
    ++listed;
  }
  return s;
}

void poison(unsigned char* p, size_t n, Runtime& r) {
  if (r.schedule == Schedule::kRandom) {
    for (size_t i = 0; i < n; ++i) p[i] = static_cast<unsigned char>(r.rng());
  } else {
    std::memset(p, r.poison, n);
  }
}

// Maps (once) the fiber stacks, each above an inaccessible guard page.
void ensure_stacks(Runtime& r) {
  if (r.stack_region != nullptr) return;
  const size_t per = kStackBytes + kPage;
  void* p = mmap(nullptr, per * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("online_softmax host runtime: mmap of the fiber stacks");
    std::abort();
  }
  r.stack_region = static_cast<char*>(p);
  r.fibers.resize(kMaxThreads);
  for (int i = 0; i < kMaxThreads; ++i) {
    char* guard = r.stack_region + size_t(i) * per;
    mprotect(guard, kPage, PROT_NONE);
    r.fibers[i].stack = guard + kPage;
  }
}

// Dynamic shared memory of exactly `bytes` (rounded up to 16, the alignment CUDA guarantees),
// ending where an inaccessible page begins.
void map_dynamic_shared(Runtime& r, size_t bytes) {
  const size_t rounded = (bytes + 15) / 16 * 16;
  const size_t data_pages = (rounded + kPage - 1) / kPage;
  const size_t region = (data_pages + 1) * kPage;
  if (r.dyn_region_bytes < region) {
    if (r.dyn_region != nullptr) munmap(r.dyn_region, r.dyn_region_bytes);
    void* p = mmap(nullptr, region, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("online_softmax host runtime: mmap of dynamic shared memory");
      std::abort();
    }
    r.dyn_region = static_cast<unsigned char*>(p);
    r.dyn_region_bytes = region;
  }
  // Re-arm: everything accessible except the last page.
  mprotect(r.dyn_region, r.dyn_region_bytes - kPage, PROT_READ | PROT_WRITE);
  mprotect(r.dyn_region + r.dyn_region_bytes - kPage, kPage, PROT_NONE);
  unsigned char* end = r.dyn_region + r.dyn_region_bytes - kPage;
  r.dyn = end - rounded;
  r.dyn_bytes = bytes;
}

// Static __shared__ variables are thread_local (runtime.h): this library's TLS segment, for the
// calling thread, holds all of them and tls_anchor. Found once per OS thread.
thread_local unsigned char tls_anchor;

int find_tls(struct dl_phdr_info* info, size_t, void* out) {
  Dl_info self;
  if (dladdr(reinterpret_cast<void*>(&find_tls), &self) == 0) return 1;
  if (reinterpret_cast<void*>(info->dlpi_addr) != self.dli_fbase) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type == PT_TLS) {
      static_cast<TlsSegment*>(out)->data = static_cast<unsigned char*>(info->dlpi_tls_data);
      static_cast<TlsSegment*>(out)->bytes = info->dlpi_phdr[i].p_memsz;
    }
  }
  return 1;
}

TlsSegment static_shared_memory(Runtime& r) {
  // Cached in the (non-TLS) runtime, per OS thread: a thread_local cache would be poisoned too.
  TlsSegment& segment = r.tls_segment;
  if (segment.data == nullptr || !pthread_equal(r.tls_owner, pthread_self())) {
    tls_anchor = 1;  // makes sure the segment is allocated for this thread
    TlsSegment found;
    dl_iterate_phdr(find_tls, &found);
    const auto* anchor = &tls_anchor;
    if (found.data == nullptr || anchor < found.data || anchor >= found.data + found.bytes) {
      std::fprintf(stderr, "online_softmax host runtime: cannot locate the TLS segment of static shared memory\n");
      std::abort();
    }
    segment = found;
    r.tls_owner = pthread_self();
  }
  return segment;
}

bool run_block(Runtime& r) {
  // Fresh shared memory for the block: the kernels' static __shared__ variables and the dynamic
  // allocation are poisoned, as uninitialized shared memory holds leftovers on a GPU. (The poison
  // also covers the anchor and this very cache, which are re-read or harmless.)
  {
    const TlsSegment seg = static_shared_memory(r);
    poison(seg.data, seg.bytes, r);
  }
  poison(r.dyn, (r.dyn_bytes + 15) / 16 * 16, r);
  r.barrier_arrived = 0;
  r.exited = 0;
  for (auto& w : r.shuffles) w.clear();
  for (int i = 0; i < r.threads; ++i) {
    Fiber& f = r.fibers[i];
    f.warp = i / 32;
    f.lane = i % 32;
    f.wait = Wait::kRunnable;
    f.file = nullptr;
    f.line = 0;
    f.ctx.thread_idx = make_uint3(i % r.block.x, (i / r.block.x) % r.block.y, i / (r.block.x * r.block.y));
    f.ctx.block_idx = r.block_idx;
    f.ctx.block_dim = r.block;
    f.ctx.grid_dim = r.grid;
    start_fiber(f);
  }
  int done = 0;
  while (done < r.threads) {
    const int next = pick_runnable(r);
    if (next < 0) {
      r.error = format("kernel %s, block (%u,%u,%u): %s", r.name.c_str(), r.block_idx.x, r.block_idx.y,
                       r.block_idx.z, describe_deadlock(r).c_str());
      return false;
    }
    Fiber& f = r.fibers[next];
    switch_to_fiber(r, f);
    if (!r.error.empty()) return false;
    if (f.wait == Wait::kDone) ++done;
  }
  return true;
}

}  // namespace

const ThreadContext& current() { return running_fiber().ctx; }

void syncthreads(const char* file, int line) {
  Runtime& r = rt();
  Fiber& f = running_fiber();
  check_no_exited(r, f, "__syncthreads()", file, line);
  if (r.barrier_arrived > 0 && (r.barrier_line != line || std::strcmp(r.barrier_file, file) != 0)) {
    fail_in_fiber(r, f, format("divergent barrier: reached __syncthreads() at %s:%d while %d thread(s) wait at "
                               "the one at %s:%d",
                               short_file(file), line, r.barrier_arrived, short_file(r.barrier_file),
                               r.barrier_line));
  }
  r.barrier_file = file;
  r.barrier_line = line;
  if (++r.barrier_arrived < r.threads) {
    f.wait = Wait::kBarrier;
    f.file = file;
    f.line = line;
    wait_here(r, f);
    return;
  }
  // The last arrival releases everyone (itself included, without a switch).
  r.barrier_arrived = 0;
  for (int i = 0; i < r.threads; ++i) {
    if (r.fibers[i].wait == Wait::kBarrier) r.fibers[i].wait = Wait::kRunnable;
  }
}

namespace {
// The lane a shuffle reads for `lane`, or -1 for "the caller's own value" (CUDA's rule for a
// source outside the caller's width-segment, or above/below it for down/up).
int source_lane(ShuffleKind kind, int lane, int arg, int width) {
  const int segment = lane / width * width;
  switch (kind) {
    case ShuffleKind::kXor: {
      const int src = lane ^ arg;
      return src >= segment + width ? -1 : src;
    }
    case ShuffleKind::kIdx:
      return segment + (arg % width + width) % width;
    case ShuffleKind::kDown:
      return lane + arg >= segment + width ? -1 : lane + arg;
    case ShuffleKind::kUp:
      return lane - arg < segment ? -1 : lane - arg;
  }
  return -1;
}
}  // namespace

uint64_t shuffle(ShuffleKind kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  Runtime& r = rt();
  Fiber& f = running_fiber();
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail_in_fiber(r, f, format("shuffle at %s:%d with width %d: it must be a power of two <= 32", short_file(file),
                               line, width));
  }
  if ((mask >> f.lane & 1u) == 0) {
    fail_in_fiber(r, f, format("lane %d calls a shuffle at %s:%d with mask 0x%08x, which excludes itself", f.lane,
                               short_file(file), line, mask));
  }
  const int warp_lanes = std::min(32, r.threads - f.warp * 32);
  const unsigned existing = warp_lanes == 32 ? 0xffffffffu : ((1u << warp_lanes) - 1u);
  if ((mask & ~existing) != 0) {
    fail_in_fiber(r, f, format("shuffle at %s:%d names lanes 0x%08x, but this warp has only %d lane(s) (block of "
                               "%d threads)",
                               short_file(file), line, mask, warp_lanes, r.threads));
  }
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && r.fibers[f.warp * 32 + l].wait == Wait::kDone) {
      fail_in_fiber(r, f, format("shuffle at %s:%d names lane %d, which has exited", short_file(file), line, l));
    }
  }
  auto& pending = r.shuffles[f.warp];
  PendingShuffle* mine = nullptr;
  for (PendingShuffle& p : pending) {
    if ((p.mask & mask) == 0) continue;
    if (p.mask != mask || p.line != line || std::strcmp(p.file, file) != 0 || p.kind != kind || p.width != width) {
      fail_in_fiber(r, f, format("lanes of one warp disagree on a shuffle: lane %d is at %s:%d with mask 0x%08x, "
                                 "lanes 0x%08x at %s:%d with mask 0x%08x",
                                 f.lane, short_file(file), line, mask, p.arrived, short_file(p.file), p.line,
                                 p.mask));
    }
    mine = &p;
  }
  if (mine == nullptr) {
    pending.push_back(PendingShuffle{mask, 0u, kind, width, file, line});
    mine = &pending.back();
  }
  f.bits = bits;
  f.arg = arg;
  f.file = file;
  f.line = line;
  mine->arrived |= 1u << f.lane;
  if (mine->arrived != mask) {
    f.wait = Wait::kShuffle;
    wait_here(r, f);
    return f.result;
  }
  // Every named lane is here: exchange, release them, retire the exchange.
  Fiber* lanes = &r.fibers[f.warp * 32];
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) == 0) continue;
    const int src = source_lane(kind, l, lanes[l].arg, width);
    if (src >= 0 && (mask >> src & 1u) == 0) {
      fail_in_fiber(r, f, format("shuffle at %s:%d: lane %d reads lane %d, which is not in the mask 0x%08x",
                                 short_file(file), line, l, src, mask));
    }
    lanes[l].result = src < 0 ? lanes[l].bits : lanes[src].bits;
  }
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && lanes[l].wait == Wait::kShuffle) lanes[l].wait = Wait::kRunnable;
  }
  const uint64_t result = f.result;
  pending.erase(pending.begin() + (mine - pending.data()));
  return result;
}

unsigned char* dynamic_shared() {
  running_fiber();
  return rt().dyn;
}

cudaError_t run_grid(const char* name, const char* signature, const void* kernel, dim3 grid, dim3 block,
                     size_t smem, void (*body)(void*), void* ctx) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.log += format("%s grid=%u block=%ux%u smem=%zu\n", name, grid.x, block.x, block.y, smem);
  r.name = std::string(name) + " [" + demangle(signature) + "]";
  r.error.clear();
  auto refuse = [&](cudaError_t code, const std::string& why) {
    r.last_error = code;
    r.last_message = format("kernel %s: %s", r.name.c_str(), why.c_str());
    return code;
  };
  // The configuration checks a GPU makes at launch.
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64) {
    return refuse(cudaErrorInvalidConfiguration,
                  format("block (%u,%u,%u): 1..1024 threads, z <= 64", block.x, block.y, block.z));
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    return refuse(cudaErrorInvalidConfiguration, format("grid (%u,%u,%u) out of range", grid.x, grid.y, grid.z));
  }
  if (smem > 48 * 1024) {
    auto it = r.max_dynamic_smem.find(kernel);
    const int allowed = it == r.max_dynamic_smem.end() ? 48 * 1024 : it->second;
    if (smem > size_t(allowed)) {
      return refuse(cudaErrorInvalidValue,
                    format("%zu bytes of dynamic shared memory, but cudaFuncSetAttribute allowed %d", smem, allowed));
    }
  }
  install_fault_handlers(r);
  ensure_stacks(r);
  r.threads = int(threads);
  r.warps = (r.threads + 31) / 32;
  r.shuffles.assign(size_t(r.warps), {});
  r.grid = grid;
  r.block = block;
  r.body = body;
  r.body_ctx = ctx;
  map_dynamic_shared(r, smem);
  // Blocks in the schedule's order.
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  if (r.schedule == Schedule::kReversed) std::reverse(order.begin(), order.end());
  if (r.schedule == Schedule::kRandom) std::shuffle(order.begin(), order.end(), r.rng);
  for (uint64_t b : order) {
    r.block_idx = make_uint3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y)));
    if (!run_block(r)) {
      r.running = nullptr;
      r.last_error = cudaErrorLaunchFailure;
      r.last_message = r.error;  // already names the kernel, block and thread
      return r.last_error;
    }
  }
  r.dyn = nullptr;
  r.dyn_bytes = 0;
  return cudaSuccess;
}

void set_schedule(Schedule schedule, uint64_t seed) {
  Runtime& r = rt();
  r.schedule = schedule;
  r.rng.seed(seed);
  r.poison = schedule == Schedule::kInOrder ? 0xff : 0x7f;  // NaN-like, or huge finite floats
}

const char* last_error_message() { return rt().last_message.c_str(); }
const char* launch_log() { return rt().log.c_str(); }
void clear_launch_log() { rt().log.clear(); }

}  // namespace online_softmax::host_runtime

// ---- the CUDA runtime calls the launchers make ----
using online_softmax::host_runtime::rt;

extern "C" cudaError_t cudaGetLastError(void) {
  const cudaError_t e = rt().last_error;
  rt().last_error = cudaSuccess;
  return e;
}

extern "C" cudaError_t cudaPeekAtLastError(void) { return rt().last_error; }

extern "C" cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    // The limit the tests pass in DeviceLimits stands for the device's opt-in maximum.
    if (value < 0) return cudaErrorInvalidValue;
    rt().max_dynamic_smem[func] = value;
  }
  return cudaSuccess;
}

// Static shared memory is not measured here (thread_local variables): reported as none, so an
// opt-in at the device maximum allows the whole limit the tests pass.
extern "C" cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  if (attr == nullptr || func == nullptr) return cudaErrorInvalidValue;
  *attr = cudaFuncAttributes{};
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

extern "C" const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "host runtime error";
  }
}
