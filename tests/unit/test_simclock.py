"""The virtual-time event loop: timers in order, the clock jumps, nothing really sleeps."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from emuhba import simclock
from emuhba.simclock import VirtualClockStalled, VirtualTimeLoop


def test_timers_fire_in_time_order_and_ties_in_the_order_scheduled() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, float]] = []
        done = loop.create_future()

        def note(name: str) -> None:
            fired.append((name, loop.time()))
            if len(fired) == 6:
                done.set_result(None)

        loop.call_later(3.0, note, "c")
        loop.call_later(1.0, note, "a")
        loop.call_at(2.0, note, "b1")
        loop.call_at(2.0, note, "b2")
        loop.call_later(0.5e-3, note, "first")
        loop.call_soon(note, "now")
        await done
        return fired

    assert simclock.run(main()) == [
        ("now", 0.0), ("first", 0.5e-3), ("a", 1.0), ("b1", 2.0), ("b2", 2.0), ("c", 3.0)]


def test_the_clock_jumps_to_the_next_timer_and_starts_where_told() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        seen = [loop.time()]
        await asyncio.sleep(10)
        seen.append(loop.time())
        await asyncio.sleep(0.005)
        seen.append(loop.time())
        return seen

    assert simclock.run(main(), start=100.0) == [100.0, 110.0, 110.005]


def test_callbacks_take_no_virtual_time() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        before = loop.time()
        # Real work between two awaits: the virtual clock must not see it.
        deadline = time.perf_counter() + 0.02
        while time.perf_counter() < deadline:
            await asyncio.sleep(0)
        return before, loop.time()

    before, after = simclock.run(main())
    assert before == after == 0.0


def test_ten_virtual_seconds_take_well_under_a_second_of_wall_time() -> None:
    async def main() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        ticks = 0
        # 10 s in 5 ms steps: 2,000 timers, as a device model would schedule them.
        while loop.time() < 10.0 - 1e-9:
            await asyncio.sleep(0.005)
            ticks += 1
        return loop.time(), ticks

    started = time.perf_counter()
    now, ticks = simclock.run(main())
    wall = time.perf_counter() - started
    assert ticks == 2000
    assert now == pytest.approx(10.0, abs=1e-9)
    assert wall < 1.0, f"10 virtual seconds took {wall:.3f} s of wall time"


def test_timeouts_run_on_the_virtual_clock() -> None:
    async def main() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        never: asyncio.Future[None] = loop.create_future()
        try:
            await asyncio.wait_for(never, timeout=30.0)
        except TimeoutError:
            return True, loop.time()
        return False, loop.time()

    started = time.perf_counter()
    timed_out, now = simclock.run(main())
    assert timed_out
    assert now == pytest.approx(30.0)
    assert time.perf_counter() - started < 1.0


def test_a_cancelled_timer_does_not_fire_and_does_not_hold_the_clock() -> None:
    async def main() -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        loop.call_later(5.0, fired.append, "cancelled").cancel()
        loop.call_later(1.0, fired.append, "kept")
        await asyncio.sleep(2.0)
        return fired, loop.time()

    assert simclock.run(main()) == (["kept"], 2.0)


def test_a_thread_wakes_the_loop_when_no_timer_is_pending() -> None:
    async def main() -> str:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[str] = loop.create_future()

        def worker() -> None:
            time.sleep(0.01)
            loop.call_soon_threadsafe(answer.set_result, "from the thread")

        threading.Thread(target=worker).start()
        return await answer

    assert simclock.run(main(), stall_timeout=5.0) == "from the thread"


def test_a_deadlocked_simulation_is_reported_not_hung() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()  # nobody will ever set it

    started = time.perf_counter()
    with pytest.raises(VirtualClockStalled, match=re.escape("stalled at t=0.000000000s")):
        simclock.run(main(), stall_timeout=0.05)
    assert time.perf_counter() - started < 2.0


def test_the_clock_only_moves_forward() -> None:
    loop = VirtualTimeLoop(start=1.0)
    try:
        loop.advance(0.25)
        assert loop.time() == 1.25
        with pytest.raises(ValueError):
            loop.advance(-0.1)
        assert loop.time() == 1.25
    finally:
        loop.close()


def test_same_program_same_trace() -> None:
    async def main() -> list[tuple[int, float]]:
        loop = asyncio.get_running_loop()
        trace: list[tuple[int, float]] = []

        async def worker(n: int) -> None:
            for step in range(20):
                await asyncio.sleep(0.001 * ((n * 7 + step * 3) % 5 + 1))
                trace.append((n, loop.time()))

        await asyncio.gather(*(worker(n) for n in range(8)))
        return trace

    first = simclock.run(main())
    assert len(first) == 160
    assert simclock.run(main()) == first


def test_the_loop_is_a_real_asyncio_loop_with_the_virtual_time() -> None:
    async def main() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(1.5)
        return isinstance(loop, VirtualTimeLoop), loop.time()

    assert simclock.run(main()) == (True, 1.5)
