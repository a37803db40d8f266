"""Hook lists and hook state: which hooks a session runs, and their state under unique keys.

A stateful hook (one that overrides :meth:`SessionRunHook.state_dict`) is saved under its
:attr:`~SessionRunHook.state_key`. Keys identify hooks, never positions: two distinct
stateful hooks with one key in one session are refused when the session is built, so a
resume can never hand one hook's state to another.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from lightning_finalops.session_run_hook import SessionRunHook
from lightning_finalops.validation import check_sequence_of

__all__ = [
    "check_hooks",
    "has_state",
    "latest_results",
    "new_results",
    "hook_state_dict",
    "hook_state_keys",
    "load_hook_state_dict",
    "state_digest",
]


def check_hooks(hooks: Any, argument: str) -> Tuple[SessionRunHook, ...]:
    """Return ``hooks`` as a tuple after checking every item is a distinct hook.

    Raises:
        TypeError: ``hooks`` is not an iterable of hooks (the message names the position).
        ValueError: one hook object is listed twice (it would run twice per call).
    """
    checked = tuple(check_sequence_of(hooks, SessionRunHook, argument))
    first: Dict[int, int] = {}
    for i, hook in enumerate(checked):
        j = first.setdefault(id(hook), i)
        if j != i:
            raise ValueError(
                f"{argument}[{i}] is the same {type(hook).__name__} object as {argument}[{j}]: "
                "it would run twice at every call. List it once."
            )
    return checked


def latest_results(hooks: Sequence[SessionRunHook]) -> List[Any]:
    """Each hook's :meth:`~SessionRunHook.latest_results` now (to tell new entries later)."""
    return [hook.latest_results() for hook in hooks]


def new_results(hooks: Sequence[SessionRunHook], before: Sequence[Any]) -> List[Tuple[int, Any]]:
    """``(index, (global_step, results))`` of each hook that recorded results since ``before``.

    ``before`` is what :func:`latest_results` returned for the same hooks; an entry is new
    when it is another object (each session's entry is a new one).
    """
    found = []
    for i, (hook, previous) in enumerate(zip(hooks, before)):
        latest = hook.latest_results()
        if latest is not None and latest is not previous:
            found.append((i, latest))
    return found


def has_state(hook: SessionRunHook) -> bool:
    """Whether ``hook`` overrides :meth:`SessionRunHook.state_dict` (the base is stateless)."""
    return type(hook).state_dict is not SessionRunHook.state_dict


def _stateful(hooks: Sequence[SessionRunHook]) -> Dict[str, SessionRunHook]:
    """``{state_key: hook}`` of the distinct stateful hooks of ``hooks``, in list order.

    A hook listed twice (in a training and an evaluation list) has one state.

    Raises:
        TypeError: a ``state_key`` is not a non-empty str.
        ValueError: two distinct stateful hooks have the same key (both are named).
    """
    by_key: Dict[str, SessionRunHook] = {}
    for hook in hooks:
        if not has_state(hook):
            continue
        key = hook.state_key
        if not isinstance(key, str) or not key:
            raise TypeError(
                f"{type(hook).__name__}.state_key must be a non-empty str, got {key!r}."
            )
        other = by_key.setdefault(key, hook)
        if other is not hook:
            raise ValueError(
                f"Two stateful hooks have the state key {key!r}: {other!r} and {hook!r}. "
                "A checkpoint could not tell their states apart; give them distinct keys "
                "(name= on FinalOpsHook, InMemoryEvaluatorHook and HookCallback, or a "
                "state_key of your own)."
            )
    return by_key


def hook_state_keys(hooks: Sequence[SessionRunHook]) -> List[str]:
    """The keys of the distinct stateful hooks of ``hooks``, in list order.

    Raises:
        ValueError: two distinct stateful hooks share a key.
    """
    return list(_stateful(hooks))


def hook_state_dict(hooks: Sequence[SessionRunHook]) -> Dict[str, Dict[str, Any]]:
    """``{key: state}`` of the distinct stateful hooks of ``hooks``; both adapters use it.

    Stateless hooks have no key, so adding, removing or moving one never changes the keys.
    """
    return {key: hook.state_dict() for key, hook in _stateful(hooks).items()}


def _is_empty(state: Any) -> bool:
    # what the base class's state_dict() returns; anything else is state to keep
    return isinstance(state, Mapping) and len(state) == 0


def load_hook_state_dict(
    hooks: Sequence[SessionRunHook], state: Any, strict: bool = True
) -> None:
    """Give each stateful hook of ``hooks`` what :func:`hook_state_dict` saved under its key.

    A hook without saved state keeps its own (it was added since the save); saved empty
    states match anything.

    Raises:
        TypeError: ``state`` is not a mapping.
        ValueError: with ``strict``, a saved non-empty state has no hook to go to (it would
            be lost).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"hook state must be a mapping, got {type(state).__name__}.")
    stateful = _stateful(hooks)
    if strict:
        unexpected = sorted(
            key for key, value in state.items() if key not in stateful and not _is_empty(value)
        )
        if unexpected:
            raise ValueError(
                "The saved hook state does not match the session's hooks: saved state of "
                f"{unexpected} has no hook here (the session's stateful hooks: "
                f"{list(stateful)}). Keys are each stateful hook's state_key; build the "
                "session with the same hooks, or pass strict=False to drop that state."
            )
    for key, hook in stateful.items():
        if key in state:
            hook.load_state_dict(state[key])




def state_digest(state: Any) -> bytes:
    """A digest of ``state``'s values (tensors by value): equal digests, equal states.

    A state that cannot be pickled has a digest of its own each time (never "unchanged").
    """
    try:
        return hashlib.sha256(pickle.dumps(state, protocol=4)).digest()
    except Exception:  # noqa: BLE001 - not picklable: count it as changed
        return os.urandom(32)
