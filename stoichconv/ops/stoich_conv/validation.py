"""Argument validation of the stoich conv, shared by its public functions and its Triton
entry (the compiled kernels repeat the structural checks in C++,
``csrc/include/stoichconv/stoich_conv_checks.h``). Every error names the argument."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from stoichconv.ops._checks import check_count, check_index_tensor, require  # noqa: F401  (re-exported)
from stoichconv.ops._dtypes import check_float, check_same_dtype
from stoichconv.types import StoichPlan


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


def check_features(y) -> None:
    if not isinstance(y, Tensor) or y.dim() != 4:
        raise ValueError(f"`y` must be a tensor of shape [B, N, H, C], got {getattr(y, 'shape', type(y))}")
    check_float("y", y)


def check_weight(weight, y: Tensor, nnz: int) -> None:
    """``weight`` per sample [B, nnz, H] or shared by the batch [1, nnz, H], of ``y``'s dtype and device."""
    B, _, H, _ = y.shape
    if not isinstance(weight, Tensor) or tuple(weight.shape) not in ((B, nnz, H), (1, nnz, H)):
        raise ValueError(
            f"`weight` must have shape [B, nnz, H] = [{B}, {nnz}, {H}] or, shared by the batch, "
            f"[1, nnz, H] = [1, {nnz}, {H}], got {tuple(getattr(weight, 'shape', ()))}"
        )
    check_same_dtype("y", y, weight=weight)
    if weight.device != y.device:
        raise ValueError(f"`weight` is on {weight.device} but `y` is on {y.device}")


def check_plan_consistent(plan: StoichPlan) -> None:
    """Full check of a plan not built by ``build_stoich_plan``: shapes, dtypes, devices, index
    ranges, each CSR pointer equal to the counts of its key, each permutation a permutation that
    sorts the incidences by that key, ``abs_stoich == |stoich|`` (host syncs; once per plan)."""
    nnz, N, M = plan.nnz, plan.num_metabolites, plan.num_reactions
    check_count("plan.num_metabolites", N)
    check_count("plan.num_reactions", M)
    device = plan.metabolite_index.device
    for name, length, floating in (
        ("metabolite_index", nnz, False), ("reaction_index", nnz, False), ("stoich", nnz, True),
        ("abs_stoich", nnz, True), ("reaction_ptr", M + 1, False), ("reaction_perm", nnz, False),
        ("metabolite_ptr", N + 1, False), ("metabolite_perm", nnz, False),
    ):
        t = getattr(plan, name)
        if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != length:
            raise ValueError(f"`plan.{name}` must be 1-D of length {length}, got {tuple(getattr(t, 'shape', ()))}")
        if floating != t.is_floating_point() or (not floating and t.dtype != torch.int64):
            raise TypeError(f"`plan.{name}` has dtype {t.dtype}, expected {'a float' if floating else 'int64'}")
        if t.device != device:
            raise ValueError(f"`plan.{name}` is on {t.device} but `plan.metabolite_index` is on {device}")
    if nnz and not bool(torch.isfinite(plan.stoich).all()):
        raise ValueError("`plan.stoich` contains NaN or inf")
    if not torch.equal(plan.abs_stoich, plan.stoich.abs().to(plan.abs_stoich.dtype)):
        raise ValueError("`plan.abs_stoich` must equal |plan.stoich|")
    for key, ptr, perm, rows in (("reaction", plan.reaction_ptr, plan.reaction_perm, M),
                                 ("metabolite", plan.metabolite_ptr, plan.metabolite_perm, N)):
        index = getattr(plan, f"{key}_index")
        if nnz and (int(index.min()) < 0 or int(index.max()) >= rows):
            raise ValueError(f"`plan.{key}_index` has values out of range [0, {rows})")
        counts = torch.zeros(rows, dtype=torch.long, device=device).index_add_(0, index, torch.ones_like(index))
        if int(ptr[0]) != 0 or not torch.equal(ptr[1:], counts.cumsum(0)):
            raise ValueError(f"`plan.{key}_ptr` does not match the segment boundaries of `plan.{key}_index`")
        if nnz and (int(perm.min()) < 0 or int(perm.max()) >= nnz
                    or not bool((torch.bincount(perm, minlength=nnz) == 1).all())):
            raise ValueError(f"`plan.{key}_perm` must be a permutation of range({nnz})")
        if nnz > 1 and bool((index[perm][1:] < index[perm][:-1]).any()):
            raise ValueError(f"`plan.{key}_perm` does not sort the incidences by `plan.{key}_index`")


def check_propagate_args(y, weight, plan, reaction_keep) -> None:
    """The public function's checks: ``y`` [B, N, H, C], ``weight`` [B, nnz, H] or [1, nnz, H], the plan
    (checked in full once when it was not built by ``build_stoich_plan``)."""
    if not isinstance(plan, StoichPlan):
        raise TypeError(f"`plan` must be a StoichPlan (from build_stoich_plan), got {type(plan).__name__}")
    if not plan.checked:
        check_plan_consistent(plan)
        object.__setattr__(plan, "checked", True)
    check_features(y)
    N = y.shape[1]
    if N != plan.num_metabolites:
        raise ValueError(f"`y` has N = {N} metabolites but the plan has {plan.num_metabolites}")
    check_weight(weight, y, plan.nnz)
    if plan.device != y.device:
        raise ValueError(f"the plan is on {plan.device} but `y` is on {y.device}; use plan.to(device)")
    check_reaction_keep(reaction_keep, y.shape[0], plan.num_reactions, y.device)


def check_structure_args(y, weight, reaction_keep, mi, ri, rptr, rperm, mptr, mperm) -> tuple[int, int]:
    """The operator-level checks of the raw structural arguments (what the compiled op checks
    in C++), for the Triton entry called through ``torch.ops``; returns (nnz, M)."""
    check_features(y)
    N = y.shape[1]
    nnz = mi.numel() if isinstance(mi, Tensor) else -1
    check_weight(weight, y, nnz)
    if not isinstance(rptr, Tensor) or rptr.dim() != 1 or rptr.numel() < 1:
        raise ValueError("`reaction_ptr` must be a 1-D tensor of length M + 1")
    M = rptr.numel() - 1
    for name, t, length in (
        ("metabolite_index", mi, nnz), ("reaction_index", ri, nnz), ("reaction_perm", rperm, nnz),
        ("metabolite_perm", mperm, nnz), ("reaction_ptr", rptr, M + 1), ("metabolite_ptr", mptr, N + 1),
    ):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != length:
            raise ValueError(f"`{name}` must be 1-D of length {length}, got {tuple(getattr(t, 'shape', ()))}")
        if t.dtype != torch.int64:
            raise TypeError(f"`{name}` must be int64, got {t.dtype}")
        if t.device != y.device:
            raise ValueError(f"`{name}` is on {t.device} but `y` is on {y.device}")
    if reaction_keep is not None:
        if not isinstance(reaction_keep, Tensor) or reaction_keep.dtype != torch.bool:
            raise TypeError(f"`reaction_keep` must be a bool tensor, got {getattr(reaction_keep, 'dtype', None)}")
        if tuple(reaction_keep.shape) != (y.shape[0], M):
            raise ValueError(f"`reaction_keep` must be [B, M] = [{y.shape[0]}, {M}], got {tuple(reaction_keep.shape)}")
        if reaction_keep.device != y.device:
            raise ValueError(f"`reaction_keep` is on {reaction_keep.device} but `y` is on {y.device}")
    return nnz, M


def check_structure_values(mi, ri, rptr, rperm, mptr, mperm, N, M, nnz) -> None:
    """Index values in range and CSR pointers well formed (host syncs)."""
    for name, ptr in (("reaction_ptr", rptr), ("metabolite_ptr", mptr)):
        if int(ptr[0]) != 0 or int(ptr[-1]) != nnz:
            raise ValueError(f"`{name}` must start at 0 and end at nnz = {nnz}")
        if ptr.numel() > 1 and bool((ptr[1:] < ptr[:-1]).any()):
            raise ValueError(f"`{name}` must be non-decreasing")
    if nnz == 0:
        return
    for name, t, bound in (
        ("metabolite_index", mi, N), ("reaction_index", ri, M), ("reaction_perm", rperm, nnz),
        ("metabolite_perm", mperm, nnz),
    ):
        if int(t.min()) < 0 or int(t.max()) >= bound:
            raise ValueError(f"`{name}` has values out of range [0, {bound})")
