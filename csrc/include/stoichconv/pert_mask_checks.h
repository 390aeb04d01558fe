// Argument checks shared by the CPU and CUDA launchers of the pert-mask
// operators (the Python wrappers in stoichconv.ops.pert_mask check first;
// semantics: stoichconv.ops.pert_mask docstring).
//
// The value checks (check_edge_index_values, check_pert_ptr_values,
// check_pert_id_values) hold the one text of every value error: the CPU
// kernels run them over the whole input; the CUDA launchers validate on the
// device and, when a status bit is raised, run them on the host copy of the
// witness (the first bad column of the edge list, pert_ptr, pert), so that the
// same input gives the same error word for word.  The Triton operators raise
// the same texts (stoichconv.ops.pert_mask.validation, kernel_value_error).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "stoichconv/pert_mask_math.h"
#include "stoichconv/size_checks.h"

namespace stoichconv {

// An edge list [2, E] (dtype and device are checked by the caller).
inline void check_edge_index_shape(const at::Tensor& edge_index, const char* op,
                                   const char* name) {
  TORCH_CHECK(edge_index.dim() == 2 && edge_index.size(0) == 2, op, ": `", name,
              "` must have shape [2, E], got ", edge_index.sizes());
}

// The shapes of the per-sample deletions: pert [P], pert_ptr [B + 1].
inline void check_pert_shapes(const at::Tensor& pert, const at::Tensor& pert_ptr,
                              const char* op) {
  TORCH_CHECK(pert.dim() == 1, op, ": `pert` must be 1-D, got shape ", pert.sizes());
  TORCH_CHECK(pert_ptr.dim() == 1 && pert_ptr.size(0) >= 1, op,
              ": `pert_ptr` must be 1-D of length B + 1 >= 1, got shape ", pert_ptr.sizes());
}

// The columns [0, E) of an edge list (src = row 0, dst = row 1, host
// pointers) must hold ids in [0, num_src) and [0, num_dst), checked column by
// column, row 0 first; num_src = kAnyId admits any id >= 0 (id_in_range of
// pert_mask_math.h).
inline void check_edge_index_values(const char* op, const char* name, const int64_t* src,
                                    const int64_t* dst, int64_t E, int64_t num_src,
                                    int64_t num_dst) {
  for (int64_t e = 0; e < E; ++e) {
    if (!id_in_range(src[e], num_src)) {
      if (num_src == kAnyId) TORCH_CHECK(false, op, ": `", name, "[0]` has id ", src[e], " < 0");
      TORCH_CHECK(false, op, ": `", name, "[0]` has id ", src[e], " outside [0, ", num_src, ")");
    }
    TORCH_CHECK(id_in_range(dst[e], num_dst), op, ": `", name, "[1]` has id ", dst[e],
                " outside [0, ", num_dst, ")");
  }
}

// pert_ptr [B + 1] (host) must start at 0, be non-decreasing and end at P = len(pert).
inline void check_pert_ptr_values(const char* op, const int64_t* ptr, int64_t B, int64_t P) {
  TORCH_CHECK(ptr[0] == 0, op, ": `pert_ptr` must start at 0, got ", ptr[0]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(ptr[b] <= ptr[b + 1], op, ": `pert_ptr` must be non-decreasing");
  TORCH_CHECK(ptr[B] == P, op, ": `pert_ptr` must end at len(pert) = ", P, ", got ", ptr[B]);
}

// The ids pert [P] (host) must lie in [0, max_id), or be >= 0 when max_id < 0
// (pert_id_ok of pert_mask_math.h).
inline void check_pert_id_values(const char* op, const int64_t* ids, int64_t P, int64_t max_id) {
  for (int64_t i = 0; i < P; ++i) {
    if (pert_id_ok(ids[i], max_id)) continue;
    if (max_id < 0) TORCH_CHECK(false, op, ": `pert` has gene id ", ids[i], " < 0");
    TORCH_CHECK(false, op, ": `pert` has gene id ", ids[i], " outside [0, num_nodes = ", max_id,
                ")");
  }
}

// The batched layouts number node v of sample b as b * N + v and index the
// [B, E] edge masks as b * E + e: both products must fit in int64 before
// anything is allocated, so that no id can wrap.  `nodes` names the size
// argument N (e.g. "B * `num_nodes`").
inline void check_batched_layout(const char* op, int64_t B, int64_t N, const char* nodes,
                                 int64_t E) {
  checked_product(op, nodes, {B, N});
  checked_product(op, "B * E (samples times `edge_index` columns)", {B, E});
}

// An optional per-sample node keep-mask of filter_bipartite: bool [B, N] on
// the device of `edge_index`.
inline void check_keep(const std::optional<at::Tensor>& keep, const char* name, int64_t B,
                       int64_t N, const at::Device& device) {
  if (!keep.has_value()) return;
  TORCH_CHECK(keep->device() == device, "filter_bipartite: `", name, "` is on ", keep->device(),
              " but `edge_index` is on ", device);
  TORCH_CHECK(keep->scalar_type() == at::kBool, "filter_bipartite: `", name,
              "` must be bool, got ", keep->scalar_type());
  TORCH_CHECK(keep->dim() == 2 && keep->size(0) == B && keep->size(1) == N,
              "filter_bipartite: `", name, "` must have shape [", B, ", ", N, "], got ",
              keep->sizes());
}

// An `out` buffer of the *_out variants: a contiguous tensor of `dtype` on
// `device` with at least `needed` elements (the op writes its first `needed`,
// flat; the edge list [2, E_out] as 2 * E_out contiguous values).  `needed`
// is the worst case (no deletion), so the check does not depend on the data.
inline void check_out_buffer(const at::Tensor& out, const char* op, const char* name,
                             at::ScalarType dtype, const at::Device& device, int64_t needed,
                             const char* what) {
  TORCH_CHECK(out.device() == device, op, ": `", name, "` is on ", out.device(),
              " but the inputs are on ", device);
  TORCH_CHECK(out.scalar_type() == dtype, op, ": `", name, "` must be ", dtype, ", got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), op, ": `", name, "` must be contiguous");
  TORCH_CHECK(out.numel() >= needed, op, ": `", name, "` holds ", out.numel(),
              " elements but needs at least ", needed, " (", what, ")");
}

}  // namespace stoichconv
