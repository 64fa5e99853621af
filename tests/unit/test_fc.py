"""The FC miniport under a real PortDriver and Hba: WWNs, fabric topology with hundreds of LUNs
per target (flat LUN addressing), link down, remote port outages, RSCN changes and the IOCTLs."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emuhba.hba import Hba
from emuhba.miniport import MiniportIoctlError
from emuhba.scsi.sense import parse_sense
from emuhba.srb import DataDirection, ScsiStatus, Srb
from miniports.fc import (
    LOST,
    MAX_LUN,
    OFFLINE,
    ONLINE,
    Fabric,
    FabricError,
    FcMiniport,
    RemotePortSpec,
    Wwn,
    expand_luns,
    hba_names,
    ram_luns,
)

BS = 512
LUN_SIZE = 64 * BS
IQN = "iqn.2024-01.org.emuhba.test"
ARRAY_A = "50:0a:09:81:00:00:00:01"
ARRAY_B = "50:0a:09:81:00:00:00:02"
ARRAY_C = "50:0a:09:81:00:00:00:03"

UA = (0x6, 0x29, 0x00)
LUNS_CHANGED = (0x6, 0x3F, 0x0E)
NEXUS_LOSS = (0x6, 0x29, 0x07)
BECOMING_READY = (0x2, 0x04, 0x01)
NO_UNIT = (0x5, 0x25, 0x00)


# ------------------------------------------------------------------------------ helpers


def srb_for(cdb: bytes, *, bus: int = 0, target_id: int = 0, lun: int = 0, data_in: int = 0,
            data_out: bytes | None = None, nexus: int = 1, tag: int = 0) -> Srb:
    if data_out is not None:
        return Srb(path_id=bus, target_id=target_id, lun=lun, cdb=cdb,
                   data_direction=DataDirection.OUT, data_transfer_length=len(data_out),
                   sg_list=[memoryview(bytearray(data_out))], queue_tag=tag, nexus=nexus)
    return Srb(path_id=bus, target_id=target_id, lun=lun, cdb=cdb,
               data_direction=DataDirection.IN if data_in else DataDirection.NONE,
               data_transfer_length=data_in,
               sg_list=[memoryview(bytearray(data_in))] if data_in else [], queue_tag=tag,
               nexus=nexus)


def submit(hba: Hba, srb: Srb) -> asyncio.Future[Srb]:
    done: asyncio.Future[Srb] = asyncio.get_running_loop().create_future()

    def finished(s: Srb) -> None:
        if not done.done():
            done.set_result(s)

    srb.completion = finished
    hba.execute(srb)
    return done


async def run(hba: Hba, cdb: bytes, timeout: float = 5.0, **kwargs: Any) -> Srb:
    return await asyncio.wait_for(submit(hba, srb_for(cdb, **kwargs)), timeout)


def code_of(srb: Srb) -> tuple[int, int, int]:
    assert srb.scsi_status == ScsiStatus.CHECK_CONDITION, repr(srb)
    return tuple(parse_sense(srb.sense).code)  # type: ignore[return-value]


async def good(hba: Hba, cdb: bytes, **kwargs: Any) -> Srb:
    """Run ``cdb``, getting past the power-on unit attention a new nexus sees first."""
    srb = await run(hba, cdb, **kwargs)
    if srb.scsi_status == ScsiStatus.CHECK_CONDITION and code_of(srb) == UA:
        srb = await run(hba, cdb, **kwargs)
    assert srb.scsi_status == ScsiStatus.GOOD, (repr(srb), srb.sense.hex())
    return srb


def data_of(srb: Srb) -> bytes:
    return bytes(srb.sg_list[0][:srb.data_transfer_length])


def rw10(write: bool, lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, lba, 0, blocks, 0)


def report_luns(alloc: int = 1 << 16) -> bytes:
    return bytes((0xA0, 0, 0, 0, 0, 0)) + alloc.to_bytes(4, "big") + b"\x00\x00"


def inquiry(page: int, alloc: int = 1024) -> bytes:
    return bytes((0x12, 1, page)) + alloc.to_bytes(2, "big") + b"\x00"


TUR = bytes(6)


def lun_list(data: bytes) -> list[bytes]:
    length = int.from_bytes(data[:4], "big")
    return [data[8 + i:16 + i] for i in range(0, length, 8)]


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def fc_hba(ports: list[RemotePortSpec], **kwargs: Any) -> tuple[Hba, FcMiniport]:
    mp = FcMiniport.from_fabric(ports, base_iqn=IQN, **kwargs)
    hba = Hba(mp, stop_timeout=2.0)
    await hba.start()
    return hba, mp


def pattern(tag: int) -> bytes:
    return bytes((tag + i) & 0xFF for i in range(BS))


# -------------------------------------------------------------------------- names, specs


def test_wwn_forms_parse_and_print() -> None:
    colon = Wwn.parse("20:00:00:25:B5:00:00:0F")
    assert colon.value == 0x20000025B500000F and colon.naa == 2
    assert str(colon) == "20:00:00:25:b5:00:00:0f" and colon.hex == "20000025b500000f"
    assert Wwn.parse("20000025b500000f") == colon == Wwn.parse("0x20000025B500000F")
    assert Wwn.parse(0x20000025B500000F) == colon and Wwn.parse(colon) is colon
    assert Wwn.parse(str(Wwn.parse(ARRAY_A))) == Wwn.parse(ARRAY_A)


@pytest.mark.parametrize(("text", "why"), [
    ("20:00:00:25:b5:00:00", "colon-separated"),          # seven octets
    ("20:00:00:25:b5:00:00:0g", "colon-separated"),       # not hex
    ("2000-0025-b500-000f", "colon-separated"),
    ("20000025b500000f0", "colon-separated"),             # 17 digits
    ("60:00:00:25:b5:00:00:0f", "NAA 6h"),                # 128-bit NAA in 64 bits
    ("00:00:00:00:00:00:00:00", "NAA 0h"),
    ("10:01:00:25:b5:00:00:0f", "must start 10:00"),      # NAA 1 with vendor bits
])
def test_wwn_validation(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Wwn.parse(text)


def test_wwn_range_and_type_errors() -> None:
    with pytest.raises(ValueError, match="64 bits"):
        Wwn.parse(1 << 64)
    with pytest.raises(TypeError):
        Wwn.parse(3.5)  # type: ignore[arg-type]


def test_default_names_are_stable_and_shaped_like_hba_and_array_names() -> None:
    wwnn, wwpn = hba_names("fc0")
    assert (wwnn, wwpn) == hba_names("fc0") and hba_names("fc1") != (wwnn, wwpn)
    assert str(wwnn).startswith("20:00:5a:eb:a0:") and str(wwpn).startswith("10:00:5a:eb:a0:")
    assert wwnn.value & 0xFFFFFF == wwpn.value & 0xFFFFFF
    array = Wwn.registered("array")
    assert array.naa == 5 and array == Wwn.registered("array") != Wwn.registered("other")


def test_lun_specs_expand_and_validate(tmp_path: Path) -> None:
    luns = expand_luns([("ram", LUN_SIZE), ram_luns(3, 2 * LUN_SIZE),
                        ("file", tmp_path / "a.img", LUN_SIZE)])
    assert [n for n, _ in luns] == [0, 1, 2, 3, 4]
    assert luns[2] == (2, ("ram", 2 * LUN_SIZE)) and luns[4][1][0] == "file"
    sparse = expand_luns({7: ("ram", LUN_SIZE), 300: ram_luns(2, LUN_SIZE)})
    assert [n for n, _ in sparse] == [7, 300, 301]
    with pytest.raises(ValueError, match="given twice"):
        expand_luns({0: ram_luns(2, LUN_SIZE), 1: ("ram", LUN_SIZE)})
    with pytest.raises(ValueError, match="past LUN 16383"):
        expand_luns({MAX_LUN: ram_luns(2, LUN_SIZE)})
    with pytest.raises(ValueError, match="count >= 1"):
        expand_luns([("ram", LUN_SIZE, 0)])
    with pytest.raises(ValueError, match="'ram' or 'file'"):
        expand_luns([("tape", LUN_SIZE)])
    with pytest.raises(ValueError, match="unknown remote port field"):
        RemotePortSpec.of({"wwpn": ARRAY_A, "lunz": []})
    spec = RemotePortSpec.of({"wwpn": ARRAY_A, "bus": 1, "count": 4, "size": LUN_SIZE})
    assert [n for n, _ in expand_luns(spec.luns)] == [0, 1, 2, 3] and spec.bus == 1
    # A trailing mapping carries store options; it is not a RAM LUN count.
    with_options = ("ram", LUN_SIZE, {"physical_block_size": 512})
    assert expand_luns([with_options]) == [(0, with_options)]
    with pytest.raises(ValueError, match="unknown store options"):
        expand_luns([("ram", LUN_SIZE, {"sector": 512})])


async def test_store_options_reach_the_unit() -> None:
    luns = [("ram", LUN_SIZE, {"physical_block_size": 512}), ("ram", LUN_SIZE)]
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, target_id=3, luns=luns)])
    try:
        units = mp.controller.units
        exponents = sorted((address[2], lu._lbppbe) for address, lu in units.items())
        assert exponents == [(0, 0), (1, 3)]  # 512-byte physical, then the 4 KiB default
    finally:
        await hba.stop()


@pytest.mark.parametrize(("spec", "kwargs", "error", "why"), [
    (RemotePortSpec(ARRAY_A, bus=8), {}, ValueError, "bus must be 0..7"),
    (RemotePortSpec(ARRAY_A, bus=2), {"buses": 2}, ValueError, "bus must be 0..1"),
    (RemotePortSpec(ARRAY_A, target_id=128), {}, ValueError, "target id must be 0..127"),
    (RemotePortSpec("zz"), {}, ValueError, "16 hex digits"),
    (RemotePortSpec(ARRAY_A), {"wwpn": ARRAY_A}, FabricError, "HBA's own"),
])
def test_bad_fabrics_are_refused(spec: RemotePortSpec, kwargs: dict[str, Any],
                                 error: type[Exception], why: str) -> None:
    with pytest.raises(error, match=why):
        FcMiniport.from_fabric([spec], **kwargs)


def test_duplicate_wwpn_or_address_is_refused() -> None:
    with pytest.raises(FabricError, match="already on the fabric"):
        FcMiniport.from_fabric([RemotePortSpec(ARRAY_A, target_id=0),
                                RemotePortSpec(ARRAY_A, target_id=1)])
    with pytest.raises(FabricError, match="bus 0 target id 3 is already"):
        FcMiniport.from_fabric([RemotePortSpec(ARRAY_A, target_id=3),
                                RemotePortSpec(ARRAY_B, target_id=3)])
    with pytest.raises(ValueError, match=r"1\.\.8 buses"):
        Fabric(buses=9)


# -------------------------------------------------------------------- topology, big targets


async def test_300_luns_on_one_target_with_flat_addressing() -> None:
    hba, _ = await fc_hba([RemotePortSpec(ARRAY_A, bus=0, target_id=5,
                                          luns=[ram_luns(300, LUN_SIZE)])])
    assert hba.port.config.maximum_number_of_logical_units == MAX_LUN + 1
    assert hba.port.config.maximum_number_of_targets == 128
    assert hba.targets() == [(0, 5)] and hba.luns(0, 5) == list(range(300))

    listing = lun_list(data_of(await good(hba, report_luns(), target_id=5, data_in=1 << 16)))
    assert len(listing) == 300
    assert listing[0] == bytes(8) and listing[255] == bytes((0x00, 0xFF)) + bytes(6)
    # LUN 256 and up: address method 01b (flat space), LUN in the low 14 bits.
    assert listing[256] == bytes((0x41, 0x00)) + bytes(6)
    assert listing[299] == bytes((0x41, 0x2B)) + bytes(6)

    for lun in (0, 255, 256, 299):
        await good(hba, rw10(True, 3), target_id=5, lun=lun, data_out=pattern(lun))
    for lun in (0, 255, 256, 299):
        srb = await good(hba, rw10(False, 3), target_id=5, lun=lun, data_in=BS)
        assert data_of(srb) == pattern(lun)
    past = await run(hba, rw10(False, 0), target_id=5, lun=300, data_in=BS)
    assert code_of(past) == NO_UNIT
    await hba.stop()


async def test_buses_targets_and_their_iscsi_names() -> None:
    hba, mp = await fc_hba([
        RemotePortSpec(ARRAY_A, bus=0, target_id=3, luns=[ram_luns(2, LUN_SIZE)]),
        RemotePortSpec(ARRAY_B, bus=1, target_id=0, luns=[("ram", LUN_SIZE)],
                       iscsi_name="iqn.2024-01.org.example:array-b"),
        RemotePortSpec(ARRAY_C, bus=2, target_id=127,
                       luns={9: ("ram", LUN_SIZE), MAX_LUN: ("ram", LUN_SIZE)}),
    ])
    assert hba.port.config.number_of_buses == 3
    assert hba.targets() == [(0, 3), (1, 0), (2, 127)]
    assert hba.luns(0, 3) == [0, 1] and hba.luns(2, 127) == [9, MAX_LUN]
    assert mp.targets() == [(f"{IQN}:fc.500a098100000001", 0, 3),
                            ("iqn.2024-01.org.example:array-b", 1, 0),
                            (f"{IQN}:fc.500a098100000003", 2, 127)]
    # VPD 83h names the remote port's iSCSI node as the target port.
    vpd = data_of(await good(hba, inquiry(0x83), bus=0, target_id=3, lun=1, data_in=1024))
    assert f"{IQN}:fc.500a098100000001,t,0x0001".encode() + b"\x00" in vpd
    vpd_b = data_of(await good(hba, inquiry(0x83), bus=1, target_id=0, data_in=1024))
    assert b"iqn.2024-01.org.example:array-b,t,0x0001\x00" in vpd_b
    # Unit serials follow the remote port and LUN, not the host-side address.
    serial_0 = data_of(await good(hba, inquiry(0x80), bus=0, target_id=3, lun=0, data_in=64))
    serial_1 = data_of(await good(hba, inquiry(0x80), bus=0, target_id=3, lun=1, data_in=64))
    assert serial_0[4:] != serial_1[4:] and len(serial_0) == 4 + 16
    # LUNs 9 and 16383 without a LUN 0: the target still answers REPORT LUNS at LUN 0.
    listing = lun_list(data_of(await run(hba, report_luns(), bus=2, target_id=127,
                                         data_in=4096)))
    assert listing == [bytes((0, 9)) + bytes(6), bytes((0x7F, 0xFF)) + bytes(6)]
    await good(hba, rw10(True, 1), bus=2, target_id=127, lun=MAX_LUN, data_out=pattern(5))
    assert data_of(await good(hba, rw10(False, 1), bus=2, target_id=127, lun=MAX_LUN,
                              data_in=BS)) == pattern(5)
    await hba.stop()


def test_vpd_target_port_name_defaults_to_the_wwpn_without_a_base_iqn() -> None:
    mp = FcMiniport.from_fabric([RemotePortSpec(ARRAY_A, luns=[("ram", LUN_SIZE)])])
    rp = mp.fabric.lookup(ARRAY_A)
    assert rp.target_port_name == "naa.500A098100000001,t,0x0001"
    assert rp.wwnn.naa == 5 and rp.wwnn != rp.wwpn
    with pytest.raises(ValueError, match="no base IQN"):
        mp.targets()
    assert mp.targets("iqn.x") == [("iqn.x:fc.500a098100000001", 0, 0)]
    mp.fabric.close()


# ---------------------------------------------------------------------------- link down


async def test_short_link_down_holds_io_and_completes_it_good() -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, luns=[ram_luns(2, LUN_SIZE)])],
                           link_down_timeout=5.0)
    await good(hba, TUR)
    mp.fc.link_down(None)
    await eventually(lambda: hba.port.paused)
    write = submit(hba, srb_for(rw10(True, 1), data_out=pattern(7)))
    await asyncio.sleep(0.05)
    assert not write.done()  # held in the port, not failed
    mp.fc.link_restore()
    srb = await asyncio.wait_for(write, 2.0)
    assert srb.scsi_status == ScsiStatus.GOOD and mp.fc.link_up and not hba.port.paused
    assert data_of(await good(hba, rw10(False, 1), data_in=BS)) == pattern(7)
    assert mp.fc.link_down_rejections == 0 and hba.port.pauses >= 1
    await hba.stop()


async def test_link_down_past_its_timeout_answers_becoming_ready() -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, luns=[("ram", LUN_SIZE)])],
                           link_down_timeout=0.2)
    await good(hba, TUR)
    t0 = time.monotonic()
    mp.fc.link_down(None)  # until restored
    await eventually(lambda: hba.port.paused)
    srb = await run(hba, rw10(False, 0), data_in=BS)
    assert time.monotonic() - t0 >= 0.2  # held for the link-down timeout first
    assert code_of(srb) == BECOMING_READY and mp.fc.link_down_rejections >= 1
    described = hba.miniport_ioctl("fabric")
    assert described["link"] == "down"
    mp.fc.link_restore()
    await good(hba, rw10(False, 0), data_in=BS)
    await hba.stop()


# -------------------------------------------------------------------------------- RSCN


async def test_added_lun_raises_luns_changed_on_siblings_and_appears() -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, target_id=2,
                                           luns=[ram_luns(2, LUN_SIZE)])])
    await good(hba, TUR, target_id=2, lun=1, nexus=1)  # nexus 1 has seen LUN 1
    mp.add_lun(ARRAY_A, 300, ("ram", LUN_SIZE))
    await eventually(lambda: hba.luns(0, 2) == [0, 1, 300])
    changed = await run(hba, TUR, target_id=2, lun=1, nexus=1)
    assert code_of(changed) == LUNS_CHANGED
    assert (await run(hba, TUR, target_id=2, lun=1, nexus=1)).scsi_status == ScsiStatus.GOOD
    # A nexus LUN 1 never saw gets the power-on condition, not 3F/0E.
    assert code_of(await run(hba, TUR, target_id=2, lun=1, nexus=2)) == UA
    listing = lun_list(data_of(await good(hba, report_luns(), target_id=2, data_in=4096)))
    assert listing[-1] == bytes((0x41, 0x2C)) + bytes(6) and len(listing) == 3
    await good(hba, rw10(True, 0), target_id=2, lun=300, data_out=pattern(3))
    assert data_of(await good(hba, rw10(False, 0), target_id=2, lun=300,
                              data_in=BS)) == pattern(3)
    assert mp.fc.rscns == 1
    # The disk miniport's hot-plug entry points go through the fabric too.
    assert mp.detach_unit((0, 2, 300)) is not None and mp.detach_unit((0, 2, 300)) is None
    assert mp.fabric.lookup(ARRAY_A).luns() == [0, 1] and (0, 2, 300) not in mp.fc.units
    with pytest.raises(FabricError, match="no remote port at bus 0 target id 9"):
        mp.attach_unit((0, 9, 0), mp.fc.units[(0, 2, 0)])
    await hba.stop()


async def test_removed_lun_finishes_running_io_then_is_absent() -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, luns=[ram_luns(3, LUN_SIZE)])],
                           latency_s=0.1)
    await good(hba, TUR, lun=0)
    await good(hba, TUR, lun=2)
    store = mp.fc.units[(0, 0, 2)].store
    # What the removed unit's medium holds at the moment its store is released.
    at_close: list[bytes] = []
    release = store.close

    def close() -> None:
        buffer = bytearray(BS)
        store.read_into(5 * BS, BS, [memoryview(buffer)])
        at_close.append(bytes(buffer))
        release()

    store.close = close  # type: ignore[method-assign]
    in_flight = submit(hba, srb_for(rw10(True, 5), lun=2, data_out=pattern(9)))
    await eventually(lambda: mp.fc.in_use == 1)
    mp.remove_lun(ARRAY_A, 2)
    assert not at_close  # a command still waits to run on it
    srb = await asyncio.wait_for(in_flight, 2.0)
    assert srb.scsi_status == ScsiStatus.GOOD  # it was already at the target
    assert code_of(await run(hba, rw10(False, 5), lun=2, data_in=BS)) == NO_UNIT
    assert code_of(await run(hba, TUR, lun=0)) == LUNS_CHANGED
    await eventually(lambda: hba.luns(0, 0) == [0, 1])
    listing = lun_list(data_of(await good(hba, report_luns(), data_in=4096)))
    assert listing == [bytes(8), bytes((0, 1)) + bytes(6)]
    # Once nothing uses it, the removed unit's store is released, with the write in it.
    await eventually(lambda: bool(at_close))
    assert at_close == [pattern(9)]
    await hba.stop()


async def test_removing_lun_0_keeps_the_target_and_its_scan_cheap() -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, luns=[ram_luns(3, LUN_SIZE)])])
    await good(hba, TUR, lun=1)
    before = mp.fc.commands
    mp.remove_lun(ARRAY_A, 0)
    await eventually(lambda: hba.luns(0, 0) == [1, 2])
    # No LUN-by-LUN INQUIRY probing up to LUN 16383: REPORT LUNS still works at LUN 0.
    assert mp.fc.commands - before < 400
    listing = lun_list(data_of(await run(hba, report_luns(), lun=0, data_in=4096)))
    assert listing == [bytes((0, 1)) + bytes(6), bytes((0, 2)) + bytes(6)]
    assert code_of(await run(hba, TUR, lun=1)) == LUNS_CHANGED
    assert code_of(await run(hba, rw10(False, 0), lun=0, data_in=BS)) == NO_UNIT
    await hba.stop()


async def test_remote_port_added_and_removed_live() -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, luns=[("ram", LUN_SIZE)])], buses=2)
    rp = mp.add_port(RemotePortSpec(ARRAY_B, bus=1, target_id=7, luns=[ram_luns(3, LUN_SIZE)]))
    assert rp.iscsi_name == f"{IQN}:fc.500a098100000002"
    await eventually(lambda: hba.targets() == [(0, 0), (1, 7)])
    assert hba.luns(1, 7) == [0, 1, 2]
    assert (f"{IQN}:fc.500a098100000002", 1, 7) in mp.targets()
    await good(hba, rw10(True, 2), bus=1, target_id=7, lun=2, data_out=pattern(1))
    assert data_of(await good(hba, rw10(False, 2), bus=1, target_id=7, lun=2,
                              data_in=BS)) == pattern(1)
    store = mp.fc.units[(1, 7, 2)].store
    mp.remove_port(ARRAY_B)
    await eventually(lambda: hba.targets() == [(0, 0)])
    assert code_of(await run(hba, TUR, bus=1, target_id=7, lun=2)) == NO_UNIT
    assert [p["wwpn"] for p in hba.miniport_ioctl("fabric")["remote_ports"]] == [ARRAY_A]
    await eventually(lambda: getattr(store, "_map", 1) is None)
    await hba.stop()


# ---------------------------------------------------------------------- port outages


async def test_port_offline_briefly_pauses_only_its_devices() -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, target_id=0, luns=[ram_luns(2, LUN_SIZE)]),
                            RemotePortSpec(ARRAY_B, target_id=1, luns=[("ram", LUN_SIZE)])],
                           latency_s=0.05, device_loss_timeout=5.0)
    await good(hba, TUR, target_id=0, lun=1)
    await good(hba, TUR, target_id=1)
    in_flight = submit(hba, srb_for(rw10(True, 4), lun=1, data_out=pattern(4)))
    await eventually(lambda: mp.fc.in_use == 1)
    mp.port_offline(ARRAY_A, None)
    await eventually(lambda: all(
        (lq := hba.port.lun_queue(0, 0, lun)) is not None and lq.paused for lun in (0, 1)))
    assert mp.fabric.lookup(ARRAY_A).state == OFFLINE
    later = submit(hba, srb_for(rw10(False, 4), lun=1, data_in=BS, tag=2))
    # The other remote port is untouched.
    other = await run(hba, rw10(False, 0), target_id=1, data_in=BS)
    assert other.scsi_status == ScsiStatus.GOOD and not in_flight.done() and not later.done()
    mp.port_online(ARRAY_A)
    written = await asyncio.wait_for(in_flight, 2.0)
    read = await asyncio.wait_for(later, 2.0)
    assert written.scsi_status == ScsiStatus.GOOD and written.retries >= 1  # bounced BUSY
    assert read.scsi_status == ScsiStatus.GOOD and data_of(read) == pattern(4)
    assert mp.fabric.lookup(ARRAY_A).state == ONLINE and hba.targets() == [(0, 0), (0, 1)]
    await hba.stop()


async def test_port_offline_past_device_loss_drops_then_returns_the_target() -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, target_id=4, luns=[ram_luns(2, LUN_SIZE)])],
                           device_loss_timeout=0.1)
    await good(hba, TUR, target_id=4, lun=1)
    t0 = time.monotonic()
    mp.port_offline(ARRAY_A, None)
    srb = await run(hba, rw10(False, 0), target_id=4, lun=1, data_in=BS)
    assert time.monotonic() - t0 >= 0.1  # held by the device pause first
    assert code_of(srb) == NO_UNIT and mp.fabric.lookup(ARRAY_A).state == LOST
    await eventually(lambda: hba.targets() == [])
    # Back on the fabric: rescanned in, and a nexus the target knew learns of the new login.
    mp.port_online(ARRAY_A)
    await eventually(lambda: hba.targets() == [(0, 4)])
    assert code_of(await run(hba, TUR, target_id=4, lun=1)) == NEXUS_LOSS
    assert (await run(hba, TUR, target_id=4, lun=1)).scsi_status == ScsiStatus.GOOD
    await hba.stop()


async def test_port_offline_for_a_time_comes_back_by_itself() -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, luns=[("ram", LUN_SIZE)])],
                           device_loss_timeout=5.0)
    await good(hba, TUR)
    mp.port_offline(ARRAY_A, 0.05)
    held = submit(hba, srb_for(rw10(False, 0), data_in=BS))
    srb = await asyncio.wait_for(held, 2.0)
    assert srb.scsi_status == ScsiStatus.GOOD
    assert mp.fabric.lookup(ARRAY_A).state == ONLINE and hba.port.device_pauses == 1
    await hba.stop()


# ------------------------------------------------------------------------------ ioctls


async def test_fabric_ioctls(tmp_path: Path) -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, luns=[ram_luns(2, LUN_SIZE)])],
                           wwpn="10:00:00:00:c9:00:00:01", device_loss_timeout=5.0)
    fabric = hba.miniport_ioctl("fabric")
    assert mp.fc.wwpn == Wwn.parse("10000000c9000001")
    assert fabric["wwpn"] == "10:00:00:00:c9:00:00:01" and fabric["link"] == "up"
    assert fabric["wwnn"] == str(hba_names("fc0")[0])
    [port] = fabric["remote_ports"]
    assert port["wwpn"] == ARRAY_A and port["luns"] == [0, 1] and port["state"] == ONLINE
    assert (port["bus"], port["target_id"]) == (0, 0)
    assert hba.miniport_ioctl("controller")["fabric"] == fabric

    added = hba.miniport_ioctl("fc.add-port", {"wwpn": ARRAY_B, "target_id": 9,
                                               "count": 3, "size": LUN_SIZE})
    assert added["luns"] == [0, 1, 2] and added["target_id"] == 9
    lun = hba.miniport_ioctl("fc.add-lun", {"target": [0, 9], "size": LUN_SIZE})
    assert lun["lun"] == 3 and lun["blocks"] == LUN_SIZE // BS
    path = tmp_path / "lun7.img"
    lun = hba.miniport_ioctl("fc.add-lun", {"wwpn": ARRAY_B, "lun": 7, "path": str(path),
                                            "size": LUN_SIZE})
    assert lun["remote_port"]["luns"] == [0, 1, 2, 3, 7] and path.stat().st_size == LUN_SIZE
    removed = hba.miniport_ioctl("fc.remove-lun", {"target": "0:9", "lun": 1})
    assert removed["luns"] == [0, 2, 3, 7]
    await eventually(lambda: hba.luns(0, 9) == [0, 2, 3, 7])
    await good(hba, rw10(True, 0), target_id=9, lun=7, data_out=pattern(7))

    offline = hba.miniport_ioctl("fc.port-offline", {"wwpn": ARRAY_B, "seconds": 30})
    assert offline["state"] == OFFLINE and offline["offlines"] == 1
    online = hba.miniport_ioctl("fc.port-online", {"wwpn": ARRAY_B})
    assert online["state"] == ONLINE
    gone = hba.miniport_ioctl("fc.remove-port", {"wwpn": ARRAY_B})
    assert gone["wwpn"] == ARRAY_B
    await eventually(lambda: hba.targets() == [(0, 0)])
    assert hba.miniport_ioctl("fabric")["rscns"] == 5  # port, 2 LUNs in, 1 out, port out
    await hba.stop()
    with open(path, "rb") as f:  # the file LUN's data reached its file before it was closed
        assert f.read(BS) == pattern(7)


async def test_fabric_ioctl_errors() -> None:
    hba, mp = await fc_hba([RemotePortSpec(ARRAY_A, luns=[ram_luns(2, LUN_SIZE)])])

    def refused(code: str, args: dict[str, Any]) -> MiniportIoctlError:
        with pytest.raises(MiniportIoctlError) as info:
            hba.miniport_ioctl(code, args)
        return info.value

    error = refused("fc.remove-lun", {"wwpn": ARRAY_C, "lun": 0})
    assert error.code == "no-port" and "50:0a:09:81:00:00:00:03" in error.message
    error = refused("fc.remove-lun", {"wwpn": ARRAY_A, "lun": 5})
    assert error.code == "no-unit" and "0-1" in error.message
    assert refused("fc.add-lun", {"wwpn": ARRAY_A, "lun": 1, "size": LUN_SIZE}).code == "exists"
    assert refused("fc.add-lun", {"wwpn": ARRAY_A, "lun": 16384,
                                  "size": LUN_SIZE}).code == "bad-argument"
    assert refused("fc.add-lun", {"wwpn": ARRAY_A, "kind": "tape"}).code == "bad-argument"
    assert refused("fc.add-lun", {"size": LUN_SIZE}).code == "bad-argument"
    assert refused("fc.add-port", {"wwpn": "not-a-wwn"}).code == "bad-argument"
    assert refused("fc.add-port", {"wwpn": ARRAY_B, "target_id": 0}).code == "exists"
    assert refused("fc.add-port", {"wwpn": ARRAY_B, "bus": 1}).code == "bad-argument"
    assert refused("fc.port-offline", {"target": [0, 3], "seconds": 1}).code == "no-port"
    assert refused("fc.port-offline", {"wwpn": ARRAY_A, "seconds": 0}).code == "bad-argument"
    hba.miniport_ioctl("fc.port-offline", {"wwpn": ARRAY_A})
    error = refused("fc.add-lun", {"wwpn": ARRAY_A, "size": LUN_SIZE})
    assert error.code == "port-offline" and "offline" in error.message
    hba.miniport_ioctl("fc.port-online", {"wwpn": ARRAY_A})
    assert refused("fc.nonsense", {}).code == "unsupported"
    # Nothing above changed the fabric.
    assert hba.miniport_ioctl("fabric")["remote_ports"][0]["luns"] == [0, 1]
    assert mp.fc.rscns == 0
    await hba.stop()
