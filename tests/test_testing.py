"""The shared test toolkit (stoichconv.testing): importable without pytest, the backend x device
params follow the backend table and skip only for a missing GPU or interpreter, the tolerance
table, the generators' guaranteed cases and the hand-computed test vector."""

import subprocess
import sys
import textwrap

import pytest
import torch

from stoichconv.backends import OPS
from stoichconv.reference.dense import dense_stoich_conv
from stoichconv.testing import (
    backend_cases,
    backend_devices,
    backend_params,
    compact_metabolic_batch,
    kernel_op,
    param_id,
    random_cell_graph,
    random_deletions,
    random_edge_index,
    random_hypergraph,
    random_keep,
    skip_reason,
    spec_test_vector,
    tolerance,
)


def test_imports_without_pytest():
    script = textwrap.dedent(
        """
        import sys
        class BlockPytest:
            def find_spec(self, name, path=None, target=None):
                if name == "pytest" or name.startswith("_pytest"):
                    raise ImportError("pytest blocked for the test")
        sys.meta_path.insert(0, BlockPytest())
        import torch, stoichconv.testing as t
        assert "pytest" not in sys.modules
        print(t.tolerance(torch.float32), t.spec_test_vector().expected.shape)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(1e-05, 1e-05)" in result.stdout


@pytest.mark.parametrize("op", sorted(OPS))
def test_params_follow_the_backend_table(op):
    pairs = backend_devices(op, reference=True)
    for backend in OPS[op].backends:
        devices = {d for b, d in pairs if b == backend}
        assert devices == ({backend} if backend in ("cpu", "cuda") else {"cpu", "cuda"}), backend
    assert all(b != "reference" for b, _ in backend_devices(op))
    params = backend_params(op, reference=True)
    assert [p.id for p in params] == [param_id(b, d) for b, d in pairs]
    for p in params:
        backend, device = p.values
        reason = skip_reason(backend, device)
        skips = [m for m in p.marks if m.name == "skip"]
        assert [m.kwargs["reason"] for m in skips] == ([reason] if reason else [])
        assert any(m.name == "cuda" for m in p.marks) == (device.type == "cuda")
    assert {p.id for p in backend_params(op, devices=("cuda",))} == {p.id for p in params
                                                                   if p.values[1].type == "cuda"} - {
        p.id for p in params if p.values[0] == "reference"}


def test_skip_reasons_are_only_gpu_and_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in skip_reason("triton", "cpu")
    for backend in ("cpu", "reference"):
        assert skip_reason(backend, "cpu") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert skip_reason("triton", "cpu") is None
    expected = None if torch.cuda.is_available() else "no CUDA GPU visible"
    for backend in ("cuda", "triton", "reference"):
        assert skip_reason(backend, "cuda") == expected


def test_backend_cases_give_the_interpreter_its_subset():
    params = backend_params("stoich_conv")
    cases = backend_cases(params, [(1,), (2,)], [(3,)])
    by_backend = {}
    for case in cases:
        by_backend.setdefault(case.id.rsplit("-", 1)[0], []).append(case.values[2])
    assert by_backend.pop("triton-cpu") == [3]
    assert all(values == [1, 2] for values in by_backend.values())


def test_kernel_op_names_the_backends_operator():
    assert kernel_op("stoich_conv", "cpu", "cpu") is torch.ops.stoichconv.stoich_conv_forward.default
    assert kernel_op("stoich_conv", "cpu", "cpu", name="backward") is torch.ops.stoichconv.stoich_conv_backward.default
    assert kernel_op("group_softmax", "cpu", "cpu", name="backward") is torch.ops.stoichconv.group_softmax_backward.default
    if skip_reason("triton", "cpu") is None:
        assert kernel_op("filter_edges", "triton", "cpu") is torch.ops.stoichconv.triton_filter_edges.default


def test_tolerance_table():
    assert tolerance(torch.float64) == (1e-12, 1e-12)
    assert tolerance(torch.float32) == (1e-5, 1e-5)
    assert tolerance(torch.int64) == (0.0, 0.0)
    # derived from eps: float16 and bfloat16, and long float32 sums
    assert 1e-3 < tolerance(torch.float16)[0] < 1e-2 < tolerance(torch.bfloat16)[0] < 5e-2
    assert tolerance(torch.float32, reduction_length=10) == (1e-5, 1e-5)
    assert tolerance(torch.float32, reduction_length=10_000)[0] > 1e-4
    assert tolerance(torch.float64, reduction_length=1_000) == (1e-12, 1e-12)


def test_spec_test_vector_is_the_dense_formula():
    v = spec_test_vector()
    out = dense_stoich_conv(v.x, v.edge_index, v.stoich, num_nodes=v.num_nodes, num_edges=v.num_edges)
    torch.testing.assert_close(out[:, 0], v.expected, rtol=0, atol=1e-15)
    assert spec_test_vector(torch.float32).x.dtype == torch.float32


def test_generators_force_their_awkward_cases():
    edge_index, stoich = random_hypergraph(9, 7, 30, zero_coefficient=True)
    assert int(edge_index[0].max()) < 8 and int(edge_index[1].max()) < 6  # isolated metabolite, empty reaction
    assert torch.equal(edge_index[:, 0], edge_index[:, 1]) and stoich[2] == -3 and stoich[3] == 0
    assert bool(random_keep(4, 7)[-1].all())
    ei = random_edge_index(10, 20, isolated=3)
    assert ei[0, 0] == ei[1, 0] and torch.equal(ei[:, 1], ei[:, 2]) and torch.equal(ei[:, 3], ei[:, 2].flip(0))
    assert int(ei.max()) < 7
    pert, ptr = random_deletions(30, 5, seed=1)
    first = pert[: ptr[1]].tolist()
    assert len(first) > len(set(first))  # a duplicate deletion
    assert ptr[2] == ptr[1]  # an empty set
    assert ptr[0] == 0 and ptr[-1] == pert.numel() and pert.dtype == torch.long
    graph = random_cell_graph()
    assert graph["gene"].num_nodes == 40 and graph["metabolite", "reaction", "metabolite"].num_edges == 25


def test_compaction_renumbers_reactions_by_kept_counts():
    edge_index = torch.tensor([[0, 1, 2], [0, 1, 1]])
    keep = torch.tensor([[False, True], [True, True]])
    compact, stoich, kept = compact_metabolic_batch(edge_index, torch.tensor([1.0, 2.0, 3.0]), keep, 3)
    assert compact.tolist() == [[1, 2, 3, 4, 5], [0, 0, 1, 2, 2]]
    assert stoich.tolist() == [2.0, 3.0, 1.0, 2.0, 3.0] and kept.tolist() == [1, 0, 1]
