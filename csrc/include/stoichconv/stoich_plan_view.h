// The raw view of a stoich conv plan that the kernels read: the plan's CSR
// orderings (by reaction, by metabolite) as pointers plus its sizes.  Torch-free
// so that the CUDA kernels' translation unit (csrc/cuda/stoich_conv_kernels.cu)
// can use it; the launchers get it from a StoichPlan (stoichconv/stoich_plan.h),
// which owns the contiguous tensors the pointers point into.
// Semantics: stoichconv.ops.stoich_conv docstring.
#pragma once

#include <stdint.h>

namespace stoichconv {

struct StoichPlanView {
  const int64_t* metabolite_index;  // [nnz]
  const int64_t* reaction_index;    // [nnz]
  const int64_t* reaction_ptr;      // [M + 1]
  const int64_t* reaction_perm;     // [nnz]
  const int64_t* metabolite_ptr;    // [N + 1]
  const int64_t* metabolite_perm;   // [nnz]
  int64_t nnz, N, M;
};

}  // namespace stoichconv
