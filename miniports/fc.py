"""The Fibre Channel HBA miniport ("emufc") and the emulated FC controller and fabric it drives.

The hardware is the disk controller of :mod:`miniports.disk` (command slots, latency model,
DMA workers, completion ring, interrupt line, link state) with an N_Port on a fabric in front:

* the HBA port has a WWNN and a WWPN (64-bit Name_Identifiers, :class:`Wwn`);
* :class:`Fabric` holds the remote ports the HBA logged in to. Each :class:`RemotePort` has its
  own WWPN/WWNN, the (bus, target id) the HBA assigned it (up to 8 buses per adapter and 128
  target ids per bus, as Windows addresses units) and its LUNs, each a :class:`LogicalUnit` over
  a RAM or file store. A target may have thousands of LUNs: REPORT LUNS lists LUNs from 256 up
  to 16383 in SAM flat-space addressing, and the adapter declares 16384 LUNs per target;
* fabric changes arrive the way RSCNs do: the remote target raises REPORTED LUNS DATA HAS
  CHANGED (3Fh/0Eh) on its other LUs, the controller queues a fabric event and raises its
  interrupt line, and the miniport's interrupt routine answers with BusChangeDetected so the
  port rescans that bus.

Storport behaviour on the three FC outages (all of them cost the initiator latency first):

* **link down** (the HBA's own link, ``link_down``): inherited from :class:`DiskMiniport`. The
  adapter is paused for at most ``link_down_timeout``; I/O held meanwhile runs when the link
  comes back. Past the timeout requests fail with SRB_STATUS_LINK_DOWN, which the Hba turns into
  NOT READY / LOGICAL UNIT IS IN PROCESS OF BECOMING READY (04/01), a sense initiators retry.
* **remote port offline** (``port_offline``: the port left the fabric): only that target's
  devices are paused (StorPortDevicePause on each of its LUs) for at most the device-loss
  timeout; exchanges the controller still had open to it are handed back BUSY, so the port
  sends them again once the device is back. If the port returns in time everything resumes and
  completes GOOD. If not, the device is lost: its requests end SELECTION_TIMEOUT (the Hba
  answers LOGICAL UNIT NOT SUPPORTED), the bus is rescanned and the target drops out. A port
  that comes back after that logged in anew: its LUs report I_T NEXUS LOSS OCCURRED (29h/07h)
  and the bus is rescanned again.
* **LUN or port removal**: commands already in the controller finish (the store closes once the
  last of them is done); new ones get the absent-unit answer.

Mapping to iSCSI
----------------
The iSCSI front end presents the fabric the way an FC-to-iSCSI gateway does, one remote port at
a time:

* each remote port becomes one iSCSI target node. Its name is the port's ``iscsi_name`` when the
  configuration gives one, else ``<base iqn>:fc.<WWPN as 16 lower-case hex digits>``, e.g.
  ``iqn.2024-01.org.emuhba:fc.500a098100000001``;
* the node is bound to the (bus, target id) the HBA assigned the remote port:
  ``TargetNode(name, backend=hba, path_id=bus, target_id=target_id)``;
* the node's LUNs are the remote port's LUNs with the same numbers (REPORT LUNS: peripheral
  addressing below 256, flat addressing from 256 to 16383);
* every LU's INQUIRY VPD page 83h names its target port with a SCSI name string designator,
  ``<node name>,t,0x0001`` (portal group 1, the portal's default), or ``naa.<WWPN>,t,0x0001``
  when the fabric was built without a base IQN or node name;
* fabric changes reach the node's sessions as REPORTED LUNS DATA HAS CHANGED plus the port's
  rescan, so the node's LUN list follows the fabric. A remote port added later needs a new node
  (ask :meth:`FcMiniport.targets` again); a removed one leaves a node without LUNs.

A server makes its nodes with::

    for name, path_id, target_id in miniport.targets(base_iqn):
        nodes.append(TargetNode(name=name, backend=hba, path_id=path_id, target_id=target_id))
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Self

import structlog

from emuhba.miniport import MiniportIoctlError, PortConfiguration, PortServices
from emuhba.scsi.cdb import MAX_FLAT_LUN, encode_lun
from emuhba.scsi.opcodes import Op
from emuhba.scsi.sense import I_T_NEXUS_LOSS, REPORTED_LUNS_DATA_CHANGED
from emuhba.srb import ScsiStatus, Srb, SrbFunction, SrbStatus
from miniports.disk import (
    Address,
    DiskMiniport,
    EmulatedDiskController,
    Irq,
    Latency,
    _check_spec,
    _make_store,
)
from miniports.lu import EMUHBA_COMPANY_ID, LogicalUnit

log = structlog.get_logger("emuhba.miniport.fc")

# How Windows addresses a unit (bus, target id, LUN): 8 buses per adapter, 128 target ids per
# bus. LUNs go as far as single-level flat addressing reaches (SAM-5), far past NT's 254.
MAX_BUSES: Final = 8
MAX_TARGETS_PER_BUS: Final = 128
MAX_LUN: Final = MAX_FLAT_LUN
# iSCSI target port names carry the portal group tag; the portal's default group is 1.
_TPGT_SUFFIX: Final = ",t,0x0001"

# Remote port states as the HBA sees them.
ONLINE: Final = "online"
OFFLINE: Final = "offline"  # left the fabric; still within the device-loss timeout
LOST: Final = "lost"  # the device-loss timeout ran out: the target is gone for the host

# NAA values a 64-bit Name_Identifier may have (FC-FS): IEEE 48-bit, IEEE extended, locally
# assigned, IEEE registered, and EUI-64 mapped (Ch..Fh). 6h is 128 bits long; the rest are
# reserved or obsolete.
_NAA_64_BIT: Final = frozenset({0x1, 0x2, 0x3, 0x5, 0xC, 0xD, 0xE, 0xF})
_COLON_FORM: Final = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){7}")
_PLAIN_FORM: Final = re.compile(r"(?:0x)?[0-9a-f]{16}")
# How long a removed unit's store waits for the commands still using it, between checks.
_RETIRE_POLL_S: Final = 0.05

LunSpec = tuple[Any, ...]
LunSpecs = Sequence[LunSpec] | Mapping[int, LunSpec]
PortKey = Any  # a WWPN (Wwn, text or int) or a (bus, target id) pair


class FabricError(Exception):
    """A fabric change was refused; ``code`` is the one-word reason (the IOCTL error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------- names


@dataclass(frozen=True, order=True, slots=True)
class Wwn:
    """A 64-bit FC Name_Identifier (WWNN or WWPN), printed as ``20:00:00:25:b5:00:00:0f``."""

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value < 1 << 64:
            raise ValueError(f"a WWN has 64 bits: {self.value:#x}")
        naa = self.value >> 60
        if naa not in _NAA_64_BIT:
            raise ValueError(f"WWN {self} has NAA {naa:X}h; a 64-bit name has NAA 1, 2, 3, 5 "
                             "or C-F")
        if naa == 0x1 and (self.value >> 48) & 0xFFF:
            raise ValueError(f"WWN {self}: an NAA 1 (IEEE 48-bit) name must start 10:00:")

    @classmethod
    def parse(cls, name: Wwn | str | int) -> Wwn:
        """``20:00:00:25:b5:00:00:0f``, ``2000002525b5000f`` (optionally ``0x``), or an int."""
        if isinstance(name, Wwn):
            return name
        if isinstance(name, bool):
            raise TypeError(f"not a WWN: {name!r}")
        if isinstance(name, int):
            return cls(name)
        if not isinstance(name, str):
            raise TypeError(f"a WWN is text or an int, not {type(name).__name__}")
        text = name.strip().lower()
        if _COLON_FORM.fullmatch(text):
            return cls(int(text.replace(":", ""), 16))
        if _PLAIN_FORM.fullmatch(text):
            return cls(int(text.removeprefix("0x"), 16))
        raise ValueError(f"WWN {name!r} is neither 8 colon-separated hex octets "
                         "(20:00:00:25:b5:00:00:0f) nor 16 hex digits")

    @classmethod
    def registered(cls, seed: str) -> Wwn:
        """A stable NAA 5 (IEEE registered) name hashed from ``seed``: what storage arrays use
        for their ports (50:xx:...)."""
        return cls((0x5 << 60) | (EMUHBA_COMPANY_ID << 36) | (_digest(seed) & ((1 << 36) - 1)))

    @property
    def naa(self) -> int:
        return self.value >> 60

    @property
    def hex(self) -> str:
        """16 lower-case hex digits, no separators (iSCSI names, sysfs without the 0x)."""
        return f"{self.value:016x}"

    def __str__(self) -> str:
        digits = self.hex
        return ":".join(digits[i:i + 2] for i in range(0, 16, 2))


def hba_names(name: str) -> tuple[Wwn, Wwn]:
    """Stable (WWNN, WWPN) for an HBA called ``name``, shaped as HBA vendors shape them: the node
    name NAA 2 (``20:00:<OUI>:xx:xx:xx``), the port name NAA 1 (``10:00:<OUI>:xx:xx:xx``), both
    ending in the same 24 bits so an operator can pair them at a glance."""
    serial = _digest(f"hba/{name}") & 0xFFFFFF
    base = (EMUHBA_COMPANY_ID << 24) | serial
    return Wwn((0x2000 << 48) | base), Wwn((0x1000 << 48) | base)


def _digest(seed: str) -> int:
    # blake2b, not hash(): names must stay the same across runs (zoning, persistent binding).
    return int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest(), "big")


def _fc_serial(wwpn: Wwn, lun: int) -> str:
    """A unit serial tied to the remote port and LUN, not to the (bus, target id) the HBA happened
    to assign, just as an array's LU keeps its serial whichever host slot sees it."""
    return hashlib.sha256(f"fc/{wwpn.hex}/{lun}".encode()).digest()[:8].hex().upper()


# --------------------------------------------------------------------------------- specs


def ram_luns(count: int, size_bytes: int) -> LunSpec:
    """``count`` RAM LUNs of ``size_bytes`` each, numbered consecutively: the compact spec."""
    return ("ram", size_bytes, count)


def expand_luns(luns: LunSpecs) -> list[tuple[int, LunSpec]]:
    """(LUN, single-LUN spec) pairs from a list (numbered from 0) or a {first LUN: spec} map.

    A spec is ``("ram", size)``, ``("file", path, size | None[, read_only])`` or the compact
    ``("ram", size, count)``, which stands for ``count`` LUNs numbered on from its position.
    """
    items: Iterable[tuple[int | None, Any]] = (
        luns.items() if isinstance(luns, Mapping) else ((None, spec) for spec in luns))
    out: list[tuple[int, LunSpec]] = []
    taken: set[int] = set()
    next_lun = 0
    for first, raw in items:
        spec = tuple(raw)
        lun = next_lun if first is None else _check_lun(first)
        count = 1
        if spec and spec[0] == "ram" and len(spec) == 3 and not isinstance(spec[2], Mapping):
            count = spec[2]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"a ('ram', size, count) spec needs a count >= 1: {spec!r}")
            spec = spec[:2]
        _check_spec(spec)
        if lun + count - 1 > MAX_LUN:
            raise ValueError(f"LUNs {lun}..{lun + count - 1} go past LUN {MAX_LUN}, the last "
                             "one flat addressing reaches")
        for n in range(lun, lun + count):
            if n in taken:
                raise ValueError(f"LUN {n} is given twice")
            taken.add(n)
            out.append((n, spec))
        next_lun = lun + count
    return out


def _check_lun(lun: Any) -> int:
    if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= MAX_LUN:
        raise ValueError(f"LUN must be 0..{MAX_LUN}, not {lun!r}")
    return lun


def _check_address(bus: Any, target_id: Any, buses: int = MAX_BUSES) -> tuple[int, int]:
    if isinstance(bus, bool) or not isinstance(bus, int) or not 0 <= bus < buses:
        raise ValueError(f"bus must be 0..{buses - 1} on this adapter, not {bus!r}")
    if (isinstance(target_id, bool) or not isinstance(target_id, int)
            or not 0 <= target_id < MAX_TARGETS_PER_BUS):
        raise ValueError(f"target id must be 0..{MAX_TARGETS_PER_BUS - 1}, not {target_id!r}")
    return bus, target_id


@dataclass(frozen=True)
class RemotePortSpec:
    """One remote port to put on the fabric: its WWPN, the (bus, target id) the HBA gives it,
    its LUNs (see :func:`expand_luns`), and optionally its WWNN (default: derived from the
    WWPN), iSCSI node name and VPD 83h target port name (defaults: see the module docstring)."""

    wwpn: Wwn | str | int
    bus: int = 0
    target_id: int = 0
    luns: LunSpecs = ()
    wwnn: Wwn | str | int | None = None
    iscsi_name: str | None = None
    target_port_name: str | None = None

    @classmethod
    def of(cls, spec: RemotePortSpec | Mapping[str, Any]) -> RemotePortSpec:
        """From a spec, or from the plain mapping a config file or an IOCTL carries. There a LUN
        list may also be given as ``"count"`` and ``"size"`` (that many RAM LUNs)."""
        if isinstance(spec, RemotePortSpec):
            return spec
        known = {"wwpn", "wwnn", "bus", "target_id", "luns", "iscsi_name", "target_port_name",
                 "count", "size"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown remote port field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        if "wwpn" not in spec:
            raise ValueError("a remote port needs a wwpn")
        luns: list[LunSpec] = [tuple(s) for s in spec.get("luns", ())]
        if "count" in spec:
            if "size" not in spec:
                raise ValueError("'count' RAM LUNs need a 'size'")
            luns.append(ram_luns(spec["count"], int(spec["size"])))
        return cls(wwpn=spec["wwpn"], bus=spec.get("bus", 0),
                   target_id=spec.get("target_id", 0), luns=luns, wwnn=spec.get("wwnn"),
                   iscsi_name=spec.get("iscsi_name"),
                   target_port_name=spec.get("target_port_name"))


# -------------------------------------------------------------------------------- fabric


class RemotePort:
    """A target N_Port the HBA is logged in to, at (bus, target id), with its LUs by LUN."""

    def __init__(self, wwpn: Wwn, wwnn: Wwn, bus: int, target_id: int, *,
                 iscsi_name: str | None, target_port_name: str) -> None:
        self.wwpn = wwpn
        self.wwnn = wwnn
        self.bus = bus
        self.target_id = target_id
        self.iscsi_name = iscsi_name
        self.target_port_name = target_port_name
        self.units: dict[int, LogicalUnit] = {}
        self.state: str = ONLINE
        self.offlines = 0
        self.offline_since: float | None = None  # loop time it left the fabric

    @property
    def address(self) -> tuple[int, int]:
        return self.bus, self.target_id

    def luns(self) -> list[int]:
        """The LUN inventory, as this target's REPORT LUNS lists it (live)."""
        return sorted(self.units)

    def describe(self) -> dict[str, Any]:
        luns = self.luns()
        return {"wwpn": str(self.wwpn), "wwnn": str(self.wwnn), "bus": self.bus,
                "target_id": self.target_id, "state": self.state, "lun_count": len(luns),
                "luns": luns, "iscsi_name": self.iscsi_name,
                "target_port_name": self.target_port_name, "offlines": self.offlines}


class Fabric:
    """The remote ports visible to the HBA, by WWPN and by (bus, target id).

    ``buses`` is how many buses the adapter has (a remote port may only be placed on one of
    them: the port driver scans no others); ``base_iqn`` names the iSCSI nodes of remote ports
    that have no name of their own.
    """

    def __init__(self, *, buses: int = 1, base_iqn: str | None = None) -> None:
        if isinstance(buses, bool) or not isinstance(buses, int) or not 1 <= buses <= MAX_BUSES:
            raise ValueError(f"an adapter has 1..{MAX_BUSES} buses, not {buses!r}")
        self.buses = buses
        self.base_iqn = base_iqn or None
        self.ports: dict[Wwn, RemotePort] = {}
        self._by_address: dict[tuple[int, int], RemotePort] = {}

    # ----------------------------------------------------------------------------- lookup

    def at(self, bus: int, target_id: int) -> RemotePort | None:
        return self._by_address.get((bus, target_id))

    def lookup(self, key: PortKey) -> RemotePort:
        """The remote port with WWPN ``key``, or at ``key`` = (bus, target id)."""
        if isinstance(key, tuple | list):
            if len(key) != 2:
                raise ValueError(f"a target address is (bus, target id), not {key!r}")
            bus, target_id = int(key[0]), int(key[1])
            rp = self._by_address.get((bus, target_id))
            if rp is None:
                raise FabricError("no-port", f"no remote port at bus {bus} target id {target_id}")
            return rp
        wwpn = Wwn.parse(key)
        found = self.ports.get(wwpn)
        if found is None:
            raise FabricError("no-port", f"no remote port with WWPN {wwpn} on the fabric")
        return found

    def units(self) -> dict[Address, LogicalUnit]:
        return {(rp.bus, rp.target_id, lun): lu
                for rp in self.ports.values() for lun, lu in rp.units.items()}

    # ---------------------------------------------------------------------------- changes

    def open_port(self, spec: RemotePortSpec, block_size: int) -> RemotePort:
        """A remote port with its LUs and their stores open (not yet on the fabric). Every
        check that needs no store comes first, so a bad spec costs no file."""
        wwpn = Wwn.parse(spec.wwpn)
        wwnn = Wwn.parse(spec.wwnn) if spec.wwnn is not None else Wwn.registered(
            f"node/{wwpn.hex}")
        bus, target_id = _check_address(spec.bus, spec.target_id, self.buses)
        self._check_free(wwpn, bus, target_id)
        iscsi_name = spec.iscsi_name or (
            f"{self.base_iqn}:fc.{wwpn.hex}" if self.base_iqn else None)
        port_name = spec.target_port_name or (
            f"{iscsi_name}{_TPGT_SUFFIX}" if iscsi_name else f"naa.{wwpn.hex.upper()}{_TPGT_SUFFIX}")
        rp = RemotePort(wwpn, wwnn, bus, target_id, iscsi_name=iscsi_name,
                        target_port_name=port_name)
        luns = expand_luns(spec.luns)
        try:
            for lun, lun_spec in luns:
                rp.units[lun] = open_unit(rp, lun, lun_spec, block_size)
        except BaseException:
            close_units(rp.units.values())
            raise
        return rp

    def _check_free(self, wwpn: Wwn, bus: int, target_id: int) -> None:
        if wwpn in self.ports:
            raise FabricError("exists", f"WWPN {wwpn} is already on the fabric")
        holder = self._by_address.get((bus, target_id))
        if holder is not None:
            raise FabricError("exists", f"bus {bus} target id {target_id} is already remote "
                                        f"port {holder.wwpn}")

    def add(self, rp: RemotePort) -> None:
        self._check_free(rp.wwpn, rp.bus, rp.target_id)
        if rp.iscsi_name is not None:
            for other in self.ports.values():
                if other.iscsi_name is not None and other.iscsi_name.lower() == \
                        rp.iscsi_name.lower():
                    raise FabricError("exists", f"iSCSI name {rp.iscsi_name} is already remote "
                                                f"port {other.wwpn}")
        self.ports[rp.wwpn] = rp
        self._by_address[rp.address] = rp

    def remove(self, rp: RemotePort) -> None:
        del self.ports[rp.wwpn]
        del self._by_address[rp.address]

    def close(self) -> None:
        """Close every store (a fabric that never reached a controller)."""
        for rp in self.ports.values():
            close_units(rp.units.values())

    # ------------------------------------------------------------------------------ iSCSI

    def iscsi_name(self, rp: RemotePort, base_iqn: str | None = None) -> str:
        if rp.iscsi_name:
            return rp.iscsi_name
        base = base_iqn or self.base_iqn
        if not base:
            raise ValueError(f"remote port {rp.wwpn} has no iSCSI name and no base IQN was "
                             "given to derive one")
        return f"{base}:fc.{rp.wwpn.hex}"

    def iscsi_targets(self, base_iqn: str | None = None) -> list[tuple[str, int, int]]:
        """(iSCSI target name, path id, target id) for each remote port, in address order: one
        TargetNode each (see the module docstring)."""
        return [(self.iscsi_name(rp, base_iqn), rp.bus, rp.target_id)
                for rp in sorted(self.ports.values(), key=lambda p: p.address)]

    def describe(self) -> list[dict[str, Any]]:
        return [rp.describe() for rp in sorted(self.ports.values(), key=lambda p: p.address)]


def open_unit(rp: RemotePort, lun: int, spec: LunSpec, block_size: int) -> LogicalUnit:
    """A LogicalUnit for LUN ``lun`` of ``rp`` over a new store made from ``spec``."""
    store, read_only = _make_store(spec, block_size)
    try:
        # target_luns is the port's live inventory: a LUN added later shows up in the
        # neighbours' REPORT LUNS without touching them.
        return LogicalUnit(store, lun=lun, target_luns=rp.luns, serial=_fc_serial(rp.wwpn, lun),
                           target_port_name=rp.target_port_name, read_only=read_only,
                           peers=lambda: rp.units)
    except BaseException:
        store.close()
        raise


def close_units(units: Iterable[LogicalUnit]) -> None:
    for lu in units:
        try:
            lu.store.close()
        except Exception:
            log.exception("store_close_failed", lun=lu.lun)


class FabricEvent(NamedTuple):
    """What the controller tells its miniport about the fabric (through the interrupt line)."""

    kind: str  # "rscn", "port-offline", "port-online", "port-lost", "port-removed"
    bus: int
    target_id: int
    luns: tuple[int, ...] = ()
    lost: bool = False  # port-online: the port had been lost (the host dropped the target)


# ---------------------------------------------------------------------------- controller


class FcController(EmulatedDiskController):
    """The FC HBA: the disk controller's slots, latency and DMA, with an N_Port (``wwnn``,
    ``wwpn``) on ``fabric``. Fabric changes run on the loop; the miniport hears of them from
    ``fabric_events`` in its interrupt routine.
    """

    def __init__(
        self,
        fabric: Fabric,
        *,
        irq: Irq,
        wwnn: Wwn,
        wwpn: Wwn,
        block_size: int = 512,
        device_loss_timeout: float = 30.0,
        slots: int = 1024,
        latency_s: Latency = 0.0,
        workers: int = 4,
        loop: asyncio.AbstractEventLoop | None = None,
        threaded_completions: bool = False,
        start_cost_s: float = 0.0,
        interrupt_cost_s: float = 0.0,
    ) -> None:
        if not device_loss_timeout > 0:
            raise ValueError(f"device-loss timeout must be > 0 s, not {device_loss_timeout!r}")
        super().__init__(fabric.units(), slots, latency_s, workers, irq=irq, loop=loop,
                         threaded_completions=threaded_completions, start_cost_s=start_cost_s,
                         interrupt_cost_s=interrupt_cost_s)
        self.fabric = fabric
        self.wwnn = wwnn
        self.wwpn = wwpn
        self.block_size = block_size
        self.device_loss_timeout = device_loss_timeout
        self.fabric_events: deque[FabricEvent] = deque()
        self.rscns = 0
        # Targets the submit path must look at before the disk controller's: remote ports not
        # online, and ports without a LUN 0 (the target itself answers REPORT LUNS there).
        self._unreachable: dict[tuple[int, int], str] = {}
        self._no_lun0: set[tuple[int, int]] = set()
        self._special = False
        self._port_timers: dict[Wwn, list[asyncio.TimerHandle]] = {}
        # Units removed while commands may still be using their store.
        self._retired: list[tuple[Address, LogicalUnit]] = []
        self._retire_timer: asyncio.TimerHandle | None = None
        self._refresh_special()

    # ------------------------------------------------------------------------- the I/O path

    def submit(self, srb: Srb) -> bool:
        if not self._special:
            return super().submit(srb)
        where = (srb.path_id, srb.target_id)
        state = self._unreachable.get(where)
        if state is None and not (where in self._no_lun0 and srb.lun == 0):
            return super().submit(srb)
        if self._taken - self._freed >= self.slots or not self.accepting:
            self.busy_rejections += 1
            return False
        self._taken += 1
        self.commands += 1
        if state == OFFLINE:
            # Within the device-loss timeout the miniport has the device paused; a request
            # that slipped in is handed back for the port to retry, as FC miniports do.
            srb.complete(SrbStatus.BUSY)
        elif state == LOST:
            srb.complete(SrbStatus.SELECTION_TIMEOUT)
        else:
            self._lun0_absent(srb)
        self.post(srb)
        return True

    def _lun0_absent(self, srb: Srb) -> None:
        """LUN 0 of a present target that has none: REPORT LUNS is the target's to answer (SPC-4
        requires it at LUN 0, and the port's bus scan depends on it); anything else finds no
        unit."""
        cdb = srb.cdb
        rp = self.fabric.at(srb.path_id, srb.target_id)
        if (rp is None or srb.function != SrbFunction.EXECUTE_SCSI or len(cdb) < 12
                or cdb[0] != Op.REPORT_LUNS):
            srb.complete(SrbStatus.INVALID_LUN)
            return
        luns = [] if cdb[2] == 0x01 else rp.luns()  # select 01h: well-known LUs only (none)
        body = b"".join(encode_lun(lun) for lun in luns)
        data = struct.pack(">I4x", len(body)) + body
        limit = min(len(data), int.from_bytes(cdb[6:10], "big"), srb.data_transfer_length)
        moved = 0
        for view in srb.sg_list:
            if moved >= limit:
                break
            n = min(len(view), limit - moved)
            view[:n] = data[moved:moved + n]
            moved += n
        srb.complete(SrbStatus.SUCCESS, ScsiStatus.GOOD)
        srb.residual = srb.data_transfer_length - moved
        srb.data_transfer_length = moved

    def _refresh_special(self) -> None:
        self._no_lun0 = {rp.address for rp in self.fabric.ports.values() if 0 not in rp.units}
        self._special = bool(self._unreachable or self._no_lun0)

    # ---------------------------------------------------------------------------- topology

    def detach(self, address: Address) -> LogicalUnit | None:
        lu = super().detach(address)
        if lu is not None and self._stores.get(address) is lu.store:
            # Out of the flush/close set now, so a LUN re-added here registers its own store.
            del self._stores[address]
            self._retired.append((address, lu))
            self._close_retired()
        return lu

    def _close_retired(self) -> None:
        """Close the stores of removed units no command uses any more; look again later for
        the rest (commands in a latency wait or on a DMA worker finish on the old store)."""
        self._retire_timer = None
        # dict.copy() is one step under the GIL: safe against the interrupt routine's pops.
        running = {id(lu) for lu in self._executing.copy().values()}
        waiting = {(s.path_id, s.target_id, s.lun) for s in self._waiting}
        keep: list[tuple[Address, LogicalUnit]] = []
        for address, lu in self._retired:
            if id(lu) in running or address in waiting:
                keep.append((address, lu))
            else:
                close_units([lu])
        self._retired = keep
        if keep and not self.closed:
            self._retire_timer = self.loop.call_later(_RETIRE_POLL_S, self._close_retired)

    def _fabric_event(self, event: FabricEvent) -> None:
        self.fabric_events.append(event)
        self._irq()

    def _luns_changed(self, rp: RemotePort, lun: int) -> None:
        """The remote target tells every initiator it knows, on its other LUs, that its LUN
        inventory changed; the fabric tells the HBA (RSCN)."""
        for other, unit in rp.units.items():
            if other != lun:
                unit.establish_unit_attention(REPORTED_LUNS_DATA_CHANGED)
        self.rscns += 1
        self._fabric_event(FabricEvent("rscn", rp.bus, rp.target_id))

    def add_lun(self, key: PortKey, lun: int, spec: LunSpec) -> LogicalUnit:
        """Map a new LUN ``lun`` on remote port ``key``, over a store made from ``spec``."""
        rp = self._changeable(key)
        self._check_lun_free(rp, lun)
        spec = tuple(spec)
        _check_spec(spec)
        lu = open_unit(rp, lun, spec, self.block_size)
        self._map_unit(rp, lun, lu)
        return lu

    def add_unit(self, key: PortKey, lun: int, lu: LogicalUnit) -> None:
        """Map a LogicalUnit made elsewhere (its ``target_luns`` should be the port's
        ``luns``) as LUN ``lun`` of remote port ``key``."""
        rp = self._changeable(key)
        self._check_lun_free(rp, lun)
        self._map_unit(rp, lun, lu)

    @staticmethod
    def _check_lun_free(rp: RemotePort, lun: int) -> None:
        _check_lun(lun)
        if lun in rp.units:
            raise FabricError("exists", f"remote port {rp.wwpn} already has LUN {lun}")

    def _map_unit(self, rp: RemotePort, lun: int, lu: LogicalUnit) -> None:
        rp.units[lun] = lu
        self.attach((rp.bus, rp.target_id, lun), lu)
        self._refresh_special()
        log.info("fc_lun_added", wwpn=str(rp.wwpn), lun=lun)
        self._luns_changed(rp, lun)

    def remove_lun(self, key: PortKey, lun: int) -> LogicalUnit:
        """Unmap LUN ``lun`` of remote port ``key`` (commands already in the controller finish
        on it; its store closes after them)."""
        rp = self._changeable(key)
        lu = rp.units.pop(lun, None)
        if lu is None:
            raise FabricError("no-unit", f"remote port {rp.wwpn} has no LUN {lun}; it has "
                                         f"{_lun_ranges(rp.luns())}")
        self.detach((rp.bus, rp.target_id, lun))
        self._refresh_special()
        log.info("fc_lun_removed", wwpn=str(rp.wwpn), lun=lun)
        self._luns_changed(rp, lun)
        return lu

    def add_port(self, spec: RemotePortSpec | Mapping[str, Any]) -> RemotePort:
        spec = RemotePortSpec.of(spec)
        if Wwn.parse(spec.wwpn) == self.wwpn:
            raise FabricError("exists", f"WWPN {self.wwpn} is the HBA's own port")
        rp = self.fabric.open_port(spec, self.block_size)
        try:
            self.fabric.add(rp)
        except BaseException:
            close_units(rp.units.values())
            raise
        for lun, lu in rp.units.items():
            self.attach((rp.bus, rp.target_id, lun), lu)
        self._refresh_special()
        self.rscns += 1
        log.info("fc_port_added", wwpn=str(rp.wwpn), bus=rp.bus, target_id=rp.target_id,
                 luns=len(rp.units))
        self._fabric_event(FabricEvent("rscn", rp.bus, rp.target_id))
        return rp

    def remove_port(self, key: PortKey) -> RemotePort:
        rp = self.fabric.lookup(key)
        self._cancel_port_timers(rp)
        self.fabric.remove(rp)
        self._unreachable.pop(rp.address, None)
        luns = tuple(rp.luns())
        for lun in luns:
            self.detach((rp.bus, rp.target_id, lun))
        self._refresh_special()
        self.rscns += 1
        log.info("fc_port_removed", wwpn=str(rp.wwpn), bus=rp.bus, target_id=rp.target_id)
        # Its devices may be paused (it was offline): let what they hold go and find no target.
        self._fabric_event(FabricEvent("port-removed", rp.bus, rp.target_id, luns))
        return rp

    def _changeable(self, key: PortKey) -> RemotePort:
        rp = self.fabric.lookup(key)
        if rp.state != ONLINE:
            raise FabricError("port-offline", f"remote port {rp.wwpn} is {rp.state}; its LUNs "
                                              "can change once it is back online")
        return rp

    # ------------------------------------------------------------------ remote port outages

    def port_offline(self, key: PortKey, seconds: float | None) -> RemotePort:
        """Remote port ``key`` leaves the fabric, for ``seconds`` (None: until
        :meth:`port_online`)."""
        rp = self.fabric.lookup(key)
        if seconds is not None and not seconds > 0:
            raise ValueError(f"offline time must be > 0 s, not {seconds!r}")
        self._cancel_port_timers(rp)
        timers: list[asyncio.TimerHandle] = []
        if rp.state == ONLINE:
            rp.state = OFFLINE
            rp.offlines += 1
            rp.offline_since = self.loop.time()
            self._unreachable[rp.address] = OFFLINE
            self._refresh_special()
            log.warning("fc_port_offline", wwpn=str(rp.wwpn), seconds=seconds,
                        device_loss_timeout_s=self.device_loss_timeout)
            # The event goes first: the miniport pauses the devices before the port sees the
            # exchanges below come back BUSY, so their retries wait for the device.
            self._fabric_event(FabricEvent("port-offline", rp.bus, rp.target_id,
                                           tuple(rp.luns())))
            self._bounce_open_exchanges(rp)
            timers.append(self.loop.call_later(self.device_loss_timeout, self._device_lost, rp))
        elif rp.state == OFFLINE:
            # Still offline: the device-loss clock keeps running from the first departure.
            since = rp.offline_since if rp.offline_since is not None else self.loop.time()
            left = max(0.0, since + self.device_loss_timeout - self.loop.time())
            timers.append(self.loop.call_later(left, self._device_lost, rp))
        if seconds is not None:
            timers.append(self.loop.call_later(seconds, self._port_returns, rp))
        self._port_timers[rp.wwpn] = timers
        return rp

    def _bounce_open_exchanges(self, rp: RemotePort) -> None:
        """Commands still in their latency wait for the departed port: the HBA aborts the
        exchanges and hands them back BUSY. Those already on a DMA worker finish."""
        for srb in [s for s in self._waiting if (s.path_id, s.target_id) == rp.address]:
            self._waiting.pop(srb).cancel()
            srb.complete(SrbStatus.BUSY)
            self.post(srb)

    def _port_returns(self, rp: RemotePort) -> None:
        if self.fabric.ports.get(rp.wwpn) is rp:
            self.port_online(rp.wwpn)

    def port_online(self, key: PortKey) -> RemotePort:
        """Remote port ``key`` is back on the fabric (a no-op if it never left)."""
        rp = self.fabric.lookup(key)
        self._cancel_port_timers(rp)
        was = rp.state
        if was == ONLINE:
            return rp
        rp.state = ONLINE
        rp.offline_since = None
        self._unreachable.pop(rp.address, None)
        self._refresh_special()
        if was == LOST:
            # The host logged in anew: to the target it is a new I_T nexus.
            for lu in rp.units.values():
                lu.establish_unit_attention(I_T_NEXUS_LOSS)
        log.info("fc_port_online", wwpn=str(rp.wwpn), was=was)
        self._fabric_event(FabricEvent("port-online", rp.bus, rp.target_id, tuple(rp.luns()),
                                       lost=was == LOST))
        return rp

    def _device_lost(self, rp: RemotePort) -> None:
        if rp.state != OFFLINE or self.fabric.ports.get(rp.wwpn) is not rp:
            return
        rp.state = LOST
        self._unreachable[rp.address] = LOST
        self._refresh_special()
        log.warning("fc_device_lost", wwpn=str(rp.wwpn), bus=rp.bus, target_id=rp.target_id)
        self._fabric_event(FabricEvent("port-lost", rp.bus, rp.target_id, tuple(rp.luns())))

    def _cancel_port_timers(self, rp: RemotePort) -> None:
        for timer in self._port_timers.pop(rp.wwpn, []):
            timer.cancel()

    # ---------------------------------------------------------------------------- reporting

    def describe_fabric(self) -> dict[str, Any]:
        return {"wwnn": str(self.wwnn), "wwpn": str(self.wwpn),
                "link": "up" if self.link_up else "down", "buses": self.fabric.buses,
                "device_loss_timeout_s": self.device_loss_timeout, "rscns": self.rscns,
                "remote_ports": self.fabric.describe()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fabric": self.describe_fabric()}

    def close(self) -> None:
        if self.closed:
            return
        for timers in self._port_timers.values():
            for timer in timers:
                timer.cancel()
        self._port_timers.clear()
        if self._retire_timer is not None:
            self._retire_timer.cancel()
            self._retire_timer = None
        super().close()  # waits for the DMA workers, so nothing uses a retired store after
        close_units(lu for _, lu in self._retired)
        self._retired.clear()


def _lun_ranges(luns: list[int]) -> str:
    """``0-299, 512`` rather than three hundred numbers in an error message."""
    if not luns:
        return "none"
    parts: list[str] = []
    start = prev = luns[0]
    for lun in [*luns[1:], None]:
        if lun is not None and lun == prev + 1:
            prev = lun
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if lun is not None:
            start = prev = lun
    return ", ".join(parts)


# ------------------------------------------------------------------------------ miniport


class FcMiniport(DiskMiniport):
    """The miniport for :class:`FcController`: the disk miniport's I/O path, link handling and
    IOCTLs, plus the fabric (RSCN → BusChangeDetected, remote port outages → device pauses).

    Build it with :meth:`from_fabric`; ``controller_factory`` must make an FcController.
    """

    name = "emufc"

    def __init__(
        self,
        controller_factory: Callable[[Irq], FcController],
        *,
        fabric: Fabric | None = None,
        queue_depth: int = 64,
        busy_requests: int = 1,
        maximum_transfer_length: int = 8 * 1024 * 1024,
        link_down_timeout: float = 30.0,
    ) -> None:
        super().__init__(controller_factory, queue_depth=queue_depth, busy_requests=busy_requests,
                         maximum_transfer_length=maximum_transfer_length,
                         link_down_timeout=link_down_timeout)
        self._fabric = fabric
        self._fc: FcController | None = None

    @classmethod
    def from_fabric(
        cls,
        remote_ports: Sequence[RemotePortSpec | Mapping[str, Any]],
        *,
        name: str = "fc0",
        wwpn: Wwn | str | int | None = None,
        wwnn: Wwn | str | int | None = None,
        buses: int | None = None,
        base_iqn: str | None = None,
        slots: int = 1024,
        latency_s: Latency = 0.0,
        workers: int = 4,
        queue_depth: int = 64,
        block_size: int = 512,
        link_down_timeout: float = 30.0,
        device_loss_timeout: float = 30.0,
        threaded_completions: bool = False,
        start_cost_s: float = 0.0,
        interrupt_cost_s: float = 0.0,
    ) -> Self:
        """An FC HBA called ``name`` (its WWNN/WWPN default to names derived from it) on a
        fabric of ``remote_ports``. ``buses`` defaults to what the ports use; ``base_iqn`` names
        the iSCSI nodes (and VPD 83h target ports) of ports without an ``iscsi_name``. Stores
        open here, so a bad path fails the caller at once."""
        if not link_down_timeout > 0:
            raise ValueError(f"link-down timeout must be > 0 s, not {link_down_timeout!r}")
        if not device_loss_timeout > 0:
            raise ValueError(f"device-loss timeout must be > 0 s, not {device_loss_timeout!r}")
        default_wwnn, default_wwpn = hba_names(name)
        hba_wwnn = Wwn.parse(wwnn) if wwnn is not None else default_wwnn
        hba_wwpn = Wwn.parse(wwpn) if wwpn is not None else default_wwpn
        specs = [RemotePortSpec.of(spec) for spec in remote_ports]
        for spec in specs:
            if Wwn.parse(spec.wwpn) == hba_wwpn:
                raise FabricError("exists", f"remote port WWPN {hba_wwpn} is the HBA's own")
        if buses is None:
            buses = max((s.bus for s in specs if isinstance(s.bus, int)), default=0) + 1
            buses = min(max(buses, 1), MAX_BUSES)
        fabric = Fabric(buses=buses, base_iqn=base_iqn)
        try:
            for spec in specs:
                rp = fabric.open_port(spec, block_size)
                try:
                    fabric.add(rp)
                except BaseException:
                    close_units(rp.units.values())
                    raise
        except BaseException:
            fabric.close()
            raise

        def build(irq: Irq) -> FcController:
            return FcController(fabric, irq=irq, wwnn=hba_wwnn, wwpn=hba_wwpn,
                                block_size=block_size, device_loss_timeout=device_loss_timeout,
                                slots=slots, latency_s=latency_s, workers=workers,
                                threaded_completions=threaded_completions,
                                start_cost_s=start_cost_s, interrupt_cost_s=interrupt_cost_s)

        return cls(build, fabric=fabric, queue_depth=queue_depth,
                   link_down_timeout=link_down_timeout)

    # ------------------------------------------------------------------------- properties

    @property
    def fc(self) -> FcController:
        if self._fc is None:
            raise RuntimeError("hw_find_adapter has not run")
        return self._fc

    @property
    def fabric(self) -> Fabric:
        if self._fc is not None:
            return self._fc.fabric
        if self._fabric is None:
            raise RuntimeError("hw_find_adapter has not run")
        return self._fabric

    def targets(self, base_iqn: str | None = None) -> list[tuple[str, int, int]]:
        """(iSCSI target name, path id, target id) per remote port: see the module docstring."""
        return self.fabric.iscsi_targets(base_iqn)

    # ------------------------------------------------------------------------- Hw routines

    def hw_find_adapter(self, port: PortServices, config: PortConfiguration) -> bool:
        if not super().hw_find_adapter(port, config):
            return False
        controller = self.controller
        if not isinstance(controller, FcController):
            raise TypeError(f"{self.name} drives an FcController, not {type(controller).__name__}")
        self._fc = controller
        # Declared for what the fabric may become, not what it is now: the port scans only
        # these buses and target ids, and a remote port may log in anywhere on them later.
        config.number_of_buses = controller.fabric.buses
        config.maximum_number_of_targets = MAX_TARGETS_PER_BUS
        config.maximum_number_of_logical_units = MAX_LUN + 1
        return True

    def hw_interrupt(self) -> bool:
        fc = self._fc
        if fc is not None and fc.fabric_events:
            self._fabric_events(fc)
        return super().hw_interrupt()

    def _fabric_events(self, fc: FcController) -> None:
        """RSCNs become bus rescans; a remote port leaving pauses just its devices (for at most
        the device-loss timeout), its return or loss resumes them. Only thread-safe port
        services here: the interrupt routine may run on a DMA worker."""
        port = self.port
        while fc.fabric_events:
            event = fc.fabric_events.popleft()
            bus, target_id = event.bus, event.target_id
            if event.kind == "port-offline":
                for lun in event.luns:
                    port.pause_device(bus, target_id, lun, fc.device_loss_timeout)
                continue
            if event.kind in ("port-online", "port-lost", "port-removed"):
                for lun in event.luns:
                    port.resume_device(bus, target_id, lun)
            if event.kind != "port-online" or event.lost:
                port.bus_change_detected(bus)

    # -------------------------------------------------------------------- fabric changes

    def add_lun(self, key: PortKey, lun: int, spec: LunSpec) -> LogicalUnit:
        return self.fc.add_lun(key, lun, spec)

    def attach_unit(self, address: Address, lu: LogicalUnit) -> None:
        """The disk miniport's hot-add, kept consistent with the fabric: the unit joins the
        remote port at (bus, target id) of ``address``."""
        self.fc.add_unit(address[:2], address[2], lu)

    def detach_unit(self, address: Address) -> LogicalUnit | None:
        rp = self.fabric.at(address[0], address[1])
        if rp is None or address[2] not in rp.units:
            return None
        return self.fc.remove_lun(rp.wwpn, address[2])

    def remove_lun(self, key: PortKey, lun: int) -> LogicalUnit:
        return self.fc.remove_lun(key, lun)

    def add_port(self, spec: RemotePortSpec | Mapping[str, Any]) -> RemotePort:
        return self.fc.add_port(spec)

    def remove_port(self, key: PortKey) -> RemotePort:
        return self.fc.remove_port(key)

    def port_offline(self, key: PortKey, seconds: float | None) -> RemotePort:
        return self.fc.port_offline(key, seconds)

    def port_online(self, key: PortKey) -> RemotePort:
        return self.fc.port_online(key)

    # ---------------------------------------------------------------------------- ioctls

    def hw_ioctl(self, code: str, args: Mapping[str, Any]) -> Any:
        try:
            return super().hw_ioctl(code, args)
        except FabricError as exc:
            raise MiniportIoctlError(exc.code, f"{code}: {exc}") from exc

    def _ioctls(self) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
        return {
            **super()._ioctls(),
            "fabric": lambda args: self.fc.describe_fabric(),
            "fc.add-lun": self._ioctl_add_lun,
            "fc.remove-lun": self._ioctl_remove_lun,
            "fc.add-port": self._ioctl_add_port,
            "fc.remove-port": self._ioctl_remove_port,
            "fc.port-offline": self._ioctl_port_offline,
            "fc.port-online": self._ioctl_port_online,
        }

    def _port_arg(self, args: Mapping[str, Any]) -> RemotePort:
        """The remote port an IOCTL names: ``wwpn``, ``target`` ([bus, target id] or "B:T"),
        or the ``unit`` address [bus, target id, LUN] the control server makes of ``lun``."""
        if "wwpn" in args:
            return self.fabric.lookup(args["wwpn"])
        if "target" in args:
            target = args["target"]
            if isinstance(target, str):
                target = target.split(":")
            return self.fabric.lookup(tuple(target))
        if "unit" in args:
            return self.fabric.lookup(tuple(args["unit"])[:2])
        raise ValueError("name the remote port with 'wwpn' or 'target' ([bus, target id])")

    @staticmethod
    def _lun_arg(args: Mapping[str, Any]) -> int | None:
        lun = args.get("lun")
        if lun is None and "unit" in args:
            lun = tuple(args["unit"])[2]
        return None if lun is None else int(lun)

    def _ioctl_add_lun(self, args: Mapping[str, Any]) -> dict[str, Any]:
        rp = self._port_arg(args)
        lun = self._lun_arg(args)
        if lun is None:  # the lowest free LUN, as an array's "map next" does
            lun = next(n for n in range(MAX_LUN + 2) if n not in rp.units)
        kind = args.get("kind", "file" if "path" in args else "ram")
        if kind == "ram":
            spec: LunSpec = ("ram", int(args["size"]))
        elif kind == "file":
            size = args.get("size")
            spec = ("file", str(args["path"]), None if size is None else int(size),
                    bool(args.get("read_only", False)))
        else:
            raise ValueError(f"LUN kind must be 'ram' or 'file', not {kind!r}")
        lu = self.fc.add_lun(rp.wwpn, lun, spec)
        return {"lun": lu.lun, "blocks": lu.num_blocks, "block_size": lu.block_size,
                "remote_port": rp.describe()}

    def _ioctl_remove_lun(self, args: Mapping[str, Any]) -> dict[str, Any]:
        rp = self._port_arg(args)
        lun = self._lun_arg(args)
        if lun is None:
            raise ValueError("which LUN? give 'lun'")
        self.fc.remove_lun(rp.wwpn, lun)
        return rp.describe()

    def _ioctl_add_port(self, args: Mapping[str, Any]) -> dict[str, Any]:
        # "unit" is the control server's rendering of a --lun option, meaningless here.
        rp = self.fc.add_port({k: v for k, v in args.items() if k != "unit"})
        return rp.describe()

    def _ioctl_remove_port(self, args: Mapping[str, Any]) -> dict[str, Any]:
        rp = self.fc.remove_port(self._port_arg(args).wwpn)
        return rp.describe()

    def _ioctl_port_offline(self, args: Mapping[str, Any]) -> dict[str, Any]:
        seconds = args.get("seconds")
        rp = self.fc.port_offline(self._port_arg(args).wwpn,
                                  None if seconds is None else float(seconds))
        return rp.describe()

    def _ioctl_port_online(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return self.fc.port_online(self._port_arg(args).wwpn).describe()


__all__ = [
    "LOST",
    "MAX_BUSES",
    "MAX_LUN",
    "MAX_TARGETS_PER_BUS",
    "OFFLINE",
    "ONLINE",
    "Fabric",
    "FabricError",
    "FabricEvent",
    "FcController",
    "FcMiniport",
    "LunSpec",
    "RemotePort",
    "RemotePortSpec",
    "Wwn",
    "expand_luns",
    "hba_names",
    "ram_luns",
]
