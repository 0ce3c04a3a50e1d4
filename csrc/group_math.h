// Device math of the fused group op (divkernels/reference/: similarity, diversity, losses), shared by the CUDA kernels and a host build.
//
// Every function works on ONE group of G <= 128 responses held in a small workspace (shared memory
// on the GPU, heap memory on the host) and is written against a "parallel schedule" `Par`:
//   par.for_each(n, f)  runs f(0..n-1), each index writing only its own outputs;
//   par.sync()          makes those writes visible to every later step.
// On the GPU `BlockPar` strides the indices over the threads of a block and syncs with
// __syncthreads(); on the host `BlockPar` compiles to a plain loop. The kernels in
// group_loss.cu / similarity_backward.cu and the CPU build in cpu/group_math_cpu.cpp therefore run
// the same code, which is how the math is tested on a machine without a GPU.
//
// T is the accumulation type (float, or double for float64 inputs); E the embedding element type.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "loss_params.h"

#if defined(__CUDACC__)
#define DK_HD __host__ __device__ __forceinline__
#define DK_UNROLL _Pragma("unroll")
#else
#define DK_HD inline
#define DK_UNROLL
#endif

namespace divkernels {

using std::ceil;
using std::exp;
using std::expm1;
using std::fabs;
using std::floor;
using std::log;
using std::log1p;
using std::sqrt;

constexpr int kMaxGroup = 128;
constexpr int kChunk = 32;             // embedding columns per Gram step
// The enums, the reference's constants and LossParams are generated from divkernels/loss_config.py.

struct BlockPar {
  template <class F>
  DK_HD void for_each(int n, F f) const {
#if defined(__CUDA_ARCH__)
    for (int i = threadIdx.x; i < n; i += blockDim.x) f(i);
#else
    for (int i = 0; i < n; ++i) f(i);
#endif
  }
  DK_HD void sync() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
  // Thread-private slots of a for_each over n indices, for values a thread keeps in registers
  // across a sync: slot s is the index this thread visits s-th (t + s blockDim on the GPU; s on the
  // host, whose one "thread" visits every index). covers(n, slots): `slots` slots reach all n.
  DK_HD int slot(int s) const {
#if defined(__CUDA_ARCH__)
    return int(threadIdx.x) + s * int(blockDim.x);
#else
    return s;
#endif
  }
  DK_HD bool covers(int n, int slots) const {
#if defined(__CUDA_ARCH__)
    return slots * int(blockDim.x) >= n;
#else
    return slots >= n;
#endif
  }
};


// 16 bytes: one vectorized load (LDG.128 on the GPU).
struct alignas(16) Vec16 {
  uint32_t words[4];
};

// True when every emb row start is 16-byte aligned and D is contiguous, so the Gram tile can be
// loaded 16 bytes at a time (the launchers decide it once per launch).
DK_HD bool can_vector_load(const void* emb, int64_t stride_b, int64_t stride_g, int64_t stride_d, int element_size) {
  const int64_t per_vector = 16 / element_size;
  return emb != nullptr && stride_d == 1 && stride_g % per_vector == 0 && stride_b % per_vector == 0 &&
         reinterpret_cast<uintptr_t>(emb) % 16 == 0;
}

// Per-group workspace. S: G x G; W: G x max(G, kChunk + 1) (embedding tile, then Cholesky factor);
// vectors of G entries; a few integer scalars.
template <class T>
struct Workspace {
  T *S, *W;
  T *valid, *norms, *dev, *weight, *policy, *ref, *reward, *score, *implicit, *slope, *rank;
  T *length, *nll_logp, *nll_token;  // IPO's completion lengths; the NLL term's log-probs and token counts
  T *row_loss, *row_weight_sum, *row_rejected_count, *row_chosen, *row_rejected, *row_correct, *row_count,
      *row_weighted, *row_sim, *row_log_odds, *row_odds;
  T *row_logz;  // listwise DPO: each row's log(1 + sum_j C_ij e^(-u_ij)), read by the rows that reject it
  T *scalars;  // [0] n, [1] failed (0/1), [2] logdet, [3] DivPO quality threshold
  int *picks;  // [0] chosen, [1] rejected (best-worst / DivPO), -1 for none
};
constexpr int kNumVectors = 26;
constexpr int kNumScalars = 4;

// Row stride of W: at least kChunk columns, and odd, so that consecutive rows of one column fall in
// different shared-memory banks (a stride of 64 or 128 floats would put them all in one bank).
DK_HD int tile_ld(int G) { return (G > kChunk ? G : kChunk) + 1; }

// Workspace floats for a group of G (the kernels size their dynamic shared memory with it).
DK_HD int64_t workspace_elements(int G) {
  return int64_t(G) * G + int64_t(G) * tile_ld(G) + int64_t(kNumVectors) * G + kNumScalars;
}

// The backward's: the workspace, then a G x kChunk stage of emb columns (apply_backward_matrix).
DK_HD int64_t backward_workspace_elements(int G) { return workspace_elements(G) + int64_t(G) * kChunk; }

// The Gram step and the backward give each thread a kBlock x 1 column of outputs per shared load
// of the other operand (register blocking: kBlock + 1 loads per kBlock multiply-adds, instead of 2
// loads per multiply-add); kBlock x kBlock for the Gram, whose both operands are W.
constexpr int kBlock = 4;

template <class T>
DK_HD Workspace<T> carve_workspace(T* base, int* picks, int G) {
  Workspace<T> ws;
  ws.S = base;
  ws.W = ws.S + G * G;
  T* v = ws.W + G * tile_ld(G);
  T** vectors[kNumVectors] = {&ws.valid, &ws.norms, &ws.dev, &ws.weight, &ws.policy, &ws.ref, &ws.reward,
                              &ws.score, &ws.implicit, &ws.slope, &ws.rank, &ws.length, &ws.nll_logp,
                              &ws.nll_token, &ws.row_loss, &ws.row_weight_sum, &ws.row_rejected_count,
                              &ws.row_chosen, &ws.row_rejected, &ws.row_correct, &ws.row_count, &ws.row_weighted,
                              &ws.row_sim, &ws.row_log_odds, &ws.row_odds, &ws.row_logz};
  for (int k = 0; k < kNumVectors; ++k) *vectors[k] = v + k * G;
  ws.scalars = v + kNumVectors * G;
  ws.picks = picks;
  return ws;
}

// ------------------------------------------------------------------ small scalar functions

template <class T>
DK_HD T softplus(T x) {  // log(1 + e^x); -log sigmoid(u) = softplus(-u)
  return (x > T(0) ? x : T(0)) + log1p(exp(-fabs(x)));
}
template <class T>
DK_HD T sigmoid(T x) { return T(1) / (T(1) + exp(-x)); }
template <class T>
DK_HD T log1mexp(T x) {  // log(1 - e^x) for x < 0 (Maechler 2012)
  return x > T(-kLn2) ? log(-expm1(x)) : log1p(-exp(x));
}

// ------------------------------------------------------------------ loading

// valid_i, n, and the [B, G] per-response inputs of group b (already in T, contiguous).
template <class T, class Par>
DK_HD void load_group_inputs(const Par& par, Workspace<T> ws, int64_t b, int G, const bool* mask, const T* policy,
                             const T* ref, const T* rewards, const T* scores, const T* weights, const T* lengths,
                             const T* nll_logps, const T* nll_tokens, const LossParams& p) {
  par.for_each(G, [&](int i) {
    const bool v = p.has_mask ? mask[b * G + i] : true;
    ws.valid[i] = v ? T(1) : T(0);
    ws.weight[i] = (v && p.has_weights) ? weights[b * G + i] : T(1);  // given weights (kWeightsGiven), else 1
    ws.length[i] = (v && p.has_lengths) ? lengths[b * G + i] : T(1);
    // the NLL term reads the policy log-probs, one token each, unless given its own
    ws.nll_logp[i] = v ? (p.has_nll_logps ? nll_logps[b * G + i] : policy[b * G + i]) : T(0);
    ws.nll_token[i] = v ? (p.has_nll_tokens ? nll_tokens[b * G + i] : T(1)) : T(0);
    // Padded log-probs get a finite stand-in (< 0 keeps log(1 - e^pi) finite); they meet no pair.
    ws.policy[i] = v ? policy[b * G + i] : T(-1);
    ws.ref[i] = (v && p.has_ref) ? ref[b * G + i] : (p.has_ref ? T(-1) : T(0));
    ws.reward[i] = v ? rewards[b * G + i] : T(0);
    ws.score[i] = (v && p.has_scores) ? scores[b * G + i] : T(0);
  });
  par.sync();
  par.for_each(1, [&](int) {
    T n = 0;
    for (int i = 0; i < G; ++i) n += ws.valid[i];
    ws.scalars[0] = n;
    ws.scalars[1] = 0;
    ws.scalars[2] = 0;
    ws.scalars[3] = 0;
  });
  par.sync();
}

// ------------------------------------------------------------------ Gram matrix and similarity

// S = E E^T over the valid rows of emb[b] (fp32/fp64 accumulation), kChunk columns at a time: the
// chunk is staged in W (row stride tile_ld: odd, so column walks are conflict-free). Then each
// thread (ti, tj) adds the kBlock x kBlock entries (ti + r nb, tj + s nb), nb = ceil(G / kBlock):
// per column kBlock + kBlock shared loads for kBlock^2 multiply-adds. Threads of a warp share ti
// (its loads are broadcasts) and take consecutive tj (consecutive rows: different banks). Every
// entry is its own dot product in column order, so S_ij and S_ji are the same products summed in
// the same order: S is exactly symmetric. Padded rows read as 0.
//
// With 16-byte loads the next chunk is prefetched into registers (`next`, kSlots 16-byte values
// per thread) while the multiply-adds of this one run, and written to W after the barrier: the
// global-memory latency of chunk c + 1 hides behind the arithmetic of chunk c instead of stalling
// every thread at the barrier (register double buffering; W stays one tile, so the shared memory
// and the blocks per SM do not change). The launchers give at least 2 G threads (threads_for), so
// G kVectors / threads <= kVectors / 2 slots suffice; a block that had fewer threads would take the
// element-wise path below rather than drop columns.
template <class T, class E, class Par>
DK_HD void gram_matrix(const Par& par, Workspace<T> ws, const E* emb, int64_t stride_g, int64_t stride_d, int G,
                       int64_t D, bool vector_loads) {
  const int ld = tile_ld(G);
  const int nb = (G + kBlock - 1) / kBlock;
  constexpr int kPerVector = 16 / int(sizeof(E));  // elements per 16-byte load
  constexpr int kVectors = kChunk / kPerVector;     // 16-byte loads per tile row
#if defined(__CUDA_ARCH__)
  constexpr int kSlots = kVectors / 2;
#else
  constexpr int kSlots = kMaxGroup * kVectors;  // the host's one thread holds a whole chunk
#endif
  const int vectors = G * kVectors;
  const bool prefetch = vector_loads && par.covers(vectors, kSlots);
  // 16-byte value k of the chunk at column d0: row k / kVectors, columns c .. c + kPerVector - 1
  // (zeros past D and in padded rows, which are never read).
  auto load = [&](int k, int64_t d0) {
    const int i = k / kVectors, c = (k % kVectors) * kPerVector;
    const int64_t d = d0 + c;
    Vec16 raw;
    if (ws.valid[i] != T(0) && d + kPerVector <= D) {
      raw = *reinterpret_cast<const Vec16*>(emb + i * stride_g + d);
    } else {
      E values[kPerVector];
      for (int v = 0; v < kPerVector; ++v)
        values[v] = (ws.valid[i] != T(0) && d + v < D) ? emb[i * stride_g + d + v] : E(0);
      memcpy(&raw, values, sizeof(raw));
    }
    return raw;
  };
  Vec16 next[kSlots];
  auto fetch = [&](int64_t d0) {
    DK_UNROLL
    for (int s = 0; s < kSlots; ++s) {
      const int k = par.slot(s);
      if (k < vectors) next[s] = load(k, d0);
    }
  };
  par.for_each(G * G, [&](int k) { ws.S[k] = T(0); });
  if (prefetch) fetch(0);
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    par.sync();  // the last chunk's multiply-adds are done with W
    if (prefetch) {
      DK_UNROLL
      for (int s = 0; s < kSlots; ++s) {
        const int k = par.slot(s);
        if (k >= vectors) continue;
        const int i = k / kVectors, c = (k % kVectors) * kPerVector;
        E values[kPerVector];
        memcpy(values, &next[s], sizeof(values));
        for (int v = 0; v < kPerVector; ++v) ws.W[i * ld + c + v] = static_cast<T>(values[v]);
      }
    } else {
      par.for_each(G * kChunk, [&](int k) {
        const int i = k / kChunk, c = k % kChunk;
        const int64_t d = d0 + c;
        ws.W[i * ld + c] = (ws.valid[i] != T(0) && d < D) ? static_cast<T>(emb[i * stride_g + d * stride_d]) : T(0);
      });
    }
    par.sync();
    if (prefetch && d0 + kChunk < D) fetch(d0 + kChunk);  // in flight during the multiply-adds below
    par.for_each(nb * nb, [&](int k) {
      const int ti = k / nb, tj = k % nb;
      T acc[kBlock][kBlock] = {};
      for (int c = 0; c < kChunk; ++c) {
        T left[kBlock], right[kBlock];
        for (int r = 0; r < kBlock; ++r) {
          const int i = ti + r * nb, j = tj + r * nb;
          left[r] = i < G ? ws.W[i * ld + c] : T(0);
          right[r] = j < G ? ws.W[j * ld + c] : T(0);
        }
        for (int r = 0; r < kBlock; ++r)
          for (int q = 0; q < kBlock; ++q) acc[r][q] += left[r] * right[q];
      }
      for (int r = 0; r < kBlock; ++r)
        for (int q = 0; q < kBlock; ++q) {
          const int i = ti + r * nb, j = tj + q * nb;
          if (i < G && j < G) ws.S[i * G + j] += acc[r][q];
        }
    });
  }
  par.sync();
}

// Cosine similarity from the Gram matrix in place: S_ij = g_ij / (max(n_i, floor) max(n_j, floor)),
// diagonal exactly 1, padded rows/columns the identity's; norms = raw |e_i|.
template <class T, class Par>
DK_HD void cosine_from_gram(const Par& par, Workspace<T> ws, int G) {
  par.for_each(G, [&](int i) { ws.norms[i] = sqrt(ws.S[i * G + i]); });
  par.sync();
  par.for_each(G * G, [&](int k) {
    const int i = k / G, j = k % G;
    const bool keep = ws.valid[i] != T(0) && ws.valid[j] != T(0) && i != j;
    const T ni = ws.norms[i] > T(kNormFloor) ? ws.norms[i] : T(kNormFloor);
    const T nj = ws.norms[j] > T(kNormFloor) ? ws.norms[j] : T(kNormFloor);
    ws.S[k] = keep ? ws.S[k] / (ni * nj) : (i == j ? T(1) : T(0));
  });
  par.sync();
}

// dev_i = (n - sum_{valid j} S_ij) / max(n - 1, 1) (S_ii = 1), 0 at padding; row sums of the
// off-diagonal valid similarities for the mean-similarity metric.
template <class T, class Par>
DK_HD void deviation_from_similarity(const Par& par, Workspace<T> ws, int G) {
  const T n = ws.scalars[0];
  par.for_each(G, [&](int i) {
    T row = 0, off = 0;
    for (int j = 0; j < G; ++j) {
      if (ws.valid[j] == T(0)) continue;
      row += ws.S[i * G + j];
      if (j != i) off += ws.S[i * G + j];
    }
    const bool v = ws.valid[i] != T(0);
    ws.dev[i] = v ? (n - row) / (n - T(1) > T(1) ? n - T(1) : T(1)) : T(0);
    ws.row_sim[i] = v ? off : T(0);
  });
  par.sync();
}

// ------------------------------------------------------------------ logdet and inverse

// K = S + eps I on the valid block (padding: identity). Cholesky K = L L^T in W (lower triangle,
// left-looking, one column per step, dot products in double), logdet = 2 sum log L_kk, and
// K^{-1} column by column (L y = e_j, then L^T x = y) written over S. A pivot that is NaN or at most
// reference.pivot_floor (kPivotMargin G u max K_kk: L is stored in T, so its rounding error is T's)
// marks the group failed: logdet and K^{-1} are NaN (the checked Python call raises).
template <class T, class Par>
DK_HD void logdet_and_inverse(const Par& par, Workspace<T> ws, int G, double eps) {
  par.for_each(G * G, [&](int k) {
    const int i = k / G, j = k % G;
    ws.W[k] = ws.S[k] + ((i == j && ws.valid[i] != T(0)) ? T(eps) : T(0));
  });
  par.sync();
  double largest = 0.0;  // max K_kk over the valid rows: every thread reads W's diagonal after the sync
  for (int k = 0; k < G; ++k)
    if (ws.valid[k] != T(0) && double(ws.W[k * G + k]) > largest) largest = double(ws.W[k * G + k]);
  const double min_pivot = kPivotMargin * G * (sizeof(T) == sizeof(double) ? 0x1p-53 : 0x1p-24) * largest;
  for (int k = 0; k < G; ++k) {
    par.for_each(1, [&](int) {
      double d = double(ws.W[k * G + k]);
      for (int m = 0; m < k; ++m) d -= double(ws.W[k * G + m]) * double(ws.W[k * G + m]);
      if (!(d > min_pivot)) {
        ws.scalars[1] = T(1);
        d = 1.0;  // keep the remaining steps finite; the result is discarded
      }
      ws.W[k * G + k] = T(sqrt(d));
    });
    par.sync();
    par.for_each(G - k - 1, [&](int t) {
      const int i = k + 1 + t;
      double s = double(ws.W[i * G + k]);
      for (int m = 0; m < k; ++m) s -= double(ws.W[i * G + m]) * double(ws.W[k * G + m]);
      ws.W[i * G + k] = T(s / double(ws.W[k * G + k]));
    });
    par.sync();
  }
  par.for_each(1, [&](int) {
    T logdet = 0;
    for (int k = 0; k < G; ++k) logdet += T(2) * log(ws.W[k * G + k]);
    ws.scalars[2] = ws.scalars[1] != T(0) ? T(NAN) : logdet;
  });
  par.for_each(G, [&](int j) {  // column j of K^{-1}, in place in column j of S
    for (int i = 0; i < G; ++i) {
      if (i < j) { ws.S[i * G + j] = T(0); continue; }
      T s = i == j ? T(1) : T(0);
      for (int m = j; m < i; ++m) s -= ws.W[i * G + m] * ws.S[m * G + j];
      ws.S[i * G + j] = s / ws.W[i * G + i];
    }
    for (int i = G - 1; i >= 0; --i) {
      T s = ws.S[i * G + j];
      for (int m = i + 1; m < G; ++m) s -= ws.W[m * G + i] * ws.S[m * G + j];
      ws.S[i * G + j] = ws.scalars[1] != T(0) ? T(NAN) : s / ws.W[i * G + i];
    }
  });
  par.sync();
}

// ------------------------------------------------------------------ similarity backward (cosine)

// A = dL/dE_i contribution matrix of group b, in W: with Gs = c (dS + dS^T) off the diagonal (valid
// pairs; c = factor * scale[0], scale a device scalar such as the upstream gradient, or factor
// alone), A_ij = Gs_ij / (n_i n_j) - [i = j] (sum_k Gs_ik S_ik) / n_i^2 (n = max(|e|, floor); no
// projection term where |e_i| < floor), so that dL/dE = A E.
template <class T, class Par>
DK_HD void cosine_backward_matrix(const Par& par, Workspace<T> ws, int64_t b, int G, const bool* mask,
                                  const T* grad_sim, int64_t gs_b, int64_t gs_i, int64_t gs_j, const T* sim,
                                  const T* norms, const T* scale, double factor) {
  const T coef = T(factor) * (scale != nullptr ? scale[0] : T(1));
  par.for_each(G, [&](int i) { ws.valid[i] = (mask == nullptr || mask[b * G + i]) ? T(1) : T(0); });
  par.sync();
  par.for_each(G * G, [&](int k) {
    const int i = k / G, j = k % G;
    const bool pair = ws.valid[i] != T(0) && ws.valid[j] != T(0) && i != j;
    ws.S[k] = pair ? coef * (grad_sim[b * gs_b + i * gs_i + j * gs_j] + grad_sim[b * gs_b + j * gs_i + i * gs_j])
                   : T(0);
  });
  par.sync();
  par.for_each(G, [&](int i) {
    const T raw = ws.valid[i] != T(0) ? norms[b * G + i] : T(1);
    T projection = 0;
    for (int k = 0; k < G; ++k) projection += ws.S[i * G + k] * sim[(b * G + i) * G + k];
    ws.norms[i] = raw > T(kNormFloor) ? raw : T(kNormFloor);
    ws.dev[i] = raw >= T(kNormFloor) ? projection : T(0);
  });
  par.sync();
  par.for_each(G * G, [&](int k) {
    const int i = k / G, j = k % G;
    T a = ws.S[k] / (ws.norms[i] * ws.norms[j]);
    if (i == j) a -= ws.dev[i] / (ws.norms[i] * ws.norms[i]);
    ws.W[k] = a;
  });
  par.sync();
}

// grad_emb[b, i, d0 : d0 + width] = sum_j A_ij E[b, j, d] (A in W, row stride G; padded rows of E
// read as 0 and never loaded). kChunk columns at a time are staged in `stage` (G x kChunk, read from
// global memory once, coalesced); then thread (ti, c) sums the kBlock rows ti + r nb of column c:
// each staged value feeds kBlock outputs from a register, and the threads of a warp share ti (A's
// loads are broadcasts) and take consecutive c (conflict-free).
template <class T, class E, class Par>
DK_HD void apply_backward_matrix(const Par& par, Workspace<T> ws, T* stage, int64_t b, int G, int64_t D, int64_t d0,
                                 int width, const E* emb, int64_t stride_b, int64_t stride_g, int64_t stride_d,
                                 E* grad_emb) {
  const int nb = (G + kBlock - 1) / kBlock;
  const int64_t end = d0 + width < D ? d0 + width : D;
  for (int64_t c0 = d0; c0 < end; c0 += kChunk) {
    par.for_each(G * kChunk, [&](int k) {
      const int j = k / kChunk;
      const int64_t d = c0 + k % kChunk;
      stage[k] = (ws.valid[j] != T(0) && d < end) ? static_cast<T>(emb[b * stride_b + j * stride_g + d * stride_d])
                                                  : T(0);
    });
    par.sync();
    par.for_each(nb * kChunk, [&](int k) {
      const int ti = k / kChunk, c = k % kChunk;
      const int64_t d = c0 + c;
      if (d >= end) return;
      T acc[kBlock] = {};
      for (int j = 0; j < G; ++j) {
        const T value = stage[j * kChunk + c];
        for (int r = 0; r < kBlock; ++r) {
          const int i = ti + r * nb;
          if (i < G) acc[r] += ws.W[i * G + j] * value;
        }
      }
      for (int r = 0; r < kBlock; ++r) {
        const int i = ti + r * nb;
        if (i < G) grad_emb[(b * G + i) * D + d] = static_cast<E>(acc[r]);
      }
    });
    par.sync();  // the next chunk overwrites the stage
  }
}

}  // namespace divkernels
