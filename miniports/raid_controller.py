"""The emulated RAID controller and its miniport ("emuraid").

The controller is an :class:`~miniports.disk.EmulatedDiskController` (slots, latency model,
faults, link, completion ring and interrupt) whose logical units sit on RAID logical drives
(:class:`~miniports.raid.RaidVolume`) instead of plain stores, optionally behind the
controller's write-back cache (:class:`ControllerCache`). What it adds:

* arrays opened from their members: :func:`open_array` assembles an array whose members carry
  metadata, creates one over blank members, and refuses (naming the member) anything between;
* a rebuild engine: a background thread that rebuilds replaced members while I/O goes on, at a
  configurable rate, with progress in ``emuhba ctl raid``;
* management (IOCTLs, so ``emuhba ctl`` reaches it through the port): fail a member, replace a
  member with a new RAM or file store (which starts the rebuild), set the rebuild rate.

The cache models a controller's DRAM cache: with the caching mode page's WCE set (the default),
a write completes once it is in the cache; FUA, SYNCHRONIZE CACHE, and every write when WCE is
clear (the logical unit flushes the store after each write then) destage the dirty lines to the
members and flush the members (fdatasync for files) before status goes back. Like real DRAM it
is volatile: what was not flushed is lost when the process dies, which is what the
crash-durability tests check against.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Self

import structlog

from emuhba.miniport import MiniportIoctlError
from miniports.disk import (
    Address,
    DiskMiniport,
    EmulatedDiskController,
    Irq,
    Latency,
    unit_serial,
)
from miniports.lu import LogicalUnit
from miniports.raid import MAGIC, RaidAssemblyError, RaidLevel, RaidVolume, VolumeState
from miniports.store import BlockStore, FileStore, RamStore

log = structlog.get_logger("emuhba.miniport.raid")

MIB: Final = 1 << 20
DEFAULT_CACHE_BYTES: Final = 64 * MIB
DEFAULT_REBUILD_RATE: Final = 256 * MIB  # bytes per second; 0: as fast as the members go
_REBUILD_SLICE: Final = 1 * MIB


def has_array_metadata(store: BlockStore) -> bool:
    """Whether ``store`` starts with RAID metadata (valid or not): blank members read zeros."""
    magic = bytearray(len(MAGIC))
    if store.capacity < len(magic):
        return False
    store.read_into(0, len(magic), [memoryview(magic)])
    return bytes(magic) == MAGIC


def open_array(members: Sequence[BlockStore], *, name: str, level: int, strip_size: int,
               names: Sequence[str] | None = None) -> RaidVolume:
    """The array ``name`` over ``members``: assembled from their metadata when they carry it
    (and checked against what the caller expects), created when all are blank.

    ``names`` label the members in errors (config store names). Raises RaidAssemblyError with
    a message that says which member is wrong and how.
    """
    labels = list(names) if names is not None else [str(i) for i in range(len(members))]
    marked = [has_array_metadata(m) for m in members]
    if not any(marked):
        log.info("raid_array_created", array=name, level=level, members=len(members),
                 strip_size=strip_size)
        return RaidVolume.create(members, level, strip_size, name)
    blank = [labels[i] for i, m in enumerate(marked) if not m]
    volume = RaidVolume.assemble(members)
    try:
        problems = []
        if volume.name != name:
            problems.append(f"the members hold array {volume.name!r}, not {name!r}")
        if int(volume.level) != level:
            problems.append(f"the members hold RAID {int(volume.level)}, not RAID {level}")
        if volume.strip_size != strip_size:
            problems.append(f"the members use {volume.strip_size}-byte strips, not {strip_size}")
        if volume.member_count != len(members):
            problems.append(f"the array has {volume.member_count} members, {len(members)} given")
        if problems:
            raise RaidAssemblyError(f"array {name!r}: " + "; ".join(problems))
    except BaseException:
        volume.close()
        raise
    if blank:
        # Assembly took the blank ones as missing members: they stay failed until replaced.
        log.warning("raid_blank_members", array=name, members=blank,
                    hint="replace them with `emuhba ctl raid replace-member` to rebuild")
    log.info("raid_array_assembled", array=name, state=volume.state.value,
             generation=volume.generation)
    return volume


class ControllerCache(BlockStore):
    """A write-back cache of ``capacity`` bytes in front of one logical drive.

    Dirty data is kept in whole lines (4 KiB, or one block if larger) in least-recently-written
    order; a write that finds the cache full destages the oldest lines first (the controller
    goes write-through while it is full). Reads come from the volume with the dirty lines laid
    over them. One lock orders everything: the model is about semantics, not cache speed.
    """

    def __init__(self, volume: RaidVolume, capacity: int = DEFAULT_CACHE_BYTES) -> None:
        self.volume = volume
        self.block_size = volume.block_size
        self.physical_block_size = volume.physical_block_size
        self.num_blocks = volume.num_blocks
        self.blocking = volume.blocking
        self.read_only = volume.read_only
        self.line = max(4096, volume.block_size)
        self.capacity_lines = max(1, capacity // self.line)
        self._dirty: OrderedDict[int, bytearray] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self.write_hits = 0
        self.destaged_lines = 0
        self.flushes = 0

    @property
    def dirty_bytes(self) -> int:
        return len(self._dirty) * self.line

    def read_into(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        self._check_range(offset, length)
        with self._lock:
            moved = self.volume.read_into(offset, length, bufs)
            if self._dirty:
                self._overlay(offset, length, bufs)
        return moved

    def _overlay(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        line = self.line
        first, last = offset // line, (offset + length - 1) // line
        if last - first + 1 > len(self._dirty):
            hits = sorted(i for i in self._dirty if first <= i <= last)
        else:
            hits = [i for i in range(first, last + 1) if i in self._dirty]
        for index in hits:
            data = self._dirty[index]
            start = max(offset, index * line)
            end = min(offset + length, (index + 1) * line)
            _copy_into(bufs, start - offset, memoryview(data)[start - index * line:
                                                              end - index * line])

    def write_from(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        self._check_range(offset, length)
        if self.read_only:
            raise PermissionError("the logical drive is read-only")
        line = self.line
        source = _Gather(bufs, length)
        with self._lock:
            pos = offset
            end = offset + length
            while pos < end:
                index = pos // line
                base = index * line
                take = min(end, base + line) - pos
                data = self._dirty.get(index)
                if data is None:
                    data = bytearray(line)
                    if take != line:
                        # A partial line: fill it from the drive first (read-allocate).
                        self.volume.read_into(base, line, [memoryview(data)])
                else:
                    self.write_hits += 1
                    self._dirty.move_to_end(index)
                source.copy_to(memoryview(data)[pos - base:pos - base + take])
                self._dirty[index] = data
                pos += take
            while len(self._dirty) > self.capacity_lines:
                self._destage_oldest()
        return length

    def deallocate(self, offset: int, length: int) -> None:
        """Dirty lines inside the range are dropped (their data is being discarded anyway);
        dirty lines the range only partly covers keep their other bytes, with the covered
        bytes zeroed, so a later destage cannot bring the old data back."""
        self._check_range(offset, length)
        if self.read_only:
            raise PermissionError("the logical drive is read-only")
        if length <= 0:
            return
        line = self.line
        end = offset + length
        with self._lock:
            if self._dirty:
                first, last = offset // line, (end - 1) // line
                if last - first + 1 > len(self._dirty):
                    hits = [i for i in self._dirty if first <= i <= last]
                else:
                    hits = [i for i in range(first, last + 1) if i in self._dirty]
                for index in hits:
                    base = index * line
                    start, stop = max(offset, base), min(end, base + line)
                    if start == base and stop == base + line:
                        del self._dirty[index]
                    else:
                        self._dirty[index][start - base : stop - base] = bytes(stop - start)
            self.volume.deallocate(offset, length)

    def allocation_run(self, offset: int, limit: int) -> tuple[bool, int]:
        """The drive's answer, with dirty lines counted as mapped (they will be written)."""
        self._check_range(offset, limit)
        with self._lock:
            mapped, run = self.volume.allocation_run(offset, limit)
            if not self._dirty or mapped:
                return mapped, run
            line = self.line
            dirty = [i for i in self._dirty if i * line < offset + run and (i + 1) * line > offset]
            if not dirty:
                return mapped, run
            first = min(dirty)
            if first * line > offset:
                return False, first * line - offset
            # Mapped through the run of consecutive dirty lines from here.
            last = first
            while last + 1 in self._dirty and (last + 1) * line < offset + limit:
                last += 1
            return True, min(limit, (last + 1) * line - offset)

    def _destage_oldest(self) -> None:
        index, data = self._dirty.popitem(last=False)
        self.volume.write_from(index * self.line, self.line, [memoryview(data)])
        self.destaged_lines += 1

    def flush(self) -> None:
        with self._lock:
            for index in sorted(self._dirty):
                self.volume.write_from(index * self.line, self.line,
                                       [memoryview(self._dirty[index])])
                self.destaged_lines += 1
            self._dirty.clear()
            self.flushes += 1
            self.volume.flush()

    def discard(self) -> int:
        """Drop every dirty line unwritten (a cache lost with its power); returns bytes lost."""
        with self._lock:
            lost = self.dirty_bytes
            self._dirty.clear()
        return lost

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self.volume.close()

    def status(self) -> dict[str, Any]:
        return {"capacity": self.capacity_lines * self.line, "line": self.line,
                "dirty_bytes": self.dirty_bytes, "write_hits": self.write_hits,
                "destaged_lines": self.destaged_lines, "flushes": self.flushes}


class _Gather:
    """Reads ``length`` bytes from a scatter/gather list in order, without joining it."""

    def __init__(self, bufs: Sequence[memoryview], length: int) -> None:
        self._bufs = list(bufs)
        self._index = 0
        self._offset = 0
        self._left = length

    def copy_to(self, target: memoryview) -> None:
        pos = 0
        want = target.nbytes
        while pos < want and self._left > 0:
            buf = self._bufs[self._index]
            n = min(buf.nbytes - self._offset, want - pos, self._left)
            target[pos:pos + n] = buf[self._offset:self._offset + n]
            pos += n
            self._offset += n
            self._left -= n
            if self._offset == buf.nbytes:
                self._index += 1
                self._offset = 0
        if pos < want:
            target[pos:] = bytes(want - pos)


def _copy_into(bufs: Sequence[memoryview], at: int, data: memoryview) -> None:
    """Copy ``data`` into the scatter/gather list at byte ``at`` of its concatenation."""
    skip = at
    pos = 0
    for buf in bufs:
        if pos >= data.nbytes:
            return
        if skip >= buf.nbytes:
            skip -= buf.nbytes
            continue
        n = min(buf.nbytes - skip, data.nbytes - pos)
        buf[skip:skip + n] = data[pos:pos + n]
        pos += n
        skip = 0


class RaidController(EmulatedDiskController):
    """An emulated RAID controller: logical drives over member disks, a write-back cache per
    drive (optional), and a rebuild engine. Units are built by :meth:`RaidMiniport.from_arrays`.
    """

    def __init__(self, units: Mapping[Address, LogicalUnit], arrays: Mapping[str, RaidVolume],
                 caches: Mapping[str, ControllerCache], *, irq: Irq, slots: int,
                 latency_s: Latency, workers: int, rebuild_rate: int) -> None:
        super().__init__(dict(units), slots, latency_s, workers, irq=irq)
        self.arrays = dict(arrays)
        self.caches = dict(caches)
        self.rebuild_rate = rebuild_rate
        self._rebuild_wake = threading.Event()
        self._rebuild_stop = threading.Event()
        self._rebuild_thread: threading.Thread | None = None

    def start(self) -> None:
        super().start()
        if self._rebuild_thread is None:
            self._rebuild_thread = threading.Thread(target=self._rebuild_engine,
                                                    name="emuhba-raid-rebuild", daemon=True)
            self._rebuild_thread.start()
        self._rebuild_wake.set()  # an array assembled mid-rebuild resumes at once

    def close(self) -> None:
        self._rebuild_stop.set()
        self._rebuild_wake.set()
        if self._rebuild_thread is not None:
            self._rebuild_thread.join(30)
            self._rebuild_thread = None
        try:
            super().close()  # flushes and closes the units' stores: caches, then their drives
        finally:
            for volume in self.arrays.values():
                volume.close()  # arrays no unit maps (closing twice is harmless)

    def kick_rebuild(self) -> None:
        self._rebuild_wake.set()

    def _rebuild_engine(self) -> None:
        """Rebuild whatever needs it, a slice at a time, paced to ``rebuild_rate``."""
        while not self._rebuild_stop.is_set():
            self._rebuild_wake.wait()
            self._rebuild_wake.clear()
            busy = True
            while busy and not self._rebuild_stop.is_set():
                busy = False
                for name, volume in list(self.arrays.items()):
                    if volume.state is not VolumeState.REBUILDING:
                        continue
                    busy = True
                    try:
                        volume.rebuild_step(_REBUILD_SLICE)
                    except OSError as exc:
                        log.error("raid_rebuild_failed", array=name, error=str(exc))
                        busy = False
                        break
                    if volume.state is not VolumeState.REBUILDING:
                        log.info("raid_rebuild_finished", array=name, state=volume.state.value)
                if busy and self.rebuild_rate:
                    self._rebuild_stop.wait(_REBUILD_SLICE / self.rebuild_rate)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["arrays"] = self.array_status()
        info["rebuild_rate_bytes_s"] = self.rebuild_rate
        return info

    def array_status(self) -> list[dict[str, Any]]:
        out = []
        for name, volume in self.arrays.items():
            status = volume.status()
            status["name"] = name
            cache = self.caches.get(name)
            status["write_cache"] = cache.status() if cache is not None else None
            status["units"] = ["{}:{}:{}".format(*a) for a, lu in self.units.items()
                               if lu.store is volume or lu.store is cache]
            out.append(status)
        return out


class RaidMiniport(DiskMiniport):
    """The miniport of :class:`RaidController` ("emuraid")."""

    name = "emuraid"

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, RaidVolume],
        targets: Sequence[tuple[int, int, str, Sequence[tuple[int, str, bool]]]],
        *,
        write_cache: Mapping[str, bool] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        slots: int = 1024,
        latency_s: Latency = 0.0,
        workers: int = 4,
        queue_depth: int = 64,
        link_down_timeout: float = 30.0,
        rebuild_rate: int = DEFAULT_REBUILD_RATE,
    ) -> Self:
        """Logical units over ``arrays``: ``targets`` gives (path id, target id, port name,
        [(lun, array name, read_only)]). Arrays with ``write_cache[name]`` (default True) sit
        behind a :class:`ControllerCache`. The controller owns the arrays from here on."""
        caching = dict(write_cache or {})
        caches = {name: ControllerCache(volume, cache_bytes) for name, volume in arrays.items()
                  if caching.get(name, True)}
        units: dict[Address, LogicalUnit] = {}

        def luns_of(path_id: int, target_id: int) -> Callable[[], list[int]]:
            return lambda: sorted(a[2] for a in units if a[:2] == (path_id, target_id))

        # EXTENDED COPY's copy targets: the units of the same target.
        def peers_of(path_id: int, target_id: int) -> Callable[[], dict[int, LogicalUnit]]:
            return lambda: {a[2]: u for a, u in units.items() if a[:2] == (path_id, target_id)}

        for path_id, target_id, port_name, luns in targets:
            for lun, array, read_only in luns:
                store: BlockStore = caches.get(array) or arrays[array]
                address = (path_id, target_id, lun)
                units[address] = LogicalUnit(
                    store, lun=lun, target_luns=luns_of(path_id, target_id),
                    serial=unit_serial(port_name, *address), target_port_name=port_name,
                    read_only=read_only, product=f"RAID{int(arrays[array].level)} {array}"[:16],
                    peers=peers_of(path_id, target_id))

        def build(irq: Irq) -> RaidController:
            return RaidController(units, arrays, caches, irq=irq, slots=slots,
                                  latency_s=latency_s, workers=workers,
                                  rebuild_rate=rebuild_rate)

        return cls(build, queue_depth=queue_depth, link_down_timeout=link_down_timeout)

    @property
    def raid(self) -> RaidController:
        controller = self.controller
        assert isinstance(controller, RaidController)
        return controller

    # ------------------------------------------------------------------------------ ioctls

    def _ioctls(self) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
        table = super()._ioctls()
        table.update({
            "raid.status": lambda args: self.raid.array_status(),
            "raid.fail-member": self._ioctl_fail_member,
            "raid.replace-member": self._ioctl_replace_member,
            "raid.rebuild-rate": self._ioctl_rebuild_rate,
        })
        return table

    def _array(self, args: Mapping[str, Any]) -> tuple[str, RaidVolume]:
        name = args.get("array")
        arrays = self.raid.arrays
        if name is None and len(arrays) == 1:
            name = next(iter(arrays))
        if name not in arrays:
            raise MiniportIoctlError("no-array", f"no array {name!r} (arrays: "
                                                 f"{', '.join(sorted(arrays))})")
        return str(name), arrays[str(name)]

    def _member(self, volume: RaidVolume, args: Mapping[str, Any]) -> int:
        index = int(args["member"])
        if not 0 <= index < volume.member_count:
            raise MiniportIoctlError("no-member", f"array {volume.name!r} has members "
                                                  f"0..{volume.member_count - 1}, not {index}")
        return index

    def _ioctl_fail_member(self, args: Mapping[str, Any]) -> dict[str, Any]:
        name, volume = self._array(args)
        index = self._member(volume, args)
        volume.fail_member(index, str(args.get("reason", "failed by operator")))
        log.warning("raid_member_failed_by_request", array=name, member=index,
                    state=volume.state.value)
        return self._one(name)

    def _ioctl_replace_member(self, args: Mapping[str, Any]) -> dict[str, Any]:
        name, volume = self._array(args)
        index = self._member(volume, args)
        need = volume.data_offset + volume.member_size
        path = args.get("path")
        size = int(args.get("size") or need)
        store: BlockStore
        if path:
            store = FileStore(str(path), size, block_size=volume.block_size)
        else:
            store = RamStore.of_size(size, block_size=volume.block_size)
        try:
            volume.replace_member(index, store)
        except (ValueError, PermissionError, OSError) as exc:
            store.close()
            raise MiniportIoctlError("refused", f"array {name!r}: {exc}") from None
        self.raid.kick_rebuild()
        return self._one(name)

    def _ioctl_rebuild_rate(self, args: Mapping[str, Any]) -> dict[str, Any]:
        rate = int(float(args["mib_per_s"]) * MIB)
        if rate < 0:
            raise ValueError("a rebuild rate is >= 0 MiB/s (0: unlimited)")
        self.raid.rebuild_rate = rate
        self.raid.kick_rebuild()
        return {"rebuild_rate_bytes_s": rate}

    def _one(self, name: str) -> dict[str, Any]:
        return next(a for a in self.raid.array_status() if a["name"] == name)


__all__ = ["ControllerCache", "RaidController", "RaidLevel", "RaidMiniport", "has_array_metadata",
           "open_array"]
