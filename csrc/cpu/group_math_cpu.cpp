// Host build of the CUDA extension's math, for tests on machines without a GPU.
//
// Same arguments, same outputs, same group_math.h code as group_loss.cu and
// similarity_backward.cu; each group runs with BlockPar's host schedule (plain loops) instead of
// a thread block, its workspace on the heap instead of shared memory. divkernels/_cuda.py builds
// it with torch.utils.cpp_extension.load when DIVKERNELS_CUDA_HOST_EMULATION=1.
#include <torch/extension.h>

#include <memory>
#include <vector>

#include "../pair_math.h"
#include "../partition.h"
#include "../advantages.h"
#include "../bind.h"
#include "../launch.h"

namespace divkernels {

std::vector<at::Tensor> group_loss_forward(const std::vector<OptTensor>& inputs, const std::vector<double>& packed,
                                           bool poison) {
  ForwardArgs a = prepare_forward(inputs, packed, poison);
  const at::Tensor& policy = *inputs[kInputPolicy];
  const OptTensor& emb = inputs[kInputEmb];
  TORCH_CHECK(policy.is_cpu(), "the host build takes CPU tensors, got ", policy.device());
  const auto emb_type = emb ? emb->scalar_type() : a.acc;
  dispatch_types(a.acc, emb_type, [&](auto acc_tag, auto emb_tag) {
    using T = decltype(acc_tag);
    using E = decltype(emb_tag);
    std::vector<T> workspace(size_t(workspace_elements(int(a.G))), T(NAN));
    int picks[2];
    const auto strides = emb ? emb->strides() : at::IntArrayRef{};
    for (int64_t b = 0; b < a.B; ++b) {
      Workspace<T> ws = carve_workspace(workspace.data(), picks, int(a.G));
      group_forward(BlockPar{}, ws, b, int(a.G), a.D, emb ? emb->data_ptr<E>() : nullptr, emb ? strides[0] : 0,
                    emb ? strides[1] : 0, emb ? strides[2] : 0,
                    group_inputs<T>(inputs),
                    a.params, group_outputs<T>(a.outputs));
    }
  });
  return a.outputs;
}

at::Tensor similarity_backward(const at::Tensor& grad_sim, const at::Tensor& sim, const at::Tensor& norms,
                               const at::Tensor& emb, const OptTensor& mask, const OptTensor& scale, double factor,
                               bool poison) {
  TORCH_CHECK(emb.is_cpu(), "the host build takes CPU tensors, got ", emb.device());
  BackwardArgs a = prepare_backward(grad_sim, sim, norms, emb, mask, scale, poison);
  constexpr int kWidth = 128;  // as kBackwardWidth in similarity_backward.cu
  dispatch_types(a.acc, emb.scalar_type(), [&](auto acc_tag, auto emb_tag) {
    using T = decltype(acc_tag);
    using E = decltype(emb_tag);
    std::vector<T> workspace(size_t(backward_workspace_elements(int(a.G))), T(NAN));
    T* stage = workspace.data() + workspace_elements(int(a.G));
    int picks[2];
    for (int64_t b = 0; b < a.B; ++b) {
      for (int64_t d0 = 0; d0 < a.D; d0 += kWidth) {
        Workspace<T> ws = carve_workspace(workspace.data(), picks, int(a.G));
        cosine_backward_matrix(BlockPar{}, ws, b, int(a.G), data_or_null<bool>(mask), grad_sim.data_ptr<T>(),
                               grad_sim.stride(0), grad_sim.stride(1), grad_sim.stride(2), sim.data_ptr<T>(),
                               norms.data_ptr<T>(), data_or_null<T>(scale), factor);
        apply_backward_matrix(BlockPar{}, ws, stage, b, int(a.G), a.D, d0, kWidth, emb.data_ptr<E>(), emb.stride(0),
                              emb.stride(1), emb.stride(2), a.grad_emb.data_ptr<E>());
      }
    }
  });
  return a.grad_emb;
}

at::Tensor partition_diversity(const OptTensor& equivalence, const OptTensor& labels, const OptTensor& mask,
                               double min_diversity, bool transitive, bool normalize) {
  const PartitionArgs a = prepare_partition(equivalence, labels, mask);
  TORCH_CHECK(a.device.is_cpu(), "the host build takes CPU tensors, got ", a.device);
  std::vector<unsigned char> links(size_t(a.G * a.G));
  std::vector<int> label(size_t(a.G)), next(size_t(a.G));
  std::vector<float> value(size_t(a.G));
  std::unique_ptr<bool[]> valid(new bool[size_t(a.G)]);
  int changed = 0;
  const PartitionWorkspace ws{links.data(), label.data(), next.data(), valid.get(), &changed, value.data()};
  for (int64_t b = 0; b < a.B; ++b) {
    partition_group(BlockPar{}, ws, b, int(a.G), equivalence ? equivalence->data_ptr<bool>() : nullptr,
                    data_or_null<int64_t>(labels), data_or_null<bool>(mask), float(min_diversity), transitive,
                    normalize, a.out.data_ptr<float>());
  }
  return a.out;
}

at::Tensor group_advantages(const at::Tensor& rewards, const OptTensor& factor, const OptTensor& mask,
                            int64_t estimator, int64_t k, bool standardize) {
  const AdvantageArgs a = prepare_advantages(rewards, factor, mask);
  TORCH_CHECK(rewards.is_cpu(), "the host build takes CPU tensors, got ", rewards.device());
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "group_advantages", [&] {
    using T = scalar_t;
    std::vector<T> g(size_t(a.G)), d(size_t(a.G)), sums(3);
    std::vector<int> rank(size_t(a.G));
    std::unique_ptr<bool[]> valid(new bool[size_t(a.G)]);
    const AdvantageWorkspace<T> ws{g.data(), d.data(), rank.data(), valid.get(), sums.data()};
    for (int64_t b = 0; b < a.B; ++b) {
      advantages_group(BlockPar{}, ws, b, int(a.G), rewards.data_ptr<T>(), data_or_null<T>(factor),
                       data_or_null<bool>(mask), int(estimator), int(k), standardize, a.out.data_ptr<T>());
    }
  });
  return a.out;
}

}  // namespace divkernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Host build of the divkernels CUDA math (tests without a GPU)";
  m.attr("platform") = "host";
  divkernels::define_ops(m);
}
