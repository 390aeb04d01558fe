"""Host synchronisations of a fast HeteroCell training step.

On a GPU every data-dependent output size (the per-batch edge sets are compacted with
``nonzero``; ``unique`` picks the GPR source rows) and every ``.item()`` is a host sync. The CPU
test counts those ops in one forward + backward with a dispatch mode: the count is fixed by the
model's structure (a compaction per edge set and per kept-row list, plus the five perturbation
checks of an eager forward), not by the batch size, and nothing else in the step reads a value back.
The CUDA test (skipped only when no GPU is visible) counts the real syncs of the same step with
``torch.cuda.set_sync_debug_mode("warn")`` and checks they are no more than those ops plus one
read of the device status word per pert-mask op (two ``filter_edges``, one ``reaction_keep``: the
on-device index checks)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stoichconv.data import random_perturbations
from stoichconv.models.hetero_cell import HeteroCell
from stoichconv.testing import CudaSyncCounter, random_cell_graph

# ops whose output size or value must be read back by the host
DATA_DEPENDENT = {"nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
                  "_local_scalar_dense", "repeat_interleave"}


class _CountDataDependent(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in DATA_DEPENDENT:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _step(model, graph, pert, pert_ptr):
    pred, _ = model(graph, pert, pert_ptr)
    pred.square().mean().backward()


def _count(batch_size, device="cpu", num_layers=2):
    graph = random_cell_graph(seed=3).to(device)
    torch.manual_seed(0)
    model = HeteroCell.from_cell_graph(graph, hidden_channels=8, heads=2, num_layers=num_layers).to(device)
    pert, pert_ptr = random_perturbations(int(graph["gene"].num_nodes), batch_size, sizes=(1, 2), seed=4)
    pert, pert_ptr = pert.to(device), pert_ptr.to(device)
    _step(model, graph, pert, pert_ptr)  # the plan is built on the first call
    mode = _CountDataDependent()
    with mode:
        _step(model, graph, pert, pert_ptr)
    return model, graph, pert, pert_ptr, mode.counts


def test_data_dependent_ops_per_step_do_not_grow_with_the_batch():
    counts = {B: _count(B)[-1] for B in (2, 8)}
    assert counts[2] == counts[8], counts
    per_layer = {L: sum(_count(4, num_layers=L)[-1].values()) for L in (1, 2)}
    # the five checks of the perturbations (.item()) happen once per forward, the rest per layer
    assert counts[2]["_local_scalar_dense"] == 5, counts[2]
    assert per_layer[2] - per_layer[1] <= 8, per_layer  # at most one compaction per relation and layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_step_syncs_no_more_than_its_compactions():
    import stoichconv

    assert stoichconv.has_cuda_kernels(), "stoichconv._C has no CUDA kernels"
    model, graph, pert, pert_ptr, counts = _count(8, device="cuda")
    torch.cuda.synchronize()
    with CudaSyncCounter() as syncs:
        _step(model, graph, pert, pert_ptr)
    print(f"CUDA host syncs in one step: {syncs.count} (data-dependent ops: {dict(counts)})")
    status_reads = 3  # the pert-mask ops' device checks, one read each
    assert syncs.count <= sum(counts.values()) + status_reads, syncs.messages[:5]
