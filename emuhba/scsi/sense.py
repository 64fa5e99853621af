"""Sense data: the (key, ASC, ASCQ) value type, builders for fixed (70h) and descriptor (72h)
format, and a parser used by tests and diagnostics (SPC-4 4.5).

Sense travels unmasked from the logical unit to the initiator, so what is built here is exactly
what the initiator decodes. Building is cached: a logical unit under a bad workload (reads past
the end, say) rebuilds the same few sense buffers over and over.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from emuhba.scsi import opcodes as _o
from emuhba.scsi.opcodes import SenseKey

FIXED_CURRENT = 0x70
FIXED_DEFERRED = 0x71
DESCRIPTOR_CURRENT = 0x72
DESCRIPTOR_DEFERRED = 0x73

FIXED_SENSE_LENGTH = 18

# Descriptor types (SPC-4 table "Sense data descriptor types").
DESC_INFORMATION = 0x00
DESC_SENSE_KEY_SPECIFIC = 0x02

_SKSV = 0x80
_CD = 0x40
_BPV = 0x08


class SenseCode(NamedTuple):
    """What went wrong, as the standard names it: sense key plus additional sense code/qualifier."""

    key: int
    asc: int
    ascq: int

    @classmethod
    def of(cls, key: SenseKey, pair: tuple[int, int]) -> SenseCode:
        return cls(int(key), pair[0], pair[1])

    def __str__(self) -> str:
        try:
            key = SenseKey(self.key).name
        except ValueError:
            key = f"0x{self.key:x}"
        return f"{key} {self.asc:02X}/{self.ascq:02X}"


_ILL = SenseKey.ILLEGAL_REQUEST
_UA = SenseKey.UNIT_ATTENTION

NO_SENSE = SenseCode.of(SenseKey.NO_SENSE, _o.ASC_NO_ADDITIONAL_SENSE)

# ILLEGAL REQUEST
INVALID_OPCODE = SenseCode.of(_ILL, _o.ASC_INVALID_COMMAND_OPERATION_CODE)
LBA_OUT_OF_RANGE = SenseCode.of(_ILL, _o.ASC_LBA_OUT_OF_RANGE)
INVALID_FIELD_IN_CDB = SenseCode.of(_ILL, _o.ASC_INVALID_FIELD_IN_CDB)
INVALID_FIELD_IN_PARAMETER_LIST = SenseCode.of(_ILL, _o.ASC_INVALID_FIELD_IN_PARAMETER_LIST)
PARAMETER_LIST_LENGTH_ERROR = SenseCode.of(_ILL, _o.ASC_PARAMETER_LIST_LENGTH_ERROR)
LU_NOT_SUPPORTED = SenseCode.of(_ILL, _o.ASC_LOGICAL_UNIT_NOT_SUPPORTED)
SAVING_PARAMETERS_NOT_SUPPORTED = SenseCode.of(_ILL, _o.ASC_SAVING_PARAMETERS_NOT_SUPPORTED)
INVALID_FIELD_IN_INFORMATION_UNIT = SenseCode.of(_ILL, _o.ASC_INVALID_FIELD_IN_INFORMATION_UNIT)

# NOT READY
MEDIUM_NOT_PRESENT = SenseCode.of(SenseKey.NOT_READY, _o.ASC_MEDIUM_NOT_PRESENT)
NOT_READY_INITIALIZING_COMMAND_REQUIRED = SenseCode.of(
    SenseKey.NOT_READY, _o.ASC_LU_NOT_READY_INITIALIZING_COMMAND_REQUIRED
)
# A stopped logical unit (START STOP UNIT with START=0) answers media access with this.
NOT_READY_STOPPED = NOT_READY_INITIALIZING_COMMAND_REQUIRED
NOT_READY_BECOMING_READY = SenseCode.of(SenseKey.NOT_READY, _o.ASC_LU_NOT_READY_BECOMING_READY)
NOT_READY_CAUSE_NOT_REPORTABLE = SenseCode.of(
    SenseKey.NOT_READY, _o.ASC_LU_NOT_READY_CAUSE_NOT_REPORTABLE
)

# DATA PROTECT, MEDIUM ERROR, MISCOMPARE, HARDWARE ERROR, ABORTED COMMAND
WRITE_PROTECTED = SenseCode.of(SenseKey.DATA_PROTECT, _o.ASC_WRITE_PROTECTED)
UNRECOVERED_READ_ERROR = SenseCode.of(SenseKey.MEDIUM_ERROR, _o.ASC_UNRECOVERED_READ_ERROR)
WRITE_ERROR = SenseCode.of(SenseKey.MEDIUM_ERROR, _o.ASC_WRITE_ERROR)
MISCOMPARE = SenseCode.of(SenseKey.MISCOMPARE, _o.ASC_MISCOMPARE_DURING_VERIFY)
INTERNAL_TARGET_FAILURE = SenseCode.of(SenseKey.HARDWARE_ERROR, _o.ASC_INTERNAL_TARGET_FAILURE)
OVERLAPPED_COMMANDS_ATTEMPTED = SenseCode.of(
    SenseKey.ABORTED_COMMAND, _o.ASC_OVERLAPPED_COMMANDS_ATTEMPTED
)

# UNIT ATTENTION
# 29/00 is what a brand-new I_T nexus sees first: initiators (libiscsi's connect, iscsi-ls) retry
# exactly this one after login, so it must not be replaced by the more specific 29/01.
POWER_ON_RESET = SenseCode.of(_UA, _o.ASC_POWER_ON_RESET_OR_BUS_DEVICE_RESET)
POWER_ON_OCCURRED = SenseCode.of(_UA, _o.ASC_POWER_ON_OCCURRED)
SCSI_BUS_RESET = SenseCode.of(_UA, _o.ASC_SCSI_BUS_RESET_OCCURRED)
BUS_DEVICE_RESET = SenseCode.of(_UA, _o.ASC_BUS_DEVICE_RESET_FUNCTION_OCCURRED)
# SAM-5: a LOGICAL UNIT RESET reports BUS DEVICE RESET FUNCTION OCCURRED.
LU_RESET = BUS_DEVICE_RESET
DEVICE_INTERNAL_RESET = SenseCode.of(_UA, _o.ASC_DEVICE_INTERNAL_RESET)
I_T_NEXUS_LOSS = SenseCode.of(_UA, _o.ASC_I_T_NEXUS_LOSS_OCCURRED)
MODE_PARAMETERS_CHANGED = SenseCode.of(_UA, _o.ASC_MODE_PARAMETERS_CHANGED)
CAPACITY_DATA_CHANGED = SenseCode.of(_UA, _o.ASC_CAPACITY_DATA_HAS_CHANGED)
COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = SenseCode.of(
    _UA, _o.ASC_COMMANDS_CLEARED_BY_ANOTHER_INITIATOR
)
INQUIRY_DATA_CHANGED = SenseCode.of(_UA, _o.ASC_INQUIRY_DATA_HAS_CHANGED)
REPORTED_LUNS_DATA_CHANGED = SenseCode.of(_UA, _o.ASC_REPORTED_LUNS_DATA_HAS_CHANGED)

# --- Reservations (miniports/lu_reservations.py) ---
RESERVATIONS_PREEMPTED = SenseCode(int(_UA), 0x2A, 0x03)
RESERVATIONS_RELEASED = SenseCode(int(_UA), 0x2A, 0x04)
REGISTRATIONS_PREEMPTED = SenseCode(int(_UA), 0x2A, 0x05)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION = SenseCode(int(_ILL), 0x26, 0x04)
INSUFFICIENT_REGISTRATION_RESOURCES = SenseCode(int(_ILL), 0x55, 0x04)
# --- end reservations ---

# --- Removable media, third-party copy (miniports/lu.py, miniports/lu_copy.py) ---
MEDIUM_REMOVAL_PREVENTED = SenseCode(int(_ILL), 0x53, 0x02)
TOO_MANY_TARGET_DESCRIPTORS = SenseCode(int(_ILL), 0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE = SenseCode(int(_ILL), 0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS = SenseCode(int(_ILL), 0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE = SenseCode(int(_ILL), 0x26, 0x09)
INLINE_DATA_LENGTH_EXCEEDED = SenseCode(int(_ILL), 0x26, 0x0B)
COPY_SEGMENT_GRANULARITY_VIOLATION = SenseCode(int(_ILL), 0x26, 0x0D)
OPERATION_IN_PROGRESS = SenseCode(int(_ILL), 0x00, 0x16)
# COPY ABORTED: the copy manager gave up on a segment (the copy target's own error is in the ASC).
COPY_ABORTED = SenseCode(int(SenseKey.COPY_ABORTED), 0x00, 0x00)
COPY_TARGET_DEVICE_NOT_REACHABLE = SenseCode(int(SenseKey.COPY_ABORTED), 0x0D, 0x02)
COPY_INCORRECT_TARGET_DEVICE_TYPE = SenseCode(int(SenseKey.COPY_ABORTED), 0x0D, 0x03)
# --- end removable media, third-party copy ---


def _sense_key_specific(
    code: SenseCode, field_pointer: int | None, cd: bool, bit_pointer: int | None
) -> bytes | None:
    if field_pointer is None:
        if bit_pointer is not None:
            raise ValueError("bit_pointer needs field_pointer")
        return None
    if code.key != SenseKey.ILLEGAL_REQUEST:
        # The field-pointer form of the sense-key-specific bytes belongs to ILLEGAL REQUEST only.
        raise ValueError("a field pointer is only defined for ILLEGAL REQUEST")
    if not 0 <= field_pointer <= 0xFFFF:
        raise ValueError(f"field pointer out of range: {field_pointer}")
    first = _SKSV | (_CD if cd else 0)
    if bit_pointer is not None:
        if not 0 <= bit_pointer <= 7:
            raise ValueError(f"bit pointer out of range: {bit_pointer}")
        first |= _BPV | bit_pointer
    return bytes((first, field_pointer >> 8, field_pointer & 0xFF))


@lru_cache(maxsize=512)
def build_sense(
    code: SenseCode,
    *,
    descriptor: bool = False,
    information: int | None = None,
    field_pointer: int | None = None,
    cd: bool = False,
    bit_pointer: int | None = None,
) -> bytes:
    """Sense data for ``code`` in fixed (70h) or descriptor (72h) format.

    ``information`` fills the INFORMATION field (the miscompare offset, say). ``field_pointer``
    (with ``cd``: True when it points into the CDB, False for the parameter list, and an optional
    ``bit_pointer``) fills the ILLEGAL REQUEST sense-key-specific bytes. Fixed format has only
    32 bits of INFORMATION; a larger value is reported with VALID=0 there and in full in the
    descriptor format.
    """
    sks = _sense_key_specific(code, field_pointer, cd, bit_pointer)
    if information is not None and not 0 <= information <= 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueError(f"information out of range: {information}")
    if descriptor:
        descriptors = b""
        if information is not None:
            descriptors += struct.pack(">BBBxQ", DESC_INFORMATION, 0x0A, 0x80, information)
        if sks is not None:
            descriptors += bytes((DESC_SENSE_KEY_SPECIFIC, 0x06, 0, 0)) + sks + b"\x00"
        header = bytes(
            (DESCRIPTOR_CURRENT, code.key & 0x0F, code.asc, code.ascq, 0, 0, 0, len(descriptors))
        )
        return header + descriptors
    buf = bytearray(FIXED_SENSE_LENGTH)
    buf[0] = FIXED_CURRENT
    buf[2] = code.key & 0x0F
    if information is not None and information <= 0xFFFF_FFFF:
        buf[0] |= 0x80  # VALID: the INFORMATION field means something
        struct.pack_into(">I", buf, 3, information)
    buf[7] = FIXED_SENSE_LENGTH - 8
    buf[12] = code.asc
    buf[13] = code.ascq
    if sks is not None:
        buf[15:18] = sks
    return bytes(buf)


@dataclass(frozen=True, slots=True)
class SenseData:
    """Decoded sense data (either format)."""

    response_code: int
    key: int
    asc: int
    ascq: int
    information: int | None = None
    field_pointer: int | None = None
    cd: bool | None = None
    bit_pointer: int | None = None

    @property
    def code(self) -> SenseCode:
        return SenseCode(self.key, self.asc, self.ascq)

    @property
    def descriptor(self) -> bool:
        return self.response_code in (DESCRIPTOR_CURRENT, DESCRIPTOR_DEFERRED)

    @property
    def deferred(self) -> bool:
        return self.response_code in (FIXED_DEFERRED, DESCRIPTOR_DEFERRED)


def _decode_sks(sks: bytes | memoryview) -> tuple[int | None, bool | None, int | None]:
    if not sks[0] & _SKSV:
        return None, None, None
    bit = sks[0] & 0x07 if sks[0] & _BPV else None
    return (sks[1] << 8) | sks[2], bool(sks[0] & _CD), bit


def parse_sense(data: bytes | bytearray | memoryview) -> SenseData:
    """Decode fixed or descriptor sense data; ValueError when it is neither or is cut short."""
    data = bytes(data)
    if len(data) < 2:
        raise ValueError("sense data shorter than 2 bytes")
    response_code = data[0] & 0x7F
    if response_code in (FIXED_CURRENT, FIXED_DEFERRED):
        if len(data) < 14:
            raise ValueError(f"fixed sense data too short: {len(data)} bytes")
        if data[7] + 8 > len(data):
            raise ValueError("fixed sense additional length runs past the buffer")
        information = struct.unpack_from(">I", data, 3)[0] if data[0] & 0x80 else None
        fp = cd = bit = None
        if len(data) >= 18 and data[7] >= 10:
            fp, cd, bit = _decode_sks(data[15:18])
        return SenseData(
            response_code, data[2] & 0x0F, data[12], data[13], information, fp, cd, bit
        )
    if response_code in (DESCRIPTOR_CURRENT, DESCRIPTOR_DEFERRED):
        if len(data) < 8:
            raise ValueError(f"descriptor sense data too short: {len(data)} bytes")
        end = 8 + data[7]
        if end > len(data):
            raise ValueError("descriptor sense additional length runs past the buffer")
        information = None
        fp = cd = bit = None
        pos = 8
        while pos < end:
            if pos + 2 > end:
                raise ValueError("truncated sense data descriptor header")
            dtype, dlen = data[pos], data[pos + 1]
            body = data[pos + 2 : pos + 2 + dlen]
            if len(body) != dlen:
                raise ValueError("truncated sense data descriptor")
            if dtype == DESC_INFORMATION and dlen >= 0x0A and body[0] & 0x80:
                information = struct.unpack_from(">Q", body, 2)[0]
            elif dtype == DESC_SENSE_KEY_SPECIFIC and dlen >= 0x06:
                fp, cd, bit = _decode_sks(body[2:5])
            pos += 2 + dlen
        return SenseData(response_code, data[1] & 0x0F, data[2], data[3], information, fp, cd, bit)
    raise ValueError(f"unknown sense response code 0x{response_code:02x}")
