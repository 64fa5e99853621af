"""The logical unit's command set: the "firmware" of an emulated direct-access disk (SPC-4, SBC-3).

:class:`LogicalUnit` runs one CDB to completion against a :class:`~miniports.store.BlockStore`
and fills the SRB's outcome (status, sense, bytes moved, residual). It never raises: anything it
cannot do becomes the CHECK CONDITION the standards prescribe.

Design points worth knowing before changing anything here:

* One table (:data:`COMMANDS`) drives both dispatch and REPORT SUPPORTED OPERATION CODES, so the
  opcode list and the CDB usage bitmaps reported to initiators cannot drift from what
  ``execute`` does. A usage bit is set exactly where the code looks at the CDB.
* Unit attentions are kept per I_T nexus. A nexus the unit has never seen starts with 29/00
  (POWER ON, RESET, OR BUS DEVICE RESET OCCURRED): libiscsi's connect and iscsi-ls send TEST UNIT
  READY after login and retry on exactly that code, so a more specific 29/01 would fail their
  login. INQUIRY, REPORT LUNS and REQUEST SENSE do not report unit attentions (SAM-5).
* Residuals follow the iSCSI rule libiscsi's iSCSIResiduals tests check: data moves up to
  min(what the command wants, EDTL), including a partial block, and ``residual`` is EDTL minus
  what the command wanted (negative = overflow). Status stays GOOD.
* Per-I/O work (READ/WRITE) takes no lock and builds no objects beyond the store's copy; unit
  attention and mode state sit behind one lock that the fast path only touches when the nexus
  has something pending.
* Command-set modules test the same two attributes as READ/WRITE: ``_read_only`` (a read-only
  unit or store, or the control page's SWP: fail with WRITE PROTECTED) and ``_stopped`` (fail
  with ``_not_ready``: stopped, or MEDIUM NOT PRESENT once a removable medium is ejected).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Final

import structlog

from emuhba.scsi import sense as S
from emuhba.scsi.cdb import BLOCK_LAYOUTS, MAX_FLAT_LUN, decode_into, encode_lun
from emuhba.scsi.opcodes import (
    PERIPHERAL_DIRECT_ACCESS_BLOCK,
    SERVICE_ACTION_OPCODES,
    VERSION_ISCSI,
    VERSION_SAM_5,
    VERSION_SBC_3,
    VERSION_SPC_4,
    MaintenanceIn,
    Op,
    ServiceActionIn16,
)
from emuhba.scsi.sense import SenseCode, build_sense
from emuhba.srb import CdbFlags, DataDirection, ResetKind, ScsiStatus, Srb, SrbStatus
from miniports.lu_copy import COPY_COMMANDS, COPY_STORE_OPCODES, CopyMixin
from miniports.lu_provisioning import (
    PROVISIONING_COMMANDS,
    PROVISIONING_STORE_OPCODES,
    ProvisioningMixin,
)
from miniports.lu_reservations import (
    RESERVATION_COMMANDS,
    RESERVATION_STORE_OPCODES,
    ReservationsMixin,
)
from miniports.lu_spec import _C, _FF2, _FF4, _FF8, _RW1, _V1, CommandSpec
from miniports.lu_spec import usage as _usage
from miniports.store import BlockStore

_log = structlog.get_logger(__name__)

# A company ID in IEEE CID form (low nibble of the first octet 1010b) that is registered to nobody;
# fine for a lab, pass a real OUI/CID to make_naa_id for anything else.
EMUHBA_COMPANY_ID = 0x5AEBA0

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from

_IN = DataDirection.IN
_OUT = DataDirection.OUT
_FUA = int(CdbFlags.FUA)
_GOOD = ScsiStatus.GOOD
_SUCCESS = SrbStatus.SUCCESS
_CHECK = ScsiStatus.CHECK_CONDITION
_ERROR = SrbStatus.ERROR

_MIB = 1024 * 1024
_NACA = 0x04  # CONTROL byte bit 2


def make_naa_id(serial: str, company_id: int = EMUHBA_COMPANY_ID) -> int:
    """A 64-bit NAA IEEE Registered (5h) identifier: company ID + 36 bits hashed from ``serial``.

    The hash is stable across runs (unlike ``hash()``), so a unit keeps its identity and Linux
    keeps its /dev/disk/by-id name.
    """
    if not 0 <= company_id <= 0xFFFFFF:
        raise ValueError(f"company ID must be 24 bits: {company_id:#x}")
    digest = hashlib.blake2b(serial.encode(), digest_size=8).digest()
    vendor_specific = int.from_bytes(digest, "big") & ((1 << 36) - 1)
    return (0x5 << 60) | (company_id << 36) | vendor_specific


# fmt: off
_BASE_COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(Op.TEST_UNIT_READY, None, "TEST UNIT READY", _usage(0x00, 0, 0, 0, 0, _C),
                "_test_unit_ready"),
    CommandSpec(Op.REQUEST_SENSE, None, "REQUEST SENSE", _usage(0x03, 0x01, 0, 0, 0xFF, _C),
                "_request_sense", reports_ua=False),
    CommandSpec(Op.READ_6, None, "READ(6)", _usage(0x08, 0x1F, 0xFF, 0xFF, 0xFF, _C), "_read"),
    CommandSpec(Op.WRITE_6, None, "WRITE(6)", _usage(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, _C), "_write"),
    CommandSpec(Op.INQUIRY, None, "INQUIRY", _usage(0x12, 0x03, 0xFF, 0xFF, 0xFF, _C),
                "_inquiry", reports_ua=False),
    CommandSpec(Op.MODE_SELECT_6, None, "MODE SELECT(6)", _usage(0x15, 0x11, 0, 0, 0xFF, _C),
                "_mode_select"),
    CommandSpec(Op.MODE_SENSE_6, None, "MODE SENSE(6)", _usage(0x1A, 0x08, 0xFF, 0xFF, 0xFF, _C),
                "_mode_sense"),
    CommandSpec(Op.START_STOP_UNIT, None, "START STOP UNIT", _usage(0x1B, 0x01, 0, 0, 0xF7, _C),
                "_start_stop_unit", timeout=60),
    CommandSpec(Op.PREVENT_ALLOW, None, "PREVENT ALLOW MEDIUM REMOVAL",
                _usage(0x1E, 0, 0, 0, 0x03, _C), "_prevent_allow"),
    CommandSpec(Op.READ_CAPACITY_10, None, "READ CAPACITY(10)",
                _usage(0x25, 0, _FF4, 0, 0, 0x01, _C), "_read_capacity_10"),
    CommandSpec(Op.READ_10, None, "READ(10)", _usage(0x28, _RW1, _FF4, 0, _FF2, _C), "_read"),
    CommandSpec(Op.WRITE_10, None, "WRITE(10)", _usage(0x2A, _RW1, _FF4, 0, _FF2, _C), "_write"),
    CommandSpec(Op.WRITE_VERIFY_10, None, "WRITE AND VERIFY(10)",
                _usage(0x2E, _V1, _FF4, 0, _FF2, _C), "_write"),
    CommandSpec(Op.VERIFY_10, None, "VERIFY(10)", _usage(0x2F, _V1, _FF4, 0, _FF2, _C),
                "_verify"),
    CommandSpec(Op.SYNCHRONIZE_CACHE_10, None, "SYNCHRONIZE CACHE(10)",
                _usage(0x35, 0x02, _FF4, 0, _FF2, _C), "_synchronize_cache", timeout=60),
    CommandSpec(Op.MODE_SELECT_10, None, "MODE SELECT(10)",
                _usage(0x55, 0x11, 0, 0, 0, 0, 0, _FF2, _C), "_mode_select"),
    CommandSpec(Op.MODE_SENSE_10, None, "MODE SENSE(10)",
                _usage(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, _FF2, _C), "_mode_sense"),
    CommandSpec(Op.READ_16, None, "READ(16)", _usage(0x88, _RW1, _FF8, _FF4, 0, _C), "_read"),
    CommandSpec(Op.WRITE_16, None, "WRITE(16)", _usage(0x8A, _RW1, _FF8, _FF4, 0, _C), "_write"),
    CommandSpec(Op.WRITE_VERIFY_16, None, "WRITE AND VERIFY(16)",
                _usage(0x8E, _V1, _FF8, _FF4, 0, _C), "_write"),
    CommandSpec(Op.VERIFY_16, None, "VERIFY(16)", _usage(0x8F, _V1, _FF8, _FF4, 0, _C),
                "_verify"),
    CommandSpec(Op.SYNCHRONIZE_CACHE_16, None, "SYNCHRONIZE CACHE(16)",
                _usage(0x91, 0x02, _FF8, _FF4, 0, _C), "_synchronize_cache", timeout=60),
    CommandSpec(Op.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16, "READ CAPACITY(16)",
                _usage(0x9E, 0x1F, bytes(8), _FF4, 0, _C), "_read_capacity_16"),
    CommandSpec(Op.REPORT_LUNS, None, "REPORT LUNS", _usage(0xA0, 0, 0xFF, 0, 0, 0, _FF4, 0, _C),
                "_report_luns", reports_ua=False),
    CommandSpec(Op.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
                "REPORT SUPPORTED OPERATION CODES",
                _usage(0xA3, 0x1F, 0x87, 0xFF, _FF2, _FF4, 0, _C), "_report_supported_opcodes"),
    CommandSpec(Op.READ_12, None, "READ(12)", _usage(0xA8, _RW1, _FF4, _FF4, 0, _C), "_read"),
    CommandSpec(Op.WRITE_12, None, "WRITE(12)", _usage(0xAA, _RW1, _FF4, _FF4, 0, _C), "_write"),
    CommandSpec(Op.WRITE_VERIFY_12, None, "WRITE AND VERIFY(12)",
                _usage(0xAE, _V1, _FF4, _FF4, 0, _C), "_write"),
    CommandSpec(Op.VERIFY_12, None, "VERIFY(12)", _usage(0xAF, _V1, _FF4, _FF4, 0, _C),
                "_verify"),
)
# fmt: on

# Every command the unit supports: the base set above and what the command-set modules add.
COMMANDS: tuple[CommandSpec, ...] = (
    _BASE_COMMANDS + RESERVATION_COMMANDS + PROVISIONING_COMMANDS + COPY_COMMANDS)

# Per-I/O opcode tests against plain ints: an attribute of an enum class goes through
# EnumType.__getattr__'s slot (about 0.2 us each on the per-command path).
_OP_READ_6: Final = int(Op.READ_6)
_OP_WRITE_6: Final = int(Op.WRITE_6)
_OP_SANITIZE: Final = int(Op.SANITIZE)
# READs execute_cached may answer in line (READ(6) keeps LBA bits where the others keep the
# protection field, so it always takes the full path).
_CACHED_READS: Final = frozenset({int(Op.READ_10), int(Op.READ_12), int(Op.READ_16)})

# Commands that touch the store (data transfer or flush); START STOP UNIT flushes when stopping.
# fmt: off
_STORE_OPCODES = frozenset(
    {
        Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16,
        Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16,
        Op.WRITE_VERIFY_10, Op.WRITE_VERIFY_12, Op.WRITE_VERIFY_16,
        Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16,
        Op.SYNCHRONIZE_CACHE_10, Op.SYNCHRONIZE_CACHE_16,
        Op.START_STOP_UNIT,
    }
) | RESERVATION_STORE_OPCODES | PROVISIONING_STORE_OPCODES | COPY_STORE_OPCODES
# fmt: on
_WRITE_VERIFY = frozenset({Op.WRITE_VERIFY_10, Op.WRITE_VERIFY_12, Op.WRITE_VERIFY_16})

# ---------------------------------------------------------------------------------------------
# Mode pages: full page bytes (header included) and the mask of bits MODE SELECT may change
# ---------------------------------------------------------------------------------------------

PAGE_READ_WRITE_ERROR_RECOVERY = 0x01
PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_INFORMATIONAL_EXCEPTIONS = 0x1C
PAGE_ALL = 0x3F

_WCE = 0x04  # caching page byte 2
_D_SENSE = 0x04  # control page byte 2
_SWP = 0x08  # control page byte 4

_PAGE_DEFAULTS: dict[int, bytes] = {
    # AWRE and ARRE: reallocation is automatic (there is nothing to reallocate, nothing to report).
    PAGE_READ_WRITE_ERROR_RECOVERY: bytes((0x01, 0x0A, 0xC0)) + bytes(9),
    # WCE=1: writes complete before they are durable, SYNCHRONIZE CACHE or FUA makes them so.
    PAGE_CACHING: bytes((0x08, 0x12, _WCE)) + bytes(17),
    # TST=0 (one task set), D_SENSE=0, QUEUE ALGORITHM MODIFIER=1 (unrestricted reordering), QERR=0,
    # BUSY TIMEOUT PERIOD unlimited: the port retries BUSY instead of passing it up.
    PAGE_CONTROL: bytes((0x0A, 0x0A, 0x00, 0x10)) + bytes(4) + b"\xff\xff" + bytes(2),
    # DEXCPT=1: informational exceptions are not reported.
    PAGE_INFORMATIONAL_EXCEPTIONS: bytes((0x1C, 0x0A, 0x08)) + bytes(9),
}
_PAGE_CHANGEABLE: dict[int, bytes] = {
    PAGE_READ_WRITE_ERROR_RECOVERY: bytes(12),
    PAGE_CACHING: bytes((0, 0, _WCE)) + bytes(17),
    # SWP lets an initiator write-protect the medium (libiscsi's ModeSense6.Control-SWP).
    PAGE_CONTROL: bytes((0, 0, _D_SENSE, 0, _SWP)) + bytes(7),
    PAGE_INFORMATIONAL_EXCEPTIONS: bytes(12),
}
_PC_CURRENT, _PC_CHANGEABLE, _PC_DEFAULT, _PC_SAVED = 0, 1, 2, 3

# Unit attention each reset kind leaves behind (SAM-5).
_RESET_UA: dict[ResetKind, SenseCode] = {
    ResetKind.POWER_ON: S.POWER_ON_OCCURRED,
    ResetKind.LOGICAL_UNIT: S.BUS_DEVICE_RESET,
    ResetKind.TARGET: S.BUS_DEVICE_RESET,
    ResetKind.BUS: S.SCSI_BUS_RESET,
}
_RESET_ASC = 0x29

_Handler = Callable[[Srb, bytes], None]


def _ascii_field(value: str, width: int, what: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) > width or any(not 0x20 <= c <= 0x7E for c in raw):
        raise ValueError(f"{what} must be at most {width} printable ASCII characters: {value!r}")
    return raw.ljust(width, b" ")


def _scatter(payload: bytes, n: int, bufs: Sequence[memoryview]) -> int:
    src = memoryview(payload)
    pos = 0
    for buf in bufs:
        if pos >= n:
            break
        k = min(buf.nbytes, n - pos)
        buf[:k] = src[pos : pos + k]
        pos += k
    return pos


def _gather(bufs: Sequence[memoryview], n: int) -> bytes:
    parts: list[memoryview] = []
    remaining = n
    for buf in bufs:
        if remaining <= 0:
            break
        k = min(buf.nbytes, remaining)
        parts.append(buf[:k])
        remaining -= k
    return b"".join(parts)


def _first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    step = 4096
    for base in range(0, min(len(a), len(b)), step):
        x = a[base : base + step]
        y = b[base : base + step]
        if x != y:
            for i, (p, q) in enumerate(zip(x, y, strict=False)):
                if p != q:
                    return base + i
    return min(len(a), len(b))


class LogicalUnit(ReservationsMixin, ProvisioningMixin, CopyMixin):
    """An emulated SBC disk behind one LUN.

    ``target_luns`` lists every LUN of the owning target (REPORT LUNS asks it on each call, so
    adding a LUN needs no change here beyond :meth:`establish_unit_attention` with
    REPORTED_LUNS_DATA_CHANGED); ``peers`` maps them to their units, the copy targets
    EXTENDED COPY may name (without it the unit copies only within itself). ``removable``
    makes a removable-medium unit (RMB): START STOP UNIT loads and ejects, PREVENT ALLOW
    MEDIUM REMOVAL locks the medium in. ``execute`` may run concurrently on worker threads
    for a blocking store.
    """

    def __init__(
        self,
        store: BlockStore,
        *,
        lun: int,
        target_luns: Callable[[], Sequence[int]],
        serial: str,
        vendor: str = "EMUHBA",
        product: str | None = None,
        revision: str = "0001",
        naa_id: int | None = None,
        target_port_name: str = "",
        relative_port_id: int = 1,
        read_only: bool = False,
        optimal_transfer_blocks: int | None = None,
        max_transfer_blocks: int | None = None,
        removable: bool = False,
        peers: Callable[[], Mapping[int, LogicalUnit]] | None = None,
    ) -> None:
        self._store = store
        self._lun = lun
        self._target_luns = target_luns
        # The other units of the target (by LUN), for EXTENDED COPY between them.
        self._peers = peers
        # Write protection from the configuration or the store; _read_only, what every write
        # path tests, also follows the control page's SWP (set in _refresh_mode_flags).
        self._medium_read_only = read_only or store.read_only
        self._read_only = self._medium_read_only
        self._removable = removable
        self._block_size = store.block_size
        self._num_blocks = store.num_blocks
        self._blocking = store.blocking
        bs = self._block_size
        # Logical blocks per physical block, as the store declares it (4 KiB by default, so
        # initiators align I/O to the pages the stores allocate in).
        physical = store.physical_block_size or max(bs, 4096)
        per_physical = physical // bs
        if physical % bs or per_physical & (per_physical - 1) or per_physical > 1 << 15:
            raise ValueError(f"physical block of {physical} bytes for {bs}-byte blocks")
        self._lbppbe = per_physical.bit_length() - 1
        self._page_blocks = max(1, 4096 // bs, per_physical)
        self._max_transfer = max_transfer_blocks if max_transfer_blocks else max(1, 8 * _MIB // bs)
        self._optimal_transfer = (
            optimal_transfer_blocks if optimal_transfer_blocks else max(1, _MIB // bs)
        )
        if not 0 < self._max_transfer <= 0xFFFFFFFF or self._optimal_transfer <= 0:
            raise ValueError("transfer limits must be positive 32-bit block counts")
        if product is None:
            product = "FILEDISK" if store.blocking or store.file_backed else "RAMDISK"
        if not 0 < len(serial) <= 200:
            raise ValueError("a unit serial number takes 1 to 200 characters")
        self._vendor = _ascii_field(vendor, 8, "vendor")
        self._product = _ascii_field(product, 16, "product")
        self._revision = _ascii_field(revision, 4, "revision")
        self._serial = _ascii_field(serial, len(serial), "serial")
        self._naa_id = naa_id if naa_id is not None else make_naa_id(serial)
        if self._naa_id >> 60 != 0x5:
            raise ValueError(f"naa_id must be an NAA-5 identifier: {self._naa_id:#x}")
        name = target_port_name.encode("utf-8")
        if len(name) > 251:
            raise ValueError("target port name longer than a SCSI name string designator allows")
        self._target_port_name = name
        self._relative_port_id = relative_port_id

        self._lock = threading.Lock()
        # Pending unit attentions per known I_T nexus, oldest first.
        self._pending: dict[int, list[SenseCode]] = {}
        # Known nexuses with nothing pending: the fast path's lock-free membership test.
        self._clear: set[int] = set()
        # Nexuses holding a PREVENT MEDIUM REMOVAL: while any does, the medium stays put.
        self._prevent: set[int] = set()
        # I_T nexus -> (initiator port name, target port name), from the front end.
        self._nexus_ports: dict[int, tuple[str, str]] = {}
        # _stopped: media access fails with _not_ready (stopped, or no medium after an eject).
        self._stopped = False
        self._ejected = False
        self._not_ready = S.NOT_READY_STOPPED
        self._pages: dict[int, bytearray] = {}
        self._d_sense = False
        self._wce = True
        self._restore_mode_pages()
        self._init_reservations()
        self._init_provisioning()
        self._init_copy()

        self._std_inquiry = self._build_standard_inquiry()
        self._vpd = self._build_vpd_pages()
        self._handlers, self._cdb_length = self._build_dispatch()
        # False for the opcodes that never report a unit attention (SAM-5): INQUIRY, REPORT LUNS,
        # REQUEST SENSE. Unsupported opcodes do report one.
        silent = {s.opcode for s in COMMANDS if not s.reports_ua}
        self._reports_ua = tuple(op not in silent for op in range(256))

    # -----------------------------------------------------------------------------------------
    # Public surface
    # -----------------------------------------------------------------------------------------

    @property
    def lun(self) -> int:
        return self._lun

    @property
    def store(self) -> BlockStore:
        return self._store

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def read_only(self) -> bool:
        """Write-protected by configuration or by its store (SWP aside)."""
        return self._medium_read_only

    @property
    def write_protected(self) -> bool:
        """Writes are refused: read-only, or the control page's SWP is set."""
        return self._read_only

    @property
    def removable(self) -> bool:
        return self._removable

    @property
    def medium_present(self) -> bool:
        return not self._ejected

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def descriptor_sense(self) -> bool:
        """The control mode page's D_SENSE bit: CHECK CONDITION sense comes in 72h format."""
        return self._d_sense

    @property
    def write_cache_enabled(self) -> bool:
        return self._wce

    @property
    def naa_id(self) -> int:
        return self._naa_id

    def peer_units(self) -> Mapping[int, LogicalUnit]:
        """The units of this unit's target by LUN (this one included), for EXTENDED COPY."""
        if self._peers is None:
            return {self._lun: self}
        return self._peers()

    @property
    def commands(self) -> tuple[CommandSpec, ...]:
        return COMMANDS

    def execute(self, srb: Srb) -> None:
        """Run ``srb.cdb`` to completion and set the srb's outcome. Never raises."""
        try:
            self._execute(srb)
        except Exception:
            # A bug here must not take down the loop or a worker; the initiator sees a target failure.
            _log.exception("lu_command_crashed", lun=self._lun, cdb=bytes(srb.cdb).hex())
            self._fail(srb, S.INTERNAL_TARGET_FAILURE)

    def execute_cached(self, srb: Srb) -> bool:
        """Run a READ now, on the calling thread, when all it needs is data the store already
        holds in memory (``BlockStore.read_cached``: a file's page cache) and every check passes
        at once, as for nearly every command. True when ``srb`` was completed. False when
        nothing was done (no unit attention taken, no error answered): ``execute`` must run it,
        somewhere it may block."""
        cdb = srb.cdb
        if not srb.cdb_decoded or not cdb or srb.data_direction != _IN:
            return False
        op = cdb[0]
        length = self._cdb_length[op]
        # _execute's gates and _block_prologue's fast case, all passing: a READ(10/12/16) from
        # a nexus with no unit attention pending, no reservation or SANITIZE in force, NACA
        # clear, no protection bits, a length within limits, a started unit, in range.
        if (op not in _CACHED_READS or srb.nexus not in self._clear or self._sanitizing
                or self._reserved or len(cdb) < length or cdb[length - 1] & _NACA
                or cdb[1] & 0xE0 or srb.transfer_blocks > self._max_transfer or self._stopped
                or self._handlers[op] is None):
            return False
        lba = srb.lba
        blocks = srb.transfer_blocks
        if self._out_of_range(lba, blocks):
            return False
        bs = self._block_size
        wanted = blocks * bs
        edtl = srb.data_transfer_length
        n = wanted if wanted <= edtl else edtl
        try:
            moved = self._store.read_cached(lba * bs, n, srb.sg_list) if n else 0
        except OSError:
            return False  # let the full path meet the error and answer it
        if moved is None:
            return False
        self._good(srb, moved, wanted)
        return True

    def unit_attention_pending(self, nexus: int) -> bool:
        """Whether the next command from ``nexus`` would be answered with a unit attention
        (a nexus never seen has its power-on one pending)."""
        return nexus not in self._clear

    def needs_blocking_io(self, srb: Srb) -> bool:
        """True when ``execute(srb)`` may block: it touches a store whose I/O may block, or it
        waits for a long operation (SANITIZE) whatever the store. Run it off the loop."""
        cdb = srb.cdb
        if not cdb:
            return False
        op = cdb[0]
        return op == _OP_SANITIZE or (self._blocking and op in _STORE_OPCODES)

    def reset(self, kind: ResetKind) -> None:
        """Apply a reset: every known nexus gets the matching unit attention (replacing whatever
        was pending), mode parameters return to their defaults (nothing is saved), per-nexus
        state is cleared. A power-on also starts a stopped unit (an ejected medium stays out)."""
        code = _RESET_UA[kind]
        self._reservations_reset(kind)
        with self._lock:
            self._restore_mode_pages()
            if kind is ResetKind.POWER_ON:
                self._stopped = self._ejected
            self._prevent.clear()
            self._clear.clear()
            for pending in self._pending.values():
                pending[:] = [code]

    def nexus_opened(self, nexus: int, initiator_port: str, target_port: str) -> None:
        """The port names behind ``nexus`` (persistent reservations report and key by them)."""
        self._nexus_ports[nexus] = (initiator_port, target_port)

    def nexus_ports(self, nexus: int) -> tuple[str, str] | None:
        """(initiator port name, target port name) of ``nexus``, if the front end said."""
        return self._nexus_ports.get(nexus)

    def nexus_gone(self, nexus: int) -> None:
        """The I_T nexus ended (session closed): forget it. If it returns it is new again."""
        self._reservations_nexus_gone(nexus)
        self._copy_nexus_gone(nexus)
        with self._lock:
            self._pending.pop(nexus, None)
            self._clear.discard(nexus)
            self._prevent.discard(nexus)

    def establish_unit_attention(
        self, code: SenseCode, *, nexus: int | None = None, except_nexus: int | None = None
    ) -> None:
        """Queue ``code`` for one known nexus, or for every known nexus but ``except_nexus``.

        For conditions raised outside the command set: REPORTED LUNS DATA HAS CHANGED when the
        target's LUN map changes, COMMANDS CLEARED BY ANOTHER INITIATOR after a CLEAR TASK SET.
        Nexuses not yet seen get 29/00 first anyway, which supersedes these.
        """
        with self._lock:
            targets = [nexus] if nexus is not None else list(self._pending)
            for n in targets:
                if n == except_nexus or n not in self._pending:
                    continue
                self._queue_ua(n, code)

    # -----------------------------------------------------------------------------------------
    # Dispatch, unit attentions and completion helpers
    # -----------------------------------------------------------------------------------------

    def _build_dispatch(self) -> tuple[tuple[_Handler | None, ...], tuple[int, ...]]:
        handlers: list[_Handler | None] = [None] * 256
        lengths = [0] * 256
        by_opcode: dict[int, list[CommandSpec]] = {}
        for spec in COMMANDS:
            by_opcode.setdefault(spec.opcode, []).append(spec)
        for op, specs in by_opcode.items():
            lengths[op] = specs[0].cdb_length
            if specs[0].service_action is None:
                handlers[op] = getattr(self, specs[0].handler)
            else:
                table = {int(s.service_action or 0): getattr(self, s.handler) for s in specs}
                handlers[op] = partial(self._dispatch_service_action, table)
        return tuple(handlers), tuple(lengths)

    def _dispatch_service_action(self, table: dict[int, _Handler], srb: Srb, cdb: bytes) -> None:
        handler = table.get(cdb[1] & 0x1F)
        if handler is None:
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)
            return
        handler(srb, cdb)

    def _execute(self, srb: Srb) -> None:
        cdb = bytes(srb.cdb) if not isinstance(srb.cdb, bytes) else srb.cdb
        if not cdb:
            self._fail(srb, S.INVALID_OPCODE)
            return
        op = cdb[0]
        handler = self._handlers[op]
        if self._sanitizing and self._sanitize_gate(srb, op):
            return  # a SANITIZE runs: NOT READY, SANITIZE IN PROGRESS for most commands
        if srb.nexus not in self._clear and self._unit_attention(srb, op):
            return
        if self._reserved and self._reservation_conflict(srb, op):
            return
        if handler is None:
            self._fail(srb, S.INVALID_OPCODE, field_pointer=0, bit_pointer=7)
            return
        length = self._cdb_length[op]
        if len(cdb) < length:
            self._fail(srb, S.INVALID_FIELD_IN_CDB)
            return
        if cdb[length - 1] & _NACA:
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=length - 1, bit_pointer=2)
            return
        handler(srb, cdb)

    def _unit_attention(self, srb: Srb, op: int) -> bool:
        """Register a new nexus; report (and clear) its oldest unit attention if the command is
        one that reports them. True when the srb was completed with the unit attention."""
        nexus = srb.nexus
        with self._lock:
            pending = self._pending.get(nexus)
            if pending is None:
                pending = [S.POWER_ON_RESET]
                self._pending[nexus] = pending
            if not self._reports_ua[op]:
                return False
            if not pending:
                self._clear.add(nexus)
                return False
            code = pending.pop(0)
            if not pending:
                self._clear.add(nexus)
        self._fail(srb, code)
        return True

    def _queue_ua(self, nexus: int, code: SenseCode) -> None:
        # Caller holds the lock. A reset condition supersedes everything queued before it.
        pending = self._pending[nexus]
        if code.asc == _RESET_ASC:
            pending[:] = [code]
        elif code not in pending:
            pending.append(code)
        self._clear.discard(nexus)

    def _take_ua(self, nexus: int, only: SenseCode | None = None) -> SenseCode | None:
        with self._lock:
            pending = self._pending.get(nexus)
            if not pending:
                return None
            if only is None:
                code: SenseCode | None = pending.pop(0)
            elif only in pending:
                pending.remove(only)
                code = only
            else:
                code = None
            if not pending:
                self._clear.add(nexus)
            return code

    def _fail(
        self,
        srb: Srb,
        code: SenseCode,
        *,
        field_pointer: int | None = None,
        bit_pointer: int | None = None,
        cd: bool = True,
        information: int | None = None,
    ) -> None:
        srb.sense = build_sense(
            code,
            descriptor=self._d_sense,
            information=information,
            field_pointer=field_pointer,
            cd=cd and field_pointer is not None,
            bit_pointer=bit_pointer,
        )
        srb.scsi_status = _CHECK
        srb.srb_status = _ERROR
        # Nothing of the expected transfer took place.
        srb.residual = srb.data_transfer_length
        srb.data_transfer_length = 0

    @staticmethod
    def _good(srb: Srb, moved: int, wanted: int) -> None:
        srb.residual = srb.data_transfer_length - wanted
        srb.data_transfer_length = moved
        srb.scsi_status = _GOOD
        srb.srb_status = _SUCCESS
        srb.sense = b""

    def _data_in(self, srb: Srb, payload: bytes, allocation_length: int) -> None:
        wanted = min(len(payload), allocation_length)
        edtl = srb.data_transfer_length
        n = min(wanted, edtl) if srb.data_direction == _IN else 0
        moved = _scatter(payload, n, srb.sg_list) if n else 0
        self._good(srb, moved, wanted)

    def _data_out(self, srb: Srb, length: int) -> bytes:
        """Up to ``length`` bytes of the data-out buffer (less when the initiator sent less)."""
        if srb.data_direction != _OUT:
            return b""
        return _gather(srb.sg_list, min(length, srb.data_transfer_length))

    # -----------------------------------------------------------------------------------------
    # Block commands
    # -----------------------------------------------------------------------------------------

    def _block_prologue(
        self, srb: Srb, cdb: bytes, protect_checked: bool, transfers: bool = True
    ) -> bool:
        """Decode and validate a media-access CDB; False when the srb was completed with an error.

        ``transfers``: the block count is a data transfer, bounded by the Block Limits page's
        MAXIMUM TRANSFER LENGTH (not so for SYNCHRONIZE CACHE or a VERIFY without BYTCHK).
        """
        if (srb.cdb_decoded and not cdb[1] & 0xE0 and srb.transfer_blocks <= self._max_transfer
                and not self._stopped):
            # The per-I/O case, every check passed at once: decoded by the port already, no
            # xxPROTECT bits (or, for the 6-byte forms, none of the LBA bits sharing that
            # byte), a length within limits, a started unit.
            return True
        if not srb.cdb_decoded:
            error = decode_into(srb)
            if error is not None:
                self._fail(srb, error)
                return False
        if protect_checked and cdb[1] & 0xE0:
            # No protection information on this unit: any xxPROTECT value but zero is invalid.
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=7)
            return False
        if transfers and srb.transfer_blocks > self._max_transfer:
            layout = BLOCK_LAYOUTS[cdb[0]]
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=layout.length_offset)
            return False
        if self._stopped:
            self._fail(srb, self._not_ready)
            return False
        return True

    def _out_of_range(self, lba: int, blocks: int) -> bool:
        nb = self._num_blocks
        return lba >= nb or blocks > nb - lba

    def _read(self, srb: Srb, cdb: bytes) -> None:
        if not self._block_prologue(srb, cdb, cdb[0] != _OP_READ_6):
            return
        lba = srb.lba
        blocks = srb.transfer_blocks
        if self._out_of_range(lba, blocks):
            self._fail(srb, S.LBA_OUT_OF_RANGE)
            return
        bs = self._block_size
        wanted = blocks * bs
        edtl = srb.data_transfer_length
        n = wanted if wanted <= edtl else edtl
        moved = 0
        if n and srb.data_direction == _IN:
            try:
                moved = self._store.read_into(lba * bs, n, srb.sg_list)
            except OSError:
                self._fail(srb, S.UNRECOVERED_READ_ERROR, information=lba)
                return
        self._good(srb, moved, wanted)

    def _write(self, srb: Srb, cdb: bytes) -> None:
        op = cdb[0]
        if not self._block_prologue(srb, cdb, op != _OP_WRITE_6):
            return
        verify = op in _WRITE_VERIFY
        if verify and cdb[1] & 0x04:
            # BYTCHK 10b is reserved and 11b (compare against one block) is not supported.
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=2)
            return
        if self._read_only:
            self._fail(srb, S.WRITE_PROTECTED)
            return
        lba = srb.lba
        blocks = srb.transfer_blocks
        if self._out_of_range(lba, blocks):
            self._fail(srb, S.LBA_OUT_OF_RANGE)
            return
        bs = self._block_size
        wanted = blocks * bs
        edtl = srb.data_transfer_length
        n = wanted if wanted <= edtl else edtl
        moved = 0
        store = self._store
        try:
            if n and srb.data_direction == _OUT:
                moved = store.write_from(lba * bs, n, srb.sg_list)
            # Write-through when the cache is off, when asked (FUA), and for WRITE AND VERIFY,
            # which verifies what is on the medium rather than in a cache.
            if moved and (int(srb.cdb_flags) & _FUA or verify or not self._wce):
                store.flush()
        except OSError:
            self._fail(srb, S.WRITE_ERROR, information=lba)
            return
        # WRITE AND VERIFY with BYTCHK=1 compares the medium with the data just written: the
        # store returns what it was given, so the comparison cannot fail.
        self._good(srb, moved, wanted)

    def _verify(self, srb: Srb, cdb: bytes) -> None:
        bytchk = (cdb[1] >> 1) & 0x03
        if not self._block_prologue(srb, cdb, True, transfers=bytchk != 0):
            return
        if bytchk > 1:
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=2)
            return
        lba = srb.lba
        blocks = srb.transfer_blocks
        if self._out_of_range(lba, blocks):
            self._fail(srb, S.LBA_OUT_OF_RANGE)
            return
        if bytchk == 0:
            # Medium verification: RAM and files have no unreadable sectors to find.
            self._good(srb, 0, 0)
            return
        bs = self._block_size
        wanted = blocks * bs
        expected = self._data_out(srb, wanted)
        medium = bytearray(len(expected))
        if expected:
            try:
                self._store.read_into(lba * bs, len(expected), [memoryview(medium)])
            except OSError:
                self._fail(srb, S.UNRECOVERED_READ_ERROR, information=lba)
                return
        if medium != expected:
            offset = _first_difference(medium, expected)
            self._fail(srb, S.MISCOMPARE, information=offset)
            return
        self._good(srb, len(expected), wanted)

    def _synchronize_cache(self, srb: Srb, cdb: bytes) -> None:
        if not self._block_prologue(srb, cdb, False, transfers=False):
            return
        lba = srb.lba
        blocks = srb.transfer_blocks
        if blocks == 0:
            blocks = max(0, self._num_blocks - lba)  # 0 means through the last LBA
        if self._out_of_range(lba, blocks):
            self._fail(srb, S.LBA_OUT_OF_RANGE)
            return
        try:
            self._store.flush()
        except OSError:
            self._fail(srb, S.WRITE_ERROR)
            return
        # IMMED only lets us answer early; finishing the flush first is also correct.
        self._good(srb, 0, 0)

    def _read_capacity_10(self, srb: Srb, cdb: bytes) -> None:
        if self._ejected:
            self._fail(srb, S.MEDIUM_NOT_PRESENT)
            return
        if not cdb[8] & 0x01 and _U32(cdb, 2)[0]:
            # Without PMI the LBA field must be zero (SBC-3).
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2)
            return
        last = self._num_blocks - 1
        data = struct.pack(">II", min(last, 0xFFFFFFFF), self._block_size)
        self._data_in(srb, data, 8)

    def _read_capacity_16(self, srb: Srb, cdb: bytes) -> None:
        if self._ejected:
            self._fail(srb, S.MEDIUM_NOT_PRESENT)
            return
        allocation = _U32(cdb, 10)[0]
        data = struct.pack(
            ">QIBBH16x",
            self._num_blocks - 1,
            self._block_size,
            0,  # no protection information
            self._lbppbe,  # P_I_EXPONENT 0, logical blocks per physical block exponent
            self._provisioning_rc16_bits(),  # LBPME, LBPRZ; lowest aligned LBA 0
        )
        self._data_in(srb, data, allocation)

    # -----------------------------------------------------------------------------------------
    # Non-media commands
    # -----------------------------------------------------------------------------------------

    def _test_unit_ready(self, srb: Srb, cdb: bytes) -> None:
        if self._stopped:
            self._fail(srb, self._not_ready)
            return
        self._good(srb, 0, 0)

    def _request_sense(self, srb: Srb, cdb: bytes) -> None:
        code = self._take_ua(srb.nexus) or S.NO_SENSE
        self._data_in(srb, build_sense(code, descriptor=bool(cdb[1] & 0x01)), cdb[4])

    def _start_stop_unit(self, srb: Srb, cdb: bytes) -> None:
        control = cdb[4]
        if control >> 4:
            # A power condition transition: nothing to model, and START/LOEJ are ignored (SBC-3).
            self._good(srb, 0, 0)
            return
        start = bool(control & 0x01)
        if control & 0x02:
            self._load_eject(srb, start, flush=not control & 0x04)
            return
        if start:
            with self._lock:
                # Spinning up does not bring back an ejected medium.
                self._stopped = self._ejected
        else:
            if not control & 0x04 and not self._ejected:  # NO_FLUSH clear: write back first
                try:
                    self._store.flush()
                except OSError:
                    self._fail(srb, S.WRITE_ERROR)
                    return
            if not self._removable:
                with self._lock:
                    self._stopped = True
            # A removable-medium drive spins up again on the next access (as USB sticks and
            # optical drives do): stopping it is not visible, and libiscsi's
            # StartStopUnit.NoLoej expects TEST UNIT READY to stay GOOD.
        self._good(srb, 0, 0)

    def _load_eject(self, srb: Srb, load: bool, flush: bool) -> None:
        if not self._removable:
            # LOEJ on a fixed medium: there is nothing to load or eject.
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=4, bit_pointer=1)
            return
        with self._lock:
            prevented = bool(self._prevent)
        if prevented:
            # Loading is refused as well: libiscsi's PreventAllow.Eject expects it, and a drive
            # with its tray locked cannot take a cartridge in either.
            self._fail(srb, S.MEDIUM_REMOVAL_PREVENTED)
            return
        if not load and flush and not self._ejected:
            try:
                self._store.flush()
            except OSError:
                self._fail(srb, S.WRITE_ERROR)
                return
        with self._lock:
            self._ejected = not load
            self._stopped = not load
            self._not_ready = S.NOT_READY_STOPPED if load else S.MEDIUM_NOT_PRESENT
        self._good(srb, 0, 0)

    def _prevent_allow(self, srb: Srb, cdb: bytes) -> None:
        with self._lock:
            if cdb[4] & 0x03:
                self._prevent.add(srb.nexus)
            else:
                self._prevent.discard(srb.nexus)
        self._good(srb, 0, 0)

    def _report_luns(self, srb: Srb, cdb: bytes) -> None:
        select = cdb[2]
        allocation = _U32(cdb, 6)[0]
        if select > 2:
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2)
            return
        if allocation < 16:
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=6)
            return
        # Select 1 asks for well-known LUNs only; this target has none.
        luns = (
            []
            if select == 1
            else sorted({lun for lun in self._target_luns() if 0 <= lun <= MAX_FLAT_LUN})
        )
        body = b"".join(encode_lun(lun) for lun in luns)
        self._take_ua(srb.nexus, only=S.REPORTED_LUNS_DATA_CHANGED)
        self._data_in(srb, struct.pack(">I4x", len(body)) + body, allocation)

    # INQUIRY ------------------------------------------------------------------------------------

    def _inquiry(self, srb: Srb, cdb: bytes) -> None:
        flags = cdb[1]
        page = cdb[2]
        allocation = _U16(cdb, 3)[0]
        if flags & 0x02:
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=1)  # CmdDt
            return
        if not flags & 0x01:
            if page:
                self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2)
                return
            data = self._std_inquiry
        else:
            vpd = self._vpd.get(page)
            if vpd is None:
                self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2)
                return
            data = vpd
        self._data_in(srb, data, allocation)

    def _build_standard_inquiry(self) -> bytes:
        data = bytearray(96)
        data[0] = PERIPHERAL_DIRECT_ACCESS_BLOCK  # qualifier 0: connected
        data[1] = 0x80 if self._removable else 0x00  # RMB
        data[2] = 0x06  # SPC-4
        data[3] = 0x10 | 0x02  # HISUP, response data format 2
        data[4] = len(data) - 5
        data[7] = 0x02  # CMDQUE
        data[8:16] = self._vendor
        data[16:32] = self._product
        data[32:36] = self._revision
        struct.pack_into(
            ">4H", data, 58, VERSION_SAM_5, VERSION_SPC_4, VERSION_SBC_3, VERSION_ISCSI
        )
        return bytes(data)

    def _vpd_page(self, code: int, body: bytes) -> bytes:
        return struct.pack(">BBH", PERIPHERAL_DIRECT_ACCESS_BLOCK, code, len(body)) + body

    def _build_vpd_pages(self) -> dict[int, bytes]:
        pages: dict[int, bytes] = {}
        serial = self._serial.rstrip(b" ")
        pages[0x80] = self._vpd_page(0x80, serial)

        designators = [
            # NAA IEEE Registered, binary, associated with the logical unit.
            bytes((0x01, 0x03, 0x00, 0x08)) + self._naa_id.to_bytes(8, "big"),
            # T10 vendor ID based, ASCII: vendor, product, serial.
            bytes((0x02, 0x01, 0x00, 8 + 16 + len(serial))) + self._vendor + self._product + serial,
            # Relative target port identifier, associated with the target port.
            bytes((0x01, 0x14, 0x00, 0x04)) + struct.pack(">xxH", self._relative_port_id),
        ]
        if self._target_port_name:
            # SCSI name string (iSCSI, UTF-8, PIV=1, target port): NUL-terminated, padded to 4.
            name = self._target_port_name + b"\x00"
            name += b"\x00" * (-len(name) % 4)
            designators.append(bytes((0x53, 0x98, 0x00, len(name))) + name)
        pages[0x83] = self._vpd_page(0x83, b"".join(designators))

        limits = bytearray(0x3C)
        struct.pack_into(">H", limits, 2, self._page_blocks)  # optimal transfer granularity
        struct.pack_into(">I", limits, 4, self._max_transfer)
        struct.pack_into(">I", limits, 8, self._optimal_transfer)
        # The provisioning module fills in what its commands allow (prefetch, unmap, write
        # same, atomic write lengths...).
        self._provisioning_block_limits(limits)
        pages[0xB0] = self._vpd_page(0xB0, bytes(limits))

        characteristics = bytearray(0x3C)
        struct.pack_into(">H", characteristics, 0, 0x0001)  # medium rotation rate: non-rotating
        if any(spec.handler == "_sanitize" for spec in COMMANDS):
            # WABEREQ = WACEREQ = 01b: after a block or crypto erase, reads succeed (the
            # sanitized blocks are deallocated and read as zeros).
            characteristics[3] = 0x50
        pages[0xB1] = self._vpd_page(0xB1, bytes(characteristics))

        # Logical block provisioning (LBPU, LBPWS, provisioning type...): the module's say.
        pages[0xB2] = self._vpd_page(0xB2, self._provisioning_vpd_b2())

        # Third-party copy: what EXTENDED COPY accepts (the copy module's say).
        pages[0x8F] = self._vpd_page(0x8F, self._copy_vpd_8f())

        supported = sorted({0x00, *pages})
        pages[0x00] = self._vpd_page(0x00, bytes(supported))
        return pages

    # MODE SENSE / MODE SELECT --------------------------------------------------------------------

    def _restore_mode_pages(self) -> None:
        # Caller holds the lock (or is __init__).
        self._pages = {code: bytearray(page) for code, page in _PAGE_DEFAULTS.items()}
        self._refresh_mode_flags()

    def _refresh_mode_flags(self) -> None:
        control = self._pages[PAGE_CONTROL]
        self._d_sense = bool(control[2] & _D_SENSE)
        self._wce = bool(self._pages[PAGE_CACHING][2] & _WCE)
        # SWP: no need to flush first, what was written stays written; new writes are refused.
        self._read_only = self._medium_read_only or bool(control[4] & _SWP)

    def _block_descriptor(self, long_lba: bool, pc: int) -> bytes:
        if pc == _PC_CHANGEABLE:
            return bytes(16 if long_lba else 8)  # capacity and block length cannot be changed
        if long_lba:
            return struct.pack(">Q4xI", self._num_blocks, self._block_size)
        blocks = min(self._num_blocks, 0xFFFFFFFF)
        return struct.pack(">II", blocks, self._block_size & 0xFFFFFF)  # density code 0

    def _mode_sense(self, srb: Srb, cdb: bytes) -> None:
        ten = cdb[0] == Op.MODE_SENSE_10
        dbd = cdb[1] & 0x08
        long_lba = ten and bool(cdb[1] & 0x10)
        allocation = _U16(cdb, 7)[0] if ten else cdb[4]
        pc = cdb[2] >> 6
        page = cdb[2] & 0x3F
        subpage = cdb[3]
        if pc == _PC_SAVED:
            self._fail(srb, S.SAVING_PARAMETERS_NOT_SUPPORTED, field_pointer=2, bit_pointer=7)
            return
        if page == PAGE_ALL:
            codes = sorted(_PAGE_DEFAULTS)
        elif page in _PAGE_DEFAULTS:
            codes = [page]
        else:
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=5)
            return
        if subpage not in (0x00, 0xFF):  # no page here has subpages
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=3)
            return
        with self._lock:
            if pc == _PC_CURRENT:
                body = b"".join(bytes(self._pages[c]) for c in codes)
            elif pc == _PC_CHANGEABLE:
                body = b"".join(_PAGE_DEFAULTS[c][:2] + _PAGE_CHANGEABLE[c][2:] for c in codes)
            else:
                body = b"".join(_PAGE_DEFAULTS[c] for c in codes)
        descriptor = b"" if dbd else self._block_descriptor(long_lba, pc)
        # Device-specific parameter: WP when write-protected (SWP included), DPOFUA (both bits
        # honoured).
        device_specific = (0x80 if self._read_only else 0x00) | 0x10
        if ten:
            total = 8 + len(descriptor) + len(body)
            header = struct.pack(
                ">HBBBxH",
                total - 2,
                0,
                device_specific,
                0x01 if descriptor and long_lba else 0x00,
                len(descriptor),
            )
        else:
            total = 4 + len(descriptor) + len(body)
            header = bytes((total - 1, 0, device_specific, len(descriptor)))
        self._data_in(srb, header + descriptor + body, allocation)

    def _mode_select(self, srb: Srb, cdb: bytes) -> None:
        ten = cdb[0] == Op.MODE_SELECT_10
        length = _U16(cdb, 7)[0] if ten else cdb[4]
        if cdb[1] & 0x01:
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=0)  # SP
            return
        if length == 0:
            self._good(srb, 0, 0)  # an empty parameter list is not an error (SPC-4)
            return
        if not cdb[1] & 0x10:
            # PF=0 would make the pages vendor specific; ours follow the standard page format.
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)
            return
        data = self._data_out(srb, length)
        header = 8 if ten else 4
        if len(data) < header:
            self._fail(srb, S.PARAMETER_LIST_LENGTH_ERROR)
            return
        if ten:
            medium, long_lba, descriptor_length = data[2], bool(data[4] & 0x01), _U16(data, 6)[0]
        else:
            medium, long_lba, descriptor_length = data[1], False, data[3]
        if medium:
            self._fail_parameter(srb, 2 if ten else 1)
            return
        if descriptor_length not in (0, 16 if long_lba else 8):
            self._fail_parameter(srb, 6 if ten else 3)
            return
        pos = header
        if descriptor_length:
            if len(data) < pos + descriptor_length:
                self._fail(srb, S.PARAMETER_LIST_LENGTH_ERROR)
                return
            if long_lba:
                blocks, block_length = _U64(data, pos)[0], _U32(data, pos + 12)[0]
                length_at = pos + 12
                current = self._num_blocks
            else:
                blocks = _U32(data, pos)[0]
                block_length = _U32(data, pos + 4)[0] & 0xFFFFFF
                length_at = pos + 5
                current = min(self._num_blocks, 0xFFFFFFFF)
            if blocks not in (0, current):
                self._fail_parameter(srb, pos)  # the capacity is fixed
                return
            if block_length != self._block_size:
                self._fail_parameter(srb, length_at)
                return
            pos += descriptor_length
        with self._lock:
            staged: dict[int, bytearray] = {}
            while pos < len(data):
                if len(data) - pos < 2:
                    self._fail(srb, S.PARAMETER_LIST_LENGTH_ERROR)
                    return
                first = data[pos]
                code = first & 0x3F
                if first & 0x40:
                    self._fail_parameter(srb, pos, 6)  # SPF: no subpages here
                    return
                current_page = self._pages.get(code)
                if current_page is None:
                    self._fail_parameter(srb, pos, 5)
                    return
                size = len(current_page)
                if data[pos + 1] != size - 2:
                    self._fail_parameter(srb, pos + 1)
                    return
                if pos + size > len(data):
                    self._fail(srb, S.PARAMETER_LIST_LENGTH_ERROR)
                    return
                new = bytearray(data[pos : pos + size])
                new[0] = current_page[0]  # PS is reserved in MODE SELECT
                mask = _PAGE_CHANGEABLE[code]
                for i in range(2, size):
                    diff = (new[i] ^ current_page[i]) & ~mask[i] & 0xFF
                    if diff:
                        self._fail_parameter(srb, pos + i, diff.bit_length() - 1)
                        return
                staged[code] = new
                pos += size
            changed = False
            for code, new in staged.items():
                if self._pages[code] != new:
                    self._pages[code][:] = new
                    changed = True
            if changed:
                self._refresh_mode_flags()
                for nexus in self._pending:
                    if nexus != srb.nexus:
                        self._queue_ua(nexus, S.MODE_PARAMETERS_CHANGED)
        self._good(srb, len(data), length)

    def _fail_parameter(self, srb: Srb, field: int, bit: int | None = None) -> None:
        self._fail(
            srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=field, bit_pointer=bit, cd=False
        )

    # REPORT SUPPORTED OPERATION CODES --------------------------------------------------------

    @staticmethod
    def _timeouts(spec: CommandSpec) -> bytes:
        # Descriptor length 0Ah, command-specific 0, nominal time unknown (0), recommended timeout.
        return struct.pack(">HxBII", 0x0A, 0, 0, spec.timeout)

    def _report_supported_opcodes(self, srb: Srb, cdb: bytes) -> None:
        rctd = bool(cdb[2] & 0x80)
        options = cdb[2] & 0x07
        requested = cdb[3]
        requested_sa = _U16(cdb, 4)[0]
        allocation = _U32(cdb, 6)[0]
        if options == 0:
            parts = []
            for spec in sorted(COMMANDS, key=lambda s: (s.opcode, s.service_action or 0)):
                has_sa = spec.service_action is not None
                parts.append(
                    struct.pack(
                        ">BxHxBH",
                        spec.opcode,
                        spec.service_action or 0,
                        (0x02 if rctd else 0) | (0x01 if has_sa else 0),
                        spec.cdb_length,
                    )
                )
                if rctd:
                    parts.append(self._timeouts(spec))
            body = b"".join(parts)
            self._data_in(srb, struct.pack(">I", len(body)) + body, allocation)
            return
        if options > 3:
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=2)
            return
        candidates = [s for s in COMMANDS if s.opcode == requested]
        has_sa = requested in SERVICE_ACTION_OPCODES or any(
            s.service_action is not None for s in candidates
        )
        if (options == 1 and has_sa) or (options == 2 and not has_sa):
            self._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=2)
            return
        if has_sa:
            match = next((s for s in candidates if s.service_action == requested_sa), None)
        else:
            match = candidates[0] if candidates else None
        if match is None:
            data = bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
        else:
            data = (
                bytes((0, (0x80 if rctd else 0) | 0x03))  # SUPPORT 011b: supported per standard
                + struct.pack(">H", match.cdb_length)
                + match.usage
                + (self._timeouts(match) if rctd else b"")
            )
        self._data_in(srb, data, allocation)
