// Group advantages (GRPO normalization or a pass@k estimator) of shaped rewards: one thread block per
// group, the group's values in shared memory (advantages.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>

#include "advantages.h"
#include "launch.h"

namespace divkernels {

template <class T>
__global__ void advantages_kernel(const T* __restrict__ rewards, const T* __restrict__ factor,
                                  const bool* __restrict__ mask, int G, int estimator, int k, bool standardize,
                                  T* __restrict__ out) {
  __shared__ T g[kMaxGroup], d[kMaxGroup], sums[3];
  __shared__ int rank[kMaxGroup];
  __shared__ bool valid[kMaxGroup];
  const AdvantageWorkspace<T> ws{g, d, rank, valid, sums};
  advantages_group(BlockPar{}, ws, int64_t(blockIdx.x), G, rewards, factor, mask, estimator, k, standardize, out);
}

at::Tensor group_advantages(const at::Tensor& rewards, const OptTensor& factor, const OptTensor& mask,
                            int64_t estimator, int64_t k, bool standardize) {
  const AdvantageArgs a = prepare_advantages(rewards, factor, mask);
  TORCH_CHECK(a.out.is_cuda(), "the CUDA extension needs CUDA tensors, got ", a.out.device());
  const c10::cuda::CUDAGuard guard(a.out.device());
  if (a.B == 0) return a.out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "group_advantages", [&] {
    advantages_kernel<scalar_t><<<unsigned(a.B), 128, 0, stream>>>(
        rewards.data_ptr<scalar_t>(), data_or_null<scalar_t>(factor), data_or_null<bool>(mask), int(a.G),
        int(estimator), int(k), standardize, a.out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.out;
}

}  // namespace divkernels
