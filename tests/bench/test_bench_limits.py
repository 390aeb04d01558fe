"""The benchmark's byte floors and limit columns (stoichconv.bench.limits, core, cli): each
formula on a tiny graph against an independent count (the nbytes of the tensors the kernel
actually reads and writes), the JSON carrying the new fields, and the plot being written.
No timed assertions: the measured bandwidths are only checked to be positive numbers."""

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stoichconv import has_compiled_kernels
from stoichconv.bench import limits
from stoichconv.bench.core import BenchCase, run_cases, write_json, write_plot
from stoichconv.train import make_small_cell_graph


def test_the_compiled_kernels_are_built():
    # the byte-count tests below run the compiled ops; `make test` builds them first
    assert has_compiled_kernels(), "stoichconv._C is not built"


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KernelIO(TorchDispatchMode):
    """Records, per stoichconv:: kernel call, the nbytes of its tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name.startswith("stoichconv::"):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            ins = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((name.split("::")[1], nbytes(*ins), nbytes(*[o for o in outs if isinstance(o, torch.Tensor)])))
        return out


def tiny_plan(seed=0):
    from stoichconv.ops import build_stoich_plan

    gen = torch.Generator().manual_seed(seed)
    N, M, nnz = 7, 5, 16
    met = torch.randint(0, N, (nnz,), generator=gen)
    rxn = torch.cat([torch.arange(M), torch.randint(0, M, (nnz - M,), generator=gen)])
    stoich = torch.randn(nnz, generator=gen)
    return build_stoich_plan(torch.stack([met, rxn]), stoich, N, M), gen


@pytest.mark.parametrize("H,C", [(1, 4), (2, 3)])
def test_stoich_conv_floors_equal_the_tensors_the_kernels_read_and_write(H, C):
    plan, gen = tiny_plan()
    B, N, M, nnz = 3, plan.num_metabolites, plan.num_reactions, plan.nnz
    y = torch.randn(B, N, H, C, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, nnz, H, generator=gen, dtype=torch.float64)
    keep = torch.rand(B, M, generator=gen) > 0.3
    structure = (plan.metabolite_index, plan.reaction_index, plan.reaction_ptr, plan.reaction_perm,
                 plan.metabolite_ptr, plan.metabolite_perm)
    out, hidden, node_norm, edge_norm = torch.ops.stoichconv.stoich_conv_forward(
        y, weight, keep, plan.metabolite_index, plan.reaction_index, plan.abs_stoich.double(), plan.reaction_ptr,
        plan.reaction_perm, plan.metabolite_ptr, plan.metabolite_perm, True)
    assert hidden.shape == (B, M, H, C)
    grad_out = torch.randn_like(out)
    grad_y, grad_weight = torch.ops.stoichconv.stoich_conv_backward(
        grad_out, None, y, weight, keep, hidden, node_norm, edge_norm, *structure, True, True)
    # Each stage reads, per incidence, its ordering and the gathered id, plus both row pointers.
    stage_structure = nbytes(plan.reaction_perm, plan.metabolite_index)
    pointers = nbytes(plan.reaction_ptr, plan.metabolite_ptr)
    # forward: y read, hidden written and read, out written; weight read per stage; norms written
    forward = (nbytes(y, out) + 2 * nbytes(hidden) + 2 * nbytes(weight) + nbytes(node_norm, edge_norm)
               + nbytes(keep) + 2 * stage_structure + pointers)
    # backward: G read twice, R (hidden-sized) written and read twice, grad_y written, hidden and y
    # read; weight read twice, grad_weight written; norms and keep read twice; plan three times.
    backward = (2 * nbytes(grad_out) + 3 * nbytes(hidden) + nbytes(grad_y) + nbytes(hidden) + nbytes(y)
                + 2 * nbytes(weight) + nbytes(grad_weight) + 2 * nbytes(node_norm, edge_norm) + 2 * nbytes(keep)
                + 3 * stage_structure + pointers)
    norm_elem = node_norm.element_size()
    assert limits.stoich_forward_bytes(B, N, M, nnz, H, C, elem=8, norm_elem=norm_elem) == forward
    assert limits.stoich_backward_bytes(B, N, M, nnz, H, C, elem=8, norm_elem=norm_elem) == backward


def test_stoich_layer_floor_adds_the_linear_and_bias():
    B, N, M, nnz, F, H, C = 2, 7, 5, 16, 3, 2, 4
    op = limits.stoich_forward_bytes(B, N, M, nnz, H, C) + limits.stoich_backward_bytes(B, N, M, nnz, H, C)
    x, W, y = B * N * F, F * H * C, B * N * H * C  # elements
    linear = (x + W + y) + (y + x + W + x + W)  # forward; backward: dL/dy, x, W read, dL/dx, dL/dW written
    bias = 3 * y + H * C
    assert limits.stoich_layer_bytes(B, N, M, nnz, F, H, C) == op + 4 * (linear + bias)
    assert limits.stoich_layer_bytes(B, N, M, nnz, F, H, C, attention=True) == op + 4 * (linear + bias + 2 * M * F)


def test_filter_edges_floor_equals_its_inputs_and_result():
    from stoichconv.data import PHYSICAL
    from stoichconv.perturb import filter_edges
    from stoichconv.testing import random_perturbations

    graph = make_small_cell_graph(seed=0)
    edge_index, num_genes = graph[PHYSICAL].edge_index, int(graph["gene"].num_nodes)
    pert, pert_ptr = random_perturbations(num_genes, 4, sizes=(1, 2, 3), seed=1)
    result = filter_edges(edge_index, num_genes, pert, pert_ptr, backend="cpu")
    assert limits.kept_edge_count(edge_index, num_genes, pert, pert_ptr) == result.edge_index.size(1)
    independent = nbytes(edge_index, pert, pert_ptr) + limits.tensor_bytes(tuple(result))
    assert limits.filter_edges_case_bytes(edge_index, num_genes, pert, pert_ptr) == independent


def test_perturb_batch_floor_is_the_wildtype_plus_the_batch():
    from stoichconv.reference.perturb import perturb_batch_reference
    from stoichconv.testing import random_perturbations

    graph = make_small_cell_graph(seed=0)
    pert, pert_ptr = random_perturbations(int(graph["gene"].num_nodes), 3, sizes=(1, 2), seed=2)
    batch = perturb_batch_reference(graph, pert, pert_ptr)
    count = lambda data: sum(v.numel() * v.element_size() for store in data.stores  # noqa: E731
                             for v in store.values() if isinstance(v, torch.Tensor))
    assert limits.tensor_bytes(graph) == count(graph) > 0
    expected = count(graph) + count(batch) + nbytes(pert, pert_ptr)
    assert limits.perturb_batch_case_bytes(graph, pert, pert_ptr) == expected


def test_gatv2_floors_equal_the_tensors_the_kernels_read_and_write():
    from stoichconv.ops.gatv2 import gatv2_attention
    from stoichconv.testing import random_edge_set

    gen = torch.Generator().manual_seed(3)
    H, C, n_src, n_dst = 2, 5, 9, 6
    edges = random_edge_set(n_src, n_dst, num_rows=8, num_edges=20, seed=3, empty_rows=(2,))
    x_l = torch.randn(n_src, H, C, generator=gen, requires_grad=True)
    x_r = torch.randn(n_dst, H, C, generator=gen, requires_grad=True)
    att = torch.randn(H, C, generator=gen, requires_grad=True)

    def step():
        out = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="cpu")
        out.backward(torch.ones_like(out))

    with KernelIO() as io:
        step()
    measured = {name: i + o for name, i, o in io.calls}
    assert set(measured) == {"gatv2_forward", "gatv2_backward"}
    total, per_op = limits.count_kernel_bytes(step)
    assert per_op == measured and total == sum(measured.values())
    E, rows = edges.src.numel(), edges.crow.numel() - 1
    assert limits.gatv2_forward_bytes(E, n_src, n_dst, rows, H, C) == measured["gatv2_forward"]
    assert limits.gatv2_backward_bytes(E, n_src, n_dst, rows, H, C) == measured["gatv2_backward"]


def test_train_step_floor_counts_every_graph_kernel_and_the_optimizer():
    from stoichconv.models import HeteroCell
    from stoichconv.reference.hetero_cell import nan_mse_loss
    from stoichconv.testing import random_perturbations

    graph = make_small_cell_graph(seed=0)
    torch.manual_seed(0)
    model = HeteroCell.from_cell_graph(graph, hidden_channels=8, num_layers=2, heads=2, dropout=0.0,
                                       metabolism_to_gene=False, backend="cpu")
    optimizer = torch.optim.AdamW(model.parameters())
    pert, ptr = random_perturbations(int(graph["gene"].num_nodes), 3, seed=1)

    def step():
        pred, _ = model(graph, pert, ptr)
        loss = nan_mse_loss(pred, torch.zeros_like(pred))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with KernelIO() as io:
        step()
    total, per_op = limits.train_step_bytes(model, step)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert per_op["parameters+AdamW"] == 10 * params
    # (the metabolism output does not reach the prediction, so no stoich conv backward runs)
    assert {"gatv2_forward", "gatv2_backward", "stoich_conv_forward", "filter_edges"} <= set(per_op)
    assert total == sum(per_op.values())
    # the GATv2 kernels' floors are exactly their arguments + results (the formula's terms)
    for name in ("gatv2_forward", "gatv2_backward"):
        assert per_op[name] == sum(i + o for n, i, o in io.calls if n == name)
    # the mask kernels are counted as their inputs + outputs
    for name, _i, _o in io.calls:
        assert name in per_op


def test_copy_bandwidth_is_measured_on_a_reused_buffer():
    gbs = limits.copy_bandwidth_gbs("cpu", nbytes=4 * 2**20, repeats=3, warmup=1)
    assert math.isfinite(gbs) and gbs > 0
    assert limits.achieved(10**9, 1000.0, 2.0) == {"gbs": 1.0, "pct_copy_bw": 50.0}
    assert limits.achieved(None, 1.0, 2.0) == {}


def test_train_step_floors_count_bytes_and_products_in_one_step(monkeypatch):
    """hetero_cell_cases.step_floors: the bytes are train_step_bytes' and the FLOPs every matrix
    product of the step (at least the layers' input projections, forward + backward); one
    counting step for both, however often they are asked for."""
    from stoichconv.bench import hetero_cell_cases

    counted = []
    real = limits.train_step_bytes
    monkeypatch.setattr(limits, "train_step_bytes", lambda *a: counted.append(1) or real(*a))
    bytes_of, flops_of = hetero_cell_cases.step_floors(1, 8, "cpu", None, 2)
    nbytes, flops = bytes_of(), flops_of()
    assert bytes_of() == nbytes and flops_of() == flops and counted == [1]
    assert nbytes > 0
    graph = hetero_cell_cases._setup("fast", 1, 8, "cpu")[0]
    assert flops >= limits.stoich_layer_flops(1, graph["metabolite"].num_nodes, 8, 1, 8)


def test_roofline_is_the_binding_limit():
    from stoichconv.bench.core import BenchResult, apply_roofline

    def row(nbytes, flops, ms):
        return BenchResult("op", "cpu", "cfg", 1, ms, None, None, {}, bytes_moved=nbytes, flops=flops)

    # 10 GB/s and 100 GFLOP/s: 1 GB is a 100 ms floor, 20 GFLOP a 200 ms one
    bytes_bound, flops_bound, neither = row(10**9, 10**9, 400.0), row(10**9, 20 * 10**9, 400.0), row(None, None, 1.0)
    apply_roofline([bytes_bound, flops_bound, neither], copy_gbs=10.0, gemm_gflops=100.0)
    assert bytes_bound.pct_roofline == pytest.approx(25.0)
    assert flops_bound.pct_roofline == pytest.approx(50.0)
    assert neither.pct_roofline is None
    assert flops_bound.record()["flops"] == 20 * 10**9 and flops_bound.record()["pct_roofline"] == 50.0
    assert limits.stoich_layer_flops(2, 3, 4, 2, 5) == 3 * 2 * 2 * 3 * 4 * 2 * 5


def test_gemm_limit_and_cpu_name():
    gflops = limits.gemm_gflops("cpu", rows=4096, width=32, repeats=3, warmup=1)
    assert math.isfinite(gflops) and gflops > 0
    assert isinstance(limits.cpu_name(), str) and limits.cpu_name()


def synthetic_results():
    x = torch.randn(1000)
    cases = [
        BenchCase("op_a", "reference", "cfg", 2, lambda: x * 2, bytes_moved=8000),
        BenchCase("op_a", "cpu", "cfg", 2, lambda: x + x, bytes_moved=lambda: 8000),
        BenchCase("op_a", "cpu", "cfg", 8, lambda: x + x, bytes_moved=32000),
        BenchCase("op_b", "reference", "cfg", 2, lambda: None),
        BenchCase("op_b", "cpu", "cfg", 2, lambda: None),
    ]
    results = run_cases(cases, budget_s=0.0, progress=False, copy_gbs=10.0)
    return sorted(results, key=lambda r: (r.op, r.bytes_moved is None, r.batch, r.backend != "reference"))


def test_json_records_carry_bytes_and_share_of_the_limit(tmp_path):
    results = synthetic_results()
    path = tmp_path / "bench.json"
    write_json(results, str(path), {"copy_gbs": 10.0})
    data = json.loads(path.read_text())
    assert data["metadata"]["copy_gbs"] == 10.0
    records = {(r["op"], r["backend"], r["batch"]): r for r in data["records"]}
    for result in results[:3]:
        r = records[(result.op, result.backend, result.batch)]
        assert {"bytes_moved", "gbs", "pct_copy_bw"} <= set(r)
        assert result.gbs == pytest.approx(result.bytes_moved / (result.median_ms * 1e-3) / 1e9)
        assert result.pct_copy_bw == pytest.approx(10 * result.gbs)
        assert (r["bytes_moved"], r["gbs"], r["pct_copy_bw"]) == (
            result.bytes_moved, round(result.gbs, 3), round(result.pct_copy_bw, 3))
    assert records[("op_a", "cpu", 2)]["bytes_moved"] == 8000  # a callable floor is resolved
    assert records[("op_b", "cpu", 2)]["bytes_moved"] is None and records[("op_b", "cpu", 2)]["pct_copy_bw"] is None


def test_plot_is_written(tmp_path):
    path = tmp_path / "bench.png"
    write_plot(synthetic_results(), str(path), copy_gbs=10.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_cli_writes_the_limit_columns(tmp_path, capsys):
    from stoichconv.bench.cli import main

    json_path, plot_path = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["--ops", "filter_edges", "--batches", "1", "--backends", "reference,cpu", "--budget", "0",
                 "--threads", "1", "--no-progress", "--json", str(json_path), "--plot", str(plot_path)]) == 0
    table = capsys.readouterr().out
    assert "% copy BW" in table and "GB/s" in table and "MB moved" in table
    data = json.loads(json_path.read_text())
    assert data["metadata"]["copy_gbs"] > 0 and data["metadata"]["gemm_gflops"] > 0 and data["metadata"]["cpu"]
    assert "GFLOP/s" in table and "% roofline" in table
    assert all(r["pct_roofline"] == pytest.approx(r["pct_copy_bw"], rel=1e-3) for r in data["records"])  # no flops
    assert {"reference", "cpu"} <= {r["backend"] for r in data["records"]}
    assert all(r["bytes_moved"] > 0 and r["pct_copy_bw"] > 0 for r in data["records"])
    assert plot_path.stat().st_size > 0


def test_gpu_bench_uses_the_shared_floors():
    """benchmarks/gpu_bench.py takes its formulas and copy measurement from stoichconv.bench.limits,
    and its training-step row gets the floor counted on the first fast model timed."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", path)
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    assert gpu_bench.stoich_forward_bytes is limits.stoich_forward_bytes
    assert gpu_bench.tensor_bytes is limits.tensor_bytes
    (_group, _name, _shape, step, step_bytes), = gpu_bench.train_step_cases("cpu", 2, True, small=True)
    assert step_bytes(None) is None  # nothing timed yet
    step("cpu")
    counted = step_bytes("cpu")
    assert counted > 0 and step_bytes(None) == counted


def test_a_missing_allocator_names_the_package_to_install(monkeypatch):
    from stoichconv.bench import cli

    monkeypatch.setitem(cli.ALLOCATORS, "nosuchalloc", ("libnosuchalloc.so.9", "libnosuchalloc9"))
    with pytest.raises(SystemExit, match="apt-get install -y libnosuchalloc9"):
        cli.find_allocator("nosuchalloc")
    with pytest.raises(SystemExit, match="apt-get install -y libnosuchalloc9"):
        cli.preload_allocator("nosuchalloc", [])


@pytest.mark.parametrize("name", ["jemalloc", "tcmalloc"])
def test_a_preloaded_allocator_is_recognised(name):
    import os
    import subprocess
    import sys

    from stoichconv.bench import cli

    code = "from stoichconv.bench.cli import loaded_allocator; print(loaded_allocator())"
    try:
        path = cli.find_allocator(name)
    except SystemExit as error:  # not installed here: the error says how to install it
        assert f"apt-get install -y {cli.ALLOCATORS[name][1]}" in str(error)
    else:
        env = {**os.environ, "LD_PRELOAD": path}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == name
    plain = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
                           capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "glibc"


def test_a_case_is_timed_at_least_its_min_repeats(monkeypatch):
    """BenchCase.min_repeats is honoured even when one call exceeds the time budget (the
    training-step rows ask for the median of at least 5 steps)."""
    from stoichconv.bench import hetero_cell_cases
    from stoichconv.bench.core import BenchCase, run_cases

    calls = []
    case = BenchCase("op", "reference", "cfg", 1, run=lambda: calls.append(1), min_repeats=7)
    run_cases([case], budget_s=0.0, progress=False)
    assert len(calls) == 1 + 7  # the warm-up call, then 7 timed ones
    assert hetero_cell_cases.STEP_REPEATS >= 5


def test_a_case_timed_elsewhere_is_not_run_here():
    """BenchCase.timed (a median measured in another process) replaces the timing of ``run``,
    and its output is the one the group's other rows are compared with."""
    import torch

    from stoichconv.bench.core import BenchCase, run_cases

    calls = []
    reference = BenchCase("op", "reference", "cfg", 1, run=lambda: calls.append(1),
                          timed=lambda: (123.0, torch.ones(3)))
    fast = BenchCase("op", "cpu", "cfg", 1, run=lambda: torch.ones(3) * 2)
    ref_row, fast_row = run_cases([reference, fast], budget_s=0.0, progress=False)
    assert calls == [] and ref_row.median_ms == 123.0
    assert fast_row.max_rel_err == 1.0 and fast_row.ratio_vs_reference == 123.0 / fast_row.median_ms
