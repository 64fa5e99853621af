"""The logical drive of an emulated RAID controller: a :class:`BlockStore` over member stores.

A :class:`RaidVolume` is itself a block store, so a :class:`~miniports.lu.LogicalUnit` sits on it
unchanged: a member's OSError is absorbed here (the member fails, the I/O is retried degraded)
and only a volume that has lost more members than its level tolerates answers with
:class:`VolumeOffline`, an OSError the logical unit turns into MEDIUM ERROR / WRITE ERROR.

Layout. Each member starts with a metadata region (``metadata_size``, default 1 MiB, rounded up
to a whole strip so that data strips stay strip-aligned on the member) holding the array header;
the member's data region follows. Levels:

* RAID 0: strip ``L`` on member ``L % n``, row ``L // n``.
* RAID 1: every member holds the whole volume (n >= 2 mirrors).
* RAID 10: striped mirrors, Linux md's near-2 layout: strip ``L`` on the mirror pair
  ``L % (n/2)`` (members ``2j`` and ``2j+1``), row ``L // (n/2)``; n even, >= 4.
* RAID 5: n >= 3, left-symmetric like md's default: stripe ``s`` keeps its parity on member
  ``n-1 - s % n`` and its data strip ``k`` on member ``(parity + 1 + k) % n``.

I/O splits the byte range per strip, slices the caller's memoryviews to match (no payload copy)
and hands each member one list of views per contiguous run on that member. RAID 5 full-stripe
writes compute parity from the new data alone; partial ones read-modify-write (new parity = old
parity ^ old data ^ new data), or, when the strip being written lives on a missing member,
reconstruct-write (parity from the whole stripe) so that the missing data stays recoverable.
Parity XOR runs on Python ints (``int.from_bytes``), one int per strip: no numpy needed.

Concurrency. Writes to one stripe (one row, for mirrors) hold that row's lock from a fixed table
of striped locks, so concurrent writers cannot leave parity (or two mirrors) disagreeing, and so
that a rebuild copying a row never races a write to it. Reads take no lock unless they
reconstruct a missing RAID 5 strip. Lock order: row locks in ascending table order, then the
metadata lock; never the reverse.

Failure and rebuild. A member is active, failed or rebuilding; a rebuilding member holds valid
data below its *rebuild watermark* (member data bytes, whole rows) and is written there by
ordinary writes too; above it, it counts as missing. :meth:`RaidVolume.rebuild_step` advances
the watermark row by row and checkpoints it in the metadata every ``rebuild_checkpoint`` bytes,
after flushing the member, so a rebuild interrupted by a restart resumes from the last
checkpoint (a clean :meth:`close` checkpoints exactly where it stopped).

Metadata. Every state change (creation, failure, replacement, rebuild checkpoint, rebuild end)
bumps the array's generation and rewrites and flushes the header on every in-sync member.
:meth:`RaidVolume.assemble` trusts the member with the highest generation; a member whose own
generation is lower missed a state change and is treated as failed (it needs a rebuild) unless
``force=True`` and the authoritative header still lists it as in sync (a commit cut short by a
crash, as ``mdadm --assemble --force``).

Initial sync: a fresh member (new sparse file, RAM store) reads as zeros, and zeros are a
consistent mirror and a consistent RAID 5 stripe (0 ^ 0 = 0), so :meth:`RaidVolume.create` does
not resync by default. Members that held other data need ``initialize=True``, which zeroes
every member's data region (a full write of each member).

Limits: no write journal or write-intent bitmap, so a crash in the middle of a RAID 5 stripe
write can leave that stripe's parity stale (md's "write hole"); one header copy per member;
member I/O of one request runs sequentially, not in parallel; one rebuild target at a time.
"""

from __future__ import annotations

import contextlib
import enum
import struct
import threading
import uuid as uuidlib
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

import structlog

from miniports.store import BlockStore

_log = structlog.get_logger(__name__)

KIB: Final = 1 << 10
MIB: Final = 1 << 20
DEFAULT_STRIP_SIZE: Final = 64 * KIB
DEFAULT_METADATA_SIZE: Final = MIB
DEFAULT_REBUILD_CHECKPOINT: Final = 16 * MIB
MAX_MEMBERS: Final = 64
NAME_MAX_BYTES: Final = 64

MAGIC: Final = b"EMUHBARD"
FORMAT_VERSION: Final = 1

# Enough stripes of locks that unrelated writers rarely share one, few enough to stay cheap.
_LOCK_TABLE_SIZE: Final = 1024
# Zeroing (initialize=True) writes this much per member call.
_ZERO_CHUNK: Final = MIB

# Header: magic, version, header length, uuid, name, level, strip size, member count, this
# member's slot, block size, data offset, member data size, generation; then one
# (state, saved watermark) entry per member; then a CRC32 of everything before it.
_FIXED: Final = struct.Struct("<8sII16s64sIIIIIQQQ")
_ENTRY: Final = struct.Struct("<B7xQ")
_CRC: Final = struct.Struct("<I")


# GET LBA STATUS looks at no more strips than this per call.
_ALLOCATION_STRIPS = 256


class RaidLevel(enum.IntEnum):
    RAID0 = 0
    RAID1 = 1
    RAID5 = 5
    RAID10 = 10


class MemberState(enum.IntEnum):
    """A member's state; the values are stored in the header."""

    ACTIVE = 1
    FAILED = 2
    REBUILDING = 3


class VolumeState(enum.StrEnum):
    OPTIMAL = "optimal"
    DEGRADED = "degraded"
    REBUILDING = "rebuilding"
    FAILED = "failed"


class VolumeOffline(OSError):
    """The volume lost more members than its level tolerates (or was closed): no I/O."""


class RaidAssemblyError(ValueError):
    """The given members do not make up one consistent, usable array."""


class _MemberReadFailed(Exception):
    """A member failed while a request was still only reading: redo the request degraded."""


@dataclass(slots=True)
class _Run:
    """Contiguous bytes on one member and the views they move to or from."""

    offset: int
    size: int
    views: list[memoryview]


class _Plan:
    """Member runs of one request, merging pieces that are contiguous on their member."""

    def __init__(self) -> None:
        self.runs: dict[int, list[_Run]] = {}

    def add(self, member: int, offset: int, size: int, views: list[memoryview]) -> None:
        runs = self.runs.setdefault(member, [])
        if runs and runs[-1].offset + runs[-1].size == offset:
            last = runs[-1]
            last.size += size
            last.views.extend(views)
        else:
            runs.append(_Run(offset, size, list(views)))

    def __iter__(self) -> Iterator[tuple[int, _Run]]:
        for member, runs in self.runs.items():
            for run in runs:
                yield member, run


class _SgCursor:
    """Walks a scatter/gather list, handing out views of the next ``n`` bytes (no copies)."""

    def __init__(self, bufs: Sequence[memoryview]) -> None:
        self._bufs = [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in bufs]
        self._index = 0
        self._pos = 0

    def take(self, n: int) -> list[memoryview]:
        out: list[memoryview] = []
        while n:
            buf = self._bufs[self._index]
            avail = buf.nbytes - self._pos
            if avail <= 0:
                self._index += 1
                self._pos = 0
                continue
            k = min(avail, n)
            out.append(buf if k == buf.nbytes else buf[self._pos : self._pos + k])
            self._pos += k
            n -= k
        return out


@dataclass(slots=True)
class _StripePiece:
    """The part of one RAID 5 data strip a write covers."""

    k: int  # data strip index within the stripe
    offset: int  # within the strip
    size: int
    views: list[memoryview]


@dataclass(frozen=True, slots=True)
class _Header:
    uuid: bytes
    name: str
    level: int
    strip_size: int
    count: int
    slot: int
    block_size: int
    data_offset: int
    member_size: int
    generation: int
    states: tuple[tuple[int, int], ...]  # (MemberState value, saved watermark) per slot


class _HeaderError(Exception):
    pass


def _header_span(count: int) -> int:
    return _FIXED.size + count * _ENTRY.size + _CRC.size


def _encode_header(h: _Header, pad_to: int) -> bytes:
    body = bytearray(
        _FIXED.pack(
            MAGIC, FORMAT_VERSION, _header_span(h.count), h.uuid, h.name.encode(), h.level,
            h.strip_size, h.count, h.slot, h.block_size, h.data_offset, h.member_size,
            h.generation,
        )
    )
    for state, watermark in h.states:
        body += _ENTRY.pack(state, watermark)
    body += _CRC.pack(zlib.crc32(body))
    # Whole blocks, so the header write never needs a read-modify-write below us.
    return bytes(body) + bytes(-len(body) % pad_to)


def _read_header(store: BlockStore) -> _Header:
    if store.capacity < _FIXED.size:
        raise _HeaderError(f"only {store.capacity} bytes, too small to hold RAID metadata")
    fixed = bytearray(_FIXED.size)
    store.read_into(0, len(fixed), [memoryview(fixed)])
    (magic, version, span, uid, name, level, strip, count, slot, block_size, data_offset,
     member_size, generation) = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise _HeaderError("carries no RAID metadata (bad magic)")
    if version != FORMAT_VERSION:
        raise _HeaderError(f"has metadata format version {version}, this build reads "
                           f"{FORMAT_VERSION}")
    if not 1 <= count <= MAX_MEMBERS or span != _header_span(count) or span > store.capacity:
        raise _HeaderError(f"has a corrupt header (member count {count}, length {span})")
    raw = bytearray(span)
    store.read_into(0, span, [memoryview(raw)])
    (stored_crc,) = _CRC.unpack_from(raw, span - _CRC.size)
    computed = zlib.crc32(memoryview(raw)[: span - _CRC.size])
    if stored_crc != computed:
        raise _HeaderError(f"has a corrupt header: CRC32 {stored_crc:#010x} stored, "
                           f"{computed:#010x} computed")
    states = tuple(
        _ENTRY.unpack_from(raw, _FIXED.size + i * _ENTRY.size) for i in range(count)
    )
    return _Header(bytes(uid), name.rstrip(b"\0").decode(errors="replace"), level, strip,
                   count, slot, block_size, data_offset, member_size, generation, states)


def _describe(position: int, store: BlockStore | None, *, slot: bool = False) -> str:
    """How messages name a member: slot number in the array, or position in a member list."""
    what = f"member {position}" if slot else f"store #{position}"
    path = getattr(store, "path", None)
    return f"{what} ({path})" if path else what


def _join_numbers(items: Sequence[int]) -> str:
    words = [str(i) for i in items]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _xor_strips(chunks: Sequence[bytes | bytearray | memoryview], size: int) -> bytes:
    acc = 0
    for chunk in chunks:
        acc ^= int.from_bytes(chunk, "big")
    return acc.to_bytes(size, "big")


def _scatter(data: bytes | bytearray, views: Sequence[memoryview]) -> None:
    src = memoryview(data)
    pos = 0
    for view in views:
        n = view.nbytes
        view[:] = src[pos : pos + n]
        pos += n


@dataclass
class _Member:
    store: BlockStore | None
    state: MemberState
    watermark: int = 0  # rebuilt bytes of the data region (rebuilding members only)
    saved_watermark: int = 0  # the watermark the metadata holds: never above flushed data
    errors: int = 0
    last_error: str = ""
    notes: list[str] = field(default_factory=list)


class RaidVolume(BlockStore):
    """A RAID 0/1/5/10 logical drive over member block stores.

    Build one with :meth:`create` (new array, writes fresh metadata) or :meth:`assemble`
    (existing array, from its members' metadata); the constructor is their common back end.
    """

    def __init__(
        self,
        stores: Sequence[BlockStore | None],
        *,
        level: RaidLevel,
        strip_size: int,
        block_size: int,
        data_offset: int,
        member_size: int,
        array_uuid: bytes,
        name: str,
        generation: int,
        states: Sequence[tuple[MemberState, int]],
        read_only: bool = False,
        rebuild_checkpoint: int = DEFAULT_REBUILD_CHECKPOINT,
    ) -> None:
        n = len(stores)
        self.level = level
        self.strip_size = strip_size
        self.block_size = block_size
        self.data_offset = data_offset
        self.member_size = member_size
        self.uuid = uuidlib.UUID(bytes=array_uuid)
        self.name = name
        self.read_only = read_only or any(s is not None and s.read_only for s in stores)
        self.blocking = any(s is not None and s.blocking for s in stores)
        self.file_backed = any(s is not None and s.file_backed for s in stores)
        # The members' physical block when they agree on one.
        physical = {s.physical_block_size for s in stores if s is not None}
        self.physical_block_size = physical.pop() if len(physical) == 1 else None
        self.rebuild_checkpoint = max(strip_size, rebuild_checkpoint)
        self._n = n
        self._generation = generation
        self._data_strips = n - 1
        self._copies = 1
        self._groups = n
        self._members = [
            _Member(store, state, watermark, watermark)
            for store, (state, watermark) in zip(stores, states, strict=True)
        ]
        if level is RaidLevel.RAID5:
            data_members = n - 1
        else:
            # Mirror groups: RAID 0 is n groups of one copy, RAID 1 one group of n copies.
            self._copies = {RaidLevel.RAID0: 1, RaidLevel.RAID1: n, RaidLevel.RAID10: 2}[level]
            self._groups = n // self._copies
            data_members = self._groups
        self.num_blocks = data_members * member_size // block_size
        self._row_locks = [threading.Lock() for _ in range(_LOCK_TABLE_SIZE)]
        # Guards member states, the generation and header writes.
        self._meta_lock = threading.RLock()
        self._rebuild_lock = threading.Lock()
        self._closed = False
        self._offline_reason: str | None = self._loss_reason()

    # ----------------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        members: Sequence[BlockStore],
        level: int,
        strip_size: int = DEFAULT_STRIP_SIZE,
        name: str = "",
        *,
        metadata_size: int = DEFAULT_METADATA_SIZE,
        initialize: bool = False,
        array_uuid: uuidlib.UUID | None = None,
        rebuild_checkpoint: int = DEFAULT_REBUILD_CHECKPOINT,
    ) -> RaidVolume:
        """A new array over ``members`` (member ``i`` gets slot ``i``), metadata written.

        Fresh members (all zeros) need no resync; pass ``initialize=True`` for members that
        held anything else, which zeroes their data regions.
        """
        try:
            lvl = RaidLevel(level)
        except ValueError:
            raise ValueError(f"RAID level {level} is not one of 0, 1, 5, 10") from None
        n = len(members)
        _check_member_count(lvl, n)
        paths = [getattr(m, "path", None) for m in members]
        if len({id(m) for m in members}) != n or len(
                {p for p in paths if p is not None}) != sum(p is not None for p in paths):
            raise ValueError("the same store appears twice among the members")
        block_sizes = {m.block_size for m in members}
        if len(block_sizes) != 1:
            raise ValueError(f"members have different block sizes {sorted(block_sizes)}")
        block_size = block_sizes.pop()
        if (strip_size < block_size or strip_size & (strip_size - 1)
                or strip_size > 1 << 30):
            raise ValueError(f"strip size {strip_size} is not a power of two multiple of the "
                             f"{block_size}-byte block, up to 1 GiB")
        for i, m in enumerate(members):
            if m.read_only:
                raise ValueError(f"{_describe(i, m, slot=True)} is read-only")
        encoded = name.encode()
        if len(encoded) > NAME_MAX_BYTES or "\0" in name:
            raise ValueError(f"array name {name!r} must be at most {NAME_MAX_BYTES} UTF-8 bytes "
                             "without NUL")
        header = _header_span(n) + -_header_span(n) % block_size
        data_offset = max(metadata_size, header)
        data_offset += -data_offset % strip_size
        smallest = min(m.capacity for m in members)
        member_size = (smallest - data_offset) // strip_size * strip_size
        if member_size < strip_size:
            raise ValueError(f"members of {smallest} bytes leave no room for one {strip_size}-"
                             f"byte strip after {data_offset} bytes of metadata")
        volume = cls(
            members, level=lvl, strip_size=strip_size, block_size=block_size,
            data_offset=data_offset, member_size=member_size,
            array_uuid=(array_uuid or uuidlib.uuid4()).bytes, name=name, generation=0,
            states=[(MemberState.ACTIVE, 0)] * n, rebuild_checkpoint=rebuild_checkpoint,
        )
        if initialize:
            zeros = memoryview(bytes(min(_ZERO_CHUNK, member_size)))
            for m in members:
                for off in range(0, member_size, zeros.nbytes):
                    size = min(zeros.nbytes, member_size - off)
                    m.write_from(data_offset + off, size, [zeros[:size]])
        with volume._meta_lock:
            volume._commit()
        volume._check_online()
        return volume

    @classmethod
    def assemble(
        cls,
        members: Sequence[BlockStore],
        *,
        force: bool = False,
        read_only: bool = False,
        rebuild_checkpoint: int = DEFAULT_REBUILD_CHECKPOINT,
    ) -> RaidVolume:
        """Reassemble an array from its members' metadata, in any order.

        Raises :class:`RaidAssemblyError` naming the member and the problem when a store
        carries no valid header, belongs to another array, disagrees on the geometry, claims a
        slot another store claims, or when the missing, failed and stale members are more than
        the level tolerates. Members missing or stale within tolerance come up failed (the
        volume degraded) and the survivors' metadata records it (unless ``read_only``). The
        caller keeps ownership of the stores when assembly fails.
        """
        if not members:
            raise RaidAssemblyError("no members given")
        headers: list[_Header] = []
        for pos, store in enumerate(members):
            try:
                headers.append(_read_header(store))
            except _HeaderError as exc:
                raise RaidAssemblyError(f"{_describe(pos, store)} {exc}") from None
            except OSError as exc:
                raise RaidAssemblyError(
                    f"{_describe(pos, store)}: cannot read its metadata: {exc}") from exc
        # The array is the one most stores belong to (the first store's on a tie).
        votes = Counter(h.uuid for h in headers)
        first = {h.uuid: pos for pos, h in reversed(list(enumerate(headers)))}
        array = max(votes, key=lambda u: (votes[u], -first[u]))
        ref_pos = first[array]
        ref = headers[ref_pos]
        for pos, h in enumerate(headers):
            if h.uuid != array:
                raise RaidAssemblyError(
                    f"{_describe(pos, members[pos])} belongs to array '{h.name}' uuid "
                    f"{uuidlib.UUID(bytes=h.uuid)}, not '{ref.name}' uuid "
                    f"{uuidlib.UUID(bytes=array)}")
        geometry = ("level", "strip_size", "count", "block_size", "data_offset", "member_size")
        for pos, h in enumerate(headers):
            for attr in geometry:
                mine, theirs = getattr(h, attr), getattr(ref, attr)
                if mine != theirs:
                    raise RaidAssemblyError(
                        f"{_describe(pos, members[pos])} says {attr.replace('_', ' ')} "
                        f"{mine}, {_describe(ref_pos, members[ref_pos])} says {theirs}")
        try:
            level = RaidLevel(ref.level)
            _check_member_count(level, ref.count)
        except ValueError as exc:
            raise RaidAssemblyError(f"{_describe(ref_pos, members[ref_pos])}: {exc}") from None
        slot_of: dict[int, int] = {}
        for pos, h in enumerate(headers):
            if not 0 <= h.slot < ref.count:
                raise RaidAssemblyError(f"{_describe(pos, members[pos])} claims slot {h.slot} "
                                        f"of a {ref.count}-member array")
            if h.slot in slot_of:
                other = slot_of[h.slot]
                raise RaidAssemblyError(
                    f"{_describe(other, members[other])} and {_describe(pos, members[pos])} "
                    f"both claim member slot {h.slot}")
            slot_of[h.slot] = pos
        for pos, store in enumerate(members):
            if store.block_size != ref.block_size or store.capacity < ref.data_offset + ref.member_size:
                raise RaidAssemblyError(
                    f"{_describe(pos, store)} holds {store.capacity} bytes in "
                    f"{store.block_size}-byte blocks; the array needs "
                    f"{ref.data_offset + ref.member_size} in {ref.block_size}-byte blocks")

        authority = max(headers, key=lambda h: h.generation)
        stores: list[BlockStore | None] = [None] * ref.count
        states: list[tuple[MemberState, int]] = []
        notes: dict[int, str] = {}
        changed = False
        for slot in range(ref.count):
            raw_state, watermark = authority.states[slot]
            try:
                state = MemberState(raw_state)
            except ValueError:
                raise RaidAssemblyError(f"the newest metadata gives member {slot} the unknown "
                                        f"state {raw_state}") from None
            pos_or_none = slot_of.get(slot)
            if pos_or_none is None:
                notes[slot] = "missing"
                changed |= state is not MemberState.FAILED
                state = MemberState.FAILED
            else:
                store = members[pos_or_none]
                stores[slot] = store
                h = headers[pos_or_none]
                behind = (f"generation {h.generation}, the array is at "
                          f"{authority.generation}")
                if state is MemberState.FAILED:
                    notes[slot] = ("failed" if h.generation == authority.generation
                                   else f"failed (its metadata is at {behind})")
                elif h.generation < authority.generation:
                    if force:
                        # Trust the newest metadata; the commit below brings its header up.
                        notes[slot] = f"stale ({behind}), accepted by force"
                    else:
                        notes[slot] = f"stale ({behind})"
                        state = MemberState.FAILED
                    changed = True
            watermark = watermark // ref.strip_size * ref.strip_size
            # Only a rebuilding member's watermark means anything; keep it whole rows.
            watermark = min(watermark, ref.member_size) if state is MemberState.REBUILDING else 0
            states.append((state, watermark))

        volume = cls(
            stores, level=level, strip_size=ref.strip_size, block_size=ref.block_size,
            data_offset=ref.data_offset, member_size=ref.member_size, array_uuid=array,
            name=ref.name, generation=authority.generation, states=states, read_only=read_only,
            rebuild_checkpoint=rebuild_checkpoint,
        )
        for slot, note in notes.items():
            volume._members[slot].notes.append(f"at assembly: {note}")
        if volume._offline_reason is not None:
            reason = volume._loss_reason({s: n.split(" ")[0] for s, n in notes.items()})
            described = "; ".join(
                f"{_describe(slot, stores[slot], slot=True)} {note}"
                for slot, note in notes.items()
            )
            hint = (" (force=True accepts stale members the newest metadata lists as in sync)"
                    if any(n.startswith("stale") for n in notes.values()) else "")
            raise RaidAssemblyError(f"{reason} [{described}]{hint}")
        if changed and not volume.read_only:
            with volume._meta_lock:
                volume._commit()
        for slot, note in notes.items():
            _log.warning("raid_member_not_assembled", array=_label(volume), member=slot,
                         reason=note)
        return volume

    # ----------------------------------------------------------------- BlockStore

    def read_into(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        self._check_range(offset, length)
        n = min(length, sum(b.nbytes for b in bufs))
        if n <= 0:
            return 0
        while True:
            self._check_online()
            try:
                if self.level is RaidLevel.RAID5:
                    self._read_raid5(offset, n, bufs)
                else:
                    self._read_mirrored(offset, n, bufs)
                return n
            except _MemberReadFailed:
                continue  # that member is failed now: the retry plans around it

    def write_from(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        if self.read_only:
            raise PermissionError(f"RAID volume '{self.name}' is read-only")
        self._check_range(offset, length)
        n = min(length, sum(b.nbytes for b in bufs))
        if n <= 0:
            return 0
        self._check_online()
        if self.level is RaidLevel.RAID5:
            self._write_raid5(offset, n, bufs)
        else:
            self._write_mirrored(offset, n, bufs)
        # A member that failed mid-write is already out; only a lost volume fails the write.
        self._check_online()
        return n

    def deallocate(self, offset: int, length: int) -> None:
        """Thin provisioning: mirrored levels pass the range to every in-sync copy (a member
        that cannot deallocate writes zeros). RAID 5 deallocates whole stripes on every
        member, parity included (the parity of zero strips is zero, so the stripe stays
        consistent); the partial stripes at either end get zeros through the normal write
        path, which updates their parity."""
        if self.read_only:
            raise PermissionError(f"RAID volume '{self.name}' is read-only")
        self._check_range(offset, length)
        if length <= 0:
            return
        if self.level is RaidLevel.RAID5:
            self._deallocate_raid5(offset, length)
            return
        self._check_online()
        pieces = list(self._pieces(offset, length))
        strip, base = self.strip_size, self.data_offset
        with self._rows_locked(pieces):
            for logical, within, size in pieces:
                row, targets = self._copies_of(logical)
                for m in targets:
                    store = self._members[m].store
                    assert store is not None
                    try:
                        store.deallocate(base + row * strip + within, size)
                    except OSError as exc:
                        self._member_error(m, exc)
        self._check_online()

    def _deallocate_raid5(self, offset: int, length: int) -> None:
        width = self.strip_size * self._data_strips
        end = offset + length
        first = -(-offset // width)  # first whole stripe
        last = end // width  # one past the last whole stripe
        if first >= last:
            BlockStore.deallocate(self, offset, length)
            return
        if offset < first * width:
            BlockStore.deallocate(self, offset, first * width - offset)
        self._check_online()
        strip, base = self.strip_size, self.data_offset
        for stripe in range(first, last):
            with self._row_locks[stripe % _LOCK_TABLE_SIZE]:
                # A member out of sync for this stripe is skipped: rebuilt later from the
                # others, it gets their zeros.
                for m in range(self._n):
                    if not self._in_sync(m, stripe):
                        continue
                    store = self._members[m].store
                    assert store is not None
                    try:
                        store.deallocate(base + stripe * strip, strip)
                    except OSError as exc:
                        self._member_error(m, exc)
            self._check_online()
        if last * width < end:
            BlockStore.deallocate(self, last * width, end - last * width)

    def allocation_run(self, offset: int, limit: int) -> tuple[bool, int]:
        """What the member holding the data says, strip by strip, adjacent strips of the same
        state joined (up to a bounded number, the caller asks again from where this ends).
        Data only a degraded stripe's parity can give back counts as mapped."""
        self._check_range(offset, limit)
        if limit <= 0:
            return True, 0
        state: bool | None = None
        run = 0
        for pieces, (logical, within, size) in enumerate(self._pieces(offset, limit)):
            if pieces >= _ALLOCATION_STRIPS:
                break
            mapped, got = self._strip_allocation(logical, within, size)
            if state is None:
                state = mapped
            elif mapped != state:
                break
            run += got
            if got < size:
                break
        return (True if state is None else state), max(run, 1)

    def _strip_allocation(self, logical: int, within: int, size: int) -> tuple[bool, int]:
        strip, base = self.strip_size, self.data_offset
        if self.level is RaidLevel.RAID5:
            row, k = divmod(logical, self._data_strips)
            candidates = [self._data_member(row, k)]
        else:
            group, row = logical % self._groups, logical // self._groups
            candidates = list(self._group_members(group))
        member = next((m for m in candidates if self._in_sync(m, row)), None)
        store = self._members[member].store if member is not None else None
        if store is None:
            return True, size
        try:
            return store.allocation_run(base + row * strip + within, size)
        except OSError:
            return True, size

    def flush(self) -> None:
        self._check_online()
        for index, member in enumerate(self._members):
            store = member.store
            if store is not None and member.state is not MemberState.FAILED:
                try:
                    store.flush()
                except OSError as exc:
                    self._member_error(index, exc)
        self._check_online()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and self._offline_reason is None:
                with self._meta_lock:
                    if any(m.state is MemberState.REBUILDING
                           and m.watermark != m.saved_watermark for m in self._members):
                        # A clean shutdown resumes the rebuild exactly where it stopped.
                        self._flush_rebuilding()
                        self._commit()
        finally:
            self._closed = True
            for member in self._members:
                if member.store is not None:
                    # A failed member may fail to close; the rest must still close.
                    with contextlib.suppress(OSError):
                        member.store.close()

    # ----------------------------------------------------------------- state

    @property
    def state(self) -> VolumeState:
        if self._offline_reason is not None:
            return VolumeState.FAILED
        states = {m.state for m in self._members}
        if MemberState.REBUILDING in states:
            return VolumeState.REBUILDING
        if MemberState.FAILED in states:
            return VolumeState.DEGRADED
        return VolumeState.OPTIMAL

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def member_count(self) -> int:
        return self._n

    def member_state(self, index: int) -> MemberState:
        return self._members[index].state

    def member_store(self, index: int) -> BlockStore | None:
        return self._members[index].store

    @property
    def rebuild_bytes(self) -> tuple[int, int]:
        """(bytes rebuilt, bytes to rebuild) over the members now rebuilding; (0, 0) if none."""
        rebuilding = [m for m in self._members if m.state is MemberState.REBUILDING]
        return sum(m.watermark for m in rebuilding), len(rebuilding) * self.member_size

    @property
    def rebuild_progress(self) -> float:
        """Fraction of the running rebuild done; 1.0 when nothing is rebuilding."""
        done, total = self.rebuild_bytes
        return done / total if total else 1.0

    def fail_member(self, index: int, reason: str = "failed by request") -> None:
        """Take member ``index`` out of the array (as a controller does on a dead disk)."""
        self._check_index(index)
        with self._meta_lock:
            member = self._members[index]
            if member.state is MemberState.FAILED:
                return
            member.last_error = reason
            self._mark_failed(index, reason)
            self._commit_unless_read_only()

    def replace_member(self, index: int, store: BlockStore) -> None:
        """Put ``store`` in the failed slot ``index`` and start rebuilding onto it.

        The slot's previous store, if another object, is closed. Drive the rebuild with
        :meth:`rebuild_step` or :meth:`rebuild`.
        """
        self._check_index(index)
        if self.level is RaidLevel.RAID0:
            raise ValueError("RAID 0 has no redundancy to rebuild a member from")
        if self.read_only:
            raise PermissionError(f"RAID volume '{self.name}' is read-only")
        if store.read_only:
            raise ValueError("the replacement store is read-only")
        if store.block_size != self.block_size:
            raise ValueError(f"the replacement has {store.block_size}-byte blocks, the array "
                             f"{self.block_size}-byte blocks")
        need = self.data_offset + self.member_size
        if store.capacity < need:
            raise ValueError(f"the replacement holds {store.capacity} bytes, the array needs "
                             f"{need} per member")
        if store.blocking and not self.blocking:
            # The logical unit above chose at start-up to run this volume's I/O inline.
            raise ValueError("a blocking replacement cannot join a volume of non-blocking "
                             "members")
        with self._meta_lock:
            self._check_online()
            member = self._members[index]
            if member.state is not MemberState.FAILED:
                raise ValueError(f"member {index} is {member.state.name.lower()}, not failed: "
                                 "fail it first")
            old = member.store
            member.store = store
            member.watermark = member.saved_watermark = 0
            member.errors = 0
            member.last_error = ""
            member.notes.append("replaced; rebuilding")
            member.state = MemberState.REBUILDING
            self._commit()
        if old is not None and old is not store:
            with contextlib.suppress(OSError):  # it failed already; closing it is a courtesy
                old.close()
        _log.info("raid_member_replaced", array=_label(self), member=index)

    def rebuild_step(self, max_bytes: int = MIB) -> bool:
        """Rebuild up to ``max_bytes`` (at least one strip) of the next rebuilding member.

        Returns True when no member is left to rebuild. Safe to call from a background thread
        while I/O goes on; calls from several threads take turns.
        """
        with self._rebuild_lock:
            self._check_online()
            target = self._rebuild_target()
            if target is None:
                return True
            member = self._members[target]
            store = member.store
            strip = self.strip_size
            for _ in range(max(1, max_bytes // strip)):
                done = member.watermark
                if done >= self.member_size:
                    break
                row = done // strip
                with self._row_locks[row % _LOCK_TABLE_SIZE]:
                    # Failed (and perhaps replaced) while we waited for the row: this pass is
                    # over, its work may belong to a store that left the array.
                    if (member.state is not MemberState.REBUILDING or member.store is not store
                            or member.watermark != done):
                        break
                    data = self._reconstruct_row(target, row)
                    if not self._write_member(target, self.data_offset + done, strip,
                                              [memoryview(data)]):
                        break
                    member.watermark = done + strip
                if (member.watermark < self.member_size  # the end commits anyway
                        and member.watermark - member.saved_watermark >= self.rebuild_checkpoint):
                    self._checkpoint()
            if (member.state is MemberState.REBUILDING and member.store is store
                    and member.watermark >= self.member_size):
                self._finish_rebuild(target)
            self._check_online()
            return self._rebuild_target() is None

    def rebuild(self, chunk: int = 4 * MIB) -> None:
        """Run the rebuild to its end on the calling thread."""
        while not self.rebuild_step(chunk):
            pass

    def status(self) -> dict[str, Any]:
        """What ``emuhba ctl`` shows about this volume."""
        done, total = self.rebuild_bytes
        target = self._rebuild_target()
        members = []
        for index, m in enumerate(self._members):
            entry: dict[str, Any] = {
                "index": index,
                "state": m.state.name.lower(),
                "present": m.store is not None,
                "path": getattr(m.store, "path", None),
                "size": m.store.capacity if m.store is not None else None,
                "errors": m.errors,
                "last_error": m.last_error or None,
                "notes": list(m.notes),
            }
            if m.state is MemberState.REBUILDING:
                entry["rebuild_watermark"] = m.watermark
                entry["saved_watermark"] = m.saved_watermark
            members.append(entry)
        return {
            "name": self.name,
            "uuid": str(self.uuid),
            "level": int(self.level),
            "strip_size": self.strip_size,
            "state": self.state.value,
            "offline_reason": self._offline_reason,
            "capacity": self.capacity,
            "block_size": self.block_size,
            "member_size": self.member_size,
            "data_offset": self.data_offset,
            "generation": self._generation,
            "read_only": self.read_only,
            "members": members,
            "rebuild": None if target is None else {
                "member": target, "progress": done / total if total else 1.0,
                "bytes_done": done, "bytes_total": total,
            },
        }

    # ----------------------------------------------------------------- mirrored / striped I/O

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(logical strip, offset in strip, size) for each strip the range touches."""
        strip = self.strip_size
        pos, end = offset, offset + length
        while pos < end:
            logical, within = divmod(pos, strip)
            size = min(strip - within, end - pos)
            yield logical, within, size
            pos += size

    def _group_members(self, group: int) -> range:
        return range(group * self._copies, (group + 1) * self._copies)

    def _read_mirrored(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        cursor = _SgCursor(bufs)
        plan = _Plan()
        groups, strip, base = self._groups, self.strip_size, self.data_offset
        for logical, within, size in self._pieces(offset, length):
            group, row = logical % groups, logical // groups
            source = next((m for m in self._group_members(group) if self._in_sync(m, row)), None)
            if source is None:
                self._raise_offline()
            plan.add(source, base + row * strip + within, size, cursor.take(size))
        for member, run in plan:
            self._read_member(member, run.offset, run.size, run.views)

    @contextlib.contextmanager
    def _rows_locked(self, pieces: Sequence[tuple[int, int, int]]) -> Iterator[None]:
        """Hold the row locks of ``pieces`` on mirrored levels: mirrors must see concurrent
        changes in the same order, and a rebuild copying a row must not interleave with one."""
        locks: list[threading.Lock] = []
        if self.level is not RaidLevel.RAID0:
            groups = self._groups
            ids = sorted({(logical // groups) % _LOCK_TABLE_SIZE for logical, _, _ in pieces})
            locks = [self._row_locks[i] for i in ids]
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    def _copies_of(self, logical: int) -> tuple[int, list[int]]:
        """(row, in-sync members holding logical strip ``logical``); offline if none does."""
        group, row = logical % self._groups, logical // self._groups
        targets = [m for m in self._group_members(group) if self._in_sync(m, row)]
        if not targets:
            self._raise_offline()
        return row, targets

    def _write_mirrored(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        pieces = list(self._pieces(offset, length))
        strip, base = self.strip_size, self.data_offset
        with self._rows_locked(pieces):
            cursor = _SgCursor(bufs)
            plan = _Plan()
            for logical, within, size in pieces:
                views = cursor.take(size)
                row, targets = self._copies_of(logical)
                for m in targets:
                    plan.add(m, base + row * strip + within, size, views)
            for member, run in plan:
                self._write_member(member, run.offset, run.size, run.views)

    # ----------------------------------------------------------------- RAID 5 I/O

    def _parity_member(self, stripe: int) -> int:
        return self._n - 1 - stripe % self._n

    def _data_member(self, stripe: int, k: int) -> int:
        return (self._parity_member(stripe) + 1 + k) % self._n

    def _read_raid5(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        cursor = _SgCursor(bufs)
        plan = _Plan()
        missing: list[tuple[int, int, int, int, list[memoryview]]] = []
        d, strip, base = self._data_strips, self.strip_size, self.data_offset
        for logical, within, size in self._pieces(offset, length):
            stripe, k = divmod(logical, d)
            member = self._data_member(stripe, k)
            views = cursor.take(size)
            if self._in_sync(member, stripe):
                plan.add(member, base + stripe * strip + within, size, views)
            else:
                missing.append((stripe, member, within, size, views))
        for member, run in plan:
            self._read_member(member, run.offset, run.size, run.views)
        for stripe, member, within, size, views in missing:
            self._read_degraded(stripe, member, within, size, views)

    def _read_degraded(self, stripe: int, missing: int, within: int, size: int,
                       views: list[memoryview]) -> None:
        """Rebuild a missing data strip's bytes from the rest of its stripe into ``views``."""
        offset = self.data_offset + stripe * self.strip_size + within
        # Locked: a concurrent read-modify-write between our reads of data and of parity would
        # hand us a mix of old and new and so garbage.
        with self._row_locks[stripe % _LOCK_TABLE_SIZE]:
            if self._in_sync(missing, stripe):  # rebuilt meanwhile
                self._read_member(missing, offset, size, views)
                return
            chunks: list[bytearray] = []
            for m in range(self._n):
                if m == missing:
                    continue
                if not self._in_sync(m, stripe):
                    self._raise_offline()
                chunks.append(self._read_bytes(m, offset, size))
        _scatter(_xor_strips(chunks, size), views)

    def _write_raid5(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        cursor = _SgCursor(bufs)
        d = self._data_strips
        by_stripe: dict[int, list[_StripePiece]] = {}
        for logical, within, size in self._pieces(offset, length):
            stripe, k = divmod(logical, d)
            by_stripe.setdefault(stripe, []).append(
                _StripePiece(k, within, size, cursor.take(size)))
        for stripe, pieces in by_stripe.items():
            while True:
                try:
                    self._write_stripe(stripe, pieces)
                    break
                except _MemberReadFailed:
                    continue  # nothing was written yet: replan this stripe around the failure

    def _write_stripe(self, stripe: int, pieces: list[_StripePiece]) -> None:
        n, d, strip = self._n, self._data_strips, self.strip_size
        base = self.data_offset + stripe * strip
        with self._row_locks[stripe % _LOCK_TABLE_SIZE]:
            self._check_online()
            gone = [m for m in range(n) if not self._in_sync(m, stripe)]
            if len(gone) > 1:
                self._raise_offline()
            missing = gone[0] if gone else None
            parity_member = self._parity_member(stripe)
            lo = min(p.offset for p in pieces)
            hi = max(p.offset + p.size for p in pieces)
            span = hi - lo
            parity: bytes | None
            touched = {self._data_member(stripe, p.k) for p in pieces}
            full = len(pieces) == d and lo == 0 and hi == strip and all(
                p.size == strip for p in pieces)
            if missing == parity_member:
                parity = None  # nothing to keep consistent with
            elif full:
                parity = _xor_strips([b"".join(p.views) for p in pieces], strip)
            elif missing is None or missing not in touched:
                parity = self._rmw_parity(stripe, pieces, lo, hi)
            else:
                parity = self._rcw_parity(stripe, pieces, missing, lo, hi)
            # Everything is read and computed before the first write: a member failing from
            # here on leaves the survivors consistent, so it is dropped, not retried.
            for p in pieces:
                member = self._data_member(stripe, p.k)
                if member != missing:
                    self._write_member(member, base + p.offset, p.size, p.views)
            if parity is not None:
                self._write_member(parity_member, base + lo, span, [memoryview(parity)])

    def _rmw_parity(self, stripe: int, pieces: list[_StripePiece], lo: int, hi: int) -> bytes:
        """New parity over [lo, hi) of the strip: old parity ^ old data ^ new data."""
        base = self.data_offset + stripe * self.strip_size
        delta = 0
        for p in pieces:
            old = self._read_bytes(self._data_member(stripe, p.k), base + p.offset, p.size)
            change = int.from_bytes(old, "big") ^ int.from_bytes(b"".join(p.views), "big")
            delta ^= change << (8 * (hi - p.offset - p.size))
        old_parity = self._read_bytes(self._parity_member(stripe), base + lo, hi - lo)
        return (int.from_bytes(old_parity, "big") ^ delta).to_bytes(hi - lo, "big")

    def _rcw_parity(self, stripe: int, pieces: list[_StripePiece], missing: int, lo: int,
                    hi: int) -> bytes:
        """New parity over [lo, hi) when a written strip's member is missing: rebuild the whole
        stripe there (the missing strip from parity), lay the new data over it, XOR it all."""
        base = self.data_offset + stripe * self.strip_size
        span = hi - lo
        strips: dict[int, bytearray] = {}
        missing_k = -1
        for k in range(self._data_strips):
            member = self._data_member(stripe, k)
            if member == missing:
                missing_k = k
            else:
                strips[k] = self._read_bytes(member, base + lo, span)
        old_parity = self._read_bytes(self._parity_member(stripe), base + lo, span)
        strips[missing_k] = bytearray(_xor_strips([old_parity, *strips.values()], span))
        for p in pieces:
            strips[p.k][p.offset - lo : p.offset - lo + p.size] = b"".join(p.views)
        return _xor_strips(list(strips.values()), span)

    # ----------------------------------------------------------------- rebuild

    def _rebuild_target(self) -> int | None:
        return next((i for i, m in enumerate(self._members)
                     if m.state is MemberState.REBUILDING), None)

    def _reconstruct_row(self, target: int, row: int) -> bytes | bytearray:
        """The strip member ``target`` holds at ``row``, from the other members; row locked."""
        offset = self.data_offset + row * self.strip_size
        while True:
            self._check_online()
            try:
                if self.level is RaidLevel.RAID5:
                    others = [self._read_bytes(m, offset, self.strip_size)
                              for m in range(self._n) if m != target]
                    return _xor_strips(others, self.strip_size)
                group = target // self._copies
                source = next((m for m in self._group_members(group)
                               if m != target and self._members[m].state is MemberState.ACTIVE),
                              None)
                if source is None:
                    self._raise_offline()
                return self._read_bytes(source, offset, self.strip_size)
            except _MemberReadFailed:
                continue

    def _flush_rebuilding(self) -> None:
        """Make rebuilt data durable before a watermark that vouches for it is saved."""
        for index, m in enumerate(self._members):
            if m.state is MemberState.REBUILDING and m.store is not None:
                try:
                    m.store.flush()
                except OSError as exc:
                    self._member_error(index, exc)
                    continue
                m.saved_watermark = m.watermark

    def _checkpoint(self) -> None:
        with self._meta_lock:
            self._flush_rebuilding()
            self._commit()

    def _finish_rebuild(self, index: int) -> None:
        member = self._members[index]
        assert member.store is not None
        try:
            member.store.flush()
        except OSError as exc:
            self._member_error(index, exc)
            return
        with self._meta_lock:
            if member.state is not MemberState.REBUILDING:
                return
            member.state = MemberState.ACTIVE
            member.watermark = member.saved_watermark = 0
            member.notes.append("rebuilt")
            self._commit()
        _log.info("raid_rebuild_done", array=_label(self), member=index)

    # ----------------------------------------------------------------- members

    def _in_sync(self, index: int, row: int) -> bool:
        """Whether member ``index`` holds valid data for ``row`` (a stripe, for RAID 5)."""
        m = self._members[index]
        if m.state is MemberState.ACTIVE:
            return True
        return m.state is MemberState.REBUILDING and (row + 1) * self.strip_size <= m.watermark

    def _read_member(self, index: int, offset: int, size: int,
                     views: Sequence[memoryview]) -> None:
        store = self._members[index].store
        assert store is not None
        try:
            store.read_into(offset, size, views)
        except OSError as exc:
            self._member_error(index, exc)
            raise _MemberReadFailed(index) from exc

    def _read_bytes(self, index: int, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        self._read_member(index, offset, size, [memoryview(buf)])
        return buf

    def _write_member(self, index: int, offset: int, size: int,
                      views: Sequence[memoryview]) -> bool:
        """Write to a member; on OSError fail it and answer False (the caller carries on)."""
        store = self._members[index].store
        assert store is not None
        try:
            store.write_from(offset, size, views)
        except OSError as exc:
            self._member_error(index, exc)
            return False
        return True

    def _member_error(self, index: int, exc: OSError) -> None:
        with self._meta_lock:
            member = self._members[index]
            member.errors += 1
            member.last_error = str(exc) or type(exc).__name__
            if member.state is MemberState.FAILED:
                return
            self._mark_failed(index, f"I/O error: {member.last_error}")
            self._commit_unless_read_only()

    def _mark_failed(self, index: int, reason: str) -> None:
        """Caller holds the metadata lock and commits afterwards."""
        member = self._members[index]
        was = member.state
        member.state = MemberState.FAILED
        member.watermark = member.saved_watermark = 0
        member.notes.append(reason if was is MemberState.ACTIVE
                            else f"{reason} (while {was.name.lower()})")
        if self._offline_reason is None:
            self._offline_reason = self._loss_reason()
        _log.warning("raid_member_failed", array=_label(self), member=index, reason=reason,
                     offline=self._offline_reason)

    def _commit_unless_read_only(self) -> None:
        if not self.read_only and not self._closed:
            self._commit()

    def _commit(self) -> None:
        """Bump the generation and write the header to every in-sync member, then flush.

        Caller holds the metadata lock. A member that fails its header write is failed and the
        commit starts over, so the survivors' headers record that failure too.
        """
        while True:
            self._generation += 1
            states = tuple(
                (int(m.state), m.saved_watermark if m.state is MemberState.REBUILDING else 0)
                for m in self._members
            )
            broken = False
            for index, m in enumerate(self._members):
                if m.state is MemberState.FAILED or m.store is None:
                    continue
                header = _Header(self.uuid.bytes, self.name, int(self.level), self.strip_size,
                                 self._n, index, self.block_size, self.data_offset,
                                 self.member_size, self._generation, states)
                raw = _encode_header(header, self.block_size)
                try:
                    m.store.write_from(0, len(raw), [memoryview(raw)])
                    m.store.flush()
                except OSError as exc:
                    m.errors += 1
                    m.last_error = str(exc) or type(exc).__name__
                    self._mark_failed(index, f"metadata write failed: {m.last_error}")
                    broken = True
                    break
            if not broken:
                return

    def _loss_reason(self, words: dict[int, str] | None = None) -> str | None:
        """Why the volume cannot serve I/O with the members now out of sync, or None.

        ``words`` says how to call an out member (assembly: "missing", "stale"); by default it
        is named by its state.
        """
        out = [i for i, m in enumerate(self._members) if m.state is not MemberState.ACTIVE]
        if not out:
            return None
        level = self.level
        if level is RaidLevel.RAID0:
            lost, why = out, "RAID 0 has no redundancy"
        elif level is RaidLevel.RAID5:
            lost, why = out, "RAID 5 tolerates one"
        else:
            pair = next((list(self._group_members(g)) for g in range(self._groups)
                         if all(m in out for m in self._group_members(g))), None)
            if pair is None:
                return None
            lost = pair
            why = ("RAID 1 needs one mirror" if level is RaidLevel.RAID1
                   else f"both halves of mirror pair {pair[0] // 2} of the RAID 10")
        if level is RaidLevel.RAID5 and len(lost) < 2:
            return None
        words = words or {}
        named = {i: words.get(i, self._members[i].state.name.lower()) for i in lost}
        if len(set(named.values())) == 1:
            plural = len(lost) > 1
            return (f"member{'s' if plural else ''} {_join_numbers(lost)} "
                    f"{next(iter(named.values()))}: {why}")
        return ", ".join(f"member {i} {w}" for i, w in named.items()) + f": {why}"

    def _check_online(self) -> None:
        if self._closed:
            raise ValueError(f"RAID volume '{self.name}' is closed")
        if self._offline_reason is not None:
            self._raise_offline()

    def _raise_offline(self) -> NoReturn:
        reason = self._offline_reason or self._loss_reason() or "member lost"
        raise VolumeOffline(f"RAID {int(self.level)} volume '{_label(self)}' is offline: "
                            f"{reason}")

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self._n:
            raise IndexError(f"member {index} out of range: the array has {self._n} members")


def _label(volume: RaidVolume) -> str:
    return volume.name or str(volume.uuid)


def _check_member_count(level: RaidLevel, n: int) -> None:
    ok = {
        RaidLevel.RAID0: n >= 2,
        RaidLevel.RAID1: n >= 2,
        RaidLevel.RAID5: n >= 3,
        RaidLevel.RAID10: n >= 4 and n % 2 == 0,
    }[level]
    if not ok or n > MAX_MEMBERS:
        need = {RaidLevel.RAID0: "at least 2", RaidLevel.RAID1: "at least 2",
                RaidLevel.RAID5: "at least 3", RaidLevel.RAID10: "an even number, at least 4"}
        raise ValueError(f"RAID {int(level)} needs {need[level]} members (at most "
                         f"{MAX_MEMBERS}), not {n}")
