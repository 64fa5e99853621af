"""The SCSI Request Block: the unit of work between the front end, the port driver and a miniport.

Field names follow Storport's SCSI_REQUEST_BLOCK where the concept is the same, spelled the
Python way. One Srb is created per command and travels the whole path; it is a slotted class
because it is allocated on every I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum, IntFlag
from typing import Any, Final


class SrbFunction(IntEnum):
    EXECUTE_SCSI = 0x00
    ABORT_COMMAND = 0x10
    RESET_BUS = 0x12
    RESET_DEVICE = 0x16  # target reset: every LU behind one target id
    FLUSH = 0x08
    SHUTDOWN = 0x07
    RESET_LOGICAL_UNIT = 0x20


class SrbStatus(IntEnum):
    """SRB_STATUS_*: how the port/miniport finished a request (independent of SCSI status)."""

    PENDING = 0x00
    SUCCESS = 0x01
    ABORTED = 0x02
    ABORT_FAILED = 0x03
    ERROR = 0x04
    BUSY = 0x05
    INVALID_REQUEST = 0x06
    INVALID_PATH_ID = 0x07
    NO_DEVICE = 0x08
    TIMEOUT = 0x09
    SELECTION_TIMEOUT = 0x0A
    COMMAND_TIMEOUT = 0x0B
    BUS_RESET = 0x0E
    DATA_OVERRUN = 0x12  # also reported for underrun, with data_transfer_length updated
    REQUEST_FLUSHED = 0x16
    INVALID_LUN = 0x20
    INVALID_TARGET_ID = 0x21
    BAD_FUNCTION = 0x22
    ERROR_RECOVERY = 0x23
    NOT_POWERED = 0x24
    LINK_DOWN = 0x25


SRB_STATUS_AUTOSENSE_VALID = 0x80  # flag or-ed into srb_status on the wire in Windows; kept as a bool here


class ScsiStatus(IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class DataDirection(IntFlag):
    NONE = 0
    IN = 1  # device -> initiator (read)
    OUT = 2  # initiator -> device (write)


class QueueAction(IntEnum):
    """SAM task attributes, as carried by the iSCSI ATTR field."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class ResetKind(IntEnum):
    """Why a logical unit's state was reset; decides which unit attention it reports after."""

    POWER_ON = 0
    LOGICAL_UNIT = 1  # LUN RESET task management function
    TARGET = 2  # TARGET WARM/COLD RESET
    BUS = 3  # bus reset: the last step of hierarchical error recovery


class CdbFlags(IntFlag):
    """Decoded CDB bits the port and controllers care about."""

    NONE = 0
    FUA = 1
    DPO = 2
    BYTCHK = 4
    IMMED = 8


# Members looked up once: reading an enum class's attribute goes through EnumType.__getattr__'s
# slot, several times dearer than a global, and every Srb starts with these.
_NO_FLAGS: Final = CdbFlags.NONE
_PENDING: Final = SrbStatus.PENDING
_GOOD: Final = ScsiStatus.GOOD

# The per-I/O completion hook the submitter installs; called exactly once per Srb.
SrbCompletion = Callable[["Srb"], None]


class Srb:
    """One SCSI request in flight.

    Addressing is (path_id, target_id, lun) on an adapter, as in Storport. ``nexus`` identifies the
    I_T nexus (initiator port + target port) the command came from; Storport does not carry it, but
    an emulated logical unit needs it to keep unit attentions and reservations per initiator.

    ``sg_list`` is the whole scatter/gather list, handed over at once: for a write, the buffers that
    hold the data (typically the received PDU payloads, uncopied); for a read, the buffers to fill.
    """

    __slots__ = (
        "_port_state",
        "cdb",
        "cdb_decoded",
        "cdb_flags",
        "completion",
        "data_direction",
        "data_transfer_length",
        "function",
        "lba",
        "lun",
        "miniport_context",
        "nexus",
        "opcode",
        "path_id",
        "queue_action",
        "queue_tag",
        "residual",
        "retries",
        "scsi_status",
        "sense",
        "sg_list",
        "srb_status",
        "start_ns",
        "target_id",
        "transfer_blocks",
    )

    def __init__(
        self,
        function: SrbFunction = SrbFunction.EXECUTE_SCSI,
        path_id: int = 0,
        target_id: int = 0,
        lun: int = 0,
        cdb: bytes = b"",
        data_direction: DataDirection = DataDirection.NONE,
        data_transfer_length: int = 0,
        sg_list: list[memoryview] | None = None,
        queue_tag: int = 0,
        queue_action: QueueAction = QueueAction.SIMPLE,
        nexus: int = 0,
        completion: SrbCompletion | None = None,
    ) -> None:
        self.function = function
        self.path_id = path_id
        self.target_id = target_id
        self.lun = lun
        self.cdb = cdb
        self.data_direction = data_direction
        # Bytes the initiator expects to move; on completion, bytes actually moved.
        self.data_transfer_length = data_transfer_length
        self.sg_list: list[memoryview] = sg_list if sg_list is not None else []
        self.queue_tag = queue_tag
        self.queue_action = queue_action
        self.nexus = nexus
        self.completion = completion
        # Decoded CDB; filled by emuhba.scsi.cdb.decode_into (opcode 0 with lba 0 for non-block commands).
        self.opcode = cdb[0] if cdb else 0
        self.lba = 0
        self.transfer_blocks = 0
        self.cdb_flags = _NO_FLAGS
        # Set by decode_into once the fields above hold the decoded CDB: the port decodes
        # every command, and a logical unit below it need not decode it again.
        self.cdb_decoded = False
        # Outcome.
        self.srb_status = _PENDING
        self.scsi_status = _GOOD
        self.sense: bytes = b""
        # Positive: underrun (fewer bytes moved than expected); negative: overrun.
        self.residual = 0
        # Owned by the port driver and the miniport respectively; nobody else touches them.
        self._port_state: Any = None
        self.miniport_context: Any = None
        self.retries = 0
        self.start_ns = 0

    @property
    def address(self) -> tuple[int, int, int]:
        return (self.path_id, self.target_id, self.lun)

    def complete(self, srb_status: SrbStatus, scsi_status: ScsiStatus = ScsiStatus.GOOD,
                 sense: bytes = b"") -> None:
        """Set the outcome (does not notify anyone; the miniport then calls request_complete)."""
        self.srb_status = srb_status
        self.scsi_status = scsi_status
        self.sense = sense

    def __repr__(self) -> str:
        return (
            f"Srb(fn={self.function.name}, addr={self.path_id}:{self.target_id}:{self.lun}, "
            f"op=0x{self.opcode:02x}, lba={self.lba}, blocks={self.transfer_blocks}, "
            f"tag=0x{self.queue_tag:x}, status={self.srb_status.name}/{self.scsi_status.name})"
        )
