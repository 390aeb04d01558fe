"""The signed stoichiometric propagation operator (stages 6-7 of the spec).

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

B = 1 is a single graph; a compacted block-diagonal batch is B = 1 on the
bigger graph; both layouts give the same numbers. The backward is hand-written
(``R`` = the reaction-side gradient, ``G`` = dL/dout):
``R_e = sum_{k in e} w_k D_{v_k} G_{v_k}``, ``dL/dy_u = sum_{k: v_k = u} w_k B_{e_k} R_{e_k}``,
``dL/dw_k = D_{v_k} <G_{v_k}, hidden_{e_k}> + B_{e_k} <R_{e_k}, y_{v_k}>``.

The incidence structure is preprocessed once per graph into a
:class:`StoichPlan` (CSR orderings for both stages, validated indices);
forward and backward reuse it and nothing is sorted per call.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from stoichconv._extension import has_compiled_kernels
from stoichconv.backends import resolve_backend

__all__ = ["StoichPlan", "build_stoich_plan", "PlanCache", "stoich_propagate"]


@dataclass(frozen=True)
class StoichPlan:
    """Preprocessed incidence structure of one metabolic hypergraph.

    ``reaction_perm`` lists the incidences sorted (stably) by reaction with
    ``reaction_ptr`` [M + 1] its CSR row pointer; ``metabolite_perm`` /
    ``metabolite_ptr`` [N + 1] the same by metabolite."""

    metabolite_index: Tensor  # [nnz] int64
    reaction_index: Tensor  # [nnz] int64
    stoich: Tensor  # [nnz] signed coefficients
    abs_stoich: Tensor  # [nnz] |s|, the degree weights
    reaction_ptr: Tensor  # [M + 1] int64
    reaction_perm: Tensor  # [nnz] int64
    metabolite_ptr: Tensor  # [N + 1] int64
    metabolite_perm: Tensor  # [nnz] int64
    num_metabolites: int
    num_reactions: int

    @property
    def nnz(self) -> int:
        return self.metabolite_index.numel()

    @property
    def device(self) -> torch.device:
        return self.metabolite_index.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "StoichPlan":
        """Move the plan; ``dtype`` changes the stoichiometry's float dtype."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device=device)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
            values[f.name] = value
        return StoichPlan(**values)

    def structure(self) -> tuple[Tensor, ...]:
        """The structural tensors in the order the operators take them."""
        return (
            self.metabolite_index,
            self.reaction_index,
            self.reaction_ptr,
            self.reaction_perm,
            self.metabolite_ptr,
            self.metabolite_perm,
        )


def _csr(index: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    perm = torch.sort(index, stable=True).indices
    ptr = torch.zeros(num_rows + 1, dtype=torch.long, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=num_rows), 0, out=ptr[1:])
    return ptr, perm


def _check_index_tensor(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer indices, got dtype {t.dtype}")


def build_stoich_plan(edge_index: Tensor, stoich: Tensor, num_nodes: int, num_edges: int) -> StoichPlan:
    """Validate an incidence list and preprocess it into a :class:`StoichPlan`.

    ``edge_index`` [2, nnz]: row 0 metabolite id (< ``num_nodes`` = N), row 1
    reaction id (< ``num_edges`` = M); ``stoich`` [nnz] signed, finite."""
    _check_index_tensor("edge_index", edge_index)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"`edge_index` must have shape [2, nnz], got {tuple(edge_index.shape)}")
    if not isinstance(stoich, Tensor) or not stoich.is_floating_point():
        raise TypeError(f"`stoich` must be a floating-point tensor, got {getattr(stoich, 'dtype', type(stoich))}")
    nnz = edge_index.size(1)
    if stoich.dim() != 1 or stoich.numel() != nnz:
        raise ValueError(f"`stoich` must have shape [nnz] = [{nnz}] to match `edge_index`, got {tuple(stoich.shape)}")
    if stoich.device != edge_index.device:
        raise ValueError(f"`stoich` is on {stoich.device} but `edge_index` is on {edge_index.device}")
    for name, value in (("num_nodes", num_nodes), ("num_edges", num_edges)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")
    if nnz > 0 and not bool(torch.isfinite(stoich).all()):
        raise ValueError("`stoich` contains NaN or inf")
    edge_index = edge_index.long()
    metabolite_index, reaction_index = edge_index[0].contiguous(), edge_index[1].contiguous()
    if nnz > 0:
        if int(edge_index.min()) < 0:
            raise ValueError("`edge_index` contains negative indices")
        if int(metabolite_index.max()) >= num_nodes:
            raise ValueError(
                f"`edge_index[0]` (metabolites) has id {int(metabolite_index.max())} >= num_nodes = {num_nodes}"
            )
        if int(reaction_index.max()) >= num_edges:
            raise ValueError(
                f"`edge_index[1]` (reactions) has id {int(reaction_index.max())} >= num_edges = {num_edges}"
            )
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
    )


class PlanCache:
    """One cached :class:`StoichPlan`, reused while the same ``edge_index`` and
    ``stoich`` tensor objects (unmodified in place: their version counters are
    part of the key), sizes and device are passed again. A new graph is never
    served a stale plan: the key holds weak references to the very tensors."""

    def __init__(self) -> None:
        self._key = None
        self._refs: tuple = ()
        self._plan: Optional[StoichPlan] = None

    def get(self, edge_index: Tensor, stoich: Tensor, num_nodes: int, num_edges: int) -> StoichPlan:
        key = (edge_index._version, stoich._version, num_nodes, num_edges)
        alive = tuple(ref() for ref in self._refs)
        same_tensors = len(alive) == 2 and alive[0] is edge_index and alive[1] is stoich
        if self._plan is not None and key == self._key and same_tensors:
            return self._plan
        plan = build_stoich_plan(edge_index, stoich, num_nodes, num_edges)
        self._key, self._refs, self._plan = key, (weakref.ref(edge_index), weakref.ref(stoich)), plan
        return plan

    def clear(self) -> None:
        self._key, self._refs, self._plan = None, (), None


def check_reaction_keep(reaction_keep: Optional[Tensor], batch_size: int, num_reactions: int, device) -> None:
    """``reaction_keep`` must be None or a bool [B, M] tensor on ``device``."""
    if reaction_keep is None:
        return
    if not isinstance(reaction_keep, Tensor) or reaction_keep.dtype != torch.bool:
        raise TypeError(f"`reaction_keep` must be a bool tensor, got {getattr(reaction_keep, 'dtype', type(reaction_keep))}")
    if tuple(reaction_keep.shape) != (batch_size, num_reactions):
        raise ValueError(
            f"`reaction_keep` must have shape [B, M] = [{batch_size}, {num_reactions}], got {tuple(reaction_keep.shape)}"
        )
    if reaction_keep.device != device:
        raise ValueError(f"`reaction_keep` is on {reaction_keep.device} but `y` is on {device}")


def _check_propagate_args(y: Tensor, weight: Tensor, plan: StoichPlan, reaction_keep: Optional[Tensor]) -> None:
    if not isinstance(y, Tensor) or y.dim() != 4:
        raise ValueError(f"`y` must be a tensor of shape [B, N, H, C], got {getattr(y, 'shape', type(y))}")
    if y.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`y` must be float32 or float64, got {y.dtype}")
    B, N, H, _ = y.shape
    if N != plan.num_metabolites:
        raise ValueError(f"`y` has N = {N} metabolites but the plan has {plan.num_metabolites}")
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (B, plan.nnz, H):
        raise ValueError(
            f"`weight` must have shape [B, nnz, H] = [{B}, {plan.nnz}, {H}], got {tuple(getattr(weight, 'shape', ()))}"
        )
    if weight.dtype != y.dtype:
        raise TypeError(f"`weight` has dtype {weight.dtype} but `y` has {y.dtype}")
    if weight.device != y.device:
        raise ValueError(f"`weight` is on {weight.device} but `y` is on {y.device}")
    if plan.device != y.device:
        raise ValueError(f"the plan is on {plan.device} but `y` is on {y.device}; use plan.to(device)")
    check_reaction_keep(reaction_keep, B, plan.num_reactions, y.device)


def stoich_propagate(
    y: Tensor,
    weight: Tensor,
    plan: StoichPlan,
    reaction_keep: Optional[Tensor] = None,
    backend: str = "auto",
    save_hidden: Optional[bool] = None,
) -> Tensor:
    """Signed stoichiometric propagation ``out`` [B, N, H, C] (see the module
    docstring for the math); differentiable w.r.t. ``y`` and ``weight``.

    Args:
        y: transformed metabolite features [B, N, H, C], float32 or float64.
        weight: per-incidence weights [B, nnz, H] (``s * gate * alpha``), same dtype.
        plan: the graph's :class:`StoichPlan` (``build_stoich_plan``), on ``y``'s device.
        reaction_keep: optional bool [B, M]; False drops the reaction in that sample.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``
            (see :mod:`stoichconv.backends`).
        save_hidden: keep the stage-1 rows ``hidden`` [B, M, H, C] for the
            backward (True) or recompute them there (False). ``None`` (default):
            recompute on CPU, where writing a fresh [B, M, H, C] buffer (page
            faults included) costs more than redoing stage 1 sample by sample in
            cache; save on GPUs. Ignored by the reference backend.
    """
    _check_propagate_args(y, weight, plan, reaction_keep)
    backend = resolve_backend(backend, y.device)
    if backend == "reference":
        from stoichconv.reference.propagate import stoich_propagate_reference

        return stoich_propagate_reference(
            y, weight, plan.metabolite_index, plan.reaction_index, plan.stoich, plan.num_reactions, reaction_keep
        )
    if backend == "triton":
        from stoichconv.triton.stoich_conv import triton_stoich_conv_forward as forward_op
    else:
        forward_op = torch.ops.stoichconv.stoich_conv_forward
    abs_stoich = plan.abs_stoich if plan.abs_stoich.dtype == y.dtype else plan.abs_stoich.to(y.dtype)
    if save_hidden is None:
        save_hidden = y.device.type != "cpu"
    mi, ri, rptr, rperm, mptr, mperm = plan.structure()
    out, _hidden, _node_norm, _edge_norm = forward_op(
        y, weight, reaction_keep, mi, ri, abs_stoich, rptr, rperm, mptr, mperm, bool(save_hidden)
    )
    return out


# --------------------------------------------------------------------------
# Autograd and fake kernels, shared by the compiled op and the Triton op.
# --------------------------------------------------------------------------


def forward_fake(y, weight, reaction_keep, metabolite_index, reaction_index, abs_stoich,
                 reaction_ptr, reaction_perm, metabolite_ptr, metabolite_perm, save_hidden=True):
    B, N, H, C = y.shape
    M = reaction_ptr.shape[0] - 1
    Bn = B if reaction_keep is not None else 1
    hidden = y.new_empty(B, M, H, C) if save_hidden else y.new_empty(0)
    return y.new_empty(B, N, H, C), hidden, y.new_empty(Bn, N), y.new_empty(Bn, M)


def backward_fake(grad_out, grad_hidden, y, weight, reaction_keep, hidden, node_norm, edge_norm,
                  metabolite_index, reaction_index, reaction_ptr, reaction_perm, metabolite_ptr,
                  metabolite_perm, need_grad_y, need_grad_weight):
    grad_y = y.new_empty(y.shape) if need_grad_y else y.new_empty(0)
    grad_weight = weight.new_empty(weight.shape) if need_grad_weight else weight.new_empty(0)
    return grad_y, grad_weight


def register_stoich_conv_autograd(forward_op_name: str, backward_op) -> None:
    """Register the hand-written backward for a forward op with the
    ``stoich_conv_forward`` schema; ``backward_op`` has the
    ``stoich_conv_backward`` schema. An empty ``hidden`` (not saved) is passed
    on as is; the backward op recomputes it."""

    def setup_context(ctx, inputs, output):
        y, weight, reaction_keep, mi, ri, _abs, rptr, rperm, mptr, mperm = inputs[:10]
        _out, hidden, node_norm, edge_norm = output
        ctx.num_inputs = len(inputs)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(node_norm, edge_norm)
        ctx.save_for_backward(y, weight, reaction_keep, hidden, node_norm, edge_norm, mi, ri, rptr, rperm, mptr, mperm)

    def backward(ctx, grad_out, grad_hidden, _grad_node_norm, _grad_edge_norm):
        y, weight, reaction_keep, hidden, node_norm, edge_norm, mi, ri, rptr, rperm, mptr, mperm = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_hidden is not None and hidden.numel() == 0:
            grad_hidden = None  # the empty placeholder of an unsaved hidden
        if (grad_out is None and grad_hidden is None) or not (need_y or need_w):
            return (None,) * ctx.num_inputs
        if grad_out is None:
            grad_out = torch.zeros_like(y)
        grad_y, grad_weight = backward_op(
            grad_out, grad_hidden, y, weight, reaction_keep, hidden, node_norm, edge_norm,
            mi, ri, rptr, rperm, mptr, mperm, need_y, need_w,
        )
        return (grad_y if need_y else None, grad_weight if need_w else None) + (None,) * (ctx.num_inputs - 2)

    torch.library.register_autograd(forward_op_name, backward, setup_context=setup_context)


if has_compiled_kernels():
    torch.library.register_fake("stoichconv::stoich_conv_forward")(forward_fake)
    torch.library.register_fake("stoichconv::stoich_conv_backward")(backward_fake)
    register_stoich_conv_autograd(
        "stoichconv::stoich_conv_forward", lambda *args: torch.ops.stoichconv.stoich_conv_backward(*args)
    )
