// The distillation loss's per-row algebra, shared by the CPU kernels (csrc/cpu/kernels/distillation.h)
// and the CUDA kernel (csrc/kernels/distillation.cu): plain C++ that nvcc compiles for the device
// too. Semantics: distillation_forward in csrc/ops.cpp; oracle: online_softmax/reference/distillation.py.
//
// Notation: sc = 1 / temperature; a = (s - ms) sc and b = (t - mt) sc are the student's and the
// teacher's logits relative to a max (ms, mt) of their own; ab = ((s - t) - (ms - mt)) sc = a - b,
// taken from s - t (exact when s and t are close, Sterbenz) so that nearly equal distributions keep
// their small differences. A partial over some elements holds
//   ds = sum e^a, dt = sum e^b, d1 = sum e^(s - ms) (temperature 1, for the cross-entropy),
//   x = sum (e^a - e^b) (summed as e^b expm1(a - b): no cancellation), yq = sum e^b (a - b), yp = sum e^a (a - b),
// a zero-weight term being 0. At the row's maxes, with L = log(ds / dt) = log1p(x / dt):
//   KL(q || p) = L - yq / dt,   KL(p || q) = yp / ds - L.
// Each is a difference of two terms of the size of the logits' differences, never of log-sums of
// the size of log(vocab): two nearly equal rows give their tiny divergence to a relative accuracy
// of about eps / |s - t| instead of an absolute eps * log(vocab).
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define OSM_DISTILL_HD __host__ __device__ __forceinline__
#else
#define OSM_DISTILL_HD inline
#endif

namespace online_softmax::distill {

// The float overloads on the host (the global ones are double); CUDA maps these to its device math.
using std::exp;
using std::expm1;
using std::log;
using std::log1p;

enum Kind : int { kKl = 0, kReverseKl = 1, kJsd = 2 };

// Columns of the stats output (rows, kStats), in the accumulation dtype.
enum StatsColumn : int {
  kStudentMax = 0,     // raw max of s
  kStudentSum = 1,     // sum e^((s - max) / T)
  kTeacherMax = 2,     // raw max of t
  kTeacherSum = 3,     // sum e^((t - max) / T)
  kStudentSum1 = 4,    // sum e^(s - max) (temperature 1; the cross-entropy's)
  kLogRatio = 5,       // L = log(student sum / teacher sum) at the rows' maxes, from x (accurate)
  kU = 6,              // reverse_kl: KL(p || q); jsd: KL(p || m); kl: 0
  kStats = 7
};

template <typename A>
struct Partial {
  A ms, mt;  // the maxes the sums are relative to (the lowest finite value before any element)
  A ds, dt, d1, x, yq, yp;
};

template <typename A>
OSM_DISTILL_HD A nan_max2(A a, A b) {
  return (a != a || b != b) ? (a != a ? a : b) : (a > b ? a : b);
}

// sigma - rho, with sigma = e^(ls), rho = e^(lr): through expm1 when they are close.
template <typename A>
OSM_DISTILL_HD A exp_difference(A ls, A lr) {
  const A d = ls - lr;
  return (d > A(-0.5) && d < A(0.5)) ? exp(lr) * expm1(d) : exp(ls) - exp(lr);
}

// The partial p re-expressed at maxes (ms, mt) >= its own: the student's sums scale by sigma =
// e^((p.ms - ms) sc), the teacher's by rho = e^((p.mt - mt) sc), a - b shifts by delta = log sigma - log rho.
// Parts without any mass of a side keep that side's sums at 0 whatever the shift (no 0 * inf).
template <typename A>
OSM_DISTILL_HD void rebase(Partial<A>& p, A ms, A mt, A sc) {
  if (p.ms == ms && p.mt == mt) return;
  const A ls = (p.ms - ms) * sc, lr = (p.mt - mt) * sc, delta = ls - lr;
  const A sigma = exp(ls), rho = exp(lr);
  // x = sum (e^a - e^b) rescales side by side: sigma x + dt (sigma - rho), the difference through
  // expm1 when the shifts are close.
  p.x = sigma * p.x + (p.dt > A(0) ? p.dt * exp_difference(ls, lr) : A(0));
  p.yq = p.dt > A(0) ? rho * (p.yq + p.dt * delta) : A(0);
  p.yp = p.ds > A(0) ? sigma * (p.yp + p.ds * delta) : A(0);
  p.ds *= sigma;
  p.dt *= rho;
  p.d1 = p.d1 > A(0) ? p.d1 * exp(p.ms - ms) : A(0);
  p.ms = ms;
  p.mt = mt;
}

// a := a merged with b (a's elements first: the order is fixed by the caller).
template <typename A>
OSM_DISTILL_HD void merge_into(Partial<A>& a, Partial<A> b, A sc) {
  const A ms = nan_max2(a.ms, b.ms), mt = nan_max2(a.mt, b.mt);
  if (ms != ms || mt != mt) {  // NaN somewhere: the row is NaN (finish() says so)
    a.ms = ms;
    a.mt = mt;
    return;
  }
  rebase(a, ms, mt, sc);
  rebase(b, ms, mt, sc);
  a.ds += b.ds;
  a.dt += b.dt;
  a.d1 += b.d1;
  a.x += b.x;
  a.yq += b.yq;
  a.yp += b.yp;
}

// One element's terms at the partial's current maxes (used by scalar tails and the GPU threads).
template <typename A>
OSM_DISTILL_HD void add_element(Partial<A>& p, A s, A t, A sc, bool need_d1) {
  const A ms = nan_max2(p.ms, s), mt = nan_max2(p.mt, t);
  if (!(ms == p.ms && mt == p.mt)) {
    if (ms != ms || mt != mt) {
      p.ms = ms;
      p.mt = mt;
      return;
    }
    rebase(p, ms, mt, sc);
  }
  const A ea = exp((s - p.ms) * sc), eb = exp((t - p.mt) * sc);
  const A ab = ((s - t) - (p.ms - p.mt)) * sc;
  p.ds += ea;
  p.dt += eb;
  if (need_d1) p.d1 += exp(s - p.ms);
  p.x += eb == A(0) ? ea : eb * expm1(ab);
  p.yq += eb == A(0) ? A(0) : eb * ab;
  p.yp += ea == A(0) ? A(0) : ea * ab;
}

template <typename A>
OSM_DISTILL_HD Partial<A> empty_partial(A lowest) {
  return Partial<A>{lowest, lowest, A(0), A(0), A(0), A(0), A(0), A(0)};
}

// Whether a side of a finished partial is a distribution: a finite max with mass.
template <typename A>
OSM_DISTILL_HD bool has_distribution(A m, A d, A inf) {
  return m == m && m < inf && d > A(0);
}

// log(ds / dt), accurately when the sums are close (the usual case): log1p(x / dt).
template <typename A>
OSM_DISTILL_HD A log_ratio(const Partial<A>& p) {
  const A r = p.x / p.dt;
  return (r > A(-0.5) && r < A(0.5)) ? log1p(r) : log(p.ds) - log(p.dt);
}

// The mixture's log-ratios for jsd at one element with delta = log p - log q:
//   g = log m - log q = log(beta + (1 - beta) e^delta),  h = log m - log p = g - delta,
// each through log1p(expm1) on the side where it cannot overflow.
template <typename A>
OSM_DISTILL_HD void mixture_terms(A delta, A beta, A& g, A& h) {
  if (delta <= A(0)) {
    g = log1p((A(1) - beta) * expm1(delta));
    h = g - delta;
  } else {
    h = log1p(beta * expm1(-delta));
    g = h + delta;
  }
}

// The per-row scalars the backward needs besides the stats: the gradient of the loss with respect
// to z = s / T at element (s, t), for kl / reverse_kl / jsd, times sc:
//   kl: (p - q) sc;  reverse_kl: p (delta - U) sc;  jsd: (1 - beta) p (-h - U) sc;
// a p = 0 term (s = -inf) is 0.
template <typename A>
OSM_DISTILL_HD A divergence_gradient(int kind, A p, A q, A delta, A u, A beta, A sc) {
  if (kind == kKl) return (p - q) * sc;
  if (p == A(0)) return A(0);
  if (kind == kReverseKl) return p * (delta - u) * sc;
  A g, h;
  mixture_terms(delta, beta, g, h);
  return (A(1) - beta) * p * (-h - u) * sc;
}

// jsd's terms of one element at the row's normalizers (cst = ms - mt): jq += q (-g), jp += p (-h).
template <typename A>
OSM_DISTILL_HD void jsd_element(A s, A t, A ms, A mt, A cst, A sc, A inv_ds, A inv_dt, A L, A beta, A& jq, A& jp) {
  const A p = exp((s - ms) * sc) * inv_ds, q = exp((t - mt) * sc) * inv_dt;
  A g, h;
  mixture_terms(((s - t) - cst) * sc - L, beta, g, h);
  jq -= q == A(0) ? A(0) : q * g;
  jp -= p == A(0) ? A(0) : p * h;
}

// Columns 0..6 of a finished row's stats; returns whether both sides are distributions (a finite
// max with mass), else L = U = NaN. Without a temperature the cross-entropy's sum is the student's.
OSM_DISTILL_HD bool finish_stats(Partial<double>& row, bool has_target, bool need_d1, double* st) {
  if (has_target && !need_d1) row.d1 = row.ds;
  const bool valid = has_distribution(row.ms, row.ds, double(HUGE_VAL)) &&
                     has_distribution(row.mt, row.dt, double(HUGE_VAL));
  st[kStudentMax] = row.ms;
  st[kStudentSum] = row.ds;
  st[kTeacherMax] = row.mt;
  st[kTeacherSum] = row.dt;
  st[kStudentSum1] = row.d1;
  st[kLogRatio] = valid ? log_ratio(row) : double(NAN);
  st[kU] = valid ? 0.0 : double(NAN);
  return valid;
}

// The row's loss from its finished stats (NaN where finish_stats found no distribution): the
// divergence from the row's sums (jsd: from its second pass's jq = sum q (-g), jp = sum p (-h)),
// which also sets U, then with a target the hard-label mix (s_tgt: the target's logit).
OSM_DISTILL_HD double row_loss(int kind, const Partial<double>& row, double jq, double jp, double beta,
                               double hard_weight, bool has_target, double s_tgt, double* st) {
  const double L = st[kLogRatio];
  if (L != L) return L;
  double value;
  if (kind == kKl) {
    value = L - row.yq / row.dt;
  } else if (kind == kReverseKl) {
    value = row.yp / row.ds - L;
    st[kU] = value;
  } else {
    value = beta * jq + (1.0 - beta) * jp;
    st[kU] = jp;
  }
  if (has_target) value = hard_weight * (log(row.d1) - (s_tgt - row.ms)) + (1.0 - hard_weight) * value;
  return value;
}

}  // namespace online_softmax::distill
