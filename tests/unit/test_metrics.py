"""Prometheus metrics: the collector reads the port's and the sessions' counters at scrape time,
and the HTTP endpoint serves them on the loop."""

from __future__ import annotations

import asyncio
import gzip
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from emuhba.hba import Hba
from emuhba.metrics import MetricsServer, PortCollector, build_registry, histogram_data, render
from emuhba.srb import DataDirection, Srb
from miniports.disk import DiskMiniport
from target.connection import Connection
from target.portal import TargetNode, TargetPortal
from tests.initiator import TestInitiator

IQN = "iqn.2026-11.io.emuhba:metrics-test"
BS = 512
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    # A test elsewhere that runs a CLI entry point calls configure_logging(), which binds
    # structlog to the sys.stderr of that moment (pytest's capture of that test, closed
    # afterwards). Logging from here would then raise; start from structlog's defaults.
    structlog.reset_defaults()


@pytest.fixture
async def hba() -> AsyncIterator[Hba]:
    adapter = Hba(DiskMiniport.from_luns([("ram", 1 << 20)] * 2, target_port_name=f"{IQN},t,1"))
    await adapter.start()
    yield adapter
    await adapter.stop()


@pytest.fixture
def portal(hba: Hba) -> TargetPortal:
    return TargetPortal([TargetNode(IQN, hba)])


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def lun(n: int) -> tuple[tuple[str, str], ...]:
    return (("adapter", "hba0"), ("lun", str(n)), ("path", "0"), ("target", "0"))


ADAPTER = (("adapter", "hba0"),)


def scrape(hba: Hba, portal: TargetPortal | None = None) -> Samples:
    return samples(generate_latest(build_registry(hba, portal)).decode())


async def reads(hba: Hba, lun_number: int, count: int) -> None:
    done: list[Srb] = []
    for i in range(count):
        cdb = bytes((0x28, 0)) + i.to_bytes(4, "big") + bytes((0, 0, 1, 0))
        hba.execute(Srb(lun=lun_number, cdb=cdb, data_direction=DataDirection.IN,
                        data_transfer_length=BS, sg_list=[memoryview(bytearray(BS))],
                        nexus=1, queue_tag=i + 1, completion=done.append))
    deadline = time.monotonic() + 5
    while len(done) < count:
        assert time.monotonic() < deadline, "reads did not complete"
        await asyncio.sleep(0.002)


async def test_counters_follow_the_port_at_scrape_time(hba: Hba) -> None:
    before = scrape(hba)
    await reads(hba, 1, 5)
    after = scrape(hba)
    assert after[("emuhba_lun_completed_total", lun(1))] - \
        before[("emuhba_lun_completed_total", lun(1))] == 5
    assert after[("emuhba_lun_queued_total", lun(1))] - \
        before[("emuhba_lun_queued_total", lun(1))] == 5
    assert after[("emuhba_lun_completed_total", lun(0))] == \
        before[("emuhba_lun_completed_total", lun(0))]
    lq = hba.port.lun_queue(0, 0, 1)
    assert lq is not None
    assert after[("emuhba_lun_completed_total", lun(1))] == lq.completed
    assert after[("emuhba_adapter_completed_total", ADAPTER)] == hba.port.completed
    assert after[("emuhba_lun_queue_depth", lun(1))] == lq.queue_depth
    assert after[("emuhba_lun_outstanding", lun(1))] == 0
    info = (("adapter", "hba0"), ("miniport", "emudisk"), ("model", "storport"))
    assert after[("emuhba_adapter_info", info)] == 1
    for name in ("busy_retries_total", "aborted_total", "pauses_total", "busies_total",
                 "timeouts_total", "reset_retries_total", "held", "peak_outstanding", "paused",
                 "busy"):
        assert (f"emuhba_lun_{name}", lun(0)) in after, name
        assert (f"emuhba_adapter_{name}", ADAPTER) in after, name
    assert ("emuhba_lun_resets_total", lun(0)) in after
    for kind in ("lun", "target", "bus"):
        assert after[("emuhba_adapter_resets_total", (("adapter", "hba0"), ("kind", kind)))] == 0
    for step in ("abort_task", "lun_reset", "target_reset", "bus_reset", "failed"):
        assert ("emuhba_adapter_recovery_steps_total",
                (("adapter", "hba0"), ("step", step))) in after
    # The port's own latency histograms, as Prometheus histograms.
    count = "emuhba_lun_latency_seconds_count"
    assert after[(count, lun(1))] - before[(count, lun(1))] == 5
    assert after[(count, lun(1))] == lq.latency.count
    assert after[("emuhba_lun_latency_seconds_sum", lun(1))] == pytest.approx(
        lq.latency.sum_seconds)
    inf = tuple(sorted((*lun(1), ("le", "+Inf"))))
    assert after[("emuhba_lun_latency_seconds_bucket", inf)] == lq.latency.count
    assert after[("emuhba_adapter_latency_seconds_count", ADAPTER)] == hba.port.latency.count


async def test_paused_and_busy_gauges_and_held_requests(hba: Hba) -> None:
    hba.port.pause_device(0, 0, 0, 60)
    hba.port.busy(100)
    done: list[Srb] = []
    hba.execute(Srb(lun=0, cdb=bytes(6), nexus=1, queue_tag=1, completion=done.append))
    now = scrape(hba)
    assert now[("emuhba_lun_paused", lun(0))] == 1
    assert now[("emuhba_lun_paused", lun(1))] == 0
    assert now[("emuhba_adapter_busy", ADAPTER)] == 1
    assert now[("emuhba_lun_held", lun(0))] == 1
    assert now[("emuhba_adapter_held", ADAPTER)] == 1
    assert now[("emuhba_lun_pauses_total", lun(0))] == 1
    assert now[("emuhba_adapter_busies_total", ADAPTER)] == 1
    assert now[("emuhba_adapter_device_pauses_total", ADAPTER)] == 1
    hba.port.resume_device(0, 0, 0)
    hba.port.ready()
    deadline = time.monotonic() + 5
    while not done:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    later = scrape(hba)
    assert later[("emuhba_lun_paused", lun(0))] == 0
    assert later[("emuhba_adapter_busy", ADAPTER)] == 0
    assert later[("emuhba_lun_held", lun(0))] == 0


async def test_session_counters(hba: Hba, portal: TargetPortal) -> None:
    empty = scrape(hba, portal)
    assert empty[("emuhba_iscsi_sessions", (("kind", "normal"),))] == 0
    ini = TestInitiator(Connection(portal))
    ini.login(IQN)
    ini.nop()
    session = ini.conn.session
    assert session is not None
    labels = (("initiator", ini.name), ("isid", session.isid.hex()), ("target", IQN),
              ("tsih", str(session.tsih)))
    first = scrape(hba, portal)
    assert first[("emuhba_iscsi_sessions", (("kind", "normal"),))] == 1
    assert first[("emuhba_iscsi_session_pdus_in_total", labels)] == ini.conn.pdus_in
    assert first[("emuhba_iscsi_session_pdus_out_total", labels)] == ini.conn.pdus_out
    assert first[("emuhba_iscsi_session_rejects_total", labels)] == 0
    assert first[("emuhba_iscsi_session_digest_errors_total", labels)] == 0
    assert first[("emuhba_iscsi_session_connections", labels)] == 1
    ini.nop()
    second = scrape(hba, portal)
    assert second[("emuhba_iscsi_session_pdus_in_total", labels)] == \
        first[("emuhba_iscsi_session_pdus_in_total", labels)] + 1


def test_histogram_data_shapes() -> None:
    class Plain:
        sum = 0.75

        def buckets(self) -> list[tuple[float, int]]:
            return [(0.001, 2), (0.01, 3), (float("inf"), 1)]

    class Cumulative:
        def cumulative(self) -> list[tuple[float, int]]:
            return [(0.5, 4), (1.0, 5)]

        def total_seconds(self) -> float:
            return 2.5

    class Ready:
        def prometheus_buckets(self) -> tuple[list[tuple[str, float]], float]:
            return [("0.1", 1.0), ("+Inf", 2.0)], 0.3

    assert histogram_data(Plain()) == ([("0.001", 2.0), ("0.01", 5.0), ("+Inf", 6.0)], 0.75)
    assert histogram_data(Cumulative()) == ([("0.5", 4.0), ("1.0", 5.0), ("+Inf", 5.0)], 2.5)
    assert histogram_data(Ready()) == ([("0.1", 1.0), ("+Inf", 2.0)], 0.3)
    assert histogram_data(None) is None
    assert histogram_data(object()) is None


async def test_latency_histograms_are_exported_as_prometheus_histograms(hba: Hba) -> None:
    class Fixed:
        def buckets(self) -> list[tuple[float, int]]:
            return [(0.001, 3), (0.01, 1)]

        sum = 0.012

    collector = PortCollector(hba, lun_histogram=lambda lq: Fixed() if lq.lun == 1 else None,
                              adapter_histogram=Fixed)
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    got = samples(generate_latest(registry).decode())
    bucket = tuple(sorted((*lun(1), ("le", "0.001"))))
    assert got[("emuhba_lun_latency_seconds_bucket", bucket)] == 3
    assert got[("emuhba_lun_latency_seconds_count", lun(1))] == 4
    assert got[("emuhba_lun_latency_seconds_sum", lun(1))] == pytest.approx(0.012)
    assert ("emuhba_lun_latency_seconds_count", lun(0)) not in got
    assert got[("emuhba_adapter_latency_seconds_count", ADAPTER)] == 4


def test_collect_runs_only_when_scraped(hba: Hba) -> None:
    calls = 0

    class Counting(PortCollector):
        def collect(self) -> Any:
            nonlocal calls
            calls += 1
            return super().collect()

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Counting(hba))
    assert calls == 0
    generate_latest(registry)
    assert calls == 1


def test_render_negotiates_openmetrics(hba: Hba) -> None:
    registry = build_registry(hba)
    body, content_type = render(registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"emuhba_lun_completed_total" in body
    body, content_type = render(registry, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    body, _ = render(registry, names=["emuhba_lun_queue_depth"])
    assert b"emuhba_lun_queue_depth" in body and b"emuhba_lun_completed" not in body


# ------------------------------------------------------------------------------------ HTTP


@pytest.fixture
async def http(hba: Hba, portal: TargetPortal) -> AsyncIterator[MetricsServer]:
    server = MetricsServer(build_registry(hba, portal), "127.0.0.1", 0, read_timeout=1.0)
    await server.start()
    yield server
    await server.close()


def url(server: MetricsServer, path: str = "/metrics") -> str:
    host, port = server.addresses[0]
    return f"http://{host}:{port}{path}"


def fetch(address: str, method: str = "GET", headers: dict[str, str] | None = None,
          ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(address, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def test_http_scrape_shows_counters_moving(hba: Hba, http: MetricsServer) -> None:
    status, headers, body = await asyncio.to_thread(fetch, url(http))
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    first = samples(body.decode())
    await reads(hba, 0, 4)
    _, _, body = await asyncio.to_thread(fetch, url(http))
    second = samples(body.decode())
    assert second[("emuhba_lun_completed_total", lun(0))] - \
        first[("emuhba_lun_completed_total", lun(0))] == 4
    assert http.scrapes == 2


async def test_http_paths_methods_and_encodings(http: MetricsServer) -> None:
    status, _, body = await asyncio.to_thread(fetch, url(http, "/nope"))
    assert status == 404
    status, headers, _ = await asyncio.to_thread(fetch, url(http), "POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = await asyncio.to_thread(fetch, url(http), "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    status, headers, body = await asyncio.to_thread(fetch, url(http), "GET",
                                                    {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert b"emuhba_adapter_info" in gzip.decompress(body)
    status, _, body = await asyncio.to_thread(fetch, url(http, "/"))
    assert status == 200 and b"/metrics" in body


async def test_http_garbage_and_silence_do_not_hurt(http: MetricsServer) -> None:
    host, port = http.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"HELLO THERE\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400")
    writer.close()
    # A client that says nothing is dropped after read_timeout.
    reader, writer = await asyncio.open_connection(host, port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    status, _, _ = await asyncio.to_thread(fetch, url(http))
    assert status == 200


async def test_a_failing_collector_answers_500_and_the_server_goes_on(hba: Hba) -> None:
    from prometheus_client import CollectorRegistry

    class Broken(PortCollector):
        fail = True

        def collect(self) -> Any:
            if Broken.fail:
                raise RuntimeError("collector bug")
            return super().collect()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Broken(hba))
    server = MetricsServer(registry, "127.0.0.1", 0)
    await server.start()
    try:
        status, _, _ = await asyncio.to_thread(fetch, url(server))
        assert status == 500
        Broken.fail = False
        status, _, body = await asyncio.to_thread(fetch, url(server))
        assert status == 200 and b"emuhba_lun_queued_total" in body
    finally:
        await server.close()
