"""Shared fixtures: a real target (emuhba, or tgtd to validate the harness) and tool checks.

`pytest --iscsi-target=tgtd` (or EMUHBA_IT_TARGET=tgtd) runs the same integration tests against
tgtd, which proves that each test passes on a known-good target and so that a failure against
emuhba is emuhba's. tgtd needs root.

Outside CI (CI=true) a missing tool skips the test that needs it, saying what to install; in CI
it fails, so a machine without libiscsi-bin cannot pass for a green run.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"

RAM_LUN_SIZE = 64 << 20
FILE_LUN_SIZE = 48 << 20  # unlike the RAM LUN's, so a LUN's size tells which one it is
INITIATOR = "iqn.2026-11.io.emuhba:pytest"
INITIATOR_2 = "iqn.2026-11.io.emuhba:pytest-2"
LOG_TAIL_LINES = 80

LIBISCSI_TOOLS = ("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "iscsi-perf", "iscsi-test-cu")
PACKAGE_OF = {tool: "libiscsi-bin" for tool in LIBISCSI_TOOLS} | {"tgtd": "tgt", "tgtadm": "tgt"}


def load_bench() -> ModuleType:
    """emuhba.bench_target: it owns the target process helpers (EmuhbaServer, TgtdServer, ...)."""
    return importlib.import_module("emuhba.bench_target")


def missing_requirement(message: str) -> None:
    """Skip outside CI, fail in CI."""
    if IN_CI:
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        packages = sorted({PACKAGE_OF.get(tool, tool) for tool in missing})
        missing_requirement(
            f"missing {', '.join(missing)}: apt-get install -y {' '.join(packages)}"
        )


def require_libiscsi() -> None:
    from tests.integration import libiscsi_client

    if not libiscsi_client.available():
        missing_requirement("libiscsi.so not loadable: apt-get install -y libiscsi7")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--iscsi-target",
        choices=("emuhba", "tgtd"),
        default=os.environ.get("EMUHBA_IT_TARGET", "emuhba"),
        help="target the integration tests run against (tgtd validates the harness; needs root)",
    )


@dataclass(frozen=True)
class DiskLun:
    lun: int
    kind: str  # "ram" or "file"
    size: int
    path: Path | None = None


@dataclass
class RunningTarget:
    """A target process serving `disks` on host:port, plus what the tests need to reach it."""

    flavour: str
    host: str
    port: int
    iqn: str
    disks: tuple[DiskLun, ...]
    server: Any  # bench EmuhbaServer or TgtdServer
    log_path: Path
    header_digest: str  # the target's policy: "optional" or "required"
    block_length: int = 512
    other_luns: dict[int, str] = field(default_factory=dict)  # LUN -> iscsi-ls device type

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def portal_url(self) -> str:
        return f"iscsi://{self.host}:{self.port}"

    def url(self, lun: int, query: str = "") -> str:
        return f"iscsi://{self.host}:{self.port}/{self.iqn}/{lun}" + (f"?{query}" if query else "")

    def disk(self, kind: str) -> DiskLun:
        return next(d for d in self.disks if d.kind == kind)

    def alive(self) -> bool:
        proc = self.server.proc
        return proc is not None and proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text: str = self.server.log_text()
        return "\n".join(text.splitlines()[-lines:])


@contextmanager
def launch_target(
    flavour: str,
    workdir: Path,
    *,
    header_digest: str = "optional",
    extra_args: tuple[str, ...] = (),
    ram_size: int | None = RAM_LUN_SIZE,
    file_size: int | None = FILE_LUN_SIZE,
    file_path: Path | None = None,
    file_arg: str | None = None,
    block_length: int = 512,
) -> Iterator[RunningTarget]:
    """Start a target with (optionally) one RAM LUN and one file LUN, in that LUN order.

    For emuhba the file LUN is `--file-lun PATH` over a file created here (or `file_arg`
    verbatim, to test PATH,SIZE); on teardown the server gets SIGTERM and must exit 0.
    """
    bench = load_bench()
    workdir.mkdir(parents=True, exist_ok=True)
    host = "127.0.0.1"
    port = bench.free_tcp_port(host)
    log_path = workdir / f"{flavour}-{port}.log"
    disks: list[DiskLun] = []
    if file_size is not None and file_path is None:
        file_path = workdir / "file-lun.img"
    if (
        file_path is not None
        and file_arg is None
        and file_size is not None
        and not file_path.exists()
    ):
        with file_path.open("wb") as f:
            f.truncate(file_size)

    if flavour == "emuhba":
        args: list[str] = []
        lun = 0
        if ram_size is not None:
            args += ["--ram-lun", str(ram_size)]
            disks.append(DiskLun(lun, "ram", ram_size))
            lun += 1
        if file_path is not None:
            args += ["--file-lun", file_arg or str(file_path)]
            size = file_size if file_size is not None else file_path.stat().st_size
            disks.append(DiskLun(lun, "file", size, file_path))
        args += ["--header-digest", header_digest, "--block-size", str(block_length)]
        args += ["--log-level", "info", *extra_args]
        command = bench.emuhba_command(host, port, args)
        server = bench.EmuhbaServer(command, host, port, log_path, ready_timeout=30.0)
        iqn = bench.EMUHBA_IQN
        other: dict[int, str] = {}
    elif flavour == "tgtd":
        if os.geteuid() != 0:
            pytest.skip("--iscsi-target=tgtd needs root")
        if block_length != 512:
            pytest.skip("the tgtd harness serves 512-byte blocks only")
        require_tools("tgtd", "tgtadm")
        backing: list[Path] = []
        if ram_size is not None:
            shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
            ram_path = shm / f"emuhba-pytest-{os.getpid()}-{port}.img"
            with ram_path.open("wb") as f:
                f.truncate(ram_size)
            backing.append(ram_path)
            disks.append(DiskLun(len(backing), "ram", ram_size, ram_path))
        if file_path is not None:
            backing.append(file_path)
            size = file_size if file_size is not None else file_path.stat().st_size
            disks.append(DiskLun(len(backing), "file", size, file_path))
        digest_value = "CRC32C" if header_digest == "required" else "None,CRC32C"
        server = bench.TgtdServer(host, port, backing, log_path, header_digest=digest_value)
        iqn = server.iqn
        other = {0: "STORAGE_ARRAY_CONTROLLER"}
    else:
        raise ValueError(flavour)

    def remove_shm_backing() -> None:
        for disk in disks:
            if flavour == "tgtd" and disk.kind == "ram" and disk.path is not None:
                disk.path.unlink(missing_ok=True)

    try:
        server.start()
    except Exception as exc:
        remove_shm_backing()
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        pytest.fail(f"{flavour} did not start: {exc}\n--- log ---\n{text}", pytrace=False)
    target = RunningTarget(
        flavour, host, port, iqn, tuple(disks), server, log_path, header_digest, block_length, other
    )
    try:
        yield target
    finally:
        if flavour == "emuhba":
            code = server.stop(timeout=5.0)
            if code != 0:
                pytest.fail(
                    "emuhba serve did not exit 0 within 5 s of SIGTERM "
                    f"(exit code {code}; None = killed)\n--- log tail ---\n{target.log_tail()}",
                    pytrace=False,
                )
        else:
            server.stop()
            remove_shm_backing()


@pytest.fixture(scope="session")
def target_flavour(request: pytest.FixtureRequest) -> str:
    flavour: str = request.config.getoption("--iscsi-target")
    return flavour


@pytest.fixture(scope="session")
def _session_target(
    target_flavour: str, tmp_path_factory: pytest.TempPathFactory
) -> Generator[RunningTarget, None, None]:
    with launch_target(target_flavour, tmp_path_factory.mktemp("target")) as target:
        yield target


@pytest.fixture(scope="session")
def _session_digest_target(
    target_flavour: str, tmp_path_factory: pytest.TempPathFactory
) -> Generator[RunningTarget, None, None]:
    # iscsi-test-cu always offers "HeaderDigest=None,CRC32C" (it overrides a ?header_digest=
    # URL argument), and a conforming target picks None from that list; a target that insists
    # on CRC32C is the way to run the same test families with header digests on.
    with launch_target(
        target_flavour, tmp_path_factory.mktemp("digest-target"), header_digest="required"
    ) as target:
        yield target


def _checked(target: RunningTarget) -> Generator[RunningTarget, None, None]:
    if not target.alive():
        pytest.fail(f"{target.flavour} is not running\n{target.log_tail()}", pytrace=False)
    yield target
    if not target.alive():
        pytest.fail(f"{target.flavour} died during the test\n{target.log_tail()}", pytrace=False)


@pytest.fixture
def iscsi_target(_session_target: RunningTarget) -> Generator[RunningTarget, None, None]:
    """The shared target (header digest optional); checked alive before and after each test."""
    yield from _checked(_session_target)


@pytest.fixture
def digest_target(_session_digest_target: RunningTarget) -> Generator[RunningTarget, None, None]:
    """A second shared target that requires CRC32C header digests."""
    yield from _checked(_session_digest_target)


@pytest.fixture(params=["digest-optional", "digest-required"])
def any_target(request: pytest.FixtureRequest) -> RunningTarget:
    """Each of the two shared targets in turn (the default one, then the CRC32C-only one)."""
    name = "iscsi_target" if request.param == "digest-optional" else "digest_target"
    target: RunningTarget = request.getfixturevalue(name)
    return target


@pytest.fixture
def libiscsi_tools() -> None:
    require_tools(*LIBISCSI_TOOLS)


@pytest.fixture
def libiscsi_library() -> None:
    require_libiscsi()


@pytest.fixture
def free_tcp_port() -> int:
    port: int = load_bench().free_tcp_port("127.0.0.1")
    return port


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        targets = {id(v): v for v in funcargs.values() if isinstance(v, RunningTarget)}
        for value in targets.values():
            report.sections.append(
                (f"{value.flavour} log ({value.log_path}), last lines", value.log_tail())
            )
    return report


CU_RESULTS_KEY = pytest.StashKey[list[tuple[str, str]]]()


def record_summary(config: pytest.Config, name: str, line: str) -> None:
    """Lines for the end-of-run summary (iscsi-test-cu counts, iscsi-perf IOPS)."""
    config.stash.setdefault(CU_RESULTS_KEY, []).append((name, line))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(CU_RESULTS_KEY, [])
    if not lines:
        return
    terminalreporter.section("libiscsi results")
    width = max(len(name) for name, _ in lines)
    for name, line in lines:
        terminalreporter.write_line(f"{name.ljust(width)}  {line}")
