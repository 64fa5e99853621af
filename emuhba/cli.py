"""The ``emuhba`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from emuhba.logs import LEVELS, configure_logging

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
    serve.add_argument("--log-format", choices=("console", "json"), default="console",
                       help="log output format")
    serve.add_argument("--log-level", choices=LEVELS, default="info", help="least severe level logged")
    return parser


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
    from target.portal import PortalSettings, TargetNode, TargetPortal
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
    hba = Hba(miniport, name="hba0")
    await hba.start()
    from target.keys import TargetLimits

    limits = TargetLimits(header_digests=DIGEST_POLICIES[args.header_digest],
                          data_digests=DIGEST_POLICIES[args.data_digest])
    settings = PortalSettings(limits=limits, advertise=_advertise_list(args.advertise))
    node = TargetNode(name=args.iqn, backend=hba, path_id=0, target_id=0, alias=args.alias)
    portal = TargetPortal([node], settings)
    server = TargetServer(portal)
    portals = args.portal or [parse_hostport(DEFAULT_PORTAL)]
    try:
        for host, port in portals:
            bound = await server.listen(host, port)
            for address in bound:
                log.info("listening", portal=f"{address[0]}:{address[1]}", target=args.iqn)
    except OSError as exc:
        log.error("cannot listen", error=str(exc))
        await server.close()
        await hba.stop()
        return 2
    for lun in hba.luns(0, 0):
        log.info("lun ready", target=args.iqn, lun=lun, spec=_describe(lun_specs[lun]) if lun < len(lun_specs) else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await server.close()
    await hba.stop()
    log.info("stopped")
    return 0


def _describe(spec: tuple[str, str | int, int | None]) -> str:
    kind, value, size = spec
    if kind == "ram":
        return f"ram {value} bytes"
    return f"file {value}" + (f" ({size} bytes)" if size else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
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
