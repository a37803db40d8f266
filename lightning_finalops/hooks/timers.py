"""``SecondOrStepTimer``: the one trigger schedule every periodic hook shares (TF's rules)."""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

from lightning_finalops.distributed import agreed_time, set_local_clock
from lightning_finalops.validation import check_int, check_seconds

__all__ = ["NeverTriggerTimer", "SecondOrStepTimer", "clock", "now"]

# Hooks read the time through this name, so tests control time without sleeping
# (``monkeypatch.setattr(lightning_finalops.hooks.timers, "clock", fake)``). Monotonic: a
# period or a duration never jumps with the wall clock (NTP, a daylight-saving change).
clock: Callable[[], float] = time.monotonic

# The agreement sends this rank's clock: this module's ``clock``, read at each call, so a
# replaced clock is the one the ranks agree on.
set_local_clock(lambda: clock())


def now() -> float:
    """The time periodic hooks decide on: the same value on every rank of a session.

    With one process it is ``clock()`` (monotonic seconds). While a session of several
    ranks runs, it is rank 0's ``clock()`` as the ranks last agreed on it (at session
    creation, then once per run, one run behind), so a decision taken from the time
    (``every_n_secs``, ``save_secs``) comes out the same on every rank at the same global
    step. :class:`SecondOrStepTimer` reads it;
    a hook with a schedule of its own should too.
    """
    agreed = agreed_time()
    return clock() if agreed is None else agreed


class SecondOrStepTimer:
    """Triggers at most every ``every_secs`` seconds or every ``every_steps`` steps.

    Time is read through :func:`now`: under several ranks, rank 0's clock as agreed by the
    session, so every rank triggers at the same step.

    ``should_trigger_for_step(step)`` is True the first time, False for the step it last
    triggered at, then True once ``every_secs`` seconds or ``every_steps`` steps have passed
    since it last triggered (``update_last_triggered_step`` records that).

    Args:
        every_secs: seconds between triggers: a finite number >= 0 (0: every step).
        every_steps: steps between triggers: an int >= 1.
        secs_argument: the name ``every_secs`` has in error messages (a hook passes its
            own argument's name, such as ``"save_secs"``).
        steps_argument: likewise for ``every_steps``.

    Raises:
        ValueError: ``"Either every_secs or every_steps should be provided."`` or
            ``"Can not provide both every_secs and every_steps."`` (TF's messages), then
            ``every_secs`` < 0 or not finite, or ``every_steps`` < 1.
        TypeError: a period is not a number (steps: not an int; bools are neither).
    """

    def __init__(self, every_secs: Optional[float] = None,
                 every_steps: Optional[int] = None, *, secs_argument: str = "every_secs",
                 steps_argument: str = "every_steps") -> None:
        self.reset()
        if every_secs is None and every_steps is None:
            raise ValueError("Either every_secs or every_steps should be provided.")
        if every_secs is not None and every_steps is not None:
            raise ValueError("Can not provide both every_secs and every_steps.")
        # TF's rule: 0 seconds is a timer that triggers at every new step
        self._every_secs = check_seconds(every_secs, secs_argument, allow_none=True,
                                         allow_zero=True)
        self._every_steps = check_int(every_steps, steps_argument, minimum=1, allow_none=True)

    @property
    def uses_time(self) -> bool:
        """Whether it triggers on seconds (so its hook needs the ranks' agreed clock)."""
        return getattr(self, "_every_secs", None) is not None

    def reset(self) -> None:
        """Forget the last trigger: the next ``should_trigger_for_step`` is True."""
        self._last_triggered_step: Optional[int] = None
        self._last_triggered_time: Optional[float] = None

    def should_trigger_for_step(self, step: int) -> bool:
        """Whether ``step`` is due: first call, or enough seconds/steps since the last trigger."""
        if self._last_triggered_step is None:
            return True
        if self._last_triggered_step == step:
            return False
        if self._every_secs is not None:
            assert self._last_triggered_time is not None
            if now() >= self._last_triggered_time + self._every_secs:
                return True
        if self._every_steps is not None:
            if step >= self._last_triggered_step + self._every_steps:
                return True
        return False

    def update_last_triggered_step(self, step: int) -> Tuple[Optional[float], Optional[int]]:
        """Record a trigger at ``step``; return ``(elapsed_secs, elapsed_steps)`` since the last.

        Both are ``None`` the first time.
        """
        current = now()
        if self._last_triggered_time is None:
            elapsed_secs, elapsed_steps = None, None
        else:
            assert self._last_triggered_step is not None
            elapsed_secs = current - self._last_triggered_time
            elapsed_steps = step - self._last_triggered_step
        self._last_triggered_time = current
        self._last_triggered_step = step
        return elapsed_secs, elapsed_steps

    def last_triggered_step(self) -> Optional[int]:
        """The step of the last trigger, or ``None``."""
        return self._last_triggered_step


class NeverTriggerTimer(SecondOrStepTimer):
    """A timer that never triggers."""

    def __init__(self) -> None:
        self.reset()

    def should_trigger_for_step(self, step: int) -> bool:
        """Always False."""
        return False

    def update_last_triggered_step(self, step: int) -> Tuple[Optional[float], Optional[int]]:
        """Records nothing; returns ``(None, None)``."""
        return None, None

    def last_triggered_step(self) -> Optional[int]:
        """Always ``None``."""
        return None
