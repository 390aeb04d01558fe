"""Cache keys on tensor identity: "the very same tensor objects, unmodified since".

A key made from ``data_ptr()`` and shapes can collide (a new graph allocated where a freed one
lived); a :class:`TensorsKey` holds weak references to the tensors themselves plus their version
counters, so it matches only while those objects are alive and have not been written in place.
Tensors made under ``torch.inference_mode()`` have no version counter and are never cacheable
(:func:`cacheable`); neither is anything inside a ``torch.compile`` graph (the cached state would
become guards). Keys are not picklable on purpose: owners drop them when pickled.
"""

from __future__ import annotations

import weakref
from typing import Hashable, Sequence

import torch
from torch import Tensor

__all__ = ["TensorsKey", "cacheable"]


def cacheable(tensors: Sequence[Tensor]) -> bool:
    """Whether a result computed from ``tensors`` may be cached under a :class:`TensorsKey`."""
    return not torch.compiler.is_compiling() and not any(t.is_inference() for t in tensors)


class TensorsKey:
    """Identity and version of ``tensors`` plus hashable ``extra`` values (sizes, device, dtype)."""

    __slots__ = ("_refs", "_versions", "_extra")

    def __init__(self, tensors: Sequence[Tensor], extra: Hashable = ()) -> None:
        self._refs = tuple(weakref.ref(t) for t in tensors)
        self._versions = tuple(t._version for t in tensors)
        self._extra = extra

    def matches(self, tensors: Sequence[Tensor], extra: Hashable = ()) -> bool:
        """True iff ``tensors`` are the same (alive) objects, unmodified, and ``extra`` is equal."""
        return (len(tensors) == len(self._refs) and self._extra == extra
                and all(ref() is t for ref, t in zip(self._refs, tensors))
                and self._versions == tuple(t._version for t in tensors))

    def __reduce__(self):
        raise TypeError("a TensorsKey holds weak references and cannot be pickled; drop the cache instead")
