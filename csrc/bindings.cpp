// pybind11 bindings of the CUDA extension divkernels._C (built by setup.py or JIT by divkernels/_cuda.py).
#include <torch/extension.h>

#include "launch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "divkernels CUDA kernels: the fused group preference loss (forward) and the similarity backward";
  m.attr("platform") = "cuda";
  m.def("group_loss_forward", &divkernels::group_loss_forward,
        "Fused group loss forward: (stats [B, S], d loss_sum / d policy [B, G], S, norms, K^-1)");
  m.def("similarity_backward", &divkernels::similarity_backward, "dL/d emb [B, G, D] from dL/dS [B, G, G]");
}
