// DARLING's partition diversity of one group from its links (divkernels/reference/diversity.py:
// partition_diversity, divkernels/ops/partition.py), on the for_each / sync schedule of group_math.h.
//
// The links are a judge's verdicts on the pairs i < j ([B, G, G] bool, the lower triangle unread) or
// equal labels ([B, G] integers). The classes are the connected components of the symmetric link graph
// among the valid responses, what the authors' union-find computes: every response starts with its
// own index as its class, and each round takes the smallest class among itself and its linked
// responses, until a round changes nothing (at most G - 1 rounds: a class index travels one link
// per round). Then div_i = max((n - |C_i|) / (n - 1), min_diversity), 0 at padding.
#pragma once

#include <cstdint>

#include "group_math.h"

namespace divkernels {

// One group's scratch: the link matrix, two class buffers (a round reads one and writes the other) and
// the diversities before their normalization.
struct PartitionWorkspace {
  unsigned char* links;  // [G * G]
  int* label;            // [G]
  int* next;             // [G]
  bool* valid;           // [G]
  int* changed;          // [1]
  float* value;          // [G]
};

template <class Par, class Label>
DK_HD void load_links(const Par& par, PartitionWorkspace ws, int64_t b, int G, const bool* equivalence,
                      const Label* labels, const bool* mask) {
  par.for_each(G, [&](int i) { ws.valid[i] = mask == nullptr || mask[b * G + i]; });
  par.sync();
  par.for_each(G * G, [&](int k) {
    const int i = k / G, j = k % G;
    bool linked = false;
    if (i != j && ws.valid[i] && ws.valid[j]) {
      if (equivalence != nullptr) {  // the judged pair is (min, max): each pair i < j once
        const int lo = i < j ? i : j, hi = i < j ? j : i;
        linked = equivalence[(b * G + lo) * G + hi];
      } else {
        linked = labels[b * G + i] == labels[b * G + j];
      }
    }
    ws.links[k] = linked ? 1 : 0;
  });
  par.sync();
}

// Connected components by smallest-index propagation (Jacobi rounds, two buffers).
template <class Par>
DK_HD void link_components(const Par& par, PartitionWorkspace ws, int G) {
  par.for_each(G, [&](int i) { ws.label[i] = i; });
  for (int round = 0; round < G; ++round) {
    par.for_each(1, [&](int) { *ws.changed = 0; });
    par.sync();
    par.for_each(G, [&](int i) {
      int smallest = ws.label[i];
      for (int j = 0; j < G; ++j) {
        if (ws.links[i * G + j] && ws.label[j] < smallest) smallest = ws.label[j];
      }
      ws.next[i] = smallest;
      if (smallest != ws.label[i]) *ws.changed = 1;  // every writer writes 1: no race on the value
    });
    par.sync();
    const bool changed = *ws.changed != 0;
    par.for_each(G, [&](int i) { ws.label[i] = ws.next[i]; });
    par.sync();
    if (!changed) break;
  }
}

// div_i, 0 at padding; normalize: div_i over the group's mean (1 where the mean is 0), the fused loss's
// diversity="partition" weights (reference.normalized_weights).
template <class Par, class Label>
DK_HD void partition_group(const Par& par, PartitionWorkspace ws, int64_t b, int G, const bool* equivalence,
                           const Label* labels, const bool* mask, float min_diversity, bool transitive,
                           bool normalize, float* out) {
  load_links(par, ws, b, G, equivalence, labels, mask);
  if (transitive) link_components(par, ws, G);
  par.for_each(G, [&](int i) {
    int n = 0, distinct = 0;
    for (int j = 0; j < G; ++j) {
      if (!ws.valid[j]) continue;
      ++n;
      const bool same = transitive ? ws.label[j] == ws.label[i] : (j == i || ws.links[i * G + j]);
      if (!same) ++distinct;
    }
    const float share = float(distinct) / float(n - 1 > 1 ? n - 1 : 1);
    ws.value[i] = ws.valid[i] ? (share > min_diversity ? share : min_diversity) : 0.0f;
  });
  par.sync();
  par.for_each(G, [&](int i) {
    float sum = 0.0f;
    int n = 0;
    for (int j = 0; j < G; ++j) {
      sum += ws.value[j];
      n += ws.valid[j] ? 1 : 0;
    }
    const float mean = sum / float(n > 1 ? n : 1);
    const float scaled = mean > 0.0f ? ws.value[i] / mean : 1.0f;
    out[b * G + i] = !normalize ? ws.value[i] : (ws.valid[i] ? scaled : 0.0f);
  });
}

}  // namespace divkernels
