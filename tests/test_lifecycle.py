"""The drop-in layer behaves like any torch module: pickle, deepcopy, torch.save / torch.load
(before and after a forward), inference mode, no-grad, torch.compile(fullgraph=True), and moving
between dtypes after a forward (the plan cache follows the tensors it is given)."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch

from stoichconv.nn import StoichHypergraphConv

N, M, NNZ, F = 9, 7, 30, 8
OPTIONS = {
    "plain": dict(),
    "gated_attention_node": dict(is_stoich_gated=True, use_attention=True, heads=2),
    "gated_attention_edge": dict(is_stoich_gated=True, use_attention=True, heads=2, attention_mode="edge"),
}


def graph(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.stack([torch.randint(0, N, (NNZ,), generator=g), torch.randint(0, M, (NNZ,), generator=g)])
    stoich = torch.randn(NNZ, generator=g, dtype=dtype)
    x = torch.randn(3, N, F, generator=g, dtype=dtype)
    attr = torch.randn(M, F, generator=g, dtype=dtype)
    keep = torch.rand(3, M, generator=g) > 0.3
    return x, edge_index, stoich, attr, keep


def run(layer, x, edge_index, stoich, attr, keep):
    return layer(x, edge_index, stoich, hyperedge_attr=attr, num_edges=M, reaction_keep=keep)


@pytest.fixture(params=sorted(OPTIONS))
def layer(request):
    torch.manual_seed(0)
    layer = StoichHypergraphConv(F, 4, **OPTIONS[request.param])
    if layer.bias is not None:
        torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("after_forward", [False, True])
def test_pickle_deepcopy_and_save(layer, after_forward):
    inputs = graph()
    if after_forward:
        run(layer, *inputs)
    want = run(layer, *inputs)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(run(clone, *inputs), want, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(run(loaded, *inputs), want, rtol=0, atol=0)


def test_pickled_layer_runs_in_another_process(tmp_path):
    layer = StoichHypergraphConv(F, 4, **OPTIONS["gated_attention_node"])
    inputs = graph()
    want = run(layer, *inputs)  # after a forward: the cache must not travel
    path = tmp_path / "layer.pt"
    torch.save({"layer": layer, "inputs": inputs, "want": want}, path)
    script = (
        "import sys, torch\n"
        "import stoichconv.nn\n"
        f"d = torch.load({str(path)!r}, weights_only=False)\n"
        "x, ei, s, a, k = d['inputs']\n"
        "out = d['layer'](x, ei, s, hyperedge_attr=a, num_edges=7, reaction_keep=k)\n"
        "assert torch.equal(out, d['want']), (out - d['want']).abs().max()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_inference_mode_and_no_grad(layer):
    inputs = graph()
    with torch.no_grad():
        want = run(layer, *inputs)
    with torch.inference_mode():
        fresh = graph()  # graph tensors created under inference mode: no version counters
        got = run(layer, *fresh)
        again = run(layer, *fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    assert not want.requires_grad


def test_in_place_change_of_the_graph_rebuilds_the_plan(layer):
    x, edge_index, stoich, attr, keep = graph()
    run(layer, x, edge_index, stoich, attr, keep)
    stoich.mul_(2.0)  # same tensor object, new version: the cached plan must not be reused
    want = run(copy.deepcopy(layer), x, edge_index, stoich.clone(), attr, keep)
    torch.testing.assert_close(run(layer, x, edge_index, stoich, attr, keep), want, rtol=0, atol=0)


def test_fullgraph_compile_equals_eager(layer):
    inputs = graph()
    x = inputs[0].clone().requires_grad_(True)
    want = run(layer, x, *inputs[1:])
    grad_want = torch.autograd.grad(want.sum(), x)[0]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = run(compiled, x, *inputs[1:])
    grad_got = torch.autograd.grad(got.sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-6, atol=1e-6)
    # a second call with the same graph reuses the compiled code and stays equal
    torch.testing.assert_close(run(compiled, x, *inputs[1:]), want, rtol=1e-6, atol=1e-6)


def test_fullgraph_compile_keeps_the_value_checks():
    x, edge_index, stoich, attr, keep = graph()
    layer = StoichHypergraphConv(F, 4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    bad = edge_index.clone()
    bad[0, 0] = N + 3
    with pytest.raises(RuntimeError, match=r"`edge_index\[0\]` \(metabolites\) has id"):
        compiled(x, bad, stoich, num_edges=M, reaction_keep=keep)


def test_moving_dtype_after_a_forward(layer):
    inputs32 = graph()
    run(layer, *inputs32)
    layer64 = layer.to(torch.float64)
    inputs64 = tuple(t.double() if t.is_floating_point() else t for t in inputs32)
    got = run(layer64, *inputs64)
    assert got.dtype == torch.float64
    want = run(copy.deepcopy(layer64), *inputs64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_moving_to_cuda_after_a_forward(layer):
    inputs = graph()
    want = run(layer, *inputs)
    cuda_inputs = tuple(t.cuda() for t in inputs)
    got = run(layer.cuda(), *cuda_inputs)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
