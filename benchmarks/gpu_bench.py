"""GPU benchmark of the stoichconv kernels (run by ``make gpu-check``).

Rows: the stoich conv forward and forward+backward on the yeast-GEM graph
(B = 32 samples sharing the wildtype structure with a per-sample reaction
keep-mask, C = 64 channels, float32; "plain" = one head, weight = stoich;
"gated+attn" = 4 heads of 64 channels, weight = s * gate * alpha), and the
perturbation masking (``perturb_batch`` and ``filter_edges``) on the cell
graph, each for the backends cuda / triton / reference.

Columns: median time (CUDA events around each call, after warm-up), ratio
to the reference backend, achieved GB/s = (bytes the op must move at least,
see ``*_bytes`` below and benchmarks/README.md) / time, and that as % of the
device-to-device copy bandwidth measured in the same run.

    python benchmarks/gpu_bench.py [--quick] [--json out.json] [--backends cuda,triton,reference]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

BACKENDS = ("cuda", "triton", "reference")


# ------------------------------------------------------------------ timing


def median_us(fn, warmup: int, reps: int) -> float:
    """Median wall time of ``fn()`` on the current stream, in µs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(quick: bool) -> float:
    """Device-to-device ``copy_`` bandwidth (bytes read + written per second)."""
    n = (64 if quick else 512) * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    t = median_us(lambda: dst.copy_(src), 3, 10 if quick else 30)
    return 2 * src.numel() * 4 / (t * 1e-6) / 1e9


# ------------------------------------------------------------------ byte models


def stoich_forward_bytes(B, N, M, nnz, H, C, elem=4, masked=True) -> int:
    """Compulsory traffic of the forward: y read, hidden written then read back,
    out written (B*H*C*(2N + 2M) elements), the weight read by both stages,
    norms written, the keep-mask read, and the plan read once per stage
    (perm + gathered id per incidence, row pointers)."""
    features = B * H * C * (2 * N + 2 * M) * elem
    weights = 2 * B * nnz * H * elem
    norms = (B if masked else 1) * (N + M) * elem
    keep = B * M if masked else 0
    structure = 2 * (2 * nnz * 8) + (N + M + 2) * 8
    return features + weights + norms + keep + structure


def stoich_backward_bytes(B, N, M, nnz, H, C, elem=4, masked=True) -> int:
    """Compulsory traffic of the backward: R = read G, write R; grad_y = read R,
    write grad_y; grad_weight = read G, hidden, R, y, write grad_weight; the
    weight read twice, norms read, the plan read by both reductions and the
    per-incidence pass."""
    features = B * H * C * (N + M + M + N + 2 * N + 2 * M) * elem
    weights = 3 * B * nnz * H * elem
    norms = 2 * (B if masked else 1) * (N + M) * elem
    keep = 2 * B * M if masked else 0
    structure = 3 * (2 * nnz * 8) + (N + M + 2) * 8
    return features + weights + norms + keep + structure


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable in a (nested) result: what an op must write."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if hasattr(obj, "node_types"):  # HeteroData
        total = 0
        for store in list(obj.node_stores) + list(obj.edge_stores):
            for value in store.values():
                total += tensor_bytes(value)
        return total
    return 0


# ------------------------------------------------------------------ cases


def stoich_cases(quick: bool):
    from stoichconv.data import load_yeast_gem
    from stoichconv.ops import build_stoich_plan, stoich_propagate

    net = load_yeast_gem()
    dev = "cuda"
    plan = build_stoich_plan(net.incidence.to(dev), net.stoich.to(dev), net.num_metabolites, net.num_reactions)
    N, M, nnz = net.num_metabolites, net.num_reactions, plan.nnz
    B = 4 if quick else 32
    gen = torch.Generator(device=dev).manual_seed(0)
    keep = torch.rand(B, M, generator=gen, device=dev) > 0.02  # ~2% of reactions removed per sample
    for name, H, C in (("plain", 1, 64), ("gated+attn", 4, 64)):
        y = torch.randn(B, N, H, C, generator=gen, device=dev)
        if name == "plain":
            weight = plan.stoich.view(1, nnz, 1).expand(B, nnz, 1).contiguous()
        else:
            gate = torch.sigmoid(torch.randn(B, N, generator=gen, device=dev))[:, plan.metabolite_index]
            alpha = torch.rand(B, nnz, H, generator=gen, device=dev)
            weight = plan.stoich.view(1, nnz, 1) * gate.unsqueeze(-1) * alpha
        fwd_bytes = stoich_forward_bytes(B, N, M, nnz, H, C)
        bwd_bytes = stoich_backward_bytes(B, N, M, nnz, H, C)
        yg, wg = y.clone().requires_grad_(), weight.clone().requires_grad_()
        grad = torch.randn(B, N, H, C, generator=gen, device=dev)

        def forward(backend, y=y, weight=weight):
            with torch.no_grad():
                return stoich_propagate(y, weight, plan, keep, backend=backend)

        def forward_backward(backend, yg=yg, wg=wg, grad=grad):
            out = stoich_propagate(yg, wg, plan, keep, backend=backend)
            return torch.autograd.grad(out, (yg, wg), grad)

        shape = f"B={B} N={N} M={M} nnz={nnz} H={H} C={C} fp32"
        yield f"stoich_conv fwd {name}", shape, forward, fwd_bytes
        yield f"stoich_conv fwd+bwd {name}", shape, forward_backward, fwd_bytes + bwd_bytes


def pert_mask_cases(quick: bool):
    try:
        from stoichconv.perturb import perturb_batch
        from stoichconv.ops.pert_mask import filter_edges
    except ImportError as error:  # pragma: no cover - the module is another engineer's
        print(f"[gpu_bench] perturbation rows skipped: {error}", file=sys.stderr)
        return
    from stoichconv.data import load_cell_graph, random_perturbations

    graph = load_cell_graph()
    num_genes = graph["gene"].num_nodes
    B = 4 if quick else 32
    pert, pert_ptr = random_perturbations(num_genes, B, seed=0)
    graph = graph.to("cuda")
    pert, pert_ptr = pert.cuda(), pert_ptr.cuda()
    perturb_batch(graph, pert, pert_ptr, "compacted", backend="reference")  # validates the graph once
    wildtype = tensor_bytes(graph)
    ei = graph["gene", "physical_interaction", "gene"].edge_index

    def batch(backend):
        # the wildtype was validated once above; time the masking itself
        return perturb_batch(graph, pert, pert_ptr, "compacted", backend=backend, validate_graph=False)

    def edges(backend):
        return filter_edges(ei, num_genes, pert, pert_ptr, relabel=True, backend=backend)

    # Bytes: the wildtype read once plus every output tensor written once.
    out_bytes = tensor_bytes(batch("reference"))
    yield "perturb_batch compacted", f"B={B} cell graph", batch, wildtype + out_bytes
    edge_bytes = tensor_bytes(ei) + tensor_bytes(pert) + tensor_bytes(pert_ptr) + tensor_bytes(edges("reference"))
    yield "filter_edges physical", f"B={B} E={ei.size(1)}", edges, edge_bytes


# ------------------------------------------------------------------ main


def run(args) -> list[dict]:
    from stoichconv.backends import BackendUnavailableError

    copy_gbs = copy_bandwidth_gbs(args.quick)
    warmup, reps = (2, 3) if args.quick else (10, 50)
    rows = []
    cases = list(stoich_cases(args.quick)) + list(pert_mask_cases(args.quick))
    for name, shape, fn, nbytes in cases:
        ref_us = None
        results = []
        for backend in args.backends:
            try:
                fn(backend)  # also compiles Triton kernels / checks availability
                t = median_us(lambda: fn(backend), warmup, reps)
            except (BackendUnavailableError, NotImplementedError, ImportError) as error:
                results.append({"op": name, "shape": shape, "backend": backend, "median_us": None,
                                "note": str(error).splitlines()[0][:60]})
                continue
            if backend == "reference":
                ref_us = t
            gbs = nbytes / (t * 1e-6) / 1e9
            results.append({"op": name, "shape": shape, "backend": backend, "median_us": t, "bytes": nbytes,
                            "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs})
        for r in results:
            r["vs_reference"] = (ref_us / r["median_us"]) if (ref_us and r["median_us"]) else None
        rows.extend(results)
    for r in rows:
        r["copy_gbs"] = copy_gbs
    return rows


def print_table(rows, device_name: str) -> None:
    copy_gbs = rows[0]["copy_gbs"] if rows else float("nan")
    print(f"\nGPU benchmark on {device_name}; device-to-device copy bandwidth {copy_gbs:.0f} GB/s")
    header = f"{'op':<30} {'backend':<10} {'median µs':>10} {'speed-up vs ref':>16} {'GB/s':>8} {'% copy BW':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["median_us"] is None:
            print(f"{r['op']:<30} {r['backend']:<10} {'n/a':>10}   ({r['note']})")
            continue
        ratio = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else "-"
        print(f"{r['op']:<30} {r['backend']:<10} {r['median_us']:>10.1f} {ratio:>16} {r['gbs']:>8.1f} {r['pct_copy']:>9.1f}%")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few repetitions (sanitizer runs)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of cuda,triton,reference")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible", file=sys.stderr)
        return 2
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print_table(rows, torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    sys.exit(main())
