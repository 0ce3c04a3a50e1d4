// Pair math of the fused group op (divkernels/reference/losses.py): pair selection (all, best-worst,
// DivPO, explicit counts), diversity weights, pair losses and their gradient, the stats a group writes,
// and group_forward, the whole forward of one group. Written against group_math.h's schedule `Par`
// and workspace, shared by the CUDA kernel (group_loss.cu) and the host build (cpu/group_math_cpu.cpp).
#pragma once

#include "group_math.h"

namespace divkernels {
// ------------------------------------------------------------------ pairs and weights

// First index of `pool` whose sign * score is within kDivpoTieRtol of the pool's maximum
// (reference._first_near_extreme); -1 for an empty pool. `in_pool(i)` says whether i is a member,
// computed again on each pass: an array of members indexed by i would sit in local memory.
template <class T, class InPool>
DK_HD int first_near_extreme(const T* score, InPool in_pool, T sign, int G) {
  bool any = false;
  T best = 0;
  for (int i = 0; i < G; ++i) {
    const bool member = in_pool(i);
    if (member && (!any || sign * score[i] > best)) best = sign * score[i];
    any = any || member;
  }
  if (!any) return -1;
  const T scale = fabs(best) > T(1) ? fabs(best) : T(1);
  for (int i = 0; i < G; ++i)
    if (in_pool(i) && sign * score[i] >= best - T(kDivpoTieRtol) * scale) return i;
  return -1;
}

// DivPO pool of response i (reference.divpo_pools): +1 top, -1 bottom, 0 neither. Ranked: the k
// highest / lowest rewards (rank ascending, ties by index), k = min(max(floor(q n + slack), 1),
// floor(n / 2)); threshold (ours): reward at or above the (1 - q) quantile / the rest.
template <class T>
DK_HD int divpo_pool(const Workspace<T>& ws, int i, T threshold, const LossParams& p) {
  if (ws.valid[i] == T(0)) return 0;
  const T n = ws.scalars[0];
  if (p.divpo_ranked) {
    T k = floor(T(p.quality_quantile) * n + T(kDivpoCountSlack));
    k = k > T(1) ? k : T(1);
    const T half = floor(n / T(2));
    k = k < half ? k : half;
    if (ws.rank[i] >= n - k) return 1;
    return ws.rank[i] < k ? -1 : 0;
  }
  return ws.reward[i] >= threshold ? 1 : -1;
}

// DivPO, step 1 (while S still holds the cosine similarity): the rank of each valid reward (ties
// by index), the threshold mode's linearly interpolated (1 - q) quantile (scalars[3]), and, in the
// ranked mode without given scores, each pool member's deviation from its own pool,
// (k - sum_{j in pool} S_ij) / (k - 1), into score.
template <class T, class Par>
DK_HD void divpo_prepare(const Par& par, Workspace<T> ws, int G, const LossParams& p) {
  par.for_each(G, [&](int i) {  // rank of reward i among the valid rewards, ties by index
    T r = 0;
    for (int j = 0; j < G; ++j)
      if (ws.valid[j] != T(0) && (ws.reward[j] < ws.reward[i] || (ws.reward[j] == ws.reward[i] && j < i))) r += 1;
    ws.rank[i] = r;
  });
  par.sync();
  par.for_each(1, [&](int) {
    const T n = ws.scalars[0];
    const T position = T(1.0 - p.quality_quantile) * (n - T(1) > T(0) ? n - T(1) : T(0));
    const T lower = floor(position), upper = ceil(position);
    T low_value = 0, high_value = 0;
    for (int i = 0; i < G; ++i) {
      if (ws.valid[i] == T(0)) continue;
      if (ws.rank[i] == lower) low_value = ws.reward[i];
      if (ws.rank[i] == upper) high_value = ws.reward[i];
    }
    ws.scalars[3] = low_value + (position - lower) * (upper > lower ? high_value - low_value : T(0));
  });
  par.sync();
  if (p.divpo_ranked && !p.has_scores && p.has_emb) {
    const T threshold = ws.scalars[3];
    par.for_each(G, [&](int i) {
      const int pool = divpo_pool(ws, i, threshold, p);
      T size = 0, row = 0;
      for (int j = 0; j < G; ++j) {
        if (pool == 0 || divpo_pool(ws, j, threshold, p) != pool) continue;
        size += T(1);
        row += ws.S[i * G + j];
      }
      ws.score[i] = pool != 0 ? (size - row) / (size - T(1) > T(1) ? size - T(1) : T(1)) : T(0);
    });
    par.sync();
  }
}

// picks = (chosen, rejected) for best-worst (argmax / argmin reward, first index on ties; none if
// all rewards are equal) and DivPO (reference.pair_counts_divpo: the most diverse of the top pool
// against the least diverse of the bottom pool; none unless the chosen reward is strictly higher).
template <class T, class Par>
DK_HD void select_pair(const Par& par, Workspace<T> ws, int G, const LossParams& p) {
  const T threshold = ws.scalars[3];
  par.for_each(1, [&](int) {
    int chosen = -1, rejected = -1;
    if (p.pairs == kPairsBestWorst) {
      for (int i = 0; i < G; ++i) {
        if (ws.valid[i] == T(0)) continue;
        if (chosen < 0 || ws.reward[i] > ws.reward[chosen]) chosen = i;
        if (rejected < 0 || ws.reward[i] < ws.reward[rejected]) rejected = i;
      }
      if (chosen < 0 || !(ws.reward[chosen] > ws.reward[rejected])) chosen = rejected = -1;
    } else if (p.pairs == kPairsDivpo) {
      const T* score = (p.has_scores || p.divpo_ranked) ? ws.score : ws.dev;
      chosen = first_near_extreme(score, [&](int i) { return divpo_pool(ws, i, threshold, p) == 1; }, T(1), G);
      rejected = first_near_extreme(score, [&](int i) { return divpo_pool(ws, i, threshold, p) == -1; }, T(-1), G);
      if (chosen < 0 || rejected < 0 || !(ws.reward[chosen] > ws.reward[rejected])) chosen = rejected = -1;
    }
    ws.picks[0] = chosen;
    ws.picks[1] = rejected;
  });
  par.sync();
}

// C_ij: how often (i chosen, j rejected) is a pair of group b.
template <class T>
DK_HD T pair_count(const Workspace<T>& ws, const T* counts, int64_t b, int i, int j, int G, int pairs) {
  switch (pairs) {
    case kPairsAll:
      return (ws.valid[i] != T(0) && ws.valid[j] != T(0) && ws.reward[i] > ws.reward[j]) ? T(1) : T(0);
    case kPairsExplicit:
      return counts[(b * G + i) * G + j];
    default:
      return (i == ws.picks[0] && j == ws.picks[1]) ? T(1) : T(0);
  }
}

// raw / mean_valid(raw); 1 where the group's mean is not positive.
template <class T>
DK_HD T mean_one(const Workspace<T>& ws, const T* raw, int i, int G) {
  T sum = 0;
  for (int j = 0; j < G; ++j) sum += ws.valid[j] != T(0) ? raw[j] : T(0);
  const T n = ws.scalars[0];
  const T mean = sum / (n > T(1) ? n : T(1));
  return mean > T(0) ? raw[i] / mean : T(1);
}

// DDPO/DORPO weight of one encoder's deviations (reference.ddpo_weights):
// (d_i - d_min) / (mean d - d_min), 1 when the spread is at most kDeviationTie.
template <class T>
DK_HD T ddpo_weight(const Workspace<T>& ws, const T* dev, int i, int G) {
  T low = 0, high = 0, sum = 0;
  bool any = false;
  for (int j = 0; j < G; ++j) {
    if (ws.valid[j] == T(0)) continue;
    low = (!any || dev[j] < low) ? dev[j] : low;
    high = (!any || dev[j] > high) ? dev[j] : high;
    sum += dev[j];
    any = true;
  }
  const T n = ws.scalars[0];
  const T mean = sum / (n > T(1) ? n : T(1));
  return high - low > T(kDeviationTie) ? (dev[i] - low) / (mean - low) : T(1);
}

// Per response: diversity weight w_i (a constant for the gradient), the slope du_ij / d pi_i and the
// implicit reward that TRL logs as rewards/chosen and rewards/rejected. For the weights,
// dev holds deviation and weight holds the residual variance 1 / (K^{-1})_ii (logdet_gain) or the
// given weights (kWeightsGiven).
template <class T, class Par>
DK_HD void response_terms(const Par& par, Workspace<T> ws, int G, const LossParams& p) {
  par.for_each(G, [&](int i) {
    T w = T(1);
    if (p.weights == kWeightsDeviation) {
      w = p.deviation_norm == kNormMinmax ? ddpo_weight(ws, ws.dev, i, G)
                                      : (p.deviation_norm == kNormMean ? mean_one(ws, ws.dev, i, G) : ws.dev[i]);
      w = w > T(p.min_deviation) ? w : T(p.min_deviation);
    } else if (p.weights == kWeightsLogdetGain) {
      w = mean_one(ws, ws.weight, i, G);
    } else if (p.weights == kWeightsGiven) {
      w = ws.weight[i];
    }
    ws.row_weighted[i] = w;  // staged: weight is read by mean_one above until the sync
    const T pi = ws.policy[i];
    switch (p.loss) {
      case kLossDpo:
      case kLossDpoListwise: ws.slope[i] = T(p.beta); ws.implicit[i] = T(p.beta) * (pi - ws.ref[i]); break;
      case kLossIpo: ws.slope[i] = T(1) / ws.length[i]; ws.implicit[i] = T(p.beta) * (pi - ws.ref[i]); break;
      case kLossOrpo: ws.slope[i] = T(-1) / expm1(pi); ws.implicit[i] = T(p.orpo_lambda) * pi; break;
      default: ws.slope[i] = T(p.beta); ws.implicit[i] = T(p.beta) * pi; break;
    }
  });
  par.sync();
  par.for_each(G, [&](int i) { ws.weight[i] = ws.row_weighted[i]; });
  par.sync();
}

// Pair loss l(u_ij) and dl/du for chosen i, rejected j. DORPO puts the chosen weight w inside the
// log-sigmoid (l = -lambda log sigmoid(w u), no NLL: that term is a batch mean, see pair_sums);
// every other loss is multiplied by w outside (pair_sums).
template <class T>
DK_HD void pair_loss(const Workspace<T>& ws, int i, int j, const LossParams& p, T* loss, T* dloss, T* odds) {
  const T pi = ws.policy[i], pj = ws.policy[j];
  *odds = T(0);
  if (p.loss == kLossDpo) {
    const T u = T(p.beta) * ((pi - ws.ref[i]) - (pj - ws.ref[j]));
    *loss = softplus(-u);
    *dloss = -sigmoid(-u);
  } else if (p.loss == kLossDpoListwise) {  // per unit of C_ij: l_i is the row's (pair_sums), dl_i/du_ij
    const T u = T(p.beta) * ((pi - ws.ref[i]) - (pj - ws.ref[j]));
    *loss = ws.row_logz[i];
    *dloss = -exp(-u - ws.row_logz[i]);
  } else if (p.loss == kLossIpo) {  // log-ratios per completion token (TRL's DPOTrainer)
    const T u = (pi - ws.ref[i]) / ws.length[i] - (pj - ws.ref[j]) / ws.length[j] - T(0.5 / p.beta);
    *loss = u * u;
    *dloss = T(2) * u;
  } else if (p.loss == kLossOrpo) {
    const T u = (pi - log1mexp(pi)) - (pj - log1mexp(pj));
    if (p.orpo_dorpo) {
      const T w = ws.weight[i];
      *loss = T(p.orpo_lambda) * softplus(-w * u);
      *dloss = -T(p.orpo_lambda) * w * sigmoid(-w * u);
      *odds = w * u;
    } else {
      *loss = T(p.orpo_lambda) * softplus(-u) - pi;
      *dloss = -T(p.orpo_lambda) * sigmoid(-u);
      *odds = u;
    }
  } else {
    const T u = T(p.beta) * (pi - pj) - T(p.simpo_gamma);
    *loss = softplus(-u);
    *dloss = -sigmoid(-u);
  }
}

// Row k: its pairs as chosen (loss, metric sums, sum_j M_kj) and as rejected (sum_i M_ik), with
// M_ij = C_ij v_i dl/du_ij (v = w, or 1 for DORPO whose weight is inside l); then
// d loss_sum / d pi_k = slope_k (sum_j M_kj - sum_i M_ik) (minus sum_j C_kj w_k for ORPO's per-pair
// NLL term), 0 at padding. The NLL term of the batch (DORPO's, CPO's) is reduced over the batch
// from the chosen counts: sum_k count_k nll_logp_k and sum_k count_k nll_token_k; its gradient is
// -count_k times a factor only the batch totals give (the backward's).
// Listwise DPO's row normalizers (reference.listwise_losses): l_i = log(1 + sum_j C_ij e^(-u_ij)), shifted by
// the row's largest -u_ij for range, before pair_sums reads them across rows (row j's enters d/d pi_k).
template <class T, class Par>
DK_HD void listwise_rows(const Par& par, Workspace<T> ws, const T* counts, int64_t b, int G, const LossParams& p) {
  par.for_each(G, [&](int i) {
    const T zi = ws.policy[i] - ws.ref[i];
    T shift = T(0);
    for (int j = 0; j < G; ++j) {
      const T u = T(p.beta) * (zi - (ws.policy[j] - ws.ref[j]));
      if (pair_count(ws, counts, b, i, j, G, p.pairs) > T(0) && -u > shift) shift = -u;
    }
    T tail = T(0);
    for (int j = 0; j < G; ++j) {
      const T c = pair_count(ws, counts, b, i, j, G, p.pairs);
      if (c > T(0)) tail += c * exp(-T(p.beta) * (zi - (ws.policy[j] - ws.ref[j])) - shift);
    }
    ws.row_logz[i] = shift + log(exp(-shift) + tail);
  });
  par.sync();
}

template <class T, class Par>
DK_HD void pair_sums(const Par& par, Workspace<T> ws, const T* counts, int64_t b, int G, const LossParams& p,
                     T* grad_policy, T* chosen_counts, T* rejected_counts) {
  const bool dorpo = p.loss == kLossOrpo && p.orpo_dorpo;
  if (p.loss == kLossDpoListwise) listwise_rows(par, ws, counts, b, G, p);
  par.for_each(G, [&](int k) {
    T loss_sum = 0, dsum = 0, dcol = 0, chosen = 0, rejected = 0, correct = 0, count = 0, weighted = 0;
    T rejected_count = 0, log_odds = 0, odds_sum = 0;
    for (int j = 0; j < G; ++j) {
      const T c = pair_count(ws, counts, b, k, j, G, p.pairs);
      if (c > T(0)) {
        T l, dl, odds;
        pair_loss(ws, k, j, p, &l, &dl, &odds);
        const T v = dorpo ? c : c * ws.weight[k];
        loss_sum += v * l;
        dsum += v * dl;
        weighted += c * ws.weight[k];
        count += c;
        chosen += c * ws.implicit[k];
        rejected += c * ws.implicit[j];
        correct += ws.implicit[k] > ws.implicit[j] ? c : T(0);
        log_odds -= c * softplus(-odds);  // log sigmoid(odds)
        odds_sum += c * odds;
      }
      const T c_in = pair_count(ws, counts, b, j, k, G, p.pairs);
      if (c_in > T(0)) {
        T l, dl, odds;
        pair_loss(ws, j, k, p, &l, &dl, &odds);
        dcol += c_in * (dorpo ? T(1) : ws.weight[j]) * dl;
        rejected_count += c_in;
      }
    }
    if (p.loss == kLossDpoListwise) loss_sum = count > T(0) ? ws.weight[k] * ws.row_logz[k] : T(0);  // w_k l_k once
    T grad = ws.slope[k] * (dsum - dcol);
    if (p.loss == kLossOrpo && !dorpo) grad -= weighted;
    const bool v = ws.valid[k] != T(0);
    grad_policy[b * G + k] = v ? grad : T(0);
    chosen_counts[b * G + k] = v ? count : T(0);
    rejected_counts[b * G + k] = v ? rejected_count : T(0);
    ws.row_loss[k] = loss_sum;
    ws.row_count[k] = count;
    ws.row_rejected_count[k] = rejected_count;
    ws.row_chosen[k] = chosen;
    ws.row_rejected[k] = rejected;
    ws.row_correct[k] = correct;
    ws.row_weight_sum[k] = weighted;
    ws.row_log_odds[k] = log_odds;
    ws.row_odds[k] = odds_sum;
  });
  par.sync();
}

// The group's partial sums, one row of the [B, kNumStats] output.
template <class T, class Par>
DK_HD void write_stats(const Par& par, Workspace<T> ws, int G, const LossParams& p, T* stats) {
  par.for_each(1, [&](int) {
    T sums[kNumStats] = {};
    T nonfinite = 0;
    for (int i = 0; i < G; ++i) {
      sums[kWeightedLoss] += ws.row_loss[i];
      sums[kPairs] += ws.row_count[i];
      sums[kChosenReward] += ws.row_chosen[i];
      sums[kRejectedReward] += ws.row_rejected[i];
      sums[kCorrect] += ws.row_correct[i];
      sums[kDeviation] += ws.dev[i];
      sums[kMeanSimilarity] += ws.row_sim[i];
      sums[kWeightSum] += ws.row_weight_sum[i];
      sums[kNllLogps] += ws.row_count[i] * ws.nll_logp[i];
      sums[kNllTokens] += ws.row_count[i] * ws.nll_token[i];
      sums[kLogpsChosen] += ws.row_count[i] * ws.policy[i];
      sums[kLogpsRejected] += ws.row_rejected_count[i] * ws.policy[i];
      sums[kLogOddsRatio] += ws.row_log_odds[i];
      sums[kLogOddsChosen] += ws.row_odds[i];
      const T norm = ws.norms[i];
      const T limit = sizeof(T) == sizeof(double) ? T(kEmbNormLimit64) : T(kEmbNormLimit32);
      if (p.has_emb && ws.valid[i] != T(0) && !(norm <= limit)) nonfinite += 1;  // NaN fails <= too
    }
    const T n = ws.scalars[0];
    const T others = n * (n - T(1));
    sums[kNoPairs] = sums[kPairs] == T(0) ? T(1) : T(0);
    sums[kMeanSimilarity] = (p.has_emb && others > T(0)) ? sums[kMeanSimilarity] / others : T(0);
    sums[kHasSimilarity] = (p.has_emb && others > T(0)) ? T(1) : T(0);
    sums[kLogdet] = (p.has_emb && p.need_logdet) ? ws.scalars[2] : T(0);
    sums[kValid] = n;
    sums[kEmbNonfinite] = nonfinite;
    for (int s = 0; s < kNumStats; ++s) stats[s] = sums[s];
  });
}

// ------------------------------------------------------------------ the fused forward of one group

// Inputs of the fused forward beyond emb: [B, G] per-response tensors (null when not given) and
// the explicit pair counts [B, G, G].
template <class T>
struct GroupInputs {
  const bool* mask;
  const T *policy, *ref, *rewards, *counts, *scores, *weights, *lengths, *nll_logps, *nll_tokens;
};

// Outputs of the fused forward: stats [B, kNumStats], grad_policy [B, G] (d loss_sum / d policy,
// unscaled), chosen / rejected counts [B, G] and, with store_state, S / norms / K^{-1} for the backward.
template <class T>
struct GroupOutputs {
  T *stats, *grad_policy, *chosen_counts, *rejected_counts, *sim, *norms, *inverse;
};

template <class T, class E, class Par>
DK_HD void group_forward(const Par& par, Workspace<T> ws, int64_t b, int G, int64_t D, const E* emb,
                         int64_t stride_b, int64_t stride_g, int64_t stride_d, const GroupInputs<T>& in,
                         const LossParams& p, const GroupOutputs<T>& out) {
  const bool* mask = in.mask;
  const T* counts = in.counts;
  T *sim_out = out.sim, *norms_out = out.norms, *inverse_out = out.inverse;
  load_group_inputs(par, ws, b, G, mask, in.policy, in.ref, in.rewards, in.scores, in.weights, in.lengths,
                    in.nll_logps, in.nll_tokens, p);
  par.for_each(G, [&](int i) {
    ws.dev[i] = T(0);
    ws.row_sim[i] = T(0);
    ws.norms[i] = T(0);
  });
  par.sync();
  if (p.has_emb) {
    gram_matrix(par, ws, emb + b * stride_b, stride_g, stride_d, G, D, p.vector_loads);
    cosine_from_gram(par, ws, G);
    deviation_from_similarity(par, ws, G);
    if (p.store_state) {
      par.for_each(G * G, [&](int k) { sim_out[b * G * G + k] = ws.S[k]; });
      par.for_each(G, [&](int i) { norms_out[b * G + i] = ws.norms[i]; });
    }
  }
  if (p.pairs == kPairsDivpo) divpo_prepare(par, ws, G, p);  // before K^{-1} overwrites S
  if (p.has_emb && p.need_logdet) {
    par.sync();
    logdet_and_inverse(par, ws, G, p.eps);
    if (p.weights == kWeightsLogdetGain) par.for_each(G, [&](int i) { ws.weight[i] = T(1) / ws.S[i * G + i]; });
    if (p.store_state) par.for_each(G * G, [&](int k) { inverse_out[b * G * G + k] = ws.S[k]; });
    par.sync();
  }
  select_pair(par, ws, G, p);
  response_terms(par, ws, G, p);
  pair_sums(par, ws, counts, b, G, p, out.grad_policy, out.chosen_counts, out.rejected_counts);
  write_stats(par, ws, G, p, out.stats + b * kNumStats);
}

}  // namespace divkernels
