"""The control socket: the protocol, its commands against a real port driver, the socket's
permissions and peer check, malformed input, and the ``emuhba ctl`` client and CLI."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emuhba import control
from emuhba.cli import build_parser, format_table, parse_metrics_address, run_ctl
from emuhba.control import (
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    ControlClient,
    ControlError,
    Controller,
    ControlServer,
    ControlSetupError,
    ControlUnavailable,
    PeerCredentials,
    default_socket_path,
    find_socket,
    parse_lun_address,
    peer_allowed,
    peer_credentials,
    runtime_directory,
)
from emuhba.hba import Hba
from emuhba.miniport import PortConfiguration, PortServices
from emuhba.srb import DataDirection, Srb
from miniports.disk import DiskMiniport
from target.connection import Connection
from target.portal import TargetNode, TargetPortal
from tests.initiator import TestInitiator

IQN = "iqn.2026-11.io.emuhba:ctl-test"
BS = 512


class ClassicDiskMiniport(DiskMiniport):
    """The disk miniport without extended SRBs: per-LUN depth stops at 255."""

    def hw_find_adapter(self, port: PortServices, config: PortConfiguration) -> bool:
        found = super().hw_find_adapter(port, config)
        config.srb_type_extended = False
        return found


async def started_hba(luns: int = 2, *, classic: bool = False) -> Hba:
    cls = ClassicDiskMiniport if classic else DiskMiniport
    hba = Hba(cls.from_luns([("ram", 1 << 20)] * luns, target_port_name=f"{IQN},t,1"))
    await hba.start()
    return hba


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    # A test elsewhere that runs a CLI entry point calls configure_logging(), which binds
    # structlog to the sys.stderr of that moment (pytest's capture of that test, closed
    # afterwards). Logging from here would then raise; start from structlog's defaults.
    structlog.reset_defaults()


@pytest.fixture
async def hba() -> AsyncIterator[Hba]:
    adapter = await started_hba()
    yield adapter
    await adapter.stop()


@pytest.fixture
def portal(hba: Hba) -> TargetPortal:
    return TargetPortal([TargetNode(IQN, hba, path_id=0, target_id=0)])


@pytest.fixture
def controller(hba: Hba, portal: TargetPortal) -> Controller:
    return Controller(hba, portal, info={"portals": ["127.0.0.1:3260"]})


def ask(ctl: Controller, cmd: str, **args: Any) -> dict[str, Any]:
    return ctl.handle({"v": PROTOCOL_VERSION, "id": 1, "cmd": cmd, "args": args})


def ok(ctl: Controller, cmd: str, **args: Any) -> Any:
    response = ask(ctl, cmd, **args)
    assert response["ok"] is True, response
    return response["result"]


def error_code(ctl: Controller, cmd: str, **args: Any) -> str:
    response = ask(ctl, cmd, **args)
    assert response["ok"] is False, response
    assert response["v"] == PROTOCOL_VERSION
    code: str = response["error"]["code"]
    assert response["error"]["message"]
    return code


class Done:
    def __init__(self) -> None:
        self.srbs: list[Srb] = []

    def __call__(self, srb: Srb) -> None:
        self.srbs.append(srb)


def read(hba: Hba, lun: int, done: Done, lba: int = 0) -> Srb:
    cdb = bytes((0x28, 0)) + lba.to_bytes(4, "big") + bytes((0, 0, 1, 0))
    srb = Srb(lun=lun, cdb=cdb, data_direction=DataDirection.IN, data_transfer_length=BS,
              sg_list=[memoryview(bytearray(BS))], nexus=1, queue_tag=len(done.srbs) + 1000,
              completion=done)
    hba.execute(srb)
    return srb


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


def unit(ctl: Controller, address: str) -> dict[str, Any]:
    units: list[dict[str, Any]] = ok(ctl, "luns")
    return next(u for u in units if u["address"] == address)


# --------------------------------------------------------------------------- the commands


async def test_status_shows_model_adapter_targets_and_info(controller: Controller) -> None:
    status = ok(controller, "status")
    assert status["port_model"] == "storport"
    (adapter,) = status["adapters"]
    assert adapter["name"] == "hba0"
    assert adapter["miniport"] == "emudisk"
    assert adapter["model"] == "storport"
    assert adapter["state"] == "ready"
    assert adapter["units"] == 2
    assert status["targets"] == [{"name": IQN, "alias": None, "path_id": 0, "target_id": 0,
                                  "adapter": "hba0", "luns": [0, 1]}]
    assert status["sessions"] == []
    assert status["portals"] == ["127.0.0.1:3260"]
    assert status["pid"] == os.getpid()


async def test_luns_count_completed_io_per_unit(hba: Hba, controller: Controller) -> None:
    before = {u["address"]: u for u in ok(controller, "luns")}
    assert sorted(before) == ["0:0:0", "0:0:1"]
    done = Done()
    for i in range(3):
        read(hba, 1, done, lba=i)
    await until(lambda: len(done.srbs) == 3)
    after = {u["address"]: u for u in ok(controller, "luns")}
    assert after["0:0:1"]["completed"] - before["0:0:1"]["completed"] == 3
    assert after["0:0:1"]["queued"] - before["0:0:1"]["queued"] == 3
    assert after["0:0:0"]["completed"] == before["0:0:0"]["completed"]
    for key in ("queue_depth", "held", "outstanding", "busy_retries", "pauses", "resets",
                "state", "paused", "busy"):
        assert key in after["0:0:0"]


async def test_pause_lun_holds_its_io_only_and_ends_by_itself(hba: Hba,
                                                              controller: Controller) -> None:
    result = ok(controller, "pause", scope="lun", lun="0", seconds=0.15)
    assert result["address"] == "0:0:0"
    assert result["paused"] is True and result["state"] == "paused"
    assert 0 < result["pause_left_s"] <= 0.15
    paused, other = Done(), Done()
    read(hba, 0, paused)
    read(hba, 1, other)
    await until(lambda: len(other.srbs) == 1)
    assert paused.srbs == []
    assert unit(controller, "0:0:0")["held"] == 1
    await until(lambda: len(paused.srbs) == 1, timeout=2.0)
    assert unit(controller, "0:0:0")["state"] == "ready"


async def test_resume_lun_releases_at_once(hba: Hba, controller: Controller) -> None:
    ok(controller, "pause", scope="lun", lun="0:0:0", seconds=60)
    done = Done()
    read(hba, 0, done)
    await asyncio.sleep(0.02)
    assert done.srbs == []
    result = ok(controller, "resume", scope="lun", lun=0)
    assert result["state"] == "ready"
    await until(lambda: len(done.srbs) == 1, timeout=2.0)


async def test_pause_and_resume_adapter(hba: Hba, controller: Controller) -> None:
    result = ok(controller, "pause", scope="adapter", seconds=60)
    assert result["name"] == "hba0" and result["paused"] is True
    done = Done()
    read(hba, 0, done)
    read(hba, 1, done)
    await asyncio.sleep(0.02)
    assert done.srbs == []
    assert ok(controller, "status")["adapters"][0]["state"] == "paused"
    assert ok(controller, "resume", scope="adapter")["state"] == "ready"
    await until(lambda: len(done.srbs) == 2, timeout=2.0)


async def test_busy_and_ready_lun(hba: Hba, controller: Controller) -> None:
    result = ok(controller, "busy", scope="lun", lun="1", requests=5)
    assert result["busy"] is True
    assert ok(controller, "ready", scope="lun", lun="1")["busy"] is False
    assert unit(controller, "0:0:1")["state"] == "ready"


async def test_busy_and_ready_adapter(controller: Controller) -> None:
    result = ok(controller, "busy", scope="adapter", requests=3)
    assert result["busy"] is True
    assert ok(controller, "ready", scope="adapter")["state"] == "ready"


async def test_set_depth_applies_and_reports_the_previous_depth(
        hba: Hba, controller: Controller) -> None:
    result = ok(controller, "set_depth", lun="1", depth=7)
    assert result["queue_depth"] == 7
    assert result["previous_queue_depth"] == 64
    lq = hba.port.lun_queue(0, 0, 1)
    assert lq is not None and lq.queue_depth == 7
    # The disk miniport declares extended SRBs, so thousands are fine.
    assert ok(controller, "set_depth", lun="1", depth=4096)["queue_depth"] == 4096


async def test_depth_over_255_without_extended_srbs_is_refused_clearly() -> None:
    hba = await started_hba(classic=True)
    try:
        ctl = Controller(hba)
        response = ask(ctl, "set_depth", lun="0", depth=256)
        assert response["ok"] is False
        assert response["error"]["code"] == "depth_too_large"
        assert response["error"]["maximum"] == 255
        assert "255" in response["error"]["message"] and "extended" in response["error"]["message"]
        lq = hba.port.lun_queue(0, 0, 0)
        assert lq is not None and lq.queue_depth == 64
        assert ok(ctl, "set_depth", lun="0", depth=255)["queue_depth"] == 255
        assert ok(ctl, "status")["adapters"][0]["max_queue_depth"] == 255
    finally:
        await hba.stop()


@pytest.mark.parametrize("address", ["2", "0:0:9", "0:1:0", "1:0:0"])
async def test_unknown_lun_is_an_error_and_creates_no_queue(
        hba: Hba, controller: Controller, address: str) -> None:
    queues = len(hba.port.lun_queues())
    response = ask(controller, "pause", scope="lun", lun=address, seconds=1)
    assert response["error"]["code"] == "unknown_lun"
    assert "0:0:0, 0:0:1" in response["error"]["message"]
    assert error_code(controller, "set_depth", lun=address, depth=8) == "unknown_lun"
    assert len(hba.port.lun_queues()) == queues


def test_lun_address_forms() -> None:
    assert parse_lun_address("3", (1, 2)) == (1, 2, 3)
    assert parse_lun_address(3, (0, 0)) == (0, 0, 3)
    assert parse_lun_address(" 0:4:5 ", (0, 0)) == (0, 4, 5)
    for bad in ("", "a", "0:1", "0:1:2:3", "-1", "1.5", "²", "0:0:٣x", True, None, [0]):
        with pytest.raises(ControlError) as caught:
            parse_lun_address(bad, (0, 0))
        assert caught.value.code == "bad_argument"


@pytest.mark.parametrize(("cmd", "args"), [
    ("pause", {"scope": "lun", "lun": "0"}),  # no seconds
    ("pause", {"scope": "lun", "lun": "0", "seconds": 0}),
    ("pause", {"scope": "lun", "lun": "0", "seconds": -1}),
    ("pause", {"scope": "lun", "lun": "0", "seconds": "NaN"}),
    ("pause", {"scope": "lun", "lun": "0", "seconds": "inf"}),
    ("pause", {"scope": "lun", "lun": "0", "seconds": True}),
    ("pause", {"scope": "lun", "lun": "0", "seconds": [1]}),
    ("pause", {"scope": "disk", "seconds": 1}),
    ("pause", {"scope": "adapter", "lun": "0", "seconds": 1}),
    ("pause", {"lun": "0", "seconds": 1}),  # no scope
    ("busy", {"scope": "lun", "lun": "0", "requests": 0}),
    ("busy", {"scope": "lun", "lun": "0", "requests": 1.5}),
    ("busy", {"scope": "adapter", "requests": "many"}),
    ("busy", {"scope": "adapter", "requests": "²"}),
    ("busy", {"scope": "adapter", "requests": None}),
    ("set_depth", {"lun": "0", "depth": 0}),
    ("set_depth", {"lun": "0"}),
    ("set_depth", {"lun": "x", "depth": 4}),
    ("resume", {"scope": "lun"}),  # no LUN
    ("status", {"verbose": True}),  # unknown argument
])
async def test_bad_arguments_are_refused_without_side_effects(
        hba: Hba, controller: Controller, cmd: str, args: dict[str, Any]) -> None:
    assert error_code(controller, cmd, **args) == "bad_argument"
    assert all(u["state"] == "ready" and u["queue_depth"] == 64 for u in ok(controller, "luns"))
    assert ok(controller, "status")["adapters"][0]["state"] == "ready"


@pytest.mark.parametrize(("line", "code"), [
    (b"not json", "bad_request"),
    (b"\xff\xfe", "bad_request"),
    (b"[1, 2]", "bad_request"),
    (b'"status"', "bad_request"),
    (b"null", "bad_request"),
    (b'{"cmd": "status"}', "unsupported_version"),
    (b'{"v": 2, "cmd": "status"}', "unsupported_version"),
    (b'{"v": true, "cmd": "status"}', "unsupported_version"),
    (b'{"v": "1", "cmd": "status"}', "unsupported_version"),
    (b'{"v": 1}', "bad_request"),
    (b'{"v": 1, "cmd": 5}', "bad_request"),
    (b'{"v": 1, "cmd": "format-disk"}', "unknown_command"),
    (b'{"v": 1, "cmd": "status", "args": [1]}', "bad_request"),
    (b'{"v": 1, "cmd": "pause", "args": "lun 0"}', "bad_request"),
    (b'{"v": 1, "cmd": "status", "id": NaN}', "bad_request"),
    (b'{"v": 1, "cmd": "pause", "args": {"scope": "adapter", "seconds": Infinity}}',
     "bad_request"),
])
def test_malformed_requests_get_error_responses(controller: Controller, line: bytes,
                                                code: str) -> None:
    response = controller.handle_line(line)
    assert response["ok"] is False
    assert response["v"] == PROTOCOL_VERSION
    assert response["error"]["code"] == code
    assert json.loads(control.encode_message(response))["error"]["code"] == code


KNOWN_ERRORS = {"bad_request", "unsupported_version", "unknown_command", "bad_argument",
                "unknown_lun", "depth_too_large", "not_supported", "refused"}
_json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_args = st.dictionaries(st.sampled_from(["scope", "lun", "seconds", "requests", "depth", "x"]),
                        _json_leaf | st.sampled_from(["lun", "adapter", "0", "1", "0:0:1", "2"]),
                        max_size=4)
_requests = st.fixed_dictionaries(
    {"v": st.just(1) | _json_leaf, "cmd": st.sampled_from(
        ["hello", "status", "luns", "sessions", "pause", "resume", "busy", "ready", "set_depth",
         "nope"]) | _json_leaf},
    optional={"id": _json_leaf, "args": _args | _json})


def _well_formed(response: dict[str, Any]) -> None:
    assert response["v"] == PROTOCOL_VERSION
    assert isinstance(response["ok"], bool)
    if not response["ok"]:
        assert response["error"]["code"] in KNOWN_ERRORS, response
    json.loads(control.encode_message(response), parse_constant=_strict)


def _strict(name: str) -> None:
    raise AssertionError(f"{name} in an answer")


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=_requests)
def test_any_request_gets_a_well_formed_answer(controller: Controller,
                                               request: dict[str, Any]) -> None:
    _well_formed(controller.handle_line(json.dumps(request).encode()))
    _well_formed(controller.handle(request))
    controller.hba.port.resume()
    controller.hba.port.ready()
    for lq in controller.hba.port.lun_queues():
        controller.hba.port.resume_device(*lq.address)
        controller.hba.port.device_ready(*lq.address)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()))
def test_any_line_gets_a_well_formed_answer(controller: Controller, line: bytes) -> None:
    _well_formed(controller.handle_line(line))


def test_version_error_lists_supported_versions(controller: Controller) -> None:
    response = controller.handle_line(b'{"v": 99, "id": "x", "cmd": "status"}')
    assert response["id"] == "x"
    assert response["error"]["supported"] == [1]


def test_unknown_command_lists_the_commands(controller: Controller) -> None:
    response = controller.handle_line(b'{"v": 1, "cmd": "nope"}')
    assert "luns" in response["error"]["commands"]


def test_an_unencodable_answer_becomes_an_internal_error() -> None:
    line = control.encode_message({"v": 1, "ok": True, "result": float("nan")})
    assert json.loads(line)["error"]["code"] == "internal"


def test_request_id_is_echoed(controller: Controller) -> None:
    for request_id in (7, "abc", None, [1, 2]):
        response = controller.handle({"v": 1, "id": request_id, "cmd": "hello"})
        assert response["id"] == request_id
        assert response["ok"] is True


def test_a_failing_command_is_an_internal_error_not_a_crash(
        controller: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[Any]:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(controller.hba.port, "lun_queues", broken)
    response = ask(controller, "luns")
    assert response["ok"] is False and response["error"]["code"] == "internal"
    assert ok(controller, "hello")["protocol"] == PROTOCOL_VERSION


async def test_scsiport_model_has_no_controls_and_says_so() -> None:
    hba = Hba(DiskMiniport.from_luns([("ram", 1 << 20)] * 2, target_port_name=f"{IQN},t,1"),
              model="scsiport")
    await hba.start()
    try:
        ctl = Controller(hba)
        status = ok(ctl, "status")
        assert status["port_model"] == "scsiport"
        assert status["adapters"][0]["adapter_limit"] == 254
        for cmd, args in (("pause", {"scope": "lun", "lun": "0", "seconds": 1}),
                          ("pause", {"scope": "adapter", "seconds": 1}),
                          ("busy", {"scope": "adapter", "requests": 1}),
                          ("busy", {"scope": "lun", "lun": "1", "requests": 1}),
                          ("resume", {"scope": "adapter"}),
                          ("ready", {"scope": "lun", "lun": "0"}),
                          ("set_depth", {"lun": "0", "depth": 8})):
            response = ask(ctl, cmd, **args)
            assert response["error"]["code"] == "not_supported", (cmd, response)
            assert "scsiport" in response["error"]["message"]
        assert hba.port.counters()["ignored_controls"] == 0  # refused before reaching the port
        assert len(ok(ctl, "luns")) == 2
    finally:
        await hba.stop()


async def test_sessions_show_initiator_isid_tsih_and_counters(
        hba: Hba, portal: TargetPortal, controller: Controller) -> None:
    assert ok(controller, "sessions") == []
    ini = TestInitiator(Connection(portal, local_address="192.0.2.1:3260", peer="192.0.2.9:5000"))
    ini.login(IQN)
    ini.nop()
    (session,) = ok(controller, "sessions")
    assert session["initiator"] == ini.name
    assert session["target"] == IQN
    live = ini.conn.session
    assert live is not None
    assert session["tsih"] == live.tsih
    assert session["isid"] == live.isid.hex()
    assert session["discovery"] is False
    (conn,) = session["connections"]
    assert conn["peer"] == "192.0.2.9:5000"
    assert conn["state"] == "FULL_FEATURE"
    assert session["pdus_in"] == ini.conn.pdus_in >= 3
    assert session["pdus_out"] == ini.conn.pdus_out >= 3
    assert session["rejects"] == 0 and session["digest_errors"] == 0
    status = ok(controller, "status")
    assert status["sessions"][0]["initiator"] == ini.name


# ------------------------------------------------------------------- socket and permissions


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short: sun_path holds 107 bytes, and pytest's tmp_path can be longer than that.
    directory = Path(tempfile.mkdtemp(prefix="emuhba-ctl-"))
    try:
        yield directory
    finally:
        for entry in sorted(directory.rglob("*"), reverse=True):
            if entry.is_dir() and not entry.is_symlink():
                entry.rmdir()
            else:
                entry.unlink()
        directory.rmdir()


@pytest.fixture
async def server(controller: Controller, sock_dir: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(controller, sock_dir / "run" / "ctl.sock")
    await srv.start()
    yield srv
    await srv.close()


async def raw_exchange(path: Path, payload: bytes, responses: int) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(payload)
        await writer.drain()
        out = []
        for _ in range(responses):
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line.endswith(b"\n"), line
            out.append(json.loads(line))
        return out
    finally:
        writer.close()


async def test_socket_is_0600_in_a_0700_directory_and_removed_on_close(
        controller: Controller, sock_dir: Path) -> None:
    path = sock_dir / "run" / "ctl.sock"
    srv = ControlServer(controller, path)
    await srv.start()
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
    await srv.close()
    assert not path.exists()


async def test_bind_does_not_disturb_the_process_umask(controller: Controller,
                                                       sock_dir: Path) -> None:
    before = os.umask(0o022)
    try:
        srv = ControlServer(controller, sock_dir / "run" / "ctl.sock")
        await srv.start()
        await srv.close()
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


async def test_requests_are_answered_in_order_on_one_connection(server: ControlServer) -> None:
    payload = b"".join(
        json.dumps({"v": 1, "id": i, "cmd": cmd}).encode() + b"\n"
        for i, cmd in enumerate(("hello", "luns", "status", "sessions"))) + b"\n  \n"
    responses = await raw_exchange(server.path, payload, 4)
    assert [r["id"] for r in responses] == [0, 1, 2, 3]
    assert all(r["ok"] for r in responses)


async def test_garbage_is_answered_and_the_server_keeps_serving(server: ControlServer) -> None:
    responses = await raw_exchange(
        server.path, b"\x00\x01garbage\n{\"v\":1,\"cmd\":\"hello\",\"id\":2}\n", 2)
    assert responses[0]["error"]["code"] == "bad_request"
    assert responses[1]["ok"] is True and responses[1]["id"] == 2
    # A client that vanishes mid-line does not hurt either.
    _, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(b'{"v": 1, "cmd": "sta')
    writer.close()
    assert (await raw_exchange(server.path, b'{"v":1,"cmd":"hello"}\n', 1))[0]["ok"]


async def test_an_oversized_line_ends_that_connection_only(server: ControlServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(b"x" * (MAX_REQUEST_BYTES + 10) + b"\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    assert json.loads(line)["error"]["code"] == "request_too_large"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
    writer.close()
    assert (await raw_exchange(server.path, b'{"v":1,"cmd":"hello"}\n', 1))[0]["ok"]


def test_peer_allowed_only_for_the_owner() -> None:
    me = os.geteuid()
    assert peer_allowed(PeerCredentials(pid=1, uid=me, gid=0), me)
    assert not peer_allowed(PeerCredentials(pid=1, uid=me + 1, gid=0), me)
    assert not peer_allowed(PeerCredentials(pid=1, uid=0, gid=0), 1000)  # not even root
    assert not peer_allowed(None, me)


def test_peer_credentials_report_the_connecting_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        creds = peer_credentials(a)
    assert creds == PeerCredentials(os.getpid(), os.getuid(), os.getgid())


async def test_server_refuses_a_peer_that_is_not_its_owner(controller: Controller,
                                                           sock_dir: Path) -> None:
    srv = ControlServer(controller, sock_dir / "run" / "ctl.sock", owner_uid=os.geteuid() + 1)
    await srv.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        writer.write(b'{"v":1,"cmd":"pause","args":{"scope":"adapter","seconds":60}}\n')
        line = await asyncio.wait_for(reader.readline(), 5)
        assert json.loads(line)["error"]["code"] == "permission_denied"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert srv.refused == 1
        assert ok(controller, "status")["adapters"][0]["state"] == "ready"  # not executed
    finally:
        await srv.close()


# The venv's interpreter may sit where another user cannot execute it (under /root, say).
OTHER_USER_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(OTHER_USER_PYTHON, os.X_OK)
                    or not os.stat(OTHER_USER_PYTHON).st_mode & stat.S_IXOTH,
                    reason="needs root (to act as another user) and a world-executable python3")
async def test_another_user_cannot_connect_nor_pass_the_peer_check(
        controller: Controller) -> None:
    # A directory other users may traverse, so that only the socket's own mode stands guard.
    directory = Path(tempfile.mkdtemp(prefix="emuhba-ctl-open-"))
    try:
        os.chmod(directory, 0o755)
        path = directory / "ctl.sock"
        srv = ControlServer(controller, path, private_directory=False)
        await srv.start()
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(sys.argv[1])\n"
            "except PermissionError:\n"
            "    print('EACCES'); sys.exit(0)\n"
            "s.sendall(b'{\"v\":1,\"cmd\":\"hello\"}\\n')\n"
            "print(s.makefile().readline().strip())\n"
        )

        def as_nobody() -> str:
            done = subprocess.run([OTHER_USER_PYTHON, "-I", "-c", probe, str(path)], user=65534,
                                  group=65534, extra_groups=[], cwd="/", capture_output=True,
                                  text=True, timeout=30, check=True)
            return done.stdout.strip()

        try:
            assert await asyncio.to_thread(as_nobody) == "EACCES"
            # Even if the socket's mode were loosened, SO_PEERCRED still turns them away.
            os.chmod(path, 0o666)
            answer = json.loads(await asyncio.to_thread(as_nobody))
            assert answer["error"]["code"] == "permission_denied"
            assert srv.refused == 1
        finally:
            await srv.close()
    finally:
        for entry in directory.iterdir():
            entry.unlink()
        directory.rmdir()


async def test_refuses_a_path_that_is_not_a_socket(controller: Controller,
                                                   sock_dir: Path) -> None:
    path = sock_dir / "ctl.sock"
    path.write_text("precious")
    os.chmod(sock_dir, 0o700)
    with pytest.raises(ControlSetupError, match="not a socket"):
        await ControlServer(controller, path).start()
    assert path.read_text() == "precious"


async def test_refuses_a_socket_another_server_is_using(server: ControlServer,
                                                        controller: Controller) -> None:
    with pytest.raises(ControlSetupError, match="in use"):
        await ControlServer(controller, server.path).start()
    assert (await raw_exchange(server.path, b'{"v":1,"cmd":"hello"}\n', 1))[0]["ok"]


async def test_replaces_a_stale_socket_of_ours(controller: Controller, sock_dir: Path) -> None:
    path = sock_dir / "ctl.sock"
    os.chmod(sock_dir, 0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays: a server that died without cleaning up
    srv = ControlServer(controller, path)
    await srv.start()
    try:
        assert (await raw_exchange(path, b'{"v":1,"cmd":"hello"}\n', 1))[0]["ok"]
    finally:
        await srv.close()


async def test_does_not_remove_a_successors_socket(controller: Controller,
                                                   sock_dir: Path) -> None:
    path = sock_dir / "ctl.sock"
    os.chmod(sock_dir, 0o700)
    srv = ControlServer(controller, path)
    await srv.start()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    try:
        await srv.close()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()


@pytest.mark.parametrize(("mode", "private", "message"), [
    (0o755, True, "mode 0755"),
    (0o770, True, "mode 0770"),
    (0o777, False, "writable by others"),
    (0o775, False, "writable by others"),
])
def test_directory_must_be_private(sock_dir: Path, mode: int, private: bool,
                                   message: str) -> None:
    directory = sock_dir / "d"
    directory.mkdir()
    os.chmod(directory, mode)
    with pytest.raises(ControlSetupError, match=message):
        control.bind_control_socket(directory / "ctl.sock", private_directory=private)
    assert not (directory / "ctl.sock").exists()


def test_explicit_directory_may_be_readable_by_others(sock_dir: Path) -> None:
    os.chmod(sock_dir, 0o755)
    sock, _ = control.bind_control_socket(sock_dir / "ctl.sock", private_directory=False)
    sock.close()
    assert stat.S_IMODE(os.lstat(sock_dir / "ctl.sock").st_mode) == 0o600


def test_a_symlinked_directory_is_refused(sock_dir: Path) -> None:
    real = sock_dir / "real"
    real.mkdir(mode=0o700)
    (sock_dir / "link").symlink_to(real)
    with pytest.raises(ControlSetupError, match="not a directory"):
        control.bind_control_socket(sock_dir / "link" / "ctl.sock", private_directory=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_a_directory_of_another_user_is_refused(sock_dir: Path) -> None:
    directory = sock_dir / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(ControlSetupError, match="belongs to uid 65534"):
        control.bind_control_socket(directory / "ctl.sock", private_directory=True)


def test_a_too_long_path_is_refused_clearly(sock_dir: Path) -> None:
    with pytest.raises(ControlSetupError, match="too long"):
        control.bind_control_socket(sock_dir / ("x" * 120) / "ctl.sock", private_directory=True)


# --------------------------------------------------------------------------- default paths


def test_runtime_directory_choice(sock_dir: Path) -> None:
    assert runtime_directory(euid=0, environ={}) == Path("/run/emuhba")
    os.chmod(sock_dir, 0o700)
    me = os.geteuid()
    if me != 0:
        assert runtime_directory(environ={"XDG_RUNTIME_DIR": str(sock_dir)}) == sock_dir / "emuhba"
    # Not ours, not private, relative or missing: ignored, as the XDG spec asks.
    other = me + 1 if me != 0 else 4242
    fallback = Path(tempfile.gettempdir()) / f"emuhba-{other}"
    assert runtime_directory(euid=other, environ={"XDG_RUNTIME_DIR": str(sock_dir)}) == fallback
    assert runtime_directory(euid=other, environ={"XDG_RUNTIME_DIR": "run/user"}) == fallback
    assert runtime_directory(euid=other, environ={}) == fallback
    assert default_socket_path(3261, euid=0, environ={}) == Path("/run/emuhba/3261.sock")


def test_find_socket_prefers_explicit_then_port(monkeypatch: pytest.MonkeyPatch,
                                                sock_dir: Path) -> None:
    assert find_socket("/x/y.sock", 1234) == Path("/x/y.sock")
    assert find_socket(None, 1234).name == "1234.sock"
    monkeypatch.setattr(control, "runtime_directory", lambda **_: sock_dir)
    assert find_socket(None, None) == sock_dir / "3260.sock"  # nothing there
    (sock_dir / "4000.sock").touch()
    assert find_socket(None, None) == sock_dir / "4000.sock"  # the only one
    (sock_dir / "4001.sock").touch()
    assert find_socket(None, None) == sock_dir / "3260.sock"  # ambiguous: the default


# ---------------------------------------------------------------------------------- client


def test_client_says_which_path_it_tried(sock_dir: Path) -> None:
    path = sock_dir / "nothing.sock"
    with pytest.raises(ControlUnavailable) as caught:
        ControlClient(path).connect()
    assert str(path) in str(caught.value)
    assert "no such socket" in str(caught.value)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_dir / "stale.sock"))
    stale.close()
    with pytest.raises(ControlUnavailable, match="refused"):
        ControlClient(sock_dir / "stale.sock").connect()


def test_client_gives_up_on_a_silent_server(sock_dir: Path) -> None:
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(sock_dir / "silent.sock"))
    silent.listen(1)  # never accepts, never answers
    try:
        with pytest.raises(ControlUnavailable, match=r"no answer within 0\.2 s"), \
                ControlClient(sock_dir / "silent.sock", timeout=0.2) as client:
            client.request("hello")
    finally:
        silent.close()


async def test_client_round_trip_and_errors(server: ControlServer) -> None:
    def talk() -> tuple[Any, ControlError]:
        with ControlClient(server.path, timeout=5) as client:
            hello = client.request("hello")
            try:
                client.request("pause", scope="lun", lun="9", seconds=1)
            except ControlError as exc:
                return hello, exc
        raise AssertionError("no error")

    hello, error = await asyncio.to_thread(talk)
    assert hello["protocol"] == PROTOCOL_VERSION and "pause" in hello["commands"]
    assert error.code == "unknown_lun"


# ------------------------------------------------------------------------------------- CLI


def ctl_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["ctl", *argv])


async def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(run_ctl, ctl_args(*argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_ctl_options_go_before_or_after_the_command() -> None:
    for argv in (("--json", "--socket", "/s", "luns"), ("luns", "--json", "--socket", "/s"),
                 ("pause", "lun", "3", "--seconds", "2", "--json", "--socket", "/s")):
        args = ctl_args(*argv)
        assert args.json is True and args.socket == "/s"
    assert ctl_args("luns").json is False


@pytest.mark.parametrize("argv", [
    ("pause", "lun", "0"),  # no --seconds
    ("pause", "disk", "0", "--seconds", "1"),
    ("busy", "adapter"),  # no --requests
    ("set-depth", "lun", "0"),
    ("set-depth", "lun", "0", "deep"),
    ("frobnicate",),
])
def test_ctl_usage_errors_exit_2(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        ctl_args(*argv)
    assert caught.value.code == 2


async def test_ctl_cli_tables_json_and_exit_codes(server: ControlServer, hba: Hba) -> None:
    sock = str(server.path)
    code, out, _ = await run_cli("--socket", sock, "luns")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["LUN", "DEPTH", "QUEUED"] and "STATE" in header
    assert [r.split()[0] for r in rows] == ["0:0:0", "0:0:1"]

    code, out, _ = await run_cli("--socket", sock, "pause", "lun", "1", "--seconds", "30")
    assert code == 0 and out.startswith("LUN 0:0:1: paused")
    code, out, _ = await run_cli("--socket", sock, "--json", "luns")
    units = {u["address"]: u for u in json.loads(out)}
    assert units["0:0:1"]["paused"] is True and units["0:0:0"]["paused"] is False
    code, out, _ = await run_cli("--socket", sock, "resume", "lun", "0:0:1")
    assert code == 0 and "ready" in out

    code, out, err = await run_cli("--socket", sock, "set-depth", "lun", "0", "16")
    assert code == 0 and "queue depth 16 (was 64)" in out
    code, out, err = await run_cli("--socket", sock, "busy", "lun", "5", "--requests", "2")
    assert code == 1 and out == "" and "no logical unit at 0:0:5" in err
    code, out, err = await run_cli("--socket", sock, "--json", "set-depth", "lun", "9", "4")
    assert code == 1 and json.loads(out)["error"]["code"] == "unknown_lun"

    code, out, _ = await run_cli("--socket", sock, "status")
    assert code == 0 and "port model storport" in out and IQN in out
    code, out, _ = await run_cli("--socket", sock, "sessions")
    assert code == 0 and out == "no sessions\n"
    for argv in (("pause", "adapter", "--seconds", "30"), ("resume", "adapter"),
                 ("busy", "adapter", "--requests", "2"), ("ready", "adapter")):
        code, out, _ = await run_cli("--socket", sock, *argv)
        assert code == 0 and out.startswith("adapter hba0:"), (argv, out)


async def test_ctl_cli_without_a_server_exits_3_and_names_the_path(sock_dir: Path) -> None:
    path = sock_dir / "absent.sock"
    code, out, err = await run_cli("--socket", str(path), "luns")
    assert code == 3 and out == "" and str(path) in err
    code, out, _ = await run_cli("--socket", str(path), "--json", "luns")
    assert code == 3 and json.loads(out)["error"]["socket"] == str(path)


def test_format_table_aligns_numbers_right_and_text_left() -> None:
    text = format_table(["NAME", "N", "X"], [["a", 1, None], ["bbb", 100, True]])
    assert text.splitlines() == ["NAME    N  X", "a       1  -", "bbb   100  yes"]


def test_metrics_address_needs_a_port() -> None:
    assert parse_metrics_address(":9464") == ("0.0.0.0", 9464)
    assert parse_metrics_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_metrics_address("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "localhost", "host:", "host:99999"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_metrics_address(bad)


def test_serve_refuses_to_start_over_a_file_it_does_not_own(sock_dir: Path) -> None:
    victim = sock_dir / "not-a-socket"
    victim.write_text("keep me")
    done = subprocess.run(
        [sys.executable, "-m", "emuhba", "serve", "--portal", "127.0.0.1:0", "--ram-lun", "1M",
         "--control-socket", str(victim), "--log-format", "json"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "cannot open the control socket" in done.stderr and "not a socket" in done.stderr
    assert victim.read_text() == "keep me"
