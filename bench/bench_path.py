"""The per-I/O cost of emuhba's whole stack, without sockets: microseconds of Python per command.

    python bench/bench_path.py                      # every workload, 200,000 commands each
    python bench/bench_path.py --workload read4k --profile out.pstats

Builds the same installation `emuhba serve --ram-lun SIZE` runs (disk controller, Storport port
driver, Hba facade, iSCSI portal) and drives one logged-in Connection with pre-encoded PDUs, a
queue depth's worth at a time, on a uvloop loop (the port's interrupts and DPCs are loop
callbacks). Everything a command costs in the target's own code is in the figure; the kernel's
TCP work and the client are not, which is what makes it repeatable on a noisy machine and a
fair profile of where the Python time goes. `emuhba bench target` measures the real thing.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import random
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emuhba.cli import build_parser, config_from_args
from emuhba.installation import Installation
from emuhba.logs import configure_logging
from target import pdu as P
from target.connection import Connection
from target.keys import TargetLimits
from target.portal import PortalSettings, TargetPortal
from tests.initiator import TestInitiator

IQN = "iqn.2026-11.io.emuhba:target0"


@dataclass(frozen=True)
class Workload:
    name: str
    transfer: int
    write: bool
    queue_depth: int
    digests: bool = False


WORKLOADS = {
    w.name: w
    for w in (
        Workload("read4k", 4096, False, 32),
        Workload("write4k", 4096, True, 32),
        Workload("read256k", 262144, False, 32),
        Workload("read4k-crc32c", 4096, False, 32, digests=True),
    )
}


def command_pdu(ini: TestInitiator, workload: Workload, lba: int, itt: int, cmdsn: int) -> bytes:
    """One SCSI Command PDU (READ/WRITE 10); a write carries its data as immediate data up to
    FirstBurstLength; the rest is answered through R2T by the driver."""
    blocks = workload.transfer // 512
    op = 0x2A if workload.write else 0x28
    cdb = struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0).ljust(16, b"\0")
    imm = b"\xa5" * min(workload.transfer, 65536) if workload.write else b""
    flags = 0x80 | 0x01 | (0x20 if workload.write else 0x40)
    header = bytearray(48)
    P.BHS_GRID.pack_into(header, 0, P.Opcode.SCSI_COMMAND, flags, 0, 0, len(imm), P.encode_lun(0),
                         itt, workload.transfer, cmdsn, 0, 0, 0, 0, 0)
    header[32:48] = cdb
    raw = bytearray(header)
    if workload.digests:
        raw += P.digest_bytes(P.crc32c(header))
    if imm:
        raw += imm
        if workload.digests:
            raw += P.digest_bytes(P.crc32c(imm))
    return bytes(raw)


class Driver:
    """Feeds batches of commands into one Connection and consumes its output."""

    def __init__(self, conn: Connection, ini: TestInitiator, workload: Workload,
                 blocks: int) -> None:
        self.conn = conn
        self.ini = ini
        self.workload = workload
        self.blocks = blocks
        self.rng = random.Random(1)
        self.itt = 0x10000
        self.out_bytes = 0

    def batch(self) -> bytes:
        w = self.workload
        span = w.transfer // 512
        parts = []
        for _ in range(w.queue_depth):
            lba = self.rng.randrange(self.blocks // span) * span
            self.itt = (self.itt + 1) & 0x7FFFFFFF
            parts.append(command_pdu(self.ini, w, lba, self.itt, self.ini.cmdsn))
            self.ini.cmdsn = (self.ini.cmdsn + 1) & 0xFFFFFFFF
        return b"".join(parts)

    def drain(self) -> int:
        """Take the connection's output; the count of status-bearing PDUs in it is not parsed
        (that would be the client's cost), only bytes are counted."""
        conn = self.conn
        n = 0
        while conn.has_output():
            for piece in conn.data_to_send():
                n += len(piece)
            conn.output_written()
        return n


async def run_workload(workload: Workload, commands: int, size: int,
                       profile: Path | None) -> float:
    args = build_parser().parse_args(["serve", "--ram-lun", str(size), "--no-control",
                                      "--header-digest", "optional"])
    installation = Installation(config_from_args(args))
    await installation.start()
    try:
        limits = TargetLimits()
        portal = TargetPortal(installation.nodes, PortalSettings(limits=limits))
        conn = Connection(portal, local_address="127.0.0.1:3260", peer="127.0.0.1:40000")
        ini = TestInitiator(conn)
        ini.login(IQN, digests=workload.digests)
        ini.command(bytes(6))  # TEST UNIT READY takes the power-on unit attention
        ini.command(bytes(6))
        driver = Driver(conn, ini, workload, size // 512)
        batches = [driver.batch() for _ in range(max(1, commands // workload.queue_depth))]
        # Every command's reply is at least a 48-byte header (plus the data for reads).
        per_command = 48 + (0 if workload.write else workload.transfer)
        if workload.digests:
            per_command += 4
        loop = asyncio.get_running_loop()
        profiler = cProfile.Profile() if profile else None
        await asyncio.sleep(0)
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        for raw in batches:
            want = per_command * workload.queue_depth
            conn.receive_data(raw)
            got = driver.drain()
            while got < want:
                # Completions arrive through the port's interrupt, a loop callback.
                fut = loop.create_future()
                loop.call_soon(fut.set_result, None)
                await fut
                got += driver.drain()
        if profiler:
            profiler.disable()
            profiler.dump_stats(str(profile))
        elapsed = time.perf_counter() - started
        done = len(batches) * workload.queue_depth
        return elapsed / done * 1e6
    finally:
        await installation.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--commands", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1 << 30, help="RAM LUN bytes (1 GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload; the best is shown")
    parser.add_argument("--profile", type=Path, help="write cProfile stats here (one workload)")
    args = parser.parse_args(argv)
    names = args.workload or list(WORKLOADS)
    configure_logging(level="warning")
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    print(f"{'workload':16} {'us/command':>10} {'commands/s':>11}")
    for name in names:
        us = min(runner(run_workload(WORKLOADS[name], args.commands, args.size, args.profile))
                 for _ in range(1 if args.profile else max(1, args.repeat)))
        print(f"{name:16} {us:10.2f} {1e6 / us:11,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
