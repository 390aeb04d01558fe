// C++ CPU kernels of the signed stoichiometric propagation.
//
// Every output row is one segment of a CSR ordering computed once per graph
// (the plan): the forward is two segment reductions (metabolite -> reaction
// over the reaction CSR, reaction -> metabolite over the metabolite CSR), the
// backward the same two in the other order plus one dot product per
// incidence.  Each row is written by exactly one thread in a fixed order, so
// results are bit-identical across runs and thread counts; no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../csr_checks.h"
#include "../stoich_conv_checks.h"
#include "stoichconv/stoich_conv_math.h"

namespace stoichconv {
namespace {

// Rows per parallel task: rows are short (a few incidences x H x C).
constexpr int64_t kGrain = 32;

// Structure of the plan as raw pointers.
struct Structure {
  const int64_t* metabolite_index;
  const int64_t* reaction_index;
  const int64_t* reaction_ptr;
  const int64_t* reaction_perm;
  const int64_t* metabolite_ptr;
  const int64_t* metabolite_perm;
  int64_t nnz, N, M;
};

// One O(nnz + N + M) pass so that a hand-made plan can never index out of bounds.
void check_structure_values(const Structure& s) {
  check_row_pointer("stoich_conv", "reaction_ptr", s.reaction_ptr, s.M, s.nnz, "nnz");
  check_row_pointer("stoich_conv", "metabolite_ptr", s.metabolite_ptr, s.N, s.nnz, "nnz");
  for (int64_t j = 0; j < s.nnz; ++j) {
    TORCH_CHECK(s.metabolite_index[j] >= 0 && s.metabolite_index[j] < s.N,
                "stoich_conv: `metabolite_index` out of range [0, ", s.N, ")");
    TORCH_CHECK(s.reaction_index[j] >= 0 && s.reaction_index[j] < s.M,
                "stoich_conv: `reaction_index` out of range [0, ", s.M, ")");
    TORCH_CHECK(s.reaction_perm[j] >= 0 && s.reaction_perm[j] < s.nnz,
                "stoich_conv: `reaction_perm` out of range [0, ", s.nnz, ")");
    TORCH_CHECK(s.metabolite_perm[j] >= 0 && s.metabolite_perm[j] < s.nnz,
                "stoich_conv: `metabolite_perm` out of range [0, ", s.nnz, ")");
  }
}

Structure make_structure(const at::Tensor& metabolite_index, const at::Tensor& reaction_index,
                         const at::Tensor& reaction_ptr, const at::Tensor& reaction_perm,
                         const at::Tensor& metabolite_ptr, const at::Tensor& metabolite_perm,
                         int64_t N) {
  Structure s{metabolite_index.data_ptr<int64_t>(), reaction_index.data_ptr<int64_t>(),
              reaction_ptr.data_ptr<int64_t>(),     reaction_perm.data_ptr<int64_t>(),
              metabolite_ptr.data_ptr<int64_t>(),   metabolite_perm.data_ptr<int64_t>(),
              metabolite_index.numel(),             N,
              reaction_ptr.numel() - 1};
  check_structure_values(s);
  return s;
}

// Raw views of the tensors of one forward / backward call (contiguous).
template <typename scalar_t>
struct ForwardArgs {
  int64_t B, N, H, C, nnz;
  const scalar_t* y;
  const scalar_t* weight;
  const bool* keep;  // [B, M] or nullptr
  const scalar_t* abs_stoich;
  scalar_t* out;
  scalar_t* hidden;  // or nullptr: not saved
  scalar_t* node_norm;
  scalar_t* edge_norm;
};

template <typename scalar_t>
struct BackwardArgs {
  int64_t B, N, H, C, nnz;
  const scalar_t* grad_out;
  const scalar_t* grad_hidden;  // or nullptr
  const scalar_t* y;
  const scalar_t* weight;
  const bool* keep;
  const scalar_t* hidden;  // or nullptr: recompute
  const scalar_t* node_norm;
  const scalar_t* edge_norm;
  scalar_t* grad_y;       // or nullptr
  scalar_t* grad_weight;  // or nullptr
};

// The kernels, compiled once per instruction set: portable code, and AVX2 +
// FMA code chosen at run time when the CPU has it (STOICHCONV_CPU_ISA=default
// forces the portable one).  Both are deterministic; they may differ from
// each other in the last bits (FMA rounds once).
namespace isa_default {
#include "stoich_conv_cpu_kernels.h"
}  // namespace isa_default

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define STOICHCONV_CPU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "stoich_conv_cpu_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

// Whether to run the AVX2 + FMA kernels: the CPU supports them and
// STOICHCONV_CPU_ISA is not "default".
bool use_avx2() {
#ifdef STOICHCONV_CPU_AVX2
  const char* forced = std::getenv("STOICHCONV_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) return false;
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

template <typename scalar_t>
void run_forward(const Structure& s, const ForwardArgs<scalar_t>& a) {
#ifdef STOICHCONV_CPU_AVX2
  if (use_avx2()) return isa_avx2::forward_kernel(s, a);
#endif
  isa_default::forward_kernel(s, a);
}

template <typename scalar_t>
void run_backward(const Structure& s, const BackwardArgs<scalar_t>& a) {
#ifdef STOICHCONV_CPU_AVX2
  if (use_avx2()) return isa_avx2::backward_kernel(s, a);
#endif
  isa_default::backward_kernel(s, a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stoich_conv_forward_cpu(
    const at::Tensor& y_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& reaction_keep, const at::Tensor& metabolite_index,
    const at::Tensor& reaction_index, const at::Tensor& abs_stoich,
    const at::Tensor& reaction_ptr, const at::Tensor& reaction_perm,
    const at::Tensor& metabolite_ptr, const at::Tensor& metabolite_perm, bool save_hidden) {
  const int64_t nnz =
      check_stoich_conv_args(y_in, weight_in, reaction_keep, metabolite_index, reaction_index,
                             reaction_ptr, reaction_perm, metabolite_ptr, metabolite_perm);
  check_abs_stoich(abs_stoich, nnz, y_in);
  const auto y = y_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t B = y.size(0), N = y.size(1), H = y.size(2), C = y.size(3);
  const Structure s = make_structure(metabolite_index.contiguous(), reaction_index.contiguous(),
                                     reaction_ptr.contiguous(), reaction_perm.contiguous(),
                                     metabolite_ptr.contiguous(), metabolite_perm.contiguous(), N);
  const int64_t M = s.M;
  at::Tensor keep;
  if (reaction_keep.has_value()) keep = reaction_keep->contiguous();
  const bool* keep_ptr = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  const int64_t Bn = keep.defined() ? B : 1;

  auto out = at::empty({B, N, H, C}, y.options());
  auto hidden = save_hidden ? at::empty({B, M, H, C}, y.options()) : at::empty({0}, y.options());
  auto node_norm = at::empty({Bn, N}, y.options());
  auto edge_norm = at::empty({Bn, M}, y.options());

  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stoich_conv_forward_cpu", [&] {
    const auto abs_s = abs_stoich.contiguous();
    run_forward<scalar_t>(
        s, ForwardArgs<scalar_t>{B, N, H, C, nnz, y.data_ptr<scalar_t>(),
                                 weight.data_ptr<scalar_t>(), keep_ptr,
                                 abs_s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                 save_hidden ? hidden.data_ptr<scalar_t>() : nullptr,
                                 node_norm.data_ptr<scalar_t>(),
                                 edge_norm.data_ptr<scalar_t>()});
  });
  return {out, hidden, node_norm, edge_norm};
}

std::tuple<at::Tensor, at::Tensor> stoich_conv_backward_cpu(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_hidden_in,
    const at::Tensor& y_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& reaction_keep, const at::Tensor& hidden_in,
    const at::Tensor& node_norm_in, const at::Tensor& edge_norm_in,
    const at::Tensor& metabolite_index, const at::Tensor& reaction_index,
    const at::Tensor& reaction_ptr, const at::Tensor& reaction_perm,
    const at::Tensor& metabolite_ptr, const at::Tensor& metabolite_perm, bool need_grad_y,
    bool need_grad_weight) {
  const int64_t nnz =
      check_stoich_conv_args(y_in, weight_in, reaction_keep, metabolite_index, reaction_index,
                             reaction_ptr, reaction_perm, metabolite_ptr, metabolite_perm);
  check_stoich_conv_backward_args(grad_out_in, grad_hidden_in, y_in, hidden_in, node_norm_in,
                                  edge_norm_in, reaction_keep.has_value(),
                                  reaction_ptr.size(0) - 1);
  const auto y = y_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto grad_out = grad_out_in.contiguous();
  const auto hidden = hidden_in.contiguous();
  const auto node_norm = node_norm_in.contiguous();
  const auto edge_norm = edge_norm_in.contiguous();
  const int64_t B = y.size(0), N = y.size(1), H = y.size(2), C = y.size(3);
  const Structure s = make_structure(metabolite_index.contiguous(), reaction_index.contiguous(),
                                     reaction_ptr.contiguous(), reaction_perm.contiguous(),
                                     metabolite_ptr.contiguous(), metabolite_perm.contiguous(), N);
  at::Tensor grad_hidden;
  if (grad_hidden_in.has_value()) grad_hidden = grad_hidden_in->contiguous();
  at::Tensor keep;
  if (reaction_keep.has_value()) keep = reaction_keep->contiguous();
  const bool* keep_ptr = keep.defined() ? keep.data_ptr<bool>() : nullptr;

  at::Tensor grad_y = need_grad_y ? at::empty_like(y) : at::empty({0}, y.options());
  at::Tensor grad_weight =
      need_grad_weight ? at::empty_like(weight) : at::empty({0}, weight.options());
  if (!need_grad_y && !need_grad_weight) return {grad_y, grad_weight};

  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stoich_conv_backward_cpu", [&] {
    run_backward<scalar_t>(
        s, BackwardArgs<scalar_t>{
               B, N, H, C, nnz, grad_out.data_ptr<scalar_t>(),
               grad_hidden.defined() ? grad_hidden.data_ptr<scalar_t>() : nullptr,
               y.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), keep_ptr,
               hidden.numel() > 0 ? hidden.data_ptr<scalar_t>() : nullptr,
               node_norm.data_ptr<scalar_t>(),
               edge_norm.data_ptr<scalar_t>(),
               need_grad_y ? grad_y.data_ptr<scalar_t>() : nullptr,
               need_grad_weight ? grad_weight.data_ptr<scalar_t>() : nullptr});
  });
  return {grad_y, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CPU, m) {
  m.impl("stoich_conv_forward", &stoich_conv_forward_cpu);
  m.impl("stoich_conv_backward", &stoich_conv_backward_cpu);
}

}  // namespace stoichconv
