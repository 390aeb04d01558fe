"""Large CPU tensors allocated by Python code of the package: from the host block cache when the
compiled extension is loaded, else advised into transparent huge pages. The Python side of
``csrc/include/stoichconv/host_block_cache.h`` and ``host_pages.h``, which serve the outputs of
the compiled CPU operators the same way.

**The host block cache.** A tensor of at least :data:`HOST_CACHE_MIN_BYTES` takes a block that
an earlier tensor of about its size (up to 5/4 of it) freed, instead of fresh pages, which the
kernel zeroes on first touch; the blocks of freed tensors are kept up to a limit (most recently
freed first; beyond it the oldest go back to the system). The limit: the environment variable
``STOICHCONV_HOST_CACHE_MB`` when the first block is allocated (default 512; 0 turns the cache
off), or :func:`set_host_cache_limit` at any time; :func:`host_cache_info` says what it holds and
:func:`empty_host_cache` returns it all. Measured at B = 32, 2 threads: the stoich conv layer's
gated + attention forward + backward allocates three fresh 41 MB tensors per call, and their page
faults were a tenth of its time. A tensor from the cache is an ordinary CPU tensor with
uninitialised contents, like one from ``torch.empty``, except that its storage cannot be resized.

**Huge pages (cache off, or no compiled extension).**

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
import math
import sys
from typing import NamedTuple, Optional

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


#: Tensors from this size on come from the host block cache (``kHostBlockCacheMinBytes``).
HOST_CACHE_MIN_BYTES = 4 << 20


class HostCacheInfo(NamedTuple):
    """What the host block cache holds: its limit, the bytes and number of freed blocks it
    keeps, and how many allocations it served from them (``hits``) or with a fresh block
    (``misses``) since the process started."""

    limit_bytes: int
    cached_bytes: int
    cached_blocks: int
    hits: int
    misses: int


def _compiled():
    from stoichconv import _extension

    return _extension._C


def host_cache_info() -> HostCacheInfo:
    """The host block cache's :class:`HostCacheInfo` (all zeros without the compiled
    extension, which holds the cache)."""
    C = _compiled()
    return HostCacheInfo(*C._host_cache_info()) if C is not None else HostCacheInfo(0, 0, 0, 0, 0)


def set_host_cache_limit(limit_bytes: int) -> HostCacheInfo:
    """Keep at most ``limit_bytes`` of freed blocks in the host block cache (0 turns it off:
    large CPU tensors then come from ``torch.empty``); blocks beyond the limit are returned to
    the system now. Returns the new :class:`HostCacheInfo`."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"`limit_bytes` must be an int >= 0, got {limit_bytes!r}")
    C = _compiled()
    return HostCacheInfo(*C._host_cache_set_limit(limit_bytes)) if C is not None else host_cache_info()


def empty_host_cache() -> HostCacheInfo:
    """Return every block the host block cache keeps to the system (tensors in use keep
    theirs); the limit stays. Returns the new :class:`HostCacheInfo`."""
    C = _compiled()
    return HostCacheInfo(*C._host_cache_clear()) if C is not None else host_cache_info()


def empty(*size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(size, dtype=dtype, device=device)``; a large CPU tensor comes from the host
    block cache (module docstring), or, with the cache off or no compiled extension, is advised
    into huge pages (:func:`advise_huge_pages`). Inside ``torch.compile`` or a dispatch mode
    (fake tensors, counting modes) always ``torch.empty``."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = math.prod(size) * dtype.itemsize
        C = _compiled()
        if (C is not None and nbytes >= HOST_CACHE_MIN_BYTES and not torch.compiler.is_compiling()
                and torch._C._len_torch_dispatch_stack() == 0):
            block = C._host_block(nbytes)
            if block is not None:
                return block.view(dtype).view(size)
    return advise_huge_pages(torch.empty(size, dtype=dtype, device=device))
