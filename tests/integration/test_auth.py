"""Who may connect, checked with libiscsi's own tools as the initiator: CHAP (one-way and
mutual) for normal and discovery sessions, per target and per ACL entry, and ACLs that hide a
target from discovery and refuse its logins. libiscsi 1.19 speaks CHAP with MD5 only; the
other algorithms are covered in tests/unit/test_chap.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import load_bench
from tests.integration import libiscsi_client

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("libiscsi_tools")]

ALICE = "iqn.2026-11.io.emuhba:alice"
BOB = "iqn.2026-11.io.emuhba:bob"
EVE = "iqn.2026-11.io.emuhba:eve"
CAROL = "iqn.2026-11.io.emuhba:carol"
OPEN = "iqn.2026-11.io.emuhba:open"
CHAP = "iqn.2026-11.io.emuhba:chap"
MUTUAL = "iqn.2026-11.io.emuhba:mutual"
ACL = "iqn.2026-11.io.emuhba:acl"

CONFIG = """
[server]
control = false
[iscsi]
discovery_auth = {{ user = "disco", secret = "discovery-secret-1" }}
[[portals]]
listen = "127.0.0.1:{port}"
[[stores]]
name = "s0"
kind = "ram"
size = "4M"
[[stores]]
name = "s1"
kind = "ram"
size = "4M"
[[stores]]
name = "s2"
kind = "ram"
size = "4M"
[[stores]]
name = "s3"
kind = "ram"
size = "4M"
[[stores]]
name = "s4"
kind = "ram"
size = "4M"
[[controllers]]
name = "disk0"
kind = "disk"
[[adapters]]
name = "hba0"
controller = "disk0"
[[targets]]
name = "{open}"
adapter = "hba0"
luns = ["s0"]
[[targets]]
name = "{chap}"
adapter = "hba0"
luns = ["s1"]
auth = {{ user = "alice", secret_file = "alice.secret" }}
[[targets]]
name = "{mutual}"
adapter = "hba0"
luns = ["s2"]
auth = {{ user = "alice", secret = "alice-secret-0001", mutual_user = "array", mutual_secret = "array-secret-0001" }}
[[targets]]
name = "{acl}"
adapter = "hba0"
luns = ["s3", "s4"]
acl = ["{alice}", {{ initiator = "{bob}", auth = {{ user = "bob", secret = "bob-secret-00001" }} }},
       {{ initiator = "{carol}", luns = [1], read_only = true }}]
"""


@dataclass
class Server:
    port: int
    proc: Any
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    bench = load_bench()
    directory = tmp_path_factory.mktemp("auth")
    secret = directory / "alice.secret"
    secret.write_text("alice-file-secret\n")
    secret.chmod(0o600)
    port = bench.free_tcp_port("127.0.0.1")
    config = directory / "emuhba.toml"
    config.write_text(CONFIG.format(port=port, open=OPEN, chap=CHAP, mutual=MUTUAL, acl=ACL,
                                    alice=ALICE, bob=BOB, carol=CAROL))
    log = directory / "emuhba.log"
    proc = bench.EmuhbaServer([sys.executable, "-m", "emuhba", "serve", "--config", str(config)],
                              "127.0.0.1", port, log, ready_timeout=60.0)
    proc.start()
    try:
        yield Server(port, proc, log)
    finally:
        assert proc.stop(timeout=30.0) == 0, log.read_text()[-2000:]


def inq(server: Server, target: str, initiator: str, credentials: str = "",
        query: str = "") -> subprocess.CompletedProcess[str]:
    url = f"iscsi://{credentials}127.0.0.1:{server.port}/{target}/0{query}"
    return subprocess.run(["iscsi-inq", "-i", initiator, url], capture_output=True, text=True,
                          timeout=30, check=False)


def discover(server: Server, initiator: str, credentials: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iscsi-ls", "-i", initiator,
                           f"iscsi://{credentials}127.0.0.1:{server.port}"],
                          capture_output=True, text=True, timeout=30, check=False)


def logged_in(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode == 0 and "Peripheral Device Type" in done.stdout


def test_open_target_needs_nothing(server: Server) -> None:
    assert logged_in(inq(server, OPEN, ALICE))


def test_one_way_chap(server: Server) -> None:
    assert logged_in(inq(server, CHAP, ALICE, "alice%alice-file-secret@"))
    assert not logged_in(inq(server, CHAP, ALICE, "alice%alice-wrong-secret@"))
    assert not logged_in(inq(server, CHAP, ALICE, "mallory%alice-file-secret@"))
    assert not logged_in(inq(server, CHAP, ALICE))  # AuthMethod=None is not enough


def test_mutual_chap(server: Server) -> None:
    both = "?target_user=array&target_password=array-secret-0001"
    assert logged_in(inq(server, MUTUAL, ALICE, "alice%alice-secret-0001@", both))
    # The initiator checks the target's answer: a target that does not know the secret the
    # initiator expects is refused by the initiator.
    wrong = "?target_user=array&target_password=array-secret-9999"
    assert not logged_in(inq(server, MUTUAL, ALICE, "alice%alice-secret-0001@", wrong))
    # One-way CHAP against a mutual-capable target still works: mutual is the initiator's ask.
    assert logged_in(inq(server, MUTUAL, ALICE, "alice%alice-secret-0001@"))


def test_acl_admits_listed_initiators_with_their_own_credentials(server: Server) -> None:
    assert logged_in(inq(server, ACL, ALICE))
    assert not logged_in(inq(server, ACL, BOB))  # bob's entry asks for CHAP
    assert logged_in(inq(server, ACL, BOB, "bob%bob-secret-00001@"))
    refused = inq(server, ACL, EVE)
    assert not logged_in(refused)


def test_discovery_needs_chap_and_hides_what_the_acl_hides(server: Server) -> None:
    assert discover(server, EVE).returncode != 0
    assert discover(server, EVE, "disco%wrong-secret-000@").returncode != 0
    seen_by_eve = discover(server, EVE, "disco%discovery-secret-1@")
    assert seen_by_eve.returncode == 0, seen_by_eve.stderr
    assert OPEN in seen_by_eve.stdout and CHAP in seen_by_eve.stdout
    assert ACL not in seen_by_eve.stdout
    seen_by_alice = discover(server, ALICE, "disco%discovery-secret-1@")
    assert ACL in seen_by_alice.stdout


def test_no_secret_reaches_the_log(server: Server) -> None:
    text = server.log.read_text()
    for secret in ("alice-file-secret", "alice-secret-0001", "array-secret-0001",
                   "bob-secret-00001", "discovery-secret-1"):
        assert secret not in text
    assert "initiator not authorized" in text or "authorization" in text.lower()


def test_acl_masks_luns_and_maps_read_only(server: Server) -> None:
    portal = f"127.0.0.1:{server.port}"
    with libiscsi_client.Session(portal, ACL, 1, initiator=CAROL) as carol:
        assert carol.report_luns() == [1]
        assert carol.read16(1, 0, 1, 512) == bytes(512)
        with pytest.raises(libiscsi_client.ScsiCheckCondition) as refused:
            carol.write16(1, 0, b"c" * 512, 512)
        assert (refused.value.sense_key, refused.value.ascq) == (0x7, 0x2700)
        inquiry = carol.command(0, bytes((0x12, 0, 0, 0, 96, 0)), data_in=96)
        assert inquiry[0] >> 5 == 0b011  # LUN 0 is not there for carol
        mode = carol.command(1, bytes((0x1A, 0, 0x3F, 0, 255, 0)), data_in=255)
        assert mode[2] & 0x80  # WP: mount it read-only
    with libiscsi_client.Session(portal, ACL, 1, initiator=ALICE) as alice:
        assert alice.report_luns() == [0, 1]
        alice.write16(1, 0, b"a" * 512, 512)
