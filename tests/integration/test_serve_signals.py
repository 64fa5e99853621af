"""`emuhba serve` and SIGTERM/SIGINT at any point of its start: always a clean stop, exit 0.

Scripts take the server to be ready once its portal accepts connections, and may stop it at
once; a signal that comes while the adapters start must not kill it half-way either.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _start(port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "emuhba", "serve", "--portal", f"127.0.0.1:{port}",
         "--ram-lun", "64M", "--no-control", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def _events(output: str) -> list[str]:
    events = []
    for line in output.splitlines():
        try:
            events.append(json.loads(line)["event"])
        except (ValueError, KeyError, TypeError):
            continue
    return events


def _stop(proc: subprocess.Popen[str], sig: signal.Signals, seen: str) -> None:
    proc.send_signal(sig)
    try:
        rest, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"emuhba serve did not stop within 30 s of {sig.name}") from None
    output = seen + rest
    assert proc.returncode == 0, f"exit {proc.returncode} after {sig.name}:\n{output[-3000:]}"
    assert "stopped" in _events(output), output[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_the_adapters_start_stops_cleanly(free_tcp_port: int,
                                                       sig: signal.Signals) -> None:
    proc = _start(free_tcp_port)
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        seen.append(line)
        if "hba_started" in _events(line):  # the adapters are up; the portal is not yet
            break
        if time.monotonic() > deadline:
            break
    else:
        raise AssertionError("emuhba serve exited before its adapter started:\n" + "".join(seen))
    _stop(proc, sig, "".join(seen))


def test_sigterm_the_moment_the_portal_accepts_stops_cleanly(free_tcp_port: int) -> None:
    proc = _start(free_tcp_port)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", free_tcp_port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                out, _ = proc.communicate()
                raise AssertionError(f"emuhba serve never accepted:\n{out[-3000:]}") from None
            time.sleep(0.001)
    _stop(proc, signal.SIGTERM, "")
