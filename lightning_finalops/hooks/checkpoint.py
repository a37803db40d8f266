"""``CheckpointSaverHook`` and ``CheckpointSaverListener``: resumable checkpoints on a schedule."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable, List, Optional, Sequence, Union

from lightning_finalops.checkpoints import (
    check_basename,
    check_checkpoint_dir,
    checkpoint_path,
    list_checkpoints,
    remove_stray_temporaries,
)
from lightning_finalops.hooks.timers import SecondOrStepTimer
from lightning_finalops.session_run_hook import (
    Agreement,
    Coordinator,
    RawSession,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from lightning_finalops.validation import (
    check_bool,
    check_callable,
    check_int,
    check_sequence_of,
)

__all__ = ["CheckpointSaverHook", "CheckpointSaverListener"]

logger = logging.getLogger("lightning_finalops")

Saver = Callable[[RawSession, str], Any]


class CheckpointSaverListener:
    """Acts right before and after every checkpoint a :class:`CheckpointSaverHook` writes.

    ``begin()`` runs in the hook's ``begin()``; ``before_save`` / ``after_save`` around every
    save, with the global step saved; ``end(session, global_step_value)`` in the hook's
    ``end()``, after the final save. ``after_save`` returning a truthy value asks the session
    to stop after the current run (ignored for the save at session creation and at the end).
    A listener acting on its own schedule should handle the last checkpoint in ``end()``,
    without acting twice when ``after_save`` already handled it. Every method is a no-op by
    default.

    Under distributed training every rank runs the hook, so every rank calls its listeners:
    a listener with a side effect meant to happen once (an evaluation, an upload) checks
    ``session.is_chief`` itself. TF ran the hook (``chief_only_hooks``) on the chief only.
    """

    def begin(self) -> None:
        """Called once, in the hook's ``begin()``."""

    def before_save(self, session: RawSession, global_step_value: int) -> None:
        """Called before every save, with the global step being saved."""

    def after_save(self, session: RawSession, global_step_value: int) -> Optional[bool]:
        """Called after every save; return True to ask the session to stop after this run."""
        return None

    def end(self, session: RawSession, global_step_value: int) -> None:
        """Called once, in the hook's ``end()``, after the final save."""


class CheckpointSaverHook(SessionRunHook):
    """Saves a resumable checkpoint every ``save_secs`` seconds or ``save_steps`` steps.

    It saves at session creation (in ``after_create_session``, at the restored or initial
    global step), then in the ``after_run`` of every run whose global step (completed runs,
    this one included) the timer finds due, and in ``end()`` unless the last save was at the
    final global step. Each checkpoint is ``<checkpoint_dir>/<checkpoint_basename>-<step>``,
    written by ``session.save_checkpoint(path)``: under ``MonitoredSession`` modules,
    optimizers, global step and hook state (``MonitoredSession(checkpoint_dir=...)``
    restores the latest); under ``HookCallback`` a Lightning checkpoint
    (``trainer.fit(ckpt_path=path)`` resumes from it). It fetches nothing per run.

    A checkpoint holds everything recorded at its step: asked for in ``after_run``, it is
    written once the step is final (after every hook's ``after_run`` of the run; under
    Lightning, when a validation follows the batch, at that validation's end; at the
    session's last step after every hook's ``end()``), and the listeners' ``after_save``
    fire once it is on disk. TF wrote it inside ``after_run``, so hooks listed after the
    saver missed that run. A stop a listener asks for lands after the run the file was
    written in.

    Every rank calls the save (Lightning's ``save_checkpoint`` is a collective; rank 0
    writes) and the listeners; only the chief (``session.is_chief``) deletes old
    checkpoints. There is no graph: TF's ``"Global step should be created to use
    CheckpointSaverHook."`` cannot happen, ``graph.pbtxt``/``.meta`` files are not written,
    and no ``SessionLog.CHECKPOINT`` event is written.

    Args:
        checkpoint_dir: the directory of the checkpoint files; created in ``begin()`` if
            missing.
        save_secs: save every ``save_secs`` seconds (at most once per global step).
        save_steps: save every ``save_steps`` global steps.
        saver: ``None`` (the session writes: ``session.save_checkpoint(path)``) or a callable
            ``saver(session, path)`` called instead, with the same contract: every rank calls
            it, and it writes ``path`` atomically, never leaving a partial file under that
            name (``lightning_finalops.atomic_write(path, write)`` does that). It writes
            when called, inside ``after_run`` (TF's timing), not once the step is final.
        checkpoint_basename: the files' base name.
        scaffold: kept for TF's signature; must be ``None`` (there is no ``Scaffold``).
        listeners: :class:`CheckpointSaverListener` s called around every save, in order.
        save_graph_def: kept for TF's signature; writes nothing (there is no graph).
        max_to_keep: how many checkpoints to keep (TF's ``Saver`` default, 5); after each
            save the chief deletes the older ``<checkpoint_basename>-<step>`` files of
            ``checkpoint_dir``. Files found there before this hook saved count as older
            than the ones it wrote, oldest step first. ``None`` or 0 keeps every file.
        async_save: the state is copied when the step is final and written in the
            background while training goes on (a sharded model: DCP's ``async_save``);
            at most one save is in flight: the next save, the session's end and a failure
            wait for it, and the listeners' ``after_save`` fire then, once it is
            committed (the same step on every rank). A crash during it never leaves a
            committed partial checkpoint. An engine that cannot write in the background
            (Lightning: use its ``AsyncCheckpointIO`` plugin) writes at once.

    Raises:
        ValueError: ``"You cannot provide both saver and scaffold."``, the timer's
            ``"Either every_secs or every_steps should be provided."`` /
            ``"Can not provide both every_secs and every_steps."`` (TF's messages, in TF's
            order), a ``scaffold``, an empty ``checkpoint_basename`` or a negative
            ``max_to_keep``.
        TypeError: ``checkpoint_dir`` is not a str or path, ``checkpoint_basename`` not a
            str, ``saver`` not callable, ``listeners`` not a list of
            :class:`CheckpointSaverListener`, or ``max_to_keep`` not an int.
    """

    def __init__(
        self,
        checkpoint_dir: Union[str, os.PathLike[str]],
        save_secs: Optional[float] = None,
        save_steps: Optional[int] = None,
        saver: Optional[Saver] = None,
        checkpoint_basename: str = "model.ckpt",
        scaffold: Any = None,
        listeners: Optional[Sequence[CheckpointSaverListener]] = None,
        save_graph_def: bool = True,
        max_to_keep: Optional[int] = 5,
        *,
        async_save: bool = False,
    ) -> None:
        if saver is not None and scaffold is not None:
            raise ValueError("You cannot provide both saver and scaffold.")
        self._checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
        check_basename(checkpoint_basename)
        self._timer = SecondOrStepTimer(
            every_secs=save_secs, every_steps=save_steps, secs_argument="save_secs",
            steps_argument="save_steps",
        )
        if scaffold is not None:
            raise ValueError(
                f"scaffold must be None, got {type(scaffold).__name__}: there is no Scaffold "
                "without a graph; pass saver=callable(session, path) to choose how to save."
            )
        check_callable(saver, "saver", "saver(session, path)", 2)
        max_to_keep = check_int(max_to_keep, "max_to_keep", minimum=0, allow_none=True)
        self._listeners = check_sequence_of(listeners, CheckpointSaverListener, "listeners")
        self._saver = saver
        self._basename = checkpoint_basename
        self._save_path = os.path.join(self._checkpoint_dir, checkpoint_basename)
        self._save_graph_def = check_bool(save_graph_def, "save_graph_def")
        self._max_to_keep = max_to_keep
        self._async = check_bool(async_save, "async_save")
        self._written: List[str] = []  # paths this hook saved and kept, oldest first
        self._written_step: Optional[int] = None  # the step of the latest file on disk

    @property
    def checkpoint_dir(self) -> str:
        """The directory the checkpoints are written to."""
        return self._checkpoint_dir

    def agreement(self) -> Agreement:
        """A SIGTERM stops the session at an agreed step, whose checkpoint ``end()`` writes.

        Also rank 0's clock with ``save_secs``, and stops when listeners may ask for one.
        """
        return Agreement(stop=bool(self._listeners), time=self._timer.uses_time, sigterm=True)

    def begin(self) -> None:
        """Create ``checkpoint_dir`` if missing; every listener's ``begin()``."""
        self._written_step = None
        os.makedirs(self._checkpoint_dir, exist_ok=True)
        for listener in self._listeners:
            listener.begin()

    def after_create_session(self, session: RawSession, coord: Coordinator) -> None:
        """Save at the current global step; a listener's stop request is ignored here."""
        global_step = session.global_step
        self._save(session, global_step)
        self._timer.update_last_triggered_step(global_step)

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Ask for a save if the timer is due at the global step; stop if a listener asks to."""
        global_step = run_context.session.global_step
        if self._timer.should_trigger_for_step(global_step):
            self._timer.update_last_triggered_step(global_step)
            if self._save(run_context.session, global_step):
                run_context.request_stop()

    def end(self, session: Optional[RawSession]) -> None:
        """Save the final step unless it is saved; every listener's ``end()`` after that.

        The final step's checkpoint is written after every hook's ``end()``, so it holds
        what they recorded, and the listeners' ``end()`` follow it:

        - not asked for yet: it is saved (TF's rule);
        - asked for in the last run and still waiting: that one write;
        - written already with no run since (a session that ended with no stop after a
          saving run): written again if what it holds changed since, and the listeners'
          ``after_save`` then hear of it again, after their ``end()``;
        - written before runs that left the global step where it was (gradient
          accumulation): kept as written (it holds the loop's position at its step).

        Nothing happens when ``session`` is ``None`` (a closed ``MonitoredSession`` closed
        again: the first close already saved).
        """
        if session is None:
            return
        if self._async:
            session.wait_for_save()  # the last save in flight completes: its after_save fire
        last_step = session.global_step

        def listeners_end() -> None:
            for listener in self._listeners:
                listener.end(session, last_step)

        path = checkpoint_path(self._checkpoint_dir, self._basename, last_step)
        if last_step != self._timer.last_triggered_step():
            self._save(session, last_step, then=listeners_end)
        elif self._saver is not None:
            listeners_end()
        elif self._written_step == last_step:
            listeners_end()
            # written again only if what it holds changed since, with no run since (the
            # session decides): the listeners then hear of it again
            self._ask(session, path, lambda: self._after_write(session, last_step, path),
                      only_if_changed=True)
        else:  # asked for in the last run and still waiting: that one write
            self._ask(session, path, listeners_end)

    def _save(self, session: RawSession, step: int,
              then: Optional[Callable[[], None]] = None) -> bool:
        """Ask for the checkpoint of ``step``; return whether a listener asked to stop now.

        The session writes it once the step is final and then calls :meth:`_after_write`
        (and ``then``); a stop a listener asks for there reaches the session through it. A
        ``saver`` of the user's writes at once, so its listeners' answer is returned here.
        """
        stop = False
        if self._async:  # the save in flight ends first: its .tmp is no crashed save's
            stop = session.wait_for_save()
        for listener in self._listeners:
            listener.before_save(session, step)
        logger.info("Saving checkpoints for %d into %s.", step, self._save_path)
        path = checkpoint_path(self._checkpoint_dir, self._basename, step)
        if session.is_chief:  # what a save that crashed left behind, never the one to come
            remove_stray_temporaries(self._checkpoint_dir, self._basename, keep=path + ".tmp")

        def written() -> bool:
            stop = self._after_write(session, step, path)
            if then is not None:
                then()
            return stop

        if self._saver is None:
            self._ask(session, path, written)
            return stop
        self._saver(session, path)
        return written()

    def _ask(self, session: RawSession, path: str, written: Callable[[], Any],
             **kwargs: Any) -> None:
        """``session.save_checkpoint``, in the background with ``async_save``."""
        if self._async:
            kwargs["asynchronous"] = True  # (a RawSession of the user's may predate it)
        session.save_checkpoint(path, written, **kwargs)

    def _after_write(self, session: RawSession, step: int, path: str) -> bool:
        """The checkpoint of ``step`` is on disk: prune old ones, call every ``after_save``."""
        self._written_step = step
        if self._max_to_keep:
            if path in self._written:
                self._written.remove(path)
            self._written.append(path)
            if session.is_chief:
                self._delete_old_checkpoints()
            else:  # only the chief deletes; the others just forget
                del self._written[: -self._max_to_keep]
        should_stop = False
        for listener in self._listeners:  # every listener is called, even after a stop
            if listener.after_save(session, step):
                logger.info(
                    "A CheckpointSaverListener requested that training be stopped. "
                    "listener: %s", listener,
                )
                should_stop = True
        return should_stop

    def _delete_old_checkpoints(self) -> None:
        assert self._max_to_keep
        found = [path for _, path in list_checkpoints(self._checkpoint_dir, self._basename)]
        on_disk = set(found)
        self._written = [p for p in self._written if p in on_disk]
        ours = set(self._written)
        oldest_first = [p for p in found if p not in ours] + self._written
        excess = oldest_first[: -self._max_to_keep]
        for path in excess:
            try:
                if os.path.isdir(path):  # a sharded checkpoint: the whole directory
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            except FileNotFoundError:  # removed meanwhile (by hand, or another process)
                pass
        deleted = set(excess)
        self._written = [p for p in self._written if p not in deleted]
