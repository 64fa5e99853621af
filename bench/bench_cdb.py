"""READ(10) CDB decode: construct (interpreted and compiled) against the struct fast path.

Run: .venv/bin/python bench/bench_cdb.py
Each figure is the best of 5 runs, in nanoseconds per CDB, including storing the decoded fields
on an Srb the way the port needs them.
"""

from __future__ import annotations

import struct
import timeit

from construct import Int8ub, Int16ub, Int32ub, Struct

from emuhba.scsi.cdb import READ_10, decode_into
from emuhba.srb import CdbFlags, Srb

CDB = READ_10.build(dict(lba=0x12345678, transfer_length=256, flags=dict(fua=True))) + bytes(6)
N = 200_000

compiled = READ_10.compile()
# The friendliest case for construct: byte-aligned fields only, no BitStruct, no defaults.
flat = Struct(
    "opcode" / Int8ub,
    "flags" / Int8ub,
    "lba" / Int32ub,
    "group" / Int8ub,
    "transfer_length" / Int16ub,
    "control" / Int8ub,
).compile()
unpack10 = struct.Struct(">xBIxH").unpack_from
srb = Srb(cdb=CDB)


def with_construct_interpreted() -> None:
    c = READ_10.parse(CDB)
    srb.lba = c.lba
    srb.transfer_blocks = c.transfer_length
    srb.cdb_flags = CdbFlags(
        (CdbFlags.FUA if c.flags.fua else 0) | (CdbFlags.DPO if c.flags.dpo else 0)
    )


def with_construct_compiled() -> None:
    c = compiled.parse(CDB)
    srb.lba = c.lba
    srb.transfer_blocks = c.transfer_length
    srb.cdb_flags = CdbFlags(
        (CdbFlags.FUA if c.flags.fua else 0) | (CdbFlags.DPO if c.flags.dpo else 0)
    )


def with_construct_compiled_flat() -> None:
    c = flat.parse(CDB)
    srb.lba = c.lba
    srb.transfer_blocks = c.transfer_length
    srb.cdb_flags = CdbFlags(
        (CdbFlags.FUA if c.flags & 8 else 0) | (CdbFlags.DPO if c.flags & 16 else 0)
    )


def with_struct_only() -> None:
    _flags, lba, length = unpack10(CDB)
    srb.lba = lba
    srb.transfer_blocks = length


def with_decode_into() -> None:
    decode_into(srb)


def main() -> None:
    for name, fn in (
        ("construct, interpreted", with_construct_interpreted),
        ("construct, compiled", with_construct_compiled),
        ("construct, compiled, flat layout", with_construct_compiled_flat),
        ("struct.unpack_from alone", with_struct_only),
        ("decode_into (struct + table)", with_decode_into),
    ):
        best = min(timeit.repeat(fn, number=N, repeat=5)) / N * 1e9
        print(f"{name:32s} {best:8.0f} ns")


if __name__ == "__main__":
    main()
