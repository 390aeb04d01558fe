"""Per-op profile of one HeteroCell training step on the bundled cell graph (torch.profiler).

    python benchmarks/profile_train_step.py --kind fast --batch 8 --threads 2 [--heads 2] [--rows 25]

Prints the ops by self CPU time (forward, backward and optimizer of ``--repeats`` steps after one
warm-up step); the training-step benchmark rows (``stoichconv.bench.hetero_cell_cases``) time the
same step.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from stoichconv.bench.hetero_cell_cases import _setup, _step_fn


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["fast", "reference"], default="fast")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = _step_fn(args.kind, *_setup(args.kind, args.batch, args.hidden, device, heads=args.heads))
    run()  # warm-up: plan caches, allocator
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.repeats):
            run()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
