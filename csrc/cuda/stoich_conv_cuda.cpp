// CUDA dispatch of the stoich conv operators: argument checks, output
// allocation and the current stream; the kernels live in
// stoich_conv_kernels.cu behind the torch-free launch functions of
// stoichconv/stoich_conv_cuda.h.  Only c10/cuda headers are used (not
// ATen/cuda/CUDAContext.h, which needs cusparse.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../stoich_conv_checks.h"
#include "stoichconv/stoich_conv_cuda.h"

namespace stoichconv {
namespace {

void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "stoich_conv: `", name, "` must be a CUDA tensor, got ", t.device());
}

cuda::DeviceStructure make_device_structure(const at::Tensor& metabolite_index,
                                            const at::Tensor& reaction_index,
                                            const at::Tensor& reaction_ptr,
                                            const at::Tensor& reaction_perm,
                                            const at::Tensor& metabolite_ptr,
                                            const at::Tensor& metabolite_perm, int64_t N) {
  return cuda::DeviceStructure{
      metabolite_index.data_ptr<int64_t>(), reaction_index.data_ptr<int64_t>(),
      reaction_ptr.data_ptr<int64_t>(),     reaction_perm.data_ptr<int64_t>(),
      metabolite_ptr.data_ptr<int64_t>(),   metabolite_perm.data_ptr<int64_t>(),
      metabolite_index.numel(),             N,
      reaction_ptr.numel() - 1};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stoich_conv_forward_cuda(
    const at::Tensor& y_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& reaction_keep, const at::Tensor& metabolite_index_in,
    const at::Tensor& reaction_index_in, const at::Tensor& abs_stoich_in,
    const at::Tensor& reaction_ptr_in, const at::Tensor& reaction_perm_in,
    const at::Tensor& metabolite_ptr_in, const at::Tensor& metabolite_perm_in, bool save_hidden) {
  check_cuda_tensor(y_in, "y");
  const int64_t nnz = check_stoich_conv_args(y_in, weight_in, reaction_keep, metabolite_index_in,
                                             reaction_index_in, reaction_ptr_in,
                                             reaction_perm_in, metabolite_ptr_in,
                                             metabolite_perm_in);
  check_abs_stoich(abs_stoich_in, nnz, y_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto y = y_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto abs_stoich = abs_stoich_in.contiguous();
  const auto metabolite_index = metabolite_index_in.contiguous();
  const auto reaction_index = reaction_index_in.contiguous();
  const auto reaction_ptr = reaction_ptr_in.contiguous();
  const auto reaction_perm = reaction_perm_in.contiguous();
  const auto metabolite_ptr = metabolite_ptr_in.contiguous();
  const auto metabolite_perm = metabolite_perm_in.contiguous();
  const int64_t B = y.size(0), N = y.size(1), H = y.size(2), C = y.size(3);
  const auto s = make_device_structure(metabolite_index, reaction_index, reaction_ptr,
                                       reaction_perm, metabolite_ptr, metabolite_perm, N);
  const int64_t M = s.M;
  at::Tensor keep;
  if (reaction_keep.has_value()) keep = reaction_keep->contiguous();
  const bool* keep_ptr = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  const int64_t Bn = keep.defined() ? B : 1;

  auto out = at::empty({B, N, H, C}, y.options());
  auto hidden = at::empty({B, M, H, C}, y.options());
  auto node_norm = at::empty({Bn, N}, y.options());
  auto edge_norm = at::empty({Bn, M}, y.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stoich_conv_forward_cuda", [&] {
    check_launch(cuda::launch_stoich_conv_forward<scalar_t>(
                     s, cuda::Geometry{B, H, C}, y.data_ptr<scalar_t>(),
                     weight.data_ptr<scalar_t>(), keep_ptr, abs_stoich.data_ptr<scalar_t>(),
                     out.data_ptr<scalar_t>(), hidden.data_ptr<scalar_t>(),
                     node_norm.data_ptr<scalar_t>(), edge_norm.data_ptr<scalar_t>(), stream),
                 "stoich_conv_forward");
  });
  // Without save_hidden the stage-1 rows were a temporary (freed to the
  // caching allocator); the backward recomputes them.
  if (!save_hidden) hidden = at::empty({0}, y.options());
  return {out, hidden, node_norm, edge_norm};
}

std::tuple<at::Tensor, at::Tensor> stoich_conv_backward_cuda(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_hidden_in,
    const at::Tensor& y_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& reaction_keep, const at::Tensor& hidden_in,
    const at::Tensor& node_norm_in, const at::Tensor& edge_norm_in,
    const at::Tensor& metabolite_index_in, const at::Tensor& reaction_index_in,
    const at::Tensor& reaction_ptr_in, const at::Tensor& reaction_perm_in,
    const at::Tensor& metabolite_ptr_in, const at::Tensor& metabolite_perm_in, bool need_grad_y,
    bool need_grad_weight) {
  check_cuda_tensor(y_in, "y");
  check_stoich_conv_args(y_in, weight_in, reaction_keep, metabolite_index_in, reaction_index_in,
                         reaction_ptr_in, reaction_perm_in, metabolite_ptr_in, metabolite_perm_in);
  check_stoich_conv_backward_args(grad_out_in, grad_hidden_in, y_in, hidden_in, node_norm_in,
                                  edge_norm_in, reaction_keep.has_value(),
                                  reaction_ptr_in.size(0) - 1);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto y = y_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto grad_out = grad_out_in.contiguous();
  auto hidden = hidden_in.contiguous();
  const auto node_norm = node_norm_in.contiguous();
  const auto edge_norm = edge_norm_in.contiguous();
  const auto metabolite_index = metabolite_index_in.contiguous();
  const auto reaction_index = reaction_index_in.contiguous();
  const auto reaction_ptr = reaction_ptr_in.contiguous();
  const auto reaction_perm = reaction_perm_in.contiguous();
  const auto metabolite_ptr = metabolite_ptr_in.contiguous();
  const auto metabolite_perm = metabolite_perm_in.contiguous();
  const int64_t B = y.size(0), N = y.size(1), H = y.size(2), C = y.size(3);
  const auto s = make_device_structure(metabolite_index, reaction_index, reaction_ptr,
                                       reaction_perm, metabolite_ptr, metabolite_perm, N);
  const int64_t M = s.M;
  at::Tensor grad_hidden;
  if (grad_hidden_in.has_value()) grad_hidden = grad_hidden_in->contiguous();
  at::Tensor keep;
  if (reaction_keep.has_value()) keep = reaction_keep->contiguous();
  const bool* keep_ptr = keep.defined() ? keep.data_ptr<bool>() : nullptr;

  at::Tensor grad_y = need_grad_y ? at::empty_like(y) : at::empty({0}, y.options());
  at::Tensor grad_weight =
      need_grad_weight ? at::empty_like(weight) : at::empty({0}, weight.options());
  if (!need_grad_y && !need_grad_weight) return {grad_y, grad_weight};

  auto reaction_grad = at::empty({B, M, H, C}, y.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  if (hidden.numel() == 0 && hidden.dim() == 1 && need_grad_weight) {
    // The forward did not save `hidden`: recompute the stage-1 rows (only
    // the weight gradient reads them).
    hidden = at::empty({B, M, H, C}, y.options());
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stoich_conv_hidden_cuda", [&] {
      check_launch(cuda::launch_stoich_conv_hidden<scalar_t>(
                       s, cuda::Geometry{B, H, C}, y.data_ptr<scalar_t>(),
                       weight.data_ptr<scalar_t>(), keep_ptr, edge_norm.data_ptr<scalar_t>(),
                       hidden.data_ptr<scalar_t>(), stream),
                   "stoich_conv_backward (recomputing hidden)");
    });
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stoich_conv_backward_cuda", [&] {
    check_launch(
        cuda::launch_stoich_conv_backward<scalar_t>(
            s, cuda::Geometry{B, H, C}, grad_out.data_ptr<scalar_t>(),
            grad_hidden.defined() ? grad_hidden.data_ptr<scalar_t>() : nullptr,
            y.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), keep_ptr,
            hidden.data_ptr<scalar_t>(), node_norm.data_ptr<scalar_t>(),
            edge_norm.data_ptr<scalar_t>(), reaction_grad.data_ptr<scalar_t>(),
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
