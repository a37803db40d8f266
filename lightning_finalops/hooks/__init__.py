"""The standard hooks, one module per family."""

from lightning_finalops.hooks.final_ops import FinalOpsHook

__all__ = ["FinalOpsHook"]
