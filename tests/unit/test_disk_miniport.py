"""DiskMiniport and EmulatedDiskController under the real port driver: slots, busy handling,
the DMA workers, latency, addressing, abort/reset at the controller, and teardown."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from emuhba.miniport import AdapterControl, PortConfiguration
from emuhba.port import PortDriver
from emuhba.scsi.cdb import decode_into
from emuhba.srb import DataDirection, ScsiStatus, Srb, SrbFunction, SrbStatus
from miniports.disk import DiskMiniport, EmulatedDiskController, build_units, unit_serial
from miniports.lu import LogicalUnit
from miniports.store import RamStore
from tests.pagecache import evict

BS = 512


class Completions:
    def __init__(self) -> None:
        self.srbs: list[Srb] = []
        self.calls: Counter[int] = Counter()
        self.threads: set[int] = set()

    def __call__(self, srb: Srb) -> None:
        self.srbs.append(srb)
        self.calls[id(srb)] += 1
        self.threads.add(threading.get_ident())

    async def wait(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.srbs) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.srbs)} of {n} completions after {timeout}s")
            await asyncio.sleep(0.001)


def rw_srb(write: bool = False, lun: int = 0, lba: int = 0, blocks: int = 1, tag: int = 0,
           nexus: int = 1, done: Completions | None = None, target_id: int = 0,
           data: bytes | None = None) -> Srb:
    cdb = struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, lba, 0, blocks, 0)
    buf = bytearray(data) if data is not None else bytearray(blocks * BS)
    srb = Srb(target_id=target_id, lun=lun, cdb=cdb,
              data_direction=DataDirection.OUT if write else DataDirection.IN,
              data_transfer_length=len(buf), sg_list=[memoryview(buf)], queue_tag=tag,
              nexus=nexus, completion=done)
    assert decode_into(srb) is None
    return srb


async def started(miniport: DiskMiniport, **kwargs: Any) -> PortDriver:
    port = PortDriver(miniport, **kwargs)
    assert await port.start()
    return port


async def prime(port: PortDriver, lun: int = 0, nexus: int = 1) -> None:
    srb = Srb(lun=lun, cdb=bytes(6), nexus=nexus, queue_tag=0xFFFF)
    decode_into(srb)
    done = Completions()
    srb.completion = done
    port.submit(srb)
    await done.wait(1)


def test_from_luns_fills_the_port_configuration() -> None:
    mp = DiskMiniport.from_luns([("ram", 1 << 20), ("ram", 1 << 20), ("ram", 1 << 20)],
                                target_port_name="iqn.t,t,1", path_id=1, target_id=4,
                                queue_depth=300)
    config = PortConfiguration()

    class Port:
        def interrupt(self) -> None: ...

    assert mp.hw_find_adapter(Port(), config)  # type: ignore[arg-type]
    assert config.number_of_buses == 2 and config.maximum_number_of_targets == 5
    assert config.maximum_number_of_logical_units == 3
    assert config.srb_type_extended is True and config.default_queue_depth == 300
    assert config.adapter_queue_limit is None
    assert mp.controller.addresses() == [(1, 4, 0), (1, 4, 1), (1, 4, 2)]
    supported = mp.hw_adapter_control(AdapterControl.QUERY_SUPPORTED_CONTROL_TYPES)
    assert AdapterControl.STOP_ADAPTER in supported
    mp.hw_free_adapter_resources()


def test_bad_lun_specs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DiskMiniport.from_luns([("tape", 10)], target_port_name="x")
    with pytest.raises(ValueError):
        DiskMiniport.from_luns([("ram",)], target_port_name="x")
    with pytest.raises(OSError):  # a file LUN without a size must exist
        DiskMiniport.from_luns([("file", tmp_path / "missing.img", None)], target_port_name="x")


def test_unit_serials_are_stable_and_distinct() -> None:
    a = unit_serial("iqn.a", 0, 0, 0)
    assert a == unit_serial("iqn.a", 0, 0, 0)
    assert len({a, unit_serial("iqn.a", 0, 0, 1), unit_serial("iqn.b", 0, 0, 0)}) == 3


async def test_full_slots_make_the_port_hold_and_retry_not_fail() -> None:
    mp = DiskMiniport.from_luns([("ram", 1 << 20)] * 2, target_port_name="iqn.t,t,1",
                                queue_depth=16, slots=3, latency_s=0.005)
    port = await started(mp, busy_retry_delay=0.0)
    await prime(port, 0)
    await prime(port, 1)
    done = Completions()
    srbs = [rw_srb(lun=i % 2, lba=i, tag=i, done=done) for i in range(40)]
    for srb in srbs:
        port.submit(srb)
    assert mp.controller.in_use <= 3
    await done.wait(40)
    assert all(done.calls[id(s)] == 1 for s in srbs)
    assert all(s.srb_status == SrbStatus.SUCCESS and s.scsi_status == ScsiStatus.GOOD
               for s in srbs)
    assert mp.controller.busy_rejections > 0 and port.busy_retries > 0
    assert mp.controller.in_use == 0
    await port.stop()


async def test_latency_delays_completion_and_may_be_a_model() -> None:
    mp = DiskMiniport.from_luns([("ram", 1 << 20)], target_port_name="iqn.t,t,1",
                                latency_s=lambda srb: 0.01 * srb.transfer_blocks)
    port = await started(mp)
    await prime(port)
    done = Completions()
    t0 = time.monotonic()
    port.submit(rw_srb(blocks=4, tag=1, done=done))
    await done.wait(1)
    assert time.monotonic() - t0 >= 0.035
    await port.stop()


def firmware_threads(mp: DiskMiniport) -> list[str]:
    """The names of the threads LUN 0's firmware (``LogicalUnit.execute``) runs each command
    on, as they happen; the unit itself stays real."""
    seen: list[str] = []
    unit = mp.controller.units[(0, 0, 0)]
    original = unit.execute

    def execute(srb: Srb) -> None:
        seen.append(threading.current_thread().name)
        original(srb)

    unit.execute = execute  # type: ignore[method-assign]
    return seen


async def test_file_store_io_runs_on_dma_workers_except_cached_reads(tmp_path: Path) -> None:
    """Writes to a file LUN run on the DMA workers and land in the file. A READ whose data
    is cached is answered on the loop (preadv RWF_NOWAIT), without the firmware's full path;
    one that would wait for the device, or that has a unit attention to report, runs on a
    worker. Completions always reach the port on the loop thread."""
    path = tmp_path / "disk.img"
    mp = DiskMiniport.from_luns([("file", path, 1 << 20)], target_port_name="iqn.t,t,1")
    port = await started(mp)
    await prime(port)
    seen = firmware_threads(mp)
    done = Completions()
    payload = bytes(range(256)) * 8
    port.submit(rw_srb(write=True, lba=10, blocks=4, tag=1, done=done, data=payload))
    await done.wait(1)
    assert len(seen) == 1 and seen[0].startswith("emuhba-dma")
    with open(path, "rb") as f:
        f.seek(10 * BS)
        assert f.read(len(payload)) == payload
    cached = rw_srb(lba=10, blocks=4, tag=2, done=done)
    port.submit(cached)
    await done.wait(2)
    assert len(seen) == 1, "a cached read does not go to a worker"
    assert cached.scsi_status == ScsiStatus.GOOD and bytes(cached.sg_list[0]) == payload
    assert cached.residual == 0 and cached.data_transfer_length == len(payload)

    # Cached, but a new nexus has its power-on unit attention to hear: the full path.
    fresh = rw_srb(lba=10, blocks=4, tag=4, nexus=2, done=done)
    port.submit(fresh)
    await done.wait(3)
    assert len(seen) == 2 and fresh.scsi_status == ScsiStatus.CHECK_CONDITION
    assert fresh.sense[12:14] == bytes([0x29, 0x00])
    # Out of range: the full path answers it, with its sense.
    beyond = rw_srb(lba=(1 << 20) // BS, blocks=1, tag=5, done=done)
    port.submit(beyond)
    await done.wait(4)
    assert len(seen) == 3 and beyond.sense[12:14] == bytes([0x21, 0x00])
    # A read that would wait for the device goes to a worker.
    tags = iter(range(100, 200))
    completed = len(done.srbs)

    for _ in range(20):  # the skip below comes last: it loses no other check
        evict(path, 10 * BS, 4 * BS)
        uncached = rw_srb(lba=10, blocks=4, tag=next(tags), done=done)
        before = len(seen)
        port.submit(uncached)
        completed += 1
        await done.wait(completed)
        assert bytes(uncached.sg_list[0]) == payload
        if len(seen) > before:
            assert seen[-1].startswith("emuhba-dma")
            break
    else:
        await port.stop()
        pytest.skip("reads of evicted pages never had to wait on this device")

    assert done.threads == {threading.get_ident()}
    await port.stop()


async def test_addresses_without_a_unit() -> None:
    def build(irq: Any) -> EmulatedDiskController:
        units = build_units([((0, 0, 0), RamStore(64, BS)), ((0, 2, 1), RamStore(64, BS))],
                            target_port_name="iqn.t,t,1")
        return EmulatedDiskController(units, irq=irq)

    port = await started(DiskMiniport(build))
    done = Completions()
    no_lun = rw_srb(lun=5, done=done)
    no_target = rw_srb(target_id=1, done=done)
    port.submit(no_lun)
    port.submit(no_target)
    await done.wait(2)
    assert no_lun.srb_status == SrbStatus.INVALID_LUN
    assert no_target.srb_status == SrbStatus.SELECTION_TIMEOUT
    await port.stop()


async def test_abort_waiting_command_and_fail_to_abort_a_finished_one() -> None:
    mp = DiskMiniport.from_luns([("ram", 1 << 20)], target_port_name="iqn.t,t,1",
                                latency_s=30.0)
    port = await started(mp)
    done = Completions()
    waiting = rw_srb(tag=7, done=done)
    port.submit(waiting)
    assert await port.abort(waiting) is True
    assert waiting.srb_status == SrbStatus.ABORTED and done.calls[id(waiting)] == 1
    assert mp.controller.in_use == 0 and mp.controller.aborts == 1
    await port.stop()

    quick = DiskMiniport.from_luns([("ram", 1 << 20)], target_port_name="iqn.t,t,1")
    port = await started(quick)
    srb = rw_srb(tag=8, done=done)
    port.submit(srb)  # runs inline at once: already finished, sitting in the completion ring
    assert await port.abort(srb) is False
    assert done.calls[id(srb)] == 1 and srb.srb_status != SrbStatus.ABORTED
    await port.stop()


async def test_controller_abort_matches_nexus_and_tag() -> None:
    controller = EmulatedDiskController(
        {(0, 0, 0): LogicalUnit(RamStore(64, BS), lun=0, target_luns=lambda: [0], serial="S")},
        latency_s=30.0, irq=lambda: None)
    controller.start()
    a, b = rw_srb(tag=1, nexus=1), rw_srb(tag=1, nexus=2)
    assert controller.submit(a) and controller.submit(b)
    tmf = Srb(function=SrbFunction.ABORT_COMMAND, queue_tag=1, nexus=2)
    controller.abort(tmf)
    reaped = [controller.reap(), controller.reap(), controller.reap()]
    assert reaped == [b, tmf, None]
    assert b.srb_status == SrbStatus.ABORTED and tmf.srb_status == SrbStatus.SUCCESS
    assert a.srb_status == SrbStatus.PENDING and controller.in_use == 1
    controller.close()


async def test_lun_reset_through_the_controller() -> None:
    mp = DiskMiniport.from_luns([("ram", 1 << 20)] * 2, target_port_name="iqn.t,t,1",
                                latency_s=30.0)
    port = await started(mp)
    done = Completions()
    on_unit = [rw_srb(tag=i, done=done) for i in range(4)]
    other = rw_srb(lun=1, tag=9, done=done)
    for srb in [*on_unit, other]:
        port.submit(srb)
    assert await port.reset_logical_unit(0, 0, 0) is True
    assert all(s.srb_status == SrbStatus.ABORTED and done.calls[id(s)] == 1 for s in on_unit)
    assert done.calls[id(other)] == 0 and mp.controller.in_use == 1
    assert await port.reset_bus(0) is True
    assert done.calls[id(other)] == 1 and done.srbs[-1].srb_status == SrbStatus.BUS_RESET
    assert await port.reset_logical_unit(0, 0, 9) is False  # nothing there
    await port.stop()


async def test_reset_while_dma_runs_reports_the_command_once(tmp_path: Path) -> None:
    mp = DiskMiniport.from_luns([("file", tmp_path / "d.img", 1 << 20)],
                                target_port_name="iqn.t,t,1")
    port = await started(mp)
    await prime(port)
    unit = mp.controller.units[(0, 0, 0)]
    gate = threading.Event()
    original = unit.execute

    def slow(srb: Srb) -> None:
        gate.wait(5)
        original(srb)

    unit.execute = slow  # type: ignore[method-assign]
    done = Completions()
    srb = rw_srb(write=True, tag=3, done=done)
    port.submit(srb)
    reset = asyncio.create_task(port.reset_logical_unit(0, 0, 0))
    await asyncio.sleep(0.02)
    assert not reset.done()  # the DMA is still running; the reset waits for it
    gate.set()
    assert await reset is True
    assert srb.srb_status == SrbStatus.ABORTED and done.calls[id(srb)] == 1
    await port.stop()


async def test_flush_function_and_teardown_close_the_stores(tmp_path: Path) -> None:
    mp = DiskMiniport.from_luns([("file", tmp_path / "d.img", 1 << 20), ("ram", 1 << 16)],
                                target_port_name="iqn.t,t,1")
    port = await started(mp)
    done = Completions()
    flush = Srb(function=SrbFunction.FLUSH, lun=0, completion=done)
    port.submit(flush)
    await done.wait(1)
    assert flush.srb_status == SrbStatus.SUCCESS
    store = mp.controller.units[(0, 0, 0)].store
    fd = store.fd  # type: ignore[attr-defined]
    await port.stop()
    assert mp.controller.closed
    with pytest.raises(OSError):
        os.fstat(fd)


async def test_stopped_adapter_refuses_then_restarts() -> None:
    mp = DiskMiniport.from_luns([("ram", 1 << 20)], target_port_name="iqn.t,t,1")
    port = await started(mp, busy_retry_delay=0.001)
    assert mp.hw_adapter_control(AdapterControl.STOP_ADAPTER) is True
    done = Completions()
    srb = rw_srb(tag=1, done=done)
    port.submit(srb)  # the controller answers busy; the port keeps retrying, never fails it
    await asyncio.sleep(0.03)
    assert not done.srbs and srb.retries >= 1
    assert mp.hw_adapter_control(AdapterControl.RESTART_ADAPTER) is True
    await done.wait(1)
    assert done.calls[id(srb)] == 1
    await port.stop()


# ------------------------------------------------------- threads, modeled costs, slot count


class Watched(DiskMiniport):
    """The disk miniport, noting where its interrupt routine ran and how long its routines took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.isr_threads: set[str] = set()
        self.start_times: list[float] = []
        self.isr_times: list[float] = []

    def hw_start_io(self, srb: Srb) -> bool:
        t0 = time.perf_counter()
        try:
            return super().hw_start_io(srb)
        finally:
            if srb.function == SrbFunction.EXECUTE_SCSI:
                self.start_times.append(time.perf_counter() - t0)

    def hw_interrupt(self) -> bool:
        t0 = time.perf_counter()
        self.isr_threads.add(threading.current_thread().name)
        try:
            return super().hw_interrupt()
        finally:
            self.isr_times.append(time.perf_counter() - t0)


async def test_threaded_completions_interrupt_from_the_dma_workers() -> None:
    mp = Watched.from_luns([("ram", 1 << 20)], target_port_name="iqn.t,t,1",
                           threaded_completions=True)
    port = await started(mp)
    await prime(port)
    done = Completions()
    srbs = [rw_srb(write=True, lba=i, tag=i, done=done, data=bytes([i]) * BS) for i in range(64)]
    for srb in srbs:
        port.submit(srb)
    await done.wait(64)
    assert all(done.calls[id(s)] == 1 and s.scsi_status == ScsiStatus.GOOD for s in srbs)
    # The worker that raised the line ran the routine; the port still completed on the loop.
    assert mp.isr_threads and all(n.startswith("emuhba-dma") for n in mp.isr_threads)
    assert done.threads == {threading.get_ident()}
    assert mp.controller.in_use == 0 and port.outstanding == 0
    await port.stop()


async def test_modeled_costs_are_spent_in_the_routines() -> None:
    mp = Watched.from_luns([("ram", 1 << 20)], target_port_name="iqn.t,t,1",
                           start_cost_s=0.01, interrupt_cost_s=0.02)
    port = await started(mp)
    assert mp.controller.start_cost_s == 0.01 and mp.controller.interrupt_cost_s == 0.02
    done = Completions()
    port.submit(rw_srb(tag=1, done=done))
    await done.wait(1)
    assert mp.start_times and min(mp.start_times) >= 0.01
    assert max(mp.isr_times) >= 0.02  # once per request the routine completed
    await port.stop()


async def test_slot_count_is_taken_minus_freed() -> None:
    controller = EmulatedDiskController(
        {(0, 0, 0): LogicalUnit(RamStore(64, BS), lun=0, target_luns=lambda: [0], serial="S")},
        slots=2, latency_s=30.0, irq=lambda: None)
    controller.start()
    a, b, c = rw_srb(tag=1), rw_srb(tag=2), rw_srb(tag=3)
    assert controller.submit(a) and controller.submit(b)
    assert controller.in_use == 2 and not controller.submit(c)  # full: busy
    controller.abort(Srb(function=SrbFunction.ABORT_COMMAND, queue_tag=1, nexus=1))
    assert controller.reap() is a and controller.in_use == 1
    controller.in_use += 1  # a subclass may take a slot by hand
    assert controller.in_use == 2
    controller.close()


async def test_hot_resets_while_workers_complete_keep_the_slot_count_right() -> None:
    mp = DiskMiniport.from_luns([("ram", 1 << 20)] * 2, target_port_name="iqn.t,t,1",
                                threaded_completions=True, latency_s=0.001)
    port = await started(mp)
    await prime(port, 0)
    await prime(port, 1)
    done = Completions()
    srbs = [rw_srb(lun=i % 2, lba=i % 64, tag=i, done=done) for i in range(400)]
    for i, srb in enumerate(srbs):
        port.submit(srb)
        if i % 100 == 50:
            assert await port.reset_logical_unit(0, 0, i % 2) is True
    await done.wait(400, timeout=30)
    assert all(done.calls[id(s)] == 1 for s in srbs)
    assert mp.controller.in_use == 0 and port.outstanding == 0
    await port.stop()
