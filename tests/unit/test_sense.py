"""Sense data builders and parser: exact bytes for both formats, and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emuhba.scsi import sense as S
from emuhba.scsi.opcodes import SenseKey
from emuhba.scsi.sense import SenseCode, build_sense, parse_sense


def test_named_codes_have_the_standard_values() -> None:
    assert S.INVALID_OPCODE == (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
    assert S.LBA_OUT_OF_RANGE == (5, 0x21, 0x00)
    assert S.INVALID_FIELD_IN_CDB == (5, 0x24, 0x00)
    assert S.INVALID_FIELD_IN_PARAMETER_LIST == (5, 0x26, 0x00)
    assert S.PARAMETER_LIST_LENGTH_ERROR == (5, 0x1A, 0x00)
    assert S.LU_NOT_SUPPORTED == (5, 0x25, 0x00)
    assert S.SAVING_PARAMETERS_NOT_SUPPORTED == (5, 0x39, 0x00)
    assert S.POWER_ON_RESET == (6, 0x29, 0x00)
    assert S.POWER_ON_OCCURRED == (6, 0x29, 0x01)
    assert S.SCSI_BUS_RESET == (6, 0x29, 0x02)
    assert S.BUS_DEVICE_RESET == S.LU_RESET == (6, 0x29, 0x03)
    assert S.I_T_NEXUS_LOSS == (6, 0x29, 0x07)
    assert S.WRITE_PROTECTED == (7, 0x27, 0x00)
    assert S.MEDIUM_NOT_PRESENT == (2, 0x3A, 0x00)
    assert S.NOT_READY_STOPPED == (2, 0x04, 0x02)
    assert S.UNRECOVERED_READ_ERROR == (3, 0x11, 0x00)
    assert S.MISCOMPARE == (0xE, 0x1D, 0x00)
    assert S.REPORTED_LUNS_DATA_CHANGED == (6, 0x3F, 0x0E)
    assert S.MODE_PARAMETERS_CHANGED == (6, 0x2A, 0x01)
    assert S.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR == (6, 0x2F, 0x00)
    assert str(S.INVALID_FIELD_IN_CDB) == "ILLEGAL_REQUEST 24/00"


def test_fixed_format_bytes() -> None:
    data = build_sense(S.LBA_OUT_OF_RANGE)
    assert data == bytes.fromhex("700005000000000a00000000210000000000")
    assert len(data) == 18


def test_fixed_format_information_and_field_pointer() -> None:
    data = build_sense(
        S.INVALID_FIELD_IN_CDB, information=0x01020304, field_pointer=0x0102, cd=True, bit_pointer=7
    )
    assert data[0] == 0xF0  # VALID | 70h
    assert data[3:7] == bytes((1, 2, 3, 4))
    # SKSV | C/D | BPV | bit 7, then the field pointer.
    assert data[15:18] == bytes((0xCF, 0x01, 0x02))


def test_fixed_format_parameter_list_pointer_without_bit() -> None:
    data = build_sense(S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=14, cd=False)
    assert data[15:18] == bytes((0x80, 0x00, 0x0E))


def test_fixed_format_drops_information_that_does_not_fit() -> None:
    data = build_sense(S.MISCOMPARE, information=1 << 40)
    assert data[0] == 0x70  # VALID clear: 32 bits cannot hold it
    assert parse_sense(data).information is None
    assert (
        parse_sense(build_sense(S.MISCOMPARE, information=1 << 40, descriptor=True)).information
        == 1 << 40
    )


def test_descriptor_format_bytes() -> None:
    data = build_sense(
        S.INVALID_FIELD_IN_CDB, descriptor=True, information=9, field_pointer=2, cd=True
    )
    assert data[:8] == bytes((0x72, 0x05, 0x24, 0x00, 0, 0, 0, 20))
    assert data[8:20] == bytes((0x00, 0x0A, 0x80, 0x00)) + (9).to_bytes(8, "big")
    assert data[20:28] == bytes((0x02, 0x06, 0, 0, 0xC0, 0x00, 0x02, 0x00))
    assert len(data) == 28


def test_descriptor_format_without_descriptors() -> None:
    assert build_sense(S.POWER_ON_RESET, descriptor=True) == bytes((0x72, 6, 0x29, 0, 0, 0, 0, 0))


def test_field_pointer_only_for_illegal_request() -> None:
    with pytest.raises(ValueError):
        build_sense(S.MISCOMPARE, field_pointer=1)
    with pytest.raises(ValueError):
        build_sense(S.INVALID_FIELD_IN_CDB, bit_pointer=3)
    with pytest.raises(ValueError):
        build_sense(S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=8)
    with pytest.raises(ValueError):
        build_sense(S.INVALID_FIELD_IN_CDB, field_pointer=0x10000)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x70",
        bytes(18),  # response code 0
        b"\x70" + bytes(5),  # fixed, too short
        bytes((0x70, 0, 5, 0, 0, 0, 0, 40)) + bytes(10),  # additional length runs past the end
        bytes((0x72, 5, 0x24, 0, 0, 0, 0, 12)) + bytes(4),  # descriptor length runs past
        bytes((0x72, 5, 0x24, 0, 0, 0, 0, 3, 0x00, 0x0A, 0x80)),  # truncated descriptor
    ],
)
def test_parse_rejects_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_sense(data)


codes = st.builds(SenseCode, st.integers(0, 15), st.integers(0, 255), st.integers(0, 255))


@given(
    code=codes,
    descriptor=st.booleans(),
    information=st.none() | st.integers(0, 2**64 - 1),
    pointer=st.none()
    | st.tuples(st.integers(0, 0xFFFF), st.booleans(), st.none() | st.integers(0, 7)),
)
def test_round_trip(
    code: SenseCode,
    descriptor: bool,
    information: int | None,
    pointer: tuple[int, bool, int | None] | None,
) -> None:
    fp: int | None = None
    cd: bool | None = None
    bit: int | None = None
    if pointer is not None:
        code = SenseCode(int(SenseKey.ILLEGAL_REQUEST), code.asc, code.ascq)
        fp, cd, bit = pointer
        data = build_sense(
            code,
            descriptor=descriptor,
            information=information,
            field_pointer=fp,
            cd=bool(cd),
            bit_pointer=bit,
        )
    else:
        data = build_sense(code, descriptor=descriptor, information=information)
    parsed = parse_sense(data)
    assert parsed.code == code
    assert parsed.descriptor is descriptor
    assert not parsed.deferred
    if descriptor or information is None or information <= 0xFFFFFFFF:
        assert parsed.information == information
    assert parsed.field_pointer == fp
    assert parsed.cd == cd
    assert parsed.bit_pointer == bit
