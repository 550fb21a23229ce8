// CPU kernels of distillation_forward and distillation_backward (semantics: csrc/ops.cpp; the row
// algebra: csrc/kernels/distillation_math.h, shared with the CUDA kernel).
//
// Forward: each row in blocks of kScanBlock elements, read once from memory: a block's two maxes,
// then (from L1) its sums at those maxes, one vector loop; the blocks' partials merge left to right
// in double, so a row's bits depend on its length alone (never on threads or the batch). jsd needs
// log m, hence both normalizers: a second pass over the row (from cache for the usual vocabularies).
// Backward: one read of each student and teacher row and one write, from the stats; out may be the
// student itself (every element is read before it is written).
// Compiled once per ISA (csrc/cpu/isa/); called through the table of dispatch.h.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include <cmath>
#include <limits>

#include "cpu/kernels/common.h"
#include "kernels/distillation_math.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

namespace dm = online_softmax::distill;

// The mixture terms g = log m - log q, h = log m - log p of jsd, lane-wise (dm::mixture_terms).
template <typename V, typename A>
inline void vmixture_terms(V delta, A beta, V& g, V& h) {
  const V vb(beta), vnb(A(1) - beta);
  const V g_neg = (vnb * delta.expm1()).log1p(), h_neg = g_neg - delta;
  const V h_pos = (vb * (V(A(0)) - delta).expm1()).log1p(), g_pos = h_pos + delta;
  const V pos = delta > V(A(0));
  g = V::blendv(g_neg, g_pos, pos);
  h = V::blendv(h_neg, h_pos, pos);
}

// The partial of one block (n <= kScanBlock elements) at its own maxes.
template <typename T>
dm::Partial<double> block_partial(const T* s, const T* t, int64_t n, acc_t<T> sc, bool need_d1) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = VecIO<T>;
  const A ms = block_max(s, n), mt = block_max(t, n);
  dm::Partial<double> p{ms, mt, 0, 0, 0, 0, 0, 0};
  if (std::isnan(ms) || std::isnan(mt)) return p;  // the row is NaN: merge_into keeps the NaN max
  const A cst = ms - mt;
  const V vms(ms), vmt(mt), vcst(cst), vsc(sc), zero(A(0));
  V ds(zero), dt(zero), d1(zero), x(zero), yq(zero), yp(zero);
  auto step = [&](V a, V b) {
    const V ea = vexp((a - vms) * vsc), eb = vexp((b - vmt) * vsc);
    const V ab = ((a - b) - vcst) * vsc;
    const V eb0 = eb == zero;
    ds = ds + ea;
    dt = dt + eb;
    if (need_d1) d1 = d1 + vexp(a - vms);
    x = x + V::blendv(eb * ab.expm1(), ea, eb0);
    yq = yq + V::blendv(eb * ab, zero, eb0);
    yp = yp + V::blendv(ea * ab, zero, ea == zero);
  };
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    V sa, sb, ta, tb;
    IO::load2(s + i, sa, sb);
    IO::load2(t + i, ta, tb);
    step(sa, ta);
    step(sb, tb);
  }
  auto sum = [](V v) { return static_cast<double>(at::vec::vec_reduce_all<A>([](V u, V w) { return u + w; }, v)); };
  dm::Partial<A> tail{ms, mt, 0, 0, 0, 0, 0, 0};
  for (; i < n; ++i) dm::add_element(tail, static_cast<A>(s[i]), static_cast<A>(t[i]), sc, need_d1);
  p.ds = sum(ds) + tail.ds;
  p.dt = sum(dt) + tail.dt;
  p.d1 = sum(d1) + tail.d1;
  p.x = sum(x) + tail.x;
  p.yq = sum(yq) + tail.yq;
  p.yp = sum(yp) + tail.yp;
  return p;
}

// jsd's sums over the row at its final normalizers: (sum q (-g), sum p (-h)).
template <typename T>
void jsd_sums(const T* s, const T* t, int64_t n, acc_t<T> sc, acc_t<T> beta, const double* st, double& jq,
              double& jp) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = VecIO<T>;
  const A ms = st[dm::kStudentMax], mt = st[dm::kTeacherMax];
  const A inv_ds = A(1.0 / st[dm::kStudentSum]), inv_dt = A(1.0 / st[dm::kTeacherSum]);
  const A cst = ms - mt, L = A(st[dm::kLogRatio]);
  const V vms(ms), vmt(mt), vcst(cst), vsc(sc), vL(L), vids(inv_ds), vidt(inv_dt), zero(A(0));
  jq = jp = 0;
  for (int64_t block = 0; block < n; block += kScanBlock) {
    const int64_t end = std::min(n, block + kScanBlock);
    V aq(zero), ap(zero);
    auto step = [&](V a, V b) {
      const V p = vexp((a - vms) * vsc) * vids, q = vexp((b - vmt) * vsc) * vidt;
      const V delta = ((a - b) - vcst) * vsc - vL;
      V g, h;
      vmixture_terms(delta, beta, g, h);
      aq = aq - V::blendv(q * g, zero, q == zero);
      ap = ap - V::blendv(p * h, zero, p == zero);
    };
    int64_t i = block;
    for (; i + IO::kStep <= end; i += IO::kStep) {
      V sa, sb, ta, tb;
      IO::load2(s + i, sa, sb);
      IO::load2(t + i, ta, tb);
      step(sa, ta);
      step(sb, tb);
    }
    double bq = at::vec::vec_reduce_all<A>([](V u, V w) { return u + w; }, aq);
    double bp = at::vec::vec_reduce_all<A>([](V u, V w) { return u + w; }, ap);
    A tq = 0, tp = 0;
    for (; i < end; ++i) {
      dm::jsd_element(static_cast<A>(s[i]), static_cast<A>(t[i]), ms, mt, cst, sc, inv_ds, inv_dt, L, beta, tq, tp);
    }
    bq += tq;
    bp += tp;
    jq += bq;
    jp += bp;
  }
}

template <typename T>
void distillation_forward_kernel(const DistillationCall& c) {
  using A = acc_t<T>;
  const T* student = static_cast<const T*>(c.student);
  const T* teacher = static_cast<const T*>(c.teacher);
  A* loss = static_cast<A*>(c.loss);
  A* stats = static_cast<A*>(c.stats);
  const A sc = static_cast<A>(1.0 / c.temperature);
  const bool has_target = c.target != nullptr;
  const bool need_d1 = has_target && c.temperature != 1.0;
  const int64_t n = c.n;
  at::parallel_for(0, c.rows, row_grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      A* out_st = stats + r * dm::kStats;
      int64_t tgt = -1;
      if (has_target) {
        tgt = c.target[r];
        if (tgt == c.ignore_index) {
          loss[r] = A(0);
          for (int k = 0; k < dm::kStats; ++k) out_st[k] = A(0);
          continue;
        }
        // Checked here rather than by a separate pass (exceptions leave parallel_for).
        TORCH_CHECK_INDEX(tgt >= 0 && tgt < n, "online_softmax.distillation_forward: target must lie in [0, ", n,
                          ") or equal ignore_index (", c.ignore_index, "), got ", tgt);
      }
      const T* s = student + r * n;
      const T* t = teacher + r * n;
      dm::Partial<double> row = dm::empty_partial<double>(std::numeric_limits<double>::lowest());
      for (int64_t block = 0; block < n; block += kScanBlock) {
        dm::merge_into(row, block_partial(s + block, t + block, std::min(kScanBlock, n - block), sc, need_d1),
                       static_cast<double>(sc));
      }
      double st[dm::kStats];
      double jq = 0, jp = 0;
      const bool valid = dm::finish_stats(row, has_target, need_d1, st);
      if (valid && c.kind == dm::kJsd) jsd_sums(s, t, n, sc, static_cast<A>(c.beta), st, jq, jp);
      // A side without a distribution (NaN, +inf, all -inf) gives NaN, as the reference's log-softmax.
      const double value = dm::row_loss(c.kind, row, jq, jp, c.beta, c.hard_weight, has_target,
                                        has_target ? static_cast<double>(static_cast<A>(s[tgt])) : 0.0, st);
      loss[r] = static_cast<A>(value);
      for (int k = 0; k < dm::kStats; ++k) out_st[k] = static_cast<A>(st[k]);
    }
  });
}

template <typename T>
void distillation_backward_kernel(const DistillationCall& c) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = VecIO<T>;
  const T* student = static_cast<const T*>(c.student);
  const T* teacher = static_cast<const T*>(c.teacher);
  T* out = static_cast<T*>(c.out);
  const A* stats = static_cast<const A*>(c.stats);
  const A* grad_loss = static_cast<const A*>(c.grad_loss);
  const A sc = static_cast<A>(1.0 / c.temperature);
  const A beta = static_cast<A>(c.beta), nbeta = static_cast<A>(1.0 - c.beta);
  const bool has_target = c.target != nullptr;
  const bool same_t = c.temperature == 1.0;
  const int kind = c.kind;
  const int64_t n = c.n;
  constexpr A kInf = std::numeric_limits<A>::infinity();
  at::parallel_for(0, c.rows, row_grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* outr = out + r * n;
      int64_t tgt = -1;
      if (has_target) {
        tgt = c.target[r];
        if (tgt == c.ignore_index) {
          std::fill(outr, outr + n, T(0));
          continue;
        }
        TORCH_CHECK_INDEX(tgt >= 0 && tgt < n, "online_softmax.distillation_backward: target must lie in [0, ", n,
                          ") or equal ignore_index (", c.ignore_index, "), got ", tgt);
      }
      const T* s = student + r * n;
      const T* t = teacher + r * n;
      const A* st = stats + r * dm::kStats;
      const A ms = st[dm::kStudentMax], mt = st[dm::kTeacherMax];
      // A row in which a side has no distribution gets NaN factors: NaN gradients.
      const bool valid = dm::has_distribution(ms, st[dm::kStudentSum], kInf) &&
                         dm::has_distribution(mt, st[dm::kTeacherSum], kInf);
      const A nan = std::numeric_limits<A>::quiet_NaN();
      const A inv_ds = valid ? A(1) / st[dm::kStudentSum] : nan, inv_dt = valid ? A(1) / st[dm::kTeacherSum] : nan;
      const A inv_d1 = valid && has_target ? A(1) / st[dm::kStudentSum1] : nan;
      const A L = st[dm::kLogRatio], U = st[dm::kU], cst = ms - mt;
      const A g = grad_loss[r];
      const A cw = has_target ? static_cast<A>(g * c.hard_weight) : A(0);
      const A dw = has_target ? static_cast<A>(g * (1.0 - c.hard_weight)) : g;
      const A s_tgt = has_target ? static_cast<A>(s[tgt]) : A(0);  // before the loop: out may be s
      const A t_tgt = has_target ? static_cast<A>(t[tgt]) : A(0);
      const V vms(ms), vmt(mt), vcst(cst), vsc(sc), vL(L), vU(U), vids(inv_ds), vidt(inv_dt), vid1(inv_d1);
      const V vcw(cw), vdw(dw), vnb(nbeta), zero(A(0));
      auto grad = [&](V a, V b) {
        const V p = vexp_keep_nan((a - vms) * vsc) * vids;
        V d;
        if (kind == dm::kKl) {
          d = (p - vexp_keep_nan((b - vmt) * vsc) * vidt) * vsc;
        } else {
          const V delta = ((a - b) - vcst) * vsc - vL;
          if (kind == dm::kReverseKl) {
            d = p * (delta - vU) * vsc;
          } else {
            V gm, h;
            vmixture_terms(delta, beta, gm, h);
            d = vnb * p * (zero - h - vU) * vsc;
          }
          d = V::blendv(d, zero, p == zero);  // s = -inf adds nothing, not 0 * inf
        }
        if (!has_target) return d * vdw;
        const V p1 = same_t ? p : vexp_keep_nan(a - vms) * vid1;
        return p1 * vcw + d * vdw;
      };
      auto grad1 = [&](A a, A b) {
        const A p = std::exp((a - ms) * sc) * inv_ds;
        const A q = kind == dm::kKl ? std::exp((b - mt) * sc) * inv_dt : A(0);
        const A d = dm::divergence_gradient(kind, p, q, ((a - b) - cst) * sc - L, U, beta, sc);
        if (!has_target) return d * dw;
        const A p1 = same_t ? p : std::exp(a - ms) * inv_d1;
        return p1 * cw + d * dw;
      };
      int64_t i = 0;
      for (; i + IO::kStep <= n; i += IO::kStep) {
        V sa, sb, ta, tb;
        IO::load2(s + i, sa, sb);
        IO::load2(t + i, ta, tb);
        IO::store2(outr + i, grad(sa, ta), grad(sb, tb));
      }
      for (; i < n; ++i) outr[i] = static_cast<T>(grad1(static_cast<A>(s[i]), static_cast<A>(t[i])));
      // The one-hot, from the same terms as the loop so that the target's gradient rounds once.
      if (has_target) outr[tgt] = static_cast<T>(grad1(s_tgt, t_tgt) - cw);
    }
  });
}

void distillation_forward_entry(const DistillationCall& c) {
  with_dtype(c.x_dtype, "distillation_forward", [&](auto tag) { distillation_forward_kernel<decltype(tag)>(c); });
}

void distillation_backward_entry(const DistillationCall& c) {
  with_dtype(c.x_dtype, "distillation_backward", [&](auto tag) { distillation_backward_kernel<decltype(tag)>(c); });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
