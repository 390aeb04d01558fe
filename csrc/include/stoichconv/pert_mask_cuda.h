// Launch functions of the CUDA perturbation-masking kernels
// (csrc/cuda/pert_mask_kernels.cu); torch-free, device pointers, one stream.
// The torch launcher is csrc/cuda/pert_mask.cpp; semantics:
// stoichconv.ops.pert_mask docstring.
//
// Every call first validates its index values on the device (launch_validate:
// the CPU kernels' checks) into the status words below; the launcher reads
// them in its one host synchronisation (with the output size, for the two
// filters) and, when a check failed, raises the CPU kernel's error for the
// same input (stoichconv/pert_mask_checks.h).  Kernels that run before that
// read never index out of bounds on bad input (they guard every id), and a
// malformed pert_ptr / pert gives every sample an empty deletion set (no two
// threads ever sort overlapping ranges).
//
// Every edge filter is count -> scan -> write over tiles of kFilterTile
// edges of one sample (tile t: sample t / tiles_per_sample): the count pass
// writes the full-layout keep-mask and one survivor count per tile, an
// exclusive scan (CUB) turns the counts into output offsets, and the write
// pass re-ranks the kept edges of its tile with a block scan.  Output order is
// sample order, wildtype order within a sample; no atomics on the result path.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include <limits>

#include "stoichconv/pert_mask_math.h"

namespace stoichconv {
namespace cuda {

constexpr int kFilterThreads = 256;
constexpr int kFilterItems = 8;
constexpr int64_t kFilterTile = int64_t(kFilterThreads) * kFilterItems;

// Status words of one call, int64 [kStatusSize] on the device, preset by the
// launcher to {0, 0, kNoColumn}:
//   status[0]  output size of the filters (written by launch_edge_ptr);
//   status[1]  error bits kBadPertPtr | kBadPertId (atomicOr);
//   status[2]  the first column e of the edge list with an id out of range
//              (atomicMin; kNoColumn: none).
constexpr int kStatusSize = 3;
constexpr int64_t kNoColumn = std::numeric_limits<int64_t>::max();
constexpr int64_t kBadPertPtr = 1;  // pert_ptr does not start at 0 / decreases / does not end at P
constexpr int64_t kBadPertId = 2;   // a pert id < 0 or >= max_id

inline int64_t tiles_per_sample(int64_t E) { return (E + kFilterTile - 1) / kFilterTile; }

// Each sample's deletions, sorted and de-duplicated in place of a copy of pert:
// sample b's set is sorted[start[b] : start[b] + count[b]].
struct DeletionView {
  const int64_t* sorted;
  const int64_t* start;
  const int64_t* count;
};

// CUB exclusive prefix sum of n int64 (out[0] = 0).
cudaError_t scan_temp_bytes(int64_t n, size_t* bytes);
cudaError_t exclusive_scan(const int64_t* in, int64_t* out, int64_t n, void* temp,
                           size_t temp_bytes, cudaStream_t stream);

// The CPU kernels' value checks on the device, into status: pert_ptr [B + 1]
// and pert [P] (ids in [0, max_id), only >= 0 when max_id < 0; skipped when
// pert_ptr is nullptr) and the edge list src / dst [E] (ids in [0, num_src) x
// [0, num_dst); num_src = kAnyId: any id >= 0, see id_in_range).
cudaError_t launch_validate(const int64_t* pert, const int64_t* pert_ptr, int64_t P, int64_t B,
                            int64_t max_id, const int64_t* src, const int64_t* dst, int64_t E,
                            int64_t num_src, int64_t num_dst, int64_t* status,
                            cudaStream_t stream);

// The deletion sets, after launch_validate on the same status (a status[1] bit
// leaves every set empty).  Sample b's slice of pert is sorted into
// sorted [max(P, 1)] at the same place, then de-duplicated: start[b] =
// pert_ptr[b], count[b] = its distinct ids.  A slice of at most kSmallSort ids
// is sorted by its sample's thread (sort_small); when P > kSmallSort (then
// some slice may be longer) one thread block per longer slice first runs the
// merge passes of pert_mask_math.h through scratch [max(P, 1)] (O(n log^2 n),
// no host synchronisation).  The per-set steps are the CPU kernels' (unique_sorted,
// merge_position, ...).  When node_keep ([B*N], prefilled true) is given, clears
// the deleted nodes and writes kept_counts[b] = N - count[b], kept_counts[B] = 0.
inline bool uses_large_sort_pass(int64_t P) { return !uses_small_sort(P); }
cudaError_t launch_prepare_deletions(const int64_t* pert, const int64_t* pert_ptr, int64_t P,
                                     int64_t B, int64_t* sorted, int64_t* scratch,
                                     int64_t* start, int64_t* count, bool* node_keep, int64_t N,
                                     int64_t* kept_counts, const int64_t* status,
                                     cudaStream_t stream);

// filter_edges passes.  tile_counts has B * tiles_per_sample(E) + 1 entries
// (the last one zero); tile_offsets is its exclusive scan.
cudaError_t launch_filter_edges_count(const int64_t* src, const int64_t* dst, int64_t E,
                                      int64_t B, int64_t N, DeletionView del, bool* edge_keep,
                                      int64_t* tile_counts, cudaStream_t stream);
cudaError_t launch_filter_edges_write(const int64_t* src, const int64_t* dst, int64_t E,
                                      int64_t B, int64_t N, DeletionView del,
                                      const bool* edge_keep, const int64_t* tile_offsets,
                                      bool relabel, const int64_t* node_ptr, int64_t* out_src,
                                      int64_t* out_dst, cudaStream_t stream);

// edge_ptr[b] = tile_offsets[b * tiles_per_sample(E)], b = 0..B; status[0] = total.
cudaError_t launch_edge_ptr(const int64_t* tile_offsets, int64_t B, int64_t E,
                            int64_t* edge_ptr, int64_t* status, cudaStream_t stream);

// keep [B, R] (prefilled true): false where a GPR gene of the reaction is deleted.
cudaError_t launch_reaction_keep(const int64_t* gene, const int64_t* reaction, int64_t E,
                                 int64_t B, int64_t R, DeletionView del, bool* keep,
                                 cudaStream_t stream);

// Compacted ids of one side of a bipartite relation: flags [n] = keep as int64;
// after an exclusive scan into ids, finish_compacted_ids sets ids = -1 where !keep.
cudaError_t launch_keep_to_long(const bool* keep, int64_t n, int64_t* flags,
                                cudaStream_t stream);
cudaError_t launch_finish_compacted_ids(const bool* keep, int64_t n, int64_t* ids,
                                        cudaStream_t stream);

// filter_bipartite passes (src_keep / dst_keep [B, num_*] or nullptr; src_ids /
// dst_ids [B, num_*] compacted ids or nullptr for the full layout b * num_* + v).
cudaError_t launch_filter_bipartite_count(const int64_t* src, const int64_t* dst, int64_t E,
                                          int64_t B, int64_t num_src, int64_t num_dst,
                                          const bool* src_keep, const bool* dst_keep,
                                          bool* edge_keep, int64_t* tile_counts,
                                          cudaStream_t stream);
cudaError_t launch_filter_bipartite_write(const int64_t* src, const int64_t* dst, int64_t E,
                                          int64_t B, int64_t num_src, int64_t num_dst,
                                          const int64_t* src_ids, const int64_t* dst_ids,
                                          const bool* edge_keep, const int64_t* tile_offsets,
                                          int64_t* out_src, int64_t* out_dst, int64_t* out_id,
                                          cudaStream_t stream);

}  // namespace cuda
}  // namespace stoichconv
