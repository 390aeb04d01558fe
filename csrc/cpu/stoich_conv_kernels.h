// The loops of the C++ CPU stoich conv kernels.  Included by
// stoich_conv.cpp once per instruction set, each time inside its own
// namespace (hence no include guard); it relies on the types defined there
// (ForwardArgs, BackwardArgs, kGrain; the plan is a StoichPlanView) and on the shared per-row
// math of stoichconv/stoich_conv_math.h.
//
// Every output row is one segment of a CSR ordering of the plan, written by
// one thread in a fixed order: deterministic, no atomics.
//
// Types: the loops are templated on the storage type scalar_t of the
// features, weights and rows (float16, bfloat16, float32, float64) and sum in
// acc_t = acc_type<scalar_t>; the degree weights and norms are acc_t arrays.
// A float16 / bfloat16 row is accumulated in an acc_t row buffer and rounded
// once on store; a float32 / float64 row is accumulated in place, as before
// (acc_t == scalar_t: the same operations in the same order).

// Lanes of the blocked dot products of the weight gradient (one 32-byte
// register of accumulators).
template <typename acc_t>
constexpr int kDotLanes = 32 / sizeof(acc_t);

// node_norm [Bn, N], edge_norm [Bn, M] from |s| of the kept incidences.
template <typename acc_t>
void degree_norms(const StoichPlanView& s, const acc_t* abs_stoich, const bool* keep, int64_t Bn,
                  acc_t* node_norm, acc_t* edge_norm) {
  at::parallel_for(0, Bn * s.M, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.M, e = row % s.M;
      acc_t sum = 0;
      if (incidence_kept(keep, b, s.M, e))
        for (int64_t j = s.reaction_ptr[e]; j < s.reaction_ptr[e + 1]; ++j)
          sum += abs_stoich[s.reaction_perm[j]];
      edge_norm[row] = degree_norm(sum);
    }
  });
  at::parallel_for(0, Bn * s.N, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.N, v = row % s.N;
      acc_t sum = 0;
      for (int64_t j = s.metabolite_ptr[v]; j < s.metabolite_ptr[v + 1]; ++j) {
        const int64_t k = s.metabolite_perm[j];
        if (incidence_kept(keep, b, s.M, s.reaction_index[k])) sum += abs_stoich[k];
      }
      node_norm[row] = degree_norm(sum);
    }
  });
}

// Channels of one register tile of reduce_row: 256 bytes of accumulators (64 float or 32 double
// sums: eight 32-byte registers), held in registers while a row's incidences are summed.
template <typename acc_t>
constexpr int64_t kTileChannels = 256 / sizeof(acc_t);

// One 32-byte register of acc_t lanes (a GCC vector type: one ymm register with AVX2, two xmm
// registers in the portable code).
// (Spelled per type: GCC drops vector_size on an alias template of a dependent type.)
typedef float TileVectorFloat __attribute__((vector_size(32)));
typedef double TileVectorDouble __attribute__((vector_size(32)));
template <typename acc_t>
using TileVector = std::conditional_t<std::is_same_v<acc_t, float>, TileVectorFloat, TileVectorDouble>;

// acc[0:kTile] = sum_{j in [j0, j1)} coef(b, j, h) * src_b[other(j), h, c0 : c0 + kTile]
// in incidence order (one register tile of a reduce_row output row) of a float32 / float64 source,
// summed in vector registers (kTile / lanes of them): every lane's sum is the same sequence of
// multiply-adds as a lane by lane loop.
template <int64_t kTile, typename scalar_t, typename Other, typename Coef>
inline void gather_tile(scalar_t* __restrict__ acc, int64_t b, int64_t h, int64_t c0,
                        int64_t row_size, int64_t C, int64_t j0, int64_t j1,
                        const scalar_t* src_b, Other other, Coef coef) {
  const int64_t offset = h * C + c0;
  using vec_t = TileVector<scalar_t>;
  static_assert(sizeof(vec_t) == 32, "TileVector must be one 32-byte vector");
  constexpr int64_t kLanes = 32 / sizeof(scalar_t), kVectors = kTile / kLanes;
  vec_t sum[kVectors];
  for (int64_t v = 0; v < kVectors; ++v) sum[v] = vec_t{};
  for (int64_t j = j0; j < j1; ++j) {
    const vec_t c = vec_t{} + static_cast<scalar_t>(coef(b, j, h));
    const scalar_t* src = src_b + other(j) * row_size + offset;
    for (int64_t v = 0; v < kVectors; ++v) {
      vec_t x;
      std::memcpy(&x, src + v * kLanes, sizeof(vec_t));
      sum[v] += c * x;
    }
  }
  std::memcpy(acc, sum, sizeof(sum));
}

// Row r of sample b of one segment reduction (dst: that row; init_row: its
// init row or nullptr; buffer: one acc_t row, used when acc_t is not scalar_t):
//   dst_b[r] = (init_b ? init_b[r] : 0) + row_scale(b, r) *
//              sum_{j in CSR row r} coef(b, j, h) * src_b[other(j), h]
// for each head h (rows of H * C values; src_b / init_b / dst_b point at
// sample b's rows).  The incidences are named by their position j in the CSR
// ordering (ptr): `other(j)` is the row of src incidence j gathers, coef its factor
// (both read from arrays in that order: CsrIncidences).
// Both forward stages and both backward reductions are instances of this one
// segment reduction.  For float32 / float64 each head's channels are summed one
// register tile (kTileChannels) at a time over all the row's incidences; the
// channels past the last whole tile, and every channel of a 16-bit source
// (converted on load), are summed in the output row or buffer itself.  Every
// sum runs over the incidences in plan order, so the result does not depend on
// the tiling; the sums are in acc_t, in the output row itself when acc_t is
// scalar_t, else in a buffer of one row (reused across the rows) rounded to
// scalar_t once, after the init term.
template <typename scalar_t, typename Other, typename Coef, typename Scale>
inline void reduce_row(int64_t b, int64_t r, int64_t H, int64_t C, const int64_t* ptr,
                       const scalar_t* src_b, const scalar_t* init_row,
                       scalar_t* dst, stoichconv::acc_type<scalar_t>* buffer, Other other,
                       Coef coef, Scale row_scale) {
  using acc_t = stoichconv::acc_type<scalar_t>;
  constexpr bool in_place = std::is_same_v<acc_t, scalar_t>;
  constexpr int64_t kTile = kTileChannels<acc_t>;
  const int64_t row_size = H * C;
  acc_t* out;
  if constexpr (in_place) out = dst; else out = buffer;
  const acc_t scale = row_scale(b, r);
  if (scale != acc_t(0)) {
    const int64_t j0 = ptr[r], j1 = ptr[r + 1];
    // 16-bit sources: each incidence's row converted and added into the acc_t row buffer
    // (the vectorised conversion loop of axpy_row), no register tiles.
    const int64_t whole = in_place ? C - C % kTile : 0;
    for (int64_t h = 0; h < H; ++h) {
      acc_t* out_h = out + h * C;
      if constexpr (in_place)
        for (int64_t c0 = 0; c0 < whole; c0 += kTile)
          gather_tile<kTile>(out_h + c0, b, h, c0, row_size, C, j0, j1, src_b, other, coef);
      if (whole < C) {
        for (int64_t c = whole; c < C; ++c) out_h[c] = acc_t(0);
        for (int64_t j = j0; j < j1; ++j) {
          axpy_row(out_h + whole, static_cast<acc_t>(coef(b, j, h)),
                   src_b + other(j) * row_size + h * C + whole, C - whole);
        }
      }
    }
    scale_row(out, scale, row_size);
  } else {
    for (int64_t i = 0; i < row_size; ++i) out[i] = acc_t(0);
  }
  if (init_row != nullptr) axpy_row(out, acc_t(1), init_row, row_size);
  if constexpr (!in_place)
    for (int64_t i = 0; i < row_size; ++i) dst[i] = static_cast<scalar_t>(out[i]);
}

// Rows [r0, r1) of sample b (reduce_row for each, one row buffer reused).
template <typename scalar_t, typename Other, typename Coef, typename Scale>
inline void reduce_rows(int64_t b, int64_t r0, int64_t r1, int64_t H, int64_t C,
                        const int64_t* ptr, const scalar_t* src_b,
                        const scalar_t* init_b, scalar_t* dst_b, Other other, Coef coef,
                        Scale row_scale) {
  using acc_t = stoichconv::acc_type<scalar_t>;
  constexpr bool in_place = std::is_same_v<acc_t, scalar_t>;
  const int64_t row_size = H * C;
  std::vector<acc_t> buffer(in_place ? 0 : static_cast<size_t>(row_size));
  for (int64_t r = r0; r < r1; ++r)
    reduce_row(b, r, H, C, ptr, src_b, init_b ? init_b + r * row_size : nullptr,
               dst_b + r * row_size, buffer.data(), other, coef, row_scale);
}

// The same reduction over every (sample, row), parallel over rows (used when
// there are fewer samples than threads).
template <typename scalar_t, typename Other, typename Coef, typename Scale>
void segment_reduce(int64_t B, int64_t rows, int64_t src_rows, int64_t H, int64_t C,
                    const int64_t* ptr, const scalar_t* src,
                    const scalar_t* init, scalar_t* dst, Other other, Coef coef,
                    Scale row_scale) {
  const int64_t row_size = H * C;
  at::parallel_for(0, B * rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      const int64_t b = row / rows, r0 = row % rows;
      const int64_t r1 = std::min(rows, r0 + (end - row));
      reduce_rows(b, r0, r1, H, C, ptr, src + b * src_rows * row_size,
                  init ? init + b * rows * row_size : nullptr, dst + b * rows * row_size, other,
                  coef, row_scale);
      row += r1 - r0;
    }
  });
}

// Whether to give each thread whole samples (both stages of a sample back to
// back, the intermediate rows still in cache) rather than rows.
inline bool by_sample(int64_t B) { return B >= at::get_num_threads(); }

// The plan's incidences in its two CSR orders, gathered once per call so that the row loops
// read them in sequence instead of through perm -> index chains.  In the reaction order
// (reaction_ptr) position j is incidence reaction_perm[j], of metabolite metabolite[j]; in the
// metabolite order (metabolite_ptr) position j is incidence metabolite_perm[j], of reaction
// reaction[j].  A weight shared by the samples (w_stride 0) is gathered into both orders too;
// a per-sample weight is read through the permutation.
template <typename scalar_t>
struct CsrIncidences {
  using acc_t = stoichconv::acc_type<scalar_t>;
  const StoichPlanView& s;
  const scalar_t* w;
  int64_t ws, H;
  std::vector<int64_t> metabolite, reaction;
  std::vector<scalar_t> weight_by_reaction, weight_by_metabolite;  // shared weight only

  CsrIncidences(const StoichPlanView& plan, const scalar_t* weight, int64_t w_stride, int64_t heads)
      : s(plan), w(weight), ws(w_stride), H(heads),
        metabolite(static_cast<size_t>(plan.nnz)), reaction(static_cast<size_t>(plan.nnz)) {
    for (int64_t j = 0; j < s.nnz; ++j) {
      metabolite[j] = s.metabolite_index[s.reaction_perm[j]];
      reaction[j] = s.reaction_index[s.metabolite_perm[j]];
    }
    if (ws == 0) {
      weight_by_reaction.resize(static_cast<size_t>(s.nnz * H));
      weight_by_metabolite.resize(static_cast<size_t>(s.nnz * H));
      for (int64_t j = 0; j < s.nnz; ++j)
        for (int64_t h = 0; h < H; ++h) {
          weight_by_reaction[j * H + h] = w[s.reaction_perm[j] * H + h];
          weight_by_metabolite[j * H + h] = w[s.metabolite_perm[j] * H + h];
        }
    }
  }
  // w[b, k, h] of the incidence k at position j of the reaction / metabolite order
  acc_t reaction_order_weight(int64_t b, int64_t j, int64_t h) const {
    return static_cast<acc_t>(ws == 0 ? weight_by_reaction[j * H + h]
                                      : w[b * ws + s.reaction_perm[j] * H + h]);
  }
  acc_t metabolite_order_weight(int64_t b, int64_t j, int64_t h) const {
    return static_cast<acc_t>(ws == 0 ? weight_by_metabolite[j * H + h]
                                      : w[b * ws + s.metabolite_perm[j] * H + h]);
  }
};

// Stage 1, metabolite -> reaction, row e of sample b into `row` (buffer: as reduce_row's):
//   hidden[b, e] = B_e * sum_{k in e} w_k y[b, v_k]
// (the forward's first stage, and the backward's recomputation of `hidden`
// when the forward did not save it).
template <typename scalar_t>
inline void stage1_row(const CsrIncidences<scalar_t>& g, int64_t b, int64_t e, int64_t N,
                       int64_t C, const bool* keep, const scalar_t* y,
                       const stoichconv::acc_type<scalar_t>* edge_norm, scalar_t* row,
                       stoichconv::acc_type<scalar_t>* buffer) {
  const StoichPlanView& s = g.s;
  const int64_t M = s.M, row_size = g.H * C;
  reduce_row(
      b, e, g.H, C, s.reaction_ptr, y + b * N * row_size, static_cast<const scalar_t*>(nullptr),
      row, buffer, [&](int64_t j) { return g.metabolite[j]; },
      [&](int64_t bb, int64_t j, int64_t h) { return g.reaction_order_weight(bb, j, h); },
      [&](int64_t bb, int64_t r) { return edge_norm[(keep ? bb : 0) * M + r]; });
}

// Stage 1 for rows [e0, e1) of sample b into hidden_b (sample b's rows).
template <typename scalar_t>
inline void stage1_rows(const CsrIncidences<scalar_t>& g, int64_t b, int64_t e0, int64_t e1,
                        int64_t N, int64_t C, const bool* keep, const scalar_t* y,
                        const stoichconv::acc_type<scalar_t>* edge_norm, scalar_t* hidden_b) {
  using acc_t = stoichconv::acc_type<scalar_t>;
  const int64_t row_size = g.H * C;
  std::vector<acc_t> buffer(std::is_same_v<acc_t, scalar_t> ? 0 : static_cast<size_t>(row_size));
  for (int64_t e = e0; e < e1; ++e)
    stage1_row(g, b, e, N, C, keep, y, edge_norm, hidden_b + e * row_size, buffer.data());
}

// Stage 1 over every (sample, reaction), parallel over rows, into hidden [B, M, H, C].
template <typename scalar_t>
void stage1_all(const CsrIncidences<scalar_t>& g, int64_t B, int64_t N, int64_t C,
                const bool* keep, const scalar_t* y,
                const stoichconv::acc_type<scalar_t>* edge_norm, scalar_t* hidden) {
  const int64_t M = g.s.M, row_size = g.H * C;
  at::parallel_for(0, B * M, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      const int64_t b = row / M, e0 = row % M;
      const int64_t e1 = std::min(M, e0 + (end - row));
      stage1_rows(g, b, e0, e1, N, C, keep, y, edge_norm, hidden + b * M * row_size);
      row += e1 - e0;
    }
  });
}

// a.hidden == nullptr: `hidden` is not saved (whole-sample mode keeps each
// sample's rows in a per-thread scratch block; the row mode uses a temporary).
template <typename scalar_t>
void forward_kernel(const StoichPlanView& s, const ForwardArgs<scalar_t>& a) {
  using acc_t = stoichconv::acc_type<scalar_t>;
  const int64_t M = s.M, N = a.N, H = a.H, C = a.C, ws = a.w_stride;
  const int64_t row_size = H * C;
  const bool* keep = a.keep;
  const acc_t* dn = a.node_norm;
  degree_norms(s, a.abs_stoich, keep, keep ? a.B : 1, a.node_norm, a.edge_norm);
  const CsrIncidences<scalar_t> g(s, a.weight, ws, H);
  // Stage 2, reaction -> metabolite: out[b,v] = D_v * sum_k w_k h[b, e_k]
  const auto stage2_other = [&](int64_t j) { return g.reaction[j]; };
  const auto stage2_coef = [&](int64_t b, int64_t j, int64_t h) {
    return incidence_kept(keep, b, M, g.reaction[j]) ? g.metabolite_order_weight(b, j, h) : acc_t(0);
  };
  const auto stage2_scale = [&](int64_t b, int64_t v) { return dn[(keep ? b : 0) * N + v]; };
  if (by_sample(a.B)) {
    at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(a.hidden ? 0 : static_cast<size_t>(M * row_size));
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* hidden_b = a.hidden ? a.hidden + b * M * row_size : scratch.data();
        stage1_rows(g, b, 0, M, N, C, keep, a.y, a.edge_norm, hidden_b);
        reduce_rows(b, 0, N, H, C, s.metabolite_ptr,
                    static_cast<const scalar_t*>(hidden_b), static_cast<const scalar_t*>(nullptr),
                    a.out + b * N * row_size, stage2_other, stage2_coef, stage2_scale);
      }
    });
    return;
  }
  std::vector<scalar_t> temporary(a.hidden ? 0 : static_cast<size_t>(a.B * M * row_size));
  scalar_t* hidden = a.hidden ? a.hidden : temporary.data();
  stage1_all(g, a.B, N, C, keep, a.y, a.edge_norm, hidden);
  segment_reduce<scalar_t>(a.B, N, M, H, C, s.metabolite_ptr, hidden,
                           nullptr, a.out, stage2_other, stage2_coef, stage2_scale);
}

// The gradient of a weight shared by every sample (weight [1, nnz, H], w_stride 0):
//   grad_weight[0, k, h] = sum_{b = 0 .. B-1, e_k kept in b} D_v <G_v, h_e> + B_e <R_e, Y_v>
// (per sample exactly incidence_weight_grad of the per-sample path), summed in acc_t in
// sample order and rounded once.  Parallel over reactions: incidence k is owned by the task
// of its reaction e_k (the reaction CSR), which loops over the samples, so every entry is
// written by one thread in a fixed order (no atomics, no [B, nnz, H] buffer).  The rows R_e
// and h_e of sample b are read from R / hidden [B, M, H, C] where given, else recomputed
// (reduce_row: the same arithmetic as the whole-batch rows).
template <typename scalar_t, typename ROther, typename RCoef, typename RScale>
void shared_weight_grads(const CsrIncidences<scalar_t>& g, const BackwardArgs<scalar_t>& a,
                         const scalar_t* R, const scalar_t* hidden, ROther r_other, RCoef r_coef,
                         RScale r_scale) {
  using acc_t = stoichconv::acc_type<scalar_t>;
  const StoichPlanView& s = g.s;
  const int64_t M = s.M, N = a.N, H = a.H, C = a.C;
  const int64_t row_size = H * C;
  const bool* keep = a.keep;
  const acc_t* en = a.edge_norm;
  at::parallel_for(0, M, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> R_row(R ? 0 : static_cast<size_t>(row_size));
    std::vector<scalar_t> h_row(hidden ? 0 : static_cast<size_t>(row_size));
    std::vector<acc_t> buffer(std::is_same_v<acc_t, scalar_t> ? 0 : static_cast<size_t>(row_size));
    std::vector<acc_t> sums;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t j0 = s.reaction_ptr[e], j1 = s.reaction_ptr[e + 1];
      sums.assign(static_cast<size_t>((j1 - j0) * H), acc_t(0));
      for (int64_t b = 0; b < a.B; ++b) {
        if (!incidence_kept(keep, b, M, e)) continue;
        const int64_t nb = keep ? b : 0;
        const scalar_t* R_e = R ? R + (b * M + e) * row_size : R_row.data();
        if (!R)
          reduce_row(b, e, H, C, s.reaction_ptr, a.grad_out + b * N * row_size,
                     a.grad_hidden ? a.grad_hidden + (b * M + e) * row_size : nullptr,
                     R_row.data(), buffer.data(), r_other, r_coef, r_scale);
        const scalar_t* h_e = hidden ? hidden + (b * M + e) * row_size : h_row.data();
        if (!hidden) stage1_row(g, b, e, N, C, keep, a.y, en, h_row.data(), buffer.data());
        const acc_t be = en[nb * M + e];
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t v = g.metabolite[j];
          const acc_t d = a.node_norm[nb * N + v];
          const scalar_t* G_v = a.grad_out + (b * N + v) * row_size;
          const scalar_t* Y_v = a.y + (b * N + v) * row_size;
          acc_t* sum = sums.data() + (j - j0) * H;
          for (int64_t h = 0; h < H; ++h)
            sum[h] += incidence_weight_grad<kDotLanes<acc_t>>(d, G_v + h * C, h_e + h * C, be,
                                                               R_e + h * C, Y_v + h * C, C);
        }
      }
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t k = s.reaction_perm[j];
        for (int64_t h = 0; h < H; ++h)
          a.grad_weight[k * H + h] = static_cast<scalar_t>(sums[(j - j0) * H + h]);
      }
    }
  });
}

// a.hidden == nullptr: the forward did not save `hidden`; it is recomputed
// (stage 1) where the weight gradient needs it, per sample into a scratch
// block in whole-sample mode.
template <typename scalar_t>
void backward_kernel(const StoichPlanView& s, const BackwardArgs<scalar_t>& a) {
  using acc_t = stoichconv::acc_type<scalar_t>;
  const int64_t M = s.M, N = a.N, H = a.H, C = a.C, nnz = a.nnz, ws = a.w_stride;
  const int64_t row_size = H * C;
  const bool* keep = a.keep;
  const acc_t* dn = a.node_norm;
  const acc_t* en = a.edge_norm;
  const CsrIncidences<scalar_t> g(s, a.weight, ws, H);
  const auto norm_b = [&](int64_t b) { return keep ? b : int64_t(0); };
  // A weight [1, nnz, H] shared by the samples (w_stride 0, B != 1): one gradient [1, nnz, H].
  const bool shared = ws == 0 && a.B != 1;
  // R[b,e] = dL/dh[b,e] = grad_hidden[b,e] + sum_{k in e} w_k D_{v_k} G[b, v_k]
  // (stored in scalar_t, like `hidden`)
  const auto r_other = [&](int64_t j) { return g.metabolite[j]; };
  const auto r_coef = [&](int64_t b, int64_t j, int64_t h) {
    return g.reaction_order_weight(b, j, h) * dn[norm_b(b) * N + g.metabolite[j]];
  };
  const auto r_scale = [&](int64_t b, int64_t e) {
    return incidence_kept(keep, b, M, e) ? acc_t(1) : acc_t(0);
  };
  // dL/dY[b,u] = sum_{k: v_k = u} w_k B_{e_k} R[b, e_k]
  const auto gy_other = [&](int64_t j) { return g.reaction[j]; };
  const auto gy_coef = [&](int64_t b, int64_t j, int64_t h) {
    const int64_t e = g.reaction[j];
    return incidence_kept(keep, b, M, e) ? g.metabolite_order_weight(b, j, h) * en[norm_b(b) * M + e]
                                         : acc_t(0);
  };
  const auto gy_scale = [](int64_t, int64_t) { return acc_t(1); };
  // dL/dw_k = D_v <G_v, h_e> + B_e <R_e, Y_v> for the incidences of reaction e of sample b
  // from its rows R_e and h_e (h_e not read when e is masked in b: its incidences get 0).  In
  // the reaction CSR order, so that the rows h_e and R_e stay in cache while the incidences'
  // G_v and Y_v are gathered; each entry is one dot product pair (the order of the loop does
  // not change any value).
  const auto reaction_weight_grads = [&](int64_t b, int64_t e, const scalar_t* R_e, const scalar_t* h_e) {
    const bool kept = incidence_kept(keep, b, M, e);
    const acc_t be = en[norm_b(b) * M + e];
    for (int64_t j = s.reaction_ptr[e]; j < s.reaction_ptr[e + 1]; ++j) {
      const int64_t k = s.reaction_perm[j], v = g.metabolite[j];
      scalar_t* grad_w = a.grad_weight + (b * nnz + k) * H;
      if (!kept) {
        for (int64_t h = 0; h < H; ++h) grad_w[h] = scalar_t(0);
        continue;
      }
      const acc_t d = dn[norm_b(b) * N + v];
      const scalar_t* G_v = a.grad_out + (b * N + v) * row_size;
      const scalar_t* Y_v = a.y + (b * N + v) * row_size;
      for (int64_t h = 0; h < H; ++h)
        grad_w[h] = static_cast<scalar_t>(incidence_weight_grad<kDotLanes<acc_t>>(
            d, G_v + h * C, h_e + h * C, be, R_e + h * C, Y_v + h * C, C));
    }
  };
  if (by_sample(a.B)) {
    // Each thread keeps one sample's R in a scratch buffer: R never goes
    // through memory as a [B, M, H, C] tensor.
    at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
      const bool per_sample_w = a.grad_weight != nullptr && !shared;
      const bool recompute = per_sample_w && a.hidden == nullptr;
      std::vector<scalar_t> R_scratch(static_cast<size_t>(M * row_size));
      std::vector<scalar_t> h_row(static_cast<size_t>(recompute ? row_size : 0));
      std::vector<acc_t> buffer(std::is_same_v<acc_t, scalar_t> ? 0 : static_cast<size_t>(row_size));
      scalar_t* R_b = R_scratch.data();
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* G_b = a.grad_out + b * N * row_size;
        const scalar_t* init_b = a.grad_hidden ? a.grad_hidden + b * M * row_size : nullptr;
        if (per_sample_w) {
          // One pass over the reactions: R_e, h_e (recomputed: stage 1), then the weight
          // gradients of e's incidences, whose rows G_v and Y_v were just gathered for R_e and
          // h_e and are still in cache (a pass of its own would gather them again).
          for (int64_t e = 0; e < M; ++e) {
            scalar_t* R_e = R_b + e * row_size;
            reduce_row(b, e, H, C, s.reaction_ptr, G_b, init_b ? init_b + e * row_size : nullptr, R_e,
                       buffer.data(), r_other, r_coef, r_scale);
            const scalar_t* h_e = nullptr;
            if (incidence_kept(keep, b, M, e)) {
              if (recompute) {
                stage1_row(g, b, e, N, C, keep, a.y, en, h_row.data(), buffer.data());
                h_e = h_row.data();
              } else {
                h_e = a.hidden + (b * M + e) * row_size;
              }
            }
            reaction_weight_grads(b, e, R_e, h_e);
          }
        } else {
          reduce_rows(b, 0, M, H, C, s.reaction_ptr, G_b, init_b, R_b, r_other, r_coef, r_scale);
        }
        if (a.grad_y != nullptr)
          reduce_rows(b, 0, N, H, C, s.metabolite_ptr,
                      static_cast<const scalar_t*>(R_b), static_cast<const scalar_t*>(nullptr),
                      a.grad_y + b * N * row_size, gy_other, gy_coef, gy_scale);
      }
    });
    // A shared weight: its gradient from the saved (or recomputed) rows, R row by row again.
    if (a.grad_weight != nullptr && shared)
      shared_weight_grads(g, a, static_cast<const scalar_t*>(nullptr), a.hidden, r_other, r_coef,
                          r_scale);
    return;
  }
  std::vector<scalar_t> R(static_cast<size_t>(a.B * M * row_size));
  segment_reduce<scalar_t>(a.B, M, N, H, C, s.reaction_ptr, a.grad_out,
                           a.grad_hidden, R.data(), r_other, r_coef, r_scale);
  if (a.grad_y != nullptr)
    segment_reduce<scalar_t>(a.B, N, M, H, C, s.metabolite_ptr, R.data(),
                             nullptr, a.grad_y, gy_other, gy_coef, gy_scale);
  if (a.grad_weight != nullptr) {
    std::vector<scalar_t> recomputed(a.hidden ? 0 : static_cast<size_t>(a.B * M * row_size));
    const scalar_t* hidden = a.hidden;
    if (hidden == nullptr) {
      stage1_all(g, a.B, N, C, keep, a.y, en, recomputed.data());
      hidden = recomputed.data();
    }
    if (shared) {
      shared_weight_grads(g, a, static_cast<const scalar_t*>(R.data()), hidden, r_other, r_coef,
                          r_scale);
      return;
    }
    at::parallel_for(0, a.B * M, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end;) {
        const int64_t b = idx / M, e0 = idx % M;
        const int64_t e1 = std::min(M, e0 + (end - idx));
        for (int64_t e = e0; e < e1; ++e)
          reaction_weight_grads(b, e, R.data() + (b * M + e) * row_size, hidden + (b * M + e) * row_size);
        idx += e1 - e0;
      }
    });
  }
}
