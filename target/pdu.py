"""iSCSI PDU layouts (RFC 7143 section 11).

Every Basic Header Segment is 48 bytes. The layouts are declared once with construct (``BHS_LAYOUTS``,
used by tests, tools and documentation); the per-I/O path packs and unpacks with one precompiled
``struct.Struct`` because every BHS shares the same word grid: four single bytes, the AHS/data length
word, an 8-byte LUN-or-ISID field and eight 32-bit words. Measured in bench/bench_pdu.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Final

import crc32c as _crc32c
from construct import BitsInteger as Bits
from construct import (
    BitStruct,
    Bitwise,
    Bytes,
    Const,
    Flag,
    Int8ub,
    Int16ub,
    Int24ub,
    Int32ub,
    Padding,
    Struct,
)

BHS_LEN: Final = 48
DIGEST_LEN: Final = 4
RESERVED_TAG: Final = 0xFFFFFFFF


class Opcode(IntEnum):
    # Initiator to target.
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    # Target to initiator.
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES: Final = frozenset(
    {Opcode.NOP_OUT, Opcode.SCSI_COMMAND, Opcode.TASK_MGMT_REQUEST, Opcode.LOGIN_REQUEST,
     Opcode.TEXT_REQUEST, Opcode.DATA_OUT, Opcode.LOGOUT_REQUEST, Opcode.SNACK_REQUEST}
)

IMMEDIATE_BIT: Final = 0x40
FINAL_BIT: Final = 0x80

# SCSI Command flags (byte 1).
CMD_READ: Final = 0x40
CMD_WRITE: Final = 0x20
CMD_ATTR_MASK: Final = 0x07

# Data-In flags (byte 1).
DATAIN_ACK: Final = 0x40
DATAIN_OVERFLOW: Final = 0x04
DATAIN_UNDERFLOW: Final = 0x02
DATAIN_STATUS: Final = 0x01

# SCSI Response flags (byte 1).
RESP_BIDI_OVERFLOW: Final = 0x10
RESP_BIDI_UNDERFLOW: Final = 0x08
RESP_OVERFLOW: Final = 0x04
RESP_UNDERFLOW: Final = 0x02

# Login / Text flags (byte 1).
LOGIN_TRANSIT: Final = 0x80
LOGIN_CONTINUE: Final = 0x40
TEXT_CONTINUE: Final = 0x40


class RejectReason(IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class TmfFunction(IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class LogoutReason(IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


class LogoutResponse(IntEnum):
    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class ScsiResponse(IntEnum):
    COMMAND_COMPLETED = 0x00
    TARGET_FAILURE = 0x01


class AsyncEvent(IntEnum):
    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUEST = 1
    DROP_CONNECTION = 2
    DROP_ALL_CONNECTIONS = 3
    RENEGOTIATE = 4


# ---------------------------------------------------------------------------------------------
# Declarative layouts (construct). Not used per I/O; they document the wire format once and let
# tests cross-check the struct fast path.

_opcode_byte = BitStruct("reserved" / Bits(1), "immediate" / Flag, "opcode" / Bits(6))

SCSI_COMMAND_BHS = Struct(
    "op" / _opcode_byte,
    "flags" / BitStruct("final" / Flag, "read" / Flag, "write" / Flag, Padding(2), "attr" / Bits(3)),
    Padding(2),
    "total_ahs_length" / Int8ub,
    "data_segment_length" / Int24ub,
    "lun" / Bytes(8),
    "itt" / Int32ub,
    "expected_data_transfer_length" / Int32ub,
    "cmdsn" / Int32ub,
    "exp_statsn" / Int32ub,
    "cdb" / Bytes(16),
)

DATA_OUT_BHS = Struct(
    "op" / _opcode_byte,
    "flags" / Int8ub,
    Padding(2),
    "total_ahs_length" / Int8ub,
    "data_segment_length" / Int24ub,
    "lun" / Bytes(8),
    "itt" / Int32ub,
    "ttt" / Int32ub,
    Padding(4),
    "exp_statsn" / Int32ub,
    Padding(4),
    "datasn" / Int32ub,
    "buffer_offset" / Int32ub,
    Padding(4),
)

DATA_IN_BHS = Struct(
    "op" / Const(Opcode.DATA_IN, Int8ub),
    "flags" / Int8ub,
    Padding(1),
    "status" / Int8ub,
    "total_ahs_length" / Int8ub,
    "data_segment_length" / Int24ub,
    "lun" / Bytes(8),
    "itt" / Int32ub,
    "ttt" / Int32ub,
    "statsn" / Int32ub,
    "exp_cmdsn" / Int32ub,
    "max_cmdsn" / Int32ub,
    "datasn" / Int32ub,
    "buffer_offset" / Int32ub,
    "residual_count" / Int32ub,
)

SCSI_RESPONSE_BHS = Struct(
    "op" / Const(Opcode.SCSI_RESPONSE, Int8ub),
    "flags" / Int8ub,
    "response" / Int8ub,
    "status" / Int8ub,
    "total_ahs_length" / Int8ub,
    "data_segment_length" / Int24ub,
    Padding(8),
    "itt" / Int32ub,
    "snack_tag" / Int32ub,
    "statsn" / Int32ub,
    "exp_cmdsn" / Int32ub,
    "max_cmdsn" / Int32ub,
    "exp_datasn" / Int32ub,
    "bidi_residual_count" / Int32ub,
    "residual_count" / Int32ub,
)

LOGIN_REQUEST_BHS = Struct(
    "op" / _opcode_byte,
    "flags" / BitStruct("transit" / Flag, "cont" / Flag, Padding(2), "csg" / Bits(2), "nsg" / Bits(2)),
    "version_max" / Int8ub,
    "version_min" / Int8ub,
    "total_ahs_length" / Int8ub,
    "data_segment_length" / Int24ub,
    "isid" / Bytes(6),
    "tsih" / Int16ub,
    "itt" / Int32ub,
    "cid" / Int16ub,
    Padding(2),
    "cmdsn" / Int32ub,
    "exp_statsn" / Int32ub,
    Padding(16),
)

LOGIN_RESPONSE_BHS = Struct(
    "op" / Const(Opcode.LOGIN_RESPONSE, Int8ub),
    "flags" / Int8ub,
    "version_max" / Int8ub,
    "version_active" / Int8ub,
    "total_ahs_length" / Int8ub,
    "data_segment_length" / Int24ub,
    "isid" / Bytes(6),
    "tsih" / Int16ub,
    "itt" / Int32ub,
    Padding(4),
    "statsn" / Int32ub,
    "exp_cmdsn" / Int32ub,
    "max_cmdsn" / Int32ub,
    "status_class" / Int8ub,
    "status_detail" / Int8ub,
    Padding(10),
)

BHS_LAYOUTS = {
    Opcode.SCSI_COMMAND: SCSI_COMMAND_BHS,
    Opcode.DATA_OUT: DATA_OUT_BHS,
    Opcode.DATA_IN: DATA_IN_BHS,
    Opcode.SCSI_RESPONSE: SCSI_RESPONSE_BHS,
    Opcode.LOGIN_REQUEST: LOGIN_REQUEST_BHS,
    Opcode.LOGIN_RESPONSE: LOGIN_RESPONSE_BHS,
}
del Bitwise  # imported for readers extending the layouts; not needed above

# ---------------------------------------------------------------------------------------------
# The fast path. One grid fits every BHS:
#   b0 b1 b2 b3 | ahs_len<<24 | data_segment_length | 8-byte field (LUN / ISID+TSIH) | w16 .. w44
BHS_GRID: Final = struct.Struct(">BBBBIQ8I")
_pack_bhs = BHS_GRID.pack_into
_unpack_bhs = BHS_GRID.unpack_from
_U32LE: Final = struct.Struct("<I")
# The digest codec, for per-PDU callers: DIGEST.pack(crc) -> the 4 bytes on the wire, and
# DIGEST.unpack_from(buffer, offset) -> (crc,) without slicing the buffer first.
DIGEST: Final = _U32LE

DSL_MASK: Final = 0x00FFFFFF


def pad4(n: int) -> int:
    """Bytes of padding after a data segment of ``n`` bytes."""
    return -n & 3


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    return int(_crc32c.crc32c(data, value))


# The C function itself, for per-PDU callers: crc32c() above adds a Python call to each digest.
crc32c_c: Final[Callable[..., int]] = _crc32c.crc32c


def digest_bytes(crc: int) -> bytes:
    """CRC32C digests travel least significant byte first (as the Linux crypto API emits them)."""
    return _U32LE.pack(crc)


def digest_value(raw: bytes | memoryview) -> int:
    return int(_U32LE.unpack_from(raw)[0])


def data_digest(parts: Sequence[bytes | bytearray | memoryview], length: int) -> int:
    """CRC32C over a data segment given as pieces, plus its zero padding."""
    crc = 0
    for part in parts:
        crc = _crc32c.crc32c(part, crc)
    pad = pad4(length)
    if pad:
        crc = _crc32c.crc32c(b"\0" * pad, crc)
    return int(crc)


def build_bhs(
    opcode: int,
    flags: int,
    b2: int = 0,
    b3: int = 0,
    data_length: int = 0,
    field8: int = 0,
    w16: int = 0,
    w20: int = 0,
    w24: int = 0,
    w28: int = 0,
    w32: int = 0,
    w36: int = 0,
    w40: int = 0,
    w44: int = 0,
) -> bytearray:
    """Pack one target BHS (no AHS: this target never sends one)."""
    buf = bytearray(BHS_LEN)
    _pack_bhs(buf, 0, opcode, flags, b2, b3, data_length, field8,
              w16, w20, w24, w28, w32, w36, w40, w44)
    return buf


def unpack_bhs(raw: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """(b0, b1, b2, b3, ahs_dsl, field8, w16, w20, w24, w28, w32, w36, w40, w44)."""
    return _unpack_bhs(raw, 0)


# ---------------------------------------------------------------------------------------------
# LUN field (SAM-5 single level): peripheral device addressing below 256, flat space above.

LUN_INVALID: Final = -1


def decode_lun(field8: int) -> int:
    """The LU number an 8-byte LUN field addresses, or LUN_INVALID for forms we do not serve."""
    if field8 & 0x0000FFFFFFFFFFFF:
        return LUN_INVALID  # second-level addressing: no such unit here
    b0 = field8 >> 56
    b1 = (field8 >> 48) & 0xFF
    method = b0 >> 6
    if method == 0:
        return b1 if b0 == 0 else LUN_INVALID  # bus identifier must be 0
    if method == 1:
        return ((b0 & 0x3F) << 8) | b1
    return LUN_INVALID


def encode_lun(lun: int) -> int:
    if lun < 256:
        return lun << 48
    return ((0x40 | (lun >> 8)) << 56) | ((lun & 0xFF) << 48)


def serial_lt(a: int, b: int) -> bool:
    """RFC 1982 serial number arithmetic, 32 bits: a < b."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def serial_le(a: int, b: int) -> bool:
    return a == b or serial_lt(a, b)
