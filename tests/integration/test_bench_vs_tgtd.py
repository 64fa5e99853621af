"""bench/bench_vs_tgtd.py end to end, briefly: both targets start, every workload runs on both,
and everything the script started is gone afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tools

pytestmark = pytest.mark.integration


def test_bench_runs_every_workload_on_both_targets(tmp_path: Path, target_flavour: str) -> None:
    if target_flavour != "emuhba":
        pytest.skip("the benchmark compares emuhba with tgtd")
    if os.geteuid() != 0:
        pytest.skip("bench_vs_tgtd.py needs root for tgtd")
    require_tools("iscsi-perf", "iscsi-readcapacity16", "tgtd", "tgtadm")
    out_json = tmp_path / "result.json"
    shm_before = set(Path("/dev/shm").iterdir()) if Path("/dev/shm").is_dir() else set()
    command = [sys.executable, str(REPO / "bench" / "bench_vs_tgtd.py"), "--seconds", "2"]
    command += ["--size", "64M", "--json", str(out_json), "--log-dir", str(tmp_path / "logs")]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out_json.read_text())
    names = [row["workload"] for row in result["rows"]]
    assert names == ["4k-randread-qd1", "4k-randread-qd32", "256k-seqread-qd32"]
    for row in result["rows"]:
        for target in ("emuhba", "tgtd"):
            assert row[target]["iops"] > 0, row
        assert row["ratio"] > 0
    assert "emuhba/tgtd" in done.stdout  # the table was printed
    if shm_before:
        assert set(Path("/dev/shm").iterdir()) <= shm_before, "backing file left in /dev/shm"
