"""Benchmarks of every op against its reference (``python -m stoichconv.bench``)."""

from stoichconv.bench.cli import main

__all__ = ["main"]
