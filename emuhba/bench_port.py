"""``emuhba bench port``: Storport's queuing model against SCSIport's, on the same workload.

The benchmark drives the port driver directly (no iSCSI) with closed-loop load generators, one
per logical unit, each keeping ``depth`` requests outstanding, over :class:`miniports.sim.
SimMiniport` (a controller with a service time per request, 5 ms +-20% by default, and modeled
CPU costs for the miniport routines). Everything runs on :class:`emuhba.simclock.
VirtualTimeLoop`: what is measured is the *model* (virtual seconds), not how fast Python is; the
wall-clock time each simulation took is reported beside it, for honesty. Measuring starts after
the warm-up asked for, and never before every request has completed once (the start-up burst
is not the steady state).

Two scenarios, each run once per port model:

- **sweep**: 1, 2, 4, ... LUNs; IOPS, p50 and p99 latency per point, and the Storport/SCSIport
  IOPS ratio. By Little's law SCSIport stays near 254 / service time (its adapter-wide cap)
  while Storport grows with LUNs x depth / service time, until a modeled lock saturates.
- **noisy neighbour**: one slow, always-saturated LUN beside fast ones; the fast LUNs' p99 in
  each model (SCSIport's shared FIFO makes them wait behind the slow LUN's requests), and the
  same fast LUNs without the neighbour as a baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, TextIO

from emuhba import simclock
from emuhba.miniport import MAX_QUEUE_DEPTH_CLASSIC
from emuhba.port import MODELS, SCSIPORT_ADAPTER_LIMIT, PortDriver
from emuhba.srb import DataDirection, QueueAction, ScsiStatus, Srb, SrbCompletion, SrbStatus
from miniports.sim import CpuCosts, Duplex, ServiceTime, SimMiniport, SimUnit

# A completion this close to a window edge counts as on the edge: virtual times are sums of
# float delays, and 200 x 5 ms must land inside a 1 s window, not a rounding error past it.
_EDGE: Final = 1e-9
_READ_10: Final = 0x28
_GOOD: Final = ScsiStatus.GOOD
_BLOCK: Final = 512
# The port models compared (the simulated miniport lays its locks out after the one it is
# loaded under, see miniports.sim).
KNOWN_MODELS: Final = ("storport", "scsiport")
DEFAULT_LUN_COUNTS: Final = (1, 2, 4, 8, 16, 32, 64)
ACCEPTANCE_LUNS: Final = 32
ACCEPTANCE_RATIO: Final = 10.0
# Service times vary +-20% by default: see ServiceTime.
DEFAULT_JITTER: Final = 0.2


# ------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class LunLoad:
    """One logical unit and the closed-loop load on it."""

    lun: int
    depth: int
    service: ServiceTime
    # Requests the unit serves at once (None: unlimited); beyond it answers SCSI BUSY.
    slots: int | None = None
    group: str = "fast"


@dataclass(frozen=True)
class Workload:
    """What one simulation runs: the units, the I/O shape, the clock window and the costs."""

    luns: tuple[LunLoad, ...]
    io_bytes: int = 4096
    sg_elements: int = 1
    warmup_s: float = 0.02
    duration_s: float = 0.1
    costs: CpuCosts = field(default_factory=CpuCosts)
    busy_retry_delay_s: float = 0.001
    # Seeds the units' service-time jitter (when their ServiceTime has some).
    seed: int = 1
    # How much longer than warmup_s to wait for every request to complete once before
    # measuring anyway (a model may starve some for good).
    turnover_limit_s: float = 2.0

    @classmethod
    def uniform(cls, luns: int, depth: int, service: ServiceTime, **kwargs: Any) -> Workload:
        return cls(tuple(LunLoad(lun, depth, service) for lun in range(luns)), **kwargs)

    @property
    def queue_depth(self) -> int:
        return max((load.depth for load in self.luns), default=1)


@dataclass
class LatencyStats:
    """Completions inside the measurement window of one group of LUNs.

    Percentiles only see requests that completed. A request starved for the whole window
    never shows in them, so the requests still waiting when the window closed are looked at
    too: ``starved`` is how many had been waiting since before it opened, and
    ``oldest_waiting_s`` the age of the oldest. A p99 is only honest next to them.
    """

    completions: int
    iops: float
    mean_s: float
    p50_s: float
    p99_s: float
    max_s: float
    starved: int = 0
    oldest_waiting_s: float = math.nan

    @classmethod
    def of(cls, samples: Sequence[float], window_s: float,
           waiting: Sequence[float] = ()) -> LatencyStats:
        """``samples``: latencies completed in the window; ``waiting``: the ages of requests
        still waiting when it closed."""
        n = len(samples)
        starved = sum(1 for age in waiting if age > window_s + _EDGE)
        oldest = max(waiting, default=math.nan)
        if n == 0:
            return cls(0, 0.0, math.nan, math.nan, math.nan, math.nan, starved, oldest)
        ordered = sorted(samples)
        return cls(n, n / window_s, math.fsum(ordered) / n, percentile(ordered, 50),
                   percentile(ordered, 99), ordered[-1], starved, oldest)


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted samples (an observed value, no interpolation)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class RunResult:
    """One workload under one port model."""

    model: str
    luns: int
    total: LatencyStats
    groups: dict[str, LatencyStats]
    errors: int
    # Most requests at the miniport at once, adapter-wide.
    peak_outstanding: int
    busy_retries: int
    # BUSY answers from the units (each retried by the port).
    busy_answers: int
    lock_utilisation: dict[str, float]
    # When measuring began (the warm-up asked for, or later if the requests took longer to
    # turn over once) and how long the whole run was, in virtual seconds.
    warmup_s: float
    virtual_s: float
    wall_s: float = 0.0

    @property
    def iops(self) -> float:
        return self.total.iops


# --------------------------------------------------------------------------- load generator


class _BenchSrb(Srb):
    __slots__ = ("in_flight", "issued_at", "rounds")
    in_flight: bool
    issued_at: float
    rounds: int


class _Window:
    """The measurement window, shared by every LUN's generator of one run.

    It opens ``warmup_s`` after the start, but never before every request has completed once:
    until then the figures describe the start-up burst, not the model (under SCSIport, 32 LUNs
    x 255 requests take 160 ms to get through the 254-wide adapter queue once). A model can
    starve some requests for good (SCSIport behind a device answering BUSY); ``open`` is then
    called when the run has waited long enough.
    """

    __slots__ = ("duration_s", "earliest", "end", "end_edge", "first_round_left", "opened",
                 "warm", "warm_edge")

    def __init__(self, loop: asyncio.AbstractEventLoop, start: float, warmup_s: float,
                 duration_s: float, requests: int) -> None:
        self.earliest = start + warmup_s
        self.duration_s = duration_s
        self.first_round_left = requests
        self.opened: asyncio.Future[None] = loop.create_future()
        # Until it opens: nothing is measured, everything is resubmitted.
        self.warm = self.end = self.warm_edge = self.end_edge = math.inf

    def first_round_done(self, now: float) -> None:
        self.first_round_left -= 1
        if self.first_round_left == 0:
            self.open(now)

    def open(self, now: float) -> None:
        if self.opened.done():
            return
        self.warm = max(self.earliest, now)
        self.end = self.warm + self.duration_s
        self.warm_edge = self.warm + _EDGE
        self.end_edge = self.end + _EDGE
        self.opened.set_result(None)


class _ClosedLoop:
    """Keeps one LUN's requests outstanding: each completion is recorded and resubmitted at
    once, until the window closes. Latency is submit to completion, in virtual seconds."""

    __slots__ = ("errors", "loop", "samples", "submit", "window")

    def __init__(self, loop: asyncio.AbstractEventLoop, submit: Callable[[Srb], None],
                 window: _Window) -> None:
        self.loop = loop
        self.submit = submit
        self.window = window
        self.samples: array[float] = array("d")
        self.errors = 0

    def complete(self, srb: Srb) -> None:
        assert isinstance(srb, _BenchSrb)
        now = self.loop.time()
        window = self.window
        srb.in_flight = False
        if srb.srb_status is not SrbStatus.SUCCESS:
            self.errors += 1
        if srb.rounds == 0:
            window.first_round_done(now)
        srb.rounds += 1
        if window.warm_edge < now <= window.end_edge:
            self.samples.append(now - srb.issued_at)
        if now < window.end:
            srb.srb_status = SrbStatus.PENDING
            srb.scsi_status = _GOOD
            srb.sense = b""
            srb.residual = 0
            srb.retries = 0
            srb.issued_at = now
            srb.in_flight = True
            self.submit(srb)


def _read_srb(lun: int, lba: int, tag: int, io_bytes: int, sg_list: list[memoryview],
              completion: SrbCompletion) -> _BenchSrb:
    blocks = io_bytes // _BLOCK
    cdb = bytes((_READ_10, 0)) + lba.to_bytes(4, "big") + b"\x00" + blocks.to_bytes(2, "big") \
        + b"\x00"
    srb = _BenchSrb(lun=lun, cdb=cdb, data_direction=DataDirection.IN,
                    data_transfer_length=io_bytes, sg_list=sg_list, queue_tag=tag,
                    queue_action=QueueAction.SIMPLE, nexus=1, completion=completion)
    # What decode_into would fill for this READ(10); the simulated unit reads none of it.
    srb.lba = lba
    srb.transfer_blocks = blocks
    srb.issued_at = 0.0
    srb.rounds = 0
    srb.in_flight = False
    return srb


def available_models() -> tuple[str, ...]:
    """The port models this build's port driver runs."""
    return tuple(MODELS)


async def drive(workload: Workload, model: str, *, duplex: Duplex | None = None) -> RunResult:
    """Run ``workload`` through a port driver in ``model`` on the running loop (which should be
    a :class:`~emuhba.simclock.VirtualTimeLoop`) and measure it. ``duplex`` overrides the lock
    layout the simulated miniport would pick for the model."""
    loop = asyncio.get_running_loop()
    units = {(0, 0, load.lun): SimUnit(load.service, load.slots,
                                       seed=workload.seed * 1_000_003 + load.lun)
             for load in workload.luns}
    miniport = SimMiniport(units, costs=workload.costs, queue_depth=workload.queue_depth,
                           duplex=duplex)
    port = PortDriver(miniport, model=model, busy_retry_delay=workload.busy_retry_delay_s)
    if not await port.start():
        raise RuntimeError("the simulated adapter did not start")
    depth_cap = None if workload.queue_depth > MAX_QUEUE_DEPTH_CLASSIC else MAX_QUEUE_DEPTH_CLASSIC
    depths = [load.depth if depth_cap is None else min(load.depth, depth_cap)
              for load in workload.luns]
    t0 = loop.time()
    window = _Window(loop, t0, workload.warmup_s, workload.duration_s, sum(depths))
    issuers: list[tuple[LunLoad, _ClosedLoop]] = []
    per_lun: list[list[_BenchSrb]] = []
    # One shared buffer: the simulated units move no data, and a per-request buffer would only
    # cost memory. Split into the requested number of scatter/gather elements.
    chunk = -(-workload.io_bytes // workload.sg_elements)
    buffer = memoryview(bytearray(workload.io_bytes))
    sg_list = [buffer[i:i + chunk] for i in range(0, workload.io_bytes, chunk)]
    blocks = max(1, workload.io_bytes // _BLOCK)
    for load, depth in zip(workload.luns, depths, strict=True):
        port.set_queue_depth(0, 0, load.lun, depth)
        issuer = _ClosedLoop(loop, port.submit, window)
        issuers.append((load, issuer))
        per_lun.append([_read_srb(load.lun, tag * blocks, tag, workload.io_bytes, sg_list,
                                  issuer.complete) for tag in range(depth)])
    # Every generator starts at once: the first requests go out interleaved across the LUNs,
    # as they would from one initiator thread per LUN, not one LUN's whole depth first.
    for i in range(max(depths, default=0)):
        for requests in per_lun:
            if i < len(requests):
                srb = requests[i]
                srb.issued_at = t0
                srb.in_flight = True
                port.submit(srb)
    try:
        await asyncio.wait_for(asyncio.shield(window.opened),
                               window.earliest + workload.turnover_limit_s - loop.time())
    except TimeoutError:
        window.open(loop.time())  # some requests are starved: measure anyway
    await asyncio.sleep(window.end - loop.time())
    # Requests still waiting as the window closes: the ones a percentile cannot see.
    closed = loop.time()
    waiting = [[closed - srb.issued_at for srb in requests if srb.in_flight]
               for requests in per_lun]
    # The generators stop resubmitting at the end of the window; let what is outstanding finish.
    await port.drain()
    virtual = loop.time() - t0
    # Over the whole run: a lock's work is booked ahead of the clock, and only once everything
    # has drained is all of it inside the span measured.
    utilisation = miniport.lock_utilisation(virtual)
    peak = port.peak_outstanding
    busy_retries = port.busy_retries
    await port.stop()

    duration = workload.duration_s
    by_group: dict[str, array[float]] = {}
    ages: dict[str, list[float]] = {}
    everything: array[float] = array("d")
    errors = 0
    for (load, issuer), lun_waiting in zip(issuers, waiting, strict=True):
        by_group.setdefault(load.group, array("d")).extend(issuer.samples)
        ages.setdefault(load.group, []).extend(lun_waiting)
        everything.extend(issuer.samples)
        errors += issuer.errors
    all_ages = [age for group in ages.values() for age in group]
    return RunResult(
        model=model, luns=len(workload.luns),
        total=LatencyStats.of(everything, duration, all_ages),
        groups={name: LatencyStats.of(samples, duration, ages[name])
                for name, samples in by_group.items()},
        errors=errors, peak_outstanding=peak, busy_retries=busy_retries,
        busy_answers=miniport.controller.busy_answers,
        lock_utilisation=utilisation, warmup_s=window.warm - t0, virtual_s=virtual)


def run(workload: Workload, model: str, *, duplex: Duplex | None = None) -> RunResult:
    """One simulation on a fresh virtual clock; records the wall time it took."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("bench_port.run needs a thread without a running event loop; "
                           "inside one, await drive() on a VirtualTimeLoop instead")
    started = time.perf_counter()
    result = simclock.run(drive(workload, model, duplex=duplex), stall_timeout=60.0)
    result.wall_s = time.perf_counter() - started
    return result


# -------------------------------------------------------------------------------- scenarios


@dataclass
class SweepPoint:
    luns: int
    results: dict[str, RunResult]

    def ratio(self) -> float | None:
        """Storport IOPS over SCSIport IOPS, when both were measured."""
        storport, scsiport = self.results.get("storport"), self.results.get("scsiport")
        if storport is None or scsiport is None or scsiport.iops == 0:
            return None
        return storport.iops / scsiport.iops


@dataclass
class NoisyResult:
    """Fast LUNs beside one saturated slow LUN, and the same fast LUNs alone."""

    with_neighbour: dict[str, RunResult]
    alone: dict[str, RunResult]

    def fast_p99(self, model: str, neighbour: bool = True) -> float:
        runs = self.with_neighbour if neighbour else self.alone
        return runs[model].groups["fast"].p99_s


_FAST: Final = ServiceTime(0.005)
_SLOW: Final = ServiceTime(0.050)


@dataclass(frozen=True)
class NoisySpec:
    fast_luns: int = 7
    fast_depth: int = 32
    fast_service: ServiceTime = _FAST
    slow_depth: int = MAX_QUEUE_DEPTH_CLASSIC
    slow_service: ServiceTime = _SLOW
    # None: the slow unit serves everything it gets, slowly; a number: it has that many slots
    # and answers BUSY beyond them (a busy device).
    slow_slots: int | None = None
    # Longer than the sweep's window: the slow LUN's 50 ms requests need a few rounds to reach
    # a steady state, and the window should hold many of them.
    warmup_s: float = 0.5
    duration_s: float = 0.5

    def workload(self, base: Workload, neighbour: bool = True) -> Workload:
        fast = tuple(LunLoad(lun, self.fast_depth, self.fast_service, group="fast")
                     for lun in range(1, self.fast_luns + 1))
        slow = (LunLoad(0, self.slow_depth, self.slow_service, self.slow_slots, group="slow"),)
        return replace(base, luns=(slow + fast) if neighbour else fast,
                       warmup_s=self.warmup_s, duration_s=self.duration_s)


Progress = Callable[[str], None] | None


def sweep(lun_counts: Iterable[int], models: Sequence[str], *, depth: int,
          service: ServiceTime, base: Workload, progress: Progress = None) -> list[SweepPoint]:
    points = []
    for count in lun_counts:
        workload = replace(base, luns=Workload.uniform(count, depth, service).luns)
        results = {}
        for model in models:
            result = run(workload, model)
            results[model] = result
            if progress is not None:
                progress(f"sweep {model:8s} {count:3d} LUNs: {_si(result.iops):>7s} IOPS, "
                         f"p99 {_ms(result.total.p99_s)} ms  (wall {result.wall_s:.2f} s)")
        points.append(SweepPoint(count, results))
    return points


def noisy_neighbour(spec: NoisySpec, models: Sequence[str], *, base: Workload,
                    progress: Progress = None) -> NoisyResult:
    with_neighbour: dict[str, RunResult] = {}
    alone: dict[str, RunResult] = {}
    for model in models:
        for neighbour, into in ((True, with_neighbour), (False, alone)):
            result = run(spec.workload(base, neighbour), model)
            into[model] = result
            if progress is not None:
                label = "with slow LUN" if neighbour else "alone        "
                progress(f"noisy {model:8s} {label}: fast p99 "
                         f"{_ms(result.groups['fast'].p99_s)} ms  (wall {result.wall_s:.2f} s)")
    return NoisyResult(with_neighbour, alone)


# ---------------------------------------------------------------------------------- report


def _si(value: float) -> str:
    if math.isnan(value):
        return "-"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.3f}"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:g}"


def describe(base: Workload, depth: int, service: ServiceTime) -> str:
    c = base.costs
    transfer = f" + {_us(service.per_kib_s)} us/KiB" if service.per_kib_s else ""
    jitter = f" +-{service.jitter:.0%}" if service.jitter else ""
    return (f"service {service.seek_s * 1e3:g} ms{transfer}{jitter} per request, depth {depth} "
            f"per LUN, "
            f"{base.io_bytes} B reads in {base.sg_elements} SG element(s); modeled CPU per "
            f"request: build {_us(c.build_s)} us, start {_us(c.start_s)} us, interrupt "
            f"{_us(c.interrupt_s)} us, SG element {_us(c.sg_element_s)} us, {c.cpus} CPUs; "
            f"measured for {base.duration_s:g} virtual s after a warm-up of at least "
            f"{base.warmup_s:g} s (and until every request has completed once)")


def format_sweep(points: Sequence[SweepPoint], models: Sequence[str]) -> str:
    names = {"storport": "Storport", "scsiport": "SCSIport"}
    head = f"{'LUNs':>5}"
    rule = "-" * 5
    for model in models:
        title = names.get(model, model)
        head += f" | {title + ' IOPS':>14} {'p50 ms':>8} {'p99 ms':>8}"
        rule += "-+-" + "-" * 32
    both = "storport" in models and "scsiport" in models
    if both:
        head += f" | {'ratio':>6}"
        rule += "-+-" + "-" * 6
    head += f" | {'wall s':>6}"
    rule += "-+-" + "-" * 6
    lines = [head, rule]
    for point in points:
        line = f"{point.luns:>5}"
        wall = 0.0
        for model in models:
            r = point.results[model]
            wall += r.wall_s
            line += f" | {r.iops:>14,.0f} {_ms(r.total.p50_s):>8} {_ms(r.total.p99_s):>8}"
        if both:
            ratio = point.ratio()
            line += f" | {ratio:>5.1f}x" if ratio is not None else f" | {'-':>6}"
        line += f" | {wall:>6.2f}"
        lines.append(line)
    return "\n".join(lines)


def format_noisy(result: NoisyResult, spec: NoisySpec, models: Sequence[str]) -> str:
    slow = f"{spec.slow_service.seek_s * 1e3:g} ms service, depth {spec.slow_depth}"
    if spec.slow_slots is not None:
        slow += f", {spec.slow_slots} slots then BUSY"
    lines = [
        f"Noisy neighbour: LUN 0 slow ({slow}) beside {spec.fast_luns} fast LUNs "
        f"({spec.fast_service.seek_s * 1e3:g} ms, depth {spec.fast_depth}); measured for "
        f"{spec.duration_s:g} s after at least {spec.warmup_s:g} s",
        f"{'model':<9} | {'fast IOPS':>11} {'p50 ms':>8} {'p99 ms':>8} {'oldest ms':>9} | "
        f"{'slow IOPS':>9} {'busy retries':>12} | {'fast p99 alone':>14} | {'wall s':>6}",
        "-" * 9 + "-+-" + "-" * 39 + "-+-" + "-" * 22 + "-+-" + "-" * 14 + "-+-" + "-" * 6,
    ]
    notes = []
    for model in models:
        r = result.with_neighbour[model]
        fast = r.groups["fast"]
        slow_stats = r.groups.get("slow")
        alone = result.alone[model]
        wall = r.wall_s + alone.wall_s
        lines.append(
            f"{model:<9} | {fast.iops:>11,.0f} {_ms(fast.p50_s):>8} {_ms(fast.p99_s):>8} "
            f"{_ms(fast.oldest_waiting_s):>9} | "
            f"{(slow_stats.iops if slow_stats else 0):>9,.0f} {r.busy_retries:>12,} | "
            f"{_ms(alone.groups['fast'].p99_s):>14} | {wall:>6.2f}")
        for group, stats in sorted(r.groups.items(), key=lambda item: item[0] != "fast"):
            if stats.starved:
                notes.append(
                    f"  {model}: {stats.starved} {group} request(s) waited through the whole "
                    f"window without completing (the oldest for {_ms(stats.oldest_waiting_s)} "
                    f"ms); no percentile includes them")
    lines.append("(oldest ms: the longest a fast request had been waiting when the window "
                 "closed)")
    return "\n".join(lines + notes)


@dataclass
class Verdict:
    """The issue's acceptance figures, computed from a report."""

    ratio_at_32: float | None = None
    storport_iops_at_32: float | None = None
    scsiport_iops_at_32: float | None = None
    noisy_fast_p99_storport_s: float | None = None
    noisy_fast_p99_scsiport_s: float | None = None

    @property
    def sweep_ok(self) -> bool | None:
        return None if self.ratio_at_32 is None else self.ratio_at_32 >= ACCEPTANCE_RATIO

    @property
    def noisy_ok(self) -> bool | None:
        a, b = self.noisy_fast_p99_storport_s, self.noisy_fast_p99_scsiport_s
        return None if a is None or b is None else a < b

    def lines(self) -> list[str]:
        out = []
        if self.ratio_at_32 is not None:
            assert self.storport_iops_at_32 is not None and self.scsiport_iops_at_32 is not None
            out.append(
                f"At {ACCEPTANCE_LUNS} LUNs: Storport {self.storport_iops_at_32:,.0f} IOPS, "
                f"SCSIport {self.scsiport_iops_at_32:,.0f} IOPS: {self.ratio_at_32:.1f}x "
                f"({'meets' if self.sweep_ok else 'FAILS'} the >= {ACCEPTANCE_RATIO:g}x claim)")
        a, b = self.noisy_fast_p99_storport_s, self.noisy_fast_p99_scsiport_s
        if a is not None and b is not None:
            line = f"Noisy neighbour, fast LUNs' p99: Storport {_ms(a)} ms, SCSIport {_ms(b)} ms"
            if a > 0:
                line += f" ({b / a:.1f}x {'lower' if a < b else 'NOT lower'} in Storport)"
            out.append(line)
        return out


def verdict(points: Sequence[SweepPoint], noisy: NoisyResult | None) -> Verdict:
    v = Verdict()
    for point in points:
        ratio = point.ratio()
        if point.luns == ACCEPTANCE_LUNS and ratio is not None:
            v.ratio_at_32 = ratio
            v.storport_iops_at_32 = point.results["storport"].iops
            v.scsiport_iops_at_32 = point.results["scsiport"].iops
    if noisy is not None and {"storport", "scsiport"} <= noisy.with_neighbour.keys():
        v.noisy_fast_p99_storport_s = noisy.fast_p99("storport")
        v.noisy_fast_p99_scsiport_s = noisy.fast_p99("scsiport")
    return v


def report_json(parameters: dict[str, Any], points: Sequence[SweepPoint],
                noisy: NoisyResult | None, v: Verdict, wall_s: float) -> dict[str, Any]:
    def run_dict(r: RunResult) -> dict[str, Any]:
        d = asdict(r)
        d["iops"] = r.iops
        return d

    doc: dict[str, Any] = {
        "clock": "virtual",
        "parameters": parameters,
        "sweep": [
            {"luns": p.luns, "ratio_storport_over_scsiport": p.ratio(),
             **{model: run_dict(r) for model, r in p.results.items()}}
            for p in points
        ],
        "acceptance": {**asdict(v), "sweep_ok": v.sweep_ok, "noisy_ok": v.noisy_ok},
        "wall_s": wall_s,
    }
    if noisy is not None:
        doc["noisy_neighbour"] = {
            "with_neighbour": {m: run_dict(r) for m, r in noisy.with_neighbour.items()},
            "alone": {m: run_dict(r) for m, r in noisy.alone.items()},
        }
    return doc


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


class PlotUnavailable(RuntimeError):
    pass


def plot(path: str, points: Sequence[SweepPoint], noisy: NoisyResult | None,
         models: Sequence[str], *, depth: int, service_s: float) -> None:
    """Draw the sweep (IOPS against LUNs, with the Little's-law bounds) and the noisy-neighbour
    p99s into ``path``. Needs matplotlib (``pip install 'emuhba[plot]'``)."""
    try:
        # Imported by name: an optional extra, with no stubs required for type-checking.
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib, an optional extra: pip install 'emuhba[plot]' "
            "(or pip install matplotlib)") from exc
    names = {"storport": "Storport", "scsiport": "SCSIport"}
    panels = 2 if noisy is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    ax = axes[0][0]
    luns = [p.luns for p in points]
    for model in models:
        ax.plot(luns, [p.results[model].iops for p in points], marker="o",
                label=names.get(model, model))
    if luns:
        ax.plot(luns, [n * depth / service_s for n in luns], linestyle=":", color="grey",
                linewidth=2.5, zorder=1, label=f"LUNs x {depth} / service (Little)")
        ax.axhline(SCSIPORT_ADAPTER_LIMIT / service_s, linestyle="--", color="grey",
                   label=f"{SCSIPORT_ADAPTER_LIMIT} / service")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(luns, [str(n) for n in luns])
    ax.set_xlabel("LUNs")
    ax.set_ylabel("IOPS (virtual time)")
    ax.set_title(f"Closed loop, depth {depth}/LUN, {service_s * 1e3:g} ms service")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if noisy is not None:
        ax2 = axes[0][1]
        xs = range(len(models))
        width = 0.38
        alone = [noisy.fast_p99(m, neighbour=False) * 1e3 for m in models]
        beside = [noisy.fast_p99(m) * 1e3 for m in models]
        for offset, values, label in ((-width / 2, alone, "fast LUNs alone"),
                                      (width / 2, beside, "beside a saturated slow LUN")):
            bars = ax2.bar([x + offset for x in xs], values, width, label=label)
            ax2.bar_label(bars, fmt="%.2f")
        ax2.set_xticks(list(xs), [names.get(m, m) for m in models])
        ax2.set_ylabel("fast LUNs' p99 latency (ms)")
        ax2.set_title("Noisy neighbour")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------- CLI


def _lun_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated LUN counts: {text!r}") from None
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"LUN counts must be positive: {text!r}")
    return counts


def _models(text: str) -> list[str]:
    models = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in models if m not in KNOWN_MODELS]
    if not models or unknown:
        raise argparse.ArgumentTypeError(
            f"models are a comma-separated subset of {','.join(KNOWN_MODELS)}: {text!r}")
    return models


def _bytes(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if text and text[-1] in "KM":
        scale = 1024 if text[-1] == "K" else 1024 * 1024
        text = text[:-1]
    try:
        value = int(text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 4K, 1M)") \
            from None
    if value < _BLOCK or value % _BLOCK:
        raise argparse.ArgumentTypeError(f"I/O size must be a multiple of {_BLOCK}: {value}")
    return value


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value
    return parse


def _fraction(text: str) -> float:
    value = _non_negative(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be below 1: {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def add_bench_parser(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``bench`` (with its ``port`` subcommand) to the ``emuhba`` command's subparsers."""
    bench = subparsers.add_parser(
        "bench", help="benchmarks of the emulated HBA",
        description="Benchmarks of the emulated HBA. 'bench port' compares the Storport and "
                    "SCSIport port models on a virtual clock; 'bench target' measures emuhba "
                    "against tgtd over iSCSI.")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    sub.required = True
    defaults = CpuCosts()
    port = sub.add_parser(
        "port", help="Storport vs SCSIport queuing model (virtual time, no iSCSI)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Drive the port driver directly with closed-loop load over an emulated "
                    "controller, on a virtual clock, once per port model: a sweep of LUN counts "
                    "(IOPS, p50/p99 latency, Storport/SCSIport ratio) and a noisy-neighbour "
                    "case (fast LUNs' p99 beside one saturated slow LUN). Figures are virtual "
                    "time (the model); wall time is reported beside them.")
    port.add_argument("--scenario", choices=("all", "sweep", "noisy"), default="all",
                      help="which scenario(s) to run")
    port.add_argument("--models", type=_models, default=list(KNOWN_MODELS),
                      help="port models to compare, comma-separated")
    port.add_argument("--luns", type=_lun_counts, default=list(DEFAULT_LUN_COUNTS),
                      help="LUN counts of the sweep, comma-separated")
    port.add_argument("--depth", type=_positive(int), default=MAX_QUEUE_DEPTH_CLASSIC,
                      help="requests each LUN's load generator keeps outstanding (and the "
                           "per-LUN queue depth; above 255 the miniport declares extended SRBs)")
    port.add_argument("--service-ms", type=_positive(float), default=5.0,
                      help="device service time per request (the seek time)")
    port.add_argument("--transfer-us-per-kib", type=_non_negative, default=0.0,
                      help="device transfer time per KiB, added to the service time")
    port.add_argument("--jitter", type=_fraction, default=DEFAULT_JITTER,
                      help="each request's service time is drawn uniformly from (1 +- JITTER) "
                           "x the nominal one (seeded: runs are reproducible); 0 makes every "
                           "figure exact by Little's law, but lets a FIFO lock into convoys "
                           "that depend only on the start-up order")
    port.add_argument("--seed", type=int, default=1, help="seed of the service-time jitter")
    port.add_argument("--io-size", type=_bytes, default=4096, help="bytes per read (4K, 64K...)")
    port.add_argument("--sg-elements", type=_positive(int), default=1,
                      help="scatter/gather elements per request (SCSIport fetches each with a "
                           "call of its own)")
    port.add_argument("--duration", type=_positive(float), default=Workload.duration_s,
                      help="measured virtual seconds per sweep point")
    port.add_argument("--warmup", type=_non_negative, default=Workload.warmup_s,
                      help="virtual seconds before measuring, per sweep point")
    cost = port.add_argument_group("modeled CPU cost of the miniport routines (microseconds)")
    cost.add_argument("--build-us", type=_non_negative, default=defaults.build_s * 1e6,
                      help="HwBuildIo work per request (unlocked in Storport; under the adapter "
                           "lock, inside HwStartIo, in SCSIport)")
    cost.add_argument("--start-us", type=_non_negative, default=defaults.start_s * 1e6,
                      help="HwStartIo per request (start lock / adapter lock)")
    cost.add_argument("--interrupt-us", type=_non_negative, default=defaults.interrupt_s * 1e6,
                      help="HwInterrupt per completion (interrupt lock / adapter lock)")
    cost.add_argument("--sg-element-us", type=_non_negative, default=defaults.sg_element_s * 1e6,
                      help="SCSIport: one call per scatter/gather element")
    cost.add_argument("--cpus", type=_positive(int), default=defaults.cpus,
                      help="processors running unlocked routines (Storport's HwBuildIo)")
    cost.add_argument("--no-cpu-cost", action="store_true",
                      help="model no CPU cost at all: pure queuing (Little's law)")
    port.add_argument("--busy-retry-ms", type=_non_negative, default=1.0,
                      help="port's delay before restarting a request answered BUSY")
    noisy = port.add_argument_group("noisy neighbour")
    noisy.add_argument("--fast-luns", type=_positive(int), default=NoisySpec.fast_luns,
                       help="fast LUNs beside the slow one")
    noisy.add_argument("--fast-depth", type=_positive(int), default=NoisySpec.fast_depth,
                       help="outstanding requests per fast LUN")
    noisy.add_argument("--slow-ms", type=_positive(float), default=50.0,
                       help="the slow LUN's service time")
    noisy.add_argument("--slow-depth", type=_positive(int), default=NoisySpec.slow_depth,
                       help="outstanding requests on the slow LUN (it is kept saturated)")
    noisy.add_argument("--slow-slots", type=_positive(int), default=None,
                       help="give the slow LUN this many slots and have it answer BUSY beyond "
                            "them (default: it serves everything, slowly)")
    noisy.add_argument("--noisy-warmup", type=_non_negative, default=NoisySpec.warmup_s,
                       help="virtual seconds before measuring the noisy-neighbour case")
    noisy.add_argument("--noisy-duration", type=_positive(float), default=NoisySpec.duration_s,
                       help="measured virtual seconds of the noisy-neighbour case")
    port.add_argument("--json", metavar="FILE", help="write every figure as JSON to FILE")
    port.add_argument("--plot", metavar="FILE.png",
                      help="draw the sweep and the noisy-neighbour case (needs matplotlib: "
                           "pip install 'emuhba[plot]')")
    port.add_argument("--check", action="store_true",
                      help=f"exit 1 unless Storport >= {ACCEPTANCE_RATIO:g}x SCSIport at "
                           f"{ACCEPTANCE_LUNS} LUNs and the noisy-neighbour fast p99 is lower "
                           "in Storport (when those were measured)")
    port.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    port.add_argument("--log-format", choices=("console", "json"), default="console",
                      help="log output format")
    port.add_argument("--log-level", default="warning",
                      choices=("debug", "info", "warning", "error", "critical"),
                      help="least severe level logged")
    port.set_defaults(bench_main=run_bench_port)
    from emuhba import bench_target

    target = sub.add_parser(
        "target", help="emuhba next to tgtd over iSCSI on this machine (needs root)",
        description="Start emuhba and tgtd (RAM LUN each; tgtd's in /dev/shm), run the same "
                    "cases against both, alternating, for several rounds, and print medians "
                    "with min-max, the emuhba/tgtd ratio, CPU seconds per 1,000 I/Os and peak "
                    "RSS. Reads: iscsi-perf; writes: qemu-img bench over iscsi://.")
    bench_target.add_arguments(target)
    target.set_defaults(bench_main=bench_target.run)
    return bench


def _costs(args: argparse.Namespace) -> CpuCosts:
    if args.no_cpu_cost:
        return CpuCosts.free()
    return CpuCosts(build_s=args.build_us * 1e-6, start_s=args.start_us * 1e-6,
                    interrupt_s=args.interrupt_us * 1e-6,
                    sg_element_s=args.sg_element_us * 1e-6, cpus=args.cpus)


def run_bench_port(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``emuhba bench port``: run the scenarios, print the tables, write --json/--plot.

    Synchronous: every simulation runs on a virtual clock loop of its own, so this must not be
    called from inside a running event loop."""
    from emuhba.logs import configure_logging

    out = out if out is not None else sys.stdout
    configure_logging(getattr(args, "log_format", "console"),
                      getattr(args, "log_level", "warning"))
    err = sys.stderr
    known = available_models()
    models = [m for m in args.models if m in known]
    for missing in (m for m in args.models if m not in known):
        print(f"emuhba bench port: the port driver has no {missing!r} model in this build "
              f"(has: {', '.join(known)}); skipping it", file=err)
    if not models:
        return 2
    if args.plot:
        # Fail before minutes of simulation, not after.
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            print("emuhba bench port: --plot needs matplotlib, an optional extra: "
                  "pip install 'emuhba[plot]' (or pip install matplotlib)", file=err)
            return 2
    service = ServiceTime(args.service_ms * 1e-3, args.transfer_us_per_kib * 1e-6, args.jitter)
    base = Workload(luns=(), io_bytes=args.io_size, sg_elements=args.sg_elements,
                    warmup_s=args.warmup, duration_s=args.duration, costs=_costs(args),
                    busy_retry_delay_s=args.busy_retry_ms * 1e-3, seed=args.seed)
    spec = NoisySpec(fast_luns=args.fast_luns, fast_depth=args.fast_depth,
                     fast_service=service, slow_depth=args.slow_depth,
                     slow_service=ServiceTime(args.slow_ms * 1e-3, args.transfer_us_per_kib * 1e-6,
                                              args.jitter),
                     slow_slots=args.slow_slots, warmup_s=args.noisy_warmup,
                     duration_s=args.noisy_duration)

    def progress(line: str) -> None:
        print(line, file=err, flush=True)

    tell = None if args.quiet else progress
    started = time.perf_counter()
    points: list[SweepPoint] = []
    noisy: NoisyResult | None = None
    if args.scenario in ("all", "sweep"):
        points = sweep(args.luns, models, depth=args.depth, service=service, base=base,
                       progress=tell)
    if args.scenario in ("all", "noisy"):
        noisy = noisy_neighbour(spec, models, base=base, progress=tell)
    wall = time.perf_counter() - started
    v = verdict(points, noisy)

    print(f"emuhba bench port (virtual time): {describe(base, args.depth, service)}", file=out)
    if points:
        print(file=out)
        print(format_sweep(points, models), file=out)
    if noisy is not None:
        print(file=out)
        print(format_noisy(noisy, spec, models), file=out)
    lines = v.lines()
    if lines:
        print(file=out)
        for line in lines:
            print(line, file=out)
    print(f"\nWall-clock time of the simulations: {wall:.1f} s", file=out)

    if args.json:
        parameters = {
            "models": models, "luns": args.luns, "depth": args.depth,
            "service_s": service.seek_s, "transfer_s_per_kib": service.per_kib_s,
            "jitter": service.jitter, "seed": base.seed,
            "io_bytes": base.io_bytes, "sg_elements": base.sg_elements,
            "warmup_s": base.warmup_s, "duration_s": base.duration_s,
            "costs": asdict(base.costs), "busy_retry_delay_s": base.busy_retry_delay_s,
            "noisy": {"fast_luns": spec.fast_luns, "fast_depth": spec.fast_depth,
                      "slow_depth": spec.slow_depth, "slow_service_s": spec.slow_service.seek_s,
                      "slow_slots": spec.slow_slots, "warmup_s": spec.warmup_s,
                      "duration_s": spec.duration_s},
        }
        doc = _nan_to_none(report_json(parameters, points, noisy, v, wall))
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
    if args.plot:
        try:
            plot(args.plot, points, noisy, models, depth=args.depth, service_s=service.seek_s)
        except PlotUnavailable as exc:
            print(f"emuhba bench port: {exc}", file=err)
            return 2
    if args.check and (v.sweep_ok is False or v.noisy_ok is False):
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emuhba.bench_port ...``: the same as ``emuhba bench port ...``."""
    parser = argparse.ArgumentParser(prog="emuhba")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "port", *(argv if argv is not None else sys.argv[1:])])
    result: int = args.bench_main(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
