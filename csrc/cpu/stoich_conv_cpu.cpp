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
  TORCH_CHECK(s.reaction_ptr[0] == 0 && s.reaction_ptr[s.M] == s.nnz,
              "stoich_conv: `reaction_ptr` must start at 0 and end at nnz = ", s.nnz);
  TORCH_CHECK(s.metabolite_ptr[0] == 0 && s.metabolite_ptr[s.N] == s.nnz,
              "stoich_conv: `metabolite_ptr` must start at 0 and end at nnz = ", s.nnz);
  for (int64_t e = 0; e < s.M; ++e)
    TORCH_CHECK(s.reaction_ptr[e] <= s.reaction_ptr[e + 1],
                "stoich_conv: `reaction_ptr` must be non-decreasing");
  for (int64_t v = 0; v < s.N; ++v)
    TORCH_CHECK(s.metabolite_ptr[v] <= s.metabolite_ptr[v + 1],
                "stoich_conv: `metabolite_ptr` must be non-decreasing");
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

// node_norm [Bn, N], edge_norm [Bn, M] from |s| of the kept incidences.
template <typename scalar_t>
void degree_norms(const Structure& s, const scalar_t* abs_stoich, const bool* keep, int64_t Bn,
                  scalar_t* node_norm, scalar_t* edge_norm) {
  at::parallel_for(0, Bn * s.M, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.M, e = row % s.M;
      scalar_t sum = 0;
      if (incidence_kept(keep, b, s.M, e))
        for (int64_t j = s.reaction_ptr[e]; j < s.reaction_ptr[e + 1]; ++j)
          sum += abs_stoich[s.reaction_perm[j]];
      edge_norm[row] = degree_norm(sum);
    }
  });
  at::parallel_for(0, Bn * s.N, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.N, v = row % s.N;
      scalar_t sum = 0;
      for (int64_t j = s.metabolite_ptr[v]; j < s.metabolite_ptr[v + 1]; ++j) {
        const int64_t k = s.metabolite_perm[j];
        if (incidence_kept(keep, b, s.M, s.reaction_index[k])) sum += abs_stoich[k];
      }
      node_norm[row] = degree_norm(sum);
    }
  });
}

// dst[b, e] = (init ? init[b, e] : 0) + row_scale(b, e) *
//             sum_{k in CSR row e} coef(b, k, h) * src[b, other(k), h]
// for every (b, e, h) row of C channels; `other` maps an incidence to the row
// of `src` it gathers.  Both forward stages and both backward reductions are
// instances of this one segment reduction.
template <typename scalar_t, typename Other, typename Coef, typename Scale>
void segment_reduce(int64_t B, int64_t rows, int64_t src_rows, int64_t H, int64_t C,
                    const int64_t* ptr, const int64_t* perm, const scalar_t* src,
                    const scalar_t* init, scalar_t* dst, Other other, Coef coef,
                    Scale row_scale) {
  const int64_t row_size = H * C;
  at::parallel_for(0, B * rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rows, r = row % rows;
      scalar_t* out = dst + row * row_size;
      for (int64_t i = 0; i < row_size; ++i) out[i] = scalar_t(0);
      const scalar_t scale = row_scale(b, r);
      if (scale != scalar_t(0)) {
        for (int64_t j = ptr[r]; j < ptr[r + 1]; ++j) {
          const int64_t k = perm[j];
          const scalar_t* src_row = src + (b * src_rows + other(k)) * row_size;
          for (int64_t h = 0; h < H; ++h)
            axpy_row(out + h * C, coef(b, k, h), src_row + h * C, C);
        }
        scale_row(out, scale, row_size);
      }
      if (init != nullptr) axpy_row(out, scalar_t(1), init + row * row_size, row_size);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stoich_conv_forward_cpu(
    const at::Tensor& y_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& reaction_keep, const at::Tensor& metabolite_index,
    const at::Tensor& reaction_index, const at::Tensor& abs_stoich,
    const at::Tensor& reaction_ptr, const at::Tensor& reaction_perm,
    const at::Tensor& metabolite_ptr, const at::Tensor& metabolite_perm) {
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
  auto hidden = at::empty({B, M, H, C}, y.options());
  auto node_norm = at::empty({Bn, N}, y.options());
  auto edge_norm = at::empty({Bn, M}, y.options());

  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stoich_conv_forward_cpu", [&] {
    const auto abs_s = abs_stoich.contiguous();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* dn = node_norm.data_ptr<scalar_t>();
    const scalar_t* en = edge_norm.data_ptr<scalar_t>();
    degree_norms(s, abs_s.data_ptr<scalar_t>(), keep_ptr, Bn, node_norm.data_ptr<scalar_t>(),
                 edge_norm.data_ptr<scalar_t>());
    // Stage 1, metabolite -> reaction: h[b,e] = B_e * sum_k w_k y[b, v_k]
    segment_reduce<scalar_t>(
        B, M, N, H, C, s.reaction_ptr, s.reaction_perm, y.data_ptr<scalar_t>(), nullptr,
        hidden.data_ptr<scalar_t>(), [&](int64_t k) { return s.metabolite_index[k]; },
        [&](int64_t b, int64_t k, int64_t h) { return w[(b * nnz + k) * H + h]; },
        [&](int64_t b, int64_t e) { return en[(keep_ptr ? b : 0) * M + e]; });
    // Stage 2, reaction -> metabolite: out[b,v] = D_v * sum_k w_k h[b, e_k]
    segment_reduce<scalar_t>(
        B, N, M, H, C, s.metabolite_ptr, s.metabolite_perm, hidden.data_ptr<scalar_t>(),
        nullptr, out.data_ptr<scalar_t>(), [&](int64_t k) { return s.reaction_index[k]; },
        [&](int64_t b, int64_t k, int64_t h) {
          return incidence_kept(keep_ptr, b, M, s.reaction_index[k])
                     ? w[(b * nnz + k) * H + h]
                     : scalar_t(0);
        },
        [&](int64_t b, int64_t v) { return dn[(keep_ptr ? b : 0) * N + v]; });
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

  // R[b,e] = dL/dh[b,e] = grad_hidden[b,e] + sum_{k in e} w_k D_{v_k} G[b, v_k]
  auto reaction_grad = at::empty({B, M, H, C}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stoich_conv_backward_cpu", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* dn = node_norm.data_ptr<scalar_t>();
    const scalar_t* en = edge_norm.data_ptr<scalar_t>();
    const scalar_t* G = grad_out.data_ptr<scalar_t>();
    const scalar_t* R = reaction_grad.data_ptr<scalar_t>();
    const scalar_t* Y = y.data_ptr<scalar_t>();
    const scalar_t* Hd = hidden.data_ptr<scalar_t>();
    auto norm_b = [&](int64_t b) { return keep_ptr ? b : int64_t(0); };
    segment_reduce<scalar_t>(
        B, M, N, H, C, s.reaction_ptr, s.reaction_perm, G,
        grad_hidden.defined() ? grad_hidden.data_ptr<scalar_t>() : nullptr,
        reaction_grad.data_ptr<scalar_t>(), [&](int64_t k) { return s.metabolite_index[k]; },
        [&](int64_t b, int64_t k, int64_t h) {
          return w[(b * nnz + k) * H + h] * dn[norm_b(b) * N + s.metabolite_index[k]];
        },
        [&](int64_t b, int64_t e) {
          return incidence_kept(keep_ptr, b, M, e) ? scalar_t(1) : scalar_t(0);
        });
    if (need_grad_y) {
      // dL/dY[b,u] = sum_{k: v_k = u} w_k B_{e_k} R[b, e_k]
      segment_reduce<scalar_t>(
          B, N, M, H, C, s.metabolite_ptr, s.metabolite_perm, R, nullptr,
          grad_y.data_ptr<scalar_t>(), [&](int64_t k) { return s.reaction_index[k]; },
          [&](int64_t b, int64_t k, int64_t h) {
            const int64_t e = s.reaction_index[k];
            return incidence_kept(keep_ptr, b, M, e)
                       ? w[(b * nnz + k) * H + h] * en[norm_b(b) * M + e]
                       : scalar_t(0);
          },
          [](int64_t, int64_t) { return scalar_t(1); });
    }
    if (need_grad_weight) {
      // dL/dw_k = D_v <G_v, h_e> + B_e <R_e, Y_v>, 0 for masked incidences.
      scalar_t* gw = grad_weight.data_ptr<scalar_t>();
      const int64_t row_size = H * C;
      at::parallel_for(0, B * nnz, kGrain * 8, [&](int64_t begin, int64_t end) {
        for (int64_t idx = begin; idx < end; ++idx) {
          const int64_t b = idx / nnz, k = idx % nnz;
          const int64_t v = s.metabolite_index[k], e = s.reaction_index[k];
          const bool kept = incidence_kept(keep_ptr, b, M, e);
          const scalar_t d = dn[norm_b(b) * N + v], be = en[norm_b(b) * M + e];
          for (int64_t h = 0; h < H; ++h) {
            gw[idx * H + h] =
                kept ? incidence_weight_grad(d, G + (b * N + v) * row_size + h * C,
                                             Hd + (b * M + e) * row_size + h * C, be,
                                             R + (b * M + e) * row_size + h * C,
                                             Y + (b * N + v) * row_size + h * C, C)
                     : scalar_t(0);
          }
        }
      });
    }
  });
  return {grad_y, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CPU, m) {
  m.impl("stoich_conv_forward", &stoich_conv_forward_cpu);
  m.impl("stoich_conv_backward", &stoich_conv_backward_cpu);
}

}  // namespace stoichconv
