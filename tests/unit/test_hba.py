"""The Hba facade as the iSCSI front end uses it: SRB outcomes become SCSI answers, absent units
answer as SPC-4 prescribes, task management calls back, and stop flushes."""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from emuhba.hba import Hba, report_luns_data
from emuhba.scsi.sense import parse_sense
from emuhba.srb import DataDirection, ScsiStatus, Srb, SrbStatus
from miniports.disk import DiskMiniport, EmulatedDiskController, build_units
from miniports.store import RamStore

BS = 512


class Completions:
    def __init__(self) -> None:
        self.srbs: list[Srb] = []
        self.calls: Counter[int] = Counter()

    def __call__(self, srb: Srb) -> None:
        self.srbs.append(srb)
        self.calls[id(srb)] += 1

    async def wait(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.srbs) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.srbs)} of {n} completions after {timeout}s")
            await asyncio.sleep(0.001)


def command(cdb: bytes, *, lun: int = 0, data_in: int = 0, data_out: bytes | None = None,
            tag: int = 0, nexus: int = 1, done: Completions | None = None,
            target_id: int = 0) -> Srb:
    if data_out is not None:
        return Srb(target_id=target_id, lun=lun, cdb=cdb, data_direction=DataDirection.OUT,
                   data_transfer_length=len(data_out), sg_list=[memoryview(bytearray(data_out))],
                   queue_tag=tag, nexus=nexus, completion=done)
    return Srb(target_id=target_id, lun=lun, cdb=cdb,
               data_direction=DataDirection.IN if data_in else DataDirection.NONE,
               data_transfer_length=data_in,
               sg_list=[memoryview(bytearray(data_in))] if data_in else [], queue_tag=tag,
               nexus=nexus, completion=done)


async def run(hba: Hba, srb: Srb) -> Srb:
    done = Completions()
    srb.completion = done
    hba.execute(srb)
    await done.wait(1)
    await asyncio.sleep(0.005)
    assert done.calls[id(srb)] == 1
    return srb


def data_of(srb: Srb) -> bytes:
    return bytes(srb.sg_list[0][:srb.data_transfer_length])


def inquiry(alloc: int = 96, evpd: int = 0, page: int = 0) -> bytes:
    return bytes((0x12, evpd, page)) + alloc.to_bytes(2, "big") + b"\x00"


def report_luns(alloc: int = 4096, select: int = 0) -> bytes:
    return bytes((0xA0, 0, select, 0, 0, 0)) + alloc.to_bytes(4, "big") + b"\x00\x00"


def rw10(write: bool, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, lba, 0, blocks, 0)


TUR = bytes(6)


def stalled_media(srb: Srb) -> float:
    """Reads and writes wait a long time at the controller (abortable); the rest is instant."""
    return 30.0 if srb.opcode in (0x28, 0x2A) else 0.0


async def ram_hba(luns: int = 2, **kwargs: Any) -> Hba:
    hba = Hba(DiskMiniport.from_luns([("ram", 1 << 20)] * luns, target_port_name="iqn.t,t,1",
                                     **kwargs))
    await hba.start()
    return hba


def sparse_hba(layout: list[tuple[int, int, int]], **kwargs: Any) -> Hba:
    def build(irq: Any) -> EmulatedDiskController:
        units = build_units([(a, RamStore(64, BS)) for a in layout], target_port_name="iqn.t,t,1")
        return EmulatedDiskController(units, irq=irq)

    return Hba(DiskMiniport(build, queue_depth=32), **kwargs)


async def test_topology_and_queue_capacity() -> None:
    hba = sparse_hba([(0, 0, 1), (0, 0, 2), (0, 1, 0)])
    await hba.start()
    assert hba.targets() == [(0, 0), (0, 1)]
    assert hba.luns(0, 0) == [1, 2] and hba.luns(0, 1) == [0] and hba.luns(0, 5) == []
    assert hba.queue_capacity(0, 0) == 64 and hba.queue_capacity(0, 1) == 32
    await hba.stop()


async def test_command_to_an_absent_lun_is_lu_not_supported() -> None:
    hba = await ram_hba()
    srb = await run(hba, command(rw10(False, 0, 1), lun=9, data_in=BS))
    assert srb.scsi_status == ScsiStatus.CHECK_CONDITION
    assert parse_sense(srb.sense).code == (0x5, 0x25, 0x00)
    assert srb.data_transfer_length == 0 and srb.residual == BS
    srb = await run(hba, command(TUR, lun=0, target_id=3))  # a target nobody answers for
    assert parse_sense(srb.sense).code == (0x5, 0x25, 0x00)
    await hba.stop()


async def test_inquiry_to_an_absent_lun_reports_qualifier_011b() -> None:
    hba = await ram_hba()
    srb = await run(hba, command(inquiry(96), lun=9, data_in=96))
    assert srb.scsi_status == ScsiStatus.GOOD
    data = data_of(srb)
    assert data[0] == 0x7F  # peripheral qualifier 011b, device type 1Fh
    assert len(data) == 36 and data[4] == 31 and data[3] & 0x0F == 2
    assert srb.residual == 96 - 36
    short = await run(hba, command(inquiry(5), lun=9, data_in=5))
    assert data_of(short) == data[:5]
    vpd0 = await run(hba, command(inquiry(64, evpd=1, page=0), lun=9, data_in=64))
    assert data_of(vpd0) == bytes((0x7F, 0x00, 0x00, 0x01, 0x00))
    serial = await run(hba, command(inquiry(64, evpd=1, page=0x80), lun=9, data_in=64))
    assert serial.scsi_status == ScsiStatus.CHECK_CONDITION
    assert parse_sense(serial.sense).code == (0x5, 0x24, 0x00)
    # A present unit answers for itself (qualifier 000b, direct access).
    present = await run(hba, command(inquiry(96), lun=1, data_in=96))
    assert data_of(present)[0] == 0x00
    await hba.stop()


async def test_report_luns_to_an_absent_lun_zero_comes_from_the_scan() -> None:
    hba = sparse_hba([(0, 0, 3), (0, 0, 300)])
    await hba.start()
    srb = await run(hba, command(report_luns(), lun=0, data_in=4096))
    assert srb.scsi_status == ScsiStatus.GOOD
    data = data_of(srb)
    assert data == report_luns_data([3, 300])
    assert int.from_bytes(data[:4], "big") == 16
    assert data[8:10] == b"\x00\x03" and data[16:18] == b"\x41\x2c"  # flat space for 300
    wellknown = await run(hba, command(report_luns(select=1), lun=0, data_in=4096))
    assert data_of(wellknown) == bytes(8)
    await hba.stop()


async def test_request_sense_to_an_absent_lun_returns_the_reason_as_data() -> None:
    hba = await ram_hba()
    srb = await run(hba, command(bytes((0x03, 0, 0, 0, 252, 0)), lun=9, data_in=252))
    assert srb.scsi_status == ScsiStatus.GOOD
    assert parse_sense(data_of(srb)).code == (0x5, 0x25, 0x00)
    await hba.stop()


async def test_malformed_cdb_is_answered_at_once() -> None:
    hba = await ram_hba()
    done = Completions()
    srb = command(b"\x28\x00\x00", data_in=BS, done=done)  # READ(10) cut short
    hba.execute(srb)
    assert done.calls[id(srb)] == 1  # before execute returned
    assert srb.scsi_status == ScsiStatus.CHECK_CONDITION
    assert parse_sense(srb.sense).code == (0x5, 0x24, 0x00)
    await hba.stop()


async def test_device_status_and_sense_pass_through() -> None:
    hba = await ram_hba()
    first = await run(hba, command(TUR))
    assert first.scsi_status == ScsiStatus.CHECK_CONDITION
    assert parse_sense(first.sense).code == (0x6, 0x29, 0x00)  # the unit's own power-on UA
    past_end = await run(hba, command(rw10(False, 1 << 20, 1), data_in=BS))
    assert parse_sense(past_end.sense).code == (0x5, 0x21, 0x00)
    await hba.stop()


async def test_failures_without_scsi_status_become_check_conditions() -> None:
    class FaultyController(EmulatedDiskController):
        """Hardware that fails a command by LBA: 7 = firmware fault, 8 = link down."""

        def submit(self, srb: Srb) -> bool:
            if srb.lba in (7, 8):
                self.in_use += 1
                srb.complete(SrbStatus.ERROR if srb.lba == 7 else SrbStatus.LINK_DOWN)
                self.post(srb)
                return True
            return super().submit(srb)

    def build(irq: Any) -> EmulatedDiskController:
        units = build_units([((0, 0, 0), RamStore(64, BS))], target_port_name="iqn.t,t,1")
        return FaultyController(units, irq=irq)

    hba = Hba(DiskMiniport(build))
    await hba.start()
    await run(hba, command(TUR))
    fault = await run(hba, command(rw10(False, 7, 1), data_in=BS))
    assert fault.scsi_status == ScsiStatus.CHECK_CONDITION
    assert parse_sense(fault.sense).code == (0x4, 0x44, 0x00)
    link = await run(hba, command(rw10(False, 8, 1), data_in=BS))
    assert parse_sense(link.sense).key == 0x2
    await hba.stop()


async def test_file_lun_write_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "lun0.img"
    hba = Hba(DiskMiniport.from_luns([("file", path, 4 << 20), ("ram", 1 << 20)],
                                     target_port_name="iqn.t,t,1"))
    await hba.start()
    assert hba.luns(0, 0) == [0, 1]
    await run(hba, command(TUR))
    payload = bytes((i * 7) & 0xFF for i in range(8 * BS))
    write = await run(hba, command(rw10(True, 100, 8), data_out=payload))
    assert write.scsi_status == ScsiStatus.GOOD and write.srb_status == SrbStatus.SUCCESS
    read = await run(hba, command(rw10(False, 100, 8), data_in=8 * BS))
    assert read.scsi_status == ScsiStatus.GOOD and data_of(read) == payload
    assert read.residual == 0
    await hba.stop()
    with open(path, "rb") as f:
        f.seek(100 * BS)
        assert f.read(len(payload)) == payload


async def test_abort_task_tells_the_front_end_and_calls_back() -> None:
    hba = await ram_hba(latency_s=stalled_media)
    done = Completions()
    srb = command(rw10(False, 0, 1), data_in=BS, tag=5, done=done)
    hba.execute(srb)
    result: list[bool] = []
    hba.abort_task(srb, result.append)
    while not result:
        await asyncio.sleep(0.001)
    assert result == [True]
    assert done.calls[id(srb)] == 1
    assert srb.srb_status == SrbStatus.ABORTED and srb.scsi_status == ScsiStatus.TASK_ABORTED
    again: list[bool] = []
    hba.abort_task(srb, again.append)  # already complete: still "function complete"
    while not again:
        await asyncio.sleep(0.001)
    assert again == [True]
    await hba.stop()


async def test_abort_task_set_only_touches_that_nexus_and_clear_touches_all() -> None:
    hba = await ram_hba(latency_s=stalled_media)
    done = Completions()
    mine = [command(rw10(False, i, 1), data_in=BS, tag=i, nexus=1, done=done) for i in range(3)]
    theirs = [command(rw10(False, i, 1), data_in=BS, tag=i, nexus=2, done=done) for i in range(3)]
    for srb in mine + theirs:
        hba.execute(srb)
    result: list[bool] = []
    hba.abort_task_set(0, 0, 0, 1, result.append)
    while not result:
        await asyncio.sleep(0.001)
    assert result == [True]
    assert all(s.srb_status == SrbStatus.ABORTED for s in mine)
    assert all(s.srb_status == SrbStatus.PENDING for s in theirs)
    hba.clear_task_set(0, 0, 0, result.append)
    while len(result) < 2:
        await asyncio.sleep(0.001)
    assert result == [True, True]
    assert all(s.srb_status == SrbStatus.ABORTED for s in theirs)
    assert all(done.calls[id(s)] == 1 for s in mine + theirs)
    await hba.stop()


async def test_lun_and_target_reset() -> None:
    hba = await ram_hba(latency_s=stalled_media)
    done = Completions()
    srbs = [command(rw10(False, i, 1), lun=i % 2, data_in=BS, tag=i, done=done)
            for i in range(4)]
    for srb in srbs:
        hba.execute(srb)
    result: list[bool] = []
    hba.reset_lun(0, 0, 1, result.append)
    while not result:
        await asyncio.sleep(0.001)
    assert result == [True]
    assert [s.srb_status for s in srbs] == [SrbStatus.PENDING, SrbStatus.ABORTED] * 2
    hba.reset_target(0, 0, result.append)
    while len(result) < 2:
        await asyncio.sleep(0.001)
    assert result == [True, True]
    assert all(s.srb_status == SrbStatus.ABORTED and done.calls[id(s)] == 1 for s in srbs)
    await hba.stop()


async def test_nexus_lost_aborts_its_tasks_and_the_unit_forgets_it() -> None:
    hba = await ram_hba(luns=1)
    await run(hba, command(TUR, nexus=4))  # consume the power-on UA
    assert (await run(hba, command(TUR, nexus=4))).scsi_status == ScsiStatus.GOOD
    hba.port.pause_device(0, 0, 0, 30.0)  # hold the next ones in the port
    done = Completions()
    held = [command(TUR, nexus=4, tag=i, done=done) for i in range(3)]
    other = command(TUR, nexus=5, tag=9, done=done)
    for srb in [*held, other]:
        hba.execute(srb)
    hba.nexus_lost(4)
    await done.wait(3)
    assert all(s.srb_status == SrbStatus.ABORTED for s in held)
    assert other.srb_status == SrbStatus.PENDING
    hba.port.resume_device(0, 0, 0)
    await done.wait(4)
    again = await run(hba, command(TUR, nexus=4))  # a returning nexus is new: 29/00 again
    assert parse_sense(again.sense).code == (0x6, 0x29, 0x00)
    await hba.stop()


async def test_not_ready_before_start_and_after_stop() -> None:
    hba = Hba(DiskMiniport.from_luns([("ram", 1 << 20)], target_port_name="iqn.t,t,1"))
    before = await run(hba, command(TUR))
    assert parse_sense(before.sense).key == 0x2
    await hba.start()
    await hba.stop()
    after = await run(hba, command(TUR))
    assert parse_sense(after.sense).key == 0x2


async def test_stop_waits_a_bounded_time_then_aborts() -> None:
    hba = await ram_hba(latency_s=stalled_media)
    hba.stop_timeout = 0.05
    done = Completions()
    stuck = command(rw10(False, 0, 1), data_in=BS, done=done)
    hba.execute(stuck)
    t0 = time.monotonic()
    await hba.stop()
    assert time.monotonic() - t0 < 5
    assert stuck.srb_status == SrbStatus.ABORTED and done.calls[id(stuck)] == 1


async def test_completions_run_on_the_loop_thread_for_file_luns(tmp_path: Path) -> None:
    import threading

    hba = Hba(DiskMiniport.from_luns([("file", tmp_path / "x.img", 1 << 20)],
                                     target_port_name="iqn.t,t,1"))
    await hba.start()
    threads: set[int] = set()
    done = Completions()

    def record(srb: Srb) -> None:
        threads.add(threading.get_ident())
        done(srb)

    for i in range(32):
        srb = command(rw10(True, i, 1), data_out=bytes([i]) * BS, tag=i)
        srb.completion = record
        hba.execute(srb)
    await done.wait(32)
    assert threads == {threading.get_ident()}
    await hba.stop()



async def test_the_port_model_is_chosen_here_and_nothing_above_the_port_changes() -> None:
    from emuhba.port import ScsiPortDriver

    default = Hba(DiskMiniport.from_luns([("ram", 1 << 20)], target_port_name="iqn.t,t,1"))
    assert default.model == "storport" and type(default.port) is not ScsiPortDriver
    hba = Hba(DiskMiniport.from_luns([("ram", 1 << 20)], target_port_name="iqn.t,t,1"),
              model="scsiport")
    await hba.start()
    assert hba.model == "scsiport" and isinstance(hba.port, ScsiPortDriver)
    await run(hba, command(TUR))
    payload = bytes(range(256)) * 4
    write = await run(hba, command(rw10(True, 3, 2), data_out=payload))
    read = await run(hba, command(rw10(False, 3, 2), data_in=2 * BS))
    assert write.scsi_status == ScsiStatus.GOOD and data_of(read) == payload
    await hba.stop()


async def test_a_timed_out_request_answers_aborted_command_timeout_on_logical_unit() -> None:
    hba = Hba(DiskMiniport.from_luns([("ram", 1 << 20)], target_port_name="iqn.t,t,1",
                                     latency_s=stalled_media),
              request_timeout=0.05, recovery_timeout=0.5)
    await hba.start()
    await run(hba, command(TUR))
    t0 = time.monotonic()
    srb = await run(hba, command(rw10(False, 0, 1), data_in=BS))
    assert time.monotonic() - t0 < 5  # not the 30 s the medium would have taken
    # The abort (first step of recovery) caught it; the initiator hears that the command
    # timed out and may retry it, instead of never hearing anything.
    assert srb.scsi_status == ScsiStatus.CHECK_CONDITION
    assert parse_sense(srb.sense).code == (0xB, 0x3E, 0x02)
    assert hba.port.counters()["recovery_aborts"] == 1
    assert [r.step for r in hba.port.recovery_history] == ["abort_task"]
    await hba.stop()


async def test_descriptor_sense_from_the_device_passes_through_when_d_sense_is_set() -> None:
    hba = await ram_hba(luns=1)
    await run(hba, command(TUR))
    # MODE SENSE(6), control page, no block descriptors: then set D_SENSE with MODE SELECT(6).
    sensed = await run(hba, command(bytes((0x1A, 0x08, 0x0A, 0, 255, 0)), data_in=255))
    page = bytearray(data_of(sensed)[4:])
    assert page[0] & 0x3F == 0x0A
    page[0] &= 0x3F
    page[2] |= 0x04
    params = bytes(4) + bytes(page)
    selected = await run(hba, command(bytes((0x15, 0x10, 0, 0, len(params), 0)),
                                      data_out=params))
    assert selected.scsi_status == ScsiStatus.GOOD
    past_end = await run(hba, command(rw10(False, 1 << 20, 1), data_in=BS))
    assert past_end.scsi_status == ScsiStatus.CHECK_CONDITION
    assert past_end.sense[0] == 0x72  # descriptor format, as the device made it
    assert parse_sense(past_end.sense).code == (0x5, 0x21, 0x00)
    await hba.stop()


def sanitize_overwrite(pattern: bytes) -> tuple[bytes, bytes]:
    parameters = bytes((0x01, 0)) + len(pattern).to_bytes(2, "big") + pattern
    return bytes((0x48, 0x01, 0, 0, 0, 0, 0)) + len(parameters).to_bytes(2, "big") + b"\x00", \
        parameters


@pytest.mark.parametrize("how", ["abort", "lun reset"])
async def test_a_waiting_sanitize_ends_on_abort_or_reset_and_the_sanitize_goes_on(
        how: str) -> None:
    hba = await ram_hba(luns=1)
    miniport = hba._miniport
    assert isinstance(miniport, DiskMiniport)
    unit = next(iter(miniport.controller.units.values()))
    unit._overwrite_seconds = 1.5  # the modelled length of an overwrite pass
    for nexus in (1, 2, 3):  # each nexus takes its power-on unit attention first
        await run(hba, command(TUR, nexus=nexus))
    done = Completions()
    cdb, parameters = sanitize_overwrite(b"\xa5" * BS)
    srb = command(cdb, data_out=parameters, tag=9, done=done)
    hba.execute(srb)
    await asyncio.sleep(0.2)
    assert not done.srbs  # it waits for the overwrite
    started = time.monotonic()
    result: list[bool] = []
    if how == "abort":
        hba.abort_task(srb, result.append)
    else:
        hba.reset_lun(0, 0, 0, result.append)
    await done.wait(1)
    while not result:
        await asyncio.sleep(0.001)
    assert result == [True] and time.monotonic() - started < 1.0
    assert srb.scsi_status == ScsiStatus.TASK_ABORTED or srb.srb_status != SrbStatus.SUCCESS
    # The operation itself carries on: the unit still reports it, then finishes it.
    tur = await run(hba, command(TUR, nexus=2))
    assert tur.scsi_status == ScsiStatus.CHECK_CONDITION
    assert parse_sense(tur.sense).code == (0x2, 0x04, 0x1B)
    deadline = time.monotonic() + 5.0
    while True:
        tur = await run(hba, command(TUR, nexus=3))
        if tur.scsi_status == ScsiStatus.GOOD:
            break
        assert time.monotonic() < deadline, "the sanitize never ended"
        await asyncio.sleep(0.05)
    read = await run(hba, command(rw10(False, 7, 1), data_in=BS, nexus=3))
    assert data_of(read) == b"\xa5" * BS
    await hba.stop()


async def test_a_restricted_nexus_sees_its_luns_only_and_may_only_read() -> None:
    hba = await ram_hba(luns=2)
    hba.restrict_nexus(7, frozenset({1}), read_only=True)
    for nexus in (7, 8):
        await run(hba, command(TUR, lun=1, nexus=nexus))  # the power-on unit attention
    listed = await run(hba, command(report_luns(), data_in=64, nexus=7))
    assert data_of(listed)[:16] == report_luns_data([1])[:16]
    everyone = await run(hba, command(report_luns(), data_in=64, nexus=8))
    assert data_of(everyone)[:24] == report_luns_data([0, 1])[:24]
    hidden = await run(hba, command(rw10(False, 0, 1), lun=0, data_in=BS, nexus=7))
    assert parse_sense(hidden.sense).code == (0x5, 0x25, 0x00)
    inquiry_hidden = await run(hba, command(inquiry(), lun=0, data_in=96, nexus=7))
    assert data_of(inquiry_hidden)[0] == 0x7F  # peripheral qualifier 011b: no unit here
    refused = await run(hba, command(rw10(True, 0, 1), lun=1, data_out=bytes(BS), nexus=7))
    assert parse_sense(refused.sense).code == (0x7, 0x27, 0x00)
    read = await run(hba, command(rw10(False, 0, 1), lun=1, data_in=BS, nexus=7))
    assert read.scsi_status == ScsiStatus.GOOD
    sense6 = bytes((0x1A, 0, 0x3F, 0, 255, 0))
    assert data_of(await run(hba, command(sense6, lun=1, data_in=255, nexus=7)))[2] & 0x80
    assert not data_of(await run(hba, command(sense6, lun=1, data_in=255, nexus=8)))[2] & 0x80
    written = await run(hba, command(rw10(True, 0, 1), lun=1, data_out=bytes(BS), nexus=8))
    assert written.scsi_status == ScsiStatus.GOOD
    hba.nexus_lost(7)  # the view goes with the nexus
    await asyncio.sleep(0.01)
    again = await run(hba, command(report_luns(), data_in=64, nexus=7))
    assert again.scsi_status == ScsiStatus.GOOD
    assert data_of(again)[:24] == report_luns_data([0, 1])[:24]
    await hba.stop()
