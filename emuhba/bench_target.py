"""`emuhba bench target`: emuhba next to tgtd (the C user-space target in Debian's `tgt`), on the
same machine, same clients, same run.

Both targets run for the whole benchmark, each on its own loopback port. The cases run one at a
time, alternating between the targets (which goes first flips every round), for several rounds;
each figure is the median over the rounds with its min-max. Reads are driven by libiscsi's
iscsi-perf, writes by `qemu-img bench -w` over `iscsi://` (qemu's libiscsi block driver). While a
case runs, each target's CPU time (utime + stime from /proc) and resident set are sampled, so the
table also gives CPU seconds per 1,000 I/Os and the peak RSS.

tgtd has no RAM store: its LUNs are files in /dev/shm, the closest thing (emuhba's file-LUN case
also uses a /dev/shm file, so both sides then do the same). libiscsi implements header digests
but not data digests, so the digest case measures CRC32C header digests (both targets require
them).

The process helpers (`EmuhbaServer`, `TgtdServer`, `run_iscsi_perf`, ...) are also used by the
integration tests (tests/conftest.py imports this module), so the harness the tests validate is
the one the benchmark runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self

EMUHBA_IQN = "iqn.2026-11.io.emuhba:target0"
TGTD_IQN = "iqn.2026-11.io.emuhba:tgtd-baseline"
BENCH_INITIATOR = "iqn.2026-11.io.emuhba:bench"

_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64M' -> 67108864; binary units, like the `emuhba serve` size arguments."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (expected e.g. 4096, 64M, 1G)")
    return int(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()]


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_portal(
    host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float
) -> None:
    """Block until something accepts TCP on host:port; fail early if `proc` dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listening on {host}:{port} after {timeout:.0f} s"
                ) from None
            time.sleep(0.05)


def stop_process(
    proc: subprocess.Popen[bytes], timeout: float, sig: int = signal.SIGTERM
) -> int | None:
    """Signal `proc`, wait up to `timeout`; returns its exit code, or None if it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@dataclass(frozen=True)
class Portal:
    """Where a LUN is reachable, in the terms libiscsi URLs use."""

    host: str
    port: int
    iqn: str
    lun: int

    def url(self, lun: int | None = None, query: str = "") -> str:
        lun = self.lun if lun is None else lun
        suffix = f"?{query}" if query else ""
        return f"iscsi://{self.host}:{self.port}/{self.iqn}/{lun}{suffix}"

    @property
    def portal_url(self) -> str:
        return f"iscsi://{self.host}:{self.port}"


class _TargetProcess:
    """What both target processes share: a log file, and start/stop as a context manager."""

    log_path: Path

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 10.0) -> object:
        raise NotImplementedError

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmuhbaServer(_TargetProcess):
    """`emuhba serve` (or any command given) as a child process with its output in a log file."""

    def __init__(
        self,
        command: Sequence[str],
        host: str,
        port: int,
        log_path: Path,
        ready_timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = list(command)
        self.host = host
        self.port = port
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        # A session of its own: a Ctrl-C at the terminal reaches only us, and we stop it in order.
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env,
        )
        try:
            wait_for_portal(self.host, self.port, self.proc, self.ready_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        code: int | None = None
        if self.proc is not None:
            code = stop_process(self.proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def emuhba_command(
    host: str, port: int, luns: Sequence[str], python: str = sys.executable
) -> list[str]:
    """The `emuhba serve` command line; `luns` are already-spelled options like '--ram-lun', '1G'."""
    return [python, "-m", "emuhba", "serve", "--portal", f"{host}:{port}", *luns]


TGTD_SOCKET_DIR = Path("/run/tgtd") if Path("/run/tgtd").is_dir() else Path("/var/run/tgtd")


class TgtdServer(_TargetProcess):
    """A private tgtd: its own portal and its own management port (-C), so a system tgtd or a
    second copy of this one is left alone. Needs root. LUN n+1 is backed by `backing[n]`; tgtd
    itself puts a controller at LUN 0."""

    def __init__(
        self,
        host: str,
        port: int,
        backing: Sequence[Path],
        log_path: Path,
        iqn: str = TGTD_IQN,
        header_digest: str = "None,CRC32C",
    ) -> None:
        self.host = host
        self.port = port
        self.backing = list(backing)
        self.log_path = log_path
        self.iqn = iqn
        self.header_digest = header_digest
        self.control_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @staticmethod
    def _pick_control_port() -> int:
        rng = random.SystemRandom()
        for _ in range(100):
            candidate = rng.randrange(1000, 32768)  # tgtd rejects -C above 32767
            if not (TGTD_SOCKET_DIR / f"socket.{candidate}").exists():
                return candidate
        raise RuntimeError(f"no free tgtd control port in {TGTD_SOCKET_DIR}")

    def tgtadm(self, *args: str) -> str:
        cmd = ["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout

    def start(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError(
                "tgtd needs root (it locks its management socket under /run/tgtd)"
            )
        self.control_port = self._pick_control_port()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                "tgtd",
                "-f",
                "-C",
                str(self.control_port),
                "--iscsi",
                f"portal={self.host}:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_portal(self.host, self.port, self.proc, 15.0)
            self._wait_for_management()
            self.tgtadm("--mode", "target", "--op", "new", "--tid", "1", "--targetname", self.iqn)
            for index, path in enumerate(self.backing):
                self.tgtadm(
                    "--mode",
                    "logicalunit",
                    "--op",
                    "new",
                    "--tid",
                    "1",
                    "--lun",
                    str(index + 1),
                    "--backing-store",
                    str(path),
                )
            # tgtd only allows None unless told otherwise; the digest tests need CRC32C too.
            self.tgtadm(
                "--mode",
                "target",
                "--op",
                "update",
                "--tid",
                "1",
                "--name",
                "HeaderDigest",
                "--value",
                self.header_digest,
            )
            self.tgtadm(
                "--mode", "target", "--op", "bind", "--tid", "1", "--initiator-address", "ALL"
            )
        except BaseException:
            self.stop()
            raise

    def _wait_for_management(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.tgtadm("--mode", "target", "--op", "show")
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # tgtd ignores SIGTERM while it has targets; the orderly way out is through tgtadm.
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.tgtadm("--mode", "target", "--op", "delete", "--force", "--tid", "1")
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                subprocess.run(
                    ["tgtadm", "-C", str(self.control_port), "--mode", "system", "--op", "delete"],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.control_port:
            for name in (f"socket.{self.control_port}", f"socket.{self.control_port}.lock"):
                with contextlib.suppress(OSError):
                    (TGTD_SOCKET_DIR / name).unlink()
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass(frozen=True)
class Capacity:
    block_length: int
    blocks: int

    @property
    def size(self) -> int:
        return self.block_length * self.blocks


_RC16_FIELDS = {
    "lba": re.compile(r"^RETURNED LOGICAL BLOCK ADDRESS:(\d+)\s*$", re.MULTILINE),
    "block_length": re.compile(r"^LOGICAL BLOCK LENGTH IN BYTES:(\d+)\s*$", re.MULTILINE),
    "total": re.compile(r"^Total size:(\d+)\s*$", re.MULTILINE),
}


def parse_readcapacity16(output: str) -> Capacity:
    """Parse `iscsi-readcapacity16` output; insists the tool's own total agrees with LBA x length."""
    values: dict[str, int] = {}
    for key, pattern in _RC16_FIELDS.items():
        match = pattern.search(output)
        if match is None:
            raise ValueError(f"iscsi-readcapacity16 output has no {key!r} line:\n{output}")
        values[key] = int(match.group(1))
    capacity = Capacity(values["block_length"], values["lba"] + 1)
    if capacity.size != values["total"]:
        raise ValueError(f"inconsistent READ CAPACITY(16): {capacity} vs total {values['total']}")
    return capacity


def wait_for_capacity(url: str, timeout: float = 30.0) -> Capacity:
    """READ CAPACITY until the LUN answers: a portal may accept TCP before its LUNs exist."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read_capacity(url)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_capacity(url: str, initiator: str = BENCH_INITIATOR) -> Capacity:
    done = subprocess.run(
        ["iscsi-readcapacity16", "-i", initiator, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"iscsi-readcapacity16 {url} failed ({done.returncode}): {done.stderr}")
    return parse_readcapacity16(done.stdout)


@dataclass(frozen=True)
class Workload:
    name: str
    transfer_bytes: int
    queue_depth: int
    random: bool


WORKLOADS = (
    Workload("4k-randread-qd1", 4096, 1, True),
    Workload("4k-randread-qd32", 4096, 32, True),
    Workload("256k-seqread-qd32", 256 * 1024, 32, False),
)


@dataclass
class PerfResult:
    iops: int
    transfer_bytes: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.iops * self.transfer_bytes / float(1 << 20)


# iscsi-perf redraws a progress line with \r; the last "iops average" is the whole-run figure.
_PERF_AVERAGE = re.compile(r"iops average (\d+) \((\d+) MB/s\)")


def parse_iscsi_perf(output: str) -> int:
    """Average IOPS from iscsi-perf output; raises if the run reports any failed command."""
    if "failed" in output.lower() or "ABORTED" in output:
        raise RuntimeError(f"iscsi-perf reported an error:\n{output[-2000:]}")
    averages = _PERF_AVERAGE.findall(output)
    if not averages or "finished." not in output:
        raise RuntimeError(f"iscsi-perf did not finish a run:\n{output[-2000:]}")
    return int(averages[-1][0])


def iscsi_perf_command(
    url: str, workload: Workload, seconds: int, block_length: int, initiator: str = BENCH_INITIATOR
) -> list[str]:
    if workload.transfer_bytes % block_length:
        raise ValueError(
            f"{workload.name}: {workload.transfer_bytes} B is not whole {block_length} B blocks"
        )
    cmd = [
        "iscsi-perf",
        "-i",
        initiator,
        "-t",
        str(seconds),
        "-m",
        str(workload.queue_depth),
        "-b",
        str(workload.transfer_bytes // block_length),
    ]
    if workload.random:
        cmd.append("-r")
    cmd.append(url)
    return cmd


def run_iscsi_perf(
    url: str, workload: Workload, seconds: int, block_length: int, initiator: str = BENCH_INITIATOR
) -> PerfResult:
    cmd = iscsi_perf_command(url, workload, seconds, block_length, initiator)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # -t ends the run by itself; the margin covers login and a slow drain of the queue.
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # iscsi-perf prints its average and exits on SIGINT
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        raise RuntimeError(
            f"iscsi-perf hung past {seconds + 30} s: {shlex.join(cmd)}\n"
            f"{out.decode(errors='replace')[-2000:]}"
        ) from None
    except BaseException:
        # Interrupted: do not leave it hammering (or reconnecting to) a target being torn down.
        proc.kill()
        proc.wait()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{text[-2000:]}")
    return PerfResult(parse_iscsi_perf(text), workload.transfer_bytes, time.monotonic() - started)


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One measurement: who drives it, what it asks, against which LUN."""

    name: str
    transfer_bytes: int
    queue_depth: int
    random: bool = True
    write: bool = False
    sessions: int = 1
    digest: bool = False
    lun: str = "ram"  # "ram" or "file"

    @property
    def tool(self) -> str:
        return "qemu-img" if self.write else "iscsi-perf"


CASES = (
    Case("4k-randread-qd1", 4096, 1),
    Case("4k-randread-qd32", 4096, 32),
    Case("4k-randread-qd128", 4096, 128),
    Case("64k-seqread-qd32", 64 * 1024, 32, random=False),
    Case("256k-seqread-qd32", 256 * 1024, 32, random=False),
    Case("4k-randwrite-qd32", 4096, 32, write=True),
    Case("256k-seqwrite-qd32", 256 * 1024, 32, random=False, write=True),
    Case("4k-randread-qd32-crc32c", 4096, 32, digest=True),
    Case("4k-randread-16x-qd32", 4096, 32, sessions=16),
    Case("4k-randread-qd32-file", 4096, 32, lun="file"),
)
TARGET_NAMES = ("emuhba", "tgtd")


@dataclass
class Sample:
    """One run of one case on one target."""

    iops: float
    seconds: float
    cpu_seconds: float
    peak_rss_kib: int
    # Peak RSS less the resident pages of the target's RAM LUN stores (the goal's measure).
    peak_rss_beyond_luns_kib: int = 0


@dataclass
class CaseResult:
    case: Case
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def median_iops(self, name: str) -> float | None:
        runs = self.samples.get(name)
        return statistics.median(s.iops for s in runs) if runs else None

    def ratio(self) -> float | None:
        top, bottom = self.median_iops("emuhba"), self.median_iops("tgtd")
        if top is None or not bottom:
            return None
        return top / bottom

    def summary(self, name: str) -> dict[str, float] | None:
        runs = self.samples.get(name)
        if not runs:
            return None
        iops = [s.iops for s in runs]
        ios = sum(s.iops * s.seconds for s in runs)
        median = statistics.median(iops)
        return {
            "iops": round(median, 1),
            "iops_min": round(min(iops), 1),
            "iops_max": round(max(iops), 1),
            "mib_per_s": round(median * self.case.transfer_bytes / (1 << 20), 1),
            "cpu_s_per_1k_io": round(1000 * sum(s.cpu_seconds for s in runs) / ios, 4)
            if ios else 0.0,
            "peak_rss_mib": round(max(s.peak_rss_kib for s in runs) / 1024, 1),
            "peak_rss_beyond_luns_mib": round(
                max(s.peak_rss_beyond_luns_kib for s in runs) / 1024, 1),
        }


# ----------------------------------------------------------------------------- process probes

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields after it are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def lun_resident_kib(pid: int, lun_bytes: int) -> int:
    """Resident KiB of the process's anonymous mappings exactly ``lun_bytes`` long: an emuhba
    RAM LUN is one such mapping (tgtd has none; its /dev/shm files are page cache)."""
    total = 0
    counting = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef":  # a mapping's header; field lines start A-Z
                fields = line.split()
                start, _, end = fields[0].partition("-")
                counting = len(fields) < 6 and int(end, 16) - int(start, 16) == lun_bytes
            elif counting and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


class Probe:
    """CPU time over a run and the peak RSS sampled during it, for one process; with
    ``lun_bytes``, also the peak of RSS less the RAM LUNs' resident pages (read every 0.5 s:
    walking a 1 GiB mapping's pages is not free)."""

    def __init__(self, pid: int | None, interval: float = 0.1, lun_bytes: int = 0) -> None:
        self.pid = pid
        self.interval = interval
        self.lun_bytes = lun_bytes
        self.peak = 0
        self.peak_beyond_luns = 0
        self._cpu0 = 0.0
        self.cpu = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Probe:
        if self.pid is not None:
            self._cpu0 = cpu_seconds(self.pid)
            self.peak = rss_kib(self.pid)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        assert self.pid is not None
        ticks = 0
        while not self._stop.wait(self.interval):
            ticks += 1
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_kib(self.pid))
                if ticks % 5 == 0:
                    self._sample_beyond_luns()

    def _sample_beyond_luns(self) -> None:
        assert self.pid is not None
        rss = rss_kib(self.pid)
        luns = lun_resident_kib(self.pid, self.lun_bytes) if self.lun_bytes else 0
        # This reading counts for the peak too: RSS may have grown since the last sample, and
        # the peak beyond the LUNs must never exceed the peak itself.
        self.peak = max(self.peak, rss)
        self.peak_beyond_luns = max(self.peak_beyond_luns, rss - luns)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.pid is not None:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_kib(self.pid))
                self._sample_beyond_luns()
                self.cpu = cpu_seconds(self.pid) - self._cpu0


# ----------------------------------------------------------------------------- the drivers


def qemu_img_bench_command(url: str, case: Case, count: int) -> list[str]:
    """`qemu-img bench -w` over iscsi://. It has no random mode: the "random" write case strides
    by a large odd number of blocks, so consecutive writes land far apart across the LUN."""
    step = case.transfer_bytes * (257 if case.random else 1)
    return ["qemu-img", "bench", "-f", "raw", "-w", "-n", "-t", "none", "-c", str(count),
            "-d", str(case.queue_depth), "-s", str(case.transfer_bytes), "-S", str(step), url]


_QEMU_DONE = re.compile(r"Run completed in ([0-9.]+) seconds")


def run_qemu_img_bench(url: str, case: Case, count: int) -> tuple[int, float]:
    """(requests, seconds) of one `qemu-img bench` run."""
    cmd = qemu_img_bench_command(url, case, count)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    match = _QEMU_DONE.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"{shlex.join(cmd)} exited {done.returncode}:\n"
                           f"{(done.stdout + done.stderr)[-2000:]}")
    return count, float(match.group(1))


def run_case(case: Case, url: str, seconds: int, block_length: int, counts: dict[str, int],
             key: str) -> tuple[float, float]:
    """Run a case once against ``url``: (IOPS, seconds). ``counts`` remembers, per target, how
    many requests a qemu-img run needs to last about ``seconds``."""
    if case.write:
        count = counts.get(key)
        if count is None:  # calibrate: a short run tells the rate
            done, took = run_qemu_img_bench(url, case, 2000)
            count = max(2000, int(done / max(took, 1e-3) * seconds))
            counts[key] = count
        done, took = run_qemu_img_bench(url, case, count)
        return done / took, took
    workload = Workload(case.name, case.transfer_bytes, case.queue_depth, case.random)
    if case.sessions == 1:
        result = run_iscsi_perf(url, workload, seconds, block_length)
        return float(result.iops), result.seconds
    started = time.monotonic()
    procs = [subprocess.Popen(
        iscsi_perf_command(url, workload, seconds, block_length, f"{BENCH_INITIATOR}-{n}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for n in range(case.sessions)]
    total = 0
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            text = out.decode(errors="replace")
            if proc.returncode != 0:
                raise RuntimeError(f"iscsi-perf exited {proc.returncode}:\n{text[-2000:]}")
            total += parse_iscsi_perf(text)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return float(total), time.monotonic() - started


# ----------------------------------------------------------------------------- output


def _fmt_iops(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def format_results(results: Sequence[CaseResult]) -> str:
    """The table: per case and target the median IOPS (min-max), MiB/s, CPU seconds per 1,000
    I/Os, peak RSS; then the emuhba/tgtd ratio of the medians."""
    header = ["case"]
    for name in TARGET_NAMES:
        header += [f"{name} IOPS (min-max)", "MiB/s", "CPU s/1k", "RSS MiB", "-LUN"]
    header.append("emuhba/tgtd")
    lines = [header]
    for result in results:
        cells = [result.case.name]
        for name in TARGET_NAMES:
            summary = result.summary(name)
            if summary is None:
                cells += ["-", "-", "-", "-", "-"]
                continue
            cells += [f"{_fmt_iops(summary['iops'])} ({_fmt_iops(summary['iops_min'])}-"
                      f"{_fmt_iops(summary['iops_max'])})", f"{summary['mib_per_s']:.0f}",
                      f"{summary['cpu_s_per_1k_io']:.3f}", f"{summary['peak_rss_mib']:.0f}",
                      f"{summary['peak_rss_beyond_luns_mib']:.0f}"]
        ratio = result.ratio()
        cells.append("-" if ratio is None else f"{ratio:.2f}")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for n, row in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def results_json(results: Sequence[CaseResult], args: argparse.Namespace, size: int) -> str:
    payload = {
        "seconds": args.seconds,
        "rounds": args.rounds,
        "size": size,
        "cpus": os.cpu_count(),
        "cases": [
            {
                "case": asdict(result.case),
                "tool": result.case.tool,
                **{name: result.summary(name) for name in TARGET_NAMES},
                "runs": {name: [asdict(s) for s in runs] for name, runs in result.samples.items()},
                "ratio": _rounded(result.ratio()),
            }
            for result in results
        ],
    }
    return json.dumps(payload, indent=2) + "\n"


def plot_results(results: Sequence[CaseResult], path: Path) -> None:
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise SystemExit("--plot needs matplotlib, an optional extra: "
                         "pip install 'emuhba[plot]'") from None
    names = [r.case.name for r in results]
    ratios = [r.ratio() or 0.0 for r in results]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    bars = ax.barh(names, ratios, color=["#2a7" if x >= 1 else "#c44" for x in ratios])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.bar_label(bars, labels=[f"{x:.2f}" for x in ratios], padding=3)
    ax.invert_yaxis()
    ax.set_xlabel("emuhba / tgtd (median IOPS, same machine, same run)")
    ax.set_title("emuhba bench target")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def _require_tools(names: Sequence[str]) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)}; install with: apt-get install -y libiscsi-bin tgt "
            "qemu-utils qemu-block-extra"
        )


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=10, help="run time of each case (10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each case runs on each target; figures are medians (3)")
    parser.add_argument("--size", default="1G", help="LUN size on both targets (1G)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to serve on")
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES],
                        help="run only these cases (repeatable; default all)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="also draw the ratios (needs matplotlib: pip install -e '.[plot]')")
    parser.add_argument("--emuhba-cmd", metavar="TEMPLATE",
                        help="start this instead of `emuhba serve` on the left of the table; "
                             "{python} {host} {port} {size} {file} {digest} are filled in "
                             "(see bench/README.md)")
    parser.add_argument("--log-dir", type=Path, help="keep the targets' logs here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emuhba bench target",
        description="emuhba next to tgtd on this machine (run as root: tgtd needs it)")
    add_arguments(parser)
    return parser


@dataclass
class TargetUnderTest:
    name: str
    portal: Portal
    pid: int | None
    luns: dict[str, int]  # "ram"/"file" -> LUN
    block_length: int = 512

    def url(self, case: Case) -> str:
        return self.portal.url(self.luns[case.lun])


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    if os.geteuid() != 0:
        print("emuhba bench target: tgtd needs root (it locks its management socket under "
              "/run/tgtd); run this as root", file=sys.stderr)
        return 2
    cases = [c for c in CASES if not args.case or c.name in args.case]
    tools = ["iscsi-perf", "iscsi-readcapacity16", "tgtd", "tgtadm"]
    if any(c.write for c in cases):
        tools.append("qemu-img")
    _require_tools(tools)
    if args.seconds < 1 or args.rounds < 1:
        raise SystemExit("--seconds and --rounds must be at least 1")
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results = [CaseResult(c) for c in cases]
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emuhba-bench-")))
        log_dir = args.log_dir or workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
        backing = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="emuhba-bench-", dir=shm)))
        try:
            plain = _start_targets(args, size, stack, log_dir, backing, digest=False)
            digest = (_start_targets(args, size, stack, log_dir, backing, digest=True)
                      if any(c.digest for c in cases) else {})
            for group in (plain, digest):
                for target in group.values():
                    capacity = wait_for_capacity(target.portal.url(target.luns["ram"]))
                    target.block_length = capacity.block_length
            for name, target in plain.items():
                print(f"{name}: {target.portal.portal_url}/{target.portal.iqn} LUNs {target.luns}"
                      f", {size} bytes each", flush=True)
            counts: dict[str, int] = {}
            for round_ in range(args.rounds):
                order = TARGET_NAMES if round_ % 2 == 0 else TARGET_NAMES[::-1]
                for result in results:
                    case = result.case
                    for name in order:
                        target = (digest if case.digest else plain)[name]
                        print(f"round {round_ + 1}/{args.rounds}: {case.name} on {name} ...",
                              end=" ", flush=True)
                        with Probe(target.pid, lun_bytes=size) as probe:
                            iops, took = run_case(case, target.url(case), args.seconds,
                                                  target.block_length, counts,
                                                  f"{name}/{case.name}")
                        result.samples.setdefault(name, []).append(
                            Sample(iops, took, probe.cpu, probe.peak,
                                   probe.peak_beyond_luns))
                        print(f"{_fmt_iops(iops)} IOPS", flush=True)
        except KeyboardInterrupt:
            print("\ninterrupted; stopping the targets", file=sys.stderr)
            return 130
        finally:
            if args.log_dir:
                print(f"target logs are in {log_dir}", file=sys.stderr)
    print()
    print(format_results(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(results_json(results, args, size))
        print(f"\nwrote {args.json}")
    if args.plot is not None:
        plot_results(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _start_targets(args: argparse.Namespace, size: int, stack: contextlib.ExitStack,
                   log_dir: Path, backing: Path, *, digest: bool) -> dict[str, TargetUnderTest]:
    """emuhba (LUN 0 RAM, LUN 1 a /dev/shm file) and tgtd (LUNs 1 and 2, /dev/shm files); with
    ``digest`` both require CRC32C header digests."""
    host: str = args.host
    tag = "-crc32c" if digest else ""
    files = []
    for who in ("emuhba-file", "tgtd-ram", "tgtd-file"):
        path = backing / f"{who}{tag}.img"
        with path.open("wb") as f:
            f.truncate(size)
        files.append(path)
    port = free_tcp_port(host)
    policy = "required" if digest else "optional"
    if args.emuhba_cmd:
        command = shlex.split(args.emuhba_cmd.format(
            python=sys.executable, host=host, port=port, size=size, file=files[0],
            digest=policy))
    else:
        command = emuhba_command(host, port, ["--ram-lun", str(size), "--file-lun", str(files[0]),
                                              "--header-digest", policy, "--no-control",
                                              "--log-level", "warning"])
    emuhba = stack.enter_context(EmuhbaServer(command, host, port, log_dir / f"emuhba{tag}.log"))
    assert emuhba.proc is not None
    tgtd_port = free_tcp_port(host)
    tgtd = stack.enter_context(TgtdServer(host, tgtd_port, files[1:], log_dir / f"tgtd{tag}.log",
                                          header_digest="CRC32C" if digest else "None,CRC32C"))
    assert tgtd.proc is not None
    return {
        "emuhba": TargetUnderTest("emuhba", Portal(host, port, EMUHBA_IQN, 0), emuhba.proc.pid,
                                  {"ram": 0, "file": 1}),
        "tgtd": TargetUnderTest("tgtd", Portal(host, tgtd_port, tgtd.iqn, 1), tgtd.proc.pid,
                                {"ram": 1, "file": 2}),
    }


if __name__ == "__main__":
    sys.exit(main())
