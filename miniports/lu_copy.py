"""Third-party copy for :class:`~miniports.lu.LogicalUnit` (SPC-4): EXTENDED COPY (LID1) and
RECEIVE COPY RESULTS between logical units of one target.

Commands are added to the unit's dispatch table through :data:`COPY_COMMANDS`; their handlers
live on :class:`CopyMixin`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from miniports.lu_spec import CommandSpec

if TYPE_CHECKING:
    from miniports.lu import LogicalUnit

COPY_COMMANDS: tuple[CommandSpec, ...] = ()
# Opcodes of this module whose handlers touch the store (run on a DMA worker for file stores).
COPY_STORE_OPCODES: frozenset[int] = frozenset()


class CopyMixin:
    """Handlers and state of the copy commands."""

    @property
    def _lu(self) -> LogicalUnit:
        """This object as the LogicalUnit it always is (the mixin lives nowhere else), so
        handlers here see the unit's own helpers (_fail, _good, _data_out, _store, ...)."""
        return cast("LogicalUnit", self)

    def _init_copy(self) -> None:
        """Called once from the unit's constructor."""
