"""The plain disk miniport and the emulated controller it drives.

:class:`EmulatedDiskController` is the "hardware": a command slot table, a latency model, a DMA
engine (worker threads for stores whose I/O blocks), a completion ring and an interrupt line.
:class:`DiskMiniport` is the driver: it hands SRBs to the controller, answers a full slot table
with the Storport queue controls instead of failing, and reports what the ring holds from its
interrupt routine.

Threads: everything runs on the event loop except ``LogicalUnit.execute`` for blocking stores
(or for every command, with ``threaded_completions``), which runs on the DMA workers; a READ the
page cache can answer (``LogicalUnit.execute_cached``, preadv with RWF_NOWAIT) is served on the
loop instead, since the hand-off costs more than the copy. A worker
appends to the completion ring (a deque, safe to append from any thread) and raises the
interrupt line; the port may run the interrupt routine right there on the worker, under its
interrupt lock. So what the interrupt routine shares with the start path is kept safe without a
lock on the I/O path (the slot count is two counters, each with one writer) or under
``synchronize_access`` (resets, which walk the commands the DMA engine is running).

Modeled CPU costs: ``start_cost_s`` and ``interrupt_cost_s`` are the time the miniport's start
and interrupt routines take per request, spent in those routines (sleeping, so another
processor's routine can run meanwhile) while holding whatever lock the port model holds around
them: nothing but the start order under Storport, the adapter lock under SCSIport. The start
routine hands the command to the controller first and then spends its cost, so the command's
completion can arrive while the start routine is still running.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Self

import structlog

from emuhba.miniport import (
    PORT_MODEL_SCSIPORT,
    AdapterControl,
    Miniport,
    MiniportIoctlError,
    PortConfiguration,
    PortServices,
)
from emuhba.scsi.sense import REPORTED_LUNS_DATA_CHANGED
from emuhba.srb import ResetKind, Srb, SrbFunction, SrbStatus
from miniports.hwmodel import Faults, HeadPositions, LatencyModel
from miniports.lu import LogicalUnit
from miniports.store import BlockStore, FileStore, RamStore

Address = tuple[int, int, int]
Irq = Callable[[], None]
Latency = float | LatencyModel | Callable[[Srb], float]
UnitMap = Mapping[Address, LogicalUnit]

log = structlog.get_logger("emuhba.miniport.disk")

# Requests the controller takes into a slot; task management travels outside the slot table.
_EXECUTE: Final = SrbFunction.EXECUTE_SCSI
_SLOTTED: Final = frozenset({SrbFunction.EXECUTE_SCSI, SrbFunction.FLUSH, SrbFunction.SHUTDOWN})


def spend(seconds: float) -> None:
    """Model CPU time a miniport routine takes: the thread is occupied and keeps whatever locks
    it holds, but lets go of the GIL, as a routine on another processor would."""
    if seconds > 0:
        time.sleep(seconds)


class EmulatedDiskController:
    """An emulated disk controller: ``slots`` command slots in front of a set of logical units.

    ``units`` maps (path_id, target_id, lun) to a :class:`LogicalUnit`, or is a builder called
    once to make that map. ``latency_s`` (seconds, or a function of the SRB for a seek+transfer
    model) is how long a command sits in its slot before it executes; while it waits it can be
    aborted. ``irq`` is the interrupt line.

    ``threaded_completions`` runs every command on the DMA workers, not only those on blocking
    stores, so every completion interrupts from a worker thread as real hardware would.
    ``start_cost_s`` / ``interrupt_cost_s`` are the modeled CPU costs of the miniport's start
    and interrupt routines per request (see the module docstring); the miniport reads
    ``start_cost_s`` once, when the adapter initializes.
    """

    def __init__(
        self,
        units: UnitMap | Callable[[], UnitMap],
        slots: int = 1024,
        latency_s: Latency = 0.0,
        workers: int = 4,
        *,
        irq: Irq,
        stores: Mapping[Address, BlockStore] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        threaded_completions: bool = False,
        start_cost_s: float = 0.0,
        interrupt_cost_s: float = 0.0,
    ) -> None:
        made = units() if callable(units) else units
        # Kept as given when it is a dict: units built by build_units answer REPORT LUNS from it.
        self.units: dict[Address, LogicalUnit] = made if isinstance(made, dict) else dict(made)
        self.slots = slots
        self.workers = workers
        self.threaded_completions = threaded_completions
        self.start_cost_s = start_cost_s
        self.interrupt_cost_s = interrupt_cost_s
        self._irq = irq
        self.faults = Faults()
        # Open I_T nexuses and their port names, for units attached later.
        self.nexuses: dict[int, tuple[str, str]] = {}
        # Link state as the host side of the controller sees it; the miniport learns of changes
        # from ``events`` (drained by its interrupt routine) and pauses/resumes the adapter.
        self.link_up = True
        self.link_downs = 0
        self.link_down_at = 0.0
        # How long a link may stay down before requests fail; the miniport sets its own.
        self.link_down_timeout = 30.0
        self.link_down_rejections = 0
        self._link_timer: asyncio.TimerHandle | None = None
        self.events: deque[str] = deque()
        self._stores: dict[Address, BlockStore] = dict(stores or {})
        for address, lu in self.units.items():
            self._stores.setdefault(address, lu.store)
        self._targets = {(p, t) for p, t, _ in self.units}
        self._heads: HeadPositions | None = None
        self.latency_s: float | Callable[[Srb], float] = 0.0
        self._set_latency(latency_s)
        self._loop = loop
        self._executor: ThreadPoolExecutor | None = None
        self._ring: deque[Srb] = deque()
        # Slots in use = taken - freed: the start path (loop) only takes, the interrupt routine
        # (any thread, under the interrupt lock) only frees, so neither needs a lock.
        self._taken = 0
        self._freed = 0
        # Commands in their latency wait (abortable), and commands the DMA engine is running.
        self._waiting: dict[Srb, asyncio.TimerHandle] = {}
        self._executing: dict[Srb, LogicalUnit] = {}
        # Executing commands a reset caught: reported with this status when the DMA finishes.
        self._doomed: dict[Srb, SrbStatus] = {}
        self.accepting = True
        self.closed = False
        self.commands = 0
        self.busy_rejections = 0
        self.aborts = 0
        self.resets = 0

    # ------------------------------------------------------------------- timing and faults

    def _set_latency(self, latency: Latency) -> None:
        self._heads = None
        self.latency_model: LatencyModel | None = None
        if isinstance(latency, LatencyModel):
            self.latency_model = latency
            if latency.seek_s or latency.per_kib_s:
                self._heads = HeadPositions(latency, self._capacity_of)
                self.latency_s = self._heads.delay
            else:
                self.latency_s = latency.fixed_s
        elif callable(latency):
            self.latency_s = latency
        else:
            self.latency_s = float(latency)
            self.latency_model = LatencyModel(fixed_s=float(latency))

    def _capacity_of(self, address: Address) -> int:
        lu = self.units.get(address)
        return lu.num_blocks if lu is not None else 0

    def set_latency(self, model: LatencyModel) -> None:
        """Change the timing model live (commands already waiting keep their deadline)."""
        self._set_latency(model)

    def link_down(self, seconds: float | None) -> None:
        """Take the host link down, for ``seconds`` (None: until :meth:`link_restore`)."""
        if seconds is not None and not seconds > 0:
            raise ValueError(f"link-down time must be > 0 s, not {seconds!r}")
        if self._link_timer is not None:
            self._link_timer.cancel()
            self._link_timer = None
        if self.link_up:
            self.link_up = False
            self.link_downs += 1
            self.link_down_at = self.loop.time()
            self._event("link-down")
        if seconds is not None:
            self._link_timer = self.loop.call_later(seconds, self.link_restore)

    def link_restore(self) -> None:
        if self._link_timer is not None:
            self._link_timer.cancel()
            self._link_timer = None
        if not self.link_up:
            self.link_up = True
            self._event("link-up")

    def link_seconds_left(self) -> float | None:
        timer = self._link_timer
        if timer is None or timer.cancelled():
            return None
        return max(0.0, timer.when() - self.loop.time())

    def link_state(self) -> dict[str, Any]:
        return {"up": self.link_up, "downs": self.link_downs,
                "rejected_while_down": self.link_down_rejections,
                "seconds_left": self.link_seconds_left()}

    def _event(self, what: str) -> None:
        """An asynchronous controller event (link state): queued and signalled like a
        completion, so the miniport sees it in its interrupt routine."""
        self.events.append(what)
        self._irq()

    def describe(self) -> dict[str, Any]:
        """The controller as ``emuhba ctl controller`` shows it."""
        model = self.latency_model
        return {
            "slots": self.slots, "slots_in_use": self.in_use, "commands": self.commands,
            "busy_rejections": self.busy_rejections, "aborts": self.aborts,
            "resets": self.resets,
            "latency": model.describe() if model is not None else "custom",
            "link": self.link_state(),
            "faults": self.faults.describe(),
            "busy_faults_given": self.faults.busy_given,
            "units": ["{}:{}:{}".format(*a) for a in self.addresses()],
        }

    # ---------------------------------------------------------------------------- topology

    @property
    def in_use(self) -> int:
        """Command slots taken and not yet reaped."""
        return self._taken - self._freed

    @in_use.setter
    def in_use(self, value: int) -> None:
        self._taken = value + self._freed

    def addresses(self) -> list[Address]:
        return sorted(self.units)

    def luns_of(self, path_id: int, target_id: int) -> list[int]:
        return sorted(lun for p, t, lun in self.units if p == path_id and t == target_id)

    def attach(self, address: Address, lu: LogicalUnit) -> None:
        """Hot-add a unit (the miniport then reports a bus change); it learns the nexuses that
        already exist."""
        for nexus, (initiator_port, target_port) in self.nexuses.items():
            lu.nexus_opened(nexus, initiator_port, target_port)
        self.units[address] = lu
        self._targets.add((address[0], address[1]))
        self._stores.setdefault(address, lu.store)

    def detach(self, address: Address) -> LogicalUnit | None:
        """Hot-remove a unit; commands already running on it finish normally."""
        lu = self.units.pop(address, None)
        self._targets = {(p, t) for p, t, _ in self.units}
        return lu

    def _matching(self, path_id: int, target_id: int | None, lun: int | None) -> list[Address]:
        return [a for a in self.units
                if a[0] == path_id and (target_id is None or a[1] == target_id)
                and (lun is None or a[2] == lun)]

    # --------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._executor is None and self.workers > 0:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="emuhba-dma")
        self.accepting = True

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def flush(self) -> None:
        """Flush every unit's medium (stop adapter); a unit whose medium fails is logged and
        the rest still flush."""
        for address, store in self._stores.items():
            try:
                store.flush()
            except OSError as exc:
                log.error("store_flush_failed", unit="{}:{}:{}".format(*address),
                          error=str(exc))

    def close(self) -> None:
        """Power off: wait for the DMA engine, drop what still waits, flush and close stores."""
        if self.closed:
            return
        self.closed = True
        self.accepting = False
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for handle in self._waiting.values():
            handle.cancel()
        self._waiting.clear()
        for address, store in self._stores.items():
            # Power-off goes on whatever one medium says: a dead array or a vanished file
            # must not keep the others from being flushed and closed.
            try:
                store.flush()
            except OSError as exc:
                log.error("store_flush_failed_at_close", unit="{}:{}:{}".format(*address),
                          error=str(exc))
            try:
                store.close()
            except OSError as exc:
                log.error("store_close_failed", unit="{}:{}:{}".format(*address),
                          error=str(exc))

    # ----------------------------------------------------------------------------- commands

    def submit(self, srb: Srb) -> bool:
        """Take a command into a free slot; False when every slot is in use (busy)."""
        if self._taken - self._freed >= self.slots or not self.accepting:
            self.busy_rejections += 1
            return False
        self._taken += 1
        self.commands += 1
        address = (srb.path_id, srb.target_id, srb.lun)
        lu = self.units.get(address)
        if lu is None:
            srb.complete(SrbStatus.INVALID_LUN if (srb.path_id, srb.target_id) in self._targets
                         else SrbStatus.SELECTION_TIMEOUT)
            self.post(srb)
            return True
        if srb.function != _EXECUTE:
            self._flush_unit(srb, address)
            return True
        if not self.link_up:
            if self.loop.time() - self.link_down_at < self.link_down_timeout:
                # Down, and the miniport has not paused the adapter yet (it learns of the
                # link from its interrupt routine): hand it back to the port to retry, which
                # the pause will then hold. The initiator sees latency, not an error.
                srb.srb_status = SrbStatus.BUSY
                self.post(srb)
                return True
            # The pause ran out (the link-down timeout): fail it, retryably.
            self.link_down_rejections += 1
            srb.complete(SrbStatus.LINK_DOWN)
            self.post(srb)
            return True
        latency = self.latency_s
        faults = self.faults
        if latency == 0 and not (faults.busy or faults.medium or faults.latency):
            self._begin(srb, lu)  # no modelled latency and no fault armed: the common case
            return True
        delay = latency(srb) if callable(latency) else latency
        if faults.busy or faults.medium or faults.latency:
            if faults.intercept(srb, lu):
                self.post(srb)
                return True
            delay += faults.added_latency(srb)
        if delay > 0:
            self._waiting[srb] = self.loop.call_later(delay, self._begin, srb, lu)
        else:
            self._begin(srb, lu)
        return True

    def _begin(self, srb: Srb, lu: LogicalUnit) -> None:
        if self._waiting:
            self._waiting.pop(srb, None)
        executor = self._executor
        if executor is not None and (self.threaded_completions or lu.needs_blocking_io(srb)):
            if not self.threaded_completions and self._cached(srb, lu):
                self.post(srb)  # a read the page cache answered: no trip to a worker
                return
            self._executing[srb] = lu
            executor.submit(self._dma, srb, lu)
            return
        self._execute(srb, lu)
        self.post(srb)

    def _dma(self, srb: Srb, lu: LogicalUnit) -> None:
        self._execute(srb, lu)
        self.post(srb)

    @staticmethod
    def _cached(srb: Srb, lu: LogicalUnit) -> bool:
        try:
            return lu.execute_cached(srb)
        except Exception:
            log.exception("lu_execute_cached_failed", srb=repr(srb))
            return False  # the worker runs it the usual way

    @staticmethod
    def _execute(srb: Srb, lu: LogicalUnit) -> None:
        try:
            lu.execute(srb)
        except Exception:
            # Firmware fault: the command fails without SCSI status; the facade reports it.
            log.exception("lu_execute_failed", srb=repr(srb))
            srb.complete(SrbStatus.ERROR)

    def _flush_unit(self, srb: Srb, address: Address) -> None:
        store = self._stores.get(address)
        executor = self._executor
        if store is None:
            srb.complete(SrbStatus.SUCCESS)
            self.post(srb)
        elif executor is not None and store.blocking:
            executor.submit(self._flush_worker, srb, store)
        else:
            self._flush_worker(srb, store)

    def _flush_worker(self, srb: Srb, store: BlockStore) -> None:
        try:
            store.flush()
            srb.complete(SrbStatus.SUCCESS)
        except Exception:
            log.exception("store_flush_failed")
            srb.complete(SrbStatus.ERROR)
        self.post(srb)

    def post(self, srb: Srb) -> None:
        """Put a finished command on the completion ring and raise the interrupt line."""
        self._ring.append(srb)
        self._irq()

    def reap(self) -> Srb | None:
        """Take the next finished command off the completion ring (the interrupt routine, under
        the interrupt lock); frees its slot."""
        try:
            srb = self._ring.popleft()
        except IndexError:
            return None
        function = srb.function
        if function is _EXECUTE or function in _SLOTTED:
            self._freed += 1
            if self._executing:
                self._executing.pop(srb, None)
                if self._doomed:
                    status = self._doomed.pop(srb, None)
                    if status is not None:
                        srb.complete(status)
        return srb

    # --------------------------------------------------------------------- task management

    def abort(self, tmf: Srb) -> None:
        """ABORT TASK: the command with the tmf's I_T_L nexus and tag, if it has not started,
        or if it has but only waits for a long operation of its unit (a SANITIZE), which then
        goes on without it. Call it exclusive with the interrupt routine."""
        self.aborts += 1

        def same(srb: Srb) -> bool:
            return (srb.queue_tag == tmf.queue_tag and srb.nexus == tmf.nexus
                    and srb.lun == tmf.lun and srb.target_id == tmf.target_id
                    and srb.path_id == tmf.path_id)

        status = SrbStatus.ABORT_FAILED
        for srb, handle in self._waiting.items():
            if same(srb):
                handle.cancel()
                del self._waiting[srb]
                srb.complete(SrbStatus.ABORTED)
                self.post(srb)
                status = SrbStatus.SUCCESS
                break
        else:
            for srb, lu in self._executing.items():
                if same(srb):
                    # Doomed first: the command may end the moment its wait is cancelled.
                    self._doomed[srb] = SrbStatus.ABORTED
                    if lu.cancel_wait(srb):
                        status = SrbStatus.SUCCESS
                    else:
                        del self._doomed[srb]
                    break
        tmf.complete(status)
        self.post(tmf)

    def reset(self, path_id: int, target_id: int | None, lun: int | None, kind: ResetKind,
              status: SrbStatus) -> bool:
        """Reset the matching units: waiting commands end with ``status`` now, executing ones
        when their DMA finishes; then each unit's state resets. False if nothing matched.
        Call it exclusive with the interrupt routine (it marks what the DMA engine runs)."""
        self.resets += 1
        addresses = self._matching(path_id, target_id, lun)

        def hit(srb: Srb) -> bool:
            return srb.path_id == path_id and (target_id is None or srb.target_id == target_id) \
                and (lun is None or srb.lun == lun)

        for srb in [s for s in self._waiting if hit(s)]:
            self._waiting.pop(srb).cancel()
            srb.complete(status)
            self.post(srb)
        for srb, lu in list(self._executing.items()):
            if hit(srb):
                self._doomed[srb] = status
                lu.cancel_wait(srb)  # a command waiting on a long operation ends now
        for address in addresses:
            self.units[address].reset(kind)
        return bool(addresses)

    def nexus_opened(self, nexus: int, initiator_port: str, target_port: str) -> None:
        self.nexuses[nexus] = (initiator_port, target_port)
        for lu in self.units.values():
            lu.nexus_opened(nexus, initiator_port, target_port)

    def nexus_gone(self, nexus: int) -> None:
        self.nexuses.pop(nexus, None)
        for lu in self.units.values():
            lu.nexus_gone(nexus)


@dataclass(frozen=True)
class TargetLayout:
    """One target of a controller: its address, the port name its units report in VPD 83h,
    and its LUN map of (lun, store, read_only) and, for a removable-medium unit, a fourth
    element True."""

    path_id: int
    target_id: int
    port_name: str
    luns: Sequence[tuple[int, BlockStore, bool] | tuple[int, BlockStore, bool, bool]]


class DiskMiniport(Miniport):
    """A miniport for :class:`EmulatedDiskController`.

    ``controller_factory`` is called from ``hw_find_adapter`` with the interrupt line to build
    the controller. ``busy_requests`` is how many completions the adapter waits for when the
    controller is out of slots.

    Under a SCSIport-model port the request arrives without its scatter/gather list; the start
    routine fetches it element by element (``get_physical_address``) and programs the
    controller's DMA with what it got. Under Storport the list comes whole with the request.
    """

    name = "emudisk"

    def __init__(
        self,
        controller_factory: Callable[[Irq], EmulatedDiskController],
        *,
        queue_depth: int = 64,
        busy_requests: int = 1,
        maximum_transfer_length: int = 8 * 1024 * 1024,
        link_down_timeout: float = 30.0,
    ) -> None:
        if not link_down_timeout > 0:
            raise ValueError(f"link-down timeout must be > 0 s, not {link_down_timeout!r}")
        self._factory = controller_factory
        self.link_down_timeout = link_down_timeout
        self.queue_depth = queue_depth
        self.busy_requests = busy_requests
        self.maximum_transfer_length = maximum_transfer_length
        self._port: PortServices | None = None
        self._controller: EmulatedDiskController | None = None
        # The same controller once initialized, for the per-I/O path (no None check there).
        self._hw: EmulatedDiskController
        self._per_element = False
        self._plain_start = True
        self.sg_elements = 0

    @property
    def controller(self) -> EmulatedDiskController:
        if self._controller is None:
            raise RuntimeError("hw_find_adapter has not run")
        return self._controller

    @property
    def port(self) -> PortServices:
        if self._port is None:
            raise RuntimeError("hw_find_adapter has not run")
        return self._port

    @classmethod
    def from_luns(
        cls,
        specs: Sequence[tuple[Any, ...]],
        *,
        target_port_name: str,
        path_id: int = 0,
        target_id: int = 0,
        slots: int = 1024,
        latency_s: Latency = 0.0,
        workers: int = 4,
        queue_depth: int = 64,
        block_size: int = 512,
        threaded_completions: bool = False,
        start_cost_s: float = 0.0,
        interrupt_cost_s: float = 0.0,
    ) -> Self:
        """LUNs 0..n-1 on one target from ``("ram", size_bytes)`` and
        ``("file", path, size_bytes | None)`` (a ``"file"`` spec may add ``read_only``).
        The keyword arguments after ``queue_depth`` go to :class:`EmulatedDiskController`."""
        specs = [tuple(spec) for spec in specs]
        for spec in specs:
            _check_spec(spec)
        luns = list(range(len(specs)))
        # Stores open here, not at hw_find_adapter, so a bad path fails the caller at once.
        stores: dict[Address, BlockStore] = {}
        units: dict[Address, LogicalUnit] = {}
        try:
            for lun, spec in zip(luns, specs, strict=True):
                store, read_only = _make_store(spec, block_size)
                address = (path_id, target_id, lun)
                stores[address] = store
                units[address] = LogicalUnit(
                    store, lun=lun, target_luns=lambda: list(luns),
                    serial=unit_serial(target_port_name, path_id, target_id, lun),
                    target_port_name=target_port_name, read_only=read_only,
                    peers=lambda: {a[2]: u for a, u in units.items()})
        except BaseException:
            for store in stores.values():
                store.close()
            raise

        def build(irq: Irq) -> EmulatedDiskController:
            return EmulatedDiskController(units, slots, latency_s, workers, irq=irq, stores=stores,
                                          threaded_completions=threaded_completions,
                                          start_cost_s=start_cost_s,
                                          interrupt_cost_s=interrupt_cost_s)

        return cls(build, queue_depth=queue_depth)

    @classmethod
    def from_targets(
        cls,
        targets: Sequence[TargetLayout],
        *,
        slots: int = 1024,
        latency_s: Latency = 0.0,
        workers: int = 4,
        queue_depth: int = 64,
        link_down_timeout: float = 30.0,
    ) -> Self:
        """A controller with several targets, each with its own LUN map over stores the caller
        opened (and hands over: the controller closes them)."""
        units: dict[Address, LogicalUnit] = {}
        stores: dict[Address, BlockStore] = {}

        # Live over the final map, so REPORT LUNS follows units attached later.
        def luns_of(path_id: int, target_id: int) -> Callable[[], list[int]]:
            return lambda: sorted(a[2] for a in units if a[:2] == (path_id, target_id))

        # The same for EXTENDED COPY's copy targets.
        def peers_of(path_id: int, target_id: int) -> Callable[[], dict[int, LogicalUnit]]:
            return lambda: {a[2]: u for a, u in units.items() if a[:2] == (path_id, target_id)}

        for target in targets:
            for entry in target.luns:
                lun, store, read_only = entry[:3]
                removable = len(entry) > 3 and bool(entry[3])
                address = (target.path_id, target.target_id, lun)
                if address in units:
                    raise ValueError("two units at {}:{}:{}".format(*address))
                stores[address] = store
                units[address] = LogicalUnit(
                    store, lun=lun, target_luns=luns_of(target.path_id, target.target_id),
                    serial=unit_serial(target.port_name, *address),
                    target_port_name=target.port_name, read_only=read_only,
                    removable=removable, peers=peers_of(target.path_id, target.target_id))

        def build(irq: Irq) -> EmulatedDiskController:
            return EmulatedDiskController(units, slots, latency_s, workers, irq=irq, stores=stores)

        return cls(build, queue_depth=queue_depth, link_down_timeout=link_down_timeout)

    # -------------------------------------------------------------------------- Hw routines

    def attach_unit(self, address: Address, lu: LogicalUnit) -> None:
        """Hot-add a unit: the other units of its target report REPORTED LUNS DATA HAS CHANGED
        and the port rescans the bus."""
        controller = self.controller
        controller.attach(address, lu)
        self._luns_changed(address)

    def detach_unit(self, address: Address) -> LogicalUnit | None:
        lu = self.controller.detach(address)
        if lu is not None:
            self._luns_changed(address)
        return lu

    def _luns_changed(self, address: Address) -> None:
        for (p, t, lun), unit in self.controller.units.items():
            if (p, t) == address[:2] and lun != address[2]:
                unit.establish_unit_attention(REPORTED_LUNS_DATA_CHANGED)
        self.port.bus_change_detected(address[0])

    def hw_find_adapter(self, port: PortServices, config: PortConfiguration) -> bool:
        self._port = port
        controller = self._factory(port.interrupt)
        self._controller = controller
        addresses = controller.addresses()
        config.number_of_buses = max((a[0] for a in addresses), default=0) + 1
        config.maximum_number_of_targets = max((a[1] for a in addresses), default=0) + 1
        config.maximum_number_of_logical_units = max((a[2] for a in addresses), default=0) + 1
        config.maximum_transfer_length = self.maximum_transfer_length
        config.srb_type_extended = True
        config.default_queue_depth = self.queue_depth
        config.adapter_queue_limit = None
        self._per_element = config.port_model == PORT_MODEL_SCSIPORT
        return True

    def hw_initialize(self) -> bool:
        controller = self.controller
        controller.link_down_timeout = self.link_down_timeout
        controller.start()
        self._hw = controller
        # Decided once: whether a start is more than handing the request to the controller
        # (so the modeled start cost is read here, not per request).
        self._plain_start = not self._per_element and not controller.start_cost_s
        return True

    # No hw_build_io: under Storport the whole scatter/gather list came with the request and
    # there is nothing to translate; under SCSIport the start routine fetches it.

    def hw_start_io(self, srb: Srb) -> bool:
        function = srb.function
        if function is _EXECUTE or function in _SLOTTED:
            if not self._plain_start:
                return self._start_modeled(srb)
            if not self._hw.submit(srb):
                self._out_of_slots(srb)
            return True
        controller = self.controller
        if function == SrbFunction.ABORT_COMMAND:
            self.port.synchronize_access(lambda: controller.abort(srb))
            return True
        if function == SrbFunction.RESET_LOGICAL_UNIT:
            where: tuple[int | None, int | None, ResetKind, SrbStatus] = (
                srb.target_id, srb.lun, ResetKind.LOGICAL_UNIT, SrbStatus.ABORTED)
        elif function == SrbFunction.RESET_DEVICE:
            where = (srb.target_id, None, ResetKind.TARGET, SrbStatus.ABORTED)
        elif function == SrbFunction.RESET_BUS:
            where = (None, None, ResetKind.BUS, SrbStatus.BUS_RESET)
        else:
            srb.complete(SrbStatus.INVALID_REQUEST)
            self.port.request_complete(srb)
            return True
        target_id, lun, kind, status = where
        found = self.port.synchronize_access(
            lambda: controller.reset(srb.path_id, target_id, lun, kind, status))
        srb.complete(SrbStatus.SUCCESS if found else SrbStatus.NO_DEVICE)
        controller.post(srb)
        return True

    def _out_of_slots(self, srb: Srb) -> None:
        # Have the port retry this one, and hold the adapter until the controller gives back a
        # slot rather than fail anything.
        srb.srb_status = SrbStatus.BUSY
        self.port.request_complete(srb)
        self.port.busy(self.busy_requests)

    def _start_modeled(self, srb: Srb) -> bool:
        """A start under SCSIport (the data fetched element by element) or with a modeled CPU
        cost (spent after the controller has the command, so it may complete meanwhile)."""
        controller = self._hw
        if self._per_element and srb.data_transfer_length:
            self._fetch_elements(srb)
        if not controller.submit(srb):
            self._out_of_slots(srb)
        spend(controller.start_cost_s)
        return True

    def _fetch_elements(self, srb: Srb) -> None:
        """SCSIport: ask the port for the data one scatter/gather element at a time and program
        the DMA with the list (the port puts the original back when the request completes)."""
        element_at = self.port.get_physical_address
        length = srb.data_transfer_length
        elements: list[memoryview] = []
        offset = 0
        while offset < length:
            element = element_at(srb, offset)
            if not element:
                break
            if offset + element.nbytes > length:
                element = element[:length - offset]
            elements.append(element)
            offset += element.nbytes
        self.sg_elements += len(elements)
        srb.sg_list = elements

    def hw_interrupt(self) -> bool:
        controller = self.controller
        if controller.events:
            self._link_events(controller)
        complete = self.port.request_complete
        reap = controller.reap
        cost = controller.interrupt_cost_s
        serviced = False
        while (srb := reap()) is not None:
            serviced = True
            if cost:
                spend(cost)
            complete(srb)
        return serviced

    def _link_events(self, controller: EmulatedDiskController) -> None:
        """Link down pauses the adapter (for at most the link-down timeout) so that a link
        blip costs the initiator latency, not errors; link up resumes it."""
        port = self.port
        while controller.events:
            event = controller.events.popleft()
            if event == "link-down":
                log.warning("link_down", miniport=self.name, timeout_s=self.link_down_timeout)
                port.pause(self.link_down_timeout)
            elif event == "link-up":
                log.info("link_up", miniport=self.name)
                port.resume()

    # ------------------------------------------------------------------------------- ioctls

    def hw_ioctl(self, code: str, args: Mapping[str, Any]) -> Any:
        handler = self._ioctls().get(code)
        if handler is None:
            raise MiniportIoctlError(
                "unsupported", f"miniport {self.name} has no control {code!r}; it has: "
                + ", ".join(sorted(self._ioctls())))
        try:
            return handler(args)
        except (ValueError, TypeError, KeyError) as exc:
            raise MiniportIoctlError("bad-argument", f"{code}: {exc}") from exc

    def _ioctls(self) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
        return {
            "controller": self._ioctl_controller,
            "fault.list": lambda args: self.controller.faults.describe(),
            "fault.busy": self._ioctl_busy,
            "fault.medium-error": self._ioctl_medium_error,
            "fault.latency": self._ioctl_latency,
            "fault.clear": self._ioctl_clear,
            "link.down": self._ioctl_link_down,
            "link.up": self._ioctl_link_up,
            "latency.set": self._ioctl_set_latency,
        }

    def _ioctl_controller(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"miniport": self.name, "link_down_timeout_s": self.link_down_timeout,
                **self.controller.describe()}

    def _unit_arg(self, args: Mapping[str, Any]) -> Address | None:
        unit = args.get("unit")
        if unit is None:
            return None
        address = (int(unit[0]), int(unit[1]), int(unit[2]))
        if address not in self.controller.units:
            raise MiniportIoctlError("no-unit", "no logical unit at {}:{}:{}".format(*address))
        return address

    def _ioctl_busy(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.controller.faults.arm_busy(self._unit_arg(args), int(args["count"]))
        return self.controller.faults.describe()

    def _ioctl_medium_error(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        unit = self._unit_arg(args)
        first = int(args["first_lba"])
        last = int(args.get("last_lba", first))
        if unit is not None and last >= self.controller.units[unit].num_blocks:
            raise ValueError(f"LBA {last} is past the unit's last LBA "
                             f"{self.controller.units[unit].num_blocks - 1}")
        self.controller.faults.arm_medium_error(
            unit, first, last, reads=bool(args.get("reads", True)),
            writes=bool(args.get("writes", False)))
        return self.controller.faults.describe()

    def _ioctl_latency(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.controller.faults.arm_latency(self._unit_arg(args), float(args["seconds"]))
        return self.controller.faults.describe()

    def _ioctl_clear(self, args: Mapping[str, Any]) -> dict[str, Any]:
        unit = self._unit_arg(args)
        removed = self.controller.faults.clear(args.get("kind"), unit, every_unit=unit is None)
        return {"cleared": removed, "faults": self.controller.faults.describe()}

    def _ioctl_link_down(self, args: Mapping[str, Any]) -> dict[str, Any]:
        seconds = args.get("seconds")
        self.controller.link_down(None if seconds is None else float(seconds))
        return self.controller.link_state()

    def _ioctl_link_up(self, args: Mapping[str, Any]) -> dict[str, Any]:
        self.controller.link_restore()
        return self.controller.link_state()

    def _ioctl_set_latency(self, args: Mapping[str, Any]) -> dict[str, float]:
        model = LatencyModel(fixed_s=float(args.get("fixed_s", 0.0)),
                             per_kib_s=float(args.get("per_kib_s", 0.0)),
                             seek_s=float(args.get("seek_s", 0.0)))
        self.controller.set_latency(model)
        return model.describe()

    def hw_reset_bus(self, path_id: int) -> bool:
        self.controller.reset(path_id, None, None, ResetKind.BUS, SrbStatus.BUS_RESET)
        return True

    def hw_adapter_control(self, control: AdapterControl, parameters: Any = None) -> Any:
        if control is AdapterControl.QUERY_SUPPORTED_CONTROL_TYPES:
            return {AdapterControl.QUERY_SUPPORTED_CONTROL_TYPES, AdapterControl.STOP_ADAPTER,
                    AdapterControl.RESTART_ADAPTER}
        if control is AdapterControl.STOP_ADAPTER:
            if self._controller is not None:
                self._controller.accepting = False
                self._controller.flush()
            return True
        if control is AdapterControl.RESTART_ADAPTER:
            if self._controller is not None and not self._controller.closed:
                self._controller.accepting = True
                return True
            return False
        return None

    def hw_free_adapter_resources(self) -> None:
        if self._controller is not None:
            self._controller.close()

    def hw_nexus_opened(self, nexus: int, initiator_port: str, target_port: str) -> None:
        self.controller.nexus_opened(nexus, initiator_port, target_port)

    def hw_nexus_lost(self, nexus: int) -> None:
        """An I_T nexus is gone: its unit attentions and reservations go with it."""
        self.controller.nexus_gone(nexus)


def unit_serial(target_port_name: str, path_id: int, target_id: int, lun: int) -> str:
    """A unit serial number that stays the same across runs for the same place on the same
    target, so initiators keep their /dev/disk/by-id names (the NAA id is derived from it)."""
    digest = hashlib.sha256(f"{target_port_name}/{path_id}:{target_id}:{lun}".encode()).digest()
    return digest[:8].hex().upper()


def _store_options(spec: tuple[Any, ...]) -> tuple[tuple[Any, ...], Mapping[str, Any]]:
    """A spec may end with a mapping of store options (``physical_block_size``)."""
    if spec and isinstance(spec[-1], Mapping):
        return spec[:-1], spec[-1]
    return spec, {}


def _check_spec(spec: tuple[Any, ...]) -> None:
    spec, options = _store_options(spec)
    if set(options) - {"physical_block_size"}:
        raise ValueError(f"unknown store options in LUN spec: {sorted(options)}")
    if not spec or spec[0] not in ("ram", "file"):
        raise ValueError(f"LUN spec must start with 'ram' or 'file': {spec!r}")
    if spec[0] == "ram" and len(spec) != 2:
        raise ValueError(f"expected ('ram', size_bytes): {spec!r}")
    if spec[0] == "file" and len(spec) not in (3, 4):
        raise ValueError(f"expected ('file', path, size_bytes | None[, read_only]): {spec!r}")


def _make_store(spec: tuple[Any, ...], block_size: int) -> tuple[BlockStore, bool]:
    spec, options = _store_options(spec)
    store: BlockStore
    read_only = False
    if spec[0] == "ram":
        store = RamStore.of_size(int(spec[1]), block_size=block_size)
    else:
        read_only = bool(spec[3]) if len(spec) == 4 else False
        store = FileStore(spec[1], spec[2], block_size=block_size, read_only=read_only)
    store.physical_block_size = options.get("physical_block_size")
    return store, read_only


def build_units(
    layout: Iterable[tuple[Address, BlockStore]],
    *,
    target_port_name: str,
    read_only: bool = False,
) -> dict[Address, LogicalUnit]:
    """LogicalUnits for stores placed at arbitrary addresses (many targets, sparse LUNs).

    Give the returned dict itself to :class:`EmulatedDiskController` and units attached to it
    later appear in REPORT LUNS.
    """
    units: dict[Address, LogicalUnit] = {}

    # Live: a unit attached to this map later shows up in its neighbours' REPORT LUNS (and
    # among their EXTENDED COPY targets).
    def luns_of(path_id: int, target_id: int) -> Callable[[], list[int]]:
        return lambda: sorted(a[2] for a in units if a[0] == path_id and a[1] == target_id)

    def peers_of(path_id: int, target_id: int) -> Callable[[], dict[int, LogicalUnit]]:
        return lambda: {a[2]: u for a, u in units.items() if a[:2] == (path_id, target_id)}

    for address, store in layout:
        units[address] = LogicalUnit(
            store, lun=address[2], target_luns=luns_of(address[0], address[1]),
            serial=unit_serial(target_port_name, *address), target_port_name=target_port_name,
            read_only=read_only, peers=peers_of(address[0], address[1]))
    return units
