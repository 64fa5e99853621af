"""Hostile and broken input over TCP against a running emuhba, while a well-behaved session
writes and verifies data on the same target the whole time.

Each scenario opens its own connection and sends what a scanner, a fuzzer or a broken
initiator sends; it checks the answer RFC 7143 calls for (a Reject, a login failure, or the
connection dropped), and at the end the bystander session must have seen no error at all and
the server must still serve new logins.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from target import pdu as P
from tests.conftest import RunningTarget
from tests.initiator import Pdu, TestInitiator, bhs, inquiry, scsi_status, write10
from tests.integration import libiscsi_client
from tests.integration.verifier import DataVerifier

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("libiscsi_tools")]

QUIET_S = 0.05


class SocketLink:
    """What TestInitiator expects of a connection (receive_data / data_to_send), over TCP."""

    def __init__(self, host: str, port: int, wait_s: float = 1.0, rcvbuf: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if rcvbuf:
            # Before connecting, so the advertised TCP window stays this small.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect((host, port))
        self.closed = False
        self.wait_s = wait_s  # how long a read waits for the first byte
        self.quiet_s = QUIET_S  # and for more once bytes flow

    def poll_only(self) -> None:
        """From now on reads take what has arrived and do not wait (pipelined senders)."""
        self.wait_s = self.quiet_s = 0.001

    def receive_data(self, raw: bytes) -> None:
        try:
            self.sock.sendall(raw)
        except OSError:
            self.closed = True

    def data_to_send(self, wait_s: float | None = None) -> list[bytes]:
        """What arrives within ``wait_s``, read until the line goes quiet."""
        out: list[bytes] = []
        self.sock.settimeout(self.wait_s if wait_s is None else wait_s)
        while not self.closed:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                break
            except OSError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            out.append(chunk)
            self.sock.settimeout(self.quiet_s)
        return out

    def wait_closed(self, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.closed and time.monotonic() < deadline:
            self.data_to_send(0.2)
        return self.closed

    def close(self) -> None:
        self.sock.close()


def initiator(target: RunningTarget, name: str = "iqn.2026-11.io.emuhba:hostile") -> TestInitiator:
    link = SocketLink(target.host, target.port)
    return TestInitiator(conn=cast(Any, link), name=name,
                         isid=b"\x80" + os.urandom(5))


def link_of(ini: TestInitiator) -> SocketLink:
    return cast(SocketLink, ini.conn)


def logged_in(target: RunningTarget) -> TestInitiator:
    ini = initiator(target)
    ini.login(target.iqn)
    return ini


def still_answers(ini: TestInitiator) -> bool:
    replies = ini.nop(b"ping")
    return any(p.opcode == P.Opcode.NOP_IN and p.data == b"ping" for p in replies)


@pytest.fixture(scope="module")
def bystander(_session_target: RunningTarget) -> Iterator[DataVerifier]:
    if _session_target.flavour != "emuhba":
        pytest.skip("hostile input is thrown at emuhba only")
    target = _session_target
    watcher = DataVerifier(target.portal, target.iqn, target.disk("ram").lun,
                           initiator="iqn.2026-11.io.emuhba:bystander",
                           block_length=target.block_length, first_lba=4096, blocks=8,
                           span=2048)
    time.sleep(0.5)
    yield watcher
    watcher.stop()
    assert watcher.ops > 0
    assert not watcher.errors, watcher.errors


def login_status(pdus: list[Pdu]) -> tuple[int, int] | None:
    for pdu in pdus:
        if pdu.opcode == P.Opcode.LOGIN_RESPONSE:
            return pdu.w(36) >> 24, (pdu.w(36) >> 16) & 0xFF
    return None


def rejected(pdus: list[Pdu]) -> int | None:
    return next((p.b2 for p in pdus if p.opcode == P.Opcode.REJECT), None)


def test_garbage_before_login_drops_the_connection(iscsi_target: RunningTarget,
                                                   bystander: DataVerifier) -> None:
    ini = initiator(iscsi_target)
    ini.send_raw(os.urandom(4096))
    assert link_of(ini).wait_closed()


def test_truncated_header_then_silence(iscsi_target: RunningTarget, bystander: DataVerifier) -> None:
    ini = initiator(iscsi_target)
    header, _ = ini.login_pdu([("InitiatorName", ini.name)], csg=0, nsg=1, transit=True)
    ini.send_raw(bytes(header[:20]))
    link_of(ini).close()  # half a header, then gone: nothing to answer, nothing to leak


@pytest.mark.parametrize("opcode", [P.Opcode.SCSI_COMMAND, P.Opcode.TEXT_REQUEST,
                                    P.Opcode.NOP_OUT, P.Opcode.DATA_OUT,
                                    P.Opcode.TASK_MGMT_REQUEST, P.Opcode.LOGOUT_REQUEST,
                                    P.Opcode.SNACK_REQUEST, 0x3F])
@pytest.mark.parametrize("stage", ["first", "security", "operational"])
def test_a_non_login_pdu_during_login_ends_the_login(iscsi_target: RunningTarget,
                                                     bystander: DataVerifier, opcode: int,
                                                     stage: str) -> None:
    ini = initiator(iscsi_target)
    if stage != "first":
        pairs = [("InitiatorName", ini.name), ("TargetName", iscsi_target.iqn),
                 ("AuthMethod", "None")]
        header, text = ini.login_pdu(pairs, csg=0, nsg=1, transit=stage == "operational")
        assert login_status(ini.send(header, text)) == (0, 0)
    junk = bhs(opcode, 0x80, 0, 0, 0, 0, 0x1234, 0xFFFFFFFF, ini.cmdsn, ini.exp_statsn)
    replies = ini.send(bytes(junk))
    status = login_status(replies)
    # A login failure (initiator error) or a dropped connection; never full feature phase.
    assert status is None or status[0] == 2, status
    assert link_of(ini).wait_closed()


def test_oversized_data_segment_is_rejected_not_buffered(iscsi_target: RunningTarget,
                                                         bystander: DataVerifier) -> None:
    ini = logged_in(iscsi_target)
    header = bhs(P.Opcode.NOP_OUT, 0x80, 0, 0, 16 << 20, 0, ini.next_itt(), 0xFFFFFFFF,
                 ini.cmdsn, ini.exp_statsn, immediate=True)
    replies = ini.send_raw(bytes(header) + b"x" * 1024)
    assert rejected(replies) == P.RejectReason.PROTOCOL_ERROR
    assert link_of(ini).wait_closed()


def test_bad_header_digest_drops_the_connection(digest_target: RunningTarget,
                                                bystander: DataVerifier) -> None:
    ini = initiator(digest_target)
    ini.login(digest_target.iqn, digests=True)
    header = bytes(bhs(P.Opcode.NOP_OUT, 0x80, 0, 0, 0, 0, ini.next_itt(), 0xFFFFFFFF,
                       ini.cmdsn, ini.exp_statsn, immediate=True))
    ini.send_raw(header + b"\xde\xad\xbe\xef")
    assert link_of(ini).wait_closed()


def test_bad_data_digest_gets_a_reject_and_the_connection_lives(
        digest_target: RunningTarget, bystander: DataVerifier) -> None:
    ini = initiator(digest_target)
    ini.login(digest_target.iqn, digests=True)
    header = bhs(P.Opcode.NOP_OUT, 0x80, 0, 0, 4, 0, ini.next_itt(), 0xFFFFFFFF,
                 ini.cmdsn, ini.exp_statsn, immediate=True)
    hd = P.digest_bytes(P.crc32c(bytes(header)))
    replies = ini.send_raw(bytes(header) + hd + b"ping" + b"\0\0\0\0")
    assert rejected(replies) == P.RejectReason.DATA_DIGEST_ERROR
    assert still_answers(ini)


def test_out_of_window_cmdsn_is_ignored(iscsi_target: RunningTarget,
                                        bystander: DataVerifier) -> None:
    ini = logged_in(iscsi_target)
    _, replies = ini.command(inquiry(), read=96, cmdsn=(ini.cmdsn + 100_000) & 0xFFFFFFFF)
    assert not any(p.opcode == P.Opcode.SCSI_RESPONSE for p in replies)
    assert still_answers(ini)
    _, replies = ini.command(inquiry(), read=96)
    assert scsi_status(replies)[0] == 0


def test_data_out_for_an_unknown_task(iscsi_target: RunningTarget,
                                      bystander: DataVerifier) -> None:
    ini = logged_in(iscsi_target)
    # Data for a task the target does not know may be the late data of an aborted task:
    # dropped without an answer (RFC 7143 11.7), and the connection carries on.
    replies = ini.data_out(0xABCDEF, 0x1234, 0, b"\0" * 512)
    assert replies == []
    assert still_answers(ini)


def test_nop_out_flood(iscsi_target: RunningTarget, bystander: DataVerifier) -> None:
    ini = logged_in(iscsi_target)
    burst = bytearray()
    for i in range(20_000):
        burst += bhs(P.Opcode.NOP_OUT, 0x80, 0, 0, 0, 0, 0x10000 + i, 0xFFFFFFFF, ini.cmdsn,
                     ini.exp_statsn, immediate=True)
    first = ini.send_raw(bytes(burst))
    deadline = time.monotonic() + 30
    answered = sum(p.opcode == P.Opcode.NOP_IN for p in first)
    while answered < 20_000 and time.monotonic() < deadline:
        answered += sum(p.opcode == P.Opcode.NOP_IN for p in ini.collect())
    assert answered == 20_000
    assert still_answers(ini)


@pytest.mark.parametrize("phase", ["unsolicited", "solicited"])
def test_write_burst_cut_by_a_lost_connection_is_not_reported_done(
        iscsi_target: RunningTarget, bystander: DataVerifier, phase: str) -> None:
    bs = iscsi_target.block_length
    lun = iscsi_target.disk("ram").lun
    lba = 20_000 if phase == "unsolicited" else 24_000
    # Unsolicited: within the first burst (immediate data plus Data-Out without R2T).
    # Solicited: past FirstBurstLength (64 KiB), so the rest waits for R2Ts.
    blocks = 64 if phase == "unsolicited" else 512
    before = b"\x11" * (blocks * bs)
    session = libiscsi_client.Session(iscsi_target.portal, iscsi_target.iqn, lun,
                                      initiator="iqn.2026-11.io.emuhba:hostile-check")
    try:
        session.write16(lun, lba, before, bs)
        ini = logged_in(iscsi_target)
        data = b"\x5a" * (blocks * bs)
        itt, replies = ini.command(write10(lba, blocks), write=data, immediate_data=bs)
        first_burst = min(len(data), ini.first_burst)
        if phase == "unsolicited":
            replies += ini.data_out(itt, 0xFFFFFFFF, bs, data[bs:4 * bs], final=False)
        else:
            replies += ini.data_out(itt, 0xFFFFFFFF, bs, data[bs:first_burst], final=True)
            r2ts = [p for p in replies if p.opcode == P.Opcode.R2T]
            deadline = time.monotonic() + 5
            while not r2ts and time.monotonic() < deadline:
                r2ts = [p for p in ini.collect() if p.opcode == P.Opcode.R2T]
            assert r2ts, "no R2T for the data past the first burst"
            offset = r2ts[0].w(40)
            replies += ini.data_out(itt, r2ts[0].w(20), offset, data[offset:offset + 8 * bs],
                                    final=False)
        assert not any(p.opcode == P.Opcode.SCSI_RESPONSE for p in replies)
        link_of(ini).close()
        time.sleep(0.2)
        # The command never had all its data: it was never executed, so none of it landed.
        assert session.read16(lun, lba, blocks, bs) == before
        # And the initiator's reconnect works.
        again = logged_in(iscsi_target)
        assert still_answers(again)
    finally:
        session.close()


def test_the_server_still_serves_new_logins(iscsi_target: RunningTarget,
                                            bystander: DataVerifier) -> None:
    ini = logged_in(iscsi_target)
    _, replies = ini.command(inquiry(), read=96)
    assert scsi_status(replies)[0] == 0
    assert struct.unpack_from(">B", replies[0].data)[0] == 0  # direct-access device


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def count_responses(sock: socket.socket, expected: int, timeout_s: float) -> dict[int, int]:
    """Read the stream, dropping data, until ``expected`` commands have their status:
    ITT -> SCSI status (status on a SCSI Response or on the last Data-In)."""
    statuses: dict[int, int] = {}
    pending = bytearray()
    skip = 0
    deadline = time.monotonic() + timeout_s
    sock.settimeout(1.0)
    while len(statuses) < expected and time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not chunk:
            break
        view = memoryview(chunk)
        if skip:
            n = min(skip, len(view))
            skip -= n
            view = view[n:]
        pending += view
        while len(pending) >= P.BHS_LEN:
            opcode = pending[0] & 0x3F
            flags = pending[1]
            dsl = int.from_bytes(pending[5:8], "big")
            itt = int.from_bytes(pending[16:20], "big")
            if opcode == P.Opcode.SCSI_RESPONSE or (opcode == P.Opcode.DATA_IN and flags & 1):
                assert itt not in statuses, f"task {itt:#x} answered twice"
                statuses[itt] = pending[3]
            whole = P.BHS_LEN + dsl + (-dsl & 3)
            if len(pending) >= whole:
                del pending[:whole]
            else:
                skip = whole - len(pending)
                pending.clear()
    return statuses


def test_a_peer_that_never_reads_cannot_make_the_target_hold_its_reads(
        iscsi_target: RunningTarget, bystander: DataVerifier) -> None:
    """Large READs filling the whole CmdSN window, their answers never read: the target holds
    at most its per-session buffer budget (64 MiB by default) of read data plus what already
    sits in the socket, not window x transfer length; once the peer reads, every command is
    answered exactly once."""
    pid = iscsi_target.server.proc.pid
    link = SocketLink(iscsi_target.host, iscsi_target.port, rcvbuf=64 << 10)
    ini = TestInitiator(conn=cast(Any, link), name="iqn.2026-11.io.emuhba:hostile-reader",
                        isid=b"\x80" + os.urandom(5))
    ini.login(iscsi_target.iqn)
    lun = iscsi_target.disk("ram").lun
    _, replies = ini.command(bytes(6), lun=lun)  # TEST UNIT READY takes the new nexus's UA
    _, replies = ini.command(bytes(6), lun=lun)
    assert scsi_status(replies)[0] == 0
    reply = next(p for p in replies if p.opcode == P.Opcode.SCSI_RESPONSE)
    window = (reply.w(32) - ini.cmdsn + 1) & 0xFFFFFFFF
    assert window >= 16
    bs = iscsi_target.block_length
    size = 8 << 20  # the LU's maximum transfer length
    burst = bytearray()
    for i in range(window):
        header = bhs(P.Opcode.SCSI_COMMAND, 0x80 | 0x40 | 1, 0, 0, 0, P.encode_lun(lun),
                     0x100 + i, size, ini.cmdsn + i, ini.exp_statsn)
        header[32:42] = struct.pack(">BBIBHB", 0x28, 0, 0, 0, size // bs, 0)
        burst += header
    before = rss_kib(pid)
    link.sock.sendall(burst)
    peak = before
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(pid))
        time.sleep(0.05)
    grown_mib = (peak - before) / 1024
    asked_mib = window * size >> 20
    print(f"\nnon-reading peer: {window} READs of {size >> 20} MiB ({asked_mib} MiB) unread, "
          f"target RSS grew {grown_mib:.0f} MiB")
    # The budget (64 MiB) of started reads, plus at most as much already in the transport.
    assert grown_mib < 128, f"target grew {grown_mib:.0f} MiB for {asked_mib} MiB of unread reads"
    statuses = count_responses(link.sock, window, timeout_s=120)
    assert len(statuses) == window and set(statuses.values()) == {0}
    link.close()
