"""Task management under load, over TCP against a real `emuhba serve`: three sessions keep 32
commands each in flight on LUN 0 of a disk controller with 150 ms of modelled latency while
ABORT TASK, LUN RESET and TARGET WARM RESET arrive. Every task must end exactly once (one SCSI
Response, or aborted with no response after the TMF says so), nothing may leak (the port's
outstanding and held gauges go back to zero), and a libiscsi session on LUN 1 keeps verifying
its data throughout (a LUN reset of LUN 0 must not touch it)."""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from target import pdu as P
from tests.conftest import load_bench
from tests.initiator import Pdu, TestInitiator, read10, write10
from tests.integration.test_hostile import SocketLink
from tests.integration.verifier import DataVerifier

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("libiscsi_tools")]

IQN = "iqn.2026-11.io.emuhba:tmf"
OTHER_IQN = "iqn.2026-11.io.emuhba:tmf-other"
CONFIG = """
[server]
control = false
metrics = "127.0.0.1:{metrics}"
[[portals]]
listen = "127.0.0.1:{port}"
[[stores]]
name = "busy"
kind = "ram"
size = "16M"
[[stores]]
name = "quiet"
kind = "ram"
size = "16M"
[[stores]]
name = "elsewhere"
kind = "ram"
size = "16M"
[[controllers]]
name = "disk0"
kind = "disk"
latency = {{ fixed_ms = 150 }}
[[adapters]]
name = "hba0"
controller = "disk0"
queue_depth = 128
[[targets]]
name = "{iqn}"
adapter = "hba0"
luns = ["busy", "quiet"]
[[targets]]
name = "{other}"
adapter = "hba0"
luns = ["elsewhere"]
"""
BS = 512
TMF_ABORT_TASK, TMF_LUN_RESET, TMF_TARGET_WARM_RESET = 1, 5, 6


@dataclass
class Server:
    port: int
    metrics: int
    proc: Any
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    bench = load_bench()
    directory = tmp_path_factory.mktemp("tmf")
    port, metrics = bench.free_tcp_port("127.0.0.1"), bench.free_tcp_port("127.0.0.1")
    config = directory / "emuhba.toml"
    config.write_text(CONFIG.format(port=port, metrics=metrics, iqn=IQN, other=OTHER_IQN))
    log = directory / "emuhba.log"
    proc = bench.EmuhbaServer([sys.executable, "-m", "emuhba", "serve", "--config", str(config)],
                              "127.0.0.1", port, log, ready_timeout=60.0)
    proc.start()
    try:
        yield Server(port, metrics, proc, log)
    finally:
        assert proc.stop(timeout=30.0) == 0, log.read_text()[-3000:]


def verifier_on(server: Server, iqn: str = IQN, lun: int = 1) -> DataVerifier:
    return DataVerifier(f"127.0.0.1:{server.port}", iqn, lun,
                        initiator="iqn.2026-11.io.emuhba:verifier", block_length=BS)


class LoadedSession:
    """A TCP session with its commands in flight, and what became of each."""

    def __init__(self, server: Server, n: int) -> None:
        link = SocketLink("127.0.0.1", server.port)
        self.ini = TestInitiator(conn=cast(Any, link), name=f"iqn.2026-11.io.emuhba:load{n}",
                                 isid=b"\x80" + os.urandom(5))
        self.ini.login(IQN)
        # A new I_T nexus's first command reports the power-on unit attention. Take it now, so
        # the only one counted later is the reset's (under 150 ms of latency a loaded command
        # could otherwise bring it back before or after the reset, depending on timing).
        for lun in (0, 1):
            _, replies = self.ini.command(bytes(6), lun=lun)  # TEST UNIT READY
            _, replies = self.ini.command(bytes(6), lun=lun)
            assert any(p.opcode == P.Opcode.SCSI_RESPONSE and p.b3 == 0 for p in replies), replies
        link.poll_only()
        self.link = link
        self.responses: Counter[int] = Counter()
        self.tmf: dict[int, int] = {}  # TMF ITT -> response code
        self.sent: list[int] = []
        self.unit_attentions = 0

    def load(self, count: int, lun: int = 0) -> None:
        """``count`` commands, alternately 4-block writes (immediate data) and reads."""
        link, ini = self.link, self.ini
        for i in range(count):
            lba = (len(self.sent) * 8) % 30_000
            if i % 2:
                itt, replies = ini.command(read10(lba, 4), lun=lun, read=4 * BS)
            else:
                itt, replies = ini.command(write10(lba, 4), lun=lun, write=b"\x3c" * (4 * BS))
            self.sent.append(itt)
            self.note(replies)
        del link

    def note(self, pdus: list[Pdu]) -> None:
        for pdu in pdus:
            # A read's status may ride on its last Data-In (S bit) instead of a SCSI Response.
            if pdu.opcode == P.Opcode.DATA_IN and pdu.flags & 0x01:
                self.responses[pdu.itt] += 1
            elif pdu.opcode == P.Opcode.SCSI_RESPONSE:
                self.responses[pdu.itt] += 1
                if pdu.b3 == 2 and len(pdu.data) > 16 and pdu.data[2 + 2] & 0x0F == 6:
                    self.unit_attentions += 1
            elif pdu.opcode == P.Opcode.TASK_MGMT_RESPONSE:
                self.tmf[pdu.itt] = pdu.b2

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.note(self.ini.collect())

    def send_tmf(self, function: int, *, lun: int = 0, rtt: int = 0xFFFFFFFF) -> int:
        replies = self.ini.tmf(function, lun=lun, rtt=rtt)
        self.note(replies)
        return self.ini.itt


def gauges(server: Server) -> dict[str, float]:
    """The port's outstanding and held requests on the loaded unit (target 0, LUN 0); the
    verifiers' units are busy on purpose."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name in ("outstanding", "held"):
        values = [float(value) for labels, value in
                  re.findall(rf"^emuhba_lun_{name}\{{([^}}]*)\}} ([0-9.e+-]+)$", text, re.MULTILINE)
                  if 'target="0"' in labels and 'lun="0"' in labels]
        assert values, f"no emuhba_lun_{name} for 0:0 in the metrics:\n{text[:3000]}"
        out[name] = sum(values)
    return out


def settled(server: Server, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        now = gauges(server)
        if not any(now.values()) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


@pytest.fixture
def verifier(server: Server) -> Iterator[DataVerifier]:
    watcher = verifier_on(server)
    yield watcher
    watcher.stop()
    assert watcher.ops > 0 and not watcher.errors, watcher.errors


def test_abort_task_under_load(server: Server, verifier: DataVerifier) -> None:
    sessions = [LoadedSession(server, n) for n in range(3)]
    for s in reversed(sessions):  # the victim last, so its tasks are the youngest
        s.load(32)
    victim = sessions[0]
    targets = victim.sent[::4]  # 8 of its 32 tasks
    tmf_of = {itt: victim.send_tmf(TMF_ABORT_TASK, rtt=itt) for itt in targets}
    for s in sessions:
        s.pump(2.0)
    outcome = {itt: victim.tmf.get(tmf_itt, -1) for itt, tmf_itt in tmf_of.items()}
    for itt, code in outcome.items():
        # 0: aborted, so no response may follow; 1: it had already ended, with one response.
        assert code in (0, 1), outcome
        assert victim.responses[itt] == (0 if code == 0 else 1), (itt, code)
    assert sum(code == 0 for code in outcome.values()) >= 4  # most were still queued
    for s in sessions:
        ended = [itt for itt in s.sent if itt not in outcome]
        assert all(s.responses[itt] == 1 for itt in ended), (
            "a task ended twice or never", [(hex(i), s.responses[i]) for i in ended if s.responses[i] != 1], s.link.closed)
    assert settled(server) == {"outstanding": 0.0, "held": 0.0}


@pytest.mark.parametrize("function", [TMF_LUN_RESET, TMF_TARGET_WARM_RESET])
def test_resets_under_load(server: Server, function: int) -> None:
    # What must not notice: the next LUN for a LUN reset, the next target for a target reset.
    bystander = verifier_on(server) if function == TMF_LUN_RESET \
        else verifier_on(server, OTHER_IQN, 0)
    try:
        reset_under_load(server, function)
    finally:
        bystander.stop()
    assert bystander.ops > 0 and not bystander.errors, bystander.errors


def reset_under_load(server: Server, function: int) -> None:
    sessions = [LoadedSession(server, n) for n in range(3)]
    for s in sessions:
        s.load(32)
    issuer = sessions[0]
    tmf_itt = issuer.send_tmf(function, lun=0)
    deadline = time.monotonic() + 10
    while tmf_itt not in issuer.tmf and time.monotonic() < deadline:
        issuer.pump(0.1)
    assert issuer.tmf.get(tmf_itt) == 0, issuer.tmf
    for s in sessions:
        s.pump(1.5)
        # Each task ended at most once: the reset's tasks end without a response, the others
        # with one.
        assert all(count <= 1 for count in s.responses.values())
        assert all(s.responses[itt] <= 1 for itt in s.sent)
    assert sum(s.responses[itt] == 0 for s in sessions for itt in s.sent) >= 32
    # The other sessions' next command reports the reset as a unit attention, the one after
    # it works; a warm reset leaves the connections up (only a cold reset closes them).
    for s in sessions[1:]:
        # Its unit attention may already have come back on a queued command that reached
        # the unit after the reset; either way there is exactly one.
        for _ in range(2):
            itt, replies = s.ini.command(bytes(6))  # TEST UNIT READY
            s.note(replies)
            s.pump(0.5)
            assert s.responses[itt] == 1
        assert s.unit_attentions == 1
    assert settled(server) == {"outstanding": 0.0, "held": 0.0}
    for s in sessions:
        s.link.close()
