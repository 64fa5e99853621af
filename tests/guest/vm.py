"""Boot the guest image in QEMU with one job, and collect what it left behind.

The host talks to the guest through a directory shared over virtio-9p (mount tag "job"):

    run.sh      the job, written by the test; `set -eux`, after sourcing lib.sh
    lib.sh      shell helpers (tests/guest/guest_lib.sh): iscsid, login, LUN lookup, fio
    env.sh      PORTAL, TARGET, INITIATOR, REPLACEMENT_TIMEOUT, ... for this run
    in/         files the host creates to answer the guest (`wait_host NAME`)
    out/        run.log, fio-*.json, dmesg.txt, status, mark-* (the guest's progress)

The job's exit status comes back as QEMU's exit code through isa-debug-exit ((status << 1) | 1).
The guest reaches the host's loopback as 10.0.2.2 (QEMU user networking).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.guest.image import GuestImage

HOST_FROM_GUEST = "10.0.2.2"
LIB = Path(__file__).resolve().parent / "guest_lib.sh"
QEMU = "qemu-system-x86_64"
KVM_PROBE_TIMEOUT_S = 30.0
TAIL_LINES = 60
# The job the accelerator probe and the image's boot check run: the tools the tests use must
# start, and the distinctive status proves the job itself ran and reported.
PROBE_STATUS = 42
PROBE_JOB = f"""
fio --version
iscsiadm --version
mkfs.ext4 -V
exit {PROBE_STATUS}
"""


@dataclass(frozen=True)
class GuestResult:
    status: int | None  # the job's exit status; None when the guest did not report one
    qemu_code: int | None
    elapsed_s: float
    timed_out: bool

    def describe(self) -> str:
        if self.timed_out:
            return f"guest killed after {self.elapsed_s:.0f} s (timeout)"
        if self.status is None:
            return f"guest reported no status (QEMU exited {self.qemu_code})"
        return f"job exited {self.status} after {self.elapsed_s:.1f} s"


def accel_args(accel: str) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    if accel == "tcg":
        # Two vCPUs on two host threads; `max` gives the guest SSE4.2 (crc32c-intel) and more.
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]
    raise ValueError(accel)


class GuestVM:
    """One boot of the guest image running one job."""

    def __init__(
        self,
        image: GuestImage,
        workdir: Path,
        accel: str,
        *,
        memory_mb: int = 1024,  # the initramfs (the whole userland, ~145 MiB) lives in RAM
        cpus: int = 2,
        kernel: Path | None = None,
    ) -> None:
        self.image = image
        self.workdir = workdir
        self.accel = accel
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.kernel = kernel or image.boot_kernel
        self.share = workdir / "share"
        self.out = self.share / "out"
        self.inbox = self.share / "in"
        self.console = workdir / "console.log"
        self.qemu_log = workdir / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.result: GuestResult | None = None
        self._started = 0.0

    def command(self) -> list[str]:
        append = "console=ttyS0 rdinit=/init panic=-1 mitigations=off"
        return [
            QEMU, *accel_args(self.accel),
            "-smp", str(self.cpus), "-m", str(self.memory_mb), "-M", "pc",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.console}",
            "-kernel", str(self.kernel), "-initrd", str(self.image.initrd), "-append", append,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0",
            "-virtfs", f"local,path={self.share},mount_tag=job,security_model=none,id=job",
        ]

    def start(self, job: str, env: Mapping[str, str] | None = None) -> None:
        """Write the job into a fresh share and boot; returns at once (see wait())."""
        shutil.rmtree(self.share, ignore_errors=True)
        self.out.mkdir(parents=True)
        self.inbox.mkdir()
        shutil.copyfile(LIB, self.share / "lib.sh")
        lines = [f"export {key}={shlex.quote(value)}" for key, value in (env or {}).items()]
        (self.share / "env.sh").write_text("\n".join(lines) + "\n")
        (self.share / "run.sh").write_text(f"set -eux\n. /job/lib.sh\n{job}")
        self.console.unlink(missing_ok=True)
        with self.qemu_log.open("wb") as log:
            self._started = time.monotonic()
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait(self, timeout: float) -> GuestResult:
        """Wait for the guest to power off; kill it after `timeout` seconds from its start."""
        assert self.proc is not None, "not started"
        remaining = max(0.0, self._started + timeout - time.monotonic())
        timed_out = False
        try:
            code: int | None = self.proc.wait(remaining)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
            code = None
        status = None
        # isa-debug-exit makes every reported status odd, but 1 is also QEMU's own error exit,
        # so the status the guest wrote into the share must agree with the exit code.
        if code is not None and code % 2 == 1:
            reported = self.reported_status()
            if reported == code >> 1:
                status = reported
        self.result = GuestResult(status, code, time.monotonic() - self._started, timed_out)
        return self.result

    def run(self, job: str, env: Mapping[str, str] | None = None,
            timeout: float = 300.0) -> GuestResult:
        self.start(job, env)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for_mark(self, name: str, timeout: float) -> float:
        """Block until the guest's job calls `mark NAME`; returns seconds since boot."""
        path = self.out / f"mark-{name}"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not self.alive():
                raise AssertionError(f"the guest stopped before mark {name!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no mark {name!r} from the guest within {timeout:.0f} s")
            time.sleep(0.05)
        return time.monotonic() - self._started

    def answer(self, name: str) -> None:
        """Let a guest blocked in `wait_host NAME` go on."""
        (self.inbox / name).write_text("")

    def reported_status(self) -> int | None:
        try:
            return int((self.out / "status").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def text(self, name: str) -> str:
        path = self.out / name
        return path.read_text(errors="replace") if path.exists() else ""

    def fio(self, name: str) -> dict[str, Any]:
        """fio's JSON for `fio_run NAME`. fio may print notices before the JSON itself."""
        text = self.text(f"fio-{name}.json")
        assert text, f"no fio output for {name}"
        data: dict[str, Any] = json.loads(text[text.index("{"):])
        return data

    def diagnostics(self) -> list[tuple[str, str]]:
        """Report sections for a failed test: how the guest ended and what it logged."""
        sections = []
        if self.result is not None:
            sections.append(("guest result", self.result.describe()))
        sections.append(("guest command", shlex.join(self.command())))
        for title, path in (("guest console", self.console), ("qemu output", self.qemu_log)):
            if path.exists():
                sections.append((f"{title} ({path}), last lines", _tail(path.read_text(
                    errors="replace"))))
        for name in ("run.log", "iscsid.log", "dmesg.txt"):
            text = self.text(name)
            if text:
                sections.append((f"guest {name}, last lines", _tail(text)))
        for path in sorted(self.out.glob("fio-*.json")):
            sections.append((f"guest {path.name}", _fio_summary(path)))
        return sections

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _fio_summary(path: Path) -> str:
    text = path.read_text(errors="replace")
    try:
        data = json.loads(text[text.index("{"):])
    except ValueError:
        return _tail(text)
    rows = []
    for job in data.get("jobs", []):
        rows.append(
            f"{job.get('jobname')}: error={job.get('error')} "
            f"read={job['read']['io_bytes']} B write={job['write']['io_bytes']} B "
            f"runtime={job.get('job_runtime')} ms "
            f"clat max read={job['read']['clat_ns']['max'] / 1e9:.2f} s "
            f"write={job['write']['clat_ns']['max'] / 1e9:.2f} s"
        )
    return "\n".join(rows) or _tail(text)


def boot_check(image: GuestImage, accel: str = "tcg", timeout: float = 180.0) -> str | None:
    """Boot `image` once with the probe job: None when it works, else what went wrong."""
    with tempfile.TemporaryDirectory(prefix="emuhba-guest-probe-") as tmp, \
            GuestVM(image, Path(tmp), accel) as vm:
        result = vm.run(PROBE_JOB, timeout=timeout)
        if result.status == PROBE_STATUS:
            return None
        details = "\n".join(f"--- {title}\n{text}" for title, text in vm.diagnostics())
        return f"{result.describe()}\n{details}"


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def choose_accel(image: GuestImage) -> tuple[str, str]:
    """The accelerator to boot with, and why.

    $EMUHBA_GUEST_ACCEL=kvm|tcg forces one. Otherwise KVM when a probe boot with it works: a
    /dev/kvm can exist and still not boot a stock kernel (a paravirtual KVM in a cloud VM fails
    at once or hangs), so its presence proves nothing. TCG always works, only slower.
    """
    forced = os.environ.get("EMUHBA_GUEST_ACCEL", "auto")
    if forced in ("kvm", "tcg"):
        return forced, f"EMUHBA_GUEST_ACCEL={forced}"
    if not kvm_usable():
        return "tcg", "no usable /dev/kvm"
    problem = boot_check(image, "kvm", KVM_PROBE_TIMEOUT_S)
    if problem is None:
        return "kvm", "a KVM probe boot worked"
    first = problem.splitlines()[0] if problem else ""
    return "tcg", f"a KVM probe boot failed ({first})"
