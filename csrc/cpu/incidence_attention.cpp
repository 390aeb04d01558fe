// C++ CPU kernels of the fused incidence attention (semantics and dtypes:
// stoichconv.ops.incidence_attention docstring): the score gathers, the leaky
// ReLU and the grouped softmax of the stoich conv layer's attention in one op.
//
// Forward: one task per (sample, group) rows of the CSR ordering (`group_ptr`,
// `group_perm`), the metabolite / reaction indices gathered into that order
// once per call: the logits of a task's rows of one sample are built from the
// two scores into a contiguous span (CSR order), the leaky ReLU runs over the
// span in one vectorised loop, each row is shifted by its kept maximum; then
// one vectorised exp over the whole tensor (ATen's), then the row sums and the
// scaling in the CSR order, stored to alpha through `group_perm`.
// Backward: the same rows give d pre = alpha (g - dot) leaky_relu'(pre) into
// an acc_t [B, nnz, H] buffer (leaky_relu' over contiguous spans as well); in
// node mode (the softmax grouping is the reaction grouping) the reaction sums
// are accumulated with it, one task per block of reactions with every sample
// in ascending order; otherwise one task per (sample or the whole batch,
// reaction) row sums it in CSR order (the batch outer, ascending), as one task
// per metabolite does for the metabolite grouping (4 samples' chains at once).
// H = 1, 2, 4 are compiled as constants.  Every sum runs in the same order as
// a plain loop over the CSR rows: results are bit-identical for any thread
// count, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "stoichconv/accumulate_type.h"
#include "stoichconv/csr_checks.h"
#include "stoichconv/group_softmax_checks.h"
#include "stoichconv/incidence_attention_checks.h"
#include "stoichconv/incidence_attention_math.h"
#include "stoichconv/size_checks.h"

namespace stoichconv {
namespace {

constexpr int64_t kRowGrain = 64;  // rows per task

// The structure and values of one CSR grouping of the nnz incidences.
void check_grouping_values(const char* op, const char* ptr_name, const char* perm_name,
                           const at::Tensor& ptr_in, const at::Tensor& perm_in, int64_t rows,
                           int64_t nnz, const at::Tensor& like) {
  check_incidence_grouping(op, ptr_name, perm_name, ptr_in, perm_in, rows, nnz, like, at::kCPU);
  const auto ptr = ptr_in.contiguous(), perm = perm_in.contiguous();
  check_row_pointer(op, ptr_name, ptr.data_ptr<int64_t>(), ptr.size(0) - 1, nnz, "nnz");
  incidence_perm_values(op, perm_name, perm.data_ptr<int64_t>(), nnz);
}

// Scores, indices (values in range) and the softmax grouping.
void check_inputs(const char* op, const at::Tensor& score_v, const at::Tensor& score_e,
                  const at::Tensor& mi, const at::Tensor& ri, const at::Tensor& group_ptr,
                  const at::Tensor& group_perm) {
  check_incidence_scores(op, score_v, score_e, mi, ri, at::kCPU);
  const int64_t nnz = mi.size(0);
  incidence_index_values(op, "metabolite_index", mi.contiguous().data_ptr<int64_t>(), nnz,
                         score_v.size(1), "N");
  incidence_index_values(op, "reaction_index", ri.contiguous().data_ptr<int64_t>(), nnz,
                         score_e.size(1), "M");
  check_grouping_values(op, "group_ptr", "group_perm", group_ptr, group_perm, -1, nnz, score_v);
}

struct Scores {
  int64_t B, N, M, H, nnz, G, Be;
  const int64_t *mi, *ri, *ptr, *perm;
};

// H as a compile-time constant for the common head counts (kH = 1, 2, 4: the
// per-head loops unroll and the per-row statistics live in registers), at run
// time otherwise (kH = 0).  with_heads(H, fn) calls fn(std::integral_constant<int, kH>).
template <typename F>
void with_heads(int64_t H, F&& fn) {
  switch (H) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    default: return fn(std::integral_constant<int, 0>{});
  }
}

// The per-head statistics of one row (a max, a sum): a fixed array for a
// compile-time H, one vector per task otherwise.
template <typename T, int kH>
struct HeadBuf {
  explicit HeadBuf(int64_t) {}
  T v[kH];
  T* data() { return v; }
};
template <typename T>
struct HeadBuf<T, 0> {
  explicit HeadBuf(int64_t H) : v(H) {}
  std::vector<T> v;
  T* data() { return v.data(); }
};

// Calls fn(b, g, j0, j1) for the rows [begin, end) of the (sample, group)
// rows b * G + g in order, without a division per row.
template <typename F>
inline void for_rows(int64_t begin, int64_t end, int64_t G, const int64_t* ptr, F&& fn) {
  if (G <= 0) return;
  int64_t b = begin / G, g = begin % G;
  for (int64_t row = begin; row < end; ++row) {
    fn(b, g, ptr[g], ptr[g + 1]);
    if (++g == G) g = 0, ++b;
  }
}

// Calls fn(b, g0, g1) for the rows [begin, end) of the (sample, group) rows
// b * G + g, one call per sample: the groups [g0, g1) of sample b, whose
// entries are the contiguous CSR positions [ptr[g0], ptr[g1]).
template <typename F>
inline void for_segments(int64_t begin, int64_t end, int64_t G, F&& fn) {
  if (G <= 0) return;
  for (int64_t row = begin; row < end;) {
    const int64_t b = row / G, g0 = row % G, g1 = std::min(G, g0 + (end - row));
    fn(b, g0, g1);
    row += g1 - g0;
  }
}

// The index arrays of the incidences in the CSR order of the grouping,
// gathered once per call (not once per sample): mi_csr[j] = mi[perm[j]] (and ri).
struct CsrIndices {
  std::vector<int64_t> mi, ri;
  bool identity;  // perm[j] == j
};

CsrIndices csr_indices(const Scores& s) {
  CsrIndices c{std::vector<int64_t>(s.nnz), std::vector<int64_t>(s.nnz), true};
  for (int64_t j = 0; j < s.nnz; ++j) {
    const int64_t k = s.perm[j];
    c.mi[j] = s.mi[k];
    c.ri[j] = s.ri[k];
    c.identity = c.identity && k == j;
  }
  return c;
}

// Pass 1 of the forward: the logits of each (sample, group) row gathered from
// the two scores, the row's kept maximum and the shifted logits (-inf where
// not kept or the group is empty), stored in the CSR order of the row,
// `shifted` [B, nnz, H] (acc_t; alpha itself for float32 / float64 when
// group_perm is the identity).  Then one vectorised exp over the whole tensor
// (ATen's) and normalize_rows, as in csrc/cpu/group_softmax.cpp.
// The logits of a task's rows of one sample are contiguous: gathered as
// score_v + score_e first, then leaky_relu over the whole span in one loop
// (vectorised, no branch per entry: incidence_logit split in its two steps),
// then per row the kept maximum, a masked entry set to -inf on the way, so
// that group_shifted_logit(-inf, m, true) = -inf = group_shifted_logit(l, m, false).
template <int kH, typename scalar_t, typename acc_t>
void shifted_logits(const Scores& s, const CsrIndices& c, const scalar_t* sv, const scalar_t* se,
                    const bool* kept, acc_t slope, acc_t* shifted) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t H = kH > 0 ? kH : s.H;
  const int64_t N = s.N, M = s.M, nnz = s.nnz, Be = s.Be;
  const int64_t *ptr = s.ptr, *perm = s.perm, *mi = c.mi.data(), *ri = c.ri.data();
  at::parallel_for(0, s.B * s.G, kRowGrain, [&](int64_t begin, int64_t end) {
    HeadBuf<acc_t, kH> gmax_buf(H);
    acc_t* gmax = gmax_buf.data();
    for_segments(begin, end, s.G, [&](int64_t b, int64_t g0, int64_t g1) {
      const scalar_t* sv_b = sv + b * N * H;
      const scalar_t* se_b = se + (Be == 1 ? 0 : b) * M * H;
      const bool* kept_b = kept ? kept + b * nnz : nullptr;
      acc_t* x_b = shifted + b * nnz * H;
      const int64_t s0 = ptr[g0], s1 = ptr[g1];
      for (int64_t j = s0; j < s1; ++j) {
        const scalar_t* v = sv_b + mi[j] * H;
        const scalar_t* e = se_b + ri[j] * H;
        acc_t* x = x_b + j * H;
        for (int64_t h = 0; h < H; ++h) x[h] = acc_t(v[h]) + acc_t(e[h]);
      }
      acc_t* span = x_b + s0 * H;
      for (int64_t i = 0, n = (s1 - s0) * H; i < n; ++i) span[i] = leaky_relu(span[i], slope);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t j0 = ptr[g], j1 = ptr[g + 1];
        for (int64_t h = 0; h < H; ++h) gmax[h] = kNegInf;
        for (int64_t j = j0; j < j1; ++j) {
          acc_t* x = x_b + j * H;
          if (!kept_b || kept_b[perm[j]]) {
            for (int64_t h = 0; h < H; ++h) gmax[h] = group_max_update(gmax[h], x[h]);
          } else {
            for (int64_t h = 0; h < H; ++h) x[h] = kNegInf;  // not kept: exp gives 0
          }
        }
        for (int64_t j = j0; j < j1; ++j) {
          acc_t* x = x_b + j * H;
          for (int64_t h = 0; h < H; ++h) x[h] = group_shifted_logit(x[h], gmax[h], true);
        }
      }
    });
  });
}

// alpha[b, perm[j]] = exps[b, j] * (1 / group sum of exps), the sum in CSR
// order; `exps` (CSR order) may be alpha itself when perm is the identity.
template <int kH, typename scalar_t, typename acc_t>
void normalize_rows(const Scores& s, const acc_t* exps, scalar_t* alpha) {
  const int64_t H = kH > 0 ? kH : s.H, nnz = s.nnz;
  const int64_t* perm = s.perm;
  at::parallel_for(0, s.B * s.G, kRowGrain, [&](int64_t begin, int64_t end) {
    HeadBuf<acc_t, kH> denom_buf(H);
    acc_t* denom = denom_buf.data();
    for_rows(begin, end, s.G, s.ptr, [&](int64_t b, int64_t, int64_t j0, int64_t j1) {
      const acc_t* x_b = exps + b * nnz * H;
      scalar_t* a_b = alpha + b * nnz * H;
      for (int64_t h = 0; h < H; ++h) denom[h] = acc_t(0);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t h = 0; h < H; ++h) denom[h] += x_b[j * H + h];
      for (int64_t h = 0; h < H; ++h) denom[h] = group_inverse_denominator(denom[h]);
      for (int64_t j = j0; j < j1; ++j) {
        const acc_t* x = x_b + j * H;
        scalar_t* a = a_b + perm[j] * H;
        for (int64_t h = 0; h < H; ++h) a[h] = static_cast<scalar_t>(x[h] * denom[h]);
      }
    });
  });
}

// The logit gradients of the groups [g0, g1) of sample b:
// dpre[b, perm[j]] = alpha (g - dot) leaky_relu'(pre) (acc_t [B, nnz, H]).
// incidence_pre_grad in its two steps: leaky_relu_grad of the contiguous span
// of pre = score_v + score_e first (`factor`, one vectorised loop, no branch
// per entry), then per row the dot sum and softmax_grad * factor.  With `sums`,
// the row's entries are also added to sums[(g - g0) * H + h] in CSR order.
template <int kH, typename scalar_t, typename acc_t>
inline void pre_grad_segment(const Scores& s, const CsrIndices& c, int64_t b, int64_t g0,
                             int64_t g1, const scalar_t* grad, const scalar_t* alpha,
                             const scalar_t* sv, const scalar_t* se, acc_t slope,
                             std::vector<acc_t>& factor, acc_t* dpre, acc_t* sums) {
  const int64_t H = kH > 0 ? kH : s.H;
  HeadBuf<acc_t, kH> dot_buf(H), run_buf(H);
  acc_t *dot = dot_buf.data(), *run = run_buf.data();
  const int64_t off = b * s.nnz * H;
  const int64_t *ptr = s.ptr, *perm = s.perm, *mi = c.mi.data(), *ri = c.ri.data();
  const scalar_t* sv_b = sv + b * s.N * H;
  const scalar_t* se_b = se + (s.Be == 1 ? 0 : b) * s.M * H;
  const scalar_t *a_b = alpha + off, *g_b = grad + off;
  acc_t* d_b = dpre + off;
  const int64_t s0 = ptr[g0], s1 = ptr[g1], n = (s1 - s0) * H;
  if (static_cast<int64_t>(factor.size()) < n) factor.resize(n);
  acc_t* f = factor.data() - s0 * H;  // f[j * H + h] for j in [s0, s1)
  for (int64_t j = s0; j < s1; ++j) {
    const scalar_t* v = sv_b + mi[j] * H;
    const scalar_t* e = se_b + ri[j] * H;
    for (int64_t h = 0; h < H; ++h) f[j * H + h] = acc_t(v[h]) + acc_t(e[h]);
  }
  for (int64_t i = 0; i < n; ++i) factor[i] = leaky_relu_grad(factor[i], slope);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t j0 = ptr[g], j1 = ptr[g + 1];
    for (int64_t h = 0; h < H; ++h) dot[h] = acc_t(0);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t i = perm[j] * H;
      for (int64_t h = 0; h < H; ++h) dot[h] += acc_t(a_b[i + h]) * acc_t(g_b[i + h]);
    }
    if (sums == nullptr) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t i = perm[j] * H;
        for (int64_t h = 0; h < H; ++h)
          d_b[i + h] = softmax_grad(acc_t(a_b[i + h]), acc_t(g_b[i + h]), dot[h]) * f[j * H + h];
      }
      continue;
    }
    // the running sums in a local (registers for a compile-time H), not
    // through memory that the stores to dpre might alias
    acc_t* sum = sums + (g - g0) * H;
    for (int64_t h = 0; h < H; ++h) run[h] = sum[h];
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t i = perm[j] * H;
      for (int64_t h = 0; h < H; ++h) {
        const acc_t d = softmax_grad(acc_t(a_b[i + h]), acc_t(g_b[i + h]), dot[h]) * f[j * H + h];
        d_b[i + h] = d;
        run[h] += d;
      }
    }
    for (int64_t h = 0; h < H; ++h) sum[h] = run[h];
  }
}

// dpre [B, nnz, H] (acc_t) from grad, alpha and the scores, one task per
// (sample, group) rows.  With `grad_e` (node mode: the softmax grouping is the
// reaction grouping) the tasks are groups (reactions) with every sample, the
// samples in ascending order, and the reaction sums come with dpre, in the
// order of row_sums (the batch outer and ascending, the row in CSR order).
template <int kH, typename scalar_t>
void pre_grad_kernel(const Scores& s, const CsrIndices& c, const scalar_t* grad,
                     const scalar_t* alpha, const scalar_t* sv, const scalar_t* se,
                     acc_type<scalar_t> slope, acc_type<scalar_t>* dpre, scalar_t* grad_e) {
  using acc_t = acc_type<scalar_t>;
  const int64_t H = kH > 0 ? kH : s.H, B = s.B;
  if (grad_e == nullptr) {
    at::parallel_for(0, B * s.G, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> factor;
      for_segments(begin, end, s.G, [&](int64_t b, int64_t g0, int64_t g1) {
        pre_grad_segment<kH>(s, c, b, g0, g1, grad, alpha, sv, se, slope, factor, dpre,
                             static_cast<acc_t*>(nullptr));
      });
    });
    return;
  }
  at::parallel_for(0, s.G, kRowGrain, [&](int64_t g0, int64_t g1) {
    std::vector<acc_t> factor, sums((g1 - g0) * H);
    // per sample (score_e [B, M, H]) or over the batch (score_e [1, M, H])
    const int64_t per = s.Be == 1 ? B : 1;
    for (int64_t o = 0; o < s.Be; ++o) {
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t b = o * per; b < o * per + per; ++b)
        pre_grad_segment<kH>(s, c, b, g0, g1, grad, alpha, sv, se, slope, factor, dpre,
                             sums.data());
      scalar_t* y = grad_e + (o * s.G + g0) * H;
      for (int64_t i = 0; i < (g1 - g0) * H; ++i) y[i] = static_cast<scalar_t>(sums[i]);
    }
  });
}

// out[o, r, h] = sum_{b in [o * per, o * per + per)} sum_{j in row r} src[b, perm[j], h]
// (per = 1: one output sample per sample; per = B: summed over the batch), the
// batch outer and ascending, the row in CSR order.
// For one output per sample and a compile-time H, the rows r of kSamples
// samples at once: kSamples independent chains of adds (each in the order
// above) that share the index loads, instead of one chain at a time.
template <int kH, typename scalar_t, typename acc_t>
void row_sums(const acc_t* src, const int64_t* ptr, const int64_t* perm, int64_t outs, int64_t per,
              int64_t R, int64_t nnz, int64_t H_in, scalar_t* out) {
  const int64_t H = kH > 0 ? kH : H_in;
  constexpr int64_t kSamples = 4;
  if (kH > 0 && per == 1 && outs >= kSamples) {
    const int64_t stride = nnz * H;
    at::parallel_for(0, R, std::max<int64_t>(1, kRowGrain / outs), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t j0 = ptr[r], j1 = ptr[r + 1];
        int64_t b = 0;
        for (; b + kSamples <= outs; b += kSamples) {
          acc_t acc[kSamples][kH > 0 ? kH : 1] = {};
          const acc_t* src_b = src + b * stride;
          for (int64_t j = j0; j < j1; ++j) {
            const acc_t* x = src_b + perm[j] * H;
            for (int64_t q = 0; q < kSamples; ++q)
              for (int64_t h = 0; h < kH; ++h) acc[q][h] += x[q * stride + h];
          }
          for (int64_t q = 0; q < kSamples; ++q)
            for (int64_t h = 0; h < kH; ++h)
              out[((b + q) * R + r) * H + h] = static_cast<scalar_t>(acc[q][h]);
        }
        for (; b < outs; ++b) {
          acc_t acc[kH > 0 ? kH : 1] = {};
          const acc_t* src_b = src + b * stride;
          for (int64_t j = j0; j < j1; ++j)
            for (int64_t h = 0; h < kH; ++h) acc[h] += src_b[perm[j] * H + h];
          for (int64_t h = 0; h < kH; ++h) out[(b * R + r) * H + h] = static_cast<scalar_t>(acc[h]);
        }
      }
    });
    return;
  }
  at::parallel_for(0, outs * R, kRowGrain, [&](int64_t begin, int64_t end) {
    HeadBuf<acc_t, kH> acc_buf(H);
    acc_t* acc = acc_buf.data();
    for_rows(begin, end, R, ptr, [&](int64_t o, int64_t r, int64_t j0, int64_t j1) {
      for (int64_t h = 0; h < H; ++h) acc[h] = acc_t(0);
      for (int64_t b = o * per; b < o * per + per; ++b) {
        const acc_t* src_b = src + b * nnz * H;
        for (int64_t j = j0; j < j1; ++j) {
          const acc_t* x = src_b + perm[j] * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += x[h];
        }
      }
      scalar_t* y = out + (o * R + r) * H;
      for (int64_t h = 0; h < H; ++h) y[h] = static_cast<scalar_t>(acc[h]);
    });
  });
}

Scores make_scores(const at::Tensor& sv, const at::Tensor& se, const at::Tensor& mi,
                   const at::Tensor& ri, const at::Tensor& ptr, const at::Tensor& perm) {
  return Scores{sv.size(0), sv.size(1), se.size(1), sv.size(2), mi.size(0), ptr.size(0) - 1,
                se.size(0), mi.data_ptr<int64_t>(), ri.data_ptr<int64_t>(),
                ptr.data_ptr<int64_t>(), perm.data_ptr<int64_t>()};
}

at::Tensor incidence_attention_cpu(const at::Tensor& score_v_in, const at::Tensor& score_e_in,
                                   const at::Tensor& metabolite_index,
                                   const at::Tensor& reaction_index,
                                   const std::optional<at::Tensor>& kept_in,
                                   const at::Tensor& group_ptr, const at::Tensor& group_perm,
                                   const at::Tensor& /*metabolite_ptr*/,
                                   const at::Tensor& /*metabolite_perm*/,
                                   const at::Tensor& /*reaction_ptr*/,
                                   const at::Tensor& /*reaction_perm*/, double negative_slope) {
  const char* op = "incidence_attention";
  check_inputs(op, score_v_in, score_e_in, metabolite_index, reaction_index, group_ptr, group_perm);
  const int64_t B = score_v_in.size(0), H = score_v_in.size(2), nnz = metabolite_index.size(0);
  if (kept_in.has_value()) {
    TORCH_CHECK(kept_in->scalar_type() == at::kBool && kept_in->device().is_cpu(), op,
                ": `kept` must be a bool CPU tensor");
    TORCH_CHECK(kept_in->dim() == 2 && kept_in->size(0) == B && kept_in->size(1) == nnz, op,
                ": `kept` must be [B, nnz] = [", B, ", ", nnz, "], got ", kept_in->sizes());
  }
  const auto sv = score_v_in.contiguous(), se = score_e_in.contiguous();
  const auto mi = metabolite_index.contiguous(), ri = reaction_index.contiguous();
  const auto ptr = group_ptr.contiguous(), perm = group_perm.contiguous();
  at::Tensor kept;
  if (kept_in.has_value()) kept = kept_in->contiguous();
  // every entry written: group_perm is a permutation
  auto alpha = allocate(op, "alpha", {B, nnz, H}, sv.options());
  const Scores s = make_scores(sv, se, mi, ri, ptr, perm);
  const CsrIndices c = csr_indices(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sv.scalar_type(),
                                  "incidence_attention_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    // the shifted logits in CSR order: alpha itself when that is alpha's order and dtype
    const at::Tensor exps =
        std::is_same<acc_t, scalar_t>::value && c.identity
            ? alpha
            : allocate(op, "the shifted logits", {B, nnz, H},
                       sv.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    with_heads(H, [&](auto heads) {
      constexpr int kH = decltype(heads)::value;
      shifted_logits<kH, scalar_t, acc_t>(s, c, sv.data_ptr<scalar_t>(), se.data_ptr<scalar_t>(),
                                          kept.defined() ? kept.data_ptr<bool>() : nullptr,
                                          static_cast<acc_t>(negative_slope),
                                          exps.data_ptr<acc_t>());
      exps.exp_();
      normalize_rows<kH, scalar_t, acc_t>(s, exps.data_ptr<acc_t>(), alpha.data_ptr<scalar_t>());
    });
  });
  return alpha;
}

std::tuple<at::Tensor, at::Tensor> incidence_attention_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& alpha_in, const at::Tensor& score_v_in,
    const at::Tensor& score_e_in, const at::Tensor& metabolite_index,
    const at::Tensor& reaction_index, const at::Tensor& group_ptr, const at::Tensor& group_perm,
    const at::Tensor& metabolite_ptr, const at::Tensor& metabolite_perm,
    const at::Tensor& reaction_ptr, const at::Tensor& reaction_perm, double negative_slope) {
  const char* op = "incidence_attention_backward";
  check_inputs(op, score_v_in, score_e_in, metabolite_index, reaction_index, group_ptr, group_perm);
  const int64_t B = score_v_in.size(0), N = score_v_in.size(1), M = score_e_in.size(1);
  const int64_t H = score_v_in.size(2), nnz = metabolite_index.size(0), Be = score_e_in.size(0);
  TORCH_CHECK(alpha_in.dim() == 3 && alpha_in.size(0) == B && alpha_in.size(1) == nnz &&
                  alpha_in.size(2) == H && alpha_in.scalar_type() == score_v_in.scalar_type() &&
                  alpha_in.device() == score_v_in.device(),
              op, ": `alpha` must be [B, nnz, H] = [", B, ", ", nnz, ", ", H,
              "] of the dtype and device of `score_v`");
  check_group_grad(op, grad_in, alpha_in);
  check_grouping_values(op, "metabolite_ptr", "metabolite_perm", metabolite_ptr, metabolite_perm,
                        N, nnz, score_v_in);
  check_grouping_values(op, "reaction_ptr", "reaction_perm", reaction_ptr, reaction_perm, M, nnz,
                        score_v_in);
  const auto sv = score_v_in.contiguous(), se = score_e_in.contiguous();
  const auto mi = metabolite_index.contiguous(), ri = reaction_index.contiguous();
  const auto ptr = group_ptr.contiguous(), perm = group_perm.contiguous();
  const auto mptr = metabolite_ptr.contiguous(), mperm = metabolite_perm.contiguous();
  const auto rptr = reaction_ptr.contiguous(), rperm = reaction_perm.contiguous();
  const auto grad = grad_in.contiguous(), alpha = alpha_in.contiguous();
  // The groupings are trusted to agree with the indices (the plan's); check it (cheap).
  {
    const int64_t *mp = mptr.data_ptr<int64_t>(), *mq = mperm.data_ptr<int64_t>();
    const int64_t *rp = rptr.data_ptr<int64_t>(), *rq = rperm.data_ptr<int64_t>();
    const int64_t *mix = mi.data_ptr<int64_t>(), *rix = ri.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = mp[n]; j < mp[n + 1]; ++j)
        TORCH_CHECK(mix[mq[j]] == n, op,
                    ": `metabolite_ptr` / `metabolite_perm` must group the incidences by "
                    "`metabolite_index`");
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = rp[m]; j < rp[m + 1]; ++j)
        TORCH_CHECK(rix[rq[j]] == m, op,
                    ": `reaction_ptr` / `reaction_perm` must group the incidences by "
                    "`reaction_index`");
  }
  auto grad_v = allocate(op, "grad_score_v", {B, N, H}, sv.options());
  auto grad_e = allocate(op, "grad_score_e", {Be, M, H}, sv.options());
  const Scores s = make_scores(sv, se, mi, ri, ptr, perm);
  const CsrIndices c = csr_indices(s);
  // Node mode: the softmax grouping is the reaction grouping, whose sums then
  // come with the logit gradients (same rows, same order).
  const bool by_reaction =
      ptr.size(0) == rptr.size(0) &&
      (ptr.data_ptr() == rptr.data_ptr() ||
       std::equal(ptr.data_ptr<int64_t>(), ptr.data_ptr<int64_t>() + ptr.size(0),
                  rptr.data_ptr<int64_t>())) &&
      (perm.data_ptr() == rperm.data_ptr() ||
       std::equal(perm.data_ptr<int64_t>(), perm.data_ptr<int64_t>() + nnz,
                  rperm.data_ptr<int64_t>()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sv.scalar_type(),
                                  "incidence_attention_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    auto dpre = allocate(op, "the logit gradients", {B, nnz, H},
                         sv.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    with_heads(H, [&](auto heads) {
      constexpr int kH = decltype(heads)::value;
      pre_grad_kernel<kH, scalar_t>(s, c, grad.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
                                    sv.data_ptr<scalar_t>(), se.data_ptr<scalar_t>(),
                                    static_cast<acc_t>(negative_slope), dpre.data_ptr<acc_t>(),
                                    by_reaction ? grad_e.data_ptr<scalar_t>() : nullptr);
      row_sums<kH, scalar_t, acc_t>(dpre.data_ptr<acc_t>(), mptr.data_ptr<int64_t>(),
                                    mperm.data_ptr<int64_t>(), B, 1, N, nnz, H,
                                    grad_v.data_ptr<scalar_t>());
      if (!by_reaction)
        row_sums<kH, scalar_t, acc_t>(dpre.data_ptr<acc_t>(), rptr.data_ptr<int64_t>(),
                                      rperm.data_ptr<int64_t>(), Be, Be == 1 ? B : 1, M, nnz, H,
                                      grad_e.data_ptr<scalar_t>());
    });
  });
  return {grad_v, grad_e};
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CPU, m) {
  m.impl("incidence_attention", &incidence_attention_cpu);
  m.impl("incidence_attention_backward", &incidence_attention_backward_cpu);
}

}  // namespace stoichconv
