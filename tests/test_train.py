"""Training entry point: the loss falls on a small graph, the JSON log, what the CLI prints,
checkpoints (save, resume, torchcell), and a 2-process gloo DDP step whose averaged gradients
equal the single-process step on the same global batch."""

import json
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torch.multiprocessing as mp

from stoichconv import train as train_mod

SMALL = ["--small", "--hidden", "8", "--layers", "2", "--batch-size", "4", "--threads", "1"]


def _train(argv):
    threads = torch.get_num_threads()
    try:
        return train_mod.train(train_mod.parse_args(argv))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("model,precision", [("fast", "32"), ("reference", "32"), ("fast", "bf16-mixed"),
                                             ("reference", "bf16-mixed"), ("fast", "16-mixed")])
def test_loss_falls_on_small_graph(tmp_path, model, precision):
    """Also under autocast (bf16-mixed; 16-mixed with its GradScaler), on the CPU."""
    log = tmp_path / "log.json"
    steps = 40 if model == "fast" else 25
    args = train_mod.parse_args(["--small", "--model", model, "--steps", str(steps), "--batch-size", "8",
                                 "--hidden", "16", "--layers", "2", "--lr", "1e-2", "--pool", "8",
                                 "--nan-fraction", "0.1", "--log", str(log), "--no-progress", "--threads", "1",
                                 "--precision", precision])
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


@pytest.mark.parametrize("progress", [False, True])
def test_cli_prints_loss_rate_and_summary_without_warnings(progress):
    argv = [sys.executable, "-m", "stoichconv.train", *SMALL, "--steps", "3", "--metabolism-to-gene"]
    if not progress:
        argv.append("--no-progress")
    env = dict(os.environ, PYTHONWARNINGS="default")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    if not progress:
        steps = [line for line in lines if line.startswith("step ")]
        assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"]
        assert all("loss" in line and line.endswith("steps/s") for line in steps)
    else:
        assert "loss=" in res.stderr and "step" in res.stderr  # the bar
    assert lines[-1].startswith("done: fast model, 3 steps") and "steps/s" in lines[-1], lines[-1]
    assert "Sparse CSR" not in res.stderr and "beta" not in res.stderr


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    common = SMALL + ["--dropout", "0.2", "--no-progress", "--seed", "3"]
    straight = _train(common + ["--steps", "6"])
    ckpt = tmp_path / "run.pt"
    first = _train(common + ["--steps", "3", "--save", str(ckpt)])
    record = train_mod.load_checkpoint(str(ckpt))
    assert record["step"] == 3 and record["config"]["dropout"] == 0.2
    # the architecture comes from the checkpoint, whatever the flags say
    rest = _train(common + ["--steps", "6", "--resume", str(ckpt), "--hidden", "16"])
    assert first == pytest.approx(straight[:3], rel=1e-12, abs=0)
    assert rest == pytest.approx(straight[3:], rel=1e-12, abs=0)


def _torchcell_kwargs():
    return dict(gene_num=40, reaction_num=24, metabolite_num=18, hidden_channels=8, out_channels=2, num_layers=2,
                dropout=0.0, norm="batch", activation="gelu", gene_encoder_config={"heads": 3, "concat": True},
                metabolism_config={"is_stoich_gated": True, "use_attention": True, "heads": 2},
                prediction_head_config={"head_num_layers": 2, "head_norm": "batch"},
                gpr_conv_config={"heads": 2, "concat": True})


def test_start_from_a_torchcell_checkpoint(tmp_path, capsys):
    from stoichconv.reference.hetero_cell import HeteroCell

    kwargs = _torchcell_kwargs()
    torch.manual_seed(0)
    original = HeteroCell.from_torchcell(None, **kwargs).to_torchcell_state_dict()
    ckpt = tmp_path / "epoch=3.ckpt"  # a Lightning checkpoint: the model under "model."
    torch.save({"epoch": 3, "state_dict": OrderedDict(("model." + k, v) for k, v in original.items())}, ckpt)
    config = tmp_path / "run.json"  # a run configuration with hydra-style placeholders
    model_section = dict(kwargs, checkpoint_path=str(ckpt), gene_encoder_config={"heads": "${heads}"})
    config.write_text(json.dumps({"heads": 3, "model": model_section}))
    out = tmp_path / "trained.pt"
    losses = _train(SMALL + ["--steps", "2", "--no-progress", "--torchcell-checkpoint", str(ckpt),
                             "--torchcell-config", str(config), "--save-torchcell", str(out)])
    assert len(losses) == 2
    assert "starting from the torchcell checkpoint" in capsys.readouterr().out
    trained = torch.load(out, weights_only=True)
    assert list(trained) == list(original)
    assert all(trained[k].shape == v.shape for k, v in original.items())
    assert any(not torch.equal(trained[k], v) for k, v in original.items())  # it trained
    # a checkpoint of another cell graph is refused
    config.write_text(json.dumps(dict(kwargs, gene_num=41)))
    bigger = HeteroCell.from_torchcell(None, **dict(kwargs, gene_num=41)).to_torchcell_state_dict()
    torch.save(bigger, ckpt)
    with pytest.raises(ValueError, match="41 gene nodes but this cell graph has 40"):
        _train(SMALL + ["--steps", "1", "--no-progress", "--torchcell-checkpoint", str(ckpt),
                        "--torchcell-config", str(config)])
