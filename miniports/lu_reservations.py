"""Reservations for :class:`~miniports.lu.LogicalUnit` (SPC-4): RESERVE/RELEASE(6/10) and
PERSISTENT RESERVE IN/OUT.

This module adds its commands to the unit's dispatch table (:data:`RESERVATION_COMMANDS`) and
its state and checks through :class:`ReservationsMixin`, whose hooks the unit calls: at
construction, before dispatching each command (a conflict check that costs one attribute test
while nothing is reserved), on resets and when a nexus goes away.

Two reservation methods live side by side, as SPC-4 allows:

* SPC-2 RESERVE/RELEASE: held by one I_T nexus (the front end's nexus id), gone on any reset,
  on nexus loss and on RELEASE. Another nexus may then only run what SPC-2 lets through
  (INQUIRY, REQUEST SENSE, REPORT LUNS, LOG SENSE, ALLOW MEDIUM REMOVAL, RELEASE as a no-op,
  REPORT TARGET PORT GROUPS). CRH is 0: while any persistent registration exists RESERVE and
  RELEASE conflict, and a PERSISTENT RESERVE command from a nexus other than the SPC-2 holder
  conflicts.
* Persistent reservations: registrations are keyed by the I_T nexus's port names (initiator
  port with ISID, target port), not by the front end's nexus id, so they outlive the session
  and every reset but a power-on. ALL_TG_PT registers the initiator port on every target port
  (stored with an empty target port name); SPEC_I_PT registers more initiator ports with the
  issuing one, named by TransportIDs (a name without ISID covers every port of that initiator
  device). With APTPL set, the state goes to a sidecar file next to a file-backed store and
  comes back at the next start; a RAM unit (or a block device) cannot persist through power
  loss and refuses APTPL.

PREEMPT AND ABORT: the unit runs each command to completion before taking the next one from a
nexus, so when it runs no task of a preempted nexus is inside the unit. Tasks still queued
above it (port driver, front end) are not reached from here: they meet the new reservation
when they arrive and conflict, and the preempted nexuses get REGISTRATIONS PREEMPTED.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
from enum import IntEnum
from typing import TYPE_CHECKING, Any, cast

import structlog

from emuhba.scsi import sense as S
from emuhba.scsi.opcodes import Op
from emuhba.scsi.sense import SenseCode
from emuhba.srb import ResetKind, ScsiStatus, Srb, SrbStatus
from miniports.lu_spec import CONTROL, CommandSpec, usage

if TYPE_CHECKING:
    from miniports.lu import LogicalUnit

_log = structlog.get_logger(__name__)

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from


class PrIn(IntEnum):
    """PERSISTENT RESERVE IN service actions."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrOut(IntEnum):
    """PERSISTENT RESERVE OUT service actions."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07


class PrType(IntEnum):
    """Persistent reservation types (the TYPE field)."""

    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8


_VALID_TYPES = frozenset(int(t) for t in PrType)
_ALL_REGISTRANTS = frozenset(
    {PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS}
)
# Registrants only or all registrants: every registered I_T nexus gets through.
_REGISTRANTS_PASS = _ALL_REGISTRANTS | {
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
}
# Types whose non-holders may not even read.
_EXCLUSIVE_ACCESS = frozenset(
    {
        PrType.EXCLUSIVE_ACCESS,
        PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
        PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
    }
)
_LU_SCOPE = 0x0
# PERSISTENT RESERVATION TYPE MASK: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
_TYPE_MASK = 0xEA01
_PROTOCOL_ISCSI = 0x5
_PARAMETER_LIST = 24  # basic PERSISTENT RESERVE OUT parameter list
_MAX_REGISTRATIONS = 1024
_SIDECAR_VERSION = 1

# UNIT ATTENTION and ILLEGAL REQUEST codes of the reservation model (SPC-4 Annex D).
RESERVATIONS_PREEMPTED: SenseCode = S.RESERVATIONS_PREEMPTED
RESERVATIONS_RELEASED: SenseCode = S.RESERVATIONS_RELEASED
REGISTRATIONS_PREEMPTED: SenseCode = S.REGISTRATIONS_PREEMPTED
INVALID_RELEASE: SenseCode = S.INVALID_RELEASE_OF_PERSISTENT_RESERVATION
INSUFFICIENT_REGISTRATION_RESOURCES: SenseCode = S.INSUFFICIENT_REGISTRATION_RESOURCES

# fmt: off
_PRIN_USAGE = usage(Op.PERSISTENT_RESERVE_IN, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, CONTROL)
_PROUT_USAGE = usage(Op.PERSISTENT_RESERVE_OUT, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
                     CONTROL)
RESERVATION_COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(Op.RESERVE_6, None, "RESERVE(6)", usage(0x16, 0x10, 0, 0, 0, CONTROL),
                "_reserve_spc2"),
    CommandSpec(Op.RELEASE_6, None, "RELEASE(6)", usage(0x17, 0x10, 0, 0, 0, CONTROL),
                "_release_spc2"),
    CommandSpec(Op.RESERVE_10, None, "RESERVE(10)",
                usage(0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, CONTROL), "_reserve_spc2"),
    CommandSpec(Op.RELEASE_10, None, "RELEASE(10)",
                usage(0x57, 0x10, 0, 0, 0, 0, 0, 0, 0, CONTROL), "_release_spc2"),
    CommandSpec(Op.PERSISTENT_RESERVE_IN, PrIn.READ_KEYS, "PERSISTENT RESERVE IN(READ KEYS)",
                _PRIN_USAGE, "_persistent_reserve_in"),
    CommandSpec(Op.PERSISTENT_RESERVE_IN, PrIn.READ_RESERVATION,
                "PERSISTENT RESERVE IN(READ RESERVATION)", _PRIN_USAGE,
                "_persistent_reserve_in"),
    CommandSpec(Op.PERSISTENT_RESERVE_IN, PrIn.REPORT_CAPABILITIES,
                "PERSISTENT RESERVE IN(REPORT CAPABILITIES)", _PRIN_USAGE,
                "_persistent_reserve_in"),
    CommandSpec(Op.PERSISTENT_RESERVE_IN, PrIn.READ_FULL_STATUS,
                "PERSISTENT RESERVE IN(READ FULL STATUS)", _PRIN_USAGE,
                "_persistent_reserve_in"),
    *(
        CommandSpec(Op.PERSISTENT_RESERVE_OUT, sa, f"PERSISTENT RESERVE OUT({sa.name})",
                    _PROUT_USAGE, "_persistent_reserve_out")
        for sa in PrOut
    ),
)
# fmt: on
# PERSISTENT RESERVE OUT may write the APTPL sidecar (fsync): keep it off the event loop for
# file-backed units.
RESERVATION_STORE_OPCODES: frozenset[int] = frozenset({Op.PERSISTENT_RESERVE_OUT})

# What another I_T nexus may run while an SPC-2 reservation is held (SPC-2 5.5.1).
_SPC2_ALLOWED = frozenset(
    {Op.INQUIRY, Op.REQUEST_SENSE, Op.REPORT_LUNS, Op.LOG_SENSE, Op.RELEASE_6, Op.RELEASE_10}
)
_SPC2_ALLOWED_MAINTENANCE_IN = frozenset({0x0A})  # REPORT TARGET PORT GROUPS

# Persistent reservation access classes (SPC-4 and SBC-4 tables of commands allowed in the
# presence of various reservations): allowed from any I_T nexus, a read that Write Exclusive
# types let through, or a conflict for every non-holder that the type does not let in.
_PASS, _READS, _CONFLICTS = 0, 1, 2
_PR_ACCESS = [_CONFLICTS] * 256
for _op in (
    Op.TEST_UNIT_READY, Op.REQUEST_SENSE, Op.INQUIRY, Op.LOG_SENSE, Op.READ_CAPACITY_10,
    Op.REPORT_LUNS, Op.PERSISTENT_RESERVE_IN, Op.PERSISTENT_RESERVE_OUT,
    # The RESERVE/RELEASE handlers decide for themselves (CRH=0 rules).
    Op.RESERVE_6, Op.RELEASE_6, Op.RESERVE_10, Op.RELEASE_10,
    0xAB,  # SERVICE ACTION IN(12): READ MEDIA SERIAL NUMBER
):
    _PR_ACCESS[_op] = _PASS
for _op in (
    Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16,
    Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16, Op.PRE_FETCH_10, Op.PRE_FETCH_16,
    0x37, 0xB7,  # READ DEFECT DATA(10/12)
):
    _PR_ACCESS[_op] = _READS
_PR_ACCESS_TABLE = tuple(_PR_ACCESS)
_SA_IN_16_PASS = frozenset({0x10})  # READ CAPACITY(16); GET LBA STATUS & co. read
# MAINTENANCE IN service actions allowed through every type; REPORT SUPPORTED OPERATION CODES
# and REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS conflict (ALLOW COMMANDS 010b).
_MAINTENANCE_IN_PASS = frozenset({0x05, 0x0A, 0x0B, 0x0E, 0x0F})

# An I_T nexus as persistent reservations name it: (initiator port name, target port name).
# A registration made with ALL_TG_PT has an empty target port name.
Port = tuple[str, str]
_ANY_TARGET_PORT = ""


def _candidates(initiator: str, target: str) -> tuple[Port, ...]:
    """The registrations that would cover an I_T nexus, most specific first: its own, its
    initiator port on all target ports, and the same for its initiator device name (what a
    TransportID without ISID registers through SPEC_I_PT)."""
    device = initiator.split(",i,0x", 1)[0]
    if device == initiator:
        return ((initiator, target), (initiator, _ANY_TARGET_PORT))
    return ((initiator, target), (initiator, _ANY_TARGET_PORT), (device, target),
            (device, _ANY_TARGET_PORT))


def _transport_id(initiator_port: str) -> bytes:
    """iSCSI initiator port TransportID (format 01b: name,i,0x<ISID>), NUL-terminated and
    padded to a multiple of four, 24 bytes at least (SPC-4 7.6.4.6)."""
    name = initiator_port.encode("utf-8") + b"\x00"
    name += b"\x00" * (-len(name) % 4)
    if len(name) < 20:
        name += b"\x00" * (20 - len(name))
    fmt = 0x01 if ",i,0x" in initiator_port else 0x00
    return bytes(((fmt << 6) | _PROTOCOL_ISCSI, 0)) + struct.pack(">H", len(name)) + name


def _parse_transport_id(data: bytes) -> tuple[str, int] | None:
    """(initiator port or device name, TransportID length) of an iSCSI TransportID; None when
    it is not one this unit understands."""
    if len(data) < 24 or data[0] & 0x0F != _PROTOCOL_ISCSI or data[0] >> 6 > 1:
        return None
    length = _U16(data, 2)[0]
    if length < 20 or length % 4 or 4 + length > len(data):
        return None
    raw = data[4 : 4 + length].split(b"\x00", 1)[0]
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not name or (data[0] >> 6 == 1) != (",i,0x" in name.lower()):
        return None
    if data[0] >> 6 == 1:
        # The ISID is hexadecimal, case-insensitive: normalise as the front end spells it.
        head, isid = name.rsplit(",i,0x", 1) if ",i,0x" in name else name.rsplit(",I,0X", 1)
        name = f"{head},i,0x{isid.lower()}"
    return name, 4 + length


class ReservationsMixin:
    """Reservation state of one logical unit and the checks every command goes through."""

    @property
    def _lu(self) -> LogicalUnit:
        """This object as the LogicalUnit it always is (the mixin lives nowhere else), so
        handlers here see the unit's own helpers (_fail, _good, _data_out, _store, ...)."""
        return cast("LogicalUnit", self)

    # True while any reservation (SPC-2 or persistent) holds the unit: the per-command check
    # is skipped entirely otherwise.
    _reserved: bool = False

    def _init_reservations(self) -> None:
        self._pr_lock = threading.Lock()
        self._spc2_holder: int | None = None
        # Registered I_T nexus -> reservation key, in registration order (READ KEYS order).
        self._registrations: dict[Port, int] = {}
        # The persistent reservation: its type (0: none) and, unless it is an all registrants
        # type, the registration holding it.
        self._pr_type = 0
        self._pr_holder: Port | None = None
        self._pr_generation = 0
        self._aptpl = False
        self._pr_sidecar = self._sidecar_path()
        self._reserved = False
        self._restore_persistent_state()

    def _sidecar_path(self) -> str | None:
        """Where APTPL state lives: next to a regular image file. A RAM store, or a block
        device (whose directory is /dev), cannot keep it through power loss."""
        path = getattr(self._lu._store, "path", None)
        if not isinstance(path, str):
            return None
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return None
        except OSError:
            return None
        return f"{path}.pr.json"

    # -----------------------------------------------------------------------------------------
    # Hooks
    # -----------------------------------------------------------------------------------------

    def _reservation_conflict(self, srb: Srb, op: int) -> bool:
        """Complete ``srb`` with RESERVATION CONFLICT and return True when a reservation held
        by another nexus forbids ``op``; called only while ``_reserved``."""
        lu = self._lu
        if lu._handlers[op] is None:
            return False  # unsupported: the unit answers INVALID COMMAND OPERATION CODE
        nexus = srb.nexus
        if nexus < 0:
            # The adapter's own requests (emuhba.port.INTERNAL_NEXUS): its bus scans and the
            # cache flush at shutdown must reach the unit whoever holds it.
            return False
        cdb = srb.cdb
        with self._pr_lock:
            holder = self._spc2_holder
            if holder is not None:
                if holder == nexus or op in _SPC2_ALLOWED:
                    return False
                if op == Op.PREVENT_ALLOW and not cdb[4] & 0x03:
                    return False
                if op == Op.MAINTENANCE_IN and cdb[1] & 0x1F in _SPC2_ALLOWED_MAINTENANCE_IN:
                    return False
                self._conflict(srb)
                return True
            pr_type = self._pr_type
            if not pr_type:
                return False
            access = _PR_ACCESS_TABLE[op]
            if access == _CONFLICTS:
                access = self._refine_access(op, cdb)
            if access == _PASS:
                return False
            registration = self._registration_of(nexus)
            if registration is not None and (
                pr_type in _REGISTRANTS_PASS or registration == self._pr_holder
            ):
                return False
            if access == _READS and pr_type not in _EXCLUSIVE_ACCESS:
                return False
        self._conflict(srb)
        return True

    @staticmethod
    def _refine_access(op: int, cdb: bytes | bytearray | memoryview) -> int:
        """The access class of the commands whose class depends on their CDB."""
        if op == Op.PREVENT_ALLOW:
            return _CONFLICTS if cdb[4] & 0x03 else _PASS
        if op == Op.START_STOP_UNIT:
            # Starting the unit (no power condition, no eject) cannot hurt the holder.
            return _PASS if cdb[4] & 0xF3 == 0x01 else _CONFLICTS
        if op == Op.SERVICE_ACTION_IN_16:
            return _PASS if cdb[1] & 0x1F in _SA_IN_16_PASS else _READS
        if op == Op.MAINTENANCE_IN:
            return _PASS if cdb[1] & 0x1F in _MAINTENANCE_IN_PASS else _CONFLICTS
        return _CONFLICTS

    def _reservations_reset(self, kind: ResetKind) -> None:
        """A reset: SPC-2 reservations are released; persistent ones survive all but a
        power-on, after which only what APTPL saved comes back."""
        with self._pr_lock:
            self._spc2_holder = None
            if kind is ResetKind.POWER_ON:
                self._registrations.clear()
                self._pr_type = 0
                self._pr_holder = None
                self._pr_generation = 0
                self._aptpl = False
                self._restore_persistent_state()
            self._update_reserved()

    def _reservations_nexus_gone(self, nexus: int) -> None:
        """The nexus ended (session closed): release what SPC-2 reservation it held."""
        with self._pr_lock:
            if self._spc2_holder == nexus:
                self._spc2_holder = None
                self._update_reserved()

    # -----------------------------------------------------------------------------------------
    # Helpers (callers hold _pr_lock unless said otherwise)
    # -----------------------------------------------------------------------------------------

    def _update_reserved(self) -> None:
        self._reserved = self._spc2_holder is not None or self._pr_type != 0

    @staticmethod
    def _conflict(srb: Srb) -> None:
        srb.scsi_status = ScsiStatus.RESERVATION_CONFLICT
        srb.srb_status = SrbStatus.ERROR
        srb.sense = b""
        srb.residual = srb.data_transfer_length
        srb.data_transfer_length = 0

    def _port_of(self, nexus: int) -> Port:
        ports = self._lu.nexus_ports(nexus)
        if ports is not None:
            return ports
        # A nexus the front end never named (unit tests, internal callers): a stable stand-in.
        return (f"emuhba.nexus-{nexus},i,0x{nexus & 0xFFFFFFFFFFFF:012x}", "emuhba.target,t,0x0001")

    def _registration_of(self, nexus: int) -> Port | None:
        registrations = self._registrations
        for candidate in _candidates(*self._port_of(nexus)):
            if candidate in registrations:
                return candidate
        return None

    def _holds(self, registration: Port | None) -> bool:
        if registration is None or not self._pr_type:
            return False
        return self._pr_type in _ALL_REGISTRANTS or registration == self._pr_holder

    def _nexuses_of(self, registrations: set[Port] | None, except_nexus: int) -> list[int]:
        """Known nexuses behind ``registrations`` (None: every registered one)."""
        wanted = set(self._registrations) if registrations is None else registrations
        lu = self._lu
        with lu._lock:
            known = list(lu._pending)  # every nexus the unit has seen
        found: list[int] = []
        for nexus in known:
            if nexus == except_nexus:
                continue
            if any(c in wanted for c in _candidates(*self._port_of(nexus))):
                found.append(nexus)
        return found

    def _notify(self, code: SenseCode, nexuses: list[int]) -> None:
        for nexus in nexuses:
            self._lu.establish_unit_attention(code, nexus=nexus)

    def _release_persistent(self) -> None:
        self._pr_type = 0
        self._pr_holder = None
        self._update_reserved()

    # -----------------------------------------------------------------------------------------
    # RESERVE / RELEASE (6) and (10)
    # -----------------------------------------------------------------------------------------

    def _reserve_spc2(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        if cdb[1] & 0x10:
            # Third-party reservations (SPC-2) are obsolete and not supported.
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)
            return
        with self._pr_lock:
            holder = self._spc2_holder
            if self._registrations or self._pr_type or (
                holder is not None and holder != srb.nexus
            ):
                self._conflict(srb)
                return
            self._spc2_holder = srb.nexus
            self._update_reserved()
        lu._good(srb, 0, 0)

    def _release_spc2(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        if cdb[1] & 0x10:
            lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=1, bit_pointer=4)
            return
        with self._pr_lock:
            if self._registrations or self._pr_type:
                self._conflict(srb)
                return
            # From any other nexus, RELEASE succeeds and changes nothing.
            if self._spc2_holder == srb.nexus:
                self._spc2_holder = None
                self._update_reserved()
        lu._good(srb, 0, 0)

    # -----------------------------------------------------------------------------------------
    # PERSISTENT RESERVE IN
    # -----------------------------------------------------------------------------------------

    def _persistent_reserve_in(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        action = cdb[1] & 0x1F
        allocation = _U16(cdb, 7)[0]
        with self._pr_lock:
            generation = struct.pack(">I", self._pr_generation)
            if action == PrIn.READ_KEYS:
                keys = b"".join(struct.pack(">Q", k) for k in self._registrations.values())
                data = generation + struct.pack(">I", len(keys)) + keys
            elif action == PrIn.READ_RESERVATION:
                if self._pr_type:
                    key = 0
                    if self._pr_type not in _ALL_REGISTRANTS and self._pr_holder is not None:
                        key = self._registrations.get(self._pr_holder, 0)
                    body = struct.pack(">Q4xxBxx", key, (_LU_SCOPE << 4) | self._pr_type)
                else:
                    body = b""
                data = generation + struct.pack(">I", len(body)) + body
            elif action == PrIn.REPORT_CAPABILITIES:
                data = self._report_capabilities()
            else:
                data = generation + self._full_status()
        lu._data_in(srb, data, allocation)

    def _report_capabilities(self) -> bytes:
        ptpl_c = 0x01 if self._pr_sidecar is not None else 0x00
        # CRH 0, SIP_C 1, ATP_C 1; TMV 1 with ALLOW COMMANDS 010b: TEST UNIT READY passes every
        # type, MODE SENSE & co. do not pass Write Exclusive.
        flags2 = 0x08 | 0x04 | ptpl_c
        flags3 = 0x80 | (0b010 << 4) | (0x01 if self._aptpl else 0x00)
        return struct.pack(">HBBH2x", 8, flags2, flags3, _TYPE_MASK)

    def _full_status(self) -> bytes:
        lu = self._lu
        parts: list[bytes] = []
        for registration, key in self._registrations.items():
            initiator, target = registration
            all_tg_pt = target == _ANY_TARGET_PORT
            holder = self._holds(registration)
            tid = _transport_id(initiator)
            parts.append(
                struct.pack(
                    ">Q4xBB4xHI",
                    key,
                    (0x02 if all_tg_pt else 0) | (0x01 if holder else 0),
                    ((_LU_SCOPE << 4) | self._pr_type) if holder else 0,
                    0 if all_tg_pt else lu._relative_port_id,
                    len(tid),
                )
                + tid
            )
        body = b"".join(parts)
        return struct.pack(">I", len(body)) + body

    # -----------------------------------------------------------------------------------------
    # PERSISTENT RESERVE OUT
    # -----------------------------------------------------------------------------------------

    def _persistent_reserve_out(self, srb: Srb, cdb: bytes) -> None:
        lu = self._lu
        action = cdb[1] & 0x1F
        length = _U32(cdb, 5)[0]
        move = action == PrOut.REGISTER_AND_MOVE
        data = lu._data_out(srb, length)
        if length < _PARAMETER_LIST or len(data) < length:
            lu._fail(srb, S.PARAMETER_LIST_LENGTH_ERROR)
            return
        flags = data[17] if move else data[20]
        specified: list[str] | None = None
        if not move and flags & 0x08:
            # SPEC_I_PT: more initiator ports, as TransportIDs after the basic 24 bytes.
            if action != PrOut.REGISTER:
                lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=20, bit_pointer=3,
                         cd=False)
                return
            if length < _PARAMETER_LIST + 4 or _U32(data, 24)[0] + 28 != length:
                lu._fail(srb, S.PARAMETER_LIST_LENGTH_ERROR)
                return
            specified = []
            pos = 28
            while pos < length:
                parsed = _parse_transport_id(data[pos:])
                if parsed is None:
                    lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=pos, cd=False)
                    return
                specified.append(parsed[0])
                pos += parsed[1]
        elif not move and length != _PARAMETER_LIST:
            lu._fail(srb, S.PARAMETER_LIST_LENGTH_ERROR)
            return
        scope, pr_type = cdb[2] >> 4, cdb[2] & 0x0F
        if action in (PrOut.RESERVE, PrOut.RELEASE, PrOut.PREEMPT, PrOut.PREEMPT_AND_ABORT,
                      PrOut.REGISTER_AND_MOVE):
            if scope != _LU_SCOPE:
                lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=7)
                return
            if pr_type not in _VALID_TYPES:
                lu._fail(srb, S.INVALID_FIELD_IN_CDB, field_pointer=2, bit_pointer=3)
                return
        key, sa_key = struct.unpack_from(">QQ", data, 0)
        registering = move or action in (PrOut.REGISTER, PrOut.REGISTER_AND_IGNORE_EXISTING_KEY)
        if registering and flags & 0x01 and self._pr_sidecar is None:
            # APTPL on a unit that loses everything with power (PTPL_C 0).
            lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=17 if move else 20,
                     bit_pointer=0, cd=False)
            return
        with self._pr_lock:
            saved = self._snapshot()
            outcome = self._pr_out_locked(srb, action, pr_type, key, sa_key, flags, data,
                                          specified)
            if outcome is None:
                return  # completed with an error or a conflict; nothing changed
            changed, notices = outcome
            if changed:
                self._pr_generation = (self._pr_generation + 1) & 0xFFFFFFFF
            if registering:
                self._aptpl = bool(flags & 0x01)
            self._update_reserved()
            if self._snapshot() != saved and not self._persist():
                self._restore_snapshot(saved)
                lu._fail(srb, INSUFFICIENT_REGISTRATION_RESOURCES)
                return
            for code, nexuses in notices:
                self._notify(code, nexuses)
        lu._good(srb, len(data), length)

    def _pr_out_locked(
        self, srb: Srb, action: int, pr_type: int, key: int, sa_key: int, flags: int,
        data: bytes, specified: list[str] | None,
    ) -> tuple[bool, list[tuple[SenseCode, list[int]]]] | None:
        """Apply one PERSISTENT RESERVE OUT; (PRgeneration moves, unit attentions to raise) or
        None when ``srb`` was completed with an error."""
        lu = self._lu
        nexus = srb.nexus
        mine = self._registration_of(nexus)
        notices: list[tuple[SenseCode, list[int]]] = []

        if action in (PrOut.REGISTER, PrOut.REGISTER_AND_IGNORE_EXISTING_KEY):
            ignore = action == PrOut.REGISTER_AND_IGNORE_EXISTING_KEY
            if mine is None:
                if not ignore and key != 0:
                    self._conflict(srb)
                    return None
                if sa_key == 0:
                    return False, notices  # unregistering what is not registered: no effect
                initiator, target = self._port_of(nexus)
                target = _ANY_TARGET_PORT if flags & 0x04 else target
                new = [(initiator, target)]
                for name in specified or ():
                    port = (name, target)
                    if port in new:
                        continue
                    if any(c in self._registrations for c in _candidates(*port)):
                        # SPEC_I_PT naming an I_T nexus that is registered already.
                        lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=28,
                                 cd=False)
                        return None
                    new.append(port)
                if len(self._registrations) + len(new) > _MAX_REGISTRATIONS:
                    lu._fail(srb, INSUFFICIENT_REGISTRATION_RESOURCES)
                    return None
                for port in new:
                    self._registrations[port] = sa_key
                return True, notices
            if specified is not None:
                # SPEC_I_PT from a registered I_T nexus.
                lu._fail(srb, S.INVALID_FIELD_IN_CDB)
                return None
            if not ignore and key != self._registrations[mine]:
                self._conflict(srb)
                return None
            if sa_key != 0:
                self._registrations[mine] = sa_key
                return True, notices
            notices.extend(self._unregister(mine, nexus))
            return True, notices

        if mine is None or key != self._registrations[mine]:
            self._conflict(srb)
            return None

        if action == PrOut.RESERVE:
            if self._pr_type:
                if self._holds(mine) and self._pr_type == pr_type:
                    return False, notices
                self._conflict(srb)
                return None
            self._pr_type = pr_type
            self._pr_holder = None if pr_type in _ALL_REGISTRANTS else mine
            return False, notices

        if action == PrOut.RELEASE:
            if not self._holds(mine):
                return False, notices  # no reservation, or held by another: no effect
            if pr_type != self._pr_type:
                lu._fail(srb, INVALID_RELEASE)
                return None
            released = self._pr_type
            self._release_persistent()
            if released in _REGISTRANTS_PASS:
                notices.append((RESERVATIONS_RELEASED, self._nexuses_of(None, nexus)))
            return False, notices

        if action == PrOut.CLEAR:
            notices.append((RESERVATIONS_PREEMPTED, self._nexuses_of(None, nexus)))
            self._registrations.clear()
            self._release_persistent()
            return True, notices

        if action in (PrOut.PREEMPT, PrOut.PREEMPT_AND_ABORT):
            return self._preempt(srb, mine, pr_type, sa_key)

        return self._register_and_move(srb, mine, sa_key, flags, data)

    def _unregister(self, registration: Port, nexus: int) -> list[tuple[SenseCode, list[int]]]:
        """Drop ``registration``; a reservation it held goes with it (an all registrants one
        only with the last registrant)."""
        notices: list[tuple[SenseCode, list[int]]] = []
        holder = self._holds(registration)
        del self._registrations[registration]
        if not holder:
            return notices
        if self._pr_type in _ALL_REGISTRANTS:
            if not self._registrations:
                self._release_persistent()
            return notices
        released = self._pr_type
        self._release_persistent()
        if released in _REGISTRANTS_PASS:
            notices.append((RESERVATIONS_RELEASED, self._nexuses_of(None, nexus)))
        return notices

    def _preempt(
        self, srb: Srb, mine: Port, pr_type: int, sa_key: int
    ) -> tuple[bool, list[tuple[SenseCode, list[int]]]] | None:
        lu = self._lu
        nexus = srb.nexus
        notices: list[tuple[SenseCode, list[int]]] = []
        all_registrants = self._pr_type in _ALL_REGISTRANTS
        if all_registrants and sa_key == 0:
            # Preempting an all registrants reservation: everyone else goes, the preemptor
            # takes a new reservation of the requested type.
            gone = {r for r in self._registrations if r != mine}
            notices.append((REGISTRATIONS_PREEMPTED, self._nexuses_of(gone, nexus)))
            for registration in gone:
                del self._registrations[registration]
            self._pr_type = pr_type
            self._pr_holder = None if pr_type in _ALL_REGISTRANTS else mine
            return True, notices
        holder_key = (
            self._registrations.get(self._pr_holder)
            if self._pr_type and not all_registrants and self._pr_holder is not None
            else None
        )
        if holder_key is None or sa_key != holder_key:
            # No reservation to take (or not the holder's key): only registrations go.
            if sa_key == 0:
                lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=8, cd=False)
                return None
            gone = {r for r, k in self._registrations.items() if k == sa_key}
            if not gone:
                self._conflict(srb)
                return None
            notices.append((REGISTRATIONS_PREEMPTED, self._nexuses_of(gone - {mine}, nexus)))
            for registration in gone:
                notices.extend(self._unregister(registration, nexus))
            return True, notices
        # The holder's key: its registrations go (the preemptor's own stays) and the preemptor
        # holds a reservation of the requested type.
        old_type = self._pr_type
        gone = {r for r, k in self._registrations.items() if k == sa_key and r != mine}
        notices.append((REGISTRATIONS_PREEMPTED, self._nexuses_of(gone, nexus)))
        for registration in gone:
            del self._registrations[registration]
        self._pr_type = pr_type
        self._pr_holder = None if pr_type in _ALL_REGISTRANTS else mine
        if old_type != pr_type:
            remaining = set(self._registrations) - {mine}
            notices.append((RESERVATIONS_RELEASED, self._nexuses_of(remaining, nexus)))
        return True, notices

    def _register_and_move(
        self, srb: Srb, mine: Port, sa_key: int, flags: int, data: bytes
    ) -> tuple[bool, list[tuple[SenseCode, list[int]]]] | None:
        lu = self._lu
        if not self._pr_type or self._pr_type in _ALL_REGISTRANTS or self._pr_holder != mine:
            self._conflict(srb)
            return None
        if sa_key == 0:
            lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=8, cd=False)
            return None
        relative_port = _U16(data, 18)[0]
        if relative_port != lu._relative_port_id:
            lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=18, cd=False)
            return None
        tid_length = _U32(data, 20)[0]
        parsed = _parse_transport_id(data[24 : 24 + tid_length])
        if tid_length + 24 > len(data) or parsed is None:
            lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=24, cd=False)
            return None
        name = parsed[0]
        target = self._port_of(srb.nexus)[1]
        if ",i,0x" not in name:
            # An initiator device name: the port it has on this target port, if one is known.
            for initiator, t in list(self._lu._nexus_ports.values()):
                if t == target and initiator.split(",i,0x", 1)[0] == name:
                    name = initiator
                    break
        destination = (name, target)
        if destination == mine or (name, _ANY_TARGET_PORT) == mine:
            lu._fail(srb, S.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=24, cd=False)
            return None
        if (name, _ANY_TARGET_PORT) in self._registrations:
            destination = (name, _ANY_TARGET_PORT)
        elif destination not in self._registrations and (
            len(self._registrations) >= _MAX_REGISTRATIONS
        ):
            lu._fail(srb, INSUFFICIENT_REGISTRATION_RESOURCES)
            return None
        self._registrations[destination] = sa_key
        self._pr_holder = destination
        if flags & 0x02:  # UNREG: the source gives up its registration too
            del self._registrations[mine]
        return True, []

    # -----------------------------------------------------------------------------------------
    # APTPL: persistence through power loss
    # -----------------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[dict[Port, int], int, Port | None, int, bool]:
        return (dict(self._registrations), self._pr_type, self._pr_holder, self._pr_generation,
                self._aptpl)

    def _restore_snapshot(
        self, saved: tuple[dict[Port, int], int, Port | None, int, bool]
    ) -> None:
        registrations, self._pr_type, self._pr_holder, self._pr_generation, self._aptpl = saved
        self._registrations = registrations
        self._update_reserved()

    def _persist(self) -> bool:
        """Write (or, without APTPL, remove) the sidecar; False when the file system refused."""
        path = self._pr_sidecar
        if path is None:
            return True
        try:
            if not self._aptpl:
                if os.path.exists(path):
                    os.unlink(path)
                return True
            state: dict[str, Any] = {
                "version": _SIDECAR_VERSION,
                "generation": self._pr_generation,
                "registrations": [
                    {"initiator": i, "target": t, "key": k}
                    for (i, t), k in self._registrations.items()
                ],
                "type": self._pr_type,
                "holder": list(self._pr_holder) if self._pr_holder is not None else None,
            }
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            _log.error("pr_state_not_persisted", path=path, error=str(exc))
            return False
        return True

    def _restore_persistent_state(self) -> None:
        path = self._pr_sidecar
        if path is None or not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as handle:
                state = json.load(handle)
            if state.get("version") != _SIDECAR_VERSION:
                raise ValueError(f"unknown sidecar version {state.get('version')!r}")
            registrations: dict[Port, int] = {}
            for entry in state["registrations"]:
                key = int(entry["key"])
                if not 0 < key < 1 << 64:
                    raise ValueError(f"bad reservation key {key}")
                registrations[(str(entry["initiator"]), str(entry["target"]))] = key
            pr_type = int(state["type"])
            holder_raw = state["holder"]
            holder: Port | None = (
                (str(holder_raw[0]), str(holder_raw[1])) if holder_raw is not None else None
            )
            if pr_type and (
                pr_type not in _VALID_TYPES
                or (pr_type in _ALL_REGISTRANTS) != (holder is None)
                or (holder is not None and holder not in registrations)
            ):
                raise ValueError("inconsistent reservation")
            generation = int(state["generation"]) & 0xFFFFFFFF
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            _log.error("pr_state_not_restored", path=path, error=str(exc))
            return
        self._registrations = registrations
        self._pr_type = pr_type
        self._pr_holder = holder if pr_type else None
        self._pr_generation = generation
        self._aptpl = True
        self._update_reserved()
