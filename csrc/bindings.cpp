// pybind11 bindings of the CUDA extension divkernels._C (built by setup.py or JIT by divkernels/_cuda.py).
#include <torch/extension.h>

#include "launch.h"

namespace divkernels {
std::vector<at::Tensor> group_loss_forward(const OptTensor& emb, const OptTensor& mask, const at::Tensor& policy,
                                           const OptTensor& ref, const at::Tensor& rewards, const OptTensor& counts,
                                           const OptTensor& scores, int64_t loss, int64_t pairs, int64_t weights,
                                           bool normalize_deviation, bool need_logdet, bool store_state, double beta,
                                           double orpo_lambda, double simpo_gamma, double min_deviation, double eps,
                                           double quality_quantile, bool poison);
at::Tensor similarity_backward(const at::Tensor& grad_sim, const at::Tensor& sim, const at::Tensor& norms,
                               const at::Tensor& emb, const OptTensor& mask, bool poison);
}  // namespace divkernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "divkernels CUDA kernels: the fused group preference loss (forward) and the similarity backward";
  m.attr("platform") = "cuda";
  m.def("group_loss_forward", &divkernels::group_loss_forward,
        "Fused group loss forward: (stats [B, S], d loss_sum / d policy [B, G], S, norms, K^-1)");
  m.def("similarity_backward", &divkernels::similarity_backward, "dL/d emb [B, G, D] from dL/dS [B, G, G]");
}
