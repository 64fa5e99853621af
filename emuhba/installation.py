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
)
from emuhba.hba import Hba
from emuhba.miniport import Miniport
from miniports.disk import DiskMiniport, TargetLayout
from miniports.hwmodel import LatencyModel
from miniports.store import BlockStore, FileStore, RamStore
from target.portal import TargetNode

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
    if store.kind == "ram":
        assert store.size is not None
        return RamStore.of_size(store.size, block_size=store.block_size)
    assert store.path is not None
    return FileStore(store.path, store.size, block_size=store.block_size,
                     read_only=store.read_only)


class Installation:
    """Build with ``Installation(config)`` (opens the stores: errors surface here, as
    ConfigError naming the store), then ``await start()`` and, at the end, ``await stop()``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.adapters: list[InstalledAdapter] = []
        self._stores: dict[str, BlockStore] = {}
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
        for index, store in enumerate(self.config.stores):
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
                alias=target.alias if target is not None else None))
        return installed

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
                     entry.read_only or self._stores[entry.source].read_only)
                    for entry in target.luns]
            layouts.append(TargetLayout(0, target_id, port_name(target.name), luns))
            placements.append((target, target.name, 0, target_id))
        miniport = DiskMiniport.from_targets(
            layouts, slots=controller.slots, latency_s=self._latency(controller),
            workers=controller.workers, queue_depth=adapter.queue_depth,
            link_down_timeout=controller.link_down_timeout_s)
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


def arm_fault(hba: Hba, fault: FaultConfig) -> Any:
    """A configured fault, armed through the same IOCTL path `emuhba ctl fault` uses."""
    unit: dict[str, Any] = {"unit": list(fault.unit)} if fault.unit is not None else {}
    if fault.kind == "busy":
        return hba.miniport_ioctl("fault.busy", {**unit, "count": fault.count})
    if fault.kind == "latency":
        return hba.miniport_ioctl("fault.latency", {**unit, "seconds": fault.seconds})
    if fault.kind == "link-down":
        return hba.miniport_ioctl("link.down", {"seconds": fault.seconds})
    return hba.miniport_ioctl("fault.medium-error", {
        **unit, "first_lba": fault.first_lba, "last_lba": fault.last_lba,
        "reads": fault.reads, "writes": fault.writes})


def default_fc_target_name(controller: str, wwpn: int) -> str:
    return f"{FC_TARGET_PREFIX}:{controller.lower()}.fc.{wwpn:016x}"

