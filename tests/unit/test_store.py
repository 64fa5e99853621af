"""Block stores: RAM (anonymous mapping) and file (preadv/pwritev) against real memory and files."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from miniports.store import BlockStore, FileStore, RamStore
from tests.pagecache import until_refused


def views(*sizes: int, fill: int | None = None) -> list[memoryview]:
    out = []
    for i, n in enumerate(sizes):
        byte = (fill if fill is not None else i + 1) & 0xFF
        out.append(memoryview(bytearray([byte]) * n))
    return out


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(params=["ram", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockStore]:
    s: BlockStore = (
        RamStore(64) if request.param == "ram" else FileStore(tmp_path / "d.img", 64 * 512)
    )
    yield s
    s.close()


def test_geometry_and_blocking(store: BlockStore) -> None:
    assert store.block_size == 512
    assert store.num_blocks == 64
    assert store.capacity == 64 * 512
    assert store.blocking is isinstance(store, FileStore)


def test_new_store_reads_zeroes(store: BlockStore) -> None:
    buf = views(4096, fill=0xAA)
    assert store.read_into(1024, 4096, buf) == 4096
    assert bytes(buf[0]) == bytes(4096)


def test_round_trip_across_scatter_gather_lists(store: BlockStore) -> None:
    data = views(100, 412, 1000, 536)  # 2048 bytes in uneven pieces
    assert store.write_from(512 * 3, 2048, data) == 2048
    out = views(7, 2041, fill=0)
    assert store.read_into(512 * 3, 2048, out) == 2048
    expected = b"".join(bytes(v) for v in data)
    assert bytes(out[0]) + bytes(out[1]) == expected


def test_length_shorter_than_buffers(store: BlockStore) -> None:
    store.write_from(0, 1024, views(1024, fill=0x11))
    # Only 300 bytes from a 1000-byte buffer reach the medium.
    assert store.write_from(0, 300, views(1000, fill=0x22)) == 300
    out = views(1024, fill=0)
    store.read_into(0, 1024, out)
    assert bytes(out[0]) == b"\x22" * 300 + b"\x11" * 724
    # Reading 200 bytes into 3 buffers fills the first ones only.
    parts = views(150, 150, 150, fill=0)
    assert store.read_into(0, 200, parts) == 200
    assert bytes(parts[0]) == b"\x22" * 150
    assert bytes(parts[1]) == b"\x22" * 50 + bytes(100)
    assert bytes(parts[2]) == bytes(150)


def test_buffers_shorter_than_length(store: BlockStore) -> None:
    assert store.write_from(0, 4096, views(100, 200)) == 300
    assert store.read_into(0, 4096, views(10)) == 10


def test_range_checked(store: BlockStore) -> None:
    with pytest.raises(ValueError):
        store.read_into(store.capacity - 10, 20, views(20))
    with pytest.raises(ValueError):
        store.write_from(-1, 1, views(1))
    with pytest.raises(ValueError):
        store.write_from(store.capacity, 1, views(1))
    assert store.read_into(store.capacity, 0, views(1)) == 0


def test_flush(store: BlockStore) -> None:
    store.write_from(0, 512, views(512))
    store.flush()


def test_bad_geometry() -> None:
    with pytest.raises(ValueError):
        RamStore(0)
    with pytest.raises(ValueError):
        RamStore(8, block_size=520)


def test_ram_store_of_size() -> None:
    s = RamStore.of_size(1 << 20, block_size=4096)
    assert (s.num_blocks, s.block_size) == (256, 4096)
    s.close()
    s.close()  # idempotent


def test_one_gib_ram_store_starts_instantly_and_untouched() -> None:
    before = rss_kib()
    t0 = time.perf_counter()
    s = RamStore.of_size(1 << 30)
    elapsed = time.perf_counter() - t0
    try:
        assert elapsed < 0.05
        # Reading never-written blocks maps the zero page, it does not allocate.
        out = views(1 << 20, fill=0xFF)
        for i in range(0, 1 << 30, 64 << 20):
            s.read_into(i, 1 << 20, out)
        assert bytes(out[0]) == bytes(1 << 20)
        assert rss_kib() - before < 64 * 1024
        s.write_from((1 << 30) - 512, 512, views(512, fill=7))
        tail = views(512, fill=0)
        s.read_into((1 << 30) - 512, 512, tail)
        assert bytes(tail[0]) == b"\x07" * 512
    finally:
        s.close()


def test_file_store_is_created_sparse(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    s = FileStore(path, 1 << 30)
    try:
        assert s.num_blocks == (1 << 30) // 512
        st = os.stat(path)
        assert st.st_size == 1 << 30
        assert st.st_blocks * 512 < 1 << 20  # nothing allocated yet
    finally:
        s.close()


def test_file_store_reopens_with_its_size_and_data(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    s = FileStore(path, 8192, block_size=4096)
    s.write_from(4096, 4096, views(4096, fill=0x5A))
    s.flush()
    s.close()
    again = FileStore(path, block_size=4096)
    try:
        assert again.num_blocks == 2
        out = views(4096, fill=0)
        again.read_into(4096, 4096, out)
        assert bytes(out[0]) == b"\x5a" * 4096
    finally:
        again.close()


def test_file_store_extends_a_short_file_but_never_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x01" * 1000)
    s = FileStore(path, 4096)
    assert os.path.getsize(path) == 4096
    out = views(1024, fill=0)
    s.read_into(0, 1024, out)
    assert bytes(out[0]) == b"\x01" * 1000 + bytes(24)
    s.close()
    s = FileStore(path, 1024)
    assert s.num_blocks == 2
    assert os.path.getsize(path) == 4096
    s.close()


def test_file_store_rounds_down_to_whole_blocks(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(1500))
    s = FileStore(path)
    assert s.num_blocks == 2
    s.close()
    path.write_bytes(bytes(100))
    with pytest.raises(ValueError):
        FileStore(path)


def test_file_store_missing_file_without_size(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileStore(tmp_path / "nope.img")


def test_read_only_file_store(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"\x33" * 2048)
    s = FileStore(path, read_only=True)
    try:
        assert s.read_only
        out = views(512, fill=0)
        s.read_into(512, 512, out)
        assert bytes(out[0]) == b"\x33" * 512
        with pytest.raises(PermissionError):
            s.write_from(0, 512, views(512))
        s.flush()
    finally:
        s.close()
    with pytest.raises(ValueError):
        FileStore(path, 4096, read_only=True)  # cannot extend a read-only file


def test_more_buffers_than_iov_max(tmp_path: Path) -> None:
    s = FileStore(tmp_path / "iov.img", 3000 * 512)
    try:
        pieces = [memoryview(bytes([i % 251]) * 512) for i in range(3000)]
        assert s.write_from(0, 3000 * 512, pieces) == 3000 * 512
        out = [memoryview(bytearray(512)) for _ in range(3000)]
        assert s.read_into(0, 3000 * 512, out) == 3000 * 512
        assert all(bytes(o) == bytes(p) for o, p in zip(out, pieces, strict=True))
    finally:
        s.close()


def test_file_store_concurrent_workers(tmp_path: Path) -> None:
    s = FileStore(tmp_path / "mt.img", 256 * 4096, block_size=4096)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for rnd in range(20):
                for blk in range(k, 256, 8):
                    payload = bytes([(blk + rnd) & 0xFF]) * 4096
                    s.write_from(blk * 4096, 4096, [memoryview(payload)])
                    back = memoryview(bytearray(4096))
                    s.read_into(blk * 4096, 4096, [back])
                    assert bytes(back) == payload
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    assert not errors


# ---------------------------------------------------------------------------------------------
# Thin provisioning: deallocate and allocation_run
# ---------------------------------------------------------------------------------------------


def _fill(store: BlockStore, offset: int, data: bytes) -> None:
    store.write_from(offset, len(data), [memoryview(data)])


def _read(store: BlockStore, offset: int, length: int) -> bytes:
    out = bytearray(length)
    store.read_into(offset, length, [memoryview(out)])
    return bytes(out)


class _PlainStore(BlockStore):
    """A store with only the abstract methods: the ABC's provisioning defaults apply."""

    def __init__(self, size: int) -> None:
        self.num_blocks = size // 512
        self.data = bytearray(size)

    def read_into(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        bufs[0][:length] = self.data[offset : offset + length]
        return length

    def write_from(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        self.data[offset : offset + length] = bufs[0][:length]
        return length

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_default_deallocate_writes_zeros_and_reports_mapped() -> None:
    s = _PlainStore(3 << 20)
    s.data[:] = b"\x55" * len(s.data)
    s.deallocate(512, (2 << 20) + 512)  # larger than one zero chunk
    assert s.data[:512] == b"\x55" * 512
    assert s.data[512 : (2 << 20) + 1024] == bytes((2 << 20) + 512)
    assert s.data[(2 << 20) + 1024 :] == b"\x55" * (len(s.data) - (2 << 20) - 1024)
    assert s.allocation_run(0, 4096) == (True, 4096)
    with pytest.raises(ValueError):
        s.deallocate(len(s.data) - 512, 1024)


def test_ram_store_deallocate_whole_and_partial_pages() -> None:
    s = RamStore(64, 512)  # 8 pages of 4 KiB
    try:
        assert s.allocation_run(0, s.capacity) == (False, s.capacity)
        _fill(s, 0, b"\xaa" * s.capacity)
        assert s.allocation_run(0, s.capacity) == (True, s.capacity)
        s.deallocate(4096 + 512, 3 * 4096)  # partial page, two whole pages, partial page
        assert _read(s, 4096, 512) == b"\xaa" * 512
        assert _read(s, 4096 + 512, 3 * 4096) == bytes(3 * 4096)
        assert _read(s, 4 * 4096 + 512, 512) == b"\xaa" * 512
        assert s.allocation_run(0, s.capacity) == (True, 2 * 4096)
        assert s.allocation_run(2 * 4096, s.capacity - 2 * 4096) == (False, 2 * 4096)
        assert s.allocation_run(2 * 4096 + 512, 1024) == (False, 1024)
        # A page only read, or written with zeros, holds no data: it counts as deallocated.
        _read(s, 2 * 4096, 4096)
        _fill(s, 3 * 4096, bytes(4096))
        assert s.allocation_run(2 * 4096, 2 * 4096) == (False, 2 * 4096)
    finally:
        s.close()


def test_file_store_punches_holes(tmp_path: Path) -> None:
    s = FileStore(tmp_path / "thin.img", 1 << 20)
    try:
        assert s.allocation_run(0, s.capacity) == (False, s.capacity)
        _fill(s, 0, b"\x77" * (256 << 10))
        allocated = os.stat(s.path).st_blocks
        assert s.allocation_run(0, s.capacity) == (True, 256 << 10)
        s.deallocate(64 << 10, 128 << 10)
        assert os.stat(s.path).st_blocks < allocated
        assert os.path.getsize(s.path) == 1 << 20  # KEEP_SIZE
        assert _read(s, 64 << 10, 128 << 10) == bytes(128 << 10)
        assert _read(s, 0, 64 << 10) == b"\x77" * (64 << 10)
        assert s.allocation_run(0, s.capacity) == (True, 64 << 10)
        assert s.allocation_run(64 << 10, s.capacity - (64 << 10)) == (False, 128 << 10)
        s.deallocate(1000, 24)  # inside one filesystem block: zeroed, still allocated
        assert _read(s, 996, 32) == b"\x77" * 4 + bytes(24) + b"\x77" * 4
    finally:
        s.close()


def test_file_store_deallocate_refused_when_read_only(tmp_path: Path) -> None:
    FileStore(tmp_path / "ro.img", 4096).close()
    s = FileStore(tmp_path / "ro.img", read_only=True)
    try:
        with pytest.raises(PermissionError):
            s.deallocate(0, 512)
    finally:
        s.close()


@pytest.mark.parametrize("level", [0, 1, 5, 10])
def test_raid_volume_deallocate_reads_zeros(level: int) -> None:
    from miniports.raid import RaidVolume

    n = 4
    members: list[BlockStore] = [RamStore.of_size(4096 + 64 * 1024, 512) for _ in range(n)]
    volume = RaidVolume.create(members, level, 1024, "thin", metadata_size=4096)
    try:
        size = volume.capacity
        _fill(volume, 0, bytes((i * 7) & 0xFF for i in range(size)))
        volume.deallocate(1536, 5000)
        data = _read(volume, 0, size)
        assert data[1536 : 1536 + 5000] == bytes(5000)
        assert data[:1536] == bytes((i * 7) & 0xFF for i in range(1536))
        assert data[6536:] == bytes((i * 7) & 0xFF for i in range(6536, size))
    finally:
        volume.close()


@pytest.mark.parametrize("failed", [0, 1, 2])
def test_raid5_deallocate_keeps_parity_and_reports_whole_stripes_unmapped(failed: int) -> None:
    from miniports.raid import RaidVolume

    strip = 4096  # a page: RAM members give whole pages back
    members: list[BlockStore] = [RamStore.of_size(4096 + 8 * strip, 512) for _ in range(3)]
    volume = RaidVolume.create(members, 5, strip, "thin5", metadata_size=4096)
    try:
        size, width = volume.capacity, 2 * strip
        pattern = bytes((i * 13 + 1) & 0xFF or 1 for i in range(size))
        _fill(volume, 0, pattern)
        assert volume.allocation_run(0, size) == (True, size)
        # Half a stripe, two whole stripes, half a stripe.
        start, length = width // 2, 3 * width
        volume.deallocate(start, length)
        assert volume.allocation_run(0, size)[0] is True
        assert volume.allocation_run(width, 2 * width) == (False, 2 * width)
        expected = pattern[:start] + bytes(length) + pattern[start + length :]
        assert _read(volume, 0, size) == expected
        # Parity still covers the data: any one member can go and nothing changes.
        volume.fail_member(failed)
        assert _read(volume, 0, size) == expected
    finally:
        volume.close()


def test_controller_cache_deallocate_drops_dirty_lines() -> None:
    from miniports.raid import RaidVolume
    from miniports.raid_controller import ControllerCache

    members: list[BlockStore] = [RamStore.of_size(4096 + 64 * 1024, 512) for _ in range(2)]
    cache = ControllerCache(RaidVolume.create(members, 1, 1024, "c", metadata_size=4096))
    try:
        _fill(cache, 0, b"\x11" * 16384)  # four dirty lines
        assert cache.allocation_run(0, 16384) == (True, 16384)
        cache.deallocate(2048, 8192)  # half of line 0, all of line 1, half of line 2
        assert cache.dirty_bytes == 3 * 4096
        assert _read(cache, 0, 16384) == b"\x11" * 2048 + bytes(8192) + b"\x11" * 6144
        cache.flush()
        assert _read(cache, 0, 16384) == b"\x11" * 2048 + bytes(8192) + b"\x11" * 6144
    finally:
        cache.close()


def test_file_store_on_tmpfs_does_its_io_in_line(tmp_path: Path) -> None:
    """A file in /dev/shm is memory: no worker thread for it. A file elsewhere may block."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    in_memory = FileStore(shm / f"emuhba-test-{os.getpid()}.img", 1 << 20)
    on_disk = FileStore(tmp_path / "disk.img", 1 << 20)
    try:
        assert in_memory.file_backed and on_disk.file_backed
        assert not in_memory.blocking
        buf = memoryview(bytearray(4096))
        in_memory.write_from(4096, 4096, [memoryview(b"\x07" * 4096)])
        assert in_memory.read_into(4096, 4096, [buf]) == 4096 and bytes(buf) == b"\x07" * 4096
    finally:
        in_memory.close()
        on_disk.close()
        os.unlink(shm / f"emuhba-test-{os.getpid()}.img")


def test_file_store_reads_from_the_page_cache_only_when_asked_not_to_wait(
        tmp_path: Path) -> None:
    """read_cached copies what the page cache holds and says None where the device would be
    needed; a store that never blocks just reads, and a RAM store too."""
    path = tmp_path / "disk.img"
    store = FileStore(path, 1 << 20)
    try:
        assert store.blocking
        store.write_from(8192, 4096, [memoryview(b"\x09" * 4096)])
        buf = memoryview(bytearray(4096))
        assert store.read_cached(8192, 4096, [buf]) == 4096 and bytes(buf) == b"\x09" * 4096
        two = [memoryview(bytearray(1024)), memoryview(bytearray(3072))]
        assert store.read_cached(8192, 4096, two) == 4096
        assert bytes(two[0]) + bytes(two[1]) == b"\x09" * 4096
        assert store.read_cached((1 << 20) - 512, 4096, [buf]) is None  # past the end

        def read_after_eviction() -> bool:
            buf[:] = bytes(4096)
            got = store.read_cached(8192, 4096, [buf])
            if got is not None:  # the device was quick: still the right data
                assert got == 4096 and bytes(buf) == b"\x09" * 4096
            return got is None

        until_refused(path, 8192, 4096, read_after_eviction)
        assert store.read_into(8192, 4096, [buf]) == 4096 and bytes(buf) == b"\x09" * 4096
        assert store.read_cached(8192, 4096, [buf]) == 4096  # read_into brought it back
    finally:
        store.close()
    ram = RamStore.of_size(1 << 20)
    ram.write_from(0, 4096, [memoryview(b"\x03" * 4096)])
    assert ram.read_cached(0, 4096, [buf]) == 4096 and bytes(buf) == b"\x03" * 4096
    ram.close()


def test_large_ram_store_reads_zeros_while_populating_and_closes_cleanly() -> None:
    """Stores above the populate step are populated by a thread; reads meanwhile see zeros,
    writes land, and close waits for the thread."""
    store = RamStore.of_size(256 << 20)
    buf = memoryview(bytearray(4096))
    assert store.read_into(200 << 20, 4096, [buf]) == 4096 and bytes(buf) == bytes(4096)
    store.write_from(255 << 20, 4096, [memoryview(b"\x05" * 4096)])
    assert store.read_into(255 << 20, 4096, [buf]) == 4096 and bytes(buf) == b"\x05" * 4096
    store.close()
    assert store._populator is None
