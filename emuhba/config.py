"""`emuhba serve --config FILE.toml`: a whole installation described in one file.

The file names stores (the media), controllers (the emulated hardware: a plain disk controller,
a RAID controller with arrays over member stores, or a Fibre Channel HBA with a fabric of remote
ports), adapters (a port driver in front of one controller: port model, queue depth), targets
(iSCSI names bound to an adapter, with their LUN maps) and portals. ``examples/*.toml`` has one
complete file per controller kind; the README documents every key.

Everything is checked before anything is built, and every problem is reported at once with the
file, the line and the key it concerns (``emuhba.toml:14: adapters[0].queue_depth: ...``), so a
typo never becomes a half-started server. Unknown keys are errors: a misspelt optional key would
otherwise be silently ignored.

tomllib gives values but not positions, so :func:`key_lines` maps key paths to lines with a
small scanner of the same text; a key it cannot place falls back to its nearest enclosing table.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from emuhba.miniport import PORT_MODEL_SCSIPORT, PORT_MODEL_STORPORT
from target.chap import ChapPolicy, ChapSecret, parse_algorithms
from target.portal import AccessEntry

T = TypeVar("T")
KeyPath = tuple[str | int, ...]
Address = tuple[int, int, int]

CONTROLLER_KINDS: Final = ("disk", "raid", "fc")
STORE_KINDS: Final = ("ram", "file")
RAID_LEVELS: Final = (0, 1, 5, 10)
DIGEST_CHOICES: Final = ("optional", "required", "off")
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
BLOCK_SIZES: Final = (512, 1024, 2048, 4096)
MAX_TARGET_ID: Final = 127  # per bus (seed 004: up to 128 target ids per bus)
MAX_BUS: Final = 7  # up to 8 buses per adapter
MAX_LUN: Final = 16383  # SAM flat addressing

_SIZE: Final = re.compile(r"^\s*(\d+)\s*([kmgtKMGT]?)(i?[bB])?\s*$")
_IQN: Final = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")


# ------------------------------------------------------------------------------------ errors


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(ValueError):
    """Everything wrong with a config file, each problem with its file, line and key."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# ---------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class StoreConfig:
    name: str
    kind: str  # "ram" | "file"
    size: int | None  # bytes; None: a file's own size
    path: str | None = None
    block_size: int = 512
    read_only: bool = False
    # The medium's physical block (READ CAPACITY(16) reports how many logical blocks make
    # one); None: 4 KiB, or the logical block if that is larger.
    physical_block_size: int | None = None


@dataclass(frozen=True)
class LatencyConfig:
    fixed_s: float = 0.0
    per_kib_s: float = 0.0
    seek_s: float = 0.0


@dataclass(frozen=True)
class FaultConfig:
    kind: str  # "busy" | "medium-error" | "latency" | "link-down" | "fail-member"
    unit: Address | None = None  # None: every unit of the controller
    count: int = 0
    first_lba: int = 0
    last_lba: int = 0
    reads: bool = True
    writes: bool = False
    seconds: float = 0.0
    array: str | None = None  # fail-member: the array and its member slot
    member: int = 0


@dataclass(frozen=True)
class ArrayConfig:
    name: str
    level: int
    members: tuple[str, ...]
    strip_size: int = 64 * 1024
    write_cache: bool = True


@dataclass(frozen=True)
class RamLunGroup:
    """``count`` RAM LUNs of ``size`` bytes each, numbered from ``first_lun``."""

    count: int
    size: int
    first_lun: int


@dataclass(frozen=True)
class RemotePortConfig:
    wwpn: str
    bus: int
    target_id: int
    luns: tuple[LunMapEntry, ...] = ()
    ram_luns: RamLunGroup | None = None
    wwnn: str | None = None


@dataclass(frozen=True)
class ControllerConfig:
    name: str
    kind: str
    slots: int = 1024
    workers: int = 4
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    link_down_timeout_s: float = 30.0
    faults: tuple[FaultConfig, ...] = ()
    arrays: tuple[ArrayConfig, ...] = ()
    remote_ports: tuple[RemotePortConfig, ...] = ()
    wwpn: str | None = None
    wwnn: str | None = None


@dataclass(frozen=True)
class AdapterConfig:
    name: str
    controller: str
    port_model: str = PORT_MODEL_STORPORT
    queue_depth: int = 64


@dataclass(frozen=True)
class LunMapEntry:
    lun: int
    source: str  # a store name (disk, fc) or an array name (raid)
    read_only: bool = False
    removable: bool = False  # a removable-medium unit (disk controllers)


@dataclass(frozen=True)
class TargetConfig:
    name: str
    adapter: str
    alias: str | None = None
    luns: tuple[LunMapEntry, ...] = ()
    remote_port: str | None = None  # FC: the remote port (WWPN) this target name stands for
    chap: ChapPolicy | None = None  # logins must authenticate with CHAP
    acl: tuple[AccessEntry, ...] | None = None  # only these initiators (None: everyone)


@dataclass(frozen=True)
class ServerConfig:
    source: str
    portals: tuple[tuple[str, int], ...]
    advertise: tuple[str, ...] = ()
    header_digest: str = "optional"
    data_digest: str = "optional"
    # Idle connections are pinged with NOP-In after nop_interval_s and dropped when no answer
    # comes within nop_timeout_s; 0 turns pinging off.
    nop_interval_s: float = 10.0
    nop_timeout_s: float = 15.0
    discovery_chap: ChapPolicy | None = None
    max_sessions_per_target: int = 256
    # Memory one session's commands may hold for their data; commands beyond it wait.
    session_buffer_mib: int = 64
    stores: tuple[StoreConfig, ...] = ()
    controllers: tuple[ControllerConfig, ...] = ()
    adapters: tuple[AdapterConfig, ...] = ()
    targets: tuple[TargetConfig, ...] = ()
    control_socket: str | None = None
    control: bool = True
    metrics: tuple[str, int] | None = None
    log_level: str | None = None
    log_format: str | None = None

    def store(self, name: str) -> StoreConfig:
        return next(s for s in self.stores if s.name == name)

    def controller(self, name: str) -> ControllerConfig:
        return next(c for c in self.controllers if c.name == name)

    def adapter(self, name: str) -> AdapterConfig:
        return next(a for a in self.adapters if a.name == name)


# ------------------------------------------------------------------------- key -> line map


def _strip_comment(line: str) -> str:
    """The line without its comment; a '#' inside a string is not a comment."""
    quote: str | None = None
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
        i += 1
    return line


def _split_key(text: str) -> list[str]:
    parts: list[str] = []
    for part in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', text.strip()):
        part = part.strip()
        parts.append(part[1:-1] if part[:1] in "\"'" else part)
    return parts


def _depth(text: str) -> int:
    """Net bracket depth a value text opens ([ and { outside strings)."""
    depth = 0
    quote: str | None = None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth


def key_lines(text: str) -> dict[KeyPath, int]:
    """Line numbers of the tables and keys of a TOML text, by key path. Arrays of tables get
    their index in the path (``("adapters", 0, "queue_depth")``), as do the inline tables of a
    multi-line array (``("faults", 1)``)."""
    lines: dict[KeyPath, int] = {}
    aot_index: dict[tuple[str, ...], int] = {}
    current: KeyPath = ()
    open_key: KeyPath | None = None  # a multi-line array value being read
    depth = 0
    items = 0

    def resolve(parts: list[str]) -> KeyPath:
        path: list[str | int] = []
        names: list[str] = []
        for part in parts:
            names.append(part)
            path.append(part)
            index = aot_index.get(tuple(names))
            if index is not None:
                path.append(index)
        return tuple(path)

    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).strip()
        if open_key is not None:
            # Inside a multi-line array: each inline table starts an item.
            for _ in range(line.count("{")):
                lines.setdefault((*open_key, items), number)
                items += 1
            depth += _depth(line)
            if depth <= 0:
                open_key = None
            continue
        if not line:
            continue
        if line.startswith("[["):
            parts = _split_key(line[2:line.index("]]")])
            names = tuple(parts)
            aot_index[names] = aot_index.get(names, -1) + 1
            # Deeper arrays of tables restart under a new parent element.
            for key in [k for k in aot_index if len(k) > len(names) and k[:len(names)] == names]:
                del aot_index[key]
            current = resolve(parts)
            lines.setdefault(current, number)
        elif line.startswith("["):
            current = resolve(_split_key(line[1:line.index("]")]))
            lines.setdefault(current, number)
        elif "=" in line:
            key_text, _, value = line.partition("=")
            path = (*current, *_split_key(key_text))
            lines.setdefault(path, number)
            depth = _depth(value)
            if depth > 0:
                open_key = path
                opened = value.count("{")
                for item in range(opened):
                    lines.setdefault((*open_key, item), number)
                items = opened
    return lines


def _key_text(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# ------------------------------------------------------------------------------ the reader


class _Invalid(Exception):
    """One value was wrong; already recorded as a problem."""


class _Reader:
    """Typed access to the parsed document that records problems with their location."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = key_lines(text)
        self.problems: list[Problem] = []

    def line_of(self, path: KeyPath) -> int | None:
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def problem(self, path: KeyPath, message: str) -> None:
        self.problems.append(Problem(self.source, self.line_of(path), _key_text(path), message))

    def fail(self, path: KeyPath, message: str) -> _Invalid:
        self.problem(path, message)
        return _Invalid()

    def table(self, value: object, path: KeyPath, known: Iterable[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a table, not {_kind(value)}")
        allowed = set(known)
        for key in value:
            if key not in allowed:
                self.problem((*path, key), f"unknown key; known keys here: "
                                           f"{', '.join(sorted(allowed))}")
        return value

    def tables(self, doc: Mapping[str, Any], key: str, path: KeyPath) -> list[Any]:
        value = doc.get(key, [])
        if not isinstance(value, list):
            raise self.fail((*path, key), f"must be an array of tables ([[{key}]]), "
                                          f"not {_kind(value)}")
        return value

    def get(self, table: Mapping[str, Any], key: str, path: KeyPath, kind: type[T],
            default: T | None = None, *, required: bool = False,
            check: Callable[[T], str | None] | None = None) -> T:
        if key not in table:
            if required or default is None:
                raise self.fail(path, f"missing required key {key!r}")
            return default
        value = table[key]
        where = (*path, key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(where, f"must be {_kind_name(kind)}, not {_kind(value)}")
        if check is not None:
            message = check(value)
            if message:
                raise self.fail(where, message)
        return value

    def optional(self, table: Mapping[str, Any], key: str, path: KeyPath, kind: type[T],
                 check: Callable[[T], str | None] | None = None) -> T | None:
        if key not in table:
            return None
        return self.get(table, key, path, kind, required=True, check=check)

    def size(self, table: Mapping[str, Any], key: str, path: KeyPath, *,
             required: bool = False) -> int | None:
        if key not in table:
            if required:
                raise self.fail(path, f"missing required key {key!r}")
            return None
        value = table[key]
        where = (*path, key)
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = parse_size(value)
            except ValueError as exc:
                raise self.fail(where, str(exc)) from None
        else:
            raise self.fail(where, f"must be a size (e.g. 4096, \"64M\", \"1G\"), "
                                   f"not {_kind(value)}")
        if number <= 0:
            raise self.fail(where, f"must be positive, not {number}")
        return number

    def choice(self, table: Mapping[str, Any], key: str, path: KeyPath,
               choices: Sequence[T], default: T | None = None) -> T:
        if key not in table:
            if default is None:
                raise self.fail(path, f"missing required key {key!r}")
            return default
        value = table[key]
        if value not in choices or isinstance(value, bool):
            raise self.fail((*path, key), f"must be one of {', '.join(map(repr, choices))}, "
                                          f"not {value!r}")
        return value  # type: ignore[no-any-return]

    def attempt(self, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except _Invalid:
            return None


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "an array", dict: "a table"}.get(kind, kind.__name__)


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}, " \
                                                   f"not {value}"
    return check


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0, not {value}"


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, not {value}"


def _name(value: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value) else \
        "names take 1-64 letters, digits, '_', '.', ':' or '-'"


def parse_size(text: str) -> int:
    """'4096', '64M', '1G', '2GiB' -> bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64M, 1G)")
    return int(match.group(1)) * (1 << (10 * " KMGT".index((match.group(2) or " ").upper())))


def parse_hostport(text: str, default_port: int = 3260) -> tuple[str, int]:
    """'HOST:PORT', 'HOST', '[v6]:PORT' or ':PORT'."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""  # a bare host, or a bare IPv6 address
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return (host or "0.0.0.0", number)


def parse_unit(text: str) -> Address | None:
    """'all', or 'PATH:TARGET:LUN'."""
    if text.strip() == "all":
        return None
    parts = text.strip().split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"a unit is 'all' or PATH:TARGET:LUN (e.g. 0:0:1), not {text!r}")
    return (int(parts[0]), int(parts[1]), int(parts[2]))


def parse_lba_range(text: str | int) -> tuple[int, int]:
    if isinstance(text, int):
        return text, text
    first, _, last = text.partition("-")
    try:
        a = int(first, 0)
        b = int(last, 0) if last else a
    except ValueError:
        raise ValueError(f"an LBA range is FIRST or FIRST-LAST, not {text!r}") from None
    if a < 0 or b < a:
        raise ValueError(f"bad LBA range {text!r}")
    return a, b


def parse_wwn(text: str) -> int:
    """A world wide name: 16 hex digits, with or without colons (20:00:00:25:b5:00:00:01)."""
    digits = text.replace(":", "").replace("-", "").lower()
    if not re.fullmatch(r"[0-9a-f]{16}", digits):
        raise ValueError(f"a WWN is 16 hex digits, e.g. 20:00:00:25:b5:00:00:01, not {text!r}")
    return int(digits, 16)


# ------------------------------------------------------------------------------ the parser


_TOP_KEYS: Final = ("server", "iscsi", "portals", "stores", "controllers", "adapters", "targets")


def load_config(path: str | Path) -> ServerConfig:
    """Read and check ``path``; raises ConfigError (every problem) or OSError."""
    source = str(path)
    text = Path(path).read_text(encoding="utf-8")
    return parse_config(text, source, base=Path(path).resolve().parent)


def chap_from_files(user: str, secret_file: str, mutual_user: str | None = None,
                    mutual_secret_file: str | None = None, *, flag: str = "--chap") -> ChapPolicy:
    """A CHAP policy from names and secret files, checked as a config file's ``auth`` table
    is (the command line's --chap and --chap-mutual, or their --discovery-* twins)."""
    reader = _Reader("", "command line")
    table: dict[str, Any] = {"user": user, "secret_file": secret_file}
    if mutual_user is not None:
        table |= {"mutual_user": mutual_user, "mutual_secret_file": mutual_secret_file}
    policy = reader.attempt(lambda: _Parser(reader, Path.cwd())._chap(table, (flag,)))
    if reader.problems or policy is None:
        raise ConfigError(reader.problems or [Problem("command line", None, flag, "invalid")])
    return policy


def parse_config(text: str, source: str = "<config>", *, base: Path | None = None) -> ServerConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else None
        raise ConfigError([Problem(source, line, "", f"not valid TOML: {exc}")]) from None
    reader = _Reader(text, source)
    config = _Parser(reader, base or Path.cwd()).parse(doc)
    if reader.problems or config is None:
        raise ConfigError(reader.problems or [Problem(source, None, "", "invalid")])
    return config


class _Parser:
    def __init__(self, reader: _Reader, base: Path) -> None:
        self.r = reader
        self.base = base

    def parse(self, doc: Mapping[str, Any]) -> ServerConfig | None:
        r = self.r
        r.table(doc, (), _TOP_KEYS)
        server = r.attempt(lambda: r.table(doc.get("server", {}), ("server",),
                                           ("log_level", "log_format", "control_socket",
                                            "control", "metrics"))) or {}
        iscsi = r.attempt(lambda: r.table(doc.get("iscsi", {}), ("iscsi",),
                                          ("header_digest", "data_digest", "advertise",
                                           "nop_interval_s", "nop_timeout_s",
                                           "discovery_auth", "max_sessions_per_target",
                                           "session_buffer_mib"))) or {}
        portals = self._portals(doc)
        stores = self._each(doc, "stores", self._store)
        controllers = self._each(doc, "controllers", self._controller)
        adapters = self._each(doc, "adapters", self._adapter)
        targets = self._each(doc, "targets", self._target)
        settings = r.attempt(lambda: self._server(server, iscsi))
        if settings is None:
            return None
        config = ServerConfig(source=r.source, portals=portals, stores=tuple(stores),
                              controllers=tuple(controllers), adapters=tuple(adapters),
                              targets=tuple(targets), **settings)
        # References are checked once every entry reads well: a misspelt key in one entry
        # would otherwise also show up as "no such store" everywhere it is named.
        if not r.problems:
            self._cross_check(config, doc)
        return config

    def _each(self, doc: Mapping[str, Any], key: str,
              fn: Callable[[Any, KeyPath], T]) -> list[T]:
        out: list[T] = []
        items = self.r.attempt(lambda: self.r.tables(doc, key, ()))
        for i, item in enumerate(items or []):
            value = self.r.attempt(lambda item=item, i=i: fn(item, (key, i)))  # type: ignore[misc]
            if value is not None:
                out.append(value)
        return out

    def _server(self, server: Mapping[str, Any], iscsi: Mapping[str, Any]) -> dict[str, Any]:
        r = self.r
        metrics_text = r.optional(server, "metrics", ("server",), str)
        metrics = None
        if metrics_text is not None:
            try:
                if not re.search(r":\d+$", metrics_text.strip()):
                    raise ValueError(f"needs HOST:PORT or :PORT, not {metrics_text!r}")
                metrics = parse_hostport(metrics_text)
            except ValueError as exc:
                raise r.fail(("server", "metrics"), str(exc)) from None
        advertise_list = r.get(iscsi, "advertise", ("iscsi",), list, [])
        advertise = []
        for i, item in enumerate(advertise_list):
            if not isinstance(item, str):
                raise r.fail(("iscsi", "advertise", i), "must be a HOST:PORT string")
            try:
                host, port = parse_hostport(item)
            except ValueError as exc:
                raise r.fail(("iscsi", "advertise", i), str(exc)) from None
            advertise.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        control_socket = r.optional(server, "control_socket", ("server",), str)
        return {
            "advertise": tuple(advertise),
            "header_digest": r.choice(iscsi, "header_digest", ("iscsi",), DIGEST_CHOICES,
                                      "optional"),
            "data_digest": r.choice(iscsi, "data_digest", ("iscsi",), DIGEST_CHOICES,
                                    "optional"),
            "nop_interval_s": r.get(iscsi, "nop_interval_s", ("iscsi",), float, 10.0,
                                    check=_non_negative),
            "nop_timeout_s": r.get(iscsi, "nop_timeout_s", ("iscsi",), float, 15.0,
                                   check=lambda v: None if v > 0 else f"must be above 0, not {v}"),
            "max_sessions_per_target": r.get(
                iscsi, "max_sessions_per_target", ("iscsi",), int, 256,
                check=lambda v: None if 0 <= v <= 65535 else f"must be 0 to 65535, not {v}"),
            "session_buffer_mib": r.get(
                iscsi, "session_buffer_mib", ("iscsi",), int, 64,
                check=lambda v: None if 1 <= v <= 65536 else f"must be 1 to 65536, not {v}"),
            "discovery_chap": self._chap(iscsi["discovery_auth"], ("iscsi", "discovery_auth"))
            if "discovery_auth" in iscsi else None,
            "control_socket": str(self.base / control_socket) if control_socket else None,
            "control": r.get(server, "control", ("server",), bool, True),
            "metrics": metrics,
            "log_level": r.choice(server, "log_level", ("server",), LOG_LEVELS, "info")
            if "log_level" in server else None,
            "log_format": r.choice(server, "log_format", ("server",), ("console", "json"),
                                   "console") if "log_format" in server else None,
        }

    def _portals(self, doc: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
        r = self.r
        out: list[tuple[str, int]] = []
        for i, item in enumerate(r.attempt(lambda: r.tables(doc, "portals", ())) or []):
            path: KeyPath = ("portals", i)
            try:
                table = r.table(item, path, ("listen",))
                listen = r.get(table, "listen", path, str, required=True)
                try:
                    out.append(parse_hostport(listen))
                except ValueError as exc:
                    raise r.fail((*path, "listen"), str(exc)) from None
            except _Invalid:
                continue
        return tuple(out) or (("0.0.0.0", 3260),)

    def _store(self, item: Any, path: KeyPath) -> StoreConfig:
        r = self.r
        table = r.table(item, path, ("name", "kind", "size", "path", "block_size",
                                     "physical_block_size", "read_only"))
        name = r.get(table, "name", path, str, required=True, check=_name)
        kind = r.choice(table, "kind", path, STORE_KINDS)
        size = r.size(table, "size", path, required=kind == "ram")
        block_size = r.get(table, "block_size", path, int, 512,
                           check=lambda v: None if v in BLOCK_SIZES else
                           f"must be one of {', '.join(map(str, BLOCK_SIZES))}, not {v}")
        if size is not None and size % block_size:
            raise r.fail((*path, "size"), f"{size} bytes is not a whole number of "
                                          f"{block_size}-byte blocks")
        physical = r.optional(
            table, "physical_block_size", path, int,
            check=lambda v: None if v >= block_size and v % block_size == 0
            and (v // block_size) & (v // block_size - 1) == 0 and v // block_size <= 1 << 15
            else f"must be the block size ({block_size}) times a power of two, not {v}")
        file_path = r.optional(table, "path", path, str)
        if kind == "file" and not file_path:
            raise r.fail(path, "a file store needs 'path'")
        if kind == "ram" and file_path:
            raise r.fail((*path, "path"), "a RAM store has no path")
        return StoreConfig(name=name, kind=kind, size=size,
                           path=str(self.base / file_path) if file_path else None,
                           block_size=block_size, physical_block_size=physical,
                           read_only=r.get(table, "read_only", path, bool, False))

    def _controller(self, item: Any, path: KeyPath) -> ControllerConfig:
        r = self.r
        table = r.table(item, path, ("name", "kind", "slots", "workers", "latency",
                                     "link_down_timeout_s", "faults", "arrays", "remote_ports",
                                     "wwpn", "wwnn"))
        name = r.get(table, "name", path, str, required=True, check=_name)
        kind = r.choice(table, "kind", path, CONTROLLER_KINDS)
        latency = LatencyConfig()
        if "latency" in table:
            lpath = (*path, "latency")
            lt = r.table(table["latency"], lpath, ("fixed_ms", "per_kib_us", "seek_ms"))
            latency = LatencyConfig(
                fixed_s=r.get(lt, "fixed_ms", lpath, float, 0.0, check=_non_negative) / 1e3,
                per_kib_s=r.get(lt, "per_kib_us", lpath, float, 0.0, check=_non_negative) / 1e6,
                seek_s=r.get(lt, "seek_ms", lpath, float, 0.0, check=_non_negative) / 1e3)
        faults = tuple(self._fault(f, (*path, "faults", i))
                       for i, f in enumerate(r.get(table, "faults", path, list, [])))
        arrays: tuple[ArrayConfig, ...] = ()
        ports: tuple[RemotePortConfig, ...] = ()
        if kind == "raid":
            items = r.get(table, "arrays", path, list, [])
            if not items:
                raise r.fail(path, "a RAID controller needs at least one [[controllers.arrays]]")
            arrays = tuple(self._array(a, (*path, "arrays", i)) for i, a in enumerate(items))
        elif "arrays" in table:
            raise r.fail((*path, "arrays"), f"only RAID controllers have arrays, not {kind!r}")
        wwpn = wwnn = None
        if kind == "fc":
            items = r.get(table, "remote_ports", path, list, [])
            ports = tuple(self._remote_port(p, (*path, "remote_ports", i))
                          for i, p in enumerate(items))
            wwpn = self._wwn(table, "wwpn", path)
            wwnn = self._wwn(table, "wwnn", path)
        else:
            for key in ("remote_ports", "wwpn", "wwnn"):
                if key in table:
                    raise r.fail((*path, key), f"only FC controllers have {key}, not {kind!r}")
        return ControllerConfig(
            name=name, kind=kind,
            slots=r.get(table, "slots", path, int, 1024, check=_between(1, 1 << 20)),
            workers=r.get(table, "workers", path, int, 4, check=_between(0, 256)),
            latency=latency,
            link_down_timeout_s=r.get(table, "link_down_timeout_s", path, float, 30.0,
                                      check=_positive),
            faults=faults, arrays=arrays, remote_ports=ports, wwpn=wwpn, wwnn=wwnn)

    def _wwn(self, table: Mapping[str, Any], key: str, path: KeyPath) -> str | None:
        text = self.r.optional(table, key, path, str)
        if text is None:
            return None
        try:
            parse_wwn(text)
        except ValueError as exc:
            raise self.r.fail((*path, key), str(exc)) from None
        return text

    def _fault(self, item: Any, path: KeyPath) -> FaultConfig:
        r = self.r
        table = r.table(item, path, ("kind", "unit", "count", "lba", "reads", "writes",
                                     "seconds", "array", "member"))
        kind = r.choice(table, "kind", path, ("busy", "medium-error", "latency", "link-down",
                                              "fail-member"))
        if kind == "fail-member":
            return FaultConfig(kind, array=r.get(table, "array", path, str, required=True),
                               member=r.get(table, "member", path, int, required=True,
                                            check=_between(0, 63)))
        unit: Address | None = None
        if "unit" in table:
            try:
                unit = parse_unit(r.get(table, "unit", path, str))
            except ValueError as exc:
                raise r.fail((*path, "unit"), str(exc)) from None
        if kind == "busy":
            return FaultConfig(kind, unit, count=r.get(table, "count", path, int, required=True,
                                                       check=_between(1, 1 << 31)))
        if kind == "latency":
            return FaultConfig(kind, unit, seconds=r.get(table, "seconds", path, float,
                                                         required=True, check=_non_negative))
        if kind == "link-down":
            if unit is not None:
                raise r.fail((*path, "unit"), "the link belongs to the whole controller")
            return FaultConfig(kind, None, seconds=r.get(table, "seconds", path, float,
                                                         required=True, check=_positive))
        if "lba" not in table:
            raise r.fail(path, "a medium error needs 'lba' (FIRST or \"FIRST-LAST\")")
        lba = table["lba"]
        try:
            if not isinstance(lba, int | str) or isinstance(lba, bool):
                raise ValueError(f"must be an LBA or \"FIRST-LAST\", not {_kind(lba)}")
            first, last = parse_lba_range(lba)
        except ValueError as exc:
            raise r.fail((*path, "lba"), str(exc)) from None
        reads = r.get(table, "reads", path, bool, True)
        writes = r.get(table, "writes", path, bool, False)
        if not reads and not writes:
            raise r.fail(path, "a medium error must affect reads, writes or both")
        return FaultConfig(kind, unit, first_lba=first, last_lba=last, reads=reads,
                           writes=writes)

    def _array(self, item: Any, path: KeyPath) -> ArrayConfig:
        r = self.r
        table = r.table(item, path, ("name", "level", "members", "strip_size", "write_cache"))
        name = r.get(table, "name", path, str, required=True, check=_name)
        level = r.get(table, "level", path, int, required=True,
                      check=lambda v: None if v in RAID_LEVELS else
                      f"RAID level must be one of {', '.join(map(str, RAID_LEVELS))}, not {v}")
        members = r.get(table, "members", path, list, required=True)
        for i, member in enumerate(members):
            if not isinstance(member, str):
                raise r.fail((*path, "members", i), "a member is a store name")
        minimum = {0: 1, 1: 2, 5: 3, 10: 4}[level]
        if len(members) < minimum:
            raise r.fail((*path, "members"), f"RAID {level} needs at least {minimum} members, "
                                             f"not {len(members)}")
        if level == 10 and len(members) % 2:
            raise r.fail((*path, "members"), "RAID 10 needs an even number of members")
        if len(set(members)) != len(members):
            raise r.fail((*path, "members"), "a store can be a member only once")
        strip = r.size(table, "strip_size", path) or 64 * 1024
        if strip & (strip - 1) or strip < 4096:
            raise r.fail((*path, "strip_size"), f"a strip is a power of two >= 4K, not {strip}")
        return ArrayConfig(name=name, level=level, members=tuple(members), strip_size=strip,
                           write_cache=r.get(table, "write_cache", path, bool, True))

    def _remote_port(self, item: Any, path: KeyPath) -> RemotePortConfig:
        r = self.r
        table = r.table(item, path, ("wwpn", "wwnn", "bus", "target_id", "luns", "ram_luns"))
        wwpn = self._wwn(table, "wwpn", path)
        if wwpn is None:
            raise r.fail(path, "missing required key 'wwpn'")
        luns = self._lun_map(table, path)
        for li, entry in enumerate(luns):
            if entry.removable:
                raise r.fail((*path, "luns", li, "removable"),
                             "removable-medium units are made by disk controllers")
        group = None
        if "ram_luns" in table:
            gpath = (*path, "ram_luns")
            gt = r.table(table["ram_luns"], gpath, ("count", "size", "first_lun"))
            count = r.get(gt, "count", gpath, int, required=True, check=_between(1, MAX_LUN + 1))
            size = r.size(gt, "size", gpath, required=True)
            assert size is not None
            first = r.get(gt, "first_lun", gpath, int,
                          max((e.lun for e in luns), default=-1) + 1,
                          check=_between(0, MAX_LUN))
            if first + count - 1 > MAX_LUN:
                raise r.fail(gpath, f"LUNs {first}..{first + count - 1} go past {MAX_LUN}")
            taken = {e.lun for e in luns} & set(range(first, first + count))
            if taken:
                raise r.fail(gpath, f"LUN {min(taken)} is also in 'luns'")
            group = RamLunGroup(count, size, first)
        if not luns and group is None:
            raise r.fail(path, "a remote port needs 'luns' or 'ram_luns'")
        return RemotePortConfig(
            wwpn=wwpn, wwnn=self._wwn(table, "wwnn", path),
            bus=r.get(table, "bus", path, int, 0, check=_between(0, MAX_BUS)),
            target_id=r.get(table, "target_id", path, int, required=True,
                            check=_between(0, MAX_TARGET_ID)),
            luns=luns, ram_luns=group)

    def _lun_map(self, table: Mapping[str, Any], path: KeyPath) -> tuple[LunMapEntry, ...]:
        """``luns = ["a", "b"]`` (LUN = position) or ``luns = [{lun = 5, store = "a"}, ...]``."""
        r = self.r
        items = r.get(table, "luns", path, list, [])
        out: list[LunMapEntry] = []
        seen: set[int] = set()
        for i, item in enumerate(items):
            ipath = (*path, "luns", i)
            if isinstance(item, str):
                entry = LunMapEntry(i, item)
            else:
                it = r.table(item, ipath, ("lun", "store", "array", "read_only", "removable"))
                sources = [k for k in ("store", "array") if k in it]
                if len(sources) != 1:
                    raise r.fail(ipath, "a LUN maps exactly one 'store' or 'array'")
                entry = LunMapEntry(
                    r.get(it, "lun", ipath, int, i, check=_between(0, MAX_LUN)),
                    r.get(it, sources[0], ipath, str, required=True),
                    r.get(it, "read_only", ipath, bool, False),
                    r.get(it, "removable", ipath, bool, False))
            if entry.lun in seen:
                raise r.fail(ipath, f"LUN {entry.lun} is mapped twice")
            seen.add(entry.lun)
            out.append(entry)
        return tuple(out)

    def _adapter(self, item: Any, path: KeyPath) -> AdapterConfig:
        r = self.r
        table = r.table(item, path, ("name", "controller", "port_model", "queue_depth"))
        return AdapterConfig(
            name=r.get(table, "name", path, str, required=True, check=_name),
            controller=r.get(table, "controller", path, str, required=True),
            port_model=r.choice(table, "port_model", path,
                                (PORT_MODEL_STORPORT, PORT_MODEL_SCSIPORT), PORT_MODEL_STORPORT),
            queue_depth=r.get(table, "queue_depth", path, int, 64, check=_between(1, 65535)))

    def _target(self, item: Any, path: KeyPath) -> TargetConfig:
        r = self.r
        table = r.table(item, path, ("name", "alias", "adapter", "luns", "remote_port", "auth",
                                     "acl"))
        name = r.get(table, "name", path, str, required=True,
                     check=lambda v: None if _IQN.match(v) and len(v) <= 223 else
                     "an iSCSI name is iqn.YYYY-MM.reversed.domain[:suffix], eui. or naa.")
        remote = self._wwn(table, "remote_port", path)
        luns = self._lun_map(table, path)
        if remote is not None and luns:
            raise r.fail((*path, "luns"), "an FC target's LUNs come from its remote port")
        chap = self._chap(table["auth"], (*path, "auth")) if "auth" in table else None
        acl = self._acl(table["acl"], (*path, "acl")) if "acl" in table else None
        return TargetConfig(name=name, adapter=r.get(table, "adapter", path, str, required=True),
                            alias=r.optional(table, "alias", path, str), luns=luns,
                            remote_port=remote, chap=chap, acl=acl)

    def _acl(self, value: Any, path: KeyPath) -> tuple[AccessEntry, ...]:
        """``acl = ["iqn...", { initiator = "iqn...", auth = {...} }, ...]``."""
        r = self.r
        if not isinstance(value, list):
            raise r.fail(path, "must be a list of initiator names or { initiator, auth } tables")
        out: list[AccessEntry] = []
        seen: set[str] = set()
        for i, item in enumerate(value):
            where = (*path, i)
            if isinstance(item, str):
                table: Mapping[str, Any] = {"initiator": item}
            else:
                table = r.table(item, where, ("initiator", "auth", "luns", "read_only"))
            initiator = r.get(table, "initiator", where, str, required=True,
                              check=lambda v: None if _IQN.match(v) and len(v) <= 223 else
                              "an iSCSI name is iqn.YYYY-MM.reversed.domain[:suffix], eui. "
                              "or naa.")
            if initiator.lower() in seen:
                raise r.fail(where, f"{initiator} is listed twice")
            seen.add(initiator.lower())
            chap = self._chap(table["auth"], (*where, "auth")) if "auth" in table else None
            luns: frozenset[int] | None = None
            if "luns" in table:
                numbers = r.get(table, "luns", where, list)
                if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 16383
                           for n in numbers):
                    raise r.fail((*where, "luns"), "must be a list of LUN numbers (0-16383)")
                luns = frozenset(numbers)
            out.append(AccessEntry(initiator, chap, luns,
                                   r.get(table, "read_only", where, bool, False)))
        return tuple(out)

    def _chap(self, value: Any, path: KeyPath) -> ChapPolicy:
        """``{ user, secret | secret_file, mutual_user, mutual_secret | mutual_secret_file,
        algorithms }``: the initiator's CHAP credentials, and the target's for mutual CHAP."""
        r = self.r
        table = r.table(value, path, ("user", "secret", "secret_file", "mutual_user",
                                      "mutual_secret", "mutual_secret_file", "algorithms"))
        initiator = self._chap_secret(table, path, "user", "secret")
        if initiator is None:
            raise r.fail(path, "CHAP needs 'user' and 'secret' or 'secret_file'")
        target = self._chap_secret(table, path, "mutual_user", "mutual_secret")
        names = r.get(table, "algorithms", path, list, ["SHA3-256", "SHA-256", "SHA-1", "MD5"])
        try:
            algorithms = parse_algorithms([str(n) for n in names])
            return ChapPolicy(initiator, target, algorithms)
        except ValueError as exc:
            raise r.fail(path, str(exc)) from None

    def _chap_secret(self, table: Mapping[str, Any], path: KeyPath, user_key: str,
                     secret_key: str) -> ChapSecret | None:
        r = self.r
        file_key = f"{secret_key}_file"
        user = r.optional(table, user_key, path, str)
        if user is None:
            if secret_key in table or file_key in table:
                raise r.fail((*path, user_key), f"missing: a {secret_key} needs its {user_key}")
            return None
        if (secret_key in table) == (file_key in table):
            raise r.fail(path, f"give exactly one of '{secret_key}' and '{file_key}'")
        if secret_key in table:
            secret = r.get(table, secret_key, path, str).encode("utf-8")
        else:
            secret = self._secret_file(r.get(table, file_key, path, str), (*path, file_key))
        try:
            return ChapSecret(user, secret)
        except ValueError as exc:
            # The message says how long a secret must be, never what it is.
            raise r.fail((*path, secret_key if secret_key in table else file_key),
                         str(exc)) from None

    def _secret_file(self, name: str, where: KeyPath) -> bytes:
        """A secret kept in a file only its owner may read (the first line, without its end)."""
        r = self.r
        path = self.base / name
        try:
            info = os.stat(path)
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise r.fail(where, f"{path} is readable by others: chmod 600 it")
            if info.st_uid != os.geteuid():
                raise r.fail(where, f"{path} belongs to another user")
            data = path.read_bytes()
        except OSError as exc:
            raise r.fail(where, f"cannot read {path}: {exc.strerror}") from None
        return data.split(b"\n", 1)[0].rstrip(b"\r")

    # ------------------------------------------------------------------ across sections

    def _unique(self, items: Sequence[Any], key: str, what: str, attr: str = "name") -> None:
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            value = str(getattr(item, attr)).lower()
            if value in seen:
                self.r.problem((key, i, attr), f"{what} {getattr(item, attr)!r} is already "
                                               f"defined ({key}[{seen[value]}])")
            seen.setdefault(value, i)

    def _cross_check(self, config: ServerConfig, doc: Mapping[str, Any]) -> None:
        r = self.r
        self._unique(config.stores, "stores", "store")
        self._unique(config.controllers, "controllers", "controller")
        self._unique(config.adapters, "adapters", "adapter")
        self._unique(config.targets, "targets", "target")
        stores = {s.name: s for s in config.stores}
        controllers = {c.name: c for c in config.controllers}
        adapters = {a.name: a for a in config.adapters}
        users: dict[str, str] = {}  # store -> who uses it (a store backs one thing)

        def use(store: str, who: str, where: KeyPath) -> None:
            if store not in stores:
                r.problem(where, f"no store named {store!r} (stores: "
                                 f"{', '.join(sorted(stores)) or 'none'})")
            elif store in users:
                r.problem(where, f"store {store!r} is already used by {users[store]}")
            else:
                users[store] = who

        arrays: dict[str, str] = {}  # array -> controller
        for ci, controller in enumerate(config.controllers):
            for ai, array in enumerate(controller.arrays):
                if array.name in arrays:
                    r.problem(("controllers", ci, "arrays", ai, "name"),
                              f"array {array.name!r} is already defined")
                arrays[array.name] = controller.name
                for mi, member in enumerate(array.members):
                    use(member, f"array {array.name!r}",
                        ("controllers", ci, "arrays", ai, "members", mi))
                sizes = {stores[m].block_size for m in array.members if m in stores}
                if len(sizes) > 1:
                    r.problem(("controllers", ci, "arrays", ai, "members"),
                              "members must share one block size")
            for fi, fault in enumerate(controller.faults):
                if fault.kind != "fail-member":
                    continue
                where_f: KeyPath = ("controllers", ci, "faults", fi)
                array_cfg = next((a for a in controller.arrays if a.name == fault.array), None)
                if array_cfg is None:
                    r.problem((*where_f, "array"), f"controller {controller.name!r} has no "
                                                   f"array {fault.array!r}")
                elif fault.member >= len(array_cfg.members):
                    r.problem((*where_f, "member"), f"array {array_cfg.name!r} has members "
                                                    f"0..{len(array_cfg.members) - 1}")
            seen_addr: dict[tuple[int, int], int] = {}
            for pi, port in enumerate(controller.remote_ports):
                where: KeyPath = ("controllers", ci, "remote_ports", pi)
                if (port.bus, port.target_id) in seen_addr:
                    r.problem((*where, "target_id"), f"bus {port.bus} target id "
                              f"{port.target_id} is already remote port "
                              f"{seen_addr[(port.bus, port.target_id)]}")
                seen_addr[(port.bus, port.target_id)] = pi
                for li, entry in enumerate(port.luns):
                    use(entry.source, f"remote port {port.wwpn} LUN {entry.lun}",
                        (*where, "luns", li))
            wwpns = [parse_wwn(p.wwpn) for p in controller.remote_ports]
            if len(set(wwpns)) != len(wwpns):
                r.problem(("controllers", ci, "remote_ports"), "remote port WWPNs must differ")
        used_controllers: dict[str, str] = {}
        for ai, adapter in enumerate(config.adapters):
            if adapter.controller not in controllers:
                r.problem(("adapters", ai, "controller"),
                          f"no controller named {adapter.controller!r} (controllers: "
                          f"{', '.join(sorted(controllers)) or 'none'})")
            elif adapter.controller in used_controllers:
                r.problem(("adapters", ai, "controller"),
                          f"controller {adapter.controller!r} is already driven by adapter "
                          f"{used_controllers[adapter.controller]!r}")
            else:
                used_controllers[adapter.controller] = adapter.name
        dangling = any(a.controller not in controllers for a in config.adapters)
        for ci, controller in enumerate(config.controllers):
            if controller.name not in used_controllers and not dangling:
                r.problem(("controllers", ci), f"controller {controller.name!r} has no adapter "
                                               "([[adapters]] controller = ...)")
        fc_ports_named: set[tuple[str, int]] = set()
        for ti, target in enumerate(config.targets):
            where = ("targets", ti)
            bound = adapters.get(target.adapter)
            if bound is None:
                r.problem((*where, "adapter"), f"no adapter named {target.adapter!r}")
                continue
            driven = controllers.get(bound.controller)
            if driven is None:
                continue
            self._check_target_luns(target, where, bound, driven, arrays, users, use,
                                    fc_ports_named)
        if not config.targets:
            r.problem((), "no [[targets]]: nothing would be exported")

    def _check_target_luns(self, target: TargetConfig, where: KeyPath, adapter: AdapterConfig,
                           controller: ControllerConfig, arrays: Mapping[str, str],
                           users: dict[str, str], use: Callable[[str, str, KeyPath], None],
                           fc_ports_named: set[tuple[str, int]]) -> None:
        r = self.r
        if controller.kind == "fc":
            if target.remote_port is None:
                r.problem(where, "a target on an FC adapter names its 'remote_port' (WWPN)")
                return
            wwpn = parse_wwn(target.remote_port)
            if wwpn not in {parse_wwn(p.wwpn) for p in controller.remote_ports}:
                r.problem((*where, "remote_port"), f"controller {controller.name!r} has no "
                                                   f"remote port {target.remote_port}")
            elif (controller.name, wwpn) in fc_ports_named:
                r.problem((*where, "remote_port"), "another target already names this "
                                                   "remote port")
            fc_ports_named.add((controller.name, wwpn))
            return
        if target.remote_port is not None:
            r.problem((*where, "remote_port"), f"adapter {adapter.name!r} drives a "
                                               f"{controller.kind} controller, not FC")
        if not target.luns:
            r.problem(where, "a target needs 'luns'")
        for li, entry in enumerate(target.luns):
            lpath: KeyPath = (*where, "luns", li)
            if entry.removable and controller.kind != "disk":
                r.problem((*lpath, "removable"), "removable-medium units are made by disk "
                                                 f"controllers, not {controller.kind!r} ones")
            if controller.kind == "raid":
                if arrays.get(entry.source) != controller.name:
                    r.problem(lpath, f"controller {controller.name!r} has no array "
                                     f"{entry.source!r}")
                elif entry.source in users:
                    r.problem(lpath, f"array {entry.source!r} is already used by "
                                     f"{users[entry.source]}")
                else:
                    users[entry.source] = f"target {target.name} LUN {entry.lun}"
            else:
                use(entry.source, f"target {target.name} LUN {entry.lun}", lpath)
