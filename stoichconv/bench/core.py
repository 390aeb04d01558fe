"""Benchmark runner: timing, the comparison against the reference row of the
same case, the table, JSON records and the plot.

A benchmark is a list of :class:`BenchCase`. Cases with the same
``(op, config, batch)`` form a group; the one with ``backend == "reference"``
is the baseline its group's ratios and errors are measured against, in the
same run.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from stoichconv.backends import KERNEL_BACKENDS  # noqa: F401  (rows timed on the project's kernels)

REFERENCE = "reference"


@dataclass
class BenchCase:
    """One timed row. ``run()`` performs one measured call (e.g. forward +
    backward) and returns the tensors to compare with the reference (or None)."""

    op: str
    backend: str
    config: str
    batch: int
    run: Callable[[], Any]
    extra: dict = field(default_factory=dict)
    # Called once after timing; its dict is merged into ``extra`` (e.g. peak memory).
    measure_extra: Optional[Callable[[], dict]] = None

    @property
    def group(self) -> tuple:
        return (self.op, self.config, self.batch)


@dataclass
class BenchResult:
    op: str
    backend: str
    config: str
    batch: int
    median_ms: float
    ratio_vs_reference: Optional[float]
    max_rel_err: Optional[float]
    extra: dict

    def record(self) -> dict:
        return {
            "op": self.op,
            "backend": self.backend,
            "config": self.config,
            "batch": self.batch,
            "median_ms": round(self.median_ms, 4),
            "ratio_vs_reference": None if self.ratio_vs_reference is None else round(self.ratio_vs_reference, 3),
            "max_rel_err": self.max_rel_err,
            **self.extra,
        }


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], min_repeats: int = 3, max_repeats: int = 20, budget_s: float = 2.0) -> tuple[float, Any]:
    """Median wall time (ms) of ``fn`` after one warm-up call, repeated at
    least ``min_repeats`` times and until ``budget_s`` or ``max_repeats``."""
    output = fn()  # warm-up (caches, lazy init); its output is the one compared
    _synchronize()
    times = []
    start_all = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start_all < budget_s):
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), output


def _flatten(output: Any) -> list[torch.Tensor]:
    if output is None:
        return []
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    return [t for item in output for t in _flatten(item)]


def max_relative_error(output: Any, reference: Any) -> Optional[float]:
    """max |a - b| / max |b| over all paired tensors (None if nothing to compare)."""
    pairs = list(zip(_flatten(output), _flatten(reference)))
    if not pairs:
        return None
    worst = 0.0
    for a, b in pairs:
        a, b = a.detach().double().cpu().reshape(-1), b.detach().double().cpu().reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f"benchmark output shape {tuple(a.shape)} differs from the reference's {tuple(b.shape)}")
        scale = b.abs().max().item() if b.numel() else 0.0
        err = (a - b).abs().max().item() if b.numel() else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def run_cases(cases: Iterable[BenchCase], budget_s: float = 2.0, progress: bool = True) -> list[BenchResult]:
    """Time every case; reference rows of a group first so ratios and errors
    come from the same run."""
    cases = sorted(cases, key=lambda c: (c.group, c.backend != REFERENCE))
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is a nicety
        tqdm = None
    iterator = tqdm(cases, desc="benchmark", unit="case") if (progress and tqdm) else cases
    reference: dict[tuple, tuple[float, Any]] = {}
    results = []
    for case in iterator:
        if tqdm and progress:
            iterator.set_postfix_str(f"{case.op}/{case.config}/B={case.batch}/{case.backend}")
        median_ms, output = time_call(case.run, budget_s=budget_s)
        extra = dict(case.extra)
        if case.measure_extra is not None:
            extra.update(case.measure_extra())
        if case.backend == REFERENCE:
            reference[case.group] = (median_ms, output)
            ratio, err = 1.0, 0.0 if _flatten(output) else None
        elif case.group in reference:
            ref_ms, ref_out = reference[case.group]
            ratio, err = ref_ms / median_ms, max_relative_error(output, ref_out)
        else:
            ratio, err = None, None
        results.append(BenchResult(case.op, case.backend, case.config, case.batch, median_ms, ratio, err, extra))
        del output
    return results


def format_table(results: list[BenchResult]) -> str:
    extra_keys = sorted({k for r in results for k in r.extra})
    header = ["op", "config", "B", "backend", "median ms", "vs reference", "max rel err"] + extra_keys
    rows = [
        [
            r.op,
            r.config,
            str(r.batch),
            r.backend,
            f"{r.median_ms:.3f}",
            "-" if r.ratio_vs_reference is None else f"{r.ratio_vs_reference:.2f}x",
            "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}",
        ]
        + [str(r.extra.get(k, "")) for k in extra_keys]
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_json(results: list[BenchResult], path: str, metadata: dict) -> None:
    with open(path, "w") as f:
        json.dump({"metadata": metadata, "records": [r.record() for r in results]}, f, indent=2)


def write_plot(results: list[BenchResult], path: str) -> None:
    """Bar chart of speed-up vs the reference, one panel per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r.op for r in results})
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rows = [r for r in results if r.op == op and r.ratio_vs_reference is not None and r.backend != REFERENCE]
        labels = [f"{r.config}\nB={r.batch}\n{r.backend}" for r in rows]
        ax.bar(range(len(rows)), [r.ratio_vs_reference for r in rows], color="tab:blue")
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("speed-up vs reference")
        ax.set_yscale("log")
        ax.set_title(op)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
