"""GPU benchmark of the stoichconv kernels (run last by ``make gpu-check``).

Rows: the stoich conv forward and forward+backward on the yeast-GEM graph
(B = 32 samples sharing the wildtype structure with a per-sample reaction
keep-mask, C = 64 channels; "plain" = one head, weight = stoich;
"gated+attn" = 4 heads of 64 channels, weight = s * gate * alpha), in float32
and bfloat16; the perturbation masking (``perturb_batch`` and ``filter_edges``)
on the cell graph; and one training step of the fast HeteroCell (hidden 64,
3 layers, 2 heads, AdamW) at B = 32, reported as steps per second. Each op row
for the backends cuda / triton / reference; the training step for the fast
model with backend cuda / triton (and the reference model, full mode only).

Columns: median time (CUDA events around each call, after warm-up), ratio
to the reference backend, achieved GB/s = (bytes the op must move at least,
see ``*_bytes`` below and benchmarks/README.md) / time, and that as % of the
device-to-device copy bandwidth measured in the same run.

    python benchmarks/gpu_bench.py [--quick] [--json out.json] [--backends cuda,triton,reference]
                                   [--batch B] [--only stoich_conv,pert_mask,train_step]
    python benchmarks/gpu_bench.py --dry-run [--quick]   # no GPU: build every case on the CPU at
                                                          # B = 2, call it once, print the plan

``--quick`` (what ``make gpu-check`` runs): the same rows and sizes, 2 warm-up calls and 5 timed
ones (training step: 2 warm-up steps, 3 timed), bfloat16 forward+backward rows only, no
reference-model training step. Exit status 1 when a row raised an unexpected error (the table
is still printed), 2 when no GPU is visible.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from stoichconv.bench import limits

BACKENDS = ("cuda", "triton", "reference")
GROUPS = ("stoich_conv", "pert_mask", "train_step")
QUICK = dict(warmup=2, reps=5, train_warmup=2, train_reps=3)
FULL = dict(warmup=10, reps=50, train_warmup=3, train_reps=10)
# Seconds per planned (row, backend) on the GPU machine, for the plan's estimate: an op row
# is a first call (a Triton compile where one is needed) and a few timed calls; a training
# step row builds the model and runs warm-up + timed steps. Uncalibrated guesses until a GPU
# run's summary gives measured times.
ESTIMATE_BASE_S = 12.0
ESTIMATE_OP_ROW_S = 1.0
ESTIMATE_TRAIN_ROW_S = 8.0
ESTIMATE_REFERENCE_TRAIN_ROW_S = 40.0


class UnsupportedCase(Exception):
    """A case this build cannot run (a dtype or backend not built yet): a note, not an error."""


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
    """Device-to-device ``copy_`` bandwidth (bytes read + written per second): the shared
    measurement of :func:`stoichconv.bench.limits.copy_bandwidth_gbs` (CUDA events, a buffer
    reused across copies), 256 MiB / 10 copies quick, 512 MiB / 30 copies full."""
    return limits.copy_bandwidth_gbs("cuda", (256 if quick else 512) * 2**20, repeats=10 if quick else 30)


# ------------------------------------------------------------------ byte models
# The formulas live in stoichconv.bench.limits (shared with ``python -m stoichconv.bench``).

stoich_forward_bytes = limits.stoich_forward_bytes
stoich_backward_bytes = limits.stoich_backward_bytes
tensor_bytes = limits.tensor_bytes


def _unsupported_dtype(error: Exception) -> bool:
    text = str(error).lower()
    return isinstance(error, (TypeError, ValueError, RuntimeError)) and (
        "bfloat16" in text or "dtype" in text or "float32 or float64" in text)


# ------------------------------------------------------------------ cases
# Each case: (group, name, shape, fn(backend), bytes or None). ``fn`` runs one call.


def stoich_cases(device: str, B: int, quick: bool):
    from stoichconv.data import load_yeast_gem
    from stoichconv.ops import build_stoich_plan, stoich_conv

    net = load_yeast_gem()
    plan = build_stoich_plan(net.incidence.to(device), net.stoich.to(device), net.num_metabolites,
                             net.num_reactions)
    N, M, nnz = net.num_metabolites, net.num_reactions, plan.nnz
    gen = torch.Generator(device=device).manual_seed(0)
    keep = torch.rand(B, M, generator=gen, device=device) > 0.02  # ~2% of reactions removed per sample
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        for name, H, C in (("plain", 1, 64), ("gated+attn", 4, 64)):
            y = torch.randn(B, N, H, C, generator=gen, device=device).to(dtype)
            if name == "plain":
                weight = plan.stoich.view(1, nnz, 1).expand(B, nnz, 1).contiguous()
            else:
                gate = torch.sigmoid(torch.randn(B, N, generator=gen, device=device))[:, plan.metabolite_index]
                alpha = torch.rand(B, nnz, H, generator=gen, device=device)
                weight = plan.stoich.view(1, nnz, 1) * gate.unsqueeze(-1) * alpha
            weight = weight.to(dtype)
            elem = y.element_size()
            fwd_bytes = stoich_forward_bytes(B, N, M, nnz, H, C, elem)
            bwd_bytes = stoich_backward_bytes(B, N, M, nnz, H, C, elem)
            yg, wg = y.clone().requires_grad_(), weight.clone().requires_grad_()
            grad = torch.randn(B, N, H, C, generator=gen, device=device).to(dtype)

            def guard(call, dtype=dtype, tag=tag):
                def run(backend):
                    try:
                        return call(backend)
                    except Exception as error:  # noqa: BLE001
                        if dtype != torch.float32 and _unsupported_dtype(error):
                            raise UnsupportedCase(f"{tag} not supported: {str(error).splitlines()[0][:50]}") from error
                        raise
                return run

            @guard
            def forward(backend, y=y, weight=weight):
                with torch.no_grad():
                    return stoich_conv(y, weight, plan, keep, backend=backend)

            @guard
            def forward_backward(backend, yg=yg, wg=wg, grad=grad):
                out = stoich_conv(yg, wg, plan, keep, backend=backend)
                return torch.autograd.grad(out, (yg, wg), grad)

            shape = f"B={B} N={N} M={M} nnz={nnz} H={H} C={C} {tag}"
            if dtype == torch.float32 or not quick:
                yield "stoich_conv", f"stoich_conv fwd {name} {tag}", shape, forward, fwd_bytes
            yield "stoich_conv", f"stoich_conv fwd+bwd {name} {tag}", shape, forward_backward, fwd_bytes + bwd_bytes


def pert_mask_cases(device: str, B: int, quick: bool):
    from stoichconv.data import PHYSICAL, load_cell_graph, random_perturbations
    from stoichconv.ops.pert_mask import filter_edges
    from stoichconv.perturb import perturb_batch

    graph = load_cell_graph()
    num_genes = graph["gene"].num_nodes
    pert, pert_ptr = random_perturbations(num_genes, B, seed=0)
    graph = graph.to(device)
    pert, pert_ptr = pert.to(device), pert_ptr.to(device)
    perturb_batch(graph, pert, pert_ptr, "compacted", backend="reference")  # validates the graph once
    ei = graph[PHYSICAL].edge_index

    def batch(backend):
        # the wildtype was validated once above; time the masking itself
        return perturb_batch(graph, pert, pert_ptr, "compacted", backend=backend, validate_graph=False)

    def edges(backend):
        return filter_edges(ei, num_genes, pert, pert_ptr, relabel=True, backend=backend)

    # Bytes (stoichconv.bench.limits): the wildtype read once plus every output tensor written once.
    yield ("pert_mask", "perturb_batch compacted", f"B={B} cell graph", batch,
           limits.perturb_batch_case_bytes(graph, pert, pert_ptr))
    yield ("pert_mask", "filter_edges physical", f"B={B} E={ei.size(1)}", edges,
           limits.filter_edges_case_bytes(ei, num_genes, pert, pert_ptr))


def train_step_cases(device: str, B: int, quick: bool, small: bool = False):
    """One training step (forward, NaN-tolerant MSE, backward, clipping, AdamW) of the fast
    HeteroCell with ``backend`` (cuda / triton / cpu), or of the reference model on a compacted
    batch (backend ``reference``). Models are built on first call (the warm-up). ``small``
    (the dry run): the small synthetic cell graph, hidden 8, to check the code path quickly."""
    from stoichconv.data import load_cell_graph, random_perturbations
    from stoichconv.models import HeteroCell as FastHeteroCell
    from stoichconv.reference.hetero_cell import HeteroCell as RefHeteroCell, nan_mse_loss
    from stoichconv.reference.perturb import perturb_batch_reference
    from stoichconv.train import Teacher, make_small_cell_graph

    graph = (make_small_cell_graph(seed=0) if small else load_cell_graph(seed=0)).to(device)
    num_genes = int(graph["gene"].num_nodes)
    pert, ptr = random_perturbations(num_genes, B, seed=1)
    labels = Teacher(num_genes)(pert, ptr, 0).to(device=device, dtype=torch.float32)
    pert, ptr = pert.to(device), ptr.to(device)
    config = dict(hidden_channels=8 if small else 64, num_layers=3, heads=2, dropout=0.0, metabolism_to_gene=False)
    models = {}

    def step(backend):
        if backend not in models:
            torch.manual_seed(0)
            if backend == "reference":
                model = RefHeteroCell.from_cell_graph(graph, **config).to(device)
            else:
                model = FastHeteroCell.from_cell_graph(graph, backend=backend, **config).to(device)
            models.clear()  # one model alive at a time
            models[backend] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        model, optimizer = models[backend]
        if backend == "reference":
            pred, _ = model(graph, perturb_batch_reference(graph, pert, ptr))
        else:
            pred, _ = model(graph, pert, ptr)
        loss = nan_mse_loss(pred, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    floor: list = []

    def step_bytes(backend):
        """The step's byte floor (stoichconv.bench.limits.train_step_bytes), counted once on one
        more step of the first fast model timed (None while only the reference ran)."""
        if not floor and backend != "reference" and backend in models:
            floor.append(limits.train_step_bytes(models[backend][0], lambda: step(backend))[0])
        return floor[0] if floor else None

    yield "train_step", "train_step HeteroCell C=64 L=3 H=2", f"B={B} cell graph fp32", step, step_bytes


def all_cases(device: str, B: int, quick: bool, only=GROUPS, small_model: bool = False):
    for group in only:
        if group == "train_step":
            yield from train_step_cases(device, B, quick, small=small_model)
        else:
            yield from {"stoich_conv": stoich_cases, "pert_mask": pert_mask_cases}[group](device, B, quick)


def row_backends(group: str, backends, quick: bool):
    """The backends a row runs: the training step's reference model only in full mode."""
    if group == "train_step" and quick:
        return [b for b in backends if b != "reference"]
    return list(backends)


# ------------------------------------------------------------------ main


def run(args) -> list[dict]:
    from stoichconv.backends import BackendUnavailableError

    timing = QUICK if args.quick else FULL
    copy_gbs = copy_bandwidth_gbs(args.quick)
    rows = []
    for group, name, shape, fn, nbytes in all_cases("cuda", args.batch, args.quick, args.only):
        ref_us = None
        results = []
        for backend in row_backends(group, args.backends, args.quick):
            row = {"op": name, "group": group, "shape": shape, "backend": backend, "median_us": None}
            try:
                fn(backend)  # also compiles Triton kernels / checks availability / builds the model
                torch.cuda.synchronize()
                if group == "train_step":
                    reps = timing["train_reps"] if backend != "reference" else 2
                    warm = timing["train_warmup"] if backend != "reference" else 0
                    t = median_us(lambda: fn(backend), warm, reps)
                else:
                    t = median_us(lambda: fn(backend), timing["warmup"], timing["reps"])
            except (BackendUnavailableError, NotImplementedError, ImportError, UnsupportedCase) as error:
                row["note"] = str(error).splitlines()[0][:70]
                results.append(row)
                continue
            except Exception as error:  # noqa: BLE001  (one broken row must not hide the others)
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                results.append(row)
                torch.cuda.synchronize()
                continue
            row["median_us"] = t
            if backend == "reference":
                ref_us = t
            row_bytes = nbytes(backend) if callable(nbytes) else nbytes
            if row_bytes:
                gbs = row_bytes / (t * 1e-6) / 1e9
                row.update(bytes=row_bytes, gbs=gbs, pct_copy=100 * gbs / copy_gbs)
            if group == "train_step":
                row["steps_per_s"] = 1e6 / t
            results.append(row)
        if callable(nbytes) and nbytes(None) is not None:  # a floor counted after the reference row ran
            for r in results:
                if r.get("median_us") and "bytes" not in r:
                    gbs = nbytes(None) / (r["median_us"] * 1e-6) / 1e9
                    r.update(bytes=nbytes(None), gbs=gbs, pct_copy=100 * gbs / copy_gbs)
        for r in results:
            r["vs_reference"] = (ref_us / r["median_us"]) if (ref_us and r["median_us"]) else None
        rows.extend(results)
        torch.cuda.empty_cache()
    for r in rows:
        r["copy_gbs"] = copy_gbs
    return rows


def format_table(rows, device_name: str) -> str:
    copy_gbs = rows[0]["copy_gbs"] if rows else float("nan")
    lines = [f"GPU benchmark on {device_name}; device-to-device copy bandwidth {copy_gbs:.0f} GB/s"]
    header = (f"{'op':<36} {'backend':<10} {'median µs':>11} {'vs ref':>8} {'GB/s':>8} {'% copy BW':>10} "
              f"{'steps/s':>8}")
    lines += [header, "-" * len(header)]
    for r in rows:
        if r.get("median_us") is None:
            lines.append(f"{r['op']:<36} {r['backend']:<10} {'n/a':>11}   "
                         f"({r.get('note') or 'ERROR ' + r.get('error', '')})")
            continue
        ratio = f"{r['vs_reference']:.2f}x" if r.get("vs_reference") else "-"
        gbs = f"{r['gbs']:.1f}" if r.get("gbs") else "-"
        pct = f"{r['pct_copy']:.1f}%" if r.get("pct_copy") else "-"
        sps = f"{r['steps_per_s']:.2f}" if r.get("steps_per_s") else "-"
        lines.append(f"{r['op']:<36} {r['backend']:<10} {r['median_us']:>11.1f} {ratio:>8} {gbs:>8} {pct:>10} {sps:>8}")
    return "\n".join(lines)


def plan(quick: bool, backends=BACKENDS, only=GROUPS) -> list[dict]:
    """The rows a GPU run makes, without building anything (for the plan and its estimate)."""
    names = {
        "stoich_conv": [f"stoich_conv {kind} {cfg} {tag}" for tag in ("fp32", "bf16") for cfg in ("plain", "gated+attn")
                        for kind in ("fwd", "fwd+bwd") if tag == "fp32" or kind == "fwd+bwd" or not quick],
        "pert_mask": ["perturb_batch compacted", "filter_edges physical"],
        "train_step": ["train_step HeteroCell C=64 L=3 H=2"],
    }
    return [{"group": g, "op": n, "backend": b} for g in only for n in names[g] for b in row_backends(g, backends, quick)]


def estimate_seconds(rows) -> float:
    total = ESTIMATE_BASE_S
    for r in rows:
        if r["group"] == "train_step":
            total += ESTIMATE_REFERENCE_TRAIN_ROW_S if r["backend"] == "reference" else ESTIMATE_TRAIN_ROW_S
        else:
            total += ESTIMATE_OP_ROW_S
    return total


def dry_run(quick: bool = True, backends=BACKENDS, only=GROUPS) -> dict:
    """Without a GPU: build every case on the CPU at B = 2 and call it once on the ``cpu``
    backend (the training step: the fast model on the small synthetic cell graph),
    so that a changed API fails here rather than on the lent GPU. Returns the plan, the cases
    checked and the estimate of the GPU run."""
    planned = plan(quick, backends, only)
    checked, problems = [], []
    for group, name, shape, fn, _nbytes in all_cases("cpu", 2, quick, only, small_model=True):
        for backend in ("cpu",):  # the reference path of each op runs on the GPU too; CPU time is the limit here
            start = time.perf_counter()
            try:
                fn(backend)
                checked.append({"op": name, "backend": backend, "seconds": round(time.perf_counter() - start, 2)})
            except UnsupportedCase as error:
                checked.append({"op": name, "backend": backend, "note": str(error)})
            except Exception as error:  # noqa: BLE001
                problems.append(f"{name} [{backend}]: {type(error).__name__}: {error}")
    built = {c["op"] for c in checked}
    missing = sorted({r["op"] for r in planned} - built - {p.split(" [")[0] for p in problems})
    problems += [f"planned row {m!r} was not built by the cases" for m in missing]
    return {"rows": planned, "checked": checked, "problems": problems, "estimate_s": estimate_seconds(planned)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, bf16 fwd+bwd rows only (make gpu-check)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of cuda,triton,reference")
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated subset of " + ",".join(GROUPS))
    parser.add_argument("--batch", type=int, default=32, help="samples per batch (default 32)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: build and call every case on the CPU, print the plan")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.only = [g for g in args.only.split(",") if g]
    bad = sorted(set(args.backends) - set(BACKENDS)) + sorted(set(args.only) - set(GROUPS))
    if bad:
        parser.error(f"unknown backend/group {bad}")
    if args.dry_run:
        result = dry_run(args.quick, args.backends, args.only)
        for r in result["rows"]:
            print(f"  {r['op']:<36} {r['backend']}")
        print(f"gpu_bench dry run: {len(result['rows'])} rows planned, {len(result['checked'])} case calls checked "
              f"on the CPU, estimate {result['estimate_s']:.0f} s on the GPU")
        for p in result["problems"]:
            print("PROBLEM:", p)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 1 if result["problems"] else 0
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible", file=sys.stderr)
        return 2
    print(f"GPU_BENCH_ESTIMATE_S {estimate_seconds(plan(args.quick, args.backends, args.only)):.0f}", flush=True)
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print()
    print(format_table(rows, torch.cuda.get_device_name()))
    errors = [r for r in rows if r.get("error")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
