// Argument checks shared by the CPU and CUDA launchers of the pert-mask
// operators (the Python wrappers in stoichconv/ops/pert_mask.py check first).
#pragma once

#include <ATen/ATen.h>

namespace stoichconv {

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
