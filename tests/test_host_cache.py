"""The host block cache (``stoichconv._host_pages``, ``csrc/include/stoichconv/host_block_cache.h``):
freed large blocks are reused, the limit is kept, small tensors and a turned-off cache use
``torch.empty``, the compiled ops' large outputs come from it, and results do not depend on it."""

import os
import subprocess
import sys

import pytest
import torch

import stoichconv
from stoichconv import _host_pages

pytestmark = pytest.mark.skipif(not stoichconv.has_compiled_kernels(),
                                reason="the host block cache is part of the compiled extension (not built)")

MiB = 1 << 20


@pytest.fixture
def cache():
    """A clean cache of 64 MiB for the test; the previous limit restored after it."""
    before = stoichconv.host_cache_info().limit_bytes
    stoichconv.set_host_cache_limit(64 * MiB)
    stoichconv.empty_host_cache()
    yield
    stoichconv.set_host_cache_limit(before)


def floats(mib: float) -> torch.Tensor:
    return _host_pages.empty(int(mib * MiB) // 4, dtype=torch.float32, device="cpu")


def test_a_freed_block_is_reused(cache):
    t = floats(8)
    assert not t.untyped_storage().resizable()  # a cache block
    address = t.data_ptr()
    hits = stoichconv.host_cache_info().hits
    del t
    info = stoichconv.host_cache_info()
    assert info.cached_blocks == 1 and info.cached_bytes == 8 * MiB
    again = floats(8)
    assert again.data_ptr() == address
    assert stoichconv.host_cache_info().hits == hits + 1
    assert stoichconv.host_cache_info().cached_blocks == 0
    again.fill_(3.0)  # an ordinary writable tensor
    assert again.sum().item() == 3.0 * again.numel()


def test_a_block_serves_sizes_up_to_five_quarters_of_the_request(cache):
    t = floats(8)
    address = t.data_ptr()
    del t
    smaller = floats(7)  # 7 MiB rounds up to an 8 MiB block: reused
    assert smaller.data_ptr() == address
    del smaller
    much_smaller = floats(4)  # 8 MiB > 5/4 of 4 MiB: a fresh block
    assert much_smaller.data_ptr() != address
    assert stoichconv.host_cache_info().cached_blocks == 1


def test_the_limit_is_kept_and_the_cache_can_be_emptied(cache):
    stoichconv.set_host_cache_limit(16 * MiB)
    blocks = [floats(8) for _ in range(3)]
    del blocks
    info = stoichconv.host_cache_info()
    assert info.cached_bytes <= 16 * MiB and info.cached_blocks == 2
    info = stoichconv.empty_host_cache()
    assert info.cached_bytes == 0 and info.cached_blocks == 0 and info.limit_bytes == 16 * MiB
    with pytest.raises(ValueError, match="limit_bytes"):
        stoichconv.set_host_cache_limit(-1)


def test_small_tensors_and_a_turned_off_cache_use_torch_empty(cache):
    small = _host_pages.empty(_host_pages.HOST_CACHE_MIN_BYTES // 4 - 1, dtype=torch.float32, device="cpu")
    assert small.untyped_storage().resizable()
    stoichconv.set_host_cache_limit(0)
    big = floats(8)
    assert big.untyped_storage().resizable() and big.shape == (2 * MiB,)
    del big
    assert stoichconv.host_cache_info().cached_bytes == 0


def test_the_environment_variable_sets_the_limit():
    code = "import stoichconv; print(stoichconv.host_cache_info().limit_bytes)"
    for value, expected in (("7", 7 * MiB), ("0", 0)):
        env = dict(os.environ, STOICHCONV_HOST_CACHE_MB=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert int(out.stdout.strip().splitlines()[-1]) == expected
    env = {k: v for k, v in os.environ.items() if k != "STOICHCONV_HOST_CACHE_MB"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) == 512 * MiB


def _layer_step(seed=0):
    """Forward + backward of the gated + attention layer at B = 4 on the yeast-GEM graph: its
    projection, output and gradients are above the cache's minimum size (5.2 MB)."""
    from stoichconv.bench.stoich_conv_cases import CONFIGS, make_batch
    from stoichconv.nn import StoichHypergraphConv

    data = make_batch(4, 64, "cpu", seed=seed)
    torch.manual_seed(seed)
    layer = StoichHypergraphConv(64, 64, backend="cpu", **CONFIGS["gated+attention"])
    x = data.x.detach().requires_grad_(True)
    out = layer(x, data.edge_index, data.stoich, hyperedge_attr=data.hyperedge_attr,
                num_edges=data.reaction_keep.size(1), reaction_keep=data.reaction_keep)
    out.backward(data.grad_out[128])
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]


def test_the_layer_takes_its_large_tensors_from_the_cache_with_the_same_results(cache):
    stoichconv.set_host_cache_limit(0)
    expected = _layer_step()
    stoichconv.set_host_cache_limit(256 * MiB)
    first = _layer_step()
    misses = stoichconv.host_cache_info().misses
    hits = stoichconv.host_cache_info().hits
    del first
    second = _layer_step()
    info = stoichconv.host_cache_info()
    assert info.hits > hits and info.misses == misses  # the second step reused the first's blocks
    assert not second[0].untyped_storage().resizable()  # the op's output is a cache block
    for got, want in zip(second, expected):
        assert torch.equal(got, want)
