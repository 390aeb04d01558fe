// The loops of the C++ CPU GATv2 kernels (forward_kernel, backward_kernel and
// their helpers).  Included by gatv2.cpp once per instruction set, each time
// inside its own namespace (hence no include guard); it relies on what
// gatv2.cpp includes before (ATen, the shared math of stoichconv/gatv2_math.h,
// acc_type, allocate / checked_product of stoichconv/size_checks.h).

constexpr int64_t kRowGrain = 64;  // rows per task

// Lanes of the channel reductions (one 32-byte register of the accumulation type).
template <typename acc_t>
constexpr int kLanes = 32 / sizeof(acc_t);

// The acc_t row of n entries that an output row `out` is accumulated in: `out`
// itself when scalar_t is acc_t, else `scratch` (a buffer of the thread).
template <typename acc_t, typename scalar_t>
acc_t* accumulator_for(scalar_t* out, std::vector<acc_t>& scratch, int64_t n) {
  if constexpr (std::is_same<acc_t, scalar_t>::value) {
    return out;
  } else {
    scratch.resize(static_cast<size_t>(n));
    return scratch.data();
  }
}

// Stores the accumulated row into `out` (rounded once; nothing to do when the
// row was accumulated in `out` itself).
template <typename acc_t, typename scalar_t>
void store_row(scalar_t* out, const acc_t* acc, int64_t n) {
  if constexpr (!std::is_same<acc_t, scalar_t>::value) {
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<scalar_t>(acc[c]);
  }
}

// The edge loops read rows at random places (x_l[src], x_r[dst], g[row]): the
// rows of the edge this many edges (slots) ahead are prefetched, every cache
// line of them.
constexpr int64_t kPrefetchEdges = 4;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(scalar_t)); b += 64)
    __builtin_prefetch(p + b);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* xl, const scalar_t* xr, const scalar_t* att,
                    const int64_t* src, const int64_t* dst, const int64_t* crow, int64_t R,
                    int64_t E, int64_t H, int64_t C, acc_type<scalar_t> slope, scalar_t* out,
                    scalar_t* alpha) {
  using acc_t = acc_type<scalar_t>;
  const int64_t W = H * C;
  at::parallel_for(0, R, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row_max(H), denom(H), weight_scratch, out_scratch;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e0 = crow[i], e1 = crow[i + 1];
      // The row's logits, then exps, then softmax weights [e1 - e0, H].
      acc_t* w = accumulator_for(alpha + e0 * H, weight_scratch, (e1 - e0) * H);
      for (int64_t h = 0; h < H; ++h) row_max[h] = -std::numeric_limits<acc_t>::infinity();
      for (int64_t e = e0; e < e1; ++e) {
        if (e + kPrefetchEdges < E) {
          prefetch_row(xl + src[e + kPrefetchEdges] * W, W);
          prefetch_row(xr + dst[e + kPrefetchEdges] * W, W);
        }
        for (int64_t h = 0; h < H; ++h) {
          const acc_t a = gatv2_logit<kLanes<acc_t>>(att + h * C, xl + src[e] * W + h * C,
                                                     xr + dst[e] * W + h * C, slope, C);
          w[(e - e0) * H + h] = a;
          row_max[h] = std::max(row_max[h], a);
        }
      }
      for (int64_t h = 0; h < H; ++h) denom[h] = acc_t(0);
      for (int64_t e = e0; e < e1; ++e)
        for (int64_t h = 0; h < H; ++h) {
          const acc_t x = std::exp(w[(e - e0) * H + h] - row_max[h]);
          w[(e - e0) * H + h] = x;
          denom[h] += x;
        }
      acc_t* o = accumulator_for(out + i * W, out_scratch, W);
      for (int64_t c = 0; c < W; ++c) o[c] = acc_t(0);
      for (int64_t e = e0; e < e1; ++e)
        for (int64_t h = 0; h < H; ++h) {
          const acc_t a = gatv2_softmax_weight(w[(e - e0) * H + h], denom[h]);
          w[(e - e0) * H + h] = a;
          axpy_row(o + h * C, a, xl + src[e] * W + h * C, C);
        }
      store_row(alpha + e0 * H, w, (e1 - e0) * H);
      store_row(out + i * W, o, W);
    }
  });
}

// The edges grouped by `key` (a stable counting sort), as each edge's slot:
// ptr [num_keys + 1], and edge e is the slot[e]-th edge in key order (edges
// of one key in increasing edge id).
void slots_by(const int64_t* key, int64_t E, int64_t num_keys, std::vector<int64_t>& ptr,
              int64_t* slot) {
  ptr.assign(static_cast<size_t>(num_keys + 1), 0);
  for (int64_t e = 0; e < E; ++e) ++ptr[key[e] + 1];
  for (int64_t k = 0; k < num_keys; ++k) ptr[k + 1] += ptr[k];
  std::vector<int64_t> next(ptr.begin(), ptr.end() - 1);
  for (int64_t e = 0; e < E; ++e) slot[e] = next[key[e]]++;
}

// An uninitialised host buffer of n values of T for the per-edge data of one
// call (a tensor's storage: allocated like the outputs, so that a large one
// is advised into huge pages and is not zeroed first as a std::vector is).
template <typename T>
struct EdgeScratch {
  at::Tensor storage;
  T* data;
  EdgeScratch(const char* name, int64_t n)
      : storage(allocate("gatv2_backward", name,
                         {checked_product("gatv2_backward", name, {n, int64_t(sizeof(T))})},
                         at::TensorOptions().dtype(at::kByte))),
        data(reinterpret_cast<T*>(storage.data_ptr())) {}
  T& operator[](int64_t i) const { return data[i]; }
};

// Whether every edge's destination is its output row (the usual case: the
// destination features are not shared by the samples of a batch).
bool destination_is_row(const int64_t* dst, const int64_t* crow, int64_t R, int64_t Nd) {
  if (Nd != R) return false;
  for (int64_t i = 0; i < R; ++i)
    for (int64_t e = crow[i]; e < crow[i + 1]; ++e)
      if (dst[e] != i) return false;
  return true;
}

// Output rows per block of the row pass: grad_att is summed per
// block, then over the blocks in order, so it does not depend on the thread count.
constexpr int64_t kRowBlock = 64;

// The backward of forward_kernel (every output row written by one thread,
// sums in a fixed order, all in acc_t), in two passes over the edges:
//  1. per output row i (its edges in order; rows in fixed blocks):
//       ga_e = <g_i, x_l[src_e]>,  gl_e = alpha_e (ga_e - sum_{e' in i} alpha_e' ga_e'),
//       pre_e = x_l[src_e] + x_r[dst_e],  grad_att += gl_e lrelu(pre_e),
//       grad_x_r[i] = sum_e gl_e att * lrelu'(pre_e)        (when dst is the row);
//     and each edge's (alpha, gl, dst, row) is written to its slot in source
//     order, so that the source pass reads them in sequence;
//  2. per source row s, over its edges in edge order (its slots):
//       grad_x_l[s] = sum_e alpha_e g_{row e} + gl_e att * lrelu'(pre_e).
// When dst is not the row (destination features shared by the samples), the
// row pass also writes each edge's (gl, src) to its slot in destination order,
// and grad_x_r is a third pass per destination row over its slots.
template <typename scalar_t>
void backward_kernel(const scalar_t* g, const scalar_t* xl, const scalar_t* xr, const scalar_t* att,
                     const scalar_t* alpha, const int64_t* src, const int64_t* dst,
                     const int64_t* crow, int64_t R, int64_t E, int64_t Ns, int64_t Nd, int64_t H,
                     int64_t C, acc_type<scalar_t> slope, scalar_t* gxl, scalar_t* gxr,
                     scalar_t* gatt) {
  using acc_t = acc_type<scalar_t>;
  const int64_t W = H * C;
  const bool dst_is_row = destination_is_row(dst, crow, R, Nd);
  std::vector<int64_t> src_ptr;
  const EdgeScratch<int64_t> slot("the edge slots", E);
  slots_by(src, E, Ns, src_ptr, slot.data);
  // every slot written once by the row pass (slot is a permutation of the edges)
  const EdgeScratch<acc_t> slot_alpha("the edge weights in source order", E * H),
      slot_gl("the logit gradients in source order", E * H);
  const EdgeScratch<int64_t> slot_dst("the destinations in source order", E);
  const EdgeScratch<int64_t> slot_row("the rows in source order", dst_is_row ? 0 : E);
  // dst shared: the logit gradients and sources in destination order as well
  std::vector<int64_t> dst_ptr;
  const EdgeScratch<int64_t> dst_slot("the destination slots", dst_is_row ? 0 : E);
  if (!dst_is_row) slots_by(dst, E, Nd, dst_ptr, dst_slot.data);
  const EdgeScratch<acc_t> dst_slot_gl("the logit gradients in destination order", dst_is_row ? 0 : E * H);
  const EdgeScratch<int64_t> dst_slot_src("the sources in destination order", dst_is_row ? 0 : E);
  // 1.
  const int64_t num_blocks = (R + kRowBlock - 1) / kRowBlock;
  std::vector<acc_t> att_partial(static_cast<size_t>(num_blocks * W), acc_t(0));
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dot(H), gl, scratch;
    for (int64_t blk = begin; blk < end; ++blk) {
      acc_t* part = att_partial.data() + blk * W;
      for (int64_t i = blk * kRowBlock; i < std::min(R, (blk + 1) * kRowBlock); ++i) {
        const int64_t e0 = crow[i], e1 = crow[i + 1];
        const scalar_t* gi = g + i * W;
        gl.resize(static_cast<size_t>((e1 - e0) * H));
        for (int64_t h = 0; h < H; ++h) dot[h] = acc_t(0);
        for (int64_t e = e0; e < e1; ++e) {
          if (e + kPrefetchEdges < E) prefetch_row(xl + src[e + kPrefetchEdges] * W, W);
          for (int64_t h = 0; h < H; ++h) {
            const acc_t ga = dot_row<kLanes<acc_t>>(gi + h * C, xl + src[e] * W + h * C, C);
            gl[(e - e0) * H + h] = ga;
            dot[h] += static_cast<acc_t>(alpha[e * H + h]) * ga;
          }
        }
        acc_t* to_dst = dst_is_row ? accumulator_for(gxr + i * W, scratch, W) : nullptr;
        for (int64_t c = 0; dst_is_row && c < W; ++c) to_dst[c] = acc_t(0);
        for (int64_t e = e0; e < e1; ++e) {
          const scalar_t* xs = xl + src[e] * W;
          const scalar_t* xd = xr + dst[e] * W;
          const int64_t j = slot[e];
          slot_dst[j] = dst[e];
          if (!dst_is_row) {
            slot_row[j] = i;
            dst_slot_src[dst_slot[e]] = src[e];
          }
          for (int64_t h = 0; h < H; ++h) {
            const int64_t o = h * C;
            const acc_t a = static_cast<acc_t>(alpha[e * H + h]);
            const acc_t gle = gatv2_logit_grad(a, gl[(e - e0) * H + h], dot[h]);
            slot_alpha[j * H + h] = a;
            slot_gl[j * H + h] = gle;
            if (dst_is_row) {
              gatv2_destination_grad_row(to_dst + o, part + o, gle, att + o, xs + o, xd + o, slope, C);
            } else {
              gatv2_attention_grad_row(part + o, gle, xs + o, xd + o, slope, C);
              dst_slot_gl[dst_slot[e] * H + h] = gle;
            }
          }
        }
        if (dst_is_row) store_row(gxr + i * W, to_dst, W);
      }
    }
  });
  std::vector<acc_t> gatt_scratch;
  acc_t* gatt_acc = accumulator_for(gatt, gatt_scratch, W);
  for (int64_t c = 0; c < W; ++c) gatt_acc[c] = acc_t(0);
  for (int64_t blk = 0; blk < num_blocks; ++blk)
    for (int64_t c = 0; c < W; ++c) gatt_acc[c] += att_partial[blk * W + c];
  store_row(gatt, gatt_acc, W);
  // 2.
  at::parallel_for(0, Ns, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch;
    for (int64_t s = begin; s < end; ++s) {
      acc_t* acc = accumulator_for(gxl + s * W, scratch, W);
      for (int64_t c = 0; c < W; ++c) acc[c] = acc_t(0);
      const scalar_t* xs = xl + s * W;
      for (int64_t j = src_ptr[s]; j < src_ptr[s + 1]; ++j) {
        if (j + kPrefetchEdges < E) {
          const int64_t jn = j + kPrefetchEdges;
          prefetch_row(xr + slot_dst[jn] * W, W);
          prefetch_row(g + (dst_is_row ? slot_dst[jn] : slot_row[jn]) * W, W);
        }
        const scalar_t* xd = xr + slot_dst[j] * W;
        const scalar_t* gr = g + (dst_is_row ? slot_dst[j] : slot_row[j]) * W;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t o = h * C;
          gatv2_source_grad_row(acc + o, slot_alpha[j * H + h], gr + o, slot_gl[j * H + h],
                                att + o, xs + o, xd + o, slope, C);
        }
      }
      store_row(gxl + s * W, acc, W);
    }
  });
  if (dst_is_row) return;
  // 3. grad_x_r per destination row, over its edges in edge order (its slots).
  at::parallel_for(0, Nd, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch;
    for (int64_t d = begin; d < end; ++d) {
      acc_t* acc = accumulator_for(gxr + d * W, scratch, W);
      for (int64_t c = 0; c < W; ++c) acc[c] = acc_t(0);
      const scalar_t* xd = xr + d * W;
      for (int64_t j = dst_ptr[d]; j < dst_ptr[d + 1]; ++j) {
        if (j + kPrefetchEdges < E) prefetch_row(xl + dst_slot_src[j + kPrefetchEdges] * W, W);
        const scalar_t* xs = xl + dst_slot_src[j] * W;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t o = h * C;
          gatv2_x_r_grad_row(acc + o, dst_slot_gl[j * H + h], att + o, xs + o, xd + o, slope, C);
        }
      }
      store_row(gxr + d * W, acc, W);
    }
  });
}
