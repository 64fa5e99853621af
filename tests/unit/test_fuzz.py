"""The fuzz suite: hypothesis throws random and mutated input at every decoder and state
machine that takes bytes from the network, and none of them may raise anything but its own
declared failure (LoginFailure from a login negotiator or authenticator, TextFormatError from
the text parser); the SCSI logical unit must complete every command with a status.

Budget: EMUHBA_FUZZ_EXAMPLES examples per test (default 200, what the test command runs). The
longer run documented in the README:

    EMUHBA_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/unit/test_fuzz.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emuhba.scsi.cdb import decode_into
from emuhba.scsi.sense import parse_sense
from emuhba.srb import DataDirection, ScsiStatus, Srb, SrbStatus
from miniports.lu import LogicalUnit
from miniports.store import RamStore
from target import pdu as P
from target.chap import ChallengeLog, ChapAuthenticator, ChapPolicy, ChapSecret
from target.connection import Connection
from target.keys import (
    LoginFailure,
    LoginNegotiator,
    Stage,
    TargetLimits,
    TextFormatError,
    encode_text,
    parse_text,
)
from target.portal import PortalSettings, TargetNode, TargetPortal
from tests.initiator import Pdu, TestInitiator, bhs, read10, write10
from tests.unit.test_connection import BLOCK, IQN, BlockBackend, logged_in, make

EXAMPLES = int(os.environ.get("EMUHBA_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEYS = st.sampled_from([
    "InitiatorName", "TargetName", "SessionType", "AuthMethod", "HeaderDigest", "DataDigest",
    "MaxConnections", "InitialR2T", "ImmediateData", "MaxRecvDataSegmentLength",
    "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain",
    "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel",
    "CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C", "SendTargets", "TargetAlias", "X-vendor",
    "IFMarker", "OFMarkInt", "TaskReporting", "iSCSIProtocolLevel", ""])
VALUES = st.one_of(
    st.sampled_from(["None", "CHAP", "CRC32C,None", "Yes", "No", "0", "1", "65536", "0x00ff",
                     "0b////", "5", "5,7", "Discovery", "Normal", IQN, "Reject",
                     "NotUnderstood", "Irrelevant", "", "4294967296", "-1", "1~5"]),
    st.text(max_size=40))


@FUZZ
@given(st.binary(min_size=48, max_size=48))
def test_bhs_unpack_takes_any_48_bytes(raw: bytes) -> None:
    words = P.unpack_bhs(raw)
    P.decode_lun(words[5] if len(words) > 5 else 0)


@FUZZ
@given(st.binary(max_size=2048))
def test_text_parser_raises_only_its_format_error(raw: bytes) -> None:
    try:
        pairs = parse_text(raw)
    except TextFormatError:
        return
    assert parse_text(encode_text(pairs)) == pairs


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([Stage.SECURITY, Stage.OPERATIONAL]),
                          st.lists(st.tuples(KEYS, VALUES), max_size=8), st.booleans(),
                          st.sampled_from([Stage.SECURITY, Stage.OPERATIONAL,
                                           Stage.FULL_FEATURE])), min_size=1, max_size=5))
def test_login_negotiator_fails_only_with_login_failure(
        steps: list[tuple[Stage, list[tuple[str, str]], bool, Stage]]) -> None:
    negotiator = LoginNegotiator(TargetLimits())
    try:
        for i, (stage, pairs, transit, next_stage) in enumerate(steps):
            negotiator.step(stage, pairs, first=i == 0, transit=transit, next_stage=next_stage)
        negotiator.finish()
    except LoginFailure:
        pass


@FUZZ
@given(st.lists(st.lists(st.tuples(KEYS, VALUES), max_size=6), max_size=4))
def test_chap_fails_only_with_login_failure(rounds: list[list[tuple[str, str]]]) -> None:
    policy = ChapPolicy(ChapSecret("user", b"0123456789abcdef"),
                        ChapSecret("target", b"fedcba9876543210"))
    auth = ChapAuthenticator(policy, ChallengeLog())
    try:
        for pairs in rounds:
            auth.step(pairs)
    except LoginFailure:
        pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans(),
                          st.binary(max_size=300)), min_size=1, max_size=4),
       st.booleans())
def test_connection_survives_any_login_traffic(
        requests: list[tuple[int, int, bool, bytes]], raw_tail: bool) -> None:
    _backend, portal = make()
    ini = TestInitiator(Connection(portal))
    for csg, nsg, transit, text in requests:
        header = bhs(P.Opcode.LOGIN_REQUEST, (0x80 if transit else 0) | (csg << 2) | nsg, 0, 0,
                     len(text), 0x80000000000100 << 8, 0x77, 0, 1, 0, immediate=True)
        ini.send(bytes(header), text)
        if ini.conn.closing:
            break
    if raw_tail:
        ini.send_raw(bytes(range(256)))
    # The connection catches a fault of its own and drops itself: that must never happen.
    assert ini.conn.close_reason != "internal error"


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([*P.Opcode, 0x3F, 0x1F]), st.integers(0, 255),
                          st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**32 - 1), st.binary(max_size=600)),
                min_size=1, max_size=10))
def test_connection_survives_any_pdu_sequence_after_login(
        pdus: list[tuple[int, int, int, int, int, bytes]]) -> None:
    """Well-framed PDUs with random opcodes, flags and fields: the target answers, rejects or
    drops the connection, and never raises."""
    _, ini = logged_in()
    for opcode, flags, itt, ttt, sn, data in pdus:
        header = bhs(opcode, flags, 0, 0, len(data), 0, itt, ttt, sn, ini.exp_statsn,
                     sn ^ itt, ttt ^ sn, 0, 0)
        ini.send(bytes(header), data)
        if ini.conn.closing:
            break
    assert ini.conn.close_reason != "internal error"


OPS = st.one_of(
    st.tuples(st.just("read"), st.integers(1, 48)),
    st.tuples(st.just("write"), st.integers(1, 48), st.integers(0, 48)),
    st.tuples(st.just("release"), st.integers(0, 3)),
    st.tuples(st.just("collect")),
    st.tuples(st.just("pause")),
    st.tuples(st.just("resume")),
    st.tuples(st.just("abort"), st.integers(0, 20)),
)


@FUZZ
@given(st.lists(OPS, min_size=1, max_size=40), st.integers(512, 24 * 1024))
def test_session_budget_holds_under_any_interleaving(ops: list[tuple[object, ...]],
                                                     budget: int) -> None:
    """Reads, writes, completions, a peer that stops and starts reading, ABORT TASK, in any order
    against a small buffer budget: the budget is never exceeded (except by one command alone),
    every command is answered exactly once unless aborted, and everything is given back."""
    backend = BlockBackend(blocks=4096, deferred=True)
    portal = TargetPortal([TargetNode(IQN, backend)], PortalSettings(session_buffer_bytes=budget))
    ini = TestInitiator(Connection(portal))
    ini.login(IQN)
    conn = ini.conn
    session = conn.session
    assert session is not None
    issued: dict[int, int] = {}  # itt -> EDTL
    aborted: set[int] = set()
    answered: dict[int, int] = {}
    largest = 0
    writes: dict[int, bytes] = {}
    r2t_done: set[tuple[int, int]] = set()

    def take(pdus: list[Pdu]) -> None:
        for pdu in pdus:
            if pdu.opcode == P.Opcode.SCSI_RESPONSE or (pdu.opcode == P.Opcode.DATA_IN
                                                         and pdu.flags & 1):
                answered[pdu.itt] = answered.get(pdu.itt, 0) + 1
            elif pdu.opcode == P.Opcode.R2T and (pdu.itt, pdu.w(20)) not in r2t_done:
                r2t_done.add((pdu.itt, pdu.w(20)))
                data = writes[pdu.itt]
                off, length = pdu.w(40), pdu.w(44)
                take(ini.data_out(pdu.itt, pdu.w(20), off, data[off:off + length], final=True))

    for op in ops:
        kind = op[0]
        if kind == "read":
            edtl = int(op[1]) * BLOCK  # type: ignore[call-overload]
            itt, got = ini.command(read10(0, edtl // BLOCK), read=edtl)
            issued[itt] = edtl
            largest = max(largest, edtl)
            take(got)
        elif kind == "write":
            data = os.urandom(int(op[1]) * BLOCK)  # type: ignore[call-overload]
            imm = min(len(data), int(op[2]) * BLOCK, 65536)  # type: ignore[call-overload]
            itt, got = ini.command(write10(100, len(data) // BLOCK), write=data,
                                   immediate_data=imm)
            writes[itt] = data
            issued[itt] = len(data)
            largest = max(largest, len(data))
            take(got)
            unsolicited = min(len(data), ini.first_burst)
            if imm < unsolicited:
                take(ini.data_out(itt, 0xFFFFFFFF, imm, data[imm:unsolicited], final=True))
        elif kind == "release":
            for _ in range(int(op[1]) + 1):  # type: ignore[call-overload]
                backend.release()
            take(ini.collect())
        elif kind == "collect":
            take(ini.collect())
        elif kind == "pause":
            conn.pause_output()
        elif kind == "resume":
            conn.resume_output()
            take(ini.collect())
        elif kind == "abort":
            open_ = [i for i in issued if i not in aborted and i not in answered]
            if open_:
                victim = open_[int(op[1]) % len(open_)]  # type: ignore[call-overload]
                take(ini.tmf(P.TmfFunction.ABORT_TASK, rtt=victim, ref_cmdsn=0))
                aborted.add(victim)
        assert not conn.closing, conn.close_reason
        assert 0 <= session.reserved <= max(budget, largest)
        assert session.held >= 0 and session.pinned >= 0
    conn.resume_output()
    for _ in range(4 * len(issued) + 4):
        backend.release()
        take(ini.collect())
    for itt in issued:
        # An aborted command may have answered before its abort arrived, never twice.
        assert answered.get(itt, 0) == 1 or (itt in aborted and itt not in answered), itt
    assert not session.tasks and not session.deferred
    assert session.reserved == 0 and session.held == 0


def _unit() -> LogicalUnit:
    lu = LogicalUnit(RamStore(2048), lun=0, target_luns=lambda: [0],
                     serial="EMU-FUZZ-0001", target_port_name="iqn.2026-11.io.emuhba:fuzz,t,1")
    lu._overwrite_seconds = 0.0  # a random SANITIZE must not sleep out a modelled pass
    return lu


@FUZZ
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=16), st.integers(0, 4096),
                          st.sampled_from([DataDirection.NONE, DataDirection.IN,
                                           DataDirection.OUT]), st.binary(max_size=64),
                          st.integers(1, 4)), min_size=1, max_size=6))
def test_logical_unit_completes_any_cdb(
        commands: list[tuple[bytes, int, DataDirection, bytes, int]]) -> None:
    lu = _unit()
    for cdb, length, direction, data, nexus in commands:
        buf = bytearray(data.ljust(length, b"\0")[:length])
        srb = Srb(cdb=cdb.ljust(16, b"\0"), data_direction=direction,
                  data_transfer_length=length if direction else 0,
                  sg_list=[memoryview(buf)] if direction and length else [], nexus=nexus)
        decode_into(srb)  # what the port does first; it answers, never raises
        lu.execute(srb)
        assert srb.srb_status in (SrbStatus.SUCCESS, SrbStatus.ERROR), srb
        if srb.scsi_status == ScsiStatus.CHECK_CONDITION:
            parse_sense(srb.sense)  # well-formed sense every time
        assert srb.data_transfer_length <= length


@FUZZ
@given(st.binary(min_size=0, max_size=32))
def test_cdb_decoder_never_raises(cdb: bytes) -> None:
    srb = Srb(cdb=cdb)
    decode_into(srb)
