"""The shape of a supported command, shared by the logical unit and its command-set modules.

:class:`CommandSpec` rows drive both dispatch and REPORT SUPPORTED OPERATION CODES; each module
that adds commands to :class:`~miniports.lu.LogicalUnit` (reservations, provisioning, copy)
declares its rows with these helpers, and ``lu.COMMANDS`` joins them.
"""

from __future__ import annotations

from dataclasses import dataclass

_NACA = 0x04  # CONTROL byte bit 2


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One supported command: how it is dispatched and what REPORT SUPPORTED OPERATION CODES says.

    ``usage`` is the CDB usage data: byte 0 the opcode, then a 1 for every CDB bit the handler
    evaluates; its length is the CDB length.
    """

    opcode: int
    service_action: int | None
    name: str
    usage: bytes
    handler: str
    reports_ua: bool = True
    timeout: int = 30  # recommended command timeout, seconds

    @property
    def cdb_length(self) -> int:
        return len(self.usage)


def usage(*parts: int | bytes) -> bytes:
    out = bytearray()
    for part in parts:
        out += part if isinstance(part, bytes) else bytes((part,))
    return bytes(out)


_FF2 = b"\xff" * 2
_FF4 = b"\xff" * 4
_FF8 = b"\xff" * 8
_C = _NACA  # the CONTROL byte: NACA is evaluated (and refused)
# Byte 1 of READ/WRITE(10/12/16): xxPROTECT (refused unless zero), DPO, FUA.
_RW1 = 0xF8
# Byte 1 of VERIFY / WRITE AND VERIFY: xxPROTECT, DPO, BYTCHK.
_V1 = 0xF6


# Public names for the command-set modules.
FF2 = _FF2
FF4 = _FF4
FF8 = _FF8
CONTROL = _C
RW1 = _RW1
V1 = _V1
