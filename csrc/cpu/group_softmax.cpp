// C++ CPU kernels of the grouped softmax over incidences (semantics and dtypes:
// stoichconv.ops.group_softmax docstring): the attention normalisation of the stoich
// conv layer, over the incidences of each reaction ("node" mode) or of each
// metabolite ("edge" mode).
//
// The groups come as a CSR ordering of the plan (`group_ptr`, `group_perm`):
// each (sample, group) row is one task with its sums in a fixed order, so the
// results are bit-identical for any thread count; no atomics.  Storage types
// float16, bfloat16, float32, float64; the maxima, exponentials and sums are in
// acc_t = acc_type<scalar_t> (float for the reduced-precision types, the type
// itself otherwise), rounded to scalar_t once, on store.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/csr_checks.h"
#include "stoichconv/group_softmax_checks.h"
#include "stoichconv/group_softmax_math.h"
#include "stoichconv/size_checks.h"

namespace stoichconv {
namespace {

constexpr int64_t kGroupGrain = 64;  // (sample, group) rows per task

// The ordering's checks (group_softmax_checks.h): the structure, then the
// values, so that a hand-made ordering can neither index out of bounds nor
// leave an entry unwritten.  `name` is the [B, nnz, H] argument checked.
void check_groups(const char* op, const char* name, const at::Tensor& values,
                  const at::Tensor& group_ptr, const at::Tensor& group_perm) {
  check_group_structure(op, name, values, group_ptr, group_perm, at::kCPU);
  const int64_t nnz = values.size(1), G = group_ptr.size(0) - 1;
  const auto ptr = group_ptr.contiguous();
  const auto perm = group_perm.contiguous();
  check_row_pointer(op, "group_ptr", ptr.data_ptr<int64_t>(), G, nnz, "nnz");
  check_group_perm_values(op, perm.data_ptr<int64_t>(), nnz, nnz);
}

// alpha[b, k, h] = kept ? exp(l - max_group) / max(sum_group exp(l - max), tiny) : 0,
// max and sum over the kept incidences of k's group.  Three passes: the group
// maxima and shifted logits (-inf where not kept) into `shifted` (acc_t), one
// vectorised exp over the whole tensor (ATen's), then the group sums and the
// scaling into alpha (scalar_t).  For float32 / float64 `shifted` is alpha
// itself; for the reduced-precision types an acc_t tensor, so that the
// logits are not rounded before the exp.  A group whose kept logits are all
// -inf (max -inf) is an empty group: its entries are 0, like the reference's,
// instead of exp(-inf - -inf) = NaN.
template <typename scalar_t, typename acc_t>
void shift_by_group_max(const scalar_t* logits, const bool* kept, const int64_t* ptr,
                        const int64_t* perm, int64_t B, int64_t G, int64_t nnz, int64_t H,
                        acc_t* shifted) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, B * G, kGroupGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gmax(H);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / G, g = row % G;
      const scalar_t* l_b = logits + b * nnz * H;
      acc_t* s_b = shifted + b * nnz * H;
      const bool* kept_b = kept ? kept + b * nnz : nullptr;
      std::fill(gmax.begin(), gmax.end(), kNegInf);
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j) {
        const int64_t k = perm[j];
        if (kept_b && !kept_b[k]) continue;
        for (int64_t h = 0; h < H; ++h)
          gmax[h] = group_max_update(gmax[h], static_cast<acc_t>(l_b[k * H + h]));
      }
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j) {
        const int64_t k = perm[j];
        const bool on = !kept_b || kept_b[k];
        for (int64_t h = 0; h < H; ++h)
          s_b[k * H + h] = group_shifted_logit(static_cast<acc_t>(l_b[k * H + h]), gmax[h], on);
      }
    }
  });
}

// alpha = exps * (1 / group sum of exps); `exps` may be alpha itself (float32 / float64).
template <typename scalar_t, typename acc_t>
void normalize_groups(const int64_t* ptr, const int64_t* perm, int64_t B, int64_t G, int64_t nnz,
                      int64_t H, const acc_t* exps, scalar_t* alpha) {
  at::parallel_for(0, B * G, kGroupGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> denom(H);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / G, g = row % G;
      const acc_t* x_b = exps + b * nnz * H;
      scalar_t* a_b = alpha + b * nnz * H;
      std::fill(denom.begin(), denom.end(), acc_t(0));
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j)
        for (int64_t h = 0; h < H; ++h) denom[h] += x_b[perm[j] * H + h];
      for (int64_t h = 0; h < H; ++h) denom[h] = group_inverse_denominator(denom[h]);
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = perm[j] * H + h;
          a_b[i] = static_cast<scalar_t>(x_b[i] * denom[h]);
        }
    }
  });
}

// grad_logits[b, k, h] = alpha_k (grad_k - sum_{j in k's group} alpha_j grad_j)
// (0 wherever alpha is 0, masked incidences included); the dot sum in acc_t.
template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const scalar_t* alpha, const int64_t* ptr,
                     const int64_t* perm, int64_t B, int64_t G, int64_t nnz, int64_t H,
                     scalar_t* grad_logits) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, B * G, kGroupGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dot(H);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / G, g = row % G;
      const int64_t off = b * nnz * H;
      std::fill(dot.begin(), dot.end(), acc_t(0));
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j) {
        const int64_t k = perm[j];
        for (int64_t h = 0; h < H; ++h)
          dot[h] += static_cast<acc_t>(alpha[off + k * H + h]) *
                    static_cast<acc_t>(grad[off + k * H + h]);
      }
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j) {
        const int64_t k = perm[j];
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = off + k * H + h;
          grad_logits[i] = static_cast<scalar_t>(
              softmax_grad(static_cast<acc_t>(alpha[i]), static_cast<acc_t>(grad[i]), dot[h]));
        }
      }
    }
  });
}

at::Tensor group_softmax_cpu(const at::Tensor& logits_in, const std::optional<at::Tensor>& kept_in,
                             const at::Tensor& group_ptr, const at::Tensor& group_perm) {
  const char* op = "group_softmax";
  check_groups(op, "logits", logits_in, group_ptr, group_perm);
  check_group_kept(op, kept_in, logits_in, at::kCPU);
  const auto logits = logits_in.contiguous();
  const int64_t B = logits.size(0), nnz = logits.size(1), H = logits.size(2);
  at::Tensor kept;
  if (kept_in.has_value()) kept = kept_in->contiguous();
  const auto ptr = group_ptr.contiguous(), perm = group_perm.contiguous();
  // every entry written: group_perm is a permutation
  auto alpha = allocate(op, "alpha", logits.sizes(), logits.options());
  const int64_t G = ptr.size(0) - 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "group_softmax_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    // The shifted logits and their exps: alpha itself when scalar_t is acc_t.
    const at::Tensor exps =
        std::is_same<acc_t, scalar_t>::value
            ? alpha
            : allocate(op, "the shifted logits", logits.sizes(),
                       logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    shift_by_group_max<scalar_t, acc_t>(logits.data_ptr<scalar_t>(),
                                        kept.defined() ? kept.data_ptr<bool>() : nullptr,
                                        ptr.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), B, G,
                                        nnz, H, exps.data_ptr<acc_t>());
    exps.exp_();
    normalize_groups<scalar_t, acc_t>(ptr.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), B, G, nnz,
                                      H, exps.data_ptr<acc_t>(), alpha.data_ptr<scalar_t>());
  });
  return alpha;
}

at::Tensor group_softmax_backward_cpu(const at::Tensor& grad_in, const at::Tensor& alpha_in,
                                      const at::Tensor& group_ptr, const at::Tensor& group_perm) {
  const char* op = "group_softmax_backward";
  check_groups(op, "alpha", alpha_in, group_ptr, group_perm);
  check_group_grad(op, grad_in, alpha_in);
  const auto grad = grad_in.contiguous(), alpha = alpha_in.contiguous();
  const auto ptr = group_ptr.contiguous(), perm = group_perm.contiguous();
  auto grad_logits = allocate(op, "grad_logits", alpha.sizes(), alpha.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, alpha.scalar_type(),
                                  "group_softmax_backward_cpu", [&] {
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
