// Per-element arithmetic of the batched perturbation masking, shared by the
// C++ CPU kernels (csrc/cpu/pert_mask.cpp) and the CUDA kernels.  Nothing
// here depends on torch (semantics: stoichconv.ops.pert_mask docstring).
//
// Sample b deletes a set of node ids; the kernels first turn each sample's
// slice of `pert` into a sorted, duplicate-free array `del` of length `n`
// (usually a handful of deletions, but any number: see the deletion sets
// below), then every test below is a binary search in it.
#pragma once

#include <stdint.h>

#include "stoichconv/macros.h"

namespace stoichconv {

// Value checks, the same on the host (CPU kernels, pert_mask_checks.h) and the
// device (CUDA validation).  An edge-list id must lie in [0, bound); bound =
// kAnyId admits every id >= 0 (the gene ids of reaction_keep, which has no
// gene count).
constexpr int64_t kAnyId = INT64_MAX;

SC_INLINE bool id_in_range(int64_t v, int64_t bound) {
  return v >= 0 && (bound == kAnyId || v < bound);
}

// A deleted id must lie in [0, max_id), or be >= 0 when max_id < 0.
SC_INLINE bool pert_id_ok(int64_t v, int64_t max_id) { return v >= 0 && (max_id < 0 || v < max_id); }

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

// kept_rank for a sample of at most kPaddedDeletions deletions, its sorted set
// padded with kNoDeletion (which no id reaches) to exactly kPaddedDeletions
// entries d0 <= d1 <= d2 <= d3: the same rank from four compares, no search
// and no branch, so that a loop over edges vectorises (the CPU write pass).
constexpr int kPaddedDeletions = 4;
constexpr int64_t kNoDeletion = INT64_MAX;

SC_INLINE int64_t kept_rank_padded(int64_t d0, int64_t d1, int64_t d2, int64_t d3, int64_t v) {
  return v - static_cast<int64_t>(d0 < v) - static_cast<int64_t>(d1 < v) -
         static_cast<int64_t>(d2 < v) - static_cast<int64_t>(d3 < v);
}

// Id of a kept node v of sample b in the compacted (PyG-collate) layout:
// cumulative kept count of the earlier samples plus its rank in sample b.
SC_INLINE int64_t compacted_id(int64_t sample_offset, const int64_t* del, int64_t n, int64_t v) {
  return sample_offset + kept_rank(del, n, v);
}

// Deletion sets.  Each sample's slice of `pert` is sorted, then its
// duplicates are dropped (unique_sorted).  A slice of at most kSmallSort ids is
// sorted in place by insertion (sort_small: one thread of a device kernel, or
// the CPU task of the sample); a longer one by the bottom-up merge sort below,
// O(n log^2 n): the CPU task runs merge_sort_into, the CUDA kernel runs the
// same passes with a thread block, element i of a pass going to
// merge_position(...) (a binary search), a block barrier between passes.
// uses_small_sort decides, on every backend alike.
constexpr int64_t kSmallSort = 32;

SC_INLINE bool uses_small_sort(int64_t n) { return n <= kSmallSort; }

// Insertion sort of a[0:n] (ascending); meant for n <= kSmallSort.
SC_INLINE void sort_small(int64_t* a, int64_t n) {
  for (int64_t i = 1; i < n; ++i) {
    const int64_t x = a[i];
    int64_t j = i - 1;
    while (j >= 0 && a[j] > x) {
      a[j + 1] = a[j];
      --j;
    }
    a[j + 1] = x;
  }
}

// Number of entries of the sorted array a[0:n] that are <= v (upper bound).
SC_INLINE int64_t count_less_equal(const int64_t* a, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] <= v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Merge passes of a sort of n entries: runs of width 1, 2, 4, ... until one
// run covers all, ceil(log2 n) passes.
SC_INLINE int merge_passes(int64_t n) {
  int passes = 0;
  while ((int64_t(1) << passes) < n) ++passes;
  return passes;
}

// Pass `pass` (width 2^pass) of the merge sort of in[0:n]: the runs
// [k w, (k + 1) w) of `in` are sorted, and runs 2j and 2j + 1 merge into run j
// of width 2w of the output.  The output position of in[i]: its rank in its own
// run plus the number of entries of the other run that go before it (left run
// first among equal values: stable).  The positions of one pass are a
// permutation of [0, n), so the entries can be written in any order.
SC_INLINE int64_t merge_position(const int64_t* in, int64_t n, int64_t width, int64_t i) {
  const int64_t left = (i / (2 * width)) * (2 * width);
  const int64_t mid = left + width < n ? left + width : n;
  const int64_t end = left + 2 * width < n ? left + 2 * width : n;
  const int64_t v = in[i];
  if (i < mid) return i + count_less(in + mid, end - mid, v);
  return left + (i - mid) + count_less_equal(in + left, mid - left, v);
}

// Which buffer pass `pass` of `passes` writes: the output when true, the
// scratch otherwise, alternating so that the last pass writes the output.
SC_INLINE bool merge_pass_writes_output(int pass, int passes) {
  return (passes - 1 - pass) % 2 == 0;
}

// Sorts src[0:n] into dst[0:n] (ascending) with the merge passes, sequentially;
// scratch holds n entries; src is not modified and overlaps neither.
SC_INLINE void merge_sort_into(const int64_t* src, int64_t* dst, int64_t* scratch, int64_t n) {
  const int passes = merge_passes(n);
  if (passes == 0) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
    return;
  }
  const int64_t* in = src;
  for (int pass = 0; pass < passes; ++pass) {
    int64_t* out = merge_pass_writes_output(pass, passes) ? dst : scratch;
    const int64_t width = int64_t(1) << pass;
    for (int64_t i = 0; i < n; ++i) out[merge_position(in, n, width, i)] = in[i];
    in = out;
  }
}

// Drops the repeats of the sorted a[0:n] in place (the distinct values move to
// the front, in order); returns their number.
SC_INLINE int64_t unique_sorted(int64_t* a, int64_t n) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i)
    if (m == 0 || a[m - 1] != a[i]) a[m++] = a[i];
  return m;
}

// sort_small, then unique_sorted: the whole small path.
SC_INLINE int64_t sort_unique_small(int64_t* a, int64_t n) {
  sort_small(a, n);
  return unique_sorted(a, n);
}

}  // namespace stoichconv
