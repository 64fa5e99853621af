"""The logical unit's command set, driven with real CDBs against real stores.

CDBs are built from the construct layouts in emuhba.scsi.cdb, so a wrong byte offset in either
the layouts or the logical unit shows up as a failure here.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emuhba.scsi import cdb as C
from emuhba.scsi import sense as S
from emuhba.scsi.opcodes import Op, SenseKey
from emuhba.scsi.sense import SenseCode, SenseData, parse_sense
from emuhba.srb import DataDirection, ResetKind, ScsiStatus, Srb, SrbStatus
from miniports.lu import _BASE_COMMANDS, COMMANDS, EMUHBA_COMPANY_ID, LogicalUnit, make_naa_id
from miniports.lu_copy import COPY_COMMANDS
from miniports.store import BlockStore, FileStore, RamStore

BS = 512
BLOCKS = 2048
NEXUS = 1
OTHER = 2


class CountingRamStore(RamStore):
    """A RAM store that remembers how often it was flushed."""

    def __init__(self, num_blocks: int, block_size: int = BS) -> None:
        super().__init__(num_blocks, block_size)
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


class HugeStore(BlockStore):
    """Claims more blocks than READ CAPACITY(10) can express; never touched for data."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def read_into(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        raise AssertionError("no data expected")

    def write_from(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        raise AssertionError("no data expected")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FailingStore(RamStore):
    def __init__(self, exc: BaseException) -> None:
        super().__init__(64)
        self.exc = exc

    def read_into(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        raise self.exc


@dataclass
class Result:
    srb: Srb
    data: bytes

    @property
    def good(self) -> bool:
        # CONDITION MET (PRE-FETCH) is a success too.
        return self.srb.scsi_status in (ScsiStatus.GOOD, ScsiStatus.CONDITION_MET)

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
    edtl: int | None = None,
    direction: DataDirection | None = None,
    pad: bool = True,
) -> Result:
    """Execute ``cdb`` as the target would: padded to 16 bytes, with its data buffers."""
    if pad and len(cdb) < 16:
        cdb = cdb + bytes(16 - len(cdb))
    if data_out is not None:
        buf = bytearray(data_out)
        length = len(buf) if edtl is None else edtl
        srb = Srb(
            cdb=cdb,
            data_direction=direction or DataDirection.OUT,
            data_transfer_length=length,
            sg_list=[memoryview(buf)],
            nexus=nexus,
        )
    else:
        length = (data_in or 0) if edtl is None else edtl
        buf = bytearray(data_in or 0)
        srb = Srb(
            cdb=cdb,
            data_direction=direction or (DataDirection.IN if data_in else DataDirection.NONE),
            data_transfer_length=length,
            sg_list=[memoryview(buf)] if data_in else [],
            nexus=nexus,
        )
    lu.execute(srb)
    moved = (
        srb.data_transfer_length
        if srb.data_direction & DataDirection.IN and data_out is None
        else 0
    )
    result = Result(srb, bytes(buf[:moved]))
    if result.good:
        assert srb.srb_status is SrbStatus.SUCCESS and srb.sense == b""
    else:
        assert srb.srb_status is SrbStatus.ERROR and srb.data_transfer_length == 0
    return result


def make_lu(
    store: BlockStore | None = None,
    *,
    luns: Sequence[int] = (0, 1),
    clear: Sequence[int] = (NEXUS,),
    **kwargs: Any,
) -> LogicalUnit:
    lu = LogicalUnit(
        store if store is not None else RamStore(BLOCKS),
        lun=0,
        target_luns=lambda: list(luns),
        serial=kwargs.pop("serial", "EMU-SERIAL-0001"),
        target_port_name=kwargs.pop("target_port_name", "iqn.2024-01.org.emuhba:target0,t,0x0001"),
        **kwargs,
    )
    for nexus in clear:
        run(lu, C.TEST_UNIT_READY.build({}), nexus=nexus)  # consume the power-on unit attention
    return lu


def tur(lu: LogicalUnit, nexus: int = NEXUS) -> Result:
    return run(lu, C.TEST_UNIT_READY.build({}), nexus=nexus)


def read10(lu: LogicalUnit, lba: int, blocks: int, **kw: Any) -> Result:
    kw.setdefault("data_in", blocks * lu.block_size)
    return run(lu, C.READ_10.build(dict(lba=lba, transfer_length=blocks)), **kw)


def write10(lu: LogicalUnit, lba: int, data: bytes, blocks: int | None = None, **kw: Any) -> Result:
    n = len(data) // lu.block_size if blocks is None else blocks
    return run(lu, C.WRITE_10.build(dict(lba=lba, transfer_length=n)), data_out=data, **kw)


def mode_sense6(lu: LogicalUnit, page: int = 0x3F, pc: int = 0, **kw: Any) -> Result:
    kw.setdefault("data_in", 255)
    cdb = C.MODE_SENSE_6.build(
        dict(
            page=dict(pc=pc, page_code=page),
            allocation_length=kw["data_in"],
            flags=dict(dbd=kw.pop("dbd", False)),
        )
    )
    return run(lu, cdb, **kw)


def mode_pages(data: bytes, header: int) -> dict[int, bytes]:
    pos = header + (data[3] if header == 4 else struct.unpack_from(">H", data, 6)[0])
    pages = {}
    while pos < len(data):
        pages[data[pos] & 0x3F] = data[pos : pos + 2 + data[pos + 1]]
        pos += 2 + data[pos + 1]
    return pages


def assert_check(
    result: Result,
    code: SenseCode,
    field_pointer: int | None = None,
    bit_pointer: int | None = None,
    cd: bool | None = None,
) -> None:
    sense = result.sense
    assert sense.code == code, f"{sense.code} != {code}"
    if field_pointer is not None:
        assert sense.field_pointer == field_pointer
        assert sense.bit_pointer == bit_pointer
        assert sense.cd == (True if cd is None else cd)


@pytest.fixture
def lu() -> LogicalUnit:
    return make_lu()


# ---------------------------------------------------------------------------------------------
# Identity helpers
# ---------------------------------------------------------------------------------------------


def test_make_naa_id() -> None:
    naa = make_naa_id("ABC")
    assert naa >> 60 == 5
    assert (naa >> 36) & 0xFFFFFF == EMUHBA_COMPANY_ID
    assert naa == make_naa_id("ABC")
    assert naa != make_naa_id("ABD")
    assert (make_naa_id("ABC", 0x001122) >> 36) & 0xFFFFFF == 0x001122
    with pytest.raises(ValueError):
        make_naa_id("x", 1 << 24)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        make_lu(vendor="WAY TOO LONG")
    with pytest.raises(ValueError):
        make_lu(serial="")
    with pytest.raises(ValueError):
        make_lu(naa_id=0x6000000000000000)
    with pytest.raises(ValueError):
        make_lu(product="bad\x01")


# ---------------------------------------------------------------------------------------------
# Unit attentions
# ---------------------------------------------------------------------------------------------


def test_new_nexus_sees_power_on_reset_once() -> None:
    lu = make_lu(clear=())
    assert_check(tur(lu), S.POWER_ON_RESET)
    assert tur(lu).good
    # Another nexus has its own condition.
    assert_check(tur(lu, OTHER), S.POWER_ON_RESET)
    assert tur(lu, OTHER).good


def test_unit_attention_is_reported_even_for_unsupported_opcodes() -> None:
    lu = make_lu(clear=())
    assert_check(run(lu, bytes((0xC7,))), S.POWER_ON_RESET)
    assert_check(run(lu, bytes((0xC7,))), S.INVALID_OPCODE, field_pointer=0, bit_pointer=7)


def test_inquiry_report_luns_request_sense_do_not_report_ua() -> None:
    lu = make_lu(clear=())
    assert run(lu, C.INQUIRY.build(dict(allocation_length=96)), data_in=96).good
    assert run(lu, C.REPORT_LUNS.build(dict(allocation_length=64)), data_in=64).good
    assert_check(tur(lu), S.POWER_ON_RESET)  # still pending after INQUIRY and REPORT LUNS
    lu2 = make_lu(clear=())
    sense = run(lu2, C.REQUEST_SENSE.build(dict(allocation_length=18)), data_in=18)
    assert sense.good
    assert parse_sense(sense.data).code == S.POWER_ON_RESET
    assert tur(lu2).good  # REQUEST SENSE cleared it


def test_nexus_gone_makes_it_new_again(lu: LogicalUnit) -> None:
    assert tur(lu).good
    lu.nexus_gone(NEXUS)
    assert_check(tur(lu), S.POWER_ON_RESET)
    lu.nexus_gone(12345)  # unknown nexus: nothing to forget


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (ResetKind.LOGICAL_UNIT, S.BUS_DEVICE_RESET),
        (ResetKind.TARGET, S.BUS_DEVICE_RESET),
        (ResetKind.BUS, S.SCSI_BUS_RESET),
        (ResetKind.POWER_ON, S.POWER_ON_OCCURRED),
    ],
)
def test_reset_raises_its_unit_attention_for_every_nexus(kind: ResetKind, code: SenseCode) -> None:
    lu = make_lu(clear=(NEXUS, OTHER))
    lu.establish_unit_attention(S.REPORTED_LUNS_DATA_CHANGED)
    lu.reset(kind)
    for nexus in (NEXUS, OTHER):
        assert_check(tur(lu, nexus), code)
        assert tur(lu, nexus).good  # the reset superseded the earlier condition
    assert_check(tur(lu, 3), S.POWER_ON_RESET)  # a nexus never seen still starts with 29/00


def test_reset_restores_mode_parameters(lu: LogicalUnit) -> None:
    set_d_sense(lu, True)
    assert lu.descriptor_sense
    lu.reset(ResetKind.LOGICAL_UNIT)
    assert not lu.descriptor_sense
    assert tur(lu).sense.response_code == 0x70


def test_power_on_reset_starts_a_stopped_unit(lu: LogicalUnit) -> None:
    assert run(lu, C.START_STOP_UNIT.build({})).good
    lu.reset(ResetKind.LOGICAL_UNIT)
    tur(lu)
    assert_check(tur(lu), S.NOT_READY_STOPPED)  # a LU reset does not spin the disk up
    lu.reset(ResetKind.POWER_ON)
    tur(lu)
    assert tur(lu).good


def test_established_conditions_queue_in_order(lu: LogicalUnit) -> None:
    run(lu, C.TEST_UNIT_READY.build({}), nexus=OTHER)
    lu.establish_unit_attention(S.REPORTED_LUNS_DATA_CHANGED, except_nexus=OTHER)
    lu.establish_unit_attention(S.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR, nexus=NEXUS)
    lu.establish_unit_attention(S.REPORTED_LUNS_DATA_CHANGED, nexus=NEXUS)  # no duplicate
    lu.establish_unit_attention(S.MODE_PARAMETERS_CHANGED, nexus=999)  # unknown: ignored
    assert tur(lu, OTHER).good
    assert_check(tur(lu), S.REPORTED_LUNS_DATA_CHANGED)
    assert_check(tur(lu), S.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)
    assert tur(lu).good


def test_report_luns_clears_reported_luns_data_changed(lu: LogicalUnit) -> None:
    lu.establish_unit_attention(S.REPORTED_LUNS_DATA_CHANGED)
    assert run(lu, C.REPORT_LUNS.build(dict(allocation_length=64)), data_in=64).good
    assert tur(lu).good


# ---------------------------------------------------------------------------------------------
# Generic CDB checks
# ---------------------------------------------------------------------------------------------


def unsupported_opcode() -> int:
    """An opcode no command set of the unit implements (vendor-specific range)."""
    return next(op for op in range(0xC0, 0x100) if op not in {s.opcode for s in COMMANDS})


def unsupported_service_action(opcode: int) -> int:
    taken = {s.service_action for s in COMMANDS if s.opcode == opcode}
    return next(sa for sa in range(0x1F, -1, -1) if sa not in taken)


def test_unsupported_and_empty_cdbs(lu: LogicalUnit) -> None:
    assert_check(
        run(lu, bytes((unsupported_opcode(),))), S.INVALID_OPCODE, field_pointer=0, bit_pointer=7
    )
    assert_check(run(lu, b"", pad=False), S.INVALID_OPCODE)
    assert_check(run(lu, bytes((Op.READ_16, 0, 0)), pad=False), S.INVALID_FIELD_IN_CDB)


def test_naca_is_refused(lu: LogicalUnit) -> None:
    cdb = C.READ_10.build(dict(lba=0, transfer_length=1, control=0x04))
    assert_check(run(lu, cdb, data_in=BS), S.INVALID_FIELD_IN_CDB, field_pointer=9, bit_pointer=2)
    cdb = C.TEST_UNIT_READY.build(dict(control=0x04))
    assert_check(run(lu, cdb), S.INVALID_FIELD_IN_CDB, field_pointer=5, bit_pointer=2)
    # Vendor-specific control bits are ignored.
    assert run(lu, C.TEST_UNIT_READY.build(dict(control=0xC0))).good


# ---------------------------------------------------------------------------------------------
# INQUIRY
# ---------------------------------------------------------------------------------------------


def test_standard_inquiry(lu: LogicalUnit) -> None:
    r = run(lu, C.INQUIRY.build(dict(allocation_length=260)), data_in=260)
    d = r.data
    assert len(d) == 96
    assert d[0] == 0x00  # qualifier 0, direct access block device
    assert d[1] & 0x80 == 0  # not removable
    assert d[2] == 0x06  # SPC-4
    assert d[3] & 0x0F == 2 and d[3] & 0x10  # response data format 2, HISUP
    assert d[3] & 0xC0 == 0  # AERC, TRMTSK clear
    assert d[4] == len(d) - 5
    assert d[7] & 0x02  # CMDQUE
    assert d[8:16] == b"EMUHBA  "
    assert d[16:32] == b"RAMDISK         "
    assert d[32:36] == b"0001"
    assert struct.unpack_from(">4H", d, 58) == (0x00A0, 0x0460, 0x04C0, 0x0960)
    assert r.srb.residual == 260 - 96


@pytest.mark.parametrize("allocation", [0, 1, 5, 36, 95])
def test_inquiry_allocation_length_truncates(lu: LogicalUnit, allocation: int) -> None:
    r = run(lu, C.INQUIRY.build(dict(allocation_length=allocation)), data_in=255, edtl=allocation)
    assert r.good
    assert len(r.data) == allocation
    assert r.srb.residual == 0
    full = run(lu, C.INQUIRY.build(dict(allocation_length=96)), data_in=96).data
    assert r.data == full[:allocation]


def test_inquiry_invalid_fields(lu: LogicalUnit) -> None:
    cdb = C.INQUIRY.build(dict(page_code=0x80, allocation_length=255))
    assert_check(run(lu, cdb, data_in=255), S.INVALID_FIELD_IN_CDB, field_pointer=2)
    cdb = C.INQUIRY.build(dict(flags=dict(cmddt=True), allocation_length=255))
    assert_check(run(lu, cdb, data_in=255), S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=1)
    cdb = C.INQUIRY.build(dict(flags=dict(evpd=True), page_code=0x87, allocation_length=255))
    assert_check(run(lu, cdb, data_in=255), S.INVALID_FIELD_IN_CDB, field_pointer=2)


def vpd(lu: LogicalUnit, page: int) -> bytes:
    r = run(
        lu,
        C.INQUIRY.build(dict(flags=dict(evpd=True), page_code=page, allocation_length=1024)),
        data_in=1024,
    )
    assert r.good
    d = r.data
    assert d[0] == 0 and d[1] == page
    assert struct.unpack_from(">H", d, 2)[0] == len(d) - 4
    return d


def test_vpd_supported_pages_and_serial(lu: LogicalUnit) -> None:
    assert vpd(lu, 0x00)[4:] == bytes((0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2))
    assert vpd(lu, 0x80)[4:] == b"EMU-SERIAL-0001"


def test_vpd_device_identification(lu: LogicalUnit) -> None:
    d = vpd(lu, 0x83)
    pos, designators = 4, []
    while pos < len(d):
        designators.append((d[pos], d[pos + 1], d[pos + 4 : pos + 4 + d[pos + 3]]))
        pos += 4 + d[pos + 3]
    assert pos == len(d)
    naa, t10, relport, name = designators
    assert naa[:2] == (0x01, 0x03)
    assert int.from_bytes(naa[2], "big") == lu.naa_id == make_naa_id("EMU-SERIAL-0001")
    assert t10[:2] == (0x02, 0x01)
    assert t10[2] == b"EMUHBA  RAMDISK         EMU-SERIAL-0001"
    assert relport[:2] == (0x01, 0x14)
    assert relport[2] == b"\x00\x00\x00\x01"
    assert name[:2] == (0x53, 0x98)  # iSCSI, UTF-8, PIV, target port, SCSI name string
    assert len(name[2]) % 4 == 0
    assert name[2].rstrip(b"\x00") == b"iqn.2024-01.org.emuhba:target0,t,0x0001"


def test_vpd_without_port_name_has_no_name_designator() -> None:
    lu = make_lu(target_port_name="")
    d = vpd(lu, 0x83)
    assert b"iqn." not in d


def test_vpd_block_limits_characteristics_provisioning(lu: LogicalUnit) -> None:
    b0 = vpd(lu, 0xB0)
    assert len(b0) == 64 and b0[3] == 0x3C
    assert struct.unpack_from(">H", b0, 6)[0] == 8  # 4 KiB physical blocks of 512-byte sectors
    assert struct.unpack_from(">I", b0, 8)[0] == 16384  # 8 MiB
    assert struct.unpack_from(">I", b0, 12)[0] == 2048  # 1 MiB
    b1 = vpd(lu, 0xB1)
    assert b1[3] == 0x3C and struct.unpack_from(">H", b1, 4)[0] == 1
    assert vpd(lu, 0xB2)[1] == 0xB2  # its contents are the provisioning module's


def test_product_follows_store_kind(tmp_path: Path) -> None:
    lu = make_lu(FileStore(tmp_path / "d.img", 1 << 20))
    assert (
        run(lu, C.INQUIRY.build(dict(allocation_length=36)), data_in=36).data[16:32]
        == b"FILEDISK        "
    )


def test_custom_transfer_limits() -> None:
    lu = make_lu(max_transfer_blocks=16, optimal_transfer_blocks=4)
    b0 = vpd(lu, 0xB0)
    assert struct.unpack_from(">II", b0, 8) == (16, 4)
    assert read10(lu, 0, 16).good
    assert_check(read10(lu, 0, 17), S.INVALID_FIELD_IN_CDB, field_pointer=7)


# ---------------------------------------------------------------------------------------------
# TEST UNIT READY, START STOP UNIT, PREVENT ALLOW
# ---------------------------------------------------------------------------------------------


def test_start_stop_unit() -> None:
    store = CountingRamStore(BLOCKS)
    lu = make_lu(store)
    assert run(lu, C.START_STOP_UNIT.build(dict(flags=dict(immed=True)))).good
    assert lu.stopped and store.flushes == 1
    assert_check(tur(lu), S.NOT_READY_STOPPED)
    assert_check(read10(lu, 0, 1), S.NOT_READY_STOPPED)
    assert_check(write10(lu, 0, bytes(BS)), S.NOT_READY_STOPPED)
    assert_check(run(lu, C.SYNCHRONIZE_CACHE_10.build({})), S.NOT_READY_STOPPED)
    # Non-media commands still work on a stopped unit.
    assert run(lu, C.READ_CAPACITY_10.build({}), data_in=8).good
    assert run(lu, C.INQUIRY.build(dict(allocation_length=36)), data_in=36).good
    assert run(lu, C.START_STOP_UNIT.build(dict(power=dict(start=True)))).good
    assert tur(lu).good and not lu.stopped
    assert run(lu, C.START_STOP_UNIT.build(dict(power=dict(no_flush=True)))).good
    assert store.flushes == 1 and lu.stopped  # NO_FLUSH: no write-back


def test_start_stop_unit_loej_and_power_conditions(lu: LogicalUnit) -> None:
    cdb = C.START_STOP_UNIT.build(dict(power=dict(loej=True, start=False)))
    assert_check(run(lu, cdb), S.INVALID_FIELD_IN_CDB, field_pointer=4, bit_pointer=1)
    assert not lu.stopped
    for pc in range(1, 16):
        cdb = C.START_STOP_UNIT.build(dict(power=dict(power_condition=pc, loej=True)))
        assert run(lu, cdb).good
        assert tur(lu).good


def test_prevent_allow(lu: LogicalUnit) -> None:
    for prevent in range(4):
        assert run(lu, C.PREVENT_ALLOW.build(dict(prevent=dict(prevent=prevent)))).good


# ---------------------------------------------------------------------------------------------
# READ CAPACITY
# ---------------------------------------------------------------------------------------------


def test_read_capacity_10(lu: LogicalUnit) -> None:
    r = run(lu, C.READ_CAPACITY_10.build({}), data_in=8)
    assert struct.unpack(">II", r.data) == (BLOCKS - 1, BS)
    cdb = C.READ_CAPACITY_10.build(dict(lba=5))
    assert_check(run(lu, cdb, data_in=8), S.INVALID_FIELD_IN_CDB, field_pointer=2)
    assert run(lu, C.READ_CAPACITY_10.build(dict(lba=5, flags=dict(pmi=True))), data_in=8).good


def test_read_capacity_of_a_huge_unit() -> None:
    lu = make_lu(HugeStore(1 << 33))
    r = run(lu, C.READ_CAPACITY_10.build({}), data_in=8)
    assert struct.unpack(">II", r.data) == (0xFFFFFFFF, BS)
    r = run(lu, C.READ_CAPACITY_16.build(dict(allocation_length=32)), data_in=32)
    assert struct.unpack_from(">QI", r.data) == ((1 << 33) - 1, BS)
    m = mode_sense6(lu, page=0x08)
    assert m.data[3] == 8 and struct.unpack_from(">I", m.data, 4)[0] == 0xFFFFFFFF


@pytest.mark.parametrize(("physical", "lbppbe"), [(512, 0), (2048, 2), (32768, 6)])
def test_read_capacity_16_reports_the_store_physical_block(physical: int, lbppbe: int) -> None:
    store = RamStore(100, 512)
    store.physical_block_size = physical
    r = run(make_lu(store), C.READ_CAPACITY_16.build(dict(allocation_length=32)), data_in=32)
    assert r.data[13] & 0x0F == lbppbe


@pytest.mark.parametrize("physical", [256, 1536, 3072])
def test_a_physical_block_that_is_not_a_power_of_two_multiple_is_refused(physical: int) -> None:
    store = RamStore(100, 512)
    store.physical_block_size = physical
    with pytest.raises(ValueError, match="physical block"):
        make_lu(store)


@pytest.mark.parametrize(("block_size", "lbppbe"), [(512, 3), (4096, 0)])
def test_read_capacity_16(block_size: int, lbppbe: int) -> None:
    lu = make_lu(RamStore(100, block_size))
    r = run(lu, C.READ_CAPACITY_16.build(dict(allocation_length=32)), data_in=32)
    assert len(r.data) == 32
    last, size, prot, exp = struct.unpack_from(">QIBB", r.data)
    assert (last, size, prot, exp & 0x0F) == (99, block_size, 0, lbppbe)
    short = run(lu, C.READ_CAPACITY_16.build(dict(allocation_length=12)), data_in=12)
    assert short.data == r.data[:12]


def test_service_action_in_unknown_action(lu: LogicalUnit) -> None:
    sa = unsupported_service_action(Op.SERVICE_ACTION_IN_16)
    cdb = C.READ_CAPACITY_16.build(dict(action=dict(service_action=sa), allocation_length=32))
    assert_check(run(lu, cdb, data_in=32), S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)


# ---------------------------------------------------------------------------------------------
# READ / WRITE
# ---------------------------------------------------------------------------------------------

LAYOUTS_RW = [
    (C.READ_10, C.WRITE_10),
    (C.READ_12, C.WRITE_12),
    (C.READ_16, C.WRITE_16),
]


@pytest.mark.parametrize("medium", ["ram", "file"])
@pytest.mark.parametrize(("read", "write"), LAYOUTS_RW)
def test_read_write_round_trip(tmp_path: Path, medium: str, read: Any, write: Any) -> None:
    store = RamStore(BLOCKS) if medium == "ram" else FileStore(tmp_path / "rw.img", BLOCKS * BS)
    lu = make_lu(store)
    data = bytes(range(256)) * 6  # 3 blocks
    # Scattered over uneven buffers, as PDUs would deliver it.
    pieces = [memoryview(data[:100]), memoryview(data[100:1500]), memoryview(data[1500:])]
    srb = Srb(
        cdb=write.build(dict(lba=100, transfer_length=3)),
        data_direction=DataDirection.OUT,
        data_transfer_length=len(data),
        sg_list=pieces,
        nexus=NEXUS,
    )
    lu.execute(srb)
    assert srb.scsi_status is ScsiStatus.GOOD and srb.data_transfer_length == len(data)
    r = run(lu, read.build(dict(lba=100, transfer_length=3)), data_in=3 * BS)
    assert r.good and r.data == data and r.srb.residual == 0
    assert r.srb.data_transfer_length == 3 * BS
    assert read10(lu, 99, 1).data == bytes(BS) and read10(lu, 103, 1).data == bytes(BS)
    store.close()
    if medium == "file":
        reopened = FileStore(tmp_path / "rw.img")
        back = memoryview(bytearray(len(data)))
        reopened.read_into(100 * BS, len(data), [back])
        assert bytes(back) == data
        reopened.close()


def test_six_byte_read_write(lu: LogicalUnit) -> None:
    data = b"\xab" * (256 * BS)
    w = run(lu, C.WRITE_6.build(dict(address=dict(lba=1000), transfer_length=0)), data_out=data)
    assert w.good and w.srb.data_transfer_length == 256 * BS  # 0 means 256 blocks
    r = run(lu, C.READ_6.build(dict(address=dict(lba=1000), transfer_length=0)), data_in=256 * BS)
    assert r.data == data
    r = run(lu, C.READ_6.build(dict(address=dict(lba=1255), transfer_length=1)), data_in=BS)
    assert r.data == b"\xab" * BS


def test_zero_length_transfers(lu: LogicalUnit) -> None:
    r = run(lu, C.READ_10.build(dict(lba=0, transfer_length=0)))
    assert r.good and r.srb.data_transfer_length == 0 and r.srb.residual == 0
    assert run(lu, C.WRITE_16.build(dict(lba=BLOCKS - 1, transfer_length=0)), data_out=b"").good
    # Zero blocks past the end is still an invalid address.
    assert_check(
        run(lu, C.READ_10.build(dict(lba=BLOCKS + 1, transfer_length=0))), S.LBA_OUT_OF_RANGE
    )
    assert_check(
        run(lu, C.WRITE_10.build(dict(lba=0xFFFFFFFF, transfer_length=0)), data_out=b""),
        S.LBA_OUT_OF_RANGE,
    )


@pytest.mark.parametrize(
    ("lba", "blocks"), [(BLOCKS - 1, 2), (BLOCKS, 1), (0, BLOCKS + 1), (2**63, 1)]
)
def test_beyond_end_of_medium(lba: int, blocks: int) -> None:
    lu = make_lu()
    r = run(lu, C.READ_16.build(dict(lba=lba, transfer_length=blocks)), data_in=blocks * BS)
    assert_check(r, S.LBA_OUT_OF_RANGE)
    assert r.srb.data_transfer_length == 0
    w = run(
        lu, C.WRITE_16.build(dict(lba=lba, transfer_length=blocks)), data_out=b"\x01" * blocks * BS
    )
    assert_check(w, S.LBA_OUT_OF_RANGE)
    assert read10(lu, BLOCKS - 1, 1).data == bytes(BS)  # nothing was written


def test_last_block_is_addressable(lu: LogicalUnit) -> None:
    assert write10(lu, BLOCKS - 1, b"\x42" * BS).good
    assert read10(lu, BLOCKS - 1, 1).data == b"\x42" * BS


@pytest.mark.parametrize(
    "layout", [C.READ_10, C.READ_12, C.READ_16, C.WRITE_10, C.WRITE_12, C.WRITE_16]
)
def test_protection_fields_are_refused(lu: LogicalUnit, layout: Any) -> None:
    name = "rdprotect" if layout in (C.READ_10, C.READ_12, C.READ_16) else "wrprotect"
    for value in range(1, 8):
        cdb = layout.build(dict(lba=0, transfer_length=1, flags={name: value}))
        r = run(lu, cdb, data_in=BS) if name == "rdprotect" else run(lu, cdb, data_out=bytes(BS))
        assert_check(r, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=7)


def test_dpo_fua_accepted_and_fua_flushes() -> None:
    store = CountingRamStore(BLOCKS)
    lu = make_lu(store)
    assert read10(lu, 0, 1).good
    cdb = C.READ_10.build(dict(lba=0, transfer_length=1, flags=dict(dpo=True, fua=True)))
    assert run(lu, cdb, data_in=BS).good
    assert write10(lu, 0, bytes(BS)).good
    assert store.flushes == 0
    cdb = C.WRITE_16.build(dict(lba=0, transfer_length=1, flags=dict(fua=True, dpo=True)))
    assert run(lu, cdb, data_out=bytes(BS)).good
    assert store.flushes == 1


def test_write_through_when_cache_disabled() -> None:
    store = CountingRamStore(BLOCKS)
    lu = make_lu(store)
    set_wce(lu, False)
    assert not lu.write_cache_enabled
    assert write10(lu, 0, bytes(2 * BS)).good
    assert store.flushes == 1


def test_write_and_verify() -> None:
    store = CountingRamStore(BLOCKS)
    lu = make_lu(store)
    data = (b"wv" * BS)[: 2 * BS]
    for layout in (C.WRITE_VERIFY_10, C.WRITE_VERIFY_12, C.WRITE_VERIFY_16):
        assert run(
            lu, layout.build(dict(lba=7, transfer_length=2, flags=dict(bytchk=1))), data_out=data
        ).good
        assert read10(lu, 7, 2).data == data
        bad = layout.build(dict(lba=7, transfer_length=2, flags=dict(bytchk=2)))
        assert_check(
            run(lu, bad, data_out=data), S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=2
        )
    assert store.flushes == 3


def test_read_only_unit(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"\x77" * (64 * BS))
    lu = make_lu(FileStore(path, read_only=True))
    assert lu.read_only
    assert read10(lu, 63, 1).data == b"\x77" * BS
    for layout in (C.WRITE_10, C.WRITE_12, C.WRITE_16, C.WRITE_VERIFY_10):
        r = run(lu, layout.build(dict(lba=0, transfer_length=1)), data_out=bytes(BS))
        assert_check(r, S.WRITE_PROTECTED)
    assert_check(
        run(lu, C.WRITE_6.build(dict(transfer_length=1)), data_out=bytes(BS)), S.WRITE_PROTECTED
    )
    assert mode_sense6(lu).data[2] & 0x80  # WP
    assert make_lu(read_only=True).read_only
    assert mode_sense6(make_lu()).data[2] == 0x10  # DPOFUA, not WP


def test_store_errors_become_medium_errors() -> None:
    lu = make_lu(FailingStore(OSError(5, "EIO")))
    r = read10(lu, 3, 1)
    assert_check(r, S.UNRECOVERED_READ_ERROR)
    assert r.sense.information == 3
    crashing = make_lu(FailingStore(RuntimeError("bug")))
    assert_check(read10(crashing, 0, 1), S.INTERNAL_TARGET_FAILURE)


# ---------------------------------------------------------------------------------------------
# Residuals (what libiscsi's iSCSIResiduals tests check)
# ---------------------------------------------------------------------------------------------


def fill(lu: LogicalUnit, byte: int, blocks: int = 2) -> None:
    assert write10(lu, 0, bytes([byte]) * (blocks * BS)).good


def test_write_one_block_with_edtl_zero(lu: LogicalUnit) -> None:
    fill(lu, 0x61)
    r = run(lu, C.WRITE_10.build(dict(transfer_length=1)), data_out=b"", edtl=0)
    assert r.good and r.srb.residual == -BS and r.srb.data_transfer_length == 0
    assert read10(lu, 0, 1).data == b"a" * BS


def test_write_one_block_with_edtl_10000(lu: LogicalUnit) -> None:
    fill(lu, 0x61)
    r = run(lu, C.WRITE_10.build(dict(transfer_length=1)), data_out=b"b" * 10000)
    assert r.good and r.srb.residual == 10000 - BS and r.srb.data_transfer_length == BS
    assert read10(lu, 0, 2).data == b"b" * BS + b"a" * BS


def test_write_one_block_with_edtl_200(lu: LogicalUnit) -> None:
    fill(lu, 0x61)
    r = run(lu, C.WRITE_10.build(dict(transfer_length=1)), data_out=b"b" * 200)
    assert r.good and r.srb.residual == -(BS - 200) and r.srb.data_transfer_length == 200
    assert read10(lu, 0, 1).data == b"b" * 200 + b"a" * (BS - 200)


def test_write_two_blocks_with_edtl_one_block(lu: LogicalUnit) -> None:
    fill(lu, 0x61)
    r = run(lu, C.WRITE_16.build(dict(transfer_length=2)), data_out=b"b" * BS)
    assert r.good and r.srb.residual == -BS
    assert read10(lu, 0, 2).data == b"b" * BS + b"a" * BS


def test_read_residuals(lu: LogicalUnit) -> None:
    fill(lu, 0x63)
    r = run(lu, C.READ_10.build(dict(transfer_length=1)), data_in=0, edtl=0)
    assert r.good and r.srb.residual == -BS and r.data == b""
    r = run(lu, C.READ_10.build(dict(transfer_length=1)), data_in=10000)
    assert r.good and r.srb.residual == 10000 - BS and r.data == b"c" * BS
    r = run(lu, C.READ_10.build(dict(transfer_length=1)), data_in=200)
    assert r.good and r.srb.residual == -(BS - 200) and r.data == b"c" * 200
    r = run(lu, C.READ_12.build(dict(transfer_length=2)), data_in=BS)
    assert r.good and r.srb.residual == -BS and r.data == b"c" * BS


def test_read_sent_as_a_write_moves_no_data(lu: LogicalUnit) -> None:
    payload = b"\xa6" * BS
    r = run(lu, C.READ_10.build(dict(transfer_length=1)), data_out=payload)
    assert r.good and r.srb.data_transfer_length == 0
    assert bytes(r.srb.sg_list[0]) == payload  # the data-out buffer was not scribbled on
    w = run(lu, C.WRITE_10.build(dict(transfer_length=1)), data_in=BS)  # write flagged as a read
    assert w.good and w.srb.data_transfer_length == 0


def test_check_condition_reports_nothing_moved(lu: LogicalUnit) -> None:
    r = read10(lu, BLOCKS, 1, data_in=4 * BS)
    assert_check(r, S.LBA_OUT_OF_RANGE)
    assert r.srb.residual == 4 * BS and r.srb.data_transfer_length == 0


# ---------------------------------------------------------------------------------------------
# VERIFY and SYNCHRONIZE CACHE
# ---------------------------------------------------------------------------------------------

VERIFY_LAYOUTS = [C.VERIFY_10, C.VERIFY_12, C.VERIFY_16]


@pytest.mark.parametrize("layout", VERIFY_LAYOUTS)
def test_verify(layout: Any) -> None:
    lu = make_lu()
    data = bytes(range(256)) * 8  # 4 blocks
    assert write10(lu, 20, data).good
    assert run(lu, layout.build(dict(lba=20, transfer_length=4))).good
    ok = run(lu, layout.build(dict(lba=20, transfer_length=4, flags=dict(bytchk=1))), data_out=data)
    assert ok.good and ok.srb.residual == 0
    flipped = bytearray(data)
    flipped[1234] ^= ord("X")
    bad = run(
        lu,
        layout.build(dict(lba=20, transfer_length=4, flags=dict(bytchk=1))),
        data_out=bytes(flipped),
    )
    assert_check(bad, S.MISCOMPARE)
    assert bad.sense.information == 1234
    beyond = layout.build(dict(lba=BLOCKS - 1, transfer_length=2))
    assert_check(run(lu, beyond), S.LBA_OUT_OF_RANGE)
    for bytchk in (2, 3):
        cdb = layout.build(dict(lba=20, transfer_length=1, flags=dict(bytchk=bytchk)))
        assert_check(
            run(lu, cdb, data_out=data[:BS]), S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=2
        )
    cdb = layout.build(dict(lba=20, transfer_length=1, flags=dict(vrprotect=1)))
    assert_check(run(lu, cdb), S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=7)
    # Without BYTCHK no data moves, so the maximum transfer length does not apply.
    assert run(lu, layout.build(dict(lba=0, transfer_length=BLOCKS))).good


@pytest.mark.parametrize("layout", [C.SYNCHRONIZE_CACHE_10, C.SYNCHRONIZE_CACHE_16])
def test_synchronize_cache(layout: Any) -> None:
    store = CountingRamStore(BLOCKS)
    lu = make_lu(store)
    assert run(lu, layout.build({})).good
    assert run(
        lu, layout.build(dict(lba=BLOCKS - 10, number_of_blocks=10, flags=dict(immed=True)))
    ).good
    assert store.flushes == 2
    assert_check(
        run(lu, layout.build(dict(lba=BLOCKS - 10, number_of_blocks=11))), S.LBA_OUT_OF_RANGE
    )
    assert_check(run(lu, layout.build(dict(lba=BLOCKS))), S.LBA_OUT_OF_RANGE)
    assert store.flushes == 2


# ---------------------------------------------------------------------------------------------
# MODE SENSE / MODE SELECT
# ---------------------------------------------------------------------------------------------


def set_page_bit(
    lu: LogicalUnit, page: int, byte: int, mask: int, on: bool, nexus: int = NEXUS
) -> Result:
    current = mode_pages(mode_sense6(lu, page=page, dbd=True, nexus=nexus).data, 4)[page]
    new = bytearray(current)
    new[byte] = (new[byte] | mask) if on else (new[byte] & ~mask)
    params = bytes(4) + bytes(new)
    cdb = C.MODE_SELECT_6.build(dict(flags=dict(pf=True), parameter_list_length=len(params)))
    return run(lu, cdb, data_out=params, nexus=nexus)


def set_d_sense(lu: LogicalUnit, on: bool) -> None:
    assert set_page_bit(lu, 0x0A, 2, 0x04, on).good


def set_wce(lu: LogicalUnit, on: bool) -> None:
    assert set_page_bit(lu, 0x08, 2, 0x04, on).good


def test_mode_sense_6_all_pages(lu: LogicalUnit) -> None:
    r = mode_sense6(lu)
    d = r.data
    assert d[0] == len(d) - 1
    assert (d[1], d[2], d[3]) == (0, 0x10, 8)
    assert struct.unpack_from(">II", d, 4) == (BLOCKS, BS)
    pages = mode_pages(d, 4)
    assert list(pages) == [0x01, 0x08, 0x0A, 0x1C]
    assert len(pages[0x08]) == 20 and pages[0x08][2] & 0x04  # WCE
    assert len(pages[0x0A]) == 12 and pages[0x0A][2] & 0x04 == 0  # D_SENSE clear
    assert pages[0x0A][8:10] == b"\xff\xff"  # busy timeout: unlimited
    assert all(p[0] & 0x80 == 0 for p in pages.values())  # PS: nothing is savable
    assert r.srb.residual == 255 - len(d)


def test_mode_sense_6_dbd_and_truncation(lu: LogicalUnit) -> None:
    d = mode_sense6(lu, page=0x0A, dbd=True).data
    assert d[3] == 0 and len(d) == 4 + 12
    r = mode_sense6(lu, data_in=4)
    assert r.good and len(r.data) == 4 and r.srb.residual == 0
    assert r.data[0] == 4 + 8 + 12 + 20 + 12 + 12 - 1  # the full length, not the truncated one


def test_mode_sense_10_long_lba(lu: LogicalUnit) -> None:
    cdb = C.MODE_SENSE_10.build(
        dict(flags=dict(llbaa=True), page=dict(page_code=0x08), allocation_length=512)
    )
    d = run(lu, cdb, data_in=512).data
    assert struct.unpack_from(">H", d, 0)[0] == len(d) - 2
    assert d[4] & 0x01 and struct.unpack_from(">H", d, 6)[0] == 16
    assert struct.unpack_from(">Q4xI", d, 8) == (BLOCKS, BS)
    assert list(mode_pages(d, 8)) == [0x08]
    cdb = C.MODE_SENSE_10.build(
        dict(page=dict(page_code=0x3F), subpage_code=0xFF, allocation_length=512)
    )
    d = run(lu, cdb, data_in=512).data
    assert d[4] == 0 and struct.unpack_from(">H", d, 6)[0] == 8
    assert list(mode_pages(d, 8)) == [0x01, 0x08, 0x0A, 0x1C]


def test_mode_sense_page_controls(lu: LogicalUnit) -> None:
    changeable = mode_pages(mode_sense6(lu, pc=1).data, 4)
    assert changeable[0x08][2:] == b"\x04" + bytes(17)
    assert changeable[0x0A][2:] == b"\x04\x00\x08" + bytes(7)  # D_SENSE, SWP
    assert changeable[0x01][2:] == bytes(10)
    set_d_sense(lu, True)
    assert mode_pages(mode_sense6(lu, pc=0).data, 4)[0x0A][2] & 0x04
    assert mode_pages(mode_sense6(lu, pc=2).data, 4)[0x0A][2] & 0x04 == 0  # default unchanged
    assert_check(
        mode_sense6(lu, pc=3), S.SAVING_PARAMETERS_NOT_SUPPORTED, field_pointer=2, bit_pointer=7
    )


def test_mode_sense_invalid_pages(lu: LogicalUnit) -> None:
    assert_check(mode_sense6(lu, page=0x19), S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=5)
    assert_check(mode_sense6(lu, page=0x00), S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=5)
    cdb = C.MODE_SENSE_6.build(
        dict(page=dict(page_code=0x0A), subpage_code=1, allocation_length=255)
    )
    assert_check(run(lu, cdb, data_in=255), S.INVALID_FIELD_IN_CDB, field_pointer=3)


def test_mode_select_d_sense_round_trip() -> None:
    lu = make_lu(clear=(NEXUS, OTHER))
    set_d_sense(lu, True)
    assert lu.descriptor_sense
    # The libiscsi check: a failing READ(16) now carries descriptor-format sense.
    r = run(lu, C.READ_16.build(dict(lba=0xFFFFFFFFFFFFFFFF, transfer_length=1)), data_in=BS)
    assert r.sense.response_code == 0x72 and r.code == S.LBA_OUT_OF_RANGE
    # The other nexus is told the parameters changed (in the new format); the issuer is not.
    other = tur(lu, OTHER)
    assert other.sense.response_code == 0x72 and other.code == S.MODE_PARAMETERS_CHANGED
    assert tur(lu, OTHER).good
    set_d_sense(lu, False)
    assert tur(lu).good
    back = tur(lu, OTHER)
    assert_check(back, S.MODE_PARAMETERS_CHANGED)
    assert back.sense.response_code == 0x70


def test_mode_select_without_change_raises_no_unit_attention() -> None:
    lu = make_lu(clear=(NEXUS, OTHER))
    set_wce(lu, True)  # already on
    assert tur(lu, OTHER).good


def test_mode_select_10_with_block_descriptor(lu: LogicalUnit) -> None:
    page = bytearray(mode_pages(mode_sense6(lu, page=0x08).data, 4)[0x08])
    page[2] &= ~0x04
    params = struct.pack(">HBBBxH", 0, 0, 0, 0, 8) + struct.pack(">II", BLOCKS, BS) + bytes(page)
    cdb = C.MODE_SELECT_10.build(dict(flags=dict(pf=True), parameter_list_length=len(params)))
    r = run(lu, cdb, data_out=params)
    assert r.good and r.srb.data_transfer_length == len(params)
    assert not lu.write_cache_enabled
    long_params = struct.pack(">HBBBxH", 0, 0, 0, 1, 16) + struct.pack(">Q4xI", 0, BS)
    cdb = C.MODE_SELECT_10.build(dict(flags=dict(pf=True), parameter_list_length=len(long_params)))
    assert run(lu, cdb, data_out=long_params).good


def mode_select6(lu: LogicalUnit, params: bytes, **flags: bool) -> Result:
    cdb = C.MODE_SELECT_6.build(
        dict(flags={"pf": True, **flags}, parameter_list_length=len(params))
    )
    return run(lu, cdb, data_out=params)


def test_mode_select_errors(lu: LogicalUnit) -> None:
    control = bytes(mode_pages(mode_sense6(lu, page=0x0A).data, 4)[0x0A])
    assert_check(
        mode_select6(lu, bytes(4) + control, sp=True),
        S.INVALID_FIELD_IN_CDB,
        field_pointer=1,
        bit_pointer=0,
    )
    assert_check(
        mode_select6(lu, bytes(4) + control, pf=False),
        S.INVALID_FIELD_IN_CDB,
        field_pointer=1,
        bit_pointer=4,
    )
    assert_check(mode_select6(lu, bytes(3)), S.PARAMETER_LIST_LENGTH_ERROR)
    assert_check(mode_select6(lu, bytes(4) + control[:7]), S.PARAMETER_LIST_LENGTH_ERROR)
    assert_check(mode_select6(lu, bytes(4) + control[:1]), S.PARAMETER_LIST_LENGTH_ERROR)
    # QERR is not changeable: byte 3 of the page, which sits at offset 4 + 3 of the list.
    bad = bytearray(control)
    bad[3] |= 0x02
    assert_check(
        mode_select6(lu, bytes(4) + bytes(bad)),
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=7,
        bit_pointer=1,
        cd=False,
    )
    wrong_length = bytearray(control)
    wrong_length[1] = 0x0B
    assert_check(
        mode_select6(lu, bytes(4) + bytes(wrong_length) + b"\x00"),
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=5,
        cd=False,
    )
    assert_check(
        mode_select6(lu, bytes(4) + b"\x19\x06" + bytes(6)),
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=4,
        bit_pointer=5,
        cd=False,
    )
    assert_check(
        mode_select6(lu, bytes(4) + b"\x4a\x01" + bytes(0x20)),
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=4,
        bit_pointer=6,
        cd=False,
    )
    assert_check(
        mode_select6(lu, bytes((0, 0, 0, 5)) + bytes(5)),
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=3,
        cd=False,
    )
    assert_check(
        mode_select6(lu, bytes((0, 3, 0, 0)) + control),
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=1,
        cd=False,
    )
    descriptor = struct.pack(">II", 5, BS)
    assert_check(
        mode_select6(lu, bytes((0, 0, 0, 8)) + descriptor),
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=4,
        cd=False,
    )
    descriptor = struct.pack(">II", 0, 4096)
    assert_check(
        mode_select6(lu, bytes((0, 0, 0, 8)) + descriptor),
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=9,
        cd=False,
    )
    assert_check(
        mode_select6(lu, bytes((0, 0, 0, 8)) + descriptor[:4]), S.PARAMETER_LIST_LENGTH_ERROR
    )
    # Nothing above changed anything.
    assert mode_pages(mode_sense6(lu, page=0x0A).data, 4)[0x0A] == control
    # An empty parameter list is not an error.
    assert run(lu, C.MODE_SELECT_6.build(dict(parameter_list_length=0))).good


def test_mode_select_applies_all_or_nothing(lu: LogicalUnit) -> None:
    caching = bytearray(mode_pages(mode_sense6(lu, page=0x08).data, 4)[0x08])
    caching[2] &= ~0x04
    bad_control = bytearray(mode_pages(mode_sense6(lu, page=0x0A).data, 4)[0x0A])
    bad_control[5] = 0xFF
    r = mode_select6(lu, bytes(4) + bytes(caching) + bytes(bad_control))
    assert_check(r, S.INVALID_FIELD_IN_PARAMETER_LIST)
    assert lu.write_cache_enabled


# ---------------------------------------------------------------------------------------------
# REQUEST SENSE
# ---------------------------------------------------------------------------------------------


def test_request_sense_formats(lu: LogicalUnit) -> None:
    r = run(lu, C.REQUEST_SENSE.build(dict(allocation_length=252)), data_in=252)
    assert r.good and r.data == S.build_sense(S.NO_SENSE) and r.srb.residual == 252 - 18
    lu.establish_unit_attention(S.REPORTED_LUNS_DATA_CHANGED)
    r = run(
        lu, C.REQUEST_SENSE.build(dict(flags=dict(desc=True), allocation_length=252)), data_in=252
    )
    parsed = parse_sense(r.data)
    assert parsed.descriptor and parsed.code == S.REPORTED_LUNS_DATA_CHANGED
    r = run(lu, C.REQUEST_SENSE.build(dict(allocation_length=4)), data_in=4)
    assert r.data == S.build_sense(S.NO_SENSE)[:4]


# ---------------------------------------------------------------------------------------------
# REPORT LUNS
# ---------------------------------------------------------------------------------------------


def test_report_luns_addressing() -> None:
    lu = make_lu(luns=(1000, 0, 5, 255, 256, 0x3FFF, 0x4000, 5))
    r = run(lu, C.REPORT_LUNS.build(dict(allocation_length=1024)), data_in=1024)
    d = r.data
    assert struct.unpack_from(">I", d)[0] == 6 * 8 and d[4:8] == bytes(4)
    entries = [d[i : i + 8].hex() for i in range(8, len(d), 8)]
    assert entries == [
        "0000000000000000",
        "0005000000000000",
        "00ff000000000000",
        "4100000000000000",
        "43e8000000000000",
        "7fff000000000000",
    ]
    assert r.srb.residual == 1024 - len(d)


def test_report_luns_select_and_allocation(lu: LogicalUnit) -> None:
    r = run(lu, C.REPORT_LUNS.build(dict(select_report=1, allocation_length=64)), data_in=64)
    assert r.data == bytes(8)
    assert (
        run(lu, C.REPORT_LUNS.build(dict(select_report=2, allocation_length=64)), data_in=64).data[
            3
        ]
        == 16
    )
    cdb = C.REPORT_LUNS.build(dict(select_report=3, allocation_length=64))
    assert_check(run(lu, cdb, data_in=64), S.INVALID_FIELD_IN_CDB, field_pointer=2)
    cdb = C.REPORT_LUNS.build(dict(allocation_length=15))
    assert_check(run(lu, cdb, data_in=15), S.INVALID_FIELD_IN_CDB, field_pointer=6)
    many = make_lu(luns=range(100))
    r = run(many, C.REPORT_LUNS.build(dict(allocation_length=16)), data_in=16)
    assert len(r.data) == 16 and struct.unpack_from(">I", r.data)[0] == 800


# ---------------------------------------------------------------------------------------------
# REPORT SUPPORTED OPERATION CODES
# ---------------------------------------------------------------------------------------------


def rsoc(
    lu: LogicalUnit, options: int = 0, opcode: int = 0, sa: int = 0, rctd: bool = False
) -> Result:
    cdb = C.REPORT_SUPPORTED_OPCODES.build(
        dict(
            options=dict(rctd=rctd, reporting_options=options),
            requested_opcode=opcode,
            requested_service_action=sa,
            allocation_length=65535,
        )
    )
    return run(lu, cdb, data_in=65535)


def parse_all(d: bytes, rctd: bool) -> list[tuple[int, int, int, int]]:
    length = struct.unpack_from(">I", d)[0]
    assert length == len(d) - 4
    out, pos = [], 4
    while pos < len(d):
        op, sa, flags, cdb_len = struct.unpack_from(">BxHxBH", d, pos)
        pos += 8
        if flags & 0x02:
            assert struct.unpack_from(">H", d, pos)[0] == 0x0A
            pos += 12
        assert bool(flags & 0x02) is rctd
        out.append((op, sa, flags & 0x01, cdb_len))
    return out


def test_rsoc_all_commands_matches_the_dispatch_table(lu: LogicalUnit) -> None:
    for rctd in (False, True):
        descriptors = parse_all(rsoc(lu, rctd=rctd).data, rctd)
        assert len(descriptors) == len(COMMANDS)
        expected = {
            (s.opcode, s.service_action or 0, int(s.service_action is not None), s.cdb_length)
            for s in COMMANDS
        }
        assert set(descriptors) == expected
        for _op, sa, servactv, _len in descriptors:
            assert servactv or sa == 0


def test_rsoc_one_command(lu: LogicalUnit) -> None:
    for spec in COMMANDS:
        if spec.service_action is None:
            r = rsoc(lu, 1, spec.opcode)
            assert_check(
                rsoc(lu, 2, spec.opcode), S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=2
            )
        else:
            assert_check(
                rsoc(lu, 1, spec.opcode, spec.service_action),
                S.INVALID_FIELD_IN_CDB,
                field_pointer=2,
                bit_pointer=2,
            )
            r = rsoc(lu, 2, spec.opcode, spec.service_action)
        d = r.data
        assert d[1] & 0x07 == 0x03
        assert struct.unpack_from(">H", d, 2)[0] == spec.cdb_length
        assert d[4 : 4 + spec.cdb_length] == spec.usage
        assert d[4] == spec.opcode
        three = rsoc(lu, 3, spec.opcode, spec.service_action or 0)
        assert three.data == d
    with_timeouts = rsoc(lu, 1, Op.READ_10, rctd=True).data
    assert with_timeouts[1] & 0x80 and struct.unpack_from(">H", with_timeouts, 14)[0] == 0x0A


def test_rsoc_unsupported_and_invalid(lu: LogicalUnit) -> None:
    assert rsoc(lu, 1, unsupported_opcode()).data == bytes((0, 1, 0, 0))
    sa = unsupported_service_action(Op.SERVICE_ACTION_IN_16)
    assert rsoc(lu, 2, Op.SERVICE_ACTION_IN_16, sa).data == bytes((0, 1, 0, 0))
    sa = unsupported_service_action(Op.MAINTENANCE_OUT)
    assert rsoc(lu, 2, Op.MAINTENANCE_OUT, sa).data == bytes((0, 1, 0, 0))
    assert_check(rsoc(lu, 4), S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=2)


def baseline_cdb(spec: Any) -> tuple[bytes, dict[str, Any]]:
    """A CDB for ``spec`` that succeeds on a fresh unit, and how to run it."""
    op = spec.opcode
    cdb = bytearray(spec.cdb_length)
    cdb[0] = op
    kw: dict[str, Any] = {}
    if op in C.BLOCK_LAYOUTS and op not in (Op.SYNCHRONIZE_CACHE_10, Op.SYNCHRONIZE_CACHE_16):
        layout = C.BLOCK_LAYOUTS[op]
        cdb[layout.length_offset + layout.length_bytes - 1] = 1
        if op in (Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16):
            kw["data_in"] = BS
        else:
            kw["data_out"] = bytes(BS)
    if spec.service_action is not None:
        cdb[1] = spec.service_action
    if op in (Op.INQUIRY, Op.MODE_SENSE_6):
        cdb[4] = 0xFF
        kw["data_in"] = 255
    if op in (Op.MODE_SENSE_10,):
        cdb[2] = 0x3F
        cdb[8] = 0xFF
        kw["data_in"] = 255
    if op == Op.MODE_SENSE_6:
        cdb[2] = 0x3F
    if op == Op.REQUEST_SENSE:
        cdb[4] = 0xFF
        kw["data_in"] = 255
    if op in (Op.REPORT_LUNS, Op.MAINTENANCE_IN):
        cdb[9] = 0xFF
        kw["data_in"] = 255
    if op == Op.SERVICE_ACTION_IN_16:
        cdb[13] = 32
        kw["data_in"] = 32
    if op == Op.READ_CAPACITY_10:
        kw["data_in"] = 8
    if op == Op.START_STOP_UNIT:
        cdb[4] = 0x01
    return bytes(cdb), kw


@pytest.mark.parametrize("spec", COMMANDS, ids=lambda s: s.name)
def test_cdb_usage_data_never_lies(spec: Any) -> None:
    """Every CDB bit REPORT SUPPORTED OPERATION CODES calls unused really is ignored."""
    cdb, kw = baseline_cdb(spec)
    reference = run(prepared_lu(spec), cdb, **kw)
    if (spec.opcode, spec.service_action) in _MUST_SUCCEED:
        assert reference.good, f"{spec.name} baseline failed: {reference.code}"
    # Otherwise a zeroed CDB may be refused (no parameter list, state to set up first): the
    # unused bits must then leave that refusal unchanged.
    for i in range(1, spec.cdb_length):
        for bit in range(8):
            if spec.usage[i] & (1 << bit):
                continue
            variant = bytearray(cdb)
            variant[i] ^= 1 << bit
            r = run(prepared_lu(spec), bytes(variant), **kw)
            assert (r.srb.scsi_status, r.srb.sense, r.data, r.srb.residual) == (
                reference.srb.scsi_status,
                reference.srb.sense,
                reference.data,
                reference.srb.residual,
            ), f"{spec.name}: byte {i} bit {bit} is reported unused but changes the outcome"


# ---------------------------------------------------------------------------------------------
# Robustness, threading, blocking I/O
# ---------------------------------------------------------------------------------------------

_OPCODES = st.one_of(st.sampled_from(sorted({s.opcode for s in COMMANDS})), st.integers(0, 255))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    op=_OPCODES,
    rest=st.binary(min_size=5, max_size=15),
    direction=st.sampled_from([DataDirection.NONE, DataDirection.IN, DataDirection.OUT]),
    edtl=st.integers(0, 4096),
    payload=st.binary(max_size=64),
    nexus=st.integers(0, 3),
)
def test_random_cdbs_never_raise(
    op: int, rest: bytes, direction: DataDirection, edtl: int, payload: bytes, nexus: int
) -> None:
    lu = _RANDOM_LU
    cdb = bytes((op,)) + rest
    buf = (
        bytearray((payload * (edtl // max(1, len(payload)) + 1))[:edtl])
        if payload
        else bytearray(edtl)
    )
    srb = Srb(
        cdb=cdb,
        data_direction=direction,
        data_transfer_length=edtl,
        sg_list=[memoryview(buf)] if direction is not DataDirection.NONE else [],
        nexus=nexus,
    )
    original = bytes(buf)
    lu.execute(srb)
    assert 0 <= srb.data_transfer_length <= edtl
    if srb.scsi_status in (ScsiStatus.GOOD, ScsiStatus.CONDITION_MET):
        assert srb.srb_status is SrbStatus.SUCCESS and srb.sense == b""
        if not direction & DataDirection.IN:
            assert bytes(buf) == original  # data-out buffers are never written to
    else:
        assert srb.srb_status is SrbStatus.ERROR
    if srb.scsi_status is ScsiStatus.CHECK_CONDITION:
        sense = parse_sense(srb.sense)
        assert sense.key != SenseKey.HARDWARE_ERROR, f"crashed on {cdb.hex()}"
        assert sense.key in (
            SenseKey.ILLEGAL_REQUEST,
            SenseKey.UNIT_ATTENTION,
            SenseKey.NOT_READY,
            SenseKey.DATA_PROTECT,
            SenseKey.MISCOMPARE,
            SenseKey.COPY_ABORTED,
        )
    # Restore a known state for the next example.
    if lu.stopped:
        lu.reset(ResetKind.POWER_ON)


_RANDOM_LU = make_lu(RamStore(64), max_transfer_blocks=64)


def test_needs_blocking_io(tmp_path: Path) -> None:
    ram = make_lu()
    assert not ram.needs_blocking_io(Srb(cdb=C.READ_10.build({})))
    disk = make_lu(FileStore(tmp_path / "b.img", 1 << 20))
    for layout in (C.READ_10, C.WRITE_16, C.SYNCHRONIZE_CACHE_10, C.VERIFY_12, C.START_STOP_UNIT):
        assert disk.needs_blocking_io(Srb(cdb=layout.build({})))
    for layout in (C.INQUIRY, C.TEST_UNIT_READY, C.MODE_SENSE_6, C.REPORT_LUNS, C.READ_CAPACITY_16):
        assert not disk.needs_blocking_io(Srb(cdb=layout.build({})))
    assert not disk.needs_blocking_io(Srb(cdb=b""))


def test_file_backed_data_round_trip_from_many_threads(tmp_path: Path) -> None:
    lu = make_lu(FileStore(tmp_path / "t.img", 512 * 4096, block_size=4096), clear=range(8))
    errors: list[str] = []
    told: set[int] = set()

    def attempt(cdb: bytes, nexus: int, **kw: Any) -> Result:
        # What an initiator does: a unit attention is news, not failure; note it and retry.
        while True:
            r = run(lu, cdb, nexus=nexus, **kw)
            if r.good or r.code != S.MODE_PARAMETERS_CHANGED:
                return r
            told.add(nexus)

    def worker(nexus: int) -> None:
        for rnd in range(25):
            lba = nexus * 64 + rnd
            payload = bytes([(nexus * 31 + rnd) & 0xFF]) * 8192
            fua = rnd % 5 == 0
            w = attempt(
                C.WRITE_16.build(dict(lba=lba, transfer_length=2, flags=dict(fua=fua))),
                nexus,
                data_out=payload,
            )
            r = attempt(C.READ_16.build(dict(lba=lba, transfer_length=2)), nexus, data_in=8192)
            if not (w.good and r.good and r.data == payload):
                errors.append(f"nexus {nexus} round {rnd}")
            if nexus == 0 and rnd in (10, 20):
                assert set_page_bit(lu, 0x08, 2, 0x04, rnd == 20, nexus=0).good

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert lu.write_cache_enabled
    # Every other nexus hears about the mode changes, during the run or on its next command.
    for nexus in range(1, 8):
        first = tur(lu, nexus)
        if not first.good:
            assert first.code == S.MODE_PARAMETERS_CHANGED
            told.add(nexus)
        assert tur(lu, nexus).good
    assert told == set(range(1, 8))
    assert tur(lu, 0).good


# ---------------------------------------------------------------------------------------------
# Baselines of the CDB usage test that need a prepared unit
# ---------------------------------------------------------------------------------------------

# The base and copy command sets: their baseline CDB must succeed.
_MUST_SUCCEED = {(s.opcode, s.service_action) for s in _BASE_COMMANDS + COPY_COMMANDS}


def _hold_copy_results(lu: LogicalUnit) -> None:
    """Leave a finished EXTENDED COPY's status held under list identifier 0."""
    target = bytes((0xE4, 0, 0, 0, 0x01, 0x03, 0, 8)) + lu.naa_id.to_bytes(8, "big")
    target += bytes(12) + BS.to_bytes(4, "big")
    segment = struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, 0, 0, 1, 0, 1)
    params = struct.pack(">BBH4xII", 0, 0, len(target), len(segment), 0) + target + segment
    cdb = bytes((Op.EXTENDED_COPY, 0)) + bytes(8) + struct.pack(">I", len(params)) + bytes(2)
    assert run(lu, cdb, data_out=params).good


_PREPARE: dict[tuple[int, int | None], Callable[[LogicalUnit], None]] = {
    (Op.RECEIVE_COPY_RESULTS, 0x00): _hold_copy_results,
}


def prepared_lu(spec: Any) -> LogicalUnit:
    lu = make_lu()
    prepare = _PREPARE.get((spec.opcode, spec.service_action))
    if prepare is not None:
        prepare(lu)
    return lu


# ---------------------------------------------------------------------------------------------
# Removable medium: RMB, load/eject, PREVENT ALLOW MEDIUM REMOVAL, MEDIUM NOT PRESENT
# ---------------------------------------------------------------------------------------------


def fixed_sense(key: int, asc: int, ascq: int, sks: bytes = bytes(3)) -> bytes:
    """Fixed-format (70h) sense data as the unit builds it, byte for byte."""
    return bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0)) + sks


NO_MEDIUM = fixed_sense(0x02, 0x3A, 0x00)
REMOVAL_PREVENTED = fixed_sense(0x05, 0x53, 0x02)


def eject(lu: LogicalUnit, *, nexus: int = NEXUS, no_flush: bool = False) -> Result:
    power = dict(loej=True, start=False, no_flush=no_flush)
    return run(lu, C.START_STOP_UNIT.build(dict(power=power)), nexus=nexus)


def load(lu: LogicalUnit, *, nexus: int = NEXUS) -> Result:
    return run(lu, C.START_STOP_UNIT.build(dict(power=dict(loej=True, start=True))), nexus=nexus)


def prevent(lu: LogicalUnit, on: bool, *, nexus: int = NEXUS) -> Result:
    return run(lu, C.PREVENT_ALLOW.build(dict(prevent=dict(prevent=int(on)))), nexus=nexus)


def test_removable_unit_reports_rmb() -> None:
    r = run(make_lu(removable=True), C.INQUIRY.build(dict(allocation_length=36)), data_in=36)
    assert r.data[1] == 0x80
    r = run(make_lu(), C.INQUIRY.build(dict(allocation_length=36)), data_in=36)
    assert r.data[1] == 0x00


def test_eject_and_load() -> None:
    store = CountingRamStore(BLOCKS)
    lu = make_lu(store, removable=True)
    assert write10(lu, 5, b"\x5a" * BS).good
    assert eject(lu).good
    assert store.flushes == 1  # the cache is written back before the medium leaves
    assert not lu.medium_present and lu.stopped
    # Every media access, and TEST UNIT READY, reports the missing medium.
    assert tur(lu).srb.sense == NO_MEDIUM
    assert read10(lu, 5, 1).srb.sense == NO_MEDIUM
    assert write10(lu, 5, bytes(BS)).srb.sense == NO_MEDIUM
    assert run(lu, C.READ_CAPACITY_10.build({}), data_in=8).srb.sense == NO_MEDIUM
    rc16 = run(lu, C.READ_CAPACITY_16.build(dict(allocation_length=32)), data_in=32)
    assert rc16.srb.sense == NO_MEDIUM
    assert run(lu, C.SYNCHRONIZE_CACHE_10.build({})).srb.sense == NO_MEDIUM
    verify = C.VERIFY_16.build(dict(lba=0, transfer_length=1))
    assert run(lu, verify).srb.sense == NO_MEDIUM
    # Non-media commands still work, and spinning up does not bring the medium back.
    assert run(lu, C.INQUIRY.build(dict(allocation_length=36)), data_in=36).good
    assert run(lu, C.START_STOP_UNIT.build(dict(power=dict(start=True)))).good
    assert tur(lu).srb.sense == NO_MEDIUM
    assert eject(lu).good and store.flushes == 1  # ejecting nothing flushes nothing
    assert load(lu).good
    assert lu.medium_present and not lu.stopped
    assert tur(lu).good
    assert read10(lu, 5, 1).data == b"\x5a" * BS


def test_eject_with_no_flush_skips_the_write_back() -> None:
    store = CountingRamStore(BLOCKS)
    lu = make_lu(store, removable=True)
    assert eject(lu, no_flush=True).good
    assert store.flushes == 0 and not lu.medium_present


def test_stopping_a_removable_unit_is_not_visible() -> None:
    store = CountingRamStore(BLOCKS)
    lu = make_lu(store, removable=True)
    assert run(lu, C.START_STOP_UNIT.build(dict(power=dict(start=False)))).good
    assert store.flushes == 1
    assert tur(lu).good and read10(lu, 0, 1).good  # it spins up on demand


def test_prevent_blocks_eject_and_load_from_every_nexus() -> None:
    lu = make_lu(removable=True, clear=(NEXUS, OTHER))
    assert prevent(lu, True).good
    r = eject(lu)
    assert r.srb.scsi_status is ScsiStatus.CHECK_CONDITION
    assert r.srb.sense == REMOVAL_PREVENTED
    assert lu.medium_present and tur(lu).good
    assert eject(lu, nexus=OTHER).srb.sense == REMOVAL_PREVENTED
    assert prevent(lu, False, nexus=OTHER).good  # allowing is per nexus: NEXUS still prevents
    assert eject(lu).srb.sense == REMOVAL_PREVENTED
    assert prevent(lu, False).good
    assert eject(lu).good
    # Prevention works without a medium, and then locks the medium out as well.
    assert prevent(lu, True).good
    assert load(lu).srb.sense == REMOVAL_PREVENTED
    assert not lu.medium_present
    assert prevent(lu, False).good
    assert load(lu).good and tur(lu).good


def test_prevention_ends_with_its_nexus() -> None:
    lu = make_lu(removable=True, clear=(NEXUS, OTHER))
    assert prevent(lu, True, nexus=OTHER).good
    assert eject(lu).srb.sense == REMOVAL_PREVENTED
    lu.nexus_gone(OTHER)
    assert eject(lu).good


@pytest.mark.parametrize("kind", list(ResetKind))
def test_resets_end_prevention_but_leave_the_medium_out(kind: ResetKind) -> None:
    lu = make_lu(removable=True)
    assert eject(lu).good
    assert prevent(lu, True).good
    lu.reset(kind)
    tur(lu)  # the reset's unit attention
    assert tur(lu).srb.sense == NO_MEDIUM
    assert load(lu).good and tur(lu).good
    assert prevent(lu, True).good
    lu.reset(kind)
    tur(lu)
    assert eject(lu).good


def test_fixed_unit_refuses_load_eject_even_when_prevented(lu: LogicalUnit) -> None:
    assert prevent(lu, True).good
    r = eject(lu)
    assert r.srb.sense == fixed_sense(0x05, 0x24, 0x00, bytes((0xC9, 0, 4)))  # C/D, BPV, bit 1
    assert load(lu).srb.sense == r.srb.sense
    assert lu.medium_present and tur(lu).good


def test_removable_power_conditions_leave_the_medium_in() -> None:
    lu = make_lu(removable=True)
    for pc in range(1, 16):
        cdb = C.START_STOP_UNIT.build(dict(power=dict(power_condition=pc, loej=True)))
        assert run(lu, cdb).good
        assert tur(lu).good and lu.medium_present


def test_no_medium_sense_follows_d_sense() -> None:
    lu = make_lu(removable=True)
    set_d_sense(lu, True)
    assert eject(lu).good
    assert tur(lu).srb.sense == bytes((0x72, 0x02, 0x3A, 0x00, 0, 0, 0, 0))


# ---------------------------------------------------------------------------------------------
# Software write protect (control mode page SWP)
# ---------------------------------------------------------------------------------------------

WRITE_PROTECTED = fixed_sense(0x07, 0x27, 0x00)


def set_swp(lu: LogicalUnit, on: bool, nexus: int = NEXUS) -> None:
    assert set_page_bit(lu, 0x0A, 4, 0x08, on, nexus=nexus).good


def test_swp_write_protects_the_medium() -> None:
    store = CountingRamStore(BLOCKS)
    lu = make_lu(store, clear=(NEXUS, OTHER))
    assert write10(lu, 3, b"\x11" * BS).good
    set_swp(lu, True)
    assert lu.write_protected and not lu.read_only
    assert mode_sense6(lu).data[2] & 0x80  # WP in the device-specific parameter
    assert mode_pages(mode_sense6(lu, page=0x0A).data, 4)[0x0A][4] & 0x08
    for layout in (C.WRITE_10, C.WRITE_12, C.WRITE_16, C.WRITE_VERIFY_10, C.WRITE_VERIFY_16):
        r = run(lu, layout.build(dict(lba=3, transfer_length=1)), data_out=b"\x22" * BS)
        assert r.srb.sense == WRITE_PROTECTED, layout
    r = run(lu, C.WRITE_6.build(dict(lba=3, transfer_length=1)), data_out=b"\x22" * BS)
    assert r.srb.sense == WRITE_PROTECTED
    assert read10(lu, 3, 1).data == b"\x11" * BS  # reads go on, nothing was overwritten
    # The other nexus is told, and is protected against as well.
    assert tur(lu, OTHER).code == S.MODE_PARAMETERS_CHANGED
    assert write10(lu, 3, bytes(BS), nexus=OTHER).srb.sense == WRITE_PROTECTED
    set_swp(lu, False)
    assert not lu.write_protected
    assert mode_sense6(lu).data[2] == 0x10
    assert write10(lu, 3, b"\x33" * BS).good
    assert read10(lu, 3, 1).data == b"\x33" * BS


def test_swp_is_changeable_and_cleared_by_a_reset(lu: LogicalUnit) -> None:
    changeable = mode_pages(mode_sense6(lu, page=0x0A, pc=1).data, 4)[0x0A]
    assert changeable[4] == 0x08
    assert mode_pages(mode_sense6(lu, page=0x0A, pc=2).data, 4)[0x0A][4] == 0  # default off
    set_swp(lu, True)
    lu.reset(ResetKind.LOGICAL_UNIT)
    tur(lu)
    assert not lu.write_protected and write10(lu, 0, bytes(BS)).good


def test_clearing_swp_keeps_a_read_only_unit_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(16 * BS))
    lu = make_lu(FileStore(path, read_only=True))
    set_swp(lu, True)
    set_swp(lu, False)
    assert lu.write_protected and lu.read_only
    assert write10(lu, 0, bytes(BS)).srb.sense == WRITE_PROTECTED
    assert mode_sense6(lu).data[2] & 0x80


# ---------------------------------------------------------------------------------------------
# REPORT SUPPORTED OPERATION CODES: command timeouts for every command
# ---------------------------------------------------------------------------------------------


def test_rsoc_reports_every_commands_timeout(lu: LogicalUnit) -> None:
    d = rsoc(lu, rctd=True).data
    seen: dict[tuple[int, int], int] = {}
    pos = 4
    while pos < len(d):
        op, sa, _flags, _cdb_len = struct.unpack_from(">BxHxBH", d, pos)
        length, nominal, recommended = struct.unpack_from(">HxxII", d, pos + 8)
        assert (length, nominal) == (0x0A, 0)
        seen[(op, sa)] = recommended
        pos += 20
    assert seen == {(s.opcode, s.service_action or 0): s.timeout for s in COMMANDS}
    assert all(t > 0 for t in seen.values())
    for spec in COMMANDS:
        options = 1 if spec.service_action is None else 2
        one = rsoc(lu, options, spec.opcode, spec.service_action or 0, rctd=True).data
        assert one[1] == 0x83
        timeouts = one[4 + spec.cdb_length :]
        assert struct.unpack(">HxxII", timeouts) == (0x0A, 0, spec.timeout)


# ---------------------------------------------------------------------------------------------
# Hooks the unit gives the provisioning module: the SANITIZE gate, WABEREQ/WACEREQ
# ---------------------------------------------------------------------------------------------


def test_every_command_meets_the_sanitize_gate_while_one_runs(lu: LogicalUnit) -> None:
    lu._sanitizing = True
    in_progress = fixed_sense(0x02, 0x04, 0x1B)
    assert read10(lu, 0, 1).srb.sense == in_progress
    assert tur(lu).srb.sense == in_progress
    assert run(lu, C.INQUIRY.build(dict(allocation_length=36)), data_in=36).good
    lu._sanitizing = False
    assert read10(lu, 0, 1).good


def test_block_device_characteristics_announce_sanitize_reads(lu: LogicalUnit) -> None:
    sanitize = any(spec.handler == "_sanitize" for spec in COMMANDS)
    assert vpd(lu, 0xB1)[7] == (0x50 if sanitize else 0x00)
