"""What every emulated controller shares: its timing model and the faults it can be told to have.

:class:`LatencyModel` says how long a command occupies its slot before the controller executes
it: a fixed part, a transfer part proportional to the data, and an optional seek part
proportional to how far the unit's "head" moves (the distance from the end of the previous
command on the same unit). All zero, the default, is RAM speed and costs nothing per command.

:class:`Faults` is the set of faults armed on one controller. Operators arm them live through
``emuhba ctl fault ...`` and installations through the config file; the controller consults
them for each command only while at least one is armed (one attribute test otherwise). The
faults are those a storage engineer wants to provoke from an initiator's point of view:

* ``busy``: the next N commands (of one unit, or of any) end with SCSI status BUSY, which the
  port driver retries: the initiator sees latency, never an error;
* ``medium-error``: reads (and optionally writes) touching an LBA range fail with MEDIUM ERROR /
  UNRECOVERED READ ERROR (or WRITE ERROR) with the first bad LBA in the INFORMATION field;
* ``latency``: seconds added to every command of a unit, or of all;
* ``link-down``: kept by the controller itself (the miniport must pause the adapter), see
  :mod:`miniports.disk`.

Member-disk failures belong to RAID controllers (:mod:`miniports.raid`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from emuhba.scsi import sense as S
from emuhba.scsi.opcodes import Op
from emuhba.scsi.sense import build_sense
from emuhba.srb import ScsiStatus, Srb, SrbStatus

Address = tuple[int, int, int]

# Opcodes that read or write the medium: only these can meet a medium error.
_READS: Final = frozenset({Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16,
                           Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16})
_WRITES: Final = frozenset({Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16,
                            Op.WRITE_VERIFY_10, Op.WRITE_VERIFY_12, Op.WRITE_VERIFY_16})

FAULT_KINDS: Final = ("busy", "medium-error", "latency")


class FaultableUnit(Protocol):
    """What fault injection needs of a logical unit."""

    @property
    def descriptor_sense(self) -> bool: ...

    def unit_attention_pending(self, nexus: int) -> bool: ...


@dataclass
class LatencyModel:
    """Seconds a command waits in its slot: ``fixed_s`` + ``per_kib_s`` per KiB moved +
    ``seek_s`` scaled by the head travel (a full-stroke seek across ``capacity_blocks``)."""

    fixed_s: float = 0.0
    per_kib_s: float = 0.0
    seek_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fixed_s", "per_kib_s", "seek_s"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"latency {name} must be >= 0, not {value!r}")

    @property
    def zero(self) -> bool:
        return not (self.fixed_s or self.per_kib_s or self.seek_s)

    def describe(self) -> dict[str, float]:
        return {"fixed_s": self.fixed_s, "per_kib_s": self.per_kib_s, "seek_s": self.seek_s}


class HeadPositions:
    """Where each unit's head is (the LBA after its last command), for the seek component."""

    def __init__(self, model: LatencyModel, capacity_blocks: Callable[[Address], int]) -> None:
        self.model = model
        self._capacity = capacity_blocks
        self._head: dict[Address, int] = {}

    def delay(self, srb: Srb) -> float:
        model = self.model
        seconds = model.fixed_s
        if model.per_kib_s:
            seconds += model.per_kib_s * srb.data_transfer_length / 1024
        if model.seek_s and srb.transfer_blocks:
            address = (srb.path_id, srb.target_id, srb.lun)
            capacity = self._capacity(address)
            head = self._head.get(address, 0)
            if capacity:
                seconds += model.seek_s * min(1.0, abs(srb.lba - head) / capacity)
            self._head[address] = srb.lba + srb.transfer_blocks
        return seconds


@dataclass
class MediumErrorRange:
    """LBAs ``first_lba``..``last_lba`` (inclusive) of one unit (or of every unit) are bad."""

    unit: Address | None
    first_lba: int
    last_lba: int
    reads: bool = True
    writes: bool = False
    hits: int = 0

    def describe(self) -> dict[str, Any]:
        return {"kind": "medium-error", "unit": _unit_text(self.unit),
                "first_lba": self.first_lba, "last_lba": self.last_lba,
                "reads": self.reads, "writes": self.writes, "hits": self.hits}


@dataclass
class Faults:
    """The faults armed on one controller. Arm and clear from the loop thread; the controller
    reads them from the loop thread (its submit path), so no command sees half an update."""

    busy: dict[Address | None, int] = field(default_factory=dict)
    busy_given: int = 0
    medium: list[MediumErrorRange] = field(default_factory=list)
    latency: dict[Address | None, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def armed(self) -> bool:
        return bool(self.busy or self.medium or self.latency)

    # -------------------------------------------------------------------------- arming

    def arm_busy(self, unit: Address | None, count: int) -> None:
        if count < 1:
            raise ValueError(f"busy needs a positive command count, not {count}")
        with self._lock:
            self.busy[unit] = self.busy.get(unit, 0) + count

    def arm_medium_error(self, unit: Address | None, first_lba: int, last_lba: int, *,
                         reads: bool = True, writes: bool = False) -> MediumErrorRange:
        if first_lba < 0 or last_lba < first_lba:
            raise ValueError(f"bad LBA range {first_lba}..{last_lba}")
        if not reads and not writes:
            raise ValueError("a medium error must affect reads, writes or both")
        bad = MediumErrorRange(unit, first_lba, last_lba, reads, writes)
        with self._lock:
            self.medium.append(bad)
        return bad

    def arm_latency(self, unit: Address | None, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"added latency must be >= 0 s, not {seconds!r}")
        with self._lock:
            if seconds:
                self.latency[unit] = seconds
            else:
                self.latency.pop(unit, None)

    def clear(self, kind: str | None = None, unit: Address | None = None,
              every_unit: bool = True) -> int:
        """Disarm faults of ``kind`` (all kinds if None) on ``unit`` (every unit's and the
        controller-wide ones if ``every_unit``). Returns how many were disarmed."""
        if kind is not None and kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}: one of {', '.join(FAULT_KINDS)}")

        def hit(where: Address | None) -> bool:
            return every_unit or where == unit

        removed = 0
        with self._lock:
            if kind in (None, "busy"):
                for where in [w for w in self.busy if hit(w)]:
                    del self.busy[where]
                    removed += 1
            if kind in (None, "medium-error"):
                keep = [m for m in self.medium if not hit(m.unit)]
                removed += len(self.medium) - len(keep)
                self.medium = keep
            if kind in (None, "latency"):
                for where in [w for w in self.latency if hit(w)]:
                    del self.latency[where]
                    removed += 1
        return removed

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            out: list[dict[str, Any]] = [
                {"kind": "busy", "unit": _unit_text(where), "remaining": count}
                for where, count in self.busy.items()]
            out += [m.describe() for m in self.medium]
            out += [{"kind": "latency", "unit": _unit_text(where), "seconds": seconds}
                    for where, seconds in self.latency.items()]
        return out

    # ------------------------------------------------------------------------ per command

    def added_latency(self, srb: Srb) -> float:
        latency = self.latency
        if not latency:
            return 0.0
        return latency.get((srb.path_id, srb.target_id, srb.lun), 0.0) + latency.get(None, 0.0)

    def intercept(self, srb: Srb, unit: FaultableUnit) -> bool:
        """Give ``srb`` the outcome an armed fault dictates; True when it did (the controller
        then completes it without executing it). A medium error is met while executing, so a
        unit attention the unit owes the nexus comes first."""
        address = (srb.path_id, srb.target_id, srb.lun)
        with self._lock:
            if self.busy:
                where: Address | None = address if address in self.busy else \
                    None if None in self.busy else address
                left = self.busy.get(where, 0)
                if left:
                    if left == 1:
                        del self.busy[where]
                    else:
                        self.busy[where] = left - 1
                    self.busy_given += 1
                    srb.complete(SrbStatus.ERROR, ScsiStatus.BUSY)
                    return True
            if self.medium and srb.transfer_blocks and not unit.unit_attention_pending(
                    srb.nexus):
                op = srb.opcode
                reading = op in _READS
                writing = op in _WRITES
                if reading or writing:
                    first = srb.lba
                    last = first + srb.transfer_blocks - 1
                    for bad in self.medium:
                        if bad.unit is not None and bad.unit != address:
                            continue
                        if not (bad.reads if reading else bad.writes):
                            continue
                        if bad.first_lba <= last and first <= bad.last_lba:
                            bad.hits += 1
                            code = S.UNRECOVERED_READ_ERROR if reading else S.WRITE_ERROR
                            srb.complete(SrbStatus.ERROR, ScsiStatus.CHECK_CONDITION,
                                         build_sense(code, descriptor=unit.descriptor_sense,
                                                     information=max(first, bad.first_lba)))
                            srb.residual = srb.data_transfer_length
                            srb.data_transfer_length = 0
                            return True
        return False


def _unit_text(unit: Address | None) -> str:
    return "all" if unit is None else "{}:{}:{}".format(*unit)

