// Outputs of the pert-mask launchers (CPU and CUDA): each op either allocates
// its outputs or, in its *_out variant, writes into the caller's buffers
// (checked beforehand by check_out_buffer, pert_mask_checks.h), whose first
// elements then hold the result.
#pragma once

#include <ATen/ATen.h>

#include "stoichconv/size_checks.h"

namespace stoichconv {

// An output of `n` elements of the op: the first n of the caller's buffer, or
// a fresh tensor when `given` is undefined.
inline at::Tensor output(const at::Tensor& given, const char* op, const char* name, int64_t n,
                         const at::TensorOptions& opts) {
  if (given.defined()) return given.view(-1).narrow(0, 0, n);
  return allocate(op, name, {n}, opts);
}

// The edge list [2, total] of an output: a view of the first 2 * total
// elements of the caller's buffer, or a fresh tensor.
inline at::Tensor output_edges(const at::Tensor& given, const char* op, int64_t total,
                               const at::TensorOptions& opts) {
  if (given.defined()) return given.view(-1).narrow(0, 0, 2 * total).view({2, total});
  return allocate(op, "edge_index (output)", {2, total}, opts);
}

// Caller buffers of filter_edges_out (all undefined: filter_edges allocates).
struct FilterEdgesBuffers {
  at::Tensor edge_index, edge_ptr, edge_keep, node_keep, node_ptr;
};

// Caller buffers of filter_bipartite_out.
struct FilterBipartiteBuffers {
  at::Tensor edge_index, edge_ptr, edge_keep, edge_id;
};

// Caller buffers of kept_nodes_out.
struct KeptNodesBuffers {
  at::Tensor batch, n_id, ptr;
};

}  // namespace stoichconv
