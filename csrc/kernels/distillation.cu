// CUDA distillation_forward and distillation_backward (semantics: csrc/ops.cpp; the row algebra:
// distillation_math.h, shared with the CPU kernels).
//
// Forward: a block per row (the grid loops over rows). Each thread keeps one partial of its
// elements (i = thread, thread + block, ...) at its own running maxes, rebased when one rises; the
// block's partials merge in double through a fixed tree in shared memory, so a row's bits depend on
// the plan alone. One read of each row; jsd reads it again (mostly from L2) for log m. Backward:
// row_gradient.cuh's elementwise kernels over the student, each granule's teacher elements loaded
// beside it: one read of both rows and one write (out may be the student itself).
#include "kernels/distillation_math.h"
#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/row_gradient.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace {

namespace dm = online_softmax::distill;

template <typename T>
using A_t = acc_t<T>;

template <typename T>
struct DistillForwardArgs {
  const T* student;
  const T* teacher;
  const int64_t* target;  // may be null
  A_t<T>* loss;
  A_t<T>* stats;
  int64_t rows, n, ignore_index;
  A_t<T> sc;              // 1 / temperature, as the CPU kernels round it
  double beta, hard_weight;
  int kind;
  bool need_d1;           // a target at a temperature other than 1
  int* error;             // may be null
};

template <typename T>
__global__ void __launch_bounds__(kDistillationThreads) distillation_forward_kernel(DistillForwardArgs<T> a) {
  using A = A_t<T>;
  __shared__ dm::Partial<double> part[kDistillationThreads];
  __shared__ double jsum[2][kDistillationThreads];
  const int tid = threadIdx.x;
  const bool has_target = a.target != nullptr;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    A* st_out = a.stats + row * dm::kStats;
    const int64_t tgt = has_target ? a.target[row] : -1;
    if (has_target && (tgt == a.ignore_index || tgt < 0 || tgt >= a.n)) {
      // An ignored row is 0; a bad target flags the error (the binding asserts) and gives NaN.
      const bool ignored = tgt == a.ignore_index;
      if (tid == 0) {
        if (!ignored && a.error != nullptr) *a.error = 1;
        a.loss[row] = ignored ? A(0) : Limits<A>::nan();
      }
      if (tid < dm::kStats) st_out[tid] = A(0);
      continue;
    }
    const T* s = a.student + row * a.n;
    const T* t = a.teacher + row * a.n;
    dm::Partial<A> p = dm::empty_partial<A>(Limits<A>::lowest());
    for (int64_t i = tid; i < a.n; i += blockDim.x) dm::add_element(p, to_acc(s[i]), to_acc(t[i]), a.sc, a.need_d1);
    part[tid] = dm::Partial<double>{p.ms, p.mt, p.ds, p.dt, p.d1, p.x, p.yq, p.yp};
    __syncthreads();
    for (int stride = kDistillationThreads / 2; stride > 0; stride /= 2) {
      if (tid < stride) dm::merge_into(part[tid], part[tid + stride], double(a.sc));
      __syncthreads();
    }
    dm::Partial<double> total = part[0];
    double st[dm::kStats];
    const bool valid = dm::finish_stats(total, has_target, a.need_d1, st);
    double jq = 0, jp = 0;
    if (valid && a.kind == dm::kJsd) {
      const A ms = A(st[dm::kStudentMax]), mt = A(st[dm::kTeacherMax]), cst = ms - mt;
      const A inv_ds = A(1.0 / st[dm::kStudentSum]), inv_dt = A(1.0 / st[dm::kTeacherSum]);
      const A L = A(st[dm::kLogRatio]), beta = A(a.beta);
      A tq = 0, tp = 0;
      for (int64_t i = tid; i < a.n; i += blockDim.x)
        dm::jsd_element(to_acc(s[i]), to_acc(t[i]), ms, mt, cst, a.sc, inv_ds, inv_dt, L, beta, tq, tp);
      jsum[0][tid] = tq;
      jsum[1][tid] = tp;
      __syncthreads();
      for (int stride = kDistillationThreads / 2; stride > 0; stride /= 2) {
        if (tid < stride) {
          jsum[0][tid] += jsum[0][tid + stride];
          jsum[1][tid] += jsum[1][tid + stride];
        }
        __syncthreads();
      }
      jq = jsum[0][0];
      jp = jsum[1][0];
    }
    if (tid == 0) {
      const double s_tgt = has_target ? double(to_acc(s[tgt])) : 0.0;
      a.loss[row] = A(dm::row_loss(a.kind, total, jq, jp, a.beta, a.hard_weight, has_target, s_tgt, st));
      for (int k = 0; k < dm::kStats; ++k) st_out[k] = A(st[k]);
    }
    // The next row's partials overwrite part and jsum only after every thread has read them.
    __syncthreads();
  }
}

template <typename T>
struct DistillBackwardArgs {
  const T* x;             // the student
  const T* teacher;
  const int64_t* target;  // may be null
  const A_t<T>* grad_loss;
  const A_t<T>* stats;
  T* out;                 // may be x
  int64_t rows, n, ignore_index;
  A_t<T> sc, beta;
  double hard_weight;
  int kind;
  bool same_t;            // temperature 1: the cross-entropy's softmax is p itself
  int* error;             // may be null
};

// One row's scalars (from its stats), applied to every granule of it.
template <typename T>
struct DistillTerms {
  using A = A_t<T>;
  const T* trow;
  A ms, mt, cst, inv_ds, inv_dt, inv_d1, L, U, cw, dw;
  int64_t tgt;  // -1: no one-hot (no target, or out of range: *error is set)
  bool zero, has_target, same_t;

  __device__ DistillTerms(const DistillBackwardArgs<T>& a, int64_t row, bool report) {
    trow = a.teacher + row * a.n;
    has_target = a.target != nullptr;
    tgt = has_target ? a.target[row] : -1;
    zero = has_target && tgt == a.ignore_index;
    if (has_target && !zero && (tgt < 0 || tgt >= a.n)) {
      if (report && a.error != nullptr) *a.error = 1;
      tgt = -1;
    }
    const A* st = a.stats + row * dm::kStats;
    ms = st[dm::kStudentMax];
    mt = st[dm::kTeacherMax];
    cst = ms - mt;
    // A row in which a side has no distribution gets NaN factors: NaN gradients.
    const bool valid = dm::has_distribution(ms, st[dm::kStudentSum], Limits<A>::inf()) &&
                       dm::has_distribution(mt, st[dm::kTeacherSum], Limits<A>::inf());
    inv_ds = valid ? A(1) / st[dm::kStudentSum] : Limits<A>::nan();
    inv_dt = valid ? A(1) / st[dm::kTeacherSum] : Limits<A>::nan();
    inv_d1 = valid && has_target ? A(1) / st[dm::kStudentSum1] : Limits<A>::nan();
    L = st[dm::kLogRatio];
    U = st[dm::kU];
    const A g = a.grad_loss[row];
    cw = has_target ? A(g * a.hard_weight) : A(0);
    dw = has_target ? A(g * (1.0 - a.hard_weight)) : g;
    same_t = a.same_t;
  }

  template <int V>
  __device__ __forceinline__ void apply(const DistillBackwardArgs<T>& a, int64_t i0, A (&v)[V]) const {
    if (zero) {
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = A(0);
      return;
    }
    A tv[V];
    load_elems(trow, i0, a.n, tv, A(0));
    const int64_t rel = tgt - i0;  // the target's place in this granule (outside [0, V): none)
    // One loop per kind (kind is uniform), so that each keeps only its own temporaries live.
    if (a.kind == dm::kKl) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A p = exp((v[j] - ms) * a.sc) * inv_ds, q = exp((tv[j] - mt) * a.sc) * inv_dt;
        tv[j] = with_label(j == rel, v[j], p, (p - q) * a.sc);
      }
    } else if (a.kind == dm::kReverseKl) {
      divergence_loop<dm::kReverseKl>(a, rel, v, tv);
    } else {
      divergence_loop<dm::kJsd>(a, rel, v, tv);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = tv[j];
  }

  // reverse_kl's and jsd's terms (a kind fixed at compile time: each loop keeps only its own temporaries).
  template <int Kind, int V>
  __device__ __forceinline__ void divergence_loop(const DistillBackwardArgs<T>& a, int64_t rel, const A (&v)[V],
                                                  A (&tv)[V]) const {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A p = exp((v[j] - ms) * a.sc) * inv_ds;
      const A delta = ((v[j] - tv[j]) - cst) * a.sc - L;
      tv[j] = with_label(j == rel, v[j], p, dm::divergence_gradient(Kind, p, A(0), delta, U, a.beta, a.sc));
    }
  }

  // The element's gradient from its divergence term d (and its p at the temperature): weighted, plus
  // the cross-entropy's softmax at temperature 1 and one-hot when there is a target.
  __device__ __forceinline__ A with_label(bool at_target, A x, A p, A d) const {
    A g = d * dw;
    if (has_target) {
      const A p1 = same_t ? p : exp(x - ms) * inv_d1;
      g += p1 * cw;
      if (at_target) g -= cw;
    }
    return g;
  }
};

OSM_ROW_GRADIENT_KERNELS(distillation_backward, DistillBackwardArgs, DistillTerms)

}  // namespace

template <typename T>
cudaError_t distillation_forward(const T* student, const T* teacher, const int64_t* target, int kind, double beta,
                                 double temperature, double hard_weight, int64_t ignore_index, A_t<T>* loss,
                                 A_t<T>* stats, int64_t rows, int64_t n, int* error, DeviceLimits limits,
                                 cudaStream_t stream) {
  const LaunchPlan plan = plan_distillation_forward(rows, n, elem_bytes<T>(), target != nullptr,
                                                    kind == dm::kJsd, limits);
  if (plan.path == Path::kNothing) return cudaSuccess;
  const DistillForwardArgs<T> a{student, teacher, target, loss, stats, rows, n, ignore_index,
                                A_t<T>(1.0 / temperature), beta, hard_weight, kind,
                                target != nullptr && temperature != 1.0, error};
  const Launch& l = plan.launch[0];
  OSM_LAUNCH(l.grid, l.block_x, 0, stream, distillation_forward_kernel<T>)(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t distillation_backward(const T* student, const T* teacher, const int64_t* target, int kind, double beta,
                                  double temperature, double hard_weight, int64_t ignore_index,
                                  const A_t<T>* grad_loss, const A_t<T>* stats, T* out, int64_t rows, int64_t n,
                                  int* error, DeviceLimits limits, cudaStream_t stream) {
  const LaunchPlan plan = plan_distillation_backward(rows, n, elem_bytes<T>(), target != nullptr, limits);
  const DistillBackwardArgs<T> a{student, teacher, target, grad_loss, stats, out, rows, n, ignore_index,
                                 A_t<T>(1.0 / temperature), A_t<T>(beta), hard_weight, kind, temperature == 1.0, error};
  return distillation_backward_launch(plan, a, stream);
}

#define ONLINE_SOFTMAX_DISTILLATION(T)                                                                             \
  template cudaError_t distillation_forward<T>(const T*, const T*, const int64_t*, int, double, double, double,   \
                                               int64_t, A_t<T>*, A_t<T>*, int64_t, int64_t, int*, DeviceLimits,   \
                                               cudaStream_t);                                                     \
  template cudaError_t distillation_backward<T>(const T*, const T*, const int64_t*, int, double, double, double,  \
                                                int64_t, const A_t<T>*, const A_t<T>*, T*, int64_t, int64_t, int*, \
                                                DeviceLimits, cudaStream_t);
ONLINE_SOFTMAX_DISTILLATION(float)
ONLINE_SOFTMAX_DISTILLATION(double)
ONLINE_SOFTMAX_DISTILLATION(__half)
ONLINE_SOFTMAX_DISTILLATION(__nv_bfloat16)
#undef ONLINE_SOFTMAX_DISTILLATION

}  // namespace online_softmax::kernels
