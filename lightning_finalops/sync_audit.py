"""``audit_syncs()``: count device-to-host synchronisations by the hook and phase causing them.

While the context is active, every operation that makes (or, on a CPU, would make on a GPU)
the host wait for the device is counted and attributed to the innermost caller on the Python
stack that is a hook's method (``before_run``, ``after_run``, ``end``...), the evaluation of
the hooks' fetches, the rest of this package (the adapters and the core), or the user's step.

What is counted:

- Without CUDA, the operators that make a host wait for a GPU, seen where torch dispatches
  them (a ``TorchDispatchMode``), so also inside torch, Lightning or torchmetrics code a hook
  calls: :data:`SYNCING_OPERATORS` (``_local_scalar_dense``: ``item()``, ``float/int/bool``
  of a tensor, ``torch.allclose`` on CUDA; ``nonzero`` and what is built on it, one-argument
  ``torch.where``; ``equal``, ``allclose``, ``is_nonzero``; ``unique``; ``masked_select``;
  boolean-mask ``index``/``index_put``; ``repeat_interleave`` with a tensor of repeats and no
  ``output_size``), plus the host reads that never reach the dispatcher, caught where Python
  calls them (:data:`HOST_READS`: ``tolist``, ``numpy``, ``.cpu()``/``.to("cpu")``,
  ``repr``/``str``/formatting of a tensor). Each is what the PyTorch docs list as
  synchronising (``torch.cuda.set_sync_debug_mode``, and the "synchronizes" notes of
  ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave``). Nothing really waits on
  a CPU: they are counted as what would wait on a GPU (reads of values that ``to_host``
  already brought to the host, inside :func:`host_values`, are not).
- :func:`~lightning_finalops.to_host`, the package's one explicit transfer (one wait).
- On CUDA, every synchronisation torch itself reports (``torch.cuda.set_sync_debug_mode``),
  which includes the ones inside torch, Lightning or torchmetrics code that a hook called.

Each sync is charged to the innermost hook method on the stack, else to the evaluation of
the hooks' fetches, else to the user's step when the package called it (``run_step``, a
run's fetches, an evaluation step) or when no frame of the package is on the stack, else to
the package itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections import Counter
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_finalops.session_run_hook import SessionRunHook

__all__ = [
    "HOST_READS",
    "SYNCING_OPERATORS",
    "audit_syncs",
    "host_values",
    "note_sync",
    "SyncAudit",
]

logger = logging.getLogger("lightning_finalops")

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_HOOK_METHODS = {"begin", "after_create_session", "before_run", "after_run", "end"}
#: Host reads that never reach torch's dispatcher: counted where Python calls them.
HOST_READS = frozenset({"tolist", "numpy", "cpu", "__repr__", "__format__"})
#: ATen operators that make the host wait for a device (always, or with the arguments
#: :func:`_syncs` checks).
SYNCING_OPERATORS = frozenset({
    "_local_scalar_dense", "nonzero", "nonzero_static", "equal", "allclose", "is_nonzero",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
    "index", "index_put", "index_put_", "_index_put_impl_", "repeat_interleave",
})
# The package's frames that call the user's step: a sync below one is the user's.
_STEP_SITES = {"run_step", "_evaluate_fetches", "run_evaluation"}

# The audit in progress (one at a time per process): to_host reports to it.
_active: Optional[SyncAudit] = None
_SYNC_WARNING = "called a synchronizing CUDA operation"
_paused = False


def _where(frame: Any) -> Tuple[str, str]:
    """(who, phase) of a sync: the innermost hook method, fetch evaluation, package, or user."""
    in_package = None
    while frame is not None:
        code = frame.f_code
        owner = frame.f_locals.get("self")
        if code.co_name in _HOOK_METHODS and isinstance(owner, SessionRunHook):
            return type(owner).__name__, code.co_name
        if code.co_name == "_evaluate_hook_fetches":
            return "hooks' fetches", "fetch evaluation"
        if in_package is None and code.co_filename.startswith(_PACKAGE) and \
                not code.co_filename.endswith("sync_audit.py"):
            if code.co_name in _STEP_SITES:  # the package called the user's step
                return "user code", "step"
            in_package = code.co_name
        frame = frame.f_back
    if in_package is not None:
        return "lightning_finalops", in_package
    return "user code", "step"


class SyncAudit:
    """The counts of one :func:`audit_syncs` context.

    Attributes:
        counts: ``{(who, phase): number of syncs}``; ``who`` is a hook's class name,
            ``"hooks' fetches"``, ``"lightning_finalops"`` (adapters and core) or
            ``"user code"``.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def record(self, skip: int = 1) -> None:
        """Count one sync, attributed from the caller's stack."""
        self.counts[_where(sys._getframe(skip))] += 1

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
        if _paused or not (name in HOST_READS or (name == "to" and _to_cpu(args, kwargs))):
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
        if not _paused and _syncs(func, args, kwargs):
            self._audit.record(skip=2)
        return func(*args, **kwargs)


def _syncs(func: Any, args: Any, kwargs: Dict[str, Any]) -> bool:
    name = func.overloadpacket.__name__
    if name not in SYNCING_OPERATORS:
        return False
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices or ())
    if name == "repeat_interleave":  # a tensor of repeats, no output size: its sum is read
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and not kwargs:
            repeats = args[0]  # repeat_interleave(repeats) alone
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return True


def _to_cpu(args: Any, kwargs: Dict[str, Any]) -> bool:
    device = kwargs.get("device", args[1] if len(args) > 1 else None)
    return (isinstance(device, str) and device.startswith("cpu")) or (
        isinstance(device, torch.device) and device.type == "cpu"
    )


@contextlib.contextmanager
def host_values() -> Iterator[None]:
    """Reads inside are of values already on the host (pinned copies): never counted."""
    global _paused
    paused, _paused = _paused, True
    try:
        yield
    finally:
        _paused = paused


def note_sync() -> None:
    """Count one sync in the audit in progress, if any (``to_host`` calls it)."""
    if _active is not None:
        _active.record(skip=2)


@contextlib.contextmanager
def audit_syncs(log: bool = True) -> Iterator[SyncAudit]:
    """Count the device-to-host synchronisations made inside the block, by hook and phase.

    ```python
    with audit_syncs() as audit:
        trainer.fit(model)            # or a MonitoredSession loop
    print(audit.table())
    assert audit.of("NanTensorHook", "after_run") == trainer.global_step  # one per run
    ```

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
    _active = audit
    cuda = torch.cuda.is_available()
    previous_mode = torch.cuda.get_sync_debug_mode() if cuda else 0
    show = warnings.showwarning

    def counting_show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if _SYNC_WARNING in str(message):  # torch's sync debug warning
            audit.record(skip=2)
            return
        show(message, category, *args, **kwargs)

    # On CUDA torch reports every real sync; the would-be syncs of a CPU are counted here.
    reads = contextlib.nullcontext() if cuda else _Reads(audit)
    syncs = contextlib.nullcontext() if cuda else _Syncs(audit)
    try:
        with reads, syncs, warnings.catch_warnings():
            if cuda:
                # every sync warning, each time; the user's other filters stay as they are
                warnings.filterwarnings("always", message=".*" + re.escape(_SYNC_WARNING))
                warnings.showwarning = counting_show
                torch.cuda.set_sync_debug_mode("warn")
            yield audit
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous_mode)
        _active = None
        if log:
            logger.info("Device-to-host synchronisations:\n%s", audit.table())
