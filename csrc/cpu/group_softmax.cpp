// C++ CPU kernels of the grouped softmax over incidences (semantics:
// stoichconv.ops.group_softmax docstring): the attention normalisation of the stoich
// conv layer, over the incidences of each reaction ("node" mode) or of each
// metabolite ("edge" mode).
//
// The groups come as a CSR ordering of the plan (`group_ptr`, `group_perm`):
// each (sample, group) row is one task with its sums in a fixed order, so the
// results are bit-identical for any thread count; no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "stoichconv/csr_checks.h"
#include "stoichconv/group_softmax_math.h"

namespace stoichconv {
namespace {

constexpr int64_t kGroupGrain = 64;  // (sample, group) rows per task

// logits-like [B, nnz, H] tensor, group_ptr [G + 1], group_perm [nnz] a
// permutation; the values are checked so that a hand-made ordering can
// neither index out of bounds nor leave an entry unwritten.
void check_groups(const char* op, const at::Tensor& values, const at::Tensor& group_ptr,
                  const at::Tensor& group_perm) {
  TORCH_CHECK(values.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(values.dim() == 3, op, ": `logits` must be [B, nnz, H], got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
              ": float32 or float64 expected, got ", values.scalar_type());
  for (const auto* t : {&group_ptr, &group_perm})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->device().is_cpu(), op,
                ": `group_ptr` and `group_perm` must be 1-D int64 CPU tensors");
  const int64_t nnz = values.size(1), G = group_ptr.size(0) - 1;
  TORCH_CHECK(G >= 0, op, ": `group_ptr` must have length num_groups + 1 >= 1");
  TORCH_CHECK(group_perm.size(0) == nnz, op, ": `group_perm` must have length nnz = ", nnz,
              ", got ", group_perm.size(0));
  const auto ptr = group_ptr.contiguous();
  const auto perm = group_perm.contiguous();
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t* q = perm.data_ptr<int64_t>();
  check_row_pointer(op, "group_ptr", p, G, nnz, "nnz");
  std::vector<char> seen(static_cast<size_t>(nnz), 0);
  for (int64_t j = 0; j < nnz; ++j) {
    TORCH_CHECK(q[j] >= 0 && q[j] < nnz, op, ": `group_perm` has id ", q[j], " outside [0, ", nnz,
                ")");
    TORCH_CHECK(!seen[q[j]], op, ": `group_perm` must be a permutation of [0, nnz); id ", q[j],
                " repeats");
    seen[q[j]] = 1;
  }
}

// alpha[b, k, h] = kept ? exp(l - max_group) / max(sum_group exp(l - max), tiny) : 0,
// max and sum over the kept incidences of k's group.  Three passes: the group
// maxima and shifted logits (-inf where not kept), one vectorised exp over the
// whole tensor (ATen's), then the group sums and the scaling.  A group whose
// kept logits are all -inf (max -inf) is an empty group: its entries are 0,
// like the reference's, instead of exp(-inf - -inf) = NaN.
template <typename scalar_t>
void shift_by_group_max(const scalar_t* logits, const bool* kept, const int64_t* ptr,
                        const int64_t* perm, int64_t B, int64_t G, int64_t nnz, int64_t H,
                        scalar_t* shifted) {
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  at::parallel_for(0, B * G, kGroupGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> gmax(H);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / G, g = row % G;
      const scalar_t* l_b = logits + b * nnz * H;
      scalar_t* s_b = shifted + b * nnz * H;
      const bool* kept_b = kept ? kept + b * nnz : nullptr;
      std::fill(gmax.begin(), gmax.end(), kNegInf);
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j) {
        const int64_t k = perm[j];
        if (kept_b && !kept_b[k]) continue;
        for (int64_t h = 0; h < H; ++h) gmax[h] = group_max_update(gmax[h], l_b[k * H + h]);
      }
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j) {
        const int64_t k = perm[j];
        const bool on = !kept_b || kept_b[k];
        for (int64_t h = 0; h < H; ++h)
          s_b[k * H + h] = group_shifted_logit(l_b[k * H + h], gmax[h], on);
      }
    }
  });
}

template <typename scalar_t>
void normalize_groups(const int64_t* ptr, const int64_t* perm, int64_t B, int64_t G, int64_t nnz,
                      int64_t H, scalar_t* alpha) {
  at::parallel_for(0, B * G, kGroupGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> denom(H);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / G, g = row % G;
      scalar_t* a_b = alpha + b * nnz * H;
      std::fill(denom.begin(), denom.end(), scalar_t(0));
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j)
        for (int64_t h = 0; h < H; ++h) denom[h] += a_b[perm[j] * H + h];
      for (int64_t h = 0; h < H; ++h) denom[h] = group_inverse_denominator(denom[h]);
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j)
        for (int64_t h = 0; h < H; ++h) a_b[perm[j] * H + h] *= denom[h];
    }
  });
}

// grad_logits[b, k, h] = alpha_k (grad_k - sum_{j in k's group} alpha_j grad_j)
// (0 wherever alpha is 0, masked incidences included).
template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const scalar_t* alpha, const int64_t* ptr,
                     const int64_t* perm, int64_t B, int64_t G, int64_t nnz, int64_t H,
                     scalar_t* grad_logits) {
  at::parallel_for(0, B * G, kGroupGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> dot(H);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / G, g = row % G;
      const int64_t off = b * nnz * H;
      std::fill(dot.begin(), dot.end(), scalar_t(0));
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j) {
        const int64_t k = perm[j];
        for (int64_t h = 0; h < H; ++h) dot[h] += alpha[off + k * H + h] * grad[off + k * H + h];
      }
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j) {
        const int64_t k = perm[j];
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = off + k * H + h;
          grad_logits[i] = softmax_grad(alpha[i], grad[i], dot[h]);
        }
      }
    }
  });
}

at::Tensor group_softmax_cpu(const at::Tensor& logits_in, const std::optional<at::Tensor>& kept_in,
                             const at::Tensor& group_ptr, const at::Tensor& group_perm) {
  const char* op = "group_softmax";
  check_groups(op, logits_in, group_ptr, group_perm);
  const auto logits = logits_in.contiguous();
  const int64_t B = logits.size(0), nnz = logits.size(1), H = logits.size(2);
  at::Tensor kept;
  if (kept_in.has_value()) {
    kept = kept_in->contiguous();
    TORCH_CHECK(kept.scalar_type() == at::kBool && kept.device().is_cpu(), op,
                ": `kept` must be a bool CPU tensor");
    TORCH_CHECK(kept.dim() == 2 && kept.size(0) == B && kept.size(1) == nnz, op,
                ": `kept` must be [B, nnz] = [", B, ", ", nnz, "], got ", kept.sizes());
  }
  const auto ptr = group_ptr.contiguous(), perm = group_perm.contiguous();
  auto alpha = at::empty_like(logits);  // every entry written: group_perm is a permutation
  const int64_t G = ptr.size(0) - 1;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "group_softmax_cpu", [&] {
    shift_by_group_max<scalar_t>(logits.data_ptr<scalar_t>(),
                                 kept.defined() ? kept.data_ptr<bool>() : nullptr,
                                 ptr.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), B, G, nnz, H,
                                 alpha.data_ptr<scalar_t>());
  });
  alpha.exp_();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "group_softmax_cpu", [&] {
    normalize_groups<scalar_t>(ptr.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), B, G, nnz, H,
                               alpha.data_ptr<scalar_t>());
  });
  return alpha;
}

at::Tensor group_softmax_backward_cpu(const at::Tensor& grad_in, const at::Tensor& alpha_in,
                                      const at::Tensor& group_ptr, const at::Tensor& group_perm) {
  const char* op = "group_softmax_backward";
  check_groups(op, alpha_in, group_ptr, group_perm);
  TORCH_CHECK(grad_in.sizes() == alpha_in.sizes() && grad_in.scalar_type() == alpha_in.scalar_type() &&
                  grad_in.device() == alpha_in.device(),
              op, ": `grad` must match `alpha` in shape, dtype and device");
  const auto grad = grad_in.contiguous(), alpha = alpha_in.contiguous();
  const auto ptr = group_ptr.contiguous(), perm = group_perm.contiguous();
  auto grad_logits = at::empty_like(alpha);
  AT_DISPATCH_FLOATING_TYPES(alpha.scalar_type(), "group_softmax_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
                              ptr.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), alpha.size(0),
                              ptr.size(0) - 1, alpha.size(1), alpha.size(2),
                              grad_logits.data_ptr<scalar_t>());
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CPU, m) {
  m.impl("group_softmax", &group_softmax_cpu);
  m.impl("group_softmax_backward", &group_softmax_backward_cpu);
}

}  // namespace stoichconv
