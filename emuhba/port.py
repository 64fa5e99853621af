"""The port driver: Storport's queuing model between the Hba facade and one miniport.

Every request waits in the port in a per-logical-unit queue (:class:`LunQueue`). A request leaves
its queue for the miniport (``hw_build_io`` then ``hw_start_io``) only while the adapter and the
logical unit are both ready: not paused, not busy, not being reset, and the unit below its queue
depth. Reaching the depth *holds* requests; nothing is failed for lack of room. There is no
adapter-wide cap unless the miniport asks for one (``PortConfiguration.adapter_queue_limit``).

Completions arrive through ``request_complete``, normally from the miniport's ``hw_interrupt``.
The interrupt service routine runs under the interrupt lock (the one ``synchronize_access`` takes);
the completions it reports are processed right after it returns, outside the lock, like a DPC.
Submission and completion never wait for each other: both run on the event loop, and a completion
that arrives while the port is starting requests only marks its unit runnable.

The queuing policy lives in :meth:`PortDriver._admit` (where a request waits),
:meth:`PortDriver._run` (whose turn it is) and :meth:`PortDriver._start_lun` (how many go to the
miniport). A SCSIport model (one FIFO adapter queue, 254 outstanding, start and completion
serialized under the interrupt lock) replaces those three, selected by the ``model`` argument;
everything else, task management and the scan included, stays shared.

A request that answers BUSY (SRB status or SCSI status) goes back to the head of its unit's
queue and is restarted after ``busy_retry_delay``, indefinitely; only an abort or a reset ends
it early.

Everything except :meth:`PortDriver.interrupt` and :meth:`PortDriver.synchronize_access` must be
called on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, TypeVar

import structlog

from emuhba.miniport import MAX_QUEUE_DEPTH_CLASSIC, AdapterControl, Miniport, PortConfiguration
from emuhba.scsi.cdb import decode_into, decode_lun
from emuhba.srb import DataDirection, ScsiStatus, Srb, SrbFunction, SrbStatus

T = TypeVar("T")
Address = tuple[int, int, int]
Finisher = Callable[[Srb], None]

log = structlog.get_logger("emuhba.port")

# The I_T nexus the port's own commands (bus scan, shutdown flush) come from. Their completions
# go straight to srb.completion, bypassing the facade's finisher: the scan needs raw SRB status.
INTERNAL_NEXUS: Final = -1

MODELS: Final = ("storport",)

# Reasons a logical unit or the adapter sends nothing; a queue is ready when its mask is 0.
_PAUSED: Final = 0x01
_BUSY: Final = 0x02
_RETRY_HOLD: Final = 0x04  # unit: a BUSY answer is waiting out busy_retry_delay
_RESETTING: Final = 0x08  # unit: a LUN/target reset is in progress
_STOPPED: Final = 0x10  # adapter: not started yet, or stopped
_LIMIT: Final = 0x20  # adapter: adapter_queue_limit reached

# Device/adapter busy with nothing outstanding has no completion to count down on; it then ends
# after this back-off instead of holding the queue forever.
BUSY_IDLE_BACKOFF_S: Final = 0.005

# Outcomes that end a request even if the device also reported SCSI BUSY.
_NOT_RETRIED: Final = frozenset(
    {SrbStatus.ABORTED, SrbStatus.BUS_RESET, SrbStatus.REQUEST_FLUSHED}
)
# Nothing answered at that address: the scan treats it as "no target here".
_NO_TARGET: Final = frozenset(
    {SrbStatus.SELECTION_TIMEOUT, SrbStatus.INVALID_TARGET_ID, SrbStatus.NO_DEVICE,
     SrbStatus.INVALID_PATH_ID}
)
# No unit at that address.
_NO_UNIT: Final = _NO_TARGET | {SrbStatus.INVALID_LUN}
_GOOD_ENDINGS: Final = frozenset({SrbStatus.SUCCESS, SrbStatus.DATA_OVERRUN})

_SENSE_KEY_UNIT_ATTENTION: Final = 0x6
_OP_INQUIRY: Final = 0x12
_OP_REQUEST_SENSE: Final = 0x03
_OP_REPORT_LUNS: Final = 0xA0
_OP_SYNCHRONIZE_CACHE_10: Final = 0x35
_INQUIRY_LEN: Final = 96
_SENSE_LEN: Final = 252


class LunQueue:
    """The port's state for one logical unit: held requests, depth, controls and counters.

    Counters are plain ints: ``queued`` (requests ever submitted), ``outstanding`` (at the
    miniport now), ``completed`` (delivered to the submitter, aborted ones included),
    ``busy_retries``, ``aborted`` and ``peak_outstanding``.
    """

    __slots__ = (
        "aborted",
        "active",
        "blocked",
        "busy_remaining",
        "busy_retries",
        "busy_timer",
        "completed",
        "in_run",
        "known",
        "lun",
        "outstanding",
        "path_id",
        "pause_timer",
        "peak_outstanding",
        "queue_depth",
        "queued",
        "resets",
        "retry",
        "retry_timer",
        "target_id",
        "waiting",
    )

    def __init__(self, path_id: int, target_id: int, lun: int, queue_depth: int) -> None:
        self.path_id = path_id
        self.target_id = target_id
        self.lun = lun
        self.queue_depth = queue_depth
        # Held in the port, in arrival order.
        self.waiting: deque[Srb] = deque()
        # Answered BUSY and waiting to be restarted; they go before everything in ``waiting``.
        self.retry: deque[Srb] = deque()
        # At the miniport.
        self.active: set[Srb] = set()
        self.blocked = 0
        self.busy_remaining = 0
        self.resets = 0
        self.in_run = False
        # Found by a bus scan.
        self.known = False
        self.pause_timer: asyncio.TimerHandle | None = None
        self.busy_timer: asyncio.TimerHandle | None = None
        self.retry_timer: asyncio.TimerHandle | None = None
        self.queued = 0
        self.outstanding = 0
        self.peak_outstanding = 0
        self.completed = 0
        self.busy_retries = 0
        self.aborted = 0

    @property
    def address(self) -> Address:
        return (self.path_id, self.target_id, self.lun)

    @property
    def held(self) -> int:
        """Requests waiting in the port (not yet at the miniport)."""
        return len(self.waiting) + len(self.retry)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.retry and not self.active and not self.blocked

    def counters(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "held": self.held,
            "outstanding": self.outstanding,
            "peak_outstanding": self.peak_outstanding,
            "completed": self.completed,
            "busy_retries": self.busy_retries,
            "aborted": self.aborted,
            "queue_depth": self.queue_depth,
        }

    def __repr__(self) -> str:
        return (f"LunQueue({self.path_id}:{self.target_id}:{self.lun}, depth={self.queue_depth}, "
                f"held={self.held}, outstanding={self.outstanding}, blocked=0x{self.blocked:x})")


class _TaskFunction:
    """Port state of an abort/reset SRB the port itself sent down."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def _call_completion(srb: Srb) -> None:
    completion = srb.completion
    if completion is not None:
        completion(srb)


def sense_key(sense: bytes) -> int | None:
    """The sense key of fixed (70h/71h) or descriptor (72h/73h) sense data; None if absent."""
    if len(sense) < 3:
        return None
    code = sense[0] & 0x7F
    if code in (0x70, 0x71):
        return sense[2] & 0x0F
    if code in (0x72, 0x73):
        return sense[1] & 0x0F
    return None


class PortDriver:
    """Storport's port driver for one adapter: implements ``PortServices`` for ``miniport``.

    ``finisher`` receives every completed request that came from outside (the facade uses it to
    turn SRB outcomes into SCSI answers before calling ``srb.completion``); by default
    ``srb.completion(srb)`` is called directly.
    """

    def __init__(
        self,
        miniport: Miniport,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        finisher: Finisher | None = None,
        model: str = "storport",
        busy_retry_delay: float = 0.001,
        reset_timeout: float = 30.0,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown port model {model!r}; known: {', '.join(MODELS)}")
        self.model = model
        self.miniport = miniport
        self.config = PortConfiguration()
        self.busy_retry_delay = busy_retry_delay
        self.reset_timeout = reset_timeout
        self._loop = loop
        self._loop_thread: int | None = None
        self._finisher: Finisher = finisher if finisher is not None else _call_completion
        self._queues: dict[Address, LunQueue] = {}
        self._runnable: deque[LunQueue] = deque()
        self._dispatching = False
        self._blocked = _STOPPED
        self._limit: int | None = None
        self._max_depth: int | None = MAX_QUEUE_DEPTH_CLASSIC
        self._busy_remaining = 0
        self._pause_timer: asyncio.TimerHandle | None = None
        self._busy_timer: asyncio.TimerHandle | None = None
        # Interrupt line: one pending hw_interrupt at most, however many assertions.
        self._irq_lock = threading.Lock()
        self._irq_pending = False
        # Held while the miniport's ISR runs and by synchronize_access. Re-entrant so an ISR
        # may itself call synchronize_access.
        self._int_lock = threading.RLock()
        self._in_isr = False
        self._dpc: list[Srb] = []
        # Requests from outside, held or at the miniport; and who waits for it to reach 0.
        self._pending = 0
        self._idle_waiters: list[asyncio.Future[None]] = []
        # Per-request watchers (abort, reset): woken when the request leaves the miniport.
        self._watchers: dict[Srb, list[asyncio.Future[None]]] = {}
        self._units: dict[tuple[int, int], list[int]] = {}
        self._rescans: dict[int, asyncio.Task[None]] = {}
        self._next_internal_tag = 0
        # Adapter counters.
        self.queued = 0
        self.outstanding = 0
        self.peak_outstanding = 0
        self.completed = 0
        self.busy_retries = 0
        self.aborted = 0
        self.interrupts = 0
        self.interrupt_assertions = 0
        self.next_request_notifications = 0
        self.stray_completions = 0
        self.forced_completions = 0

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def started(self) -> bool:
        return not self._blocked & _STOPPED

    async def start(self) -> bool:
        """HwFindAdapter then HwInitialize; False when the miniport found nothing or failed."""
        loop = self.loop
        if asyncio.get_running_loop() is not loop:
            raise RuntimeError("PortDriver.start must run on the port's event loop")
        self._loop_thread = threading.get_ident()
        config = PortConfiguration()
        if not self.miniport.hw_find_adapter(self, config):
            return False
        self.config = config
        self._max_depth = None if config.srb_type_extended else MAX_QUEUE_DEPTH_CLASSIC
        self._limit = config.adapter_queue_limit
        if not self.miniport.hw_initialize():
            return False
        self._clear_adapter(_STOPPED)
        log.info("adapter_started", miniport=self.miniport.name, model=self.model,
                 buses=config.number_of_buses, targets=config.maximum_number_of_targets,
                 extended_srb=config.srb_type_extended, queue_depth=config.default_queue_depth)
        return True

    async def stop(self) -> None:
        """Stop sending requests and tear the adapter down (:meth:`drain` first to finish I/O).

        Whatever is still held or outstanding afterwards completes REQUEST_FLUSHED here, so
        every request still completes exactly once; the miniport is gone, and anything it
        reports later is a stray.
        """
        self._blocked |= _STOPPED
        for task in self._rescans.values():
            task.cancel()
        for handle in (self._pause_timer, self._busy_timer):
            if handle is not None:
                handle.cancel()
        for lq in self._queues.values():
            for handle in (lq.pause_timer, lq.busy_timer, lq.retry_timer):
                if handle is not None:
                    handle.cancel()
        with self._int_lock:
            try:
                self.miniport.hw_adapter_control(AdapterControl.STOP_ADAPTER)
            finally:
                self.miniport.hw_free_adapter_resources()
        flushed = 0
        for lq in list(self._queues.values()):
            for srb in (*lq.retry, *lq.waiting):
                self._end_held(lq, srb, SrbStatus.REQUEST_FLUSHED)
                flushed += 1
            for srb in list(lq.active):
                self._force(lq, srb, SrbStatus.REQUEST_FLUSHED)
                flushed += 1
        log.info("adapter_stopped", miniport=self.miniport.name, completed=self.completed,
                 flushed=flushed)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until no request from outside is held or outstanding; False on timeout."""
        if self._pending == 0:
            return True
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._idle_waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._idle_waiters.remove(waiter)
        return True

    # ------------------------------------------------------------------------------- queues

    def _clamp_depth(self, depth: int) -> int:
        depth = max(1, depth)
        if self._max_depth is not None:
            depth = min(depth, self._max_depth)
        return depth

    def _queue(self, path_id: int, target_id: int, lun: int) -> LunQueue:
        key = (path_id, target_id, lun)
        lq = self._queues.get(key)
        if lq is None:
            lq = LunQueue(path_id, target_id, lun, self._clamp_depth(self.config.default_queue_depth))
            self._queues[key] = lq
        return lq

    def lun_queue(self, path_id: int, target_id: int, lun: int) -> LunQueue | None:
        return self._queues.get((path_id, target_id, lun))

    def lun_queues(self) -> list[LunQueue]:
        return list(self._queues.values())

    def set_queue_depth(self, path_id: int, target_id: int, lun: int, depth: int) -> int:
        """StorPortSetDeviceQueueDepth: returns the depth in effect (255 max without extended SRBs)."""
        lq = self._queue(path_id, target_id, lun)
        lq.queue_depth = self._clamp_depth(depth)
        self._dispatch(lq)
        return lq.queue_depth

    def units(self) -> dict[tuple[int, int], list[int]]:
        """The last bus scan's result: (path_id, target_id) -> LUNs."""
        return {key: list(luns) for key, luns in self._units.items()}

    def counters(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "outstanding": self.outstanding,
            "peak_outstanding": self.peak_outstanding,
            "completed": self.completed,
            "busy_retries": self.busy_retries,
            "aborted": self.aborted,
            "interrupts": self.interrupts,
            "interrupt_assertions": self.interrupt_assertions,
            "stray_completions": self.stray_completions,
            "forced_completions": self.forced_completions,
        }

    def is_pending(self, srb: Srb) -> bool:
        """True while ``srb`` is held by the port or outstanding at the miniport."""
        return srb._port_state.__class__ is LunQueue

    def pending(self, path_id: int, target_id: int | None = None, lun: int | None = None,
                nexus: int | None = None) -> list[Srb]:
        """Requests from outside held or outstanding at that path/target/LU (oldest held last)."""
        found: list[Srb] = []
        for lq in self._queues.values():
            if lq.path_id != path_id or (target_id is not None and lq.target_id != target_id) or (
                    lun is not None and lq.lun != lun):
                continue
            for srb in (*lq.active, *lq.retry, *lq.waiting):
                if srb.nexus != INTERNAL_NEXUS and (nexus is None or srb.nexus == nexus):
                    found.append(srb)
        return found

    def all_pending(self, nexus: int | None = None) -> list[Srb]:
        paths = {lq.path_id for lq in self._queues.values()}
        return [srb for path in sorted(paths) for srb in self.pending(path, nexus=nexus)]

    # --------------------------------------------------------------------------- submission

    def submit(self, srb: Srb) -> None:
        """Queue ``srb`` on its logical unit and start what the queue controls allow."""
        key = (srb.path_id, srb.target_id, srb.lun)
        lq = self._queues.get(key)
        if lq is None:
            lq = self._queue(srb.path_id, srb.target_id, srb.lun)
        srb._port_state = lq
        lq.queued += 1
        self.queued += 1
        if srb.nexus != INTERNAL_NEXUS:
            self._pending += 1
        self._admit(lq, srb)
        self._dispatch(lq)

    def _admit(self, lq: LunQueue, srb: Srb) -> None:
        if srb.queue_action == 3:  # HEAD OF QUEUE: before everything the port still holds
            lq.waiting.appendleft(srb)
        else:
            lq.waiting.append(srb)

    def _dispatch(self, lq: LunQueue) -> None:
        if not lq.in_run:
            lq.in_run = True
            self._runnable.append(lq)
        self._run()

    def _run(self) -> None:
        # A completion or submission that arrives while we are inside hw_build_io/hw_start_io
        # only queues its unit on _runnable; this outer loop picks it up.
        if self._dispatching:
            return
        self._dispatching = True
        try:
            runnable = self._runnable
            while runnable and not self._blocked:
                lq = runnable.popleft()
                lq.in_run = False
                self._start_lun(lq)
        finally:
            self._dispatching = False

    def _start_lun(self, lq: LunQueue) -> None:
        miniport = self.miniport
        active = lq.active
        retry = lq.retry
        waiting = lq.waiting
        limit = self._limit
        while lq.outstanding < lq.queue_depth and not lq.blocked and not self._blocked:
            if retry:
                srb = retry.popleft()
            elif waiting:
                srb = waiting.popleft()
            else:
                return
            active.add(srb)
            lq.outstanding += 1
            if lq.outstanding > lq.peak_outstanding:
                lq.peak_outstanding = lq.outstanding
            self.outstanding += 1
            if self.outstanding > self.peak_outstanding:
                self.peak_outstanding = self.outstanding
            if limit is not None and self.outstanding >= limit:
                self._blocked |= _LIMIT
            try:
                if miniport.hw_build_io(srb):
                    miniport.hw_start_io(srb)
            except Exception:
                log.exception("miniport_start_failed", srb=repr(srb))
                if srb in active:
                    srb.complete(SrbStatus.ERROR)
                    self._complete(srb)
        if (retry or waiting) and self._blocked and not lq.blocked and not lq.in_run \
                and lq.outstanding < lq.queue_depth:
            # Only the adapter stops this unit: keep its turn for when the adapter is ready.
            lq.in_run = True
            self._runnable.append(lq)

    # --------------------------------------------------------------------------- completion

    def request_complete(self, srb: Srb) -> None:
        """RequestComplete: the miniport is done with ``srb``."""
        if self._in_isr:
            self._dpc.append(srb)
        else:
            self._complete(srb)

    def _complete(self, srb: Srb) -> None:
        lq = srb._port_state
        if lq.__class__ is not LunQueue:
            if lq.__class__ is _TaskFunction:
                srb._port_state = None
                lq.finish()
            else:
                self.stray_completions += 1
            return
        try:
            lq.active.remove(srb)
        except KeyError:  # completed while still held in the port: a miniport bug
            self.stray_completions += 1
            return
        lq.outstanding -= 1
        self.outstanding -= 1
        if lq.blocked & _BUSY:
            lq.busy_remaining -= 1
            if lq.busy_remaining <= 0 or lq.outstanding == 0:
                self._end_device_busy(lq)
        if self._blocked & (_BUSY | _LIMIT):
            self._count_adapter_completion()
        status = srb.srb_status
        if status == SrbStatus.BUSY or (
                srb.scsi_status == ScsiStatus.BUSY and status not in _NOT_RETRIED):
            self._requeue_busy(lq, srb)
        else:
            self._deliver(lq, srb)
        if lq.retry or lq.waiting:
            self._dispatch(lq)
        elif self._runnable:
            self._run()

    def _deliver(self, lq: LunQueue, srb: Srb) -> None:
        srb._port_state = None
        lq.completed += 1
        self.completed += 1
        if srb.srb_status == SrbStatus.ABORTED:
            lq.aborted += 1
            self.aborted += 1
        internal = srb.nexus == INTERNAL_NEXUS
        # A queue made on the fly for an address the miniport says is empty (a probe) goes away
        # once idle, so probing cannot grow the table; queues for real units stay.
        absent = not lq.known and srb.srb_status in _NO_UNIT
        try:
            if internal:
                _call_completion(srb)
            else:
                self._finisher(srb)
        except Exception:
            log.exception("completion_callback_failed", srb=repr(srb))
        if self._watchers:
            self._wake(srb)
        if absent and lq.idle and self._queues.get(lq.address) is lq:
            del self._queues[lq.address]
        if not internal:
            self._pending -= 1
            if self._pending == 0 and self._idle_waiters:
                for waiter in self._idle_waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    def _requeue_busy(self, lq: LunQueue, srb: Srb) -> None:
        # A BUSY answer moved no data: the miniport leaves data_transfer_length as it came, so
        # only the outcome fields are reset for the retry.
        srb.retries += 1
        lq.busy_retries += 1
        self.busy_retries += 1
        srb.srb_status = SrbStatus.PENDING
        srb.scsi_status = ScsiStatus.GOOD
        srb.sense = b""
        srb.residual = 0
        lq.retry.append(srb)
        if not lq.blocked & _RETRY_HOLD:
            lq.blocked |= _RETRY_HOLD
            lq.retry_timer = self.loop.call_later(self.busy_retry_delay, self._end_retry_hold, lq)
        if self._watchers:
            self._wake(srb)

    def _end_retry_hold(self, lq: LunQueue) -> None:
        lq.retry_timer = None
        lq.blocked &= ~_RETRY_HOLD
        self._dispatch(lq)

    def _watch(self, srb: Srb) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._watchers.setdefault(srb, []).append(waiter)
        return waiter

    def _wake(self, srb: Srb) -> None:
        waiters = self._watchers.pop(srb, None)
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # ---------------------------------------------------------------------------- interrupt

    def interrupt(self) -> None:
        """Assert the interrupt line (any thread); one hw_interrupt runs for many assertions."""
        self.interrupt_assertions += 1
        # Unlocked fast path: if we see a stale True, the service routine has not cleared the
        # flag yet, so it has not drained the controller yet either and will see our work.
        if self._irq_pending:
            return
        with self._irq_lock:
            if self._irq_pending:
                return
            self._irq_pending = True
        loop = self.loop
        if threading.get_ident() == self._loop_thread:
            loop.call_soon(self._service_interrupt)
        else:
            try:
                loop.call_soon_threadsafe(self._service_interrupt)
            except RuntimeError:  # loop closed under a late DMA completion: nothing to serve
                with self._irq_lock:
                    self._irq_pending = False

    def _service_interrupt(self) -> None:
        with self._irq_lock:
            self._irq_pending = False
        self.interrupts += 1
        with self._int_lock:
            self._in_isr = True
            try:
                self.miniport.hw_interrupt()
            except Exception:
                log.exception("miniport_interrupt_failed", miniport=self.miniport.name)
            finally:
                self._in_isr = False
        if self._dpc:
            dpc, self._dpc = self._dpc, []
            for srb in dpc:
                self._complete(srb)

    def synchronize_access(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` exclusive with the miniport's interrupt routine (any thread)."""
        with self._int_lock:
            return fn()

    def next_request(self) -> None:
        self.next_request_notifications += 1

    def next_lu_request(self, path_id: int, target_id: int, lun: int) -> None:
        self.next_request_notifications += 1

    def now(self) -> float:
        return self.loop.time()

    def call_later(self, delay: float, fn: Callable[[], None]) -> asyncio.TimerHandle:
        return self.loop.call_later(delay, fn)

    # ------------------------------------------------------------------------ queue controls

    def pause_device(self, path_id: int, target_id: int, lun: int, seconds: float) -> None:
        """StorPortDevicePause: send this unit nothing for ``seconds`` (or until resumed)."""
        lq = self._queue(path_id, target_id, lun)
        if lq.pause_timer is not None:
            lq.pause_timer.cancel()
        lq.blocked |= _PAUSED
        lq.pause_timer = self.loop.call_later(seconds, self.resume_device, path_id, target_id, lun)

    def resume_device(self, path_id: int, target_id: int, lun: int) -> None:
        lq = self._queues.get((path_id, target_id, lun))
        if lq is None or not lq.blocked & _PAUSED:
            return
        if lq.pause_timer is not None:
            lq.pause_timer.cancel()
            lq.pause_timer = None
        lq.blocked &= ~_PAUSED
        self._dispatch(lq)

    def pause(self, seconds: float) -> None:
        """StorPortPause: send the adapter nothing for ``seconds`` (or until resumed)."""
        if self._pause_timer is not None:
            self._pause_timer.cancel()
        self._blocked |= _PAUSED
        self._pause_timer = self.loop.call_later(seconds, self.resume)

    def resume(self) -> None:
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        self._clear_adapter(_PAUSED)

    def device_busy(self, path_id: int, target_id: int, lun: int, requests: int) -> None:
        """StorPortDeviceBusy: hold this unit until ``requests`` of its requests complete."""
        lq = self._queue(path_id, target_id, lun)
        lq.blocked |= _BUSY
        lq.busy_remaining = requests
        if lq.busy_timer is not None:
            lq.busy_timer.cancel()
            lq.busy_timer = None
        if requests <= 0 or lq.outstanding == 0:
            lq.busy_timer = self.loop.call_later(BUSY_IDLE_BACKOFF_S, self._end_device_busy, lq)

    def device_ready(self, path_id: int, target_id: int, lun: int) -> None:
        lq = self._queues.get((path_id, target_id, lun))
        if lq is not None and lq.blocked & _BUSY:
            self._end_device_busy(lq)

    def _end_device_busy(self, lq: LunQueue) -> None:
        if lq.busy_timer is not None:
            lq.busy_timer.cancel()
            lq.busy_timer = None
        lq.busy_remaining = 0
        lq.blocked &= ~_BUSY
        self._dispatch(lq)

    def busy(self, requests: int) -> None:
        """StorPortBusy: hold the whole adapter until ``requests`` requests complete."""
        self._blocked |= _BUSY
        self._busy_remaining = requests
        if self._busy_timer is not None:
            self._busy_timer.cancel()
            self._busy_timer = None
        if requests <= 0 or self.outstanding == 0:
            self._busy_timer = self.loop.call_later(BUSY_IDLE_BACKOFF_S, self.ready)

    def ready(self) -> None:
        if self._busy_timer is not None:
            self._busy_timer.cancel()
            self._busy_timer = None
        self._busy_remaining = 0
        self._clear_adapter(_BUSY)

    def _count_adapter_completion(self) -> None:
        if self._blocked & _BUSY:
            self._busy_remaining -= 1
            if self._busy_remaining <= 0 or self.outstanding == 0:
                self.ready()
        if self._blocked & _LIMIT and self._limit is not None and self.outstanding < self._limit:
            self._clear_adapter(_LIMIT)

    def _clear_adapter(self, bit: int) -> None:
        was = self._blocked
        self._blocked &= ~bit
        if was and not self._blocked:
            self._run()

    # ---------------------------------------------------------------------- task management

    async def _task_function(self, function: SrbFunction, path_id: int, target_id: int,
                             lun: int = 0, nexus: int = INTERNAL_NEXUS, tag: int = 0) -> SrbStatus:
        """Send an abort/reset SRB straight to the miniport (not queued behind the I/O)."""
        tmf = Srb(function=function, path_id=path_id, target_id=target_id, lun=lun,
                  nexus=nexus, queue_tag=tag)
        waiter: asyncio.Future[None] = self.loop.create_future()
        tmf._port_state = _TaskFunction(waiter)
        try:
            if self.miniport.hw_build_io(tmf):
                self.miniport.hw_start_io(tmf)
        except Exception:
            log.exception("miniport_task_function_failed", function=function.name)
            tmf._port_state = None
            return SrbStatus.ERROR
        await waiter
        return tmf.srb_status

    def _remove_held(self, lq: LunQueue, srb: Srb) -> None:
        try:
            lq.waiting.remove(srb)
        except ValueError:
            lq.retry.remove(srb)

    def _end_held(self, lq: LunQueue, srb: Srb, status: SrbStatus) -> None:
        """Complete a request the port still holds (never reached the miniport, or BUSY)."""
        self._remove_held(lq, srb)
        srb.srb_status = status
        self._deliver(lq, srb)

    async def abort(self, srb: Srb) -> bool:
        """Abort one request: True when it ended ABORTED, False if it was not found or the
        miniport could not stop it (it has then completed normally by the time this returns)."""
        if srb._port_state.__class__ is not LunQueue:
            return False
        while True:
            lq = srb._port_state
            if lq.__class__ is not LunQueue:
                return srb.srb_status == SrbStatus.ABORTED
            assert isinstance(lq, LunQueue)
            if srb not in lq.active:
                self._end_held(lq, srb, SrbStatus.ABORTED)
                return True
            # At the miniport: ABORT TASK names the task by I_T_L nexus and tag, as in SAM.
            gone = self._watch(srb)
            status = await self._task_function(SrbFunction.ABORT_COMMAND, srb.path_id,
                                               srb.target_id, srb.lun, srb.nexus, srb.queue_tag)
            if status != SrbStatus.SUCCESS and status != SrbStatus.ABORT_FAILED:
                log.warning("abort_not_supported", status=status.name, srb=repr(srb))
            # Whether or not it was caught, wait until it leaves the miniport (aborted,
            # completed, or answered BUSY and back in the port, where the loop ends it).
            await gone

    async def _end_affected(self, affected: Iterable[Srb], status: SrbStatus) -> None:
        """Every request in ``affected`` completes exactly once: the port ends those it holds,
        and waits (bounded by reset_timeout) for the miniport to return the rest."""
        remaining = list(affected)
        deadline = self.loop.time() + self.reset_timeout
        while remaining:
            at_miniport: list[Srb] = []
            for srb in remaining:
                lq = srb._port_state
                if lq.__class__ is not LunQueue:
                    continue
                assert isinstance(lq, LunQueue)
                if srb in lq.active:
                    at_miniport.append(srb)
                else:
                    self._end_held(lq, srb, status)
            if not at_miniport:
                return
            timeout = deadline - self.loop.time()
            if timeout > 0:
                await asyncio.wait([self._watch(srb) for srb in at_miniport], timeout=timeout)
            else:
                # The miniport lost them. Complete them here; a late request_complete is a stray.
                for srb in at_miniport:
                    lq = srb._port_state
                    if isinstance(lq, LunQueue) and srb in lq.active:
                        log.error("forced_completion", srb=repr(srb))
                        self._force(lq, srb, status)
            remaining = at_miniport

    def _force(self, lq: LunQueue, srb: Srb, status: SrbStatus) -> None:
        """Complete a request the miniport still owns, without it."""
        lq.active.discard(srb)
        lq.outstanding -= 1
        self.outstanding -= 1
        self.forced_completions += 1
        srb.srb_status = status
        self._deliver(lq, srb)

    def _hold(self, queues: list[LunQueue]) -> None:
        for lq in queues:
            lq.resets += 1
            lq.blocked |= _RESETTING

    def _release(self, queues: list[LunQueue]) -> None:
        for lq in queues:
            lq.resets -= 1
            if lq.resets == 0:
                lq.blocked &= ~_RESETTING
                self._dispatch(lq)

    @staticmethod
    def _snapshot(queues: list[LunQueue]) -> list[Srb]:
        return [srb for lq in queues for srb in (*lq.active, *lq.retry, *lq.waiting)]

    async def reset_logical_unit(self, path_id: int, target_id: int, lun: int) -> bool:
        """LOGICAL UNIT RESET: every request to the unit ends ABORTED; new ones wait until done."""
        lq = self._queues.get((path_id, target_id, lun))
        queues = [lq] if lq is not None else []
        return await self._reset(queues, SrbFunction.RESET_LOGICAL_UNIT, path_id, target_id, lun)

    async def reset_device(self, path_id: int, target_id: int) -> bool:
        """TARGET RESET: every unit behind the target id, as one."""
        queues = [lq for lq in self._queues.values()
                  if lq.path_id == path_id and lq.target_id == target_id]
        return await self._reset(queues, SrbFunction.RESET_DEVICE, path_id, target_id, 0)

    async def _reset(self, queues: list[LunQueue], function: SrbFunction, path_id: int,
                     target_id: int, lun: int) -> bool:
        self._hold(queues)
        try:
            affected = self._snapshot(queues)
            for lq in queues:
                for srb in (*lq.retry, *lq.waiting):
                    self._end_held(lq, srb, SrbStatus.ABORTED)
            status = await self._task_function(function, path_id, target_id, lun)
            if status != SrbStatus.SUCCESS:
                log.warning("reset_failed", function=function.name, path_id=path_id,
                            target_id=target_id, lun=lun, status=status.name)
                return False
            await self._end_affected(affected, SrbStatus.ABORTED)
            return True
        finally:
            self._release(queues)

    async def reset_bus(self, path_id: int) -> bool:
        """Bus reset (HwResetBus), the last step of error recovery: everything on the bus ends
        BUS_RESET."""
        queues = [lq for lq in self._queues.values() if lq.path_id == path_id]
        self._hold(queues)
        try:
            affected = self._snapshot(queues)
            for lq in queues:
                for srb in (*lq.retry, *lq.waiting):
                    self._end_held(lq, srb, SrbStatus.BUS_RESET)
            with self._int_lock:
                ok = self.miniport.hw_reset_bus(path_id)
            log.info("bus_reset", path_id=path_id, ok=ok, affected=len(affected))
            await self._end_affected(affected, SrbStatus.BUS_RESET)
            return ok
        finally:
            self._release(queues)

    async def abort_all(self, srbs: Iterable[Srb] | None = None) -> None:
        """Abort the given requests (default: everything from outside), concurrently."""
        targets = list(srbs) if srbs is not None else self.all_pending()
        if targets:
            await asyncio.gather(*(self.abort(srb) for srb in targets))

    # ----------------------------------------------------------------------------- bus scan

    def bus_change_detected(self, path_id: int) -> None:
        """BusChangeDetected: rescan that bus soon (repeated notices share one rescan).

        Before the adapter has started there is nothing to do: the first scan sees it all."""
        if self._loop_thread is None or self._blocked & _STOPPED:
            return
        if threading.get_ident() != self._loop_thread:
            self.loop.call_soon_threadsafe(self.bus_change_detected, path_id)
            return
        task = self._rescans.get(path_id)
        if task is not None and not task.done():
            return
        self._rescans[path_id] = self.loop.create_task(self._rescan(path_id))

    async def _rescan(self, path_id: int) -> None:
        try:
            await self._scan_bus(path_id)
        except Exception:
            log.exception("bus_rescan_failed", path_id=path_id)
            return
        log.info("bus_rescanned", path_id=path_id,
                 units={f"{p}:{t}": luns for (p, t), luns in self._units.items() if p == path_id})

    async def scan(self) -> dict[tuple[int, int], list[int]]:
        """Find every target and LU on every bus (INQUIRY LUN 0, then REPORT LUNS)."""
        for path_id in range(self.config.number_of_buses):
            await self._scan_bus(path_id)
        log.info("bus_scan_done", units={f"{p}:{t}": luns for (p, t), luns in self._units.items()})
        return self.units()

    async def _scan_bus(self, path_id: int) -> None:
        targets = range(self.config.maximum_number_of_targets)
        found = await asyncio.gather(*(self._scan_target(path_id, tid) for tid in targets))
        for tid, luns in zip(targets, found, strict=True):
            key = (path_id, tid)
            old = set(self._units.get(key, ()))
            if luns is None:
                self._units.pop(key, None)
            else:
                self._units[key] = luns
            for lun in old - set(luns or ()):
                lq = self._queues.get((path_id, tid, lun))
                if lq is not None:
                    lq.known = False
                    if lq.idle:
                        del self._queues[lq.address]
            for lun in luns or ():
                self._queue(path_id, tid, lun).known = True

    async def _scan_target(self, path_id: int, target_id: int) -> list[int] | None:
        inquiry = await self.command(path_id, target_id, 0, _inquiry_cdb(_INQUIRY_LEN), _INQUIRY_LEN)
        if inquiry.srb_status in _NO_TARGET:
            return None
        # Something answered, so the target exists even if LUN 0 does not (INVALID_LUN, or
        # peripheral qualifier 011b).
        lun0_present = _unit_present(inquiry)
        luns = await self._report_luns(path_id, target_id)
        if luns is None:
            # REPORT LUNS unsupported: probe each LUN with INQUIRY, as SCSIport did.
            limit = self.config.maximum_number_of_logical_units
            probes = await asyncio.gather(*(
                self.command(path_id, target_id, lun, _inquiry_cdb(_INQUIRY_LEN), _INQUIRY_LEN)
                for lun in range(1, limit)))
            luns = [0] if lun0_present else []
            luns += [lun for lun, srb in zip(range(1, limit), probes, strict=True)
                     if _unit_present(srb)]
        return sorted(set(luns))

    async def _report_luns(self, path_id: int, target_id: int) -> list[int] | None:
        length = 8 + 8 * max(256, self.config.maximum_number_of_logical_units)
        for _ in range(2):
            srb = await self.command(path_id, target_id, 0, _report_luns_cdb(length), length)
            if srb.srb_status not in _GOOD_ENDINGS or srb.scsi_status != ScsiStatus.GOOD:
                return None
            data = srb.sg_list[0]
            moved = min(srb.data_transfer_length, length)
            if moved < 8:
                return None
            list_length = int.from_bytes(data[0:4], "big")
            if list_length + 8 > length:
                length = list_length + 8
                continue
            luns: list[int] = []
            for offset in range(8, min(8 + list_length, moved) - 7, 8):
                lun = decode_lun(data[offset:offset + 8])
                if lun is not None:
                    luns.append(lun)
            return luns
        return None

    async def command(self, path_id: int, target_id: int, lun: int, cdb: bytes,
                      data_in: int = 0) -> Srb:
        """Send one command of the port's own through the normal queues and wait for it.

        A unit attention (the power-on one each new nexus sees, say) is consumed and the
        command retried; CHECK CONDITION without sense is followed by REQUEST SENSE first.
        """
        srb = await self._command_once(path_id, target_id, lun, cdb, data_in)
        for _ in range(3):
            if srb.scsi_status != ScsiStatus.CHECK_CONDITION or srb.srb_status in _NO_TARGET:
                break
            key = sense_key(srb.sense)
            if key is None:
                sense = await self._command_once(path_id, target_id, lun,
                                                 _request_sense_cdb(_SENSE_LEN), _SENSE_LEN)
                if sense.srb_status not in _GOOD_ENDINGS:
                    break
                key = sense_key(bytes(sense.sg_list[0][:sense.data_transfer_length]))
            if key != _SENSE_KEY_UNIT_ATTENTION:
                break
            srb = await self._command_once(path_id, target_id, lun, cdb, data_in)
        return srb

    async def _command_once(self, path_id: int, target_id: int, lun: int, cdb: bytes,
                            data_in: int) -> Srb:
        done: asyncio.Future[None] = self.loop.create_future()

        def finished(_: Srb) -> None:
            if not done.done():
                done.set_result(None)

        self._next_internal_tag = (self._next_internal_tag + 1) & 0xFFFFFFFF
        srb = Srb(path_id=path_id, target_id=target_id, lun=lun, cdb=cdb,
                  data_direction=DataDirection.IN if data_in else DataDirection.NONE,
                  data_transfer_length=data_in,
                  sg_list=[memoryview(bytearray(data_in))] if data_in else [],
                  queue_tag=self._next_internal_tag, nexus=INTERNAL_NEXUS, completion=finished)
        problem = decode_into(srb)
        if problem is not None:
            raise ValueError(f"port built a malformed CDB {cdb.hex()}: {problem}")
        self.submit(srb)
        await done
        return srb


def _unit_present(inquiry: Srb) -> bool:
    """An INQUIRY answered with peripheral qualifier 000b: a unit is connected there."""
    return (inquiry.srb_status in _GOOD_ENDINGS and inquiry.scsi_status == ScsiStatus.GOOD
            and inquiry.data_transfer_length > 0 and inquiry.sg_list[0][0] >> 5 == 0)


def _inquiry_cdb(length: int) -> bytes:
    return bytes((_OP_INQUIRY, 0, 0)) + length.to_bytes(2, "big") + b"\x00"


def _request_sense_cdb(length: int) -> bytes:
    return bytes((_OP_REQUEST_SENSE, 0, 0, 0, length, 0))


def _report_luns_cdb(length: int) -> bytes:
    return bytes((_OP_REPORT_LUNS, 0, 0, 0, 0, 0)) + length.to_bytes(4, "big") + b"\x00\x00"


def synchronize_cache_cdb() -> bytes:
    """SYNCHRONIZE CACHE (10) over the whole medium."""
    return bytes((_OP_SYNCHRONIZE_CACHE_10,)) + bytes(9)
