"""Checkpoint files: ``<basename>-<global_step>``, written atomically, found by step.

A checkpoint is first written to a temporary file in the same directory, flushed to disk, then
renamed over its final name: a crash mid-write leaves a stray ``.tmp`` file, never a
truncated checkpoint under a valid name.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
from torch.distributed.tensor import DTensor

from lightning_finalops.validation import check_path

__all__ = [
    "SESSION_FILE",
    "commit",
    "holds_sharded_tensors",
    "check_basename",
    "atomic_torch_save",
    "atomic_write",
    "check_checkpoint_dir",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_latest",
    "remove_stray_temporaries",
]

logger = logging.getLogger("lightning_finalops")

#: The file of a sharded checkpoint directory that holds the global step and hook state
#: (written by the chief, beside every rank's shards, last before the directory's rename).
SESSION_FILE = "session.pt"


def holds_sharded_tensors(modules: Iterable[torch.nn.Module]) -> bool:
    """Whether a parameter or buffer of ``modules`` is sharded (a DTensor: FSDP2, TP)."""
    return any(isinstance(t, DTensor) for module in modules
               for t in (*module.parameters(), *module.buffers()))


def checkpoint_path(checkpoint_dir: str, basename: str, global_step: int) -> str:
    """The path of the checkpoint of ``global_step``: ``<dir>/<basename>-<global_step>``."""
    return os.path.join(checkpoint_dir, f"{basename}-{int(global_step)}")


def list_checkpoints(checkpoint_dir: str, basename: str = "model.ckpt") -> List[Tuple[int, str]]:
    """``(global_step, path)`` of every checkpoint in ``checkpoint_dir``, oldest step first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    pattern = re.compile(re.escape(basename) + r"-(\d+)")
    found = []
    for name in os.listdir(checkpoint_dir):
        match = pattern.fullmatch(name)
        if match:
            found.append((int(match.group(1)), os.path.join(checkpoint_dir, name)))
    return sorted(found)


def check_basename(value: Any, argument: str = "checkpoint_basename") -> str:
    """``value`` as a checkpoint base name: a non-empty file name without a directory.

    Raises:
        TypeError: ``value`` is not a str.
        ValueError: it is empty or holds a path separator.
    """
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, got {type(value).__name__}.")
    if not value or os.sep in value or (os.altsep and os.altsep in value):
        raise ValueError(
            f"{argument} must be a non-empty file name without a directory, got {value!r}."
        )
    return value


def check_checkpoint_dir(value: Any, argument: str = "checkpoint_dir") -> str:
    """``value`` as a directory path, which may not exist yet but is not a file.

    Raises:
        TypeError: ``value`` is not a str or ``os.PathLike`` path.
        ValueError: ``value`` is empty, or names a file (a checkpoint rather than its
            directory, say).
    """
    path = check_path(value, argument)
    assert path is not None
    if os.path.isfile(path):
        raise ValueError(
            f"{argument} must be a directory, but {path!r} is a file: pass the directory "
            "that holds the checkpoints (they are <checkpoint_basename>-<global step>)."
        )
    return path


# What loading a truncated or overwritten file raises (torch's zip reader: RuntimeError).
_CORRUPT = (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


def load_latest(
    checkpoint_dir: str, basename: str, load: Callable[[str], Any]
) -> Optional[Tuple[str, Any]]:
    """``(path, load(path))`` of the newest checkpoint that loads, or ``None`` if there is none.

    A checkpoint that fails to load (truncated, corrupt) is skipped with a warning naming
    it, and the next older one is tried: a crash while writing never loses the run.

    Raises:
        RuntimeError: checkpoints exist but none of them loads (each one is named).
    """
    failures = []
    for _, path in reversed(list_checkpoints(checkpoint_dir, basename)):
        try:
            return path, load(path)
        except _CORRUPT as e:  # not OSError: a file that cannot be read now is no fallback
            logger.warning("Skipping checkpoint %s, which cannot be loaded (%r); trying the "
                           "previous one.", path, e)
            failures.append(f"{path}: {e!r}")
    if failures:
        raise RuntimeError("No checkpoint in " + checkpoint_dir + " can be loaded: "
                           + "; ".join(failures))
    return None


_STRAY = re.compile(r"-\d+\..*tmp")


def remove_stray_temporaries(checkpoint_dir: str, basename: str, keep: str = "") -> List[str]:
    """Remove what a save that crashed left behind: ``<basename>-<step>.*tmp`` files.

    Args:
        checkpoint_dir: the directory of the checkpoints.
        basename: the checkpoints' base name.
        keep: a temporary name not to remove (one being written now).

    Returns:
        The paths removed.
    """
    if not os.path.isdir(checkpoint_dir):
        return []
    removed = []
    for name in os.listdir(checkpoint_dir):
        if not name.startswith(basename) or not _STRAY.fullmatch(name[len(basename):]):
            continue
        path = os.path.join(checkpoint_dir, name)
        if path == keep:
            continue
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    if removed:
        logger.warning("Removed %d temporary file(s) of an interrupted checkpoint save: %s",
                       len(removed), removed)
    return removed


def latest_checkpoint(checkpoint_dir: str, basename: str = "model.ckpt") -> Optional[str]:
    """The path of the checkpoint with the highest global step, or ``None`` if there is none."""
    found = list_checkpoints(checkpoint_dir, basename)
    return found[-1][1] if found else None


def atomic_write(path: str, write: Callable[[str], Any], tmp: Optional[str] = None) -> None:
    """Call ``write(tmp)``, then move the finished file (or directory) to ``path`` in one rename.

    A file is flushed to disk before the rename. A directory (what sharded checkpoints
    write) replaces an earlier one of the same name.

    Args:
        path: the final name.
        write: writes a file or a directory at the path it is given.
        tmp: the temporary name, in ``path``'s directory; by default a fresh unique file.
            Give one when several processes must write to the same temporary name.

    Raises:
        Exception: whatever ``write`` raised; the temporary file is removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if tmp is None:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                   dir=directory)
        os.close(fd)
    try:
        write(tmp)
        commit(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def commit(tmp: str, path: str) -> None:
    """Move a finished file or directory ``tmp`` to ``path`` in one rename, durably.

    A file is flushed to disk first. A directory replacing an earlier one of the same name
    moves that one aside first (a directory cannot be renamed over a full one), so the
    name never holds a partial checkpoint, and is removed after.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(tmp):
        if os.path.isdir(path):  # a rewrite: the old one moves aside
            old = path + ".old.tmp"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            _fsync_directory(directory)
            return
    else:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (where the platform allows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
