"""Prometheus metrics: the port driver's queue counters and the iSCSI sessions, read at scrape time.

Nothing here runs per I/O. :class:`PortCollector` is a custom ``prometheus_client`` collector that
reads the plain integer counters the port driver and the connections keep anyway, when Prometheus
asks; :class:`MetricsServer` is a small HTTP/1.1 handler on the server's own asyncio loop (no
thread, so the counters are read between I/O events, never torn).

Metric names (labels in braces; README.md has the full table):

* ``emuhba_adapter_*{adapter}``: queued, completed, busy retries, aborted, timeouts, pauses,
  busies, ... (counters); resets by ``kind`` and error-recovery steps by ``step``; outstanding,
  held, peak outstanding, paused, busy, the adapter limit (gauges); latency (histogram);
  ``emuhba_adapter_info{adapter,miniport,model}``.
* ``emuhba_lun_*{adapter,path,target,lun}``: the same per logical unit (pauses, busies and
  resets that applied to it), plus its queue depth.
* ``emuhba_iscsi_session_*{tsih,initiator,isid,target}``: PDUs in and out, rejects, digest
  errors (counters, summed over the session's live connections: a connection that is gone
  takes its counts with it), connections and active commands (gauges);
  ``emuhba_iscsi_sessions{kind}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from emuhba.control import adapter_snapshot, session_snapshot

if TYPE_CHECKING:
    from emuhba.hba import Hba
    from emuhba.port import LunQueue
    from target.portal import TargetPortal

log = structlog.get_logger("emuhba.metrics")

METRICS_PATH: Final = "/metrics"
_MAX_HEADER_BYTES: Final = 16 * 1024
_LUN_LABELS: Final = ("adapter", "path", "target", "lun")
_SESSION_LABELS: Final = ("tsih", "initiator", "isid", "target")

# (counters() key, metric suffix, help): monotonically increasing counts, on both levels.
_QUEUE_COUNTERS: Final = (
    ("queued", "queued", "Requests submitted to the port driver"),
    ("completed", "completed", "Requests completed back to the submitter (aborted included)"),
    ("busy_retries", "busy_retries", "Requests answered BUSY and restarted by the port"),
    ("aborted", "aborted", "Requests that ended aborted"),
    ("timeouts", "timeouts", "Requests that timed out at the miniport"),
    ("reset_retries", "reset_retries",
     "Requests a port-initiated reset caught and the port restarted"),
)
# Levels at this instant.
_QUEUE_GAUGES: Final = (
    ("outstanding", "outstanding", "Requests at the miniport now"),
    ("held", "held", "Requests held in the port (queue full, paused or busy)"),
    ("peak_outstanding", "peak_outstanding", "Most requests ever at the miniport at once"),
)
_LUN_ONLY_COUNTERS: Final = (
    ("pauses", "pauses", "Pause controls applied to the logical unit (miniport or operator)"),
    ("busies", "busies", "Busy controls applied to the logical unit (miniport or operator)"),
    ("resets", "resets", "LUN, target or bus resets that covered the logical unit"),
)
_ADAPTER_ONLY_COUNTERS: Final = (
    ("pauses", "pauses", "Adapter-wide pause controls applied (miniport or operator)"),
    ("busies", "busies", "Adapter-wide busy controls applied (miniport or operator)"),
    ("device_pauses", "device_pauses", "Pause controls applied to any of its logical units"),
    ("device_busies", "device_busies", "Busy controls applied to any of its logical units"),
    ("ignored_controls", "ignored_controls",
     "Queue controls ignored because the port model has none (SCSIport)"),
    ("interrupts", "interrupts", "Interrupt routine runs"),
    ("stray_completions", "stray_completions",
     "Completions the miniport reported for requests it did not have"),
    ("forced_completions", "forced_completions",
     "Requests the port completed without the miniport (lost by it)"),
    ("sg_element_calls", "sg_element_calls",
     "Scatter/gather elements fetched one call at a time (SCSIport)"),
)
# Resets by kind, and error recovery's steps (adapter level, one family each, labelled).
_RESET_KINDS: Final = (("lun", "lun_resets"), ("target", "target_resets"), ("bus", "bus_resets"))
_RECOVERY_STEPS: Final = (
    ("abort_task", "recovery_aborts"), ("lun_reset", "recovery_lun_resets"),
    ("target_reset", "recovery_target_resets"), ("bus_reset", "recovery_bus_resets"),
    ("failed", "recovery_failures"),
)
_SESSION_COUNTERS: Final = (
    ("pdus_in", "pdus_in", "iSCSI PDUs received on the session's live connections"),
    ("pdus_out", "pdus_out", "iSCSI PDUs sent on the session's live connections"),
    ("rejects", "rejects", "Reject PDUs sent"),
    ("digest_errors", "digest_errors", "PDUs dropped for a header or data digest mismatch"),
)

HistogramData = tuple[list[tuple[str, float]], float]


def histogram_data(source: object) -> HistogramData | None:
    """Cumulative ``(le, count)`` buckets ending at +Inf, and the sum, from a latency histogram.

    Takes the port's :class:`emuhba.port.LatencyHistogram` (``prometheus_buckets()``: cumulative
    ``(upper bound, count)`` pairs and the sum) or anything offering ``cumulative()`` or
    ``buckets()`` (non-cumulative) pairs plus a ``sum``/``sum_seconds``; None for anything else.
    """
    if source is None:
        return None
    ready = getattr(source, "prometheus_buckets", None)
    if callable(ready):
        buckets, total = ready()
        return _finish_buckets(buckets, float(total), cumulative=True)
    total = _number(source, ("sum", "sum_seconds", "total_seconds", "total"))
    for name, cumulative in (("cumulative", True), ("buckets", False)):
        method = getattr(source, name, None)
        if callable(method):
            pairs = list(method())
            return _finish_buckets(pairs, total, cumulative=cumulative)
    return None


def _number(source: object, names: Sequence[str]) -> float:
    for name in names:
        value = getattr(source, name, None)
        if callable(value):
            value = value()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return 0.0


def _finish_buckets(pairs: Iterable[tuple[Any, Any]], total: float, *,
                    cumulative: bool) -> HistogramData:
    out: list[tuple[str, float]] = []
    running = 0.0
    for bound, count in pairs:
        running = float(count) if cumulative else running + float(count)
        bound_f = float(bound)
        label = "+Inf" if bound_f == float("inf") else _le(bound_f)
        out.append((label, running))
    if not out or out[-1][0] != "+Inf":
        out.append(("+Inf", running))
    return out, total


def _le(bound: float) -> str:
    return repr(bound) if bound != int(bound) else f"{bound:.1f}"


class PortCollector:
    """``prometheus_client`` collector for one adapter and (optionally) the iSCSI sessions."""

    def __init__(self, hba: Hba, portal: TargetPortal | None = None, *,
                 lun_histogram: Callable[[LunQueue], object] | None = None,
                 adapter_histogram: Callable[[], object] | None = None) -> None:
        self.hba = hba
        self.portal = portal
        self._lun_histogram = lun_histogram or _default_lun_histogram
        self._adapter_histogram = adapter_histogram or (lambda: _default_adapter_histogram(hba))

    def describe(self) -> list[Metric]:
        # Empty: the registry then calls collect() only at scrape time.
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._adapter_metrics()
        yield from self._lun_metrics()
        if self.portal is not None:
            yield from self._session_metrics(self.portal)

    def _adapter_metrics(self) -> Iterator[Metric]:
        snap = adapter_snapshot(self.hba)
        name = snap["name"]
        counters: dict[str, int] = snap["counters"]
        info = GaugeMetricFamily("emuhba_adapter_info", "The adapter, its miniport and port model",
                                 labels=("adapter", "miniport", "model"))
        info.add_metric((name, snap["miniport"], snap["model"]), 1)
        yield info
        for key, suffix, text in (*_QUEUE_COUNTERS, *_ADAPTER_ONLY_COUNTERS):
            family = CounterMetricFamily(f"emuhba_adapter_{suffix}", text, labels=("adapter",))
            family.add_metric((name,), counters.get(key, 0))
            yield family
        resets = CounterMetricFamily("emuhba_adapter_resets",
                                     "Resets carried out on the adapter, by kind",
                                     labels=("adapter", "kind"))
        for kind, key in _RESET_KINDS:
            resets.add_metric((name, kind), counters.get(key, 0))
        yield resets
        recovery = CounterMetricFamily(
            "emuhba_adapter_recovery_steps",
            "Error recovery steps taken for timed-out requests (abort, LUN, target, bus reset; "
            "failed: even the bus reset did not bring them back)", labels=("adapter", "step"))
        for step, key in _RECOVERY_STEPS:
            recovery.add_metric((name, step), counters.get(key, 0))
        yield recovery
        for key, suffix, text in _QUEUE_GAUGES:
            gauge = GaugeMetricFamily(f"emuhba_adapter_{suffix}", text, labels=("adapter",))
            gauge.add_metric((name,), counters.get(key, 0))
            yield gauge
        limit = GaugeMetricFamily("emuhba_adapter_limit",
                                  "Most requests outstanding at the adapter at once (absent: no "
                                  "adapter-wide limit)", labels=("adapter",))
        if snap["adapter_limit"] is not None:
            limit.add_metric((name,), snap["adapter_limit"])
        yield limit
        for key, text in (("paused", "1 while the adapter is paused"),
                          ("busy", "1 while the adapter is busy")):
            gauge = GaugeMetricFamily(f"emuhba_adapter_{key}", text, labels=("adapter",))
            gauge.add_metric((name,), 1 if snap[key] else 0)
            yield gauge
        data = histogram_data(self._adapter_histogram())
        if data is not None:
            histogram = HistogramMetricFamily(
                "emuhba_adapter_latency_seconds",
                "Request latency from submission to the port until completion",
                labels=("adapter",))
            histogram.add_metric((name,), data[0], data[1])
            yield histogram

    def _lun_metrics(self) -> Iterator[Metric]:
        name = self.hba.name
        port = self.hba.port
        units = port.units()
        queues = sorted((lq for lq in port.lun_queues()
                         if lq.lun in units.get((lq.path_id, lq.target_id), [])),
                        key=lambda q: q.address)
        snaps = [(lq, lq.counters()) for lq in queues]

        def labels(lq: LunQueue) -> tuple[str, str, str, str]:
            return (name, str(lq.path_id), str(lq.target_id), str(lq.lun))

        for key, suffix, text in (*_QUEUE_COUNTERS, *_LUN_ONLY_COUNTERS):
            family = CounterMetricFamily(f"emuhba_lun_{suffix}", text, labels=_LUN_LABELS)
            for lq, counters in snaps:
                family.add_metric(labels(lq), counters.get(key, 0))
            yield family
        for key, suffix, text in (*_QUEUE_GAUGES,
                                  ("queue_depth", "queue_depth",
                                   "Most requests the port sends the unit at once")):
            gauge = GaugeMetricFamily(f"emuhba_lun_{suffix}", text, labels=_LUN_LABELS)
            for lq, counters in snaps:
                gauge.add_metric(labels(lq), counters.get(key, 0))
            yield gauge
        for key, text in (("paused", "1 while the logical unit is paused"),
                          ("busy", "1 while the logical unit is busy")):
            gauge = GaugeMetricFamily(f"emuhba_lun_{key}", text, labels=_LUN_LABELS)
            for lq, _ in snaps:
                gauge.add_metric(labels(lq), 1 if getattr(lq, key) else 0)
            yield gauge
        histogram = HistogramMetricFamily(
            "emuhba_lun_latency_seconds",
            "Request latency from submission to the port until completion",
            labels=_LUN_LABELS)
        any_data = False
        for lq, _ in snaps:
            data = histogram_data(self._lun_histogram(lq))
            if data is not None:
                histogram.add_metric(labels(lq), data[0], data[1])
                any_data = True
        if any_data:
            yield histogram

    @staticmethod
    def _session_metrics(portal: TargetPortal) -> Iterator[Metric]:
        sessions = [session_snapshot(s) for s in sorted(portal.sessions.values(),
                                                        key=lambda s: s.tsih)]
        count = GaugeMetricFamily("emuhba_iscsi_sessions", "Logged-in iSCSI sessions",
                                  labels=("kind",))
        count.add_metric(("normal",), sum(1 for s in sessions if not s["discovery"]))
        count.add_metric(("discovery",), sum(1 for s in sessions if s["discovery"]))
        yield count

        def labels(snap: dict[str, Any]) -> tuple[str, str, str, str]:
            return (str(snap["tsih"]), snap["initiator"], snap["isid"], snap["target"])

        for key, suffix, text in _SESSION_COUNTERS:
            family = CounterMetricFamily(f"emuhba_iscsi_session_{suffix}", text,
                                         labels=_SESSION_LABELS)
            for snap in sessions:
                family.add_metric(labels(snap), snap[key])
            yield family
        for key, suffix, text in (("connections", "connections", "Connections in the session"),
                                  ("commands_active", "commands_active",
                                   "SCSI commands accepted and not yet answered"),
                                  ("commands_waiting", "commands_waiting",
                                   "SCSI commands held unexecuted for room in the buffer budget"),
                                  ("buffered_bytes", "buffered_bytes",
                                   "Bytes of command data the session holds (its budget's use)")):
            gauge = GaugeMetricFamily(f"emuhba_iscsi_session_{suffix}", text,
                                      labels=_SESSION_LABELS)
            for snap in sessions:
                value = snap[key]
                gauge.add_metric(labels(snap), len(value) if isinstance(value, list) else value)
            yield gauge


def _default_lun_histogram(lq: LunQueue) -> object:
    return lq.latency


def _default_adapter_histogram(hba: Hba) -> object:
    return hba.port.latency


class AdaptersCollector:
    """Several adapters in one exposition: each family once, with every adapter's samples
    (an exposition must not repeat a family name)."""

    def __init__(self, collectors: Sequence[PortCollector]) -> None:
        self.collectors = list(collectors)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for collector in self.collectors:
            for family in collector.collect():
                known = merged.get(family.name)
                if known is None:
                    merged[family.name] = family
                else:
                    known.samples.extend(family.samples)
        yield from merged.values()


def build_registry(hbas: Hba | Sequence[Hba],
                   portal: TargetPortal | None = None) -> CollectorRegistry:
    """A registry of its own (not the global one) holding only our collector."""
    # Our collector describes nothing up front (so registering it costs no scrape); the flag
    # keeps such collectors in ``name[]``-restricted scrapes too.
    registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
    adapters = list(hbas) if isinstance(hbas, Sequence) else [hbas]
    if len(adapters) == 1:
        registry.register(PortCollector(adapters[0], portal))
    else:
        # Sessions once, with the first adapter's collector.
        registry.register(AdaptersCollector(
            [PortCollector(hba, portal if i == 0 else None) for i, hba in enumerate(adapters)]))
    return registry


def render(registry: CollectorRegistry, accept: str = "",
           names: Sequence[str] = ()) -> tuple[bytes, str]:
    """The exposition body and its Content-Type, negotiated from an Accept header (the text
    format by default, OpenMetrics when asked for)."""
    encoder, content_type = choose_encoder(accept)
    source: Any = registry.restricted_registry(list(names)) if names else registry
    return encoder(source), content_type


# ------------------------------------------------------------------------------- HTTP server


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on the running loop; one request per connection."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *,
                 read_timeout: float = 10.0) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.read_timeout = read_timeout
        self.scrapes = 0
        self.addresses: list[tuple[str, int]] = []
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> list[tuple[str, int]]:
        self._server = await asyncio.start_server(
            self._client, host=self.host or None, port=self.port, reuse_address=True,
            limit=_MAX_HEADER_BYTES)
        self.addresses = [(str(s.getsockname()[0]), int(s.getsockname()[1]))
                          for s in self._server.sockets]
        return self.addresses

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError):
                return
            try:
                status, headers, body = self.respond(head)
            except Exception:
                log.exception("metrics_request_failed")
                status, headers, body = ("500 Internal Server Error",
                                         [("Content-Type", "text/plain")], b"collector failed\n")
            writer.write(_response(status, headers, body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def respond(self, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        """Status line, headers and body for one request head (request line + headers)."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", [("Content-Type", "text/plain")], b"bad request\n"
        method, target, _ = parts
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        url = urlsplit(target)
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", [("Allow", "GET, HEAD"),
                                              ("Content-Type", "text/plain")], b"GET only\n"
        if url.path == "/":
            body = b"emuhba metrics exporter: see " + METRICS_PATH.encode() + b"\n"
            return "200 OK", [("Content-Type", "text/plain")], b"" if method == "HEAD" else body
        if url.path != METRICS_PATH:
            return "404 Not Found", [("Content-Type", "text/plain")], b"not found\n"
        names = parse_qs(url.query).get("name[]", [])
        body, content_type = render(self.registry, fields.get("accept", ""), names)
        headers = [("Content-Type", content_type)]
        if "gzip" in (t.split(";")[0].strip() for t in fields.get("accept-encoding", "").split(",")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        self.scrapes += 1
        if method == "HEAD":
            headers.append(("Content-Length", str(len(body))))
            return "200 OK", headers, b""
        return "200 OK", headers, body


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
    if not any(k == "Content-Length" for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
