"""The parsing, probing and formatting in emuhba.bench_target, on captured tool output."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import load_bench

bench = load_bench()

PERF_OK = (
    "iscsi-perf version 0.1 - (c) 2014-2015 by Peter Lieven <pl@kamp.de>\n\n"
    "connected to iscsi://127.0.0.1:3260/iqn.x:t/0\n"
    "capacity is 131072 blocks or 67108864 byte (64 MB)\n"
    "performing RANDOM READ with 32 parallel requests\n"
    "FIXED transfer size of 8 blocks (4096 byte)\n"
    "will run for 3 seconds.\n\n"
    "\r00:00:02 - lba 90495, iops current 22530 (88 MB/s), iops average 22530 (88 MB/s), "
    "in_flight 32, busy 0        \r00:00:01 - lba 128101, iops current 21406 (83 MB/s), "
    "iops average 21968 (85 MB/s), in_flight 32, busy 0        "
    "\riops average 22049 (86 MB/s)          \n\nfinished.\n"
)

RC16 = (
    "RETURNED LOGICAL BLOCK ADDRESS:131071\n"
    "LOGICAL BLOCK LENGTH IN BYTES:512\n"
    "P_TYPE:0 PROT_EN:0\n"
    "LBPME:0 LBPRZ:0\n"
    "Total size:67108864\n"
)


def test_parse_iscsi_perf_takes_the_final_average() -> None:
    assert bench.parse_iscsi_perf(PERF_OK) == 22049


@pytest.mark.parametrize(
    "output",
    [
        PERF_OK.replace("finished.", ""),  # interrupted before the end
        PERF_OK + "Read16 failed with sense key:5 ascq:2100\n",
        "Login Failed. connection refused\n",
    ],
)
def test_parse_iscsi_perf_rejects_bad_runs(output: str) -> None:
    with pytest.raises(RuntimeError):
        bench.parse_iscsi_perf(output)


def test_parse_readcapacity16() -> None:
    capacity = bench.parse_readcapacity16(RC16)
    assert (capacity.block_length, capacity.blocks, capacity.size) == (512, 131072, 64 << 20)
    with pytest.raises(ValueError):
        bench.parse_readcapacity16(RC16.replace("67108864", "67108865"))
    with pytest.raises(ValueError):
        bench.parse_readcapacity16("Total size:512\n")


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64M", 64 << 20), ("1G", 1 << 30), ("2GiB", 2 << 30), ("8k", 8192)],
)
def test_parse_size(text: str, size: int) -> None:
    assert bench.parse_size(text) == size


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        bench.parse_size("lots")


def test_iscsi_perf_command_counts_blocks() -> None:
    qd32 = bench.Workload("w", 256 * 1024, 32, False)
    cmd = bench.iscsi_perf_command("iscsi://h:1/iqn/0", qd32, 7, 4096, "iqn.init")
    assert cmd == [
        "iscsi-perf",
        "-i",
        "iqn.init",
        "-t",
        "7",
        "-m",
        "32",
        "-b",
        "64",
        "iscsi://h:1/iqn/0",
    ]
    random_4k = bench.Workload("r", 4096, 1, True)
    assert "-r" in bench.iscsi_perf_command("u", random_4k, 1, 512)
    with pytest.raises(ValueError):
        bench.iscsi_perf_command("u", bench.Workload("odd", 1000, 1, True), 1, 512)


def test_table_gives_medians_ranges_costs_and_the_ratio() -> None:
    case = bench.Case("4k-randread-qd32", 4096, 32)
    result = bench.CaseResult(case)
    result.samples["emuhba"] = [bench.Sample(20000, 10.0, 2.0, 50 * 1024, 30 * 1024),
                                bench.Sample(22000, 10.0, 2.0, 60 * 1024, 20 * 1024),
                                bench.Sample(18000, 10.0, 2.0, 40 * 1024, 10 * 1024)]
    result.samples["tgtd"] = [bench.Sample(10000, 10.0, 1.0, 5 * 1024)]
    missing = bench.CaseResult(bench.Case("256k-seqread-qd32", 256 * 1024, 32, random=False))
    summary = result.summary("emuhba")
    assert summary is not None
    assert (summary["iops"], summary["iops_min"], summary["iops_max"]) == (20000, 18000, 22000)
    # 6 CPU seconds over 600,000 I/Os: 0.01 s per 1,000.
    assert summary["cpu_s_per_1k_io"] == pytest.approx(0.01)
    assert summary["peak_rss_mib"] == 60 and result.ratio() == 2.0
    # The RSS beyond the RAM LUN is its own peak, not the peak RSS's sample less its LUN.
    assert summary["peak_rss_beyond_luns_mib"] == 30
    lines = bench.format_results([result, missing]).splitlines()
    assert lines[0].split()[0] == "case" and lines[0].split()[-1] == "emuhba/tgtd"
    assert lines[2].split() == ["4k-randread-qd32", "20.0k", "(18.0k-22.0k)", "78", "0.010", "60",
                                "30", "10.0k", "(10.0k-10.0k)", "39", "0.010", "5", "0", "2.00"]
    assert lines[3].split() == ["256k-seqread-qd32"] + ["-"] * 11


def test_cases_and_the_write_driver() -> None:
    names = [c.name for c in bench.CASES]
    assert len(names) == len(set(names))
    assert {c.tool for c in bench.CASES} == {"iscsi-perf", "qemu-img"}
    write = next(c for c in bench.CASES if c.name == "4k-randwrite-qd32")
    cmd = bench.qemu_img_bench_command("iscsi://h:1/iqn/0", write, 5000)
    assert cmd[:3] == ["qemu-img", "bench", "-f"] and "-w" in cmd
    assert cmd[cmd.index("-c") + 1] == "5000" and cmd[cmd.index("-d") + 1] == "32"
    step = int(cmd[cmd.index("-S") + 1])
    assert step % 4096 == 0 and step // 4096 % 2 == 1 and step > 4096  # strided, block aligned


def test_probe_measures_this_process() -> None:
    with bench.Probe(os.getpid(), interval=0.01) as probe:
        end = time.process_time() + 0.2
        while time.process_time() < end:
            pass
    assert 0.1 < probe.cpu < 5 and probe.peak > 1000


def test_probe_peak_beyond_the_luns_never_exceeds_the_peak() -> None:
    """The process grows while it is probed, up to and past the probe's end: every RSS
    reading counts for the peak, so the figure less the LUNs cannot pass it."""
    import threading

    grown: list[bytearray] = []
    stop = threading.Event()

    def grow() -> None:
        while not stop.is_set() and len(grown) < 400:
            grown.append(bytearray(b"\x01" * (256 << 10)))  # written, so resident

    for _ in range(3):
        grower = threading.Thread(target=grow)
        with bench.Probe(os.getpid(), interval=0.002) as probe:
            grower.start()
            time.sleep(0.05)
        stop.set()
        grower.join()
        stop.clear()
        grown.clear()
        assert 0 < probe.peak_beyond_luns <= probe.peak


def test_portal_urls() -> None:
    portal = bench.Portal("127.0.0.1", 3260, "iqn.2026-11.io.emuhba:target0", 1)
    assert portal.url() == "iscsi://127.0.0.1:3260/iqn.2026-11.io.emuhba:target0/1"
    assert portal.url(0, "header_digest=crc32c").endswith("/0?header_digest=crc32c")


def test_free_port_and_wait_for_portal() -> None:
    port = bench.free_tcp_port()
    with pytest.raises(TimeoutError):
        bench.wait_for_portal("127.0.0.1", port, None, 0.2)


def test_lun_resident_memory_is_found_in_smaps() -> None:
    """The RSS-beyond-LUNs figure subtracts exactly the RAM LUN's mapping: here a 64 MiB
    anonymous mapping with 8 MiB written is found with 8 MiB resident."""
    import mmap
    import os

    size = 64 << 20
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area[: 8 << 20] = b"\x01" * (8 << 20)
        resident = bench.lun_resident_kib(os.getpid(), size)
        assert 8 * 1024 <= resident < 9 * 1024
        assert bench.lun_resident_kib(os.getpid(), size + 4096) == 0
    finally:
        area.close()


def test_bench_path_drives_every_workload_through_the_whole_stack(
        capsys: pytest.CaptureFixture[str]) -> None:
    """bench/bench_path.py (the Python cost per command, no sockets) still runs: each workload
    completes its commands through the real installation and prints a figure."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_path.py"
    spec = importlib.util.spec_from_file_location("bench_path", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_path"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.main(["--commands", "320", "--repeat", "1", "--size", str(64 << 20)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: float(line.split()[1]) for line in lines[1:]}
    assert set(rows) == set(module.WORKLOADS) and all(us > 0 for us in rows.values())
