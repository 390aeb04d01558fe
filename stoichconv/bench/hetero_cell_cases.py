"""HeteroCell training-step benchmark rows (op ``train_step``).

Each row times one training step (perturbation batch, forward, NaN-tolerant MSE, backward,
gradient clipping, AdamW step) on the bundled real-size cell graph with B random deletion sets:

* ``reference``: the PyG reference model on a compacted batch
  (:func:`stoichconv.train.model_step`, batch built by ``stoichconv.perturb.perturb_batch`` when
  present, else the per-sample reference builder);
* ``cpu`` / ``cuda``: the fast model from ``(pert, pert_ptr)``.

Both models start from the same parameters, so the first step's predictions are compared.
``extra`` records the peak memory of one step: ``torch.cuda.max_memory_allocated`` on GPU; on CPU
the peak-RSS growth of a fresh subprocess over one step (``ru_maxrss`` after the step minus the
RSS before it, model and graph already loaded).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import warnings

import torch

from stoichconv.bench.core import REFERENCE, BenchCase

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

OP = "train_step"


def _setup(kind: str, batch_size: int, hidden: int, device, seed: int = 0, state=None):
    from stoichconv.data import load_cell_graph, random_perturbations
    from stoichconv.train import Teacher, build_model

    graph = load_cell_graph(seed=0).to(device)
    torch.manual_seed(seed)
    model = build_model(kind, graph, hidden, 3, 2, False).to(device)
    if state is not None:
        model.load_state_dict(state)
    num_genes = int(graph["gene"].num_nodes)
    pert, ptr = random_perturbations(num_genes, batch_size, seed=seed + 1)
    labels = Teacher(num_genes)(pert, ptr, 0).to(device=device, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return graph, model, pert.to(device), ptr.to(device), labels, optimizer


def _step_fn(kind, graph, model, pert, ptr, labels, optimizer):
    from stoichconv.reference.hetero_cell import nan_mse_loss
    from stoichconv.train import model_step

    def run():
        pred, _ = model_step(model, kind, graph, pert, ptr)
        loss = nan_mse_loss(pred, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return pred.detach()

    return run


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the peak covers the step only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux


def measure_peak(kind: str, batch_size: int, hidden: int, threads: int) -> dict:
    """Peak memory of one step of ``kind`` in *this* process (call it in a fresh one on CPU)."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() and kind.endswith("cuda") else "cpu")
    model_kind = "reference" if kind == REFERENCE else "fast"
    args = _setup(model_kind, batch_size, hidden, device)
    run = _step_fn(model_kind, *args)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return {"peak_mem_mb": round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)}
    before = _rss_mb()
    if not _reset_peak_rss():  # without it the peak may be the set-up's, not the step's
        return {"peak_rss_delta_mb": "n/a (cannot reset VmHWM)"}
    run()
    return {"peak_rss_delta_mb": round(_peak_rss_mb() - before, 1)}


def _peak_in_subprocess(kind: str, batch_size: int, hidden: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "stoichconv.bench.hetero_cell_cases", kind, str(batch_size), str(hidden), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        return {"peak_rss_delta_mb": f"failed: {res.stderr.strip().splitlines()[-1:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def cases(args) -> list:
    """Training-step rows at ``args.train_batches`` (default B = 2, 8) with hidden ``args.channels``."""
    device = torch.device(getattr(args, "device", "cpu"))
    hidden = int(getattr(args, "channels", 64))
    threads = int(getattr(args, "threads", None) or torch.get_num_threads())
    batches = list(getattr(args, "train_batches", [2, 8]))
    fast_backend = "cuda" if device.type == "cuda" else "cpu"
    wanted = set(getattr(args, "backends", None) or [REFERENCE, fast_backend])
    out = []
    for B in batches:
        config = f"C={hidden},L=3,H=2"
        ref_args = _setup("reference", B, hidden, device)
        state = {k: v.clone() for k, v in ref_args[1].state_dict().items()}
        rows = [(REFERENCE, "reference", ref_args)]
        if fast_backend in wanted:
            rows.append((fast_backend, "fast", _setup("fast", B, hidden, device, state=state)))
        for backend, kind, setup in rows:
            if backend not in wanted and backend != REFERENCE:
                continue
            if device.type == "cuda":
                measure = (lambda b=backend, n=B: measure_peak(b if b == REFERENCE else "cuda", n, hidden, threads))
            else:
                measure = (lambda b=backend, n=B: _peak_in_subprocess(b, n, hidden, threads))
            out.append(BenchCase(op=OP, backend=backend, config=config, batch=B, run=_step_fn(kind, *setup),
                                 extra={"threads": threads}, measure_extra=measure))
    return out


if __name__ == "__main__":  # python -m stoichconv.bench.hetero_cell_cases KIND B HIDDEN THREADS
    kind, B, hidden, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(measure_peak(kind, B, hidden, threads)))
