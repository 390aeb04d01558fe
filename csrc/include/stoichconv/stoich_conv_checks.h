// Argument checks shared by the CPU and CUDA launchers of the stoich conv
// operators.  The Python wrappers validate first with friendlier messages;
// these keep a direct torch.ops call from ever reading out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "stoichconv/accumulate_type.h"

namespace stoichconv {

// The dtypes of the stoich conv (the policy: stoichconv.ops.stoich_conv
// docstring): features, weights, `out`, `hidden` and every gradient in one of
// float16, bfloat16, float32 or float64; the statistics (node_norm,
// edge_norm) and the degree weights (abs_stoich) in its accumulate dtype,
// acc_type<scalar_t> of stoichconv/accumulate_type.h as a ScalarType.
inline bool is_stoich_conv_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline at::ScalarType accumulate_scalar_type(at::ScalarType t) {
  at::ScalarType acc = t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "stoich_conv", [&] {
    acc = c10::CppTypeToScalarType<acc_type<scalar_t>>::value;
  });
  return acc;
}

inline void check_index_vector(const at::Tensor& t, const char* name, int64_t length,
                               const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, "stoich_conv: `", name,
              "` must be 1-D of length ", length, ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, "stoich_conv: `", name,
              "` must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "stoich_conv: `", name, "` is on ",
              t.device(), " but `y` is on ", like.device());
}

// Checks every structural argument and returns nnz.
inline int64_t check_stoich_conv_args(const at::Tensor& y, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& reaction_keep,
                                      const at::Tensor& metabolite_index,
                                      const at::Tensor& reaction_index,
                                      const at::Tensor& reaction_ptr,
                                      const at::Tensor& reaction_perm,
                                      const at::Tensor& metabolite_ptr,
                                      const at::Tensor& metabolite_perm) {
  TORCH_CHECK(y.dim() == 4, "stoich_conv: `y` must be [B, N, H, C], got shape ", y.sizes());
  TORCH_CHECK(is_stoich_conv_dtype(y.scalar_type()),
              "stoich_conv: `y` must be float16, bfloat16, float32 or float64, got ",
              y.scalar_type());
  const int64_t B = y.size(0), N = y.size(1), H = y.size(2);
  const int64_t nnz = metabolite_index.numel();
  TORCH_CHECK(weight.dim() == 3 && (weight.size(0) == B || weight.size(0) == 1) &&
                  weight.size(1) == nnz && weight.size(2) == H,
              "stoich_conv: `weight` must be [B, nnz, H] = [", B, ", ", nnz, ", ", H,
              "] or shared by the batch [1, nnz, H] = [1, ", nnz, ", ", H, "], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == y.scalar_type(), "stoich_conv: `weight` dtype ",
              weight.scalar_type(), " differs from `y` dtype ", y.scalar_type());
  TORCH_CHECK(weight.device() == y.device(), "stoich_conv: `weight` is on ", weight.device(),
              " but `y` is on ", y.device());
  check_index_vector(metabolite_index, "metabolite_index", nnz, y);
  check_index_vector(reaction_index, "reaction_index", nnz, y);
  check_index_vector(reaction_perm, "reaction_perm", nnz, y);
  check_index_vector(metabolite_perm, "metabolite_perm", nnz, y);
  TORCH_CHECK(reaction_ptr.dim() == 1 && reaction_ptr.size(0) >= 1,
              "stoich_conv: `reaction_ptr` must be 1-D of length M + 1");
  check_index_vector(reaction_ptr, "reaction_ptr", reaction_ptr.size(0), y);
  check_index_vector(metabolite_ptr, "metabolite_ptr", N + 1, y);
  const int64_t M = reaction_ptr.size(0) - 1;
  if (reaction_keep.has_value()) {
    const auto& keep = *reaction_keep;
    TORCH_CHECK(keep.dim() == 2 && keep.size(0) == B && keep.size(1) == M,
                "stoich_conv: `reaction_keep` must be [B, M] = [", B, ", ", M,
                "], got shape ", keep.sizes());
    TORCH_CHECK(keep.scalar_type() == at::kBool, "stoich_conv: `reaction_keep` must be bool, got ",
                keep.scalar_type());
    TORCH_CHECK(keep.device() == y.device(), "stoich_conv: `reaction_keep` is on ",
                keep.device(), " but `y` is on ", y.device());
  }
  return nnz;
}

// Elements between the samples of a (contiguous) `weight` checked by
// check_stoich_conv_args: nnz * H for a per-sample weight [B, nnz, H], 0 for
// one shared by the batch [1, nnz, H] (the kernels read row 0 for every
// sample, and the backward returns grad_weight [1, nnz, H] summed over it).
inline int64_t weight_sample_stride(const at::Tensor& weight) {
  return weight.size(0) == 1 ? 0 : weight.size(1) * weight.size(2);
}

// The forward's `abs_stoich` [nnz] in the accumulate dtype of `y`, on its device.
inline void check_abs_stoich(const at::Tensor& abs_stoich, int64_t nnz, const at::Tensor& y) {
  const at::ScalarType acc = accumulate_scalar_type(y.scalar_type());
  TORCH_CHECK(abs_stoich.dim() == 1 && abs_stoich.size(0) == nnz && abs_stoich.scalar_type() == acc,
              "stoich_conv: `abs_stoich` must be 1-D of length nnz with the dtype of `y`'s "
              "accumulation (", acc, " for `y` of ", y.scalar_type(), "), got shape ",
              abs_stoich.sizes(), " and ", abs_stoich.scalar_type());
  TORCH_CHECK(abs_stoich.device() == y.device(), "stoich_conv: `abs_stoich` is on ",
              abs_stoich.device(), " but `y` is on ", y.device());
}

// The backward's saved and incoming tensors (after check_stoich_conv_args):
// grad_out like y, hidden / grad_hidden [B, M, H, C] (or hidden empty [0]
// and no grad_hidden: recompute it), norms [Bn, N] and
// [Bn, M] with Bn = B under a reaction keep-mask, else 1; all on y's device,
// grad_out / hidden / grad_hidden of y's dtype, the norms of its accumulate
// dtype.
inline void check_stoich_conv_backward_args(const at::Tensor& grad_out,
                                            const std::optional<at::Tensor>& grad_hidden,
                                            const at::Tensor& y, const at::Tensor& hidden,
                                            const at::Tensor& node_norm,
                                            const at::Tensor& edge_norm, bool masked,
                                            int64_t num_reactions) {
  TORCH_CHECK(grad_out.sizes() == y.sizes(),
              "stoich_conv_backward: `grad_out` must have the shape of `y`");
  const at::ScalarType acc = accumulate_scalar_type(y.scalar_type());
  for (const auto& [t, name, dtype] :
       {std::tuple<const at::Tensor&, const char*, at::ScalarType>{grad_out, "grad_out",
                                                                   y.scalar_type()},
        {hidden, "hidden", y.scalar_type()},
        {node_norm, "node_norm", acc},
        {edge_norm, "edge_norm", acc}}) {
    TORCH_CHECK(t.device() == y.device(), "stoich_conv_backward: `", name, "` is on ",
                t.device(), " but `y` is on ", y.device());
    TORCH_CHECK(t.scalar_type() == dtype, "stoich_conv_backward: `", name, "` must be ", dtype,
                " for `y` of ", y.scalar_type(), ", got ", t.scalar_type());
  }
  const int64_t B = y.size(0), N = y.size(1), H = y.size(2), C = y.size(3);
  const int64_t M = num_reactions, Bn = masked ? B : 1;
  const bool saved = hidden.numel() > 0 || hidden.dim() != 1;
  TORCH_CHECK(!saved || (hidden.dim() == 4 && hidden.size(0) == B && hidden.size(1) == M &&
                         hidden.size(2) == H && hidden.size(3) == C),
              "stoich_conv_backward: `hidden` must be [B, M, H, C], or empty [0] when the "
              "forward did not save it");
  TORCH_CHECK(saved || !grad_hidden.has_value(),
              "stoich_conv_backward: `grad_hidden` given but `hidden` was not saved");
  if (grad_hidden.has_value()) {
    TORCH_CHECK(grad_hidden->device() == y.device() &&
                    grad_hidden->scalar_type() == y.scalar_type(),
                "stoich_conv_backward: `grad_hidden` must have the device and dtype of `y`");
    TORCH_CHECK(grad_hidden->sizes() == hidden.sizes(),
                "stoich_conv_backward: `grad_hidden` must have the shape of `hidden`");
  }
  TORCH_CHECK(node_norm.dim() == 2 && node_norm.size(0) == Bn && node_norm.size(1) == N &&
                  edge_norm.dim() == 2 && edge_norm.size(0) == Bn && edge_norm.size(1) == M,
              "stoich_conv_backward: `node_norm`/`edge_norm` must be [Bn, N] and [Bn, M]");
}

}  // namespace stoichconv
