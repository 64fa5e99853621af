"""The one interface the iSCSI front end uses to reach SCSI logical units.

``emuhba.hba.Hba`` implements it; the front end never sees the port driver or a miniport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from emuhba.srb import Srb

TmfDone = Callable[[bool], None]


class ScsiBackend(Protocol):
    def luns(self, path_id: int, target_id: int) -> list[int]: ...

    def queue_capacity(self, path_id: int, target_id: int) -> int: ...

    def execute(self, srb: Srb) -> None:
        """Run one command; ``srb.completion(srb)`` is called exactly once, on the loop thread."""

    def abort_task(self, srb: Srb, done: TmfDone) -> None: ...

    def abort_task_set(self, path_id: int, target_id: int, lun: int, nexus: int,
                       done: TmfDone) -> None: ...

    def clear_task_set(self, path_id: int, target_id: int, lun: int, done: TmfDone) -> None: ...

    def reset_lun(self, path_id: int, target_id: int, lun: int, done: TmfDone) -> None: ...

    def reset_target(self, path_id: int, target_id: int, done: TmfDone) -> None: ...

    def nexus_lost(self, nexus: int) -> None: ...

    def nexus_opened(self, nexus: int, initiator_port: str, target_port: str) -> None:
        """An I_T nexus exists: ``initiator_port`` and ``target_port`` are the SCSI port names
        (iSCSI: ``<initiator name>,i,0x<ISID>`` and ``<target name>,t,0x<TPGT>``), which
        persistent reservations key their registrations by."""

    def restrict_nexus(self, nexus: int, luns: frozenset[int] | None, read_only: bool) -> None:
        """Show ``nexus`` only ``luns`` (None: all of them) and, with ``read_only``, refuse
        its writes to the medium, until the nexus is lost (an ACL entry's masking)."""

    def watch_luns(self, callback: Callable[[int, int], None]) -> None:
        """Have ``callback(path_id, target_id)`` called when that target's LUNs change."""
