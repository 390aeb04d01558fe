"""Edge cases of the C++ CPU kernels, called straight through torch.ops.stoichconv (no Python
wrapper checks first): empty batches, non-contiguous index tensors, sizes whose products
overflow int64, impossible allocations and all -inf softmax groups. Each case either raises a
clean RuntimeError naming the argument or matches a small pure-PyTorch computation written
here."""

import importlib

import pytest
import torch

import stoichconv

pytestmark = pytest.mark.skipif(not stoichconv.has_compiled_kernels(), reason="stoichconv._C not built")

ops = torch.ops.stoichconv
PLAN_FIELDS = ("metabolite_index", "reaction_index", "reaction_ptr", "reaction_perm", "metabolite_ptr",
               "metabolite_perm")


# ------------------------------------------------------------ helpers


def csr(index, rows):
    perm = torch.sort(index, stable=True).indices
    ptr = torch.zeros(rows + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(index, minlength=rows), 0)
    return ptr, perm


def make_plan(edge_index, stoich, N, M):
    reaction_ptr, reaction_perm = csr(edge_index[1], M)
    metabolite_ptr, metabolite_perm = csr(edge_index[0], N)
    return {
        "metabolite_index": edge_index[0].contiguous(),
        "reaction_index": edge_index[1].contiguous(),
        "abs_stoich": stoich.abs(),
        "reaction_ptr": reaction_ptr,
        "reaction_perm": reaction_perm,
        "metabolite_ptr": metabolite_ptr,
        "metabolite_perm": metabolite_perm,
        "N": N,
        "M": M,
    }


def random_plan(N=7, M=5, nnz=20, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.stack([torch.randint(0, N, (nnz,), generator=g), torch.randint(0, M, (nnz,), generator=g)])
    stoich = torch.randn(nnz, generator=g, dtype=dtype)
    return make_plan(edge_index, stoich, N, M)


def forward(y, w, keep, plan, save_hidden=True, **replace):
    p = {**plan, **replace}
    return ops.stoich_conv_forward(y, w, keep, p["metabolite_index"], p["reaction_index"], p["abs_stoich"],
                                   p["reaction_ptr"], p["reaction_perm"], p["metabolite_ptr"],
                                   p["metabolite_perm"], save_hidden)


def backward(grad_out, grad_hidden, y, w, keep, fwd, plan, need_y=True, need_w=True, **replace):
    p = {**plan, **replace}
    _, hidden, node_norm, edge_norm = fwd
    return ops.stoich_conv_backward(grad_out, grad_hidden, y, w, keep, hidden, node_norm, edge_norm,
                                    p["metabolite_index"], p["reaction_index"], p["reaction_ptr"],
                                    p["reaction_perm"], p["metabolite_ptr"], p["metabolite_perm"], need_y, need_w)


def reference_forward(y, w, keep, plan):
    """out, hidden, node_norm, edge_norm from the semantics (stoichconv.ops.stoich_conv docstring)."""
    B, N, H, C = y.shape
    M = plan["M"]
    v, e, a = plan["metabolite_index"], plan["reaction_index"], plan["abs_stoich"]
    kept = torch.ones(B, v.numel(), dtype=torch.bool) if keep is None else keep[:, e]
    a_b = a.expand(B, -1) * kept
    deg_v = torch.zeros(B, N, dtype=y.dtype).index_add(1, v, a_b)
    deg_e = torch.zeros(B, M, dtype=y.dtype).index_add(1, e, a_b)
    node_norm = torch.where(deg_v > 0, 1 / deg_v, torch.zeros_like(deg_v))
    edge_norm = torch.where(deg_e > 0, 1 / deg_e, torch.zeros_like(deg_e))
    wk = w * kept.unsqueeze(-1)
    hidden = torch.zeros(B, M, H, C, dtype=y.dtype).index_add(1, e, wk.unsqueeze(-1) * y[:, v])
    hidden = hidden * edge_norm[:, :, None, None]
    out = torch.zeros(B, N, H, C, dtype=y.dtype).index_add(1, v, wk.unsqueeze(-1) * hidden[:, e])
    out = out * node_norm[:, :, None, None]
    if keep is None:
        node_norm, edge_norm = node_norm[:1], edge_norm[:1]
    return out, hidden, node_norm, edge_norm


def noncontiguous(t):
    """The same values through a stride-2 view."""
    view = torch.repeat_interleave(t, 2)[::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


# ------------------------------------------------------------ (a) empty batch


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("save_hidden", [True, False])
def test_stoich_conv_empty_batch(masked, save_hidden):
    plan = random_plan()
    N, M, nnz, H, C = plan["N"], plan["M"], plan["metabolite_index"].numel(), 2, 3
    y = torch.randn(0, N, H, C, dtype=torch.float64)
    w = torch.randn(0, nnz, H, dtype=torch.float64)
    keep = torch.ones(0, M, dtype=torch.bool) if masked else None
    fwd = forward(y, w, keep, plan, save_hidden)
    out, hidden, node_norm, edge_norm = fwd
    Bn = 0 if masked else 1
    assert out.shape == (0, N, H, C)
    assert hidden.shape == ((0, M, H, C) if save_hidden else (0,))
    assert node_norm.shape == (Bn, N) and edge_norm.shape == (Bn, M)
    if not masked:  # the unmasked norms are the graph's, whatever the batch
        ref = reference_forward(torch.randn(1, N, H, C, dtype=torch.float64),
                                torch.randn(1, nnz, H, dtype=torch.float64), None, plan)
        torch.testing.assert_close(node_norm, ref[2]), torch.testing.assert_close(edge_norm, ref[3])
    grad_hidden = torch.zeros_like(hidden) if save_hidden else None
    for need_y, need_w in [(True, True), (True, False), (False, True)]:
        grad_y, grad_w = backward(torch.zeros_like(y), grad_hidden, y, w, keep, fwd, plan, need_y, need_w)
        assert grad_y.shape == ((0, N, H, C) if need_y else (0,))
        assert grad_w.shape == ((0, nnz, H) if need_w else (0,))


def test_stoich_conv_mask_without_reactions():
    """keep [B, 0] (no reactions, no incidences): every norm row is written (0), out is 0."""
    N, B, H, C = 4, 3, 2, 2
    plan = make_plan(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.float64), N, 0)
    y = torch.randn(B, N, H, C, dtype=torch.float64)
    w = torch.randn(B, 0, H, dtype=torch.float64)
    fwd = forward(y, w, torch.ones(B, 0, dtype=torch.bool), plan)
    out, hidden, node_norm, edge_norm = fwd
    assert torch.equal(out, torch.zeros_like(out)) and hidden.shape == (B, 0, H, C)
    assert torch.equal(node_norm, torch.zeros(B, N, dtype=torch.float64)) and edge_norm.shape == (B, 0)
    grad_y, grad_w = backward(torch.randn_like(y), None, y, w, torch.ones(B, 0, dtype=torch.bool), fwd, plan)
    assert torch.equal(grad_y, torch.zeros_like(y)) and grad_w.shape == (B, 0, H)


# ------------------------------------------------------------ (b) non-contiguous plan tensors


@pytest.mark.parametrize("nnz", [20, 60_000])
@pytest.mark.parametrize("masked", [False, True])
def test_stoich_conv_noncontiguous_plan(nnz, masked):
    N, M, B, H, C = max(7, nnz // 20), max(5, nnz // 30), 3, 2, 4
    plan = random_plan(N, M, nnz, seed=1)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(B, N, H, C, generator=g, dtype=torch.float64)
    w = torch.randn(B, nnz, H, generator=g, dtype=torch.float64)
    keep = torch.rand(B, M, generator=g) > 0.3 if masked else None
    # metabolite_index / reaction_index as rows of a transposed [nnz, 2] incidence list,
    # every other plan tensor through a stride-2 view
    pairs = torch.stack([plan["metabolite_index"], plan["reaction_index"]], 1).t()
    strided = {name: noncontiguous(plan[name]) for name in PLAN_FIELDS}
    strided["metabolite_index"], strided["reaction_index"] = pairs[0], pairs[1]
    assert not strided["metabolite_index"].is_contiguous()
    for save_hidden in (True, False):
        fwd = forward(y, w, keep, plan, save_hidden)
        fwd_nc = forward(y, w, keep, plan, save_hidden, **strided)
        for a, b in zip(fwd, fwd_nc):
            assert torch.equal(a, b)
        grad_out = torch.randn(B, N, H, C, generator=g, dtype=torch.float64)
        grads = backward(grad_out, None, y, w, keep, fwd, plan)
        grads_nc = backward(grad_out, None, y, w, keep, fwd_nc, plan, **strided)
        for a, b in zip(grads, grads_nc):
            assert torch.equal(a, b)
    if nnz == 20:  # and the numbers are the semantics'
        for a, b in zip(forward(y, w, keep, plan, True, **strided), reference_forward(y, w, keep, plan)):
            torch.testing.assert_close(a, b)


# ------------------------------------------------------------ (c, e) sizes


BIG = 2**62


def test_filter_edges_batched_ids_that_would_overflow_raise():
    edge_index = torch.tensor([[0, 1], [1, 2]])
    pert, pert_ptr = torch.tensor([0]), torch.tensor([0, 1, 1, 1, 1])  # B = 4
    for relabel in (False, True):
        with pytest.raises(RuntimeError, match=r"filter_edges: B \* `num_nodes` = 4 \* 4611686018427387904 overflows int64"):
            ops.filter_edges(edge_index, BIG, pert, pert_ptr, relabel)


def test_filter_edges_impossible_allocation_names_the_output():
    edge_index = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(RuntimeError, match=r"filter_edges: (cannot allocate|out of memory allocating) `node_keep`") as caught:
        ops.filter_edges(edge_index, BIG, torch.tensor([0]), torch.tensor([0, 1]), False)  # B = 1
    assert "DefaultCPUAllocator" not in str(caught.value)


def test_reaction_keep_overflow_raises():
    gpr = torch.tensor([[0, 1], [0, 1]])
    with pytest.raises(RuntimeError, match=r"reaction_keep: B \* `num_reactions` = 4 \* 4611686018427387904 overflows"):
        ops.reaction_keep(gpr, BIG, torch.tensor([0]), torch.tensor([0, 1, 1, 1, 1]))


def test_filter_bipartite_batched_ids_that_would_overflow_raise():
    edge_index = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(RuntimeError, match=r"filter_bipartite: B \* `num_src`.* = 4 \* 4611686018427387904 overflows int64"):
        ops.filter_bipartite(edge_index, BIG, 3, 4, None, None, False)
    with pytest.raises(RuntimeError, match=r"filter_bipartite: B \* `num_dst`.* = 4 \* 4611686018427387904 overflows int64"):
        ops.filter_bipartite(edge_index, 3, BIG, 4, None, None, False)


def test_filter_bipartite_large_ids_do_not_wrap():
    """B * num_src fits: the full-layout ids b * num_src + v are exact."""
    edge_index = torch.tensor([[0, 1, 5], [1, 2, 0]])
    num_src, num_dst, B = 2**61, 3, 2
    dst_keep = torch.tensor([[True, True, False], [True, False, True]])
    out, edge_ptr, edge_keep, edge_id = ops.filter_bipartite(edge_index, num_src, num_dst, B, None, dst_keep, False)
    expected_keep = dst_keep[:, edge_index[1]]
    expected = [(b * num_src + int(edge_index[0, e]), b * num_dst + int(edge_index[1, e]), e)
                for b in range(B) for e in range(3) if expected_keep[b, e]]
    assert [(int(s), int(d), int(i)) for s, d, i in zip(out[0], out[1], edge_id)] == expected
    assert torch.equal(edge_keep, expected_keep.flatten())
    assert edge_ptr.tolist() == [0, int(expected_keep[0].sum()), int(expected_keep.sum())]


# ------------------------------------------------------------ (d) GATv2 edges


def gatv2_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    Ns, Nd, H, C, E = 6, 5, 2, 3, 17
    x_l = torch.randn(Ns, H, C, generator=g, dtype=torch.float64)
    x_r = torch.randn(Nd, H, C, generator=g, dtype=torch.float64)
    att = torch.randn(H, C, generator=g, dtype=torch.float64)
    dst = torch.sort(torch.randint(0, Nd, (E,), generator=g)).values
    src = torch.randint(0, Ns, (E,), generator=g)
    crow = torch.zeros(Nd + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(dst, minlength=Nd), 0)
    return x_l, x_r, att, src, dst, crow


def test_gatv2_noncontiguous_edges():
    x_l, x_r, att, src, dst, crow = gatv2_case()
    pairs = torch.stack([src, dst], 1).t()  # [2, E] view of an [E, 2] list
    src_nc, dst_nc, crow_nc = pairs[0], pairs[1], noncontiguous(crow)
    assert not src_nc.is_contiguous() and not dst_nc.is_contiguous()
    out, alpha = ops.gatv2_forward(x_l, x_r, att, src, dst, crow, 0.2)
    out_nc, alpha_nc = ops.gatv2_forward(x_l, x_r, att, src_nc, dst_nc, crow_nc, 0.2)
    assert torch.equal(out, out_nc) and torch.equal(alpha, alpha_nc)
    grad = torch.randn_like(out)
    grads = ops.gatv2_backward(grad, x_l, x_r, att, alpha, src, dst, crow, 0.2)
    grads_nc = ops.gatv2_backward(grad, x_l, x_r, att, alpha, src_nc, dst_nc, crow_nc, 0.2)
    for a, b in zip(grads, grads_nc):
        assert torch.equal(a, b)
    # and the forward is GATv2's: alpha = softmax over each row of att . lrelu(x_l[src] + x_r[dst])
    logits = (torch.nn.functional.leaky_relu(x_l[src] + x_r[dst], 0.2) * att).sum(-1)
    expected_alpha = torch.empty_like(logits)
    for i in range(crow.numel() - 1):
        expected_alpha[crow[i]:crow[i + 1]] = torch.softmax(logits[crow[i]:crow[i + 1]], 0)
    torch.testing.assert_close(alpha_nc, expected_alpha)
    expected_out = torch.zeros_like(out).index_add(0, dst, expected_alpha.unsqueeze(-1) * x_l[src])
    torch.testing.assert_close(out_nc, expected_out)


def test_gatv2_bad_crow_still_rejected():
    x_l, x_r, att, src, dst, crow = gatv2_case()
    bad = crow.clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match="gatv2: `crow` must start at 0 and end at E"):
        ops.gatv2_forward(x_l, x_r, att, src, dst, noncontiguous(bad), 0.2)


# ------------------------------------------------------------ (f) grouped softmax


def simple_group_softmax(logits, group, num_groups, kept=None):
    """Per (sample, group, head): softmax over the kept entries; 0 for masked entries and for
    groups whose kept logits are all -inf."""
    B, nnz, H = logits.shape
    alpha = torch.zeros_like(logits)
    for b in range(B):
        for g in range(num_groups):
            members = [k for k in range(nnz) if group[k] == g and (kept is None or kept[b, k])]
            for h in range(H):
                values = logits[b, members, h]
                if members and bool(torch.isfinite(values.max())):
                    alpha[b, members, h] = torch.softmax(values, 0)
    return alpha


def the_reference():
    for name in ("stoichconv.reference.group_softmax", "stoichconv.ops.group_softmax"):
        try:
            return getattr(importlib.import_module(name), "group_softmax_reference")
        except (ImportError, AttributeError):
            continue
    return None


@pytest.mark.parametrize("masked", [False, True])
def test_group_softmax_all_minus_inf_group_is_zero(masked):
    g = torch.Generator().manual_seed(3)
    B, nnz, H, G = 2, 12, 2, 4
    group = torch.arange(nnz) % G
    ptr, perm = csr(group, G)
    logits = torch.randn(B, nnz, H, generator=g, dtype=torch.float64)
    logits[0, group == 1, 0] = float("-inf")  # group 1, head 0, sample 0: all -inf
    logits[1, group == 2, :] = float("-inf")  # group 2, every head, sample 1
    logits[1, 3, 1] = float("-inf")  # one -inf among finite logits: weighs 0
    kept = None
    if masked:
        kept = torch.ones(B, nnz, dtype=torch.bool)
        kept[0, group == 3] = False  # fully masked group
        kept[1, 0] = False
        logits[1, group == 0, 1] = torch.where(kept[1, group == 0], float("-inf"), 5.0).double()  # kept ones all -inf
    alpha = ops.group_softmax(logits, kept, ptr, perm)
    assert not torch.isnan(alpha).any()
    expected = simple_group_softmax(logits, group, G, kept)
    torch.testing.assert_close(alpha, expected)
    assert torch.equal(alpha[0, group == 1, 0], torch.zeros(nnz // G, dtype=torch.float64))
    reference = the_reference()
    if reference is not None:
        torch.testing.assert_close(alpha, reference(logits, group, G, kept))
    # the backward of an all-zero group is zero
    grad = ops.group_softmax_backward(torch.randn_like(alpha), alpha, ptr, perm)
    assert not torch.isnan(grad).any() and torch.equal(grad[0, group == 1, 0], torch.zeros(nnz // G, dtype=torch.float64))
