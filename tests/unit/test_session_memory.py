"""Bounded memory per session: the buffer budget, commands held for it, and the CmdSN bookkeeping
that holding depends on (driven PDU by PDU through the sans-IO target)."""

from __future__ import annotations

import gc
import os

from emuhba.srb import ScsiStatus
from target import pdu as P
from target.connection import IMMEDIATE_TASKS_MAX, TEXT_REQUEST_MAX, Connection
from target.portal import PortalSettings, TargetNode, TargetPortal
from tests.initiator import Pdu, TestInitiator, bhs, read10, read_data, scsi_status, write10
from tests.unit.test_connection import BLOCK, IQN, BlockBackend

KIB = 1024


def session_with(budget: int, deferred: bool = True) -> tuple[BlockBackend, TestInitiator]:
    backend = BlockBackend(blocks=4096, deferred=deferred)
    portal = TargetPortal([TargetNode(IQN, backend)], PortalSettings(session_buffer_bytes=budget))
    ini = TestInitiator(Connection(portal, local_address="192.0.2.1:3260"))
    ini.login(IQN)
    return backend, ini


def responses(pdus: list[Pdu], itt: int) -> list[Pdu]:
    return [p for p in pdus if p.itt == itt and (
        p.opcode == P.Opcode.SCSI_RESPONSE or (p.opcode == P.Opcode.DATA_IN and p.flags & 1))]


def max_cmdsn(ini: TestInitiator) -> int:
    return ini.conn.session.max_cmdsn  # type: ignore[union-attr]


def test_reads_beyond_the_budget_wait_their_turn_in_order() -> None:
    backend, ini = session_with(budget=128 * KIB)
    backend.media[:] = os.urandom(len(backend.media))
    itts = [ini.command(read10(i * 128, 128), read=64 * KIB)[0] for i in range(5)]
    session = ini.conn.session
    assert session is not None
    # Two 64 KiB reads fit in 128 KiB; the other three are held, unexecuted, in order.
    assert len(backend.executed) == 2
    assert len(session.deferred) == 3 and session.reserved == 128 * KIB
    window_top = max_cmdsn(ini)
    for round_ in range(3):
        backend.release()
        got = ini.collect()
        # What ran finished; exactly the next waiting reads started.
        assert len(backend.executed) == min(5, 4 + 2 * round_)
        assert max_cmdsn(ini) >= window_top
    backend.release()
    ini.collect()
    for i, itt in enumerate(itts):
        pdus = [p for p in ini.received if p.itt == itt]
        assert scsi_status(pdus)[0] == 0
        assert read_data(pdus) == bytes(backend.media[i * 128 * BLOCK:(i * 128 + 128) * BLOCK])
    assert [s.cdb[2:6] for s in backend.executed] == [
        (i * 128).to_bytes(4, "big") for i in range(5)]
    assert session.reserved == 0 and session.held == 0 and not session.deferred
    assert got is not None


def test_a_command_larger_than_the_budget_runs_alone() -> None:
    backend, ini = session_with(budget=64 * KIB)
    big, _ = ini.command(read10(0, 512), read=256 * KIB)
    small, _ = ini.command(read10(0, 1), read=BLOCK)
    assert len(backend.executed) == 1  # the big one alone; the small one waits behind it
    for _ in range(2):
        backend.release()
        ini.collect()
    assert scsi_status([p for p in ini.received if p.itt == big])[0] == 0
    assert scsi_status([p for p in ini.received if p.itt == small])[0] == 0


def test_no_command_starts_while_the_peer_is_not_reading() -> None:
    backend, ini = session_with(budget=1 << 30, deferred=False)
    ini.conn.pause_output()
    itt, got = ini.command(read10(0, 1), read=BLOCK)
    assert got == [] and backend.executed == []
    ini.conn.resume_output()
    got = ini.collect()
    assert scsi_status(responses(got, itt))[0] == 0


def test_held_write_keeps_a_copy_of_its_unsolicited_data_and_lands_whole() -> None:
    backend, ini = session_with(budget=64 * KIB)
    blocker, _ = ini.command(read10(0, 128), read=64 * KIB)  # fills the budget
    payload = os.urandom(96 * KIB)
    itt, got = ini.command(write10(200, len(payload) // BLOCK), write=payload, immediate_data=8 * KIB)
    session = ini.conn.session
    assert session is not None
    assert got == [] and len(session.deferred) == 1
    # Unsolicited Data-Out for the held write: taken and copied, still no R2T.
    got = ini.data_out(itt, 0xFFFFFFFF, 8 * KIB, payload[8 * KIB:64 * KIB], final=True)
    assert got == [] and session.held == 64 * KIB
    backend.release()  # the blocking read ends: the write starts and asks for the rest
    got = ini.collect()
    r2ts = [p for p in got if p.opcode == P.Opcode.R2T and p.itt == itt]
    assert len(r2ts) == 1 and (r2ts[0].w(40), r2ts[0].w(44)) == (64 * KIB, 32 * KIB)
    assert session.held == 0 and session.reserved == 96 * KIB
    ini.data_out(itt, r2ts[0].w(20), 64 * KIB, payload[64 * KIB:], final=True)
    backend.release()
    ini.collect()
    assert scsi_status([p for p in ini.received if p.itt == itt])[0] == 0
    assert scsi_status([p for p in ini.received if p.itt == blocker])[0] == 0
    assert bytes(backend.media[200 * BLOCK:200 * BLOCK + len(payload)]) == payload


def test_abort_task_ends_a_held_command_that_then_never_runs() -> None:
    backend, ini = session_with(budget=64 * KIB)
    ini.command(read10(0, 128), read=64 * KIB)
    held, _ = ini.command(read10(300, 1), read=BLOCK)
    after, _ = ini.command(read10(301, 1), read=BLOCK)
    (resp,) = ini.tmf(P.TmfFunction.ABORT_TASK, rtt=held, ref_cmdsn=ini.cmdsn - 2)
    assert resp.b2 == P.TmfResponse.FUNCTION_COMPLETE
    for _ in range(2):
        backend.release()
        ini.collect()
    assert [p for p in ini.received if p.itt == held and p.opcode != P.Opcode.TASK_MGMT_RESPONSE] == []
    assert scsi_status([p for p in ini.received if p.itt == after])[0] == 0
    assert all(s.cdb[2:6] != (300).to_bytes(4, "big") for s in backend.executed)


def test_held_commands_are_dropped_with_the_session() -> None:
    backend, ini = session_with(budget=64 * KIB)
    ini.command(read10(0, 128), read=64 * KIB)
    for i in range(4):
        ini.command(read10(i, 1), read=BLOCK)
    session = ini.conn.session
    assert session is not None and len(session.deferred) == 4
    ini.conn.connection_lost()
    assert session.closed and not session.deferred
    backend.release()
    assert len(backend.executed) == 1


def test_window_is_sized_so_waiting_unsolicited_data_fits_the_budget() -> None:
    _, roomy = session_with(budget=64 << 20)
    assert roomy.conn.session is not None and roomy.conn.session.window == 32  # the LU queues
    _, tight = session_with(budget=1 << 20)
    session = tight.conn.session
    assert session is not None
    # 1 MiB / 256 KiB per command (our MaxRecvDataSegmentLength) = 4, raised to the floor of 16.
    assert session.window == 16
    assert (session.max_cmdsn - session.exp_cmdsn + 1) & 0xFFFFFFFF == 16


def test_receive_buffers_kept_alive_by_small_payloads_count_against_the_budget() -> None:
    backend, ini = session_with(budget=64 << 20)
    session = ini.conn.session
    assert session is not None
    payload = os.urandom(2 * KIB)
    # A write with 1 KiB of immediate data waits for R2T data: its view pins the receive buffer.
    itt, _ = ini.command(write10(0, 4), write=payload, immediate_data=KIB, edtl=len(payload))
    # Other traffic fills the buffer past its end, so the target moves to a fresh one.
    for _ in range(40):
        ini.nop(os.urandom(32 * KIB))
    assert session.pinned > 512 * KIB
    r2ts = [p for p in ini.received if p.opcode == P.Opcode.R2T and p.itt == itt]
    if not r2ts:  # InitialR2T=No: the rest may come unsolicited
        ini.data_out(itt, 0xFFFFFFFF, KIB, payload[KIB:], final=True)
    else:
        ini.data_out(itt, r2ts[0].w(20), r2ts[0].w(40), payload[r2ts[0].w(40):], final=True)
    backend.release()
    ini.collect()
    assert scsi_status([p for p in ini.received if p.itt == itt])[0] == 0
    backend.executed.clear()
    gc.collect()
    assert session.pinned == 0


def test_non_immediate_nops_keep_the_window_open() -> None:
    _, ini = session_with(budget=64 << 20, deferred=False)
    session = ini.conn.session
    assert session is not None
    for _ in range(3 * session.window):
        header = bhs(P.Opcode.NOP_OUT, 0x80, 0, 0, 0, 0, ini.next_itt(), 0xFFFFFFFF,
                     ini.cmdsn, ini.exp_statsn)
        ini.cmdsn += 1
        (resp,) = ini.send(bytes(header))
        assert resp.opcode == P.Opcode.NOP_IN
        # Every answer leaves the whole window open for the next command.
        assert (resp.w(32) - ini.cmdsn + 1) & 0xFFFFFFFF == session.window


def test_abort_of_a_command_not_yet_arrived_keeps_it_from_running() -> None:
    backend, ini = session_with(budget=64 << 20, deferred=False)
    base = ini.cmdsn
    itt = ini.itt + 1
    # The command with CmdSN base is on its way; ABORT TASK (immediate, CmdSN base + 1) overtakes it.
    ini.cmdsn = base + 1
    (resp,) = ini.tmf(P.TmfFunction.ABORT_TASK, rtt=itt, ref_cmdsn=base)
    assert resp.b2 == P.TmfResponse.FUNCTION_COMPLETE
    # A later command waits for the gap, then runs; the aborted one arrives late and never runs.
    later, got = ini.command(read10(7, 1), read=BLOCK)
    assert got == [] and backend.executed == []
    _, got = ini.command(read10(3, 1), read=BLOCK, itt=itt, cmdsn=base)
    assert responses(got, itt) == []
    assert scsi_status(responses(got, later))[0] == 0
    assert [s.cdb[2:6] for s in backend.executed] == [(7).to_bytes(4, "big")]
    assert ini.conn.session is not None and not ini.conn.session.tasks


def test_immediate_commands_beyond_the_limit_get_task_set_full() -> None:
    backend, ini = session_with(budget=64 << 20)
    session = ini.conn.session
    assert session is not None
    statuses = []
    for _ in range(session.window + IMMEDIATE_TASKS_MAX + 3):
        itt, got = ini.command(read10(0, 1), read=BLOCK, immediate=True)
        statuses.append(scsi_status(responses(got, itt))[0] if responses(got, itt) else None)
    assert statuses.count(None) == session.window + IMMEDIATE_TASKS_MAX
    assert statuses[-3:] == [ScsiStatus.TASK_SET_FULL] * 3
    backend.release()
    ini.collect()
    assert not session.tasks


def test_a_text_request_continued_without_end_is_cut_off() -> None:
    _, ini = session_with(budget=64 << 20, deferred=False)
    chunk = b"X=" + b"y" * (8 * KIB - 3) + b"\0"
    for _ in range(TEXT_REQUEST_MAX // len(chunk) + 2):
        header = bhs(P.Opcode.TEXT_REQUEST, 0x40, 0, 0, len(chunk), 0, 0x55, 0xFFFFFFFF,
                     ini.cmdsn, ini.exp_statsn, immediate=True)
        ini.send(bytes(header), chunk)
        if ini.conn.closing:
            break
    assert ini.conn.closing and "text request" in ini.conn.close_reason
