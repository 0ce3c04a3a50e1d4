// Generated from divkernels/loss_config.py by `python -m divkernels.loss_config`: edit that file,
// then regenerate; tests/test_loss_config.py checks that this file is what it generates.
#pragma once

#include <vector>

namespace divkernels {

constexpr double kNormFloor = 0x1.19799812dea11p-40;  // 1e-12
constexpr double kEmbNormLimit32 = 0x1.0000000000000p+60;  // 1.152921504606847e+18
constexpr double kEmbNormLimit64 = 0x1.0000000000000p+508;  // 8.379879956214123e+152
constexpr double kDivpoTieRtol = 0x1.4f8b588e368f1p-17;  // 1e-05
constexpr double kDivpoCountSlack = 0x1.a36e2eb1c432dp-14;  // 0.0001
constexpr double kDeviationTie = 0x1.0c6f7a0b5ed8dp-20;  // 1e-06
constexpr double kLn2 = 0x1.62e42fefa39efp-1;  // 0.6931471805599453
constexpr double kPivotMargin = 0x1.0000000000000p+8;  // 256.0
constexpr double kAdvantageStdEps = 0x1.a36e2eb1c432dp-14;  // 0.0001
constexpr double kPasskStdEps = 0x1.0c6f7a0b5ed8dp-20;  // 1e-06

// Mode numbers: the index of the option's name in its Python tuple.
enum Loss : int { kLossDpo = 0, kLossIpo, kLossOrpo, kLossSimpo, kLossDpoListwise };
enum Pairs : int { kPairsAll = 0, kPairsBestWorst, kPairsDivpo, kPairsExplicit };
enum Weights : int { kWeightsNone = 0, kWeightsDeviation, kWeightsLogdetGain, kWeightsGiven, kWeightsPartition };
enum DeviationNorm : int { kNormMinmax = 0, kNormMean, kNormNone };
enum Estimator : int { kEstimatorGrpo = 0, kEstimatorPasskAnalytic, kEstimatorPkpo, kEstimatorBestMinusSecond };
// Columns of the [B, kNumStats] per-group partial sums (loss_config.STATS).
enum Stat : int { kWeightedLoss = 0, kPairs, kChosenReward, kRejectedReward, kCorrect, kNoPairs, kDeviation, kMeanSimilarity, kHasSimilarity, kLogdet, kValid, kEmbNonfinite, kWeightSum, kNllLogps, kNllTokens, kLogpsChosen, kLogpsRejected, kLogOddsRatio, kLogOddsChosen, kNumStats };
// The tensors of group_loss_forward, in order (null where an optional one is absent).
enum Input : int { kInputPolicy = 0, kInputRewards, kInputRef, kInputEmb, kInputMask, kInputCounts, kInputScores, kInputWeights, kInputLengths, kInputNllLogps, kInputNllTokens, kNumInputs };

// Scalar settings of one launch: the packed KERNEL_PARAMS, then what the inputs hold.
struct LossParams {
  int loss;
  int pairs;
  int weights;
  int deviation_norm;
  bool orpo_dorpo;
  bool divpo_ranked;
  bool need_logdet;
  bool store_state;
  double beta;
  double orpo_lambda;
  double simpo_gamma;
  double min_deviation;
  double eps;
  double quality_quantile;
  bool has_ref;
  bool has_emb;
  bool has_mask;
  bool has_counts;
  bool has_scores;
  bool has_weights;
  bool has_lengths;
  bool has_nll_logps;
  bool has_nll_tokens;
  bool vector_loads;  // emb rows are contiguous and 16-byte aligned: load 16 bytes at a time
};
constexpr int kNumPackedParams = 14;

// LossParams from the packed values (has_* and vector_loads are set by the launcher).
inline LossParams unpack_params(const std::vector<double>& packed) {
  LossParams p{};
  p.loss = int(packed[0]);
  p.pairs = int(packed[1]);
  p.weights = int(packed[2]);
  p.deviation_norm = int(packed[3]);
  p.orpo_dorpo = packed[4] != 0.0;
  p.divpo_ranked = packed[5] != 0.0;
  p.need_logdet = packed[6] != 0.0;
  p.store_state = packed[7] != 0.0;
  p.beta = double(packed[8]);
  p.orpo_lambda = double(packed[9]);
  p.simpo_gamma = double(packed[10]);
  p.min_deviation = double(packed[11]);
  p.eps = double(packed[12]);
  p.quality_quantile = double(packed[13]);
  return p;
}

// LossParams' has_* flags: which optional inputs (indexed by enum Input) are given.
template <class Inputs>
void set_input_flags(LossParams& p, const Inputs& inputs) {
  p.has_ref = bool(inputs[kInputRef]);
  p.has_emb = bool(inputs[kInputEmb]);
  p.has_mask = bool(inputs[kInputMask]);
  p.has_counts = bool(inputs[kInputCounts]);
  p.has_scores = bool(inputs[kInputScores]);
  p.has_weights = bool(inputs[kInputWeights]);
  p.has_lengths = bool(inputs[kInputLengths]);
  p.has_nll_logps = bool(inputs[kInputNllLogps]);
  p.has_nll_tokens = bool(inputs[kInputNllTokens]);
}

}  // namespace divkernels
