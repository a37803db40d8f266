"""Agreement across ranks: one small non-blocking all-reduce per run, never a GPU sync.

Every decision that must be the same on every rank of a session (a stop, a time trigger, a
value a hook declared, a rank leaving or failing) goes through :class:`RankAgreement`: at
the end of each run every rank contributes one small CPU float64 vector to one all-reduce
on the library's own gloo group, issued without waiting (``async_op=True``) and read at the
end of the next run, when it has long completed. So every rank applies the same decision at
the same global step, one run after the request, and no rank waits for another on a step
where nothing was decided. A session whose hooks declare nothing to agree on issues no
collective at all.
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import time
import weakref
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from lightning_finalops.sync_audit import host_values

__all__ = [
    "DEPARTURES",
    "EXITED",
    "FAILED",
    "LEFT",
    "RUNNING",
    "AgreementError",
    "AgreementTimeoutError",
    "RankAgreement",
    "RankFailedError",
    "Vote",
    "agreed_time",
    "agreement_group",
    "rank_failed",
    "broadcast_from_rank_zero",
    "is_rank_zero",
    "local_clock",
    "set_agreed_time",
    "set_local_clock",
    "world_size",
]

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


def broadcast_from_rank_zero(value: Any, timeout: float = 300.0,
                             what: str = "a value") -> Any:
    """Rank 0's ``value`` on every rank: a blocking collective on the library's own group.

    With one process (or without ``torch.distributed``), ``value`` itself.

    Args:
        value: what rank 0 sends (picklable); the other ranks' is ignored.
        timeout: seconds to wait for every rank.
        what: what is sent, as the error names it.

    Raises:
        AgreementTimeoutError: a rank did not join within ``timeout`` seconds.
    """
    if world_size() <= 1:
        return value
    box = [value]
    try:
        dist.broadcast_object_list(box, src=0, group=agreement_group(timeout))
    except RuntimeError as e:
        rank = dist.get_rank()
        raise AgreementTimeoutError(
            f"lightning_finalops: rank {rank} waited in vain for {what} from rank 0: a rank "
            f"killed, hung or far behind (timeout={timeout:g} s; {e})", [], -1,
        ) from e
    return box[0]


# -- the agreement of a session's ranks ------------------------------------------------------
#: What a rank's status slot says: still running, or why it left the session.
RUNNING, LEFT, FAILED, EXITED = 0, 1, 2, 3
#: Why a rank left, as the other ranks' warning says it.
DEPARTURES = {
    LEFT: "ended its session (its data ran out, a stop of its own, a break or close())",
    FAILED: "failed",
    EXITED: "exited without closing its session",
}
# The vote's first slots: any rank's stop request, rank 0's clock (summed with the others'
# zeros), a flag summed over ranks (a finished job at creation, a changed state at the end),
# any rank preempted; then one status slot per rank; then the hooks' declared values.
_STOP, _CLOCK, _FLAG, _PREEMPTED, _HEADER = 0, 1, 2, 3, 4
# (timeout, purpose) -> weak references to (the default group it was made for, the
# library's own gloo group)
_AGREEMENT_GROUPS: Dict[Tuple[float, str], Tuple[Any, Any]] = {}
_sessions = itertools.count()
# Agreements still open, so that an interpreter exit leaves them with a message.
_OPEN: weakref.WeakSet[RankAgreement] = weakref.WeakSet()


class AgreementError(RuntimeError):
    """The ranks of a session could not agree: a rank did not answer in time, or failed."""


class AgreementTimeoutError(AgreementError, TimeoutError):
    """Ranks of a session did not answer its agreement within ``agreement_timeout``.

    Attributes:
        ranks: the ranks that did not answer (empty when the store could not tell).
        global_step: this rank's global step when it gave up waiting.
    """

    def __init__(self, message: str, ranks: List[int], global_step: int) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.global_step = global_step


class RankFailedError(AgreementError):
    """Another rank of the session failed: this rank stops at the agreed run and raises this.

    Attributes:
        failures: ``{rank: "ExceptionType: message"}`` of every rank that failed.
        global_step: this rank's global step when the failure was agreed.
    """

    def __init__(self, message: str, failures: Dict[int, str], global_step: int) -> None:
        super().__init__(message)
        self.failures = failures
        self.global_step = global_step


def rank_failed(name: str, failures: Dict[int, str], step: int,
                detail: str = "") -> RankFailedError:
    """The error a rank raises when other ranks of the session ``name`` failed.

    Args:
        name: the session, as errors name it.
        failures: ``{rank: "ExceptionType: message"}`` of the ranks that failed.
        step: this rank's global step.
        detail: appended to the message (what this rank ran, or not).
    """
    failed = "; ".join(f"rank {r} failed with {text}" for r, text in failures.items())
    return RankFailedError(
        f"lightning_finalops: {failed}. {name} stops on this rank too, at global step "
        f"{step}{detail}.", dict(failures), step,
    )


class Vote(NamedTuple):
    """What the ranks of a session agreed in one vote."""

    stop: bool  # a rank asked to stop
    clock: float  # rank 0's clock
    flags: int  # ranks that set the vote's flag
    preempted: bool  # a rank received SIGTERM
    departed: Dict[int, int]  # rank -> LEFT / FAILED / EXITED
    failures: Dict[int, str]  # rank -> "ExceptionType: message" of a failed rank (the store's)
    values: Tuple[float, ...]  # the declared values, summed over ranks


def agreement_group(timeout: float, purpose: str = "agreement") -> Any:
    """The library's own gloo group (never the user's, never paired with their collectives).

    Created by every rank at the same point (a session's creation, its first checkpoint),
    once per default group, timeout and purpose; its collectives fail after ``timeout``
    seconds instead of gloo's 30 minutes.

    Args:
        timeout: seconds any of its collectives may wait.
        purpose: ``"agreement"`` (the votes, in the loop's thread) or ``"checkpoint"``
            (checkpoint saves, which may run in a background thread: never one group for
            collectives of two threads).
    """
    world = dist.group.WORLD
    entry = _AGREEMENT_GROUPS.get((timeout, purpose))
    group = entry[1]() if entry is not None and entry[0]() is world else None
    if group is None:  # none yet, or the default group was destroyed and made anew
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        # weak references: torch.distributed owns its groups, and frees them when
        # destroy_process_group() destroys them, not at interpreter exit (gloo may abort)
        _AGREEMENT_GROUPS[(timeout, purpose)] = (weakref.ref(world), weakref.ref(group))
    return group


def _store() -> Any:
    """The default group's store (where ranks leave what no collective can carry), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - an init method without a store: texts do not travel
        return None


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 2000 else text[:2000] + "..."


class RankAgreement:
    """The ranks of one session agreeing, run after run, with no blocking wait per run.

    Every rank makes the same calls in the same order: :meth:`start` at session creation,
    :meth:`receive` then :meth:`send` at the end of every run, :meth:`leave` when it leaves
    the session (a clean end, an exception). A vote is one small CPU float64 vector summed
    with one all-reduce on the library's own gloo group, issued without waiting and read a
    run later. A rank that leaves says so in its next vote instead of going silent, so the
    others stop at the run that reads it; a rank that fails first leaves its exception's
    text in the store, where the others read it. After a vote that says a rank left, no rank
    issues another collective on the group. Every wait is bounded by ``timeout`` and fails
    with a :class:`RankFailedError` when a rank left a failure in the store, else an
    :class:`AgreementTimeoutError` naming the session, the step and the ranks that did not
    answer.

    Args:
        values: how many values the session's hooks declared (summed over ranks).
        timeout: seconds any wait of the agreement may last.
        name: the session, as errors name it.
    """

    def __init__(self, values: int = 0, *, timeout: float = 300.0,
                 name: str = "the session") -> None:
        self._group = agreement_group(timeout)
        self._timeout = datetime.timedelta(seconds=timeout)
        self._seconds = timeout
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.name = name
        self._values = values
        self._template = [0.0] * (_HEADER + self.world + values)
        self._pending: Optional[Tuple[Any, torch.Tensor]] = None
        self._votes = 0  # votes sent: numbers the store keys of a timeout
        self._id = next(_sessions)  # the same on every rank: sessions are made in one order
        self._prefix = f"lightning_finalops/agreement/{self._id}/"
        #: no further collective: a rank left or failed, or a wait failed
        self.done = False
        _OPEN.add(self)

    # -- one vote --------------------------------------------------------------------------
    def _issue(self, stop: bool, now: float, flag: bool = False, status: int = RUNNING,
               preempted: bool = False, values: Sequence[float] = (),
               template: Optional[List[float]] = None) -> Tuple[Any, torch.Tensor]:
        row = (self._template if template is None else template).copy()
        if stop:
            row[_STOP] = 1.0
        if self.rank == 0:
            row[_CLOCK] = now
        if flag:
            row[_FLAG] = 1.0
        if preempted:
            row[_PREEMPTED] = 1.0
        if status:
            row[_HEADER + self.rank] = float(status)
        if values:
            row[_HEADER + self.world:] = values
        vector = torch.tensor(row, dtype=torch.float64)
        self._votes += 1
        return dist.all_reduce(vector, group=self._group, async_op=True), vector

    def _wait(self, work: Any, vector: torch.Tensor, step: int,
              seconds: Optional[float] = None) -> Vote:
        timeout = self._timeout if seconds is None else datetime.timedelta(seconds=seconds)
        try:
            work.wait(timeout=timeout)
        except RuntimeError as e:  # a timeout, or a peer gone (killed: connection closed)
            self._close()
            failures = self._failures(range(self.world))
            if failures:  # a rank that failed and exited before the others read its vote
                raise rank_failed(self.name, failures, step) from e
            missing = self._unanswered()
            raise AgreementTimeoutError(
                f"lightning_finalops: {self.name} on rank {self.rank}, at global step {step}: "
                + (f"rank(s) {missing} did not answer" if missing else "the other ranks did "
                   "not all answer") + " its agreement: killed, hung, far behind, or its "
                "hooks declare other things to agree on "
                f"(agreement_timeout={self._seconds:g} s; {e})",
                missing, step,
            ) from e
        return self._read(vector)

    def _read(self, vector: torch.Tensor) -> Vote:
        with host_values():  # a CPU vector by design: reading it waits for no device
            row = vector.tolist()
        statuses = row[_HEADER:_HEADER + self.world]
        departed = {r: int(s) for r, s in enumerate(statuses) if s}
        failures: Dict[int, str] = {}
        if departed:
            self._close()
            failed = [r for r, s in departed.items() if s == FAILED]
            if failed:
                failures = self._failures(failed, missing="(its message did not arrive)")
        return Vote(row[_STOP] > 0, row[_CLOCK], int(round(row[_FLAG])), row[_PREEMPTED] > 0,
                    departed, failures, tuple(row[_HEADER + self.world:]))

    def _failures(self, ranks: Any, missing: Optional[str] = None) -> Dict[int, str]:
        """The failure texts ranks left in the store (``missing`` for one that left none)."""
        store = _store()
        found: Dict[int, str] = {}
        for rank in sorted(ranks):
            key = f"{self._prefix}failed/{rank}"
            try:
                if store is not None and store.check([key]):
                    found[rank] = store.get(key).decode("utf-8", "replace")
                    continue
            except Exception:  # noqa: BLE001 - the store's host may be gone
                pass
            if missing is not None:
                found[rank] = missing
        return found

    def _unanswered(self) -> List[int]:
        """Ranks that did not reach this vote: each rank that gave up says so in the store."""
        store = _store()
        if store is None:
            return []
        try:
            prefix = f"{self._prefix}{self._votes}/"
            store.set(prefix + str(self.rank), "1")
            deadline = time.monotonic() + min(10.0, self._seconds)
            missing = [r for r in range(self.world) if r != self.rank]
            while missing and time.monotonic() < deadline:
                missing = [r for r in missing if not store.check([prefix + str(r)])]
                time.sleep(0.1)
            return missing
        except Exception:  # noqa: BLE001 - best effort: the error says what it knows
            return []

    def close(self) -> None:
        """Stop agreeing without a collective: every rank closes at the same point."""
        self._close()

    def _close(self) -> None:
        self.done = True
        self._pending = None
        self._group = None  # torch.distributed owns it (see agreement_group)
        _OPEN.discard(self)

    # -- the protocol ------------------------------------------------------------------------
    def start(self, step: int, now: float, finished: bool = False) -> Vote:
        """The first vote, at session creation, waited for: the clock and a finished job.

        It also checks that every rank declared as many values.

        Args:
            step: this rank's global step (for errors).
            now: this rank's clock (only rank 0's is used).
            finished: whether this rank's hooks find the job finished.

        Returns:
            The vote: ``flags`` counts the ranks that find the job finished.

        Raises:
            ValueError: the ranks' hooks declare different numbers of values.
            AgreementTimeoutError: a rank did not answer within the timeout.
        """
        template = [0.0] * (_HEADER + self.world + 1)  # one value: this rank's layout
        work, vector = self._issue(False, now, flag=finished, values=[float(self._values)],
                                   template=template)
        vote = self._wait(work, vector, step)
        if vote.values[0] != self.world * self._values:
            self._close()
            raise ValueError(
                f"lightning_finalops: the ranks of {self.name} declare different values to "
                f"agree on ({self._values} on rank {self.rank}, {vote.values[0]:g} on all "
                "ranks together): every rank must run the same hooks."
            )
        return vote

    def receive(self, step: int) -> Optional[Vote]:
        """The previous run's vote (issued a run ago), or ``None`` when none is pending.

        Args:
            step: this rank's global step (for errors).

        Raises:
            RankFailedError: a rank failed and exited before this vote completed.
            AgreementTimeoutError: a rank did not send it within the timeout.
        """
        if self._pending is None:
            return None
        work, vector = self._pending
        self._pending = None
        return self._wait(work, vector, step)

    def send(self, stop: bool, now: float, preempted: bool = False,
             values: Sequence[float] = (), failed: bool = False) -> None:
        """Issue this run's vote without waiting; :meth:`receive` reads it at the next run.

        Args:
            stop: whether this rank asks every rank to stop.
            now: this rank's clock (only rank 0's is used).
            preempted: whether this rank received SIGTERM.
            values: this rank's posts to the declared values, in declaration order.
            failed: this rank failed (its text already in the store: :meth:`post_failure`)
                and raises once every rank read this vote.
        """
        self._pending = self._issue(stop, now, preempted=preempted, values=values,
                                    status=FAILED if failed else RUNNING)

    def post_failure(self, error: BaseException) -> None:
        """Leave this rank's failure (type and text) in the store, for the others to read."""
        store = _store()
        if store is not None:
            try:
                store.set(f"{self._prefix}failed/{self.rank}", _describe(error))
            except Exception:  # noqa: BLE001 - the others then name no exception
                pass

    def leave(self, step: int, why: int, *, flag: bool = False, preempted: bool = False,
              error: Optional[BaseException] = None,
              grace: Optional[float] = None) -> Optional[Vote]:
        """Leave the session with a message in the next vote, and wait for that vote.

        The vote pending from the last run is read first: if it already says a rank left,
        nothing more is sent (no rank sends after such a vote).

        Args:
            step: this rank's global step.
            why: :data:`LEFT`, :data:`FAILED` or :data:`EXITED`.
            flag: this rank's flag for the vote (a checkpoint to rewrite).
            preempted: whether this rank received SIGTERM.
            error: the exception this rank fails with (left in the store first).
            grace: wait at most this many seconds for the others (a failing rank: they
                may be inside a collective of their own that this rank no longer joins).

        Returns:
            The last vote read: the pending one when it ended the agreement, else the
            departure vote; ``None`` when the agreement was already done.
        """
        if self.done:
            return None
        if error is not None:
            self.post_failure(error)
        seconds = None if grace is None else min(grace, self._seconds)
        if self._pending is not None:
            work, vector = self._pending
            self._pending = None
            last = self._wait(work, vector, step, seconds)
            if self.done:
                return last
        work, vector = self._issue(False, 0.0, flag=flag, status=why, preempted=preempted)
        return self._wait(work, vector, step, seconds)


@atexit.register
def _leave_at_exit() -> None:
    """An interpreter exit with a session still open tells the other ranks (no hang)."""
    for agreement in sorted(_OPEN, key=lambda a: a._id):
        try:
            if dist.is_initialized():
                agreement.leave(-1, EXITED)
        except Exception:  # noqa: BLE001 - exiting anyway; the others time out at worst
            pass
