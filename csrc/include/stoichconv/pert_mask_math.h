// Per-element arithmetic of the batched perturbation masking, shared by the
// C++ CPU kernels (csrc/cpu/pert_mask.cpp) and the CUDA kernels.  Nothing
// here depends on torch (semantics: stoichconv.ops.pert_mask docstring).
//
// Sample b deletes a set of node ids; the kernels first turn each sample's
// slice of `pert` into a sorted, duplicate-free array `del` of length `n`
// (n is small: a handful of deletions), then every test below is a binary
// search in it.
#pragma once

#include <stdint.h>

#include "stoichconv/macros.h"

namespace stoichconv {

// Number of entries of the sorted array del[0:n] that are < v (lower bound).
SC_INLINE int64_t count_less(const int64_t* del, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (del[mid] < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Whether v is in the sorted array del[0:n].
SC_INLINE bool is_deleted(const int64_t* del, int64_t n, int64_t v) {
  const int64_t i = count_less(del, n, v);
  return i < n && del[i] == v;
}

// Rank of a kept node v among the kept nodes of its sample (order preserving):
// v minus the number of deleted ids below it.
SC_INLINE int64_t kept_rank(const int64_t* del, int64_t n, int64_t v) {
  return v - count_less(del, n, v);
}

// A gene-gene edge (u, v) survives iff both endpoints are kept.
SC_INLINE bool edge_kept(const int64_t* del, int64_t n, int64_t u, int64_t v) {
  return !is_deleted(del, n, u) && !is_deleted(del, n, v);
}

// The same test against a sample's node keep-mask (True = kept), as the CPU
// kernels do once the mask is built: two lookups in a table of N bytes.
SC_INLINE bool edge_kept_by_mask(const bool* node_keep, int64_t u, int64_t v) {
  return node_keep[u] & node_keep[v];
}

// Id of node v of sample b in the full (shared-topology) layout.
SC_INLINE int64_t full_layout_id(int64_t b, int64_t num_nodes, int64_t v) {
  return b * num_nodes + v;
}

// Id of a kept node v of sample b in the compacted (PyG-collate) layout:
// cumulative kept count of the earlier samples plus its rank in sample b.
SC_INLINE int64_t compacted_id(int64_t sample_offset, const int64_t* del, int64_t n, int64_t v) {
  return sample_offset + kept_rank(del, n, v);
}

// Sorts a[0:n] in place and removes duplicates; returns the new length.
// Insertion sort: meant for the few deletions of one sample (device code);
// the CPU kernels use std::sort beyond kSmallSort entries.
constexpr int64_t kSmallSort = 32;
SC_INLINE int64_t sort_unique_small(int64_t* a, int64_t n) {
  for (int64_t i = 1; i < n; ++i) {
    const int64_t x = a[i];
    int64_t j = i - 1;
    while (j >= 0 && a[j] > x) {
      a[j + 1] = a[j];
      --j;
    }
    a[j + 1] = x;
  }
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i)
    if (m == 0 || a[m - 1] != a[i]) a[m++] = a[i];
  return m;
}

}  // namespace stoichconv
