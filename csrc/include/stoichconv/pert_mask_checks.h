// Argument checks shared by the CPU and CUDA launchers of the pert-mask
// operators (the Python wrappers in stoichconv.ops.pert_mask check first;
// semantics: stoichconv.ops.pert_mask docstring).
#pragma once

#include <ATen/ATen.h>

#include <optional>

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

}  // namespace stoichconv
