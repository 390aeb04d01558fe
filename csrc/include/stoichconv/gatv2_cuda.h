// Launch functions of the CUDA fused GATv2 attention kernels
// (csrc/cuda/gatv2_kernels.cu); torch-free: device pointers to contiguous
// row-major tensors, sizes and a stream.  The torch launcher
// (csrc/cuda/gatv2.cpp) checks, allocates, groups the edges by source and
// destination (stable sorts) and calls these.
// Semantics and dtypes: stoichconv.ops.gatv2 docstring; the storage types
// instantiated are c10::Half, c10::BFloat16, float and double.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/macros.h"

namespace stoichconv {
namespace cuda {

// x_l [Ns, H, C], x_r [Nd, H, C], att [H, C]; E edges src [E], dst [E] sorted by
// output row, crow [R + 1] (device pointers).
struct GatGeometry {
  int64_t R, E, Ns, Nd, H, C;
  const int64_t* src;
  const int64_t* dst;
  const int64_t* crow;
};

// Value validation, in the CPU check order, into status [kEdgeStatusSize] int64:
//   status[0] = 1 iff crow[0] != 0 or crow[R] != E
//   status[1] = the first i with crow[i] > crow[i + 1] (INT64_MAX: none)
//   status[2] = the first e with src[e] outside [0, Ns) or dst[e] outside [0, Nd)
// (status[1], status[2] preset to INT64_MAX by the caller).
constexpr int kEdgeStatusSize = 3;
cudaError_t launch_validate_edges(const GatGeometry& g, int64_t* status, cudaStream_t stream);

// out [R, H, C], alpha [E, H]; scratch: weights [E, H] (the logits and softmax
// weights in acc_type<scalar_t>), alpha itself when acc_type<scalar_t> is
// scalar_t (float32, float64).
template <typename scalar_t>
cudaError_t launch_gatv2_forward(const GatGeometry& g, const scalar_t* x_l, const scalar_t* x_r,
                                 const scalar_t* att, double negative_slope, scalar_t* out,
                                 scalar_t* alpha, acc_type<scalar_t>* weights,
                                 cudaStream_t stream);

// Source rows per grad_att partial sum: att_partial has
// gatv2_att_partials(Ns) rows of H * C entries.
constexpr int64_t kSourcesPerPartial = 4;
SC_INLINE int64_t gatv2_att_partials(int64_t Ns) {
  return (Ns + kSourcesPerPartial - 1) / kSourcesPerPartial;
}

// The edges grouped by source and by destination: by_src [E] (edge ids,
// increasing within a source), src_ptr [Ns + 1]; by_dst [E], dst_ptr [Nd + 1].
struct EdgeGroups {
  const int64_t* src_ptr;
  const int64_t* by_src;
  const int64_t* dst_ptr;
  const int64_t* by_dst;
};

// grad_x_l [Ns, H, C], grad_x_r [Nd, H, C], grad_att [H, C]; scratch:
// grad_logit [E, H], row_of [E], att_partial [gatv2_att_partials(Ns), H, C].
template <typename scalar_t>
cudaError_t launch_gatv2_backward(const GatGeometry& g, const EdgeGroups& groups,
                                  const scalar_t* grad_out, const scalar_t* x_l,
                                  const scalar_t* x_r, const scalar_t* att, const scalar_t* alpha,
                                  double negative_slope, scalar_t* grad_x_l, scalar_t* grad_x_r,
                                  scalar_t* grad_att, acc_type<scalar_t>* grad_logit,
                                  int64_t* row_of, acc_type<scalar_t>* att_partial,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace stoichconv
