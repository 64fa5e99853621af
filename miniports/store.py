"""Block stores: the medium behind an emulated logical unit.

A store moves bytes between a byte offset on the medium and the request's scatter/gather buffers
(memoryviews), with one copy and no staging buffer. It knows nothing of SCSI; the logical unit
does the LBA arithmetic and range checks before calling it.

RamStore creation measured on the development VM (1 GiB, Python 3.11):
``bytearray(1 GiB)`` 4.6 s and 1 GiB resident at once (CPython zero-fills it);
``mmap`` anonymous private 0.06 ms and nothing resident until written. First write of the whole
GiB then costs 0.7 s (private) against 5.6 s for a shared (shmem-backed) mapping, and
transparent huge pages made random 4 KiB first writes 50x slower. Hence: private anonymous
mmap, no MADV_HUGEPAGE.

Reading a page never written costs a page fault that maps the shared zero page: 2-3 us per
4 KiB page here, 13% of the whole per-command time at 4 KiB random reads, and most of a
256 KiB read (64 faults). MADV_POPULATE_READ (Linux 5.14) maps the zero page into every page
ahead of time: 0.16 s per GiB, no resident memory (the zero page is not counted), 2 MiB of
page tables per GiB. Large stores are populated by a background thread so creation stays
instant; a write still takes its copy-on-write fault, once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

DEFAULT_BLOCK_SIZE = 512
SUPPORTED_BLOCK_SIZES = frozenset({512, 1024, 2048, 4096})

try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    _IOV_MAX = 1024


_PAGE = mmap.PAGESIZE
# Zero-fill chunk for stores that cannot deallocate: bounded so a large WRITE SAME with UNMAP
# does not allocate its whole range at once.
_ZERO_CHUNK = 1 << 20
_ZERO_PAGE = bytes(_PAGE)
# Bytes of a RAM store examined per allocation_run call.
_ALLOCATION_WINDOW = 256 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_libc.mincore.restype = ctypes.c_int
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int
_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
_libc.fstatfs.restype = ctypes.c_int
# Filesystems whose files live in memory (statfs f_type): their reads and writes are memory
# copies that never wait for a device.
_MEMORY_FILESYSTEMS = frozenset({0x01021994, 0x858458F6})  # tmpfs, ramfs
_MADV_POPULATE_READ = 22
# preadv2 flag: fail with EAGAIN instead of waiting for the device (0 where unknown).
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
# Stores up to this size are populated at once; larger ones by a thread, in steps of the same.
_POPULATE_STEP = 64 << 20


def _check_geometry(block_size: int, num_blocks: int) -> None:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"unsupported block size {block_size}")
    if num_blocks < 1:
        raise ValueError(f"a store needs at least one block, not {num_blocks}")


class BlockStore(ABC):
    """The medium: ``num_blocks`` blocks of ``block_size`` bytes, addressed by byte offset.

    ``blocking`` says whether read/write/flush may block the calling thread (file I/O); the
    controller then runs them on a worker thread, so implementations must tolerate concurrent
    calls on distinct or overlapping ranges.
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    num_blocks: int = 0
    blocking: bool = False
    # A file (or device) under the store, whether or not its I/O can block.
    file_backed: bool = False
    read_only: bool = False
    # The physical block the unit reports (a power-of-two number of logical blocks); None:
    # 4 KiB, or the logical block if that is larger, as drives of today report.
    physical_block_size: int | None = None

    @property
    def capacity(self) -> int:
        """Size of the medium in bytes."""
        return self.block_size * self.num_blocks

    @abstractmethod
    def read_into(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        """Fill ``bufs`` in order with ``length`` bytes from byte ``offset``; return bytes copied.

        Copies less than ``length`` only when the buffers hold less.
        """

    def read_cached(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int | None:
        """``read_into``, but only when all the data is in memory already: None (and ``bufs``
        left in any state) when getting it would wait for a device. A store that cannot tell
        says None; one that never blocks just reads."""
        return None if self.blocking else self.read_into(offset, length, bufs)

    @abstractmethod
    def write_from(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        """Write ``length`` bytes taken from ``bufs`` in order at byte ``offset``; return bytes
        written (less than ``length`` only when the buffers hold less)."""

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abstractmethod
    def close(self) -> None:
        """Release the medium; further I/O is an error."""

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.capacity:
            raise ValueError(f"range {offset}+{length} outside a {self.capacity}-byte store")

    # Thin provisioning. The defaults suit any store: deallocated bytes read back as zeros
    # because they are written as zeros, and everything counts as mapped. Stores that can
    # give space back (RAM pages, file holes) override both.

    def deallocate(self, offset: int, length: int) -> None:
        """Release ``length`` bytes at ``offset``; afterwards they read back as zeros."""
        self._check_range(offset, length)
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(end - offset, zeros.nbytes)
            self.write_from(offset, n, [zeros[:n]])
            offset += n

    def allocation_run(self, offset: int, limit: int) -> tuple[bool, int]:
        """(mapped, length): whether the byte at ``offset`` is backed by storage and how many
        bytes from there, at most ``limit``, share that state."""
        self._check_range(offset, limit)
        return True, limit


class RamStore(BlockStore):
    """Volatile store in a private anonymous mapping: zero pages until written."""

    blocking = False

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        _check_geometry(block_size, num_blocks)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._map: mmap.mmap | None = mmap.mmap(
            -1, block_size * num_blocks, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        self._view = memoryview(self._map)
        # The mapping's address, for mincore(); the ctypes export is dropped at once so the
        # map can still be closed.
        anchor = ctypes.c_char.from_buffer(self._map)
        self._address = ctypes.addressof(anchor)
        del anchor
        self._closing = threading.Event()
        self._populator: threading.Thread | None = None
        size = block_size * num_blocks
        if size <= _POPULATE_STEP:
            self._populate(0, size)
        else:
            self._populator = threading.Thread(target=self._populate, args=(0, size),
                                               name="emuhba-ram-populate", daemon=True)
            self._populator.start()

    def _populate(self, start: int, end: int) -> None:
        """Map the zero page into [start, end) so first reads do not fault (best effort: an
        older kernel without MADV_POPULATE_READ just faults as before). ctypes releases the
        GIL around madvise, so a background populate does not stall the loop."""
        pos = start
        while pos < end and not self._closing.is_set():
            n = min(_POPULATE_STEP, end - pos)
            if _libc.madvise(self._address + pos, n, _MADV_POPULATE_READ) != 0:
                return
            pos += n

    @classmethod
    def of_size(cls, size_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE) -> RamStore:
        return cls(size_bytes // block_size, block_size)

    def read_into(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        if offset < 0 or length < 0 or offset + length > self.block_size * self.num_blocks:
            self._check_range(offset, length)
        view = self._view
        if len(bufs) == 1 and bufs[0].nbytes == length:
            bufs[0][:] = view[offset:offset + length]
            return length
        pos = offset
        end = offset + length
        for buf in bufs:
            if pos >= end:
                break
            n = min(buf.nbytes, end - pos)
            buf[:n] = view[pos : pos + n]
            pos += n
        return pos - offset

    def write_from(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        if offset < 0 or length < 0 or offset + length > self.block_size * self.num_blocks:
            self._check_range(offset, length)
        view = self._view
        if len(bufs) == 1 and bufs[0].nbytes == length:
            view[offset:offset + length] = bufs[0]
            return length
        pos = offset
        end = offset + length
        for buf in bufs:
            if pos >= end:
                break
            n = min(buf.nbytes, end - pos)
            view[pos : pos + n] = buf[:n]
            pos += n
        return pos - offset

    def flush(self) -> None:
        """Nothing to make durable: RAM is as durable as this store gets."""

    def deallocate(self, offset: int, length: int) -> None:
        """Whole pages go back to the kernel (a private anonymous page reads as zeros after
        MADV_DONTNEED); the partial pages at either end are zeroed in place."""
        self._check_range(offset, length)
        end = offset + length
        first = -(-offset // _PAGE) * _PAGE
        last = end // _PAGE * _PAGE
        view = self._view
        if first >= last:
            view[offset:end] = bytes(length)
            return
        if offset < first:
            view[offset:first] = bytes(first - offset)
        if last < end:
            view[last:end] = bytes(end - last)
        assert self._map is not None
        self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def allocation_run(self, offset: int, limit: int) -> tuple[bool, int]:
        """A page is mapped when it is resident (mincore) and holds a nonzero byte. Reading
        an untouched page maps the shared zero page, and a thin unit with LBPRZ may count a
        zero-filled block as deallocated, so all-zero pages are reported deallocated."""
        self._check_range(offset, limit)
        if limit == 0:
            return True, 0
        # One call looks at a bounded window; the caller asks again from where this ends.
        end = min(offset + limit, offset + _ALLOCATION_WINDOW)
        first = offset // _PAGE * _PAGE
        pages = -(-(end - first) // _PAGE)
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(self._address + first, end - first, vec) != 0:
            return True, limit
        resident = vec.raw
        view = self._view
        capacity = self.capacity

        def mapped(i: int) -> bool:
            if not resident[i] & 1:
                return False
            start = first + i * _PAGE
            return (
                view[start : min(start + _PAGE, capacity)]
                != _ZERO_PAGE[: min(_PAGE, capacity - start)]
            )

        state = mapped(0)
        run = 1
        while run < pages and mapped(run) == state:
            run += 1
        return state, min(first + run * _PAGE, end) - offset

    def close(self) -> None:
        self._closing.set()
        if self._populator is not None:
            self._populator.join()
            self._populator = None
        if self._map is not None:
            self._view.release()
            self._map.close()
            self._map = None


def _memory_filesystem(fd: int) -> bool:
    """Whether ``fd`` is a file in tmpfs or ramfs (f_type, the first field of struct statfs)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value in _MEMORY_FILESYSTEMS


def _trim(bufs: Sequence[memoryview], length: int) -> list[memoryview]:
    """The leading buffers holding at most ``length`` bytes, the last one cut to fit."""
    if len(bufs) == 1 and bufs[0].nbytes == length:
        return [bufs[0]]  # the usual I/O: one buffer of exactly the length
    out: list[memoryview] = []
    remaining = length
    for buf in bufs:
        if remaining <= 0:
            break
        n = buf.nbytes
        if n > remaining:
            out.append(buf[:remaining])
            break
        out.append(buf)
        remaining -= n
    return out


def _advance(iov: list[memoryview], done: int) -> list[memoryview]:
    """``iov`` without its first ``done`` bytes (after a short preadv/pwritev)."""
    while iov and done >= iov[0].nbytes:
        done -= iov[0].nbytes
        iov = iov[1:]
    if done and iov:
        iov = [iov[0][done:], *iov[1:]]
    return iov


class FileStore(BlockStore):
    """A regular file (or block device) read and written in place with preadv/pwritev.

    ``size`` creates the file or extends it sparsely when it is shorter (an existing larger file
    is not shrunk; only ``size`` bytes of it are exposed). Without ``size`` the file must exist
    and its size (rounded down to whole blocks) is the capacity. Positional I/O keeps concurrent
    calls from worker threads independent: there is no shared file offset.
    """

    blocking = True
    file_backed = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        read_only: bool = False,
    ) -> None:
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"unsupported block size {block_size}")
        self.path = os.fspath(path)
        self.block_size = block_size
        self.read_only = read_only
        flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
        if size is not None and not read_only:
            flags |= os.O_CREAT
        fd = os.open(self.path, flags, 0o644)
        try:
            st = os.fstat(fd)
            block_device = stat.S_ISBLK(st.st_mode)
            current = os.lseek(fd, 0, os.SEEK_END) if block_device else st.st_size
            if size is None:
                size = current
            elif size > current:
                if read_only or block_device:
                    raise ValueError(
                        f"{self.path} holds {current} bytes, fewer than the {size} requested"
                    )
                os.ftruncate(fd, size)  # sparse: no blocks allocated until written
            _check_geometry(block_size, size // block_size)
        except BaseException:
            os.close(fd)
            raise
        self.num_blocks = size // block_size
        self._fd = fd
        # A file in tmpfs (/dev/shm) is page cache and nothing else: its I/O is a memory copy
        # that never waits for a device, so the controller runs it in line rather than on a
        # worker thread (a hand-off that costs more than the copy: 3x the IOPS measured).
        if _memory_filesystem(fd):
            self.blocking = False
        # Reads the page cache can answer are served in line too (read_cached); tmpfs, the
        # one case above, refuses RWF_NOWAIT, and so may an old kernel: then never again.
        self._nowait = _RWF_NOWAIT != 0

    @property
    def fd(self) -> int:
        return self._fd

    def read_into(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        self._check_range(offset, length)
        iov = _trim(bufs, length)
        total = 0
        fd = self._fd
        while iov:
            chunk = iov[:_IOV_MAX]
            want = sum(b.nbytes for b in chunk) if len(chunk) > 1 else chunk[0].nbytes
            got = os.preadv(fd, chunk, offset + total)
            if got <= 0:
                # The file shrank under us: what is missing reads as a hole would.
                for b in iov:
                    b[:] = bytes(b.nbytes)
                    total += b.nbytes
                break
            total += got
            iov = iov[len(chunk) :] if got == want else _advance(iov, got)
        return total

    def read_cached(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int | None:
        """One preadv with RWF_NOWAIT: the kernel copies from the page cache, or refuses
        (EAGAIN) rather than wait for the device; it starts readahead as it refuses, so the
        worker's read that follows often finds the data. Partly cached counts as not cached."""
        if not self.blocking:
            return super().read_cached(offset, length, bufs)
        if not self._nowait or offset < 0 or length < 0 or offset + length > self.capacity:
            return None
        iov = _trim(bufs, length)
        if len(iov) > _IOV_MAX:
            return None
        try:
            got = os.preadv(self._fd, iov, offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False  # this filesystem or device cannot say: always the worker
            return None
        return got if got == length else None

    def write_from(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        if self.read_only:
            raise PermissionError(f"{self.path} is open read-only")
        self._check_range(offset, length)
        iov = _trim(bufs, length)
        total = 0
        fd = self._fd
        while iov:
            chunk = iov[:_IOV_MAX]
            want = sum(b.nbytes for b in chunk) if len(chunk) > 1 else chunk[0].nbytes
            put = os.pwritev(fd, chunk, offset + total)
            if put <= 0:
                raise OSError(f"pwritev on {self.path} wrote nothing")
            total += put
            iov = iov[len(chunk) :] if put == want else _advance(iov, put)
        return total

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self._fd)

    def deallocate(self, offset: int, length: int) -> None:
        """Punch a hole (the file keeps its size; the kernel zeroes partial filesystem blocks);
        where the filesystem or device cannot, write zeros instead."""
        if self.read_only:
            raise PermissionError(f"{self.path} is open read-only")
        self._check_range(offset, length)
        if length == 0:
            return
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self._fd, mode, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            raise OSError(err, os.strerror(err), self.path)
        super().deallocate(offset, length)

    def allocation_run(self, offset: int, limit: int) -> tuple[bool, int]:
        """Data and holes as SEEK_DATA/SEEK_HOLE see them (filesystem-block granular)."""
        self._check_range(offset, limit)
        end = offset + limit
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but hole from here to the end of file
                return False, limit
            return True, limit  # no SEEK_DATA here (a block device, say): all mapped
        if data > offset:
            return False, min(data, end) - offset
        hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
        return True, min(hole, end) - offset

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
