"""Block commands beyond plain READ/WRITE for :class:`~miniports.lu.LogicalUnit` (SBC-4): thin
provisioning (UNMAP, WRITE SAME, GET LBA STATUS), COMPARE AND WRITE, ORWRITE, PRE-FETCH, WRITE
ATOMIC, READ DEFECT DATA, SANITIZE.

Commands are added to the unit's dispatch table through :data:`PROVISIONING_COMMANDS`; their
handlers live on :class:`ProvisioningMixin`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from miniports.lu_spec import CommandSpec

if TYPE_CHECKING:
    from miniports.lu import LogicalUnit

PROVISIONING_COMMANDS: tuple[CommandSpec, ...] = ()
# Opcodes of this module whose handlers touch the store (run on a DMA worker for file stores).
PROVISIONING_STORE_OPCODES: frozenset[int] = frozenset()


class ProvisioningMixin:
    """Handlers and state of the block command set added here."""

    @property
    def _lu(self) -> LogicalUnit:
        """This object as the LogicalUnit it always is (the mixin lives nowhere else), so
        handlers here see the unit's own helpers (_fail, _good, _data_out, _store, ...)."""
        return cast("LogicalUnit", self)

    def _init_provisioning(self) -> None:
        """Called once from the unit's constructor."""

    def _provisioning_rc16_bits(self) -> int:
        """READ CAPACITY(16) bytes 14-15: LBPME (bit 15), LBPRZ (bit 14), lowest aligned LBA."""
        return 0

    def _provisioning_block_limits(self, limits: bytearray) -> None:
        """Fill the Block Limits VPD page (B0h) body fields this module's commands define:
        maximum prefetch length, unmap LBA/descriptor counts and granularity, maximum write
        same length, atomic write limits (``limits`` is the page body, 0x3C bytes)."""

    def _provisioning_vpd_b2(self) -> bytes:
        """The Logical Block Provisioning VPD page (B2h) body."""
        return bytes(4)
