"""Each rule of the Storport model as the port driver implements it, one test (or a few) per rule:
queue depth, the eight queue controls, BUSY retry, hierarchical error recovery, the latency
histogram and the counters. The SCSIport model has its own file (test_scsiport.py).

The miniports here are real ones over real logical units (GatedMiniport from test_port, the
disk miniport), or StuckDevice below: a device that stops answering some requests and gives
them back only to a chosen level of task management, to drive the error-recovery ladder.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import pytest

from emuhba.miniport import Miniport, PortConfiguration, PortServices
from emuhba.port import (
    DEFAULT_REQUEST_TIMEOUT,
    LATENCY_BUCKET_LIMITS_US,
    LATENCY_BUCKETS,
    LatencyHistogram,
    LunQueue,
    PortDriver,
)
from emuhba.srb import ResetKind, ScsiStatus, Srb, SrbFunction, SrbStatus
from miniports.disk import DiskMiniport
from tests.unit.test_port import (
    Completions,
    GatedMiniport,
    prime,
    ram_unit,
    rw_srb,
    settle,
    started,
)


def tags(srbs: list[Srb]) -> list[int]:
    return [s.queue_tag for s in srbs]


def started_tags(mp: GatedMiniport) -> list[int]:
    return tags(mp.started)


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


def unit(port: PortDriver, lun: int = 0, target_id: int = 0) -> LunQueue:
    lq = port.lun_queue(0, target_id, lun)
    assert lq is not None
    return lq


# ------------------------------------------------------------------------------ queue depth


class DepthChecker(GatedMiniport):
    """Fails the test from inside hw_start_io the moment a unit has more than its depth."""

    def __init__(self, depths: dict[int, int]) -> None:
        super().__init__(luns=len(depths), depth=1)
        self.depths = depths
        self.at_once: dict[int, int] = dict.fromkeys(depths, 0)
        self.most: dict[int, int] = dict.fromkeys(depths, 0)

    def hw_start_io(self, srb: Srb) -> bool:
        if srb.function == SrbFunction.EXECUTE_SCSI:
            self.at_once[srb.lun] += 1
            assert self.at_once[srb.lun] <= self.depths[srb.lun], srb
            self.most[srb.lun] = max(self.most[srb.lun], self.at_once[srb.lun])
        return super().hw_start_io(srb)

    def _finish(self, srb: Srb) -> None:
        if srb.function == SrbFunction.EXECUTE_SCSI:
            self.at_once[srb.lun] -= 1
        super()._finish(srb)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_miniport_never_sees_more_than_the_depth_per_unit(seed: int) -> None:
    rng = random.Random(seed)
    depths = {0: 1, 1: 3, 2: 8}
    mp = DepthChecker(depths)
    port = await started(mp)
    for lun, depth in depths.items():
        assert port.set_queue_depth(0, 0, lun, depth) == depth
    done = Completions()
    srbs = [rw_srb(lun=rng.randrange(3), tag=i, done=done) for i in range(300)]
    submitted = 0
    while len(done.srbs) < len(srbs):
        for _ in range(rng.randrange(0, 20)):
            if submitted < len(srbs):
                port.submit(srbs[submitted])
                submitted += 1
        if mp.started:
            mp.release(rng.randrange(1, len(mp.started) + 1))
        await settle()
    done.assert_once(srbs)
    assert mp.most == depths  # every unit reached its depth, none went past it
    for lun in depths:  # and each unit's requests completed in the order they came
        mine = [s.queue_tag for s in done.srbs if s.lun == lun]
        assert mine == sorted(mine)


async def test_depth_is_255_at_most_without_extended_srbs_and_at_least_1() -> None:
    classic = await started(GatedMiniport(depth=1000, extended=False))
    assert classic.set_queue_depth(0, 0, 0, 4096) == 255
    assert classic.set_queue_depth(0, 0, 0, 0) == 1
    assert unit(classic).queue_depth == 1
    extended = await started(GatedMiniport(depth=1000, extended=True))
    assert extended.set_queue_depth(0, 0, 0, 4096) == 4096


async def test_extended_srbs_allow_thousands_outstanding_on_one_unit() -> None:
    depth = 4096
    mp = DiskMiniport.from_luns([("ram", 1 << 20)], target_port_name="iqn.test,t,1",
                                queue_depth=depth, slots=8192, latency_s=0.2)
    port = await started(mp)
    done = Completions()
    srbs = [rw_srb(lba=i % 256, tag=i, done=done) for i in range(depth + 10)]
    for srb in srbs:
        port.submit(srb)
    lq = unit(port)
    assert lq.queue_depth == depth and lq.outstanding == depth and lq.held == 10
    assert mp.controller.in_use == depth
    await done.wait(len(srbs), timeout=30)
    done.assert_once(srbs)
    assert lq.peak_outstanding == depth
    await port.stop()


async def test_lowering_the_depth_holds_new_requests_until_outstanding_drops_below() -> None:
    mp = GatedMiniport(depth=8)
    port = await started(mp)
    done = Completions()
    for i in range(8):
        port.submit(rw_srb(tag=i, done=done))
    assert port.set_queue_depth(0, 0, 0, 2) == 2
    for i in range(8, 11):
        port.submit(rw_srb(tag=i, done=done))
    lq = unit(port)
    assert lq.outstanding == 8 and lq.held == 3  # over the new depth: nothing more goes down
    mp.release(6)
    await settle()
    assert started_tags(mp) == [6, 7]  # 2 outstanding: not below 2 yet
    mp.release(1)
    await settle()
    assert started_tags(mp) == [7, 8]  # 1 < 2: one more, back at the depth
    assert port.set_queue_depth(0, 0, 0, 8) == 8  # raising it sends what was held at once
    assert started_tags(mp) == [7, 8, 9, 10]
    mp.release()
    await done.wait(11)
    assert tags(done.srbs) == list(range(11))


async def test_no_adapter_limit_unless_configured() -> None:
    free = await started(GatedMiniport(luns=3, depth=8))
    assert free.adapter_limit is None
    mp = GatedMiniport(luns=3, depth=8)
    port = await started(mp, adapter_queue_limit=4)
    assert port.adapter_limit == 4
    done = Completions()
    srbs = [rw_srb(lun=i % 3, tag=i, done=done) for i in range(24)]
    for srb in srbs:
        port.submit(srb)
    assert len(mp.started) == 4
    while len(done.srbs) < 24:
        mp.release(1)
        await settle()
        assert port.outstanding <= 4
    done.assert_once(srbs)
    # The lower of the operator's and the miniport's limits wins.
    both = await started(GatedMiniport(limit=3), adapter_queue_limit=10)
    assert both.adapter_limit == 3


# ------------------------------------------------------------------------ the eight controls


async def test_device_pause_for_a_time_holds_that_unit_only_and_ends_by_itself() -> None:
    mp = GatedMiniport(luns=2, depth=8)
    port = await started(mp)
    loop = asyncio.get_running_loop()
    done = Completions()
    t0 = loop.time()
    port.pause_device(0, 0, 0, 0.05)
    lq = unit(port)
    assert lq.paused and lq.pauses == 1 and port.device_pauses == 1
    for i in range(3):
        port.submit(rw_srb(tag=i, done=done))
    port.submit(rw_srb(lun=1, tag=50, done=done))
    assert started_tags(mp) == [50]  # the other unit is not held up
    await until(lambda: len(mp.started) == 4)
    assert loop.time() - t0 >= 0.045
    assert started_tags(mp) == [50, 0, 1, 2]  # held ones go down in order
    assert not lq.paused


async def test_device_resume_ends_the_pause_at_once_and_a_new_pause_restarts_the_time() -> None:
    mp = GatedMiniport(depth=8)
    port = await started(mp)
    loop = asyncio.get_running_loop()
    port.pause_device(0, 0, 0, 30.0)
    port.submit(rw_srb(tag=1))
    assert not mp.started
    port.resume_device(0, 0, 0)
    assert started_tags(mp) == [1]  # sent from inside resume
    lq = unit(port)
    assert not lq.paused and lq.pause_timer is None
    port.resume_device(0, 0, 0)  # resuming a unit that is not paused does nothing
    # Pausing again while paused replaces the time, it does not add a second timer.
    t0 = loop.time()
    port.pause_device(0, 0, 0, 0.02)
    port.pause_device(0, 0, 0, 0.08)
    port.submit(rw_srb(tag=2))
    await asyncio.sleep(0.04)
    assert started_tags(mp) == [1]
    await until(lambda: len(mp.started) == 2)
    assert loop.time() - t0 >= 0.075
    assert lq.pauses == 3


async def test_adapter_pause_for_a_time_holds_everything_while_completions_still_arrive() -> None:
    mp = GatedMiniport(luns=2, depth=8)
    port = await started(mp)
    loop = asyncio.get_running_loop()
    done = Completions()
    early = rw_srb(tag=99, done=done)
    port.submit(early)  # at the miniport before the pause
    t0 = loop.time()
    port.pause(0.05)
    assert port.paused and port.pauses == 1
    for i in range(4):
        port.submit(rw_srb(lun=i % 2, tag=i, done=done))
    mp.release()  # completions are not paused
    await done.wait(1)
    assert done.srbs == [early] and not mp.started
    await until(lambda: len(mp.started) == 4)
    assert loop.time() - t0 >= 0.045
    assert [t for t in started_tags(mp) if t % 2 == 0] == [0, 2]  # each unit in order
    assert [t for t in started_tags(mp) if t % 2 == 1] == [1, 3]
    assert not port.paused


async def test_adapter_resume_ends_the_pause_at_once() -> None:
    mp = GatedMiniport(luns=2, depth=8)
    port = await started(mp)
    port.pause(30.0)
    for i in range(4):
        port.submit(rw_srb(lun=i % 2, tag=i))
    assert not mp.started
    port.resume()
    assert sorted(started_tags(mp)) == [0, 1, 2, 3]
    assert not port.paused


async def test_device_busy_counts_only_that_units_completions() -> None:
    mp = GatedMiniport(luns=2, depth=4)
    port = await started(mp)
    for i in range(3):
        port.submit(rw_srb(tag=i))
    port.submit(rw_srb(lun=1, tag=10))
    port.submit(rw_srb(lun=1, tag=11))
    port.device_busy(0, 0, 0, 2)
    lq = unit(port)
    assert lq.busy and lq.busy_remaining == 2 and lq.busies == 1 and port.device_busies == 1
    port.submit(rw_srb(tag=3))
    mp.started.sort(key=lambda s: s.lun, reverse=True)  # release unit 1's requests first
    mp.release(2)
    await settle()
    assert lq.busy and 3 not in started_tags(mp)  # the other unit's completions do not count
    mp.release(1)
    await settle()
    assert lq.busy_remaining == 1 and 3 not in started_tags(mp)
    mp.release(1)
    await settle()
    assert not lq.busy and 3 in started_tags(mp)


async def test_device_busy_with_fewer_outstanding_ends_when_the_last_one_completes() -> None:
    mp = GatedMiniport(depth=4)
    port = await started(mp)
    port.submit(rw_srb(tag=1))
    port.device_busy(0, 0, 0, 10)
    port.submit(rw_srb(tag=2))
    assert started_tags(mp) == [1]
    mp.release(1)
    await settle()
    assert started_tags(mp) == [2]  # nothing left to count down on: ready
    mp.release()
    await settle()
    # Busy with nothing outstanding at all ends after a short back-off.
    port.device_busy(0, 0, 0, 10)
    assert unit(port).busy
    await until(lambda: not unit(port).busy, timeout=1.0)


async def test_device_ready_ends_a_busy_at_once() -> None:
    mp = GatedMiniport(depth=4)
    port = await started(mp)
    port.submit(rw_srb(tag=1))
    port.device_busy(0, 0, 0, 100)
    port.submit(rw_srb(tag=2))
    assert started_tags(mp) == [1]
    port.device_ready(0, 0, 0)
    assert started_tags(mp) == [1, 2] and not unit(port).busy


async def test_adapter_busy_counts_completions_on_any_unit_and_ready_ends_it() -> None:
    mp = GatedMiniport(luns=2, depth=4)
    port = await started(mp)
    for i in range(4):
        port.submit(rw_srb(lun=i % 2, tag=i))
    port.busy(3)
    assert port.busy_state and port.busy_remaining == 3 and port.busies == 1
    for i in range(4, 6):
        port.submit(rw_srb(lun=i % 2, tag=i))
    mp.release(2)  # one from each unit
    await settle()
    assert port.busy_remaining == 1 and len(mp.started) == 2
    mp.release(1)
    await settle()
    assert not port.busy_state and sorted(started_tags(mp)) == [3, 4, 5]
    port.busy(50)
    port.submit(rw_srb(tag=6))
    assert 6 not in started_tags(mp)
    port.ready()
    assert 6 in started_tags(mp) and not port.busy_state


async def test_busy_answers_wait_for_a_pause_too() -> None:
    mp = GatedMiniport(depth=4, auto=True)
    port = await started(mp, busy_retry_delay=0.0)
    await prime(port)
    done = Completions()
    mp.busy_answers[5] = 1
    port.pause_device(0, 0, 0, 30.0)
    srb = rw_srb(tag=5, done=done)
    port.submit(srb)
    port.resume_device(0, 0, 0)
    await settle()
    assert srb.retries == 1 and done.srbs == [srb]  # answered BUSY, retried once, done
    mp.busy_answers[6] = 1
    second = rw_srb(tag=6, done=done)
    port.submit(second)  # answers BUSY now ...
    port.pause_device(0, 0, 0, 30.0)  # ... and the unit is paused before the retry
    await asyncio.sleep(0.02)
    assert second.retries == 1 and len(done.srbs) == 1
    assert [c for c in mp.calls if c == ("start", 6)] == [("start", 6)]
    port.resume_device(0, 0, 0)
    await done.wait(2)
    assert second.srb_status == SrbStatus.SUCCESS


async def test_queue_controls_may_come_from_any_thread() -> None:
    mp = GatedMiniport(luns=2, depth=4)
    port = await started(mp)
    done = Completions()
    worker = threading.Thread(target=port.pause_device, args=(0, 0, 0, 30.0))
    worker.start()
    await asyncio.to_thread(worker.join)
    await settle()
    assert unit(port).paused
    port.submit(rw_srb(tag=1, done=done))
    assert not mp.started
    worker = threading.Thread(target=port.resume_device, args=(0, 0, 0))
    worker.start()
    await asyncio.to_thread(worker.join)
    await until(lambda: len(mp.started) == 1)


# -------------------------------------------------------------------------------- BUSY retry


class SrbBusyMiniport(GatedMiniport):
    """Answers with SRB status BUSY (the controller's own busy) instead of SCSI status BUSY."""

    def _run(self, srb: Srb) -> None:
        left = self.busy_answers.get(srb.queue_tag, 0)
        if left:
            self.busy_answers[srb.queue_tag] = left - 1
            srb.complete(SrbStatus.BUSY)
        else:
            self.units[srb.address].execute(srb)


@pytest.mark.parametrize("kind", ["scsi_status", "srb_status"])
async def test_busy_is_rebuilt_and_restarted_until_it_succeeds(kind: str) -> None:
    mp = (GatedMiniport if kind == "scsi_status" else SrbBusyMiniport)(depth=4, auto=True)
    port = await started(mp, busy_retry_delay=0.0)
    await prime(port)
    done = Completions()
    mp.busy_answers[42] = 4
    srb = rw_srb(tag=42, done=done)
    port.submit(srb)
    await done.wait(1)
    assert srb.srb_status == SrbStatus.SUCCESS and srb.scsi_status == ScsiStatus.GOOD
    assert srb.retries == 4 and unit(port).busy_retries == 4
    assert [c for c in mp.calls if c[1] == 42] == [("build", 42), ("start", 42)] * 5
    done.assert_once([srb])


async def test_busy_retry_waits_out_the_retry_delay() -> None:
    mp = GatedMiniport(depth=4, auto=True)
    port = await started(mp, busy_retry_delay=0.05)
    await prime(port)
    loop = asyncio.get_running_loop()
    done = Completions()
    mp.busy_answers[7] = 1
    t0 = loop.time()
    port.submit(rw_srb(tag=7, done=done))
    await done.wait(1)
    assert loop.time() - t0 >= 0.045


async def test_lun_reset_ends_a_request_that_is_being_retried() -> None:
    mp = GatedMiniport(luns=2, depth=4, auto=True)
    port = await started(mp, busy_retry_delay=0.002)
    await prime(port)
    done = Completions()
    mp.busy_answers[3] = 1_000_000
    srb = rw_srb(tag=3, done=done)
    port.submit(srb)
    await until(lambda: srb.retries >= 3)
    assert await port.reset_logical_unit(0, 0, 0) is True
    assert srb.srb_status == SrbStatus.ABORTED
    await asyncio.sleep(0.01)
    done.assert_once([srb])
    assert unit(port).resets == 1 and port.lun_resets == 1
    # The unit works afterwards (first the reset's unit attention, then good status).
    after = rw_srb(tag=4, done=done)
    port.submit(after)
    await done.wait(2)
    assert after.scsi_status == ScsiStatus.CHECK_CONDITION


# ---------------------------------------------------------------------- hierarchical recovery


LEVELS = ["abort_task", "lun_reset", "target_reset", "bus_reset"]


class StuckDevice(Miniport):
    """Units 0:0:0, 0:0:1 and 0:1:0. Requests whose tag is in ``stuck`` are never answered by
    the device; the others wait at the miniport until ``release()``.

    Task management clears the stuck ones only from level ``answers`` up ("abort_task",
    "lun_reset", "target_reset", "bus_reset", or "nothing"); below it each level fails its own
    way: ABORT TASK answers ABORT FAILED; LUN RESET succeeds but the stuck requests stay stuck
    (their neighbours on the unit are returned ABORTED); TARGET RESET is never answered; the
    bus reset returns everything but the stuck requests.
    """

    name = "stuck"

    def __init__(self, answers: str, stuck: set[int]) -> None:
        self.answers = answers
        self.stuck = stuck
        addresses = [(0, 0, 0), (0, 0, 1), (0, 1, 0)]
        self.units = {a: ram_unit(a[2], [0, 1] if a[1] == 0 else [0]) for a in addresses}
        self.at_device: list[Srb] = []
        self.finished: list[Srb] = []
        self.steps: list[str] = []
        self.starts: dict[int, int] = {}
        self.on_step: Any = None
        self._port: PortServices | None = None

    @property
    def port(self) -> PortServices:
        assert self._port is not None
        return self._port

    def _clears(self, level: str) -> bool:
        return self.answers in LEVELS and LEVELS.index(level) >= LEVELS.index(self.answers)

    def hw_find_adapter(self, port: PortServices, config: PortConfiguration) -> bool:
        self._port = port
        config.maximum_number_of_targets = 2
        config.maximum_number_of_logical_units = 2
        config.default_queue_depth = 8
        return True

    def hw_initialize(self) -> bool:
        return True

    def _return(self, victims: list[Srb], status: SrbStatus) -> None:
        for victim in victims:
            self.at_device.remove(victim)
            victim.complete(status)
            self._finish(victim)

    def _finish(self, srb: Srb) -> None:
        self.finished.append(srb)
        self.port.interrupt()

    def _step(self, step: str) -> None:
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)

    def hw_start_io(self, srb: Srb) -> bool:
        function = srb.function
        if function == SrbFunction.ABORT_COMMAND:
            self._step("abort_task")
            victim = [s for s in self.at_device if s.queue_tag == srb.queue_tag
                      and s.nexus == srb.nexus and s.address == srb.address]
            if victim and (srb.queue_tag not in self.stuck or self._clears("abort_task")):
                self._return(victim, SrbStatus.ABORTED)
                srb.complete(SrbStatus.SUCCESS)
            else:
                srb.complete(SrbStatus.ABORT_FAILED)
            self._finish(srb)
        elif function == SrbFunction.RESET_LOGICAL_UNIT:
            self._step("lun_reset")
            clears = self._clears("lun_reset")
            self._return([s for s in self.at_device if s.address == srb.address
                          and (clears or s.queue_tag not in self.stuck)], SrbStatus.ABORTED)
            self.units[srb.address].reset(ResetKind.LOGICAL_UNIT)
            srb.complete(SrbStatus.SUCCESS)
            self._finish(srb)
        elif function == SrbFunction.RESET_DEVICE:
            self._step("target_reset")
            if self._clears("target_reset"):
                self._return([s for s in self.at_device if s.target_id == srb.target_id],
                             SrbStatus.ABORTED)
                srb.complete(SrbStatus.SUCCESS)
                self._finish(srb)
            # else: the TMF itself is swallowed
        elif srb.address not in self.units:
            srb.complete(SrbStatus.INVALID_LUN)
            self._finish(srb)
        else:
            self.starts[srb.queue_tag] = self.starts.get(srb.queue_tag, 0) + 1
            self.at_device.append(srb)
        return True

    def release(self) -> None:
        for srb in [s for s in self.at_device if s.queue_tag not in self.stuck]:
            self.at_device.remove(srb)
            self.units[srb.address].execute(srb)
            self._finish(srb)

    def hw_interrupt(self) -> bool:
        finished, self.finished = self.finished, []
        for srb in finished:
            self.port.request_complete(srb)
        return bool(finished)

    def hw_reset_bus(self, path_id: int) -> bool:
        self._step("bus_reset")
        clears = self._clears("bus_reset")
        self._return([s for s in self.at_device if clears or s.queue_tag not in self.stuck],
                     SrbStatus.BUS_RESET)
        return True


async def stuck_port(answers: str, **kwargs: Any) -> tuple[StuckDevice, PortDriver]:
    mp = StuckDevice(answers, stuck={1})
    kwargs.setdefault("request_timeout", 0.04)
    kwargs.setdefault("recovery_timeout", 0.04)
    port = await started(mp, **kwargs)
    return mp, port


@pytest.mark.parametrize("answers", [*LEVELS, "nothing"])
async def test_recovery_escalates_abort_lun_target_bus_and_stops_when_cleared(answers: str) -> None:
    # The others arrive during recovery, so that they are far from timing out themselves.
    mp, port = await stuck_port(answers, request_timeout=0.3, recovery_timeout=0.03)
    loop = asyncio.get_running_loop()
    done = Completions()
    stuck = rw_srb(tag=1, done=done)  # never answered by the device
    neighbour = rw_srb(lun=1, tag=2, done=done)  # same target, another unit
    elsewhere = rw_srb(target_id=1, tag=3, done=done)  # another target on the bus
    during_abort = rw_srb(tag=4, done=done)  # unit 0 is not held for an abort: goes down
    during_reset = rw_srb(tag=5, done=done)  # unit 0 is held for a reset: waits in the port
    arrivals = {"abort_task": [during_abort], "lun_reset": [during_reset, neighbour, elsewhere]}

    def arrive(step: str) -> None:
        for srb in arrivals.pop(step, []):
            loop.call_soon(port.submit, srb)

    mp.on_step = arrive
    port.submit(stuck)
    await done.wait(1, timeout=5)
    await until(lambda: not unit(port).recovering)
    await settle()

    reached = LEVELS if answers == "nothing" else LEVELS[:LEVELS.index(answers) + 1]
    assert mp.steps == reached  # in order, and nothing after the step that cleared it
    assert done.srbs[0] is stuck and stuck.srb_status == SrbStatus.TIMEOUT
    history = [(r.step, r.cleared) for r in port.recovery_history]
    expected = [(step, step == answers) for step in reached]
    if answers == "nothing":
        expected.append(("give_up", False))
    assert history == expected
    counters = port.counters()
    assert counters["timeouts"] == 1 and unit(port).timeouts == 1
    assert [counters[f"recovery_{name}"] for name in
            ("aborts", "lun_resets", "target_resets", "bus_resets")] == \
        [1 if step in reached else 0 for step in LEVELS]
    assert counters["recovery_failures"] == (1 if answers == "nothing" else 0)
    assert counters["forced_completions"] == (1 if answers == "nothing" else 0)

    # Nothing else failed: what a reset caught went down again; what waited in the port
    # (the late request) waited until recovery was over.
    assert mp.starts[4] == (2 if "lun_reset" in reached else 1)
    others = [during_abort]
    if "lun_reset" in reached:
        assert mp.starts[5] == 1  # held through the resets, sent once after them
        assert mp.starts[2] == (2 if "target_reset" in reached else 1)
        assert mp.starts[3] == (2 if "bus_reset" in reached else 1)
        others += [during_reset, neighbour, elsewhere]
    mp.release()
    await done.wait(1 + len(others))
    done.assert_once([stuck, *others])
    for srb in others:
        assert srb.srb_status == SrbStatus.SUCCESS or srb.scsi_status == ScsiStatus.CHECK_CONDITION
    assert port.outstanding == 0
    assert port.reset_retries == sum(n - 1 for n in mp.starts.values())
    assert port.timeouts == 1


async def test_two_units_timing_out_together_share_one_target_reset() -> None:
    mp = StuckDevice("target_reset", stuck={1, 2})
    port = await started(mp, request_timeout=0.04, recovery_timeout=0.03)
    done = Completions()
    first, second = rw_srb(tag=1, done=done), rw_srb(lun=1, tag=2, done=done)
    port.submit(first)
    port.submit(second)
    await done.wait(2)
    await until(lambda: not any(lq.recovering for lq in port.lun_queues()))
    assert first.srb_status == second.srb_status == SrbStatus.TIMEOUT
    assert sorted(mp.steps) == ["abort_task"] * 2 + ["lun_reset"] * 2 + ["target_reset"]
    assert port.timeouts == 2 and port.recovery_target_resets == 1
    assert port.recovery_bus_resets == 0


async def test_recovery_steps_are_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    import structlog
    from structlog.testing import capture_logs

    import emuhba.port

    with capture_logs() as logs:
        # A fresh logger: the module's own may have been cached under another configuration
        # by an earlier test, and a cached logger does not see capture_logs.
        monkeypatch.setattr(emuhba.port, "log", structlog.get_logger("emuhba.port"))
        _, port = await stuck_port("lun_reset")
        done = Completions()
        port.submit(rw_srb(tag=1, done=done))
        await done.wait(1)
    events = [(e["event"], e.get("step")) for e in logs
              if e["event"].startswith(("request_timeout", "error_recovery"))]
    assert events == [("request_timeout", None), ("error_recovery_step", "abort_task"),
                      ("error_recovery_step", "lun_reset")]


async def test_a_slow_request_within_the_timeout_is_left_alone() -> None:
    mp, port = await stuck_port("abort_task", request_timeout=0.2)
    done = Completions()
    srb = rw_srb(lun=1, tag=5, done=done)
    port.submit(srb)
    await asyncio.sleep(0.1)
    mp.release()
    await done.wait(1)
    assert srb.srb_status == SrbStatus.SUCCESS or srb.scsi_status == ScsiStatus.CHECK_CONDITION
    await asyncio.sleep(0.3)
    assert mp.steps == [] and port.timeouts == 0


async def test_the_default_timeout_is_generous_and_none_disables_recovery() -> None:
    assert PortDriver(GatedMiniport()).request_timeout == DEFAULT_REQUEST_TIMEOUT >= 30
    mp, port = await stuck_port("abort_task", request_timeout=None)
    port.submit(rw_srb(tag=1))
    await asyncio.sleep(0.15)
    assert mp.steps == [] and port.timeouts == 0
    with pytest.raises(ValueError):
        PortDriver(GatedMiniport(), request_timeout=0)


async def test_a_request_times_out_between_one_and_one_and_a_quarter_timeouts() -> None:
    _, port = await stuck_port("abort_task", request_timeout=0.2)
    loop = asyncio.get_running_loop()
    done = Completions()
    t0 = loop.time()
    port.submit(rw_srb(tag=1, done=done))
    await done.wait(1)
    assert 0.2 <= loop.time() - t0 <= 0.2 * 1.25 + 0.05


async def test_sense_from_the_device_is_not_touched_by_the_port() -> None:
    mp = GatedMiniport(auto=True)
    port = await started(mp)
    done = Completions()
    first = rw_srb(tag=1, done=done)  # a new nexus: the unit's own power-on unit attention
    port.submit(first)
    await done.wait(1)
    beyond = rw_srb(lba=1 << 20, tag=2, done=done)
    port.submit(beyond)
    await done.wait(2)
    for srb, key_asc in ((first, (0x6, 0x29)), (beyond, (0x5, 0x21))):
        assert srb.scsi_status == ScsiStatus.CHECK_CONDITION
        assert (srb.sense[2] & 0x0F, srb.sense[12]) == key_asc


# ------------------------------------------------------------------------ latency histogram


def test_histogram_buckets_are_log2_microseconds() -> None:
    h = LatencyHistogram()
    assert len(h.counts) == LATENCY_BUCKETS == len(LATENCY_BUCKET_LIMITS_US) + 1
    assert LATENCY_BUCKET_LIMITS_US[:4] == (1, 2, 4, 8)
    for us in (0, 1, 3, 5000, 5000, 1 << 40):
        bucket = min(us.bit_length(), LATENCY_BUCKETS - 1)
        h.counts[bucket] += 1
        h.sum_us += us
    assert h.count == 6
    assert h.counts[0] == 1 and h.counts[1] == 1 and h.counts[2] == 1 and h.counts[13] == 2
    assert h.counts[LATENCY_BUCKETS - 1] == 1
    pairs, total = h.prometheus_buckets()
    assert pairs[-1] == (float("inf"), 6) and pairs[13] == (8192 / 1e6, 5)
    assert total == pytest.approx((4 + 10000 + (1 << 40)) / 1e6)
    assert h.quantile(0.5) == 4 / 1e6 and h.quantile(0.6) == 8192 / 1e6
    assert LatencyHistogram().quantile(0.99) == 0.0


async def test_latency_is_recorded_per_unit_and_for_the_adapter() -> None:
    mp = GatedMiniport(luns=2, depth=8)
    port = await started(mp)
    # A clock that stands still: the latencies are exactly the offsets below, however slowly
    # a loaded machine runs the test.
    port._now_ns = lambda: 10_000_000_000
    done = Completions()
    a, b, c = rw_srb(tag=1, done=done), rw_srb(tag=2, done=done), rw_srb(lun=1, tag=3, done=done)
    for srb in (a, b, c):
        port.submit(srb)
    # Pretend a and c were submitted 5 ms ago and b 300 ms ago.
    a.start_ns -= 5_000_000
    b.start_ns -= 300_000_000
    c.start_ns -= 5_000_000
    histogram = unit(port, 0).latency
    counts = histogram.counts
    mp.release()
    await done.wait(3)
    assert histogram.counts is counts  # updated in place
    assert counts[13] == 1 and counts[19] == 1 and histogram.count == 2  # [4096, 8192) µs ...
    assert histogram.sum_us == 305_000  # ... and [262144, 524288) µs
    assert unit(port, 1).latency.counts[13] == 1
    adapter = port.latency
    assert adapter.count == 3 and adapter.counts[13] == 2 and adapter.counts[19] == 1
    assert port.counters()["latency_count"] == 3
    assert unit(port, 0).counters()["latency_sum_us"] == histogram.sum_us


# --------------------------------------------------------------------------------- counters


async def test_counters_are_plain_ints_and_name_every_rule() -> None:
    port = await started(GatedMiniport())
    port.submit(rw_srb(tag=1))
    adapter = port.counters()
    lun = unit(port).counters()
    assert all(type(v) is int for v in (*adapter.values(), *lun.values()))
    for name in ("queued", "held", "outstanding", "completed", "busy_retries", "pauses",
                 "busies", "device_pauses", "device_busies", "lun_resets", "target_resets",
                 "bus_resets", "timeouts", "recovery_aborts", "recovery_lun_resets",
                 "recovery_target_resets", "recovery_bus_resets", "latency_count",
                 "latency_sum_us", "ignored_controls", "interrupts_during_start"):
        assert name in adapter, name
    for name in ("queued", "held", "outstanding", "completed", "busy_retries", "pauses",
                 "busies", "resets", "timeouts", "queue_depth", "latency_count"):
        assert name in lun, name
    assert adapter["queued"] == 1 and adapter["outstanding"] == 1
