"""`emuhba bench target` end to end, briefly: both targets start, every case runs on both, the
JSON holds every figure, and everything the benchmark started is gone afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tools

pytestmark = pytest.mark.integration


def test_bench_target_runs_every_case_on_both_targets(tmp_path: Path, target_flavour: str) -> None:
    if target_flavour != "emuhba":
        pytest.skip("the benchmark compares emuhba with tgtd")
    if os.geteuid() != 0:
        pytest.skip("emuhba bench target needs root for tgtd")
    require_tools("iscsi-perf", "iscsi-readcapacity16", "tgtd", "tgtadm", "qemu-img")
    out_json = tmp_path / "result.json"
    shm_before = set(Path("/dev/shm").iterdir()) if Path("/dev/shm").is_dir() else set()
    command = [sys.executable, "-m", "emuhba", "bench", "target", "--seconds", "1",
               "--rounds", "1", "--size", "64M", "--json", str(out_json),
               "--log-dir", str(tmp_path / "logs")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out_json.read_text())
    names = [entry["case"]["name"] for entry in result["cases"]]
    assert names == [
        "4k-randread-qd1", "4k-randread-qd32", "4k-randread-qd128", "64k-seqread-qd32",
        "256k-seqread-qd32", "4k-randwrite-qd32", "256k-seqwrite-qd32",
        "4k-randread-qd32-crc32c", "4k-randread-16x-qd32", "4k-randread-qd32-file",
    ]
    for entry in result["cases"]:
        for target in ("emuhba", "tgtd"):
            figures = entry[target]
            assert figures["iops"] > 0 and figures["cpu_s_per_1k_io"] > 0, entry
            assert figures["peak_rss_mib"] > 0, entry
            assert 0 < figures["peak_rss_beyond_luns_mib"] <= figures["peak_rss_mib"], entry
        assert entry["ratio"] > 0
    assert "emuhba/tgtd" in done.stdout  # the table was printed
    # The digest case ran against targets that accept nothing but CRC32C header digests (a
    # login without them fails, and iscsi-perf with it), so its figures are digest figures.
    assert (tmp_path / "logs" / "emuhba-crc32c.log").exists()
    assert (tmp_path / "logs" / "tgtd-crc32c.log").exists()
    if shm_before:
        assert set(Path("/dev/shm").iterdir()) <= shm_before, "backing file left in /dev/shm"
