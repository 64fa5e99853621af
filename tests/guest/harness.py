"""emuhba serve as the guest sees it, and the per-test harness tying it to a guest VM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.conftest import FILE_LUN_SIZE, LOG_TAIL_LINES, RAM_LUN_SIZE, DiskLun, load_bench
from tests.guest.image import GuestImage
from tests.guest.vm import HOST_FROM_GUEST, GuestVM

STOP_TIMEOUT_S = 5.0


class GuestTarget:
    """`emuhba serve` on a loopback port, advertising 10.0.2.2:PORT for the guest.

    Not tests.conftest.launch_target: --advertise needs the port before the server starts, and
    the restart scenario needs the same port and LUN files again after a SIGKILL.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        ram_size: int | None = RAM_LUN_SIZE,
        file_size: int | None = FILE_LUN_SIZE,
        extra_args: Sequence[str] = (),
        control: bool = False,
    ) -> None:
        bench = load_bench()
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port: int = bench.free_tcp_port(self.host)
        self.iqn: str = bench.EMUHBA_IQN
        self.log_path = workdir / f"emuhba-{self.port}.log"
        self.control_socket: Path | None = workdir / "control" / "emuhba.sock" if control else None
        disks: list[DiskLun] = []
        args: list[str] = []
        if ram_size is not None:
            args += ["--ram-lun", str(ram_size)]
            disks.append(DiskLun(len(disks), "ram", ram_size))
        if file_size is not None:
            path = workdir / "file-lun.img"
            with path.open("wb") as f:
                f.truncate(file_size)
            args += ["--file-lun", str(path)]
            disks.append(DiskLun(len(disks), "file", file_size, path))
        args += ["--advertise", f"{HOST_FROM_GUEST}:{self.port}", "--log-level", "info"]
        if self.control_socket is not None:
            args += ["--control-socket", str(self.control_socket)]
        self.disks = tuple(disks)
        self.server: Any = bench.EmuhbaServer(
            bench.emuhba_command(self.host, self.port, [*args, *extra_args]),
            self.host, self.port, self.log_path, ready_timeout=30.0,
        )
        self.stopped_code: int | None = None

    @property
    def guest_portal(self) -> str:
        return f"{HOST_FROM_GUEST}:{self.port}"

    def disk(self, kind: str) -> DiskLun:
        return next(d for d in self.disks if d.kind == kind)

    def start(self) -> None:
        self.server.start()

    def alive(self) -> bool:
        proc = self.server.proc
        return proc is not None and proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to close sessions or flush anything."""
        proc = self.server.proc
        assert proc is not None and proc.poll() is None, "emuhba is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.server.stop()  # closes the log file; the process is gone already

    def stop(self) -> int | None:
        """SIGTERM; the exit code (None: it had to be killed)."""
        code: int | None = self.server.stop(timeout=STOP_TIMEOUT_S)
        return code

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.control_socket is not None, "started without a control socket"
        return subprocess.run(
            [sys.executable, "-m", "emuhba", "ctl", "--socket", str(self.control_socket), *args],
            capture_output=True, text=True, timeout=30, check=False,
        )

    def ctl_json(self, *args: str) -> Any:
        done = self.ctl("--json", *args)
        assert done.returncode == 0, f"emuhba ctl {' '.join(args)}: {done.returncode}\n" \
                                     f"{done.stdout}{done.stderr}"
        return json.loads(done.stdout)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text: str = self.server.log_text()
        return "\n".join(text.splitlines()[-lines:])


class GuestHarness:
    """What one guest test uses: a VM and the targets it talks to, and their logs on failure."""

    def __init__(self, image: GuestImage, accel: str, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.vm = GuestVM(image, workdir / "vm", accel)
        self.targets: list[GuestTarget] = []

    def target(self, **kwargs: Any) -> GuestTarget:
        target = GuestTarget(self.workdir / f"target{len(self.targets)}", **kwargs)
        self.targets.append(target)
        target.start()
        return target

    def env(self, target: GuestTarget, replacement_timeout: int = 120) -> dict[str, str]:
        return {
            "PORTAL": target.guest_portal,
            "TARGET": target.iqn,
            # A fresh initiator name per test: the target sees each test's sessions apart.
            "INITIATOR": f"iqn.2026-11.io.emuhba:guest-{self.name}",
            "REPLACEMENT_TIMEOUT": str(replacement_timeout),
        }

    def diagnostics(self) -> list[tuple[str, str]]:
        sections = self.vm.diagnostics()
        for target in self.targets:
            sections.append((f"emuhba log ({target.log_path}), last lines", target.log_tail()))
        return sections

    def close(self) -> list[str]:
        """Stop everything; the problems found (an emuhba that did not exit 0 on SIGTERM)."""
        self.vm.kill()
        problems = []
        for target in self.targets:
            if target.alive():
                code = target.stop()
                if code != 0:
                    problems.append(
                        f"emuhba serve did not exit 0 within {STOP_TIMEOUT_S:.0f} s of SIGTERM "
                        f"(exit code {code}; None = killed)\n{target.log_tail()}"
                    )
        return problems
