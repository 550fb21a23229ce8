"""The softmax backward taken apart: kernel, threading and call cost, ours and torch's, one process.

    python benchmarks/bench_backward_parts.py [--shapes 1024x1024,64x32768,4x262144] [--dtype float32]

For each shape (softmax over the last dim):

- kernel: the kernel alone, timed in C++ (median of many calls, nothing allocated): ours is the
  CPU dispatch table's backward entry on raw pointers (csrc/cpu/dispatch.h), torch's is
  at::_softmax_backward_data_out into a preallocated dx (the dispatcher's C++ call, a few hundred
  nanoseconds, is included there);
- with 1 thread and with all of torch's threads: "threading" is the 1-thread time over the
  all-thread time (2.0 on two cores is perfect scaling);
- call: the op from Python as the library benchmark calls it, the two in interleaved rounds
  (online_softmax.bench.median_times; ours: torch.ops.online_softmax.backward;
  torch: torch._softmax_backward_data), which adds Python, the dispatcher, argument checks and dx's
  allocation: "call cost" is call minus kernel.

The C++ part is compiled on first use with torch.utils.cpp_extension (about a minute) and links
against the installed online_softmax._C.
"""

import argparse
import os
import statistics

import torch
from torch.utils.cpp_extension import load_inline

import online_softmax
from online_softmax.bench import machine_info, machine_line, median_times

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "cpu/dispatch.h"

namespace {

template <typename Fn>
double median_ns(Fn&& fn, int64_t iters) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> t(iters);
  for (int64_t i = 0; i < iters; ++i) {
    const auto a = std::chrono::steady_clock::now();
    fn();
    t[i] = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - a).count();
  }
  std::nth_element(t.begin(), t.begin() + iters / 2, t.end());
  return t[iters / 2];
}

}  // namespace

// Median ns of one backward over the last dim of 2-D contiguous dy, y into dx.
double ours(at::Tensor dy, at::Tensor y, at::Tensor dx, int64_t iters) {
  using namespace online_softmax;
  const cpu::BackwardCall c{y.scalar_type(), dx.scalar_type(), dy.const_data_ptr(), y.const_data_ptr(),
                            dx.mutable_data_ptr(), RowLayout{y.size(0), y.size(1), 1}, 1.0, false};
  const auto& table = cpu::kernels();
  return median_ns([&] { table.backward(c); }, iters);
}

double theirs(at::Tensor dy, at::Tensor y, at::Tensor dx, int64_t iters) {
  return median_ns([&] { at::_softmax_backward_data_out(dx, dy, y, 1, y.scalar_type()); }, iters);
}
"""


def compiled():
    ext = os.path.dirname(online_softmax._C.__file__)
    return load_inline("osm_backward_parts", cpp_sources=SOURCE, functions=["ours", "theirs"],
                       extra_include_paths=[os.path.join(ROOT, "csrc")],
                       extra_ldflags=[os.path.abspath(online_softmax._C.__file__), f"-Wl,-rpath,{ext}"],
                       extra_cflags=["-O2"], verbose=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x1024,64x32768,4x262144")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    mod = compiled()
    threads = torch.get_num_threads()
    print(machine_line(machine_info(torch.device("cpu"))))
    print(f"| shape | kernel, {threads} threads: ours / torch | kernel, 1 thread: ours / torch | threading: ours / torch | "
          "call: ours / torch | call cost: ours / torch |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        rows, n = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        y = torch.softmax(torch.randn(rows, n, generator=g), -1).to(dtype)
        dy = torch.randn(rows, n, generator=g).to(dtype)
        dx = torch.empty_like(y)
        kernel = {}
        for t in (threads, 1):
            torch.set_num_threads(t)
            # Interleaved rounds, alternating which goes first.
            pairs = []
            for r in range(4):
                if r % 2:
                    b = mod.theirs(dy, y, dx, args.iters)
                    a = mod.ours(dy, y, dx, args.iters)
                else:
                    a = mod.ours(dy, y, dx, args.iters)
                    b = mod.theirs(dy, y, dx, args.iters)
                pairs.append((a, b))
            kernel[t] = tuple(statistics.median(p[i] for p in pairs) for i in (0, 1))
        torch.set_num_threads(threads)
        ops = torch.ops.online_softmax
        calls = median_times({"ours": lambda: ops.backward(dy, y, -1, False, 1.0, None),
                              "torch": lambda: torch._softmax_backward_data(dy, y, -1, y.dtype)}, torch.device("cpu"))
        call = (calls["ours"] * 1e9, calls["torch"] * 1e9)
        k, k1 = kernel[threads], kernel[1]
        us = [v / 1e3 for v in (*k, *k1, *call)]
        print(f"| {shape} | {us[0]:.1f} / {us[1]:.1f} us | {us[2]:.1f} / {us[3]:.1f} us | "
              f"{k1[0] / k[0]:.2f} / {k1[1] / k[1]:.2f} | {us[4]:.1f} / {us[5]:.1f} us | "
              f"{us[4] - us[0]:.1f} / {us[5] - us[1]:.1f} us |", flush=True)


if __name__ == "__main__":
    main()
