"""Kept for the tests that still import it: the generators live in the shared toolkit,
:mod:`stoichconv.testing` (import them from there)."""

from stoichconv.testing import random_hypergraph, random_keep

__all__ = ["random_hypergraph", "random_keep"]
