// DARLING partition diversity from given links (a judge's [B, G, G] verdicts or [B, G] labels): one
// thread block per group, the G x G link matrix in shared memory (partition.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>

#include "partition.h"
#include "launch.h"

namespace divkernels {

template <class Label>
__global__ void partition_kernel(const bool* __restrict__ equivalence, const Label* __restrict__ labels,
                                 const bool* __restrict__ mask, int G, float min_diversity, bool transitive,
                                 bool normalize, float* __restrict__ out) {
  __shared__ unsigned char links[kMaxGroup * kMaxGroup];
  __shared__ int label[kMaxGroup], next[kMaxGroup];
  __shared__ bool valid[kMaxGroup];
  __shared__ int changed;
  __shared__ float value[kMaxGroup];
  const PartitionWorkspace ws{links, label, next, valid, &changed, value};
  partition_group(BlockPar{}, ws, int64_t(blockIdx.x), G, equivalence, labels, mask, min_diversity, transitive,
                  normalize, out);
}

at::Tensor partition_diversity(const OptTensor& equivalence, const OptTensor& labels, const OptTensor& mask,
                               double min_diversity, bool transitive, bool normalize) {
  const PartitionArgs a = prepare_partition(equivalence, labels, mask);
  TORCH_CHECK(a.device.is_cuda(), "the CUDA extension needs CUDA tensors, got ", a.device);
  const c10::cuda::CUDAGuard guard(a.device);
  if (a.B == 0) return a.out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool* judged = equivalence ? equivalence->data_ptr<bool>() : nullptr;
  const bool* valid = data_or_null<bool>(mask);
  partition_kernel<int64_t><<<unsigned(a.B), 128, 0, stream>>>(judged, data_or_null<int64_t>(labels), valid,
                                                               int(a.G), float(min_diversity), transitive,
                                                               normalize, a.out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.out;
}

}  // namespace divkernels
