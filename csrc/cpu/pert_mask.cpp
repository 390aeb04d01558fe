// C++ CPU kernels of the batched perturbation masking (semantics:
// stoichconv.ops.pert_mask docstring).
//
// Every edge filter is a count pass, a scan and a write pass.  Deletions are
// few (a handful of genes per sample), so most edges survive in every sample:
// the count pass first lists the "touched" edges (an endpoint removed in at
// least one sample, one scan over E) and tests only those per sample,
// recording each sample's removed edges; the scan turns the counts into
// edge_ptr; the write pass copies each sample's runs of surviving edges
// between its removed ones in tight branch-free loops.  Outputs are in sample
// order, wildtype order within a sample, identical for any thread count; no
// atomics.  The per-element tests live in stoichconv/pert_mask_math.h
// (shared with the CUDA kernels).  Sizes are checked up front
// (stoichconv/size_checks.h): a batched id b * N + v never wraps and an
// output that cannot be allocated is reported by name.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "stoichconv/cpu_isa.h"
#include "stoichconv/pert_mask_checks.h"
#include "stoichconv/pert_mask_outputs.h"
#include "stoichconv/pert_mask_math.h"
#include "stoichconv/size_checks.h"

namespace stoichconv {
namespace {

// The write pass's run writers (pert_mask_kernels.h), compiled once per
// instruction set: portable code, and AVX2 code chosen at run time when the
// CPU has it (STOICHCONV_CPU_ISA=default forces the portable one;
// stoichconv/cpu_isa.h).  Both write the same ids.
namespace isa_default {
#include "pert_mask_kernels.h"
}  // namespace isa_default

#ifdef STOICHCONV_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
#include "pert_mask_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

// Calls f with the run writers of the instruction set chosen for this call:
// isa_avx2::RunWriters{} where the CPU has AVX2, else isa_default::RunWriters{}.
template <typename F>
void with_run_writers(F&& f) {
#ifdef STOICHCONV_CPU_AVX2
  if (cpu_isa_avx2()) return f(isa_avx2::RunWriters{});
#endif
  f(isa_default::RunWriters{});
}

// Edges per task of the two-pass filters.
constexpr int64_t kEdgeChunk = int64_t(1) << 14;

void check_cpu_long(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": `", name, "` must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": `", name, "` must be int64, got ",
              t.scalar_type());
}

// An int64 CPU edge list [2, E] with ids in [0, num_src) x [0, num_dst)
// (num_src = kAnyId: any id >= 0).
void check_edge_index(const at::Tensor& edge_index, const char* op, const char* name,
                      int64_t num_src, int64_t num_dst) {
  check_cpu_long(edge_index, op, name);
  check_edge_index_shape(edge_index, op, name);
  const auto ei = edge_index.contiguous();
  const int64_t E = ei.size(1);
  const int64_t* src = ei.data_ptr<int64_t>();
  check_edge_index_values(op, name, src, src + E, E, num_src, num_dst);
}

// Each sample's deletions, sorted and deduplicated: sample b's are
// ids[start(b) : start(b) + count[b]] (start = pert_ptr[b]).
struct DeletionSets {
  at::Tensor sorted;  // [P] int64 (segments sorted, duplicates moved past count)
  at::Tensor ptr;     // [B + 1] int64 (contiguous copy of pert_ptr)
  std::vector<int64_t> count;
  int64_t B = 0;
  const int64_t* base = nullptr;   // sorted.data_ptr()
  const int64_t* starts = nullptr;  // ptr.data_ptr()

  const int64_t* ids(int64_t b) const { return base + starts[b]; }
};

// Validates pert / pert_ptr (ids in [0, max_id), or >= 0 when max_id < 0)
// and builds the sorted sets.
DeletionSets deletion_sets(const at::Tensor& pert, const at::Tensor& pert_ptr, int64_t max_id,
                           const char* op) {
  check_cpu_long(pert, op, "pert");
  check_cpu_long(pert_ptr, op, "pert_ptr");
  check_pert_shapes(pert, pert_ptr, op);
  DeletionSets sets;
  sets.ptr = pert_ptr.contiguous();
  sets.B = sets.ptr.size(0) - 1;
  const int64_t P = pert.size(0);
  const int64_t* ptr = sets.ptr.data_ptr<int64_t>();
  check_pert_ptr_values(op, ptr, sets.B, P);
  const auto input = pert.contiguous();
  const int64_t* in = input.data_ptr<int64_t>();
  check_pert_id_values(op, in, P, max_id);
  sets.sorted = input.clone();
  int64_t* ids = sets.sorted.data_ptr<int64_t>();
  sets.count = allocate_buffer<int64_t>(op, "deletion counts", sets.B, 0);
  sets.base = ids;
  sets.starts = ptr;
  // The per-set steps of pert_mask_math.h, as on CUDA: insertion sort of a
  // small set in place; merge sort of a larger one from `in` into place.
  at::parallel_for(0, sets.B, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> scratch;
    for (int64_t b = begin; b < end; ++b) {
      int64_t* a = ids + ptr[b];
      const int64_t n = ptr[b + 1] - ptr[b];
      if (uses_small_sort(n)) {
        sets.count[b] = sort_unique_small(a, n);
      } else {
        scratch.resize(n);
        merge_sort_into(in + ptr[b], a, scratch.data(), n);
        sets.count[b] = unique_sorted(a, n);
      }
    }
  });
  return sets;
}

// The edges e in [0, E) for which touched(e) holds (an endpoint removed in
// some sample), in ascending order: one parallel scan over chunks of edges.
template <typename Touched>
std::vector<int64_t> touched_edges(int64_t E, Touched touched) {
  const int64_t chunks = (E + kEdgeChunk - 1) / kEdgeChunk;
  std::vector<std::vector<int64_t>> parts(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * kEdgeChunk, hi = std::min(E, lo + kEdgeChunk);
      for (int64_t e = lo; e < hi; ++e)
        if (touched(e)) parts[c].push_back(e);
    }
  });
  std::vector<int64_t> all;
  for (const auto& part : parts) all.insert(all.end(), part.begin(), part.end());
  return all;
}

// Count / scan / write filter over B samples x E edges for sparse removals.
class EdgeFilter {
 public:
  EdgeFilter(int64_t B, int64_t E) : B_(B), E_(E), removed_(B) {
    chunks_ = (E + kEdgeChunk - 1) / kEdgeChunk;
  }

  // Lists the touched edges (touched_edges): the only ones kept(b, e) is
  // asked about.
  template <typename Touched>
  void find_touched(Touched touched) {
    touched_ = touched_edges(E_, touched);
  }

  // Count pass: fills keep [B * E] (True = kept), records the removed edges
  // of every sample, fills edge_ptr [B + 1] and returns the survivor count.
  template <typename Kept>
  int64_t count(bool* keep, int64_t* edge_ptr, Kept kept) {
    at::parallel_for(0, B_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        bool* row = keep + b * E_;
        std::fill(row, row + E_, true);
        for (const int64_t e : touched_) {
          if (!kept(b, e)) {
            row[e] = false;
            removed_[b].push_back(e);
          }
        }
      }
    });
    edge_ptr[0] = 0;
    for (int64_t b = 0; b < B_; ++b)
      edge_ptr[b + 1] = edge_ptr[b] + E_ - static_cast<int64_t>(removed_[b].size());
    edge_ptr_ = edge_ptr;
    return edge_ptr[B_];
  }

  // Write pass: calls write_run(b, lo, hi, pos) for every maximal run
  // [lo, hi) of surviving edges of sample b (within one chunk), pos being the
  // output row of edge lo.
  template <typename WriteRun>
  void write(WriteRun write_run) const {
    at::parallel_for(0, B_ * chunks_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / chunks_, lo = (t % chunks_) * kEdgeChunk;
        const int64_t hi = std::min(E_, lo + kEdgeChunk);
        const auto& removed = removed_[b];
        auto it = std::lower_bound(removed.begin(), removed.end(), lo);
        int64_t pos = edge_ptr_[b] + lo - static_cast<int64_t>(it - removed.begin());
        int64_t run = lo;
        for (; it != removed.end() && *it < hi; ++it) {
          if (*it > run) write_run(b, run, *it, pos);
          pos += *it - run;
          run = *it + 1;
        }
        if (hi > run) write_run(b, run, hi, pos);
      }
    });
  }

 private:
  int64_t B_, E_, chunks_;
  std::vector<int64_t> touched_;
  std::vector<std::vector<int64_t>> removed_;
  const int64_t* edge_ptr_ = nullptr;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_edges_impl(
    const at::Tensor& edge_index_in, int64_t num_nodes, const at::Tensor& pert,
    const at::Tensor& pert_ptr, bool relabel, const char* op, const FilterEdgesBuffers& given) {
  TORCH_CHECK(num_nodes >= 0, op, ": `num_nodes` must be non-negative, got ", num_nodes);
  check_edge_index(edge_index_in, op, "edge_index", num_nodes, num_nodes);
  const DeletionSets sets = deletion_sets(pert, pert_ptr, num_nodes, op);
  const int64_t B = sets.B, N = num_nodes;
  const auto edge_index = edge_index_in.contiguous();
  const int64_t E = edge_index.size(1);
  check_batched_layout(op, B, N, "B * `num_nodes`", E);
  const int64_t* src = edge_index.data_ptr<int64_t>();
  const int64_t* dst = src + E;
  const auto long_opts = edge_index.options();

  // Nodes: keep-mask and per-sample kept counts.
  auto node_keep = output(given.node_keep, op, "node_keep", B * N, long_opts.dtype(at::kBool)).fill_(true);
  auto node_ptr = output(given.node_ptr, op, "node_ptr", B + 1, long_opts);
  bool* nk = node_keep.data_ptr<bool>();
  int64_t* np = node_ptr.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* del = sets.ids(b);
      for (int64_t i = 0; i < sets.count[b]; ++i) nk[b * N + del[i]] = false;
    }
  });
  np[0] = 0;
  for (int64_t b = 0; b < B; ++b) np[b + 1] = np[b] + N - sets.count[b];

  // Edges: an edge is touched when an endpoint is deleted in some sample;
  // each per-sample test is two lookups in that sample's node keep-mask.
  std::vector<char> deleted_anywhere = allocate_buffer<char>(op, "deleted_anywhere [num_nodes]", N, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < sets.count[b]; ++i) deleted_anywhere[sets.ids(b)[i]] = 1;
  auto edge_keep = output(given.edge_keep, op, "edge_keep", B * E, long_opts.dtype(at::kBool));
  auto edge_ptr = output(given.edge_ptr, op, "edge_ptr", B + 1, long_opts);
  EdgeFilter filter(B, E);
  filter.find_touched([&](int64_t e) { return (deleted_anywhere[src[e]] | deleted_anywhere[dst[e]]) != 0; });
  const int64_t total = filter.count(
      edge_keep.data_ptr<bool>(), edge_ptr.data_ptr<int64_t>(), [&](int64_t b, int64_t e) {
        return edge_kept_by_mask(nk + b * N, src[e], dst[e]);
      });
  auto out = output_edges(given.edge_index, op, total, long_opts);
  int64_t* out_src = out.data_ptr<int64_t>();
  int64_t* out_dst = out_src + total;
  if (relabel) {
    // Id = node_ptr[b] + the rank among the kept nodes of the sample.  A
    // sample of at most kPaddedDeletions deletions (the usual case) computes
    // the rank from its padded deletion set; any other gets a row of ranks,
    // [N] (one lookup per endpoint), in an int32 table whenever N fits (half
    // the cache footprint of int64: a row stays in L1).
    std::vector<std::array<int64_t, kPaddedDeletions>> padded(B);
    bool any_ranked = false;
    for (int64_t b = 0; b < B; ++b) {
      padded[b].fill(kNoDeletion);
      if (sets.count[b] <= kPaddedDeletions) {
        std::copy(sets.ids(b), sets.ids(b) + sets.count[b], padded[b].begin());
      } else {
        any_ranked = true;
      }
    }
    const auto relabel_with = [&](auto tag) {
      using Rank = decltype(tag);
      std::vector<Rank> ranks = allocate_buffer<Rank>(op, "kept ranks [B, num_nodes]", any_ranked ? B * N : 0);
      if (any_ranked) {
        at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            const int64_t* del = sets.ids(b);
            const int64_t n = sets.count[b];
            if (n <= kPaddedDeletions) continue;
            Rank* row = ranks.data() + b * N;
            for (int64_t v = 0; v < N; ++v) row[v] = static_cast<Rank>(compacted_id(0, del, n, v));
          }
        });
      }
      with_run_writers([&](auto writers) {
        filter.write([&](int64_t b, int64_t lo, int64_t hi, int64_t pos) {
          if (sets.count[b] <= kPaddedDeletions) {
            writers.padded(src + lo, dst + lo, hi - lo, np[b], padded[b].data(), out_src + pos, out_dst + pos);
          } else {
            writers.ranked(src + lo, dst + lo, hi - lo, np[b], static_cast<const Rank*>(ranks.data() + b * N),
                           out_src + pos, out_dst + pos);
          }
        });
      });
    };
    if (N <= std::numeric_limits<int32_t>::max()) {
      relabel_with(int32_t{});
    } else {
      relabel_with(int64_t{});
    }
  } else {
    with_run_writers([&](auto writers) {
      filter.write([&](int64_t b, int64_t lo, int64_t hi, int64_t pos) {
        writers.full(src + lo, dst + lo, hi - lo, full_layout_id(b, N, 0), out_src + pos, out_dst + pos);
      });
    });
  }
  return {out, edge_ptr, edge_keep, node_keep, node_ptr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_edges_cpu(
    const at::Tensor& edge_index, int64_t num_nodes, const at::Tensor& pert,
    const at::Tensor& pert_ptr, bool relabel) {
  return filter_edges_impl(edge_index, num_nodes, pert, pert_ptr, relabel, "filter_edges", {});
}

// filter_edges into the caller's buffers, sized for the worst case (no
// deletion): edge_index_out >= 2 * B * E, edge_keep_out >= B * E,
// node_keep_out >= B * N, edge_ptr_out / node_ptr_out >= B + 1.
void filter_edges_out_cpu(const at::Tensor& edge_index, int64_t num_nodes, const at::Tensor& pert,
                          const at::Tensor& pert_ptr, bool relabel, at::Tensor& edge_index_out,
                          at::Tensor& edge_ptr_out, at::Tensor& edge_keep_out,
                          at::Tensor& node_keep_out, at::Tensor& node_ptr_out) {
  const char* op = "filter_edges_out";
  TORCH_CHECK(num_nodes >= 0, op, ": `num_nodes` must be non-negative, got ", num_nodes);
  check_cpu_long(edge_index, op, "edge_index");
  check_edge_index_shape(edge_index, op, "edge_index");
  check_cpu_long(pert_ptr, op, "pert_ptr");
  check_pert_shapes(pert, pert_ptr, op);
  const int64_t B = pert_ptr.size(0) - 1, N = num_nodes, E = edge_index.size(1);
  check_batched_layout(op, B, N, "B * `num_nodes`", E);
  const at::Device cpu(at::kCPU);
  const int64_t BE = checked_product(op, "2 * B * E", {2, B, E});
  check_out_buffer(edge_index_out, op, "edge_index_out", at::kLong, cpu, BE, "2 * B * E");
  check_out_buffer(edge_ptr_out, op, "edge_ptr_out", at::kLong, cpu, B + 1, "B + 1");
  check_out_buffer(edge_keep_out, op, "edge_keep_out", at::kBool, cpu, B * E, "B * E");
  check_out_buffer(node_keep_out, op, "node_keep_out", at::kBool, cpu, B * N, "B * num_nodes");
  check_out_buffer(node_ptr_out, op, "node_ptr_out", at::kLong, cpu, B + 1, "B + 1");
  // Value errors word for word those of filter_edges (same input, same text).
  filter_edges_impl(edge_index, num_nodes, pert, pert_ptr, relabel, "filter_edges",
                    {edge_index_out, edge_ptr_out, edge_keep_out, node_keep_out, node_ptr_out});
}

at::Tensor reaction_keep_impl(const at::Tensor& gpr_index_in, int64_t num_reactions,
                              const at::Tensor& pert, const at::Tensor& pert_ptr, const char* op,
                              const at::Tensor& given) {
  TORCH_CHECK(num_reactions >= 0, op, ": `num_reactions` must be non-negative, got ",
              num_reactions);
  check_edge_index(gpr_index_in, op, "gpr_index", kAnyId, num_reactions);
  const DeletionSets sets = deletion_sets(pert, pert_ptr, -1, op);
  const auto gpr_index = gpr_index_in.contiguous();
  const int64_t B = sets.B, E = gpr_index.size(1), R = num_reactions;
  checked_product(op, "B * `num_reactions`", {B, R});
  const int64_t* gene = gpr_index.data_ptr<int64_t>();
  const int64_t* reaction = gene + E;
  auto keep = output(given, op, "keep", B * R, gpr_index.options().dtype(at::kBool)).fill_(true).view({B, R});
  bool* k = keep.data_ptr<bool>();
  // The GPR pairs whose gene some sample deletes (touched_edges, against the
  // sorted union of the sets; gene ids have no upper bound, so no flag
  // table): the only ones each sample tests.
  std::vector<int64_t> any_deleted;
  for (int64_t b = 0; b < B; ++b) any_deleted.insert(any_deleted.end(), sets.ids(b), sets.ids(b) + sets.count[b]);
  std::sort(any_deleted.begin(), any_deleted.end());
  any_deleted.erase(std::unique(any_deleted.begin(), any_deleted.end()), any_deleted.end());
  const std::vector<int64_t> touched =
      any_deleted.empty() ? std::vector<int64_t>{} : touched_edges(E, [&](int64_t e) {
        return std::binary_search(any_deleted.begin(), any_deleted.end(), gene[e]);
      });
  // One sample per task: each task owns its row, so there are no races.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = sets.count[b];
      if (n == 0) continue;
      const int64_t* del = sets.ids(b);
      bool* row = k + b * R;
      for (const int64_t e : touched)
        if (is_deleted(del, n, gene[e])) row[reaction[e]] = false;
    }
  });
  return keep;
}

at::Tensor reaction_keep_cpu(const at::Tensor& gpr_index, int64_t num_reactions,
                             const at::Tensor& pert, const at::Tensor& pert_ptr) {
  return reaction_keep_impl(gpr_index, num_reactions, pert, pert_ptr, "reaction_keep", {});
}

// reaction_keep into the caller's buffer `out` (>= B * num_reactions bool).
void reaction_keep_out_cpu(const at::Tensor& gpr_index, int64_t num_reactions,
                           const at::Tensor& pert, const at::Tensor& pert_ptr, at::Tensor& out) {
  const char* op = "reaction_keep_out";
  TORCH_CHECK(num_reactions >= 0, op, ": `num_reactions` must be non-negative, got ",
              num_reactions);
  check_cpu_long(pert_ptr, op, "pert_ptr");
  check_pert_shapes(pert, pert_ptr, op);
  const int64_t B = pert_ptr.size(0) - 1;
  const int64_t needed = checked_product(op, "B * `num_reactions`", {B, num_reactions});
  check_out_buffer(out, op, "out", at::kBool, at::Device(at::kCPU), needed, "B * num_reactions");
  reaction_keep_impl(gpr_index, num_reactions, pert, pert_ptr, "reaction_keep", out);
}

// Calls removed(v) for every v in [0, n) with keep[v] false, in ascending
// order.  A keep-mask of a deletion batch is nearly all true: memchr (a
// vectorised byte search) skips each run of kept nodes instead of testing
// them one by one.
template <typename Removed>
inline void for_each_removed(const bool* keep, int64_t n, Removed removed) {
  static_assert(sizeof(bool) == 1, "a bool keep-mask is one byte per node");
  const unsigned char* row = reinterpret_cast<const unsigned char*>(keep);
  for (int64_t v = 0; v < n;) {
    const void* hit = std::memchr(row + v, 0, static_cast<size_t>(n - v));
    if (hit == nullptr) return;
    const int64_t r = static_cast<const unsigned char*>(hit) - row;
    removed(r);
    v = r + 1;
  }
}

// The compacted numbering of one side of a bipartite relation: node v of
// sample b is base[b] + rank[b * N + v], base[b] the kept nodes of the earlier
// samples and rank its rank among the kept ones of its sample: v minus the
// nodes of sample b removed before it (ranks of removed nodes are never read).
// Filled run by run between the removed nodes (for_each_removed).  Ranks are
// < N: Rank = int32_t whenever N fits, half the cache footprint of int64 ids
// in the write pass's lookups.
template <typename Rank>
void kept_ranks(const bool* k, int64_t B, int64_t N, Rank* rank, int64_t* base) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      Rank* row = rank + b * N;
      int64_t removed = 0, start = 0;
      const auto fill = [&](int64_t stop) {
        for (int64_t v = start; v < stop; ++v) row[v] = static_cast<Rank>(v - removed);
      };
      for_each_removed(k + b * N, N, [&](int64_t r) {
        fill(r + 1);
        ++removed;
        start = r + 1;
      });
      fill(N);
      base[b] = N - removed;  // the count, turned into the offset below
    }
  });
  int64_t offset = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t count = base[b];
    base[b] = offset;
    offset += count;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_bipartite_impl(
    const at::Tensor& edge_index_in, int64_t num_src, int64_t num_dst, int64_t num_samples,
    const std::optional<at::Tensor>& src_keep_in, const std::optional<at::Tensor>& dst_keep_in,
    bool relabel, const char* op, const FilterBipartiteBuffers& given) {
  TORCH_CHECK(num_src >= 0 && num_dst >= 0 && num_samples >= 0, op,
              ": `num_src`, `num_dst` and `num_samples` must be non-negative");
  check_edge_index(edge_index_in, op, "edge_index", num_src, num_dst);
  check_keep(src_keep_in, "src_keep", num_samples, num_src, edge_index_in.device());
  check_keep(dst_keep_in, "dst_keep", num_samples, num_dst, edge_index_in.device());
  const auto edge_index = edge_index_in.contiguous();
  const int64_t B = num_samples, E = edge_index.size(1);
  check_batched_layout(op, B, num_src, "B * `num_src` (`num_samples` times `num_src`)", E);
  checked_product(op, "B * `num_dst` (`num_samples` times `num_dst`)", {B, num_dst});
  const int64_t* src = edge_index.data_ptr<int64_t>();
  const int64_t* dst = src + E;
  at::Tensor src_keep, dst_keep;
  if (src_keep_in.has_value()) src_keep = src_keep_in->contiguous();
  if (dst_keep_in.has_value()) dst_keep = dst_keep_in->contiguous();
  const bool* sk = src_keep.defined() ? src_keep.data_ptr<bool>() : nullptr;
  const bool* dk = dst_keep.defined() ? dst_keep.data_ptr<bool>() : nullptr;

  // An edge is touched when one of its nodes is removed in some sample.
  const auto removed_anywhere = [B, op](const bool* keep, int64_t N) {
    std::vector<char> any = allocate_buffer<char>(op, "removed_anywhere", keep ? N : 0, 0);
    for (int64_t b = 0; keep != nullptr && b < B; ++b)
      for_each_removed(keep + b * N, N, [&](int64_t v) { any[v] = 1; });
    return any;
  };
  const std::vector<char> src_removed = removed_anywhere(sk, num_src);
  const std::vector<char> dst_removed = removed_anywhere(dk, num_dst);

  const auto long_opts = edge_index.options();
  auto edge_keep = output(given.edge_keep, op, "edge_keep", B * E, long_opts.dtype(at::kBool));
  auto edge_ptr = output(given.edge_ptr, op, "edge_ptr", B + 1, long_opts);
  EdgeFilter filter(B, E);
  filter.find_touched([&](int64_t e) {
    return (sk != nullptr && src_removed[src[e]]) || (dk != nullptr && dst_removed[dst[e]]);
  });
  const int64_t total = filter.count(
      edge_keep.data_ptr<bool>(), edge_ptr.data_ptr<int64_t>(), [&](int64_t b, int64_t e) {
        return (sk == nullptr || sk[b * num_src + src[e]]) &&
               (dk == nullptr || dk[b * num_dst + dst[e]]);
      });
  auto out = output_edges(given.edge_index, op, total, long_opts);
  auto edge_id = output(given.edge_id, op, "edge_id", total, long_opts);
  int64_t* out_src = out.data_ptr<int64_t>();
  int64_t* out_dst = out_src + total;
  int64_t* out_id = edge_id.data_ptr<int64_t>();
  // A side without a mask keeps every node, so both layouts number it
  // b * N + v (full_layout_id); a masked side of the compacted layout is
  // numbered by kept_ranks.  The write loop is specialised per side.
  const auto write_with = [&](auto rank_tag) {
    using Rank = decltype(rank_tag);
    const bool src_table = relabel && sk != nullptr, dst_table = relabel && dk != nullptr;
    std::vector<Rank> src_rank = allocate_buffer<Rank>(op, "src ranks", src_table ? B * num_src : 0);
    std::vector<Rank> dst_rank = allocate_buffer<Rank>(op, "dst ranks", dst_table ? B * num_dst : 0);
    std::vector<int64_t> src_base = allocate_buffer<int64_t>(op, "src offsets", src_table ? B : 0);
    std::vector<int64_t> dst_base = allocate_buffer<int64_t>(op, "dst offsets", dst_table ? B : 0);
    if (src_table) kept_ranks(sk, B, num_src, src_rank.data(), src_base.data());
    if (dst_table) kept_ranks(dk, B, num_dst, dst_rank.data(), dst_base.data());
    const auto run = [&](auto src_flag, auto dst_flag) {
      constexpr bool S = decltype(src_flag)::value, D = decltype(dst_flag)::value;
      filter.write([&](int64_t b, int64_t lo, int64_t hi, int64_t pos) {
        const Rank* src_row = S ? src_rank.data() + b * num_src : nullptr;
        const Rank* dst_row = D ? dst_rank.data() + b * num_dst : nullptr;
        const int64_t src_at = S ? src_base[b] : full_layout_id(b, num_src, 0);
        const int64_t dst_at = D ? dst_base[b] : full_layout_id(b, num_dst, 0);
        for (int64_t e = lo; e < hi; ++e, ++pos) {
          out_src[pos] = src_at + (S ? static_cast<int64_t>(src_row[src[e]]) : src[e]);
          out_dst[pos] = dst_at + (D ? static_cast<int64_t>(dst_row[dst[e]]) : dst[e]);
          out_id[pos] = e;
        }
      });
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (src_table && dst_table) run(Yes{}, Yes{});
    else if (src_table) run(Yes{}, No{});
    else if (dst_table) run(No{}, Yes{});
    else run(No{}, No{});
  };
  if (std::max(num_src, num_dst) <= std::numeric_limits<int32_t>::max()) {
    write_with(int32_t{});
  } else {
    write_with(int64_t{});
  }
  return {out, edge_ptr, edge_keep, edge_id};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_bipartite_cpu(
    const at::Tensor& edge_index, int64_t num_src, int64_t num_dst, int64_t num_samples,
    const std::optional<at::Tensor>& src_keep, const std::optional<at::Tensor>& dst_keep,
    bool relabel) {
  return filter_bipartite_impl(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep,
                               relabel, "filter_bipartite", {});
}

// filter_bipartite into the caller's buffers, sized for the worst case:
// edge_index_out >= 2 * B * E, edge_keep_out / edge_id_out >= B * E,
// edge_ptr_out >= B + 1.
void filter_bipartite_out_cpu(const at::Tensor& edge_index, int64_t num_src, int64_t num_dst,
                              int64_t num_samples, const std::optional<at::Tensor>& src_keep,
                              const std::optional<at::Tensor>& dst_keep, bool relabel,
                              at::Tensor& edge_index_out, at::Tensor& edge_ptr_out,
                              at::Tensor& edge_keep_out, at::Tensor& edge_id_out) {
  const char* op = "filter_bipartite_out";
  TORCH_CHECK(num_src >= 0 && num_dst >= 0 && num_samples >= 0, op,
              ": `num_src`, `num_dst` and `num_samples` must be non-negative");
  check_cpu_long(edge_index, op, "edge_index");
  check_edge_index_shape(edge_index, op, "edge_index");
  const int64_t B = num_samples, E = edge_index.size(1);
  const at::Device cpu(at::kCPU);
  const int64_t BE = checked_product(op, "2 * B * E", {2, B, E});
  check_out_buffer(edge_index_out, op, "edge_index_out", at::kLong, cpu, BE, "2 * B * E");
  check_out_buffer(edge_ptr_out, op, "edge_ptr_out", at::kLong, cpu, B + 1, "B + 1");
  check_out_buffer(edge_keep_out, op, "edge_keep_out", at::kBool, cpu, B * E, "B * E");
  check_out_buffer(edge_id_out, op, "edge_id_out", at::kLong, cpu, B * E, "B * E");
  filter_bipartite_impl(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel,
                        "filter_bipartite",
                        {edge_index_out, edge_ptr_out, edge_keep_out, edge_id_out});
}

// The kept nodes of a keep-mask [B, N] in sample order, ascending within a
// sample: batch[i] / n_id[i] the sample and the node of the i-th, ptr [B + 1]
// the per-sample offsets (torch.nonzero(keep) split into its two columns,
// plus the offsets).  Two passes over the rows, each skipping the kept runs
// with memchr (for_each_removed): the removed counts give ptr, then each
// sample writes its runs of kept ids at ptr[b]; one sample per task.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_nodes_impl(const at::Tensor& keep_in,
                                                                const char* op,
                                                                const KeptNodesBuffers& given) {
  TORCH_CHECK(keep_in.device().is_cpu(), op, ": `keep` must be a CPU tensor, got ", keep_in.device());
  TORCH_CHECK(keep_in.scalar_type() == at::kBool, op, ": `keep` must be bool, got ", keep_in.scalar_type());
  TORCH_CHECK(keep_in.dim() == 2, op, ": `keep` must be [B, N], got ", keep_in.sizes());
  const auto keep = keep_in.contiguous();
  const int64_t B = keep.size(0), N = keep.size(1);
  const bool* k = keep.data_ptr<bool>();
  const auto long_opts = keep.options().dtype(at::kLong);
  auto ptr = output(given.ptr, op, "ptr", B + 1, long_opts);
  int64_t* p = ptr.data_ptr<int64_t>();
  p[0] = 0;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t removed = 0;
      for_each_removed(k + b * N, N, [&](int64_t) { ++removed; });
      p[b + 1] = N - removed;
    }
  });
  for (int64_t b = 0; b < B; ++b) p[b + 1] += p[b];
  const int64_t total = p[B];
  auto batch = output(given.batch, op, "batch", total, long_opts);
  auto n_id = output(given.n_id, op, "n_id", total, long_opts);
  int64_t* out_batch = batch.data_ptr<int64_t>();
  int64_t* out_id = n_id.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t pos = p[b], start = 0;
      const auto run = [&](int64_t stop) {
        for (int64_t v = start; v < stop; ++v, ++pos) {
          out_batch[pos] = b;
          out_id[pos] = v;
        }
      };
      for_each_removed(k + b * N, N, [&](int64_t r) {
        run(r);
        start = r + 1;
      });
      run(N);
    }
  });
  return {batch, n_id, ptr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_nodes_cpu(const at::Tensor& keep) {
  return kept_nodes_impl(keep, "kept_nodes", {});
}

// kept_nodes into the caller's buffers: batch_out / n_id_out >= B * N,
// ptr_out >= B + 1.
void kept_nodes_out_cpu(const at::Tensor& keep, at::Tensor& batch_out, at::Tensor& n_id_out,
                        at::Tensor& ptr_out) {
  const char* op = "kept_nodes_out";
  TORCH_CHECK(keep.dim() == 2, op, ": `keep` must be [B, N], got ", keep.sizes());
  const int64_t B = keep.size(0);
  const int64_t BN = checked_product(op, "B * N", {B, keep.size(1)});
  const at::Device cpu(at::kCPU);
  check_out_buffer(batch_out, op, "batch_out", at::kLong, cpu, BN, "B * N");
  check_out_buffer(n_id_out, op, "n_id_out", at::kLong, cpu, BN, "B * N");
  check_out_buffer(ptr_out, op, "ptr_out", at::kLong, cpu, B + 1, "B + 1");
  kept_nodes_impl(keep, "kept_nodes", {batch_out, n_id_out, ptr_out});
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CPU, m) {
  m.impl("filter_edges", &filter_edges_cpu);
  m.impl("reaction_keep", &reaction_keep_cpu);
  m.impl("filter_bipartite", &filter_bipartite_cpu);
  m.impl("filter_edges_out", &filter_edges_out_cpu);
  m.impl("reaction_keep_out", &reaction_keep_out_cpu);
  m.impl("filter_bipartite_out", &filter_bipartite_out_cpu);
  m.impl("kept_nodes", &kept_nodes_cpu);
  m.impl("kept_nodes_out", &kept_nodes_out_cpu);
}

}  // namespace stoichconv
