// Fused group preference loss, forward: one thread block per group.
//
// The block stages emb[b] through shared memory kChunk columns at a time (coalesced along D,
// 16-byte loads when the rows are contiguous and aligned, the next chunk prefetched into registers
// during this one's multiply-adds) to accumulate the Gram matrix, then runs
// the group math of group_math.h on the G x G workspace in shared memory: cosine S, deviation,
// Cholesky of S + eps I with logdet and K^{-1}, pair selection, diversity weights, pair losses,
// d loss / d policy and the metric partial sums.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>

#include "pair_math.h"
#include "launch.h"

namespace divkernels {

template <class T, class E>
__global__ void group_loss_forward_kernel(const E* __restrict__ emb, int64_t stride_b, int64_t stride_g,
                                          int64_t stride_d, GroupInputs<T> inputs, int G, int64_t D,
                                          LossParams params, GroupOutputs<T> outputs) {
  extern __shared__ __align__(16) unsigned char shared[];
  __shared__ int picks[2];
  Workspace<T> ws = carve_workspace(reinterpret_cast<T*>(shared), picks, G);
  group_forward(BlockPar{}, ws, int64_t(blockIdx.x), G, D, emb, stride_b, stride_g, stride_d, inputs, params,
                outputs);
}

// At least 2 G threads: gram_matrix's register prefetch holds kVectors / 2 16-byte values per thread.
inline int threads_for(int64_t G) { return G <= 32 ? 64 : (G <= 64 ? 128 : 256); }

std::vector<at::Tensor> group_loss_forward(const std::vector<OptTensor>& inputs, const std::vector<double>& packed,
                                           bool poison) {
  ForwardArgs a = prepare_forward(inputs, packed, poison);
  const at::Tensor& policy = *inputs[kInputPolicy];
  const OptTensor& emb = inputs[kInputEmb];
  TORCH_CHECK(policy.is_cuda(), "the CUDA extension needs CUDA tensors, got ", policy.device());
  const c10::cuda::CUDAGuard guard(policy.device());
  if (a.B == 0) return a.outputs;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto emb_type = emb ? emb->scalar_type() : a.acc;
  dispatch_types(a.acc, emb_type, [&](auto acc_tag, auto emb_tag) {
    using T = decltype(acc_tag);
    using E = decltype(emb_tag);
    auto kernel = group_loss_forward_kernel<T, E>;
    const size_t bytes = shared_bytes(kernel, a.G, workspace_elements(int(a.G)), sizeof(T));
    const auto strides = emb ? emb->strides() : at::IntArrayRef{};
    kernel<<<unsigned(a.B), threads_for(a.G), bytes, stream>>>(
        emb ? emb->data_ptr<E>() : nullptr, emb ? strides[0] : 0, emb ? strides[1] : 0, emb ? strides[2] : 0,
        group_inputs<T>(inputs),
        int(a.G), a.D, a.params, group_outputs<T>(a.outputs));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return a.outputs;
}

}  // namespace divkernels
