"""glibc's malloc vs jemalloc vs tcmalloc on the ``make bench`` rows that allocate the most (both
sides: the fast op and its reference), for a shared, noisy machine.

A whole ``make bench`` per allocator cannot be compared on a machine other jobs share: the load
changes by several times between runs minutes apart. This script instead runs short processes,
one per allocator, in alternation (``--rounds`` times), each timing the same rows
(``stoichconv.bench`` cases at one batch size) and reporting per row the median wall time and the
median CPU time (user + system of the process, every thread) per call; page faults are system
time, so the allocator's effect shows in both, while the CPU time hardly moves when other jobs
take the cores. The summary gives, per row and allocator, the median over rounds and the ratio to
glibc's median, and each process's copy bandwidth (:mod:`stoichconv.bench.limits`) as a load
indicator.

    python benchmarks/malloc_compare.py [--rounds 3] [--batch 32] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ALLOCATORS = ("glibc", "jemalloc", "tcmalloc")
ROWS = (  # (op, config, backend, calls timed)
    ("filter_edges", "physical", "reference", 5),
    ("filter_edges", "physical", "cpu", 7),
    ("perturb_batch", "cell graph", "reference", 5),
    ("perturb_batch", "cell graph", "cpu", 7),
    ("stoich_conv", "plain", "reference", 3),
    ("stoich_conv", "plain", "cpu", 5),
    ("stoich_conv", "gated+attention", "reference", 2),
    ("stoich_conv", "gated+attention", "cpu", 5),
)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(batch: int, threads: int) -> dict:
    """In this process: every row of ROWS, median wall / CPU ms per call after one warm-up."""
    import torch

    from stoichconv.bench import cli, pert_mask_cases, stoich_conv_cases
    from stoichconv.bench.limits import copy_bandwidth_gbs

    torch.set_num_threads(threads)
    args = argparse.Namespace(device="cpu", batches=[batch], channels=64, backends=["reference", "cpu"])
    wanted = {(op, config, backend): calls for op, config, backend, calls in ROWS}
    cases = [c for module in (pert_mask_cases, stoich_conv_cases) for c in module.cases(args)
             if (c.op, c.config, c.backend) in wanted]
    out = {"allocator": cli.loaded_allocator(), "copy_gbs": copy_bandwidth_gbs("cpu"), "rows": {}}
    for case in cases:
        case.run()  # warm-up
        wall, cpu = [], []
        for _ in range(wanted[(case.op, case.config, case.backend)]):
            start, start_cpu = time.perf_counter(), _cpu_s()
            case.run()
            wall.append((time.perf_counter() - start) * 1e3)
            cpu.append((_cpu_s() - start_cpu) * 1e3)
        out["rows"][f"{case.op} | {case.config} | {case.backend}"] = {
            "wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocators", default=",".join(ALLOCATORS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.batch, args.threads)))
        return 0
    from stoichconv.bench.cli import find_allocator

    allocators = [a for a in args.allocators.split(",") if a]
    preload = {a: ("" if a == "glibc" else find_allocator(a)) for a in allocators}
    runs = []
    for rnd in range(args.rounds):
        for name in allocators:
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            if preload[name]:
                env["LD_PRELOAD"] = preload[name]
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch", str(args.batch),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if result["allocator"] != name:
                raise SystemExit(f"the {name} process ran on {result['allocator']}")
            result["round"] = rnd
            runs.append(result)
            print(f"round {rnd} {name}: copy {result['copy_gbs']:.1f} GB/s", flush=True)
    summary = {}
    for row in runs[0]["rows"]:
        summary[row] = {}
        for name in allocators:
            mine = [r["rows"][row] for r in runs if r["allocator"] == name]
            summary[row][name] = {key: statistics.median(m[key] for m in mine) for key in ("wall_ms", "cpu_ms")}
    print(f"\nB = {args.batch}, {args.threads} threads, {args.rounds} alternating rounds; median over rounds "
          f"(ratio to glibc)")
    print(f"{'row':<46}" + "".join(f"{name + ' wall / cpu ms':>34}" for name in allocators))
    for row, per in summary.items():
        base = per.get("glibc")
        cells = []
        for name in allocators:
            v = per[name]
            ratio = (f" ({base['wall_ms'] / v['wall_ms']:.1f}x/{base['cpu_ms'] / v['cpu_ms']:.1f}x)"
                     if base and name != "glibc" else "")
            cells.append(f"{v['wall_ms']:.1f} / {v['cpu_ms']:.1f}{ratio}")
        print(f"{row:<46}" + "".join(f"{c:>34}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "summary": summary, "batch": args.batch, "threads": args.threads}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
