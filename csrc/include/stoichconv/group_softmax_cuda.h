// Launch functions of the CUDA grouped-softmax kernels
// (csrc/cuda/group_softmax_kernels.cu); torch-free: device pointers to
// contiguous row-major tensors, sizes and a stream.  The torch launcher
// (csrc/cuda/group_softmax.cpp) checks, allocates and calls these.
// Semantics and dtypes: stoichconv.ops.group_softmax docstring; the storage
// types instantiated are c10::Half, c10::BFloat16, float and double.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace stoichconv {
namespace cuda {

// Geometry of one call: values [B, nnz, H], G groups given by group_ptr [G + 1]
// and group_perm [nnz] (device pointers).
struct GroupGeometry {
  int64_t B, nnz, H, G;
  const int64_t* group_ptr;
  const int64_t* group_perm;
};

// Value validation of group_ptr / group_perm, in the CPU check order, into
// status [kGroupStatusSize] int64 (device; written, not read, here):
//   status[0] = 1 iff group_ptr[0] != 0 or group_ptr[G] != nnz
//   status[1] = the first g with group_ptr[g] > group_ptr[g + 1] (INT64_MAX: none)
//   status[2] = the first j where group_perm[j] is outside [0, nnz) or repeats an
//               earlier entry (INT64_MAX: none)
// first_pos [nnz] int64 is scratch.  Runs only the (validation-path) atomics.
constexpr int kGroupStatusSize = 3;
cudaError_t launch_validate_groups(const GroupGeometry& g, int64_t* status, int64_t* first_pos,
                                   cudaStream_t stream);

// alpha [B, nnz, H] from logits [B, nnz, H] and kept [B, nnz] (nullptr: all kept).
template <typename scalar_t>
cudaError_t launch_group_softmax_forward(const GroupGeometry& g, const scalar_t* logits,
                                         const bool* kept, scalar_t* alpha, cudaStream_t stream);

// grad_logits = alpha * (grad - sum_group alpha * grad).
template <typename scalar_t>
cudaError_t launch_group_softmax_backward(const GroupGeometry& g, const scalar_t* grad,
                                          const scalar_t* alpha, scalar_t* grad_logits,
                                          cudaStream_t stream);

}  // namespace cuda
}  // namespace stoichconv
