"""The asyncio adapter: moves bytes between sockets and the sans-IO Connection, nothing more.

BufferedProtocol lets the kernel copy received bytes straight into the Connection's receive buffer;
output is batched per loop iteration and written with one vectored ``writelines``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, cast

import structlog

from target.connection import Connection
from target.portal import TargetPortal, format_address

log = structlog.get_logger("emuhba.iscsi")

TICK_SECONDS = 1.0


class IscsiProtocol(asyncio.BufferedProtocol):
    __slots__ = ("_flush_pending", "_loop", "_server", "_tick", "conn", "transport")

    def __init__(self, server: TargetServer) -> None:
        self._server = server
        self._loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self._flush_pending = False
        self._tick: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
        peer = transport.get_extra_info("peername") or ("?", 0)
        conn = Connection(self._server.portal, local_address=format_address(local[0], local[1]),
                          peer=format_address(str(peer[0]), int(peer[1])), now=self._loop.time())
        conn.on_output = self._schedule_flush
        self.conn = conn
        self._server.protocols.add(self)
        self._tick = self._loop.call_later(TICK_SECONDS, self._on_tick)
        log.debug("connection accepted", conn=conn.id, peer=conn.peer, local=conn.local_address)

    def get_buffer(self, sizehint: int) -> memoryview:
        assert self.conn is not None
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        assert conn is not None
        conn._last_rx = self._loop.time()
        conn.buffer_updated(nbytes)
        self._flush()

    def eof_received(self) -> bool:
        return False

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        conn = self.conn
        transport = self.transport
        if conn is None or transport is None or transport.is_closing():
            return
        if conn.has_output():
            transport.writelines(conn.data_to_send())
            conn.output_written()
        if conn.closing:
            transport.close()  # closes after the buffered output is written

    def _on_tick(self) -> None:
        conn = self.conn
        if conn is None:
            return
        conn.handle_timeout(self._loop.time())
        self._flush()
        if not conn.closing:
            self._tick = self._loop.call_later(TICK_SECONDS, self._on_tick)

    def pause_writing(self) -> None:
        # The peer is not reading: take no new PDUs and start no held commands until our output
        # drains (commands already running still finish into the transport's buffer).
        if self.conn is not None:
            self.conn.pause_output()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_output()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tick is not None:
            self._tick.cancel()
        conn = self.conn
        if conn is not None:
            conn.connection_lost()
            log.debug("connection lost", conn=conn.id, peer=conn.peer, error=str(exc) if exc else None)
        self._server.protocols.discard(self)
        self.transport = None


class TargetServer:
    """Listens on the portals and owns every live connection."""

    def __init__(self, portal: TargetPortal, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.portal = portal
        self.loop = loop or asyncio.get_running_loop()
        self.protocols: set[IscsiProtocol] = set()
        self._servers: list[asyncio.base_events.Server] = []

    async def listen(self, host: str, port: int) -> list[tuple[Any, ...]]:
        server = await self.loop.create_server(
            lambda: IscsiProtocol(self), host=host or None, port=port, reuse_address=True,
            backlog=128)
        self._servers.append(server)
        return [s.getsockname() for s in server.sockets]

    async def close(self, grace: float = 5.0) -> None:
        for server in self._servers:
            server.close()
        for proto in list(self.protocols):
            if proto.transport is not None:
                proto.transport.close()
        deadline = self.loop.time() + grace
        while self.protocols and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for proto in list(self.protocols):
            if proto.transport is not None:
                proto.transport.abort()
        for server in self._servers:
            await server.wait_closed()
