"""Protocol rules of the sans-IO target, driven PDU by PDU (no sockets)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emuhba.srb import DataDirection, ScsiStatus, Srb, SrbStatus
from target import pdu as P
from target.connection import Connection
from target.keys import TargetLimits
from target.portal import PortalSettings, TargetNode, TargetPortal
from tests.initiator import (
    TestInitiator,
    bhs,
    inquiry,
    read10,
    read_data,
    scsi_status,
    write10,
)

IQN = "iqn.2026-11.io.emuhba:unit"
BLOCK = 512


class BlockBackend:
    """A deterministic RAM block device below the target, with controllable completion timing.

    It stands in for the HBA layer (tested on its own elsewhere) so these tests see only the
    iSCSI rules; end-to-end tests run the real stack.
    """

    def __init__(self, blocks: int = 2048, deferred: bool = False) -> None:
        self.media = bytearray(blocks * BLOCK)
        self.blocks = blocks
        self.deferred = deferred
        self.held: list[Srb] = []
        self.executed: list[Srb] = []
        self.lost: list[int] = []
        self.lun_watchers: list[Callable[[int, int], None]] = []
        self.nexuses: dict[int, tuple[str, str]] = {}

    def luns(self, path_id: int, target_id: int) -> list[int]:
        return [0]

    def queue_capacity(self, path_id: int, target_id: int) -> int:
        return 32

    def watch_luns(self, callback: Callable[[int, int], None]) -> None:
        self.lun_watchers.append(callback)

    def nexus_opened(self, nexus: int, initiator_port: str, target_port: str) -> None:
        self.nexuses[nexus] = (initiator_port, target_port)

    def execute(self, srb: Srb) -> None:
        self.executed.append(srb)
        if self.deferred:
            self.held.append(srb)
        else:
            self._run(srb)

    def release(self) -> None:
        held, self.held = self.held, []
        for srb in held:
            self._run(srb)

    def _run(self, srb: Srb) -> None:
        op = srb.cdb[0]
        srb.srb_status = SrbStatus.SUCCESS
        if op in (0x28, 0x2A):
            _, _, lba, _, blocks, _ = struct.unpack(">BBIBHB", srb.cdb[:10])
            nbytes = blocks * BLOCK
            if lba + blocks > self.blocks:
                srb.scsi_status = ScsiStatus.CHECK_CONDITION
                srb.sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])
                srb.data_transfer_length = 0
                srb.residual = 0
            elif op == 0x28:
                moved = min(nbytes, srb.data_transfer_length)
                srb.sg_list[0][:moved] = self.media[lba * BLOCK:lba * BLOCK + moved]
                srb.data_transfer_length = moved
                srb.residual = (sum(len(b) for b in srb.sg_list) if srb.sg_list else 0) - nbytes
            else:
                data = b"".join(bytes(b) for b in srb.sg_list)
                self.media[lba * BLOCK:lba * BLOCK + len(data)] = data[:nbytes]
                srb.residual = srb.data_transfer_length - nbytes
        elif op == 0x12:
            payload = bytes([0, 0, 6, 2, 31]) + b"\0" * 3 + b"EMUHBA  UNIT            0001"
            n = min(len(payload), srb.data_transfer_length)
            if n:
                srb.sg_list[0][:n] = payload[:n]
            srb.data_transfer_length = n
            srb.residual = srb.data_transfer_length - len(payload) if False else (
                sum(len(b) for b in srb.sg_list) - len(payload))
        assert srb.completion is not None
        srb.completion(srb)

    def abort_task(self, srb: Srb, done: Callable[[bool], None]) -> None:
        if srb in self.held:
            self.held.remove(srb)
            srb.srb_status = SrbStatus.ABORTED
            assert srb.completion is not None
            srb.completion(srb)
        done(True)

    def abort_task_set(self, p: int, t: int, lun: int, nexus: int, done: Callable[[bool], None]) -> None:
        for srb in [s for s in self.held if s.nexus == nexus]:
            self.abort_task(srb, lambda ok: None)
        done(True)

    def clear_task_set(self, p: int, t: int, lun: int, done: Callable[[bool], None]) -> None:
        for srb in list(self.held):
            self.abort_task(srb, lambda ok: None)
        done(True)

    def reset_lun(self, p: int, t: int, lun: int, done: Callable[[bool], None]) -> None:
        self.clear_task_set(p, t, lun, done)

    def reset_target(self, p: int, t: int, done: Callable[[bool], None]) -> None:
        self.clear_task_set(p, t, 0, done)

    def nexus_lost(self, nexus: int) -> None:
        self.lost.append(nexus)


def make(deferred: bool = False, **limits: object) -> tuple[BlockBackend, TargetPortal]:
    backend = BlockBackend(deferred=deferred)
    settings_ = PortalSettings(limits=TargetLimits(**limits))  # type: ignore[arg-type]
    portal = TargetPortal([TargetNode(IQN, backend)], settings_)
    return backend, portal


def logged_in(deferred: bool = False, digests: bool = False, **limits: object) -> tuple[BlockBackend, TestInitiator]:
    backend, portal = make(deferred, **limits)
    ini = TestInitiator(Connection(portal, local_address="192.0.2.1:3260"))
    ini.login(IQN, digests=digests)
    return backend, ini


def test_login_and_inquiry() -> None:
    backend, ini = logged_in()
    # The backend learnt the nexus's SCSI port names (persistent reservations key by them).
    assert list(backend.nexuses.values()) == [
        (f"{ini.name},i,0x{ini.isid.hex()}", f"{IQN},t,0x0001")]
    _, pdus = ini.command(inquiry(96), read=96)
    status, _ = scsi_status(pdus)
    assert status == 0
    assert read_data(pdus)[8:14] == b"EMUHBA"


def test_login_unknown_target_is_refused() -> None:
    _, portal = make()
    ini = TestInitiator(Connection(portal))
    header, text = ini.login_pdu([("InitiatorName", ini.name), ("SessionType", "Normal"),
                                  ("TargetName", "iqn.2026-11.nope:x"), ("AuthMethod", "None")],
                                 csg=0, nsg=1, transit=True)  # type: ignore[misc]
    (resp,) = ini.send(header, text)
    assert resp.opcode == P.Opcode.LOGIN_RESPONSE
    assert (resp.w(36) >> 24, (resp.w(36) >> 16) & 0xFF) == (2, 3)
    assert ini.conn.closing


def test_pdu_before_login_drops_connection() -> None:
    _, portal = make()
    ini = TestInitiator(Connection(portal))
    ini.send(bytes(bhs(P.Opcode.NOP_OUT, 0x80, immediate=True)))
    assert ini.conn.closing


def test_write_read_roundtrip_with_r2t_and_immediate_data() -> None:
    backend, ini = logged_in()
    payload = os.urandom(300 * 1024)
    blocks = len(payload) // BLOCK
    pdus = ini.write(write10(10, blocks), payload, immediate_data=8192, burst=32 * 1024)
    assert scsi_status(pdus)[0] == 0
    assert bytes(backend.media[10 * BLOCK:10 * BLOCK + len(payload)]) == payload
    r2ts = [p for p in pdus if p.opcode == P.Opcode.R2T]
    assert r2ts, "a 300 KiB write beyond FirstBurstLength needs R2Ts"
    assert all(p.w(44) <= 262144 for p in r2ts)
    _, pdus = ini.command(read10(10, blocks), read=len(payload))
    assert read_data(pdus) == payload
    data_in = [p for p in pdus if p.opcode == P.Opcode.DATA_IN]
    assert [p.w(36) for p in data_in] == list(range(len(data_in)))  # DataSN
    assert all(len(p.data) <= 65536 for p in data_in)  # initiator's MaxRecvDataSegmentLength
    assert data_in[-1].flags & P.DATAIN_STATUS  # phase collapse


def test_unsolicited_data_out_then_r2t() -> None:
    backend, ini = logged_in()
    payload = os.urandom(128 * 1024)
    itt, pdus = ini.command(write10(0, len(payload) // BLOCK), write=payload, immediate_data=4096)
    # FirstBurstLength is 65536: up to there we may send unsolicited data.
    r2ts = [p for p in pdus if p.opcode == P.Opcode.R2T]
    assert r2ts and r2ts[0].w(40) == 65536
    got = ini.data_out(itt, 0xFFFFFFFF, 4096, payload[4096:65536], final=True)
    assert not [p for p in got if p.opcode == P.Opcode.SCSI_RESPONSE]
    got = ini.data_out(itt, r2ts[0].w(20), 65536, payload[65536:], final=True)
    assert scsi_status(got)[0] == 0
    assert bytes(backend.media[:len(payload)]) == payload


def test_read_residual_underflow_and_overflow() -> None:
    _, ini = logged_in()
    _, pdus = ini.command(read10(0, 1), read=1024)  # 512 wanted, 1024 expected
    last = pdus[-1]
    assert last.flags & P.DATAIN_UNDERFLOW and last.w(44) == 512
    _, pdus = ini.command(read10(0, 4), read=1024)  # 2048 wanted, 1024 expected
    last = pdus[-1]
    assert last.flags & P.DATAIN_OVERFLOW and last.w(44) == 1024
    assert len(read_data(pdus)) == 1024


def test_check_condition_carries_sense() -> None:
    _, ini = logged_in()
    _, pdus = ini.command(read10(5000, 1), read=512)
    status, sense = scsi_status(pdus)
    assert status == ScsiStatus.CHECK_CONDITION
    assert sense[2] == 5 and sense[12] == 0x21


def test_cmdsn_ordering_holds_early_commands() -> None:
    backend, ini = logged_in()
    base = ini.cmdsn
    _, early = ini.command(read10(0, 1), read=512, cmdsn=base + 1)
    assert early == [] and not backend.executed
    _, both = ini.command(read10(0, 1), read=512, cmdsn=base)
    assert len([p for p in both if p.opcode == P.Opcode.DATA_IN]) == 2
    assert len(backend.executed) == 2


def test_cmdsn_outside_window_is_ignored() -> None:
    backend, ini = logged_in()
    _, pdus = ini.command(read10(0, 1), read=512, cmdsn=ini.cmdsn + 100000)
    assert pdus == [] and not backend.executed
    _, pdus = ini.command(read10(0, 1), read=512, cmdsn=ini.cmdsn - 1)
    assert pdus == [] and not backend.executed


def test_max_cmdsn_window_never_shrinks_and_opens_on_completion() -> None:
    backend, ini = logged_in(deferred=True)
    maxes = []
    for _ in range(5):
        ini.command(read10(0, 1), read=512)
    backend.release()
    ini.collect()
    for p in ini.received:
        if p.opcode == P.Opcode.DATA_IN and p.flags & 1:
            maxes.append(p.w(32))
    assert maxes and maxes == sorted(maxes)


def test_abort_task_of_outstanding_command() -> None:
    backend, ini = logged_in(deferred=True)
    itt, _ = ini.command(read10(0, 1), read=512)
    (resp,) = ini.tmf(P.TmfFunction.ABORT_TASK, rtt=itt, ref_cmdsn=ini.cmdsn - 1)
    assert resp.opcode == P.Opcode.TASK_MGMT_RESPONSE and resp.b2 == 0
    backend.release()
    assert not [p for p in ini.collect() if p.itt == itt]


def test_abort_unknown_task_reports_does_not_exist() -> None:
    _, ini = logged_in()
    (resp,) = ini.tmf(P.TmfFunction.ABORT_TASK, rtt=0x4242, ref_cmdsn=(ini.cmdsn - 5) & 0xFFFFFFFF)
    assert resp.b2 == P.TmfResponse.TASK_DOES_NOT_EXIST


def test_lun_reset_and_unknown_lun() -> None:
    _backend, ini = logged_in(deferred=True)
    ini.command(read10(0, 1), read=512)
    (resp,) = ini.tmf(P.TmfFunction.LOGICAL_UNIT_RESET)
    assert resp.b2 == 0
    (resp,) = ini.tmf(P.TmfFunction.LOGICAL_UNIT_RESET, lun=7)
    assert resp.b2 == P.TmfResponse.LUN_DOES_NOT_EXIST
    (resp,) = ini.tmf(P.TmfFunction.TASK_REASSIGN)
    assert resp.b2 == P.TmfResponse.REASSIGNMENT_NOT_SUPPORTED


def test_nop_ping_and_text_send_targets() -> None:
    _, ini = logged_in()
    (resp,) = ini.nop(b"ping")
    assert resp.opcode == P.Opcode.NOP_IN and resp.data == b"ping"
    (resp,) = ini.text([("SendTargets", "All")])
    assert resp.opcode == P.Opcode.TEXT_RESPONSE
    assert (IQN.encode() + b"\0") in resp.data and b"TargetAddress=192.0.2.1:3260,1" in resp.data


def test_discovery_session_and_advertise() -> None:
    backend = BlockBackend()
    portal = TargetPortal([TargetNode(IQN, backend)],
                          PortalSettings(advertise=["10.0.2.2:3260"]))
    ini = TestInitiator(Connection(portal))
    ini.login(None, discovery=True)
    (resp,) = ini.text([("SendTargets", "All")])
    assert resp.text["TargetAddress"] == "10.0.2.2:3260,1"
    _, pdus = ini.command(inquiry(), read=96)
    assert pdus[0].opcode == P.Opcode.REJECT


def test_long_send_targets_uses_continuation() -> None:
    backend = BlockBackend()
    nodes = [TargetNode(f"{IQN}-{i:04d}-" + "x" * 60, backend) for i in range(1000)]
    portal = TargetPortal(nodes)
    ini = TestInitiator(Connection(portal))
    ini.login(None, discovery=True)
    (first,) = ini.text([("SendTargets", "All")])
    assert first.flags & P.TEXT_CONTINUE and first.w(20) != 0xFFFFFFFF
    chunks = [first.data]
    ttt = first.w(20)
    while True:
        header = bhs(P.Opcode.TEXT_REQUEST, 0x80, 0, 0, 0, 0, first.itt, ttt, ini.cmdsn, ini.exp_statsn)
        ini.cmdsn += 1
        (nxt,) = ini.send(bytes(header))
        chunks.append(nxt.data)
        if nxt.flags & 0x80:
            break
        ttt = nxt.w(20)
    names = [v for k, v in __import__("target.keys", fromlist=["parse_text"]).parse_text(b"".join(chunks))
             if k == "TargetName"]
    assert len(names) == 1000


def test_logout_closes() -> None:
    backend, ini = logged_in()
    (resp,) = ini.logout()
    assert resp.opcode == P.Opcode.LOGOUT_RESPONSE and resp.b2 == 0
    assert ini.conn.closing
    ini.conn.connection_lost()
    assert backend.lost


def test_digests_both_ways() -> None:
    _backend, ini = logged_in(digests=True)
    payload = os.urandom(8192)
    pdus = ini.write(write10(0, 16), payload)
    assert scsi_status(pdus)[0] == 0
    _, pdus = ini.command(read10(0, 16), read=8192)
    assert read_data(pdus) == payload


def test_data_digests_cover_the_padding_of_odd_lengths() -> None:
    """A data segment whose length is not a multiple of four goes out padded, and its digest
    covers the pad (the test initiator checks every digest it receives)."""
    _backend, ini = logged_in(digests=True)
    for n in (1, 2, 3, 5, 4099):
        payload = os.urandom(n)
        (resp,) = ini.nop(payload)
        assert resp.opcode == P.Opcode.NOP_IN and resp.data == payload
    _, pdus = ini.command(read10(0, 1), read=511)  # a Data-In of 511 bytes and an overflow
    assert read_data(pdus) == bytes(511)


def test_header_digest_error_drops_connection() -> None:
    _, ini = logged_in(digests=True)
    header = bhs(P.Opcode.NOP_OUT, 0x80, 0, 0, 0, 0, 5, 0xFFFFFFFF, ini.cmdsn, 0, immediate=True)
    ini.send_raw(bytes(header) + b"\0\0\0\0")
    assert ini.conn.closing


def test_data_digest_error_rejects_and_fails_the_write() -> None:
    backend, ini = logged_in(digests=True)
    payload = os.urandom(4096)
    header = bhs(P.Opcode.SCSI_COMMAND, 0xA1, 0, 0, len(payload), 0, 0x99, len(payload),
                 ini.cmdsn, ini.exp_statsn)
    header[32:42] = write10(0, 8)
    ini.cmdsn += 1
    raw = bytes(header) + P.digest_bytes(P.crc32c(header)) + payload + b"BAD!"
    pdus = ini.send_raw(raw)
    assert pdus[0].opcode == P.Opcode.REJECT and pdus[0].b2 == P.RejectReason.DATA_DIGEST_ERROR
    assert not backend.executed
    assert not ini.conn.closing


def test_unknown_opcode_is_rejected_not_fatal() -> None:
    _, ini = logged_in()
    (resp,) = ini.send(bytes(bhs(0x1C, 0x80, immediate=True)))
    assert resp.opcode == P.Opcode.REJECT and resp.b2 == P.RejectReason.COMMAND_NOT_SUPPORTED
    assert not ini.conn.closing
    (resp,) = ini.nop(b"x")
    assert resp.opcode == P.Opcode.NOP_IN


def test_oversized_data_segment_drops_connection() -> None:
    _, ini = logged_in()
    header = bhs(P.Opcode.NOP_OUT, 0x80, 0, 0, 0xFFFFFF, 0, 5, 0xFFFFFFFF, ini.cmdsn, 0, immediate=True)
    ini.send_raw(bytes(header))
    assert ini.conn.closing


def test_idle_connection_is_pinged_then_dropped() -> None:
    _, ini = logged_in()
    conn = ini.conn
    conn.note_activity(0.0)
    conn.handle_timeout(conn.settings.nop_interval + 1)
    (ping,) = ini.collect()
    assert ping.opcode == P.Opcode.NOP_IN and ping.w(20) != 0xFFFFFFFF
    conn.handle_timeout(conn.settings.nop_interval + conn.settings.nop_timeout + 2)
    assert conn.closing


def test_session_reinstatement_closes_old_session() -> None:
    _backend, portal = make()
    first = TestInitiator(Connection(portal))
    first.login(IQN)
    second = TestInitiator(Connection(portal))
    second.login(IQN)
    assert first.conn.closing and not second.conn.closing
    assert len(portal.sessions) == 1


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=200), max_size=8))
def test_garbage_after_login_never_raises(chunks: list[bytes]) -> None:
    _, ini = logged_in()
    for chunk in chunks:
        ini.conn.receive_data(chunk)
        ini.conn.data_to_send()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(min_size=48, max_size=48), st.binary(max_size=64))
def test_mutated_headers_never_raise(header: bytes, data: bytes) -> None:
    _, ini = logged_in()
    raw = bytearray(header)
    raw[4] = 0  # keep AHS sane sometimes
    raw[5:8] = len(data).to_bytes(3, "big")
    ini.conn.receive_data(bytes(raw) + data + b"\0" * P.pad4(len(data)))
    ini.conn.data_to_send()


def test_direction_flags_reach_the_srb() -> None:
    backend, ini = logged_in()
    ini.command(read10(0, 1), read=512)
    ini.write(write10(0, 1), b"\1" * 512)
    assert backend.executed[0].data_direction == DataDirection.IN
    assert backend.executed[1].data_direction == DataDirection.OUT


def test_duplicate_itt_is_rejected() -> None:
    _backend, ini = logged_in(deferred=True)
    ini.command(read10(0, 1), read=512, itt=0x55)
    _, pdus = ini.command(read10(0, 1), read=512, itt=0x55)
    assert pdus and pdus[0].opcode == P.Opcode.REJECT


@pytest.mark.parametrize("lun", [0, 300])
def test_lun_field_roundtrip(lun: int) -> None:
    assert P.decode_lun(P.encode_lun(lun)) == lun


def test_lun_inventory_change_sends_a_scsi_async_event() -> None:
    backend, ini = logged_in()
    assert len(backend.lun_watchers) == 1  # the portal watches each backend once
    before = ini.exp_statsn
    backend.lun_watchers[0](0, 1)  # another target's change: not this session's business
    assert ini.collect() == []
    backend.lun_watchers[0](0, 0)
    (event,) = ini.collect()
    assert event.opcode == P.Opcode.ASYNC_MESSAGE and event.flags == 0x80
    assert event.itt == 0xFFFFFFFF
    assert event.w(24) == before  # it takes the next StatSN
    assert event.raw[36] == P.AsyncEvent.SCSI_ASYNC_EVENT
    sense_length = int.from_bytes(event.data[:2], "big")
    sense = event.data[2:2 + sense_length]
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (0x06, 0x3F, 0x0E)
    # The session goes on: the next status carries the StatSN after the event's.
    _, pdus = ini.command(inquiry(96), read=96)
    assert scsi_status(pdus)[0] == 0 and pdus[-1].w(24) == before + 1


def test_sessions_per_target_are_limited() -> None:
    _backend, portal = make()
    portal.settings.max_sessions_per_target = 2
    for n in range(2):
        TestInitiator(Connection(portal), isid=bytes((0x80, 0, 0, 0, 0, n + 1))).login(IQN)
    third = TestInitiator(Connection(portal), isid=b"\x80\x00\x00\x00\x00\x09")
    header, text = third.login_pdu([("InitiatorName", third.name), ("TargetName", IQN),
                                    ("AuthMethod", "None")], csg=0, nsg=3, transit=True)
    (reply,) = third.send(header, text)
    assert (reply.w(36) >> 24, (reply.w(36) >> 16) & 0xFF) == (3, 2)
    assert len(portal.sessions) == 2


def test_login_request_without_transit_may_carry_any_nsg() -> None:
    _backend, portal = make()
    ini = TestInitiator(Connection(portal))
    header, text = ini.login_pdu([("InitiatorName", ini.name), ("TargetName", IQN),
                                  ("AuthMethod", "None")], csg=0, nsg=2, transit=False)
    (reply,) = ini.send(header, text)
    assert reply.opcode == P.Opcode.LOGIN_RESPONSE and reply.w(36) >> 16 == 0
    assert not ini.conn.closing


def test_a_login_that_stalls_is_dropped() -> None:
    _backend, portal = make()
    ini = TestInitiator(Connection(portal, now=0.0))
    header, text = ini.login_pdu([("InitiatorName", ini.name), ("TargetName", IQN)],
                                 csg=0, nsg=1, transit=False)
    ini.send(header, text)  # a first request, then nothing more
    ini.conn.handle_timeout(portal.settings.login_timeout - 1)
    assert not ini.conn.closing
    ini.conn.handle_timeout(portal.settings.login_timeout + 1)
    assert ini.conn.closing and ini.conn.close_reason == "login timed out"


def test_connections_beyond_max_connections_are_refused() -> None:
    _backend, portal = make()
    first = TestInitiator(Connection(portal))
    login = first.login(IQN)  # MaxConnections stays at its default, 1
    tsih = login.field8 & 0xFFFF
    second = TestInitiator(Connection(portal), isid=first.isid)
    header, text = second.login_pdu([("InitiatorName", first.name), ("TargetName", IQN),
                                     ("AuthMethod", "None")], csg=0, nsg=3, transit=True,
                                    tsih=tsih, cid=1)
    (reply,) = second.send(header, text)
    assert (reply.w(36) >> 24, (reply.w(36) >> 16) & 0xFF) == (2, 6)
    assert not first.conn.closing


def _send_read(ini: TestInitiator, lba: int, blocks: int) -> int:
    """A READ(10) handed to the connection without taking its output."""
    itt = ini.next_itt()
    header = bhs(P.Opcode.SCSI_COMMAND, 0x80 | 0x40 | 0x01, 0, 0, 0, P.encode_lun(0), itt,
                 blocks * BLOCK, ini.cmdsn, ini.exp_statsn)
    header[32:48] = read10(lba, blocks).ljust(16, b"\0")
    ini.cmdsn += 1
    ini.conn.receive_data(bytes(header))
    return itt


def test_large_read_buffers_are_reused_only_when_nothing_refers_to_them() -> None:
    """Reads of 64 KiB and more take pooled buffers; a buffer whose Data-In is still in the
    output is not handed to another read (that would change data already answered)."""
    from target.connection import READ_POOL_MIN

    backend, ini = logged_in()
    size = 2 * READ_POOL_MIN
    blocks = size // BLOCK
    backend.media[:size] = b"\x01" * size
    backend.media[size:2 * size] = b"\x02" * size
    first = _send_read(ini, 0, blocks)  # its Data-In views sit in the output, untaken
    second = _send_read(ini, blocks, blocks)
    pool = ini.conn._read_pool[size]
    assert len(pool) == 2 and pool[0] is not pool[1]
    pdus = ini.collect()

    def data_of(itt: int) -> bytes:
        return b"".join(p.data for p in pdus if p.opcode == P.Opcode.DATA_IN and p.itt == itt)

    assert data_of(first) == b"\x01" * size and data_of(second) == b"\x02" * size
    # Both answered and taken (and this backend lets go of its requests, as the HBA does): the
    # next read reuses one, and still reads what it should.
    backend.executed.clear()
    kept = {id(buf) for buf in pool}
    third = _send_read(ini, blocks, blocks)
    pdus = ini.collect()
    assert data_of(third) == b"\x02" * size
    assert {id(buf) for buf in ini.conn._read_pool[size]} == kept
    # Small reads are not pooled.
    _, small = ini.command(read10(0, 8), read=8 * BLOCK)
    assert read_data(small) == b"\x01" * (8 * BLOCK) and set(ini.conn._read_pool) == {size}
