"""Suite-wide set-up: with no GPU visible, Triton kernels run on CPU tensors
through the interpreter, which must be switched on before triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
