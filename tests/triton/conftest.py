"""Triton tests run on CPU tensors through the Triton interpreter when no GPU
is visible. ``TRITON_INTERPRET`` must be set before any module defining Triton
kernels is imported, so it is set here (the same way as the top-level
conftest), at collection time."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# CPU tensors need the interpreter; CUDA tensors need a GPU. Each case is
# skipped only when its device cannot run Triton here.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _interpreted(), reason="CPU Triton needs TRITON_INTERPRET=1")),
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
