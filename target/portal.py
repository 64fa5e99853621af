"""What a listening iSCSI portal serves: target nodes, the session table, discovery answers.

Shared by every connection of one server; pure data and bookkeeping, no I/O.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from target.backend import ScsiBackend
from target.chap import ChallengeLog, ChapPolicy
from target.keys import TargetLimits

if TYPE_CHECKING:
    from target.connection import Session


@dataclass(frozen=True)
class AccessEntry:
    """One initiator a target lets in, with CHAP credentials of its own if it has them (they
    replace the target's for that initiator), the LUNs it may see (None: all) and whether it
    may only read."""

    initiator: str
    chap: ChapPolicy | None = None
    luns: frozenset[int] | None = None
    read_only: bool = False

    @property
    def restricted(self) -> bool:
        return self.luns is not None or self.read_only


@dataclass
class TargetNode:
    """One iSCSI target name, bound to one (path, target id) behind the HBA.

    ``chap``: logins must authenticate with CHAP. ``acl``: only the initiators listed may see
    the target in discovery and log in to it (None: everyone)."""

    name: str
    backend: ScsiBackend
    path_id: int = 0
    target_id: int = 0
    alias: str | None = None
    chap: ChapPolicy | None = None
    acl: tuple[AccessEntry, ...] | None = None

    def luns(self) -> list[int]:
        return self.backend.luns(self.path_id, self.target_id)

    def access(self, initiator: str) -> AccessEntry | None:
        """The initiator's entry (one without credentials of its own when there is no ACL);
        None when the ACL leaves it out. iSCSI names compare case-insensitively."""
        if self.acl is None:
            return AccessEntry(initiator)
        wanted = initiator.lower()
        return next((e for e in self.acl if e.initiator.lower() == wanted), None)

    def chap_for(self, initiator: str) -> ChapPolicy | None:
        entry = self.access(initiator)
        if entry is not None and entry.chap is not None:
            return entry.chap
        return self.chap


@dataclass
class PortalSettings:
    limits: TargetLimits = field(default_factory=TargetLimits)
    portal_group_tag: int = 1
    # host:port strings announced in SendTargets; empty = the address each connection arrived on.
    advertise: list[str] = field(default_factory=list)
    login_timeout: float = 15.0
    # Ping an idle full-feature connection with NOP-In after this long, drop it if no answer
    # came within nop_timeout. 0 disables pinging.
    nop_interval: float = 10.0
    nop_timeout: float = 15.0
    # Largest Expected Data Transfer Length accepted for one command.
    max_transfer_bytes: int = 64 * 1024 * 1024
    # Commands a session may have in flight, at most (the CmdSN window also follows LU queues).
    max_window: int = 1024
    # Send an Asynchronous Message (SCSI async event) when a target's LUNs change.
    async_events: bool = True
    # Memory a session's commands may hold for their data (read buffers, write data, receive
    # buffers their payloads keep alive); commands beyond it wait, unexecuted, in order.
    session_buffer_bytes: int = 64 * 1024 * 1024
    # Sessions a target node accepts at once (0: no limit).
    max_sessions_per_target: int = 256
    # CHAP for discovery sessions (None: discovery is open).
    discovery_chap: ChapPolicy | None = None


# Fixed-format sense: UNIT ATTENTION, REPORTED LUNS DATA HAS CHANGED (3Fh/0Eh). Built here, not
# taken from the SCSI layer below, because the front end owns what it puts on the wire.
REPORTED_LUNS_CHANGED_SENSE = bytes((0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x3F, 0x0E,
                                     0, 0, 0, 0))


def format_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class TargetPortal:
    """Target nodes and live sessions, shared by all connections of one server."""

    def __init__(self, nodes: list[TargetNode], settings: PortalSettings | None = None) -> None:
        self.settings = settings or PortalSettings()
        self.nodes: dict[str, TargetNode] = {}
        self._watched: list[ScsiBackend] = []
        for node in nodes:
            self.add_node(node)
        self.sessions: dict[int, Session] = {}
        self._tsih = itertools.count(1)
        self._nexus_ids: dict[tuple[str, str, str], int] = {}
        self._next_nexus = itertools.count(1)
        # Every CHAP challenge handed out lately, for uniqueness and reflection checks.
        self.challenges = ChallengeLog()

    def add_node(self, node: TargetNode) -> None:
        self.nodes[node.name.lower()] = node
        backend = node.backend
        if not any(b is backend for b in self._watched):
            self._watched.append(backend)
            backend.watch_luns(self._luns_changed)

    def remove_node(self, name: str) -> TargetNode | None:
        """Stop offering a target: discovery no longer lists it and logins to it fail.
        Its sessions stay up; their commands answer for whatever LUNs the target still has."""
        return self.nodes.pop(name.lower(), None)

    def _luns_changed(self, path_id: int, target_id: int) -> None:
        """A target's LUN inventory changed behind some node: tell its sessions with an
        asynchronous SCSI event (REPORTED LUNS DATA HAS CHANGED), so initiators that act on it
        rescan now rather than at their next command to the target."""
        if not self.settings.async_events:
            return
        for session in list(self.sessions.values()):
            node = session.node
            if node is None or (node.path_id, node.target_id) != (path_id, target_id):
                continue
            if not any(n is node for n in self.nodes.values()):
                continue
            luns = node.luns()
            for conn in list(session.connections):
                conn.send_async_event(luns[0] if luns else 0, REPORTED_LUNS_CHANGED_SENSE)

    def find_node(self, name: str) -> TargetNode | None:
        # iSCSI names are case-insensitive once normalized (RFC 3722 stringprep maps to lower case).
        return self.nodes.get(name.lower())

    def allocate_tsih(self) -> int:
        while True:
            tsih = next(self._tsih) & 0xFFFF
            if tsih and tsih not in self.sessions:
                return tsih

    def nexus_id(self, initiator_name: str, isid: bytes, target_name: str) -> int:
        """A stable number for one I_T nexus (initiator port + target port)."""
        key = (initiator_name.lower(), isid.hex(), target_name.lower())
        nexus = self._nexus_ids.get(key)
        if nexus is None:
            nexus = self._nexus_ids[key] = next(self._next_nexus)
        return nexus

    def find_session(self, initiator_name: str, isid: bytes, target_name: str) -> Session | None:
        for session in self.sessions.values():
            if (session.isid == isid and session.initiator_name.lower() == initiator_name.lower()
                    and session.target_name.lower() == target_name.lower()):
                return session
        return None

    def send_targets(self, which: str, arrived_on: str, only: TargetNode | None,
                     initiator: str = "") -> list[tuple[str, str]]:
        """SendTargets answer: TargetName and its TargetAddress lines, for the targets whose
        ACL lets ``initiator`` in (the others do not exist as far as it can tell)."""
        addresses = self.settings.advertise or [arrived_on]
        tpgt = self.settings.portal_group_tag
        if only is not None:
            candidates = [only]
        elif which == "All":
            candidates = list(self.nodes.values())
        else:
            node = self.find_node(which)
            candidates = [node] if node is not None else []
        pairs: list[tuple[str, str]] = []
        for node in candidates:
            if node.access(initiator) is None:
                continue
            pairs.append(("TargetName", node.name))
            for address in addresses:
                pairs.append(("TargetAddress", f"{address},{tpgt}"))
        return pairs
