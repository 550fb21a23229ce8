// The _C Python module. `import online_softmax._C` loads the extension's shared object, and with it
// every TORCH_LIBRARY registration (csrc/ops.cpp and the backends); the module itself only reports
// the build and the CPU kernel dispatch (csrc/cpu/dispatch.h), and gives tests their hooks: an
// override of that dispatch, and the launch planner behind online_softmax.cuda_plan.
#include <Python.h>

#include "cpu/dispatch.h"

namespace online_softmax {
PyObject* cuda_plan(PyObject*, PyObject* args);  // csrc/common/cuda_plan.cpp
}

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(online_softmax::cpu::kernels().capability);
}

PyObject* cpu_capabilities(PyObject*, PyObject*) {
  const auto names = online_softmax::cpu::compiled_capabilities();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) PyList_SET_ITEM(list, i, PyUnicode_FromString(names[i].c_str()));
  return list;
}

PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  if (!online_softmax::cpu::override_capability(name)) {
    PyErr_Format(PyExc_ValueError, "online_softmax: CPU capability %R is not compiled into this build or not "
                 "supported by this CPU", arg);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "The capability whose CPU kernels run now."},
    {"cpu_capabilities", cpu_capabilities, METH_NOARGS, "The capabilities compiled into this build."},
    {"_set_cpu_capability", set_cpu_capability, METH_O,
     "Test-only: run the CPU kernels of this capability ('' for the automatic choice)."},
    {"_cuda_plan", online_softmax::cuda_plan, METH_VARARGS,
     "The CUDA launch plan of a shape (online_softmax.cuda_plan is the documented front)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef online_softmax_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&online_softmax_module);
  if (module == nullptr) return nullptr;
#ifdef ONLINE_SOFTMAX_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
