"""The stoich conv: signed stoichiometric hypergraph propagation (metabolite -> reaction ->
metabolite), the one statement of its semantics.

Semantics
---------
A metabolic hypergraph has N metabolites, M reactions and nnz signed
incidences ``(v_k, e_k, s_k)`` (the same pair may repeat; each column is its
own incidence). A batch of B samples shares this wildtype structure; sample b
may drop reactions with a keep-mask ``reaction_keep[b, e]`` (masked
incidences weigh 0 and are excluded from the degree sums). Given transformed
features ``y`` [B, N, H, C] and per-incidence weights ``w`` [B, nnz, H]
(``s_k * g_k * alpha_k,h``; missing factors are 1):

* ``D[b, v] = 1 / sum_{k: v_k = v, kept} |s_k|``, ``Bn[b, e] = 1 / sum_{k: e_k = e, kept} |s_k|``
  (0 where the sum is 0; no gradient flows into them),
* ``hidden[b, e, h] = Bn[b, e] * sum_{k: e_k = e, kept} w[b, k, h] * y[b, v_k, h]``  (metabolite -> reaction),
* ``out[b, v, h]    = D[b, v]  * sum_{k: v_k = v, kept} w[b, k, h] * hidden[b, e_k, h]``  (reaction -> metabolite).

Shared weight: a weight that is the same for every sample (no per-sample gate or attention, e.g.
``w = s`` or ``s * alpha`` with ``alpha`` a parameter) may be given once, as ``weight`` [1, nnz, H]
(or [nnz, H] to :func:`stoich_conv`), and means ``w[b] = weight[0]`` for every b. No backend
materialises the expansion: the kernels read row 0 for every sample, and the backward returns
``grad_weight`` in the weight's own shape, ``dL/dweight[0, k] = sum_b dL/dw[b, k]``, reduced over
the batch inside the kernel in sample order b = 0, 1, ..., B - 1 (no atomics: deterministic on
every backend). The results equal those of the expanded weight up to rounding (the batch sum is
taken in the accumulate dtype and rounded once).

B = 1 is a single graph; a compacted block-diagonal batch is B = 1 on the
bigger graph; both layouts give the same numbers. The backward is hand-written
(``R`` = the reaction-side gradient, ``G`` = dL/dout):
``R_e = sum_{k in e} w_k D_{v_k} G_{v_k}``, ``dL/dy_u = sum_{k: v_k = u} w_k B_{e_k} R_{e_k}``,
``dL/dw_k = D_{v_k} <G_{v_k}, hidden_{e_k}> + B_{e_k} <R_{e_k}, y_{v_k}>``.

Dtypes
------
The policy of :mod:`stoichconv.ops._dtypes`, for this op:

* ``y`` and ``weight`` are float16, bfloat16, float32 or float64, both of one dtype (else a
  ``TypeError`` naming both). ``out`` and ``hidden`` come back in that dtype; the statistics
  ``node_norm`` / ``edge_norm`` in its accumulate dtype (float32 for float16 / bfloat16 /
  float32, float64 for float64), and the kernels take the degree weights ``abs_stoich`` in it
  (:func:`stoich_conv` converts the plan's).
* Every sum (the degree sums, both stages, the backward's ``R`` and ``dL/dy``, the dot products
  of ``dL/dw``) runs in the accumulate dtype: each stored value is converted on load and each
  result rounded once, on store. The stage-1 rows ``hidden`` and the backward's ``R`` are
  stored in the input dtype (``hidden`` is an output; an unsaved ``hidden`` is recomputed by
  the backward, by the compiled kernels to the very same values). The backward takes ``grad_out`` / ``grad_hidden`` in the input dtype and
  returns the gradients in it. For float32 and float64 the conversions are no-ops.
* Under ``torch.autocast`` on ``y``'s device type, :func:`stoich_conv` first casts ``y`` and
  ``weight`` to the autocast dtype (so the op runs in low precision, as ``torch.mm`` does);
  outside autocast, mixed dtypes are refused, never truncated.

The incidence structure is preprocessed once per graph into a
:class:`~stoichconv.types.StoichPlan` (CSR orderings for both stages,
validated indices); forward and backward reuse it and nothing is sorted per
call.

Backends (:data:`SPEC`): ``cpu`` and ``cuda`` run the compiled
``stoichconv::stoich_conv_forward`` / ``_backward`` (``csrc/cpu/stoich_conv.cpp``,
``csrc/cuda/stoich_conv.cpp``), ``triton`` runs
``stoichconv::triton_stoich_conv_forward`` (:mod:`.triton_kernels`), ``reference``
runs :func:`stoichconv.reference.stoich_conv.stoich_conv_reference`. The
compiled and Triton forwards return ``(out, hidden, node_norm, edge_norm)``
and share the fake kernels and the autograd formula of :mod:`.registration`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from stoichconv._tensor_key import TensorsKey, cacheable
from stoichconv.backends import OpSpec, register_op, select
from stoichconv.ops._dtypes import accumulate_dtype, cast_for_autocast
from stoichconv.ops.stoich_conv import registration  # noqa: F401  (fake kernels and autograd)
from stoichconv.ops.stoich_conv.validation import (
    check_count,
    check_index_tensor,
    check_plan_consistent,
    check_propagate_args,
    check_reaction_keep,
    require,
)
from stoichconv.types import StoichPlan

__all__ = ["SPEC", "PlanCache", "StoichPlan", "build_stoich_plan", "check_plan_consistent", "check_reaction_keep",
           "stoich_conv", "stoich_propagate"]

SPEC = register_op(OpSpec(
    name="stoich_conv",
    backends=("cpu", "cuda", "triton", "reference"),
    compiled="stoich_conv_forward",
    compiled_backward="stoich_conv_backward",
    triton="stoichconv.ops.stoich_conv.triton_kernels:triton_stoich_conv_forward",
    reference="stoichconv.reference.stoich_conv:stoich_conv_reference",
))


def _csr(index: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    perm = torch.sort(index, stable=True).indices
    counts = torch.zeros(num_rows, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]), perm


def build_stoich_plan(edge_index: Tensor, stoich: Tensor, num_nodes: int, num_edges: int) -> StoichPlan:
    """Validate an incidence list and preprocess it into a :class:`~stoichconv.types.StoichPlan`.

    ``edge_index`` [2, nnz]: row 0 metabolite id (< ``num_nodes`` = N), row 1
    reaction id (< ``num_edges`` = M); ``stoich`` [nnz] signed, finite. Traceable by
    ``torch.compile(fullgraph=True)``: the value checks become in-graph assertions there."""
    check_index_tensor("edge_index", edge_index)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"`edge_index` must have shape [2, nnz], got {tuple(edge_index.shape)}")
    if not isinstance(stoich, Tensor) or not stoich.is_floating_point():
        raise TypeError(f"`stoich` must be a floating-point tensor, got {getattr(stoich, 'dtype', type(stoich))}")
    nnz = edge_index.size(1)
    if stoich.dim() != 1 or stoich.numel() != nnz:
        raise ValueError(f"`stoich` must have shape [nnz] = [{nnz}] to match `edge_index`, got {tuple(stoich.shape)}")
    if stoich.device != edge_index.device:
        raise ValueError(f"`stoich` is on {stoich.device} but `edge_index` is on {edge_index.device}")
    check_count("num_nodes", num_nodes)
    check_count("num_edges", num_edges)
    edge_index = edge_index.long()
    metabolite_index, reaction_index = edge_index[0].contiguous(), edge_index[1].contiguous()
    if nnz > 0:
        require(torch.isfinite(stoich).all(), ValueError, "`stoich` contains NaN or inf")
        require(edge_index.min() >= 0, ValueError, "`edge_index` contains negative indices")
        require(metabolite_index.max() < num_nodes, ValueError,
                f"`edge_index[0]` (metabolites) has id(s) >= num_nodes = {num_nodes}")
        require(reaction_index.max() < num_edges, ValueError,
                f"`edge_index[1]` (reactions) has id(s) >= num_edges = {num_edges}")
    reaction_ptr, reaction_perm = _csr(reaction_index, num_edges)
    metabolite_ptr, metabolite_perm = _csr(metabolite_index, num_nodes)
    stoich = stoich.detach().clone()  # the plan owns its copy
    return StoichPlan(
        metabolite_index=metabolite_index,
        reaction_index=reaction_index,
        stoich=stoich,
        abs_stoich=stoich.abs(),
        reaction_ptr=reaction_ptr,
        reaction_perm=reaction_perm,
        metabolite_ptr=metabolite_ptr,
        metabolite_perm=metabolite_perm,
        num_metabolites=num_nodes,
        num_reactions=num_edges,
        checked=True,
    )


class PlanCache:
    """One cached :class:`~stoichconv.types.StoichPlan`, reused while the same ``edge_index``
    and ``stoich`` tensor objects (unmodified in place), sizes and device are passed again: the
    key is a :class:`~stoichconv._tensor_key.TensorsKey` (the tensors held weakly plus their
    version counters), so a new graph is never served a stale plan. Tensors made under
    ``torch.inference_mode()`` have no version counter: their plan is rebuilt on every call, as
    it is inside a ``torch.compile`` graph (a sort of the nnz incidences per call). The cache is
    not pickled (a copy starts empty and rebuilds its plan on first use)."""

    def __init__(self) -> None:
        self.clear()

    def get(self, edge_index: Tensor, stoich: Tensor, num_nodes: int, num_edges: int) -> StoichPlan:
        for name, t in (("edge_index", edge_index), ("stoich", stoich)):
            if not isinstance(t, Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        tensors, sizes = (edge_index, stoich), (num_nodes, num_edges)
        if not cacheable(tensors):  # inside a compiled graph: built there, no guards on cache state
            return build_stoich_plan(edge_index, stoich, num_nodes, num_edges)
        if self._plan is not None and self._key.matches(tensors, sizes):
            return self._plan
        self._plan = build_stoich_plan(edge_index, stoich, num_nodes, num_edges)
        self._key = TensorsKey(tensors, sizes)
        return self._plan

    def clear(self) -> None:
        self._key, self._plan = None, None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()


def stoich_conv(
    y: Tensor,
    weight: Tensor,
    plan: StoichPlan,
    reaction_keep: Optional[Tensor] = None,
    backend: str = "auto",
    save_hidden: Optional[bool] = None,
) -> Tensor:
    """Signed stoichiometric propagation ``out`` [B, N, H, C] (see the module docstring for
    the math); differentiable w.r.t. ``y`` and ``weight``.

    Dtypes (module docstring, "Dtypes"): ``out`` has the dtype of ``y``; under ``torch.autocast``
    on ``y``'s device type, ``y`` and ``weight`` are first cast to the autocast dtype (the op then
    runs in that precision, accumulating in float32, as ``torch.mm`` does); outside autocast
    their dtypes must agree.

    Args:
        y: transformed metabolite features [B, N, H, C], float16, bfloat16, float32 or float64.
        weight: per-incidence weights [B, nnz, H] (``s * gate * alpha``), same dtype; or one
            weight shared by every sample, [1, nnz, H] or [nnz, H] (never expanded; its
            gradient comes back in its own shape: module docstring, "Shared weight").
        plan: the graph's :class:`~stoichconv.types.StoichPlan` (``build_stoich_plan``), on
            ``y``'s device.
        reaction_keep: optional bool [B, M]; False drops the reaction in that sample.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``
            (see :mod:`stoichconv.backends`).
        save_hidden: keep the stage-1 rows ``hidden`` [B, M, H, C] for the
            backward (True) or recompute them there (False). ``None`` (default):
            save on GPUs; on CPU save them when the backward will need them (the
            weight requires its gradient, as with a gate or attention) and
            recompute nowhere else: the buffer comes from the host block cache
            (no page faults), and reading it back beats redoing stage 1 (gated +
            attention layer at B = 32, 2 threads, 20 alternating rounds: 131 against
            136 ms median per forward + backward). Ignored by the reference backend.
    """
    if isinstance(y, Tensor):
        y, weight = cast_for_autocast(y.device, y, weight)
    if isinstance(weight, Tensor) and weight.dim() == 2:  # [nnz, H], shared by the batch
        weight = weight.unsqueeze(0)
    check_propagate_args(y, weight, plan, reaction_keep)
    selected = select("stoich_conv", backend, y.device)
    if selected.backend == "reference":
        return selected.fn(
            y, weight, plan.metabolite_index, plan.reaction_index, plan.stoich, plan.num_reactions, reaction_keep
        )
    acc = accumulate_dtype(y.dtype)
    abs_stoich = plan.abs_stoich if plan.abs_stoich.dtype == acc else plan.abs_stoich.to(acc)
    if save_hidden is None:
        save_hidden = y.device.type != "cpu" or (weight.requires_grad and torch.is_grad_enabled())
    mi, ri, rptr, rperm, mptr, mperm = plan.structure()
    out, _hidden, _node_norm, _edge_norm = selected.fn(
        y, weight, reaction_keep, mi, ri, abs_stoich, rptr, rperm, mptr, mperm, bool(save_hidden)
    )
    return out


stoich_propagate = stoich_conv  # the name of earlier releases
