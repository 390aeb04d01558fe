"""``python -m stoichconv.train``: train a HeteroCell on random gene-deletion batches.

There is no real fitness data offline, so the labels are **synthetic**, from a fixed random
*teacher* (seeded by ``--teacher-seed``, independent of the model): every gene g gets a fixed
random vector ``t_g`` in R^16; a sample deleting the set P has ``s = sum_{g in P} t_g`` and

* fitness ``y_1 = tanh(w_1 . relu(W s + c))`` (a fixed random 2-layer network),
* gene interaction ``y_2 = sum_{g < h in P} <t_g, t_h> / 16`` (0 for single deletions).

A fraction ``--nan-fraction`` (default 0.1) of the labels is replaced by NaN on purpose, and the
loss is the NaN-tolerant MSE over both outputs (:func:`stoichconv.reference.hetero_cell.nan_mse_loss`).
The optimiser is AdamW with gradient-norm clipping (``--clip``).

Models: ``--model fast`` (default; :class:`stoichconv.models.hetero_cell.HeteroCell`, takes the
perturbations directly) or ``--model reference`` (the PyG reference on a compacted batch built by
:func:`stoichconv.reference.perturb.perturb_batch_reference`). ``--small`` trains on a small
synthetic cell graph (:func:`make_small_cell_graph`) instead of the bundled real-size one.

Distributed: launch with ``torchrun --nproc-per-node K -m stoichconv.train ...``; each process
takes its slice of the global batch (``--batch-size`` is the global batch), gradients are averaged
by ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU). In the seed's design
(``--metabolism-to-gene`` off) the GPR and metabolism parameters never reach the loss, so DDP is
built with ``find_unused_parameters=True`` (no dummy ``0 * param`` loss); with
``--metabolism-to-gene`` every parameter gets a gradient and plain DDP is used. Note: the graph-mode
LayerNorm normalises over all nodes of a batch, so a K-process step equals a single-process step
whose loss is the mean of the K shard losses (each shard run as its own batch), not the loss of
the concatenated batch.

Output (rank 0): a progress bar with the loss and the step time, or with ``--no-progress`` one line
per step (``--print-every``) with the loss and steps/s; always a final summary line (steps, time,
steps/s, the first and last losses, peak RSS). ``--log PATH`` writes ``{"args": ..., "start_step":
..., "losses": [...], "seconds": ...}`` as JSON.

Checkpoints: ``--save PATH`` writes ``{"format", "model", "config", "state_dict", "optimizer",
"step", "args", "rng"}`` at the end (and every ``--save-every`` steps); ``--resume PATH`` rebuilds
the model from its ``config``, restores the optimiser and the RNG, and continues to ``--steps``
(batches are seeded per step, so a resumed run repeats the uninterrupted one).

Precision: ``--precision`` takes the names Lightning users know: ``32`` (float32, default),
``bf16-mixed`` (parameters and optimiser in float32, the forward under
``torch.autocast(device, torch.bfloat16)``) and ``16-mixed`` (the same with float16 plus a
``torch.amp.GradScaler`` that scales the loss and skips steps whose gradients overflow). The loss
is computed in float32 in every mode.

torchcell: ``--torchcell-checkpoint PATH --torchcell-config JSON`` starts from an original torchcell
``HeteroCell`` (its ``state_dict`` or Lightning checkpoint, and its constructor arguments, see
:meth:`stoichconv.reference.hetero_cell.HeteroCell.from_torchcell`); ``--save-torchcell PATH``
writes the trained model back under the original's names. The checkpoint's node counts must be the
cell graph's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

import torch
from torch_geometric.data import HeteroData

from stoichconv.data import load_cell_graph, random_perturbations
from stoichconv.data.relations import GPR, METABOLISM, PHYSICAL, REGULATORY
from stoichconv.perturb import perturb_batch
from stoichconv.reference.hetero_cell import nan_mse_loss

__all__ = ["make_small_cell_graph", "Teacher", "build_model", "model_class", "model_step", "train", "main",
           "parse_args", "save_checkpoint", "load_checkpoint", "read_torchcell_config"]

TEACHER_DIM = 16
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
AUTOCAST_DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def make_small_cell_graph(num_genes: int = 40, num_reactions: int = 24, num_metabolites: int = 18,
                          seed: int = 0) -> HeteroData:
    """A small synthetic cell graph with the wildtype's fields (self-loops, genes without edges,
    reactions without GPR genes, isozyme-like shared genes, signed stoichiometry)."""
    gen = torch.Generator().manual_seed(seed)
    data = HeteroData()
    data["gene"].num_nodes = num_genes
    data["reaction"].num_nodes = num_reactions
    data["metabolite"].num_nodes = num_metabolites
    u = torch.randint(num_genes, (4 * num_genes,), generator=gen)
    v = torch.randint(num_genes, (4 * num_genes,), generator=gen)
    keys = torch.unique(torch.minimum(u, v) * num_genes + torch.maximum(u, v))
    loops = torch.arange(0, num_genes, 7) * (num_genes + 1)
    keys = torch.unique(torch.cat([keys, loops]))
    data[PHYSICAL].edge_index = torch.stack([keys // num_genes, keys % num_genes])
    regulators = torch.randperm(num_genes, generator=gen)[:5]
    src = regulators[torch.randint(5, (2 * num_genes,), generator=gen)]
    dst = torch.randint(num_genes, (2 * num_genes,), generator=gen)
    keys = torch.unique(src * num_genes + dst)
    data[REGULATORY].edge_index = torch.stack([keys // num_genes, keys % num_genes])
    metabolic_genes = torch.randperm(num_genes, generator=gen)[: num_genes // 2]
    gpr_rows, gpr_cols = [], []
    for r in range(num_reactions):
        k = int(torch.randint(3, (1,), generator=gen))  # 0, 1 or 2 genes
        genes = metabolic_genes[torch.randperm(metabolic_genes.numel(), generator=gen)[:k]]
        gpr_rows += genes.tolist()
        gpr_cols += [r] * k
    data[GPR].edge_index = torch.tensor([gpr_rows, gpr_cols], dtype=torch.long)
    inc_m, inc_r, stoich = [], [], []
    for r in range(num_reactions):
        k = int(torch.randint(2, 5, (1,), generator=gen))
        mets = torch.randperm(num_metabolites - 1, generator=gen)[:k]  # the last metabolite is isolated
        coeff = torch.randint(1, 4, (k,), generator=gen).float()
        coeff[: max(1, k // 2)] *= -1
        inc_m += mets.tolist()
        inc_r += [r] * k
        stoich += coeff.tolist()
    met = data[METABOLISM]
    met.hyperedge_index = torch.tensor([inc_m, inc_r], dtype=torch.long)
    met.stoichiometry = torch.tensor(stoich, dtype=torch.float32)
    met.num_edges = num_reactions
    return data


class Teacher:
    """The fixed random teacher of the synthetic labels (see the module docstring)."""

    def __init__(self, num_genes: int, seed: int = 1234, nan_fraction: float = 0.1):
        gen = torch.Generator().manual_seed(seed)
        d = TEACHER_DIM
        self.gene_vectors = torch.randn(num_genes, d, generator=gen, dtype=torch.float64)
        self.w = torch.randn(d, d, generator=gen, dtype=torch.float64) / d ** 0.5
        self.c = torch.randn(d, generator=gen, dtype=torch.float64)
        self.w1 = torch.randn(d, generator=gen, dtype=torch.float64) / d ** 0.5
        self.nan_fraction = nan_fraction
        self.seed = seed

    def __call__(self, pert: torch.Tensor, pert_ptr: torch.Tensor, step: int = 0) -> torch.Tensor:
        B = pert_ptr.numel() - 1
        counts = pert_ptr.diff()
        sample = torch.repeat_interleave(torch.arange(B), counts)
        t = self.gene_vectors[pert]
        s = torch.zeros(B, TEACHER_DIM, dtype=torch.float64).index_add_(0, sample, t)
        fitness = torch.tanh(torch.relu(s @ self.w.t() + self.c) @ self.w1)
        sq = torch.zeros(B, TEACHER_DIM, dtype=torch.float64).index_add_(0, sample, t * t)
        interaction = 0.5 * ((s * s).sum(-1) - sq.sum(-1)) / TEACHER_DIM
        y = torch.stack([fitness, interaction], dim=1)
        gen = torch.Generator().manual_seed(self.seed * 7919 + step)
        y[torch.rand(B, 2, generator=gen) < self.nan_fraction] = float("nan")
        return y


def build_model(kind: str, cell_graph: HeteroData, hidden: int, layers: int, heads: int,
                metabolism_to_gene: bool, dropout: float = 0.0, **options):
    """A fresh ``reference`` or ``fast`` HeteroCell sized from ``cell_graph`` (``options``: the
    models' keyword-only configuration, e.g. ``norm``, ``activation``)."""
    cls = model_class(kind)
    return cls.from_cell_graph(cell_graph, hidden_channels=hidden, num_layers=layers, heads=heads,
                               dropout=dropout, metabolism_to_gene=metabolism_to_gene, **options)


def model_class(kind: str):
    """The HeteroCell class of ``kind``: ``"reference"`` (PyG) or ``"fast"``."""
    if kind == "reference":
        from stoichconv.reference.hetero_cell import HeteroCell
    elif kind == "fast":
        from stoichconv.models.hetero_cell import HeteroCell
    else:
        raise ValueError(f"`kind` must be 'reference' or 'fast', got {kind!r}")
    return HeteroCell


def _compacted_batch(cell_graph: HeteroData, pert: torch.Tensor, pert_ptr: torch.Tensor) -> HeteroData:
    return perturb_batch(cell_graph, pert, pert_ptr, layout="compacted")


def model_step(model, kind: str, cell_graph: HeteroData, pert: torch.Tensor, pert_ptr: torch.Tensor):
    """Forward of either model kind on one perturbation batch: ``(predictions, latents)``."""
    if kind == "reference":
        return model(cell_graph, _compacted_batch(cell_graph, pert, pert_ptr))
    return model(cell_graph, pert, pert_ptr)


def _shard(pert: torch.Tensor, pert_ptr: torch.Tensor, rank: int, world: int):
    """Samples ``[rank * b, (rank + 1) * b)`` of a global batch, ``b = B / world``."""
    B = pert_ptr.numel() - 1
    if B % world:
        raise ValueError(f"the global batch size {B} must be divisible by the world size {world}")
    b = B // world
    lo, hi = int(pert_ptr[rank * b]), int(pert_ptr[(rank + 1) * b])
    return pert[lo:hi], pert_ptr[rank * b:(rank + 1) * b + 1] - lo, slice(rank * b, (rank + 1) * b)


def _from_pool(pool, batch_size: int, seed: int):
    """``batch_size`` samples of the fixed pool ``(pert, pert_ptr)`` (with replacement)."""
    pert, ptr = pool
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(ptr.numel() - 1, (batch_size,), generator=gen)
    counts = ptr.diff()[pick]
    parts = [pert[int(ptr[i]):int(ptr[i + 1])] for i in pick.tolist()]
    return torch.cat(parts), torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stoichconv.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("fast", "reference"), default="fast")
    p.add_argument("--steps", type=int, default=100, help="total number of steps (a resumed run continues to it)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size (split over processes)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--norm", choices=("layer", "batch", "none"), default="layer")
    p.add_argument("--activation", default="relu", help="relu, gelu, leaky_relu, tanh or sigmoid")
    p.add_argument("--precision", choices=PRECISIONS, default="32",
                   help="32 (float32), bf16-mixed or 16-mixed (autocast; 16-mixed with a GradScaler)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--nan-fraction", type=float, default=0.1)
    p.add_argument("--pool", type=int, default=0,
                   help="draw each batch from a fixed pool of this many samples (0: fresh samples every step)")
    p.add_argument("--small", action="store_true", help="small synthetic cell graph (quick runs, tests)")
    p.add_argument("--metabolism-to-gene", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log", default=None, help="write the JSON loss log here")
    p.add_argument("--no-progress", action="store_true", help="plain lines instead of a progress bar")
    p.add_argument("--print-every", type=int, default=1, help="with --no-progress: a line every N steps")
    p.add_argument("--save", default=None, help="write a checkpoint here at the end (and every --save-every steps)")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", default=None, help="continue from a --save checkpoint (its model configuration)")
    p.add_argument("--torchcell-checkpoint", default=None,
                   help="start from a torchcell HeteroCell state_dict or Lightning checkpoint")
    p.add_argument("--torchcell-config", default=None,
                   help="its torchcell constructor arguments: JSON text or a .json / .yaml file (a `model:` "
                        "section is taken from a run configuration)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a torchcell checkpoint that needs full unpickling (torch.load weights_only=False)")
    p.add_argument("--save-torchcell", default=None, help="write the final model as a torchcell state_dict here")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "hidden", "layers", "heads", "print_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.resume and args.torchcell_checkpoint:
        p.error("--resume and --torchcell-checkpoint exclude each other")
    if args.torchcell_checkpoint and not args.torchcell_config:
        p.error("--torchcell-checkpoint needs --torchcell-config (the original's constructor arguments)")
    return args


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "stoichconv.train/1"


def save_checkpoint(path: str, model, optimizer, step: int, kind: str, args: argparse.Namespace) -> None:
    """``{"format", "model", "config", "state_dict", "optimizer", "step", "args", "rng"}`` (loads
    with ``torch.load(weights_only=True)``)."""
    record = {
        "format": CHECKPOINT_FORMAT, "model": kind, "config": dict(model.config),
        "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "args": {k: v for k, v in vars(args).items()}, "rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        record["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = f"{path}.tmp"
    torch.save(record, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a `python -m stoichconv.train --save` checkpoint")
    return record


def read_torchcell_config(text_or_path: str) -> dict:
    """torchcell ``HeteroCell`` constructor arguments from JSON text or a JSON / YAML file. A
    run configuration's ``model:`` section is used; keys the constructor does not take (e.g.
    ``checkpoint_path``) are dropped; ``${name}`` values are replaced by the top-level ``name``
    (the placeholders of torchcell's hydra files)."""
    if os.path.exists(text_or_path):
        with open(text_or_path) as f:
            text = f.read()
        if text_or_path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError as exc:
                raise ValueError("reading a YAML configuration needs PyYAML (pip install pyyaml); or pass JSON") from exc
            config = yaml.safe_load(text)
        else:
            config = json.loads(text)
    else:
        config = json.loads(text_or_path)
    if not isinstance(config, dict):
        raise ValueError("the torchcell configuration must be a mapping")
    top = config
    if isinstance(config.get("model"), dict):
        config = config["model"]

    def resolve(value):
        if isinstance(value, str) and value.startswith("${") and value.endswith("}") and value[2:-1] in top:
            return resolve(top[value[2:-1]])
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    accepted = ("gene_num", "reaction_num", "metabolite_num", "hidden_channels", "out_channels", "num_layers",
                "dropout", "norm", "activation", "gene_encoder_config", "metabolism_config",
                "prediction_head_config", "gpr_conv_config")
    return {k: resolve(v) for k, v in config.items() if k in accepted}


def load_torchcell_state_dict(path: str, trust: bool = False):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a Lightning checkpoint with pickled hyper-parameter objects
        if not trust:
            raise ValueError(f"{path} cannot be loaded with weights_only=True ({type(exc).__name__}); pass "
                             f"--trust-checkpoint to unpickle it fully (only for files you trust)") from exc
        return torch.load(path, map_location="cpu", weights_only=False)


def _check_graph_sizes(model, cell_graph: HeteroData, origin: str) -> None:
    for node_type, n in model.num_nodes.items():
        have = int(cell_graph[node_type].num_nodes)
        if have != n:
            raise ValueError(f"{origin} has {n} {node_type} nodes but this cell graph has {have}; the model "
                             f"cannot run on it")


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------
def _peak_rss_mb() -> Optional[float]:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


def train(args: argparse.Namespace) -> list:
    """Run the training loop; returns this run's per-step global losses (mean over processes).
    Rank 0 prints per-step loss and steps/s (a progress bar, or lines with ``--no-progress``) and a
    final summary line."""
    import torch.distributed as dist

    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
    else:
        rank = 0
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    cell_graph = make_small_cell_graph(seed=args.seed) if args.small else load_cell_graph(seed=args.seed)
    cell_graph = cell_graph.to(device)
    num_genes = int(cell_graph["gene"].num_nodes)
    teacher = Teacher(num_genes, seed=args.teacher_seed, nan_fraction=args.nan_fraction)

    start_step, record = 0, None
    if args.resume:
        record = load_checkpoint(args.resume)
        model = model_class(args.model).from_config(record["config"])
        _check_graph_sizes(model, cell_graph, f"the checkpoint {args.resume}")
        model.load_state_dict(record["state_dict"])
        start_step = int(record["step"])
        say(f"resuming {args.resume} at step {start_step} (model configuration from the checkpoint)", flush=True)
    elif args.torchcell_checkpoint:
        tc_kwargs = read_torchcell_config(args.torchcell_config)
        state = load_torchcell_state_dict(args.torchcell_checkpoint, args.trust_checkpoint)
        model = model_class(args.model).from_torchcell(state, **tc_kwargs)
        _check_graph_sizes(model, cell_graph, f"the torchcell checkpoint {args.torchcell_checkpoint}")
        say(f"starting from the torchcell checkpoint {args.torchcell_checkpoint}", flush=True)
    else:
        model = build_model(args.model, cell_graph, args.hidden, args.layers, args.heads, args.metabolism_to_gene,
                            args.dropout, norm=None if args.norm == "none" else args.norm,
                            activation=args.activation)
    model = model.to(device)
    dtype = model.gene_embedding.weight.dtype
    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        everything_reaches = model.config["metabolism_to_gene"]
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=not everything_reaches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if record is not None:
        optimizer.load_state_dict(record["optimizer"])
        torch.set_rng_state(record["rng"])
        if "cuda_rng" in record and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(record["cuda_rng"])

    autocast_dtype = AUTOCAST_DTYPES[args.precision]
    # fp16 gradients underflow without loss scaling; with it disabled the scaler is a no-op
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    pool = random_perturbations(num_genes, args.pool, seed=args.seed + 17) if args.pool else None
    steps = range(start_step, args.steps)
    bar = None
    if rank == 0 and not args.no_progress and len(steps):
        from tqdm import tqdm

        bar = tqdm(steps, desc=f"train {args.model}", unit="step", initial=start_step, total=args.steps)
        steps = bar
    losses, start = [], time.perf_counter()
    model.train()
    for step in steps:
        tick = time.perf_counter()
        if args.pool:
            pert, pert_ptr = _from_pool(pool, args.batch_size, args.seed * 1_000_003 + step)
        else:
            pert, pert_ptr = random_perturbations(num_genes, args.batch_size, seed=args.seed * 1_000_003 + step)
        labels = teacher(pert, pert_ptr, step if not args.pool else 0)
        pert_s, ptr_s, rows = _shard(pert, pert_ptr, rank, world) if distributed else (pert, pert_ptr, slice(None))
        y = labels[rows].to(device=device, dtype=dtype)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            pred, _ = model_step(net, args.model, cell_graph, pert_s.to(device), ptr_s.to(device))
        loss = nan_mse_loss(pred.float(), y.float())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(optimizer)
        scaler.update()
        value = loss.detach()
        if distributed:
            dist.all_reduce(value)
            value = value / world
        losses.append(float(value))
        seconds = time.perf_counter() - tick
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", step_s=f"{seconds:.2f}")
        elif (step + 1) % args.print_every == 0 or step + 1 == args.steps:
            say(f"step {step + 1}/{args.steps}  loss {losses[-1]:.6f}  {1.0 / seconds:.3g} steps/s", flush=True)
        if args.save and args.save_every and (step + 1) % args.save_every == 0 and rank == 0:
            save_checkpoint(args.save, model, optimizer, step + 1, args.model, args)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if rank == 0 and args.save:
        save_checkpoint(args.save, model, optimizer, args.steps if losses else start_step, args.model, args)
    if rank == 0 and args.save_torchcell:
        torch.save(model.to_torchcell_state_dict(), args.save_torchcell)
    if rank == 0 and args.log:
        with open(args.log, "w") as f:
            json.dump({"args": vars(args), "world_size": world, "start_step": start_step, "losses": losses,
                       "seconds": seconds}, f, indent=2)
    n = len(losses)
    k = max(1, min(5, n // 2))
    if n:
        trend = f"loss {sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f} (mean of the first / last {k})"
    else:
        trend = "nothing to do"
    peak = _peak_rss_mb()
    say(f"done: {args.model} model, {n} steps (to step {start_step + n}) in {seconds:.1f} s, "
        f"{n / seconds if seconds > 0 and n else 0.0:.3g} steps/s, B = {args.batch_size}, "
        f"precision {args.precision}, {trend}"
        + (f", peak RSS {peak:.0f} MB" if peak is not None else "")
        + (f", saved {args.save}" if args.save else ""), flush=True)
    return losses


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ----------------------------------------------------------------------------------------------
# One-step gradient helpers (used by the DDP equivalence test)
# ----------------------------------------------------------------------------------------------
def step_gradients(kind: str, world: int, rank: Optional[int] = None, batch_size: int = 4, hidden: int = 8,
                   metabolism_to_gene: bool = False, seed: int = 0) -> dict:
    """Gradients of one training step on the small graph. ``rank=None``: single process, loss =
    mean over the ``world`` shards of the shard losses; else this process's DDP step (the process
    group must be initialised). Returns ``{name: grad or None}`` (after DDP's averaging)."""
    import torch.distributed as dist

    graph = make_small_cell_graph(seed=seed)
    torch.manual_seed(seed)
    model = build_model(kind, graph, hidden, 2, 2, metabolism_to_gene).double()
    num_genes = int(graph["gene"].num_nodes)
    pert, pert_ptr = random_perturbations(num_genes, batch_size, seed=seed + 5)
    labels = Teacher(num_genes, nan_fraction=0.25)(pert, pert_ptr, 0)
    if rank is None:
        total = 0.0
        for r in range(world):
            p, ptr, rows = _shard(pert, pert_ptr, r, world)
            pred, _ = model_step(model, kind, graph, p, ptr)
            total = total + nan_mse_loss(pred, labels[rows]) / world
        total.backward()
    else:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, find_unused_parameters=not metabolism_to_gene)
        p, ptr, rows = _shard(pert, pert_ptr, rank, dist.get_world_size())
        pred, _ = model_step(net, kind, graph, p, ptr)
        nan_mse_loss(pred, labels[rows]).backward()
    return {n: None if q.grad is None else q.grad.detach().clone() for n, q in model.named_parameters()}


def _ddp_worker(rank: int, world: int, init_file: str, out_path: str, kind: str, metabolism_to_gene: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        grads = step_gradients(kind, world, rank, metabolism_to_gene=metabolism_to_gene)
        if rank == 0:
            torch.save(grads, out_path)
    finally:
        dist.destroy_process_group()
