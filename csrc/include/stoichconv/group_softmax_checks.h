// Argument checks of the grouped softmax (semantics and dtypes:
// stoichconv.ops.group_softmax docstring), the one copy of every message of
// its CPU launcher (csrc/cpu/group_softmax.cpp) and its CUDA launcher
// (csrc/cuda/group_softmax.cpp), the device named ("CPU" there, "CUDA"
// here): the structural checks below, then the value checks, which run on
// the host for CPU tensors and on the device for CUDA tensors
// (launch_validate_groups), reporting the first bad value through the same
// host functions (check_row_pointer of csr_checks.h, check_group_perm_values).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "stoichconv/csr_checks.h"

namespace stoichconv {

inline const char* device_type_name(at::DeviceType type) {
  return type == at::kCUDA ? "CUDA" : "CPU";
}

inline bool on_device_of(const at::Tensor& t, const at::Tensor& like, at::DeviceType type) {
  return t.device().type() == type && t.device() == like.device();
}

// The floating storage types of the attention kernels (grouped softmax and
// GATv2): float16, bfloat16, float32, float64; they accumulate in
// acc_type<scalar_t> (accumulate_type.h).
inline bool is_attention_float(at::ScalarType type) {
  return type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble;
}

// values (`name`: logits, or alpha in the backward) [B, nnz, H] of a floating
// type of is_attention_float, group_ptr [G + 1] and group_perm [nnz] 1-D int64,
// all on `type` (one device).
inline void check_group_structure(const char* op, const char* name, const at::Tensor& values,
                                  const at::Tensor& group_ptr, const at::Tensor& group_perm,
                                  at::DeviceType type) {
  const char* dev = device_type_name(type);
  TORCH_CHECK(values.device().type() == type, op, ": tensors must be on ",
              type == at::kCUDA ? "a CUDA device" : "the CPU");
  TORCH_CHECK(values.dim() == 3, op, ": `", name, "` must be [B, nnz, H], got ", values.sizes());
  TORCH_CHECK(is_attention_float(values.scalar_type()), op, ": `", name,
              "` must be float16, bfloat16, float32 or float64, got ", values.scalar_type());
  const std::string same_device =
      type == at::kCUDA ? std::string(" on the device of `") + name + "`" : std::string();
  for (const auto* t : {&group_ptr, &group_perm})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && on_device_of(*t, values, type),
                op, ": `group_ptr` and `group_perm` must be 1-D int64 ", dev, " tensors",
                same_device);
  const int64_t nnz = values.size(1), G = group_ptr.size(0) - 1;
  TORCH_CHECK(G >= 0, op, ": `group_ptr` must have length num_groups + 1 >= 1");
  TORCH_CHECK(group_perm.size(0) == nnz, op, ": `group_perm` must have length nnz = ", nnz,
              ", got ", group_perm.size(0));
}

// group_perm q [n] (host) must hold ids in [0, nnz), none twice (n = nnz: a
// permutation).  The CPU launcher's loop; the CUDA launcher calls it on the
// first bad entry found on the device (and, for a repeat, its id twice).
inline void check_group_perm_values(const char* op, const int64_t* q, int64_t n, int64_t nnz) {
  std::vector<char> seen(static_cast<size_t>(nnz), 0);
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(q[j] >= 0 && q[j] < nnz, op, ": `group_perm` has id ", q[j], " outside [0, ", nnz,
                ")");
    TORCH_CHECK(!seen[q[j]], op, ": `group_perm` must be a permutation of [0, nnz); id ", q[j],
                " repeats");
    seen[q[j]] = 1;
  }
}

// kept: an optional bool [B, nnz] on the device of the logits.
inline void check_group_kept(const char* op, const std::optional<at::Tensor>& kept,
                             const at::Tensor& logits, at::DeviceType type) {
  if (!kept.has_value()) return;
  const int64_t B = logits.size(0), nnz = logits.size(1);
  TORCH_CHECK(kept->scalar_type() == at::kBool && on_device_of(*kept, logits, type), op,
              ": `kept` must be a bool ", device_type_name(type), " tensor",
              type == at::kCUDA ? " on the device of `logits`" : "");
  TORCH_CHECK(kept->dim() == 2 && kept->size(0) == B && kept->size(1) == nnz, op,
              ": `kept` must be [B, nnz] = [", B, ", ", nnz, "], got ", kept->sizes());
}

// The backward's grad against alpha.
inline void check_group_grad(const char* op, const at::Tensor& grad, const at::Tensor& alpha) {
  TORCH_CHECK(grad.sizes() == alpha.sizes() && grad.scalar_type() == alpha.scalar_type() &&
                  grad.device() == alpha.device(),
              op, ": `grad` must match `alpha` in shape, dtype and device");
}

}  // namespace stoichconv
