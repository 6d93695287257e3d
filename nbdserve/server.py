"""The server: accept loops, the connection limit, lifetime and graceful shutdown.

Tests start it in-process with ``listeners = await nursery.start(server.serve, listeners)``
on a Unix socket in a temporary directory or TCP port 0.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Sequence

import trio

from protocol import TLSMode

from .config import DEFAULT_SHUTDOWN_GRACE
from .connection import DEFAULT_MAX_IN_FLIGHT_BYTES, Connection, PayloadBudget, TLSAuthz
from .exports import Catalogue
from .listeners import Listener
from .log import get_logger
from .transport import SocketTransport, Transport

#: After a shutdown request, in-flight requests get this long to finish before their
#: connections are dropped.
SHUTDOWN_GRACE = DEFAULT_SHUTDOWN_GRACE
#: accept() errors that mean "out of resources, try again soon" (trio's serve_listeners).
_TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Server:
    def __init__(self, catalogue: Catalogue, *, max_connections: int = 0,
                 persistent: bool = True, handshake_timeout: float = 10.0,
                 max_in_flight: int = 16,
                 max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES,
                 tls: TLSMode = TLSMode.OFF,
                 ssl_context: ssl.SSLContext | None = None, tls_authz: TLSAuthz | None = None,
                 shutdown_grace: float = SHUTDOWN_GRACE) -> None:
        self.catalogue = catalogue
        self.max_connections = max_connections
        self.persistent = persistent
        self.handshake_timeout = handshake_timeout
        self.max_in_flight = max_in_flight
        self.budget = PayloadBudget(max_in_flight_bytes)
        self.tls = tls
        self.ssl_context = ssl_context
        self.tls_authz = tls_authz
        self.shutdown_grace = shutdown_grace
        self.connections: set[Connection] = set()
        #: Connections served so far (for tests and the non-persistent exit rule).
        self.served = 0
        self._slots = trio.Semaphore(max_connections) if max_connections > 0 else None
        self._accepting = trio.CancelScope()
        self._connections_scope = trio.CancelScope()
        self._shutting_down = False
        self._log = get_logger()
        #: Set once :meth:`serve` has returned: no connection is left.
        self.closed = trio.Event()

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def serve(self, listeners: Sequence[Listener], *,
                    task_status: trio.TaskStatus[Sequence[Listener]] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Accept on every listener until :meth:`shutdown`, then wait for connections to
        finish. The listeners are closed (and Unix socket files removed) on return."""
        try:
            with self._connections_scope:
                async with trio.open_nursery() as connections:
                    with self._accepting:
                        async with trio.open_nursery() as accepting:
                            for listener in listeners:
                                accepting.start_soon(self._accept_loop, listener, connections)
                            for listener in listeners:
                                self._log.info("listening", transport=listener.kind,
                                               address=listener.address)
                            task_status.started(listeners)
                    for listener in listeners:
                        listener.close()
        finally:
            for listener in listeners:
                listener.close()
            self.closed.set()

    async def serve_transport(self, transport: Transport) -> None:
        """Serve one already-connected client (``--stdin``), then return."""
        try:
            with self._connections_scope:
                if not self._shutting_down:
                    await self._handle(transport, None)
        finally:
            self.closed.set()

    def shutdown(self) -> None:
        """Stop accepting; let in-flight requests finish (at most ``shutdown_grace``
        seconds), then close every connection. Safe to call more than once."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self._log.info("shutting down", connections=len(self.connections))
        self._accepting.cancel()
        for conn in list(self.connections):
            conn.stop()
        self._connections_scope.deadline = trio.current_time() + self.shutdown_grace

    async def _accept_loop(self, listener: Listener, nursery: trio.Nursery) -> None:
        sock = listener.sock
        while True:
            conn_sock = await self._accept(sock)
            if self._slots is not None:
                # At the limit, a new client waits for a free slot before it gets its
                # greeting (as with qemu-nbd -e N), and this listener accepts nobody else
                # meanwhile. Taking the slot only after accept() matters with several
                # listeners (IPv4 and IPv6): a slot held by an idle accept() on one of them
                # would starve clients of the other.
                try:
                    await self._slots.acquire()
                except BaseException:
                    conn_sock.close()
                    raise
            peer = _peer_name(conn_sock, listener)
            transport = SocketTransport(conn_sock, kind=listener.kind, peer=peer)
            nursery.start_soon(self._handle, transport, self._slots)

    async def _accept(self, sock: socket.socket) -> socket.socket:
        while True:
            try:
                conn, _ = sock.accept()
                return conn
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
            except OSError as e:
                if e.errno in _TRANSIENT_ACCEPT_ERRORS:
                    self._log.error("accept failed, retrying", error=e.strerror)
                    await trio.sleep(0.1)
                elif e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                else:
                    raise

    async def _handle(self, transport: Transport, slots: trio.Semaphore | None) -> None:
        conn = None
        try:
            conn = Connection(transport, self.catalogue,
                              handshake_timeout=self.handshake_timeout,
                              max_in_flight=self.max_in_flight,
                              budget=self.budget, tls=self.tls,
                              ssl_context=self.ssl_context, tls_authz=self.tls_authz)
            self.connections.add(conn)
            self.served += 1
            if self._shutting_down:
                conn.stop()
            await conn.run()
        except Exception as e:  # Connection.run() catches its own; this guards the set-up
            self._log.error("connection handler failed", error=f"{type(e).__name__}: {e}")
            with trio.CancelScope(shield=True):
                await transport.aclose()
        finally:
            if conn is not None:
                self.connections.discard(conn)
            if slots is not None:
                slots.release()
            if not self.persistent and not self.connections:
                # qemu-nbd without -t: the server exits when its last client leaves.
                self.shutdown()


def _peer_name(sock: socket.socket, listener: Listener) -> str:
    if listener.kind == "unix":
        return f"unix:{listener.address}"
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


