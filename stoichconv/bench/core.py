"""Benchmark runner: timing, the comparison against the reference row of the
same case, the table, JSON records and the plot.

A benchmark is a list of :class:`BenchCase`. Cases with the same
``(op, config, batch)`` form a group; the one with ``backend == "reference"``
is the baseline its group's ratios and errors are measured against, in the
same run.

Every case may state ``bytes_moved``: the bytes its op must move at least
(:mod:`stoichconv.bench.limits`); with the copy bandwidth measured in the same run
(:func:`stoichconv.bench.limits.copy_bandwidth_gbs`) each row then reports its achieved GB/s
and its % of that limit.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch

from stoichconv.bench.limits import achieved

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
    # Bytes the op must move at least (stoichconv.bench.limits), or a function computing them
    # (called once, after timing, e.g. when counting needs one more run); None: not stated.
    bytes_moved: Union[int, Callable[[], int], None] = None
    # Floating-point operations of the op's dense products (stoichconv.bench.limits), or a function
    # computing them (called once, after timing); None: not stated. With the measured product
    # throughput they give the row's compute floor.
    flops: Union[int, Callable[[], int], None] = None
    # Timed repeats at least (after the warm-up), whatever the time budget.
    min_repeats: int = 3
    # Or: a function that returns (median ms, output of the warm-up call) measured elsewhere
    # (e.g. in a fresh process, for a step that would not fit beside this one); ``run`` is then
    # not timed here.
    timed: Optional[Callable[[], tuple[float, Any]]] = None

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
    bytes_moved: Optional[int] = None
    gbs: Optional[float] = None  # bytes_moved / median time
    pct_copy_bw: Optional[float] = None  # gbs as % of the run's copy bandwidth
    flops: Optional[int] = None
    pct_roofline: Optional[float] = None  # the row's floor time (bytes or products) as % of its time

    def record(self) -> dict:
        return {
            "op": self.op,
            "backend": self.backend,
            "config": self.config,
            "batch": self.batch,
            "median_ms": round(self.median_ms, 4),
            "ratio_vs_reference": None if self.ratio_vs_reference is None else round(self.ratio_vs_reference, 3),
            "max_rel_err": self.max_rel_err,
            "bytes_moved": self.bytes_moved,
            "gbs": None if self.gbs is None else round(self.gbs, 3),
            "pct_copy_bw": None if self.pct_copy_bw is None else round(self.pct_copy_bw, 3),
            "flops": self.flops,
            "pct_roofline": None if self.pct_roofline is None else round(self.pct_roofline, 3),
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


def _resolve_count(value: Union[int, Callable[[], int], None]) -> Optional[int]:
    """A case's ``bytes_moved`` or ``flops``: the number, or what its function returns."""
    value = value() if callable(value) else value
    return None if value is None else int(value)


def run_cases(cases: Iterable[BenchCase], budget_s: float = 2.0, progress: bool = True,
              copy_gbs: Optional[float] = None) -> list[BenchResult]:
    """Time every case; reference rows of a group first so ratios and errors
    come from the same run. ``copy_gbs``: the limit the rows' % of copy BW refers to."""
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
        if case.timed is not None:
            median_ms, output = case.timed()
        else:
            median_ms, output = time_call(case.run, min_repeats=case.min_repeats,
                                          max_repeats=max(20, case.min_repeats), budget_s=budget_s)
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
        nbytes = _resolve_count(case.bytes_moved)
        limit = achieved(nbytes, median_ms, copy_gbs)
        results.append(BenchResult(case.op, case.backend, case.config, case.batch, median_ms, ratio, err, extra,
                                   nbytes, limit.get("gbs"), limit.get("pct_copy_bw"),
                                   _resolve_count(case.flops)))
        del output
    return results


def apply_roofline(results: list[BenchResult], copy_gbs: float, gemm_gflops: float) -> list[BenchResult]:
    """Each row's ``pct_roofline``: its floor time as % of its median time, the floor being the
    longer of its bytes at the copy bandwidth and its dense products at the measured product
    throughput (:func:`stoichconv.bench.limits.gemm_gflops`); 100 % is a row at the machine's
    binding limit. Rows with neither count get None."""
    for r in results:
        floors = []
        if r.bytes_moved and copy_gbs:
            floors.append(r.bytes_moved / (copy_gbs * 1e9))
        if r.flops and gemm_gflops:
            floors.append(r.flops / (gemm_gflops * 1e9))
        r.pct_roofline = 100 * max(floors) / (r.median_ms * 1e-3) if floors and r.median_ms else None
    return results


def format_table(results: list[BenchResult]) -> str:
    extra_keys = sorted({k for r in results for k in r.extra})
    header = ["op", "config", "B", "backend", "median ms", "vs reference", "max rel err", "MB moved", "GB/s",
              "% copy BW", "GFLOP", "% roofline"] + extra_keys
    rows = [
        [
            r.op,
            r.config,
            str(r.batch),
            r.backend,
            f"{r.median_ms:.3f}",
            "-" if r.ratio_vs_reference is None else f"{r.ratio_vs_reference:.2f}x",
            "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}",
            "-" if r.bytes_moved is None else f"{r.bytes_moved / 1e6:.1f}",
            "-" if r.gbs is None else f"{r.gbs:.2f}",
            "-" if r.pct_copy_bw is None else f"{r.pct_copy_bw:.1f}%",
            "-" if r.flops is None else f"{r.flops / 1e9:.2f}",
            "-" if r.pct_roofline is None else f"{r.pct_roofline:.1f}%",
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


def write_plot(results: list[BenchResult], path: str, copy_gbs: Optional[float] = None) -> None:
    """One panel per op: each row's achieved share of the copy bandwidth (log scale), bars grouped
    by backend (one bar per config and batch size, the same colour for the same config and B in
    every group), the limit (100 % = the copy bandwidth measured in the run) drawn as a red line;
    each bar is labelled with its median time and its speed-up over the reference. Rows without a
    byte count are drawn at the bottom with their time only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ops = list(dict.fromkeys(r.op for r in results))
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.6 * len(ops)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, op in zip(axes[:, 0], ops):
        rows = [r for r in results if r.op == op]
        backends = list(dict.fromkeys(r.backend for r in sorted(rows, key=lambda r: r.backend != REFERENCE)))
        keys = list(dict.fromkeys((r.config, r.batch) for r in rows))
        width = 0.8 / max(1, len(keys))
        pcts = [r.pct_copy_bw for r in rows if r.pct_copy_bw]
        floor = min([*pcts, 1.0]) / 3
        for gi, backend in enumerate(backends):
            for ki, key in enumerate(keys):
                match = [r for r in rows if r.backend == backend and (r.config, r.batch) == key]
                if not match:
                    continue
                r = match[0]
                xpos = gi + (ki - (len(keys) - 1) / 2) * width
                height = r.pct_copy_bw if r.pct_copy_bw else floor
                ax.bar(xpos, height, width * 0.92, color=cmap(ki % 10), hatch=None if r.pct_copy_bw else "//",
                       label=f"{key[0]}, B={key[1]}" if gi == 0 or not ax.get_legend_handles_labels()[1].count(
                           f"{key[0]}, B={key[1]}") else None)
                ratio = "" if r.ratio_vs_reference is None or r.backend == REFERENCE else f"\n{r.ratio_vs_reference:.1f}×"
                ms = f"{r.median_ms:.0f}" if r.median_ms >= 100 else f"{r.median_ms:.3g}"
                text = f"{ms} ms{ratio}"
                if r.pct_copy_bw:
                    text = f"{r.pct_copy_bw:.2g}%\n" + text
                ax.text(xpos, height * 1.08, text, ha="center", va="bottom", fontsize=6.5)
        limit = f" ({copy_gbs:.1f} GB/s)" if copy_gbs else ""
        ax.axhline(100.0, color="tab:red", lw=1.5, label=f"limit: copy bandwidth{limit}")
        ax.set_yscale("log")
        ax.set_ylim(floor / 1.5, 600)
        ax.set_xticks(range(len(backends)))
        ax.set_xticklabels(backends, fontsize=9)
        ax.set_xlim(-0.5, len(backends) - 0.5)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}%"))
        ax.set_ylabel("% of copy bandwidth")
        ax.set_title(f"{op}: bytes it must move / time, vs the limit", fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        ax.legend(seen.values(), seen.keys(), fontsize=7, loc="upper left", ncol=min(5, len(seen)))
        ax.grid(axis="y", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
