"""Third-party copy: EXTENDED COPY (LID1), RECEIVE COPY RESULTS and VPD page 8Fh, driven with
real CDBs against real stores and real logical units of one target."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from emuhba.scsi.opcodes import Op
from emuhba.srb import ResetKind, ScsiStatus
from miniports.lu import LogicalUnit
from miniports.lu_copy import (
    MAX_DESCRIPTOR_LIST_LENGTH,
    MAX_SEGMENTS,
    MAX_TARGETS,
    CopyStatus,
)
from miniports.store import BlockStore, FileStore, RamStore
from tests.unit.test_lu import BS, NEXUS, OTHER, Result, read10, run, set_d_sense, tur, write10

BLOCKS = 256


def fixed_sense(key: int, asc: int, ascq: int, sks: bytes = bytes(3)) -> bytes:
    return bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0)) + sks


def param_sense(asc: int, ascq: int, field: int | None = None, bit: int | None = None) -> bytes:
    """ILLEGAL REQUEST sense, with a field pointer into the parameter list (C/D clear)."""
    if field is None:
        return fixed_sense(0x05, asc, ascq)
    first = 0x80 | (0x08 | bit if bit is not None else 0)
    return fixed_sense(0x05, asc, ascq, bytes((first, field >> 8, field & 0xFF)))


PARAMETER_LIST_LENGTH_ERROR = param_sense(0x1A, 0x00)
NOT_REACHABLE = fixed_sense(0x0A, 0x0D, 0x02)
COPY_ABORTED = fixed_sense(0x0A, 0x00, 0x00)


def make_target(*stores: BlockStore, name: str = "COPY", **kwargs: Any) -> list[LogicalUnit]:
    """Units at LUNs 0..n-1 of one target, each seeing the others as copy targets."""
    units: dict[int, LogicalUnit] = {}
    for lun, store in enumerate(stores):
        units[lun] = LogicalUnit(
            store,
            lun=lun,
            target_luns=lambda: sorted(units),
            serial=f"{name}-{lun}",
            peers=lambda: units,
            **kwargs,
        )
        for nexus in (NEXUS, OTHER):
            run(units[lun], bytes(6), nexus=nexus)  # the power-on unit attention
    return list(units.values())


def target_descriptor(
    unit: LogicalUnit, *, kind: int = 0xE4, nul: bool = False, block_size: int | None = None
) -> bytes:
    designator = bytes((0x01, 0x03, 0, 8)) + unit.naa_id.to_bytes(8, "big")
    length = unit.block_size if block_size is None else block_size
    return (
        bytes((kind, 0x20 if nul else 0, 0, 0))
        + designator
        + bytes(28 - 4 - len(designator))
        + length.to_bytes(4, "big")
    )


def b2b(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, dc: bool = False) -> bytes:
    return struct.pack(
        ">BBHHH2xHQQ", 0x02, 0x02 if dc else 0, 0x18, src, dst, blocks, src_lba, dst_lba
    )


def parameter_list(
    targets: list[bytes], segments: list[bytes], *, list_id: int = 1, usage: int = 0b00
) -> bytes:
    t, s = b"".join(targets), b"".join(segments)
    header = struct.pack(">BBH4xII", list_id, usage << 3, len(t), len(s), 0)
    return header + t + s


def xcopy(lu: LogicalUnit, params: bytes, *, length: int | None = None, nexus: int = NEXUS) -> Result:
    n = len(params) if length is None else length
    cdb = bytes((Op.EXTENDED_COPY, 0)) + bytes(8) + struct.pack(">I", n) + bytes(2)
    if not params:
        return run(lu, cdb, nexus=nexus)
    return run(lu, cdb, data_out=params, nexus=nexus)


def copy_status(lu: LogicalUnit, list_id: int, *, nexus: int = NEXUS, alloc: int = 64) -> Result:
    cdb = bytes((Op.RECEIVE_COPY_RESULTS, 0x00, list_id)) + bytes(7)
    return run(lu, cdb + struct.pack(">I", alloc) + bytes(2), data_in=alloc, nexus=nexus)


def fill(lu: LogicalUnit, lba: int, blocks: int, byte: int) -> None:
    assert write10(lu, lba, bytes((byte,)) * (blocks * lu.block_size)).good


def pattern(blocks: int, block_size: int = BS) -> bytes:
    return b"".join(bytes((i & 0xFF,)) * block_size for i in range(blocks))


# ---------------------------------------------------------------------------------------------
# Copying
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("medium", ["ram", "file"])
def test_copy_within_one_unit(tmp_path: Path, medium: str) -> None:
    store: BlockStore = (
        RamStore(BLOCKS) if medium == "ram" else FileStore(tmp_path / "a.img", BLOCKS * BS)
    )
    (lu,) = make_target(store)
    data = pattern(16)
    assert write10(lu, 0, data).good
    params = parameter_list([target_descriptor(lu)], [b2b(0, 0, 16, 0, BLOCKS - 16)])
    r = xcopy(lu, params)
    assert r.good and r.srb.sense == b""
    assert read10(lu, BLOCKS - 16, 16).data == data
    assert read10(lu, 0, 16).data == data


def test_copy_between_units_of_the_target(tmp_path: Path) -> None:
    a, b = make_target(RamStore(BLOCKS), FileStore(tmp_path / "b.img", BLOCKS * BS))
    data = pattern(8)
    assert write10(a, 10, data).good
    # Sent to B, naming A as the source: the copy manager need not be one of the targets.
    params = parameter_list(
        [target_descriptor(a), target_descriptor(b)], [b2b(0, 1, 8, 10, 100), b2b(1, 1, 4, 100, 0)]
    )
    assert xcopy(b, params).good
    assert read10(b, 100, 8).data == data
    assert read10(b, 0, 4).data == data[: 4 * BS]
    assert read10(b, 4, 1).data == bytes(BS)  # nothing beyond what the segments name


def test_copy_counts_destination_blocks_with_dc() -> None:
    (lu,) = make_target(RamStore(BLOCKS))
    data = pattern(3)
    assert write10(lu, 0, data).good
    params = parameter_list([target_descriptor(lu)], [b2b(0, 0, 3, 0, 50, dc=True)])
    assert xcopy(lu, params).good
    assert read10(lu, 50, 3).data == data


@pytest.mark.parametrize(("src", "dst"), [(0, 2), (2, 0)])
def test_overlapping_copy_moves_like_memmove(monkeypatch: pytest.MonkeyPatch, src: int, dst: int) -> None:
    # A small bounce buffer so that the overlap spans several chunks.
    monkeypatch.setattr("miniports.lu_copy.CHUNK", 2 * BS)
    (lu,) = make_target(RamStore(BLOCKS))
    data = pattern(8)
    assert write10(lu, src, data).good
    assert xcopy(lu, parameter_list([target_descriptor(lu)], [b2b(0, 0, 8, src, dst)])).good
    assert read10(lu, dst, 8).data == data


def test_zero_block_segment_and_empty_parameter_list() -> None:
    (lu,) = make_target(RamStore(BLOCKS))
    assert xcopy(lu, b"").good
    assert xcopy(lu, parameter_list([target_descriptor(lu)], [b2b(0, 0, 0, 0, 1)])).good
    assert read10(lu, 1, 1).data == bytes(BS)


def test_copy_to_a_write_protected_unit_is_aborted(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(BLOCKS * BS))
    a, ro = make_target(RamStore(BLOCKS), FileStore(path, read_only=True))
    fill(a, 0, 1, 0x44)
    params = parameter_list([target_descriptor(a), target_descriptor(ro)], [b2b(0, 1, 1, 0, 0)])
    assert xcopy(a, params).srb.sense == fixed_sense(0x0A, 0x27, 0x00)
    # The read-only unit may still be the source.
    params = parameter_list([target_descriptor(ro), target_descriptor(a)], [b2b(0, 1, 1, 0, 0)])
    assert xcopy(a, params).good
    assert read10(a, 0, 1).data == bytes(BS)


def test_copy_from_an_ejected_unit_is_aborted() -> None:
    a, b = make_target(RamStore(BLOCKS), RamStore(BLOCKS), removable=True)
    eject = bytes((Op.START_STOP_UNIT, 0, 0, 0, 0x02, 0))
    assert run(b, eject).good
    params = parameter_list([target_descriptor(b), target_descriptor(a)], [b2b(0, 1, 1, 0, 0)])
    assert xcopy(a, params).srb.sense == fixed_sense(0x0A, 0x3A, 0x00)


# ---------------------------------------------------------------------------------------------
# Refusals: nothing is copied
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def lu() -> LogicalUnit:
    (unit,) = make_target(RamStore(BLOCKS))
    fill(unit, 0, 4, 0x77)
    return unit


def assert_untouched(lu: LogicalUnit) -> None:
    assert read10(lu, BLOCKS - 4, 4).data == bytes(4 * BS)


def test_truncated_parameter_lists(lu: LogicalUnit) -> None:
    params = parameter_list([target_descriptor(lu)], [b2b(0, 0, 4, 0, BLOCKS - 4)])
    for cut in (16 + 31, 16 + 32 + 27, 15):
        r = xcopy(lu, params[:cut])
        assert r.srb.scsi_status is ScsiStatus.CHECK_CONDITION
        assert r.srb.sense == PARAMETER_LIST_LENGTH_ERROR, cut
    assert_untouched(lu)


def test_descriptor_limits(lu: LogicalUnit) -> None:
    t, s = target_descriptor(lu), b2b(0, 0, 4, 0, BLOCKS - 4)
    too_many_targets = parameter_list([t] * (MAX_TARGETS + 1), [s])
    assert xcopy(lu, too_many_targets).srb.sense == param_sense(0x26, 0x06)
    too_many_segments = parameter_list([t], [s] * (MAX_SEGMENTS + 1))
    assert xcopy(lu, too_many_segments).srb.sense == param_sense(0x26, 0x08)
    both = parameter_list([t] * (MAX_TARGETS + 1), [s] * (MAX_SEGMENTS + 1))
    assert len(both) - 16 > MAX_DESCRIPTOR_LIST_LENGTH
    assert xcopy(lu, both).srb.sense == PARAMETER_LIST_LENGTH_ERROR
    assert_untouched(lu)


def test_unsupported_descriptor_types(lu: LogicalUnit) -> None:
    s = b2b(0, 0, 4, 0, BLOCKS - 4)
    fc_name = parameter_list([target_descriptor(lu, kind=0xE0)], [s])
    assert xcopy(lu, fc_name).srb.sense == param_sense(0x26, 0x07, field=16)
    stream = bytearray(s)
    stream[0] = 0x03
    r = xcopy(lu, parameter_list([target_descriptor(lu)], [bytes(stream)]))
    assert r.srb.sense == param_sense(0x26, 0x09, field=48)
    bad_length = bytearray(s)
    bad_length[3] = 0x14
    r = xcopy(lu, parameter_list([target_descriptor(lu)], [bytes(bad_length)]))
    assert r.srb.sense == param_sense(0x26, 0x00, field=50)
    assert_untouched(lu)


def test_header_fields(lu: LogicalUnit) -> None:
    t, s = [target_descriptor(lu)], [b2b(0, 0, 4, 0, BLOCKS - 4)]
    assert xcopy(lu, parameter_list(t, s, usage=0b01)).srb.sense == param_sense(0x26, 0, 1, 4)
    assert xcopy(lu, parameter_list(t, s, usage=0b11, list_id=5)).srb.sense == param_sense(
        0x26, 0, 0
    )
    odd = bytearray(parameter_list(t, s))
    odd[3] = 31  # a target descriptor list that is not a whole number of descriptors
    odd[11] = 29
    assert xcopy(lu, bytes(odd)).srb.sense == param_sense(0x26, 0, 2)
    inline = bytearray(parameter_list(t, s) + bytes(4))
    inline[15] = 4
    assert xcopy(lu, bytes(inline)).srb.sense == param_sense(0x26, 0x0B)
    assert_untouched(lu)
    # LU ID TYPE means nothing to an identification descriptor: ignored.
    ignored = bytearray(parameter_list(t, s, usage=0b11, list_id=0))
    ignored[17] |= 0xC0
    assert xcopy(lu, bytes(ignored)).good


def test_unreachable_copy_targets(lu: LogicalUnit) -> None:
    (stranger,) = make_target(RamStore(BLOCKS), name="OTHER")  # another target's unit
    cases = [
        parameter_list([target_descriptor(lu)], [b2b(0, 1, 4, 0, BLOCKS - 4)]),  # no target 1
        parameter_list([target_descriptor(lu, nul=True)], [b2b(0, 0, 4, 0, BLOCKS - 4)]),
        parameter_list(
            [target_descriptor(lu), target_descriptor(stranger)], [b2b(0, 1, 4, 0, 0)]
        ),
    ]
    for params in cases:
        assert xcopy(lu, params).srb.sense == NOT_REACHABLE
    wrong_size = parameter_list([target_descriptor(lu, block_size=4096)], [b2b(0, 0, 1, 0, 9)])
    assert xcopy(lu, wrong_size).srb.sense == fixed_sense(0x0A, 0x0D, 0x03)
    assert_untouched(lu)
    assert read10(stranger, 0, 1).data == bytes(BS)


def test_segment_beyond_the_end_is_aborted_before_any_data_moves(lu: LogicalUnit) -> None:
    fine = b2b(0, 0, 4, 0, BLOCKS - 4)
    for bad in (b2b(0, 0, 4, 0, BLOCKS - 1), b2b(0, 0, 4, BLOCKS - 1, 0)):
        # The first segment is valid; the second fails validation, so neither runs.
        r = xcopy(lu, parameter_list([target_descriptor(lu)], [fine, bad]))
        assert r.srb.sense == COPY_ABORTED
    assert_untouched(lu)
    assert copy_status(lu, 1).srb.sense[12:14] == bytes((0x24, 0x00))  # nothing held


def test_copy_aborted_in_descriptor_format(lu: LogicalUnit) -> None:
    set_d_sense(lu, True)
    params = parameter_list([target_descriptor(lu)], [b2b(0, 3, 4, 0, 0)])
    assert xcopy(lu, params).srb.sense == bytes((0x72, 0x0A, 0x0D, 0x02, 0, 0, 0, 0))


# ---------------------------------------------------------------------------------------------
# RECEIVE COPY RESULTS
# ---------------------------------------------------------------------------------------------


def test_copy_status_is_held_per_nexus_and_list_id(lu: LogicalUnit) -> None:
    assert copy_status(lu, 1).srb.sense == fixed_sense(0x05, 0x24, 0x00, bytes((0xC0, 0, 2)))
    params = parameter_list([target_descriptor(lu)], [b2b(0, 0, 4, 0, 100)] * 2, list_id=1)
    assert xcopy(lu, params).good
    assert copy_status(lu, 1, nexus=OTHER).srb.sense[12] == 0x24  # not the other nexus's
    short = copy_status(lu, 1, alloc=4)
    assert short.good and short.data == bytes((0, 0, 0, 8))
    status = copy_status(lu, 1)
    # Completed without errors, 2 segments, transfer count in bytes.
    assert status.data == bytes((0, 0, 0, 8, 0x01, 0, 2, 0)) + struct.pack(">I", 8 * BS)
    assert copy_status(lu, 1).srb.sense[12] == 0x24  # delivered whole: discarded


def test_results_are_held_only_when_asked(lu: LogicalUnit) -> None:
    t, s = [target_descriptor(lu)], [b2b(0, 0, 1, 0, 100)]
    assert xcopy(lu, parameter_list(t, s, list_id=7, usage=0b10)).good
    assert copy_status(lu, 7).srb.sense[12] == 0x24
    assert xcopy(lu, parameter_list(t, s, list_id=0, usage=0b11)).good
    assert copy_status(lu, 0).srb.sense[12] == 0x24


def test_held_results_go_with_their_nexus(lu: LogicalUnit) -> None:
    t, s = [target_descriptor(lu)], [b2b(0, 0, 1, 0, 100)]
    assert xcopy(lu, parameter_list(t, s, list_id=3), nexus=OTHER).good
    lu.nexus_gone(OTHER)
    run(lu, bytes(6), nexus=OTHER)
    assert copy_status(lu, 3, nexus=OTHER).srb.sense[12] == 0x24


def test_list_id_in_use_is_refused(lu: LogicalUnit) -> None:
    lu._held[(NEXUS, 9)] = CopyStatus()  # a copy with that list identifier still running
    params = parameter_list([target_descriptor(lu)], [b2b(0, 0, 1, 0, 100)], list_id=9)
    assert xcopy(lu, params).srb.sense == fixed_sense(0x05, 0x00, 0x16)
    assert_untouched(lu)
    assert copy_status(lu, 9).data == bytes((0, 0, 0, 8)) + bytes(8)  # in progress, kept


def test_large_transfer_counts_switch_units() -> None:
    assert CopyStatus(1, 1, 5 << 32).encode()[7:] == bytes((1,)) + struct.pack(">I", 5 << 22)


def test_operating_parameters(lu: LogicalUnit) -> None:
    cdb = bytes((Op.RECEIVE_COPY_RESULTS, 0x03)) + bytes(8) + struct.pack(">I", 255) + bytes(2)
    d = run(lu, cdb, data_in=255).data
    assert len(d) == 46 and struct.unpack_from(">I", d)[0] == 42
    assert d[4] == 0x01  # SNLID
    assert struct.unpack_from(">HHIIIII", d, 8) == (
        MAX_TARGETS, MAX_SEGMENTS, MAX_DESCRIPTOR_LIST_LENGTH, 0xFFFF * BS, 0, 0, 0
    )
    assert struct.unpack_from(">H", d, 34)[0] == 16 and d[36] == 16
    assert d[37:40] == bytes((9, 0, 0))  # 512-byte data segment granularity
    assert d[43:] == bytes((2, 0x02, 0xE4))


# ---------------------------------------------------------------------------------------------
# VPD page 8Fh
# ---------------------------------------------------------------------------------------------


def test_third_party_copy_vpd_page(lu: LogicalUnit) -> None:
    cdb = bytes((Op.INQUIRY, 0x01, 0x8F, 0x04, 0x00, 0x00))
    d = run(lu, cdb, data_in=1024).data
    assert d[:2] == bytes((0x00, 0x8F)) and struct.unpack_from(">H", d, 2)[0] == len(d) - 4
    descriptors: dict[int, bytes] = {}
    pos = 4
    while pos < len(d):
        kind, length = struct.unpack_from(">HH", d, pos)
        assert length % 4 == 0
        descriptors[kind] = d[pos + 4 : pos + 4 + length]
        pos += 4 + length
    assert pos == len(d)
    assert descriptors[0x0001] == bytes((7, 0x83, 1, 0x00, 0x84, 2, 0x00, 0x03))
    assert descriptors[0x0004] == struct.pack(
        ">4xHHII12x", MAX_TARGETS, MAX_SEGMENTS, MAX_DESCRIPTOR_LIST_LENGTH, 0
    )
    assert descriptors[0x0008] == bytes((2, 0x02, 0xE4, 0))
    assert descriptors[0x000C] == bytes(4)
    general = descriptors[0x8001]
    assert len(general) == 0x20
    assert struct.unpack_from(">IIIBB", general) == (16, 16, 0xFFFF * BS, 9, 0)
    assert 0x8F in run(lu, bytes((Op.INQUIRY, 1, 0, 0, 255, 0)), data_in=255).data[4:]


def test_copy_commands_report_unit_attentions_and_timeouts() -> None:
    (lu,) = make_target(RamStore(BLOCKS))
    lu.reset(ResetKind.LOGICAL_UNIT)
    r = xcopy(lu, b"")
    assert r.srb.sense[12:14] == bytes((0x29, 0x03))
    assert tur(lu).good
    spec = next(s for s in lu.commands if s.opcode == Op.EXTENDED_COPY)
    assert spec.timeout == 120 and spec.service_action == 0
