"""CDB layouts and the per-I/O CDB decoder.

The layouts are declared once with construct: they document the bytes, let tests build CDBs by
field name, and cross-check the fast path. The per-I/O path (:func:`decode_into`) does not use
them: it is a table lookup keyed by opcode plus one precompiled ``struct`` unpack, several times
faster than construct's compiled parser for the same CDB (see ``bench/bench_cdb.py``).

Also here: SAM-5 LUN addressing (the 8-byte LUN field of REPORT LUNS data and iSCSI headers).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from construct import (
    BitsInteger,
    BitStruct,
    Const,
    Default,
    Flag,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Padding,
    Struct,
)

from emuhba.scsi import sense as _sense
from emuhba.scsi.opcodes import MaintenanceIn, Op, ServiceActionIn16, cdb_length_for_group
from emuhba.scsi.sense import SenseCode
from emuhba.srb import CdbFlags, DataDirection, Srb

# ---------------------------------------------------------------------------------------------
# Declared layouts (documentation, tests, non-hot paths)
# ---------------------------------------------------------------------------------------------

_control = "control" / Default(Int8ub, 0)


def _bits(*fields: Any) -> Any:
    """A one-byte BitStruct whose named fields default to zero when building."""
    return BitStruct(*fields)


def _z(name: str, width: int) -> Any:
    return name / Default(BitsInteger(width), 0)


def _f(name: str) -> Any:
    return name / Default(Flag, False)


def _rw_flags(protect: str, bit2: str) -> Any:
    # Byte 1 of READ/WRITE(10/12/16): xxPROTECT, DPO, FUA, RARC (read) or reserved (write), obsolete.
    return "flags" / Default(
        _bits(_z(protect, 3), _f("dpo"), _f("fua"), _f(bit2), _z("obsolete", 2)), {}
    )


def _verify_flags(protect: str) -> Any:
    # Byte 1 of VERIFY / WRITE AND VERIFY: xxPROTECT, DPO, reserved, BYTCHK (2 bits), obsolete.
    return "flags" / Default(
        _bits(_z(protect, 3), _f("dpo"), _z("reserved", 1), _z("bytchk", 2), _z("obsolete", 1)),
        {},
    )


_group = "group" / Default(_bits(_z("reserved", 3), _z("group_number", 5)), {})


def _rw6(op: Op) -> Struct:
    return Struct(
        "opcode" / Const(int(op), Int8ub),
        "address" / Default(_bits(_z("reserved", 3), _z("lba", 21)), {}),
        "transfer_length" / Default(Int8ub, 0),  # 0 means 256 blocks
        _control,
    )


def _rw10(op: Op, flags: Any) -> Struct:
    return Struct(
        "opcode" / Const(int(op), Int8ub),
        flags,
        "lba" / Default(Int32ub, 0),
        _group,
        "transfer_length" / Default(Int16ub, 0),
        _control,
    )


def _rw12(op: Op, flags: Any) -> Struct:
    return Struct(
        "opcode" / Const(int(op), Int8ub),
        flags,
        "lba" / Default(Int32ub, 0),
        "transfer_length" / Default(Int32ub, 0),
        _group,
        _control,
    )


def _rw16(op: Op, flags: Any) -> Struct:
    return Struct(
        "opcode" / Const(int(op), Int8ub),
        flags,
        "lba" / Default(Int64ub, 0),
        "transfer_length" / Default(Int32ub, 0),
        _group,
        _control,
    )


TEST_UNIT_READY = Struct("opcode" / Const(int(Op.TEST_UNIT_READY), Int8ub), Padding(4), _control)
REQUEST_SENSE = Struct(
    "opcode" / Const(int(Op.REQUEST_SENSE), Int8ub),
    "flags" / Default(_bits(_z("reserved", 7), _f("desc")), {}),
    Padding(2),
    "allocation_length" / Default(Int8ub, 0),
    _control,
)
READ_6 = _rw6(Op.READ_6)
WRITE_6 = _rw6(Op.WRITE_6)
READ_10 = _rw10(Op.READ_10, _rw_flags("rdprotect", "rarc"))
WRITE_10 = _rw10(Op.WRITE_10, _rw_flags("wrprotect", "reserved"))
READ_12 = _rw12(Op.READ_12, _rw_flags("rdprotect", "rarc"))
WRITE_12 = _rw12(Op.WRITE_12, _rw_flags("wrprotect", "reserved"))
READ_16 = _rw16(Op.READ_16, _rw_flags("rdprotect", "rarc"))
WRITE_16 = _rw16(Op.WRITE_16, _rw_flags("wrprotect", "reserved"))
VERIFY_10 = _rw10(Op.VERIFY_10, _verify_flags("vrprotect"))
VERIFY_12 = _rw12(Op.VERIFY_12, _verify_flags("vrprotect"))
VERIFY_16 = _rw16(Op.VERIFY_16, _verify_flags("vrprotect"))
WRITE_VERIFY_10 = _rw10(Op.WRITE_VERIFY_10, _verify_flags("wrprotect"))
WRITE_VERIFY_12 = _rw12(Op.WRITE_VERIFY_12, _verify_flags("wrprotect"))
WRITE_VERIFY_16 = _rw16(Op.WRITE_VERIFY_16, _verify_flags("wrprotect"))

_sync_flags = "flags" / Default(
    _bits(_z("reserved", 5), _f("sync_nv"), _f("immed"), _z("obsolete", 1)), {}
)
SYNCHRONIZE_CACHE_10 = Struct(
    "opcode" / Const(int(Op.SYNCHRONIZE_CACHE_10), Int8ub),
    _sync_flags,
    "lba" / Default(Int32ub, 0),
    _group,
    "number_of_blocks" / Default(Int16ub, 0),  # 0: through the last LBA
    _control,
)
SYNCHRONIZE_CACHE_16 = Struct(
    "opcode" / Const(int(Op.SYNCHRONIZE_CACHE_16), Int8ub),
    _sync_flags,
    "lba" / Default(Int64ub, 0),
    "number_of_blocks" / Default(Int32ub, 0),
    _group,
    _control,
)
INQUIRY = Struct(
    "opcode" / Const(int(Op.INQUIRY), Int8ub),
    "flags" / Default(_bits(_z("reserved", 6), _f("cmddt"), _f("evpd")), {}),
    "page_code" / Default(Int8ub, 0),
    "allocation_length" / Default(Int16ub, 0),
    _control,
)
_page = "page" / Default(_bits(_z("pc", 2), _z("page_code", 6)), {})
MODE_SENSE_6 = Struct(
    "opcode" / Const(int(Op.MODE_SENSE_6), Int8ub),
    "flags" / Default(_bits(_z("reserved", 4), _f("dbd"), _z("reserved2", 3)), {}),
    _page,
    "subpage_code" / Default(Int8ub, 0),
    "allocation_length" / Default(Int8ub, 0),
    _control,
)
MODE_SENSE_10 = Struct(
    "opcode" / Const(int(Op.MODE_SENSE_10), Int8ub),
    "flags" / Default(_bits(_z("reserved", 3), _f("llbaa"), _f("dbd"), _z("reserved2", 3)), {}),
    _page,
    "subpage_code" / Default(Int8ub, 0),
    Padding(3),
    "allocation_length" / Default(Int16ub, 0),
    _control,
)
_select_flags = "flags" / Default(
    _bits(_z("reserved", 3), _f("pf"), _z("reserved2", 3), _f("sp")), {}
)
MODE_SELECT_6 = Struct(
    "opcode" / Const(int(Op.MODE_SELECT_6), Int8ub),
    _select_flags,
    Padding(2),
    "parameter_list_length" / Default(Int8ub, 0),
    _control,
)
MODE_SELECT_10 = Struct(
    "opcode" / Const(int(Op.MODE_SELECT_10), Int8ub),
    _select_flags,
    Padding(5),
    "parameter_list_length" / Default(Int16ub, 0),
    _control,
)
START_STOP_UNIT = Struct(
    "opcode" / Const(int(Op.START_STOP_UNIT), Int8ub),
    "flags" / Default(_bits(_z("reserved", 7), _f("immed")), {}),
    Padding(1),
    "modifier" / Default(_bits(_z("reserved", 4), _z("power_condition_modifier", 4)), {}),
    "power"
    / Default(
        _bits(_z("power_condition", 4), _z("reserved", 1), _f("no_flush"), _f("loej"), _f("start")),
        {},
    ),
    _control,
)
PREVENT_ALLOW = Struct(
    "opcode" / Const(int(Op.PREVENT_ALLOW), Int8ub),
    Padding(3),
    "prevent" / Default(_bits(_z("reserved", 6), _z("prevent", 2)), {}),
    _control,
)
READ_CAPACITY_10 = Struct(
    "opcode" / Const(int(Op.READ_CAPACITY_10), Int8ub),
    Padding(1),
    "lba" / Default(Int32ub, 0),
    Padding(2),
    "flags" / Default(_bits(_z("reserved", 7), _f("pmi")), {}),
    _control,
)
READ_CAPACITY_16 = Struct(
    "opcode" / Const(int(Op.SERVICE_ACTION_IN_16), Int8ub),
    "action"
    / Default(
        _bits(
            _z("reserved", 3),
            "service_action" / Default(BitsInteger(5), int(ServiceActionIn16.READ_CAPACITY_16)),
        ),
        {},
    ),
    "lba" / Default(Int64ub, 0),
    "allocation_length" / Default(Int32ub, 0),
    "flags" / Default(_bits(_z("reserved", 7), _f("pmi")), {}),
    _control,
)
REPORT_LUNS = Struct(
    "opcode" / Const(int(Op.REPORT_LUNS), Int8ub),
    Padding(1),
    "select_report" / Default(Int8ub, 0),
    Padding(3),
    "allocation_length" / Default(Int32ub, 0),
    Padding(1),
    _control,
)
REPORT_SUPPORTED_OPCODES = Struct(
    "opcode" / Const(int(Op.MAINTENANCE_IN), Int8ub),
    "action"
    / Default(
        _bits(
            _z("reserved", 3),
            "service_action"
            / Default(BitsInteger(5), int(MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES)),
        ),
        {},
    ),
    "options" / Default(_bits(_f("rctd"), _z("reserved", 4), _z("reporting_options", 3)), {}),
    "requested_opcode" / Default(Int8ub, 0),
    "requested_service_action" / Default(Int16ub, 0),
    "allocation_length" / Default(Int32ub, 0),
    Padding(1),
    _control,
)

# Every declared layout by opcode (service-action opcodes map to the one service action we model).
LAYOUTS: dict[int, Struct] = {
    Op.TEST_UNIT_READY: TEST_UNIT_READY,
    Op.REQUEST_SENSE: REQUEST_SENSE,
    Op.READ_6: READ_6,
    Op.WRITE_6: WRITE_6,
    Op.INQUIRY: INQUIRY,
    Op.MODE_SELECT_6: MODE_SELECT_6,
    Op.MODE_SENSE_6: MODE_SENSE_6,
    Op.START_STOP_UNIT: START_STOP_UNIT,
    Op.PREVENT_ALLOW: PREVENT_ALLOW,
    Op.READ_CAPACITY_10: READ_CAPACITY_10,
    Op.READ_10: READ_10,
    Op.WRITE_10: WRITE_10,
    Op.WRITE_VERIFY_10: WRITE_VERIFY_10,
    Op.VERIFY_10: VERIFY_10,
    Op.SYNCHRONIZE_CACHE_10: SYNCHRONIZE_CACHE_10,
    Op.MODE_SELECT_10: MODE_SELECT_10,
    Op.MODE_SENSE_10: MODE_SENSE_10,
    Op.READ_16: READ_16,
    Op.WRITE_16: WRITE_16,
    Op.WRITE_VERIFY_16: WRITE_VERIFY_16,
    Op.VERIFY_16: VERIFY_16,
    Op.SYNCHRONIZE_CACHE_16: SYNCHRONIZE_CACHE_16,
    Op.SERVICE_ACTION_IN_16: READ_CAPACITY_16,
    Op.REPORT_LUNS: REPORT_LUNS,
    Op.MAINTENANCE_IN: REPORT_SUPPORTED_OPCODES,
    Op.READ_12: READ_12,
    Op.WRITE_12: WRITE_12,
    Op.WRITE_VERIFY_12: WRITE_VERIFY_12,
    Op.VERIFY_12: VERIFY_12,
}


# ---------------------------------------------------------------------------------------------
# Block-command field positions, shared by the decoder and by field pointers in sense data
# ---------------------------------------------------------------------------------------------


class BlockLayout(NamedTuple):
    """Where the LBA and the transfer length sit in a block command's CDB."""

    cdb_length: int
    lba_offset: int
    lba_bytes: int
    length_offset: int
    length_bytes: int


_L6 = BlockLayout(6, 1, 3, 4, 1)
_L10 = BlockLayout(10, 2, 4, 7, 2)
_L12 = BlockLayout(12, 2, 4, 6, 4)
_L16 = BlockLayout(16, 2, 8, 10, 4)

BLOCK_LAYOUTS: dict[int, BlockLayout] = {
    Op.READ_6: _L6,
    Op.WRITE_6: _L6,
    Op.READ_10: _L10,
    Op.WRITE_10: _L10,
    Op.WRITE_VERIFY_10: _L10,
    Op.VERIFY_10: _L10,
    Op.PRE_FETCH_10: _L10,
    Op.SYNCHRONIZE_CACHE_10: _L10,
    Op.WRITE_SAME_10: _L10,
    Op.READ_12: _L12,
    Op.WRITE_12: _L12,
    Op.WRITE_VERIFY_12: _L12,
    Op.VERIFY_12: _L12,
    Op.READ_16: _L16,
    Op.WRITE_16: _L16,
    Op.ORWRITE_16: _L16,
    Op.WRITE_VERIFY_16: _L16,
    Op.VERIFY_16: _L16,
    Op.PRE_FETCH_16: _L16,
    Op.SYNCHRONIZE_CACHE_16: _L16,
    Op.WRITE_SAME_16: _L16,
}

# ---------------------------------------------------------------------------------------------
# The per-I/O decoder
# ---------------------------------------------------------------------------------------------

# Byte 1 of a 10/12/16-byte block CDB and byte 0..3 of a 6-byte one, unpacked in one call each.
_UNPACK_6 = struct.Struct(">IB").unpack_from  # opcode + 21-bit LBA, transfer length
_UNPACK_10 = struct.Struct(">xBIxH").unpack_from  # flags, LBA, (group), transfer length
_UNPACK_12 = struct.Struct(">xBII").unpack_from  # flags, LBA, transfer length
_UNPACK_16 = struct.Struct(">xBQI").unpack_from  # flags, LBA, transfer length

_K6, _K10, _K12, _K16, _KSTART = 0, 1, 2, 3, 4


def _flag_table(mapper: Any) -> tuple[CdbFlags, ...]:
    # Building an IntFlag costs about a microsecond; look the 256 possible byte-1 values up instead.
    return tuple(CdbFlags(mapper(b)) for b in range(256))


def _rw_bits(b: int) -> int:
    return (CdbFlags.FUA if b & 0x08 else 0) | (CdbFlags.DPO if b & 0x10 else 0)


def _verify_bits(b: int) -> int:
    return (CdbFlags.DPO if b & 0x10 else 0) | (CdbFlags.BYTCHK if b & 0x06 else 0)


def _immed1_bits(b: int) -> int:
    return CdbFlags.IMMED if b & 0x02 else 0


def _immed0_bits(b: int) -> int:
    return CdbFlags.IMMED if b & 0x01 else 0


_RW_FLAGS = _flag_table(_rw_bits)
_VERIFY_FLAGS = _flag_table(_verify_bits)
_IMMED1_FLAGS = _flag_table(_immed1_bits)
_IMMED0_FLAGS = _flag_table(_immed0_bits)
_NO_FLAGS = _flag_table(lambda b: 0)

_Entry = tuple[int, int, tuple[CdbFlags, ...]]


def _build_decode_table() -> tuple[_Entry | None, ...]:
    table: list[_Entry | None] = [None] * 256
    kinds = {_L6: _K6, _L10: _K10, _L12: _K12, _L16: _K16}
    for op, layout in BLOCK_LAYOUTS.items():
        if op in (
            Op.READ_10,
            Op.READ_12,
            Op.READ_16,
            Op.WRITE_10,
            Op.WRITE_12,
            Op.WRITE_16,
            Op.ORWRITE_16,
        ):
            flags = _RW_FLAGS
        elif op in (
            Op.VERIFY_10,
            Op.VERIFY_12,
            Op.VERIFY_16,
            Op.WRITE_VERIFY_10,
            Op.WRITE_VERIFY_12,
            Op.WRITE_VERIFY_16,
        ):
            flags = _VERIFY_FLAGS
        elif op in (
            Op.SYNCHRONIZE_CACHE_10,
            Op.SYNCHRONIZE_CACHE_16,
            Op.PRE_FETCH_10,
            Op.PRE_FETCH_16,
        ):
            flags = _IMMED1_FLAGS
        else:
            flags = _NO_FLAGS
        table[op] = (kinds[layout], layout.cdb_length, flags)
    table[Op.START_STOP_UNIT] = (_KSTART, 6, _IMMED0_FLAGS)
    return tuple(table)


_DECODE = _build_decode_table()
_GROUP_LENGTH = tuple(cdb_length_for_group(op) for op in range(256))
_TRANSFER_256 = frozenset({Op.READ_6, Op.WRITE_6})
_NONE = CdbFlags.NONE


def decode_into(srb: Srb) -> SenseCode | None:
    """Fill ``srb.opcode``, ``lba``, ``transfer_blocks`` and ``cdb_flags`` from ``srb.cdb``.

    Non-block commands get lba 0 and transfer_blocks 0 (START STOP UNIT still reports IMMED).
    Returns None, or the sense code to fail the command with when the CDB is shorter than its
    opcode requires (INVALID OPERATION CODE for an empty CDB). Never raises; whether the opcode
    is supported is the logical unit's business, not the decoder's. A CDB longer than needed is
    normal: iSCSI carries every CDB in a 16-byte field.
    """
    cdb = srb.cdb
    n = len(cdb)
    if n == 0:
        srb.opcode = 0
        srb.lba = 0
        srb.transfer_blocks = 0
        srb.cdb_flags = _NONE
        return _sense.INVALID_OPCODE
    op = cdb[0]
    srb.opcode = op
    entry = _DECODE[op]
    if entry is None:
        srb.lba = 0
        srb.transfer_blocks = 0
        srb.cdb_flags = _NONE
        need = _GROUP_LENGTH[op]
        if op == Op.VARIABLE_LENGTH and n > 7:
            need += cdb[7]
        return _sense.INVALID_FIELD_IN_CDB if n < need else None
    kind, need, flags = entry
    if n < need:
        srb.lba = 0
        srb.transfer_blocks = 0
        srb.cdb_flags = _NONE
        return _sense.INVALID_FIELD_IN_CDB
    if kind == _K10:
        f, lba, length = _UNPACK_10(cdb)
    elif kind == _K16:
        f, lba, length = _UNPACK_16(cdb)
    elif kind == _K12:
        f, lba, length = _UNPACK_12(cdb)
    elif kind == _K6:
        head, length = _UNPACK_6(cdb)
        lba = head & 0x1FFFFF
        f = 0
        if length == 0 and op in _TRANSFER_256:
            length = 256
    else:  # START STOP UNIT: only IMMED matters to the port
        f, lba, length = cdb[1], 0, 0
    srb.lba = lba
    srb.transfer_blocks = length
    srb.cdb_flags = flags[f]
    srb.cdb_decoded = True
    return None


# ---------------------------------------------------------------------------------------------
# Data direction by opcode
# ---------------------------------------------------------------------------------------------

_IN = frozenset(
    {
        Op.REQUEST_SENSE,
        Op.READ_6,
        Op.INQUIRY,
        Op.MODE_SENSE_6,
        Op.RECEIVE_DIAGNOSTIC_RESULTS,
        Op.READ_CAPACITY_10,
        Op.READ_10,
        Op.READ_BUFFER,
        Op.LOG_SENSE,
        Op.MODE_SENSE_10,
        Op.PERSISTENT_RESERVE_IN,
        Op.RECEIVE_COPY_RESULTS,
        Op.READ_16,
        Op.SERVICE_ACTION_IN_16,
        Op.REPORT_LUNS,
        Op.SECURITY_PROTOCOL_IN,
        Op.MAINTENANCE_IN,
        Op.READ_12,
    }
)
_OUT = frozenset(
    {
        Op.FORMAT_UNIT,
        Op.WRITE_6,
        Op.MODE_SELECT_6,
        Op.SEND_DIAGNOSTIC,
        Op.WRITE_10,
        Op.WRITE_VERIFY_10,
        Op.VERIFY_10,
        Op.WRITE_BUFFER,
        Op.WRITE_SAME_10,
        Op.UNMAP,
        Op.LOG_SELECT,
        Op.MODE_SELECT_10,
        Op.PERSISTENT_RESERVE_OUT,
        Op.EXTENDED_COPY,
        Op.COMPARE_AND_WRITE,
        Op.WRITE_16,
        Op.ORWRITE_16,
        Op.WRITE_VERIFY_16,
        Op.VERIFY_16,
        Op.WRITE_SAME_16,
        Op.SERVICE_ACTION_OUT_16,
        Op.MAINTENANCE_OUT,
        Op.SECURITY_PROTOCOL_OUT,
        Op.WRITE_12,
        Op.WRITE_VERIFY_12,
        Op.VERIFY_12,
    }
)
_DIRECTION = tuple(
    DataDirection.IN if op in _IN else DataDirection.OUT if op in _OUT else DataDirection.NONE
    for op in range(256)
)


def expected_direction(opcode: int) -> DataDirection:
    """The direction data flows for ``opcode`` when it moves data at all.

    VERIFY is OUT because with BYTCHK set it carries data to compare; with BYTCHK clear it
    moves nothing. Unknown opcodes and commands without data are NONE.
    """
    return _DIRECTION[opcode & 0xFF]


# ---------------------------------------------------------------------------------------------
# SAM-5 LUN addressing
# ---------------------------------------------------------------------------------------------

MAX_FLAT_LUN = 0x3FFF


def encode_lun(lun: int) -> bytes:
    """The 8-byte LUN field for ``lun``: peripheral addressing below 256, flat space above.

    ValueError beyond 16383, which neither single-level method can address.
    """
    if 0 <= lun < 256:
        return bytes((0x00, lun, 0, 0, 0, 0, 0, 0))
    if 256 <= lun <= MAX_FLAT_LUN:
        return bytes((0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0))
    raise ValueError(f"LUN {lun} cannot be addressed with single-level peripheral/flat addressing")


def decode_lun(field: bytes | bytearray | memoryview) -> int | None:
    """The LUN in an 8-byte LUN field, or None when it uses a method or level we do not model."""
    if len(field) < 8:
        return None
    method = field[0] >> 6
    if any(field[2:8]):
        return None  # second- to fourth-level addressing
    if method == 0 and field[0] == 0:
        return int(field[1])
    if method == 1:
        return ((field[0] & 0x3F) << 8) | field[1]
    return None
