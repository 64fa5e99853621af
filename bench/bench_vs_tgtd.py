#!/usr/bin/env python3
"""Read throughput of emuhba next to tgtd, both measured with libiscsi's iscsi-perf.

Both targets run during the whole benchmark, each on its own loopback port; the workloads run one
at a time, alternating between the targets, so they never compete for the two cores of a CI box.
tgtd serves a file of the same size in /dev/shm, which is the closest thing it has to a RAM LUN.

iscsi-perf (libiscsi 1.19) only issues READ(16), so there are no write workloads.

The process helpers at the top (`EmuhbaServer`, `TgtdServer`, `run_iscsi_perf`, ...) are also used
by the integration tests (tests/conftest.py loads this file), so the harness the tests validate
is the one the benchmark runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

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


class EmuhbaServer:
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

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> EmuhbaServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def emuhba_command(
    host: str, port: int, luns: Sequence[str], python: str = sys.executable
) -> list[str]:
    """The `emuhba serve` command line; `luns` are already-spelled options like '--ram-lun', '1G'."""
    return [python, "-m", "emuhba", "serve", "--portal", f"{host}:{port}", *luns]


TGTD_SOCKET_DIR = Path("/run/tgtd") if Path("/run/tgtd").is_dir() else Path("/var/run/tgtd")


class TgtdServer:
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

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> TgtdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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


@dataclass
class Row:
    workload: str
    results: dict[str, PerfResult] = field(default_factory=dict)

    def ratio(self, numerator: str, denominator: str) -> float | None:
        top, bottom = self.results.get(numerator), self.results.get(denominator)
        if top is None or bottom is None or bottom.iops == 0:
            return None
        return top.iops / bottom.iops


def format_table(rows: Sequence[Row], names: Sequence[str]) -> str:
    header = ["workload"]
    for name in names:
        header += [f"{name} IOPS", f"{name} MiB/s"]
    header.append(f"{names[0]}/{names[1]}")
    lines = [header]
    for row in rows:
        cells = [row.workload]
        for name in names:
            result = row.results.get(name)
            cells += ["-", "-"] if result is None else [f"{result.iops}", f"{result.mib_per_s:.1f}"]
        ratio = row.ratio(names[0], names[1])
        cells.append("-" if ratio is None else f"{ratio:.2f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _require_tools(names: Sequence[str]) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)}; install with: apt-get install -y libiscsi-bin tgt"
        )


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="emuhba vs tgtd read throughput with iscsi-perf (run as root: tgtd needs it)"
    )
    parser.add_argument("--seconds", type=int, default=10, help="run time of each workload (10)")
    parser.add_argument("--size", default="1G", help="LUN size for both targets (1G)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to serve on")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--workload",
        action="append",
        choices=[w.name for w in WORKLOADS],
        help="run only these workloads (repeatable; default all)",
    )
    parser.add_argument(
        "--emuhba-cmd",
        metavar="TEMPLATE",
        help="command that starts the target on the left of the table instead of `emuhba serve`; "
        "{python} {host} {port} {size} are substituted (see bench/README.md)",
    )
    parser.add_argument(
        "--emuhba-iqn", default=EMUHBA_IQN, help=f"target name it serves ({EMUHBA_IQN})"
    )
    parser.add_argument("--emuhba-lun", type=int, default=0, help="LUN to measure on it (0)")
    parser.add_argument(
        "--emuhba-url",
        metavar="URL",
        help="measure an already running target at this iscsi:// LUN URL instead of starting one",
    )
    parser.add_argument("--log-dir", type=Path, help="keep the targets' logs here")
    return parser


def _url_portal(url: str) -> Portal:
    match = re.match(r"^iscsi://([^/:]+|\[[^\]]+\]):(\d+)/([^/]+)/(\d+)$", url)
    if match is None:
        raise SystemExit(f"--emuhba-url must look like iscsi://HOST:PORT/IQN/LUN, not {url!r}")
    return Portal(match.group(1), int(match.group(2)), match.group(3), int(match.group(4)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = parse_size(args.size)
    if os.geteuid() != 0:
        print(
            "bench_vs_tgtd: tgtd needs root (it locks its management socket under /run/tgtd); "
            "run this as root, e.g. sudo .venv/bin/python bench/bench_vs_tgtd.py",
            file=sys.stderr,
        )
        return 2
    _require_tools(["iscsi-perf", "iscsi-readcapacity16", "tgtd", "tgtadm"])
    workloads = [w for w in WORKLOADS if not args.workload or w.name in args.workload]
    # Both end the run through the same cleanup; SIGINT explicitly, because a shell starts
    # background jobs with it ignored and Python keeps it that way.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    names = ("emuhba", "tgtd")
    rows = [Row(w.name) for w in workloads]
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emuhba-bench-")))
        log_dir = args.log_dir or workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
        backing = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="emuhba-bench-", dir=shm))
        )
        try:
            portals = _start_targets(args, size, stack, log_dir, backing)
            capacities = {name: wait_for_capacity(portal.url()) for name, portal in portals.items()}
            for name, capacity in capacities.items():
                print(
                    f"{name}: {portals[name].url()} {capacity.size} bytes, {capacity.block_length} B blocks"
                )
            for workload, row in zip(workloads, rows, strict=True):
                for name in names:
                    print(f"running {workload.name} on {name} for {args.seconds} s ...", flush=True)
                    row.results[name] = run_iscsi_perf(
                        portals[name].url(), workload, args.seconds, capacities[name].block_length
                    )
        except KeyboardInterrupt:
            print("\ninterrupted; stopping the targets", file=sys.stderr)
            return 130
        finally:
            if args.log_dir:
                print(f"target logs are in {log_dir}", file=sys.stderr)

    print()
    print(format_table(rows, names))
    if args.json is not None:
        payload = {
            "seconds": args.seconds,
            "size": size,
            "tool": "iscsi-perf (READ16 only)",
            "rows": [
                {
                    "workload": row.workload,
                    **{
                        name: {**asdict(res), "mib_per_s": round(res.mib_per_s, 2)}
                        for name, res in row.results.items()
                    },
                    "ratio": row.ratio(*names),
                }
                for row in rows
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _start_targets(
    args: argparse.Namespace, size: int, stack: contextlib.ExitStack, log_dir: Path, backing: Path
) -> dict[str, Portal]:
    host: str = args.host
    portals: dict[str, Portal] = {}
    if args.emuhba_url:
        portals["emuhba"] = _url_portal(args.emuhba_url)
    else:
        port = free_tcp_port(host)
        if args.emuhba_cmd:
            text = args.emuhba_cmd.format(python=sys.executable, host=host, port=port, size=size)
            command = shlex.split(text)
        else:
            command = emuhba_command(host, port, ["--ram-lun", str(size), "--log-level", "warning"])
        stack.enter_context(EmuhbaServer(command, host, port, log_dir / "emuhba.log"))
        portals["emuhba"] = Portal(host, port, args.emuhba_iqn, args.emuhba_lun)

    image = backing / "tgtd-lun1.img"
    with image.open("wb") as f:
        f.truncate(size)
    port = free_tcp_port(host)
    tgtd = stack.enter_context(TgtdServer(host, port, [image], log_dir / "tgtd.log"))
    portals["tgtd"] = Portal(host, port, tgtd.iqn, 1)
    return portals


if __name__ == "__main__":
    sys.exit(main())
