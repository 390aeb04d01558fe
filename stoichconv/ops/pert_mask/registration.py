"""Fake kernels of the compiled pert-mask ops (data-dependent output sizes are declared with
``torch.library.get_ctx().new_dynamic_size()`` so that ``torch.compile`` can trace around them);
the Triton ``filter_edges`` registers the same fake for its own op. The ``*_out`` variants
(mutating their buffers, returning nothing) have fakes that do nothing."""

from __future__ import annotations

import torch

from stoichconv._extension import has_compiled_kernels

def filter_edges_fake(edge_index, num_nodes, pert, pert_ptr, relabel):
    B = pert_ptr.shape[0] - 1
    E = edge_index.shape[1]
    n_out = torch.library.get_ctx().new_dynamic_size()
    return (
        edge_index.new_empty(2, n_out, dtype=torch.long),  # ids are int64 whatever the input width
        edge_index.new_empty(B + 1, dtype=torch.long),
        edge_index.new_empty(B * E, dtype=torch.bool),
        edge_index.new_empty(B * num_nodes, dtype=torch.bool),
        edge_index.new_empty(B + 1, dtype=torch.long),
    )


def reaction_keep_fake(gpr_index, num_reactions, pert, pert_ptr):
    return gpr_index.new_empty(pert_ptr.shape[0] - 1, num_reactions, dtype=torch.bool)


def filter_bipartite_fake(edge_index, num_src, num_dst, num_samples, src_keep, dst_keep, relabel):
    E = edge_index.shape[1]
    n_out = torch.library.get_ctx().new_dynamic_size()
    return (
        edge_index.new_empty(2, n_out, dtype=torch.long),
        edge_index.new_empty(num_samples + 1, dtype=torch.long),
        edge_index.new_empty(num_samples * E, dtype=torch.bool),
        edge_index.new_empty(n_out, dtype=torch.long),
    )


def kept_nodes_fake(keep):
    n_out = torch.library.get_ctx().new_dynamic_size()
    return (keep.new_empty(n_out, dtype=torch.long), keep.new_empty(n_out, dtype=torch.long),
            keep.new_empty(keep.shape[0] + 1, dtype=torch.long))


if has_compiled_kernels():
    torch.library.register_fake("stoichconv::filter_edges")(filter_edges_fake)
    torch.library.register_fake("stoichconv::reaction_keep")(reaction_keep_fake)
    torch.library.register_fake("stoichconv::filter_bipartite")(filter_bipartite_fake)
    torch.library.register_fake("stoichconv::kept_nodes")(kept_nodes_fake)
    # The out= variants write into their buffers and return nothing.
    for _name in ("filter_edges_out", "reaction_keep_out", "filter_bipartite_out", "kept_nodes_out"):
        torch.library.register_fake(f"stoichconv::{_name}")(lambda *args, **kwargs: None)
