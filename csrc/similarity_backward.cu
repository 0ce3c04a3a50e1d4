// Backward of the cosine similarity (shared by every op that differentiates through S):
// dL/d emb = A emb with A from dL/dS, S and the norms (group_math.h: cosine_backward_matrix).
// Grid (B, ceil(D / kBackwardWidth)): each block rebuilds the group's G x G matrix A in shared
// memory (O(G^2), cheap) and writes its slice of D through a shared stage of emb columns, reading
// emb once in total.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>

#include "group_math.h"
#include "launch.h"

namespace divkernels {

constexpr int kBackwardWidth = 128;  // embedding columns per block

template <class T, class E>
__global__ void similarity_backward_kernel(const T* __restrict__ grad_sim, int64_t gs_b, int64_t gs_i, int64_t gs_j,
                                           const T* __restrict__ sim, const T* __restrict__ norms,
                                           const bool* __restrict__ mask, const E* __restrict__ emb,
                                           int64_t stride_b, int64_t stride_g, int64_t stride_d, int G, int64_t D,
                                           const T* __restrict__ scale, double factor, E* grad_emb) {
  extern __shared__ __align__(16) unsigned char shared[];
  __shared__ int picks[2];
  Workspace<T> ws = carve_workspace(reinterpret_cast<T*>(shared), picks, G);
  const BlockPar par{};
  const int64_t b = blockIdx.x;
  cosine_backward_matrix(par, ws, b, G, mask, grad_sim, gs_b, gs_i, gs_j, sim, norms, scale, factor);
  const int64_t d0 = int64_t(blockIdx.y) * kBackwardWidth;
  T* stage = reinterpret_cast<T*>(shared) + workspace_elements(G);
  apply_backward_matrix(par, ws, stage, b, G, D, d0, kBackwardWidth, emb, stride_b, stride_g, stride_d, grad_emb);
}

at::Tensor similarity_backward(const at::Tensor& grad_sim, const at::Tensor& sim, const at::Tensor& norms,
                               const at::Tensor& emb, const OptTensor& mask, const OptTensor& scale, double factor,
                               bool poison) {
  TORCH_CHECK(emb.is_cuda() && sim.is_cuda() && grad_sim.is_cuda(), "the CUDA extension needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(emb.device());
  BackwardArgs a = prepare_backward(grad_sim, sim, norms, emb, mask, scale, poison);
  if (a.B == 0 || a.D == 0) return a.grad_emb;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(a.acc, emb.scalar_type(), [&](auto acc_tag, auto emb_tag) {
    using T = decltype(acc_tag);
    using E = decltype(emb_tag);
    auto kernel = similarity_backward_kernel<T, E>;
    const size_t bytes = shared_bytes(kernel, a.G, backward_workspace_elements(int(a.G)), sizeof(T));
    const dim3 grid(unsigned(a.B), unsigned((a.D + kBackwardWidth - 1) / kBackwardWidth));
    kernel<<<grid, 256, bytes, stream>>>(grad_sim.data_ptr<T>(), grad_sim.stride(0), grad_sim.stride(1),
                                         grad_sim.stride(2), sim.data_ptr<T>(), norms.data_ptr<T>(),
                                         data_or_null<bool>(mask), emb.data_ptr<E>(), emb.stride(0), emb.stride(1),
                                         emb.stride(2), int(a.G), a.D, data_or_null<T>(scale), factor,
                                         a.grad_emb.data_ptr<E>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return a.grad_emb;
}

}  // namespace divkernels
