"""The emulated controllers end to end: `emuhba serve --config` with a RAID controller and an FC
controller, driven by libiscsi (ctypes and the command-line tools) and `emuhba ctl`.

RAID: data written through iSCSI survives a member failure (degraded reads), a replacement and
its rebuild, and a second failure of another member afterwards (which proves the rebuilt data);
the file-backed array reassembles after a restart; a member that belongs to another array stops
the server with an error naming it.

FC: one remote port with 300 LUNs (flat addressing past 255), LUNs added live raise REPORTED
LUNS DATA HAS CHANGED, a link down during a read load costs latency and no errors.

Faults: a medium error injected with `emuhba ctl fault` reaches the initiator as MEDIUM ERROR /
UNRECOVERED READ ERROR; injected BUSY never does.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import INITIATOR, load_bench, record_summary
from tests.integration import libiscsi_client
from tests.integration.libiscsi_client import ScsiCheckCondition

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("libiscsi_tools",
                                                                "libiscsi_library")]

BS = 512
RAID_IQN = "iqn.2026-11.io.emuhba:raid.test"
FC_IQN = "iqn.2026-11.io.emuhba:fc.test"
FC_WIDE_WWPN = "50:06:01:60:3b:a0:11:02"

RAID_CONFIG = """
[server]
control_socket = "{dir}/control/emuhba.sock"
[[portals]]
listen = "127.0.0.1:{port}"
{members}
[[stores]]
name = "ma"
kind = "ram"
size = "8M"
[[stores]]
name = "mb"
kind = "ram"
size = "8M"
[[controllers]]
name = "raid0"
kind = "raid"
slots = 1000
  [[controllers.arrays]]
  name = "r5"
  level = 5
  strip_size = "16K"
  members = ["m0", "m1", "m2", "m3"]
  write_cache = true
  [[controllers.arrays]]
  name = "r1"
  level = 1
  members = ["ma", "mb"]
  write_cache = false
[[adapters]]
name = "hba0"
controller = "raid0"
[[targets]]
name = "{iqn}"
adapter = "hba0"
luns = [{{ lun = 0, array = "r5" }}, {{ lun = 1, array = "r1" }}]
"""

FC_CONFIG = """
[server]
control_socket = "{dir}/control/emuhba.sock"
[[portals]]
listen = "127.0.0.1:{port}"
[[stores]]
name = "data"
kind = "ram"
size = "16M"
[[controllers]]
name = "fc0"
kind = "fc"
link_down_timeout_s = 20
  [[controllers.remote_ports]]
  wwpn = "50:06:01:60:3b:a0:11:01"
  target_id = 0
  luns = ["data"]
  [[controllers.remote_ports]]
  wwpn = "{wide}"
  target_id = 1
  ram_luns = {{ count = 300, size = "1M" }}
[[adapters]]
name = "hba0"
controller = "fc0"
[[targets]]
name = "{iqn}"
adapter = "hba0"
remote_port = "50:06:01:60:3b:a0:11:01"
"""


def member_stores(directory: Path, size: str = "16M") -> str:
    return "".join(f'[[stores]]\nname = "m{i}"\nkind = "file"\npath = "{directory}/m{i}.img"\n'
                   f'size = "{size}"\n' for i in range(4))


@dataclass
class Served:
    port: int
    directory: Path
    server: Any
    log: Path

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ctl(self, *args: str, check: bool = True) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "emuhba", "ctl", "--socket",
             str(self.directory / "control" / "emuhba.sock"), "--json", *args],
            capture_output=True, text=True, timeout=30, check=False)
        if check:
            assert done.returncode == 0, f"ctl {args}: {done.stdout}{done.stderr}"
        return json.loads(done.stdout) if done.stdout.strip() else None


@contextmanager
def serve(config_text: str, directory: Path, port: int) -> Iterator[Served]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "control").mkdir(mode=0o700, exist_ok=True)
    config = directory / "emuhba.toml"
    config.write_text(config_text)
    log = directory / f"emuhba-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "emuhba", "serve", "--config", str(config)]
    server = load_bench().EmuhbaServer(command, "127.0.0.1", port, log, ready_timeout=60.0)
    server.start()
    try:
        yield Served(port, directory, server, log)
    finally:
        code = server.stop(timeout=20.0)
        assert code == 0, f"emuhba exited {code}\n{log.read_text()[-3000:]}"


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_all(session: libiscsi_client.Session, lun: int, blocks: int, seed: int,
              chunk: int = 96) -> dict[int, bytes]:
    """Fill ``blocks`` blocks in odd-sized chunks (they straddle strips and stripes)."""
    written: dict[int, bytes] = {}
    for lba in range(0, blocks - chunk, chunk):
        data = pattern(seed * 100_000 + lba, chunk * BS)
        session.write16(lun, lba, data, BS)
        written[lba] = data
    return written


def check_all(session: libiscsi_client.Session, lun: int, written: dict[int, bytes],
              what: str) -> None:
    bad = [lba for lba, data in written.items()
           if session.read16(lun, lba, len(data) // BS, BS) != data]
    assert not bad, f"{what}: {len(bad)} of {len(written)} chunks differ, first LBAs {bad[:4]}"


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# ------------------------------------------------------------------------------------ RAID


def test_raid5_degraded_rebuild_and_second_failure(tmp_path: Path, free_tcp_port: int,
                                                   request: pytest.FixtureRequest) -> None:
    text = RAID_CONFIG.format(dir=tmp_path, port=free_tcp_port, iqn=RAID_IQN,
                              members=member_stores(tmp_path))
    with serve(text, tmp_path, free_tcp_port) as served, \
            libiscsi_client.Session(served.portal, RAID_IQN, 0, INITIATOR) as session:
        block_length, blocks = session.read_capacity16(0)
        assert block_length == BS
        assert blocks * BS == 3 * (16 - 1) * (1 << 20)  # 3 data members of 16 MiB - 1 MiB meta
        written = write_all(session, 0, blocks // 4, seed=1)
        mirror = write_all(session, 1, 2048, seed=2)
        (status,) = [a for a in served.ctl("raid", "status") if a["name"] == "r5"]
        assert status["state"] == "optimal" and status["level"] == 5

        served.ctl("raid", "fail-member", "r5", "1")
        (status,) = [a for a in served.ctl("raid", "status") if a["name"] == "r5"]
        assert status["state"] == "degraded"
        assert status["members"][1]["state"] == "failed"
        check_all(session, 0, written, "degraded reads")
        written.update(write_all(session, 0, blocks // 2, seed=3))  # degraded writes

        spare = tmp_path / "spare.img"
        started = time.monotonic()
        served.ctl("raid", "replace-member", "r5", "1", "--file", str(spare))
        check_all(session, 0, written, "reads while rebuilding")

        def rebuilt() -> bool:
            (array,) = [a for a in served.ctl("raid", "status") if a["name"] == "r5"]
            return bool(array["state"] == "optimal")

        wait_for(rebuilt, 120, "the rebuild")
        rebuild_s = time.monotonic() - started
        served.ctl("raid", "fail-member", "r5", "3")  # now member 1's rebuilt data is needed
        check_all(session, 0, written, "reads after the rebuild with member 3 failed")
        check_all(session, 1, mirror, "the RAID 1 drive")
        served.ctl("raid", "fail-member", "r5", "0")  # a second failure: the drive goes offline
        with pytest.raises(ScsiCheckCondition) as failure:
            session.read16(0, 0, 8, BS)
        assert failure.value.sense_key == 0x03  # MEDIUM ERROR
        controller = served.ctl("controller")
        (r5,) = [a for a in controller["arrays"] if a["name"] == "r5"]
        assert r5["state"] == "failed" and r5["offline_reason"]
    record_summary(request.config, "raid5 fail/replace/rebuild",
                   f"{len(written)} chunks verified degraded, during and after a rebuild of "
                   f"15 MiB in {rebuild_s:.1f} s, then with another member failed")


def test_raid_reassembles_after_restart_and_refuses_foreign_members(
        tmp_path: Path, free_tcp_port: int) -> None:
    members = member_stores(tmp_path)
    text = RAID_CONFIG.format(dir=tmp_path, port=free_tcp_port, iqn=RAID_IQN, members=members)
    with serve(text, tmp_path, free_tcp_port) as served, \
            libiscsi_client.Session(served.portal, RAID_IQN, 0, INITIATOR) as session:
        written = write_all(session, 0, 4096, seed=4)
        served.ctl("raid", "fail-member", "r5", "2")
        generation = next(a for a in served.ctl("raid", "status")
                          if a["name"] == "r5")["generation"]
    # SIGTERM flushed the controller cache; the members' metadata brings the array back as it
    # was: the same data, member 2 still failed, the same generation.
    with serve(text, tmp_path, free_tcp_port) as served, \
            libiscsi_client.Session(served.portal, RAID_IQN, 0, INITIATOR) as session:
        (r5,) = [a for a in served.ctl("raid", "status") if a["name"] == "r5"]
        assert r5["state"] == "degraded" and r5["members"][2]["state"] == "failed"
        assert r5["generation"] == generation
        check_all(session, 0, written, "after a restart")
    # A member of another array in the place of m1: the server refuses to start, naming it.
    other = tmp_path / "other"
    other.mkdir()
    other_text = RAID_CONFIG.format(dir=other, port=free_tcp_port, iqn=RAID_IQN,
                                    members=member_stores(other))
    with serve(other_text, other, free_tcp_port):
        pass
    mixed = members.replace(f"{tmp_path}/m1.img", f"{other}/m1.img")
    (tmp_path / "emuhba.toml").write_text(RAID_CONFIG.format(
        dir=tmp_path, port=free_tcp_port, iqn=RAID_IQN, members=mixed))
    done = subprocess.run([sys.executable, "-m", "emuhba", "serve", "--config",
                           str(tmp_path / "emuhba.toml")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    output = done.stdout + done.stderr
    assert "cannot bring up array 'r5'" in output and f"{other}/m1.img" in output, output


# -------------------------------------------------------------------------------------- FC


def test_fc_target_with_300_luns_and_live_lun_changes(tmp_path: Path,
                                                      free_tcp_port: int) -> None:
    text = FC_CONFIG.format(dir=tmp_path, port=free_tcp_port, iqn=FC_IQN, wide=FC_WIDE_WWPN)
    wide_iqn = "iqn.2026-11.io.emuhba:fc0:fc." + FC_WIDE_WWPN.replace(":", "")
    with serve(text, tmp_path, free_tcp_port) as served:
        listing = subprocess.run(["iscsi-ls", "-s", "-i", INITIATOR,
                                  f"iscsi://{served.portal}"], capture_output=True, text=True,
                                 timeout=120, check=True).stdout
        assert f"Target:{FC_IQN} " in listing and f"Target:{wide_iqn} " in listing
        assert listing.count("Lun:") == 301, listing[-2000:]
        with libiscsi_client.Session(served.portal, wide_iqn, 0, INITIATOR) as wide:
            luns = wide.report_luns()
            assert luns == list(range(300))
            for lun in (0, 255, 256, 299):
                # libiscsi 1.19 puts a LUN's number in the LUN field as is, which for 256 and
                # up reads as peripheral addressing of another bus: give it the flat form.
                field = lun if lun < 256 else 0x4000 | lun
                data = pattern(lun, 8 * BS)
                wide.write16(field, 100, data, BS)
                assert wide.read16(field, 100, 8, BS) == data
                assert wide.read_capacity16(field) == (BS, (1 << 20) // BS)
        with libiscsi_client.Session(served.portal, FC_IQN, 0, INITIATOR) as session:
            session.read16(0, 0, 1, BS)
            served.ctl("fc", "add-lun", "0:0", "--ram", "4M", "--lun", "7")
            # The next command to the target's existing LUN reports the change ...
            with pytest.raises(ScsiCheckCondition) as attention:
                session._command_once(0, bytes(6), 0, None)
            assert (attention.value.sense_key, attention.value.ascq) == (0x06, 0x3F0E)
            # ... and REPORT LUNS has the new one, which works.
            assert session.report_luns() == [0, 7]
            assert session.read_capacity16(7) == (BS, (4 << 20) // BS)
            served.ctl("fc", "remove-lun", "0:0", "7")
            assert session.report_luns() == [0]


def test_fc_link_down_during_reads_costs_no_errors(tmp_path: Path, free_tcp_port: int,
                                                   request: pytest.FixtureRequest) -> None:
    text = FC_CONFIG.format(dir=tmp_path, port=free_tcp_port, iqn=FC_IQN, wide=FC_WIDE_WWPN)
    bench = load_bench()
    with serve(text, tmp_path, free_tcp_port) as served:
        url = f"iscsi://{served.portal}/{FC_IQN}/0"
        workload = bench.Workload("link", 4096, 8, True)
        command = bench.iscsi_perf_command(url, workload, 8, BS, INITIATOR)
        perf = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        time.sleep(2)
        served.ctl("link", "down", "--seconds", "3")
        time.sleep(0.5)
        assert served.ctl("controller")["link"]["up"] is False
        out, _ = perf.communicate(timeout=60)
        assert perf.returncode == 0, out[-2000:]
        iops = bench.parse_iscsi_perf(out)  # raises on any failed command
        link = served.ctl("controller")["link"]
        assert link["up"] and link["downs"] == 1 and link["rejected_while_down"] == 0
    record_summary(request.config, "fc link down 3 s under iscsi-perf",
                   f"{iops} IOPS over 8 s, 0 errors")


# ---------------------------------------------------------------------------------- faults


def test_injected_medium_error_and_busy_as_the_initiator_sees_them(
        tmp_path: Path, free_tcp_port: int) -> None:
    text = FC_CONFIG.format(dir=tmp_path, port=free_tcp_port, iqn=FC_IQN, wide=FC_WIDE_WWPN)
    with serve(text, tmp_path, free_tcp_port) as served, \
            libiscsi_client.Session(served.portal, FC_IQN, 0, INITIATOR) as session:
        session.read16(0, 0, 1, BS)
        served.ctl("fault", "medium-error", "0", "--lba", "1000-1007")
        with pytest.raises(ScsiCheckCondition) as failure:
            session.read16(0, 996, 8, BS)
        assert (failure.value.sense_key, failure.value.ascq) == (0x03, 0x1100)
        session.read16(0, 1008, 8, BS)  # next to it: fine
        served.ctl("fault", "busy", "all", "--count", "25")
        for lba in range(0, 200, 8):
            session.read16(0, lba, 8, BS)
        faults = served.ctl("fault", "list")
        assert [f["kind"] for f in faults] == ["medium-error"] and faults[0]["hits"] == 1
        assert served.ctl("controller")["busy_faults_given"] == 25
        assert served.ctl("status")["adapters"][0]["counters"]["busy_retries"] == 25
        served.ctl("fault", "clear")
        session.read16(0, 996, 8, BS)
    assert os.path.exists(tmp_path / "emuhba.toml")


# ----------------------------------------------------------------------- several adapters

TWO_ADAPTERS = """
[server]
control_socket = "{dir}/control/emuhba.sock"
metrics = "127.0.0.1:{metrics}"
[[portals]]
listen = "127.0.0.1:{port}"
[[stores]]
name = "plain"
kind = "ram"
size = "8M"
[[stores]]
name = "a"
kind = "ram"
size = "8M"
[[stores]]
name = "b"
kind = "ram"
size = "8M"
[[controllers]]
name = "disk0"
kind = "disk"
[[controllers]]
name = "raid0"
kind = "raid"
arrays = [{{ name = "m", level = 1, members = ["a", "b"] }}]
[[adapters]]
name = "hba0"
controller = "disk0"
[[adapters]]
name = "hba1"
controller = "raid0"
port_model = "scsiport"
[[targets]]
name = "iqn.2026-11.io.emuhba:plain"
adapter = "hba0"
luns = ["plain"]
[[targets]]
name = "iqn.2026-11.io.emuhba:mirror"
adapter = "hba1"
luns = [{{ lun = 0, array = "m" }}]
"""


def test_two_adapters_with_their_own_port_models_in_one_server(
        tmp_path: Path, free_tcp_port: int) -> None:
    metrics_port = load_bench().free_tcp_port("127.0.0.1")
    text = TWO_ADAPTERS.format(dir=tmp_path, port=free_tcp_port, metrics=metrics_port)
    with serve(text, tmp_path, free_tcp_port) as served:
        for iqn in ("iqn.2026-11.io.emuhba:plain", "iqn.2026-11.io.emuhba:mirror"):
            with libiscsi_client.Session(served.portal, iqn, 0, INITIATOR) as session:
                data = pattern(len(iqn), 64 * BS)
                session.write16(0, 10, data, BS)
                assert session.read16(0, 10, 64, BS) == data
        status = served.ctl("status")
        assert [(a["name"], a["miniport"], a["model"]) for a in status["adapters"]] == [
            ("hba0", "emudisk", "storport"), ("hba1", "emuraid", "scsiport")]
        assert {t["name"]: t["adapter"] for t in status["targets"]} == {
            "iqn.2026-11.io.emuhba:plain": "hba0", "iqn.2026-11.io.emuhba:mirror": "hba1"}
        assert served.ctl("--adapter", "hba1", "raid", "status")[0]["name"] == "m"
        refused = served.ctl("raid", "status", check=False)  # hba0 has no RAID controller
        assert refused["ok"] is False and refused["error"]["code"] == "unsupported"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as response:
            body = response.read().decode()
        assert body.count("# TYPE emuhba_adapter_info gauge") == 1
        assert 'emuhba_adapter_info{adapter="hba0",miniport="emudisk",model="storport"} 1.0' \
            in body
        assert 'emuhba_adapter_info{adapter="hba1",miniport="emuraid",model="scsiport"} 1.0' \
            in body
