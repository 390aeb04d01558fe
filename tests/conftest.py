"""Suite-wide set-up: with no GPU visible, Triton kernels run on CPU tensors through the
interpreter, which must be switched on before triton (and stoichconv) is imported.

Backend x device parametrisation, generators, tolerances: :mod:`stoichconv.testing`
(``backend_params(op)`` gives one param per backend of the op's table entry and device, skipped
only when no GPU is visible or, for Triton on CPU tensors, without the interpreter)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
