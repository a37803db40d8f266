"""``audit_syncs()``: count device-to-host synchronisations by the hook and phase causing them.

While the context is active, every operation that makes (or, on a CPU, would make on a GPU)
the host wait for the device is counted, in the auditing thread and the threads started inside
the audit, and charged to what the session's core says it is running: a hook's method
(``begin``, ``after_create_session``, ``before_run``, ``after_run``, ``end``), the
evaluation of the hooks' fetches, or the user's step (the step, a run's own fetches, an
evaluation's step). A sync inside torch, Lightning or torchmetrics code called from one of
these is charged to it. Outside them a sync is the package's own bookkeeping when this
package's code is running, else the user's. A thread started inside the audit is charged to
what started it.

What is counted, once per operation:

- The ATen operators that make the host wait for a device, seen where torch dispatches them
  (a ``TorchDispatchMode``, so also inside code a hook calls): :data:`SYNCING_OPERATORS`,
  each with its source in ``_WHY``. The operators whose result's value or shape is read
  on the host are the ones PyTorch itself tags ``data_dependent_output`` or
  ``dynamic_output_shape``; ``equal``, ``allclose`` and ``is_nonzero`` read one bool; a
  copy from a device to the host waits for it (``non_blocking`` copies do not).
- The host reads that never reach the dispatcher, counted where Python calls them
  (:data:`HOST_READS`: ``tolist``, ``numpy``, ``.cpu()``/``.to("cpu")``, ``repr``/``str``/
  formatting of a tensor): on a CPU tensor they dispatch nothing, on a GPU they wait.
- :func:`~lightning_finalops.to_host`, the package's one explicit transfer (one wait).
- When CUDA is initialised as the audit starts, the operators of CUDA tensors are counted
  from torch's own report instead (``torch.cuda.set_sync_debug_mode("warn")``), which also
  sees syncs the lists above do not (a blocking copy to the device). The audit never
  initialises CUDA itself.

``one_hot`` (tagged too) reaches the dispatcher as the reads it makes: on a CPU its range
checks count two ``_local_scalar_dense``, which CUDA's kernel skips unless ``num_classes``
is -1.

Not counted: reads of values ``to_host`` already brought to the host (inside
:func:`host_values`); collectives of ``torch.distributed`` (they wait for other ranks, not for
this device; torch's debug mode does not cover them either); on a CPU, copies from the host
to a device (there is none); anything in a thread that was already running when the audit
started (the dispatcher's modes are per thread), or after it ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
import weakref
from collections import Counter
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "HOOK_FETCHES",
    "HOST_READS",
    "SYNCING_OPERATORS",
    "SyncAudit",
    "USER",
    "active",
    "audit_syncs",
    "charged",
    "charging",
    "host_values",
    "note_sync",
]

logger = logging.getLogger("lightning_finalops")

_PACKAGE_PREFIX = os.path.dirname(os.path.abspath(__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)
Where = Tuple[str, str]
#: (who, phase) of the user's own code: the step, its fetches, an evaluation's step.
USER: Where = ("user code", "step")
#: (who, phase) of the evaluation of the hooks' fetches.
HOOK_FETCHES: Where = ("hooks' fetches", "fetch evaluation")

#: Host reads that never reach torch's dispatcher: counted where Python calls them.
HOST_READS = frozenset({"tolist", "numpy", "cpu", "__repr__", "__format__"})
# Why each counted operator makes the host wait, and the source that says so.
_TAGGED = "PyTorch tags it torch.Tag.{} (the host reads the result to size or return it)"
_WHY: Dict[str, str] = {
    "_local_scalar_dense": _TAGGED.format("data_dependent_output") + "; item(), float(), "
    "int(), bool() and formatting of one value; torch.cuda.set_sync_debug_mode warns on it",
    "nonzero": _TAGGED.format("dynamic_output_shape") + "; torch.nonzero's docs: 'When "
    "input is on CUDA, this function causes host-device synchronization' (also one-argument "
    "torch.where, argwhere)",
    "masked_select": _TAGGED.format("dynamic_output_shape"),
    "_unique": _TAGGED.format("dynamic_output_shape"),
    "_unique2": _TAGGED.format("dynamic_output_shape") + " (torch.unique)",
    "unique_dim": _TAGGED.format("dynamic_output_shape"),
    "unique_consecutive": _TAGGED.format("dynamic_output_shape"),
    "bincount": _TAGGED.format("dynamic_output_shape") + " (its length is the input's max)",
    "index": _TAGGED.format("dynamic_output_shape") + ", with a boolean mask (nonzero)",
    "index_put": "a boolean-mask assignment: the mask goes through nonzero",
    "index_put_": "a boolean-mask assignment: the mask goes through nonzero",
    "_index_put_impl_": "a boolean-mask assignment: the mask goes through nonzero",
    "repeat_interleave": _TAGGED.format("dynamic_output_shape") + ", with a tensor of "
    "repeats and no output_size (its docs: output_size 'will avoid stream synchronization')",
    "equal": "reads one bool (CUDA's kernel ends in .item())",
    "allclose": "reads one bool (.all().item())",
    "is_nonzero": "reads one value (bool(tensor))",
    "_to_copy": "a blocking copy from a device to the host",
    "copy_": "a blocking copy from a device into a host tensor",
}
#: ATen operators that make the host wait for a device (always, or with the arguments
#: :func:`_syncs` checks); why each does: ``_WHY``.
SYNCING_OPERATORS = frozenset(_WHY)

# The audit in progress (one at a time per process).
_active: Optional[SyncAudit] = None
_SYNC_WARNING = "called a synchronizing CUDA operation"


class _ThreadState(threading.local):
    """Per thread: what the core says runs, reads already paid for, a count in progress."""

    charge: Optional[Where] = None
    paused = False  # inside host_values(), or inside an operation already counted
    counting = False  # this thread's syncs count (the audit's thread, or one it started)


_state = _ThreadState()


def _where(frame: Any) -> Where:
    """(who, phase) of a sync: the core's charge, else the package's code, else the user."""
    charge = _state.charge
    if charge is not None:
        return charge
    while frame is not None:  # no charge: whose code is running decides package or user
        filename = frame.f_code.co_filename
        if filename.startswith(_PACKAGE_PREFIX) and filename != _THIS_FILE:
            return "lightning_finalops", frame.f_code.co_name
        frame = frame.f_back
    return USER


class _Charged:
    """``fn`` whose syncs are charged to ``where`` (the core wraps hook methods in it).

    ``__wrapped__`` makes ``inspect.signature`` see ``fn``'s own parameters (the str feeds a
    step accepts are read from them).
    """

    __slots__ = ("fn", "where", "__wrapped__")

    def __init__(self, fn: Callable[..., Any], where: Where) -> None:
        self.fn = fn
        self.where = where
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = _state
        before, state.charge = state.charge, self.where
        try:
            return self.fn(*args, **kwargs)
        finally:
            state.charge = before


def charged(fn: Callable[..., Any], who: str, phase: str) -> Callable[..., Any]:
    """``fn``, charging its syncs to ``(who, phase)`` while an audit is active.

    The core calls what it runs through this: without an audit it is ``fn`` itself (nothing
    added to a run); the session rebuilds its calls when an audit starts or ends.
    """
    return fn if _active is None else _Charged(fn, (who, phase))


@contextlib.contextmanager
def charging(who: str, phase: str) -> Iterator[None]:
    """Charge the syncs of the block to ``(who, phase)`` (for calls off the per-run path)."""
    state = _state
    before, state.charge = state.charge, (who, phase)
    try:
        yield
    finally:
        state.charge = before


def active() -> Optional[SyncAudit]:
    """The audit in progress, or None."""
    return _active


class SyncAudit:
    """The counts of one :func:`audit_syncs` context.

    Attributes:
        counts: ``{(who, phase): number of syncs}``; ``who`` is a hook's class name,
            ``"hooks' fetches"``, ``"lightning_finalops"`` (adapters and core) or
            ``"user code"``.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._lock = threading.Lock()  # threads count together
        #: torch's CUDA sync debug mode reports the syncs of device tensors in this audit
        self.cuda_reports = False
        self._threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()

    def record(self, skip: int = 1) -> None:
        """Count one sync, charged to what runs in this thread (see the module's rules)."""
        where = _where(sys._getframe(skip))
        with self._lock:
            self.counts[where] += 1

    def of(self, who: str, phase: Optional[str] = None) -> int:
        """Syncs attributed to ``who`` (in ``phase``, or in every phase)."""
        return sum(n for (w, p), n in self.counts.items()
                   if w == who and (phase is None or p == phase))

    def table(self) -> str:
        """The counts as a text table, most first."""
        rows = sorted(self.counts.items(), key=lambda item: -item[1])
        lines = [f"{'where':<28}{'phase':<24}{'syncs':>8}"]
        lines += [f"{who:<28}{phase:<24}{n:>8}" for (who, phase), n in rows]
        return "\n".join(lines)


class _Reads(TorchFunctionMode):
    """The host reads that never reach the dispatcher (:data:`HOST_READS`)."""

    def __init__(self, audit: SyncAudit) -> None:
        super().__init__()
        self._audit = audit

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (_state.paused or _active is not self._audit
                or not (name in HOST_READS or (name == "to" and _to_cpu(args, kwargs)))):
            return func(*args, **kwargs)
        self._audit.record(skip=2)
        with host_values():  # one read: what it dispatches inside is not counted again
            return func(*args, **kwargs)


class _Syncs(TorchDispatchMode):
    """The ATen operators that make the host wait (:data:`SYNCING_OPERATORS`)."""

    def __init__(self, audit: SyncAudit) -> None:
        super().__init__()
        self._audit = audit

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        audit = self._audit
        if (not _state.paused and _active is audit and _syncs(func, args, kwargs)
                and not (audit.cuda_reports and _on_a_device(args))):
            # (on a device, torch's own report counts it: its warning reaches Python after
            # this call returns, where a count made here could not tell it apart)
            audit.record(skip=2)
        return func(*args, **kwargs)


def _is_bool(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _syncs(func: Any, args: Any, kwargs: Dict[str, Any]) -> bool:
    name = func.overloadpacket.__name__
    if name not in SYNCING_OPERATORS:
        return False
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(_is_bool(i) for i in indices or ())
    if name == "repeat_interleave":  # a tensor of repeats, no output size: its sum is read
        if kwargs.get("output_size") is not None:
            return False
        # (self, repeats, ...) or, for repeat_interleave(repeats) alone, (repeats,)
        repeats = args[1] if len(args) > 1 else args[0] if args else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor)
    if name == "_to_copy":  # device to host, blocking
        device = kwargs.get("device")
        return (_on_device(args[0]) and device is not None and torch.device(device).type
                == "cpu" and not kwargs.get("non_blocking", False))
    if name == "copy_":
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return blocking and args[0].device.type == "cpu" and _on_device(args[1])
    return True


def _on_device(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type not in ("cpu", "meta")


def _on_a_device(args: Any) -> bool:
    """Whether a tensor among ``args`` (or in a list of them, as indices) is on a device."""
    return any(_on_device(a) or (isinstance(a, (list, tuple)) and any(map(_on_device, a)))
               for a in args)


def _to_cpu(args: Any, kwargs: Dict[str, Any]) -> bool:
    if kwargs.get("non_blocking", False):
        return False  # a copy that does not wait (to_host counts its one wait itself)
    device = kwargs.get("device", args[1] if len(args) > 1 else None)
    return (isinstance(device, str) and device.startswith("cpu")) or (
        isinstance(device, torch.device) and device.type == "cpu"
    )


@contextlib.contextmanager
def host_values() -> Iterator[None]:
    """Reads inside are of values already on the host (pinned copies): never counted.

    A counted host read runs inside it too, so what it does inside is not counted again.
    """
    state = _state
    paused, state.paused = state.paused, True
    try:
        yield
    finally:
        state.paused = paused


def note_sync() -> None:
    """Count one sync in the audit in progress, if any (``to_host`` calls it)."""
    audit = _active
    if audit is not None and not _state.paused:
        audit.record(skip=2)


@contextlib.contextmanager
def _counting(audit: SyncAudit) -> Iterator[None]:
    """Count this thread's syncs into ``audit`` (the dispatcher's modes are per thread)."""
    counting, _state.counting = _state.counting, True
    try:
        with _Reads(audit), _Syncs(audit):
            yield
    finally:
        _state.counting = counting


_thread_start = threading.Thread.start


def _start_counted(thread: threading.Thread) -> None:
    """``Thread.start`` during an audit: the thread counts too, charged to its starter."""
    audit = _active
    if audit is not None:
        where = _where(sys._getframe(1))
        run = thread.run

        def counted_run() -> None:
            _state.charge = where
            if _active is not audit:  # the audit ended before the thread ran
                return run()
            with _counting(audit):
                return run()

        thread.run = counted_run  # type: ignore[method-assign]
        audit._threads.add(thread)
    _thread_start(thread)


@contextlib.contextmanager
def audit_syncs(log: bool = True) -> Iterator[SyncAudit]:
    """Count the device-to-host synchronisations made inside the block, by hook and phase.

    ```python
    with audit_syncs() as audit:
        trainer.fit(model)            # or a MonitoredSession loop
    print(audit.table())
    assert audit.of("NanTensorHook", "after_run") == runs  # its one flag per run
    ```

    Threads started inside the block count too (``threading.Thread.start`` is wrapped while
    the block runs), charged to what started them.

    Args:
        log: log the table at INFO on the ``lightning_finalops`` logger at the end.

    Yields:
        The :class:`SyncAudit` being filled.

    Raises:
        RuntimeError: an audit is already in progress.
    """
    global _active
    if _active is not None:
        raise RuntimeError("audit_syncs() is already active; audits do not nest.")
    audit = SyncAudit()
    # CUDA's own report only where CUDA is in use already: the audit never initialises it.
    cuda = torch.cuda.is_initialized()
    show = warnings.showwarning

    def counting_show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if _SYNC_WARNING not in str(message):
            show(message, category, *args, **kwargs)
        elif _state.counting and not _state.paused:  # not a read counted where it was made
            audit.record(skip=2)

    audit.cuda_reports = cuda
    _active = audit
    threading.Thread.start = _start_counted  # type: ignore[method-assign]
    previous_mode = torch.cuda.get_sync_debug_mode() if cuda else 0
    try:
        with _counting(audit), warnings.catch_warnings():
            if cuda:
                # every sync warning, each time; the user's other filters stay as they are
                warnings.filterwarnings("always", message=".*" + re.escape(_SYNC_WARNING))
                warnings.showwarning = counting_show
                torch.cuda.set_sync_debug_mode("warn")
            yield audit
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous_mode)
        threading.Thread.start = _thread_start  # type: ignore[method-assign]
        _active = None
        running = [t.name for t in list(audit._threads) if t.is_alive()]
        if running:
            logger.warning("audit_syncs: %d thread(s) it started still run (%s): their syncs "
                           "from now on are not counted.", len(running), ", ".join(running))
        if log:
            logger.info("Device-to-host synchronisations:\n%s", audit.table())
