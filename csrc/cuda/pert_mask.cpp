// CUDA dispatch of the perturbation-masking operators: argument checks,
// allocations (CUB scratch included) and the current stream; kernels in
// pert_mask_kernels.cu behind stoichconv/pert_mask_cuda.h.  Sizes are checked
// up front like the CPU kernels' (stoichconv/pert_mask_checks.h).
//
// Index values are validated on the device (cuda::launch_validate) and read
// back in each operator's one host synchronisation (read_status): with the
// output size for filter_edges and filter_bipartite, on its own for
// reaction_keep.  A failed check raises the CPU kernel's error for the same
// input, word for word (the checks of stoichconv/pert_mask_checks.h, run on
// the host copy of what the device flagged; extra copies only on that error
// path).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "stoichconv/pert_mask_checks.h"
#include "stoichconv/pert_mask_outputs.h"
#include "stoichconv/pert_mask_cuda.h"
#include "stoichconv/size_checks.h"

namespace stoichconv {
namespace {

void check_ok(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

void check_cuda_long(const at::Tensor& t, const char* op, const char* name,
                     const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": `", name, "` must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, op, ": `", name, "` is on ", t.device(), " but ", device,
              " was expected");
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": `", name, "` must be int64, got ",
              t.scalar_type());
}

void check_cuda_edge_index(const at::Tensor& edge_index, const char* op, const char* name,
                           const at::Device& device) {
  check_cuda_long(edge_index, op, name, device);
  check_edge_index_shape(edge_index, op, name);
}

// Exclusive scan of n int64 into out with CUB scratch allocated by torch.
void scan(const at::Tensor& in, at::Tensor& out, int64_t n, cudaStream_t stream, const char* op) {
  size_t bytes = 0;
  check_ok(cuda::scan_temp_bytes(n, &bytes), op);
  auto temp = allocate(op, "scan scratch", {int64_t(bytes) + 1}, in.options().dtype(at::kByte));
  check_ok(cuda::exclusive_scan(in.data_ptr<int64_t>(), out.data_ptr<int64_t>(), n,
                                temp.data_ptr(), bytes, stream),
           op);
}

// The status words of one call, {0, 0, kNoColumn} (see pert_mask_cuda.h);
// two fills, no host copy.
at::Tensor new_status(const at::TensorOptions& long_opts) {
  auto status = at::full({cuda::kStatusSize}, cuda::kNoColumn, long_opts);
  status.narrow(0, 0, 2).zero_();
  return status;
}

// What launch_validate checked, to rerun the failed check on the host.
struct CheckedValues {
  const char* edge_name;
  at::Tensor edge_index;  // contiguous [2, E]
  int64_t num_src, num_dst;
  at::Tensor pert, pert_ptr;  // contiguous; undefined for filter_bipartite
  int64_t max_id;
};

// The one host synchronisation of a call: returns status[0] (the output size
// of the filters) or raises the CPU kernel's error, checks in its order:
// the edge list, pert_ptr, pert.
int64_t read_status(const at::Tensor& status, cudaStream_t stream, const char* op,
                    const CheckedValues& v) {
  int64_t host[cuda::kStatusSize] = {0, 0, 0};
  // c10's copy-and-sync: visible to torch.cuda.set_sync_debug_mode.
  c10::cuda::memcpy_and_sync(host, status.data_ptr<int64_t>(), sizeof(host),
                             cudaMemcpyDeviceToHost, stream);
  if (host[2] != cuda::kNoColumn) {  // the first bad column
    const auto column = v.edge_index.select(1, host[2]).cpu().contiguous();
    const int64_t* c = column.data_ptr<int64_t>();
    check_edge_index_values(op, v.edge_name, c, c + 1, 1, v.num_src, v.num_dst);
  }
  if (host[1] & cuda::kBadPertPtr) {
    const auto ptr = v.pert_ptr.cpu();
    check_pert_ptr_values(op, ptr.data_ptr<int64_t>(), ptr.size(0) - 1, v.pert.size(0));
  }
  if (host[1] & cuda::kBadPertId) {
    const auto ids = v.pert.cpu();
    check_pert_id_values(op, ids.data_ptr<int64_t>(), ids.size(0), v.max_id);
  }
  TORCH_CHECK(host[1] == 0 && host[2] == cuda::kNoColumn, op,
              ": the device validation flagged `", v.edge_name,
              "`, `pert` or `pert_ptr` but the host check passed (status ", host[1], ", ", host[2],
              ")");
  return host[0];
}

// Deletion sets on the device (see pert_mask_cuda.h), after launch_validate
// on status; keeps the contiguous inputs alive for read_status.
struct Deletions {
  at::Tensor pert, pert_ptr, sorted, start, count;
  cuda::DeletionView view() const {
    return {sorted.data_ptr<int64_t>(), start.data_ptr<int64_t>(), count.data_ptr<int64_t>()};
  }
};

Deletions contiguous_deletions(const at::Tensor& pert, const at::Tensor& pert_ptr,
                               const char* op) {
  check_pert_shapes(pert, pert_ptr, op);
  return {pert.contiguous(), pert_ptr.contiguous(), {}, {}, {}};
}

void prepare(Deletions& d, bool* node_keep, int64_t N, int64_t* kept_counts,
             const at::Tensor& status, cudaStream_t stream, const char* op) {
  const int64_t P = d.pert.size(0), B = d.pert_ptr.size(0) - 1;
  const auto opts = d.pert.options();
  d.sorted = allocate(op, "sorted deletions", {std::max<int64_t>(P, 1)}, opts);
  d.start = allocate(op, "deletion starts", {B}, opts);
  d.count = allocate(op, "deletion counts", {B}, opts);
  at::Tensor scratch;
  if (cuda::uses_large_sort_pass(P)) scratch = allocate(op, "sort scratch", {P}, opts);
  check_ok(cuda::launch_prepare_deletions(
               d.pert.data_ptr<int64_t>(), d.pert_ptr.data_ptr<int64_t>(), P, B,
               d.sorted.data_ptr<int64_t>(),
               scratch.defined() ? scratch.data_ptr<int64_t>() : nullptr,
               d.start.data_ptr<int64_t>(), d.count.data_ptr<int64_t>(), node_keep, N,
               kept_counts, status.data_ptr<int64_t>(), stream),
           op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_edges_impl(
    const at::Tensor& edge_index_in, int64_t num_nodes, const at::Tensor& pert,
    const at::Tensor& pert_ptr, bool relabel, const FilterEdgesBuffers& given) {
  const char* op = "filter_edges";
  TORCH_CHECK(num_nodes >= 0, op, ": `num_nodes` must be non-negative, got ", num_nodes);
  TORCH_CHECK(pert.is_cuda(), op, ": `pert` must be a CUDA tensor, got ", pert.device());
  const at::Device device = pert.device();
  check_cuda_long(pert, op, "pert", device);
  check_cuda_long(pert_ptr, op, "pert_ptr", device);
  check_cuda_edge_index(edge_index_in, op, "edge_index", device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  Deletions del = contiguous_deletions(pert, pert_ptr, op);
  const auto edge_index = edge_index_in.contiguous();
  const int64_t B = del.pert_ptr.size(0) - 1, N = num_nodes, E = edge_index.size(1);
  const int64_t P = del.pert.size(0);
  check_batched_layout(op, B, N, "B * `num_nodes`", E);
  const auto opts = edge_index.options();
  const int64_t* src = edge_index.data_ptr<int64_t>();
  const int64_t* dst = src + E;
  auto status = new_status(opts);
  check_ok(cuda::launch_validate(del.pert.data_ptr<int64_t>(), del.pert_ptr.data_ptr<int64_t>(), P,
                                 B, N, src, dst, E, N, N, status.data_ptr<int64_t>(), stream),
           op);

  auto node_keep = output(given.node_keep, op, "node_keep", B * N, opts.dtype(at::kBool)).fill_(true);
  auto kept_counts = allocate(op, "kept counts", {B + 1}, opts);
  prepare(del, node_keep.data_ptr<bool>(), N, kept_counts.data_ptr<int64_t>(), status, stream, op);
  auto node_ptr = output(given.node_ptr, op, "node_ptr", B + 1, opts);
  scan(kept_counts, node_ptr, B + 1, stream, op);

  const int64_t tiles = B * cuda::tiles_per_sample(E);
  auto edge_keep = output(given.edge_keep, op, "edge_keep", B * E, opts.dtype(at::kBool));
  auto tile_counts = allocate(op, "tile counts", {tiles + 1}, opts).zero_();
  auto tile_offsets = allocate(op, "tile offsets", {tiles + 1}, opts);
  auto edge_ptr = output(given.edge_ptr, op, "edge_ptr", B + 1, opts);
  check_ok(cuda::launch_filter_edges_count(src, dst, E, B, N, del.view(),
                                           edge_keep.data_ptr<bool>(),
                                           tile_counts.data_ptr<int64_t>(), stream),
           op);
  scan(tile_counts, tile_offsets, tiles + 1, stream, op);
  check_ok(cuda::launch_edge_ptr(tile_offsets.data_ptr<int64_t>(), B, E,
                                 edge_ptr.data_ptr<int64_t>(), status.data_ptr<int64_t>(), stream),
           op);
  const int64_t total = read_status(
      status, stream, op, {"edge_index", edge_index, N, N, del.pert, del.pert_ptr, N});
  auto out = output_edges(given.edge_index, op, total, opts);
  int64_t* out_src = out.data_ptr<int64_t>();
  check_ok(cuda::launch_filter_edges_write(src, dst, E, B, N, del.view(),
                                           edge_keep.data_ptr<bool>(),
                                           tile_offsets.data_ptr<int64_t>(), relabel,
                                           node_ptr.data_ptr<int64_t>(), out_src, out_src + total,
                                           stream),
           op);
  return {out, edge_ptr, edge_keep, node_keep, node_ptr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_edges_cuda(
    const at::Tensor& edge_index, int64_t num_nodes, const at::Tensor& pert,
    const at::Tensor& pert_ptr, bool relabel) {
  return filter_edges_impl(edge_index, num_nodes, pert, pert_ptr, relabel, {});
}

// filter_edges into the caller's buffers (sizes: csrc/cpu/pert_mask.cpp,
// filter_edges_out_cpu); value errors as filter_edges's.
void filter_edges_out_cuda(const at::Tensor& edge_index, int64_t num_nodes,
                           const at::Tensor& pert, const at::Tensor& pert_ptr, bool relabel,
                           at::Tensor& edge_index_out, at::Tensor& edge_ptr_out,
                           at::Tensor& edge_keep_out, at::Tensor& node_keep_out,
                           at::Tensor& node_ptr_out) {
  const char* op = "filter_edges_out";
  TORCH_CHECK(num_nodes >= 0, op, ": `num_nodes` must be non-negative, got ", num_nodes);
  TORCH_CHECK(pert.is_cuda(), op, ": `pert` must be a CUDA tensor, got ", pert.device());
  const at::Device device = pert.device();
  check_cuda_long(pert_ptr, op, "pert_ptr", device);
  check_cuda_edge_index(edge_index, op, "edge_index", device);
  check_pert_shapes(pert, pert_ptr, op);
  const int64_t B = pert_ptr.size(0) - 1, N = num_nodes, E = edge_index.size(1);
  check_batched_layout(op, B, N, "B * `num_nodes`", E);
  const int64_t BE = checked_product(op, "2 * B * E", {2, B, E});
  check_out_buffer(edge_index_out, op, "edge_index_out", at::kLong, device, BE, "2 * B * E");
  check_out_buffer(edge_ptr_out, op, "edge_ptr_out", at::kLong, device, B + 1, "B + 1");
  check_out_buffer(edge_keep_out, op, "edge_keep_out", at::kBool, device, B * E, "B * E");
  check_out_buffer(node_keep_out, op, "node_keep_out", at::kBool, device, B * N, "B * num_nodes");
  check_out_buffer(node_ptr_out, op, "node_ptr_out", at::kLong, device, B + 1, "B + 1");
  filter_edges_impl(edge_index, num_nodes, pert, pert_ptr, relabel,
                    {edge_index_out, edge_ptr_out, edge_keep_out, node_keep_out, node_ptr_out});
}

at::Tensor reaction_keep_impl(const at::Tensor& gpr_index_in, int64_t num_reactions,
                              const at::Tensor& pert, const at::Tensor& pert_ptr,
                              const at::Tensor& given) {
  const char* op = "reaction_keep";
  TORCH_CHECK(num_reactions >= 0, op, ": `num_reactions` must be non-negative, got ",
              num_reactions);
  TORCH_CHECK(pert.is_cuda(), op, ": `pert` must be a CUDA tensor, got ", pert.device());
  const at::Device device = pert.device();
  check_cuda_long(pert, op, "pert", device);
  check_cuda_long(pert_ptr, op, "pert_ptr", device);
  check_cuda_edge_index(gpr_index_in, op, "gpr_index", device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  Deletions del = contiguous_deletions(pert, pert_ptr, op);
  const auto gpr_index = gpr_index_in.contiguous();
  const int64_t B = del.pert_ptr.size(0) - 1, E = gpr_index.size(1), R = num_reactions;
  checked_product(op, "B * `num_reactions`", {B, R});
  const auto opts = gpr_index.options();
  const int64_t* gene = gpr_index.data_ptr<int64_t>();
  auto status = new_status(opts);
  check_ok(cuda::launch_validate(del.pert.data_ptr<int64_t>(), del.pert_ptr.data_ptr<int64_t>(),
                                 del.pert.size(0), B, -1, gene, gene + E, E, kAnyId, R,
                                 status.data_ptr<int64_t>(), stream),
           op);
  prepare(del, nullptr, 0, nullptr, status, stream, op);
  auto keep = output(given, op, "keep", B * R, opts.dtype(at::kBool)).fill_(true).view({B, R});
  check_ok(cuda::launch_reaction_keep(gene, gene + E, E, B, R, del.view(), keep.data_ptr<bool>(),
                                      stream),
           op);
  // The host synchronisation of reaction_keep: only the validation result.
  read_status(status, stream, op, {"gpr_index", gpr_index, kAnyId, R, del.pert, del.pert_ptr, -1});
  return keep;
}

at::Tensor reaction_keep_cuda(const at::Tensor& gpr_index, int64_t num_reactions,
                              const at::Tensor& pert, const at::Tensor& pert_ptr) {
  return reaction_keep_impl(gpr_index, num_reactions, pert, pert_ptr, {});
}

// reaction_keep into the caller's buffer `out` (>= B * num_reactions bool).
void reaction_keep_out_cuda(const at::Tensor& gpr_index, int64_t num_reactions,
                            const at::Tensor& pert, const at::Tensor& pert_ptr, at::Tensor& out) {
  const char* op = "reaction_keep_out";
  TORCH_CHECK(num_reactions >= 0, op, ": `num_reactions` must be non-negative, got ",
              num_reactions);
  TORCH_CHECK(pert.is_cuda(), op, ": `pert` must be a CUDA tensor, got ", pert.device());
  const at::Device device = pert.device();
  check_cuda_long(pert_ptr, op, "pert_ptr", device);
  check_pert_shapes(pert, pert_ptr, op);
  const int64_t needed = checked_product(op, "B * `num_reactions`", {pert_ptr.size(0) - 1, num_reactions});
  check_out_buffer(out, op, "out", at::kBool, device, needed, "B * num_reactions");
  reaction_keep_impl(gpr_index, num_reactions, pert, pert_ptr, out);
}

at::Tensor compacted_ids(const at::Tensor& keep, cudaStream_t stream, const char* op) {
  const int64_t n = keep.numel();
  auto flags = allocate(op, "compacted-id flags", {n}, keep.options().dtype(at::kLong));
  auto ids = allocate(op, "compacted ids", {keep.size(0), keep.size(1)},
                      keep.options().dtype(at::kLong));
  check_ok(cuda::launch_keep_to_long(keep.data_ptr<bool>(), n, flags.data_ptr<int64_t>(), stream),
           op);
  scan(flags, ids, n, stream, op);
  check_ok(cuda::launch_finish_compacted_ids(keep.data_ptr<bool>(), n, ids.data_ptr<int64_t>(),
                                             stream),
           op);
  return ids;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_bipartite_impl(
    const at::Tensor& edge_index_in, int64_t num_src, int64_t num_dst, int64_t num_samples,
    const std::optional<at::Tensor>& src_keep_in, const std::optional<at::Tensor>& dst_keep_in,
    bool relabel, const FilterBipartiteBuffers& given) {
  const char* op = "filter_bipartite";
  TORCH_CHECK(num_src >= 0 && num_dst >= 0 && num_samples >= 0, op,
              ": `num_src`, `num_dst` and `num_samples` must be non-negative");
  TORCH_CHECK(edge_index_in.is_cuda(), op, ": `edge_index` must be a CUDA tensor, got ",
              edge_index_in.device());
  const at::Device device = edge_index_in.device();
  check_cuda_edge_index(edge_index_in, op, "edge_index", device);
  const int64_t B = num_samples;
  check_keep(src_keep_in, "src_keep", B, num_src, device);
  check_keep(dst_keep_in, "dst_keep", B, num_dst, device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const auto edge_index = edge_index_in.contiguous();
  const int64_t E = edge_index.size(1);
  check_batched_layout(op, B, num_src, "B * `num_src` (`num_samples` times `num_src`)", E);
  checked_product(op, "B * `num_dst` (`num_samples` times `num_dst`)", {B, num_dst});
  const auto opts = edge_index.options();
  at::Tensor src_keep, dst_keep, src_ids, dst_ids;
  if (src_keep_in.has_value()) src_keep = src_keep_in->contiguous();
  if (dst_keep_in.has_value()) dst_keep = dst_keep_in->contiguous();
  // A side without a mask keeps every node, so both layouts number it b*N + v.
  if (relabel && src_keep.defined()) src_ids = compacted_ids(src_keep, stream, op);
  if (relabel && dst_keep.defined()) dst_ids = compacted_ids(dst_keep, stream, op);

  const int64_t* src = edge_index.data_ptr<int64_t>();
  const int64_t* dst = src + E;
  auto status = new_status(opts);
  check_ok(cuda::launch_validate(nullptr, nullptr, 0, 0, -1, src, dst, E, num_src, num_dst,
                                 status.data_ptr<int64_t>(), stream),
           op);
  const int64_t tiles = B * cuda::tiles_per_sample(E);
  auto edge_keep = output(given.edge_keep, op, "edge_keep", B * E, opts.dtype(at::kBool));
  auto tile_counts = allocate(op, "tile counts", {tiles + 1}, opts).zero_();
  auto tile_offsets = allocate(op, "tile offsets", {tiles + 1}, opts);
  auto edge_ptr = output(given.edge_ptr, op, "edge_ptr", B + 1, opts);
  check_ok(cuda::launch_filter_bipartite_count(
               src, dst, E, B, num_src, num_dst,
               src_keep.defined() ? src_keep.data_ptr<bool>() : nullptr,
               dst_keep.defined() ? dst_keep.data_ptr<bool>() : nullptr,
               edge_keep.data_ptr<bool>(), tile_counts.data_ptr<int64_t>(), stream),
           op);
  scan(tile_counts, tile_offsets, tiles + 1, stream, op);
  check_ok(cuda::launch_edge_ptr(tile_offsets.data_ptr<int64_t>(), B, E,
                                 edge_ptr.data_ptr<int64_t>(), status.data_ptr<int64_t>(), stream),
           op);
  const int64_t total =
      read_status(status, stream, op, {"edge_index", edge_index, num_src, num_dst, {}, {}, -1});
  auto out = output_edges(given.edge_index, op, total, opts);
  auto edge_id = output(given.edge_id, op, "edge_id", total, opts);
  int64_t* out_src = out.data_ptr<int64_t>();
  check_ok(cuda::launch_filter_bipartite_write(
               src, dst, E, B, num_src, num_dst,
               src_ids.defined() ? src_ids.data_ptr<int64_t>() : nullptr,
               dst_ids.defined() ? dst_ids.data_ptr<int64_t>() : nullptr,
               edge_keep.data_ptr<bool>(), tile_offsets.data_ptr<int64_t>(), out_src,
               out_src + total, edge_id.data_ptr<int64_t>(), stream),
           op);
  return {out, edge_ptr, edge_keep, edge_id};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_bipartite_cuda(
    const at::Tensor& edge_index, int64_t num_src, int64_t num_dst, int64_t num_samples,
    const std::optional<at::Tensor>& src_keep, const std::optional<at::Tensor>& dst_keep,
    bool relabel) {
  return filter_bipartite_impl(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep,
                               relabel, {});
}

// filter_bipartite into the caller's buffers (sizes: filter_bipartite_out_cpu).
void filter_bipartite_out_cuda(const at::Tensor& edge_index, int64_t num_src, int64_t num_dst,
                               int64_t num_samples, const std::optional<at::Tensor>& src_keep,
                               const std::optional<at::Tensor>& dst_keep, bool relabel,
                               at::Tensor& edge_index_out, at::Tensor& edge_ptr_out,
                               at::Tensor& edge_keep_out, at::Tensor& edge_id_out) {
  const char* op = "filter_bipartite_out";
  TORCH_CHECK(num_src >= 0 && num_dst >= 0 && num_samples >= 0, op,
              ": `num_src`, `num_dst` and `num_samples` must be non-negative");
  TORCH_CHECK(edge_index.is_cuda(), op, ": `edge_index` must be a CUDA tensor, got ",
              edge_index.device());
  const at::Device device = edge_index.device();
  check_cuda_edge_index(edge_index, op, "edge_index", device);
  const int64_t B = num_samples, E = edge_index.size(1);
  const int64_t BE = checked_product(op, "2 * B * E", {2, B, E});
  check_out_buffer(edge_index_out, op, "edge_index_out", at::kLong, device, BE, "2 * B * E");
  check_out_buffer(edge_ptr_out, op, "edge_ptr_out", at::kLong, device, B + 1, "B + 1");
  check_out_buffer(edge_keep_out, op, "edge_keep_out", at::kBool, device, B * E, "B * E");
  check_out_buffer(edge_id_out, op, "edge_id_out", at::kLong, device, B * E, "B * E");
  filter_bipartite_impl(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel,
                        {edge_index_out, edge_ptr_out, edge_keep_out, edge_id_out});
}

}  // namespace

TORCH_LIBRARY_IMPL(stoichconv, CUDA, m) {
  m.impl("filter_edges", &filter_edges_cuda);
  m.impl("reaction_keep", &reaction_keep_cuda);
  m.impl("filter_bipartite", &filter_bipartite_cuda);
  m.impl("filter_edges_out", &filter_edges_out_cuda);
  m.impl("reaction_keep_out", &reaction_keep_out_cuda);
  m.impl("filter_bipartite_out", &filter_bipartite_out_cuda);
}

}  // namespace stoichconv
