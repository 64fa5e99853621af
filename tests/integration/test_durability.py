"""Durability of file stores across a crash: emuhba is killed with SIGKILL in the middle of a
write load from several libiscsi sessions and started again on the same files.

Every write the initiator was told is stable must read back intact after the restart: a write
with FUA once it got GOOD status, and a plain write once a SYNCHRONIZE CACHE issued after it got
GOOD; with the write cache off (WCE=0 through MODE SELECT) every write that got GOOD. The store
must open cleanly and keep its size. Writes that were in flight or only cached when the process
died may or may not be there; nothing is asserted about them (each LBA is written once, so an
old value never masquerades as a new one).

The same crash runs against each installation in INSTALLATIONS (a plain file LUN, and a RAID
logical drive over file members once the RAID controller exists), built from config files.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import INITIATOR, load_bench, record_summary
from tests.integration import libiscsi_client

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("libiscsi_library")]

BS = 512
CHUNK_BLOCKS = 8
IQN = "iqn.2026-11.io.emuhba:durable"
LOAD_SECONDS = 1.5
WRITERS = 4

DISK_CONFIG = """
[server]
control = false
[[portals]]
listen = "127.0.0.1:{port}"
[[stores]]
name = "data"
kind = "file"
path = "{dir}/data.img"
size = "32M"
[[controllers]]
name = "disk0"
kind = "disk"
[[adapters]]
name = "hba0"
controller = "disk0"
[[targets]]
name = "{iqn}"
adapter = "hba0"
luns = ["data"]
"""

RAID_CONFIG = """
[server]
control = false
[[portals]]
listen = "127.0.0.1:{port}"
""" + "".join(f"""
[[stores]]
name = "m{i}"
kind = "file"
path = "{{dir}}/m{i}.img"
size = "12M"
""" for i in range(3)) + """
[[controllers]]
name = "raid0"
kind = "raid"
  [[controllers.arrays]]
  name = "r5"
  level = 5
  strip_size = "16K"
  members = ["m0", "m1", "m2"]
  write_cache = true
[[adapters]]
name = "hba0"
controller = "raid0"
[[targets]]
name = "{iqn}"
adapter = "hba0"
luns = [{{ lun = 0, array = "r5" }}]
"""

# A RAID 5 drive behind the controller's (volatile) write-back cache is the demanding case:
# whatever FUA or SYNCHRONIZE CACHE did not push through the cache dies with the process.
INSTALLATIONS = {"file-lun": DISK_CONFIG, "raid5-write-back": RAID_CONFIG}


@dataclass
class Ledger:
    """What each writer was told is durable, and what it merely sent."""

    durable: dict[int, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempted: int = 0
    errors: list[str] = field(default_factory=list)

    def stable(self, entries: dict[int, bytes]) -> None:
        with self.lock:
            self.durable.update(entries)


def pattern(lba: int, generation: int) -> bytes:
    head = struct.pack(">QQ", lba, generation)
    return (head * (CHUNK_BLOCKS * BS // len(head)))


def write_cdb(lba: int, fua: bool) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, CHUNK_BLOCKS, 0, 0)


def set_write_cache(session: libiscsi_client.Session, enabled: bool) -> None:
    """MODE SELECT the caching page (08h) with WCE set or cleared."""
    sensed = session.command(0, bytes((0x1A, 0x08, 0x08, 0, 255, 0)), data_in=255)
    data = bytearray(sensed[:sensed[0] + 1])
    page = 4 + data[3]
    assert data[page] & 0x3F == 0x08
    data[0] = 0
    data[page] = 0x08  # PS is reserved in MODE SELECT
    data[page + 2] = (data[page + 2] & ~0x04) | (0x04 if enabled else 0)
    session.command(0, bytes((0x15, 0x10, 0, 0, len(data), 0)), data_out=bytes(data))


def writer(portal: str, lbas: list[int], ledger: Ledger, stop: threading.Event, wce: bool,
           seed: int) -> None:
    rng = random.Random(seed)
    try:
        session = libiscsi_client.Session(portal, IQN, 0, f"{INITIATOR}-w{seed}",
                                          reconnect=False)
    except libiscsi_client.IscsiError as exc:
        ledger.errors.append(f"login: {exc}")
        return
    pending: dict[int, bytes] = {}
    try:
        for generation, lba in enumerate(lbas):
            if stop.is_set():
                break
            fua = rng.random() < 0.3
            data = pattern(lba, generation + 1)
            with ledger.lock:
                ledger.attempted += 1
            session.command(0, write_cdb(lba, fua), data_out=data)
            if fua or not wce:
                ledger.stable({lba: data})
            else:
                pending[lba] = data
                if len(pending) >= 8:
                    session.synchronize_cache16(0)
                    ledger.stable(pending)
                    pending = {}
    except libiscsi_client.IscsiError:
        pass  # the target died under us: expected, and nothing in flight counts
    finally:
        session.close()


@contextmanager
def serving(config: Path, port: int, log: Path) -> Iterator[object]:
    bench = load_bench()
    command = [sys.executable, "-m", "emuhba", "serve", "--config", str(config)]
    server = bench.EmuhbaServer(command, "127.0.0.1", port, log, ready_timeout=30.0)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop(timeout=10.0)


@pytest.mark.parametrize("wce", [True, False], ids=["write-cache-on", "write-cache-off"])
@pytest.mark.parametrize("installation", sorted(INSTALLATIONS))
def test_acknowledged_stable_writes_survive_sigkill(installation: str, wce: bool,
                                                    tmp_path: Path, free_tcp_port: int,
                                                    request: pytest.FixtureRequest) -> None:
    config = tmp_path / "emuhba.toml"
    config.write_text(INSTALLATIONS[installation].format(port=free_tcp_port, dir=tmp_path,
                                                         iqn=IQN))
    portal = f"127.0.0.1:{free_tcp_port}"
    log = tmp_path / "emuhba.log"
    ledger = Ledger()
    with serving(config, free_tcp_port, log) as server:
        with libiscsi_client.Session(portal, IQN, 0, INITIATOR) as session:
            blocks_before = session.read_capacity16(0)[1]
            set_write_cache(session, wce)
        chunks = list(range(0, blocks_before - CHUNK_BLOCKS, CHUNK_BLOCKS))
        random.Random(7).shuffle(chunks)
        share = len(chunks) // WRITERS
        stop = threading.Event()
        threads = [threading.Thread(target=writer, args=(
            portal, chunks[i * share:(i + 1) * share], ledger, stop, wce, i), daemon=True)
            for i in range(WRITERS)]
        for thread in threads:
            thread.start()
        time.sleep(LOAD_SECONDS)
        proc = server.proc  # type: ignore[attr-defined]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not ledger.errors, ledger.errors
    assert len(ledger.durable) >= 20, f"too little load before the kill: {ledger.attempted}"
    with serving(config, free_tcp_port, log), \
            libiscsi_client.Session(portal, IQN, 0, INITIATOR) as session:
        assert session.read_capacity16(0)[1] == blocks_before
        lost = [lba for lba, data in sorted(ledger.durable.items())
                if session.read16(0, lba, CHUNK_BLOCKS, BS) != data]
    assert not lost, (f"{len(lost)} of {len(ledger.durable)} acknowledged stable writes lost "
                      f"after SIGKILL, first LBAs {lost[:5]}\n{log.read_text()[-3000:]}")
    record_summary(request.config, f"sigkill {installation} wce={int(wce)}",
                   f"{len(ledger.durable)} of {ledger.attempted} writes acknowledged stable "
                   "before the kill, all read back intact")
