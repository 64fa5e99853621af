"""Soak a target: many libiscsi sessions at a fixed queue depth doing mixed reads and writes
with every read checked against what was last written, while the target's memory is sampled.

    python bench/soak.py --portal 127.0.0.1:3260 --iqn IQN --lun 0 \
        --sessions 64 --queue-depth 32 --seconds 600 --pid $(pidof -s python3)

The initiator is libiscsi itself (its asynchronous API through ctypes, one context per
session, all serviced from one poll loop). Each session owns its own stretch of the LUN, cut
into 4 KiB slots; a slot has at most one command in flight, so the expected content of every
read is known exactly: the last pattern written there, or zeros if nothing was (the stretch is
zeroed first). Prints a JSON summary: commands, IOPS, errors and mismatches, and the target's
RSS over time. Exit status 1 on any error or mismatch.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import select
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration import libiscsi_client

SLOT_BYTES = 4096
_COMMAND_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                               ctypes.c_void_p)


def _declare(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int
    for name, restype, argtypes in (
        ("iscsi_scsi_command_async", i, [p, i, p, _COMMAND_CB, p, p]),
        ("iscsi_get_fd", i, [p]),
        ("iscsi_which_events", i, [p]),
        ("iscsi_service", i, [p, i]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def pattern(session: int, slot: int, generation: int) -> bytes:
    return struct.pack(">IIQ", session, slot, generation) * (SLOT_BYTES // 16)


@dataclass
class Pending:
    slot: int
    write: bool
    expected: bytes | None
    buf: Any
    iov: Any
    task: int
    generation: int = 0


@dataclass
class SessionState:
    index: int
    session: libiscsi_client.Session
    first_lba: int
    slots: int
    blocks_per_slot: int
    written: dict[int, int] = field(default_factory=dict)  # slot -> generation
    busy: set[int] = field(default_factory=set)
    in_flight: dict[int, Pending] = field(default_factory=dict)  # task pointer -> Pending


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lib = libiscsi_client.load()
        _declare(self.lib)
        self.rng = random.Random(args.seed)
        self.generation = 0
        self.reads = self.writes = 0
        self.errors: list[str] = []
        self.mismatches = 0
        self.rss: list[tuple[float, int]] = []
        self._callback = _COMMAND_CB(self._done)  # kept alive for libiscsi
        self._current: SessionState | None = None
        self.sessions: list[SessionState] = []

    def open(self) -> None:
        args = self.args
        for n in range(args.sessions):
            session = libiscsi_client.Session(args.portal, args.iqn, args.lun,
                                              initiator=f"{args.initiator}-{n}")
            block_length, blocks = session.read_capacity16(args.lun)
            per_session = blocks // args.sessions
            slot_blocks = SLOT_BYTES // block_length
            slots = min(args.slots, per_session // slot_blocks)
            if slots < args.queue_depth:
                raise SystemExit(f"LUN too small for {args.sessions} sessions at QD "
                                 f"{args.queue_depth}")
            state = SessionState(n, session, n * per_session, slots, slot_blocks)
            # Start from zeros, so a slot never written has a known content too.
            session.write16(args.lun, state.first_lba, bytes(slots * SLOT_BYTES), block_length)
            self.block_length = block_length
            self.sessions.append(state)

    def _submit(self, state: SessionState) -> None:
        while len(state.in_flight) < self.args.queue_depth:
            slot = self.rng.randrange(state.slots)
            if slot in state.busy:
                continue
            write = self.rng.random() < self.args.write_fraction
            lba = state.first_lba + slot * state.blocks_per_slot
            blocks = state.blocks_per_slot
            if write:
                self.generation += 1
                data = pattern(state.index, slot, self.generation)
                buf = ctypes.create_string_buffer(data, SLOT_BYTES)
                cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)
                direction = libiscsi_client.XFER_WRITE
            else:
                generation = state.written.get(slot)
                data = bytes(SLOT_BYTES) if generation is None else \
                    pattern(state.index, slot, generation)
                buf = ctypes.create_string_buffer(SLOT_BYTES)
                cdb = struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)
                direction = libiscsi_client.XFER_READ
            task = self.lib.scsi_create_task(len(cdb), cdb, direction, SLOT_BYTES)
            iov = libiscsi_client._IoVec(ctypes.cast(buf, ctypes.c_void_p), SLOT_BYTES)
            setter = self.lib.scsi_task_set_iov_out if write else self.lib.scsi_task_set_iov_in
            setter(task, ctypes.byref(iov), 1)
            pending = Pending(slot, write, None if write else data, buf, iov, task,
                              self.generation if write else 0)
            ctx = state.session._ctx
            if self.lib.iscsi_scsi_command_async(ctx, self.args.lun, task, self._callback,
                                                 None, None) != 0:
                self.lib.scsi_free_scsi_task(task)
                self.errors.append(f"session {state.index}: submit failed: "
                                   f"{state.session.error()}")
                return
            state.busy.add(slot)
            state.in_flight[task] = pending

    def _done(self, ctx: int, status: int, command_data: int, private: int) -> None:
        state = self._current
        assert state is not None
        pending = state.in_flight.pop(command_data, None)
        if pending is None:
            self.errors.append(f"session {state.index}: completion for an unknown task")
            return
        state.busy.discard(pending.slot)
        if status != 0:
            self.errors.append(f"session {state.index}: {'write' if pending.write else 'read'}"
                               f" of slot {pending.slot}: status {status} "
                               f"{state.session.error()}")
        elif pending.write:
            state.written[pending.slot] = pending.generation
            self.writes += 1
        else:
            self.reads += 1
            if pending.buf.raw != pending.expected:
                self.mismatches += 1
                self.errors.append(f"session {state.index}: slot {pending.slot} read back "
                                   "other data than was last written")
        self.lib.scsi_free_scsi_task(pending.task)

    def run(self) -> dict[str, Any]:
        args = self.args
        poller = select.poll()
        by_fd: dict[int, SessionState] = {}
        started = time.monotonic()
        deadline = started + args.seconds
        next_sample = started
        for state in self.sessions:
            self._submit(state)
        while time.monotonic() < deadline and len(self.errors) < 100:
            poller = select.poll()
            by_fd.clear()
            for state in self.sessions:
                ctx = state.session._ctx
                fd = self.lib.iscsi_get_fd(ctx)
                by_fd[fd] = state
                poller.register(fd, self.lib.iscsi_which_events(ctx))
            for fd, revents in poller.poll(100):
                state = by_fd[fd]
                self._current = state
                if self.lib.iscsi_service(state.session._ctx, revents) < 0:
                    self.errors.append(f"session {state.index}: {state.session.error()}")
                self._submit(state)
            now = time.monotonic()
            if args.pid and now >= next_sample:
                self.rss.append((round(now - started, 1), rss_kib(args.pid)))
                next_sample = now + args.sample_seconds
        elapsed = time.monotonic() - started
        self._drain()
        total = self.reads + self.writes
        return {
            "sessions": args.sessions, "queue_depth": args.queue_depth,
            "seconds": round(elapsed, 1), "commands": total, "reads": self.reads,
            "writes": self.writes, "iops": round(total / elapsed) if elapsed else 0,
            "errors": len(self.errors), "mismatches": self.mismatches,
            "first_errors": self.errors[:10],
            "rss_kib": self.rss,
        }

    def _drain(self) -> None:
        """Let every command in flight finish (and be checked) before the sessions close."""
        deadline = time.monotonic() + 30
        while any(s.in_flight for s in self.sessions) and time.monotonic() < deadline:
            for state in self.sessions:
                if not state.in_flight:
                    continue
                ctx = state.session._ctx
                fd = self.lib.iscsi_get_fd(ctx)
                ready = select.poll()
                ready.register(fd, self.lib.iscsi_which_events(ctx))
                for _, revents in ready.poll(10):
                    self._current = state
                    self.lib.iscsi_service(ctx, revents)

    def close(self) -> None:
        for state in self.sessions:
            state.session.close()


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--portal", required=True, help="HOST:PORT")
    parser.add_argument("--iqn", required=True)
    parser.add_argument("--lun", type=int, default=0)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--queue-depth", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--slots", type=int, default=1024,
                        help="4 KiB slots per session, at most")
    parser.add_argument("--write-fraction", type=float, default=0.5)
    parser.add_argument("--pid", type=int, default=0, help="the target's pid, for its RSS")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--initiator", default="iqn.2026-11.io.emuhba:soak")
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    args = parser.parse_args(argv)
    soak = Soak(args)
    try:
        soak.open()
        summary = soak.run()
    finally:
        soak.close()
    summary["seed"] = args.seed
    print(json.dumps(summary))
    return 1 if summary["errors"] or summary["mismatches"] or not summary["commands"] else 0


if __name__ == "__main__":
    sys.exit(main())
