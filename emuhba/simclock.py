"""A virtual-time asyncio event loop, for measuring a queuing *model* rather than this machine.

:class:`VirtualTimeLoop` is an ordinary selector event loop whose ``time()`` is a number it
keeps itself. Whenever nothing is ready to run, instead of sleeping until the earliest timer it
jumps the clock straight to that timer. Callbacks take no virtual time at all; only timers move
the clock. So a 5 ms device service time costs nothing in wall time, and a simulation of
thousands of requests outstanding at once runs as fast as Python can execute the callbacks, with
the same result on every run.

Everything built on ``loop.time()``, ``call_later``/``call_at``, ``asyncio.sleep``,
``asyncio.wait_for`` and friends follows the virtual clock. Real file descriptors (including
the self-pipe that ``call_soon_threadsafe`` writes to) are still polled, without waiting, on
every iteration; but a worker thread's real duration is invisible to the virtual clock, which
does not wait for it while timers are pending. Code under simulation should model its delays
with timers, not threads.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class VirtualClockStalled(RuntimeError):
    """Nothing is ready, no timer is pending, and no file descriptor became ready in time:
    the simulated system is deadlocked (everything waits for something that never comes)."""


class _VirtualSelector(selectors.BaseSelector):
    """A real selector that never blocks while a timer is pending: it advances the loop's
    virtual clock by the timeout instead."""

    def __init__(self, clock: VirtualTimeLoop, stall_timeout: float | None) -> None:
        self._clock = clock
        self._real = selectors.DefaultSelector()
        self._stall_timeout = stall_timeout

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        # The event loop asks for ``timeout`` = time until its earliest timer (0 when callbacks
        # are ready, None when there is no timer at all).
        events = self._real.select(0)
        if events:
            return events
        if timeout is None:
            # No timer: only a real event (another thread, a socket) can make progress.
            events = self._real.select(self._stall_timeout)
            if not events and self._stall_timeout is not None:
                raise VirtualClockStalled(
                    f"virtual clock stalled at t={self._clock.time():.9f}s: nothing ready, no "
                    f"timer pending, no I/O within {self._stall_timeout}s of real time")
            return events
        if timeout > 0:
            self._clock.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop on a virtual clock that starts at ``start`` seconds.

    ``stall_timeout`` (real seconds): when the loop has nothing ready and no timer, it waits this
    long for real I/O and then raises :class:`VirtualClockStalled` out of ``run_*``; None (the
    default) waits forever, like an ordinary loop.
    """

    def __init__(self, start: float = 0.0, *, stall_timeout: float | None = None) -> None:
        self._now = float(start)
        # How many times the clock jumped forward (an idle loop waiting for its next timer).
        self.jumps = 0
        super().__init__(_VirtualSelector(self, stall_timeout))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``; timers that fall due run on the next
        iteration. (The loop does this by itself when idle; tests may call it directly.)"""
        if seconds < 0:
            raise ValueError(f"the virtual clock only moves forward (asked {seconds})")
        self._now += seconds
        self.jumps += 1


def new_event_loop(start: float = 0.0, *, stall_timeout: float | None = None) -> VirtualTimeLoop:
    return VirtualTimeLoop(start, stall_timeout=stall_timeout)


def run(main: Coroutine[Any, Any, T], *, start: float = 0.0,
        stall_timeout: float | None = None, debug: bool | None = None) -> T:
    """``asyncio.run`` on a fresh :class:`VirtualTimeLoop` (which is closed afterwards)."""
    with asyncio.Runner(debug=debug,
                        loop_factory=lambda: VirtualTimeLoop(start, stall_timeout=stall_timeout)
                        ) as runner:
        return runner.run(main)
