"""The soak run, short: bench/soak.py (libiscsi's asynchronous API, every read checked against
what was last written) with 16 sessions at queue depth 32 for 20 seconds against a RAM LUN,
while the target's RSS is sampled. The long run (64 sessions, 10 minutes) is documented in
the README; its figures are in the issue notes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, load_bench

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("libiscsi_tools")]

IQN = "iqn.2026-11.io.emuhba:soak"


def test_short_soak_has_no_errors_and_flat_memory(tmp_path: Path) -> None:
    bench = load_bench()
    port = bench.free_tcp_port("127.0.0.1")
    log = tmp_path / "emuhba.log"
    server = bench.EmuhbaServer([sys.executable, "-m", "emuhba", "serve", "--portal",
                                 f"127.0.0.1:{port}", "--iqn", IQN, "--ram-lun", "128M"],
                                "127.0.0.1", port, log, ready_timeout=60.0)
    server.start()
    try:
        done = subprocess.run(
            [sys.executable, str(REPO / "bench" / "soak.py"), "--portal", f"127.0.0.1:{port}",
             "--iqn", IQN, "--sessions", "16", "--queue-depth", "32", "--seconds", "20",
             "--slots", "256", "--pid", str(server.proc.pid), "--sample-seconds", "2"],
            capture_output=True, text=True, timeout=180, check=False)
    finally:
        assert server.stop(timeout=30.0) == 0, log.read_text()[-2000:]
    assert done.stdout.strip(), done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(summary))
    assert summary["errors"] == 0 and summary["mismatches"] == 0, summary["first_errors"]
    assert summary["commands"] > 10_000 and summary["reads"] and summary["writes"]
    rss = [kib for _, kib in summary["rss_kib"] if kib > 0]
    assert len(rss) >= 5
    # Flat: after the first samples (sessions, buffers and caches warming up) it does not
    # keep growing. 16 MiB of slack covers allocator noise, not a leak per command.
    settled = rss[2:]
    assert max(settled) - settled[0] < 16 * 1024, summary["rss_kib"]
    assert done.returncode == 0
