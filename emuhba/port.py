"""The port driver between the Hba facade and one miniport: Storport's model, or SCSIport's for
comparison (``PortDriver(miniport, model="scsiport")``). Everything above the port is the same
in both.

Storport model (the default)
    Every request waits in the port in a per-logical-unit queue (:class:`LunQueue`). A request
    leaves its queue for the miniport (``hw_build_io`` then ``hw_start_io``) only while the
    adapter and the logical unit are both ready: not paused, not busy, not being reset, and the
    unit below its queue depth (255 at most unless the miniport declares extended SRBs).
    Reaching the depth *holds* requests; nothing is failed for lack of room. There is no
    adapter-wide cap unless the miniport or the operator configures one. The eight queue
    controls (pause for a time / resume, busy until N complete / ready; for a unit and for the
    adapter) hold and release those queues; what they held goes down in order afterwards.

SCSIport model (:class:`ScsiPortDriver`)
    One FIFO adapter queue shared by every unit, at most 254 requests at the miniport. The
    start path (``hw_build_io`` + ``hw_start_io``) runs under the same adapter lock as the
    interrupt routine, so the two exclude each other (half duplex). The scatter/gather list is
    hidden from the miniport, which fetches it one element per ``get_physical_address`` call.
    The queue controls do not exist (calls are counted and ignored), so a device answering BUSY
    keeps its request at the head of the adapter queue and everything behind it waits.

Interrupts
    ``interrupt()`` may be called from any thread. Raised on the loop, the interrupt routine
    runs on the loop soon after (many assertions, one call). Raised on another thread (a
    controller's DMA worker), that thread runs the routine itself under the interrupt lock:
    under Storport that lock is not held by starts, so completions are serviced while a start is
    in progress (full duplex); under SCSIport it is the adapter lock and the thread waits for
    the start to end. Either way the routine only collects what the miniport reports with
    ``request_complete``; the port processes it on the loop right after, like a DPC, outside
    the lock. ``synchronize_access`` takes the interrupt lock.

BUSY
    A request that answers BUSY (SRB status or SCSI status) is built and started again after
    ``busy_retry_delay``, indefinitely; only an abort or a reset ends it early. Under Storport it
    waits at the head of its unit's queue (the unit is held meanwhile); under SCSIport at the
    head of the adapter queue (the adapter is held).

Error recovery
    A request at the miniport for longer than ``request_timeout`` has timed out. Under Storport
    the port escalates, each step only if the one before did not clear the fault within
    ``recovery_timeout``: abort the task, reset the logical unit, reset the target, reset the
    bus (``hw_reset_bus``). SCSIport goes straight to the bus reset. Requests a port-initiated
    reset caught on the way are restarted, not failed; the timed-out ones complete TIMEOUT;
    whatever even the bus reset does not bring back is completed TIMEOUT without the miniport.
    Sense data from the device is never rewritten.

Observability
    Plain-int counters on the adapter and on each :class:`LunQueue` (``counters()``), and a
    :class:`LatencyHistogram` of submit-to-completion time in log2 microsecond buckets on both
    (``latency``).

Everything except ``interrupt``, ``request_complete``, ``synchronize_access`` and the queue
controls must be called on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple, TypeVar

import structlog

from emuhba.miniport import (
    MAX_QUEUE_DEPTH_CLASSIC,
    PORT_MODEL_SCSIPORT,
    PORT_MODEL_STORPORT,
    AdapterControl,
    Miniport,
    MiniportIoctlError,
    PortConfiguration,
)
from emuhba.scsi.cdb import decode_into, decode_lun
from emuhba.srb import DataDirection, QueueAction, ScsiStatus, Srb, SrbFunction, SrbStatus

T = TypeVar("T")
Address = tuple[int, int, int]
Finisher = Callable[[Srb], None]

log = structlog.get_logger("emuhba.port")

_get_ident = threading.get_ident

# The I_T nexus the port's own commands (bus scan, shutdown flush) come from. Their completions
# go straight to srb.completion, bypassing the facade's finisher: the scan needs raw SRB status.
INTERNAL_NEXUS: Final = -1

MODELS: Final = (PORT_MODEL_STORPORT, PORT_MODEL_SCSIPORT)

# SCSIport's limit on requests outstanding at one adapter, shared by all its devices.
SCSIPORT_ADAPTER_LIMIT: Final = 254
# The unit of one SCSIport scatter/gather element: a buffer is physically contiguous only
# within a page, so get_physical_address never hands out more than the rest of one.
SG_ELEMENT_BYTES: Final = 4096

# Windows' disk class default (TimeOutValue): long enough never to fire on a healthy device.
DEFAULT_REQUEST_TIMEOUT: Final = 60.0
DEFAULT_RECOVERY_TIMEOUT: Final = 10.0

# Reasons a logical unit or the adapter sends nothing; a queue is ready when its mask is 0.
_PAUSED: Final = 0x01
_BUSY: Final = 0x02
_RETRY_HOLD: Final = 0x04  # a BUSY answer is waiting out busy_retry_delay
_RESETTING: Final = 0x08  # unit: a reset is in progress
_STOPPED: Final = 0x10  # adapter: not started yet, or stopped
_LIMIT: Final = 0x20  # adapter: adapter queue limit reached

# Device/adapter busy with nothing outstanding has no completion to count down on; it then ends
# after this back-off instead of holding the queue forever.
BUSY_IDLE_BACKOFF_S: Final = 0.005

# Outcomes that end a request even if the device also reported SCSI BUSY.
_NOT_RETRIED: Final = frozenset(
    {SrbStatus.ABORTED, SrbStatus.BUS_RESET, SrbStatus.REQUEST_FLUSHED}
)
# How a request comes back when an abort or reset caught it at the miniport.
_KILLED: Final = _NOT_RETRIED
# Nothing answered at that address: the scan treats it as "no target here".
_NO_TARGET: Final = frozenset(
    {SrbStatus.SELECTION_TIMEOUT, SrbStatus.INVALID_TARGET_ID, SrbStatus.NO_DEVICE,
     SrbStatus.INVALID_PATH_ID}
)
# No unit at that address.
_NO_UNIT: Final = _NO_TARGET | {SrbStatus.INVALID_LUN}
_GOOD_ENDINGS: Final = frozenset({SrbStatus.SUCCESS, SrbStatus.DATA_OVERRUN})

# Why error recovery is watching a request at the miniport.
_MARK_TIMED_OUT: Final = 1  # it timed out: completes TIMEOUT if recovery kills it
_MARK_CAUGHT: Final = 2  # a port-initiated reset caught it: restarted if it comes back killed

_SENSE_KEY_UNIT_ATTENTION: Final = 0x6
_OP_INQUIRY: Final = 0x12
_OP_REQUEST_SENSE: Final = 0x03
_OP_REPORT_LUNS: Final = 0xA0
_OP_SYNCHRONIZE_CACHE_10: Final = 0x35
_INQUIRY_LEN: Final = 96
_SENSE_LEN: Final = 252

_EMPTY: Final = memoryview(b"")

# Enum members the per-I/O path compares against, as plain module globals: reading
# ``SrbStatus.BUSY`` goes through the enum metaclass each time and costs several times the
# comparison itself.
_SRB_BUSY: Final = SrbStatus.BUSY
_SRB_ABORTED: Final = SrbStatus.ABORTED
_SCSI_BUSY: Final = ScsiStatus.BUSY
_HEAD_OF_QUEUE: Final = QueueAction.HEAD_OF_QUEUE
_COUNTING: Final = _BUSY | _LIMIT  # adapter states that count completions

# ------------------------------------------------------------------------- latency histogram

LATENCY_BUCKETS: Final = 32
_LAST_BUCKET: Final = LATENCY_BUCKETS - 1
# Exclusive upper bound of each bucket in microseconds; the last bucket has none.
LATENCY_BUCKET_LIMITS_US: Final = tuple(1 << i for i in range(_LAST_BUCKET))


class LatencyHistogram:
    """Submit-to-completion time of requests, counted in fixed log2 microsecond buckets.

    ``counts[i]`` counts requests whose latency ``us`` (whole microseconds) has
    ``us.bit_length() == i``: bucket 0 is under 1 µs, bucket i (1..30) is
    ``[2**(i-1), 2**i)`` µs, and bucket 31 takes everything from 2**30 µs (about 18 minutes)
    up. ``sum_us`` is the total. The port updates both in place (plain ints in a list made
    once), so recording a request allocates nothing.
    """

    __slots__ = ("counts", "sum_us")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * LATENCY_BUCKETS
        self.sum_us = 0

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def sum_seconds(self) -> float:
        return self.sum_us / 1e6

    def buckets(self) -> list[tuple[float, int]]:
        """``(upper bound in seconds, count)`` per bucket, not cumulative; the last bound is
        +inf."""
        bounds = [limit / 1e6 for limit in LATENCY_BUCKET_LIMITS_US] + [float("inf")]
        return list(zip(bounds, self.counts, strict=True))

    def prometheus_buckets(self) -> tuple[list[tuple[float, int]], float]:
        """Cumulative ``(le seconds, count)`` pairs ending at +inf, and the sum in seconds: a
        Prometheus histogram as is."""
        running = 0
        out: list[tuple[float, int]] = []
        for bound, n in self.buckets():
            running += n
            out.append((bound, running))
        return out, self.sum_seconds

    def quantile(self, q: float) -> float:
        """Upper bound in seconds of the bucket holding the ``q`` quantile (0 < q <= 1); 0.0
        with no data. Exact to a factor of two, like the buckets."""
        total = self.count
        if total == 0:
            return 0.0
        rank = q * total
        running = 0
        for i, n in enumerate(self.counts):
            running += n
            if running >= rank and n:
                return (LATENCY_BUCKET_LIMITS_US[i] / 1e6 if i < _LAST_BUCKET
                        else float("inf"))
        return float("inf")

    def clear(self) -> None:
        for i in range(LATENCY_BUCKETS):
            self.counts[i] = 0
        self.sum_us = 0

    def add(self, other: LatencyHistogram) -> None:
        counts = self.counts
        for i, n in enumerate(other.counts):
            counts[i] += n
        self.sum_us += other.sum_us

    @classmethod
    def total(cls, histograms: Iterable[LatencyHistogram]) -> LatencyHistogram:
        result = cls()
        for histogram in histograms:
            result.add(histogram)
        return result

    def __repr__(self) -> str:
        return f"LatencyHistogram(count={self.count}, sum_us={self.sum_us})"


class RecoveryStep(NamedTuple):
    """One step of error recovery, as kept in ``PortDriver.recovery_history``."""

    time: float  # the port's clock (loop time) when the step began
    step: str  # "abort_task", "lun_reset", "target_reset", "bus_reset" or "give_up"
    address: Address  # the unit whose request timed out
    requests: int  # requests at the miniport the step had to bring back
    cleared: bool  # whether the step cleared the fault


class LunQueue:
    """The port's state for one logical unit: held requests, depth, controls and counters.

    Counters (plain ints, see ``counters()``): ``queued`` (requests ever submitted),
    ``outstanding`` (at the miniport now), ``peak_outstanding``, ``completed`` (delivered to the
    submitter, aborted ones included), ``busy_retries``, ``aborted``, ``pauses`` and ``busies``
    (device pause / busy controls applied), ``resets`` (LUN, target or bus resets that covered
    the unit), ``timeouts`` (requests that timed out at the miniport), ``reset_retries``
    (requests a port-initiated reset caught and the port restarted). ``latency`` is the unit's
    :class:`LatencyHistogram`.
    """

    __slots__ = (
        "aborted",
        "active",
        "blocked",
        "busies",
        "busy_remaining",
        "busy_retries",
        "busy_timer",
        "completed",
        "fifo_held",
        "in_run",
        "known",
        "latency",
        "lun",
        "outstanding",
        "path_id",
        "pause_timer",
        "pauses",
        "peak_outstanding",
        "queue_depth",
        "queued",
        "recovering",
        "reset_holds",
        "reset_retries",
        "resets",
        "retry",
        "retry_timer",
        "target_id",
        "timeouts",
        "waiting",
    )

    def __init__(self, path_id: int, target_id: int, lun: int, queue_depth: int) -> None:
        self.path_id = path_id
        self.target_id = target_id
        self.lun = lun
        self.queue_depth = queue_depth
        # Held in the port, in arrival order.
        self.waiting: deque[Srb] = deque()
        # Answered BUSY (or caught by a port-initiated reset) and waiting to be restarted; they
        # go before everything in ``waiting``.
        self.retry: deque[Srb] = deque()
        # At the miniport, in the order they were started, each with the watchdog epoch it
        # started in: the oldest is first, which is all the request timeout has to look at.
        self.active: dict[Srb, int] = {}
        # Held in the SCSIport model's adapter queue (which holds the requests themselves).
        self.fifo_held = 0
        self.blocked = 0
        self.busy_remaining = 0
        # Resets in progress that hold the unit (they may overlap).
        self.reset_holds = 0
        self.in_run = False
        self.recovering = False
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
        self.pauses = 0
        self.busies = 0
        self.resets = 0
        self.timeouts = 0
        self.reset_retries = 0
        self.latency = LatencyHistogram()

    @property
    def address(self) -> Address:
        return (self.path_id, self.target_id, self.lun)

    @property
    def held(self) -> int:
        """Requests waiting in the port (not yet at the miniport)."""
        return len(self.waiting) + len(self.retry) + self.fifo_held

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.retry or self.active or self.blocked or self.fifo_held)

    @property
    def paused(self) -> bool:
        return bool(self.blocked & _PAUSED)

    @property
    def busy(self) -> bool:
        return bool(self.blocked & _BUSY)

    @property
    def resetting(self) -> bool:
        return bool(self.blocked & _RESETTING)

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
            "pauses": self.pauses,
            "busies": self.busies,
            "resets": self.resets,
            "timeouts": self.timeouts,
            "reset_retries": self.reset_retries,
            "latency_count": self.latency.count,
            "latency_sum_us": self.latency.sum_us,
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


def _clear_outcome(srb: Srb) -> None:
    # A BUSY or killed answer moved no data: the miniport leaves data_transfer_length as it
    # came, so only the outcome fields are reset before the request goes down again.
    srb.srb_status = SrbStatus.PENDING
    srb.scsi_status = ScsiStatus.GOOD
    srb.sense = b""
    srb.residual = 0


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


def _monotonic_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], int]:
    """The nanosecond clock for latency and time-outs: the loop's own when it keeps one (a
    virtual-time loop), else time.monotonic_ns, which is the same clock at a finer grain than
    some loops report (uvloop rounds to milliseconds)."""
    if abs(loop.time() - time.monotonic()) < 1.0:
        return time.monotonic_ns
    loop_time = loop.time

    def virtual_ns() -> int:
        return int(loop_time() * 1e9)

    return virtual_ns


class PortDriver:
    """The port driver for one adapter: implements ``PortServices`` for ``miniport``.

    ``model`` is "storport" (this class) or "scsiport" (constructs a :class:`ScsiPortDriver`).
    ``finisher`` receives every completed request that came from outside (the facade uses it to
    turn SRB outcomes into SCSI answers before calling ``srb.completion``); by default
    ``srb.completion(srb)`` is called directly. ``adapter_queue_limit`` caps the requests
    outstanding at the adapter (None: only the miniport's own cap, if it declares one).
    ``request_timeout`` (seconds at the miniport; None: never) starts error recovery;
    ``recovery_timeout`` bounds each recovery step. ``reset_timeout`` bounds how long a reset
    the initiator asked for waits for the miniport to return what it caught.
    """

    # Whether the start path takes the interrupt lock (SCSIport's half duplex).
    _starts_locked = False

    def __new__(cls, miniport: Miniport, *args: Any, **kwargs: Any) -> PortDriver:
        if cls is PortDriver and kwargs.get("model") == PORT_MODEL_SCSIPORT:
            cls = ScsiPortDriver
        return super().__new__(cls)

    def __init__(
        self,
        miniport: Miniport,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        finisher: Finisher | None = None,
        model: str = PORT_MODEL_STORPORT,
        busy_retry_delay: float = 0.001,
        reset_timeout: float = 30.0,
        adapter_queue_limit: int | None = None,
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
        recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown port model {model!r}; known: {', '.join(MODELS)}")
        if request_timeout is not None and request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive or None, not {request_timeout}")
        self.model = model
        self.miniport = miniport
        # Called on the loop with (path_id, target_id) when a scan finds a target's LUNs
        # changed (appeared, went away, or the target itself did).
        self.on_units_changed: Callable[[int, int], None] | None = None
        self.config = PortConfiguration(port_model=model)
        self.busy_retry_delay = busy_retry_delay
        self.reset_timeout = reset_timeout
        self.request_timeout = request_timeout
        self.recovery_timeout = recovery_timeout
        self._loop = loop
        self._loop_thread: int | None = None
        # The miniport's HwBuildIo, or None when it has none of its own (it is optional, as in
        # Storport's HW_INITIALIZATION_DATA): then there is nothing to call before the start.
        self._build_io: Callable[[Srb], bool] | None = None
        self._now_ns: Callable[[], int] = time.monotonic_ns
        self._finisher: Finisher = finisher if finisher is not None else _call_completion
        self._queues: dict[Address, LunQueue] = {}
        self._runnable: deque[LunQueue] = deque()
        self._dispatching = False
        self._blocked = _STOPPED
        self._operator_limit = adapter_queue_limit
        self._limit: int | None = adapter_queue_limit
        self._max_depth: int | None = MAX_QUEUE_DEPTH_CLASSIC
        self._busy_remaining = 0
        self._pause_timer: asyncio.TimerHandle | None = None
        self._busy_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        # Interrupt line: one pending service at most, however many assertions.
        self._irq_lock = threading.Lock()
        self._irq_pending = False
        # The interrupt lock: held while the miniport's interrupt routine runs and by
        # synchronize_access; under SCSIport also around every start (the adapter lock).
        # Re-entrant so an interrupt routine may itself call synchronize_access.
        self._int_lock = threading.RLock()
        self._isr_thread: int | None = None
        # SCSIport: a start routine is running (under the adapter lock).
        self._in_start = False
        # Completions the interrupt routine reported, for the loop to process (the DPC).
        self._dpc: deque[Srb] = deque()
        self._dpc_scheduled = False
        # Requests from outside, held or at the miniport; and who waits for it to reach 0.
        self._pending = 0
        self._idle_waiters: list[asyncio.Future[None]] = []
        # Per-request watchers (abort, reset, recovery): woken when it leaves the miniport.
        self._watchers: dict[Srb, list[asyncio.Future[None]]] = {}
        # Requests error recovery is watching (_MARK_*).
        self._marks: dict[Srb, int] = {}
        # SCSIport: the scatter/gather lists hidden from the miniport while it has the request.
        self._sg_hidden: dict[Srb, list[memoryview]] = {}
        self._watchdog: asyncio.TimerHandle | None = None
        # Watchdog ticks so far: requests are stamped with it when started, which costs no
        # clock read; a request is late when enough ticks have passed since its stamp.
        self._epoch = 0
        self._recoveries: set[asyncio.Task[None]] = set()
        # Target and bus resets cover other units, which may be recovering too: one at a time,
        # and a unit whose fault a neighbour's reset cleared meanwhile skips its own.
        self._wide_reset = asyncio.Lock()
        self.recovery_history: deque[RecoveryStep] = deque(maxlen=64)
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
        self.interrupts_during_start = 0
        self.next_request_notifications = 0
        self.stray_completions = 0
        self.forced_completions = 0
        self.pauses = 0
        self.busies = 0
        self.device_pauses = 0
        self.device_busies = 0
        self.ignored_controls = 0
        self.lun_resets = 0
        self.target_resets = 0
        self.bus_resets = 0
        self.timeouts = 0
        self.recovery_aborts = 0
        self.recovery_lun_resets = 0
        self.recovery_target_resets = 0
        self.recovery_bus_resets = 0
        self.recovery_failures = 0
        self.reset_retries = 0
        self.sg_element_calls = 0
        # Latency of units whose queue was dropped (probed addresses with nothing there).
        self._retired_latency = LatencyHistogram()

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
        self._now_ns = _monotonic_clock(loop)
        config = PortConfiguration(port_model=self.model)
        if not self.miniport.hw_find_adapter(self, config):
            return False
        config.port_model = self.model
        self.config = config
        miniport = self.miniport
        self._build_io = None if type(miniport).hw_build_io is Miniport.hw_build_io \
            else miniport.hw_build_io
        self._max_depth = None if config.srb_type_extended else MAX_QUEUE_DEPTH_CLASSIC
        self._limit = self._adapter_limit(config.adapter_queue_limit)
        if not self.miniport.hw_initialize():
            return False
        self._clear_adapter(_STOPPED)
        log.info("adapter_started", miniport=self.miniport.name, model=self.model,
                 buses=config.number_of_buses, targets=config.maximum_number_of_targets,
                 extended_srb=config.srb_type_extended, queue_depth=config.default_queue_depth,
                 adapter_limit=self.adapter_limit)
        return True

    def _adapter_limit(self, miniport_limit: int | None) -> int | None:
        limits = [n for n in (miniport_limit, self._operator_limit) if n is not None]
        return min(limits) if limits else None

    @property
    def adapter_limit(self) -> int | None:
        """Most requests outstanding at the adapter at once; None: no adapter-wide limit."""
        return self._limit

    async def stop(self) -> None:
        """Stop sending requests and tear the adapter down (:meth:`drain` first to finish I/O).

        Whatever is still held or outstanding afterwards completes REQUEST_FLUSHED here, so
        every request still completes exactly once; the miniport is gone, and anything it
        reports later is a stray.
        """
        self._blocked |= _STOPPED
        for task in (*self._rescans.values(), *self._recoveries):
            task.cancel()
        for handle in (self._pause_timer, self._busy_timer, self._retry_timer, self._watchdog):
            if handle is not None:
                handle.cancel()
        self._watchdog = None
        for lq in self._queues.values():
            for handle in (lq.pause_timer, lq.busy_timer, lq.retry_timer):
                if handle is not None:
                    handle.cancel()
        try:
            with self._int_lock:
                self.miniport.hw_adapter_control(AdapterControl.STOP_ADAPTER)
        finally:
            # Outside the lock: freeing may wait for controller threads that are themselves
            # waiting for it to run the interrupt routine.
            self.miniport.hw_free_adapter_resources()
        flushed = 0
        for lq in list(self._queues.values()):
            for srb in self._held(lq):
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
        """StorPortSetDeviceQueueDepth: returns the depth in effect (at least 1; 255 at most
        without extended SRBs). Lowered below what is outstanding, it holds new requests until
        enough complete; raised, it sends what it held at once."""
        lq = self._queue(path_id, target_id, lun)
        lq.queue_depth = self._clamp_depth(depth)
        self._dispatch(lq)
        return lq.queue_depth

    def units(self) -> dict[tuple[int, int], list[int]]:
        """The last bus scan's result: (path_id, target_id) -> LUNs."""
        return {key: list(luns) for key, luns in self._units.items()}

    def counters(self) -> dict[str, int]:
        latency = self.latency
        return {
            "queued": self.queued,
            "held": sum(lq.held for lq in self._queues.values()),
            "outstanding": self.outstanding,
            "peak_outstanding": self.peak_outstanding,
            "completed": self.completed,
            "busy_retries": self.busy_retries,
            "aborted": self.aborted,
            "interrupts": self.interrupts,
            "interrupt_assertions": self.interrupt_assertions,
            "interrupts_during_start": self.interrupts_during_start,
            "stray_completions": self.stray_completions,
            "forced_completions": self.forced_completions,
            "pauses": self.pauses,
            "busies": self.busies,
            "device_pauses": self.device_pauses,
            "device_busies": self.device_busies,
            "ignored_controls": self.ignored_controls,
            "lun_resets": self.lun_resets,
            "target_resets": self.target_resets,
            "bus_resets": self.bus_resets,
            "timeouts": self.timeouts,
            "recovery_aborts": self.recovery_aborts,
            "recovery_lun_resets": self.recovery_lun_resets,
            "recovery_target_resets": self.recovery_target_resets,
            "recovery_bus_resets": self.recovery_bus_resets,
            "recovery_failures": self.recovery_failures,
            "reset_retries": self.reset_retries,
            "sg_element_calls": self.sg_element_calls,
            "latency_count": latency.count,
            "latency_sum_us": latency.sum_us,
        }

    @property
    def latency(self) -> LatencyHistogram:
        """The adapter's latency histogram: the sum of its units' (computed on each read)."""
        return LatencyHistogram.total(
            [self._retired_latency, *(lq.latency for lq in self._queues.values())])

    @property
    def paused(self) -> bool:
        """The adapter is paused (pause(), until resume() or its time is up)."""
        return bool(self._blocked & _PAUSED)

    @property
    def busy_state(self) -> bool:
        """The adapter is busy (busy(), until enough requests completed or ready())."""
        return bool(self._blocked & _BUSY)

    @property
    def busy_remaining(self) -> int:
        """Completions the busy adapter still waits for."""
        return self._busy_remaining if self._blocked & _BUSY else 0

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
            for srb in (*lq.active, *self._held(lq)):
                if srb.nexus != INTERNAL_NEXUS and (nexus is None or srb.nexus == nexus):
                    found.append(srb)
        return found

    def all_pending(self, nexus: int | None = None) -> list[Srb]:
        paths = {lq.path_id for lq in self._queues.values()}
        return [srb for path in sorted(paths) for srb in self.pending(path, nexus=nexus)]

    def _held(self, lq: LunQueue) -> list[Srb]:
        """What the port holds for ``lq``, in the order it would send it."""
        return [*lq.retry, *lq.waiting]

    def _remove_held(self, lq: LunQueue, srb: Srb) -> None:
        try:
            lq.waiting.remove(srb)
        except ValueError:
            lq.retry.remove(srb)

    def _at_miniport(self, srb: Srb) -> bool:
        lq = srb._port_state
        return lq.__class__ is LunQueue and srb in lq.active

    # --------------------------------------------------------------------------- submission

    def submit(self, srb: Srb) -> None:
        """Queue ``srb`` on its logical unit and start what the queue controls allow."""
        # The per-I/O path: _book, the queueing and _dispatch written out in line.
        lq = self._queues.get((srb.path_id, srb.target_id, srb.lun))
        if lq is None:
            lq = self._queue(srb.path_id, srb.target_id, srb.lun)
        srb._port_state = lq
        srb.start_ns = self._now_ns()
        lq.queued += 1
        self.queued += 1
        if srb.nexus != INTERNAL_NEXUS:
            self._pending += 1
        if (lq.outstanding < lq.queue_depth and not lq.waiting and not lq.retry and not lq.blocked
                and not self._blocked and not self._dispatching and not self._runnable
                and self._watchdog is not None):
            # Nothing queued ahead and nothing holding the unit: start it now, as _start_lun
            # would, without the trip through the queue.
            self._start_now(lq, srb)
            return
        if srb.queue_action == _HEAD_OF_QUEUE:  # before everything still held
            lq.waiting.appendleft(srb)
        else:
            lq.waiting.append(srb)
        if not lq.in_run:
            lq.in_run = True
            self._runnable.append(lq)
        self._run()

    def _start_now(self, lq: LunQueue, srb: Srb) -> None:
        self._dispatching = True
        try:
            self._issue(lq, srb)
        finally:
            self._dispatching = False
        if self._runnable:
            # Completions during the start queued units to run.
            self._run()

    def _issue(self, lq: LunQueue, srb: Srb) -> None:
        """Hand one request to the miniport: on the unit's books as active, then its build and
        start routines (a start that raises fails the request, not the port)."""
        self._take(lq, srb, self._epoch)
        limit = self._limit
        if limit is not None and self.outstanding >= limit:
            self._blocked |= _LIMIT
        try:
            build_io = self._build_io
            if build_io is None or build_io(srb):
                self.miniport.hw_start_io(srb)
        except Exception:
            log.exception("miniport_start_failed", srb=repr(srb))
            if srb in lq.active:
                srb.complete(SrbStatus.ERROR)
                self._complete(srb)

    def _take(self, lq: LunQueue, srb: Srb, epoch: int) -> None:
        """Put ``srb`` on its unit's books as active at the miniport (both port models)."""
        lq.active[srb] = epoch
        lq.outstanding += 1
        if lq.outstanding > lq.peak_outstanding:
            lq.peak_outstanding = lq.outstanding
        self.outstanding += 1
        if self.outstanding > self.peak_outstanding:
            self.peak_outstanding = self.outstanding

    def _book(self, srb: Srb) -> LunQueue:
        """Take ``srb`` into the port's books (its unit, counters, submit time)."""
        lq = self._queues.get((srb.path_id, srb.target_id, srb.lun))
        if lq is None:
            lq = self._queue(srb.path_id, srb.target_id, srb.lun)
        srb._port_state = lq
        srb.start_ns = self._now_ns()
        lq.queued += 1
        self.queued += 1
        if srb.nexus != INTERNAL_NEXUS:
            self._pending += 1
        return lq

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
            if self._watchdog is None:
                self._arm_watchdog()
            runnable = self._runnable
            while runnable and not self._blocked:
                lq = runnable.popleft()
                lq.in_run = False
                self._start_lun(lq)
        finally:
            self._dispatching = False

    def _start_lun(self, lq: LunQueue) -> None:
        retry = lq.retry
        waiting = lq.waiting
        issue = self._issue
        while lq.outstanding < lq.queue_depth and not lq.blocked and not self._blocked:
            if retry:
                issue(lq, retry.popleft())
            elif waiting:
                issue(lq, waiting.popleft())
            else:
                break
        if (retry or waiting) and self._blocked and not lq.blocked and not lq.in_run \
                and lq.outstanding < lq.queue_depth:
            # Only the adapter stops this unit: keep its turn for when the adapter is ready.
            lq.in_run = True
            self._runnable.append(lq)

    # --------------------------------------------------------------------------- completion

    def request_complete(self, srb: Srb) -> None:
        """RequestComplete: the miniport is done with ``srb`` (any thread)."""
        if _get_ident() == self._isr_thread:
            self._dpc.append(srb)
        elif _get_ident() == self._loop_thread or self._loop_thread is None:
            self._complete(srb)
        else:
            self._dpc.append(srb)
            self._schedule_dpc()

    def _complete(self, srb: Srb) -> None:
        """A request the miniport returned: off the books, then retried or delivered; then
        whatever that made possible is started."""
        lq = srb._port_state
        if lq.__class__ is not LunQueue:
            if lq.__class__ is _TaskFunction:
                srb._port_state = None
                lq.finish()
            else:
                self.stray_completions += 1
            return
        try:
            del lq.active[srb]
        except KeyError:  # completed while still held in the port: a miniport bug
            self.stray_completions += 1
            return
        lq.outstanding -= 1
        self.outstanding -= 1
        if lq.blocked & _BUSY:
            lq.busy_remaining -= 1
            if lq.busy_remaining <= 0 or lq.outstanding == 0:
                self._end_device_busy(lq)
        if self._blocked & _COUNTING:
            self._count_adapter_completion()
        status = srb.srb_status
        if self._marks and self._recovered(lq, srb):
            pass
        elif status == _SRB_BUSY or (
                srb.scsi_status == _SCSI_BUSY and status not in _NOT_RETRIED):
            self._requeue_busy(lq, srb)
        else:
            self._deliver(lq, srb)
        if lq.retry or lq.waiting:
            self._dispatch(lq)
        elif self._runnable:
            self._run()

    def _recovered(self, lq: LunQueue, srb: Srb) -> bool:
        """Error recovery's say on a returned request: True when it took care of it."""
        mark = self._marks.pop(srb, 0)
        if not mark or srb.srb_status not in _KILLED:
            return False
        if mark == _MARK_TIMED_OUT:
            srb.complete(SrbStatus.TIMEOUT)
            self._deliver(lq, srb)
        else:
            self._requeue_caught(lq, srb)
        return True

    def _deliver(self, lq: LunQueue, srb: Srb) -> None:
        srb._port_state = None
        lq.completed += 1
        self.completed += 1
        us = (self._now_ns() - srb.start_ns) // 1000
        bucket = us.bit_length()
        if bucket > _LAST_BUCKET:
            bucket = _LAST_BUCKET
        histogram = lq.latency
        histogram.counts[bucket] += 1
        histogram.sum_us += us
        if srb.srb_status == _SRB_ABORTED:
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
            self._retired_latency.add(lq.latency)
        if not internal:
            self._pending -= 1
            if self._pending == 0 and self._idle_waiters:
                for waiter in self._idle_waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    def _requeue_busy(self, lq: LunQueue, srb: Srb) -> None:
        srb.retries += 1
        lq.busy_retries += 1
        self.busy_retries += 1
        _clear_outcome(srb)
        self._put_back(lq, srb)
        self._hold_for_retry(lq)
        if self._watchers:
            self._wake(srb)

    def _requeue_caught(self, lq: LunQueue, srb: Srb) -> None:
        """A port-initiated reset killed a request that had done nothing wrong: send it again
        once the reset is over (the unit is held until then)."""
        srb.retries += 1
        lq.reset_retries += 1
        self.reset_retries += 1
        _clear_outcome(srb)
        self._put_back(lq, srb)
        if self._watchers:
            self._wake(srb)

    def _put_back(self, lq: LunQueue, srb: Srb) -> None:
        """Return a request from the miniport to the port, ahead of everything not yet sent."""
        lq.retry.append(srb)

    def _hold_for_retry(self, lq: LunQueue) -> None:
        if not lq.blocked & _RETRY_HOLD:
            lq.blocked |= _RETRY_HOLD
            lq.retry_timer = self.loop.call_later(self.busy_retry_delay, self._end_retry_hold, lq)

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
        """Assert the interrupt line (any thread); one service for many assertions."""
        self.interrupt_assertions += 1
        # Unlocked fast path: if we see a stale True, the service routine has not cleared the
        # flag yet, so it has not drained the controller yet either and will see our work.
        if self._irq_pending:
            return
        with self._irq_lock:
            if self._irq_pending:
                return
            self._irq_pending = True
        me = _get_ident()
        if me == self._loop_thread or self._loop_thread is None:
            self.loop.call_soon(self._service_interrupt)
        elif me == self._isr_thread:
            # Raised from inside the interrupt routine: serve it again later, not recursively.
            self._call_threadsafe(self._service_interrupt)
        else:
            # The raising thread serves it: at once under Storport (the interrupt lock is free
            # of starts), after the start in progress under SCSIport (it is the adapter lock).
            self._isr()
            if self._dpc:
                self._schedule_dpc()

    def _call_threadsafe(self, fn: Callable[[], None]) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # loop closed under a late DMA completion: nothing to serve
            with self._irq_lock:
                self._irq_pending = False

    def _isr(self) -> None:
        """Run the miniport's interrupt routine under the interrupt lock (any thread)."""
        with self._int_lock:
            # A plain store: an assertion racing with it at worst causes one extra service.
            self._irq_pending = False
            self.interrupts += 1
            # Storport: while the loop is dispatching, start routines are running. SCSIport
            # releases the lock between starts, so only the flag set inside one counts.
            if self._in_start or (self._dispatching and not self._starts_locked):
                self.interrupts_during_start += 1
            outer = self._isr_thread
            self._isr_thread = _get_ident()
            try:
                self.miniport.hw_interrupt()
            except Exception:
                log.exception("miniport_interrupt_failed", miniport=self.miniport.name)
            finally:
                self._isr_thread = outer

    def _service_interrupt(self) -> None:
        self._isr()
        self._run_dpc()

    def _schedule_dpc(self) -> None:
        with self._irq_lock:
            if self._dpc_scheduled:
                return
            self._dpc_scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._run_dpc)
        except RuntimeError:  # loop closed: nobody is left to deliver to
            with self._irq_lock:
                self._dpc_scheduled = False

    def _run_dpc(self) -> None:
        if self._dpc_scheduled:
            with self._irq_lock:
                self._dpc_scheduled = False
        dpc = self._dpc
        while dpc:
            self._complete(dpc.popleft())

    def miniport_ioctl(self, code: str, args: Mapping[str, Any]) -> Any:
        """Pass a management request to the miniport (IOCTL_SCSI_MINIPORT), exclusive with its
        interrupt routine. Raises MiniportIoctlError when the miniport refuses it."""
        if not self.started:
            raise MiniportIoctlError("not-started", "the adapter has not started")
        return self.synchronize_access(lambda: self.miniport.hw_ioctl(code, args))

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

    def get_physical_address(self, srb: Srb, offset: int) -> memoryview:
        """ScsiPortGetPhysicalAddress: the element holding byte ``offset`` of the data, up to
        the end of its page or buffer; empty past the end."""
        self.sg_element_calls += 1
        sg = self._sg_hidden.get(srb) if self._sg_hidden else None
        if sg is None:
            sg = srb.sg_list
        base = 0
        for view in sg:
            size = view.nbytes
            if offset < base + size:
                start = offset - base
                end = (start // SG_ELEMENT_BYTES + 1) * SG_ELEMENT_BYTES
                return view[start:end if end < size else size]
            base += size
        return _EMPTY

    # ------------------------------------------------------------------------ queue controls

    def _off_loop(self, fn: Callable[..., None], *args: Any) -> bool:
        """Controls may come from any thread (an interrupt routine on a DMA worker, say); they
        act on the loop. True when this call was passed there."""
        if self._loop_thread is None or threading.get_ident() == self._loop_thread:
            return False
        self.loop.call_soon_threadsafe(fn, *args)
        return True

    def pause_device(self, path_id: int, target_id: int, lun: int, seconds: float) -> None:
        """StorPortDevicePause: send this unit nothing for ``seconds`` (or until resumed)."""
        if self._off_loop(self.pause_device, path_id, target_id, lun, seconds):
            return
        lq = self._queue(path_id, target_id, lun)
        if lq.pause_timer is not None:
            lq.pause_timer.cancel()
        lq.blocked |= _PAUSED
        lq.pauses += 1
        self.device_pauses += 1
        lq.pause_timer = self.loop.call_later(max(0.0, seconds), self.resume_device,
                                              path_id, target_id, lun)

    def resume_device(self, path_id: int, target_id: int, lun: int) -> None:
        """StorPortDeviceResume: end a device pause now."""
        if self._off_loop(self.resume_device, path_id, target_id, lun):
            return
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
        if self._off_loop(self.pause, seconds):
            return
        if self._pause_timer is not None:
            self._pause_timer.cancel()
        self._blocked |= _PAUSED
        self.pauses += 1
        self._pause_timer = self.loop.call_later(max(0.0, seconds), self.resume)

    def resume(self) -> None:
        """StorPortResume: end an adapter pause now."""
        if self._off_loop(self.resume):
            return
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        self._clear_adapter(_PAUSED)

    def device_busy(self, path_id: int, target_id: int, lun: int, requests: int) -> None:
        """StorPortDeviceBusy: hold this unit until ``requests`` of its requests complete.

        Counting starts now; if the unit has fewer outstanding, it is ready again when its last
        one completes, and with none outstanding after a short back-off."""
        if self._off_loop(self.device_busy, path_id, target_id, lun, requests):
            return
        lq = self._queue(path_id, target_id, lun)
        lq.blocked |= _BUSY
        lq.busy_remaining = requests
        lq.busies += 1
        self.device_busies += 1
        if lq.busy_timer is not None:
            lq.busy_timer.cancel()
            lq.busy_timer = None
        if requests <= 0 or lq.outstanding == 0:
            lq.busy_timer = self.loop.call_later(BUSY_IDLE_BACKOFF_S, self._end_device_busy, lq)

    def device_ready(self, path_id: int, target_id: int, lun: int) -> None:
        """StorPortDeviceReady: end a device busy now."""
        if self._off_loop(self.device_ready, path_id, target_id, lun):
            return
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
        """StorPortBusy: hold the whole adapter until ``requests`` requests complete (same
        counting rule as device_busy)."""
        if self._off_loop(self.busy, requests):
            return
        self._blocked |= _BUSY
        self._busy_remaining = requests
        self.busies += 1
        if self._busy_timer is not None:
            self._busy_timer.cancel()
            self._busy_timer = None
        if requests <= 0 or self.outstanding == 0:
            self._busy_timer = self.loop.call_later(BUSY_IDLE_BACKOFF_S, self.ready)

    def ready(self) -> None:
        """StorPortReady: end an adapter busy now."""
        if self._off_loop(self.ready):
            return
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

    def _call_start(self, srb: Srb) -> None:
        miniport = self.miniport
        if self._starts_locked:
            with self._int_lock:
                if miniport.hw_build_io(srb):
                    miniport.hw_start_io(srb)
        elif miniport.hw_build_io(srb):
            miniport.hw_start_io(srb)

    async def _task_function(self, function: SrbFunction, path_id: int, target_id: int,
                             lun: int = 0, nexus: int = INTERNAL_NEXUS, tag: int = 0) -> SrbStatus:
        """Send an abort/reset SRB straight to the miniport (not queued behind the I/O)."""
        tmf = Srb(function=function, path_id=path_id, target_id=target_id, lun=lun,
                  nexus=nexus, queue_tag=tag)
        waiter: asyncio.Future[None] = self.loop.create_future()
        tmf._port_state = _TaskFunction(waiter)
        try:
            self._call_start(tmf)
        except Exception:
            log.exception("miniport_task_function_failed", function=function.name)
            tmf._port_state = None
            return SrbStatus.ERROR
        await waiter
        return tmf.srb_status

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
        lq.active.pop(srb, None)
        lq.outstanding -= 1
        self.outstanding -= 1
        self.forced_completions += 1
        if self._marks:
            self._marks.pop(srb, None)
        if self._sg_hidden:
            sg = self._sg_hidden.pop(srb, None)
            if sg is not None:
                srb.sg_list = sg
        srb.srb_status = status
        self._deliver(lq, srb)

    def _hold(self, queues: list[LunQueue]) -> None:
        for lq in queues:
            lq.reset_holds += 1
            lq.blocked |= _RESETTING

    def _release(self, queues: list[LunQueue]) -> None:
        for lq in queues:
            lq.reset_holds -= 1
            if lq.reset_holds == 0:
                lq.blocked &= ~_RESETTING
                self._dispatch(lq)

    def _snapshot(self, queues: list[LunQueue]) -> list[Srb]:
        return [srb for lq in queues for srb in (*lq.active, *self._held(lq))]

    def _target_queues(self, path_id: int, target_id: int) -> list[LunQueue]:
        return [lq for lq in self._queues.values()
                if lq.path_id == path_id and lq.target_id == target_id]

    def _bus_queues(self, path_id: int) -> list[LunQueue]:
        return [lq for lq in self._queues.values() if lq.path_id == path_id]

    async def reset_logical_unit(self, path_id: int, target_id: int, lun: int) -> bool:
        """LOGICAL UNIT RESET: every request to the unit ends ABORTED; new ones wait until done."""
        lq = self._queues.get((path_id, target_id, lun))
        queues = [lq] if lq is not None else []
        self.lun_resets += 1
        return await self._reset(queues, SrbFunction.RESET_LOGICAL_UNIT, path_id, target_id, lun)

    async def reset_device(self, path_id: int, target_id: int) -> bool:
        """TARGET RESET: every unit behind the target id, as one."""
        self.target_resets += 1
        return await self._reset(self._target_queues(path_id, target_id),
                                 SrbFunction.RESET_DEVICE, path_id, target_id, 0)

    async def _reset(self, queues: list[LunQueue], function: SrbFunction, path_id: int,
                     target_id: int, lun: int) -> bool:
        self._hold(queues)
        try:
            affected = self._snapshot(queues)
            for lq in queues:
                lq.resets += 1
                for srb in self._held(lq):
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
        queues = self._bus_queues(path_id)
        self.bus_resets += 1
        self._hold(queues)
        try:
            affected = self._snapshot(queues)
            for lq in queues:
                lq.resets += 1
                for srb in self._held(lq):
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

    # ------------------------------------------------------------------------ error recovery

    # The watchdog ticks this many times per request_timeout, at most once a second (Storport's
    # own timer granularity): a request times out after between 1 and 1.25 request_timeouts.
    _TICKS_PER_TIMEOUT: Final = 4

    def _tick_interval(self, timeout: float) -> tuple[float, int]:
        interval = min(1.0, timeout / self._TICKS_PER_TIMEOUT)
        return interval, max(1, round(timeout / interval))

    def _arm_watchdog(self) -> None:
        timeout = self.request_timeout
        if timeout is None or self._blocked & _STOPPED:
            return
        interval, _ = self._tick_interval(timeout)
        self._watchdog = self.loop.call_later(interval, self._watchdog_tick)

    def _watchdog_tick(self) -> None:
        """Find requests at the miniport for longer than request_timeout; recover per unit."""
        self._watchdog = None
        self._epoch += 1
        timeout = self.request_timeout
        if not self.outstanding or timeout is None:
            return  # the next start arms it again
        # Stamped with epoch e means started after tick e began: at least (now - e - 1) whole
        # intervals ago.
        _, ticks = self._tick_interval(timeout)
        late = self._epoch - 1 - ticks
        for lq in list(self._queues.values()):
            if lq.recovering or not lq.active:
                continue
            expired: list[Srb] = []
            for srb, started in lq.active.items():
                if started > late:
                    break
                if self._marks.get(srb) != _MARK_CAUGHT:
                    expired.append(srb)
            if expired:
                lq.recovering = True
                task = self.loop.create_task(self._recover(lq, expired))
                self._recoveries.add(task)
                task.add_done_callback(self._recoveries.discard)
        self._arm_watchdog()

    async def _recover(self, lq: LunQueue, expired: list[Srb]) -> None:
        holds: list[list[LunQueue]] = []
        try:
            lq.timeouts += len(expired)
            self.timeouts += len(expired)
            for srb in expired:
                self._marks[srb] = _MARK_TIMED_OUT
            log.warning("request_timeout", model=self.model, unit=_fmt(lq.address),
                        requests=len(expired), timeout_s=self.request_timeout,
                        tags=[srb.queue_tag for srb in expired[:8]])
            stuck = await self._escalate(lq, expired, holds)
            if stuck:
                # Even the bus reset did not bring them back: the miniport lost them.
                self.recovery_failures += 1
                self._record("give_up", lq, len(stuck), False)
                log.error("error_recovery_failed", unit=_fmt(lq.address), requests=len(stuck))
                for srb in stuck:
                    owner = srb._port_state
                    if isinstance(owner, LunQueue) and srb in owner.active:
                        self._force(owner, srb, SrbStatus.TIMEOUT)
        except Exception:
            log.exception("error_recovery_crashed", unit=_fmt(lq.address))
        finally:
            for queues in reversed(holds):
                self._release(queues)
            lq.recovering = False

    async def _escalate(self, lq: LunQueue, expired: list[Srb],
                        holds: list[list[LunQueue]]) -> list[Srb]:
        """Storport's hierarchy: abort the tasks, then reset the LUN, the target, the bus, each
        only if the step before did not clear the fault. Returns what is still stuck."""
        stuck = await self._abort_step(lq, expired)
        if not stuck:
            return stuck
        path_id, target_id, lun = lq.address
        stuck = await self._reset_step("lun_reset", SrbFunction.RESET_LOGICAL_UNIT, lq, [lq],
                                       lun, holds)
        if not stuck:
            return stuck
        stuck = await self._wide_step(expired, lambda: self._reset_step(
            "target_reset", SrbFunction.RESET_DEVICE, lq,
            self._target_queues(path_id, target_id), 0, holds))
        if not stuck:
            return stuck
        return await self._wide_step(expired, lambda: self._bus_step(lq, holds))

    async def _wide_step(self, expired: list[Srb],
                         step: Callable[[], Awaitable[list[Srb]]]) -> list[Srb]:
        async with self._wide_reset:
            if not self._still_at_miniport(expired):
                return []  # another unit's reset brought them back meanwhile
            return await step()

    def _record(self, step: str, lq: LunQueue, requests: int, cleared: bool) -> None:
        self.recovery_history.append(RecoveryStep(self.loop.time(), step, lq.address, requests,
                                                  cleared))

    def _still_at_miniport(self, srbs: list[Srb]) -> list[Srb]:
        return [srb for srb in srbs if self._at_miniport(srb)]

    async def _gone_by(self, srbs: list[Srb], deadline: float) -> list[Srb]:
        """Wait until each of ``srbs`` has left the miniport or ``deadline``; what is left."""
        left = self._still_at_miniport(srbs)
        timeout = deadline - self.loop.time()
        if left and timeout > 0:
            await asyncio.wait([self._watch(srb) for srb in left], timeout=timeout)
            left = self._still_at_miniport(left)
        return left

    async def _abort_step(self, lq: LunQueue, expired: list[Srb]) -> list[Srb]:
        self.recovery_aborts += 1
        log.warning("error_recovery_step", step="abort_task", unit=_fmt(lq.address),
                    requests=len(expired))
        deadline = self.loop.time() + self.recovery_timeout

        async def abort_one(srb: Srb) -> None:
            if not self._at_miniport(srb):
                return
            gone = self._watch(srb)
            status = await self._task_function(SrbFunction.ABORT_COMMAND, srb.path_id,
                                               srb.target_id, srb.lun, srb.nexus, srb.queue_tag)
            if status == SrbStatus.SUCCESS:
                await gone  # caught: it comes back ABORTED (and completes TIMEOUT)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(abort_one(srb) for srb in expired)),
                                   max(0.0, deadline - self.loop.time()))
        stuck = self._still_at_miniport(expired)
        self._record("abort_task", lq, len(expired), not stuck)
        return stuck

    async def _reset_step(self, step: str, function: SrbFunction, lq: LunQueue,
                          scope: list[LunQueue], lun: int,
                          holds: list[list[LunQueue]]) -> list[Srb]:
        if function == SrbFunction.RESET_LOGICAL_UNIT:
            self.recovery_lun_resets += 1
            self.lun_resets += 1
        else:
            self.recovery_target_resets += 1
            self.target_resets += 1
        in_flight = self._catch(scope, holds)
        log.warning("error_recovery_step", step=step, unit=_fmt(lq.address),
                    requests=len(in_flight))
        deadline = self.loop.time() + self.recovery_timeout
        try:
            status = await asyncio.wait_for(
                self._task_function(function, lq.path_id, lq.target_id, lun),
                max(0.0, deadline - self.loop.time()))
        except TimeoutError:
            status = SrbStatus.TIMEOUT
        if status != SrbStatus.SUCCESS:
            log.warning("error_recovery_step_failed", step=step, unit=_fmt(lq.address),
                        status=status.name)
            stuck = self._still_at_miniport(in_flight)
        else:
            stuck = await self._gone_by(in_flight, deadline)
        self._record(step, lq, len(in_flight), not stuck)
        return stuck

    async def _bus_step(self, lq: LunQueue, holds: list[list[LunQueue]]) -> list[Srb]:
        path_id = lq.path_id
        self.recovery_bus_resets += 1
        self.bus_resets += 1
        in_flight = self._catch(self._bus_queues(path_id), holds)
        log.warning("error_recovery_step", step="bus_reset", unit=_fmt(lq.address),
                    path_id=path_id, requests=len(in_flight))
        deadline = self.loop.time() + self.recovery_timeout
        try:
            with self._int_lock:
                ok = self.miniport.hw_reset_bus(path_id)
        except Exception:
            log.exception("miniport_reset_bus_failed", path_id=path_id)
            ok = False
        stuck = await self._gone_by(in_flight, deadline) if ok \
            else self._still_at_miniport(in_flight)
        self._record("bus_reset", lq, len(in_flight), not stuck)
        return stuck

    def _catch(self, scope: list[LunQueue], holds: list[list[LunQueue]]) -> list[Srb]:
        """Hold ``scope`` for a port-initiated reset (what is held stays held, nothing new goes
        down) and mark what is at the miniport there, so that whatever the reset kills is
        restarted afterwards; returns those requests."""
        self._hold(scope)
        holds.append(scope)
        in_flight: list[Srb] = []
        for q in scope:
            q.resets += 1
            for srb in q.active:
                self._marks.setdefault(srb, _MARK_CAUGHT)
                in_flight.append(srb)
        return in_flight

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
        changed: list[tuple[int, int]] = []
        for tid, luns in zip(targets, found, strict=True):
            key = (path_id, tid)
            old = set(self._units.get(key, ()))
            if old != set(luns or ()):
                changed.append(key)
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
        if changed and self.on_units_changed is not None:
            for p, t in changed:
                try:
                    self.on_units_changed(p, t)
                except Exception:
                    log.exception("units_changed_callback_failed", path_id=p, target_id=t)

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


class ScsiPortDriver(PortDriver):
    """The SCSIport model, for comparison: what Storport replaced, on the same miniport.

    * One FIFO adapter queue for every unit; at most 254 requests at the miniport (fewer if
      the miniport or the operator sets a lower adapter limit). Per-unit queue depths are
      recorded but not enforced.
    * ``hw_build_io`` + ``hw_start_io`` run under the adapter lock, which is the interrupt
      lock: a start and the interrupt routine never overlap (half duplex).
    * The scatter/gather list is taken off the request while the miniport has it; the miniport
      reaches the data only through ``get_physical_address``, one element per call.
    * The eight queue controls and set_queue_depth are not available: calls are counted in
      ``ignored_controls`` and do nothing. A request answered BUSY goes back to the head of the
      adapter queue and the whole adapter waits ``busy_retry_delay`` before sending it again.
    * A timed-out request gets no hierarchy: the port resets the bus.
    """

    _starts_locked = True

    def __init__(self, miniport: Miniport, **kwargs: Any) -> None:
        model = kwargs.setdefault("model", PORT_MODEL_SCSIPORT)
        if model != PORT_MODEL_SCSIPORT:
            raise ValueError(f"ScsiPortDriver runs the SCSIport model, not {model!r}")
        super().__init__(miniport, **kwargs)
        self._fifo: deque[Srb] = deque()
        self._limit = self._adapter_limit(None)

    def _adapter_limit(self, miniport_limit: int | None) -> int:
        limit = super()._adapter_limit(miniport_limit)
        return SCSIPORT_ADAPTER_LIMIT if limit is None else min(limit, SCSIPORT_ADAPTER_LIMIT)

    # ------------------------------------------------------------------- the adapter queue

    def submit(self, srb: Srb) -> None:
        lq = self._book(srb)
        if srb.queue_action == _HEAD_OF_QUEUE:
            self._fifo.appendleft(srb)
        else:
            self._fifo.append(srb)
        lq.fifo_held += 1
        self._run()

    def _dispatch(self, lq: LunQueue) -> None:
        self._run()

    def _run(self) -> None:
        if self._dispatching:
            return
        self._dispatching = True
        try:
            fifo = self._fifo
            limit = self._limit or SCSIPORT_ADAPTER_LIMIT
            if fifo and self._watchdog is None:
                self._arm_watchdog()
            epoch = self._epoch
            while fifo and not self._blocked and self.outstanding < limit:
                srb = fifo[0]
                lq = srb._port_state
                if lq.blocked:
                    break  # a unit being reset: strictly FIFO, everyone behind it waits
                fifo.popleft()
                lq.fifo_held -= 1
                self._start_one(lq, srb, epoch)
        finally:
            self._dispatching = False

    def _start_one(self, lq: LunQueue, srb: Srb, epoch: int) -> None:
        self._take(lq, srb, epoch)
        if srb.sg_list:
            self._sg_hidden[srb] = srb.sg_list
            srb.sg_list = []
        miniport = self.miniport
        build_io = self._build_io
        with self._int_lock:
            self._in_start = True
            try:
                if build_io is None or build_io(srb):
                    miniport.hw_start_io(srb)
            except Exception:
                log.exception("miniport_start_failed", srb=repr(srb))
                if srb in lq.active:
                    srb.complete(SrbStatus.ERROR)
                    self._complete(srb)
            finally:
                self._in_start = False

    def _complete(self, srb: Srb) -> None:
        if self._sg_hidden:
            sg = self._sg_hidden.pop(srb, None)
            if sg is not None:
                srb.sg_list = sg
        # The base class's dispatch finds nothing in the per-unit queues; the adapter queue is ours.
        super()._complete(srb)
        if self._fifo:
            self._run()

    def _held(self, lq: LunQueue) -> list[Srb]:
        return [srb for srb in self._fifo if srb._port_state is lq] if lq.fifo_held else []

    def _remove_held(self, lq: LunQueue, srb: Srb) -> None:
        self._fifo.remove(srb)
        lq.fifo_held -= 1

    def _put_back(self, lq: LunQueue, srb: Srb) -> None:
        # It keeps its place at the head of the adapter queue: nothing behind it goes first.
        self._fifo.appendleft(srb)
        lq.fifo_held += 1

    def _hold_for_retry(self, lq: LunQueue) -> None:
        if not self._blocked & _RETRY_HOLD:
            self._blocked |= _RETRY_HOLD
            self._retry_timer = self.loop.call_later(self.busy_retry_delay,
                                                     self._end_adapter_retry_hold)

    def _end_adapter_retry_hold(self) -> None:
        self._retry_timer = None
        self._clear_adapter(_RETRY_HOLD)

    # -------------------------------------------------------- controls SCSIport did not have

    def _ignored(self, control: str) -> None:
        self.ignored_controls += 1
        log.debug("queue_control_ignored", model=self.model, control=control)

    def pause_device(self, path_id: int, target_id: int, lun: int, seconds: float) -> None:
        self._ignored("pause_device")

    def resume_device(self, path_id: int, target_id: int, lun: int) -> None:
        self._ignored("resume_device")

    def pause(self, seconds: float) -> None:
        self._ignored("pause")

    def resume(self) -> None:
        self._ignored("resume")

    def device_busy(self, path_id: int, target_id: int, lun: int, requests: int) -> None:
        self._ignored("device_busy")

    def device_ready(self, path_id: int, target_id: int, lun: int) -> None:
        self._ignored("device_ready")

    def busy(self, requests: int) -> None:
        self._ignored("busy")

    def ready(self) -> None:
        self._ignored("ready")

    def set_queue_depth(self, path_id: int, target_id: int, lun: int, depth: int) -> int:
        """Recorded (and shown) but not enforced: SCSIport has only its adapter queue."""
        self._ignored("set_queue_depth")
        lq = self._queue(path_id, target_id, lun)
        lq.queue_depth = self._clamp_depth(depth)
        return lq.queue_depth

    # ---------------------------------------------------------------------- error recovery

    async def _escalate(self, lq: LunQueue, expired: list[Srb],
                        holds: list[list[LunQueue]]) -> list[Srb]:
        # SCSIport knew one remedy for a device that stopped answering: reset the bus.
        return await self._wide_step(expired, lambda: self._bus_step(lq, holds))


def _fmt(address: Address) -> str:
    return f"{address[0]}:{address[1]}:{address[2]}"


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
