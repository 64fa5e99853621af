"""Live control of a running ``emuhba serve``: a Unix-socket server and the ``emuhba ctl`` client.

Protocol (version 1): newline-delimited JSON over a Unix stream socket, one request per line, one
response line per request, in order.

    request   {"v": 1, "id": 7, "cmd": "pause", "args": {"scope": "lun", "lun": "0", "seconds": 5}}
    success   {"v": 1, "id": 7, "ok": true, "result": {...}}
    failure   {"v": 1, "id": 7, "ok": false, "error": {"code": "unknown_lun", "message": "..."}}

``id`` is echoed as given (any JSON value, optional). A request with another ``v`` is answered
``unsupported_version`` with the versions this server speaks, so a newer client can fall back.
Malformed input is answered with an error and never ends the server; a line longer than
:data:`MAX_REQUEST_BYTES` is answered ``request_too_large`` and ends that connection only.

Security: only the user running the server may control it. The socket is born mode 0600 (bound
under umask 0177, then verified) in a directory no one else can write to (the default one is
0700), and every connection's peer uid is checked with SO_PEERCRED, so a socket that ends up
reachable by mistake still refuses other users. A path that already exists is replaced only if it
is our own socket with no server behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from emuhba.miniport import MAX_QUEUE_DEPTH_CLASSIC, PORT_MODEL_STORPORT, MiniportIoctlError

if TYPE_CHECKING:
    from emuhba.hba import Hba
    from emuhba.port import LunQueue, PortDriver
    from target.connection import Connection, Session
    from target.portal import TargetPortal

log = structlog.get_logger("emuhba.control")

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
# Requests are a few hundred bytes; the cap only stops a runaway writer from growing our buffer.
MAX_REQUEST_BYTES: Final = 64 * 1024
SOCKET_SUFFIX: Final = ".sock"
DEFAULT_PORTAL_PORT: Final = 3260
# sockaddr_un.sun_path is 108 bytes on Linux, NUL included.
_SUN_PATH_MAX: Final = 107
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_LINGER_S: Final = 1.0


class ControlError(Exception):
    """A request the server refused, with a stable machine-readable ``code``."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}


class ControlSetupError(Exception):
    """The control socket could not be created safely."""


class ControlUnavailable(Exception):
    """The client could not reach a server at ``path``."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot reach emuhba control socket {path}: {reason}")
        self.path = path
        self.reason = reason


# ------------------------------------------------------------------------------------ paths


def runtime_directory(*, euid: int | None = None,
                      environ: Mapping[str, str] | None = None) -> Path:
    """Where control sockets live by default.

    root: ``/run/emuhba``; a user with a usable ``$XDG_RUNTIME_DIR`` (systemd's per-user tmpfs,
    private to the user and cleaned at logout): ``$XDG_RUNTIME_DIR/emuhba``; anyone else:
    ``<tmpdir>/emuhba-<uid>``.
    """
    uid = os.geteuid() if euid is None else euid
    env = os.environ if environ is None else environ
    if uid == 0:
        return Path("/run/emuhba")
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        try:
            st = os.stat(xdg)
        except OSError:
            st = None
        # The XDG spec says to ignore the variable unless the directory is ours and private.
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == uid \
                and not st.st_mode & 0o077:
            return Path(xdg) / "emuhba"
    return Path(tempfile.gettempdir()) / f"emuhba-{uid}"


def default_socket_path(portal_port: int = DEFAULT_PORTAL_PORT, *, euid: int | None = None,
                        environ: Mapping[str, str] | None = None) -> Path:
    """``<runtime directory>/<iSCSI portal port>.sock``: one socket per server on the host."""
    return runtime_directory(euid=euid, environ=environ) / f"{portal_port}{SOCKET_SUFFIX}"


def find_socket(explicit: str | None = None, portal_port: int | None = None) -> Path:
    """The socket ``emuhba ctl`` should use: ``explicit``; else the one for ``portal_port``;
    else the only socket in the runtime directory; else the default port's."""
    if explicit:
        return Path(explicit)
    if portal_port is not None:
        return default_socket_path(portal_port)
    directory = runtime_directory()
    try:
        candidates = sorted(p for p in directory.iterdir() if p.name.endswith(SOCKET_SUFFIX))
    except OSError:
        candidates = []
    if len(candidates) == 1:
        return candidates[0]
    return default_socket_path(DEFAULT_PORTAL_PORT)


# --------------------------------------------------------------------------- socket security


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> PeerCredentials:
    """The connecting process's credentials, as the kernel recorded them at connect (Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:  # pragma: no cover - not Linux
        raise OSError("SO_PEERCRED is not available on this platform")
    raw = sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def peer_allowed(peer: PeerCredentials | None, owner_uid: int) -> bool:
    """Only the server's owner may control it; unknown credentials are refused."""
    return peer is not None and peer.uid == owner_uid


def prepare_directory(directory: Path, *, private: bool) -> None:
    """Make sure nobody but us (or root) can add, remove or swap entries in ``directory``.

    It is created 0700 when missing. An existing one must be a real directory (not a symlink)
    owned by us or root and writable by nobody else; ``private`` (the default location) also
    demands exactly 0700, since we made it.
    """
    euid = os.geteuid()
    try:
        os.makedirs(directory.parent, mode=0o755, exist_ok=True)
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlSetupError(f"cannot create {directory}: {exc.strerror}") from None
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise ControlSetupError(f"cannot inspect {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ControlSetupError(f"{directory} is not a directory (a symlink?); refusing it")
    if st.st_uid not in (euid, 0):
        raise ControlSetupError(f"{directory} belongs to uid {st.st_uid}, not to us ({euid})")
    mode = stat.S_IMODE(st.st_mode)
    if private and (st.st_uid != euid or mode != 0o700):
        raise ControlSetupError(
            f"{directory} has mode {mode:04o} owner {st.st_uid}; the control socket directory "
            f"must be ours with mode 0700 (chmod 700 {directory})")
    if mode & 0o022:
        raise ControlSetupError(
            f"{directory} is writable by others (mode {mode:04o}); put the control socket in a "
            "directory only its owner can write to")


def _clear_stale_socket(path: Path) -> None:
    """Remove ``path`` only if it is our own socket and no server answers on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSetupError(f"{path} exists and is not a socket; refusing to replace it")
    if st.st_uid != os.geteuid():
        raise ControlSetupError(f"{path} is a socket of uid {st.st_uid}; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: the server that made it is gone
    except OSError as exc:
        raise ControlSetupError(f"cannot probe existing socket {path}: {exc}") from None
    else:
        raise ControlSetupError(f"{path} is in use by a running server (another emuhba serve?)")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def bind_control_socket(path: Path, *, private_directory: bool) -> tuple[socket.socket, os.stat_result]:
    """A listening Unix socket at ``path``, mode 0600, owned by us; and its identity."""
    if len(os.fsencode(str(path))) > _SUN_PATH_MAX:
        raise ControlSetupError(f"control socket path too long for a Unix socket ({path})")
    prepare_directory(path.parent, private=private_directory)
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the inode with 0777 & ~umask: with 0177 it is never, not even for an
        # instant, connectable by others. umask is per process, so restore it at once.
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid() \
                or stat.S_IMODE(st.st_mode) != 0o600:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise ControlSetupError(
                f"{path} came out with mode {stat.S_IMODE(st.st_mode):04o} owner {st.st_uid}; "
                "expected 0600 and ours")
        sock.listen(16)
        sock.setblocking(False)
    except ControlSetupError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise ControlSetupError(f"cannot bind control socket {path}: {exc.strerror}") from None
    return sock, st


# ------------------------------------------------------------------------------ snapshots
# Read-only views of the port and the iSCSI sessions, shared by the control commands and the
# metrics collector. They only read counters that the I/O path maintains anyway.


def format_address(address: tuple[int, int, int]) -> str:
    return f"{address[0]}:{address[1]}:{address[2]}"


def _time_left(handle: asyncio.TimerHandle | None) -> float | None:
    """Seconds until a timed control ends by itself (the port's timers are loop timers)."""
    if handle is None or handle.cancelled():
        return None
    try:
        now = asyncio.get_running_loop().time()
    except RuntimeError:
        return None
    return round(max(0.0, handle.when() - now), 3)


def lun_state(lq: LunQueue) -> dict[str, Any]:
    """Whether the unit is paused / busy / being reset, and for how long or how many more."""
    words = [w for w, on in (("paused", lq.paused), ("busy", lq.busy),
                             ("resetting", lq.resetting)) if on]
    return {
        "state": ",".join(words) or "ready",
        "paused": lq.paused,
        "pause_left_s": _time_left(lq.pause_timer) if lq.paused else None,
        "busy": lq.busy,
        "busy_remaining": lq.busy_remaining if lq.busy else 0,
        "resetting": lq.resetting,
    }


def adapter_state(port: PortDriver) -> dict[str, Any]:
    words = [w for w, on in (("stopped", not port.started), ("paused", port.paused),
                             ("busy", port.busy_state)) if on]
    return {
        "state": ",".join(words) or "ready",
        "paused": port.paused,
        "busy": port.busy_state,
        "busy_remaining": port.busy_remaining,
    }


def _finite(seconds: float) -> float | None:
    # The histogram's last bucket is open-ended; JSON has no infinity.
    return seconds if math.isfinite(seconds) else None


def lun_snapshot(lq: LunQueue) -> dict[str, Any]:
    snapshot: dict[str, Any] = {
        "address": format_address(lq.address),
        "path_id": lq.path_id,
        "target_id": lq.target_id,
        "lun": lq.lun,
        **lq.counters(),
        "latency_p50_s": _finite(lq.latency.quantile(0.5)),
        "latency_p99_s": _finite(lq.latency.quantile(0.99)),
    }
    snapshot.update(lun_state(lq))
    return snapshot


def adapter_snapshot(hba: Hba) -> dict[str, Any]:
    port = hba.port
    config = port.config
    counters = port.counters()
    snapshot: dict[str, Any] = {
        "name": hba.name,
        "miniport": port.miniport.name,
        "model": port.model,
        "started": port.started,
        "extended_srb": config.srb_type_extended,
        "max_queue_depth": None if config.srb_type_extended else MAX_QUEUE_DEPTH_CLASSIC,
        "adapter_limit": port.adapter_limit,
        "buses": config.number_of_buses,
        "units": sum(len(luns) for luns in port.units().values()),
        "held": counters["held"],
        "outstanding": counters["outstanding"],
        "peak_outstanding": counters["peak_outstanding"],
        "resets": counters["lun_resets"] + counters["target_resets"] + counters["bus_resets"],
        "latency_p50_s": _finite(port.latency.quantile(0.5)),
        "latency_p99_s": _finite(port.latency.quantile(0.99)),
        "counters": counters,
    }
    snapshot.update(adapter_state(port))
    return snapshot


def session_snapshot(session: Session) -> dict[str, Any]:
    connections = [connection_snapshot(conn) for conn in session.connections]
    totals = {key: sum(c[key] for c in connections)
              for key in ("pdus_in", "pdus_out", "rejects", "digest_errors")}
    return {
        "tsih": session.tsih,
        "isid": session.isid.hex(),
        "initiator": session.initiator_name,
        "target": session.target_name,
        "discovery": session.discovery,
        "nexus": session.nexus,
        "commands_active": session.active,
        "commands_waiting": len(session.deferred),
        "buffered_bytes": session.buffered_bytes,
        "buffer_budget": session.budget,
        "window": session.window,
        "tasks": len(session.tasks),
        "exp_cmdsn": session.exp_cmdsn,
        "max_cmdsn": session.max_cmdsn,
        "connections": connections,
        **totals,
    }


def connection_snapshot(conn: Connection) -> dict[str, Any]:
    return {
        "cid": conn.cid,
        "peer": conn.peer,
        "local": conn.local_address,
        "state": conn.state.name,
        "header_digest": conn.header_digest,
        "data_digest": conn.data_digest,
        "pdus_in": conn.pdus_in,
        "pdus_out": conn.pdus_out,
        "rejects": conn.rejects,
        "digest_errors": conn.digest_errors,
    }


# ------------------------------------------------------------------------------- commands


def _arg(args: Mapping[str, Any], name: str) -> Any:
    if name not in args:
        raise ControlError("bad_argument", f"missing argument {name!r}")
    return args[name]


def _decimal(text: str) -> bool:
    # ASCII only: str.isdigit() also accepts '²', which int() then rejects.
    return text.isascii() and text.isdecimal()


def _positive_int(args: Mapping[str, Any], name: str) -> int:
    value = _arg(args, name)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and _decimal(value.strip()):
            value = int(value)
        else:
            raise ControlError("bad_argument", f"{name} must be a whole number, not {value!r}")
    if value < 1:
        raise ControlError("bad_argument", f"{name} must be at least 1, not {value}")
    return int(value)


def _seconds(args: Mapping[str, Any], name: str = "seconds") -> float:
    value = _arg(args, name)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ControlError("bad_argument", f"{name} must be a number of seconds, not {value!r}")
    try:
        seconds = float(value)
    except ValueError:
        raise ControlError("bad_argument", f"{name} must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ControlError("bad_argument", f"{name} must be a positive number, not {value!r}")
    return seconds


def parse_lun_address(text: object, default_target: tuple[int, int]) -> tuple[int, int, int]:
    """``L`` (a LUN of the default target) or ``path:target:lun``."""
    if isinstance(text, int) and not isinstance(text, bool):
        parts = [str(text)]
    elif isinstance(text, str):
        parts = text.strip().split(":")
    else:
        raise ControlError("bad_argument", f"a LUN is L or path:target:lun, not {text!r}")
    if len(parts) not in (1, 3) or not all(_decimal(p.strip()) for p in parts):
        raise ControlError("bad_argument", f"a LUN is L or path:target:lun, not {text!r}")
    numbers = [int(p) for p in parts]
    if len(numbers) == 1:
        return (default_target[0], default_target[1], numbers[0])
    return (numbers[0], numbers[1], numbers[2])


Handler = Callable[[Mapping[str, Any]], Any]


class Controller:
    """The commands, independent of the transport: ``handle(request) -> response``.

    Every command runs on the event loop thread, synchronously (each is a few reads or one call
    into the port), so it needs no locking against the I/O path.
    """

    def __init__(self, hbas: Hba | Sequence[Hba], portal: TargetPortal | None = None, *,
                 info: Mapping[str, Any] | None = None) -> None:
        self.hbas: list[Hba] = list(hbas) if isinstance(hbas, Sequence) else [hbas]
        if not self.hbas:
            raise ValueError("a controller needs at least one adapter")
        # The adapter the request in progress addresses (every request runs to completion on
        # the loop thread, one at a time): the first one unless it names another.
        self.hba = self.hbas[0]
        self.portal = portal
        # Shared, not copied: the server adds what it learns after start (bound portals).
        self.info: Mapping[str, Any] = info if info is not None else {}
        self.started_at = time.monotonic()
        self._commands: dict[str, tuple[Handler, frozenset[str]]] = {
            "hello": (self._hello, frozenset()),
            "status": (self._status, frozenset()),
            "luns": (self._luns, frozenset()),
            "sessions": (self._sessions, frozenset()),
            "pause": (self._pause, frozenset({"scope", "lun", "seconds"})),
            "resume": (self._resume, frozenset({"scope", "lun"})),
            "busy": (self._busy, frozenset({"scope", "lun", "requests"})),
            "ready": (self._ready, frozenset({"scope", "lun"})),
            "set_depth": (self._set_depth, frozenset({"lun", "depth"})),
            "miniport": (self._miniport, frozenset({"code", "args", "lun"})),
        }

    @property
    def commands(self) -> list[str]:
        return sorted(self._commands)

    @property
    def default_target(self) -> tuple[int, int]:
        if self.portal is not None:
            for node in self.portal.nodes.values():
                if node.backend is self.hba:
                    return (node.path_id, node.target_id)
        targets = self.hba.targets()
        return targets[0] if targets else (0, 0)

    # ------------------------------------------------------------------------- transport side

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """One request line in, one response object out; never raises."""
        try:
            request = json.loads(line, parse_constant=_no_constants)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _failure(None, ControlError("bad_request", f"not JSON: {exc}"))
        except ValueError as exc:
            return _failure(None, ControlError("bad_request", str(exc)))
        return self.handle(request)

    def handle(self, request: object) -> dict[str, Any]:
        request_id = request.get("id") if isinstance(request, dict) else None
        try:
            result = self._run(request)
        except ControlError as exc:
            return _failure(request_id, exc)
        except Exception as exc:  # a bug in a command must not take the server down
            log.exception("control_command_failed", request=repr(request)[:200])
            return _failure(request_id, ControlError("internal", f"internal error: {exc!r}"))
        return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}

    def _run(self, request: object) -> Any:
        if not isinstance(request, dict):
            raise ControlError("bad_request", "a request is a JSON object")
        version = request.get("v")
        if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
            raise ControlError("unsupported_version",
                               f"protocol version {version!r} is not supported",
                               supported=list(SUPPORTED_VERSIONS))
        command = request.get("cmd")
        if not isinstance(command, str):
            raise ControlError("bad_request", "'cmd' must be a string")
        entry = self._commands.get(command)
        if entry is None:
            raise ControlError("unknown_command", f"unknown command {command!r}",
                               commands=self.commands)
        handler, allowed = entry
        args = request.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ControlError("bad_request", "'args' must be a JSON object")
        unknown = sorted(set(args) - allowed - {"adapter"})
        if unknown:
            raise ControlError("bad_argument", f"{command} takes no argument {unknown[0]!r}")
        self.hba = self._adapter(args.get("adapter"))
        try:
            return handler(args)
        finally:
            self.hba = self.hbas[0]

    def _adapter(self, name: object) -> Hba:
        if name is None:
            return self.hbas[0]
        for hba in self.hbas:
            if hba.name == name:
                return hba
        raise ControlError("unknown_adapter", f"no adapter {name!r} (adapters: "
                                              f"{', '.join(h.name for h in self.hbas)})")

    # ------------------------------------------------------------------------------ helpers

    def _unit(self, args: Mapping[str, Any]) -> LunQueue:
        address = parse_lun_address(_arg(args, "lun"), self.default_target)
        port = self.hba.port
        path_id, target_id, lun = address
        lq = port.lun_queue(path_id, target_id, lun)
        if lq is None or lun not in port.units().get((path_id, target_id), []):
            known = ", ".join(format_address(q.address) for q in self._known_queues()) or "none"
            raise ControlError("unknown_lun", f"no logical unit at {format_address(address)} "
                                              f"(known: {known})")
        return lq

    def _known_queues(self) -> list[LunQueue]:
        units = self.hba.port.units()
        return sorted((lq for lq in self.hba.port.lun_queues()
                       if lq.lun in units.get((lq.path_id, lq.target_id), [])),
                      key=lambda q: q.address)

    @staticmethod
    def _scope(args: Mapping[str, Any]) -> str:
        scope = _arg(args, "scope")
        if scope not in ("lun", "adapter"):
            raise ControlError("bad_argument", f"scope must be 'lun' or 'adapter', not {scope!r}")
        if scope == "adapter" and "lun" in args:
            raise ControlError("bad_argument", "an adapter-wide control takes no LUN")
        return str(scope)

    def _controls_supported(self, what: str = "pause/busy queue controls") -> None:
        model = self.hba.port.model
        if model != PORT_MODEL_STORPORT:
            raise ControlError("not_supported", f"the {model} port model has no {what}")

    def _call(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            raise ControlError("refused", f"the port driver refused: {exc}") from None

    def _unit_result(self, lq: LunQueue) -> dict[str, Any]:
        return lun_snapshot(lq)

    def _adapter_result(self) -> dict[str, Any]:
        return adapter_snapshot(self.hba)

    # ----------------------------------------------------------------------------- commands

    def _hello(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "supported": list(SUPPORTED_VERSIONS),
                "version": _package_version(), "pid": os.getpid(), "commands": self.commands}

    def _status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        port = self.hba.port
        targets: list[dict[str, Any]] = []
        if self.portal is not None:
            for node in self.portal.nodes.values():
                adapter = next((h for h in self.hbas if h is node.backend), None)
                targets.append({"name": node.name, "alias": node.alias, "path_id": node.path_id,
                                "target_id": node.target_id,
                                "adapter": adapter.name if adapter is not None else None,
                                "luns": node.luns()})
        else:
            for hba in self.hbas:
                for path_id, target_id in hba.targets():
                    targets.append({"name": None, "alias": None, "path_id": path_id,
                                    "target_id": target_id, "adapter": hba.name,
                                    "luns": hba.luns(path_id, target_id)})
        sessions = list(self.portal.sessions.values()) if self.portal is not None else []
        return {
            "version": _package_version(),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "port_model": port.model,
            "adapters": [adapter_snapshot(hba) for hba in self.hbas],
            "targets": targets,
            "sessions": [_session_line(s) for s in sessions],
            **self.info,
        }

    def _luns(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [lun_snapshot(lq) for lq in self._known_queues()]

    def _sessions(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.portal is None:
            return []
        return [session_snapshot(s) for s in sorted(self.portal.sessions.values(),
                                                    key=lambda s: s.tsih)]

    def _pause(self, args: Mapping[str, Any]) -> dict[str, Any]:
        scope = self._scope(args)
        seconds = _seconds(args)
        self._controls_supported()
        port = self.hba.port
        if scope == "adapter":
            self._call(lambda: port.pause(seconds))
            log.info("control_pause_adapter", seconds=seconds)
            return self._adapter_result()
        lq = self._unit(args)
        self._call(lambda: port.pause_device(*lq.address, seconds))
        log.info("control_pause_lun", lun=format_address(lq.address), seconds=seconds)
        return self._unit_result(lq)

    def _resume(self, args: Mapping[str, Any]) -> dict[str, Any]:
        scope = self._scope(args)
        self._controls_supported()
        port = self.hba.port
        if scope == "adapter":
            self._call(port.resume)
            log.info("control_resume_adapter")
            return self._adapter_result()
        lq = self._unit(args)
        self._call(lambda: port.resume_device(*lq.address))
        log.info("control_resume_lun", lun=format_address(lq.address))
        return self._unit_result(lq)

    def _busy(self, args: Mapping[str, Any]) -> dict[str, Any]:
        scope = self._scope(args)
        requests = _positive_int(args, "requests")
        self._controls_supported()
        port = self.hba.port
        if scope == "adapter":
            self._call(lambda: port.busy(requests))
            log.info("control_busy_adapter", requests=requests)
            return self._adapter_result()
        lq = self._unit(args)
        self._call(lambda: port.device_busy(*lq.address, requests))
        log.info("control_busy_lun", lun=format_address(lq.address), requests=requests)
        return self._unit_result(lq)

    def _ready(self, args: Mapping[str, Any]) -> dict[str, Any]:
        scope = self._scope(args)
        self._controls_supported()
        port = self.hba.port
        if scope == "adapter":
            self._call(port.ready)
            log.info("control_ready_adapter")
            return self._adapter_result()
        lq = self._unit(args)
        self._call(lambda: port.device_ready(*lq.address))
        log.info("control_ready_lun", lun=format_address(lq.address))
        return self._unit_result(lq)

    def _set_depth(self, args: Mapping[str, Any]) -> dict[str, Any]:
        depth = _positive_int(args, "depth")
        lq = self._unit(args)
        self._controls_supported("per-LUN queue depth (one adapter queue of 254 for all units)")
        port = self.hba.port
        if not port.config.srb_type_extended and depth > MAX_QUEUE_DEPTH_CLASSIC:
            raise ControlError(
                "depth_too_large",
                f"queue depth {depth} is over {MAX_QUEUE_DEPTH_CLASSIC}, the most a logical unit "
                f"may have without extended SRBs (miniport {port.miniport.name} does not declare "
                "them)", maximum=MAX_QUEUE_DEPTH_CLASSIC)
        before = lq.queue_depth
        effective = 0

        def apply() -> None:
            nonlocal effective
            effective = port.set_queue_depth(*lq.address, depth)

        self._call(apply)
        log.info("control_set_depth", lun=format_address(lq.address), depth=effective,
                 previous=before)
        result = self._unit_result(lq)
        result["previous_queue_depth"] = before
        return result


    def _miniport(self, args: Mapping[str, Any]) -> Any:
        """A management request for the emulated controller (faults, link, RAID, fabric),
        passed down as the miniport's IOCTL. ``lun`` (L or P:T:L) becomes the ``unit``
        address the miniport expects."""
        code = _arg(args, "code")
        if not isinstance(code, str):
            raise ControlError("bad_argument", "'code' must be a string")
        ioctl_args = args.get("args", {}) or {}
        if not isinstance(ioctl_args, dict):
            raise ControlError("bad_argument", "'args' must be a JSON object")
        if "lun" in args and args["lun"] is not None:
            ioctl_args = {**ioctl_args,
                          "unit": list(parse_lun_address(args["lun"], self.default_target))}
        try:
            result = self.hba.miniport_ioctl(code, ioctl_args)
        except MiniportIoctlError as exc:
            raise ControlError(exc.code.replace("-", "_"), exc.message) from None
        log.info("control_miniport", code=code, args=ioctl_args)
        return result


def _session_line(session: Session) -> dict[str, Any]:
    return {"tsih": session.tsih, "initiator": session.initiator_name,
            "isid": session.isid.hex(), "target": session.target_name,
            "connections": len(session.connections)}


def _failure(request_id: object, error: ControlError) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error.to_json()}


def _no_constants(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and echoing one back (an id, say)
    # would make our answer unreadable to a strict client.
    raise ValueError(f"{name} is not JSON")


def encode_message(message: Mapping[str, Any]) -> bytes:
    """One protocol line. Strict JSON: a value that cannot be sent becomes an internal error
    answer rather than a line the client cannot parse."""
    try:
        text = json.dumps(message, separators=(",", ":"), default=str, allow_nan=False)
    except ValueError as exc:
        log.error("control_answer_not_json", error=str(exc))
        text = json.dumps(_failure(None, ControlError("internal", f"unencodable answer: {exc}")),
                          separators=(",", ":"))
    return text.encode() + b"\n"


_version_cache: list[str] = []


def _package_version() -> str:
    if not _version_cache:
        try:
            from importlib.metadata import version

            _version_cache.append(version("emuhba"))
        except Exception:
            _version_cache.append("unknown")
    return _version_cache[0]


# ---------------------------------------------------------------------------------- server


class ControlServer:
    """Serves a :class:`Controller` on a Unix socket, on the running event loop."""

    def __init__(self, controller: Controller, path: Path, *, owner_uid: int | None = None,
                 private_directory: bool = True) -> None:
        self.controller = controller
        self.path = path
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid
        self.private_directory = private_directory
        self.refused = 0
        self._server: asyncio.AbstractServer | None = None
        self._identity: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock, st = bind_control_socket(self.path, private_directory=self.private_directory)
        self._identity = (st.st_dev, st.st_ino)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, sock=sock, limit=MAX_REQUEST_BYTES)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("control_listening", socket=str(self.path))

    async def close(self) -> None:
        server = self._server
        self._server = None
        if server is not None:
            server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._unlink()

    def _unlink(self) -> None:
        """Remove the socket file if it is still the one we made (not a successor's)."""
        if self._identity is None:
            return
        identity, self._identity = self._identity, None
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == identity:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control_connection_failed")
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer: PeerCredentials | None
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
        except (OSError, AttributeError, struct.error):
            peer = None
        if not peer_allowed(peer, self.owner_uid):
            self.refused += 1
            log.warning("control_peer_refused", uid=peer.uid if peer else None,
                        pid=peer.pid if peer else None, owner=self.owner_uid)
            writer.write(encode_message(_failure(None, ControlError(
                "permission_denied", "only the user running emuhba serve may control it"))))
            await _finish(reader, writer)
            return
        while True:
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                writer.write(encode_message(_failure(None, ControlError(
                    "request_too_large", f"a request line is limited to {MAX_REQUEST_BYTES} bytes"))))
                await _finish(reader, writer)
                return
            if not line:
                return
            if not line.strip():
                continue
            writer.write(encode_message(self.controller.handle_line(line)))
            await writer.drain()


async def _finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send our last answer, then hang up without a reset.

    Closing with unread input makes the kernel send RST, which can destroy the answer before the
    peer reads it; so half-close, and discard what the peer still sends (bounded, briefly)."""
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    discarded = 0
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(_LINGER_S):
            while discarded < 16 * MAX_REQUEST_BYTES:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                discarded += len(chunk)


# ---------------------------------------------------------------------------------- client


class ControlClient:
    """A blocking client for ``emuhba ctl``: one connection, requests in turn."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 1

    def __enter__(self) -> ControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise ControlUnavailable(self.path, "no such socket (is emuhba serve running? "
                                                "use --socket PATH or --port N)") from None
        except ConnectionRefusedError:
            sock.close()
            raise ControlUnavailable(self.path, "connection refused (stale socket: the server "
                                                "is gone)") from None
        except PermissionError:
            sock.close()
            raise ControlUnavailable(self.path, "permission denied (the socket belongs to "
                                                "another user)") from None
        except OSError as exc:
            sock.close()
            raise ControlUnavailable(self.path, exc.strerror or str(exc)) from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def exchange(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send one raw message and return the raw response object."""
        if self._sock is None:
            self.connect()
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(encode_message(message))
            while b"\n" not in self._buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlUnavailable(self.path, "the server closed the connection")
                self._buffer += chunk
        except TimeoutError:
            raise ControlUnavailable(self.path, f"no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise ControlUnavailable(self.path, exc.strerror or str(exc)) from None
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            response = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ControlUnavailable(self.path, "the server sent something that is not JSON") from None
        if not isinstance(response, dict):
            raise ControlUnavailable(self.path, "the server sent an unexpected answer")
        return response

    def request(self, command: str, **args: Any) -> Any:
        """Run one command; its result, or :class:`ControlError`."""
        request_id = self._next_id
        self._next_id += 1
        response = self.exchange({"v": PROTOCOL_VERSION, "id": request_id, "cmd": command,
                                  "args": args})
        if response.get("ok") is True:
            return response.get("result")
        error = response.get("error") or {}
        if not isinstance(error, dict):
            error = {}
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
        raise ControlError(str(error.get("code", "error")),
                           str(error.get("message", "the server refused the request")), **details)

