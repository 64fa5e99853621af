"""The SCSIport model (``PortDriver(model="scsiport")``), mostly side by side with Storport on the
same miniport and workload: one FIFO adapter queue capped at 254, half duplex, scatter/gather
one element per call, no queue controls (a busy device starves the others), and a bus reset as
the only answer to a request that timed out.

The half-duplex tests use the real disk miniport with its modeled routine costs and with every
completion raised from the controller's DMA worker threads, and time the routines themselves.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from emuhba.hba import Hba
from emuhba.port import SCSIPORT_ADAPTER_LIMIT, PortDriver, ScsiPortDriver
from emuhba.srb import DataDirection, ScsiStatus, Srb, SrbFunction, SrbStatus
from miniports.disk import DiskMiniport
from tests.unit.test_port import BS, Completions, GatedMiniport, rw_srb, settle, started
from tests.unit.test_port_rules import StuckDevice, until

MODELS = ["storport", "scsiport"]
TPN = "iqn.test,t,1"


def write_srb(lba: int, pieces: list[bytes], tag: int, done: Completions) -> Srb:
    total = sum(len(p) for p in pieces)
    cdb = bytes((0x2A, 0)) + lba.to_bytes(4, "big") + bytes((0,)) + \
        (total // BS).to_bytes(2, "big") + bytes((0,))
    srb = Srb(cdb=cdb, data_direction=DataDirection.OUT, data_transfer_length=total,
              sg_list=[memoryview(bytearray(p)) for p in pieces], queue_tag=tag, nexus=1,
              completion=done)
    from emuhba.scsi.cdb import decode_into

    assert decode_into(srb) is None
    return srb


def read_srb(lba: int, sizes: list[int], tag: int, done: Completions) -> Srb:
    total = sum(sizes)
    cdb = bytes((0x28, 0)) + lba.to_bytes(4, "big") + bytes((0,)) + \
        (total // BS).to_bytes(2, "big") + bytes((0,))
    srb = Srb(cdb=cdb, data_direction=DataDirection.IN, data_transfer_length=total,
              sg_list=[memoryview(bytearray(n)) for n in sizes], queue_tag=tag, nexus=1,
              completion=done)
    from emuhba.scsi.cdb import decode_into

    assert decode_into(srb) is None
    return srb


async def consume_unit_attention(port: PortDriver, lun: int = 0) -> None:
    done = Completions()
    srb = Srb(lun=lun, cdb=bytes(6), nexus=1, queue_tag=0xFFFF, completion=done)
    from emuhba.scsi.cdb import decode_into

    decode_into(srb)
    port.submit(srb)
    await done.wait(1)


# ----------------------------------------------------------------------- the adapter queue


async def test_one_fifo_queue_for_all_units_in_arrival_order() -> None:
    mp = GatedMiniport(luns=3, depth=1)
    port = await started(mp, model="scsiport")
    assert isinstance(port, ScsiPortDriver) and port.adapter_limit == SCSIPORT_ADAPTER_LIMIT
    done = Completions()
    order = [2, 0, 0, 1, 2, 0]
    for i, lun in enumerate(order):
        port.submit(rw_srb(lun=lun, tag=i, done=done))
    # Per-unit depth 1 is not SCSIport's business: everything went, in arrival order.
    assert [s.queue_tag for s in mp.started] == list(range(6))
    assert [s.lun for s in mp.started] == order


async def test_the_adapter_queue_caps_everything_at_254() -> None:
    mp = GatedMiniport(luns=4, depth=255)
    port = await started(mp, model="scsiport")
    done = Completions()
    srbs = [rw_srb(lun=i % 4, tag=i, done=done) for i in range(600)]
    for srb in srbs:
        port.submit(srb)
    assert port.outstanding == len(mp.started) == 254
    assert port.counters()["held"] == 600 - 254
    while len(done.srbs) < 600:
        mp.release(50)
        await settle()
        assert port.outstanding <= 254
    done.assert_once(srbs)
    assert [s.queue_tag for s in done.srbs] == list(range(600))  # first in, first out
    # A lower limit from the operator (or the miniport) still applies.
    low = await started(GatedMiniport(luns=2, depth=8), model="scsiport", adapter_queue_limit=3)
    assert low.adapter_limit == 3


async def test_55_units_at_depth_255_get_254_outstanding_under_scsiport() -> None:
    units, depth, extra = 55, 255, 3
    mp = DiskMiniport.from_luns([("ram", 64 * 1024)] * units, target_port_name=TPN,
                                queue_depth=depth, slots=16384, latency_s=0.005)
    port = await started(mp, model="scsiport")
    done = Completions()
    srbs = [rw_srb(lun=lun, lba=i % 128, tag=lun << 16 | i, done=done)
            for lun in range(units) for i in range(depth + extra)]
    for srb in srbs:
        port.submit(srb)
    assert port.outstanding == SCSIPORT_ADAPTER_LIMIT == mp.controller.in_use
    assert sum(lq.held for lq in port.lun_queues()) == len(srbs) - 254
    await done.wait(len(srbs), timeout=60)
    done.assert_once(srbs)
    assert port.peak_outstanding == 254 and port.completed == len(srbs)
    assert mp.controller.in_use == 0
    await port.stop()


# ------------------------------------------------------------------------------ half duplex


class Stopwatch(DiskMiniport):
    """The disk miniport, noting when its start and interrupt routines run, and on which
    thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.starts: list[tuple[float, float]] = []
        self.isrs: list[tuple[float, float]] = []
        self.isr_threads: set[str] = set()
        self.isr_began = threading.Event()

    def hw_start_io(self, srb: Srb) -> bool:
        if srb.function != SrbFunction.EXECUTE_SCSI:
            return super().hw_start_io(srb)
        begin = time.perf_counter()
        try:
            return super().hw_start_io(srb)
        finally:
            self.starts.append((begin, time.perf_counter()))

    def hw_interrupt(self) -> bool:
        begin = time.perf_counter()
        self.isr_began.set()
        self.isr_threads.add(threading.current_thread().name)
        try:
            return super().hw_interrupt()
        finally:
            self.isrs.append((begin, time.perf_counter()))


def stopwatch(**kwargs: Any) -> Stopwatch:
    return Stopwatch.from_luns([("ram", 1 << 20)], target_port_name=TPN,
                               threaded_completions=True, **kwargs)


@pytest.mark.parametrize("model", MODELS)
async def test_a_completion_during_a_start_is_serviced_during_it_only_under_storport(
        model: str) -> None:
    cost = 0.2
    mp = stopwatch(start_cost_s=cost)
    port = await started(mp, model=model)
    done = Completions()
    port.submit(rw_srb(tag=1, done=done))  # the start routine holds the loop for `cost`
    await done.wait(1)
    (start_begin, start_end), = mp.starts
    isr_begin, _ = mp.isrs[0]
    assert start_end - start_begin >= cost
    assert all(name.startswith("emuhba-dma") for name in mp.isr_threads)
    if model == "storport":
        # Full duplex: the worker ran the interrupt routine while the start was running.
        assert isr_begin < start_end - cost / 2
        assert port.interrupts_during_start >= 1
    else:
        # Half duplex: it waited for the adapter lock until the start was over.
        assert isr_begin >= start_end
        assert port.interrupts_during_start == 0
    assert done.thread_ids == {threading.get_ident()}
    await port.stop()


@pytest.mark.parametrize("model", MODELS)
async def test_a_start_during_the_interrupt_routine_waits_only_under_scsiport(model: str) -> None:
    cost = 0.2
    mp = stopwatch(interrupt_cost_s=cost)
    port = await started(mp, model=model)
    done = Completions()
    port.submit(rw_srb(tag=1, done=done))
    await asyncio.to_thread(mp.isr_began.wait, 5)  # a worker is in the interrupt routine
    port.submit(rw_srb(tag=2, done=done))  # under SCSIport this call waits for the lock
    await done.wait(2)
    isr_begin, isr_end = mp.isrs[0]
    second_begin, _ = mp.starts[1]
    assert isr_end - isr_begin >= cost
    if model == "storport":
        assert second_begin < isr_end - cost / 2
    else:
        assert second_begin >= isr_end
    await port.stop()


@pytest.mark.parametrize("model", MODELS)
async def test_start_and_interrupt_routines_overlap_only_under_storport(model: str) -> None:
    mp = stopwatch(start_cost_s=0.002, interrupt_cost_s=0.001)
    port = await started(mp, model=model)
    done = Completions()
    srbs = [rw_srb(lba=i, tag=i, done=done) for i in range(40)]
    for srb in srbs:
        port.submit(srb)
        await asyncio.sleep(0)
    await done.wait(40, timeout=30)
    done.assert_once(srbs)
    overlaps = sum(1 for s0, s1 in mp.starts for i0, i1 in mp.isrs if i0 < s1 and s0 < i1)
    if model == "scsiport":
        assert overlaps == 0 and port.interrupts_during_start == 0
    else:
        assert overlaps > 0 and port.interrupts_during_start > 0
    await port.stop()


# --------------------------------------------------------------------------- scatter/gather


class SgSpy(DiskMiniport):
    """Notes the scatter/gather list the request arrives with and the one it is started with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrived: list[int] = []
        self.programmed: list[list[int]] = []

    def hw_build_io(self, srb: Srb) -> bool:
        self.arrived.append(len(srb.sg_list))
        return super().hw_build_io(srb)

    def hw_start_io(self, srb: Srb) -> bool:
        ok = super().hw_start_io(srb)
        self.programmed.append([view.nbytes for view in srb.sg_list])
        return ok


@pytest.mark.parametrize("model", MODELS)
async def test_scatter_gather_whole_under_storport_one_element_per_call_under_scsiport(
        model: str) -> None:
    mp = SgSpy.from_luns([("ram", 1 << 20)], target_port_name=TPN)
    port = await started(mp, model=model)
    await consume_unit_attention(port)
    mp.arrived.clear()
    mp.programmed.clear()
    before = port.sg_element_calls
    done = Completions()
    payload = os.urandom(16384)
    pieces = [payload[:5000], payload[5000:8000], payload[8000:]]  # 5000 + 3000 + 8384
    write = write_srb(40, pieces, 1, done)
    original = write.sg_list
    port.submit(write)
    await done.wait(1)
    read = read_srb(40, [10000, 6384], 2, done)
    port.submit(read)
    await done.wait(2)
    assert write.scsi_status == ScsiStatus.GOOD and read.scsi_status == ScsiStatus.GOOD
    assert b"".join(bytes(v) for v in read.sg_list) == payload
    assert write.sg_list is original  # the request leaves the port as it came
    if model == "storport":
        assert mp.arrived == [3, 2] and port.sg_element_calls == before
        assert mp.programmed == [[5000, 3000, 8384], [10000, 6384]]
    else:
        # The list was not on the request; each element came from one call, never past
        # the end of a page of its buffer.
        assert mp.arrived == [0, 0]
        assert mp.programmed == [[4096, 904, 3000, 4096, 4096, 192],
                                 [4096, 4096, 1808, 4096, 2288]]
        assert port.sg_element_calls - before == 6 + 5 == mp.sg_elements
    await port.stop()


async def test_hba_runs_unchanged_over_the_scsiport_model() -> None:
    hba = Hba(DiskMiniport.from_luns([("ram", 1 << 20)] * 2, target_port_name=TPN),
              model="scsiport")
    await hba.start()
    assert hba.model == "scsiport" and isinstance(hba.port, ScsiPortDriver)
    assert hba.luns(0, 0) == [0, 1]  # the bus scan went through the adapter queue
    done = Completions()
    ua = Srb(cdb=bytes(6), nexus=1, completion=done)
    hba.execute(ua)
    await done.wait(1)
    payload = os.urandom(8192)
    write = write_srb(7, [payload[:3000], payload[3000:]], 1, done)
    write.completion = done
    hba.execute(write)
    await done.wait(2)
    read = read_srb(7, [8192], 2, done)
    hba.execute(read)
    await done.wait(3)
    assert write.scsi_status == ScsiStatus.GOOD and bytes(read.sg_list[0]) == payload
    assert hba.port.sg_element_calls > 0
    await hba.stop()


# --------------------------------------------------------------------------- queue controls


async def test_queue_controls_do_not_exist_calls_are_counted_and_ignored() -> None:
    mp = GatedMiniport(luns=2, depth=4)
    port = await started(mp, model="scsiport")
    port.pause_device(0, 0, 0, 30.0)
    port.pause(30.0)
    port.device_busy(0, 0, 0, 5)
    port.busy(5)
    port.resume_device(0, 0, 0)
    port.resume()
    port.device_ready(0, 0, 0)
    port.ready()
    assert port.set_queue_depth(0, 0, 1, 1) == 1  # recorded, not enforced
    assert port.ignored_controls == 9
    for i in range(6):
        port.submit(rw_srb(lun=i % 2, tag=i))
    assert len(mp.started) == 6  # nothing paused, nothing busy, unit 1 not held to depth 1
    assert not port.paused and not port.busy_state
    assert port.pauses == port.busies == port.device_pauses == port.device_busies == 0


class BusyUnitZero(GatedMiniport):
    """Unit 0 answers every request BUSY (at once, from its start routine) while ``busy``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.busy = True

    def hw_start_io(self, srb: Srb) -> bool:
        if self.busy and srb.function == SrbFunction.EXECUTE_SCSI and srb.lun == 0:
            srb.complete(SrbStatus.BUSY)
            self.port.request_complete(srb)
            return True
        return super().hw_start_io(srb)


@pytest.mark.parametrize("model", MODELS)
async def test_a_busy_device_monopolizes_the_adapter_queue_only_under_scsiport(model: str) -> None:
    mp = BusyUnitZero(luns=3, depth=16, auto=True)
    port = await started(mp, model=model, busy_retry_delay=0.002)
    done = Completions()
    blocked = rw_srb(lun=0, tag=100, done=done)
    port.submit(blocked)
    others = [rw_srb(lun=1 + i % 2, tag=i, done=done) for i in range(20)]
    for srb in others:
        port.submit(srb)
    await until(lambda: blocked.retries >= 10)
    if model == "storport":
        # Unit 0 waits in its own queue; the others are served meanwhile.
        await done.wait(20)
        assert blocked not in done.srbs
    else:
        # The BUSY request keeps the head of the adapter queue: nobody behind it gets out.
        assert done.srbs == [] and not mp.started
        assert sum(lq.held for lq in port.lun_queues() if lq.lun in (1, 2)) == 20
    mp.busy = False
    await done.wait(21)
    done.assert_once([blocked, *others])
    if model == "scsiport":
        assert done.srbs[0] is blocked  # and when it got through, the rest followed in order
        assert [s.queue_tag for s in done.srbs[1:]] == list(range(20))


# --------------------------------------------------------------------------- error recovery


async def test_a_timed_out_request_makes_scsiport_reset_the_bus_at_once() -> None:
    mp = StuckDevice("abort_task", stuck={1})  # an abort would have been enough
    port = await started(mp, model="scsiport", request_timeout=0.2, recovery_timeout=0.05)
    done = Completions()
    stuck = rw_srb(tag=1, done=done)
    port.submit(stuck)
    await asyncio.sleep(0.1)
    bystander = rw_srb(lun=1, tag=2, done=done)  # young: caught by the reset, not timed out
    port.submit(bystander)
    await done.wait(1)
    assert stuck.srb_status == SrbStatus.TIMEOUT
    assert mp.steps == ["bus_reset"]
    assert [(r.step, r.cleared) for r in port.recovery_history] == [("bus_reset", True)]
    counters = port.counters()
    assert counters["recovery_bus_resets"] == 1 and counters["recovery_aborts"] == 0
    assert counters["timeouts"] == 1
    await until(lambda: mp.starts.get(2) == 2)  # restarted after the reset
    mp.release()
    await done.wait(2)
    assert bystander.srb_status == SrbStatus.SUCCESS or \
        bystander.scsi_status == ScsiStatus.CHECK_CONDITION
    done.assert_once([stuck, bystander])


async def test_units_timing_out_together_get_one_bus_reset() -> None:
    mp = StuckDevice("bus_reset", stuck={1, 2, 3})
    port = await started(mp, model="scsiport", request_timeout=0.04, recovery_timeout=0.03)
    done = Completions()
    srbs = [rw_srb(tag=1, done=done), rw_srb(lun=1, tag=2, done=done),
            rw_srb(target_id=1, tag=3, done=done)]
    for srb in srbs:
        port.submit(srb)
    await done.wait(3)
    assert all(s.srb_status == SrbStatus.TIMEOUT for s in srbs)
    assert mp.steps == ["bus_reset"] and port.recovery_bus_resets == 1 and port.timeouts == 3


async def test_a_lun_reset_from_the_initiator_under_scsiport() -> None:
    mp = GatedMiniport(luns=2, depth=8)
    port = await started(mp, model="scsiport", adapter_queue_limit=2)
    done = Completions()
    mine = [rw_srb(lun=0, tag=i, done=done) for i in range(3)]
    theirs = [rw_srb(lun=1, tag=10 + i, done=done) for i in range(2)]
    for srb in (*mine, *theirs):
        port.submit(srb)
    assert [s.queue_tag for s in mp.started] == [0, 1]
    assert await port.reset_logical_unit(0, 0, 0) is True
    assert all(s.srb_status == SrbStatus.ABORTED for s in mine)  # at the miniport and held
    assert [s.queue_tag for s in mp.started] == [10, 11]
    mp.release()
    await done.wait(5)
    done.assert_once([*mine, *theirs])
