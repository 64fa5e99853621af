"""The RAID controller around its logical drives: the write-back cache's semantics, bringing an
array up from its members, and the miniport's management IOCTLs with the rebuild engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from emuhba.hba import Hba
from emuhba.miniport import MiniportIoctlError
from emuhba.srb import ScsiStatus
from miniports.raid import RaidAssemblyError, RaidVolume
from miniports.raid_controller import (
    ControllerCache,
    RaidMiniport,
    has_array_metadata,
    open_array,
)
from miniports.store import FileStore, RamStore
from tests.unit.test_hba import command, data_of, run, rw10

BS = 512
MIB = 1 << 20


def members(n: int = 3, size: int = 4 * MIB) -> list[RamStore]:
    return [RamStore.of_size(size, BS) for _ in range(n)]


def views(data: bytes, *cuts: int) -> list[memoryview]:
    """``data`` as a scatter/gather list cut at ``cuts``."""
    out, start = [], 0
    for cut in (*cuts, len(data)):
        out.append(memoryview(bytearray(data[start:cut])))
        start = cut
    return out


def read(store: ControllerCache | RaidVolume, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    store.read_into(offset, length, [memoryview(buf)])
    return bytes(buf)


def test_cache_holds_writes_until_flushed_and_reads_see_them() -> None:
    volume = RaidVolume.create(members(), 5, 16 * 1024, "c")
    cache = ControllerCache(volume, capacity=1 * MIB)
    payload = bytes(range(256)) * 40  # 10 KiB starting mid-line: three partial/whole lines
    cache.write_from(3000, len(payload), views(payload, 7, 4000))
    assert read(cache, 3000, len(payload)) == payload
    assert read(volume, 3000, len(payload)) == bytes(len(payload))  # not on the drive yet
    assert cache.dirty_bytes == 4 * 4096
    cache.flush()
    assert cache.dirty_bytes == 0 and cache.flushes == 1
    assert read(volume, 3000, len(payload)) == payload
    # Dirty data lost with the cache is exactly what was not flushed.
    cache.write_from(0, 512, [memoryview(b"\xee" * 512)])
    assert cache.discard() == 4096
    assert read(cache, 0, 512) == bytes(512)


def test_a_full_cache_destages_oldest_lines_first() -> None:
    volume = RaidVolume.create(members(), 1, 16 * 1024, "m")
    cache = ControllerCache(volume, capacity=2 * 4096)
    for line in range(3):
        cache.write_from(line * 4096, 4096, [memoryview(bytes([line + 1]) * 4096)])
    assert cache.destaged_lines == 1 and cache.dirty_bytes == 2 * 4096
    assert read(volume, 0, 4096) == b"\x01" * 4096  # the oldest went to the drive
    assert read(volume, 4096, 4096) == bytes(4096)
    assert read(cache, 0, 3 * 4096) == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096


def test_open_array_creates_over_blank_members_and_assembles_marked_ones(tmp_path: Path) -> None:
    paths = [tmp_path / f"m{i}.img" for i in range(3)]
    stores = [FileStore(p, 4 * MIB, block_size=BS) for p in paths]
    assert not any(has_array_metadata(s) for s in stores)
    volume = open_array(stores, name="a", level=5, strip_size=16 * 1024)
    volume.write_from(0, 4096, [memoryview(b"\x42" * 4096)])
    volume.close()
    stores = [FileStore(p, block_size=BS) for p in reversed(paths)]
    assert all(has_array_metadata(s) for s in stores)
    volume = open_array(stores, name="a", level=5, strip_size=16 * 1024)
    assert read(volume, 0, 4096) == b"\x42" * 4096
    volume.close()
    with pytest.raises(RaidAssemblyError, match=r"RAID 5, not RAID 1.*16384-byte strips, not 65536"):
        open_array([FileStore(p, block_size=BS) for p in paths], name="a", level=1,
                    strip_size=64 * 1024)


async def make_hba(cache: bool = True) -> tuple[Hba, RaidMiniport]:
    arrays = {"r5": RaidVolume.create(members(4), 5, 16 * 1024, "r5")}
    miniport = RaidMiniport.from_arrays(
        arrays, [(0, 0, "iqn.2026-11.test:raid,t,0x0001", [(0, "r5", False)])],
        write_cache={"r5": cache}, rebuild_rate=0)
    hba = Hba(miniport, request_timeout=None)
    await hba.start()
    await run(hba, command(bytes(6)))  # the power-on unit attention
    return hba, miniport


async def test_ioctls_fail_replace_and_rebuild_through_the_port() -> None:
    hba, _ = await make_hba()
    try:
        data = bytes(range(256)) * 64  # 16 KiB
        srb = await run(hba, command(rw10(True, 40, 32), data_out=data))
        assert srb.scsi_status == ScsiStatus.GOOD
        (status,) = hba.miniport_ioctl("raid.status", {})
        assert status["state"] == "optimal" and status["write_cache"]["dirty_bytes"] > 0
        assert status["units"] == ["0:0:0"]
        status = hba.miniport_ioctl("raid.fail-member", {"array": "r5", "member": 2})
        assert status["state"] == "degraded"
        srb = await run(hba, command(rw10(False, 40, 32), data_in=len(data)))
        assert data_of(srb) == data
        hba.miniport_ioctl("raid.replace-member", {"array": "r5", "member": 2})
        deadline = time.monotonic() + 20
        while hba.miniport_ioctl("raid.status", {})[0]["state"] != "optimal":
            assert time.monotonic() < deadline, "rebuild did not finish"
            await asyncio.sleep(0.05)
        hba.miniport_ioctl("raid.fail-member", {"array": "r5", "member": 0})
        srb = await run(hba, command(rw10(False, 40, 32), data_in=len(data)))
        assert data_of(srb) == data
        with pytest.raises(MiniportIoctlError) as info:
            hba.miniport_ioctl("raid.fail-member", {"array": "r9", "member": 0})
        assert info.value.code == "no-array" and "r5" in info.value.message
        with pytest.raises(MiniportIoctlError) as info:
            hba.miniport_ioctl("raid.fail-member", {"array": "r5", "member": 4})
        assert info.value.code == "no-member"
        with pytest.raises(MiniportIoctlError) as info:
            hba.miniport_ioctl("raid.replace-member", {"array": "r5", "member": 1})
        assert info.value.code == "refused" and "not failed" in info.value.message
        assert "arrays" in hba.miniport_ioctl("controller", {})
    finally:
        await hba.stop()


async def test_fua_and_synchronize_cache_push_writes_through_the_cache() -> None:
    hba, miniport = await make_hba()
    try:
        cache = miniport.raid.caches["r5"]
        await run(hba, command(rw10(True, 0, 8), data_out=b"\x11" * 4096))
        assert cache.dirty_bytes == 4096
        sync = bytes((0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        assert (await run(hba, command(sync))).scsi_status == ScsiStatus.GOOD
        assert cache.dirty_bytes == 0
        fua_write = bytearray(rw10(True, 8, 8))
        fua_write[1] |= 0x08
        await run(hba, command(bytes(fua_write), data_out=b"\x22" * 4096))
        assert cache.dirty_bytes == 0
        assert read(cache.volume, 8 * BS, 4096) == b"\x22" * 4096
    finally:
        await hba.stop()
