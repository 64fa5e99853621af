"""The host bus adapter as the iSCSI front end sees it (``target.backend.ScsiBackend``).

The facade owns a port driver and its miniport. It decodes each CDB, hands the SRB to the port,
and on the way back turns SRB-level outcomes into SCSI ones, so that the front end only ever has
to send ``scsi_status``/``sense``/``residual`` (or nothing, for an aborted task):

* a unit that is not there answers as SPC-4 asks of an "incorrect logical unit": INQUIRY with
  peripheral qualifier 011b, REPORT LUNS from the bus scan, REQUEST SENSE with GOOD status and
  LOGICAL UNIT NOT SUPPORTED as its data, anything else CHECK CONDITION 05/25/00;
* aborted, flushed or bus-reset requests come back with ``srb_status`` ABORTED and
  ``scsi_status`` TASK ABORTED; the front end sends no response for them;
* a failure without SCSI status (firmware fault, time-out, link down) becomes CHECK CONDITION
  with a sense code that says so; device status and sense pass through untouched.

``model`` picks the port driver's model ("storport" or "scsiport"); nothing here depends on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final

import structlog

from emuhba.miniport import Miniport
from emuhba.port import (
    DEFAULT_RECOVERY_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    PortDriver,
    synchronize_cache_cdb,
)
from emuhba.scsi import sense as _sense
from emuhba.scsi.cdb import decode_into, encode_lun
from emuhba.scsi.opcodes import (
    ASC_LU_NOT_READY_CAUSE_NOT_REPORTABLE,
    Op,
    SenseKey,
)
from emuhba.scsi.sense import SenseCode, build_sense
from emuhba.srb import ScsiStatus, Srb, SrbStatus

TmfDone = Callable[[bool], None]

log = structlog.get_logger("emuhba.hba")

_ABSENT: Final = frozenset(
    {SrbStatus.INVALID_LUN, SrbStatus.NO_DEVICE, SrbStatus.SELECTION_TIMEOUT,
     SrbStatus.INVALID_TARGET_ID, SrbStatus.INVALID_PATH_ID}
)
_ABORTED_LIKE: Final = frozenset(
    {SrbStatus.ABORTED, SrbStatus.BUS_RESET, SrbStatus.REQUEST_FLUSHED}
)
_DONE_OK: Final = frozenset({SrbStatus.SUCCESS, SrbStatus.DATA_OVERRUN})

NOT_READY_CAUSE_NOT_REPORTABLE: Final = SenseCode.of(
    SenseKey.NOT_READY, ASC_LU_NOT_READY_CAUSE_NOT_REPORTABLE)
# SPC-4 3Eh/02h. With ABORTED COMMAND the initiator retries the command.
TIMEOUT_ON_LOGICAL_UNIT: Final = SenseCode.of(SenseKey.ABORTED_COMMAND, (0x3E, 0x02))
# SRB outcomes without SCSI status, as the initiator should read them. Link down answers
# "becoming ready" because initiators retry that one (Linux fails 04/00 at once).
_FAILURE_SENSE: Final[dict[SrbStatus, SenseCode]] = {
    SrbStatus.LINK_DOWN: _sense.NOT_READY_BECOMING_READY,
    SrbStatus.NOT_POWERED: NOT_READY_CAUSE_NOT_REPORTABLE,
    SrbStatus.INVALID_REQUEST: _sense.INVALID_OPCODE,
    SrbStatus.BAD_FUNCTION: _sense.INVALID_OPCODE,
    SrbStatus.TIMEOUT: TIMEOUT_ON_LOGICAL_UNIT,
    SrbStatus.COMMAND_TIMEOUT: TIMEOUT_ON_LOGICAL_UNIT,
}

# Commands that change the medium: refused for a nexus mapped read-only.
_MEDIUM_WRITES: Final = frozenset({
    Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16, Op.WRITE_VERIFY_10, Op.WRITE_VERIFY_12,
    Op.WRITE_VERIFY_16, Op.WRITE_SAME_10, Op.WRITE_SAME_16, Op.UNMAP, Op.COMPARE_AND_WRITE,
    Op.ORWRITE_16, Op.WRITE_ATOMIC_16, Op.SANITIZE, Op.EXTENDED_COPY, Op.FORMAT_UNIT,
    Op.WRITE_BUFFER,
})


class NexusView:
    """What one I_T nexus may see and do (an ACL entry's LUN masking and read-only mapping)."""

    __slots__ = ("luns", "read_only")

    def __init__(self, luns: frozenset[int] | None, read_only: bool) -> None:
        self.luns = luns
        self.read_only = read_only


# Standard INQUIRY data of an absent unit: peripheral qualifier 011b, device type 1Fh.
_NO_UNIT_PERIPHERAL: Final = (0b011 << 5) | 0x1F
_VERSION_SPC4: Final = 0x06
_VENDOR: Final = b"EMUHBA  "
_PRODUCT: Final = b"NO LOGICAL UNIT "
_REVISION: Final = b"0001"


class Hba:
    """One emulated adapter: ``start`` it, then ``execute`` SRBs and run task management.

    ``model``, ``request_timeout`` and ``recovery_timeout`` go to the :class:`PortDriver`."""

    def __init__(self, miniport: Miniport, *, name: str = "hba0",
                 loop: asyncio.AbstractEventLoop | None = None,
                 stop_timeout: float = 5.0, tmf_timeout: float = 30.0,
                 model: str = "storport",
                 request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                 recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT) -> None:
        self.name = name
        self.stop_timeout = stop_timeout
        self.tmf_timeout = tmf_timeout
        self._miniport = miniport
        self._port = PortDriver(miniport, loop=loop, finisher=self._finish, model=model,
                                request_timeout=request_timeout,
                                recovery_timeout=recovery_timeout)
        self._running = False
        # Restricted nexuses only; an empty dict costs the I/O path one truth test.
        self._views: dict[int, NexusView] = {}
        self._stopped = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lun_watchers: list[Callable[[int, int], None]] = []
        self._port.on_units_changed = self._units_changed

    @property
    def port(self) -> PortDriver:
        """The port driver (for the CLI and benchmarks; the front end never needs it)."""
        return self._port

    @property
    def model(self) -> str:
        """The port driver's model: "storport" or "scsiport"."""
        return self._port.model

    @property
    def running(self) -> bool:
        return self._running

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """HwFindAdapter, HwInitialize, then a bus scan."""
        if not await self._port.start():
            raise RuntimeError(f"{self.name}: miniport {self._miniport.name} found no adapter")
        await self._port.scan()
        self._running = True
        log.info("hba_started", hba=self.name, model=self.model, targets=self.targets())

    async def stop(self) -> None:
        """Let in-flight I/O finish (bounded), abort the rest, SYNCHRONIZE CACHE every unit,
        then free the adapter. New commands are answered NOT READY from the start of stop."""
        if self._stopped:
            return
        self._running = False
        self._stopped = True
        port = self._port
        if not port.started:
            return
        if not await port.drain(self.stop_timeout):
            log.warning("hba_stop_aborting", hba=self.name, pending=len(port.all_pending()))
            try:
                await asyncio.wait_for(port.abort_all(), self.stop_timeout)
            except TimeoutError:
                for path_id in range(port.config.number_of_buses):
                    await port.reset_bus(path_id)
        for (path_id, target_id), luns in port.units().items():
            for lun in luns:
                unit = f"{path_id}:{target_id}:{lun}"
                try:
                    srb = await asyncio.wait_for(
                        port.command(path_id, target_id, lun, synchronize_cache_cdb()),
                        self.stop_timeout)
                except TimeoutError:
                    log.warning("hba_stop_flush_timeout", hba=self.name, unit=unit)
                    continue
                if srb.srb_status not in _DONE_OK or srb.scsi_status != ScsiStatus.GOOD:
                    log.warning("hba_stop_flush_failed", hba=self.name, unit=unit, srb=repr(srb))
        for task in list(self._tasks):
            task.cancel()
        await port.stop()

    # ---------------------------------------------------------------------------- topology

    def targets(self) -> list[tuple[int, int]]:
        return sorted(self._port.units())

    def luns(self, path_id: int, target_id: int) -> list[int]:
        return self._port.units().get((path_id, target_id), [])

    def watch_luns(self, callback: Callable[[int, int], None]) -> None:
        """Call ``callback(path_id, target_id)`` whenever a rescan finds that target's LUN
        inventory changed after start (a hot-added or removed unit, a fabric change)."""
        self._lun_watchers.append(callback)

    def _units_changed(self, path_id: int, target_id: int) -> None:
        if not self._running:
            return  # the first scan, or a stopping adapter: nobody to tell yet / any more
        log.info("luns_changed", hba=self.name, path_id=path_id, target_id=target_id,
                 luns=self.luns(path_id, target_id))
        for callback in list(self._lun_watchers):
            try:
                callback(path_id, target_id)
            except Exception:
                log.exception("lun_watcher_failed", hba=self.name)

    def queue_capacity(self, path_id: int, target_id: int) -> int:
        """Sum of the target's LU queue depths: how many commands it can usefully take at once."""
        total = 0
        for lun in self.luns(path_id, target_id):
            lq = self._port.lun_queue(path_id, target_id, lun)
            if lq is not None:
                total += lq.queue_depth
        return total

    def miniport_ioctl(self, code: str, args: Mapping[str, Any] | None = None) -> Any:
        """A management request for the miniport's controller (see Miniport.hw_ioctl)."""
        return self._port.miniport_ioctl(code, args or {})

    @property
    def miniport_name(self) -> str:
        return self._miniport.name

    # ------------------------------------------------------------------------------- the I/O

    def execute(self, srb: Srb) -> None:
        """Run one command. ``srb.completion(srb)`` is called exactly once, on the loop thread,
        possibly before this returns (a malformed CDB is answered at once)."""
        if not self._running:
            code = _sense.NOT_READY_BECOMING_READY if not self._stopped \
                else NOT_READY_CAUSE_NOT_REPORTABLE
            self._check_condition(srb, code)
            _complete(srb)
            return
        problem = decode_into(srb)
        if problem is not None:
            self._check_condition(srb, problem)
            _complete(srb)
            return
        if self._views:
            view = self._views.get(srb.nexus)
            if view is not None and self._outside_view(srb, view):
                _complete(srb)
                return
        self._port.submit(srb)

    def restrict_nexus(self, nexus: int, luns: frozenset[int] | None, read_only: bool) -> None:
        """Show ``nexus`` only ``luns`` (None: all) and, with ``read_only``, refuse its writes
        to the medium; until the nexus is lost."""
        self._views[nexus] = NexusView(luns, read_only)

    def _outside_view(self, srb: Srb, view: NexusView) -> bool:
        """Answer here what the nexus's view changes; True when ``srb`` was answered. A masked
        LUN is an absent one to this nexus; REPORT LUNS lists the LUNs it may see."""
        cdb = srb.cdb
        op = cdb[0]
        if view.luns is not None:
            if op == Op.REPORT_LUNS:
                select = cdb[2]
                luns = [] if select == 0x01 else [
                    lun for lun in self.luns(srb.path_id, srb.target_id) if lun in view.luns]
                _answer(srb, report_luns_data(luns), int.from_bytes(cdb[6:10], "big"))
                return True
            if srb.lun not in view.luns:
                self._absent_unit(srb, view)
                return True
        if view.read_only and op in _MEDIUM_WRITES:
            self._check_condition(srb, _sense.WRITE_PROTECTED)
            return True
        return False

    @staticmethod
    def _check_condition(srb: Srb, code: SenseCode) -> None:
        srb.srb_status = SrbStatus.ERROR
        srb.scsi_status = ScsiStatus.CHECK_CONDITION
        srb.sense = build_sense(code, descriptor=False)
        srb.residual = srb.data_transfer_length
        srb.data_transfer_length = 0

    def _finish(self, srb: Srb) -> None:
        """The port's finisher: SRB outcome -> SCSI answer, then the front end's completion."""
        status = srb.srb_status
        if status in _DONE_OK:
            pass
        elif status in _ABORTED_LIKE:
            srb.srb_status = SrbStatus.ABORTED
            srb.scsi_status = ScsiStatus.TASK_ABORTED
            srb.sense = b""
        elif status in _ABSENT:
            self._absent_unit(srb)
        elif srb.scsi_status != ScsiStatus.GOOD:
            pass  # the device's own status and sense, passed through unmasked
        else:
            code = _FAILURE_SENSE.get(status, _sense.INTERNAL_TARGET_FAILURE)
            log.warning("srb_failed_without_status", hba=self.name, srb=repr(srb))
            self._check_condition(srb, code)
        if self._views and srb.scsi_status == ScsiStatus.GOOD:
            view = self._views.get(srb.nexus)
            if view is not None and view.read_only:
                _mark_write_protected(srb)
        _complete(srb)

    def _absent_unit(self, srb: Srb, view: NexusView | None = None) -> None:
        """Answer for a (path, target, LUN) with no logical unit behind it (or none that
        ``view`` shows)."""
        cdb = srb.cdb
        op = cdb[0] if cdb else -1
        if op == Op.INQUIRY:
            evpd = cdb[1] & 0x01
            page = cdb[2]
            allocation = int.from_bytes(cdb[3:5], "big")
            if not evpd and page == 0:
                data = bytearray(36)
                data[0] = _NO_UNIT_PERIPHERAL
                data[2] = _VERSION_SPC4
                data[3] = 0x02  # response data format 2
                data[4] = len(data) - 5
                data[8:16] = _VENDOR
                data[16:32] = _PRODUCT
                data[32:36] = _REVISION
                _answer(srb, bytes(data), allocation)
            elif evpd and page == 0x00:
                _answer(srb, bytes((_NO_UNIT_PERIPHERAL, 0x00, 0x00, 0x01, 0x00)), allocation)
            else:
                srb.srb_status = SrbStatus.ERROR
                srb.scsi_status = ScsiStatus.CHECK_CONDITION
                srb.sense = build_sense(_sense.INVALID_FIELD_IN_CDB, field_pointer=2, cd=True)
                srb.residual = srb.data_transfer_length
                srb.data_transfer_length = 0
        elif op == Op.REPORT_LUNS:
            allocation = int.from_bytes(cdb[6:10], "big")
            select = cdb[2]
            # Select report 01h asks for well-known LUs only; this target has none.
            luns = [] if select == 0x01 else self.luns(srb.path_id, srb.target_id)
            if view is not None and view.luns is not None:
                luns = [lun for lun in luns if lun in view.luns]
            _answer(srb, report_luns_data(luns), allocation)
        elif op == Op.REQUEST_SENSE:
            # SPC-4: REQUEST SENSE to an incorrect LU succeeds and reports why in its data.
            allocation = cdb[4]
            _answer(srb, build_sense(_sense.LU_NOT_SUPPORTED, descriptor=bool(cdb[1] & 0x01)),
                    allocation)
        else:
            self._check_condition(srb, _sense.LU_NOT_SUPPORTED)

    # ---------------------------------------------------------------------- task management

    def _spawn(self, work: Coroutine[Any, Any, bool], done: TmfDone | None) -> None:
        task = self._port.loop.create_task(asyncio.wait_for(work, self.tmf_timeout))
        self._tasks.add(task)

        def finished(t: asyncio.Task[bool]) -> None:
            self._tasks.discard(t)
            ok = False
            if t.cancelled():
                ok = False
            elif (exc := t.exception()) is not None:
                log.warning("task_management_failed", hba=self.name, error=repr(exc))
            else:
                ok = t.result()
            if done is not None:
                done(ok)

        task.add_done_callback(finished)

    def abort_task(self, srb: Srb, done: TmfDone) -> None:
        """ABORT TASK. done(True) once the task is gone: aborted, or it had already completed."""
        self._spawn(self._abort_task(srb), done)

    async def _abort_task(self, srb: Srb) -> bool:
        await self._port.abort(srb)
        return not self._port.is_pending(srb)

    def abort_task_set(self, path_id: int, target_id: int, lun: int, nexus: int,
                       done: TmfDone) -> None:
        """ABORT TASK SET: every task this nexus has on the unit."""
        self._spawn(self._abort_each(self._port.pending(path_id, target_id, lun, nexus)), done)

    def clear_task_set(self, path_id: int, target_id: int, lun: int, done: TmfDone) -> None:
        """CLEAR TASK SET: every task on the unit, whichever nexus sent it."""
        self._spawn(self._abort_each(self._port.pending(path_id, target_id, lun)), done)

    async def _abort_each(self, srbs: list[Srb]) -> bool:
        await self._port.abort_all(srbs)
        return not any(self._port.is_pending(srb) for srb in srbs)

    def reset_lun(self, path_id: int, target_id: int, lun: int, done: TmfDone) -> None:
        self._spawn(self._port.reset_logical_unit(path_id, target_id, lun), done)

    def reset_target(self, path_id: int, target_id: int, done: TmfDone) -> None:
        self._spawn(self._port.reset_device(path_id, target_id), done)

    def nexus_opened(self, nexus: int, initiator_port: str, target_port: str) -> None:
        """A new I_T nexus: its units learn its port names (for persistent reservations)."""
        self._miniport.hw_nexus_opened(nexus, initiator_port, target_port)

    def nexus_lost(self, nexus: int) -> None:
        """The session is gone: abort its tasks, then let the units forget the nexus. With
        nothing to abort the units hear of it at once: a command another session sent right
        after this one closed must not still find this nexus's reservation in its way."""
        self._views.pop(nexus, None)
        if not self._port.all_pending(nexus):
            self._miniport.hw_nexus_lost(nexus)
            return
        self._spawn(self._nexus_lost(nexus), None)

    async def _nexus_lost(self, nexus: int) -> bool:
        srbs = self._port.all_pending(nexus)
        await self._port.abort_all(srbs)
        self._miniport.hw_nexus_lost(nexus)
        return True


def _complete(srb: Srb) -> None:
    completion = srb.completion
    if completion is not None:
        completion(srb)


def _mark_write_protected(srb: Srb) -> None:
    """Set WP in a MODE SENSE header for a nexus mapped read-only, so its initiator mounts
    the disk read-only instead of learning it write by write."""
    cdb = srb.cdb
    op = cdb[0] if cdb else -1
    if op not in (Op.MODE_SENSE_6, Op.MODE_SENSE_10) or not srb.sg_list:
        return
    at = 2 if op == Op.MODE_SENSE_6 else 3  # the device-specific parameter byte
    first = srb.sg_list[0]
    if srb.data_transfer_length > at and len(first) > at:
        first[at] = first[at] | 0x80


def _answer(srb: Srb, data: bytes, allocation: int) -> None:
    """GOOD status with ``data`` as Data-In, cut to the allocation length and the buffers."""
    expected = srb.data_transfer_length
    moved = 0
    limit = min(len(data), allocation, expected)
    for view in srb.sg_list:
        if moved >= limit:
            break
        n = min(len(view), limit - moved)
        view[:n] = data[moved:moved + n]
        moved += n
    srb.srb_status = SrbStatus.SUCCESS
    srb.scsi_status = ScsiStatus.GOOD
    srb.sense = b""
    srb.data_transfer_length = moved
    srb.residual = expected - moved


def report_luns_data(luns: list[int]) -> bytes:
    """REPORT LUNS parameter data for ``luns``."""
    body = b"".join(encode_lun(lun) for lun in luns)
    return len(body).to_bytes(4, "big") + bytes(4) + body
