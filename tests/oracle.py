"""An independent statement of every formula, for tests: one group at a time, one pair at a time.

Written from the formulas, not from ``divkernels.reference``: no batching, no masking tricks, no
shared helper. Each group's valid responses are taken out (``emb[b][mask[b]]``) and the formula is
applied to that small block with plain float64 torch ops (so gradients exist where the formula has
them): ``torch.logdet`` instead of a Cholesky, leave-one-out determinants instead of the inverse's
diagonal, an explicit list of pairs instead of a count matrix. Slow, and meant for small inputs.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import torch

NORM_FLOOR = 1e-12


def valid_rows(mask: torch.Tensor | None, b: int, group: int) -> list[int]:
    return list(range(group)) if mask is None else [i for i in range(group) if bool(mask[b, i])]


def similarity_block(x: torch.Tensor, kernel: str = "cosine", gamma: float | None = None) -> torch.Tensor:
    """``[n, n]`` similarity of the rows of ``x`` (float64)."""
    n, dim = x.shape
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            if kernel == "cosine":
                if i == j:
                    value = torch.ones((), dtype=torch.float64)
                else:
                    norm_i = torch.clamp(torch.sqrt((x[i] * x[i]).sum()), min=NORM_FLOOR)
                    norm_j = torch.clamp(torch.sqrt((x[j] * x[j]).sum()), min=NORM_FLOOR)
                    value = (x[i] * x[j]).sum() / (norm_i * norm_j)
            elif kernel == "dot":
                value = (x[i] * x[j]).sum()
            else:
                width = 1.0 / dim if gamma is None else gamma
                distance = ((x[i] - x[j]) ** 2).sum()
                value = torch.ones((), dtype=torch.float64) if i == j else torch.exp(-width * distance)
            row.append(value)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def pairwise_similarity(emb: torch.Tensor, mask: torch.Tensor | None = None, kernel: str = "cosine",
                        gamma: float | None = None) -> torch.Tensor:
    """``[B, G, G]``: each group's similarity on its valid block, the identity elsewhere."""
    batch, group, _ = emb.shape
    out = []
    for b in range(batch):
        rows = valid_rows(mask, b, group)
        block = similarity_block(emb[b, rows].double(), kernel, gamma) if rows else None
        full = [[None] * group for _ in range(group)]
        for i in range(group):
            for j in range(group):
                full[i][j] = torch.tensor(1.0 if i == j else 0.0, dtype=torch.float64)
        for a, i in enumerate(rows):
            for c, j in enumerate(rows):
                full[i][j] = block[a, c]
        out.append(torch.stack([torch.stack(row) for row in full]))
    return torch.stack(out)


def deviation(emb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``dev_i = 1/(n-1) sum_{j != i} (1 - cos(e_i, e_j))``, 0 at padding."""
    batch, group, _ = emb.shape
    out = torch.zeros(batch, group, dtype=torch.float64)
    values = []
    for b in range(batch):
        rows = valid_rows(mask, b, group)
        sim = similarity_block(emb[b, rows].double())
        n = len(rows)
        for a, i in enumerate(rows):
            total = sum(1.0 - sim[a, c] for c in range(n) if c != a)
            values.append((b, i, total / (n - 1)))
    return _scatter(out, values)


def _scatter(out: torch.Tensor, values: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """``out`` with ``out[b, i] = v`` for each entry, differentiably."""
    if not values:
        return out
    index = torch.tensor([b * out.shape[1] + i for b, i, _ in values])
    flat = out.flatten().index_put((index,), torch.stack([torch.as_tensor(v, dtype=torch.float64)
                                                          for _, _, v in values]))
    return flat.view_as(out)


def logdet_block(sim: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.logdet(sim + eps * torch.eye(sim.shape[0], dtype=torch.float64))


def logdet_diversity(emb: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-4,
                     kernel: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """``(log det(S + eps I) [B], gains [B, G])`` with ``gain_i = logdet(K) - logdet(K without i)``."""
    batch, group, _ = emb.shape
    logdets, gains = [], []
    for b in range(batch):
        rows = valid_rows(mask, b, group)
        sim = similarity_block(emb[b, rows].double(), kernel)
        full = logdet_block(sim, eps)
        logdets.append(full)
        for a, i in enumerate(rows):
            keep = [c for c in range(len(rows)) if c != a]
            rest = logdet_block(sim[keep][:, keep], eps) if keep else torch.zeros((), dtype=torch.float64)
            gains.append((b, i, full - rest))
    return torch.stack(logdets), _scatter(torch.zeros(batch, group, dtype=torch.float64), gains)


def partition_diversity(emb: torch.Tensor | None, mask: torch.Tensor | None, tau: float,
                        labels: torch.Tensor | None = None, min_diversity: float = 0.1,
                        transitive: bool = True) -> torch.Tensor:
    """DARLING's partition reward (``partition_reward_vllm_serve.partition``): union-find over the
    pairs judged equivalent (``cos >= tau`` or equal labels), then ``(n - |class|) / (n - 1)``
    floored at ``min_diversity``. ``transitive=False``: only direct links count (our variant)."""
    source = labels if labels is not None else emb
    batch, group = source.shape[:2]
    out = torch.zeros(batch, group, dtype=torch.float64)
    for b in range(batch):
        rows = valid_rows(mask, b, group)
        n = len(rows)
        if labels is not None:
            links = [[bool(labels[b, i] == labels[b, j]) for j in rows] for i in rows]
        else:
            sim = similarity_block(emb[b, rows].double())
            links = [[bool(sim[a, c] >= tau) for c in range(n)] for a in range(n)]
        roots = union_find(links)
        for a, i in enumerate(rows):
            if transitive:
                same = sum(1 for c in range(n) if roots[c] == roots[a])
            else:
                same = 1 + sum(1 for c in range(n) if c != a and links[a][c])
            out[b, i] = max((n - same) / (n - 1), min_diversity)
    return out


def union_find(links: list[list[bool]]) -> list[int]:
    """The root of each element after merging every linked pair (DARLING's ``process_uid_partition``)."""
    parent = list(range(len(links)))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a in range(len(links)):
        for c in range(a + 1, len(links)):
            if links[a][c]:
                parent[find(a)] = find(c)
    return [find(x) for x in range(len(links))]


# ------------------------------------------------------------------------------------------ losses


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(torch.exp(-x)) if x >= 0 else x - torch.log1p(torch.exp(x))


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of a list (numpy's default method)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def ddpo_weights(deviations: list[list[float]], tie: float = 1e-6) -> list[float]:
    """The weight ``score + 1`` of each response, following the steps of the authors'
    ``transform_scores`` (DiversityTuning ``3_data_prep_for_diversified_training.py``): per encoder,
    scores to [-1, 1] by min-max (0 if all equal); several encoders: geometric mean on [0, 1];
    then, unless all are equal, ``(s_c n - sum s) / (n + sum s)``. ``deviations[k]`` is encoder k's
    list; spreads up to ``tie`` count as equal (the authors compare exactly)."""
    n = len(deviations[0])
    scaled = []
    for dev in deviations:
        low, high = min(dev), max(dev)
        scaled.append([0.0] * n if high - low <= tie else [2 * (d - low) / (high - low) - 1 for d in dev])
    combined = []
    for i in range(n):
        product = 1.0
        for values in scaled:
            product *= ((values[i] + 1) / 2) ** (1 / len(scaled))
        combined.append(2 * product - 1)
    if max(combined) - min(combined) > tie:
        total = sum(combined)
        combined = [(c * n - total) / (n + total) for c in combined]
    return [c + 1 for c in combined]


def pairs_of_group(rewards: list[float], mode: str, scores: list[float] | None = None,
                   quality_quantile: float = 0.25, sim: torch.Tensor | None = None,
                   pools: str = "ranked") -> list[tuple[int, int]]:
    """(chosen, rejected) positions in one group's valid responses."""
    n = len(rewards)
    if mode == "all":
        return [(i, j) for i in range(n) for j in range(n) if rewards[i] > rewards[j]]
    if mode == "best_worst":
        best = max(range(n), key=lambda i: (rewards[i], -i))
        worst = min(range(n), key=lambda i: (rewards[i], i))
        return [(best, worst)] if rewards[best] > rewards[worst] else []

    def first_near(pool: list[int], values: list[float], sign: float) -> int:
        best = max(sign * values[i] for i in pool)
        return next(i for i in pool if sign * values[i] >= best - 1e-5 * max(abs(best), 1.0))

    def pool_deviation(pool: list[int]) -> list[float]:
        values = [0.0] * n
        for i in pool:
            others = [j for j in pool if j != i]
            values[i] = sum(1.0 - float(sim[i, j]) for j in others) / max(len(others), 1)
        return values

    if pools == "ranked":  # 4_data_prep_for_divpo.py: top / bottom by reward, diversity within each
        size = min(max(math.floor(quality_quantile * n + 1e-4), 1), n // 2)
        ascending = sorted(range(n), key=lambda i: (rewards[i], i))
        top, bottom = sorted(ascending[n - size:]), sorted(ascending[:size])
        top_scores = scores if scores is not None else pool_deviation(top)
        bottom_scores = scores if scores is not None else pool_deviation(bottom)
    else:
        threshold = quantile(rewards, 1.0 - quality_quantile)
        top = [i for i in range(n) if rewards[i] >= threshold]
        bottom = [i for i in range(n) if rewards[i] < threshold]
        top_scores = bottom_scores = scores if scores is not None else pool_deviation(list(range(n)))
    if not top or not bottom:
        return []
    chosen, rejected = first_near(top, top_scores, 1.0), first_near(bottom, bottom_scores, -1.0)
    return [(chosen, rejected)] if rewards[chosen] > rewards[rejected] else []


def pair_loss(loss: str, pi_c, pi_r, ref_c, ref_r, beta: float, orpo_lambda: float, simpo_gamma: float,
              len_c: float = 1.0, len_r: float = 1.0):
    """One pair's loss (TRL's formulas; IPO's log-ratios per completion token; ORPO with its NLL
    term on the chosen response)."""
    if loss == "dpo":
        return -log_sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    if loss == "ipo":
        return ((pi_c - ref_c) / len_c - (pi_r - ref_r) / len_r - 1.0 / (2.0 * beta)) ** 2
    if loss == "orpo":
        log_odds = (pi_c - torch.log(1.0 - torch.exp(pi_c))) - (pi_r - torch.log(1.0 - torch.exp(pi_r)))
        return -pi_c - orpo_lambda * log_sigmoid(log_odds)
    return -log_sigmoid(beta * (pi_c - pi_r) - simpo_gamma)


def group_preference_loss(policy: torch.Tensor, rewards: torch.Tensor, emb: torch.Tensor | None,
                          ref: torch.Tensor | None, mask: torch.Tensor | None, *, loss: str = "dpo",
                          diversity: str = "none", pairs: str = "all", pair_index: torch.Tensor | None = None,
                          beta: float = 0.1, orpo_lambda: float = 0.1, simpo_gamma: float = 0.5,
                          deviation_norm: str = "minmax", min_deviation: float = 0.0,
                          orpo_weighting: str = "dorpo", diversity_alpha: float = 0.0, eps: float = 1.0,
                          quality_quantile: float = 0.25, divpo_pools: str = "ranked",
                          divpo_scores: torch.Tensor | None = None,
                          extra_emb: list[torch.Tensor] = (), token_counts: torch.Tensor | None = None,
                          nll_logps: torch.Tensor | None = None, nll_tokens: torch.Tensor | None = None,
                          cpo_alpha: float = 0.0, pair_counts: list | None = None) -> torch.Tensor:
    """``sum over pairs of w_chosen * l_pair / #pairs - alpha * mean_b logdet_b`` (a scalar); DORPO:
    ``mean(w_c) * mean(-pi_c) - lambda * mean log sigmoid(w_c * delta log-odds)`` over the pairs.
    ``pair_counts``: a list that receives the ``(group, chosen, rejected)`` index of every pair."""
    batch, group = policy.shape
    dorpo = loss == "orpo" and orpo_weighting == "dorpo"
    total, count, logdets = torch.zeros((), dtype=torch.float64), 0, []
    weight_sum, nll_sum, nll_count = 0.0, torch.zeros((), dtype=torch.float64), 0.0
    for b in range(batch):
        rows = valid_rows(mask, b, group)
        n = len(rows)
        reward = [float(rewards[b, i]) for i in rows]
        weights = [1.0] * n
        if emb is not None:
            block = emb[b, rows].double()
            sim = similarity_block(block).detach()
            dev = [float(sum(1.0 - sim[a, c] for c in range(n) if c != a) / (n - 1)) for a in range(n)]
            if diversity == "deviation":
                mean = sum(dev) / n
                if deviation_norm == "minmax":
                    devs = [dev] + [[float(v) for v in deviation(extra[b:b + 1, rows])[0, :n]] for extra in extra_emb]
                    weights = ddpo_weights(devs)
                else:
                    weights = [d / mean if mean > 0 else 1.0 for d in dev] if deviation_norm == "mean" else dev
                weights = [max(w, min_deviation) for w in weights]
            elif diversity == "logdet_gain":
                full = float(logdet_block(sim, eps))
                residual = [math.exp(full - float(logdet_block(sim[[c for c in range(n) if c != a]]
                                                               [:, [c for c in range(n) if c != a]], eps)))
                            for a in range(n)]
                mean = sum(residual) / n
                weights = [r / mean for r in residual]
            if diversity_alpha > 0:
                logdets.append(logdet_block(similarity_block(block), eps))
        if pair_index is not None:
            position = {i: a for a, i in enumerate(rows)}
            chosen_pairs = [(position[int(c)], position[int(r)]) for c, r in pair_index[b].tolist() if c >= 0]
        else:
            scores = [float(divpo_scores[b, i]) for i in rows] if divpo_scores is not None else None
            group_sim = similarity_block(emb[b, rows].double()).detach() if emb is not None else None
            chosen_pairs = pairs_of_group(reward, pairs, scores, quality_quantile, group_sim, divpo_pools)
        for a, c in chosen_pairs:
            i, j = rows[a], rows[c]
            if pair_counts is not None:
                pair_counts.append((b, i, j))
            ref_c = ref[b, i].double() if ref is not None else torch.zeros((), dtype=torch.float64)
            ref_r = ref[b, j].double() if ref is not None else torch.zeros((), dtype=torch.float64)
            pi_c, pi_r = policy[b, i].double(), policy[b, j].double()
            # the chosen sequence's NLL: TRL's cross-entropy sums over its tokens (default: -pi_c, one token)
            nll_sum = nll_sum - (nll_logps[b, i].double() if nll_logps is not None else pi_c)
            nll_count += float(nll_tokens[b, i]) if nll_tokens is not None else 1.0
            if dorpo:
                log_odds = (pi_c - torch.log(1.0 - torch.exp(pi_c))) - (pi_r - torch.log(1.0 - torch.exp(pi_r)))
                total = total - orpo_lambda * log_sigmoid(weights[a] * log_odds)
                weight_sum += weights[a]
            else:
                lengths = (float(token_counts[b, i]), float(token_counts[b, j])) if token_counts is not None \
                    else (1.0, 1.0)
                total = total + weights[a] * pair_loss(loss, pi_c, pi_r, ref_c, ref_r, beta, orpo_lambda, simpo_gamma,
                                                       *lengths)
            count += 1
    value = total / max(count, 1)
    nll = nll_sum / nll_count if nll_count else torch.zeros((), dtype=torch.float64)
    if dorpo:
        value = value + (weight_sum / max(count, 1)) * nll
    if cpo_alpha > 0:
        value = value + cpo_alpha * nll
    if logdets:
        value = value - diversity_alpha * torch.stack(logdets).sum() / max(batch, 1)
    return value


# -------------------------------------------------------------------------------------- advantages


def grpo_advantages(shaped: list[list[float]], scale: str = "std") -> list[list[float]]:
    """TRL's GRPO normalization of each group: ``(r - mean) / (std + 1e-4)`` (unbiased std)."""
    out = []
    for values in shaped:
        n = len(values)
        mean = sum(values) / n
        centered = [v - mean for v in values]
        if scale == "std":
            std = math.sqrt(sum(c * c for c in centered) / (n - 1)) if n > 1 else 0.0
            centered = [c / (std + 1e-4) for c in centered]
        out.append(centered)
    return out


def darling_shaped_rewards(rewards: torch.Tensor, mask: torch.Tensor | None, diversity: torch.Tensor,
                           quality: str = "raw") -> torch.Tensor:
    """DARLING's shaped reward: the raw quality reward times the partition diversity (``"minmax"``,
    our variant: quality min-max scaled over the batch's valid rewards first, all equal: 1); 0 at padding."""
    batch, group = rewards.shape
    if quality == "raw":
        out = torch.zeros(batch, group, dtype=torch.float64)
        for b in range(batch):
            for i in valid_rows(mask, b, group):
                out[b, i] = float(rewards[b, i]) * float(diversity[b, i])
        return out
    values = [float(rewards[b, i]) for b in range(batch) for i in valid_rows(mask, b, group)]
    out = torch.zeros(batch, group, dtype=torch.float64)
    if not values:
        return out
    low, high = min(values), max(values)
    for b in range(batch):
        for i in valid_rows(mask, b, group):
            quality = (float(rewards[b, i]) - low) / (high - low) if high > low else 1.0
            out[b, i] = quality * float(diversity[b, i])
    return out


def group_advantages(rewards: torch.Tensor, emb: torch.Tensor | None, mask: torch.Tensor | None, diversity: str,
                     alpha: float, tau: float, eps: float, scale: str | None,
                     labels: torch.Tensor | None = None, min_diversity: float = 0.1, transitive: bool = True,
                     darling_reward: str = "raw") -> torch.Tensor:
    """``[B, G]`` GRPO advantages of the shaped rewards (0 at padding); ``scale=None``: no std
    scaling for DARLING (its published runs), std scaling otherwise (TRL's default)."""
    batch, group = rewards.shape
    if scale is None:
        scale = "none" if diversity == "darling" else "std"
    shaped = rewards.double().clone()
    if diversity == "darling":
        div = partition_diversity(emb, mask, tau, labels, min_diversity, transitive)
        shaped = darling_shaped_rewards(rewards, mask, div, darling_reward)
    elif diversity == "dqo":
        shaped = shaped + alpha * logdet_diversity(emb, mask, eps)[1].detach()
    elif diversity == "deviation":
        shaped = shaped + alpha * deviation(emb, mask).detach()
    out = torch.zeros(batch, group, dtype=torch.float64)
    for b in range(batch):
        rows = valid_rows(mask, b, group)
        if rows:
            values = grpo_advantages([[float(shaped[b, i]) for i in rows]], scale)[0]
            out[b, rows] = torch.tensor(values, dtype=torch.float64)
    return out


def passk_group(values: list[float], estimator: str, k: int, scale: str = "std") -> list[float]:
    """Pass@k advantages of one group's valid rewards by enumerating every subset of size ``k``
    (``k = n`` when the group is smaller), in exact rational arithmetic (``fractions.Fraction`` of the
    float rewards; one square root and one division rounded at the end): the estimators' definitions.

    passk_analytic: a subset's reward is its maximum; ``A_i`` = mean over the subsets holding ``i`` of
    (its reward - the mean over all subsets), over the population std of all subsets (``scale="std"``;
    0 when that std is 0). pkpo: ``A_i = sum_{I holding i} (max I - max (I - i)) / C(n, k)``, the max of
    an empty set 0. best_minus_second: max - second max at the first maximum (over std + 1e-6, unbiased std).
    """
    n = len(values)
    exact = [Fraction(value) for value in values]
    if n == 0:
        return []
    if estimator == "best_minus_second":
        out = [0.0] * n
        if n < 2:
            return out
        best = max(range(n), key=lambda i: (exact[i], -i))
        gap = exact[best] - max(v for i, v in enumerate(exact) if i != best)
        if scale == "std":
            mean = sum(exact) / n
            out[best] = float(gap) / (math.sqrt(float(sum((v - mean) ** 2 for v in exact) / (n - 1))) + 1e-6)
        else:
            out[best] = float(gap)
        return out
    size = min(k, n)
    subsets = list(itertools.combinations(range(n), size))
    best = {subset: max(exact[i] for i in subset) for subset in subsets}
    if estimator == "pkpo":
        shares = [Fraction(0)] * n
        for subset in subsets:
            for i in subset:
                rest = [exact[j] for j in subset if j != i]
                shares[i] += best[subset] - (max(rest) if rest else 0)
        return [float(share / len(subsets)) for share in shares]
    mean_all = sum(best.values()) / len(subsets)
    variance = sum((value - mean_all) ** 2 for value in best.values()) / len(subsets)
    out = []
    for i in range(n):
        holding = [best[subset] for subset in subsets if i in subset]
        centered = sum(holding) / len(holding) - mean_all
        if scale == "none":
            out.append(float(centered))
        else:
            out.append(float(centered) / math.sqrt(float(variance)) if variance > 0 else 0.0)
    return out


def passk_advantages(rewards: torch.Tensor, mask: torch.Tensor | None, estimator: str, k: int,
                     scale: str = "std") -> torch.Tensor:
    """``[B, G]`` :func:`passk_group` of each group's valid rewards, 0 at padding."""
    batch, group = rewards.shape
    out = torch.zeros(batch, group, dtype=torch.float64)
    for b in range(batch):
        rows = valid_rows(mask, b, group)
        values = passk_group([float(rewards[b, i]) for i in rows], estimator, k, scale)
        for i, value in zip(rows, values, strict=True):
            out[b, i] = value
    return out


def listwise_dpo_loss(policy: torch.Tensor, ref: torch.Tensor | None, rewards: torch.Tensor,
                      mask: torch.Tensor | None, beta: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Listwise DPO from the Plackett-Luce formula, one group at a time (float64, differentiable):
    the group's valid responses ranked by reward, each response ``i`` against itself and those with a
    strictly lower reward, ``-log(e^(beta z_i) / sum_(j in {i} + lower(i)) e^(beta z_j))``, ``z = pi - ref``,
    times its weight; the sum over groups divided by the number of pairs (i, j) with ``r_i > r_j``."""
    batch, group = policy.shape
    total = policy.new_zeros((), dtype=torch.float64)
    pairs = 0
    for b in range(batch):
        rows = valid_rows(mask, b, group)
        terms = []
        for i in rows:
            lower = [j for j in rows if float(rewards[b, j]) < float(rewards[b, i])]
            pairs += len(lower)
            if not lower:
                continue
            z = [policy[b, j].double() - (0.0 if ref is None else ref[b, j].double()) for j in [i, *lower]]
            logits = beta * torch.stack(z)
            weight = 1.0 if weights is None else float(weights[b, i])
            terms.append(weight * (torch.logsumexp(logits, 0) - logits[0]))
        if terms:
            total = total + torch.stack(terms).sum()
    return total / max(pairs, 1)
