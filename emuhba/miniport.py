"""The contract between the port driver and a miniport driver, modelled on Storport's.

A miniport sees the port only through :class:`PortServices` (the StorPort* routines) and the port
sees a miniport only through :class:`Miniport` (the Hw* entry points). Emulated controllers sit
below the miniport and are never visible to the port.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol, TypeVar

from emuhba.srb import Srb

T = TypeVar("T")

# Storport's limit on per-LU outstanding requests without extended SRB support.
MAX_QUEUE_DEPTH_CLASSIC = 255

# The port models a miniport may be loaded under (PortConfiguration.port_model).
PORT_MODEL_STORPORT = "storport"
PORT_MODEL_SCSIPORT = "scsiport"


class AdapterControl(IntEnum):
    """SCSI_ADAPTER_CONTROL_TYPE values a miniport may be asked to handle."""

    QUERY_SUPPORTED_CONTROL_TYPES = 0
    STOP_ADAPTER = 1
    RESTART_ADAPTER = 2
    SET_BOOT_CONFIG = 3
    SET_RUNNING_CONFIG = 4


@dataclass
class PortConfiguration:
    """PORT_CONFIGURATION_INFORMATION: what the miniport tells the port in HwFindAdapter."""

    number_of_buses: int = 1
    maximum_number_of_targets: int = 128
    maximum_number_of_logical_units: int = 255
    maximum_transfer_length: int = 8 * 1024 * 1024
    number_of_physical_breaks: int = 256  # most scatter/gather elements per request
    # Extended SRB support lifts the per-LU queue depth above 255.
    srb_type_extended: bool = False
    # Per-LU queue depth the port starts each logical unit with.
    default_queue_depth: int = 64
    # Adapter-wide cap on outstanding requests; None means none (Storport has no predefined one).
    adapter_queue_limit: int | None = None
    # Filled in by the port before hw_find_adapter, read by the miniport: "storport" hands the
    # whole scatter/gather list over with each request (srb.sg_list); "scsiport" hides it, and
    # the miniport fetches it one element per PortServices.get_physical_address call.
    port_model: str = PORT_MODEL_STORPORT


class PortServices(Protocol):
    """What a miniport may call on the port driver (StorPortNotification and friends)."""

    def request_complete(self, srb: Srb) -> None:
        """RequestComplete: the miniport is done with ``srb``; its status fields are final."""

    def next_request(self) -> None:
        """SCSIport's NextRequest: accepted and ignored under Storport."""

    def next_lu_request(self, path_id: int, target_id: int, lun: int) -> None:
        """SCSIport's NextLuRequest: accepted and ignored under Storport."""

    def interrupt(self) -> None:
        """Assert the adapter's interrupt line; the port runs the miniport's hw_interrupt soon.

        Safe to call from any thread (an emulated controller's DMA worker, say). Coalesced: many
        assertions before the port gets to it produce one hw_interrupt call.
        """

    def synchronize_access(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` exclusive with the miniport's interrupt path (StorPortSynchronizeAccess)."""
        ...

    def bus_change_detected(self, path_id: int) -> None:
        """BusChangeDetected: the port rescans the bus (LUNs appeared or went away)."""

    def now(self) -> float:
        """Monotonic seconds, the port's clock (a miniport models latency with it)."""
        ...

    def call_later(self, delay: float, fn: Callable[[], None]) -> Any:
        """Run ``fn`` on the port's loop after ``delay`` seconds (a miniport timer)."""
        ...

    def get_physical_address(self, srb: Srb, offset: int) -> memoryview:
        """ScsiPortGetPhysicalAddress: the one scatter/gather element holding byte ``offset`` of
        ``srb``'s data, from that byte to the end of its element (a page at most); empty past
        the end of the data. The only way to the data under the SCSIport model."""
        ...

    def set_queue_depth(self, path_id: int, target_id: int, lun: int, depth: int) -> int:
        """StorPortSetDeviceQueueDepth: returns the depth in effect."""
        ...

    # The eight queue controls (Storport only; a SCSIport-model port ignores and counts them).
    # Safe to call from any thread.
    def pause_device(self, path_id: int, target_id: int, lun: int, seconds: float) -> None: ...
    def resume_device(self, path_id: int, target_id: int, lun: int) -> None: ...
    def pause(self, seconds: float) -> None: ...
    def resume(self) -> None: ...
    def device_busy(self, path_id: int, target_id: int, lun: int, requests: int) -> None: ...
    def device_ready(self, path_id: int, target_id: int, lun: int) -> None: ...
    def busy(self, requests: int) -> None: ...
    def ready(self) -> None: ...


class MiniportIoctlError(Exception):
    """A miniport refused an IOCTL: ``code`` says why in one word, the message in words."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Miniport(ABC):
    """A miniport driver: the Hw* routines the port driver calls.

    Calling order: ``hw_find_adapter`` once, ``hw_initialize`` once, then for every request
    ``hw_build_io`` (no lock needed) followed by ``hw_start_io`` (ordered); ``hw_interrupt``
    whenever the controller raised its interrupt line. ``hw_build_io`` is optional, as
    HwBuildIo is in Storport: a miniport that does not override it has none, and the port goes
    straight to ``hw_start_io``.

    Threads and locks: everything but ``hw_interrupt`` runs on the port's event loop.
    ``hw_interrupt`` runs under the interrupt lock, either on the loop or on the thread that
    raised the interrupt line (a controller's worker); so under the Storport model it may run
    while ``hw_start_io`` is running on the loop, and state the two share must be guarded with
    ``synchronize_access``. Under the SCSIport model the port holds that same lock around
    ``hw_build_io``/``hw_start_io`` as well, and the two never overlap (half duplex).
    """

    name: str = "miniport"

    @abstractmethod
    def hw_find_adapter(self, port: PortServices, config: PortConfiguration) -> bool:
        """Claim the (emulated) hardware, fill ``config``; return False when nothing is there."""

    @abstractmethod
    def hw_initialize(self) -> bool:
        """Bring the controller to a ready state."""

    def hw_build_io(self, srb: Srb) -> bool:
        """Prepare ``srb`` without touching shared state.

        Returns False when the miniport completed the request itself (already failed, say);
        the port then expects a request_complete for it and does not call hw_start_io.
        """
        return True

    @abstractmethod
    def hw_start_io(self, srb: Srb) -> bool:
        """Hand ``srb`` to the controller. Completion comes later through request_complete."""

    @abstractmethod
    def hw_interrupt(self) -> bool:
        """Service the controller's interrupt: complete what it finished. False if not ours."""

    @abstractmethod
    def hw_reset_bus(self, path_id: int) -> bool:
        """Reset one bus: every outstanding request on it completes (BUS_RESET)."""

    def hw_adapter_control(self, control: AdapterControl, parameters: Any = None) -> Any:
        """Stop, restart, or say which controls are supported."""
        if control is AdapterControl.QUERY_SUPPORTED_CONTROL_TYPES:
            return {AdapterControl.QUERY_SUPPORTED_CONTROL_TYPES}
        return None

    def hw_ioctl(self, code: str, args: Mapping[str, Any]) -> Any:
        """IOCTL_SCSI_MINIPORT: a management request for the controller (faults, RAID members,
        fabric changes), answered with plain data. Runs on the port's loop, exclusive with the
        interrupt routine. ``code`` names the request; unknown codes raise
        :class:`MiniportIoctlError` ("unsupported")."""
        raise MiniportIoctlError("unsupported",
                                 f"miniport {self.name} supports no control code {code!r}")

    def hw_free_adapter_resources(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Final teardown (flush and close backing files)."""

    def hw_nexus_opened(self, nexus: int, initiator_port: str,  # noqa: B027 - optional hook
                        target_port: str) -> None:
        """An I_T nexus appeared: the SCSI port names behind the number ``nexus`` that SRBs
        carry. Not a Storport routine (as hw_nexus_lost)."""

    def hw_nexus_lost(self, nexus: int) -> None:  # noqa: B027 - optional hook, no-op by default
        """An I_T nexus is gone (its session ended): forget what the units kept for it (unit
        attentions, reservations). Not a Storport routine: iSCSI sessions come and go while
        the adapter runs."""
