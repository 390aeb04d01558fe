"""Operators (one module per op): schemas in csrc/stoichconv.cpp, kernels in
csrc/cpu, csrc/cuda and stoichconv/triton, autograd and fake kernels here."""

from stoichconv.ops import gatv2, group_softmax  # noqa: F401  (register their autograd and fake kernels)
from stoichconv.ops.stoich_conv import PlanCache, StoichPlan, build_stoich_plan, stoich_propagate

__all__ = ["PlanCache", "StoichPlan", "build_stoich_plan", "stoich_propagate"]
