"""``emuhba bench port``: the simulated controller, the modeled locks, the load generator and the
report, checked against what queuing theory says the figures must be.

Every run is on the virtual clock, so the expected figures are exact (Little's law with a fixed
service time) and the runs take little wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from emuhba import bench_port, simclock
from emuhba.bench_port import (
    LatencyStats,
    LunLoad,
    NoisySpec,
    Workload,
    add_bench_parser,
    available_models,
    percentile,
    run,
    run_bench_port,
)
from emuhba.port import PortDriver
from miniports.sim import CpuCosts, CpuLane, CpuPool, ServiceTime, SimMiniport, SimUnit

FIVE_MS = ServiceTime(0.005)
FREE = CpuCosts.free()

needs_scsiport = pytest.mark.skipif(
    "scsiport" not in available_models(),
    reason="the port driver has no SCSIport model yet (emuhba.port.MODELS)")


def uniform(luns: int, depth: int, service: ServiceTime = FIVE_MS, **kwargs: Any) -> Workload:
    return Workload.uniform(luns, depth, service, **kwargs)


# ------------------------------------------------------------------------ queuing theory


def test_littles_law_one_lun_depth_one_five_ms_is_exactly_200_iops() -> None:
    result = run(uniform(1, 1, costs=FREE, warmup_s=0.0, duration_s=1.0), "storport")
    assert result.total.completions == 200
    assert result.iops == 200.0
    assert result.total.p50_s == pytest.approx(0.005, abs=1e-12)
    assert result.total.p99_s == pytest.approx(0.005, abs=1e-12)
    assert result.errors == 0
    assert result.peak_outstanding == 1


def test_storport_throughput_is_luns_times_depth_over_service_time() -> None:
    result = run(uniform(4, 8, costs=FREE), "storport")
    assert result.iops == pytest.approx(4 * 8 / 0.005, rel=1e-9)
    assert result.peak_outstanding == 32
    assert result.total.max_s == pytest.approx(0.005, abs=1e-12)
    assert result.errors == 0


def test_transfer_time_adds_to_the_seek() -> None:
    # 8 KiB at 100 us/KiB: 5 ms + 0.8 ms per request.
    slow_transfer = ServiceTime(0.005, per_kib_s=100e-6)
    result = run(uniform(1, 1, slow_transfer, costs=FREE, io_bytes=8192, warmup_s=0.0,
                         duration_s=0.58), "storport")
    assert result.total.p50_s == pytest.approx(0.0058, abs=1e-12)
    assert result.total.completions == 100


def test_depth_is_capped_at_255_without_extended_srbs_and_not_with_them() -> None:
    classic = run(uniform(1, 255, costs=FREE), "storport")
    assert classic.peak_outstanding == 255
    extended = run(uniform(2, 300, costs=FREE), "storport")
    # Above 255 the simulated miniport declares extended SRBs, so the port lets 300 through.
    assert extended.peak_outstanding == 600
    assert extended.iops == pytest.approx(600 / 0.005, rel=1e-9)


def test_a_simulation_is_deterministic() -> None:
    workload = uniform(3, 16, ServiceTime(0.005, jitter=0.2))
    first, second = run(workload, "storport"), run(workload, "storport")
    assert first.total == second.total
    assert first.lock_utilisation == second.lock_utilisation
    reseeded = run(Workload(workload.luns, seed=2), "storport")
    assert reseeded.total != first.total


def test_jitter_spreads_service_times_around_the_nominal_one() -> None:
    result = run(uniform(2, 16, ServiceTime(0.005, jitter=0.2), costs=FREE, duration_s=1.0),
                 "storport")
    stats = result.total
    assert stats.max_s <= 0.006 + 1e-12
    assert stats.p50_s == pytest.approx(0.005, rel=0.05)
    assert stats.mean_s == pytest.approx(0.005, rel=0.01)
    assert stats.p99_s > 0.0058
    assert result.iops == pytest.approx(32 / 0.005, rel=0.01)
    for bad in ({"jitter": 1.0}, {"jitter": -0.1}, {"seek_s": -1.0}):
        with pytest.raises(ValueError):
            ServiceTime(**bad)


# ------------------------------------------------------------------ modeled CPU and locks


def test_a_lone_request_pays_each_routine_once_in_either_lock_layout() -> None:
    costs = CpuCosts(build_s=2e-6, start_s=1e-6, sg_element_s=0.25e-6, interrupt_s=1e-6)
    workload = uniform(1, 1, costs=costs, sg_elements=4, warmup_s=0.0, duration_s=0.1)
    full = run(workload, "storport", duplex="full")
    half = run(workload, "storport", duplex="half")
    # build + start + service + interrupt; half duplex adds one call per SG element.
    assert full.total.p50_s == pytest.approx(0.005 + 4e-6, abs=1e-12)
    assert half.total.p50_s == pytest.approx(0.005 + 4e-6 + 4 * 0.25e-6, abs=1e-12)


def test_half_duplex_serializes_start_and_completion_full_duplex_overlaps_them() -> None:
    # A device with no service time: the routines are the only cost, 1 ms to start a request
    # and 1 ms to complete one. Overlapped, each lock can take 1,000 a second; sharing one
    # lock, starts and completions take turns: 500 a second. (Half duplex runs in cycles of
    # 32 starts then 32 completions, 64 ms: the window holds whole cycles.)
    costs = CpuCosts(build_s=0.0, start_s=1e-3, sg_element_s=0.0, interrupt_s=1e-3)
    workload = uniform(1, 32, ServiceTime(0.0), costs=costs, warmup_s=0.256, duration_s=1.024)
    full = run(workload, "storport", duplex="full")
    half = run(workload, "storport", duplex="half")
    assert full.iops == pytest.approx(1000, rel=0.01)
    assert half.iops == pytest.approx(500, rel=0.01)
    # Saturated (but for the start-up and the drain at the end of the run).
    assert 0.95 < full.lock_utilisation["start"] <= 1.0
    assert 0.95 < full.lock_utilisation["interrupt"] <= 1.0
    assert 0.95 < half.lock_utilisation["adapter"] <= 1.0


def test_unlocked_build_work_spreads_over_the_processors() -> None:
    # 1 ms of HwBuildIo per request: 4 processors build 4,000 a second, 1 builds 1,000.
    workload = uniform(1, 64, ServiceTime(0.0), warmup_s=0.1, duration_s=1.0,
                       costs=CpuCosts(build_s=1e-3, start_s=0.0, sg_element_s=0.0,
                                      interrupt_s=0.0, cpus=4))
    assert run(workload, "storport").iops == pytest.approx(4000, rel=0.01)
    one_cpu = Workload(workload.luns, warmup_s=0.1, duration_s=1.0,
                       costs=CpuCosts(build_s=1e-3, start_s=0.0, sg_element_s=0.0,
                                      interrupt_s=0.0, cpus=1))
    assert run(one_cpu, "storport").iops == pytest.approx(1000, rel=0.01)


def test_cpu_lane_is_a_fifo_single_server() -> None:
    lane = CpuLane("start")
    assert lane.charge(0.0, 1.0) == 1.0
    assert lane.charge(0.5, 1.0) == 2.0  # waited for the first
    assert lane.charge(5.0, 1.0) == 6.0  # lane idle: starts on arrival
    assert lane.busy_s == 3.0
    pool = CpuPool(2)
    assert [pool.charge(0.0, 1.0) for _ in range(4)] == [1.0, 1.0, 2.0, 2.0]
    with pytest.raises(ValueError):
        CpuPool(0)


# ----------------------------------------------------------------- BUSY and the controller


def test_a_unit_out_of_slots_answers_busy_and_the_port_retries_until_done() -> None:
    workload = Workload((LunLoad(0, 8, FIVE_MS, slots=2),), costs=FREE, warmup_s=0.0,
                        duration_s=0.1)
    result = run(workload, "storport")
    # The first burst: 8 sent, 2 taken, 6 refused. The miniport then lowers the unit's depth to
    # its 2 slots and the port holds the rest itself: no more refusals.
    assert result.busy_answers == 6
    assert result.busy_retries == result.busy_answers
    assert result.errors == 0
    # Two slots, 5 ms each: 400 a second get through, however many wait.
    assert result.iops == pytest.approx(400, rel=0.05)


async def test_the_controller_never_serves_more_than_a_units_slots() -> None:
    # On the test's ordinary loop: the simulated hardware works on real time too.
    units = {(0, 0, 0): SimUnit(ServiceTime(0.001), slots=3)}
    miniport = SimMiniport(units, costs=FREE, queue_depth=16)
    port = PortDriver(miniport, busy_retry_delay=0.0005)
    assert await port.start()
    done: list[Any] = []
    srbs = [bench_port._read_srb(0, i, i, 4096, [memoryview(bytearray(4096))], done.append)
            for i in range(10)]
    for srb in srbs:
        port.submit(srb)
    assert await port.drain(timeout=5.0)
    await port.stop()
    assert len(done) == 10
    assert all(s.srb_status.name == "SUCCESS" for s in done)
    assert units[(0, 0, 0)].peak_in_service == 3
    assert miniport.controller.busy_answers > 0


async def test_abort_and_lun_reset_end_requests_in_service() -> None:
    units = {(0, 0, lun): SimUnit(ServiceTime(10.0)) for lun in range(2)}
    miniport = SimMiniport(units, costs=FREE)
    port = PortDriver(miniport)
    assert await port.start()
    done: list[Any] = []
    buf = [memoryview(bytearray(512))]
    first, second, other = (bench_port._read_srb(lun, 0, tag, 512, buf, done.append)
                            for lun, tag in ((0, 1), (0, 2), (1, 3)))
    for srb in (first, second, other):
        port.submit(srb)
    assert await port.abort(first)
    assert await port.reset_logical_unit(0, 0, 0)
    assert [s.queue_tag for s in done] == [1, 2]
    assert {s.srb_status.name for s in done} == {"ABORTED"}
    assert miniport.controller.in_service == 1  # LUN 1's request is untouched
    await port.stop()


# -------------------------------------------------------------------------- the two models


@needs_scsiport
def test_scsiport_caps_the_adapter_at_254_outstanding() -> None:
    workload = uniform(2, 200, costs=FREE)
    storport = run(workload, "storport")
    scsiport = run(workload, "scsiport")
    assert storport.iops == pytest.approx(400 / 0.005, rel=1e-9)
    assert storport.peak_outstanding == 400
    assert scsiport.peak_outstanding <= 254
    assert scsiport.iops == pytest.approx(254 / 0.005, rel=0.01)
    assert scsiport.errors == 0
    # The simulated miniport learnt the model from the port and took the one adapter lock.
    assert set(scsiport.lock_utilisation) == {"adapter"}


@needs_scsiport
def test_scsiport_hands_the_sg_list_over_one_element_per_call() -> None:
    # 64 KiB in one buffer: Storport hands the whole list over with the request; under SCSIport
    # the miniport asks for it a page at a time, 16 calls of 1 us under the adapter lock.
    costs = CpuCosts(build_s=0.0, start_s=0.0, sg_element_s=1e-6, interrupt_s=0.0)
    workload = uniform(1, 1, costs=costs, io_bytes=65536, warmup_s=0.0, duration_s=0.1)
    assert run(workload, "storport").total.p50_s == pytest.approx(0.005, abs=1e-12)
    assert run(workload, "scsiport").total.p50_s == pytest.approx(0.005 + 16e-6, abs=1e-12)


@needs_scsiport
def test_acceptance_at_32_luns_storport_is_at_least_ten_times_scsiport() -> None:
    # The figure, with the default modeled CPU costs, on a short window.
    workload = uniform(32, 255, warmup_s=0.01, duration_s=0.01)
    storport = run(workload, "storport")
    scsiport = run(workload, "scsiport")
    assert storport.iops >= 10 * scsiport.iops, (storport.iops, scsiport.iops)
    assert storport.iops == pytest.approx(32 * 255 / 0.005, rel=0.01)
    assert scsiport.iops == pytest.approx(254 / 0.005, rel=0.02)


@needs_scsiport
def test_scsiport_latency_is_measured_after_the_start_up_burst_has_turned_over() -> None:
    # 4 x 255 requests through a 254-wide adapter queue: one turn takes 20 ms, four times the
    # 2 ms warm-up asked for. Measured from the start, latencies would be the burst's (5, 10, 15
    # and 20 ms); after the turn-over every request waits its full turn: 4 rounds of 5 ms, or 5
    # for the few the rounds leave over, 1020 / 50800 s on average (Little's law).
    workload = uniform(4, 255, costs=FREE, warmup_s=0.002, duration_s=0.1)
    result = run(workload, "scsiport")
    assert result.warmup_s >= 0.020
    assert result.total.mean_s == pytest.approx(4 * 255 / (254 / 0.005), rel=0.01)
    assert result.total.p50_s == pytest.approx(0.020, abs=1e-9)
    assert result.total.max_s == pytest.approx(0.025, abs=1e-9)


@needs_scsiport
def test_noisy_neighbour_hurts_fast_luns_only_under_scsiport() -> None:
    # Jittered service times, as by default: with exact ones a FIFO locks into convoys that
    # depend on the start-up order.
    spec = NoisySpec(fast_luns=3, fast_depth=32, fast_service=ServiceTime(0.005, jitter=0.2),
                     slow_service=ServiceTime(0.050, jitter=0.2), warmup_s=0.2, duration_s=0.2)
    result = bench_port.noisy_neighbour(spec, ["storport", "scsiport"], base=Workload(()))
    storport_p99 = result.fast_p99("storport")
    scsiport_p99 = result.fast_p99("scsiport")
    assert storport_p99 == pytest.approx(result.fast_p99("storport", neighbour=False), rel=0.01)
    assert scsiport_p99 > 2 * storport_p99
    # Without the neighbour, 96 requests fit under SCSIport's 254: the slow LUN is the cause.
    assert result.fast_p99("scsiport", neighbour=False) < 1.1 * storport_p99


def test_noisy_neighbour_storport_keeps_fast_luns_at_their_service_time() -> None:
    spec = NoisySpec(fast_luns=3, fast_depth=32, warmup_s=0.2, duration_s=0.3)
    result = bench_port.noisy_neighbour(spec, ["storport"], base=Workload((), costs=FREE))
    run_with = result.with_neighbour["storport"]
    assert run_with.groups["fast"].p99_s == pytest.approx(0.005, abs=1e-12)
    assert run_with.groups["fast"].iops == pytest.approx(3 * 32 / 0.005, rel=1e-9)
    assert run_with.groups["slow"].iops == pytest.approx(255 / 0.050, rel=1e-9)


def busy_neighbour(**kwargs: Any) -> Workload:
    # A slow unit with 2 slots and 32 requests on it (it answers BUSY beyond 2) beside one
    # fast LUN; a round of the slow LUN's requests takes 0.8 s, longer than the run waits.
    spec = NoisySpec(fast_luns=1, fast_depth=4, slow_depth=32, slow_slots=2,
                     warmup_s=0.1, duration_s=0.1)
    return replace(spec.workload(Workload((), costs=FREE)), turnover_limit_s=0.2, **kwargs)


def test_requests_waiting_through_the_whole_window_are_reported_not_hidden() -> None:
    result = run(busy_neighbour(), "storport")
    # Not every request completed once by warm-up + 0.2 s: measured anyway, from 0.3 s.
    assert result.warmup_s == pytest.approx(0.3)
    slow, fast = result.groups["slow"], result.groups["fast"]
    # The port holds the slow unit's excess (depth lowered to its 2 slots): 40 a second. Of
    # its 32 requests, all but the 4 completed in the 0.1 s window and the 2 completed just as
    # it opened waited through the whole of it.
    assert slow.iops == pytest.approx(40)
    assert slow.starved == 26
    assert slow.oldest_waiting_s > 0.1
    assert fast.starved == 0
    assert fast.p99_s == pytest.approx(0.005, abs=1e-9)


@needs_scsiport
def test_a_busy_device_is_retried_endlessly_without_storports_controls() -> None:
    storport = run(busy_neighbour(), "storport")
    scsiport = run(busy_neighbour(), "scsiport")
    # Storport: one burst of refusals, then the miniport's depth and busy controls hold the
    # excess in the port. SCSIport has neither: the refused requests come back every retry.
    assert storport.busy_retries == 30
    assert scsiport.busy_retries > 100 * storport.busy_retries
    assert scsiport.errors == storport.errors == 0


# ------------------------------------------------------------------------------ statistics


def test_percentile_is_nearest_rank() -> None:
    ordered = [float(i) for i in range(1, 101)]
    assert percentile(ordered, 50) == 50.0
    assert percentile(ordered, 99) == 99.0
    assert percentile(ordered, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    stats = LatencyStats.of([3.0, 1.0, 2.0, 10.0], window_s=2.0)
    assert (stats.completions, stats.iops, stats.p50_s, stats.max_s) == (4, 2.0, 2.0, 10.0)
    assert LatencyStats.of([], 1.0).completions == 0


# -------------------------------------------------------------------------------------- CLI


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="emuhba")
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "port", *argv])


def test_cli_runs_the_sweep_and_writes_json(tmp_path: Path) -> None:
    out = io.StringIO()
    report = tmp_path / "bench.json"
    args = parse("--luns", "1,2", "--depth", "4", "--no-cpu-cost", "--warmup", "0", "--jitter", "0",
                 "--duration", "0.05", "--scenario", "sweep", "--models", "storport",
                 "--json", str(report), "--quiet")
    assert args.bench_main is run_bench_port
    assert run_bench_port(args, out=out) == 0
    text = out.getvalue()
    assert "Storport IOPS" in text and "Wall-clock time" in text
    assert "    1 |            800" in text and "    2 |          1,600" in text
    doc = json.loads(report.read_text())
    assert doc["clock"] == "virtual"
    assert [p["luns"] for p in doc["sweep"]] == [1, 2]
    assert [p["storport"]["iops"] for p in doc["sweep"]] == [800.0, 1600.0]
    assert doc["parameters"]["service_s"] == 0.005
    assert doc["parameters"]["jitter"] == 0.0


def test_cli_noisy_scenario_prints_its_table() -> None:
    out = io.StringIO()
    args = parse("--scenario", "noisy", "--models", "storport", "--fast-luns", "2", "--jitter", "0",
                 "--fast-depth", "4", "--slow-depth", "16", "--noisy-warmup", "0.1",
                 "--noisy-duration", "0.2", "--quiet")
    assert run_bench_port(args, out=out) == 0
    text = out.getvalue()
    assert "Noisy neighbour: LUN 0 slow (50 ms service, depth 16) beside 2 fast LUNs" in text
    assert "storport  |       1,600    5.003    5.003 " in text


def test_cli_rejects_bad_arguments() -> None:
    for argv in (["--luns", "0"], ["--luns", "a,b"], ["--models", "ataport"],
                 ["--io-size", "1000"], ["--depth", "-1"]):
        with pytest.raises(SystemExit):
            parse(*argv)
    assert parse("--io-size", "64K").io_size == 65536


def test_cli_plot_needs_matplotlib_or_draws(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "bench.png"
    args = parse("--luns", "1,2", "--depth", "2", "--no-cpu-cost", "--warmup", "0",
                 "--duration", "0.02", "--models", "storport", "--noisy-warmup", "0.05",
                 "--noisy-duration", "0.05", "--slow-depth", "4", "--fast-luns", "1",
                 "--plot", str(png), "--quiet")
    status = run_bench_port(args, out=io.StringIO())
    if importlib.util.find_spec("matplotlib") is None:
        assert status == 2
        assert "pip install 'emuhba[plot]'" in capsys.readouterr().err
        assert not png.exists()
    else:
        assert status == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_models_are_skipped_with_a_message(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_port, "available_models", lambda: ("storport",))
    args = parse("--luns", "1", "--depth", "1", "--no-cpu-cost", "--warmup", "0",
                 "--duration", "0.01", "--scenario", "sweep", "--quiet")
    assert run_bench_port(args, out=io.StringIO()) == 0
    assert "no 'scsiport' model in this build" in capsys.readouterr().err


def test_simulations_refuse_to_run_inside_a_running_loop() -> None:
    async def inside() -> None:
        run(uniform(1, 1), "storport")

    with pytest.raises(RuntimeError, match="without a running event loop"):
        simclock.run(inside())
