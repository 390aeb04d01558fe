"""HeteroCell training-step benchmark rows (op ``train_step``).

Each row times one training step (perturbation batch, forward, NaN-tolerant MSE, backward,
gradient clipping, AdamW step) on the bundled real-size cell graph with B random deletion sets,
hidden C = 64, 3 layers:

* ``reference``: the PyG reference model on a compacted batch
  (:func:`stoichconv.train.model_step`, batch built by ``stoichconv.perturb.perturb_batch``);
* ``cpu`` / ``cuda``: the fast model from ``(pert, pert_ptr)``.

Rows: ``args.train_batches`` (default B = 2, 8) at 2 heads, and the original batch size B = 32 at
2 heads and at 10 heads (the trained torchcell checkpoint's heads: every relation 10 heads, the
gene-gene convs 10 x 6 channels projected to 64).

Both models start from the same parameters, so the first step's predictions are compared.
Every row's median is taken over at least ``STEP_REPEATS`` = 5 timed steps after a warm-up step.
``extra`` records the peak memory of one step: ``torch.cuda.max_memory_allocated`` on GPU; on CPU
the peak-RSS growth of a fresh subprocess over one step (``VmHWM`` after the step minus the RSS
before it, model and graph already loaded), with that step's wall and CPU seconds (``step_s``,
``step_cpu_s``: the CPU time does not grow when other processes share the cores). At B = 32 the reference may not fit in memory: its
step nearly fills a 24 GB machine (19.7 GB of RSS growth at 2 heads), so on CPU the B = 32
reference rows are timed in a fresh process of their own (:func:`time_in_subprocess`: a warm-up
step, whose predictions come back for the comparison, then the timed steps), started before the
rest of the benchmark builds its cases, and watched by this process: stopped when its RSS comes
within 512 MB of the memory available at its start. A reference that does not fit gets no timed
row, and the fast row of its group records how far it got (``reference_peak_rss_mb``, e.g.
``">21000 (stopped)"``); when the 2-head reference does not fit, the 10-head one (which needs
more) is not tried.

``bytes_moved`` of a group (the same for its reference and fast rows): the floor of one step,
:func:`stoichconv.bench.limits.train_step_bytes`, counted on one more step of a fresh fast model
from the group's parameters after the timing (the graph kernels by their formulas from their
arguments' shapes, plus 10 parameter-sized passes for the gradients, clipping and AdamW; the
dense layers not counted, so the floor is a lower bound). The bf16-mixed row counts its own step
under autocast (2-byte kernel operands). ``flops`` of a float32 group: every matrix product of
one step (``torch.utils.flop_counter``), from which ``% roofline`` takes the products' floor.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import tempfile
import sys
import time

import torch

from stoichconv.bench.core import REFERENCE, BenchCase

OP = "train_step"
LARGE_BATCH = 32  # the original's batch size
LARGE_BATCH_HEADS = (2, 10)
LAYERS = 3
STEP_REPEATS = 5  # timed steps per row at least (after a warm-up step): the median of 5 or more


def _setup(kind: str, batch_size: int, hidden: int, device, seed: int = 0, state=None, heads: int = 2):
    from stoichconv.data import load_cell_graph, random_perturbations
    from stoichconv.train import Teacher, build_model

    graph = load_cell_graph(seed=0).to(device)
    torch.manual_seed(seed)
    model = build_model(kind, graph, hidden, LAYERS, heads, False).to(device)
    if state is not None:
        model.load_state_dict(state)
    num_genes = int(graph["gene"].num_nodes)
    pert, ptr = random_perturbations(num_genes, batch_size, seed=seed + 1)
    labels = Teacher(num_genes)(pert, ptr, 0).to(device=device, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return graph, model, pert.to(device), ptr.to(device), labels, optimizer


def _step_fn(kind, graph, model, pert, ptr, labels, optimizer, autocast_dtype=None, first=None):
    """One training step; ``autocast_dtype``: under ``torch.autocast`` (bf16-mixed); ``first``: a
    list that keeps the predictions of the first call (the state all rows of a group start from)."""
    from stoichconv.reference.hetero_cell import nan_mse_loss
    from stoichconv.train import model_step

    def run():
        with torch.autocast(pert.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            pred, _ = model_step(model, kind, graph, pert, ptr)
        if first is not None and not first:
            first.append(pred.detach().float())
        loss = nan_mse_loss(pred.float(), labels)
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


def _status_mb(pid: int, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _step_of(kind: str, batch_size: int, hidden: int, threads: int, heads: int, device):
    """A fresh training step of ``kind`` (the reference or a fast backend) in this process."""
    torch.set_num_threads(threads)
    model_kind = "reference" if kind == REFERENCE else "fast"
    return _step_fn(model_kind, *_setup(model_kind, batch_size, hidden, device, heads=heads))


def _first_cpu_step(run) -> tuple:
    """``run()`` once on CPU: its output and its peak-RSS growth (``peak_rss_delta_mb``, "n/a"
    where the kernel's peak mark cannot be reset), wall and CPU seconds."""
    before, reset = _rss_mb(), _reset_peak_rss()  # without the reset the peak may be the set-up's
    start, cpu = time.perf_counter(), _cpu_s()
    output = run()
    return output, {
        "peak_rss_delta_mb": round(_peak_rss_mb() - before, 1) if reset else "n/a (cannot reset VmHWM)",
        "step_s": round(time.perf_counter() - start, 2), "step_cpu_s": round(_cpu_s() - cpu, 2)}


def measure_peak(kind: str, batch_size: int, hidden: int, threads: int, heads: int = 2) -> dict:
    """Peak memory of one step of ``kind`` in *this* process (call it in a fresh one on CPU);
    on CPU also the step's wall time (``step_s``)."""
    device = torch.device("cuda" if torch.cuda.is_available() and kind.endswith("cuda") else "cpu")
    run = _step_of(kind, batch_size, hidden, threads, heads, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return {"peak_mem_mb": round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)}
    return _first_cpu_step(run)[1]


def _cpu_s() -> float:
    """User + system CPU seconds of this process (all threads): a load-independent step cost."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_in_subprocess(kind: str, batch_size: int, hidden: int, threads: int, heads: int = 2,
                       limit_mb: float | None = None, timeout_s: float = 1800) -> dict:
    """:func:`measure_peak` in a fresh process, watched: stopped when its RSS passes
    ``limit_mb`` (default 85% of the memory available now). Returns its dict, or
    ``{"peak_rss_mb": ">N (stopped)", "fits": False}``."""
    limit_mb = 0.85 * _available_mb() if limit_mb is None else limit_mb
    return _watched(["peak", kind, batch_size, hidden, threads, heads], limit_mb, timeout_s)


def time_steps(kind: str, batch_size: int, hidden: int, threads: int, heads: int, repeats: int,
               output_path: str) -> dict:
    """In *this* process (a fresh one, on CPU): a warm-up step of ``kind`` (its predictions
    saved to ``output_path``), then ``repeats`` timed steps. Returns the median step time
    (``median_ms``), the peak-RSS growth of the warm-up step and its wall and CPU seconds."""
    run = _step_of(kind, batch_size, hidden, threads, heads, torch.device("cpu"))
    output, result = _first_cpu_step(run)
    torch.save(output, output_path)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "repeats": repeats, **result}


def time_in_subprocess(kind: str, batch_size: int, hidden: int, threads: int, heads: int, repeats: int,
                       limit_mb: float | None = None, timeout_s: float = 3600) -> dict:
    """:func:`time_steps` in a fresh process, watched like :func:`peak_in_subprocess` (default
    limit: the memory available now less 512 MB). Returns its dict plus ``output`` (the warm-up
    step's predictions), or ``{"peak_rss_mb": ">N (stopped)", "fits": False}``."""
    limit_mb = _available_mb() - 512 if limit_mb is None else limit_mb
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "predictions.pt")
        result = _watched(["time", kind, batch_size, hidden, threads, heads, repeats, path], limit_mb, timeout_s)
        if "median_ms" in result:
            result["output"] = torch.load(path)
    return result


def _watched(argv: list, limit_mb: float, timeout_s: float) -> dict:
    """``python -m stoichconv.bench.hetero_cell_cases *argv`` watched: killed when its RSS passes
    ``limit_mb`` or it runs past ``timeout_s``; returns the JSON of its last output line."""
    cmd = [sys.executable, "-m", "stoichconv.bench.hetero_cell_cases", *map(str, argv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, start = 0.0, time.monotonic()
    while proc.poll() is None:
        peak = max(peak, _status_mb(proc.pid, "VmRSS"))
        if peak > limit_mb or time.monotonic() - start > timeout_s:
            proc.kill()
            proc.communicate()
            why = "stopped" if peak > limit_mb else "timed out"
            return {"peak_rss_mb": f">{peak:.0f} ({why})", "fits": False}
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"peak_rss_delta_mb": f"failed: {err.strip().splitlines()[-1:]}"}
    return json.loads(out.strip().splitlines()[-1])


def _case(backend: str, kind: str, config: str, B: int, setup, threads: int, measure, floors=(None, None)) -> BenchCase:
    return BenchCase(op=OP, backend=backend, config=config, batch=B, run=_step_fn(kind, *setup),
                     extra={"threads": threads}, measure_extra=measure, bytes_moved=floors[0],
                     flops=floors[1], min_repeats=STEP_REPEATS)


def step_floors(B: int, hidden: int, device, state: dict, heads: int, autocast_dtype=None):
    """Two functions returning the byte floor and the dense-product FLOPs of one training step of
    this group (both counted on the first call of either, in one step of a fresh fast model
    loaded with ``state``, then remembered): the bytes by
    :func:`stoichconv.bench.limits.train_step_bytes`, the FLOPs by ``torch.utils.flop_counter``
    (every matrix product of the forward and the backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from stoichconv.bench.limits import train_step_bytes

    memo: list = []

    def count() -> tuple[int, int]:
        if not memo:
            setup = _setup("fast", B, hidden, device, state=state, heads=heads)
            with FlopCounterMode(display=False) as flop_count:
                total, _per_op = train_step_bytes(setup[1], _step_fn("fast", *setup, autocast_dtype=autocast_dtype))
            memo.append((total, int(flop_count.get_total_flops())))
        return memo[0]

    return (lambda: count()[0]), (lambda: count()[1])


def _bf16_case(backend: str, config: str, B: int, hidden: int, device, state: dict, heads: int,
               threads: int) -> BenchCase:
    """The fast model's step under ``torch.autocast(device, torch.bfloat16)`` from the group's
    initial parameters; ``max_rel_err_vs_fp64``: its first predictions against the reference
    model's in float64 from the same parameters."""
    from stoichconv.bench.core import max_relative_error
    from stoichconv.train import build_model, model_step

    setup = _setup("fast", B, hidden, device, state=state, heads=heads)
    first: list = []

    def error_vs_float64() -> dict:
        graph, _, pert, ptr, _, _ = setup
        graph64 = graph.clone()
        met = graph64["metabolite", "reaction", "metabolite"]
        met.stoichiometry = met.stoichiometry.double()
        reference = build_model("reference", graph, hidden, LAYERS, heads, False).to(device)
        reference.load_state_dict(state)
        reference = reference.double()
        with torch.no_grad():
            expected, _ = model_step(reference, "reference", graph64, pert, ptr)
        return {"max_rel_err_vs_fp64": f"{max_relative_error(first[0], expected):.1e}"}

    return BenchCase(op=OP, backend=f"{backend} bf16-mixed", config=config, batch=B,
                     run=_step_fn("fast", *setup, autocast_dtype=torch.bfloat16, first=first),
                     extra={"threads": threads}, measure_extra=error_vs_float64,
                     bytes_moved=step_floors(B, hidden, device, state, heads, torch.bfloat16)[0],
                     min_repeats=STEP_REPEATS)


def cases(args) -> list:
    """Training-step rows at ``args.train_batches`` (default B = 2, 8; 2 heads) and at B = 32
    (2 and 10 heads), hidden ``args.channels``."""
    device = torch.device(getattr(args, "device", "cpu"))
    hidden = int(getattr(args, "channels", 64))
    threads = int(getattr(args, "threads", None) or torch.get_num_threads())
    batches = list(getattr(args, "train_batches", [2, 8]))
    fast_backend = "cuda" if device.type == "cuda" else "cpu"
    wanted = set(getattr(args, "backends", None) or [REFERENCE, fast_backend])
    groups = []
    if getattr(args, "large_train", True):  # --no-large-train skips them
        # first: on CPU their references are timed now, in a process of their own, while this
        # one holds no other case
        groups += [(LARGE_BATCH, heads) for heads in sorted(LARGE_BATCH_HEADS)]
    groups += [(B, 2) for B in batches if B != LARGE_BATCH]
    out, too_big = [], None
    for B, heads in groups:
        config = f"C={hidden},L={LAYERS},H={heads}"

        def measure(backend, n=B, h=heads):
            if device.type == "cuda":
                return measure_peak(backend if backend == REFERENCE else "cuda", n, hidden, threads, h)
            return peak_in_subprocess(backend, n, hidden, threads, h)

        reference_extra, reference_timed = None, None
        if B == LARGE_BATCH and device.type != "cuda":
            # timed now in a fresh process (it may not fit beside this one); more heads need more
            # memory, so one that did not fit stops the runs of larger ones
            if too_big is not None:
                reference_extra = {"peak_rss_mb": f"not run (H={too_big} did not fit)", "fits": False}
            else:
                reference_extra = time_in_subprocess(REFERENCE, B, hidden, threads, heads, STEP_REPEATS)
                if reference_extra.get("fits") is False:
                    too_big = heads
                else:
                    timed = reference_extra
                    reference_timed = lambda t=timed: (t["median_ms"], t["output"])  # noqa: E731
                    reference_extra = {k: v for k, v in timed.items() if k not in ("median_ms", "output")}
        ref_setup = _setup("reference", B, hidden, device, heads=heads)
        state = {k: v.clone() for k, v in ref_setup[1].state_dict().items()}
        floors = step_floors(B, hidden, device, state, heads)
        note = {}
        if reference_extra is not None and reference_extra.get("fits") is False:
            note = {"reference_peak_rss_mb": reference_extra["peak_rss_mb"]}
        else:
            ref_measure = ((lambda e=reference_extra: e) if reference_extra is not None
                           else (lambda m=measure: m(REFERENCE)))
            reference_case = _case(REFERENCE, "reference", config, B, ref_setup, threads, ref_measure, floors)
            reference_case.timed = reference_timed
            out.append(reference_case)
        if fast_backend in wanted:
            fast_setup = _setup("fast", B, hidden, device, state=state, heads=heads)
            out.append(_case(fast_backend, "fast", config, B, fast_setup, threads,
                             lambda n=note, m=measure: {**m(fast_backend), **n}, floors))
            if B != LARGE_BATCH:  # the bf16-mixed step, its first predictions against float64
                out.append(_bf16_case(fast_backend, config, B, hidden, device, state, heads, threads))
        del ref_setup
    return out


if __name__ == "__main__":
    # python -m stoichconv.bench.hetero_cell_cases peak KIND B HIDDEN THREADS HEADS
    # python -m stoichconv.bench.hetero_cell_cases time KIND B HIDDEN THREADS HEADS REPEATS OUTPUT_PATH
    mode, kind = sys.argv[1], sys.argv[2]
    B, hidden, threads, heads = (int(a) for a in sys.argv[3:7])
    if mode == "peak":
        print(json.dumps(measure_peak(kind, B, hidden, threads, heads)))
    else:
        print(json.dumps(time_steps(kind, B, hidden, threads, heads, int(sys.argv[7]), sys.argv[8])))
