"""What is written through a real initiator (libiscsi) reads back identical, and a file LUN's
file holds exactly what was written once the server has stopped."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import INITIATOR, RunningTarget, launch_target
from tests.integration.libiscsi_client import ScsiCheckCondition, Session

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("libiscsi_library")]

MiB = 1 << 20


def extents(blocks: int, block_length: int) -> list[tuple[int, int]]:
    """(lba, block count) pairs covering the awkward cases: first and last blocks, odd sizes and
    offsets, one transfer past the 256 KiB burst (R2T) and one of 1 MiB. They do not overlap."""
    per_mib = MiB // block_length
    return [
        (0, 1),
        (7, 9),
        (per_mib, 256 * 1024 // block_length + 3),
        (3 * per_mib + 1, per_mib),
        (blocks // 2 - 5, 17),
        (blocks - 34, 33),
        (blocks - 1, 1),
    ]


@pytest.fixture(params=["none", "crc32c"], ids=["digest-none", "digest-crc32c"])
def digest(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def session(target: RunningTarget, digest: str, lun: int = 0) -> Session:
    s = Session(target.portal, target.iqn, lun, INITIATOR, header_digest=digest)
    agreed = s.negotiated("HeaderDigest")
    assert agreed == ("CRC32C" if digest == "crc32c" else "None"), s.login_log
    return s


@pytest.mark.parametrize("kind", ["ram", "file"])
def test_write_then_read_back(iscsi_target: RunningTarget, digest: str, kind: str) -> None:
    disk = iscsi_target.disk(kind)
    block = iscsi_target.block_length
    rng = random.Random(f"{kind}-{digest}")  # deterministic: a failure reproduces
    written: list[tuple[int, bytes]] = []
    with session(iscsi_target, digest, disk.lun) as s:
        assert s.read_capacity16(disk.lun) == (block, disk.size // block)
        for lba, count in extents(disk.size // block, block):
            data = rng.randbytes(count * block)
            s.write16(disk.lun, lba, data, block)
            written.append((lba, data))
        for lba, data in written:
            assert s.read16(disk.lun, lba, len(data) // block, block) == data, f"LBA {lba}"
    # A second session sees the same bytes: they are on the target, not in a client cache.
    with session(iscsi_target, digest, disk.lun) as s:
        for lba, data in reversed(written):
            assert s.read16(disk.lun, lba, len(data) // block, block) == data, f"LBA {lba}"


def test_overlapping_writes_keep_the_latest(iscsi_target: RunningTarget, digest: str) -> None:
    disk = iscsi_target.disk("ram")
    block = iscsi_target.block_length
    rng = random.Random(f"overlap-{digest}")
    base_lba = 8192
    image = bytearray(rng.randbytes(64 * block))
    with session(iscsi_target, digest, disk.lun) as s:
        s.write16(disk.lun, base_lba, bytes(image), block)
        for offset, count in [(3, 5), (0, 1), (60, 4), (10, 40), (11, 1)]:
            patch = rng.randbytes(count * block)
            s.write16(disk.lun, base_lba + offset, patch, block)
            image[offset * block : (offset + count) * block] = patch
        assert s.read16(disk.lun, base_lba, 64, block) == bytes(image)
        # Reads that start and end inside the patched region, too.
        assert s.read16(disk.lun, base_lba + 9, 3, block) == bytes(image[9 * block : 12 * block])


def test_read_past_the_end_is_refused(iscsi_target: RunningTarget) -> None:
    disk = iscsi_target.disk("ram")
    block = iscsi_target.block_length
    with session(iscsi_target, "none", disk.lun) as s:
        with pytest.raises(ScsiCheckCondition) as info:
            s.read16(disk.lun, disk.size // block - 1, 2, block)
        # ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE
        assert (info.value.sense_key, info.value.ascq) == (0x05, 0x2100)


def test_report_luns_matches_configuration(iscsi_target: RunningTarget) -> None:
    with session(iscsi_target, "none", iscsi_target.disks[0].lun) as s:
        luns = s.report_luns()
    assert sorted(luns) == sorted(
        [d.lun for d in iscsi_target.disks] + list(iscsi_target.other_luns)
    )


def _pattern(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_file_lun_reads_existing_file_and_persists_writes(
    target_flavour: str, tmp_path: Path
) -> None:
    flavour, workdir = target_flavour, tmp_path
    size = 8 * MiB
    path = workdir / "existing.img"
    original = _pattern("existing-file", size)
    path.write_bytes(original)
    expected = bytearray(original)
    with launch_target(
        flavour, workdir / "run", ram_size=None, file_path=path, file_size=size
    ) as target:
        disk = target.disk("file")
        block = target.block_length
        with session(target, "none", disk.lun) as s:
            assert s.read_capacity16(disk.lun) == (block, size // block)
            # What was in the file before the server started is what the LUN holds.
            for lba in (0, 1, size // block // 2, size // block - 256):
                got = s.read16(disk.lun, lba, 256 if lba else 1, block)
                assert got == original[lba * block : lba * block + len(got)], f"LBA {lba}"
            rng = random.Random("persist")
            for lba, count in extents(size // block, block):
                data = rng.randbytes(count * block)
                s.write16(disk.lun, lba, data, block)
                expected[lba * block : (lba + count) * block] = data
            s.synchronize_cache16(disk.lun)
    # launch_target has stopped the server (and, for emuhba, checked it exited 0).
    on_disk = path.read_bytes()
    assert len(on_disk) == size
    assert on_disk == bytes(expected)


def test_file_lun_created_with_size(target_flavour: str, tmp_path: Path) -> None:
    if target_flavour != "emuhba":
        pytest.skip("PATH,SIZE is emuhba's --file-lun syntax")
    path = tmp_path / "created.img"
    size = 4 * MiB
    with launch_target(
        "emuhba",
        tmp_path / "run",
        ram_size=None,
        file_path=path,
        file_size=size,
        file_arg=f"{path},{size // MiB}M",
    ) as target:
        assert path.exists() and path.stat().st_size == size
        with session(target, "none", 0) as s:
            assert s.read_capacity16(0) == (512, size // 512)
            assert s.read16(0, 0, 8, 512) == bytes(8 * 512)  # a new file reads as zeros
            data = _pattern("created", 64 * 1024)
            s.write16(0, 100, data, 512)
    assert path.read_bytes()[100 * 512 : 100 * 512 + len(data)] == data


def test_4096_byte_blocks(target_flavour: str, tmp_path: Path) -> None:
    if target_flavour != "emuhba":
        pytest.skip("the tgtd harness serves 512-byte blocks only")
    with launch_target(
        "emuhba", tmp_path, file_size=None, ram_size=16 * MiB, block_length=4096
    ) as target:
        disk = target.disk("ram")
        with session(target, "none", disk.lun) as s:
            assert s.read_capacity16(disk.lun) == (4096, 16 * MiB // 4096)
            rng = random.Random("4k")
            for lba, count in extents(16 * MiB // 4096, 4096):
                data = rng.randbytes(count * 4096)
                s.write16(disk.lun, lba, data, 4096)
                assert s.read16(disk.lun, lba, count, 4096) == data
