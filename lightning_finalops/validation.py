"""Argument checks shared by every public constructor: one message style, the argument named.

Each check returns the value in its normalised form (a path as ``str``, an integer scalar of
numpy or torch as ``int``) or raises ``TypeError`` (wrong kind) / ``ValueError`` (right kind,
wrong value) naming the argument, the value given and what was expected.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
import os
from typing import Any, Callable, List, Mapping, Optional, Type, TypeVar

__all__ = [
    "check_bool",
    "check_callable",
    "check_int",
    "check_number",
    "check_path",
    "check_seconds",
    "check_sequence_of",
    "describe",
    "is_int",
]

T = TypeVar("T")


def describe(value: Any) -> str:
    """A value as error messages show it: its type (module-qualified) and a short repr."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{name} ({text})"


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer: ``int``, numpy or torch integer scalars; not a bool."""
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_int(
    value: Any, argument: str, *, minimum: Optional[int] = None, allow_none: bool = False
) -> Optional[int]:
    """``value`` as an ``int``, checked against ``minimum``.

    Raises:
        TypeError: ``value`` is not an integer (bools are not), or ``None`` when not allowed.
        ValueError: ``value`` is below ``minimum``.
    """
    if value is None and allow_none:
        return None
    if not is_int(value):
        expected = "an int" + (" or None" if allow_none else "")
        raise TypeError(f"{argument} must be {expected}, got {describe(value)}.")
    result = int(value)
    if minimum is not None and result < minimum:
        raise ValueError(f"{argument} must be an int >= {minimum}, got {result}.")
    return result


def check_bool(value: Any, argument: str, *, allow_none: bool = False) -> Optional[bool]:
    """``value`` itself, checked to be a ``bool`` (numpy and torch bools are not, nor ``"no"``).

    Raises:
        TypeError: ``value`` is not a ``bool``, or ``None`` when not allowed.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        expected = "a bool" + (" or None" if allow_none else "")
        raise TypeError(f"{argument} must be {expected}, got {describe(value)}.")
    return value


def check_number(value: Any, argument: str, *, allow_none: bool = False) -> Optional[float]:
    """``value`` as a real number (not a bool).

    Raises:
        TypeError: ``value`` is not a real number, or ``None`` when not allowed.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a number" + (" or None" if allow_none else "")
        raise TypeError(f"{argument} must be {expected}, got {describe(value)}.")
    return value  # type: ignore[return-value]


def check_seconds(
    value: Any, argument: str, *, allow_none: bool = False, allow_zero: bool = False
) -> Optional[float]:
    """``value`` as a finite number of seconds > 0 (>= 0 with ``allow_zero``; not a bool).

    Raises:
        TypeError: ``value`` is not a real number, or ``None`` when not allowed.
        ValueError: ``value`` is not finite, or below the minimum.
    """
    seconds = check_number(value, argument, allow_none=allow_none)
    if seconds is not None and not (
        math.isfinite(seconds) and (seconds >= 0 if allow_zero else seconds > 0)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{argument} must be a finite number of seconds {bound}, got {value!r}.")
    return seconds


def check_path(
    value: Any, argument: str, *, allow_none: bool = False, allow_empty: bool = False
) -> Optional[str]:
    """``value`` as a ``str`` path (``os.PathLike`` of ``str`` accepted).

    Raises:
        TypeError: ``value`` is not a str or ``os.PathLike`` of str (bytes are not), or
            ``None`` when not allowed.
        ValueError: ``value`` is empty and ``allow_empty`` is false.
    """
    if value is None and allow_none:
        return None
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        expected = "a str or os.PathLike path" + (" or None" if allow_none else "")
        raise TypeError(f"{argument} must be {expected}, got {describe(value)}.")
    if not path and not allow_empty:
        raise ValueError(f"{argument} must be a non-empty path, got {value!r}.")
    return path


def check_sequence_of(items: Any, kind: Type[T], argument: str) -> List[T]:
    """``items`` (a list, tuple or other iterable; ``None`` for none) as a list of ``kind``.

    Raises:
        TypeError: ``items`` is a lone ``kind``, a str, a mapping or not iterable, or an item
            is not a ``kind`` (the message names its position).
    """
    if items is None:
        return []
    if isinstance(items, (kind, str, bytes, Mapping)) or not hasattr(items, "__iter__"):
        raise TypeError(
            f"{argument} must be a list of {kind.__name__}, got {type(items).__name__}."
        )
    checked = list(items)
    for i, item in enumerate(checked):
        if not isinstance(item, kind):
            raise TypeError(
                f"{argument}[{i}] must be a {kind.__name__}, got {describe(item)}."
            )
    return checked


def check_callable(
    fn: Any, argument: str, expected: str, positional: int
) -> Optional[Callable[..., Any]]:
    """``fn`` if it is ``None`` or a callable that takes ``positional`` positional arguments.

    Args:
        fn: the value given.
        argument: its name, for the message.
        expected: how it is called, for the message (``"saver(session, path)"``).
        positional: how many positional arguments it is called with.

    Returns:
        ``fn``.

    Raises:
        TypeError: ``fn`` is not callable, or its signature cannot take those arguments.
    """
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"{argument} must be None or a callable {expected}, got {describe(fn)}.")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: called as it is
        return fn
    try:
        signature.bind(*range(positional))
    except TypeError as e:
        raise TypeError(
            f"{argument} must be a callable {expected}, called with {positional} positional "
            f"argument{'s' if positional != 1 else ''}; {describe(fn)} has the signature "
            f"{signature} ({e})."
        ) from None
    return fn
