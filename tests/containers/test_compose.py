"""docker/compose.yaml end to end, and the target image's handling of `docker stop`.

The compose project runs the target image (a RAM LUN and a file LUN on a volume) and the
initiator image, which runs iscsi-ls, iscsi-inq, iscsi-perf and iscsi-test-cu families against
it over the project's private network and writes each tool's output to a results directory
bind-mounted from here. The tests read those outputs rather than trusting the initiator's own
verdict, so a broken entry script cannot pass them.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FILE_LUN_SIZE, RAM_LUN_SIZE, load_bench, record_summary
from tests.containers.conftest import Images, compose_command
from tests.containers.docker_env import Docker, run
from tests.integration.test_iscsi_test_cu import parse_cu_output
from tests.integration.test_libiscsi_tools import iscsi_ls_size, parse_fields

pytestmark = pytest.mark.containers

TARGET_IQN = "iqn.2026-11.io.emuhba:target0"
FAMILIES = (
    "Inquiry",
    "TestUnitReady",
    "ReadCapacity10",
    "ReadCapacity16",
    "Read10",
    "Read16",
    "Write10",
    "Write16",
    "iSCSIcmdsn",
    "iSCSIResiduals",
)
FILE_FAMILIES = ("Read16", "Write16")  # on LUN 1, the file LUN
PERF_SECONDS = 3
UP_TIMEOUT = 900.0
# Docker's default grace period; a target still running after it is SIGKILLed (exit 137).
STOP_TIMEOUT = 10
# A clean stop takes well under a second; this leaves room for a slow machine while still
# failing a target that ignores SIGTERM and waits out the grace period.
CLEAN_STOP_SECONDS = 5.0


@dataclass(frozen=True)
class ComposeRun:
    exit_code: int
    output: str  # compose's own output: both containers' logs, interleaved
    log_path: Path  # the same, kept on disk
    results: Path
    target_exit_code: int
    target_restarts: int  # compose.yaml restarts the target if it dies: a crash must not hide
    target_log: str
    seconds: float

    def tail(self, chars: int = 6000) -> str:
        return f"compose output ({self.log_path}), last part:\n{self.output[-chars:]}"

    def result(self, step: str) -> str:
        path = self.results / f"{step}.out"
        assert path.exists(), f"the initiator wrote no {path.name}\n{self.tail()}"
        return path.read_text(errors="backslashreplace")

    def summary(self) -> dict[str, tuple[int, str]]:
        """summary.tsv: step -> (exit code, PASS/FAIL), in the order the steps ran."""
        path = self.results / "summary.tsv"
        assert path.exists(), f"the initiator wrote no summary.tsv\n{self.tail()}"
        steps: dict[str, tuple[int, str]] = {}
        for line in path.read_text().splitlines():
            name, code, verdict = line.split("\t")
            steps[name] = (int(code), verdict)
        return steps


def project_container(docker: Docker, project: str, service: str) -> str:
    # Labels rather than `compose ps`: v1 and v2 differ on listing stopped containers.
    done = docker(
        "ps",
        "-a",
        "-q",
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--filter",
        f"label=com.docker.compose.service={service}",
    )
    ids = done.stdout.split()
    assert len(ids) == 1, f"{project}: {service} containers {ids}"
    return ids[0]


@pytest.fixture(scope="module")
def compose_run(
    docker: Docker,
    images: Images,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Generator[ComposeRun, None, None]:
    results = tmp_path_factory.mktemp("initiator-results")
    up_log = tmp_path_factory.mktemp("compose") / "up.log"
    # A project of our own: its containers, network and volumes cannot collide with another
    # run's, and `down -v` removes exactly them.
    project = f"emuhba-test-{os.getpid()}-{secrets.token_hex(3)}"
    env = dict(
        images.env,
        # The initiator reaches the target by its service name; that is also the address the
        # target must give in SendTargets answers (iscsi-ls logs in to what discovery returns).
        EMUHBA_ADVERTISE="target:3260",
        # Published on an ephemeral loopback port: a host port 3260 in use must not matter.
        EMUHBA_PUBLISH="127.0.0.1::3260",
        EMUHBA_RAM_LUN=str(RAM_LUN_SIZE),
        EMUHBA_FILE_LUN=str(FILE_LUN_SIZE),
        EMUHBA_RESULTS=str(results),
        EMUHBA_INITIATOR_USER=f"{os.getuid()}:{os.getgid()}",
        EMUHBA_CU_FAMILIES=" ".join(FAMILIES),
        EMUHBA_CU_FILE_FAMILIES=" ".join(FILE_FAMILIES),
        EMUHBA_PERF_SECONDS=str(PERF_SECONDS),
    )
    try:
        started = time.monotonic()
        up = run(
            compose_command(
                docker,
                project,
                "up",
                "--no-build",
                "--exit-code-from",
                "initiator",
                "--abort-on-container-exit",
            ),
            timeout=UP_TIMEOUT,
            env=env,
            check=False,
        )
        seconds = time.monotonic() - started
        up_log.write_text(up.stdout + up.stderr)
        target = project_container(docker, project, "target")
        state = docker(
            "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}} {{.RestartCount}}", target
        )
        running, code, restarts = state.stdout.split()
        assert running == "false", f"compose left the target running\n{up.stdout[-3000:]}"
        logs = docker("logs", target)
        record_summary(request.config, "compose up", f"initiator done in {seconds:.1f} s")
        yield ComposeRun(
            up.returncode,
            up.stdout + up.stderr,
            up_log,
            results,
            int(code),
            int(restarts),
            logs.stdout + logs.stderr,
            seconds,
        )
    finally:
        down = run(
            compose_command(docker, project, "down", "-v", "--remove-orphans", "-t", "10"),
            timeout=300,
            env=env,
            check=False,
        )
        leftovers = docker(
            "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}"
        ).stdout.split()
        assert down.returncode == 0 and not leftovers, (
            f"compose down failed (exit {down.returncode}, containers left {leftovers}):\n"
            f"{down.stdout}{down.stderr}"
        )


def expected_steps() -> list[str]:
    steps = ["iscsi-ls", "iscsi-inq", "iscsi-perf"]
    steps += [f"iscsi-test-cu-{family}" for family in FAMILIES]
    steps += [f"iscsi-test-cu-{family}-lun1" for family in FILE_FAMILIES]
    return steps


def test_initiator_ran_every_step_and_exited_zero(compose_run: ComposeRun) -> None:
    steps = compose_run.summary()
    assert list(steps) == expected_steps(), compose_run.tail()
    failed = {name: code for name, (code, verdict) in steps.items() if verdict != "PASS"}
    assert not failed, f"failed steps (exit codes): {failed}\n{compose_run.tail()}"
    assert (compose_run.results / "done").read_text().strip() == "PASS"
    # --exit-code-from: compose's status is the initiator's.
    assert compose_run.exit_code == 0, compose_run.tail()


_LS_TARGET = re.compile(r"^Target:(\S+) Portal:(\S+)$", re.MULTILINE)
_LS_LUN = re.compile(r"^Lun:(\d+)\s+Type:(\S+) \(Size:(\S+)\)", re.MULTILINE)


def test_iscsi_ls_lists_both_luns_with_their_sizes(compose_run: ComposeRun) -> None:
    out = compose_run.result("iscsi-ls")
    assert _LS_TARGET.findall(out) == [(TARGET_IQN, "target:3260,1")], out
    luns = {int(lun): (kind, size) for lun, kind, size in _LS_LUN.findall(out)}
    assert luns == {
        0: ("DIRECT_ACCESS", iscsi_ls_size(RAM_LUN_SIZE, 512)),
        1: ("DIRECT_ACCESS", iscsi_ls_size(FILE_LUN_SIZE, 512)),
    }, out


def test_iscsi_inq_identifies_the_ram_disk(compose_run: ComposeRun) -> None:
    fields = parse_fields(compose_run.result("iscsi-inq"))
    assert fields["Peripheral Device Type"] == ["DIRECT_ACCESS"], fields
    assert fields["Vendor"] == ["EMUHBA"], fields
    assert fields["Product"] == ["RAMDISK"], fields


def test_iscsi_perf_ran_without_errors(
    compose_run: ComposeRun, request: pytest.FixtureRequest
) -> None:
    text = compose_run.result("iscsi-perf").replace("\r", "\n")
    iops: int = load_bench().parse_iscsi_perf(text)  # raises on any failed command
    assert iops > 0, text[-2000:]
    record_summary(request.config, "iscsi-perf in compose", f"{iops} IOPS, 4k random read qd32")


@pytest.mark.parametrize(
    ("family", "step"),
    [(f, f"iscsi-test-cu-{f}") for f in FAMILIES]
    + [(f, f"iscsi-test-cu-{f}-lun1") for f in FILE_FAMILIES],
    ids=[*FAMILIES, *(f"{f}-file-lun" for f in FILE_FAMILIES)],
)
def test_iscsi_test_cu_family(
    compose_run: ComposeRun, request: pytest.FixtureRequest, family: str, step: str
) -> None:
    out = compose_run.result(step)
    summary = parse_cu_output(out)
    record_summary(
        request.config,
        f"compose {step}",
        f"ran {summary.ran}/{summary.total}, passed {summary.passed}, failed {summary.failed}",
    )
    assert summary.ran > 0 and summary.ran == summary.total, out[-4000:]
    assert summary.failed == 0, f"{family}: failed {', '.join(summary.failed_tests)}\n{out[-8000:]}"


def test_compose_stopped_the_target_cleanly(compose_run: ComposeRun) -> None:
    # --abort-on-container-exit stops the target with SIGTERM; 137 would mean it was killed.
    assert compose_run.target_exit_code == 0, compose_run.target_log[-4000:]
    assert compose_run.target_restarts == 0, compose_run.target_log[-4000:]
    assert re.search(r"\]\s+stopped\b", compose_run.target_log), compose_run.target_log[-4000:]


def wait_for_log(docker: Docker, container: str, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        logs = docker("logs", container)
        text = logs.stdout + logs.stderr
        if re.search(pattern, text):
            return text
        running = docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
        if running != "true" or time.monotonic() > deadline:
            raise AssertionError(f"{container}: no {pattern!r} (running: {running})\n{text}")
        time.sleep(0.2)


def test_docker_stop_exits_zero_promptly(docker: Docker, images: Images) -> None:
    """`docker run` with no --init: emuhba is PID 1 and must act on SIGTERM itself."""
    name = f"emuhba-stop-{os.getpid()}-{secrets.token_hex(3)}"
    docker(
        "run", "-d", "--name", name, images.target, "--portal", "0.0.0.0:3260", "--ram-lun", "16M"
    )
    try:
        wait_for_log(docker, name, r"\]\s+listening\b", timeout=30)
        started = time.monotonic()
        docker("stop", "-t", str(STOP_TIMEOUT), name, timeout=STOP_TIMEOUT + 60)
        elapsed = time.monotonic() - started
        state = docker("inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", name).stdout
        logs = docker("logs", name)
        text = logs.stdout + logs.stderr
        assert state.split() == ["0", "false"], f"exit code, OOM-killed: {state}\n{text}"
        assert elapsed < CLEAN_STOP_SECONDS, f"docker stop took {elapsed:.1f} s\n{text}"
        assert re.search(r"\]\s+stopping\b", text) and re.search(r"\]\s+stopped\b", text), text
    finally:
        docker("rm", "-f", "-v", name, check=False)
