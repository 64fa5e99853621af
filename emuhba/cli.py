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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from emuhba.bench_port import add_bench_parser
from emuhba.logs import LEVELS, configure_logging
from emuhba.miniport import PORT_MODEL_SCSIPORT, PORT_MODEL_STORPORT

if TYPE_CHECKING:
    from emuhba.config import ServerConfig
    from emuhba.control import ControlServer
    from emuhba.hba import Hba
    from emuhba.metrics import MetricsServer
    from target.chap import ChapPolicy
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
    serve.add_argument("--chap", metavar="USER:SECRET_FILE", default=None,
                       help="logins must authenticate with CHAP as USER, with the secret in "
                            "SECRET_FILE (owner-only; a secret never goes on a command line)")
    serve.add_argument("--chap-mutual", metavar="USER:SECRET_FILE", default=None,
                       help="the target's own CHAP name and secret, for initiators that ask "
                            "for mutual CHAP")
    serve.add_argument("--discovery-chap", metavar="USER:SECRET_FILE", default=None,
                       help="discovery sessions must authenticate with CHAP as USER")
    serve.add_argument("--discovery-chap-mutual", metavar="USER:SECRET_FILE", default=None,
                       help="the target's CHAP name and secret for discovery sessions that ask "
                            "for mutual CHAP")
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
    serve.add_argument("--config", metavar="FILE.toml", default=None,
                       help="describe the whole installation (stores, controllers, adapters, "
                            "targets, portals) in a TOML file; see examples/. Excludes the "
                            "options above that describe one")
    serve.add_argument("--log-format", choices=("console", "json"), default=None,
                       help="log output format (default: console, or the config's)")
    serve.add_argument("--log-level", choices=LEVELS, default=None,
                       help="least severe level logged (default: info, or the config's)")
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


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The command-line form of an installation: one disk controller, one adapter and one
    target whose LUNs are the --ram-lun/--file-lun stores in the order given."""
    from emuhba.config import (
        AdapterConfig,
        ControllerConfig,
        LunMapEntry,
        ServerConfig,
        StoreConfig,
        TargetConfig,
    )

    specs: list[tuple[str, object]] = getattr(args, "luns", None) or [
        ("ram", parse_size(DEFAULT_RAM_LUN))]
    stores: list[StoreConfig] = []
    for lun, (kind, value) in enumerate(specs):
        if kind == "ram":
            assert isinstance(value, int)
            stores.append(StoreConfig(f"lun{lun}", "ram", value, block_size=args.block_size))
        else:
            assert isinstance(value, FileLunSpec)
            stores.append(StoreConfig(f"lun{lun}", "file", value.size,
                                      path=os.path.abspath(value.path),
                                      block_size=args.block_size))
    chap = _chap_from_args(args, "chap")
    discovery_chap = _chap_from_args(args, "discovery_chap")
    return ServerConfig(
        source="command line",
        portals=tuple(args.portal or [parse_hostport(DEFAULT_PORTAL)]),
        advertise=tuple(_advertise_list(args.advertise)),
        header_digest=args.header_digest, data_digest=args.data_digest,
        discovery_chap=discovery_chap,
        stores=tuple(stores),
        controllers=(ControllerConfig("disk0", "disk"),),
        adapters=(AdapterConfig("hba0", "disk0", args.port_model, args.queue_depth),),
        targets=(TargetConfig(args.iqn, "hba0", args.alias,
                              tuple(LunMapEntry(i, s.name) for i, s in enumerate(stores)),
                              chap=chap),),
        control_socket=args.control_socket, control=not args.no_control,
        metrics=args.metrics)


def _chap_from_args(args: argparse.Namespace, dest: str) -> ChapPolicy | None:
    """--chap and --chap-mutual, or --discovery-chap and --discovery-chap-mutual
    (USER:SECRET_FILE each), checked as a config file's auth is."""
    from emuhba.config import ConfigError, Problem, chap_from_files

    def split(flag: str, value: str) -> tuple[str, str]:
        user, sep, path = value.partition(":")
        if not sep or not user or not path:
            raise ConfigError([Problem("command line", None, flag,
                                       f"{value!r}: give USER:SECRET_FILE")])
        return user, path

    flag = "--" + dest.replace("_", "-")
    chap, mutual = getattr(args, dest, None), getattr(args, f"{dest}_mutual", None)
    if chap is None:
        if mutual is not None:
            raise ConfigError([Problem("command line", None, f"{flag}-mutual",
                                       f"needs {flag} too")])
        return None
    user, path = split(flag, chap)
    mutual_user, mutual_path = split(f"{flag}-mutual", mutual) if mutual else (None, None)
    return chap_from_files(user, path, mutual_user, mutual_path, flag=flag)


_LUN_FLAGS = ("luns", "portal", "advertise", "alias", "metrics", "control_socket", "chap",
              "chap_mutual", "discovery_chap", "discovery_chap_mutual")


def _check_config_flags(args: argparse.Namespace) -> str | None:
    """--config describes the installation; flags that describe one too are refused with it."""
    given = [name for name in _LUN_FLAGS if getattr(args, name, None)]
    if args.iqn != DEFAULT_IQN:
        given.append("iqn")
    if args.no_control:
        given.append("no_control")
    for name, default in (("header_digest", "optional"), ("data_digest", "optional"),
                          ("block_size", 512), ("queue_depth", 64),
                          ("port_model", PORT_MODEL_STORPORT)):
        if getattr(args, name) != default:
            given.append(name)
    if not given:
        return None
    flags = ", ".join("--" + ("ram-lun/--file-lun" if g == "luns" else g.replace("_", "-"))
                      for g in given)
    return f"{flags}: not with --config (the config file describes the installation)"


async def serve(args: argparse.Namespace, config: ServerConfig | None = None) -> int:
    from emuhba.config import ConfigError
    from emuhba.installation import Installation
    from target.keys import TargetLimits
    from target.portal import PortalSettings, TargetPortal, format_address
    from target.server import TargetServer

    if config is None:
        try:
            config = config_from_args(args)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("bad command line", problem=str(problem))
            return 2
    try:
        installation = Installation(config)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("cannot build the installation", problem=str(problem))
        return 2
    # Signals are caught from here on: a SIGTERM that comes while the adapters start or the
    # moment the portal accepts connections (when scripts take the server to be ready) stops
    # it cleanly once it is up, instead of killing it half-way.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await installation.start()
    except Exception as exc:
        log.error("cannot start the adapters", error=str(exc))
        await installation.stop()
        return 2
    limits = TargetLimits(header_digests=DIGEST_POLICIES[config.header_digest],
                          data_digests=DIGEST_POLICIES[config.data_digest])
    settings = PortalSettings(limits=limits, advertise=list(config.advertise),
                              nop_interval=config.nop_interval_s,
                              nop_timeout=config.nop_timeout_s,
                              discovery_chap=config.discovery_chap,
                              max_sessions_per_target=config.max_sessions_per_target,
                              session_buffer_bytes=config.session_buffer_mib << 20)
    portal = TargetPortal(installation.nodes, settings)
    installation.attach_portal(portal)
    server = TargetServer(portal)
    portals = list(config.portals)
    # Control and metrics come up before the portals, so that a server that accepts iSCSI
    # connections can already be controlled and scraped (tests and scripts wait for the portal).
    info: dict[str, object] = {}
    extras = await _start_extras(config, installation.hbas, portal, portals[0][1], info)
    if extras is None:
        await installation.stop()
        return 2
    listening: list[str] = []
    try:
        for host, port in portals:
            bound = await server.listen(host, port)
            for address in bound:
                listening.append(format_address(str(address[0]), int(address[1])))
                log.info("listening", portal=f"{address[0]}:{address[1]}")
    except OSError as exc:
        log.error("cannot listen", error=str(exc))
        await extras.close()
        await server.close()
        await installation.stop()
        return 2
    info["portals"] = listening
    for adapter in installation.adapters:
        for node in adapter.nodes:
            log.info("target ready", target=node.name, adapter=adapter.config.name,
                     controller=f"{adapter.controller.name} ({adapter.controller.kind})",
                     address=f"{node.path_id}:{node.target_id}", luns=node.luns())
    await stop.wait()
    log.info("stopping")
    await extras.close()
    await server.close()
    await installation.stop()
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


async def _start_extras(config: ServerConfig, hbas: list[Hba], portal: TargetPortal,
                        portal_port: int, info: dict[str, object]) -> _Extras | None:
    """Metrics endpoint and control socket; ``info`` (shown by ``ctl status``) stays shared so
    that what is learnt later (the bound portals) still shows."""
    from emuhba.control import Controller, ControlServer, ControlSetupError, default_socket_path
    from emuhba.metrics import MetricsServer, build_registry
    from target.portal import format_address

    extras = _Extras()
    if config.metrics is not None:
        host, port = config.metrics
        extras.metrics = MetricsServer(build_registry(hbas, portal), host, port)
        try:
            addresses = await extras.metrics.start()
        except OSError as exc:
            log.error("cannot serve metrics", address=format_address(host, port), error=str(exc))
            return None
        urls = [f"http://{format_address(h, p)}/metrics" for h, p in addresses]
        info["metrics"] = urls
        log.info("metrics listening", urls=urls)
    if config.control:
        explicit = config.control_socket is not None
        # An ephemeral portal port (0) is unknown until bound: name the socket by our pid then.
        if config.control_socket is not None:
            path = Path(config.control_socket).absolute()
        elif portal_port:
            path = default_socket_path(portal_port)
        else:
            path = default_socket_path(3260).with_name(f"pid-{os.getpid()}.sock")
        info["control_socket"] = str(path)
        extras.control = ControlServer(Controller(hbas, portal, info=info), path,
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
    parser.add_argument("--adapter", metavar="NAME", default=default,
                        help="the adapter a command addresses, when the server has several "
                             "(default: the first)")


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


    _add_controller_commands(commands, leaf)


if TYPE_CHECKING:
    Leaf = Callable[[argparse._SubParsersAction[argparse.ArgumentParser], str, str],
                    argparse.ArgumentParser]


def _add_controller_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                             leaf: Leaf) -> None:
    """The emulated controller's own controls (faults, link, timing): requests that the server
    passes to the miniport as IOCTLs."""
    leaf(commands, "controller", "the emulated controller: slots, latency model, link state, "
                                 "armed faults, and what its kind adds (RAID arrays, fabric)")
    fault = commands.add_parser(
        "fault", help="arm, list or clear injected faults",
        description="Faults of the emulated controller, live. A LUN is L or PATH:TARGET:LUN; "
                    "'all' means every unit of the controller.")
    kinds = fault.add_subparsers(dest="fault_kind", metavar="KIND", required=True)
    leaf(kinds, "list", "armed faults with what is left of them")
    busy = leaf(kinds, "busy", "the next N commands end with SCSI BUSY (the port retries them)")
    busy.add_argument("unit", metavar="L|all")
    busy.add_argument("--count", type=int, required=True, metavar="N")
    medium = leaf(kinds, "medium-error",
                  "reads of an LBA range fail with MEDIUM ERROR / UNRECOVERED READ ERROR, the "
                  "first bad LBA in the sense INFORMATION field")
    medium.add_argument("unit", metavar="L|all")
    medium.add_argument("--lba", required=True, metavar="FIRST[-LAST]",
                        help="bad LBA range, inclusive")
    medium.add_argument("--writes", action="store_true",
                        help="writes to the range fail too (MEDIUM ERROR / WRITE ERROR)")
    medium.add_argument("--writes-only", action="store_true", help="only writes fail")
    latency = leaf(kinds, "latency", "add seconds to every command (0 removes it)")
    latency.add_argument("unit", metavar="L|all")
    latency.add_argument("--seconds", type=float, required=True, metavar="S")
    clear = leaf(kinds, "clear", "disarm faults (all of them without options)")
    clear.add_argument("unit", metavar="L|all", nargs="?", default="all")
    clear.add_argument("--kind", choices=("busy", "medium-error", "latency"))
    link = commands.add_parser("link", help="take the controller's link down or up",
                               description="Link down pauses the adapter for at most the "
                                           "link-down timeout; past it, requests fail with a "
                                           "status initiators retry (NOT READY, becoming ready).")
    states = link.add_subparsers(dest="link_state", metavar="down|up", required=True)
    down = leaf(states, "down", "take the link down")
    down.add_argument("--seconds", type=float, metavar="T",
                      help="bring it back up by itself after T seconds")
    leaf(states, "up", "bring the link back up now")
    raid = commands.add_parser("raid", help="RAID controller: arrays, members, rebuilds",
                               description="The emulated RAID controller's arrays (only on an "
                                           "adapter whose controller is of kind raid).")
    raid_verbs = raid.add_subparsers(dest="raid_verb", metavar="VERB", required=True)
    leaf(raid_verbs, "status", "arrays: level, state, members, rebuild progress, cache")
    fail = leaf(raid_verbs, "fail-member", "take a member disk out (the drive runs degraded)")
    fail.add_argument("array")
    fail.add_argument("member", type=int)
    replace = leaf(raid_verbs, "replace-member",
                   "put a new disk in a failed member's slot and rebuild onto it")
    replace.add_argument("array")
    replace.add_argument("member", type=int)
    replace.add_argument("--file", metavar="PATH", help="a file disk (created sparse); "
                                                        "default: a RAM disk")
    replace.add_argument("--size", type=parse_size, metavar="SIZE",
                         help="default: what the array needs per member")
    rate = leaf(raid_verbs, "rebuild-rate", "pace rebuilds (0: as fast as the disks go)")
    rate.add_argument("mib_per_s", type=float, metavar="MIB_PER_S")
    fc = commands.add_parser("fc", help="FC controller: fabric, remote ports, LUNs",
                             description="The emulated Fibre Channel fabric (only on an adapter "
                                         "whose controller is of kind fc). A remote port is "
                                         "named by its WWPN or BUS:TARGET.")
    fc_verbs = fc.add_subparsers(dest="fc_verb", metavar="VERB", required=True)
    leaf(fc_verbs, "fabric", "the HBA's names and the remote ports with their LUNs")
    add_lun = leaf(fc_verbs, "add-lun", "map a new LUN on a remote port (RSCN to the initiator)")
    add_lun.add_argument("remote_port", metavar="WWPN|BUS:TARGET")
    add_lun.add_argument("--lun", type=int, help="default: the lowest free one")
    add_lun.add_argument("--ram", type=parse_size, metavar="SIZE")
    add_lun.add_argument("--file", metavar="PATH[,SIZE]")
    remove_lun = leaf(fc_verbs, "remove-lun", "unmap a LUN (RSCN to the initiator)")
    remove_lun.add_argument("remote_port", metavar="WWPN|BUS:TARGET")
    remove_lun.add_argument("lun", type=int)
    add_port = leaf(fc_verbs, "add-port", "a remote port logs in to the fabric")
    add_port.add_argument("wwpn")
    add_port.add_argument("--bus", type=int, default=0)
    add_port.add_argument("--target-id", type=int, required=True)
    add_port.add_argument("--ram-luns", metavar="COUNTxSIZE", required=True,
                          help="its LUNs, e.g. 4x64M")
    remove_port = leaf(fc_verbs, "remove-port", "a remote port leaves the fabric for good")
    remove_port.add_argument("remote_port", metavar="WWPN|BUS:TARGET")
    offline = leaf(fc_verbs, "port-offline", "a remote port drops off the fabric")
    offline.add_argument("remote_port", metavar="WWPN|BUS:TARGET")
    offline.add_argument("--seconds", type=float, metavar="T", help="back by itself after T s")
    online = leaf(fc_verbs, "port-online", "bring an offline remote port back")
    online.add_argument("remote_port", metavar="WWPN|BUS:TARGET")
    timing = leaf(commands, "latency", "set the controller's latency model")
    timing.add_argument("--fixed-ms", type=float, default=0.0, metavar="MS",
                        help="per command")
    timing.add_argument("--per-kib-us", type=float, default=0.0, metavar="US",
                        help="per KiB transferred")
    timing.add_argument("--seek-ms", type=float, default=0.0, metavar="MS",
                        help="full-stroke seek, scaled by head travel")


def _lba_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    try:
        a = int(first, 0)
        b = int(last, 0) if last else a
    except ValueError:
        raise SystemExit(f"emuhba ctl: --lba takes FIRST or FIRST-LAST, not {text!r}") from None
    return a, b


def _unit_request(unit: str) -> dict[str, object]:
    return {} if unit == "all" else {"lun": unit}


def _controller_request(args: argparse.Namespace) -> tuple[str, dict[str, object]] | None:
    command: str = args.ctl_command
    if command == "controller":
        return "miniport", {"code": "controller"}
    if command == "latency":
        return "miniport", {"code": "latency.set", "args": {
            "fixed_s": args.fixed_ms / 1e3, "per_kib_s": args.per_kib_us / 1e6,
            "seek_s": args.seek_ms / 1e3}}
    if command == "link":
        if args.link_state == "up":
            return "miniport", {"code": "link.up"}
        return "miniport", {"code": "link.down", "args": {"seconds": args.seconds}}
    if command == "raid":
        return "miniport", _raid_request(args)
    if command == "fc":
        return "miniport", _fc_request(args)
    if command != "fault":
        return None
    kind: str = args.fault_kind
    if kind == "list":
        return "miniport", {"code": "fault.list"}
    request = _unit_request(args.unit)
    if kind == "busy":
        request["args"] = {"count": args.count}
    elif kind == "medium-error":
        first, last = _lba_range(args.lba)
        request["args"] = {"first_lba": first, "last_lba": last,
                           "reads": not args.writes_only,
                           "writes": bool(args.writes or args.writes_only)}
    elif kind == "latency":
        request["args"] = {"seconds": args.seconds}
    elif kind == "clear":
        request["args"] = {"kind": args.kind}
    request["code"] = f"fault.{kind}"
    return "miniport", request


def _raid_request(args: argparse.Namespace) -> dict[str, object]:
    verb: str = args.raid_verb
    if verb == "status":
        return {"code": "raid.status"}
    if verb == "rebuild-rate":
        return {"code": "raid.rebuild-rate", "args": {"mib_per_s": args.mib_per_s}}
    body: dict[str, object] = {"array": args.array, "member": args.member}
    if verb == "replace-member":
        body["path"] = os.path.abspath(args.file) if args.file else None
        body["size"] = args.size
    return {"code": f"raid.{verb}", "args": body}


def _port_ref(text: str) -> dict[str, object]:
    if re.fullmatch(r"\d+:\d+", text.strip()):
        return {"target": text.strip()}
    return {"wwpn": text.strip()}


def _fc_request(args: argparse.Namespace) -> dict[str, object]:
    verb: str = args.fc_verb
    if verb == "fabric":
        return {"code": "fabric"}
    if verb == "add-port":
        count, _, size = args.ram_luns.lower().partition("x")
        try:
            luns = {"count": int(count), "size": parse_size(size)}
        except (ValueError, argparse.ArgumentTypeError):
            raise SystemExit(f"emuhba ctl: --ram-luns takes COUNTxSIZE (e.g. 4x64M), not "
                             f"{args.ram_luns!r}") from None
        return {"code": "fc.add-port", "args": {"wwpn": args.wwpn, "bus": args.bus,
                                                "target_id": args.target_id, **luns}}
    body = _port_ref(args.remote_port)
    if verb == "add-lun":
        if (args.ram is None) == (args.file is None):
            raise SystemExit("emuhba ctl: fc add-lun takes one of --ram SIZE or --file PATH")
        if args.lun is not None:
            body["lun"] = args.lun
        if args.ram is not None:
            body.update(kind="ram", size=args.ram)
        else:
            spec = parse_file_lun(args.file)
            body.update(kind="file", path=os.path.abspath(spec.path), size=spec.size)
    elif verb == "remove-lun":
        body["lun"] = args.lun
    elif verb == "port-offline":
        body["seconds"] = args.seconds
    return {"code": f"fc.{verb}", "args": body}


def _ctl_request(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    command: str = args.ctl_command
    if command in ("status", "luns", "sessions"):
        return command, {}
    controller = _controller_request(args)
    if controller is not None:
        return controller
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
    if args.adapter is not None:
        request["adapter"] = args.adapter
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


def _render_faults(faults: Sequence[dict[str, Any]]) -> str:
    if not faults:
        return "no faults armed\n"
    rows = []
    for f in faults:
        if f["kind"] == "busy":
            what = f"{f['remaining']} command(s) left"
        elif f["kind"] == "latency":
            what = f"+{f['seconds'] * 1e3:g} ms"
        else:
            ops = "/".join(op for op in ("reads", "writes") if f.get(op))
            what = f"LBA {f['first_lba']}-{f['last_lba']} ({ops}), {f['hits']} hit(s)"
        rows.append([f["kind"], f["unit"], what])
    return format_table(["FAULT", "UNIT", "DETAIL"], rows)


def _render_controller(result: dict[str, Any]) -> str:
    link = result.get("link", {})
    left = link.get("seconds_left")
    link_text = "up" if link.get("up") else "DOWN" + (f" ({left:.1f} s left)" if left else "")
    latency = result.get("latency")
    lines = [f"miniport {result.get('miniport')}: {result.get('slots_in_use')}/"
             f"{result.get('slots')} slots in use, {result.get('commands')} commands, "
             f"{result.get('busy_rejections')} slot-full rejections",
             f"link {link_text}, {link.get('downs', 0)} down event(s), "
             f"{link.get('rejected_while_down', 0)} request(s) failed while down, "
             f"timeout {result.get('link_down_timeout_s')} s",
             f"latency {latency}"]
    text = "\n".join(lines) + "\n"
    if result.get("arrays") is not None:
        text += _render_arrays(result["arrays"])
    if result.get("fabric") is not None:
        text += _render_fabric(result["fabric"])
    return text + _render_faults(result.get("faults", []))


def _render_arrays(arrays: Sequence[dict[str, Any]]) -> str:
    lines = []
    for a in arrays:
        cache = a.get("write_cache")
        cache_text = "write-through" if cache is None else \
            f"write-back cache {cache['dirty_bytes'] // 1024} KiB dirty"
        lines.append(f"array {a['name']}: RAID {a['level']}, {a['state']}, "
                     f"{a['capacity'] // (1 << 20)} MiB, strip {a['strip_size'] // 1024} KiB, "
                     f"{cache_text}, units {', '.join(a.get('units', [])) or '-'}")
        if a.get("offline_reason"):
            lines.append(f"  offline: {a['offline_reason']}")
        member_size = a.get("member_size") or 1
        for m in a["members"]:
            detail = m["state"]
            if m.get("rebuild_watermark") is not None:
                detail += f" {100 * m['rebuild_watermark'] / member_size:.1f}%"
            where = m.get("path") or ("ram" if m.get("present") else "missing")
            error = f", last error: {m['last_error']}" if m.get("last_error") else ""
            lines.append(f"  member {m['index']}: {detail:<16} {where}{error}")
    return "\n".join(lines) + "\n" if lines else "no arrays\n"


def _lun_list(luns: Sequence[int]) -> str:
    """'0, 1, 2' for a few LUNs; runs folded ('0-299 (300)') when there are many."""
    if not luns:
        return "none"
    if len(luns) <= 12:
        return ", ".join(map(str, luns))
    runs: list[str] = []
    start = prev = luns[0]
    for lun in [*luns[1:], None]:
        if lun is not None and lun == prev + 1:
            prev = lun
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if lun is not None:
            start = prev = lun
    return ", ".join(runs) + f" ({len(luns)})"


def _render_fabric(fabric: dict[str, Any]) -> str:
    lines = [f"HBA WWNN {fabric.get('wwnn')} WWPN {fabric.get('wwpn')}"]
    for rp in fabric.get("remote_ports", fabric.get("ports", [])):
        lines.append(f"  {rp.get('wwpn')} at {rp.get('bus')}:{rp.get('target_id')} "
                     f"{rp.get('state')}: LUNs {_lun_list(rp.get('luns', []))}")
    return "\n".join(lines) + "\n"


def render_ctl(command: str, result: Any) -> str:
    """The human form of a ctl answer."""
    if command == "raid":
        if isinstance(result, list):
            return _render_arrays(result)
        if "rebuild_rate_bytes_s" in result:
            return f"rebuild rate {result['rebuild_rate_bytes_s'] / (1 << 20):g} MiB/s\n"
        return _render_arrays([result])
    if command == "fc":
        if isinstance(result, dict) and ("remote_ports" in result or "ports" in result):
            return _render_fabric(result)
        return json.dumps(result, indent=2, sort_keys=True) + "\n"
    if command == "controller":
        return _render_controller(result)
    if command == "fault":
        faults = result["faults"] if isinstance(result, dict) else result
        prefix = f"cleared {result['cleared']}\n" if isinstance(result, dict) else ""
        return prefix + _render_faults(faults)
    if command == "link":
        left = result.get("seconds_left")
        return ("link up\n" if result.get("up") else
                "link down" + (f", up again in {left:.1f} s\n" if left else "\n"))
    if command == "latency":
        return (f"latency: fixed {result['fixed_s'] * 1e3:g} ms, per KiB "
                f"{result['per_kib_s'] * 1e6:g} us, full seek {result['seek_s'] * 1e3:g} ms\n")
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
        lines.append(f"target {target.get('name') or '-'} at "
                     + (f"{target['adapter']} " if len(status.get("adapters", [])) > 1 else "")
                     + f"{target['path_id']}:{target['target_id']}: "
                     f"LUNs {_lun_list(target.get('luns', []))}")
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
    config: ServerConfig | None = None
    if args.command == "serve" and args.config is not None:
        from emuhba.config import ConfigError, load_config

        refused = _check_config_flags(args)
        if refused:
            parser.error(refused)
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"emuhba serve: {len(exc.problems)} problem(s) in the config:\n{exc}",
                  file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"emuhba serve: cannot read {args.config}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    configure_logging(args.log_format or (config.log_format if config else None) or "console",
                      args.log_level or (config.log_level if config else None) or "info")
    if args.command == "serve":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a hard dependency; degrade, say so
            log.warning("uvloop not available, using the default event loop")
            return asyncio.run(serve(args, config))
        with contextlib.suppress(KeyboardInterrupt):
            return uvloop.run(serve(args, config))
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
