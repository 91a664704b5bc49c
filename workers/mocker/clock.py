"""Clocks for the mocker: virtual (simulated time, instant) or wall (really waits).

Both answer ``now()`` in seconds and ``advance(dt)``: the mocker calls ``advance`` with the
modelled duration of each pass. A virtual clock just adds ``dt`` (a replay of hours of traffic
runs in seconds, and times are exact); a wall clock sleeps ``dt`` so that a live mocker worker
serves tokens at the modelled pace.
"""

from __future__ import annotations

import math
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def advance(self, dt: float) -> None: ...


def _check_dt(dt: float) -> None:
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) \
            or dt < 0:
        raise ValueError(f"a clock can only advance by a finite number of seconds >= 0, got {dt!r}")


class VirtualClock:
    """Simulated time: starts at ``start`` and moves only when advanced."""

    def __init__(self, start: float = 0.0) -> None:
        if not isinstance(start, (int, float)) or not math.isfinite(start):
            raise ValueError(f"start must be a finite number of seconds, got {start!r}")
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> None:
        _check_dt(dt)
        self._now += dt

    def advance_to(self, t: float) -> None:
        """Jump forward to ``t`` (no-op when ``t`` is in the past), e.g. to the next arrival."""
        if t > self._now:
            self._now = float(t)


class WallClock:
    """Real time (``time.monotonic``); advancing sleeps."""

    def now(self) -> float:
        return time.monotonic()

    def advance(self, dt: float) -> None:
        _check_dt(dt)
        if dt > 0:
            time.sleep(dt)


__all__ = ["Clock", "VirtualClock", "WallClock"]
