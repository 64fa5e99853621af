"""Block commands beyond plain READ/WRITE for :class:`~miniports.lu.LogicalUnit` (SBC-4): thin
provisioning (UNMAP, WRITE SAME, GET LBA STATUS), COMPARE AND WRITE, ORWRITE, PRE-FETCH, WRITE
ATOMIC, READ DEFECT DATA, SANITIZE.

Commands are added to the unit's dispatch table through :data:`PROVISIONING_COMMANDS`; their
handlers live on :class:`ProvisioningMixin`.

The unit is thin provisioned with LBPRZ: a deallocated block reads as zeros, whatever the store
(a store that cannot give space back writes zeros instead, see ``BlockStore.deallocate``). No
anchored state is modelled (ANC_SUP=0), so every ANCHOR bit is refused.

Commands that read, modify and write the medium (COMPARE AND WRITE, ORWRITE) hold the unit's
``_medium_lock`` for the whole sequence, so two of them never interleave; a blocking store runs
plain WRITEs on other worker threads, and those take part only when the unit's write path asks
:meth:`ProvisioningMixin._medium_guard` (RAM units run every command on the loop thread, where
the sequence is atomic anyway).
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from typing import TYPE_CHECKING, cast

from emuhba.scsi import sense as S
from emuhba.scsi.opcodes import Op, SenseKey, ServiceActionIn16
from emuhba.scsi.sense import SenseCode, build_sense
from emuhba.srb import CdbFlags, DataDirection, ScsiStatus, Srb
from miniports.lu_spec import CONTROL, FF2, FF4, FF8, CommandSpec, usage

if TYPE_CHECKING:
    from miniports.lu import LogicalUnit

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from

# SANITIZE service actions (SBC-4).
SANITIZE_OVERWRITE = 0x01
SANITIZE_BLOCK_ERASE = 0x02
SANITIZE_CRYPTO_ERASE = 0x03
SANITIZE_EXIT_FAILURE_MODE = 0x1F

# Not in emuhba.scsi.sense: only this module raises it.
SANITIZE_IN_PROGRESS = SenseCode(int(SenseKey.NOT_READY), 0x04, 0x1B)
# An overwrite lasts at least this long (a pass over a real medium takes minutes; the floor
# keeps the sanitize state observable, as initiators poll it with TEST UNIT READY).
OVERWRITE_SECONDS = 8.0
# Opcodes answered normally while a sanitize runs.
_ALLOWED_WHILE_SANITIZING = frozenset({Op.INQUIRY, Op.REPORT_LUNS})

# Block Limits VPD values. Counts are logical blocks.
MAX_UNMAP_DESCRIPTORS = 1024
MAX_COMPARE_AND_WRITE_BLOCKS = 255  # the CDB's NUMBER OF LOGICAL BLOCKS is one byte
_MAX_UNMAP_BYTES = 256 * 1024 * 1024  # per UNMAP command and per WRITE SAME
_WRITE_SAME_CHUNK = 1 << 20  # bytes replicated per store call
_MAX_LBA_STATUS_DESCRIPTORS = 256

# Provisioning status in a GET LBA STATUS descriptor.
_MAPPED = 0x0
_DEALLOCATED = 0x1

# fmt: off
PROVISIONING_COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(Op.PRE_FETCH_10, None, "PRE-FETCH(10)",
                usage(0x34, 0x02, FF4, 0, FF2, CONTROL), "_pre_fetch"),
    CommandSpec(Op.READ_DEFECT_DATA_10, None, "READ DEFECT DATA(10)",
                usage(0x37, 0, 0x1F, 0, 0, 0, 0, FF2, CONTROL), "_read_defect_data"),
    CommandSpec(Op.WRITE_SAME_10, None, "WRITE SAME(10)",
                usage(0x41, 0xF8, FF4, 0, FF2, CONTROL), "_write_same", timeout=120),
    CommandSpec(Op.UNMAP, None, "UNMAP",
                usage(0x42, 0x01, 0, 0, 0, 0, 0, FF2, CONTROL), "_unmap", timeout=120),
    CommandSpec(Op.SANITIZE, SANITIZE_OVERWRITE, "SANITIZE OVERWRITE",
                usage(0x48, 0xFF, 0xFF, FF4, FF2, CONTROL), "_sanitize", timeout=600),
    CommandSpec(Op.SANITIZE, SANITIZE_BLOCK_ERASE, "SANITIZE BLOCK ERASE",
                usage(0x48, 0xFF, 0xFF, FF4, FF2, CONTROL), "_sanitize", timeout=600),
    CommandSpec(Op.SANITIZE, SANITIZE_CRYPTO_ERASE, "SANITIZE CRYPTOGRAPHIC ERASE",
                usage(0x48, 0xFF, 0xFF, FF4, FF2, CONTROL), "_sanitize", timeout=600),
    CommandSpec(Op.SANITIZE, SANITIZE_EXIT_FAILURE_MODE, "SANITIZE EXIT FAILURE MODE",
                usage(0x48, 0xFF, 0xFF, FF4, FF2, CONTROL), "_sanitize"),
    CommandSpec(Op.COMPARE_AND_WRITE, None, "COMPARE AND WRITE",
                usage(0x89, 0xF8, FF8, 0, 0, 0, 0xFF, 0, CONTROL), "_compare_and_write"),
    CommandSpec(Op.ORWRITE_16, None, "ORWRITE(16)",
                usage(0x8B, 0xF8, FF8, FF4, 0, CONTROL), "_orwrite"),
    CommandSpec(Op.PRE_FETCH_16, None, "PRE-FETCH(16)",
                usage(0x90, 0x02, FF8, FF4, 0, CONTROL), "_pre_fetch"),
    CommandSpec(Op.WRITE_SAME_16, None, "WRITE SAME(16)",
                usage(0x93, 0xF9, FF8, FF4, 0, CONTROL), "_write_same", timeout=120),
    CommandSpec(Op.WRITE_ATOMIC_16, None, "WRITE ATOMIC(16)",
                usage(0x9C, 0xF8, FF8, FF2, FF2, 0, CONTROL), "_write_atomic"),
    CommandSpec(Op.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS, "GET LBA STATUS",
                usage(0x9E, 0x1F, FF8, FF4, 0, CONTROL), "_get_lba_status"),
    CommandSpec(Op.READ_DEFECT_DATA_12, None, "READ DEFECT DATA(12)",
                usage(0xB7, 0x1F, bytes(4), FF4, 0, CONTROL), "_read_defect_data"),
)
# fmt: on
# Opcodes of this module whose handlers touch the store (run on a DMA worker for file stores).
PROVISIONING_STORE_OPCODES: frozenset[int] = frozenset(
    {
        Op.WRITE_SAME_10,
        Op.WRITE_SAME_16,
        Op.UNMAP,
        Op.SANITIZE,
        Op.COMPARE_AND_WRITE,
        Op.ORWRITE_16,
        Op.WRITE_ATOMIC_16,
    }
)

_OUT = DataDirection.OUT
_FUA = int(CdbFlags.FUA)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ProvisioningMixin:
    """Handlers and state of the block command set added here."""

    # True while a SANITIZE runs: the unit then asks _sanitize_gate about every command
    # (one attribute test per command otherwise).
    _sanitizing: bool = False

    @property
    def _lu(self) -> LogicalUnit:
        """This object as the LogicalUnit it always is (the mixin lives nowhere else), so
        handlers here see the unit's own helpers (_fail, _good, _data_out, _store, ...)."""
        return cast("LogicalUnit", self)

    def _init_provisioning(self) -> None:
        """Called once from the unit's constructor."""
        lu = self._lu
        bs = lu._block_size
        self._medium_lock = threading.Lock()
        self._unmap_granularity = lu._page_blocks
        self._max_unmap_blocks = min(0xFFFFFFFF, max(1, _MAX_UNMAP_BYTES // bs))
        # WRITE SAME moves no more than a WRITE could: initiators size it like one.
        self._max_write_same_blocks = lu._max_transfer
        self._max_atomic_blocks = lu._max_transfer
        self._sanitizing = False
        self._overwrite_seconds = OVERWRITE_SECONDS
        # The SANITIZE command (without IMMED) waiting for its operation, and its wake-up.
        self._sanitize_waiter: tuple[Srb, threading.Event] | None = None

    def _provisioning_rc16_bits(self) -> int:
        """READ CAPACITY(16) bytes 14-15: LBPME (bit 15), LBPRZ (bit 14), lowest aligned LBA."""
        return 0x8000 | 0x4000

    def _provisioning_block_limits(self, limits: bytearray) -> None:
        """Fill the Block Limits VPD page (B0h) body fields this module's commands define:
        maximum prefetch length, unmap LBA/descriptor counts and granularity, maximum write
        same length, atomic write limits (``limits`` is the page body, 0x3C bytes)."""
        lu = self._lu
        # Body offsets are page offsets minus the 4-byte header.
        limits[1] = MAX_COMPARE_AND_WRITE_BLOCKS
        struct.pack_into(">I", limits, 12, lu._max_transfer)  # maximum prefetch length
        struct.pack_into(">I", limits, 16, self._max_unmap_blocks)
        struct.pack_into(">I", limits, 20, MAX_UNMAP_DESCRIPTORS)
        struct.pack_into(">I", limits, 24, self._unmap_granularity)
        struct.pack_into(">I", limits, 28, 0x80000000)  # UGAVALID, alignment 0
        struct.pack_into(">Q", limits, 32, self._max_write_same_blocks)
        struct.pack_into(">I", limits, 40, self._max_atomic_blocks)
        struct.pack_into(">I", limits, 44, 1)  # atomic alignment
        struct.pack_into(">I", limits, 48, 1)  # atomic transfer length granularity
        # No atomic boundaries: both boundary fields stay zero.

    def _provisioning_vpd_b2(self) -> bytes:
        """The Logical Block Provisioning VPD page (B2h) body."""
        # Threshold exponent 0 (no thresholds); LBPU, LBPWS, LBPWS10, LBPRZ=001b, ANC_SUP=0,
        # DP=0; provisioning type 010b (thin); threshold percentage 0.
        return bytes((0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00))

    def _medium_guard(self) -> threading.Lock:
        """The lock a write path takes to stay atomic against COMPARE AND WRITE and ORWRITE."""
        return self._medium_lock

    # Helpers -------------------------------------------------------------------------------

    def _read_blocks(self, lba: int, blocks: int) -> bytearray:
        lu = self._lu
        bs = lu._block_size
        buf = bytearray(blocks * bs)
        if buf:
            lu._store.read_into(lba * bs, len(buf), [memoryview(buf)])
        return buf

    def _write_blocks(self, lba: int, data: bytes | bytearray, durable: bool) -> None:
        lu = self._lu
        if data:
            lu._store.write_from(lba * lu._block_size, len(data), [memoryview(data)])
        if durable or not lu._wce:
            lu._store.flush()

    def _writable(self, srb: Srb, lba: int, blocks: int) -> bool:
        """The checks a write of ``blocks`` at ``lba`` passes once its CDB is valid: the unit
        is ready, the range is on the medium (zero blocks may name the LBA just past the end)
        and writes are allowed. False when ``srb`` was failed."""
        lu = self._lu
        if lu._stopped:
            lu._fail(srb, lu._not_ready)
        elif lu._out_of_range(lba, blocks) and not (blocks == 0 and lba <= lu._num_blocks):
            lu._fail(srb, S.LBA_OUT_OF_RANGE)
        elif lu._read_only:
            lu._fail(srb, S.WRITE_PROTECTED)
        else:
            return True
        return False

    def _deallocate(self, lba: int, blocks: int) -> None:
        lu = self._lu
        bs = lu._block_size
        if blocks:
            lu._store.deallocate(lba * bs, blocks * bs)

    # UNMAP ---------------------------------------------------------------------------------

    def _unmap(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        if cdb[1] & 0x01:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=0)  # ANCHOR
            return
        if lu._stopped:
            lu._fail(srb, lu._not_ready)
            return
        if lu._read_only:
            lu._fail(srb, S.WRITE_PROTECTED)
            return
        length = _U16(cdb, 7)[0]
        if length == 0:
            lu._good(srb, 0, 0)  # nothing to unmap is not an error (SBC-4)
            return
        data = lu._data_out(srb, length)
        if len(data) < 8:
            lu._fail(srb, S.PARAMETER_LIST_LENGTH_ERROR)
            return
        descriptor_bytes = min(_U16(data, 2)[0], len(data) - 8)
        count = descriptor_bytes // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=2, cd=False)
            return
        extents: list[tuple[int, int]] = []
        total = 0
        for i in range(count):
            pos = 8 + 16 * i
            lba = _U64(data, pos)[0]
            blocks = _U32(data, pos + 8)[0]
            if lu._out_of_range(lba, blocks) and not (blocks == 0 and lba <= lu._num_blocks):
                lu._fail(srb, S.LBA_OUT_OF_RANGE)
                return
            total += blocks
            if total > self._max_unmap_blocks:
                lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=pos + 8, cd=False)
                return
            if blocks:
                extents.append((lba, blocks))
        try:
            for lba, blocks in extents:
                self._deallocate(lba, blocks)
        except OSError:
            lu._fail(srb, S.WRITE_ERROR)
            return
        lu._good(srb, len(data), length)

    # WRITE SAME ----------------------------------------------------------------------------

    def _write_same(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        sixteen = cdb[0] == Op.WRITE_SAME_16
        flags = cdb[1]
        if sixteen:
            lba, blocks = _U64(cdb, 2)[0], _U32(cdb, 10)[0]
            length_at = 10
        else:
            lba, blocks = _U32(cdb, 2)[0], _U16(cdb, 7)[0]
            length_at = 7
        if flags & 0xE0:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=7)  # WRPROTECT
            return
        if flags & 0x10:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)  # ANCHOR
            return
        unmap = bool(flags & 0x08)
        ndob = sixteen and bool(flags & 0x01)
        if lu._stopped:
            lu._fail(srb, lu._not_ready)
            return
        if lu._out_of_range(lba, blocks) and not (blocks == 0 and lba < lu._num_blocks):
            lu._fail(srb, S.LBA_OUT_OF_RANGE)
            return
        if blocks == 0:
            blocks = lu._num_blocks - lba  # WSNZ=0: through the last LBA
        if blocks > self._max_write_same_blocks:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=length_at)
            return
        if lu._read_only:
            lu._fail(srb, S.WRITE_PROTECTED)
            return
        bs = lu._block_size
        if ndob:
            if srb.data_direction == _OUT and srb.data_transfer_length:
                lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=0)
                return
            block = bytes(bs)
        else:
            if srb.data_transfer_length != bs or srb.data_direction != _OUT:
                # The Data-Out buffer holds exactly one logical block, no more, no less.
                lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=length_at)
                return
            block = lu._data_out(srb, bs)
        try:
            if unmap:
                # The UNMAP bit asks for the blocks to be deallocated; they then read as zeros
                # (LBPRZ) whatever the Data-Out block held, as initiators that use WRITE SAME to
                # discard expect (libiscsi's WriteSame*.UnmapUntilEnd sends 0xFF blocks).
                self._deallocate(lba, blocks)
            else:
                per_chunk = max(1, _WRITE_SAME_CHUNK // bs)
                pattern = block * min(blocks, per_chunk)
                done = 0
                while done < blocks:
                    n = min(blocks - done, per_chunk)
                    self._write_blocks(lba + done, pattern[: n * bs], False)
                    done += n
            if not lu._wce:
                lu._store.flush()
        except OSError:
            lu._fail(srb, S.WRITE_ERROR, information=lba)
            return
        lu._good(srb, 0 if ndob else bs, 0 if ndob else bs)

    # GET LBA STATUS ------------------------------------------------------------------------

    def _get_lba_status(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        lba = _U64(cdb, 2)[0]
        allocation = _U32(cdb, 10)[0]
        if lba >= lu._num_blocks:
            lu._fail(srb, S.LBA_OUT_OF_RANGE)
            return
        if lu._stopped:
            lu._fail(srb, lu._not_ready)
            return
        bs = lu._block_size
        # Enough descriptors for the allocation length, bounded: the scan runs on the loop
        # for RAM units, and a short answer is allowed (the client asks again from its end).
        room = min(_MAX_LBA_STATUS_DESCRIPTORS, max(1, (allocation - 8) // 16))
        descriptors: list[bytes] = []
        store = lu._store
        position = lba
        end = lu._num_blocks
        try:
            while position < end and len(descriptors) < room:
                limit = min(end - position, 0xFFFFFFFF)
                mapped, run = store.allocation_run(position * bs, limit * bs)
                # A block with any byte backed by storage is mapped.
                blocks = -(-run // bs) if mapped else run // bs
                if blocks == 0:
                    mapped, blocks = True, 1
                descriptors.append(
                    struct.pack(">QIB3x", position, blocks, _MAPPED if mapped else _DEALLOCATED)
                )
                position += blocks
        except OSError:
            lu._fail(srb, S.UNRECOVERED_READ_ERROR, information=lba)
            return
        body = b"".join(descriptors)
        lu._data_in(srb, struct.pack(">I4x", len(body) + 4) + body, allocation)

    # COMPARE AND WRITE ---------------------------------------------------------------------

    def _compare_and_write(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        if cdb[1] & 0xE0:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=7)  # WRPROTECT
            return
        lba = _U64(cdb, 2)[0]
        blocks = cdb[13]
        if blocks > MAX_COMPARE_AND_WRITE_BLOCKS:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=13)
            return
        if not self._writable(srb, lba, blocks):
            return
        bs = lu._block_size
        wanted = 2 * blocks * bs
        sent = srb.data_transfer_length if srb.data_direction == _OUT else 0
        if sent != wanted:
            # The Data-Out buffer is the verify instance followed by the write instance; any
            # other size means the CDB's block count is not what the initiator meant.
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=13)
            return
        if blocks == 0:
            lu._good(srb, 0, 0)  # zero blocks: nothing compared, nothing written
            return
        data = lu._data_out(srb, wanted)
        half = blocks * bs
        expected, new = data[:half], data[half:]
        durable = bool(cdb[1] & 0x08)
        with self._medium_lock:
            try:
                medium = self._read_blocks(lba, blocks)
            except OSError:
                lu._fail(srb, S.UNRECOVERED_READ_ERROR, information=lba)
                return
            if medium != expected:
                offset = next(i for i in range(half) if medium[i] != expected[i])
                lu._fail(srb, S.MISCOMPARE, information=offset)
                return
            try:
                self._write_blocks(lba, new, durable)
            except OSError:
                lu._fail(srb, S.WRITE_ERROR, information=lba)
                return
        lu._good(srb, wanted, wanted)

    # ORWRITE -------------------------------------------------------------------------------

    def _orwrite(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        if not lu._block_prologue(srb, cdb, True):
            return
        lba = srb.lba
        blocks = srb.transfer_blocks
        if lu._out_of_range(lba, blocks):
            lu._fail(srb, S.LBA_OUT_OF_RANGE)
            return
        if lu._read_only:
            lu._fail(srb, S.WRITE_PROTECTED)
            return
        bs = lu._block_size
        wanted = blocks * bs
        data = lu._data_out(srb, wanted)
        n = len(data) // bs  # only whole blocks can be ORed in
        if n:
            with self._medium_lock:
                try:
                    medium = self._read_blocks(lba, n)
                except OSError:
                    lu._fail(srb, S.UNRECOVERED_READ_ERROR, information=lba)
                    return
                size = n * bs
                merged = (
                    int.from_bytes(medium, "big") | int.from_bytes(data[:size], "big")
                ).to_bytes(size, "big")
                try:
                    self._write_blocks(lba, merged, bool(int(srb.cdb_flags) & _FUA))
                except OSError:
                    lu._fail(srb, S.WRITE_ERROR, information=lba)
                    return
        lu._good(srb, len(data), wanted)

    # PRE-FETCH -----------------------------------------------------------------------------

    def _pre_fetch(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        if not lu._block_prologue(srb, cdb, False, transfers=False):
            return
        lba = srb.lba
        blocks = srb.transfer_blocks
        if lu._out_of_range(lba, blocks) and not (blocks == 0 and lba < lu._num_blocks):
            lu._fail(srb, S.LBA_OUT_OF_RANGE)
            return
        # The whole medium is as close to the initiator as a cache would be (RAM, or the
        # host's page cache for a file): every range "fits", so the answer is CONDITION MET.
        lu._good(srb, 0, 0)
        srb.scsi_status = ScsiStatus.CONDITION_MET

    # WRITE ATOMIC --------------------------------------------------------------------------

    def _write_atomic(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        if cdb[1] & 0xE0:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=7)  # WRPROTECT
            return
        lba = _U64(cdb, 2)[0]
        boundary = _U16(cdb, 10)[0]
        blocks = _U16(cdb, 12)[0]
        if boundary:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=10)  # no atomic boundaries
            return
        if blocks > self._max_atomic_blocks:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=12)
            return
        if not self._writable(srb, lba, blocks):
            return
        bs = lu._block_size
        wanted = blocks * bs
        data = lu._data_out(srb, wanted)
        if len(data) != wanted:
            # All or nothing: a short Data-Out buffer cannot be written atomically.
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=12)
            return
        with self._medium_lock:
            try:
                self._write_blocks(lba, data, bool(cdb[1] & 0x08))
            except OSError:
                lu._fail(srb, S.WRITE_ERROR, information=lba)
                return
        lu._good(srb, wanted, wanted)

    # READ DEFECT DATA ----------------------------------------------------------------------

    def _read_defect_data(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        twelve = cdb[0] == Op.READ_DEFECT_DATA_12
        request = cdb[1] if twelve else cdb[2]
        fmt = request & 0x07
        if fmt not in (0, 3, 4, 5, 6):
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1 if twelve else 2, bit_pointer=2)
            return
        # No defects: an empty list in the requested format, PLISTV/GLISTV as asked for.
        flags = request & 0x1F
        if twelve:
            allocation = _U32(cdb, 6)[0]
            header = struct.pack(">BBHI", 0, flags, 0, 0)
        else:
            allocation = _U16(cdb, 7)[0]
            header = struct.pack(">BBH", 0, flags, 0)
        lu._data_in(srb, header, allocation)

    # SANITIZE ------------------------------------------------------------------------------

    def _sanitize(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        action = cdb[1] & 0x1F
        length = _U16(cdb, 7)[0]
        if cdb[1] & 0x40:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=6)  # reserved
            return
        if cdb[1] & 0x20:
            # AUSE: no failure mode exists here to allow an unrestricted exit from.
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=5)
            return
        for i in range(2, 7):
            if cdb[i]:
                lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=i)  # reserved
                return
        if action == SANITIZE_OVERWRITE:
            if not 4 < length <= lu._block_size + 4:
                lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=7)
                return
        elif length:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=7)
            return
        if lu._read_only:
            lu._fail(srb, S.WRITE_PROTECTED)
            return
        if lu._stopped:
            lu._fail(srb, lu._not_ready)
            return
        if action == SANITIZE_EXIT_FAILURE_MODE:
            lu._good(srb, 0, 0)  # a sanitize here never fails, so there is no failure mode
            return
        pattern = b""
        if action == SANITIZE_OVERWRITE:
            data = lu._data_out(srb, length)
            if len(data) < length:
                lu._fail(srb, S.PARAMETER_LIST_LENGTH_ERROR)
                return
            count = data[0] & 0x1F
            pattern_length = _U16(data, 2)[0]
            if count == 0:
                lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=7)
                return
            if pattern_length == 0 or pattern_length > lu._block_size or (
                pattern_length + 4 != length
            ):
                lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=7)
                return
            pattern = bytes(data[4 : 4 + pattern_length])
            if data[0] & 0x80 and count % 2 == 0:
                # INVERT: passes alternate pattern and inverse, an even count ends inverted.
                pattern = bytes(b ^ 0xFF for b in pattern)
            # TEST (bits 6-5) selects vendor test modes; none is modelled, the field is ignored.
        # The operation runs with the unit in the sanitize state: everything but the few
        # commands SBC-4 allows is answered NOT READY, SANITIZE IN PROGRESS until it ends.
        overwrite_seconds = self._overwrite_seconds if action == SANITIZE_OVERWRITE else 0.0
        if _on_event_loop():
            overwrite_seconds = 0.0  # a modelled wait must never stall the loop
        self._sanitizing = True
        if cdb[1] & 0x80:  # IMMED: report the start, finish in the background
            worker = threading.Thread(
                target=self._run_sanitize,
                args=(pattern, overwrite_seconds),
                name=f"sanitize-lun{lu._lun}",
                daemon=True,
            )
            worker.start()
            lu._good(srb, length, length)
            return
        # Without IMMED the command ends with the operation, but the operation runs on its own
        # thread: an ABORT TASK or a reset ends the command (cancel_wait) and SBC-4 has the
        # sanitize carry on regardless.
        ended = threading.Event()
        outcome: list[bool] = []

        def job() -> None:
            outcome.append(self._run_sanitize(pattern, overwrite_seconds))
            ended.set()

        self._sanitize_waiter = (srb, ended)
        threading.Thread(target=job, name=f"sanitize-lun{lu._lun}", daemon=True).start()
        ended.wait()
        self._sanitize_waiter = None
        if not outcome or outcome[0]:
            # Cancelled commands are ended by whoever cancelled them; the status is theirs.
            lu._good(srb, length, length)
        else:
            lu._fail(srb, S.WRITE_ERROR)

    def cancel_wait(self, srb: Srb) -> bool:
        """Let a command that is waiting on a long operation (a SANITIZE without IMMED) end
        now, the operation going on in the background. True when ``srb`` was one; the caller
        (ABORT TASK, a reset) then completes it as it sees fit."""
        waiter = self._sanitize_waiter
        if waiter is None or waiter[0] is not srb:
            return False
        waiter[1].set()
        return True

    def _run_sanitize(self, pattern: bytes, overwrite_seconds: float) -> bool:
        """Do the sanitize (an overwrite when ``pattern`` is given, otherwise an erase that
        deallocates everything) and leave the sanitize state; False when the medium failed."""
        lu = self._lu
        deadline = time.monotonic() + overwrite_seconds
        try:
            with self._medium_lock:
                if pattern:
                    self._overwrite_medium(pattern)
                else:
                    # Block and cryptographic erase: every block deallocated, reading zeros.
                    self._deallocate(0, lu._num_blocks)
                lu._store.flush()
            # Overwrite passes take the time a real medium would; initiators poll for the end.
            remaining = deadline - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
            return True
        except OSError:
            return False
        finally:
            self._sanitizing = False

    def _sanitize_gate(self, srb: Srb, op: int) -> bool:
        """While a sanitize runs (``_sanitizing``): complete ``srb`` with NOT READY, SANITIZE
        IN PROGRESS and return True unless it is one of the commands SBC-4 still allows
        (INQUIRY, REPORT LUNS, REQUEST SENSE, which reports the condition as its data)."""
        lu = self._lu
        if op in _ALLOWED_WHILE_SANITIZING:
            return False
        if op == Op.REQUEST_SENSE:
            descriptor = bool(srb.cdb[1] & 0x01) if len(srb.cdb) > 1 else False
            allocation = srb.cdb[4] if len(srb.cdb) > 4 else 0
            lu._data_in(srb, build_sense(SANITIZE_IN_PROGRESS, descriptor=descriptor), allocation)
            return True
        lu._fail(srb, SANITIZE_IN_PROGRESS)
        return True

    def _overwrite_medium(self, pattern: bytes) -> None:
        lu = self._lu
        bs = lu._block_size
        block = (pattern * (bs // len(pattern) + 1))[:bs]
        per_chunk = max(1, _WRITE_SAME_CHUNK // bs)
        chunk = block * per_chunk
        done = 0
        total = lu._num_blocks
        while done < total:
            n = min(total - done, per_chunk)
            self._write_blocks(done, chunk[: n * bs], False)
            done += n
