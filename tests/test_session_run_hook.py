"""The value objects and base classes of ``session_run_hook.py`` (tf_semantics.md §1)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from lightning_finalops import (
    Coordinator,
    RunMetadata,
    RunOptions,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)

# -- SessionRunArgs ------------------------------------------------------------------------------


def test_session_run_args_defaults_feed_dict_and_options_to_none():
    args = SessionRunArgs("loss")
    assert args.fetches == "loss"
    assert args.feed_dict is None
    assert args.options is None


def test_session_run_args_requires_fetches():
    with pytest.raises(TypeError):
        SessionRunArgs()  # type: ignore[call-arg]


def test_session_run_args_is_a_namedtuple_with_tf_field_order():
    options = RunOptions()
    args = SessionRunArgs(["a"], {"x": 1}, options)
    assert isinstance(args, tuple)
    assert SessionRunArgs._fields == ("fetches", "feed_dict", "options")
    assert tuple(args) == (["a"], {"x": 1}, options)
    assert args == SessionRunArgs(fetches=["a"], feed_dict={"x": 1}, options=options)


def test_session_run_args_accepts_none_fetches():
    assert SessionRunArgs(None).fetches is None


# -- SessionRunContext ---------------------------------------------------------------------------


def test_session_run_context_exposes_original_args_and_session():
    args = SessionRunArgs("a", {"b": 1})
    session = object()
    context = SessionRunContext(args, session)  # type: ignore[arg-type]
    assert context.original_args is args
    assert context.session is session


def test_session_run_context_stop_is_not_requested_initially():
    context = SessionRunContext(SessionRunArgs(None), None)  # type: ignore[arg-type]
    assert context.stop_requested is False


def test_session_run_context_request_stop_sets_stop_requested():
    context = SessionRunContext(SessionRunArgs(None), None)  # type: ignore[arg-type]
    context.request_stop()
    assert context.stop_requested is True
    context.request_stop()  # idempotent
    assert context.stop_requested is True


def test_session_run_context_attributes_are_read_only():
    context = SessionRunContext(SessionRunArgs(None), None)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        context.stop_requested = True  # type: ignore[misc]
    with pytest.raises(AttributeError):
        context.original_args = SessionRunArgs("x")  # type: ignore[misc]


# -- SessionRunValues ----------------------------------------------------------------------------


def test_session_run_values_is_a_namedtuple_with_tf_fields():
    options, metadata = RunOptions(), RunMetadata()
    values = SessionRunValues({"a": 1}, options, metadata)
    assert SessionRunValues._fields == ("results", "options", "run_metadata")
    assert values.results == {"a": 1}
    assert values.options is options
    assert values.run_metadata is metadata
    assert tuple(values) == ({"a": 1}, options, metadata)


def test_run_metadata_has_no_profile_by_default():
    assert RunMetadata().profile is None


# -- RunOptions ----------------------------------------------------------------------------------


def test_run_options_defaults_to_no_trace_and_no_flags():
    options = RunOptions()
    assert options.trace_level == RunOptions.NO_TRACE == 0
    assert (options.profile_memory, options.record_shapes, options.with_stack) == (
        False,
        False,
        False,
    )


def test_run_options_trace_levels_are_ordered_like_tf():
    assert (
        RunOptions.NO_TRACE
        < RunOptions.SOFTWARE_TRACE
        < RunOptions.HARDWARE_TRACE
        < RunOptions.FULL_TRACE
    )


@pytest.mark.parametrize("level", [-1, 4, 1.5, "FULL_TRACE"])
def test_run_options_rejects_an_unknown_trace_level(level):
    with pytest.raises(ValueError, match="trace_level"):
        RunOptions(trace_level=level)


def test_run_options_merged_takes_the_max_trace_level():
    options = RunOptions(trace_level=RunOptions.HARDWARE_TRACE)
    options = options.merged(RunOptions(trace_level=RunOptions.SOFTWARE_TRACE))
    assert options.trace_level == RunOptions.HARDWARE_TRACE
    options = options.merged(RunOptions(trace_level=RunOptions.FULL_TRACE))
    assert options.trace_level == RunOptions.FULL_TRACE


def test_run_options_merged_ors_the_flags():
    options = RunOptions(profile_memory=True)
    options = options.merged(RunOptions(record_shapes=True)).merged(RunOptions())
    assert options.profile_memory is True
    assert options.record_shapes is True
    assert options.with_stack is False
    assert options.merged(RunOptions(with_stack=True)).with_stack is True


def test_run_options_merged_changes_neither_operand():
    mine = RunOptions(trace_level=RunOptions.FULL_TRACE, with_stack=True)
    other = RunOptions(trace_level=RunOptions.SOFTWARE_TRACE)
    mine.merged(other)
    assert other == RunOptions(trace_level=RunOptions.SOFTWARE_TRACE)
    assert mine == RunOptions(trace_level=RunOptions.FULL_TRACE, with_stack=True)


def test_run_options_are_immutable_so_a_hook_cannot_change_them_for_later_runs():
    options = RunOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.trace_level = RunOptions.FULL_TRACE  # type: ignore[misc]


@pytest.mark.parametrize("flag", ["profile_memory", "record_shapes", "with_stack"])
def test_run_options_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=f"RunOptions {flag} must be a bool, got str"):
        RunOptions(**{flag: "no"})


def test_run_options_merged_rejects_a_non_run_options():
    with pytest.raises(TypeError, match="RunOptions"):
        RunOptions().merged({"trace_level": 3})  # type: ignore[arg-type]


# -- Coordinator ---------------------------------------------------------------------------------


def test_coordinator_should_not_stop_initially():
    assert Coordinator().should_stop() is False


def test_coordinator_request_stop_makes_should_stop_true():
    coord = Coordinator()
    coord.request_stop()
    assert coord.should_stop() is True


def test_coordinator_without_exception_raises_nothing():
    coord = Coordinator()
    coord.request_stop()
    coord.raise_requested_exception()  # nothing to raise


def test_coordinator_raise_requested_exception_reraises_the_given_exception():
    coord = Coordinator()
    error = ValueError("thread failed")
    coord.request_stop(error)
    with pytest.raises(ValueError) as info:
        coord.raise_requested_exception()
    assert info.value is error


def test_coordinator_keeps_the_first_exception():
    coord = Coordinator()
    first, second = ValueError("first"), KeyError("second")
    coord.request_stop(first)
    coord.request_stop(second)
    coord.request_stop()
    with pytest.raises(ValueError) as info:
        coord.raise_requested_exception()
    assert info.value is first


def test_coordinator_request_stop_rejects_a_non_exception():
    coord = Coordinator()
    with pytest.raises(TypeError, match="exception"):
        coord.request_stop("boom")  # type: ignore[arg-type]
    assert coord.should_stop() is False


def test_coordinator_clear_stop_forgets_stop_and_exception():
    coord = Coordinator()
    coord.request_stop(ValueError("x"))
    coord.clear_stop()
    assert coord.should_stop() is False
    coord.raise_requested_exception()  # the exception is forgotten too


def test_coordinator_wait_for_stop_times_out_false():
    coord = Coordinator()
    start = time.monotonic()
    assert coord.wait_for_stop(0.05) is False
    assert time.monotonic() - start >= 0.04


def test_coordinator_wait_for_stop_returns_true_when_already_stopped():
    coord = Coordinator()
    coord.request_stop()
    assert coord.wait_for_stop(0) is True


def test_coordinator_wait_for_stop_wakes_when_another_thread_requests_stop():
    coord = Coordinator()
    thread = threading.Timer(0.02, coord.request_stop)
    thread.start()
    try:
        assert coord.wait_for_stop(10) is True
    finally:
        thread.join()


# -- SessionRunHook ------------------------------------------------------------------------------


def test_base_hook_methods_are_no_ops():
    hook = SessionRunHook()
    context = SessionRunContext(SessionRunArgs(None), None)  # type: ignore[arg-type]
    hook.begin()
    hook.after_create_session(None, Coordinator())  # type: ignore[arg-type]
    assert hook.before_run(context) is None
    hook.after_run(context, SessionRunValues(None, RunOptions(), RunMetadata()))
    hook.end(None)
    assert context.stop_requested is False


def test_base_hook_state_dict_is_empty():
    assert SessionRunHook().state_dict() == {}


def test_base_hook_load_state_dict_accepts_empty_state():
    SessionRunHook().load_state_dict({})


def test_base_hook_load_state_dict_rejects_state():
    with pytest.raises(ValueError, match="keeps no state"):
        SessionRunHook().load_state_dict({"step": 3})


def test_hook_state_key_is_the_class_qualname():
    class CountingHook(SessionRunHook):
        pass

    assert SessionRunHook().state_key == "SessionRunHook"
    assert CountingHook().state_key == CountingHook.__qualname__
