"""Reservations of the logical unit: SPC-2 RESERVE/RELEASE and persistent reservations (SPC-4),
driven with real CDBs against real stores, sense and status checked byte for byte."""

from __future__ import annotations

import json
import random
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emuhba.scsi import cdb as C
from emuhba.scsi import sense as S
from emuhba.scsi.opcodes import Op
from emuhba.scsi.sense import SenseCode, SenseData, parse_sense
from emuhba.srb import DataDirection, ResetKind, ScsiStatus, Srb, SrbStatus
from miniports.lu import LogicalUnit
from miniports.lu_reservations import RESERVATION_COMMANDS, PrIn, PrOut, PrType
from miniports.lu_spec import CommandSpec
from miniports.store import BlockStore, FileStore, RamStore

BS = 512
BLOCKS = 2048
NEXUS = 1
OTHER = 2


# Small local copies of the LU test drivers (tests/unit/test_lu.py), so that this file does not
# depend on that module's import-time state.
@dataclass
class Result:
    srb: Srb
    data: bytes

    @property
    def good(self) -> bool:
        return self.srb.scsi_status is ScsiStatus.GOOD

    @property
    def sense(self) -> SenseData:
        assert self.srb.scsi_status is ScsiStatus.CHECK_CONDITION, "expected CHECK CONDITION"
        return parse_sense(self.srb.sense)

    @property
    def code(self) -> SenseCode:
        return self.sense.code


def run(
    lu: LogicalUnit,
    cdb: bytes,
    *,
    nexus: int = NEXUS,
    data_in: int | None = None,
    data_out: bytes | None = None,
) -> Result:
    """Execute ``cdb`` as the target would: padded to 16 bytes, with its data buffers."""
    cdb = cdb + bytes(max(0, 16 - len(cdb)))
    if data_out is not None:
        buf = bytearray(data_out)
        srb = Srb(cdb=cdb, data_direction=DataDirection.OUT, data_transfer_length=len(buf),
                  sg_list=[memoryview(buf)], nexus=nexus)
    else:
        buf = bytearray(data_in or 0)
        srb = Srb(cdb=cdb, data_direction=DataDirection.IN if data_in else DataDirection.NONE,
                  data_transfer_length=len(buf), sg_list=[memoryview(buf)] if data_in else [],
                  nexus=nexus)
    lu.execute(srb)
    moved = srb.data_transfer_length if data_out is None else 0
    result = Result(srb, bytes(buf[:moved]))
    if result.good:
        assert srb.srb_status is SrbStatus.SUCCESS and srb.sense == b""
    else:
        assert srb.srb_status is SrbStatus.ERROR and srb.data_transfer_length == 0
    return result


def make_lu(store: BlockStore | None = None, *, clear: tuple[int, ...] = (NEXUS,)) -> LogicalUnit:
    lu = LogicalUnit(
        store if store is not None else RamStore(BLOCKS),
        lun=0,
        target_luns=lambda: [0, 1],
        serial="EMU-SERIAL-0001",
        target_port_name="iqn.2024-01.org.emuhba:target0,t,0x0001",
    )
    for nexus in clear:
        tur(lu, nexus)  # consume the power-on unit attention
    return lu


def tur(lu: LogicalUnit, nexus: int = NEXUS) -> Result:
    return run(lu, C.TEST_UNIT_READY.build({}), nexus=nexus)


def read10(lu: LogicalUnit, lba: int, blocks: int, nexus: int = NEXUS) -> Result:
    return run(lu, C.READ_10.build(dict(lba=lba, transfer_length=blocks)), nexus=nexus,
               data_in=blocks * lu.block_size)


def write10(lu: LogicalUnit, lba: int, data: bytes, nexus: int = NEXUS) -> Result:
    cdb = C.WRITE_10.build(dict(lba=lba, transfer_length=len(data) // lu.block_size))
    return run(lu, cdb, data_out=data, nexus=nexus)


def mode_sense6(lu: LogicalUnit, nexus: int = NEXUS) -> Result:
    cdb = C.MODE_SENSE_6.build(dict(page=dict(pc=0, page_code=0x3F), allocation_length=255))
    return run(lu, cdb, nexus=nexus, data_in=255)


def assert_check(
    result: Result,
    code: SenseCode,
    field_pointer: int | None = None,
    bit_pointer: int | None = None,
    cd: bool = True,
) -> None:
    sense = result.sense
    assert sense.code == code, f"{sense.code} != {code}"
    if field_pointer is not None:
        assert sense.field_pointer == field_pointer
        assert sense.bit_pointer == bit_pointer
        assert sense.cd == cd

THIRD = 3
INITIATOR_1 = "iqn.2024-01.org.example:host1,i,0x23d000000001"
INITIATOR_2 = "iqn.2024-01.org.example:host2,i,0x23d000000002"
TARGET_PORT = "iqn.2024-01.org.emuhba:target0,t,0x0001"

WE, EA = PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS
WE_RO, EA_RO = PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
WE_AR, EA_AR = PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS


def conflict(result: Result) -> bool:
    return result.srb.scsi_status is ScsiStatus.RESERVATION_CONFLICT and result.srb.sense == b""


def reserve6(lu: LogicalUnit, nexus: int = NEXUS, byte1: int = 0) -> Result:
    return run(lu, bytes((Op.RESERVE_6, byte1, 0, 0, 0, 0)), nexus=nexus)


def release6(lu: LogicalUnit, nexus: int = NEXUS) -> Result:
    return run(lu, bytes((Op.RELEASE_6, 0, 0, 0, 0, 0)), nexus=nexus)


def reserve10(lu: LogicalUnit, nexus: int = NEXUS) -> Result:
    return run(lu, bytes((Op.RESERVE_10,)) + bytes(9), nexus=nexus)


def prin(lu: LogicalUnit, action: int, allocation: int = 4096, nexus: int = NEXUS) -> Result:
    cdb = bytes((Op.PERSISTENT_RESERVE_IN, action)) + bytes(5) + struct.pack(">H", allocation)
    return run(lu, cdb + b"\x00", nexus=nexus, data_in=allocation)


def prout(
    lu: LogicalUnit,
    action: int,
    *,
    key: int = 0,
    sa_key: int = 0,
    pr_type: int = 0,
    scope: int = 0,
    flags: int = 0,
    nexus: int = NEXUS,
    parameters: bytes | None = None,
) -> Result:
    data = parameters if parameters is not None else (
        struct.pack(">QQ4xBx2x", key, sa_key, flags))
    cdb = (bytes((Op.PERSISTENT_RESERVE_OUT, action, (scope << 4) | pr_type, 0, 0))
           + struct.pack(">I", len(data)) + b"\x00")
    return run(lu, cdb, nexus=nexus, data_out=data)


def register(lu: LogicalUnit, key: int, nexus: int = NEXUS, flags: int = 0) -> None:
    assert prout(lu, PrOut.REGISTER_AND_IGNORE_EXISTING_KEY, sa_key=key, nexus=nexus,
                 flags=flags).good


def keys(lu: LogicalUnit, nexus: int = NEXUS) -> tuple[int, list[int]]:
    data = prin(lu, PrIn.READ_KEYS, nexus=nexus).data
    generation, length = struct.unpack_from(">II", data)
    return generation, [struct.unpack_from(">Q", data, 8 + i)[0] for i in range(0, length, 8)]


def reservation(lu: LogicalUnit, nexus: int = NEXUS) -> tuple[int, int] | None:
    """(key, type) of the persistent reservation, None when there is none."""
    data = prin(lu, PrIn.READ_RESERVATION, nexus=nexus).data
    if struct.unpack_from(">I", data, 4)[0] == 0:
        assert len(data) == 8
        return None
    assert len(data) == 24
    return struct.unpack_from(">Q", data, 8)[0], data[21]


def pending_ua(lu: LogicalUnit, nexus: int) -> list[tuple[int, ...]]:
    """Drain and return the unit attentions ``nexus`` has queued."""
    codes: list[tuple[int, ...]] = []
    while True:
        r = tur(lu, nexus)
        if r.good or r.srb.scsi_status is not ScsiStatus.CHECK_CONDITION:
            return codes
        codes.append(tuple(r.code))


@pytest.fixture
def lu() -> LogicalUnit:
    unit = make_lu(clear=(NEXUS, OTHER, THIRD))
    unit.nexus_opened(NEXUS, INITIATOR_1, TARGET_PORT)
    unit.nexus_opened(OTHER, INITIATOR_2, TARGET_PORT)
    return unit


# ---------------------------------------------------------------------------------------------
# SPC-2 RESERVE / RELEASE
# ---------------------------------------------------------------------------------------------


def test_reserve6_keeps_other_nexuses_out(lu: LogicalUnit) -> None:
    assert reserve6(lu).good
    assert reserve6(lu).good  # the holder may reserve again
    assert conflict(reserve6(lu, OTHER))
    assert release6(lu, OTHER).good  # a non-holder's RELEASE changes nothing
    assert conflict(read10(lu, 0, 1, nexus=OTHER))
    assert conflict(mode_sense6(lu, nexus=OTHER))
    assert conflict(tur(lu, OTHER))
    assert run(lu, C.INQUIRY.build(dict(allocation_length=96)), nexus=OTHER, data_in=96).good
    assert conflict(prin(lu, PrIn.READ_KEYS, nexus=OTHER))
    assert mode_sense6(lu).good and read10(lu, 0, 1).good
    assert release6(lu).good
    assert reserve10(lu, OTHER).good
    assert conflict(read10(lu, 0, 1))
    assert run(lu, bytes((Op.RELEASE_10,)) + bytes(9), nexus=OTHER).good
    assert read10(lu, 0, 1).good


def test_reserve6_refuses_third_party(lu: LogicalUnit) -> None:
    assert_check(reserve6(lu, byte1=0x10), S.INVALID_FIELD_IN_CDB, 1, 4)


@pytest.mark.parametrize("kind", list(ResetKind))
def test_reserve6_released_by_every_reset(lu: LogicalUnit, kind: ResetKind) -> None:
    assert reserve6(lu).good
    lu.reset(kind)
    pending_ua(lu, OTHER)
    assert reserve6(lu, OTHER).good


def test_reserve6_released_on_nexus_loss(lu: LogicalUnit) -> None:
    assert reserve6(lu).good
    lu.nexus_gone(OTHER)  # not the holder: nothing changes
    assert conflict(reserve6(lu, THIRD))
    lu.nexus_gone(NEXUS)
    assert reserve6(lu, THIRD).good
    assert lu._reserved


def test_spc2_reserve_conflicts_with_registrations(lu: LogicalUnit) -> None:
    register(lu, 0xAA, OTHER)
    assert conflict(reserve6(lu))
    assert conflict(release6(lu))
    assert not lu._reserved


# ---------------------------------------------------------------------------------------------
# PERSISTENT RESERVE IN
# ---------------------------------------------------------------------------------------------


def test_register_read_keys_and_generation(lu: LogicalUnit) -> None:
    assert keys(lu) == (0, [])
    register(lu, 0x1111)
    register(lu, 0x2222, OTHER)
    assert keys(lu) == (2, [0x1111, 0x2222])
    # REGISTER with a registered nexus and a wrong key conflicts, generation unchanged.
    assert conflict(prout(lu, PrOut.REGISTER, key=0, sa_key=0x3333))
    assert prout(lu, PrOut.REGISTER, key=0x1111, sa_key=0x3333).good
    assert keys(lu) == (3, [0x3333, 0x2222])
    assert prout(lu, PrOut.REGISTER, key=0x3333, sa_key=0).good
    assert keys(lu) == (4, [0x2222])
    # Unregistering an unregistered nexus does nothing.
    assert prout(lu, PrOut.REGISTER, key=0, sa_key=0).good
    assert keys(lu) == (4, [0x2222])
    # An unregistered nexus must give a zero key to REGISTER.
    assert conflict(prout(lu, PrOut.REGISTER, key=0x2222, sa_key=0x5))


def test_read_keys_truncated_keeps_additional_length(lu: LogicalUnit) -> None:
    register(lu, 0xABCDEF)
    r = prin(lu, PrIn.READ_KEYS, allocation=8)
    assert r.data == struct.pack(">II", 1, 8)
    assert r.srb.residual == 0


@pytest.mark.parametrize("action", [4, 5, 0x10, 0x1F])
def test_prin_unknown_service_actions(lu: LogicalUnit, action: int) -> None:
    assert_check(prin(lu, action), S.INVALID_FIELD_IN_CDB, 1, 4)


def test_report_capabilities_ram(lu: LogicalUnit) -> None:
    data = prin(lu, PrIn.REPORT_CAPABILITIES).data
    # Length 8; SIP_C, ATP_C; TMV with ALLOW COMMANDS 010b; all six types.
    assert data == bytes((0, 8, 0x0C, 0xA0, 0xEA, 0x01, 0, 0))


def test_report_capabilities_file(tmp_path: Path) -> None:
    lu = make_lu(FileStore(tmp_path / "d.img", BLOCKS * BS))
    assert prin(lu, PrIn.REPORT_CAPABILITIES).data == bytes((0, 8, 0x0D, 0xA0, 0xEA, 0x01, 0, 0))
    register(lu, 7, flags=0x01)
    assert prin(lu, PrIn.REPORT_CAPABILITIES).data[3] == 0xA1  # PTPL_A


def test_read_full_status(lu: LogicalUnit) -> None:
    register(lu, 0x10)
    register(lu, 0x20, OTHER, flags=0x04)  # ALL_TG_PT
    assert prout(lu, PrOut.RESERVE, key=0x10, pr_type=WE_RO).good
    data = prin(lu, PrIn.READ_FULL_STATUS).data
    generation, length = struct.unpack_from(">II", data)
    assert generation == 2 and length == len(data) - 8
    pos = 8
    found = []
    while pos < len(data):
        key, flags, scope_type, rel, tid_len = struct.unpack_from(">Q4xBB4xHI", data, pos)
        tid = data[pos + 24 : pos + 24 + tid_len]
        assert tid[0] == 0x45 and struct.unpack_from(">H", tid, 2)[0] == tid_len - 4
        assert tid_len % 4 == 0 and tid_len >= 24
        found.append((key, flags, scope_type, rel, tid[4:].rstrip(b"\x00").decode()))
        pos += 24 + tid_len
    assert found == [
        (0x10, 0x01, 0x05, 1, INITIATOR_1),
        (0x20, 0x02, 0x00, 0, INITIATOR_2),
    ]


# ---------------------------------------------------------------------------------------------
# PERSISTENT RESERVE OUT: reservation types and access
# ---------------------------------------------------------------------------------------------

# (type, registered other reads, registered other writes, unregistered reads, unregistered writes)
ACCESS = [
    (EA, False, False, False, False),
    (WE, True, False, True, False),
    (EA_RO, True, True, False, False),
    (WE_RO, True, True, True, False),
    (EA_AR, True, True, False, False),
    (WE_AR, True, True, True, False),
]


@pytest.mark.parametrize(("pr_type", "reg_read", "reg_write", "unreg_read", "unreg_write"), ACCESS)
def test_access_by_type(
    lu: LogicalUnit, pr_type: int, reg_read: bool, reg_write: bool, unreg_read: bool,
    unreg_write: bool,
) -> None:
    register(lu, 0xA)
    register(lu, 0xB, OTHER)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=pr_type).good
    assert lu._reserved
    assert reservation(lu) == (0 if pr_type in (WE_AR, EA_AR) else 0xA, pr_type)
    assert read10(lu, 1, 1).good and write10(lu, 1, bytes(BS)).good
    assert read10(lu, 1, 1, nexus=OTHER).good is reg_read
    assert write10(lu, 1, bytes(BS), nexus=OTHER).good is reg_write
    assert prout(lu, PrOut.REGISTER, key=0xB, sa_key=0, nexus=OTHER).good
    r = read10(lu, 1, 1, nexus=OTHER)
    assert r.good if unreg_read else conflict(r)
    r = write10(lu, 1, bytes(BS), nexus=OTHER)
    assert r.good if unreg_write else conflict(r)
    # What every type lets through.
    assert tur(lu, OTHER).good
    assert run(lu, C.INQUIRY.build(dict(allocation_length=96)), nexus=OTHER, data_in=96).good
    assert prin(lu, PrIn.READ_KEYS, nexus=OTHER).good
    assert conflict(mode_sense6(lu, nexus=OTHER))
    assert prout(lu, PrOut.RELEASE, key=0xA, pr_type=pr_type).good
    assert not lu._reserved
    assert write10(lu, 1, bytes(BS), nexus=OTHER).good


def test_reserve_rules(lu: LogicalUnit) -> None:
    register(lu, 0xA)
    register(lu, 0xB, OTHER)
    assert conflict(prout(lu, PrOut.RESERVE, key=0xB, pr_type=WE))  # not its key
    assert conflict(prout(lu, PrOut.RESERVE, key=0, pr_type=WE, nexus=THIRD))  # unregistered
    assert_check(prout(lu, PrOut.RESERVE, key=0xA, pr_type=2), S.INVALID_FIELD_IN_CDB, 2, 3)
    assert_check(prout(lu, PrOut.RESERVE, key=0xA, pr_type=WE, scope=1),
                 S.INVALID_FIELD_IN_CDB, 2, 7)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=WE).good
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=WE).good  # again, same type: no change
    assert conflict(prout(lu, PrOut.RESERVE, key=0xA, pr_type=EA))  # another type
    assert conflict(prout(lu, PrOut.RESERVE, key=0xB, pr_type=WE, nexus=OTHER))
    # RELEASE by a non-holder has no effect; by the holder with another type it is invalid.
    assert prout(lu, PrOut.RELEASE, key=0xB, pr_type=WE, nexus=OTHER).good
    assert reservation(lu) == (0xA, WE)
    assert_check(prout(lu, PrOut.RELEASE, key=0xA, pr_type=EA),
                 S.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    assert keys(lu)[0] == 2  # RESERVE and RELEASE leave PRgeneration alone
    assert prout(lu, PrOut.RELEASE, key=0xA, pr_type=WE).good
    assert reservation(lu) is None
    assert prout(lu, PrOut.RELEASE, key=0xA, pr_type=WE).good  # nothing to release


def test_release_of_registrants_only_notifies_registrants(lu: LogicalUnit) -> None:
    register(lu, 0xA)
    register(lu, 0xB, OTHER)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=WE_RO).good
    assert prout(lu, PrOut.RELEASE, key=0xA, pr_type=WE_RO).good
    assert pending_ua(lu, OTHER) == [tuple(S.RESERVATIONS_RELEASED)]
    assert pending_ua(lu, NEXUS) == []
    assert pending_ua(lu, THIRD) == []  # not registered
    # Write Exclusive: no unit attention on release.
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=WE).good
    assert prout(lu, PrOut.RELEASE, key=0xA, pr_type=WE).good
    assert pending_ua(lu, OTHER) == []


@pytest.mark.parametrize("pr_type", [EA, WE, EA_RO, WE_RO, EA_AR, WE_AR])
def test_unregistering_the_holder(lu: LogicalUnit, pr_type: int) -> None:
    register(lu, 0xA)
    register(lu, 0xB, OTHER)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=pr_type).good
    assert prout(lu, PrOut.REGISTER, key=0xA, sa_key=0).good
    if pr_type in (EA_AR, WE_AR):
        assert reservation(lu) == (0, pr_type)  # held while one registrant is left
        assert prout(lu, PrOut.RELEASE, key=0xB, pr_type=pr_type, nexus=OTHER).good
    else:
        assert reservation(lu) is None
        expected = [tuple(S.RESERVATIONS_RELEASED)] if pr_type in (EA_RO, WE_RO) else []
        assert pending_ua(lu, OTHER) == expected
    assert not lu._reserved


def test_all_registrants_goes_with_the_last_registrant(lu: LogicalUnit) -> None:
    register(lu, 0xA)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=EA_AR).good
    assert prout(lu, PrOut.REGISTER, key=0xA, sa_key=0).good
    assert reservation(lu) is None and not lu._reserved


def test_clear(lu: LogicalUnit) -> None:
    register(lu, 0xA)
    register(lu, 0xB, OTHER)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=EA).good
    assert conflict(prout(lu, PrOut.CLEAR, key=0xC, nexus=OTHER))
    assert prout(lu, PrOut.CLEAR, key=0xB, nexus=OTHER).good
    assert keys(lu, OTHER) == (3, [])
    assert reservation(lu, OTHER) is None and not lu._reserved
    assert pending_ua(lu, NEXUS) == [tuple(S.RESERVATIONS_PREEMPTED)]
    assert pending_ua(lu, OTHER) == []


def test_preempt_registration_only(lu: LogicalUnit) -> None:
    register(lu, 0xA)
    register(lu, 0xB, OTHER)
    generation = keys(lu)[0]
    assert prout(lu, PrOut.PREEMPT, key=0xB, sa_key=0xA, pr_type=EA, nexus=OTHER).good
    assert keys(lu, OTHER) == (generation + 1, [0xB])
    assert pending_ua(lu, NEXUS) == [tuple(S.REGISTRATIONS_PREEMPTED)]
    assert pending_ua(lu, OTHER) == []
    assert conflict(prout(lu, PrOut.PREEMPT, key=0xB, sa_key=0xA, pr_type=EA, nexus=OTHER))
    assert_check(prout(lu, PrOut.PREEMPT, key=0xB, sa_key=0, pr_type=EA, nexus=OTHER),
                 S.INVALID_FIELD_IN_PARAMETER_LIST, 8, None, cd=False)


def test_preempt_the_holder(lu: LogicalUnit) -> None:
    register(lu, 0xA)
    register(lu, 0xB, OTHER)
    register(lu, 0xC, THIRD)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=WE).good
    assert prout(lu, PrOut.PREEMPT_AND_ABORT, key=0xB, sa_key=0xA, pr_type=EA_RO,
                 nexus=OTHER).good
    assert reservation(lu, OTHER) == (0xB, EA_RO)
    assert keys(lu, OTHER)[1] == [0xB, 0xC]
    assert pending_ua(lu, NEXUS) == [tuple(S.REGISTRATIONS_PREEMPTED)]
    # The type changed: the remaining registrant hears the old reservation is gone.
    assert pending_ua(lu, THIRD) == [tuple(S.RESERVATIONS_RELEASED)]
    assert conflict(read10(lu, 0, 1))
    assert read10(lu, 0, 1, nexus=THIRD).good


def test_preempt_all_registrants(lu: LogicalUnit) -> None:
    register(lu, 0xA)
    register(lu, 0xB, OTHER)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=WE_AR).good
    assert prout(lu, PrOut.PREEMPT, key=0xB, sa_key=0, pr_type=EA, nexus=OTHER).good
    assert reservation(lu, OTHER) == (0xB, EA)
    assert keys(lu, OTHER)[1] == [0xB]
    assert pending_ua(lu, NEXUS) == [tuple(S.REGISTRATIONS_PREEMPTED)]


def tid(name: str) -> bytes:
    raw = name.encode() + b"\x00"
    raw += bytes(-len(raw) % 4)
    raw += bytes(max(0, 20 - len(raw)))
    return bytes((0x45 if ",i,0x" in name else 0x05, 0)) + struct.pack(">H", len(raw)) + raw


def spec_i_pt(key: int, sa_key: int, *names: str, flags: int = 0x08) -> bytes:
    tids = b"".join(tid(n) for n in names)
    return struct.pack(">QQ4xBx2xI", key, sa_key, flags, len(tids)) + tids


def test_prout_parameter_checks(lu: LogicalUnit) -> None:
    assert_check(prout(lu, PrOut.REGISTER, parameters=bytes(20)), S.PARAMETER_LIST_LENGTH_ERROR)
    assert_check(prout(lu, PrOut.REGISTER, parameters=bytes(28)), S.PARAMETER_LIST_LENGTH_ERROR)
    # SPEC_I_PT needs its TransportID list, and is only for REGISTER.
    assert_check(prout(lu, PrOut.REGISTER, sa_key=1, flags=0x08), S.PARAMETER_LIST_LENGTH_ERROR)
    assert_check(prout(lu, PrOut.REGISTER_AND_IGNORE_EXISTING_KEY,
                       parameters=spec_i_pt(0, 1, INITIATOR_2)),
                 S.INVALID_FIELD_IN_PARAMETER_LIST, 20, 3, cd=False)
    bad = bytearray(spec_i_pt(0, 1, INITIATOR_2))
    bad[28] = 0x41  # FCP-4 protocol identifier: not an iSCSI TransportID
    assert_check(prout(lu, PrOut.REGISTER, parameters=bytes(bad)),
                 S.INVALID_FIELD_IN_PARAMETER_LIST, 28, None, cd=False)
    # APTPL on a RAM unit: it cannot persist through power loss.
    assert_check(prout(lu, PrOut.REGISTER, sa_key=1, flags=0x01),
                 S.INVALID_FIELD_IN_PARAMETER_LIST, 20, 0, cd=False)
    assert keys(lu) == (0, [])


def test_register_and_move(lu: LogicalUnit) -> None:
    register(lu, 0xA)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=EA).good
    tid = INITIATOR_2.encode() + b"\x00"
    tid += bytes(-len(tid) % 4)
    tid = bytes((0x45, 0)) + struct.pack(">H", len(tid)) + tid
    params = struct.pack(">QQxBHI", 0xA, 0xB, 0x02, 1, len(tid)) + tid  # UNREG
    assert prout(lu, PrOut.REGISTER_AND_MOVE, pr_type=EA, parameters=params).good
    assert reservation(lu) == (0xB, EA)
    assert keys(lu)[1] == [0xB]
    assert conflict(read10(lu, 0, 1))
    assert read10(lu, 0, 1, nexus=OTHER).good
    # Only the holder may move the reservation.
    assert conflict(prout(lu, PrOut.REGISTER_AND_MOVE, pr_type=EA, parameters=params))


def test_persistent_reservations_survive_resets_but_power_on(lu: LogicalUnit) -> None:
    register(lu, 0xA)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=EA).good
    lu.reset(ResetKind.LOGICAL_UNIT)
    lu.reset(ResetKind.TARGET)
    lu.nexus_gone(NEXUS)
    pending_ua(lu, OTHER)
    assert conflict(read10(lu, 0, 1, nexus=OTHER))
    lu.reset(ResetKind.POWER_ON)
    pending_ua(lu, OTHER)
    assert read10(lu, 0, 1, nexus=OTHER).good
    assert keys(lu, OTHER) == (0, [])


def test_aptpl_persists_and_restores(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    lu = make_lu(FileStore(path, BLOCKS * BS), clear=(NEXUS, OTHER))
    lu.nexus_opened(NEXUS, INITIATOR_1, TARGET_PORT)
    register(lu, 0xA, flags=0x01)
    register(lu, 0xB, OTHER)  # APTPL 0 from the latest REGISTER: not persisted
    sidecar = Path(f"{path}.pr.json")
    assert not sidecar.exists()
    register(lu, 0xB, OTHER, flags=0x01)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=WE_RO).good
    saved = json.loads(sidecar.read_text())
    assert saved["type"] == WE_RO and saved["holder"] == [INITIATOR_1, TARGET_PORT]

    again = make_lu(FileStore(path), clear=(NEXUS, OTHER, THIRD))
    again.nexus_opened(NEXUS, INITIATOR_1, TARGET_PORT)
    assert keys(again) == (3, [0xA, 0xB])
    assert reservation(again) == (0xA, WE_RO)
    assert prin(again, PrIn.REPORT_CAPABILITIES).data[3] & 0x01  # PTPL_A
    assert again._reserved
    assert conflict(write10(again, 0, bytes(BS), nexus=THIRD))
    # A power-on reloads what was saved.
    again.reset(ResetKind.POWER_ON)
    assert pending_ua(again, NEXUS) == [tuple(S.POWER_ON_OCCURRED)]
    assert reservation(again) == (0xA, WE_RO)
    # REGISTER with APTPL 0 stops persisting and removes the file.
    assert prout(again, PrOut.REGISTER, key=0xA, sa_key=0xA).good
    assert not sidecar.exists()


def test_corrupt_sidecar_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    Path(f"{path}.pr.json").write_text("{not json")
    lu = make_lu(FileStore(path, BLOCKS * BS))
    assert keys(lu) == (0, [])
    assert not lu._reserved


def test_conflict_check_costs_nothing_unreserved(lu: LogicalUnit) -> None:
    register(lu, 0xA)
    assert not lu._reserved  # registrations alone do not reserve
    assert write10(lu, 0, bytes(BS), nexus=OTHER).good


def test_unsupported_opcode_under_reservation(lu: LogicalUnit) -> None:
    assert reserve6(lu).good
    assert_check(run(lu, bytes((0xC5,)), nexus=OTHER), S.INVALID_OPCODE, 0, 7)


def test_bare_nexus_fallback_names() -> None:
    lu = make_lu(RamStore(BLOCKS), clear=(NEXUS, OTHER))
    register(lu, 0xA)
    register(lu, 0xB, OTHER)
    assert keys(lu)[1] == [0xA, 0xB]
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=EA).good
    assert conflict(read10(lu, 0, 1, nexus=OTHER))


def test_report_supported_operation_codes(lu: LogicalUnit) -> None:
    def one(opcode: int, action: int | None) -> bytes:
        options = 2 if action is not None else 1
        cdb = bytes((Op.MAINTENANCE_IN, 0x0C, options, opcode)) + struct.pack(
            ">HI", action or 0, 64) + b"\x00\x00"
        return run(lu, cdb, data_in=64).data

    assert one(Op.PERSISTENT_RESERVE_IN, PrIn.READ_FULL_STATUS) == (
        bytes((0, 0x03, 0, 10)) + bytes((0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x04)))
    assert one(Op.PERSISTENT_RESERVE_OUT, PrOut.REGISTER_AND_MOVE) == (
        bytes((0, 0x03, 0, 10)) + bytes((0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x04)))
    assert one(Op.PERSISTENT_RESERVE_IN, 4)[1] & 0x07 == 0x01  # not supported
    assert one(Op.RESERVE_6, None) == bytes((0, 0x03, 0, 6)) + bytes((0x16, 0x10, 0, 0, 0, 0x04))
    assert one(Op.RELEASE_10, None)[4:] == bytes((0x57, 0x10)) + bytes(7) + b"\x04"


def _move_parameters() -> bytes:
    tid = INITIATOR_2.encode() + b"\x00"
    tid += bytes(-len(tid) % 4)
    tid = bytes((0x45, 0)) + struct.pack(">H", len(tid)) + tid
    return struct.pack(">QQxBHI", 0xA, 0xB, 0, 1, len(tid)) + tid


def _usage_case(spec: CommandSpec) -> tuple[LogicalUnit, bytes, dict[str, Any]]:
    """A fresh unit set up so that ``spec`` succeeds, its CDB and how to run it."""
    unit = make_lu(clear=(NEXUS, OTHER))
    unit.nexus_opened(NEXUS, INITIATOR_1, TARGET_PORT)
    unit.nexus_opened(OTHER, INITIATOR_2, TARGET_PORT)
    cdb = bytearray(spec.cdb_length)
    cdb[0] = spec.opcode
    kw: dict[str, Any] = {}
    if spec.opcode == Op.PERSISTENT_RESERVE_IN:
        cdb[1] = int(spec.service_action or 0)
        cdb[8] = 0xFF
        kw["data_in"] = 0xFF
    elif spec.opcode == Op.PERSISTENT_RESERVE_OUT:
        action = int(spec.service_action or 0)
        cdb[1] = action
        cdb[2] = WE
        key, sa_key = 0xA, 0
        if action in (PrOut.REGISTER, PrOut.REGISTER_AND_IGNORE_EXISTING_KEY):
            key, sa_key = 0, 0x5
        else:
            register(unit, 0xA)
        if action in (PrOut.PREEMPT, PrOut.PREEMPT_AND_ABORT):
            register(unit, 0xB, OTHER)
            sa_key = 0xB
        if action in (PrOut.RELEASE, PrOut.REGISTER_AND_MOVE):
            assert prout(unit, PrOut.RESERVE, key=0xA, pr_type=WE).good
        data = (_move_parameters() if action == PrOut.REGISTER_AND_MOVE
                else struct.pack(">QQ8x", key, sa_key))
        cdb[5:9] = struct.pack(">I", len(data))
        kw["data_out"] = data
    return unit, bytes(cdb), kw


@pytest.mark.parametrize("spec", RESERVATION_COMMANDS, ids=lambda s: s.name)
def test_cdb_usage_data_of_reservation_commands(spec: CommandSpec) -> None:
    """Every CDB bit REPORT SUPPORTED OPERATION CODES calls unused really is ignored."""
    unit, cdb, kw = _usage_case(spec)
    reference = run(unit, cdb, **kw)
    assert reference.good, f"{spec.name}: {reference.srb.scsi_status} {reference.srb.sense!r}"
    for i in range(1, spec.cdb_length):
        for bit in range(8):
            if spec.usage[i] & (1 << bit):
                continue
            unit, _, kw = _usage_case(spec)
            variant = bytearray(cdb)
            variant[i] ^= 1 << bit
            r = run(unit, bytes(variant), **kw)
            assert (r.srb.scsi_status, r.srb.sense, r.data) == (
                reference.srb.scsi_status, reference.srb.sense, reference.data
            ), f"{spec.name}: byte {i} bit {bit} is reported unused but changes the outcome"


def test_random_reservation_traffic_keeps_the_flag_exact() -> None:
    """Whatever sequence of reservation commands runs, ``_reserved`` says whether anything is
    reserved (the per-command check is skipped when it is False)."""
    rng = random.Random(7)
    unit = make_lu(clear=(NEXUS, OTHER, THIRD))
    for _ in range(3000):
        nexus = rng.choice((NEXUS, OTHER, THIRD))
        choice = rng.random()
        if choice < 0.1:
            reserve6(unit, nexus)
        elif choice < 0.15:
            release6(unit, nexus)
        elif choice < 0.2:
            unit.reset(rng.choice(list(ResetKind)))
        elif choice < 0.25:
            unit.nexus_gone(nexus)
        else:
            prout(unit, rng.choice(list(PrOut)), key=rng.choice((0, 1, 2)),
                  sa_key=rng.choice((0, 1, 2)), pr_type=rng.choice((1, 3, 5, 6, 7, 8)),
                  nexus=nexus)
        expected = unit._spc2_holder is not None or unit._pr_type != 0
        assert unit._reserved is expected
        if unit._pr_type and unit._pr_type not in (7, 8):
            assert unit._pr_holder in unit._registrations
        if unit._pr_type in (7, 8):
            assert unit._registrations


def test_spec_i_pt_registers_more_initiator_ports(lu: LogicalUnit) -> None:
    device_3 = "iqn.2024-01.org.example:host3"
    assert prout(lu, PrOut.REGISTER, parameters=spec_i_pt(0, 0x77, INITIATOR_2, device_3)).good
    assert keys(lu) == (1, [0x77, 0x77, 0x77])
    lu.nexus_opened(THIRD, f"{device_3},i,0x400000000003", TARGET_PORT)
    assert prout(lu, PrOut.RESERVE, key=0x77, pr_type=WE_RO).good
    # Both other I_T nexuses are registrants now: they may write.
    assert write10(lu, 0, bytes(BS), nexus=OTHER).good
    assert write10(lu, 0, bytes(BS), nexus=THIRD).good
    # SPEC_I_PT from a registered I_T nexus is refused; so is naming a registered one.
    assert_check(prout(lu, PrOut.REGISTER, parameters=spec_i_pt(0x77, 0x78, device_3)),
                 S.INVALID_FIELD_IN_CDB)
    assert prout(lu, PrOut.REGISTER, key=0x77, sa_key=0, nexus=OTHER).good
    unit = make_lu(clear=(NEXUS, OTHER))
    unit.nexus_opened(NEXUS, INITIATOR_1, TARGET_PORT)
    unit.nexus_opened(OTHER, INITIATOR_2, TARGET_PORT)
    register(unit, 0x5, OTHER)
    assert_check(prout(unit, PrOut.REGISTER, parameters=spec_i_pt(0, 0x6, INITIATOR_2)),
                 S.INVALID_FIELD_IN_PARAMETER_LIST, 28, None, cd=False)
    assert keys(unit) == (1, [0x5])


def test_concurrent_reservation_traffic(tmp_path: Path) -> None:
    """PERSISTENT RESERVE OUT runs on DMA workers for file units, next to I/O on others: the
    state stays consistent and nothing crashes (a crash would be HARDWARE ERROR)."""
    unit = make_lu(FileStore(tmp_path / "d.img", BLOCKS * BS), clear=(NEXUS, OTHER, THIRD))
    errors: list[str] = []

    def worker(nexus: int, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(400):
            if rng.random() < 0.5:
                r = prout(unit, rng.choice(list(PrOut)), key=nexus, sa_key=nexus,
                          pr_type=rng.choice((1, 3, 5, 6, 7, 8)), nexus=nexus,
                          flags=rng.choice((0, 1)))
            else:
                r = read10(unit, 0, 1, nexus=nexus)
            status = r.srb.scsi_status
            if status is ScsiStatus.CHECK_CONDITION and r.sense.key == 0x4:
                errors.append(r.srb.sense.hex())

    threads = [threading.Thread(target=worker, args=(n, n)) for n in (NEXUS, OTHER, THIRD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert unit._reserved is (unit._spc2_holder is not None or unit._pr_type != 0)


def test_adapter_requests_are_not_bound_by_reservations(lu: LogicalUnit) -> None:
    """The port's own commands (negative nexus) still flush a reserved unit at shutdown."""
    register(lu, 0xA)
    assert prout(lu, PrOut.RESERVE, key=0xA, pr_type=EA).good
    internal = -1
    lu.establish_unit_attention(S.POWER_ON_RESET, nexus=internal)
    tur(lu, internal)
    sync = bytes((Op.SYNCHRONIZE_CACHE_10,)) + bytes(9)
    assert run(lu, sync, nexus=internal).good
    assert conflict(run(lu, sync, nexus=OTHER))
