"""The per-I/O CDB decoder, cross-checked against the construct layouts, plus LUN addressing.

Decoder speed (bench/bench_cdb.py, READ(10), ns per CDB including storing the fields on the Srb,
development VM, CPython 3.11): construct interpreted ~58,000; construct compiled ~43,000;
construct compiled with a byte-aligned layout and no bit fields ~9,500; struct.unpack_from
alone ~130; decode_into ~270. Hence struct on the per-I/O path.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emuhba.scsi import cdb as C
from emuhba.scsi import sense as S
from emuhba.scsi.cdb import decode_into, decode_lun, encode_lun, expected_direction
from emuhba.scsi.opcodes import Op, cdb_length_for_group
from emuhba.srb import CdbFlags, DataDirection, Srb


def decoded(cdb: bytes) -> Srb:
    srb = Srb(cdb=cdb)
    srb.lba = -1
    srb.transfer_blocks = -1
    assert decode_into(srb) is None
    return srb


@pytest.mark.parametrize("layout", [C.READ_6, C.WRITE_6])
def test_six_byte_transfer_length_zero_means_256(layout: object) -> None:
    cdb = C.READ_6.build(dict(address=dict(lba=0x1ABCDE), transfer_length=0))
    if layout is C.WRITE_6:
        cdb = bytes((Op.WRITE_6,)) + cdb[1:]
    srb = decoded(cdb)
    assert (srb.lba, srb.transfer_blocks, srb.cdb_flags) == (0x1ABCDE, 256, CdbFlags.NONE)
    srb = decoded(cdb[:4] + b"\x07" + cdb[5:])
    assert srb.transfer_blocks == 7


def test_ten_byte_transfer_length_zero_means_zero() -> None:
    srb = decoded(C.READ_10.build(dict(lba=77, transfer_length=0)))
    assert (srb.opcode, srb.lba, srb.transfer_blocks) == (Op.READ_10, 77, 0)


@pytest.mark.parametrize(
    ("layout", "lba", "length"),
    [
        (C.READ_10, 0xFFFFFFFF, 0xFFFF),
        (C.WRITE_10, 1, 2),
        (C.READ_12, 0x12345678, 0x9ABCDEF0),
        (C.WRITE_12, 3, 4),
        (C.READ_16, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF),
        (C.WRITE_16, 2**40, 8),
    ],
)
def test_read_write_fields_and_flags(layout: object, lba: int, length: int) -> None:
    build = layout.build  # type: ignore[attr-defined]
    plain = decoded(build(dict(lba=lba, transfer_length=length)))
    assert (plain.lba, plain.transfer_blocks, plain.cdb_flags) == (lba, length, CdbFlags.NONE)
    fua = decoded(build(dict(lba=lba, transfer_length=length, flags=dict(fua=True))))
    assert fua.cdb_flags == CdbFlags.FUA
    both = decoded(build(dict(lba=lba, transfer_length=length, flags=dict(fua=True, dpo=True))))
    assert both.cdb_flags == CdbFlags.FUA | CdbFlags.DPO


def test_verify_bytchk_and_dpo() -> None:
    srb = decoded(C.VERIFY_16.build(dict(lba=5, transfer_length=3, flags=dict(bytchk=1, dpo=True))))
    assert (srb.lba, srb.transfer_blocks) == (5, 3)
    assert srb.cdb_flags == CdbFlags.BYTCHK | CdbFlags.DPO
    assert decoded(C.VERIFY_10.build(dict(lba=5, transfer_length=3))).cdb_flags == CdbFlags.NONE
    assert decoded(C.WRITE_VERIFY_12.build(dict(flags=dict(bytchk=1)))).cdb_flags == CdbFlags.BYTCHK


def test_immed_bits() -> None:
    sync = decoded(
        C.SYNCHRONIZE_CACHE_10.build(dict(lba=9, number_of_blocks=4, flags=dict(immed=True)))
    )
    assert (sync.lba, sync.transfer_blocks, sync.cdb_flags) == (9, 4, CdbFlags.IMMED)
    sync16 = decoded(C.SYNCHRONIZE_CACHE_16.build(dict(lba=2**33, number_of_blocks=0)))
    assert (sync16.lba, sync16.transfer_blocks, sync16.cdb_flags) == (2**33, 0, CdbFlags.NONE)
    start = decoded(C.START_STOP_UNIT.build(dict(flags=dict(immed=True), power=dict(start=True))))
    assert (start.lba, start.transfer_blocks, start.cdb_flags) == (0, 0, CdbFlags.IMMED)


def test_non_block_command_clears_decoded_fields() -> None:
    srb = decoded(C.INQUIRY.build(dict(allocation_length=96)))
    assert (srb.opcode, srb.lba, srb.transfer_blocks, srb.cdb_flags) == (
        Op.INQUIRY,
        0,
        0,
        CdbFlags.NONE,
    )


def test_padded_cdb_decodes_like_the_short_one() -> None:
    # iSCSI carries every CDB in a 16-byte field.
    cdb = C.READ_6.build(dict(address=dict(lba=1000), transfer_length=8))
    srb = decoded(cdb + bytes(10))
    assert (srb.lba, srb.transfer_blocks) == (1000, 8)


def test_empty_and_short_cdbs() -> None:
    assert decode_into(Srb(cdb=b"")) == S.INVALID_OPCODE
    assert decode_into(Srb(cdb=bytes((Op.READ_10, 0, 0, 0)))) == S.INVALID_FIELD_IN_CDB
    assert decode_into(Srb(cdb=bytes((Op.READ_16,)) + bytes(14))) == S.INVALID_FIELD_IN_CDB
    assert decode_into(Srb(cdb=bytes((Op.INQUIRY, 1, 0x80)))) == S.INVALID_FIELD_IN_CDB
    assert decode_into(Srb(cdb=bytes((Op.VARIABLE_LENGTH,)) + bytes(6) + b"\x10" + bytes(8))) == (
        S.INVALID_FIELD_IN_CDB
    )
    # A vendor-specific group: nothing says how long it is.
    assert decode_into(Srb(cdb=b"\xc0")) is None


def _flags_of(parsed: object) -> CdbFlags:
    flags = CdbFlags.NONE
    f = getattr(parsed, "flags", None)
    if f is None:
        return flags
    if getattr(f, "fua", False):
        flags |= CdbFlags.FUA
    if getattr(f, "dpo", False):
        flags |= CdbFlags.DPO
    if getattr(f, "bytchk", 0):
        flags |= CdbFlags.BYTCHK
    if getattr(f, "immed", False):
        flags |= CdbFlags.IMMED
    return flags


_BLOCK_LAYOUTS = {
    op: layout
    for op, layout in C.LAYOUTS.items()
    if op in C.BLOCK_LAYOUTS or op == Op.START_STOP_UNIT
}


@given(op=st.sampled_from(sorted(_BLOCK_LAYOUTS)), body=st.binary(min_size=15, max_size=15))
def test_struct_decoder_agrees_with_construct(op: int, body: bytes) -> None:
    cdb = bytes((op,)) + body
    layout = _BLOCK_LAYOUTS[op]
    parsed = layout.parse(cdb)
    srb = decoded(cdb)
    if op in (Op.READ_6, Op.WRITE_6):
        lba, length = parsed.address.lba, parsed.transfer_length or 256
    elif op == Op.START_STOP_UNIT:
        lba, length = 0, 0
    elif "number_of_blocks" in parsed:
        lba, length = parsed.lba, parsed.number_of_blocks
    else:
        lba, length = parsed.lba, parsed.transfer_length
    assert (srb.lba, srb.transfer_blocks, srb.cdb_flags) == (lba, length, _flags_of(parsed))


@given(st.binary(min_size=0, max_size=32))
def test_decoder_never_raises(cdb: bytes) -> None:
    srb = Srb(cdb=cdb)
    result = decode_into(srb)
    assert result is None or result in (S.INVALID_OPCODE, S.INVALID_FIELD_IN_CDB)
    if cdb:
        assert srb.opcode == cdb[0]


@pytest.mark.parametrize(("op", "layout"), sorted(C.LAYOUTS.items()))
def test_layouts_have_the_group_length_and_round_trip(op: int, layout: object) -> None:
    built = layout.build({})  # type: ignore[attr-defined]
    assert built[0] == op
    assert len(built) == cdb_length_for_group(op)
    assert layout.build(layout.parse(built)) == built  # type: ignore[attr-defined]


def test_layout_field_positions() -> None:
    cdb = C.READ_CAPACITY_16.build(dict(allocation_length=32))
    assert cdb == bytes.fromhex("9e10") + bytes(8) + (32).to_bytes(4, "big") + bytes(2)
    cdb = C.REPORT_SUPPORTED_OPCODES.build(
        dict(
            options=dict(rctd=True, reporting_options=2),
            requested_opcode=0x9E,
            requested_service_action=0x10,
            allocation_length=512,
        )
    )
    assert cdb == bytes.fromhex("a30c829e0010") + (512).to_bytes(4, "big") + bytes(2)
    cdb = C.MODE_SENSE_10.build(
        dict(
            flags=dict(llbaa=True, dbd=True),
            page=dict(pc=1, page_code=0x3F),
            allocation_length=0x1234,
        )
    )
    assert cdb == bytes.fromhex("5a187f00000000123400")


def test_expected_direction() -> None:
    assert expected_direction(Op.READ_10) is DataDirection.IN
    assert expected_direction(Op.INQUIRY) is DataDirection.IN
    assert expected_direction(Op.REPORT_LUNS) is DataDirection.IN
    assert expected_direction(Op.WRITE_16) is DataDirection.OUT
    assert expected_direction(Op.MODE_SELECT_10) is DataDirection.OUT
    assert expected_direction(Op.VERIFY_12) is DataDirection.OUT
    assert expected_direction(Op.TEST_UNIT_READY) is DataDirection.NONE
    assert expected_direction(Op.SYNCHRONIZE_CACHE_10) is DataDirection.NONE
    assert expected_direction(0xC5) is DataDirection.NONE


@pytest.mark.parametrize(
    ("lun", "field"),
    [
        (0, "0000000000000000"),
        (7, "0007000000000000"),
        (255, "00ff000000000000"),
        (256, "4100000000000000"),
        (0x3FFF, "7fff000000000000"),
    ],
)
def test_lun_encoding(lun: int, field: str) -> None:
    assert encode_lun(lun).hex() == field
    assert decode_lun(bytes.fromhex(field)) == lun


def test_lun_limits() -> None:
    with pytest.raises(ValueError):
        encode_lun(0x4000)
    with pytest.raises(ValueError):
        encode_lun(-1)
    assert decode_lun(bytes.fromhex("0001000100000000")) is None  # second level
    assert decode_lun(bytes.fromhex("0105000000000000")) is None  # bus 1
    assert decode_lun(bytes.fromhex("c000000000000000")) is None  # extended/well-known
    assert decode_lun(b"\x00") is None


@given(st.integers(0, 0x3FFF))
def test_lun_round_trip(lun: int) -> None:
    assert decode_lun(encode_lun(lun)) == lun
