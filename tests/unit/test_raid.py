"""RAID logical drives over real RAM and file stores, checked against a flat reference copy.

Every data check compares real bytes: the volume against a reference bytearray, and the members
against each other (mirrors equal, RAID 5 stripes XOR to zero) read straight from the member
stores, so a mapping, parity or rebuild bug shows up as a wrong byte rather than a wrong flag.
A member I/O error is provoked for real: the file store's descriptor is replaced (dup2) by an
O_PATH descriptor of the same file, on which every read, write and flush fails with EBADF.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import sys
import threading
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from miniports.raid import (
    MemberState,
    RaidAssemblyError,
    RaidVolume,
    VolumeOffline,
    VolumeState,
)
from miniports.store import BlockStore, FileStore, RamStore

BS = 512
STRIP = 1024
META = 4096  # metadata region: small, so members stay small
ROWS = 12  # strips per member
MEMBER_BYTES = META + ROWS * STRIP

# (level, members) worth testing: the minimum of each level plus a wider RAID 5.
CONFIGS = [(0, 3), (1, 2), (1, 3), (5, 3), (5, 4), (10, 4)]
REDUNDANT = [c for c in CONFIGS if c[0] != 0]


def ram_members(n: int, size: int = MEMBER_BYTES) -> list[BlockStore]:
    return [RamStore.of_size(size, BS) for _ in range(n)]


def file_members(tmp_path: Path, n: int, size: int = MEMBER_BYTES, prefix: str = "m",
                 ) -> list[BlockStore]:
    return [FileStore(tmp_path / f"{prefix}{i}.img", size) for i in range(n)]


def reopen(paths: list[str]) -> list[BlockStore]:
    return [FileStore(p) for p in paths]


def paths_of(volume: RaidVolume) -> list[str]:
    return [m["path"] for m in volume.status()["members"]]


def sg_split(data: bytes | bytearray, rnd: random.Random, pieces: int = 4) -> list[memoryview]:
    """``data`` copied into several separate buffers of uneven (also odd and empty) sizes."""
    cuts = sorted(rnd.randrange(len(data) + 1) for _ in range(pieces - 1))
    bounds = [0, *cuts, len(data)]
    return [memoryview(bytearray(data[a:b])) for a, b in itertools.pairwise(bounds)]


def empty_sg(length: int, rnd: random.Random, pieces: int = 4) -> list[memoryview]:
    return sg_split(bytes(length), rnd, pieces)


def read_all(volume: RaidVolume) -> bytes:
    buf = bytearray(volume.capacity)
    assert volume.read_into(0, len(buf), [memoryview(buf)]) == len(buf)
    return bytes(buf)


def member_data(volume: RaidVolume, index: int) -> bytes:
    store = volume.member_store(index)
    assert store is not None
    buf = bytearray(volume.member_size)
    store.read_into(volume.data_offset, len(buf), [memoryview(buf)])
    return bytes(buf)


def xor(*chunks: bytes) -> bytes:
    acc = 0
    for c in chunks:
        acc ^= int.from_bytes(c, "big")
    return acc.to_bytes(len(chunks[0]), "big")


def assert_redundancy_consistent(volume: RaidVolume) -> None:
    """All members in sync: RAID 5 stripes XOR to zero, mirrors hold the same bytes."""
    assert volume.state is VolumeState.OPTIMAL, volume.status()
    n = volume.member_count
    data = [member_data(volume, i) for i in range(n)]
    if volume.level == 5:
        for row in range(volume.member_size // volume.strip_size):
            strips = [d[row * STRIP : (row + 1) * STRIP] for d in data]
            assert xor(*strips) == bytes(STRIP), f"stripe {row} parity is wrong"
    elif volume.level == 1:
        assert all(d == data[0] for d in data)
    elif volume.level == 10:
        for pair in range(n // 2):
            assert data[2 * pair] == data[2 * pair + 1], f"mirror pair {pair} differs"


def random_writes(volume: RaidVolume, ref: bytearray, rnd: random.Random, count: int) -> None:
    """Writes at awkward offsets and lengths, mostly spanning strips and stripes."""
    cap = volume.capacity
    for _ in range(count):
        offset = rnd.randrange(cap)
        length = rnd.randrange(1, min(cap - offset, 5 * STRIP) + 1)
        data = rnd.randbytes(length)
        assert volume.write_from(offset, length, sg_split(data, rnd)) == length
        ref[offset : offset + length] = data


def assert_reads_match(volume: RaidVolume, ref: bytearray, rnd: random.Random,
                       count: int = 20) -> None:
    assert read_all(volume) == ref
    cap = volume.capacity
    for _ in range(count):
        offset = rnd.randrange(cap)
        length = rnd.randrange(1, min(cap - offset, 5 * STRIP) + 1)
        bufs = empty_sg(length, rnd)
        assert volume.read_into(offset, length, bufs) == length
        assert b"".join(bytes(b) for b in bufs) == ref[offset : offset + length]


def partner(level: int, n: int, index: int) -> int:
    """A member whose failure, after ``index`` was rebuilt, makes reads depend on ``index``."""
    if level == 10:
        return index ^ 1
    return (index + 1) % n


def break_store(store: BlockStore) -> None:
    """Make every later I/O of a FileStore fail with EBADF, as a dead disk's would."""
    assert isinstance(store, FileStore)
    dead = os.open(store.path, os.O_PATH | os.O_CLOEXEC)
    try:
        os.dup2(dead, store.fd)
    finally:
        os.close(dead)


@pytest.fixture
def rnd(request: pytest.FixtureRequest) -> random.Random:
    return random.Random(request.node.name)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(("level", "n", "data_members"),
                         [(0, 3, 3), (1, 2, 1), (1, 3, 1), (5, 3, 2), (5, 5, 4), (10, 4, 2),
                          (10, 6, 3)])
def test_capacity_follows_level_and_member_count(level: int, n: int, data_members: int) -> None:
    # One member larger than the others: the smallest one sets the member size.
    members = [*ram_members(n - 1), RamStore.of_size(MEMBER_BYTES + 8 * STRIP, BS)]
    volume = RaidVolume.create(members, level, STRIP, "geo", metadata_size=META)
    assert volume.data_offset == META
    assert volume.member_size == ROWS * STRIP
    assert volume.capacity == data_members * ROWS * STRIP
    assert volume.num_blocks * volume.block_size == volume.capacity
    assert volume.state is VolumeState.OPTIMAL
    volume.close()


def test_raid5_layout_is_md_left_symmetric() -> None:
    # md's left-symmetric, 4 members: stripe s keeps parity on member 3 - s % 4 and its data
    # strips on the members after it, wrapping around.
    volume = RaidVolume.create(ram_members(4), 5, STRIP, "ls", metadata_size=META)
    for logical in range(3 * 4):
        volume.write_from(logical * STRIP, STRIP, [memoryview(bytes([logical + 1]) * STRIP)])
    data = [member_data(volume, i) for i in range(4)]
    for stripe in range(4):
        parity = 3 - stripe % 4
        for k in range(3):
            member = (parity + 1 + k) % 4
            strip = data[member][stripe * STRIP : (stripe + 1) * STRIP]
            assert strip == bytes([stripe * 3 + k + 1]) * STRIP
        expected = bytes([(stripe * 3 + 1) ^ (stripe * 3 + 2) ^ (stripe * 3 + 3)]) * STRIP
        assert data[parity][stripe * STRIP : (stripe + 1) * STRIP] == expected


def test_raid10_is_near2_striped_mirrors() -> None:
    volume = RaidVolume.create(ram_members(4), 10, STRIP, "n2", metadata_size=META)
    for logical in range(4):
        volume.write_from(logical * STRIP, STRIP, [memoryview(bytes([logical + 1]) * STRIP)])
    data = [member_data(volume, i) for i in range(4)]
    # Strip 0 on members 0+1 row 0, strip 1 on 2+3 row 0, strip 2 on 0+1 row 1, ...
    assert data[0][:STRIP] == data[1][:STRIP] == bytes([1]) * STRIP
    assert data[2][:STRIP] == data[3][:STRIP] == bytes([2]) * STRIP
    assert data[0][STRIP : 2 * STRIP] == bytes([3]) * STRIP
    assert data[3][STRIP : 2 * STRIP] == bytes([4]) * STRIP


@pytest.mark.parametrize(
    ("level", "n", "kwargs", "message"),
    [
        (6, 4, {}, "RAID level 6"),
        (5, 2, {}, "RAID 5 needs at least 3"),
        (10, 5, {}, "RAID 10 needs an even number"),
        (1, 1, {}, "RAID 1 needs at least 2"),
        (0, 2, {"strip_size": 1536}, "power of two"),
        (0, 2, {"strip_size": 256}, "power of two"),
        (0, 2, {"metadata_size": MEMBER_BYTES}, "leave no room"),
        (0, 2, {"name": "x" * 65}, "at most 64"),
    ],
)
def test_create_rejects_bad_arrays(level: int, n: int, kwargs: dict[str, object],
                                   message: str) -> None:
    args: dict[str, object] = {"strip_size": STRIP, "metadata_size": META} | kwargs
    with pytest.raises(ValueError, match=message):
        RaidVolume.create(ram_members(n), level, **args)


def test_create_rejects_mixed_block_sizes() -> None:
    members = [RamStore.of_size(MEMBER_BYTES, 512), RamStore.of_size(MEMBER_BYTES, 4096)]
    with pytest.raises(ValueError, match="different block sizes"):
        RaidVolume.create(members, 1, 4096, metadata_size=META)


def test_initialize_zeroes_members_that_held_data() -> None:
    members = ram_members(3)
    for m in members:
        m.write_from(0, MEMBER_BYTES, [memoryview(random.Random(1).randbytes(MEMBER_BYTES))])
    volume = RaidVolume.create(members, 5, STRIP, "init", metadata_size=META, initialize=True)
    assert read_all(volume) == bytes(volume.capacity)
    assert_redundancy_consistent(volume)


class RecordingRamStore(RamStore):
    """A real RAM store that also notes which buffer objects its callers hand it."""

    def __init__(self) -> None:
        super().__init__(MEMBER_BYTES // BS, BS)
        self.written: list[object] = []
        self.read: list[object] = []

    def write_from(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        self.written.extend(b.obj for b in bufs)
        return super().write_from(offset, length, bufs)

    def read_into(self, offset: int, length: int, bufs: Sequence[memoryview]) -> int:
        self.read.extend(b.obj for b in bufs)
        return super().read_into(offset, length, bufs)


@pytest.mark.parametrize(("level", "n"), [(0, 3), (1, 2), (5, 3), (10, 4)])
def test_payload_moves_in_the_callers_buffers(level: int, n: int) -> None:
    members = [RecordingRamStore() for _ in range(n)]
    volume = RaidVolume.create(members, level, STRIP, "zc", metadata_size=META)
    for m in members:
        m.written.clear()
    stripe = (n - 1 if level == 5 else volume.capacity // (ROWS * STRIP)) * STRIP
    caller = [bytearray(b"a" * (stripe - 100)), bytearray(b"b" * (stripe + 100))]
    volume.write_from(0, 2 * stripe, [memoryview(b) for b in caller])  # two full stripes
    for m in members:
        # Data goes out of the caller's buffers; only computed parity has buffers of its own.
        assert m.written
        assert all(any(obj is b for b in caller) or isinstance(obj, bytes) for obj in m.written)
    out = [bytearray(7), bytearray(2 * stripe - 7)]
    volume.read_into(0, 2 * stripe, [memoryview(b) for b in out])
    assert b"".join(out) == b"".join(caller)
    reads = [obj for m in members for obj in m.read]
    assert reads and all(any(obj is b for b in out) for obj in reads)


def test_create_rejects_a_member_given_twice(tmp_path: Path) -> None:
    a = RamStore.of_size(MEMBER_BYTES, BS)
    with pytest.raises(ValueError, match="twice"):
        RaidVolume.create([a, RamStore.of_size(MEMBER_BYTES, BS), a], 5, STRIP,
                          metadata_size=META)
    f = FileStore(tmp_path / "f.img", MEMBER_BYTES)
    g = FileStore(tmp_path / "f.img")
    with pytest.raises(ValueError, match="twice"):
        RaidVolume.create([f, g], 1, STRIP, metadata_size=META)
    f.close()
    g.close()


# ----------------------------------------------------------------------------- model-based


class RaidModel(RuleBasedStateMachine):
    """The volume against a flat bytearray under writes, reads, failures and rebuilds."""

    LEVEL = 5
    MEMBERS = 4

    def __init__(self) -> None:
        super().__init__()
        self.volume = RaidVolume.create(ram_members(self.MEMBERS), self.LEVEL, STRIP, "model",
                                        metadata_size=META, rebuild_checkpoint=4 * STRIP)
        self.ref = bytearray(self.volume.capacity)

    def teardown(self) -> None:
        self.volume.close()

    def _tolerates_another_failure(self, index: int) -> bool:
        out = {i for i in range(self.MEMBERS)
               if self.volume.member_state(i) is not MemberState.ACTIVE} | {index}
        if self.LEVEL == 0:
            return False
        if self.LEVEL == 5:
            return len(out) <= 1
        copies = self.MEMBERS if self.LEVEL == 1 else 2
        return all(not set(range(g, g + copies)) <= out
                   for g in range(0, self.MEMBERS, copies))

    @initialize(seed=st.integers(0, 2**32))
    def seed(self, seed: int) -> None:
        self.rnd = random.Random(seed)

    @rule(where=st.floats(0, 1), length=st.integers(1, 6 * STRIP), pieces=st.integers(1, 5))
    def write(self, where: float, length: int, pieces: int) -> None:
        cap = self.volume.capacity
        offset = min(int(where * cap), cap - 1)
        length = min(length, cap - offset)
        data = self.rnd.randbytes(length)
        assert self.volume.write_from(offset, length, sg_split(data, self.rnd, pieces)) == length
        self.ref[offset : offset + length] = data

    @rule(where=st.floats(0, 1), length=st.integers(1, 6 * STRIP), pieces=st.integers(1, 5))
    def read(self, where: float, length: int, pieces: int) -> None:
        cap = self.volume.capacity
        offset = min(int(where * cap), cap - 1)
        length = min(length, cap - offset)
        bufs = empty_sg(length, self.rnd, pieces)
        assert self.volume.read_into(offset, length, bufs) == length
        assert b"".join(bytes(b) for b in bufs) == self.ref[offset : offset + length]

    @precondition(lambda self: self.LEVEL != 0)
    @rule(index=st.integers(0, 5))
    def fail(self, index: int) -> None:
        index %= self.MEMBERS
        if self._tolerates_another_failure(index):
            self.volume.fail_member(index)
            assert self.volume.member_state(index) is MemberState.FAILED

    @rule(index=st.integers(0, 5))
    def replace(self, index: int) -> None:
        index %= self.MEMBERS
        if self.volume.member_state(index) is MemberState.FAILED:
            self.volume.replace_member(index, RamStore.of_size(MEMBER_BYTES, BS))
            assert self.volume.state is VolumeState.REBUILDING

    @rule(strips=st.integers(1, 5))
    def rebuild_some(self, strips: int) -> None:
        done_before, total_before = self.volume.rebuild_bytes
        self.volume.rebuild_step(strips * STRIP)
        done, total = self.volume.rebuild_bytes
        # Progress only moves forward while the same members rebuild; when one of several
        # finishes it leaves the sum (members rebuild one after another).
        if total == total_before:
            assert done > done_before or total == 0
        else:
            assert total < total_before

    @rule()
    def rebuild_all(self) -> None:
        self.volume.rebuild(chunk=3 * STRIP)
        assert self.volume.rebuild_progress == 1.0
        assert all(self.volume.member_state(i) is not MemberState.REBUILDING
                   for i in range(self.MEMBERS))

    @invariant()
    def consistent_when_optimal(self) -> None:
        if self.volume.state is VolumeState.OPTIMAL:
            assert_redundancy_consistent(self.volume)

    @invariant()
    def never_offline(self) -> None:
        assert self.volume.state is not VolumeState.FAILED


MODEL_SETTINGS = settings(max_examples=20, stateful_step_count=25, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])


def _model(level: int, members: int) -> type[RaidModel]:
    return type(f"RaidModel{level}x{members}", (RaidModel,),
                {"LEVEL": level, "MEMBERS": members})


TestModelRaid0 = _model(0, 3).TestCase
TestModelRaid1 = _model(1, 3).TestCase
TestModelRaid5x3 = _model(5, 3).TestCase
TestModelRaid5x4 = _model(5, 4).TestCase
TestModelRaid10 = _model(10, 4).TestCase
TestModelRaid0.settings = TestModelRaid1.settings = MODEL_SETTINGS
TestModelRaid5x3.settings = TestModelRaid5x4.settings = TestModelRaid10.settings = MODEL_SETTINGS


# ----------------------------------------------------------------------------- degraded mode


@pytest.mark.parametrize(("level", "n"), REDUNDANT)
def test_reads_survive_any_single_member_failure(level: int, n: int, rnd: random.Random,
                                                 tmp_path: Path) -> None:
    volume = RaidVolume.create(file_members(tmp_path, n), level, STRIP, "deg",
                               metadata_size=META)
    ref = bytearray(volume.capacity)
    random_writes(volume, ref, rnd, 30)
    failed = rnd.randrange(n)
    volume.fail_member(failed)
    assert volume.state is VolumeState.DEGRADED
    assert volume.status()["members"][failed]["state"] == "failed"
    assert_reads_match(volume, ref, rnd)
    volume.close()


@pytest.mark.parametrize(("level", "n"), REDUNDANT)
@pytest.mark.parametrize("kind", ["ram", "file"])
def test_degraded_writes_rebuild_then_other_member_fails(
    level: int, n: int, kind: str, rnd: random.Random, tmp_path: Path,
) -> None:
    members = ram_members(n) if kind == "ram" else file_members(tmp_path, n)
    volume = RaidVolume.create(members, level, STRIP, "rb", metadata_size=META,
                               rebuild_checkpoint=3 * STRIP)
    ref = bytearray(volume.capacity)
    random_writes(volume, ref, rnd, 20)
    failed = rnd.randrange(n)
    volume.fail_member(failed)
    random_writes(volume, ref, rnd, 30)  # degraded: some land on the missing member
    assert_reads_match(volume, ref, rnd)

    new = (RamStore.of_size(MEMBER_BYTES, BS) if kind == "ram"
           else FileStore(tmp_path / "new.img", MEMBER_BYTES))
    volume.replace_member(failed, new)
    assert volume.state is VolumeState.REBUILDING
    assert volume.rebuild_progress == 0.0
    # Writes and reads go on while the rebuild advances: some below the watermark, some above.
    while not volume.rebuild_step(2 * STRIP):
        done, total = volume.rebuild_bytes
        assert 0 < done < total
        random_writes(volume, ref, rnd, 3)
        assert_reads_match(volume, ref, rnd, count=2)
    assert volume.state is VolumeState.OPTIMAL
    assert volume.rebuild_progress == 1.0
    assert_redundancy_consistent(volume)
    assert_reads_match(volume, ref, rnd)

    # Now reads of what the failed member held must come from the rebuilt member.
    volume.fail_member(partner(level, n, failed))
    assert_reads_match(volume, ref, rnd)
    volume.close()


@pytest.mark.parametrize(
    ("level", "n", "fail", "message"),
    [
        (0, 3, [1], "member 1 failed: RAID 0 has no redundancy"),
        (1, 2, [0, 1], "members 0 and 1 failed: RAID 1 needs one mirror"),
        (5, 4, [1, 3], "members 1 and 3 failed: RAID 5 tolerates one"),
        (10, 4, [2, 3], "members 2 and 3 failed: both halves of mirror pair 1"),
    ],
)
def test_more_failures_than_tolerated_take_volume_offline(
    level: int, n: int, fail: list[int], message: str,
) -> None:
    volume = RaidVolume.create(ram_members(n), level, STRIP, "off", metadata_size=META)
    volume.write_from(0, STRIP, [memoryview(b"x" * STRIP)])
    for index in fail[:-1]:
        volume.fail_member(index)
        assert read_all(volume)[:STRIP] == b"x" * STRIP
    volume.fail_member(fail[-1])
    assert volume.state is VolumeState.FAILED
    buf = memoryview(bytearray(BS))
    with pytest.raises(VolumeOffline, match=message) as info:
        volume.read_into(0, BS, [buf])
    assert isinstance(info.value, OSError)  # what the logical unit turns into MEDIUM ERROR
    with pytest.raises(VolumeOffline, match=message):
        volume.write_from(0, BS, [buf])
    with pytest.raises(VolumeOffline):
        volume.flush()
    if level != 0:  # RAID 0 refuses a replacement anyway: nothing to rebuild from
        with pytest.raises(VolumeOffline):
            volume.replace_member(fail[-1], RamStore.of_size(MEMBER_BYTES, BS))
    assert volume.status()["state"] == "failed"
    volume.close()


def test_raid10_survives_one_failure_per_mirror_pair(rnd: random.Random) -> None:
    volume = RaidVolume.create(ram_members(6), 10, STRIP, "r10", metadata_size=META)
    ref = bytearray(volume.capacity)
    random_writes(volume, ref, rnd, 20)
    for index in (1, 2, 5):
        volume.fail_member(index)
    assert volume.state is VolumeState.DEGRADED
    random_writes(volume, ref, rnd, 10)
    assert_reads_match(volume, ref, rnd)
    volume.close()


@pytest.mark.parametrize(("level", "n"), REDUNDANT)
def test_member_io_error_fails_it_and_io_goes_on_degraded(
    level: int, n: int, rnd: random.Random, tmp_path: Path,
) -> None:
    volume = RaidVolume.create(file_members(tmp_path, n), level, STRIP, "eio",
                               metadata_size=META)
    ref = bytearray(volume.capacity)
    random_writes(volume, ref, rnd, 20)
    generation = volume.generation
    # Member 0 holds data in every level (it is the first mirror and a data member of stripe
    # 0), so the next full read meets the error.
    dead = volume.member_store(0)
    assert dead is not None
    break_store(dead)
    assert read_all(volume) == ref
    assert volume.member_state(0) is MemberState.FAILED
    status = volume.status()["members"][0]
    assert status["errors"] >= 1 and "Bad file descriptor" in status["last_error"]
    assert volume.generation > generation  # the failure is on the survivors' metadata
    random_writes(volume, ref, rnd, 10)
    assert_reads_match(volume, ref, rnd)
    volume.close()


@pytest.mark.parametrize(("level", "n"), REDUNDANT)
def test_member_write_error_keeps_written_data_readable(
    level: int, n: int, rnd: random.Random, tmp_path: Path,
) -> None:
    volume = RaidVolume.create(file_members(tmp_path, n), level, STRIP, "weio",
                               metadata_size=META)
    ref = bytearray(volume.capacity)
    random_writes(volume, ref, rnd, 10)
    broken = n - 1
    dead = volume.member_store(broken)
    assert dead is not None
    break_store(dead)
    # A full-volume write reaches every member: the write still succeeds, degraded.
    data = rnd.randbytes(volume.capacity)
    assert volume.write_from(0, len(data), sg_split(data, rnd)) == len(data)
    ref[:] = data
    assert volume.member_state(broken) is MemberState.FAILED
    assert_reads_match(volume, ref, rnd)
    volume.flush()
    volume.close()


def test_raid0_member_error_is_a_volume_error(tmp_path: Path) -> None:
    volume = RaidVolume.create(file_members(tmp_path, 2), 0, STRIP, "r0", metadata_size=META)
    dead = volume.member_store(1)
    assert dead is not None
    break_store(dead)
    buf = memoryview(bytearray(4 * STRIP))
    with pytest.raises(VolumeOffline, match="member 1 failed: RAID 0"):
        volume.read_into(0, buf.nbytes, [buf])
    volume.close()


# ----------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize(("level", "n"), [(5, 3), (5, 4), (1, 2), (10, 4)])
def test_concurrent_writers_on_the_same_stripes_keep_redundancy(
    level: int, n: int, tmp_path: Path,
) -> None:
    # File members: pwritev drops the GIL, so the writers really interleave inside a stripe.
    volume = RaidVolume.create(file_members(tmp_path, n), level, STRIP, "mt",
                               metadata_size=META)
    hot = 2 * (n - 1) * STRIP if level == 5 else 2 * STRIP  # two stripes
    errors: list[BaseException] = []

    start = threading.Barrier(4)

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        start.wait()
        try:
            for _ in range(300):
                # Never a whole stripe: a full-stripe write would recompute parity from
                # scratch and so hide an earlier lost update.
                offset = rnd.randrange(hot - 1)
                length = rnd.randrange(1, min(hot - offset, STRIP) + 1)
                data = rnd.randbytes(length)
                volume.write_from(offset, length, sg_split(data, rnd, 3))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a missing lock shows up every time
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert_redundancy_consistent(volume)
    # Consistent parity also means a degraded read returns what a healthy read did.
    healthy = read_all(volume)
    volume.fail_member(0)
    assert read_all(volume) == healthy
    volume.close()


def test_reads_and_writes_during_background_rebuild(tmp_path: Path) -> None:
    volume = RaidVolume.create(file_members(tmp_path, 4), 5, STRIP, "bg", metadata_size=META,
                               rebuild_checkpoint=2 * STRIP)
    rnd = random.Random(7)
    ref = bytearray(volume.capacity)
    random_writes(volume, ref, rnd, 20)
    volume.fail_member(2)
    volume.replace_member(2, FileStore(tmp_path / "new.img", MEMBER_BYTES))

    def rebuilder() -> None:
        while not volume.rebuild_step(STRIP):
            pass

    thread = threading.Thread(target=rebuilder)
    thread.start()
    mismatches = 0
    while thread.is_alive():
        offset = rnd.randrange(0, volume.capacity - 2 * STRIP)
        data = rnd.randbytes(2 * STRIP)
        volume.write_from(offset, len(data), [memoryview(data)])
        ref[offset : offset + len(data)] = data
        buf = bytearray(2 * STRIP)
        volume.read_into(offset, len(buf), [memoryview(buf)])
        mismatches += buf != data
    thread.join()
    assert mismatches == 0
    assert_redundancy_consistent(volume)
    volume.fail_member(0)
    assert read_all(volume) == ref
    volume.close()


# ----------------------------------------------------------------------------- metadata


def make_file_array(tmp_path: Path, level: int, n: int, rnd: random.Random, name: str = "a0",
                    **kwargs: int) -> tuple[RaidVolume, bytearray]:
    volume = RaidVolume.create(file_members(tmp_path, n, prefix=f"{name}-"), level, STRIP,
                               name, metadata_size=META, **kwargs)
    ref = bytearray(volume.capacity)
    random_writes(volume, ref, rnd, 25)
    return volume, ref


@pytest.mark.parametrize(("level", "n"), CONFIGS)
def test_assemble_from_files_in_any_order(level: int, n: int, rnd: random.Random,
                                          tmp_path: Path) -> None:
    volume, ref = make_file_array(tmp_path, level, n, rnd)
    uuid, generation, paths = volume.uuid, volume.generation, paths_of(volume)
    volume.close()
    shuffled = paths[:]
    rnd.shuffle(shuffled)
    again = RaidVolume.assemble(reopen(shuffled))
    assert (again.uuid, again.name, again.level, again.strip_size) == (uuid, "a0", level, STRIP)
    assert again.generation == generation  # nothing changed: nothing to commit
    assert again.state is VolumeState.OPTIMAL
    assert paths_of(again) == paths  # back in their slots
    assert read_all(again) == ref
    assert again.status()["capacity"] == len(ref)
    again.close()


@pytest.mark.parametrize(("level", "n", "missing"), [(1, 2, 0), (5, 4, 2), (10, 4, 3)])
def test_missing_member_within_tolerance_assembles_degraded(
    level: int, n: int, missing: int, rnd: random.Random, tmp_path: Path,
) -> None:
    volume, ref = make_file_array(tmp_path, level, n, rnd)
    paths = paths_of(volume)
    volume.close()
    present = [p for i, p in enumerate(paths) if i != missing]
    again = RaidVolume.assemble(reopen(present))
    assert again.state is VolumeState.DEGRADED
    assert again.member_state(missing) is MemberState.FAILED
    assert again.status()["members"][missing]["notes"] == ["at assembly: missing"]
    assert read_all(again) == ref
    random_writes(again, ref, rnd, 10)
    again.close()

    # The survivors recorded the loss: the old member is stale now and comes up failed.
    third = RaidVolume.assemble(reopen(paths))
    assert third.member_state(missing) is MemberState.FAILED
    assert third.status()["members"][missing]["notes"][0].startswith(
        "at assembly: failed (its metadata is at generation")
    assert read_all(third) == ref  # its outdated data is not used
    # Re-adding the same disk rebuilds it from scratch.
    old = third.member_store(missing)
    assert old is not None
    third.replace_member(missing, old)
    third.rebuild(chunk=4 * STRIP)
    assert_redundancy_consistent(third)
    third.close()
    fourth = RaidVolume.assemble(reopen(paths))
    assert fourth.state is VolumeState.OPTIMAL
    fourth.fail_member(partner(level, n, missing))
    assert read_all(fourth) == ref
    fourth.close()


@pytest.mark.parametrize(
    ("level", "n", "missing", "message"),
    [
        (5, 4, [1, 3], "members 1 and 3 missing: RAID 5 tolerates one"),
        (10, 4, [0, 1], "members 0 and 1 missing: both halves of mirror pair 0"),
        (0, 3, [2], "member 2 missing: RAID 0 has no redundancy"),
    ],
)
def test_missing_members_beyond_tolerance_refuse_assembly(
    level: int, n: int, missing: list[int], message: str, rnd: random.Random,
    tmp_path: Path,
) -> None:
    volume, _ = make_file_array(tmp_path, level, n, rnd)
    paths = paths_of(volume)
    volume.close()
    present = reopen([p for i, p in enumerate(paths) if i not in missing])
    with pytest.raises(RaidAssemblyError, match=message):
        RaidVolume.assemble(present)
    for s in present:
        s.close()


def test_member_of_another_array_is_named(rnd: random.Random, tmp_path: Path) -> None:
    a0, _ = make_file_array(tmp_path, 5, 3, rnd, name="a0")
    a1, _ = make_file_array(tmp_path, 5, 3, rnd, name="a1")
    p0, p1 = paths_of(a0), paths_of(a1)
    a0.close()
    a1.close()
    stores = reopen([p0[0], p0[1], p1[2]])
    with pytest.raises(RaidAssemblyError) as info:
        RaidVolume.assemble(stores)
    text = str(info.value)
    assert f"store #2 ({p1[2]}) belongs to array 'a1'" in text
    assert "not 'a0'" in text and str(a0.uuid) in text and str(a1.uuid) in text


def test_geometry_disagreement_is_named(tmp_path: Path) -> None:
    # Same array uuid, different strip sizes: a header from a differently built array.
    uuid = uuidlib.uuid4()
    a = RaidVolume.create(file_members(tmp_path, 3, prefix="a"), 5, STRIP, "g",
                          metadata_size=META, array_uuid=uuid)
    b = RaidVolume.create(file_members(tmp_path, 3, prefix="b"), 5, 2 * STRIP, "g",
                          metadata_size=META, array_uuid=uuid)
    pa, pb = paths_of(a), paths_of(b)
    a.close()
    b.close()
    with pytest.raises(RaidAssemblyError,
                       match=rf"store #2 \({pb[2]}\) says strip size 2048, store #0 "
                             rf"\({pa[0]}\) says 1024"):
        RaidVolume.assemble(reopen([pa[0], pa[1], pb[2]]))


def test_corrupt_header_crc_is_named(rnd: random.Random, tmp_path: Path) -> None:
    volume, _ = make_file_array(tmp_path, 5, 3, rnd)
    paths = paths_of(volume)
    volume.close()
    with open(paths[1], "r+b") as f:
        f.seek(40)  # inside the array name field
        f.write(b"\xff")
    with pytest.raises(RaidAssemblyError, match=rf"store #1 \({paths[1]}\) has a corrupt "
                                                r"header: CRC32"):
        RaidVolume.assemble(reopen(paths))


def test_member_without_metadata_is_named(rnd: random.Random, tmp_path: Path) -> None:
    volume, _ = make_file_array(tmp_path, 1, 2, rnd)
    paths = paths_of(volume)
    volume.close()
    blank = FileStore(tmp_path / "blank.img", MEMBER_BYTES)
    with pytest.raises(RaidAssemblyError, match=r"store #1 \(.*blank.img\) carries no RAID"):
        RaidVolume.assemble([FileStore(paths[0]), blank])


def test_two_stores_claiming_one_slot(rnd: random.Random, tmp_path: Path) -> None:
    volume, _ = make_file_array(tmp_path, 5, 3, rnd)
    paths = paths_of(volume)
    volume.close()
    copy = str(tmp_path / "copy.img")
    shutil.copyfile(paths[1], copy)
    with pytest.raises(RaidAssemblyError, match=r"both claim member slot 1"):
        RaidVolume.assemble(reopen([paths[0], paths[1], copy]))


def test_member_failed_in_metadata_stays_failed(rnd: random.Random, tmp_path: Path) -> None:
    volume, ref = make_file_array(tmp_path, 5, 4, rnd)
    paths = paths_of(volume)
    volume.fail_member(2)
    random_writes(volume, ref, rnd, 10)
    volume.close()
    again = RaidVolume.assemble(reopen(paths))
    assert again.state is VolumeState.DEGRADED
    assert again.member_state(2) is MemberState.FAILED
    assert again.status()["members"][2]["notes"][0].startswith("at assembly: failed")
    assert read_all(again) == ref
    again.close()


def test_stale_generation_member_is_failed_unless_forced(rnd: random.Random,
                                                         tmp_path: Path) -> None:
    # A crash between header writes: member 1 keeps an old generation while the newest
    # metadata still lists it as active (its data is current: only a header write was lost).
    volume, ref = make_file_array(tmp_path, 5, 3, rnd)
    paths = paths_of(volume)
    with open(paths[1], "rb") as f:
        old_header = f.read(BS)
    volume.fail_member(0)  # state changes that leave member 1 active
    volume.replace_member(0, FileStore(tmp_path / "r0.img", MEMBER_BYTES))
    paths[0] = str(tmp_path / "r0.img")
    volume.rebuild()
    generation = volume.generation
    volume.close()
    with open(paths[1], "r+b") as f:
        f.write(old_header)

    # Read-only: look without recording anything.
    stale = RaidVolume.assemble(reopen(paths), read_only=True)
    assert stale.member_state(1) is MemberState.FAILED
    assert stale.status()["members"][1]["notes"] == [
        f"at assembly: stale (generation 1, the array is at {generation})"]
    assert read_all(stale) == ref  # served degraded, from members 0 and 2
    stale.close()

    forced = RaidVolume.assemble(reopen(paths), force=True)
    assert forced.state is VolumeState.OPTIMAL
    assert forced.generation == generation + 1  # member 1's header is brought up to date
    assert read_all(forced) == ref
    assert_redundancy_consistent(forced)
    forced.close()
    healed = RaidVolume.assemble(reopen(paths))
    assert healed.state is VolumeState.OPTIMAL and healed.generation == generation + 1
    healed.close()

    # Without force the stale member is failed, and the survivors record that, so that even
    # force cannot bring it back afterwards: it needs a rebuild.
    with open(paths[1], "r+b") as f:
        f.write(old_header)
    failed = RaidVolume.assemble(reopen(paths))
    assert failed.member_state(1) is MemberState.FAILED
    failed.close()
    still = RaidVolume.assemble(reopen(paths), force=True)
    assert still.member_state(1) is MemberState.FAILED
    assert still.status()["members"][1]["notes"][0].startswith("at assembly: failed (its "
                                                               "metadata is at generation 1")
    assert read_all(still) == ref
    still.close()


@pytest.mark.parametrize(("level", "n", "target"), [(5, 4, 1), (1, 2, 0), (10, 4, 2)])
@pytest.mark.parametrize("clean", [True, False])
def test_interrupted_rebuild_resumes_after_reassembly(
    level: int, n: int, target: int, clean: bool, rnd: random.Random, tmp_path: Path,
) -> None:
    checkpoint = 3 * STRIP
    volume, ref = make_file_array(tmp_path, level, n, rnd, rebuild_checkpoint=checkpoint)
    paths = paths_of(volume)
    volume.fail_member(target)
    random_writes(volume, ref, rnd, 10)
    replacement = tmp_path / "replacement.img"
    volume.replace_member(target, FileStore(replacement, MEMBER_BYTES))
    paths[target] = str(replacement)
    volume.rebuild_step(7 * STRIP)  # two checkpoints (3, 6 strips), then one strip more
    assert volume.rebuild_bytes == (7 * STRIP, volume.member_size)
    random_writes(volume, ref, rnd, 10)  # below and above the watermark
    if clean:
        volume.close()
        resumed_at = 7 * STRIP
    else:  # a crash: the stores go away without the volume saving anything
        for i in range(n):
            store = volume.member_store(i)
            assert store is not None
            store.close()
        resumed_at = 6 * STRIP
    again = RaidVolume.assemble(reopen(paths), rebuild_checkpoint=checkpoint)
    assert again.state is VolumeState.REBUILDING
    assert again.member_state(target) is MemberState.REBUILDING
    assert again.status()["members"][target]["rebuild_watermark"] == resumed_at
    assert read_all(again) == ref
    again.rebuild(chunk=5 * STRIP)
    assert again.state is VolumeState.OPTIMAL
    assert_redundancy_consistent(again)
    again.fail_member(partner(level, n, target))
    assert read_all(again) == ref
    again.close()


def test_generation_and_status_track_state_changes(tmp_path: Path) -> None:
    volume = RaidVolume.create(file_members(tmp_path, 3), 5, STRIP, "st", metadata_size=META,
                               rebuild_checkpoint=4 * STRIP)
    assert volume.generation == 1
    volume.fail_member(1)
    assert volume.generation == 2
    volume.replace_member(1, FileStore(tmp_path / "r.img", MEMBER_BYTES))
    assert volume.generation == 3
    volume.rebuild_step(4 * STRIP)  # one checkpoint
    assert volume.generation == 4
    status = volume.status()
    assert status["state"] == "rebuilding"
    assert status["rebuild"] == {"member": 1, "progress": 4 / ROWS, "bytes_done": 4 * STRIP,
                                 "bytes_total": ROWS * STRIP}
    assert status["members"][1]["path"] == str(tmp_path / "r.img")
    assert status["members"][1]["state"] == "rebuilding"
    assert status["members"][0]["size"] == MEMBER_BYTES
    volume.rebuild()
    assert volume.generation == 6  # one more checkpoint at 8 strips, then the end
    assert volume.status()["rebuild"] is None
    volume.close()
    # Every active member carries the newest generation.
    again = RaidVolume.assemble(reopen([str(tmp_path / "m0.img"), str(tmp_path / "r.img"),
                                        str(tmp_path / "m2.img")]))
    assert again.generation == 6
    assert again.state is VolumeState.OPTIMAL
    again.close()


def test_read_only_assembly_refuses_writes_and_leaves_metadata(rnd: random.Random,
                                                              tmp_path: Path) -> None:
    volume, ref = make_file_array(tmp_path, 5, 3, rnd)
    paths = paths_of(volume)
    generation = volume.generation
    volume.close()
    ro = RaidVolume.assemble([FileStore(paths[0], read_only=True), FileStore(paths[2])],
                             read_only=True)
    assert ro.read_only and ro.state is VolumeState.DEGRADED
    assert read_all(ro) == ref
    with pytest.raises(PermissionError):
        ro.write_from(0, BS, [memoryview(bytearray(BS))])
    ro.close()
    again = RaidVolume.assemble(reopen(paths))
    assert again.generation == generation and again.state is VolumeState.OPTIMAL
    again.close()


# ----------------------------------------------------------------------------- logical unit


def test_logical_unit_runs_unchanged_on_a_raid_volume(tmp_path: Path) -> None:
    from emuhba.scsi.sense import UNRECOVERED_READ_ERROR
    from tests.unit.test_lu import make_lu, read10, write10

    volume = RaidVolume.create(file_members(tmp_path, 3), 5, STRIP, "lu", metadata_size=META)
    lu = make_lu(volume)
    data = random.Random(3).randbytes(9 * BS)
    assert write10(lu, 3, data).good
    assert read10(lu, 3, 9).data == data
    volume.fail_member(0)
    assert read10(lu, 3, 9).data == data
    volume.fail_member(1)
    result = read10(lu, 3, 9)
    assert not result.good
    assert result.code == UNRECOVERED_READ_ERROR
    volume.close()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() == before
