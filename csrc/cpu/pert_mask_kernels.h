// The write pass of the CPU filter_edges (csrc/cpu/pert_mask.cpp): each
// function writes one run of n surviving edges of one sample, src[0:n] and
// dst[0:n] of the wildtype list renumbered into out_src[0:n] and
// out_dst[0:n].  Included by pert_mask.cpp once per instruction set (the
// namespaces isa_default and isa_avx2, see stoichconv/cpu_isa.h): plain loops
// over restrict pointers without a branch, which the compiler vectorises.
// The ids are those of stoichconv/pert_mask_math.h; every variant writes the
// same values.  The writers are the static members of RunWriters, so that
// pert_mask.cpp chooses the instruction set once, as a type.
//
// Not a standalone header: it relies on the includes of pert_mask.cpp.

struct RunWriters {
  // Full layout: id = full_layout_id(b, N, v) = offset + v with offset =
  // full_layout_id(b, N, 0).
  static void full(const int64_t* __restrict__ src, const int64_t* __restrict__ dst, int64_t n,
                   int64_t offset, int64_t* __restrict__ out_src, int64_t* __restrict__ out_dst) {
    for (int64_t e = 0; e < n; ++e) {
      out_src[e] = offset + src[e];
      out_dst[e] = offset + dst[e];
    }
  }

  // Compacted layout, a sample of at most kPaddedDeletions deletions (`del`
  // padded with kNoDeletion): id = node_ptr[b] + kept_rank_padded(del, v), four
  // compares per id instead of a table lookup.
  static void padded(const int64_t* __restrict__ src, const int64_t* __restrict__ dst, int64_t n,
                     int64_t node_offset, const int64_t* del, int64_t* __restrict__ out_src,
                     int64_t* __restrict__ out_dst) {
    const int64_t d0 = del[0], d1 = del[1], d2 = del[2], d3 = del[3];
    for (int64_t e = 0; e < n; ++e) {
      out_src[e] = node_offset + kept_rank_padded(d0, d1, d2, d3, src[e]);
      out_dst[e] = node_offset + kept_rank_padded(d0, d1, d2, d3, dst[e]);
    }
  }

  // Compacted layout, any sample: id = node_ptr[b] + rank[v], `rank` the
  // sample's row of kept ranks (kept_rank of every node).
  template <typename Rank>
  static void ranked(const int64_t* __restrict__ src, const int64_t* __restrict__ dst, int64_t n,
                     int64_t node_offset, const Rank* __restrict__ rank, int64_t* __restrict__ out_src,
                     int64_t* __restrict__ out_dst) {
    for (int64_t e = 0; e < n; ++e) {
      out_src[e] = node_offset + static_cast<int64_t>(rank[src[e]]);
      out_dst[e] = node_offset + static_cast<int64_t>(rank[dst[e]]);
    }
  }
};
