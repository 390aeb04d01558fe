// CUDA dispatch of the stoich conv operators: argument checks (the shared
// StoichPlan prologue of stoichconv/stoich_plan.h), output allocation and the
// current stream; the kernels live in stoich_conv_kernels.cu behind the
// torch-free launch functions of stoichconv/stoich_conv_cuda.h.  Only c10/cuda
// headers are used (not ATen/cuda/CUDAContext.h, which needs cusparse.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "stoichconv/size_checks.h"
#include "stoichconv/stoich_conv_checks.h"
#include "stoichconv/stoich_conv_cuda.h"
#include "stoichconv/stoich_plan.h"

namespace stoichconv {
namespace {

void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "stoich_conv: `", name, "` must be a CUDA tensor, got ", t.device());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stoich_conv_forward_cuda(
    const at::Tensor& y_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& reaction_keep, const at::Tensor& metabolite_index,
    const at::Tensor& reaction_index, const at::Tensor& abs_stoich_in,
    const at::Tensor& reaction_ptr, const at::Tensor& reaction_perm,
    const at::Tensor& metabolite_ptr, const at::Tensor& metabolite_perm, bool save_hidden) {
  const char* op = "stoich_conv_forward";
  check_cuda_tensor(y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
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

  const auto opts = y.options();
  const auto norm_opts = opts.dtype(accumulate_scalar_type(y.scalar_type()));
  auto out = allocate(op, "out", {B, N, H, C}, opts);
  auto hidden = allocate(op, "hidden", {B, M, H, C}, opts);
  auto node_norm = allocate(op, "node_norm", {Bn, N}, norm_opts);
  auto edge_norm = allocate(op, "edge_norm", {Bn, M}, norm_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "stoich_conv_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    check_launch(cuda::launch_stoich_conv_forward<scalar_t>(
                     plan.view, cuda::Geometry{B, H, C, weight.size(0) == 1 && B != 1}, y.data_ptr<scalar_t>(),
                     weight.data_ptr<scalar_t>(), keep.data, abs_stoich.data_ptr<acc_t>(),
                     out.data_ptr<scalar_t>(), hidden.data_ptr<scalar_t>(),
                     node_norm.data_ptr<acc_t>(), edge_norm.data_ptr<acc_t>(), stream),
                 "stoich_conv_forward");
  });
  // Without save_hidden the stage-1 rows were a temporary (freed to the
  // caching allocator); the backward recomputes them.
  if (!save_hidden) hidden = at::empty({0}, opts);
  return {out, hidden, node_norm, edge_norm};
}

std::tuple<at::Tensor, at::Tensor> stoich_conv_backward_cuda(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_hidden_in,
    const at::Tensor& y_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& reaction_keep, const at::Tensor& hidden_in,
    const at::Tensor& node_norm_in, const at::Tensor& edge_norm_in,
    const at::Tensor& metabolite_index, const at::Tensor& reaction_index,
    const at::Tensor& reaction_ptr, const at::Tensor& reaction_perm,
    const at::Tensor& metabolite_ptr, const at::Tensor& metabolite_perm, bool need_grad_y,
    bool need_grad_weight) {
  const char* op = "stoich_conv_backward";
  check_cuda_tensor(y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const StoichPlan plan = make_stoich_plan(y_in, weight_in, reaction_keep, metabolite_index,
                                           reaction_index, reaction_ptr, reaction_perm,
                                           metabolite_ptr, metabolite_perm);
  check_stoich_conv_backward_args(grad_out_in, grad_hidden_in, y_in, hidden_in, node_norm_in,
                                  edge_norm_in, reaction_keep.has_value(), plan.M);
  const auto y = y_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto grad_out = grad_out_in.contiguous();
  auto hidden = hidden_in.contiguous();
  const auto node_norm = node_norm_in.contiguous();
  const auto edge_norm = edge_norm_in.contiguous();
  at::Tensor grad_hidden;
  if (grad_hidden_in.has_value()) grad_hidden = grad_hidden_in->contiguous();
  const ReactionKeep keep = make_reaction_keep(reaction_keep);
  const int64_t B = y.size(0), M = plan.M, H = y.size(2), C = y.size(3);

  const std::vector<int64_t> none{0};
  at::Tensor grad_y =
      allocate(op, "grad_y", need_grad_y ? y.sizes() : at::IntArrayRef(none), y.options());
  at::Tensor grad_weight = allocate(
      op, "grad_weight", need_grad_weight ? weight.sizes() : at::IntArrayRef(none), weight.options());
  if (!need_grad_y && !need_grad_weight) return {grad_y, grad_weight};

  auto reaction_grad = allocate(op, "the reaction gradient", {B, M, H, C}, y.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  if (hidden.numel() == 0 && hidden.dim() == 1 && need_grad_weight) {
    // The forward did not save `hidden`: recompute the stage-1 rows (only
    // the weight gradient reads them).
    hidden = allocate(op, "hidden (recomputed)", {B, M, H, C}, y.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                    "stoich_conv_hidden_cuda", [&] {
      check_launch(cuda::launch_stoich_conv_hidden<scalar_t>(
                       plan.view, cuda::Geometry{B, H, C, weight.size(0) == 1 && B != 1}, y.data_ptr<scalar_t>(),
                       weight.data_ptr<scalar_t>(), keep.data,
                       edge_norm.data_ptr<acc_type<scalar_t>>(), hidden.data_ptr<scalar_t>(),
                       stream),
                   "stoich_conv_backward (recomputing hidden)");
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "stoich_conv_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    check_launch(
        cuda::launch_stoich_conv_backward<scalar_t>(
            plan.view, cuda::Geometry{B, H, C, weight.size(0) == 1 && B != 1}, grad_out.data_ptr<scalar_t>(),
            grad_hidden.defined() ? grad_hidden.data_ptr<scalar_t>() : nullptr,
            y.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), keep.data,
            hidden.data_ptr<scalar_t>(), node_norm.data_ptr<acc_t>(),
            edge_norm.data_ptr<acc_t>(), reaction_grad.data_ptr<scalar_t>(),
            need_grad_y ? grad_y.data_ptr<scalar_t>() : nullptr,
            need_grad_weight ? grad_weight.data_ptr<scalar_t>() : nullptr, stream),
        "stoich_conv_backward");
  });
  return {grad_y, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CUDA, m) {
  m.impl("stoich_conv_forward", &stoich_conv_forward_cuda);
  m.impl("stoich_conv_backward", &stoich_conv_backward_cuda);
}

}  // namespace stoichconv
