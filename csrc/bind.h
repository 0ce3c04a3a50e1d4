// The Python signatures of the launchers, shared by the CUDA module (bindings.cpp) and its host
// build (cpu/group_math_cpu.cpp), so both take the same named arguments.
#pragma once

#include <torch/extension.h>

#include <algorithm>

#include "launch.h"

namespace divkernels {

inline void define_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("group_loss_forward", &group_loss_forward,
        "Fused group loss forward of inputs (enum Input's order, None where absent) and the packed "
        "LossParams: (stats [B, S], d loss_sum / d policy [B, G], S, norms, K^-1, chosen counts "
        "[B, G], rejected counts [B, G])",
        py::arg("inputs"), py::arg("params"), py::arg("poison"));
  m.def("similarity_backward", &similarity_backward,
        "dL/d emb [B, G, D] from factor * scale * dL/dS [B, G, G] (scale: one number on the device, or None)",
        py::arg("grad_sim"), py::arg("sim"), py::arg("norms"), py::arg("emb"), py::arg("mask"), py::arg("scale"),
        py::arg("factor"), py::arg("poison"));
  m.def("partition_diversity", &partition_diversity,
        "DARLING partition diversity [B, G] float32 from a judge's links (bool [B, G, G], i < j read) or int64 "
        "labels [B, G]; normalize: over its group mean",
        py::arg("equivalence"), py::arg("labels"), py::arg("mask"), py::arg("min_diversity"), py::arg("transitive"),
        py::arg("normalize"));
  m.def("group_advantages", &group_advantages,
        "Advantages [B, G] of the shaped rewards (rewards times factor, or rewards): estimator (enum Estimator) "
        "over subsets of k; standardize: over the group's std",
        py::arg("rewards"), py::arg("factor"), py::arg("mask"), py::arg("estimator"), py::arg("k"),
        py::arg("standardize"));
  m.def(
      "shared_bytes",
      [](int64_t G, int64_t element_size) {
        // the larger of the forward's workspace and the backward's (the workspace and a stage of emb columns)
        return std::max(workspace_elements(int(G)), backward_workspace_elements(int(G))) * element_size;
      },
      "Dynamic shared memory per block (bytes) that the group kernels take for G responses of element_size bytes",
      py::arg("G"), py::arg("element_size"));
}

}  // namespace divkernels
