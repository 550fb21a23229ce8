// The launchers on a subset of shapes (every plan path, every dtype, aligned and misaligned rows),
// built with AddressSanitizer and UBSan (tests/host_kernels.py, variant "sanitize"). Every buffer is
// a heap allocation of exactly the elements the launcher may touch, so one element read or written
// past either end of a row block is an ASan report. The answers are checked coarsely against a
// double-precision reference here; the exact checks live in tests/kernels/test_kernels_host.py.
// Prints "sanitize: N passed, M failed" and exits non-zero on any failure.
#include "kernels/launchers.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

using namespace online_softmax::kernels;
using online_softmax::RowLayout;

namespace {

double to_d(float v) { return v; }
double to_d(double v) { return v; }
double to_d(__half v) { return __half2float(v); }
double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_d(double v);
template <> float from_d<float>(double v) { return float(v); }
template <> double from_d<double>(double v) { return v; }
template <> __half from_d<__half>(double v) { return __float2half_rn(float(v)); }
template <> __nv_bfloat16 from_d<__nv_bfloat16>(double v) { return __float2bfloat16_rn(float(v)); }

// `count` elements starting `offset` elements into an allocation of exactly offset + count.
template <typename T>
struct Exact {
  std::unique_ptr<T[]> mem;
  T* p = nullptr;
  Exact(size_t count, size_t offset) : mem(new T[count + offset]), p(mem.get() + offset) {}
};

int passed = 0, failed = 0;
std::mt19937 rng(7);

void check(bool ok, const char* what, const char* dtype, long long a, long long b) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED %s [%s] %lld %lld\n", what, dtype, a, b);
  }
}

template <typename T>
void fill(T* p, size_t n) {
  std::normal_distribution<double> normal(0.0, 3.0);
  for (size_t i = 0; i < n; ++i) p[i] = from_d<T>(normal(rng));
}

template <typename T>
double tolerance() {
  return sizeof(T) == 2 ? 2e-2 : 1e-5;
}

// softmax along `size` of [outer, size, inner], in double.
template <typename T>
std::vector<double> reference_softmax(const T* x, RowLayout l) {
  std::vector<double> y(size_t(l.outer * l.size * l.inner));
  for (int64_t o = 0; o < l.outer; ++o) {
    for (int64_t i = 0; i < l.inner; ++i) {
      double m = -INFINITY, d = 0;
      for (int64_t j = 0; j < l.size; ++j) m = std::max(m, to_d(x[(o * l.size + j) * l.inner + i]));
      for (int64_t j = 0; j < l.size; ++j) d += std::exp(to_d(x[(o * l.size + j) * l.inner + i]) - m);
      for (int64_t j = 0; j < l.size; ++j) {
        const int64_t at = (o * l.size + j) * l.inner + i;
        y[size_t(at)] = std::exp(to_d(x[at]) - m) / d;
      }
    }
  }
  return y;
}

template <typename T>
void forward_case(const char* name, RowLayout l, DeviceLimits limits, size_t offset) {
  using A = typename AccOf<T>::type;
  const size_t count = size_t(l.outer * l.size * l.inner), rows = size_t(l.outer * l.inner);
  Exact<T> x(count, offset), y(count, offset);
  Exact<A> mo(rows, 0), so(rows, 0);
  fill(x.p, count);
  std::vector<unsigned char> ws(forward_workspace_bytes<T>(l, limits));
  const cudaError_t err = softmax_forward<T, T>(x.p, y.p, mo.p, so.p, l, 1.0, false, ws.empty() ? nullptr : ws.data(),
                                                limits, nullptr);
  check(err == cudaSuccess, "forward launch", name, l.size, l.inner);
  const std::vector<double> ref = reference_softmax(x.p, l);
  double worst = 0;
  for (size_t i = 0; i < count; ++i) worst = std::max(worst, std::fabs(to_d(y.p[i]) - ref[i]));
  check(worst <= tolerance<T>(), "forward values", name, l.size, l.inner);
}

template <typename T>
void backward_case(const char* name, RowLayout l, DeviceLimits limits, size_t offset) {
  const size_t count = size_t(l.outer * l.size * l.inner);
  Exact<T> x(count, offset), y(count, offset), dy(count, offset), dx(count, offset);
  fill(x.p, count);
  fill(dy.p, count);
  const std::vector<double> p = reference_softmax(x.p, l);
  for (size_t i = 0; i < count; ++i) y.p[i] = from_d<T>(p[i]);
  std::vector<unsigned char> ws(backward_workspace_bytes<T>(l, limits));
  const cudaError_t err = softmax_backward<T, T>(dy.p, y.p, dx.p, l, 1.0, false, ws.empty() ? nullptr : ws.data(),
                                                 limits, nullptr);
  check(err == cudaSuccess, "backward launch", name, l.size, l.inner);
  double worst = 0;
  for (int64_t o = 0; o < l.outer; ++o) {
    for (int64_t i = 0; i < l.inner; ++i) {
      double total = 0;
      for (int64_t j = 0; j < l.size; ++j) {
        const int64_t at = (o * l.size + j) * l.inner + i;
        total += to_d(dy.p[at]) * to_d(y.p[at]);
      }
      for (int64_t j = 0; j < l.size; ++j) {
        const int64_t at = (o * l.size + j) * l.inner + i;
        const double want = to_d(y.p[at]) * (to_d(dy.p[at]) - total);
        worst = std::max(worst, std::fabs(to_d(dx.p[at]) - want));
      }
    }
  }
  check(worst <= 10 * tolerance<T>(), "backward values", name, l.size, l.inner);
}

template <typename T>
void topk_case(const char* name, int64_t rows, int64_t n, int64_t k, DeviceLimits limits, size_t offset) {
  using A = typename AccOf<T>::type;
  Exact<T> x(size_t(rows * n), offset), values(size_t(rows * k), 0);
  Exact<int64_t> indices(size_t(rows * k), 0);
  Exact<A> mo(size_t(rows), 0), so(size_t(rows), 0);
  fill(x.p, size_t(rows * n));
  std::vector<unsigned char> ws(topk_workspace_bytes<T>(rows, n, k, limits));
  cudaError_t err = softmax_topk<T>(x.p, values.p, indices.p, mo.p, so.p, rows, n, k, 1.0, false,
                                    ws.empty() ? nullptr : ws.data(), limits, nullptr);
  check(err == cudaSuccess, "topk launch", name, n, k);
  bool order_ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    const T* xr = x.p + r * n;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return to_d(xr[a]) > to_d(xr[b]); });
    for (int64_t j = 0; j < k; ++j) order_ok &= indices.p[r * k + j] == order[size_t(j)];
  }
  check(order_ok, "topk indices", name, n, k);
  // The backward of those values, on the same buffers (indices are sorted per row first).
  Exact<T> grad(size_t(rows * k), 0), dx(size_t(rows * n), offset);
  fill(grad.p, size_t(rows * k));
  for (int64_t r = 0; r < rows; ++r) std::sort(indices.p + r * k, indices.p + (r + 1) * k);
  int error = 0;
  err = softmax_topk_backward<T>(grad.p, x.p, indices.p, mo.p, so.p, dx.p, rows, n, k, 1.0, false, &error, limits,
                                 nullptr);
  check(err == cudaSuccess, "topk backward launch", name, n, k);
  check(error == 0, "topk backward: no index flagged", name, n, k);
  double worst = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<double> p = reference_softmax(x.p + r * n, RowLayout{1, n, 1});
    double c = 0;
    for (int64_t j = 0; j < k; ++j) c += to_d(grad.p[r * k + j]) * p[size_t(indices.p[r * k + j])];
    std::vector<double> want(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) want[size_t(i)] = -p[size_t(i)] * c;
    for (int64_t j = 0; j < k; ++j) want[size_t(indices.p[r * k + j])] += to_d(grad.p[r * k + j]) * p[size_t(indices.p[r * k + j])];
    for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(to_d(dx.p[r * n + i]) - want[size_t(i)]));
  }
  check(worst <= 10 * tolerance<T>(), "topk backward values", name, n, k);
}

// Row 1's target is `bad_target` (valid when in [0, n)): flagged, and never written.
template <typename T>
void cross_entropy_case(const char* name, int64_t rows, int64_t n, DeviceLimits limits, size_t offset,
                        int64_t bad_target) {
  using A = typename AccOf<T>::type;
  Exact<T> x(size_t(rows * n), offset), out(size_t(rows * n), offset);
  Exact<A> row_max(size_t(rows), 0), sumexp(size_t(rows), 0);
  Exact<A> p_scale(size_t(rows), 0), target_scale(size_t(rows), 0), smooth(size_t(rows), 0);
  Exact<A> weight(size_t(n), 0);
  Exact<int64_t> target(size_t(rows), 0);
  fill(x.p, size_t(rows * n));
  for (int64_t r = 0; r < rows; ++r) {
    double m = -INFINITY, d = 0;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, to_d(x.p[r * n + i]));
    for (int64_t i = 0; i < n; ++i) d += std::exp(to_d(x.p[r * n + i]) - m);
    row_max.p[r] = A(m);
    sumexp.p[r] = A(d);
    p_scale.p[r] = A(0.5 + 0.25 * double(r));
    target_scale.p[r] = A(1.0);
    smooth.p[r] = A(0.01);
    target.p[r] = r == 1 ? bad_target : (r * 7) % n;
  }
  for (int64_t i = 0; i < n; ++i) weight.p[i] = A(1.0 + double(i % 3));
  int error = 0;
  const cudaError_t err = cross_entropy_backward<T>(x.p, row_max.p, sumexp.p, target.p, p_scale.p, target_scale.p,
                                                    smooth.p, weight.p, out.p, rows, n, &error, limits, nullptr);
  check(err == cudaSuccess, "cross_entropy_backward launch", name, n, bad_target);
  check(error == (bad_target >= 0 && bad_target < n ? 0 : 1), "cross_entropy_backward flag", name, n, bad_target);
  double worst = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<double> p = reference_softmax(x.p + r * n, RowLayout{1, n, 1});
    for (int64_t i = 0; i < n; ++i) {
      const double want = double(p_scale.p[r]) * p[size_t(i)] - (i == target.p[r] ? 1.0 : 0.0) -
                          double(smooth.p[r]) * double(weight.p[i]);
      worst = std::max(worst, std::fabs(to_d(out.p[r * n + i]) - want));
    }
  }
  check(worst <= 10 * tolerance<T>(), "cross_entropy_backward values", name, n, bad_target);
}

template <typename T>
void run_dtype(const char* name) {
  const DeviceLimits one_sm{1, 48 * 1024}, big_smem{1, 400 * 1024}, split{8, 4 * 1024};
  for (size_t offset : {size_t(0), size_t(1)}) {
    for (int64_t n : {int64_t(1), int64_t(37), int64_t(1000), int64_t(20000)}) {
      forward_case<T>(name, RowLayout{3, n, 1}, one_sm, offset);
      backward_case<T>(name, RowLayout{3, n, 1}, one_sm, offset);
    }
    forward_case<T>(name, RowLayout{2, 20000, 1}, big_smem, offset);   // shared memory
    backward_case<T>(name, RowLayout{2, 20000, 1}, big_smem, offset);
    forward_case<T>(name, RowLayout{3, 9001, 1}, split, offset);       // split: few rows
    backward_case<T>(name, RowLayout{3, 9001, 1}, split, offset);
    forward_case<T>(name, RowLayout{3, 40, 7}, one_sm, offset);        // strided
    backward_case<T>(name, RowLayout{2, 33, 5}, one_sm, offset);
    topk_case<T>(name, 3, 37, 37, one_sm, offset);
    topk_case<T>(name, 2, 5000, 8, one_sm, offset);
    topk_case<T>(name, 2, 40000, 64, split, offset);                   // split + merge
    for (int64_t n : {int64_t(1), int64_t(37), int64_t(1000)}) cross_entropy_case<T>(name, 3, n, one_sm, offset, 0);
    cross_entropy_case<T>(name, 2, 40000, one_sm, offset, 40000);      // chunks: long rows, a bad target
    cross_entropy_case<T>(name, 3, 9001, split, offset, -1);           // chunks: few rows
    cross_entropy_case<T>(name, 3, 301, one_sm, offset, 301);
  }
}

}  // namespace

int main() {
  run_dtype<float>("float32");
  run_dtype<double>("float64");
  run_dtype<__half>("float16");
  run_dtype<__nv_bfloat16>("bfloat16");
  std::printf("sanitize: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
