"""The port driver driven directly with SRBs: queuing, queue controls, interrupts, task
management and the bus scan. No iSCSI anywhere.

Most tests use ``GatedMiniport``: a miniport over real logical units whose commands finish only
when the test releases them (a device that stalls on demand), so that "how many are outstanding
right now" has one answer. The scale test and the scan use the real DiskMiniport.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections import Counter, deque
from typing import Any

import pytest

from emuhba.miniport import Miniport, PortConfiguration, PortServices
from emuhba.port import INTERNAL_NEXUS, PortDriver, ScsiPortDriver, sense_key
from emuhba.scsi.cdb import decode_into
from emuhba.srb import (
    DataDirection,
    QueueAction,
    ResetKind,
    ScsiStatus,
    Srb,
    SrbFunction,
    SrbStatus,
)
from miniports.disk import DiskMiniport, EmulatedDiskController, build_units
from miniports.lu import LogicalUnit
from miniports.store import RamStore

BS = 512


class Completions:
    """The completion hook: records every call so 'exactly once' can be checked."""

    def __init__(self) -> None:
        self.srbs: list[Srb] = []
        self.calls: Counter[int] = Counter()
        self.thread_ids: set[int] = set()

    def __call__(self, srb: Srb) -> None:
        self.srbs.append(srb)
        self.calls[id(srb)] += 1
        self.thread_ids.add(threading.get_ident())

    @property
    def tags(self) -> list[int]:
        return [s.queue_tag for s in self.srbs]

    async def wait(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.srbs) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.srbs)} of {n} completions after {timeout}s")
            await asyncio.sleep(0.001)

    def assert_once(self, srbs: list[Srb]) -> None:
        for srb in srbs:
            assert self.calls[id(srb)] == 1, srb


def rw_srb(write: bool = False, lun: int = 0, lba: int = 0, blocks: int = 1, tag: int = 0,
           nexus: int = 1, done: Completions | None = None, target_id: int = 0,
           path_id: int = 0, fill: int = 0) -> Srb:
    cdb = struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, lba, 0, blocks, 0)
    buf = bytearray([fill]) * (blocks * BS)
    srb = Srb(path_id=path_id, target_id=target_id, lun=lun, cdb=cdb,
              data_direction=DataDirection.OUT if write else DataDirection.IN,
              data_transfer_length=len(buf), sg_list=[memoryview(buf)], queue_tag=tag,
              nexus=nexus, completion=done)
    assert decode_into(srb) is None
    return srb


def tur_srb(lun: int = 0, tag: int = 0, nexus: int = 1, done: Completions | None = None,
            target_id: int = 0) -> Srb:
    srb = Srb(target_id=target_id, lun=lun, cdb=bytes(6), queue_tag=tag, nexus=nexus,
              completion=done)
    assert decode_into(srb) is None
    return srb


def ram_unit(lun: int, luns: list[int], blocks: int = 128) -> LogicalUnit:
    return LogicalUnit(RamStore(blocks, BS), lun=lun, target_luns=lambda: list(luns),
                       serial=f"GATED{lun:04d}")


class GatedMiniport(Miniport):
    """A miniport whose device runs a command only when the test releases it.

    ``auto`` runs each command as soon as it starts (completion still through the interrupt);
    ``inline`` even reports it from inside hw_start_io (completion racing submission).
    ``busy_answers`` maps a queue tag to how many times the device answers it SCSI BUSY first.
    """

    name = "gated"

    def __init__(self, luns: int = 1, depth: int = 2, *, extended: bool = True,
                 limit: int | None = None, auto: bool = False, inline: bool = False,
                 abortable: bool = True) -> None:
        lun_list = list(range(luns))
        self.units = {(0, 0, lun): ram_unit(lun, lun_list) for lun in lun_list}
        self.depth = depth
        self.extended = extended
        self.limit = limit
        self.auto = auto
        self.inline = inline
        self.abortable = abortable
        self.busy_answers: dict[int, int] = {}
        self.started: list[Srb] = []
        self.finished: deque[Srb] = deque()
        self.calls: list[tuple[str, int]] = []
        self.isr_calls = 0
        self.isr_threads: set[int] = set()
        self.isr_saw: list[Any] = []
        self.observe: Any = None
        self._port: PortServices | None = None

    @property
    def port(self) -> PortServices:
        assert self._port is not None
        return self._port

    def hw_find_adapter(self, port: PortServices, config: PortConfiguration) -> bool:
        self._port = port
        config.number_of_buses = 1
        config.maximum_number_of_targets = 1
        config.maximum_number_of_logical_units = len(self.units)
        config.default_queue_depth = self.depth
        config.srb_type_extended = self.extended
        config.adapter_queue_limit = self.limit
        return True

    def hw_initialize(self) -> bool:
        return True

    def hw_build_io(self, srb: Srb) -> bool:
        self.calls.append(("build", srb.queue_tag))
        return True

    def hw_start_io(self, srb: Srb) -> bool:
        self.calls.append(("start", srb.queue_tag))
        function = srb.function
        if function == SrbFunction.ABORT_COMMAND:
            victim = next((s for s in self.started if s.queue_tag == srb.queue_tag
                           and s.nexus == srb.nexus and s.lun == srb.lun), None)
            if victim is not None and self.abortable:
                self.started.remove(victim)
                victim.complete(SrbStatus.ABORTED)
                self._finish(victim)
                srb.complete(SrbStatus.SUCCESS)
            else:
                srb.complete(SrbStatus.ABORT_FAILED)
            self._finish(srb)
            return True
        if function == SrbFunction.RESET_LOGICAL_UNIT:
            for victim in [s for s in self.started if s.lun == srb.lun]:
                self.started.remove(victim)
                victim.complete(SrbStatus.ABORTED)
                self._finish(victim)
            self.units[srb.address].reset(ResetKind.LOGICAL_UNIT)
            srb.complete(SrbStatus.SUCCESS)
            self._finish(srb)
            return True
        if function == SrbFunction.RESET_DEVICE:
            for victim in list(self.started):
                self.started.remove(victim)
                victim.complete(SrbStatus.ABORTED)
                self._finish(victim)
            srb.complete(SrbStatus.SUCCESS)
            self._finish(srb)
            return True
        if srb.address not in self.units:
            srb.complete(SrbStatus.INVALID_LUN if srb.target_id == 0
                         else SrbStatus.SELECTION_TIMEOUT)
            self._finish(srb)
            return True
        self.started.append(srb)
        if self.inline:
            self.started.remove(srb)
            self._run(srb)
            self.port.request_complete(srb)
        elif self.auto:
            self.release()
        return True

    def _run(self, srb: Srb) -> None:
        left = self.busy_answers.get(srb.queue_tag, 0)
        if left:
            self.busy_answers[srb.queue_tag] = left - 1
            srb.complete(SrbStatus.ERROR, ScsiStatus.BUSY)
        else:
            self.units[srb.address].execute(srb)

    def _finish(self, srb: Srb) -> None:
        self.finished.append(srb)
        self.port.interrupt()

    def release(self, n: int | None = None) -> None:
        count = len(self.started) if n is None else n
        for _ in range(count):
            srb = self.started.pop(0)
            self._run(srb)
            self._finish(srb)

    def hw_interrupt(self) -> bool:
        self.isr_calls += 1
        self.isr_threads.add(threading.get_ident())
        if self.observe is not None:
            self.isr_saw.append(self.observe())
        serviced = bool(self.finished)
        while self.finished:
            self.port.request_complete(self.finished.popleft())
        return serviced

    def hw_reset_bus(self, path_id: int) -> bool:
        for victim in list(self.started):
            self.started.remove(victim)
            victim.complete(SrbStatus.BUS_RESET)
            self._finish(victim)
        for unit in self.units.values():
            unit.reset(ResetKind.BUS)
        return True


async def started(miniport: Miniport, **kwargs: Any) -> PortDriver:
    port = PortDriver(miniport, **kwargs)
    assert await port.start()
    return port


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def prime(port: PortDriver, lun: int = 0, nexus: int = 1,
                mp: GatedMiniport | None = None) -> None:
    """Consume the power-on unit attention a new nexus sees first."""
    done = Completions()
    port.submit(tur_srb(lun=lun, nexus=nexus, done=done, tag=0xFFFF))
    if mp is not None:
        mp.release()
    await done.wait(1)
    assert done.srbs[0].scsi_status == ScsiStatus.CHECK_CONDITION


# ------------------------------------------------------------------------------ queue depth


async def test_queue_depth_holds_requests_and_keeps_order() -> None:
    mp = GatedMiniport(depth=2)
    port = await started(mp)
    done = Completions()
    srbs = [rw_srb(tag=i, done=done) for i in range(10)]
    for srb in srbs:
        port.submit(srb)
    lq = port.lun_queue(0, 0, 0)
    assert lq is not None
    assert len(mp.started) == 2 and lq.outstanding == 2 and lq.held == 8
    while len(done.srbs) < 10:
        assert len(mp.started) <= 2
        mp.release(1)
        await settle()
        assert lq.outstanding <= 2
    assert done.tags == list(range(10))
    assert lq.peak_outstanding == 2 and port.peak_outstanding == 2
    assert lq.completed == 10 and lq.outstanding == 0 and lq.held == 0
    done.assert_once(srbs)
    # Build then start, in that order, for every request.
    per_io = [c for c in mp.calls if c[1] in range(10)]
    assert per_io == [(step, i) for i in range(10) for step in ("build", "start")]


async def test_queue_depth_limited_to_255_without_extended_srbs() -> None:
    mp = GatedMiniport(depth=1000, extended=False)
    port = await started(mp)
    port.submit(rw_srb(tag=1))
    lq = port.lun_queue(0, 0, 0)
    assert lq is not None and lq.queue_depth == 255
    assert port.set_queue_depth(0, 0, 0, 4096) == 255
    extended = await started(GatedMiniport(depth=1000, extended=True))
    assert extended.set_queue_depth(0, 0, 0, 4096) == 4096


async def test_completion_inside_start_io_is_neither_lost_nor_reentered() -> None:
    mp = GatedMiniport(depth=4, inline=True)
    port = await started(mp)
    await prime(port)
    done = Completions()
    chained: list[Srb] = []
    arrivals: list[int] = []

    def resubmit(srb: Srb) -> None:
        done(srb)
        if len(chained) < 200:  # every completion submits the next request from inside it
            nxt = rw_srb(tag=1000 + len(chained), done=resubmit)  # type: ignore[arg-type]
            chained.append(nxt)
            arrivals.append(nxt.queue_tag)
            port.submit(nxt)

    first = [rw_srb(tag=i, done=resubmit) for i in range(50)]  # type: ignore[arg-type]
    for srb in first:
        arrivals.append(srb.queue_tag)
        port.submit(srb)
    await done.wait(250)
    done.assert_once(first + chained)
    assert all(s.srb_status == SrbStatus.SUCCESS for s in done.srbs)
    assert port.outstanding == 0 and port.stray_completions == 0
    assert done.tags == arrivals  # per-unit FIFO, re-entrant arrivals included


async def test_adapter_queue_limit_caps_outstanding_across_units() -> None:
    mp = GatedMiniport(luns=3, depth=8, limit=5)
    port = await started(mp)
    done = Completions()
    srbs = [rw_srb(lun=i % 3, tag=i, done=done) for i in range(30)]
    for srb in srbs:
        port.submit(srb)
    assert len(mp.started) == 5
    while len(done.srbs) < 30:
        mp.release(1)
        await settle()
        assert port.outstanding <= 5
    done.assert_once(srbs)
    assert port.peak_outstanding == 5


async def test_no_adapter_cap_55_units_at_depth_255() -> None:
    units, depth, extra = 55, 255, 3
    mp = DiskMiniport.from_luns([("ram", 64 * 1024)] * units, target_port_name="iqn.test,t,1",
                                queue_depth=depth, slots=16384, latency_s=0.5)
    port = await started(mp)
    done = Completions()
    srbs = [rw_srb(lun=lun, lba=i % 128, tag=lun << 16 | i, done=done)
            for lun in range(units) for i in range(depth + extra)]
    for srb in srbs:
        port.submit(srb)
    assert port.outstanding == units * depth == 14_025
    assert mp.controller.in_use == 14_025
    for lq in port.lun_queues():
        assert lq.outstanding == depth and lq.held == extra
    await done.wait(len(srbs), timeout=30)
    done.assert_once(srbs)
    assert port.peak_outstanding == 14_025
    assert port.completed == len(srbs) and port.outstanding == 0
    assert mp.controller.in_use == 0
    await port.stop()


# ------------------------------------------------------------------------------ busy retry


@pytest.mark.parametrize("k", [1, 3, 7])
async def test_busy_answers_are_retried_until_success(k: int) -> None:
    mp = GatedMiniport(depth=4, auto=True)
    port = await started(mp, busy_retry_delay=0.0)
    await prime(port)
    done = Completions()
    mp.busy_answers[42] = k
    srb = rw_srb(tag=42, done=done)
    port.submit(srb)
    await done.wait(1)
    await asyncio.sleep(0.02)
    assert done.calls[id(srb)] == 1
    assert srb.srb_status == SrbStatus.SUCCESS and srb.scsi_status == ScsiStatus.GOOD
    assert srb.retries == k
    lq = port.lun_queue(0, 0, 0)
    assert lq is not None and lq.busy_retries == k and port.busy_retries == k
    assert [c for c in mp.calls if c == ("start", 42)] == [("start", 42)] * (k + 1)


async def test_busy_request_goes_before_newer_ones() -> None:
    mp = GatedMiniport(depth=1)
    port = await started(mp, busy_retry_delay=0.0)
    done = Completions()
    mp.busy_answers[0] = 2
    srbs = [rw_srb(tag=i, done=done) for i in range(4)]
    for srb in srbs:
        port.submit(srb)
    while len(done.srbs) < 4:
        mp.release()
        await asyncio.sleep(0.002)
    assert done.tags == [0, 1, 2, 3]
    assert srbs[0].retries == 2


# ------------------------------------------------------------------------------- interrupt


async def test_interrupt_assertions_on_the_loop_coalesce_into_one_isr_call() -> None:
    mp = GatedMiniport()
    port = await started(mp)
    await settle()
    before = mp.isr_calls
    for _ in range(1000):
        port.interrupt()
    await settle()
    assert mp.isr_calls == before + 1
    assert mp.isr_threads == {threading.get_ident()}
    # An assertion after the service routine ran is a new interrupt, not a lost one.
    port.interrupt()
    await settle()
    assert mp.isr_calls == before + 2


async def test_interrupts_raised_on_other_threads_are_served_there_and_coalesce() -> None:
    mp = GatedMiniport(depth=8)
    port = await started(mp)
    done = Completions()
    srbs = [rw_srb(tag=i, done=done) for i in range(8)]
    for srb in srbs:
        port.submit(srb)
    pending = list(mp.started)
    mp.started.clear()
    before = mp.isr_calls
    first_waiting = threading.Event()

    def dma_first() -> None:
        srb = pending[0]
        mp.units[srb.address].execute(srb)
        mp.finished.append(srb)
        first_waiting.set()
        port.interrupt()  # blocks: the loop holds the interrupt lock (below)

    def dma_rest() -> None:
        for srb in pending[1:]:
            mp.units[srb.address].execute(srb)
            mp.finished.append(srb)
            for _ in range(100):
                port.interrupt()  # one is pending already: nothing more to do

    def holding_the_lock() -> None:
        first = threading.Thread(target=dma_first)
        first.start()
        first_waiting.wait()
        while not port._irq_pending:  # the first assertion is in, its service waits for us
            time.sleep(0.001)
        rest = threading.Thread(target=dma_rest)
        rest.start()
        rest.join()  # returns: those assertions coalesced into the pending one
        threads.append(first)

    threads: list[threading.Thread] = []
    port.synchronize_access(holding_the_lock)
    await asyncio.to_thread(threads[0].join)
    await done.wait(8)
    done.assert_once(srbs)
    # One service for all of it, run on the thread that raised the line first; the port
    # delivered the completions on the loop.
    assert mp.isr_calls == before + 1
    assert threading.get_ident() not in mp.isr_threads
    assert done.thread_ids == {threading.get_ident()}
    assert port.interrupt_assertions >= 1 + 7 * 100


async def test_completions_from_worker_threads_all_arrive() -> None:
    mp = GatedMiniport(depth=64)
    port = await started(mp)
    done = Completions()
    srbs = [rw_srb(tag=i, done=done) for i in range(64)]
    for srb in srbs:
        port.submit(srb)
    pending = list(mp.started)
    mp.started.clear()

    def dma(batch: list[Srb]) -> None:
        for srb in batch:
            mp.units[srb.address].execute(srb)
            mp.finished.append(srb)
            port.interrupt()

    threads = [threading.Thread(target=dma, args=(pending[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        await asyncio.to_thread(t.join)
    await done.wait(64)
    done.assert_once(srbs)
    assert done.thread_ids == {threading.get_ident()}
    assert mp.isr_calls <= 64


async def test_synchronize_access_excludes_the_interrupt_routine() -> None:
    mp = GatedMiniport(auto=True)
    port = await started(mp)
    inside = threading.Event()
    state = {"in_fn": False}
    mp.observe = lambda: state["in_fn"]

    def critical() -> str:
        state["in_fn"] = True
        inside.set()
        time.sleep(0.05)
        state["in_fn"] = False
        return "done"

    worker = asyncio.get_running_loop().run_in_executor(None, port.synchronize_access, critical)
    await asyncio.to_thread(inside.wait)
    port.interrupt()
    assert await worker == "done"
    await settle()
    assert mp.isr_saw and not any(mp.isr_saw)
    assert port.synchronize_access(lambda: 7) == 7


# -------------------------------------------------------------------------- queue controls


async def test_paused_device_gets_nothing_until_resumed() -> None:
    mp = GatedMiniport(luns=2, depth=8, auto=True)
    port = await started(mp)
    done = Completions()
    port.pause_device(0, 0, 0, 30.0)
    held = [rw_srb(lun=0, tag=i, done=done) for i in range(5)]
    other = rw_srb(lun=1, tag=99, done=done)
    for srb in [*held, other]:
        port.submit(srb)
    await asyncio.sleep(0.02)
    assert done.tags == [99]  # the other unit is not held up
    assert ("start", 0) not in mp.calls
    port.resume_device(0, 0, 0)
    await done.wait(6)
    assert done.tags == [99, 0, 1, 2, 3, 4]


async def test_timed_device_pause_ends_by_itself() -> None:
    mp = GatedMiniport(auto=True)
    port = await started(mp)
    done = Completions()
    port.pause_device(0, 0, 0, 0.05)
    t0 = time.monotonic()
    for i in range(3):
        port.submit(rw_srb(tag=i, done=done))
    await done.wait(3)
    assert time.monotonic() - t0 >= 0.045
    assert done.tags == [0, 1, 2]


async def test_paused_adapter_sends_nothing_and_resumes_in_order() -> None:
    mp = GatedMiniport(luns=2, depth=8, auto=True)
    port = await started(mp)
    done = Completions()
    port.pause(30.0)
    srbs = [rw_srb(lun=i % 2, tag=i, done=done) for i in range(6)]
    for srb in srbs:
        port.submit(srb)
    await asyncio.sleep(0.02)
    assert not done.srbs and not [c for c in mp.calls if c[0] == "start"]
    port.resume()
    await done.wait(6)
    assert [t for t in done.tags if t % 2 == 0] == [0, 2, 4]
    assert [t for t in done.tags if t % 2 == 1] == [1, 3, 5]

    t0 = time.monotonic()
    port.pause(0.05)
    port.submit(rw_srb(tag=10, done=done))
    await done.wait(7)
    assert time.monotonic() - t0 >= 0.045


async def test_device_busy_holds_until_n_requests_complete() -> None:
    mp = GatedMiniport(luns=2, depth=4)
    port = await started(mp)
    done = Completions()
    for i in range(4):
        port.submit(rw_srb(tag=i, done=done))
    port.device_busy(0, 0, 0, 2)
    for i in range(4, 7):
        port.submit(rw_srb(tag=i, done=done))
    port.submit(rw_srb(lun=1, tag=50, done=done))
    assert [s.queue_tag for s in mp.started] == [0, 1, 2, 3, 50]
    mp.release(1)
    await settle()
    assert [s.queue_tag for s in mp.started] == [1, 2, 3, 50]  # still busy after one
    mp.release(1)
    await settle()
    assert [s.queue_tag for s in mp.started] == [2, 3, 50, 4, 5]  # ready after two
    port.device_busy(0, 0, 0, 100)
    port.device_ready(0, 0, 0)
    mp.release(3)
    await settle()
    assert [s.queue_tag for s in mp.started] == [4, 5, 6]


async def test_adapter_busy_holds_until_n_requests_complete() -> None:
    mp = GatedMiniport(luns=2, depth=4)
    port = await started(mp)
    done = Completions()
    for i in range(4):
        port.submit(rw_srb(lun=i % 2, tag=i, done=done))
    port.busy(3)
    for i in range(4, 8):
        port.submit(rw_srb(lun=i % 2, tag=i, done=done))
    assert len(mp.started) == 4
    mp.release(2)
    await settle()
    assert len(mp.started) == 2
    mp.release(1)
    await settle()
    assert sorted(s.queue_tag for s in mp.started) == [3, 4, 5, 6, 7]
    port.busy(10)
    port.ready()
    port.submit(rw_srb(tag=8, done=done))
    assert mp.started[-1].queue_tag == 8


async def test_busy_with_nothing_outstanding_does_not_hang() -> None:
    mp = GatedMiniport(auto=True)
    port = await started(mp)
    done = Completions()
    port.device_busy(0, 0, 0, 5)
    port.busy(5)
    port.submit(rw_srb(tag=1, done=done))
    await done.wait(1, timeout=1.0)


async def test_next_request_notifications_are_ignored() -> None:
    port = await started(GatedMiniport())
    port.next_request()
    port.next_lu_request(0, 0, 0)
    assert port.next_request_notifications == 2


# ------------------------------------------------------------------------- task management


async def test_abort_of_a_request_still_held_in_the_port() -> None:
    mp = GatedMiniport(depth=1)
    port = await started(mp)
    done = Completions()
    first, second = rw_srb(tag=1, done=done), rw_srb(tag=2, done=done)
    port.submit(first)
    port.submit(second)
    assert await port.abort(second) is True
    assert done.srbs == [second] and second.srb_status == SrbStatus.ABORTED
    assert ("start", 2) not in mp.calls
    mp.release()
    await done.wait(2)
    done.assert_once([first, second])
    assert first.srb_status == SrbStatus.SUCCESS or first.scsi_status != ScsiStatus.GOOD
    assert await port.abort(second) is False  # gone already


async def test_abort_of_a_request_at_the_miniport() -> None:
    mp = GatedMiniport(depth=4)
    port = await started(mp)
    done = Completions()
    srbs = [rw_srb(tag=i, done=done) for i in range(3)]
    for srb in srbs:
        port.submit(srb)
    assert await port.abort(srbs[1]) is True
    assert srbs[1].srb_status == SrbStatus.ABORTED and done.srbs == [srbs[1]]
    assert ("start", 1) in mp.calls and [s.queue_tag for s in mp.started] == [0, 2]
    mp.release()
    await done.wait(3)
    done.assert_once(srbs)


async def test_abort_the_miniport_cannot_do_waits_for_normal_completion() -> None:
    mp = GatedMiniport(depth=4, abortable=False)
    port = await started(mp)
    await prime(port, mp=mp)
    done = Completions()
    srb = rw_srb(tag=5, done=done)
    port.submit(srb)
    task = asyncio.create_task(port.abort(srb))
    await asyncio.sleep(0.01)
    assert not task.done()
    mp.release()
    assert await task is False
    assert srb.srb_status == SrbStatus.SUCCESS
    done.assert_once([srb])


async def test_abort_ends_busy_retries() -> None:
    mp = GatedMiniport(depth=4, auto=True)
    port = await started(mp, busy_retry_delay=10.0)
    done = Completions()
    mp.busy_answers[3] = 1_000_000
    srb = rw_srb(tag=3, done=done)
    port.submit(srb)
    await asyncio.sleep(0.01)
    assert srb.retries == 1
    assert await port.abort(srb) is True
    assert srb.srb_status == SrbStatus.ABORTED
    done.assert_once([srb])


async def test_lun_reset_ends_everything_on_the_unit_once() -> None:
    mp = GatedMiniport(luns=2, depth=2)
    port = await started(mp)
    await prime(port, mp=mp)
    done = Completions()
    on_unit = [rw_srb(tag=i, done=done) for i in range(5)]
    elsewhere = rw_srb(lun=1, tag=77, done=done)
    for srb in [*on_unit, elsewhere]:
        port.submit(srb)
    assert port.lun_queue(0, 0, 0).held == 3  # type: ignore[union-attr]
    reset = asyncio.create_task(port.reset_logical_unit(0, 0, 0))
    await asyncio.sleep(0)
    late = rw_srb(tag=9, done=done)  # arrives during the reset: a new task, held until after
    port.submit(late)
    assert await reset is True
    assert sorted(s.queue_tag for s in done.srbs) == [0, 1, 2, 3, 4]
    assert all(s.srb_status == SrbStatus.ABORTED for s in on_unit)
    done.assert_once(on_unit)
    mp.release()
    await done.wait(7)
    assert elsewhere.srb_status == SrbStatus.SUCCESS or elsewhere.scsi_status != ScsiStatus.GOOD
    # The new task ran after the reset and met the unit attention the reset set up (29/03).
    assert late.scsi_status == ScsiStatus.CHECK_CONDITION
    assert sense_key(late.sense) == 0x6 and late.sense[12:14] == b"\x29\x03"


async def test_target_reset_and_bus_reset() -> None:
    mp = GatedMiniport(luns=2, depth=2)
    port = await started(mp)
    done = Completions()
    first = [rw_srb(lun=i % 2, tag=i, done=done) for i in range(6)]
    for srb in first:
        port.submit(srb)
    assert await port.reset_device(0, 0) is True
    assert all(s.srb_status == SrbStatus.ABORTED for s in first)
    done.assert_once(first)
    second = [rw_srb(lun=i % 2, tag=10 + i, done=done) for i in range(6)]
    for srb in second:
        port.submit(srb)
    assert await port.reset_bus(0) is True
    assert all(s.srb_status == SrbStatus.BUS_RESET for s in second)
    done.assert_once(first + second)
    assert port.outstanding == 0 and not mp.started


async def test_stray_and_duplicate_completions_are_ignored() -> None:
    mp = GatedMiniport(auto=True)
    port = await started(mp)
    done = Completions()
    srb = rw_srb(tag=1, done=done)
    port.submit(srb)
    await done.wait(1)
    port.request_complete(srb)
    port.request_complete(rw_srb(tag=2))
    assert done.calls[id(srb)] == 1 and port.stray_completions == 2


async def test_head_of_queue_goes_first() -> None:
    mp = GatedMiniport(depth=1)
    port = await started(mp)
    done = Completions()
    for i in range(3):
        port.submit(rw_srb(tag=i, done=done))
    urgent = rw_srb(tag=7, done=done)
    urgent.queue_action = QueueAction.HEAD_OF_QUEUE
    port.submit(urgent)
    while len(done.srbs) < 4:
        mp.release()
        await settle()
    assert done.tags == [0, 7, 1, 2]


async def test_drain_waits_for_everything() -> None:
    mp = GatedMiniport(depth=2)
    port = await started(mp)
    for i in range(4):
        port.submit(rw_srb(tag=i))
    assert await port.drain(0.01) is False
    drain = asyncio.create_task(port.drain(5.0))
    while not drain.done():
        mp.release()
        await asyncio.sleep(0.001)
    assert drain.result() is True


# -------------------------------------------------------------------------------- bus scan


def scan_miniport(layout: list[tuple[int, int, int]]) -> DiskMiniport:
    def build(irq: Any) -> EmulatedDiskController:
        units = build_units([(address, RamStore(64, BS)) for address in layout],
                            target_port_name="iqn.test,t,1")
        return EmulatedDiskController(units, irq=irq)

    return DiskMiniport(build, queue_depth=16)


async def test_bus_scan_finds_targets_and_luns() -> None:
    layout = [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 3, 0), (0, 3, 7), (1, 2, 3)]
    mp = scan_miniport(layout)
    port = await started(mp)
    units = await port.scan()
    # Target 1:2 has no LUN 0: REPORT LUNS to it fails, and the port falls back to probing.
    assert units == {(0, 0): [0, 1, 2], (0, 3): [0, 7], (1, 2): [3]}
    assert port.units() == units
    for path_id, target_id, lun in layout:
        lq = port.lun_queue(path_id, target_id, lun)
        assert lq is not None and lq.known and lq.queue_depth == 16
    # Probe queues for empty addresses do not linger.
    assert len(port.lun_queues()) == len(layout)
    # The scan used the normal path and the power-on unit attention did not upset it.
    assert port.completed >= 6


async def test_rescan_after_bus_change() -> None:
    mp = scan_miniport([(0, 0, 0)])
    port = await started(mp)
    assert await port.scan() == {(0, 0): [0]}
    lu = LogicalUnit(RamStore(64, BS), lun=1, target_luns=lambda: [0, 1], serial="HOTADD")
    mp.attach_unit((0, 0, 1), lu)
    port.bus_change_detected(0)  # repeated notices share one rescan
    for _ in range(100):
        await asyncio.sleep(0.005)
        if port.units() == {(0, 0): [0, 1]}:
            break
    assert port.units() == {(0, 0): [0, 1]}


async def test_internal_commands_retry_after_unit_attention() -> None:
    mp = GatedMiniport(auto=True)
    port = await started(mp)
    srb = await port.command(0, 0, 0, bytes(6))  # TEST UNIT READY: first sight -> UA, retried
    assert srb.scsi_status == ScsiStatus.GOOD and srb.nexus == INTERNAL_NEXUS
    assert sum(1 for c in mp.calls if c[0] == "start") == 2


async def test_unknown_model_is_refused() -> None:
    with pytest.raises(ValueError, match="storport, scsiport"):
        PortDriver(GatedMiniport(), model="miniport")
    port = PortDriver(GatedMiniport(), model="scsiport")
    assert isinstance(port, ScsiPortDriver) and port.model == "scsiport"
    assert type(PortDriver(GatedMiniport())) is PortDriver
    with pytest.raises(ValueError):
        ScsiPortDriver(GatedMiniport(), model="storport")
