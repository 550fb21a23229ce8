// online_softmax.cuda_plan's core: the launch plans of csrc/kernels/launch_plan.h (the header the
// CUDA launchers run) as Python dicts. Compiled into every build, CPU-only ones included, so a plan
// can be read, and tested, on a machine without a GPU.
#include <Python.h>

#include <cstring>

#include "kernels/launch_plan.h"

namespace online_softmax {
namespace {

using kernels::LaunchPlan;

// Adds key: value to dict, dropping the reference to value; false if anything failed.
bool put(PyObject* dict, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int rc = PyDict_SetItemString(dict, key, value);
  Py_DECREF(value);
  return rc == 0;
}

PyObject* to_dict(const LaunchPlan& plan) {
  PyObject* out = PyDict_New();
  PyObject* launches = PyList_New(0);
  if (out == nullptr || launches == nullptr) {
    Py_XDECREF(out);
    Py_XDECREF(launches);
    return nullptr;
  }
  bool ok = true;
  for (int i = 0; ok && i < plan.count; ++i) {
    const kernels::Launch& l = plan.launch[i];
    PyObject* d = PyDict_New();
    ok = d != nullptr && put(d, "kernel", PyUnicode_FromString(l.kernel)) && put(d, "grid", PyLong_FromLongLong(l.grid)) &&
         put(d, "block", Py_BuildValue("(ii)", l.block_x, l.block_y)) && put(d, "smem", PyLong_FromSize_t(l.smem)) &&
         put(d, "threads_per_row", PyLong_FromLongLong(l.threads_per_row)) &&
         put(d, "rows_per_block", PyLong_FromLongLong(l.rows_per_block)) &&
         put(d, "bytes_read", PyLong_FromLongLong(l.bytes_read)) &&
         put(d, "bytes_written", PyLong_FromLongLong(l.bytes_written)) &&
         put(d, "bytes_reread", PyLong_FromLongLong(l.bytes_reread)) && PyList_Append(launches, d) == 0;
    Py_XDECREF(d);
  }
  ok = ok && put(out, "launches", launches) && put(out, "path", PyUnicode_FromString(kernels::path_name(plan.path))) &&
       put(out, "workspace_bytes", PyLong_FromSize_t(plan.workspace_bytes)) &&
       put(out, "chunks", PyLong_FromLongLong(plan.chunks)) && put(out, "chunk", PyLong_FromLongLong(plan.chunk));
  if (!ok) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

}  // namespace

// _C._cuda_plan(op, outer, size, inner, in_bytes, out_bytes, acc_bytes, k, num_samples, min_log_ratio,
//               num_sms, max_smem_per_block, l2_bytes, cc[, smooth_scale, weight, mask_bytes, positions,
//               draft_bytes, num_edits]) -> dict. rejection_sample passes outer = batch, size = vocab, positions = n + 1
// and draft_bytes (0 without draft_probs); the sampling ops may pass num_edits (edit_ids' width);
// token_logprobs passes k = top_n and min_log_ratio = whether token_values are given; the distillation
// ops pass smooth_scale = whether a target is given and (forward) min_log_ratio = kind "jsd". Python checks
// the arguments (online_softmax/cuda_plan.py); this only computes.
PyObject* cuda_plan(PyObject*, PyObject* args) {
  const char* op = nullptr;
  long long outer = 0, size = 0, inner = 0, k = 0, num_samples = 0, l2 = 0;
  long long mask_bytes = 0, positions = 1;
  int in_bytes = 0, out_bytes = 0, acc_bytes = 0, cut = 0, sms = 0, smem = 0, cc = 0, smooth = 0, weight = 0;
  int draft_bytes = 0;
  long long num_edits = 0;
  if (!PyArg_ParseTuple(args, "sLLLiiiLLpiiLi|ppLLiL", &op, &outer, &size, &inner, &in_bytes, &out_bytes, &acc_bytes,
                        &k, &num_samples, &cut, &sms, &smem, &l2, &cc, &smooth, &weight, &mask_bytes, &positions,
                        &draft_bytes, &num_edits)) {
    return nullptr;
  }
  kernels::DeviceLimits limits;
  limits.num_sms = sms;
  limits.max_smem_per_block = smem;
  limits.l2_bytes = l2;
  limits.cc = cc;
  const kernels::ElemBytes e{in_bytes, out_bytes, acc_bytes};
  const RowLayout layout{outer, size, inner};
  LaunchPlan plan;
  if (std::strcmp(op, "forward") == 0) {
    plan = kernels::plan_forward(layout, e, /*has_y=*/true, /*state_outputs=*/0, limits);
  } else if (std::strcmp(op, "stats") == 0) {
    plan = kernels::plan_forward(layout, e, /*has_y=*/false, /*state_outputs=*/2, limits);
  } else if (std::strcmp(op, "backward") == 0) {
    plan = kernels::plan_backward(layout, e, limits);
  } else if (std::strcmp(op, "softmax_topk") == 0) {
    plan = kernels::plan_topk(layout.rows(), size, k, e, limits);
  } else if (std::strcmp(op, "softmax_topk_backward") == 0) {
    plan = kernels::plan_topk_backward(layout.rows(), size, k, e, limits);
  } else if (std::strcmp(op, "sample_categorical") == 0) {
    plan = kernels::plan_sample(layout.rows(), size, num_samples, cut != 0, e, limits, num_edits);
  } else if (std::strcmp(op, "top_p_threshold") == 0) {
    plan = kernels::plan_top_p(layout.rows(), size, e, limits, num_edits);
  } else if (std::strcmp(op, "cross_entropy_backward") == 0) {
    plan = kernels::plan_cross_entropy_backward(layout.rows(), size, e, smooth != 0, weight != 0, limits);
  } else if (std::strcmp(op, "token_logprobs_backward") == 0) {
    plan = kernels::plan_token_logprobs_backward(layout.rows(), size, e, smooth != 0, limits);
  } else if (std::strcmp(op, "masked_forward") == 0) {
    plan = kernels::plan_masked_forward(layout.rows(), size, e, mask_bytes, limits);
  } else if (std::strcmp(op, "rejection_sample") == 0) {
    plan = kernels::plan_rejection_sample(outer, positions - 1, size, cut != 0, draft_bytes, e, limits);
  } else if (std::strcmp(op, "token_logprobs") == 0) {  // cut: token_values given
    plan = kernels::plan_token_logprobs(layout.rows(), size, k, cut != 0, e, limits);
  } else if (std::strcmp(op, "distillation_forward") == 0) {  // smooth: a target; cut: kind "jsd"
    plan = kernels::plan_distillation_forward(layout.rows(), size, e, smooth != 0, cut != 0, limits);
  } else if (std::strcmp(op, "distillation_backward") == 0) {  // smooth: a target
    plan = kernels::plan_distillation_backward(layout.rows(), size, e, smooth != 0, limits);
  } else {
    PyErr_Format(PyExc_ValueError, "online_softmax.cuda_plan: unknown op %s", op);
    return nullptr;
  }
  return to_dict(plan);
}

}  // namespace online_softmax
