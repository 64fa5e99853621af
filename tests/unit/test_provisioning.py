"""The block command set of miniports.lu_provisioning on a real LogicalUnit over real stores:
thin provisioning (UNMAP, WRITE SAME, GET LBA STATUS), COMPARE AND WRITE, ORWRITE, PRE-FETCH,
WRITE ATOMIC, READ DEFECT DATA, SANITIZE. Sense is checked byte for byte."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emuhba.scsi import sense as S
from emuhba.scsi.sense import SenseCode, build_sense
from emuhba.srb import DataDirection, ScsiStatus, Srb
from miniports.lu import LogicalUnit
from miniports.lu_provisioning import SANITIZE_IN_PROGRESS
from miniports.store import BlockStore, FileStore, RamStore

BS = 512
BLOCKS = 4096
NEXUS = 7


def make_lu(store: BlockStore, **kwargs: object) -> LogicalUnit:
    lu = LogicalUnit(store, lun=0, target_luns=lambda: [0], serial="PROV-0001", **kwargs)  # type: ignore[arg-type]
    execute(lu, bytes(6))  # consume the power-on unit attention
    lu._overwrite_seconds = 0.0  # no modelled overwrite time unless a test asks for it
    return lu


def execute(
    lu: LogicalUnit, cdb: bytes, *, data_out: bytes | None = None, data_in: int = 0
) -> tuple[Srb, bytes]:
    cdb = cdb + bytes(16 - len(cdb))
    buf = bytearray(data_out if data_out is not None else data_in)
    if data_out is not None:
        direction = DataDirection.OUT
    else:
        direction = DataDirection.IN if data_in else DataDirection.NONE
    srb = Srb(
        cdb=cdb,
        data_direction=direction,
        data_transfer_length=len(buf),
        sg_list=[memoryview(buf)] if buf else [],
        nexus=NEXUS,
    )
    lu.execute(srb)
    moved = srb.data_transfer_length if data_out is None else 0
    return srb, bytes(buf[:moved])


def good(srb: Srb) -> None:
    assert srb.scsi_status is ScsiStatus.GOOD, srb.sense.hex()


def check(
    srb: Srb,
    code: SenseCode,
    *,
    field_pointer: int | None = None,
    bit_pointer: int | None = None,
    cd: bool = True,
    information: int | None = None,
) -> None:
    assert srb.scsi_status is ScsiStatus.CHECK_CONDITION
    assert srb.sense == build_sense(
        code,
        information=information,
        field_pointer=field_pointer,
        cd=cd and field_pointer is not None,
        bit_pointer=bit_pointer,
    )


def write16(lu: LogicalUnit, lba: int, data: bytes) -> None:
    cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // BS, 0, 0)
    good(execute(lu, cdb, data_out=data)[0])


def read16(lu: LogicalUnit, lba: int, blocks: int) -> bytes:
    srb, data = execute(lu, struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0), data_in=blocks * BS)
    good(srb)
    return data


def unmap(lu: LogicalUnit, extents: list[tuple[int, int]], anchor: bool = False) -> Srb:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in extents)
    params = struct.pack(">HH4x", len(body) + 6, len(body)) + body
    cdb = struct.pack(">BB5xHB", 0x42, 0x01 if anchor else 0, len(params), 0)
    return execute(lu, cdb, data_out=params)[0]


def lba_status(lu: LogicalUnit, lba: int, allocation: int = 24) -> list[tuple[int, int, int]]:
    cdb = struct.pack(">BBQIBB", 0x9E, 0x12, lba, allocation, 0, 0)
    srb, data = execute(lu, cdb, data_in=allocation)
    good(srb)
    n = (struct.unpack_from(">I", data)[0] - 4) // 16
    return [
        struct.unpack_from(">QIB", data, 8 + 16 * i)
        for i in range(n)
        if 8 + 16 * i + 16 <= len(data)
    ]


@pytest.fixture(params=["ram", "file"])
def lu(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogicalUnit]:
    store: BlockStore
    if request.param == "ram":
        store = RamStore(BLOCKS, BS)
    else:
        store = FileStore(tmp_path / "thin.img", BLOCKS * BS)
    unit = make_lu(store)
    yield unit
    store.close()


# Reported provisioning ---------------------------------------------------------------------


def test_read_capacity_16_reports_lbpme_and_lbprz(lu: LogicalUnit) -> None:
    srb, data = execute(lu, bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32), data_in=32)
    good(srb)
    assert data[14] & 0xC0 == 0xC0


def test_vpd_pages_b0_and_b2(lu: LogicalUnit) -> None:
    srb, b2 = execute(lu, bytes((0x12, 0x01, 0xB2, 0, 64, 0)), data_in=64)
    good(srb)
    assert b2[:8] == bytes((0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0))  # LBPU LBPWS LBPWS10 LBPRZ, thin
    srb, b0 = execute(lu, bytes((0x12, 0x01, 0xB0, 0, 64, 0)), data_in=64)
    good(srb)
    assert not b0[4] & 0x01  # WSNZ=0: zero blocks means through the last LBA
    assert b0[5] == 255  # maximum compare and write length
    max_transfer = struct.unpack_from(">I", b0, 8)[0]
    assert struct.unpack_from(">I", b0, 24)[0] == 1024  # unmap descriptors
    assert struct.unpack_from(">I", b0, 20)[0] >= lu._page_blocks
    assert struct.unpack_from(">Q", b0, 36)[0] == max_transfer  # maximum write same length
    assert struct.unpack_from(">III", b0, 44) == (max_transfer, 1, 1)  # atomic limits


# UNMAP and GET LBA STATUS ------------------------------------------------------------------


def test_unmap_reads_zeros_and_reports_deallocated(lu: LogicalUnit) -> None:
    write16(lu, 0, b"A" * (64 * BS))
    assert lba_status(lu, 0)[0] == (0, 64, 0)
    good(unmap(lu, [(8, 16), (40, 1)]))
    data = read16(lu, 0, 64)
    assert data[: 8 * BS] == b"A" * (8 * BS)
    assert data[8 * BS : 24 * BS] == bytes(16 * BS)
    assert data[40 * BS : 41 * BS] == bytes(BS)
    assert data[41 * BS :] == b"A" * (23 * BS)
    assert lba_status(lu, 8)[0] == (8, 16, 1)
    assert lba_status(lu, 24)[0][2] == 0


def test_get_lba_status_descriptors_chain_to_the_end(lu: LogicalUnit) -> None:
    write16(lu, 64, b"B" * (8 * BS))
    descriptors = lba_status(lu, 0, 8 + 16 * 8)
    assert descriptors[0] == (0, 64, 1)
    assert descriptors[1] == (64, 8, 0)
    assert descriptors[2][:1] == (72,) and descriptors[2][2] == 1
    assert sum(d[1] for d in descriptors) == BLOCKS


def test_get_lba_status_out_of_range(lu: LogicalUnit) -> None:
    srb, _ = execute(lu, struct.pack(">BBQIBB", 0x9E, 0x12, BLOCKS, 24, 0, 0), data_in=24)
    check(srb, S.LBA_OUT_OF_RANGE)


def test_unmap_errors(lu: LogicalUnit) -> None:
    check(unmap(lu, [(0, 1)], anchor=True), S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=0)
    check(unmap(lu, [(BLOCKS - 1, 2)]), S.LBA_OUT_OF_RANGE)
    good(unmap(lu, [(BLOCKS, 0)]))  # zero blocks at the end of the medium
    good(unmap(lu, []))
    check(
        unmap(lu, [(0, 1)] * 1025),
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=2,
        cd=False,
    )
    srb, _ = execute(lu, struct.pack(">BB5xHB", 0x42, 0, 4, 0), data_out=bytes(4))
    check(srb, S.PARAMETER_LIST_LENGTH_ERROR)


def test_unmap_on_a_read_only_unit(tmp_path: Path) -> None:
    FileStore(tmp_path / "ro.img", BLOCKS * BS).close()
    store = FileStore(tmp_path / "ro.img", read_only=True)
    unit = make_lu(store)
    check(unmap(unit, [(0, 1)]), S.WRITE_PROTECTED)
    store.close()


# WRITE SAME --------------------------------------------------------------------------------


def write_same(
    lu: LogicalUnit,
    lba: int,
    blocks: int,
    block: bytes | None,
    flags: int = 0,
    sixteen: bool = True,
) -> Srb:
    if sixteen:
        cdb = struct.pack(">BBQIBB", 0x93, flags, lba, blocks, 0, 0)
    else:
        cdb = struct.pack(">BBIBHB", 0x41, flags, lba, 0, blocks, 0)
    return execute(lu, cdb, data_out=block)[0]


@pytest.mark.parametrize("sixteen", [False, True])
def test_write_same_replicates_the_block(lu: LogicalUnit, sixteen: bool) -> None:
    block = bytes(range(256)) * 2
    good(write_same(lu, 10, 300, block, sixteen=sixteen))
    assert read16(lu, 10, 300) == block * 300
    assert read16(lu, 310, 1) == bytes(BS)


def test_write_same_unmap_deallocates_whatever_the_data(lu: LogicalUnit) -> None:
    write16(lu, 0, b"C" * (32 * BS))
    good(write_same(lu, 0, 32, b"\xff" * BS, flags=0x08))
    assert read16(lu, 0, 32) == bytes(32 * BS)
    assert lba_status(lu, 0)[0][2] == 1


def test_write_same_zero_blocks_runs_to_the_end_within_the_limit(tmp_path: Path) -> None:
    store = RamStore(BLOCKS, BS)
    unit = make_lu(store, max_transfer_blocks=64)
    block = b"K" * BS
    check(write_same(unit, 0, 0, block), S.INVALID_FIELD_IN_CDB, field_pointer=10)
    check(write_same(unit, BLOCKS - 65, 0, block), S.INVALID_FIELD_IN_CDB, field_pointer=10)
    good(write_same(unit, BLOCKS - 64, 0, block))
    assert read16(unit, BLOCKS - 65, 1) == bytes(BS)
    assert read16(unit, BLOCKS - 64, 64) == block * 64
    check(write_same(unit, 0, 65, block), S.INVALID_FIELD_IN_CDB, field_pointer=10)
    check(write_same(unit, BLOCKS, 0, block), S.LBA_OUT_OF_RANGE)
    store.close()


def test_write_same_ndob_writes_zeros(lu: LogicalUnit) -> None:
    write16(lu, 0, b"D" * (8 * BS))
    good(write_same(lu, 0, 8, None, flags=0x01))
    assert read16(lu, 0, 8) == bytes(8 * BS)


def test_write_same_errors(lu: LogicalUnit) -> None:
    block = bytes(BS)
    check(
        write_same(lu, 0, 1, block, flags=0x20),
        S.INVALID_FIELD_IN_CDB,
        field_pointer=1,
        bit_pointer=7,
    )
    check(
        write_same(lu, 0, 1, block, flags=0x18),
        S.INVALID_FIELD_IN_CDB,
        field_pointer=1,
        bit_pointer=4,
    )
    check(write_same(lu, BLOCKS + 1, 0, block), S.LBA_OUT_OF_RANGE)
    check(write_same(lu, BLOCKS - 1, 2, block, sixteen=False), S.LBA_OUT_OF_RANGE)
    check(write_same(lu, 0, 1, bytes(BS // 2)), S.INVALID_FIELD_IN_CDB, field_pointer=10)
    check(
        write_same(lu, 0, 1, bytes(2 * BS), sixteen=False), S.INVALID_FIELD_IN_CDB, field_pointer=7
    )


# COMPARE AND WRITE, ORWRITE, WRITE ATOMIC --------------------------------------------------


def caw(lu: LogicalUnit, lba: int, blocks: int, data: bytes, flags: int = 0) -> Srb:
    cdb = struct.pack(">BBQ3xBBB", 0x89, flags, lba, blocks, 0, 0)
    return execute(lu, cdb, data_out=data)[0]


def test_compare_and_write(lu: LogicalUnit) -> None:
    old = b"E" * (2 * BS)
    new = b"F" * (2 * BS)
    write16(lu, 5, old)
    good(caw(lu, 5, 2, old + new, flags=0x08))
    assert read16(lu, 5, 2) == new


def test_compare_and_write_miscompare_reports_the_first_differing_byte(lu: LogicalUnit) -> None:
    write16(lu, 5, b"G" * (2 * BS))
    expected = bytearray(b"G" * (2 * BS))
    expected[BS + 17] = 0
    check(caw(lu, 5, 2, bytes(expected) + b"H" * (2 * BS)), S.MISCOMPARE, information=BS + 17)
    assert read16(lu, 5, 2) == b"G" * (2 * BS)  # nothing written


def test_compare_and_write_errors(lu: LogicalUnit) -> None:
    check(
        caw(lu, 0, 1, bytes(2 * BS), flags=0x20),
        S.INVALID_FIELD_IN_CDB,
        field_pointer=1,
        bit_pointer=7,
    )
    check(caw(lu, BLOCKS - 1, 2, bytes(4 * BS)), S.LBA_OUT_OF_RANGE)
    check(caw(lu, 0, 1, bytes(BS)), S.INVALID_FIELD_IN_CDB, field_pointer=13)
    check(caw(lu, 0, 0, bytes(2 * BS)), S.INVALID_FIELD_IN_CDB, field_pointer=13)
    srb, _ = execute(lu, struct.pack(">BBQ3xBBB", 0x89, 0, 0, 0, 0, 0))
    good(srb)


def test_orwrite_ors_into_the_medium(lu: LogicalUnit) -> None:
    write16(lu, 3, b"\x0f" * BS)
    cdb = struct.pack(">BBQIBB", 0x8B, 0, 3, 1, 0, 0)
    good(execute(lu, cdb, data_out=b"\xf0" * BS)[0])
    assert read16(lu, 3, 1) == b"\xff" * BS
    check(
        execute(lu, struct.pack(">BBQIBB", 0x8B, 0x20, 3, 1, 0, 0), data_out=bytes(BS))[0],
        S.INVALID_FIELD_IN_CDB,
        field_pointer=1,
        bit_pointer=7,
    )
    srb, _ = execute(lu, struct.pack(">BBQIBB", 0x8B, 0, BLOCKS, 1, 0, 0), data_out=bytes(BS))
    check(srb, S.LBA_OUT_OF_RANGE)


def test_write_atomic(lu: LogicalUnit) -> None:
    cdb = struct.pack(">BBQHHBB", 0x9C, 0, 9, 0, 4, 0, 0)
    good(execute(lu, cdb, data_out=b"I" * (4 * BS))[0])
    assert read16(lu, 9, 4) == b"I" * (4 * BS)
    boundary = struct.pack(">BBQHHBB", 0x9C, 0, 9, 1, 4, 0, 0)
    check(
        execute(lu, boundary, data_out=bytes(4 * BS))[0], S.INVALID_FIELD_IN_CDB, field_pointer=10
    )
    short = execute(lu, cdb, data_out=bytes(3 * BS))[0]
    check(short, S.INVALID_FIELD_IN_CDB, field_pointer=12)
    beyond = struct.pack(">BBQHHBB", 0x9C, 0, BLOCKS + 1, 0, 0, 0, 0)
    check(execute(lu, beyond)[0], S.LBA_OUT_OF_RANGE)


# PRE-FETCH, READ DEFECT DATA ---------------------------------------------------------------


def test_pre_fetch_condition_met(lu: LogicalUnit) -> None:
    srb, _ = execute(lu, struct.pack(">BBIBHB", 0x34, 0x02, 0, 0, 8, 0))
    assert srb.scsi_status is ScsiStatus.CONDITION_MET and srb.sense == b""
    srb, _ = execute(lu, struct.pack(">BBQIBB", 0x90, 0, BLOCKS + 1, 0, 0, 0))
    check(srb, S.LBA_OUT_OF_RANGE)


def test_read_defect_data_is_an_empty_list(lu: LogicalUnit) -> None:
    srb, data = execute(lu, bytes((0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0)), data_in=32)
    good(srb)
    assert data == bytes((0, 0x18, 0, 0))
    srb, data = execute(lu, struct.pack(">BBIIBB", 0xB7, 0x0D, 0, 64, 0, 0), data_in=64)
    good(srb)
    assert data == bytes((0, 0x0D)) + bytes(6)
    srb, _ = execute(lu, bytes((0x37, 0, 0x01, 0, 0, 0, 0, 0, 32, 0)), data_in=32)
    check(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=2)


# SANITIZE ----------------------------------------------------------------------------------


def sanitize(lu: LogicalUnit, action: int, params: bytes = b"", cdb1: int = 0) -> Srb:
    cdb = struct.pack(">BB5xHB", 0x48, cdb1 | action, len(params), 0)
    return execute(lu, cdb, data_out=params if params else None)[0]


def test_sanitize_overwrite_fills_the_medium(lu: LogicalUnit) -> None:
    good(sanitize(lu, 0x01, struct.pack(">BxH", 1, 4) + b"\xaa\x55\x00\x01"))
    assert read16(lu, 0, 2) == b"\xaa\x55\x00\x01" * (2 * BS // 4)
    assert read16(lu, BLOCKS - 1, 1) == b"\xaa\x55\x00\x01" * (BS // 4)
    # INVERT with an even count leaves the inverse pattern.
    good(sanitize(lu, 0x01, struct.pack(">BxH", 0x82, 4) + b"\x00\xff\x0f\xf0"))
    assert read16(lu, 0, 1) == b"\xff\x00\xf0\x0f" * (BS // 4)


@pytest.mark.parametrize("action", [0x02, 0x03])
def test_sanitize_erase_deallocates_everything(lu: LogicalUnit, action: int) -> None:
    write16(lu, 0, b"J" * (16 * BS))
    good(sanitize(lu, action))
    assert read16(lu, 0, 16) == bytes(16 * BS)
    assert lba_status(lu, 0) == [(0, BLOCKS, 1)]


def test_sanitize_errors(lu: LogicalUnit) -> None:
    check(sanitize(lu, 0x02, cdb1=0x40), S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=6)
    check(sanitize(lu, 0x02, cdb1=0x20), S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=5)
    check(sanitize(lu, 0x02, bytes(8)), S.INVALID_FIELD_IN_CDB, field_pointer=7)
    check(sanitize(lu, 0x01, bytes(4)), S.INVALID_FIELD_IN_CDB, field_pointer=7)
    check(
        sanitize(lu, 0x01, struct.pack(">BxH", 0, 4) + bytes(4)),
        S.INVALID_FIELD_IN_CDB,
        field_pointer=7,
    )  # overwrite count 0
    check(sanitize(lu, 0x04), S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)
    reserved = struct.pack(">BBBIHB", 0x48, 0x02, 0x01, 0, 0, 0)
    check(execute(lu, reserved)[0], S.INVALID_FIELD_IN_CDB, field_pointer=2)
    good(sanitize(lu, 0x1F))


def test_sanitize_in_progress_gates_commands(lu: LogicalUnit) -> None:
    lu._overwrite_seconds = 0.5
    srb = sanitize(lu, 0x01, struct.pack(">BxH", 1, 4) + b"\x5a" * 4, cdb1=0x80)  # IMMED
    good(srb)
    assert lu._sanitizing

    def gated(cdb: bytes, data_in: int = 0) -> Srb:
        cdb = cdb + bytes(16 - len(cdb))
        s = Srb(
            cdb=cdb,
            data_direction=DataDirection.IN if data_in else DataDirection.NONE,
            data_transfer_length=data_in,
            sg_list=[memoryview(bytearray(data_in))] if data_in else [],
            nexus=NEXUS,
        )
        if not (lu._sanitizing and lu._sanitize_gate(s, cdb[0])):
            lu.execute(s)
        return s

    check(gated(bytes(6)), SANITIZE_IN_PROGRESS)  # TEST UNIT READY
    check(gated(struct.pack(">BBQIBB", 0x88, 0, 0, 1, 0, 0), BS), SANITIZE_IN_PROGRESS)
    good(gated(bytes((0x12, 0, 0, 0, 36, 0)), 36))  # INQUIRY is still answered
    sense = gated(bytes((0x03, 0, 0, 0, 18, 0)), 18)  # REQUEST SENSE reports the state
    good(sense)
    assert bytes(sense.sg_list[0])[:14] == build_sense(SANITIZE_IN_PROGRESS)[:14]
    deadline = time.monotonic() + 10
    while lu._sanitizing and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lu._sanitizing
    good(gated(bytes(6)))
    assert read16(lu, 0, 1) == b"\x5a" * BS


def test_sanitize_without_immed_ends_before_completing(lu: LogicalUnit) -> None:
    lu._overwrite_seconds = 0.3
    start = time.monotonic()
    good(sanitize(lu, 0x01, struct.pack(">BxH", 1, 4) + b"\x33" * 4))
    assert time.monotonic() - start >= 0.3
    assert not lu._sanitizing


def test_cancel_wait_ends_the_command_but_not_the_sanitize(lu: LogicalUnit) -> None:
    lu._overwrite_seconds = 1.0
    params = struct.pack(">BxH", 1, 4) + b"\x44" * 4
    cdb = struct.pack(">BB5xHB", 0x48, 0x01, len(params), 0) + bytes(6)
    buf = bytearray(params)
    srb = Srb(
        cdb=cdb,
        data_direction=DataDirection.OUT,
        data_transfer_length=len(buf),
        sg_list=[memoryview(buf)],
        nexus=NEXUS,
    )
    runner = threading.Thread(target=lu.execute, args=(srb,))
    runner.start()
    deadline = time.monotonic() + 5
    while lu._sanitize_waiter is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not lu.cancel_wait(Srb(cdb=bytes(16)))  # not the waiting command
    assert lu.cancel_wait(srb)
    runner.join(timeout=0.5)
    assert not runner.is_alive()
    assert lu._sanitizing  # the operation carries on in the background
    while lu._sanitizing and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lu._sanitizing
    assert read16(lu, 0, 1) == b"\x44" * BS
