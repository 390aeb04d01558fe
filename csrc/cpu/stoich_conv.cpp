// C++ CPU kernels of the signed stoichiometric propagation.
//
// Every output row is one segment of a CSR ordering computed once per graph
// (the plan): the forward is two segment reductions (metabolite -> reaction
// over the reaction CSR, reaction -> metabolite over the metabolite CSR), the
// backward the same two in the other order plus one dot product per
// incidence.  Each row is written by exactly one thread in a fixed order, so
// results are bit-identical across runs and thread counts; no atomics.
// Dtypes (the policy: stoichconv.ops.stoich_conv docstring): float16,
// bfloat16, float32 and float64 features and weights, summed in
// acc_type<scalar_t>; the norms and abs_stoich in that accumulate type.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <new>
#include <type_traits>
#include <vector>

#include "stoichconv/cpu_isa.h"
#include "stoichconv/size_checks.h"
#include "stoichconv/stoich_conv_checks.h"
#include "stoichconv/stoich_conv_math.h"
#include "stoichconv/stoich_plan.h"

namespace stoichconv {
namespace {

// Rows per parallel task: rows are short (a few incidences x H x C).
constexpr int64_t kGrain = 32;

// Raw views of the tensors of one forward / backward call (contiguous): the
// features, weights, rows and gradients in the storage type scalar_t, the
// degree weights and norms in its accumulate type.
template <typename scalar_t>
struct ForwardArgs {
  using acc_t = acc_type<scalar_t>;
  int64_t B, N, H, C, nnz;
  int64_t w_stride;  // elements between samples of `weight`: nnz * H, or 0 when shared [1, nnz, H]
  const scalar_t* y;
  const scalar_t* weight;
  const bool* keep;  // [B, M] or nullptr
  const acc_t* abs_stoich;
  scalar_t* out;
  scalar_t* hidden;  // or nullptr: not saved
  acc_t* node_norm;
  acc_t* edge_norm;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type<scalar_t>;
  int64_t B, N, H, C, nnz;
  int64_t w_stride;  // as in ForwardArgs; 0: grad_weight is [1, nnz, H], summed over the batch
  const scalar_t* grad_out;
  const scalar_t* grad_hidden;  // or nullptr
  const scalar_t* y;
  const scalar_t* weight;
  const bool* keep;
  const scalar_t* hidden;  // or nullptr: recompute
  const acc_t* node_norm;
  const acc_t* edge_norm;
  scalar_t* grad_y;       // or nullptr
  scalar_t* grad_weight;  // or nullptr
};

// The kernels, compiled once per instruction set: portable code, and AVX2 +
// FMA code chosen at run time when the CPU has it (STOICHCONV_CPU_ISA=default
// forces the portable one).  Both are deterministic; they may differ from
// each other in the last bits (FMA rounds once).
namespace isa_default {
#include "stoich_conv_kernels.h"
}  // namespace isa_default

#ifdef STOICHCONV_CPU_AVX2  // stoichconv/cpu_isa.h
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "stoich_conv_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

template <typename scalar_t>
void run_forward(const StoichPlanView& s, const ForwardArgs<scalar_t>& a) {
#ifdef STOICHCONV_CPU_AVX2
  if (cpu_isa_avx2()) return isa_avx2::forward_kernel(s, a);
#endif
  isa_default::forward_kernel(s, a);
}

template <typename scalar_t>
void run_backward(const StoichPlanView& s, const BackwardArgs<scalar_t>& a) {
#ifdef STOICHCONV_CPU_AVX2
  if (cpu_isa_avx2()) return isa_avx2::backward_kernel(s, a);
#endif
  isa_default::backward_kernel(s, a);
}

// Runs a kernel whose per-thread or per-call scratch blocks ([B, M, H, C]
// rows of `hidden` / R, std::vector) may not fit: reported naming them.
template <typename Kernel>
void run_with_scratch(const char* op, const char* scratch, Kernel kernel) {
  try {
    kernel();
  } catch (const std::bad_alloc&) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, op, ": out of memory allocating the scratch rows ",
                     scratch);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stoich_conv_forward_cpu(
    const at::Tensor& y_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& reaction_keep, const at::Tensor& metabolite_index,
    const at::Tensor& reaction_index, const at::Tensor& abs_stoich_in,
    const at::Tensor& reaction_ptr, const at::Tensor& reaction_perm,
    const at::Tensor& metabolite_ptr, const at::Tensor& metabolite_perm, bool save_hidden) {
  const char* op = "stoich_conv_forward";
  const StoichPlan plan = make_stoich_plan(y_in, weight_in, reaction_keep, metabolite_index,
                                           reaction_index, reaction_ptr, reaction_perm,
                                           metabolite_ptr, metabolite_perm);
  check_abs_stoich(abs_stoich_in, plan.nnz, y_in);
  const auto y = y_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto abs_stoich = abs_stoich_in.contiguous();
  const ReactionKeep keep = make_reaction_keep(reaction_keep);
  const int64_t B = y.size(0), N = plan.N, M = plan.M, H = y.size(2), C = y.size(3);
  const int64_t Bn = keep.masked() ? B : 1;
  // hidden [B, M, H, C] is an output or a scratch block: its size is checked first.
  checked_product(op, "`hidden` [B, M, H, C]", {B, M, H, C});
  const auto opts = y.options();
  auto out = allocate(op, "out", {B, N, H, C}, opts);
  const std::vector<int64_t> hidden_sizes =
      save_hidden ? std::vector<int64_t>{B, M, H, C} : std::vector<int64_t>{0};
  auto hidden = allocate(op, "hidden", hidden_sizes, opts);
  const auto norm_opts = opts.dtype(accumulate_scalar_type(y.scalar_type()));
  auto node_norm = allocate(op, "node_norm", {Bn, N}, norm_opts);
  auto edge_norm = allocate(op, "edge_norm", {Bn, M}, norm_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "stoich_conv_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const ForwardArgs<scalar_t> args{B, N, H, C, plan.nnz, weight_sample_stride(weight),
                                     y.data_ptr<scalar_t>(),
                                     weight.data_ptr<scalar_t>(), keep.data,
                                     abs_stoich.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
                                     save_hidden ? hidden.data_ptr<scalar_t>() : nullptr,
                                     node_norm.data_ptr<acc_t>(), edge_norm.data_ptr<acc_t>()};
    run_with_scratch(op, "of `hidden` [B, M, H, C]",
                     [&] { run_forward<scalar_t>(plan.view, args); });
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
  const char* op = "stoich_conv_backward";
  const StoichPlan plan = make_stoich_plan(y_in, weight_in, reaction_keep, metabolite_index,
                                           reaction_index, reaction_ptr, reaction_perm,
                                           metabolite_ptr, metabolite_perm);
  check_stoich_conv_backward_args(grad_out_in, grad_hidden_in, y_in, hidden_in, node_norm_in,
                                  edge_norm_in, reaction_keep.has_value(), plan.M);
  const auto y = y_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto grad_out = grad_out_in.contiguous();
  const auto hidden = hidden_in.contiguous();
  const auto node_norm = node_norm_in.contiguous();
  const auto edge_norm = edge_norm_in.contiguous();
  at::Tensor grad_hidden;
  if (grad_hidden_in.has_value()) grad_hidden = grad_hidden_in->contiguous();
  const ReactionKeep keep = make_reaction_keep(reaction_keep);
  const int64_t B = y.size(0), N = plan.N, M = plan.M, H = y.size(2), C = y.size(3);
  // R (and a recomputed hidden) [B, M, H, C] are scratch blocks.
  checked_product(op, "the reaction gradient [B, M, H, C]", {B, M, H, C});

  const std::vector<int64_t> none{0};
  at::Tensor grad_y = allocate(op, "grad_y", need_grad_y ? y.sizes() : at::IntArrayRef(none), y.options());
  at::Tensor grad_weight =
      allocate(op, "grad_weight", need_grad_weight ? weight.sizes() : at::IntArrayRef(none), weight.options());
  if (!need_grad_y && !need_grad_weight) return {grad_y, grad_weight};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "stoich_conv_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const BackwardArgs<scalar_t> args{
        B, N, H, C, plan.nnz, weight_sample_stride(weight), grad_out.data_ptr<scalar_t>(),
        grad_hidden.defined() ? grad_hidden.data_ptr<scalar_t>() : nullptr,
        y.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), keep.data,
        hidden.numel() > 0 ? hidden.data_ptr<scalar_t>() : nullptr,
        node_norm.data_ptr<acc_t>(), edge_norm.data_ptr<acc_t>(),
        need_grad_y ? grad_y.data_ptr<scalar_t>() : nullptr,
        need_grad_weight ? grad_weight.data_ptr<scalar_t>() : nullptr};
    run_with_scratch(op, "of the reaction gradient [B, M, H, C]",
                     [&] { run_backward<scalar_t>(plan.view, args); });
  });
  return {grad_y, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CPU, m) {
  m.impl("stoich_conv_forward", &stoich_conv_forward_cpu);
  m.impl("stoich_conv_backward", &stoich_conv_backward_cpu);
}

}  // namespace stoichconv
