"""Training entry point: the loss falls on a small graph, the JSON log, and a 2-process gloo
DDP step whose averaged gradients equal the single-process step on the same global batch."""

import json
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from stoichconv import train as train_mod

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@pytest.mark.parametrize("model", ["fast", "reference"])
def test_loss_falls_on_small_graph(tmp_path, model):
    log = tmp_path / "log.json"
    steps = 40 if model == "fast" else 25
    args = train_mod.parse_args(["--small", "--model", model, "--steps", str(steps), "--batch-size", "8",
                                 "--hidden", "16", "--layers", "2", "--lr", "1e-2", "--pool", "8",
                                 "--nan-fraction", "0.1", "--log", str(log), "--no-progress", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        losses = train_mod.train(args)
    finally:
        torch.set_num_threads(threads)
    record = json.loads(log.read_text())
    assert record["losses"] == pytest.approx(losses)
    assert len(losses) == steps and all(l == l for l in losses)  # no NaN despite NaN labels
    k = 5
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.7 * first, (first, last)


def test_teacher_labels_nan_fraction():
    teacher = train_mod.Teacher(40, nan_fraction=0.3)
    from stoichconv.data import random_perturbations

    pert, ptr = random_perturbations(40, 500, seed=0)
    y = teacher(pert, ptr, 0)
    frac = torch.isnan(y).double().mean().item()
    assert 0.2 < frac < 0.4
    single = (ptr.diff() == 1) & ~torch.isnan(y[:, 1])
    assert torch.all(y[single, 1] == 0)  # no interaction for single deletions


@pytest.mark.parametrize("kind,metabolism_to_gene", [("fast", False), ("fast", True), ("reference", False)])
def test_ddp_two_processes_match_single_process(tmp_path, kind, metabolism_to_gene):
    out = tmp_path / "grads.pt"
    init_file = tmp_path / "init"
    mp.spawn(train_mod._ddp_worker, args=(2, str(init_file), str(out), kind, metabolism_to_gene), nprocs=2,
             join=True)
    ddp = torch.load(out)
    single = train_mod.step_gradients(kind, world=2, rank=None, metabolism_to_gene=metabolism_to_gene)
    assert set(ddp) == set(single)
    scale = max(g.abs().max() for g in single.values() if g is not None)
    for name, g in single.items():
        if g is None:
            assert ddp[name] is None or torch.count_nonzero(ddp[name]) == 0, name
            assert not metabolism_to_gene, name
            continue
        assert ddp[name] is not None, name
        assert (ddp[name] - g).abs().max() <= 1e-6 * max(g.abs().max(), 1e-6 * scale), name
