// Launch functions of the CUDA fused incidence attention kernels
// (csrc/cuda/incidence_attention_kernels.cu); torch-free: device pointers to
// contiguous row-major tensors, sizes and a stream.  The torch launcher
// (csrc/cuda/incidence_attention.cpp) checks, allocates and calls these.
// Semantics and dtypes: stoichconv.ops.incidence_attention docstring; storage
// types c10::Half, c10::BFloat16, float and double.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace stoichconv {
namespace cuda {

// score_v [B, N, H], score_e [Be, M, H] (Be = 1: shared), nnz incidences
// (metabolite_index, reaction_index), G softmax groups (group_ptr [G + 1],
// group_perm [nnz]); all device pointers.
struct IncidenceGeometry {
  int64_t B, N, M, H, nnz, G, Be;
  const int64_t* metabolite_index;
  const int64_t* reaction_index;
  const int64_t* group_ptr;
  const int64_t* group_perm;
};

// alpha [B, nnz, H]; kept [B, nnz] (nullptr: all kept).
template <typename scalar_t>
cudaError_t launch_incidence_attention_forward(const IncidenceGeometry& g, const scalar_t* score_v,
                                               const scalar_t* score_e, const bool* kept,
                                               double slope, scalar_t* alpha, cudaStream_t stream);

// dpre [B, nnz, H] in acc_t (float for float16 / bfloat16 / float, double for double).
template <typename scalar_t, typename acc_t>
cudaError_t launch_incidence_attention_pre_grad(const IncidenceGeometry& g, const scalar_t* grad,
                                                const scalar_t* alpha, const scalar_t* score_v,
                                                const scalar_t* score_e, double slope, acc_t* dpre,
                                                cudaStream_t stream);

// out [outs, R, H]: out[o, r] = sum_{b in [o per, o per + per)} sum_{j in row r} dpre[b, perm[j]].
template <typename scalar_t, typename acc_t>
cudaError_t launch_incidence_row_sums(const acc_t* dpre, const int64_t* ptr, const int64_t* perm,
                                      int64_t outs, int64_t per, int64_t R, int64_t nnz, int64_t H,
                                      scalar_t* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace stoichconv
