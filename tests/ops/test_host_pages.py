"""Large CPU outputs of the compiled ops are advised into transparent huge pages
(``csrc/include/stoichconv/host_pages.h``): the mapping that holds such an output is marked
eligible for huge pages in ``/proc/self/smaps`` (where the kernel has them in "madvise" or
"always" mode), small outputs are left alone, and the values are those of the reference."""

import torch

from stoichconv.ops.gatv2 import gatv2_attention
from stoichconv.testing import assert_advised_into_huge_pages, random_edge_set


def test_large_cpu_output_is_advised_into_huge_pages():
    from stoichconv._extension import has_compiled_kernels

    assert has_compiled_kernels(), "the compiled extension is part of the build under test"
    # a 32 MiB output: out [R, H, C] float64
    edges = random_edge_set(num_src=64, num_dst=64, num_rows=32768, num_edges=40000, seed=3, empty_rows=())
    g = torch.Generator().manual_seed(0)
    x_l, x_r = (torch.randn(64, 2, 64, generator=g, dtype=torch.float64) for _ in range(2))
    att = torch.randn(2, 64, generator=g, dtype=torch.float64)
    out = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="cpu")
    want = gatv2_attention(x_l, x_r, att, edges, 0.2, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert out.nbytes >= 16 << 20
    assert_advised_into_huge_pages(out)
