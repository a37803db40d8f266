"""``HookedSession``: one session of hooks over an engine, begin to end, with TF's rules.

The hooks are called in list order at every point (nothing reversed); their ``before_run``
requests are merged (fetches per hook, feeds with TF's conflict errors, run options); the
run's protected region (tensor feeds applied and restored, the profiler trace) covers the
step and the evaluation of the hooks' fetches; then every ``after_run``, the stop flag and,
with several ranks, the agreement. An adapter translates its engine's events into these
calls::

    session = HookedSession(hooks, engine)
    session.begin(); session.create()
    per run:  pending = session.start_run(fetches, feed_dict, options)
              <the engine runs the step, with pending.str_feeds passed on>
              session.finish_run(step_outputs)   # or session.abort_run() if the step raised
          or: outputs = session.run_step(step)   # the three, for a step callable alone
    session.end()                                # clean end only; abandon() otherwise

A run has one path: :meth:`start_run`, the step, :meth:`finish_run`. What differs between
sessions (whether hooks act per run at all, whether ranks agree) is decided once, when the
session is built; what differs between runs (a hook asked for fetches, feeds or a trace) is
recorded in the run's :class:`~lightning_finalops.run.PendingRun`.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

# the module, for its _active audit: read once per run (an attribute, not a call)
import lightning_finalops.sync_audit as sync_audit
from lightning_finalops.distributed import (
    DEPARTURES,
    FAILED,
    LEFT,
    AgreementError,
    RankAgreement,
    Vote,
    agreed_time,
    local_clock,
    rank_failed,
    set_agreed_time,
)
from lightning_finalops.engine import EMPTY, Engine
from lightning_finalops.fetches import accepted_keywords, evaluate
from lightning_finalops.hook_state import (
    check_hooks,
    hook_state_dict,
    hook_state_keys,
    load_hook_state_dict,
    state_digest,
)
from lightning_finalops.raw_session import EngineRawSession
from lightning_finalops.run import DEFAULT_OPTIONS, NO_RESULTS, PendingRun, new_tuple
from lightning_finalops.session_run_hook import (
    AgreedValue,
    Agreement,
    Coordinator,
    RunOptions,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from lightning_finalops.sync_audit import charged
from lightning_finalops.validation import check_bool, check_seconds

__all__ = ["HookedSession", "STOP_REQUESTED_MESSAGE"]

logger = logging.getLogger("lightning_finalops")

STOP_REQUESTED_MESSAGE = "Run called even after should_stop requested."
_IN_FLIGHT_MESSAGE = "start_run() called while a run is in flight; finish or abort it."
_NOT_INSTALLED = object()  # the session installed no SIGTERM handler
# Seconds a failing rank waits for the others to read its failure: they may be inside a
# collective of their own that it no longer joins (its text waits for them in the store).
_FAILURE_GRACE = 30.0
# The run of a session whose hooks have no per-run methods, when the user asks for nothing
# either: no hook sees it, so one shared, empty record serves every such run.
_IDLE_RUN = PendingRun(None, DEFAULT_OPTIONS)


def _overrides(hook: SessionRunHook, method: str) -> bool:
    return getattr(type(hook), method) is not getattr(SessionRunHook, method)


def _declared(hook: SessionRunHook) -> Agreement:
    agreement = hook.agreement()
    if not isinstance(agreement, Agreement):
        raise TypeError(f"{type(hook).__name__}.agreement() must return an Agreement, got "
                        f"{type(agreement).__name__}.")
    return agreement


class HookedSession:
    """One session of a fixed list of hooks over an engine, with TensorFlow's rules.

    Each hook's ``before_run``/``after_run`` is looked up once, here (bound methods, and only
    the ones a hook overrides): replacing them on a hook later has no effect on this session.

    Args:
        hooks: the session's hooks, called in this order at every point.
        engine: the engine the session runs on.
        argument: the argument name the hooks came from, for error messages.
        agree_across_ranks: agree through ``engine.rank_agreement()`` on what the hooks
            declare (:meth:`SessionRunHook.agreement`: stops, time, values), and on ranks
            that leave or fail (training sessions, whose ranks all run the same steps).
            Evaluation and prediction sessions, whose ranks may see different numbers of
            batches, agree on nothing. A session whose hooks declare nothing sends no vote.
        agreement_timeout: seconds any wait of the agreement may last before it fails
            with an :class:`~lightning_finalops.AgreementTimeoutError` naming the ranks that
            did not answer.
        name: the session, as the agreement's errors name it.
        stop_on_sigterm: while the session is open, a SIGTERM stops it (after the run in
            flight; with ranks that agree, at one step on every rank) so that every hook's
            ``end()`` runs, then the previous handler is restored and called (the default
            one ends the process, as the signal asked). ``None``: when a hook asks for it
            (:attr:`Agreement.sigterm`, as ``CheckpointSaverHook`` does). Only in the main
            thread (Python delivers signals there).
        on_preempted: called, on every rank, once a session that a SIGTERM stopped (on
            any rank) ended cleanly, instead of calling the previous handler (Lightning
            raises its ``SIGTERMException`` there, as its own loops do).
        defer_failures: with ranks that agree, an exception in a hook's ``after_run`` (or
            its fetches) is raised at the next run, on every rank together, instead of at
            once on this rank alone: for engines whose steps hold collectives of their own
            (Lightning's DDP gradient all-reduce), where the other ranks would wait for
            this one inside the next step, never reaching the vote.

    Attributes:
        hooks: the hooks, in call order.
        engine: the engine.
        raw_session: what the hooks receive as their session.
        coord: the session's :class:`Coordinator`.
        should_stop: a hook stopped the session (agreed across ranks).

    Raises:
        TypeError: an item of ``hooks`` is not a :class:`SessionRunHook`, a stateful
            hook's ``state_key`` is not a non-empty str, a hook's ``agreement()`` returned
            something else than an :class:`~lightning_finalops.Agreement`, or
            ``agreement_timeout`` is not a number.
        ValueError: one hook is listed twice, two stateful hooks share a state key, or
            ``agreement_timeout`` is not a finite number of seconds > 0.
    """

    def __init__(
        self,
        hooks: Any,
        engine: Engine,
        argument: str = "hooks",
        *,
        agree_across_ranks: bool = False,
        agreement_timeout: float = 300.0,
        name: Optional[str] = None,
        stop_on_sigterm: Optional[bool] = None,
        defer_failures: bool = False,
        on_preempted: Optional[Callable[[], None]] = None,
    ) -> None:
        self.hooks = check_hooks(hooks, argument)
        hook_state_keys(self.hooks)  # a bad or shared state_key fails here, not at a save
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an Engine, got {type(engine).__name__}.")
        self.engine = engine
        self.raw_session = EngineRawSession(engine, self._checkpointed_digest)
        self.coord = Coordinator()
        self._build_calls()
        # called after each counted run only when the engine overrides it
        self._step_completed: Optional[Callable[[], None]] = (
            engine.step_completed
            if type(engine).step_completed is not Engine.step_completed else None
        )
        #: no hook overrides ``before_run`` or ``after_run``: a run needs no hook calls
        self.idle_per_run = not self._before and not self._after
        self.should_stop = False
        self.created = False
        #: a finished job run again (see :meth:`create`); with no run since, it is no session
        self.finished_at_creation = False
        self._run: Optional[PendingRun] = None
        # The record of every run that has nothing of its own to record (no feeds, options or
        # requests: most runs), reused: start_run gives it each run's context.
        self._plain_run = PendingRun(None, DEFAULT_OPTIONS)
        # Only what the hooks declare is agreed: a session whose hooks declare nothing
        # issues no collective at all.
        declared = [_declared(hook) for hook in self.hooks]
        self._values: Tuple[AgreedValue, ...] = tuple(
            dict.fromkeys(value for agreement in declared for value in agreement.values)
        )
        check_bool(stop_on_sigterm, "stop_on_sigterm", allow_none=True)
        self._stop_on_sigterm = (any(a.sigterm for a in declared) if stop_on_sigterm is None
                                 else stop_on_sigterm)
        self._agree = agree_across_ranks and (any(declared) or self._stop_on_sigterm)
        self._previous_handler: Any = _NOT_INSTALLED
        #: a SIGTERM arrived while the session was open
        self.received_sigterm = False
        self._agreed_preempted = False  # a vote said a rank received SIGTERM
        self._agrees = False  # the session votes (its agreement was created)
        self._handler: Any = None  # the SIGTERM handler it installed
        self._carried_stop = False  # a listener's stop, asked after this run's vote went
        self._defer_failures = check_bool(defer_failures, "defer_failures")
        self._on_preempted = on_preempted
        self._deferred: Optional[BaseException] = None  # raised when every rank read it
        self._agreement_timeout = check_seconds(agreement_timeout, "agreement_timeout")
        self.name = name or f"the session of {argument}"
        self._agreement: Optional[RankAgreement] = None
        self._time_before: Optional[float] = None

    def _build_calls(self) -> None:
        """The hooks' per-run calls, charged to each hook while a sync audit is active.

        Bound methods, looked up once, of the hooks that override them: these loops run at
        every step, and skipping the base class's empty methods is invisible to hooks. The
        calls are rebuilt when an audit starts or ends (the per-run cost of the check is one
        comparison); without an audit they are the bound methods themselves.
        """
        self._audited = sync_audit.active()
        self._before = [
            (i, h, charged(h.before_run, type(h).__name__, "before_run"))
            for i, h in enumerate(self.hooks) if _overrides(h, "before_run")
        ]
        self._after = [
            (i, charged(h.after_run, type(h).__name__, "after_run"))
            for i, h in enumerate(self.hooks) if _overrides(h, "after_run")
        ]
        self._after_calls = [after_run for _, after_run in self._after]
        self._evaluate_hook_fetches_charged = charged(
            self._evaluate_hook_fetches, *sync_audit.HOOK_FETCHES
        )

    def _call_each(self, method: str, *args: Any) -> None:
        """Call every hook's ``method(*args)`` in order (charged to it by a sync audit)."""
        for hook in self.hooks:
            charged(getattr(hook, method), type(hook).__name__, method)(*args)

    @property
    def runs(self) -> int:
        """Runs this session finished."""
        return self.raw_session.runs

    # -- session lifecycle -------------------------------------------------------------------
    def begin(self) -> None:
        """Call every hook's ``begin()`` in order."""
        self._call_each("begin")

    def create(self) -> None:
        """Call every hook's ``after_create_session(raw_session, coord)`` in order, once.

        A finished job run again (a hook's :meth:`~SessionRunHook.job_finished` is True at
        the restored global step, on any rank of a session whose ranks agree) creates no
        session: no ``after_create_session``, the coordinator stops at once, :meth:`end`
        calls no hook unless runs were made anyway, and one INFO line says so. An exception
        abandons the session (:meth:`abandon`) and propagates.
        """
        if self.created:
            return
        self.created = True
        try:
            self._create()
        except BaseException as e:
            self.abandon(e)
            raise

    def _create(self) -> None:
        raw = self.raw_session
        global_step = raw.global_step
        done = [type(h).__name__ for h in self.hooks if h.job_finished(global_step)]
        finished = bool(done)
        if self._agree:
            self._agreement = self.engine.rank_agreement(
                len(self._values), self._agreement_timeout, self.name
            )
            raw.agrees_across_ranks = self._agrees = self._agreement is not None
            if self._agreement is not None:
                # restored when the session ends: an enclosing session's agreed time; a job
                # one rank finds finished (a chief-only hook's state) is finished on all
                self._time_before = agreed_time()
                for value in self._values:
                    value._set(None)
                vote = self._agreement.start(global_step, local_clock(), finished)
                set_agreed_time(vote.clock)
                finished = vote.flags > 0
        if finished:
            logger.info("The job is finished at global step %d (%s): no session is created, "
                        "no step runs and no hook's end() runs.", global_step,
                        ", ".join(done) or "another rank's hooks")
            self.finished_at_creation = True
            self.coord.request_stop()  # runs made anyway (TF allowed them) see no creation
            if self._agreement is not None:
                self._agreement.close()  # every rank saw the same vote: nothing to agree on
                self._leave_agreement()
            return
        if self._stop_on_sigterm:
            self._install_sigterm_handler()
        with raw.saves_wait:
            self._call_each("after_create_session", raw, self.coord)
        raw.flush_checkpoint()  # a stop asked for by it is ignored here (TF's rule)

    def end(self, *, closed: bool = False) -> None:
        """Call every hook's ``end(raw_session)`` in order; an exception skips the later hooks.

        A session that was never created is created first (an engine that skipped its
        creation point). With ``closed`` (a closed session closed again, as TF) the hooks
        get ``end(None)``. Checkpoints asked for in the ends are written after the last
        one. An exception abandons the session (:meth:`abandon`) and propagates.
        """
        self.create()
        if self.is_finished_job:  # no session was created: nothing to end
            self.abandon()
            return
        raw = self.raw_session
        session = None if closed else raw
        agreement = self._agreement
        try:
            if agreement is not None:
                # the last run's vote, so every end() sees what the ranks agreed in it
                vote = agreement.receive(raw.global_step)
                if vote is not None:
                    self._apply_vote(vote, ended=False)
            with raw.saves_wait:
                self._call_each("end", session)
            # This step's file may be on disk already (a session that ends with no stop after
            # a saving run): written again only if the state it holds changed since.
            changed = raw.changed_since_current_step_written()
            if agreement is not None:
                # this rank leaves with a message; ranks ending together also agree whether
                # to rewrite the file (a rewrite may be a collective)
                vote = agreement.leave(raw.global_step, LEFT, flag=changed,
                                       preempted=self.received_sigterm)
                if vote is not None:
                    self._agreed_preempted = self._agreed_preempted or vote.preempted
                    if vote.failures:
                        self._apply_vote(vote, ended=True)  # raises
                    changed = vote.flags > 0
            raw.flush_checkpoint(changed)  # the last step's, with what every end() recorded
            raw.wait_for_save()  # a background save completes before the session ends
        except BaseException as e:
            self.abandon(e)  # the clock restored; the others told, if this rank failed
            raise
        if self._agreement is not None:
            self._leave_agreement()
        raw.forget_outputs()
        self._release_sigterm_handler(ended=True)

    @property
    def is_finished_job(self) -> bool:
        """Stopped at its creation and ran nothing: a finished job restored and run again."""
        return self.finished_at_creation and self.runs == 0

    def abandon(self, error: Optional[BaseException] = None) -> None:
        """The session ends by an exception: leave the run and the agreement, no ``end()``.

        A checkpoint that waited for its step to be final is not written (writing may need
        every rank, and the others may not get there): the previous one stays the latest.
        With ranks that agree, this rank's failure (``error``'s type and text) goes to the
        others in its next vote before the exception propagates here, so they stop at the
        run that reads it and raise :class:`~lightning_finalops.RankFailedError`.
        """
        dropped = self.raw_session.drop_checkpoint()
        if dropped:
            logger.warning("The session ended by an exception before its step was final: "
                           "checkpoint(s) %s not written.", dropped)
        self.abort_run()
        self.fail(error if error is not None else RuntimeError("the session was abandoned"))
        self.raw_session.forget_outputs()
        self._release_sigterm_handler(error=error)

    def _checkpointed_digest(self) -> bytes:
        state = self.engine.checkpointed_state()
        return state_digest(self.state_dict() if state is None else state)

    def flush_checkpoint(self) -> bool:
        """Write the checkpoints hooks asked for that wait for their step to be final.

        For an engine whose step becomes final at a point of its own (Lightning: the end of
        the validation that follows the saving batch). Every rank calls it at that point.

        Returns:
            Whether a callback (a listener's ``after_save``) asks to stop.
        """
        return self.raw_session.flush_checkpoint()

    def fail(self, error: BaseException) -> None:
        """This rank failed (its step or a hook raised): tell the ranks that agree, now.

        Called before the exception propagates here (the adapters' run paths call it): the
        failure goes in this rank's next vote, with ``error``'s type and text, so every
        other rank stops at the run that reads it and raises
        :class:`~lightning_finalops.RankFailedError`. This rank's agreement ends with it;
        the session itself follows TF's rules (the exception propagates, no ``end()``).
        Nothing happens when the session does not agree across ranks, nor for a step's
        ``StopIteration`` (the end of its data: the session ends cleanly and the rank
        leaves with :meth:`end`).
        """
        agreement = self._agreement
        if agreement is None or type(error) is StopIteration:
            return
        if not agreement.done:
            try:
                # At most a short wait: the others may be inside a collective of their own
                # that this rank no longer joins; they find its text in the store then.
                agreement.leave(self.raw_session.global_step, FAILED, error=error,
                                preempted=self.received_sigterm, grace=_FAILURE_GRACE)
            except AgreementError as e:  # the exception that ends this rank stays the one raised
                logger.warning("%s", e)
        self._leave_agreement()

    @property
    def preempted(self) -> bool:
        """Whether a SIGTERM stopped the session (on any rank, when ranks agree).

        With ranks that agree it is what they agreed (the same on every rank, once they
        read the vote that carried it); else whether this process received one.
        """
        return self._agreed_preempted if self._agrees else self.received_sigterm

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("%s is not in the main thread: SIGTERM is not handled.", self.name)
            return
        self._previous_handler = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:  # the handler that _release checks
            if self.received_sigterm:  # a second one: no more waiting, the previous handler
                logger.warning("lightning_finalops: a second SIGTERM: %s passes it on now.",
                               self.name)
                self._release_sigterm_handler(now=True)
                return
            logger.warning("lightning_finalops: SIGTERM received: %s stops %s; every "
                           "hook's end() runs, then the signal's previous handler (a second "
                           "SIGTERM passes it on at once).", self.name,
                           "on every rank one run later" if self._agreement
                           else "after the run in flight")
            self.received_sigterm = True

        self._handler = on_sigterm
        signal.signal(signal.SIGTERM, on_sigterm)

    def _release_sigterm_handler(self, ended: bool = False,
                                 error: Optional[BaseException] = None,
                                 now: bool = False) -> None:
        """Restore the previous SIGTERM handler; call it if the signal came meanwhile.

        Only a handler still in place is replaced (sessions may end out of order). After an
        exception (``error``), the signal is passed on once the exception is logged; with
        ``now`` (a second SIGTERM), at once.
        """
        previous, self._previous_handler = self._previous_handler, _NOT_INSTALLED
        if previous is _NOT_INSTALLED:
            return
        restored = signal.SIG_DFL if previous is None else previous
        if signal.getsignal(signal.SIGTERM) is self._handler:
            signal.signal(signal.SIGTERM, restored)
        if self._on_preempted is not None and error is None and not now:
            if ended and self.preempted:
                self._on_preempted()
            return
        if not self.received_sigterm:
            return
        if error is not None:
            logger.error("lightning_finalops: %s ended by an exception after a SIGTERM; "
                         "passing the signal on.", self.name, exc_info=error)
        if callable(restored):
            restored(signal.SIGTERM, None)
        elif restored == signal.SIG_DFL:
            signal.raise_signal(signal.SIGTERM)  # the process ends, as the signal asked

    def _leave_agreement(self) -> None:
        self._agreement = None
        self.raw_session.agrees_across_ranks = False
        set_agreed_time(self._time_before)

    # -- one run ---------------------------------------------------------------------------
    @property
    def in_run(self) -> bool:
        """Whether a run was started and neither finished nor aborted."""
        return self._run is not None

    def start_run(
        self,
        fetches: Any = None,
        feed_dict: Optional[Mapping[Any, Any]] = None,
        options: Optional[RunOptions] = None,
        *,
        replace: bool = False,
    ) -> PendingRun:
        """Call every hook's ``before_run`` in order, merge their requests, enter the run.

        Args:
            fetches: the user's fetches (for ``run_context.original_args``).
            feed_dict: the user's feeds.
            options: the user's run options.
            replace: abort a run still in flight (one its engine never finished) rather
                than raise.

        Returns:
            The :class:`PendingRun`; the engine runs the step with its ``str_feeds``.

        Raises:
            RuntimeError: a stop was requested earlier, a run is already in flight, or two
                feeds conflict (TF's texts).
            TypeError: a hook returned something else than ``SessionRunArgs``/``None``, or
                asked for an invalid fetch or feed.
            ValueError: a str feed that no callable of the run accepts (with
                ``str_feeds_as_keywords``), or a tensor feed of the wrong shape.
        """
        if replace and self._run is not None:
            self.abort_run()
        if self.should_stop:
            raise RuntimeError(STOP_REQUESTED_MESSAGE)
        if self._run is not None:
            raise RuntimeError(_IN_FLIGHT_MESSAGE)
        if options is not None and not isinstance(options, RunOptions):
            raise TypeError(f"options must be a RunOptions or None, got {type(options).__name__}.")
        if self.idle_per_run and feed_dict is None and options is None:
            self._run = _IDLE_RUN
            return _IDLE_RUN
        if sync_audit._active is not self._audited:  # an audit started or ended
            self._build_calls()
        try:
            self._run = self._start_run(fetches, feed_dict, options)
        except BaseException as e:
            self.fail(e)
            raise
        return self._run

    def _start_run(self, fetches: Any, feed_dict: Optional[Mapping[Any, Any]],
                   options: Optional[RunOptions]) -> PendingRun:
        context = SessionRunContext(
            new_tuple(SessionRunArgs, (fetches, feed_dict, None)), self.raw_session
        )
        if self.raw_session.checkpoint_due and self.raw_session.flush_checkpoint():
            # the previous step's checkpoint, written now that it is final (an engine whose
            # steps are final only at the next run): its listener's stop lands after this run
            context._stop_requested = True
        # A run gets a PendingRun of its own once it has something to record (the user's
        # feeds or options, a hook's request); until then it is the session's plain run.
        pending = (
            PendingRun(context, options or DEFAULT_OPTIONS)
            if feed_dict or options is not None else None
        )
        for i, hook, before_run in self._before:
            request = before_run(context)
            if request is not None:
                if pending is None:
                    pending = PendingRun(context, DEFAULT_OPTIONS)
                pending.add_request(hook, i, request)
        if pending is None:  # the usual run: nothing to merge or enter
            pending = self._plain_run
            pending.context = context
        else:
            pending.merge_feeds(fetches, feed_dict, self.engine.str_feeds_as_keywords)
            if pending.tensor_feeds or pending.options.trace_level:
                pending.enter()
        return pending

    def run_step(self, step: Callable[..., Any]) -> Any:
        """A whole run whose one fetch is ``step``: start it, call ``step``, finish it.

        ``step`` is called with the run's str feeds it accepts, when hooks feed some;
        :meth:`abort_run` replaces :meth:`finish_run` when it raises.

        Args:
            step: the step callable (not a metric).

        Returns:
            What ``step`` returned, as it returned it (nothing is copied).

        Raises:
            RuntimeError: a stop was requested earlier, or a run is already in flight.
            BaseException: whatever the step, a hook or a hook's fetch raised.
        """
        pending = self.start_run(step)
        try:
            feeds = pending.str_feeds
            if sync_audit._active is not None:  # the step's syncs are the user's
                step = charged(step, *sync_audit.USER)
            if feeds:
                outputs = step(**{k: feeds[k] for k in accepted_keywords(step, list(feeds))})
            else:
                outputs = step()
        except BaseException as e:
            self.abort_run()
            self.fail(e)
            raise
        self.finish_run(outputs)
        return outputs

    def finish_run(self, outputs: Any, *, missing_ok: bool = False) -> bool:
        """The step ran: evaluate the hooks' fetches, leave the run, call every ``after_run``.

        The hooks' fetches are evaluated against ``outputs`` (when it is a mapping), then
        the engine's named values; then the run is counted (also when a fetch failed: the
        step ran). An exception in a fetch or in an ``after_run`` skips the later hooks and
        propagates; the stop a hook asked for in this run is then not applied (TF's rule),
        a stop the ranks agreed on is. With ranks that agree, the failure is first posted
        to the other ranks (:meth:`fail`); with ``defer_failures`` it is posted in this
        run's vote and raised at the next run (or at :meth:`end`), on every rank together.

        Args:
            outputs: what the step returned (a mapping makes its keys fetchable by name;
                it is kept as it is, not copied, until the next run).
            missing_ok: with no run in flight (its engine skipped its start), return
                ``False`` rather than raise.

        Returns:
            Whether the session should stop, agreed across ranks through the engine.
        """
        pending = self._run
        if pending is None:
            if missing_ok:
                return False
            raise RuntimeError("finish_run() called without a run in flight.")
        try:
            return self._finish_run(pending, outputs)
        except Exception as e:
            agreement = self._agreement
            if (self._defer_failures and agreement is not None and not agreement.done
                    and self._deferred is None and not isinstance(e, AgreementError)):
                self._defer(agreement, e)
                return self.should_stop
            self.fail(e)
            raise
        except BaseException as e:
            self.fail(e)
            raise

    def _defer(self, agreement: RankAgreement, error: Exception) -> None:
        """Post this rank's failure in its vote; raise it once every rank read that vote."""
        step = self.raw_session.global_step
        logger.error("lightning_finalops: %s failed on this rank at global step %d (%s: %s); "
                     "every rank raises at the next run.", self.name, step,
                     type(error).__name__, error)
        self._deferred = error
        agreement.post_failure(error)  # its text, for the others to read with the vote
        try:
            vote = agreement.receive(step)  # pending when a fetch failed before it was read
            if vote is not None and self._apply_vote(vote):  # a rank failed too: raises
                self.should_stop = True
        except AgreementError as e:  # the hook's exception stays the one raised
            logger.warning("%s", e)
            raise error from None
        if agreement.done:  # a rank left: nobody reads another vote
            raise error
        self._send(agreement, False, failed=True)

    def _send(self, agreement: RankAgreement, stop: bool, failed: bool = False) -> None:
        """Issue this run's vote: the stop request, the clock, SIGTERM, the declared values."""
        agreement.send(stop, local_clock(), preempted=self.received_sigterm,
                       values=[value.posted for value in self._values], failed=failed)
        for value in self._values:
            value.posted = 0.0  # a post counts in one vote

    def _finish_run(self, pending: PendingRun, outputs: Any) -> bool:
        raw = self.raw_session
        raw.step_outputs = (
            outputs if type(outputs) is dict or isinstance(outputs, Mapping) else EMPTY
        )
        raw.step_outputs_fresh = True
        context = pending.context
        try:
            results: Optional[Dict[int, Any]] = None
            try:
                if pending.hook_fetches or pending.entered:
                    try:
                        if pending.hook_fetches:
                            results = self._evaluate_hook_fetches_charged(pending)
                    finally:
                        pending.exit()
            finally:
                # The step ran, so the run counts even when a hook's fetch failed: the
                # global step and the weights advance together.
                raw.runs += 1
                if self._step_completed is not None:
                    self._step_completed()
            agreement = self._agreement
            agreed_stop = False
            if agreement is not None:
                vote = agreement.receive(raw.global_step)
                if vote is not None:
                    agreed_stop = self._apply_vote(vote)
                    # agreed on every rank: it holds even if an after_run fails here now
                    self.should_stop = self.should_stop or agreed_stop
            requested = consistent = False
            if context is not None:  # an idle run has no context and no after_run
                # raw.saves_wait inline: a with-block costs ~0.23 us more per run here
                raw.deferring = True
                try:
                    self._call_after_runs(pending, context, results)
                finally:
                    raw.deferring = False
                requested = context._stop_requested
                consistent = context._consistent_stop
            if agreement is not None and not agreement.done:
                # A request made in this run reaches the other ranks with this vote and
                # stops every rank after the next run; a rank-consistent one applies now.
                # After a vote that said a rank left, no rank sends another. The vote goes
                # before the checkpoint write, which may be a collective: a rank that waits
                # in its departure for this vote is never left waiting behind that write.
                self._send(agreement, (requested and not consistent) or self._carried_stop)
                self._carried_stop = False
            if (context is not None and raw.checkpoint_due
                    and self.engine.step_final_after_run):
                self._flush_after_run(context, agreed_stop)
                if context._stop_requested and not requested:  # a listener's after_save
                    if agreement is None:
                        requested = True
                    else:
                        self._carried_stop = True  # in the next run's vote
            if agreement is None:
                self.should_stop = self.should_stop or requested or self.received_sigterm
            else:  # (an agreed stop was applied when its vote was read)
                self.should_stop = self.should_stop or consistent
        finally:
            raw.step_outputs_fresh = False
            self._run = None
            if pending is self._plain_run:
                pending.context = None  # the session keeps no run's fetches (the step)
        return self.should_stop

    def _flush_after_run(self, context: SessionRunContext, agreed_stop: bool) -> None:
        """Write the checkpoint the run asked for, unless the session ends after this run.

        Then the session's ``end()`` s may record more at this step, and the checkpoint is
        written after them. A truthy callback asks to stop after this run.
        """
        requested, consistent = context._stop_requested, context._consistent_stop
        ends = agreed_stop or (requested and (self._agreement is None or consistent))
        if not ends and self.raw_session.flush_checkpoint():
            context._stop_requested = True

    def _call_after_runs(self, pending: PendingRun, context: SessionRunContext,
                         results: Optional[Dict[int, Any]]) -> None:
        no_results = (
            NO_RESULTS if pending is self._plain_run
            else new_tuple(SessionRunValues, (None, pending.options, pending.run_metadata))
        )
        if not results:
            for after_run in self._after_calls:
                after_run(context, no_results)
            return
        for i, after_run in self._after:
            if i in results:
                after_run(context, new_tuple(
                    SessionRunValues, (results[i], pending.options, pending.run_metadata)
                ))
            else:
                after_run(context, no_results)

    def _apply_vote(self, vote: Vote, ended: bool = False) -> bool:
        """Apply what the ranks agreed; return whether the session stops after this run.

        Args:
            vote: what the ranks agreed.
            ended: read after this rank's ``end()`` s (its departure vote).

        Raises:
            RankFailedError: a rank failed (its exception's type and text in the message).
            BaseException: this rank's own deferred failure, once every rank read it.
        """
        set_agreed_time(vote.clock)
        for value, total in zip(self._values, vote.values):
            value._set(total)
        if vote.preempted and not self._agreed_preempted:
            self._agreed_preempted = True
            if not self.received_sigterm:
                logger.warning("lightning_finalops: another rank received SIGTERM: %s stops "
                               "on this rank after global step %d.", self.name,
                               self.raw_session.global_step)
        if not vote.departed:
            return vote.stop or vote.preempted
        step = self.raw_session.global_step
        if vote.failures:
            if self._deferred is not None:  # every rank read this rank's failure: raise it
                error, self._deferred = self._deferred, None
                raise error
            raise rank_failed(self.name, vote.failures, step,
                              " (its hooks' end() ran before it heard)" if ended else
                              " (no hook's end() runs, as after an exception here)")
        agreement = self._agreement
        me = agreement.rank if agreement is not None else -1
        others = {r: why for r, why in vote.departed.items() if r != me}
        if others:
            logger.warning(
                "lightning_finalops: %s; %s stops on this rank after global step %d.",
                "; ".join(f"rank {r} {DEPARTURES[why]}" for r, why in sorted(others.items())),
                self.name, step,
            )
        return True

    def abort_run(self) -> None:
        """The step raised (or never finished): leave the run without any ``after_run``."""
        pending, self._run = self._run, None
        self.raw_session.step_outputs_fresh = False
        if pending is self._plain_run:
            pending.context = None
        elif pending is not None and pending.entered:
            pending.exit()

    def _evaluate_hook_fetches(self, pending: PendingRun) -> Dict[int, Any]:
        namespaces = self.raw_session.namespaces()
        return {
            i: evaluate(
                fetches, namespaces, pending.str_feeds,
                f"{type(self.hooks[i]).__name__}.before_run fetches",
            )
            for i, fetches in pending.hook_fetches
        }

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """Every stateful hook's ``state_dict()`` under its key."""
        return hook_state_dict(self.hooks)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Give each stateful hook the state saved under its key.

        Args:
            state: what :meth:`state_dict` returned.
            strict: raise if saved non-empty state has no hook; else drop it.

        Raises:
            TypeError: ``state`` is not a mapping.
            ValueError: with ``strict``, a saved non-empty state has no hook to go to. A
                hook without saved state keeps its own (it was added since the save), and
                empty states match anything: adding or removing a stateless hook, or adding
                a stateful one, never breaks a resume.
        """
        load_hook_state_dict(self.hooks, state, strict)
