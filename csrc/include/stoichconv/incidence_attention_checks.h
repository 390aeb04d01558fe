// Argument checks of the fused incidence attention (semantics and dtypes:
// stoichconv.ops.incidence_attention docstring), the one copy of every message
// of its CPU launcher (csrc/cpu/incidence_attention.cpp) and its CUDA launcher
// (csrc/cuda/incidence_attention.cpp).  Structural checks here; the CSR value
// checks are those of csr_checks.h and, for the permutations, incidence_perm_values.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "stoichconv/csr_checks.h"
#include "stoichconv/group_softmax_checks.h"

namespace stoichconv {

// score_v [B, N, H], score_e [1 or B, M, H] of one floating type, on `type`;
// metabolite_index / reaction_index [nnz] int64 on the same device.
inline void check_incidence_scores(const char* op, const at::Tensor& score_v,
                                   const at::Tensor& score_e, const at::Tensor& metabolite_index,
                                   const at::Tensor& reaction_index, at::DeviceType type) {
  TORCH_CHECK(score_v.device().type() == type, op, ": tensors must be on ",
              type == at::kCUDA ? "a CUDA device" : "the CPU");
  TORCH_CHECK(score_v.dim() == 3, op, ": `score_v` must be [B, N, H], got ", score_v.sizes());
  TORCH_CHECK(is_attention_float(score_v.scalar_type()), op,
              ": `score_v` must be float16, bfloat16, float32 or float64, got ",
              score_v.scalar_type());
  TORCH_CHECK(score_e.dim() == 3 && (score_e.size(0) == 1 || score_e.size(0) == score_v.size(0)) &&
                  score_e.size(2) == score_v.size(2),
              op, ": `score_e` must be [1 or B, M, H] with B = ", score_v.size(0),
              ", H = ", score_v.size(2), ", got ", score_e.sizes());
  TORCH_CHECK(score_e.scalar_type() == score_v.scalar_type() && on_device_of(score_e, score_v, type),
              op, ": `score_e` must have the dtype and device of `score_v`");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"metabolite_index", &metabolite_index},
                                {"reaction_index", &reaction_index}}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && on_device_of(*t, score_v, type),
                op, ": `", name, "` must be a 1-D int64 ", device_type_name(type), " tensor");
  }
  TORCH_CHECK(reaction_index.size(0) == metabolite_index.size(0), op,
              ": `reaction_index` must have length nnz = ", metabolite_index.size(0), ", got ",
              reaction_index.size(0));
}

// A CSR grouping `name`_ptr [rows + 1], `name`_perm [nnz], 1-D int64 on the device of `like`.
inline void check_incidence_grouping(const char* op, const char* ptr_name, const char* perm_name,
                                     const at::Tensor& ptr, const at::Tensor& perm, int64_t rows,
                                     int64_t nnz, const at::Tensor& like, at::DeviceType type) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{ptr_name, &ptr},
                                {perm_name, &perm}})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && on_device_of(*t, like, type),
                op, ": `", name, "` must be a 1-D int64 ", device_type_name(type), " tensor");
  if (rows >= 0) {
    TORCH_CHECK(ptr.size(0) == rows + 1, op, ": `", ptr_name, "` must have length ", rows + 1,
                ", got ", ptr.size(0));
  } else {
    TORCH_CHECK(ptr.size(0) >= 1, op, ": `", ptr_name, "` must have length num_groups + 1 >= 1");
  }
  TORCH_CHECK(perm.size(0) == nnz, op, ": `", perm_name, "` must have length nnz = ", nnz, ", got ",
              perm.size(0));
}

// q [nnz] (host) must be a permutation of [0, nnz).
inline void incidence_perm_values(const char* op, const char* name, const int64_t* q, int64_t nnz) {
  std::vector<char> seen(static_cast<size_t>(nnz), 0);
  for (int64_t j = 0; j < nnz; ++j) {
    TORCH_CHECK(q[j] >= 0 && q[j] < nnz, op, ": `", name, "` has id ", q[j], " outside [0, ", nnz, ")");
    TORCH_CHECK(!seen[q[j]], op, ": `", name, "` must be a permutation of [0, nnz); id ", q[j],
                " repeats");
    seen[q[j]] = 1;
  }
}

// idx [nnz] (host) must lie in [0, n).
inline void incidence_index_values(const char* op, const char* name, const int64_t* idx,
                                   int64_t nnz, int64_t n, const char* n_name) {
  for (int64_t j = 0; j < nnz; ++j)
    TORCH_CHECK(idx[j] >= 0 && idx[j] < n, op, ": `", name, "` has id ", idx[j], " outside [0, ",
                n_name, " = ", n, ")");
}

}  // namespace stoichconv
