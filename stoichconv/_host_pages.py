"""Large CPU tensors allocated by Python code of the package, advised into transparent huge
pages: the Python side of ``csrc/include/stoichconv/host_pages.h``, which does the same for the
outputs of the compiled CPU operators.

glibc serves an allocation above its mmap threshold (at most 32 MiB) from fresh pages on every
call, and the first write of each 4 KiB page then costs a page fault. On the machines measured a
fresh 41 MB tensor took 16-18 ms to fill against 0.7-1.5 ms for a reused one, and 3.8-4.1 ms
once its range had been advised (Linux ``madvise(MADV_HUGEPAGE)``) before the first write, which
lets the kernel fault it in 2 MiB pages. Only advice: the data and the allocation are those of
``torch.empty``; nothing happens where transparent huge pages are off ("never"), off Linux, for
tensors up to :data:`HUGE_PAGE_ADVICE_BYTES`, or while ``torch.compile`` traces (fake tensors have
no memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Optional

import torch

#: Tensors above this size are advised: glibc maps those fresh on every call (its mmap threshold
#: grows with what the process frees, up to 32 MiB on 64-bit), while a smaller one usually comes
#: from memory the heap already holds, where the advice only costs (measured: +4-8 ms of system
#: time per call of the plain layer at B = 32 for its 21 MB projection).
HUGE_PAGE_ADVICE_BYTES = 32 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def _load_madvise() -> Optional[ctypes._CFuncPtr]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def advise_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """Advises the whole 2 MiB pages inside ``tensor``'s memory to be backed by huge pages
    (call it before the tensor is first written) and returns ``tensor``. A no-op for CUDA, small
    or fake tensors and where the advice is unavailable; a refused advice is ignored."""
    if (_madvise is None or tensor.device.type != "cpu" or tensor.nbytes <= HUGE_PAGE_ADVICE_BYTES
            or torch.compiler.is_compiling()):
        return tensor
    try:
        address = tensor.data_ptr()
    except RuntimeError:  # a tensor without storage (fake / meta)
        return tensor
    begin = (address + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (address + tensor.nbytes) & ~(_HUGE_PAGE - 1)
    if end > begin:
        _madvise(begin, end - begin, _MADV_HUGEPAGE)
    return tensor


def empty(*size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(size, dtype=dtype, device=device)``, advised into huge pages when it is a
    large CPU tensor (:func:`advise_huge_pages`)."""
    return advise_huge_pages(torch.empty(size, dtype=dtype, device=device))
