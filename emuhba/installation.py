"""An installation built from a :class:`~emuhba.config.ServerConfig`: stores opened, controllers
and their miniports made, each adapter's port driver started, and the iSCSI target nodes bound
to (adapter, bus, target id). This is the one place that knows every layer, so that none of the
layers has to know the others: the config describes, this module assembles.

Addressing on each adapter:

* disk and RAID controllers: the adapter's targets, in config order, get target ids 0, 1, ...
  on bus 0; each target's LUN map places its stores (or arrays) at (0, target id, LUN);
* FC controllers: each remote port keeps the (bus, target id) the config gives it, and is one
  iSCSI target (named by a [[targets]] entry, or ``<controller name prefix>:fc.<wwpn>``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from emuhba.config import (
    AdapterConfig,
    ConfigError,
    ControllerConfig,
    FaultConfig,
    Problem,
    ServerConfig,
    StoreConfig,
    TargetConfig,
    parse_wwn,
)
from emuhba.hba import Hba
from emuhba.miniport import Miniport
from miniports.disk import DiskMiniport, TargetLayout
from miniports.fc import FcMiniport, RemotePortSpec
from miniports.hwmodel import LatencyModel
from miniports.raid import RaidVolume
from miniports.raid_controller import RaidMiniport, open_array
from miniports.store import BlockStore, FileStore, RamStore
from target.portal import TargetNode, TargetPortal

log = structlog.get_logger("emuhba.installation")

FC_TARGET_PREFIX = "iqn.2026-11.io.emuhba"


def port_name(target_name: str) -> str:
    """The SCSI target port name of an iSCSI target (portal group 1), as VPD 83h reports it."""
    return f"{target_name},t,0x0001"


@dataclass
class InstalledAdapter:
    config: AdapterConfig
    controller: ControllerConfig
    hba: Hba
    nodes: list[TargetNode] = field(default_factory=list)


def open_store(store: StoreConfig) -> BlockStore:
    opened: BlockStore
    if store.kind == "ram":
        assert store.size is not None
        opened = RamStore.of_size(store.size, block_size=store.block_size)
    else:
        assert store.path is not None
        opened = FileStore(store.path, store.size, block_size=store.block_size,
                           read_only=store.read_only)
    opened.physical_block_size = store.physical_block_size
    return opened


class Installation:
    """Build with ``Installation(config)`` (opens the stores: errors surface here, as
    ConfigError naming the store), then ``await start()`` and, at the end, ``await stop()``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.adapters: list[InstalledAdapter] = []
        self._stores: dict[str, BlockStore] = {}
        self._portal: TargetPortal | None = None
        try:
            self._open_stores()
            for adapter in config.adapters:
                self.adapters.append(self._build_adapter(adapter))
        except BaseException:
            self._close_stores()
            raise

    @property
    def nodes(self) -> list[TargetNode]:
        return [node for adapter in self.adapters for node in adapter.nodes]

    @property
    def hbas(self) -> list[Hba]:
        return [adapter.hba for adapter in self.adapters]

    # --------------------------------------------------------------------------- building

    def _open_stores(self) -> None:
        # An FC fabric opens its own LUNs' stores (it opens new ones live, too).
        on_fabric = {entry.source for c in self.config.controllers for port in c.remote_ports
                     for entry in port.luns}
        for index, store in enumerate(self.config.stores):
            if store.name in on_fabric:
                continue
            try:
                self._stores[store.name] = open_store(store)
            except (OSError, ValueError) as exc:
                raise ConfigError([Problem(self.config.source, None, f"stores[{index}]",
                                           f"cannot open store {store.name!r}: {exc}")]) from None

    def _close_stores(self) -> None:
        for store in self._stores.values():
            try:
                store.close()
            except OSError:
                log.exception("store_close_failed")

    def _targets_of(self, adapter: AdapterConfig) -> list[TargetConfig]:
        return [t for t in self.config.targets if t.adapter == adapter.name]

    def _build_adapter(self, adapter: AdapterConfig) -> InstalledAdapter:
        controller = self.config.controller(adapter.controller)
        builders: dict[str, Callable[[AdapterConfig, ControllerConfig],
                                     tuple[Miniport, list[tuple[TargetConfig | None, str,
                                                                int, int]]]]] = {
            "disk": self._disk_miniport,
            "fc": self._fc_miniport,
            "raid": self._raid_miniport,
        }
        builder = builders.get(controller.kind)
        if builder is None:
            raise ConfigError([Problem(self.config.source, None, f"controllers.{controller.name}",
                                       f"controller kind {controller.kind!r} is not built yet")])
        miniport, placements = builder(adapter, controller)
        hba = Hba(miniport, name=adapter.name, model=adapter.port_model)
        installed = InstalledAdapter(adapter, controller, hba)
        for target, name, path_id, target_id in placements:
            installed.nodes.append(TargetNode(
                name=name, backend=hba, path_id=path_id, target_id=target_id,
                alias=target.alias if target is not None else None,
                chap=target.chap if target is not None else None,
                acl=target.acl if target is not None else None))
        if isinstance(miniport, FcMiniport):
            fc = miniport

            def fabric_changed(path_id: int, target_id: int) -> None:
                # Remote ports come and go on the fabric: keep one node per port.
                self._sync_fc_nodes(installed, fc)

            hba.watch_luns(fabric_changed)
        return installed

    def attach_portal(self, portal: TargetPortal) -> None:
        """The portal serving this installation's nodes: nodes for remote ports that log in to
        a fabric later are added to it (and ports that leave for good are taken out)."""
        self._portal = portal

    def _sync_fc_nodes(self, adapter: InstalledAdapter, miniport: FcMiniport) -> None:
        wanted = {name.lower(): (name, p, t)
                  for name, p, t in miniport.targets(fc_base_iqn(adapter.controller.name))}
        current = {node.name.lower(): node for node in adapter.nodes}
        for key, node in current.items():
            if key not in wanted:
                adapter.nodes.remove(node)
                if self._portal is not None:
                    self._portal.remove_node(node.name)
                log.info("target_removed", target=node.name, adapter=adapter.config.name)
        for key, (name, p, t) in wanted.items():
            if key not in current:
                node = TargetNode(name=name, backend=adapter.hba, path_id=p, target_id=t)
                adapter.nodes.append(node)
                if self._portal is not None:
                    self._portal.add_node(node)
                log.info("target_added", target=name, adapter=adapter.config.name,
                         address=f"{p}:{t}", luns=node.luns())

    def _latency(self, controller: ControllerConfig) -> LatencyModel:
        latency = controller.latency
        return LatencyModel(fixed_s=latency.fixed_s, per_kib_s=latency.per_kib_s,
                            seek_s=latency.seek_s)

    def _disk_miniport(self, adapter: AdapterConfig, controller: ControllerConfig
                       ) -> tuple[Miniport, list[tuple[TargetConfig | None, str, int, int]]]:
        layouts: list[TargetLayout] = []
        placements: list[tuple[TargetConfig | None, str, int, int]] = []
        for target_id, target in enumerate(self._targets_of(adapter)):
            luns = [(entry.lun, self._stores[entry.source],
                     entry.read_only or self._stores[entry.source].read_only, entry.removable)
                    for entry in target.luns]
            layouts.append(TargetLayout(0, target_id, port_name(target.name), luns))
            placements.append((target, target.name, 0, target_id))
        for target in self._targets_of(adapter):
            for entry in target.luns:
                self._stores.pop(entry.source, None)  # the controller closes them
        miniport = DiskMiniport.from_targets(
            layouts, slots=controller.slots, latency_s=self._latency(controller),
            workers=controller.workers, queue_depth=adapter.queue_depth,
            link_down_timeout=controller.link_down_timeout_s)
        return miniport, placements

    def _raid_miniport(self, adapter: AdapterConfig, controller: ControllerConfig
                       ) -> tuple[Miniport, list[tuple[TargetConfig | None, str, int, int]]]:
        arrays: dict[str, RaidVolume] = {}
        try:
            for index, array in enumerate(controller.arrays):
                try:
                    arrays[array.name] = open_array(
                        [self._stores[m] for m in array.members], name=array.name,
                        level=array.level, strip_size=array.strip_size, names=array.members)
                except (OSError, ValueError) as exc:
                    raise ConfigError([Problem(
                        self.config.source, None,
                        f"controllers.{controller.name}.arrays[{index}]",
                        f"cannot bring up array {array.name!r}: {exc}")]) from None
                for member in array.members:
                    # The array owns its members now (it closes them, and replaces them).
                    self._stores.pop(member, None)
        except BaseException:
            for volume in arrays.values():
                volume.close()
            raise
        targets = []
        placements: list[tuple[TargetConfig | None, str, int, int]] = []
        for target_id, target in enumerate(self._targets_of(adapter)):
            targets.append((0, target_id, port_name(target.name),
                            [(e.lun, e.source, e.read_only) for e in target.luns]))
            placements.append((target, target.name, 0, target_id))
        miniport = RaidMiniport.from_arrays(
            arrays, targets, write_cache={a.name: a.write_cache for a in controller.arrays},
            slots=controller.slots, latency_s=self._latency(controller),
            workers=controller.workers, queue_depth=adapter.queue_depth,
            link_down_timeout=controller.link_down_timeout_s)
        return miniport, placements

    def _fc_miniport(self, adapter: AdapterConfig, controller: ControllerConfig
                     ) -> tuple[Miniport, list[tuple[TargetConfig | None, str, int, int]]]:
        named = {parse_wwn(t.remote_port): t for t in self._targets_of(adapter)
                 if t.remote_port is not None}
        specs: list[RemotePortSpec] = []
        block_sizes: set[int] = set()
        for port in controller.remote_ports:
            luns: dict[int, tuple[Any, ...]] = {}
            for entry in port.luns:
                store = self.config.store(entry.source)
                block_sizes.add(store.block_size)
                if store.kind == "ram":
                    luns[entry.lun] = ("ram", store.size)
                else:
                    luns[entry.lun] = ("file", store.path, store.size,
                                       store.read_only or entry.read_only)
                if store.physical_block_size is not None:
                    luns[entry.lun] += ({"physical_block_size": store.physical_block_size},)
            if port.ram_luns is not None:
                group = port.ram_luns
                luns[group.first_lun] = ("ram", group.size, group.count)
            target = named.get(parse_wwn(port.wwpn))
            specs.append(RemotePortSpec(
                wwpn=port.wwpn, bus=port.bus, target_id=port.target_id, luns=luns,
                wwnn=port.wwnn, iscsi_name=target.name if target is not None else None))
        if len(block_sizes) > 1:
            raise ConfigError([Problem(self.config.source, None,
                                       f"controllers.{controller.name}",
                                       "an FC controller's stores must share one block size")])
        try:
            miniport = FcMiniport.from_fabric(
                specs, name=controller.name, wwpn=controller.wwpn, wwnn=controller.wwnn,
                base_iqn=fc_base_iqn(controller.name), slots=controller.slots,
                latency_s=self._latency(controller), workers=controller.workers,
                queue_depth=adapter.queue_depth, block_size=min(block_sizes, default=512),
                link_down_timeout=controller.link_down_timeout_s)
        except (OSError, ValueError) as exc:
            raise ConfigError([Problem(self.config.source, None,
                                       f"controllers.{controller.name}", str(exc))]) from None
        by_wwpn = {parse_wwn(port.wwpn): port for port in controller.remote_ports}
        placements: list[tuple[TargetConfig | None, str, int, int]] = []
        for name, path_id, target_id in miniport.targets(fc_base_iqn(controller.name)):
            wwpn = next(w for w, p in by_wwpn.items() if (p.bus, p.target_id) ==
                        (path_id, target_id))
            placements.append((named.get(wwpn), name, path_id, target_id))
        return miniport, placements

    # -------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        started: list[Hba] = []
        try:
            for adapter in self.adapters:
                await adapter.hba.start()
                started.append(adapter.hba)
                for fault in adapter.controller.faults:
                    arm_fault(adapter.hba, fault)
        except BaseException:
            for hba in started:
                await hba.stop()
            raise

    async def stop(self) -> None:
        for adapter in self.adapters:
            await adapter.hba.stop()
        self._close_stores()  # stores no LUN or array took
        self._stores.clear()


def arm_fault(hba: Hba, fault: FaultConfig) -> Any:
    """A configured fault, armed through the same IOCTL path `emuhba ctl fault` uses."""
    unit: dict[str, Any] = {"unit": list(fault.unit)} if fault.unit is not None else {}
    if fault.kind == "busy":
        return hba.miniport_ioctl("fault.busy", {**unit, "count": fault.count})
    if fault.kind == "latency":
        return hba.miniport_ioctl("fault.latency", {**unit, "seconds": fault.seconds})
    if fault.kind == "link-down":
        return hba.miniport_ioctl("link.down", {"seconds": fault.seconds})
    if fault.kind == "fail-member":
        return hba.miniport_ioctl("raid.fail-member", {"array": fault.array,
                                                       "member": fault.member,
                                                       "reason": "failed by the config"})
    return hba.miniport_ioctl("fault.medium-error", {
        **unit, "first_lba": fault.first_lba, "last_lba": fault.last_lba,
        "reads": fault.reads, "writes": fault.writes})


def fc_base_iqn(controller: str) -> str:
    """The prefix of an FC controller's default target names: ``<this>:fc.<wwpn>``."""
    return f"{FC_TARGET_PREFIX}:{controller.lower()}"

