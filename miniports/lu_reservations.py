"""Reservations for :class:`~miniports.lu.LogicalUnit` (SPC-4): RESERVE/RELEASE(6/10) and
PERSISTENT RESERVE IN/OUT.

This module adds its commands to the unit's dispatch table (:data:`RESERVATION_COMMANDS`) and
its state and checks through :class:`ReservationsMixin`, whose hooks the unit calls: at
construction, before dispatching each command (a conflict check that costs one attribute test
while nothing is reserved), on resets and when a nexus goes away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from emuhba.srb import ResetKind, Srb
from miniports.lu_spec import CommandSpec

if TYPE_CHECKING:
    from miniports.lu import LogicalUnit

RESERVATION_COMMANDS: tuple[CommandSpec, ...] = ()
# Opcodes of this module whose handlers touch the store (run on a DMA worker for file stores).
RESERVATION_STORE_OPCODES: frozenset[int] = frozenset()


class ReservationsMixin:
    """Reservation state of one logical unit and the checks every command goes through."""

    @property
    def _lu(self) -> LogicalUnit:
        """This object as the LogicalUnit it always is (the mixin lives nowhere else), so
        handlers here see the unit's own helpers (_fail, _good, _data_out, _store, ...)."""
        return cast("LogicalUnit", self)

    # True while any reservation (SPC-2 or persistent) holds the unit: the per-command check
    # is skipped entirely otherwise.
    _reserved: bool = False

    def _init_reservations(self) -> None:
        self._reserved = False

    def _reservation_conflict(self, srb: Srb, op: int) -> bool:
        """Complete ``srb`` with RESERVATION CONFLICT and return True when a reservation held
        by another nexus forbids ``op``; called only while ``_reserved``."""
        return False

    def _reservations_reset(self, kind: ResetKind) -> None:
        """A reset: SPC-2 reservations are released; persistent ones survive."""

    def _reservations_nexus_gone(self, nexus: int) -> None:
        """The nexus ended (session closed): release what SPC-2 reservation it held."""
