"""The SCSI command layer: opcodes, sense data, CDB layouts and the per-I/O CDB decoder."""

from emuhba.scsi.cdb import decode_into, decode_lun, encode_lun, expected_direction
from emuhba.scsi.opcodes import Op, SenseKey
from emuhba.scsi.sense import SenseCode, SenseData, build_sense, parse_sense

__all__ = [
    "Op",
    "SenseCode",
    "SenseData",
    "SenseKey",
    "build_sense",
    "decode_into",
    "decode_lun",
    "encode_lun",
    "expected_direction",
    "parse_sense",
]
