// Launch functions of the CUDA stoich conv kernels (csrc/cuda/stoich_conv_kernels.cu).
//
// Plain C++ with raw pointers, sizes and a stream: the kernels' translation
// unit includes no torch header (fast to compile), and the torch-facing
// launcher (csrc/cuda/stoich_conv.cpp) allocates, checks and calls these.
// All pointers are device pointers to contiguous row-major tensors, the plan
// included (a StoichPlanView of stoichconv/stoich_plan_view.h).
// Semantics and dtypes: stoichconv.ops.stoich_conv docstring.  scalar_t is the
// storage type (float, double, c10::Half, c10::BFloat16: instantiated in the
// .cu); the degree weights and norms are acc_type<scalar_t>.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/stoich_plan_view.h"

namespace stoichconv {
namespace cuda {

// Batch geometry: y is [B, N, H, C]; keep is [B, M] bool or nullptr
// (then the norms are [1, N] / [1, M], else [B, N] / [B, M]); weight is
// [B, nnz, H], or [1, nnz, H] shared by the batch (shared_weight: read as row 0
// for every sample, and grad_weight [1, nnz, H] is its sum over the batch).
struct Geometry {
  int64_t B, H, C;
  bool shared_weight;
};

// Stage 1 alone: hidden [B,M,H,C] from y, weight and the forward's edge_norm
// (the backward's recomputation when the forward did not save hidden).
template <typename scalar_t>
cudaError_t launch_stoich_conv_hidden(const StoichPlanView& s, const Geometry& g,
                                      const scalar_t* y, const scalar_t* weight, const bool* keep,
                                      const acc_type<scalar_t>* edge_norm, scalar_t* hidden,
                                      cudaStream_t stream);

// out [B,N,H,C], hidden [B,M,H,C], node_norm [Bn,N], edge_norm [Bn,M].
template <typename scalar_t>
cudaError_t launch_stoich_conv_forward(const StoichPlanView& s, const Geometry& g,
                                       const scalar_t* y, const scalar_t* weight,
                                       const bool* keep, const acc_type<scalar_t>* abs_stoich,
                                       scalar_t* out, scalar_t* hidden,
                                       acc_type<scalar_t>* node_norm,
                                       acc_type<scalar_t>* edge_norm, cudaStream_t stream);

// reaction_grad [B,M,H,C] is scratch (R, stored in scalar_t); grad_hidden may
// be nullptr; grad_y / grad_weight may be nullptr when not wanted.
template <typename scalar_t>
cudaError_t launch_stoich_conv_backward(const StoichPlanView& s, const Geometry& g,
                                        const scalar_t* grad_out, const scalar_t* grad_hidden,
                                        const scalar_t* y, const scalar_t* weight,
                                        const bool* keep, const scalar_t* hidden,
                                        const acc_type<scalar_t>* node_norm,
                                        const acc_type<scalar_t>* edge_norm,
                                        scalar_t* reaction_grad, scalar_t* grad_y,
                                        scalar_t* grad_weight, cudaStream_t stream);

}  // namespace cuda
}  // namespace stoichconv
