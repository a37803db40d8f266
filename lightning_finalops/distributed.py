"""Agreement across ranks: one small non-blocking all-reduce per run, never a GPU sync.

Every decision that must be the same on every rank of a session (a stop, a time trigger)
goes through :class:`RankAgreement`: at the end of each run every rank contributes its stop
vote and rank 0 its clock to one all-reduce of a two-element CPU float64 tensor over a gloo
group, issued without waiting (``async_op=True``) and read at the end of the next run, when
it has long completed. So every rank applies the same decision at the same global step, one
run after the request, and no rank waits for another on a step where nothing was decided.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "RankAgreement",
    "agreed_time",
    "any_rank_async",
    "broadcast_from_rank_zero",
    "is_rank_zero",
    "local_clock",
    "set_agreed_time",
    "set_local_clock",
    "world_size",
]

# (the default group it was made for, the gloo group): a group re-created after a
# destroy_process_group() gets a gloo group of its own, even at a reused address
_GLOO_GROUP: List[Any] = []

# Rank 0's clock as the ranks of the running session last agreed on it; None: no agreement.
_agreed_time: Optional[float] = None
# What a rank contributes as its clock. ``hooks.timers`` sets it to read its ``clock``
# attribute (the name tests replace), so the core reads the hooks' clock without importing
# the hooks' layer.
_local_clock: List[Callable[[], float]] = [time.monotonic]


def agreed_time() -> Optional[float]:
    """Rank 0's clock as the ranks of the running session last agreed on it, or ``None``."""
    return _agreed_time


def set_agreed_time(value: Optional[float]) -> None:
    """Set what :func:`agreed_time` returns; the session core calls it, nothing else needs to."""
    global _agreed_time
    _agreed_time = value


def local_clock() -> float:
    """This rank's clock, as the agreement sends it (``hooks.timers.clock``)."""
    return _local_clock[0]()


def set_local_clock(read: Callable[[], float]) -> None:
    """Make :func:`local_clock` call ``read`` (``hooks.timers`` does, once, at import)."""
    _local_clock[0] = read


def is_rank_zero() -> bool:
    """Global rank 0 of ``torch.distributed``, or True when it is not initialized."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    """The ``torch.distributed`` world size, or 1 when it is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _cpu_group() -> Any:
    """A group that reduces CPU tensors: the default one under gloo, else a gloo group.

    A new group is a collective of its own: every rank creates it at the same point (the
    first agreement of the first session, at session creation).
    """
    if dist.get_backend() == "gloo":
        return None  # the default group already reduces CPU tensors
    world = dist.group.WORLD
    if not _GLOO_GROUP or _GLOO_GROUP[0] is not world:
        _GLOO_GROUP[:] = [world, dist.new_group(backend="gloo")]
    return _GLOO_GROUP[1]


def broadcast_from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a blocking collective over a CPU group).

    With one process (or without ``torch.distributed``), ``value`` itself.
    """
    if world_size() <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_cpu_group())
    return box[0]


def any_rank_async(flag: bool) -> Callable[[], bool]:
    """Start asking whether any rank's ``flag`` is True, without waiting for the answer.

    One all-reduce of a one-element CPU tensor over the ranks' CPU group, issued with
    ``async_op=True``; every rank must call it at the same point.

    Returns:
        A function that waits for the answer (call it a run later: it has long arrived).
    """
    vector = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    work = dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=_cpu_group(), async_op=True)

    def answer() -> bool:
        work.wait()
        return bool(vector[0] > 0)

    return answer


class RankAgreement:
    """The ranks of one session agreeing, run after run, on stops and on rank 0's clock.

    Every rank must make the same calls in the same order: :meth:`start` at session
    creation, :meth:`receive` then :meth:`send` at the end of every run, :meth:`close` at a
    clean end. The
    tensors are CPU tensors, so reading a result never synchronises the host with a GPU.

    Args:
        group: the process group of the session's ranks; ``None``: every rank of
            ``torch.distributed`` (through a gloo group when the default backend is not gloo).
    """

    def __init__(self, group: Any = None) -> None:
        self._group = _cpu_group() if group is None else group
        self._is_rank_zero = dist.get_rank() == 0
        self._pending: Optional[Tuple[Any, torch.Tensor]] = None

    def _vector(self, stop: bool, now: float) -> torch.Tensor:
        # element 0: any rank's stop vote; element 1: rank 0's clock (the others give -inf)
        return torch.tensor(
            [1.0 if stop else 0.0, now if self._is_rank_zero else -math.inf],
            dtype=torch.float64,
        )

    def start(self, now: float, finished: bool = False) -> Tuple[bool, float]:
        """Agree at session creation on rank 0's clock and on a finished job; blocking, once.

        Args:
            now: this rank's clock (only rank 0's is used).
            finished: whether this rank's hooks find the job finished.

        Returns:
            ``(any rank finds the job finished, rank 0's clock)``.
        """
        vector = self._vector(finished, now)
        dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=self._group)
        return bool(vector[0] > 0), float(vector[1])

    def receive(self) -> Optional[Tuple[bool, float]]:
        """What the ranks agreed on at the previous run, or ``None`` before the first vote.

        Returns:
            ``(any rank asked to stop, rank 0's clock)``.
        """
        if self._pending is None:
            return None
        work, vector = self._pending
        self._pending = None
        work.wait()  # issued a whole run ago: already complete unless a rank lags behind
        return bool(vector[0] > 0), float(vector[1])

    def send(self, stop: bool, now: float) -> None:
        """Send this run's vote without waiting; :meth:`receive` reads it at the next run.

        Args:
            stop: whether a hook of this rank asked to stop in this run.
            now: this rank's clock (only rank 0's is used).
        """
        vector = self._vector(stop, now)
        work = dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, vector)

    def any(self, flag: bool) -> bool:
        """Whether any rank's ``flag`` is True; a blocking collective (at a session's end)."""
        vector = self._vector(flag, 0.0)
        dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=self._group)
        return bool(vector[0] > 0)

    def close(self) -> None:
        """Wait for the last vote (every rank sent it), at a clean end of the session."""
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            work.wait()

    def abandon(self) -> None:
        """Forget the last vote without waiting (the session ended by an exception)."""
        self._pending = None
