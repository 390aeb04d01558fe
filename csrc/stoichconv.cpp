// The one place that declares every stoichconv operator schema, and the
// Python module `stoichconv._C` whose import loads the kernels.
//
// Implementations register under their dispatch keys in csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cpp (CUDA kernels in csrc/cuda/<op>_kernels.cu); autograd
// formulas and fake (meta) kernels are registered from Python (the
// stoichconv.ops packages) with torch.library.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include "stoichconv/host_block_cache.h"

#include "stoichconv/stoich_conv_schedule.h"

TORCH_LIBRARY(stoichconv, m) {
  // Signed stoichiometric propagation on a batch sharing one incidence
  // structure (semantics: stoichconv.ops.stoich_conv docstring).  `weight` is
  // per sample [B, nnz, H] or shared by the batch [1, nnz, H] (read as row 0
  // for every sample, never expanded).
  // Returns (out [B,N,H,C], hidden [B,M,H,C], node_norm [Bn,N], edge_norm [Bn,M]),
  // Bn = B with a reaction keep-mask, else 1; with save_hidden=false `hidden`
  // is not kept and comes back as an empty tensor [0].
  m.def(
      "stoich_conv_forward(Tensor y, Tensor weight, Tensor? reaction_keep, "
      "Tensor metabolite_index, Tensor reaction_index, Tensor abs_stoich, "
      "Tensor reaction_ptr, Tensor reaction_perm, Tensor metabolite_ptr, "
      "Tensor metabolite_perm, bool save_hidden=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // Hand-written backward of stoich_conv_forward: (grad_y, grad_weight);
  // grad_weight has the shape of `weight` (for a shared [1, nnz, H] weight
  // the sum over the batch, reduced in the kernel in sample order); a
  // gradient not asked for comes back as an empty tensor.  An empty `hidden`
  // (forward run with save_hidden=false) is recomputed from y and weight.
  m.def(
      "stoich_conv_backward(Tensor grad_out, Tensor? grad_hidden, Tensor y, "
      "Tensor weight, Tensor? reaction_keep, Tensor hidden, Tensor node_norm, "
      "Tensor edge_norm, Tensor metabolite_index, Tensor reaction_index, "
      "Tensor reaction_ptr, Tensor reaction_perm, Tensor metabolite_ptr, "
      "Tensor metabolite_perm, bool need_grad_y, bool need_grad_weight) "
      "-> (Tensor, Tensor)");
  // Gene-gene edges surviving per-sample gene deletions; semantics: stoichconv.ops.pert_mask docstring.
  m.def(
      "filter_edges(Tensor edge_index, int num_nodes, Tensor pert, Tensor pert_ptr, "
      "bool relabel) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // [B, num_reactions] bool: reaction removed iff one of its GPR genes is deleted.
  m.def(
      "reaction_keep(Tensor gpr_index, int num_reactions, Tensor pert, Tensor pert_ptr) "
      "-> Tensor");
  // Fused GATv2 attention + aggregation forward over row-sorted edges:
  // (out [num_rows, H, C], alpha [E, H]).  CPU and CUDA kernels; semantics
  // and dtypes: the stoichconv.ops.gatv2 docstring.
  m.def(
      "gatv2_forward(Tensor x_l, Tensor x_r, Tensor att, Tensor src, Tensor dst, Tensor crow, "
      "float negative_slope) -> (Tensor, Tensor)");
  // Its backward from the saved alpha: (grad_x_l, grad_x_r, grad_att).  CPU and CUDA.
  m.def(
      "gatv2_backward(Tensor grad_out, Tensor x_l, Tensor x_r, Tensor att, Tensor alpha, "
      "Tensor src, Tensor dst, Tensor crow, float negative_slope) -> (Tensor, Tensor, Tensor)");
  // Softmax of logits [B, nnz, H] over the incidences of each group (a CSR
  // ordering: group_ptr [G+1], group_perm [nnz]); incidences with kept [B, nnz]
  // False weigh 0.  CPU and CUDA kernels; semantics and dtypes:
  // stoichconv.ops.group_softmax docstring.
  m.def("group_softmax(Tensor logits, Tensor? kept, Tensor group_ptr, Tensor group_perm) -> Tensor");
  // Its backward: grad_logits = alpha * (grad - sum_group alpha * grad).
  m.def(
      "group_softmax_backward(Tensor grad, Tensor alpha, Tensor group_ptr, Tensor group_perm) "
      "-> Tensor");
  // Fused attention of the stoich conv layer: alpha [B, nnz, H] = the softmax over the
  // groups (group_ptr / group_perm) of leaky_relu(score_v[:, metabolite_index] +
  // score_e[:, reaction_index]); the metabolite / reaction groupings serve the backward.
  // CPU and CUDA kernels; semantics and dtypes: stoichconv.ops.incidence_attention docstring.
  m.def(
      "incidence_attention(Tensor score_v, Tensor score_e, Tensor metabolite_index, "
      "Tensor reaction_index, Tensor? kept, Tensor group_ptr, Tensor group_perm, "
      "Tensor metabolite_ptr, Tensor metabolite_perm, Tensor reaction_ptr, Tensor reaction_perm, "
      "float negative_slope) -> Tensor");
  // Its backward: (grad_score_v [B, N, H], grad_score_e in the shape of score_e).
  m.def(
      "incidence_attention_backward(Tensor grad, Tensor alpha, Tensor score_v, Tensor score_e, "
      "Tensor metabolite_index, Tensor reaction_index, Tensor group_ptr, Tensor group_perm, "
      "Tensor metabolite_ptr, Tensor metabolite_perm, Tensor reaction_ptr, Tensor reaction_perm, "
      "float negative_slope) -> (Tensor, Tensor)");
  // Bipartite edges (GPR pairs, metabolic incidences) surviving per-sample node keep-masks.
  m.def(
      "filter_bipartite(Tensor edge_index, int num_src, int num_dst, int num_samples, "
      "Tensor? src_keep, Tensor? dst_keep, bool relabel) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same three ops writing into caller buffers (a batcher's reused memory,
  // stoichconv.perturb.PerturbBatcher), sized for the worst case (no deletion):
  // edge lists as 2 * E_out contiguous values at the start of a buffer of at
  // least 2 * B * E, the other outputs flat at the start of theirs.  CPU and CUDA.
  m.def(
      "filter_edges_out(Tensor edge_index, int num_nodes, Tensor pert, Tensor pert_ptr, "
      "bool relabel, Tensor(a!) edge_index_out, Tensor(b!) edge_ptr_out, "
      "Tensor(c!) edge_keep_out, Tensor(d!) node_keep_out, Tensor(e!) node_ptr_out) -> ()");
  m.def(
      "reaction_keep_out(Tensor gpr_index, int num_reactions, Tensor pert, Tensor pert_ptr, "
      "Tensor(a!) out) -> ()");
  m.def(
      "filter_bipartite_out(Tensor edge_index, int num_src, int num_dst, int num_samples, "
      "Tensor? src_keep, Tensor? dst_keep, bool relabel, Tensor(a!) edge_index_out, "
      "Tensor(b!) edge_ptr_out, Tensor(c!) edge_keep_out, Tensor(d!) edge_id_out) -> ()");
  m.def("kept_nodes(Tensor keep) -> (Tensor, Tensor, Tensor)");
  m.def(
      "kept_nodes_out(Tensor keep, Tensor(a!) batch_out, Tensor(b!) n_id_out, Tensor(c!) ptr_out) "
      "-> ()");
}

// The module holds no operator: importing it runs the registrations above
// and those of csrc/cpu/*.cpp and csrc/cuda/*.cpp.  Its functions:
// _stoich_row_splits(row_length) -> int, the CUDA kernels' reduction schedule
// of a CSR row (stoichconv/stoich_conv_schedule.h), so that the CPU tests check
// the very function the GPU runs; and the Python side of the host block cache
// (stoichconv/host_block_cache.h; used by stoichconv._host_pages):
// _host_block(nbytes) -> uint8 tensor [nbytes] on a cached block, or None when
// the cache does not serve that size; _host_cache_info() /
// _host_cache_set_limit(bytes) / _host_cache_clear() -> (limit, cached bytes,
// cached blocks, hits, misses).  How it was built is reported by the separate
// module stoichconv._build_info (csrc/build_info.cpp).
namespace {
// The int argument `arg` of a module function as *value; false (a Python
// error set, ValueError naming `name` when it is negative) unless it is >= 0.
bool non_negative_int(PyObject* arg, const char* name, int64_t* value) {
  const long long v = PyLong_AsLongLong(arg);
  if (v == -1 && PyErr_Occurred()) return false;
  if (v < 0) {
    PyErr_Format(PyExc_ValueError, "`%s` must be >= 0", name);
    return false;
  }
  *value = static_cast<int64_t>(v);
  return true;
}

PyObject* stoich_row_splits_py(PyObject*, PyObject* arg) {
  int64_t length = 0;
  if (!non_negative_int(arg, "row_length", &length)) return nullptr;
  return PyLong_FromLong(stoichconv::stoich_row_splits(length));
}

PyObject* info_tuple(const std::vector<int64_t>& info) {
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(info.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < info.size(); ++i)
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), PyLong_FromLongLong(info[i]));
  return out;
}

PyObject* host_block_py(PyObject*, PyObject* arg) {
  int64_t nbytes = 0;
  if (!non_negative_int(arg, "nbytes", &nbytes)) return nullptr;
  try {
    at::Tensor block = stoichconv::HostBlockCache::instance().empty(
        {nbytes}, at::TensorOptions().dtype(at::kByte), nbytes);
    if (!block.defined()) Py_RETURN_NONE;
    return THPVariable_Wrap(block);
  } catch (const c10::OutOfMemoryError& e) {
    PyErr_SetString(PyExc_MemoryError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* host_cache_info_py(PyObject*, PyObject*) {
  return info_tuple(stoichconv::HostBlockCache::instance().info());
}

PyObject* host_cache_set_limit_py(PyObject*, PyObject* arg) {
  int64_t limit = 0;
  if (!non_negative_int(arg, "limit_bytes", &limit)) return nullptr;
  return info_tuple(stoichconv::HostBlockCache::instance().set_limit(limit));
}

PyObject* host_cache_clear_py(PyObject*, PyObject*) {
  return info_tuple(stoichconv::HostBlockCache::instance().clear());
}

PyMethodDef module_methods[] = {
    {"_host_block", host_block_py, METH_O,
     "A uint8 CPU tensor of `nbytes` on a block of the host block cache, or None when the "
     "cache is off or the size is below its minimum (stoichconv/host_block_cache.h)."},
    {"_host_cache_info", host_cache_info_py, METH_NOARGS,
     "(limit, cached bytes, cached blocks, hits, misses) of the host block cache."},
    {"_host_cache_set_limit", host_cache_set_limit_py, METH_O,
     "Keep at most `limit_bytes` of freed host blocks (0: the cache is off); returns the info."},
    {"_host_cache_clear", host_cache_clear_py, METH_NOARGS,
     "Return every cached host block to the system; returns the info."},
    {"_stoich_row_splits", stoich_row_splits_py, METH_O,
     "The number of partial sums of a CSR row of `row_length` incidences in the CUDA stoich "
     "conv kernels (stoichconv/stoich_conv_schedule.h)."},
    {nullptr, nullptr, 0, nullptr},
};
}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "stoichconv compiled kernels (operators live in torch.ops.stoichconv)",
      -1,
      module_methods,
  };
  return PyModule_Create(&module_def);
}
}
