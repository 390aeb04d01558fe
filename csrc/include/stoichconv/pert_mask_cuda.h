// Launch functions of the CUDA perturbation-masking kernels
// (csrc/cuda/pert_mask_kernels.cu); torch-free, device pointers, one stream.
// The torch launcher is csrc/cuda/pert_mask.cpp; semantics:
// stoichconv.ops.pert_mask docstring.
//
// Every edge filter is count -> scan -> write over tiles of kFilterTile
// edges of one sample (tile t: sample t / tiles_per_sample): the count pass
// writes the full-layout keep-mask and one survivor count per tile, an
// exclusive scan (CUB) turns the counts into output offsets, and the write
// pass re-ranks the kept edges of its tile with a block scan.  Output order is
// sample order, wildtype order within a sample; no atomics on the result path.
// Device-side validation raises bits in status[1] (atomicOr); the launcher
// reads them together with the output size (status[0]) in its only host
// synchronisation.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

namespace stoichconv {
namespace cuda {

constexpr int kFilterThreads = 256;
constexpr int kFilterItems = 8;
constexpr int64_t kFilterTile = int64_t(kFilterThreads) * kFilterItems;

// Error bits of status[1].
constexpr int64_t kBadPertPtr = 1;  // pert_ptr does not start at 0 / decreases / does not end at P
constexpr int64_t kBadPertId = 2;   // a pert id < 0 or >= max_id
constexpr int64_t kBadSrc = 4;      // edge_index[0] out of range
constexpr int64_t kBadDst = 8;      // edge_index[1] out of range

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

// Validates pert/pert_ptr (ids in [0, max_id), only >= 0 when max_id < 0) and
// builds the deletion sets into sorted [P], start [B], count [B].  When
// node_keep ([B*N], prefilled true) is given, clears the deleted nodes and
// writes kept_counts[b] = N - count[b], kept_counts[B] = 0.
cudaError_t launch_prepare_deletions(const int64_t* pert, const int64_t* pert_ptr, int64_t P,
                                     int64_t B, int64_t max_id, int64_t* sorted, int64_t* start,
                                     int64_t* count, bool* node_keep, int64_t N,
                                     int64_t* kept_counts, int64_t* status, cudaStream_t stream);

// filter_edges passes.  tile_counts has B * tiles_per_sample(E) + 1 entries
// (the last one zero); tile_offsets is its exclusive scan.
cudaError_t launch_filter_edges_count(const int64_t* src, const int64_t* dst, int64_t E,
                                      int64_t B, int64_t N, DeletionView del, bool* edge_keep,
                                      int64_t* tile_counts, int64_t* status,
                                      cudaStream_t stream);
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
                                          int64_t* status, cudaStream_t stream);
cudaError_t launch_filter_bipartite_write(const int64_t* src, const int64_t* dst, int64_t E,
                                          int64_t B, int64_t num_src, int64_t num_dst,
                                          const int64_t* src_ids, const int64_t* dst_ids,
                                          const bool* edge_keep, const int64_t* tile_offsets,
                                          int64_t* out_src, int64_t* out_dst, int64_t* out_id,
                                          cudaStream_t stream);

}  // namespace cuda
}  // namespace stoichconv
