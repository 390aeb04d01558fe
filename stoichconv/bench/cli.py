"""``python -m stoichconv.bench`` / ``stoichconv-bench``: the main benchmark.

Runs on the bundled yeast-GEM cell graph and prints, per op, config and batch
size, the median time of every backend, its speed-up over the reference
measured in the same run, its max relative error against the reference, the bytes its op must
move (``stoichconv.bench.limits``), its achieved GB/s and that as % of the copy bandwidth of the
device measured in the same run (before and after the rows; the higher of the two is the limit).
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib
import os
import platform
import sys

import torch

from stoichconv.bench.core import apply_roofline, format_table, run_cases, write_json, write_plot
from stoichconv.bench.limits import copy_bandwidth_gbs, cpu_name, gemm_gflops

# op name -> module with a ``cases(args)`` function
CASE_MODULES = {
    "stoich_conv": "stoichconv.bench.stoich_conv_cases",
    "filter_edges": "stoichconv.bench.pert_mask_cases",
    "perturb_batch": "stoichconv.bench.pert_mask_cases",
    "train_step": "stoichconv.bench.hetero_cell_cases",
}


# --malloc NAME -> (the shared library preloaded, the Debian/Ubuntu package that has it)
ALLOCATORS = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
}


def find_allocator(name: str) -> str:
    """Path of the shared library of allocator ``name``; a clear error with the install command
    when it is not installed."""
    soname, package = ALLOCATORS[name]
    for pattern in (f"/usr/lib/*-linux-gnu/{soname}", f"/usr/lib/{soname}", f"/usr/lib64/{soname}",
                    f"/usr/local/lib/{soname}", f"/lib/*-linux-gnu/{soname}"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise SystemExit(f"stoichconv-bench --malloc {name}: {soname} is not installed; install it with "
                     f"`sudo apt-get install -y {package}` (Debian/Ubuntu) and run again")


def loaded_allocator() -> str:
    """The allocator this process runs on: the --malloc library mapped into it, else glibc."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        maps = ""
    for name, (soname, _package) in ALLOCATORS.items():
        if soname.split(".so")[0] + ".so" in maps:
            return name
    return "glibc"


def preload_allocator(name: str, argv) -> None:
    """Re-run this command with allocator ``name`` preloaded (``LD_PRELOAD``; it must be in place
    before the process starts), unless it is loaded already."""
    if name == "glibc" or loaded_allocator() == name:
        return
    path = find_allocator(name)
    env = dict(os.environ)
    env["LD_PRELOAD"] = path + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    args = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "stoichconv.bench", *args], env)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _str_list(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stoichconv-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=_str_list, default=list(CASE_MODULES), help="comma-separated ops (default: all)")
    parser.add_argument("--batches", type=_int_list, default=[1, 8, 32], help="batch sizes (default 1,8,32)")
    parser.add_argument("--train-batches", type=_int_list, default=[2, 8], help="batch sizes of the training-step rows")
    parser.add_argument("--no-large-train", dest="large_train", action="store_false",
                        help="skip the training-step rows at the original B = 32 (2 and 10 heads)")
    parser.add_argument("--channels", type=int, default=64, help="hidden width C (default 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", type=_str_list, default=None,
                        help="backends to time (default: reference, torch.sparse and every one available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (make bench uses 2)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per row (at least 3 repeats)")
    parser.add_argument("--json", dest="json_path", default=None, help="write one record per row to this file")
    parser.add_argument("--plot", dest="plot_path", default=None,
                        help="write a PNG chart: per op, each row's %% of the copy bandwidth, bars grouped by backend")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--malloc", choices=["glibc", *ALLOCATORS], default="glibc",
                        help="memory allocator: glibc's (default) or jemalloc / tcmalloc preloaded "
                             "(Debian packages libjemalloc2 / libtcmalloc-minimal4; make bench MALLOC=...)")
    args = parser.parse_args(argv)
    unknown = set(args.ops) - set(CASE_MODULES)
    if unknown:
        parser.error(f"unknown --ops {sorted(unknown)}; choose from {list(CASE_MODULES)}")
    if args.backends is None:
        args.backends = ["reference", "torch.sparse"] + (["cuda", "triton"] if args.device.startswith("cuda") else ["cpu"])
    return args


def rescale_limit(results, copy_gbs: float):
    """The rows' % of copy BW against ``copy_gbs``."""
    for r in results:
        if r.gbs is not None:
            r.pct_copy_bw = 100 * r.gbs / copy_gbs
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    preload_allocator(args.malloc, argv)
    if loaded_allocator() != args.malloc:
        raise SystemExit(f"stoichconv-bench --malloc {args.malloc}: the process runs on {loaded_allocator()} "
                         f"(LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r})")
    if args.threads:
        torch.set_num_threads(args.threads)
    # the training-step cases first: their B = 32 references are timed while they are built, in
    # a process of their own that needs nearly all of a 24 GB machine (hetero_cell_cases)
    modules = sorted(dict.fromkeys(CASE_MODULES[op] for op in args.ops),
                     key=lambda name: name != CASE_MODULES["train_step"])
    copy_before = copy_bandwidth_gbs(args.device)
    results = []
    for module_name in modules:
        # one module's cases at a time, built right before they are timed and freed after: the
        # rows of one op do not run beside the models, batches and buffers of the others
        module = importlib.import_module(module_name)
        cases = [c for c in module.cases(args) if c.op in args.ops]
        results += run_cases(cases, budget_s=args.budget, progress=not args.no_progress, copy_gbs=copy_before)
        del cases
        gc.collect()
    copy_after = copy_bandwidth_gbs(args.device)
    copy_gbs = max(copy_before, copy_after)
    gemm = gemm_gflops(args.device, width=args.channels)
    if copy_after > copy_before:  # the limit is the better of the two measurements
        results = rescale_limit(results, copy_gbs)
    apply_roofline(results, copy_gbs, gemm)
    metadata = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "channels": args.channels,
        "allocator": loaded_allocator(),
        "copy_gbs": round(copy_gbs, 3),
        "copy_gbs_before": round(copy_before, 3),
        "copy_gbs_after": round(copy_after, 3),
        "gemm_gflops": round(gemm, 2),
    }
    print(f"\nstoichconv benchmark on {metadata['device']} ({metadata['threads']} threads), "
          f"allocator {metadata['allocator']}, forward + backward unless stated, ratios vs the reference in this run; "
          f"copy bandwidth {copy_gbs:.1f} GB/s (before {copy_before:.1f}, after {copy_after:.1f}); "
          f"float32 product [32·N, C] @ [C, C]: {gemm:.0f} GFLOP/s; CPU {metadata['cpu']}")
    print(format_table(results))
    if args.json_path:
        write_json(results, args.json_path, metadata)
        print(f"wrote {args.json_path}")
    if args.plot_path:
        write_plot(results, args.plot_path, copy_gbs)
        print(f"wrote {args.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
