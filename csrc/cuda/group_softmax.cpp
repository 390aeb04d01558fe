// CUDA dispatch of the grouped softmax over incidences: argument checks (the
// CPU launcher's errors, stoichconv/group_softmax_checks.h), allocation and
// the current stream; the kernels live in group_softmax_kernels.cu behind the
// torch-free launch functions of stoichconv/group_softmax_cuda.h.  Only c10/cuda
// headers (not ATen/cuda/CUDAContext.h, which needs cusparse.h).
//
// Host synchronisation: one per call, to read the device-side validation of
// group_ptr / group_perm (so that a hand-made ordering raises the CPU kernel's
// error instead of reading out of bounds or leaving entries unwritten).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "stoichconv/csr_checks.h"
#include "stoichconv/group_softmax_checks.h"
#include "stoichconv/group_softmax_cuda.h"
#include "stoichconv/size_checks.h"

namespace stoichconv {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The one dtype dispatch of this file (the storage types instantiated in
// group_softmax_kernels.cu: float16, bfloat16, float32, float64;
// check_group_structure admits the same).
template <typename F>
void dispatch_floating(at::ScalarType type, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "group_softmax_cuda",
                                  [&] { f(scalar_t(0)); });
}

// The contiguous ordering of one call, kept alive, and its device view.
struct Groups {
  at::Tensor ptr, perm;
  cuda::GroupGeometry geometry;
};

// Validates the values of group_ptr / group_perm on the device and raises the
// CPU kernel's error for the first bad one (one host synchronisation).
void validate_groups(const char* op, const cuda::GroupGeometry& g, const at::Tensor& perm,
                     cudaStream_t stream) {
  const auto opts = perm.options();
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  auto status = at::full({cuda::kGroupStatusSize}, kNone, opts);
  auto first_pos = at::full({std::max<int64_t>(g.nnz, 1)}, kNone, opts);
  check_launch(cuda::launch_validate_groups(g, status.data_ptr<int64_t>(),
                                            first_pos.data_ptr<int64_t>(), stream),
               op);
  const auto host = status.cpu();
  const int64_t* st = host.data_ptr<int64_t>();
  if (st[0] != 0) {  // witness of bad ends: the same message as the CPU check
    const int64_t w[2] = {1, 0};
    check_row_pointer(op, "group_ptr", w, 1, g.nnz, "nnz");
  }
  if (st[1] != kNone) {  // witness of a decrease
    const int64_t w[3] = {0, 1, 0};
    check_row_pointer(op, "group_ptr", w, 2, 0, "nnz");
  }
  if (st[2] != kNone) {  // the first bad entry: out of range, else a repeat
    const int64_t id = perm[st[2]].item<int64_t>();
    const int64_t w[2] = {id, id};
    check_group_perm_values(op, w, id >= 0 && id < g.nnz ? 2 : 1, g.nnz);
  }
  TORCH_CHECK(st[0] == 0 && st[1] == kNone && st[2] == kNone, op,
              ": invalid `group_ptr` / `group_perm`");
}

Groups prepare_groups(const char* op, const char* name, const at::Tensor& values,
                      const at::Tensor& group_ptr, const at::Tensor& group_perm,
                      cudaStream_t stream) {
  check_group_structure(op, name, values, group_ptr, group_perm, at::kCUDA);
  Groups groups{group_ptr.contiguous(), group_perm.contiguous(), {}};
  groups.geometry = cuda::GroupGeometry{values.size(0), values.size(1), values.size(2),
                                        group_ptr.size(0) - 1, groups.ptr.data_ptr<int64_t>(),
                                        groups.perm.data_ptr<int64_t>()};
  validate_groups(op, groups.geometry, groups.perm, stream);
  return groups;
}

at::Tensor group_softmax_cuda(const at::Tensor& logits_in, const std::optional<at::Tensor>& kept_in,
                              const at::Tensor& group_ptr, const at::Tensor& group_perm) {
  const char* op = "group_softmax";
  TORCH_CHECK(logits_in.is_cuda(), op, ": tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits_in.device().index()).stream();
  const Groups groups = prepare_groups(op, "logits", logits_in, group_ptr, group_perm, stream);
  check_group_kept(op, kept_in, logits_in, at::kCUDA);
  const auto logits = logits_in.contiguous();
  at::Tensor kept;
  if (kept_in.has_value()) kept = kept_in->contiguous();
  // Every entry is written: group_perm is a permutation.
  auto alpha = allocate(op, "alpha", logits.sizes(), logits.options());
  dispatch_floating(logits.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    check_launch(cuda::launch_group_softmax_forward<scalar_t>(
                     groups.geometry, logits.data_ptr<scalar_t>(),
                     kept.defined() ? kept.data_ptr<bool>() : nullptr, alpha.data_ptr<scalar_t>(),
                     stream),
                 op);
  });
  return alpha;
}

at::Tensor group_softmax_backward_cuda(const at::Tensor& grad_in, const at::Tensor& alpha_in,
                                       const at::Tensor& group_ptr, const at::Tensor& group_perm) {
  const char* op = "group_softmax_backward";
  TORCH_CHECK(alpha_in.is_cuda(), op, ": tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(alpha_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(alpha_in.device().index()).stream();
  const Groups groups = prepare_groups(op, "alpha", alpha_in, group_ptr, group_perm, stream);
  check_group_grad(op, grad_in, alpha_in);
  const auto grad = grad_in.contiguous(), alpha = alpha_in.contiguous();
  auto grad_logits = allocate(op, "grad_logits", alpha.sizes(), alpha.options());
  dispatch_floating(alpha.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    check_launch(cuda::launch_group_softmax_backward<scalar_t>(
                     groups.geometry, grad.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
                     grad_logits.data_ptr<scalar_t>(), stream),
                 op);
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CUDA, m) {
  m.impl("group_softmax", &group_softmax_cuda);
  m.impl("group_softmax_backward", &group_softmax_backward_cuda);
}

}  // namespace stoichconv
