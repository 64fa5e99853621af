"""The common controller model: latency model, injected faults and link state, driven through a
real Hba + port driver + disk miniport, armed through the miniport IOCTL path `emuhba ctl` uses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from emuhba.hba import Hba
from emuhba.miniport import MiniportIoctlError
from emuhba.scsi.sense import parse_sense
from emuhba.srb import ScsiStatus, Srb, SrbStatus
from miniports.disk import DiskMiniport, TargetLayout
from miniports.hwmodel import Faults, HeadPositions, LatencyModel
from miniports.store import RamStore
from tests.unit.test_hba import command, data_of, run, rw10

BS = 512


async def make_hba(**kwargs: object) -> Hba:
    stores = [RamStore(2048, BS), RamStore(2048, BS)]
    layout = TargetLayout(0, 0, "iqn.2026-11.test:faults,t,0x0001",
                          [(0, stores[0], False), (1, stores[1], False)])
    miniport = DiskMiniport.from_targets([layout], **kwargs)  # type: ignore[arg-type]
    hba = Hba(miniport, request_timeout=None)
    await hba.start()
    for lun in (0, 1):  # take the power-on unit attention of nexus 1
        srb = await run(hba, command(bytes(6), lun=lun))
        assert parse_sense(srb.sense).key == 0x06
    return hba


@pytest.fixture
async def hba() -> AsyncIterator[Hba]:
    adapter = await make_hba(link_down_timeout=0.5)
    yield adapter
    await adapter.stop()


def read(lba: int, blocks: int = 1, lun: int = 0) -> Srb:
    return command(rw10(False, lba, blocks), lun=lun, data_in=blocks * BS)


def write(lba: int, data: bytes, lun: int = 0) -> Srb:
    return command(rw10(True, lba, len(data) // BS), lun=lun, data_out=data)


async def test_medium_error_reports_first_bad_lba_in_fixed_and_descriptor_sense(hba: Hba) -> None:
    hba.miniport_ioctl("fault.medium-error", {"unit": [0, 0, 0], "first_lba": 100,
                                              "last_lba": 109})
    srb = await run(hba, read(96, 8))  # 96..103 overlaps 100..109: the first bad one is 100
    assert srb.scsi_status == ScsiStatus.CHECK_CONDITION
    sense = parse_sense(srb.sense)
    assert (sense.key, sense.asc, sense.ascq) == (0x03, 0x11, 0x00)
    assert sense.information == 100
    assert srb.data_transfer_length == 0
    # Outside the range, and on the other LUN, reads are fine; writes are not affected.
    assert (await run(hba, read(110, 8))).scsi_status == ScsiStatus.GOOD
    assert (await run(hba, read(100, 1, lun=1))).scsi_status == ScsiStatus.GOOD
    assert (await run(hba, write(100, b"\xab" * BS))).scsi_status == ScsiStatus.GOOD
    faults = hba.miniport_ioctl("fault.list", {})
    assert faults == [{"kind": "medium-error", "unit": "0:0:0", "first_lba": 100,
                       "last_lba": 109, "reads": True, "writes": False, "hits": 1}]
    # Descriptor format when the unit's control mode page says D_SENSE.
    sensed = await run(hba, command(bytes((0x1A, 0x08, 0x0A, 0, 255, 0)), data_in=255))
    page = bytearray(data_of(sensed))
    page[0] = 0  # MODE DATA LENGTH is reserved in MODE SELECT
    page[4 + 2] |= 0x04  # D_SENSE
    mode_select = bytes((0x15, 0x10, 0, 0, len(page), 0))
    srb = await run(hba, command(mode_select, data_out=bytes(page)))
    assert srb.scsi_status == ScsiStatus.GOOD, parse_sense(srb.sense)
    srb = await run(hba, read(105, 1))
    assert srb.sense[0] == 0x72
    assert parse_sense(srb.sense).information == 105


async def test_medium_error_on_writes_and_clear(hba: Hba) -> None:
    hba.miniport_ioctl("fault.medium-error", {"first_lba": 10, "last_lba": 10,
                                              "reads": False, "writes": True})
    srb = await run(hba, write(8, bytes(4 * BS), lun=1))
    sense = parse_sense(srb.sense)
    assert (sense.key, sense.asc, sense.ascq, sense.information) == (0x03, 0x0C, 0x00, 10)
    assert (await run(hba, read(10))).scsi_status == ScsiStatus.GOOD
    cleared = hba.miniport_ioctl("fault.clear", {})
    assert cleared["cleared"] == 1 and cleared["faults"] == []
    assert (await run(hba, write(8, bytes(4 * BS), lun=1))).scsi_status == ScsiStatus.GOOD


async def test_busy_fault_is_retried_by_the_port_and_never_reaches_the_initiator(
        hba: Hba) -> None:
    hba.miniport_ioctl("fault.busy", {"unit": [0, 0, 0], "count": 3})
    payload = bytes(range(256)) * 2
    assert (await run(hba, write(5, payload))).scsi_status == ScsiStatus.GOOD
    srb = await run(hba, read(5))
    assert srb.scsi_status == ScsiStatus.GOOD and data_of(srb) == payload
    assert hba.port.busy_retries == 3
    assert hba.miniport_ioctl("fault.list", {}) == []
    assert hba.miniport_ioctl("controller", {})["busy_faults_given"] == 3


async def test_added_latency_and_latency_model(hba: Hba) -> None:
    hba.miniport_ioctl("fault.latency", {"unit": [0, 0, 1], "seconds": 0.05})
    started = time.monotonic()
    await run(hba, read(0, lun=1))
    slow = time.monotonic() - started
    started = time.monotonic()
    await run(hba, read(0, lun=0))
    fast = time.monotonic() - started
    assert slow >= 0.05 and fast < 0.05
    hba.miniport_ioctl("fault.latency", {"unit": [0, 0, 1], "seconds": 0})
    assert hba.miniport_ioctl("fault.list", {}) == []
    model = hba.miniport_ioctl("latency.set", {"fixed_s": 0.03})
    assert model == {"fixed_s": 0.03, "per_kib_s": 0.0, "seek_s": 0.0}
    started = time.monotonic()
    await run(hba, read(0))
    assert time.monotonic() - started >= 0.03


def test_seek_and_transfer_components() -> None:
    model = LatencyModel(fixed_s=0.001, per_kib_s=0.0001, seek_s=0.01)
    heads = HeadPositions(model, lambda address: 1000)
    srb = Srb(cdb=rw10(False, 500, 8), data_transfer_length=8 * BS)
    srb.lba, srb.transfer_blocks = 500, 8
    # From LBA 0 to 500 of 1000: half a full stroke, plus 4 KiB of transfer.
    assert heads.delay(srb) == pytest.approx(0.001 + 0.0004 + 0.005)
    srb.lba = 508  # sequential: no seek
    assert heads.delay(srb) == pytest.approx(0.001 + 0.0004)
    with pytest.raises(ValueError):
        LatencyModel(seek_s=-1)
    with pytest.raises(ValueError):
        LatencyModel(fixed_s=float("nan"))


def test_fault_arming_validates() -> None:
    faults = Faults()
    with pytest.raises(ValueError):
        faults.arm_busy(None, 0)
    with pytest.raises(ValueError):
        faults.arm_medium_error(None, 10, 5)
    with pytest.raises(ValueError):
        faults.arm_medium_error(None, 1, 2, reads=False, writes=False)
    with pytest.raises(ValueError):
        faults.clear("nonsense")
    assert not faults.armed


async def test_ioctl_errors_name_the_problem(hba: Hba) -> None:
    with pytest.raises(MiniportIoctlError) as info:
        hba.miniport_ioctl("fault.busy", {"unit": [0, 0, 9], "count": 1})
    assert info.value.code == "no-unit" and "0:0:9" in info.value.message
    with pytest.raises(MiniportIoctlError) as info:
        hba.miniport_ioctl("fault.busy", {"count": 0})
    assert info.value.code == "bad-argument"
    with pytest.raises(MiniportIoctlError) as info:
        hba.miniport_ioctl("fault.medium-error", {"unit": [0, 0, 0], "first_lba": 5000})
    assert "past the unit's last LBA 2047" in info.value.message
    with pytest.raises(MiniportIoctlError) as info:
        hba.miniport_ioctl("raid.fail-member", {})
    assert info.value.code == "unsupported" and "fault.busy" in info.value.message


async def test_short_link_down_costs_latency_not_errors(hba: Hba) -> None:
    assert (await run(hba, write(0, b"\x5a" * BS))).scsi_status == ScsiStatus.GOOD
    hba.miniport_ioctl("link.down", {"seconds": 0.3})
    await asyncio.sleep(0.02)  # the interrupt routine sees the event and pauses the adapter
    assert hba.port.paused
    started = time.monotonic()
    srb = await run(hba, read(0))
    assert srb.scsi_status == ScsiStatus.GOOD and data_of(srb) == b"\x5a" * BS
    assert 0.2 <= time.monotonic() - started < 0.5
    state = hba.miniport_ioctl("controller", {})["link"]
    assert state["up"] and state["downs"] == 1 and state["rejected_while_down"] == 0


async def test_link_down_past_the_timeout_fails_retryably(hba: Hba) -> None:
    hba.miniport_ioctl("link.down", {})  # until brought up; the adapter timeout is 0.5 s
    await asyncio.sleep(0.02)
    srb = await run(hba, read(0))
    assert srb.srb_status == SrbStatus.ERROR and srb.scsi_status == ScsiStatus.CHECK_CONDITION
    sense = parse_sense(srb.sense)
    assert (sense.key, sense.asc, sense.ascq) == (0x02, 0x04, 0x01)  # becoming ready: retried
    hba.miniport_ioctl("link.up", {})
    await asyncio.sleep(0.02)
    assert (await run(hba, read(0))).scsi_status == ScsiStatus.GOOD
    assert hba.miniport_ioctl("controller", {})["link"]["rejected_while_down"] == 1


async def test_requests_racing_the_link_down_event_wait_instead_of_failing(hba: Hba) -> None:
    """Commands that reach the controller after the link went down but before the interrupt
    routine paused the adapter are handed back BUSY and held by the pause: no errors."""
    srbs = [read(lba) for lba in range(0, 64, 8)]
    done: list[Srb] = []
    hba.miniport_ioctl("link.down", {"seconds": 0.2})
    for srb in srbs:  # same loop turn: the interrupt routine has not run yet
        srb.completion = done.append
        hba.execute(srb)
    deadline = time.monotonic() + 5
    while len(done) < len(srbs):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert all(s.scsi_status == ScsiStatus.GOOD for s in srbs), [repr(s) for s in srbs]
    link = hba.miniport_ioctl("controller", {})["link"]
    assert link["rejected_while_down"] == 0 and link["up"]
