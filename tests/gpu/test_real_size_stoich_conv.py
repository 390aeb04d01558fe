"""The CUDA and Triton stoich conv at real size on a GPU (``make gpu-check``, tier 1).

On the bundled yeast-GEM graph (2534 metabolites, 4881 reactions, 20,960 incidences) with a
per-sample reaction keep-mask (~2 % of reactions removed, sample 0 intact) and per-sample
weights ``s * gate * alpha``, forward and backward (w.r.t. ``y`` and ``weight``):

* B in {32, 256}, (H, C) in {(2, 64), (10, 64)}, float32 and bfloat16, against the float64
  reference (every sample at B = 32, samples 0, 1, B/2, B-1 at B = 256: samples are independent,
  and the float64 reference of a full B = 256, H = 10 batch would need ~100 GB) and against the
  C++ CPU kernel (the whole batch; bfloat16 only where the CPU kernel takes it);
* the compacted layout (B = 1 on the block-diagonal graph of ``perturb_batch``) against the
  shared-topology layout with the keep-mask;
* inputs produced on a non-default ``torch.cuda.Stream`` (a kernel launched on another stream
  reads NaN);
* contiguous but misaligned inputs (``buf[1:]``): within the bound of the reference, and
  bit-identical to the aligned run, float32 and bfloat16 (review finding 7);
* packed short rows (review finding 3): a sample run alone, the batch and the compacted
  layout of unperturbed copies give the same bits;
* a weight shared by the batch ([1, nnz, H], review finding 6) against the reference;
* a CUDA-graph capture of forward + backward replayed on new inputs against eager.

Tolerances: see ``gpu_helpers``. Measured errors are recorded as junit properties (the
``make gpu-check`` summary lists them).
"""

from __future__ import annotations

import pytest
import torch

from gpu.gpu_helpers import GPU_BACKENDS, GPU_MARKS, assert_within, bound, reduction_length

pytestmark = GPU_MARKS

DEV = "cuda"
REAL_SIZES = [  # (dtype, B, H, C, backend): the backend varies fastest, so the CPU result is reused
    (dtype, B, H, C, backend)
    for dtype in (torch.float32, torch.bfloat16)
    for B in (32, 256)
    for H, C in ((2, 64), (10, 64))
    for backend in GPU_BACKENDS
]


def _id(case):
    dtype, B, H, C, backend = case
    return f"{str(dtype).split('.')[-1]}-B{B}-H{H}-C{C}-{backend}"


def make_inputs(plan, B, H, C, dtype, seed=0):
    """``(y, weight, keep, grad)`` on the GPU: realistic weights ``s * gate * alpha``."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    N, M, nnz = plan.num_metabolites, plan.num_reactions, plan.nnz
    y = torch.randn(B, N, H, C, generator=gen, device=DEV).to(dtype)
    gate = torch.sigmoid(torch.randn(B, N, generator=gen, device=DEV))[:, plan.metabolite_index]
    alpha = torch.rand(B, nnz, H, generator=gen, device=DEV)
    weight = (plan.stoich.view(1, nnz, 1).float() * gate.unsqueeze(-1) * alpha).to(dtype)
    keep = torch.rand(B, M, generator=gen, device=DEV) > 0.02
    keep[0] = True
    grad = torch.randn(B, N, H, C, generator=gen, device=DEV).to(dtype)
    return y, weight, keep, grad


def run(y, weight, plan, keep, grad, backend):
    """``(out, grad_y, grad_weight)`` of one forward + backward."""
    from stoichconv.ops import stoich_conv

    y = y.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    out = stoich_conv(y, weight, plan, keep, backend=backend)
    grad_y, grad_w = torch.autograd.grad(out, (y, weight), grad)
    return out.detach(), grad_y, grad_w


def reference_and_scale(y, weight, plan, keep, grad):
    """The float64 reference and the absolute-value propagation (the error scale) on ``y``'s device."""
    plan64 = plan.to(device=y.device, dtype=torch.float64)
    args = [t.double() for t in (y, weight, grad)]
    want = run(args[0], args[1], plan64, keep, args[2], "reference")
    scale = run(args[0].abs(), args[1].abs(), plan64, keep, args[2].abs(), "reference")
    return want, scale


_CPU_CACHE: dict = {}


def cpu_result(key, y, weight, plan_cpu, keep, grad):
    """The C++ CPU kernel's result and its absolute-value propagation for the whole batch,
    computed once per (B, H, C, dtype) and reused by both GPU backends."""
    if key not in _CPU_CACHE:
        _CPU_CACHE.clear()
        args = [t.cpu() for t in (y, weight, keep, grad)]
        got = run(args[0], args[1], plan_cpu, args[2], args[3], "cpu")
        scale = run(args[0].float().abs(), args[1].float().abs(), plan_cpu, args[2], args[3].float().abs(), "cpu")
        _CPU_CACHE[key] = got, scale
    return _CPU_CACHE[key]


NAMES = ("out", "grad_y", "grad_weight")


@pytest.mark.parametrize("case", REAL_SIZES, ids=_id)
def test_real_size_matches_reference_and_cpu_kernel(case, yeast_plans, record_property):
    dtype, B, H, C, backend = case
    plan_cpu, plan = yeast_plans
    L = reduction_length(plan_cpu)
    rel = bound(dtype, L)
    y, weight, keep, grad = make_inputs(plan, B, H, C, dtype, seed=B + H)
    got = run(y, weight, plan, keep, grad, backend)
    for t, name in zip(got, NAMES):
        assert t.dtype == dtype and t.device.type == DEV, name

    # the float64 reference: every sample at B = 32, four at B = 256
    idx = slice(None) if B <= 32 else torch.tensor([0, 1, B // 2, B - 1], device=DEV)
    want, scale = reference_and_scale(y[idx], weight[idx], plan, keep[idx], grad[idx])
    worst = {}
    for g, w, s, name in zip(got, want, scale, NAMES):
        worst[name] = assert_within(g[idx], w, s, rel, f"{backend} {name} vs float64 reference")
    record_property("max_rel_err_vs_reference", {k: f"{v:.3g}" for k, v in worst.items()})
    record_property("bound", f"{rel:.3g}")
    del want, scale

    # the C++ CPU kernel on the whole batch (both are within `rel` of the exact result)
    cpu_got, cpu_scale = cpu_result((B, H, C, dtype), y, weight, plan_cpu, keep, grad)
    worst = {}
    for g, w, s, name in zip(got, cpu_got, cpu_scale, NAMES):
        worst[name] = assert_within(g.cpu(), w, s, 2 * rel, f"{backend} {name} vs the CPU kernel")
    record_property("max_rel_err_vs_cpu", {k: f"{v:.3g}" for k, v in worst.items()})


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compacted_layout_equals_shared_topology(backend, cell_graph_cuda, yeast_plans):
    """B = 1 on the block-diagonal graph of ``perturb_batch(layout="compacted")`` equals the
    shared-topology batch with its keep-mask, forward and backward."""
    from stoichconv.data import METABOLISM, random_perturbations
    from stoichconv.ops import build_stoich_plan, stoich_conv
    from stoichconv.perturb import perturb_batch

    plan = yeast_plans[1]
    B, H, C = 32, 2, 64
    pert, ptr = random_perturbations(int(cell_graph_cuda["gene"].num_nodes), B, seed=3)
    batch = perturb_batch(cell_graph_cuda, pert.to(DEV), ptr.to(DEV), layout="compacted")
    inc, met = batch[METABOLISM], batch["metabolite"]
    keep = batch.reaction_keep
    assert keep.shape == (B, plan.num_reactions) and not bool(keep.all())
    compact_plan = build_stoich_plan(inc.hyperedge_index, inc.stoichiometry.float(), int(met.num_nodes),
                                     int(inc.num_edges))
    sample = torch.repeat_interleave(torch.arange(B, device=DEV), inc.edge_ptr.diff())
    edge_id = inc.edge_keep.view(B, plan.nnz).nonzero()[:, 1]
    assert torch.equal(inc.stoichiometry.float(), plan.stoich[edge_id])

    y0, w0, _, g0 = make_inputs(plan, B, H, C, torch.float32, seed=5)
    results = []
    for layout in ("shared", "compacted"):
        y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
        if layout == "shared":
            out = stoich_conv(y, w, plan, keep, backend=backend)[met.batch, met.n_id]
        else:
            out = stoich_conv(y[met.batch, met.n_id].unsqueeze(0), w[sample, edge_id].unsqueeze(0), compact_plan,
                              backend=backend)[0]
        grads = torch.autograd.grad(out, (y, w), g0[met.batch, met.n_id])
        results.append((out.detach(), *grads))
    _, scale = reference_and_scale(y0, w0, plan, keep, g0)
    scale = (scale[0][met.batch, met.n_id], scale[1], scale[2])
    rel = 2 * bound(torch.float32, reduction_length(plan))
    for a, b, s, name in zip(*results, scale, NAMES):
        assert_within(b, a, s, rel, f"{backend} compacted vs shared {name}")
    # the compacted (packed short rows) run against the float64 reference of the shared layout
    want, _ = reference_and_scale(y0, w0, plan, keep, g0)
    want = (want[0][met.batch, met.n_id], want[1], want[2])
    for got, w, s, name in zip(results[1], want, scale, NAMES):
        assert_within(got, w, s, rel / 2, f"{backend} compacted {name} vs float64 reference")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inputs_from_a_non_default_stream(backend, yeast_plans):
    """Inputs written on a side stream after a 50 ms sleep, the op called on that stream: a
    kernel launched on another stream would read the NaN the buffers held before."""
    plan = yeast_plans[1]
    y, w, keep, g = make_inputs(plan, 32, 2, 64, torch.float32, seed=7)
    want = run(y, w, plan, keep, g, backend)
    ys, ws, gs = (torch.full_like(t, float("nan")) for t in (y, w, g))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    assert side != torch.cuda.current_stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU cycles before the inputs are written
        for dst, src in ((ys, y), (ws, w), (gs, g)):
            dst.copy_(src)
        got = run(ys, ws, plan, keep, gs, backend)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b, name in zip(got, want, NAMES):
        assert torch.equal(a, b), f"{backend} {name} on a side stream differs from the default stream"


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape).copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_misaligned_inputs_match_reference(backend, yeast_plans):
    plan = yeast_plans[1]
    y, w, keep, g = make_inputs(plan, 32, 2, 64, torch.float32, seed=9)
    got = run(_misaligned(y), _misaligned(w), plan, keep, _misaligned(g), backend)
    want, scale = reference_and_scale(y, w, plan, keep, g)
    rel = bound(torch.float32, reduction_length(plan))
    for a, b, s, name in zip(got, want, scale, NAMES):
        assert_within(a, b, s, rel, f"{backend} misaligned {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_misaligned_inputs_bit_identical_to_aligned(backend, dtype, yeast_plans):
    """Review finding 7: the reduction order must not depend on the storage offset. The aligned
    run takes the wide accesses (C = 64: float4 / four 16-bit values) in stage 1, the
    reaction-side gradient and the weight gradient, the ``buf[1:]`` run the scalar ones there
    (its y and grad_out are off by one element); every output, grad_weight included, must be
    bit-identical."""
    plan = yeast_plans[1]
    y, w, keep, g = make_inputs(plan, 32, 2, 64, dtype, seed=11)
    assert y.data_ptr() % 16 == 0 and g.data_ptr() % 16 == 0  # the aligned run can go wide
    aligned = run(y, w, plan, keep, g, backend)
    shifted = run(_misaligned(y), _misaligned(w), plan, keep, _misaligned(g), backend)
    for a, b, name in zip(aligned, shifted, NAMES):
        assert torch.equal(a, b), f"{backend} {name}: misaligned run differs (max {float((a - b).abs().max()):.3g})"


def _block_diagonal_plan(plan, copies):
    """``copies`` disjoint copies of ``plan``'s graph as one graph (the compacted layout of an
    unperturbed batch): every row keeps its incidences in their order, so a row of copy c is
    the same CSR row as in ``plan``."""
    from stoichconv.ops import build_stoich_plan

    N, M, nnz = plan.num_metabolites, plan.num_reactions, plan.nnz
    offsets = torch.arange(copies, device=plan.device).repeat_interleave(nnz)
    edge_index = torch.stack([plan.metabolite_index.repeat(copies) + offsets * N,
                              plan.reaction_index.repeat(copies) + offsets * M])
    return build_stoich_plan(edge_index, plan.stoich.repeat(copies), N * copies, M * copies)


def test_packed_rows_are_bit_identical_to_one_row_per_sample(yeast_plans):
    """Review finding 3: the CUDA kernels pack many short rows (and samples) per block, and the
    result of a row must not depend on its neighbours in the block. Each sample of a
    shared-topology batch run alone (B = 1), the batch (B = 8) and the compacted layout (8
    copies of the graph, B = 1: rows of 2-8 incidences packed across copies) give the same
    bits, forward and backward; and the compacted run is within the bound of the float64
    reference."""
    plan = yeast_plans[1]
    B, H, C = 8, 2, 64
    y, w, _keep, g = make_inputs(plan, B, H, C, torch.float32, seed=21)
    batch = run(y, w, plan, None, g, "cuda")
    for b in (0, 3, B - 1):
        alone = run(y[b:b + 1], w[b:b + 1], plan, None, g[b:b + 1], "cuda")
        for a, full, name in zip(alone, batch, NAMES):
            assert torch.equal(a[0], full[b]), f"{name}: sample {b} alone differs from the batch"
    compact = _block_diagonal_plan(plan, B)
    N, nnz = plan.num_metabolites, plan.nnz
    packed = run(y.reshape(1, B * N, H, C), w.reshape(1, B * nnz, H), compact, None, g.reshape(1, B * N, H, C),
                 "cuda")
    for a, full, name in zip(packed, batch, NAMES):
        assert torch.equal(a.reshape(full.shape), full), f"{name}: compacted layout differs from the batch"
    want, scale = reference_and_scale(y, w, plan, None, g)
    rel = bound(torch.float32, reduction_length(plan))
    for a, b, s, name in zip(packed, want, scale, NAMES):
        assert_within(a.reshape(b.shape), b, s, rel, f"packed compacted {name} vs float64 reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_shared_weight_real_size(backend, dtype, yeast_plans):
    """Review finding 6 at real size: one weight [1, nnz, H] for B = 32 samples (never
    expanded), grad_weight [1, nnz, H] reduced over the batch in the kernel: within the bound
    of the float64 reference (the batch sum adds B terms to the weight gradient's chain), and
    bit-deterministic run to run."""
    plan = yeast_plans[1]
    B, H, C = 32, 2, 64
    y, w, keep, g = make_inputs(plan, B, H, C, dtype, seed=23)
    shared = w[:1].contiguous()
    got = run(y, shared, plan, keep, g, backend)
    assert got[2].shape == (1, plan.nnz, H)
    again = run(y, shared, plan, keep, g, backend)
    for a, b, name in zip(got, again, NAMES):
        assert torch.equal(a, b), f"{backend} shared-weight {name} differs run to run"
    want, scale = reference_and_scale(y, shared.expand(B, -1, -1), plan, keep, g)
    want = (want[0], want[1], want[2].sum(0, keepdim=True))
    scale = (scale[0], scale[1], scale[2].sum(0, keepdim=True))
    L = reduction_length(plan)
    for a, b, s, name, length in zip(got, want, scale, NAMES, (L, L, B * C * L)):
        assert_within(a, b, s, bound(dtype, length), f"{backend} shared-weight {name} vs float64 reference")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_matches_eager(backend, yeast_plans):
    """Forward + backward captured once with ``torch.cuda.graph``, replayed on new inputs
    copied into the static buffers, equals eager on those inputs bit for bit."""
    from stoichconv.ops import stoich_conv

    plan = yeast_plans[1]
    y0, w0, keep0, g0 = make_inputs(plan, 32, 2, 64, torch.float32, seed=13)
    y1, w1, keep1, g1 = make_inputs(plan, 32, 2, 64, torch.float32, seed=14)
    y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
    keep, g = keep0.clone(), g0.clone()

    def step():
        out = stoich_conv(y, w, plan, keep, backend=backend)
        return (out, *torch.autograd.grad(out, (y, w), g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles, allocator pools) off the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        y.copy_(y1)
        w.copy_(w1)
        keep.copy_(keep1)
        g.copy_(g1)
    graph.replay()
    torch.cuda.synchronize()
    eager = run(y1, w1, plan, keep1, g1, backend)
    for a, b, name in zip(static, eager, NAMES):
        assert torch.equal(a.detach(), b), f"{backend} {name}: CUDA-graph replay differs from eager"
