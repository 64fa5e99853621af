"""Third-party copy for :class:`~miniports.lu.LogicalUnit` (SPC-4): EXTENDED COPY (LID1) and
RECEIVE COPY RESULTS between logical units of one target.

Commands are added to the unit's dispatch table through :data:`COPY_COMMANDS`; their handlers
live on :class:`CopyMixin`.

The unit receiving EXTENDED COPY is the copy manager. Copy targets are named by identification
descriptor target descriptors (E4h) carrying the NAA designator of VPD page 83h, and resolved
among the units of the same target (the unit's ``peers``); only block-to-block segments (02h)
are supported, which is what initiators offload (VMware's XCOPY, libiscsi). The whole parameter
list is validated, copy targets resolved and every segment's range checked before any data
moves, so a refused command leaves the media untouched; an I/O error part-way leaves the
segments before it done, as SPC-4 allows.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from emuhba.scsi import sense as S
from emuhba.scsi.opcodes import Op, SenseKey
from emuhba.scsi.sense import SenseCode
from emuhba.srb import Srb
from miniports.lu_spec import CONTROL, FF4, CommandSpec, usage

if TYPE_CHECKING:
    from miniports.lu import LogicalUnit

# Service actions.
EXTENDED_COPY_LID1 = 0x00
COPY_STATUS = 0x00
OPERATING_PARAMETERS = 0x03

# Descriptor type codes.
SEGMENT_BLOCK_TO_BLOCK = 0x02
TARGET_IDENTIFICATION = 0xE4
_DESCRIPTOR_TYPES = bytes((SEGMENT_BLOCK_TO_BLOCK, TARGET_IDENTIFICATION))

# Copy manager limits (RECEIVE COPY RESULTS operating parameters, VPD page 8Fh). The descriptor
# list limit sits between what MAX_TARGETS + 1 or MAX_SEGMENTS + 1 descriptors need alone and
# what both need together, so each limit can be hit on its own.
MAX_TARGETS = 8
MAX_SEGMENTS = 32
MAX_DESCRIPTOR_LIST_LENGTH = 1024
MAX_CONCURRENT_COPIES = 16
# Held copy status per unit, beyond which the oldest finished entries are forgotten.
MAX_HELD = 64

HEADER_LENGTH = 16
TARGET_DESCRIPTOR_LENGTH = 32
B2B_DESCRIPTOR_LENGTH = 0x18  # the DESCRIPTOR LENGTH field: 28 bytes in all
# Segments move through a bounce buffer of this size (memory stays bounded whatever the length).
CHUNK = 1 << 20

# COPY MANAGER STATUS values (LID1).
IN_PROGRESS = 0x00
COMPLETED = 0x01
COMPLETED_WITH_ERRORS = 0x02

# LIST ID USAGE values.
_HOLD = 0b00
_RESERVED_USAGE = 0b01
_NO_LIST_ID = 0b11

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from

# fmt: off
COPY_COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(Op.EXTENDED_COPY, EXTENDED_COPY_LID1, "EXTENDED COPY(LID1)",
                usage(0x83, 0x1F, bytes(8), FF4, 0, CONTROL), "_extended_copy", timeout=120),
    CommandSpec(Op.RECEIVE_COPY_RESULTS, COPY_STATUS, "RECEIVE COPY STATUS(LID1)",
                usage(0x84, 0x1F, 0xFF, bytes(7), FF4, 0, CONTROL), "_receive_copy_status"),
    # The LIST IDENTIFIER is reserved for OPERATING PARAMETERS.
    CommandSpec(Op.RECEIVE_COPY_RESULTS, OPERATING_PARAMETERS, "RECEIVE COPY OPERATING PARAMETERS",
                usage(0x84, 0x1F, 0, bytes(7), FF4, 0, CONTROL),
                "_receive_copy_operating_parameters"),
)
# fmt: on
# Opcodes of this module whose handlers touch the store (run on a DMA worker for file stores).
COPY_STORE_OPCODES: frozenset[int] = frozenset({Op.EXTENDED_COPY})


def copy_aborted(cause: SenseCode) -> SenseCode:
    """COPY ABORTED carrying the additional sense code a copy target reported."""
    return SenseCode(int(SenseKey.COPY_ABORTED), cause.asc, cause.ascq)


@dataclass(slots=True)
class CopyStatus:
    """What RECEIVE COPY STATUS reports for one held list identifier."""

    status: int = IN_PROGRESS
    segments: int = 0
    transferred: int = 0  # bytes

    def encode(self) -> bytes:
        count, units = self.transferred, 0
        while count > 0xFFFFFFFF:  # 00h bytes, 01h KiB, 02h MiB...
            count >>= 10
            units += 1
        return struct.pack(">IBHBI", 8, self.status, self.segments, units, count)


@dataclass(frozen=True, slots=True)
class _Segment:
    src: LogicalUnit
    dst: LogicalUnit
    src_offset: int
    dst_offset: int
    length: int  # bytes


class _Refused(Exception):
    """The command fails with ``code`` (and a parameter-list field pointer, if any)."""

    def __init__(self, code: SenseCode, field: int | None = None, bit: int | None = None) -> None:
        super().__init__(str(code))
        self.code = code
        self.field = field
        self.bit = bit


class CopyMixin:
    """Handlers and state of the copy commands."""

    _copy_lock: threading.Lock
    # (I_T nexus, list identifier) -> status of an EXTENDED COPY whose results are held.
    _held: dict[tuple[int, int], CopyStatus]

    @property
    def _lu(self) -> LogicalUnit:
        """This object as the LogicalUnit it always is (the mixin lives nowhere else), so
        handlers here see the unit's own helpers (_fail, _good, _data_out, _store, ...)."""
        return cast("LogicalUnit", self)

    def _init_copy(self) -> None:
        """Called once from the unit's constructor."""
        self._copy_lock = threading.Lock()
        self._held = {}

    def _copy_nexus_gone(self, nexus: int) -> None:
        """Held copy results belong to the nexus that sent the copy: they go with it."""
        with self._copy_lock:
            for key in [k for k in self._held if k[0] == nexus]:
                del self._held[key]

    # VPD page 8Fh --------------------------------------------------------------------------

    def _copy_vpd_8f(self) -> bytes:
        """The Third-party Copy VPD page body: what EXTENDED COPY(LID1) accepts."""
        lu = self._lu

        def descriptor(kind: int, body: bytes) -> bytes:
            body += bytes(-(len(body)) % 4)  # each descriptor is padded to a multiple of 4
            return struct.pack(">HH", kind, len(body)) + body

        commands = bytes((Op.EXTENDED_COPY, 1, EXTENDED_COPY_LID1)) + bytes(
            (Op.RECEIVE_COPY_RESULTS, 2, COPY_STATUS, OPERATING_PARAMETERS)
        )
        kinds = _DESCRIPTOR_TYPES
        return b"".join(
            (
                descriptor(0x0001, bytes((len(commands),)) + commands),  # supported commands
                descriptor(  # parameter data
                    0x0004,
                    struct.pack(
                        ">4xHHII12x", MAX_TARGETS, MAX_SEGMENTS, MAX_DESCRIPTOR_LIST_LENGTH, 0
                    ),
                ),
                descriptor(0x0008, bytes((len(kinds),)) + kinds),  # supported descriptors
                descriptor(0x000C, struct.pack(">H", 0)),  # no CSCD descriptor IDs (LID4 only)
                descriptor(  # general copy operations
                    0x8001,
                    struct.pack(
                        ">IIIBB18x",
                        MAX_CONCURRENT_COPIES,
                        MAX_CONCURRENT_COPIES,
                        self._max_segment_bytes(),
                        lu.block_size.bit_length() - 1,
                        0,
                    ),
                ),
            )
        )

    def _max_segment_bytes(self) -> int:
        # What a block-to-block descriptor's 16-bit NUMBER OF BLOCKS can express.
        return 0xFFFF * self._lu.block_size

    # RECEIVE COPY RESULTS ------------------------------------------------------------------

    def _receive_copy_operating_parameters(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        data = bytearray(44)
        data[4] = 0x01  # SNLID: LIST ID USAGE 11b (no list identifier) is supported
        struct.pack_into(
            ">HHIIIII",
            data,
            8,
            MAX_TARGETS,
            MAX_SEGMENTS,
            MAX_DESCRIPTOR_LIST_LENGTH,
            self._max_segment_bytes(),
            0,  # no inline data
            0,  # no held data (RECEIVE DATA is not supported)
            0,  # no stream devices
        )
        struct.pack_into(">H", data, 34, MAX_CONCURRENT_COPIES)
        data[36] = MAX_CONCURRENT_COPIES
        data[37] = lu.block_size.bit_length() - 1  # data segment granularity: one block
        data[43] = len(_DESCRIPTOR_TYPES)
        data += _DESCRIPTOR_TYPES
        struct.pack_into(">I", data, 0, len(data) - 4)
        lu._data_in(srb, bytes(data), _U32(cdb, 10)[0])

    def _receive_copy_status(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        key = (srb.nexus, cdb[2])
        allocation = _U32(cdb, 10)[0]
        with self._copy_lock:
            status = self._held.get(key)
            if status is None:
                payload = None
            else:
                payload = status.encode()
                # Results of a finished copy are discarded once delivered whole.
                if status.status != IN_PROGRESS and allocation >= len(payload):
                    del self._held[key]
        if payload is None:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2)  # no such list identifier
            return
        lu._data_in(srb, payload, allocation)

    # EXTENDED COPY -------------------------------------------------------------------------

    def _extended_copy(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        length = _U32(cdb, 10)[0]
        if length == 0:
            lu._good(srb, 0, 0)  # no parameter list: nothing to copy, not an error (SPC-4)
            return
        data = lu._data_out(srb, length)
        try:
            list_id, hold, segments = self._parse_parameter_list(data)
        except _Refused as refused:
            self._refuse(srb, refused)
            return
        key = (srb.nexus, list_id)
        status = CopyStatus()
        if hold:
            with self._copy_lock:
                held = self._held.get(key)
                if held is not None and held.status == IN_PROGRESS:
                    busy = True
                else:
                    busy = False
                    self._hold(key, status)
            if busy:
                lu._fail(srb, S.OPERATION_IN_PROGRESS)  # that list identifier is in use
                return
        failure = self._run_segments(segments, status)
        with self._copy_lock:
            status.status = COMPLETED if failure is None else COMPLETED_WITH_ERRORS
        if failure is not None:
            lu._fail(srb, failure)
            return
        lu._good(srb, len(data), length)

    def _hold(self, key: tuple[int, int], status: CopyStatus) -> None:
        # Caller holds _copy_lock. A new copy with the same list identifier replaces the old
        # results; past the limit the oldest finished ones go.
        self._held.pop(key, None)
        while len(self._held) >= MAX_HELD:
            finished = (k for k, v in self._held.items() if v.status != IN_PROGRESS)
            del self._held[next(finished, next(iter(self._held)))]
        self._held[key] = status

    def _refuse(self, srb: Srb, refused: _Refused) -> None:
        lu = self._lu
        if refused.field is not None:
            lu._fail(
                srb, refused.code, field_pointer=refused.field, bit_pointer=refused.bit, cd=False
            )
        else:
            lu._fail(srb, refused.code)

    def _parse_parameter_list(self, data: bytes) -> tuple[int, bool, list[_Segment]]:
        """(list identifier, hold the results, segments to run) or :class:`_Refused`."""
        if len(data) < HEADER_LENGTH:
            raise _Refused(S.PARAMETER_LIST_LENGTH_ERROR)
        list_id = data[0]
        list_usage = (data[1] >> 3) & 0x03
        targets_length = _U16(data, 2)[0]
        segments_length = _U32(data, 8)[0]
        inline_length = _U32(data, 12)[0]
        if list_usage == _RESERVED_USAGE:
            raise _Refused(S.INVALID_FIELD_IN_PARAMETER_LIST, 1, 4)
        if list_usage == _NO_LIST_ID and list_id:
            raise _Refused(S.INVALID_FIELD_IN_PARAMETER_LIST, 0)
        if HEADER_LENGTH + targets_length + segments_length + inline_length > len(data):
            raise _Refused(S.PARAMETER_LIST_LENGTH_ERROR)
        if targets_length + segments_length > MAX_DESCRIPTOR_LIST_LENGTH:
            raise _Refused(S.PARAMETER_LIST_LENGTH_ERROR)
        if inline_length:
            raise _Refused(S.INLINE_DATA_LENGTH_EXCEEDED)
        if targets_length % TARGET_DESCRIPTOR_LENGTH:
            raise _Refused(S.INVALID_FIELD_IN_PARAMETER_LIST, 2)
        if targets_length // TARGET_DESCRIPTOR_LENGTH > MAX_TARGETS:
            raise _Refused(S.TOO_MANY_TARGET_DESCRIPTORS)
        targets: list[int] = []  # offsets of the target descriptors
        for pos in range(HEADER_LENGTH, HEADER_LENGTH + targets_length, TARGET_DESCRIPTOR_LENGTH):
            if data[pos] != TARGET_IDENTIFICATION:
                raise _Refused(S.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, pos)
            # LU ID TYPE (byte 1 bits 7-6) qualifies an LU IDENTIFIER field, which this
            # descriptor type does not have (SPC-4): it is ignored.
            targets.append(pos)
        descriptors: list[int] = []
        pos = HEADER_LENGTH + targets_length
        end = pos + segments_length
        while pos < end:
            if end - pos < 4:
                raise _Refused(S.PARAMETER_LIST_LENGTH_ERROR)
            if data[pos] != SEGMENT_BLOCK_TO_BLOCK:
                raise _Refused(S.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, pos)
            if _U16(data, pos + 2)[0] != B2B_DESCRIPTOR_LENGTH:
                raise _Refused(S.INVALID_FIELD_IN_PARAMETER_LIST, pos + 2)
            if end - pos < 4 + B2B_DESCRIPTOR_LENGTH:
                raise _Refused(S.PARAMETER_LIST_LENGTH_ERROR)
            if len(descriptors) == MAX_SEGMENTS:
                raise _Refused(S.TOO_MANY_SEGMENT_DESCRIPTORS)
            descriptors.append(pos)
            pos += 4 + B2B_DESCRIPTOR_LENGTH
        resolved: dict[int, LogicalUnit] = {}
        segments = [self._segment(data, pos, targets, resolved) for pos in descriptors]
        return list_id, list_usage == _HOLD, segments

    def _segment(
        self, data: bytes, pos: int, targets: list[int], resolved: dict[int, LogicalUnit]
    ) -> _Segment:
        src = self._copy_target(data, _U16(data, pos + 4)[0], targets, resolved)
        dst = self._copy_target(data, _U16(data, pos + 6)[0], targets, resolved)
        blocks = _U16(data, pos + 10)[0]
        src_lba = _U64(data, pos + 12)[0]
        dst_lba = _U64(data, pos + 20)[0]
        # DC: NUMBER OF BLOCKS counts destination blocks rather than source blocks.
        length = blocks * (dst.block_size if data[pos + 1] & 0x02 else src.block_size)
        if length % src.block_size or length % dst.block_size:
            raise _Refused(S.COPY_SEGMENT_GRANULARITY_VIOLATION, pos + 10)
        for unit, lba in ((src, src_lba), (dst, dst_lba)):
            if unit._out_of_range(lba, length // unit.block_size) and length:
                # What the copy target would answer (LBA OUT OF RANGE) is not among the
                # additional sense codes initiators expect under COPY ABORTED.
                raise _Refused(S.COPY_ABORTED)
            if unit._stopped:
                raise _Refused(copy_aborted(unit._not_ready))
        if dst._read_only and length:
            raise _Refused(copy_aborted(S.WRITE_PROTECTED))
        return _Segment(src, dst, src_lba * src.block_size, dst_lba * dst.block_size, length)

    def _copy_target(
        self, data: bytes, index: int, targets: list[int], resolved: dict[int, LogicalUnit]
    ) -> LogicalUnit:
        """The unit target descriptor ``index`` names, among this target's units."""
        unit = resolved.get(index)
        if unit is not None:
            return unit
        if index >= len(targets):
            raise _Refused(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
        pos = targets[index]
        if data[pos + 1] & 0x20:
            # NUL: a null device has no blocks to read or write in a block-to-block segment.
            raise _Refused(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
        if data[pos + 1] & 0x1F:
            raise _Refused(S.COPY_INCORRECT_TARGET_DEVICE_TYPE)  # not a direct-access device
        # The designation descriptor: binary NAA (3h) of the logical unit (association 0).
        designator_type = data[pos + 5] & 0x0F
        association = (data[pos + 5] >> 4) & 0x03
        if designator_type != 0x03 or association or data[pos + 7] != 8:
            raise _Refused(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
        naa = _U64(data, pos + 8)[0]
        unit = next((u for u in self._lu.peer_units().values() if u.naa_id == naa), None)
        if unit is None:
            raise _Refused(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
        disk_block_length = int.from_bytes(data[pos + 29 : pos + 32], "big")
        if disk_block_length != unit.block_size:
            raise _Refused(S.COPY_INCORRECT_TARGET_DEVICE_TYPE)
        resolved[index] = unit
        return unit

    def _run_segments(self, segments: list[_Segment], status: CopyStatus) -> SenseCode | None:
        """Copy each segment in turn; the COPY ABORTED code of the first that fails, if any."""
        buf = bytearray(min(CHUNK, max((s.length for s in segments), default=0)))
        view = memoryview(buf)
        for segment in segments:
            failure = self._copy_segment(segment, view)
            if failure is not None:
                return failure
            with self._copy_lock:
                status.segments += 1
                status.transferred += segment.length
        return None

    @staticmethod
    def _copy_segment(segment: _Segment, view: memoryview) -> SenseCode | None:
        src, dst, length = segment.src, segment.dst, segment.length
        if not length:
            return None
        step = view.nbytes
        starts = list(range(0, length, step))
        if src.store is dst.store and segment.src_offset < segment.dst_offset < (
            segment.src_offset + length
        ):
            starts.reverse()  # overlapping forward move: copy from the end, as memmove does
        for start in starts:
            n = min(step, length - start)
            chunk = view[:n]
            try:
                src.store.read_into(segment.src_offset + start, n, [chunk])
            except OSError:
                return copy_aborted(S.UNRECOVERED_READ_ERROR)
            try:
                dst.store.write_from(segment.dst_offset + start, n, [chunk])
            except OSError:
                return copy_aborted(S.WRITE_ERROR)
        if not dst.write_cache_enabled:
            try:
                dst.store.flush()
            except OSError:
                return copy_aborted(S.WRITE_ERROR)
        return None
