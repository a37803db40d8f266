"""``MonitoredSession``: TensorFlow's session-hook semantics for hand-written PyTorch loops."""

from __future__ import annotations

import copy
import inspect
import io
import logging
import os
import types
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from lightning_finalops.checkpoints import (
    SESSION_FILE,
    atomic_torch_save,
    atomic_write,
    check_basename,
    check_checkpoint_dir,
    commit,
    holds_sharded_tensors,
    load_latest,
)
from lightning_finalops.distributed import (
    RankAgreement,
    agreement_group,
    broadcast_from_rank_zero,
    is_rank_zero,
    world_size,
)
from lightning_finalops.engine import Engine, completed_future
from lightning_finalops.fetches import (
    check_fetches,
    evaluate,
    format_path,
    is_metric,
    leaves,
    map_structure,
)
from lightning_finalops.hook_state import hook_state_keys
from lightning_finalops.hooked_session import HookedSession
from lightning_finalops.session_run_hook import (
    Coordinator,
    RawSession,
    RunOptions,
    SessionRunHook,
)
from lightning_finalops.sync_audit import USER, charging
from lightning_finalops.validation import check_bool

__all__ = ["MonitoredSession", "StepContext", "check_fabric", "named_objects"]

logger = logging.getLogger("lightning_finalops")

# What a plain loop's step usually is: never a metric, always called as the run's step.
_STEP_TYPES = (types.FunctionType, types.MethodType)


def named_objects(objects: Any, argument: str, kind: type) -> Dict[str, Any]:
    """``{name: object}`` for one object, a mapping of them, or a list of them."""
    if objects is None:
        return {}
    if isinstance(objects, kind):
        return {argument.rstrip("s"): objects}
    if isinstance(objects, Mapping):
        items = dict(objects)
    elif isinstance(objects, (list, tuple)):
        items = {str(i): obj for i, obj in enumerate(objects)}
    else:
        raise TypeError(
            f"{argument} must be a {kind.__name__}, a dict or a list of them, or None; "
            f"got {type(objects).__name__}."
        )
    for name, obj in items.items():
        if not isinstance(obj, kind):
            raise TypeError(
                f"{argument}[{name!r}] must be a {kind.__name__}, got {type(obj).__name__}."
            )
    return items


def check_fabric(fabric: Any) -> Any:
    """``fabric`` if it is ``None`` or a launched Lightning ``Fabric``.

    Raises:
        TypeError: it is something else (named).
    """
    if fabric is not None and not all(
        hasattr(fabric, name) for name in ("save", "load", "barrier", "is_global_zero")
    ):
        raise TypeError(
            "fabric must be a launched lightning.fabric.Fabric or None, got "
            f"{type(fabric).__name__}."
        )
    return fabric


def _checked(checkpoint: Any, path: str) -> Any:
    """``checkpoint`` if it is what this library writes, else a ``TypeError`` naming ``path``.

    A file another program wrote under a checkpoint's name loads; restoring it would fail
    later with a bare ``KeyError``, or start fresh beside it.
    """
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("session"), Mapping):
        return checkpoint
    if isinstance(checkpoint, Mapping) and "pytorch-lightning_version" in checkpoint:
        what = ("a Lightning checkpoint (HookCallback's CheckpointSaverHook writes those): "
                "resume it with trainer.fit(model, ckpt_path=...)")
    else:
        keys = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, Mapping) else None
        what = f"a {type(checkpoint).__name__}" + (f" with keys {keys}" if keys else "")
    raise TypeError(
        f"{path} is named like a checkpoint but holds {what}, not a MonitoredSession "
        "checkpoint (a dict with a 'session' entry, written by CheckpointSaverHook). Move it "
        "out of checkpoint_dir or pass another checkpoint_basename."
    )


class _PlainEngine(Engine):
    """The engine of a :class:`MonitoredSession`: the hooks' raw session in a plain loop.

    Names in its fetches resolve against the dict returned by the latest run (a plain loop
    names nothing else). Under ``torchrun`` (``torch.distributed`` initialized before the
    session is built) the ranks agree on stops and time, only the chief writes checkpoints,
    and every rank restores the checkpoint rank 0 chose.
    """

    hook_attributes = ("modules", "fabric")

    def __init__(self, modules: Any, optimizers: Any,
                 session_state: Callable[[], Dict[str, Any]],
                 is_chief: Optional[bool] = None, fabric: Any = None,
                 across_ranks: Optional[bool] = None,
                 checkpoint_format: Optional[str] = None, timeout: float = 300.0) -> None:
        self._is_chief = check_bool(is_chief, "is_chief", allow_none=True)
        check_bool(across_ranks, "across_ranks", allow_none=True)
        self._across_ranks = world_size() > 1 if across_ranks is None else across_ranks
        if self._across_ranks and world_size() <= 1:
            raise ValueError(
                "across_ranks=True needs torch.distributed initialized with several ranks "
                "before the session is built."
            )
        check_fabric(fabric)
        #: the Lightning Fabric the loop runs on, or ``None``
        self.fabric = fabric
        self._modules = modules
        self._named_modules = named_objects(modules, "modules", torch.nn.Module)
        self._named_optimizers = named_objects(optimizers, "optimizers", torch.optim.Optimizer)
        if checkpoint_format not in (None, "file", "dcp"):
            raise ValueError("checkpoint_format must be None (by the state: 'dcp' when it is "
                             "sharded), 'file' or 'dcp', got " f"{checkpoint_format!r}.")
        self._checkpoint_format = checkpoint_format
        if self._writes_directories():  # ('file' with sharded modules is refused here)
            bad = [name for name in self._named_modules if not name or "." in name]
            if bad:
                raise ValueError(f"modules {bad}: a sharded checkpoint names each module by "
                                 "its key, which must be non-empty and hold no '.'.")
        self._timeout = timeout
        self._executor: Optional[ThreadPoolExecutor] = None
        self._session_state = session_state
        self._global_step = 0

    @property
    def global_step(self) -> int:
        """Completed runs of the monitored session (restored with its state)."""
        return self._global_step

    def step_completed(self) -> None:
        """A run completed: the global step counts it."""
        self._global_step += 1

    def checkpointed_state(self) -> Any:
        """The session state its checkpoints hold (global step and hook state)."""
        return self._session_state()

    def set_global_step(self, step: int) -> None:
        """Make the global step ``step`` now (a restored state's)."""
        self._global_step = step

    @property
    def modules(self) -> Any:
        """The module(s) given to the :class:`MonitoredSession`, as given."""
        return self._modules

    @property
    def is_chief(self) -> bool:
        """Whether this process is the chief, as given to the session.

        By default global rank 0 when ``torch.distributed`` is initialized, else True.
        """
        if self._is_chief is not None:
            return self._is_chief
        if self.fabric is not None:
            return bool(self.fabric.is_global_zero)
        return is_rank_zero()

    def rank_agreement(self, values: int, timeout: float,
                       name: str) -> Optional[RankAgreement]:
        """Over every rank of ``torch.distributed`` (``torchrun``), when there are several."""
        if not self._across_ranks:
            return None
        return RankAgreement(values, timeout=timeout, name=name)

    def write_checkpoint(self, path: str) -> None:
        """Write modules, optimizers, global step and hook state to ``path``, atomically.

        Unsharded state: only the chief writes one file (every rank calls it; the ranks
        hold the same state), ``{"global_step", "modules", "optimizers", "session"}``
        (state dicts by name). Sharded state: see :meth:`_write_sharded`.
        ``MonitoredSession(checkpoint_dir=...)`` restores the latest one.
        """
        if self.fabric is not None:
            # fabric.save: every rank calls it, Fabric writes the file (DDP: rank 0); one
            # temporary name on every rank, renamed by rank 0
            tmp = path + ".tmp"
            self.fabric.save(tmp, self._fabric_state())
            if self.fabric.is_global_zero:  # a file, or the directory of a sharded strategy
                commit(tmp, path)
            self.fabric.barrier()
            return
        if self._writes_directories():
            self._write_sharded(path).result()
            return
        state = self._file_state()
        if state is not None:
            atomic_torch_save(state, path)

    def write_checkpoint_async(self, path: str) -> Future:
        """Copy the state now, write it in a background thread; a future of the commit.

        Sharded state goes through DCP's ``async_save`` (staged in host memory first), the
        file format through a copy of the state (tensors in host memory) written by one
        background thread of the chief's. Either is committed (renamed to ``path``) only
        once complete; under several ranks every rank's future completes after the commit.
        Under Fabric the write happens at once (``fabric.save`` is a collective of the
        loop's thread).
        """
        if self.fabric is not None:
            return super().write_checkpoint_async(path)
        if self._writes_directories():
            return self._write_sharded(path, asynchronous=True)
        state = self._file_state()
        if state is None:
            return completed_future()
        return self._background().submit(atomic_torch_save, _host_copy(state), path)

    def _writes_directories(self) -> bool:
        """Whether checkpoints are sharded directories (``checkpoint_format``, or DTensors)."""
        if self._checkpoint_format == "dcp":
            return True
        sharded = self._sharded()
        if sharded and self._checkpoint_format == "file":
            raise ValueError(
                "checkpoint_format='file' with sharded modules: the chief's file would hold "
                "its own shards only; use checkpoint_format='dcp' (or None). Nothing was "
                "written."
            )
        return sharded

    def _file_state(self) -> Optional[Dict[str, Any]]:
        """What the file format holds (the chief's), or ``None`` on the other ranks.

        Raises:
            ValueError: the hooks' state holds a sharded value.
        """
        session = self._session_state()
        _refuse_sharded(session, "the hooks' state")
        if self._across_ranks and not self.is_chief:
            return None  # the chief writes what every rank holds
        return {
            "global_step": self.global_step,
            "modules": {k: m.state_dict() for k, m in self._named_modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self._named_optimizers.items()},
            "session": session,
        }

    def _sharded(self) -> bool:
        """Whether a module's parameters or buffers are sharded (DTensor: FSDP2, TP)."""
        return holds_sharded_tensors(self._named_modules.values())

    def _container(self) -> torch.nn.ModuleDict:
        """The modules under their names: the one module DCP's state-dict helpers take."""
        return torch.nn.ModuleDict(self._named_modules)

    def _background(self) -> ThreadPoolExecutor:
        """The one thread that writes this session's checkpoints in the background."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="lightning_finalops-checkpoint")
        return self._executor

    def _write_sharded(self, path: str, asynchronous: bool = False) -> Future:
        """A directory every rank writes its shards into (DCP), committed by one rename.

        Every rank saves its shards of every module (and of every optimizer, once they
        all have state: reading an optimizer's state dict before its first step would
        make one) with ``torch.distributed.checkpoint`` into ``<path>.tmp/``; once that
        save returns (every rank wrote, rank 0 wrote the metadata), the chief adds
        ``session.pt`` (global step, hook state, the names saved; serialised before this
        returns) and renames the directory to ``path``, and the ranks meet on the
        checkpoint group: a directory under a checkpoint's name is complete, and every
        rank's future completes after the commit.

        Raises:
            ValueError: before anything is written, when the hooks' state holds a sharded
                value, or a session of this process alone holds sharded modules.
        """
        session = self._session_state()
        _refuse_sharded(session, "the hooks' state")
        if not self._across_ranks and self._sharded():
            raise ValueError(
                "A session of this process alone (across_ranks=False) cannot save sharded "
                "modules: the other ranks' shards would be missing; nothing was written."
            )
        tmp = path + ".tmp"
        container = self._container()
        optimizers = list(self._named_optimizers.values())
        with_optimizers = bool(optimizers) and all(o.state for o in optimizers)
        state: Dict[str, Any] = {"modules": get_model_state_dict(container)}
        if with_optimizers:
            state["optimizers"] = get_optimizer_state_dict(container, optimizers)
        chief = self.is_chief or not self._across_ranks
        meta = io.BytesIO()  # serialised now: the hooks' state moves on with the loop
        if chief:
            torch.save({"format": "dcp", "global_step": self.global_step, "session": session,
                        "modules": sorted(self._named_modules),
                        "optimizers": sorted(self._named_optimizers),
                        "optimizer_state": with_optimizers}, meta)

        def commit() -> None:
            if chief:  # every rank wrote (DCP's save returned): one rename commits it all
                atomic_write(path, lambda t: _write_bytes(os.path.join(t, SESSION_FILE),
                                                          meta.getvalue()), tmp=tmp)
            if self._across_ranks:  # every rank's save ends once it is committed
                dist.barrier(group=agreement_group(self._timeout, "checkpoint"))

        if not asynchronous:
            self._dcp(dcp.save, state, tmp)
            commit()
            return completed_future()
        saving = self._dcp(dcp.async_save, state, tmp)
        staging = getattr(saving, "staging_completion", None)
        if staging is not None:
            staging.result()  # the state is copied before the loop changes it
        upload = getattr(saving, "upload_completion", saving)

        def finish() -> None:
            upload.result()
            commit()

        return self._background().submit(finish)

    def _dcp(self, save_or_load: Callable[..., Any], state: Dict[str, Any], path: str) -> Any:
        """``dcp.save``/``async_save``/``load`` of ``state`` at ``path``, by every rank.

        Coordinated on the library's checkpoint group (bounded by the agreement timeout;
        never the votes' group: a background save's collectives run in another thread),
        or, for a session of this process alone, in this process.
        """
        if self._across_ranks:
            return save_or_load(state, checkpoint_id=path,
                                process_group=agreement_group(self._timeout, "checkpoint"))
        with warnings.catch_warnings():  # DCP warns that it runs in one process: we know
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
            return save_or_load(state, checkpoint_id=path, no_dist=True)

    def _apply_sharded(self, checkpoint: Mapping[str, Any], path: str,
                       strict: bool) -> List[str]:
        """Load a sharded checkpoint directory into the modules and optimizers, resharded.

        Works on any number of ranks, and into unsharded modules in one process. A
        checkpoint saved before the optimizers' first step holds no optimizer state: the
        optimizers stay as they are (as fresh as they were then).
        """
        skipped = self._check_names(checkpoint, path, strict)
        container = self._container()
        state: Dict[str, Any] = {"modules": get_model_state_dict(container)}
        optimizers = list(self._named_optimizers.values())
        with_optimizers = bool(optimizers) and checkpoint.get("optimizer_state", True)
        if with_optimizers:
            state["optimizers"] = get_optimizer_state_dict(container, optimizers)
        self._dcp(dcp.load, state, path)
        set_model_state_dict(container, state["modules"])
        if with_optimizers:
            set_optimizer_state_dict(container, optimizers, state["optimizers"])
        return skipped

    def _fabric_state(self) -> Dict[str, Any]:
        # Fabric saves and loads modules and optimizers given at the top level of the state
        state: Dict[str, Any] = {"global_step": self.global_step,
                                 "session": self._session_state()}
        state.update({f"module.{k}": m for k, m in self._named_modules.items()})
        state.update({f"optimizer.{k}": o for k, o in self._named_optimizers.items()})
        return state

    def restore_latest(self, checkpoint_dir: str, basename: str, strict: bool = True,
                       timeout: float = 300.0,
                       ) -> Optional[Tuple[str, Dict[str, Any], List[str]]]:
        """Restore the newest checkpoint of ``checkpoint_dir`` that loads (older ones if not).

        Args:
            checkpoint_dir: where the checkpoints are.
            basename: their base name.
            strict: every saved module and optimizer must have one here; else those
                without one are skipped.
            timeout: seconds every rank waits for rank 0's choice.

        Returns:
            ``(path, saved session state, what was skipped)``, or ``None`` when there is
            no checkpoint.
        """
        def load(path: str) -> Any:
            if os.path.isdir(path):  # a sharded checkpoint: its session file here, shards later
                if not os.path.isfile(os.path.join(path, ".metadata")):
                    raise ValueError(f"{path} is a directory without DCP's .metadata: not a "
                                     "checkpoint this library committed")
                if self.fabric is not None:
                    return {}  # a sharded Fabric checkpoint: fabric.load reads it below
                session_file = os.path.join(path, SESSION_FILE)
                if not os.path.isfile(session_file):
                    raise ValueError(f"{path} is a directory without {SESSION_FILE}: not a "
                                     "checkpoint this library committed")
                return _checked(torch.load(session_file, map_location="cpu",
                                           weights_only=False), session_file)
            return _checked(torch.load(path, map_location="cpu", weights_only=False), path)

        if not self._across_ranks:
            found = load_latest(checkpoint_dir, basename, load)
            path = found[0] if found is not None else None
        else:
            # Rank 0 chooses, every rank restores that one (not each the newest it happens
            # to see), so all start at the same global step; a failure reaches every rank.
            found, error = None, None
            if is_rank_zero():
                try:
                    found = load_latest(checkpoint_dir, basename, load)
                except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                    error = f"{type(e).__name__}: {e}"
            path, error = broadcast_from_rank_zero(
                (found[0] if found is not None else None, error), timeout,
                "the checkpoint to restore",
            )
            if error is not None:
                raise RuntimeError(f"Rank 0 could not choose a checkpoint to restore: {error}")
        if path is None:
            return None
        if self.fabric is not None:
            state = self._fabric_state()
            # modules and optimizers restored in place; not strict: the saved optimizers a
            # session given none has no place for stay in the file
            self.fabric.load(path, state, strict=strict)
            return path, state["session"], []
        checkpoint = found[1] if found is not None else load(path)
        return path, checkpoint["session"], self._apply(checkpoint, path, strict)

    def _apply(self, checkpoint: Mapping[str, Any], path: str, strict: bool) -> List[str]:
        """Load modules and optimizers from ``checkpoint``; return what had no place here.

        Raises:
            ValueError: a module or optimizer of the session is not in the checkpoint, or
                (with ``strict``) a saved one has none here.
        """
        if checkpoint.get("format") == "dcp":
            return self._apply_sharded(checkpoint, path, strict)
        skipped = self._check_names(checkpoint, path, strict)
        for kind, named in (("modules", self._named_modules),
                            ("optimizers", self._named_optimizers)):
            for name, obj in named.items():
                obj.load_state_dict(checkpoint[kind][name])
        return skipped

    def _check_names(self, checkpoint: Mapping[str, Any], path: str, strict: bool) -> List[str]:
        """What the checkpoint holds that the session has no place for (named).

        Raises:
            ValueError: a module or optimizer of the session is not in the checkpoint, or
                (with ``strict``) a saved one has none here.
        """
        skipped = []
        for kind, named in (("modules", self._named_modules),
                            ("optimizers", self._named_optimizers)):
            saved = checkpoint.get(kind, {})
            missing = sorted(set(named) - set(saved))
            extra = sorted(set(saved) - set(named))
            if missing or (extra and strict):
                raise ValueError(
                    f"Checkpoint {path} holds {kind} {sorted(saved)}, but the session was given "
                    f"{sorted(named)}: pass the same {kind} to MonitoredSession"
                    + (", or strict=False to restore what it was given." if not missing
                       else ".")
                )
            skipped += [f"{kind}[{name!r}]" for name in extra]
        return skipped


def _host_copy(state: Any) -> Any:
    """``state`` as it is now, for a background write (the loop moves on at once).

    Tensors are copied to host memory, containers rebuilt, other values deep-copied.
    """
    return map_structure(
        lambda value, _: value.detach().to("cpu", copy=True)
        if isinstance(value, torch.Tensor) else copy.deepcopy(value), state,
    )


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _refuse_sharded(state: Any, what: str) -> None:
    """Refuse, before anything is written, a state that holds a sharded value (a DTensor).

    Raises:
        ValueError: ``state`` holds a DTensor (its path is named).
    """
    for path, value in leaves(state, (what,)):
        if isinstance(value, DTensor):
            assert path is not None
            raise ValueError(
                f"{format_path(path)} is a sharded tensor (DTensor): a file of one rank would "
                "hold its shard only. Record the full value (FinalOpsHook does: "
                "value.full_tensor()) or keep sharded values out of hook state; nothing was "
                "written."
            )


class StepContext:
    """What ``MonitoredSession.run_step_fn`` hands the step function.

    Attributes:
        session: the raw session (runs on it trigger no hooks).
    """

    def __init__(self, session: RawSession, run_with_hooks: Callable[..., Any]) -> None:
        self.session = session
        self._run_with_hooks = run_with_hooks

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any:
        """``MonitoredSession.run(...)``: the hooks fire for this call."""
        return self._run_with_hooks(*args, **kwargs)

    def request_stop(self) -> None:
        """End the iterations now (TF): raise ``StopIteration``, which ends a ``with`` cleanly.

        Raises:
            StopIteration: always.
        """
        raise StopIteration("step_fn has requested the iterations to stop.")


class MonitoredSession:
    """Runs steps of a plain PyTorch loop with session hooks, with TensorFlow's semantics.

    The constructor calls every hook's ``begin()``, restores ``state`` if given, then calls
    every hook's ``after_create_session(session, coord)``. Every :meth:`run` calls each hook's
    ``before_run`` in list order, runs the step, evaluates the hooks' fetches against the
    step's returned dict, advances :attr:`global_step` and calls each ``after_run`` in list
    order. Leaving a ``with`` block normally or through ``StopIteration`` (end of data) calls
    every hook's ``end()``; any other exception skips every ``end()`` and propagates.

    ```python
    with MonitoredSession(hooks=[StopAtStepHook(last_step=100), final_ops], modules=model) as sess:
        while not sess.should_stop():
            sess.run(lambda: train_step(next(batches)))
    ```

    Args:
        hooks: the session's hooks, called in this order at every point.
        modules: the module(s) the loop trains (a module, a dict or a list of them), handed
            to hooks as ``session.modules`` and saved in checkpoints.
        optimizers: the optimizer(s) (one, a dict or a list), saved in checkpoints.
        state: what :meth:`state_dict` returned in an earlier process, restored before
            ``after_create_session`` so hooks see the restored :attr:`global_step`.
        checkpoint_dir: restore the latest ``<checkpoint_basename>-<step>`` checkpoint found
            there (as written by ``CheckpointSaverHook``) at session creation: modules,
            optimizers, global step and hook state, as ``MonitoredTrainingSession(checkpoint_dir)``
            did. Nothing is restored when the directory holds none.
        checkpoint_basename: the checkpoint files' base name.
        is_chief: what hooks see as ``session.is_chief`` (the chief writes shared files);
            ``None``: ``fabric.is_global_zero``, else global rank 0 of ``torch.distributed``
            when it is initialized, else True.
        fabric: a launched ``lightning.fabric.Fabric`` the loop runs on (modules and
            optimizers from ``fabric.setup``): checkpoints are written with ``fabric.save``
            and restored with ``fabric.load`` (every rank calls them, so every rank must run
            the saver), and hooks find it as ``session.fabric``. A sharded strategy
            (``ModelParallelStrategy``) saves a directory from every rank, which rank 0
            commits by one rename.
        across_ranks: whether the ranks of ``torch.distributed`` run this session together
            (agree on stops and time, restore one checkpoint, the chief writes): ``None``
            means yes when it is initialized with several ranks. Then every rank must build
            the session; pass ``False`` for a session of this process alone (an evaluation
            loop on rank 0 after training).
        strict: whether every module, optimizer and hook state in the restored checkpoint
            (or ``state``) must have its place in this session. ``None``: strict, unless
            it restores a checkpoint and was given no optimizers (it evaluates or predicts):
            then it restores
            the modules and the global step of a training checkpoint and skips its
            optimizers and the state of hooks it does not have, naming them in one INFO
            line. A module of the session missing from the checkpoint is an error either way.
        agreement_timeout: with several ranks, the seconds any wait of the session's
            agreement may last (a rank killed, hung or far behind) before it fails with an
            :class:`~lightning_finalops.AgreementTimeoutError` naming the step and the
            ranks that did not answer. See "When a rank fails" in docs/many-processes.md.
        stop_on_sigterm: whether a SIGTERM (a preemption: a spot instance, SLURM,
            Kubernetes) received while the session is open stops it after the run in flight
            (with several ranks, at one step on every rank), runs every hook's ``end()``
            (``CheckpointSaverHook`` writes that step), then restores the previous handler
            and calls it (the default one ends the process, as the signal asked). ``None``:
            yes when a hook asks for it, as ``CheckpointSaverHook`` does. Main thread only.
            A second SIGTERM goes to the previous handler at once. Python runs a handler
            between bytecodes: a rank blocked inside a collective handles the signal when
            that returns (launchers that follow SIGTERM with SIGKILL, as torchrun, SLURM
            and Kubernetes do, end it then).
        checkpoint_format: how checkpoints are written: ``"file"`` (one file, written by
            the chief: every rank holds the same state), ``"dcp"`` (a directory
            ``<basename>-<step>/`` into which every rank writes its shards with
            ``torch.distributed.checkpoint``, committed by one rename once all wrote), or
            ``None``: ``"dcp"`` when a module is sharded (DTensor: FSDP2's
            ``fully_shard``, tensor parallelism), else ``"file"``. Restores read either,
            whatever the number of ranks (a sharded checkpoint into an unsharded model in
            one process, too).

    Raises:
        TypeError: an item of ``hooks`` is not a :class:`SessionRunHook`, or ``modules`` /
            ``optimizers`` hold something else.
        ValueError: both ``state`` and a checkpoint to restore were given.
    """

    def __init__(
        self,
        hooks: Optional[Any] = None,
        modules: Any = None,
        optimizers: Any = None,
        *,
        state: Optional[Mapping[str, Any]] = None,
        checkpoint_dir: Optional[str] = None,
        checkpoint_basename: str = "model.ckpt",
        is_chief: Optional[bool] = None,
        fabric: Any = None,
        across_ranks: Optional[bool] = None,
        strict: Optional[bool] = None,
        agreement_timeout: float = 300.0,
        stop_on_sigterm: Optional[bool] = None,
        checkpoint_format: Optional[str] = None,
    ) -> None:
        check_bool(strict, "strict", allow_none=True)
        self._engine = _PlainEngine(modules, optimizers, self.state_dict, is_chief, fabric,
                                    across_ranks, checkpoint_format, agreement_timeout)
        self._session = HookedSession(hooks, self._engine, "hooks", agree_across_ranks=True,
                                      agreement_timeout=agreement_timeout,
                                      name="MonitoredSession",
                                      stop_on_sigterm=stop_on_sigterm)
        self._closed = False
        if checkpoint_dir is not None:
            checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
        check_basename(checkpoint_basename)
        self._session.begin()
        # state= is restored strictly unless told otherwise; a checkpoint restored into a
        # session given no optimizers (it evaluates or predicts) skips what has no place here
        restore_strict = optimizers is not None if strict is None else strict
        strict = True if strict is None else strict
        if checkpoint_dir is not None:
            restored = self._engine.restore_latest(checkpoint_dir, checkpoint_basename,
                                                   restore_strict, agreement_timeout)
            if restored is not None and state is not None:
                raise ValueError(
                    "Pass either state or a checkpoint_dir to restore from, not both "
                    f"({checkpoint_dir} holds a checkpoint)."
                )
            if restored is not None:
                path, state, skipped = restored
                strict = restore_strict
                skipped += [] if strict else self._unplaced_hook_state(state)
                logger.info("Restoring parameters from %s (global step %s)%s.", path,
                            state.get("global_step"),
                            f"; not restored, as the session was not given them: {skipped}"
                            if skipped else "")
        if state is not None:
            self.load_state_dict(state, strict=strict)
        self._session.create()

    def _unplaced_hook_state(self, state: Mapping[str, Any]) -> List[str]:
        """The saved hook states that no hook of this session takes."""
        saved = state.get("hooks", {}) if isinstance(state, Mapping) else {}
        mine = set(hook_state_keys(self._session.hooks))
        return [f"hook state {key!r}" for key, value in saved.items()
                if key not in mine and value]

    @property
    def hooks(self) -> tuple[SessionRunHook, ...]:
        """The session's hooks, in call order."""
        return self._session.hooks

    @property
    def global_step(self) -> int:
        """Completed runs: without the current run in ``before_run``, with it in ``after_run``."""
        return self._engine.global_step

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator hooks received in ``after_create_session``."""
        return self._session.coord

    def raw_session(self) -> RawSession:
        """The raw session hooks receive: runs on it trigger no hooks."""
        return self._session.raw_session

    def should_stop(self) -> bool:
        """True once closed, after a hook requested a stop, or when the coordinator stopped."""
        return self._closed or self._session.should_stop or self._session.coord.should_stop()

    def run(
        self,
        fetches: Any,
        feed_dict: Optional[Mapping[Any, Any]] = None,
        options: Optional[RunOptions] = None,
    ) -> Any:
        """Run one step with hooks.

        Args:
            fetches: a fetch structure; a callable in it is the step and is called once (with
                the run's str feeds it accepts). If it evaluates to a dict, hooks can fetch
                its keys by name; names in ``fetches`` itself resolve against the previous
                run's dict.
            feed_dict: ``{tensor: value}`` overrides tensors for this run only (restored
                afterwards, even if the run raises); ``{"name": value}`` is passed to the
                callables of the run that accept ``name``.
            options: :class:`RunOptions` for this run, merged with the hooks' requests.

        Returns:
            ``fetches`` evaluated: a lone step callable's result as it returned it (not
            copied, so a step costs what calling it costs); any other fetch structure by
            the fetch rules (tensors detached copies, on their own device).

        Raises:
            RuntimeError: the session is closed, a hook requested a stop in an earlier run
                (``"Run called even after should_stop requested."``), feeds conflict, or
                ``run`` was called from inside a step of this session (runs do not nest;
                hooks and steps use ``raw_session().run``, which triggers no hooks).
            TypeError: an invalid fetch, feed key or option.
            ValueError: a str feed no callable accepts, or a tensor feed of the wrong shape.
        """
        if self._closed:
            raise RuntimeError("Run called on a closed MonitoredSession.")
        session = self._session
        if feed_dict is None and options is None and type(fetches) in _STEP_TYPES:
            return session.run_step(fetches)  # the usual run: a step function alone
        if not callable(fetches):  # a lone callable (the step) is always a valid fetch
            check_fetches(fetches, "fetches")
        pending = session.start_run(fetches, feed_dict, options)
        try:
            values = self._evaluate_fetches(fetches, pending.str_feeds)
        except BaseException as e:
            session.abort_run()
            session.fail(e)
            raise
        session.finish_run(values)
        return values

    def _evaluate_fetches(self, fetches: Any, str_feeds: Mapping[str, Any]) -> Any:
        """The user's fetches evaluated; names resolve against the previous run's dict."""
        with charging(*USER):  # the user's step and fetches: their syncs are the user's
            if not str_feeds and callable(fetches) and not is_metric(fetches):
                return fetches()  # the step's own results: handed back as returned
            return evaluate(fetches, self._session.raw_session.namespaces(), str_feeds)

    def run_step_fn(self, step_fn: Callable[[StepContext], Any]) -> Any:
        """Run ``step_fn(step_context)``: hooks fire only for ``step_context.run_with_hooks``.

        Args:
            step_fn: a function of one argument named ``step_context`` (or a method taking
                ``self`` and ``step_context``).

        Returns:
            What ``step_fn`` returned.

        Raises:
            ValueError: ``step_fn``'s arguments are not ``(step_context)``.
            StopIteration: ``step_context.request_stop()`` was called (a ``with`` block ends
                cleanly on it).
        """
        try:
            names = tuple(inspect.signature(step_fn).parameters)
        except (TypeError, ValueError) as e:
            raise TypeError(f"step_fn must be a function, got {type(step_fn).__name__}.") from e
        if names not in (("step_context",), ("self", "step_context")):
            raise ValueError(
                "`step_fn` may either have one `step_context` argument, or `self` and "
                "`step_context` arguments if it's an instance method. "
                f"Got {names} instead."
            )
        with charging(*USER):  # the user's code (its run_with_hooks charges the hooks')
            return step_fn(StepContext(self._session.raw_session, self.run))

    def close(self) -> None:
        """Call every hook's ``end()`` and close the session.

        Closing a closed session calls every ``end(None)`` again, then raises (TF).

        Raises:
            RuntimeError: ``"Session is already closed."``.
            BaseException: an exception a thread gave ``coordinator.request_stop(exc)``,
                re-raised after the hooks' ``end()``.
        """
        self._close_internal(None)

    def _close_internal(self, exception_type: Optional[Type[BaseException]],
                        exception: Optional[BaseException] = None) -> None:
        try:
            if exception_type is None:
                self._session.end(closed=self._closed)
            elif not self._closed:
                self._session.abandon(exception)
        finally:
            if self._closed:
                raise RuntimeError("Session is already closed.")
            self._closed = True
            self._session.coord.request_stop()
            # the threads stop (within TF's grace period) and what they recorded is raised;
            # a thread still running after it is logged, not raised (TF's close)
            coord = self._session.coord
            coord.join(ignore_live_threads=True)
            alive = coord.running_threads()
            if alive:
                logger.warning("MonitoredSession closed with threads still running: %s", alive)

    def __enter__(self) -> MonitoredSession:
        return self

    def __exit__(self, exception_type: Optional[Type[BaseException]],
                 exception: Optional[BaseException], *_: Any) -> bool:
        # Exact type, as TF: a subclass of StopIteration is an error, not the end of data.
        if exception_type is StopIteration:
            exception_type = None
        self._close_internal(exception_type, exception)
        return exception_type is None

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The session's state: ``{"global_step": int, "hooks": {state_key: hook state}}``."""
        return {"global_step": self._engine.global_step, "hooks": self._session.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore the global step and every hook's state.

        Pass the state to the constructor (``state=``) to restore it before the hooks'
        ``after_create_session``, as TF restored a checkpoint at session creation.

        Args:
            state_dict: what :meth:`state_dict` returned.
            strict: raise if a hook's saved non-empty state has no hook in this session
                (a hook added since the save keeps its fresh state either way).

        Raises:
            TypeError: ``state_dict`` is not a mapping with an int ``global_step``.
            ValueError: keys are missing, or (with ``strict``) saved hook state has no hook.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}.")
        missing = [key for key in ("global_step", "hooks") if key not in state_dict]
        if missing:
            raise ValueError(
                f"state_dict lacks {missing}; expected what MonitoredSession.state_dict() returned."
            )
        step = state_dict["global_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"state_dict['global_step'] must be an int >= 0, got {step!r}.")
        self._session.load_state_dict(state_dict["hooks"], strict=strict)
        self._engine.set_global_step(step)
