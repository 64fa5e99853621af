"""The ``emuhba`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from emuhba.bench_port import add_bench_parser
from emuhba.logs import LEVELS, configure_logging
from emuhba.miniport import PORT_MODEL_SCSIPORT, PORT_MODEL_STORPORT

if TYPE_CHECKING:
    from emuhba.control import ControlServer
    from emuhba.hba import Hba
    from emuhba.metrics import MetricsServer
    from target.portal import TargetPortal

log = structlog.get_logger("emuhba")

DEFAULT_IQN = "iqn.2026-11.io.emuhba:target0"
DEFAULT_PORTAL = "0.0.0.0:3260"
DEFAULT_RAM_LUN = "1G"

DIGEST_POLICIES: dict[str, tuple[str, ...]] = {
    "optional": ("None", "CRC32C"),
    "required": ("CRC32C",),
    "off": ("None",),
}

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtKMGT]?)(i?[bB])?\s*$")


def parse_size(text: str) -> int:
    """'4096', '64M', '1G', '2GiB' -> bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64M, 1G)")
    value = int(match.group(1)) * (1 << (10 * " KMGT".index((match.group(2) or " ").upper())))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def parse_hostport(text: str, default_port: int = 3260) -> tuple[str, int]:
    """'HOST:PORT', 'HOST', '[v6]:PORT' or ':PORT'."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:
        host, port = text, ""  # bare IPv6
    else:
        host, port = text, ""
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return (host or "0.0.0.0", number)


@dataclass
class FileLunSpec:
    path: str
    size: int | None


def parse_file_lun(text: str) -> FileLunSpec:
    path, _, size = text.partition(",")
    if not path:
        raise argparse.ArgumentTypeError("--file-lun needs PATH[,SIZE]")
    return FileLunSpec(path, parse_size(size) if size else None)


class _LunOrder(argparse.Action):
    """Keep --ram-lun and --file-lun in the order given: that order is the LUN numbering."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        luns = getattr(namespace, "luns", None) or []
        kind = "ram" if option_string == "--ram-lun" else "file"
        luns.append((kind, values))
        namespace.luns = luns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emuhba",
        description="User-space emulated host bus adapter (Storport model) with an iSCSI target "
                    "front end.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="run the iSCSI target",
        description="Run the iSCSI target. With no options: listens on 0.0.0.0:3260 and exports "
                    f"{DEFAULT_IQN} with one 1 GiB RAM LUN.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--portal", action="append", type=parse_hostport, metavar="HOST:PORT",
                       help="address to listen on (repeatable); default " + DEFAULT_PORTAL)
    serve.add_argument("--advertise", action="append", metavar="HOST:PORT", default=[],
                       help="address announced in SendTargets discovery answers (repeatable). "
                            "Needed when initiators reach the target through NAT (a VM, a "
                            "container): default is the address each connection arrived on")
    serve.add_argument("--iqn", default=DEFAULT_IQN, help="iSCSI name of the exported target")
    serve.add_argument("--alias", default=None, help="TargetAlias announced at login")
    serve.add_argument("--ram-lun", action=_LunOrder, type=parse_size, metavar="SIZE",
                       help="add a RAM-backed LUN of SIZE (e.g. 64M, 1G); repeatable, LUNs are "
                            "numbered in the order given")
    serve.add_argument("--file-lun", action=_LunOrder, type=parse_file_lun, metavar="PATH[,SIZE]",
                       help="add a file-backed LUN; SIZE creates or extends the file (sparse), "
                            "without it the file's size is used; repeatable")
    for which in ("header", "data"):
        serve.add_argument(
            f"--{which}-digest", choices=tuple(DIGEST_POLICIES), default="optional",
            help=f"{which} digest policy: 'optional' accepts None or CRC32C in the initiator's "
                 "order of preference, 'required' accepts only CRC32C (chosen even when the "
                 "initiator lists None first), 'off' accepts only None")
    serve.add_argument("--block-size", type=int, choices=(512, 4096), default=512,
                       help="logical block size of every LUN")
    serve.add_argument("--queue-depth", type=int, default=64,
                       help="per-LUN queue depth at the port driver")
    serve.add_argument("--port-model", choices=(PORT_MODEL_STORPORT, PORT_MODEL_SCSIPORT),
                       default=PORT_MODEL_STORPORT,
                       help="queuing model of the port driver: 'storport' (per-LUN queues, queue "
                            "controls, full duplex) or 'scsiport' (one FIFO adapter queue of 254, "
                            "half duplex, no queue controls), for comparison")
    serve.add_argument("--control-socket", metavar="PATH", default=None,
                       help="Unix socket `emuhba ctl` talks to (mode 0600, owner only); default "
                            "/run/emuhba/PORT.sock as root, else $XDG_RUNTIME_DIR/emuhba/PORT.sock "
                            "or /tmp/emuhba-UID/PORT.sock, PORT being the first portal's port")
    serve.add_argument("--no-control", action="store_true",
                       help="do not open a control socket")
    serve.add_argument("--metrics", type=parse_metrics_address, metavar="HOST:PORT", default=None,
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (':PORT' listens "
                            "on every interface)")
    serve.add_argument("--log-format", choices=("console", "json"), default="console",
                       help="log output format")
    serve.add_argument("--log-level", choices=LEVELS, default="info", help="least severe level logged")
    _add_ctl_parser(sub)
    add_bench_parser(sub)
    return parser


def parse_metrics_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' (every interface); the port is required."""
    stripped = text.strip()
    if not re.search(r":\d+$", stripped):
        raise argparse.ArgumentTypeError(f"--metrics needs HOST:PORT or :PORT, not {text!r}")
    return parse_hostport(stripped)


def _advertise_list(values: Sequence[str]) -> list[str]:
    from target.portal import format_address

    result = []
    for value in values:
        host, port = parse_hostport(value)
        result.append(format_address(host, port))
    return result


async def serve(args: argparse.Namespace) -> int:
    from emuhba.hba import Hba
    from miniports.disk import DiskMiniport
    from target.portal import PortalSettings, TargetNode, TargetPortal, format_address
    from target.server import TargetServer

    specs: list[tuple[str, object]] = getattr(args, "luns", None) or [
        ("ram", parse_size(DEFAULT_RAM_LUN))]
    lun_specs: list[tuple[str, str | int, int | None]] = []
    for kind, value in specs:
        if kind == "ram":
            assert isinstance(value, int)
            lun_specs.append(("ram", value, None))
        else:
            assert isinstance(value, FileLunSpec)
            lun_specs.append(("file", os.path.abspath(value.path), value.size))
    try:
        miniport = DiskMiniport.from_luns(
            [("ram", value) if kind == "ram" else (kind, value, size)
             for kind, value, size in lun_specs], target_port_name=f"{args.iqn},t,0x0001", block_size=args.block_size,
            queue_depth=args.queue_depth)
    except (OSError, ValueError) as exc:
        log.error("cannot create LUNs", error=str(exc))
        return 2
    hba = Hba(miniport, name="hba0", model=args.port_model)
    await hba.start()
    from target.keys import TargetLimits

    limits = TargetLimits(header_digests=DIGEST_POLICIES[args.header_digest],
                          data_digests=DIGEST_POLICIES[args.data_digest])
    settings = PortalSettings(limits=limits, advertise=_advertise_list(args.advertise))
    node = TargetNode(name=args.iqn, backend=hba, path_id=0, target_id=0, alias=args.alias)
    portal = TargetPortal([node], settings)
    server = TargetServer(portal)
    portals = args.portal or [parse_hostport(DEFAULT_PORTAL)]
    # Control and metrics come up before the portals, so that a server that accepts iSCSI
    # connections can already be controlled and scraped (tests and scripts wait for the portal).
    info: dict[str, object] = {}
    extras = await _start_extras(args, hba, portal, portals[0][1], info)
    if extras is None:
        await hba.stop()
        return 2
    listening: list[str] = []
    try:
        for host, port in portals:
            bound = await server.listen(host, port)
            for address in bound:
                listening.append(format_address(str(address[0]), int(address[1])))
                log.info("listening", portal=f"{address[0]}:{address[1]}", target=args.iqn)
    except OSError as exc:
        log.error("cannot listen", error=str(exc))
        await extras.close()
        await server.close()
        await hba.stop()
        return 2
    info["portals"] = listening
    for lun in hba.luns(0, 0):
        log.info("lun ready", target=args.iqn, lun=lun, spec=_describe(lun_specs[lun]) if lun < len(lun_specs) else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await extras.close()
    await server.close()
    await hba.stop()
    log.info("stopped")
    return 0


@dataclass
class _Extras:
    """The control socket and the metrics endpoint of a running server (either may be off)."""

    control: ControlServer | None = None
    metrics: MetricsServer | None = None

    async def close(self) -> None:
        if self.control is not None:
            await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()


async def _start_extras(args: argparse.Namespace, hba: Hba, portal: TargetPortal,
                        portal_port: int, info: dict[str, object]) -> _Extras | None:
    """Metrics endpoint and control socket; ``info`` (shown by ``ctl status``) stays shared so
    that what is learnt later (the bound portals) still shows."""
    from emuhba.control import Controller, ControlServer, ControlSetupError, default_socket_path
    from emuhba.metrics import MetricsServer, build_registry
    from target.portal import format_address

    extras = _Extras()
    if args.metrics is not None:
        host, port = args.metrics
        extras.metrics = MetricsServer(build_registry(hba, portal), host, port)
        try:
            addresses = await extras.metrics.start()
        except OSError as exc:
            log.error("cannot serve metrics", address=format_address(host, port), error=str(exc))
            return None
        urls = [f"http://{format_address(h, p)}/metrics" for h, p in addresses]
        info["metrics"] = urls
        log.info("metrics listening", urls=urls)
    if not args.no_control:
        explicit = args.control_socket is not None
        # An ephemeral portal port (0) is unknown until bound: name the socket by our pid then.
        path = Path(args.control_socket).absolute() if explicit else \
            default_socket_path(portal_port) if portal_port else \
            default_socket_path(3260).with_name(f"pid-{os.getpid()}.sock")
        info["control_socket"] = str(path)
        extras.control = ControlServer(Controller(hba, portal, info=info), path,
                                       private_directory=not explicit)
        try:
            await extras.control.start()
        except ControlSetupError as exc:
            log.error("cannot open the control socket", error=str(exc),
                      hint="--control-socket PATH picks another place, --no-control none")
            extras.control = None
            await extras.close()
            return None
    return extras


def _describe(spec: tuple[str, str | int, int | None]) -> str:
    kind, value, size = spec
    if kind == "ram":
        return f"ram {value} bytes"
    return f"file {value}" + (f" ({size} bytes)" if size else "")


# ------------------------------------------------------------------------------------ ctl

CTL_EXIT_REFUSED = 1  # the server answered with an error
CTL_EXIT_UNREACHABLE = 3  # no server at the socket (usage errors exit 2, as argparse does)


def _ctl_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--socket/--port/--json/--timeout, accepted before or after the command word."""
    default: object = None if top else argparse.SUPPRESS
    parser.add_argument("--socket", metavar="PATH", default=default,
                        help="control socket of the server (default: the one for --port, else "
                             "the only socket in the runtime directory, else PORT 3260's)")
    parser.add_argument("--port", type=int, metavar="N", default=default,
                        help="iSCSI portal port of the server: selects its default socket")
    parser.add_argument("--json", action="store_true",
                        default=False if top else argparse.SUPPRESS,
                        help="print the server's answer as JSON")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        default=10.0 if top else argparse.SUPPRESS,
                        help="how long to wait for the server")


def _add_ctl_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ctl = sub.add_parser(
        "ctl", help="inspect and control a running emuhba serve",
        description="Talk to a running `emuhba serve` over its control socket. A LUN is L (a "
                    "LUN of the default target) or PATH:TARGET:LUN. Exit status: 0 done, "
                    "1 refused by the server, 2 usage error, 3 server unreachable.")
    _ctl_common(ctl, top=True)
    commands = ctl.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)

    def leaf(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
             text: str) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=text, description=text)
        _ctl_common(parser, top=False)
        return parser

    leaf(commands, "status", "port model, adapter state and counters, targets, sessions")
    leaf(commands, "luns", "per LUN: queue depth, queued/held, outstanding, completed, "
                           "busy retries, pauses, resets, state")
    leaf(commands, "sessions", "iSCSI sessions: initiator, ISID, TSIH, PDU counters")
    controls = (
        ("pause", "send nothing to a LUN or to the adapter for --seconds T (or until resumed)"),
        ("resume", "end a pause now"),
        ("busy", "hold a LUN or the adapter until --requests N of its requests complete"),
        ("ready", "end a busy state now"),
    )
    for verb, text in controls:
        verb_parser = commands.add_parser(verb, help=text, description=text)
        scopes = verb_parser.add_subparsers(dest="scope", metavar="lun L | adapter",
                                            required=True)
        lun = leaf(scopes, "lun", f"{verb} one logical unit")
        lun.add_argument("lun", metavar="L", help="L or PATH:TARGET:LUN")
        adapter = leaf(scopes, "adapter", f"{verb} the whole adapter")
        for parser in (lun, adapter):
            if verb == "pause":
                parser.add_argument("--seconds", type=float, required=True, metavar="T",
                                    help="how long the pause lasts; it ends by itself")
            elif verb == "busy":
                parser.add_argument("--requests", type=int, required=True, metavar="N",
                                    help="completions after which it is ready by itself")
    depth = commands.add_parser("set-depth", help="set a LUN's queue depth",
                                description="Set a LUN's queue depth (1-255 unless the miniport "
                                            "declares extended SRBs).")
    depth_scopes = depth.add_subparsers(dest="scope", metavar="lun L DEPTH", required=True)
    depth_lun = leaf(depth_scopes, "lun", "set one logical unit's queue depth")
    depth_lun.add_argument("lun", metavar="L", help="L or PATH:TARGET:LUN")
    depth_lun.add_argument("depth", type=int, metavar="DEPTH")


def _ctl_request(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    command: str = args.ctl_command
    if command in ("status", "luns", "sessions"):
        return command, {}
    if command == "set-depth":
        return "set_depth", {"lun": args.lun, "depth": args.depth}
    request: dict[str, object] = {"scope": args.scope}
    if args.scope == "lun":
        request["lun"] = args.lun
    if command == "pause":
        request["seconds"] = args.seconds
    elif command == "busy":
        request["requests"] = args.requests
    return command, request


def run_ctl(args: argparse.Namespace, out: TextIO | None = None,
            err: TextIO | None = None) -> int:
    from emuhba.control import ControlClient, ControlError, ControlUnavailable, find_socket

    out = out or sys.stdout
    err = err or sys.stderr
    path = find_socket(args.socket, args.port)
    command, request = _ctl_request(args)
    try:
        with ControlClient(path, timeout=args.timeout) as client:
            result = client.request(command, **request)
    except ControlUnavailable as exc:
        if args.json:
            _print_json(out, {"ok": False, "error": {"code": "unreachable", "message": str(exc),
                                                     "socket": str(exc.path)}})
        print(f"emuhba ctl: {exc}", file=err)
        return CTL_EXIT_UNREACHABLE
    except ControlError as exc:
        if args.json:
            _print_json(out, {"ok": False, "error": exc.to_json()})
        print(f"emuhba ctl: {exc.message}", file=err)
        return CTL_EXIT_REFUSED
    if args.json:
        _print_json(out, result)
    else:
        out.write(render_ctl(args.ctl_command, result))
    return 0


def _print_json(out: TextIO, value: object) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)]) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _state_text(unit: dict[str, Any]) -> str:
    state = str(unit.get("state", "?"))
    extra = []
    if unit.get("pause_left_s") is not None:
        extra.append(f"{unit['pause_left_s']:.1f} s left")
    if unit.get("busy") and unit.get("busy_remaining"):
        extra.append(f"{unit['busy_remaining']} to complete")
    return state + (f" ({', '.join(extra)})" if extra else "")


_LUN_COLUMNS = (
    ("LUN", "address"), ("DEPTH", "queue_depth"), ("QUEUED", "queued"), ("HELD", "held"),
    ("OUTSTANDING", "outstanding"), ("COMPLETED", "completed"), ("BUSY-RETRIES", "busy_retries"),
    ("PAUSES", "pauses"), ("RESETS", "resets"), ("P99-MS", "latency_p99_s"),
)
_SESSION_COLUMNS = (
    ("TSIH", "tsih"), ("INITIATOR", "initiator"), ("ISID", "isid"), ("TARGET", "target"),
    ("CONNS", None), ("ACTIVE", "commands_active"), ("PDUS-IN", "pdus_in"),
    ("PDUS-OUT", "pdus_out"), ("REJECTS", "rejects"), ("DIGEST-ERRORS", "digest_errors"),
)


def render_ctl(command: str, result: Any) -> str:
    """The human form of a ctl answer."""
    if command == "luns":
        rows = [[_ms(unit.get(key)) if key.endswith("_s") else unit.get(key)
                 for _, key in _LUN_COLUMNS] + [_state_text(unit)] for unit in result]
        return format_table([h for h, _ in _LUN_COLUMNS] + ["STATE"], rows)
    if command == "sessions":
        if not result:
            return "no sessions\n"
        rows = [[len(s["connections"]) if key is None
                 else "(discovery)" if key == "target" and s.get("discovery") else s.get(key)
                 for _, key in _SESSION_COLUMNS] for s in result]
        return format_table([h for h, _ in _SESSION_COLUMNS], rows)
    if command == "status":
        return _render_status(result)
    if command == "set-depth":
        return (f"LUN {result['address']}: queue depth {result['queue_depth']} "
                f"(was {result.get('previous_queue_depth', '?')})\n")
    if "address" in result:
        return f"LUN {result['address']}: {_state_text(result)}\n"
    return f"adapter {result.get('name', '?')}: {_state_text(result)}\n"


def _ms(seconds: object) -> object:
    """Seconds as milliseconds to three significant figures; '-' before any request."""
    if not isinstance(seconds, int | float) or not seconds:
        return None
    if seconds == float("inf"):
        return "inf"
    return float(f"{seconds * 1e3:.3g}")


def _render_status(status: dict[str, Any]) -> str:
    lines = [f"emuhba {status.get('version', '?')}  pid {status.get('pid', '?')}  "
             f"up {status.get('uptime_s', 0):.0f} s  port model {status.get('port_model', '?')}"]
    for adapter in status.get("adapters", []):
        depth = "any" if adapter.get("extended_srb") else str(adapter.get("max_queue_depth"))
        limit = adapter.get("adapter_limit")
        lines.append(f"adapter {adapter['name']}: miniport {adapter['miniport']}, "
                     f"{_state_text(adapter)}, {adapter['units']} units, extended SRBs "
                     f"{_cell(adapter['extended_srb'])} (max LUN depth {depth}), adapter limit "
                     f"{limit if limit is not None else 'none'}")
        counters = adapter.get("counters", {})
        figures = [(label, counters.get(key)) for label, key in (
            ("queued", "queued"), ("held", "held"), ("outstanding", "outstanding"),
            ("peak outstanding", "peak_outstanding"), ("completed", "completed"),
            ("busy retries", "busy_retries"), ("aborted", "aborted"),
            ("adapter pauses", "pauses"), ("adapter busies", "busies"),
            ("LUN pauses", "device_pauses"), ("LUN busies", "device_busies"))]
        figures.append(("resets", adapter.get("resets")))
        lines.append("  " + "  ".join(f"{k} {v}" for k, v in figures if v is not None))
        p50, p99 = _ms(adapter.get("latency_p50_s")), _ms(adapter.get("latency_p99_s"))
        if p50 is not None:
            lines.append(f"  latency p50 <= {p50} ms  p99 <= {p99} ms")
    for target in status.get("targets", []):
        luns = ", ".join(str(n) for n in target.get("luns", [])) or "none"
        lines.append(f"target {target.get('name') or '-'} at {target['path_id']}:"
                     f"{target['target_id']}: LUNs {luns}")
    if status.get("portals"):
        lines.append("portals: " + ", ".join(status["portals"]))
    if status.get("metrics"):
        lines.append("metrics: " + ", ".join(status["metrics"]))
    if status.get("control_socket"):
        lines.append("control socket: " + status["control_socket"])
    sessions = status.get("sessions", [])
    lines.append(f"sessions: {len(sessions)}")
    for s in sessions:
        lines.append(f"  TSIH {s['tsih']}  {s['initiator']}  ISID {s['isid']}  "
                     f"{s['target'] or '(discovery)'}  {s['connections']} connection(s)")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "ctl":
        return run_ctl(args)
    if args.command == "bench":
        code: int = args.bench_main(args)
        return code
    configure_logging(args.log_format, args.log_level)
    if args.command == "serve":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a hard dependency; degrade, say so
            log.warning("uvloop not available, using the default event loop")
            return asyncio.run(serve(args))
        with contextlib.suppress(KeyboardInterrupt):
            return uvloop.run(serve(args))
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
