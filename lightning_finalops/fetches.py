"""Evaluating fetch structures and applying feeds, without a graph.

A fetch structure is nested ``list``/``tuple``/namedtuple/``Mapping`` whose leaves are a
``torch.Tensor`` (a detached snapshot on its own device), a metric with ``compute()``, a
callable (called; string feeds it accepts are passed as keyword arguments), a ``str`` (a name
looked up in the run's namespaces) or ``None``. Nothing here synchronises the host with a GPU:
:func:`to_host` is the one explicit, batched way to bring values to the host.
"""

from __future__ import annotations

import inspect
import numbers
import types
from collections import defaultdict
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from lightning_finalops.sync_audit import note_sync
from lightning_finalops.validation import describe

__all__ = [
    "accepted_keywords",
    "check_fetches",
    "check_str_feeds_accepted",
    "evaluate",
    "format_path",
    "full_values",
    "is_fetch_leaf",
    "is_metric",
    "is_scalar",
    "LazyNamespace",
    "leaves",
    "map_structure",
    "Namespace",
    "path_keys",
    "path_tag",
    "shares_memory",
    "split_feeds",
    "TensorFeeds",
    "to_host",
]

# A path is a linked tuple (parent, key) so building it per node is cheap; it is only turned
# into text ("final_ops['acc'][1]") when an error is raised.
Path = Tuple[Any, ...]
_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


def format_path(path: Path) -> str:
    """A position as Python would index it: ``final_ops['acc'][1]``."""
    keys = path_keys(path)
    return path_root(path) + "".join(f"[{k!r}]" for k in keys)


def path_tag(path: Path) -> str:
    """A position as a logger tag: ``final_ops/val/acc/1``."""
    return "/".join([path_root(path), *map(str, path_keys(path))])


def path_root(path: Path) -> str:
    """The root name of a position (the argument's name)."""
    while len(path) == 2:
        path = path[0]
    return path[0]


def path_keys(path: Path) -> List[Any]:
    """The keys and indices from the root to a position, root first."""
    keys: List[Any] = []
    while len(path) == 2:
        path, key = path
        keys.append(key)
    keys.reverse()
    return keys


_METRIC_TYPES: Dict[type, bool] = {}


def is_scalar(value: Any) -> bool:
    """Whether ``value`` is one number: a one-element tensor or a real number (not a bool)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_metric(obj: Any) -> bool:
    """Whether ``obj`` is a metric object (an instance with ``compute()``), not a class."""
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


def is_fetch_leaf(obj: Any) -> bool:
    """Whether ``obj`` is a leaf of a fetch structure, not a container to walk into.

    A tensor, a name, ``None``, a metric object and any other callable are leaves (a
    ``MetricCollection`` is a metric, though it holds metrics).
    """
    return obj is None or isinstance(obj, (torch.Tensor, str)) or callable(obj) or is_metric(obj)


def map_structure(
    fn: Callable[[Any, Optional[Path]], Any],
    obj: Any,
    path: Optional[Path] = None,
    is_leaf: Optional[Callable[[Any], bool]] = None,
) -> Any:
    """The one walker over nested structures: ``fn(leaf, path)`` for every leaf, rebuilt.

    Containers are ``Mapping`` (its type kept where it can be rebuilt from a dict:
    ``OrderedDict`` and dict subclasses), namedtuple, ``list`` and ``tuple``; everything
    else, and whatever ``is_leaf`` accepts, is a leaf. Positions are built only when ``path``
    is given (a root such as ``("final_ops",)``): ``format_path`` turns one into text.
    Comprehensions, never generators, run ``fn``: a ``StopIteration`` it raises (end of
    data) escapes as itself.

    Args:
        fn: called as ``fn(leaf, path)``; its result replaces the leaf.
        obj: the structure.
        path: the position of ``obj``, or ``None`` to track none.
        is_leaf: a predicate that stops the walk at a node before its container type is
            considered.

    Returns:
        The structure with every leaf replaced by ``fn``'s result.
    """
    # Tensors first: the most common leaf, and never a container (this runs every step).
    if isinstance(obj, torch.Tensor) or (is_leaf is not None and is_leaf(obj)):
        return fn(obj, path)
    if type(obj) is dict:  # the usual case first, without the Mapping ABC check
        if path is None:  # tensor values inline: one call per leaf, not two
            return {
                k: fn(v, None) if isinstance(v, torch.Tensor)
                else map_structure(fn, v, None, is_leaf)
                for k, v in obj.items()
            }
        return {k: map_structure(fn, v, (path, k), is_leaf) for k, v in obj.items()}
    if isinstance(obj, Mapping):
        return _rebuild_mapping(
            obj,
            {k: map_structure(fn, v, path and (path, k), is_leaf) for k, v in obj.items()},
        )
    if isinstance(obj, (list, tuple)):
        items = [map_structure(fn, v, path and (path, i), is_leaf) for i, v in enumerate(obj)]
        return type(obj)(*items) if _is_namedtuple(obj) else type(obj)(items)
    return fn(obj, path)


def leaves(
    obj: Any, path: Optional[Path] = None, is_leaf: Optional[Callable[[Any], bool]] = None
) -> List[Tuple[Optional[Path], Any]]:
    """``[(path, leaf)]`` of a structure in walk order (:func:`map_structure`'s leaves)."""
    found: List[Tuple[Optional[Path], Any]] = []
    map_structure(lambda leaf, at: found.append((at, leaf)), obj, path, is_leaf)
    return found


def _bad_leaf(obj: Any, path: Path) -> TypeError:
    return TypeError(
        f"{format_path(path)} must be a torch.Tensor, a metric with compute(), a callable, a "
        f"str name, None, or a list/tuple/dict of those; got {describe(obj)}."
    )


def _misfit_callable(obj: Any, path: Path) -> Optional[TypeError]:
    """Why a callable leaf is not a fetch (a class, a module), or ``None`` if it is one."""
    if isinstance(obj, type):
        return TypeError(
            f"{format_path(path)} is the class {obj.__qualname__}, not an instance: fetch "
            f"an instance (e.g. {obj.__name__}()) or a callable returning the value."
        )
    if isinstance(obj, torch.nn.Module) and not is_metric(obj):
        return TypeError(
            f"{format_path(path)} is a module ({type(obj).__name__}), which is not a value: "
            "fetch a tensor of it (model.weight), a metric, or a callable returning the value."
        )
    return None


def _parameters(fn: Callable[..., Any]) -> List[inspect.Parameter]:
    """``fn``'s parameters; none for builtins without a signature (nothing we can see)."""
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


def required_parameters(fn: Callable[..., Any]) -> List[str]:
    """The parameters ``fn`` cannot be called without (no default, not ``*args``/``**kw``)."""
    params = _parameters(fn)
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def _positional_only(fn: Callable[..., Any]) -> List[str]:
    return [p.name for p in _parameters(fn) if p.kind is inspect.Parameter.POSITIONAL_ONLY]


def check_fetches(
    fetches: Any, root: str, str_feeds: Optional[Sequence[str]] = None
) -> None:
    """Raise ``TypeError`` naming the first position of ``fetches`` that is not a valid fetch.

    Args:
        fetches: a fetch structure.
        root: the name of the argument, used as the start of the position (``"final_ops"``).
        str_feeds: when the str feeds of the evaluation are known in advance, their names:
            a callable whose required parameters they do not all supply is rejected too.

    Raises:
        TypeError: a leaf is of a type that cannot be fetched (a class or a module is not
            a value), or a callable needs arguments the feeds do not supply.
    """
    if fetches is None or isinstance(fetches, (torch.Tensor, str)):
        return  # the common lone fetch, without a walk
    for path, leaf in leaves(fetches, (root,), is_fetch_leaf):
        assert path is not None
        if not is_fetch_leaf(leaf):
            raise _bad_leaf(leaf, path)
        if callable(leaf) and not isinstance(leaf, torch.Tensor):
            misfit = _misfit_callable(leaf, path)
            if misfit is not None:
                raise misfit
            if str_feeds is not None and not is_metric(leaf):
                # feeds are passed by keyword: a positional-only parameter is never fed
                missing = [
                    p for p in required_parameters(leaf)
                    if p not in str_feeds or p in _positional_only(leaf)
                ]
                if missing:
                    raise TypeError(
                        f"{format_path(path)} is a callable that needs {missing}, which no "
                        f"str feed supplies (str feeds: {sorted(str_feeds)}): a fetched "
                        "callable is called with no positional arguments."
                    )


def iter_callables(fetches: Any) -> Iterator[Callable[..., Any]]:
    """Yield the callables of a fetch structure (metric objects excluded)."""
    for _, leaf in leaves(fetches, None, is_fetch_leaf):
        if callable(leaf) and not is_metric(leaf) and not isinstance(leaf, torch.Tensor):
            yield leaf


def accepted_keywords(fn: Callable[..., Any], names: Sequence[str]) -> List[str]:
    """The names among ``names`` that ``fn`` accepts as keyword arguments."""
    params = _parameters(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return list(names)
    keywords = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return [name for name in names if name in keywords]


def check_str_feeds_accepted(str_feeds: Mapping[str, Any], *structures: Any) -> None:
    """Raise unless every string feed is accepted by some callable of the run.

    Raises:
        ValueError: a str feed that no callable of ``structures`` accepts.
    """
    if not str_feeds:
        return
    accepted = set()
    for structure in structures:
        for fn in iter_callables(structure):
            accepted.update(accepted_keywords(fn, list(str_feeds)))
    unused = [name for name in str_feeds if name not in accepted]
    if unused:
        raise ValueError(
            f"feed_dict keys {unused} are str feeds, which are passed as keyword arguments to "
            "the callables fetched in the run, but no callable of this run accepts them. "
            "Add the parameter to the step function, or feed a tensor instead."
        )


def _snapshot_leaf(value: Any, path: Optional[Path] = None) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):  # a view of a buffer the step keeps updating
        return value.copy()
    return value


def snapshot(value: Any) -> Any:
    """Detach and copy every tensor of a value (containers kept), leaving it on its device.

    The copy is a device-side ``clone``: asynchronous on CUDA, no host synchronisation, and
    no later in-place update of the source (``optimizer.step()``, ``tensor.add_``) changes
    it: a value recorded from a fetch never changes afterwards.
    """
    if isinstance(value, torch.Tensor):  # the usual step result, without a walk
        return _snapshot_leaf(value)
    return map_structure(_snapshot_leaf, value)


class LazyNamespace:
    """A namespace of names read only when a lookup reaches it.

    Reading some namespaces costs something (Lightning's ``trainer.callback_metrics``
    converts progress-bar values on every read), so they are read only for a name that the
    namespaces before them do not hold.

    Args:
        read: returns the mapping of names when first needed.
    """

    __slots__ = ("_read", "_names")

    def __init__(self, read: Callable[[], Mapping[str, Any]]) -> None:
        self._read = read
        self._names: Optional[Mapping[str, Any]] = None

    def names(self) -> Mapping[str, Any]:
        """The mapping, read on the first call."""
        if self._names is None:
            self._names = self._read()
        return self._names


Namespace = Union[Mapping[str, Any], LazyNamespace]


def evaluate(
    fetches: Any,
    namespaces: Sequence[Namespace] = (),
    str_feeds: Optional[Mapping[str, Any]] = None,
    root: str = "fetches",
) -> Any:
    """Evaluate a fetch structure now and return values of the same structure.

    Args:
        fetches: the fetch structure.
        namespaces: where ``str`` names are looked up, first match wins (the step's returned
            dict, then the session's named values); a :class:`LazyNamespace` is read only
            when a lookup reaches it.
        str_feeds: the run's string feeds, passed to callables that accept them.
        root: the argument's name, used in error messages.

    Returns:
        The evaluated structure: tensors are detached snapshots on their own device.

    Raises:
        TypeError: a leaf cannot be fetched (the message names its position).
        KeyError: a name is in none of the namespaces (the message lists the known names).
    """
    feeds = str_feeds or _EMPTY

    def leaf(obj: Any, path: Optional[Path]) -> Any:
        if obj is None:
            return None
        if isinstance(obj, torch.Tensor):
            return obj.detach().clone()
        if isinstance(obj, str):
            assert path is not None
            return _lookup(obj, namespaces, path)
        if is_metric(obj):
            return snapshot(obj.compute())
        if callable(obj):
            if feeds:
                return snapshot(obj(**{k: feeds[k] for k in accepted_keywords(obj, list(feeds))}))
            return snapshot(obj())
        assert path is not None
        raise _bad_leaf(obj, path)

    return map_structure(leaf, fetches, (root,), is_fetch_leaf)


def _lookup(name: str, namespaces: Sequence[Namespace], path: Path) -> Any:
    for namespace in namespaces:
        names = namespace.names() if isinstance(namespace, LazyNamespace) else namespace
        if name in names:
            value = names[name]
            return snapshot(value.compute() if is_metric(value) else value)
    known = sorted(
        {
            str(k)
            for namespace in namespaces
            for k in (namespace.names() if isinstance(namespace, LazyNamespace) else namespace)
        }
    )
    raise KeyError(
        f"{format_path(path)}: unknown fetch name {name!r}; the names known in this run are "
        f"{known} (the step's returned dict, then the session's named values)."
    )


class TensorFeeds:
    """Tensor feeds of one run: overwrite each tensor in place, then restore it.

    Every value is converted and checked before any tensor is touched. :meth:`apply`
    records each tensor's old value before overwriting it, so a failure part-way leaves
    exactly what :meth:`restore` undoes; :meth:`restore` undoes in reverse order of
    application.

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
            try:
                value = torch.as_tensor(value, dtype=tensor.dtype, device=tensor.device)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(
                    f"{root}: cannot feed {describe(value)} to a tensor of dtype "
                    f"{tensor.dtype} and shape {tuple(tensor.shape)}: feed a number, an array "
                    f"or a tensor ({e})."
                ) from e
            if value.shape != tensor.shape:
                raise ValueError(
                    f"{root}: cannot feed value of shape {tuple(value.shape)} for a tensor of "
                    f"shape {tuple(tensor.shape)}."
                )
            pairs.append((tensor, value))
        self._pairs = pairs
        self._saved: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def apply(self) -> None:
        """Overwrite every fed tensor with its value, keeping the old values to restore."""
        with torch.no_grad():
            for tensor, value in self._pairs:
                self._saved.append((tensor, tensor.detach().clone()))
                tensor.copy_(value)

    def restore(self) -> None:
        """Put back what :meth:`apply` overwrote, last applied first (safe to call again)."""
        with torch.no_grad():
            while self._saved:
                tensor, old = self._saved.pop()
                tensor.copy_(old)


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
        raise TypeError(f"{root} must be a mapping or None, got {describe(feed_dict)}.")
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
                f"the step as a keyword argument); got key {describe(key)}."
            )
    if len(tensors) > 1:
        keys = list(tensors)
        overlapping = [b for i, a in enumerate(keys) for b in keys[i + 1:] if shares_memory(a, b)]
        if overlapping:
            raise RuntimeError(
                f"Same tensor is fed twice in {root} (two keys share memory: a tensor and a "
                f"view of it). Conflict(s): {overlapping}"
            )
    return tensors, names


def _memory_range(tensor: torch.Tensor) -> Optional[Tuple[int, int]]:
    if tensor.numel() == 0:
        return None
    item = tensor.element_size()
    extent = 1 + sum((n - 1) * abs(step) for n, step in zip(tensor.shape, tensor.stride()))
    start = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * item
    return start, start + extent * item


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may overlap in memory (a tensor and a view of it, two views...).

    Conservative for strided views: the ranges each one spans are compared.
    """
    if a is b:
        return True
    if a.device != b.device:
        return False
    range_a, range_b = _memory_range(a), _memory_range(b)
    if range_a is None or range_b is None:
        return False
    return range_a[0] < range_b[1] and range_b[0] < range_a[1]


def full_values(values: Any) -> Any:
    """``values`` with every sharded tensor (DTensor) gathered into its full value.

    ``full_tensor()`` is a collective over the tensor's mesh: every rank must call this at
    the same point. Without a DTensor, ``values`` itself (nothing is walked twice).
    """
    if not any(isinstance(leaf, DTensor) for _, leaf in leaves(values)):
        return values
    return map_structure(
        lambda leaf, _: leaf.full_tensor() if isinstance(leaf, DTensor) else leaf, values
    )


def to_host(values: Any) -> Any:
    """Bring every tensor of a fetched structure to the host in one batched transfer.

    The tensors on each accelerator are packed per dtype on the device, copied with one
    non-blocking copy per dtype into pinned host memory, and the host waits **once** per
    device; then the values are unpacked. Use it instead of one ``.item()`` per value when you
    need the values on the host (to print or log them).

    Args:
        values: a structure as returned by a fetch (nested list/tuple/dict of tensors and
            other values).

    A sharded tensor (DTensor) is gathered first (``full_tensor()``: a collective every
    rank of its mesh must reach, once).

    Returns:
        The same structure with every tensor on the CPU; other leaves are unchanged.
    """
    values = full_values(values)
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = defaultdict(list)
    seen = set()
    found = leaves(values)
    if any(isinstance(leaf, torch.Tensor) for _, leaf in found):
        note_sync()  # the one wait (on a GPU), counted by an audit in progress
    for _, tensor in found:
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.device.type != "cpu"
            and id(tensor) not in seen
        ):
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
    return map_structure(
        lambda leaf, _: replacements.get(id(leaf), leaf) if isinstance(leaf, torch.Tensor)
        else leaf,
        values,
    )
