"""Argument validation of the pert-mask ops, shared by their public functions, their Triton
entry and :func:`stoichconv.perturb.perturb_batch` (the compiled kernels repeat the checks in
C++, ``csrc/include/stoichconv/pert_mask_checks.h``). Every error names the argument.

Two kinds of value checks:

* :func:`check_perturbation_values` / :func:`check_edge_index_values` (``ValueError``), run by
  :func:`check_perturbations` / :func:`check_edge_index` with ``values=True``: one host sync
  per reduction on a GPU, the cost ``validate=False`` avoids;
* :func:`value_witnesses` + :func:`raise_kernel_value_error`, what the Triton operators run
  instead with ``validate=False``: the compiled kernels' checks computed on the device without
  a host sync (the operator reads the witnesses in the sync it makes anyway, with its output
  size) and raised as the compiled CPU kernel's ``RuntimeError``, word for word, so that an
  unchecked bad input gives the same error on every backend."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from stoichconv.ops._checks import check_count, check_index_tensor, require

__all__ = [
    "ANY_ID",
    "as_index",
    "check_count",
    "check_edge_index",
    "check_edge_index_values",
    "check_keep",
    "check_out_buffer",
    "check_perturbation_values",
    "check_perturbations",
    "raise_kernel_value_error",
    "value_witnesses",
]

# The bound of an id that only has to be >= 0 (the gene ids of reaction_keep): the C++ kAnyId.
ANY_ID = 2**63 - 1


def as_index(name: str, t, device: Optional[torch.device] = None) -> Tensor:
    """An integer index tensor (on ``device`` when given) as int64, contiguous."""
    check_index_tensor(name, t)
    if device is not None and t.device != device:
        raise ValueError(f"`{name}` is on {t.device} but `pert` is on {device}")
    return t.long().contiguous()


def check_perturbations(pert, pert_ptr, num_nodes: Optional[int] = None, values: bool = True) -> tuple[Tensor, Tensor]:
    """Validate a CSR perturbation batch; returns int64 contiguous copies.

    ``num_nodes`` bounds the ids when given (otherwise they need only be >= 0);
    ``values=False`` checks types, shapes and devices only (no host sync)."""
    pert = as_index("pert", pert)
    pert_ptr = as_index("pert_ptr", pert_ptr, pert.device)
    if pert.dim() != 1:
        raise ValueError(f"`pert` must be 1-D [P], got shape {tuple(pert.shape)}")
    if pert_ptr.dim() != 1 or pert_ptr.numel() < 1:
        raise ValueError(f"`pert_ptr` must be 1-D [B + 1] with B >= 0, got shape {tuple(pert_ptr.shape)}")
    if values:
        check_perturbation_values(pert, pert_ptr, num_nodes)
    return pert, pert_ptr


def check_perturbation_values(pert: Tensor, pert_ptr: Tensor, num_nodes: Optional[int] = None) -> None:
    """The value checks of :func:`check_perturbations` (host syncs on a GPU). Inside a
    ``torch.compile`` graph they are in-graph assertions (:func:`~stoichconv.ops._checks.require`:
    no graph break, no host sync), with the same messages less the offending values."""
    if torch.compiler.is_compiling():
        require(pert_ptr[0] == 0, ValueError, "`pert_ptr` must start at 0")
        require((pert_ptr[1:] >= pert_ptr[:-1]).all(), ValueError, "`pert_ptr` must be non-decreasing")
        require(pert_ptr[-1] == pert.numel(), ValueError, f"`pert_ptr` must end at len(pert) = {pert.numel()}")
        if pert.numel() > 0:
            require(pert.min() >= 0, ValueError, "`pert` has a negative gene id")
            if num_nodes is not None:
                require(pert.max() < num_nodes, ValueError, f"`pert` has a gene id outside [0, num_nodes={num_nodes})")
        return
    if int(pert_ptr[0]) != 0:
        raise ValueError(f"`pert_ptr` must start at 0, got {int(pert_ptr[0])}")
    if pert_ptr.numel() > 1 and bool((pert_ptr[1:] < pert_ptr[:-1]).any()):
        raise ValueError("`pert_ptr` must be non-decreasing")
    if int(pert_ptr[-1]) != pert.numel():
        raise ValueError(f"`pert_ptr` must end at len(pert) = {pert.numel()}, got {int(pert_ptr[-1])}")
    if pert.numel() > 0:
        low, high = int(pert.min()), int(pert.max())
        if low < 0:
            raise ValueError(f"`pert` has a negative gene id {low}")
        if num_nodes is not None and high >= num_nodes:
            raise ValueError(f"`pert` has gene id {high} outside [0, num_nodes={num_nodes})")


def check_edge_index(name: str, edge_index, num_src: int, num_dst: int, device: torch.device,
                      src_name: str = "num_nodes", dst_name: Optional[str] = None, values: bool = True) -> Tensor:
    edge_index = as_index(name, edge_index, device)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"`{name}` must have shape [2, E], got {tuple(edge_index.shape)}")
    if values:
        check_edge_index_values(name, edge_index, num_src, num_dst, src_name, dst_name)
    return edge_index


def check_edge_index_values(name: str, edge_index: Tensor, num_src: Optional[int], num_dst: Optional[int],
                            src_name: str = "num_nodes", dst_name: Optional[str] = None) -> None:
    """The value checks of :func:`check_edge_index` (host syncs on a GPU); a bound ``None``
    admits any id >= 0."""
    if edge_index.size(1) == 0:
        return
    if int(edge_index.min()) < 0:
        raise ValueError(f"`{name}` contains a negative id {int(edge_index.min())}")
    for row, bound, bound_name in ((0, num_src, src_name), (1, num_dst, dst_name or src_name)):
        if bound is None:
            continue
        high = int(edge_index[row].max())
        if high >= bound:
            raise ValueError(f"`{name}[{row}]` has id {high} >= {bound_name} = {bound}")


def check_keep(name: str, keep, num_samples: int, num_nodes: int, device: torch.device) -> Optional[Tensor]:
    if keep is None:
        return None
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"`{name}` must be a bool tensor or None, got {getattr(keep, 'dtype', type(keep).__name__)}")
    if tuple(keep.shape) != (num_samples, num_nodes):
        raise ValueError(f"`{name}` must have shape [B, N] = [{num_samples}, {num_nodes}], got {tuple(keep.shape)}")
    if keep.device != device:
        raise ValueError(f"`{name}` is on {keep.device} but `edge_index` is on {device}")
    return keep.contiguous()


def check_out_buffer(name: str, buffer, dtype: torch.dtype, device: torch.device, needed: int,
                     what: str) -> Tensor:
    """An ``out=`` buffer of the pert-mask ops: a contiguous tensor of ``dtype`` on ``device``
    with at least ``needed`` elements (the op writes the first ``needed``, flat; ``what`` names
    the size formula). ``TypeError`` for a wrong type or dtype, ``ValueError`` otherwise."""
    if not isinstance(buffer, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(buffer).__name__}")
    if buffer.dtype != dtype:
        raise TypeError(f"`{name}` must have dtype {dtype}, got {buffer.dtype}")
    if buffer.device != device:
        raise ValueError(f"`{name}` is on {buffer.device} but the inputs are on {device}")
    if not buffer.is_contiguous():
        raise ValueError(f"`{name}` must be contiguous")
    if buffer.numel() < needed:
        raise ValueError(f"`{name}` holds {buffer.numel()} elements but needs at least {needed} ({what})")
    return buffer


# --------------------------------------------------------------------------- device-side checks


def _first_true(mask: Tensor) -> Tensor:
    """[1] int64: the index of the first True of the 1-D ``mask``, -1 when none (no host sync)."""
    if mask.numel() == 0:
        return torch.full((1,), -1, dtype=torch.int64, device=mask.device)
    first = torch.argmax(mask.to(torch.uint8)).view(1)  # argmax gives the first maximum
    return torch.where(mask.index_select(0, first), first, torch.full_like(first, -1))


def _outside(ids: Tensor, bound: int) -> Tensor:
    """ids outside [0, bound); ``bound = ANY_ID`` admits every id >= 0 (id_in_range in C++)."""
    return (ids < 0) if bound == ANY_ID else (ids < 0) | (ids >= bound)


def value_witnesses(edge_index: Tensor, num_src: int, num_dst: int, pert: Optional[Tensor] = None,
                    pert_ptr: Optional[Tensor] = None, max_id: int = -1) -> Tensor:
    """The compiled kernels' value checks as an int64 tensor on the inputs' device, computed
    without a host sync: ``[e, edge_index[0, e], edge_index[1, e]]`` for the first column ``e``
    with an id outside ``[0, num_src) x [0, num_dst)`` (``e = -1``: none; ``num_src = ANY_ID``
    admits any id >= 0), then, with ``pert`` / ``pert_ptr``, ``[pert_ptr[0], 1 if pert_ptr
    decreases somewhere else 0, pert_ptr[-1], i, pert[i]]`` for the first ``i`` with an id
    outside ``[0, max_id)`` (only ``< 0`` when ``max_id < 0``; ``i = -1``: none). All inputs
    int64 and contiguous; read the result with :func:`raise_kernel_value_error`."""
    parts = []
    bad = _outside(edge_index[0], num_src) | _outside(edge_index[1], num_dst)
    e = _first_true(bad)
    if edge_index.size(1) > 0:
        at = e.clamp(min=0)
        parts += [e, edge_index[0].index_select(0, at), edge_index[1].index_select(0, at)]
    else:
        parts += [e, torch.zeros(2, dtype=torch.int64, device=edge_index.device)]
    if pert_ptr is not None:
        decreasing = (pert_ptr[1:] < pert_ptr[:-1]).any().view(1).to(torch.int64)
        i = _first_true((pert < 0) if max_id < 0 else (pert < 0) | (pert >= max_id))
        pert_at = pert.index_select(0, i.clamp(min=0)) if pert.numel() > 0 else torch.zeros_like(i)
        parts += [pert_ptr[:1], decreasing, pert_ptr[-1:], i, pert_at]
    return torch.cat(parts)


def raise_kernel_value_error(op: str, name: str, witnesses: list, num_src: int, num_dst: int,
                             num_pert: int = 0, max_id: int = -1) -> None:
    """Raises the compiled CPU kernel's ``RuntimeError`` (the text of
    ``csrc/include/stoichconv/pert_mask_checks.h``, in its order: the edge list, ``pert_ptr``,
    ``pert``) when the host copy ``witnesses`` of :func:`value_witnesses` shows a failed check;
    ``num_pert`` = len(pert)."""
    e, src, dst = witnesses[:3]
    if e >= 0:
        if src < 0 or (num_src != ANY_ID and src >= num_src):
            if num_src == ANY_ID:
                raise RuntimeError(f"{op}: `{name}[0]` has id {src} < 0")
            raise RuntimeError(f"{op}: `{name}[0]` has id {src} outside [0, {num_src})")
        raise RuntimeError(f"{op}: `{name}[1]` has id {dst} outside [0, {num_dst})")
    if len(witnesses) == 3:
        return
    start, decreasing, end, i, pert_at = witnesses[3:]
    if start != 0:
        raise RuntimeError(f"{op}: `pert_ptr` must start at 0, got {start}")
    if decreasing:
        raise RuntimeError(f"{op}: `pert_ptr` must be non-decreasing")
    if end != num_pert:
        raise RuntimeError(f"{op}: `pert_ptr` must end at len(pert) = {num_pert}, got {end}")
    if i >= 0:
        if max_id < 0:
            raise RuntimeError(f"{op}: `pert` has gene id {pert_at} < 0")
        raise RuntimeError(f"{op}: `pert` has gene id {pert_at} outside [0, num_nodes = {max_id})")
