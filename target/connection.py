"""The sans-IO iSCSI target: one Connection per TCP connection, one Session per I_T nexus.

A Connection is fed received bytes (``get_buffer``/``buffer_updated``, the shape of asyncio's
BufferedProtocol, or ``receive_data`` for tests) and the current time (``handle_timeout``), and
produces bytes to send (``data_to_send``) plus a ``closing`` verdict. SCSI commands go down through
the ScsiBackend interface; their completions come back as calls, which queue more output and poke
``on_output`` so the adapter knows to flush. Nothing here touches a socket or an event loop.

Receive buffering is zero-copy for payloads: data segments are handed on as memoryviews of the
receive buffer, and a buffer that has lent views out is never written again (the next one is fresh).

Memory is bounded per session by ``PortalSettings.session_buffer_bytes``: a command starts (its
read buffer allocated, its R2Ts sent) only while the data of the session's started commands, plus
receive buffers kept alive by small payloads, fits in that budget, and not while its connection's
peer leaves our output unread. Commands beyond it wait in arrival order, unexecuted, holding their
CmdSN window slots so MaxCmdSN stops advancing; the CmdSN window itself is sized so the unsolicited
data those waiting commands may carry fits the budget too.
"""

from __future__ import annotations

import itertools
import os
import sys
import weakref
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any, Final

import structlog

from emuhba.srb import (
    DataDirection,
    QueueAction,
    ScsiStatus,
    Srb,
    SrbCompletion,
    SrbFunction,
    SrbStatus,
)
from target import pdu as P
from target.auth import Authenticator, NoAuthenticator
from target.chap import ChapAuthenticator
from target.keys import (
    LoginFailure,
    LoginNegotiator,
    SessionParams,
    Stage,
    TextFormatError,
    encode_text,
    parse_text,
)
from target.portal import TargetNode, TargetPortal

log = structlog.get_logger("emuhba.iscsi")

_bhs_unpack = P.BHS_GRID.unpack_from
_bhs_pack = P.BHS_GRID.pack_into
_getrefcount = sys.getrefcount
_crc = P.crc32c_c
_digest_bytes = P.DIGEST.pack
_digest_at = P.DIGEST.unpack_from

RECV_CHUNK: Final = 1 << 20
MIN_FREE: Final = 64 * 1024
ALL_ONES: Final = 0xFFFFFFFF
# Login PDUs before the first negotiation: RFC 7143 default MaxRecvDataSegmentLength.
LOGIN_MAX_DSL: Final = 8192
# Sense for write data that failed its digest (ABORTED COMMAND / PROTOCOL SERVICE CRC ERROR).
_SENSE_CRC_ERROR: Final = bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x47, 0x05, 0, 0, 0, 0])
# Sense for write data whose DataSN sequence was broken (ABORTED COMMAND / DATA PHASE ERROR).
_SENSE_DATA_PHASE: Final = bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4B, 0x00, 0, 0, 0, 0])
_SENSE_BIDI: Final = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00, 0, 0, 0, 0])
_SENSE_TOO_LONG: Final = _SENSE_BIDI
# Immediate SCSI commands sit outside the CmdSN window; beyond this many in flight a session's
# further ones are answered TASK SET FULL rather than held.
IMMEDIATE_TASKS_MAX: Final = 16
# Per-I/O constants as plain ints and prebuilt members: an enum attribute lookup, an enum
# constructor call or an IntFlag ``&`` costs 0.1-0.8 us each, several times per command.
_OP_SCSI_COMMAND: Final = int(P.Opcode.SCSI_COMMAND)
_OP_DATA_IN: Final = int(P.Opcode.DATA_IN)
_OP_SCSI_RESPONSE: Final = int(P.Opcode.SCSI_RESPONSE)
_COMMAND_COMPLETED: Final = int(P.ScsiResponse.COMMAND_COMPLETED)
_DATAIN_FINAL_STATUS: Final = 0x80 | P.DATAIN_STATUS
_DIR_IN: Final = DataDirection.IN
_DIR_OUT: Final = DataDirection.OUT
_DIR_NONE: Final = DataDirection.NONE
_QUEUE_ACTIONS: Final = tuple(QueueAction(i) for i in range(5))
_SIMPLE: Final = QueueAction.SIMPLE
_SRB_ABORTED: Final = SrbStatus.ABORTED
_EXECUTE_SCSI: Final = SrbFunction.EXECUTE_SCSI
_srb_init: Final = Srb.__init__
_PADS: Final = (b"", b"\0", b"\0\0", b"\0\0\0")
# Text Request continuations (C bit) gathered into one request, at most.
TEXT_REQUEST_MAX: Final = 64 * 1024
# Read buffers of at least READ_POOL_MIN bytes are reused, up to READ_POOL_BYTES per connection.
READ_POOL_MIN: Final = 64 * 1024
READ_POOL_BYTES: Final = 8 << 20


class _RecvBuffer(bytearray):
    """A receive buffer that can be watched: tells the session when its memory is freed."""

    __slots__ = ("__weakref__",)


class ConnState(Enum):
    LOGIN = "login"
    FULL_FEATURE = "full-feature"
    LOGGED_OUT = "logged-out"
    CLOSED = "closed"


_FULL_FEATURE: Final = ConnState.FULL_FEATURE

class ProtocolViolation(Exception):
    """The peer broke the protocol badly enough that the connection must go."""


class Task(Srb):
    """One SCSI command of a session, from acceptance to its response.

    A task is its command's Srb as well, the way SPDK's iscsi_task embeds its scsi_task: one
    object per command instead of two, and the request the port hands back on completion is
    the task itself. The front end owns the fields below; the Srb's belong to the layers under
    it as usual. ``lun`` is the Srb's: the decoded LUN, or 0xFFFF for a LUN field of a form
    this target does not serve (an address no unit answers at)."""

    __slots__ = (
        "aborted",
        "cmdsn",
        "conn",
        "data_fault",
        "deferred",
        "edtl",
        "held",
        "immediate",
        "itt",
        "lun_field",
        "need",
        "next_r2t_offset",
        "parts",
        "r2t_outstanding",
        "r2tsn",
        "read_buf",
        "received",
        "reserved",
        "submitted",
        "unsol_datasn",
        "unsolicited_end",
        "write",
    )

    def __init__(self, conn: Connection, itt: int, lun_field: int, cmdsn: int, edtl: int,
                 immediate: bool, path_id: int, target_id: int, lun: int, cdb: bytes,
                 direction: DataDirection, queue_action: QueueAction, nexus: int) -> None:
        # Bytes of the session's buffer budget this task takes once started: its EDTL when
        # it moves data (also what the Srb expects to move).
        need = edtl if direction is not _DIR_NONE else 0
        # Positional, through a plain function: a class call with keywords costs three times
        # as much as the field stores themselves.
        _srb_init(self, _EXECUTE_SCSI, path_id, target_id, lun, cdb, direction, need, None,
                  itt, queue_action, nexus, conn._scsi_done)
        self.need = need
        self.conn = conn
        self.itt = itt
        self.lun_field = lun_field
        self.cmdsn = cmdsn
        self.edtl = edtl
        self.immediate = immediate
        self.read_buf: bytearray | None = None
        self.write = False
        self.parts: list[tuple[int, memoryview]] = []
        self.received = 0
        self.unsolicited_end = 0
        self.next_r2t_offset = 0
        # ttt -> (offset, length, bytes got, next DataSN)
        self.r2t_outstanding: dict[int, tuple[int, int, int, int]] = {}
        self.unsol_datasn = 0
        self.r2tsn = 0
        self.submitted = False
        self.aborted = False
        # Waiting for room in the session's buffer budget; unsolicited data copied in (held).
        self.deferred = False
        self.held = 0
        # Budget bytes this started task counts against (its EDTL).
        self.reserved = 0
        # Sense to answer with once all data is in, when the data phase went wrong.
        self.data_fault: bytes | None = None


def _no_backend(srb: Srb) -> None:
    raise AssertionError("a discovery session runs no SCSI commands")


class Session:
    """Session-wide state: command numbering, the task set, negotiated parameters."""

    def __init__(self, portal: TargetPortal, tsih: int, isid: bytes, initiator_name: str,
                 node: TargetNode | None, params: SessionParams, exp_cmdsn: int, nexus: int) -> None:
        self.portal = portal
        self.tsih = tsih
        self.isid = isid
        self.initiator_name = initiator_name
        self.node = node
        self.target_name = node.name if node else ""
        self.discovery = node is None
        self.params = params
        self.nexus = nexus
        self.exp_cmdsn = exp_cmdsn
        # Memory budget: data of started tasks (reserved), data copied for waiting commands
        # (held), receive-buffer bytes kept alive beyond the payloads they lent (pinned).
        self.budget = max(1, portal.settings.session_buffer_bytes)
        self.reserved = 0
        self.held = 0
        self.pinned = 0
        self.deferred: deque[Task] = deque()
        self._starting = False
        self.window = self._window_size()
        # What waiting commands can hold when the peer keeps to the protocol: each one its first
        # burst or one data segment. More than that is a flood, and the connection goes.
        self.held_limit = max(2 * self.budget,
                              (self.window + IMMEDIATE_TASKS_MAX) * self._per_command())
        self.max_cmdsn = (exp_cmdsn + self.window - 1) & ALL_ONES
        self.active = 0  # accepted non-immediate commands not yet answered
        self.tasks: dict[int, Task] = {}
        # Non-immediate PDUs that arrived ahead of ExpCmdSN, waiting for the gap to fill; None
        # marks a CmdSN whose command ABORT TASK ended before it arrived.
        self.pending: dict[int, tuple[Connection, tuple[int, ...], memoryview | None,
                                      memoryview] | None] = {}
        self.connections: list[Connection] = []
        self.closed = False
        # Counters (plain ints, read by the metrics exporter at scrape time).
        self.commands = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.tasks_aborted = 0
        # The backend's entry point, looked up once (it is called for every command).
        self.execute: Callable[[Srb], None] = node.backend.execute if node is not None \
            else _no_backend

    def _window_size(self) -> int:
        settings = self.portal.settings
        if self.node is None:
            return 8
        capacity = self.node.backend.queue_capacity(self.node.path_id, self.node.target_id)
        return max(16, min(settings.max_window, capacity, self.budget // self._per_command()))

    def _per_command(self) -> int:
        """Data a command may bring before it starts: immediate data and unsolicited Data-Out,
        or a data segment while it waits out of order."""
        params = self.params
        unsolicited = params.first_burst_length if (params.immediate_data
                                                    or not params.initial_r2t) else 0
        return max(unsolicited, params.target_max_recv_data_segment_length, 1)

    def update_max_cmdsn(self) -> None:
        # The initiator never lowers its MaxCmdSN, so ours only moves forward.
        free = self.window - self.active
        candidate = (self.exp_cmdsn - 1 + (free if free > 0 else 0)) & ALL_ONES
        current = self.max_cmdsn
        # P.serial_lt(current, candidate), written out: this runs for every command.
        if candidate != current and ((candidate - current) & ALL_ONES) < 0x80000000:
            self.max_cmdsn = candidate

    @property
    def buffered_bytes(self) -> int:
        return self.reserved + self.held + self.pinned

    def fits(self, need: int) -> bool:
        """Room to start a task needing ``need`` bytes; with nothing started, anything fits."""
        reserved = self.reserved
        return not need or not reserved or reserved + self.pinned + need <= self.budget

    def release(self, task: Task) -> None:
        """The task no longer holds data: give its bytes back and start whatever now fits."""
        if task.reserved:
            self.reserved -= task.reserved
            task.reserved = 0
        if task.held:
            self.held -= task.held
            task.held = 0
        if self.deferred:
            self.start_deferred()

    def unpin(self, nbytes: int) -> None:
        # Called by the garbage collector's finalizer, at any point: only count.
        self.pinned -= nbytes

    def start_deferred(self) -> None:
        """Start waiting commands in arrival order while they fit and their peers read."""
        if self._starting or self.closed:
            return
        self._starting = True
        try:
            waiting = self.deferred
            while waiting:
                task = waiting[0]
                if task.aborted or not task.deferred or self.tasks.get(task.itt) is not task:
                    waiting.popleft()
                    continue
                conn = task.conn
                if conn.closing:
                    waiting.popleft()
                    conn._abort_local(self, task)
                    continue
                if conn.output_paused or not self.fits(task.need):
                    return
                waiting.popleft()
                conn._launch(task)
                conn._flush_hint()
        finally:
            self._starting = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.portal.sessions.pop(self.tsih, None)
        for task in self.tasks.values():
            task.aborted = True
        self.tasks.clear()
        self.pending.clear()
        self.deferred.clear()
        if self.node is not None:
            self.node.backend.nexus_lost(self.nexus)


_conn_ids = itertools.count(1)


class Connection:
    """One iSCSI connection, target side. Feed it bytes and time; take bytes to send."""

    def __init__(self, portal: TargetPortal, *, local_address: str = "127.0.0.1:3260",
                 peer: str = "?", now: float = 0.0) -> None:
        self.portal = portal
        self.settings = portal.settings
        self.local_address = local_address
        self.peer = peer
        self.id = next(_conn_ids)
        self.state = ConnState.LOGIN
        self.session: Session | None = None
        self.cid = 0
        self.stat_sn = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        self.header_digest = False
        self.data_digest = False
        self.max_send_dsl = LOGIN_MAX_DSL  # the initiator's MaxRecvDataSegmentLength
        self.max_recv_dsl = LOGIN_MAX_DSL  # ours
        self.closing = False
        self.close_reason = ""
        # Output: buffers in order; on_output is poked when output appears outside receive().
        self._out: list[Any] = []
        self.on_output: Callable[[], None] | None = None
        self._in_receive = False
        # Receive buffer.
        self._buf = _RecvBuffer(RECV_CHUNK)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._lent = False  # payload views of _buf are held by tasks
        self._lent_bytes = 0  # how much of _buf tasks hold as their data
        # The peer is not reading our output (the transport's buffer is above its high mark).
        self.output_paused = False
        # LUN field -> LU number, for the few LUNs a connection addresses.
        self._luns: dict[int, int] = {}
        self._one_pdu = 0
        self._read_pool: dict[int, list[bytearray]] = {}
        self._read_pool_bytes = 0
        # Budget bytes of finished tasks whose data still sits in our output list: they count
        # until the adapter takes that output (and the transport's pausing takes over).
        self._unsent = 0
        # Login.
        self._negotiator: LoginNegotiator | None = None
        self._login_stage = Stage.SECURITY
        self._login_text = bytearray()
        self._login_first = True
        self._login_isid = b""
        self._login_tsih = 0
        self._login_itt = 0
        self._login_cmdsn = 0
        self._login_deadline = now + self.settings.login_timeout
        # Text continuation (long SendTargets answers).
        self._text_pending: bytes = b""
        self._text_ttt = ALL_ONES
        self._text_in = bytearray()
        # Liveness.
        self._last_rx = now
        self._ping_ttt = ALL_ONES
        self._ping_deadline = 0.0
        self._ttt_counter = itertools.count(1)
        # The port completes the Srb it was given, and every Srb this connection submits is a
        # Task: the callback takes it as one. Bound once, not per command.
        self._scsi_done: SrbCompletion = self._on_scsi_complete  # type: ignore[assignment]
        # Counters (cheap ints; exported by the metrics work).
        self.pdus_in = 0
        self.pdus_out = 0
        self.rejects = 0
        self.digest_errors = 0

    # ----------------------------------------------------------------- input: bytes and time

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        free = len(self._buf) - self._end
        if free < MIN_FREE:
            self._regrow(MIN_FREE)
        return self._view[self._end:]

    def _regrow(self, need_free: int) -> None:
        pending = self._end - self._start
        size = max(RECV_CHUNK, pending + need_free)
        if not self._lent and size <= len(self._buf):
            # Nobody holds views into this buffer: slide the partial PDU to the front.
            self._buf[0:pending] = self._view[self._start:self._end]
        else:
            new = _RecvBuffer(size)
            new[0:pending] = self._view[self._start:self._end]
            self._view.release()
            old = self._buf
            session = self.session
            if self._lent and session is not None:
                # Views of small payloads keep the whole old buffer alive: count what they keep
                # beyond their own bytes (those count as their tasks' data) until it is freed.
                waste = len(old) - self._lent_bytes
                if waste > 0:
                    session.pinned += waste
                    weakref.finalize(old, session.unpin, waste)
            del old
            self._buf = new
            self._view = memoryview(new)
            self._lent = False
            self._lent_bytes = 0
        self._start = 0
        self._end = pending

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes (copying them in); for tests, fuzzers and non-buffered transports."""
        mv = memoryview(data)
        while mv:
            buf = self.get_buffer(len(mv))
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            mv = mv[n:]
            self.buffer_updated(n)

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self.closing:
            self._start = self._end
            return
        self._in_receive = True
        try:
            self._parse()
        except ProtocolViolation as exc:
            self.close(str(exc))
        except Exception:
            # A fault in handling this connection's input costs this connection only: logged
            # with its traceback, the connection dropped, every other session untouched.
            log.exception("connection input failed", conn=self.id, peer=self.peer)
            self.close("internal error")
        finally:
            self._in_receive = False

    def _parse(self) -> None:
        view = self._view
        dispatch = self._dispatch
        end = self._end
        # PDUs without AHS on a connection without digests: the common case, parsed here.
        while not self.closing and not self.header_digest and not self.data_digest:
            start = self._start
            if end - start < 48:
                return
            words = _bhs_unpack(view, start)
            dsl = words[4]
            if dsl > 0xFFFFFF:
                break  # it has an AHS: the general loop below
            total = 48 + dsl + (-dsl & 3)
            if dsl > self.max_recv_dsl or end - start < total:
                break  # too long, or not all here yet: the general loop deals with it
            self._start = start + total
            self.pdus_in += 1
            dispatch(words, view[start + 48:start + 48 + dsl] if dsl else None,
                     view[start:start + 48], None)
        hdigest = self.header_digest
        ddigest = self.data_digest
        while not self.closing:
            start = self._start
            avail = self._end - start
            if avail < P.BHS_LEN:
                return
            words = _bhs_unpack(view, start)
            ahs_dsl = words[4]
            ahs_len = (ahs_dsl >> 24) * 4
            dsl = ahs_dsl & P.DSL_MASK
            hdr_len = P.BHS_LEN + ahs_len + (4 if hdigest else 0)
            if dsl > self.max_recv_dsl:
                self._reject_raw(view[start:start + P.BHS_LEN], P.RejectReason.PROTOCOL_ERROR)
                raise ProtocolViolation(f"data segment of {dsl} bytes exceeds {self.max_recv_dsl}")
            data_len = dsl + (-dsl & 3) + (4 if ddigest and dsl else 0)
            total = hdr_len + data_len
            if avail < total:
                if len(self._buf) - start < total:
                    self._regrow(total - avail)
                    view = self._view
                return
            if hdigest:
                expect = _digest_at(view, start + hdr_len - 4)[0]
                if _crc(view[start:start + hdr_len - 4]) != expect:
                    self.digest_errors += 1
                    # The length fields cannot be trusted: resynchronising is impossible.
                    raise ProtocolViolation("header digest error")
            data: memoryview | None = None
            if dsl:
                dstart = start + hdr_len
                data = view[dstart:dstart + dsl]
                if ddigest:
                    padded = dsl + (-dsl & 3)
                    expect = _digest_at(view, dstart + padded)[0]
                    if _crc(view[dstart:dstart + padded]) != expect:
                        self.digest_errors += 1
                        self._start = start + total
                        self._data_digest_error(words, view[start:start + P.BHS_LEN])
                        continue
            self._start = start + total
            self.pdus_in += 1
            ahs = view[start + P.BHS_LEN:start + P.BHS_LEN + ahs_len] if ahs_len else None
            self._dispatch(words, data, view[start:start + P.BHS_LEN], ahs)
        # Nothing more to parse while closing.

    def handle_timeout(self, now: float) -> None:
        """Advance time: login timeout, NOP-In pings, dead-peer detection."""
        if self.closing:
            return
        if self.state is ConnState.LOGIN:
            if now >= self._login_deadline:
                self.close("login timed out")
            return
        if self.state is not ConnState.FULL_FEATURE or self.settings.nop_interval <= 0:
            return
        if self._ping_ttt != ALL_ONES:
            if now >= self._ping_deadline:
                self.close("initiator did not answer NOP-In")
            return
        if now - self._last_rx >= self.settings.nop_interval:
            self._ping_ttt = next(self._ttt_counter) & 0x7FFFFFFF or 1
            self._ping_deadline = now + self.settings.nop_timeout
            self._send_nop_in(ALL_ONES, self._ping_ttt, 0, None)
            self._flush_hint()

    def next_deadline(self) -> float | None:
        if self.closing:
            return None
        if self.state is ConnState.LOGIN:
            return self._login_deadline
        if self.state is not ConnState.FULL_FEATURE or self.settings.nop_interval <= 0:
            return None
        if self._ping_ttt != ALL_ONES:
            return self._ping_deadline
        return self._last_rx + self.settings.nop_interval

    def note_activity(self, now: float) -> None:
        self._last_rx = now

    def pause_output(self) -> None:
        """The peer stopped reading: start no more commands on this connection."""
        self.output_paused = True

    def resume_output(self) -> None:
        """Our output drained: commands held for it may start."""
        self.output_paused = False
        session = self.session
        if session is not None and session.deferred and not self.closing:
            session.start_deferred()

    def connection_lost(self) -> None:
        """The transport is gone: end the session (ErrorRecoveryLevel 0)."""
        self.closing = True
        self.state = ConnState.CLOSED
        session = self.session
        if session is not None:
            session.reserved -= self._unsent
            self._unsent = 0
            if self in session.connections:
                session.connections.remove(self)
            if not session.connections:
                session.close()

    # ----------------------------------------------------------------- output

    def data_to_send(self) -> list[Any]:
        out = self._out
        self._out = []
        if self._unsent:
            session = self.session
            if session is not None:
                session.reserved -= self._unsent
            self._unsent = 0
        return out

    def output_written(self) -> None:
        """The adapter handed our output to the transport. Unless that made the transport pause,
        commands held for room in the budget may start now."""
        session = self.session
        if session is not None and session.deferred and not self.output_paused and not self.closing:
            session.start_deferred()

    def has_output(self) -> bool:
        return bool(self._out)

    def close(self, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self.close_reason = reason
            log.info("connection closing", conn=self.id, peer=self.peer, reason=reason)
        self._flush_hint()

    def _flush_hint(self) -> None:
        if not self._in_receive and self.on_output is not None:
            self.on_output()

    def _emit(self, header: bytearray, data: Any = None, dlen: int = 0) -> None:
        """Queue one PDU; ``data`` is bytes-like or a list of pieces totalling ``dlen`` bytes."""
        out = self._out
        out.append(header)
        if self.header_digest:
            out.append(_digest_bytes(_crc(header)))
        if dlen:
            pad = -dlen & 3
            if data.__class__ is list:
                out.extend(data)
                if self.data_digest:
                    crc = P.data_digest(data, dlen)
            else:
                out.append(data)
                if self.data_digest:
                    crc = _crc(data) if not pad else _crc(_PADS[pad], _crc(data))
            if pad:
                out.append(_PADS[pad])
            if self.data_digest:
                out.append(_digest_bytes(crc))
        self.pdus_out += 1

    def _next_stat_sn(self) -> int:
        sn = self.stat_sn
        self.stat_sn = (sn + 1) & ALL_ONES
        return sn

    def _window(self) -> tuple[int, int]:
        s = self.session
        if s is None:
            return (self._login_cmdsn, self._login_cmdsn)
        return (s.exp_cmdsn, s.max_cmdsn)

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self, w: tuple[int, ...], data: memoryview | None, bhs: memoryview,
                  ahs: memoryview | None) -> None:
        opcode = w[0] & 0x3F
        if opcode == _OP_SCSI_COMMAND and self.state is _FULL_FEATURE:
            # The per-I/O case first: a SCSI command in CmdSN order with nothing waiting.
            session = self.session
            assert session is not None
            if data is not None:
                self._lent = True
            if w[0] & 0x40:  # immediate
                self._on_scsi_command(w, data, bhs, ahs, True)
                return
            cmdsn = w[8]
            if cmdsn == session.exp_cmdsn and not session.pending:
                session.exp_cmdsn = (cmdsn + 1) & ALL_ONES
                self._on_scsi_command(w, data, bhs, ahs, False)
                return
        if self.state is ConnState.LOGIN:
            if opcode != P.Opcode.LOGIN_REQUEST:
                raise ProtocolViolation(f"opcode 0x{opcode:02x} before login completed")
            self._on_login(w, data)
            return
        if self.state is not ConnState.FULL_FEATURE:
            return
        if data is not None and opcode != P.Opcode.DATA_OUT and opcode != P.Opcode.SCSI_COMMAND:
            # Text, NOP and login payloads are parsed at once; only SCSI data outlives this call.
            data = memoryview(bytes(data))
        elif data is not None:
            self._lent = True
        if opcode == P.Opcode.DATA_OUT:
            self._on_data_out(w, data, bhs)
            return
        session = self.session
        assert session is not None
        immediate = bool(w[0] & P.IMMEDIATE_BIT)
        if opcode == P.Opcode.SNACK_REQUEST:
            # ErrorRecoveryLevel 0: no SNACK support.
            self._reject(bhs, P.RejectReason.COMMAND_NOT_SUPPORTED)
            return
        if opcode not in P.INITIATOR_OPCODES or opcode == P.Opcode.LOGIN_REQUEST:
            self._reject(bhs, P.RejectReason.COMMAND_NOT_SUPPORTED if opcode not in P.INITIATOR_OPCODES
                         else P.RejectReason.PROTOCOL_ERROR)
            return
        if opcode == P.Opcode.NOP_OUT and w[6] == ALL_ONES:
            # An answer to our NOP-In ping: carries no CmdSN of its own.
            if w[7] == self._ping_ttt:
                self._ping_ttt = ALL_ONES
            return
        cmdsn = w[8]
        if immediate:
            self._execute(opcode, w, data, bhs, ahs, immediate=True)
            return
        if cmdsn == session.exp_cmdsn:
            session.exp_cmdsn = (cmdsn + 1) & ALL_ONES
            if session.pending and cmdsn in session.pending:
                # Aborted before it arrived (ABORT TASK named its CmdSN): counted, never run.
                del session.pending[cmdsn]
            else:
                if opcode != P.Opcode.SCSI_COMMAND:
                    # A command that takes no task slot opens the window at once.
                    session.update_max_cmdsn()
                self._execute(opcode, w, data, bhs, ahs, immediate=False)
            self._drain_pending(session)
        elif (P.serial_lt(session.exp_cmdsn, cmdsn) and P.serial_le(cmdsn, session.max_cmdsn)
              and cmdsn not in session.pending):
            if data is not None:
                # Out of order (another connection's commands are late): a copy, so the receive
                # buffer is not kept alive by it; counted against the session's budget.
                data = self._hold(session, data)
            session.pending[cmdsn] = (self, w, data, memoryview(bytes(bhs)))
        # Outside the window (old duplicate or beyond MaxCmdSN): silently ignored (RFC 7143 4.2.2.1).

    def _drain_pending(self, session: Session) -> None:
        pending = session.pending
        while pending:
            sn = session.exp_cmdsn
            if sn not in pending:
                return
            entry = pending.pop(sn)
            session.exp_cmdsn = (sn + 1) & ALL_ONES
            if entry is None:
                session.update_max_cmdsn()
                continue  # aborted before it could run
            conn, w, data, bhs = entry
            if data is not None:
                session.held -= len(data)
            opcode = w[0] & 0x3F
            if opcode != P.Opcode.SCSI_COMMAND:
                session.update_max_cmdsn()
            if not conn.closing:
                conn._execute(opcode, w, data, bhs, None, immediate=False)

    def _hold(self, session: Session, data: memoryview) -> memoryview:
        """Copy data a waiting command keeps, and count it; too much means a flooding peer."""
        session.held += len(data)
        if session.held > session.held_limit:
            raise ProtocolViolation(
                f"commands waiting to start hold {session.held} bytes of data, more than the "
                f"{session.held_limit} their window and burst lengths allow")
        return memoryview(bytes(data))

    def _execute(self, opcode: int, w: tuple[int, ...], data: memoryview | None, bhs: memoryview,
                 ahs: memoryview | None, *, immediate: bool) -> None:
        if opcode == P.Opcode.SCSI_COMMAND:
            self._on_scsi_command(w, data, bhs, ahs, immediate)
        elif opcode == P.Opcode.NOP_OUT:
            self._on_nop_out(w, data)
        elif opcode == P.Opcode.TASK_MGMT_REQUEST:
            self._on_tmf(w, bhs, immediate)
        elif opcode == P.Opcode.TEXT_REQUEST:
            self._on_text(w, data, bhs)
        elif opcode == P.Opcode.LOGOUT_REQUEST:
            self._on_logout(w, bhs)
        else:
            self._reject(bhs, P.RejectReason.COMMAND_NOT_SUPPORTED)

    # ----------------------------------------------------------------- rejects

    def _reject(self, bhs: memoryview | bytes, reason: P.RejectReason, datasn: int = 0) -> None:
        self._reject_raw(bhs, reason, datasn)

    def _reject_raw(self, bhs: memoryview | bytes, reason: P.RejectReason, datasn: int = 0) -> None:
        self.rejects += 1
        exp, mx = self._window()
        body = bytes(bhs[:P.BHS_LEN])
        header = bytearray(P.BHS_LEN)
        _bhs_pack(header, 0, P.Opcode.REJECT, 0x80, int(reason), 0, len(body), 0,
                  ALL_ONES, 0, self._next_stat_sn(), exp, mx, datasn, 0, 0)
        self._emit(header, body, len(body))
        self._flush_hint()

    def _data_digest_error(self, w: tuple[int, ...], bhs: memoryview) -> None:
        """A data segment failed its CRC: reject the PDU; a SCSI task that lost data fails."""
        opcode = w[0] & 0x3F
        self._reject(bhs, P.RejectReason.DATA_DIGEST_ERROR)
        session = self.session
        if session is None or self.state is not ConnState.FULL_FEATURE:
            raise ProtocolViolation("data digest error during login")
        if opcode == P.Opcode.DATA_OUT:
            task = session.tasks.get(w[6])
            if task is not None and not task.aborted:
                task.data_fault = _SENSE_CRC_ERROR
                length = w[4] & P.DSL_MASK
                # Account the bytes as arrived so the sequence still completes; the task then fails.
                self._account_data(task, w, w[12], length, None, bhs)
        elif (opcode == P.Opcode.SCSI_COMMAND and not (w[0] & P.IMMEDIATE_BIT)
              and w[8] == session.exp_cmdsn):
            # The command is lost; skip its CmdSN so later commands still flow.
            session.exp_cmdsn = (session.exp_cmdsn + 1) & ALL_ONES
            self._drain_pending(session)

    # ----------------------------------------------------------------- login

    def _on_login(self, w: tuple[int, ...], data: memoryview | None) -> None:
        flags = w[1]
        transit = bool(flags & P.LOGIN_TRANSIT)
        cont = bool(flags & P.LOGIN_CONTINUE)
        csg = (flags >> 2) & 3
        nsg = flags & 3
        field8 = w[5]
        isid = (field8 >> 16).to_bytes(6, "big")
        tsih = field8 & 0xFFFF
        itt = w[6]
        cid = w[7] >> 16
        cmdsn = w[8]
        if self._login_first:
            self._login_isid = isid
            self._login_tsih = tsih
            self._login_itt = itt
            self._login_cmdsn = cmdsn
            self.cid = cid
            if w[3] > 0:  # VersionMin above the only version there is
                self._login_reject(2, 5, "unsupported version")
                return
        elif isid != self._login_isid or tsih != self._login_tsih or itt != self._login_itt:
            self._login_reject(2, 0, "login fields changed between PDUs")
            return
        if data is not None:
            self._login_text += data
            if len(self._login_text) > 64 * 1024:
                self._login_reject(2, 0, "login text too long")
                return
        if transit and cont:
            self._login_reject(2, 0, "T and C both set")
            return
        if cont:
            # More text follows: acknowledge with an empty response in the same stage.
            self._login_response(flags=csg << 2, text=b"", tsih=self._login_tsih)
            return
        if csg != self._login_stage and not (self._login_first and csg == Stage.OPERATIONAL):
            self._login_reject(2, 0, f"CSG {csg} does not match stage {int(self._login_stage)}")
            return
        if csg == Stage.FULL_FEATURE or (transit and (nsg == 2 or nsg <= csg)):
            self._login_reject(2, 0, f"invalid stage transition {csg}->{nsg}")
            return
        try:
            pairs = parse_text(bytes(self._login_text))
        except TextFormatError as exc:
            self._login_reject(2, 0, f"malformed login text: {exc}")
            return
        self._login_text = bytearray()
        # CHAP values stay out of the log: a response beside its challenge would let a log
        # reader try secrets offline.
        log.debug("login request", conn=self.id, csg=csg, nsg=nsg, transit=transit,
                  keys=[(k, "(CHAP value)" if k.startswith("CHAP_") else v) for k, v in pairs])
        if self._negotiator is None:
            self._negotiator = LoginNegotiator(
                self.settings.limits, portal_group_tag=self.settings.portal_group_tag,
                authenticator_factory=self._authenticator_for)
        neg = self._negotiator
        first = self._login_first
        self._login_first = False
        self._login_stage = Stage(csg)
        try:
            # NSG means something only with T=1 (where it was checked above); without, it may
            # hold anything, even the reserved stage 2.
            next_stage = Stage(nsg) if transit else Stage(csg)
            step = neg.step(Stage(csg), pairs, first=first, transit=transit, next_stage=next_stage)
            if first:
                extra = self._check_login_target(neg)
                if extra:
                    step.response.extend(extra)
        except LoginFailure as exc:
            self._login_reject(exc.status_class, exc.status_detail, exc.reason)
            return
        response = encode_text(step.response)
        if transit and step.complete:
            out_flags = P.LOGIN_TRANSIT | (csg << 2) | nsg
            if nsg == Stage.FULL_FEATURE:
                try:
                    params = neg.finish()
                    tsih_out = self._enter_full_feature(neg, params)
                except LoginFailure as exc:
                    self._login_reject(exc.status_class, exc.status_detail, exc.reason)
                    return
                self._login_response(flags=out_flags, text=response, tsih=tsih_out)
                self._apply_params(params)
                return
            self._login_stage = Stage(nsg)
            self._login_response(flags=out_flags, text=response, tsih=self._login_tsih)
        else:
            self._login_response(flags=csg << 2, text=response, tsih=self._login_tsih)

    def _authenticator_for(self, method: str) -> Authenticator:
        """The authenticator ``method`` gets for this login, from the credentials of the
        target (or of its ACL entry for this initiator), or of discovery. LookupError when
        the method is not what this login must use: CHAP where credentials are configured,
        None where none are."""
        neg = self._negotiator
        assert neg is not None
        initiator = neg.initiator_name or ""
        if neg.session_type == "Discovery":
            policy = self.settings.discovery_chap
        else:
            node = self._permitted_node(neg)
            policy = node.chap_for(initiator) if node is not None else None
        if method == "CHAP" and policy is not None:
            return ChapAuthenticator(policy, self.portal.challenges)
        if method == "None" and policy is None:
            return NoAuthenticator()
        raise LookupError(f"AuthMethod={method} is not how this login authenticates")

    def _permitted_node(self, neg: LoginNegotiator) -> TargetNode | None:
        """The login's target, if the initiator may log in to it: a target whose ACL leaves
        the initiator out refuses it before any authentication (RFC 7143 status 0202)."""
        node = self.portal.find_node(neg.target_name or "")
        if node is not None and node.access(neg.initiator_name or "") is None:
            raise LoginFailure(2, 2, "initiator not authorized for this target")
        return node

    def _check_login_target(self, neg: LoginNegotiator) -> list[tuple[str, str]]:
        if neg.session_type == "Discovery":
            return []
        name = neg.target_name
        if not name:
            raise LoginFailure(2, 7, "TargetName missing")
        node = self._permitted_node(neg)
        if node is None:
            raise LoginFailure(2, 3, f"no target named {name}")
        if self._login_tsih:
            session = self.portal.sessions.get(self._login_tsih)
            if session is None or session.isid != self._login_isid:
                raise LoginFailure(2, 10, "session to add the connection to does not exist")
        extra: list[tuple[str, str]] = []
        if node.alias:
            extra.append(("TargetAlias", node.alias))
        return extra

    def _enter_full_feature(self, neg: LoginNegotiator, params: SessionParams) -> int:
        portal = self.portal
        initiator = neg.initiator_name or ""
        if neg.session_type == "Discovery":
            node = None
        else:
            node = portal.find_node(neg.target_name or "")
            if node is None:
                raise LoginFailure(2, 3, "target went away during login")
        if self._login_tsih:
            session = portal.sessions.get(self._login_tsih)
            if session is None:
                raise LoginFailure(2, 10, "session does not exist")
            # Connection reinstatement (same CID) replaces the old connection; at
            # ErrorRecoveryLevel 0 its tasks are not carried over.
            for old in list(session.connections):
                if old.cid == self.cid:
                    session.connections.remove(old)
                    old.session = None
                    old.close("connection reinstated")
                    for task in list(session.tasks.values()):
                        if task.conn is old:
                            self._abort_local(session, task)
            if len(session.connections) >= session.params.max_connections:
                raise LoginFailure(2, 6, "too many connections")
        else:
            if node is not None:
                old_session = portal.find_session(initiator, self._login_isid, node.name)
                if old_session is not None:
                    # Session reinstatement: the initiator restarted the I_T nexus.
                    for old in list(old_session.connections):
                        old.session = None
                        old.close("session reinstated")
                    old_session.close()
                limit = self.settings.max_sessions_per_target
                if limit and sum(1 for other in portal.sessions.values()
                                 if other.node is node) >= limit:
                    # RFC 7143 status 0302, out of resources: the initiator may try later.
                    raise LoginFailure(3, 2, f"target has its {limit} sessions already")
            tsih = portal.allocate_tsih()
            nexus = portal.nexus_id(initiator, self._login_isid, node.name) if node else 0
            session = Session(portal, tsih, self._login_isid, initiator, node, params,
                              self._login_cmdsn, nexus)
            portal.sessions[tsih] = session
            if node is not None:
                tpgt = portal.settings.portal_group_tag
                node.backend.nexus_opened(nexus, f"{initiator},i,0x{self._login_isid.hex()}",
                                          f"{node.name},t,0x{tpgt:04x}")
                entry = node.access(initiator)
                if entry is not None and entry.restricted:
                    node.backend.restrict_nexus(nexus, entry.luns, entry.read_only)
        session.connections.append(self)
        self.session = session
        auth = neg.authenticator
        log.info("login complete", conn=self.id, peer=self.peer, initiator=initiator,
                 target=session.target_name or "(discovery)", tsih=session.tsih, cid=self.cid,
                 header_digest=params.header_digest, data_digest=params.data_digest,
                 auth=auth.method if auth is not None else "None",
                 chap=(f"{auth.algorithm_name}{' mutual' if auth.mutual else ''}"
                       if isinstance(auth, ChapAuthenticator) else None))
        return session.tsih

    def _apply_params(self, params: SessionParams) -> None:
        """Switch to full feature phase: new digests apply from the next PDU on."""
        self.state = ConnState.FULL_FEATURE
        self.header_digest = params.header_digest
        self.data_digest = params.data_digest
        self.max_send_dsl = params.max_recv_data_segment_length
        self.max_recv_dsl = params.target_max_recv_data_segment_length
        # Reads up to this size go out as one Data-In (carrying the status when there is no sense).
        self._one_pdu = min(params.max_recv_data_segment_length, params.max_burst_length)
        self._negotiator = None

    def _login_response(self, *, flags: int, text: bytes, tsih: int,
                        status_class: int = 0, status_detail: int = 0) -> None:
        exp = self._login_cmdsn
        if self.session is not None:
            exp, mx = self.session.exp_cmdsn, self.session.max_cmdsn
        else:
            mx = exp
        header = bytearray(P.BHS_LEN)
        field8 = (int.from_bytes(self._login_isid or b"\0" * 6, "big") << 16) | tsih
        _bhs_pack(header, 0, P.Opcode.LOGIN_RESPONSE, flags, 0, 0, len(text), field8,
                  self._login_itt, 0, self._next_stat_sn(), exp, mx,
                  (status_class << 24) | (status_detail << 16), 0, 0)
        self._emit(header, text, len(text))

    def _login_reject(self, status_class: int, status_detail: int, reason: str) -> None:
        log.info("login refused", conn=self.id, peer=self.peer, status_class=status_class,
                 status_detail=status_detail, reason=reason)
        self._login_response(flags=int(self._login_stage) << 2, text=b"", tsih=0,
                             status_class=status_class, status_detail=status_detail)
        self.close(f"login failed: {reason}")

    # ----------------------------------------------------------------- SCSI commands

    def _on_scsi_command(self, w: tuple[int, ...], data: memoryview | None, bhs: memoryview,
                         ahs: memoryview | None, immediate: bool) -> None:
        session = self.session
        assert session is not None
        if session.discovery:
            self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
            return
        node = session.node
        assert node is not None
        itt = w[6]
        edtl = w[7]
        if itt == ALL_ONES or itt in session.tasks:
            self._reject(bhs, P.RejectReason.TASK_IN_PROGRESS if itt in session.tasks
                         else P.RejectReason.INVALID_PDU_FIELD)
            return
        cdb: bytes = bytes(bhs[32:48])
        if ahs is not None:
            cdb = self._extended_cdb(cdb, ahs)
            if not cdb:
                self._reject(bhs, P.RejectReason.INVALID_PDU_FIELD)
                return
        lun_field = w[5]
        lun = self._luns.get(lun_field)
        if lun is None:
            lun = P.decode_lun(lun_field)
            if len(self._luns) < 64:
                self._luns[lun_field] = lun
        flags = w[1]
        read = flags & P.CMD_READ != 0
        write = flags & P.CMD_WRITE != 0
        attr = flags & P.CMD_ATTR_MASK
        task = Task(self, itt, lun_field, w[8], edtl, immediate, node.path_id, node.target_id,
                    lun if lun >= 0 else 0xFFFF, cdb,
                    _DIR_IN if read else (_DIR_OUT if write else _DIR_NONE),
                    _QUEUE_ACTIONS[attr] if attr <= 4 else _SIMPLE, session.nexus)
        session.tasks[itt] = task
        if immediate and len(session.tasks) > session.window + IMMEDIATE_TASKS_MAX:
            # Immediate commands bypass the CmdSN window; this bounds how many a session holds.
            task.cmdsn = -1
            self._respond_status(task, ScsiStatus.TASK_SET_FULL, b"")
            return
        session.commands += 1
        if not immediate:
            session.active += 1
        dlen = len(data) if data is not None else 0
        if dlen and not write:
            self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
            self._finish_task(task)
            return
        if read and write:
            self._respond_check(task, _SENSE_BIDI)
            return
        if edtl > self.settings.max_transfer_bytes:
            self._respond_check(task, _SENSE_TOO_LONG)
            return
        if write and edtl:
            task.write = True
            params = session.params
            if dlen and not params.immediate_data:
                self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
                self._finish_task(task)
                return
            if dlen > min(params.first_burst_length, edtl):
                self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
                self._finish_task(task)
                return
            task.unsolicited_end = dlen if params.initial_r2t else min(params.first_burst_length, edtl)
            task.next_r2t_offset = task.unsolicited_end
        # Wait when others already wait (order is kept), our peer is not reading, or the data
        # would not fit in the session's buffer budget.
        wait = bool(session.deferred) or self.output_paused or not session.fits(task.need)
        if wait:
            task.deferred = True
            session.deferred.append(task)
        if dlen and task.write:
            assert data is not None
            task.received = dlen
            task.parts.append((0, self._keep(session, task, data)))
        if not wait:
            self._launch(task)

    def _keep(self, session: Session, task: Task, data: memoryview) -> memoryview:
        """Write data a task holds until it runs: a waiting task keeps a counted copy (so it
        does not pin the receive buffer); a started one borrows the view."""
        if task.deferred:
            task.held += len(data)
            return self._hold(session, data)
        if data.obj is self._buf:
            self._lent_bytes += len(data)
        return data

    def _launch(self, task: Task) -> None:
        """Give the task its data buffer and send it on its way (R2Ts or execution)."""
        session = self.session
        assert session is not None
        task.deferred = False
        edtl = task.need
        if edtl:
            task.reserved = edtl
            session.reserved += edtl
        if task.held:
            # Its copied unsolicited data now counts as part of the reservation.
            session.held -= task.held
            task.held = 0
        if task.write:
            if task.received >= edtl:
                self._submit(task)
            else:
                self._send_r2ts(task)
            return
        if edtl and task.data_direction is _DIR_IN:
            buf = self._read_buffer(edtl)
            task.read_buf = buf
            task.sg_list = [memoryview(buf)]
        self._submit(task)

    @staticmethod
    def _extended_cdb(cdb: bytes, ahs: memoryview) -> bytes:
        """Append an Extended CDB AHS (type 1) to the 16 bytes in the BHS; b"" when malformed."""
        pos = 0
        extended = cdb
        while pos + 4 <= len(ahs):
            length = int.from_bytes(ahs[pos:pos + 2], "big")
            kind = ahs[pos + 2]
            body = bytes(ahs[pos + 4:pos + 3 + length])
            if kind == 1:
                extended = cdb + body
            elif kind != 2:
                return b""
            pos += 4 + ((length - 1 + 3) & ~3)
        return extended

    def _submit(self, task: Task) -> None:
        session = self.session
        assert session is not None and session.node is not None
        if task.data_fault is not None:
            self._respond_check(task, task.data_fault)
            return
        if task.write:
            parts = task.parts
            if len(parts) == 1:  # all of it as immediate data, or one Data-Out burst
                task.sg_list = [parts[0][1]]
            else:
                if any(parts[i][0] > parts[i + 1][0] for i in range(len(parts) - 1)):
                    parts.sort(key=lambda p: p[0])
                task.sg_list = [mv for _, mv in parts]
            task.parts = []
            session.bytes_written += task.edtl
        task.submitted = True
        session.execute(task)

    def _read_buffer(self, size: int) -> bytearray:
        """A buffer for a read's data. Large ones come from a small per-connection pool: a
        fresh 256 KiB bytearray costs a zero fill and, once glibc returns freed heap to the
        kernel, 64 page faults (200 us measured, against 15 us for the read itself). A pooled
        buffer is free again when nothing but the pool refers to it: the task let it go and
        the transport has sent every Data-In that was a view of it."""
        if size < READ_POOL_MIN:
            return bytearray(size)
        pool = self._read_pool.get(size)
        if pool is None:
            pool = self._read_pool[size] = []
        for i in range(len(pool)):
            buf = pool[i]
            # The pool's reference, this loop's and getrefcount's own: nobody else holds it.
            if _getrefcount(buf) == 3:
                # To the back, so the next search starts at the longest-used buffers.
                del pool[i]
                pool.append(buf)
                return buf
        if self._read_pool_bytes + size <= READ_POOL_BYTES:
            self._read_pool_bytes += size
            buf = bytearray(size)
            pool.append(buf)
            return buf
        return bytearray(size)

    def _on_scsi_complete(self, task: Task) -> None:
        """The completion of every Task this connection submits (the port calls it with the
        Srb it was given, which is the task)."""
        session = self.session
        if session is None or task.aborted or session.tasks.get(task.itt) is not task:
            return
        if task.srb_status == _SRB_ABORTED:
            self._finish_task(task)
            return
        self._send_scsi_result(task)
        self._finish_task(task)
        self._flush_hint()

    def _send_scsi_result(self, task: Task) -> None:
        status = task.scsi_status  # an IntEnum: struct takes it as the int it is
        sense = task.sense
        residual = task.residual
        moved = task.data_transfer_length if task.data_direction is _DIR_IN else 0
        buf = task.read_buf
        session = self.session
        assert session is not None
        session.bytes_read += moved
        datasn = 0
        if buf is not None and moved > 0:
            mv = memoryview(buf)
            mrdsl = self.max_send_dsl
            burst = session.params.max_burst_length
            collapse = not sense
            offset = 0
            pack = _bhs_pack
            itt = task.itt
            one_pdu = moved <= self._one_pdu  # the usual read: one Data-In, with the status
            while offset < moved:
                n = moved - offset
                if not one_pdu:
                    if n > mrdsl:
                        n = mrdsl
                    burst_left = burst - (offset % burst)
                    if n > burst_left:
                        n = burst_left
                end = offset + n
                last = end >= moved
                header = bytearray(P.BHS_LEN)
                if last and collapse:
                    flags = _DATAIN_FINAL_STATUS
                    if residual > 0:
                        flags |= P.DATAIN_UNDERFLOW
                    elif residual < 0:
                        flags |= P.DATAIN_OVERFLOW
                    self._retire(task)
                    exp_cmdsn, max_cmdsn = session.exp_cmdsn, session.max_cmdsn
                    pack(header, 0, _OP_DATA_IN, flags, 0, status, n, 0, itt, ALL_ONES,
                         self._next_stat_sn(), exp_cmdsn, max_cmdsn, datasn, offset,
                         abs(residual))
                else:
                    flags = 0x80 if (last or end % burst == 0) else 0
                    pack(header, 0, _OP_DATA_IN, flags, 0, 0, n, 0,
                         itt, ALL_ONES, self.stat_sn, session.exp_cmdsn, session.max_cmdsn,
                         datasn, offset, 0)
                self._emit(header, mv[offset:end], n)
                datasn += 1
                offset = end
            if collapse:
                return
        self._retire(task)
        header = bytearray(P.BHS_LEN)
        flags = 0x80
        if residual > 0:
            flags |= P.RESP_UNDERFLOW
        elif residual < 0:
            flags |= P.RESP_OVERFLOW
        body = len(sense).to_bytes(2, "big") + sense if sense else b""
        _bhs_pack(header, 0, _OP_SCSI_RESPONSE, flags, _COMMAND_COMPLETED,
                  status, len(body), 0, task.itt, 0, self._next_stat_sn(), session.exp_cmdsn,
                  session.max_cmdsn, datasn, 0, abs(residual))
        self._emit(header, body, len(body))

    def _respond_check(self, task: Task, sense: bytes) -> None:
        """Answer a task with CHECK CONDITION without sending it down (target-level failure)."""
        self._respond_status(task, ScsiStatus.CHECK_CONDITION, sense)

    def _respond_status(self, task: Task, status: ScsiStatus, sense: bytes) -> None:
        task.scsi_status = status
        task.sense = sense
        task.residual = task.edtl
        task.data_transfer_length = 0
        task.read_buf = None
        self._send_scsi_result(task)
        self._finish_task(task)
        self._flush_hint()

    def _retire(self, task: Task) -> None:
        """The task's status is about to go out: free its CmdSN window slot first."""
        session = self.session
        if session is None or task.immediate or task.cmdsn < 0:
            return
        task.cmdsn = -1
        session.active -= 1
        session.update_max_cmdsn()

    def _finish_task(self, task: Task) -> None:
        session = self.session
        if session is None:
            return
        if task.cmdsn >= 0:
            self._retire(task)  # not answered (aborted, a dropped PDU): its slot is free now
        if session.tasks.get(task.itt) is task:
            del session.tasks[task.itt]
        if task.parts:
            task.parts = []
        task.read_buf = None
        if task.reserved and self._out:
            # Its data is in our output: the budget is freed when the adapter takes it.
            self._unsent += task.reserved
            task.reserved = 0
        elif task.reserved or task.held:
            session.release(task)

    # ----------------------------------------------------------------- write data

    def _send_r2ts(self, task: Task) -> None:
        session = self.session
        assert session is not None
        params = session.params
        limit = params.max_outstanding_r2t
        burst = params.max_burst_length
        exp, mx = session.exp_cmdsn, session.max_cmdsn
        while len(task.r2t_outstanding) < limit and task.next_r2t_offset < task.edtl:
            offset = task.next_r2t_offset
            length = min(burst, task.edtl - offset)
            ttt = next(self._ttt_counter) & 0x7FFFFFFF
            task.r2t_outstanding[ttt] = (offset, length, 0, 0)
            task.next_r2t_offset = offset + length
            header = bytearray(P.BHS_LEN)
            _bhs_pack(header, 0, P.Opcode.R2T, 0x80, 0, 0, 0, task.lun_field, task.itt, ttt,
                      self.stat_sn, exp, mx, task.r2tsn, offset, length)
            task.r2tsn += 1
            self._emit(header)

    def _on_data_out(self, w: tuple[int, ...], data: memoryview | None, bhs: memoryview) -> None:
        session = self.session
        assert session is not None
        itt = w[6]
        task = session.tasks.get(itt)
        length = w[4] & P.DSL_MASK
        if task is None or not task.write or task.submitted:
            # A task aborted or already answered: its late data is dropped without fuss.
            if task is None:
                return
            self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
            return
        if task.aborted:
            return
        self._account_data(task, w, w[12], length, data, bhs)

    def _account_data(self, task: Task, w: tuple[int, ...], offset: int, length: int,
                      data: memoryview | None, bhs: memoryview) -> None:
        ttt = w[7]
        final = bool(w[1] & 0x80)
        end = offset + length
        if end > task.edtl:
            self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
            return
        datasn = w[11]
        if ttt == ALL_ONES:
            if end > task.unsolicited_end:
                self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
                return
            expected_sn = task.unsol_datasn
            task.unsol_datasn = datasn + 1
        else:
            r2t = task.r2t_outstanding.get(ttt)
            if r2t is None:
                self._reject(bhs, P.RejectReason.INVALID_PDU_FIELD)
                return
            r_off, r_len, got, expected_sn = r2t
            if offset < r_off or end > r_off + r_len:
                self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
                return
            got += length
            if got >= r_len or final:
                del task.r2t_outstanding[ttt]
            else:
                task.r2t_outstanding[ttt] = (r_off, r_len, got, (datasn + 1) & ALL_ONES)
        if datasn != expected_sn and task.data_fault is None:
            # ErrorRecoveryLevel 0 cannot ask for a missing PDU again: the command fails with
            # sense once its data is in, and the connection carries on.
            task.data_fault = _SENSE_DATA_PHASE
        if data is not None and length:
            session = self.session
            assert session is not None
            task.parts.append((offset, self._keep(session, task, data)))
        task.received += length
        if task.received >= task.edtl:
            if self._write_data_complete(task):
                task.r2t_outstanding.clear()
                if not task.deferred:
                    self._submit(task)
            else:
                self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
                self._abort_local(self.session, task)  # type: ignore[arg-type]
            return
        if ttt != ALL_ONES and ttt not in task.r2t_outstanding:
            self._send_r2ts(task)
            self._flush_hint()

    @staticmethod
    def _write_data_complete(task: Task) -> bool:
        """All of [0, EDTL) arrived exactly once (data may come out of order)."""
        if task.data_fault is not None:
            return True
        parts = sorted(task.parts, key=lambda p: p[0])
        pos = 0
        for off, mv in parts:
            if off != pos:
                return False
            pos += len(mv)
        task.parts = parts
        return pos == task.edtl

    # ----------------------------------------------------------------- task management

    def _abort_local(self, session: Session, task: Task) -> None:
        if session.tasks.get(task.itt) is task:
            session.tasks_aborted += 1
        task.aborted = True
        if session.tasks.get(task.itt) is task:
            del session.tasks[task.itt]
        if not task.immediate and task.cmdsn >= 0:
            task.cmdsn = -1
            session.active -= 1
            session.update_max_cmdsn()
        task.parts = []
        task.deferred = False
        if task.reserved or task.held or session.deferred:
            session.release(task)

    def _on_tmf(self, w: tuple[int, ...], bhs: memoryview, immediate: bool) -> None:
        session = self.session
        assert session is not None
        function = w[1] & 0x7F
        itt = w[6]
        if session.discovery:
            self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
            return
        node = session.node
        assert node is not None
        backend = node.backend
        lun = P.decode_lun(w[5])
        respond = self._tmf_responder(itt)
        lun_scoped = function in (P.TmfFunction.ABORT_TASK, P.TmfFunction.ABORT_TASK_SET,
                                  P.TmfFunction.CLEAR_TASK_SET, P.TmfFunction.LOGICAL_UNIT_RESET,
                                  P.TmfFunction.CLEAR_ACA)
        if lun_scoped and lun not in node.luns():
            respond(P.TmfResponse.LUN_DOES_NOT_EXIST)
            return
        if function == P.TmfFunction.ABORT_TASK:
            rtt = w[7]
            ref_cmdsn = w[10]
            task = session.tasks.get(rtt)
            if task is None or task.lun != lun:
                # Not here: if its CmdSN is still in our window the command may yet come; count it
                # as received (and drop it) so it never runs.
                if task is None and ref_cmdsn in session.pending:
                    entry = session.pending[ref_cmdsn]
                    if entry is not None and entry[2] is not None:
                        session.held -= len(entry[2])
                    session.pending[ref_cmdsn] = None
                    respond(P.TmfResponse.FUNCTION_COMPLETE)
                elif task is None and P.serial_le(session.exp_cmdsn, ref_cmdsn) and \
                        P.serial_lt(ref_cmdsn, w[8]):
                    session.pending[ref_cmdsn] = None
                    respond(P.TmfResponse.FUNCTION_COMPLETE)
                else:
                    respond(P.TmfResponse.TASK_DOES_NOT_EXIST)
                return
            self._abort_task(session, task, lambda ok: respond(P.TmfResponse.FUNCTION_COMPLETE))
        elif function in (P.TmfFunction.ABORT_TASK_SET, P.TmfFunction.CLEAR_TASK_SET):
            for task in [t for t in session.tasks.values() if t.lun == lun]:
                if not task.submitted:
                    self._abort_local(session, task)
                else:
                    task.aborted = True

            def done(ok: bool) -> None:
                self._reap_aborted(session)
                respond(P.TmfResponse.FUNCTION_COMPLETE)

            if function == P.TmfFunction.ABORT_TASK_SET:
                backend.abort_task_set(node.path_id, node.target_id, lun, session.nexus, done)
            else:
                self._abort_other_sessions(node, lun)
                backend.clear_task_set(node.path_id, node.target_id, lun, done)
        elif function == P.TmfFunction.LOGICAL_UNIT_RESET:
            self._abort_all_on(node, lun)

            def after_lun_reset(ok: bool) -> None:
                self._reap_aborted(session)
                respond(P.TmfResponse.FUNCTION_COMPLETE if ok else P.TmfResponse.FUNCTION_REJECTED)

            backend.reset_lun(node.path_id, node.target_id, lun, after_lun_reset)
        elif function in (P.TmfFunction.TARGET_WARM_RESET, P.TmfFunction.TARGET_COLD_RESET):
            self._abort_all_on(node, None)
            cold = function == P.TmfFunction.TARGET_COLD_RESET

            def after_reset(ok: bool) -> None:
                self._reap_aborted(session)
                respond(P.TmfResponse.FUNCTION_COMPLETE if ok else P.TmfResponse.FUNCTION_REJECTED)
                if cold:
                    # A cold reset drops every connection to the target once the answer is out.
                    for other in list(self.portal.sessions.values()):
                        if other.node is node:
                            for conn in list(other.connections):
                                conn.close("target cold reset")

            backend.reset_target(node.path_id, node.target_id, after_reset)
        elif function == P.TmfFunction.TASK_REASSIGN:
            respond(P.TmfResponse.REASSIGNMENT_NOT_SUPPORTED)
        else:
            respond(P.TmfResponse.FUNCTION_NOT_SUPPORTED)

    def _abort_task(self, session: Session, task: Task, done: Callable[[bool], None]) -> None:
        if not task.submitted:
            self._abort_local(session, task)
            done(True)
            return
        task.aborted = True
        node = session.node
        assert node is not None

        def aborted(ok: bool) -> None:
            self._abort_local(session, task)
            done(ok)

        node.backend.abort_task(task, aborted)

    def _abort_all_on(self, node: TargetNode, lun: int | None) -> None:
        """Mark every session's tasks on ``lun`` (or the whole target) aborted before a reset."""
        for session in list(self.portal.sessions.values()):
            if session.node is not node:
                continue
            for task in list(session.tasks.values()):
                if lun is None or task.lun == lun:
                    if task.submitted:
                        task.aborted = True
                    else:
                        task.conn._abort_local(session, task)
            for conn in session.connections:
                if conn is not self:
                    conn._reap_aborted(session)

    def _abort_other_sessions(self, node: TargetNode, lun: int) -> None:
        for session in list(self.portal.sessions.values()):
            if session is self.session or session.node is not node:
                continue
            for task in list(session.tasks.values()):
                if task.lun == lun:
                    task.aborted = True
                    if not task.submitted:
                        task.conn._abort_local(session, task)

    def _reap_aborted(self, session: Session) -> None:
        for task in [t for t in session.tasks.values() if t.aborted]:
            self._abort_local(session, task)
        for conn in session.connections:
            conn._flush_hint()

    def _tmf_responder(self, itt: int) -> Callable[[int], None]:
        def respond(code: int) -> None:
            if self.closing and self.state is ConnState.CLOSED:
                return
            session = self.session
            exp, mx = (session.exp_cmdsn, session.max_cmdsn) if session else self._window()
            header = bytearray(P.BHS_LEN)
            _bhs_pack(header, 0, P.Opcode.TASK_MGMT_RESPONSE, 0x80, int(code), 0, 0, 0, itt, 0,
                      self._next_stat_sn(), exp, mx, 0, 0, 0)
            self._emit(header)
            self._flush_hint()

        return respond

    # ----------------------------------------------------------------- NOP, text, logout

    def _on_nop_out(self, w: tuple[int, ...], data: memoryview | None) -> None:
        if w[7] != ALL_ONES and w[7] == self._ping_ttt:
            self._ping_ttt = ALL_ONES
        self._send_nop_in(w[6], ALL_ONES, w[5], data)

    def _send_nop_in(self, itt: int, ttt: int, lun_field: int, data: memoryview | None) -> None:
        exp, mx = self._window()
        body = bytes(data[: self.max_send_dsl]) if data is not None else b""
        stat_sn = self._next_stat_sn() if itt != ALL_ONES else self.stat_sn
        header = bytearray(P.BHS_LEN)
        _bhs_pack(header, 0, P.Opcode.NOP_IN, 0x80, 0, 0, len(body), lun_field, itt, ttt,
                  stat_sn, exp, mx, 0, 0, 0)
        self._emit(header, body, len(body))

    def send_async_event(self, lun: int, sense: bytes) -> None:
        """Asynchronous Message, AsyncEvent 0: a SCSI asynchronous event, its sense data in the
        data segment. Only on a full-feature connection; it takes a StatSN like any status."""
        if self.state is not ConnState.FULL_FEATURE or self.closing:
            return
        exp, mx = self._window()
        body = len(sense).to_bytes(2, "big") + sense
        header = bytearray(P.BHS_LEN)
        _bhs_pack(header, 0, P.Opcode.ASYNC_MESSAGE, 0x80, 0, 0, len(body), P.encode_lun(lun),
                  ALL_ONES, 0, self._next_stat_sn(), exp, mx,
                  P.AsyncEvent.SCSI_ASYNC_EVENT << 24, 0, 0)
        self._emit(header, body, len(body))
        self._flush_hint()

    def _on_text(self, w: tuple[int, ...], data: memoryview | None, bhs: memoryview) -> None:
        session = self.session
        assert session is not None
        flags = w[1]
        itt = w[6]
        ttt = w[7]
        if ttt != ALL_ONES:
            if ttt != self._text_ttt:
                self._reject(bhs, P.RejectReason.INVALID_PDU_FIELD)
                return
            self._send_text_chunk(itt)
            return
        self._text_pending = b""
        self._text_ttt = ALL_ONES
        if data is not None:
            if len(self._text_in) + len(data) > TEXT_REQUEST_MAX:
                raise ProtocolViolation(f"text request continues beyond {TEXT_REQUEST_MAX} bytes")
            self._text_in += data
        if flags & P.TEXT_CONTINUE:
            self._text_response(itt, b"", final=False, ttt=ALL_ONES)
            return
        raw = bytes(self._text_in)
        self._text_in = bytearray()
        try:
            pairs = parse_text(raw)
        except TextFormatError:
            self._reject(bhs, P.RejectReason.PROTOCOL_ERROR)
            return
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                only = None if session.discovery else session.node
                if not session.discovery and value not in ("All", "") and session.node and \
                        value.lower() != session.node.name.lower():
                    continue
                answer.extend(self.portal.send_targets(value or "All", self.local_address, only,
                                                       session.initiator_name))
            else:
                answer.append((key, "NotUnderstood"))
        self._text_pending = encode_text(answer)
        self._send_text_chunk(itt)

    def _send_text_chunk(self, itt: int) -> None:
        text = self._text_pending
        limit = self.max_send_dsl
        if len(text) > limit:
            # Split on a key boundary where possible so no key=value straddles two PDUs needlessly.
            cut = text.rfind(b"\0", 0, limit) + 1 or limit
            chunk, self._text_pending = text[:cut], text[cut:]
            self._text_ttt = next(self._ttt_counter) & 0x7FFFFFFF or 1
            self._text_response(itt, chunk, final=False, ttt=self._text_ttt)
        else:
            self._text_pending = b""
            self._text_ttt = ALL_ONES
            self._text_response(itt, text, final=True, ttt=ALL_ONES)

    def _text_response(self, itt: int, text: bytes, *, final: bool, ttt: int) -> None:
        exp, mx = self._window()
        header = bytearray(P.BHS_LEN)
        flags = 0x80 if final else P.TEXT_CONTINUE
        _bhs_pack(header, 0, P.Opcode.TEXT_RESPONSE, flags, 0, 0, len(text), 0, itt, ttt,
                  self._next_stat_sn(), exp, mx, 0, 0, 0)
        self._emit(header, text, len(text))

    def _on_logout(self, w: tuple[int, ...], bhs: memoryview) -> None:
        session = self.session
        assert session is not None
        reason = w[1] & 0x7F
        cid = w[7] >> 16
        if reason == P.LogoutReason.REMOVE_FOR_RECOVERY:
            code = P.LogoutResponse.RECOVERY_NOT_SUPPORTED
        elif reason == P.LogoutReason.CLOSE_CONNECTION and cid != self.cid and \
                not any(c.cid == cid for c in session.connections):
            code = P.LogoutResponse.CID_NOT_FOUND
        elif reason > 2:
            self._reject(bhs, P.RejectReason.INVALID_PDU_FIELD)
            return
        else:
            code = P.LogoutResponse.SUCCESS
        exp, mx = self._window()
        header = bytearray(P.BHS_LEN)
        _bhs_pack(header, 0, P.Opcode.LOGOUT_RESPONSE, 0x80, int(code), 0, 0, 0, w[6], 0,
                  self._next_stat_sn(), exp, mx, 0, 0, 0)
        self._emit(header)
        if code == P.LogoutResponse.SUCCESS:
            if reason == P.LogoutReason.CLOSE_CONNECTION and cid != self.cid:
                for other in list(session.connections):
                    if other.cid == cid:
                        other.close("logged out by another connection")
                return
            self.state = ConnState.LOGGED_OUT
            if reason == P.LogoutReason.CLOSE_SESSION:
                for other in list(session.connections):
                    if other is not self:
                        other.close("session logged out")
            self.close("logout")

