"""What the machine can do, and what each benchmark row must move: the copy bandwidth of the
device measured in the run, and the byte floors of the benchmarked ops.

Shared by ``python -m stoichconv.bench`` (CPU or GPU) and ``benchmarks/gpu_bench.py``. A row's
``bytes_moved`` is the traffic its op must generate at least, every tensor it reads or writes
counted once (perfect reuse of gathered rows in cache); ``bytes_moved / time`` is its achieved
GB/s and, divided by :func:`copy_bandwidth_gbs` of the same run and device, its ``% of copy BW``:
how far the row is from a memory-bound kernel at this machine's limit. The formulas are derived
in ``benchmarks/README.md`` ("Roofline: bytes each kernel must move").

Element sizes: ``elem`` for features and weights (4 for float32), 8 for int64 structure, 1 for
bool masks; the degree norms are stored in the accumulate dtype (float32 unless float64).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch

INDEX = 8  # int64
MASK = 1  # bool

# ------------------------------------------------------------------ the limit


def _median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth_gbs(device="cpu", nbytes: int = 256 * 2**20, repeats: int = 15, warmup: int = 3) -> float:
    """Bandwidth of a large ``Tensor.copy_`` on ``device`` in GB/s (bytes read + written per
    second, 10⁹ B/GB): ``nbytes`` of float32 copied into a buffer allocated once and reused
    (so the time is the copy's, not the first-touch page faults of a fresh allocation), median
    of ``repeats`` after ``warmup`` copies. CUDA: timed with CUDA events on the current stream;
    CPU: wall time, with the torch thread count in effect (set it before calling)."""
    device = torch.device(device)
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, warmup, repeats)
    return 2 * n * 4 / seconds / 1e9


def gemm_gflops(device="cpu", rows: int = 32 * 2534, width: int = 64, repeats: int = 9, warmup: int = 2) -> float:
    """Throughput of the float32 product the layers are made of, in GFLOP/s (10⁹ multiply-adds
    × 2 per second): ``[rows, width] @ [width, width]ᵀ`` into an output allocated once (by
    default the stoich conv's input projection at B = 32, C = 64), median of ``repeats`` after
    ``warmup``. It is the machine's second limit: a row whose products alone take most of its
    time (the plain stoich conv on CPU) is bound by it, not by the copy bandwidth. It differs
    between CPUs far more than the copy bandwidth does (BLAS code paths per vendor and vector
    width), so runs on different machines are compared through it."""
    device = torch.device(device)
    x = torch.ones(rows, width, dtype=torch.float32, device=device)
    w = torch.ones(width, width, dtype=torch.float32, device=device)
    out = torch.empty(rows, width, dtype=torch.float32, device=device)
    seconds = _median_seconds(lambda: torch.mm(x, w.t(), out=out), device, warmup, repeats)
    return 2 * rows * width * width / seconds / 1e9


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), for the
    benchmark's metadata: the same code runs at very different speeds on different CPUs."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def achieved(bytes_moved: Optional[int], median_ms: float, copy_gbs: Optional[float]) -> dict:
    """``{"gbs": ..., "pct_copy_bw": ...}`` of a row (empty without a byte count)."""
    if not bytes_moved or not median_ms:
        return {}
    gbs = bytes_moved / (median_ms * 1e-3) / 1e9
    out = {"gbs": gbs}
    if copy_gbs:
        out["pct_copy_bw"] = 100 * gbs / copy_gbs
    return out


# ------------------------------------------------------------------ stoich conv


def stoich_forward_bytes(B, N, M, nnz, H, C, elem=4, masked=True, norm_elem=4) -> int:
    """Compulsory traffic of the stoich conv forward: ``y`` read, ``hidden`` written then read
    back, ``out`` written (B·H·C·(2N + 2M) elements), the per-incidence weight read by both
    stages, the degree norms written, the keep-mask read, and the plan read once per stage
    (perm + gathered id per incidence) plus both row pointers."""
    features = B * H * C * (2 * N + 2 * M) * elem
    weights = 2 * B * nnz * H * elem
    norms = (B if masked else 1) * (N + M) * norm_elem
    keep = B * M * MASK if masked else 0
    structure = 2 * (2 * nnz * INDEX) + (N + M + 2) * INDEX
    return features + weights + norms + keep + structure


def stoich_backward_bytes(B, N, M, nnz, H, C, elem=4, masked=True, norm_elem=4) -> int:
    """Compulsory traffic of the stoich conv backward: R = read G, write R; grad_y = read R,
    write grad_y; grad_weight = read G, hidden, R, y, write grad_weight; the weight read by
    both reductions, the norms read twice, the keep-mask twice, the plan by both reductions and
    the per-incidence pass."""
    features = B * H * C * (N + M + M + N + 2 * N + 2 * M) * elem
    weights = 3 * B * nnz * H * elem
    norms = 2 * (B if masked else 1) * (N + M) * norm_elem
    keep = 2 * B * M * MASK if masked else 0
    structure = 3 * (2 * nnz * INDEX) + (N + M + 2) * INDEX
    return features + weights + norms + keep + structure


def linear_bytes(rows, in_features, out_features, elem=4, backward=True, bias=True) -> int:
    """A ``Linear`` on ``rows`` rows: forward reads x and W (and b), writes y; backward reads
    dL/dy, x and W, writes dL/dx, dL/dW (and dL/db)."""
    weight = in_features * out_features + (out_features if bias else 0)
    forward = rows * (in_features + out_features) + weight
    grads = rows * (out_features + 2 * in_features) + 2 * weight if backward else 0
    return (forward + grads) * elem


def stoich_layer_flops(B, N, in_channels, H, C) -> int:
    """Floating-point operations of the stoich conv layer's dense products, forward + backward:
    the input projection ``[B·N, in] @ [in, H·C]`` and its two gradients (w.r.t. the input and the
    weight), 2 per multiply-add. The propagation itself (a few operations per incidence and
    channel) and the small gate / attention side products are left out: this is a floor."""
    return 3 * 2 * B * N * in_channels * H * C


def stoich_layer_bytes(B, N, M, nnz, in_channels, H, C, elem=4, attention=False) -> int:
    """One forward + backward of :class:`stoichconv.nn.StoichHypergraphConv` on B samples with a
    reaction keep-mask: its ``lin`` (B·N rows, ``in_channels`` → H·C, no bias), the stoich conv
    forward and backward, the bias added to ``out`` (read + write) and its gradient (a read of
    dL/dout); with attention the reaction features ``hyperedge_attr`` [M, in_channels] read
    (forward) and their gradient written (backward). Gate and attention weights themselves are
    the per-incidence ``weight`` of the op formulas."""
    width = H * C
    total = linear_bytes(B * N, in_channels, width, elem, bias=False)
    total += stoich_forward_bytes(B, N, M, nnz, H, C, elem) + stoich_backward_bytes(B, N, M, nnz, H, C, elem)
    total += 3 * B * N * width * elem + width * elem  # bias: out read + written, dL/dout read; bias read
    if attention:
        total += 2 * M * in_channels * elem
    return total


# ------------------------------------------------------------------ pert-mask ops


def filter_edges_bytes(E, B, P, num_nodes, kept_edges) -> int:
    """``filter_edges`` of a gene-gene relation: reads ``edge_index`` [2, E], ``pert`` [P] and
    ``pert_ptr`` [B + 1]; writes the kept ``edge_index`` [2, kept_edges] (summed over samples),
    ``edge_ptr`` and ``node_ptr`` [B + 1], ``edge_keep`` [B·E] and ``node_keep`` [B·num_nodes]."""
    reads = 2 * E * INDEX + P * INDEX + (B + 1) * INDEX
    writes = 2 * kept_edges * INDEX + 2 * (B + 1) * INDEX + B * E * MASK + B * num_nodes * MASK
    return reads + writes


def kept_edge_count(edge_index: torch.Tensor, num_nodes: int, pert: torch.Tensor, pert_ptr: torch.Tensor) -> int:
    """Edges of ``edge_index`` that survive, summed over the samples of ``(pert, pert_ptr)`` (an
    edge survives a sample iff neither endpoint is deleted): the output size of ``filter_edges``,
    counted directly from the inputs."""
    B = pert_ptr.numel() - 1
    deleted = torch.zeros(B, num_nodes, dtype=torch.bool)
    sample = torch.repeat_interleave(torch.arange(B), (pert_ptr[1:] - pert_ptr[:-1]).cpu())
    deleted[sample, pert.cpu()] = True
    src, dst = edge_index.cpu()
    return int((~deleted[:, src] & ~deleted[:, dst]).sum())


def filter_edges_case_bytes(edge_index: torch.Tensor, num_nodes: int, pert: torch.Tensor,
                            pert_ptr: torch.Tensor) -> int:
    """:func:`filter_edges_bytes` of one ``filter_edges`` call, its output size counted by
    :func:`kept_edge_count`."""
    return filter_edges_bytes(edge_index.size(1), pert_ptr.numel() - 1, pert.numel(), num_nodes,
                              kept_edge_count(edge_index, num_nodes, pert, pert_ptr))


def perturb_batch_case_bytes(graph, pert: torch.Tensor, pert_ptr: torch.Tensor) -> int:
    """Floor of one ``perturb_batch`` call: the wildtype graph's tensors read once plus every
    tensor of the batch (the per-sample reference's result, :mod:`stoichconv.reference.perturb`)
    written once, and the perturbations read."""
    from stoichconv.reference.perturb import perturb_batch_reference

    batch = perturb_batch_reference(graph, pert, pert_ptr)
    return tensor_bytes(graph) + tensor_bytes(batch) + tensor_bytes((pert, pert_ptr))


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable in a (nested) result: tuples, lists, dicts, NamedTuples,
    every store of a ``HeteroData``. ``perturb_batch`` rows move the wildtype graph's tensors read once
    plus the batch's tensors written once."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if hasattr(obj, "stores") and hasattr(obj, "node_stores"):  # (Hetero)Data: global, node and edge stores
        return sum(tensor_bytes(dict(store.items())) for store in obj.stores)
    return 0


# ------------------------------------------------------------------ GATv2


def gatv2_forward_bytes(E, n_src, n_dst, n_rows, H, C, elem=4) -> int:
    """``stoichconv::gatv2_forward`` over E row-sorted edges: reads ``x_l`` [n_src, H, C],
    ``x_r`` [n_dst, H, C], ``att`` [H, C], ``src`` and ``dst`` [E], ``crow`` [n_rows + 1];
    writes ``out`` [n_rows, H, C] and the saved ``alpha`` [E, H]."""
    features = (n_src + n_dst + n_rows + 1) * H * C * elem
    return features + E * H * elem + 2 * E * INDEX + (n_rows + 1) * INDEX


def gatv2_backward_bytes(E, n_src, n_dst, n_rows, H, C, elem=4) -> int:
    """``stoichconv::gatv2_backward``: reads ``grad_out`` [n_rows, H, C], ``x_l``, ``x_r``,
    ``att``, the saved ``alpha`` [E, H] and the edges; writes ``grad_x_l``, ``grad_x_r`` and
    ``grad_att``."""
    features = (n_rows + 2 * n_src + 2 * n_dst + 2) * H * C * elem
    return features + E * H * elem + 2 * E * INDEX + (n_rows + 1) * INDEX


# ------------------------------------------------------------------ training step


def optimizer_bytes(param_bytes: int) -> int:
    """Parameter traffic of one AdamW step with gradient clipping: the forward reads the
    parameters, the backward writes their gradients, clipping reads them (its scaling fused into
    the update), and AdamW reads parameter, gradient and both moments and writes parameter and
    both moments: 10 parameter-sized passes."""
    return 10 * param_bytes


def _shape_args(func_name: str, args) -> Optional[int]:
    """Floor of one compiled-kernel call of a training step, from its arguments (None: not a
    graph kernel of this project)."""
    if func_name in ("gatv2_forward", "gatv2_backward"):
        if func_name == "gatv2_forward":
            x_l, x_r, att, src, dst, crow = args[:6]
            formula = gatv2_forward_bytes
        else:
            _grad, x_l, x_r, att, _alpha, src, dst, crow = args[:8]
            formula = gatv2_backward_bytes
        H, C = att.shape
        return formula(src.numel(), x_l.size(0), x_r.size(0), crow.numel() - 1, H, C, x_l.element_size())
    if func_name in ("stoich_conv_forward", "stoich_conv_backward"):
        if func_name == "stoich_conv_forward":
            y, weight, keep, *_ = args
            formula = stoich_forward_bytes
        else:
            _grad, _gh, y, weight, keep, *_ = args
            formula = stoich_backward_bytes
        B, N, H, C = y.shape
        nnz = weight.size(1)
        M = args[6].numel() - 1 if func_name == "stoich_conv_forward" else args[10].numel() - 1
        return formula(B, N, M, nnz, H, C, y.element_size(), masked=keep is not None)
    return None


def count_kernel_bytes(step: Callable[[], Any]) -> tuple[int, dict]:
    """Run ``step()`` once and add up the byte floors of the project's graph kernels it calls
    (``stoichconv::*`` ops: GATv2 and stoich conv by the formulas above from their arguments'
    shapes, the mask and softmax ops as their tensor inputs + outputs). Returns the total and a
    per-op breakdown."""
    from torch.utils._python_dispatch import TorchDispatchMode

    per_op: dict[str, int] = {}

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            namespace, _, name = func._schema.name.partition("::")
            if namespace == "stoichconv":
                name = name.removeprefix("triton_")
                nbytes = _shape_args(name, args)
                if nbytes is None:
                    nbytes = tensor_bytes(list(args)) + tensor_bytes(out)
                per_op[name] = per_op.get(name, 0) + nbytes
            return out

    with _Count():
        step()
    return sum(per_op.values()), per_op


def train_step_bytes(model: torch.nn.Module, step: Callable[[], Any]) -> tuple[int, dict]:
    """Floor of one training step of the fast HeteroCell: the graph kernels it calls
    (:func:`count_kernel_bytes`, one step run) plus the parameter and optimizer traffic
    (:func:`optimizer_bytes`). Dense work (the ``Linear`` maps, norms, pooling, the head) is not
    counted, so this is a lower bound and the row's % of copy BW an upper bound."""
    kernels, per_op = count_kernel_bytes(step)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    per_op["parameters+AdamW"] = optimizer_bytes(params)
    return kernels + per_op["parameters+AdamW"], per_op
