"""Agreement across ranks, without synchronising the host with a GPU.

A stop flag is a host-side bool, so it is agreed over a CPU (gloo) process group: an
all-reduce of one CPU integer per vote. Under NCCL a gloo group is created once, on the
first vote, which every rank reaches at the same batch.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.distributed as dist

_GLOO_GROUPS: Dict[int, Any] = {}


def _cpu_group() -> Any:
    if dist.get_backend() == "gloo":
        return None  # the default group already reduces CPU tensors
    key = id(dist.group.WORLD)
    group = _GLOO_GROUPS.get(key)
    if group is None:
        group = _GLOO_GROUPS[key] = dist.new_group(backend="gloo")
    return group


def is_rank_zero() -> bool:
    """Global rank 0 of ``torch.distributed``, or True when it is not initialized."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def any_rank(flag: bool, world_size: int) -> bool:
    """Whether ``flag`` is true on any rank; every rank must call it at the same point.

    Args:
        flag: this rank's vote.
        world_size: the number of ranks; with one, nothing is communicated.
    """
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return flag
    vote = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(vote.item())  # a CPU tensor: no device synchronisation
