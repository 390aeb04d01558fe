"""Stoich conv benchmark cases on the bundled yeast-GEM metabolic graph.

Each row times one forward + backward (w.r.t. the input and every parameter)
of a StoichHypergraphConv on a perturbation batch of B samples:

* ``reference``: the seed's PyG layer (``stoichconv.reference``, the one the tests compare
  against) on the compacted block-diagonal batch (what the original model ran; compaction by
  :func:`stoichconv.testing.compact_metabolic_batch`, the tests' helper);
* ``torch.sparse`` (plain config only): what a user would write with
  ``torch.sparse`` CSR SpMM: ``D S B Sᵀ X Θ + b`` as two block-diagonal CSR products;
* ``cpu`` / ``cuda`` / ``triton``: the drop-in layer (``stoichconv.nn``) on the
  shared-topology batch [B, N, C] with a per-sample reaction keep-mask;
* ``cpu bf16-mixed`` / ``cuda bf16-mixed``: the same layer (float32 parameters and inputs) under
  ``torch.autocast(device, torch.bfloat16)``, as mixed-precision training runs it; besides the
  error against the float32 reference row its ``max_rel_err_vs_fp64`` column is the error against
  the reference layer run in float64 on the same inputs (output, dL/dx and dL/dW).

Every row of a group states the same ``bytes_moved``: the floor of one forward + backward of the
layer on the shared-topology batch (:func:`stoichconv.bench.limits.stoich_layer_bytes`; bf16-mixed
rows with 2-byte features and weights, the dtype their kernels run in), and the float32 rows the
same ``flops``, those of its dense products (:func:`stoichconv.bench.limits.stoich_layer_flops`),
from which ``% roofline`` takes the products' floor (not on bf16-mixed rows: the measured product
throughput is float32's).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from functools import partial

import torch

from stoichconv.bench.core import KERNEL_BACKENDS, REFERENCE, BenchCase
from stoichconv.bench.limits import stoich_layer_bytes, stoich_layer_flops
from stoichconv.testing import compact_metabolic_batch, random_perturbations

LOW_PRECISION_BACKENDS = ("cpu", "cuda")  # which backends also get a bf16-mixed row
CONFIGS = {
    "plain": dict(is_stoich_gated=False, use_attention=False, heads=1),
    "gated+attention": dict(is_stoich_gated=True, use_attention=True, attention_mode="node", heads=2),
}


@dataclass
class MetabolicBatch:
    """One perturbation batch on the metabolic graph, in both layouts."""

    x: torch.Tensor  # [B, N, F] shared-topology features
    hyperedge_attr: torch.Tensor  # [M, F]
    edge_index: torch.Tensor  # wildtype [2, nnz]
    stoich: torch.Tensor  # wildtype [nnz]
    reaction_keep: torch.Tensor  # [B, M]
    compact_edge_index: torch.Tensor  # block-diagonal [2, nnz_c], reaction ids offset by kept counts
    compact_stoich: torch.Tensor
    compact_hyperedge_attr: torch.Tensor  # [M_c, F]
    grad_out: dict  # per output width: upstream gradient [B, N, width]

    @property
    def batch_size(self) -> int:
        return self.x.size(0)


def make_batch(batch_size: int, channels: int, device, dtype=torch.float32, seed: int = 0) -> MetabolicBatch:
    from stoichconv.data import load_cell_graph
    from stoichconv.perturb import reaction_keep as reaction_keep_op

    graph = load_cell_graph(seed=0)
    met = graph["metabolite", "reaction", "metabolite"]
    N, M = graph["metabolite"].num_nodes, graph["reaction"].num_nodes
    pert, pert_ptr = random_perturbations(graph["gene"].num_nodes, batch_size, sizes=(1, 2, 3), seed=seed)
    keep = reaction_keep_op(graph["gene", "gpr", "reaction"].edge_index, M, pert, pert_ptr)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, N, channels, generator=gen, dtype=dtype)
    attr = torch.randn(M, channels, generator=gen, dtype=dtype)
    compact, compact_stoich, kept_reactions = compact_metabolic_batch(met.hyperedge_index, met.stoichiometry, keep, N)
    widths = {channels * cfg["heads"] for cfg in CONFIGS.values()}
    grads = {w: torch.randn(batch_size, N, w, generator=gen, dtype=dtype) for w in widths}
    to = partial(torch.Tensor.to, device=device)
    return MetabolicBatch(
        x=to(x),
        hyperedge_attr=to(attr),
        edge_index=to(met.hyperedge_index),
        stoich=to(met.stoichiometry.to(dtype)),
        reaction_keep=to(keep),
        compact_edge_index=to(compact),
        compact_stoich=to(compact_stoich.to(dtype)),
        compact_hyperedge_attr=to(attr[kept_reactions]),
        grad_out={w: to(g) for w, g in grads.items()},
    )


def _fwd_bwd(layer, inputs: dict, x: torch.Tensor, grad_out: torch.Tensor):
    """One forward + backward; returns (output, dL/dx, dL/dlin.weight) for the error column."""
    x = x.detach().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    out = layer(x, **inputs)
    out.backward(grad_out.reshape(out.shape))
    return out.detach(), x.grad, layer.lin.weight.grad


def _fwd_bwd_autocast(layer, inputs: dict, x: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype):
    with torch.autocast(x.device.type, dtype=dtype):
        return _fwd_bwd(layer, inputs, x, grad_out)


def _error_vs_float64(run, reference, inputs64: dict, x64: torch.Tensor, grad_out64: torch.Tensor) -> dict:
    """``{"max_rel_err_vs_fp64": ...}`` of one more ``run()`` against ``reference`` in float64."""
    from stoichconv.bench.core import max_relative_error

    expected = _fwd_bwd(reference, inputs64, x64, grad_out64)
    return {"max_rel_err_vs_fp64": f"{max_relative_error(run(), expected):.1e}"}


def sparse_csr_operators(edge_index, stoich, num_nodes, num_edges):
    """The two normalised incidence operators of the plain config as CSR:
    ``A1 = B Sᵀ`` [M, N] and ``A2 = D S`` [N, M]."""
    abs_s = stoich.abs()
    node_deg = torch.zeros(num_nodes, dtype=stoich.dtype, device=stoich.device).index_add_(0, edge_index[0], abs_s)
    edge_deg = torch.zeros(num_edges, dtype=stoich.dtype, device=stoich.device).index_add_(0, edge_index[1], abs_s)
    inv = lambda d: torch.where(d > 0, 1 / d.clamp_min(1e-30), torch.zeros_like(d))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        a1 = torch.sparse_coo_tensor(edge_index.flip(0), inv(edge_deg)[edge_index[1]] * stoich, (num_edges, num_nodes))
        a2 = torch.sparse_coo_tensor(edge_index, inv(node_deg)[edge_index[0]] * stoich, (num_nodes, num_edges))
        return a1.coalesce().to_sparse_csr(), a2.coalesce().to_sparse_csr()


class SparseSpMMLayer(torch.nn.Module):
    """Plain-config stoich conv written with torch.sparse CSR SpMM; parameters
    borrowed from a reference layer (same ``lin`` and ``bias``)."""

    def __init__(self, source, a1, a2):
        super().__init__()
        self.lin, self.bias = source.lin, source.bias
        self.a1, self.a2 = a1, a2

    def forward(self, x):
        return torch.sparse.mm(self.a2, torch.sparse.mm(self.a1, self.lin(x))) + self.bias


def cases(args) -> list[BenchCase]:
    from stoichconv.backends import available_backends
    from stoichconv.nn import StoichHypergraphConv as FastConv
    from stoichconv.reference import StoichHypergraphConv as ReferenceConv

    device = torch.device(args.device)
    channels = args.channels
    runnable = available_backends(device, "stoich_conv")["stoich_conv"]
    fast_backends = [b for b in args.backends if b in KERNEL_BACKENDS and b in runnable]
    result = []
    for batch_size in args.batches:
        data = make_batch(batch_size, channels, device)
        N, M = data.x.size(1), data.reaction_keep.size(1)
        x_compact = data.x.reshape(batch_size * N, channels)
        for config, options in CONFIGS.items():
            torch.manual_seed(0)
            reference = ReferenceConv(channels, channels, **options).to(device)
            torch.nn.init.normal_(reference.bias, std=0.1)
            grad_out = data.grad_out[channels * options["heads"]]
            attr_kw = options["use_attention"]
            floor = partial(stoich_layer_bytes, batch_size, N, M, data.edge_index.size(1), channels,
                            options["heads"], channels, attention=attr_kw)
            flops = stoich_layer_flops(batch_size, N, channels, options["heads"], channels)
            result.append(
                BenchCase(
                    "stoich_conv",
                    REFERENCE,
                    config,
                    batch_size,
                    partial(
                        _fwd_bwd,
                        reference,
                        dict(
                            edge_index=data.compact_edge_index,
                            stoich=data.compact_stoich,
                            hyperedge_attr=data.compact_hyperedge_attr if attr_kw else None,
                            num_edges=int(data.reaction_keep.sum()),
                        ),
                        x_compact,
                        grad_out,
                    ),
                    bytes_moved=floor(elem=4), flops=flops,
                )
            )
            if config == "plain" and "torch.sparse" in args.backends:
                a1, a2 = sparse_csr_operators(
                    data.compact_edge_index, data.compact_stoich, batch_size * N, int(data.reaction_keep.sum())
                )
                result.append(
                    BenchCase(
                        "stoich_conv", "torch.sparse", config, batch_size,
                        partial(_fwd_bwd, SparseSpMMLayer(reference, a1, a2), {}, x_compact, grad_out),
                        bytes_moved=floor(elem=4), flops=flops,
                    )
                )
            for backend in fast_backends:
                fast = FastConv(channels, channels, backend=backend, **options).to(device)
                fast.load_state_dict(reference.state_dict())
                inputs = dict(
                    edge_index=data.edge_index,
                    stoich=data.stoich,
                    hyperedge_attr=data.hyperedge_attr if attr_kw else None,
                    num_edges=M,
                    reaction_keep=data.reaction_keep,
                )
                result.append(
                    BenchCase("stoich_conv", backend, config, batch_size, partial(_fwd_bwd, fast, inputs, data.x, grad_out),
                              bytes_moved=floor(elem=4), flops=flops)
                )
                if backend in LOW_PRECISION_BACKENDS:
                    run = partial(_fwd_bwd_autocast, fast, inputs, data.x, grad_out, torch.bfloat16)
                    reference64 = copy.deepcopy(reference).double()
                    inputs64 = dict(edge_index=data.compact_edge_index, stoich=data.compact_stoich.double(),
                                    hyperedge_attr=data.compact_hyperedge_attr.double() if attr_kw else None,
                                    num_edges=int(data.reaction_keep.sum()))
                    measure = partial(_error_vs_float64, run, reference64, inputs64, x_compact.double(),
                                      grad_out.double())
                    result.append(BenchCase("stoich_conv", f"{backend} bf16-mixed", config, batch_size, run,
                                            measure_extra=measure, bytes_moved=floor(elem=2)))
    return result
