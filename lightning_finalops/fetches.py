"""Evaluating fetch structures and applying feeds, without a graph.

A fetch structure is nested ``list``/``tuple``/namedtuple/``Mapping`` whose leaves are a
``torch.Tensor`` (a detached snapshot on its own device), a metric with ``compute()``, a
callable (called; string feeds it accepts are passed as keyword arguments), a ``str`` (a name
looked up in the run's namespaces) or ``None``. Nothing here synchronises the host with a GPU:
:func:`to_host` is the one explicit, batched way to bring values to the host.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["to_host"]

# A path is a linked tuple (parent, key) so building it per node is cheap; it is only turned
# into text ("final_ops['acc'][1]") when an error is raised.
_Path = Tuple[Any, ...]
_EMPTY: Mapping[str, Any] = {}


def _format_path(path: _Path) -> str:
    keys: List[Any] = []
    while len(path) == 2:
        path, key = path
        keys.append(key)
    (root,) = path
    return root + "".join(f"[{k!r}]" for k in reversed(keys))


_METRIC_TYPES: Dict[type, bool] = {}


def _is_metric(obj: Any) -> bool:
    # Cached per type: this runs for every leaf of every fetch, on the step's hot path.
    kind = type(obj)
    known = _METRIC_TYPES.get(kind)
    if known is None:
        known = _METRIC_TYPES[kind] = not issubclass(kind, type) and callable(
            getattr(kind, "compute", None)
        )
    return known


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _rebuild_mapping(template: Mapping[Any, Any], items: Dict[Any, Any]) -> Mapping[Any, Any]:
    if type(template) is dict:
        return items
    try:
        return type(template)(items)  # OrderedDict, custom dict subclasses
    except TypeError:  # e.g. defaultdict, read-only mappings
        return items


def _describe(obj: Any) -> str:
    text = repr(obj)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(obj).__name__} ({text})"


def _bad_leaf(obj: Any, path: _Path) -> TypeError:
    return TypeError(
        f"{_format_path(path)} must be a torch.Tensor, a metric with compute(), a callable, a "
        f"str name, None, or a list/tuple/dict of those; got {_describe(obj)}."
    )


def check_fetches(fetches: Any, root: str) -> None:
    """Raise ``TypeError`` naming the first position of ``fetches`` that is not a valid fetch.

    Args:
        fetches: a fetch structure.
        root: the name of the argument, used as the start of the position (``"final_ops"``).

    Raises:
        TypeError: a leaf is of a type that cannot be fetched.
    """
    _check(fetches, (root,))


def _check(obj: Any, path: _Path) -> None:
    if obj is None or isinstance(obj, (torch.Tensor, str)) or callable(obj) or _is_metric(obj):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _check(value, (path, key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check(value, (path, i))
    else:
        raise _bad_leaf(obj, path)


def iter_callables(fetches: Any) -> Iterator[Callable[..., Any]]:
    """Yield the callables of a fetch structure (metric objects excluded)."""
    if isinstance(fetches, (torch.Tensor, str)) or fetches is None or _is_metric(fetches):
        return
    if callable(fetches):
        yield fetches
    elif isinstance(fetches, Mapping):
        for value in fetches.values():
            yield from iter_callables(value)
    elif isinstance(fetches, (list, tuple)):
        for value in fetches:
            yield from iter_callables(value)


def accepted_keywords(fn: Callable[..., Any], names: Sequence[str]) -> List[str]:
    """The names among ``names`` that ``fn`` accepts as keyword arguments."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature accept nothing we can see
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return list(names)
    keywords = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return [name for name in names if name in keywords]


def snapshot(value: Any) -> Any:
    """Detach and copy every tensor of a value (containers kept), leaving it on its device.

    The copy is a device-side ``clone``: asynchronous on CUDA, no host synchronisation, and a
    later in-place update of the source (``optimizer.step()``) does not change it. A tensor
    that autograd just computed (it has a ``grad_fn`` and is not a view) belongs to nobody
    else, so it is only detached: this keeps the step's returned loss free of an extra copy.
    """
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None and not value._is_view():
            return value.detach()
        return value.detach().clone()
    if type(value) is dict:  # the usual step result, without the Mapping ABC check
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, Mapping):
        return _rebuild_mapping(value, {k: snapshot(v) for k, v in value.items()})
    if _is_namedtuple(value):
        return type(value)(*(snapshot(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


def evaluate(
    fetches: Any,
    namespaces: Sequence[Mapping[str, Any]] = (),
    str_feeds: Optional[Mapping[str, Any]] = None,
    root: str = "fetches",
) -> Any:
    """Evaluate a fetch structure now and return values of the same structure.

    Args:
        fetches: the fetch structure.
        namespaces: where ``str`` names are looked up, first match wins (the step's returned
            dict, then the session's named values).
        str_feeds: the run's string feeds, passed to callables that accept them.
        root: the argument's name, used in error messages.

    Returns:
        The evaluated structure: tensors are detached snapshots on their own device.

    Raises:
        TypeError: a leaf cannot be fetched (the message names its position).
        KeyError: a name is in none of the namespaces (the message lists the known names).
    """
    return _evaluate(fetches, namespaces, str_feeds or _EMPTY, (root,))


def _evaluate(obj: Any, namespaces: Sequence[Mapping[str, Any]], feeds: Mapping[str, Any],
              path: _Path) -> Any:
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, str):
        return _lookup(obj, namespaces, path)
    if _is_metric(obj):
        return snapshot(obj.compute())
    if callable(obj):
        if feeds:
            return snapshot(obj(**{k: feeds[k] for k in accepted_keywords(obj, list(feeds))}))
        return snapshot(obj())
    if isinstance(obj, Mapping):
        return _rebuild_mapping(
            obj, {k: _evaluate(v, namespaces, feeds, (path, k)) for k, v in obj.items()}
        )
    if isinstance(obj, (list, tuple)):
        # A list comprehension, not a generator: user code runs here, and a StopIteration it
        # raises (end of data) must escape as itself, not as PEP 479's RuntimeError.
        items = [_evaluate(v, namespaces, feeds, (path, i)) for i, v in enumerate(obj)]
        return type(obj)(*items) if _is_namedtuple(obj) else type(obj)(items)
    raise _bad_leaf(obj, path)


def _lookup(name: str, namespaces: Sequence[Mapping[str, Any]], path: _Path) -> Any:
    for namespace in namespaces:
        if name in namespace:
            value = namespace[name]
            return snapshot(value.compute() if _is_metric(value) else value)
    known = sorted({str(k) for namespace in namespaces for k in namespace})
    raise KeyError(
        f"{_format_path(path)}: unknown fetch name {name!r}; the names known in this run are "
        f"{known} (the step's returned dict, then the session's named values)."
    )


class TensorFeeds:
    """Tensor feeds of one run: overwrite each tensor in place, then restore it.

    Args:
        feeds: ``{tensor: value}``; each value is converted to the tensor's dtype and device
            and must have the tensor's shape.
        root: the argument's name, used in error messages.

    Raises:
        ValueError: a value's shape differs from its tensor's shape.
    """

    __slots__ = ("_pairs", "_saved")

    def __init__(self, feeds: Mapping[torch.Tensor, Any], root: str = "feed_dict") -> None:
        pairs = []
        for tensor, value in feeds.items():
            value = torch.as_tensor(value, dtype=tensor.dtype, device=tensor.device)
            if value.shape != tensor.shape:
                raise ValueError(
                    f"{root}: cannot feed value of shape {tuple(value.shape)} for a tensor of "
                    f"shape {tuple(tensor.shape)}."
                )
            pairs.append((tensor, value))
        self._pairs = pairs
        self._saved: List[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def apply(self) -> None:
        """Overwrite every fed tensor with its value, keeping the old values to restore."""
        with torch.no_grad():
            for tensor, value in self._pairs:
                self._saved.append(tensor.detach().clone())
                tensor.copy_(value)

    def restore(self) -> None:
        """Put back the values that :meth:`apply` overwrote (safe to call more than once)."""
        with torch.no_grad():
            for (tensor, _), old in zip(self._pairs, self._saved):
                tensor.copy_(old)
        self._saved = []


def split_feeds(
    feed_dict: Optional[Mapping[Any, Any]], root: str
) -> Tuple[Dict[torch.Tensor, Any], Dict[str, Any]]:
    """Split a feed dict into tensor feeds and string feeds, checking key types.

    Raises:
        TypeError: ``feed_dict`` is not a mapping, or a key is neither a tensor nor a str.
    """
    if not feed_dict:
        return {}, {}
    if not isinstance(feed_dict, Mapping):
        raise TypeError(f"{root} must be a mapping or None, got {_describe(feed_dict)}.")
    tensors: Dict[torch.Tensor, Any] = {}
    names: Dict[str, Any] = {}
    for key, value in feed_dict.items():
        if isinstance(key, torch.Tensor):
            tensors[key] = value
        elif isinstance(key, str):
            names[key] = value
        else:
            raise TypeError(
                f"{root} keys must be torch.Tensor (overridden for one run) or str (passed to "
                f"the step as a keyword argument); got key {_describe(key)}."
            )
    return tensors, names


def _leaves(structure: Any) -> Iterator[torch.Tensor]:
    if isinstance(structure, torch.Tensor):
        yield structure
    elif isinstance(structure, Mapping):
        for value in structure.values():
            yield from _leaves(value)
    elif isinstance(structure, (list, tuple)):
        for value in structure:
            yield from _leaves(value)


def _replace_tensors(structure: Any, replacements: Dict[int, torch.Tensor]) -> Any:
    if isinstance(structure, torch.Tensor):
        return replacements.get(id(structure), structure)
    if isinstance(structure, Mapping):
        return _rebuild_mapping(
            structure, {k: _replace_tensors(v, replacements) for k, v in structure.items()}
        )
    if _is_namedtuple(structure):
        return type(structure)(*(_replace_tensors(v, replacements) for v in structure))
    if isinstance(structure, (list, tuple)):
        return type(structure)(_replace_tensors(v, replacements) for v in structure)
    return structure


def to_host(values: Any) -> Any:
    """Bring every tensor of a fetched structure to the host in one batched transfer.

    The tensors on each accelerator are packed per dtype on the device, copied with one
    non-blocking copy per dtype into pinned host memory, and the host waits **once** per
    device; then the values are unpacked. Use it instead of one ``.item()`` per value when you
    need the values on the host (to print or log them).

    Args:
        values: a structure as returned by a fetch (nested list/tuple/dict of tensors and
            other values).

    Returns:
        The same structure with every tensor on the CPU; other leaves are unchanged.
    """
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = defaultdict(list)
    seen = set()
    for tensor in _leaves(values):
        if tensor.device.type != "cpu" and id(tensor) not in seen:
            seen.add(id(tensor))
            groups[(tensor.device, tensor.dtype)].append(tensor)
    if not groups:
        return values
    staged = []
    events = {}
    for (device, dtype), tensors in groups.items():
        if device.type == "cuda":
            with torch.cuda.device(device):
                flat = torch.cat([t.detach().reshape(-1) for t in tensors])
                host = torch.empty(flat.shape, dtype=dtype, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                events[device] = event
        else:  # other accelerators: one synchronous copy per dtype
            host = torch.cat([t.detach().reshape(-1) for t in tensors]).cpu()
        staged.append((tensors, host))
    for event in events.values():
        event.synchronize()  # the one wait per device
    replacements: Dict[int, torch.Tensor] = {}
    for tensors, host in staged:
        offset = 0
        for tensor in tensors:
            n = tensor.numel()
            replacements[id(tensor)] = host[offset : offset + n].view(tensor.shape)
            offset += n
    return _replace_tensors(values, replacements)
