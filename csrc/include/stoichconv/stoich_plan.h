// StoichPlan: the C++ side of the Python StoichPlan (stoichconv.types), the
// one prologue shared by the CPU and CUDA launchers of stoich_conv_forward /
// stoich_conv_backward.  make_stoich_plan checks every structural argument,
// keeps contiguous copies of the plan's index tensors alive as members (the
// raw pointers of `view` point into them, so a non-contiguous index tensor is
// never read through a freed temporary) and, for CPU tensors, validates the
// index values so that a hand-made plan passed straight to torch.ops can never
// index out of bounds (the CUDA kernels skip out-of-range ids instead).
// Semantics: stoichconv.ops.stoich_conv docstring.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "stoichconv/csr_checks.h"
#include "stoichconv/stoich_conv_checks.h"
#include "stoichconv/stoich_plan_view.h"

namespace stoichconv {

struct StoichPlan {
  // Contiguous (possibly the caller's own) tensors; `view` points into them.
  at::Tensor metabolite_index, reaction_index, reaction_ptr, reaction_perm, metabolite_ptr,
      metabolite_perm;
  StoichPlanView view;
  int64_t nnz = 0, N = 0, M = 0;
};

// One O(nnz + N + M) pass over host memory.
inline void check_stoich_plan_values(const StoichPlanView& s) {
  check_row_pointer("stoich_conv", "reaction_ptr", s.reaction_ptr, s.M, s.nnz, "nnz");
  check_row_pointer("stoich_conv", "metabolite_ptr", s.metabolite_ptr, s.N, s.nnz, "nnz");
  for (int64_t j = 0; j < s.nnz; ++j) {
    TORCH_CHECK(s.metabolite_index[j] >= 0 && s.metabolite_index[j] < s.N,
                "stoich_conv: `metabolite_index` out of range [0, ", s.N, ")");
    TORCH_CHECK(s.reaction_index[j] >= 0 && s.reaction_index[j] < s.M,
                "stoich_conv: `reaction_index` out of range [0, ", s.M, ")");
    TORCH_CHECK(s.reaction_perm[j] >= 0 && s.reaction_perm[j] < s.nnz,
                "stoich_conv: `reaction_perm` out of range [0, ", s.nnz, ")");
    TORCH_CHECK(s.metabolite_perm[j] >= 0 && s.metabolite_perm[j] < s.nnz,
                "stoich_conv: `metabolite_perm` out of range [0, ", s.nnz, ")");
  }
}

// Checks y, weight, reaction_keep and the plan (check_stoich_conv_args),
// makes the plan contiguous and, when y is a CPU tensor, validates its values.
inline StoichPlan make_stoich_plan(const at::Tensor& y, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& reaction_keep,
                                   const at::Tensor& metabolite_index,
                                   const at::Tensor& reaction_index,
                                   const at::Tensor& reaction_ptr,
                                   const at::Tensor& reaction_perm,
                                   const at::Tensor& metabolite_ptr,
                                   const at::Tensor& metabolite_perm) {
  StoichPlan plan;
  plan.nnz = check_stoich_conv_args(y, weight, reaction_keep, metabolite_index, reaction_index,
                                    reaction_ptr, reaction_perm, metabolite_ptr, metabolite_perm);
  plan.N = y.size(1);
  plan.M = reaction_ptr.size(0) - 1;
  plan.metabolite_index = metabolite_index.contiguous();
  plan.reaction_index = reaction_index.contiguous();
  plan.reaction_ptr = reaction_ptr.contiguous();
  plan.reaction_perm = reaction_perm.contiguous();
  plan.metabolite_ptr = metabolite_ptr.contiguous();
  plan.metabolite_perm = metabolite_perm.contiguous();
  plan.view = StoichPlanView{plan.metabolite_index.data_ptr<int64_t>(),
                             plan.reaction_index.data_ptr<int64_t>(),
                             plan.reaction_ptr.data_ptr<int64_t>(),
                             plan.reaction_perm.data_ptr<int64_t>(),
                             plan.metabolite_ptr.data_ptr<int64_t>(),
                             plan.metabolite_perm.data_ptr<int64_t>(),
                             plan.nnz,
                             plan.N,
                             plan.M};
  if (y.device().is_cpu()) check_stoich_plan_values(plan.view);
  return plan;
}

// The reaction keep-mask of one call, contiguous and kept alive.  `data` is
// non-null whenever a mask was given, also for an empty one ([0, M] or
// [B, 0], whose storage pointer is null): the kernels tell a masked call
// ([B, ...] norms) from an unmasked one ([1, ...] norms) by that pointer, and
// a one-element stand-in is never read (there is no (sample, reaction) pair).
struct ReactionKeep {
  at::Tensor tensor;
  const bool* data = nullptr;
  bool masked() const { return tensor.defined(); }
};

inline ReactionKeep make_reaction_keep(const std::optional<at::Tensor>& reaction_keep) {
  ReactionKeep keep;
  if (!reaction_keep.has_value()) return keep;
  keep.tensor = reaction_keep->numel() > 0
                    ? reaction_keep->contiguous()
                    : at::ones({1}, reaction_keep->options().dtype(at::kBool));
  keep.data = keep.tensor.data_ptr<bool>();
  return keep;
}

}  // namespace stoichconv
