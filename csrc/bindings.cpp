// pybind11 bindings of the CUDA extension divkernels._C (built by setup.py or JIT by divkernels/_cuda.py).
#include "bind.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "divkernels CUDA kernels: the fused group preference loss (forward) and the similarity backward";
  m.attr("platform") = "cuda";
  divkernels::define_ops(m);
}
