"""``audit_syncs()``: count device-to-host synchronisations by the hook and phase causing them.

While the context is active, every operation that makes (or, on a CPU, would make on a GPU)
the host wait for the device is counted and attributed to the innermost caller on the Python
stack that is a hook's method (``before_run``, ``after_run``, ``end``...), the evaluation of
the hooks' fetches, the rest of this package (the adapters and the core), or the user's step.

What is counted:

- Without CUDA, Python-level reads of tensor values, through a ``TorchFunctionMode``:
  ``item``, ``tolist``, ``numpy``, ``bool/float/int/index`` of a tensor, copies to the CPU
  (``.cpu()``, ``.to("cpu")``), ``nonzero`` and boolean-mask indexing. Nothing really waits
  on a CPU: they are counted as the operations that wait on a GPU (reads of values that
  ``to_host`` already brought to the host count too, which on a GPU wait on nothing).
- :func:`~lightning_finalops.to_host`, the package's one explicit transfer (one wait).
- On CUDA, every synchronisation torch itself reports (``torch.cuda.set_sync_debug_mode``),
  which includes the ones inside torch, Lightning or torchmetrics code that a hook called.
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

from lightning_finalops.session_run_hook import SessionRunHook

__all__ = [
    "audit_syncs",
    "host_values",
    "note_sync",
    "SyncAudit",
]

logger = logging.getLogger("lightning_finalops")

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_HOOK_METHODS = {"begin", "after_create_session", "before_run", "after_run", "end"}
_READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "cpu",
          "nonzero"}

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
    def __init__(self, audit: SyncAudit) -> None:
        super().__init__()
        self._audit = audit

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _paused:
            pass
        elif name in _READS or (name == "to" and _to_cpu(args, kwargs)) or (
            name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor)
            and args[1].dtype == torch.bool
        ):
            self._audit.record(skip=2)
        return func(*args, **kwargs)


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

    # On CUDA torch reports every real sync; the would-be syncs of a CPU are counted there.
    reads = contextlib.nullcontext() if cuda else _Reads(audit)
    try:
        with reads, warnings.catch_warnings():
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
