// Group advantages of shaped rewards (divkernels/reference/advantages.py, reference/passk.py) on the
// for_each / sync schedule of group_math.h: GRPO's normalization or a pass@k estimator.
//
// A group's shaped rewards g (rewards times an optional per-response factor, DARLING's partition
// diversity) are ranked ascending (ties by index). A response at rank p of the n valid ones is the
// maximum of C(p, k-1) of the C(n, k) subsets of size k and lies in C(n-1, k-1) of them; the counts
// enter as ratios exp(log C(a, b) - log C(n, k)) in double (C(128, 64) ~ 2.4e37 would overflow float).
// With d = g - min g:
//   passk_analytic: A_p = (mean max of the subsets holding p - mean max of all) / std of all;
//   pkpo (s^(loo-1)): A_p = sum_{q below p} C(q, k-2) (d_p - d_q) / C(n, k), g_p / n at k = 1;
//   best_minus_second: max - second max at the first maximum, over std + 1e-6 (unbiased std).
// A group smaller than k uses k = n.
#pragma once

#include <cmath>
#include <cstdint>

#include "group_math.h"

namespace divkernels {

template <class T>
struct AdvantageWorkspace {
  T* g;        // [G] shaped rewards, 0 at padding
  T* d;        // [G] g - the group's smallest valid g
  int* rank;   // [G] ascending rank among the valid ones
  bool* valid; // [G]
  T* sums;     // [3] the group's scalars: smallest g, mean, spread (std, or the subsets' std)
};

// log C(top, bottom) in double, -inf outside 0 <= bottom <= top.
DK_HD double log_binomial(int top, int bottom) {
  if (bottom < 0 || bottom > top) return -INFINITY;
  return lgamma(top + 1.0) - lgamma(bottom + 1.0) - lgamma(top - bottom + 1.0);
}

template <class T>
DK_HD T binomial_ratio(int top, int bottom, double log_denominator) {
  const double value = log_binomial(top, bottom);
  return value == -INFINITY ? T(0) : T(exp(value - log_denominator));
}

template <class T>
DK_HD int valid_count(AdvantageWorkspace<T> ws, int G) {
  int n = 0;
  for (int j = 0; j < G; ++j) n += ws.valid[j] ? 1 : 0;
  return n;
}

// mean and (unbiased) std of the valid g, as TRL's GRPO and verl's grpo_passk take them.
template <class T>
DK_HD void mean_and_std(AdvantageWorkspace<T> ws, int G, int n, T* mean, T* spread) {
  T sum = T(0);
  for (int j = 0; j < G; ++j) sum += ws.g[j];
  *mean = sum / T(n > 1 ? n : 1);
  T squares = T(0);
  for (int j = 0; j < G; ++j) {
    const T centered = ws.valid[j] ? ws.g[j] - *mean : T(0);
    squares += centered * centered;
  }
  *spread = sqrt(squares / T(n - 1 > 1 ? n - 1 : 1));
}

template <class Par, class T>
DK_HD void load_and_rank(const Par& par, AdvantageWorkspace<T> ws, int64_t b, int G, const T* rewards,
                         const T* factor, const bool* mask) {
  par.for_each(G, [&](int i) {
    const bool valid = mask == nullptr || mask[b * G + i];
    ws.valid[i] = valid;
    ws.g[i] = valid ? rewards[b * G + i] * (factor != nullptr ? factor[b * G + i] : T(1)) : T(0);
  });
  par.sync();
  par.for_each(1, [&](int) {
    T low = T(INFINITY);
    for (int j = 0; j < G; ++j) low = ws.valid[j] && ws.g[j] < low ? ws.g[j] : low;
    ws.sums[0] = low;
  });
  par.sync();
  par.for_each(G, [&](int i) {
    int rank = 0;
    for (int j = 0; j < G; ++j) {
      rank += ws.valid[j] && (ws.g[j] < ws.g[i] || (ws.g[j] == ws.g[i] && j < i)) ? 1 : 0;
    }
    ws.rank[i] = rank;
    ws.d[i] = ws.valid[i] ? ws.g[i] - ws.sums[0] : T(0);
  });
  par.sync();
}

// Pass@k Training's advantage; the subsets' variance as 1/2 sum_pq w_p w_q (d_p - d_q)^2 (exactly 0 when
// every subset has the same maximum, where sum_p w_p (d_p - mean)^2 would keep the mean's rounding).
template <class Par, class T>
DK_HD void passk_analytic(const Par& par, AdvantageWorkspace<T> ws, int64_t b, int G, int n, int k,
                          bool standardize, T* out) {
  const double log_subsets = log_binomial(n, k), log_holding = log_binomial(n - 1, k - 1);
  par.for_each(1, [&](int) {
    T mean = T(0), variance = T(0);
    for (int p = 0; p < G; ++p) {
      if (!ws.valid[p]) continue;
      const T wp = binomial_ratio<T>(ws.rank[p], k - 1, log_subsets);
      mean += wp * ws.d[p];
      for (int q = 0; q < G; ++q) {
        if (!ws.valid[q]) continue;
        const T gap = ws.d[p] - ws.d[q];
        variance += T(0.5) * wp * binomial_ratio<T>(ws.rank[q], k - 1, log_subsets) * gap * gap;
      }
    }
    ws.sums[1] = mean;
    ws.sums[2] = sqrt(variance);
  });
  par.sync();
  par.for_each(G, [&](int p) {
    T holding = binomial_ratio<T>(ws.rank[p], k - 1, log_holding) * ws.d[p];
    for (int q = 0; q < G; ++q) {
      if (ws.valid[q] && ws.rank[q] > ws.rank[p]) {
        holding += binomial_ratio<T>(ws.rank[q] - 1, k - 2, log_holding) * ws.d[q];
      }
    }
    T advantage = holding - ws.sums[1];
    if (standardize) advantage = ws.sums[2] > T(0) ? advantage / ws.sums[2] : T(0);
    out[b * G + p] = ws.valid[p] ? advantage : T(0);
  });
}

template <class Par, class T>
DK_HD void pkpo(const Par& par, AdvantageWorkspace<T> ws, int64_t b, int G, int n, int k, T* out) {
  const double log_subsets = log_binomial(n, k);
  par.for_each(G, [&](int p) {
    T advantage = T(0);
    if (k == 1) {
      advantage = ws.g[p] / T(n);
    } else {
      for (int q = 0; q < G; ++q) {
        if (ws.valid[q] && ws.rank[q] < ws.rank[p]) {
          advantage += binomial_ratio<T>(ws.rank[q], k - 2, log_subsets) * (ws.d[p] - ws.d[q]);
        }
      }
    }
    out[b * G + p] = ws.valid[p] ? advantage : T(0);
  });
}

template <class Par, class T>
DK_HD void best_minus_second(const Par& par, AdvantageWorkspace<T> ws, int64_t b, int G, int n, bool standardize,
                             T* out) {
  par.for_each(1, [&](int) {
    int best = -1;
    for (int j = 0; j < G; ++j) best = ws.valid[j] && (best < 0 || ws.g[j] > ws.g[best]) ? j : best;
    T second = T(-INFINITY);
    for (int j = 0; j < G; ++j) second = ws.valid[j] && j != best && ws.g[j] > second ? ws.g[j] : second;
    T gap = n >= 2 ? ws.g[best] - second : T(0);
    if (standardize && n >= 2) {
      T mean, spread;
      mean_and_std(ws, G, n, &mean, &spread);
      gap = gap / (spread + T(kPasskStdEps));
    }
    for (int j = 0; j < G; ++j) out[b * G + j] = j == best ? gap : T(0);
  });
}

template <class Par, class T>
DK_HD void grpo(const Par& par, AdvantageWorkspace<T> ws, int64_t b, int G, int n, bool standardize, T* out) {
  par.for_each(1, [&](int) { mean_and_std(ws, G, n, &ws.sums[1], &ws.sums[2]); });
  par.sync();
  par.for_each(G, [&](int i) {
    T centered = ws.g[i] - ws.sums[1];
    if (standardize) centered = centered / (ws.sums[2] + T(kAdvantageStdEps));
    out[b * G + i] = ws.valid[i] ? centered : T(0);
  });
}

// One group's advantages; estimator: enum Estimator (loss_params.h).
template <class Par, class T>
DK_HD void advantages_group(const Par& par, AdvantageWorkspace<T> ws, int64_t b, int G, const T* rewards,
                            const T* factor, const bool* mask, int estimator, int k, bool standardize, T* out) {
  load_and_rank(par, ws, b, G, rewards, factor, mask);
  const int n = valid_count(ws, G);
  const int size = k < n ? (k > 1 ? k : 1) : (n > 1 ? n : 1);
  if (estimator == kEstimatorPasskAnalytic) {
    passk_analytic(par, ws, b, G, n, size, standardize, out);
  } else if (estimator == kEstimatorPkpo) {
    pkpo(par, ws, b, G, n, size, out);
  } else if (estimator == kEstimatorBestMinusSecond) {
    best_minus_second(par, ws, b, G, n, standardize, out);
  } else {
    grpo(par, ws, b, G, n, standardize, out);
  }
}

}  // namespace divkernels
