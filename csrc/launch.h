// Argument checks and output allocation shared by the CUDA launchers (group_loss.cu,
// similarity_backward.cu) and their host build (cpu/group_math_cpu.cpp): both take the same
// arguments and return the same tensors, so the Python side calls either the same way.
#pragma once

#include <ATen/ATen.h>
#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <cmath>
#include <vector>

#include "group_math.h"
#include "pair_math.h"

namespace divkernels {

using OptTensor = c10::optional<at::Tensor>;

inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options, bool poison) {
  // Poisoned outputs (NaN) make an element a kernel fails to write fail the tests.
  return poison ? at::full(shape, NAN, options) : at::empty(shape, options);
}

// A [B, G] tensor in the accumulation dtype, contiguous (the Python side converts them).
inline void check_group_tensor(const char* name, const at::Tensor& t, int64_t B, int64_t G, at::ScalarType acc,
                               const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == G, name, " must be [B, G] = [", B, ", ", G, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, name, " must be ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but policy_logps on ", device);
}

struct ForwardArgs {
  LossParams params;
  int64_t B, G, D;
  at::ScalarType acc;
  // stats, grad_policy, sim, norms, inverse (undefined when not stored), chosen counts, rejected counts
  std::vector<at::Tensor> outputs;
};

// Checks every input of the fused forward (``inputs`` in the order of enum Input, loss_params.h) and
// allocates its outputs; ``packed``: the kNumPackedParams values of LossParams.
inline ForwardArgs prepare_forward(const std::vector<OptTensor>& inputs, const std::vector<double>& packed,
                                   bool poison) {
  TORCH_CHECK(inputs.size() == size_t(kNumInputs), "group_loss_forward takes ", int(kNumInputs), " inputs, got ",
              inputs.size());
  TORCH_CHECK(packed.size() == size_t(kNumPackedParams), "group_loss_forward takes ", int(kNumPackedParams),
              " packed parameters, got ", packed.size());
  TORCH_CHECK(inputs[kInputPolicy] && inputs[kInputRewards], "policy_logps and rewards are required");
  const at::Tensor& policy = *inputs[kInputPolicy];
  const at::Tensor& rewards = *inputs[kInputRewards];
  const OptTensor& emb = inputs[kInputEmb];
  const OptTensor& mask = inputs[kInputMask];
  const OptTensor& ref = inputs[kInputRef];
  const OptTensor& counts = inputs[kInputCounts];
  const OptTensor& scores = inputs[kInputScores];
  const OptTensor& given_weights = inputs[kInputWeights];
  const OptTensor& lengths = inputs[kInputLengths];
  const OptTensor& nll_logps = inputs[kInputNllLogps];
  const OptTensor& nll_tokens = inputs[kInputNllTokens];
  ForwardArgs a;
  TORCH_CHECK(policy.dim() == 2, "policy_logps must be [B, G], got ", policy.sizes());
  a.B = policy.size(0);
  a.G = policy.size(1);
  a.acc = policy.scalar_type();
  TORCH_CHECK(a.acc == at::kFloat || a.acc == at::kDouble, "policy_logps must be float32 or float64 here, got ",
              a.acc);
  TORCH_CHECK(a.G >= 2 && a.G <= kMaxGroup, "the CUDA kernels take 2 <= G <= ", kMaxGroup, ", got G=", a.G);
  const auto device = policy.device();
  check_group_tensor("policy_logps", policy, a.B, a.G, a.acc, device);
  check_group_tensor("rewards", rewards, a.B, a.G, a.acc, device);
  if (ref) check_group_tensor("ref_logps", *ref, a.B, a.G, a.acc, device);
  if (scores) check_group_tensor("divpo_scores", *scores, a.B, a.G, a.acc, device);
  if (given_weights) check_group_tensor("weights", *given_weights, a.B, a.G, a.acc, device);
  if (lengths) check_group_tensor("token_counts", *lengths, a.B, a.G, a.acc, device);
  if (nll_logps) check_group_tensor("nll_logps", *nll_logps, a.B, a.G, a.acc, device);
  if (nll_tokens) check_group_tensor("nll_tokens", *nll_tokens, a.B, a.G, a.acc, device);
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 &&
                    mask->size(0) == a.B && mask->size(1) == a.G,
                "mask must be a contiguous bool [B, G] tensor");
    TORCH_CHECK(mask->device() == device, "mask is on ", mask->device(), " but policy_logps on ", device);
  }
  a.D = 1;
  if (emb) {
    TORCH_CHECK(emb->dim() == 3 && emb->size(0) == a.B && emb->size(1) == a.G, "emb must be [B, G, D] with [B, G] = [",
                a.B, ", ", a.G, "], got ", emb->sizes());
    const auto t = emb->scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                "emb must be float32/float64/float16/bfloat16, got ", t);
    TORCH_CHECK(emb->device() == device, "emb is on ", emb->device(), " but policy_logps on ", device);
    a.D = emb->size(2);
    TORCH_CHECK(a.D >= 1, "emb must have D >= 1");
  }
  a.params = unpack_params(packed);
  const LossParams& p = a.params;
  TORCH_CHECK(p.pairs != kPairsExplicit || counts, "pairs='explicit' needs the pair counts");
  if (counts) {
    TORCH_CHECK(counts->dim() == 3 && counts->size(0) == a.B && counts->size(1) == a.G && counts->size(2) == a.G &&
                    counts->scalar_type() == a.acc && counts->is_contiguous() && counts->device() == device,
                "counts must be a contiguous [B, G, G] tensor of policy_logps' dtype and device");
  }
  TORCH_CHECK(p.loss >= 0 && p.loss <= kLossDpoListwise && p.pairs >= 0 && p.pairs <= kPairsExplicit && p.weights >= 0 &&
                  p.weights <= kWeightsGiven && p.deviation_norm >= 0 && p.deviation_norm <= kNormNone,
              "unknown loss / pairs / weights / deviation_norm mode");
  TORCH_CHECK((p.weights == kWeightsGiven) == given_weights.has_value(),
              "weights mode ", int(kWeightsGiven), " (given) needs given_weights, and only it");
  set_input_flags(a.params, inputs);
  a.params.need_logdet = a.params.need_logdet && emb.has_value();
  a.params.store_state = a.params.store_state && emb.has_value();
  a.params.vector_loads = false;
  if (emb) {
    a.params.vector_loads = can_vector_load(emb->data_ptr(), emb->stride(0), emb->stride(1), emb->stride(2),
                                            int(emb->element_size()));
  }
  const auto options = policy.options();
  a.outputs.push_back(new_output({a.B, kNumStats}, options, poison));
  a.outputs.push_back(new_output({a.B, a.G}, options, poison));
  for (int k = 0; k < 3; ++k) a.outputs.emplace_back();
  if (a.params.store_state) {
    a.outputs[2] = new_output({a.B, a.G, a.G}, options, poison);
    a.outputs[3] = new_output({a.B, a.G}, options, poison);
    if (a.params.need_logdet) a.outputs[4] = new_output({a.B, a.G, a.G}, options, poison);
  }
  a.outputs.push_back(new_output({a.B, a.G}, options, poison));
  a.outputs.push_back(new_output({a.B, a.G}, options, poison));
  return a;
}

// Calls f(T{}, E{}) for the instantiated (accumulation, embedding) type pairs: float with
// float/half/bfloat16 emb, double with double emb (the Python side upcasts emb for float64 runs),
// which keeps the build to five instantiations per kernel.
template <class F>
void dispatch_types(at::ScalarType acc, at::ScalarType emb, const F& f) {
  if (acc == at::kDouble) {
    TORCH_CHECK(emb == at::kDouble, "float64 accumulation needs float64 emb, got ", emb);
    f(double{}, double{});
  } else if (acc == at::kFloat && emb == at::kFloat) {
    f(float{}, float{});
  } else if (acc == at::kFloat && emb == at::kHalf) {
    f(float{}, c10::Half{});
  } else if (acc == at::kFloat && emb == at::kBFloat16) {
    f(float{}, c10::BFloat16{});
  } else {
    TORCH_CHECK(false, "unsupported dtypes: accumulation ", acc, ", emb ", emb);
  }
}

template <class T>
T* data_or_null(const OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}
template <class T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The kernels' view of the inputs and outputs (typed pointers, null when absent).
template <class T>
GroupInputs<T> group_inputs(const std::vector<OptTensor>& in) {
  return GroupInputs<T>{data_or_null<bool>(in[kInputMask]), data_or_null<T>(in[kInputPolicy]),
                        data_or_null<T>(in[kInputRef]), data_or_null<T>(in[kInputRewards]),
                        data_or_null<T>(in[kInputCounts]), data_or_null<T>(in[kInputScores]),
                        data_or_null<T>(in[kInputWeights]), data_or_null<T>(in[kInputLengths]),
                        data_or_null<T>(in[kInputNllLogps]), data_or_null<T>(in[kInputNllTokens])};
}

template <class T>
GroupOutputs<T> group_outputs(const std::vector<at::Tensor>& outputs) {
  return GroupOutputs<T>{outputs[0].data_ptr<T>(), outputs[1].data_ptr<T>(), outputs[5].data_ptr<T>(),
                         outputs[6].data_ptr<T>(), data_or_null<T>(outputs[2]), data_or_null<T>(outputs[3]),
                         data_or_null<T>(outputs[4])};
}

struct BackwardArgs {
  int64_t B, G, D;
  at::ScalarType acc;
  at::Tensor grad_emb;
};

// dL/d emb [B, G, D] (emb's dtype, contiguous) from dL/dS [B, G, G] (any strides, acc dtype), the
// saved S [B, G, G] and raw norms [B, G] (contiguous, acc dtype).
inline BackwardArgs prepare_backward(const at::Tensor& grad_sim, const at::Tensor& sim, const at::Tensor& norms,
                                     const at::Tensor& emb, const OptTensor& mask, const OptTensor& scale,
                                     bool poison) {
  BackwardArgs a;
  TORCH_CHECK(emb.dim() == 3, "emb must be [B, G, D]");
  a.B = emb.size(0);
  a.G = emb.size(1);
  a.D = emb.size(2);
  a.acc = sim.scalar_type();
  TORCH_CHECK(a.G >= 2 && a.G <= kMaxGroup, "the CUDA kernels take 2 <= G <= ", kMaxGroup, ", got G=", a.G);
  TORCH_CHECK(a.acc == at::kFloat || a.acc == at::kDouble, "S must be float32 or float64");
  for (const auto* t : {&grad_sim, &sim}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == a.B && t->size(1) == a.G && t->size(2) == a.G,
                "dL/dS and S must be [B, G, G]");
  }
  TORCH_CHECK(grad_sim.scalar_type() == a.acc, "dL/dS must have S's dtype");
  TORCH_CHECK(sim.is_contiguous() && norms.is_contiguous() && norms.scalar_type() == a.acc, "S and norms must be "
              "contiguous and of one dtype");
  if (mask) TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous(), "mask must be contiguous bool");
  if (scale) TORCH_CHECK(scale->numel() == 1 && scale->scalar_type() == a.acc && scale->device() == sim.device(),
                         "scale must be one number of S's dtype and device");
  a.grad_emb = new_output({a.B, a.G, a.D}, emb.options(), poison);
  return a;
}

#if defined(__CUDACC__)
// Dynamic shared memory of `elements` values for a group of G, raised above 48 KiB where the device
// allows it.
template <class Kernel>
size_t shared_bytes(Kernel kernel, int64_t G, int64_t elements, size_t element) {
  const size_t bytes = size_t(elements) * element;
  const int device = c10::cuda::current_device();
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= size_t(optin), "the CUDA group kernel needs ", bytes, " bytes of shared memory for G=", G,
              " in this dtype but the device allows ", optin, "; use backend='triton' or 'reference'");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  }
  return bytes;
}
#endif

// The launchers: group_loss.cu / similarity_backward.cu on CUDA, cpu/group_math_cpu.cpp on the host.
// inputs: enum Input's tensors; packed: LossParams' packed values (divkernels.loss_config.KERNEL_PARAMS).
std::vector<at::Tensor> group_loss_forward(const std::vector<OptTensor>& inputs, const std::vector<double>& packed,
                                           bool poison);
at::Tensor similarity_backward(const at::Tensor& grad_sim, const at::Tensor& sim, const at::Tensor& norms,
                               const at::Tensor& emb, const OptTensor& mask, const OptTensor& scale, double factor,
                               bool poison);
at::Tensor partition_diversity(const OptTensor& equivalence, const OptTensor& labels, const OptTensor& mask,
                               double min_diversity, bool transitive, bool normalize);
at::Tensor group_advantages(const at::Tensor& rewards, const OptTensor& factor, const OptTensor& mask,
                            int64_t estimator, int64_t k, bool standardize);

// Checked arguments of partition_diversity: exactly one of the judge's links (contiguous bool
// [B, G, G]) and labels (contiguous int64 [B, G]); the output [B, G] float32.
struct PartitionArgs {
  int64_t B = 0, G = 0;
  at::Device device = at::kCPU;
  at::Tensor out;
};

inline PartitionArgs prepare_partition(const OptTensor& equivalence, const OptTensor& labels, const OptTensor& mask) {
  TORCH_CHECK(equivalence.has_value() != labels.has_value(), "give exactly one of equivalence and labels");
  PartitionArgs a;
  if (equivalence) {
    TORCH_CHECK(equivalence->scalar_type() == at::kBool && equivalence->dim() == 3 && equivalence->is_contiguous() &&
                    equivalence->size(1) == equivalence->size(2),
                "equivalence must be a contiguous bool [B, G, G] tensor, got ", equivalence->sizes());
    a.B = equivalence->size(0);
    a.G = equivalence->size(1);
    a.device = equivalence->device();
  } else {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 2 && labels->is_contiguous(),
                "labels must be a contiguous int64 [B, G] tensor");
    a.B = labels->size(0);
    a.G = labels->size(1);
    a.device = labels->device();
  }
  TORCH_CHECK(a.G >= 1 && a.G <= kMaxGroup, "G must be in [1, ", kMaxGroup, "], got ", a.G);
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 &&
                    mask->size(0) == a.B && mask->size(1) == a.G && mask->device() == a.device,
                "mask must be a contiguous bool [B, G] tensor on the links' device");
  }
  a.out = at::empty({a.B, a.G}, at::TensorOptions().dtype(at::kFloat).device(a.device));
  return a;
}

// Checked arguments of group_advantages: contiguous float32 / float64 rewards [B, G], a factor of the same
// dtype and shape (or None), a bool mask (or None); the output [B, G] in the rewards' dtype.
struct AdvantageArgs {
  int64_t B = 0, G = 0;
  at::Tensor out;
};

inline AdvantageArgs prepare_advantages(const at::Tensor& rewards, const OptTensor& factor, const OptTensor& mask) {
  TORCH_CHECK(rewards.dim() == 2 && rewards.is_contiguous() &&
                  (rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble),
              "rewards must be a contiguous float32 or float64 [B, G] tensor");
  AdvantageArgs a;
  a.B = rewards.size(0);
  a.G = rewards.size(1);
  TORCH_CHECK(a.G >= 1 && a.G <= kMaxGroup, "G must be in [1, ", kMaxGroup, "], got ", a.G);
  if (factor) {
    TORCH_CHECK(factor->sizes() == rewards.sizes() && factor->scalar_type() == rewards.scalar_type() &&
                    factor->is_contiguous() && factor->device() == rewards.device(),
                "factor must be a contiguous tensor of the rewards' shape, dtype and device");
  }
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 &&
                    mask->size(0) == a.B && mask->size(1) == a.G && mask->device() == rewards.device(),
                "mask must be a contiguous bool [B, G] tensor on the rewards' device");
  }
  a.out = at::empty_like(rewards);
  return a;
}

}  // namespace divkernels
