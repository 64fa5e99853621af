"""A timing-model miniport and controller, for benchmarking the port driver's queuing model.

:class:`SimController` is an emulated controller that moves no data: each logical unit has a
service time (a seek per request plus an optional transfer time per KiB) and as many requests
in service at once as it has slots (unlimited by default, so the controller itself never caps
throughput); a unit whose slots are full answers SCSI BUSY. Completion is signalled through the
interrupt line, as on the disk controller.

:class:`SimMiniport` drives it and models what its Hw routines cost in CPU time. In a
single-threaded event loop the port's locks never make anyone wait, so the contention the seeds
describe cannot appear by itself; instead each lock is a :class:`CpuLane`, a single server that
is busy for a routine's cost and makes the next caller wait its turn, in virtual time:

- full duplex, under a Storport-model port: HwBuildIo runs unlocked on any of ``cpus``
  processors, HwStartIo under the start lock, HwInterrupt under the interrupt lock; the two
  locks are independent, so starting and completing overlap.
- half duplex, under a SCSIport-model port: one adapter lock for everything. The translation
  work that Storport allows in HwBuildIo happens inside HwStartIo, plus one
  ``get_physical_address`` call per scatter/gather element (the port hides the list), and the
  interrupt routine waits for starts and starts for it.

The miniport learns the port model from ``PortConfiguration.port_model`` in ``hw_find_adapter``,
as a real one learns which port driver loaded it; ``duplex=`` overrides the lock layout.

Run it on :class:`emuhba.simclock.VirtualTimeLoop` to measure the model; on a real loop the
service times are real delays and the modeled CPU costs still only shift completion times.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from emuhba.miniport import (
    MAX_QUEUE_DEPTH_CLASSIC,
    PORT_MODEL_SCSIPORT,
    PORT_MODEL_STORPORT,
    AdapterControl,
    Miniport,
    PortConfiguration,
    PortServices,
)
from emuhba.srb import ScsiStatus, Srb, SrbFunction, SrbStatus

Address = tuple[int, int, int]
Irq = Callable[[], None]
Duplex = Literal["full", "half"]

_EXECUTE: Final = SrbFunction.EXECUTE_SCSI
_SLOTTED: Final = frozenset({SrbFunction.EXECUTE_SCSI, SrbFunction.FLUSH, SrbFunction.SHUTDOWN})


@dataclass(frozen=True)
class ServiceTime:
    """How long a unit takes per request: ``seek_s`` each, plus ``per_kib_s`` per KiB moved.

    ``jitter`` (0 to 1) spreads each request's time uniformly over (1 +- jitter) x that, drawn
    from the unit's own seeded generator: real seeks vary, and a model where every request takes
    exactly the same time can lock into patterns (convoys behind a FIFO) that depend on nothing
    but the order of the first requests. Runs stay reproducible.
    """

    seek_s: float = 0.005
    per_kib_s: float = 0.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.seek_s < 0 or self.per_kib_s < 0:
            raise ValueError(f"service times cannot be negative: {self}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter is a fraction in [0, 1), not {self.jitter}")

    def of(self, nbytes: int) -> float:
        """The nominal time for ``nbytes`` (without jitter)."""
        if self.per_kib_s:
            return self.seek_s + self.per_kib_s * (nbytes / 1024.0)
        return self.seek_s


@dataclass(frozen=True)
class CpuCosts:
    """Modeled CPU seconds of the miniport routines, per request (see the module docstring).

    ``build_s``: translating the SRB for the hardware and building its scatter/gather list;
    ``start_s``: handing it to the controller (writing the doorbell); ``sg_element_s``: one
    SCSIport call to fetch one scatter/gather element (SCSIport only; Storport hands the list
    over whole); ``interrupt_s``: reaping one completion in the interrupt routine; ``cpus``:
    processors that can run unlocked routines (HwBuildIo) at once.

    The defaults put the heavy part of the work where a Storport miniport puts it, in HwBuildIo,
    and keep what runs under the start and interrupt locks short: then those locks saturate
    near 2M requests/s, beyond Little's-law throughput of 32 LUNs x 255 / 5 ms (1.63M). Raise
    ``start_s``/``interrupt_s`` to move that knee.
    """

    build_s: float = 2e-6
    start_s: float = 0.5e-6
    sg_element_s: float = 0.25e-6
    interrupt_s: float = 0.5e-6
    cpus: int = 8

    @classmethod
    def free(cls) -> CpuCosts:
        """No CPU cost at all: only the queuing model and the device's service time count."""
        return cls(build_s=0.0, start_s=0.0, sg_element_s=0.0, interrupt_s=0.0)


class CpuLane:
    """One lock (or one processor) in virtual time: a FIFO single server.

    ``charge(arrive, cost)`` is a routine that wanted the lock at ``arrive`` and holds it for
    ``cost``; it returns when the routine is done. Callers charge in event order, so a later
    caller waits behind an earlier one, as on a spinlock.
    """

    __slots__ = ("busy_s", "free_at", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.free_at = 0.0
        self.busy_s = 0.0

    def charge(self, arrive: float, cost: float) -> float:
        start = self.free_at if self.free_at > arrive else arrive
        self.free_at = start + cost
        self.busy_s += cost
        return self.free_at


class CpuPool:
    """``cpus`` processors for work that needs no lock: each request takes the first free one."""

    __slots__ = ("_free", "busy_s", "cpus")

    def __init__(self, cpus: int) -> None:
        if cpus < 1:
            raise ValueError(f"need at least one processor, not {cpus}")
        self.cpus = cpus
        self._free = [0.0] * cpus  # a heap of the times each processor becomes free
        self.busy_s = 0.0

    def charge(self, arrive: float, cost: float) -> float:
        earliest = self._free[0]
        done = (earliest if earliest > arrive else arrive) + cost
        heapq.heapreplace(self._free, done)
        self.busy_s += cost
        return done


class SimUnit:
    """One emulated logical unit: its service time, slot limit and counters. ``seed`` seeds
    the unit's generator for service-time jitter."""

    __slots__ = ("_random", "busy_answers", "commands", "in_service", "peak_in_service",
                 "service", "slots")

    def __init__(self, service: ServiceTime, slots: int | None = None, seed: int = 0) -> None:
        self.service = service
        self.slots = slots
        self.in_service = 0
        self.peak_in_service = 0
        self.commands = 0
        self.busy_answers = 0
        self._random = random.Random(seed) if service.jitter else None

    def service_time(self, nbytes: int) -> float:
        nominal = self.service.of(nbytes)
        if self._random is None:
            return nominal
        jitter = self.service.jitter
        return nominal * self._random.uniform(1.0 - jitter, 1.0 + jitter)


class Timeline:
    """Events at given loop times, fired in time order (ties in the order added).

    One loop timer stands for the earliest event instead of one per event: at hundreds of
    thousands of requests in flight the loop's heap of timer handles, compared in Python, was
    most of a simulation's cost; these entries are tuples, compared in C.
    """

    __slots__ = ("_armed_at", "_fire", "_heap", "_loop", "_seq", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[int, Any], None]) -> None:
        self._loop = loop
        self._fire = fire
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, item: Any) -> int:
        """Fire ``item`` at ``when``; returns the event's sequence number (given to fire)."""
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, item))
        if self._timer is None or when < self._armed_at:
            self._arm(when)
        return self._seq

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self._loop.call_at(when, self._run)

    def _run(self) -> None:
        self._timer = None
        now = self._loop.time()
        heap = self._heap
        fire = self._fire
        while heap and heap[0][0] <= now:
            _, seq, item = heapq.heappop(heap)
            fire(seq, item)
        if heap and self._timer is None:
            self._arm(heap[0][0])

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()


# What a controller event is: the end of a request's service, or an answer given without
# serving it (BUSY, no such unit).
_SERVED: Final = 0
_ANSWERED: Final = 1


class SimController:
    """The emulated hardware: units at (path_id, target_id, lun), a completion ring and an
    interrupt line. ``submit(srb, at)`` takes a command that reaches the device at loop time
    ``at`` (after the miniport's start work); the unit serves it for its service time."""

    def __init__(self, units: Mapping[Address, SimUnit], *, irq: Irq,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.units: dict[Address, SimUnit] = dict(units)
        self._targets = {(p, t) for p, t, _ in self.units}
        self._irq = irq
        self._loop = loop
        self._timeline: Timeline | None = None
        self._ring: deque[Srb] = deque()
        # In service: the unit serving it and the sequence number of its end-of-service event
        # (a request aborted and resubmitted must not be ended by its old event).
        self._in_service: dict[Srb, tuple[SimUnit, int]] = {}
        self.accepting = True
        self.commands = 0
        self.busy_answers = 0
        self.aborts = 0
        self.resets = 0

    @property
    def timeline(self) -> Timeline:
        if self._timeline is None:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._timeline = Timeline(self._loop, self._event)
        return self._timeline

    def addresses(self) -> list[Address]:
        return sorted(self.units)

    @property
    def in_service(self) -> int:
        return len(self._in_service)

    def submit(self, srb: Srb, at: float) -> None:
        self.commands += 1
        unit = self.units.get((srb.path_id, srb.target_id, srb.lun))
        if unit is None or not self.accepting:
            if not self.accepting:
                srb.complete(SrbStatus.BUSY)
            elif (srb.path_id, srb.target_id) in self._targets:
                srb.complete(SrbStatus.INVALID_LUN)
            else:
                srb.complete(SrbStatus.SELECTION_TIMEOUT)
            self.timeline.add(at, (_ANSWERED, srb))
            return
        unit.commands += 1
        if unit.slots is not None and unit.in_service >= unit.slots:
            # Every slot of the unit is taken: it answers at once, moving no data.
            unit.busy_answers += 1
            self.busy_answers += 1
            srb.complete(SrbStatus.ERROR, ScsiStatus.BUSY)
            self.timeline.add(at, (_ANSWERED, srb))
            return
        unit.in_service += 1
        if unit.in_service > unit.peak_in_service:
            unit.peak_in_service = unit.in_service
        done = at + unit.service_time(srb.data_transfer_length)
        self._in_service[srb] = (unit, self.timeline.add(done, (_SERVED, srb)))

    def _event(self, seq: int, item: tuple[int, Srb]) -> None:
        kind, srb = item
        if kind == _SERVED:
            state = self._in_service.get(srb)
            if state is None or state[1] != seq:
                return  # aborted or reset while in service; already answered
            del self._in_service[srb]
            state[0].in_service -= 1
            # A read or write of the whole length; the data itself is not modeled.
            srb.complete(SrbStatus.SUCCESS)
        self.post(srb)

    def post(self, srb: Srb) -> None:
        """Put a finished command on the completion ring and raise the interrupt line."""
        self._ring.append(srb)
        self._irq()

    def reap(self) -> Srb | None:
        try:
            return self._ring.popleft()
        except IndexError:
            return None

    def stop(self) -> None:
        """Power off: nothing more finishes (what was in service is the port's to flush)."""
        self.accepting = False
        if self._timeline is not None:
            self._timeline.cancel()

    def abort(self, tmf: Srb) -> None:
        """ABORT TASK: end the command with the tmf's I_T_L nexus and tag if still in service."""
        self.aborts += 1
        for srb in self._in_service:
            if (srb.queue_tag == tmf.queue_tag and srb.nexus == tmf.nexus
                    and srb.address == tmf.address):
                self._end(srb, SrbStatus.ABORTED)
                tmf.complete(SrbStatus.SUCCESS)
                break
        else:
            tmf.complete(SrbStatus.ABORT_FAILED)
        self.post(tmf)

    def reset(self, path_id: int, target_id: int | None, lun: int | None,
              status: SrbStatus) -> bool:
        """End every command in service on the matching units with ``status``."""
        self.resets += 1
        hits = [srb for srb in self._in_service
                if srb.path_id == path_id and (target_id is None or srb.target_id == target_id)
                and (lun is None or srb.lun == lun)]
        for srb in hits:
            self._end(srb, status)
        return any(a[0] == path_id and (target_id is None or a[1] == target_id)
                   and (lun is None or a[2] == lun) for a in self.units)

    def _end(self, srb: Srb, status: SrbStatus) -> None:
        # Its end-of-service event stays in the timeline and is ignored when it comes.
        unit, _ = self._in_service.pop(srb)
        unit.in_service -= 1
        srb.complete(status)
        self.post(srb)


class SimMiniport(Miniport):
    """The miniport for :class:`SimController`, with modeled routine costs.

    ``units`` maps addresses to :class:`SimUnit`. ``queue_depth`` is the per-LU depth it asks
    the port for (above 255 it declares extended SRBs). When a unit answers BUSY the miniport
    does what a Storport miniport would: lowers that unit's queue depth to its slot count (the
    first time) and calls ``device_busy`` for ``busy_requests`` completions.
    """

    name = "sim"

    def __init__(
        self,
        units: Mapping[Address, SimUnit],
        *,
        costs: CpuCosts | None = None,
        duplex: Duplex | None = None,
        queue_depth: int = MAX_QUEUE_DEPTH_CLASSIC,
        busy_requests: int = 1,
    ) -> None:
        if duplex not in (None, "full", "half"):
            raise ValueError(f"duplex is 'full' or 'half', not {duplex!r}")
        self._units = dict(units)
        self.costs = costs if costs is not None else CpuCosts()
        self._duplex_override = duplex
        self.queue_depth = queue_depth
        self.busy_requests = busy_requests
        self.port_model = PORT_MODEL_STORPORT
        self._port: PortServices | None = None
        self._controller: SimController | None = None
        # Completions the interrupt routine has reaped, waiting for its modeled time to pass.
        self.reports: Timeline
        self.build_cpus = CpuPool(self.costs.cpus)
        self._lay_out_locks(duplex or "full")
        self.starts = 0
        self.completions = 0
        self.sg_calls = 0
        # Units whose slot count the port has been told as their queue depth.
        self._depth_told: set[Address] = set()

    def _lay_out_locks(self, duplex: Duplex) -> None:
        self.duplex: Duplex = duplex
        # In half duplex the start and interrupt locks are one and the same.
        self.start_lock = CpuLane("adapter" if duplex == "half" else "start")
        self.interrupt_lock = self.start_lock if duplex == "half" else CpuLane("interrupt")

    @classmethod
    def uniform(cls, luns: int, service: ServiceTime | None = None, **kwargs: Any) -> SimMiniport:
        """``luns`` identical units 0..luns-1 on bus 0, target 0."""
        service = service if service is not None else ServiceTime()
        return cls({(0, 0, lun): SimUnit(service, seed=lun) for lun in range(luns)}, **kwargs)

    @property
    def controller(self) -> SimController:
        if self._controller is None:
            raise RuntimeError("hw_find_adapter has not run")
        return self._controller

    @property
    def port(self) -> PortServices:
        if self._port is None:
            raise RuntimeError("hw_find_adapter has not run")
        return self._port

    def lock_utilisation(self, elapsed: float) -> dict[str, float]:
        """Fraction of ``elapsed`` each modeled lock was held (processors: averaged)."""
        if elapsed <= 0:
            return {}
        result = {self.start_lock.name: self.start_lock.busy_s / elapsed}
        if self.interrupt_lock is not self.start_lock:
            result[self.interrupt_lock.name] = self.interrupt_lock.busy_s / elapsed
            result["build_cpus"] = self.build_cpus.busy_s / (elapsed * self.build_cpus.cpus)
        return result

    # -------------------------------------------------------------------------- Hw routines

    def hw_find_adapter(self, port: PortServices, config: PortConfiguration) -> bool:
        if not self._units:
            return False
        self._port = port
        self.port_model = config.port_model
        self._lay_out_locks(self._duplex_override or (
            "half" if config.port_model == PORT_MODEL_SCSIPORT else "full"))
        self._controller = SimController(self._units, irq=port.interrupt)
        addresses = self._controller.addresses()
        config.number_of_buses = max(a[0] for a in addresses) + 1
        config.maximum_number_of_targets = max(a[1] for a in addresses) + 1
        config.maximum_number_of_logical_units = max(a[2] for a in addresses) + 1
        config.srb_type_extended = self.queue_depth > MAX_QUEUE_DEPTH_CLASSIC
        config.default_queue_depth = self.queue_depth
        config.adapter_queue_limit = None
        return True

    def hw_initialize(self) -> bool:
        self.reports = Timeline(asyncio.get_running_loop(), self._report)
        self.controller.accepting = True
        return True

    def hw_build_io(self, srb: Srb) -> bool:
        if self.duplex == "full":
            srb.miniport_context = self.build_cpus.charge(self.port.now(), self.costs.build_s)
        else:
            srb.miniport_context = None
        return True

    def hw_start_io(self, srb: Srb) -> bool:
        function = srb.function
        port = self.port
        if function is _EXECUTE or function in _SLOTTED:
            costs = self.costs
            now = port.now()
            if self.duplex == "full":
                built = srb.miniport_context
                # A port that skips HwBuildIo leaves no build time: the build happens now.
                arrive = built if built.__class__ is float else \
                    self.build_cpus.charge(now, costs.build_s)
                at = self.start_lock.charge(arrive, costs.start_s)
            else:
                work = costs.build_s + costs.start_s + costs.sg_element_s * self._sg_walk(srb)
                at = self.start_lock.charge(now, work)
            self.starts += 1
            self.controller.submit(srb, at)
            # SCSIport wants these before it sends more; Storport ignores them.
            port.next_lu_request(srb.path_id, srb.target_id, srb.lun)
            return True
        controller = self.controller
        if function == SrbFunction.ABORT_COMMAND:
            controller.abort(srb)
            return True
        if function == SrbFunction.RESET_LOGICAL_UNIT:
            found = controller.reset(srb.path_id, srb.target_id, srb.lun, SrbStatus.ABORTED)
        elif function == SrbFunction.RESET_DEVICE:
            found = controller.reset(srb.path_id, srb.target_id, None, SrbStatus.ABORTED)
        elif function == SrbFunction.RESET_BUS:
            found = controller.reset(srb.path_id, None, None, SrbStatus.BUS_RESET)
        else:
            srb.complete(SrbStatus.INVALID_REQUEST)
            port.request_complete(srb)
            return True
        srb.complete(SrbStatus.SUCCESS if found else SrbStatus.NO_DEVICE)
        controller.post(srb)
        return True

    def _sg_walk(self, srb: Srb) -> int:
        """Scatter/gather elements of ``srb`` as the port gives them: fetched one per call
        under SCSIport (ScsiPortGetPhysicalAddress), the whole list at once otherwise."""
        if self.port_model != PORT_MODEL_SCSIPORT:
            return len(srb.sg_list)
        get = self.port.get_physical_address
        total = srb.data_transfer_length
        offset = 0
        calls = 0
        while offset < total:
            element = get(srb, offset)
            calls += 1
            if not element:
                break
            offset += len(element)
        self.sg_calls += calls
        return calls

    def hw_interrupt(self) -> bool:
        controller = self.controller
        port = self.port
        cost = self.costs.interrupt_s
        lock = self.interrupt_lock
        now = port.now()
        serviced = False
        while (srb := controller.reap()) is not None:
            serviced = True
            self.completions += 1
            done = lock.charge(now, cost)
            if done > now or srb.scsi_status == ScsiStatus.BUSY:
                # Still busy with earlier completions (or with starts, in half duplex): this
                # one reaches the port when the routine has got to it. A BUSY answer is
                # always reported from outside the routine, see _report.
                self.reports.add(done, srb)
            else:
                port.request_complete(srb)
        return serviced

    def _report(self, seq: int, srb: Srb) -> None:
        port = self.port
        # Read before completing: the port clears the outcome of a request it will retry.
        busy = srb.scsi_status == ScsiStatus.BUSY
        address = srb.address
        port.request_complete(srb)
        if busy:
            unit = self.controller.units.get(address)
            if unit is not None and unit.slots is not None and address not in self._depth_told:
                # The unit has fewer slots than the port's depth for it: say so once
                # (StorPortSetDeviceQueueDepth), so that the port holds the excess in its queue
                # instead of sending it down to be refused again and again.
                self._depth_told.add(address)
                port.set_queue_depth(*address, unit.slots)
            # And hold the unit until it has finished some of what it has. Called after the
            # port has counted this answer, so the unit waits for completions of real work.
            # A SCSIport-model port has neither control and just retries.
            port.device_busy(*address, self.busy_requests)

    def hw_reset_bus(self, path_id: int) -> bool:
        self.controller.reset(path_id, None, None, SrbStatus.BUS_RESET)
        return True

    def hw_adapter_control(self, control: AdapterControl, parameters: Any = None) -> Any:
        if control is AdapterControl.QUERY_SUPPORTED_CONTROL_TYPES:
            return {AdapterControl.QUERY_SUPPORTED_CONTROL_TYPES, AdapterControl.STOP_ADAPTER,
                    AdapterControl.RESTART_ADAPTER}
        if control is AdapterControl.STOP_ADAPTER:
            # Powered off: nothing in service finishes any more; the port flushes it.
            if self._controller is not None:
                self._controller.stop()
            if hasattr(self, "reports"):
                self.reports.cancel()
            return True
        if control is AdapterControl.RESTART_ADAPTER:
            if self._controller is not None:
                self._controller.accepting = True
            return True
        return None
