// CUDA dispatch of the fused incidence attention: argument checks (the CPU
// launcher's errors: stoichconv/incidence_attention_checks.h), allocation and
// the current stream; the kernels live in incidence_attention_kernels.cu
// behind the torch-free launch functions of stoichconv/incidence_attention_cuda.h.
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which needs cusparse.h).
//
// Host synchronisation: one per call, to validate the index and ordering
// values: they are copied to the host together in one transfer (int64 [nnz]
// each, small next to the [B, nnz, H] values) and checked by the CPU
// launcher's functions, so that a hand-made ordering raises the CPU error
// instead of reading out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <vector>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/csr_checks.h"
#include "stoichconv/group_softmax_checks.h"
#include "stoichconv/incidence_attention_checks.h"
#include "stoichconv/incidence_attention_cuda.h"
#include "stoichconv/size_checks.h"

namespace stoichconv {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

struct Grouping {
  const char* ptr_name;
  const char* perm_name;
  const at::Tensor& ptr;
  const at::Tensor& perm;
};

// The value checks of the indices and orderings (the CPU launcher's
// functions, so the same errors): every tensor is copied to the host in one
// transfer, the call's one host synchronisation.
void check_values(const char* op, const at::Tensor& mi, const at::Tensor& ri, int64_t N, int64_t M,
                  std::initializer_list<Grouping> groupings) {
  std::vector<at::Tensor> parts{mi.reshape(-1), ri.reshape(-1)};
  for (const Grouping& g : groupings) {
    parts.push_back(g.ptr.reshape(-1));
    parts.push_back(g.perm.reshape(-1));
  }
  const at::Tensor host = at::cat(parts).cpu();
  const int64_t* p = host.data_ptr<int64_t>();
  const int64_t nnz = mi.numel();
  incidence_index_values(op, "metabolite_index", p, nnz, N, "N");
  p += nnz;
  incidence_index_values(op, "reaction_index", p, nnz, M, "M");
  p += nnz;
  for (const Grouping& g : groupings) {
    check_row_pointer(op, g.ptr_name, p, g.ptr.numel() - 1, nnz, "nnz");
    p += g.ptr.numel();
    incidence_perm_values(op, g.perm_name, p, nnz);
    p += g.perm.numel();
  }
}

void check_inputs(const char* op, const at::Tensor& score_v, const at::Tensor& score_e,
                  const at::Tensor& mi, const at::Tensor& ri, const at::Tensor& group_ptr,
                  const at::Tensor& group_perm) {
  check_incidence_scores(op, score_v, score_e, mi, ri, at::kCUDA);
  check_incidence_grouping(op, "group_ptr", "group_perm", group_ptr, group_perm, -1, mi.size(0),
                           score_v, at::kCUDA);
}

struct Inputs {
  at::Tensor sv, se, mi, ri, ptr, perm;
  cuda::IncidenceGeometry geometry;
};

Inputs prepare(const at::Tensor& score_v, const at::Tensor& score_e, const at::Tensor& mi,
               const at::Tensor& ri, const at::Tensor& group_ptr, const at::Tensor& group_perm) {
  Inputs in{score_v.contiguous(), score_e.contiguous(), mi.contiguous(), ri.contiguous(),
            group_ptr.contiguous(), group_perm.contiguous(), {}};
  in.geometry = cuda::IncidenceGeometry{
      in.sv.size(0), in.sv.size(1), in.se.size(1), in.sv.size(2), in.mi.size(0),
      in.ptr.size(0) - 1, in.se.size(0), in.mi.data_ptr<int64_t>(), in.ri.data_ptr<int64_t>(),
      in.ptr.data_ptr<int64_t>(), in.perm.data_ptr<int64_t>()};
  return in;
}

at::Tensor incidence_attention_cuda(const at::Tensor& score_v, const at::Tensor& score_e,
                                    const at::Tensor& metabolite_index,
                                    const at::Tensor& reaction_index,
                                    const std::optional<at::Tensor>& kept_in,
                                    const at::Tensor& group_ptr, const at::Tensor& group_perm,
                                    const at::Tensor& /*metabolite_ptr*/,
                                    const at::Tensor& /*metabolite_perm*/,
                                    const at::Tensor& /*reaction_ptr*/,
                                    const at::Tensor& /*reaction_perm*/, double negative_slope) {
  const char* op = "incidence_attention";
  TORCH_CHECK(score_v.is_cuda(), op, ": tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(score_v.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(score_v.device().index()).stream();
  check_inputs(op, score_v, score_e, metabolite_index, reaction_index, group_ptr, group_perm);
  check_values(op, metabolite_index, reaction_index, score_v.size(1), score_e.size(1),
               {{"group_ptr", "group_perm", group_ptr, group_perm}});
  const int64_t B = score_v.size(0), H = score_v.size(2), nnz = metabolite_index.size(0);
  if (kept_in.has_value()) {
    TORCH_CHECK(kept_in->scalar_type() == at::kBool && kept_in->device() == score_v.device(), op,
                ": `kept` must be a bool CUDA tensor on the device of `score_v`");
    TORCH_CHECK(kept_in->dim() == 2 && kept_in->size(0) == B && kept_in->size(1) == nnz, op,
                ": `kept` must be [B, nnz] = [", B, ", ", nnz, "], got ", kept_in->sizes());
  }
  const Inputs in = prepare(score_v, score_e, metabolite_index, reaction_index, group_ptr, group_perm);
  at::Tensor kept;
  if (kept_in.has_value()) kept = kept_in->contiguous();
  auto alpha = allocate(op, "alpha", {B, nnz, H}, in.sv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.sv.scalar_type(),
                                  "incidence_attention_cuda", [&] {
    check_launch(cuda::launch_incidence_attention_forward<scalar_t>(
                     in.geometry, in.sv.data_ptr<scalar_t>(), in.se.data_ptr<scalar_t>(),
                     kept.defined() ? kept.data_ptr<bool>() : nullptr, negative_slope,
                     alpha.data_ptr<scalar_t>(), stream),
                 op);
  });
  return alpha;
}

std::tuple<at::Tensor, at::Tensor> incidence_attention_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& alpha_in, const at::Tensor& score_v,
    const at::Tensor& score_e, const at::Tensor& metabolite_index,
    const at::Tensor& reaction_index, const at::Tensor& group_ptr, const at::Tensor& group_perm,
    const at::Tensor& metabolite_ptr, const at::Tensor& metabolite_perm,
    const at::Tensor& reaction_ptr, const at::Tensor& reaction_perm, double negative_slope) {
  const char* op = "incidence_attention_backward";
  TORCH_CHECK(score_v.is_cuda(), op, ": tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(score_v.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(score_v.device().index()).stream();
  check_inputs(op, score_v, score_e, metabolite_index, reaction_index, group_ptr, group_perm);
  const int64_t B = score_v.size(0), N = score_v.size(1), M = score_e.size(1);
  const int64_t H = score_v.size(2), nnz = metabolite_index.size(0), Be = score_e.size(0);
  TORCH_CHECK(alpha_in.dim() == 3 && alpha_in.size(0) == B && alpha_in.size(1) == nnz &&
                  alpha_in.size(2) == H && alpha_in.scalar_type() == score_v.scalar_type() &&
                  alpha_in.device() == score_v.device(),
              op, ": `alpha` must be [B, nnz, H] = [", B, ", ", nnz, ", ", H,
              "] of the dtype and device of `score_v`");
  check_group_grad(op, grad_in, alpha_in);
  check_incidence_grouping(op, "metabolite_ptr", "metabolite_perm", metabolite_ptr,
                           metabolite_perm, N, nnz, score_v, at::kCUDA);
  check_incidence_grouping(op, "reaction_ptr", "reaction_perm", reaction_ptr, reaction_perm, M,
                           nnz, score_v, at::kCUDA);
  check_values(op, metabolite_index, reaction_index, N, M,
               {{"group_ptr", "group_perm", group_ptr, group_perm},
                {"metabolite_ptr", "metabolite_perm", metabolite_ptr, metabolite_perm},
                {"reaction_ptr", "reaction_perm", reaction_ptr, reaction_perm}});
  const Inputs in = prepare(score_v, score_e, metabolite_index, reaction_index, group_ptr, group_perm);
  const auto grad = grad_in.contiguous(), alpha = alpha_in.contiguous();
  const auto mptr = metabolite_ptr.contiguous(), mperm = metabolite_perm.contiguous();
  const auto rptr = reaction_ptr.contiguous(), rperm = reaction_perm.contiguous();
  auto grad_v = allocate(op, "grad_score_v", {B, N, H}, in.sv.options());
  auto grad_e = allocate(op, "grad_score_e", {Be, M, H}, in.sv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.sv.scalar_type(),
                                  "incidence_attention_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    auto dpre = allocate(op, "the logit gradients", {B, nnz, H},
                         in.sv.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (dpre.numel() == 0) dpre.zero_();
    check_launch(cuda::launch_incidence_attention_pre_grad<scalar_t, acc_t>(
                     in.geometry, grad.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
                     in.sv.data_ptr<scalar_t>(), in.se.data_ptr<scalar_t>(), negative_slope,
                     dpre.data_ptr<acc_t>(), stream),
                 op);
    check_launch(cuda::launch_incidence_row_sums<scalar_t, acc_t>(
                     dpre.data_ptr<acc_t>(), mptr.data_ptr<int64_t>(), mperm.data_ptr<int64_t>(),
                     B, 1, N, nnz, H, grad_v.data_ptr<scalar_t>(), stream),
                 op);
    check_launch(cuda::launch_incidence_row_sums<scalar_t, acc_t>(
                     dpre.data_ptr<acc_t>(), rptr.data_ptr<int64_t>(), rperm.data_ptr<int64_t>(),
                     Be, Be == 1 ? B : 1, M, nnz, H, grad_e.data_ptr<scalar_t>(), stream),
                 op);
  });
  return {grad_v, grad_e};
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CUDA, m) {
  m.impl("incidence_attention", &incidence_attention_cuda);
  m.impl("incidence_attention_backward", &incidence_attention_backward_cuda);
}

}  // namespace stoichconv
